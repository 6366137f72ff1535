//! Per-request observation: the metrics of every request, whatever answered
//! it (handler, body limit, router 404).

use std::{sync::Arc, time::Instant};

use poem::{Endpoint, IntoResponse, Middleware, Request, Response, Result};

use crate::metrics::{Metrics, route_label};

/// Counts and times every request.
pub struct Observe {
    metrics: Arc<Metrics>,
}

impl Observe {
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Self { metrics }
    }
}

impl<E: Endpoint> Middleware<E> for Observe {
    type Output = ObserveEndpoint<E>;

    fn transform(&self, inner: E) -> Self::Output {
        ObserveEndpoint {
            inner,
            metrics: Arc::clone(&self.metrics),
        }
    }
}

pub struct ObserveEndpoint<E> {
    inner: E,
    metrics: Arc<Metrics>,
}

impl<E: Endpoint> Endpoint for ObserveEndpoint<E> {
    type Output = Response;

    async fn call(&self, req: Request) -> Result<Self::Output> {
        let started = Instant::now();
        let route = route_label(req.uri().path());
        let method = req.method().clone();
        // Errors become responses here so that their status is counted.
        let response = match self.inner.call(req).await {
            Ok(output) => output.into_response(),
            Err(err) => err.into_response(),
        };
        self.metrics.observe_request(
            route,
            method.as_str(),
            response.status().as_u16(),
            started.elapsed(),
        );
        Ok(response)
    }
}
