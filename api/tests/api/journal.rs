//! The journal mode (`--journal-url`) with a private nats-server: a 202 is
//! stored in the stream, applied once, and a 503 means nothing was taken.

use std::{sync::Arc, time::Duration};

use crate::helpers::post_waiting;
use api::{
    Batcher, FlushOutcome, Flusher, ShutdownReport,
    journal::{Cursor, JournalSettings, codec::Message},
};
use http::StatusCode;
use testkit::{NatsServer, TestApp, TestDb, db_tests, eventually};

fn journaled(nats: &NatsServer) -> impl FnOnce(&mut api::Settings) + '_ {
    move |settings| {
        let mut journal = JournalSettings::new(nats.url());
        journal.ack_timeout = Duration::from_secs(2);
        settings.journal = Some(journal);
        settings.flush_interval = Duration::from_millis(100);
    }
}

db_tests!(
    every_202_is_applied_once_through_the_journal,
    with_nats_unreachable_increments_get_503_and_nothing_is_counted,
    a_second_writer_of_the_same_messages_applies_nothing,
    durable_requests_on_an_instance_that_is_not_the_writer_are_answered_once_applied,
    a_durable_request_whose_row_is_rejected_hears_counter_overflow,
    a_consumer_that_recreates_itself_from_the_stream_start_applies_nothing_twice,
    applied_messages_stay_in_the_stream_for_its_duplicate_window,
    messages_another_publisher_wrote_that_could_never_be_applied_are_skipped,
    a_lost_stream_stops_the_start_instead_of_being_read_from_the_stored_offset,
    a_stream_created_again_under_a_running_writer_is_not_read_from_the_stored_offset,
    a_stream_created_again_is_not_applied_by_the_writer_after_another_instance_saw_it,
    an_unconfirmed_keyed_request_keeps_its_key_from_another_body,
    a_stream_whose_messages_cannot_hold_a_request_stops_the_start,
    after_a_writer_crashes_the_next_instance_takes_its_lease_and_its_backlog,
);

