use poem::http::StatusCode;
use testkit::{TestDb, db_tests};

use crate::helpers::spawn_app;

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
    ready.assert_text("ready").await;

    app.app.lifecycle().begin_shutdown();
    let shutting_down = app.client.get("/readyz").send().await;
    shutting_down.assert_status(StatusCode::SERVICE_UNAVAILABLE);
    shutting_down.assert_text("shutting down").await;
    app.client
        .get("/healthz")
        .send()
        .await
        .assert_status_is_ok();
}

db_tests!(readiness_fails_when_the_database_is_gone);

async fn readiness_fails_when_the_database_is_gone(db: TestDb) {
    let app = spawn_app(db).await;
    app.client.get("/readyz").send().await.assert_status_is_ok();
    // Closing a clone closes the shared pool: every later query fails.
    app.app.db().clone().close().await.unwrap();
    let response = app.client.get("/readyz").send().await;
    response.assert_status(StatusCode::SERVICE_UNAVAILABLE);
    response.assert_text("database unavailable").await;
    app.client
        .get("/healthz")
        .send()
        .await
        .assert_status_is_ok();
}
