//! Errors as clients see them, and the single mapping from failures to HTTP.
//!
//! Handlers and middleware produce an [`ApiError`]; [`ApiError::status`] is the
//! only place that decides a status. Internals (database errors) are logged by
//! whoever sees them and never put in a response body.

use std::error::Error as StdError;

use poem::{IntoResponse, Response, error::ResponseError, http::StatusCode};
use poem_openapi::{
    Object,
    error::{ContentTypeError, ParseRequestPayloadError},
};

/// Body of every error response.
#[derive(Debug, Clone, Object, serde::Serialize, PartialEq, Eq)]
pub struct ErrorBody {
    /// What is wrong, naming the field when one is at fault.
    pub error: String,
}

/// Every error the API answers with.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum ApiError {
    /// 408: the body did not arrive within `--body-timeout`.
    #[error("the request body was not received within {seconds} s")]
    RequestTimeout { seconds: u64 },
    /// 413: the body is larger than `--max-body`.
    #[error("request body is larger than the limit of {limit} bytes")]
    PayloadTooLarge { limit: usize },
    /// 415: no `Content-Type`, or not JSON.
    #[error("{0}")]
    UnsupportedMediaType(String),
    /// 422: the body is not a valid request; the message names the field.
    #[error("{0}")]
    Unprocessable(String),
    /// 503: not taken (or not confirmed) now; retry after `retry_after` seconds.
    #[error("{message}")]
    Unavailable { message: String, retry_after: u64 },
}

impl ApiError {
    /// The one mapping from error to status.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::RequestTimeout { .. } => StatusCode::REQUEST_TIMEOUT,
            Self::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Self::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::Unprocessable(_) => StatusCode::UNPROCESSABLE_ENTITY,
            Self::Unavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    pub fn body(&self) -> ErrorBody {
        ErrorBody {
            error: self.to_string(),
        }
    }

    /// Classifies what poem-openapi's extractors reject before a handler runs.
    pub fn from_request_error(err: poem::Error) -> Self {
        if let Some(content_type) = err.downcast_ref::<ContentTypeError>() {
            return Self::UnsupportedMediaType(match content_type {
                ContentTypeError::ExpectContentType => {
                    "the request has no Content-Type header; send application/json".to_owned()
                }
                ContentTypeError::NotSupported { content_type } => {
                    format!("Content-Type {content_type:?} is not supported; send application/json")
                }
            });
        }
        if let Some(parse) = err.downcast_ref::<ParseRequestPayloadError>() {
            return Self::Unprocessable(payload_message(&parse.reason));
        }
        Self::Unprocessable(err.to_string())
    }
}

/// Our own parsers' messages arrive wrapped by poem-openapi as
/// `failed to parse "Type": <message>`; serde_json's as they are.
fn payload_message(reason: &str) -> String {
    if let Some(rest) = reason.strip_prefix("failed to parse \"")
        && let Some((_type_name, message)) = rest.split_once("\": ")
    {
        return message.to_owned();
    }
    format!("request body is not valid JSON: {reason}")
}

impl ResponseError for ApiError {
    fn status(&self) -> StatusCode {
        ApiError::status(self)
    }

    fn as_response(&self) -> Response {
        let response = poem::web::Json(self.body()).with_status(ApiError::status(self));
        match self {
            Self::Unavailable { retry_after, .. } => response
                .with_header(poem::http::header::RETRY_AFTER, retry_after.to_string())
                .into_response(),
            _ => response.into_response(),
        }
    }
}

/// `error: cause: cause…`, for logs.
pub fn error_chain(err: &(dyn StdError + 'static)) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
