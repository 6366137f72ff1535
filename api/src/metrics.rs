//! Every metric the service exports, declared in one place.
//!
//! One prefix (`increment_`), label values from small fixed sets only (never a
//! counter key). Gauges that mirror state elsewhere (pending keys, pool use)
//! are set by their owners (through [`Sampled`]) when `/metrics` is scraped;
//! this module depends on no other part of the service. Process metrics keep their
//! standard unprefixed names (`process_cpu_seconds_total`, …).

use std::{sync::Arc, time::Duration};

use parking_lot::Mutex;
use prometheus::{
    Encoder, Gauge, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

const NAMESPACE: &str = "increment";

/// HTTP latency buckets, seconds. A request that only records into memory
/// takes tens of microseconds, so the buckets start at 25 µs and are dense
/// below 1 ms; the tail reaches the default `--wait-timeout` (5 s, how long
/// `wait=true` may wait) and `--body-timeout` (10 s).
const HTTP_LATENCY_BUCKETS: &[f64] = &[
    0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.000_75, 0.001, 0.002_5, 0.005, 0.01, 0.025,
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Flush latency buckets, seconds: a few keys take ~1 ms, a million keys
/// take several seconds.
const FLUSH_LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// Keys per flush buckets: powers of 4 from 1 to ~1M.
/// Requests per journal message.
const GROUP_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 1024.0];

const FLUSH_KEYS_BUCKETS: &[f64] = &[
    1.0,
    4.0,
    16.0,
    64.0,
    256.0,
    1_024.0,
    4_096.0,
    16_384.0,
    65_536.0,
    262_144.0,
    1_048_576.0,
];

/// Why a request was refused before anything was recorded, as a label
/// (`unavailable`, the pending-key bound, is counted by the handlers: a 503
/// of `wait=true` is an accepted increment that was not confirmed in time).
pub fn rejection_reason(status: u16) -> Option<&'static str> {
    match status {
        413 => Some("too_large"),
        415 => Some("content_type"),
        422 => Some("invalid"),
        _ => None,
    }
}

