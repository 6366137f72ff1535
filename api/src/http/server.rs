//! The first two steps of the front door: connection limits and protocol.
//!
//! Connections are served by hyper's HTTP/1.1 server directly (poem's
//! `Server` exposes neither hyper's header deadline nor a way to leave out
//! HTTP/2). Each request then goes to the poem endpoint given to [`serve`]
//! (the [`super::FrontDoor`]).
//!
//! - **Connection cap**: at most `max_connections` open; further clients wait
//!   in the kernel's backlog until one closes.
//! - **Header deadline**: hyper's own `header_read_timeout`, so it is the
//!   parser that decides where a head ends (leading empty lines, bare LF,
//!   `Expect: 100-continue` and pipelining are hyper's business). Its timer is
//!   `HeadTimer`: a new connection must send a whole head within
//!   `header_timeout`; between requests a keep-alive connection may stay
//!   silent for `idle_timeout`, and once the next request's first byte arrives
//!   its head must be complete within `header_timeout`. At shutdown, heads
//!   still incomplete are abandoned at once.
//! - **Send deadline**: a response the client takes no byte of for
//!   `send_timeout` (it stopped reading) fails its connection, which is
//!   closed; otherwise a client that never reads would hold its connection
//!   and the buffered response (the Swagger page is 1.6 MB) for good.
//! - **HTTP/1.1 only**: an HTTP/2 preface is a malformed HTTP/1 request and
//!   the connection is closed (docs/design.md says why).

use std::{
    convert::Infallible,
    future::Future,
    io,
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::{Duration, Instant},
};

use hyper::{body::Incoming, server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use poem::{
    Addr, Endpoint, IntoResponse,
    http::uri::Scheme,
    web::{LocalAddr, RemoteAddr},
};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::Semaphore,
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

/// The connection-level limits.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    /// Open connections at most; more wait in the backlog.
    pub max_connections: usize,
    /// A request head must be complete this long after its first byte (for a
    /// new connection: after it was accepted).
    pub header_timeout: Duration,
    /// How long a keep-alive connection may wait silently for its next request.
    pub idle_timeout: Duration,
    /// How long a response may wait for the client to take any of it.
    pub send_timeout: Duration,
    /// Largest request head hyper buffers; more is refused with 431.
    pub max_head_bytes: usize,
}

/// Pause after a failed `accept` (out of file descriptors, say), so that the
/// loop does not spin while the condition lasts.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(50);

/// Serves `endpoint` on `listener` until `shutdown` is cancelled; then stops
/// accepting, lets every connection finish its current request (idle ones
/// close at once) for up to `drain`, and drops what is left.
pub async fn serve<E>(
    listener: TcpListener,
    endpoint: E,
    limits: ConnectionLimits,
    shutdown: CancellationToken,
    drain: Duration,
) where
    E: Endpoint + 'static,
{
    let endpoint = Arc::new(endpoint);
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let local_addr = listener
        .local_addr()
        .map(|addr| LocalAddr(Addr::SocketAddr(addr)))
        .unwrap_or_default();
    // Closed when the drain ends: connections still open are dropped.
    let force_close = CancellationToken::new();
    let connections = TaskTracker::new();
    loop {
        let permit = tokio::select! {
            () = shutdown.cancelled() => break,
            permit = Arc::clone(&permits).acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_closed) => break,
            },
        };
        let (stream, remote) = tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    tracing::warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                    continue;
                }
            },
        };
        let endpoint = Arc::clone(&endpoint);
        let local_addr = local_addr.clone();
        let shutdown = shutdown.clone();
        let force_close = force_close.clone();
        connections.spawn(async move {
            let _permit = permit;
            serve_connection(
                stream,
                remote,
                local_addr,
                endpoint,
                limits,
                shutdown,
                force_close,
            )
            .await;
        });
    }
    drop(listener);
    connections.close();
    if tokio::time::timeout(drain, connections.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            open = connections.len(),
            "connections still busy at the end of the drain are closed"
        );
        force_close.cancel();
        connections.wait().await;
    }
}

async fn serve_connection<E: Endpoint + 'static>(
    stream: TcpStream,
    remote: SocketAddr,
    local_addr: LocalAddr,
    endpoint: Arc<E>,
    limits: ConnectionLimits,
    shutdown: CancellationToken,
    force_close: CancellationToken,
) {
    // Responses are written whole; do not hold them back for Nagle.
    let _ = stream.set_nodelay(true);
    let activity = Arc::new(ReadActivity {
        reads: AtomicU64::new(0),
        shutdown: shutdown.clone(),
    });
    let io = TokioIo::new(CountingIo {
        inner: stream,
        activity: Arc::clone(&activity),
        send_timeout: limits.send_timeout,
        stalled: None,
    });
    let remote_addr = RemoteAddr(Addr::SocketAddr(remote));
    let service = service_fn(move |request: hyper::Request<Incoming>| {
        let endpoint = Arc::clone(&endpoint);
        let request = poem::Request::from((
            request,
            local_addr.clone(),
            remote_addr.clone(),
            Scheme::HTTP,
        ));
        async move {
            let response = match endpoint.call(request).await {
                Ok(response) => response.into_response(),
                Err(e) => e.into_response(),
            };
            Ok::<_, Infallible>(hyper::Response::from(response))
        }
    });
    let connection = http1::Builder::new()
        .timer(HeadTimer::new(activity, limits))
        .header_read_timeout(limits.header_timeout)
        .max_buf_size(limits.max_head_bytes)
        // Responses are small: one copy into one buffer and one `send` beat
        // a `writev` of head and body (measured with scripts/ab.sh).
        .writev(false)
        .keep_alive(true)
        .serve_connection(io, service);
    tokio::pin!(connection);
    tokio::select! {
        _ = connection.as_mut() => return,
        () = shutdown.cancelled() => {}
    }
    // Finish the request in progress (if any), then close.
    connection.as_mut().graceful_shutdown();
    tokio::select! {
        _ = connection => {}
        () = force_close.cancelled() => {}
    }
}

