//! The per-request steps of the front door, in order: observation around
//! everything → request limits (in flight, body) → the fast path → the
//! router; then every error the router produced becomes a problem document.
//! (Connection limits and the protocol come before, in [`super::server`].)

use std::sync::Arc;

use poem::{
    Endpoint, IntoResponse, Request, Response, Result,
    error::ResponseError,
    http::{HeaderValue, Method, StatusCode, header},
};

use crate::{
    http::{
        intake::content_type_refusal,
        intake::{Intake, decode_increment},
        limits::Limits,
        observe::{Observation, RequestLabels, method_label, observed, request_id, request_span},
        problem::{ApiError, PROBLEM_JSON, ProblemJson, problem_for_status},
    },
    metrics::Metrics,
};

/// The routes as the front door needs them, supplied by the route tree.
#[derive(Clone, Copy)]
pub struct RouteTable {
    /// A request path's route label, from a fixed set.
    pub label: fn(&str) -> &'static str,
    /// The methods a route label answers, for the `Allow` header of a 405.
    pub allowed_methods: fn(&'static str) -> &'static str,
    /// Route labels served whatever `--max-in-flight` says: the liveness
    /// probe and the scrape. Requests whose bodies arrive slowly hold their
    /// permits for up to `--body-timeout`; a liveness probe refused
    /// meanwhile would have the orchestrator restart a working instance,
    /// and a refused scrape would hide the saturation it should show (and
    /// fire the instance-down alert). They take no body, so that requests
    /// past the cap hold no memory.
    pub beyond_in_flight: &'static [&'static str],
}

/// Wraps the router (see the module doc).
pub struct FrontDoor<E> {
    router: E,
    routes: RouteTable,
    metrics: Arc<Metrics>,
    limits: Limits,
    /// `None`: every request goes through the router (the differential test
    /// compares both ways).
    fast_path: Option<Intake>,
    /// One log line per request (`--access-log`).
    access_log: bool,
}

impl<E: Endpoint> FrontDoor<E> {
    pub fn new(
        router: E,
        routes: RouteTable,
        metrics: Arc<Metrics>,
        limits: Limits,
        fast_path: Option<Intake>,
    ) -> Self {
        Self {
            router,
            routes,
            metrics,
            limits,
            fast_path,
            access_log: false,
        }
    }

    /// Logs one line per request, refusals of this front door included.
    #[must_use]
    pub fn with_access_log(mut self, enabled: bool) -> Self {
        self.access_log = enabled;
        self
    }

    async fn handle(&self, mut req: Request, route: &'static str) -> Response {
        let beyond_in_flight = self.routes.beyond_in_flight.contains(&route);
        let _permit = if beyond_in_flight {
            None
        } else {
            match self.limits.admit() {
                Ok(permit) => Some(permit),
                Err(e) => return e.as_response(),
            }
        };
        let max_body = if beyond_in_flight {
            0
        } else {
            self.limits.max_body()
        };
        let body = match self.limits.read_body(&mut req, max_body).await {
            Ok(body) => body,
            Err(e) => {
                // The body was not read (whole): the connection cannot carry
                // another request. Saying so keeps clients from sending their
                // next request on a connection about to close.
                let mut response = e.as_response();
                response
                    .headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
                return response;
            }
        };
        if let Some(intake) = &self.fast_path
            && let Some(response) = fast_increment(intake, &req, body.as_deref()).await
        {
            return response;
        }
        let response = match self.router.call(req).await {
            Ok(response) => response.into_response(),
            Err(e) => error_response(&e),
        };
        self.as_problem(response, route)
    }

