//! The write loop: every flush interval, drain the batcher and write the
//! deltas as one batch; on failure keep the batch and retry it with backoff.
//!
//! The flusher owns the batch *in flight*: handed over by the batcher, not
//! yet written. It is held (with its ids) until a write of it returns
//! success, and retried unchanged before anything newer is drained, because
//! after an error during COMMIT the batch may or may not have landed: only
//! the same ids let the store tell (see [`crate::batch`]). Newer deltas wait
//! in the batcher meanwhile, merging per key, so memory grows with the number
//! of distinct keys, not with the request count.
//!
//! One batch in flight at most, by construction: the in-flight slot sits
//! behind the lock that serialises flushes, and a drain runs in a blocking
//! task that owns that lock's guard until the drained batch is in the slot.
//! A flush cancelled mid-drain (a client giving up on `/admin/flush`, the
//! shutdown deadline) therefore cannot release the lock early: the next
//! flush, or the final accounting of what is unwritten, waits for the drain
//! and finds its batch.

use std::{
    collections::{BTreeMap, HashSet},
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use chrono::Utc;
use parking_lot::Mutex;
use rand::Rng;
use sea_orm::{DatabaseConnection, DbErr};
use tokio_util::sync::CancellationToken;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::{
    batch::Batch,
    batcher::Batcher,
    journal::Cursor,
    metrics::Metrics,
    store::{self, WriteOutcome},
    telemetry::SharedRecentRequests,
    telemetry::error_chain,
};

/// Longest wait between two attempts while the database fails.
pub const MAX_RETRY_BACKOFF: Duration = Duration::from_secs(30);

/// How long `flush_batches` rows are kept once settled (their writer knows
/// they committed, so no retry of them will come). A day, not less: a
/// counter read may still be asking whether its batch committed.
pub const BATCH_ID_RETENTION: Duration = Duration::from_secs(24 * 60 * 60);

/// How long `flush_batches` rows not known settled are kept: a retry of an
/// unanswered commit may come through an outage or from a spill replayed
/// days later. Settling is lost for an instance that was killed (its last
/// minute of rows) or whose marking failed; those rows are few. A batch
/// written again later than this after its first attempt cannot tell
/// whether that commit landed: the limit in docs/operations.md.
pub const UNSETTLED_BATCH_ID_RETENTION: Duration = Duration::from_secs(30 * 24 * 60 * 60);

/// How often old `flush_batches` rows are deleted.
const PRUNE_EVERY: Duration = Duration::from_secs(60 * 60);

/// How often this instance marks the rows of its committed batches settled.
const SETTLE_EVERY: Duration = Duration::from_secs(60);

/// Batch ids waiting to be marked settled, at most (while marking fails);
/// ids beyond it stay unsettled, which only keeps their rows longer.
const SETTLE_PENDING_MAX: usize = 100_000;

/// What one flush did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlushOutcome {
    /// Nothing was pending.
    Empty,
    /// Batches were committed (or found committed by an earlier attempt).
    Written {
        /// Distinct keys written, over all batches.
        keys: usize,
        /// 1, or 2 when a batch left by a failed attempt went first.
        batches: usize,
        /// Upsert statements executed.
        statements: usize,
    },
}

/// Why a flush failed. The batch is kept and retried; nothing is lost.
#[derive(Debug, thiserror::Error)]
pub enum FlushError {
    /// The database refused or lost the batch's transaction.
    #[error("writing batch {batch_id} ({keys} keys) failed")]
    Database {
        batch_id: String,
        keys: usize,
        #[source]
        source: DbErr,
    },
    /// The blocking drain task panicked (a bug).
    #[error("the drain task failed")]
    Drain(#[from] tokio::task::JoinError),
}

/// A counter as one instance sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CounterReading {
    /// In the database (0 if the row does not exist yet).
    pub stored: i64,
    /// Accepted here and not yet committed.
    pub pending: i128,
}

/// What the final flush at shutdown could not write.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Unwritten {
    pub keys: usize,
    pub total: i128,
    /// The deltas, as batches to spill and replay.
    pub batches: Vec<Arc<Batch>>,
}

