//! The one way increments come in: the media type check, the body decoder
//! and [`Intake::accept`], shared by the fast path and both operations so
//! that they cannot disagree on what is taken.
//!
//! The decoder reads the body once, borrowing keys from it, and never builds
//! a `serde_json::Value`: members it ignores are skipped by serde_json's
//! iterative skipper, so any nesting depth is fine (the body size bounds the
//! work) and no depth limit differs between paths.

use std::{borrow::Cow, fmt, sync::Arc};

use poem_openapi::{
    payload::{ParsePayload, Payload},
    registry::{MetaSchemaRef, Registry},
    types::Type,
};
use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::value::RawValue;

use crate::{
    batch::Keyed,
    batcher::{BatchError, Batcher},
    http::problem::ApiError,
    idempotency::{self, Applied, Begin, First, Operation, Recent, Stored},
    journal::{AppendError, Publisher, Refusal},
    key::{CounterKey, KeyError},
    metrics::Metrics,
    telemetry::SharedRecentRequests,
};

/// Most increments one `POST /increments` may carry.
pub const MAX_BATCH_ITEMS: usize = 1_000;

/// One decoded, valid increment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Increment<'a> {
    pub key: CounterKey<'a>,
    pub value: i64,
}

/// Whether a `Content-Type` value names JSON: `application/json` or
/// `application/<anything>+json`, with any well-formed parameters (RFC 9110
/// §8.3.1: `type "/" subtype *( OWS ";" OWS [ name "=" value ] )`; a
/// parameter's value is a token or a quoted string). Parameters are not
/// interpreted: JSON is UTF-8 (RFC 8259).
pub fn is_json_media_type(value: &str) -> bool {
    // What nearly every client sends, decided without the parse.
    if value.eq_ignore_ascii_case("application/json") {
        return true;
    }
    let Some((essence, mut rest)) = split_essence(value) else {
        return false;
    };
    let Some((kind, subtype)) = essence.split_once('/') else {
        return false;
    };
    if !kind.eq_ignore_ascii_case("application") || !is_token(kind) || !is_token(subtype) {
        return false;
    }
    let subtype_is_json = subtype.eq_ignore_ascii_case("json")
        || (subtype.len() > 5 && subtype[subtype.len() - 5..].eq_ignore_ascii_case("+json"));
    if !subtype_is_json {
        return false;
    }
    loop {
        rest = rest.trim_start_matches([' ', '\t']);
        if rest.is_empty() {
            return true;
        }
        let Some(after) = rest.strip_prefix(';') else {
            return false;
        };
        rest = after.trim_start_matches([' ', '\t']);
        if rest.is_empty() || rest.starts_with(';') {
            continue; // An empty parameter is allowed.
        }
        let name_end = rest.find(|c: char| !is_tchar(c)).unwrap_or(rest.len());
        if name_end == 0 || !rest[name_end..].starts_with('=') {
            return false;
        }
        rest = &rest[name_end + 1..];
        if let Some(quoted) = rest.strip_prefix('"') {
            let Some(end) = quoted_string_end(quoted) else {
                return false;
            };
            rest = &quoted[end..];
        } else {
            let value_end = rest.find(|c: char| !is_tchar(c)).unwrap_or(rest.len());
            if value_end == 0 {
                return false;
            }
            rest = &rest[value_end..];
        }
    }
}

/// `type/subtype` and what follows it (parameters), surrounding OWS trimmed.
/// The refusal of a request whose `Content-Type` (`None`: absent or not
/// visible ASCII) is not JSON; `None` when it is. poem-openapi's own check of
/// the operations ends here too ([`ApiError::from_request_error`]), so every
/// path words it alike.
pub fn content_type_refusal(content_type: Option<&str>) -> Option<ApiError> {
    match content_type {
        None => Some(ApiError::UnsupportedMediaType(
            "the request has no Content-Type header; send application/json".to_owned(),
        )),
        Some(value) if is_json_media_type(value) => None,
        Some(value) => Some(ApiError::UnsupportedMediaType(format!(
            "Content-Type {value:?} is not a JSON media type; send application/json"
        ))),
    }
}

fn split_essence(value: &str) -> Option<(&str, &str)> {
    let value = value.trim_matches([' ', '\t']);
    let end = value.find([';', ' ', '\t']).unwrap_or(value.len());
    (end > 0).then(|| value.split_at(end))
}

