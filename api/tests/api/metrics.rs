use std::collections::BTreeMap;

use poem::http::StatusCode;
use testkit::{TestDb, db_tests};

use crate::helpers::{TestApp, assert_accepted, spawn_app};

/// One sample of the text exposition.
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

fn parse(exposition: &str) -> Vec<Sample> {
    exposition
        .lines()
        .filter(|line| !line.starts_with('#') && !line.trim().is_empty())
        .map(|line| {
            let (series, value) = line.rsplit_once(' ').expect("`series value`");
            let (name, labels) = match series.split_once('{') {
                Some((name, rest)) => {
                    let labels = rest
                        .trim_end_matches('}')
                        .split("\",")
                        .filter(|pair| !pair.is_empty())
                        .map(|pair| {
                            let (k, v) = pair.split_once("=\"").expect("label=\"value\"");
                            (k.to_owned(), v.trim_end_matches('"').to_owned())
                        })
                        .collect();
                    (name.to_owned(), labels)
                }
                None => (series.to_owned(), BTreeMap::new()),
            };
            Sample {
                name,
                labels,
                value: value.parse().expect("a number"),
            }
        })
        .collect()
}

/// The value of the one series named `name` whose labels include `labels`.
fn value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> f64 {
    let matching: Vec<&Sample> = samples
        .iter()
        .filter(|s| s.name == name)
        .filter(|s| {
            labels
                .iter()
                .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
        .collect();
    assert_eq!(matching.len(), 1, "exactly one series {name}{labels:?}");
    matching[0].value
}

async fn scrape(app: &TestApp) -> Vec<Sample> {
    let response = app.client.get("/metrics").send().await;
    response.assert_status_is_ok();
    response.assert_content_type("text/plain; version=0.0.4; charset=utf-8");
    parse(&response.text())
}

db_tests!(metrics_follow_known_traffic);

async fn metrics_follow_known_traffic(db: TestDb) {
    let app = spawn_app(db).await;
    for (key, value) in [("a", 1), ("b", 2), ("a", 3)] {
        assert_accepted(app.increment(key, value).await).await;
    }
    app.post_json("{}")
        .await
        .assert_status(StatusCode::UNPROCESSABLE_ENTITY);
    app.post_json("[1]")
        .await
        .assert_status(StatusCode::UNPROCESSABLE_ENTITY);
    app.client
        .post("/increment")
        .body("{}")
        .send()
        .await
        .assert_status(StatusCode::UNSUPPORTED_MEDIA_TYPE);
    app.post_json(&" ".repeat(70_000))
        .await
        .assert_status(StatusCode::PAYLOAD_TOO_LARGE);
    app.client
        .get("/healthz")
        .send()
        .await
        .assert_status_is_ok();
    app.client
        .get("/some/unknown/path")
        .send()
        .await
        .assert_status(StatusCode::NOT_FOUND);

    let before_flush = scrape(&app).await;
    assert_eq!(value(&before_flush, "increment_pending_keys", &[]), 2.0);
    assert!(value(&before_flush, "increment_oldest_pending_age_seconds", &[]) > 0.0);

    app.flush().await;
    let samples = scrape(&app).await;
    let post = |status| {
        [
            ("route", "/increment"),
            ("method", "POST"),
            ("status", status),
        ]
    };
    assert_eq!(
        value(&samples, "increment_http_requests_total", &post("202")),
        3.0
    );
    assert_eq!(
        value(&samples, "increment_http_requests_total", &post("422")),
        2.0
    );
    assert_eq!(
        value(&samples, "increment_http_requests_total", &post("415")),
        1.0
    );
    assert_eq!(
        value(&samples, "increment_http_requests_total", &post("413")),
        1.0
    );
    assert_eq!(
        value(
            &samples,
            "increment_http_requests_total",
            &[("route", "other"), ("status", "404")]
        ),
        1.0,
        "unknown paths share one label"
    );
    assert_eq!(
        value(
            &samples,
            "increment_http_request_duration_seconds_count",
            &[("route", "/increment"), ("method", "POST")]
        ),
        7.0
    );
    assert_eq!(
        value(&samples, "increment_increments_accepted_total", &[]),
        3.0
    );
    for (reason, count) in [
        ("invalid", 2.0),
        ("content_type", 1.0),
        ("too_large", 1.0),
        ("unavailable", 0.0),
    ] {
        assert_eq!(
            value(
                &samples,
                "increment_increments_rejected_total",
                &[("reason", reason)]
            ),
            count,
            "{reason}"
        );
    }
    assert_eq!(value(&samples, "increment_flushed_keys_total", &[]), 2.0);
    assert_eq!(value(&samples, "increment_flush_keys_count", &[]), 1.0);
    assert_eq!(value(&samples, "increment_flush_keys_sum", &[]), 2.0);
    assert_eq!(
        value(&samples, "increment_flush_duration_seconds_count", &[]),
        1.0
    );
    assert_eq!(value(&samples, "increment_flush_failures_total", &[]), 0.0);
    assert_eq!(value(&samples, "increment_pending_keys", &[]), 0.0);
    assert_eq!(
        value(&samples, "increment_oldest_pending_age_seconds", &[]),
        0.0
    );
    let last = value(
        &samples,
        "increment_last_flush_success_timestamp_seconds",
        &[],
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!(last > now - 60.0 && last <= now, "{last} vs {now}");
    assert_eq!(
        value(
            &samples,
            "increment_build_info",
            &[("version", env!("CARGO_PKG_VERSION"))]
        ),
        1.0
    );
    let pool = value(
        &samples,
        "increment_db_pool_connections",
        &[("state", "idle")],
    ) + value(
        &samples,
        "increment_db_pool_connections",
        &[("state", "in_use")],
    );
    assert!(
        pool >= 1.0,
        "the pool keeps at least one connection ({pool})"
    );
    for cause in ["size", "expired"] {
        value(
            &samples,
            "increment_cache_evictions_total",
            &[("cause", cause)],
        );
    }
    assert!(value(&samples, "process_resident_memory_bytes", &[]) > 0.0);
    assert!(value(&samples, "process_open_fds", &[]) > 0.0);
    value(&samples, "process_cpu_seconds_total", &[]);

    // A failed flush is counted; its keys are not.
    assert_accepted(app.increment("c", 1).await).await;
    app.db
        .execute("ALTER TABLE counters RENAME TO counters_away")
        .await;
    assert!(app.flusher.flush_once().await.is_err());
    let failed = scrape(&app).await;
    assert_eq!(value(&failed, "increment_flush_failures_total", &[]), 1.0);
    assert_eq!(value(&failed, "increment_flushed_keys_total", &[]), 2.0);
    app.db
        .execute("ALTER TABLE counters_away RENAME TO counters")
        .await;
    app.flush().await;
    let recovered = scrape(&app).await;
    assert_eq!(value(&recovered, "increment_flushed_keys_total", &[]), 3.0);
    assert_eq!(app.counters().await.get("c"), Some(&1));
}

#[tokio::test]
async fn evictions_are_counted_by_cause() {
    let db = TestDb::sqlite().await;
    let mut settings = crate::helpers::test_settings(&db);
    settings.cache_capacity = std::num::NonZeroU64::new(2).unwrap();
    let app = crate::helpers::spawn_app_with(db, settings).await;
    for i in 0..50 {
        assert_accepted(app.increment(&format!("k{i}"), 1).await).await;
    }
    app.flush().await;
    let samples = scrape(&app).await;
    assert!(
        value(
            &samples,
            "increment_cache_evictions_total",
            &[("cause", "size")]
        ) > 0.0
    );
    assert_eq!(
        app.counters().await.values().sum::<i64>(),
        50,
        "evicted deltas were written"
    );
}

db_tests!(the_in_flight_gauge_counts_requests_until_answered_or_abandoned);

async fn the_in_flight_gauge_counts_requests_until_answered_or_abandoned(db: TestDb) {
    let app = std::sync::Arc::new(
        crate::helpers::serve_on(db, |settings| {
            settings.wait_timeout = std::time::Duration::from_secs(60);
        })
        .await,
    );
    let in_flight =
        |samples: Vec<Sample>| value(&samples, "increment_http_requests_in_flight", &[]);
    // The scrape counts itself: it is in flight while the text is rendered.
    assert_eq!(in_flight(scrape(&app).await), 1.0);

    // A `wait=true` request held while its flush cannot commit.
    app.db
        .execute("ALTER TABLE counters RENAME TO counters_away")
        .await;
    let waiting = {
        let app = std::sync::Arc::clone(&app);
        tokio::spawn(async move {
            app.client
                .post("/increment")
                .query("wait", &true)
                .content_type("application/json")
                .body(r#"{"key":"held","value":1}"#)
                .send()
                .await
        })
    };
    let within = std::time::Duration::from_secs(10);
    testkit::eventually(within, "the held request is in flight", || async {
        in_flight(scrape(&app).await) == 2.0
    })
    .await;

    // Its client gives up: the server drops the request, and the gauge follows.
    waiting.abort();
    testkit::eventually(
        within,
        "the abandoned request is no longer in flight",
        || async { in_flight(scrape(&app).await) == 1.0 },
    )
    .await;
    app.db
        .execute("ALTER TABLE counters_away RENAME TO counters")
        .await;
}
