//! The request limits of the front door: requests in flight, and the body's
//! size and read time.
//!
//! poem's own `SizeLimit` answers 411 to any request without `Content-Length`
//! (every GET, every chunked upload), so we check the header when there is one
//! and read the body ourselves, at most `max` bytes within `timeout`.

use std::{sync::Arc, time::Duration};

use bytes::Bytes;
use poem::{Request, error::ReadBodyError};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::http::problem::ApiError;

/// The limits every request passes before routing.
#[derive(Clone)]
pub struct Limits {
    max_body: usize,
    body_timeout: Duration,
    permits: Arc<Semaphore>,
}

impl Limits {
    /// Bodies of at most `max_body` bytes received within `body_timeout`, and
    /// at most `max_in_flight` requests handled at once.
    pub fn new(max_body: usize, body_timeout: Duration, max_in_flight: usize) -> Self {
        Self {
            max_body,
            body_timeout,
            permits: Arc::new(Semaphore::new(max_in_flight)),
        }
    }

    /// A permit to handle one request, held until the response is ready.
    ///
    /// # Errors
    /// 503 `overloaded` (with `Retry-After: 1`) instead of queueing when
    /// `max_in_flight` requests are already being handled: a burst, or many
    /// `wait=true` requests held while the database is slow, cannot pile up
    /// without bound. Nothing of the request was read or taken.
    pub fn admit(&self) -> Result<OwnedSemaphorePermit, ApiError> {
        Arc::clone(&self.permits)
            .try_acquire_owned()
            .map_err(|_| ApiError::Overloaded { retry_after: 1 })
    }

    /// Reads the body into memory, refusing more than `max_body` bytes (413)
    /// and bodies not received within `body_timeout` (408). A declared
    /// `Content-Length` over the limit is refused before reading anything.
    ///
    /// Returns the body (also put back into the request), `None` when empty.
    ///
    /// # Errors
    /// As above; a connection that fails mid-body is a 400 (which the
    /// client will not see).
    pub async fn read_body(&self, req: &mut Request) -> Result<Option<Bytes>, ApiError> {
        let too_large = || ApiError::PayloadTooLarge {
            limit: self.max_body,
        };
        let declared = req
            .headers()
            .get(poem::http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|len| len > self.max_body as u64) {
            return Err(too_large());
        }
        if declared == Some(0) {
            return Ok(None);
        }
        // Read here, under both limits (the handlers would read it whole
        // anyway; bodies are small).
        let body = req.take_body();
        match tokio::time::timeout(self.body_timeout, body.into_bytes_limit(self.max_body)).await {
            Ok(Ok(bytes)) => {
                req.set_body(bytes.clone());
                Ok((!bytes.is_empty()).then_some(bytes))
            }
            Ok(Err(ReadBodyError::PayloadTooLarge)) => Err(too_large()),
            Ok(Err(e)) => Err(ApiError::BadRequest(format!(
                "the request body could not be read: {e}"
            ))),
            Err(_elapsed) => Err(ApiError::RequestTimeout(self.body_timeout)),
        }
    }
}
