//! The `increment` service: add integers to named counters over HTTP, write
//! them to the database in a few batched transactions instead of one per request.
//!
//! Data flow: socket → front door ([`http`]: connection limits → protocol →
//! request limits → fast path or router → [`http::intake::Intake::accept`])
//! → [`Batcher::record`] → moka slot → [`Flusher::flush_once`] →
//! [`store::write_batch`] (SeaORM, one transaction).
//!
//! - [`settings`]: the plain configuration the binary and the tests build.
//! - [`startup`]: [`Application::build`] connects, migrates and binds; its
//!   `run_until_stopped` serves and performs the ordered shutdown.
//! - [`http`]: the front door: hyper's HTTP/1.1 server with the connection
//!   and request limits, observation, the fast path of `POST /increment`,
//!   the intake shared with the operations, and problem documents.
//! - [`routes`]: the HTTP API (poem-openapi), one module per tag, and the
//!   route table.
//! - [`key`]: the counter key, checked once at the edge.
//! - [`batcher`]: per-key pending deltas in a bounded, expiring moka cache.
//! - [`flusher`]: the write loop: drain, write with a batch id, retry, final flush.
//! - [`store`]: the SQL: the idempotent batch write for PostgreSQL and SQLite.
//! - [`spill`]: the local file for what the final flush could not write.
//! - [`metrics`]: every Prometheus metric, served at `/metrics`.
//! - [`telemetry`]: the tracing subscriber.

pub mod batch;
pub mod batcher;
pub mod flusher;
pub mod http;
pub mod key;
pub mod metrics;
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
