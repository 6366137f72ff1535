//! `Idempotency-Key` (IETF httpapi draft "The Idempotency-Key HTTP Header
//! Field"): the header's syntax, the fingerprint of a request, and this
//! instance's memory of the keys it took recently.
//!
//! The guarantee itself lives in the database: the transaction that applies
//! a keyed request inserts its key into `idempotency_keys` first and leaves
//! the request out when the key is already there (see `store`). The memory
//! here only answers repeats on the same instance at once, with the first
//! answer, and tells a reused key (another body) before it is taken.

use std::{
    collections::HashMap,
    hash::BuildHasher,
    sync::Arc,
    time::{Duration, Instant},
};

use parking_lot::Mutex;
use sea_orm::DatabaseConnection;
use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, oneshot, watch};

use crate::store::AppliedKey;

/// The request header. A `HeaderName`, not a `&str`: a string is parsed
/// into a header name again on every look-up.
pub const HEADER: poem::http::HeaderName = poem::http::HeaderName::from_static("idempotency-key");

/// Longest key accepted, in bytes.
pub const MAX_KEY_LEN: usize = 255;

/// Why an `Idempotency-Key` value was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("the Idempotency-Key header is empty")]
    Empty,
    #[error("the Idempotency-Key header is longer than {MAX_KEY_LEN} characters")]
    TooLong,
    #[error(
        "the Idempotency-Key header may hold only printable ASCII (a quoted string, \
         as in Idempotency-Key: \"8e03978e-40d5-43e8-bc93-6894a57f9324\", or the bare value)"
    )]
    Character,
    #[error("the Idempotency-Key header appears more than once")]
    Repeated,
}

/// The key named by an `Idempotency-Key` header value.
///
/// The draft defines the field as a Structured Field string (`"…"`, with
/// `\"` and `\\` escapes); many clients send the bare value, which is
/// accepted too. The key is what the quotes enclose: 1 to [`MAX_KEY_LEN`]
/// printable ASCII characters (space to `~`).
///
/// # Errors
/// [`KeyError`] naming what is wrong.
pub fn parse_key(value: &[u8]) -> Result<String, KeyError> {
    let value = value.trim_ascii();
    let key: Vec<u8> = match value.strip_prefix(b"\"") {
        Some(quoted) => {
            let mut key = Vec::with_capacity(quoted.len());
            let mut chars = quoted.iter();
            let mut closed = false;
            while let Some(&c) = chars.next() {
                match c {
                    b'\\' => match chars.next() {
                        Some(&escaped @ (b'"' | b'\\')) => key.push(escaped),
                        _ => return Err(KeyError::Character),
                    },
                    b'"' => {
                        closed = true;
                        break;
                    }
                    c => key.push(c),
                }
            }
            if !closed || chars.next().is_some() {
                return Err(KeyError::Character);
            }
            key
        }
        None => {
            if value.contains(&b'"') {
                return Err(KeyError::Character);
            }
            value.to_vec()
        }
    };
    check_key(&key)?;
    // Printable ASCII only: valid UTF-8.
    String::from_utf8(key).map_err(|_| KeyError::Character)
}

/// The rules of a key once unquoted: 1 to [`MAX_KEY_LEN`] printable ASCII
/// characters (also what a journal message's keyed request must hold).
///
/// # Errors
/// [`KeyError`] naming what is wrong.
pub fn check_key(key: &[u8]) -> Result<(), KeyError> {
    if key.is_empty() {
        return Err(KeyError::Empty);
    }
    if key.len() > MAX_KEY_LEN {
        return Err(KeyError::TooLong);
    }
    if !key.iter().all(|c| (b' '..=b'~').contains(c)) {
        return Err(KeyError::Character);
    }
    Ok(())
}

/// The key of a request's `Idempotency-Key` header, if it has one. Read
/// from the raw header: a value that is not visible ASCII, or a second
/// copy of the header, is refused rather than taken for no key or for the
/// first copy.
///
/// # Errors
/// [`KeyError`] naming what is wrong.
pub fn key_of(headers: &poem::http::HeaderMap) -> Result<Option<String>, KeyError> {
    let mut values = headers.get_all(HEADER).iter();
    let Some(value) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(KeyError::Repeated);
    }
    parse_key(value.as_bytes()).map(Some)
}

/// Which operation a keyed request was sent to (part of its fingerprint: the
/// same items sent to the other operation are another request).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    Increment,
    Increments,
}

