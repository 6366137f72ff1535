//! The binary's logs as an operator reads them: the access log, request ids
//! in and out, trace ids on the lines inside request and flush spans, JSON
//! for every line (the last error included), no colour codes in a pipe.

use std::{process::Stdio, time::Duration};

use serde_json::Value;
use testkit::TestDb;

use crate::service::Service;

const TOKEN: &str = "an-admin-token-for-logs";

/// Every stderr line so far, each parsed as JSON (a line that is not JSON
/// fails the test).
fn json_lines(service: &Service) -> Vec<Value> {
    service
        .logs
        .lock()
        .iter()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}")))
        .collect()
}

/// The access line of the request whose id is `request_id`, once written.
async fn access_line(service: &Service, request_id: &str) -> Value {
    let find = || {
        json_lines(service)
            .into_iter()
            .filter(|line| line["target"] == "increment::access")
            .filter(|line| line["request_id"] == request_id)
            .collect::<Vec<_>>()
    };
    testkit::eventually(
        Duration::from_secs(10),
        "the access line is written",
        || async { !find().is_empty() },
    )
    .await;
    let lines = find();
    assert_eq!(lines.len(), 1, "one access line per request: {lines:?}");
    lines.into_iter().next().expect("one line")
}

fn header(response: &reqwest::Response, name: &str) -> String {
    response
        .headers()
        .get(name)
        .unwrap_or_else(|| panic!("no {name} header"))
        .to_str()
        .expect("visible ASCII")
        .to_owned()
}

