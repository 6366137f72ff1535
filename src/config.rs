//! Command-line flags and environment variables → [`api::Settings`].
//! The `///` docs below are `increment --help`.

use std::{net::SocketAddr, num::NonZeroU64, path::PathBuf, time::Duration};

use api::telemetry::{LogFormat, TelemetrySettings};
use clap::{
    ArgMatches, CommandFactory, FromArgMatches, Parser, error::ErrorKind, parser::ValueSource,
};

#[derive(Debug, Parser)]
#[command(
    name = "increment",
    version,
    about = "Accepts increments over HTTP, batches them in memory and writes each exactly once to the database."
)]
pub struct Config {
    /// Address to listen on.
    #[arg(long, env = "INCREMENT_LISTEN", default_value = "0.0.0.0:4000")]
    pub listen: SocketAddr,

    /// Database URL: postgres://user:pass@host/db or sqlite://file.db?mode=rwc.
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "sqlite://increment.db?mode=rwc",
        hide_env_values = true
    )]
    pub database_url: String,

    /// File holding the database URL (a Docker or Kubernetes secret); instead of DATABASE_URL.
    #[arg(long, env = "DATABASE_URL_FILE")]
    pub database_url_file: Option<String>,

    /// How long start-up waits for the database to answer, retrying with backoff (e.g. 30s, 2m).
    #[arg(long, env = "INCREMENT_DB_CONNECT_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub db_connect_timeout: Duration,

    /// How often pending increments are written (e.g. 200ms, 1s).
    #[arg(long, env = "INCREMENT_FLUSH_INTERVAL", default_value = "1s", value_parser = parse_duration)]
    pub flush_interval: Duration,

    /// Distinct keys held in the cache before entries are evicted (evicted deltas are still written); a key counts one per 64 bytes of its length, plus one. At least 1.
    #[arg(long, env = "INCREMENT_CACHE_CAPACITY", default_value = "1000000", value_parser = parse_non_zero)]
    pub cache_capacity: NonZeroU64,

    /// Time to live of a key's cache entry, counted from its creation.
    #[arg(long, env = "INCREMENT_CACHE_TTL", default_value = "10s", value_parser = parse_duration)]
    pub cache_ttl: Duration,

    /// Largest request body (e.g. 64KiB, 1MiB, 65536); larger bodies get 413.
    #[arg(long, env = "INCREMENT_MAX_BODY", default_value = "64KiB", value_parser = parse_bytes)]
    pub max_body: usize,

    /// Maximum database connections.
    #[arg(long, env = "INCREMENT_DB_POOL_SIZE", default_value = "10", value_parser = parse_count::<u32>)]
    pub db_pool_size: u32,

    /// Parts of a large flush (over 50,000 keys) written at once, one database
    /// connection each (PostgreSQL; SQLite writes one at a time).
    #[arg(long, env = "INCREMENT_FLUSH_CONNECTIONS", default_value = "4", value_parser = parse_count::<u64>)]
    pub flush_connections: u64,

    /// Time allowed from SIGTERM/Ctrl-C to exit: draining connections, then the final flush
    /// [default: 30s, or the stop grace period minus 5s].
    #[arg(long, env = "INCREMENT_SHUTDOWN_TIMEOUT", value_parser = parse_duration)]
    pub shutdown_timeout: Option<Duration>,

    /// Time the platform allows from SIGTERM to SIGKILL (compose stop_grace_period, Kubernetes
    /// terminationGracePeriodSeconds minus preStop); the shutdown timeout is kept 5s below it.
    #[arg(long, env = "INCREMENT_STOP_GRACE_PERIOD", value_parser = parse_duration)]
    pub stop_grace_period: Option<Duration>,

    /// Do not apply pending migrations at start.
    #[arg(long, env = "INCREMENT_NO_MIGRATE")]
    pub no_migrate: bool,

    /// Distinct keys held in memory before new keys get 503 (keys already held still merge); a key counts one per 64 bytes of its length, plus one.
    #[arg(long, env = "INCREMENT_MAX_PENDING_KEYS", default_value = "1000000", value_parser = parse_count::<u64>)]
    pub max_pending_keys: u64,

    /// How long POST /increment?wait=true waits for its flush to commit; then 202 {"committed":false} (taken and held: do not resend).
    #[arg(long, env = "INCREMENT_WAIT_TIMEOUT", default_value = "5s", value_parser = parse_duration)]
    pub wait_timeout: Duration,

    /// File for what the final flush could not write (database down); replayed at the next start.
    #[arg(
        long,
        env = "INCREMENT_SPILL_PATH",
        default_value = "increment-spill.jsonl"
    )]
    pub spill_path: PathBuf,

    /// Directory for spill files, shared by replicas (a named volume): each run spills to its
    /// own file there and every start replays all files left in it, each once. Replaces --spill-path.
    #[arg(long, env = "INCREMENT_SPILL_DIR")]
    pub spill_dir: Option<String>,

    /// Bearer token for the admin routes (at least 16 characters); unset: no admin routes.
    #[arg(long, env = "INCREMENT_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,

    /// File holding the admin token (a Docker or Kubernetes secret); instead of INCREMENT_ADMIN_TOKEN.
    #[arg(long, env = "INCREMENT_ADMIN_TOKEN_FILE")]
    pub admin_token_file: Option<String>,

    /// Open connections at most; further clients wait in the kernel's backlog.
    #[arg(long, env = "INCREMENT_MAX_CONNECTIONS", default_value = "10000", value_parser = parse_count::<u64>)]
    pub max_connections: u64,

    /// Requests handled at once at most; more get 503 with Retry-After.
    #[arg(long, env = "INCREMENT_MAX_IN_FLIGHT", default_value = "10000", value_parser = parse_count::<u64>)]
    pub max_in_flight: u64,

    /// A request's head must be complete within this: from the accept for a connection's first request, from its first byte for later ones (else the connection is closed).
    #[arg(long, env = "INCREMENT_HEADER_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub header_timeout: Duration,

    /// A request's body must arrive within this (else 408).
    #[arg(long, env = "INCREMENT_BODY_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub body_timeout: Duration,

    /// A keep-alive connection that sends nothing for this long after a response is closed.
    #[arg(long, env = "INCREMENT_IDLE_TIMEOUT", default_value = "60s", value_parser = parse_duration)]
    pub idle_timeout: Duration,

    /// A response the client takes no byte of for this long is abandoned and its connection closed.
    #[arg(long, env = "INCREMENT_SEND_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub send_timeout: Duration,

    /// Largest request head (request line and headers) in bytes, at least 8192; more gets 431 (checked as hyper's read buffer fills: a head that arrives in one piece may pass up to about 1.75 times this).
    #[arg(long, env = "INCREMENT_MAX_HEAD_BYTES", default_value = "65536", value_parser = clap::value_parser!(u64).range(8192..))]
    pub max_head_bytes: u64,

    /// Log line format: text or json (json lines carry trace_id and span_id).
    #[arg(long, env = "INCREMENT_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    pub log_format: String,

    /// One log line per request (target increment::access, INFO): method, route, status,
    /// duration_ms, request_bytes, response_bytes, request_id, trace_id.
    #[arg(long, env = "INCREMENT_ACCESS_LOG")]
    pub access_log: bool,

    /// NATS server(s) of the journal (e.g. nats://127.0.0.1:4222, comma-separated
    /// for a cluster). Set: a 202 means stored in JetStream. Unset: held in memory.
    #[arg(long, env = "INCREMENT_JOURNAL_URL")]
    pub journal_url: Option<String>,

    /// JetStream stream of the journal (created when missing).
    #[arg(long, env = "INCREMENT_JOURNAL_STREAM", default_value = "increments")]
    pub journal_stream: String,

    /// Replicas of the journal stream when it is created (3 in a cluster).
    #[arg(long, env = "INCREMENT_JOURNAL_REPLICAS", default_value = "1", value_parser = clap::value_parser!(u64).range(1..=5))]
    pub journal_replicas: u64,

    /// Bytes the journal stream may hold (e.g. 1GiB); when full, increments get 503.
    #[arg(long, env = "INCREMENT_JOURNAL_MAX_BYTES", default_value = "1GiB", value_parser = parse_bytes)]
    pub journal_max_bytes: usize,

    /// Journal publishes awaiting acknowledgement at once; requests arriving
    /// meanwhile are grouped into the next message.
    #[arg(long, env = "INCREMENT_JOURNAL_IN_FLIGHT", default_value = "1", value_parser = clap::value_parser!(u64).range(1..=1024))]
    pub journal_in_flight: u64,

    /// How long a request's Idempotency-Key keeps its repeats from being applied (e.g. 24h).
    #[arg(long, env = "INCREMENT_IDEMPOTENCY_WINDOW", default_value = "24h", value_parser = parse_duration)]
    pub idempotency_window: Duration,

    /// Idempotency-Keys each instance remembers to answer repeats at once (the database catches the rest).
    #[arg(long, env = "INCREMENT_IDEMPOTENCY_MEMORY", default_value = "100000", value_parser = parse_count::<u64>)]
    pub idempotency_memory: u64,

    /// Look Idempotency-Keys this instance does not remember up in the database before taking
    /// their request (a retry through another instance is then answered at once, a reused key
    /// refused with 422); false: the flush alone decides (cheaper; still applied once).
    #[arg(long, env = "INCREMENT_IDEMPOTENCY_LOOKUP", default_value = "true", action = clap::ArgAction::Set)]
    pub idempotency_lookup: bool,

    /// OTLP/HTTP endpoint for traces (e.g. http://localhost:4318); unset: no export.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,

    /// service.name of exported spans.
    #[arg(long, env = "OTEL_SERVICE_NAME", default_value = "increment")]
    pub service_name: String,

    /// service.instance.id of exported spans (default: hostname-pid).
    #[arg(long, env = "INCREMENT_INSTANCE_ID")]
    pub instance_id: Option<String>,
}

