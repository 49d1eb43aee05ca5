//! The middleware stack, assembled in one place in request order.
//!
//! Around the six product layers sit the cross-cutting ones: the request id and span (outermost, so
//! every log line has the id), `Cache-Control: no-store` unless a route sets its own, compression, the problem+json safety net, panic capture, the request
//! timeout and CORS. Then, in this order: TLS → org context → metering → tier
//! enforcement → auth → policy. The body limit sits innermost because it changes the body type.

pub mod auth;
pub mod metering;
pub mod org_context;
pub mod policy;
pub mod tier;
pub mod tls;

use std::time::Duration;

use axum::{Router, extract::DefaultBodyLimit, http::StatusCode, middleware::from_fn, middleware::from_fn_with_state};
use tower::ServiceBuilder;
use tower_http::{
    catch_panic::CatchPanicLayer,
    compression::CompressionLayer,
    cors::{AllowOrigin, CorsLayer},
    limit::RequestBodyLimitLayer,
    timeout::TimeoutLayer,
};

use crate::{
    config::CorsConfig,
    http::{no_store, problem, request_id},
    state::AppState,
};

/// Wraps every route of `router` (and its fallbacks) in the stack. Listed outermost first.
pub fn stack(router: Router<AppState>, state: &AppState) -> Router<AppState> {
    let cfg = state.config();
    let layers = ServiceBuilder::new()
        .layer(from_fn(request_id::layer))
        .layer(from_fn(no_store::layer))
        .layer(CompressionLayer::new())
        .layer(from_fn(problem::layer))
        .layer(CatchPanicLayer::custom(problem::on_panic))
        .layer(TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            Duration::from_secs(cfg.server.request_timeout_secs),
        ))
        .option_layer(cors(&cfg.cors))
        // The six product layers, in request order.
        .layer(from_fn_with_state(state.clone(), tls::layer))
        .layer(from_fn_with_state(state.clone(), org_context::layer))
        .layer(from_fn_with_state(state.clone(), metering::layer))
        .layer(from_fn_with_state(state.clone(), tier::layer))
        .layer(from_fn_with_state(state.clone(), auth::layer))
        .layer(from_fn_with_state(state.clone(), policy::layer))
        // Innermost, because it changes the body type the handler reads.
        .layer(DefaultBodyLimit::max(cfg.server.body_limit_bytes))
        .layer(RequestBodyLimitLayer::new(cfg.server.body_limit_bytes));
    router.layer(layers)
}

fn cors(cfg: &CorsConfig) -> Option<CorsLayer> {
    if cfg.allowed_origins.is_empty() {
        return None;
    }
    let origin = if cfg.allowed_origins.iter().any(|o| o == "*") {
        AllowOrigin::any()
    } else {
        AllowOrigin::list(cfg.allowed_origins.iter().filter_map(|o| o.parse().ok()))
    };
    Some(
        CorsLayer::new()
            .allow_origin(origin)
            .allow_methods(tower_http::cors::Any)
            .allow_headers(tower_http::cors::Any)
            .expose_headers(tower_http::cors::Any)
            .max_age(Duration::from_secs(600)),
    )
}
