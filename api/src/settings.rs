//! The service's configuration as plain data. `src/config.rs` fills it from
//! flags and environment; tests build it directly.

use std::{fmt, net::SocketAddr, num::NonZeroU64, path::PathBuf, time::Duration};

/// Shortest admin token, in characters.
pub const MIN_ADMIN_TOKEN_CHARS: usize = 16;

/// The smallest `max_head_bytes` hyper takes (it refuses to start below).
pub const MIN_HEAD_BYTES: usize = 8192;

/// How long start-up waits for the database unless told otherwise.
pub const DEFAULT_DB_CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// How often a running instance replays what others left in a shared spill
/// directory.
pub const DEFAULT_SPILL_RESCAN_INTERVAL: Duration = Duration::from_secs(60);

/// The longest `--cache-ttl`: moka refuses longer, by panicking (its years
/// have 365 days).
pub const MAX_CACHE_TTL: Duration = Duration::from_secs(1000 * 365 * 24 * 3600);

/// The longest value of any other duration setting: 100 years as the flags
/// write them (`100years`, of 365.25 days). Far beyond any use, and far
/// enough from the clocks' ends that `now + duration` (and arithmetic on it,
/// such as three eighths of the shutdown timeout) cannot overflow and panic
/// in a request, a connection or the flush loop.
pub const MAX_DURATION: Duration = Duration::from_secs(100 * 31_557_600);

/// The largest `--db-pool-size`: the pool reserves room for every connection
/// it may open (100,000,000 took 7 GB at start), and no database serves
/// more.
pub const MAX_DB_POOL_SIZE: u32 = 10_000;

/// Everything the service needs to start.
#[derive(Clone)]
pub struct Settings {
    /// Address the HTTP server binds; port 0 picks a free port.
    pub listen: SocketAddr,
    /// SeaORM connection URL (`postgres://…` or `sqlite://…`). May hold a password:
    /// never printed as is (see the `Debug` impl).
    pub database_url: String,
    /// How often the flusher writes pending deltas.
    pub flush_interval: Duration,
    /// Distinct keys the moka cache holds before it evicts (evicted deltas are
    /// still written: eviction only moves them aside).
    pub cache_capacity: NonZeroU64,
    /// Time to live of a key's slot in the cache, counted from its creation.
    pub cache_ttl: Duration,
    /// Largest accepted request body in bytes; larger ones get 413.
    pub max_body: usize,
    /// Maximum database connections.
    pub db_pool_size: u32,
    /// Parts of a large flush written at once, one connection each
    /// (PostgreSQL; SQLite writes one at a time).
    pub flush_connections: usize,
    /// Budget from the shutdown signal to exit: HTTP drain plus the final flush.
    pub shutdown_timeout: Duration,
    /// Apply pending migrations at start.
    pub migrate: bool,
    /// Distinct keys held in memory (pending, aside, in flight) before new
    /// keys are refused with 503.
    pub max_pending_keys: u64,
    /// How long `POST /increment?wait=true` waits for its flush to commit.
    pub wait_timeout: Duration,
    /// Where the final flush spills what the database did not take; replayed
    /// at the next start.
    pub spill_path: PathBuf,
    /// A directory replicas may share (a named volume): each run spills to
    /// its own file there, and each start replays every file left in it.
    /// Set: `spill_path` is not used.
    pub spill_dir: Option<PathBuf>,
    /// How often a running instance replays what others left in `spill_dir`
    /// (a replica that stopped with the database away and was not replaced).
    /// Well within the ledger's 24 h retention of batch ids, beyond which a
    /// replay could not tell an applied part.
    pub spill_rescan_interval: Duration,
    /// How long start-up waits for the database to answer, retrying with
    /// backoff, before giving up with the last cause.
    pub db_connect_timeout: Duration,
    /// Open connections at most; more wait in the kernel's backlog.
    pub max_connections: usize,
    /// Requests handled at once at most; more get 503.
    pub max_in_flight: usize,
    /// A request's head must be complete within this: from the accept for a
    /// connection's first request, from its first byte for the next ones.
    pub header_timeout: Duration,
    /// A request's body must arrive within this (else 408).
    pub body_timeout: Duration,
    /// A keep-alive connection that sends nothing for this long after a
    /// response is closed.
    pub idle_timeout: Duration,
    /// A response the client takes no byte of for this long is abandoned and
    /// its connection closed.
    pub send_timeout: Duration,
    /// Largest request head (request line and headers) in bytes; more is
    /// refused with 431.
    pub max_head_bytes: usize,
    /// Answer plain `POST /increment` on the front door's fast path (the
    /// same answer as the operation, faster); off only to compare the two.
    pub fast_path: bool,
    /// Bearer token of the admin routes; `None`: the routes do not exist.
    /// Secret: never printed (see the `Debug` impl).
    pub admin_token: Option<String>,
    /// The journal (NATS JetStream); `None`: write-behind, held in memory.
    pub journal: Option<crate::journal::JournalSettings>,
    /// How long an applied `Idempotency-Key` keeps its repeats out.
    pub idempotency_window: Duration,
    /// `Idempotency-Key`s each instance remembers (repeats answered at the
    /// door); older ones are still caught by the database.
    pub idempotency_memory: u64,
    /// Look keys this instance does not remember up in the database before
    /// taking their request (a cross-instance repeat is then answered at
    /// once, a reused key refused); off: the flush's transaction alone
    /// decides, which is cheaper.
    pub idempotency_lookup: bool,
    /// One log line per request (target `increment::access`, INFO).
    pub access_log: bool,
}

