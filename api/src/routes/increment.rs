//! `POST /increment` and `POST /increments`: add values to counters.
//!
//! Bodies are checked and decoded by [`crate::http::intake`] and taken by its
//! [`Intake`], exactly as on the front door's fast path.

use std::{sync::Arc, time::Duration};

use poem_openapi::{
    ApiResponse, Object, OpenApi, ResponseContent, Tags,
    param::{Header, Query},
    payload::Json,
    registry::{MetaMediaType, Registry},
    types::{Example, Type},
};

use sea_orm::DatabaseConnection;

use super::{AppState, Lifecycle};
use crate::{
    flusher::{Flusher, WaitOutcome},
    http::{
        intake::{Increment, Intake, JsonBody, Ticket, decode_batch, decode_increment},
        problem::{ApiError, ProblemJson},
    },
    idempotency::{self, Operation},
    journal::{self, Cursor},
    store::KeyedFate,
};

/// The key of the request's `Idempotency-Key` header, if one was sent.
fn idempotency_key(request: &poem::Request) -> Result<Option<String>, ApiError> {
    idempotency::key_of(request.headers())
        .map_err(|e| ApiError::InvalidIdempotencyKey(e.to_string()))
}

/// `wait` given at all, on a route that has no such parameter.
fn wait_given(request: &poem::Request) -> bool {
    request.uri().query().is_some_and(|query| {
        url::form_urlencoded::parse(query.as_bytes()).any(|(name, _)| name == "wait")
    })
}

/// `wait` given more than once: the two may mean different answers.
fn wait_repeated(request: &poem::Request) -> bool {
    super::repeated_parameter(request.uri().query(), &["wait"]).is_some()
}

#[derive(Tags)]
enum IncrementTag {
    /// Adding to counters.
    Increments,
}

/// An increment: add `value` to the counter named `key`. Other members are
/// ignored; `key` and `value` must appear once.
#[derive(Object)]
#[oai(rename = "Increment", example)]
pub struct IncrementSchema {
    /// Counter name: 1 to 255 characters, stored verbatim (case, spaces,
    /// punctuation, any Unicode except U+0000).
    #[oai(validator(min_length = 1, max_length = 255, pattern = r"^[^\x00]*$"))]
    key: String,
    /// Signed 64-bit integer to add; zero and negative values are allowed.
    value: i64,
}

impl Example for IncrementSchema {
    fn example() -> Self {
        Self {
            key: "page:/home".to_owned(),
            value: 1,
        }
    }
}

/// Several increments, applied all together or not at all.
#[derive(Object)]
#[oai(rename = "IncrementBatch", example)]
pub struct IncrementBatchSchema {
    /// 1 to 1,000 increments; a key may appear several times.
    #[oai(validator(min_items = 1, max_items = 1000))]
    increments: Vec<IncrementSchema>,
}

impl Example for IncrementBatchSchema {
    fn example() -> Self {
        Self {
            increments: vec![
                IncrementSchema::example(),
                IncrementSchema {
                    key: "page:/pricing".to_owned(),
                    value: 3,
                },
            ],
        }
    }
}

/// Answer to an accepted batch.
#[derive(Object)]
pub struct BatchAccepted {
    /// How many increments were accepted.
    pub accepted: u64,
}

/// The body of a `wait=true` increment that was taken but whose flush did
/// not commit within `--wait-timeout`.
#[derive(Object)]
pub struct NotYetCommitted {
    /// Always false: the increment is held by this instance and will be
    /// written by a flush, exactly once. Do not resend it.
    pub committed: bool,
    /// Why the answer came before the commit.
    pub detail: String,
}

/// The body of a `202` from `POST /increment`: empty for a plain request
/// (the original contract, and the cheapest answer), [`NotYetCommitted`] for
/// a `wait=true` one that timed out. OpenAPI cannot say "empty or this", so
/// the document lists no content for the `202` (the plain case, by far the
/// common one) and its description names the schema of the other.
pub struct AcceptedBody(Option<NotYetCommitted>);

impl ResponseContent for AcceptedBody {
    fn media_types() -> Vec<MetaMediaType> {
        Vec::new()
    }

    fn register(registry: &mut Registry) {
        <NotYetCommitted as Type>::register(registry);
    }
}

impl poem::IntoResponse for AcceptedBody {
    fn into_response(self) -> poem::Response {
        match self.0 {
            Some(body) => Json(body).into_response(),
            None => poem::Response::builder().finish(),
        }
    }
}

