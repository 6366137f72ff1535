//! Errors as clients see them: RFC 9457 problem documents
//! (`application/problem+json` with `type`, `title`, `status`, `detail`).
//!
//! [`ApiError`] is every refusal the service decides itself; [`ProblemType`] is
//! the catalogue of stable `type`s (each served as a short description at
//! `/problems/{slug}`). Errors that poem, poem-openapi or the router raise are
//! turned into problems too, by [`ApiError::from_request_error`] and the front
//! door's [`problem_for_status`]. Internals (database errors) are logged by
//! whoever sees them, never put in a body.

use crate::http::intake::content_type_refusal;
use poem::{
    IntoResponse, Response,
    error::ResponseError,
    http::{HeaderValue, StatusCode, header},
};
use poem_openapi::{
    Object,
    error::{ContentTypeError, ParseParamError, ParseRequestPayloadError},
    payload::Payload,
    registry::{MetaSchemaRef, Registry},
    types::Type,
};

/// The media type of every error body.
pub const PROBLEM_JSON: &str = "application/problem+json";

/// An RFC 9457 problem document.
#[derive(Debug, Clone, PartialEq, Eq, Object, serde::Serialize, serde::Deserialize)]
pub struct Problem {
    /// What kind of problem: `/problems/{slug}`, one per cause (docs/api.md
    /// lists them); stable, so clients may branch on it. `about:blank` for
    /// statuses with no cause of their own.
    #[oai(rename = "type")]
    #[serde(rename = "type")]
    pub type_uri: String,
    /// A short summary of the type (the same for every occurrence).
    pub title: String,
    /// The HTTP status code of this response.
    pub status: u16,
    /// What went wrong this time, naming the field or parameter at fault.
    pub detail: String,
}

/// Every cause the service names, with its status and title.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProblemType {
    BadRequest,
    Unauthorized,
    NotFound,
    CounterNotFound,
    MethodNotAllowed,
    RequestTimeout,
    PayloadTooLarge,
    UnsupportedMediaType,
    MalformedJson,
    InvalidRequest,
    PendingOverflow,
    CounterOverflow,
    Overloaded,
    PendingLimit,
    DatabaseUnavailable,
    NotReady,
    FlushFailed,
    JournalUnavailable,
    Unconfirmed,
    InvalidIdempotencyKey,
    IdempotencyKeyReused,
}

impl ProblemType {
    pub const ALL: [Self; 21] = [
        Self::BadRequest,
        Self::Unauthorized,
        Self::NotFound,
        Self::CounterNotFound,
        Self::MethodNotAllowed,
        Self::RequestTimeout,
        Self::PayloadTooLarge,
        Self::UnsupportedMediaType,
        Self::MalformedJson,
        Self::InvalidRequest,
        Self::PendingOverflow,
        Self::CounterOverflow,
        Self::Overloaded,
        Self::PendingLimit,
        Self::DatabaseUnavailable,
        Self::NotReady,
        Self::FlushFailed,
        Self::JournalUnavailable,
        Self::Unconfirmed,
        Self::InvalidIdempotencyKey,
        Self::IdempotencyKeyReused,
    ];

