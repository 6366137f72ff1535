//! Reading counters back: one key (stored + pending here), or stored counters
//! by prefix with keyset pagination.

use std::sync::Arc;

use poem_openapi::{
    ApiResponse, Object, OpenApi, Tags,
    param::{Path, Query},
    payload::Json,
};
use sea_orm::DatabaseConnection;

use super::AppState;
use crate::{
    batcher::validate_key,
    error::{ApiError, ErrorBody, error_chain},
    flusher::Flusher,
    store,
};

/// Largest page of `GET /counters`.
pub const MAX_PAGE: u64 = 1_000;
/// Page size when `limit` is not given.
pub const DEFAULT_PAGE: u64 = 100;

#[derive(Tags)]
enum CounterTag {
    /// Reading counters.
    Counters,
}

/// One counter as this instance sees it.
#[derive(Object, Debug, PartialEq, Eq)]
pub struct Counter {
    pub key: String,
    /// Stored value plus what is pending on this instance.
    pub value: i64,
    /// The part accepted by this instance and not yet written to the database.
    /// Other instances may hold pending increments of their own.
    pub pending: i64,
}

/// A stored counter.
#[derive(Object, Debug, PartialEq, Eq)]
pub struct StoredCounter {
    pub key: String,
    /// The value in the database: the cluster-wide truth as of the last flushes.
    pub value: i64,
    /// When a flush last changed it (RFC 3339).
    pub updated_at: String,
}

/// A page of stored counters.
#[derive(Object, Debug, PartialEq, Eq)]
pub struct CounterPage {
    /// In key order.
    pub counters: Vec<StoredCounter>,
    /// Pass as `after` to get the next page; absent on the last page.
    #[oai(skip_serializing_if_is_none)]
    pub next: Option<String>,
}

#[derive(ApiResponse)]
#[oai(bad_request_handler = "CounterResponse::from_request_error")]
pub enum CounterResponse {
    /// The counter.
    #[oai(status = 200)]
    Found(Json<Counter>),
    /// Never stored, and nothing pending on this instance.
    #[oai(status = 404)]
    NotFound(Json<ErrorBody>),
    /// The key is not a valid key.
    #[oai(status = 422)]
    Unprocessable(Json<ErrorBody>),
    /// The database could not be read.
    #[oai(status = 503)]
    Unavailable(Json<ErrorBody>),
}

impl CounterResponse {
    fn from_request_error(err: poem::Error) -> Self {
        Self::Unprocessable(Json(ApiError::from_request_error(err).body()))
    }
}

#[derive(ApiResponse)]
#[oai(bad_request_handler = "PageResponse::from_request_error")]
pub enum PageResponse {
    /// A page of stored counters.
    #[oai(status = 200)]
    Page(Json<CounterPage>),
    /// A parameter is out of range.
    #[oai(status = 422)]
    Unprocessable(Json<ErrorBody>),
    /// The database could not be read.
    #[oai(status = 503)]
    Unavailable(Json<ErrorBody>),
}

impl PageResponse {
    fn from_request_error(err: poem::Error) -> Self {
        Self::Unprocessable(Json(ApiError::from_request_error(err).body()))
    }
}

fn unavailable(err: &sea_orm::DbErr) -> ErrorBody {
    tracing::warn!(error = %error_chain(err), "reading counters failed");
    ErrorBody {
        error: "the database is unavailable; retry later".to_owned(),
    }
}

fn clamp_i64(value: i128) -> i64 {
    i64::try_from(value).unwrap_or(if value < 0 { i64::MIN } else { i64::MAX })
}

fn example_key() -> String {
    "page:/home".to_owned()
}

pub struct CounterApi {
    flusher: Arc<Flusher>,
    db: DatabaseConnection,
}

impl CounterApi {
    pub fn new(state: &AppState, flusher: Arc<Flusher>) -> Self {
        Self {
            flusher,
            db: state.db.clone(),
        }
    }
}

#[OpenApi(tag = "CounterTag::Counters")]
impl CounterApi {
    /// Read one counter: stored value plus what is pending on this instance.
    ///
    /// Keys with `/`, spaces, `%` or any Unicode work percent-encoded
    /// (`page%3A%2Fhome`). Behind a load balancer, `pending` is this instance's
    /// share only; the stored value is the cluster-wide truth after a flush.
    #[oai(path = "/counters/:key", method = "get", operation_id = "getCounter")]
    async fn get_counter(
        &self,
        /// The counter's key, percent-encoded.
        #[oai(example = "example_key")]
        key: Path<String>,
    ) -> CounterResponse {
        if let Err(message) = validate_key(&key.0) {
            return CounterResponse::Unprocessable(Json(ErrorBody {
                error: message.to_owned(),
            }));
        }
        match self.flusher.read_counter(&key.0).await {
            Ok(Some(reading)) => CounterResponse::Found(Json(Counter {
                value: clamp_i64(i128::from(reading.stored) + reading.pending),
                pending: clamp_i64(reading.pending),
                key: key.0,
            })),
            Ok(None) => CounterResponse::NotFound(Json(ErrorBody {
                error: format!("no counter {:?}", key.0),
            })),
            Err(e) => CounterResponse::Unavailable(Json(unavailable(&e))),
        }
    }

    /// List stored counters in key order, optionally by prefix, a page at a time.
    ///
    /// Keyset pagination: pass the `next` of a page as `after` to get the
    /// following one. Lists what is in the database (pending increments are
    /// not included).
    #[oai(path = "/counters", method = "get", operation_id = "listCounters")]
    async fn list_counters(
        &self,
        /// Only keys starting with this (exact, case-sensitive).
        prefix: Query<Option<String>>,
        /// Page size, 1 to 1000 (default 100).
        #[oai(validator(minimum(value = "1"), maximum(value = "1000")))]
        limit: Query<Option<u64>>,
        /// Only keys after this one (the previous page's `next`).
        after: Query<Option<String>>,
    ) -> PageResponse {
        let limit = limit.0.unwrap_or(DEFAULT_PAGE).clamp(1, MAX_PAGE);
        let prefix = prefix.0.unwrap_or_default();
        // One more than asked tells whether a next page exists.
        let rows =
            match store::list_counters(&self.db, &prefix, after.0.as_deref(), limit + 1).await {
                Ok(rows) => rows,
                Err(e) => return PageResponse::Unavailable(Json(unavailable(&e))),
            };
        let has_more = rows.len() as u64 > limit;
        let counters: Vec<StoredCounter> = rows
            .into_iter()
            .take(limit as usize)
            .map(|row| StoredCounter {
                key: row.key,
                value: row.value,
                updated_at: row.updated_at.to_rfc3339(),
            })
            .collect();
        let next = if has_more {
            counters.last().map(|c| c.key.clone())
        } else {
            None
        };
        PageResponse::Page(Json(CounterPage { counters, next }))
    }
}
