use std::{collections::BTreeMap, sync::Arc, time::Duration};

use poem::http::StatusCode;
use testkit::{TestDb, db_tests};

use crate::helpers::{
    assert_accepted, error_message, post_waiting, spawn_app, spawn_app_with, test_settings,
};

// No flush loop is started here: the application's own loop runs (interval
// one hour in the test settings), so only the early flushes that durable
// requests ask for happen.

db_tests!(
    wait_true_answers_200_only_once_committed,
    wait_true_answers_202_not_committed_when_the_flush_cannot_commit_in_time,
    new_keys_get_503_past_the_pending_bound,
    wait_true_does_not_answer_200_for_a_row_rejected_as_an_overflow,
    wait_true_told_422_for_a_sum_outside_i64_was_not_applied_at_all,
    wait_true_hears_a_rejection_committed_by_an_earlier_attempt_of_its_batch,
);

async fn wait_true_does_not_answer_200_for_a_row_rejected_as_an_overflow(db: TestDb) {
    let app = spawn_app(db).await;
    assert_accepted(app.increment("full", i64::MAX).await).await;
    app.flush().await;
    // Fits the pending sum, not the stored total: the flush commits without it.
    let response = post_waiting(&app, "full", 1).await;
    let problem = crate::helpers::problem(response, StatusCode::UNPROCESSABLE_ENTITY).await;
    assert_eq!(problem.type_uri, "/problems/counter-overflow");
    // Another key in a waiting request is still confirmed as written.
    post_waiting(&app, "fine", 2)
        .await
        .assert_status(StatusCode::OK);
    let counters = app.counters().await;
    assert_eq!(counters.get("full"), Some(&i64::MAX));
    assert_eq!(counters.get("fine"), Some(&2));
    let metrics = app.scrape().await;
    assert!(
        metrics.contains("increment_rejected_rows_total 1"),
        "the rejected row is counted"
    );
}

/// A plain delta in the key's slot and a waiting one beside it sum past
/// `i64`: the flush writes the sum in parts. The `422` the waiter hears means
/// "not applied", so no part of that sum may stay in the counter.
async fn wait_true_told_422_for_a_sum_outside_i64_was_not_applied_at_all(db: TestDb) {
    let app = spawn_app(db).await;
    assert_accepted(app.increment("edge", 5).await).await;
    let response = post_waiting(&app, "edge", i64::MAX).await;
    let problem = crate::helpers::problem(response, StatusCode::UNPROCESSABLE_ENTITY).await;
    assert_eq!(problem.type_uri, "/problems/counter-overflow");
    assert_eq!(
        app.counters().await.get("edge"),
        None,
        "nothing of the sum the waiter was part of is stored, not even a row"
    );
}

async fn wait_true_answers_200_only_once_committed(db: TestDb) {
    let app = Arc::new(spawn_app(db).await);
    let response = post_waiting(&app, "durable", 3).await;
    response.assert_status(StatusCode::OK);
    response.assert_bytes(b"");
    assert_eq!(
        app.counters().await.get("durable"),
        Some(&3),
        "in the database when the 200 arrives"
    );

    // Many waiters at once share flushes (group commit).
    let waiters = 50;
    let tasks: Vec<_> = (0..waiters)
        .map(|i| {
            let app = Arc::clone(&app);
            tokio::spawn(
                async move { post_waiting(&app, &format!("w{}", i % 5), 1).await.status() },
            )
        })
        .collect();
    for task in tasks {
        assert_eq!(task.await.unwrap(), StatusCode::OK);
    }
    let counters = app.counters().await;
    assert_eq!(
        (0..5).map(|i| counters[&format!("w{i}")]).sum::<i64>(),
        waiters
    );
    let metrics = app.scrape().await;
    let flushes: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("increment_flush_keys_count "))
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        flushes < f64::from(waiters as i32),
        "{flushes} flushes for {waiters} waiters"
    );
}

async fn wait_true_answers_202_not_committed_when_the_flush_cannot_commit_in_time(db: TestDb) {
    let mut settings = test_settings(&db);
    settings.wait_timeout = Duration::from_millis(300);
    let app = spawn_app_with(db, settings).await;
    app.db
        .execute("ALTER TABLE counters RENAME TO counters_away")
        .await;

    // Taken, not confirmed: 202 (503 would tell the client to resend it).
    let response = post_waiting(&app, "late", 4).await;
    response.assert_status(StatusCode::ACCEPTED);
    assert!(response.headers().get("retry-after").is_none());
    let body: serde_json::Value = response.json();
    assert_eq!(body["committed"], serde_json::json!(false));
    let detail = body["detail"].as_str().expect("a detail");
    assert!(detail.contains("do not resend"), "{detail}");

    // It was accepted all the same: once the database is back it is written, once.
    app.db
        .execute("ALTER TABLE counters_away RENAME TO counters")
        .await;
    app.flush().await;
    assert_eq!(app.counters().await, BTreeMap::from([("late".into(), 4)]));
}

