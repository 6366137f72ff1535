//! A batch: the deltas of one drain, keys unique and sorted, split into
//! parts that each commit on their own under their own id.
//!
//! Ids are what make a write exactly-once: a part's id is recorded in
//! `flush_batches` in the transaction that applies its rows, so a retry of
//! the same part (after an error during COMMIT, or after a restart that
//! replayed a spill file) finds it and writes nothing. A batch's ids and part
//! boundaries are therefore fixed when it is made, and kept across retries
//! and spills.

/// Rows per part of a batch. A part is written in its own transaction under
/// its own id, so a large flush can use several connections at once (one
/// backend per part) and still write each part exactly once. Part boundaries
/// are fixed when the batch is made and kept across retries and spills.
pub const PART_ROWS: usize = 50_000;

/// One part of a batch: rows `start..end` of its deltas, written under `id`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Part {
    /// Recorded in `flush_batches` with the part's upserts.
    pub id: String,
    pub start: usize,
    pub end: usize,
}

/// Deltas to write, keys unique and sorted, split into parts of at most
/// [`PART_ROWS`] rows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    /// Names the batch in logs; also the id of its first part.
    pub id: String,
    /// The number of the drain that produced it (0 when not from a drain).
    pub drain: u64,
    pub deltas: Vec<(String, i128)>,
    pub parts: Vec<Part>,
    /// With the journal on: the journal messages whose deltas this batch
    /// holds. The batch is then one part, and its transaction also moves the
    /// stream's applied offset (see `store::write_batch`).
    pub journal: Option<JournalSpan>,
    /// Requests that carried an `Idempotency-Key`. Their items are included
    /// in `deltas`; the transaction subtracts those of a request whose key
    /// was already applied. A batch holding any is one part (the keys and
    /// the rows they guard commit together).
    pub keyed: Vec<Keyed>,
}

/// One request that carried an `Idempotency-Key`: applied only if no other
/// request with that key was applied within the window.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Keyed {
    /// The client's key, as validated at the edge.
    pub key: String,
    /// A digest of the request (operation and items): a key reused with
    /// another body is told apart by it.
    pub fingerprint: i64,
    /// The request's increments, summed per counter key.
    pub items: Vec<(String, i64)>,
    /// When it was taken (stamped by the batcher; in journal mode, when
    /// the stream stored its message). Its window is counted back from
    /// this, not from the write: a write delayed past the window (a
    /// database outage, a spill file replayed late, a journal backlog)
    /// still finds the key it was sent within the window of. `None`: the
    /// write's time.
    pub taken_at: Option<chrono::DateTime<chrono::Utc>>,
}

/// The journal messages a batch holds: every message of `stream` with a
/// sequence in `after + 1 ..= through`, and no other.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JournalSpan {
    pub stream: String,
    /// The stream's applied offset the batch continues from.
    pub after: u64,
    /// The last sequence it holds.
    pub through: u64,
}

impl Batch {
    /// A batch with fresh ids; sorts the keys and sums the deltas of a key
    /// given more than once.
    pub fn new(deltas: impl IntoIterator<Item = (String, i128)>, drain: u64) -> Self {
        let mut deltas: Vec<(String, i128)> = deltas.into_iter().collect();
        deltas.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        deltas.dedup_by(|later, kept| {
            let same = later.0 == kept.0;
            if same {
                kept.1 += later.1;
            }
            same
        });
        let id = uuid::Uuid::new_v4().to_string();
        let parts = (0..deltas.len())
            .step_by(PART_ROWS)
            .map(|start| Part {
                id: if start == 0 {
                    id.clone()
                } else {
                    uuid::Uuid::new_v4().to_string()
                },
                start,
                end: (start + PART_ROWS).min(deltas.len()),
            })
            .collect();
        Self {
            id,
            drain,
            deltas,
            parts,
            journal: None,
            keyed: Vec::new(),
        }
    }

