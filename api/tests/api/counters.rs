use std::sync::{
    Arc,
    atomic::{AtomicBool, AtomicI64, Ordering},
};

use poem::http::StatusCode;
use testkit::{TestDb, db_tests, percent_encode};

use crate::helpers::{TestApp, assert_accepted, error_message, spawn_app};

db_tests!(
    a_counter_reads_stored_plus_pending,
    odd_keys_read_back_percent_encoded,
    reads_never_count_a_delta_twice_or_miss_one_during_flushes,
    listing_pages_through_stored_counters_in_key_order,
    a_page_of_long_escaped_keys_ends_at_its_byte_bound,
    prefixes_match_exactly_in_code_point_order,
);

async fn prefixes_match_exactly_in_code_point_order(db: TestDb) {
    let app = spawn_app(db).await;
    let keys = [
        "a",
        "a\u{10FFFF}",
        "ab",
        "aB",
        "A",
        "b",
        "é",
        "éa",
        "e\u{301}",
        "z",
        "\u{D7FF}",
        "\u{E000}",
    ];
    for key in keys {
        assert_accepted(app.increment(key, 1).await).await;
    }
    app.flush().await;
    let listed = |body: serde_json::Value| -> Vec<String> {
        body["counters"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["key"].as_str().unwrap().to_owned())
            .collect()
    };
    for (prefix, expected) in [
        ("a", vec!["a", "aB", "ab", "a\u{10FFFF}"]),
        ("é", vec!["é", "éa"]),
        ("e", vec!["e\u{301}"]),
        ("\u{D7FF}", vec!["\u{D7FF}"]),
        ("x", vec![]),
    ] {
        let (status, body) = list(&app, &format!("?prefix={}", percent_encode(prefix))).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(listed(body), expected, "prefix {prefix:?}");
    }
    // The whole listing is in code-point order, the same on every backend.
    let (_, body) = list(&app, "?limit=1000").await;
    let mut sorted: Vec<String> = keys.iter().map(|k| (*k).to_owned()).collect();
    sorted.sort();
    assert_eq!(listed(body), sorted);
}

async fn get_counter(app: &TestApp, key: &str) -> (StatusCode, serde_json::Value) {
    let response = app.read(key).await;
    (response.status(), response.json())
}

async fn a_counter_reads_stored_plus_pending(db: TestDb) {
    let app = spawn_app(db).await;
    let (status, body) = get_counter(&app, "k").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(body["detail"].as_str().unwrap().contains("no counter"));

    assert_accepted(app.increment("k", 5).await).await;
    let (status, body) = get_counter(&app, "k").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        body,
        serde_json::json!({"key": "k", "value": 5, "pending": 5})
    );

    app.flush().await;
    let (_, body) = get_counter(&app, "k").await;
    assert_eq!(
        body,
        serde_json::json!({"key": "k", "value": 5, "pending": 0})
    );

    assert_accepted(app.increment("k", -8).await).await;
    let (_, body) = get_counter(&app, "k").await;
    assert_eq!(
        body,
        serde_json::json!({"key": "k", "value": -3, "pending": -8})
    );

    // A zero increment on a new key makes it exist (pending, then stored).
    assert_accepted(app.increment("zero", 0).await).await;
    assert_eq!(get_counter(&app, "zero").await.0, StatusCode::OK);

    let long = "x".repeat(256);
    let (status, body) = get_counter(&app, &long).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(body["detail"].as_str().unwrap().contains("255"));

    // A path whose percent-decoding is not UTF-8 cannot be read: 400, and
    // the document says the status the response has.
    let response = app.client.get("/counters/%FF").send().await;
    let (status, body): (_, serde_json::Value) = (response.status(), response.json());
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(body["status"], 400, "{body}");
    assert_eq!(body["type"], "/problems/bad-request", "{body}");
}

async fn odd_keys_read_back_percent_encoded(db: TestDb) {
    let app = spawn_app(db).await;
    let keys = [
        "a/b",
        "with space",
        "100%",
        "日本語",
        "emoji 🎉",
        "?query#frag",
        "semi;colon",
    ];
    for (i, key) in keys.iter().enumerate() {
        assert_accepted(app.increment(key, i as i64 + 1).await).await;
    }
    app.flush().await;
    for (i, key) in keys.iter().enumerate() {
        let (status, body) = get_counter(&app, key).await;
        assert_eq!(status, StatusCode::OK, "{key}");
        assert_eq!(body["key"], *key);
        assert_eq!(body["value"], i as i64 + 1, "{key}");
    }
}

