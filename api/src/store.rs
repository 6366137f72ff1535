//! The SQL: one idempotent transaction per batch.
//!
//! A batch is written as `INSERT … ON CONFLICT (key) DO UPDATE SET value =
//! counters.value + EXCLUDED.value`, in chunks that stay under each backend's
//! bind-parameter limit, keys in sorted order (instances flushing overlapping
//! keys lock rows in the same order, so they cannot deadlock). The batch id is
//! inserted into `flush_batches` in the same transaction: if that id is already
//! there, an earlier attempt committed (its answer was lost) and nothing is
//! written again.

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};

use chrono::{DateTime, SubsecRound, Utc};
use entity::{counters, flush_batches, idempotency_keys, journal_offsets, rejected_increments};

use crate::batch::{Batch, JournalSpan, Keyed};
use sea_orm::{
    ColumnTrait, ConnectionTrait, DatabaseConnection, DbBackend, DbErr, EntityTrait, QueryFilter,
    QueryOrder, QuerySelect, Statement, TransactionTrait,
    sea_query::{Expr, ExprTrait, OnConflict, Query},
};

/// PostgreSQL: rows per `unnest` statement. Not bind-limited (always 3 binds);
/// chosen so one statement stays well under a second on a small machine.
pub const POSTGRES_ROWS_PER_STATEMENT: usize = 10_000;

/// PostgreSQL, a usual flush (up to [`PACED_MAX_KEYS`]; a small one in
/// [`POSTGRES_PACED_SHORT_ROWS`]): statements of this many rows, each
/// followed, for the first [`PACED_FOR`] of a part, by a pause as long as
/// it took; the parts one after another. Where the database
/// shares the service's cores (the embedded stack, a small host), an upsert
/// of tens of thousands of rows is a burst of CPU that delays the requests
/// behind it. Pacing only a part's first 400 ms, and only batches of one
/// part, left a burst at full size after it, and none at all for a flush
/// just over one part (two parts at once on two connections): PostgreSQL at
/// 85–100 % of a core for 200–300 ms, the requests' p99 at half the maximum
/// rate over 100k uniform keys 23 ms against 10 ms now (medians of 8
/// rounds; `bench/PROFILE.md`).
/// Larger batches are a backlog and go at full size, on several
/// connections. The cost: the paced transaction holds its row locks longer.
/// A durable request (`wait=true`) waiting on the flush ends the pacing (see
/// [`write_batch_keyed`]): paced, `wait=true` under 35,000 req/s over 100k
/// uniform keys on two cores took 1.8–2.3 s instead of 0.5–0.7 s; with the
/// pacing ended 0.03–0.35 s (`bench/PROFILE.md`).
pub const POSTGRES_PACED_ROWS: usize = 2_000;

/// PostgreSQL: rows per paced statement of a flush of at most
/// [`PACED_SHORT_MAX_KEYS`] keys. A small flush (zipf keys at half the
/// maximum rate: about 11,000 keys a second) written in 250-row statements
/// holds a core about a millisecond at a time, not ten, and still ends well
/// inside its interval: the requests' p99 over zipf keys at 35,000 req/s
/// fell from 4.7 to 3.7 ms and from 4.9 to 3.0 ms (medians of two runs of
/// 8 rounds; `bench/PROFILE.md`), the closed-loop rate unchanged. Larger
/// flushes keep [`POSTGRES_PACED_ROWS`]: over 100k uniform keys (about
/// 50,000 keys a flush) shorter statements did not make the tail better.
pub const POSTGRES_PACED_SHORT_ROWS: usize = 250;

/// See [`POSTGRES_PACED_SHORT_ROWS`].
pub const PACED_SHORT_MAX_KEYS: usize = 20_000;

/// Rows per statement of a paced flush of `keys` keys.
#[must_use]
pub fn paced_rows(keys: usize) -> usize {
    if keys <= PACED_SHORT_MAX_KEYS {
        POSTGRES_PACED_SHORT_ROWS
    } else {
        POSTGRES_PACED_ROWS
    }
}

/// See [`POSTGRES_PACED_ROWS`].
const PACED_FOR: std::time::Duration = std::time::Duration::from_millis(800);

/// Batches of at most this many keys are paced (see [`POSTGRES_PACED_ROWS`]).
pub const PACED_MAX_KEYS: usize = 100_000;

/// Bind parameters bundled SQLite allows in one statement.
const SQLITE_MAX_BINDS: usize = 32_766;

/// SQLite: rows per upsert; a row binds 4.
pub const SQLITE_ROWS_PER_STATEMENT: usize = SQLITE_MAX_BINDS / 4;

/// `rows` as rounds of `i64` upserts, each round with unique keys. A delta
/// outside `i64` (only possible as a sum of several accepted deltas) is split
/// into parts of the same sign written in successive rounds of the same
/// transaction; almost every batch has exactly one round.
fn rounds(rows: &[(String, i128)]) -> Vec<Vec<(&str, i64)>> {
    let mut rounds: Vec<Vec<(&str, i64)>> = vec![Vec::with_capacity(rows.len())];
    for (key, delta) in rows {
        for (round, part) in split_i64(*delta).into_iter().enumerate() {
            if rounds.len() == round {
                rounds.push(Vec::new());
            }
            rounds[round].push((key.as_str(), part));
        }
    }
    rounds
}

/// `delta` as `i64` parts of its sign whose sum is `delta`.
fn split_i64(mut delta: i128) -> Vec<i64> {
    let mut parts = Vec::with_capacity(1);
    loop {
        match i64::try_from(delta) {
            Ok(part) => {
                parts.push(part);
                return parts;
            }
            Err(_) => {
                let part = if delta > 0 { i64::MAX } else { i64::MIN };
                parts.push(part);
                delta -= i128::from(part);
            }
        }
    }
}

