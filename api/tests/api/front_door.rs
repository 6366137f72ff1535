//! The front door through a real listener, as an attacker or a clumsy client
//! meets it: each of these was reproduced against the hand-written head
//! scanner that hyper's own header deadline replaced.
//!
//! Where a test lets a client stay silent for a while, that silence is the
//! behaviour under test (a client idling past a deadline), not a wait for
//! the service.

use std::time::{Duration, Instant};

use api::http::ProblemType;
use testkit::TestDb;

use crate::helpers::{RawClient, increment_request, serve, serve_on};

const DEADLINE: Duration = Duration::from_millis(300);
/// Far more than any deadline here: a test that hits it has failed.
const PATIENCE: Duration = Duration::from_secs(5);

fn short_deadlines(s: &mut api::Settings) {
    s.header_timeout = DEADLINE;
    s.idle_timeout = Duration::from_secs(60);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_that_sends_nothing_is_closed_at_the_header_deadline() {
    let app = serve(short_deadlines).await;
    let mut client = RawClient::connect(app.addr).await;
    let started = Instant::now();
    assert!(client.closes_within(PATIENCE).await, "closed");
    assert!(started.elapsed() >= DEADLINE - Duration::from_millis(50));
    app.shut_down_cleanly().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leading_empty_lines_do_not_defeat_the_header_deadline() {
    let app = serve(short_deadlines).await;
    let mut client = RawClient::connect(app.addr).await;
    client.send(b"\r\n\r\n").await;
    let started = Instant::now();
    assert!(client.closes_within(PATIENCE).await, "closed");
    assert!(started.elapsed() >= DEADLINE - Duration::from_millis(100));

    // Empty lines before a real request are skipped, as RFC 9112 allows.
    let mut client = RawClient::connect(app.addr).await;
    client
        .send(b"\r\n\r\nGET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
        .await;
    let response = client.response(PATIENCE).await.expect("an answer");
    assert_eq!(response.status, 200);
    app.shut_down_cleanly().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_holding_empty_lines_cannot_lock_out_new_clients() {
    let app = serve(|s| {
        short_deadlines(s);
        s.max_connections = 20;
    })
    .await;
    let mut holders = Vec::new();
    for _ in 0..20 {
        let mut holder = RawClient::connect(app.addr).await;
        holder.send(b"\r\n\r\n\r\n").await;
        holders.push(holder);
    }
    // Every slot is taken; the newcomer is served once the deadline frees one.
    let started = Instant::now();
    let mut newcomer = RawClient::connect(app.addr).await;
    newcomer.send(&increment_request("new", 1)).await;
    let response = newcomer.response(PATIENCE).await.expect("an answer");
    assert_eq!(response.status, 202);
    assert!(started.elapsed() < PATIENCE);
    app.shut_down_cleanly().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_connection_does_not_hold_up_the_shutdown() {
    // The default deadlines (10 s, 60 s) and drain (15 s): the shutdown
    // must not wait for them.
    let app = serve(|_| {}).await;
    let mut silent = RawClient::connect(app.addr).await;
    silent.send(b"\r\n").await;
    let mut idle = RawClient::connect(app.addr).await;
    idle.send(&increment_request("k", 1)).await;
    assert_eq!(
        idle.response(PATIENCE).await.expect("an answer").status,
        202
    );
    let started = Instant::now();
    let db = app.shut_down_cleanly().await;
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "shut down in {:?}",
        started.elapsed()
    );
    assert_eq!(db.counters().await.get("k"), Some(&1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keep_alive_connection_may_idle_past_the_header_deadline() {
    let app = serve(|s| {
        s.header_timeout = DEADLINE;
        s.idle_timeout = Duration::from_millis(1500);
    })
    .await;
    let mut client = RawClient::connect(app.addr).await;
    client.send(&increment_request("a", 1)).await;
    assert_eq!(
        client.response(PATIENCE).await.expect("an answer").status,
        202
    );
    // Silent for twice the header deadline, within the idle timeout.
    tokio::time::sleep(DEADLINE * 2).await;
    client.send(&increment_request("a", 1)).await;
    assert_eq!(
        client.response(PATIENCE).await.expect("an answer").status,
        202
    );
    // Then silent for good: closed at the idle timeout.
    let started = Instant::now();
    assert!(client.closes_within(PATIENCE).await);
    assert!(started.elapsed() >= Duration::from_millis(1400));
    app.shut_down_cleanly().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_next_head_must_be_complete_a_deadline_after_its_first_byte() {
    let app = serve(short_deadlines).await;
    let mut client = RawClient::connect(app.addr).await;
    client.send(&increment_request("a", 1)).await;
    assert_eq!(
        client.response(PATIENCE).await.expect("an answer").status,
        202
    );
    client
        .send(b"POST /increment HTTP/1.1\r\nHost: t\r\n")
        .await;
    let started = Instant::now();
    assert!(client.closes_within(PATIENCE).await, "closed");
    assert!(started.elapsed() >= DEADLINE - Duration::from_millis(50));
    app.shut_down_cleanly().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expect_100_continue_keeps_the_connection_usable() {
    let app = serve(short_deadlines).await;
    let mut client = RawClient::connect(app.addr).await;
    let body = br#"{"key":"c","value":2}"#;
    client
        .send(
            format!(
                "POST /increment HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n\
                 Expect: 100-continue\r\nContent-Length: {}\r\n\r\n",
                body.len()
            )
            .as_bytes(),
        )
        .await;
    assert_eq!(client.response(PATIENCE).await.expect("100").status, 100);
    client.send(body).await;
    assert_eq!(client.response(PATIENCE).await.expect("202").status, 202);
    // The scanner used to take the body for the next head and cut the
    // connection at its deadline.
    tokio::time::sleep(DEADLINE * 2).await;
    client.send(&increment_request("c", 3)).await;
    assert_eq!(client.response(PATIENCE).await.expect("202").status, 202);
    app.flusher.flush_once().await.expect("the flush succeeds");
    let db = app.shut_down_cleanly().await;
    assert_eq!(db.counters().await.get("c"), Some(&5));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bare_lf_line_ends_are_served_and_keep_the_connection() {
    let app = serve(short_deadlines).await;
    let mut client = RawClient::connect(app.addr).await;
    let body = r#"{"key":"lf","value":1}"#;
    let request = format!(
        "POST /increment HTTP/1.1\nHost: t\nContent-Type: application/json\nContent-Length: {}\n\n{body}",
        body.len()
    );
    client.send(request.as_bytes()).await;
    assert_eq!(client.response(PATIENCE).await.expect("202").status, 202);
    tokio::time::sleep(DEADLINE * 2).await;
    client.send(request.as_bytes()).await;
    assert_eq!(client.response(PATIENCE).await.expect("202").status, 202);
    let db = app.shut_down_cleanly().await;
    assert_eq!(db.counters().await.get("lf"), Some(&2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_requests_are_all_answered_in_order() {
    let app = serve(short_deadlines).await;
    let mut client = RawClient::connect(app.addr).await;
    let mut burst = Vec::new();
    for value in 1..=5 {
        burst.extend(increment_request("p", value));
    }
    burst.extend(b"GET /nope HTTP/1.1\r\nHost: t\r\n\r\n");
    client.send(&burst).await;
    for _ in 1..=5 {
        assert_eq!(client.response(PATIENCE).await.expect("202").status, 202);
    }
    assert_eq!(client.response(PATIENCE).await.expect("404").status, 404);
    let db = app.shut_down_cleanly().await;
    assert_eq!(db.counters().await.get("p"), Some(&15));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_head_is_refused_with_431() {
    let app = serve(|s| s.max_head_bytes = 16 * 1024).await;
    let mut client = RawClient::connect(app.addr).await;
    let huge = "a".repeat(64 * 1024);
    client
        .send(format!("GET /healthz HTTP/1.1\r\nHost: t\r\nX-Huge: {huge}\r\n\r\n").as_bytes())
        .await;
    let response = client.response(PATIENCE).await.expect("an answer");
    assert_eq!(response.status, 431);
    app.shut_down_cleanly().await;
}

/// Series of the HTTP request metrics in an exposition.
fn http_series(metrics: &str) -> Vec<&str> {
    metrics
        .lines()
        .filter(|line| line.starts_with("increment_http_request"))
        .map(|line| line.rsplit_once(' ').map_or(line, |(series, _)| series))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invented_methods_and_paths_never_become_labels() {
    let app = serve(|_| {}).await;
    let client = reqwest::Client::new();
    let send = |i: usize| {
        let method =
            reqwest::Method::from_bytes(format!("INVENT{i}{}", "X".repeat(i % 7 * 500)).as_bytes())
                .expect("a token");
        client
            .request(
                method,
                app.url(&format!("/made/up/{i}/{}", "p".repeat(i % 5 * 300))),
            )
            .send()
    };
    // The generator repeats its shapes every 35 requests: 35 show every
    // series it can produce.
    for i in 0..35 {
        send(i).await.expect("an answer");
    }
    // Scraped twice: the first scrape's own series show in the second.
    app.scrape().await;
    let before = app.scrape().await;
    for i in 35..1_035 {
        let status = send(i).await.expect("an answer").status();
        assert!(status == 404 || status == 405, "{status}");
    }
    let after = app.scrape().await;
    assert_eq!(http_series(&before).len(), http_series(&after).len());
    assert!(!after.contains("INVENT"), "no method became a label");
    assert!(!after.contains("/made/up"), "no path became a label");
    assert!(after.contains(r#"method="_OTHER""#));
    app.shut_down_cleanly().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_is_refused_while_http1_clients_are_served() {
    let app = serve(|_| {}).await;
    // A real HTTP/2 client, with prior knowledge (h2c): it gets no answer.
    let tcp = tokio::net::TcpStream::connect(app.addr).await.unwrap();
    let attempt = async {
        let (mut client, connection) = h2::client::handshake(tcp).await?;
        tokio::spawn(connection);
        let request = http::Request::post("/increment")
            .header("content-type", "application/json")
            .body(())
            .expect("a valid request");
        let (response, mut body) = client.send_request(request, false)?;
        body.send_data(
            bytes::Bytes::from_static(br#"{"key":"h2","value":1}"#),
            true,
        )?;
        response.await
    };
    let outcome = tokio::time::timeout(PATIENCE, attempt)
        .await
        .expect("the refusal comes at once");
    assert!(outcome.is_err(), "HTTP/2 is not served: {outcome:?}");

    // An HTTP/1.1 upgrade offer is ignored: answered over HTTP/1.1.
    let mut client = RawClient::connect(app.addr).await;
    let mut upgrade = increment_request("h1", 1);
    let at = upgrade.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
    upgrade.splice(
        at..at,
        b"\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAoAAAAAIAAAAA".iter().copied(),
    );
    client.send(&upgrade).await;
    let response = client.response(PATIENCE).await.expect("an answer");
    assert_eq!(response.status, 202);
    let db = app.shut_down_cleanly().await;
    assert_eq!(db.counters().await.get("h2"), None);
    assert_eq!(db.counters().await.get("h1"), Some(&1));
}

async fn problem_of(response: reqwest::Response, status: u16) -> api::http::Problem {
    assert_eq!(response.status(), status);
    assert_eq!(
        response.headers()["content-type"],
        "application/problem+json"
    );
    let problem: api::http::Problem = response.json().await.expect("a problem document");
    assert_eq!(problem.status, status);
    problem
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_error_is_a_problem_document_with_a_served_type() {
    let app = serve(|_| {}).await;
    let client = reqwest::Client::new();
    let not_found = problem_of(client.get(app.url("/nope")).send().await.unwrap(), 404).await;
    assert_eq!(not_found.type_uri, "/problems/not-found");

    let wrong_method = client.delete(app.url("/increment")).send().await.unwrap();
    assert_eq!(wrong_method.headers()["allow"], "POST");
    let problem = problem_of(wrong_method, 405).await;
    assert_eq!(problem.type_uri, "/problems/method-not-allowed");

    let bad_limit = client
        .get(app.url("/counters?limit=abc"))
        .send()
        .await
        .unwrap();
    assert_eq!(
        problem_of(bad_limit, 422).await.type_uri,
        "/problems/invalid-request"
    );

    for query in ["prefix=%00", "after=%00"] {
        let nul = client
            .get(app.url(&format!("/counters?{query}")))
            .send()
            .await
            .unwrap();
        let problem = problem_of(nul, 422).await;
        assert!(problem.detail.contains("NUL"), "{problem:?}");
    }

    let not_utf8 = client.get(app.url("/counters/%FF")).send().await.unwrap();
    let status = not_utf8.status().as_u16();
    assert!((400..500).contains(&status), "{status}");
    problem_of(not_utf8, status).await;

    let malformed = client
        .post(app.url("/increment"))
        .header("content-type", "application/json")
        .body("{")
        .send()
        .await
        .unwrap();
    assert_eq!(
        problem_of(malformed, 422).await.type_uri,
        "/problems/malformed-json"
    );

    let text = client
        .post(app.url("/increment"))
        .header("content-type", "text/plain")
        .body(r#"{"key":"a","value":1}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(
        problem_of(text, 415).await.type_uri,
        "/problems/unsupported-media-type"
    );

    for kind in ProblemType::ALL {
        let page = client.get(app.url(&kind.uri())).send().await.unwrap();
        assert_eq!(page.status(), 200, "{}", kind.uri());
        assert!(page.text().await.unwrap().contains(kind.title()));
    }
    let unknown = client
        .get(app.url("/problems/no-such"))
        .send()
        .await
        .unwrap();
    problem_of(unknown, 404).await;
    app.shut_down_cleanly().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operation_takes_what_the_fast_path_takes() {
    // `?wait=false` sends the request through the operation (the fast path
    // takes only plain requests); both used to differ on these.
    let app = serve(|_| {}).await;
    let client = reqwest::Client::new();
    let deep = format!(
        r#"{{"key":"deep","value":1,"note":{}{}}}"#,
        "[".repeat(200),
        "]".repeat(200)
    );
    for path in ["/increment", "/increment?wait=false"] {
        for content_type in [
            "application/json ; charset=utf-8",
            "application/json;;",
            "application/json; charset=\"utf-8\"",
        ] {
            let response = client
                .post(app.url(path))
                .header("content-type", content_type)
                .body(r#"{"key":"ct","value":1}"#)
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), 202, "{path} {content_type}");
        }
        let refused = client
            .post(app.url(path))
            .header("content-type", "application/json; =")
            .body(r#"{"key":"ct","value":1}"#)
            .send()
            .await
            .unwrap();
        problem_of(refused, 415).await;
        let response = client
            .post(app.url(path))
            .header("content-type", "application/json")
            .body(deep.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 202, "{path} deep");
    }
    app.flusher.flush_once().await.expect("the flush succeeds");
    let db = app.shut_down_cleanly().await;
    let counters = db.counters().await;
    assert_eq!(counters.get("ct"), Some(&6));
    assert_eq!(counters.get("deep"), Some(&2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_503_always_means_not_taken_and_carries_retry_after() {
    let app = serve_on(TestDb::sqlite().await, |s| s.max_pending_keys = 1).await;
    let client = reqwest::Client::new();
    let post = |key: &'static str| {
        client
            .post(app.url("/increment"))
            .header("content-type", "application/json")
            .body(format!(r#"{{"key":"{key}","value":1}}"#))
            .send()
    };
    assert_eq!(post("a").await.unwrap().status(), 202);
    let refused = post("b").await.unwrap();
    assert!(refused.headers().contains_key("retry-after"));
    let problem = problem_of(refused, 503).await;
    assert_eq!(problem.type_uri, "/problems/pending-limit");
    app.flusher.flush_once().await.expect("the flush succeeds");
    let db = app.shut_down_cleanly().await;
    assert_eq!(
        db.counters().await,
        std::collections::BTreeMap::from([("a".to_owned(), 1)])
    );
}

/// The bound on pending keys is there to bound memory, and a long key costs
/// more of it: each counts one per 64 bytes of its length, plus one. Before,
/// a key counted one whatever its length (a million 255-character keys of
/// four-byte characters: gigabytes).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_keys_count_toward_the_pending_bound_by_their_length() {
    let app = serve_on(TestDb::sqlite().await, |s| s.max_pending_keys = 32).await;
    let client = reqwest::Client::new();
    let post = |key: String| {
        client
            .post(app.url("/increment"))
            .header("content-type", "application/json")
            .body(serde_json::json!({ "key": key, "value": 1 }).to_string())
            .send()
    };
    // 255 characters of 4 bytes: 1,020 bytes, a weight of 16.
    let long = |c: char| format!("{c}{}", "😀".repeat(254));
    assert_eq!(post(long('a')).await.unwrap().status(), 202);
    assert_eq!(post(long('b')).await.unwrap().status(), 202);
    assert_eq!(app.batcher.pending_keys(), 32);
    assert!(
        app.scrape()
            .await
            .lines()
            .any(|line| line == "increment_pending_keys 32"),
        "the gauge counts what the bound counts"
    );
    let problem = problem_of(post(long('c')).await.unwrap(), 503).await;
    assert_eq!(problem.type_uri, "/problems/pending-limit");
    let problem = problem_of(post("short".to_owned()).await.unwrap(), 503).await;
    assert_eq!(problem.type_uri, "/problems/pending-limit");
    assert_eq!(
        post(long('a')).await.unwrap().status(),
        202,
        "held keys merge"
    );
    app.flusher.flush_once().await.expect("the flush succeeds");
    let db = app.shut_down_cleanly().await;
    assert_eq!(
        db.counters().await,
        std::collections::BTreeMap::from([(long('a'), 2), (long('b'), 1)])
    );
}

/// A client that asks for more than the kernel's socket buffers hold (the
/// Swagger page, 1.6 MB, four times over, pipelined) and stops reading is
/// cut off once it has taken nothing for the send deadline: neither its
/// connection nor the response waiting in the service stays for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_is_cut_off_at_the_send_deadline() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let app = serve(|s| s.send_timeout = DEADLINE).await;
    // A small receive window: what the service sends waits in its own
    // socket buffer (up to a few MB), then in the service.
    let socket = tokio::net::TcpSocket::new_v4().expect("a socket");
    socket.set_recv_buffer_size(4096).expect("a small buffer");
    let mut stream = socket.connect(app.addr).await.expect("connected");
    stream
        .write_all(&b"GET /docs HTTP/1.1\r\nHost: t\r\n\r\n".repeat(4))
        .await
        .expect("sent");
    // The client not reading is the behaviour under test.
    tokio::time::sleep(DEADLINE * 4).await;
    let mut received = Vec::new();
    let read_all = async {
        let mut chunk = [0_u8; 65536];
        loop {
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => received.extend_from_slice(&chunk[..n]),
            }
        }
    };
    assert!(
        tokio::time::timeout(PATIENCE, read_all).await.is_ok(),
        "the service closed the connection"
    );
    let (_, _, length) =
        testkit::response_head(&received).expect("the first response's head arrived");
    let length = length.expect("a content-length");
    assert!(length > 1_000_000, "the page is large: {length} bytes");
    assert!(
        received.len() < 4 * length,
        "cut off before the end: {} bytes of four {length}-byte pages",
        received.len()
    );
    // Clients that read are served as before.
    let response = app.client.get("/docs").send().await;
    response.assert_status(http::StatusCode::OK);
    assert_eq!(response.bytes().len(), length);
    app.shut_down_cleanly().await;
}