/// Where a quoted string (after its opening quote) ends, past the closing quote.
fn quoted_string_end(quoted: &str) -> Option<usize> {
    let mut escaped = false;
    for (index, c) in quoted.char_indices() {
        match (escaped, c) {
            (true, _) => escaped = false,
            (false, '\\') => escaped = true,
            (false, '"') => return Some(index + 1),
            (false, c) if c == '\t' || (' '..='~').contains(&c) || !c.is_ascii() => {}
            (false, _) => return None,
        }
    }
    None
}

fn is_token(s: &str) -> bool {
    !s.is_empty() && s.chars().all(is_tchar)
}

fn is_tchar(c: char) -> bool {
    c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c)
}

/// Why a body is not an increment (or a batch of them).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BodyError {
    /// Not one JSON value.
    Malformed(String),
    /// JSON, but not a valid request; the message names the field.
    Invalid(String),
}

impl From<BodyError> for ApiError {
    fn from(err: BodyError) -> Self {
        match err {
            BodyError::Malformed(reason) => {
                ApiError::MalformedJson(format!("request body is not valid JSON: {reason}"))
            }
            BodyError::Invalid(message) => ApiError::Invalid(message),
        }
    }
}

/// Decodes the body of `POST /increment`: an object with `key` (string) and
/// `value` (integer in the signed 64-bit range); other members are ignored,
/// `key` and `value` must appear once.
///
/// # Errors
/// [`BodyError`]: malformed JSON wins over a wrong shape, which names its field.
pub fn decode_increment(body: &[u8]) -> Result<Increment<'_>, BodyError> {
    decode_whole(body, Shaped(IncrementShape))?.map_err(BodyError::Invalid)
}

/// Decodes the body of `POST /increments`: `{"increments": [ … ]}` with 1 to
/// [`MAX_BATCH_ITEMS`] increments.
///
/// # Errors
/// As [`decode_increment`]; an item's error names its index.
pub fn decode_batch(body: &[u8]) -> Result<Vec<Increment<'_>>, BodyError> {
    let items = decode_whole(body, Shaped(BatchShape))?.map_err(BodyError::Invalid)?;
    if items.is_empty() || items.len() > MAX_BATCH_ITEMS {
        return Err(BodyError::Invalid(format!(
            "\"increments\" must hold 1 to {MAX_BATCH_ITEMS} items, found {}",
            items.len()
        )));
    }
    Ok(items)
}

/// Parses the whole body with `seed`; trailing bytes are malformed.
fn decode_whole<'de, S: DeserializeSeed<'de>>(
    body: &'de [u8],
    seed: S,
) -> Result<S::Value, BodyError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(BodyError::Invalid(
            "the request body is empty; send a JSON object".to_owned(),
        ));
    }
    let mut deserializer = serde_json::Deserializer::from_slice(body);
    let value = seed
        .deserialize(&mut deserializer)
        .map_err(|e| BodyError::Malformed(e.to_string()))?;
    deserializer
        .end()
        .map_err(|e| BodyError::Malformed(e.to_string()))?;
    Ok(value)
}

/// What kind of JSON value a member held, for messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Found {
    Null,
    Boolean,
    Number,
    String,
    Array,
    Object,
}

impl fmt::Display for Found {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Null => "null",
            Self::Boolean => "a boolean",
            Self::Number => "a number",
            Self::String => "a string",
            Self::Array => "an array",
            Self::Object => "an object",
        })
    }
}

/// Any JSON value: its text when it is a string, its kind otherwise (consumed
/// either way). Strings borrow from the body unless they hold escapes.
enum Member<'de> {
    Text(Cow<'de, str>),
    Other(Found),
}

impl Member<'_> {
    fn found(&self) -> Found {
        match self {
            Self::Text(_) => Found::String,
            Self::Other(found) => *found,
        }
    }
}

