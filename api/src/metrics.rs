//! Every metric the service exports, declared in one place.
//!
//! One prefix (`increment_`), label values from small fixed sets only (never a
//! counter key). Gauges that mirror state elsewhere (pending keys, pool use)
//! are refreshed when `/metrics` is scraped. Process metrics keep their
//! standard unprefixed names (`process_cpu_seconds_total`, …).

use std::time::Duration;

use parking_lot::Mutex;
use prometheus::{
    Encoder, Gauge, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};
use sea_orm::{DatabaseConnection, DbBackend};

use crate::batcher::{Batcher, EvictionCounts};

const NAMESPACE: &str = "increment";

/// HTTP latency buckets, seconds. A request that only records into memory
/// takes tens of microseconds, so the buckets start at 25 µs and are dense
/// below 1 ms; the tail reaches the body read timeouts.
const HTTP_LATENCY_BUCKETS: &[f64] = &[
    0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.000_75, 0.001, 0.002_5, 0.005, 0.01, 0.025,
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];

/// Flush latency buckets, seconds: a few keys take ~1 ms, a million keys
/// take several seconds.
const FLUSH_LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// Keys per flush buckets: powers of 4 from 1 to ~1M.
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

pub struct Metrics {
    registry: Registry,
    /// Requests by route label, method and status code.
    pub http_requests: IntCounterVec,
    /// Request latency by route label and method.
    pub http_duration: HistogramVec,
    /// Increments answered 202.
    pub increments_accepted: IntCounter,
    /// Increments refused, by reason.
    pub increments_rejected: IntCounterVec,
    /// Keys holding a pending delta (cache entries plus evicted remainders).
    pending_keys: IntGauge,
    /// Entries that left the cache other than by a drain, by cause.
    cache_evictions: IntCounterVec,
    /// Age of the oldest delta not yet drained.
    oldest_pending_age: Gauge,
    /// Time of one flush (all its batches).
    pub flush_duration: Histogram,
    /// Distinct keys written per flush.
    pub flush_keys: Histogram,
    /// Distinct keys written, summed over flushes (rows upserted).
    pub flushed_keys: IntCounter,
    /// Flushes that failed (their batch is retried).
    pub flush_failures: IntCounter,
    /// Rows a flush could not apply (the total would leave bigint), recorded
    /// in `rejected_increments`.
    pub rejected_rows: IntCounter,
    /// Unix time of the last successful flush.
    pub last_flush_success: Gauge,
    /// Database pool connections by state (in_use, idle).
    db_pool_connections: IntGaugeVec,
    /// Evictions already added to `cache_evictions` (the batcher counts them;
    /// the difference is added at scrape).
    evictions_seen: Mutex<EvictionCounts>,
}