/// A key whose sum was split into parts (see [`rounds`]) is applied whole or
/// not at all: when any of its parts was `rejected`, the parts applied are
/// taken back (in this transaction; a row the transaction created is
/// removed) and every part is reported rejected. A
/// partly applied sum would make a `wait=true` request's `422` ("not
/// applied") untrue, and a client's retry count twice. Taking back cannot
/// leave `bigint`: it moves the row back toward a value it held.
async fn reject_split_sums_whole<'a, C: ConnectionTrait>(
    conn: &C,
    backend: DbBackend,
    written: &[Vec<(&'a str, i64)>],
    rejected: Vec<(&'a str, i64)>,
    now: DateTime<Utc>,
) -> Result<Vec<(&'a str, i64)>, DbErr> {
    let Some(later) = written.get(1..) else {
        return Ok(rejected);
    };
    let split: HashSet<&str> = later.iter().flatten().map(|(key, _)| *key).collect();
    // Per partly rejected key: what was applied of it, its parts less the
    // rejected ones (sorted: taken back in key order, as written).
    let mut applied: BTreeMap<&str, i128> = BTreeMap::new();
    for (key, part) in &rejected {
        if split.contains(key) {
            *applied.entry(*key).or_default() -= i128::from(*part);
        }
    }
    if applied.is_empty() {
        return Ok(rejected);
    }
    let mut whole: Vec<(&str, i64)> = Vec::new();
    for (key, part) in written.iter().flatten() {
        if let Some(sum) = applied.get_mut(key) {
            *sum += i128::from(*part);
            whole.push((*key, *part));
        }
    }
    let take_back: Vec<(String, i128)> = applied
        .iter()
        .filter(|(_, sum)| **sum != 0)
        .map(|(key, sum)| ((*key).to_owned(), -sum))
        .collect();
    for round in rounds(&take_back) {
        if upsert_chunk(conn, backend, &round, now).await? < round.len() as u64 {
            return Err(DbErr::Custom(
                "taking back a partly applied sum left bigint".to_owned(),
            ));
        }
    }
    // A key this transaction created (its `created_at` is this write's) is
    // left as if never written: no row, not a row at 0.
    counters::Entity::delete_many()
        .filter(counters::Column::Key.is_in(take_back.iter().map(|(key, _)| key.as_str())))
        .filter(counters::Column::CreatedAt.eq(now))
        .filter(counters::Column::Value.eq(0))
        .exec(conn)
        .await?;
    let mut rejected: Vec<(&str, i64)> = rejected
        .into_iter()
        .filter(|(key, _)| !applied.contains_key(key))
        .collect();
    rejected.extend(whole);
    Ok(rejected)
}

/// What happened to a batch (or one part of it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteOutcome {
    /// Committed now: `statements` upserts wrote the batch's keys, except
    /// `rejected` rows whose total would have left `bigint` (recorded in
    /// `rejected_increments` instead). Parts committed by an earlier attempt
    /// were skipped.
    ///
    /// `repeats` keyed requests were left out because their
    /// `Idempotency-Key` had been applied already (or came twice in the
    /// batch); `reused` of them carried another body under that key.
    /// `resumed`: some parts had committed in an earlier attempt, so these
    /// counts leave theirs out (read them back: [`rejected_keys`]).
    Committed {
        statements: usize,
        rejected: usize,
        repeats: usize,
        reused: usize,
        resumed: bool,
    },
    /// An earlier attempt had committed every part; nothing was written.
    AlreadyCommitted,
    /// The batch holds journal messages, and the stream's applied offset is
    /// no longer the one it continues from: another instance applied those
    /// messages first. Nothing was written; the batch must be dropped and
    /// the journal read again from the stored offset.
    JournalMoved,
}

impl WriteOutcome {
    /// Two parts' outcomes as one batch's.
    fn and(self, more: Self) -> Self {
        match (self, more) {
            (Self::JournalMoved, _) | (_, Self::JournalMoved) => Self::JournalMoved,
            (Self::AlreadyCommitted, Self::AlreadyCommitted) => Self::AlreadyCommitted,
            // Some parts committed earlier: what they rejected or left out is
            // not in this attempt's counts.
            (
                Self::AlreadyCommitted,
                Self::Committed {
                    statements,
                    rejected,
                    repeats,
                    reused,
                    ..
                },
            )
            | (
                Self::Committed {
                    statements,
                    rejected,
                    repeats,
                    reused,
                    ..
                },
                Self::AlreadyCommitted,
            ) => Self::Committed {
                statements,
                rejected,
                repeats,
                reused,
                resumed: true,
            },
            (
                Self::Committed {
                    statements,
                    rejected,
                    repeats,
                    reused,
                    resumed,
                },
                Self::Committed {
                    statements: more_statements,
                    rejected: more_rejected,
                    repeats: more_repeats,
                    reused: more_reused,
                    resumed: more_resumed,
                },
            ) => Self::Committed {
                statements: statements + more_statements,
                rejected: rejected + more_rejected,
                repeats: repeats + more_repeats,
                reused: reused + more_reused,
                resumed: resumed || more_resumed,
            },
        }
    }
}

/// The keys of `batch` whose rows a flush recorded in `rejected_increments`
/// instead of applying them (whichever attempt committed them).
///
/// # Errors
/// Any database error.
pub async fn rejected_keys(
    db: &DatabaseConnection,
    batch: &Batch,
) -> Result<std::collections::HashSet<String>, DbErr> {
    use sea_orm::{ColumnTrait, EntityTrait, QueryFilter, QuerySelect};
    let part_ids: Vec<&str> = batch.parts.iter().map(|part| part.id.as_str()).collect();
    let keys: Vec<String> = rejected_increments::Entity::find()
        .select_only()
        .column(rejected_increments::Column::Key)
        .filter(rejected_increments::Column::BatchId.is_in(part_ids))
        .into_tuple()
        .all(db)
        .await?;
    Ok(keys.into_iter().collect())
}

/// Why a row was not applied, as stored in `rejected_increments.reason`.
pub const OVERFLOW_REASON: &str = "stored value + delta is outside the bigint range";

/// Writes `batch`, each part in one transaction on up to `connections`
/// connections at once (one on SQLite, which has a single writer), exactly
/// once across retries of the same batch.
///
/// Every part is attempted even when another fails, so a retry has less to
/// do; the first error is returned.
///
/// # Errors
/// Any database error. The outcome of a part is then unknown only if the
/// error came from its COMMIT; retrying with the same batch is correct either way.
pub async fn write_batch(
    db: &DatabaseConnection,
    batch: &Batch,
    now: DateTime<Utc>,
    connections: usize,
) -> Result<WriteOutcome, DbErr> {
    write_batch_keyed(
        db,
        batch,
        now,
        connections,
        DEFAULT_IDEMPOTENCY_WINDOW,
        &AtomicUsize::new(0),
    )
    .await
}

/// How long an applied `Idempotency-Key` is remembered unless configured.
pub const DEFAULT_IDEMPOTENCY_WINDOW: std::time::Duration =
    std::time::Duration::from_secs(24 * 3600);

/// How long past its window an applied `Idempotency-Key` is kept before it
/// is pruned: a repeat taken within the window may be written later (a
/// flush on, an outage, a spill replayed at a restart, a journal backlog),
/// and it must still find the key then. The shorter of the window and an
/// hour: a 24 h window keeps its keys 25 h (4 % more rows); a write later
/// than that past the window counts a repeat as new.
pub fn kept_past_window(window: std::time::Duration) -> std::time::Duration {
    window.min(std::time::Duration::from_secs(3600))
}

/// Where the window of a request taken `at` begins: keys applied since then
/// hold it. To the whole second below, so the claims of a batch take one
/// statement per second of take times; the look-up at the door counts the
/// same way, or it would find absent a key the claim still holds (its
/// request answered `202`, then left out).
pub fn window_start(at: DateTime<Utc>, window: chrono::Duration) -> DateTime<Utc> {
    at.checked_sub_signed(window)
        .unwrap_or(DateTime::<Utc>::MIN_UTC)
        .trunc_subsecs(0)
}

/// [`write_batch`], remembering the batch's `Idempotency-Key`s for
/// `idempotency_window`: a key applied longer ago than that counts as new.
/// While `waiters` is above zero (durable requests wait for a flush), the
/// write is not paced, or stops pacing: full-size statements, no pauses.
///
/// # Errors
/// As [`write_batch`].
#[tracing::instrument(name = "db.write_batch", skip_all, fields(batch.id = %batch.id, batch.keys = batch.len() as i64, batch.parts = batch.parts.len() as i64, batch.keyed = batch.keyed.len() as i64))]
pub async fn write_batch_keyed(
    db: &DatabaseConnection,
    batch: &Batch,
    now: DateTime<Utc>,
    connections: usize,
    idempotency_window: std::time::Duration,
    waiters: &AtomicUsize,
) -> Result<WriteOutcome, DbErr> {
    let keys_window =
        chrono::Duration::from_std(idempotency_window).unwrap_or(chrono::Duration::MAX);
    let connections = match db.get_database_backend() {
        DbBackend::Postgres => connections.max(1),
        _ => 1,
    };
    let pace = batch.len() <= PACED_MAX_KEYS && waiters.load(Ordering::Relaxed) == 0;
    // A paced batch's parts in turn: two at once would be two bursts again.
    let permits = tokio::sync::Semaphore::new(if pace { 1 } else { connections });
    // A loop, not a closure: the futures stay `Send` for the flush task.
    let mut writes = Vec::with_capacity(batch.parts.len());
    for part in &batch.parts {
        writes.push(write_part(
            db,
            &permits,
            &part.id,
            batch.rows(part),
            Guards {
                journal: batch.journal.as_ref(),
                keyed: &batch.keyed,
                keys_window,
            },
            now,
            pace.then(|| Pacing {
                waiters,
                rows: paced_rows(batch.len()),
            }),
        ));
    }
    let results = futures::future::join_all(writes).await;
    let mut total: Option<WriteOutcome> = None;
    for result in results {
        let result = result?;
        total = Some(match total {
            None => result,
            Some(so_far) => so_far.and(result),
        });
    }
    Ok(total.unwrap_or(WriteOutcome::AlreadyCommitted))
}

/// Writes one part (`rows` under `id`) in one transaction, exactly once
/// across retries with the same id.
///
/// A key whose stored total would leave `bigint` ("poison row") does not hold
/// back the others: the upsert skips it (a guard in its `DO UPDATE ... WHERE`),
/// and when anything was skipped the transaction is redone in a second pass
/// that learns which keys were skipped (`RETURNING`), records them in
/// `rejected_increments` and commits the rest. The normal path pays nothing
/// for this but the guard.
#[tracing::instrument(name = "db.write_part", skip_all, fields(part.id = %id, part.keys = rows.len() as i64))]
async fn write_part(
    db: &DatabaseConnection,
    permits: &tokio::sync::Semaphore,
    id: &str,
    rows: &[(String, i128)],
    guards: Guards<'_>,
    now: DateTime<Utc>,
    pace: Option<Pacing<'_>>,
) -> Result<WriteOutcome, DbErr> {
    let _permit = permits
        .acquire()
        .await
        .map_err(|_| DbErr::Custom("the write permits were closed".to_owned()))?;
    match write_pass(db, id, rows, guards, now, Pass::Fast, pace).await? {
        PassOutcome::Done(outcome) => Ok(outcome),
        PassOutcome::Skipped => {
            match write_pass(db, id, rows, guards, now, Pass::Isolate, pace).await? {
                PassOutcome::Done(outcome) => Ok(outcome),
                PassOutcome::Skipped => Err(DbErr::Custom(
                    "rows were skipped while isolating poison rows".to_owned(),
                )),
            }
        }
    }
}

/// How a paced write goes: in statements of `rows` rows, until a durable
/// request waits (`waiters` above zero).
#[derive(Clone, Copy)]
struct Pacing<'a> {
    waiters: &'a AtomicUsize,
    rows: usize,
}