/// Owns the write path. Share with an `Arc`.
pub struct Flusher {
    batcher: Arc<Batcher>,
    db: DatabaseConnection,
    metrics: Arc<Metrics>,
    /// Request spans the next flush span links to.
    recent_requests: SharedRecentRequests,
    interval: Duration,
    /// The highest drain number whose batch (and every earlier one) is
    /// committed; durable requests wait on it.
    committed: tokio::sync::watch::Sender<u64>,
    /// What the durable requests waiting on a committed drain must hear
    /// beyond "committed", for the few drains with something to say. Written
    /// before the drain is published as committed.
    notes: Mutex<Notes>,
    /// Wakes the loop for an early flush (a durable request is waiting).
    flush_soon: tokio::sync::Notify,
    /// Durable requests waiting now: while there are any, the write does
    /// not pace itself (a paced flush made them wait three times as long).
    /// With the journal on, a durable message read and not yet drained
    /// counts as one (see [`Self::request_durable_flush`]).
    durable_waiters: AtomicUsize,
    /// A durable message was read since the last drain.
    durable_read: std::sync::atomic::AtomicBool,
    /// The batch in flight, behind the lock that serialises flushes (the
    /// loop, `/admin/flush`, the final flush and tests all call `flush_once`).
    in_flight: Arc<tokio::sync::Mutex<Option<Arc<Batch>>>>,
    /// Held for writing while deltas move from the batcher into the
    /// unconfirmed batch, and for reading by counter reads, so a read never
    /// sees a delta in both places or in neither.
    drain_gate: Arc<tokio::sync::RwLock<()>>,
    last_prune: Mutex<Option<Instant>>,
    /// Ids of parts this instance knows committed, to be marked settled.
    settling: Mutex<Vec<String>>,
    last_settle: Mutex<Option<Instant>>,
    /// Parts of a large batch written at once, one connection each.
    write_connections: usize,
    /// With the journal on: which journal messages the batcher holds; each
    /// drain's batch is stamped with its span.
    journal: Option<Arc<Cursor>>,
    /// Flushes failed in a row (0: the last one succeeded); while above 0,
    /// the failed batch waits in flight for a retry.
    failures: std::sync::atomic::AtomicU32,
    /// Why the database could not be reached, as last logged during this
    /// run of failures: each new reason is logged once.
    unreachable_because: Mutex<Option<String>>,
    /// How long an applied `Idempotency-Key` keeps a repeat out.
    idempotency_window: Duration,
    /// An idempotency-key pruning task is running.
    pruning_keys: Arc<std::sync::atomic::AtomicBool>,
    /// When that pruning last started (every 1/24 of the window, 1 s to 1 h).
    last_key_prune: Mutex<Option<Instant>>,
}

/// Why PostgreSQL cannot be reached, from one connection opened outside the
/// pool: the pool retries a failing connect until its acquire timeout and
/// then says only "timed out", which cannot tell a server that is down from
/// a pool that is exhausted. `None` when that connection opens (the trouble
/// is elsewhere), and on SQLite.
async fn unreachable_because(db: &DatabaseConnection) -> Option<String> {
    use sea_orm::sqlx::Connection as _;
    if db.get_database_backend() != sea_orm::DbBackend::Postgres {
        return None;
    }
    let options = db.get_postgres_connection_pool().connect_options();
    let connect = sea_orm::sqlx::PgConnection::connect_with(&options);
    match tokio::time::timeout(UNREACHABLE_CONNECT_TIMEOUT, connect).await {
        Ok(Ok(connection)) => {
            let _ = connection.close().await;
            None
        }
        Ok(Err(e)) => Some(error_chain(&e)),
        Err(_) => Some(format!(
            "no answer to a connection attempt within {UNREACHABLE_CONNECT_TIMEOUT:?}"
        )),
    }
}

/// How long [`unreachable_because`] waits for its connection: short, since
/// the next probe (and so the recovery) waits for it, once per failed flush.
const UNREACHABLE_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// The flush lock's guard, over the batch in flight.
type InFlightGuard = tokio::sync::OwnedMutexGuard<Option<Arc<Batch>>>;

/// Drains whose notes are kept for their waiters. A waiter reads them as
/// soon as its drain is published, so a few would do; notes are rare, and
/// each holds only the rejected keys.
const NOTED_DRAINS_KEPT: usize = 256;

/// The notes of recent drains, by drain number; the oldest are dropped past
/// [`NOTED_DRAINS_KEPT`].
#[derive(Debug, Default)]
struct Notes {
    drains: BTreeMap<u64, DrainNotes>,
    /// The newest drain whose notes were dropped: a waiter on it or an
    /// older one cannot tell "no notes" from "notes forgotten".
    dropped_through: u64,
}

/// What a committed drain's waiters must hear beyond "committed".
#[derive(Debug, Default)]
struct DrainNotes {
    /// Keys whose rows were recorded as rejected (the stored total would
    /// have left `bigint`).
    rejected: HashSet<String>,
    /// Which rows were rejected could not be read: no waiter of the drain
    /// can be told "written".
    rejections_unknown: bool,
    /// Keyed requests were left out as repeats of a key applied earlier (or
    /// an earlier attempt committed the batch, so it cannot be told): a
    /// keyed waiter may be one of them, and asks what its key applied.
    repeats_left_out: bool,
}

/// Counts a durable request as waiting for as long as it lives (a request
/// whose client went away is dropped mid-wait).
struct Waiting<'a>(&'a AtomicUsize);