    /// The last segment of the type URI.
    pub fn slug(self) -> &'static str {
        match self {
            Self::BadRequest => "bad-request",
            Self::Unauthorized => "unauthorized",
            Self::NotFound => "not-found",
            Self::CounterNotFound => "counter-not-found",
            Self::MethodNotAllowed => "method-not-allowed",
            Self::RequestTimeout => "request-timeout",
            Self::PayloadTooLarge => "payload-too-large",
            Self::UnsupportedMediaType => "unsupported-media-type",
            Self::MalformedJson => "malformed-json",
            Self::InvalidRequest => "invalid-request",
            Self::PendingOverflow => "pending-overflow",
            Self::CounterOverflow => "counter-overflow",
            Self::Overloaded => "overloaded",
            Self::PendingLimit => "pending-limit",
            Self::DatabaseUnavailable => "database-unavailable",
            Self::NotReady => "not-ready",
            Self::FlushFailed => "flush-failed",
            Self::JournalUnavailable => "journal-unavailable",
            Self::Unconfirmed => "unconfirmed",
            Self::InvalidIdempotencyKey => "invalid-idempotency-key",
            Self::IdempotencyKeyReused => "idempotency-key-reused",
        }
    }

    pub fn status(self) -> StatusCode {
        match self {
            Self::BadRequest => StatusCode::BAD_REQUEST,
            Self::Unauthorized => StatusCode::UNAUTHORIZED,
            Self::NotFound | Self::CounterNotFound => StatusCode::NOT_FOUND,
            Self::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Self::RequestTimeout => StatusCode::REQUEST_TIMEOUT,
            Self::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Self::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::MalformedJson
            | Self::InvalidRequest
            | Self::PendingOverflow
            | Self::CounterOverflow
            | Self::InvalidIdempotencyKey
            | Self::IdempotencyKeyReused => StatusCode::UNPROCESSABLE_ENTITY,
            Self::Overloaded
            | Self::PendingLimit
            | Self::DatabaseUnavailable
            | Self::NotReady
            | Self::FlushFailed
            | Self::JournalUnavailable => StatusCode::SERVICE_UNAVAILABLE,
            Self::Unconfirmed => StatusCode::GATEWAY_TIMEOUT,
        }
    }

    pub fn title(self) -> &'static str {
        match self {
            Self::BadRequest => "The request could not be read",
            Self::Unauthorized => "Missing or wrong bearer token",
            Self::NotFound => "No such resource",
            Self::CounterNotFound => "No such counter",
            Self::MethodNotAllowed => "Method not allowed on this resource",
            Self::RequestTimeout => "The request body did not arrive in time",
            Self::PayloadTooLarge => "The request body is too large",
            Self::UnsupportedMediaType => "The body must be JSON",
            Self::MalformedJson => "The body is not valid JSON",
            Self::InvalidRequest => "A field or parameter is invalid",
            Self::PendingOverflow => "The key's pending sum would leave the 64-bit range",
            Self::CounterOverflow => "The counter's stored total would leave the 64-bit range",
            Self::Overloaded => "Too many requests in flight",
            Self::PendingLimit => "Too many distinct keys are waiting to be written",
            Self::DatabaseUnavailable => "The database could not be read",
            Self::NotReady => "Not ready to serve",
            Self::FlushFailed => "The flush failed",
            Self::JournalUnavailable => "The journal did not take the increment",
            Self::Unconfirmed => "The journal did not confirm the increment in time",
            Self::InvalidIdempotencyKey => "The Idempotency-Key header is not valid",
            Self::IdempotencyKeyReused => "The Idempotency-Key was used for another request",
        }
    }

    /// What the type means for a client: was anything applied, may it retry.
    pub fn description(self) -> &'static str {
        match self {
            Self::BadRequest => {
                "The request line, a header or the path could not be parsed. Nothing was applied. \
                 Fix the request before sending it again."
            }
            Self::Unauthorized => {
                "The admin routes need `Authorization: Bearer <token>` with the configured token. \
                 Nothing was done."
            }
            Self::NotFound => "No route matches the path. Nothing was applied.",
            Self::CounterNotFound => {
                "The counter was never stored and nothing is pending for it on this instance."
            }
            Self::MethodNotAllowed => {
                "The path exists but not with this method; the `Allow` header lists the methods \
                 it takes. Nothing was applied."
            }
            Self::RequestTimeout => {
                "The body was not received within `--body-timeout`. Nothing was applied; sending \
                 it again is safe."
            }
            Self::PayloadTooLarge => {
                "The body is larger than `--max-body`. Nothing was applied; split it."
            }
            Self::UnsupportedMediaType => {
                "`Content-Type` is missing, not a valid media type, or not JSON \
                 (`application/json` or `application/*+json`). Nothing was applied."
            }
            Self::MalformedJson => {
                "The body is not one JSON value. `detail` gives the parser's position. Nothing \
                 was applied."
            }
            Self::InvalidRequest => {
                "The body or a query parameter does not match the schema; `detail` names the \
                 field (and the item's index in a batch). Nothing was applied."
            }
            Self::PendingOverflow => {
                "Adding `value` would push the sum this instance holds for the key out of the \
                 signed 64-bit range. Nothing was applied; retry after the next flush (about one \
                 flush interval)."
            }
            Self::CounterOverflow => {
                "With `wait=true`: the flush committed, but this key's row was not applied because \
                 its stored total would have left the signed 64-bit range; the delta is recorded in \
                 the table `rejected_increments` instead. Sending it again fails the same way."
            }
            Self::Overloaded => {
                "`--max-in-flight` requests were being handled. Nothing was taken: send it again \
                 after `Retry-After` seconds."
            }
            Self::PendingLimit => {
                "`--max-pending-keys` distinct keys (a long key counting one per 64 bytes, each \
                 item of a request with an `Idempotency-Key` counting too) are waiting for the \
                 database (it is slow or down). Nothing was taken: send it again after \
                 `Retry-After` seconds."
            }
            Self::DatabaseUnavailable => {
                "A read could not be served because the database did not answer. Reads are safe \
                 to retry after `Retry-After` seconds."
            }
            Self::NotReady => "Shutting down, or the database does not answer (`/readyz`).",
            Self::FlushFailed => {
                "`POST /admin/flush` could not write; the batch is kept and retried by the \
                 flusher."
            }
            Self::JournalUnavailable => {
                "With the journal on: NATS is unreachable, the stream is full or refused the \
                 message, or too many messages wait to be published. Nothing was taken: send it \
                 again after `Retry-After` seconds."
            }
            Self::Unconfirmed => {
                "With the journal on: the message holding the increment was sent, but the stream \
                 did not acknowledge it in time. It may be stored (and then it is applied exactly \
                 once) or not; sending it again may count it twice. Sent with an \
                 `Idempotency-Key`, sending it again with the same key is safe."
            }
            Self::InvalidIdempotencyKey => {
                "The `Idempotency-Key` header must hold 1 to 255 printable ASCII characters, as \
                 a quoted string (`Idempotency-Key: \"8e03978e-40d5\"`) or bare, and appear \
                 once. Nothing was applied."
            }
            Self::IdempotencyKeyReused => {
                "A request with this `Idempotency-Key` and another body (operation, keys or \
                 values) was taken within `--idempotency-window`. Nothing was applied; use a new \
                 key for a new request."
            }
        }
    }

    pub fn uri(self) -> String {
        format!("/problems/{}", self.slug())
    }

    pub fn from_slug(slug: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|kind| kind.slug() == slug)
    }
}

