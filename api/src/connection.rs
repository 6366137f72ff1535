//! Connection-level limits that poem does not offer: a cap on concurrent
//! connections, and a deadline for a request's headers (a client that dribbles
//! header bytes cannot hold a connection for ever). Idle keep-alive
//! connections are closed by poem's own idle timeout; slow bodies by
//! [`crate::limits::BodyLimit`].

use std::{
    future::Future,
    io,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use poem::{
    http::uri::Scheme,
    listener::Acceptor,
    web::{LocalAddr, RemoteAddr},
};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    sync::{OwnedSemaphorePermit, Semaphore},
    time::Sleep,
};

/// Wraps an acceptor: at most `max_connections` open at once (further
/// clients wait in the kernel's backlog), each with a header deadline.
pub struct GuardedAcceptor<A> {
    inner: A,
    permits: Arc<Semaphore>,
    header_timeout: Duration,
}

impl<A> GuardedAcceptor<A> {
    pub fn new(inner: A, max_connections: usize, header_timeout: Duration) -> Self {
        Self {
            inner,
            permits: Arc::new(Semaphore::new(max_connections)),
            header_timeout,
        }
    }
}

impl<A: Acceptor> Acceptor for GuardedAcceptor<A> {
    type Io = GuardedIo<A::Io>;

    fn local_addr(&self) -> Vec<LocalAddr> {
        self.inner.local_addr()
    }

    async fn accept(&mut self) -> io::Result<(Self::Io, LocalAddr, RemoteAddr, Scheme)> {
        // Wait for room before taking the next connection off the backlog.
        let permit = Arc::clone(&self.permits)
            .acquire_owned()
            .await
            .map_err(|_| io::Error::other("the connection limit was closed"))?;
        let (io, local, remote, scheme) = self.inner.accept().await?;
        Ok((
            GuardedIo::new(io, permit, self.header_timeout),
            local,
            remote,
            scheme,
        ))
    }
}

/// Where a connection is in its current request, as far as the header
/// deadline cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Between requests: no deadline (poem's idle timeout applies).
    Idle,
    /// A request's first bytes arrived; its headers must end in time.
    Headers,
    /// Headers complete; the handler (and the body limit) take over until the
    /// response starts.
    Request,
}

/// A connection holding one permit of the connection cap.
pub struct GuardedIo<T> {
    inner: T,
    _permit: OwnedSemaphorePermit,
    header_timeout: Duration,
    phase: Phase,
    /// Bytes of `\r\n\r\n` matched so far (it may span reads).
    matched: u8,
    deadline: Option<Pin<Box<Sleep>>>,
}

impl<T> GuardedIo<T> {
    fn new(inner: T, permit: OwnedSemaphorePermit, header_timeout: Duration) -> Self {
        Self {
            inner,
            _permit: permit,
            header_timeout,
            phase: Phase::Idle,
            matched: 0,
            deadline: None,
        }
    }

    /// Follows the bytes read; returns when the headers end.
    fn observe(&mut self, bytes: &[u8]) {
        if self.phase == Phase::Request || bytes.is_empty() {
            return;
        }
        if self.phase == Phase::Idle {
            self.phase = Phase::Headers;
            self.matched = 0;
        }
        self.scan(bytes);
        // The timer only when the head did not come whole in one read (rare:
        // no timer work on the common path).
        if self.phase == Phase::Headers && self.deadline.is_none() {
            self.deadline = Some(Box::pin(tokio::time::sleep(self.header_timeout)));
        }
    }

