//! The real application on port 0, driven over real HTTP.
//!
//! [`TestApp::start`] builds the [`Application`] exactly as the binary does
//! and serves it on its own listener (the whole front door: connection
//! limits, protocol, fast path, router); [`Client`] speaks HTTP to it. The
//! server task stops when the `TestApp` is dropped, so no test leaves one
//! running behind it.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use api::{
    Application, Batcher, FlushOutcome, Flusher, Settings, ShutdownReport, routes::Lifecycle,
};
use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use sea_orm::DatabaseConnection;

use crate::TestDb;

/// Settings for tests: a flush interval so long that only explicit flushes
/// write (no timing in assertions), and no expiry unless a test asks for it
/// (an entry that expired is written by a later drain, not necessarily the
/// next one).
pub fn test_settings(db: &TestDb) -> Settings {
    let mut settings = Settings::with_database(db.url.clone());
    settings.listen = SocketAddr::from(([127, 0, 0, 1], 0));
    settings.flush_interval = Duration::from_secs(3600);
    settings.cache_ttl = Duration::from_secs(3600);
    settings.db_pool_size = 4;
    settings.spill_path = own_spill_path();
    settings
}

/// A spill file of the test's own: a spill file is one instance's, and a
/// second instance on it is refused at start (tests run side by side).
/// Restarts from a clone of the same settings find it again.
pub fn own_spill_path() -> std::path::PathBuf {
    std::env::temp_dir().join(format!(
        "increment-test-spill-{}.jsonl",
        uuid::Uuid::new_v4().simple()
    ))
}

/// The application serving on a real port, with the parts tests inspect.
pub struct TestApp {
    pub addr: SocketAddr,
    /// Real HTTP to `addr`.
    pub client: Client,
    pub flusher: Arc<Flusher>,
    pub batcher: Arc<Batcher>,
    pub lifecycle: Lifecycle,
    /// The application's own pool.
    pub connection: DatabaseConnection,
    pub db: TestDb,
    stop: tokio::sync::oneshot::Sender<()>,
    server: tokio::task::JoinHandle<ShutdownReport>,
    /// Stops the server when the `TestApp` is dropped without a shutdown.
    _guard: AbortOnDrop,
}

struct AbortOnDrop(Option<tokio::task::AbortHandle>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        if let Some(task) = self.0.take() {
            task.abort();
        }
    }
}

impl TestApp {
    /// Builds and serves the application on `db` with `settings`.
    ///
    /// # Panics
    /// When the application does not start.
    pub async fn start(db: TestDb, settings: Settings) -> Self {
        api::telemetry::init_for_tests();
        let app = Application::build(settings)
            .await
            .expect("the application starts on a fresh database");
        let addr = app.local_addr();
        let flusher = app.flusher();
        let batcher = app.batcher();
        let lifecycle = app.lifecycle();
        let connection = app.db().clone();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(app.run_until_stopped(async {
            let _ = stopped.await;
        }));
        let guard = AbortOnDrop(Some(server.abort_handle()));
        Self {
            addr,
            client: Client::new(addr),
            flusher,
            batcher,
            lifecycle,
            connection,
            db,
            stop,
            server,
            _guard: guard,
        }
    }

    /// [`start`](Self::start) with [`test_settings`] changed by `adjust`.
    pub async fn start_with(db: TestDb, adjust: impl FnOnce(&mut Settings)) -> Self {
        let mut settings = test_settings(&db);
        adjust(&mut settings);
        Self::start(db, settings).await
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// `POST /increment {"key","value"}`.
    pub async fn increment(&self, key: &str, value: i64) -> Response {
        self.post_json(&serde_json::json!({ "key": key, "value": value }).to_string())
            .await
    }

    /// `POST /increment` with `body` as JSON.
    pub async fn post_json(&self, body: &str) -> Response {
        self.client
            .post("/increment")
            .content_type("application/json")
            .body(body.to_owned())
            .send()
            .await
    }

    /// `GET /counters/{key}`, the key percent-encoded whole.
    pub async fn read(&self, key: &str) -> Response {
        self.client
            .get(format!("/counters/{}", percent_encode(key)))
            .send()
            .await
    }

    /// The `/metrics` exposition text.
    pub async fn scrape(&self) -> String {
        let response = self.client.get("/metrics").send().await;
        response.assert_status_is_ok();
        response.text()
    }

    /// Whether `/readyz` answers 200.
    pub async fn ready(&self) -> bool {
        self.client.get("/readyz").send().await.status() == StatusCode::OK
    }

    /// Flushes until nothing is pending; returns what the first flush did.
    ///
    /// # Panics
    /// When a flush fails, or one flush leaves something for the next.
    pub async fn flush(&self) -> FlushOutcome {
        let first = self.flusher.flush_once().await.expect("the flush succeeds");
        assert_eq!(
            self.flusher.flush_once().await.expect("the flush succeeds"),
            FlushOutcome::Empty,
            "one flush writes everything pending"
        );
        first
    }

    /// Every stored counter.
    pub async fn counters(&self) -> std::collections::BTreeMap<String, i64> {
        self.db.counters().await
    }

    /// Runs the shutdown sequence; returns its report and the database.
    pub async fn shut_down(self) -> (ShutdownReport, TestDb) {
        let Self {
            stop,
            server,
            mut _guard,
            db,
            ..
        } = self;
        _guard.0 = None;
        let _ = stop.send(());
        let report = server.await.expect("the server task ends");
        (report, db)
    }

    /// Stops the server with no shutdown sequence at all (a crash, as far
    /// as the database and the journal can tell); returns the database.
    pub async fn crash(self) -> TestDb {
        let Self {
            server,
            mut _guard,
            db,
            ..
        } = self;
        _guard.0 = None;
        server.abort();
        let _ = server.await;
        db
    }

    /// Shuts down and asserts that everything accepted was written.
    pub async fn shut_down_cleanly(self) -> TestDb {
        let (report, db) = self.shut_down().await;
        assert_eq!(report, ShutdownReport::Clean);
        db
    }
}

/// `text` with every byte outside RFC 3986's unreserved set percent-encoded,
/// for a path segment or a query value.
pub fn percent_encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// An HTTP client for one application: paths, not URLs.
#[derive(Clone)]
pub struct Client {
    base: String,
    http: reqwest::Client,
}

impl Client {
    pub fn new(addr: SocketAddr) -> Self {
        Self {
            base: format!("http://{addr}"),
            http: reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .timeout(Duration::from_secs(60))
                .build()
                .expect("a client can be built"),
        }
    }

