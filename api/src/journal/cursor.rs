//! Where the journal stands on this instance: which messages the batcher
//! holds, which are applied. Shared by the reader (records messages), the
//! flusher (drains them into batches, learns what committed) and durable
//! requests (wait for their message to be applied).
//!
//! One lock covers recording a message and draining the batcher, so a batch
//! holds exactly the messages its span names: every message up to the last
//! one recorded before the drain, none after.

use std::sync::Arc;

use parking_lot::Mutex;

use crate::{
    batch::{Batch, JournalSpan},
    batcher::{BatchError, Batcher},
    journal::codec::Message,
};

/// Why a message was not recorded.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RecordError {
    /// The batcher cannot take it now (bound or `i64` range); retry after a flush.
    #[error("the batcher cannot take the message now: {0}")]
    Batcher(BatchError),
    /// The reading it belongs to was abandoned (see [`Cursor::abandon`]).
    #[error("the reading was abandoned")]
    Stale,
    /// A drain holds the cursor; try again in a moment (the reader runs on
    /// a request worker, which must not block for a drain).
    #[error("a drain is in progress")]
    Busy,
    /// The message is not past the last one recorded (or the stored offset):
    /// delivered again, as by a consumer that recreated itself from the
    /// stream's start. Recording it would apply it twice; read again from
    /// the stored offset instead.
    #[error("message {sequence} is not past the last one recorded, {recorded}")]
    Behind { sequence: u64, recorded: u64 },
}

struct State {
    /// Counts readings: a reading starts at the stored offset and ends when
    /// abandoned.
    reading: u64,
    /// The last sequence recorded into the batcher.
    recorded: u64,
    /// The last sequence handed over in a batch.
    handed_over: u64,
}

/// A durable request waiting for its message, counted while it lives.
pub struct WaitGuard(Arc<Cursor>);

