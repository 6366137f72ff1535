use std::{collections::BTreeMap, time::Duration};

use api::ShutdownReport;
use testkit::{TestDb, db_tests};

use crate::helpers::{assert_accepted, spawn_app_with, test_settings};

db_tests!(
    shutdown_writes_everything_pending,
    shutdown_settles_every_batch_it_knows_committed,
    shutdown_with_the_database_unavailable_spills_and_the_next_start_replays,
    a_spilled_batch_that_had_committed_is_not_replayed_twice,
    a_shared_spill_dir_is_replayed_by_whichever_instance_starts_next,
    a_spill_file_that_is_not_utf8_is_set_aside_and_the_others_are_replayed,
    a_second_instance_on_the_same_spill_path_is_refused_at_start,
    a_spill_dir_whose_replay_fails_at_start_does_not_stop_the_start,
    a_damaged_spill_file_is_set_aside_and_the_start_goes_on,
);

/// The files `spill_file` was set aside as (`<name>.<unix ms>.invalid`).
fn set_aside(spill_file: &std::path::Path) -> Vec<std::path::PathBuf> {
    let name = spill_file
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    std::fs::read_dir(api::spill::directory_of(spill_file))
        .unwrap()
        .filter_map(|entry| entry.ok())
        .map(|entry| entry.path())
        .filter(|path| {
            let file = path.file_name().unwrap().to_string_lossy();
            file.starts_with(&format!("{name}.")) && file.ends_with(".invalid")
        })
        .collect()
}

/// A `--spill-path` file that cannot be parsed (a torn disk, someone's
/// editor) stopped every start until a person edited it; it is set aside,
/// as in a spill directory, and the instance starts.
async fn a_damaged_spill_file_is_set_aside_and_the_start_goes_on(db: TestDb) {
    let settings = test_settings(&db);
    std::fs::write(
        &settings.spill_path,
        "{\"batch_id\":\"a\",\"deltas\":[[\"k\",\"1\"]]}\n{torn",
    )
    .unwrap();
    let app = spawn_app_with(db, settings.clone()).await;
    assert!(!settings.spill_path.exists());
    let aside = set_aside(&settings.spill_path);
    assert_eq!(aside.len(), 1, "{aside:?}");
    std::fs::remove_file(&aside[0]).unwrap();
    assert!(app.counters().await.is_empty(), "nothing applied from it");
    app.shut_down_cleanly().await;
}

/// Two running instances on one `--spill-path` replayed and deleted each
/// other's spills (one replaying the file while the other rewrote it lost
/// the other's increments): the second is refused at start, and the path
/// is free again once the first has stopped.
async fn a_second_instance_on_the_same_spill_path_is_refused_at_start(db: TestDb) {
    let settings = test_settings(&db);
    let app = spawn_app_with(db, settings.clone()).await;
    let refused = match api::Application::build(settings.clone()).await {
        Ok(_) => panic!("a second instance started on the same spill file"),
        Err(refused) => refused,
    };
    assert!(
        matches!(
            &refused,
            api::startup::StartupError::Spill(api::spill::SpillError::InUse { .. })
        ),
        "{refused:?}"
    );
    let (report, db) = app.shut_down().await;
    assert_eq!(report, ShutdownReport::Clean);
    let mut lock = settings.spill_path.as_os_str().to_owned();
    lock.push(".lock");
    assert!(!std::path::Path::new(&lock).exists(), "removed at exit");
    spawn_app_with(db, settings).await.shut_down_cleanly().await;
}

/// A spill location the final flush could not write to is refused at
/// start; it used to be found only at the shutdown that needed it, whose
/// increments were then lost.
#[cfg(target_os = "linux")]
#[tokio::test]
/// A missing `--spill-dir` is refused too, not made: a mistyped path would
/// put the spill files where no volume keeps them.
async fn a_spill_path_that_cannot_be_written_is_refused_at_start() {
    let db = TestDb::sqlite().await;
    let base = tempfile::tempdir().unwrap();
    let missing = base.path().join("mistyped");
    let unwritable = test_settings(&db);
    let mut missing_dir = unwritable.clone();
    missing_dir.spill_dir = Some(missing.clone());
    let mut unwritable = unwritable;
    unwritable.spill_path = std::path::PathBuf::from("/proc/increment-test-spill.jsonl");
    for settings in [unwritable, missing_dir] {
        let refused = match api::Application::build(settings).await {
            Ok(_) => panic!("started with a spill location it cannot write"),
            Err(refused) => refused,
        };
        assert!(
            matches!(&refused, api::startup::StartupError::Spill(_)),
            "{refused:?}"
        );
    }
    assert!(!missing.exists(), "not made");
}