/// The `value` member, read from its JSON text so that `-0` is the integer
/// 0 and `1.0` is not an integer (serde_json reads both as floats).
fn read_value(raw: &RawValue) -> Result<i64, String> {
    let text = raw.get();
    let found = match text.as_bytes().first() {
        Some(b'-' | b'0'..=b'9') => None,
        Some(b'"') => Some(Found::String),
        Some(b't' | b'f') => Some(Found::Boolean),
        Some(b'n') => Some(Found::Null),
        Some(b'[') => Some(Found::Array),
        _ => Some(Found::Object),
    };
    if let Some(found) = found {
        return Err(format!("\"value\" must be an integer, found {found}"));
    }
    if !text.contains(['.', 'e', 'E']) {
        // Digits only: an integer, in range or not.
        return text.parse::<i64>().map_err(|_| {
            format!("\"value\" must be within the signed 64-bit range, found {text}")
        });
    }
    let whole_but_huge = text
        .parse::<f64>()
        .is_ok_and(|f| f.fract() == 0.0 && f.abs() >= 9.223_372_036_854_776e18);
    Err(if whole_but_huge {
        format!("\"value\" must be within the signed 64-bit range, found {text}")
    } else {
        format!("\"value\" must be an integer, found {text}")
    })
}

impl<'de> de::Deserialize<'de> for Member<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(MemberVisitor)
    }
}

struct MemberVisitor;

impl<'de> Visitor<'de> for MemberVisitor {
    type Value = Member<'de>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Self::Value, E> {
        Ok(Member::Text(Cow::Borrowed(v)))
    }

    fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
        Ok(Member::Text(Cow::Owned(v.to_owned())))
    }

    fn visit_string<E>(self, v: String) -> Result<Self::Value, E> {
        Ok(Member::Text(Cow::Owned(v)))
    }

    fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
        Ok(Member::Other(Found::Number))
    }

    fn visit_u64<E>(self, _: u64) -> Result<Self::Value, E> {
        Ok(Member::Other(Found::Number))
    }

    fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
        Ok(Member::Other(Found::Number))
    }

    fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
        Ok(Member::Other(Found::Boolean))
    }

    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(Member::Other(Found::Null))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(Member::Other(Found::Array))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(Member::Other(Found::Object))
    }
}

/// A member name, borrowed when it has no escapes.
struct Name<'de>(Cow<'de, str>);

impl<'de> de::Deserialize<'de> for Name<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        match Member::deserialize(deserializer)? {
            Member::Text(text) => Ok(Self(text)),
            _ => Err(de::Error::custom("a member name must be a string")),
        }
    }
}

/// A JSON value of one expected shape: the outer `Result` of its reading is
/// the JSON syntax, the inner one the shape (so that malformed JSON anywhere
/// wins over a wrong field). A value of another kind is consumed, then named
/// in the message.
trait Shape<'de>: Sized {
    type Output;
    /// What the value must be, for the message about anything else.
    const EXPECTED: &'static str;

    fn read_map<A: MapAccess<'de>>(self, map: A) -> Result<Result<Self::Output, String>, A::Error> {
        MemberVisitor.visit_map(map)?;
        Ok(Err(format!("{}, found {}", Self::EXPECTED, Found::Object)))
    }

    fn read_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Result<Self::Output, String>, A::Error> {
        MemberVisitor.visit_seq(seq)?;
        Ok(Err(format!("{}, found {}", Self::EXPECTED, Found::Array)))
    }
}

/// Reads one value as `S` (see [`Shape`]).
struct Shaped<S>(S);

impl<'de, S: Shape<'de>> DeserializeSeed<'de> for Shaped<S> {
    type Value = Result<S::Output, String>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<S> Shaped<S> {
    fn found<'de, T>(found: Found) -> Result<T, String>
    where
        S: Shape<'de>,
    {
        Err(format!("{}, found {found}", S::EXPECTED))
    }
}

impl<'de, S: Shape<'de>> Visitor<'de> for Shaped<S> {
    type Value = Result<S::Output, String>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
        self.0.read_map(map)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error> {
        self.0.read_seq(seq)
    }

    fn visit_str<E>(self, _: &str) -> Result<Self::Value, E> {
        Ok(Self::found(Found::String))
    }

    fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
        Ok(Self::found(Found::Number))
    }

    fn visit_u64<E>(self, _: u64) -> Result<Self::Value, E> {
        Ok(Self::found(Found::Number))
    }

    fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
        Ok(Self::found(Found::Number))
    }

    fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
        Ok(Self::found(Found::Boolean))
    }

    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(Self::found(Found::Null))
    }
}

/// The increment object.
struct IncrementShape;

impl<'de> Shape<'de> for IncrementShape {
    type Output = Increment<'de>;
    const EXPECTED: &'static str =
        "body must be a JSON object with \"key\" (string) and \"value\" (integer)";