/// A digest of a request: its operation and its items in order. Stable
/// across instances and versions (SHA-256, first 8 bytes), so any instance
/// can tell a repeat from a reused key.
pub fn fingerprint<'a>(
    operation: Operation,
    items: impl IntoIterator<Item = (&'a str, i64)>,
) -> i64 {
    let mut hasher = Sha256::new();
    hasher.update(match operation {
        Operation::Increment => b"increment\0".as_slice(),
        Operation::Increments => b"increments\0".as_slice(),
    });
    for (key, value) in items {
        hasher.update((key.len() as u64).to_le_bytes());
        hasher.update(key.as_bytes());
        hasher.update(value.to_le_bytes());
    }
    let digest = hasher.finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    i64::from_le_bytes(first)
}

/// One key's first request on this instance.
struct Claim<A> {
    fingerprint: i64,
    /// `None` while the first request is being taken; then its answer, or
    /// `Released` when it was refused (the key is free again).
    answer: watch::Sender<Option<Answer<A>>>,
}

#[derive(Clone)]
enum Answer<A> {
    Taken(A),
    Released,
    /// The request may have been taken or not (a journal publish whose
    /// answer never came): a repeat with the same body is taken again (the
    /// flush applies one of them), one with another body is refused, as
    /// the first may be applied.
    Unconfirmed,
}

/// What [`Recent::begin`] found.
pub enum Begin<A: Clone + Send + Sync + 'static> {
    /// The first request with this key here: take it, then
    /// [`First::taken`] (or drop the guard if it was refused).
    First(First<A>),
    /// A repeat of a request taken here, with the same body: answer as it was.
    Repeat(A),
    /// The key was taken here with another body.
    Reused,
}

/// The first request of a key, until it is taken or refused.
pub struct First<A: Clone + Send + Sync + 'static> {
    recent: Recent<A>,
    key: String,
    claim: Arc<Claim<A>>,
    taken: bool,
    /// A repeat of an unconfirmed request: refused, the key stays
    /// unconfirmed (the first may still be applied), not free.
    after_unconfirmed: bool,
}

impl<A: Clone + Send + Sync + 'static> First<A> {
    /// The request was taken with `answer`: repeats get it from now on.
    pub fn taken(mut self, answer: A) {
        self.taken = true;
        self.claim.answer.send_replace(Some(Answer::Taken(answer)));
    }

    /// Whether the request was taken is unknown: it may be applied. The key
    /// stays held for its body (see [`Answer::Unconfirmed`]).
    pub fn unconfirmed(mut self) {
        self.taken = true;
        self.claim.answer.send_replace(Some(Answer::Unconfirmed));
    }
}

impl<A: Clone + Send + Sync + 'static> Drop for First<A> {
    fn drop(&mut self) {
        if self.taken {
            return;
        }
        if self.after_unconfirmed {
            self.claim.answer.send_replace(Some(Answer::Unconfirmed));
            return;
        }
        // Refused (or cancelled before it was offered to the journal or the
        // batcher): the key is free; waiting repeats try again.
        self.recent.forget(&self.key, &self.claim);
        self.claim.answer.send_replace(Some(Answer::Released));
    }
}

/// Shards of [`Recent`]: a request locks one, for a hash-map operation.
const SHARDS: usize = 16;

/// One shard's keys in two generations: new keys go into `current`; when it
/// is full or half a window old it becomes `previous` (and the old
/// `previous` is forgotten), and a `previous` that began a window ago is
/// forgotten too. So no key is remembered past its window; within it, at
/// least the keys of the last half window, or of the last half capacity
/// when keys come faster than that, are kept.
struct Generations<A> {
    current: HashMap<String, Arc<Claim<A>>>,
    previous: HashMap<String, Arc<Claim<A>>>,
    /// When `current` began (its oldest key is younger).
    began: Instant,
    /// When `previous` began.
    previous_began: Instant,
}

impl<A> Generations<A> {
    fn get(&self, key: &str) -> Option<&Arc<Claim<A>>> {
        self.current.get(key).or_else(|| self.previous.get(key))
    }

    fn turn_over(&mut self, now: Instant) {
        self.previous = std::mem::take(&mut self.current);
        self.previous_began = self.began;
        self.began = now;
    }

    /// Forgets what is older than `window` (and turns over at half of it).
    fn expire(&mut self, now: Instant, window: Duration) {
        if now.duration_since(self.began) >= window / 2 {
            self.turn_over(now);
        }
        if now.duration_since(self.previous_began) >= window {
            self.previous.clear();
        }
    }
}

