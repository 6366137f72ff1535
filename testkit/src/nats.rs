//! A private nats-server with JetStream for one test: its own port and store
//! directory, so a test can SIGKILL it and start it again on the same store.
//!
//! The binary is `$NATS_SERVER` or `nats-server` on `PATH`; a test that needs
//! one fails when there is none (`.ci/run` installs it).

use std::{
    fs::{File, OpenOptions},
    net::{SocketAddr, TcpListener, TcpStream},
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

/// How many times a first start tries fresh ports before giving up: a port
/// found free can still be taken by a parallel test before nats-server binds it.
const START_ATTEMPTS: usize = 5;

pub struct NatsServer {
    child: Option<Child>,
    addr: SocketAddr,
    store: tempfile::TempDir,
    /// Cluster flags (name, route listener, routes), empty for a lone server.
    cluster: Vec<String>,
}

/// Why a server did not come up.
#[derive(Debug)]
enum LaunchError {
    /// It exited (a port taken, most likely); a fresh port may do.
    Exited(String),
}

/// A loopback port free right now, drawn below the kernel's ephemeral range
/// (32768 and up) so that the outgoing connections of parallel tests, which
/// take ports from that range, cannot be handed it before nats-server binds.
fn spare_port() -> u16 {
    loop {
        let port = 20_000 + (uuid::Uuid::new_v4().as_u128() % 12_000) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// Three JetStream nodes clustered on loopback.
pub struct NatsCluster {
    pub nodes: Vec<NatsServer>,
}

impl NatsCluster {
    /// Starts three nodes routed to each other (JetStream elects a meta
    /// leader a few seconds later; clients retry until then).
    pub fn start() -> Self {
        let mut failures = Vec::new();
        for _ in 0..START_ATTEMPTS {
            match Self::try_start() {
                Ok(cluster) => return cluster,
                Err(LaunchError::Exited(log)) => failures.push(log),
            }
        }
        panic!(
            "no three-node cluster came up in {START_ATTEMPTS} attempts; last log:\n{}",
            failures.last().map(String::as_str).unwrap_or_default()
        );
    }

    fn try_start() -> Result<Self, LaunchError> {
        let route_urls: Vec<String> = (0..3)
            .map(|_| format!("nats://127.0.0.1:{}", spare_port()))
            .collect();
        let mut nodes = Vec::with_capacity(3);
        for (node, route_url) in route_urls.iter().enumerate() {
            let cluster = vec![
                "-n".to_owned(),
                format!("node{node}"),
                "--cluster_name".to_owned(),
                "increment-test".to_owned(),
                "--cluster".to_owned(),
                route_url.clone(),
                "--routes".to_owned(),
                route_urls.join(","),
            ];
            // A node that fails drops the ones already up (Drop kills them).
            nodes.push(NatsServer::launch_new(cluster)?);
        }
        Ok(Self { nodes })
    }

    /// Every node's URL, comma-separated (what `--journal-url` takes).
    pub fn urls(&self) -> String {
        self.nodes
            .iter()
            .map(NatsServer::url)
            .collect::<Vec<_>>()
            .join(",")
    }
}

impl NatsServer {
    /// Starts a server on a free loopback port and waits until it accepts.
    pub fn start() -> Self {
        let mut failures = Vec::new();
        for _ in 0..START_ATTEMPTS {
            match Self::launch_new(Vec::new()) {
                Ok(server) => return server,
                Err(LaunchError::Exited(log)) => failures.push(log),
            }
        }
        panic!(
            "nats-server did not come up in {START_ATTEMPTS} attempts; last log:\n{}",
            failures.last().map(String::as_str).unwrap_or_default()
        );
    }

    fn launch_new(cluster: Vec<String>) -> Result<Self, LaunchError> {
        let mut server = Self {
            child: None,
            addr: SocketAddr::from(([127, 0, 0, 1], spare_port())),
            store: tempfile::tempdir().expect("a store directory"),
            cluster,
        };
        server.launch()?;
        Ok(server)
    }

    /// `nats://127.0.0.1:port`.
    pub fn url(&self) -> String {
        format!("nats://{}", self.addr)
    }

    /// SIGKILL: no chance to sync or say goodbye.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGSTOP: the server stops answering (connections stay open, nothing
    /// is refused) until [`resume`](Self::resume).
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    /// SIGCONT after [`pause`](Self::pause): it goes on with what it was sent.
    pub fn resume(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, signal: &str) {
        let child = self.child.as_ref().expect("a running nats-server");
        let status = Command::new("kill")
            .args([signal, &child.id().to_string()])
            .status()
            .expect("kill runs");
        assert!(status.success(), "kill {signal} failed");
    }

    /// Starts (again) on the same port and store; waits until it accepts.
    pub fn restart(&mut self) {
        if let Err(LaunchError::Exited(log)) = self.launch() {
            panic!(
                "nats-server exited on restart at {}; its log:\n{log}",
                self.addr
            );
        }
    }

    /// The server's output, kept beside its store across restarts so a
    /// failure can say why.
    fn log_path(&self) -> PathBuf {
        self.store.path().join("nats-server.log")
    }

    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.log_path()).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    fn launch(&mut self) -> Result<(), LaunchError> {
        self.kill();
        let binary = std::env::var("NATS_SERVER").unwrap_or_else(|_| "nats-server".to_owned());
        let log: File = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("a log file beside the store");
        let child = Command::new(&binary)
            .args(["-js", "-a", "127.0.0.1", "-p"])
            .arg(self.addr.port().to_string())
            .arg("-sd")
            .arg(self.store.path())
            .args(&self.cluster)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| {
                panic!("starting {binary} failed ({e}); install nats-server or set NATS_SERVER")
            });
        let child = self.child.insert(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect_timeout(&self.addr, Duration::from_millis(200)).is_err() {
            if let Ok(Some(status)) = child.try_wait() {
                self.child = None;
                return Err(LaunchError::Exited(format!(
                    "{status} at {}:\n{}",
                    self.addr,
                    self.log_tail()
                )));
            }
            assert!(
                Instant::now() < deadline,
                "nats-server at {} accepts within 20 s; its log:\n{}",
                self.addr,
                self.log_tail()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
    }
}