    fn read_map<A: MapAccess<'de>>(
        self,
        mut map: A,
    ) -> Result<Result<Increment<'de>, String>, A::Error> {
        let mut key: Option<Member<'de>> = None;
        let mut value: Option<&'de RawValue> = None;
        let mut duplicate: Option<&'static str> = None;
        while let Some(Name(name)) = map.next_key::<Name<'de>>()? {
            match &*name {
                "key" => {
                    if key.replace(map.next_value()?).is_some() {
                        duplicate.get_or_insert("key");
                    }
                }
                "value" => {
                    if value.replace(map.next_value()?).is_some() {
                        duplicate.get_or_insert("value");
                    }
                }
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        if let Some(field) = duplicate {
            return Ok(Err(format!("\"{field}\" appears more than once")));
        }
        let key = match key {
            None => return Ok(Err("\"key\" is missing".to_owned())),
            Some(Member::Text(text)) => match CounterKey::parse(text) {
                Ok(key) => key,
                Err(e) => return Ok(Err(key_message(e))),
            },
            Some(other) => {
                return Ok(Err(format!(
                    "\"key\" must be a string, found {}",
                    other.found()
                )));
            }
        };
        let value = match value.map(read_value) {
            None => return Ok(Err("\"value\" is missing".to_owned())),
            Some(Ok(value)) => value,
            Some(Err(message)) => return Ok(Err(message)),
        };
        Ok(Ok(Increment { key, value }))
    }
}

/// The 422 text of a key that breaks the rules.
pub fn key_message(err: KeyError) -> String {
    format!("\"key\" {err}")
}

/// The batch object.
struct BatchShape;

impl<'de> Shape<'de> for BatchShape {
    type Output = Vec<Increment<'de>>;
    const EXPECTED: &'static str = "body must be a JSON object with \"increments\" (array)";

    fn read_map<A: MapAccess<'de>>(
        self,
        mut map: A,
    ) -> Result<Result<Vec<Increment<'de>>, String>, A::Error> {
        let mut items: Option<Result<Vec<Increment<'de>>, String>> = None;
        let mut duplicate = false;
        while let Some(Name(name)) = map.next_key::<Name<'de>>()? {
            if name != "increments" {
                map.next_value::<IgnoredAny>()?;
                continue;
            }
            let read = map.next_value_seed(Shaped(ItemsShape))?;
            duplicate |= items.replace(read).is_some();
        }
        if duplicate {
            return Ok(Err("\"increments\" appears more than once".to_owned()));
        }
        Ok(items.unwrap_or_else(|| Err("\"increments\" is missing".to_owned())))
    }
}

/// The `increments` array: its items, or the first bad one's message.
struct ItemsShape;

impl<'de> Shape<'de> for ItemsShape {
    type Output = Vec<Increment<'de>>;
    const EXPECTED: &'static str = "\"increments\" must be an array";

    fn read_seq<A: SeqAccess<'de>>(
        self,
        mut seq: A,
    ) -> Result<Result<Vec<Increment<'de>>, String>, A::Error> {
        let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(MAX_BATCH_ITEMS));
        let mut first_error: Option<String> = None;
        let mut index = 0usize;
        while let Some(item) = seq.next_element_seed(Shaped(IncrementShape))? {
            match item {
                Ok(item) if first_error.is_none() => items.push(item),
                Ok(_) => {}
                Err(e) => {
                    first_error.get_or_insert_with(|| format!("increments[{index}]: {e}"));
                }
            }
            index += 1;
        }
        Ok(match first_error {
            Some(e) => Err(e),
            None => Ok(items),
        })
    }
}

/// The request body of the ingestion operations as poem-openapi sees it:
/// the raw bytes, admitted by [`is_json_media_type`] and decoded by the
/// handler with [`decode_increment`] or [`decode_batch`] (the fast path's
/// checks and decoder). `T` only supplies the schema in the OpenAPI document.
pub struct JsonBody<T> {
    pub bytes: bytes::Bytes,
    schema: std::marker::PhantomData<fn() -> T>,
}

impl<T: Type> Payload for JsonBody<T> {
    const CONTENT_TYPE: &'static str = "application/json";

    fn check_content_type(content_type: &str) -> bool {
        is_json_media_type(content_type)
    }

    fn schema_ref() -> MetaSchemaRef {
        T::schema_ref()
    }

    fn register(registry: &mut Registry) {
        T::register(registry);
    }
}

impl<T: Type> ParsePayload for JsonBody<T> {
    const IS_REQUIRED: bool = true;