impl<'a> Waiting<'a> {
    fn on(waiters: &'a AtomicUsize) -> Self {
        waiters.fetch_add(1, Ordering::Relaxed);
        Self(waiters)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// How a durable request's wait ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WaitOutcome {
    /// Its drain committed and its key's row was applied.
    Committed,
    /// Its drain committed, but its key's row was not applied: the stored
    /// total would have left `bigint` (see `rejected_increments`).
    Rejected,
    /// Not committed within the timeout; still held, to be written.
    TimedOut,
    /// Its drain (or journal message) committed, but which of its rows were
    /// rejected could not be read in time: its row was written or rejected,
    /// and nothing more is held for it. Only waiters without a key get it
    /// (a keyed one asks its key).
    CommittedUnread,
    /// A request applied under its `Idempotency-Key` (earlier, or by its
    /// drain): whether its row was written or rejected could not be read
    /// within the timeout. Nothing is held for it.
    Unsettled,
    /// Its drain committed, but whether this keyed request's body was
    /// written must be read from the row under its key: the drain left out
    /// repeats of keys applied earlier (it may be one), its rejected rows
    /// could not be read, or its notes are no longer kept. Only keyed
    /// waiters get it.
    CommittedAskKey,
    /// A keyed request left out because its key had been applied with
    /// another body: nothing of it was applied.
    Reused,
    /// Shutdown began while it waited, and the HTTP drain is about to close
    /// its connection: it is answered as taken and held (the final flush or
    /// the spill writes it).
    ShuttingDown,
    /// A keyed request whose key's row was gone when it asked (its window
    /// passed during the wait): what it applied cannot be told. Nothing is
    /// held for it.
    KeyExpired,
}

/// How long a counter read may hold drains off (see
/// [`Flusher::read_counter`]): a point read by primary key, far past what a
/// healthy database takes.
const COUNTER_READ_TIMEOUT: Duration = Duration::from_secs(3);

/// How long a committed batch's rejected keys may take to read back. The
/// flush holds its batch in flight meanwhile (the next one waits), and so do
/// its `wait=true` requests, which would otherwise outlast their own timeout
/// and hear "held", though the batch committed.
const NOTES_READ_TIMEOUT: Duration = Duration::from_secs(1);

/// Idempotency keys deleted per statement when pruning: short statements,
/// each its own transaction, between which flushes go on.
const PRUNE_KEYS_PER_STATEMENT: u64 = 1_000;

/// Parts of a batch written at once unless set otherwise. A flush of 1M keys
/// on 2 cores took 7.9 s on one connection, 5.3 s on two, 4.5 s on four.
pub const DEFAULT_WRITE_CONNECTIONS: usize = 4;

impl Flusher {
    pub fn new(
        batcher: Arc<Batcher>,
        db: DatabaseConnection,
        metrics: Arc<Metrics>,
        recent_requests: SharedRecentRequests,
        interval: Duration,
    ) -> Self {
        Self {
            batcher,
            db,
            metrics,
            recent_requests,
            interval,
            committed: tokio::sync::watch::Sender::new(0),
            notes: Mutex::default(),
            flush_soon: tokio::sync::Notify::new(),
            durable_waiters: AtomicUsize::new(0),
            durable_read: std::sync::atomic::AtomicBool::new(false),
            in_flight: Arc::default(),
            drain_gate: Arc::default(),
            last_prune: Mutex::new(None),
            settling: Mutex::default(),
            last_settle: Mutex::new(None),
            write_connections: DEFAULT_WRITE_CONNECTIONS,
            journal: None,
            failures: std::sync::atomic::AtomicU32::new(0),
            unreachable_because: Mutex::new(None),
            idempotency_window: store::DEFAULT_IDEMPOTENCY_WINDOW,
            pruning_keys: Arc::default(),
            last_key_prune: Mutex::new(None),
        }
    }

    /// Remembers applied `Idempotency-Key`s for `window`.
    #[must_use]
    pub fn with_idempotency_window(mut self, window: Duration) -> Self {
        self.idempotency_window = window;
        self
    }

    /// Writes journal messages read through `cursor` (the journal mode).
    #[must_use]
    pub fn with_journal(mut self, cursor: Arc<Cursor>) -> Self {
        self.journal = Some(cursor);
        self
    }

    /// Whether the last flush failed (its batch waits for a retry). The
    /// journal reader stops reading meanwhile: the journal, not memory,
    /// holds the backlog while the database is away.
    pub fn is_stalled(&self) -> bool {
        self.failures.load(std::sync::atomic::Ordering::Relaxed) > 0
    }

    /// Asks the loop for an early flush.
    pub fn request_flush(&self) {
        self.flush_soon.notify_one();
    }

    /// Asks the loop for an early flush, unpaced, because a durable message
    /// was recorded into the batcher: its request waits on this instance or
    /// on another one, where `wait_committed` cannot count it. The message
    /// counts as a waiter from now until the write of the next drain (which
    /// holds it, or an earlier drain did) ends.
    pub fn request_durable_flush(&self) {
        self.durable_waiters.fetch_add(1, Ordering::Relaxed);
        if self.durable_read.swap(true, Ordering::Relaxed) {
            // Counted already, by a message not yet drained.
            self.durable_waiters.fetch_sub(1, Ordering::Relaxed);
        }
        self.flush_soon.notify_one();
    }