/// What a part's transaction checks besides its own id.
#[derive(Clone, Copy)]
struct Guards<'a> {
    /// The journal messages the part holds (their offset moves with it).
    journal: Option<&'a JournalSpan>,
    /// Keyed requests whose items the part's rows include.
    keyed: &'a [Keyed],
    /// A key applied longer than this before its request was taken counts
    /// as new.
    keys_window: chrono::Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pass {
    /// Count the rows each upsert changed; roll back if any was skipped.
    Fast,
    /// Learn which rows each upsert changed; record the others as rejected.
    Isolate,
}

enum PassOutcome {
    Done(WriteOutcome),
    /// The fast pass found a skipped row and rolled back.
    Skipped,
}

async fn write_pass(
    db: &DatabaseConnection,
    id: &str,
    rows: &[(String, i128)],
    guards: Guards<'_>,
    now: DateTime<Utc>,
    pass: Pass,
    pace: Option<Pacing<'_>>,
) -> Result<PassOutcome, DbErr> {
    let journal = guards.journal;
    let txn = db.begin().await?;
    let claim = Query::insert()
        .into_table(flush_batches::Entity)
        .columns([
            flush_batches::Column::BatchId,
            flush_batches::Column::Keys,
            flush_batches::Column::CommittedAt,
        ])
        .values([
            id.into(),
            i64::try_from(rows.len()).unwrap_or(i64::MAX).into(),
            now.into(),
        ])
        .map_err(|e| DbErr::Custom(e.to_string()))?
        .on_conflict(
            OnConflict::column(flush_batches::Column::BatchId)
                .do_nothing()
                .to_owned(),
        )
        .to_owned();
    if txn.execute(&claim).await?.rows_affected() == 0 {
        txn.rollback().await?;
        return Ok(PassOutcome::Done(WriteOutcome::AlreadyCommitted));
    }
    if let Some(span) = journal
        && !advance_journal(&txn, span).await?
    {
        txn.rollback().await?;
        tracing::warn!(part.id = %id, stream = %span.stream, after = span.after, "the journal offset moved (these messages were applied by another writer) or the stream is marked lost: not applied here");
        return Ok(PassOutcome::Done(WriteOutcome::JournalMoved));
    }
    let backend = txn.get_database_backend();
    let mut statements = 0;
    let (mut repeats, mut reused) = (0, 0);
    let unguarded;
    let rows = if guards.keyed.is_empty() {
        rows
    } else {
        let claimed = claim_keys(&txn, id, guards.keyed, guards.keys_window, now).await?;
        statements += claimed.statements;
        repeats = claimed.repeats.len();
        reused = claimed.reused;
        unguarded = without(rows, &claimed.repeats);
        &unguarded[..]
    };
    let chunk_rows = match backend {
        DbBackend::Postgres => POSTGRES_ROWS_PER_STATEMENT,
        _ => SQLITE_ROWS_PER_STATEMENT,
    };
    let mut rejected: Vec<(&str, i64)> = Vec::new();
    // Paced (on PostgreSQL) until a durable request waits.
    let mut pace = pace.filter(|_| backend == DbBackend::Postgres);
    let pass_started = std::time::Instant::now();
    let rounds = rounds(rows);
    for round in &rounds {
        let mut rest = &round[..];
        while !rest.is_empty() {
            if pace.is_some_and(|pace| pace.waiters.load(Ordering::Relaxed) > 0) {
                pace = None;
            }
            let size = pace.map_or(chunk_rows, |pace| pace.rows);
            let (chunk, tail) = rest.split_at(size.min(rest.len()));
            rest = tail;
            statements += 1;
            let started = std::time::Instant::now();
            match pass {
                Pass::Fast => {
                    let changed = upsert_chunk(&txn, backend, chunk, now).await?;
                    if changed < chunk.len() as u64 {
                        txn.rollback().await?;
                        tracing::warn!(part.id = %id, "a row would overflow bigint; isolating it");
                        return Ok(PassOutcome::Skipped);
                    }
                }
                Pass::Isolate => {
                    let changed = upsert_chunk_returning(&txn, backend, chunk, now).await?;
                    rejected.extend(chunk.iter().filter(|(key, _)| !changed.contains(*key)));
                }
            }
            if pace.is_some() && pass_started.elapsed() < PACED_FOR && !rest.is_empty() {
                tokio::time::sleep(started.elapsed()).await;
            }
        }
    }
    if !rejected.is_empty() {
        rejected = reject_split_sums_whole(&txn, backend, &rounds, rejected, now).await?;
        record_rejected(&txn, id, journal, &rejected, now).await?;
        statements += 1;
    }
    txn.commit().await?;
    Ok(PassOutcome::Done(WriteOutcome::Committed {
        statements,
        rejected: rejected.len(),
        repeats,
        reused,
        resumed: false,
    }))
}

