//! Layer 6, policy: asks the policy decision point about the route's declared action and resource.
//!
//! Pass-through for now: the policy issue fills it in (403 problem+json carrying the reason; every
//! decision logged).

use axum::{extract::Request, middleware::Next, response::Response};

pub async fn layer(req: Request, next: Next) -> Response {
    next.run(req).await
}
