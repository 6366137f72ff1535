//! Observation of a request: its server span (continuing the caller's W3C
//! `traceparent`) and its metrics. A pure wrapper: it is told the request's
//! labels and knows nothing of routes or handlers.

use std::{future::Future, time::Instant};

use opentelemetry::global;
use opentelemetry_http::HeaderExtractor;
use poem::{
    Response,
    http::{HeaderMap, Method},
};
use tracing::{Instrument, Span};
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::metrics::Metrics;

const TRACEPARENT: &str = "traceparent";

/// The labels of one request, each from a fixed set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestLabels {
    /// The route template (never the path a client sent).
    pub route: &'static str,
    /// The method, or `_OTHER` for one outside [`method_label`]'s set.
    pub method: &'static str,
}

/// The method as a label: the methods of RFC 9110 and PATCH, anything else
/// `_OTHER` (OpenTelemetry's convention), so that no client-chosen string
/// becomes a label value or a span name.
pub fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::HEAD => "HEAD",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::PATCH => "PATCH",
        Method::OPTIONS => "OPTIONS",
        Method::TRACE => "TRACE",
        Method::CONNECT => "CONNECT",
        _ => "_OTHER",
    }
}

/// The server span of a request, continuing the caller's trace.
pub fn request_span(labels: RequestLabels, headers: &HeaderMap) -> Span {
    let span = tracing::info_span!(
        "http.request",
        otel.name = %format_args!("{} {}", labels.method, labels.route),
        otel.kind = "server",
        http.request.method = labels.method,
        http.route = labels.route,
        http.response.status_code = tracing::field::Empty,
        otel.status_code = tracing::field::Empty,
    );
    // Only W3C trace context is propagated: without a `traceparent` (or
    // with the span filtered out) there is nothing to continue.
    if !span.is_disabled() && headers.contains_key(TRACEPARENT) {
        let parent = global::get_text_map_propagator(|propagator| {
            propagator.extract(&HeaderExtractor(headers))
        });
        // Must happen before the span is first entered; it only fails after.
        let _ = span.set_parent(parent);
    }
    span
}

/// Runs `handle` in `span`, then counts and times its response.
pub async fn observed(
    metrics: &Metrics,
    labels: RequestLabels,
    span: Span,
    handle: impl Future<Output = Response>,
) -> Response {
    let started = Instant::now();
    let response = handle.instrument(span.clone()).await;
    let status = response.status();
    span.record("http.response.status_code", i64::from(status.as_u16()));
    if status.is_server_error() {
        span.record("otel.status_code", "ERROR");
    }
    metrics.observe_request(
        labels.route,
        labels.method,
        status.as_u16(),
        started.elapsed(),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invented_methods_are_other() {
        let invented = Method::from_bytes(b"X".repeat(60_000).as_slice()).expect("a token");
        assert_eq!(method_label(&invented), "_OTHER");
        assert_eq!(method_label(&Method::POST), "POST");
    }
}