/// What [`claim_keys`] found.
struct Claimed<'a> {
    /// Keyed requests not to apply: their key was applied within the window
    /// (or an earlier request of the same batch holds it).
    repeats: Vec<&'a Keyed>,
    /// Of those, how many carried another body than the one applied.
    reused: usize,
    statements: usize,
}

/// Inserts the batch's `Idempotency-Key`s; a key already there and applied
/// within `window` before its request was taken is a repeat. Within the
/// batch, the first request of a key wins.
async fn claim_keys<'a, C: ConnectionTrait>(
    conn: &C,
    batch_id: &str,
    keyed: &'a [Keyed],
    window: chrono::Duration,
    now: DateTime<Utc>,
) -> Result<Claimed<'a>, DbErr> {
    let mut first: std::collections::HashMap<&str, &Keyed> =
        std::collections::HashMap::with_capacity(keyed.len());
    let mut claimed = Claimed {
        repeats: Vec::new(),
        reused: 0,
        statements: 0,
    };
    let mut candidates: Vec<&Keyed> = Vec::with_capacity(keyed.len());
    for request in keyed {
        match first.get(request.key.as_str()) {
            Some(winner) => {
                claimed.reused += usize::from(winner.fingerprint != request.fingerprint);
                claimed.repeats.push(request);
            }
            None => {
                first.insert(&request.key, request);
                candidates.push(request);
            }
        }
    }
    // Each request's window is counted back from when it was taken (a write
    // may come long after: an outage, a late spill replay, a journal
    // backlog), by `window_start`: one statement per second of take times,
    // usually one or two per batch.
    let mut by_cutoff: std::collections::BTreeMap<DateTime<Utc>, Vec<&Keyed>> =
        std::collections::BTreeMap::new();
    for request in candidates {
        let taken = request.taken_at.map_or(now, |at| Ord::min(at, now));
        by_cutoff
            .entry(window_start(taken, window))
            .or_default()
            .push(request);
    }
    let backend = conn.get_database_backend();
    let mut held: Vec<&Keyed> = Vec::new();
    let mut stored: std::collections::HashMap<String, i64> = std::collections::HashMap::new();
    // 4 binds per row plus the cut-off, under SQLite's limit.
    for (&since, requests) in &by_cutoff {
        for chunk in requests.chunks(SQLITE_MAX_BINDS / 4 - 1) {
            claimed.statements += 1;
            let stmt = claim_statement(backend, batch_id, chunk, since, now);
            let taken = conn.execute_raw(stmt).await?.rows_affected();
            if taken == chunk.len() as u64 {
                continue; // The common case: every key is new.
            }
            // Rare (a client retried): the keys this statement did not take are
            // the ones it did not stamp with this batch id and `now`: held under
            // another batch, or under this one by an earlier commit of it (a
            // part replayed after its `flush_batches` row was pruned), with the
            // body applied then.
            claimed.statements += 1;
            let keys: Vec<&str> = chunk.iter().map(|request| request.key.as_str()).collect();
            let rows: Vec<(String, i64)> = idempotency_keys::Entity::find()
                .select_only()
                .column(idempotency_keys::Column::Key)
                .column(idempotency_keys::Column::Fingerprint)
                .filter(idempotency_keys::Column::Key.is_in(keys))
                .filter(
                    sea_orm::Condition::any()
                        .add(idempotency_keys::Column::BatchId.ne(batch_id))
                        .add(idempotency_keys::Column::CreatedAt.ne(now)),
                )
                .into_tuple::<(String, i64)>()
                .all(conn)
                .await?;
            stored.extend(rows);
            held.extend(
                chunk
                    .iter()
                    .copied()
                    .filter(|request| stored.contains_key(&request.key)),
            );
        }
    }
    for request in held {
        claimed.reused += usize::from(
            stored
                .get(&request.key)
                .is_some_and(|fingerprint| *fingerprint != request.fingerprint),
        );
        claimed.repeats.push(request);
    }
    Ok(claimed)
}

/// The insert of `chunk`'s keys: a new key is inserted, one applied before
/// `since` taken over (both under `batch_id`), a younger one left alone.
fn claim_statement(
    backend: DbBackend,
    batch_id: &str,
    chunk: &[&Keyed],
    since: DateTime<Utc>,
    now: DateTime<Utc>,
) -> Statement {
    const TAKE_OVER: &str = "ON CONFLICT (key) DO UPDATE SET fingerprint = excluded.fingerprint, \
         batch_id = excluded.batch_id, created_at = excluded.created_at \
         WHERE idempotency_keys.created_at < ";
    if backend == DbBackend::Postgres {
        let keys: Vec<String> = chunk.iter().map(|r| r.key.clone()).collect();
        let fingerprints: Vec<i64> = chunk.iter().map(|r| r.fingerprint).collect();
        let sql = format!(
            "INSERT INTO idempotency_keys (key, fingerprint, batch_id, created_at) \
             SELECT k, f, $3, $4 FROM unnest($1::text[], $2::bigint[]) AS t(k, f) \
             {TAKE_OVER}$5"
        );
        return Statement::from_sql_and_values(
            DbBackend::Postgres,
            sql,
            [
                keys.into(),
                fingerprints.into(),
                batch_id.into(),
                now.into(),
                since.into(),
            ],
        );
    }
    let rows = vec!["(?, ?, ?, ?)"; chunk.len()].join(", ");
    let sql = format!(
        "INSERT INTO idempotency_keys (key, fingerprint, batch_id, created_at) VALUES {rows} \
         {TAKE_OVER}?"
    );
    let mut values: Vec<sea_orm::Value> = Vec::with_capacity(chunk.len() * 4 + 1);
    for request in chunk {
        values.push(request.key.as_str().into());
        values.push(request.fingerprint.into());
        values.push(batch_id.into());
        values.push(now.into());
    }
    values.push(since.into());
    Statement::from_sql_and_values(backend, sql, values)
}

