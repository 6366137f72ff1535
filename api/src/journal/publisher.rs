//! Group commit into the journal: requests that arrive while publishes are
//! in flight join one open group, summed per key; each group is one message,
//! published with its own `Nats-Msg-Id`, and every request in it is answered
//! when that message is acknowledged.
//!
//! A request is answered `Stored` only with the stream's acknowledgement,
//! `Refused` only when no attempt can have stored it (never sent, or the
//! first attempt answered with an error), and otherwise not at all before
//! its deadline (the intake then says "unconfirmed"). An attempt whose
//! acknowledgement did not come is retried with the same id, so the stream
//! drops the copy if the first one landed, for as long as the stream
//! remembers ids (a quarter of its duplicate window).

use std::{
    collections::{HashMap, VecDeque},
    sync::Arc,
    time::{Duration, Instant},
};

use async_nats::{
    connection::State,
    jetstream::{self, context::PublishErrorKind},
};
use compact_str::CompactString;
use parking_lot::Mutex;
use tokio::sync::{Notify, Semaphore, watch};
use tokio_util::sync::CancellationToken;

use super::{Cursor, codec};
use crate::{batch::Keyed, metrics::Metrics};

/// Header marking a message that a `wait=true` request waits for: the
/// reader asks for an early flush when it sees one.
pub const DURABLE_HEADER: &str = "Increment-Durable";

/// How a group's publish ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Stored at this stream sequence.
    Stored(u64),
    /// Certainly not stored.
    Refused(Refusal),
    /// Retried until the stream could no longer tell a copy; may be stored.
    Unknown,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Not connected to NATS, or no stream answered.
    Unavailable,
    /// The stream refused it (full, or another limit).
    Full,
    /// Too many groups waiting for a publish slot.
    Busy,
}

/// Why [`Publisher::append`] did not store the increments.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AppendError {
    #[error("not taken: {0:?}")]
    Refused(Refusal),
    /// The sum of a key's deltas in this request leaves `i64` (index of an item).
    #[error("a key's deltas in the request sum outside i64")]
    Overflow(usize),
    /// No answer from the stream before the deadline: the increments may be
    /// stored (and then applied once) or not.
    #[error("not confirmed before the deadline")]
    Unconfirmed,
}

/// What the publisher may hold and how it retries.
#[derive(Debug, Clone)]
pub struct PublisherSettings {
    pub subject: String,
    /// Publishes awaiting their acknowledgement at once.
    pub in_flight: usize,
    /// Groups sealed and waiting for a publish slot, beyond which requests
    /// are refused.
    pub max_waiting_groups: usize,
    /// A group is sealed once its body may exceed this.
    pub max_message_bytes: usize,
    /// How long one attempt waits for its acknowledgement.
    pub ack_timeout: Duration,
    /// How long a request waits for its group's outcome.
    pub request_timeout: Duration,
    /// Attempts stop this long after the first (under the duplicate window).
    pub retry_horizon: Duration,
}

struct Group {
    deltas: HashMap<CompactString, i64>,
    /// Requests with an `Idempotency-Key`, kept whole (not summed).
    keyed: Vec<Keyed>,
    /// Per key, the sum of the keyed requests' items: with `deltas`, what a
    /// reader adds for the key, which must stay in `i64`.
    keyed_totals: HashMap<CompactString, i64>,
    bytes: usize,
    durable: bool,
    requests: u64,
    outcome: watch::Sender<Option<Outcome>>,
}

impl Group {
    fn new() -> Self {
        Self {
            deltas: HashMap::new(),
            keyed: Vec::new(),
            keyed_totals: HashMap::new(),
            bytes: 1 + 10,
            durable: false,
            requests: 0,
            outcome: watch::Sender::new(None),
        }
    }
}

impl Group {
    /// The group's message, as published.
    fn message(&self) -> Vec<u8> {
        let mut body = Vec::with_capacity(self.bytes);
        codec::encode_message(
            self.deltas.iter().map(|(k, v)| (k.as_str(), *v)),
            &self.keyed,
            &mut body,
        );
        body
    }
}

struct Groups {
    open: Group,
    sealed: VecDeque<Group>,
}