    async fn from_request(
        request: &poem::Request,
        body: &mut poem::RequestBody,
    ) -> poem::Result<Self> {
        // The front door has read the body under its limits already.
        let bytes = <bytes::Bytes as poem::FromRequest>::from_request(request, body).await?;
        Ok(Self {
            bytes,
            schema: std::marker::PhantomData,
        })
    }
}

poem_openapi::impl_apirequest_for_payload!(JsonBody<T>, T: Type);

/// Records accepted increments: the one place that takes them, counts them
/// and links the request's span to the flush that will write them.
#[derive(Clone)]
pub struct Intake {
    batcher: Arc<Batcher>,
    /// With the journal on: increments go there instead of the batcher.
    journal: Option<Arc<Publisher>>,
    recent_requests: SharedRecentRequests,
    metrics: Arc<Metrics>,
    /// Seconds a refused client should wait: about one flush interval.
    retry_after: u64,
    /// The `Idempotency-Key`s this instance took recently, with the answer
    /// each got.
    recent: Recent<KeyedAnswer>,
    /// Where keys not remembered here are looked up first (`None`: only the
    /// flush's transaction decides).
    applied: Option<Applied>,
}

/// The answer a keyed request got, given again to its repeats.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyedAnswer {
    /// What a `wait=true` request (first or repeat) waits for.
    pub ticket: Ticket,
    /// How many increments it carried.
    pub accepted: u64,
    /// Its body's fingerprint (its repeats carry the same): a waiter whose
    /// flush left out repeats compares it with what the key applied.
    pub fingerprint: i64,
}

/// Keys remembered per instance unless configured (an older one is still
/// caught by the database).
pub const DEFAULT_RECENT_KEYS: u64 = 100_000;

/// What a durable request waits for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ticket {
    /// The drain with this number (write-behind; [`crate::Flusher::wait_committed`]).
    Drain(u64),
    /// The journal message with this stream sequence
    /// ([`crate::journal::wait_applied`]).
    Journal(u64),
    /// Nothing to wait for: a repeat of a request the database has applied,
    /// in the batch (part) with this id. Written, unless that batch rejected
    /// its row (the stored total would have left `bigint`): a waiter asks
    /// (rare), and only then, so nothing here goes stale.
    Applied(Arc<str>),
}

impl Intake {
    pub fn new(
        batcher: Arc<Batcher>,
        recent_requests: SharedRecentRequests,
        metrics: Arc<Metrics>,
        retry_after: u64,
    ) -> Self {
        Self {
            batcher,
            journal: None,
            recent_requests,
            metrics,
            retry_after,
            recent: Recent::new(
                DEFAULT_RECENT_KEYS,
                crate::store::DEFAULT_IDEMPOTENCY_WINDOW,
            ),
            applied: None,
        }
    }

    /// Looks keys that this instance does not remember up in the database
    /// before taking their request: a repeat of an applied request is then
    /// answered as applied, a reused key refused, on any instance.
    #[must_use]
    pub fn with_applied_lookup(mut self, applied: Applied) -> Self {
        self.applied = Some(applied);
        self
    }

    /// Remembers up to `capacity` `Idempotency-Key`s here, each for `window`.
    #[must_use]
    pub fn with_idempotency(mut self, capacity: u64, window: std::time::Duration) -> Self {
        self.recent = Recent::new(capacity, window);
        self
    }

