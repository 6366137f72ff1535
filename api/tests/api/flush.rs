use std::{collections::BTreeMap, sync::Arc, time::Duration};

use api::{FlushOutcome, batch::Batch, store};
use rand::Rng;
use testkit::{Backend, TestDb, db_tests};

use crate::helpers::{assert_accepted, spawn_app, spawn_app_with, test_settings};

db_tests!(
    a_poison_row_is_recorded_and_the_others_are_written,
    a_sum_outside_i64_is_applied_whole_or_rejected_whole,
    a_failed_flush_keeps_its_batch_and_retries_it_exactly_once,
    a_replayed_batch_is_not_applied_twice,
    parts_of_a_large_batch_commit_on_their_own_and_each_exactly_once,
    large_batches_are_chunked_under_the_bind_limit,
    a_usual_flush_on_postgres_goes_in_paced_statements,
    a_flush_just_over_one_part_is_paced_and_a_backlog_is_not,
    a_durable_message_read_ends_the_pacing_of_the_next_flush_only,
    concurrent_increments_under_eviction_and_expiry_are_written_exactly_once,
    a_drain_cut_off_by_the_shutdown_deadline_is_still_accounted_for,
    a_cancelled_flush_leaves_its_batch_to_the_next_one,
);

/// Keys recorded straight into the batcher: enough that a drain (take, sort,
/// split) lasts long enough to be cut off.
const MANY_KEYS: usize = 200_000;

fn record_many(app: &crate::helpers::TestApp) {
    let batcher = Arc::clone(&app.batcher);
    for i in 0..MANY_KEYS {
        batcher.record(&format!("k{i:06}"), 1).expect("recorded");
    }
}

async fn stored_total(app: &crate::helpers::TestApp) -> i128 {
    app.counters().await.values().map(|v| i128::from(*v)).sum()
}

/// The shutdown deadline passes while the final flush's drain runs in its
/// blocking task: what that drain took must be reported unwritten (to be
/// spilled), not vanish between the batcher and the batch in flight.
async fn a_drain_cut_off_by_the_shutdown_deadline_is_still_accounted_for(db: TestDb) {
    let app = spawn_app(db).await;
    record_many(&app);
    let unwritten = match app
        .flusher
        .flush_remaining(tokio::time::Instant::now())
        .await
    {
        Ok(()) => 0,
        Err(unwritten) => unwritten.total,
    };
    assert_eq!(
        stored_total(&app).await + unwritten,
        MANY_KEYS as i128,
        "every increment is written or reported unwritten"
    );
}

/// A flush cancelled while its drain runs (a client that gives up on
/// `POST /admin/flush`, a deadline) leaves a drain running on its own; the
/// next flush must write that drain's batch too, not replace it with its own.
async fn a_cancelled_flush_leaves_its_batch_to_the_next_one(db: TestDb) {
    let app = spawn_app(db).await;
    let batcher = Arc::clone(&app.batcher);
    record_many(&app);
    let cancelled = tokio::time::timeout(Duration::ZERO, app.flusher.flush_once()).await;
    assert!(cancelled.is_err(), "cancelled at its drain");
    // The orphaned drain has run once it has handed its batch over.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while batcher.handed_over().is_none() {
        assert!(
            std::time::Instant::now() < deadline,
            "the drain never began"
        );
        tokio::task::yield_now().await;
    }
    batcher.record("late", 1).expect("recorded");
    for _ in 0..10 {
        if app.flusher.flush_once().await.expect("the flush succeeds") == FlushOutcome::Empty {
            break;
        }
    }
    assert_eq!(stored_total(&app).await, MANY_KEYS as i128 + 1);
    assert_eq!(app.counters().await.get("late"), Some(&1));
}