fn is_trace_id(value: &Value) -> bool {
    value.as_str().is_some_and(|id| {
        id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit()) && id != "0".repeat(32)
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_request_gets_one_access_line_and_its_id_back() {
    let db = TestDb::sqlite().await;
    let dir = tempfile::tempdir().unwrap();
    let service = Service::start_logging(
        &db,
        dir.path(),
        // Only /admin/flush writes: its flush is the request's child span.
        &[
            "--access-log",
            "--admin-token",
            TOKEN,
            "--flush-interval",
            "1h",
        ],
        "info,api::flusher=debug",
    )
    .await;
    let client = reqwest::Client::new();
    let url = |path: &str| format!("{}{path}", service.base);

    // A caller's id is kept and returned.
    let body = r#"{"key":"page:home","value":2}"#;
    let accepted = client
        .post(url("/increment"))
        .header("x-request-id", "abc")
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(accepted.status(), 202);
    assert_eq!(header(&accepted, "x-request-id"), "abc");
    let line = access_line(&service, "abc").await;
    assert_eq!(line["level"], "INFO");
    assert_eq!(line["method"], "POST");
    assert_eq!(line["route"], "/increment");
    assert_eq!(line["status"], 202);
    assert_eq!(line["request_bytes"], body.len());
    assert_eq!(line["response_bytes"], 0);
    assert!(
        line["duration_ms"].as_f64().is_some_and(|ms| ms >= 0.0),
        "{line}"
    );
    assert!(is_trace_id(&line["trace_id"]), "{line}");

    // Without one, one is made (32 hex digits) and logged.
    let health = client.get(url("/healthz")).send().await.unwrap();
    let made = header(&health, "x-request-id");
    assert!(
        made.len() == 32 && made.bytes().all(|b| b.is_ascii_hexdigit()),
        "{made}"
    );
    assert_eq!(access_line(&service, &made).await["route"], "/healthz");

    // An id that is not sane (a space, a control character, too long) is replaced.
    for insane in ["two words", "tab\there", &"x".repeat(129)] {
        let response = client
            .get(url("/healthz"))
            .header("x-request-id", insane)
            .send()
            .await
            .unwrap();
        let replaced = header(&response, "x-request-id");
        assert_ne!(replaced, insane);
        assert_eq!(replaced.len(), 32, "{replaced}");
    }

    // A refusal by the admin routes' guard leaves a trace, with its id.
    let refused = client
        .post(url("/admin/flush"))
        .header("x-request-id", "wrong-token-1")
        .bearer_auth("not-the-token-at-all")
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 401);
    assert_eq!(header(&refused, "x-request-id"), "wrong-token-1");
    let line = access_line(&service, "wrong-token-1").await;
    assert_eq!(
        (line["route"].as_str(), line["status"].as_u64()),
        (Some("/admin"), Some(401))
    );

    // A problem document carries the id too; its size is logged.
    let invalid = client
        .post(url("/increment"))
        .header("x-request-id", "invalid-1")
        .header("content-type", "application/json")
        .body(r#"{"key":"k","value":"two"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(invalid.status(), 422);
    assert_eq!(header(&invalid, "x-request-id"), "invalid-1");
    let problem = invalid.bytes().await.unwrap();
    let line = access_line(&service, "invalid-1").await;
    assert_eq!(line["status"], 422);
    assert_eq!(line["response_bytes"], problem.len());

    // So does a refusal of the front door itself, before any routing.
    let too_large = client
        .post(url("/increment"))
        .header("x-request-id", "too-large-1")
        .header("content-type", "application/json")
        .body(" ".repeat(70_000))
        .send()
        .await
        .unwrap();
    assert_eq!(too_large.status(), 413);
    assert_eq!(header(&too_large, "x-request-id"), "too-large-1");
    let line = access_line(&service, "too-large-1").await;
    assert_eq!(
        (line["status"].as_u64(), line["request_bytes"].as_u64()),
        (Some(413), Some(70_000))
    );

    // The path a client sent is not logged: the route template is.
    let key = "a-key-only-the-client-knows";
    let read = client
        .get(url(&format!("/counters/{key}")))
        .header("x-request-id", "read-1")
        .send()
        .await
        .unwrap();
    assert_eq!(read.status(), 404);
    assert_eq!(
        access_line(&service, "read-1").await["route"],
        "/counters/{key}"
    );
    assert!(
        service.logs.lock().iter().all(|line| !line.contains(key)),
        "a client's path reached the logs"
    );

    // Lines inside a request (here its flush's) carry its id and trace id.
    let flushed = client
        .post(url("/admin/flush"))
        .header("x-request-id", "flush-1")
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(flushed.status(), 200);
    let access = access_line(&service, "flush-1").await;
    let inner: Vec<Value> = json_lines(&service)
        .into_iter()
        .filter(|line| line["message"] == "flushed")
        .collect();
    assert_eq!(inner.len(), 1, "{inner:?}");
    assert_eq!(inner[0]["request_id"], "flush-1");
    assert_eq!(inner[0]["span"], "flush");
    assert_eq!(inner[0]["trace_id"], access["trace_id"]);
    assert_ne!(
        inner[0]["span_id"], access["span_id"],
        "the flush has its own span"
    );

    // The effective settings are fields, not one Debug string.
    let settings = json_lines(&service)
        .into_iter()
        .find(|line| line["message"] == "settings")
        .expect("a settings line");
    assert_eq!(settings["max_body"], 65_536);
    assert_eq!(settings["access_log"], true);
    assert_eq!(settings["admin_routes"], true);
    assert!(settings["listen"].is_string(), "{settings}");
    assert!(
        service.logs.lock().iter().all(|line| !line.contains(TOKEN)),
        "the admin token reached the logs"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_flag_there_is_no_access_log_but_ids_are_returned() {
    let db = TestDb::sqlite().await;
    let dir = tempfile::tempdir().unwrap();
    let service = Service::start_logging(&db, dir.path(), &[], "info").await;
    let response = reqwest::Client::new()
        .get(format!("{}/nothing-here", service.base))
        .header("x-request-id", "quiet-1")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 404);
    assert_eq!(header(&response, "x-request-id"), "quiet-1");
    // Lines are written in order: once a later line is in, so would the access line be.
    wait_for_the_sigterm_line(&service).await;
    assert!(
        json_lines(&service)
            .iter()
            .all(|line| line["target"] != "increment::access"),
        "an access line without --access-log"
    );
}

/// Waits for a line written after everything sent so far: SIGTERM's
/// "shutdown requested" line.
async fn wait_for_the_sigterm_line(service: &Service) {
    service.terminate();
    testkit::eventually(
        Duration::from_secs(10),
        "the shutdown is logged",
        || async {
            json_lines(service)
                .iter()
                .any(|line| line["message"] == "received SIGTERM")
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flush_failure_carries_the_flush_span_s_trace_id() {
    let db = TestDb::sqlite().await;
    let dir = tempfile::tempdir().unwrap();
    // The default filter: the flush span is at INFO, and a filter that
    // leaves it out leaves out its trace id too.
    let service =
        Service::start_logging(&db, dir.path(), &[], api::telemetry::DEFAULT_LOG_FILTER).await;
    db.execute("ALTER TABLE counters RENAME TO counters_away")
        .await;
    accept_one(&service).await;
    let failure = || {
        json_lines(&service)
            .into_iter()
            .find(|line| line["message"] == "flush failed; the batch is kept and retried")
    };
    testkit::eventually(Duration::from_secs(10), "a flush fails", || async {
        failure().is_some()
    })
    .await;
    let line = failure().expect("found");
    assert_eq!(line["level"], "WARN");
    assert_eq!(line["span"], "flush");
    assert!(is_trace_id(&line["trace_id"]), "{line}");
    assert_eq!(line["failures"], 1);
    db.execute("ALTER TABLE counters_away RENAME TO counters")
        .await;
}

/// A database that cannot be reached made every flush log only the pool's
/// "timed out", which cannot tell a server that is down from an exhausted
/// pool; the reason a connection fails is logged once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_database_is_logged_with_the_reason() {
    let Some(db) = TestDb::postgres().await else {
        return;
    };
    let proxy = testkit::proxy::FaultProxy::start(db.postgres_addr().expect("an address")).await;
    let mut through_proxy = db.alias();
    through_proxy.url = proxy.url_for(&db.url);
    let dir = tempfile::tempdir().unwrap();
    let service = Service::start_logging(
        &through_proxy,
        dir.path(),
        &[],
        api::telemetry::DEFAULT_LOG_FILTER,
    )
    .await;
    proxy.refuse();
    accept_one(&service).await;
    let unreachable = || {
        json_lines(&service)
            .into_iter()
            .filter(|line| line["message"] == "the database cannot be reached")
            .collect::<Vec<_>>()
    };
    testkit::eventually(Duration::from_secs(60), "the reason is logged", || async {
        !unreachable().is_empty()
    })
    .await;
    let line = &unreachable()[0];
    assert_eq!(line["level"], "WARN");
    let reason = line["reason"].as_str().expect("a reason");
    assert!(!reason.contains("timed out"), "{reason}");
    proxy.restore();
    testkit::eventually(
        Duration::from_secs(60),
        "the flush succeeds again",
        || async { db.counters().await.get("k") == Some(&1) },
    )
    .await;
    assert_eq!(unreachable().len(), 1, "logged once");
}

/// `POST /increment` of 1 to "k", answered `202`.
async fn accept_one(service: &Service) {
    let response = reqwest::Client::new()
        .post(format!("{}/increment", service.base))
        .header("content-type", "application/json")
        .body(r#"{"key":"k","value":1}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
}

/// Runs the binary until it exits (it cannot start) and returns its stderr.
async fn failed_start(args: &[&str], envs: &[(&str, &str)]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_increment"));
    command
        .args(["--listen", "127.0.0.1:0"])
        .arg("--spill-path")
        .arg(dir.path().join("spill.jsonl"))
        .args(args)
        .env_remove("NO_COLOR")
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    for (name, value) in envs {
        command.env(name, value);
    }
    let output = tokio::time::timeout(Duration::from_secs(30), command.output())
        .await
        .expect("the binary exits within 30 s")
        .expect("the binary runs");
    assert!(!output.status.success(), "it cannot start");
    String::from_utf8(output.stderr).expect("UTF-8 logs")
}

/// Refused by the settings check at once (no connection attempt to wait for).
const UNUSABLE_URL: &str = "mysql://app:s3cr3t-pw@127.0.0.1:1/increment";

#[tokio::test]
async fn in_json_mode_the_last_error_is_json_too() {
    let stderr = failed_start(
        &["--database-url", UNUSABLE_URL, "--log-format", "json"],
        &[],
    )
    .await;
    let lines: Vec<Value> = stderr
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}")))
        .collect();
    let last = lines.last().expect("a line");
    assert_eq!(last["level"], "ERROR", "{stderr}");
    assert_eq!(last["message"], "exiting on an error");
    let error = last["error"].as_str().expect("an error field");
    assert!(error.contains("--database-url"), "{error}");
    let settings = lines
        .iter()
        .find(|line| line["message"] == "settings")
        .expect("a settings line");
    assert_eq!(
        settings["database_url"],
        "mysql://app:***@127.0.0.1:1/increment"
    );
    assert!(!stderr.contains("s3cr3t-pw"), "{stderr}");
}

/// Settings that parse but disagree are refused before logging starts; in
/// JSON mode that refusal is a JSON line too.
#[tokio::test]
async fn in_json_mode_a_settings_refusal_is_json_too() {
    let stderr = failed_start(&["--log-format", "json", "--stop-grace-period", "5s"], &[]).await;
    let line: Value = serde_json::from_str(stderr.trim())
        .unwrap_or_else(|e| panic!("one JSON line ({e}): {stderr}"));
    assert_eq!(line["level"], "ERROR");
    assert_eq!(line["message"], "invalid settings");
    let error = line["error"].as_str().expect("an error field");
    assert!(error.contains("must be at least 6s"), "{error}");
    assert!(!error.contains("Usage"), "{error}");
}

#[tokio::test]
async fn text_logs_into_a_pipe_have_no_colour_codes() {
    let stderr = failed_start(
        &["--database-url", UNUSABLE_URL, "--log-format", "text"],
        &[],
    )
    .await;
    assert!(stderr.contains("exiting on an error"), "{stderr}");
    assert!(
        !stderr.contains("\x1b["),
        "colour codes in a pipe: {stderr:?}"
    );
}
