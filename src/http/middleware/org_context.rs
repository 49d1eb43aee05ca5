//! Layer 2, org context: identifies the caller's credentials cheaply and attaches the org.
//!
//! Pass-through for now: the identity issue fills it in (JWT verification through a verified-token
//! cache, API key or session lookup by hash through a short in-process cache). A bad credential here
//! is never an error by itself, so public routes keep working.

use axum::{extract::Request, middleware::Next, response::Response};

pub async fn layer(req: Request, next: Next) -> Response {
    next.run(req).await
}