/// The shutdown timeout when neither it nor a stop grace period is set.
const DEFAULT_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(30);

/// Kept between the shutdown timeout and the platform's SIGKILL: the time to
/// write the spill file and exit after the final flush gives up.
const SHUTDOWN_MARGIN: Duration = Duration::from_secs(5);

impl Config {
    /// Flags and environment, with secrets read from their files and the
    /// settings that follow from others filled in; exits with a usage error
    /// (status 2) when they disagree, like any bad flag.
    pub fn load() -> Self {
        let matches = Self::command().get_matches();
        let config = Self::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
        let json = config.log_format == "json";
        config.resolve(&matches).unwrap_or_else(|e| {
            if !json {
                e.exit()
            }
            // The flags parsed, and asked for JSON lines: this one too.
            let text = e.to_string();
            let first_line = text.lines().next().unwrap_or_default();
            let detail = first_line.trim_start_matches("error: ");
            eprintln!(
                "{}",
                api::telemetry::line_without_subscriber(
                    LogFormat::Json,
                    "invalid settings",
                    detail
                )
            );
            std::process::exit(2)
        })
    }

    /// Like [`load`](Self::load), from `args`, returning the error.
    #[cfg(test)]
    pub fn try_load<I, T>(args: I) -> Result<Self, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        let matches = Self::command().try_get_matches_from(args)?;
        Self::from_arg_matches(&matches)?.resolve(&matches)
    }

    fn resolve(mut self, matches: &ArgMatches) -> Result<Self, clap::Error> {
        let conflict =
            |message: String| Self::command().error(ErrorKind::ArgumentConflict, message);
        let invalid = |message: String| Self::command().error(ErrorKind::ValueValidation, message);
        let given = |id: &str| {
            matches
                .value_source(id)
                .is_some_and(|source| source != ValueSource::DefaultValue)
        };
        // An empty value is no value (templates write `${VAR:-}`).
        for value in [
            &mut self.database_url_file,
            &mut self.admin_token_file,
            &mut self.spill_dir,
            &mut self.admin_token,
        ] {
            if value.as_deref().is_some_and(str::is_empty) {
                *value = None;
            }
        }
        if let Some(path) = self.database_url_file.take() {
            if given("database_url") && !self.database_url.is_empty() {
                return Err(conflict(
                    "DATABASE_URL (or --database-url) and DATABASE_URL_FILE are both set; keep one"
                        .to_owned(),
                ));
            }
            self.database_url = read_secret(std::path::Path::new(&path))
                .map_err(|e| invalid(format!("DATABASE_URL_FILE: {e}")))?;
        }
        if let Some(path) = self.admin_token_file.take() {
            if self.admin_token.is_some() {
                return Err(conflict(
                    "INCREMENT_ADMIN_TOKEN (or --admin-token) and INCREMENT_ADMIN_TOKEN_FILE are both set; keep one"
                        .to_owned(),
                ));
            }
            self.admin_token = Some(
                read_secret(std::path::Path::new(&path))
                    .map_err(|e| invalid(format!("INCREMENT_ADMIN_TOKEN_FILE: {e}")))?,
            );
        }
        if self.spill_dir.is_some() && given("spill_path") {
            return Err(conflict(
                "--spill-path (INCREMENT_SPILL_PATH) and --spill-dir (INCREMENT_SPILL_DIR) are both set; keep one"
                    .to_owned(),
            ));
        }
        self.shutdown_timeout =
            Some(shutdown_timeout(self.shutdown_timeout, self.stop_grace_period).map_err(invalid)?);
        Ok(self)
    }

    pub fn telemetry_settings(&self) -> TelemetrySettings {
        TelemetrySettings {
            log_format: match self.log_format.as_str() {
                "json" => LogFormat::Json,
                _ => LogFormat::Text,
            },
            otlp_endpoint: self.otlp_endpoint.clone().filter(|e| !e.is_empty()),
            service_name: self.service_name.clone(),
            instance_id: self
                .instance_id
                .clone()
                .unwrap_or_else(api::telemetry::default_instance_id),
        }
    }

    pub fn into_settings(self) -> api::Settings {
        api::Settings {
            listen: self.listen,
            database_url: self.database_url,
            flush_interval: self.flush_interval,
            cache_capacity: self.cache_capacity,
            cache_ttl: self.cache_ttl,
            max_body: self.max_body,
            db_pool_size: self.db_pool_size,
            flush_connections: usize::try_from(self.flush_connections).unwrap_or(usize::MAX),
            shutdown_timeout: self.shutdown_timeout.unwrap_or(DEFAULT_SHUTDOWN_TIMEOUT),
            migrate: !self.no_migrate,
            max_pending_keys: self.max_pending_keys,
            wait_timeout: self.wait_timeout,
            spill_path: self.spill_path,
            spill_dir: self.spill_dir.map(PathBuf::from),
            spill_rescan_interval: api::settings::DEFAULT_SPILL_RESCAN_INTERVAL,
            db_connect_timeout: self.db_connect_timeout,
            admin_token: self.admin_token.filter(|t| !t.is_empty()),
            max_connections: usize::try_from(self.max_connections).unwrap_or(usize::MAX),
            max_in_flight: usize::try_from(self.max_in_flight).unwrap_or(usize::MAX),
            header_timeout: self.header_timeout,
            body_timeout: self.body_timeout,
            idle_timeout: self.idle_timeout,
            send_timeout: self.send_timeout,
            max_head_bytes: usize::try_from(self.max_head_bytes).unwrap_or(usize::MAX),
            fast_path: true,
            idempotency_window: self.idempotency_window,
            idempotency_memory: self.idempotency_memory,
            idempotency_lookup: self.idempotency_lookup,
            access_log: self.access_log,
            journal: self.journal_url.filter(|u| !u.is_empty()).map(|url| {
                let mut journal = api::journal::JournalSettings::new(url);
                journal.stream = self.journal_stream;
                journal.replicas = usize::try_from(self.journal_replicas).unwrap_or(1);
                journal.max_bytes = i64::try_from(self.journal_max_bytes).unwrap_or(i64::MAX);
                journal.in_flight = usize::try_from(self.journal_in_flight).unwrap_or(1);
                journal
            }),
        }
    }
}

