//! Liveness and readiness.

use std::time::Duration;

use poem_openapi::{ApiResponse, OpenApi, Tags, payload::PlainText};
use sea_orm::DatabaseConnection;

use super::{AppState, Lifecycle};
use crate::http::problem::{ApiError, ProblemJson};

/// How long `/readyz` waits for the database to answer.
const READINESS_DB_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Tags)]
enum HealthTag {
    /// Liveness and readiness probes.
    Health,
}

pub struct HealthApi {
    db: DatabaseConnection,
    /// With the journal on, readiness follows NATS, not the database: the
    /// journal takes increments while the database is away.
    journal: Option<async_nats::Client>,
    lifecycle: Lifecycle,
}

impl HealthApi {
    pub fn new(state: &AppState) -> Self {
        Self {
            db: state.db.clone(),
            journal: state.journal_client.clone(),
            lifecycle: state.lifecycle.clone(),
        }
    }
}

#[derive(ApiResponse)]
enum ReadyResponse {
    /// The database answers (with the journal on: NATS is connected) and
    /// the service is not shutting down.
    #[oai(status = 200)]
    Ready(PlainText<&'static str>),
    /// `not-ready`: shutting down, or the database does not answer.
    #[oai(status = 503)]
    NotReady(ProblemJson),
}

#[OpenApi(tag = "HealthTag::Health")]
impl HealthApi {
    /// Liveness: 200 while the process runs.
    #[oai(path = "/healthz", method = "get", operation_id = "healthz")]
    async fn healthz(&self) -> PlainText<&'static str> {
        PlainText("ok")
    }

    /// Readiness: 200 when increments can be taken and the service is not
    /// shutting down: the database answers, or with the journal on, NATS is
    /// connected (the journal holds increments while the database is away).
    #[oai(path = "/readyz", method = "get", operation_id = "readyz")]
    async fn readyz(&self) -> ReadyResponse {
        if self.lifecycle.is_shutting_down() {
            return ReadyResponse::NotReady(ApiError::NotReady("shutting down").payload());
        }
        if let Some(client) = &self.journal {
            return if client.connection_state() == async_nats::connection::State::Connected {
                ReadyResponse::Ready(PlainText("ready"))
            } else {
                ReadyResponse::NotReady(ApiError::NotReady("journal (NATS) unavailable").payload())
            };
        }
        match tokio::time::timeout(READINESS_DB_TIMEOUT, self.db.ping()).await {
            Ok(Ok(())) => ReadyResponse::Ready(PlainText("ready")),
            Ok(Err(_)) | Err(_) => {
                ReadyResponse::NotReady(ApiError::NotReady("database unavailable").payload())
            }
        }
    }
}
