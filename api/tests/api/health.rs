use poem::http::StatusCode;
use testkit::{TestDb, db_tests};

use crate::helpers::{problem, spawn_app};

db_tests!(readiness_follows_the_database_and_the_shutdown);

async fn readiness_follows_the_database_and_the_shutdown(db: TestDb) {
    let app = spawn_app(db).await;
    app.client
        .get("/healthz")
        .send()
        .await
        .assert_status_is_ok();
    let ready = app.client.get("/readyz").send().await;
    ready.assert_status_is_ok();
    ready.assert_text("ready");

    app.lifecycle.clone().begin_shutdown();
    let shutting_down = app.client.get("/readyz").send().await;
    let problem = problem(shutting_down, StatusCode::SERVICE_UNAVAILABLE).await;
    assert_eq!(problem.detail, "shutting down");
    assert_eq!(problem.type_uri, "/problems/not-ready");
    app.client
        .get("/healthz")
        .send()
        .await
        .assert_status_is_ok();
}

db_tests!(readiness_fails_when_the_database_is_gone);

async fn readiness_fails_when_the_database_is_gone(db: TestDb) {
    let app = spawn_app(db).await;
    assert!(app.ready().await, "ready while the database answers");
    // Closing a clone closes the shared pool: every later query fails.
    app.connection.clone().close().await.unwrap();
    let response = app.client.get("/readyz").send().await;
    let problem = problem(response, StatusCode::SERVICE_UNAVAILABLE).await;
    assert_eq!(problem.detail, "database unavailable");
    app.client
        .get("/healthz")
        .send()
        .await
        .assert_status_is_ok();
}
