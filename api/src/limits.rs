//! Request body size limit.
//!
//! poem's own `SizeLimit` answers 411 to any request without `Content-Length`
//! (every GET, every chunked upload), so we check the header when there is one
//! and otherwise read at most `max` bytes before refusing.

use poem::{Endpoint, IntoResponse, Middleware, Request, Response, Result, error::ReadBodyError};

use crate::error::ApiError;

/// Refuses bodies over `max` bytes with 413 before any handler reads them.
pub struct BodyLimit {
    max: usize,
}

impl BodyLimit {
    pub fn new(max: usize) -> Self {
        Self { max }
    }
}

impl<E: Endpoint> Middleware<E> for BodyLimit {
    type Output = BodyLimitEndpoint<E>;

    fn transform(&self, inner: E) -> Self::Output {
        BodyLimitEndpoint {
            inner,
            max: self.max,
        }
    }
}

pub struct BodyLimitEndpoint<E> {
    inner: E,
    max: usize,
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
        match declared {
            Some(len) if len > self.max as u64 => return Err(too_large.into()),
            Some(_) => {}
            None => {
                // No length declared (chunked, or no body): read it under the limit.
                let body = req.take_body();
                match body.into_bytes_limit(self.max).await {
                    Ok(bytes) => req.set_body(bytes),
                    Err(ReadBodyError::PayloadTooLarge) => return Err(too_large.into()),
                    Err(e) => return Err(e.into()),
                }
            }
        }
        Ok(self.inner.call(req).await?.into_response())
    }
}