impl Settings {
    /// Settings for a service on `database_url` with the documented defaults,
    /// listening on a free loopback port.
    pub fn with_database(database_url: impl Into<String>) -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            database_url: database_url.into(),
            flush_interval: Duration::from_secs(1),
            cache_capacity: NonZeroU64::new(1_000_000).expect("1,000,000 is not zero"),
            cache_ttl: Duration::from_secs(10),
            max_body: 64 * 1024,
            db_pool_size: 10,
            flush_connections: crate::flusher::DEFAULT_WRITE_CONNECTIONS,
            shutdown_timeout: Duration::from_secs(30),
            migrate: true,
            max_pending_keys: 1_000_000,
            wait_timeout: Duration::from_secs(5),
            spill_path: PathBuf::from("increment-spill.jsonl"),
            spill_dir: None,
            spill_rescan_interval: DEFAULT_SPILL_RESCAN_INTERVAL,
            db_connect_timeout: DEFAULT_DB_CONNECT_TIMEOUT,
            admin_token: None,
            max_connections: 10_000,
            max_in_flight: 10_000,
            header_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            send_timeout: Duration::from_secs(10),
            max_head_bytes: 64 * 1024,
            fast_path: true,
            journal: None,
            idempotency_window: crate::store::DEFAULT_IDEMPOTENCY_WINDOW,
            idempotency_memory: crate::http::intake::DEFAULT_RECENT_KEYS,
            idempotency_lookup: true,
            access_log: false,
        }
    }

    /// Refuses values that would make the service misbehave silently.
    ///
    /// # Errors
    /// [`SettingsError`] naming the setting and the value.
    pub fn validate(&self) -> Result<(), SettingsError> {
        let positive = [
            ("flush-interval", self.flush_interval),
            ("cache-ttl", self.cache_ttl),
            ("shutdown-timeout", self.shutdown_timeout),
            ("wait-timeout", self.wait_timeout),
            ("header-timeout", self.header_timeout),
            ("body-timeout", self.body_timeout),
            ("idle-timeout", self.idle_timeout),
            ("send-timeout", self.send_timeout),
            ("idempotency-window", self.idempotency_window),
            ("db-connect-timeout", self.db_connect_timeout),
            ("spill-rescan-interval", self.spill_rescan_interval),
        ];
        for (name, value) in positive {
            if value.is_zero() {
                return Err(SettingsError::Invalid {
                    name,
                    value: "0s".into(),
                    why: "must be greater than zero",
                });
            }
        }
        // Upper bounds where a larger value would panic far from here: moka
        // asserts a TTL of at most 1,000 years, and every other duration is
        // added to a clock reading somewhere (see `MAX_DURATION`).
        let journal_durations = self.journal.iter().flat_map(|journal| {
            [
                ("journal-duplicate-window", journal.duplicate_window),
                ("journal-ack-timeout", journal.ack_timeout),
            ]
        });
        for (name, value) in positive.into_iter().chain(journal_durations) {
            let (max, why) = if name == "cache-ttl" {
                (
                    MAX_CACHE_TTL,
                    "must be at most 31536000000s (1000 years of 365 days, the cache's limit)",
                )
            } else {
                (MAX_DURATION, "must be at most 100 years")
            };
            if value > max {
                return Err(SettingsError::Invalid {
                    name,
                    value: format!("{}s", value.as_secs()),
                    why,
                });
            }
        }
        if self.max_body == 0 {
            return Err(SettingsError::Invalid {
                name: "max-body",
                value: "0".into(),
                why: "must be greater than zero",
            });
        }
        for (name, value) in [
            ("max-connections", self.max_connections),
            ("max-in-flight", self.max_in_flight),
        ] {
            if value == 0 {
                return Err(SettingsError::Invalid {
                    name,
                    value: "0".into(),
                    why: "must be greater than zero",
                });
            }
            // Each is a semaphore's permits; tokio panics above this.
            if value > tokio::sync::Semaphore::MAX_PERMITS {
                return Err(SettingsError::Invalid {
                    name,
                    value: value.to_string(),
                    why: "must be at most 2305843009213693951",
                });
            }
        }
        if self.max_head_bytes < MIN_HEAD_BYTES {
            return Err(SettingsError::Invalid {
                name: "max-head-bytes",
                value: self.max_head_bytes.to_string(),
                why: "must be at least 8192 (hyper's smallest read buffer)",
            });
        }
        if self.max_pending_keys == 0 {
            return Err(SettingsError::Invalid {
                name: "max-pending-keys",
                value: "0".into(),
                why: "must be greater than zero",
            });
        }
        if let Some(token) = &self.admin_token {
            if token.len() < MIN_ADMIN_TOKEN_CHARS {
                return Err(SettingsError::Invalid {
                    name: "admin-token",
                    value: "<redacted>".into(),
                    why: "must be at least 16 characters",
                });
            }
            // What an `Authorization` header can carry and compare: other
            // bytes (non-ASCII, spaces at either end) never authenticate.
            if !token.bytes().all(|byte| byte.is_ascii_graphic()) {
                return Err(SettingsError::Invalid {
                    name: "admin-token",
                    value: "<redacted>".into(),
                    why: "must be visible ASCII characters (no spaces)",
                });
            }
        }
        if let Some(journal) = &self.journal {
            if !matches!(journal.replicas, 1..=5) {
                return Err(SettingsError::Invalid {
                    name: "journal-replicas",
                    value: journal.replicas.to_string(),
                    why: "must be between 1 and 5 (JetStream's range)",
                });
            }
            if journal.stream.is_empty()
                || !journal
                    .stream
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            {
                return Err(SettingsError::Invalid {
                    name: "journal-stream",
                    value: journal.stream.clone(),
                    why: "must be letters, digits, '-' or '_'",
                });
            }
            if journal.max_bytes <= 0 {
                return Err(SettingsError::Invalid {
                    name: "journal-max-bytes",
                    value: journal.max_bytes.to_string(),
                    why: "must be greater than zero",
                });
            }
        }
        if !(1..=MAX_DB_POOL_SIZE).contains(&self.db_pool_size) {
            return Err(SettingsError::Invalid {
                name: "db-pool-size",
                value: self.db_pool_size.to_string(),
                why: "must be between 1 and 10000",
            });
        }
        if self.flush_connections == 0 || self.flush_connections > self.db_pool_size as usize {
            return Err(SettingsError::Invalid {
                name: "flush-connections",
                value: self.flush_connections.to_string(),
                why: "must be between 1 and db-pool-size",
            });
        }
        if !(self.database_url.starts_with("postgres://")
            || self.database_url.starts_with("postgresql://")
            || self.database_url.starts_with("sqlite:"))
        {
            return Err(SettingsError::Invalid {
                name: "database-url",
                value: redact_url(&self.database_url),
                why: "must start with postgres://, postgresql:// or sqlite:",
            });
        }
        // Each connection would open a database of its own: the migrations'
        // connection made the tables, the pool's saw none.
        if self.database_url.starts_with("sqlite:")
            && (self.database_url.contains(":memory:") || self.database_url.contains("mode=memory"))
        {
            return Err(SettingsError::Invalid {
                name: "database-url",
                value: redact_url(&self.database_url),
                why: "must name a file: an in-memory SQLite database is not shared between connections",
            });
        }
        Ok(())
    }
}

