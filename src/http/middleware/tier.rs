//! Layer 4, tier enforcement: the org's daily call quota and the caller's rate limit.
//!
//! Pass-through for now: the tiers issue fills it in (one Redis round trip per request; 429 with
//! `Retry-After` and the rate-limit headers when over).

use axum::{extract::Request, middleware::Next, response::Response};

pub async fn layer(req: Request, next: Next) -> Response {
    next.run(req).await
}