/// The shutdown timeout from the flag and the platform's grace period: kept
/// [`SHUTDOWN_MARGIN`] below the grace period, so the process is not killed
/// in the middle of its final flush or of writing the spill file.
fn shutdown_timeout(
    timeout: Option<Duration>,
    grace: Option<Duration>,
) -> Result<Duration, String> {
    let Some(grace) = grace else {
        return Ok(timeout.unwrap_or(DEFAULT_SHUTDOWN_TIMEOUT));
    };
    let Some(room) = grace
        .checked_sub(SHUTDOWN_MARGIN)
        .filter(|room| *room >= Duration::from_secs(1))
    else {
        return Err(format!(
            "--stop-grace-period (INCREMENT_STOP_GRACE_PERIOD) {}: must be at least 6s \
             (the shutdown timeout is kept 5s below it)",
            humantime::format_duration(grace)
        ));
    };
    match timeout {
        None => Ok(room),
        Some(timeout) if timeout <= room => Ok(timeout),
        Some(timeout) => Err(format!(
            "--shutdown-timeout (INCREMENT_SHUTDOWN_TIMEOUT) {} does not fit in --stop-grace-period \
             (INCREMENT_STOP_GRACE_PERIOD) {}: the platform would kill the process during its final \
             flush; use at most {}, or leave the shutdown timeout unset, or raise both the platform's \
             grace period (`docker run --stop-timeout`, compose stop_grace_period) and \
             INCREMENT_STOP_GRACE_PERIOD",
            humantime::format_duration(timeout),
            humantime::format_duration(grace),
            humantime::format_duration(room)
        )),
    }
}

