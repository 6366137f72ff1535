//! The release-independent harness for tests that run the real binary.
#![allow(dead_code)] // crash and e2e each use a part of it

use std::{net::SocketAddr, path::Path, process::Stdio, sync::Arc, time::Duration};

use nix::{sys::signal::Signal, unistd::Pid};
use parking_lot::Mutex;
use testkit::TestDb;
use tokio::{
    io::{AsyncBufReadExt, BufReader},
    process::{Child, ChildStderr, Command},
};

/// Every line the binary has written to stderr so far.
pub type Logs = Arc<Mutex<Vec<String>>>;

/// The binary under test, listening on a free loopback port.
pub struct Service {
    pub child: Child,
    pub base: String,
    pub logs: Logs,
}

/// Flags every start gets unless `extra` gives the same flag.
const DEFAULT_FLAGS: &[(&str, &str)] = &[
    ("--listen", "127.0.0.1:0"),
    ("--flush-interval", "100ms"),
    ("--shutdown-timeout", "30s"),
    ("--log-format", "json"),
];

impl Service {
    /// Starts the binary against `db`; `spill_dir` holds its spill file.
    pub async fn start(db: &TestDb, spill_dir: &Path) -> Self {
        Self::start_with(db, spill_dir, &[]).await
    }

    /// [`start`](Self::start) with more flags.
    pub async fn start_with(db: &TestDb, spill_dir: &Path, extra: &[&str]) -> Self {
        Self::start_logging(db, spill_dir, extra, "warn,api::startup=info").await
    }

    /// [`start_with`](Self::start_with), logging what `rust_log` lets through;
    /// `extra` may replace the default flags (JSON logs are needed: the
    /// address is read from them).
    pub async fn start_logging(
        db: &TestDb,
        spill_dir: &Path,
        extra: &[&str],
        rust_log: &str,
    ) -> Self {
        // Port 0: the binary binds a free port itself and logs it (JSON), so
        // no other process can take the port between a pick and the bind.
        let mut child = Command::new(env!("CARGO_BIN_EXE_increment"))
            .args(
                DEFAULT_FLAGS
                    .iter()
                    .filter(|(flag, _)| !extra.contains(flag))
                    .flat_map(|(flag, value)| [flag, value]),
            )
            .args(["--database-url", &db.url])
            .arg("--spill-path")
            .arg(spill_dir.join("spill.jsonl"))
            .args(extra)
            .env("RUST_LOG", rust_log)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("the binary starts");
        let stderr = child.stderr.take().expect("stderr is piped");
        let (addr_tx, addr_rx) = tokio::sync::oneshot::channel();
        let logs = Logs::default();
        tokio::spawn(forward_logs(stderr, addr_tx, Arc::clone(&logs)));
        let addr = tokio::time::timeout(Duration::from_secs(30), addr_rx)
            .await
            .expect("the binary logs its address within 30 s")
            .expect("the binary logs its address before exiting");
        let service = Self {
            child,
            base: format!("http://{addr}"),
            logs,
        };
        service.wait_until_ready().await;
        service
    }

    pub async fn wait_until_ready(&self) {
        let client = reqwest::Client::new();
        let ready = format!("{}/readyz", self.base);
        testkit::eventually(Duration::from_secs(30), "the service is ready", || async {
            client
                .get(&ready)
                .send()
                .await
                .is_ok_and(|response| response.status() == 200)
        })
        .await;
    }

    pub fn pid(&self) -> Pid {
        Pid::from_raw(self.child.id().expect("the service is running") as i32)
    }

    pub fn terminate(&self) {
        self.signal(Signal::SIGTERM);
    }

    pub fn signal(&self, signal: Signal) {
        nix::sys::signal::kill(self.pid(), signal).expect("signal sent");
    }

    pub async fn wait_for_exit(mut self) -> std::process::ExitStatus {
        tokio::time::timeout(Duration::from_secs(60), self.child.wait())
            .await
            .expect("the service exits within 60 s of SIGTERM")
            .expect("the exit status can be read")
    }

    /// SIGKILL: no shutdown sequence at all.
    pub async fn kill(mut self) {
        nix::sys::signal::kill(self.pid(), Signal::SIGKILL).expect("SIGKILL sent");
        let _ = self.child.wait().await;
    }
}

/// Passes the binary's log lines on to the test's stderr and keeps them in
/// `logs`, and sends the address from its "listening" line.
async fn forward_logs(
    stderr: ChildStderr,
    addr: tokio::sync::oneshot::Sender<SocketAddr>,
    logs: Logs,
) {
    let mut addr = Some(addr);
    let mut lines = BufReader::new(stderr).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        if addr.is_some()
            && let Some(listening) = listening_addr(&line)
            && let Some(addr) = addr.take()
        {
            let _ = addr.send(listening);
        } else {
            eprintln!("{line}");
        }
        logs.lock().push(line);
    }
}

fn listening_addr(line: &str) -> Option<SocketAddr> {
    let event: serde_json::Value = serde_json::from_str(line).ok()?;
    if event.get("message")?.as_str()? != "listening" {
        return None;
    }
    event.get("addr")?.as_str()?.parse().ok()
}