async fn every_202_is_applied_once_through_the_journal(db: TestDb) {
    let nats = NatsServer::start();
    let app = TestApp::start_with(db, journaled(&nats)).await;
    for _ in 0..50 {
        app.increment("page:home", 2)
            .await
            .assert_status(StatusCode::ACCEPTED);
    }
    let batch = app
        .client
        .post("/increments")
        .content_type("application/json")
        .body(r#"{"increments":[{"key":"a","value":1},{"key":"b","value":-3},{"key":"a","value":4}]}"#)
        .send()
        .await;
    batch.assert_status(StatusCode::ACCEPTED);
    // A key's values whose total fits are taken whatever their order (the
    // publisher summed them item by item in i64 and refused this one).
    app.client
        .post("/increments")
        .content_type("application/json")
        .body(r#"{"increments":[{"key":"mid","value":9223372036854775807},{"key":"mid","value":1},{"key":"mid","value":-1}]}"#)
        .send()
        .await
        .assert_status(StatusCode::ACCEPTED);
    let durable = app
        .client
        .post("/increment?wait=true")
        .content_type("application/json")
        .body(r#"{"key":"durable","value":7}"#)
        .send()
        .await;
    durable.assert_status(StatusCode::OK);
    // Answered 200: applied by the time of the answer.
    assert_eq!(app.db.counters().await.get("durable"), Some(&7));
    eventually(Duration::from_secs(20), "every 202 is applied", || async {
        app.db.counters().await.get("page:home") == Some(&100)
    })
    .await;
    let scrape = app.scrape().await;
    assert!(scrape.contains("increment_journal_writer 1"), "{scrape}");
    let (report, db) = app.shut_down().await;
    assert_eq!(report, ShutdownReport::Clean);
    let counters = db.counters().await;
    assert_eq!(
        (
            counters["page:home"],
            counters["a"],
            counters["b"],
            counters["durable"],
            counters["mid"]
        ),
        (100, 5, -3, 7, i64::MAX)
    );
}

async fn with_nats_unreachable_increments_get_503_and_nothing_is_counted(db: TestDb) {
    let mut nats = NatsServer::start();
    let app = TestApp::start_with(db, journaled(&nats)).await;
    app.increment("k", 1)
        .await
        .assert_status(StatusCode::ACCEPTED);
    nats.kill();
    let mut unconfirmed = 0;
    // The client notices the lost connection within moments; until then an
    // attempt may be unconfirmed (504), never 202.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let response = app.increment("k", 1).await;
        match response.status() {
            StatusCode::SERVICE_UNAVAILABLE => {
                assert!(response.header("retry-after").is_some());
                assert!(response.text().contains("/problems/journal-unavailable"));
                break;
            }
            StatusCode::GATEWAY_TIMEOUT => unconfirmed += 1,
            other => panic!("with NATS down: {other}"),
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "a 503 within 20 s of NATS going away"
        );
    }
    for _ in 0..20 {
        app.increment("k", 1)
            .await
            .assert_status(StatusCode::SERVICE_UNAVAILABLE);
    }
    nats.restart();
    eventually(
        Duration::from_secs(30),
        "202 again once NATS is back",
        || async { app.increment("k", 100).await.status() == StatusCode::ACCEPTED },
    )
    .await;
    // The first 1, the 100 that got a 202; each unconfirmed 1 at most once;
    // none of the 21+ refused ones.
    eventually(
        Duration::from_secs(30),
        "the accepted increments are applied",
        || async { app.db.counters().await.get("k").is_some_and(|v| *v >= 101) },
    )
    .await;
    let (_, db) = app.shut_down().await;
    let stored = db.counters().await["k"];
    assert!(
        (101..=101 + unconfirmed).contains(&stored),
        "stored {stored}: 101 accepted, {unconfirmed} unconfirmed, 21 or more refused"
    );
}

/// Two writers read the same journal messages (a crash between commit and
/// purge, a lease taken over while the old holder still flushes): the
/// stored offset lets only the first batch commit.
async fn a_second_writer_of_the_same_messages_applies_nothing(db: TestDb) {
    let connection = crate::helpers::migrated_connection(&db).await;
    let writer = |cursor: &Arc<Cursor>| journal_writer(&connection, cursor);
    let (first_cursor, second_cursor) = (Cursor::new("s"), Cursor::new("s"));
    let (first_batcher, first) = writer(&first_cursor);
    let (second_batcher, second) = writer(&second_cursor);
    api::store::journal_applied_through(&connection, "s")
        .await
        .unwrap();
    let messages: [&[(&str, i64)]; 3] = [&[("x", 1), ("y", 2)], &[("x", 10)], &[("z", -5)]];
    let first_reading = first_cursor.start_reading(0);
    let second_reading = second_cursor.start_reading(0);
    for (sequence, items) in (1..).zip(messages) {
        let message = message(items);
        first_cursor
            .record(
                first_reading,
                sequence,
                &first_batcher,
                &message,
                chrono::Utc::now(),
            )
            .unwrap();
        second_cursor
            .record(
                second_reading,
                sequence,
                &second_batcher,
                &message,
                chrono::Utc::now(),
            )
            .unwrap();
    }
    assert!(matches!(
        first.flush_once().await.unwrap(),
        FlushOutcome::Written { keys: 3, .. }
    ));
    second.flush_once().await.unwrap();
    assert!(
        !second_cursor.is_current(second_reading),
        "the second reading is abandoned"
    );
    assert_eq!(
        second_batcher.pending_keys(),
        0,
        "and what it held is dropped"
    );
    let stored = db.counters().await;
    assert_eq!((stored["x"], stored["y"], stored["z"]), (11, 2, -5));
    assert_eq!(
        api::store::journal_applied_through(&connection, "s")
            .await
            .unwrap(),
        3
    );
    // Read again from the stored offset, the second writer goes on.
    let reading = second_cursor.start_reading(3);
    second_cursor
        .record(
            reading,
            4,
            &second_batcher,
            &message(&[("x", 100)]),
            chrono::Utc::now(),
        )
        .unwrap();
    second.flush_once().await.unwrap();
    assert_eq!(db.counters().await["x"], 111);
    assert_eq!(second_cursor.applied(), 4);
}

/// A keyed request whose publish was never acknowledged (`504`: it may be
/// stored, and is once the server answers again) holds its key here: the
/// key reused with another body is refused, not answered `202` and then
/// left out when the first is applied; the same body again is taken, and
/// applied once.
async fn an_unconfirmed_keyed_request_keeps_its_key_from_another_body(db: TestDb) {
    let nats = NatsServer::start();
    let app = TestApp::start_with(db, journaled(&nats)).await;
    let post = |value: i64| {
        app.client
            .post("/increment")
            .header("idempotency-key", "order-1")
            .content_type("application/json")
            .body(serde_json::json!({ "key": "paid", "value": value }).to_string())
            .send()
    };
    nats.pause();
    post(1).await.assert_status(StatusCode::GATEWAY_TIMEOUT);
    nats.resume();
    let reused = post(2).await;
    reused.assert_status(StatusCode::UNPROCESSABLE_ENTITY);
    let problem: serde_json::Value = reused.json();
    assert_eq!(
        problem["type"], "/problems/idempotency-key-reused",
        "{problem}"
    );
    post(1).await.assert_status(StatusCode::ACCEPTED);
    eventually(
        Duration::from_secs(20),
        "the first body applied",
        || async { app.db.counters().await.get("paid") == Some(&1) },
    )
    .await;
    let db = app.shut_down_cleanly().await;
    assert_eq!(
        db.counters().await.get("paid"),
        Some(&1),
        "applied once, the other body never"
    );
}

/// A PostgreSQL database behind a fault proxy (its URL through the proxy)
/// and a nats-server; `None` without PostgreSQL.
async fn through_proxy() -> Option<(TestDb, testkit::proxy::FaultProxy, NatsServer, String)> {
    let db = TestDb::postgres().await?;
    let proxy =
        testkit::proxy::FaultProxy::start(db.postgres_addr().expect("a PostgreSQL address")).await;
    let url = proxy.url_for(&db.url);
    Some((db, proxy, NatsServer::start(), url))
}

/// Journal mode: the message holding a waiting request is applied with its
/// row rejected, and the waiter's question about its row then hangs (the
/// database stops answering): it must not hear "held and will be written".
/// PostgreSQL only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_journal_waiter_whose_message_was_applied_is_not_told_held_when_its_fate_cannot_be_read()
{
    let Some((db, proxy, nats, url)) = through_proxy().await else {
        return;
    };
    let app = TestApp::start_with(db, |settings| {
        journaled(&nats)(settings);
        settings.database_url = url;
        settings.wait_timeout = Duration::from_secs(3);
    })
    .await;
    post_waiting(&app, "full", i64::MAX)
        .await
        .assert_status(StatusCode::OK);
    crate::helpers::waiter_told_committed_when_its_row_is_unread(
        &app,
        &proxy,
        b"\"rejected_increments\".\"key\" = ",
        "full",
    )
    .await;
    assert_eq!(app.db.counters().await.get("full"), Some(&i64::MAX));
}

/// Resident memory of this process (the application runs in it), in bytes.
fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| {
            rest.trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<u64>()
                .ok()
        })
        .map_or(0, |kib| kib * 1024)
}

