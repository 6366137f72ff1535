//! Building and running the application: the one entry point shared by
//! `main` and the tests.

use std::{future::Future, net::SocketAddr, sync::Arc, time::Duration};

use migration::{Migrator, MigratorTrait};
use sea_orm::{ConnectOptions, ConnectionTrait, Database, DatabaseConnection, DbErr, Statement};
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
    #[error(
        "the database's encoding is {encoding}, not UTF8: keys are any UTF-8 text, and some \
         could never be written (create the database with ENCODING 'UTF8')"
    )]
    DatabaseEncoding { encoding: String },
    #[error("reading the database's encoding failed")]
    ReadEncoding(#[source] Redacted),
    #[error("applying migrations failed")]
    Migrate(#[source] Redacted),
    #[error("reading the journal's stored offset failed")]
    JournalOffset(#[source] Redacted),
    #[error("replaying the spill file failed; it is kept for the next start")]
    Replay(#[source] ReplayError),
    #[error("the spill location cannot be used")]
    Spill(#[source] SpillError),
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
    fn new(err: &(dyn std::error::Error + 'static), database_url: &str) -> Self {
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
    /// Where this run spills what its final flush could not write.
    spill_file: std::path::PathBuf,
    /// With `--spill-path`: that file is this process's while it runs.
    spill_lock: Option<spill::PathLock>,
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
        let db = connect_waiting(&settings)
            .await
            .map_err(|source| StartupError::Connect {
                url: crate::settings::redact_url(&settings.database_url),
                source,
            })?;
        require_utf8(&db, &settings).await?;
        if settings.migrate {
            migrate(&settings)
                .await
                .map_err(|e| StartupError::Migrate(Redacted::new(&e, &settings.database_url)))?;
        }
        let (spill_file, spill_lock) = match &settings.spill_dir {
            Some(dir) => {
                warn_of_spill_files_outside(dir);
                spill::probe(dir).map_err(StartupError::Spill)?;
                // Files left by others are not this instance's to hold up
                // its start with (a database that answers but cannot write:
                // every replica would stop): the rescan retries them, and
                // their ids keep each part applied once.
                if let Err(e) = replay_spill_dir(&db, dir, settings.idempotency_window).await {
                    tracing::error!(error = %crate::telemetry::error_chain(&e), dir = %dir.display(), "replaying the spill directory failed; the rescan retries it");
                }
                (spill::own_file(dir), None)
            }
            None => {
                let path = &settings.spill_path;
                spill::probe(spill::directory_of(path)).map_err(StartupError::Spill)?;
                // Taken before the replay: another instance's file is not
                // this one's to replay and delete while it may still write it.
                let lock = spill::lock_path(path).map_err(StartupError::Spill)?;
                replay_spill(&db, path, settings.idempotency_window)
                    .await
                    .map_err(StartupError::Replay)?;
                (path.clone(), Some(lock))
            }
        };
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
        export_limits(&metrics, &settings);
        let recent_requests: SharedRecentRequests = Arc::default();
        let journal = match &settings.journal {
            Some(journal) => {
                let offset = store::journal_offset(&db, &journal.stream)
                    .await
                    .map_err(|e| {
                        StartupError::JournalOffset(Redacted::new(&e, &settings.database_url))
                    })?;
                let journal = Journal::connect_after(journal.clone(), offset).await?;
                journal.check_room_for(settings.max_body)?;
                Some(journal)
            }
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
            let lookups = connect_lookups(&settings, &db).await?;
            intake = intake.with_applied_lookup(crate::idempotency::Applied::start(
                lookups,
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
                retain_for: journal.settings.duplicate_window,
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
            // Three quarters of the HTTP drain (half the shutdown timeout),
            // so the answer is sent before the drain closes the connection.
            wait_cut_at_shutdown: settings.shutdown_timeout * 3 / 8,
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
            spill_file,
            spill_lock,
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
            spill_file,
            spill_lock,
            state,
            flusher,
            journal,
        } = self;
        let mut background = AbortOnDrop::default();
        let stop_flushing = CancellationToken::new();
        let flush_loop =
            background.spawn(Arc::clone(&flusher).run_until_stopped(stop_flushing.clone()));
        let spill_rescan = settings.spill_dir.clone().map(|dir| {
            background.spawn(rescan_spill_dir(
                state.db.clone(),
                dir,
                settings.spill_rescan_interval,
                settings.idempotency_window,
                stop_flushing.clone(),
            ))
        });
        let stop_journal = CancellationToken::new();
        let journal = journal.map(
            |JournalParts {
                 publisher, reader, ..
             }| {
                let publishing = background.spawn(publisher.run(stop_journal.clone()));
                let reader = Arc::new(reader);
                let reading = background.spawn({
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
        let signal = background.spawn(signal);
        tracing::info!(addr = %local_addr, "listening");
        let http_drain = settings.shutdown_timeout / 2;
        let limits = ConnectionLimits {
            max_connections: settings.max_connections,
            header_timeout: settings.header_timeout,
            idle_timeout: settings.idle_timeout,
            send_timeout: settings.send_timeout,
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
        // Each task is waited for until the deadline at most: one stuck on
        // the database (a row lock, a peer gone without a reset) must not
        // hold the process past its grace period, where a SIGKILL would
        // lose what the final flush or the spill would have kept.
        let lease = match journal {
            Some((publishing, reading, reader)) => {
                if join_by(deadline, publishing, "the journal publisher").await
                    | join_by(deadline, reading, "the journal reader").await
                {
                    tracing::error!("a journal task panicked");
                }
                Some(reader)
            }
            None => None,
        };
        stop_flushing.cancel();
        if join_by(deadline, flush_loop, "the flush loop").await {
            tracing::error!("the flush loop panicked");
        }
        // A rescan may be in the middle of replaying another instance's
        // file, which can take longer than the whole shutdown budget; the
        // final flush of this instance's own increments goes first. Cut off,
        // the replay is redone by the next start or rescan (by their ids,
        // nothing twice).
        if let Some(rescan) = spill_rescan {
            rescan.abort();
            if rescan.await.is_err_and(|e| e.is_panic()) {
                tracing::error!("the spill directory rescan panicked");
            }
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
            (Err(unwritten), None) => spill_at_exit(&spill_file, unwritten),
        };
        if let Some(reader) = lease {
            reader.release_lease().await;
        }
        drop(spill_lock);
        report
    }
}

/// The application's background tasks (flush loop, journal, spill rescan),
/// aborted when the future serving it is dropped mid-run: nothing of an
/// application cut off that way (a test's crash) goes on flushing, reading
/// the journal or renewing its lease, as nothing of a killed process would.
/// A shutdown has ended them all (joined, or cut off at its deadline)
/// before this is dropped.
#[derive(Default)]
struct AbortOnDrop(Vec<tokio::task::AbortHandle>);

impl AbortOnDrop {
    fn spawn<T: Send + 'static>(
        &mut self,
        task: impl Future<Output = T> + Send + 'static,
    ) -> tokio::task::JoinHandle<T> {
        let handle = tokio::spawn(task);
        self.0.push(handle.abort_handle());
        handle
    }
}

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        for task in &self.0 {
            task.abort();
        }
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

/// Exports the configured bounds, so dashboards and alerts compare what is
/// used with what is allowed.
fn export_limits(metrics: &Metrics, settings: &Settings) {
    metrics
        .pending_keys_limit
        .set(i64::try_from(settings.max_pending_keys).unwrap_or(i64::MAX));
    metrics
        .http_requests_in_flight_limit
        .set(i64::try_from(settings.max_in_flight).unwrap_or(i64::MAX));
    metrics
        .flush_interval_seconds
        .set(settings.flush_interval.as_secs_f64());
    metrics
        .journal_enabled
        .set(i64::from(settings.journal.is_some()));
}

/// Writes the batches of a spill file left by an earlier run, each under its
/// own id (so one that had committed is not applied twice), then deletes it.
/// Runs before the service accepts traffic.
async fn replay_spill(
    db: &DatabaseConnection,
    path: &std::path::Path,
    idempotency_window: std::time::Duration,
) -> Result<(), ReplayError> {
    let batches = match spill::read(path) {
        Ok(Some(batches)) => batches,
        Ok(None) => return Ok(()),
        // As in a spill directory: a damaged file must not stop every start
        // until someone edits it.
        Err(e @ SpillError::Invalid { .. }) => {
            let aside = spill::set_aside(path)?;
            tracing::error!(error = %e, kept_as = %aside.display(), "the spill file cannot be read; set aside, its increments are not applied");
            return Ok(());
        }
        Err(e) => return Err(e.into()),
    };
    write_spilled(db, path, &batches, idempotency_window).await?;
    spill::remove(path)?;
    Ok(())
}

/// Writes the batches of one spill file.
async fn write_spilled(
    db: &DatabaseConnection,
    path: &std::path::Path,
    batches: &[crate::batch::Batch],
    idempotency_window: std::time::Duration,
) -> Result<(), DbErr> {
    let mut keys = 0;
    for batch in batches {
        // Spilled batches come back as one part each: one connection.
        store::write_batch_keyed(
            db,
            batch,
            chrono::Utc::now(),
            1,
            idempotency_window,
            &std::sync::atomic::AtomicUsize::new(0),
        )
        .await?;
        keys += batch.len();
    }
    tracing::warn!(
        batches = batches.len(),
        keys,
        path = %path.display(),
        "replayed the spill file of an earlier shutdown"
    );
    Ok(())
}

/// Replays every spill file left in a directory shared by instances, each
/// under a lock so that instances starting together replay each file once.
/// A file that cannot be parsed is renamed `….invalid` and logged, so it
/// does not stop every replica.
async fn replay_spill_dir(
    db: &DatabaseConnection,
    dir: &std::path::Path,
    idempotency_window: std::time::Duration,
) -> Result<(), ReplayError> {
    for path in spill::left_in(dir)? {
        let mut claimed = match spill::claim(&path) {
            Ok(Some(claimed)) => claimed,
            // Held by another instance's replay, or replayed since the listing.
            Ok(None) => continue,
            // One file this instance cannot open (another owner, say) must
            // not stop every replica's start: the others, and the rescan,
            // still try it.
            Err(e) => {
                tracing::error!(error = %e, "a spill file cannot be opened for replay; left for another instance or the next rescan");
                continue;
            }
        };
        let batches = match claimed.read() {
            Ok(batches) => batches,
            Err(e @ SpillError::Invalid { .. }) => {
                let aside = claimed.set_aside()?;
                tracing::error!(error = %e, kept_as = %aside.display(), "a spill file cannot be read; set aside, its increments are not applied");
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        write_spilled(db, claimed.path(), &batches, idempotency_window).await?;
        claimed.remove()?;
    }
    Ok(())
}

/// Spill files beside the spill directory (an earlier version's
/// `--spill-path`, such as the image's `/var/lib/increment/spill.jsonl`) are
/// not replayed from there: say so, loudly, at every start.
fn warn_of_spill_files_outside(dir: &std::path::Path) {
    let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) else {
        return;
    };
    if let Ok(files) = spill::left_in(parent)
        && !files.is_empty()
    {
        tracing::warn!(
            files = ?files,
            spill_dir = %dir.display(),
            "spill files outside the spill directory are not replayed: move them into it"
        );
    }
}

/// Replays what other instances leave in the shared spill directory, every
/// `every`, until `stop`.
async fn rescan_spill_dir(
    db: DatabaseConnection,
    dir: std::path::PathBuf,
    every: Duration,
    idempotency_window: std::time::Duration,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval(every);
    tick.tick().await;
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        if let Err(e) = replay_spill_dir(&db, &dir, idempotency_window).await {
            tracing::warn!(error = %crate::telemetry::error_chain(&e), dir = %dir.display(), "replaying spill files failed; will retry");
        }
    }
}

/// Refuses a PostgreSQL database whose encoding is not UTF8. Keys are any
/// UTF-8 text; in LATIN1, say, one the encoding cannot hold fails its flush
/// every time, and the batch in flight (retried before anything newer) holds
/// back every increment behind it, then every start that replays its spill
/// (found by review). SQLite stores UTF-8 text whatever it holds.
async fn require_utf8(db: &DatabaseConnection, settings: &Settings) -> Result<(), StartupError> {
    if db.get_database_backend() != sea_orm::DbBackend::Postgres {
        return Ok(());
    }
    let read = |e: DbErr| StartupError::ReadEncoding(Redacted::new(&e, &settings.database_url));
    let row = db
        .query_one_raw(Statement::from_string(
            sea_orm::DbBackend::Postgres,
            "SELECT pg_encoding_to_char(encoding) AS encoding FROM pg_database \
             WHERE datname = current_database()",
        ))
        .await
        .map_err(read)?;
    let encoding: String = match row {
        Some(row) => row.try_get("", "encoding").map_err(read)?,
        None => return Ok(()),
    };
    if encoding == "UTF8" {
        Ok(())
    } else {
        Err(StartupError::DatabaseEncoding { encoding })
    }
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
/// First delay between attempts to reach the database at start-up; doubled
/// per attempt up to [`CONNECT_RETRY_MAX`].
const CONNECT_RETRY_FIRST: Duration = Duration::from_millis(250);
const CONNECT_RETRY_MAX: Duration = Duration::from_secs(4);

/// Whether a task ended by panicking. A task cancelled because the runtime
/// is shutting down (a test's end, say) did not fail and is not reported.
fn panicked<T>(ended: Result<T, tokio::task::JoinError>) -> bool {
    ended.is_err_and(|e| e.is_panic())
}

/// Waits for `task` until `deadline`; past it, aborts it. The tasks waited
/// for at shutdown are cancel-safe: a flush cut off leaves its batch in
/// flight, with its ids, for the final flush or the spill. `true` when it
/// panicked.
async fn join_by<T>(
    deadline: tokio::time::Instant,
    mut task: tokio::task::JoinHandle<T>,
    what: &str,
) -> bool {
    match tokio::time::timeout_at(deadline, &mut task).await {
        Ok(ended) => panicked(ended),
        Err(_) => {
            tracing::warn!(
                task = what,
                "still running at the shutdown deadline; cut off"
            );
            task.abort();
            panicked(task.await)
        }
    }
}

/// Connects, waiting up to `db_connect_timeout` for a database that does not
/// answer yet (still starting, its network or name not up: common when
/// containers start together). Each failed attempt is logged with its real
/// cause; a cause that waiting cannot cure (authentication, an unknown
/// database, a bad URL, a SQLite file that cannot be opened) ends at once.
async fn connect_waiting(settings: &Settings) -> Result<DatabaseConnection, Redacted> {
    let url = &settings.database_url;
    let deadline = tokio::time::Instant::now() + settings.db_connect_timeout;
    let mut delay = CONNECT_RETRY_FIRST;
    let mut attempt: u32 = 1;
    loop {
        // One plain connection first: the pool would report "pool timed
        // out" and hide why.
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let failure = match probe(url, left.clamp(Duration::from_millis(100), PROBE_TIMEOUT)).await
        {
            // It answers: what fails now (a read-only SQLite file, a pool
            // setting) is not cured by waiting.
            Ok(()) => {
                return connect(settings)
                    .await
                    .map_err(|e| with_hint(Redacted::new(&e, url), url));
            }
            Err(Probe::Failed(e)) if !may_pass(&e, url) => {
                return Err(with_hint(Redacted::new(&e, url), url));
            }
            Err(Probe::Failed(e)) => Redacted::new(&e, url),
            Err(Probe::Silent(within)) => Redacted(format!(
                "no answer from {} within {within:?}",
                crate::settings::redact_url(url)
            )),
        };
        let now = tokio::time::Instant::now();
        if now + delay > deadline {
            return Err(Redacted(format!(
                "{failure} (still failing after {attempt} attempts over {:?}, --db-connect-timeout)",
                settings.db_connect_timeout
            )));
        }
        tracing::warn!(
            attempt,
            retry_in_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
            error = %failure,
            url = %crate::settings::redact_url(url),
            "the database does not answer yet; retrying"
        );
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(CONNECT_RETRY_MAX);
        attempt += 1;
    }
}

/// The longest one attempt to reach the database may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// Why one attempt to reach the database failed.
enum Probe {
    /// The driver's own error.
    Failed(sea_orm::sqlx::Error),
    /// Connected (or not) but no answer within this.
    Silent(Duration),
}

/// One connection, opened and closed, within `within`.
async fn probe(url: &str, within: Duration) -> Result<(), Probe> {
    use sea_orm::sqlx::{ConnectOptions as _, Connection as _};
    let attempt = async {
        if url.starts_with("postgres") {
            let options: sea_orm::sqlx::postgres::PgConnectOptions = url.parse()?;
            options.connect().await?.close().await
        } else if url.starts_with("sqlite") {
            let options: sea_orm::sqlx::sqlite::SqliteConnectOptions = url.parse()?;
            options.connect().await?.close().await
        } else {
            // Another scheme: SeaORM's own connect says what is wrong with it.
            Ok(())
        }
    };
    match tokio::time::timeout(within, attempt).await {
        Ok(result) => result.map_err(Probe::Failed),
        Err(_) => Err(Probe::Silent(within)),
    }
}

/// Whether waiting may cure `error`: the server is unreachable, or says it
/// is starting up or shutting down (SQLSTATE class 57P), has no connection
/// slot free (53300, class 53: resources) or lost the connection (class 08).
fn may_pass(error: &sea_orm::sqlx::Error, url: &str) -> bool {
    use sea_orm::sqlx::Error;
    match error {
        Error::Io(_) | Error::PoolTimedOut => true,
        // SQLSTATEs are PostgreSQL's; SQLite's codes are other numbers.
        Error::Database(e) if url.starts_with("postgres") => e.code().is_some_and(|code| {
            ["57P", "53", "08"]
                .iter()
                .any(|class| code.starts_with(class))
        }),
        _ => false,
    }
}

/// Adds what to do for the usual first-run mistake: a SQLite file that does
/// not exist, opened without `mode=rwc`.
fn with_hint(error: Redacted, url: &str) -> Redacted {
    if url.starts_with("sqlite") && !url.contains("mode=") {
        let hint = "the file does not exist or cannot be opened; to create it, add ?mode=rwc \
                    (e.g. sqlite://increment.db?mode=rwc)";
        return Redacted(format!("{}: {hint}", error.0));
    }
    error
}

/// The connection of the `Idempotency-Key` look-up (see
/// [`crate::idempotency::Applied`], one query at a time). On PostgreSQL a
/// pool of its own, so a flush holding connections does not hold up
/// requests, with settings for its one statement: a generic
/// plan (no planning per group) and sequential scans off, so the plan cached
/// while `idempotency_keys` was small is still the primary key's index
/// scan when it has millions of rows. SQLite shares `db`.
///
/// Opened here when it can be, but lazily: the main pool has just
/// connected, and a look-up that cannot connect answers "unknown" (the
/// flush decides), which beats failing start-up on a passing refusal
/// (`max_connections` reached).
///
/// # Errors
/// The database URL cannot be used.
pub async fn connect_lookups(
    settings: &Settings,
    db: &DatabaseConnection,
) -> Result<DatabaseConnection, StartupError> {
    if db.get_database_backend() != sea_orm::DbBackend::Postgres {
        return Ok(db.clone());
    }
    let mut options = pool_options(settings, 1);
    options.map_sqlx_postgres_opts(|o| {
        o.options([
            ("plan_cache_mode", "force_generic_plan"),
            ("enable_seqscan", "off"),
        ])
    });
    options.connect_lazy(true);
    let lookups = Database::connect(options)
        .await
        .map_err(|e| StartupError::Connect {
            url: crate::settings::redact_url(&settings.database_url),
            source: Redacted::new(&e, &settings.database_url),
        })?;
    // Open it now when the database lets us, so the first look-ups do not
    // spend their 250 ms connecting.
    match tokio::time::timeout(LOOKUP_WARM_UP, lookups.ping()).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            tracing::warn!(error = %Redacted::new(&e, &settings.database_url), "the Idempotency-Key look-up connection could not open yet; look-ups answer \"unknown\" until it does")
        }
        Err(_) => tracing::warn!(
            "the Idempotency-Key look-up connection did not open within {LOOKUP_WARM_UP:?}; look-ups answer \"unknown\" until it does"
        ),
    }
    Ok(lookups)
}

/// How long start-up waits for the look-up connection before going on
/// without it.
const LOOKUP_WARM_UP: Duration = Duration::from_secs(2);

/// What every pool of the service shares: `max` connections, 5 s to connect
/// or to get one, no statement logging.
fn pool_options(settings: &Settings, max: u32) -> ConnectOptions {
    let mut options = ConnectOptions::new(settings.database_url.clone());
    options
        .max_connections(max)
        .min_connections(1)
        .connect_timeout(Duration::from_secs(5))
        .acquire_timeout(Duration::from_secs(5))
        // On by default at info: it would log every multi-thousand-row upsert.
        .sqlx_logging(false);
    options
}

/// How long PostgreSQL lets one of our sessions sit idle inside a
/// transaction before it ends the session (and its locks).
const IDLE_IN_TRANSACTION_TIMEOUT: &str = "30s";

async fn connect(settings: &Settings) -> Result<DatabaseConnection, DbErr> {
    let mut options = pool_options(settings, settings.db_pool_size);
    options
        // Statements are prepared once per connection and kept; after five
        // runs PostgreSQL may switch one to a generic plan, kept for the
        // connection's life. A plan made while `idempotency_keys` was empty
        // (a seq scan) stays one at millions of rows: the pruning of old
        // keys and the claim's rare read of held keys run here. Custom plans
        // follow the table. (The look-up has its own connection and plan:
        // `connect_lookups`.)
        .map_sqlx_postgres_opts(|o| {
            o.options([
                ("plan_cache_mode", "force_custom_plan"),
                // A flush whose connection goes silent (a partition, a frozen
                // peer: no reset) keeps its transaction and its row locks
                // until the server notices, by TCP keepalive about two hours
                // later; every other instance's flush of those keys waits
                // that long (found by review). No transaction of ours idles
                // for more than a paced statement's pause.
                (
                    "idle_in_transaction_session_timeout",
                    IDLE_IN_TRANSACTION_TIMEOUT,
                ),
            ])
        })
        .map_sqlx_sqlite_opts(|o| {
            // WAL lets /readyz and readers run beside a flush; FULL keeps
            // committed flushes durable.
            o.journal_mode(sea_orm::sqlx::sqlite::SqliteJournalMode::Wal)
                .synchronous(sea_orm::sqlx::sqlite::SqliteSynchronous::Full)
                .busy_timeout(Duration::from_secs(10))
        });
    Database::connect(options).await
}
