//! The `increment` service: add integers to named counters over HTTP, write
//! them to the database in a few batched transactions instead of one per request.
//!
//! Data flow, one direction (the README's Design section draws it):
//! socket → front door ([`http`]: connection cap, HTTP/1.1 and head
//! deadlines in [`http::server`]; observation, request limits, the fast path
//! of a plain `POST /increment` or else the router, in [`http::front_door`])
//! → [`http::intake::Intake::accept`] → [`Batcher::record`] (a moka slot) →
//! [`Batcher::hand_over`] (a [`batch::Batch`]) → [`Flusher`] (owns the batch
//! in flight) → [`store::write_batch`] (SeaORM, one transaction per part).
//!
//! - [`settings`]: the plain configuration the binary and the tests build.
//! - [`startup`]: [`Application::build`] connects, migrates and binds; its
//!   `run_until_stopped` serves and performs the ordered shutdown.
//! - [`http`]: the front door and the fast path, the intake shared with the
//!   operations, and problem documents.
//! - [`routes`]: the HTTP API (poem-openapi), one module per tag, and the
//!   route table.
//! - [`key`]: the counter key, checked once at the edge.
//! - [`batcher`]: per-key pending deltas in a bounded, expiring moka cache;
//!   adds them and hands them over.
//! - [`batch`]: what one drain took: sorted deltas, parts, ids.
//! - [`flusher`]: the write loop: the batch in flight, its retry and
//!   confirmation, the final flush.
//! - [`store`]: the SQL: the idempotent part write for PostgreSQL and SQLite.
//! - [`idempotency`]: the `Idempotency-Key` header, request fingerprints,
//!   and this instance's memory of recent keys (the database decides).
//! - [`journal`]: with `--journal-url`, NATS JetStream between the intake
//!   and the batcher: a `202` is stored in the stream; the lease holder reads
//!   it into the batcher.
//! - [`spill`]: the local file for what the final flush could not write.
//! - [`metrics`]: every Prometheus metric, declared once; a leaf.
//! - [`telemetry`]: the tracing subscriber.

pub mod batch;
pub mod batcher;
pub mod flusher;
pub mod http;
pub mod idempotency;
pub mod journal;
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