async fn a_failed_flush_keeps_its_batch_and_retries_it_exactly_once(db: TestDb) {
    let app = spawn_app(db).await;
    assert_accepted(app.increment("a", 1).await).await;
    assert_accepted(app.increment("b", 2).await).await;

    app.db
        .execute("ALTER TABLE counters RENAME TO counters_away")
        .await;
    assert!(app.flusher.flush_once().await.is_err());
    // Newer increments, on the failed keys and others, while the batch waits.
    assert_accepted(app.increment("a", 10).await).await;
    assert_accepted(app.increment("c", 3).await).await;
    assert!(app.flusher.flush_once().await.is_err(), "still failing");
    app.db
        .execute("ALTER TABLE counters_away RENAME TO counters")
        .await;

    let outcome = app
        .flusher
        .flush_once()
        .await
        .expect("the database is back");
    assert_eq!(
        outcome,
        FlushOutcome::Written {
            keys: 4,
            batches: 2,
            statements: 2
        },
        "the kept batch first, then the newer deltas"
    );
    assert_eq!(
        app.counters().await,
        BTreeMap::from([("a".into(), 11), ("b".into(), 2), ("c".into(), 3)])
    );
    assert_eq!(app.flusher.flush_once().await.unwrap(), FlushOutcome::Empty);
}

async fn a_replayed_batch_is_not_applied_twice(db: TestDb) {
    let app = spawn_app(db).await;
    let batch = Batch::new([("x".to_owned(), 5), ("y".to_owned(), -7)], 0);
    let now = chrono::Utc::now();
    // The first attempt commits but (say) its answer is lost; the flusher
    // retries the same batch.
    let first = store::write_batch(&app.connection, &batch, now, 2)
        .await
        .unwrap();
    assert_eq!(
        first,
        store::WriteOutcome::Committed {
            statements: 1,
            rejected: 0,
            repeats: 0,
            reused: 0,
            resumed: false,
        }
    );
    let retry = store::write_batch(&app.connection, &batch, now, 2)
        .await
        .unwrap();
    assert_eq!(retry, store::WriteOutcome::AlreadyCommitted);
    assert_eq!(
        app.counters().await,
        BTreeMap::from([("x".into(), 5), ("y".into(), -7)])
    );
    // A different batch with the same deltas is new work and is applied.
    let other = Batch::new(batch.deltas.clone(), 0);
    store::write_batch(&app.connection, &other, now, 2)
        .await
        .unwrap();
    assert_eq!(app.counters().await.get("x"), Some(&10));
}

async fn parts_of_a_large_batch_commit_on_their_own_and_each_exactly_once(db: TestDb) {
    let app = spawn_app(db).await;
    let keys = api::batch::PART_ROWS + 10;
    let now = chrono::Utc::now();
    // An earlier attempt committed one part only (the other failed): once the
    // second part, once the first. The retry writes the other part only.
    for (round, committed_earlier) in [1, 0].into_iter().enumerate() {
        let batch = Batch::new((0..keys).map(|i| (format!("r{round}-{i:06}"), 1)), 0);
        assert_eq!(batch.parts.len(), 2);
        let part = &batch.parts[committed_earlier];
        let earlier = Batch::restored(part.id.clone(), batch.rows(part).to_vec());
        store::write_batch(&app.connection, &earlier, now, 1)
            .await
            .unwrap();
        let retry = store::write_batch(&app.connection, &batch, now, 2)
            .await
            .unwrap();
        // It says so: what the earlier part rejected or left out is not in
        // its counts, and the flusher reads it back for the waiters.
        assert!(
            matches!(retry, store::WriteOutcome::Committed { resumed: true, .. }),
            "{retry:?}"
        );
        let counters = app.counters().await;
        assert_eq!(counters.len(), keys * (round + 1), "round {round}");
        assert!(
            counters.values().all(|value| *value == 1),
            "every key once (round {round})"
        );
        assert_eq!(
            store::write_batch(&app.connection, &batch, now, 2)
                .await
                .unwrap(),
            store::WriteOutcome::AlreadyCommitted
        );
        assert_eq!(app.counters().await, counters);
    }
}

async fn large_batches_are_chunked_under_the_bind_limit(db: TestDb) {
    let backend = db.backend;
    let app = spawn_app(db).await;
    let keys = 20_000;
    for i in 0..keys {
        assert_accepted(app.increment(&format!("key-{i:05}"), i).await).await;
    }
    // PostgreSQL writes a usual flush in smaller, paced statements.
    let expected = (keys as usize).div_ceil(match backend {
        Backend::Sqlite => store::SQLITE_ROWS_PER_STATEMENT,
        Backend::Postgres => store::paced_rows(keys as usize),
    });
    assert!(expected > 1, "the test must need several chunks");
    match app.flush().await {
        FlushOutcome::Written {
            keys: written,
            batches: 1,
            statements,
        } => {
            assert_eq!(written, keys as usize);
            assert_eq!(statements, expected);
        }
        other => panic!("expected one batch written, got {other:?}"),
    }
    let counters = app.counters().await;
    assert_eq!(counters.len(), keys as usize);
    assert!((0..keys).all(|i| counters[&format!("key-{i:05}")] == i));
}