#[derive(ApiResponse)]
#[oai(bad_request_handler = "BatchResponse::from_request_error")]
pub enum BatchResponse {
    /// Accepted, every increment: held by this instance and written by the
    /// next flush, exactly once. Do not resend.
    #[oai(status = 202)]
    Accepted(Json<BatchAccepted>),
    /// `request-timeout`: the body did not arrive within `--body-timeout`.
    /// Nothing was applied.
    #[oai(status = 408)]
    RequestTimeout(ProblemJson),
    /// `payload-too-large`: the body is over `--max-body` (64 KiB by
    /// default). Nothing was applied.
    #[oai(status = 413)]
    PayloadTooLarge(ProblemJson),
    /// `unsupported-media-type`: `Content-Type` is missing or not JSON.
    /// Nothing was applied.
    #[oai(status = 415)]
    UnsupportedMediaType(ProblemJson),
    /// `malformed-json`, `invalid-request` (`detail` names the item's index
    /// and field) or `pending-overflow`. Nothing was applied.
    #[oai(status = 422)]
    Unprocessable(ProblemJson),
    /// `pending-limit` (too many distinct keys are waiting for the database),
    /// `overloaded` (too many requests in flight) or, with the journal on,
    /// `journal-unavailable`. Nothing was taken: send it again after
    /// `Retry-After` seconds.
    #[oai(status = 503)]
    Unavailable(ProblemJson, #[oai(header = "Retry-After")] u64),
    /// `unconfirmed`, with the journal on: sent to the journal but not
    /// acknowledged in time. It may be applied (at most once) or not; do not
    /// resend it blindly.
    #[oai(status = 504)]
    Unconfirmed(ProblemJson),
}

#[derive(ApiResponse)]
#[oai(bad_request_handler = "IncrementResponse::from_request_error")]
pub enum IncrementResponse {
    /// With `wait=true`: written. The flush carrying this increment has
    /// committed to the database. Empty body.
    #[oai(status = 200)]
    Written,
    /// Accepted: held by this instance and written by the next flush, exactly
    /// once. Empty body. With `wait=true`: taken, but not confirmed within
    /// `--wait-timeout`; the body is then a `NotYetCommitted` JSON object
    /// (`{"committed": false, "detail": …}`). Either way, do not resend it.
    #[oai(status = 202)]
    Accepted(AcceptedBody),
    /// `request-timeout`: the body did not arrive within `--body-timeout`.
    /// Nothing was applied.
    #[oai(status = 408)]
    RequestTimeout(ProblemJson),
    /// `payload-too-large`: the body is over `--max-body` (64 KiB by
    /// default). Nothing was applied.
    #[oai(status = 413)]
    PayloadTooLarge(ProblemJson),
    /// `unsupported-media-type`: `Content-Type` is missing or not JSON.
    /// Nothing was applied.
    #[oai(status = 415)]
    UnsupportedMediaType(ProblemJson),
    /// `malformed-json`, `invalid-request` (`detail` names the field or
    /// parameter), `pending-overflow`, or with `wait=true` `counter-overflow`
    /// (committed without this key's row: the stored total would have left
    /// the 64-bit range). Nothing was applied.
    #[oai(status = 422)]
    Unprocessable(ProblemJson),
    /// `pending-limit` (too many distinct keys are waiting for the database),
    /// `overloaded` (too many requests in flight) or, with the journal on,
    /// `journal-unavailable`. Nothing was taken: send it again after
    /// `Retry-After` seconds.
    #[oai(status = 503)]
    Unavailable(ProblemJson, #[oai(header = "Retry-After")] u64),
    /// `unconfirmed`, with the journal on: sent to the journal but not
    /// acknowledged in time. It may be applied (at most once) or not; do not
    /// resend it blindly.
    #[oai(status = 504)]
    Unconfirmed(ProblemJson),
}

/// The error variants both ingestion responses share, filled from an
/// [`ApiError`], and their parse-error handler.
macro_rules! ingestion_errors {
    ($response:ident) => {
        impl $response {
            fn from_request_error(err: poem::Error) -> Self {
                ApiError::from_request_error(err).into()
            }
        }

        impl From<ApiError> for $response {
            fn from(err: ApiError) -> Self {
                let body = err.payload();
                match err.status().as_u16() {
                    408 => Self::RequestTimeout(body),
                    413 => Self::PayloadTooLarge(body),
                    415 => Self::UnsupportedMediaType(body),
                    503 => Self::Unavailable(body, err.retry_after().unwrap_or(1)),
                    504 => Self::Unconfirmed(body),
                    // Every other refusal of an ingestion request is a 422
                    // (`ApiError::problem_type` decides; the others cannot
                    // arise here).
                    _ => Self::Unprocessable(body),
                }
            }
        }
    };
}

ingestion_errors!(IncrementResponse);
ingestion_errors!(BatchResponse);

pub struct IncrementApi {
    intake: Intake,
    flusher: Arc<Flusher>,
    /// With the journal on: where durable requests see their message applied.
    journal: Option<Arc<Cursor>>,
    db: DatabaseConnection,
    wait_timeout: Duration,
    lifecycle: Lifecycle,
    wait_cut_at_shutdown: Duration,
}

impl IncrementApi {
    pub fn new(state: &AppState) -> Self {
        Self {
            intake: state.intake.clone(),
            flusher: Arc::clone(&state.flusher),
            journal: state.journal.clone(),
            db: state.db.clone(),
            wait_timeout: state.wait_timeout,
            lifecycle: state.lifecycle.clone(),
            wait_cut_at_shutdown: state.wait_cut_at_shutdown,
        }
    }
}

#[OpenApi(tag = "IncrementTag::Increments")]
impl IncrementApi {
    /// Add `value` to the counter `key`.
    ///
    /// Plain requests are write-behind: 202 once the increment is held in
    /// memory; the flusher writes it within about one flush interval, exactly
    /// once. With `wait=true` the answer is 200 only after the flush carrying
    /// it has committed (waiting requests share one flush, which they trigger
    /// early), or 202 with `committed: false` if that did not happen within
    /// the wait timeout (it is held and will be written: do not resend).
    #[oai(path = "/increment", method = "post", operation_id = "increment")]
    async fn increment(
        &self,
        body: JsonBody<IncrementSchema>,
        /// Answer only once the increment is committed to the database.
        wait: Query<Option<bool>>,
        /// Makes a retry safe: requests with the same key within
        /// `--idempotency-window` (24 h by default) are applied once, on any
        /// instance; a repeat gets the first answer. 1 to 255 printable ASCII
        /// characters, quoted (`"…"`) or bare. A key reused with another body
        /// is refused (422 `idempotency-key-reused`).
        #[oai(name = "Idempotency-Key")]
        _key: Header<Option<String>>,
        request: &poem::Request,
    ) -> IncrementResponse {
        let increment = match decode_increment(&body.bytes) {
            Ok(increment) => increment,
            Err(e) => return ApiError::from(e).into(),
        };
        if wait_repeated(request) {
            return ApiError::Invalid(
                "query parameter \"wait\" given more than once; give it once".to_owned(),
            )
            .into();
        }
        let durable = wait.0 == Some(true);
        let key = match idempotency_key(request) {
            Ok(key) => key,
            Err(e) => return e.into(),
        };
        let (ticket, keyed) = match key {
            Some(key) => {
                let keyed = self
                    .intake
                    .accept_keyed(
                        key.clone(),
                        Operation::Increment,
                        std::slice::from_ref(&increment),
                        durable,
                    )
                    .await;
                match keyed {
                    Ok(answer) if durable => (
                        answer.ticket,
                        Some(KeyedWaiter {
                            key,
                            fingerprint: answer.fingerprint,
                        }),
                    ),
                    Ok(_) => return IncrementResponse::Accepted(AcceptedBody(None)),
                    Err(e) => return e.into(),
                }
            }
            None if !durable => {
                return match self.intake.accept(&increment).await {
                    Ok(()) => IncrementResponse::Accepted(AcceptedBody(None)),
                    Err(e) => e.into(),
                };
            }
            None => match self.intake.accept_durable(&increment).await {
                Ok(ticket) => (ticket, None),
                Err(e) => return e.into(),
            },
        };
        self.wait_for(ticket, &increment, keyed.as_ref()).await
    }