async fn new_keys_get_503_past_the_pending_bound(db: TestDb) {
    let mut settings = test_settings(&db);
    settings.max_pending_keys = 3;
    let app = spawn_app_with(db, settings).await;
    for key in ["a", "b", "c"] {
        assert_accepted(app.increment(key, 1).await).await;
    }
    let refused = app.increment("d", 1).await;
    assert_eq!(
        refused.headers()["retry-after"],
        "3600",
        "about one flush interval"
    );
    let message = error_message(refused, StatusCode::SERVICE_UNAVAILABLE).await;
    assert!(message.contains("nothing was taken"), "{message}");
    assert_accepted(app.increment("a", 10).await).await;
    let batch = app
        .client
        .post("/increments")
        .content_type("application/json")
        .body(r#"{"increments": [{"key": "a", "value": 1}, {"key": "e", "value": 1}]}"#)
        .send()
        .await;
    error_message(batch, StatusCode::SERVICE_UNAVAILABLE).await;

    app.flush().await;
    assert_accepted(app.increment("d", 1).await).await;
    app.flush().await;
    assert_eq!(
        app.counters().await,
        BTreeMap::from([
            ("a".into(), 11),
            ("b".into(), 1),
            ("c".into(), 1),
            ("d".into(), 1)
        ])
    );
    let metrics = app.scrape().await;
    assert!(
        metrics.contains("increment_increments_rejected_total{reason=\"unavailable\"} 2"),
        "{metrics}"
    );
}

/// The `wait=true` deadline, in virtual time: a wait that nothing commits
/// ends at exactly its timeout, not before; a wait whose drain has already
/// committed returns at once. (Under `tokio::time::pause`, so the test takes
/// no real seconds; the database is touched only before time is paused.)
#[tokio::test]
async fn a_durable_wait_ends_at_its_deadline_in_virtual_time() {
    use api::flusher::WaitOutcome;

    let db = TestDb::sqlite().await;
    let connection = crate::helpers::migrated_connection(&db).await;
    let (batcher, flusher) =
        crate::helpers::loopless_flusher(&connection, 100, Duration::from_secs(60));
    let committed = batcher.record_durable("done", 1).expect("recorded");
    flusher.flush_once().await.expect("the flush succeeds");
    let pending = batcher.record_durable("waiting", 1).expect("recorded");

    tokio::time::pause();
    let start = tokio::time::Instant::now();
    assert_eq!(
        flusher
            .wait_committed(committed, "done", false, Duration::from_secs(5))
            .await,
        WaitOutcome::Committed
    );
    assert_eq!(
        start.elapsed(),
        Duration::ZERO,
        "already committed: no wait"
    );
    assert_eq!(
        flusher
            .wait_committed(pending, "waiting", false, Duration::from_secs(5))
            .await,
        WaitOutcome::TimedOut
    );
    // Timers tick in whole milliseconds: the deadline, rounded up.
    let waited = start.elapsed();
    assert!(
        waited >= Duration::from_secs(5) && waited <= Duration::from_millis(5_001),
        "nothing flushed: the wait ends at its deadline ({waited:?})"
    );
}

/// A batch of two parts (over `PART_ROWS` keys): the first commits, with
/// the waiter's row rejected, and the second fails (a trigger refuses one of
/// its keys). The retry finds the first part committed and writes only the
/// second; the waiter must still hear the rejection, not "written".
async fn wait_true_hears_a_rejection_committed_by_an_earlier_attempt_of_its_batch(db: TestDb) {
    let (trap, untrap) = match db.backend {
        testkit::Backend::Postgres => (
            "CREATE FUNCTION trap() RETURNS trigger AS $$ BEGIN \
             IF NEW.key = 'zz-trap' THEN RAISE EXCEPTION 'trapped'; END IF; RETURN NEW; \
             END $$ LANGUAGE plpgsql; \
             CREATE TRIGGER trap BEFORE INSERT ON counters FOR EACH ROW EXECUTE FUNCTION trap()",
            "DROP TRIGGER trap ON counters",
        ),
        testkit::Backend::Sqlite => (
            "CREATE TRIGGER trap BEFORE INSERT ON counters WHEN NEW.key = 'zz-trap' \
             BEGIN SELECT RAISE(ABORT, 'trapped'); END",
            "DROP TRIGGER trap",
        ),
    };
    let mut settings = test_settings(&db);
    settings.wait_timeout = Duration::from_secs(60);
    let app = Arc::new(spawn_app_with(db, settings).await);
    assert_accepted(app.increment("a-full", i64::MAX).await).await;
    app.flush().await;
    app.db.execute(trap).await;
    // "a-full" sorts into the first part, "zz-trap" into the second.
    let keys = api::batch::PART_ROWS + 10;
    for i in 0..keys {
        app.batcher
            .record(&format!("m{i:06}"), 1)
            .expect("recorded");
    }
    app.batcher.record("zz-trap", 1).expect("recorded");
    let waiter = {
        let app = Arc::clone(&app);
        tokio::spawn(async move { post_waiting(&app, "a-full", 1).await })
    };
    testkit::eventually(Duration::from_secs(60), "the first part commits", || {
        let db = &app.db;
        async move { db.counters().await.contains_key("m000000") }
    })
    .await;
    assert!(
        !app.db.counters().await.contains_key("zz-trap"),
        "the second part failed"
    );
    app.db.execute(untrap).await;
    app.flusher
        .flush_once()
        .await
        .expect("the retry writes the second part");
    let response = waiter.await.expect("the waiter ran");
    let problem = crate::helpers::problem(response, StatusCode::UNPROCESSABLE_ENTITY).await;
    assert_eq!(problem.type_uri, "/problems/counter-overflow");
    let counters = app.db.counters().await;
    assert_eq!(counters.len(), keys + 2);
    assert_eq!((counters["a-full"], counters["zz-trap"]), (i64::MAX, 1));
}