/// Every refusal the service decides itself. Each variant's problem type
/// (and so its status) is [`ApiError::problem_type`]: the one mapping.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum ApiError {
    /// 400: unreadable request line, header or path.
    #[error("{0}")]
    BadRequest(String),
    /// 401: admin route without the right bearer token.
    #[error("missing or wrong bearer token")]
    Unauthorized,
    /// 404: no route.
    #[error("no resource at this path")]
    NotFound,
    /// 404: no such counter.
    #[error("no counter {0:?}")]
    CounterNotFound(String),
    /// 405: the route exists, the method does not.
    #[error("this path does not take this method; see the Allow header")]
    MethodNotAllowed,
    /// 408: the body did not arrive within `--body-timeout`.
    #[error("the request body was not received within {0:?}")]
    RequestTimeout(std::time::Duration),
    /// 413: the body is larger than `--max-body` (or is any body, on a
    /// route that takes none).
    #[error("the request body is larger than the limit of {limit} bytes")]
    PayloadTooLarge { limit: usize },
    /// 415: no `Content-Type`, not a media type, or not JSON.
    #[error("{0}")]
    UnsupportedMediaType(String),
    /// 422: not JSON.
    #[error("{0}")]
    MalformedJson(String),
    /// 422: JSON, but not a valid request; names the field.
    #[error("{0}")]
    Invalid(String),
    /// 422: the key's pending sum on this instance would overflow.
    #[error("{0}")]
    PendingOverflow(String),
    /// 422 (`wait=true`): the flush committed without this key's row, whose
    /// stored total would have overflowed.
    #[error(
        "the counter's stored total would leave the signed 64-bit range: the increment was not \
         applied (it is recorded in rejected_increments)"
    )]
    CounterOverflow,
    /// 503, not taken: too many requests in flight.
    #[error("too many requests in flight; nothing was taken, retry after {retry_after} s")]
    Overloaded { retry_after: u64 },
    /// 503, not taken: the pending-key bound.
    #[error(
        "too many distinct keys are waiting to be written; nothing was taken, retry after {retry_after} s"
    )]
    PendingLimit { retry_after: u64 },
    /// 503: a read the database did not answer.
    #[error("the database is unavailable; retry after {retry_after} s")]
    DatabaseUnavailable { retry_after: u64 },
    /// 503: `/readyz` says no.
    #[error("{0}")]
    NotReady(&'static str),
    /// 503: `POST /admin/flush` failed.
    #[error("the flush failed; the batch is kept and retried")]
    FlushFailed,
    /// 503, not taken: the journal refused or is unreachable.
    #[error("the journal did not take the increment ({0}); nothing was taken, retry after {1} s")]
    JournalUnavailable(&'static str, u64),
    /// 422: the `Idempotency-Key` header is not valid.
    #[error("{0}")]
    InvalidIdempotencyKey(String),
    /// 422: the `Idempotency-Key` was taken with another body.
    #[error(
        "this Idempotency-Key was used for a request with another body within the idempotency \
         window; nothing was applied"
    )]
    IdempotencyKeyReused,
    /// 504: sent to the journal, not acknowledged in time; may be applied.
    #[error(
        "the journal did not acknowledge the increment in time: it may or may not be applied \
         (at most once); do not resend it blindly"
    )]
    Unconfirmed,
}