    /// Takes a request that carried an `Idempotency-Key`: once per key, as
    /// far as this instance can tell (the flush's transaction decides across
    /// instances). A repeat with the same body gets the first answer and is
    /// not taken again; one with another body is refused.
    ///
    /// # Errors
    /// As [`Intake::accept_all`], plus [`ApiError::IdempotencyKeyReused`].
    pub async fn accept_keyed(
        &self,
        key: String,
        operation: Operation,
        increments: &[Increment<'_>],
        durable: bool,
    ) -> Result<KeyedAnswer, ApiError> {
        let batch = operation == Operation::Increments;
        let sums =
            crate::batcher::sum_per_key(increments.iter().map(|i| (i.key.as_str(), i.value)))
                .map_err(|index| {
                    self.refusal(BatchError::RequestOverflow, batch.then_some(index))
                })?;
        let fingerprint = idempotency::fingerprint(
            operation,
            increments.iter().map(|i| (i.key.as_str(), i.value)),
        );
        let first = match self.recent.begin(&key, fingerprint).await {
            Begin::First(first) => first,
            Begin::Repeat(answer) => {
                self.metrics
                    .idempotency_repeats_total
                    .with_label_values(&["memory"])
                    .inc();
                return Ok(answer);
            }
            Begin::Reused => {
                self.metrics
                    .idempotency_reused_total
                    .with_label_values(&["memory"])
                    .inc();
                return Err(ApiError::IdempotencyKeyReused);
            }
        };
        // A request of this key with another body still held here (not yet
        // written) that the memory forgot (it is bounded by count; a
        // database outage outlasts it): the database cannot know the key
        // yet. Asked before the database, as the batcher lets go of a key
        // only once its batch committed; the database's answer still comes
        // first when it has this very body applied. Not with the look-up
        // off: this body may be the one applied (through another instance)
        // and nothing here can tell, so the flush decides, as documented.
        let held_with_another_body = self.applied.is_some()
            && self
                .batcher
                .held_request(&key)
                .is_some_and(|held| held != fingerprint);
        let stored = match &self.applied {
            Some(applied) => applied.lookup(&key).await,
            None => Stored::Unknown,
        };
        match stored {
            Stored::Applied(applied) if applied.fingerprint == fingerprint => {
                self.metrics
                    .idempotency_repeats_total
                    .with_label_values(&["database"])
                    .inc();
                let answer = KeyedAnswer {
                    ticket: Ticket::Applied(applied.batch_id.into()),
                    accepted: increments.len() as u64,
                    fingerprint,
                };
                first.taken(answer.clone());
                return Ok(answer);
            }
            Stored::Applied(_) => {
                self.metrics
                    .idempotency_reused_total
                    .with_label_values(&["database"])
                    .inc();
                // Dropping `first` frees the key here; the database keeps it.
                return Err(ApiError::IdempotencyKeyReused);
            }
            Stored::Absent | Stored::Unknown if held_with_another_body => {
                self.metrics
                    .idempotency_reused_total
                    .with_label_values(&["memory"])
                    .inc();
                return Err(ApiError::IdempotencyKeyReused);
            }
            Stored::Absent | Stored::Unknown => {}
        }
        let keyed = Keyed {
            key,
            fingerprint,
            items: sums
                .into_iter()
                .map(|(k, v, _)| (k.to_owned(), v))
                .collect(),
            // Stamped when the batcher takes it, or when the stream stores it.
            taken_at: None,
        };
        let accepted = increments.len() as u64;
        let answer = match &self.journal {
            Some(journal) => Self::append_keyed(journal, first, keyed, durable, accepted)
                .await
                .map_err(|e| self.append_refusal(e, batch))?,
            None => {
                let drain = self
                    .batcher
                    .record_keyed(&[], std::slice::from_ref(&keyed), chrono::Utc::now())
                    .map_err(|e| self.refusal(e, None))?;
                let answer = KeyedAnswer {
                    ticket: Ticket::Drain(drain),
                    accepted,
                    fingerprint,
                };
                first.taken(answer.clone());
                answer
            }
        };
        self.accepted(answer.accepted);
        Ok(answer)
    }

    /// Journals a keyed request and settles its key's claim by the outcome,
    /// in a task of its own: a client that hangs up meanwhile must not free
    /// the key while its message may still be stored (a reuse with another
    /// body would then be answered `202` and left out when applied).
    async fn append_keyed(
        journal: &Arc<Publisher>,
        first: First<KeyedAnswer>,
        keyed: Keyed,
        durable: bool,
        accepted: u64,
    ) -> Result<KeyedAnswer, AppendError> {
        let journal = Arc::clone(journal);
        let fingerprint = keyed.fingerprint;
        let appending = tokio::spawn(async move {
            match journal.append_keyed(keyed, durable).await {
                Ok(sequence) => {
                    let answer = KeyedAnswer {
                        ticket: Ticket::Journal(sequence),
                        accepted,
                        fingerprint,
                    };
                    first.taken(answer.clone());
                    Ok(answer)
                }
                Err(AppendError::Unconfirmed) => {
                    first.unconfirmed();
                    Err(AppendError::Unconfirmed)
                }
                // Nothing was stored: the key is free again.
                Err(refused) => {
                    drop(first);
                    Err(refused)
                }
            }
        });
        appending.await.unwrap_or(Err(AppendError::Unconfirmed))
    }

    /// Takes increments into the journal instead of the batcher.
    #[must_use]
    pub fn with_journal(mut self, publisher: Arc<Publisher>) -> Self {
        self.journal = Some(publisher);
        self
    }

    /// Takes one increment, to be written by a later flush.
    ///
    /// # Errors
    /// The refusal as the API answers it; nothing is recorded then (except
    /// [`ApiError::Unconfirmed`]: it may be).
    pub async fn accept(&self, increment: &Increment<'_>) -> Result<(), ApiError> {
        if let Some(journal) = &self.journal {
            self.append(journal, &[(&increment.key, increment.value)], false, false)
                .await?;
        } else {
            self.batcher
                .record(&increment.key, increment.value)
                .map_err(|e| self.refusal(e, None))?;
        }
        self.accepted(1);
        Ok(())
    }

    /// Takes one increment that the caller will wait for; returns the ticket
    /// to wait on.
    ///
    /// # Errors
    /// As [`Intake::accept`].
    pub async fn accept_durable(&self, increment: &Increment<'_>) -> Result<Ticket, ApiError> {
        let ticket = if let Some(journal) = &self.journal {
            Ticket::Journal(
                self.append(journal, &[(&increment.key, increment.value)], true, false)
                    .await?,
            )
        } else {
            Ticket::Drain(
                self.batcher
                    .record_durable(&increment.key, increment.value)
                    .map_err(|e| self.refusal(e, None))?,
            )
        };
        self.accepted(1);
        Ok(ticket)
    }

    /// Takes every increment of a batch, or none.
    ///
    /// # Errors
    /// As [`Intake::accept`]; an overflow names the item's index.
    pub async fn accept_all(&self, increments: &[Increment<'_>]) -> Result<u64, ApiError> {
        let items: Vec<(&str, i64)> = increments
            .iter()
            .map(|increment| (increment.key.as_str(), increment.value))
            .collect();
        if let Some(journal) = &self.journal {
            self.append(journal, &items, false, true).await?;
        } else {
            self.batcher
                .record_all(&items)
                .map_err(|(index, e)| self.refusal(e, Some(index)))?;
        }
        let accepted = items.len() as u64;
        self.accepted(accepted);
        Ok(accepted)
    }

    async fn append(
        &self,
        journal: &Publisher,
        items: &[(&str, i64)],
        durable: bool,
        batch: bool,
    ) -> Result<u64, ApiError> {
        journal
            .append(items, durable)
            .await
            .map_err(|e| self.append_refusal(e, batch))
    }

    fn append_refusal(&self, e: AppendError, batch: bool) -> ApiError {
        match e {
            AppendError::Overflow(index) => {
                self.refusal(BatchError::RequestOverflow, batch.then_some(index))
            }
            AppendError::Refused(why) => {
                self.metrics
                    .increments_rejected_total
                    .with_label_values(&["unavailable"])
                    .inc();
                let why = match why {
                    Refusal::Unavailable => "NATS is unreachable",
                    Refusal::Full => "the stream refused it, it may be full",
                    Refusal::Busy => "too many messages wait to be published",
                };
                ApiError::JournalUnavailable(why, self.retry_after)
            }
            AppendError::Unconfirmed => ApiError::Unconfirmed,
        }
    }

    fn accepted(&self, count: u64) {
        self.recent_requests.offer_current();
        self.metrics.increments_accepted_total.inc_by(count);
    }

    fn refusal(&self, err: BatchError, index: Option<usize>) -> ApiError {
        let at = || index.map_or_else(String::new, |i| format!("increments[{i}]: "));
        match err {
            BatchError::DeltaOverflow => {
                let at = at();
                ApiError::PendingOverflow(format!(
                    "{at}\"value\" would push the pending sum of this key out of the signed \
                     64-bit range; retry after the next flush"
                ))
            }
            BatchError::RequestOverflow => {
                let at = at();
                // Not `pending-overflow`: waiting for a flush cannot help.
                ApiError::Invalid(format!(
                    "{at}the values of this key in the request sum outside the signed 64-bit \
                     range; it can never be taken as it is"
                ))
            }
            BatchError::Full => {
                self.metrics
                    .increments_rejected_total
                    .with_label_values(&["unavailable"])
                    .inc();
                ApiError::PendingLimit {
                    retry_after: self.retry_after,
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_media_types_follow_rfc_9110() {
        for good in [
            "application/json",
            "Application/JSON",
            "application/json; charset=utf-8",
            "application/json ; charset=utf-8",
            "application/json;charset=\"utf-8\"",
            "application/json;;",
            "application/json; ;a=b",
            "application/vnd.api+json",
            "application/json; a=\"x\\\"y\"",
            " application/json\t",
        ] {
            assert!(is_json_media_type(good), "{good:?}");
        }
        for bad in [
            "",
            "application",
            "application/",
            "/json",
            "text/json",
            "application/jsonx",
            "application/+json",
            "application/json; =",
            "application/json; a",
            "application/json; a=",
            "application/json; a=\"unterminated",
            "application/json x",
            "application/json; a=b c",
            "application/json, text/plain",
            "appli cation/json",
        ] {
            assert!(!is_json_media_type(bad), "{bad:?}");
        }
    }

    fn ok(body: &str) -> (String, i64) {
        let increment =
            decode_increment(body.as_bytes()).unwrap_or_else(|e| panic!("{body}: {e:?}"));
        (increment.key.as_str().to_owned(), increment.value)
    }

    fn invalid(body: &str) -> String {
        match decode_increment(body.as_bytes()) {
            Err(BodyError::Invalid(message)) => message,
            other => panic!("{body}: {other:?}"),
        }
    }

    #[test]
    fn increments_decode_with_the_whole_i64_range_and_any_ignored_members() {
        assert_eq!(ok(r#"{"key":"a","value":5}"#), ("a".into(), 5));
        assert_eq!(ok(r#" {"value": -0, "key": "a"} "#), ("a".into(), 0));
        assert_eq!(
            ok(r#"{"key":"\u00e9\"q","value":-9223372036854775808}"#),
            ("é\"q".into(), i64::MIN)
        );
        assert_eq!(
            ok(r#"{"key":"a","value":9223372036854775807}"#),
            ("a".into(), i64::MAX)
        );
        let deep = format!(
            r#"{{"key":"a","value":1,"x":{}{}}}"#,
            "[".repeat(5000),
            "]".repeat(5000)
        );
        assert_eq!(ok(&deep), ("a".into(), 1));
    }

    #[test]
    fn bad_increments_name_their_field() {
        assert_eq!(invalid(r#"{"value":1}"#), "\"key\" is missing");
        assert_eq!(invalid(r#"{"key":"a"}"#), "\"value\" is missing");
        assert_eq!(
            invalid(r#"{"key":1,"value":1}"#),
            "\"key\" must be a string, found a number"
        );
        assert_eq!(
            invalid(r#"{"key":"","value":1}"#),
            "\"key\" must not be empty"
        );
        assert_eq!(
            invalid(r#"{"key":"a","value":1.0}"#),
            "\"value\" must be an integer, found 1.0"
        );
        assert_eq!(
            invalid(r#"{"key":"a","value":9223372036854775808}"#),
            "\"value\" must be within the signed 64-bit range, found 9223372036854775808"
        );
        assert_eq!(
            invalid(r#"{"key":"a","value":-9223372036854775809}"#),
            "\"value\" must be within the signed 64-bit range, found -9223372036854775809"
        );
        assert_eq!(
            invalid(r#"{"key":"a","key":"b","value":1}"#),
            "\"key\" appears more than once"
        );
        assert!(invalid("[1]").ends_with("found an array"));
        assert!(invalid("").contains("empty"));
        assert!(matches!(
            decode_increment(br#"{"key":"a","value":1} x"#),
            Err(BodyError::Malformed(_))
        ));
        // Malformed JSON wins over a wrong field before it.
        assert!(matches!(
            decode_increment(br#"{"key":1,"value":"#),
            Err(BodyError::Malformed(_))
        ));
    }

    #[test]
    fn batches_decode_whole_or_name_the_first_bad_item() {
        let items =
            decode_batch(br#"{"increments":[{"key":"a","value":1},{"key":"b","value":2}]}"#)
                .expect("valid");
        assert_eq!(items.len(), 2);
        assert_eq!(
            decode_batch(br#"{"increments":[{"key":"a","value":1},{"key":"b"}]}"#),
            Err(BodyError::Invalid(
                "increments[1]: \"value\" is missing".into()
            ))
        );
        assert!(matches!(
            decode_batch(br#"{"increments":[]}"#),
            Err(BodyError::Invalid(m)) if m.contains("1 to 1000")
        ));
        assert!(matches!(
            decode_batch(br#"{"increments":{}}"#),
            Err(BodyError::Invalid(m)) if m.contains("must be an array")
        ));
    }
}