    pub fn request(&self, method: http::Method, path: impl AsRef<str>) -> Request {
        Request(
            self.http
                .request(method, format!("{}{}", self.base, path.as_ref())),
        )
    }

    pub fn get(&self, path: impl AsRef<str>) -> Request {
        self.request(http::Method::GET, path)
    }

    pub fn post(&self, path: impl AsRef<str>) -> Request {
        self.request(http::Method::POST, path)
    }

    pub fn delete(&self, path: impl AsRef<str>) -> Request {
        self.request(http::Method::DELETE, path)
    }
}

/// A request being built.
pub struct Request(reqwest::RequestBuilder);

impl Request {
    pub fn header<K, V>(self, name: K, value: V) -> Self
    where
        HeaderName: TryFrom<K>,
        <HeaderName as TryFrom<K>>::Error: Into<http::Error>,
        HeaderValue: TryFrom<V>,
        <HeaderValue as TryFrom<V>>::Error: Into<http::Error>,
    {
        Self(self.0.header(name, value))
    }

    pub fn content_type(self, value: &str) -> Self {
        self.header(http::header::CONTENT_TYPE, value)
    }

    pub fn body(self, body: impl Into<reqwest::Body>) -> Self {
        Self(self.0.body(body))
    }

    /// Adds `name=value` to the query string.
    pub fn query(self, name: &str, value: &impl serde::Serialize) -> Self {
        Self(self.0.query(&[(name, value)]))
    }

    /// Sends the request and reads the whole response.
    ///
    /// # Panics
    /// When the service does not answer.
    pub async fn send(self) -> Response {
        let response = self.0.send().await.expect("the service answers");
        let status = response.status();
        let headers = response.headers().clone();
        let body = response.bytes().await.expect("the whole body arrives");
        Response {
            status,
            headers,
            body,
        }
    }
}

/// A whole response, with assertions.
#[derive(Debug)]
pub struct Response {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

impl Response {
    pub fn status(&self) -> StatusCode {
        self.status
    }

    pub fn headers(&self) -> &HeaderMap {
        &self.headers
    }

    /// The value of header `name`, if present and text.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    pub fn bytes(&self) -> &[u8] {
        &self.body
    }

    /// The body as text (lossy).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body as JSON.
    ///
    /// # Panics
    /// When the body is not JSON of type `T`.
    pub fn json<T: serde::de::DeserializeOwned>(&self) -> T {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not the expected JSON ({e}): {}", self.text()))
    }

    #[track_caller]
    pub fn assert_status(&self, status: StatusCode) {
        assert_eq!(self.status, status, "body: {}", self.text());
    }

    #[track_caller]
    pub fn assert_status_is_ok(&self) {
        self.assert_status(StatusCode::OK);
    }

    #[track_caller]
    pub fn assert_header(&self, name: &str, value: &str) {
        assert_eq!(self.header(name), Some(value), "header {name}");
    }

    #[track_caller]
    pub fn assert_content_type(&self, value: &str) {
        self.assert_header("content-type", value);
    }

    #[track_caller]
    pub fn assert_bytes(&self, expected: &[u8]) {
        assert_eq!(self.bytes(), expected, "body: {}", self.text());
    }

    #[track_caller]
    pub fn assert_text(&self, expected: &str) {
        assert_eq!(self.text(), expected);
    }

    /// Asserts that the body is the JSON `expected`.
    #[track_caller]
    pub fn assert_json(&self, expected: impl serde::Serialize) {
        let expected = serde_json::to_value(expected).expect("serialisable");
        assert_eq!(self.json::<serde_json::Value>(), expected);
    }
}