struct Memory<A> {
    shards: Box<[Mutex<Generations<A>>]>,
    /// Keys one generation of one shard holds before it turns over.
    per_generation: usize,
    window: Duration,
    hasher: std::collections::hash_map::RandomState,
}

/// The keys this instance took within the window (at most `capacity` of
/// them; an older one forgotten here is still caught by the database).
/// Cheap to clone.
///
/// Not a moka cache: every keyed request inserts a new key, and moka's
/// insertions and evictions at that rate (its table's rehashing above all)
/// took a fifth of the service's CPU (bench/PROFILE.md). Plain hash maps in
/// two generations bound the memory by count and age just as well here,
/// where exactness is the database's job.
pub struct Recent<A: Clone + Send + Sync + 'static> {
    memory: Arc<Memory<A>>,
}

impl<A: Clone + Send + Sync + 'static> Clone for Recent<A> {
    fn clone(&self) -> Self {
        Self {
            memory: Arc::clone(&self.memory),
        }
    }
}

impl<A: Clone + Send + Sync + 'static> Recent<A> {
    pub fn new(capacity: u64, window: Duration) -> Self {
        let capacity = usize::try_from(capacity).unwrap_or(usize::MAX);
        let now = Instant::now();
        Self {
            memory: Arc::new(Memory {
                shards: (0..SHARDS)
                    .map(|_| {
                        Mutex::new(Generations {
                            current: HashMap::new(),
                            previous: HashMap::new(),
                            began: now,
                            previous_began: now,
                        })
                    })
                    .collect(),
                per_generation: (capacity / SHARDS / 2).max(1),
                window,
                hasher: std::collections::hash_map::RandomState::new(),
            }),
        }
    }

    fn shard(&self, key: &str) -> &Mutex<Generations<A>> {
        let hash = self.memory.hasher.hash_one(key);
        // Any bits will do: each shard's map hashes with its own seed.
        &self.memory.shards[(hash >> 60) as usize % SHARDS]
    }

    /// `key`'s claim, or a new one for `fingerprint` (`true`: it is new).
    fn claim(&self, key: &str, fingerprint: i64) -> (Arc<Claim<A>>, bool) {
        let mut shard = self.shard(key).lock();
        let now = Instant::now();
        shard.expire(now, self.memory.window);
        if let Some(claim) = shard.get(key) {
            return (Arc::clone(claim), false);
        }
        if shard.current.len() >= self.memory.per_generation {
            shard.turn_over(now);
        }
        let claim = Arc::new(Claim {
            fingerprint,
            answer: watch::Sender::new(None),
        });
        shard.current.insert(key.to_owned(), Arc::clone(&claim));
        (claim, true)
    }

    /// A fresh claim of `key` for the same body, in place of `claim` (an
    /// unconfirmed request's) if that still holds it.
    fn reclaim(&self, key: &str, claim: &Arc<Claim<A>>) -> Option<Arc<Claim<A>>> {
        let mut guard = self.shard(key).lock();
        let shard = &mut *guard;
        let fresh = Arc::new(Claim {
            fingerprint: claim.fingerprint,
            answer: watch::Sender::new(None),
        });
        for generation in [&mut shard.current, &mut shard.previous] {
            if let Some(held) = generation.get_mut(key)
                && Arc::ptr_eq(held, claim)
            {
                *held = Arc::clone(&fresh);
                return Some(fresh);
            }
        }
        None
    }

    /// Forgets `key` if `claim` still holds it.
    fn forget(&self, key: &str, claim: &Arc<Claim<A>>) {
        let mut guard = self.shard(key).lock();
        let shard = &mut *guard;
        for generation in [&mut shard.current, &mut shard.previous] {
            if generation
                .get(key)
                .is_some_and(|held| Arc::ptr_eq(held, claim))
            {
                generation.remove(key);
            }
        }
    }

    /// Claims `key` for a request with `fingerprint`, or finds the request
    /// that holds it (waiting while that one is being taken).
    pub async fn begin(&self, key: &str, fingerprint: i64) -> Begin<A> {
        loop {
            let (claim, fresh) = self.claim(key, fingerprint);
            if fresh {
                return Begin::First(First {
                    recent: self.clone(),
                    key: key.to_owned(),
                    claim,
                    taken: false,
                    after_unconfirmed: false,
                });
            }
            if claim.fingerprint != fingerprint {
                return Begin::Reused;
            }
            let mut answer = claim.answer.subscribe();
            let settled = answer
                .wait_for(Option::is_some)
                .await
                .ok()
                .and_then(|a| a.clone());
            match settled {
                Some(Answer::Taken(answer)) => return Begin::Repeat(answer),
                Some(Answer::Unconfirmed) => {
                    // Otherwise another request took its place: look again.
                    if let Some(claim) = self.reclaim(key, &claim) {
                        return Begin::First(First {
                            recent: self.clone(),
                            key: key.to_owned(),
                            claim,
                            taken: false,
                            after_unconfirmed: true,
                        });
                    }
                }
                // Released (or its sender vanished): claim it afresh.
                Some(Answer::Released) | None => self.forget(key, &claim),
            }
        }
    }
}

