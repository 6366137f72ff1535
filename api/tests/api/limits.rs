//! Limits against hostile or careless clients, through a real listener.

use std::time::Duration;

use api::{Application, Settings, ShutdownReport};
use testkit::TestDb;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

use crate::helpers::test_settings;

/// A running application; `stop` shuts it down.
struct Running {
    addr: std::net::SocketAddr,
    stop: tokio::sync::oneshot::Sender<()>,
    server: tokio::task::JoinHandle<ShutdownReport>,
    _db: TestDb,
}

async fn run(adjust: impl FnOnce(&mut Settings)) -> Running {
    api::telemetry::init_for_tests();
    let db = TestDb::sqlite().await;
    let mut settings = test_settings(&db);
    adjust(&mut settings);
    let app = Application::build(settings).await.unwrap();
    let addr = app.local_addr();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(app.run_until_stopped(async {
        let _ = stopped.await;
    }));
    Running {
        addr,
        stop,
        server,
        _db: db,
    }
}

impl Running {
    async fn shut_down(self) {
        self.stop.send(()).unwrap();
        assert_eq!(self.server.await.unwrap(), ShutdownReport::Clean);
    }
}

/// Reads until the peer closes (or 5 s pass); returns what arrived.
async fn read_to_close(stream: &mut TcpStream) -> String {
    let mut all = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut all)).await;
    String::from_utf8_lossy(&all).into_owned()
}

const POST_HEAD: &str = "POST /increment HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_dribbles_headers_is_cut_off() {
    let app = run(|s| s.header_timeout = Duration::from_millis(300)).await;
    let mut slow = TcpStream::connect(app.addr).await.unwrap();
    slow.write_all(b"POST /increment HTTP/1.1\r\nHost: t\r\n")
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let answer = tokio::time::timeout(Duration::from_secs(5), slow.read(&mut [0u8; 256]))
        .await
        .expect("the server acts within the header timeout");
    assert!(matches!(answer, Ok(0) | Err(_)), "closed: {answer:?}");
    assert!(started.elapsed() >= Duration::from_millis(250));
    app.shut_down().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_that_never_arrives_gets_408() {
    let app = run(|s| s.body_timeout = Duration::from_millis(300)).await;
    let mut slow = TcpStream::connect(app.addr).await.unwrap();
    slow.write_all(format!("{POST_HEAD}Content-Length: 100\r\n\r\n{{\"key\":").as_bytes())
        .await
        .unwrap();
    let answer = read_to_close(&mut slow).await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("not received within"), "{answer}");
    app.shut_down().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_headers_are_refused() {
    let app = run(|_| {}).await;
    let mut client = TcpStream::connect(app.addr).await.unwrap();
    let huge = "a".repeat(1024 * 1024);
    let _ = client
        .write_all(format!("{POST_HEAD}X-Huge: {huge}\r\nContent-Length: 2\r\n\r\n{{}}").as_bytes())
        .await;
    let answer = read_to_close(&mut client).await;
    assert!(
        answer.is_empty() || answer.starts_with("HTTP/1.1 431"),
        "refused: {}",
        &answer[..answer.len().min(80)]
    );
    app.shut_down().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_the_cap_wait_for_room() {
    let app = run(|s| s.max_connections = 2).await;
    let request = b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n";
    let mut first = TcpStream::connect(app.addr).await.unwrap();
    let mut second = TcpStream::connect(app.addr).await.unwrap();
    for stream in [&mut first, &mut second] {
        stream.write_all(request).await.unwrap();
        let mut buf = [0u8; 256];
        let n = stream.read(&mut buf).await.unwrap();
        assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
    }
    // The kernel completes the handshake, but the service does not take it.
    let mut third = TcpStream::connect(app.addr).await.unwrap();
    third.write_all(request).await.unwrap();
    let mut buf = [0u8; 256];
    let waiting = tokio::time::timeout(Duration::from_millis(500), third.read(&mut buf)).await;
    assert!(waiting.is_err(), "no answer while two connections are open");
    drop(first);
    let n = tokio::time::timeout(Duration::from_secs(5), third.read(&mut buf))
        .await
        .expect("served once a connection closed")
        .unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
    drop(second);
    drop(third);
    app.shut_down().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_beyond_the_in_flight_cap_get_503() {
    let app = run(|s| {
        s.max_in_flight = 1;
        s.body_timeout = Duration::from_secs(2);
    })
    .await;
    // One request holds the only slot: its body is still on the way.
    let mut holder = TcpStream::connect(app.addr).await.unwrap();
    holder
        .write_all(format!("{POST_HEAD}Content-Length: 100\r\n\r\n{{").as_bytes())
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let client = reqwest::Client::new();
    let refused = client
        .post(format!("http://{}/increment", app.addr))
        .header("content-type", "application/json")
        .body(r#"{"key":"k","value":1}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 503);
    assert_eq!(refused.headers()["retry-after"], "1");
    let answer = read_to_close(&mut holder).await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    app.shut_down().await;
}
