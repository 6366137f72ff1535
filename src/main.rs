//! The `increment` binary: configuration, telemetry, then the service from the
//! `api` crate. Everything else lives there.

mod config;

use std::{process::ExitCode, sync::Arc};

use anyhow::Context;
use api::{Application, ShutdownReport};

/// mimalloc instead of glibc's malloc: smaller per-allocation overhead for the
/// millions of small cache entries, and faster small allocations on the
/// request path (measured in `BENCHMARKS.md`).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Tasks a worker runs between two looks at its sockets and timers, against
/// tokio's default of 61. A busy worker (64 connections' requests queued)
/// otherwise leaves an answer from PostgreSQL or NATS unread for up to 61
/// polls: the `Idempotency-Key` look-up, one query at a time, waited that
/// long per round trip, and every keyed request with it. With 16, keyed
/// requests went 3–16 % faster (three A/B runs) and plain ones did not move
/// (bench/PROFILE.md).
const EVENT_INTERVAL: u32 = 16;

fn main() -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .event_interval(EVENT_INTERVAL)
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("starting the async runtime failed: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(run())
}

async fn run() -> ExitCode {
    let config = config::Config::load();
    let telemetry_settings = config.telemetry_settings();
    let telemetry = match api::telemetry::init(&telemetry_settings) {
        Ok(telemetry) => Arc::new(telemetry),
        Err(e) => {
            // No subscriber to log through: the line by hand, in the format asked for.
            let error = api::telemetry::error_chain(&e);
            eprintln!(
                "{}",
                api::telemetry::line_without_subscriber(
                    telemetry_settings.log_format,
                    "starting logs and traces failed",
                    &error
                )
            );
            return ExitCode::FAILURE;
        }
    };
    let settings = config.into_settings();
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        log_format = ?telemetry_settings.log_format,
        otlp_endpoint = telemetry_settings.otlp_endpoint.as_deref().map(api::settings::redact_url),
        service_name = %telemetry_settings.service_name,
        instance_id = %telemetry_settings.instance_id,
        "starting"
    );
    settings.log_effective();
    let result = serve(settings).await;
    // Through the subscriber, so that it is JSON in JSON mode like every
    // other line (returning the error would print anyhow's plain text).
    if let Err(e) = &result {
        tracing::error!(error = %format!("{e:#}"), "exiting on an error");
    }
    // Export the spans still buffered (blocking: off the async workers).
    let exporter = Arc::clone(&telemetry);
    if tokio::task::spawn_blocking(move || exporter.shutdown())
        .await
        .is_err()
    {
        tracing::error!("stopping telemetry panicked");
    }
    if result.is_ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
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

/// Waits for a request to stop: Ctrl-C, SIGTERM, or SIGHUP and SIGQUIT,
/// whose default action would end the process at once and lose every
/// increment it holds (a closed terminal, a "reload" habit): all of them stop
/// it cleanly.
async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::error!(error = %e, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let name = {
        use tokio::signal::unix::SignalKind;
        tokio::select! {
            () = ctrl_c => "Ctrl-C",
            name = received(SignalKind::terminate(), "SIGTERM") => name,
            name = received(SignalKind::hangup(), "SIGHUP") => name,
            name = received(SignalKind::quit(), "SIGQUIT") => name,
        }
    };
    #[cfg(not(unix))]
    let name = {
        ctrl_c.await;
        "Ctrl-C"
    };
    tracing::info!(signal = name, "received {name}");
}

/// `name` once the signal `kind` arrives; never when it cannot be listened for.
#[cfg(unix)]
async fn received(kind: tokio::signal::unix::SignalKind, name: &'static str) -> &'static str {
    match tokio::signal::unix::signal(kind) {
        Ok(mut stream) => {
            stream.recv().await;
            name
        }
        Err(e) => {
            tracing::error!(error = %e, "cannot listen for {name}");
            std::future::pending().await
        }
    }
}
