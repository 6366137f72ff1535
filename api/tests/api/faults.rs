//! Faults between the service and PostgreSQL, through a TCP proxy that can
//! refuse and cut connections: an outage under load, and a COMMIT whose
//! answer never arrives. PostgreSQL only (skipped without TEST_DATABASE_URL).

use std::{
    collections::BTreeMap,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use api::{FlushOutcome, Settings, ShutdownReport};
use rand::Rng;
use testkit::{TestApp, TestDb, eventually, proxy::FaultProxy};

async fn through_proxy() -> Option<(TestDb, FaultProxy, Settings)> {
    let db = TestDb::postgres().await?;
    let proxy = FaultProxy::start(db.postgres_addr().expect("a PostgreSQL address")).await;
    let mut settings = Settings::with_database(proxy.url_for(&db.url));
    settings.db_pool_size = 4;
    settings.spill_path = testkit::app::own_spill_path();
    Some((db, proxy, settings))
}

/// Two instances on one database, flushing only when told: the first
/// through the proxy, the second directly.
async fn through_proxy_and_direct() -> Option<(FaultProxy, TestApp, TestApp)> {
    let (db, proxy, mut settings) = through_proxy().await?;
    settings.flush_interval = Duration::from_secs(3600);
    let alias = db.alias();
    let proxied = TestApp::start(db, settings).await;
    let direct = TestApp::start_with(alias, |settings| {
        settings.flush_interval = Duration::from_secs(3600);
    })
    .await;
    Some((proxy, proxied, direct))
}

/// Polls `url` until it answers `status`, for at most `within`.
async fn wait_for_status(client: &reqwest::Client, url: &str, status: u16, within: Duration) {
    eventually(within, &format!("{url} answers {status}"), || async {
        client
            .get(url)
            .send()
            .await
            .is_ok_and(|response| response.status() == status)
    })
    .await;
}

/// `increment_flush_failures_total` as scraped from `url`.
async fn flush_failures(client: &reqwest::Client, url: &str) -> f64 {
    let Ok(response) = client.get(url).send().await else {
        return 0.0;
    };
    let text = response.text().await.unwrap_or_default();
    text.lines()
        .find_map(|line| line.strip_prefix("increment_flush_failures_total "))
        .and_then(|value| value.trim().parse().ok())
        .unwrap_or(0.0)
}

#[derive(Default)]
struct Tally {
    accepted: parking_lot::Mutex<BTreeMap<String, i64>>,
    /// Requests answered 202.
    accepted_requests: AtomicU64,
    unavailable: AtomicU64,
    unavailable_without_retry_after: AtomicU64,
    other: AtomicU64,
}

/// Sends increments on `keys` until `running` turns false.
async fn load(
    base: String,
    keys: std::ops::Range<u32>,
    running: Arc<AtomicBool>,
    tally: Arc<Tally>,
) {
    let client = reqwest::Client::new();
    while running.load(Ordering::SeqCst) {
        let (key, value) = {
            let mut rng = rand::rng();
            (
                format!("k{}", rng.random_range(keys.clone())),
                rng.random_range(-100..=100),
            )
        };
        let sent = client
            .post(format!("{base}/increment"))
            .header("content-type", "application/json")
            .body(format!(r#"{{"key":"{key}","value":{value}}}"#))
            .send()
            .await;
        match sent.map(|r| (r.status().as_u16(), r.headers().contains_key("retry-after"))) {
            Ok((202, _)) => {
                *tally.accepted.lock().entry(key).or_insert(0) += value;
                tally.accepted_requests.fetch_add(1, Ordering::SeqCst);
            }
            Ok((503, retry_after)) => {
                tally.unavailable.fetch_add(1, Ordering::SeqCst);
                if !retry_after {
                    tally
                        .unavailable_without_retry_after
                        .fetch_add(1, Ordering::SeqCst);
                }
            }
            _ => {
                tally.other.fetch_add(1, Ordering::SeqCst);
            }
        }
    }
}

/// Start-up before the database answers (containers started together): it
/// keeps trying with backoff and starts once the database is there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_up_waits_for_a_database_that_comes_late() {
    let Some((db, proxy, mut settings)) = through_proxy().await else {
        return;
    };
    proxy.refuse();
    settings.db_connect_timeout = Duration::from_secs(30);
    let building = tokio::spawn(api::Application::build(settings));
    // The outage itself: long enough for several attempts (250 ms, 500 ms, …).
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    assert!(!building.is_finished(), "still waiting for the database");
    proxy.restore();
    let app = tokio::time::timeout(Duration::from_secs(20), building)
        .await
        .expect("started within 20 s of the database's return")
        .expect("the task ran")
        .expect("started");
    assert!(app.local_addr().port() > 0);
    drop(app);
    drop(db);
}

/// Load runs; the database becomes unreachable and new keys push past the
/// pending-key bound; it comes back. Every 202 is stored exactly once, 503s
/// come only past the bound (with Retry-After), and /readyz follows the
/// database.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_under_load_loses_nothing_and_doubles_nothing() {
    let Some((db, proxy, mut settings)) = through_proxy().await else {
        return;
    };
    settings.flush_interval = Duration::from_millis(100);
    settings.max_pending_keys = 500;
    let app = TestApp::start(db, settings).await;
    let base = app.url("");
    let client = reqwest::Client::new();
    let ready = format!("{base}/readyz");
    let tally = Arc::new(Tally::default());

    // Phase 1: 300 keys, database healthy.
    let running = Arc::new(AtomicBool::new(true));
    let held: Vec<_> = (0..4)
        .map(|_| {
            tokio::spawn(load(
                base.clone(),
                0..300,
                Arc::clone(&running),
                Arc::clone(&tally),
            ))
        })
        .collect();
    let accepted = || tally.accepted_requests.load(Ordering::SeqCst);
    let written = || async { !app.counters().await.is_empty() };
    eventually(
        Duration::from_secs(30),
        "load is taken and written",
        || async { accepted() >= 1_000 && written().await },
    )
    .await;
    assert_eq!(
        tally.unavailable.load(Ordering::SeqCst),
        0,
        "no 503 while healthy"
    );

    // Phase 2: the database is unreachable.
    proxy.refuse();
    wait_for_status(&client, &ready, 503, Duration::from_secs(10)).await;
    let before = accepted();
    eventually(
        Duration::from_secs(30),
        "load is taken during the outage",
        || std::future::ready(accepted() >= before + 1_000),
    )
    .await;
    assert_eq!(
        tally.unavailable.load(Ordering::SeqCst),
        0,
        "300 keys stay under the bound of 500: every increment is still taken"
    );
    // New keys push past the bound: 503 with Retry-After, never a silent drop.
    let fresh: Vec<_> = (0..4)
        .map(|_| {
            tokio::spawn(load(
                base.clone(),
                1_000..3_000,
                Arc::clone(&running),
                Arc::clone(&tally),
            ))
        })
        .collect();
    eventually(Duration::from_secs(30), "503s past the bound", || {
        std::future::ready(tally.unavailable.load(Ordering::SeqCst) >= 100)
    })
    .await;
    assert_eq!(
        tally.unavailable_without_retry_after.load(Ordering::SeqCst),
        0
    );
    // Long enough for the retry backoff to have grown past the flush interval
    // several times over (recovery must not wait out the whole backoff).
    let metrics = format!("{base}/metrics");
    eventually(Duration::from_secs(30), "five failed flushes", || async {
        flush_failures(&client, &metrics).await >= 5.0
    })
    .await;
    let distinct_accepted = tally.accepted.lock().len();
    assert!(
        distinct_accepted >= 500 - 8,
        "the bound is not hit early ({distinct_accepted})"
    );

    // Phase 3: back. Readiness follows; the loop writes everything.
    proxy.restore();
    wait_for_status(&client, &ready, 200, Duration::from_secs(15)).await;
    let before = accepted();
    eventually(
        Duration::from_secs(30),
        "load is taken after the outage",
        || std::future::ready(accepted() >= before + 1_000),
    )
    .await;
    running.store(false, Ordering::SeqCst);
    for task in held.into_iter().chain(fresh) {
        task.await.unwrap();
    }
    assert_eq!(tally.other.load(Ordering::SeqCst), 0, "only 202 and 503");
    let (report, db) = app.shut_down().await;
    assert_eq!(report, ShutdownReport::Clean);
    let expected = std::mem::take(&mut *tally.accepted.lock());
    assert_eq!(
        db.counters().await,
        expected,
        "every 202 stored exactly once"
    );
}

/// The connection breaks after COMMIT reached the server and before its
/// answer: the retry must find the batch committed and not add it again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ambiguous_commit_is_not_applied_twice() {
    let Some((db, proxy, mut settings)) = through_proxy().await else {
        return;
    };
    settings.flush_interval = Duration::from_secs(3600);
    let app = TestApp::start(db, settings).await;
    for (key, value) in [("a", 1), ("b", 2), ("a", 3)] {
        app.increment(key, value)
            .await
            .assert_status(poem::http::StatusCode::ACCEPTED);
    }
    let flusher = &app.flusher;

    proxy.cut_after_next_commit();
    assert!(
        flusher.flush_once().await.is_err(),
        "the COMMIT's answer never came"
    );
    assert_eq!(proxy.swallowed_commits(), 1);
    let committed = BTreeMap::from([("a".to_owned(), 4), ("b".to_owned(), 2)]);
    assert_eq!(app.counters().await, committed, "the server did commit");

    // More traffic while the batch's fate is unknown to the service.
    app.increment("a", 10)
        .await
        .assert_status(poem::http::StatusCode::ACCEPTED);
    let retry = flusher.flush_once().await.expect("the retry succeeds");
    assert!(
        matches!(retry, FlushOutcome::Written { batches: 2, .. }),
        "{retry:?}"
    );
    assert_eq!(
        app.counters().await,
        BTreeMap::from([("a".to_owned(), 14), ("b".to_owned(), 2)]),
        "the committed batch was not added again"
    );
}