/// See the module doc. Share with an `Arc`; [`Publisher::run`] must be running.
pub struct Publisher {
    client: async_nats::Client,
    jetstream: jetstream::Context,
    settings: PublisherSettings,
    groups: Mutex<Groups>,
    wake: Notify,
    metrics: Arc<Metrics>,
    /// Marked lost when an acknowledgement shows the stream numbering anew.
    cursor: Arc<Cursor>,
    /// The highest sequence acknowledged so far (from the stream's last at
    /// start): a message sent after it was acknowledged is stored after it,
    /// so a first (not duplicate) acknowledgement at or below it means the
    /// stream was deleted and created again.
    acked_through: std::sync::atomic::AtomicU64,
}

impl Publisher {
    /// `last_sequence`: the stream's, when it was opened.
    pub fn new(
        client: async_nats::Client,
        jetstream: jetstream::Context,
        settings: PublisherSettings,
        metrics: Arc<Metrics>,
        cursor: Arc<Cursor>,
        last_sequence: u64,
    ) -> Arc<Self> {
        Arc::new(Self {
            client,
            jetstream,
            settings,
            groups: Mutex::new(Groups {
                open: Group::new(),
                sealed: VecDeque::new(),
            }),
            wake: Notify::new(),
            metrics,
            cursor,
            acked_through: std::sync::atomic::AtomicU64::new(last_sequence),
        })
    }

    /// Journals `items` (all or none) and returns the stream sequence of the
    /// message holding them.
    ///
    /// # Errors
    /// [`AppendError`]: refused (nothing stored), overflow (nothing stored),
    /// or unconfirmed.
    pub async fn append(&self, items: &[(&str, i64)], durable: bool) -> Result<u64, AppendError> {
        self.append_request(items, None, durable).await
    }

    /// Journals one request that carried an `Idempotency-Key`, whole (its
    /// items summed per key, in `keyed`), and returns the stream sequence
    /// of the message holding it.
    ///
    /// # Errors
    /// As [`append`](Self::append).
    pub async fn append_keyed(&self, keyed: Keyed, durable: bool) -> Result<u64, AppendError> {
        self.append_request(&[], Some(keyed), durable).await
    }

    async fn append_request(
        &self,
        items: &[(&str, i64)],
        keyed: Option<Keyed>,
        durable: bool,
    ) -> Result<u64, AppendError> {
        if self.client.connection_state() != State::Connected {
            return Err(AppendError::Refused(Refusal::Unavailable));
        }
        let mut outcome = self.join(items, keyed, durable)?;
        let waited = tokio::time::timeout(
            self.settings.request_timeout,
            outcome.wait_for(Option::is_some),
        )
        .await;
        match waited {
            Ok(Ok(outcome)) => match *outcome {
                Some(Outcome::Stored(sequence)) => Ok(sequence),
                Some(Outcome::Refused(why)) => Err(AppendError::Refused(why)),
                Some(Outcome::Unknown) | None => Err(AppendError::Unconfirmed),
            },
            // The publisher stopped (shutdown) or the deadline passed.
            Ok(Err(_)) | Err(_) => Err(AppendError::Unconfirmed),
        }
    }

    /// Adds `items` to the open group (sealing it first when they would not
    /// fit) and returns the group's outcome channel.
    fn join(
        &self,
        items: &[(&str, i64)],
        keyed: Option<Keyed>,
        durable: bool,
    ) -> Result<watch::Receiver<Option<Outcome>>, AppendError> {
        let keyed_items = keyed.iter().flat_map(|request| {
            request
                .items
                .iter()
                .map(|(key, delta)| (key.as_str(), *delta))
        });
        let sums = crate::batcher::sum_per_key(items.iter().copied().chain(keyed_items))
            .map_err(AppendError::Overflow)?;
        let bytes: usize = match &keyed {
            Some(request) => codec::max_keyed_len(request),
            None => sums
                .iter()
                .map(|(key, _, _)| codec::max_item_len(key))
                .sum(),
        };
        let mut groups = self.groups.lock();
        // A key's plain and keyed sums are held apart, and each is an i64:
        // the one this request adds to must stay in range (not wrap), and so
        // must their total, which the reader takes as one (a message over it
        // could never be applied).
        let fits = |group: &Group| {
            (group.bytes + bytes <= self.settings.max_message_bytes || group.requests == 0)
                && sums.iter().all(|(key, sum, _)| {
                    let plain = i128::from(group.deltas.get(*key).copied().unwrap_or(0));
                    let keyed_total =
                        i128::from(group.keyed_totals.get(*key).copied().unwrap_or(0));
                    let added_to = if keyed.is_some() { keyed_total } else { plain };
                    let sum = i128::from(*sum);
                    i64::try_from(added_to + sum).is_ok()
                        && i64::try_from(plain + keyed_total + sum).is_ok()
                })
        };
        if !fits(&groups.open) {
            if groups.sealed.len() >= self.settings.max_waiting_groups {
                return Err(AppendError::Refused(Refusal::Busy));
            }
            let sealed = std::mem::replace(&mut groups.open, Group::new());
            groups.sealed.push_back(sealed);
        }
        let group = &mut groups.open;
        if keyed.is_some() {
            for (key, sum, _) in sums {
                *group
                    .keyed_totals
                    .entry(CompactString::from(key))
                    .or_insert(0) += sum;
            }
            group.bytes += bytes;
            group.keyed.extend(keyed);
        } else {
            for (key, sum, _) in sums {
                match group.deltas.get_mut(key) {
                    Some(held) => *held += sum,
                    None => {
                        group.deltas.insert(CompactString::from(key), sum);
                        group.bytes += codec::max_item_len(key);
                    }
                }
            }
        }
        group.durable |= durable;
        group.requests += 1;
        let outcome = group.outcome.subscribe();
        drop(groups);
        self.wake.notify_one();
        Ok(outcome)
    }

