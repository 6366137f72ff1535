//! Traces leave the process over OTLP/HTTP: a small OTLP receiver inside the
//! test gets the request span (continuing an incoming `traceparent`) and the
//! flush span with its links and database child spans.
//!
//! Its own test binary: telemetry is global to the process.

use std::sync::{Arc, Mutex};

use api::telemetry::{self, LogFormat, TelemetrySettings};
use opentelemetry_proto::tonic::{
    collector::trace::v1::ExportTraceServiceRequest,
    common::v1::{AnyValue, KeyValue, any_value::Value},
    trace::v1::Span,
};
use poem::{EndpointExt, Route, handler, listener::TcpAcceptor, post, web::Data};
use prost::Message;
use testkit::{TestApp, TestDb};

/// Everything the receiver was sent.
#[derive(Default)]
struct Received(Mutex<Vec<ExportTraceServiceRequest>>);

#[handler]
async fn receive(body: Vec<u8>, received: Data<&Arc<Received>>) -> poem::http::StatusCode {
    match ExportTraceServiceRequest::decode(body.as_slice()) {
        Ok(request) => {
            received.0.0.lock().unwrap().push(request);
            poem::http::StatusCode::OK
        }
        Err(_) => poem::http::StatusCode::BAD_REQUEST,
    }
}

fn attribute<'a>(attributes: &'a [KeyValue], key: &str) -> Option<&'a Value> {
    attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref())
        .and_then(|v: &AnyValue| v.value.as_ref())
}

fn string(attributes: &[KeyValue], key: &str) -> String {
    match attribute(attributes, key) {
        Some(Value::StringValue(s)) => s.clone(),
        other => panic!("{key}: expected a string, found {other:?}"),
    }
}

fn int(attributes: &[KeyValue], key: &str) -> i64 {
    match attribute(attributes, key) {
        Some(Value::IntValue(i)) => *i,
        other => panic!("{key}: expected an integer, found {other:?}"),
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_and_flush_spans_reach_an_otlp_receiver() {
    // The receiver.
    let received = Arc::new(Received::default());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let receiver_addr = listener.local_addr().unwrap();
    let receiver = Route::new()
        .at("/v1/traces", post(receive))
        .data(Arc::clone(&received));
    // The bound listener itself: no window for another process to take the port.
    let acceptor = TcpAcceptor::from_tokio(listener).unwrap();
    tokio::spawn(poem::Server::new_with_acceptor(acceptor).run(receiver));

    let telemetry = Arc::new(
        telemetry::init(&TelemetrySettings {
            log_format: LogFormat::Json,
            otlp_endpoint: Some(format!("http://{receiver_addr}")),
            service_name: "increment-test".into(),
            instance_id: "instance-1".into(),
        })
        .expect("telemetry starts"),
    );
    assert!(telemetry.is_exporting());

    let app = TestApp::start_with(TestDb::sqlite().await, |_| {}).await;
    let client = &app.client;

    let incoming_trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let incoming_parent = "00f067aa0ba902b7";
    client
        .post("/increment")
        .header(
            "traceparent",
            format!("00-{incoming_trace}-{incoming_parent}-01"),
        )
        .content_type("application/json")
        .body(r#"{"key":"traced","value":1}"#)
        .send()
        .await
        .assert_status(poem::http::StatusCode::ACCEPTED);
    app.increment("untraced", 2)
        .await
        .assert_status(poem::http::StatusCode::ACCEPTED);
    app.flusher.flush_once().await.unwrap();

    let exporter = Arc::clone(&telemetry);
    tokio::task::spawn_blocking(move || exporter.shutdown())
        .await
        .unwrap();

    let requests = received.0.lock().unwrap().clone();
    assert!(!requests.is_empty(), "the exporter sent spans");
    let resource = requests[0].resource_spans[0].resource.as_ref().unwrap();
    assert_eq!(
        string(&resource.attributes, "service.name"),
        "increment-test"
    );
    assert_eq!(
        string(&resource.attributes, "service.instance.id"),
        "instance-1"
    );
    let spans: Vec<Span> = requests
        .iter()
        .flat_map(|r| &r.resource_spans)
        .flat_map(|rs| &rs.scope_spans)
        .flat_map(|ss| ss.spans.clone())
        .collect();

    let request_spans: Vec<&Span> = spans
        .iter()
        .filter(|s| s.name == "POST /increment")
        .collect();
    assert_eq!(request_spans.len(), 2, "one span per request");
    for span in &request_spans {
        assert_eq!(string(&span.attributes, "http.request.method"), "POST");
        assert_eq!(string(&span.attributes, "http.route"), "/increment");
        assert_eq!(int(&span.attributes, "http.response.status_code"), 202);
    }
    let continued = request_spans
        .iter()
        .find(|s| hex(&s.trace_id) == incoming_trace)
        .expect("the traceparent's trace id is kept");
    assert_eq!(hex(&continued.parent_span_id), incoming_parent);
    let fresh = request_spans
        .iter()
        .find(|s| hex(&s.trace_id) != incoming_trace)
        .expect("a request without traceparent starts a trace");
    assert!(fresh.parent_span_id.is_empty());

    let flush = spans
        .iter()
        .find(|s| {
            s.name == "flush"
                && attribute(&s.attributes, "outcome")
                    .is_some_and(|v| *v == Value::StringValue("written".into()))
        })
        .expect("a flush span that wrote");
    assert_eq!(int(&flush.attributes, "keys"), 2);
    assert_eq!(int(&flush.attributes, "chunks"), 1);
    let linked: Vec<String> = flush.links.iter().map(|l| hex(&l.span_id)).collect();
    for span in &request_spans {
        assert!(
            linked.contains(&hex(&span.span_id)),
            "the flush links to its requests"
        );
    }
    let write = spans
        .iter()
        .find(|s| s.name == "db.write_batch")
        .expect("a span for the batch write");
    assert_eq!(
        write.parent_span_id, flush.span_id,
        "a child of the flush span"
    );
    let part = spans
        .iter()
        .find(|s| s.name == "db.write_part")
        .expect("a span per part of the batch");
    assert_eq!(part.parent_span_id, write.span_id);
    assert_eq!(int(&part.attributes, "part.keys"), 2);
    let upsert = spans
        .iter()
        .find(|s| s.name == "db.upsert")
        .expect("a span per statement");
    assert_eq!(upsert.parent_span_id, part.span_id);
    assert_eq!(int(&upsert.attributes, "rows"), 2);
}
