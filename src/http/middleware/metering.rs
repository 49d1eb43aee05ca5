//! Layer 3, metering: counts every request for Prometheus by method, route template and status.
//!
//! The route is axum's matched template (`/api/v1/agents/{id}`), never the raw path, so label
//! cardinality stays bounded whatever clients send. Recording is an atomic increment: it never
//! blocks and never fails a request.

use std::time::Instant;

use axum::{
    extract::{MatchedPath, Request},
    middleware::Next,
    response::Response,
};

pub const REQUESTS_TOTAL: &str = "http_requests_total";
pub const REQUEST_DURATION: &str = "http_request_duration_seconds";

pub async fn layer(req: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = req.method().as_str().to_owned();
    let route =
        req.extensions().get::<MatchedPath>().map(|p| p.as_str().to_owned()).unwrap_or_else(|| "unmatched".to_owned());
    let response = next.run(req).await;
    let status = response.status().as_u16().to_string();
    let labels = [("method", method), ("route", route), ("status", status)];
    metrics::counter!(REQUESTS_TOTAL, &labels).increment(1);
    metrics::histogram!(REQUEST_DURATION, &labels).record(started.elapsed().as_secs_f64());
    response
}