/// A 15 s PostgreSQL outage under load with the journal on: `202`s go on
/// (the journal holds the backlog, not memory), readiness stays up, and
/// every `202` is applied once the database is back. PostgreSQL only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_outage_keeps_taking_increments_into_the_journal() {
    use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
    let Some((db, proxy, nats, url)) = through_proxy().await else {
        return;
    };
    let app = Arc::new(
        TestApp::start_with(db, |settings| {
            journaled(&nats)(settings);
            settings.database_url = url;
        })
        .await,
    );
    const KEYS: usize = 8;
    let acked: Arc<[AtomicI64; KEYS]> = Arc::new(Default::default());
    let others = Arc::new(AtomicI64::new(0));
    let running = Arc::new(AtomicBool::new(true));
    let clients: Vec<_> = (0..8)
        .map(|client| {
            let (app, acked, others, running) = (
                Arc::clone(&app),
                Arc::clone(&acked),
                Arc::clone(&others),
                Arc::clone(&running),
            );
            tokio::spawn(async move {
                let mut i = client;
                while running.load(Ordering::SeqCst) {
                    i += 1;
                    let key = i % KEYS;
                    match app.increment(&format!("k{key}"), 1).await.status() {
                        StatusCode::ACCEPTED => {
                            acked[key].fetch_add(1, Ordering::SeqCst);
                        }
                        _ => {
                            others.fetch_add(1, Ordering::SeqCst);
                        }
                    }
                }
            })
        })
        .collect();
    let total = || acked.iter().map(|a| a.load(Ordering::SeqCst)).sum::<i64>();
    eventually(
        Duration::from_secs(30),
        "load is taken and written",
        || async { total() >= 1_000 && !app.counters().await.is_empty() },
    )
    .await;

    proxy.refuse();
    proxy.cut_all();
    let at_outage = total();
    let mut rss = Vec::new();
    let outage = tokio::time::Instant::now();
    while outage.elapsed() < Duration::from_secs(15) {
        tokio::time::sleep(Duration::from_secs(1)).await;
        rss.push(rss_bytes());
        assert!(
            app.ready().await,
            "ready while the journal takes increments"
        );
    }
    let during = total() - at_outage;
    assert!(
        during >= 2_000,
        "only {during} increments taken during the outage"
    );
    let grown = rss.last().unwrap().saturating_sub(rss[1]);
    println!(
        "outage: {during} increments answered 202 in 15 s; RSS {} → {} MiB",
        rss[1] >> 20,
        rss.last().unwrap() >> 20
    );
    assert!(
        grown < 64 << 20,
        "memory grew by {} MiB: {rss:?}",
        grown >> 20
    );

    proxy.restore();
    let before = total();
    eventually(
        Duration::from_secs(30),
        "load is taken after the outage",
        || std::future::ready(total() >= before + 1_000),
    )
    .await;
    running.store(false, Ordering::SeqCst);
    for client in clients {
        client.await.unwrap();
    }
    assert_eq!(others.load(Ordering::SeqCst), 0, "every request got a 202");
    let expected: Vec<i64> = acked.iter().map(|a| a.load(Ordering::SeqCst)).collect();
    eventually(Duration::from_secs(60), "every 202 is applied", || async {
        let stored = app.counters().await;
        (0..KEYS).all(|k| stored.get(&format!("k{k}")) == Some(&expected[k]))
    })
    .await;
    let app = Arc::into_inner(app).expect("the clients are done");
    let (report, db) = app.shut_down().await;
    assert_eq!(report, ShutdownReport::Clean);
    let stored = db.counters().await;
    for k in 0..KEYS {
        assert_eq!(stored[&format!("k{k}")], expected[k], "k{k}");
    }
}

/// The COMMIT that applied journal messages succeeds but its answer never
/// arrives, and the instance dies before it learns or purges anything: the
/// next instance reads from the stored offset and applies nothing twice.
/// PostgreSQL only (the proxy).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_between_commit_and_acknowledgement_applies_nothing_twice() {
    let Some((db, proxy, nats, url)) = through_proxy().await else {
        return;
    };
    let settings = |settings: &mut api::Settings| {
        journaled(&nats)(settings);
        settings.database_url = url.clone();
        // Only the test's flushes write.
        settings.flush_interval = Duration::from_secs(3600);
    };
    let app = TestApp::start_with(db, settings).await;
    for (key, value) in [("a", 1), ("b", 2), ("a", 3)] {
        app.increment(key, value)
            .await
            .assert_status(StatusCode::ACCEPTED);
    }
    eventually(
        Duration::from_secs(20),
        "the reader took the three messages",
        || async {
            app.batcher.pending_for("a") == Some(4) && app.batcher.pending_for("b") == Some(2)
        },
    )
    .await;
    proxy.cut_after_next_commit();
    assert!(
        app.flusher.flush_once().await.is_err(),
        "the COMMIT's answer never came"
    );
    assert_eq!(proxy.swallowed_commits(), 1);
    let committed = [("a".to_owned(), 4), ("b".to_owned(), 2)].into();
    assert_eq!(app.counters().await, committed, "the server did commit");
    let db = app.crash().await;

    let app = TestApp::start_with(db, settings).await;
    app.increment("b", 10)
        .await
        .assert_status(StatusCode::ACCEPTED);
    until_recorded(&app, "b", 10).await;
    app.flusher.flush_once().await.expect("the flush succeeds");
    assert_eq!(
        app.counters().await,
        [("a".to_owned(), 4), ("b".to_owned(), 12)].into(),
        "the committed messages were not applied again"
    );
    app.shut_down_cleanly().await;
}

