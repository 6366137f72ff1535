//! Building and running the application: the one entry point shared by
//! `main` and the tests.

use std::{future::Future, net::SocketAddr, sync::Arc, time::Duration};

use migration::{Migrator, MigratorTrait};
use sea_orm::{ConnectOptions, ConnectionTrait, Database, DatabaseConnection, DbErr};
use tokio_util::sync::CancellationToken;

use crate::{
    batcher::Batcher,
    flusher::{Flusher, Unwritten},
    http::{
        intake::Intake,
        server::{self, ConnectionLimits},
    },
    journal::{Journal, Publisher, reader::Reader},
    metrics::{Metrics, Sampled},
    routes::{self, AppState, Lifecycle},
    settings::{Settings, SettingsError},
    spill::{self, SpillError},
    store,
    telemetry::SharedRecentRequests,
};

/// Why the service could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    #[error(transparent)]
    Settings(#[from] SettingsError),
    #[error("connecting to the database at {url} failed")]
    Connect {
        /// The URL with its secrets redacted.
        url: String,
        #[source]
        source: Redacted,
    },
    #[error("applying migrations failed")]
    Migrate(#[source] Redacted),
    #[error("replaying the spill file failed; it is kept for the next start")]
    Replay(#[source] ReplayError),
    #[error(transparent)]
    Journal(#[from] crate::journal::JournalError),
    #[error("binding {addr} failed")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// A database error as text, with the URL's secrets removed (a driver may
/// quote its connection string in an error).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Redacted(String);

impl Redacted {
    fn new(err: &DbErr, database_url: &str) -> Self {
        Self(crate::settings::scrub(
            &crate::telemetry::error_chain(err),
            &crate::settings::url_secrets(database_url),
        ))
    }
}

/// Why the spill file could not be replayed.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error(transparent)]
    Spill(#[from] SpillError),
    #[error("writing a spilled batch failed")]
    Database(#[from] DbErr),
}

/// How the service stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ShutdownReport {
    /// Everything accepted was written.
    Clean,
    /// The database did not take the final flush before the deadline; the
    /// deltas are in the spill file, to be replayed at the next start.
    Spilled { keys: usize, total: i128 },
    /// Not written, and the spill file could not be written either.
    Unwritten { keys: usize, total: i128 },
    /// With the journal on: not written before the deadline, and kept in
    /// the journal, from which the next writer applies it.
    LeftInJournal { keys: usize, total: i128 },
}

/// A connected, migrated, bound service, ready to run.
pub struct Application {
    listener: tokio::net::TcpListener,
    local_addr: SocketAddr,
    settings: Settings,
    state: AppState,
    flusher: Arc<Flusher>,
    journal: Option<JournalParts>,
}

/// How long a keyed request waits for the database to say whether its key
/// was applied; then its flush decides (the database may be down: the
/// request is still taken).
const IDEMPOTENCY_LOOKUP_TIMEOUT: std::time::Duration = std::time::Duration::from_millis(250);

/// The journal's tasks, started with the server.
struct JournalParts {
    publisher: Arc<Publisher>,
    reader: Reader,
    client: async_nats::Client,
}

impl Application {
    /// Validates `settings`, connects to the database, applies migrations
    /// (unless disabled) and binds the listener (port 0 picks a free port).
    ///
    /// # Errors
    /// [`StartupError`] naming the step that failed.
    pub async fn build(settings: Settings) -> Result<Self, StartupError> {
        settings.validate()?;
        let db = connect(&settings)
            .await
            .map_err(|e| StartupError::Connect {
                url: crate::settings::redact_url(&settings.database_url),
                source: Redacted::new(&e, &settings.database_url),
            })?;
        if settings.migrate {
            migrate(&settings)
                .await
                .map_err(|e| StartupError::Migrate(Redacted::new(&e, &settings.database_url)))?;
        }
        replay_spill(&db, &settings.spill_path, settings.idempotency_window)
            .await
            .map_err(StartupError::Replay)?;
        let listener = tokio::net::TcpListener::bind(settings.listen)
            .await
            .map_err(|source| StartupError::Bind {
                addr: settings.listen,
                source,
            })?;
        let local_addr = listener.local_addr().unwrap_or(settings.listen);

        let batcher = Arc::new(Batcher::with_max_pending_keys(
            settings.cache_capacity,
            settings.cache_ttl,
            settings.max_pending_keys,
        ));
        let metrics = Arc::new(Metrics::new());
        metrics.sample_at_scrape(Arc::clone(&batcher) as Arc<dyn Sampled>);
        metrics.sample_at_scrape(Arc::new(PoolGauges(db.clone())));
        let recent_requests: SharedRecentRequests = Arc::default();
        let journal = match &settings.journal {
            Some(journal) => Some(Journal::connect(journal.clone()).await?),
            None => None,
        };
        let mut flusher = Flusher::new(
            Arc::clone(&batcher),
            db.clone(),
            Arc::clone(&metrics),
            Arc::clone(&recent_requests),
            settings.flush_interval,
        )
        .with_write_connections(settings.flush_connections)
        .with_idempotency_window(settings.idempotency_window);
        if let Some(journal) = &journal {
            flusher = flusher.with_journal(Arc::clone(&journal.cursor));
        }
        let flusher = Arc::new(flusher);
        let mut intake = Intake::new(
            Arc::clone(&batcher),
            Arc::clone(&recent_requests),
            Arc::clone(&metrics),
            settings.flush_interval.as_secs().max(1),
        )
        .with_idempotency(settings.idempotency_memory, settings.idempotency_window);
        if settings.idempotency_lookup {
            intake = intake.with_applied_lookup(crate::idempotency::Applied::start(
                db.clone(),
                settings.idempotency_window,
                IDEMPOTENCY_LOOKUP_TIMEOUT,
            ));
        }
        let journal = journal.map(|journal| {
            let publisher = journal.publisher(Arc::clone(&metrics));
            intake = intake.clone().with_journal(Arc::clone(&publisher));
            let reader = Reader {
                stream: journal.stream.clone(),
                cursor: Arc::clone(&journal.cursor),
                batcher: Arc::clone(&batcher),
                flusher: Arc::clone(&flusher),
                db: db.clone(),
                metrics: Arc::clone(&metrics),
                writer: format!(
                    "{}-{}",
                    crate::telemetry::default_instance_id(),
                    uuid::Uuid::new_v4()
                ),
            };
            JournalParts {
                publisher,
                reader,
                client: journal.client.clone(),
            }
        });
        let state = AppState {
            batcher,
            flusher: Arc::clone(&flusher),
            intake,
            db,
            lifecycle: Lifecycle::default(),
            metrics,
            max_body: settings.max_body,
            body_timeout: settings.body_timeout,
            max_in_flight: settings.max_in_flight,
            flush_interval: settings.flush_interval,
            wait_timeout: settings.wait_timeout,
            admin_token: settings.admin_token.as_deref().map(Arc::from),
            fast_path: settings.fast_path,
            access_log: settings.access_log,
            journal: journal.as_ref().map(|j| Arc::clone(&j.reader.cursor)),
            journal_client: journal.as_ref().map(|j| j.client.clone()),
        };
        Ok(Self {
            listener,
            local_addr,
            settings,
            state,
            flusher,
            journal,
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

    pub fn batcher(&self) -> Arc<Batcher> {
        Arc::clone(&self.state.batcher)
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
            listener,
            local_addr,
            settings,
            state,
            flusher,
            journal,
        } = self;
        let stop_flushing = CancellationToken::new();
        let flush_loop =
            tokio::spawn(Arc::clone(&flusher).run_until_stopped(stop_flushing.clone()));
        let stop_journal = CancellationToken::new();
        let journal = journal.map(
            |JournalParts {
                 publisher, reader, ..
             }| {
                let publishing = tokio::spawn(publisher.run(stop_journal.clone()));
                let reader = Arc::new(reader);
                let reading = tokio::spawn({
                    let reader = Arc::clone(&reader);
                    let stop = stop_journal.clone();
                    async move { reader.run_until_stopped(stop).await }
                });
                (publishing, reading, reader)
            },
        );

        // The deadline is fixed when the signal arrives; the HTTP drain may use
        // half of the budget, the final flush gets the rest.
        let (signalled_tx, signalled_rx) = tokio::sync::oneshot::channel();
        let lifecycle = state.lifecycle.clone();
        let stop_serving = CancellationToken::new();
        let signal = {
            let stop_serving = stop_serving.clone();
            async move {
                shutdown.await;
                lifecycle.begin_shutdown();
                tracing::info!("shutdown requested: not ready, draining connections");
                let _ = signalled_tx.send(tokio::time::Instant::now());
                stop_serving.cancel();
            }
        };
        let signal = tokio::spawn(signal);
        tracing::info!(addr = %local_addr, "listening");
        let http_drain = settings.shutdown_timeout / 2;
        let limits = ConnectionLimits {
            max_connections: settings.max_connections,
            header_timeout: settings.header_timeout,
            idle_timeout: settings.idle_timeout,
            max_head_bytes: settings.max_head_bytes,
        };
        server::serve(
            listener,
            routes::router(state),
            limits,
            stop_serving,
            http_drain,
        )
        .await;
        let signalled_at = signalled_rx
            .await
            .unwrap_or_else(|_| tokio::time::Instant::now());
        signal.abort();
        let deadline = signalled_at + settings.shutdown_timeout;

        // No request is left: the publisher has nothing to wait for, and the
        // reader stops before the final flush takes what it recorded.
        stop_journal.cancel();
        let lease = match journal {
            Some((publishing, reading, reader)) => {
                if publishing.await.is_err() || reading.await.is_err() {
                    tracing::error!("a journal task panicked");
                }
                Some(reader)
            }
            None => None,
        };
        stop_flushing.cancel();
        if flush_loop.await.is_err() {
            tracing::error!("the flush loop panicked");
        }
        tracing::info!("connections closed; writing everything pending");
        let report = match (flusher.flush_remaining(deadline).await, &lease) {
            (Ok(()), _) => {
                tracing::info!("shutdown complete: every accepted increment is written");
                ShutdownReport::Clean
            }
            (Err(Unwritten { keys, total, .. }), Some(_)) => {
                tracing::warn!(keys, total = %total, "the database did not take the final flush; the increments stay in the journal, and the next writer applies them");
                ShutdownReport::LeftInJournal { keys, total }
            }
            (Err(unwritten), None) => spill_at_exit(&settings.spill_path, unwritten),
        };
        if let Some(reader) = lease {
            reader.release_lease().await;
        }
        report
    }
}

/// Writes what the database did not take to the spill file.
fn spill_at_exit(path: &std::path::Path, unwritten: Unwritten) -> ShutdownReport {
    let Unwritten {
        keys,
        total,
        batches,
    } = unwritten;
    match spill::write(path, &batches) {
        Ok(()) => {
            tracing::error!(
                keys,
                total = %total,
                path = %path.display(),
                "the database did not take the final flush before the deadline; \
                 the increments are in the spill file and will be written at the next start"
            );
            ShutdownReport::Spilled { keys, total }
        }
        Err(e) => {
            tracing::error!(
                keys,
                total = %total,
                error = %crate::telemetry::error_chain(&e),
                "the database did not take the final flush and the spill file could not be written: \
                 these increments are lost"
            );
            ShutdownReport::Unwritten { keys, total }
        }
    }
}

/// Writes the batches of a spill file left by an earlier run, each under its
/// own id (so one that had committed is not applied twice), then deletes it.
/// Runs before the service accepts traffic.
async fn replay_spill(
    db: &DatabaseConnection,
    path: &std::path::Path,
    idempotency_window: std::time::Duration,
) -> Result<(), ReplayError> {
    let Some(batches) = spill::read(path)? else {
        return Ok(());
    };
    let mut keys = 0;
    for batch in &batches {
        // Spilled batches come back as one part each: one connection.
        store::write_batch_keyed(db, batch, chrono::Utc::now(), 1, idempotency_window).await?;
        keys += batch.len();
    }
    spill::remove(path)?;
    tracing::warn!(
        batches = batches.len(),
        keys,
        path = %path.display(),
        "replayed the spill file of an earlier shutdown"
    );
    Ok(())
}

/// Key of the PostgreSQL advisory lock that serialises migrations.
const MIGRATION_LOCK_KEY: i64 = 0x696e_6372_656d_656e; // "incremen"

/// Applies pending migrations. On PostgreSQL, under a session advisory lock
/// on a dedicated one-connection pool, so replicas started together against
/// an empty database apply each migration once: the others wait, then find
/// nothing pending.
async fn migrate(settings: &Settings) -> Result<(), DbErr> {
    let mut options = ConnectOptions::new(settings.database_url.clone());
    options
        .max_connections(1)
        .min_connections(1)
        .connect_timeout(Duration::from_secs(5))
        .sqlx_logging(false);
    let db = Database::connect(options).await?;
    let postgres = db.get_database_backend() == sea_orm::DbBackend::Postgres;
    if postgres {
        db.execute_unprepared(&format!("SELECT pg_advisory_lock({MIGRATION_LOCK_KEY})"))
            .await?;
    }
    let applied = Migrator::up(&db, None).await;
    if postgres {
        // Closing the connection would release it too; unlock explicitly.
        let _ = db
            .execute_unprepared(&format!("SELECT pg_advisory_unlock({MIGRATION_LOCK_KEY})"))
            .await;
    }
    db.close().await.ok();
    applied
}

/// The database pool's connections by state, sampled at each scrape.
struct PoolGauges(DatabaseConnection);

impl Sampled for PoolGauges {
    fn sample(&self, metrics: &Metrics) {
        let (size, idle) = match self.0.get_database_backend() {
            sea_orm::DbBackend::Postgres => {
                let pool = self.0.get_postgres_connection_pool();
                (pool.size(), pool.num_idle())
            }
            sea_orm::DbBackend::Sqlite => {
                let pool = self.0.get_sqlite_connection_pool();
                (pool.size(), pool.num_idle())
            }
            _ => (0, 0),
        };
        let idle = i64::try_from(idle).unwrap_or(i64::MAX);
        let gauges = &metrics.db_pool_connections;
        gauges.with_label_values(&["idle"]).set(idle);
        gauges
            .with_label_values(&["in_use"])
            .set((i64::from(size) - idle).max(0));
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
        // Statements are prepared once per connection and kept; after five
        // runs PostgreSQL may switch one to a generic plan, kept for the
        // connection's life. A plan made while `idempotency_keys` was empty
        // (a seq scan) then stayed a seq scan at 100k+ rows (lookups went
        // from ~35k to ~1.4k requests/s). Custom plans follow the table.
        .map_sqlx_postgres_opts(|o| o.options([("plan_cache_mode", "force_custom_plan")]))
        .map_sqlx_sqlite_opts(|o| {
            // WAL lets /readyz and readers run beside a flush; FULL keeps
            // committed flushes durable.
            o.journal_mode(sea_orm::sqlx::sqlite::SqliteJournalMode::Wal)
                .synchronous(sea_orm::sqlx::sqlite::SqliteSynchronous::Full)
                .busy_timeout(Duration::from_secs(10))
        });
    Database::connect(options).await
}