impl fmt::Debug for Settings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Settings")
            .field("listen", &self.listen)
            .field("database_url", &redact_url(&self.database_url))
            .field("flush_interval", &self.flush_interval)
            .field("cache_capacity", &self.cache_capacity)
            .field("cache_ttl", &self.cache_ttl)
            .field("max_body", &self.max_body)
            .field("db_pool_size", &self.db_pool_size)
            .field("flush_connections", &self.flush_connections)
            .field("shutdown_timeout", &self.shutdown_timeout)
            .field("migrate", &self.migrate)
            .field("max_pending_keys", &self.max_pending_keys)
            .field("wait_timeout", &self.wait_timeout)
            .field("spill_path", &self.spill_path)
            .field("spill_dir", &self.spill_dir)
            .field("db_connect_timeout", &self.db_connect_timeout)
            .field("max_connections", &self.max_connections)
            .field("max_in_flight", &self.max_in_flight)
            .field("header_timeout", &self.header_timeout)
            .field("body_timeout", &self.body_timeout)
            .field("idle_timeout", &self.idle_timeout)
            .field("send_timeout", &self.send_timeout)
            .field("max_head_bytes", &self.max_head_bytes)
            .field("fast_path", &self.fast_path)
            .field("idempotency_window", &self.idempotency_window)
            .field("idempotency_memory", &self.idempotency_memory)
            .field("idempotency_lookup", &self.idempotency_lookup)
            .field("access_log", &self.access_log)
            .field(
                "journal",
                &self
                    .journal
                    .as_ref()
                    .map(|j| (redact_url(&j.url), &j.stream, j.replicas)),
            )
            .field(
                "admin_token",
                &self.admin_token.as_ref().map(|_| "<redacted>"),
            )
            .finish()
    }
}

