//! A private nats-server with JetStream for one test: its own port and store
//! directory, so a test can SIGKILL it and start it again on the same store.
//!
//! The binary is `$NATS_SERVER` or `nats-server` on `PATH`; a test that needs
//! one fails when there is none (`.ci/run` installs it).

use std::{
    net::{SocketAddr, TcpListener, TcpStream},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

pub struct NatsServer {
    child: Option<Child>,
    addr: SocketAddr,
    store: tempfile::TempDir,
    /// Cluster flags (name, route listener, routes), empty for a lone server.
    cluster: Vec<String>,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// Three JetStream nodes clustered on loopback.
pub struct NatsCluster {
    pub nodes: Vec<NatsServer>,
}

impl NatsCluster {
    /// Starts three nodes routed to each other (JetStream elects a meta
    /// leader a few seconds later; clients retry until then).
    pub fn start() -> Self {
        let routes: Vec<u16> = (0..3).map(|_| free_port()).collect();
        let route_urls: Vec<String> = routes
            .iter()
            .map(|port| format!("nats://127.0.0.1:{port}"))
            .collect();
        let nodes = (0..3)
            .map(|node| {
                let cluster = vec![
                    "-n".to_owned(),
                    format!("node{node}"),
                    "--cluster_name".to_owned(),
                    "increment-test".to_owned(),
                    "--cluster".to_owned(),
                    route_urls[node].clone(),
                    "--routes".to_owned(),
                    route_urls.join(","),
                ];
                NatsServer::start_with(cluster)
            })
            .collect();
        Self { nodes }
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
        Self::start_with(Vec::new())
    }

    fn start_with(cluster: Vec<String>) -> Self {
        let mut server = Self {
            child: None,
            addr: SocketAddr::from(([127, 0, 0, 1], free_port())),
            store: tempfile::tempdir().expect("a store directory"),
            cluster,
        };
        server.restart();
        server
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

    /// Starts (again) on the same port and store; waits until it accepts.
    pub fn restart(&mut self) {
        self.kill();
        let binary = std::env::var("NATS_SERVER").unwrap_or_else(|_| "nats-server".to_owned());
        let child = Command::new(&binary)
            .args(["-js", "-a", "127.0.0.1", "-p"])
            .arg(self.addr.port().to_string())
            .arg("-sd")
            .arg(self.store.path())
            .args(&self.cluster)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("starting {binary} failed ({e}); install nats-server or set NATS_SERVER")
            });
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect_timeout(&self.addr, Duration::from_millis(200)).is_err() {
            assert!(Instant::now() < deadline, "nats-server accepts within 20 s");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
    }
}
