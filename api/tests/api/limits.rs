//! Limits against hostile or careless clients, through a real listener.

use std::time::{Duration, Instant};

use crate::helpers::{RawClient, increment_request, serve};

/// Far more than any limit here: a test that hits it has failed.
const PATIENCE: Duration = Duration::from_secs(5);

const POST_HEAD: &str = "POST /increment HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_dribbles_headers_is_cut_off() {
    let app = serve(|s| s.header_timeout = Duration::from_millis(300)).await;
    let mut slow = RawClient::connect(app.addr).await;
    slow.send(b"POST /increment HTTP/1.1\r\nHost: t\r\n").await;
    let started = Instant::now();
    assert!(slow.closes_within(PATIENCE).await, "closed");
    assert!(started.elapsed() >= Duration::from_millis(250));
    app.shut_down_cleanly().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_that_never_arrives_gets_408() {
    let app = serve(|s| s.body_timeout = Duration::from_millis(300)).await;
    let mut slow = RawClient::connect(app.addr).await;
    slow.send(format!("{POST_HEAD}Content-Length: 100\r\n\r\n{{\"key\":").as_bytes())
        .await;
    let answer = slow.response(PATIENCE).await.expect("an answer");
    assert_eq!(answer.status, 408);
    assert_eq!(
        answer.header("content-type"),
        Some("application/problem+json")
    );
    assert!(String::from_utf8_lossy(&answer.body).contains("not received within"));
    app.shut_down_cleanly().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_headers_are_refused_with_431() {
    let app = serve(|_| {}).await;
    let mut client = RawClient::connect(app.addr).await;
    let huge = "a".repeat(1024 * 1024);
    // The service answers before the whole head is sent: the write may fail.
    let _ = client
        .try_send(format!("{POST_HEAD}X-Huge: {huge}\r\nContent-Length: 2\r\n\r\n{{}}").as_bytes())
        .await;
    let answer = client.response(PATIENCE).await.expect("an answer");
    assert_eq!(answer.status, 431);
    app.shut_down_cleanly().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_the_cap_wait_for_room() {
    let app = serve(|s| s.max_connections = 2).await;
    let request = b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n";
    let mut first = RawClient::connect(app.addr).await;
    let mut second = RawClient::connect(app.addr).await;
    for client in [&mut first, &mut second] {
        client.send(request).await;
        assert_eq!(client.response(PATIENCE).await.expect("200").status, 200);
    }
    // The kernel completes the handshake, but the service does not take it:
    // no answer while two connections are open (silence is the behaviour
    // under test here).
    let mut third = RawClient::connect(app.addr).await;
    third.send(request).await;
    let waiting = tokio::time::timeout(Duration::from_millis(500), third.response(PATIENCE)).await;
    assert!(waiting.is_err(), "no answer while two connections are open");
    drop(first);
    let answer = third
        .response(PATIENCE)
        .await
        .expect("served once one closed");
    assert_eq!(answer.status, 200);
    drop(second);
    drop(third);
    app.shut_down_cleanly().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_beyond_the_in_flight_cap_get_503() {
    let app = serve(|s| {
        s.max_in_flight = 1;
        s.body_timeout = Duration::from_secs(2);
    })
    .await;
    // One request holds the only slot: its body is still on the way. A probe
    // (`/readyz`) polls until it is refused (the probe takes nothing). The
    // probe needs the slot too: a holder that arrived while a probe was in
    // flight was itself refused, and is sent again.
    let client = reqwest::Client::new();
    let deadline = Instant::now() + PATIENCE;
    let mut holder = 'held: loop {
        let mut holder = RawClient::connect(app.addr).await;
        holder
            .send(format!("{POST_HEAD}Content-Length: 100\r\n\r\n{{").as_bytes())
            .await;
        loop {
            assert!(Instant::now() < deadline, "the holder never took the slot");
            let probe = client.get(app.url("/readyz")).send().await.unwrap();
            if probe.status() == 503 {
                break 'held holder;
            }
            let early =
                tokio::time::timeout(Duration::from_millis(1), holder.response(PATIENCE)).await;
            if let Ok(answer) = early {
                let answer = answer.expect("an answer");
                assert_eq!(answer.status, 503, "the holder was refused, not answered");
                continue 'held;
            }
        }
    };
    let mut refused = RawClient::connect(app.addr).await;
    refused.send(&increment_request("k", 1)).await;
    let answer = refused.response(PATIENCE).await.expect("an answer");
    assert_eq!(answer.status, 503);
    assert_eq!(answer.header("retry-after"), Some("1"));
    assert!(String::from_utf8_lossy(&answer.body).contains("/problems/overloaded"));
    // The liveness probe is served all the same: slow bodies must not have
    // the orchestrator restart a working instance. (It was refused before.)
    let live = client.get(app.url("/healthz")).send().await.unwrap();
    assert_eq!(live.status(), 200);
    // So is the scrape, which shows the saturation (it was refused, and
    // the instance-down alert fired instead).
    let scrape = client.get(app.url("/metrics")).send().await.unwrap();
    assert_eq!(scrape.status(), 200);
    let scraped = scrape.text().await.unwrap();
    assert!(
        scraped.contains("increment_http_requests_in_flight_limit 1"),
        "{scraped}"
    );
    // Past the cap, they take no body: nothing held in memory for them.
    let mut with_body = RawClient::connect(app.addr).await;
    with_body
        .send(b"GET /healthz HTTP/1.1\r\nHost: t\r\nContent-Length: 4\r\n\r\nbody")
        .await;
    let answer = with_body.response(PATIENCE).await.expect("an answer");
    assert_eq!(answer.status, 413);
    let held = holder.response(PATIENCE).await.expect("an answer");
    assert_eq!(held.status, 408);
    let db = app.shut_down_cleanly().await;
    assert!(db.counters().await.is_empty(), "nothing was taken");
}

/// A body that arrives in several pieces (chunked, or one declared length
/// sent in parts) is read whole: the front door joins the frames.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_in_pieces_is_read_whole() {
    let app = serve(|_| {}).await;
    let mut chunked = RawClient::connect(app.addr).await;
    chunked
        .send(
            format!("{POST_HEAD}Transfer-Encoding: chunked\r\n\r\n8\r\n{{\"key\":\"\r\n")
                .as_bytes(),
        )
        .await;
    chunked.send(b"6\r\npieces\r\n").await;
    chunked
        .send(b"b\r\n\",\"value\":4\r\n2\r\n}\n\r\n0\r\n\r\n")
        .await;
    assert_eq!(
        chunked.response(PATIENCE).await.expect("an answer").status,
        202
    );
    let body = r#"{"key":"pieces","value":3}"#;
    let mut parts = RawClient::connect(app.addr).await;
    parts
        .send(
            format!(
                "{POST_HEAD}Content-Length: {}\r\n\r\n{}",
                body.len(),
                &body[..5]
            )
            .as_bytes(),
        )
        .await;
    for piece in [&body[5..12], &body[12..]] {
        tokio::time::sleep(Duration::from_millis(20)).await; // separate reads
        parts.send(piece.as_bytes()).await;
    }
    assert_eq!(
        parts.response(PATIENCE).await.expect("an answer").status,
        202
    );
    let db = app.shut_down_cleanly().await;
    assert_eq!(db.counters().await.get("pieces"), Some(&7));
}
