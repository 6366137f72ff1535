//! Reads the journal into the batcher, on the one instance holding the
//! writer lease: an ordered consumer from the stored offset, each message
//! recorded whole through the [`Cursor`]; the flusher writes the batches and
//! moves the offset in the same transaction. Applied messages are purged
//! from the stream once they are older than its duplicate window: the
//! stream's memory of message ids is rebuilt from the messages it still
//! holds when nats-server restarts, and a publish retried after its message
//! was purged would otherwise be stored, and applied, a second time.
//!
//! Instances without the lease wait for it; an instance that dies stops
//! renewing it, and another takes over within a lease period, reading from
//! the stored offset: nothing is stranded.

use std::{sync::Arc, time::Duration};

use async_nats::jetstream::{self, consumer::DeliverPolicy};
use futures::StreamExt;
use sea_orm::DatabaseConnection;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::{
    codec,
    cursor::{Cursor, RecordError},
    publisher::DURABLE_HEADER,
};
use crate::{Batcher, Flusher, metrics::Metrics, store, telemetry::error_chain};

/// How long a lease lasts unless renewed; renewed every third of it.
pub const LEASE: Duration = Duration::from_secs(6);

/// How often the writer reads the stream's last sequence for the lag gauge
/// (one small JetStream API request).
const LAG_SAMPLE: Duration = Duration::from_secs(2);

pub struct Reader {
    pub stream: jetstream::stream::Stream,
    pub cursor: Arc<Cursor>,
    pub batcher: Arc<Batcher>,
    pub flusher: Arc<Flusher>,
    pub db: DatabaseConnection,
    pub metrics: Arc<Metrics>,
    /// This instance's name in the lease.
    pub writer: String,
    /// The stream's duplicate window: applied messages stay this long.
    pub retain_for: Duration,
}

/// Stream sequences read with their publication times, one mark per second
/// of messages (sequences and times rise together in a stream), so that the
/// purge can tell which applied messages are older than the window.
#[derive(Default)]
struct PublishMarks {
    marks: std::collections::VecDeque<(u64, i64)>,
}

impl PublishMarks {
    fn note(&mut self, sequence: u64, published_ms: i64) {
        if self
            .marks
            .back()
            .is_none_or(|&(_, last)| published_ms >= last.saturating_add(1_000))
        {
            self.marks.push_back((sequence, published_ms));
        }
    }

    /// The highest sequence that may be purged: applied, and published
    /// before `cutoff_ms` (every message up to a mark published no later
    /// than the mark). Forgets the marks it passes.
    fn purgeable(&mut self, applied: u64, cutoff_ms: i64) -> Option<u64> {
        let mut through = None;
        while let Some(&(sequence, published_ms)) = self.marks.front() {
            if published_ms >= cutoff_ms {
                break;
            }
            if sequence > applied {
                return Some(applied);
            }
            through = Some(sequence);
            self.marks.pop_front();
        }
        through
    }
}

/// Why a reading ended.
enum Ended {
    Stopped,
    /// Lease lost, offset moved, or the consumer failed: start over.
    Restart,
}

impl Reader {
    /// Takes the lease when it can and reads until `stop`; meanwhile keeps
    /// the lag gauge current.
    pub async fn run_until_stopped(&self, stop: CancellationToken) {
        tokio::select! {
            () = self.read_until_stopped(&stop) => {}
            () = self.watch_lag(&stop) => {}
        }
    }

