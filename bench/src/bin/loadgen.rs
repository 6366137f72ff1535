//! `loadgen`: an HTTP/1.1 keep-alive load generator for increment.
//!
//! One task per connection, one request in flight per connection. Closed
//! loop by default (each connection sends its next request when the previous
//! one is answered); `--rate R` makes it open loop: every request has an
//! intended send time on a fixed schedule, and its latency is measured from
//! that time, so a stalled server is charged for the requests it delayed
//! (no coordinated omission). `--verify DATABASE_URL` checks afterwards that
//! the database holds exactly the sum of the values answered 2xx, per key;
//! a request whose fate is unknown (no answer, or a proxy's 502/504) may or
//! may not count, each at most once: its key's stored value must be the
//! accepted sum plus some subset of that key's ambiguous values.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    fmt::Write as _,
    io::{IsTerminal, Write as _},
    path::PathBuf,
    process::ExitCode,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use bench::{
    http::{Conn, Target, post_once},
    keys::{KeySampler, KeySpec, ValueSpec},
};
use clap::Parser;
use hdrhistogram::Histogram;
use rand::{Rng, SeedableRng, rngs::SmallRng};
use serde_json::json;

#[derive(Debug, Parser)]
#[command(
    name = "loadgen",
    about = "HTTP/1.1 keep-alive load generator for increment (closed or open loop, exact-total verification)"
)]
struct Args {
    /// Base URL (a path in it is used unless --path is given).
    #[arg(long, default_value = "http://127.0.0.1:4000")]
    url: String,
    /// Request path (default /increment, or /increments with --batch).
    #[arg(long)]
    path: Option<String>,
    /// Connections (one task each, one request in flight each).
    #[arg(short = 'c', long = "connections", default_value_t = 64)]
    connections: usize,
    /// Runtime threads of the load generator itself (1 = current-thread runtime).
    #[arg(short = 't', long, default_value_t = 1)]
    threads: usize,
    /// Open loop: total requests per second over all connections; latency is
    /// measured from each request's intended send time.
    #[arg(long)]
    rate: Option<f64>,
    /// How long to measure (after --warmup); default 10s unless --requests.
    #[arg(short = 'd', long, value_parser = humantime::parse_duration)]
    duration: Option<Duration>,
    /// Stop after this many requests instead of after a duration.
    #[arg(short = 'n', long)]
    requests: Option<u64>,
    /// Unrecorded load before the measurement (still counted for --verify).
    #[arg(long, value_parser = humantime::parse_duration)]
    warmup: Option<Duration>,
    /// hot | uniform:K | zipf:K[:s] | seq:K (keys 0..K in order across all connections).
    #[arg(long, default_value = "hot")]
    keys: KeySpec,
    /// Values: an integer (fixed) or LO..=HI (uniform).
    #[arg(long, default_value = "-1000..=1000", allow_hyphen_values = true)]
    values: ValueSpec,
    /// Send POST /increments with this many items per request (0: POST /increment).
    #[arg(long, default_value_t = 0)]
    batch: usize,
    /// Prefix of every key (default: a fresh random one, so totals start at zero).
    #[arg(long)]
    key_prefix: Option<String>,
    /// Send a unique `Idempotency-Key` header with every request (the cost of
    /// keyed requests; a retry is not simulated).
    #[arg(long)]
    idempotency_keys: bool,
    /// Extra request header, `Name: value` (repeatable).
    #[arg(short = 'H', long = "header")]
    headers: Vec<String>,
    /// Per-request timeout.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    timeout: Duration,
    /// After the run, check that the database totals equal what was answered 2xx.
    #[arg(long, value_name = "DATABASE_URL")]
    verify: Option<String>,
    /// Table holding the counters (key, value).
    #[arg(long, default_value = "counters")]
    verify_table: String,
    /// How long to wait for the flush to make the totals match.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    verify_timeout: Duration,
    /// Bearer token of POST /admin/flush: flush right after the run instead of
    /// waiting for the flush interval.
    #[arg(long)]
    admin_token: Option<String>,
    /// Print one JSON summary line on stdout (the human summary goes to stderr).
    #[arg(long)]
    json: bool,
    /// A label copied into the JSON line.
    #[arg(long)]
    label: Option<String>,
    /// RNG seed (default: random).
    #[arg(long)]
    seed: Option<u64>,
    /// Statuses that leave a request's fate unknown (a proxy's 502/504: it
    /// may have reached an instance): ambiguous, like a request without an
    /// answer, not refused.
    #[arg(long, value_delimiter = ',', default_values_t = [502u16, 504])]
    ambiguous_status: Vec<u16>,
    /// Fail when more requests than this end ambiguous.
    #[arg(long)]
    max_ambiguous: Option<u64>,
    /// Fail when a request is refused (answered neither 2xx nor ambiguous).
    #[arg(long)]
    expect_accepted: bool,
    /// Write the number of answered requests to this file every 100 ms (for
    /// scripts that act in the middle of a run).
    #[arg(long)]
    progress_file: Option<PathBuf>,
    /// With --requests: once this share of them is issued, hold every
    /// connection until --gate-file exists (a script's signal to go on).
    #[arg(long, requires = "gate_file", requires = "requests")]
    gate_at: Option<f64>,
    #[arg(long)]
    gate_file: Option<PathBuf>,
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    gate_timeout: Duration,
    /// Also report latency per window of this length (e.g. 1s, 100ms), by
    /// intended send time: where in the run the tail comes from (a
    /// per-second flush shows as one slow window a second).
    #[arg(long, value_parser = humantime::parse_duration)]
    window: Option<Duration>,
}

