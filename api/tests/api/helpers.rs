use std::{collections::BTreeMap, sync::Arc, time::Duration};

use api::{Application, FlushOutcome, Flusher, Settings};
use poem::{
    EndpointExt,
    endpoint::BoxEndpoint,
    http::StatusCode,
    test::{TestClient, TestResponse},
};
use testkit::TestDb;

/// A built application on a fresh database, driven in-process.
pub struct TestApp {
    pub app: Application,
    pub client: TestClient<BoxEndpoint<'static>>,
    pub flusher: Arc<Flusher>,
    pub db: TestDb,
}

/// Settings for tests: a flush interval so long that only explicit
/// `flush_once` calls write (no timing in assertions), and no expiry unless a
/// test asks for it (an entry that expired is written by a later drain, not
/// necessarily the next one).
pub fn test_settings(db: &TestDb) -> Settings {
    let mut settings = Settings::with_database(db.url.clone());
    settings.flush_interval = Duration::from_secs(3600);
    settings.cache_ttl = Duration::from_secs(3600);
    settings.db_pool_size = 4;
    settings
}

pub async fn spawn_app(db: TestDb) -> TestApp {
    let settings = test_settings(&db);
    spawn_app_with(db, settings).await
}

pub async fn spawn_app_with(db: TestDb, settings: Settings) -> TestApp {
    api::telemetry::init_for_tests();
    let app = Application::build(settings)
        .await
        .expect("the application starts on a fresh database");
    let client = TestClient::new(app.router().boxed());
    let flusher = app.flusher();
    TestApp {
        app,
        client,
        flusher,
        db,
    }
}

impl TestApp {
    pub async fn increment(&self, key: &str, value: i64) -> TestResponse {
        self.post_json(&serde_json::json!({ "key": key, "value": value }).to_string())
            .await
    }

    pub async fn post_json(&self, body: &str) -> TestResponse {
        self.client
            .post("/increment")
            .content_type("application/json")
            .body(body.to_owned())
            .send()
            .await
    }

    /// Flushes until nothing is pending; returns what the first flush did.
    pub async fn flush(&self) -> FlushOutcome {
        let first = self.flusher.flush_once().await.expect("the flush succeeds");
        assert_eq!(
            self.flusher.flush_once().await.expect("the flush succeeds"),
            FlushOutcome::Empty,
            "one flush writes everything pending"
        );
        first
    }

    /// The `/metrics` exposition text.
    pub async fn metrics_text(&self) -> String {
        let response = self.client.get("/metrics").send().await;
        response.assert_status_is_ok();
        response.0.into_body().into_string().await.unwrap()
    }

    pub async fn counters(&self) -> BTreeMap<String, i64> {
        self.db.counters().await
    }
}

/// Asserts a 202 with an empty body.
pub async fn assert_accepted(response: TestResponse) {
    response.assert_status(StatusCode::ACCEPTED);
    response.assert_bytes(b"").await;
}

/// Asserts `status` with an RFC 9457 problem document and returns its
/// `detail`.
pub async fn error_message(response: TestResponse, status: StatusCode) -> String {
    problem(response, status).await.detail
}

/// Asserts `status` with an RFC 9457 problem document and returns it.
pub async fn problem(response: TestResponse, status: StatusCode) -> api::http::Problem {
    response.assert_status(status);
    response.assert_content_type("application/problem+json");
    let bytes = response.0.into_body().into_bytes().await.unwrap();
    let problem: api::http::Problem = serde_json::from_slice(&bytes).unwrap_or_else(|e| {
        panic!(
            "not a problem document ({e}): {}",
            String::from_utf8_lossy(&bytes)
        )
    });
    assert_eq!(problem.status, status.as_u16());
    assert!(problem.type_uri.starts_with("/problems/"), "{problem:?}");
    problem
}

/// An application served over a real listener on port 0 (the whole front
/// door: connection limits and protocol included).
pub struct RunningApp {
    pub addr: std::net::SocketAddr,
    pub flusher: Arc<Flusher>,
    stop: tokio::sync::oneshot::Sender<()>,
    server: tokio::task::JoinHandle<api::ShutdownReport>,
    pub db: TestDb,
}

/// Serves a fresh SQLite-backed application with `adjust`ed test settings.
pub async fn serve(adjust: impl FnOnce(&mut Settings)) -> RunningApp {
    serve_on(TestDb::sqlite().await, adjust).await
}