/// The ledger row of a batch whose COMMIT went unanswered is what keeps
/// its retry out; the retry may come more than a day on (an outage, a
/// spill replayed later). Another instance pruned every row older than a
/// day, that one too, and the retry was applied again: a doubled batch
/// (found by review). Only rows their writer has settled (it knows they
/// committed) go after a day now; the others stay for 30 days.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ambiguous_commit_retried_after_a_day_is_not_applied_twice() {
    use entity::flush_batches;
    use sea_orm::{ColumnTrait, EntityTrait, QueryFilter};

    let Some((proxy, cut_off, other)) = through_proxy_and_direct().await else {
        return;
    };
    for (key, value) in [("a", 1), ("b", 2), ("a", 3)] {
        cut_off
            .increment(key, value)
            .await
            .assert_status(poem::http::StatusCode::ACCEPTED);
    }
    proxy.cut_after_next_commit();
    assert!(cut_off.flusher.flush_once().await.is_err());
    assert_eq!(proxy.swallowed_commits(), 1);

    // A day and more goes by: the unanswered batch's row, and one left by
    // an instance killed a month ago, are old.
    other
        .db
        .execute(
            "UPDATE flush_batches SET committed_at = committed_at - interval '25 hours';
             INSERT INTO flush_batches (batch_id, keys, committed_at)
             VALUES ('killed-a-month-ago', 1, now() - interval '31 days')",
        )
        .await;
    let day_old = || async {
        let day_ago = chrono::Utc::now() - chrono::Duration::hours(24);
        let rows = flush_batches::Entity::find()
            .filter(flush_batches::Column::CommittedAt.lt(day_ago))
            .all(&other.connection)
            .await
            .expect("the ledger can be read");
        rows.into_iter().map(|row| row.batch_id).collect::<Vec<_>>()
    };
    let old_rows = day_old().await;
    assert!(
        old_rows.len() == 2 && old_rows.iter().any(|id| id == "killed-a-month-ago"),
        "the unanswered batch's row and the month-old one: {old_rows:?}"
    );

    // The other instance flushes, and prunes on its first flush.
    other
        .increment("c", 1)
        .await
        .assert_status(poem::http::StatusCode::ACCEPTED);
    other.flusher.flush_once().await.expect("a direct flush");
    let left = day_old().await;
    assert!(
        !left.iter().any(|id| id == "killed-a-month-ago"),
        "the month-old row is pruned: {left:?}"
    );

    let retry = cut_off
        .flusher
        .flush_once()
        .await
        .expect("the retry succeeds");
    assert!(
        matches!(retry, FlushOutcome::Written { batches: 1, .. }),
        "{retry:?}"
    );
    assert_eq!(
        other.db.counters().await,
        BTreeMap::from([
            ("a".to_owned(), 4),
            ("b".to_owned(), 2),
            ("c".to_owned(), 1)
        ]),
        "the committed batch was not added again"
    );
    assert!(
        day_old().await.is_empty(),
        "settled by the retry, the day-old row is pruned"
    );
}

