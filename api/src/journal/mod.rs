//! The journal: NATS JetStream between the intake and the database, so that
//! a `202` survives any crash (`--journal-url`).
//!
//! - [`publisher`]: group commit; a request is answered once the message
//!   holding it is acknowledged by the stream.
//! - [`reader`]: on the instance holding the writer lease, reads the stream
//!   from the stored offset into the batcher.
//! - [`cursor`]: which messages the batcher holds and which are applied;
//!   the flusher stamps each batch with its span, and the transaction that
//!   writes it moves the stored offset (exactly once: see `store`).
//! - [`codec`]: the message body.
//!
//! Stream: file storage, `discard: new` (a full stream refuses, so a
//! publisher sees it; `discard: old` would silently delete unapplied
//! increments), limits retention, purged up to the applied offset once
//! older than the duplicate window (see `reader`).

pub mod codec;
pub mod cursor;
pub mod publisher;
pub mod reader;

use std::{sync::Arc, time::Duration};

use async_nats::jetstream::{self, stream};
use sea_orm::DatabaseConnection;

pub use cursor::Cursor;
pub use publisher::{AppendError, Outcome, Publisher, PublisherSettings, Refusal};

use crate::{metrics::Metrics, store};

/// The journal's settings (see `Settings`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JournalSettings {
    /// `nats://host:port`, comma-separated for a cluster.
    pub url: String,
    pub stream: String,
    pub replicas: usize,
    /// Bytes the stream may hold; beyond, publishes are refused (503).
    pub max_bytes: i64,
    /// How long the stream remembers message ids (dedup of retried publishes).
    pub duplicate_window: Duration,
    /// How long a request waits for its message's acknowledgement.
    pub ack_timeout: Duration,
    /// Publishes awaiting their acknowledgement at once; requests arriving
    /// meanwhile join the next message (fewer: larger groups, fewer messages).
    pub in_flight: usize,
}

impl JournalSettings {
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            stream: "increments".to_owned(),
            replicas: 1,
            max_bytes: 1 << 30,
            duplicate_window: Duration::from_secs(5 * 60),
            ack_timeout: Duration::from_secs(5),
            in_flight: 1,
        }
    }

    /// The servers of `url` (comma-separated).
    ///
    /// # Errors
    /// The first entry that is not a NATS URL, or none at all (`","`, as a
    /// template of unset variables makes: the client would spin on an empty
    /// server list).
    pub fn servers(&self) -> Result<Vec<async_nats::ServerAddr>, std::io::Error> {
        let servers: Vec<async_nats::ServerAddr> = self
            .url
            .split(',')
            .map(str::trim)
            .filter(|url| !url.is_empty())
            .map(str::parse)
            .collect::<Result<_, _>>()?;
        if servers.is_empty() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "no server address in it",
            ));
        }
        Ok(servers)
    }

    /// The subject increments are published on.
    pub fn subject(&self) -> String {
        format!("{}.journal", self.stream)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("--journal-url {url:?} is not a list of NATS URLs (nats://host:port,…)")]
    Url {
        url: String,
        #[source]
        source: std::io::Error,
    },
    #[error("connecting to NATS at {url} failed")]
    Connect {
        url: String,
        #[source]
        source: async_nats::ConnectError,
    },
    #[error("setting up the JetStream stream {stream} failed")]
    Stream {
        stream: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("the existing stream {stream} would delete unapplied increments: {why}")]
    Deletes { stream: String, why: &'static str },
    /// One request of `--max-body` might not fit in a message the server or
    /// the stream takes: it would be refused (`503`) however often it is
    /// sent.
    #[error(
        "journal messages can be at most {message_bytes} bytes here ({limit}), too small for a \
         request of --max-body {max_body} bytes: lower --max-body or raise that limit"
    )]
    MessageTooSmall {
        message_bytes: usize,
        limit: String,
        max_body: usize,
    },
    /// The database says messages up to `applied` of this stream were
    /// applied, and the stream is missing or ends before that: it was lost
    /// or deleted (and perhaps created again). Reading it from the stored
    /// offset would skip its messages as applied, and `wait=true` would
    /// answer `200` for them.
    #[error(
        "the stream {stream} {found}, but journal_offsets says its messages up to {applied} were applied: \
         it was lost or deleted; see the runbook IncrementJournalStreamLost before starting"
    )]
    Lost {
        stream: String,
        applied: u64,
        found: String,
    },
}

/// A connected journal: its client, stream and cursor.
pub struct Journal {
    pub settings: JournalSettings,
    pub client: async_nats::Client,
    pub jetstream: jetstream::Context,
    pub stream: stream::Stream,
    pub cursor: Arc<Cursor>,
    /// The largest message the publisher sends (see [`message_bytes`]).
    max_message_bytes: usize,
    /// What set `max_message_bytes`, for the start's error.
    message_limit: String,
    /// The stream's last sequence when it was opened.
    last_sequence: u64,
}

