use poem::http::StatusCode;
use testkit::{TestDb, db_tests};

use crate::helpers::{assert_accepted, error_message, problem, spawn_app};

db_tests!(
    wait_given_twice_is_refused,
    wait_on_a_batch_is_refused,
    batches_are_applied_whole_or_not_at_all,
    accepted_increments_are_summed_and_written,
    every_malformed_body_gets_422_naming_the_field_and_changes_nothing,
    content_type_and_size_errors,
    odd_keys_are_stored_verbatim,
    a_pending_delta_never_leaves_i64,
    the_fast_path_answers_like_the_operation,
);

async fn accepted_increments_are_summed_and_written(db: TestDb) {
    let app = spawn_app(db).await;
    for (key, value) in [("a", 5), ("a", -2), ("b", i64::MIN), ("zero", 0), ("a", 10)] {
        assert_accepted(app.increment(key, value).await).await;
    }
    app.flush().await;
    let counters = app.counters().await;
    assert_eq!(counters.get("a"), Some(&13));
    assert_eq!(counters.get("b"), Some(&i64::MIN));
    assert_eq!(
        counters.get("zero"),
        Some(&0),
        "a zero increment creates the counter"
    );
    assert_eq!(counters.len(), 3);

    // A second round adds to the stored values.
    assert_accepted(app.increment("a", 7).await).await;
    app.flush().await;
    assert_eq!(app.counters().await.get("a"), Some(&20));
}