/// A batcher and a flusher applying what `cursor` records, driven by the
/// test alone (no flush loop, no reader).
fn journal_writer(
    connection: &sea_orm::DatabaseConnection,
    cursor: &Arc<Cursor>,
) -> (Arc<Batcher>, Arc<Flusher>) {
    let (batcher, flusher) =
        crate::helpers::loopless_flusher(connection, 1000, Duration::from_secs(3600));
    let flusher = flusher.with_journal(Arc::clone(cursor));
    (batcher, Arc::new(flusher))
}

/// A journal message holding `items` only.
fn message<'a>(items: &[(&'a str, i64)]) -> Message<'a> {
    Message {
        items: items.to_vec(),
        keyed: Vec::new(),
    }
}

/// Two instances on one stream: the first holds the writer lease (waited
/// for), the second does not.
async fn writer_and_other(db: TestDb, nats: &NatsServer) -> (TestApp, TestApp) {
    let alias = db.alias();
    let writer = TestApp::start_with(db, journaled(nats)).await;
    until_it_holds_the_lease(&writer).await;
    let other = TestApp::start_with(alias, journaled(nats)).await;
    (writer, other)
}

/// Waits until the instance's reader has recorded journal messages adding
/// up to `pending` for `key`.
async fn until_recorded(app: &TestApp, key: &str, pending: i128) {
    eventually(
        Duration::from_secs(30),
        "the reader recorded the messages",
        || async { app.batcher.pending_for(key) == Some(pending) },
    )
    .await;
}

async fn until_it_holds_the_lease(app: &TestApp) {
    eventually(Duration::from_secs(20), "it holds the lease", || async {
        app.scrape().await.contains("increment_journal_writer 1\n")
    })
    .await;
}

/// A crashed writer leaves nothing running: nothing of it renews its lease
/// or applies what it recorded, so the next instance takes the lease once
/// it runs out and applies the messages the crashed one never wrote.
async fn after_a_writer_crashes_the_next_instance_takes_its_lease_and_its_backlog(db: TestDb) {
    let nats = NatsServer::start();
    let only_explicit_flushes = |settings: &mut api::Settings| {
        journaled(&nats)(settings);
        settings.flush_interval = Duration::from_secs(3600);
    };
    let app = TestApp::start_with(db, only_explicit_flushes).await;
    until_it_holds_the_lease(&app).await;
    app.increment("a", 5)
        .await
        .assert_status(StatusCode::ACCEPTED);
    until_recorded(&app, "a", 5).await;
    let db = app.crash().await;

    let app = TestApp::start_with(db, only_explicit_flushes).await;
    until_it_holds_the_lease(&app).await;
    // The crashed writer's backlog.
    until_recorded(&app, "a", 5).await;
    app.flush().await;
    assert_eq!(app.counters().await, [("a".to_owned(), 5)].into());
    app.shut_down_cleanly().await;
}

