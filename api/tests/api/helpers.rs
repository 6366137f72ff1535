use std::time::Duration;

use api::Settings;
use poem::http::StatusCode;
use testkit::TestDb;
pub use testkit::{Response, TestApp, test_settings};

/// A connection to `db` with the migrations applied, for tests that drive
/// the flusher or the store without an app.
pub async fn migrated_connection(db: &TestDb) -> sea_orm::DatabaseConnection {
    use migration::MigratorTrait;
    let connection = db.connect().await;
    migration::Migrator::up(&connection, None)
        .await
        .expect("migrations apply");
    connection
}

/// A batcher holding up to `capacity` keys for `ttl`, and a flusher writing
/// it to `connection`, driven by the test alone: no flush loop to race the
/// test's own flushes, no reader, no HTTP.
pub fn loopless_flusher(
    connection: &sea_orm::DatabaseConnection,
    capacity: u64,
    ttl: Duration,
) -> (std::sync::Arc<api::Batcher>, api::Flusher) {
    let batcher = std::sync::Arc::new(api::Batcher::new(
        std::num::NonZeroU64::new(capacity).expect("a capacity above zero"),
        ttl,
    ));
    let flusher = api::Flusher::new(
        std::sync::Arc::clone(&batcher),
        connection.clone(),
        std::sync::Arc::new(api::metrics::Metrics::new()),
        std::sync::Arc::default(),
        Duration::from_secs(3600),
    );
    (batcher, flusher)
}

pub async fn spawn_app(db: TestDb) -> TestApp {
    let settings = test_settings(&db);
    TestApp::start(db, settings).await
}

pub async fn spawn_app_with(db: TestDb, settings: Settings) -> TestApp {
    TestApp::start(db, settings).await
}

/// Serves a fresh SQLite-backed application with `adjust`ed test settings.
pub async fn serve(adjust: impl FnOnce(&mut Settings)) -> TestApp {
    serve_on(TestDb::sqlite().await, adjust).await
}

pub async fn serve_on(db: TestDb, adjust: impl FnOnce(&mut Settings)) -> TestApp {
    TestApp::start_with(db, adjust).await
}

/// `POST /increment?wait=true` for `key`, without an `Idempotency-Key`.
pub async fn post_waiting(app: &TestApp, key: &str, value: i64) -> Response {
    app.client
        .post("/increment?wait=true")
        .content_type("application/json")
        .body(serde_json::json!({ "key": key, "value": value }).to_string())
        .send()
        .await
}

/// Asserts a 202 with an empty body.
/// `POST /increment?wait=true` while `proxy` freezes after `statement`
/// (the question about the request's row) reaches the database: the answer
/// must be `202` "committed, but its row's fate could not be read", never
/// "held and will be written" (nothing is held for it any more).
pub async fn waiter_told_committed_when_its_row_is_unread(
    app: &TestApp,
    proxy: &testkit::proxy::FaultProxy,
    statement: &[u8],
    key: &str,
) {
    proxy.freeze_after(statement);
    let response = post_waiting(app, key, 1).await;
    response.assert_status(StatusCode::ACCEPTED);
    let body: serde_json::Value = response.json();
    proxy.thaw();
    assert_eq!(body["committed"], false, "{body}");
    let detail = body["detail"].as_str().unwrap_or_default();
    assert!(
        detail.contains("batch committed") && !detail.contains("held and will be written"),
        "{detail}"
    );
}

pub async fn assert_accepted(response: Response) {
    response.assert_status(StatusCode::ACCEPTED);
    response.assert_bytes(b"");
}

/// Asserts `status` with an RFC 9457 problem document and returns its
/// `detail`.
pub async fn error_message(response: Response, status: StatusCode) -> String {
    problem(response, status).await.detail
}

/// Asserts `status` with an RFC 9457 problem document and returns it.
pub async fn problem(response: Response, status: StatusCode) -> api::http::Problem {
    response.assert_status(status);
    response.assert_content_type("application/problem+json");
    let bytes = response.bytes();
    let problem: api::http::Problem = serde_json::from_slice(bytes).unwrap_or_else(|e| {
        panic!(
            "not a problem document ({e}): {}",
            String::from_utf8_lossy(bytes)
        )
    });
    assert_eq!(problem.status, status.as_u16());
    assert!(problem.type_uri.starts_with("/problems/"), "{problem:?}");
    problem
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