    /// Drops the batch in flight and everything pending, because they hold
    /// journal messages that another writer applies (or may): the journal
    /// keeps them, and the next reading starts from the stored offset.
    pub async fn abandon_journal(&self) {
        let mut in_flight = Arc::clone(&self.in_flight).lock_owned().await;
        self.abandon_holding(&mut in_flight).await;
    }

    async fn abandon_holding(&self, in_flight: &mut InFlightGuard) {
        let Some(cursor) = self.journal.clone() else {
            return;
        };
        if let Some(batch) = in_flight.take() {
            self.batcher.release(&batch);
        }
        let batcher = Arc::clone(&self.batcher);
        let gate = Arc::clone(&self.drain_gate);
        if let Err(e) = tokio::task::spawn_blocking(move || {
            let _no_reads = gate.blocking_write();
            cursor.abandon(&batcher);
        })
        .await
        {
            tracing::error!(error = %error_chain(&e), "dropping the abandoned journal reading failed");
        }
    }

    /// Writes up to `connections` parts of a large batch at once
    /// ([`store::write_batch`] takes 0 as 1).
    #[must_use]
    pub fn with_write_connections(mut self, connections: usize) -> Self {
        self.write_connections = connections;
        self
    }

    /// One flush: first the batch left by a failed attempt, if any, then
    /// everything pending now.
    ///
    /// # Errors
    /// [`FlushError`] when a write fails; the batch stays in flight and the
    /// next call retries it.
    ///
    /// # Cancel safety
    /// Cancel safe: the drain stores its batch in flight from its own blocking
    /// task, holding the flush lock until it has (see the module doc); a
    /// write cut short leaves its batch in flight. The next call retries it.
    #[tracing::instrument(name = "flush", skip_all, fields(keys = tracing::field::Empty, chunks = tracing::field::Empty, outcome = tracing::field::Empty))]
    pub async fn flush_once(&self) -> Result<FlushOutcome, FlushError> {
        let in_flight = Arc::clone(&self.in_flight).lock_owned().await;
        let started = Instant::now();
        let result = self.flush_serialised(in_flight).await;
        let metrics = &self.metrics;
        match &result {
            Ok(FlushOutcome::Empty) => metrics.last_flush_success_timestamp_seconds.set(unix_now()),
            Ok(FlushOutcome::Written { keys, .. }) => {
                metrics
                    .flush_duration_seconds
                    .observe(started.elapsed().as_secs_f64());
                metrics.flush_keys.observe(*keys as f64);
                metrics.flushed_keys_total.inc_by(*keys as u64);
                metrics.last_flush_success_timestamp_seconds.set(unix_now());
            }
            Err(e) => {
                metrics
                    .flush_duration_seconds
                    .observe(started.elapsed().as_secs_f64());
                metrics.flush_failures_total.inc();
                tracing::Span::current().record("outcome", "failed");
                // Logged here, inside the flush span, so that the line carries
                // its trace id (whoever called: the loop, `/admin/flush`, the
                // final flush).
                let failures = self
                    .failures
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
                    .saturating_add(1);
                tracing::warn!(error = %error_chain(e), failures, "flush failed; the batch is kept and retried");
            }
        }
        if result.is_ok() {
            let failures = self.failures.swap(0, std::sync::atomic::Ordering::Relaxed);
            *self.unreachable_because.lock() = None;
            if failures > 0 {
                tracing::info!(failures, "flush succeeded again");
            }
        }
        result
    }

    /// The flush itself, given the flush lock's guard over the batch in flight.
    async fn flush_serialised(
        &self,
        mut in_flight: InFlightGuard,
    ) -> Result<FlushOutcome, FlushError> {
        let mut keys = 0;
        let mut batches = 0;
        let mut statements = 0;

        // The batch drained earlier whose write failed goes first, unchanged.
        if let Some(batch) = in_flight.as_ref().map(Arc::clone) {
            statements += self.write(&mut in_flight, &batch).await?;
            keys += batch.len();
            batches += 1;
        }

        let span = tracing::Span::current();
        for request in self.recent_requests.take() {
            span.add_link(request);
        }
        let (mut in_flight, number) = self.drain_into(in_flight).await?;
        // A durable message read before this drain is in it (or was in an
        // earlier one); its count lasts until this write ends.
        let _durable_read = self
            .durable_read
            .swap(false, Ordering::Relaxed)
            .then(|| Waiting(&self.durable_waiters));
        match in_flight.as_ref().map(Arc::clone) {
            Some(batch) => {
                statements += self.write(&mut in_flight, &batch).await?;
                keys += batch.len();
                batches += 1;
            }
            // Nothing in this drain, nothing before it unwritten.
            None => self.publish_committed(number),
        }

        span.record("keys", keys as i64);
        span.record("chunks", statements as i64);
        if batches == 0 {
            span.record("outcome", "empty");
            return Ok(FlushOutcome::Empty);
        }
        span.record("outcome", "written");
        tracing::debug!(keys, batches, statements, "flushed");
        self.prune_if_due().await;
        Ok(FlushOutcome::Written {
            keys,
            batches,
            statements,
        })
    }