/// A counter read holds drains off while it asks the database; one that
/// stops answering in the middle of it (no reset, no error) must not hold
/// them, and the read, for good: the read gives up with `503`, and flushes go on once the
/// database answers again.
#[tokio::test]
async fn a_counter_read_from_a_database_that_stopped_answering_gives_up() {
    let Some((db, proxy, mut settings)) = through_proxy().await else {
        return;
    };
    settings.flush_interval = Duration::from_secs(3600);
    let app = TestApp::start(db, settings).await;
    app.increment("k", 1)
        .await
        .assert_status(poem::http::StatusCode::ACCEPTED);
    // Taken from the pool (and checked by its ping) while healthy.
    proxy.freeze_after(b"FROM flush_batches WHERE batch_id");
    let read = tokio::time::timeout(
        Duration::from_secs(20),
        app.client.get("/counters/k").send(),
    )
    .await
    .expect("the read gives up within 20 s");
    read.assert_status(poem::http::StatusCode::SERVICE_UNAVAILABLE);
    proxy.thaw();
    let flushed = tokio::time::timeout(Duration::from_secs(20), app.flusher.flush_once()).await;
    assert!(
        matches!(flushed, Ok(Ok(FlushOutcome::Written { .. }))),
        "the flush goes on: {flushed:?}"
    );
    assert_eq!(app.counters().await, BTreeMap::from([("k".to_owned(), 1)]));
}

