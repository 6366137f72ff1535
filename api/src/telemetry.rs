//! The tracing subscriber: built in one function, installed once.

use tracing_subscriber::{EnvFilter, fmt, prelude::*};

/// Default filter when `RUST_LOG` is unset: our crates at info, the SQL driver
/// quiet (it would log every multi-thousand-row statement).
pub const DEFAULT_LOG_FILTER: &str = "info,sqlx=warn,sea_orm=warn";

/// Installs the global subscriber (text logs to stderr, filtered by `RUST_LOG`).
/// A second call is a no-op, so tests may call it freely.
pub fn init() {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(DEFAULT_LOG_FILTER));
    let _already_installed = tracing_subscriber::registry()
        .with(filter)
        .with(fmt::layer().with_writer(std::io::stderr))
        .try_init();
}