    /// `key`'s stored value and what is pending for it on this instance, read
    /// consistently: a delta in a batch being committed counts once, on
    /// whichever side the database shows it. `None` when the key was never
    /// stored and nothing is pending.
    ///
    /// # Errors
    /// The database read failed.
    pub async fn read_counter(&self, key: &str) -> Result<Option<CounterReading>, DbErr> {
        // Blocks drains (not writers) for the duration of one point read.
        let _gate = self.drain_gate.read().await;
        let live = self.batcher.pending_for(key);
        // The part holding the key commits on its own: ask about that one.
        let in_flight = self.batcher.handed_over().and_then(|batch| {
            batch
                .part_for(key)
                .map(|(part, delta)| (part.id.clone(), delta))
        });
        let batch_id = in_flight.as_ref().map(|(id, _)| id.as_str());
        // Bounded: a database that stopped answering (a peer gone without a
        // reset) would otherwise hold the gate, and every drain, for good.
        let read = store::read_counter(&self.db, key, batch_id);
        let (stored, batch_committed) = tokio::time::timeout(COUNTER_READ_TIMEOUT, read)
            .await
            .map_err(|_| {
            DbErr::Custom(format!(
                "the database did not answer a counter read within {COUNTER_READ_TIMEOUT:?}"
            ))
        })??;
        let in_flight = in_flight
            .filter(|_| !batch_committed)
            .map(|(_, delta)| delta);
        let pending = match (live, in_flight) {
            (None, None) => None,
            (live, in_flight) => Some(live.unwrap_or(0) + in_flight.unwrap_or(0)),
        };
        if stored.is_none() && pending.is_none() {
            return Ok(None);
        }
        let pending = pending.unwrap_or(0);
        Ok(Some(CounterReading {
            stored: stored.unwrap_or(0),
            pending,
        }))
    }

    /// Drains the batcher into the empty in-flight slot, in a blocking task
    /// that owns the slot's guard until the batch is stored there: cancelling
    /// this future cannot separate a drained batch from the slot. Readers are
    /// held off meanwhile, so none sees a delta in both places or in neither.
    async fn drain_into(
        &self,
        mut in_flight: InFlightGuard,
    ) -> Result<(InFlightGuard, u64), FlushError> {
        debug_assert!(
            in_flight.is_none(),
            "a drain never replaces a batch in flight"
        );
        let batcher = Arc::clone(&self.batcher);
        let gate = Arc::clone(&self.drain_gate);
        let journal = self.journal.clone();
        Ok(tokio::task::spawn_blocking(move || {
            let _no_reads = gate.blocking_write();
            let (batch, number) = match &journal {
                Some(cursor) => cursor.hand_over(&batcher),
                None => batcher.hand_over(),
            };
            *in_flight = batch;
            (in_flight, number)
        })
        .await?)
    }

    /// Writes `batch` (the one in flight) and, on success, empties the slot,
    /// releases the batch and publishes its drain as committed. Returns the
    /// statement count.
    async fn write(
        &self,
        in_flight: &mut InFlightGuard,
        batch: &Arc<Batch>,
    ) -> Result<usize, FlushError> {
        let outcome = store::write_batch_keyed(
            &self.db,
            batch,
            Utc::now(),
            self.write_connections,
            self.idempotency_window,
            &self.durable_waiters,
        )
        .await
        .map_err(|source| FlushError::Database {
            batch_id: batch.id.clone(),
            keys: batch.len(),
            source,
        })?;
        let (maybe_rejected, repeats_left_out) = match outcome {
            // Parts committed by an earlier attempt are not in the counts.
            WriteOutcome::Committed {
                rejected,
                repeats,
                resumed,
                ..
            } => (
                rejected > 0 || resumed,
                repeats > 0 || (resumed && !batch.keyed.is_empty()),
            ),
            // Committed by an earlier attempt, whose answers were lost.
            WriteOutcome::AlreadyCommitted => (true, !batch.keyed.is_empty()),
            WriteOutcome::JournalMoved => {
                self.metrics.journal_conflicts_total.inc();
                self.abandon_holding(in_flight).await;
                return Ok(0);
            }
        };
        if maybe_rejected || repeats_left_out {
            self.take_notes(batch, maybe_rejected, repeats_left_out)
                .await;
        }
        **in_flight = None;
        self.note_settled(batch);
        self.batcher.release(batch);
        self.publish_committed(batch.drain);
        if let (Some(cursor), Some(span)) = (&self.journal, &batch.journal) {
            // Before `note_applied`: a waiter woken by it must find out.
            if maybe_rejected {
                cursor.note_rejected(span.through);
            }
            cursor.note_applied(span.through);
        }
        match outcome {
            WriteOutcome::Committed {
                statements,
                rejected,
                repeats,
                reused,
                ..
            } => {
                self.metrics.rejected_rows_total.inc_by(rejected as u64);
                self.metrics
                    .idempotency_repeats_total
                    .with_label_values(&["database"])
                    .inc_by((repeats - reused) as u64);
                self.metrics
                    .idempotency_reused_total
                    .with_label_values(&["database"])
                    .inc_by(reused as u64);
                Ok(statements)
            }
            WriteOutcome::AlreadyCommitted => {
                tracing::info!(batch.id = %batch.id, "batch had committed in an earlier attempt; not written again");
                Ok(0)
            }
            WriteOutcome::JournalMoved => Ok(0),
        }
    }

