//! Logs and traces: built in one function, installed once.
//!
//! With an OTLP endpoint, or JSON logs, every request has an OpenTelemetry
//! trace id (continued from an incoming W3C `traceparent`) that JSON logs
//! carry. Spans leave the process only when an OTLP endpoint is configured:
//! then a batch processor exports them from its own thread, off the request
//! path, and [`Telemetry::shutdown`] flushes what is left. With neither, the
//! OpenTelemetry layer is not installed at all (it costs microseconds per
//! request).

use std::{fmt, io::IsTerminal, sync::Arc, time::Duration};

use opentelemetry::{
    KeyValue, global,
    trace::{SpanContext, TraceContextExt, TracerProvider as _},
};
use opentelemetry_otlp::{Protocol, WithExportConfig};
use opentelemetry_sdk::{Resource, propagation::TraceContextPropagator, trace::SdkTracerProvider};
use parking_lot::Mutex;
use serde_json::{Map, Value};
use tracing::{
    Event, Subscriber,
    field::Field,
    span::{Attributes, Id},
};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::{
    EnvFilter, Layer,
    fmt::{FmtContext, FormatEvent, FormatFields, format::Writer},
    layer::{Context, SubscriberExt},
    registry::LookupSpan,
    util::SubscriberInitExt,
};

/// Default filter when `RUST_LOG` is unset: our crates at info, the SQL driver
/// quiet (it would log every multi-thousand-row statement).
pub const DEFAULT_LOG_FILTER: &str = "info,sqlx=warn,sea_orm=warn";

/// The span field holding a request's id (`X-Request-Id`). JSON lines of
/// events inside the span, or inside its children (a flush called by
/// `/admin/flush`), repeat it; text lines show it with the span's fields.
pub const REQUEST_ID_FIELD: &str = "request_id";

/// How many request spans a flush span links to, at most.
pub const MAX_FLUSH_LINKS: usize = 8;

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    #[default]
    Text,
    /// One JSON object per line, with `trace_id`, `span_id` and the
    /// request's `request_id` inside a span.
    Json,
}

/// How to set up logs and traces.
#[derive(Debug, Clone)]
pub struct TelemetrySettings {
    pub log_format: LogFormat,
    /// OTLP/HTTP endpoint (`http://collector:4318`); `None` exports nothing.
    pub otlp_endpoint: Option<String>,
    /// `service.name` of exported spans.
    pub service_name: String,
    /// `service.instance.id` of exported spans.
    pub instance_id: String,
}

impl Default for TelemetrySettings {
    fn default() -> Self {
        Self {
            log_format: LogFormat::Text,
            otlp_endpoint: None,
            service_name: "increment".to_owned(),
            instance_id: default_instance_id(),
        }
    }
}

/// `hostname-pid`: unique per process on a host, readable in a trace view.
pub fn default_instance_id() -> String {
    let host = std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "localhost".to_owned());
    format!("{host}-{}", std::process::id())
}

