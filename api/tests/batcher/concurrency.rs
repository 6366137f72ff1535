//! The batcher's arithmetic under adversarial concurrency: writers on hot and
//! cold keys, a drainer running continuously, a cache so small and short-lived
//! that entries are evicted and expire all the time. Key by key, what was
//! drained must equal what was recorded.

use std::{
    collections::HashMap,
    num::NonZeroU64,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::Duration,
};

use api::Batcher;
use rand::Rng;

const WRITERS: usize = 4;
const OPS_PER_WRITER: usize = 150_000;

fn stress(capacity: u64, ttl: Duration) {
    let batcher = Arc::new(Batcher::new(NonZeroU64::new(capacity).unwrap(), ttl));
    let writing = Arc::new(AtomicBool::new(true));

    let drainer = {
        let batcher = Arc::clone(&batcher);
        let writing = Arc::clone(&writing);
        thread::spawn(move || {
            let mut drained: HashMap<String, i128> = HashMap::new();
            let mut drains = 0u64;
            while writing.load(Ordering::SeqCst) {
                for (key, delta) in batcher.drain() {
                    *drained.entry(key).or_insert(0) += delta;
                }
                drains += 1;
            }
            (drained, drains)
        })
    };

    let writers: Vec<_> = (0..WRITERS)
        .map(|_| {
            let batcher = Arc::clone(&batcher);
            thread::spawn(move || {
                let mut rng = rand::rng();
                let mut recorded: HashMap<String, i128> = HashMap::new();
                for _ in 0..OPS_PER_WRITER {
                    let key = if rng.random_bool(0.7) {
                        format!("hot-{}", rng.random_range(0..4))
                    } else {
                        format!("cold-{}", rng.random_range(0..5_000))
                    };
                    let delta = rng.random_range(-1_000_000..=1_000_000);
                    batcher
                        .record(&key, delta)
                        .expect("no overflow at this range");
                    *recorded.entry(key).or_insert(0) += i128::from(delta);
                }
                recorded
            })
        })
        .collect();

    let mut recorded: HashMap<String, i128> = HashMap::new();
    for writer in writers {
        for (key, delta) in writer.join().unwrap() {
            *recorded.entry(key).or_insert(0) += delta;
        }
    }
    writing.store(false, Ordering::SeqCst);
    let (mut drained, drains) = drainer.join().unwrap();
    assert!(
        drains > 10,
        "drains ran concurrently with the writers ({drains})"
    );

    batcher.seal_all();
    for (key, delta) in batcher.drain() {
        *drained.entry(key).or_insert(0) += delta;
    }
    recorded.retain(|_, v| *v != 0);
    drained.retain(|_, v| *v != 0);
    assert_eq!(drained.len(), recorded.len());
    for (key, expected) in &recorded {
        assert_eq!(drained.get(key), Some(expected), "key {key}");
    }
    let evictions = batcher.evictions();
    assert!(
        evictions.size + evictions.expired > 0,
        "the cache was under pressure: {evictions:?}"
    );
}

#[test]
fn exact_under_size_eviction() {
    stress(50, Duration::from_secs(60));
}

#[test]
fn exact_under_ttl_expiry() {
    stress(100_000, Duration::from_millis(1));
}

#[test]
fn exact_under_eviction_and_expiry_together() {
    stress(16, Duration::from_millis(2));
}

/// The cache holds keys in pages of 16 once it has room for 1,024 keys: a
/// size eviction then seals 16 slots at once under the writers.
#[test]
fn exact_under_size_eviction_of_whole_pages() {
    stress(2_048, Duration::from_secs(60));
}