/// A batch committed with a waiting request's row rejected, and reading its
/// rejected keys back then hangs (the database stops answering): the waiter
/// must not hear "held and will be written". Nothing is held for it any
/// more, and its row was rejected.
#[tokio::test]
async fn a_waiter_whose_batch_committed_is_not_told_held_when_its_fate_cannot_be_read() {
    let Some((db, proxy, mut settings)) = through_proxy().await else {
        return;
    };
    settings.flush_interval = Duration::from_secs(3600);
    settings.wait_timeout = Duration::from_secs(5);
    let app = TestApp::start(db, settings).await;
    crate::helpers::post_waiting(&app, "edge", i64::MAX)
        .await
        .assert_status(poem::http::StatusCode::OK);
    crate::helpers::waiter_told_committed_when_its_row_is_unread(
        &app,
        &proxy,
        b"\"rejected_increments\".\"batch_id\" IN",
        "edge",
    )
    .await;
    assert_eq!(
        app.counters().await,
        BTreeMap::from([("edge".to_owned(), i64::MAX)])
    );
}

/// Keyed requests are held whole until written (one per `Idempotency-Key`,
/// not merged by counter), so while the database is down they count toward
/// the pending bound: past it, 503 `pending-limit` instead of memory that
/// grows with every request. Every 202 is applied once the database is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyed_requests_held_through_an_outage_stop_at_the_pending_bound() {
    let Some((db, proxy, mut settings)) = through_proxy().await else {
        return;
    };
    settings.flush_interval = Duration::from_millis(100);
    settings.max_pending_keys = 50;
    // The look-up would only time out here; the bound is what is tested.
    settings.idempotency_lookup = false;
    let app = TestApp::start(db, settings).await;
    proxy.refuse();
    let (mut accepted, mut refused) = (0_i64, 0);
    for i in 0..200 {
        let response = app
            .client
            .post("/increment")
            .header("idempotency-key", format!("\"outage-{i}\""))
            .content_type("application/json")
            .body(r#"{"key":"one-counter","value":1}"#)
            .send()
            .await;
        match response.status() {
            http::StatusCode::ACCEPTED => accepted += 1,
            http::StatusCode::SERVICE_UNAVAILABLE => {
                assert!(response.header("retry-after").is_some());
                assert!(response.text().contains("/problems/pending-limit"));
                refused += 1;
            }
            other => panic!("during the outage: {other}"),
        }
    }
    // One distinct counter plus, per keyed request, its item and its key:
    // 24 under the bound of 50, give or take one taken while a drain hands
    // over.
    assert!((20..=26).contains(&accepted), "{accepted} taken");
    assert_eq!(refused, 200 - accepted);
    // The gauge operators watch counts what the bound counts (it counted
    // the one counter only).
    let scrape = app.scrape().await;
    let gauge: i64 = scrape
        .lines()
        .find_map(|line| line.strip_prefix("increment_pending_keys "))
        .and_then(|value| value.trim().parse().ok())
        .expect("the pending-keys gauge");
    assert!(gauge >= 40, "increment_pending_keys {gauge}");
    proxy.restore();
    eventually(Duration::from_secs(30), "every 202 is applied", || async {
        app.counters().await.get("one-counter") == Some(&accepted)
    })
    .await;
    let (report, db) = app.shut_down().await;
    assert_eq!(report, ShutdownReport::Clean);
    assert_eq!(db.counters().await.get("one-counter"), Some(&accepted));
}

