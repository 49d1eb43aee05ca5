//! One error type for the whole API, rendered as RFC 9457 `application/problem+json`.
//!
//! Client errors carry a status, a stable machine `code` and a human `detail`. Anything internal
//! becomes an opaque 500 (or 503 when a dependency is away); its cause is logged once, with the
//! request id, and never sent to the client.

use std::borrow::Cow;

use axum::{
    Json,
    extract::rejection::{PathRejection, QueryRejection},
    http::{HeaderMap, HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};
use serde::Serialize;
use utoipa::ToSchema;

use super::request_id::current_request_id;

pub const PROBLEM_JSON: &str = "application/problem+json";

/// An API failure. Each variant documents the status it maps to.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// 400: the request is malformed in a way the client must fix.
    #[error("{detail}")]
    BadRequest { code: &'static str, detail: Cow<'static, str> },
    /// 401: no valid credentials; carries the `WWW-Authenticate` challenge.
    #[error("authentication required")]
    Unauthorized { detail: Cow<'static, str>, challenge: &'static str },
    /// 403: authenticated but not allowed; `code` is the policy's reason.
    #[error("{detail}")]
    Forbidden { code: Cow<'static, str>, detail: Cow<'static, str> },
    /// 404: missing, or owned by another organization (its existence must not leak).
    #[error("not found")]
    NotFound,
    /// 409: conflicts with the current state, e.g. a unique value already taken.
    #[error("{detail}")]
    Conflict { code: &'static str, detail: Cow<'static, str> },
    /// 422: well-formed but invalid; `errors` lists the failing field paths.
    #[error("validation failed")]
    Validation { errors: Vec<FieldError> },
    /// 429: over a limit; `retry_after` in seconds.
    #[error("{detail}")]
    TooManyRequests { code: &'static str, detail: Cow<'static, str>, retry_after: u64 },
    /// 503: a dependency (Postgres) is unavailable or exhausted.
    #[error("service unavailable: {0}")]
    Unavailable(String),
    /// 500: anything unexpected; the cause is logged, never sent.
    #[error(transparent)]
    Internal(#[from] anyhow::Error),
    /// A 4xx with field-level errors (e.g. a policy that does not validate: 400 with diagnostics).
    #[error("{detail}")]
    Invalid { status: StatusCode, code: &'static str, detail: Cow<'static, str>, errors: Vec<FieldError> },
    /// Any other status with a code and detail (used for rejections from the framework).
    #[error("{detail}")]
    Status { status: StatusCode, code: &'static str, detail: Cow<'static, str> },
}

/// One failing field of a 422.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct FieldError {
    /// JSON path of the field, e.g. `email` or `members[2].role`.
    pub field: String,
    /// Machine code, e.g. `email`, `length`, `required`.
    pub code: String,
    pub message: String,
}

/// The RFC 9457 body every non-OAuth error has.
#[derive(Debug, Serialize, ToSchema)]
pub struct Problem {
    /// A URI naming the problem type.
    #[serde(rename = "type")]
    pub type_: String,
    pub title: String,
    pub status: u16,
    pub detail: String,
    /// Stable machine-readable code.
    pub code: String,
    /// The request id, as in the `X-Request-Id` header.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
    /// Field-level problems of a validation error.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub errors: Option<Vec<FieldError>>,
}