/// A pause in the run until a file exists.
struct Gate {
    /// Requests issued before the pause.
    at: u64,
    file: PathBuf,
    timeout: Duration,
    open: AtomicBool,
    timed_out: AtomicBool,
}

impl Gate {
    async fn wait(&self) {
        let deadline = Instant::now() + self.timeout;
        while !self.open.load(Ordering::Relaxed) {
            if self.file.exists() {
                self.open.store(true, Ordering::Relaxed);
            } else if Instant::now() >= deadline {
                self.timed_out.store(true, Ordering::Relaxed);
                self.open.store(true, Ordering::Relaxed);
            } else {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

/// Every sum of a subset of `values` (the empty one included). Ambiguous
/// requests per key are few (at most one per connection in flight when an
/// instance stopped), so the set stays small; past 20 values the sums are
/// bounded by a range instead.
fn subset_sums(values: &[i64]) -> Reachable {
    if values.len() > 20 {
        let low = values.iter().filter(|v| **v < 0).sum();
        let high = values.iter().filter(|v| **v > 0).sum();
        return Reachable::Range(low, high);
    }
    let mut sums = BTreeSet::from([0i64]);
    for value in values {
        let shifted: Vec<i64> = sums.iter().map(|s| s + value).collect();
        sums.extend(shifted);
    }
    Reachable::Exact(sums)
}

enum Reachable {
    Exact(BTreeSet<i64>),
    Range(i64, i64),
}

impl Reachable {
    fn contains(&self, extra: i64) -> bool {
        match self {
            Reachable::Exact(sums) => sums.contains(&extra),
            Reachable::Range(low, high) => (*low..=*high).contains(&extra),
        }
    }
}

/// Per-key sums of what the server accepted, for `--verify`.
struct Tally {
    sums: Vec<AtomicI64>,
    touched: Vec<AtomicBool>,
    /// (key, value) of every item of a request whose outcome is unknown.
    ambiguous: Mutex<Vec<(u32, i64)>>,
}

impl Tally {
    fn new(keys: u32) -> Self {
        let n = keys as usize;
        Self {
            sums: (0..n).map(|_| AtomicI64::new(0)).collect(),
            touched: (0..n).map(|_| AtomicBool::new(false)).collect(),
            ambiguous: Mutex::new(Vec::new()),
        }
    }
}

struct Shared {
    target: Target,
    /// Request head up to and including `Content-Length: `.
    head: Vec<u8>,
    /// Extra header lines, each ending in CRLF.
    extra_headers: String,
    /// Prefix of the unique `Idempotency-Key` of each request, if any.
    idempotency_prefix: Option<String>,
    sampler: KeySampler,
    values: ValueSpec,
    batch: usize,
    /// The key prefix, JSON-escaped, without quotes.
    prefix_json: String,
    connections: usize,
    rate: Option<f64>,
    start: Instant,
    record_from: Instant,
    deadline: Option<Instant>,
    budget: Option<u64>,
    issued: AtomicU64,
    /// Recorded outcomes (answers, and requests that got none), for the
    /// live line and --progress-file.
    completed: AtomicU64,
    timeout: Duration,
    seed: u64,
    tally: Option<Tally>,
    ambiguous_status: Vec<u16>,
    /// Requests whose outcome is unknown.
    ambiguous: AtomicU64,
    gate: Option<Gate>,
    window: Option<Duration>,
}

struct Stats {
    /// From the intended send time (open loop) or the send (closed loop).
    latency: Histogram<u64>,
    /// From the actual send.
    service: Histogram<u64>,
    statuses: BTreeMap<u16, u64>,
    errors: BTreeMap<&'static str, u64>,
    requests: u64,
    increments: u64,
    last_done: Instant,
    /// `latency` per `--window`, indexed from the start of the measurement.
    windows: Vec<Histogram<u64>>,
}

impl Stats {
    fn new() -> Self {
        Self {
            latency: histogram(),
            service: histogram(),
            statuses: BTreeMap::new(),
            errors: BTreeMap::new(),
            requests: 0,
            increments: 0,
            last_done: Instant::now(),
            windows: Vec::new(),
        }
    }

    fn record_window(&mut self, index: usize, latency_ns: u64) {
        if self.windows.len() <= index {
            self.windows.resize_with(index + 1, window_histogram);
        }
        self.windows[index].saturating_record(latency_ns);
    }

    fn merge(&mut self, other: &Stats) {
        let _ = self.latency.add(&other.latency);
        let _ = self.service.add(&other.service);
        for (k, v) in &other.statuses {
            *self.statuses.entry(*k).or_default() += v;
        }
        for (k, v) in &other.errors {
            *self.errors.entry(k).or_default() += v;
        }
        self.requests += other.requests;
        self.increments += other.increments;
        if self.windows.len() < other.windows.len() {
            self.windows
                .resize_with(other.windows.len(), window_histogram);
        }
        for (mine, theirs) in self.windows.iter_mut().zip(&other.windows) {
            let _ = mine.add(theirs);
        }
    }
}

/// Nanoseconds, 1 µs to 100 s, 3 significant digits.
fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1_000, 100_000_000_000, 3).expect("valid histogram bounds")
}

/// Per-window histograms: two significant digits keep one per window small.
fn window_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1_000, 100_000_000_000, 2).expect("valid histogram bounds")
}

