//! A fresh database per test: SQLite always, PostgreSQL when
//! `TEST_DATABASE_URL` is set (a UUID-named database created on that server and
//! dropped when the test ends).
//!
//! [`TestApp`] serves the real application on port 0 and speaks HTTP to it.
//!
//! [`proxy::FaultProxy`] sits between a service and PostgreSQL to refuse or
//! cut connections.
//!
//! [`db_tests!`] turns one `async fn(TestDb)` into a `sqlite` and a `postgres`
//! test; the PostgreSQL one says on stdout that it was skipped when no server
//! is configured, and fails instead when `CI` is set.

pub mod app;
pub mod nats;
pub mod proxy;

pub use app::{Client, Response, TestApp, percent_encode, test_settings};
pub use nats::{NatsCluster, NatsServer};

use std::collections::BTreeMap;

use sea_orm::{ConnectionTrait, Database, DatabaseConnection, DbBackend, Statement};

/// Which database a test runs against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// A database that exists for one test only.
pub struct TestDb {
    pub url: String,
    pub backend: Backend,
    /// Holds the SQLite file's directory alive.
    _dir: Option<tempfile::TempDir>,
    /// PostgreSQL: the server URL and the database name, to drop it.
    postgres: Option<(String, String)>,
}

impl TestDb {
    /// The same database under a second handle, for a second instance; it
    /// drops nothing (the original must outlive it).
    pub fn alias(&self) -> Self {
        Self {
            url: self.url.clone(),
            backend: self.backend,
            _dir: None,
            postgres: None,
        }
    }

    /// A new, empty SQLite database in a temporary directory.
    pub async fn sqlite() -> Self {
        let dir = tempfile::tempdir().expect("a temporary directory can be created");
        let path = dir.path().join("test.db");
        Self {
            url: format!("sqlite://{}?mode=rwc", path.display()),
            backend: Backend::Sqlite,
            _dir: Some(dir),
            postgres: None,
        }
    }

    /// A new, empty PostgreSQL database, or `None` (with a note on stdout)
    /// when `TEST_DATABASE_URL` is not set.
    ///
    /// # Panics
    /// When `CI` is set and `TEST_DATABASE_URL` is not: in CI a PostgreSQL
    /// test fails rather than passing by skipping.
    pub async fn postgres() -> Option<Self> {
        Self::postgres_created_with("").await
    }

    /// As [`postgres`](Self::postgres), in `encoding` (with the `C` locale,
    /// which every encoding accepts).
    pub async fn postgres_in_encoding(encoding: &str) -> Option<Self> {
        Self::postgres_created_with(&format!(
            " ENCODING '{encoding}' TEMPLATE template0 LC_COLLATE 'C' LC_CTYPE 'C'"
        ))
        .await
    }

    /// A new database created with `options` after its name.
    async fn postgres_created_with(options: &str) -> Option<Self> {
        let server_url = postgres_server(
            std::env::var("TEST_DATABASE_URL").ok(),
            std::env::var_os("CI").is_some(),
        )?;
        let name = format!("test_{}", uuid::Uuid::new_v4().simple());
        let admin = Database::connect(&server_url)
            .await
            .expect("TEST_DATABASE_URL must point at a reachable PostgreSQL server");
        admin
            .execute_unprepared(&format!("CREATE DATABASE \"{name}\"{options}"))
            .await
            .expect("the test user may create databases");
        admin.close().await.ok();
        Some(Self {
            url: with_database(&server_url, &name),
            backend: Backend::Postgres,
            _dir: None,
            postgres: Some((server_url, name)),
        })
    }

    pub async fn connect(&self) -> DatabaseConnection {
        Database::connect(&self.url)
            .await
            .expect("the test database accepts connections")
    }

    /// Every stored counter, `key → value`.
    pub async fn counters(&self) -> BTreeMap<String, i64> {
        let db = self.connect().await;
        let rows = db
            .query_all_raw(Statement::from_string(
                db.get_database_backend(),
                "SELECT key, value FROM counters",
            ))
            .await
            .expect("counters can be read");
        let counters = rows
            .iter()
            .map(|row| {
                let key: String = row.try_get("", "key").expect("key is text");
                let value: i64 = row.try_get("", "value").expect("value is bigint");
                (key, value)
            })
            .collect();
        db.close().await.ok();
        counters
    }

    /// Runs one SQL statement (test sabotage: rename a table, etc.).
    pub async fn execute(&self, sql: &str) {
        let db = self.connect().await;
        db.execute_unprepared(sql)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
        db.close().await.ok();
    }