/// `rows` (sorted, unique keys) minus the items of `repeats`.
fn without(rows: &[(String, i128)], repeats: &[&Keyed]) -> Vec<(String, i128)> {
    let mut rows = rows.to_vec();
    for request in repeats {
        for (key, delta) in &request.items {
            if let Ok(index) = rows.binary_search_by(|(k, _)| k.as_str().cmp(key)) {
                rows[index].1 -= i128::from(*delta);
            }
        }
    }
    rows
}

/// The look-up of [`applied_fingerprints`] on PostgreSQL (public for the
/// test of its plan).
pub const APPLIED_FINGERPRINTS: &str = "SELECT key, fingerprint, batch_id, created_at \
     FROM idempotency_keys WHERE key = ANY($1::text[])";

/// An `Idempotency-Key` the database holds: the fingerprint of the request
/// applied under it, and the batch (part) that applied it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppliedKey {
    pub fingerprint: i64,
    pub batch_id: String,
}

/// The `Idempotency-Key`s among `keys` applied at or after `since`.
///
/// The statement names only `key`, so the one index it can use is the
/// primary key, whatever plan PostgreSQL caches (on the look-up connections,
/// a generic plan with sequential scans off: no planning per group). A
/// `created_at` condition in SQL let a plan made on an empty table pick the
/// `created_at` index, a scan of the whole window; the age is checked here.
///
/// # Errors
/// Any database error.
pub async fn applied_fingerprints(
    db: &DatabaseConnection,
    keys: &[String],
    since: DateTime<Utc>,
) -> Result<std::collections::HashMap<String, AppliedKey>, DbErr> {
    let backend = db.get_database_backend();
    // PostgreSQL: one array bind, so one statement text (prepared once)
    // whatever the number of keys; an `IN ($1, …)` list of varying length
    // is a new statement each time.
    let stmt = if backend == DbBackend::Postgres {
        Statement::from_sql_and_values(backend, APPLIED_FINGERPRINTS, [keys.to_vec().into()])
    } else {
        let marks = vec!["?"; keys.len()].join(", ");
        let values: Vec<sea_orm::Value> = keys.iter().map(|k| k.as_str().into()).collect();
        Statement::from_sql_and_values(
            backend,
            format!(
                "SELECT key, fingerprint, batch_id, created_at FROM idempotency_keys \
                 WHERE key IN ({marks})"
            ),
            values,
        )
    };
    let mut applied = std::collections::HashMap::with_capacity(keys.len());
    for row in db.query_all_raw(stmt).await? {
        let created_at: DateTime<chrono::FixedOffset> = row.try_get("", "created_at")?;
        if created_at >= since {
            applied.insert(
                row.try_get::<String>("", "key")?,
                AppliedKey {
                    fingerprint: row.try_get("", "fingerprint")?,
                    batch_id: row.try_get("", "batch_id")?,
                },
            );
        }
    }
    Ok(applied)
}

/// The answer to a waiting request's question about its row
/// (`rejected_in_batch`, `journal_rejected`, `keyed_fate`) by `deadline`;
/// `None` when it failed (logged) or came too late: the request is then told
/// "not confirmed", never "written".
pub async fn answered_by<T>(
    deadline: tokio::time::Instant,
    question: impl std::future::Future<Output = Result<T, DbErr>>,
) -> Option<T> {
    match tokio::time::timeout_at(deadline, question).await {
        Ok(Ok(answer)) => Some(answer),
        Ok(Err(e)) => {
            tracing::warn!(error = %crate::telemetry::error_chain(&e), "reading what became of a durable request's row failed");
            None
        }
        Err(_) => None,
    }
}

/// Whether the batch (part) `batch_id` rejected the row of any of `keys`
/// (counter keys): a request applied in it whose row was rejected was not
/// written, though its `Idempotency-Key` was stored. Asked by a `wait=true`
/// repeat found in the database (rare).
///
/// # Errors
/// Any database error.
pub async fn rejected_in_batch(
    db: &DatabaseConnection,
    batch_id: &str,
    keys: &[&str],
) -> Result<bool, DbErr> {
    let found = rejected_increments::Entity::find()
        .select_only()
        .column(rejected_increments::Column::Key)
        .filter(rejected_increments::Column::BatchId.eq(batch_id))
        .filter(rejected_increments::Column::Key.is_in(keys.iter().copied()))
        .limit(1)
        .into_tuple::<String>()
        .one(db)
        .await?;
    Ok(found.is_some())
}

/// What a request carrying an `Idempotency-Key` with `fingerprint` learns
/// from the row stored under that key (see [`keyed_fate`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyedFate {
    /// Its body was applied and its rows written.
    Written,
    /// Its body was applied, but the batch rejected a row of it (the stored
    /// total would have left `bigint`): nothing of it was written.
    Rejected,
    /// Another body was applied under the key: nothing of this one was.
    Reused,
}

/// What was applied under `key` for a request with `fingerprint` whose
/// counters are `counters`; `None` when the key is not stored (pruned). Asked
/// by a `wait=true` request whose flush left out repeats (rare), since it
/// may be one: "committed" alone would not say whether its body was applied.
///
/// # Errors
/// Any database error.
pub async fn keyed_fate(
    db: &DatabaseConnection,
    key: &str,
    fingerprint: i64,
    counters: &[&str],
) -> Result<Option<KeyedFate>, DbErr> {
    let stored = applied_fingerprints(db, &[key.to_owned()], DateTime::<Utc>::MIN_UTC).await?;
    let Some(applied) = stored.get(key) else {
        return Ok(None);
    };
    if applied.fingerprint != fingerprint {
        return Ok(Some(KeyedFate::Reused));
    }
    Ok(Some(
        if rejected_in_batch(db, &applied.batch_id, counters).await? {
            KeyedFate::Rejected
        } else {
            KeyedFate::Written
        },
    ))
}

/// Deletes up to `limit` `Idempotency-Key`s applied before `before`;
/// returns how many. One short statement: the pruner calls it in a loop,
/// never inside a flush.
///
/// # Errors
/// Any database error.
pub async fn prune_idempotency_keys(
    db: &DatabaseConnection,
    before: DateTime<Utc>,
    limit: u64,
) -> Result<u64, DbErr> {
    let backend = db.get_database_backend();
    let sql = match backend {
        DbBackend::Postgres => {
            "DELETE FROM idempotency_keys WHERE key IN (SELECT key FROM idempotency_keys \
             WHERE created_at < $1 ORDER BY created_at LIMIT $2)"
        }
        _ => {
            "DELETE FROM idempotency_keys WHERE key IN (SELECT key FROM idempotency_keys \
             WHERE created_at < ? ORDER BY created_at LIMIT ?)"
        }
    };
    let limit = i64::try_from(limit).unwrap_or(i64::MAX);
    let result = db
        .execute_raw(Statement::from_sql_and_values(
            backend,
            sql,
            [before.into(), limit.into()],
        ))
        .await?;
    Ok(result.rows_affected())
}

