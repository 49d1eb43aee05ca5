//! Operations endpoints: liveness, readiness, Prometheus metrics, the OpenAPI document.

use std::time::{Duration, Instant};

use axum::{
    Json,
    extract::State,
    http::{StatusCode, header},
    response::{IntoResponse, Response},
};
use serde::Serialize;
use utoipa::ToSchema;
use utoipa_axum::{router::OpenApiRouter, routes};

use crate::state::AppState;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(health))
        .routes(routes!(ready))
        .routes(routes!(metrics))
        .routes(routes!(openapi_json))
}

#[derive(Serialize, ToSchema)]
pub struct Health {
    /// Always `ok`: the process is alive.
    status: &'static str,
    version: &'static str,
}

/// Liveness: answers as long as the process serves HTTP; touches no dependency.
#[utoipa::path(get, path = "/health", tag = "operations",
    responses((status = 200, description = "The process is alive", body = Health)))]
async fn health() -> Json<Health> {
    Json(Health { status: "ok", version: env!("CARGO_PKG_VERSION") })
}

#[derive(Serialize, ToSchema)]
pub struct DependencyStatus {
    /// `ok` or `down`.
    status: &'static str,
    latency_ms: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

#[derive(Serialize, ToSchema)]
pub struct Readiness {
    /// `ok`, `degraded` (Redis down: served, with hot state rebuilt from Postgres) or `unavailable`.
    status: &'static str,
    postgres: DependencyStatus,
    redis: DependencyStatus,
    /// This instance's webhook dispatcher (informational: it does not change the status).
    webhook_dispatcher: crate::webhooks::DispatcherReport,
}

async fn probe<F, E>(check: F) -> DependencyStatus
where
    F: Future<Output = Result<(), E>>,
    E: std::fmt::Display,
{
    let started = Instant::now();
    let outcome = tokio::time::timeout(Duration::from_secs(2), check).await;
    let latency_ms = (started.elapsed().as_secs_f64() * 1000.0 * 100.0).round() / 100.0;
    let error = match outcome {
        Ok(Ok(())) => None,
        // Only the kind of failure: the message could carry hostnames of the deployment.
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "readiness check failed");
            Some("unreachable".to_owned())
        }
        Err(_) => Some("timeout".to_owned()),
    };
    DependencyStatus { status: if error.is_none() { "ok" } else { "down" }, latency_ms, error }
}

/// Readiness: 200 when Postgres and Redis answer, 200 `degraded` when only Redis is down,
/// 503 when Postgres is down.
#[utoipa::path(get, path = "/ready", tag = "operations", responses(
    (status = 200, description = "Ready (possibly degraded)", body = Readiness),
    (status = 503, description = "Postgres is unavailable", body = Readiness)))]
async fn ready(State(state): State<AppState>) -> Response {
    let (postgres, redis) = tokio::join!(
        probe(async { sqlx::query("select 1").execute(state.db()).await.map(|_| ()) }),
        probe(state.redis().ping()),
    );
    let (code, status) = match (postgres.error.is_none(), redis.error.is_none()) {
        (true, true) => (StatusCode::OK, "ok"),
        (true, false) => (StatusCode::OK, "degraded"),
        (false, _) => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
    };
    let webhook_dispatcher = state.webhooks().report(state.config().webhooks.dispatcher);
    (code, Json(Readiness { status, postgres, redis, webhook_dispatcher })).into_response()
}

/// Prometheus metrics in the text exposition format.
#[utoipa::path(get, path = "/metrics", tag = "operations",
    responses((status = 200, description = "Prometheus text format", body = String, content_type = "text/plain")))]
async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], state.metrics().render())
}

/// This API's OpenAPI 3.1 document (the same as `agentidp openapi`).
#[utoipa::path(get, path = "/openapi.json", tag = "operations",
    responses((status = 200, description = "The OpenAPI document", content_type = "application/json")))]
async fn openapi_json() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/json")], crate::http::openapi::json())
}
