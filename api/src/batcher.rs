//! Pending deltas per key, held in a bounded, expiring moka cache.
//!
//! Design ("sealed slots"): each key has an `Arc<Slot>`, a small
//! mutex-guarded cell that requests add to in place, found through the
//! [`index`]. The cache holds the slots in [pages](page) of a few keys (one
//! moka entry per page, not per key: moka's entry alone outweighed a key's
//! slot). Nothing ever overwrites a live slot. Whatever makes a page leave
//! the cache (size eviction, TTL expiry, explicit invalidation) runs the
//! eviction listener, which *seals* every slot of the page and moves their
//! remainders into the *side map*. A writer that finds its slot sealed
//! retries on a fresh one. So every delta is in exactly one place: a live
//! slot, the side map, or a batch handed over to the flusher
//! ([`Batcher::hand_over`]), which owns it from then on.
//!
//! The batcher adds deltas and hands them over; it does not write, retry or
//! spill. It only remembers the last batch handed over until the flusher
//! [releases](Batcher::release) it, because the pending-key bound counts
//! those keys too (once) and lets them merge at the bound.
//!
//! The side map also takes deltas that must reach the very next drain:
//! durable (`wait=true`) requests, and a batch's keys whose slot was evicted
//! while the batch was being recorded. Each drain has a number; a durable
//! request gets a *ticket*, the number of the drain that will carry it.
//!
//! The obvious alternative (plain `i64` values updated with `and_compute_with`,
//! evictions forwarded by the listener) counts deltas twice when eviction races
//! a read-modify-write; it was measured to do so.

use std::{
    collections::{BTreeMap, HashMap},
    num::NonZeroU64,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use compact_str::CompactString;
use moka::{notification::RemovalCause, policy::EvictionPolicy, sync::Cache};
use parking_lot::Mutex;

use crate::{
    batch::{Batch, JournalSpan, Keyed},
    metrics::{self, Metrics, Sampled},
};

mod index;
mod page;

use page::{Join, Page};

/// Deltas taken out of the batcher, per key. `i128` because the sum of several
/// in-range `i64` deltas of one key (a slot evicted, then a fresh one) may leave
/// the `i64` range; the store splits such sums, nothing is truncated.
pub type Deltas = HashMap<String, i128>;

/// Key bytes one unit of the bounds stands for; see [`key_weight`].
pub const KEY_UNIT_BYTES: usize = 64;

/// What a key counts for in `--cache-capacity` and `--max-pending-keys`:
/// one, plus one per [`KEY_UNIT_BYTES`] of its length. The bounds are there
/// to bound memory, and a key is stored more than once (a 985-byte key cost
/// about 2,400 bytes against about 390 for a short one): counted as one
/// whatever its length, a million 255-character keys took gigabytes. With
/// this weight a unit costs at most about 520 bytes (a 63-byte key).
pub fn key_weight(key: &str) -> u64 {
    1 + (key.len() / KEY_UNIT_BYTES) as u64
}

/// Keys (of weight one) a page of the cache holds at most. 16: moka's
/// per-entry cost, about 290 bytes, becomes about 18 per key; a size
/// eviction or an expiry then seals 16 keys at once, which only moves their
/// deltas aside.
pub const PAGE_KEYS: u64 = 16;

/// The room of a page in a cache of `capacity`: [`PAGE_KEYS`], less in a
/// small cache (a cache of 64 or less holds one key per page, as if there
/// were no pages), so that the open page is a small part of the cache.
fn page_room(capacity: u64) -> u64 {
    (capacity / 64).clamp(1, PAGE_KEYS)
}

/// Why an increment was refused. Nothing is recorded when this is returned.
/// (What a client is told is the HTTP layer's to word.)
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BatchError {
    /// The key's pending delta on this instance would leave the signed 64-bit range.
    #[error("the pending delta of the key would leave the i64 range")]
    DeltaOverflow,
    /// The request's own deltas for one key sum outside the signed 64-bit
    /// range: it can never be taken as it is, whatever is pending.
    #[error("the request's deltas for one key sum outside the i64 range")]
    RequestOverflow,
    /// The bound on distinct pending keys is reached and the key is not one of
    /// them (keys already held still merge).
    #[error("the bound on distinct pending keys is reached")]
    Full,
}

/// Deltas outside the live slots, and the drain counter (one lock for both,
/// so a durable record's ticket and the drain that takes it agree).
#[derive(Default)]
struct SideMap {
    deltas: Deltas,
    /// Weight of the keys of `deltas` not also in the handed-over batch
    /// (for the bound).
    counted: u64,
    /// Drains started so far.
    drains: u64,
    /// Requests with an `Idempotency-Key` whose items are in `deltas`
    /// (recorded under this lock, so a drain takes a request and its items
    /// together).
    keyed: Vec<Keyed>,
    /// [`keyed_weight`] of `keyed` (for the bound; mirrored in
    /// `Batcher::side_keyed_weight`).
    keyed_weight: u64,
}

impl SideMap {
    /// Adds `delta` to `key`, counting the key for the pending-key bound
    /// unless the handed-over batch already holds it.
    fn add(&mut self, key: &str, delta: i128, handed_over: &HandedOver, counted: &AtomicU64) {
        match self.deltas.get_mut(key) {
            Some(entry) => *entry += delta,
            None => {
                self.deltas.insert(key.to_owned(), delta);
                if !handed_over_holds(handed_over, key) {
                    self.counted += key_weight(key);
                    counted.store(self.counted, Ordering::Relaxed);
                }
            }
        }
    }
}

/// The last batch handed over and not yet released (shared with the listener).
type HandedOver = Mutex<Option<Arc<Batch>>>;

/// What keyed requests count toward the bound: their items' keys, and
/// their own `Idempotency-Key`, held with them until written (in the
/// request, and in the table of held keys by key and by drain: up to 255
/// bytes, three times; uncounted, 255-byte keys held about 950 bytes per
/// unit of the bound, found by review).
fn keyed_weight(keyed: &[Keyed]) -> u64 {
    keyed
        .iter()
        .map(|request| {
            key_weight(&request.key)
                + request
                    .items
                    .iter()
                    .map(|(key, _)| key_weight(key))
                    .sum::<u64>()
        })
        .sum()
}

/// A request's values summed per key, in key order, each sum with the
/// position of its key's last item. Summed wide, so only a key's total must
/// fit in `i64`, whatever the order of its items; `Err` is the position of
/// the last item of a key whose total does not.
///
/// # Errors
/// That position.
pub fn sum_per_key<'a>(
    items: impl IntoIterator<Item = (&'a str, i64)>,
) -> Result<Vec<(&'a str, i64, usize)>, usize> {
    let mut per_key: BTreeMap<&str, (i128, usize)> = BTreeMap::new();
    for (index, (key, delta)) in items.into_iter().enumerate() {
        let entry = per_key.entry(key).or_insert((0, index));
        entry.0 += i128::from(delta);
        entry.1 = index;
    }
    per_key
        .into_iter()
        .map(|(key, (sum, last_index))| {
            i64::try_from(sum)
                .map(|sum| (key, sum, last_index))
                .map_err(|_| last_index)
        })
        .collect()
}

fn handed_over_holds(handed_over: &HandedOver, key: &str) -> bool {
    handed_over
        .lock()
        .as_ref()
        .is_some_and(|batch| batch.delta_for(key).is_some())
}

/// One key's pending delta. Lives in the cache; shared with writers holding it.
struct Slot {
    /// Its key, so that the index and the dirty list hold one pointer each.
    key: CompactString,
    state: Mutex<SlotState>,
}

impl Slot {
    fn new(key: &str) -> Self {
        Self {
            key: CompactString::from(key),
            state: Mutex::default(),
        }
    }
}

impl AsRef<str> for Slot {
    fn as_ref(&self) -> &str {
        &self.key
    }
}

#[derive(Default)]
struct SlotState {
    delta: i64,
    /// Something was recorded since the last drain (a zero delta still creates
    /// the counter row).
    dirty: bool,
    /// Counted in `dirty_slots`, by its key's weight (not when the
    /// handed-over batch already holds the key: the bound counts distinct
    /// keys).
    counted: bool,
    /// The slot left the cache and its remainder moved to the side map; adding to
    /// it now would lose the addition.
    sealed: bool,
}

impl SlotState {
    /// Takes the pending delta, if any, leaving the slot clean; `key` is
    /// the slot's (its weight leaves `dirty_slots`).
    fn take(&mut self, key: &str, dirty_slots: &AtomicU64) -> Option<i64> {
        if !self.dirty {
            return None;
        }
        self.dirty = false;
        if std::mem::take(&mut self.counted) {
            dirty_slots.fetch_sub(key_weight(key), Ordering::Relaxed);
        }
        Some(std::mem::take(&mut self.delta))
    }
}

/// Slots that became dirty since the last drain. An entry can go stale (its
/// slot was sealed, its remainder moved aside), which is harmless; while no
/// drain runs (the database is down) stale entries of churning keys are
/// dropped from time to time so the list stays about as long as what is
/// really pending. Counted in entries and in key bytes: a stale entry keeps
/// its slot and key alive, and a long key that keeps leaving the cache (a
/// cache smaller than its weight) would otherwise pin 65,536 copies of it.
#[derive(Default)]
struct DirtyList {
    entries: Vec<Arc<Slot>>,
    /// Bytes of the keys of `entries`.
    key_bytes: usize,
    /// Length at which stale entries are next dropped.
    compact_at: usize,
    /// `key_bytes` at which stale entries are next dropped.
    compact_at_bytes: usize,
}

impl DirtyList {
    /// Length below which the list is never compacted.
    const MIN_COMPACT: usize = 1 << 16;
    /// Key bytes below which the list is never compacted.
    const MIN_COMPACT_BYTES: usize = 4 << 20;

    fn push(&mut self, slot: &Arc<Slot>) {
        if self.entries.len() >= self.compact_at.max(Self::MIN_COMPACT)
            || self.key_bytes >= self.compact_at_bytes.max(Self::MIN_COMPACT_BYTES)
        {
            // `try_lock`: the caller holds a slot lock (maybe several); never
            // wait for another here. A busy slot is simply kept.
            self.entries
                .retain(|slot| slot.state.try_lock().is_none_or(|state| state.dirty));
            self.key_bytes = self.entries.iter().map(|slot| slot.key.len()).sum();
            self.compact_at = self.entries.len() * 2;
            self.compact_at_bytes = self.key_bytes * 2;
        }
        self.key_bytes += slot.key.len();
        self.entries.push(Arc::clone(slot));
    }

    fn take(&mut self) -> Vec<Arc<Slot>> {
        self.compact_at = 0;
        self.compact_at_bytes = 0;
        self.key_bytes = 0;
        std::mem::take(&mut self.entries)
    }
}

/// The `Idempotency-Key`s of the keyed requests held here — in the side map,
/// or in the batch handed over and not yet released — each with the
/// fingerprint of its first request, by the drain that carries them. The
/// door asks when its memory of recent keys has forgotten a key (it is
/// bounded by count): while a request is held here, its key is not yet in
/// the database either, and another body would be taken and then left out
/// by the flush, after a `202`. Bounded as the keyed requests are (their
/// items count toward the pending-key bound).
#[derive(Default)]
struct HeldKeys {
    /// Fingerprint of the first request held with the key, and how many
    /// requests with it are held.
    by_key: HashMap<String, (i64, u64)>,
    /// The keys recorded for each drain number.
    by_drain: BTreeMap<u64, Vec<String>>,
}

impl HeldKeys {
    fn hold(&mut self, drain: u64, keyed: &[Keyed]) {
        let keys = self.by_drain.entry(drain).or_default();
        for request in keyed {
            self.by_key
                .entry(request.key.clone())
                .or_insert((request.fingerprint, 0))
                .1 += 1;
            keys.push(request.key.clone());
        }
    }

    /// Lets go of the keys of drains up to `drain` (their requests are
    /// written, or no longer here).
    fn let_go_through(&mut self, drain: u64) {
        while let Some(entry) = self.by_drain.first_entry() {
            if *entry.key() > drain {
                break;
            }
            for key in entry.remove() {
                if let Some((_, held)) = self.by_key.get_mut(&key) {
                    *held -= 1;
                    if *held == 0 {
                        self.by_key.remove(&key);
                    }
                }
            }
        }
        // A backlog (an outage) grew the table; give the memory back once
        // it has drained.
        if self.by_key.capacity() > 1024 && self.by_key.len() * 4 < self.by_key.capacity() {
            self.by_key.shrink_to(self.by_key.len() * 2);
        }
    }
}

/// Counts of what left the cache other than by a drain, by cause.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct EvictionCounts {
    pub size: u64,
    pub expired: u64,
}

