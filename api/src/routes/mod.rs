//! The HTTP API, one module (and one `#[OpenApi]` struct) per tag, the route
//! table, and the router with the front door around it.

pub mod admin;
pub mod counters;
pub mod health;
pub mod increment;
mod pages;
pub mod problems;

use std::sync::Arc;

use poem::{Endpoint, EndpointExt, Route, get, handler, web::Data};
use poem_openapi::OpenApiService;
use sea_orm::DatabaseConnection;

use self::pages::SharedPage;
use crate::{
    batcher::Batcher,
    flusher::Flusher,
    http::{FrontDoor, RouteTable, intake::Intake, limits::Limits},
    metrics::Metrics,
};

/// The first of `names` given more than once in `query` (`?wait=false&wait=true`,
/// or `w%61it=…` beside `wait=…`: names are compared decoded, as the query
/// reader reads them). The reader would take the first, silently; which one
/// the client meant cannot be told.
pub(crate) fn repeated_parameter<'a>(query: Option<&str>, names: &[&'a str]) -> Option<&'a str> {
    let query = query?;
    names.iter().copied().find(|wanted| {
        url::form_urlencoded::parse(query.as_bytes())
            .filter(|(name, _)| name == wanted)
            .count()
            > 1
    })
}

/// Readiness as the load balancer sees it: true until shutdown begins.
#[derive(Clone, Default)]
pub struct Lifecycle {
    /// When shutdown began (`None` until then), for readiness and for the
    /// requests still waiting then.
    began: Arc<tokio::sync::watch::Sender<Option<tokio::time::Instant>>>,
}

impl Lifecycle {
    pub fn begin_shutdown(&self) {
        self.began.send_if_modified(|began| {
            let first = began.is_none();
            if first {
                *began = Some(tokio::time::Instant::now());
            }
            first
        });
    }

    pub fn is_shutting_down(&self) -> bool {
        self.began.borrow().is_some()
    }

    /// Resolves, once shutdown has begun, to when it began.
    pub async fn shutdown_began(&self) -> tokio::time::Instant {
        let mut began = self.began.subscribe();
        let seen = began.wait_for(Option::is_some).await.map(|began| *began);
        match seen {
            Ok(began) => began.unwrap_or_else(tokio::time::Instant::now),
            // The sender lives as long as `self`.
            Err(_) => std::future::pending().await,
        }
    }
}

/// What the routes need.
#[derive(Clone)]
pub struct AppState {
    pub batcher: Arc<Batcher>,
    /// Owns the write path; counter reads go through it to stay consistent
    /// with flushes.
    pub flusher: Arc<Flusher>,
    /// Where increments are taken (fast path and operations alike).
    pub intake: Intake,
    pub db: DatabaseConnection,
    pub lifecycle: Lifecycle,
    pub metrics: Arc<Metrics>,
    pub max_body: usize,
    pub body_timeout: std::time::Duration,
    pub max_in_flight: usize,
    pub flush_interval: std::time::Duration,
    pub wait_timeout: std::time::Duration,
    /// How long after shutdown begins a request still waiting for its
    /// write is answered: inside the HTTP drain, which closes whatever is
    /// still open when it ends.
    pub wait_cut_at_shutdown: std::time::Duration,
    /// `None`: the admin routes are not mounted (404).
    pub admin_token: Option<Arc<str>>,
    /// Answer plain `POST /increment` on the front door's fast path.
    pub fast_path: bool,
    /// One log line per request.
    pub access_log: bool,
    /// With the journal on: what is applied, for durable requests.
    pub journal: Option<Arc<crate::journal::Cursor>>,
    /// With the journal on: its connection, for readiness.
    pub journal_client: Option<async_nats::Client>,
}

/// The routes as metric labels: a fixed set, whatever path a client sends.
pub const ROUTE_LABELS: &[&str] = &[
    "/increment",
    "/increments",
    "/counters",
    "/counters/{key}",
    "/healthz",
    "/readyz",
    "/metrics",
    "/openapi.json",
    "/docs",
    "/problems/{slug}",
    "/admin",
    "other",
];