/// Durable requests on an instance without the writer lease learn from the
/// stored offset (one poll for all of them) that their message was applied.
async fn durable_requests_on_an_instance_that_is_not_the_writer_are_answered_once_applied(
    db: TestDb,
) {
    let nats = NatsServer::start();
    let (writer, other) = writer_and_other(db, &nats).await;
    assert!(
        other
            .scrape()
            .await
            .contains("increment_journal_writer 0\n")
    );
    let requests = (0..40).map(|i| {
        other
            .client
            .post("/increment?wait=true")
            .content_type("application/json")
            .body(format!(r#"{{"key":"durable-{}","value":1}}"#, i % 4))
            .send()
    });
    for response in futures::future::join_all(requests).await {
        response.assert_status(StatusCode::OK);
    }
    let counters = writer.db.counters().await;
    for key in 0..4 {
        assert_eq!(
            counters.get(&format!("durable-{key}")),
            Some(&10),
            "{counters:?}"
        );
    }
    let (_, _) = other.shut_down().await;
    let (report, _) = writer.shut_down().await;
    assert_eq!(report, ShutdownReport::Clean);
}

/// `wait=true` means "committed to the database" in journal mode too: a
/// request whose row the flush rejected (the stored total would leave
/// `bigint`) hears `counter-overflow`, on the writer and on an instance
/// that learns the offset from the database; others in the same stream
/// still hear 200.
async fn a_durable_request_whose_row_is_rejected_hears_counter_overflow(db: TestDb) {
    let nats = NatsServer::start();
    let (writer, other) = writer_and_other(db, &nats).await;
    post_waiting(&writer, "full", i64::MAX)
        .await
        .assert_status(StatusCode::OK);

    for (app, value) in [(&writer, 1), (&other, 2)] {
        let response = post_waiting(app, "full", value).await;
        response.assert_status(StatusCode::UNPROCESSABLE_ENTITY);
        let problem: serde_json::Value = response.json();
        assert_eq!(problem["type"], "/problems/counter-overflow", "{problem}");
        post_waiting(app, "fine", value)
            .await
            .assert_status(StatusCode::OK);
    }

    let counters = writer.db.counters().await;
    assert_eq!(counters.get("full"), Some(&i64::MAX));
    assert_eq!(counters.get("fine"), Some(&3));
    let scrape = writer.scrape().await;
    assert!(
        scrape.contains("increment_rejected_rows_total 2\n"),
        "{scrape}"
    );
    let (_, _) = other.shut_down().await;
    let (report, _) = writer.shut_down().await;
    assert_eq!(report, ShutdownReport::Clean);
}

/// Messages 1–3 are applied (offset 3) but still in the stream: their writer
/// died before its purge. The next writer reads from 4; its consumer is lost
/// before it delivered anything (a cluster node's loss, an operator), and the
/// client's ordered consumer recreates itself from the stream's first message,
/// not from 4. Those messages must not be applied again.
async fn a_consumer_that_recreates_itself_from_the_stream_start_applies_nothing_twice(db: TestDb) {
    use async_nats::jetstream::message::PublishMessage;
    use futures::TryStreamExt;
    let nats = NatsServer::start();
    let connection = crate::helpers::migrated_connection(&db).await;
    let journal = api::journal::Journal::connect(JournalSettings::new(nats.url()))
        .await
        .expect("the stream");
    let mut body = Vec::new();
    api::journal::codec::encode([("k", 1)], &mut body);
    for id in 1..=3 {
        journal
            .jetstream
            .send_publish(
                journal.settings.subject(),
                PublishMessage::build()
                    .payload(body.clone().into())
                    .message_id(format!("earlier-{id}")),
            )
            .await
            .expect("published")
            .await
            .expect("acknowledged");
    }
    // The earlier writer: applies 1–3, and never purges.
    let cursor = Cursor::new(journal.settings.stream.clone());
    let (batcher, flusher) = journal_writer(&connection, &cursor);
    // Creates the stream's offset row (at 0), as a reader does.
    let applied = api::store::journal_applied_through(&connection, &journal.settings.stream)
        .await
        .expect("the stored offset");
    let reading = cursor.start_reading(applied);
    let message = message(&[("k", 1)]);
    for sequence in 1..=3 {
        cursor
            .record(reading, sequence, &batcher, &message, chrono::Utc::now())
            .expect("recorded");
    }
    flusher.flush_once().await.expect("applied");
    assert_eq!(db.counters().await["k"], 3);

    let app = TestApp::start_with(db, journaled(&nats)).await;
    eventually(Duration::from_secs(20), "the writer lease", || async {
        app.scrape().await.contains("increment_journal_writer 1\n")
    })
    .await;
    // The lease comes first, then the reading's consumer.
    let consumers = || async {
        journal
            .stream
            .consumer_names()
            .try_collect::<Vec<String>>()
            .await
            .expect("the consumers")
    };
    eventually(Duration::from_secs(20), "the writer's consumer", || async {
        !consumers().await.is_empty()
    })
    .await;
    for name in consumers().await {
        journal
            .stream
            .delete_consumer(&name)
            .await
            .expect("deleted");
    }
    // Read in stream order: once "after" is applied, whatever the recreated
    // consumer delivered before it has been applied too.
    increment_until_applied(&app, "after", Duration::from_secs(90)).await;
    assert_eq!(
        app.db.counters().await["k"],
        3,
        "applied messages applied again"
    );
    app.shut_down_cleanly().await;
}

/// A stream created earlier (by hand, by another tool) whose settings would
/// delete increments before they are applied stops the start. Only `discard:
/// old` did; a `max_age` stream lost 202s during a stalled writer (review).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_existing_stream_that_would_delete_unapplied_messages_stops_the_start() {
    use async_nats::jetstream::stream::{Config, DiscardPolicy, RetentionPolicy};
    let nats = NatsServer::start();
    let settings = JournalSettings::new(nats.url());
    let client = async_nats::connect(nats.url()).await.expect("connected");
    let jetstream = async_nats::jetstream::new(client);
    let safe = stream_by_hand(&settings);
    let unsafe_ones = [
        Config {
            discard: DiscardPolicy::Old,
            ..safe.clone()
        },
        Config {
            max_age: Duration::from_secs(60),
            ..safe.clone()
        },
        Config {
            retention: RetentionPolicy::WorkQueue,
            ..safe.clone()
        },
        Config {
            max_messages_per_subject: 1_000,
            ..safe.clone()
        },
    ];
    for config in unsafe_ones {
        jetstream
            .create_stream(config.clone())
            .await
            .expect("created");
        let refused = api::journal::Journal::connect(settings.clone()).await;
        assert!(
            matches!(refused, Err(api::journal::JournalError::Deletes { .. })),
            "taken: {config:?}"
        );
        jetstream
            .delete_stream(&settings.stream)
            .await
            .expect("deleted");
    }
    let per_subject_new = Config {
        max_messages_per_subject: 1_000,
        discard_new_per_subject: true,
        ..safe
    };
    jetstream
        .create_stream(per_subject_new)
        .await
        .expect("created");
    api::journal::Journal::connect(settings)
        .await
        .expect("a stream that refuses when full is taken");
}

/// A stream created earlier keeps its own duplicate window; a publish
/// retried after the stream forgot its id would be stored twice, so the
/// retries follow the stream's window, not the configured one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_existing_stream_s_duplicate_window_bounds_the_publish_retries() {
    let nats = NatsServer::start();
    let settings = JournalSettings::new(nats.url());
    let client = async_nats::connect(nats.url()).await.expect("connected");
    async_nats::jetstream::new(client)
        .create_stream(async_nats::jetstream::stream::Config {
            name: settings.stream.clone(),
            subjects: vec![settings.subject()],
            storage: async_nats::jetstream::stream::StorageType::File,
            discard: async_nats::jetstream::stream::DiscardPolicy::New,
            duplicate_window: Duration::from_secs(20),
            ..Default::default()
        })
        .await
        .expect("the stream, created earlier");
    assert_eq!(settings.duplicate_window, Duration::from_secs(300));
    let journal = api::journal::Journal::connect(settings)
        .await
        .expect("connected");
    assert_eq!(journal.settings.duplicate_window, Duration::from_secs(20));
}