    /// Add several increments at once: all of them, or none.
    ///
    /// The whole body is validated first; any bad item gives 422 naming its
    /// index, and nothing is applied. Same guarantee as `POST /increment`:
    /// each accepted increment is written exactly once.
    #[oai(path = "/increments", method = "post", operation_id = "increments")]
    async fn increments(
        &self,
        body: JsonBody<IncrementBatchSchema>,
        /// As for `POST /increment`: the whole batch is applied once per key.
        #[oai(name = "Idempotency-Key")]
        _key: Header<Option<String>>,
        request: &poem::Request,
    ) -> BatchResponse {
        let increments = match decode_batch(&body.bytes) {
            Ok(increments) => increments,
            Err(e) => return ApiError::from(e).into(),
        };
        // Ignored, it would read as a durable answer that the `202` is not.
        if wait_given(request) {
            return ApiError::Invalid(
                "query parameter \"wait\" is not supported by POST /increments (its 202 means \
                 taken, not yet written); send each increment to POST /increment?wait=true \
                 for a durable answer"
                    .to_owned(),
            )
            .into();
        }
        let accepted = match idempotency_key(request) {
            Ok(Some(key)) => self
                .intake
                .accept_keyed(key, Operation::Increments, &increments, false)
                .await
                .map(|answer| answer.accepted),
            Ok(None) => self.intake.accept_all(&increments).await,
            Err(e) => Err(e),
        };
        match accepted {
            Ok(accepted) => BatchResponse::Accepted(Json(BatchAccepted { accepted })),
            Err(e) => e.into(),
        }
    }
}

/// A `wait=true` request's `Idempotency-Key` and body fingerprint.
struct KeyedWaiter {
    key: String,
    fingerprint: i64,
}

impl IncrementApi {
    /// What the database applied under a keyed waiter's key, once its write
    /// committed but may have left it out as a repeat: its own body (written
    /// or rejected), or another (`Reused`). Asked by `deadline`; past it, or
    /// on an error, `Unsettled` (nothing is held for it any more). A key no
    /// longer stored (its window passed, and it was pruned) cannot be told:
    /// `KeyExpired`.
    async fn settle_keyed(
        &self,
        keyed: &KeyedWaiter,
        counter: &str,
        deadline: tokio::time::Instant,
    ) -> WaitOutcome {
        let counters = [counter];
        let question = crate::store::keyed_fate(&self.db, &keyed.key, keyed.fingerprint, &counters);
        match crate::store::answered_by(deadline, question).await {
            Some(Some(KeyedFate::Written)) => WaitOutcome::Committed,
            Some(Some(KeyedFate::Rejected)) => WaitOutcome::Rejected,
            Some(Some(KeyedFate::Reused)) => WaitOutcome::Reused,
            Some(None) => WaitOutcome::KeyExpired,
            None => WaitOutcome::Unsettled,
        }
    }

