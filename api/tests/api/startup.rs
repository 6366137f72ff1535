use api::Application;
use sea_orm::{ConnectionTrait, Statement};
use testkit::TestDb;

use crate::helpers::test_settings;

/// Replicas started together against an empty database all come up, and
/// each migration is applied once (PostgreSQL advisory lock).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_started_together_apply_each_migration_once() {
    let Some(db) = TestDb::postgres().await else {
        return;
    };
    let builds: Vec<_> = (0..4)
        .map(|_| {
            let settings = test_settings(&db);
            tokio::spawn(async move { Application::build(settings).await.map(|_| ()) })
        })
        .collect();
    for build in builds {
        build.await.unwrap().expect("every replica starts");
    }
    let connection = db.connect().await;
    let rows = connection
        .query_all_raw(Statement::from_string(
            connection.get_database_backend(),
            "SELECT version FROM seaql_migrations ORDER BY version",
        ))
        .await
        .unwrap();
    assert_eq!(rows.len(), migration_count(), "one row per migration");
}

fn migration_count() -> usize {
    use migration::MigratorTrait;
    migration::Migrator::migrations().len()
}