/// The stream forgets a message id once the message is gone and nats-server
/// restarts (it rebuilds its duplicate memory from the messages it holds): a
/// publish retried after that, its acknowledgement lost, would be stored and
/// applied twice. So an applied message is purged only once it is older
/// than the duplicate window; before, it went at the next lease renewal.
async fn applied_messages_stay_in_the_stream_for_its_duplicate_window(db: TestDb) {
    let nats = NatsServer::start();
    let window = Duration::from_secs(4);
    let app = TestApp::start_with(db, |settings| {
        journaled(&nats)(settings);
        if let Some(journal) = settings.journal.as_mut() {
            journal.duplicate_window = window;
        }
    })
    .await;
    app.increment("k", 1)
        .await
        .assert_status(StatusCode::ACCEPTED);
    eventually(Duration::from_secs(20), "the increment applied", || async {
        app.db.counters().await.get("k") == Some(&1)
    })
    .await;
    let client = async_nats::connect(nats.url()).await.expect("connected");
    let mut stream = async_nats::jetstream::new(client)
        .get_stream(JournalSettings::new(nats.url()).stream)
        .await
        .expect("the stream");
    let published = stream
        .get_raw_message(1)
        .await
        .expect("message 1, applied, still held")
        .time
        .unix_timestamp_nanos();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let state = stream
            .info()
            .await
            .expect("the stream's state")
            .state
            .clone();
        if state.first_sequence > 1 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "message 1 was never purged: {state:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after 1970")
        .as_nanos();
    let held_for = Duration::from_nanos(
        u64::try_from(now.saturating_sub(u128::try_from(published).unwrap_or(0))).unwrap_or(0),
    );
    assert!(
        held_for >= window,
        "message 1 was purged {held_for:?} after it was published, within the {window:?} window"
    );
    app.shut_down_cleanly().await;
}

/// Another publisher on the journal's subject: a key the service would have
/// refused (on PostgreSQL every flush then failed on the column's length,
/// for good) and one key's deltas summing outside i64, in plain items or in
/// keyed requests (the reader waited for room, for good). Both are skipped and counted; what follows them is
/// applied.
async fn messages_another_publisher_wrote_that_could_never_be_applied_are_skipped(db: TestDb) {
    let nats = NatsServer::start();
    let app = TestApp::start_with(db, journaled(&nats)).await;
    let client = async_nats::connect(nats.url()).await.expect("connected");
    let jetstream = async_nats::jetstream::new(client);
    let subject = JournalSettings::new(nats.url()).subject();
    let long_key = "k".repeat(300);
    let mut body = Vec::new();
    let keyed = |key: &str| api::batch::Keyed {
        key: key.to_owned(),
        fingerprint: 1,
        items: vec![("o".to_owned(), i64::MAX)],
        taken_at: None,
    };
    for (items, keyed) in [
        (vec![(long_key.as_str(), 1)], vec![]),
        (vec![("o", i64::MAX), ("o", 1)], vec![]),
        (vec![], vec![keyed("k1"), keyed("k2")]),
    ] {
        api::journal::codec::encode_message(items.into_iter(), &keyed, &mut body);
        jetstream
            .publish(subject.clone(), body.clone().into())
            .await
            .expect("published")
            .await
            .expect("acknowledged");
    }
    increment_until_applied(&app, "after", Duration::from_secs(20)).await;
    let counters = app.db.counters().await;
    assert!(
        !counters.contains_key("o") && !counters.contains_key(&long_key),
        "{counters:?}"
    );
    let scrape = app.scrape().await;
    assert!(
        scrape.contains("increment_journal_unreadable_total 3"),
        "{scrape}"
    );
    app.shut_down_cleanly().await;
}