impl Settings {
    /// Logs the effective settings as fields (numbers as numbers), secrets
    /// redacted like the `Debug` impl does. Two lines: one event holds at
    /// most 32 fields.
    pub fn log_effective(&self) {
        tracing::info!(
            listen = %self.listen,
            database_url = %redact_url(&self.database_url),
            flush_interval = ?self.flush_interval,
            cache_capacity = self.cache_capacity.get(),
            cache_ttl = ?self.cache_ttl,
            max_body = self.max_body,
            db_pool_size = self.db_pool_size,
            flush_connections = self.flush_connections,
            shutdown_timeout = ?self.shutdown_timeout,
            migrate = self.migrate,
            max_pending_keys = self.max_pending_keys,
            wait_timeout = ?self.wait_timeout,
            spill_path = %self.spill_path.display(),
            spill_dir = self.spill_dir.as_ref().map(|dir| dir.display().to_string()),
            db_connect_timeout = ?self.db_connect_timeout,
            admin_routes = self.admin_token.is_some(),
            max_connections = self.max_connections,
            max_in_flight = self.max_in_flight,
            header_timeout = ?self.header_timeout,
            body_timeout = ?self.body_timeout,
            idle_timeout = ?self.idle_timeout,
            send_timeout = ?self.send_timeout,
            max_head_bytes = self.max_head_bytes,
            fast_path = self.fast_path,
            idempotency_window = ?self.idempotency_window,
            idempotency_memory = self.idempotency_memory,
            idempotency_lookup = self.idempotency_lookup,
            access_log = self.access_log,
            journal = self.journal.is_some(),
            "settings"
        );
        if let Some(journal) = &self.journal {
            tracing::info!(
                url = %redact_url(&journal.url),
                stream = %journal.stream,
                replicas = journal.replicas,
                max_bytes = journal.max_bytes,
                in_flight = journal.in_flight,
                "journal settings"
            );
        }
    }
}