/// What the database says about a key (see [`Applied::lookup`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stored {
    /// Applied within the window: the request's fingerprint and its batch.
    Applied(AppliedKey),
    /// Not applied within the window (as of the lookup).
    Absent,
    /// The database did not answer in time: the flush will decide.
    Unknown,
}

/// Keys looked up at once at most.
const LOOKUP_GROUP: usize = 512;

/// Looks keys up in `idempotency_keys`, requests that wait at the same time
/// sharing one query (a `SELECT … WHERE key = ANY(…)` per group), so a keyed
/// request costs a fraction of a query, not one. Cheap to clone; the task
/// ends when the last clone is dropped.
#[derive(Clone)]
pub struct Applied {
    requests: mpsc::Sender<(String, oneshot::Sender<Stored>)>,
    timeout: Duration,
}

impl Applied {
    /// Starts the lookup task on `db` (its own connection: see
    /// `startup::connect_lookups`) for keys applied within `window`; a lookup
    /// not answered within `timeout` is [`Stored::Unknown`].
    pub fn start(db: DatabaseConnection, window: Duration, timeout: Duration) -> Self {
        let (requests, mut queue) = mpsc::channel::<(String, oneshot::Sender<Stored>)>(4096);
        let window = chrono::Duration::from_std(window).unwrap_or(chrono::Duration::MAX);
        // One query at a time: requests that arrive meanwhile form the next
        // group. Several in flight made more, smaller queries, and
        // PostgreSQL's cost is per query (bench/PROFILE.md).
        tokio::spawn(async move {
            let mut group = Vec::with_capacity(LOOKUP_GROUP);
            while queue.recv_many(&mut group, LOOKUP_GROUP).await > 0 {
                answer_group(&db, &mut group, window).await;
            }
        });
        Self { requests, timeout }
    }

    /// Whether `key` was applied within the window, and with which body.
    pub async fn lookup(&self, key: &str) -> Stored {
        let (answer, stored) = oneshot::channel();
        if self.requests.try_send((key.to_owned(), answer)).is_err() {
            // Too many waiting: do not queue without bound; the flush decides.
            return Stored::Unknown;
        }
        match tokio::time::timeout(self.timeout, stored).await {
            Ok(Ok(stored)) => stored,
            Ok(Err(_)) | Err(_) => Stored::Unknown,
        }
    }
}

