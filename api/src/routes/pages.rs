//! The documentation pages (Swagger UI at `/docs`, the OpenAPI document at
//! `/openapi.json`): built once, served from one shared copy, in slices.
//!
//! poem-openapi's own endpoints clone the page for every request (Swagger
//! UI is 1.6 MB, its bundle inlined), and hyper copies a body frame whole
//! into the connection's write buffer. A client that read the page slowly
//! therefore kept about 1.6 MB per connection (measured: 300 such
//! connections grew the service by 473 MB). Slices of one `Bytes` cost
//! nothing to make, and hyper asks for the next slice only once its buffer
//! has room, so a slow reader holds about one slice.

use bytes::Bytes;
use poem::{
    Body, Endpoint, Request, Response,
    http::{HeaderValue, header},
};

/// How much of a page one body frame carries.
const SLICE: usize = 16 * 1024;

/// A page whose bytes are made once and shared by every response.
#[derive(Clone)]
pub struct SharedPage {
    bytes: Bytes,
    content_type: &'static str,
}

impl SharedPage {
    pub fn new(bytes: impl Into<Bytes>, content_type: &'static str) -> Self {
        Self {
            bytes: bytes.into(),
            content_type,
        }
    }
}

impl Endpoint for SharedPage {
    type Output = Response;

    async fn call(&self, _req: Request) -> poem::Result<Response> {
        let bytes = self.bytes.clone();
        let length = bytes.len();
        let slices = (0..length).step_by(SLICE).map(move |start| {
            Ok::<_, std::io::Error>(bytes.slice(start..length.min(start + SLICE)))
        });
        // The length up front: a streamed body would otherwise be sent
        // chunked, and clients could not show progress or check it whole.
        Ok(Response::builder()
            .content_type(self.content_type)
            .header(header::CONTENT_LENGTH, HeaderValue::from(length))
            .body(Body::from_bytes_stream(futures::stream::iter(slices))))
    }
}