fn error_kind(e: &std::io::Error) -> &'static str {
    use std::io::ErrorKind as K;
    match e.kind() {
        K::UnexpectedEof => "closed",
        K::ConnectionReset | K::BrokenPipe | K::ConnectionAborted => "reset",
        K::InvalidData => "bad_response",
        K::ConnectionRefused => "refused",
        _ => "io",
    }
}

fn build_body(
    shared: &Shared,
    rng: &mut SmallRng,
    items: &mut Vec<(u32, i64)>,
    body: &mut Vec<u8>,
) {
    items.clear();
    body.clear();
    let spec = shared.sampler.spec();
    let mut push_item = |body: &mut Vec<u8>, rng: &mut SmallRng| {
        let index = shared.sampler.sample(rng);
        let value = shared.values.sample(rng);
        items.push((index, value));
        body.extend_from_slice(b"{\"key\":\"");
        body.extend_from_slice(shared.prefix_json.as_bytes());
        match spec {
            KeySpec::Hot => body.extend_from_slice(b"hot"),
            _ => {
                body.push(b'k');
                body.extend_from_slice(itoa(u64::from(index)).as_bytes());
            }
        }
        body.extend_from_slice(b"\",\"value\":");
        if value < 0 {
            body.push(b'-');
        }
        body.extend_from_slice(itoa(value.unsigned_abs()).as_bytes());
        body.push(b'}');
    };
    if shared.batch == 0 {
        push_item(body, rng);
    } else {
        body.extend_from_slice(b"{\"increments\":[");
        for i in 0..shared.batch {
            if i > 0 {
                body.push(b',');
            }
            push_item(body, rng);
        }
        body.extend_from_slice(b"]}");
    }
}

/// Decimal digits of `n` (small, stack-only).
fn itoa(mut n: u64) -> ItoaBuf {
    let mut buf = ItoaBuf {
        bytes: [0; 20],
        start: 20,
    };
    loop {
        buf.start -= 1;
        buf.bytes[buf.start] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            return buf;
        }
    }
}

struct ItoaBuf {
    bytes: [u8; 20],
    start: usize,
}

impl ItoaBuf {
    fn as_bytes(&self) -> &[u8] {
        &self.bytes[self.start..]
    }
}