/// One writer adds +1 at a time while flushes run back to back; a reader
/// checks every reading against what had been acknowledged before it
/// started and what had been sent before it returned. A delta counted in
/// both the database and the pending part (or in neither) breaks the bounds.
async fn reads_never_count_a_delta_twice_or_miss_one_during_flushes(db: TestDb) {
    let app = Arc::new(spawn_app(db).await);
    let acknowledged = Arc::new(AtomicI64::new(0));
    let sent = Arc::new(AtomicI64::new(0));
    let running = Arc::new(AtomicBool::new(true));

    let flusher = {
        let (app, running) = (Arc::clone(&app), Arc::clone(&running));
        tokio::spawn(async move {
            while running.load(Ordering::SeqCst) {
                app.flusher.flush_once().await.unwrap();
                tokio::task::yield_now().await;
            }
        })
    };
    // The writer runs until the reader has taken enough readings (speed-proof:
    // how many increments fit in one reading varies).
    let writing = Arc::new(AtomicBool::new(true));
    let writer = {
        let (app, acknowledged, sent, writing) = (
            Arc::clone(&app),
            Arc::clone(&acknowledged),
            Arc::clone(&sent),
            Arc::clone(&writing),
        );
        tokio::spawn(async move {
            while writing.load(Ordering::SeqCst) {
                sent.fetch_add(1, Ordering::SeqCst);
                assert_accepted(app.increment("hot", 1).await).await;
                acknowledged.fetch_add(1, Ordering::SeqCst);
            }
        })
    };
    let mut readings = 0;
    while readings < 200 && !writer.is_finished() {
        let low = acknowledged.load(Ordering::SeqCst);
        let (status, body) = get_counter(&app, "hot").await;
        let high = sent.load(Ordering::SeqCst);
        if status == StatusCode::NOT_FOUND {
            assert_eq!(low, 0);
            continue;
        }
        let value = body["value"].as_i64().unwrap();
        assert!(low <= value && value <= high, "{low} <= {value} <= {high}");
        readings += 1;
    }
    writing.store(false, Ordering::SeqCst);
    writer.await.unwrap();
    running.store(false, Ordering::SeqCst);
    flusher.await.unwrap();
    let total = acknowledged.load(Ordering::SeqCst);
    assert!(total > 200, "the writes overlapped the reads ({total})");
    app.flush().await;
    assert_eq!(app.counters().await.get("hot"), Some(&total));
}

async fn list(app: &TestApp, query: &str) -> (StatusCode, serde_json::Value) {
    let response = app.client.get(format!("/counters{query}")).send().await;
    let status = response.status();
    let body = response.text();
    (status, serde_json::from_str(&body).unwrap())
}

/// A page is held whole until its client reads it: one of 1,000 keys of 255
/// escaped characters would be 1.6 MB. It ends at about 256 KiB instead, and
/// paging still lists every key once, in order.
async fn a_page_of_long_escaped_keys_ends_at_its_byte_bound(db: TestDb) {
    let app = spawn_app(db).await;
    // Each control character is six bytes of JSON (`\u0001`).
    let keys: Vec<String> = (0..300)
        .map(|i| format!("{i:03}{}", "\u{1}".repeat(252)))
        .collect();
    for key in &keys {
        app.batcher.record(key, 1).expect("recorded");
    }
    app.flush().await;
    let mut listed = Vec::new();
    let mut query = "?limit=1000".to_owned();
    let mut pages = 0;
    loop {
        let response = app.client.get(format!("/counters{query}")).send().await;
        assert_eq!(response.status(), StatusCode::OK);
        let body = response.text();
        // The bound counts the counters; `next` (one key) comes on top.
        assert!(
            body.len() <= api::routes::counters::MAX_PAGE_BYTES + 2048,
            "a page of {} bytes",
            body.len()
        );
        let page: serde_json::Value = serde_json::from_str(&body).unwrap();
        pages += 1;
        for counter in page["counters"].as_array().unwrap() {
            listed.push(counter["key"].as_str().unwrap().to_owned());
        }
        match page["next"].as_str() {
            Some(next) => query = format!("?limit=1000&after={}", percent_encode(next)),
            None => break,
        }
    }
    assert!(pages >= 2, "{pages} page(s)");
    assert_eq!(listed, keys);
}