impl ApiError {
    pub fn problem_type(&self) -> ProblemType {
        match self {
            Self::BadRequest(_) => ProblemType::BadRequest,
            Self::Unauthorized => ProblemType::Unauthorized,
            Self::NotFound => ProblemType::NotFound,
            Self::CounterNotFound(_) => ProblemType::CounterNotFound,
            Self::MethodNotAllowed => ProblemType::MethodNotAllowed,
            Self::RequestTimeout(_) => ProblemType::RequestTimeout,
            Self::PayloadTooLarge { .. } => ProblemType::PayloadTooLarge,
            Self::UnsupportedMediaType(_) => ProblemType::UnsupportedMediaType,
            Self::MalformedJson(_) => ProblemType::MalformedJson,
            Self::Invalid(_) => ProblemType::InvalidRequest,
            Self::PendingOverflow(_) => ProblemType::PendingOverflow,
            Self::CounterOverflow => ProblemType::CounterOverflow,
            Self::Overloaded { .. } => ProblemType::Overloaded,
            Self::PendingLimit { .. } => ProblemType::PendingLimit,
            Self::DatabaseUnavailable { .. } => ProblemType::DatabaseUnavailable,
            Self::NotReady(_) => ProblemType::NotReady,
            Self::FlushFailed => ProblemType::FlushFailed,
            Self::JournalUnavailable(..) => ProblemType::JournalUnavailable,
            Self::Unconfirmed => ProblemType::Unconfirmed,
            Self::InvalidIdempotencyKey(_) => ProblemType::InvalidIdempotencyKey,
            Self::IdempotencyKeyReused => ProblemType::IdempotencyKeyReused,
        }
    }

    pub fn status(&self) -> StatusCode {
        self.problem_type().status()
    }

    /// Seconds to wait before sending the same request again, for the 503s
    /// that promise it was not taken (or that only read).
    pub fn retry_after(&self) -> Option<u64> {
        match self {
            Self::Overloaded { retry_after }
            | Self::PendingLimit { retry_after }
            | Self::DatabaseUnavailable { retry_after }
            | Self::JournalUnavailable(_, retry_after) => Some(*retry_after),
            _ => None,
        }
    }

    pub fn problem(&self) -> Problem {
        let kind = self.problem_type();
        Problem {
            type_uri: kind.uri(),
            title: kind.title().to_owned(),
            status: kind.status().as_u16(),
            detail: self.to_string(),
        }
    }

    pub fn payload(&self) -> ProblemJson {
        ProblemJson(self.problem())
    }