async fn every_malformed_body_gets_422_naming_the_field_and_changes_nothing(db: TestDb) {
    let app = spawn_app(db).await;
    let long_key = "k".repeat(256);
    let cases: Vec<(&str, String, &str)> = vec![
        (
            "invalid JSON",
            r#"{"key": "a", "value": "#.into(),
            "not valid JSON",
        ),
        ("empty body", String::new(), "JSON object"),
        (
            "array",
            r#"[{"key":"a","value":1}]"#.into(),
            "found an array",
        ),
        (
            "missing key",
            r#"{"value": 1}"#.into(),
            "\"key\" is missing",
        ),
        (
            "missing value",
            r#"{"key": "a"}"#.into(),
            "\"value\" is missing",
        ),
        (
            "value as string",
            r#"{"key": "a", "value": "1"}"#.into(),
            "\"value\" must be an integer, found a string",
        ),
        (
            "value as float",
            r#"{"key": "a", "value": 1.5}"#.into(),
            "\"value\" must be an integer, found 1.5",
        ),
        (
            "value null",
            r#"{"key": "a", "value": null}"#.into(),
            "\"value\" must be an integer, found null",
        ),
        (
            "key as number",
            r#"{"key": 7, "value": 1}"#.into(),
            "\"key\" must be a string, found a number",
        ),
        (
            "key null",
            r#"{"key": null, "value": 1}"#.into(),
            "\"key\" must be a string, found null",
        ),
        (
            "empty key",
            r#"{"key": "", "value": 1}"#.into(),
            "\"key\" must not be empty",
        ),
        (
            "key too long",
            format!(r#"{{"key": "{long_key}", "value": 1}}"#),
            "at most 255 characters",
        ),
        (
            "NUL in key",
            r#"{"key": "a\u0000b", "value": 1}"#.into(),
            "NUL",
        ),
        (
            "value 2^63",
            r#"{"key": "a", "value": 9223372036854775808}"#.into(),
            "signed 64-bit range",
        ),
        (
            "value below -2^63",
            r#"{"key": "a", "value": -9223372036854775809}"#.into(),
            "signed 64-bit range",
        ),
        (
            "value 1e30",
            r#"{"key": "a", "value": 1e30}"#.into(),
            "signed 64-bit range",
        ),
        (
            "value true",
            r#"{"key": "a", "value": true}"#.into(),
            "found a boolean",
        ),
        ("a string body", r#""a""#.into(), "found a string"),
    ];
    for (case, body, expected) in cases {
        let message =
            error_message(app.post_json(&body).await, StatusCode::UNPROCESSABLE_ENTITY).await;
        assert!(
            message.contains(expected),
            "{case}: expected {expected:?} in {message:?}"
        );
    }
    assert_eq!(
        app.flusher.flush_once().await.unwrap(),
        api::FlushOutcome::Empty,
        "no rejected request recorded anything"
    );
    assert!(app.counters().await.is_empty());
}

async fn content_type_and_size_errors(db: TestDb) {
    let app = spawn_app(db).await;
    let body = r#"{"key": "a", "value": 1}"#;

    let no_type = app.client.post("/increment").body(body).send().await;
    let message = error_message(no_type, StatusCode::UNSUPPORTED_MEDIA_TYPE).await;
    assert!(message.contains("Content-Type"), "{message}");

    let text = app
        .client
        .post("/increment")
        .content_type("text/plain")
        .body(body)
        .send()
        .await;
    error_message(text, StatusCode::UNSUPPORTED_MEDIA_TYPE).await;

    // 64 KiB is the limit: one byte more is refused, exactly the limit is not
    // (it is then refused as JSON, proving it got past the size check).
    let padded = |len: usize| {
        let mut body = String::from(r#"{"key": "big", "value": 1}"#);
        body.push_str(&" ".repeat(len - body.len()));
        body
    };
    let at_limit = app.post_json(&padded(64 * 1024)).await;
    assert_accepted(at_limit).await;
    let over = app.post_json(&padded(64 * 1024 + 1)).await;
    // The body was not read: the connection closes, and says so (a client
    // reusing it would see its next request cut off).
    assert_eq!(over.header("connection"), Some("close"));
    let message = error_message(over, StatusCode::PAYLOAD_TOO_LARGE).await;
    assert!(message.contains("65536"), "{message}");

    // A chunked body (no Content-Length) is limited as it is read.
    let stream = futures::stream::iter((0..70).map(|_| Ok::<_, std::io::Error>(vec![b' '; 1024])));
    let chunked = app
        .client
        .post("/increment")
        .content_type("application/json")
        .body(reqwest::Body::wrap_stream(stream))
        .send()
        .await;
    error_message(chunked, StatusCode::PAYLOAD_TOO_LARGE).await;

    app.flush().await;
    assert_eq!(
        app.counters().await.into_iter().collect::<Vec<_>>(),
        vec![("big".to_owned(), 1)],
        "only the request within the limit counted"
    );
}

async fn odd_keys_are_stored_verbatim(db: TestDb) {
    let app = spawn_app(db).await;
    let keys = [
        "Page:/Home",
        "page:/home",
        " leading and trailing spaces ",
        "it's \"quoted\"",
        "'; DROP TABLE counters; --",
        "a/b\\c%20d?e=f&g#h",
        "日本語のキー",
        "emoji 🎉👍🏽",
        "tab\tnew\nline",
        "literal \\0 not a NUL",
        &"é".repeat(255),
    ];
    for (i, key) in keys.iter().enumerate() {
        assert_accepted(app.increment(key, i as i64 + 1).await).await;
    }
    app.flush().await;
    let counters = app.counters().await;
    assert_eq!(counters.len(), keys.len());
    for (i, key) in keys.iter().enumerate() {
        assert_eq!(counters.get(*key), Some(&(i as i64 + 1)), "{key:?}");
    }
}

async fn wait_given_twice_is_refused(db: TestDb) {
    let app = spawn_app(db).await;
    for query in [
        "wait=false&wait=true",
        "wait=true&wait=true",
        "wait&wait=false",
        // Names are compared as the query reader reads them: decoded.
        "w%61it=false&wait=true",
        "wait=true&w%61it=false",
    ] {
        let response = app
            .client
            .post(format!("/increment?{query}"))
            .content_type("application/json")
            .body(r#"{"key":"twice","value":1}"#)
            .send()
            .await;
        let message = error_message(response, StatusCode::UNPROCESSABLE_ENTITY).await;
        assert!(message.contains("\"wait\""), "{query}: {message}");
    }
    assert_accepted(
        app.client
            .post("/increment?wait=false&waiting=1")
            .content_type("application/json")
            .body(r#"{"key":"once","value":1}"#)
            .send()
            .await,
    )
    .await;
    app.flush().await;
    let counters = app.counters().await;
    assert_eq!(
        (counters.get("twice"), counters.get("once")),
        (None, Some(&1))
    );
}

/// `POST /increments` has no `wait`: it answered `202` ("taken") to
/// `wait=true` as if the parameter were not there, which a client could
/// read as the durable answer it asked for (found by review).
async fn wait_on_a_batch_is_refused(db: TestDb) {
    let app = spawn_app(db).await;
    for query in ["wait=true", "wait=false", "w%61it=true", "other=1&wait"] {
        let response = app
            .client
            .post(format!("/increments?{query}"))
            .content_type("application/json")
            .body(r#"{"increments":[{"key":"batch","value":1}]}"#)
            .send()
            .await;
        let message = error_message(response, StatusCode::UNPROCESSABLE_ENTITY).await;
        assert!(
            message.contains("POST /increment?wait=true"),
            "{query}: {message}"
        );
    }
    app.flush().await;
    assert_eq!(app.counters().await.get("batch"), None);
}

async fn a_pending_delta_never_leaves_i64(db: TestDb) {
    let app = spawn_app(db).await;
    assert_accepted(app.increment("max", i64::MAX).await).await;
    let message = error_message(
        app.increment("max", 1).await,
        StatusCode::UNPROCESSABLE_ENTITY,
    )
    .await;
    assert!(message.contains("\"value\""), "{message}");
    assert_accepted(app.increment("max", -1).await).await;
    app.flush().await;
    assert_eq!(app.counters().await.get("max"), Some(&(i64::MAX - 1)));
}

/// Plain `POST /increment` requests are answered before the route tree
/// (`FastIncrement`); `?wait=false` always goes through the OpenAPI operation.
/// Both must answer and count alike.
async fn the_fast_path_answers_like_the_operation(db: TestDb) {
    let app = spawn_app(db).await;
    let bodies = [
        r#"{"key":"a","value":5}"#,
        r#"{"value":-7,"key":"a","extra":[1,2]}"#,
        r#"{"key":"\u00e9","value":1234567890123}"#,
    ];
    for body in bodies {
        let mut answers = Vec::new();
        for path in ["/increment", "/increment?wait=false"] {
            let response = app
                .client
                .post(path)
                .content_type("application/json")
                // The same id both ways: a made one would differ.
                .header("x-request-id", "fast-or-not")
                .body(body)
                .send()
                .await;
            let status = response.status();
            let mut headers: Vec<(String, String)> = response
                .headers()
                .iter()
                // `date` ticks by the second: two answers either side of a
                // tick would differ whichever path gave them.
                .filter(|(name, _)| *name != poem::http::header::DATE)
                .map(|(name, value)| (name.to_string(), value.to_str().unwrap_or("?").to_owned()))
                .collect();
            headers.sort();
            let body = response.text();
            answers.push((status, headers, body));
        }
        assert_eq!(answers[0], answers[1], "{body}");
        assert_eq!(answers[0].0, StatusCode::ACCEPTED, "{body}");
        assert!(
            answers[0]
                .1
                .contains(&("x-request-id".to_owned(), "fast-or-not".to_owned())),
            "{:?}",
            answers[0].1
        );
    }
    app.flush().await;
    let counters = app.counters().await;
    assert_eq!(counters.get("a"), Some(&-4), "each body counted twice");
    assert_eq!(counters.get("é"), Some(&2_469_135_780_246));
}

async fn post_batch(app: &crate::helpers::TestApp, body: &str) -> crate::helpers::Response {
    post_batch_keyed(app, body, None).await
}

/// `POST /increments` of `body`, with `Idempotency-Key: idempotency_key`
/// when given.
async fn post_batch_keyed(
    app: &crate::helpers::TestApp,
    body: &str,
    idempotency_key: Option<&str>,
) -> crate::helpers::Response {
    let mut request = app
        .client
        .post("/increments")
        .content_type("application/json")
        .body(body.to_owned());
    if let Some(value) = idempotency_key {
        request = request.header("idempotency-key", value);
    }
    request.send().await
}

async fn batches_are_applied_whole_or_not_at_all(db: TestDb) {
    let app = spawn_app(db).await;
    let response = post_batch(
        &app,
        r#"{"increments": [{"key": "a", "value": 1}, {"key": "b", "value": -2}, {"key": "a", "value": 10}]}"#,
    )
    .await;
    response.assert_status(StatusCode::ACCEPTED);
    response.assert_json(serde_json::json!({"accepted": 3}));

    let item = |i: usize| format!(r#"{{"key": "k{i}", "value": 1}}"#);
    let items = |n: usize| (0..n).map(item).collect::<Vec<_>>().join(",");
    let bad_cases = [
        (r#"{"increments": [{"key": "c", "value": 1}, {"key": "", "value": 1}]}"#.to_owned(), "increments[1]: \"key\" must not be empty"),
        (r#"{"increments": [{"key": "c", "value": 1}, {"key": "d"}]}"#.to_owned(), "increments[1]: \"value\" is missing"),
        (r#"{"increments": [{"key": "c", "value": 1.5}]}"#.to_owned(), "increments[0]: \"value\" must be an integer"),
        (r#"{"increments": []}"#.to_owned(), "1 to 1000 items, found 0"),
        (format!(r#"{{"increments": [{}]}}"#, items(1_001)), "1 to 1000 items, found 1001"),
        (r#"{"increments": {"key": "c", "value": 1}}"#.to_owned(), "\"increments\" must be an array"),
        (r#"{}"#.to_owned(), "\"increments\" is missing"),
        (r#"[]"#.to_owned(), "found an array"),
        (r#"{"increments": [{"key": "c", "value": 9223372036854775807}, {"key": "c", "value": 1}]}"#.to_owned(), "increments[1]"),
    ];
    for (body, expected) in bad_cases {
        let message = error_message(
            post_batch(&app, &body).await,
            StatusCode::UNPROCESSABLE_ENTITY,
        )
        .await;
        assert!(
            message.contains(expected),
            "expected {expected:?} in {message:?}"
        );
    }
    // A batch that would overflow a key's pending delta is refused whole.
    assert_accepted(app.increment("full", i64::MAX).await).await;
    let message = error_message(
        post_batch(
            &app,
            r#"{"increments": [{"key": "e", "value": 1}, {"key": "full", "value": 1}]}"#,
        )
        .await,
        StatusCode::UNPROCESSABLE_ENTITY,
    )
    .await;
    assert!(message.starts_with("increments[1]"), "{message}");
    // A batch whose own values for one key leave i64 can never be taken:
    // `invalid-request`, not `pending-overflow` ("retry after the next
    // flush"), with or without an Idempotency-Key.
    let overflowing =
        r#"{"increments": [{"key": "d", "value": 9223372036854775807}, {"key": "d", "value": 1}]}"#;
    for idempotency_key in [None, Some("\"own-sum\"")] {
        let problem = problem(
            post_batch_keyed(&app, overflowing, idempotency_key).await,
            StatusCode::UNPROCESSABLE_ENTITY,
        )
        .await;
        assert_eq!(
            problem.type_uri, "/problems/invalid-request",
            "{idempotency_key:?}"
        );
        assert!(
            problem.detail.starts_with("increments[1]"),
            "{}",
            problem.detail
        );
        assert!(problem.detail.contains("never"), "{}", problem.detail);
    }
    // Only a key's total counts, not the order of its values: one that
    // passes outside i64 on the way back in is taken, with or without an
    // Idempotency-Key (a key's sum was kept item by item in i64 there).
    for (key, idempotency_key) in [("mid", None), ("mid-keyed", Some("\"mid-sum\""))] {
        let body = format!(
            r#"{{"increments": [{{"key": "{key}", "value": 9223372036854775807}}, {{"key": "{key}", "value": 1}}, {{"key": "{key}", "value": -1}}]}}"#
        );
        post_batch_keyed(&app, &body, idempotency_key)
            .await
            .assert_status(StatusCode::ACCEPTED);
    }

    post_batch(&app, &format!(r#"{{"increments": [{}]}}"#, items(1_000)))
        .await
        .assert_status(StatusCode::ACCEPTED);
    app.flush().await;
    let counters = app.counters().await;
    assert_eq!(counters.get("a"), Some(&11));
    assert_eq!(counters.get("b"), Some(&-2));
    assert_eq!(counters.get("full"), Some(&i64::MAX));
    assert_eq!(counters.get("mid"), Some(&i64::MAX));
    assert_eq!(counters.get("mid-keyed"), Some(&i64::MAX));
    for absent in ["c", "d", "e"] {
        assert!(
            !counters.contains_key(absent),
            "{absent} was in a refused batch"
        );
    }
    let k: std::collections::BTreeMap<&String, &i64> = counters
        .iter()
        .filter(|(k, _)| k.starts_with('k'))
        .collect();
    assert_eq!(k.len(), 1_000);
}
