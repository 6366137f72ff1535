//! `POST /increment`: add a value to a counter.

use std::{borrow::Cow, sync::Arc, time::Duration};

use poem_openapi::{
    ApiResponse, Object, OpenApi, Tags,
    param::Query,
    payload::Json,
    registry::{MetaSchemaRef, Registry},
    types::{Example, ParseError, ParseFromJSON, ParseResult, ToJSON, Type},
};
use serde_json::Value;

use super::AppState;
use crate::{
    batcher::{BatchError, Batcher, validate_key},
    error::{ApiError, ErrorBody},
    flusher::Flusher,
    metrics::Metrics,
    telemetry::SharedRecentRequests,
};

#[derive(Tags)]
enum IncrementTag {
    /// Adding to counters.
    Increments,
}

/// One increment as the API receives it.
///
/// Parsed by hand (not derived) so every error names its field and the whole
/// `i64` range is checked exactly (poem-openapi's numeric validators compare as
/// `f64`). The schema in the OpenAPI document comes from [`IncrementSchema`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Increment {
    pub key: String,
    pub value: i64,
}

/// An increment: add `value` to the counter named `key`.
#[derive(Object)]
#[oai(rename = "Increment", example)]
struct IncrementSchema {
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

impl Increment {
    /// Parses one increment from JSON.
    ///
    /// # Errors
    /// A message naming the field at fault.
    pub fn from_json(value: &Value) -> Result<Self, String> {
        let Value::Object(fields) = value else {
            return Err(format!(
                "body must be a JSON object with \"key\" (string) and \"value\" (integer), found {}",
                describe(value)
            ));
        };
        let key = match fields.get("key") {
            None => return Err("\"key\" is missing".to_owned()),
            Some(Value::String(key)) => {
                validate_key(key)?;
                key.clone()
            }
            Some(other) => {
                return Err(format!(
                    "\"key\" must be a string, found {}",
                    describe(other)
                ));
            }
        };
        let value = match fields.get("value") {
            None => return Err("\"value\" is missing".to_owned()),
            Some(Value::Number(number)) => match number.as_i64() {
                Some(value) => value,
                None if number.is_u64() || number.as_f64().is_some_and(is_integral) => {
                    return Err(format!(
                        "\"value\" must be within the signed 64-bit range, found {number}"
                    ));
                }
                None => return Err(format!("\"value\" must be an integer, found {number}")),
            },
            Some(other) => {
                return Err(format!(
                    "\"value\" must be an integer, found {}",
                    describe(other)
                ));
            }
        };
        Ok(Self { key, value })
    }
}

/// A whole float too large for `i64` (serde_json reads big integers as floats).
fn is_integral(f: f64) -> bool {
    f.fract() == 0.0 && f.abs() >= 9.223_372_036_854_776e18
}

fn describe(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Implements poem-openapi's `Type` for a hand-parsed request type by
/// borrowing the schema of its derived, documentation-only twin.
macro_rules! schema_from {
    ($parsed:ty, $schema:ty) => {
        impl Type for $parsed {
            const IS_REQUIRED: bool = true;
            type RawValueType = Self;
            type RawElementValueType = Self;

            fn name() -> Cow<'static, str> {
                <$schema>::name()
            }

            fn schema_ref() -> MetaSchemaRef {
                <$schema>::schema_ref()
            }

            fn register(registry: &mut Registry) {
                <$schema>::register(registry);
            }

            fn as_raw_value(&self) -> Option<&Self::RawValueType> {
                Some(self)
            }

            fn raw_element_iter<'a>(
                &'a self,
            ) -> Box<dyn Iterator<Item = &'a Self::RawElementValueType> + 'a> {
                Box::new(std::iter::once(self))
            }
        }
    };
}

schema_from!(Increment, IncrementSchema);
schema_from!(IncrementBatch, IncrementBatchSchema);

impl ParseFromJSON for Increment {
    fn parse_from_json(value: Option<Value>) -> ParseResult<Self> {
        Self::from_json(&value.unwrap_or_default()).map_err(ParseError::custom)
    }
}