/// Why telemetry could not start.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("building the OTLP exporter failed")]
    Exporter(#[from] opentelemetry_otlp::ExporterBuildError),
    #[error("a global tracing subscriber is already installed")]
    AlreadyInstalled(#[from] tracing_subscriber::util::TryInitError),
}

/// Installed telemetry; call [`Telemetry::shutdown`] at exit.
pub struct Telemetry {
    provider: SdkTracerProvider,
    exporting: bool,
}

impl Telemetry {
    /// Whether spans are exported (an OTLP endpoint is configured).
    pub fn is_exporting(&self) -> bool {
        self.exporting
    }

    /// Exports the spans still buffered and stops the exporter. Blocking:
    /// call from `spawn_blocking` inside a runtime.
    pub fn shutdown(&self) {
        if let Err(e) = self.provider.force_flush() {
            tracing::warn!(error = %e, "flushing spans at exit failed");
        }
        if let Err(e) = self.provider.shutdown() {
            tracing::warn!(error = %e, "stopping the span exporter failed");
        }
    }
}

/// Installs the global subscriber, propagator and tracer provider.
///
/// # Errors
/// [`TelemetryError`] when the exporter cannot be built or a subscriber is
/// already installed.
pub fn init(settings: &TelemetrySettings) -> Result<Telemetry, TelemetryError> {
    let resource = Resource::builder()
        .with_service_name(settings.service_name.clone())
        .with_attribute(KeyValue::new(
            "service.instance.id",
            settings.instance_id.clone(),
        ))
        .with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")))
        .build();
    let mut builder = SdkTracerProvider::builder().with_resource(resource);
    if let Some(endpoint) = &settings.otlp_endpoint {
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_protocol(Protocol::HttpBinary)
            .with_endpoint(traces_url(endpoint))
            .with_timeout(Duration::from_secs(3))
            .build()?;
        builder = builder.with_batch_exporter(exporter);
    }
    let provider = builder.build();
    global::set_text_map_propagator(TraceContextPropagator::new());
    global::set_tracer_provider(provider.clone());
    let tracer = provider.tracer("increment");

    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(DEFAULT_LOG_FILTER));
    // The OpenTelemetry layer costs a few microseconds per request; it is
    // only worth it when spans leave the process or logs carry their ids.
    let traced = settings.otlp_endpoint.is_some() || settings.log_format == LogFormat::Json;
    let otel = traced.then(|| tracing_opentelemetry::layer().with_tracer(tracer));
    let registry = tracing_subscriber::registry().with(filter).with(otel);
    match settings.log_format {
        LogFormat::Text => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .with_writer(std::io::stderr)
                    .with_ansi(use_colour(
                        std::io::stderr().is_terminal(),
                        std::env::var_os("NO_COLOR"),
                    )),
            )
            .try_init()?,
        LogFormat::Json => registry
            .with(RequestIds)
            .with(
                tracing_subscriber::fmt::layer()
                    .with_writer(std::io::stderr)
                    .event_format(JsonWithTraceIds),
            )
            .try_init()?,
    }
    Ok(Telemetry {
        provider,
        exporting: settings.otlp_endpoint.is_some(),
    })
}

/// An ERROR line for when no subscriber could be installed, in `format`
/// (the JSON has the fields a [`JsonWithTraceIds`] line has outside spans).
pub fn line_without_subscriber(format: LogFormat, message: &str, error: &str) -> String {
    let timestamp = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
    match format {
        LogFormat::Text => format!("{timestamp} ERROR {message}: {error}"),
        LogFormat::Json => serde_json::json!({
            "timestamp": timestamp,
            "level": "ERROR",
            "target": "increment",
            "message": message,
            "error": error,
        })
        .to_string(),
    }
}

/// Colour codes only for a terminal (a file or a pipe would keep them), and
/// never with a non-empty `NO_COLOR` (<https://no-color.org>).
fn use_colour(stderr_is_terminal: bool, no_color: Option<std::ffi::OsString>) -> bool {
    stderr_is_terminal && no_color.is_none_or(|value| value.is_empty())
}

/// Text logs without export, for tests; a second call is a no-op.
pub fn init_for_tests() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        if let Err(e) = init(&TelemetrySettings::default()) {
            eprintln!("test telemetry: {e}");
        }
    });
}

/// `OTEL_EXPORTER_OTLP_ENDPOINT` semantics: the base URL gets `/v1/traces`.
fn traces_url(endpoint: &str) -> String {
    let base = endpoint.trim_end_matches('/');
    if base.ends_with("/v1/traces") {
        base.to_owned()
    } else {
        format!("{base}/v1/traces")
    }
}

/// JSON lines: `timestamp`, `level`, `target`, `message`, the event's fields,
/// and, for an event inside a span: `span` (the innermost span's name),
/// `trace_id`/`span_id` and the `request_id` of the request it belongs to.
///
/// The span is the event's own (its explicit `parent:`, else the current
/// span), and its ids are read from that span, not from whatever span the
/// thread happens to be in.
struct JsonWithTraceIds;