/// What the [`HeadTimer`] of a connection watches: the count of reads that
/// delivered bytes (to tell a silent connection from one that has begun a
/// request; nothing is parsed) and the server's shutdown.
struct ReadActivity {
    reads: AtomicU64,
    /// A head still incomplete when shutdown begins is abandoned: nothing of
    /// its request was read, so nothing is lost, and the drain need not wait
    /// for its deadline.
    shutdown: CancellationToken,
}

struct CountingIo<T> {
    inner: T,
    activity: Arc<ReadActivity>,
    send_timeout: Duration,
    /// Runs while a write waits for the client to take bytes; made at the
    /// first write that has to wait, so a write the socket takes at once
    /// (nearly all of them) costs no timer.
    stalled: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<T> CountingIo<T> {
    /// `polled`, a write or flush, unless it has been waiting for
    /// `send_timeout`: then an error, which closes the connection.
    fn within_send_timeout<R>(
        &mut self,
        cx: &mut Context<'_>,
        polled: Poll<io::Result<R>>,
    ) -> Poll<io::Result<R>> {
        if polled.is_ready() {
            self.stalled = None;
            return polled;
        }
        let timeout = self.send_timeout;
        let stalled = self
            .stalled
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
        if stalled.as_mut().poll(cx).is_pending() {
            return Poll::Pending;
        }
        self.stalled = None;
        Poll::Ready(Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "the client took none of the response within the send timeout",
        )))
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for CountingIo<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.activity.reads.fetch_add(1, Ordering::Relaxed);
        }
        polled
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for CountingIo<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.within_send_timeout(cx, polled)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let polled = Pin::new(&mut self.inner).poll_flush(cx);
        self.within_send_timeout(cx, polled)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.within_send_timeout(cx, polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// hyper's timer for one connection. hyper's HTTP/1 server asks it for one
/// thing only: a deadline each time it starts waiting for a request head
/// (at accept, and after each response). hyper's deadline runs from that
/// moment, which would make an idle keep-alive connection and a slow head the
/// same thing; this timer starts the head deadline at the head's first byte
/// instead, and gives the silent wait between requests `idle_timeout`.
struct HeadTimer {
    activity: Arc<ReadActivity>,
    header_timeout: Duration,
    idle_timeout: Duration,
    /// Set once the first head wait (at accept) has begun.
    served_first: AtomicBool,
}

impl HeadTimer {
    fn new(activity: Arc<ReadActivity>, limits: ConnectionLimits) -> Self {
        Self {
            activity,
            header_timeout: limits.header_timeout,
            idle_timeout: limits.idle_timeout,
            served_first: AtomicBool::new(false),
        }
    }
}

impl hyper::rt::Timer for HeadTimer {
    fn sleep(&self, duration: Duration) -> Pin<Box<dyn hyper::rt::Sleep>> {
        Box::pin(PlainSleep {
            sleep: tokio::time::sleep(duration),
        })
    }

    fn sleep_until(&self, _deadline: Instant) -> Pin<Box<dyn hyper::rt::Sleep>> {
        // Every wait after the connection's first is a keep-alive wait.
        let keep_alive = self.served_first.swap(true, Ordering::Relaxed);
        Box::pin(HeadDeadline {
            activity: Arc::clone(&self.activity),
            reads_at_start: self.activity.reads.load(Ordering::Relaxed),
            waiting_for_first_byte: keep_alive,
            first: if keep_alive {
                self.idle_timeout
            } else {
                self.header_timeout
            },
            header_timeout: self.header_timeout,
            sleep: None,
        })
    }
}

pin_project_lite::pin_project! {
    struct PlainSleep {
        #[pin]
        sleep: tokio::time::Sleep,
    }
}

impl Future for PlainSleep {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        self.project().sleep.poll(cx)
    }
}

impl hyper::rt::Sleep for PlainSleep {}

/// The deadline of one request head (see [`HeadTimer`]).
///
/// hyper asks for one per request, but polls it only when the head did not
/// arrive whole; the timer itself is made on that first poll, so a request
/// whose head comes in one read costs no timer. hyper polls it right after
/// the read that came up short, so the deadline still runs from the start of
/// the wait, to within one read.
struct HeadDeadline {
    activity: Arc<ReadActivity>,
    reads_at_start: u64,
    /// A keep-alive wait that has seen no byte yet: `idle_timeout` runs.
    waiting_for_first_byte: bool,
    /// The wait's first deadline: `header_timeout`, or `idle_timeout` between
    /// requests.
    first: Duration,
    header_timeout: Duration,
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl Future for HeadDeadline {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = &mut *self;
        // hyper polls the head again when the connection is told to shut down.
        if this.activity.shutdown.is_cancelled() {
            return Poll::Ready(());
        }
        let sleep = this
            .sleep
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(this.first)));
        if this.waiting_for_first_byte
            && this.activity.reads.load(Ordering::Relaxed) != this.reads_at_start
        {
            this.waiting_for_first_byte = false;
            sleep
                .as_mut()
                .reset(tokio::time::Instant::now() + this.header_timeout);
        }
        sleep.as_mut().poll(cx)
    }
}

impl hyper::rt::Sleep for HeadDeadline {}
