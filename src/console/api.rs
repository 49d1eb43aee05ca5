//! The console's only way to data: the public HTTP API, called in process.
//!
//! Each page sends the API the same requests a browser or a script would, with the viewer's own
//! session cookie and address, through the whole middleware stack (authentication, tier limits,
//! the policy layer, the handlers' own checks, audit). So a page can show or do nothing the API
//! would not let the viewer see or do, answers carry the API's own problem `detail`, and there is
//! no second copy of any query.

use std::net::SocketAddr;

use axum::{
    Router,
    body::Body,
    extract::ConnectInfo,
    http::{HeaderMap, HeaderName, HeaderValue, Method, Request, StatusCode, header},
};
use http_body_util::BodyExt;
use serde_json::Value;
use tower::ServiceExt;

/// The API router with its middleware stack, as the listener serves it.
#[derive(Clone)]
pub struct Api(pub Router);

/// Who the console calls the API as: the viewer's session cookie and where the viewer is.
#[derive(Clone, Debug, Default)]
pub struct Caller {
    pub(super) cookie: Option<HeaderValue>,
    pub(super) connect: Option<ConnectInfo<SocketAddr>>,
    /// Headers a trusted proxy may have set (the API decides whether to believe them).
    pub(super) forwarded: Vec<(HeaderName, HeaderValue)>,
    /// The one rate-limit and quota charge of this page view, shared by all its calls.
    pub(super) charge: crate::http::middleware::tier::OneCharge,
}

impl Caller {
    /// The caller of an incoming console request: its address, proxy headers, user agent and
    /// the session cookie alone (no other cookie is passed on).
    pub fn from_request(headers: &HeaderMap, connect: Option<ConnectInfo<SocketAddr>>, session: Option<&str>) -> Self {
        let forwarded = ["x-forwarded-for", "x-forwarded-proto", "user-agent", "x-request-id"]
            .iter()
            .filter_map(|name| {
                let name = HeaderName::from_static(name);
                headers.get(&name).map(|v| (name, v.clone()))
            })
            .collect();
        let cookie =
            session.and_then(|token| HeaderValue::from_str(&format!("{}={token}", crate::SESSION_COOKIE)).ok());
        Self { cookie, connect, forwarded, charge: Default::default() }
    }

    /// The same caller without credentials (for login).
    pub fn anonymous(&self) -> Self {
        Self { cookie: None, ..self.clone() }
    }
}

/// What the API answered.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Value,
}

/// A refusal or failure, as the API's problem+json described it.
#[derive(Debug, Clone)]
pub struct Failure {
    pub status: u16,
    pub code: String,
    pub detail: String,
    pub request_id: String,
}

impl Failure {
    fn from_reply(reply: &Reply) -> Self {
        let text = |k: &str| reply.body.get(k).and_then(Value::as_str).map(str::to_owned);
        let request_id = text("request_id")
            .or_else(|| reply.headers.get("x-request-id").and_then(|v| v.to_str().ok()).map(str::to_owned))
            .unwrap_or_default();
        let mut detail = text("detail")
            .or_else(|| text("error_description"))
            .unwrap_or_else(|| reply.status.canonical_reason().unwrap_or("The request failed.").to_owned());
        // Field-level errors of a 422 say which field; the console shows them with the detail.
        if let Some(errors) = reply.body.get("errors").and_then(Value::as_array) {
            let fields: Vec<String> = errors
                .iter()
                .filter_map(|e| Some(format!("{}: {}", e.get("field")?.as_str()?, e.get("message")?.as_str()?)))
                .collect();
            if !fields.is_empty() {
                detail = format!("{detail} ({})", fields.join("; "));
            }
        }
        Self {
            status: reply.status.as_u16(),
            code: text("code").or_else(|| text("error")).unwrap_or_else(|| "error".into()),
            detail,
            request_id,
        }
    }

    /// A failure of the console itself (the API could not be reached in process).
    pub fn internal() -> Self {
        Self {
            status: 500,
            code: "internal".into(),
            detail: "The console could not complete the request.".into(),
            request_id: crate::http::request_id::current_request_id().unwrap_or_default(),
        }
    }
}

pub type ApiResult<T> = Result<T, Failure>;

impl Api {
    /// One request to the API as `caller`; any status comes back as a [`Reply`].
    pub async fn send(&self, caller: &Caller, method: Method, path: &str, body: Option<&Value>) -> ApiResult<Reply> {
        let mut builder = Request::builder().method(method).uri(path).header(header::ACCEPT, "application/json");
        if let Some(cookie) = &caller.cookie {
            builder = builder.header(header::COOKIE, cookie.clone());
        }
        for (name, value) in &caller.forwarded {
            builder = builder.header(name, value.clone());
        }
        let body = match body {
            Some(v) => {
                builder = builder.header(header::CONTENT_TYPE, "application/json");
                Body::from(serde_json::to_vec(v).map_err(|_| Failure::internal())?)
            }
            None => Body::empty(),
        };
        let mut req = builder.body(body).map_err(|_| Failure::internal())?;
        if let Some(connect) = caller.connect {
            req.extensions_mut().insert(connect);
        }
        req.extensions_mut().insert(caller.charge.clone());
        let response = self.0.clone().oneshot(req).await.map_err(|_| Failure::internal())?;
        let (parts, body) = response.into_parts();
        let bytes = body.collect().await.map_err(|_| Failure::internal())?.to_bytes();
        let body = if bytes.is_empty() { Value::Null } else { serde_json::from_slice(&bytes).unwrap_or(Value::Null) };
        Ok(Reply { status: parts.status, headers: parts.headers, body })
    }

    /// A request whose success is any 2xx; anything else is the API's [`Failure`].
    pub async fn call(&self, caller: &Caller, method: Method, path: &str, body: Option<&Value>) -> ApiResult<Value> {
        let reply = self.send(caller, method, path, body).await?;
        if reply.status.is_success() { Ok(reply.body) } else { Err(Failure::from_reply(&reply)) }
    }

    pub async fn get(&self, caller: &Caller, path: &str) -> ApiResult<Value> {
        self.call(caller, Method::GET, path, None).await
    }

    pub async fn post(&self, caller: &Caller, path: &str, body: &Value) -> ApiResult<Value> {
        self.call(caller, Method::POST, path, Some(body)).await
    }

    /// A POST without a body.
    pub async fn post_empty(&self, caller: &Caller, path: &str) -> ApiResult<Value> {
        self.call(caller, Method::POST, path, None).await
    }

    pub async fn patch(&self, caller: &Caller, path: &str, body: &Value) -> ApiResult<Value> {
        self.call(caller, Method::PATCH, path, Some(body)).await
    }

    pub async fn delete(&self, caller: &Caller, path: &str) -> ApiResult<Value> {
        self.call(caller, Method::DELETE, path, None).await
    }

    /// Whether a 2xx came back (reads whose failure a page shows as an empty state, not an error).
    pub fn failure_of(reply: &Reply) -> Failure {
        Failure::from_reply(reply)
    }
}

/// `path?k=v&...` with the pairs whose value is not empty, form-encoded.
pub fn with_query(path: &str, pairs: &[(&str, &str)]) -> String {
    let kept: Vec<(&str, &str)> = pairs.iter().copied().filter(|(_, v)| !v.is_empty()).collect();
    if kept.is_empty() {
        return path.to_owned();
    }
    format!("{path}?{}", serde_urlencoded::to_string(kept).unwrap_or_default())
}
