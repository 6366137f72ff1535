//! Property tests of the batcher's arithmetic: whatever the sequence of
//! records, batch records, durable records, drains and forced
//! evictions, and however small the cache, what comes out equals what went in,
//! key by key, and a refused record changes nothing.

use std::{collections::HashMap, num::NonZeroU64, time::Duration};

use api::{Batcher, batcher::BatchError};
use proptest::prelude::*;

#[derive(Debug, Clone)]
enum Op {
    Record(u8, i64),
    RecordAll(Vec<(u8, i64)>),
    RecordDurable(u8, i64),
    Drain,
    SealAll,
}

fn value() -> impl Strategy<Value = i64> {
    prop_oneof![
        8 => -1_000i64..=1_000,
        1 => Just(i64::MAX),
        1 => Just(i64::MIN),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0u8..12, value()).prop_map(|(k, v)| Op::Record(k, v)),
        2 => prop::collection::vec((0u8..12, value()), 1..6).prop_map(Op::RecordAll),
        1 => (0u8..12, value()).prop_map(|(k, v)| Op::RecordDurable(k, v)),
        1 => Just(Op::Drain),
        1 => Just(Op::SealAll),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn what_comes_out_equals_what_went_in(capacity in prop_oneof![1u64..5, 128u64..200], ops in prop::collection::vec(op(), 1..80)) {
        let batcher = Batcher::new(NonZeroU64::new(capacity).unwrap(), Duration::from_secs(3600));
        let mut recorded: HashMap<String, i128> = HashMap::new();
        let mut drained: HashMap<String, i128> = HashMap::new();
        let key = |k: u8| format!("k{k}");
        for op in ops {
            match op {
                Op::Record(k, v) => match batcher.record(&key(k), v) {
                    Ok(()) => *recorded.entry(key(k)).or_insert(0) += i128::from(v),
                    Err(e) => prop_assert_eq!(e, BatchError::DeltaOverflow),
                },
                Op::RecordAll(items) => {
                    let keys: Vec<String> = items.iter().map(|(k, _)| key(*k)).collect();
                    let refs: Vec<(&str, i64)> = keys.iter().map(String::as_str).zip(items.iter().map(|(_, v)| *v)).collect();
                    if batcher.record_all(&refs).is_ok() {
                        for (k, v) in refs {
                            *recorded.entry(k.to_owned()).or_insert(0) += i128::from(v);
                        }
                    }
                }
                Op::RecordDurable(k, v) => {
                    if batcher.record_durable(&key(k), v).is_ok() {
                        *recorded.entry(key(k)).or_insert(0) += i128::from(v);
                    }
                }
                Op::Drain => {
                    for (k, v) in batcher.drain() {
                        *drained.entry(k).or_insert(0) += v;
                    }
                }
                Op::SealAll => batcher.seal_all(),
            }
        }
        batcher.seal_all();
        for (k, v) in batcher.drain() {
            *drained.entry(k).or_insert(0) += v;
        }
        recorded.retain(|_, v| *v != 0);
        drained.retain(|_, v| *v != 0);
        prop_assert_eq!(drained, recorded);
    }
}
