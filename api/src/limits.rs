//! Request limits: body size and read time, and requests in flight.
//!
//! poem's own `SizeLimit` answers 411 to any request without `Content-Length`
//! (every GET, every chunked upload), so we check the header when there is one
//! and read the body ourselves, at most `max` bytes within `timeout`.

use std::{sync::Arc, time::Duration};

use poem::{Endpoint, IntoResponse, Middleware, Request, Response, Result, error::ReadBodyError};
use tokio::sync::Semaphore;

use crate::error::ApiError;

/// Refuses bodies over `max` bytes with 413 before any handler reads them,
/// and bodies not received within `timeout` with 408.
pub struct BodyLimit {
    max: usize,
    timeout: Duration,
}

impl BodyLimit {
    pub fn new(max: usize, timeout: Duration) -> Self {
        Self { max, timeout }
    }
}

impl<E: Endpoint> Middleware<E> for BodyLimit {
    type Output = BodyLimitEndpoint<E>;

    fn transform(&self, inner: E) -> Self::Output {
        BodyLimitEndpoint {
            inner,
            max: self.max,
            timeout: self.timeout,
        }
    }
}

pub struct BodyLimitEndpoint<E> {
    inner: E,
    max: usize,
    timeout: Duration,
}

impl<E: Endpoint> Endpoint for BodyLimitEndpoint<E> {
    type Output = Response;

    async fn call(&self, mut req: Request) -> Result<Self::Output> {
        let too_large = ApiError::PayloadTooLarge { limit: self.max };
        let declared = req
            .headers()
            .get(poem::http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|len| len > self.max as u64) {
            return Err(too_large.into());
        }
        if declared != Some(0) {
            // Read it here, under both limits (the handlers would read it whole
            // anyway; bodies are small).
            let body = req.take_body();
            match tokio::time::timeout(self.timeout, body.into_bytes_limit(self.max)).await {
                Ok(Ok(bytes)) => req.set_body(bytes),
                Ok(Err(ReadBodyError::PayloadTooLarge)) => return Err(too_large.into()),
                Ok(Err(e)) => return Err(e.into()),
                Err(_elapsed) => {
                    return Err(ApiError::RequestTimeout {
                        seconds: self.timeout.as_secs(),
                    }
                    .into());
                }
            }
        }
        Ok(self.inner.call(req).await?.into_response())
    }
}

/// Answers 503 (with `Retry-After: 1`) instead of queueing when `max`
/// requests are already being handled: a burst, or many `wait=true` requests
/// held while the database is slow, cannot pile up without bound.
pub struct InFlightLimit {
    permits: Arc<Semaphore>,
}

impl InFlightLimit {
    pub fn new(max: usize) -> Self {
        Self {
            permits: Arc::new(Semaphore::new(max)),
        }
    }
}

impl<E: Endpoint> Middleware<E> for InFlightLimit {
    type Output = InFlightLimitEndpoint<E>;

    fn transform(&self, inner: E) -> Self::Output {
        InFlightLimitEndpoint {
            inner,
            permits: Arc::clone(&self.permits),
        }
    }
}

pub struct InFlightLimitEndpoint<E> {
    inner: E,
    permits: Arc<Semaphore>,
}

impl<E: Endpoint> Endpoint for InFlightLimitEndpoint<E> {
    type Output = Response;

    async fn call(&self, req: Request) -> Result<Self::Output> {
        let Ok(_permit) = self.permits.try_acquire() else {
            return Err(ApiError::Unavailable {
                message: "too many requests in flight; retry shortly".to_owned(),
                retry_after: 1,
            }
            .into());
        };
        Ok(self.inner.call(req).await?.into_response())
    }
}