/// A setting that cannot work.
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    #[error("invalid value '{value}' for --{name}: {why}")]
    Invalid {
        name: &'static str,
        value: String,
        why: &'static str,
    },
}

/// The database URL with every secret replaced by `***`: the password of
/// the userinfo (however it is encoded) and the value of a `password` (or
/// `sslpassword`) query parameter, the forms sqlx accepts. A URL the parser
/// cannot read keeps only its scheme: better unreadable than leaked.
pub fn redact_url(raw: &str) -> String {
    let Ok(mut url) = url::Url::parse(raw) else {
        return match raw.split_once("://") {
            Some((scheme, _)) => format!("{scheme}://***"),
            None if raw.starts_with("sqlite:") => raw.to_owned(),
            None => "***".to_owned(),
        };
    };
    if url.password().is_some() {
        // Cannot fail: the URL has a host (it has a password).
        let _ = url.set_password(Some("***"));
    }
    if url
        .query_pairs()
        .any(|(name, _)| is_secret_parameter(&name))
    {
        let pairs: Vec<(String, String)> = url
            .query_pairs()
            .map(|(name, value)| {
                let value = if is_secret_parameter(&name) {
                    "***".to_owned()
                } else {
                    value.into_owned()
                };
                (name.into_owned(), value)
            })
            .collect();
        url.query_pairs_mut().clear().extend_pairs(pairs);
    }
    url.to_string()
}

/// The secrets a database URL holds, as they may appear in an error text
/// (raw and percent-decoded).
pub fn url_secrets(raw: &str) -> Vec<String> {
    let mut secrets = Vec::new();
    let parsed = url::Url::parse(raw);
    if parsed.is_err()
        && let Some((_, rest)) = raw.split_once("://")
        && let Some((userinfo, _)) = rest.rsplit_once('@')
        && let Some((_, password)) = userinfo.split_once(':')
    {
        // Unparseable (an unencoded `/` in the password, say): the userinfo
        // by hand.
        secrets.push(password.to_owned());
    }
    if let Ok(url) = parsed {
        if let Some(password) = url.password() {
            secrets.push(password.to_owned());
            if let Ok(decoded) = percent_decode(password) {
                secrets.push(decoded);
            }
        }
        for (name, value) in url.query_pairs() {
            if is_secret_parameter(&name) {
                secrets.push(value.into_owned());
            }
        }
    }
    secrets.retain(|secret| !secret.is_empty());
    secrets
}

/// `text` with each of `secrets` replaced by `***`.
pub fn scrub(text: &str, secrets: &[String]) -> String {
    let mut text = text.to_owned();
    for secret in secrets {
        text = text.replace(secret.as_str(), "***");
    }
    text
}

fn is_secret_parameter(name: &str) -> bool {
    name.eq_ignore_ascii_case("password") || name.eq_ignore_ascii_case("sslpassword")
}