/// Holds pending deltas between flushes. Cheap to share: wrap in an `Arc`.
pub struct Batcher {
    /// The pages of live slots, by a number each gets when opened. Least
    /// recently *opened* goes first: reads never reach the cache (they find
    /// their slot in the index), so use cannot order it, and a new page is
    /// always admitted (TinyLFU would refuse it on a full cache, every one
    /// being as new as the last). A slot past its TTL stays in use until
    /// the cache's maintenance removes its page (run by cache traffic and
    /// by every drain). Nothing is lost either way: the listener moves what
    /// it seals aside.
    cache: Cache<u64, Arc<Page<Slot>>>,
    /// Every live slot by key: what a request looks up (see [`index`]). A
    /// slot is made and put here under the index's lock, so a key never has
    /// two live slots.
    index: Arc<index::Index<Slot>>,
    /// The page new keys' slots join until it is full (or has left the
    /// cache; none before the first key), and the number the next page gets.
    open_page: Mutex<Option<Arc<Page<Slot>>>>,
    pages_opened: AtomicU64,
    /// Weight of keys a page takes (see [`page_room`]).
    page_room: u64,
    /// Age past which the open page takes no more keys: half the TTL, so a
    /// key stays in the cache at least that long (unless evicted).
    page_max_age: Duration,
    /// Remainders of slots that left the cache, durable records, batch
    /// fallbacks; emptied only by `drain`.
    side: Arc<Mutex<SideMap>>,
    /// Weight of the keys counted in `side` (read without its lock by the
    /// pending-key bound).
    side_keys: Arc<AtomicU64>,
    /// The last batch handed over, until released: for the bound only (the
    /// flusher owns it).
    handed_over: Arc<HandedOver>,
    /// Weight of the keys of `handed_over`.
    handed_over_keys: AtomicU64,
    /// [`keyed_weight`] of the side map's keyed requests (read without
    /// its lock).
    side_keyed_weight: AtomicU64,
    /// The `Idempotency-Key`s of the keyed requests held here.
    held_keys: Mutex<HeldKeys>,
    /// [`keyed_weight`] of `handed_over`'s keyed requests.
    handed_over_keyed_weight: AtomicU64,
    /// Bound on distinct pending keys, by weight (slots + side + handed over).
    max_pending_keys: u64,
    /// Evictions seen by the listener, for metrics.
    evictions: Arc<Mutex<EvictionCounts>>,
    /// Weight of the live slots holding a delta not yet drained (exact, unlike moka's
    /// entry count, which lags until maintenance).
    dirty_slots: Arc<AtomicU64>,
    /// The slots made dirty since the last drain, which the drain visits
    /// instead of every cache entry (most entries are clean: a key stays in
    /// the cache after its delta is written).
    dirty_list: Mutex<DirtyList>,
    /// When the oldest delta not yet drained was recorded; `None` when nothing
    /// has been recorded since the last drain.
    /// Nanoseconds after `epoch` (plus one, so 0 means none); an atomic
    /// because every request touches it.
    pending_since: AtomicU64,
    /// `pending_since` of the batch handed over and not yet released (0:
    /// none), so a batch that a failing flush keeps retrying still counts
    /// as pending.
    handed_over_since: AtomicU64,
    /// Origin of `pending_since`.
    epoch: Instant,
}