/// A secret read from a file: one value, its trailing line break removed.
fn read_secret(path: &std::path::Path) -> Result<String, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    // Editors and `echo` add a line break; a secret never ends in blanks.
    let value = text.trim_end();
    if value.is_empty() {
        return Err(format!("{} is empty", path.display()));
    }
    Ok(value.to_owned())
}

/// A whole number of at least 1.
fn parse_count<T: std::str::FromStr + Default + PartialEq>(text: &str) -> Result<T, String> {
    match text.trim().parse::<T>() {
        Ok(value) if value != T::default() => Ok(value),
        Ok(_) => Err("must be at least 1".to_owned()),
        Err(_) => Err("expected a whole number of at least 1 (e.g. 10)".to_owned()),
    }
}

/// A count of at least 1, as a `NonZeroU64`.
fn parse_non_zero(text: &str) -> Result<NonZeroU64, String> {
    parse_count::<u64>(text).map(|n| NonZeroU64::new(n).unwrap_or(NonZeroU64::MIN))
}

/// A humantime duration greater than zero.
fn parse_duration(text: &str) -> Result<Duration, String> {
    let duration = humantime::parse_duration(text).map_err(|_| {
        "expected a duration with its unit, such as 250ms, 1s, 2m or 1h30m".to_owned()
    })?;
    if duration.is_zero() {
        return Err("must be greater than zero".to_owned());
    }
    Ok(duration)
}