/// A file another instance left in the shared spill directory, while the
/// database answers but cannot write (here its table is renamed away): the
/// start goes on, as it does without the file (a start that failed on it
/// would stop every replica), and the rescan replays the file once the
/// database writes again.
async fn a_spill_dir_whose_replay_fails_at_start_does_not_stop_the_start(db: TestDb) {
    let mut settings = test_settings(&db);
    let db = spawn_app_with(db, settings.clone())
        .await
        .shut_down_cleanly()
        .await;
    db.execute("ALTER TABLE counters RENAME TO counters_away")
        .await;
    let shared = tempfile::tempdir().unwrap();
    let spill_dir = shared.path().join("spill");
    std::fs::create_dir_all(&spill_dir).unwrap();
    let left = api::spill::own_file(&spill_dir);
    let batch = std::sync::Arc::new(api::batch::Batch::new([("left".to_owned(), 5)], 1));
    api::spill::write(&left, &[batch]).unwrap();
    settings.spill_dir = Some(spill_dir.clone());
    settings.spill_rescan_interval = Duration::from_millis(100);
    let app = spawn_app_with(db, settings).await;
    assert_accepted(app.increment("new", 1).await).await;
    assert_eq!(api::spill::left_in(&spill_dir).unwrap(), vec![left]);
    app.db
        .execute("ALTER TABLE counters_away RENAME TO counters")
        .await;
    testkit::eventually(
        Duration::from_secs(10),
        "the rescan replays the file",
        || async { app.counters().await.get("left") == Some(&5) },
    )
    .await;
    assert!(api::spill::left_in(&spill_dir).unwrap().is_empty());
    app.flush().await;
    assert_eq!(
        app.counters().await,
        BTreeMap::from([("left".into(), 5), ("new".into(), 1)])
    );
}

/// A rescan replaying another instance's file when shutdown begins (here
/// stuck on a row lock; a large file is the same) used to be waited for
/// until the deadline, leaving this instance's final flush no time: its own
/// increments were spilled though the database was up. The rescan is cut
/// off (the file stays for the next start, which applies it once).
/// PostgreSQL only (row locks).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rescan_replaying_at_shutdown_does_not_hold_up_the_final_flush() {
    let Some(db) = TestDb::postgres().await else {
        return;
    };
    let shared = tempfile::tempdir().unwrap();
    let spill_dir = shared.path().join("spill");
    std::fs::create_dir(&spill_dir).unwrap();
    let mut settings = test_settings(&db);
    settings.shutdown_timeout = Duration::from_secs(3);
    settings.spill_dir = Some(spill_dir.clone());
    settings.spill_rescan_interval = Duration::from_millis(100);
    let app = spawn_app_with(db, settings.clone()).await;
    assert_accepted(app.increment("hot", 1).await).await;
    app.flush().await;
    let (locker, lock) = lock_row(&app, "hot").await;
    let other = api::spill::own_file(&spill_dir);
    let batch = std::sync::Arc::new(api::batch::Batch::new([("hot".to_owned(), 5)], 1));
    api::spill::write(&other, &[batch]).unwrap();
    until_a_session_waits_for_a_lock(&locker).await;
    assert_accepted(app.increment("mine", 2).await).await;
    let (report, db) = tokio::time::timeout(Duration::from_secs(20), app.shut_down())
        .await
        .expect("the shutdown ends");
    assert_eq!(report, ShutdownReport::Clean);
    lock.rollback().await.unwrap();
    assert_eq!(api::spill::left_in(&spill_dir).unwrap(), vec![other]);
    let next = spawn_app_with(db, settings).await;
    assert_eq!(
        next.counters().await,
        BTreeMap::from([("hot".into(), 6), ("mine".into(), 2)])
    );
}

async fn shutdown_writes_everything_pending(db: TestDb) {
    let settings = test_settings(&db);
    let app = spawn_app_with(db, settings).await;
    for (key, value) in [("a", 1), ("b", 2), ("a", 3)] {
        assert_accepted(app.increment(key, value).await).await;
    }
    // The flush interval is an hour: only the shutdown sequence can write.
    let (report, db) = app.shut_down().await;
    assert_eq!(report, ShutdownReport::Clean);
    assert_eq!(
        db.counters().await,
        BTreeMap::from([("a".into(), 4), ("b".into(), 2)])
    );
}

