//! Nothing the API answers may be stored by a browser or an intermediary unless the route says so.
//!
//! Responses that carry a secret (a session token, a new API key, a client secret, an access token,
//! an invitation token) must never sit in a cache. Rather than asking each such handler to
//! remember, every response gets `Cache-Control: no-store` and `Pragma: no-cache` here, unless the
//! handler set its own `Cache-Control` (the JWKS and other public metadata do, to be cacheable). A
//! new route that returns a secret is covered without anyone remembering.

use axum::{
    extract::Request,
    http::{HeaderValue, header},
    middleware::Next,
    response::Response,
};

pub async fn layer(req: Request, next: Next) -> Response {
    let mut response = next.run(req).await;
    let headers = response.headers_mut();
    if !headers.contains_key(header::CACHE_CONTROL) {
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        headers.insert(header::PRAGMA, HeaderValue::from_static("no-cache"));
    }
    response
}