/// Maps a request path to its route label.
pub fn route_label(path: &str) -> &'static str {
    match path {
        "/increment" => "/increment",
        "/increments" => "/increments",
        "/counters" => "/counters",
        p if p.starts_with("/counters/") => "/counters/{key}",
        "/healthz" => "/healthz",
        "/readyz" => "/readyz",
        "/metrics" => "/metrics",
        "/openapi.json" => "/openapi.json",
        p if p == "/docs" || p.starts_with("/docs/") => "/docs",
        p if p.starts_with("/problems/") => "/problems/{slug}",
        p if p.starts_with("/admin/") => "/admin",
        _ => "other",
    }
}

/// The methods a route label answers, for the `Allow` header of a 405.
pub fn allowed_methods(route: &'static str) -> &'static str {
    match route {
        "/increment" | "/increments" | "/admin" => "POST",
        _ => "GET, HEAD",
    }
}

/// The route table as the front door takes it.
pub const ROUTES: RouteTable = RouteTable {
    label: route_label,
    allowed_methods,
    beyond_in_flight: &["/healthz", "/metrics"],
};

/// The OpenAPI service with every tag.
pub fn openapi(
    state: &AppState,
) -> OpenApiService<
    (
        increment::IncrementApi,
        counters::CounterApi,
        health::HealthApi,
        problems::ProblemsApi,
    ),
    (),
> {
    OpenApiService::new(
        (
            increment::IncrementApi::new(state),
            counters::CounterApi::new(state, Arc::clone(&state.flusher)),
            health::HealthApi::new(state),
            problems::ProblemsApi,
        ),
        "increment",
        env!("CARGO_PKG_VERSION"),
    )
    .description(
        "Adds integers to named counters. Increments are summed in memory per key and \
         written to the database in batches, each exactly once. `202 Accepted` means the \
         increment is held by this instance and will be written by the next flush \
         (default: within a second). Every error is an RFC 9457 problem document \
         (`application/problem+json`) whose `type` names its cause (`/problems/{slug}`); \
         a `503` always means nothing was taken: retry after `Retry-After` seconds.",
    )
}

/// The whole application as one endpoint: the front door around the route
/// tree (API, Swagger UI at `/docs`, the spec at `/openapi.json`).
pub fn router(state: AppState) -> impl Endpoint<Output = poem::Response> {
    let api = openapi(&state);
    // Swagger UI's OAuth receiver page is left out: no operation uses OAuth.
    let docs = SharedPage::new(api.swagger_ui_html(), "text/html; charset=utf-8");
    let spec = SharedPage::new(api.spec(), "application/json");
    let mut route = Route::new()
        .at("/docs", get(docs.clone()))
        .at("/docs/", get(docs))
        .at("/openapi.json", get(spec))
        .at("/metrics", get(metrics).data(state.clone()));
    if let Some(token) = &state.admin_token {
        route = route.nest(
            "/admin",
            admin::routes(Arc::clone(token), Arc::clone(&state.flusher)),
        );
    }
    let limits = Limits::new(state.max_body, state.body_timeout, state.max_in_flight);
    // `nest_no_strip`: the API's paths are absolute already, and stripping "/"
    // would rebuild every request's URI.
    let tree = route.nest_no_strip("/", api);
    FrontDoor::new(
        tree,
        ROUTES,
        Arc::clone(&state.metrics),
        limits,
        state.fast_path.then(|| state.intake.clone()),
    )
    .with_access_log(state.access_log)
}

/// Prometheus text exposition (not part of the OpenAPI document).
#[handler]
fn metrics(state: Data<&AppState>) -> poem::Response {
    let body = state.metrics.render();
    poem::Response::builder()
        .content_type("text/plain; version=0.0.4; charset=utf-8")
        .body(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_path_maps_to_a_fixed_label() {
        for path in [
            "/increment",
            "/docs/",
            "/docs/oauth-receiver.html",
            "/x/y",
            "/counters/abc",
            "/problems/not-found",
        ] {
            assert!(ROUTE_LABELS.contains(&route_label(path)), "{path}");
        }
        assert_eq!(route_label("/anything?at=all"), "other");
    }
}