    /// Notes for the waiters of the committed `batch`: which of its keys were
    /// rejected (read back when `maybe_rejected`), and whether it left out
    /// repeats. Reading may fail or hang (the database just went away): the
    /// waiters then hear that the batch committed but their row's fate is
    /// unknown, not "written" (nor "held", after a wait that outlasted it).
    async fn take_notes(&self, batch: &Batch, maybe_rejected: bool, repeats_left_out: bool) {
        let mut notes = DrainNotes {
            repeats_left_out,
            ..DrainNotes::default()
        };
        if maybe_rejected {
            let read = store::rejected_keys(&self.db, batch);
            match tokio::time::timeout(NOTES_READ_TIMEOUT, read).await {
                Ok(Ok(keys)) => notes.rejected = keys,
                Ok(Err(e)) => {
                    tracing::warn!(error = %error_chain(&e), batch.id = %batch.id, "reading the rejected keys of a committed batch failed");
                    notes.rejections_unknown = true;
                }
                Err(_) => {
                    tracing::warn!(batch.id = %batch.id, timeout = ?NOTES_READ_TIMEOUT, "reading the rejected keys of a committed batch took too long");
                    notes.rejections_unknown = true;
                }
            }
        }
        if notes.rejected.is_empty() && !notes.rejections_unknown && !notes.repeats_left_out {
            return;
        }
        let mut noted = self.notes.lock();
        noted.drains.insert(batch.drain, notes);
        while noted.drains.len() > NOTED_DRAINS_KEPT {
            if let Some((drain, _)) = noted.drains.pop_first() {
                noted.dropped_through = drain;
            }
        }
    }

    fn publish_committed(&self, drain: u64) {
        self.committed.send_if_modified(|committed| {
            let advanced = drain > *committed;
            if advanced {
                *committed = drain;
            }
            advanced
        });
    }

    /// Waits until the drain numbered `ticket` (see
    /// [`Batcher::record_durable`]) is committed, asking the loop for an early
    /// flush, and tells whether `key`'s row was applied by it. A `keyed`
    /// waiter may hear [`WaitOutcome::CommittedAskKey`] instead.
    pub async fn wait_committed(
        &self,
        ticket: u64,
        key: &str,
        keyed: bool,
        timeout: Duration,
    ) -> WaitOutcome {
        let mut committed = self.committed.subscribe();
        let _waiting = Waiting::on(&self.durable_waiters);
        self.flush_soon.notify_one();
        let reached = tokio::time::timeout(timeout, committed.wait_for(|c| *c >= ticket))
            .await
            .is_ok_and(|r| r.is_ok());
        if !reached {
            return WaitOutcome::TimedOut;
        }
        let noted = self.notes.lock();
        match noted.drains.get(&ticket) {
            // A keyed waiter reads its own fate (which settles a rejection
            // too), so neither a rejected-keys read that failed nor a note
            // dropped long ago leaves it with a wrong answer. Its drain may
            // be old: the memory of recent keys gives a repeat the first
            // request's ticket for up to a window.
            Some(notes) if keyed && (notes.repeats_left_out || notes.rejections_unknown) => {
                WaitOutcome::CommittedAskKey
            }
            None if keyed && ticket <= noted.dropped_through => WaitOutcome::CommittedAskKey,
            None => WaitOutcome::Committed,
            Some(notes) if notes.rejections_unknown => WaitOutcome::CommittedUnread,
            Some(notes) if notes.rejected.contains(key) => WaitOutcome::Rejected,
            Some(_) => WaitOutcome::Committed,
        }
    }

    /// Remembers that every part of `batch` committed: no retry of them
    /// will come, so their `flush_batches` rows need not outlive a day.
    fn note_settled(&self, batch: &Batch) {
        let mut settling = self.settling.lock();
        if settling.len() + batch.parts.len() <= SETTLE_PENDING_MAX {
            settling.extend(batch.parts.iter().map(|part| part.id.clone()));
        }
    }

    /// Marks the rows of the parts noted by [`Self::note_settled`] settled;
    /// on failure they are kept for the next try.
    async fn settle(&self) {
        let ids = std::mem::take(&mut *self.settling.lock());
        if ids.is_empty() {
            return;
        }
        if let Err(e) = store::settle_batches(&self.db, &ids).await {
            tracing::warn!(error = %error_chain(&e), batches = ids.len(), "marking committed batches settled failed; will retry");
            let mut settling = self.settling.lock();
            let room = SETTLE_PENDING_MAX.saturating_sub(settling.len());
            settling.extend(ids.into_iter().take(room));
        }
    }

