use poem::http::StatusCode;
use testkit::TestDb;

use crate::helpers::spawn_app;

#[tokio::test]
async fn swagger_ui_is_served_from_the_binary() {
    let app = spawn_app(TestDb::sqlite().await).await;
    let response = app.client.get("/docs").send().await;
    response.assert_status_is_ok();
    response.assert_content_type("text/html; charset=utf-8");
    let html = response.text();
    assert!(html.contains("SwaggerUIBundle"), "the bundle is inlined");
    for external in ["src=\"http", "href=\"http", "src='http", "href='http"] {
        assert!(!html.contains(external), "no external asset ({external})");
    }
}

/// The pages answer `GET` and `HEAD`; any other method is `405` with `Allow`,
/// as on every other read-only route (it was the page, whatever the method).
#[tokio::test]
async fn the_docs_pages_answer_get_and_head_only() {
    let app = spawn_app(TestDb::sqlite().await).await;
    let client = reqwest::Client::new();
    for path in ["/docs", "/docs/", "/openapi.json"] {
        let head = client.head(app.url(path)).send().await.unwrap();
        assert_eq!(head.status(), 200, "HEAD {path}");
        let post = client.post(app.url(path)).send().await.unwrap();
        assert_eq!(post.status(), 405, "POST {path}");
        assert_eq!(post.headers()["allow"], "GET, HEAD", "POST {path}");
        let delete = client.delete(app.url(path)).send().await.unwrap();
        assert_eq!(delete.status(), 405, "DELETE {path}");
    }
}

#[tokio::test]
async fn the_openapi_document_lists_every_status_with_its_schema() {
    let app = spawn_app(TestDb::sqlite().await).await;
    let response = app.client.get("/openapi.json").send().await;
    response.assert_status_is_ok();
    let spec: serde_json::Value = serde_json::from_str(&response.text()).unwrap();
    let operation = &spec["paths"]["/increment"]["post"];
    assert_eq!(
        operation["requestBody"]["content"]["application/json"]["schema"]["$ref"],
        "#/components/schemas/Increment"
    );
    let responses = operation["responses"].as_object().unwrap();
    let mut statuses: Vec<&str> = responses.keys().map(String::as_str).collect();
    statuses.sort_unstable();
    assert_eq!(
        statuses,
        ["200", "202", "408", "413", "415", "422", "503", "504"]
    );
    assert_eq!(
        responses["503"]["headers"]["RETRY-AFTER"]["schema"]["type"],
        "integer"
    );
    assert_eq!(operation["parameters"][0]["name"], "wait");
    for status in ["408", "413", "415", "422", "503", "504"] {
        assert_eq!(
            responses[status]["content"]["application/problem+json"]["schema"]["$ref"],
            "#/components/schemas/Problem",
            "{status}"
        );
    }
    let increment = &spec["components"]["schemas"]["Increment"];
    assert_eq!(increment["properties"]["key"]["maxLength"], 255);
    assert_eq!(increment["properties"]["value"]["format"], "int64");
    assert_eq!(increment["example"]["key"], "page:/home");
    let batch = &spec["paths"]["/increments"]["post"];
    assert_eq!(
        batch["requestBody"]["content"]["application/json"]["schema"]["$ref"],
        "#/components/schemas/IncrementBatch"
    );
    assert_eq!(
        spec["components"]["schemas"]["IncrementBatch"]["example"]["increments"][0]["key"],
        "page:/home",
        "Try it out works with the example as is"
    );
    let read = &spec["paths"]["/counters/{key}"]["get"];
    assert_eq!(read["parameters"][0]["name"], "key");
    assert_eq!(read["parameters"][0]["schema"]["example"], "page:/home");
    let mut read_statuses: Vec<&str> = read["responses"]
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    read_statuses.sort_unstable();
    assert_eq!(read_statuses, ["200", "404", "422", "503"]);
    let list_params: Vec<&str> = spec["paths"]["/counters"]["get"]["parameters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert_eq!(list_params, ["prefix", "limit", "after"]);
    for probe in ["/healthz", "/readyz"] {
        assert!(spec["paths"][probe]["get"].is_object(), "{probe}");
    }
    assert_eq!(
        app.client.get("/no-such-route").send().await.status(),
        StatusCode::NOT_FOUND
    );
    let wrong_method = app.client.get("/increment").send().await;
    wrong_method.assert_status(StatusCode::METHOD_NOT_ALLOWED);
    wrong_method.assert_header("allow", "POST");
    let wrong_method = app.client.delete("/readyz").send().await;
    wrong_method.assert_status(StatusCode::METHOD_NOT_ALLOWED);
    wrong_method.assert_header("allow", "GET, HEAD");
}