impl ApiError {
    pub fn bad_request(code: &'static str, detail: impl Into<Cow<'static, str>>) -> Self {
        Self::BadRequest { code, detail: detail.into() }
    }
    pub fn conflict(code: &'static str, detail: impl Into<Cow<'static, str>>) -> Self {
        Self::Conflict { code, detail: detail.into() }
    }
    pub fn forbidden(code: impl Into<Cow<'static, str>>, detail: impl Into<Cow<'static, str>>) -> Self {
        Self::Forbidden { code: code.into(), detail: detail.into() }
    }
    pub fn unauthorized(detail: impl Into<Cow<'static, str>>) -> Self {
        Self::Unauthorized { detail: detail.into(), challenge: "Bearer" }
    }
    pub fn field(field: impl Into<String>, code: impl Into<String>, message: impl Into<String>) -> Self {
        Self::Validation {
            errors: vec![FieldError { field: field.into(), code: code.into(), message: message.into() }],
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            Self::BadRequest { .. } => StatusCode::BAD_REQUEST,
            Self::Unauthorized { .. } => StatusCode::UNAUTHORIZED,
            Self::Forbidden { .. } => StatusCode::FORBIDDEN,
            Self::NotFound => StatusCode::NOT_FOUND,
            Self::Conflict { .. } => StatusCode::CONFLICT,
            Self::Validation { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            Self::TooManyRequests { .. } => StatusCode::TOO_MANY_REQUESTS,
            Self::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
            Self::Status { status, .. } | Self::Invalid { status, .. } => *status,
        }
    }
}

/// The problem body for a bare status, used for framework rejections and by the normalizer.
pub fn problem_for_status(status: StatusCode, detail: Option<String>) -> Response {
    let code = default_code(status);
    let detail = detail.unwrap_or_else(|| default_detail(status).to_owned());
    problem_response(status, code, detail, None, HeaderMap::new())
}

fn default_code(status: StatusCode) -> &'static str {
    match status.as_u16() {
        400 => "bad_request",
        401 => "unauthorized",
        403 => "forbidden",
        404 => "not_found",
        405 => "method_not_allowed",
        406 => "not_acceptable",
        408 => "request_timeout",
        409 => "conflict",
        411 => "length_required",
        413 => "payload_too_large",
        414 => "uri_too_long",
        415 => "unsupported_media_type",
        422 => "validation_failed",
        429 => "too_many_requests",
        431 => "headers_too_large",
        503 => "service_unavailable",
        s if s >= 500 => "internal_error",
        _ => "error",
    }
}

fn default_detail(status: StatusCode) -> &'static str {
    match status.as_u16() {
        404 => "No resource exists at this path.",
        405 => "This method is not allowed on this path; see the Allow header.",
        408 => "The request took too long.",
        413 => "The request body is larger than this server accepts.",
        415 => "The content type of the body is not accepted here.",
        503 => "A dependency is unavailable; try again shortly.",
        s if s >= 500 => "An internal error occurred; it has been logged with the request id.",
        _ => status.canonical_reason().unwrap_or("Error"),
    }
}

fn problem_response(
    status: StatusCode,
    code: &str,
    detail: String,
    errors: Option<Vec<FieldError>>,
    mut headers: HeaderMap,
) -> Response {
    let body = Problem {
        type_: format!("https://agentidp.dev/problems/{}", code.replace('_', "-")),
        title: status.canonical_reason().unwrap_or("Error").to_owned(),
        status: status.as_u16(),
        detail,
        code: code.to_owned(),
        request_id: current_request_id(),
        errors,
    };
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON));
    (status, headers, Json(body)).into_response()
}

/// Marks a 403 refused for a scope the credential lacks, so the auth layer can add the RFC 6750
/// §3.1 `insufficient_scope` challenge naming the scope the route needs.
#[derive(Debug, Clone, Copy)]
pub struct InsufficientScope;

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        let lacks_scope = matches!(&self, Self::Forbidden { code, .. } if code == "insufficient_scope");
        let mut headers = HeaderMap::new();
        let (code, detail, errors): (Cow<'static, str>, String, _) = match self {
            Self::BadRequest { code, detail } | Self::Conflict { code, detail } => {
                (code.into(), detail.into_owned(), None)
            }
            Self::Status { code, detail, .. } => (code.into(), detail.into_owned(), None),
            Self::Invalid { code, detail, errors, .. } => (code.into(), detail.into_owned(), Some(errors)),
            Self::Unauthorized { detail, challenge } => {
                headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static(challenge));
                ("unauthorized".into(), detail.into_owned(), None)
            }
            Self::Forbidden { code, detail } => (code, detail.into_owned(), None),
            Self::NotFound => ("not_found".into(), "The resource does not exist.".to_owned(), None),
            Self::Validation { errors } => (
                "validation_failed".into(),
                "The request body failed validation; see `errors`.".to_owned(),
                Some(errors),
            ),
            Self::TooManyRequests { code, detail, retry_after } => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from(retry_after));
                (code.into(), detail.into_owned(), None)
            }
            Self::Unavailable(cause) => {
                tracing::warn!(cause = %cause, "dependency unavailable");
                ("service_unavailable".into(), default_detail(status).to_owned(), None)
            }
            Self::Internal(cause) => {
                tracing::error!(cause = format!("{cause:#}"), "internal error");
                ("internal_error".into(), default_detail(status).to_owned(), None)
            }
        };
        let mut response = problem_response(status, &code, detail, errors, headers);
        if lacks_scope {
            response.extensions_mut().insert(InsufficientScope);
        }
        response
    }
}

