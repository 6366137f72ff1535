//! Building and running the application: the one entry point shared by
//! `main` and the tests.

use std::{future::Future, net::SocketAddr, sync::Arc, time::Duration};

use migration::{Migrator, MigratorTrait};
use poem::{
    Server,
    listener::{Acceptor, TcpAcceptor},
};
use sea_orm::{ConnectOptions, Database, DatabaseConnection, DbErr};
use tokio_util::sync::CancellationToken;

use crate::{
    batcher::Batcher,
    flusher::{Flusher, Unwritten},
    metrics::Metrics,
    routes::{self, AppState, Lifecycle},
    settings::{Settings, SettingsError},
    telemetry::SharedRecentRequests,
};

/// Why the service could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    #[error(transparent)]
    Settings(#[from] SettingsError),
    #[error("connecting to the database failed")]
    Connect(#[source] DbErr),
    #[error("applying migrations failed")]
    Migrate(#[source] DbErr),
    #[error("binding {addr} failed")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// How the service stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShutdownReport {
    /// Everything accepted was written.
    Clean,
    /// The database did not take the final flush before the deadline.
    Unwritten(Unwritten),
}

/// A connected, migrated, bound service, ready to run.
pub struct Application {
    acceptor: TcpAcceptor,
    local_addr: SocketAddr,
    settings: Settings,
    state: AppState,
    flusher: Arc<Flusher>,
}

impl Application {
    /// Validates `settings`, connects to the database, applies migrations
    /// (unless disabled) and binds the listener (port 0 picks a free port).
    ///
    /// # Errors
    /// [`StartupError`] naming the step that failed.
    pub async fn build(settings: Settings) -> Result<Self, StartupError> {
        settings.validate()?;
        let db = connect(&settings).await.map_err(StartupError::Connect)?;
        if settings.migrate {
            Migrator::up(&db, None)
                .await
                .map_err(StartupError::Migrate)?;
        }
        let listener = tokio::net::TcpListener::bind(settings.listen)
            .await
            .map_err(|source| StartupError::Bind {
                addr: settings.listen,
                source,
            })?;
        let bind_error = |source| StartupError::Bind {
            addr: settings.listen,
            source,
        };
        let acceptor = TcpAcceptor::from_tokio(listener).map_err(bind_error)?;
        let local_addr = acceptor
            .local_addr()
            .into_iter()
            .find_map(|addr| addr.as_socket_addr().copied())
            .unwrap_or(settings.listen);

        let batcher = Arc::new(Batcher::new(settings.cache_capacity, settings.cache_ttl));
        let metrics = Arc::new(Metrics::new());
        let recent_requests: SharedRecentRequests = Arc::default();
        let flusher = Arc::new(Flusher::new(
            Arc::clone(&batcher),
            db.clone(),
            Arc::clone(&metrics),
            Arc::clone(&recent_requests),
            settings.flush_interval,
        ));
        let state = AppState {
            batcher,
            flusher: Arc::clone(&flusher),
            db,
            lifecycle: Lifecycle::default(),
            metrics,
            recent_requests,
            max_body: settings.max_body,
        };
        Ok(Self {
            acceptor,
            local_addr,
            settings,
            state,
            flusher,
        })
    }

    /// The address the server listens on (the real port when 0 was asked).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    pub fn db(&self) -> &DatabaseConnection {
        &self.state.db
    }

    pub fn flusher(&self) -> Arc<Flusher> {
        Arc::clone(&self.flusher)
    }

    /// The router this application serves (for in-process tests).
    pub fn router(&self) -> impl poem::Endpoint<Output = poem::Response> + use<> {
        routes::router(self.state.clone())
    }

    /// Readiness control (for tests of the shutdown sequence).
    pub fn lifecycle(&self) -> Lifecycle {
        self.state.lifecycle.clone()
    }

    /// Serves until `shutdown` completes, then shuts down in order:
    /// readiness off → stop accepting and finish in-flight requests → stop the
    /// flush loop → flush everything pending, retrying until the deadline
    /// (`shutdown_timeout` after the signal).
    pub async fn run_until_stopped(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> ShutdownReport {
        let Self {
            acceptor,
            local_addr,
            settings,
            state,
            flusher,
        } = self;
        let stop_flushing = CancellationToken::new();
        let flush_loop =
            tokio::spawn(Arc::clone(&flusher).run_until_stopped(stop_flushing.clone()));

        // The deadline is fixed when the signal arrives; the HTTP drain may use
        // half of the budget, the final flush gets the rest.
        let (signalled_tx, signalled_rx) = tokio::sync::oneshot::channel();
        let lifecycle = state.lifecycle.clone();
        let signal = async move {
            shutdown.await;
            lifecycle.begin_shutdown();
            tracing::info!("shutdown requested: not ready, draining connections");
            let _ = signalled_tx.send(tokio::time::Instant::now());
        };
        tracing::info!(addr = %local_addr, "listening");
        let http_drain = settings.shutdown_timeout / 2;
        let served = Server::new_with_acceptor(acceptor)
            .run_with_graceful_shutdown(routes::router(state), signal, Some(http_drain))
            .await;
        if let Err(e) = served {
            tracing::error!(error = %e, "the HTTP server failed");
        }
        let signalled_at = signalled_rx
            .await
            .unwrap_or_else(|_| tokio::time::Instant::now());
        let deadline = signalled_at + settings.shutdown_timeout;

        stop_flushing.cancel();
        if flush_loop.await.is_err() {
            tracing::error!("the flush loop panicked");
        }
        tracing::info!("connections closed; writing everything pending");
        match flusher.flush_remaining(deadline).await {
            Ok(()) => {
                tracing::info!("shutdown complete: every accepted increment is written");
                ShutdownReport::Clean
            }
            Err(unwritten) => {
                tracing::error!(
                    keys = unwritten.keys,
                    total = %unwritten.total,
                    "shutdown deadline passed with increments not written to the database"
                );
                ShutdownReport::Unwritten(unwritten)
            }
        }
    }
}

/// Opens the pool with settings suited to each backend.
async fn connect(settings: &Settings) -> Result<DatabaseConnection, DbErr> {
    let mut options = ConnectOptions::new(settings.database_url.clone());
    options
        .max_connections(settings.db_pool_size)
        .min_connections(1)
        .connect_timeout(Duration::from_secs(5))
        .acquire_timeout(Duration::from_secs(5))
        // On by default at info: it would log every multi-thousand-row upsert.
        .sqlx_logging(false)
        .map_sqlx_sqlite_opts(|o| {
            // WAL lets /readyz and readers run beside a flush; FULL keeps
            // committed flushes durable.
            o.journal_mode(sea_orm::sqlx::sqlite::SqliteJournalMode::Wal)
                .synchronous(sea_orm::sqlx::sqlite::SqliteSynchronous::Full)
                .busy_timeout(Duration::from_secs(10))
        });
    Database::connect(options).await
}
