//! Micro-benchmarks of `api::Batcher`, the in-memory half of the hot path.
//!
//! - `record/hot_key_2_threads`: two threads adding to one key (the lock
//!   and cache lookup every request pays, under contention);
//! - `record/1m_distinct_keys`: 1,000,000 new keys into a fresh batcher
//!   (slot creation and moka inserts);
//! - `drain/1m_keys`: draining 1,000,000 pending keys (what a flush pays
//!   before it talks to the database).
//!
//! `cargo bench -p bench --bench batcher` (add `-- --quick` for a short run).

use std::{
    hint::black_box,
    num::NonZeroU64,
    sync::{Arc, Barrier},
    thread,
    time::{Duration, Instant},
};

use api::Batcher;
use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};

const DISTINCT: usize = 1_000_000;

fn batcher() -> Batcher {
    Batcher::new(
        NonZeroU64::new(2 * DISTINCT as u64).expect("non-zero"),
        Duration::from_secs(3600),
    )
}

fn keys() -> Vec<String> {
    (0..DISTINCT).map(|i| format!("bench:key:{i}")).collect()
}

fn record_hot_two_threads(c: &mut Criterion) {
    let mut group = c.benchmark_group("record");
    group.throughput(Throughput::Elements(1));
    group.bench_function("hot_key_2_threads", |b| {
        b.iter_custom(|iters| {
            let batcher = Arc::new(batcher());
            let per_thread = iters.div_ceil(2);
            let barrier = Arc::new(Barrier::new(3));
            let workers: Vec<_> = (0..2)
                .map(|_| {
                    let batcher = Arc::clone(&batcher);
                    let barrier = Arc::clone(&barrier);
                    thread::spawn(move || {
                        barrier.wait();
                        for i in 0..per_thread {
                            batcher
                                .record(black_box("page:/home"), black_box((i & 7) as i64 - 3))
                                .expect("in range");
                        }
                    })
                })
                .collect();
            barrier.wait();
            let started = Instant::now();
            for worker in workers {
                worker.join().expect("worker");
            }
            // Wall time for `iters` records done by two threads together.
            started.elapsed()
        });
    });
    group.finish();
}

fn record_distinct(c: &mut Criterion) {
    let keys = keys();
    let mut group = c.benchmark_group("record");
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(20));
    group.throughput(Throughput::Elements(DISTINCT as u64));
    group.bench_function("1m_distinct_keys", |b| {
        b.iter_batched(
            batcher,
            |batcher| {
                for key in &keys {
                    batcher.record(key, 1).expect("in range");
                }
                batcher
            },
            BatchSize::PerIteration,
        );
    });
    group.finish();
}

fn drain(c: &mut Criterion) {
    let keys = keys();
    let mut group = c.benchmark_group("drain");
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(20));
    group.throughput(Throughput::Elements(DISTINCT as u64));
    group.bench_function("1m_keys", |b| {
        b.iter_batched(
            || {
                let batcher = batcher();
                for key in &keys {
                    batcher.record(key, 1).expect("in range");
                }
                batcher
            },
            |batcher| {
                let drained = batcher.drain();
                assert_eq!(drained.len(), DISTINCT);
                (batcher, drained)
            },
            BatchSize::PerIteration,
        );
    });
    group.finish();
}

criterion_group!(benches, record_hot_two_threads, record_distinct, drain);
criterion_main!(benches);