impl From<sqlx::Error> for ApiError {
    fn from(e: sqlx::Error) -> Self {
        match e {
            sqlx::Error::RowNotFound => Self::NotFound,
            // Postgres away, restarting, or every connection busy: a retryable 503, not a 500. A
            // connection cut mid-handshake shows up as a protocol or TLS error.
            sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::Io(_)
            | sqlx::Error::Protocol(_)
            | sqlx::Error::Tls(_)
            | sqlx::Error::WorkerCrashed => Self::Unavailable(e.to_string()),
            sqlx::Error::Database(ref db) if db.code().as_deref() == Some("57P01") => Self::Unavailable(e.to_string()),
            // Text Postgres cannot store (U+0000 in `text`, or `\u0000` in `jsonb`): the client's
            // input, refused before anything is written (the statement fails as a whole).
            sqlx::Error::Database(ref db) if matches!(db.code().as_deref(), Some("22021" | "22P05")) => Self::Status {
                status: StatusCode::UNPROCESSABLE_ENTITY,
                code: "invalid_text",
                detail: "Text must not contain the NUL character (U+0000).".into(),
            },
            other => Self::Internal(other.into()),
        }
    }
}

impl From<validator::ValidationErrors> for ApiError {
    fn from(errors: validator::ValidationErrors) -> Self {
        let mut out = Vec::new();
        flatten_validation(&errors, String::new(), &mut out);
        out.sort_by(|a, b| a.field.cmp(&b.field));
        Self::Validation { errors: out }
    }
}

fn flatten_validation(errors: &validator::ValidationErrors, prefix: String, out: &mut Vec<FieldError>) {
    use validator::ValidationErrorsKind as Kind;
    for (field, kind) in errors.errors() {
        let path = if prefix.is_empty() { field.to_string() } else { format!("{prefix}.{field}") };
        match kind {
            Kind::Field(list) => out.extend(list.iter().map(|e| {
                FieldError {
                    field: path.clone(),
                    code: e.code.to_string(),
                    message: e
                        .message
                        .as_ref()
                        .map(|m| m.to_string())
                        .unwrap_or_else(|| format!("{path} is invalid ({})", e.code)),
                }
            })),
            Kind::Struct(inner) => flatten_validation(inner, path, out),
            Kind::List(items) => {
                for (i, inner) in items {
                    flatten_validation(inner, format!("{path}[{i}]"), out);
                }
            }
        }
    }
}

/// serde's message names the field and position; axum's wrapper text adds nothing.
fn body_error_text(e: &dyn std::error::Error) -> String {
    let mut source: &dyn std::error::Error = e;
    while let Some(next) = source.source() {
        source = next;
    }
    let text = source.to_string();
    // Hostile input may be echoed in serde's message; keep it short.
    let mut text: String = text.chars().take(300).collect();
    if text.is_empty() {
        text = "The JSON body is invalid.".into();
    }
    text
}

impl From<PathRejection> for ApiError {
    fn from(rejection: PathRejection) -> Self {
        // A malformed id names nothing that exists.
        tracing::debug!(rejection = %rejection, "path rejected");
        Self::NotFound
    }
}

impl From<QueryRejection> for ApiError {
    fn from(rejection: QueryRejection) -> Self {
        Self::bad_request("invalid_query", body_error_text(&rejection))
    }
}

/// Result alias for handlers.
pub type ApiResult<T> = Result<T, ApiError>;

/// Maps a named database constraint to a client error instead of a 500 (no pre-check SELECTs).
pub trait ResultExt<T> {
    fn on_constraint(self, name: &str, f: impl FnOnce() -> ApiError) -> Result<T, ApiError>;
}

impl<T, E: Into<ApiError>> ResultExt<T> for Result<T, E> {
    fn on_constraint(self, name: &str, f: impl FnOnce() -> ApiError) -> Result<T, ApiError> {
        self.map_err(|e| match e.into() {
            ApiError::Internal(cause) => match cause.downcast_ref::<sqlx::Error>() {
                Some(sqlx::Error::Database(db)) if db.constraint() == Some(name) => f(),
                _ => ApiError::Internal(cause),
            },
            other => other,
        })
    }
}