    /// This batch with the keyed requests whose items its deltas include:
    /// one part, so the keys commit with the rows they guard.
    #[must_use]
    pub fn guarding(mut self, keyed: Vec<Keyed>) -> Self {
        if !keyed.is_empty() {
            self.parts = vec![Part {
                id: self.id.clone(),
                start: 0,
                end: self.deltas.len(),
            }];
            self.keyed = keyed;
        }
        self
    }

    /// This batch as the holder of `span`'s journal messages: one part,
    /// because the offset moves in the transaction of that part; a crash
    /// between two parts would otherwise leave the first applied and the
    /// messages read again.
    #[must_use]
    pub fn holding(mut self, span: JournalSpan) -> Self {
        self.parts = vec![Part {
            id: self.id.clone(),
            start: 0,
            end: self.deltas.len(),
        }];
        self.journal = Some(span);
        self
    }

    /// A batch of one part under a known id (a part read back from a spill
    /// file), whatever its size.
    pub fn restored(id: String, deltas: impl IntoIterator<Item = (String, i128)>) -> Self {
        let mut batch = Self::new(deltas, 0);
        batch.parts = vec![Part {
            id: id.clone(),
            start: 0,
            end: batch.deltas.len(),
        }];
        batch.id = id;
        batch
    }

    pub fn len(&self) -> usize {
        self.deltas.len()
    }

    pub fn is_empty(&self) -> bool {
        self.deltas.is_empty()
    }

    /// The delta of `key` in this batch (keys are sorted).
    pub fn delta_for(&self, key: &str) -> Option<i128> {
        self.index_of(key).map(|index| self.deltas[index].1)
    }

    /// The part holding `key` and its delta there.
    pub fn part_for(&self, key: &str) -> Option<(&Part, i128)> {
        let index = self.index_of(key)?;
        let part = self
            .parts
            .iter()
            .find(|p| (p.start..p.end).contains(&index))?;
        Some((part, self.deltas[index].1))
    }

    fn index_of(&self, key: &str) -> Option<usize> {
        self.deltas
            .binary_search_by(|(k, _)| k.as_str().cmp(key))
            .ok()
    }

    /// The rows of `part`.
    pub fn rows(&self, part: &Part) -> &[(String, i128)] {
        &self.deltas[part.start..part.end]
    }

    /// Sum of all deltas (for logs when a batch cannot be written).
    pub fn total(&self) -> i128 {
        self.deltas.iter().map(|(_, d)| d).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_merge_repeated_keys_and_split_into_parts() {
        let keys = PART_ROWS * 2 + 3;
        let batch = Batch::new(
            (0..keys)
                .rev()
                .map(|i| (format!("k{i:08}"), 1))
                .chain([("k00000007".to_owned(), 4)]),
            9,
        );
        assert_eq!(batch.len(), keys, "a repeated key is one row");
        assert_eq!(batch.delta_for("k00000007"), Some(5));
        assert!(batch.deltas.windows(2).all(|w| w[0].0 < w[1].0));
        let bounds: Vec<(usize, usize)> = batch.parts.iter().map(|p| (p.start, p.end)).collect();
        assert_eq!(
            bounds,
            vec![
                (0, PART_ROWS),
                (PART_ROWS, 2 * PART_ROWS),
                (2 * PART_ROWS, keys)
            ]
        );
        assert_eq!(batch.parts[0].id, batch.id);
        let ids: std::collections::HashSet<&str> =
            batch.parts.iter().map(|p| p.id.as_str()).collect();
        assert_eq!(ids.len(), 3, "every part has its own id");
        let last = format!("k{:08}", keys - 1);
        let (part, delta) = batch.part_for(&last).expect("the last key");
        assert_eq!((part.id.as_str(), delta), (batch.parts[2].id.as_str(), 1));
        assert!(batch.part_for("absent").is_none());

        let restored = Batch::restored("spilled".to_owned(), batch.deltas.clone());
        assert_eq!(restored.parts.len(), 1, "a restored part stays whole");
        assert_eq!(restored.parts[0].id, "spilled");
        assert_eq!(restored.rows(&restored.parts[0]).len(), keys);
    }
}
