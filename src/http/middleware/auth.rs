//! Layer 5, auth: on protected routes, requires a valid principal and builds the `Actor`.
//!
//! Pass-through for now: the identity issue fills it in (revocation checks, 401 with
//! `WWW-Authenticate`).

use axum::{extract::Request, middleware::Next, response::Response};

pub async fn layer(req: Request, next: Next) -> Response {
    next.run(req).await
}