/// A usual flush goes in paced statements on PostgreSQL (the first ones
/// followed by pauses): of `POSTGRES_PACED_SHORT_ROWS` rows for a small
/// flush, where unpaced it would be one statement; SQLite is not paced.
/// Totals exact.
async fn a_usual_flush_on_postgres_goes_in_paced_statements(db: TestDb) {
    let backend = db.backend;
    let app = spawn_app(db).await;
    let keys = 3 * store::POSTGRES_PACED_ROWS;
    assert!(keys < store::SQLITE_ROWS_PER_STATEMENT.min(store::POSTGRES_ROWS_PER_STATEMENT));
    assert!(keys <= store::PACED_SHORT_MAX_KEYS, "a small flush");
    for i in 0..keys {
        assert_accepted(app.increment(&format!("paced-{i:05}"), 2).await).await;
    }
    let FlushOutcome::Written {
        keys: written,
        statements,
        ..
    } = app.flush().await
    else {
        panic!("expected a written batch");
    };
    assert_eq!(written, keys);
    match backend {
        Backend::Sqlite => assert_eq!(statements, 1),
        Backend::Postgres => {
            assert_eq!(statements, keys.div_ceil(store::POSTGRES_PACED_SHORT_ROWS))
        }
    }
    let counters = app.counters().await;
    assert_eq!(counters.len(), keys);
    assert!(counters.values().all(|v| *v == 2));
}

/// A flush just over one part (two parts) is paced like a smaller one, its
/// parts one after the other; it used to go at full size on two connections
/// at once, PostgreSQL's largest burst of CPU under steady load. Over
/// `PACED_MAX_KEYS` a batch is a backlog: full-size statements. So is a
/// usual flush while a durable request waits on it (pacing made `wait=true`
/// three times as slow). SQLite is never paced. Totals exact.
async fn a_flush_just_over_one_part_is_paced_and_a_backlog_is_not(db: TestDb) {
    let backend = db.backend;
    let app = spawn_app(db).await;
    let now = chrono::Utc::now();
    let usual = api::batch::PART_ROWS + 1_000;
    assert!(usual > store::PACED_SHORT_MAX_KEYS, "not a small flush");
    let sizes = [
        ("usual", usual, 0),
        ("waited-on", usual, 1),
        ("backlog", store::PACED_MAX_KEYS + 1, 0),
    ];
    for (name, keys, waiters) in sizes {
        let batch = Batch::new((0..keys).map(|i| (format!("{name}-{i:06}"), 1)), 0);
        assert!(batch.parts.len() >= 2, "{name}: several parts");
        let rows_per_statement = match (backend, name) {
            (Backend::Sqlite, _) => store::SQLITE_ROWS_PER_STATEMENT,
            (Backend::Postgres, "usual") => store::POSTGRES_PACED_ROWS,
            (Backend::Postgres, _) => store::POSTGRES_ROWS_PER_STATEMENT,
        };
        let expected: usize = batch
            .parts
            .iter()
            .map(|part| batch.rows(part).len().div_ceil(rows_per_statement))
            .sum();
        let waiters = std::sync::atomic::AtomicUsize::new(waiters);
        let written = store::write_batch_keyed(
            &app.connection,
            &batch,
            now,
            2,
            store::DEFAULT_IDEMPOTENCY_WINDOW,
            &waiters,
        )
        .await;
        match written {
            Ok(store::WriteOutcome::Committed { statements, .. }) => {
                assert_eq!(statements, expected, "{name}");
            }
            other => panic!("{name}: expected the batch committed, got {other:?}"),
        }
    }
    let counters = app.counters().await;
    assert_eq!(
        counters.len(),
        sizes.iter().map(|(_, keys, _)| keys).sum::<usize>()
    );
    assert!(counters.values().all(|v| *v == 1));
}

