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
    lifecycle: Lifecycle,
}

impl HealthApi {
    pub fn new(state: &AppState) -> Self {
        Self {
            db: state.db.clone(),
            lifecycle: state.lifecycle.clone(),
        }
    }
}

#[derive(ApiResponse)]
enum ReadyResponse {
    /// The database answers and the service is not shutting down.
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

    /// Readiness: 200 when the database answers and the service is not shutting down.
    #[oai(path = "/readyz", method = "get", operation_id = "readyz")]
    async fn readyz(&self) -> ReadyResponse {
        if self.lifecycle.is_shutting_down() {
            return ReadyResponse::NotReady(ApiError::NotReady("shutting down").payload());
        }
        match tokio::time::timeout(READINESS_DB_TIMEOUT, self.db.ping()).await {
            Ok(Ok(())) => ReadyResponse::Ready(PlainText("ready")),
            Ok(Err(_)) | Err(_) => {
                ReadyResponse::NotReady(ApiError::NotReady("database unavailable").payload())
            }
        }
    }
}