impl Batcher {
    /// A batcher holding live keys of at most `capacity` in [`key_weight`]s
    /// (more are moved aside, not dropped), each for at most `ttl` after its
    /// slot was created.
    ///
    /// `NonZeroU64` because moka with capacity 0 stores nothing and never calls
    /// the listener: every increment would vanish silently.
    pub fn new(capacity: NonZeroU64, ttl: Duration) -> Self {
        Self::with_max_pending_keys(capacity, ttl, u64::MAX)
    }

    /// Like [`new`](Self::new), refusing new keys (with [`BatchError::Full`])
    /// once `max_pending_keys` distinct keys are pending. The bound is soft by
    /// at most the number of concurrent requests.
    pub fn with_max_pending_keys(
        capacity: NonZeroU64,
        ttl: Duration,
        max_pending_keys: u64,
    ) -> Self {
        let side: Arc<Mutex<SideMap>> = Arc::default();
        let side_keys: Arc<AtomicU64> = Arc::default();
        let evictions: Arc<Mutex<EvictionCounts>> = Arc::default();
        let listener_side = Arc::clone(&side);
        let listener_side_keys = Arc::clone(&side_keys);
        let handed_over: Arc<HandedOver> = Arc::default();
        let listener_handed_over = Arc::clone(&handed_over);
        let listener_evictions = Arc::clone(&evictions);
        let dirty_slots: Arc<AtomicU64> = Arc::default();
        let listener_dirty_slots = Arc::clone(&dirty_slots);
        let index: Arc<index::Index<Slot>> = Arc::new(index::Index::new());
        let listener_index = Arc::clone(&index);
        // The listener must never panic: moka disables it for good after one
        // panic and later evictions would be lost. parking_lot locks do not poison.
        let cache = Cache::builder()
            .max_capacity(capacity.get())
            .eviction_policy(EvictionPolicy::lru())
            .weigher(|_: &u64, page: &Arc<Page<Slot>>| {
                u32::try_from(page.room()).unwrap_or(u32::MAX)
            })
            .time_to_live(ttl)
            .eviction_listener(
                move |_: Arc<u64>, page: Arc<Page<Slot>>, cause: RemovalCause| {
                    let slots = page.seal();
                    // Same handling for every cause: filtering on the cause is
                    // unreliable (moka can report an expiry as `Replaced`).
                    // The side map before the slots: the same order as
                    // `pending_for` and `record_all`, so a reader sees the
                    // move whole and nothing deadlocks.
                    let mut side = listener_side.lock();
                    for slot in &slots {
                        let remainder = {
                            let mut state = slot.state.lock();
                            state.sealed = true;
                            state.take(&slot.key, &listener_dirty_slots)
                        };
                        if let Some(delta) = remainder {
                            side.add(
                                &slot.key,
                                i128::from(delta),
                                &listener_handed_over,
                                &listener_side_keys,
                            );
                        }
                    }
                    drop(side);
                    // After sealing: a request that finds one of these slots
                    // in the index checks the seal under its lock.
                    for slot in &slots {
                        listener_index.remove(listener_index.hash(&slot.key), slot);
                    }
                    let left = slots.len() as u64;
                    let mut counts = listener_evictions.lock();
                    match cause {
                        RemovalCause::Size => counts.size += left,
                        RemovalCause::Expired => counts.expired += left,
                        RemovalCause::Explicit | RemovalCause::Replaced => {}
                    }
                },
            )
            .build();
        Self {
            cache,
            index,
            open_page: Mutex::new(None),
            pages_opened: AtomicU64::new(0),
            page_room: page_room(capacity.get()),
            page_max_age: ttl / 2,
            side,
            side_keys,
            handed_over,
            handed_over_keys: AtomicU64::new(0),
            side_keyed_weight: AtomicU64::new(0),
            handed_over_keyed_weight: AtomicU64::new(0),
            held_keys: Mutex::default(),
            max_pending_keys,
            evictions,
            dirty_slots,
            dirty_list: Mutex::new(DirtyList::default()),
            pending_since: AtomicU64::new(0),
            handed_over_since: AtomicU64::new(0),
            epoch: Instant::now(),
        }
    }

    /// Refuses a key not already pending when its weight does not fit under
    /// the bound (as [`admit_all`](Self::admit_all) does; an empty batcher
    /// takes any key).
    fn admit(&self, key: &str) -> Result<(), BatchError> {
        self.admit_all(std::iter::once(key))
    }

