//! The `increment` service: add integers to named counters over HTTP, write
//! them to the database in a few batched transactions instead of one per request.
//!
//! Data flow: handler ([`routes`]) → [`Batcher::record`] → moka slot →
//! [`Flusher::flush_once`] → [`store::write_batch`] (SeaORM, one transaction).
//!
//! - [`settings`]: the plain configuration the binary and the tests build.
//! - [`startup`]: [`Application::build`] connects, migrates and binds; its
//!   `run_until_stopped` serves and performs the ordered shutdown.
//! - [`routes`]: the HTTP API (poem-openapi), one module per tag.
//! - [`error`]: HTTP error bodies and the single mapping of failures to statuses.
//! - [`batcher`]: per-key pending deltas in a bounded, expiring moka cache.
//! - [`flusher`]: the write loop: drain, write with a batch id, retry, final flush.
//! - [`store`]: the SQL: the idempotent batch write for PostgreSQL and SQLite.
//! - [`spill`]: the local file for what the final flush could not write.
//! - [`limits`]: request body size and time, requests in flight.
//! - [`connection`]: connection cap and request header deadline.
//! - [`metrics`]: every Prometheus metric, served at `/metrics`.
//! - [`observe`]: per-request metrics (and the request span).
//! - [`telemetry`]: the tracing subscriber.

pub mod batcher;
pub mod connection;
pub mod error;
pub mod flusher;
pub mod limits;
pub mod metrics;
pub mod observe;
pub mod routes;
pub mod settings;
pub mod spill;
pub mod startup;
pub mod store;
pub mod telemetry;

pub use batcher::Batcher;
pub use flusher::{FlushOutcome, Flusher};
pub use settings::Settings;
pub use startup::{Application, ShutdownReport};