/// A flush whose connection went silent inside its transaction (a
/// partition: no reset, no close) kept its row locks until the server
/// noticed, by TCP keepalive hours later, and another instance's flush of
/// the same keys waited as long (found by review). The server now ends such
/// a session after 30 s idle in its transaction: the other flush goes
/// through, and the silent instance writes its batch once when it is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flush_gone_silent_in_its_transaction_does_not_hold_other_instances_back() {
    let Some((proxy, silent, direct)) = through_proxy_and_direct().await else {
        return;
    };
    for (app, value) in [(&silent, 1), (&direct, 2)] {
        app.increment("locked-by-the-silent-one", value)
            .await
            .assert_status(poem::http::StatusCode::ACCEPTED);
    }
    // Its upsert's parameters (the key, bound after the statement was
    // prepared) reach the server, which takes the row's lock; the answer,
    // and everything after, is held.
    proxy.freeze_after(b"locked-by-the-silent-one");
    let silent_flusher = Arc::clone(&silent.flusher);
    let silent_flush = tokio::spawn(async move { silent_flusher.flush_once().await });
    eventually(Duration::from_secs(10), "the upsert was sent", || async {
        proxy.is_frozen()
    })
    .await;
    let flushed = tokio::time::timeout(Duration::from_secs(90), direct.flusher.flush_once()).await;
    assert!(
        matches!(flushed, Ok(Ok(FlushOutcome::Written { .. }))),
        "the other instance's flush goes through: {flushed:?}"
    );
    proxy.thaw();
    let first = tokio::time::timeout(Duration::from_secs(30), silent_flush)
        .await
        .expect("the silent flush ends once thawed")
        .expect("no panic");
    assert!(first.is_err(), "its session was ended: {first:?}");
    let retried = tokio::time::timeout(Duration::from_secs(30), silent.flusher.flush_once()).await;
    assert!(
        matches!(retried, Ok(Ok(FlushOutcome::Written { .. }))),
        "{retried:?}"
    );
    assert_eq!(
        direct.counters().await,
        BTreeMap::from([("locked-by-the-silent-one".to_owned(), 3)])
    );
}
