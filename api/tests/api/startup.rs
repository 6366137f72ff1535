use std::time::Duration;

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

/// An unreachable database stops the start with an error that names the
/// (redacted) URL and never carries the password, in any form sqlx takes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_start_up_error_of_an_unreachable_database_hides_the_password() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    for url in [
        format!("postgres://app:Sup3r%2FS3cret@127.0.0.1:{port}/db"),
        format!("postgres://app@127.0.0.1:{port}/db?password=Sup3r%2FS3cret"),
    ] {
        let mut settings = api::Settings::with_database(url.clone());
        settings.migrate = false;
        settings.db_connect_timeout = Duration::from_millis(600);
        let err = match Application::build(settings).await {
            Ok(_) => panic!("nothing listens on {port}"),
            Err(err) => err,
        };
        let chain = api::telemetry::error_chain(&err);
        // The driver's own cause, not the pool's "timed out".
        assert!(chain.contains("refused"), "{chain}");
        assert!(chain.contains("attempts over 600ms"), "{chain}");
        let debug = format!("{err:?}");
        for text in [&chain, &debug] {
            assert!(text.contains(&format!("127.0.0.1:{port}")), "{text}");
            for secret in ["Sup3r", "S3cret"] {
                assert!(!text.contains(secret), "{text}");
            }
        }
    }
}

/// A SQLite file that does not exist, opened without `mode=rwc`: the error
/// says how to have it created, at once (waiting cannot help).
#[tokio::test]
async fn a_missing_sqlite_file_says_how_to_create_it() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("new.db").display());
    let started = std::time::Instant::now();
    let err = match Application::build(api::Settings::with_database(url)).await {
        Ok(_) => panic!("the file does not exist"),
        Err(err) => api::telemetry::error_chain(&err),
    };
    assert!(err.contains("add ?mode=rwc"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(5), "not retried");
}

/// A server that takes the connection and never answers: the error says so
/// (not the pool's "timed out"), and the wait ends near its deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_that_never_answers_is_named_within_the_deadline() {
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = silent.local_addr().unwrap().port();
    let mut settings = api::Settings::with_database(format!("postgres://app@127.0.0.1:{port}/db"));
    settings.migrate = false;
    settings.db_connect_timeout = Duration::from_millis(1_500);
    let started = std::time::Instant::now();
    let err = match Application::build(settings).await {
        Ok(_) => panic!("nothing answers on {port}"),
        Err(err) => api::telemetry::error_chain(&err),
    };
    assert!(
        err.contains(&format!(
            "no answer from postgres://app@127.0.0.1:{port}/db"
        )),
        "{err}"
    );
    assert!(!err.contains("pool timed out"), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "{:?}",
        started.elapsed()
    );
    drop(silent);
}

/// A PostgreSQL database in LATIN1 cannot hold some keys (an emoji): their
/// flush failed every time, holding back every increment behind it, then
/// every start that replayed its spill (found by review). Refused at start,
/// before anything is created in it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_not_in_utf8_is_refused_at_start() {
    let Some(db) = TestDb::postgres_in_encoding("LATIN1").await else {
        return;
    };
    let refused = match Application::build(test_settings(&db)).await {
        Ok(_) => panic!("started on a LATIN1 database"),
        Err(refused) => refused,
    };
    assert!(
        matches!(
            &refused,
            api::startup::StartupError::DatabaseEncoding { encoding } if encoding == "LATIN1"
        ),
        "{refused:?}"
    );
    let connection = db.connect().await;
    let tables = connection
        .query_one_raw(Statement::from_string(
            connection.get_database_backend(),
            "SELECT count(*) AS n FROM pg_tables WHERE schemaname = 'public'",
        ))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        tables.try_get::<i64>("", "n").unwrap(),
        0,
        "nothing migrated"
    );
}
