//! The request limits of the front door: requests in flight, and the body's
//! size and read time.
//!
//! poem's own `SizeLimit` answers 411 to any request without `Content-Length`
//! (every GET, every chunked upload), so we check the header when there is one
//! and read the body ourselves, at most `max` bytes within `timeout`.

use std::{sync::Arc, time::Duration};

use bytes::{Bytes, BytesMut};
use http_body_util::{BodyExt, combinators::BoxBody};
use poem::Request;
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

    /// `--max-body`: the most a request body may hold.
    pub fn max_body(&self) -> usize {
        self.max_body
    }

    /// Reads the body into memory, refusing more than `max_body` bytes (413;
    /// at most `--max-body`, less for a route that takes less) and bodies
    /// not received within `body_timeout` (408). A declared `Content-Length`
    /// over the limit is refused before reading anything.
    ///
    /// Returns the body (also put back into the request), `None` when empty.
    ///
    /// # Errors
    /// As above; a connection that fails mid-body is a 400 (which the
    /// client will not see).
    pub async fn read_body(
        &self,
        req: &mut Request,
        max_body: usize,
    ) -> Result<Option<Bytes>, ApiError> {
        let max_body = max_body.min(self.max_body);
        let too_large = || ApiError::PayloadTooLarge { limit: max_body };
        let declared = req
            .headers()
            .get(poem::http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|len| len > max_body as u64) {
            return Err(too_large());
        }
        if declared == Some(0) {
            return Ok(None);
        }
        // Read here, under both limits (the handlers would read it whole
        // anyway; bodies are small).
        let body = req.take_body();
        match tokio::time::timeout(self.body_timeout, read_limited(body, max_body)).await {
            Ok(Ok(bytes)) => {
                req.set_body(bytes.clone());
                Ok((!bytes.is_empty()).then_some(bytes))
            }
            Ok(Err(BodyError::TooLarge)) => Err(too_large()),
            Ok(Err(BodyError::Read(e))) => Err(ApiError::BadRequest(format!(
                "the request body could not be read: {e}"
            ))),
            Err(_elapsed) => Err(ApiError::RequestTimeout(self.body_timeout)),
        }
    }
}

enum BodyError {
    TooLarge,
    Read(std::io::Error),
}

/// The body's bytes, at most `max`. Frame by frame: a body that arrives in
/// one frame (nearly all of ours) is that frame's bytes, not copied. (poem's
/// `into_bytes_limit` zeroes a 4 KiB buffer and copies through it: a fifth of
/// the instructions of a plain `POST /increment`, measured with callgrind.)
async fn read_limited(body: poem::Body, max: usize) -> Result<Bytes, BodyError> {
    let mut body: BoxBody<Bytes, std::io::Error> = body.into();
    let mut first = Bytes::new();
    let mut joined: Option<BytesMut> = None;
    let mut len = 0;
    while let Some(frame) = body.frame().await {
        let Ok(data) = frame.map_err(BodyError::Read)?.into_data() else {
            continue; // trailers
        };
        len += data.len();
        if len > max {
            return Err(BodyError::TooLarge);
        }
        match &mut joined {
            Some(joined) => joined.extend_from_slice(&data),
            None if first.is_empty() => first = data,
            None => {
                let mut both = BytesMut::with_capacity(len);
                both.extend_from_slice(&first);
                both.extend_from_slice(&data);
                joined = Some(both);
            }
        }
    }
    Ok(match joined {
        Some(joined) => joined.freeze(),
        None => first,
    })
}
