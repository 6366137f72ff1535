//! The admin routes: absent without a token, refused without the right one.

use poem::http::StatusCode;
use testkit::{TestDb, db_tests};

use crate::helpers::{assert_accepted, spawn_app, spawn_app_with, test_settings};

db_tests!(admin_routes_need_the_token);

async fn admin_routes_need_the_token(db: TestDb) {
    let token = "s3cret-admin-token-for-tests";
    let without = spawn_app(TestDb::sqlite().await).await;
    without
        .client
        .post("/admin/flush")
        .header("authorization", format!("Bearer {token}"))
        .send()
        .await
        .assert_status(StatusCode::NOT_FOUND);

    let mut settings = test_settings(&db);
    settings.admin_token = Some(token.to_owned());
    let app = spawn_app_with(db, settings).await;
    assert_accepted(app.increment("a", 2).await).await;
    for header in [
        None,
        Some("Bearer wrong-token-of-some-length"),
        Some(token),
        Some("Basic abc"),
    ] {
        let mut request = app.client.post("/admin/flush");
        if let Some(value) = header {
            request = request.header("authorization", value);
        }
        let response = request.send().await;
        response.assert_status(StatusCode::UNAUTHORIZED);
        response.assert_header("www-authenticate", "Bearer");
    }
    let response = app
        .client
        .post("/admin/flush")
        .header("authorization", format!("Bearer {token}"))
        .send()
        .await;
    response.assert_status_is_ok();
    response.assert_json(serde_json::json!({"keys": 1, "batches": 1, "statements": 1}));
    assert_eq!(app.counters().await.get("a"), Some(&2));
    let metrics = app.scrape().await;
    assert!(!metrics.contains(token));
}