    /// Waits for `ticket` (a durable request's write) and answers it.
    async fn wait_for(
        &self,
        ticket: Ticket,
        increment: &Increment<'_>,
        keyed: Option<&KeyedWaiter>,
    ) -> IncrementResponse {
        // At shutdown the HTTP drain closes what is still open when it
        // ends: a request still waiting is answered before that (taken and
        // held, for the final flush or the spill), not left to a reset that
        // a client could only read as "unknown" and resend.
        let cut_off = async {
            let began = self.lifecycle.shutdown_began().await;
            tokio::time::sleep_until(began + self.wait_cut_at_shutdown).await;
        };
        let outcome = tokio::select! {
            outcome = self.wait_outcome(ticket, increment, keyed) => outcome,
            () = cut_off => WaitOutcome::ShuttingDown,
        };
        self.answer(outcome)
    }

    /// How the wait for `ticket` ended.
    async fn wait_outcome(
        &self,
        ticket: Ticket,
        increment: &Increment<'_>,
        keyed: Option<&KeyedWaiter>,
    ) -> WaitOutcome {
        let deadline = tokio::time::Instant::now() + self.wait_timeout;
        let outcome = match (ticket, &self.journal) {
            (Ticket::Drain(drain), _) => {
                self.flusher
                    .wait_committed(drain, &increment.key, keyed.is_some(), self.wait_timeout)
                    .await
            }
            // The writer may be another instance, which alone knows whether
            // it left this request out as a repeat: a keyed waiter asks.
            (Ticket::Journal(sequence), Some(cursor)) if keyed.is_some() => {
                if journal::wait_sequence(&self.db, cursor, sequence, self.wait_timeout).await {
                    WaitOutcome::CommittedAskKey
                } else {
                    WaitOutcome::TimedOut
                }
            }
            (Ticket::Journal(sequence), Some(cursor)) => {
                match journal::wait_applied(
                    &self.db,
                    cursor,
                    sequence,
                    &increment.key,
                    self.wait_timeout,
                )
                .await
                {
                    journal::Applied::Written => WaitOutcome::Committed,
                    journal::Applied::Rejected => WaitOutcome::Rejected,
                    journal::Applied::Unconfirmed => WaitOutcome::TimedOut,
                    journal::Applied::AppliedUnread => WaitOutcome::CommittedUnread,
                }
            }
            (Ticket::Journal(_), None) => WaitOutcome::TimedOut,
            (Ticket::Applied(batch_id), _) => {
                let keys = [increment.key.as_str()];
                let deadline = tokio::time::Instant::now() + self.wait_timeout;
                let rejected = crate::store::rejected_in_batch(&self.db, &batch_id, &keys);
                match crate::store::answered_by(deadline, rejected).await {
                    Some(false) => WaitOutcome::Committed,
                    Some(true) => WaitOutcome::Rejected,
                    None => WaitOutcome::Unsettled,
                }
            }
        };
        match (outcome, keyed) {
            (WaitOutcome::CommittedAskKey, Some(keyed)) => {
                self.settle_keyed(keyed, &increment.key, deadline).await
            }
            // Never given to a waiter without a key.
            (WaitOutcome::CommittedAskKey, None) => WaitOutcome::Committed,
            (outcome, _) => outcome,
        }
    }