impl Metrics {
    /// Builds and registers every metric.
    ///
    /// # Panics
    /// Only on a programming error in the declarations below (duplicate or
    /// invalid names), which the tests catch.
    pub fn new() -> Self {
        let registry = Registry::new();
        let opts = |name: &str, help: &str| Opts::new(name, help).namespace(NAMESPACE);
        let histogram = |name: &str, help: &str, buckets: &[f64]| {
            HistogramOpts::new(name, help)
                .namespace(NAMESPACE)
                .buckets(buckets.to_vec())
        };
        let metrics = Self {
            http_requests: IntCounterVec::new(
                opts("http_requests_total", "HTTP requests by route, method and status."),
                &["route", "method", "status"],
            )
            .expect("valid metric"),
            http_duration: HistogramVec::new(
                histogram(
                    "http_request_duration_seconds",
                    "HTTP request latency by route and method.",
                    HTTP_LATENCY_BUCKETS,
                ),
                &["route", "method"],
            )
            .expect("valid metric"),
            increments_accepted: IntCounter::with_opts(opts(
                "increments_accepted_total",
                "Increments answered 202 (held in memory, to be written).",
            ))
            .expect("valid metric"),
            increments_rejected: IntCounterVec::new(
                opts("increments_rejected_total", "Increments refused, by reason."),
                &["reason"],
            )
            .expect("valid metric"),
            pending_keys: IntGauge::with_opts(opts(
                "pending_keys",
                "Keys holding a pending delta (approximate).",
            ))
            .expect("valid metric"),
            cache_evictions: IntCounterVec::new(
                opts(
                    "cache_evictions_total",
                    "Cache entries that left by size or expiry (their deltas are kept and written).",
                ),
                &["cause"],
            )
            .expect("valid metric"),
            oldest_pending_age: Gauge::with_opts(opts(
                "oldest_pending_age_seconds",
                "Age of the oldest delta not yet taken by a flush.",
            ))
            .expect("valid metric"),
            flush_duration: Histogram::with_opts(histogram(
                "flush_duration_seconds",
                "Duration of a flush that wrote something or failed.",
                FLUSH_LATENCY_BUCKETS,
            ))
            .expect("valid metric"),
            flush_keys: Histogram::with_opts(histogram(
                "flush_keys",
                "Distinct keys written per flush.",
                FLUSH_KEYS_BUCKETS,
            ))
            .expect("valid metric"),
            flushed_keys: IntCounter::with_opts(opts(
                "flushed_keys_total",
                "Distinct keys written (rows upserted), over all flushes.",
            ))
            .expect("valid metric"),
            flush_failures: IntCounter::with_opts(opts(
                "flush_failures_total",
                "Flushes that failed; their batch is kept and retried.",
            ))
            .expect("valid metric"),
            rejected_rows: IntCounter::with_opts(opts(
                "rejected_rows_total",
                "Rows a flush could not apply because the total would leave bigint; see table rejected_increments.",
            ))
            .expect("valid metric"),
            last_flush_success: Gauge::with_opts(opts(
                "last_flush_success_timestamp_seconds",
                "Unix time of the last successful flush.",
            ))
            .expect("valid metric"),
            db_pool_connections: IntGaugeVec::new(
                opts("db_pool_connections", "Database pool connections by state."),
                &["state"],
            )
            .expect("valid metric"),
            evictions_seen: Mutex::new(EvictionCounts::default()),
            registry,
        };
        let build_info = IntGaugeVec::new(
            opts("build_info", "Always 1; the version as a label."),
            &["version"],
        )
        .expect("valid metric");
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        let collectors: Vec<Box<dyn prometheus::core::Collector>> = vec![
            Box::new(metrics.http_requests.clone()),
            Box::new(metrics.http_duration.clone()),
            Box::new(metrics.increments_accepted.clone()),
            Box::new(metrics.increments_rejected.clone()),
            Box::new(metrics.pending_keys.clone()),
            Box::new(metrics.cache_evictions.clone()),
            Box::new(metrics.oldest_pending_age.clone()),
            Box::new(metrics.flush_duration.clone()),
            Box::new(metrics.flush_keys.clone()),
            Box::new(metrics.flushed_keys.clone()),
            Box::new(metrics.flush_failures.clone()),
            Box::new(metrics.rejected_rows.clone()),
            Box::new(metrics.last_flush_success.clone()),
            Box::new(metrics.db_pool_connections.clone()),
            Box::new(build_info),
            Box::new(prometheus::process_collector::ProcessCollector::for_self()),
        ];
        for collector in collectors {
            metrics
                .registry
                .register(collector)
                .expect("metric names are unique");
        }
        // Series that exist before their first event, so dashboards and
        // alerts see 0 rather than no data.
        for reason in ["too_large", "content_type", "invalid", "unavailable"] {
            metrics.increments_rejected.with_label_values(&[reason]);
        }
        for cause in ["size", "expired"] {
            metrics.cache_evictions.with_label_values(&[cause]);
        }
        metrics
    }

    /// Records a finished HTTP request.
    pub fn observe_request(&self, route: &str, method: &str, status: u16, elapsed: Duration) {
        let status_text = status.to_string();
        self.http_requests
            .with_label_values(&[route, method, &status_text])
            .inc();
        self.http_duration
            .with_label_values(&[route, method])
            .observe(elapsed.as_secs_f64());
        // Accepted increments are counted by the handlers (per item for a
        // batch); a refused request counts as one rejection.
        let ingestion = route == "/increment" || route == "/increments";
        if ingestion && let Some(reason) = rejection_reason(status) {
            self.increments_rejected.with_label_values(&[reason]).inc();
        }
    }

    /// The text exposition, after refreshing the state-mirroring gauges.
    pub fn render(&self, batcher: &Batcher, db: &DatabaseConnection) -> String {
        self.pending_keys
            .set(i64::try_from(batcher.pending_keys()).unwrap_or(i64::MAX));
        self.oldest_pending_age.set(
            batcher
                .oldest_pending_age()
                .map_or(0.0, |age| age.as_secs_f64()),
        );
        let now = batcher.evictions();
        {
            let mut seen = self.evictions_seen.lock();
            self.cache_evictions
                .with_label_values(&["size"])
                .inc_by(now.size.saturating_sub(seen.size));
            self.cache_evictions
                .with_label_values(&["expired"])
                .inc_by(now.expired.saturating_sub(seen.expired));
            *seen = now;
        }
        let (size, idle) = match db.get_database_backend() {
            DbBackend::Postgres => {
                let pool = db.get_postgres_connection_pool();
                (pool.size(), pool.num_idle())
            }
            DbBackend::Sqlite => {
                let pool = db.get_sqlite_connection_pool();
                (pool.size(), pool.num_idle())
            }
            _ => (0, 0),
        };
        let idle = i64::try_from(idle).unwrap_or(i64::MAX);
        self.db_pool_connections
            .with_label_values(&["idle"])
            .set(idle);
        self.db_pool_connections
            .with_label_values(&["in_use"])
            .set((i64::from(size) - idle).max(0));

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
                .increments_rejected
                .with_label_values(&[reason])
                .get()
        };
        assert_eq!(rejected("invalid"), 1);
        assert_eq!(
            metrics.increments_accepted.get(),
            0,
            "handlers count acceptance"
        );
        let requests = metrics
            .http_requests
            .with_label_values(&["/healthz", "GET", "200"])
            .get();
        assert_eq!(requests, 1);
    }
}