/// The rows of `flush_batches` an instance knows committed are marked
/// settled (pruned after a day; the others are kept 30 days for a retry):
/// every minute while it runs, and the rest at shutdown.
async fn shutdown_settles_every_batch_it_knows_committed(db: TestDb) {
    use sea_orm::EntityTrait;

    let settings = test_settings(&db);
    let app = spawn_app_with(db, settings).await;
    for key in ["a", "b"] {
        assert_accepted(app.increment(key, 1).await).await;
        // The first flush marks at once, the second is within the minute.
        app.flusher.flush_once().await.expect("a flush");
    }
    assert_accepted(app.increment("c", 1).await).await;
    let (report, db) = app.shut_down().await;
    assert_eq!(report, ShutdownReport::Clean);
    let connection = db.connect().await;
    let rows = entity::flush_batches::Entity::find()
        .all(&connection)
        .await
        .expect("the ledger can be read");
    assert_eq!(rows.len(), 3, "{rows:?}");
    assert!(rows.iter().all(|row| row.settled), "{rows:?}");
}

async fn shutdown_with_the_database_unavailable_spills_and_the_next_start_replays(db: TestDb) {
    let spill_dir = tempfile::tempdir().unwrap();
    let mut settings = test_settings(&db);
    settings.shutdown_timeout = Duration::from_secs(1);
    settings.flush_interval = Duration::from_millis(50);
    settings.spill_path = spill_dir.path().join("spill.jsonl");
    let app = spawn_app_with(db, settings.clone()).await;
    assert_accepted(app.increment("stored", 1).await).await;
    app.flush().await;

    app.db
        .execute("ALTER TABLE counters RENAME TO counters_away")
        .await;
    for (key, value) in [("a", 1), ("b", 2), ("a", 3)] {
        assert_accepted(app.increment(key, value).await).await;
    }
    let (report, db) = app.shut_down().await;
    // The flush loop runs meanwhile (every 50 ms): "a" may sit both in the
    // batch in flight and in what came after it, so 2 or 3 rows are spilled.
    assert!(
        matches!(
            report,
            ShutdownReport::Spilled {
                keys: 2..=3,
                total: 6
            }
        ),
        "{report:?}"
    );
    assert!(settings.spill_path.exists(), "the spill file is on disk");

    // The database is back; the next start writes the spill before serving.
    db.execute("ALTER TABLE counters_away RENAME TO counters")
        .await;
    let restarted = spawn_app_with(db, settings.clone()).await;
    assert!(!settings.spill_path.exists(), "replayed and removed");
    assert_eq!(
        restarted.counters().await,
        BTreeMap::from([("a".into(), 4), ("b".into(), 2), ("stored".into(), 1)])
    );
}

async fn a_spilled_batch_that_had_committed_is_not_replayed_twice(db: TestDb) {
    let spill_dir = tempfile::tempdir().unwrap();
    let mut settings = test_settings(&db);
    settings.spill_path = spill_dir.path().join("spill.jsonl");
    let app = spawn_app_with(db, settings.clone()).await;
    // A batch committed, but its answer was lost before the spill.
    let committed = std::sync::Arc::new(api::batch::Batch::new([("k".to_owned(), 5)], 1));
    api::store::write_batch(&app.connection, &committed, chrono::Utc::now(), 2)
        .await
        .unwrap();
    let unwritten = std::sync::Arc::new(api::batch::Batch::new([("k".to_owned(), 2)], 2));
    api::spill::write(&settings.spill_path, &[committed, unwritten]).unwrap();

    let restarted = spawn_app_with(app.crash().await, settings.clone()).await;
    assert_eq!(restarted.counters().await.get("k"), Some(&7));
    assert!(!settings.spill_path.exists());
}

