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