    /// PostgreSQL only: the server's address (for a [`proxy::FaultProxy`]).
    pub fn postgres_addr(&self) -> Option<std::net::SocketAddr> {
        use std::net::ToSocketAddrs;
        let (server_url, _) = self.postgres.as_ref()?;
        let rest = server_url.split_once("://")?.1;
        let authority = &rest[..rest.find(['/', '?']).unwrap_or(rest.len())];
        let host_port = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
        let host_port = if host_port.contains(':') {
            host_port.to_owned()
        } else {
            format!("{host_port}:5432")
        };
        host_port.to_socket_addrs().ok()?.next()
    }

    pub fn db_backend(&self) -> DbBackend {
        match self.backend {
            Backend::Sqlite => DbBackend::Sqlite,
            Backend::Postgres => DbBackend::Postgres,
        }
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let Some((server_url, name)) = self.postgres.take() else {
            return;
        };
        // Drop may run inside a runtime that is shutting down: use a thread
        // with its own runtime.
        let dropped = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime can be built");
            runtime.block_on(async {
                if let Ok(admin) = Database::connect(&server_url).await {
                    let _ = admin
                        .execute_unprepared(&format!(
                            "DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"
                        ))
                        .await;
                    admin.close().await.ok();
                }
            });
        })
        .join();
        if dropped.is_err() {
            eprintln!("dropping a test database panicked");
        }
    }
}

/// The PostgreSQL server the tests use, or `None` (skipped, said on stdout).
///
/// # Panics
/// In CI without a server: there, a skipped PostgreSQL test would pass
/// without having run.
fn postgres_server(test_database_url: Option<String>, in_ci: bool) -> Option<String> {
    match test_database_url {
        Some(url) => Some(url),
        None if in_ci => {
            panic!("CI is set but TEST_DATABASE_URL is not: the PostgreSQL tests must run in CI")
        }
        None => {
            println!("PostgreSQL skipped: TEST_DATABASE_URL is not set");
            None
        }
    }
}

/// `postgres://u@h:5432/postgres?x=y` with the database replaced by `name`.
pub fn with_database(server_url: &str, name: &str) -> String {
    let (base, query) = match server_url.split_once('?') {
        Some((base, query)) => (base, Some(query)),
        None => (server_url, None),
    };
    let scheme_end = base.find("://").map_or(0, |i| i + 3);
    let path_start = base[scheme_end..]
        .find('/')
        .map_or(base.len(), |i| scheme_end + i);
    let mut url = format!("{}/{}", &base[..path_start], name);
    if let Some(query) = query {
        url.push('?');
        url.push_str(query);
    }
    url
}

/// Polls `condition` until it holds, every few milliseconds, for at most
/// `within`; panics naming `what` when it never does. How tests wait: for an
/// outcome, never for a fixed time.
pub async fn eventually<F, Fut>(within: std::time::Duration, what: &str, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + within;
    while !condition().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: not within {within:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// One `async fn(TestDb)` → a `sqlite` and a `postgres` `#[tokio::test]`.
#[macro_export]
macro_rules! db_tests {
    ($($name:ident),* $(,)?) => {
        $(
            mod $name {
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn sqlite() {
                    super::$name($crate::TestDb::sqlite().await).await;
                }

                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn postgres() {
                    if let Some(db) = $crate::TestDb::postgres().await {
                        super::$name(db).await;
                    }
                }
            }
        )*
    };
}

/// The first HTTP response's head in `received` (lower-cased), where its body
/// starts, and the `Content-Length` it declares; `None` until the whole head
/// has arrived.
pub fn response_head(received: &[u8]) -> Option<(String, usize, Option<usize>)> {
    let end = received.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = String::from_utf8_lossy(&received[..end]).to_ascii_lowercase();
    let length = head
        .lines()
        .find_map(|line| line.strip_prefix("content-length:"))
        .and_then(|value| value.trim().parse().ok());
    Some((head, end + 4, length))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn postgres_tests_skip_only_outside_ci() {
        assert_eq!(postgres_server(None, false), None);
        assert_eq!(
            postgres_server(Some("postgres://h".into()), true).as_deref(),
            Some("postgres://h")
        );
        let in_ci = std::panic::catch_unwind(|| postgres_server(None, true));
        assert!(in_ci.is_err(), "CI without TEST_DATABASE_URL fails");
    }

    #[test]
    fn replaces_only_the_database_name() {
        assert_eq!(
            with_database("postgres://postgres@127.0.0.1:5432/postgres", "t1"),
            "postgres://postgres@127.0.0.1:5432/t1"
        );
        assert_eq!(
            with_database("postgres://u:p@h/db?sslmode=disable", "t2"),
            "postgres://u:p@h/t2?sslmode=disable"
        );
        assert_eq!(with_database("postgres://h", "t3"), "postgres://h/t3");
    }
}