async fn listing_pages_through_stored_counters_in_key_order(db: TestDb) {
    let app = spawn_app(db).await;
    for i in 0..25 {
        assert_accepted(app.increment(&format!("page:{i:02}"), i).await).await;
    }
    for key in ["other", "pag", "page%_literal"] {
        assert_accepted(app.increment(key, 1).await).await;
    }
    app.flush().await;
    assert_accepted(app.increment("page:pending-only", 1).await).await;

    let mut keys = Vec::new();
    let mut query = "?prefix=page%3A&limit=10".to_owned();
    let mut pages = 0;
    loop {
        let (status, body) = list(&app, &query).await;
        assert_eq!(status, StatusCode::OK);
        pages += 1;
        for counter in body["counters"].as_array().unwrap() {
            keys.push(counter["key"].as_str().unwrap().to_owned());
            let i: i64 = counter["key"].as_str().unwrap()[5..].parse().unwrap();
            assert_eq!(counter["value"], i);
            assert!(counter["updated_at"].as_str().unwrap().contains('T'));
        }
        match body["next"].as_str() {
            Some(next) => {
                query = format!("?prefix=page%3A&limit=10&after={}", percent_encode(next))
            }
            None => break,
        }
    }
    assert_eq!(pages, 3);
    let expected: Vec<String> = (0..25).map(|i| format!("page:{i:02}")).collect();
    assert_eq!(
        keys, expected,
        "every stored key once, in order; pending ones not listed"
    );

    // `%` and `_` in a prefix are literal characters.
    let (_, body) = list(&app, "?prefix=page%25_").await;
    let listed: Vec<&str> = body["counters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["key"].as_str().unwrap())
        .collect();
    assert_eq!(listed, ["page%_literal"]);
    // Prefixes are case-sensitive.
    let (_, body) = list(&app, "?prefix=PAGE").await;
    assert!(body["counters"].as_array().unwrap().is_empty());

    let (_, body) = list(&app, "").await;
    assert_eq!(
        body["counters"].as_array().unwrap().len(),
        28,
        "default limit 100"
    );
    assert!(body["next"].is_null());

    for bad in ["?limit=0", "?limit=1001", "?limit=ten"] {
        let response = app.client.get(format!("/counters{bad}")).send().await;
        let message = error_message(response, StatusCode::UNPROCESSABLE_ENTITY).await;
        assert!(message.contains("limit"), "{bad}: {message}");
    }
    // Percent-encoded bytes that are not UTF-8 name no key: refused, not
    // read as U+FFFD (which a stored key may hold).
    assert_accepted(app.increment("\u{fffd}replacement", 1).await).await;
    app.flush().await;
    // Refused, with what the message says: bytes that are not UTF-8; a
    // parameter given twice, where which one was meant cannot be told (the
    // first was taken, silently).
    for (bad, says) in [
        ("?prefix=%FF", "UTF-8"),
        ("?prefix=%FFre", "UTF-8"),
        ("?after=%C3", "UTF-8"),
        ("?prefix=p&after=%FF", "UTF-8"),
        ("?prefix=a&prefix=b", "more than once"),
        ("?after=a&%61fter=b", "more than once"),
        ("?limit=1&limit=2", "more than once"),
    ] {
        let response = app.client.get(format!("/counters{bad}")).send().await;
        let message = error_message(response, StatusCode::UNPROCESSABLE_ENTITY).await;
        assert!(message.contains(says), "{bad}: {message}");
    }
    let (_, body) = list(&app, "?prefix=%EF%BF%BD").await;
    assert_eq!(body["counters"][0]["key"], "\u{fffd}replacement");
    // Parameters nobody reads are left alone.
    let (status, _) = list(&app, "?prefix=x&unread=%FF").await;
    assert_eq!(status, StatusCode::OK);
}

/// On PostgreSQL the counters have one index, the primary key, in collation
/// `"C"`, and it serves the listing's code-point order (a second index on
/// `key COLLATE "C"` made every flush's upsert write two index entries per
/// key it could not update in place). SQLite's primary key is bytewise
/// already.
#[tokio::test]
async fn the_listing_is_served_by_the_primary_key_alone_on_postgres() {
    use sea_orm::{ConnectionTrait, DbBackend, QueryTrait, Statement, TransactionTrait};
    let Some(db) = TestDb::postgres().await else {
        return;
    };
    let app = spawn_app(db).await;
    let conn = app.db.connect().await;
    let rows = |sql: String| {
        let conn = &conn;
        async move {
            conn.query_all_raw(Statement::from_string(DbBackend::Postgres, sql))
                .await
                .unwrap()
        }
    };
    let indexes: Vec<String> =
        rows("SELECT indexname FROM pg_indexes WHERE tablename = 'counters' ORDER BY 1".to_owned())
            .await
            .iter()
            .map(|row| row.try_get::<String>("", "indexname").unwrap())
            .collect();
    assert_eq!(indexes, ["counters_pkey"]);
    let collation = rows(
        "SELECT collation_name FROM information_schema.columns \
         WHERE table_name = 'counters' AND column_name = 'key'"
            .to_owned(),
    )
    .await;
    assert_eq!(
        collation[0]
            .try_get::<String>("", "collation_name")
            .unwrap(),
        "C"
    );
    // The plan of each form of the listing, with sequential and bitmap
    // scans priced out (the table is empty, and a bitmap scan loses the
    // index's order): an index scan of the primary key, in its order, so
    // no sort.
    for (prefix, after) in [
        ("", None),
        ("page:", None),
        ("page:", Some("page:9")),
        ("", Some("k")),
    ] {
        let query = api::store::list_counters_query(DbBackend::Postgres, prefix, after, 101)
            .build(DbBackend::Postgres)
            .to_string();
        let txn = conn.begin().await.unwrap();
        txn.execute_unprepared("SET LOCAL enable_seqscan = off; SET LOCAL enable_bitmapscan = off")
            .await
            .unwrap();
        let plan: Vec<String> = txn
            .query_all_raw(Statement::from_string(
                DbBackend::Postgres,
                format!("EXPLAIN {query}"),
            ))
            .await
            .unwrap()
            .iter()
            .map(|row| row.try_get::<String>("", "QUERY PLAN").unwrap())
            .collect();
        txn.rollback().await.unwrap();
        let plan = plan.join("\n");
        assert!(
            plan.contains("Index Scan using counters_pkey")
                && !plan.contains("Sort")
                && !plan.contains("Seq Scan"),
            "{query}\n{plan}"
        );
    }
    app.shut_down().await;
}
