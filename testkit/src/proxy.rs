//! A TCP proxy between the service and PostgreSQL that can refuse and cut
//! connections, cut one right after a COMMIT reached the server (the
//! ambiguous-commit case: the server committed, the client never hears it),
//! and freeze them (a peer that stops answering without a reset).

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::watch,
};

/// What the proxy does with connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Forward,
    /// New connections are closed at once; existing ones are cut.
    Refuse,
}

struct Shared {
    upstream: SocketAddr,
    mode: watch::Sender<Mode>,
    /// Bumped to cut every open connection.
    cuts: watch::Sender<u64>,
    /// Armed: the next client chunk holding `COMMIT` is forwarded, the
    /// server's answer is swallowed and the connection is cut.
    cut_after_commit: AtomicBool,
    /// COMMITs swallowed so far.
    swallowed_commits: AtomicU64,
    /// While set, what either side sends is held, not forwarded.
    frozen: watch::Sender<bool>,
    /// Armed: the next client chunk holding this is forwarded, then the
    /// proxy freezes (the server dies in the middle of that statement).
    freeze_after: std::sync::Mutex<Option<Vec<u8>>>,
}

/// A running proxy; stops when dropped.
pub struct FaultProxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl FaultProxy {
    /// Listens on a free loopback port and forwards to `upstream`.
    pub async fn start(upstream: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("a free port");
        let addr = listener.local_addr().expect("a bound address");
        let shared = Arc::new(Shared {
            upstream,
            mode: watch::Sender::new(Mode::Forward),
            cuts: watch::Sender::new(0),
            cut_after_commit: AtomicBool::new(false),
            swallowed_commits: AtomicU64::new(0),
            frozen: watch::Sender::new(false),
            freeze_after: std::sync::Mutex::new(None),
        });
        let accepting = Arc::clone(&shared);
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                if *accepting.mode.borrow() == Mode::Refuse {
                    drop(client);
                    continue;
                }
                tokio::spawn(relay(client, Arc::clone(&accepting)));
            }
        });
        Self { addr, shared, task }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `url` with its `host:port` replaced by the proxy's, and TLS off (the
    /// proxy must see the protocol to find a COMMIT).
    pub fn url_for(&self, url: &str) -> String {
        let (scheme, rest) = url.split_once("://").expect("a URL with a scheme");
        let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
        let userinfo = authority.rsplit_once('@').map(|(u, _)| format!("{u}@"));
        let separator = if path.contains('?') { '&' } else { '?' };
        format!(
            "{scheme}://{}{}{path}{separator}sslmode=disable",
            userinfo.unwrap_or_default(),
            self.addr
        )
    }

    /// The database becomes unreachable: open connections are cut, new ones
    /// are closed at once.
    pub fn refuse(&self) {
        self.shared.mode.send_replace(Mode::Refuse);
        self.cut_all();
    }

    /// Forward again.
    pub fn restore(&self) {
        self.shared.mode.send_replace(Mode::Forward);
    }

    /// Cuts every open connection (new ones are still accepted).
    pub fn cut_all(&self) {
        self.shared.cuts.send_modify(|n| *n += 1);
    }

    /// Every connection, open or new, stops answering: what either side
    /// sends is held (no reset, no error) until [`thaw`](Self::thaw).
    pub fn freeze(&self) {
        self.shared.frozen.send_replace(true);
    }

    /// Freezes right after the next client chunk holding `statement` (a
    /// piece of its SQL) is forwarded: the statement reached the server on a
    /// connection that was healthy when it was taken, and gets no answer.
    pub fn freeze_after(&self, statement: &[u8]) {
        *self
            .shared
            .freeze_after
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(statement.to_vec());
    }

    /// Whether connections are held (after [`freeze`](Self::freeze), or once
    /// [`freeze_after`](Self::freeze_after)'s statement went through).
    pub fn is_frozen(&self) -> bool {
        *self.shared.frozen.borrow()
    }

    /// Forwards what was held, and everything after.
    pub fn thaw(&self) {
        self.shared.frozen.send_replace(false);
    }

    /// Arms the ambiguous-commit fault for the next COMMIT.
    pub fn cut_after_next_commit(&self) {
        self.shared.cut_after_commit.store(true, Ordering::SeqCst);
    }

    /// COMMITs that reached the server and whose answer was swallowed.
    pub fn swallowed_commits(&self) -> u64 {
        self.shared.swallowed_commits.load(Ordering::SeqCst)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.task.abort();
        self.cut_all();
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

async fn relay(mut client: TcpStream, shared: Arc<Shared>) {
    let Ok(mut server) = TcpStream::connect(shared.upstream).await else {
        return;
    };
    let mut cuts = shared.cuts.subscribe();
    cuts.borrow_and_update();
    let mut frozen = shared.frozen.subscribe();
    let (mut client_read, mut client_write) = client.split();
    let (mut server_read, mut server_write) = server.split();
    let mut from_client = vec![0u8; 64 * 1024];
    let mut from_server = vec![0u8; 64 * 1024];
    // Set when a COMMIT was forwarded under the armed fault: the server's
    // next answer is swallowed and the connection cut.
    let mut swallow_next_answer = false;
    loop {
        tokio::select! {
            _ = cuts.changed() => return,
            read = client_read.read(&mut from_client) => {
                let Ok(n) = read else { return };
                if n == 0 { return; }
                if !thawed(&mut frozen, &mut cuts).await { return; }
                let chunk = &from_client[..n];
                if contains(chunk, b"COMMIT")
                    && shared.cut_after_commit.swap(false, Ordering::SeqCst)
                {
                    swallow_next_answer = true;
                }
                if server_write.write_all(chunk).await.is_err() { return; }
                let mut armed = shared
                    .freeze_after
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                if armed.as_deref().is_some_and(|statement| contains(chunk, statement)) {
                    *armed = None;
                    shared.frozen.send_replace(true);
                }
            }
            read = server_read.read(&mut from_server) => {
                let Ok(n) = read else { return };
                if n == 0 { return; }
                if !thawed(&mut frozen, &mut cuts).await { return; }
                if swallow_next_answer {
                    // The server answered the COMMIT: it is durable, and the
                    // client will never know.
                    shared.swallowed_commits.fetch_add(1, Ordering::SeqCst);
                    return;
                }
                if client_write.write_all(&from_server[..n]).await.is_err() { return; }
            }
        }
    }
}

/// Waits while the proxy is frozen; false when the connection is cut (or
/// the proxy gone) meanwhile.
async fn thawed(frozen: &mut watch::Receiver<bool>, cuts: &mut watch::Receiver<u64>) -> bool {
    tokio::select! {
        thawed = frozen.wait_for(|frozen| !*frozen) => thawed.is_ok(),
        _ = cuts.changed() => false,
    }
}