    async fn prune_if_due(&self) {
        if due(&self.last_settle, SETTLE_EVERY) {
            self.settle().await;
        }
        let keys_every = (self.idempotency_window / 24).clamp(Duration::from_secs(1), PRUNE_EVERY);
        if due(&self.last_key_prune, keys_every) {
            self.prune_idempotency_keys();
        }
        if !due(&self.last_prune, PRUNE_EVERY) {
            return;
        }
        let now = Utc::now();
        let pruned = store::prune_batches(
            &self.db,
            now - BATCH_ID_RETENTION,
            now - UNSETTLED_BATCH_ID_RETENTION,
        );
        if let Err(e) = pruned.await {
            tracing::warn!(error = %error_chain(&e), "pruning old flush batch ids failed; will retry");
            *self.last_prune.lock() = None;
        }
    }

    /// Deletes `Idempotency-Key`s older than the window and the time they are
    /// kept past it ([`store::kept_past_window`]) in its own task, a bounded
    /// statement at a time, so it never holds up a flush.
    fn prune_idempotency_keys(&self) {
        use std::sync::atomic::Ordering;
        if self.pruning_keys.swap(true, Ordering::AcqRel) {
            return;
        }
        let db = self.db.clone();
        let metrics = Arc::clone(&self.metrics);
        let running = Arc::clone(&self.pruning_keys);
        let kept = self
            .idempotency_window
            .saturating_add(store::kept_past_window(self.idempotency_window));
        let kept = chrono::Duration::from_std(kept).unwrap_or(chrono::Duration::MAX);
        tokio::spawn(async move {
            loop {
                let before = Utc::now()
                    .checked_sub_signed(kept)
                    .unwrap_or(chrono::DateTime::<Utc>::MIN_UTC);
                match store::prune_idempotency_keys(&db, before, PRUNE_KEYS_PER_STATEMENT).await {
                    Ok(deleted) => {
                        metrics.idempotency_keys_pruned_total.inc_by(deleted);
                        if deleted < PRUNE_KEYS_PER_STATEMENT {
                            break;
                        }
                        tokio::task::yield_now().await;
                    }
                    Err(e) => {
                        tracing::warn!(error = %error_chain(&e), "pruning old idempotency keys failed; will retry");
                        break;
                    }
                }
            }
            running.store(false, Ordering::Release);
        });
    }

    /// Flushes every `interval` until `stop` is cancelled; after a failure,
    /// waits with capped exponential backoff and jitter instead.
    ///
    /// A flush that has started is not cancelled by `stop`: it runs to its
    /// end, unless the shutdown deadline comes first and the task is cut off
    /// (`startup`; a flush is cancel-safe).
    pub async fn run_until_stopped(self: Arc<Self>, stop: CancellationToken) {
        let mut failures: u32 = 0;
        loop {
            let delay = if failures == 0 {
                self.interval
            } else {
                retry_backoff(self.interval, failures)
            };
            if failures == 0 {
                // A durable request may ask for an early flush.
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(delay) => {}
                    () = self.flush_soon.notified() => {}
                }
            } else if !self.wait_for_retry(delay, &stop).await {
                return;
            }
            // `flush_once` logs the failure and the recovery, in its span.
            match self.flush_once().await {
                Ok(_) => failures = 0,
                Err(_) => failures = failures.saturating_add(1),
            }
        }
    }

    /// Waits out a retry backoff, cut short when a cheap probe finds the
    /// database answering again (so recovery takes about one interval, not
    /// one backoff). `false` when `stop` was cancelled.
    async fn wait_for_retry(&self, backoff: Duration, stop: &CancellationToken) -> bool {
        let deadline = tokio::time::Instant::now() + backoff;
        let probe_every = self.interval.max(Duration::from_millis(100));
        // Asked once per wait (once per failed flush), not at every probe.
        let mut asked_why = false;
        loop {
            let wake = deadline.min(tokio::time::Instant::now() + probe_every);
            tokio::select! {
                () = stop.cancelled() => return false,
                () = tokio::time::sleep_until(wake) => {}
            }
            if tokio::time::Instant::now() >= deadline {
                return true;
            }
            // A probe that hangs (a peer gone without a reset) must not keep
            // a shutdown waiting.
            let answered = tokio::select! {
                () = stop.cancelled() => return false,
                answered = self.db.ping() => answered.is_ok(),
            };
            if answered {
                *self.unreachable_because.lock() = None;
                tracing::info!("the database answers again; retrying the flush now");
                return true;
            }
            if asked_why {
                continue;
            }
            asked_why = true;
            let reason = tokio::select! {
                () = stop.cancelled() => return false,
                reason = unreachable_because(&self.db) => reason,
            };
            if let Some(reason) = reason {
                let mut logged = self.unreachable_because.lock();
                if logged.as_deref() != Some(reason.as_str()) {
                    tracing::warn!(reason = %reason, "the database cannot be reached");
                    *logged = Some(reason);
                }
            }
        }
    }