impl Drop for WaitGuard {
    fn drop(&mut self) {
        self.0
            .waiters
            .fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

/// See the module doc. Share with an `Arc`.
pub struct Cursor {
    stream: String,
    state: Mutex<State>,
    /// The highest sequence known applied (committed here, or read from the
    /// database).
    applied: tokio::sync::watch::Sender<u64>,
    /// The highest sequence held by a batch that rejected a row (an
    /// overflow), as known when `applied` was last raised: a waiter whose
    /// sequence is above it was applied whole, without asking the database.
    /// Raised before `applied`, so it is never older than what it guards.
    rejected_through: std::sync::atomic::AtomicU64,
    /// Durable requests waiting for their message to be applied.
    waiters: std::sync::atomic::AtomicUsize,
    /// A task polls the stored offset for them (one per instance, however
    /// many wait; see [`crate::journal::wait_applied`]).
    polling: std::sync::atomic::AtomicBool,
    /// The lowest sequence found reused (`u64::MAX`: none): the stream was
    /// deleted and created again, or lost its tail, and numbers anew, so
    /// `applied` no longer counts its messages. Nothing is read and no
    /// waiter is told "applied" until an operator resets the offset and
    /// restarts (see [`crate::store::JOURNAL_STREAM_LOST`]).
    lost_from: std::sync::atomic::AtomicU64,
    /// Wakes the reader to tell every instance (through the database).
    lost_found: tokio::sync::Notify,
}

impl Cursor {
    pub fn new(stream: impl Into<String>) -> Arc<Self> {
        Arc::new(Self {
            stream: stream.into(),
            state: Mutex::new(State {
                reading: 0,
                recorded: 0,
                handed_over: 0,
            }),
            applied: tokio::sync::watch::Sender::new(0),
            rejected_through: std::sync::atomic::AtomicU64::new(0),
            waiters: std::sync::atomic::AtomicUsize::new(0),
            polling: std::sync::atomic::AtomicBool::new(false),
            lost_from: std::sync::atomic::AtomicU64::new(u64::MAX),
            lost_found: tokio::sync::Notify::new(),
        })
    }

    /// Counts a waiter in until the guard drops; `true` when no task polls
    /// the stored offset yet and the caller must start one.
    pub fn enter_wait(self: &Arc<Self>) -> (WaitGuard, bool) {
        use std::sync::atomic::Ordering::SeqCst;
        self.waiters.fetch_add(1, SeqCst);
        let start = !self.polling.swap(true, SeqCst);
        (WaitGuard(Arc::clone(self)), start)
    }

    /// Asked by the polling task after each poll: `false` to keep polling,
    /// `true` when nobody waits any more (and it must stop). A waiter that
    /// arrives while it stops either finds `polling` cleared and starts a new
    /// task, or finds it set and is taken up by this one, which goes on.
    pub fn poller_may_stop(&self) -> bool {
        use std::sync::atomic::Ordering::SeqCst;
        if self.waiters.load(SeqCst) > 0 {
            return false;
        }
        self.polling.store(false, SeqCst);
        self.waiters.load(SeqCst) == 0 || self.polling.swap(true, SeqCst)
    }

    /// Whether a task polls the stored offset now.
    pub fn is_polling(&self) -> bool {
        self.polling.load(std::sync::atomic::Ordering::SeqCst)
    }

    pub fn stream(&self) -> &str {
        &self.stream
    }

    /// Marks the stream lost, `sequence` found reused (see the `lost_from`
    /// field); `true` when it was not marked before.
    pub fn mark_lost(&self, sequence: u64) -> bool {
        let before = self
            .lost_from
            .fetch_min(sequence, std::sync::atomic::Ordering::SeqCst);
        self.lost_found.notify_waiters();
        before == u64::MAX
    }

    pub fn is_lost(&self) -> bool {
        self.lost_from() != u64::MAX
    }

    /// The lowest sequence found reused, `u64::MAX` when none.
    pub fn lost_from(&self) -> u64 {
        self.lost_from.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Completes when the stream is marked lost after this call.
    pub async fn lost_found(&self) {
        self.lost_found.notified().await;
    }

    /// Whether a reading has started (so `applied` holds the stored offset).
    pub fn has_read(&self) -> bool {
        self.state.lock().reading > 0
    }

    /// Starts a reading from `applied` (the stored offset); returns its number.
    pub fn start_reading(&self, applied: u64) -> u64 {
        let mut state = self.state.lock();
        state.reading += 1;
        state.recorded = applied;
        state.handed_over = applied;
        drop(state);
        self.note_applied(applied);
        self.state.lock().reading
    }

    /// Records the message `sequence` of reading `reading` into `batcher`,
    /// all of its items or none. `published` is when the stream stored it:
    /// its keyed requests were taken then.
    ///
    /// # Errors
    /// [`RecordError`]; nothing is recorded then.
    pub fn record(
        &self,
        reading: u64,
        sequence: u64,
        batcher: &Batcher,
        message: &Message<'_>,
        published: chrono::DateTime<chrono::Utc>,
    ) -> Result<(), RecordError> {
        let mut state = self.state.try_lock().ok_or(RecordError::Busy)?;
        if state.reading != reading {
            return Err(RecordError::Stale);
        }
        if sequence <= state.recorded {
            return Err(RecordError::Behind {
                sequence,
                recorded: state.recorded,
            });
        }
        if message.keyed.is_empty() {
            batcher
                .record_all(&message.items)
                .map_err(|(_, e)| RecordError::Batcher(e))?;
        } else {
            batcher
                .record_keyed(&message.items, &message.keyed, published)
                .map_err(RecordError::Batcher)?;
        }
        if sequence > state.recorded + 1 {
            // Applied messages are purged only up to the stored offset, and
            // the reading starts just past it: a gap is messages deleted by a
            // limit (`max_age`, `max_msgs`) or by hand, never applied.
            tracing::error!(
                stream = %self.stream,
                missing_from = state.recorded + 1,
                missing_through = sequence - 1,
                "journal messages are missing from the stream (deleted by a stream limit or by hand); their increments are lost"
            );
        }
        state.recorded = sequence;
        Ok(())
    }

    /// Drains `batcher` into a batch holding the messages recorded since the
    /// last hand-over. Blocking, like the drain.
    pub fn hand_over(&self, batcher: &Batcher) -> (Option<Arc<Batch>>, u64) {
        let mut state = self.state.lock();
        batcher.hand_over_holding(|| {
            let span = JournalSpan {
                stream: self.stream.clone(),
                after: state.handed_over,
                through: state.recorded,
            };
            state.handed_over = state.recorded;
            Some(span)
        })
    }

    /// Ends the current reading: another writer applied messages this one
    /// holds (or may). Drops everything the batcher holds (all of it came
    /// from the journal, which keeps it). Blocking, like the drain.
    pub fn abandon(&self, batcher: &Batcher) {
        let mut state = self.state.lock();
        state.reading += 1;
        drop(batcher.drain());
        drop(state);
    }

    /// Whether reading `reading` is still the current one.
    pub fn is_current(&self, reading: u64) -> bool {
        self.state.lock().reading == reading
    }

    /// `through` is applied (committed here, or read from the database).
    pub fn note_applied(&self, through: u64) {
        self.applied.send_if_modified(|applied| {
            let advanced = through > *applied;
            if advanced {
                *applied = through;
            }
            advanced
        });
    }

    /// A batch holding messages through `through` rejected a row. Call before
    /// [`Cursor::note_applied`] for the same batch or reading.
    pub fn note_rejected(&self, through: u64) {
        self.rejected_through
            .fetch_max(through, std::sync::atomic::Ordering::SeqCst);
    }

    /// Whether a row of message `sequence` may have been rejected (asked
    /// once `sequence` is applied): `false` means certainly not.
    pub fn may_be_rejected(&self, sequence: u64) -> bool {
        self.rejected_through
            .load(std::sync::atomic::Ordering::SeqCst)
            >= sequence
    }

    /// The highest sequence known applied.
    pub fn applied(&self) -> u64 {
        *self.applied.borrow()
    }

    pub fn subscribe_applied(&self) -> tokio::sync::watch::Receiver<u64> {
        self.applied.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One polling task however many wait; it stops when the last waiter
    /// leaves, and a waiter arriving after that starts a new one.
    #[test]
    fn one_poller_serves_every_waiter_and_stops_after_the_last() {
        let cursor = Cursor::new("s");
        let (first, start) = cursor.enter_wait();
        assert!(start, "the first waiter starts the poller");
        let (second, start) = cursor.enter_wait();
        assert!(!start, "one is running");
        assert!(!cursor.poller_may_stop(), "two wait");
        drop(first);
        drop(second);
        assert!(cursor.poller_may_stop(), "nobody waits");
        assert!(!cursor.is_polling());
        let (_third, start) = cursor.enter_wait();
        assert!(start, "a new waiter starts a new poller");
    }
}
