//! Observation of a request: its id (`X-Request-Id`), its server span
//! (continuing the caller's W3C `traceparent`), its metrics and, when
//! enabled, its access log line. A pure wrapper: it is told the request's
//! labels and knows nothing of routes or handlers.

use std::{future::Future, time::Instant};

use opentelemetry::{global, trace::TraceContextExt};
use opentelemetry_http::HeaderExtractor;
use poem::{
    Body, Response,
    http::{
        HeaderMap, HeaderValue, Method,
        header::{self, HeaderName},
    },
};
use prometheus::IntGauge;
use tracing::{Instrument, Span};
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::{metrics::Metrics, telemetry::REQUEST_ID_FIELD};

const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");

/// The request id header: taken from the caller when sane, else made here,
/// and returned on every response.
pub const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Longest request id taken from a caller, in bytes; a longer one is
/// replaced (it goes into every log line of its request).
pub const MAX_REQUEST_ID_BYTES: usize = 128;

/// Target of the access log lines (`RUST_LOG=increment::access=off` mutes
/// them while `--access-log` is on).
pub const ACCESS_LOG_TARGET: &str = "increment::access";

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

/// The request's id: the caller's `X-Request-Id` when it is 1 to
/// [`MAX_REQUEST_ID_BYTES`] visible ASCII characters (no space, no control
/// character: it is safe in any log line and header), else a new one.
pub fn request_id(headers: &HeaderMap) -> HeaderValue {
    headers
        .get(REQUEST_ID)
        .filter(|value| is_sane_request_id(value.as_bytes()))
        .cloned()
        .unwrap_or_else(new_request_id)
}

fn is_sane_request_id(id: &[u8]) -> bool {
    (1..=MAX_REQUEST_ID_BYTES).contains(&id.len()) && id.iter().all(|b| (0x21..=0x7e).contains(b))
}

/// 128 random bits as 32 hex digits (nginx's `$request_id` has the same
/// shape). From the thread's generator: no system call per request.
fn new_request_id() -> HeaderValue {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut bits = rand::random::<u128>();
    // By hand: `format!("{:032x}")` cost 1,100 instructions per request.
    let mut digits = [0u8; 32];
    for digit in digits.iter_mut().rev() {
        *digit = HEX[(bits & 0xf) as usize];
        bits >>= 4;
    }
    HeaderValue::from_bytes(&digits).expect("hex digits are a valid header value")
}