/// A group's message grows to at most this many bytes (the server's
/// `max_payload` is 1 MiB by default).
const GROUP_MESSAGE_BYTES: usize = 256 * 1024;

/// Room for a message's headers (its id, the durable flag) beside its
/// payload, within the server's and the stream's limits.
const HEADER_ROOM: usize = 1024;

/// Room beside a request's body in its message: an `Idempotency-Key`
/// (not in the body), its fingerprint and the message's framing.
const REQUEST_ROOM: usize = 512;

/// The largest message to send: [`GROUP_MESSAGE_BYTES`], lowered to fit the
/// server's `max_payload` and the stream's `max_msg_size` (0 or negative:
/// none), headers included; and what set it.
fn message_bytes(max_payload: usize, stream_max: i32) -> (usize, String) {
    let mut bytes = GROUP_MESSAGE_BYTES;
    let mut limit = "the publisher's group size".to_owned();
    if max_payload > 0 && max_payload.saturating_sub(HEADER_ROOM) < bytes {
        bytes = max_payload.saturating_sub(HEADER_ROOM);
        limit = format!("nats-server max_payload {max_payload}");
    }
    if let Ok(stream_max) = usize::try_from(stream_max)
        && stream_max > 0
        && stream_max.saturating_sub(HEADER_ROOM) < bytes
    {
        bytes = stream_max.saturating_sub(HEADER_ROOM);
        limit = format!("the stream's max_msg_size {stream_max}");
    }
    (bytes, limit)
}

impl Journal {
    /// Connects and creates the stream when missing.
    ///
    /// # Errors
    /// [`JournalError`].
    pub async fn connect(settings: JournalSettings) -> Result<Self, JournalError> {
        Self::connect_after(settings, store::JournalOffset::default()).await
    }