/// Applies a row only when the sum stays in `bigint` (written so that the
/// guard's own arithmetic cannot overflow).
const OVERFLOW_GUARD: &str = "WHERE (excluded.value >= 0 AND counters.value <= 9223372036854775807 - excluded.value) \
     OR (excluded.value < 0 AND counters.value >= -9223372036854775807 - 1 - excluded.value)";

/// The upsert of one chunk, for `backend`; `RETURNING key` when `returning`.
fn upsert_statement(
    backend: DbBackend,
    chunk: &[(&str, i64)],
    now: DateTime<Utc>,
    returning: bool,
) -> Statement {
    let tail = if returning { " RETURNING key" } else { "" };
    if backend == DbBackend::Postgres {
        // unnest: three binds whatever the row count, one cached statement text.
        let keys: Vec<String> = chunk.iter().map(|(k, _)| (*k).to_owned()).collect();
        let values: Vec<i64> = chunk.iter().map(|(_, v)| *v).collect();
        let sql = format!(
            "INSERT INTO counters (key, value, created_at, updated_at) \
             SELECT k, v, $3, $3 FROM unnest($1::text[], $2::bigint[]) AS t(k, v) \
             ON CONFLICT (key) DO UPDATE \
             SET value = counters.value + excluded.value, updated_at = excluded.updated_at \
             {OVERFLOW_GUARD}{tail}"
        );
        return Statement::from_sql_and_values(
            DbBackend::Postgres,
            sql,
            [keys.into(), values.into(), now.into()],
        );
    }
    let rows = vec!["(?, ?, ?, ?)"; chunk.len()].join(", ");
    let sql = format!(
        "INSERT INTO counters (key, value, created_at, updated_at) VALUES {rows} \
         ON CONFLICT (key) DO UPDATE \
         SET value = counters.value + excluded.value, updated_at = excluded.updated_at \
         {OVERFLOW_GUARD}{tail}"
    );
    let mut values: Vec<sea_orm::Value> = Vec::with_capacity(chunk.len() * 4);
    for (key, value) in chunk {
        values.push((*key).into());
        values.push((*value).into());
        values.push(now.into());
        values.push(now.into());
    }
    Statement::from_sql_and_values(backend, sql, values)
}

/// Upserts a chunk; returns how many rows it inserted or updated.
#[tracing::instrument(name = "db.upsert", skip_all, fields(rows = chunk.len() as i64))]
async fn upsert_chunk<C: ConnectionTrait>(
    conn: &C,
    backend: DbBackend,
    chunk: &[(&str, i64)],
    now: DateTime<Utc>,
) -> Result<u64, DbErr> {
    let stmt = upsert_statement(backend, chunk, now, false);
    Ok(conn.execute_raw(stmt).await?.rows_affected())
}

/// Upserts a chunk; returns the keys it inserted or updated.
#[tracing::instrument(name = "db.upsert_returning", skip_all, fields(rows = chunk.len() as i64))]
async fn upsert_chunk_returning<C: ConnectionTrait>(
    conn: &C,
    backend: DbBackend,
    chunk: &[(&str, i64)],
    now: DateTime<Utc>,
) -> Result<std::collections::HashSet<String>, DbErr> {
    let stmt = upsert_statement(backend, chunk, now, true);
    conn.query_all_raw(stmt)
        .await?
        .iter()
        .map(|row| row.try_get::<String>("", "key"))
        .collect()
}

/// Records rows that could not be applied.
#[tracing::instrument(name = "db.record_rejected", skip_all, fields(rows = rows.len() as i64))]
async fn record_rejected<C: ConnectionTrait>(
    conn: &C,
    batch_id: &str,
    journal: Option<&JournalSpan>,
    rows: &[(&str, i64)],
    now: DateTime<Utc>,
) -> Result<(), DbErr> {
    // One line per batch, naming a few keys: a client that keeps counters at
    // the edge of `bigint` must not be able to write a log line per key per
    // flush. The table below keeps every row.
    const KEYS_LOGGED: usize = 5;
    let named: Vec<String> = rows
        .iter()
        .take(KEYS_LOGGED)
        .map(|(key, delta)| format!("{key:?} ({delta:+})"))
        .collect();
    tracing::error!(
        rows = rows.len(),
        keys = named.join(", "),
        batch.id = batch_id,
        "increments rejected ({} in all; see rejected_increments): {OVERFLOW_REASON}",
        rows.len()
    );
    // The journal span tells a waiting request which rows held its message
    // (see `journal_rejected`); null for a write-behind batch.
    let stream: Option<String> = journal.map(|span| span.stream.clone());
    let after: Option<i64> = journal.map(|span| as_bigint(span.after));
    let through: Option<i64> = journal.map(|span| as_bigint(span.through));
    // 8 binds per row, under SQLite's limit.
    for chunk in rows.chunks(SQLITE_MAX_BINDS / 8) {
        let mut insert = Query::insert();
        insert.into_table(rejected_increments::Entity).columns([
            rejected_increments::Column::Key,
            rejected_increments::Column::Delta,
            rejected_increments::Column::Reason,
            rejected_increments::Column::BatchId,
            rejected_increments::Column::RejectedAt,
            rejected_increments::Column::JournalStream,
            rejected_increments::Column::JournalAfter,
            rejected_increments::Column::JournalThrough,
        ]);
        for (key, delta) in chunk {
            insert
                .values([
                    (*key).into(),
                    (*delta).into(),
                    OVERFLOW_REASON.into(),
                    batch_id.into(),
                    now.into(),
                    stream.clone().into(),
                    after.into(),
                    through.into(),
                ])
                .map_err(|e| DbErr::Custom(e.to_string()))?;
        }
        conn.execute(&insert).await?;
    }
    Ok(())
}

/// `key`'s stored value and whether batch `batch_id` has committed, in one
/// statement (one snapshot, on both backends).
///
/// # Errors
/// Any database error.
pub async fn read_counter(
    db: &DatabaseConnection,
    key: &str,
    batch_id: Option<&str>,
) -> Result<(Option<i64>, bool), DbErr> {
    let backend = db.get_database_backend();
    let sql = match backend {
        DbBackend::Postgres => {
            "SELECT (SELECT value FROM counters WHERE key = $1) AS value, \
             EXISTS (SELECT 1 FROM flush_batches WHERE batch_id = $2) AS committed"
        }
        _ => {
            "SELECT (SELECT value FROM counters WHERE key = ?) AS value, \
             EXISTS (SELECT 1 FROM flush_batches WHERE batch_id = ?) AS committed"
        }
    };
    let stmt = Statement::from_sql_and_values(
        backend,
        sql,
        [key.into(), batch_id.unwrap_or_default().into()],
    );
    let row = db
        .query_one_raw(stmt)
        .await?
        .ok_or_else(|| DbErr::Custom("a SELECT without FROM returned no row".into()))?;
    let value: Option<i64> = row.try_get("", "value")?;
    let committed: bool = row.try_get("", "committed")?;
    Ok((value, committed))
}

