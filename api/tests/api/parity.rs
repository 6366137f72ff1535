//! Differential test of the front door's fast path: the same requests sent
//! to an instance with the fast path and to one without (every request
//! through the poem-openapi operation) get byte-identical answers and leave
//! identical databases.

use std::time::Duration;

use crate::helpers::{RawClient, RawResponse, serve};

const PATIENCE: Duration = Duration::from_secs(5);

fn content_types() -> Vec<Option<&'static str>> {
    vec![
        Some("application/json"),
        Some("application/json; charset=utf-8"),
        Some("application/json ; charset=utf-8"),
        Some("Application/JSON"),
        Some("application/json;;"),
        Some("application/json; charset=\"utf-8\""),
        Some("application/vnd.example+json"),
        Some("application/json; ="),
        Some("application/json; a"),
        Some("application/json, text/plain"),
        Some("application/jsonx"),
        Some("text/plain"),
        Some(""),
        None,
    ]
}

fn bodies() -> Vec<Vec<u8>> {
    let mut bodies: Vec<String> = vec![
        r#"{"key":"a","value":1}"#.into(),
        r#" { "value" : -3 , "key" : "a" } "#.into(),
        r#"{"key":"edge","value":9223372036854775807}"#.into(),
        r#"{"key":"edge","value":1}"#.into(),
        r#"{"key":"low","value":-9223372036854775808}"#.into(),
        r#"{"key":"a","value":9223372036854775808}"#.into(),
        r#"{"key":"a","value":-9223372036854775809}"#.into(),
        r#"{"key":"zero","value":-0}"#.into(),
        r#"{"key":"a","value":-0.0}"#.into(),
        r#"{"key":"a","value":1.0}"#.into(),
        r#"{"key":"a","value":1e3}"#.into(),
        r#"{"key":"a","value":"1"}"#.into(),
        r#"{"key":"a","value":null}"#.into(),
        r#"{"key":"a","value":true}"#.into(),
        r#"{"key":"a","value":[1]}"#.into(),
        r#"{"key":"a","value":{}}"#.into(),
        r#"{"key":"a"}"#.into(),
        r#"{"value":1}"#.into(),
        r#"{"key":"","value":1}"#.into(),
        r#"{"key":"a\u0000b","value":1}"#.into(),
        r#"{"key":"\u00e9\"\\/x","value":2}"#.into(),
        r#"{"key":7,"value":1}"#.into(),
        r#"{"key":"a","key":"b","value":1}"#.into(),
        r#"{"key":"a","value":1,"value":2}"#.into(),
        r#"{"key":"a","value":1} x"#.into(),
        r#"{"key":"a","value":1"#.into(),
        r#"[{"key":"a","value":1}]"#.into(),
        r#""key""#.into(),
        "null".into(),
        "".into(),
        "   ".into(),
        format!(r#"{{"key":"{}","value":1}}"#, "k".repeat(255)),
        format!(r#"{{"key":"{}","value":1}}"#, "k".repeat(256)),
        format!(r#"{{"key":"{}","value":1}}"#, "é".repeat(255)),
        format!(r#"{{"key":"{}","value":1}}"#, "é".repeat(256)),
    ];
    for depth in [1, 127, 128, 129, 200, 2_000] {
        bodies.push(format!(
            r#"{{"key":"deep","value":1,"x":{}{}}}"#,
            "[".repeat(depth),
            "]".repeat(depth)
        ));
        bodies.push(format!(
            r#"{{"key":{}"a"{},"value":1}}"#,
            "[".repeat(depth),
            "]".repeat(depth)
        ));
    }
    let mut bodies: Vec<Vec<u8>> = bodies.into_iter().map(String::into_bytes).collect();
    bodies.push(b"{\"key\":\"\xff\",\"value\":1}".to_vec());
    bodies.push(vec![b' '; 70 * 1024]);
    bodies
}

fn request(path: &str, content_type: Option<&str>, body: &[u8]) -> Vec<u8> {
    let mut head = format!("POST {path} HTTP/1.1\r\nHost: t\r\n");
    if let Some(content_type) = content_type {
        head.push_str(&format!("Content-Type: {content_type}\r\n"));
    }
    head.push_str(&format!("Content-Length: {}\r\n\r\n", body.len()));
    let mut bytes = head.into_bytes();
    bytes.extend_from_slice(body);
    bytes
}

/// What must be equal between the two paths.
fn answer(response: &RawResponse) -> (u16, Option<String>, Option<String>, String) {
    (
        response.status,
        response.header("content-type").map(str::to_owned),
        response.header("retry-after").map(str::to_owned),
        String::from_utf8_lossy(&response.body).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fast_path_and_the_operation_answer_alike() {
    let fast = serve(|s| s.max_pending_keys = 40).await;
    let routed = serve(|s| {
        s.max_pending_keys = 40;
        s.fast_path = false;
    })
    .await;
    let mut to_fast = RawClient::connect(fast.addr).await;
    let mut to_routed = RawClient::connect(routed.addr).await;
    let mut statuses = std::collections::BTreeMap::<u16, usize>::new();
    let mut sent = 0;
    let mut exchange = async |bytes: Vec<u8>, label: String| {
        // An oversized body is refused before it is all sent: the write may fail.
        let _ = to_fast.try_send(&bytes).await;
        let _ = to_routed.try_send(&bytes).await;
        let a = to_fast
            .response(PATIENCE)
            .await
            .expect("the fast instance answers");
        let b = to_routed
            .response(PATIENCE)
            .await
            .expect("the routed instance answers");
        assert_eq!(answer(&a), answer(&b), "{label}");
        *statuses.entry(a.status).or_default() += 1;
        sent += 1;
        // A body left unread closes the connection; start afresh.
        if a.header("connection") == Some("close") || a.status == 413 {
            to_fast = RawClient::connect(fast.addr).await;
            to_routed = RawClient::connect(routed.addr).await;
        }
    };
    for content_type in content_types() {
        for body in bodies() {
            let label = format!(
                "{content_type:?} {}",
                String::from_utf8_lossy(&body[..body.len().min(80)])
            );
            exchange(request("/increment", content_type, &body), label).await;
        }
    }
    // Past the pending-key bound: both refuse new keys alike (503).
    for i in 0..50 {
        let body = format!(r#"{{"key":"bound{i}","value":1}}"#);
        exchange(
            request("/increment", Some("application/json"), body.as_bytes()),
            body,
        )
        .await;
    }
    for status in [202, 413, 415, 422, 503] {
        assert!(
            statuses.contains_key(&status),
            "{status} exercised: {statuses:?}"
        );
    }
    assert!(sent > 600, "{sent} requests");

    fast.flusher.flush_once().await.expect("the flush succeeds");
    routed
        .flusher
        .flush_once()
        .await
        .expect("the flush succeeds");
    let fast_counters = fast.shut_down_cleanly().await.counters().await;
    let routed_counters = routed.shut_down_cleanly().await.counters().await;
    assert_eq!(fast_counters, routed_counters);
    assert_eq!(fast_counters.get("edge"), Some(&i64::MAX));
    assert!(fast_counters.contains_key("zero"));
}