/// With the journal on, a durable request's message is read by whichever
/// instance's reader gets it, where no `wait=true` request counts as a
/// waiter: the reader's word that it read one must end the pacing of the
/// flush that writes it, and of that one only. Totals exact.
async fn a_durable_message_read_ends_the_pacing_of_the_next_flush_only(db: TestDb) {
    let backend = db.backend;
    let connection = crate::helpers::migrated_connection(&db).await;
    let keys = 3 * store::POSTGRES_PACED_ROWS;
    // No flush loop: the early flush it is asked for would race this one.
    let (batcher, flusher) =
        crate::helpers::loopless_flusher(&connection, 2 * keys as u64, Duration::from_secs(3600));
    let paced = match backend {
        Backend::Sqlite => 1,
        Backend::Postgres => keys.div_ceil(store::paced_rows(keys)),
    };
    for (round, durable_read, expected) in [(0, true, 1), (1, false, paced)] {
        for i in 0..keys {
            batcher
                .record(&format!("durable-{i:05}"), 1)
                .expect("recorded");
        }
        if durable_read {
            // Twice, as by two messages before one drain: still one flush.
            flusher.request_durable_flush();
            flusher.request_durable_flush();
        }
        let Ok(FlushOutcome::Written { statements, .. }) = flusher.flush_once().await else {
            panic!("round {round}: expected a written batch");
        };
        assert_eq!(statements, expected, "round {round}");
    }
    let counters = db.counters().await;
    assert_eq!(counters.len(), keys);
    assert!(counters.values().all(|v| *v == 2));
}