/// Looks up one group's keys and answers each request (emptying `group`).
async fn answer_group(
    db: &DatabaseConnection,
    group: &mut Vec<(String, oneshot::Sender<Stored>)>,
    window: chrono::Duration,
) {
    let keys: Vec<String> = group.iter().map(|(key, _)| key.clone()).collect();
    // As the flush's claim counts it.
    let since = crate::store::window_start(chrono::Utc::now(), window);
    let found = crate::store::applied_fingerprints(db, &keys, since).await;
    if let Err(e) = &found {
        tracing::warn!(error = %crate::telemetry::error_chain(e), "looking up idempotency keys failed; their flush decides");
    }
    for (key, answer) in group.drain(..) {
        let stored = match &found {
            Ok(found) => found
                .get(&key)
                .map_or(Stored::Absent, |applied| Stored::Applied(applied.clone())),
            Err(_) => Stored::Unknown,
        };
        let _ = answer.send(stored);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_structured_strings_or_bare_values() {
        assert_eq!(parse_key(b"\"abc-123\"").unwrap(), "abc-123");
        assert_eq!(parse_key(b" abc-123 ").unwrap(), "abc-123");
        assert_eq!(parse_key(br#""a \"q\" \\ b""#).unwrap(), r#"a "q" \ b"#);
        assert_eq!(parse_key(b"\"with space\"").unwrap(), "with space");
        assert_eq!(parse_key(&[b'k'; MAX_KEY_LEN]).unwrap().len(), MAX_KEY_LEN);
        assert_eq!(parse_key(b""), Err(KeyError::Empty));
        assert_eq!(parse_key(b"\"\""), Err(KeyError::Empty));
        assert_eq!(parse_key(&[b'k'; MAX_KEY_LEN + 1]), Err(KeyError::TooLong));
        for bad in [
            b"\"open".as_slice(),
            b"\"a\" b",
            b"a\"b",
            b"\"a\\x\"",
            "ключ".as_bytes(),
            b"a\x01b",
            b"\"a\x7fb\"",
        ] {
            assert_eq!(parse_key(bad), Err(KeyError::Character), "{bad:?}");
        }
    }

    #[test]
    fn fingerprints_tell_bodies_and_operations_apart() {
        let one = fingerprint(Operation::Increment, [("a", 1)]);
        assert_eq!(one, fingerprint(Operation::Increment, [("a", 1)]));
        assert_ne!(one, fingerprint(Operation::Increment, [("a", 2)]));
        assert_ne!(one, fingerprint(Operation::Increment, [("b", 1)]));
        assert_ne!(one, fingerprint(Operation::Increments, [("a", 1)]));
        // Lengths are framed: moving a byte between key and next key differs.
        assert_ne!(
            fingerprint(Operation::Increments, [("ab", 1), ("c", 1)]),
            fingerprint(Operation::Increments, [("a", 1), ("bc", 1)])
        );
    }

    #[tokio::test]
    async fn repeats_wait_for_the_first_answer_and_a_refusal_frees_the_key() {
        let recent: Recent<u32> = Recent::new(100, Duration::from_secs(60));
        let Begin::First(first) = recent.begin("k", 1).await else {
            panic!("the first request claims the key");
        };
        let repeat = tokio::spawn({
            let recent = recent.clone();
            async move { matches!(recent.begin("k", 1).await, Begin::Repeat(7)) }
        });
        assert!(matches!(recent.begin("k", 2).await, Begin::Reused));
        first.taken(7);
        assert!(repeat.await.unwrap(), "the repeat got the first answer");

        let Begin::First(refused) = recent.begin("r", 1).await else {
            panic!("a new key");
        };
        let waiting = tokio::spawn({
            let recent = recent.clone();
            async move { matches!(recent.begin("r", 1).await, Begin::First(_)) }
        });
        tokio::task::yield_now().await;
        drop(refused);
        assert!(waiting.await.unwrap(), "after a refusal the key is free");
        assert!(matches!(recent.begin("r", 3).await, Begin::First(_)));
    }

    async fn take(recent: &Recent<u32>, key: &str) -> bool {
        match recent.begin(key, 1).await {
            Begin::First(first) => {
                first.taken(1);
                true
            }
            Begin::Repeat(_) | Begin::Reused => false,
        }
    }

    #[tokio::test]
    async fn the_memory_keeps_the_newest_keys_within_its_capacity() {
        // One key per generation per shard: 32 at most, the newest 16 kept.
        let recent: Recent<u32> = Recent::new(2 * SHARDS as u64, Duration::from_secs(3600));
        for i in 0..1000 {
            assert!(take(&recent, &format!("k{i}")).await, "k{i} is new");
        }
        let held: usize = recent
            .memory
            .shards
            .iter()
            .map(|shard| {
                let shard = shard.lock();
                shard.current.len() + shard.previous.len()
            })
            .sum();
        assert!(held <= 2 * SHARDS, "{held} keys held");
        assert!(!take(&recent, "k999").await, "the newest key is remembered");
        assert!(take(&recent, "k0").await, "the oldest is forgotten");
    }

    #[tokio::test]
    async fn a_key_is_forgotten_once_its_window_has_passed() {
        let window = Duration::from_millis(200);
        let recent: Recent<u32> = Recent::new(1000, window);
        assert!(take(&recent, "old").await);
        std::thread::sleep(window / 2 + Duration::from_millis(20));
        assert!(!take(&recent, "old").await, "within the window: a repeat");
        assert!(take(&recent, "young").await);
        std::thread::sleep(window / 2 + Duration::from_millis(20));
        assert!(take(&recent, "old").await, "past its window: new again");
        assert!(!take(&recent, "young").await, "still within its window");
    }
}
