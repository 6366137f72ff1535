//! The HTTP API, one module (and one `#[OpenApi]` struct) per tag.

pub mod admin;
pub mod counters;
pub mod health;
pub mod increment;

use std::sync::{
    Arc,
    atomic::{AtomicBool, Ordering},
};

use poem::{Endpoint, EndpointExt, Route, get, handler, web::Data};
use poem_openapi::OpenApiService;
use sea_orm::DatabaseConnection;

use crate::{
    batcher::Batcher, flusher::Flusher, limits::Limits, metrics::Metrics, observe::Observe,
    telemetry::SharedRecentRequests,
};

/// Readiness as the load balancer sees it: true until shutdown begins.
#[derive(Clone, Default)]
pub struct Lifecycle {
    shutting_down: Arc<AtomicBool>,
}

impl Lifecycle {
    pub fn begin_shutdown(&self) {
        self.shutting_down.store(true, Ordering::SeqCst);
    }

    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::SeqCst)
    }
}

/// What the routes need.
#[derive(Clone)]
pub struct AppState {
    pub batcher: Arc<Batcher>,
    /// Owns the write path; counter reads go through it to stay consistent
    /// with flushes.
    pub flusher: Arc<Flusher>,
    pub db: DatabaseConnection,
    pub lifecycle: Lifecycle,
    pub metrics: Arc<Metrics>,
    /// Request spans for the next flush span to link to.
    pub recent_requests: SharedRecentRequests,
    pub max_body: usize,
    pub body_timeout: std::time::Duration,
    pub max_in_flight: usize,
    pub flush_interval: std::time::Duration,
    pub wait_timeout: std::time::Duration,
    /// `None`: the admin routes are not mounted (404).
    pub admin_token: Option<Arc<str>>,
}

/// The OpenAPI service with every tag.
pub fn openapi(
    state: &AppState,
) -> OpenApiService<
    (
        increment::IncrementApi,
        counters::CounterApi,
        health::HealthApi,
    ),
    (),
> {
    OpenApiService::new(
        (
            increment::IncrementApi::new(state),
            counters::CounterApi::new(state, Arc::clone(&state.flusher)),
            health::HealthApi::new(state),
        ),
        "increment",
        env!("CARGO_PKG_VERSION"),
    )
    .description(
        "Adds integers to named counters. Increments are summed in memory per key and \
         written to the database in batches, each exactly once. `202 Accepted` means the \
         increment is held by this instance and will be written by the next flush \
         (default: within a second).",
    )
}

/// The whole router: API, Swagger UI at `/docs`, the spec at `/openapi.json`.
pub fn router(state: AppState) -> impl Endpoint<Output = poem::Response> {
    let api = openapi(&state);
    let docs = api.swagger_ui();
    let spec = api.spec_endpoint();
    let mut route = Route::new()
        .nest("/docs", docs)
        .at("/openapi.json", spec)
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
    route.nest_no_strip("/", api).with(Observe::new(
        Arc::clone(&state.metrics),
        limits,
        increment::FastIncrement::new(&state),
    ))
}

/// Prometheus text exposition (not part of the OpenAPI document).
#[handler]
fn metrics(state: Data<&AppState>) -> poem::Response {
    let body = state.metrics.render(&state.batcher, &state.db);
    poem::Response::builder()
        .content_type("text/plain; version=0.0.4; charset=utf-8")
        .body(body)
}