    /// [`connect`](Self::connect), given the stream's stored offset: a
    /// stream marked lost, or missing or ending before the offset, is
    /// refused, not created or read (see [`JournalError::Lost`]).
    ///
    /// # Errors
    /// [`JournalError`].
    pub async fn connect_after(
        mut settings: JournalSettings,
        offset: store::JournalOffset,
    ) -> Result<Self, JournalError> {
        let applied = offset.applied;
        let lost = |found: String| JournalError::Lost {
            stream: settings.stream.clone(),
            applied,
            found,
        };
        if let Some(from) = offset.lost_from {
            return Err(lost(format!(
                "was found numbering its messages anew from message {from} while instances \
                 ran (journal_offsets.lost_from)"
            )));
        }
        let servers = settings.servers().map_err(|source| JournalError::Url {
            url: settings.url.clone(),
            source,
        })?;
        let client = async_nats::ConnectOptions::new()
            .retry_on_initial_connect()
            .connection_timeout(Duration::from_secs(5))
            .name("increment")
            .connect(servers);
        // retry_on_initial_connect returns at once; wait (bounded) for the
        // first connection so a wrong URL fails the start.
        let client = client.await.map_err(|source| JournalError::Connect {
            url: settings.url.clone(),
            source,
        })?;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while client.connection_state() != async_nats::connection::State::Connected {
            if tokio::time::Instant::now() >= deadline {
                return Err(JournalError::Stream {
                    stream: settings.stream.clone(),
                    source: format!("no connection to {} within 10 s", settings.url).into(),
                });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let jetstream = jetstream::ContextBuilder::new()
            .timeout(settings.ack_timeout)
            .build(client.clone());
        let stream_error =
            |source: Box<dyn std::error::Error + Send + Sync>| JournalError::Stream {
                stream: settings.stream.clone(),
                source,
            };
        let config = stream::Config {
            name: settings.stream.clone(),
            subjects: vec![settings.subject()],
            storage: stream::StorageType::File,
            retention: stream::RetentionPolicy::Limits,
            discard: stream::DiscardPolicy::New,
            max_bytes: settings.max_bytes,
            duplicate_window: settings.duplicate_window,
            num_replicas: settings.replicas,
            ..Default::default()
        };
        // A cluster starting with us may not have elected its JetStream
        // leader yet: retry for a while before giving up. A stream the
        // database has applied messages of is only looked up, never
        // created: created anew, its sequences would start again below
        // the stored offset (see `JournalError::Lost`).
        let mut attempts = 0;
        let mut stream = loop {
            let found: Result<stream::Stream, Box<dyn std::error::Error + Send + Sync>> =
                if applied > 0 {
                    match jetstream.get_stream(&settings.stream).await {
                        Ok(stream) => Ok(stream),
                        Err(e)
                            if matches!(
                                e.kind(),
                                jetstream::context::GetStreamErrorKind::JetStream(error)
                                    if error.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND
                            ) =>
                        {
                            return Err(lost("does not exist".to_owned()));
                        }
                        Err(e) => Err(Box::new(e)),
                    }
                } else {
                    jetstream
                        .get_or_create_stream(config.clone())
                        .await
                        .map_err(|e| Box::new(e) as _)
                };
            match found {
                Ok(stream) => break stream,
                Err(e) if attempts < 60 => {
                    attempts += 1;
                    tracing::info!(error = %crate::telemetry::error_chain(&*e), "the journal stream is not available yet; retrying");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                Err(e) => return Err(stream_error(e)),
            }
        };
        let info = stream.info().await.map_err(|e| stream_error(Box::new(e)))?;
        if info.state.last_sequence < applied {
            return Err(lost(format!(
                "ends at message {}",
                info.state.last_sequence
            )));
        }
        if let Some(why) = deletes_unapplied(&info.config) {
            return Err(JournalError::Deletes {
                stream: settings.stream.clone(),
                why,
            });
        }
        // An existing stream keeps its own window, and a publish retried
        // after the stream forgot its id would be stored twice: the retry
        // horizon follows the stream's window, not the setting.
        if info.config.duplicate_window != settings.duplicate_window {
            tracing::warn!(
                stream = %settings.stream,
                stream_window_s = info.config.duplicate_window.as_secs_f64(),
                configured_window_s = settings.duplicate_window.as_secs_f64(),
                "the existing journal stream has another duplicate window; publishes are retried within a quarter of the stream's"
            );
            settings.duplicate_window = info.config.duplicate_window;
        }
        let last_sequence = info.state.last_sequence;
        let cursor = Cursor::new(settings.stream.clone());
        let (max_message_bytes, message_limit) = message_bytes(
            client.server_info().max_payload,
            info.config.max_message_size,
        );
        Ok(Self {
            settings,
            client,
            jetstream,
            stream,
            cursor,
            max_message_bytes,
            message_limit,
            last_sequence,
        })
    }

    /// Refuses a `--max-body` whose requests might not fit in one message:
    /// a request is never split, and one over the server's or the stream's
    /// limit would get `503` however often it were sent.
    ///
    /// # Errors
    /// [`JournalError::MessageTooSmall`].
    pub fn check_room_for(&self, max_body: usize) -> Result<(), JournalError> {
        if self.max_message_bytes < max_body.saturating_add(REQUEST_ROOM) {
            return Err(JournalError::MessageTooSmall {
                message_bytes: self.max_message_bytes,
                limit: self.message_limit.clone(),
                max_body,
            });
        }
        Ok(())
    }

    pub fn publisher(&self, metrics: Arc<Metrics>) -> Arc<Publisher> {
        let ack_timeout = self.settings.ack_timeout;
        Publisher::new(
            self.client.clone(),
            self.jetstream.clone(),
            PublisherSettings {
                subject: self.settings.subject(),
                in_flight: self.settings.in_flight,
                max_waiting_groups: 64,
                max_message_bytes: self.max_message_bytes,
                ack_timeout,
                request_timeout: ack_timeout + Duration::from_secs(1),
                retry_horizon: self.settings.duplicate_window / 4,
            },
            metrics,
            Arc::clone(&self.cursor),
            self.last_sequence,
        )
    }
}

/// Why an existing stream's settings would delete messages before they are
/// applied (during a database outage, the backlog waits in the stream for
/// as long as it lasts), or `None`. Only the applied offset may remove them.
fn deletes_unapplied(config: &stream::Config) -> Option<&'static str> {
    if config.discard == stream::DiscardPolicy::Old {
        return Some("it discards old messages when full; set its discard policy to new");
    }
    if config.retention != stream::RetentionPolicy::Limits {
        return Some(
            "its retention removes messages on acknowledgement or without consumers; \
             use limits retention",
        );
    }
    if !config.max_age.is_zero() {
        return Some("it has a maximum message age (max_age); remove it");
    }
    if config.max_messages_per_subject > 0 && !config.discard_new_per_subject {
        return Some(
            "it keeps a maximum number of messages per subject by deleting the oldest; \
             remove max_msgs_per_subject or set discard_new_per_subject",
        );
    }
    None
}

/// How often the stored offset is read while durable requests wait on an
/// instance that is not the writer (the writer learns it from its commits).
const APPLIED_POLL: Duration = Duration::from_millis(25);

/// What became of a durable request's message (see [`wait_applied`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// Applied to the database, the request's row with it.
    Written,
    /// Applied, but the request's row was rejected (the stored total would
    /// have left `bigint`; it is in `rejected_increments`).
    Rejected,
    /// Not known to be applied within the timeout: still held, to be
    /// written.
    Unconfirmed,
    /// Applied, but whether the request's row was rejected could not be
    /// read within the timeout: nothing is held for it any more.
    AppliedUnread,
}

/// Waits until the message `sequence` is applied to the database (by any
/// instance), up to `timeout`, and tells whether `key`'s row in it was.
///
/// Another instance may be the writer: the stored offset tells. One task per
/// instance reads it every [`APPLIED_POLL`] while anyone waits, so the
/// database sees 40 reads a second, not 40 per waiting request. Only when a
/// batch at or past `sequence` rejected a row (rare) does the request ask the
/// database about its own; `timeout` bounds that question too (a database
/// that stops answering must not hold the request past it).
pub async fn wait_applied(
    db: &DatabaseConnection,
    cursor: &Arc<Cursor>,
    sequence: u64,
    key: &str,
    timeout: Duration,
) -> Applied {
    let deadline = tokio::time::Instant::now() + timeout;
    if !wait_sequence(db, cursor, sequence, timeout).await {
        return Applied::Unconfirmed;
    }
    if !cursor.may_be_rejected(sequence) {
        return Applied::Written;
    }
    let rejected = store::journal_rejected(db, cursor.stream(), key, sequence);
    match store::answered_by(deadline, rejected).await {
        Some(true) => Applied::Rejected,
        Some(false) => Applied::Written,
        None => Applied::AppliedUnread,
    }
}

/// `true` once `sequence` is applied (by any instance), `false` at the
/// timeout.
pub async fn wait_sequence(
    db: &DatabaseConnection,
    cursor: &Arc<Cursor>,
    sequence: u64,
    timeout: Duration,
) -> bool {
    // A lost stream's offset counts in another stream than `sequence`.
    let covers = |applied: u64| applied >= sequence && !cursor.is_lost();
    let mut applied = cursor.subscribe_applied();
    if covers(*applied.borrow_and_update()) {
        return true;
    }
    let (_waiting, start_polling) = cursor.enter_wait();
    if start_polling {
        tokio::spawn(poll_applied(db.clone(), Arc::clone(cursor)));
    }
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        tokio::select! {
            changed = applied.changed() => {
                if changed.is_err() {
                    return false;
                }
                if covers(*applied.borrow_and_update()) {
                    return true;
                }
            }
            () = tokio::time::sleep_until(deadline) => {
                return covers(*applied.borrow());
            }
        }
    }
}

