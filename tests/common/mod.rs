//! The release-independent harness for tests that run the real binary.
// Each test binary uses a part of this harness.
#![allow(dead_code)]

use std::{net::TcpListener, path::Path, process::Stdio, time::Duration};

use nix::{sys::signal::Signal, unistd::Pid};
use testkit::TestDb;
use tokio::process::{Child, Command};

/// The binary under test, listening on a free loopback port.
pub struct Service {
    pub child: Child,
    pub base: String,
}

impl Service {
    /// Starts the binary against `db`; `spill_dir` holds its spill file.
    pub async fn start(db: &TestDb, spill_dir: &Path) -> Self {
        // Ask the kernel for a free port, then hand it to the binary.
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let child = Command::new(env!("CARGO_BIN_EXE_increment"))
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(["--database-url", &db.url])
            .args(["--flush-interval", "100ms"])
            .args(["--shutdown-timeout", "30s"])
            .arg("--spill-path")
            .arg(spill_dir.join("spill.jsonl"))
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .expect("the binary starts");
        let service = Self {
            child,
            base: format!("http://127.0.0.1:{port}"),
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
        nix::sys::signal::kill(self.pid(), Signal::SIGTERM).expect("SIGTERM sent");
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
