use std::{collections::BTreeMap, time::Duration};

use api::ShutdownReport;
use testkit::{TestDb, db_tests};

use crate::helpers::{assert_accepted, spawn_app_with, test_settings};

db_tests!(
    shutdown_writes_everything_pending,
    shutdown_with_the_database_unavailable_reports_what_is_left,
);

async fn shutdown_writes_everything_pending(db: TestDb) {
    let settings = test_settings(&db);
    let app = spawn_app_with(db, settings).await;
    for (key, value) in [("a", 1), ("b", 2), ("a", 3)] {
        assert_accepted(app.increment(key, value).await).await;
    }
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(app.app.run_until_stopped(async {
        let _ = stopped.await;
    }));
    stop.send(()).unwrap();
    // The flush interval is an hour: only the shutdown sequence can write.
    assert_eq!(server.await.unwrap(), ShutdownReport::Clean);
    assert_eq!(
        app.db.counters().await,
        BTreeMap::from([("a".into(), 4), ("b".into(), 2)])
    );
}

async fn shutdown_with_the_database_unavailable_reports_what_is_left(db: TestDb) {
    let mut settings = test_settings(&db);
    settings.shutdown_timeout = Duration::from_secs(1);
    settings.flush_interval = Duration::from_millis(50);
    let app = spawn_app_with(db, settings).await;
    app.db
        .execute("ALTER TABLE counters RENAME TO counters_away")
        .await;
    for (key, value) in [("a", 1), ("b", 2), ("a", 3)] {
        assert_accepted(app.increment(key, value).await).await;
    }
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(app.app.run_until_stopped(async {
        let _ = stopped.await;
    }));
    stop.send(()).unwrap();
    match server.await.unwrap() {
        ShutdownReport::Unwritten(unwritten) => {
            assert_eq!(unwritten.keys, 2);
            assert_eq!(unwritten.total, 6);
        }
        ShutdownReport::Clean => panic!("nothing could have been written"),
    }
}