/// The stream is gone (NATS lost its storage, someone deleted it) while
/// `journal_offsets` says messages up to 3 were applied. Created again and
/// read from the stored offset, its first messages were skipped as applied
/// and `wait=true` answered `200` for them at once (found by review: four
/// `200`s, counter 1). The start now refuses, naming the runbook, whether the
/// stream is missing or was created again by hand.
async fn a_lost_stream_stops_the_start_instead_of_being_read_from_the_stored_offset(db: TestDb) {
    let nats = NatsServer::start();
    let app = TestApp::start_with(db, journaled(&nats)).await;
    apply_three_waiting(&app).await;
    let (report, db) = app.shut_down().await;
    assert_eq!(report, ShutdownReport::Clean);
    let (settings, jetstream) = delete_the_stream(&nats).await;
    let start = || {
        let mut settings = testkit::test_settings(&db);
        journaled(&nats)(&mut settings);
        async move {
            match api::Application::build(settings).await {
                Ok(_) => panic!("started on a lost stream"),
                Err(err) => api::telemetry::error_chain(&err),
            }
        }
    };
    let refused = start().await;
    assert!(
        refused.contains("does not exist") && refused.contains("IncrementJournalStreamLost"),
        "{refused}"
    );
    // Not created by the refused start; created by hand, empty.
    assert!(jetstream.get_stream(&settings.stream).await.is_err());
    jetstream
        .create_stream(stream_by_hand(&settings))
        .await
        .expect("created again");
    let refused = start().await;
    assert!(refused.contains("ends at message 0"), "{refused}");
    assert_eq!(db.counters().await["k"], 3);
}

/// The stream deleted and created again (by hand) while the writer runs:
/// the client's ordered consumer follows it without a word, from the
/// sequence after the last one it saw, so the new stream's first messages
/// were skipped as applied (and the writer went on as if nothing happened).
/// Then the writer found the stream behind the stored offset within a lease
/// renewal, but only paused: once the new stream passed the old offset it
/// read on from there, skipping the new stream's first messages, and a
/// `wait=true` there was answered `200` at once (found by review: 2,999 of
/// 6,000 increments lost, and a `200` never applied). Now the first
/// publisher acknowledged with a sequence already used marks the stream
/// lost, for every instance (in `journal_offsets`): nobody reads it, no
/// waiter hears `200`, and after the runbook's reset every message of the
/// new stream is applied, once.
async fn a_stream_created_again_under_a_running_writer_is_not_read_from_the_stored_offset(
    db: TestDb,
) {
    stream_created_again_under_running_instances(db, Publishing::ThroughTheWriter).await;
}

/// As above, the new stream's messages published through an instance that
/// does not hold the lease: it marked the stream lost, but the writer went
/// on applying the new stream from the old offset until its next lease
/// renewal (2 s), and the reset then applied those messages again (found
/// by review: 12 for 9 increments). The mark is now written at once, and a
/// flush does not move a marked stream's offset.
async fn a_stream_created_again_is_not_applied_by_the_writer_after_another_instance_saw_it(
    db: TestDb,
) {
    stream_created_again_under_running_instances(db, Publishing::ThroughAnother).await;
}

enum Publishing {
    ThroughTheWriter,
    ThroughAnother,
}

async fn stream_created_again_under_running_instances(db: TestDb, publishing: Publishing) {
    let nats = NatsServer::start();
    let short_waits = |settings: &mut api::Settings| {
        journaled(&nats)(settings);
        settings.wait_timeout = Duration::from_secs(1);
    };
    let alias = db.alias();
    let writer = TestApp::start_with(db, short_waits).await;
    until_it_holds_the_lease(&writer).await;
    let other = match publishing {
        Publishing::ThroughTheWriter => None,
        Publishing::ThroughAnother => Some(TestApp::start_with(alias, short_waits).await),
    };
    let publisher = other.as_ref().unwrap_or(&writer);
    apply_three_waiting(publisher).await;
    let (settings, jetstream) = delete_the_stream(&nats).await;
    jetstream
        .create_stream(stream_by_hand(&settings))
        .await
        .expect("created again");
    // Below the old offset (3), then past it.
    for _ in 0..2 {
        publisher
            .increment("k", 1)
            .await
            .assert_status(StatusCode::ACCEPTED);
    }
    let waiting = post_waiting(publisher, "k", 1).await;
    assert_eq!(
        waiting.status(),
        StatusCode::ACCEPTED,
        "not applied: no 200"
    );
    for _ in 0..5 {
        publisher
            .increment("k", 1)
            .await
            .assert_status(StatusCode::ACCEPTED);
    }
    let marked = || async {
        use sea_orm::EntityTrait;
        entity::journal_offsets::Entity::find()
            .one(&writer.connection)
            .await
            .unwrap()
            .expect("the stream's row")
    };
    eventually(
        Duration::from_secs(20),
        "the stream is marked lost and the writer stopped",
        || async {
            let row = marked().await;
            row.writer.as_deref() == Some(api::store::JOURNAL_STREAM_LOST)
                && row.lost_from == Some(1)
                && writer
                    .scrape()
                    .await
                    .contains("increment_journal_writer 0\n")
        },
    )
    .await;
    assert_eq!(
        writer.db.counters().await["k"],
        3,
        "the new stream's messages were read from the old offset"
    );
    // Stopped whole (a crashed test app's reader task would go on, and
    // mark the stream again after the reset below).
    if let Some(other) = other {
        other.shut_down().await;
    }
    let (_, db) = writer.shut_down().await;
    // No instance starts on it until the offset is reset.
    let mut restart = testkit::test_settings(&db);
    journaled(&nats)(&mut restart);
    match api::Application::build(restart.clone()).await {
        Ok(_) => panic!("started on a stream marked lost"),
        Err(err) => {
            let err = api::telemetry::error_chain(&err);
            assert!(
                err.contains("IncrementJournalStreamLost") && err.contains("from message 1"),
                "{err}"
            );
        }
    }
    // The runbook's reset: the new stream is read from its start, whole.
    db.execute(
        "UPDATE journal_offsets SET applied_through = lost_from - 1, writer = NULL, \
         lease_until_ms = 0, lost_from = NULL",
    )
    .await;
    let app = TestApp::start(db, restart).await;
    eventually(
        Duration::from_secs(20),
        "the new stream is applied",
        || async { app.db.counters().await["k"] == 3 + 8 },
    )
    .await;
    app.flush().await;
    assert_eq!(app.db.counters().await["k"], 3 + 8, "each once");
    app.shut_down_cleanly().await;
}