    /// The answer to a durable request whose wait ended with `outcome`.
    fn answer(&self, outcome: WaitOutcome) -> IncrementResponse {
        match outcome {
            WaitOutcome::Committed | WaitOutcome::CommittedAskKey => IncrementResponse::Written,
            WaitOutcome::Rejected => ApiError::CounterOverflow.into(),
            WaitOutcome::Reused => ApiError::IdempotencyKeyReused.into(),
            WaitOutcome::TimedOut => {
                IncrementResponse::Accepted(AcceptedBody(Some(NotYetCommitted {
                    committed: false,
                    detail: format!(
                        "taken, but not confirmed written within {} ms: the increment is held \
                     and will be written when the database takes it; do not resend it",
                        self.wait_timeout.as_millis()
                    ),
                })))
            }
            WaitOutcome::CommittedUnread => {
                IncrementResponse::Accepted(AcceptedBody(Some(NotYetCommitted {
                    committed: false,
                    detail: "taken, and its batch committed, but whether this row was written or \
                     rejected (its total would have left the 64-bit range; see \
                     rejected_increments) could not be read; nothing more is held for it: \
                     do not resend it"
                        .to_owned(),
                })))
            }
            WaitOutcome::Unsettled => {
                IncrementResponse::Accepted(AcceptedBody(Some(NotYetCommitted {
                    committed: false,
                    detail: format!(
                        "applied under this Idempotency-Key, but whether its row was \
                     written could not be read within {} ms; nothing more is held for it: \
                     resend it with the same key to ask again",
                        self.wait_timeout.as_millis()
                    ),
                })))
            }
            WaitOutcome::ShuttingDown => {
                IncrementResponse::Accepted(AcceptedBody(Some(NotYetCommitted {
                    committed: false,
                    detail: "taken, but this instance is shutting down before the increment was \
                     confirmed written: it is held and will be written (by the final flush, or \
                     from the journal or the spill file after a restart); do not resend it"
                        .to_owned(),
                })))
            }
            WaitOutcome::KeyExpired => {
                IncrementResponse::Accepted(AcceptedBody(Some(NotYetCommitted {
                    committed: false,
                    detail: "committed, but this Idempotency-Key's window passed before what \
                     it applied could be read, so whether this body was written cannot be \
                     told; nothing more is held for it, and a resend would count anew"
                        .to_owned(),
                })))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use poem::IntoResponse;

    use super::*;

    /// Every refusal an ingestion can produce keeps its own status in the
    /// operation's response (a 504 must not turn into a 422, which would say
    /// "nothing was applied").
    #[test]
    fn ingestion_refusals_keep_their_status() {
        let refusals = [
            ApiError::RequestTimeout(Duration::from_secs(1)),
            ApiError::PayloadTooLarge { limit: 1 },
            ApiError::UnsupportedMediaType(String::new()),
            ApiError::MalformedJson(String::new()),
            ApiError::Invalid(String::new()),
            ApiError::PendingOverflow(String::new()),
            ApiError::CounterOverflow,
            ApiError::Overloaded { retry_after: 1 },
            ApiError::PendingLimit { retry_after: 1 },
            ApiError::JournalUnavailable("test", 1),
            ApiError::Unconfirmed,
            ApiError::InvalidIdempotencyKey(String::new()),
            ApiError::IdempotencyKeyReused,
        ];
        for err in refusals {
            let status = err.status();
            assert_eq!(
                IncrementResponse::from(err.clone())
                    .into_response()
                    .status(),
                status,
                "{err:?}"
            );
            assert_eq!(
                BatchResponse::from(err.clone()).into_response().status(),
                status,
                "{err:?}"
            );
        }
    }
}