    /// Any error response that is not a problem document yet (the router's
    /// 404 and 405, static files, poem's own refusals) becomes one.
    fn as_problem(&self, mut response: Response, route: &'static str) -> Response {
        let status = response.status();
        if status == StatusCode::METHOD_NOT_ALLOWED {
            // RFC 9110: a 405 lists what the resource does accept.
            response.headers_mut().insert(
                header::ALLOW,
                HeaderValue::from_static((self.routes.allowed_methods)(route)),
            );
        }
        if !(status.is_client_error() || status.is_server_error())
            || response
                .headers()
                .get(header::CONTENT_TYPE)
                .is_some_and(|value| value.as_bytes() == PROBLEM_JSON.as_bytes())
        {
            return response;
        }
        let detail = status_detail(status).unwrap_or_else(|| reason(status));
        let mut problem = ProblemJson(problem_for_status(status, detail)).into_response();
        for (name, value) in response.headers() {
            if name != header::CONTENT_TYPE && name != header::CONTENT_LENGTH {
                problem.headers_mut().insert(name.clone(), value.clone());
            }
        }
        problem
    }
}

/// A router error as a problem: ours as they are, poem's by status.
fn error_response(err: &poem::Error) -> Response {
    if let Some(ours) = err.downcast_ref::<ApiError>() {
        return ours.as_response();
    }
    let status = err.status();
    let detail = status_detail(status).unwrap_or_else(|| {
        // 5xx texts may describe internals.
        if status.is_server_error() {
            reason(status)
        } else {
            err.to_string()
        }
    });
    ProblemJson(problem_for_status(status, detail)).into_response()
}

/// Our own wording for the statuses the router answers by itself.
fn status_detail(status: StatusCode) -> Option<String> {
    match status {
        StatusCode::NOT_FOUND => Some(ApiError::NotFound.to_string()),
        StatusCode::METHOD_NOT_ALLOWED => Some(ApiError::MethodNotAllowed.to_string()),
        _ => None,
    }
}

fn reason(status: StatusCode) -> String {
    status.canonical_reason().unwrap_or("error").to_owned()
}

impl<E: Endpoint> Endpoint for FrontDoor<E> {
    type Output = Response;

    async fn call(&self, req: Request) -> Result<Self::Output> {
        let labels = RequestLabels {
            route: (self.routes.label)(req.uri().path()),
            method: method_label(req.method()),
        };
        let request_id = request_id(req.headers());
        let observation = Observation {
            labels,
            span: request_span(labels, req.headers(), &request_id),
            request_bytes: self.access_log.then(|| declared_length(&req)).flatten(),
            request_id,
            access_log: self.access_log,
        };
        Ok(observed(&self.metrics, observation, self.handle(req, labels.route)).await)
    }
}

/// The request's `Content-Length`, when it declared one (a chunked body's
/// size is not known before it is read).
fn declared_length(req: &Request) -> Option<u64> {
    req.headers()
        .get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

/// `POST /increment` without a query string (with or without an
/// `Idempotency-Key`), answered before the route tree
/// (whose layers box and copy each request's future): the same checks, the
/// same decoder and the same [`Intake`] as the operation
/// (`routes::increment`), so the answer is the same either way; the
/// differential test holds both to that. `None` for every other request.
async fn fast_increment(intake: &Intake, req: &Request, body: Option<&[u8]>) -> Option<Response> {
    if req.method() != Method::POST
        || req.uri().path() != "/increment"
        || req.uri().query().is_some()
    {
        return None;
    }
    let decoded = content_type_refusal(req.content_type())
        .map_or(Ok(()), Err)
        .and_then(|()| decode_increment(body.unwrap_or_default()).map_err(ApiError::from));
    let key = crate::idempotency::key_of(req.headers())
        .map_err(|e| ApiError::InvalidIdempotencyKey(e.to_string()));
    let accepted = match (decoded, key) {
        (Err(e), _) | (Ok(_), Err(e)) => Err(e),
        (Ok(increment), Ok(None)) => intake.accept(&increment).await,
        (Ok(increment), Ok(Some(key))) => intake
            .accept_keyed(
                key,
                crate::idempotency::Operation::Increment,
                std::slice::from_ref(&increment),
                false,
            )
            .await
            .map(|_| ()),
    };
    Some(match accepted {
        Ok(()) => Response::builder().status(StatusCode::ACCEPTED).finish(),
        Err(e) => e.as_response(),
    })
}