async fn concurrent_increments_under_eviction_and_expiry_are_written_exactly_once(db: TestDb) {
    let mut settings = test_settings(&db);
    // Tiny and short-lived: most increments race an eviction or an expiry.
    settings.cache_capacity = std::num::NonZeroU64::new(8).unwrap();
    settings.cache_ttl = Duration::from_millis(5);
    let app = Arc::new(spawn_app_with(db, settings).await);

    let flushing = Arc::new(std::sync::atomic::AtomicBool::new(true));
    // Flush count, so writers can wait for drains to happen mid-stream.
    let (flushed, flushes_seen) = tokio::sync::watch::channel(0u64);
    let flusher = {
        let app = Arc::clone(&app);
        let flushing = Arc::clone(&flushing);
        tokio::spawn(async move {
            let mut flushes = 0;
            while flushing.load(std::sync::atomic::Ordering::SeqCst) {
                app.flusher.flush_once().await.expect("flushes succeed");
                flushes += 1;
                flushed.send_replace(flushes);
                tokio::task::yield_now().await;
            }
            flushes
        })
    };
    let writers: Vec<_> = (0..8)
        .map(|_| {
            let app = Arc::clone(&app);
            let mut flushes_seen = flushes_seen.clone();
            tokio::spawn(async move {
                let mut sent: BTreeMap<String, i64> = BTreeMap::new();
                for i in 0..1_500 {
                    if i % 300 == 299 {
                        // Let at least one drain run in the middle of this stream.
                        let seen = *flushes_seen.borrow_and_update();
                        flushes_seen.wait_for(|n| *n > seen).await.unwrap();
                    }
                    let (key, value) = {
                        let mut rng = rand::rng();
                        let key = if rng.random_bool(0.5) {
                            format!("hot-{}", rng.random_range(0..3))
                        } else {
                            format!("cold-{}", rng.random_range(0..200))
                        };
                        (key, rng.random_range(-1_000..=1_000))
                    };
                    assert_accepted(app.increment(&key, value).await).await;
                    *sent.entry(key).or_insert(0) += value;
                }
                sent
            })
        })
        .collect();
    let mut expected: BTreeMap<String, i64> = BTreeMap::new();
    for writer in writers {
        for (key, value) in writer.await.unwrap() {
            *expected.entry(key).or_insert(0) += value;
        }
    }
    flushing.store(false, std::sync::atomic::Ordering::SeqCst);
    let flushes = flusher.await.unwrap();
    assert!(
        flushes >= 4,
        "drains ran while requests were recorded ({flushes})"
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    app.flusher
        .flush_remaining(deadline)
        .await
        .expect("everything is written");
    assert_eq!(app.counters().await, expected);
}

/// A key's batched sum outside `i64` (deltas merged after an eviction or a
/// failed flush) is written in several same-sign parts. When its stored total
/// cannot take the whole sum, no part may stay applied: a `wait=true` request
/// is told `422` for it, and a retry of a partly applied sum would count twice.
async fn a_sum_outside_i64_is_applied_whole_or_rejected_whole(db: TestDb) {
    use sea_orm::EntityTrait;

    let app = spawn_app(db).await;
    let now = chrono::Utc::now();
    // "low" is stored at -5 and "high" at 10; the same sum, MAX + 10, then
    // fits neither. Its parts (MAX, then 10): for "low" the first fits and the
    // second does not; for "high" the first does not and the second would.
    let stored = Batch::new([("low".to_owned(), -5), ("high".to_owned(), 10)], 0);
    store::write_batch(&app.connection, &stored, now, 2)
        .await
        .unwrap();
    let big = i128::from(i64::MAX) + 10;
    // "fits" is stored at -20: its sum of MAX + 15 lands in range, part by part.
    let fits_first = Batch::new([("fits".to_owned(), -20)], 0);
    store::write_batch(&app.connection, &fits_first, now, 2)
        .await
        .unwrap();
    // "new" is not stored: its first part would create the row.
    let batch = Batch::new(
        [
            ("fits".to_owned(), i128::from(i64::MAX) + 15),
            ("high".to_owned(), big),
            ("low".to_owned(), big),
            ("new".to_owned(), i128::from(i64::MAX) + 1),
            ("other".to_owned(), 1),
        ],
        0,
    );
    let outcome = store::write_batch(&app.connection, &batch, now, 2)
        .await
        .unwrap();
    assert!(
        matches!(outcome, store::WriteOutcome::Committed { .. }),
        "{outcome:?}"
    );
    assert_eq!(
        app.counters().await,
        BTreeMap::from([
            ("fits".into(), i64::MAX - 5),
            ("high".into(), 10),
            ("low".into(), -5),
            ("other".into(), 1),
        ]),
        "a sum that does not fit leaves its key as it was (a new key unwritten)"
    );
    let connection = app.db.connect().await;
    let mut rejected: BTreeMap<String, i128> = BTreeMap::new();
    for row in entity::rejected_increments::Entity::find()
        .all(&connection)
        .await
        .unwrap()
    {
        *rejected.entry(row.key).or_default() += i128::from(row.delta);
    }
    assert_eq!(
        rejected,
        BTreeMap::from([
            ("high".into(), big),
            ("low".into(), big),
            ("new".into(), i128::from(i64::MAX) + 1),
        ]),
        "the whole sum is recorded as rejected"
    );
}

async fn a_poison_row_is_recorded_and_the_others_are_written(db: TestDb) {
    use sea_orm::{EntityTrait, QueryOrder};

    let app = spawn_app(db).await;
    assert_accepted(app.increment("poison", i64::MAX).await).await;
    assert_accepted(app.increment("negative", i64::MIN).await).await;
    assert_accepted(app.increment("fine", 1).await).await;
    app.flush().await;

    // Second flush: both poison keys would leave bigint; the others are written.
    assert_accepted(app.increment("poison", i64::MAX).await).await;
    assert_accepted(app.increment("negative", -1).await).await;
    assert_accepted(app.increment("fine", 2).await).await;
    assert_accepted(app.increment("new", 3).await).await;
    let outcome = app
        .flusher
        .flush_once()
        .await
        .expect("the flush commits the other keys");
    assert!(
        matches!(outcome, FlushOutcome::Written { keys: 4, .. }),
        "{outcome:?}"
    );
    assert_eq!(
        app.counters().await,
        BTreeMap::from([
            ("fine".into(), 3),
            ("negative".into(), i64::MIN),
            ("new".into(), 3),
            ("poison".into(), i64::MAX),
        ])
    );
    let connection = app.db.connect().await;
    let rejected = entity::rejected_increments::Entity::find()
        .order_by_asc(entity::rejected_increments::Column::Key)
        .all(&connection)
        .await
        .unwrap();
    let rows: Vec<(&str, i64)> = rejected.iter().map(|r| (r.key.as_str(), r.delta)).collect();
    assert_eq!(rows, [("negative", -1), ("poison", i64::MAX)]);
    assert!(rejected.iter().all(|r| r.reason.contains("bigint")));
    let metrics = app.scrape().await;
    assert!(
        metrics.contains("increment_rejected_rows_total 2"),
        "{metrics}"
    );

    // The key is not stuck: a delta that fits is applied by the next flush.
    assert_accepted(app.increment("poison", -1).await).await;
    app.flush().await;
    assert_eq!(app.counters().await.get("poison"), Some(&(i64::MAX - 1)));
}