    /// Classifies what poem-openapi's extractors reject before a handler runs.
    pub fn from_request_error(err: poem::Error) -> Self {
        if let Some(ours) = err.downcast_ref::<ApiError>() {
            return ours.clone();
        }
        if let Some(content_type) = err.downcast_ref::<ContentTypeError>() {
            let refused = match content_type {
                ContentTypeError::ExpectContentType => content_type_refusal(None),
                ContentTypeError::NotSupported { content_type } => {
                    content_type_refusal(Some(content_type))
                }
            };
            return refused.unwrap_or_else(|| Self::UnsupportedMediaType(content_type.to_string()));
        }
        if let Some(parse) = err.downcast_ref::<ParseRequestPayloadError>() {
            return Self::MalformedJson(format!(
                "request body is not valid JSON: {}",
                parse.reason
            ));
        }
        if let Some(param) = err.downcast_ref::<ParseParamError>() {
            return Self::Invalid(format!("parameter {:?}: {}", param.name, param.reason));
        }
        if err.status() == StatusCode::BAD_REQUEST {
            return Self::BadRequest(err.to_string());
        }
        Self::Invalid(err.to_string())
    }
}

impl ResponseError for ApiError {
    fn status(&self) -> StatusCode {
        ApiError::status(self)
    }

    fn as_response(&self) -> Response {
        let mut response = self.payload().into_response();
        if let Some(seconds) = self.retry_after() {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        if matches!(self, Self::Unauthorized) {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

/// A problem for a status that no handler of ours described (the router's
/// 404 and 405, poem's own 400s): typed where we name the cause, otherwise
/// `about:blank` with the status's reason phrase, as RFC 9457 §4.2.1 says.
pub fn problem_for_status(status: StatusCode, detail: String) -> Problem {
    let kind = match status {
        StatusCode::BAD_REQUEST => Some(ProblemType::BadRequest),
        StatusCode::NOT_FOUND => Some(ProblemType::NotFound),
        StatusCode::METHOD_NOT_ALLOWED => Some(ProblemType::MethodNotAllowed),
        _ => None,
    };
    let reason = status.canonical_reason().unwrap_or("Error");
    match kind {
        Some(kind) => Problem {
            type_uri: kind.uri(),
            title: kind.title().to_owned(),
            status: status.as_u16(),
            detail,
        },
        None => Problem {
            type_uri: "about:blank".to_owned(),
            title: reason.to_owned(),
            status: status.as_u16(),
            detail,
        },
    }
}

/// A problem document as a poem-openapi payload (`application/problem+json`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProblemJson(pub Problem);

impl Payload for ProblemJson {
    const CONTENT_TYPE: &'static str = PROBLEM_JSON;

    fn schema_ref() -> MetaSchemaRef {
        <Problem as Type>::schema_ref()
    }

    fn register(registry: &mut Registry) {
        <Problem as Type>::register(registry);
    }
}

impl IntoResponse for ProblemJson {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.0.status).unwrap_or(StatusCode::BAD_REQUEST);
        // Serialising four plain fields cannot fail.
        let body = serde_json::to_vec(&self.0).unwrap_or_default();
        Response::builder()
            .status(status)
            .content_type(PROBLEM_JSON)
            .body(body)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_type_has_its_own_slug_and_round_trips() {
        let mut slugs: Vec<_> = ProblemType::ALL.iter().map(|kind| kind.slug()).collect();
        slugs.sort_unstable();
        slugs.dedup();
        assert_eq!(slugs.len(), ProblemType::ALL.len());
        for kind in ProblemType::ALL {
            assert_eq!(ProblemType::from_slug(kind.slug()), Some(kind));
            assert!(kind.status().is_client_error() || kind.status().is_server_error());
        }
    }

    #[test]
    fn only_not_taken_refusals_carry_retry_after() {
        assert_eq!(
            ApiError::PendingLimit { retry_after: 2 }.retry_after(),
            Some(2)
        );
        assert_eq!(ApiError::Invalid("x".into()).retry_after(), None);
        let response = ApiError::Overloaded { retry_after: 1 }.as_response();
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(response.headers()[header::RETRY_AFTER], "1");
        assert_eq!(response.headers()[header::CONTENT_TYPE], PROBLEM_JSON);
    }
}
