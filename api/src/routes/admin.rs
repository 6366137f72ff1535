//! Admin routes, mounted only when an admin token is configured (otherwise
//! they do not exist: 404). Every call needs `Authorization: Bearer <token>`;
//! the token is compared in constant time and never logged.

use std::sync::Arc;

use poem::{
    Endpoint, EndpointExt, IntoResponse, Request, Response, Route,
    error::ResponseError,
    handler,
    http::header,
    post,
    web::{Data, Json},
};
use subtle::ConstantTimeEq;

use crate::{
    flusher::{FlushOutcome, Flusher},
    http::problem::ApiError,
};

/// What `POST /admin/flush` wrote.
#[derive(serde::Serialize)]
struct FlushReport {
    /// Distinct keys written (0 when nothing was pending).
    keys: usize,
    /// Batches committed (a batch left by a failed flush goes first).
    batches: usize,
    /// Upsert statements executed.
    statements: usize,
}

/// The admin routes, to nest under `/admin`.
pub fn routes(token: Arc<str>, flusher: Arc<Flusher>) -> impl Endpoint<Output = Response> {
    Route::new()
        .at("/flush", post(flush_now).data(flusher))
        .around(move |next, req| {
            let token = Arc::clone(&token);
            async move {
                if !authorized(&req, &token) {
                    return Ok(ApiError::Unauthorized.as_response());
                }
                next.call(req).await.map(IntoResponse::into_response)
            }
        })
}

fn authorized(req: &Request, token: &str) -> bool {
    let presented = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    // Constant time over the bytes (only the length can leak).
    bool::from(presented.as_bytes().ct_eq(token.as_bytes()))
}

/// Flushes now and answers with what was written; 503 when the database
/// refused (the batch is kept and retried as usual).
#[handler]
async fn flush_now(flusher: Data<&Arc<Flusher>>) -> Response {
    match flusher.flush_once().await {
        Ok(FlushOutcome::Empty) => Json(FlushReport {
            keys: 0,
            batches: 0,
            statements: 0,
        })
        .into_response(),
        Ok(FlushOutcome::Written {
            keys,
            batches,
            statements,
        }) => Json(FlushReport {
            keys,
            batches,
            statements,
        })
        .into_response(),
        // `flush_once` logged the cause, in its span (a child of this request's).
        Err(_) => ApiError::FlushFailed.as_response(),
    }
}