fn percent_decode(text: &str) -> Result<String, std::string::FromUtf8Error> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| char::from(b).to_digit(16);
        match (
            bytes[i],
            bytes.get(i + 1).copied(),
            bytes.get(i + 2).copied(),
        ) {
            (b'%', Some(h), Some(l)) if hex(h).is_some() && hex(l).is_some() => {
                let value = hex(h).unwrap_or(0) * 16 + hex(l).unwrap_or(0);
                out.push(u8::try_from(value).unwrap_or(b'?'));
                i += 3;
            }
            (byte, _, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_form_of_database_password_is_redacted() {
        for (url, secret) in [
            ("postgres://app:s3cr3t@db:5432/increment", "s3cr3t"),
            (
                "postgresql://app:p%40ss%2Fw%3Ard@db/increment",
                "p%40ss%2Fw%3Ard",
            ),
            ("postgres://app:p%40ss%2Fw%3Ard@db/increment", "p@ss/w:rd"),
            ("postgres://app@db/increment?password=s3cr3t", "s3cr3t"),
            (
                "postgres://db/increment?user=app&password=s3cr3t&sslmode=disable",
                "s3cr3t",
            ),
            ("postgres://db/increment?sslpassword=k3y", "k3y"),
            ("postgres://app:pa/ss@db/increment", "pa/ss"),
            ("postgres://app:pa ss@db/increment", "pa ss"),
        ] {
            let redacted = redact_url(url);
            assert!(!redacted.contains(secret), "{url} -> {redacted}");
            let debug = format!("{:?}", Settings::with_database(url));
            assert!(!debug.contains(secret), "{debug}");
            let chain = format!("connecting to {url} failed: password {secret} refused");
            let scrubbed = scrub(&chain, &url_secrets(url));
            assert!(!scrubbed.contains(secret), "{scrubbed}");
        }
        assert_eq!(
            redact_url("postgres://db/increment?user=app&password=x&sslmode=disable"),
            "postgres://db/increment?user=app&password=***&sslmode=disable"
        );
    }

    #[test]
    fn the_admin_token_is_visible_ascii_a_header_can_carry() {
        let mut settings = Settings::with_database("sqlite://t.db?mode=rwc");
        settings.admin_token = Some("x".repeat(15));
        assert!(settings.validate().is_err(), "15 characters");
        settings.admin_token = Some("0123456789abcdef!~".into());
        assert!(settings.validate().is_ok());
        // Before, these were taken and then never authenticated.
        for token in [
            "é".repeat(16),
            "0123456789abcdef ".into(),
            " 0123456789abcdef".into(),
        ] {
            settings.admin_token = Some(token.clone());
            let error = refusal(&settings);
            assert!(error.contains("--admin-token"), "{token:?}: {error}");
        }
    }

    #[test]
    fn redacts_the_password_only() {
        assert_eq!(
            redact_url("postgres://app:s3cr3t@db:5432/increment"),
            "postgres://app:***@db:5432/increment"
        );
        assert_eq!(
            redact_url("postgres://app@db/increment"),
            "postgres://app@db/increment"
        );
        assert_eq!(
            redact_url("sqlite://increment.db?mode=rwc"),
            "sqlite://increment.db?mode=rwc"
        );
        let debug = format!("{:?}", Settings::with_database("postgres://u:hunter2@h/db"));
        assert!(!debug.contains("hunter2"), "{debug}");
    }

    #[test]
    fn refuses_durations_that_would_panic_later() {
        let mut settings = Settings::with_database("sqlite://t.db?mode=rwc");
        settings.cache_ttl = MAX_CACHE_TTL;
        settings.idempotency_window = MAX_DURATION;
        assert!(settings.validate().is_ok());
        settings.cache_ttl = MAX_CACHE_TTL + Duration::from_secs(1);
        let error = refusal(&settings);
        assert!(error.contains("--cache-ttl"), "{error}");
        settings.cache_ttl = Duration::from_secs(10);
        settings.idempotency_window = Duration::from_secs(300_000 * 365 * 24 * 3600);
        let error = refusal(&settings);
        assert!(error.contains("--idempotency-window"), "{error}");
    }

    /// Why `settings` are refused (they must be).
    fn refusal(settings: &Settings) -> String {
        settings.validate().expect_err("refused").to_string()
    }

    /// Each was taken before and panicked later: at start (`now +` the
    /// connect timeout, three eighths of the shutdown timeout), in every
    /// connection (the header timeout), in a `wait=true` request after its
    /// increment was taken, or in the flush loop after a failed flush.
    #[test]
    fn refuses_every_duration_past_a_hundred_years() {
        let huge = Duration::from_secs(10_000_000_000_000_000_000);
        type Setter = fn(&mut Settings, Duration);
        let setters: [(&str, Setter); 11] = [
            ("flush-interval", |s, d| s.flush_interval = d),
            ("shutdown-timeout", |s, d| s.shutdown_timeout = d),
            ("wait-timeout", |s, d| s.wait_timeout = d),
            ("header-timeout", |s, d| s.header_timeout = d),
            ("body-timeout", |s, d| s.body_timeout = d),
            ("idle-timeout", |s, d| s.idle_timeout = d),
            ("send-timeout", |s, d| s.send_timeout = d),
            ("db-connect-timeout", |s, d| s.db_connect_timeout = d),
            ("spill-rescan-interval", |s, d| s.spill_rescan_interval = d),
            ("idempotency-window", |s, d| s.idempotency_window = d),
            ("journal-ack-timeout", |s, d| {
                s.journal = Some(crate::journal::JournalSettings::new("nats://h:4222"));
                s.journal.as_mut().unwrap().ack_timeout = d;
            }),
        ];
        for (name, set) in setters {
            let mut settings = Settings::with_database("sqlite://t.db?mode=rwc");
            set(&mut settings, MAX_DURATION);
            assert!(settings.validate().is_ok(), "{name} at 100 years");
            set(&mut settings, huge);
            let error = refusal(&settings);
            assert!(error.contains(&format!("--{name}")), "{name}: {error}");
        }
        // 100 years as a flag writes it (`100years`: 365.25 days each).
        assert_eq!(MAX_DURATION.as_secs(), 100 * 36_525 * 86_400 / 100);
    }

    #[test]
    fn refuses_counts_that_would_panic_or_exhaust_memory_and_memory_databases() {
        let mut settings = Settings::with_database("sqlite://t.db?mode=rwc");
        settings.max_connections = usize::MAX;
        let error = refusal(&settings);
        assert!(error.contains("--max-connections"), "{error}");
        settings.max_connections = tokio::sync::Semaphore::MAX_PERMITS;
        settings.max_in_flight = tokio::sync::Semaphore::MAX_PERMITS + 1;
        let error = refusal(&settings);
        assert!(error.contains("--max-in-flight"), "{error}");
        settings.max_in_flight = 1;
        settings.db_pool_size = 10_001;
        let error = refusal(&settings);
        assert!(error.contains("--db-pool-size"), "{error}");
        settings.db_pool_size = 10_000;
        assert!(settings.validate().is_ok());
        for url in ["sqlite::memory:", "sqlite://x.db?mode=memory&cache=shared"] {
            let error = refusal(&Settings::with_database(url));
            assert!(error.contains("in-memory"), "{url}: {error}");
        }
    }

    #[test]
    fn refuses_zero_durations_and_unknown_databases() {
        let mut settings = Settings::with_database("sqlite://t.db?mode=rwc");
        settings.flush_interval = Duration::ZERO;
        let err = refusal(&settings);
        assert!(err.contains("--flush-interval"), "{err}");

        let settings = Settings::with_database("mysql://root@localhost/db");
        let err = refusal(&settings);
        assert!(err.contains("--database-url"), "{err}");
    }
}