/// Reads the stored offset into `cursor` while requests wait for it.
async fn poll_applied(db: DatabaseConnection, cursor: Arc<Cursor>) {
    loop {
        // The offset first, then the rejections: both commit together, so
        // the later read covers every rejection up to the offset read.
        if let Ok(offset) = store::journal_offset(&db, cursor.stream()).await
            && let Ok(rejected) = store::journal_rejected_through(&db, cursor.stream()).await
        {
            if let Some(from) = offset.lost_from {
                cursor.mark_lost(from);
            }
            cursor.note_rejected(rejected);
            cursor.note_applied(offset.applied);
        }
        tokio::time::sleep(APPLIED_POLL).await;
        if cursor.poller_may_stop() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Messages stay under the server's and the stream's limits with room
    /// for their headers; a message over either was refused with `503`
    /// however often it was sent (found by review with `max_payload`
    /// 131072 and a 229 KB batch).
    #[test]
    fn messages_fit_the_servers_and_the_streams_limits() {
        assert_eq!(message_bytes(1024 * 1024, -1).0, GROUP_MESSAGE_BYTES);
        assert_eq!(message_bytes(0, 0).0, GROUP_MESSAGE_BYTES);
        let (bytes, limit) = message_bytes(131_072, -1);
        assert_eq!(bytes, 131_072 - HEADER_ROOM);
        assert!(limit.contains("max_payload 131072"), "{limit}");
        let (bytes, limit) = message_bytes(1024 * 1024, 100_000);
        assert_eq!(bytes, 100_000 - HEADER_ROOM);
        assert!(limit.contains("max_msg_size 100000"), "{limit}");
        assert_eq!(message_bytes(500, -1).0, 0, "no underflow");
    }

    /// `","` (a template of two unset variables) was taken as no servers,
    /// and the client spun at a full core for good.
    #[test]
    fn a_url_without_any_server_is_refused() {
        for url in [",", " , ", ""] {
            assert!(JournalSettings::new(url).servers().is_err(), "{url:?}");
        }
        let servers = JournalSettings::new("nats://a:4222, nats://b:4222,")
            .servers()
            .expect("two servers");
        assert_eq!(servers.len(), 2);
    }
}
