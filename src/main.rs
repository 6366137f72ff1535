//! The `increment` binary: configuration, telemetry, then the service from the
//! `api` crate. Everything else lives there.

mod config;

use std::sync::Arc;

use anyhow::Context;
use api::{Application, ShutdownReport};

/// mimalloc instead of glibc's malloc: smaller per-allocation overhead for the
/// millions of small cache entries, and faster small allocations on the
/// request path (measured in `BENCHMARKS.md`).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = config::Config::load();
    let telemetry_settings = config.telemetry_settings();
    let telemetry =
        Arc::new(api::telemetry::init(&telemetry_settings).context("starting logs and traces")?);
    let settings = config.into_settings();
    tracing::info!(
        ?settings,
        telemetry = ?telemetry_settings,
        version = env!("CARGO_PKG_VERSION"),
        "starting"
    );
    let result = serve(settings).await;
    // Export the spans still buffered (blocking: off the async workers).
    let exporter = Arc::clone(&telemetry);
    if tokio::task::spawn_blocking(move || exporter.shutdown())
        .await
        .is_err()
    {
        eprintln!("stopping telemetry panicked");
    }
    result
}

async fn serve(settings: api::Settings) -> anyhow::Result<()> {
    let app = Application::build(settings)
        .await
        .context("starting the service")?;
    match app.run_until_stopped(shutdown_signal()).await {
        ShutdownReport::Clean => Ok(()),
        ShutdownReport::Spilled { keys, total } => anyhow::bail!(
            "{keys} keys (total {total}) could not be written before the shutdown deadline; \
             they are in the spill file and will be written at the next start"
        ),
        ShutdownReport::Unwritten { keys, total } => anyhow::bail!(
            "{keys} keys (total {total}) could not be written before the shutdown deadline \
             nor spilled: they are lost"
        ),
        // Not an error: the journal holds them and the next writer applies them.
        ShutdownReport::LeftInJournal { .. } => Ok(()),
    }
}

/// Completes on SIGINT (Ctrl-C) or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::error!(error = %e, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut sigterm) => {
                sigterm.recv().await;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => tracing::info!("received Ctrl-C"),
        () = terminate => tracing::info!("received SIGTERM"),
    }
}