/// A stream for `settings` as an operator would create it by hand: file
/// storage, `discard: new`, nothing else set.
/// An existing stream whose `max_msg_size` is below what one request of
/// `--max-body` needs: such a request was answered `503` ("NATS is
/// unreachable") however often it was sent. The start now says so; with a
/// smaller `--max-body` it starts, and a batch near the stream's limit is
/// taken (groups stay under it).
async fn a_stream_whose_messages_cannot_hold_a_request_stops_the_start(db: TestDb) {
    let nats = NatsServer::start();
    let mut settings = testkit::test_settings(&db);
    journaled(&nats)(&mut settings);
    let journal = settings.journal.clone().expect("journaled");
    let client = async_nats::connect(nats.url()).await.expect("connects");
    async_nats::jetstream::new(client)
        .create_stream(async_nats::jetstream::stream::Config {
            max_message_size: 32 * 1024,
            ..stream_by_hand(&journal)
        })
        .await
        .expect("created");
    settings.max_body = 64 * 1024;
    let refused = match api::Application::build(settings.clone()).await {
        Ok(_) => panic!("started with messages too small for --max-body"),
        Err(err) => api::telemetry::error_chain(&err),
    };
    assert!(
        refused.contains("max_msg_size 32768") && refused.contains("--max-body 65536"),
        "{refused}"
    );
    settings.max_body = 16 * 1024;
    let app = TestApp::start(db, settings).await;
    // Distinct keys in each request (a group sums a key's deltas).
    let body = |request: usize| {
        let items: Vec<_> = (0..300)
            .map(|i| serde_json::json!({ "key": format!("key-{request}-{i:04}-{}", "x".repeat(18)), "value": 1 }))
            .collect();
        serde_json::json!({ "increments": items }).to_string()
    };
    assert!(
        (12 * 1024..16 * 1024).contains(&body(0).len()),
        "{}",
        body(0).len()
    );
    // The server paused: the first request's message waits in flight, and
    // the four after it are grouped (together, over 40 KB) behind it.
    nats.pause();
    let sending = futures::future::join_all((0..5).map(|request| {
        app.client
            .post("/increments")
            .content_type("application/json")
            .body(body(request))
            .send()
    }));
    let waiting = async {
        eventually(Duration::from_secs(10), "five requests waiting", || async {
            // The scrape counts itself.
            app.scrape()
                .await
                .contains("increment_http_requests_in_flight 6\n")
        })
        .await;
        nats.resume();
    };
    let (answers, ()) = tokio::join!(sending, waiting);
    for answer in answers {
        answer.assert_status(StatusCode::ACCEPTED);
    }
    eventually(Duration::from_secs(20), "every batch applied", || async {
        let counters = app.db.counters().await;
        counters.len() == 1_500 && counters.values().all(|v| *v == 1)
    })
    .await;
    app.shut_down_cleanly().await;
}

fn stream_by_hand(settings: &JournalSettings) -> async_nats::jetstream::stream::Config {
    async_nats::jetstream::stream::Config {
        name: settings.stream.clone(),
        subjects: vec![settings.subject()],
        storage: async_nats::jetstream::stream::StorageType::File,
        discard: async_nats::jetstream::stream::DiscardPolicy::New,
        ..Default::default()
    }
}

/// Adds 1 to `key` (a new counter) and waits up to `within` for the writer
/// to apply it: every message before it in the stream has been read then.
async fn increment_until_applied(app: &TestApp, key: &str, within: Duration) {
    app.increment(key, 1)
        .await
        .assert_status(StatusCode::ACCEPTED);
    eventually(within, "the new message applied", || async {
        app.db.counters().await.get(key) == Some(&1)
    })
    .await;
}

/// Three `wait=true` increments of "k": the stored offset is 3 after them.
async fn apply_three_waiting(app: &TestApp) {
    for _ in 0..3 {
        post_waiting(app, "k", 1)
            .await
            .assert_status(StatusCode::OK);
    }
}

/// Deletes the journal's stream on `nats`; returns its settings and a
/// JetStream context to act on it further.
async fn delete_the_stream(nats: &NatsServer) -> (JournalSettings, async_nats::jetstream::Context) {
    let settings = JournalSettings::new(nats.url());
    let client = async_nats::connect(nats.url()).await.expect("connected");
    let jetstream = async_nats::jetstream::new(client);
    jetstream
        .delete_stream(&settings.stream)
        .await
        .expect("deleted");
    (settings, jetstream)
}