/// A byte size: a number with an optional unit B, KB, KiB, MB, MiB, GB, GiB (case-insensitive).
fn parse_bytes(text: &str) -> Result<usize, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (digits, unit) = text.split_at(split);
    let number: usize = digits.parse().map_err(|_| {
        "expected a number with an optional unit (B, KB, KiB, MB, MiB, GB, GiB)".to_owned()
    })?;
    let multiplier: usize = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kb" => 1_000,
        "kib" | "k" => 1_024,
        "mb" => 1_000_000,
        "mib" | "m" => 1_048_576,
        "gb" => 1_000_000_000,
        "gib" | "g" => 1 << 30,
        other => {
            return Err(format!(
                "unknown unit {other:?}; use B, KB, KiB, MB, MiB, GB or GiB"
            ));
        }
    };
    let bytes = number
        .checked_mul(multiplier)
        .ok_or_else(|| "too large".to_owned())?;
    if bytes == 0 {
        return Err("must be greater than zero".to_owned());
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_cli_is_consistent() {
        Config::command().debug_assert();
    }

    #[test]
    fn defaults_match_the_documentation() {
        let settings = Config::try_parse_from(["increment"])
            .unwrap()
            .into_settings();
        assert_eq!(settings.listen.to_string(), "0.0.0.0:4000");
        assert_eq!(settings.flush_interval, Duration::from_secs(1));
        assert_eq!(settings.cache_capacity.get(), 1_000_000);
        assert_eq!(settings.cache_ttl, Duration::from_secs(10));
        assert_eq!(settings.max_body, 65_536);
        assert_eq!(settings.db_pool_size, 10);
        assert_eq!(settings.flush_connections, 4);
        assert_eq!(settings.shutdown_timeout, Duration::from_secs(30));
        assert!(settings.migrate);
        assert_eq!(settings.max_pending_keys, 1_000_000);
        assert_eq!(settings.wait_timeout, Duration::from_secs(5));
        assert_eq!(settings.admin_token, None);
        assert!(!settings.access_log);
    }

    #[test]
    fn bad_values_name_the_setting_and_the_value() {
        for (flag, value) in [
            ("--cache-capacity", "0"),
            ("--flush-interval", "soon"),
            ("--flush-interval", "0s"),
            ("--max-body", "12 parsecs"),
            ("--db-pool-size", "0"),
        ] {
            let err = Config::try_parse_from(["increment", flag, value])
                .unwrap_err()
                .to_string();
            assert!(
                err.contains(flag) && err.contains(value),
                "{flag} {value}: {err}"
            );
        }
    }

    #[test]
    fn flag_errors_explain_what_is_expected() {
        for (flag, value, expected) in [
            ("--cache-capacity", "0", "must be at least 1"),
            ("--max-in-flight", "many", "a whole number of at least 1"),
            ("--flush-interval", "5", "such as 250ms, 1s"),
        ] {
            let err = Config::try_load(["increment", flag, value])
                .unwrap_err()
                .to_string();
            assert!(err.contains(expected), "{flag} {value}: {err}");
            assert!(
                !err.contains("non-zero type") && !err.contains("expected number at"),
                "no library wording: {err}"
            );
        }
    }

    #[test]
    fn the_shutdown_timeout_follows_the_stop_grace_period() {
        let timeout = |args: &[&str]| {
            Config::try_load(std::iter::once("increment").chain(args.iter().copied()))
                .map(|config| config.into_settings().shutdown_timeout)
                .map_err(|e| e.to_string())
        };
        assert_eq!(timeout(&[]), Ok(Duration::from_secs(30)));
        assert_eq!(
            timeout(&["--stop-grace-period", "30s"]),
            Ok(Duration::from_secs(25))
        );
        assert_eq!(
            timeout(&["--stop-grace-period", "60s", "--shutdown-timeout", "20s"]),
            Ok(Duration::from_secs(20))
        );
        let too_long =
            timeout(&["--stop-grace-period", "30s", "--shutdown-timeout", "28s"]).unwrap_err();
        assert!(too_long.contains("use at most 25s"), "{too_long}");
        let too_short = timeout(&["--stop-grace-period", "5s"]).unwrap_err();
        assert!(too_short.contains("at least 6s"), "{too_short}");
    }

    #[test]
    fn secrets_come_from_files_and_not_from_both_places() {
        let dir = tempfile::tempdir().unwrap();
        let url_file = dir.path().join("url");
        std::fs::write(&url_file, "postgres://u:secret@db/x\n").unwrap();
        let token_file = dir.path().join("token");
        std::fs::write(&token_file, "0123456789abcdef0123\r\n").unwrap();
        let url_arg = url_file.to_str().unwrap();
        let token_arg = token_file.to_str().unwrap();
        let settings = Config::try_load([
            "increment",
            "--database-url-file",
            url_arg,
            "--admin-token-file",
            token_arg,
        ])
        .unwrap()
        .into_settings();
        assert_eq!(settings.database_url, "postgres://u:secret@db/x");
        assert_eq!(
            settings.admin_token.as_deref(),
            Some("0123456789abcdef0123")
        );

        for args in [
            [
                "--database-url",
                "sqlite://a.db",
                "--database-url-file",
                url_arg,
            ],
            [
                "--admin-token",
                "0123456789abcdef",
                "--admin-token-file",
                token_arg,
            ],
        ] {
            let err = Config::try_load(std::iter::once("increment").chain(args))
                .unwrap_err()
                .to_string();
            assert!(err.contains("both set"), "{err}");
        }
        let empty = dir.path().join("empty");
        std::fs::write(&empty, "\n").unwrap();
        let err = Config::try_load(["increment", "--database-url-file", empty.to_str().unwrap()])
            .unwrap_err()
            .to_string();
        assert!(err.contains("is empty"), "{err}");
        let err = Config::try_load(["increment", "--database-url-file", "/nonexistent/url"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("cannot read /nonexistent/url"), "{err}");
    }

    #[test]
    fn empty_values_are_no_values() {
        let dir = tempfile::tempdir().unwrap();
        let token_file = dir.path().join("token");
        std::fs::write(&token_file, "0123456789abcdef0123  \n\n").unwrap();
        let settings = Config::try_load([
            "increment",
            "--spill-dir",
            "",
            "--database-url-file",
            "",
            "--admin-token",
            "",
            "--admin-token-file",
            token_file.to_str().unwrap(),
        ])
        .unwrap()
        .into_settings();
        assert_eq!(settings.spill_dir, None);
        assert_eq!(settings.database_url, "sqlite://increment.db?mode=rwc");
        assert_eq!(
            settings.admin_token.as_deref(),
            Some("0123456789abcdef0123")
        );
    }

    #[test]
    fn a_spill_dir_replaces_the_spill_path() {
        let settings = Config::try_load(["increment", "--spill-dir", "/var/lib/increment/spill"])
            .unwrap()
            .into_settings();
        assert_eq!(
            settings.spill_dir.as_deref(),
            Some(std::path::Path::new("/var/lib/increment/spill"))
        );
        let err = Config::try_load(["increment", "--spill-dir", "d", "--spill-path", "f.jsonl"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("both set"), "{err}");
    }

    #[test]
    fn byte_sizes() {
        assert_eq!(parse_bytes("64KiB"), Ok(65_536));
        assert_eq!(parse_bytes("1MiB"), Ok(1_048_576));
        assert_eq!(parse_bytes("2 kb"), Ok(2_000));
        assert_eq!(parse_bytes("100"), Ok(100));
        assert!(parse_bytes("0").is_err());
        assert!(parse_bytes("KiB").is_err());
    }
}
