//! A safety net under every error: any 4xx/5xx whose body is not already JSON (axum's plain-text
//! rejections, an empty 405, the body-limit 413, the timeout 408) is rewritten as problem+json.
//! Headers such as `Allow` and `Retry-After` are kept. The console's HTML error pages are left
//! as they are: they show the API's problem to a person.

use axum::{
    extract::Request,
    http::header,
    middleware::Next,
    response::{IntoResponse, Response},
};

use super::error::problem_for_status;

/// Marks a server-rendered HTML page (the sign-in pages' errors): people read it, so it stays HTML.
#[derive(Debug, Clone, Copy)]
pub struct Page;

pub async fn layer(req: Request, next: Next) -> Response {
    let response = next.run(req).await;
    let status = response.status();
    if !(status.is_client_error() || status.is_server_error()) || response.extensions().get::<Page>().is_some() {
        return response;
    }
    let keep = response.headers().get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).is_some_and(|ct| {
        ct.starts_with("application/problem+json") || ct.starts_with("application/json") || ct.starts_with("text/html")
    });
    if keep {
        return response;
    }
    let (parts, _) = response.into_parts();
    let mut fresh = problem_for_status(status, None);
    for (name, value) in parts.headers.iter() {
        if name != header::CONTENT_TYPE && name != header::CONTENT_LENGTH && !fresh.headers().contains_key(name) {
            fresh.headers_mut().insert(name.clone(), value.clone());
        }
    }
    fresh.into_response()
}

/// A panic in a handler becomes an opaque 500; the payload is logged, never sent.
pub fn on_panic(payload: Box<dyn std::any::Any + Send + 'static>) -> Response {
    let message = payload
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| payload.downcast_ref::<&str>().copied())
        .unwrap_or("non-string panic payload");
    tracing::error!(panic = message, "handler panicked");
    problem_for_status(axum::http::StatusCode::INTERNAL_SERVER_ERROR, None)
}