    /// The last flush at shutdown: moves every slot out of the cache, then
    /// retries until everything is written or `deadline` passes.
    ///
    /// Call only once no request can record any more.
    ///
    /// # Errors
    /// [`Unwritten`]: what is still in memory at the deadline.
    pub async fn flush_remaining(&self, deadline: tokio::time::Instant) -> Result<(), Unwritten> {
        let batcher = Arc::clone(&self.batcher);
        if tokio::task::spawn_blocking(move || batcher.seal_all())
            .await
            .is_err_and(|e| e.is_panic())
        {
            tracing::error!("sealing the cache at shutdown panicked");
        }
        let mut failures: u32 = 0;
        loop {
            match tokio::time::timeout_at(deadline, self.flush_once()).await {
                Ok(Ok(FlushOutcome::Empty)) => {
                    // Best effort: rows left unsettled are only kept longer.
                    let _ = tokio::time::timeout_at(deadline, self.settle()).await;
                    return Ok(());
                }
                Ok(Ok(FlushOutcome::Written { .. })) => failures = 0,
                // Logged by `flush_once`, in its span.
                Ok(Err(_)) => {
                    failures = failures.saturating_add(1);
                    let wake = tokio::time::Instant::now() + retry_backoff(self.interval, failures);
                    if wake >= deadline {
                        break;
                    }
                    tokio::time::sleep_until(wake).await;
                }
                Err(_elapsed) => break,
            }
        }
        Err(self.unwritten().await)
    }

    /// Everything not written, as batches: the one in flight (keeping its
    /// ids: it may have committed) and a new one with what is still pending.
    /// Takes the flush lock, so a drain cut off by the deadline is waited for
    /// and its batch counted.
    async fn unwritten(&self) -> Unwritten {
        let mut in_flight = Arc::clone(&self.in_flight).lock_owned().await;
        let mut batches: Vec<Arc<Batch>> = in_flight.take().into_iter().collect();
        match self.drain_into(in_flight).await {
            Ok((mut in_flight, _)) => batches.extend(in_flight.take()),
            Err(e) => {
                tracing::error!(error = %error_chain(&e), "the last drain at shutdown failed")
            }
        }
        Unwritten {
            keys: batches.iter().map(|b| b.len()).sum(),
            total: batches.iter().map(|b| b.total()).sum(),
            batches,
        }
    }
}

/// Whether `every` has passed since `last` (or it never ran); if so, `last`
/// becomes now.
fn due(last: &Mutex<Option<Instant>>, every: Duration) -> bool {
    let mut last = last.lock();
    let due = last.is_none_or(|at| at.elapsed() >= every);
    if due {
        *last = Some(Instant::now());
    }
    due
}

fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// Delay before retry number `failures` (≥ 1): the interval doubled per
/// failure, capped at [`MAX_RETRY_BACKOFF`], with "equal jitter" (a random
/// point in the upper half) so instances that failed together do not retry in
/// lockstep.
pub fn retry_backoff(interval: Duration, failures: u32) -> Duration {
    let base = interval.max(Duration::from_millis(100));
    let exp = base
        .saturating_mul(1u32 << failures.saturating_sub(1).min(16))
        .min(MAX_RETRY_BACKOFF);
    let half = exp / 2;
    half + rand::rng().random_range(Duration::ZERO..=half)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A committed drain whose rejected rows could not be read: its waiter
    /// must not hear "still held, will be written" (nothing is held any
    /// more, and its row may have been rejected), nor "written".
    #[tokio::test]
    async fn a_waiter_whose_rejected_rows_could_not_be_read_hears_so() {
        let db = sea_orm::Database::connect("sqlite::memory:")
            .await
            .expect("an in-memory database");
        let batcher = Arc::new(Batcher::new(
            std::num::NonZeroU64::new(100).expect("non-zero"),
            Duration::from_secs(60),
        ));
        let flusher = Flusher::new(
            batcher,
            db,
            Arc::new(Metrics::new()),
            Arc::default(),
            Duration::from_secs(3600),
        );
        flusher.notes.lock().drains.insert(
            1,
            DrainNotes {
                rejections_unknown: true,
                ..DrainNotes::default()
            },
        );
        flusher.committed.send_replace(1);
        let plain = flusher
            .wait_committed(1, "k", false, Duration::from_secs(5))
            .await;
        assert_eq!(plain, WaitOutcome::CommittedUnread);
        let keyed = flusher
            .wait_committed(1, "k", true, Duration::from_secs(5))
            .await;
        assert_eq!(keyed, WaitOutcome::CommittedAskKey);
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        let interval = Duration::from_secs(1);
        let first = retry_backoff(interval, 1);
        assert!(first >= Duration::from_millis(500) && first <= interval);
        let fourth = retry_backoff(interval, 4);
        assert!(fourth >= Duration::from_secs(4) && fourth <= Duration::from_secs(8));
        for failures in [10, 100, u32::MAX] {
            let capped = retry_backoff(interval, failures);
            assert!(capped >= MAX_RETRY_BACKOFF / 2 && capped <= MAX_RETRY_BACKOFF);
        }
    }
}