    /// Looks for the end of the head in `bytes`, continuing a partial match.
    fn scan(&mut self, bytes: &[u8]) {
        // Finish a `\r\n\r\n` begun in the previous read, byte by byte.
        let mut rest = bytes;
        while self.matched > 0 {
            let Some((&byte, tail)) = rest.split_first() else {
                return;
            };
            self.matched = next_match(self.matched, byte);
            rest = tail;
            if self.matched == HEADER_END.len() as u8 {
                self.end_headers();
                return;
            }
        }
        // The common case: the whole head in one read, found by a fast search.
        if memchr::memmem::find(rest, HEADER_END).is_some() {
            self.end_headers();
            return;
        }
        // Not there: remember how much of its beginning ends this read.
        self.matched = (1..HEADER_END.len())
            .rev()
            .find(|&n| rest.ends_with(&HEADER_END[..n]))
            .map_or(0, |n| n as u8);
    }

    fn end_headers(&mut self) {
        self.phase = Phase::Request;
        self.matched = 0;
        self.deadline = None;
    }
}

/// The blank line that ends a request's head.
const HEADER_END: &[u8] = b"\r\n\r\n";

/// How much of [`HEADER_END`] is matched after `byte`, given `matched` before.
fn next_match(matched: u8, byte: u8) -> u8 {
    if byte == HEADER_END[usize::from(matched)] {
        matched + 1
    } else if byte == b'\r' {
        1
    } else {
        0
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for GuardedIo<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if let Some(deadline) = self.deadline.as_mut()
            && deadline.as_mut().poll(cx).is_ready()
        {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "request headers were not received in time",
            )));
        }
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = polled {
            self.observe(&buf.filled()[before..]);
        }
        polled
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for GuardedIo<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        // A response is going out: the next bytes read start a new request.
        if self.phase == Phase::Request {
            self.phase = Phase::Idle;
        }
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        if self.phase == Phase::Request {
            self.phase = Phase::Idle;
        }
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEAD: &[u8] = b"POST /increment HTTP/1.1\r\nHost: x\r\nA: \r\r\n\r\n";

    fn guarded() -> GuardedIo<()> {
        let permit = Arc::new(Semaphore::new(1))
            .try_acquire_owned()
            .expect("a free permit");
        GuardedIo::new((), permit, Duration::from_secs(5))
    }

    /// Feeds `parts` in order; returns after how many bytes the head ended.
    fn head_end(parts: &[&[u8]]) -> Option<usize> {
        let mut io = guarded();
        let mut seen = 0;
        for part in parts {
            io.observe(part);
            seen += part.len();
            if io.phase == Phase::Request {
                return Some(seen);
            }
            assert!(io.deadline.is_some(), "an unfinished head has a deadline");
        }
        None
    }

    #[tokio::test]
    async fn the_head_ends_at_the_blank_line_however_the_reads_split_it() {
        assert_eq!(head_end(&[HEAD]), Some(HEAD.len()));
        for cut in 1..HEAD.len() {
            let (a, b) = HEAD.split_at(cut);
            assert_eq!(head_end(&[a, b]), Some(HEAD.len()), "cut at {cut}");
        }
        let bytes: Vec<&[u8]> = HEAD.chunks(1).collect();
        assert_eq!(head_end(&bytes), Some(HEAD.len()));
        for cut in 1..HEAD.len() - 1 {
            let (a, rest) = HEAD.split_at(cut);
            let (b, c) = rest.split_at(1);
            assert_eq!(head_end(&[a, b, c]), Some(HEAD.len()), "cuts at {cut}");
        }
    }

    #[tokio::test]
    async fn lone_line_ends_do_not_end_the_head() {
        assert_eq!(head_end(&[b"GET / HTTP/1.1\r\nA: b\r\n\r"]), None);
        assert_eq!(head_end(&[b"GET / HTTP/1.1\r\n", b"\n\r\n"]), None);
        assert_eq!(head_end(&[b"\r\n\r", b"x\r\n"]), None);
        assert_eq!(head_end(&[b"\r\n\r", b"\r\n\r\n"]), Some(7));
    }

    #[tokio::test]
    async fn a_complete_head_arms_no_timer() {
        let mut io = guarded();
        io.observe(HEAD);
        assert_eq!(io.phase, Phase::Request);
        assert!(io.deadline.is_none());
    }
}