    /// The next group to publish, sealed ones first; `None` when none is waiting.
    fn take_group(&self) -> Option<Group> {
        let mut groups = self.groups.lock();
        if let Some(group) = groups.sealed.pop_front() {
            return Some(group);
        }
        if groups.open.requests == 0 {
            return None;
        }
        Some(std::mem::replace(&mut groups.open, Group::new()))
    }

    /// Publishes groups until `stop` is cancelled and nothing waits any more.
    pub async fn run(self: Arc<Self>, stop: CancellationToken) {
        let slots = Arc::new(Semaphore::new(self.settings.in_flight.max(1)));
        loop {
            let Ok(slot) = Arc::clone(&slots).acquire_owned().await else {
                return;
            };
            let group = loop {
                if let Some(group) = self.take_group() {
                    break Some(group);
                }
                if stop.is_cancelled() {
                    break None;
                }
                tokio::select! {
                    () = self.wake.notified() => {}
                    () = stop.cancelled() => {}
                }
            };
            let Some(group) = group else {
                // Let the publishes in flight finish.
                drop(slot);
                let _all = slots
                    .acquire_many(self.settings.in_flight.max(1) as u32)
                    .await;
                return;
            };
            let publisher = Arc::clone(&self);
            tokio::spawn(async move {
                let outcome = publisher.publish(&group).await;
                publisher.count(&group, outcome);
                group.outcome.send_replace(Some(outcome));
                drop(slot);
            });
        }
    }

    fn count(&self, group: &Group, outcome: Outcome) {
        let label = match outcome {
            Outcome::Stored(_) => "stored",
            Outcome::Refused(_) => "refused",
            Outcome::Unknown => "unknown",
        };
        self.metrics
            .journal_messages_total
            .with_label_values(&[label])
            .inc();
        self.metrics
            .journal_group_requests
            .observe(group.requests as f64);
    }