/// Replicas share a spill directory (a named volume): what one spilled at
/// shutdown is replayed by the next start of any of them, each file once; a
/// file another instance is replaying (locked) is left to it.
async fn a_shared_spill_dir_is_replayed_by_whichever_instance_starts_next(db: TestDb) {
    let shared = tempfile::tempdir().unwrap();
    let spill_dir = shared.path().join("spill");
    let mut settings = test_settings(&db);
    settings.shutdown_timeout = Duration::from_secs(1);
    std::fs::create_dir(&spill_dir).unwrap();
    settings.spill_dir = Some(spill_dir.clone());
    let app = spawn_app_with(db, settings.clone()).await;
    app.db
        .execute("ALTER TABLE counters RENAME TO counters_away")
        .await;
    for (key, value) in [("a", 1), ("b", 2)] {
        assert_accepted(app.increment(key, value).await).await;
    }
    let (report, db) = app.shut_down().await;
    assert!(
        matches!(report, ShutdownReport::Spilled { total: 3, .. }),
        "{report:?}"
    );
    let spilled = api::spill::left_in(&spill_dir).unwrap();
    assert_eq!(spilled.len(), 1, "{spilled:?}");
    db.execute("ALTER TABLE counters_away RENAME TO counters")
        .await;

    // Another instance's file, still being replayed by it (locked).
    let other = api::spill::own_file(&spill_dir);
    let batch = std::sync::Arc::new(api::batch::Batch::new([("c".to_owned(), 5)], 1));
    api::spill::write(&other, &[batch]).unwrap();
    let replaying = api::spill::claim(&other).unwrap().expect("not locked yet");

    let replacement = spawn_app_with(db, settings.clone()).await;
    assert_eq!(
        replacement.counters().await,
        BTreeMap::from([("a".into(), 1), ("b".into(), 2)]),
        "the dead instance's file is replayed; the locked one is left"
    );
    assert_eq!(
        api::spill::left_in(&spill_dir).unwrap(),
        vec![other.clone()]
    );

    // Its replayer died without finishing: the lock went with it, and the
    // next start takes the file up.
    drop(replaying);
    let (_, db) = replacement.shut_down().await;
    settings.spill_rescan_interval = Duration::from_millis(100);
    let next = spawn_app_with(db, settings).await;
    assert_eq!(next.counters().await.get("c"), Some(&5));
    assert!(api::spill::left_in(&spill_dir).unwrap().is_empty());

    // While it runs: a replica that stopped and was not replaced left a
    // file, and one file is damaged. The running instance replays the first
    // and sets the second aside; neither stops it.
    let late = api::spill::own_file(&spill_dir);
    let batch = std::sync::Arc::new(api::batch::Batch::new([("d".to_owned(), 7)], 1));
    api::spill::write(&late, &[batch]).unwrap();
    let damaged = spill_dir.join("spill-0000000000000-damaged.jsonl");
    std::fs::write(&damaged, "{not json\n").unwrap();
    testkit::eventually(
        Duration::from_secs(10),
        "the late file replayed, the damaged one set aside",
        || async { next.counters().await.get("d") == Some(&7) && set_aside(&damaged).len() == 1 },
    )
    .await;
    assert!(api::spill::left_in(&spill_dir).unwrap().is_empty());
    assert_eq!(next.counters().await.get("c"), Some(&5), "nothing twice");
}

/// A flush stuck at shutdown (here on a row lock another session holds; a
/// database gone without a reset is the same) must not hold the process
/// past its deadline: the platform's SIGKILL would lose every 202 that the
/// spill would have kept. It is cut off, and what it held is spilled and
/// replayed once. PostgreSQL only (row locks).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flush_stuck_at_shutdown_is_cut_off_at_the_deadline_and_spilled() {
    let Some(db) = TestDb::postgres().await else {
        return;
    };
    let spill_dir = tempfile::tempdir().unwrap();
    let mut settings = test_settings(&db);
    settings.shutdown_timeout = Duration::from_secs(2);
    settings.flush_interval = Duration::from_millis(100);
    settings.spill_path = spill_dir.path().join("spill.jsonl");
    let app = spawn_app_with(db, settings.clone()).await;
    assert_accepted(app.increment("hot", 1).await).await;
    app.flush().await;
    let (locker, lock) = lock_row(&app, "hot").await;
    assert_accepted(app.increment("hot", 1).await).await;
    assert_accepted(app.increment("other", 2).await).await;
    until_a_session_waits_for_a_lock(&locker).await;
    let started = std::time::Instant::now();
    let (report, db) = tokio::time::timeout(Duration::from_secs(20), app.shut_down())
        .await
        .expect("the shutdown ends, near its deadline");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
    assert!(
        matches!(report, ShutdownReport::Spilled { total: 3, .. }),
        "{report:?}"
    );
    lock.rollback().await.unwrap();
    let restarted = spawn_app_with(db, settings.clone()).await;
    assert!(!settings.spill_path.exists(), "replayed and removed");
    assert_eq!(
        restarted.counters().await,
        BTreeMap::from([("hot".into(), 2), ("other".into(), 2)])
    );
}