impl<S, N> FormatEvent<S, N> for JsonWithTraceIds
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let mut line = Map::new();
        line.insert(
            "timestamp".into(),
            chrono::Utc::now()
                .to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
                .into(),
        );
        let meta = event.metadata();
        line.insert("level".into(), meta.level().as_str().into());
        line.insert("target".into(), meta.target().into());
        event.record(&mut JsonFields(&mut line));
        if let Some(span) = ctx.parent_span() {
            line.insert("span".into(), span.name().into());
            let request_id = span.scope().find_map(|ancestor| {
                ancestor
                    .extensions()
                    .get::<RequestIdOf>()
                    .map(|id| id.0.clone())
            });
            if let Some(request_id) = request_id {
                line.insert(REQUEST_ID_FIELD.into(), request_id.into());
            }
            // No span extension may be held here: this locks them.
            let context = tracing::dispatcher::get_default(|dispatch| {
                tracing_opentelemetry::get_otel_context(&span.id(), dispatch)
            });
            if let Some(context) = context {
                let span_context = context.span().span_context().clone();
                if span_context.is_valid() {
                    line.insert(
                        "trace_id".into(),
                        span_context.trace_id().to_string().into(),
                    );
                    line.insert("span_id".into(), span_context.span_id().to_string().into());
                }
            }
        }
        let text = serde_json::to_string(&line).map_err(|_| fmt::Error)?;
        writeln!(writer, "{text}")
    }
}

/// A span's request id, kept where the JSON formatter finds it.
struct RequestIdOf(String);

/// Keeps the [`REQUEST_ID_FIELD`] of each span that declares one (only the
/// request span does; other spans cost one field look-up).
struct RequestIds;

impl<S> Layer<S> for RequestIds
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        if attrs.metadata().fields().field(REQUEST_ID_FIELD).is_none() {
            return;
        }
        let mut found = FindRequestId(None);
        attrs.record(&mut found);
        if let (Some(request_id), Some(span)) = (found.0, ctx.span(id)) {
            span.extensions_mut().insert(RequestIdOf(request_id));
        }
    }
}

struct FindRequestId(Option<String>);

impl tracing::field::Visit for FindRequestId {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == REQUEST_ID_FIELD {
            self.0 = Some(value.to_owned());
        }
    }
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if field.name() == REQUEST_ID_FIELD {
            self.0 = Some(format!("{value:?}"));
        }
    }
}

struct JsonFields<'a>(&'a mut Map<String, Value>);

impl tracing::field::Visit for JsonFields<'_> {
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.0
            .insert(field.name().to_owned(), format!("{value:?}").into());
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().to_owned(), value.into());
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.0.insert(field.name().to_owned(), value.into());
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.0.insert(field.name().to_owned(), value.into());
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.0.insert(field.name().to_owned(), value.into());
    }
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.0.insert(field.name().to_owned(), value.into());
    }
}

/// The first few request spans since the last drain, for the flush span to
/// link to. Cheap when full: one atomic load per request.
#[derive(Default)]
pub struct RecentRequests {
    links: Mutex<Vec<SpanContext>>,
    full: std::sync::atomic::AtomicBool,
}

impl RecentRequests {
    /// Remembers the current span if there is room.
    pub fn offer_current(&self) {
        use std::sync::atomic::Ordering;
        if self.full.load(Ordering::Relaxed) {
            return;
        }
        let context = tracing::Span::current().context();
        let span_context = context.span().span_context().clone();
        if !span_context.is_valid() {
            return;
        }
        let mut links = self.links.lock();
        if links.len() < MAX_FLUSH_LINKS {
            links.push(span_context);
        }
        if links.len() >= MAX_FLUSH_LINKS {
            self.full.store(true, Ordering::Relaxed);
        }
    }

    /// Takes the remembered spans, making room for the next flush's.
    pub fn take(&self) -> Vec<SpanContext> {
        let taken = std::mem::take(&mut *self.links.lock());
        self.full.store(false, std::sync::atomic::Ordering::Relaxed);
        taken
    }
}

/// Shared handle to the links (the handler offers, the flusher takes).
pub type SharedRecentRequests = Arc<RecentRequests>;

/// `error: cause: cause…`, for logs.
pub fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        // Many errors repeat their source's text in their own: once is enough.
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn colour_only_on_a_terminal_without_no_color() {
        assert!(use_colour(true, None));
        assert!(
            use_colour(true, Some("".into())),
            "an empty NO_COLOR is unset"
        );
        assert!(!use_colour(true, Some("1".into())));
        assert!(!use_colour(false, None));
    }

    #[test]
    fn the_traces_path_is_appended_once() {
        assert_eq!(traces_url("http://c:4318"), "http://c:4318/v1/traces");
        assert_eq!(traces_url("http://c:4318/"), "http://c:4318/v1/traces");
        assert_eq!(
            traces_url("http://c:4318/v1/traces"),
            "http://c:4318/v1/traces"
        );
    }
}