    /// One group's message, attempted until an answer is certain.
    async fn publish(&self, group: &Group) -> Outcome {
        let body = bytes::Bytes::from(group.message());
        let id = uuid::Uuid::new_v4().to_string();
        let first = Instant::now();
        // Whether an earlier attempt may have stored the message.
        let mut maybe_stored = false;
        let mut pause = Duration::from_millis(50);
        loop {
            let attempt = if self.client.connection_state() == State::Connected {
                self.attempt(&id, body.clone(), group.durable).await
            } else {
                Attempt::NotStored(Refusal::Unavailable)
            };
            match attempt {
                Attempt::Stored(sequence) => return Outcome::Stored(sequence),
                Attempt::NotStored(why) if !maybe_stored => return Outcome::Refused(why),
                Attempt::NotStored(_) => {}
                Attempt::Unknown => maybe_stored = true,
            }
            if first.elapsed() + pause >= self.settings.retry_horizon {
                tracing::error!(message.id = %id, increments = group.requests, "a journal publish was never confirmed; it may or may not be stored");
                return Outcome::Unknown;
            }
            self.metrics.journal_publish_retries_total.inc();
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_secs(1));
        }
    }

    async fn attempt(&self, id: &str, body: bytes::Bytes, durable: bool) -> Attempt {
        let mut publish = jetstream::message::PublishMessage::build()
            .payload(body)
            .message_id(id);
        if durable {
            publish = publish.header(DURABLE_HEADER, "1");
        }
        let stored_after = self.acked_through.load(std::sync::atomic::Ordering::SeqCst);
        let ack = match self
            .jetstream
            .send_publish(self.settings.subject.clone(), publish)
            .await
        {
            Ok(ack) => ack,
            // Not handed to the connection: not sent.
            Err(e) => {
                tracing::warn!(error = %e, "a journal publish could not be sent");
                return Attempt::NotStored(Refusal::Unavailable);
            }
        };
        match ack.await {
            Ok(ack) => {
                self.acked_through
                    .fetch_max(ack.sequence, std::sync::atomic::Ordering::SeqCst);
                if !ack.duplicate
                    && ack.sequence <= stored_after
                    && self.cursor.mark_lost(ack.sequence)
                {
                    tracing::error!(
                        stream = self.cursor.stream(),
                        sequence = ack.sequence,
                        acknowledged_before = stored_after,
                        "the journal stream numbers its messages anew: it was deleted and created again, or lost its tail; nothing is read from it until the offset is reset (see the runbook IncrementJournalStreamLost)"
                    );
                }
                Attempt::Stored(ack.sequence)
            }
            Err(e) => match e.kind() {
                PublishErrorKind::StreamNotFound => Attempt::NotStored(Refusal::Unavailable),
                PublishErrorKind::Other
                    if std::error::Error::source(&e)
                        .is_some_and(|s| s.downcast_ref::<jetstream::Error>().is_some()) =>
                {
                    tracing::warn!(error = %crate::telemetry::error_chain(&e), "the journal refused a message");
                    Attempt::NotStored(Refusal::Full)
                }
                _ => {
                    tracing::warn!(error = %crate::telemetry::error_chain(&e), "a journal publish was not acknowledged; retrying it with the same id");
                    Attempt::Unknown
                }
            },
        }
    }
}

enum Attempt {
    Stored(u64),
    NotStored(Refusal),
    Unknown,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A publisher whose client never connects: grouping needs no server.
    fn unconnected_publisher() -> Arc<Publisher> {
        let client = futures::FutureExt::now_or_never(
            async_nats::ConnectOptions::new()
                .retry_on_initial_connect()
                .connect("nats://127.0.0.1:1"),
        )
        .expect("a client that retries in the background returns at once")
        .expect("a client");
        let jetstream = jetstream::new(client.clone());
        let cursor = Cursor::new("increments");
        let settings = PublisherSettings {
            subject: "increments".into(),
            in_flight: 1,
            max_waiting_groups: 8,
            max_message_bytes: 64 * 1024,
            ack_timeout: Duration::from_secs(1),
            request_timeout: Duration::from_secs(1),
            retry_horizon: Duration::from_secs(1),
        };
        Publisher::new(
            client,
            jetstream,
            settings,
            Arc::new(Metrics::new()),
            cursor,
            0,
        )
    }

    /// A key's plain sum and its keyed total are held apart in a group.
    /// Plain `MAX`, keyed `-10`, plain `+5`: the total stays in range
    /// throughout, but the plain sum alone would pass `MAX`. It wrapped, and
    /// the reader skipped the whole message (every request in it answered
    /// `202`) as one that can never be applied.
    #[tokio::test]
    async fn every_message_a_group_makes_can_be_applied() {
        let publisher = unconnected_publisher();
        publisher
            .join(&[("k", i64::MAX)], None, false)
            .expect("joins");
        let keyed = Keyed {
            key: "retry-1".into(),
            fingerprint: 1,
            items: vec![("k".into(), -10)],
            taken_at: None,
        };
        publisher.join(&[], Some(keyed), false).expect("joins");
        publisher.join(&[("k", 5)], None, false).expect("joins");
        publisher.join(&[("other", 7)], None, false).expect("joins");

        let batcher = crate::Batcher::new(
            std::num::NonZeroU64::new(100).expect("non-zero"),
            Duration::from_secs(60),
        );
        let mut groups = 0;
        while let Some(group) = publisher.take_group() {
            groups += 1;
            let body = group.message();
            let message = codec::decode(&body).expect("decodes");
            batcher
                .record_keyed(&message.items, &message.keyed, chrono::Utc::now())
                .expect("the reader can apply every message");
        }
        assert_eq!(groups, 2, "the plain +5 went to a group of its own");
        assert_eq!(batcher.pending_for("k"), Some(i128::from(i64::MAX) - 5));
        assert_eq!(batcher.pending_for("other"), Some(7));
    }
}