/// A file in the shared spill directory whose bytes are not UTF-8 (a torn
/// disk, someone's editor) is set aside like any unreadable one: it must not
/// stop every replica's start, nor keep the other files from being replayed.
async fn a_spill_file_that_is_not_utf8_is_set_aside_and_the_others_are_replayed(db: TestDb) {
    let shared = tempfile::tempdir().unwrap();
    let spill_dir = shared.path().join("spill");
    std::fs::create_dir_all(&spill_dir).unwrap();
    let unreadable = spill_dir.join("spill-unreadable.jsonl");
    std::fs::write(&unreadable, b"\xff\xfe{}\n").unwrap();
    let batch = std::sync::Arc::new(api::batch::Batch::new([("c".to_owned(), 5)], 1));
    api::spill::write(&api::spill::own_file(&spill_dir), &[batch]).unwrap();
    let mut settings = test_settings(&db);
    settings.spill_dir = Some(spill_dir.clone());
    let app = spawn_app_with(db, settings).await;
    assert_eq!(app.counters().await.get("c"), Some(&5));
    assert!(!unreadable.exists());
    assert_eq!(set_aside(&unreadable).len(), 1, "kept for a person");
    app.shut_down_cleanly().await;
}

/// A `wait=true` request still waiting when shutdown begins (its flush
/// stuck on a row lock) is answered before the HTTP drain closes its
/// connection: 202 "taken and held", not a reset a client would resend. Its
/// increment is spilled and written once at the next start. PostgreSQL only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_waiting_at_shutdown_is_answered_before_its_connection_closes() {
    let Some(db) = TestDb::postgres().await else {
        return;
    };
    let spill_dir = tempfile::tempdir().unwrap();
    let mut settings = test_settings(&db);
    settings.shutdown_timeout = Duration::from_secs(4);
    settings.wait_timeout = Duration::from_secs(60);
    settings.spill_path = spill_dir.path().join("spill.jsonl");
    let app = spawn_app_with(db, settings.clone()).await;
    assert_accepted(app.increment("hot", 1).await).await;
    app.flush().await;
    let (locker, lock) = lock_row(&app, "hot").await;
    let waiter = {
        let client = app.client.clone();
        tokio::spawn(async move {
            client
                .post("/increment?wait=true")
                .content_type("application/json")
                .body(r#"{"key":"hot","value":1}"#)
                .send()
                .await
        })
    };
    until_a_session_waits_for_a_lock(&locker).await;
    let shutdown = tokio::spawn(app.shut_down());
    let response = waiter.await.expect("the waiter ran");
    response.assert_status(http::StatusCode::ACCEPTED);
    let body: serde_json::Value = serde_json::from_str(&response.text()).unwrap();
    assert_eq!(body["committed"], false, "{body}");
    assert!(
        body["detail"].as_str().unwrap().contains("shutting down"),
        "{body}"
    );
    let (report, db) = shutdown.await.unwrap();
    assert!(
        matches!(report, ShutdownReport::Spilled { total: 1, .. }),
        "{report:?}"
    );
    lock.rollback().await.unwrap();
    let restarted = spawn_app_with(db, settings.clone()).await;
    assert_eq!(restarted.counters().await.get("hot"), Some(&2));
}

/// Locks `key`'s row in a transaction of its own (PostgreSQL); the lock is
/// held until the transaction is dropped or rolled back.
async fn lock_row(
    app: &crate::helpers::TestApp,
    key: &str,
) -> (sea_orm::DatabaseConnection, sea_orm::DatabaseTransaction) {
    use sea_orm::{ConnectionTrait, TransactionTrait};
    let locker = app.db.connect().await;
    let lock = locker.begin().await.unwrap();
    lock.execute_unprepared(&format!(
        "SELECT 1 FROM counters WHERE key = '{key}' FOR UPDATE"
    ))
    .await
    .unwrap();
    (locker, lock)
}

/// Waits until some session of the test database waits for a row lock.
async fn until_a_session_waits_for_a_lock(locker: &sea_orm::DatabaseConnection) {
    use sea_orm::ConnectionTrait;
    testkit::eventually(
        Duration::from_secs(20),
        "a session waits for the row lock",
        || async {
            let row = locker
                .query_one_raw(sea_orm::Statement::from_string(
                    sea_orm::DbBackend::Postgres,
                    "SELECT count(*) AS waiting FROM pg_stat_activity \
                     WHERE wait_event_type = 'Lock' AND datname = current_database()",
                ))
                .await
                .unwrap()
                .unwrap();
            row.try_get::<i64>("", "waiting").unwrap() > 0
        },
    )
    .await;
}