impl ToJSON for Increment {
    fn to_json(&self) -> Option<Value> {
        Some(serde_json::json!({ "key": self.key, "value": self.value }))
    }
}

/// Most increments one `POST /increments` may carry.
pub const MAX_BATCH_ITEMS: usize = 1_000;

/// Several increments, validated and applied as a whole.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IncrementBatch {
    pub increments: Vec<Increment>,
}

/// Several increments, applied all together or not at all.
#[derive(Object)]
#[oai(rename = "IncrementBatch", example)]
struct IncrementBatchSchema {
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

impl IncrementBatch {
    /// Parses a batch; an error names the index of the first bad item.
    ///
    /// # Errors
    /// A message naming the field (and the item's index) at fault.
    pub fn from_json(value: &Value) -> Result<Self, String> {
        let items = match value {
            Value::Object(fields) => match fields.get("increments") {
                Some(Value::Array(items)) => items,
                Some(other) => {
                    return Err(format!(
                        "\"increments\" must be an array, found {}",
                        describe(other)
                    ));
                }
                None => return Err("\"increments\" is missing".to_owned()),
            },
            other => {
                return Err(format!(
                    "body must be a JSON object with \"increments\" (array), found {}",
                    describe(other)
                ));
            }
        };
        if items.is_empty() || items.len() > MAX_BATCH_ITEMS {
            return Err(format!(
                "\"increments\" must hold 1 to {MAX_BATCH_ITEMS} items, found {}",
                items.len()
            ));
        }
        let increments = items
            .iter()
            .enumerate()
            .map(|(index, item)| {
                Increment::from_json(item).map_err(|e| format!("increments[{index}]: {e}"))
            })
            .collect::<Result<_, _>>()?;
        Ok(Self { increments })
    }
}

impl ParseFromJSON for IncrementBatch {
    fn parse_from_json(value: Option<Value>) -> ParseResult<Self> {
        Self::from_json(&value.unwrap_or_default()).map_err(ParseError::custom)
    }
}

/// Answer to an accepted batch.
#[derive(Object)]
pub struct BatchAccepted {
    /// How many increments were accepted.
    pub accepted: u64,
}

#[derive(ApiResponse)]
#[oai(bad_request_handler = "BatchResponse::from_request_error")]
pub enum BatchResponse {
    /// Accepted, every increment: held by this instance and written by the next flush.
    #[oai(status = 202)]
    Accepted(Json<BatchAccepted>),
    /// The body did not arrive within `--body-timeout`.
    #[oai(status = 408)]
    RequestTimeout(Json<ErrorBody>),
    /// The body is larger than the limit (`--max-body`, 64 KiB by default).
    #[oai(status = 413)]
    PayloadTooLarge(Json<ErrorBody>),
    /// The `Content-Type` header is missing or not `application/json`.
    #[oai(status = 415)]
    UnsupportedMediaType(Json<ErrorBody>),
    /// The body or one of its items is malformed (`error` names the item's
    /// index and field); nothing was applied.
    #[oai(status = 422)]
    Unprocessable(Json<ErrorBody>),
    /// Too many distinct keys are waiting to be written (the database is
    /// slow or down); nothing was applied. Retry after `Retry-After` seconds.
    #[oai(status = 503)]
    Unavailable(Json<ErrorBody>, #[oai(header = "Retry-After")] u64),
}

#[derive(ApiResponse)]
#[oai(bad_request_handler = "IncrementResponse::from_request_error")]
pub enum IncrementResponse {
    /// With `wait=true`: written. The flush carrying this increment has
    /// committed to the database. Empty body.
    #[oai(status = 200)]
    Written,
    /// Accepted: held by this instance and written by the next flush. Empty body.
    #[oai(status = 202)]
    Accepted,
    /// The body did not arrive within `--body-timeout`.
    #[oai(status = 408)]
    RequestTimeout(Json<ErrorBody>),
    /// The body is larger than the limit (`--max-body`, 64 KiB by default).
    #[oai(status = 413)]
    PayloadTooLarge(Json<ErrorBody>),
    /// The `Content-Type` header is missing or not `application/json`.
    #[oai(status = 415)]
    UnsupportedMediaType(Json<ErrorBody>),
    /// The body is malformed; `error` names the field. No counter changed.
    #[oai(status = 422)]
    Unprocessable(Json<ErrorBody>),
    /// Either too many distinct keys are waiting to be written (the database
    /// is slow or down) and the increment was NOT taken; or, with `wait=true`,
    /// it was taken but its flush did not commit within the wait timeout: it
    /// is then still held and will be written, so do not resend it. `error`
    /// says which. Retry after `Retry-After` seconds.
    #[oai(status = 503)]
    Unavailable(Json<ErrorBody>, #[oai(header = "Retry-After")] u64),
}

/// The error variants both ingestion responses share, filled from an
/// [`ApiError`] (whose `status` they mirror), and their parse-error handler.
macro_rules! ingestion_errors {
    ($response:ident) => {
        impl $response {
            fn from_request_error(err: poem::Error) -> Self {
                ApiError::from_request_error(err).into()
            }
        }

        impl From<ApiError> for $response {
            fn from(err: ApiError) -> Self {
                let body = Json(err.body());
                match err {
                    ApiError::RequestTimeout { .. } => Self::RequestTimeout(body),
                    ApiError::PayloadTooLarge { .. } => Self::PayloadTooLarge(body),
                    ApiError::UnsupportedMediaType(_) => Self::UnsupportedMediaType(body),
                    ApiError::Unprocessable(_) => Self::Unprocessable(body),
                    ApiError::Unavailable { retry_after, .. } => {
                        Self::Unavailable(body, retry_after)
                    }
                }
            }
        }
    };
}

ingestion_errors!(IncrementResponse);
ingestion_errors!(BatchResponse);

/// The refusal of an increment by the batcher, as the API answers it.
fn refusal(err: BatchError, retry_after: u64, metrics: &Metrics) -> ApiError {
    match err {
        BatchError::DeltaOverflow => ApiError::Unprocessable(err.to_string()),
        BatchError::Full => {
            metrics
                .increments_rejected
                .with_label_values(&["unavailable"])
                .inc();
            ApiError::Unavailable {
                message: err.to_string(),
                retry_after,
            }
        }
    }
}

/// The common case of `POST /increment` (no query string, a JSON body the
/// operation accepts, a key the batcher takes), answered before the request
/// enters the route tree. poem-openapi's layers box and copy the request's
/// future several times and parse the body into a `serde_json::Value` first;
/// this path skips both (measured in `BENCHMARKS.md`). Anything else,
/// including every error, falls through to [`IncrementApi::increment`], which
/// gives the documented answer: this path only ever answers 202, exactly as
/// the operation would, and records nothing when it falls through.
#[derive(Clone)]
pub struct FastIncrement {
    batcher: Arc<Batcher>,
    recent_requests: SharedRecentRequests,
    metrics: Arc<Metrics>,
}

/// The body of a plain increment, borrowing the key from the request bytes.
/// Other members are ignored, as by [`Increment::from_json`].
#[derive(serde::Deserialize)]
struct PlainIncrement<'a> {
    #[serde(borrow)]
    key: Cow<'a, str>,
    value: i64,
}

impl FastIncrement {
    pub fn new(state: &AppState) -> Self {
        Self {
            batcher: Arc::clone(&state.batcher),
            recent_requests: Arc::clone(&state.recent_requests),
            metrics: Arc::clone(&state.metrics),
        }
    }