/// The server span of a request, continuing the caller's trace.
pub fn request_span(labels: RequestLabels, headers: &HeaderMap, request_id: &HeaderValue) -> Span {
    let span = tracing::info_span!(
        "http.request",
        otel.name = %format_args!("{} {}", labels.method, labels.route),
        otel.kind = "server",
        http.request.method = labels.method,
        http.route = labels.route,
        { REQUEST_ID_FIELD } = request_id.to_str().unwrap_or_default(),
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

/// How one request is observed, besides its metrics.
pub struct Observation {
    pub labels: RequestLabels,
    pub span: Span,
    /// Returned as `X-Request-Id`.
    pub request_id: HeaderValue,
    /// Its declared `Content-Length`, for the access log.
    pub request_bytes: Option<u64>,
    /// Write its access log line.
    pub access_log: bool,
}

/// Counts a request in flight until dropped: when its response is ready,
/// or when its future is dropped unfinished (the client went away, the
/// server's drain ended).
struct InFlight<'a>(&'a IntGauge);

impl<'a> InFlight<'a> {
    fn enter(gauge: &'a IntGauge) -> Self {
        gauge.inc();
        Self(gauge)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Runs `handle` in the request's span, then counts and times its response,
/// gives it the request id and, when enabled, logs it.
pub async fn observed(
    metrics: &Metrics,
    observation: Observation,
    handle: impl Future<Output = Response>,
) -> Response {
    let Observation {
        labels,
        span,
        request_id,
        request_bytes,
        access_log,
    } = observation;
    let started = Instant::now();
    let in_flight = InFlight::enter(&metrics.http_requests_in_flight);
    let mut response = handle.instrument(span.clone()).await;
    drop(in_flight);
    let elapsed = started.elapsed();
    let status = response.status();
    span.record("http.response.status_code", i64::from(status.as_u16()));
    if status.is_server_error() {
        span.record("otel.status_code", "ERROR");
    }
    metrics.observe_request(labels.route, labels.method, status.as_u16(), elapsed);
    if access_log {
        log_access(
            &span,
            labels,
            &request_id,
            request_bytes,
            &mut response,
            elapsed,
        );
    }
    response.headers_mut().insert(REQUEST_ID, request_id);
    response
}

/// The access log line: labels and numbers only. The raw path and query are
/// left out on purpose: they are the client's text (a counter key may be
/// anything up to the key limit), and the route template says which
/// operation it was.
fn log_access(
    span: &Span,
    labels: RequestLabels,
    request_id: &HeaderValue,
    request_bytes: Option<u64>,
    response: &mut Response,
    elapsed: std::time::Duration,
) {
    let body: http_body_util::combinators::BoxBody<bytes::Bytes, std::io::Error> =
        response.take_body().into();
    // A body sent in slices (the docs pages) declares its length instead.
    let response_bytes = hyper::body::Body::size_hint(&body).exact().or_else(|| {
        response
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|value| value.to_str().ok()?.parse().ok())
    });
    response.set_body(Body::from(body));
    let trace_id = {
        let context = span.context();
        let span_context = context.span().span_context().clone();
        span_context
            .is_valid()
            .then(|| span_context.trace_id().to_string())
    };
    tracing::info!(
        target: ACCESS_LOG_TARGET,
        parent: span,
        method = labels.method,
        route = labels.route,
        status = response.status().as_u16(),
        duration_ms = elapsed.as_secs_f64() * 1e3,
        request_bytes,
        response_bytes,
        { REQUEST_ID_FIELD } = request_id.to_str().unwrap_or_default(),
        trace_id = trace_id.as_deref(),
        "request"
    );
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

    #[test]
    fn a_sane_request_id_is_kept_and_any_other_replaced() {
        let with = |id: &[u8]| {
            let mut headers = HeaderMap::new();
            headers.insert(
                REQUEST_ID,
                HeaderValue::from_bytes(id).expect("a header value"),
            );
            request_id(&headers)
        };
        assert_eq!(with(b"abc"), "abc");
        let longest = "x".repeat(MAX_REQUEST_ID_BYTES);
        assert_eq!(with(longest.as_bytes()), longest.as_str());
        for insane in [
            &b"two words"[..],
            b"tab\there",
            "x".repeat(MAX_REQUEST_ID_BYTES + 1).as_bytes(),
            b"caf\xc3\xa9",
            b"",
        ] {
            let replaced = with(insane);
            assert_ne!(replaced.as_bytes(), insane);
            assert_eq!(replaced.len(), 32);
        }
        let made = request_id(&HeaderMap::new());
        assert!(
            made.as_bytes().iter().all(u8::is_ascii_hexdigit),
            "{made:?}"
        );
        assert_ne!(made, request_id(&HeaderMap::new()), "each one new");
    }

    #[tokio::test]
    async fn a_request_dropped_unfinished_leaves_the_in_flight_gauge() {
        let metrics = Metrics::new();
        let labels = RequestLabels {
            route: "/increment",
            method: "POST",
        };
        let observation = Observation {
            labels,
            span: Span::none(),
            request_id: HeaderValue::from_static("r"),
            request_bytes: None,
            access_log: true,
        };
        let mut request = Box::pin(observed(&metrics, observation, std::future::pending()));
        assert!(futures::poll!(request.as_mut()).is_pending());
        assert_eq!(metrics.http_requests_in_flight.get(), 1);
        drop(request);
        assert_eq!(metrics.http_requests_in_flight.get(), 0);
    }
}