/// Stored counters in key order: those starting with `prefix`, after the
/// key `after`, at most `limit`.
///
/// # Errors
/// Any database error.
pub async fn list_counters(
    db: &DatabaseConnection,
    prefix: &str,
    after: Option<&str>,
    limit: u64,
) -> Result<Vec<counters::Model>, DbErr> {
    list_counters_query(db.get_database_backend(), prefix, after, limit)
        .all(db)
        .await
}

/// The query of [`list_counters`] (public for the test of its plan).
pub fn list_counters_query(
    backend: DbBackend,
    prefix: &str,
    after: Option<&str>,
    limit: u64,
) -> sea_orm::Select<counters::Entity> {
    // Code-point order on both backends: PostgreSQL compares `key COLLATE
    // "C"` (the column's own collation since migration 8, so the primary
    // key's index serves it), SQLite's BINARY already does.
    let key: Expr = match backend {
        DbBackend::Postgres => Expr::cust(r#""key" COLLATE "C""#),
        _ => Expr::col((counters::Entity, counters::Column::Key)),
    };
    let mut query = counters::Entity::find().order_by_asc(key.clone());
    if !prefix.is_empty() {
        // The keys starting with `prefix` are exactly [prefix, successor).
        query = query.filter(Expr::expr(key.clone()).gte(prefix.to_owned()));
        if let Some(end) = successor(prefix) {
            query = query.filter(Expr::expr(key.clone()).lt(end));
        }
    }
    if let Some(after) = after {
        query = query.filter(Expr::expr(key).gt(after.to_owned()));
    }
    query.limit(limit)
}

/// The smallest string greater than every string that starts with
/// `prefix`, in code-point order; `None` when there is none (every
/// character is U+10FFFF).
fn successor(prefix: &str) -> Option<String> {
    let mut chars: Vec<char> = prefix.chars().collect();
    while let Some(last) = chars.pop() {
        let next = match last {
            '\u{D7FF}' => Some('\u{E000}'),
            c => char::from_u32(u32::from(c) + 1),
        };
        if let Some(next) = next {
            chars.push(next);
            return Some(chars.into_iter().collect());
        }
    }
    None
}

/// Marks the `flush_batches` rows of `ids` settled: their writer knows
/// they committed and will not retry them.
///
/// # Errors
/// Any database error.
pub async fn settle_batches(db: &DatabaseConnection, ids: &[String]) -> Result<(), DbErr> {
    for chunk in ids.chunks(SQLITE_MAX_BINDS - 1) {
        flush_batches::Entity::update_many()
            .col_expr(flush_batches::Column::Settled, Expr::value(true))
            .filter(flush_batches::Column::BatchId.is_in(chunk.iter().map(String::as_str)))
            .exec(db)
            .await?;
    }
    Ok(())
}

/// Deletes `flush_batches` rows committed before `settled_before` and
/// settled, or before `unsettled_before` (a retry may still come for those
/// until then); returns how many.
///
/// # Errors
/// Any database error.
pub async fn prune_batches(
    db: &DatabaseConnection,
    settled_before: DateTime<Utc>,
    unsettled_before: DateTime<Utc>,
) -> Result<u64, DbErr> {
    let result = flush_batches::Entity::delete_many()
        .filter(
            sea_orm::Condition::any()
                .add(
                    flush_batches::Column::CommittedAt
                        .lt(settled_before)
                        .and(flush_batches::Column::Settled.eq(true)),
                )
                .add(flush_batches::Column::CommittedAt.lt(unsettled_before)),
        )
        .exec(db)
        .await?;
    Ok(result.rows_affected)
}

/// Moves `span.stream`'s applied offset from `span.after` to `span.through`,
/// in the caller's transaction; `false` (nothing changed) when the offset is
/// not at `span.after`, or the stream is marked lost (a writer that has not
/// noticed yet must not apply what it read from the old offset).
async fn advance_journal<C: ConnectionTrait>(conn: &C, span: &JournalSpan) -> Result<bool, DbErr> {
    let update = Query::update()
        .table(journal_offsets::Entity)
        .value(
            journal_offsets::Column::AppliedThrough,
            as_bigint(span.through),
        )
        .and_where(journal_offsets::Column::Stream.eq(span.stream.as_str()))
        .and_where(journal_offsets::Column::AppliedThrough.eq(as_bigint(span.after)))
        .cond_where(
            sea_orm::Condition::any()
                .add(journal_offsets::Column::Writer.is_null())
                .add(journal_offsets::Column::Writer.ne(JOURNAL_STREAM_LOST)),
        )
        .to_owned();
    Ok(conn.execute(&update).await?.rows_affected() == 1)
}

/// Stream sequences are `u64`; a stream never reaches 2^63 messages.
fn as_bigint(sequence: u64) -> i64 {
    i64::try_from(sequence).unwrap_or(i64::MAX)
}

/// `stream`'s row in `journal_offsets`, as readers and starts need it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct JournalOffset {
    /// The sequence through which its messages are applied.
    pub applied: u64,
    /// When the stream is marked lost (see [`JOURNAL_STREAM_LOST`]): the
    /// lowest sequence found reused.
    pub lost_from: Option<u64>,
}

/// `stream`'s offset, creating its row (at 0, lease free) when missing.
///
/// # Errors
/// Any database error.
pub async fn journal_offset(db: &DatabaseConnection, stream: &str) -> Result<JournalOffset, DbErr> {
    let of = |row: journal_offsets::Model| JournalOffset {
        applied: u64::try_from(row.applied_through).unwrap_or(0),
        lost_from: (row.writer.as_deref() == Some(JOURNAL_STREAM_LOST)).then(|| {
            row.lost_from
                .and_then(|from| u64::try_from(from).ok())
                .unwrap_or(1)
        }),
    };
    let row = journal_offsets::Entity::find_by_id(stream.to_owned())
        .one(db)
        .await?;
    if let Some(row) = row {
        return Ok(of(row));
    }
    let insert = Query::insert()
        .into_table(journal_offsets::Entity)
        .columns([
            journal_offsets::Column::Stream,
            journal_offsets::Column::AppliedThrough,
            journal_offsets::Column::LeaseUntilMs,
        ])
        .values([stream.into(), 0i64.into(), 0i64.into()])
        .map_err(|e| DbErr::Custom(e.to_string()))?
        .on_conflict(
            OnConflict::column(journal_offsets::Column::Stream)
                .do_nothing()
                .to_owned(),
        )
        .to_owned();
    db.execute(&insert).await?;
    let row = journal_offsets::Entity::find_by_id(stream.to_owned())
        .one(db)
        .await?;
    Ok(row.map(of).unwrap_or_default())
}

/// The sequence through which `stream`'s messages are applied, creating its
/// row (at 0, lease free) when missing.
///
/// # Errors
/// Any database error.
pub async fn journal_applied_through(db: &DatabaseConnection, stream: &str) -> Result<u64, DbErr> {
    Ok(journal_offset(db, stream).await?.applied)
}