    /// Refuses distinct keys (`keys`) when those not already pending do not
    /// fit under the bound; the keys are looked at only when the bound is
    /// near.
    fn admit_all<'k>(&self, keys: impl Iterator<Item = &'k str> + Clone) -> Result<(), BatchError> {
        let pending = self.pending_keys();
        let room = self.max_pending_keys.saturating_sub(pending);
        // An empty batcher takes any one request, however large: a journal
        // message over the bound must still be read (the bound is soft by
        // a request anyway).
        if pending > 0 && room < keys.clone().map(key_weight).sum::<u64>() {
            let new_keys: u64 = keys.filter(|key| !self.holds(key)).map(key_weight).sum();
            if room < new_keys {
                return Err(BatchError::Full);
            }
        }
        Ok(())
    }

    /// Whether `key` has a delta pending here (live, aside or handed over).
    fn holds(&self, key: &str) -> bool {
        self.pending_for(key).is_some()
            || self
                .handed_over()
                .is_some_and(|batch| batch.delta_for(key).is_some())
    }

    /// Adds `delta` to `key`'s pending delta.
    ///
    /// Synchronous and free of `.await`: a request cancelled around it has
    /// either recorded its delta entirely or not at all.
    ///
    /// # Errors
    /// [`BatchError::DeltaOverflow`] when the pending delta would leave `i64`,
    /// [`BatchError::Full`] at the pending-key bound; nothing is recorded then.
    pub fn record(&self, key: &str, delta: i64) -> Result<(), BatchError> {
        self.admit(key)?;
        loop {
            let slot = self.slot(key);
            let mut state = slot.state.lock();
            if state.sealed {
                // Evicted between the lookup and the lock: its remainder already
                // moved to the side map. The next lookup creates a fresh slot.
                drop(state);
                self.index.remove(self.index.hash(key), &slot);
                continue;
            }
            state.delta = state
                .delta
                .checked_add(delta)
                .ok_or(BatchError::DeltaOverflow)?;
            self.mark_dirty(&mut state, key, &slot);
            drop(state);
            self.note_pending();
            return Ok(());
        }
    }

    /// Adds every `(key, delta)` or none of them.
    ///
    /// The side map and every slot involved are locked together (the map
    /// first, then slots in key order: the listener's order, so nothing can
    /// deadlock; single-key `record` holds one slot lock at a time), checked,
    /// then updated: a batch is never half-applied. A slot evicted between the
    /// lookup and the lock is replaced by the side map, which the next
    /// drain takes too, so there is no retry loop however small the cache is.
    /// `(0, Full)` when the batch's new keys do not fit under the bound.
    ///
    /// # Errors
    /// `(index, DeltaOverflow)` naming an item of the first key whose pending
    /// delta would leave `i64`; nothing is recorded then.
    pub fn record_all(&self, items: &[(&str, i64)]) -> Result<(), (usize, BatchError)> {
        // Sum per key first (sorted): the batch may name a key several times.
        let sums = sum_per_key(items.iter().copied())
            .map_err(|index| (index, BatchError::RequestOverflow))?;
        self.admit_all(sums.iter().map(|(key, _, _)| *key))
            .map_err(|e| (0, e))?;
        // Look up (or create) every slot before taking any lock: a moka call
        // may run maintenance, whose listener takes these locks.
        let slots: Vec<Arc<Slot>> = sums.iter().map(|(key, _, _)| self.slot(key)).collect();
        let mut side = self.side.lock();
        let mut guards: Vec<_> = slots.iter().map(|slot| slot.state.lock()).collect();
        let mut updated = Vec::with_capacity(guards.len());
        for (guard, (_, sum, last_index)) in guards.iter().zip(&sums) {
            if guard.sealed {
                updated.push(None);
                continue;
            }
            let delta = guard
                .delta
                .checked_add(*sum)
                .ok_or((*last_index, BatchError::DeltaOverflow))?;
            updated.push(Some(delta));
        }
        for (((guard, slot), (key, sum, _)), delta) in
            guards.iter_mut().zip(&slots).zip(&sums).zip(updated)
        {
            match delta {
                Some(delta) => {
                    guard.delta = delta;
                    self.mark_dirty(guard, key, slot);
                }
                None => side.add(key, i128::from(*sum), &self.handed_over, &self.side_keys),
            }
        }
        drop(guards);
        drop(side);
        self.note_pending();
        Ok(())
    }

    /// `key`'s slot, made when missing (and put in the open page, and the
    /// index). The slot may be sealed (its page left the cache meanwhile);
    /// callers check under its lock, as they always did.
    fn slot(&self, key: &str) -> Arc<Slot> {
        let hash = self.index.hash(key);
        if let Some(slot) = self.index.get(hash, key) {
            return slot;
        }
        let mut opened = None;
        let slot = self.index.get_or_insert_with(hash, key, || {
            let slot = Arc::new(Slot::new(key));
            let weight = key_weight(key);
            let mut open = self.open_page.lock();
            let joined = open.as_ref().map_or(Join::Closed, |page| {
                page.join(&slot, weight, self.page_max_age)
            });
            match joined {
                Join::Joined => {}
                // A page of its own, weighing what it holds, so the open
                // page is not closed with room left: keys of mixed lengths
                // would otherwise leave pages part empty, each weighing its
                // whole room, and the cache would hold far fewer keys than
                // its capacity.
                Join::NoRoom => opened = Some(Arc::new(Page::holding(&slot, weight, weight))),
                Join::Closed => {
                    let page = Arc::new(Page::holding(&slot, weight, self.page_room.max(weight)));
                    *open = Some(Arc::clone(&page));
                    opened = Some(page);
                }
            }
            slot
        });
        // Outside the index's lock: an insertion may run the cache's
        // maintenance, whose listener takes it. Until then the page is
        // open but not yet in the cache, which is harmless: nothing can
        // evict it, and its slots are as live as any.
        if let Some(page) = opened {
            let number = self.pages_opened.fetch_add(1, Ordering::Relaxed);
            self.cache.insert(number, page);
        }
        slot
    }

    /// `key`'s slot if there is one, without creating it.
    fn live_slot(&self, key: &str) -> Option<Arc<Slot>> {
        self.index.get(self.index.hash(key), key)
    }

    /// Called with `slot`'s lock held (`state`); lock order: side map, slots,
    /// then the dirty list (the drain takes the list alone).
    fn mark_dirty(&self, state: &mut SlotState, key: &str, slot: &Arc<Slot>) {
        if !state.dirty {
            state.dirty = true;
            self.dirty_list.lock().push(slot);
            // Once per key per flush cycle: the lookup is off the hot path.
            if !handed_over_holds(&self.handed_over, key) {
                state.counted = true;
                self.dirty_slots
                    .fetch_add(key_weight(key), Ordering::Relaxed);
            }
        }
    }

    /// Records a delta that the very next drain will carry, and returns that
    /// drain's number (the ticket a durable request waits for).
    ///
    /// # Errors
    /// As [`record`](Self::record) (the bound on this key's delta applies to
    /// its side-map entry).
    pub fn record_durable(&self, key: &str, delta: i64) -> Result<u64, BatchError> {
        self.admit(key)?;
        let mut side = self.side.lock();
        let drains = side.drains;
        let current = side.deltas.get(key).copied().unwrap_or(0);
        if i64::try_from(current + i128::from(delta)).is_err() {
            return Err(BatchError::DeltaOverflow);
        }
        side.add(key, i128::from(delta), &self.handed_over, &self.side_keys);
        drop(side);
        self.note_pending();
        Ok(drains + 1)
    }

    /// Records requests that carried an `Idempotency-Key`, with `plain`
    /// items beside them (a journal message holds both): every item goes to
    /// the side map, together with the requests themselves, so the very next
    /// drain carries a request and its items together. All or nothing;
    /// returns that drain's number. A request without its take time gets
    /// `taken_at` (see [`Keyed::taken_at`]).
    ///
    /// # Errors
    /// As [`record_all`](Self::record_all), without an index; nothing is
    /// recorded then.
    pub fn record_keyed(
        &self,
        plain: &[(&str, i64)],
        keyed: &[Keyed],
        taken_at: chrono::DateTime<chrono::Utc>,
    ) -> Result<u64, BatchError> {
        let mut sums: HashMap<&str, i128> = HashMap::new();
        let items = plain
            .iter()
            .map(|(key, delta)| (*key, *delta))
            .chain(keyed.iter().flat_map(|request| {
                request
                    .items
                    .iter()
                    .map(|(key, delta)| (key.as_str(), *delta))
            }));
        for (key, delta) in items {
            *sums.entry(key).or_insert(0) += i128::from(delta);
        }
        // Never taken, whatever is pending (as in `record_all`).
        if sums.values().any(|sum| i64::try_from(*sum).is_err()) {
            return Err(BatchError::RequestOverflow);
        }
        self.admit_all(sums.keys().copied())?;
        let mut side = self.side.lock();
        // Keyed requests stay whole until written (they are not merged by
        // key), so they count toward the bound as well: otherwise
        // those held while the database is down (no drains) would grow
        // without limit. An empty batcher takes any one request (see
        // `admit_all`).
        let weight = keyed_weight(keyed);
        let held = self.pending_keys();
        if weight > 0 && held > 0 && held.saturating_add(weight) > self.max_pending_keys {
            return Err(BatchError::Full);
        }
        for (key, sum) in &sums {
            let current = side.deltas.get(*key).copied().unwrap_or(0);
            if i64::try_from(current + sum).is_err() {
                return Err(BatchError::DeltaOverflow);
            }
        }
        for (key, sum) in sums {
            side.add(key, sum, &self.handed_over, &self.side_keys);
        }
        side.keyed.extend(keyed.iter().map(|request| Keyed {
            taken_at: request.taken_at.or(Some(taken_at)),
            ..request.clone()
        }));
        side.keyed_weight += weight;
        self.side_keyed_weight
            .store(side.keyed_weight, Ordering::Relaxed);
        let drains = side.drains;
        // Under the side map's lock: a drain cannot take these requests
        // (and a release let go of their keys) before they are held.
        self.held_keys.lock().hold(drains + 1, keyed);
        drop(side);
        self.note_pending();
        Ok(drains + 1)
    }

    fn note_pending(&self) {
        // A load first: the common case (already set) stays a read.
        if self.pending_since.load(Ordering::Relaxed) == 0 {
            let now = u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX - 1) + 1;
            let _ =
                self.pending_since
                    .compare_exchange(0, now, Ordering::Relaxed, Ordering::Relaxed);
        }
    }

    /// What `key` has pending here, or `None` when nothing was recorded since
    /// the last drain. Exact with respect to evictions (the listener moves a
    /// slot's remainder under the same locks). A slot that expired but that
    /// moka's maintenance has not yet handed to the listener still counts
    /// when the index holds it.
    pub fn pending_for(&self, key: &str) -> Option<i128> {
        let slot = self.live_slot(key);
        let side = self.side.lock();
        let mut pending = side.deltas.get(key).copied();
        if let Some(slot) = slot {
            let state = slot.state.lock();
            if state.dirty {
                *pending.get_or_insert(0) += i128::from(state.delta);
            }
        }
        pending
    }

    /// Takes every pending delta: those in the side map and those in live
    /// slots (hot keys keep their slot, emptied in place), and returns them
    /// with this drain's number.
    ///
    /// Runs moka's maintenance first, so expired entries reach the listener;
    /// that can take up to ~100 ms: call it from a blocking context.
    pub fn drain_numbered(&self) -> (Deltas, u64) {
        let (entries, _, number, _) = self.drain_entries();
        // Taken out without a batch to release: the keyed requests are the
        // caller's now.
        self.held_keys.lock().let_go_through(number);
        let mut deltas = Deltas::with_capacity(entries.len());
        for (key, delta) in entries {
            *deltas.entry(key).or_insert(0) += delta;
        }
        (deltas, number)
    }

    /// The drain itself: every delta taken, unsorted, a key possibly twice
    /// (aside and live); [`Batch::new`] sorts and merges. A vector, not a map:
    /// hashing a million keys here cost more than the sort that follows.
    ///
    /// Also returns when the oldest of them was recorded (`pending_since`).
    #[allow(clippy::type_complexity)]
    fn drain_entries(&self) -> (Vec<(String, i128)>, Vec<Keyed>, u64, u64) {
        let since = self.pending_since.swap(0, Ordering::Relaxed);
        self.cache.run_pending_tasks();
        let (side, keyed, number) = {
            let mut side = self.side.lock();
            side.drains += 1;
            side.counted = 0;
            side.keyed_weight = 0;
            self.side_keys.store(0, Ordering::Relaxed);
            self.side_keyed_weight.store(0, Ordering::Relaxed);
            (
                std::mem::take(&mut side.deltas),
                std::mem::take(&mut side.keyed),
                side.drains,
            )
        };
        let dirty = self.dirty_list.lock().take();
        let mut entries = Vec::with_capacity(side.len() + dirty.len());
        entries.extend(side);
        for slot in dirty {
            // A sealed slot was emptied by the listener, and a slot listed
            // twice was emptied the first time: `take` returns None.
            if let Some(delta) = slot.state.lock().take(&slot.key, &self.dirty_slots) {
                entries.push((slot.key.to_string(), i128::from(delta)));
            }
        }
        (entries, keyed, number, since)
    }

    /// [`drain_numbered`](Self::drain_numbered) without the number.
    pub fn drain(&self) -> Deltas {
        self.drain_numbered().0
    }

    /// Drains into a new batch for the flusher, remembered (for the bound)
    /// until [`release`](Self::release). Returns the batch (none when nothing
    /// was pending) and the drain's number. Blocking, like the drain.
    pub fn hand_over(&self) -> (Option<Arc<Batch>>, u64) {
        self.hand_over_holding(|| None)
    }

    /// [`hand_over`](Self::hand_over), the batch holding the journal span
    /// `span` returns (asked only when something was pending).
    pub fn hand_over_holding(
        &self,
        span: impl FnOnce() -> Option<JournalSpan>,
    ) -> (Option<Arc<Batch>>, u64) {
        let (entries, keyed, number, since) = self.drain_entries();
        if entries.is_empty() {
            return (None, number);
        }
        self.handed_over_since.store(since, Ordering::Relaxed);
        // Counted before the batch is built (a sort that can take a while at
        // a million keys), so the bound does not lose them meanwhile: the
        // drain has already taken them out of the live and side counts. A
        // key both live and in the side map counts twice until the batch
        // has merged them.
        let weight = entries.iter().map(|(key, _)| key_weight(key)).sum();
        self.handed_over_keys.store(weight, Ordering::Relaxed);
        self.handed_over_keyed_weight
            .store(keyed_weight(&keyed), Ordering::Relaxed);
        let batch = Batch::new(entries, number).guarding(keyed);
        let batch = Arc::new(match span() {
            Some(span) => batch.holding(span),
            None => batch,
        });
        let weight = batch.deltas.iter().map(|(key, _)| key_weight(key)).sum();
        self.handed_over_keys.store(weight, Ordering::Relaxed);
        *self.handed_over.lock() = Some(Arc::clone(&batch));
        (Some(batch), number)
    }

    /// The last batch handed over and not yet released.
    pub fn handed_over(&self) -> Option<Arc<Batch>> {
        self.handed_over.lock().clone()
    }

    /// Forgets `batch`: it is written, its keys no longer count.
    pub fn release(&self, batch: &Arc<Batch>) {
        let mut handed_over = self.handed_over.lock();
        if handed_over.as_ref().is_some_and(|b| Arc::ptr_eq(b, batch)) {
            self.held_keys.lock().let_go_through(batch.drain);
            *handed_over = None;
            self.handed_over_keys.store(0, Ordering::Relaxed);
            self.handed_over_keyed_weight.store(0, Ordering::Relaxed);
            self.handed_over_since.store(0, Ordering::Relaxed);
        }
    }

    /// Moves every slot out of the cache through the listener, so that the next
    /// [`drain`](Self::drain) returns everything, including entries that
    /// expired but were not yet removed (which `iter` skips). Call it when no
    /// request can record any more (shutdown). Blocking.
    pub fn seal_all(&self) {
        self.cache.invalidate_all();
        // One maintenance run is bounded (time and batch size): repeat until
        // the cache is empty.
        loop {
            self.cache.run_pending_tasks();
            if self.cache.entry_count() == 0 {
                break;
            }
        }
    }

    /// The fingerprint of the first request held here (not yet written)
    /// with the `Idempotency-Key` `key`, if any.
    pub fn held_request(&self, key: &str) -> Option<i64> {
        self.held_keys
            .lock()
            .by_key
            .get(key)
            .map(|(fingerprint, _)| *fingerprint)
    }

    /// What the bound counts, each key by its [`key_weight`] (so a short key
    /// counts one): distinct keys holding a pending delta (the
    /// batch handed over, plus live slots and side-map entries whose key it
    /// did not hold when they got their first delta), plus the items of
    /// requests with an `Idempotency-Key`, which are held whole until
    /// written. Approximate both ways, by little: a key both live and in
    /// the side map counts twice; a key that was handed over, became live
    /// again, and whose batch was then released is not counted until the
    /// next drain (one flush interval). Lock-free: atomic loads.
    pub fn pending_keys(&self) -> u64 {
        self.dirty_slots.load(Ordering::Relaxed)
            + self.side_keys.load(Ordering::Relaxed)
            + self.handed_over_keys.load(Ordering::Relaxed)
            + self.side_keyed_weight.load(Ordering::Relaxed)
            + self.handed_over_keyed_weight.load(Ordering::Relaxed)
    }

    /// Age of the oldest delta not yet written: recorded since the last
    /// drain, or in the batch handed over and not yet released.
    pub fn oldest_pending_age(&self) -> Option<Duration> {
        let oldest = [&self.pending_since, &self.handed_over_since]
            .into_iter()
            .map(|since| since.load(Ordering::Relaxed))
            .filter(|&since| since != 0)
            .min()?;
        Some(
            self.epoch
                .elapsed()
                .saturating_sub(Duration::from_nanos(oldest - 1)),
        )
    }

    /// Evictions by cause since start.
    pub fn evictions(&self) -> EvictionCounts {
        *self.evictions.lock()
    }
}