    /// 202 when the increment in `req` (whose body is `body`) was recorded;
    /// `None`, with nothing recorded, when the request is not a plain valid
    /// increment or the batcher refuses it.
    pub fn try_accept(&self, req: &poem::Request, body: Option<&[u8]>) -> Option<poem::Response> {
        if req.method() != poem::http::Method::POST
            || req.uri().path() != "/increment"
            || req.uri().query().is_some()
            || !is_plain_json(req.headers())
        {
            return None;
        }
        let increment: PlainIncrement<'_> = serde_json::from_slice(body?).ok()?;
        validate_key(&increment.key).ok()?;
        self.batcher.record(&increment.key, increment.value).ok()?;
        self.recent_requests.offer_current();
        self.metrics.increments_accepted.inc();
        Some(
            poem::Response::builder()
                .status(poem::http::StatusCode::ACCEPTED)
                .finish(),
        )
    }
}

/// `Content-Type: application/json`, with parameters or not (other JSON
/// types are left to poem-openapi's own check).
fn is_plain_json(headers: &poem::http::HeaderMap) -> bool {
    headers
        .get(poem::http::header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.split(';').next())
        .is_some_and(|essence| essence.trim().eq_ignore_ascii_case("application/json"))
}

pub struct IncrementApi {
    batcher: Arc<Batcher>,
    flusher: Arc<Flusher>,
    recent_requests: SharedRecentRequests,
    metrics: Arc<Metrics>,
    wait_timeout: Duration,
    /// Seconds a refused client should wait: about one flush interval.
    retry_after: u64,
}

impl IncrementApi {
    pub fn new(state: &AppState) -> Self {
        Self {
            batcher: Arc::clone(&state.batcher),
            flusher: Arc::clone(&state.flusher),
            recent_requests: Arc::clone(&state.recent_requests),
            metrics: Arc::clone(&state.metrics),
            wait_timeout: state.wait_timeout,
            retry_after: state.flush_interval.as_secs().max(1),
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
    /// early), or 503 if that did not happen within the wait timeout.
    #[oai(path = "/increment", method = "post", operation_id = "increment")]
    async fn increment(
        &self,
        body: Json<Increment>,
        /// Answer only once the increment is committed to the database.
        wait: Query<Option<bool>>,
    ) -> IncrementResponse {
        let Increment { key, value } = body.0;
        if wait.0 != Some(true) {
            return match self.batcher.record(&key, value) {
                Ok(()) => {
                    self.recent_requests.offer_current();
                    self.metrics.increments_accepted.inc();
                    IncrementResponse::Accepted
                }
                Err(e) => refusal(e, self.retry_after, &self.metrics).into(),
            };
        }
        let ticket = match self.batcher.record_durable(&key, value) {
            Ok(ticket) => ticket,
            Err(e) => return refusal(e, self.retry_after, &self.metrics).into(),
        };
        self.recent_requests.offer_current();
        self.metrics.increments_accepted.inc();
        if self.flusher.wait_committed(ticket, self.wait_timeout).await {
            IncrementResponse::Written
        } else {
            ApiError::Unavailable {
                message: format!(
                    "not confirmed within {} ms: the increment is held and will be \
                     written when the database takes it; do not resend it",
                    self.wait_timeout.as_millis()
                ),
                retry_after: self.retry_after,
            }
            .into()
        }
    }

    /// Add several increments at once: all of them, or none.
    ///
    /// The whole body is validated first; any bad item gives 422 naming its
    /// index, and nothing is applied. Same guarantee as `POST /increment`:
    /// each accepted increment is written exactly once.
    #[oai(path = "/increments", method = "post", operation_id = "increments")]
    async fn increments(&self, body: Json<IncrementBatch>) -> BatchResponse {
        let items: Vec<(&str, i64)> = body
            .0
            .increments
            .iter()
            .map(|i| (i.key.as_str(), i.value))
            .collect();
        match self.batcher.record_all(&items) {
            Ok(()) => {
                self.recent_requests.offer_current();
                let accepted = items.len() as u64;
                self.metrics.increments_accepted.inc_by(accepted);
                BatchResponse::Accepted(Json(BatchAccepted { accepted }))
            }
            Err((_, e @ BatchError::Full)) => refusal(e, self.retry_after, &self.metrics).into(),
            Err((index, e)) => ApiError::Unprocessable(format!("increments[{index}]: {e}")).into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{num::NonZeroU64, time::Duration};

    use poem::{Request, http::Method};

    use super::*;

    fn fast() -> FastIncrement {
        FastIncrement {
            batcher: Arc::new(Batcher::new(
                NonZeroU64::new(100).expect("non-zero"),
                Duration::from_secs(60),
            )),
            recent_requests: SharedRecentRequests::default(),
            metrics: Arc::new(Metrics::new()),
        }
    }

    fn post(uri: &str, content_type: &str) -> Request {
        Request::builder()
            .method(Method::POST)
            .uri(uri.parse().expect("a valid URI"))
            .content_type(content_type)
            .finish()
    }

    #[test]
    fn plain_valid_increments_are_taken_and_counted() {
        let fast = fast();
        for (content_type, body) in [
            ("application/json", r#"{"key":"a","value":5}"#),
            (
                "Application/JSON; charset=utf-8",
                r#" {"value": -2, "key": "a"} "#,
            ),
            (
                "application/json",
                r#"{"key":"a","value":1,"note":[1,{"x":null}]}"#,
            ),
            (
                "application/json",
                r#"{"key":"\u00e9\"q","value":-9223372036854775808}"#,
            ),
        ] {
            let response = fast
                .try_accept(&post("/increment", content_type), Some(body.as_bytes()))
                .unwrap_or_else(|| panic!("{body} is a plain increment"));
            assert_eq!(response.status(), poem::http::StatusCode::ACCEPTED);
            assert!(response.headers().get("content-type").is_none());
        }
        assert_eq!(fast.batcher.pending_for("a"), Some(4));
        assert_eq!(fast.batcher.pending_for("é\"q"), Some(i128::from(i64::MIN)));
        assert_eq!(fast.metrics.increments_accepted.get(), 4);
    }

    #[test]
    fn everything_else_falls_through_with_nothing_recorded() {
        let fast = fast();
        let valid = br#"{"key":"a","value":1}"#.as_slice();
        let long_key = format!(r#"{{"key":"{}","value":1}}"#, "k".repeat(256));
        let cases: Vec<(Request, Option<&[u8]>)> = vec![
            (
                post("/increment?wait=true", "application/json"),
                Some(valid),
            ),
            (
                post("/increment?wait=false", "application/json"),
                Some(valid),
            ),
            (post("/increments", "application/json"), Some(valid)),
            (post("/increment", "text/plain"), Some(valid)),
            (post("/increment", "application/vnd.x+json"), Some(valid)),
            (post("/increment", "application/json"), None),
            (
                post("/increment", "application/json"),
                Some(br#"{"key":"a","value":1.0}"#),
            ),
            (
                post("/increment", "application/json"),
                Some(br#"{"key":"a","value":"1"}"#),
            ),
            (
                post("/increment", "application/json"),
                Some(br#"{"key":"","value":1}"#),
            ),
            (
                post("/increment", "application/json"),
                Some(br#"{"key":"a\u0000","value":1}"#),
            ),
            (
                post("/increment", "application/json"),
                Some(long_key.as_bytes()),
            ),
            (
                post("/increment", "application/json"),
                Some(br#"{"key":"a","value":9223372036854775808}"#),
            ),
            (
                post("/increment", "application/json"),
                Some(br#"{"key":"a","key":"b","value":1}"#),
            ),
            (
                post("/increment", "application/json"),
                Some(br#"{"key":"a","value":1} x"#),
            ),
            (
                Request::builder()
                    .method(Method::PUT)
                    .uri("/increment".parse().expect("a valid URI"))
                    .content_type("application/json")
                    .finish(),
                Some(valid),
            ),
        ];
        for (request, body) in &cases {
            assert!(
                fast.try_accept(request, *body).is_none(),
                "{} {:?} {:?}",
                request.uri(),
                request.headers(),
                body.map(String::from_utf8_lossy)
            );
        }
        // The batcher refuses: the operation answers (with the reason).
        fast.batcher
            .record("a", i64::MAX)
            .expect("the first delta fits");
        assert!(
            fast.try_accept(&post("/increment", "application/json"), Some(valid))
                .is_none()
        );
        assert_eq!(fast.batcher.pending_for("a"), Some(i128::from(i64::MAX)));
        assert_eq!(fast.metrics.increments_accepted.get(), 0);
    }
}