/// The highest sequence of `stream` held by a batch that rejected a row (0
/// when none did). Read after the stored offset, it covers every rejection
/// up to that offset: the two commit together.
///
/// # Errors
/// Any database error.
pub async fn journal_rejected_through(db: &DatabaseConnection, stream: &str) -> Result<u64, DbErr> {
    let highest: Option<Option<i64>> = rejected_increments::Entity::find()
        .select_only()
        .column_as(rejected_increments::Column::JournalThrough.max(), "through")
        .filter(rejected_increments::Column::JournalStream.eq(stream))
        .into_tuple()
        .one(db)
        .await?;
    Ok(highest
        .flatten()
        .map_or(0, |through| u64::try_from(through).unwrap_or(0)))
}

/// Whether the row of `key` in the batch that held message `sequence` of
/// `stream` was rejected (the stored total would have left `bigint`).
///
/// # Errors
/// Any database error.
pub async fn journal_rejected(
    db: &DatabaseConnection,
    stream: &str,
    key: &str,
    sequence: u64,
) -> Result<bool, DbErr> {
    let sequence = as_bigint(sequence);
    let found = rejected_increments::Entity::find()
        .select_only()
        .column(rejected_increments::Column::Id)
        .filter(rejected_increments::Column::JournalStream.eq(stream))
        .filter(rejected_increments::Column::Key.eq(key))
        .filter(rejected_increments::Column::JournalAfter.lt(sequence))
        .filter(rejected_increments::Column::JournalThrough.gte(sequence))
        .into_tuple::<i64>()
        .one(db)
        .await?;
    Ok(found.is_some())
}

/// Takes or renews the writer lease of `stream` for `writer` until
/// `until_ms` (Unix milliseconds): granted when the lease is free, expired
/// (before `now_ms`) or already `writer`'s. The stream's row must exist
/// ([`journal_applied_through`] creates it).
///
/// # Errors
/// Any database error.
pub async fn claim_journal_lease(
    db: &DatabaseConnection,
    stream: &str,
    writer: &str,
    now_ms: i64,
    until_ms: i64,
) -> Result<bool, DbErr> {
    let update = Query::update()
        .table(journal_offsets::Entity)
        .value(journal_offsets::Column::Writer, writer)
        .value(journal_offsets::Column::LeaseUntilMs, until_ms)
        .and_where(journal_offsets::Column::Stream.eq(stream))
        .cond_where(
            sea_orm::Condition::any()
                .add(journal_offsets::Column::Writer.eq(writer))
                .add(journal_offsets::Column::Writer.is_null())
                .add(journal_offsets::Column::LeaseUntilMs.lt(now_ms)),
        )
        .to_owned();
    Ok(db.execute(&update).await?.rows_affected() == 1)
}

/// The writer `journal_offsets` names once `stream` was found lost or
/// created again under running instances (its sequences started anew: read
/// from the stored offset, its messages would be skipped as applied). Its
/// lease never ends, so no instance reads the stream and none starts, until
/// an operator resets the row (runbook IncrementJournalStreamLost).
pub const JOURNAL_STREAM_LOST: &str = "(stream lost: see the runbook IncrementJournalStreamLost)";

/// Marks `stream` lost (see [`JOURNAL_STREAM_LOST`]), whoever holds its
/// lease, with `from`, a sequence found reused (the lowest one any instance
/// found is kept: the runbook resets the offset to just below it).
///
/// # Errors
/// Any database error.
pub async fn mark_journal_stream_lost(
    db: &DatabaseConnection,
    stream: &str,
    from: u64,
) -> Result<(), DbErr> {
    let from = as_bigint(from);
    let lost_from = journal_offsets::Column::LostFrom;
    let update = Query::update()
        .table(journal_offsets::Entity)
        .value(journal_offsets::Column::Writer, JOURNAL_STREAM_LOST)
        .value(journal_offsets::Column::LeaseUntilMs, i64::MAX)
        .value(
            lost_from,
            Expr::case(
                sea_orm::Condition::any()
                    .add(Expr::col(lost_from).is_null())
                    .add(Expr::col(lost_from).gt(from)),
                from,
            )
            .finally(Expr::col(lost_from)),
        )
        .and_where(journal_offsets::Column::Stream.eq(stream))
        .to_owned();
    db.execute(&update).await?;
    Ok(())
}

/// Gives the lease up (at shutdown), if `writer` holds it.
///
/// # Errors
/// Any database error.
pub async fn release_journal_lease(
    db: &DatabaseConnection,
    stream: &str,
    writer: &str,
) -> Result<(), DbErr> {
    let update = Query::update()
        .table(journal_offsets::Entity)
        .value(journal_offsets::Column::Writer, Option::<String>::None)
        .value(journal_offsets::Column::LeaseUntilMs, 0i64)
        .and_where(journal_offsets::Column::Stream.eq(stream))
        .and_where(journal_offsets::Column::Writer.eq(writer))
        .to_owned();
    db.execute(&update).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batch::Batch;

    #[test]
    fn the_successor_bounds_exactly_the_keys_with_the_prefix() {
        assert_eq!(successor("page:"), Some("page;".to_owned()));
        assert_eq!(successor("a\u{D7FF}"), Some("a\u{E000}".to_owned()));
        assert_eq!(successor("a\u{10FFFF}"), Some("b".to_owned()));
        assert_eq!(successor("\u{10FFFF}"), None);
        for prefix in ["p", "é", "a\u{10FFFF}", "z\u{D7FF}"] {
            let end = successor(prefix).expect("bounded");
            for key in [
                prefix.to_string(),
                format!("{prefix}\u{10FFFF}x"),
                format!("{prefix}\0"),
            ] {
                assert!(
                    key.as_str() >= prefix && key.as_str() < end.as_str(),
                    "{key:?}"
                );
            }
            assert!(!(end.as_str() >= prefix && end.as_str() < end.as_str()));
        }
    }

    #[test]
    fn split_keeps_the_sum_and_the_sign() {
        assert_eq!(split_i64(5), vec![5]);
        assert_eq!(split_i64(-5), vec![-5]);
        let big = 2 * i128::from(i64::MAX) + 7;
        let parts = split_i64(big);
        assert_eq!(parts.len(), 3);
        assert_eq!(parts.iter().map(|p| i128::from(*p)).sum::<i128>(), big);
        let small = 3 * i128::from(i64::MIN);
        assert_eq!(split_i64(small), vec![i64::MIN; 3]);
    }

    #[test]
    fn batches_are_sorted_and_split_into_rounds() {
        let batch = Batch::new(
            [
                ("b".to_owned(), 1),
                ("a".to_owned(), i128::from(i64::MAX) + 1),
            ],
            0,
        );
        assert_eq!(batch.deltas[0].0, "a");
        assert_eq!(
            rounds(&batch.deltas),
            vec![vec![("a", i64::MAX), ("b", 1)], vec![("a", 1)]]
        );
    }
}