/// Declares [`Metrics`]: each metric once. A field's name is the metric's
/// name (after the `increment_` prefix), its doc comment the help text; label
/// names follow in brackets and histogram buckets after `=`. Registration
/// follows from the declaration.
macro_rules! metrics {
    (
        $(#[$meta:meta])*
        pub struct $name:ident {
            $(
                $(#[doc = $help:literal])+
                $metric:ident: $kind:ident $([$($label:literal),+])? $(= $buckets:expr)?,
            )*
        }
    ) => {
        $(#[$meta])*
        pub struct $name {
            registry: Registry,
            /// Owners of state that gauges mirror, asked at each scrape.
            sources: Mutex<Vec<Arc<dyn Sampled>>>,
            $( $(#[doc = $help])+ pub $metric: $kind, )*
        }

        impl $name {
            /// Every declared metric: its name after the prefix, and its kind.
            pub const DECLARED: &[(&str, &str)] = &[$((stringify!($metric), stringify!($kind)),)*];

            fn declare_all() -> Result<Self, prometheus::Error> {
                let registry = Registry::new();
                $(
                    let opts = Opts::new(stringify!($metric), help_text(&[$($help),+]))
                        .namespace(NAMESPACE)
                        $(.variable_labels(vec![$($label.to_owned()),+]))?;
                    let buckets: Option<&[f64]> = None $(.or(Some($buckets)))?;
                    let $metric = <$kind as Declare>::declare(opts, buckets)?;
                    registry.register(Box::new($metric.clone()))?;
                )*
                Ok(Self { registry, sources: Mutex::default(), $($metric,)* })
            }
        }
    };
}

metrics! {
    /// Every metric of the service. Share with an `Arc`.
    pub struct Metrics {
        /// HTTP requests by route, method and status.
        http_requests_total: IntCounterVec["route", "method", "status"],
        /// HTTP request latency by route and method.
        http_request_duration_seconds: HistogramVec["route", "method"] = HTTP_LATENCY_BUCKETS,
        /// HTTP requests being handled now (from the front door to the
        /// response, refusals included).
        http_requests_in_flight: IntGauge,
        /// Increments answered 202 (held in memory, to be written).
        increments_accepted_total: IntCounter,
        /// Increments refused, by reason.
        increments_rejected_total: IntCounterVec["reason"],
        /// Keys holding a pending delta, plus the items of keyed requests
        /// held whole, each key weighing one per 64 bytes of its length plus
        /// one (what `--max-pending-keys` bounds; approximate).
        pending_keys: IntGauge,
        /// Cache entries that left by size or expiry (their deltas are kept
        /// and written).
        cache_evictions_total: IntCounterVec["cause"],
        /// Age of the oldest delta not yet written: held in memory, or in a
        /// batch a failing flush keeps retrying (so it grows through a
        /// database outage).
        oldest_pending_age_seconds: Gauge,
        /// The configured bound on pending keys (`--max-pending-keys`):
        /// past it, new keys get 503.
        pending_keys_limit: IntGauge,
        /// The configured bound on requests handled at once
        /// (`--max-in-flight`): past it, requests get 503.
        http_requests_in_flight_limit: IntGauge,
        /// The configured flush interval, seconds (`--flush-interval`).
        flush_interval_seconds: Gauge,
        /// Duration of a flush that wrote something or failed.
        flush_duration_seconds: Histogram = FLUSH_LATENCY_BUCKETS,
        /// Distinct keys written per flush.
        flush_keys: Histogram = FLUSH_KEYS_BUCKETS,
        /// Distinct keys written (rows upserted), over all flushes.
        flushed_keys_total: IntCounter,
        /// Flushes that failed; their batch is kept and retried.
        flush_failures_total: IntCounter,
        /// Rows a flush could not apply because the total would leave bigint;
        /// see table rejected_increments.
        rejected_rows_total: IntCounter,
        /// Unix time of the last successful flush.
        last_flush_success_timestamp_seconds: Gauge,
        /// Database pool connections by state.
        db_pool_connections: IntGaugeVec["state"],
        /// Journal messages published, by outcome (stored; refused: certainly
        /// not stored; unknown: never confirmed).
        journal_messages_total: IntCounterVec["outcome"],
        /// Requests per journal message (group commit).
        journal_group_requests: Histogram = GROUP_BUCKETS,
        /// Journal publishes retried after an unconfirmed attempt.
        journal_publish_retries_total: IntCounter,
        /// Journal messages read into the batcher (on the writer).
        journal_read_total: IntCounter,
        /// Journal messages that could not be decoded and were skipped.
        journal_unreadable_total: IntCounter,
        /// Batches dropped because another writer had applied their journal
        /// messages first (they are read again from the stored offset).
        journal_conflicts_total: IntCounter,
        /// 1 when the journal is configured on this instance (`--journal-url`),
        /// 0 in write-behind mode.
        journal_enabled: IntGauge,
        /// 1 while this instance holds the journal writer lease.
        journal_writer: IntGauge,
        /// Journal messages stored but not yet applied to the database (set
        /// on the writer every few seconds; 0 elsewhere).
        journal_lag_messages: IntGauge,
        /// Requests repeating an applied or pending `Idempotency-Key` with
        /// the same body, answered as the first and not applied again, by
        /// where they were caught (memory: on this instance; database: looked
        /// up at the door, or in the flush's transaction).
        idempotency_repeats_total: IntCounterVec["stage"],
        /// Requests reusing an `Idempotency-Key` with another body: refused
        /// with 422 at the door (memory, or database when looked up there),
        /// or left out by the flush (database).
        idempotency_reused_total: IntCounterVec["stage"],
        /// `Idempotency-Key`s deleted once older than the window.
        idempotency_keys_pruned_total: IntCounter,
        /// Always 1; the version as a label.
        build_info: IntGaugeVec["version"],
    }
}

/// State that gauges mirror, supplied by the module that owns it: asked to
/// set its metrics each time `/metrics` is scraped.
pub trait Sampled: Send + Sync {
    fn sample(&self, metrics: &Metrics);
}

/// Sets `counter` to `total`, a monotonic count kept by its owner (a
/// counter cannot be set, only raised).
pub fn raise_to(counter: &IntCounter, total: u64) {
    counter.inc_by(total.saturating_sub(counter.get()));
}

/// A help text from a doc comment's lines.
fn help_text(lines: &[&str]) -> String {
    lines
        .iter()
        .map(|line| line.trim())
        .collect::<Vec<_>>()
        .join(" ")
}

/// How each kind of metric is built from its declaration.
trait Declare: Sized {
    fn declare(opts: Opts, buckets: Option<&[f64]>) -> Result<Self, prometheus::Error>;
}

/// The label names an `Opts` was declared with (the `*Vec` constructors take
/// them apart from the options).
fn labels(opts: &Opts) -> Vec<String> {
    opts.variable_labels.clone()
}

fn histogram_opts(opts: Opts, buckets: Option<&[f64]>) -> HistogramOpts {
    let histogram = HistogramOpts::from(opts);
    match buckets {
        Some(buckets) => histogram.buckets(buckets.to_vec()),
        None => histogram,
    }
}

macro_rules! declare_plain {
    ($($kind:ident),*) => {$(
        impl Declare for $kind {
            fn declare(opts: Opts, _: Option<&[f64]>) -> Result<Self, prometheus::Error> {
                $kind::with_opts(opts)
            }
        }
    )*};
}
declare_plain!(IntCounter, IntGauge, Gauge);

macro_rules! declare_vec {
    ($($kind:ident),*) => {$(
        impl Declare for $kind {
            fn declare(opts: Opts, _: Option<&[f64]>) -> Result<Self, prometheus::Error> {
                let names = labels(&opts);
                let names: Vec<&str> = names.iter().map(String::as_str).collect();
                $kind::new(opts, &names)
            }
        }
    )*};
}
declare_vec!(IntCounterVec, IntGaugeVec);

impl Declare for Histogram {
    fn declare(opts: Opts, buckets: Option<&[f64]>) -> Result<Self, prometheus::Error> {
        Histogram::with_opts(histogram_opts(opts, buckets))
    }
}

impl Declare for HistogramVec {
    fn declare(opts: Opts, buckets: Option<&[f64]>) -> Result<Self, prometheus::Error> {
        let names = labels(&opts);
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        HistogramVec::new(histogram_opts(opts, buckets), &names)
    }
}

impl Metrics {
    /// Builds and registers every metric.
    ///
    /// # Panics
    /// Only on a programming error in the declarations above (duplicate or
    /// invalid names), which the tests catch.
    pub fn new() -> Self {
        let metrics = Self::declare_all().expect("the metric declarations are valid");
        metrics
            .build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        metrics
            .registry
            .register(Box::new(
                prometheus::process_collector::ProcessCollector::for_self(),
            ))
            .expect("process metrics have their own names");
        // Series that exist before their first event, so dashboards and
        // alerts see 0 rather than no data.
        for reason in ["too_large", "content_type", "invalid", "unavailable"] {
            metrics
                .increments_rejected_total
                .with_label_values(&[reason]);
        }
        for outcome in ["stored", "refused", "unknown"] {
            metrics.journal_messages_total.with_label_values(&[outcome]);
        }
        for stage in ["memory", "database"] {
            metrics
                .idempotency_repeats_total
                .with_label_values(&[stage]);
            metrics.idempotency_reused_total.with_label_values(&[stage]);
        }
        for cause in ["size", "expired"] {
            metrics.cache_evictions_total.with_label_values(&[cause]);
        }
        metrics
    }

    /// The name of every series the service exports (histograms as their
    /// `_bucket`, `_sum` and `_count`), whether or not it has a value yet;
    /// process metrics included.
    pub fn exported_series() -> Vec<String> {
        let mut names: Vec<String> = Vec::new();
        for (name, kind) in Self::DECLARED {
            let full = format!("{NAMESPACE}_{name}");
            if kind.starts_with("Histogram") {
                for suffix in ["_bucket", "_sum", "_count"] {
                    names.push(format!("{full}{suffix}"));
                }
            } else {
                names.push(full);
            }
        }
        let process = Self::new().render();
        names.extend(
            process
                .lines()
                .filter_map(|line| line.strip_prefix("# TYPE process_"))
                .filter_map(|rest| rest.split_whitespace().next())
                .map(|name| format!("process_{name}")),
        );
        names.sort();
        names.dedup();
        names
    }

    /// Asks `source` to set its metrics at every scrape.
    pub fn sample_at_scrape(&self, source: Arc<dyn Sampled>) {
        self.sources.lock().push(source);
    }

    /// Records a finished HTTP request.
    pub fn observe_request(&self, route: &str, method: &str, status: u16, elapsed: Duration) {
        let status_text = status.to_string();
        self.http_requests_total
            .with_label_values(&[route, method, &status_text])
            .inc();
        self.http_request_duration_seconds
            .with_label_values(&[route, method])
            .observe(elapsed.as_secs_f64());
        // Accepted increments are counted by the handlers (per item for a
        // batch); a refused request counts as one rejection.
        let ingestion = route == "/increment" || route == "/increments";
        if ingestion && let Some(reason) = rejection_reason(status) {
            self.increments_rejected_total
                .with_label_values(&[reason])
                .inc();
        }
    }

    /// The text exposition, after the owners of mirrored state have set
    /// their gauges.
    pub fn render(&self) -> String {
        for source in self.sources.lock().iter() {
            source.sample(self);
        }
        let mut buffer = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut buffer) {
            tracing::error!(error = %e, "encoding metrics failed");
        }
        String::from_utf8(buffer).unwrap_or_default()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_registry_builds() {
        let metrics = Metrics::new();
        metrics.observe_request("/increment", "POST", 422, Duration::from_micros(40));
        metrics.observe_request("/increment", "POST", 202, Duration::from_micros(40));
        metrics.observe_request("/healthz", "GET", 200, Duration::from_micros(40));
        let rejected = |reason: &str| {
            metrics
                .increments_rejected_total
                .with_label_values(&[reason])
                .get()
        };
        assert_eq!(rejected("invalid"), 1);
        assert_eq!(
            metrics.increments_accepted_total.get(),
            0,
            "handlers count acceptance"
        );
        let requests = metrics
            .http_requests_total
            .with_label_values(&["/healthz", "GET", "200"])
            .get();
        assert_eq!(requests, 1);
    }

    #[test]
    fn a_field_s_doc_is_its_help_and_owners_set_their_gauges() {
        struct Fixed;
        impl Sampled for Fixed {
            fn sample(&self, metrics: &Metrics) {
                metrics.pending_keys.set(7);
                raise_to(&metrics.flushed_keys_total, 5);
            }
        }
        let metrics = Metrics::new();
        metrics.sample_at_scrape(Arc::new(Fixed));
        let text = metrics.render();
        assert!(text.contains(
            "# HELP increment_cache_evictions_total Cache entries that left by size or expiry \
             (their deltas are kept and written).\n"
        ));
        assert!(text.contains("increment_pending_keys 7\n"), "{text}");
        assert!(text.contains("increment_flushed_keys_total 5\n"));
        assert!(text.contains("increment_flush_duration_seconds_bucket{le=\"30\"} 0\n"));
        assert!(text.contains("increment_build_info{version=\""));
        assert!(text.contains("process_cpu_seconds_total"));
        // Raising to a total already reached changes nothing.
        assert!(
            metrics
                .render()
                .contains("increment_flushed_keys_total 5\n")
        );
    }
}
