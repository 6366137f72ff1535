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
    flusher::Flusher,
    http::{
        intake::key_message,
        problem::{ApiError, ProblemJson},
    },
    key::{CounterKey, check_key_text},
    store,
    telemetry::error_chain,
};

/// Seconds a reader should wait after the database did not answer.
const READ_RETRY_AFTER: u64 = 1;

/// Largest page of `GET /counters`.
pub const MAX_PAGE: u64 = 1_000;
/// Page size when `limit` is not given.
pub const DEFAULT_PAGE: u64 = 100;
/// Most bytes of JSON a page of `GET /counters` carries (about): it ends
/// early, with `next`, once its counters pass this. A response is held whole
/// until its client takes it, and a page of 1,000 long keys of escaped
/// characters is about 1.6 MB: a client reading such pages slowly on many
/// connections would hold that much each. 1,000 keys of up to about 100
/// bytes still fit one page.
pub const MAX_PAGE_BYTES: usize = 256 * 1024;

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
    /// `counter-not-found`: never stored, and nothing pending on this instance.
    #[oai(status = 404)]
    NotFound(ProblemJson),
    /// `invalid-request`: the key is not a valid key.
    #[oai(status = 422)]
    Unprocessable(ProblemJson),
    /// `database-unavailable`: the database could not be read; retry after
    /// `Retry-After` seconds.
    #[oai(status = 503)]
    Unavailable(ProblemJson, #[oai(header = "Retry-After")] u64),
}

impl CounterResponse {
    fn from_request_error(err: poem::Error) -> Self {
        Self::Unprocessable(ApiError::from_request_error(err).payload())
    }
}

#[derive(ApiResponse)]
#[oai(bad_request_handler = "PageResponse::from_request_error")]
pub enum PageResponse {
    /// A page of stored counters.
    #[oai(status = 200)]
    Page(Json<CounterPage>),
    /// `invalid-request`: a parameter is out of range, or `prefix` or
    /// `after` is not text a key could hold.
    #[oai(status = 422)]
    Unprocessable(ProblemJson),
    /// `database-unavailable`: the database could not be read; retry after
    /// `Retry-After` seconds.
    #[oai(status = 503)]
    Unavailable(ProblemJson, #[oai(header = "Retry-After")] u64),
}

impl PageResponse {
    fn from_request_error(err: poem::Error) -> Self {
        Self::Unprocessable(ApiError::from_request_error(err).payload())
    }
}

fn unavailable(err: &sea_orm::DbErr) -> (ProblemJson, u64) {
    tracing::warn!(error = %error_chain(err), "reading counters failed");
    let refusal = ApiError::DatabaseUnavailable {
        retry_after: READ_RETRY_AFTER,
    };
    (refusal.payload(), READ_RETRY_AFTER)
}

/// About the bytes `counter` adds to a page's JSON (at least as many).
fn json_size(counter: &StoredCounter) -> usize {
    // `{"key":,"value":,"updated_at":""},`, a 20-digit value at most.
    let escaped_key: usize = counter
        .key
        .bytes()
        .map(|byte| match byte {
            b'"' | b'\\' => 2,
            0..=0x1f => 6,
            _ => 1,
        })
        .sum();
    36 + 2 + escaped_key + 20 + counter.updated_at.len()
}

/// The 422 of a `prefix` or `after` that no key could match.
fn check_parameter(name: &str, text: Option<&str>) -> Result<(), ProblemJson> {
    match text.map(|text| check_key_text(text, true)) {
        Some(Err(e)) => Err(ApiError::Invalid(format!("parameter {name:?} {e}")).payload()),
        _ => Ok(()),
    }
}

/// Refuses a `prefix` or `after` whose percent-decoded bytes are not UTF-8.
/// poem decodes them lossily, into U+FFFD, which a stored key may hold:
/// `prefix=%FF` would list such keys instead of being refused. (Parameters
/// nobody reads are left alone.)
fn check_query_utf8(query: Option<&str>) -> Result<(), ProblemJson> {
    for pair in query.unwrap_or_default().split('&') {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        let name = percent_encoding::percent_decode_str(name).decode_utf8_lossy();
        if name != "prefix" && name != "after" {
            continue;
        }
        let bytes: Vec<u8> = percent_encoding::percent_decode_str(value).collect();
        if std::str::from_utf8(&bytes).is_err() {
            return Err(ApiError::Invalid(format!(
                "parameter {name:?} is not UTF-8 once percent-decoded"
            ))
            .payload());
        }
    }
    Ok(())
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
        let key = match CounterKey::parse(key.0) {
            Ok(key) => key,
            Err(e) => {
                return CounterResponse::Unprocessable(ApiError::Invalid(key_message(e)).payload());
            }
        };
        match self.flusher.read_counter(&key).await {
            Ok(Some(reading)) => CounterResponse::Found(Json(Counter {
                value: clamp_i64(i128::from(reading.stored) + reading.pending),
                pending: clamp_i64(reading.pending),
                key: key.as_str().to_owned(),
            })),
            Ok(None) => CounterResponse::NotFound(
                ApiError::CounterNotFound(key.as_str().to_owned()).payload(),
            ),
            Err(e) => {
                let (problem, retry_after) = unavailable(&e);
                CounterResponse::Unavailable(problem, retry_after)
            }
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
        /// Page size, 1 to 1000 (default 100). A page of long keys may end
        /// sooner (at about 256 KiB), with `next`.
        #[oai(validator(minimum(value = "1"), maximum(value = "1000")))]
        limit: Query<Option<u64>>,
        /// Only keys after this one (the previous page's `next`).
        after: Query<Option<String>>,
        request: &poem::Request,
    ) -> PageResponse {
        if let Some(name) =
            super::repeated_parameter(request.uri().query(), &["prefix", "after", "limit"])
        {
            return PageResponse::Unprocessable(
                ApiError::Invalid(format!(
                    "query parameter {name:?} given more than once; give it once"
                ))
                .payload(),
            );
        }
        if let Err(problem) = check_query_utf8(request.uri().query()) {
            return PageResponse::Unprocessable(problem);
        }
        for (name, text) in [
            ("prefix", prefix.0.as_deref()),
            ("after", after.0.as_deref()),
        ] {
            if let Err(problem) = check_parameter(name, text) {
                return PageResponse::Unprocessable(problem);
            }
        }
        let limit = limit.0.unwrap_or(DEFAULT_PAGE).clamp(1, MAX_PAGE);
        let prefix = prefix.0.unwrap_or_default();
        // One more than asked tells whether a next page exists.
        let rows =
            match store::list_counters(&self.db, &prefix, after.0.as_deref(), limit + 1).await {
                Ok(rows) => rows,
                Err(e) => {
                    let (problem, retry_after) = unavailable(&e);
                    return PageResponse::Unavailable(problem, retry_after);
                }
            };
        let mut has_more = false;
        let mut counters: Vec<StoredCounter> = Vec::with_capacity(rows.len());
        let mut page_bytes = 0;
        for row in rows {
            let counter = StoredCounter {
                key: row.key,
                value: row.value,
                updated_at: row.updated_at.to_rfc3339(),
            };
            page_bytes += json_size(&counter);
            if counters.len() as u64 == limit
                || (page_bytes > MAX_PAGE_BYTES && !counters.is_empty())
            {
                has_more = true;
                break;
            }
            counters.push(counter);
        }
        let next = if has_more {
            counters.last().map(|c| c.key.clone())
        } else {
            None
        };
        PageResponse::Page(Json(CounterPage { counters, next }))
    }
}
