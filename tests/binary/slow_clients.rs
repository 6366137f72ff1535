//! Clients that read their answers slowly, against the real binary: what
//! each such connection costs the process (resident memory from `/proc`).

use std::time::Duration;

use testkit::TestDb;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpSocket, TcpStream},
};

use crate::service::Service;

/// Resident memory of `pid`, in bytes.
fn rss_bytes(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc is readable");
    let kib: u64 = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in kB");
    kib * 1024
}

/// Requests the service has answered on `route`, from its metrics.
async fn answered_on(base: &str, route: &str) -> u64 {
    let text = reqwest::get(format!("{base}/metrics"))
        .await
        .expect("GET /metrics")
        .text()
        .await
        .expect("the metrics' text");
    let label = format!("route=\"{route}\"");
    text.lines()
        .filter(|line| line.starts_with("increment_http_requests_total{") && line.contains(&label))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

/// A connection that asks for `path` and then reads nothing: its receive
/// buffer is kept small so the page cannot sit in the kernel instead.
async fn ask_and_stall(addr: std::net::SocketAddr, path: &str) -> TcpStream {
    let socket = TcpSocket::new_v4().expect("a socket");
    socket.set_recv_buffer_size(4096).expect("SO_RCVBUF");
    let mut stream = socket.connect(addr).await.expect("connects");
    stream
        .write_all(format!("GET {path} HTTP/1.1\r\nHost: test\r\n\r\n").as_bytes())
        .await
        .expect("the request is sent");
    stream
}

/// Reads one whole response; returns its head and the length of its body.
async fn read_response(stream: &mut TcpStream) -> (String, usize) {
    let mut received = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = stream.read(&mut buf).await.expect("reads");
        assert!(n > 0, "the connection closed before the whole page came");
        received.extend_from_slice(&buf[..n]);
        let Some((head, body_start, length)) = testkit::response_head(&received) else {
            continue;
        };
        let length = length.expect("the page declares its length");
        if received.len() - body_start >= length {
            return (head, received.len() - body_start);
        }
    }
}

/// Before: each connection's answer was a fresh 1.6 MB copy of the page,
/// copied again whole into hyper's write buffer (300 connections: +473 MB).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_readers_of_the_docs_hold_a_slice_of_the_page_not_a_copy_each() {
    const CONNECTIONS: usize = 200;
    let db = TestDb::sqlite().await;
    let spill = tempfile::tempdir().expect("a temporary directory");
    let service = Service::start(&db, spill.path()).await;
    let pid = service.pid().as_raw();
    let addr: std::net::SocketAddr = service
        .base
        .trim_start_matches("http://")
        .parse()
        .expect("an address");
    let page_length = reqwest::get(format!("{}/docs", service.base))
        .await
        .expect("GET /docs")
        .bytes()
        .await
        .expect("the page")
        .len();
    assert!(
        page_length > 1_000_000,
        "the page inlines its bundle ({page_length} bytes)"
    );
    let before = rss_bytes(pid);
    let answered_before = answered_on(&service.base, "/docs").await;

    let mut streams = Vec::with_capacity(CONNECTIONS);
    for i in 0..CONNECTIONS {
        let path = if i % 2 == 0 { "/docs" } else { "/openapi.json" };
        streams.push(ask_and_stall(addr, path).await);
    }
    testkit::eventually(
        Duration::from_secs(30),
        "every /docs request is answered",
        || async {
            answered_on(&service.base, "/docs").await >= answered_before + CONNECTIONS as u64 / 2
        },
    )
    .await;
    let grown = rss_bytes(pid).saturating_sub(before);
    // A copy each would be 100 × 1.6 MB; a slice and hyper's buffer each, a
    // few MB in all.
    assert!(
        grown < 48 << 20,
        "{CONNECTIONS} stalled readers grew the service by {} MB",
        grown >> 20
    );

    // Each reader still gets the whole page, in order of its length.
    for (i, stream) in streams.iter_mut().enumerate() {
        let (head, body_length) = read_response(stream).await;
        assert!(head.starts_with("http/1.1 200"), "{head}");
        if i % 2 == 0 {
            assert_eq!(body_length, page_length);
        }
    }
}