impl Sampled for Batcher {
    fn sample(&self, metrics: &Metrics) {
        metrics
            .pending_keys
            .set(i64::try_from(self.pending_keys()).unwrap_or(i64::MAX));
        metrics.oldest_pending_age_seconds.set(
            self.oldest_pending_age()
                .map_or(0.0, |age| age.as_secs_f64()),
        );
        let evictions = self.evictions();
        let by_cause = &metrics.cache_evictions_total;
        metrics::raise_to(&by_cause.with_label_values(&["size"]), evictions.size);
        metrics::raise_to(&by_cause.with_label_values(&["expired"]), evictions.expired);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batcher(capacity: u64, ttl: Duration) -> Batcher {
        Batcher::new(NonZeroU64::new(capacity).expect("non-zero"), ttl)
    }

    /// Keyed requests are kept whole until written, so each item counts
    /// toward the bound, in the side map and in the batch handed over until
    /// it is released; otherwise a database outage (no drains) would let
    /// them grow without limit.
    #[test]
    fn keyed_requests_count_toward_the_bound_until_written() {
        let b = Batcher::with_max_pending_keys(
            NonZeroU64::new(100).expect("non-zero"),
            Duration::from_secs(60),
            5,
        );
        let request = |key: &str| Keyed {
            key: key.to_owned(),
            fingerprint: 1,
            items: vec![("a".to_owned(), 1)],
            taken_at: None,
        };
        b.record_keyed(&[], &[request("k1")], chrono::Utc::now())
            .unwrap();
        b.record_keyed(&[], &[request("k2")], chrono::Utc::now())
            .unwrap();
        // "a" once, and two keyed requests of an item and a key each: the
        // bound of 5 is reached.
        assert_eq!(b.pending_keys(), 5);
        assert_eq!(
            b.record_keyed(&[], &[request("k3")], chrono::Utc::now()),
            Err(BatchError::Full)
        );
        let (batch, _) = b.hand_over();
        let batch = batch.expect("a batch");
        assert_eq!(
            b.record_keyed(&[], &[request("k3")], chrono::Utc::now()),
            Err(BatchError::Full),
            "handed over, not yet written"
        );
        b.release(&batch);
        b.record_keyed(&[], &[request("k3")], chrono::Utc::now())
            .unwrap();
        drop(b.drain());
        assert_eq!(b.pending_keys(), 0);
        // An empty batcher takes one request over the bound (a journal
        // message must never be refused for good); then nothing more.
        let large = Keyed {
            key: "large".to_owned(),
            fingerprint: 2,
            items: (0..5).map(|i| (format!("key-{i}"), 1)).collect(),
            taken_at: None,
        };
        b.record_keyed(&[], std::slice::from_ref(&large), chrono::Utc::now())
            .unwrap();
        assert_eq!(
            b.record_keyed(&[], &[request("k4")], chrono::Utc::now()),
            Err(BatchError::Full)
        );
    }

    /// A keyed request's `Idempotency-Key` is held from its record until
    /// the batch that carries it is released (written), or until a drain
    /// that hands over no batch takes it.
    #[test]
    fn a_keyed_request_is_held_until_its_batch_is_released() {
        let b = batcher(100, Duration::from_secs(60));
        let request = |key: &str, fingerprint: i64| Keyed {
            key: key.to_owned(),
            fingerprint,
            items: vec![("a".to_owned(), 1)],
            taken_at: None,
        };
        b.record_keyed(&[], &[request("k1", 7)], chrono::Utc::now())
            .unwrap();
        assert_eq!(b.held_request("k1"), Some(7));
        assert_eq!(b.held_request("k2"), None);
        let (batch, _) = b.hand_over();
        let batch = batch.expect("a batch");
        assert_eq!(b.held_request("k1"), Some(7), "handed over, not written");
        // Recorded again meanwhile (a repeat): held by the next drain too.
        b.record_keyed(
            &[],
            &[request("k1", 7), request("k2", 8)],
            chrono::Utc::now(),
        )
        .unwrap();
        b.release(&batch);
        assert_eq!(b.held_request("k1"), Some(7), "its repeat is still held");
        assert_eq!(b.held_request("k2"), Some(8));
        drop(b.drain());
        assert_eq!(b.held_request("k1"), None);
        assert_eq!(b.held_request("k2"), None);
        assert!(b.held_keys.lock().by_drain.is_empty());
        // Many held (a backlog), then written: the table gives its memory back.
        let many: Vec<Keyed> = (0..10_000).map(|i| request(&format!("m{i}"), i)).collect();
        b.record_keyed(&[], &many, chrono::Utc::now()).unwrap();
        assert!(b.held_keys.lock().by_key.capacity() >= 10_000);
        drop(b.drain());
        assert!(b.held_keys.lock().by_key.capacity() <= 1024 * 2);
    }

    /// A keyed request is held whole until written, its `Idempotency-Key`
    /// too: the key counts toward the bound by its length, like a counter
    /// key (a 255-byte one weighs 4), besides the request's items.
    #[test]
    fn a_keyed_request_counts_its_own_key_toward_the_bound() {
        let b = bounded(10);
        let request = |key: String| Keyed {
            key,
            fingerprint: 1,
            items: vec![("a".to_owned(), 1)],
            taken_at: None,
        };
        b.record_keyed(&[], &[request("k".repeat(255))], chrono::Utc::now())
            .unwrap();
        // The item once in the side map, the request's item and its key.
        assert_eq!(b.pending_keys(), 1 + 1 + 4);
        b.record_keyed(&[], &[request("u".repeat(36))], chrono::Utc::now())
            .unwrap();
        assert_eq!(b.pending_keys(), 6 + 1 + 1);
        assert_eq!(
            b.record_keyed(&[], &[request("x".repeat(255))], chrono::Utc::now()),
            Err(BatchError::Full),
            "8 held, 5 more would pass the bound of 10"
        );
        drop(b.drain());
        assert_eq!(b.pending_keys(), 0);
    }

    /// Without drains (the database down), keys that keep leaving and
    /// re-entering a small cache leave stale entries in the dirty list; they
    /// are dropped as it grows, and nothing pending is lost.
    #[test]
    fn the_dirty_list_stays_bounded_without_drains_and_loses_nothing() {
        let b = batcher(16, Duration::from_secs(60));
        let keys = 1_000;
        let rounds = 300;
        for round in 0..rounds {
            for key in 0..keys {
                b.record(&format!("k{key}"), 1).expect("recorded");
            }
            if round % 50 == 0 {
                b.cache.run_pending_tasks();
            }
        }
        let listed = b.dirty_list.lock().entries.len();
        assert!(
            listed <= 2 * DirtyList::MIN_COMPACT + keys,
            "{listed} entries for {keys} keys"
        );
        let drained = b.drain();
        assert_eq!(drained.len(), keys);
        assert!(drained.values().all(|total| *total == rounds));
        assert!(b.dirty_list.lock().entries.is_empty());
    }

    /// The index never keeps a slot the cache let go: once the cache's
    /// maintenance has run (one thread here), it maps exactly the slots of
    /// the cache's pages, so it is bounded by the cache's capacity; after
    /// `seal_all` it is empty. With one key per page (a small cache) and
    /// with pages of [`PAGE_KEYS`].
    #[test]
    fn the_index_holds_what_the_cache_holds_and_no_more() {
        for (capacity, keys) in [(64, 1_000), (64 * PAGE_KEYS * 4, 20_000)] {
            let b = batcher(capacity, Duration::from_secs(60));
            for round in 0..20 {
                for key in 0..keys {
                    b.record(&format!("k{}", (key * 7 + round) % keys), 1)
                        .expect("recorded");
                }
            }
            b.cache.run_pending_tasks();
            assert!(
                b.cache.weighted_size() <= capacity,
                "{} in a cache of {capacity}",
                b.cache.weighted_size()
            );
            let mut cached = 0;
            for (_, page) in b.cache.iter() {
                for slot in page.slots() {
                    cached += 1;
                    let indexed = b
                        .index
                        .get(b.index.hash(&slot.key), &slot.key)
                        .expect("indexed");
                    assert!(
                        Arc::ptr_eq(&indexed, &slot),
                        "{}: the cache's own slot",
                        slot.key
                    );
                }
            }
            assert!(
                cached as u64 <= capacity,
                "{cached} keys in a cache of {capacity}"
            );
            assert_eq!(b.index.len(), cached);
            b.seal_all();
            assert_eq!(b.index.len(), 0);
            let drained = b.drain();
            assert_eq!(
                drained.values().sum::<i128>(),
                20 * i128::from(keys),
                "nothing lost"
            );
        }
    }

    /// Pages of several keys: a page leaves the cache whole, by size or by
    /// age, and every delta of its keys moves aside; a key made again after
    /// its page left joins another page.
    #[test]
    fn keys_leave_the_cache_with_their_page_and_lose_nothing() {
        let capacity = 64 * PAGE_KEYS;
        assert_eq!(page_room(capacity), PAGE_KEYS);
        let b = batcher(capacity, Duration::from_millis(20));
        let mut recorded = 0;
        for round in 0..30 {
            for key in 0..3_000 {
                b.record(&format!("k{}", (key * 13 + round) % 3_000), 1)
                    .expect("recorded");
                recorded += 1;
            }
            if round % 10 == 9 {
                std::thread::sleep(Duration::from_millis(25));
            }
        }
        let evictions = b.evictions();
        assert!(evictions.size > 0 && evictions.expired > 0, "{evictions:?}");
        let mut total = b.drain().values().sum::<i128>();
        b.seal_all();
        total += b.drain().values().sum::<i128>();
        assert_eq!(total, recorded);
    }

    /// Keys of mixed lengths fill the cache to its capacity: a key that
    /// does not fit the open page gets a page of its own, weighing just
    /// that key, and the open page stays open. (Closing it instead left
    /// pages part empty, each weighing its whole room: about half the
    /// capacity held, found by review.)
    #[test]
    fn keys_of_mixed_lengths_fill_the_cache_to_its_capacity() {
        let capacity = 16_384;
        let b = batcher(capacity, Duration::from_secs(60));
        for i in 0..50_000 {
            let key = if i % 2 == 0 {
                format!("short-{i}")
            } else {
                format!("{i:0>600}")
            };
            b.record(&key, 1).expect("recorded");
        }
        b.cache.run_pending_tasks();
        let held: u64 = b
            .cache
            .iter()
            .flat_map(|(_, page)| page.slots())
            .map(|slot| key_weight(&slot.key))
            .sum();
        assert!(
            held * 10 >= capacity * 9,
            "keys weighing {held} held in a cache of {capacity}"
        );
        assert!(b.cache.weighted_size() <= capacity);
    }

    /// Writers on several threads, pages sealed by size and by age under
    /// them, and drains at the same time: each delta is drained once.
    #[test]
    fn concurrent_records_under_page_evictions_and_drains_count_once() {
        let b = Arc::new(batcher(64 * PAGE_KEYS, Duration::from_millis(2)));
        let writing = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let drainer = {
            let (b, writing) = (Arc::clone(&b), Arc::clone(&writing));
            std::thread::spawn(move || {
                let mut total: i128 = 0;
                while writing.load(Ordering::SeqCst) {
                    total += b.drain().values().sum::<i128>();
                }
                total
            })
        };
        let writers: Vec<_> = (0..4_i64)
            .map(|w| {
                let b = Arc::clone(&b);
                std::thread::spawn(move || {
                    let mut sent: i128 = 0;
                    for i in 0..40_000_i64 {
                        let key = format!("k{}", (i * 31 + w) % 5_000);
                        if i % 7 == 0 {
                            let other = format!("k{}", (i * 17 + w) % 5_000);
                            b.record_all(&[(&key, 2), (&other, 3)]).expect("recorded");
                            sent += 5;
                        } else {
                            b.record(&key, 1).expect("recorded");
                            sent += 1;
                        }
                    }
                    sent
                })
            })
            .collect();
        let sent: i128 = writers.into_iter().map(|w| w.join().expect("writer")).sum();
        writing.store(false, Ordering::SeqCst);
        let mut drained = drainer.join().expect("drainer");
        b.seal_all();
        drained += b.drain().values().sum::<i128>();
        assert_eq!(drained, sent);
        let evictions = b.evictions();
        assert!(evictions.size + evictions.expired > 0, "{evictions:?}");
    }

    /// A batch handed over to a flush that keeps failing (the database
    /// down) is still pending: its age keeps counting until it is released,
    /// so an outage shows on `oldest_pending_age_seconds` even without new
    /// requests.
    #[test]
    fn a_batch_handed_over_stays_pending_until_released() {
        let b = batcher(100, Duration::from_secs(60));
        b.record("a", 1).unwrap();
        let recorded_age = b.oldest_pending_age().expect("pending");
        let (batch, _) = b.hand_over();
        let batch = batch.expect("a batch");
        let handed_over_age = b.oldest_pending_age().expect("still pending");
        assert!(handed_over_age >= recorded_age, "counted from the record");
        b.record("b", 1).unwrap();
        assert!(
            b.oldest_pending_age().expect("pending") >= handed_over_age,
            "the older of the two"
        );
        b.release(&batch);
        let newer = b.oldest_pending_age().expect("b is pending");
        assert!(newer <= b.epoch.elapsed());
        let _ = b.hand_over();
        let (next, _) = b.hand_over();
        assert!(next.is_none());
        b.release(&b.handed_over().expect("b's batch"));
        assert_eq!(b.oldest_pending_age(), None);
    }

    #[test]
    fn drain_sums_per_key_and_empties() {
        let b = batcher(100, Duration::from_secs(60));
        b.record("a", 5).unwrap();
        b.record("a", -2).unwrap();
        b.record("b", 0).unwrap();
        let drained = b.drain();
        assert_eq!(drained.get("a"), Some(&3));
        assert_eq!(
            drained.get("b"),
            Some(&0),
            "a zero increment is still written"
        );
        assert!(b.drain().is_empty());
    }

    #[test]
    fn overflow_is_refused_and_changes_nothing() {
        let b = batcher(100, Duration::from_secs(60));
        b.record("k", i64::MAX).unwrap();
        assert_eq!(b.record("k", 1), Err(BatchError::DeltaOverflow));
        assert_eq!(b.drain().get("k"), Some(&i128::from(i64::MAX)));
        // After the drain the slot is empty again and accepts more.
        b.record("k", i64::MAX).unwrap();
        b.record("k", i64::MIN).unwrap();
        assert_eq!(b.drain().get("k"), Some(&-1));
    }

    #[test]
    fn evicted_deltas_are_kept_with_sums_beyond_i64() {
        let b = batcher(1, Duration::from_secs(60));
        b.record("k", i64::MAX).unwrap();
        b.seal_all();
        b.record("k", i64::MAX).unwrap();
        assert_eq!(b.drain().get("k"), Some(&(2 * i128::from(i64::MAX))));
    }

    #[test]
    fn size_evictions_and_expiry_lose_nothing() {
        let b = batcher(10, Duration::from_millis(1));
        for i in 0..1_000 {
            b.record(&format!("k{}", i % 100), 1).unwrap();
        }
        std::thread::sleep(Duration::from_millis(5));
        let mut total: i128 = 0;
        loop {
            let drained = b.drain();
            if drained.is_empty() {
                break;
            }
            total += drained.values().sum::<i128>();
        }
        b.seal_all();
        total += b.drain().values().sum::<i128>();
        assert_eq!(total, 1_000);
        let evictions = b.evictions();
        assert!(evictions.size + evictions.expired > 0, "{evictions:?}");
    }

    #[test]
    fn pending_keys_is_exact_between_drains() {
        let b = batcher(2, Duration::from_secs(60));
        assert_eq!(b.pending_keys(), 0);
        b.record("a", 1).unwrap();
        b.record("a", 1).unwrap();
        b.record("b", 1).unwrap();
        assert_eq!(b.pending_keys(), 2);
        b.seal_all();
        assert_eq!(b.pending_keys(), 2, "moved aside, still pending");
        b.drain();
        assert_eq!(b.pending_keys(), 0);
    }

    #[test]
    fn record_all_is_all_or_nothing() {
        let b = batcher(100, Duration::from_secs(60));
        b.record("full", i64::MAX - 1).unwrap();
        let err = b.record_all(&[("a", 1), ("full", 1), ("full", 1), ("b", 2)]);
        assert_eq!(
            err,
            Err((2, BatchError::DeltaOverflow)),
            "names the key's last item"
        );
        assert_eq!(
            b.pending_for("a"),
            None,
            "nothing of the batch was recorded"
        );
        b.record_all(&[("a", 1), ("b", 2), ("a", 3), ("full", 1)])
            .unwrap();
        assert_eq!(b.pending_for("a"), Some(4));
        assert_eq!(b.pending_for("full"), Some(i128::from(i64::MAX)));
        // The request's own sum for a key: it could never fit.
        let big = [("x", i64::MAX), ("x", i64::MAX)];
        assert_eq!(b.record_all(&big), Err((1, BatchError::RequestOverflow)));
        // The same through keyed requests (a journal message another
        // publisher wrote): it was `DeltaOverflow`, "retry after a flush",
        // and the journal's reader retried it for good (found by review).
        let keyed = |key: &str| Keyed {
            key: key.to_owned(),
            fingerprint: 1,
            items: vec![("x".to_owned(), i64::MAX)],
            taken_at: None,
        };
        assert_eq!(
            b.record_keyed(&[], &[keyed("k1"), keyed("k2")], chrono::Utc::now()),
            Err(BatchError::RequestOverflow)
        );
        assert_eq!(
            b.record_keyed(&[("x", 1)], &[keyed("k1")], chrono::Utc::now()),
            Err(BatchError::RequestOverflow)
        );
    }

    #[test]
    fn record_all_larger_than_the_cache_loses_nothing() {
        let b = batcher(2, Duration::from_secs(60));
        let keys: Vec<String> = (0..500).map(|i| format!("k{i}")).collect();
        let items: Vec<(&str, i64)> = keys.iter().map(|k| (k.as_str(), 1)).collect();
        for _ in 0..3 {
            b.record_all(&items).unwrap();
        }
        b.seal_all();
        let drained = b.drain();
        assert_eq!(drained.len(), 500);
        assert!(drained.values().all(|v| *v == 3));
    }

    #[test]
    fn pending_for_sees_live_and_evicted_deltas() {
        let b = batcher(100, Duration::from_secs(60));
        assert_eq!(b.pending_for("k"), None);
        b.record("k", 0).unwrap();
        assert_eq!(b.pending_for("k"), Some(0), "a zero increment is pending");
        b.record("k", 5).unwrap();
        b.seal_all();
        b.record("k", 2).unwrap();
        assert_eq!(b.pending_for("k"), Some(7));
        b.drain();
        assert_eq!(b.pending_for("k"), None);
    }

    #[test]
    fn new_keys_are_refused_at_the_bound_and_held_keys_still_merge() {
        let b = Batcher::with_max_pending_keys(
            NonZeroU64::new(100).unwrap(),
            Duration::from_secs(60),
            2,
        );
        b.record("a", 1).unwrap();
        b.record("b", 1).unwrap();
        assert_eq!(b.record("c", 1), Err(BatchError::Full));
        assert_eq!(b.record_durable("c", 1), Err(BatchError::Full));
        assert_eq!(
            b.record_all(&[("a", 1), ("c", 1)]),
            Err((0, BatchError::Full))
        );
        b.record("a", 5).unwrap();
        b.record_all(&[("a", 1), ("b", 1)]).unwrap();
        // Handed over but not released: the keys still count and still merge.
        let (batch, _) = b.hand_over();
        let batch = batch.unwrap();
        assert_eq!(b.record("c", 1), Err(BatchError::Full));
        b.record("a", 1).unwrap();
        assert_eq!(
            b.pending_keys(),
            2,
            "a key handed over and live counts once"
        );
        b.release(&batch);
        // Until the next drain the live "a" is not counted (it was handed over
        // when it became dirty): the bound is soft by such keys.
        let (next, _) = b.hand_over();
        assert_eq!(next.unwrap().deltas, vec![("a".to_owned(), 1)]);
        assert_eq!(b.pending_keys(), 1);
        b.record("c", 1).unwrap();
    }

    /// A batcher taking at most `max_pending_keys` of weight.
    fn bounded(max_pending_keys: u64) -> Batcher {
        Batcher::with_max_pending_keys(
            NonZeroU64::new(1_000).expect("non-zero"),
            Duration::from_secs(60),
            max_pending_keys,
        )
    }

    /// A key of `units` weight: `units` - 1 full units of bytes.
    fn long_key(name: char, units: usize) -> String {
        std::iter::repeat_n(name, (units - 1) * KEY_UNIT_BYTES).collect()
    }

    #[test]
    fn a_long_key_counts_toward_the_bound_by_its_length() {
        assert_eq!(key_weight("page:/home"), 1);
        assert_eq!(key_weight(&"x".repeat(KEY_UNIT_BYTES - 1)), 1);
        assert_eq!(key_weight(&"x".repeat(KEY_UNIT_BYTES)), 2);
        // 255 four-byte characters, the longest key the API takes.
        assert_eq!(key_weight(&"😀".repeat(255)), 16);
        let b = bounded(10);
        let (a, c) = (long_key('a', 5), long_key('c', 5));
        b.record(&a, 1).unwrap();
        b.record_durable(&long_key('b', 5), 1).unwrap();
        assert_eq!(b.pending_keys(), 10);
        assert_eq!(b.record("short", 1), Err(BatchError::Full));
        assert_eq!(b.record_all(&[(&c, 1)]), Err((0, BatchError::Full)));
        b.record(&a, 2).unwrap();
        let (batch, _) = b.hand_over();
        assert_eq!(b.pending_keys(), 10, "handed over, by weight");
        b.release(&batch.unwrap());
        assert_eq!(b.pending_keys(), 0);
        b.record_all(&[(&a, 1), (&c, 1)]).unwrap();
        assert_eq!(b.pending_keys(), 10);
        b.drain();
        assert_eq!(b.pending_keys(), 0, "every weight leaves with its key");
    }

    #[test]
    fn one_key_and_a_batch_of_it_are_admitted_alike_by_weight() {
        let b = bounded(10);
        for i in 0..9 {
            b.record(&format!("s{i}"), 1).unwrap();
        }
        let long = long_key('l', 16);
        assert_eq!(b.record(&long, 1), Err(BatchError::Full));
        assert_eq!(b.record_durable(&long, 1), Err(BatchError::Full));
        assert_eq!(b.record_all(&[(&long, 1)]), Err((0, BatchError::Full)));
        assert_eq!(b.pending_keys(), 9);
        b.record("s9", 1).unwrap();
        assert_eq!(b.record("s10", 1), Err(BatchError::Full));
        // An empty batcher takes any key, however heavy.
        let empty = bounded(10);
        empty.record(&long, 1).unwrap();
        assert_eq!(empty.pending_keys(), 16);
    }

    #[test]
    fn a_long_key_that_keeps_leaving_the_cache_does_not_pin_its_old_slots() {
        // Heavier than the whole cache: every maintenance run seals its slot
        // and the next record makes a new one, listed as dirty again.
        let b = batcher(1, Duration::from_secs(60));
        let long = "😀".repeat(255);
        for _ in 0..20_000 {
            b.record(&long, 1).unwrap();
            b.cache.run_pending_tasks();
        }
        let pinned: usize = b
            .dirty_list
            .lock()
            .entries
            .iter()
            .map(|slot| slot.key.len())
            .sum();
        assert!(
            pinned <= 2 * DirtyList::MIN_COMPACT_BYTES,
            "{pinned} key bytes listed"
        );
        assert_eq!(b.drain().get(&long), Some(&20_000));
    }

    #[test]
    fn the_cache_holds_long_keys_by_weight_and_moves_the_rest_aside() {
        // Room for two keys of weight 5; eight recorded: the others leave
        // the cache (through the listener, into the side map), none is lost.
        let b = batcher(10, Duration::from_secs(60));
        let keys: Vec<String> = "abcdefgh".chars().map(|c| long_key(c, 5)).collect();
        for key in &keys {
            b.record(key, 3).unwrap();
        }
        b.cache.run_pending_tasks();
        assert!(b.cache.weighted_size() <= 10, "{}", b.cache.weighted_size());
        assert!(b.evictions().size > 0, "sized out by weight");
        let drained = b.drain();
        assert_eq!(drained.len(), keys.len());
        assert!(drained.values().all(|&delta| delta == 3));
    }

    #[test]
    fn a_durable_record_is_in_the_drain_its_ticket_names() {
        let b = batcher(100, Duration::from_secs(60));
        let (_, first) = b.drain_numbered();
        let ticket = b.record_durable("d", 4).unwrap();
        assert_eq!(ticket, first + 1);
        b.record("d", 1).unwrap();
        let (deltas, number) = b.drain_numbered();
        assert_eq!(number, ticket);
        assert_eq!(deltas.get("d"), Some(&5));
        assert_eq!(b.record_durable("big", i64::MAX).unwrap(), ticket + 1);
        assert_eq!(b.record_durable("big", 1), Err(BatchError::DeltaOverflow));
    }
}