async fn connection_task(shared: Arc<Shared>, id: usize) -> Stats {
    let mut rng =
        SmallRng::seed_from_u64(shared.seed ^ (id as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    let mut stats = Stats::new();
    let mut conn: Option<Conn> = None;
    let mut request: Vec<u8> = Vec::with_capacity(1024);
    let mut body: Vec<u8> = Vec::with_capacity(256);
    let mut items: Vec<(u32, i64)> = Vec::new();
    let per_conn_rate = shared.rate.map(|r| r / shared.connections as f64);
    let offset = per_conn_rate.map_or(0.0, |r| (id as f64 / shared.connections as f64) / r);
    let mut k: u64 = 0;
    loop {
        let intended =
            per_conn_rate.map(|r| shared.start + Duration::from_secs_f64(offset + k as f64 / r));
        k += 1;
        match intended {
            Some(t) => {
                if shared.deadline.is_some_and(|d| t >= d) {
                    break;
                }
            }
            None => {
                if shared.deadline.is_some_and(|d| Instant::now() >= d) {
                    break;
                }
            }
        }
        if let Some(gate) = &shared.gate
            && !gate.open.load(Ordering::Relaxed)
            && shared.issued.load(Ordering::Relaxed) >= gate.at
        {
            gate.wait().await;
        }
        if let Some(budget) = shared.budget
            && shared.issued.fetch_add(1, Ordering::Relaxed) >= budget
        {
            break;
        }
        if let Some(t) = intended {
            // The timer rounds up to whole milliseconds: aim 1 ms early and
            // charge latency from min(send, intended).
            let wake = t.checked_sub(Duration::from_millis(1)).unwrap_or(t);
            if Instant::now() < wake {
                tokio::time::sleep_until(wake.into()).await;
            }
        }
        build_body(&shared, &mut rng, &mut items, &mut body);
        request.clear();
        request.extend_from_slice(&shared.head);
        request.extend_from_slice(itoa(body.len() as u64).as_bytes());
        request.extend_from_slice(b"\r\n");
        request.extend_from_slice(shared.extra_headers.as_bytes());
        if let Some(prefix) = &shared.idempotency_prefix {
            request.extend_from_slice(b"Idempotency-Key: \"");
            request.extend_from_slice(prefix.as_bytes());
            request.extend_from_slice(itoa(id as u64).as_bytes());
            request.push(b'-');
            request.extend_from_slice(itoa(k).as_bytes());
            request.extend_from_slice(b"\"\r\n");
        }
        request.extend_from_slice(b"\r\n");
        request.extend_from_slice(&body);

        if conn.is_none() {
            match tokio::time::timeout(shared.timeout, Conn::connect(shared.target.addr)).await {
                Ok(Ok(c)) => conn = Some(c),
                Ok(Err(e)) => {
                    *stats
                        .errors
                        .entry(if e.kind() == std::io::ErrorKind::ConnectionRefused {
                            "connect_refused"
                        } else {
                            "connect"
                        })
                        .or_default() += 1;
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
                Err(_) => {
                    *stats.errors.entry("connect_timeout").or_default() += 1;
                    continue;
                }
            }
        }
        let c = conn.as_mut().expect("connected above");
        let sent = Instant::now();
        let result = tokio::time::timeout(shared.timeout, c.round_trip(&request, false)).await;
        let done = Instant::now();
        let recording = done >= shared.record_from;
        let outcome = match result {
            Ok(Ok(reply)) => {
                if reply.close {
                    conn = None;
                }
                Ok(reply.status)
            }
            Ok(Err(e)) => {
                conn = None;
                Err(error_kind(&e))
            }
            Err(_) => {
                conn = None;
                Err("timeout")
            }
        };
        let outcome = match outcome {
            Ok(status) if shared.ambiguous_status.contains(&status) => {
                if recording {
                    *stats.statuses.entry(status).or_default() += 1;
                }
                Err("ambiguous_status")
            }
            other => other,
        };
        match outcome {
            Ok(status) => {
                let accepted = (200..300).contains(&status);
                if let Some(tally) = &shared.tally
                    && accepted
                {
                    for (index, value) in &items {
                        let i = *index as usize;
                        tally.sums[i].fetch_add(*value, Ordering::Relaxed);
                        tally.touched[i].store(true, Ordering::Relaxed);
                    }
                }
                if recording {
                    let from = intended.map_or(sent, |t| t.min(sent));
                    let latency_ns = done.duration_since(from).as_nanos() as u64;
                    stats.latency.saturating_record(latency_ns);
                    if let Some(window) = shared.window {
                        let since = from.saturating_duration_since(shared.record_from);
                        let index = (since.as_nanos() / window.as_nanos().max(1)) as usize;
                        stats.record_window(index, latency_ns);
                    }
                    stats
                        .service
                        .saturating_record(done.duration_since(sent).as_nanos() as u64);
                    *stats.statuses.entry(status).or_default() += 1;
                    stats.requests += 1;
                    if accepted {
                        stats.increments += items.len() as u64;
                    }
                    stats.last_done = done;
                    shared.completed.fetch_add(1, Ordering::Relaxed);
                }
            }
            Err(kind) => {
                // Sent and not answered (or a proxy's 502/504): maybe applied.
                // A connect failure sent nothing.
                if !kind.starts_with("connect") {
                    shared.ambiguous.fetch_add(1, Ordering::Relaxed);
                    if let Some(tally) = &shared.tally
                        && let Ok(mut ambiguous) = tally.ambiguous.lock()
                    {
                        ambiguous.extend(items.iter().copied());
                    }
                }
                if kind != "ambiguous_status" {
                    *stats.errors.entry(kind).or_default() += 1;
                }
                if recording {
                    shared.completed.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }
    stats
}

fn main() -> ExitCode {
    let args = Args::parse();
    let runtime = if args.threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(args.threads)
            .enable_all()
            .build()
    };
    let runtime = match runtime {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("loadgen: cannot start the runtime: {e}");
            return ExitCode::from(2);
        }
    };
    match runtime.block_on(run(args)) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("loadgen: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn ms(ns: u64) -> f64 {
    ns as f64 / 1e6
}

/// Runs the load; `Ok(false)` when verification found a mismatch.
async fn run(args: Args) -> anyhow::Result<bool> {
    if args.connections == 0 {
        bail!("--connections must be at least 1");
    }
    if args.batch > 1000 {
        bail!("--batch must be at most 1000 (the API's limit)");
    }
    if args.rate.is_some_and(|r| !(r > 0.0 && r.is_finite())) {
        bail!("--rate must be a positive number");
    }
    let target = Target::resolve(&args.url)
        .await
        .with_context(|| format!("resolving {}", args.url))?;
    let path = args
        .path
        .clone()
        .or(target.path.clone())
        .unwrap_or_else(|| {
            if args.batch > 0 {
                "/increments".to_owned()
            } else {
                "/increment".to_owned()
            }
        });
    let seed = args.seed.unwrap_or_else(|| rand::rng().random());
    let prefix = args.key_prefix.clone().unwrap_or_else(|| {
        let mut rng = SmallRng::seed_from_u64(seed);
        format!("lg{:08x}:", rng.random::<u32>())
    });
    let prefix_json = {
        let quoted = serde_json::to_string(&prefix)?;
        quoted[1..quoted.len() - 1].to_owned()
    };
    let mut extra_headers = String::new();
    for h in &args.headers {
        if !h.contains(':') {
            bail!("--header must look like `Name: value`, found {h:?}");
        }
        let _ = write!(extra_headers, "{}\r\n", h.trim());
    }
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: ",
        target.host
    )
    .into_bytes();
    let duration = match (args.duration, args.requests) {
        (Some(d), _) => Some(d),
        (None, Some(_)) => None,
        (None, None) => Some(Duration::from_secs(10)),
    };
    let warmup = args.warmup.unwrap_or_default();
    let start = Instant::now() + Duration::from_millis(20);
    let record_from = start + warmup;
    let tally = args
        .verify
        .as_ref()
        .map(|_| Tally::new(args.keys.key_count()));
    let shared = Arc::new(Shared {
        target: target.clone(),
        head,
        extra_headers,
        idempotency_prefix: args
            .idempotency_keys
            .then(|| format!("{}{seed:016x}-", prefix.trim_end_matches(':'))),
        sampler: KeySampler::new(&args.keys),
        values: args.values,
        batch: args.batch,
        prefix_json,
        connections: args.connections,
        rate: args.rate,
        start,
        record_from,
        deadline: duration.map(|d| record_from + d),
        budget: args.requests,
        issued: AtomicU64::new(0),
        completed: AtomicU64::new(0),
        timeout: args.timeout,
        seed,
        tally,
        ambiguous_status: args.ambiguous_status.clone(),
        ambiguous: AtomicU64::new(0),
        gate: match (args.gate_at, &args.gate_file, args.requests) {
            (Some(at), Some(file), Some(requests)) => {
                if !(0.0..=1.0).contains(&at) {
                    bail!("--gate-at must be between 0 and 1");
                }
                Some(Gate {
                    at: (requests as f64 * at) as u64,
                    file: file.clone(),
                    timeout: args.gate_timeout,
                    open: AtomicBool::new(false),
                    timed_out: AtomicBool::new(false),
                })
            }
            _ => None,
        },
        window: args.window.filter(|w| !w.is_zero()),
    });
    let progress = args.progress_file.clone().map(|file| {
        let shared = Arc::clone(&shared);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            loop {
                tick.tick().await;
                write_progress(&file, shared.completed.load(Ordering::Relaxed));
            }
        })
    });

    let mode = match args.rate {
        Some(r) => format!("open loop at {r:.0} req/s"),
        None => "closed loop".to_owned(),
    };
    eprintln!(
        "loadgen: POST {}{path}  c={} threads={} {mode}  keys={} (prefix {prefix:?}) values={} batch={}  {}",
        args.url
            .trim_end_matches('/')
            .trim_end_matches(path.as_str()),
        args.connections,
        args.threads.max(1),
        args.keys,
        args.values,
        args.batch,
        match (duration, args.requests) {
            (Some(d), _) => format!("for {}", humantime::format_duration(d)),
            (None, Some(n)) => format!("{n} requests"),
            (None, None) => String::new(),
        }
    );

    let live = std::io::stderr().is_terminal().then(|| {
        let shared = Arc::clone(&shared);
        tokio::spawn(async move {
            let mut last = 0;
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.tick().await;
            loop {
                tick.tick().await;
                let now = shared.completed.load(Ordering::Relaxed);
                let elapsed = Instant::now().saturating_duration_since(shared.start);
                let phase = if Instant::now() < shared.record_from {
                    "warm-up "
                } else {
                    ""
                };
                eprint!(
                    "\r[{:>4.0}s] {phase}{:>9} req/s   total {:>10}   ",
                    elapsed.as_secs_f64(),
                    now - last,
                    now
                );
                let _ = std::io::stderr().flush();
                last = now;
            }
        })
    });

    tokio::time::sleep_until(start.into()).await;
    let tasks: Vec<_> = (0..args.connections)
        .map(|id| tokio::spawn(connection_task(Arc::clone(&shared), id)))
        .collect();
    let mut total = Stats::new();
    let mut end = record_from;
    for task in tasks {
        let stats = task.await.context("a connection task panicked")?;
        if stats.requests > 0 {
            end = end.max(stats.last_done);
        }
        total.merge(&stats);
    }
    if let Some(live) = live {
        live.abort();
        eprintln!();
    }
    if let Some(progress) = progress {
        progress.abort();
        if let Some(file) = &args.progress_file {
            write_progress(file, shared.completed.load(Ordering::Relaxed));
        }
    }
    let elapsed = end.saturating_duration_since(record_from).as_secs_f64();
    let elapsed = if elapsed > 0.0 { elapsed } else { f64::EPSILON };
    let rps = total.requests as f64 / elapsed;
    let ips = total.increments as f64 / elapsed;
    let non2xx: u64 = total
        .statuses
        .iter()
        .filter(|(s, _)| !(200..300).contains(*s))
        .map(|(_, n)| n)
        .sum();
    let errors_total: u64 = total.errors.values().sum();
    let q = |h: &Histogram<u64>, p: f64| {
        ms(if h.is_empty() {
            0
        } else {
            h.value_at_quantile(p)
        })
    };
    let lat = &total.latency;
    eprintln!(
        "requests  {:>10}  in {elapsed:.2} s  = {rps:.1} req/s   increments {ips:.1}/s",
        total.requests
    );
    eprintln!(
        "latency   p50 {:.3} ms  p90 {:.3} ms  p99 {:.3} ms  p99.9 {:.3} ms  max {:.3} ms{}",
        q(lat, 0.5),
        q(lat, 0.9),
        q(lat, 0.99),
        q(lat, 0.999),
        ms(lat.max()),
        if args.rate.is_some() {
            "   (from intended send times)"
        } else {
            ""
        }
    );
    if args.rate.is_some() {
        eprintln!(
            "service   p50 {:.3} ms  p99 {:.3} ms  (from actual send times)",
            q(&total.service, 0.5),
            q(&total.service, 0.99)
        );
    }
    let windows = per_window(&total, shared.window);
    for w in &windows {
        eprintln!(
            "window {:>8.3} s  requests {:>8}  p50 {:.3} ms  p99 {:.3} ms  max {:.3} ms",
            w.from_s, w.requests, w.p50_ms, w.p99_ms, w.max_ms
        );
    }
    let statuses: Vec<String> = total
        .statuses
        .iter()
        .map(|(s, n)| format!("{s}: {n}"))
        .collect();
    eprintln!("status    {}", statuses.join("  "));
    if errors_total == 0 {
        eprintln!("errors    none");
    } else {
        let errors: Vec<String> = total
            .errors
            .iter()
            .map(|(k, n)| format!("{k}: {n}"))
            .collect();
        eprintln!("errors    {}", errors.join("  "));
    }

    let mut ok = true;
    let ambiguous = shared.ambiguous.load(Ordering::Relaxed);
    let refused: u64 = total
        .statuses
        .iter()
        .filter(|(s, _)| !(200..300).contains(*s) && !args.ambiguous_status.contains(s))
        .map(|(_, n)| n)
        .sum();
    let accepted_requests: u64 = total
        .statuses
        .iter()
        .filter(|(s, _)| (200..300).contains(*s))
        .map(|(_, n)| n)
        .sum();
    eprintln!(
        "ambiguous {ambiguous} (no answer, or {:?}: maybe applied, at most once)",
        args.ambiguous_status
    );
    if let Some(max) = args.max_ambiguous
        && ambiguous > max
    {
        eprintln!(
            "loadgen: FAILED: {ambiguous} ambiguous requests, more than --max-ambiguous {max}"
        );
        ok = false;
    }
    if args.expect_accepted && refused > 0 {
        eprintln!("loadgen: FAILED: {refused} requests refused (--expect-accepted)");
        ok = false;
    }
    if shared
        .gate
        .as_ref()
        .is_some_and(|g| g.timed_out.load(Ordering::Relaxed))
    {
        eprintln!("loadgen: FAILED: --gate-file did not appear within --gate-timeout");
        ok = false;
    }
    let mut verify_json = serde_json::Value::Null;
    if let Some(url) = &args.verify {
        let outcome = verify(&args, &shared, url, &prefix).await?;
        ok &= outcome.ok();
        eprintln!("verify    {}", outcome.describe());
        verify_json = outcome.to_json();
    }

    if args.json {
        let line = json!({
            "label": args.label,
            "url": args.url,
            "path": path,
            "connections": args.connections,
            "threads": args.threads.max(1),
            "mode": if args.rate.is_some() { "open" } else { "closed" },
            "rate_target": args.rate,
            "keys": args.keys.to_string(),
            "values": args.values.to_string(),
            "batch": args.batch,
            "duration_s": elapsed,
            "requests": total.requests,
            "rps": rps,
            "increments": total.increments,
            "ips": ips,
            "p50_ms": q(lat, 0.5),
            "p90_ms": q(lat, 0.9),
            "p99_ms": q(lat, 0.99),
            "p999_ms": q(lat, 0.999),
            "max_ms": ms(lat.max()),
            "service_p50_ms": q(&total.service, 0.5),
            "service_p99_ms": q(&total.service, 0.99),
            "statuses": total.statuses.iter().map(|(s, n)| (s.to_string(), *n)).collect::<BTreeMap<_, _>>(),
            "non2xx": non2xx,
            "errors": total.errors,
            "errors_total": errors_total,
            "accepted_requests": accepted_requests,
            "refused": refused,
            "ambiguous": ambiguous,
            "verify": verify_json,
            "windows": windows.iter().map(Window::to_json).collect::<Vec<_>>(),
        });
        println!("{line}");
    }
    Ok(ok)
}

/// Latency over one `--window` of intended send times.
struct Window {
    from_s: f64,
    requests: u64,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
}

impl Window {
    fn to_json(&self) -> serde_json::Value {
        json!({
            "from_s": self.from_s,
            "requests": self.requests,
            "p50_ms": self.p50_ms,
            "p99_ms": self.p99_ms,
            "max_ms": self.max_ms,
        })
    }
}

fn per_window(total: &Stats, window: Option<Duration>) -> Vec<Window> {
    let Some(window) = window else {
        return Vec::new();
    };
    total
        .windows
        .iter()
        .enumerate()
        .map(|(i, h)| {
            let q = |p| {
                if h.is_empty() {
                    0.0
                } else {
                    ms(h.value_at_quantile(p))
                }
            };
            Window {
                from_s: window.as_secs_f64() * i as f64,
                requests: h.len(),
                p50_ms: q(0.5),
                p99_ms: q(0.99),
                max_ms: if h.is_empty() { 0.0 } else { ms(h.max()) },
            }
        })
        .collect()
}

struct VerifyOutcome {
    keys: usize,
    uncertain: usize,
    mismatched: usize,
    missing: usize,
    examples: Vec<String>,
    waited: Duration,
    flush: Option<String>,
    expected_total: i128,
    /// What the database holds over the same keys.
    stored_total: i128,
}

impl VerifyOutcome {
    fn ok(&self) -> bool {
        self.mismatched == 0
    }

    fn describe(&self) -> String {
        let flush = self
            .flush
            .as_ref()
            .map(|f| format!("; admin flush: {f}"))
            .unwrap_or_default();
        let uncertain = if self.uncertain > 0 {
            format!(
                "; {} keys with ambiguous requests, each stored as its accepted sum plus a subset of them",
                self.uncertain
            )
        } else {
            String::new()
        };
        if self.ok() {
            format!(
                "OK: {} keys, database totals equal the sums answered 2xx (sum {}), after {:.2} s{flush}{uncertain}",
                self.keys,
                self.expected_total,
                self.waited.as_secs_f64()
            )
        } else {
            format!(
                "MISMATCH: {} of {} keys differ ({} missing) after {:.2} s; e.g. {}{flush}{uncertain}",
                self.mismatched,
                self.keys,
                self.missing,
                self.waited.as_secs_f64(),
                self.examples.join(", ")
            )
        }
    }

    fn to_json(&self) -> serde_json::Value {
        json!({
            "status": if self.ok() { "ok" } else { "mismatch" },
            "keys": self.keys,
            "mismatched": self.mismatched,
            "missing": self.missing,
            "uncertain": self.uncertain,
            "expected_total": self.expected_total.to_string(),
            "stored_total": self.stored_total.to_string(),
            "wait_s": self.waited.as_secs_f64(),
        })
    }
}

async fn verify(
    args: &Args,
    shared: &Shared,
    url: &str,
    prefix: &str,
) -> anyhow::Result<VerifyOutcome> {
    let tally = shared.tally.as_ref().expect("tally exists with --verify");
    let spec = shared.sampler.spec();
    let mut maybe: HashMap<u32, Vec<i64>> = HashMap::new();
    for (key, value) in tally
        .ambiguous
        .lock()
        .map_or_else(|e| e.into_inner().clone(), |a| a.clone())
    {
        maybe.entry(key).or_default().push(value);
    }
    let reachable: HashMap<u32, Reachable> = maybe
        .iter()
        .map(|(key, values)| (*key, subset_sums(values)))
        .collect();
    let expected: Vec<(u32, i64)> = (0..spec.key_count())
        .filter(|&i| tally.touched[i as usize].load(Ordering::Relaxed) || maybe.contains_key(&i))
        .map(|i| (i, tally.sums[i as usize].load(Ordering::Relaxed)))
        .collect();
    let uncertain = maybe.len();
    let started = Instant::now();
    let flush = match &args.admin_token {
        Some(token) => {
            let auth = format!("Authorization: Bearer {token}\r\n");
            let (status, body) = tokio::time::timeout(
                Duration::from_secs(600),
                post_once(&shared.target, "/admin/flush", &auth, b""),
            )
            .await
            .context("POST /admin/flush timed out")?
            .context("POST /admin/flush")?;
            Some(format!(
                "{status} {} in {:.2} s",
                String::from_utf8_lossy(&body),
                started.elapsed().as_secs_f64()
            ))
        }
        None => None,
    };
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .context("connecting to the database for --verify")?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            eprintln!("loadgen: verify connection: {e}");
        }
    });
    let table = &args.verify_table;
    if !table
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.')
    {
        bail!("--verify-table must be a plain (optionally schema-qualified) name");
    }
    let sql = format!("SELECT key, value FROM {table} WHERE key = ANY($1)");
    let statement = client.prepare(&sql).await?;
    let expected_total: i128 = expected.iter().map(|(_, v)| i128::from(*v)).sum();
    loop {
        let mut mismatched = 0;
        let mut missing = 0;
        let mut examples = Vec::new();
        let mut stored_total: i128 = 0;
        for chunk in expected.chunks(20_000) {
            let names: Vec<String> = chunk
                .iter()
                .map(|(i, _)| format!("{prefix}{}", spec.key_suffix(*i)))
                .collect();
            let rows = client.query(&statement, &[&names]).await?;
            let mut stored: HashMap<u32, i64> = HashMap::with_capacity(rows.len());
            for row in rows {
                let key: String = row.try_get(0)?;
                let value: i64 = row.try_get(1)?;
                if let Some(i) = key.strip_prefix(prefix).and_then(|s| spec.parse_suffix(s)) {
                    stored.insert(i, value);
                    stored_total += i128::from(value);
                }
            }
            for (i, want) in chunk {
                let touched = tally.touched[*i as usize].load(Ordering::Relaxed);
                // Only accepted requests promise a row; an ambiguous one may
                // have added any subset of its key's values.
                let fits = |got: i64| {
                    reachable
                        .get(i)
                        .map_or(got == *want, |r| r.contains(got - want))
                };
                let agrees = match stored.get(i) {
                    Some(got) => fits(*got),
                    None => !touched,
                };
                match stored.get(i) {
                    _ if agrees => {}
                    got => {
                        mismatched += 1;
                        if got.is_none() {
                            missing += 1;
                        }
                        if examples.len() < 3 {
                            examples.push(format!(
                                "{prefix}{}: accepted {want}, stored {}",
                                spec.key_suffix(*i),
                                got.map_or("nothing".to_owned(), |g| g.to_string())
                            ));
                        }
                    }
                }
            }
        }
        let waited = started.elapsed();
        if mismatched == 0 || waited >= args.verify_timeout {
            return Ok(VerifyOutcome {
                keys: expected.len(),
                uncertain,
                mismatched,
                missing,
                examples,
                waited,
                flush,
                expected_total,
                stored_total,
            });
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Replaces `file`'s content with `count` (written aside, then renamed, so a
/// reader never sees a partial number).
fn write_progress(file: &std::path::Path, count: u64) {
    let aside = file.with_extension("tmp");
    if std::fs::write(&aside, count.to_string()).is_ok() {
        let _ = std::fs::rename(&aside, file);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_ambiguous_value_may_count_once_or_not_at_all() {
        let sums = subset_sums(&[5, -2]);
        for extra in [0, 5, -2, 3] {
            assert!(sums.contains(extra), "{extra}");
        }
        for extra in [10, -4, 1, 7] {
            assert!(
                !sums.contains(extra),
                "{extra}: a value counted twice or invented"
            );
        }
        assert!(subset_sums(&[]).contains(0) && !subset_sums(&[]).contains(1));
        let many: Vec<i64> = (1..=30).collect();
        let range = subset_sums(&many);
        assert!(range.contains(465) && range.contains(0) && !range.contains(466));
    }
}