pub async fn serve_on(db: TestDb, adjust: impl FnOnce(&mut Settings)) -> RunningApp {
    api::telemetry::init_for_tests();
    let mut settings = test_settings(&db);
    adjust(&mut settings);
    let app = Application::build(settings)
        .await
        .expect("the application starts on a fresh database");
    let addr = app.local_addr();
    let flusher = app.flusher();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(app.run_until_stopped(async {
        let _ = stopped.await;
    }));
    RunningApp {
        addr,
        flusher,
        stop,
        server,
        db,
    }
}

impl RunningApp {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Shuts down and asserts that everything accepted was written.
    pub async fn shut_down(self) -> TestDb {
        self.stop.send(()).expect("the server still runs");
        assert_eq!(
            self.server.await.expect("the server task ends"),
            api::ShutdownReport::Clean
        );
        self.db
    }

    /// The `/metrics` exposition text.
    pub async fn metrics_text(&self) -> String {
        reqwest::get(self.url("/metrics"))
            .await
            .expect("/metrics answers")
            .text()
            .await
            .expect("a text body")
    }
}

/// One HTTP/1.1 response read off a raw socket.
#[derive(Debug)]
pub struct RawResponse {
    pub status: u16,
    /// Header names in lower case.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl RawResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// A client on a raw TCP connection: it writes exactly the bytes it is
/// given and reads responses itself (bodies with `Content-Length` only, as
/// the service sends).
pub struct RawClient {
    pub stream: tokio::net::TcpStream,
    buffered: Vec<u8>,
}

impl RawClient {
    pub async fn connect(addr: std::net::SocketAddr) -> Self {
        Self {
            stream: tokio::net::TcpStream::connect(addr)
                .await
                .expect("the service accepts connections"),
            buffered: Vec::new(),
        }
    }

    pub async fn send(&mut self, bytes: &[u8]) {
        self.try_send(bytes).await.expect("the write goes out");
    }

    /// Writes, reporting a connection the service already closed (it may
    /// answer a request before its body is all sent: a 413).
    pub async fn try_send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        use tokio::io::AsyncWriteExt;
        self.stream.write_all(bytes).await
    }

    /// The next response, or `None` if the connection closed first; panics
    /// when nothing happens within `within`.
    pub async fn response(&mut self, within: Duration) -> Option<RawResponse> {
        tokio::time::timeout(within, self.read_response())
            .await
            .expect("the service answers or closes in time")
    }

    /// Whether the service closes the connection (without answering) within
    /// `within`.
    pub async fn closes_within(&mut self, within: Duration) -> bool {
        use tokio::io::AsyncReadExt;
        let mut buf = [0u8; 1024];
        let deadline = tokio::time::Instant::now() + within;
        loop {
            match tokio::time::timeout_at(deadline, self.stream.read(&mut buf)).await {
                Err(_elapsed) => return false,
                Ok(Ok(0) | Err(_)) => return true,
                Ok(Ok(n)) => self.buffered.extend_from_slice(&buf[..n]),
            }
        }
    }

    async fn fill(&mut self) -> bool {
        use tokio::io::AsyncReadExt;
        let mut buf = [0u8; 4096];
        match self.stream.read(&mut buf).await {
            Ok(0) | Err(_) => false,
            Ok(n) => {
                self.buffered.extend_from_slice(&buf[..n]);
                true
            }
        }
    }

    async fn read_response(&mut self) -> Option<RawResponse> {
        let head_end = loop {
            if let Some(at) = find(&self.buffered, b"\r\n\r\n") {
                break at;
            }
            if !self.fill().await {
                return None;
            }
        };
        let head = String::from_utf8_lossy(&self.buffered[..head_end]).into_owned();
        let mut lines = head.split("\r\n");
        let status = lines
            .next()
            .and_then(|line| line.split(' ').nth(1))
            .and_then(|code| code.parse().ok())
            .expect("a status line");
        let headers: Vec<(String, String)> = lines
            .filter_map(|line| line.split_once(':'))
            .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
            .collect();
        let length: usize = headers
            .iter()
            .find(|(n, _)| n == "content-length")
            .and_then(|(_, v)| v.parse().ok())
            .unwrap_or(0);
        let body_start = head_end + 4;
        while self.buffered.len() < body_start + length {
            if !self.fill().await {
                return None;
            }
        }
        let body = self.buffered[body_start..body_start + length].to_vec();
        self.buffered.drain(..body_start + length);
        Some(RawResponse {
            status,
            headers,
            body,
        })
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// A plain `POST /increment` request, as bytes.
pub fn increment_request(key: &str, value: i64) -> Vec<u8> {
    let body = serde_json::json!({ "key": key, "value": value }).to_string();
    format!(
        "POST /increment HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}
