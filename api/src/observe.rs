//! Per-request observation: the metrics and the trace span of every request,
//! whatever answered it (handler, body limit, router 404).
//!
//! This is the router's only middleware layer: it also applies the request
//! [`Limits`], then answers plain `POST /increment` requests through
//! [`FastIncrement`] and everything else through the route tree (poem and
//! poem-openapi box and copy the request's future at each of their layers;
//! measured in `BENCHMARKS.md`).

use std::{sync::Arc, time::Instant};

use opentelemetry::global;
use opentelemetry_http::HeaderExtractor;
use poem::{
    Endpoint, IntoResponse, Middleware, Request, Response, Result,
    http::{HeaderValue, StatusCode, header},
};
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::{
    limits::Limits,
    metrics::{Metrics, allowed_methods, route_label},
    routes::increment::FastIncrement,
};

const TRACEPARENT: &str = "traceparent";

/// Counts and times every request, and runs it in a server span that
/// continues the caller's W3C `traceparent` when there is one, after the
/// request [`Limits`] (in flight, then body).
pub struct Observe {
    metrics: Arc<Metrics>,
    limits: Limits,
    fast: FastIncrement,
}

impl Observe {
    pub fn new(metrics: Arc<Metrics>, limits: Limits, fast: FastIncrement) -> Self {
        Self {
            metrics,
            limits,
            fast,
        }
    }
}

impl<E: Endpoint> Middleware<E> for Observe {
    type Output = ObserveEndpoint<E>;

    fn transform(&self, inner: E) -> Self::Output {
        ObserveEndpoint {
            inner,
            metrics: Arc::clone(&self.metrics),
            limits: self.limits.clone(),
            fast: self.fast.clone(),
        }
    }
}

pub struct ObserveEndpoint<E> {
    inner: E,
    metrics: Arc<Metrics>,
    limits: Limits,
    fast: FastIncrement,
}

impl<E: Endpoint> ObserveEndpoint<E> {
    /// The request under the limits, then the fast path or the router.
    async fn limited(&self, mut req: Request) -> Result<Response> {
        let _permit = self.limits.admit()?;
        let body = self.limits.read_body(&mut req).await?;
        if let Some(response) = self.fast.try_accept(&req, body.as_deref()) {
            return Ok(response);
        }
        Ok(self.inner.call(req).await?.into_response())
    }
}

impl<E: Endpoint> Endpoint for ObserveEndpoint<E> {
    type Output = Response;

    async fn call(&self, req: Request) -> Result<Self::Output> {
        let started = Instant::now();
        let route = route_label(req.uri().path());
        let method = req.method().clone();
        let span = tracing::info_span!(
            "http.request",
            otel.name = %format_args!("{} {}", method, route),
            otel.kind = "server",
            http.request.method = %method,
            http.route = route,
            http.response.status_code = tracing::field::Empty,
            otel.status_code = tracing::field::Empty,
        );
        // Only W3C trace context is propagated: without a `traceparent` (or
        // with the span filtered out) there is nothing to continue.
        if !span.is_disabled() && req.headers().contains_key(TRACEPARENT) {
            let parent = global::get_text_map_propagator(|propagator| {
                propagator.extract(&HeaderExtractor(req.headers()))
            });
            // Must happen before the span is first entered; it only fails after.
            let _ = span.set_parent(parent);
        }
        // Errors become responses here so that their status is counted.
        let mut response = match self.limited(req).instrument(span.clone()).await {
            Ok(response) => response,
            Err(err) => err.into_response(),
        };
        if response.status() == StatusCode::METHOD_NOT_ALLOWED {
            // RFC 9110: a 405 lists what the resource does accept.
            response.headers_mut().insert(
                header::ALLOW,
                HeaderValue::from_static(allowed_methods(route)),
            );
        }
        let status = response.status();
        span.record("http.response.status_code", i64::from(status.as_u16()));
        if status.is_server_error() {
            span.record("otel.status_code", "ERROR");
        }
        self.metrics.observe_request(
            route,
            method.as_str(),
            response.status().as_u16(),
            started.elapsed(),
        );
        Ok(response)
    }
}