    /// Sets `journal_lag_messages` every [`LAG_SAMPLE`] while this instance
    /// holds the lease (0 otherwise). Its own loop: reading blocks while the
    /// database is away, which is when the lag matters most.
    async fn watch_lag(&self, stop: &CancellationToken) {
        let mut tick = tokio::time::interval(LAG_SAMPLE);
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            // The gauge is this reader's own record of holding the lease;
            // until a reading has loaded the stored offset, `applied` is not
            // known (0), and the lag would read as the whole stream.
            if self.metrics.journal_writer.get() != 1 || !self.cursor.has_read() {
                self.metrics.journal_lag_messages.set(0);
                continue;
            }
            match self.stream.get_info().await {
                Ok(info) => {
                    let lag = info
                        .state
                        .last_sequence
                        .saturating_sub(self.cursor.applied());
                    self.metrics
                        .journal_lag_messages
                        .set(i64::try_from(lag).unwrap_or(i64::MAX));
                }
                Err(e) => {
                    tracing::debug!(error = %error_chain(&e), "reading the journal stream's state failed");
                }
            }
        }
    }

    async fn read_until_stopped(&self, stop: &CancellationToken) {
        loop {
            if !self.wait_for_lease(stop).await {
                break;
            }
            // One span per reading (lease taken → lease lost or stop): its
            // log lines share a trace id.
            let reading = tracing::info_span!("journal.reading", stream = self.cursor.stream());
            match self.read(stop).instrument(reading).await {
                Ended::Stopped => break,
                Ended::Restart => {
                    // Not a writer until the lease is taken again (a flush
                    // that found the offset moved, or the stream marked
                    // lost, ends a reading without a renewal saying so).
                    self.metrics.journal_writer.set(0);
                    // Whatever this reading recorded is dropped; the next one
                    // starts from the stored offset.
                    self.flusher.abandon_journal().await;
                }
            }
            tokio::select! {
                () = stop.cancelled() => break,
                () = tokio::time::sleep(Duration::from_millis(200)) => {}
            }
        }
    }

    /// After the final flush: lets another instance take over at once.
    pub async fn release_lease(&self) {
        if let Err(e) =
            store::release_journal_lease(&self.db, self.cursor.stream(), &self.writer).await
        {
            tracing::warn!(error = %error_chain(&e), "releasing the journal lease failed; another instance takes over when it expires");
        }
    }

    /// Takes or renews the lease (the stream's row must exist).
    async fn claim(&self) -> Result<bool, sea_orm::DbErr> {
        let now = now_ms();
        store::claim_journal_lease(
            &self.db,
            self.cursor.stream(),
            &self.writer,
            now,
            now + LEASE.as_millis() as i64,
        )
        .await
    }

    /// `false` when stopped first. Never `true` once the stream is lost.
    async fn wait_for_lease(&self, stop: &CancellationToken) -> bool {
        loop {
            if self.cursor.is_lost() {
                // Told to every instance through the database: none may read.
                self.mark_lost_in_the_database().await;
                self.metrics.journal_writer.set(0);
                tokio::select! {
                    () = stop.cancelled() => return false,
                    () = tokio::time::sleep(LEASE / 3) => {}
                }
                continue;
            }
            // Creates the stream's row on first use; renewals need not ask.
            let claimed = match store::journal_applied_through(&self.db, self.cursor.stream()).await
            {
                Ok(_) => self.claim().await,
                Err(e) => Err(e),
            };
            match claimed {
                Ok(true) => {
                    self.metrics.journal_writer.set(1);
                    return true;
                }
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(error = %error_chain(&e), "claiming the journal lease failed; retrying")
                }
            }
            tokio::select! {
                () = stop.cancelled() => return false,
                () = tokio::time::sleep(LEASE / 3) => {}
                // At once: the writer may be applying the new stream from
                // the old offset meanwhile (its flushes stop at the mark).
                () = self.cursor.lost_found() => {}
            }
        }
    }

    async fn read(&self, stop: &CancellationToken) -> Ended {
        let applied = match store::journal_applied_through(&self.db, self.cursor.stream()).await {
            Ok(applied) => applied,
            Err(e) => {
                tracing::warn!(error = %error_chain(&e), "reading the journal offset failed");
                return Ended::Restart;
            }
        };
        // A stream deleted and created again while this instance ran starts
        // its sequences anew: read from the stored offset, its messages
        // would be skipped as applied. Checked at the start too.
        match self.stream_is_behind(applied).await {
            Ok(false) => {}
            // Not a writer while it does not read (IncrementJournalNoWriter
            // fires), and no instance reads it again until an operator resets
            // the offset: a new stream that passed the old offset meanwhile
            // would be read from there, its first messages skipped.
            Ok(true) => return Ended::Restart,
            Err(()) => return Ended::Restart,
        }
        // Rejections by earlier writers, read after the offset so that they
        // cover it; durable requests waiting here learn of them.
        match store::journal_rejected_through(&self.db, self.cursor.stream()).await {
            Ok(through) => self.cursor.note_rejected(through),
            Err(e) => {
                tracing::warn!(error = %error_chain(&e), "reading the journal's rejections failed");
                return Ended::Restart;
            }
        }
        let reading = self.cursor.start_reading(applied);
        tracing::info!(
            stream = self.cursor.stream(),
            applied,
            "reading the journal"
        );
        let consumer = self
            .stream
            .create_consumer(jetstream::consumer::pull::OrderedConfig {
                deliver_policy: DeliverPolicy::ByStartSequence {
                    start_sequence: applied + 1,
                },
                ..Default::default()
            })
            .await;
        let mut messages = match consumer {
            Ok(consumer) => match consumer.messages().await {
                Ok(messages) => messages,
                Err(e) => {
                    tracing::warn!(error = %error_chain(&e), "reading the journal failed");
                    return Ended::Restart;
                }
            },
            Err(e) => {
                tracing::warn!(error = %error_chain(&e), "creating the journal consumer failed");
                return Ended::Restart;
            }
        };
        let mut renew = tokio::time::interval(LEASE / 3);
        renew.tick().await;
        let mut purged = applied;
        let mut marks = PublishMarks::default();
        loop {
            tokio::select! {
                () = stop.cancelled() => return Ended::Stopped,
                () = self.cursor.lost_found() => return Ended::Restart,
                _ = renew.tick() => {
                    if !self.renew(reading).await {
                        return Ended::Restart;
                    }
                    // The ordered consumer follows a stream created again
                    // without a word: found out here while the new stream
                    // is still behind the offset, or by a publisher whose
                    // acknowledgement came with a sequence already used.
                    if self.cursor.is_lost()
                        || self.stream_is_behind(self.cursor.applied()).await == Ok(true)
                    {
                        return Ended::Restart;
                    }
                    purged = self.purge(purged, &mut marks).await;
                }
                message = messages.next() => {
                    let message = match message {
                        Some(Ok(message)) => message,
                        Some(Err(e)) => {
                            tracing::warn!(error = %error_chain(&e), "reading the journal failed; starting over from the stored offset");
                            return Ended::Restart;
                        }
                        None => return Ended::Restart,
                    };
                    if self.cursor.is_lost() {
                        return Ended::Restart;
                    }
                    let Ok(info) = message.info() else {
                        tracing::warn!("a journal message without its metadata; starting over");
                        return Ended::Restart;
                    };
                    let sequence = info.stream_sequence;
                    let published = i64::try_from(info.published.unix_timestamp_nanos() / 1_000_000)
                        .ok()
                        .and_then(chrono::DateTime::from_timestamp_millis)
                        .unwrap_or_else(chrono::Utc::now);
                    let durable = message
                        .headers
                        .as_ref()
                        .is_some_and(|h| h.get(DURABLE_HEADER).is_some());
                    if !self.record(reading, sequence, &message.payload, published, stop).await {
                        return if stop.is_cancelled() { Ended::Stopped } else { Ended::Restart };
                    }
                    marks.note(sequence, published.timestamp_millis());
                    if durable {
                        self.flusher.request_durable_flush();
                    }
                }
            }
        }
    }

    /// Whether the stream ends before `applied`: it is not the one the
    /// stored offset counts in (lost, or deleted and created again: its
    /// sequences started anew). Logged as an error. `Err` when its state
    /// could not be read. Not its creation time: nats-server has reported
    /// another one for the same stream after restarts (nats-server#8470,
    /// #8449), and stopping a healthy writer would stop applying.
    async fn stream_is_behind(&self, applied: u64) -> Result<bool, ()> {
        match self.stream.get_info().await {
            Ok(info) if info.state.last_sequence < applied => {
                self.cursor
                    .mark_lost(info.state.last_sequence.saturating_add(1));
                tracing::error!(
                    stream = self.cursor.stream(),
                    applied,
                    last = info.state.last_sequence,
                    "the journal stream ends before the stored offset: it was lost or deleted and created again; not reading it (see the runbook IncrementJournalStreamLost)"
                );
                Ok(true)
            }
            Ok(_) => Ok(false),
            Err(e) => {
                tracing::warn!(error = %error_chain(&e), "reading the journal stream's state failed");
                Err(())
            }
        }
    }

    /// Marks the stream lost in `journal_offsets` (see
    /// [`store::JOURNAL_STREAM_LOST`]): no instance takes the lease or
    /// starts until an operator resets it. Retried by the caller's loop.
    async fn mark_lost_in_the_database(&self) {
        let from = self.cursor.lost_from();
        match store::journal_offset(&self.db, self.cursor.stream()).await {
            Ok(store::JournalOffset {
                lost_from: Some(marked),
                ..
            }) if marked <= from => {}
            Ok(_) => {
                if let Err(e) =
                    store::mark_journal_stream_lost(&self.db, self.cursor.stream(), from).await
                {
                    tracing::warn!(error = %error_chain(&e), "marking the journal stream lost failed; retrying");
                }
            }
            Err(e) => {
                tracing::warn!(error = %error_chain(&e), "reading the journal offset failed");
            }
        }
    }

    /// Renews the lease; `false` when it was lost (another instance has it).
    async fn renew(&self, reading: u64) -> bool {
        if !self.cursor.is_current(reading) {
            return false;
        }
        match self.claim().await {
            Ok(true) => true,
            Ok(false) => {
                tracing::warn!("the journal lease went to another instance; stopping to read");
                self.metrics.journal_writer.set(0);
                false
            }
            // The database is away: nobody can write meanwhile, and the
            // offset check keeps two writers from applying a message twice.
            Err(_) => true,
        }
    }

    /// Purges what is applied and older than the duplicate window; returns
    /// the sequence purged through.
    async fn purge(&self, purged: u64, marks: &mut PublishMarks) -> u64 {
        let window_ms = i64::try_from(self.retain_for.as_millis()).unwrap_or(i64::MAX);
        let Some(through) =
            marks.purgeable(self.cursor.applied(), now_ms().saturating_sub(window_ms))
        else {
            return purged;
        };
        if through <= purged {
            return purged;
        }
        match self.stream.purge().sequence(through + 1).await {
            Ok(_) => through,
            Err(e) => {
                tracing::warn!(error = %error_chain(&e), "purging applied journal messages failed; will retry");
                purged
            }
        }
    }

    /// A message that can never be taken (`why`): logged, counted, and
    /// replaced by an empty one, whose record still moves the cursor past it.
    fn unreadable(&self, sequence: u64, why: &dyn std::fmt::Display) -> codec::Message<'static> {
        tracing::error!(error = %why, sequence, "a journal message could not be read; skipped");
        self.metrics.journal_unreadable_total.inc();
        codec::Message::default()
    }

    /// Records one message, waiting for room in the batcher; `false` when
    /// the reading ended or `stop` came first.
    async fn record(
        &self,
        reading: u64,
        sequence: u64,
        body: &[u8],
        published: chrono::DateTime<chrono::Utc>,
        stop: &CancellationToken,
    ) -> bool {
        let mut message = match codec::decode(body) {
            Ok(message) => message,
            Err(e) => self.unreadable(sequence, &e),
        };
        // While the database refuses the batch in flight, read nothing more.
        while self.flusher.is_stalled() {
            tokio::select! {
                () = stop.cancelled() => return false,
                () = tokio::time::sleep(Duration::from_millis(50)) => {}
            }
            if !self.cursor.is_current(reading) {
                return false;
            }
        }
        loop {
            match self
                .cursor
                .record(reading, sequence, &self.batcher, &message, published)
            {
                Ok(()) => {
                    self.metrics.journal_read_total.inc();
                    return true;
                }
                Err(RecordError::Stale) => return false,
                Err(e @ RecordError::Behind { .. }) => {
                    tracing::warn!(error = %e, "the journal delivered a message again; reading again from the stored offset");
                    return false;
                }
                Err(RecordError::Busy) => {
                    tokio::select! {
                        () = stop.cancelled() => return false,
                        () = tokio::time::sleep(Duration::from_millis(1)) => {}
                    }
                }
                // One key's deltas in the message sum outside i64: never
                // taken, whatever is pending. The publisher never writes
                // such a message (it checks each group's sums), so another
                // one did; waiting for room would stop the journal for good.
                Err(RecordError::Batcher(e @ crate::batcher::BatchError::RequestOverflow)) => {
                    message = self.unreadable(sequence, &e);
                }
                Err(RecordError::Batcher(_)) => {
                    // Full or out of range until the next flush: the journal
                    // holds the backlog, not this process.
                    self.flusher.request_flush();
                    tokio::select! {
                        () = stop.cancelled() => return false,
                        () = tokio::time::sleep(Duration::from_millis(20)) => {}
                    }
                }
            }
        }
    }
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

#[cfg(test)]
mod tests {
    use super::PublishMarks;

    #[test]
    fn only_applied_messages_older_than_the_window_may_be_purged() {
        let mut marks = PublishMarks::default();
        for (sequence, published_ms) in [(1, 0), (2, 500), (3, 1_000), (4, 1_200), (5, 2_500)] {
            marks.note(sequence, published_ms);
        }
        // Nothing is older than the window yet.
        assert_eq!(marks.purgeable(5, 0), None);
        // Messages 1–3 were published no later than 1,000 (mark 3).
        assert_eq!(marks.purgeable(5, 1_001), Some(3));
        // Message 5 is old enough, but only 4 is applied.
        assert_eq!(marks.purgeable(4, 3_000), Some(4));
        assert_eq!(marks.purgeable(5, 3_000), Some(5));
        assert_eq!(marks.purgeable(9, 9_000), None);
    }
}
