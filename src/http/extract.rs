//! Extractors that turn framework rejections into problem+json, and validate at the edge.

use axum::{
    body::Bytes,
    extract::{FromRequest, FromRequestParts, Request},
    http::{StatusCode, header, request::Parts},
};
use serde::de::DeserializeOwned;
use validator::Validate;

use super::error::ApiError;

/// `Json<T>` whose rejections (malformed JSON, wrong content type, missing fields, too large) are
/// problem+json.
#[derive(Debug, Clone, Copy, Default)]
pub struct ApiJson<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let is_json = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(';').next())
            .map(|m| {
                let m = m.trim().to_ascii_lowercase();
                m == "application/json" || (m.starts_with("application/") && m.ends_with("+json"))
            })
            .unwrap_or(false);
        if !is_json {
            return Err(ApiError::Status {
                status: StatusCode::UNSUPPORTED_MEDIA_TYPE,
                code: "unsupported_media_type",
                detail: "Expected a body with `Content-Type: application/json`.".into(),
            });
        }
        let bytes = Bytes::from_request(req, state).await.map_err(|rejection| {
            let status = rejection.status();
            let code = if status == StatusCode::PAYLOAD_TOO_LARGE { "payload_too_large" } else { "bad_request" };
            ApiError::Status { status, code, detail: "The request body could not be read.".into() }
        })?;
        parse_json(&bytes).map(Self)
    }
}

/// Deserializes with the failing field's path in the message. Well-formed JSON of the wrong shape
/// is a 422; only text that is not JSON at all is a 400. A body that parses is parsed once, without
/// tracking paths; only a failing one is parsed again to find the path.
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    if escapes_nul(bytes) {
        return Err(ApiError::Status {
            status: StatusCode::UNPROCESSABLE_ENTITY,
            code: "invalid_body",
            detail: "Text must not contain the NUL character (U+0000).".into(),
        });
    }
    if let Ok(value) = serde_json::from_slice::<T>(bytes) {
        return Ok(value);
    }
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let error = match serde_path_to_error::deserialize::<_, T>(&mut de) {
        Ok(value) => {
            return match de.end() {
                Ok(()) => Ok(value),
                Err(e) => Err(ApiError::Status {
                    status: StatusCode::BAD_REQUEST,
                    code: "malformed_json",
                    detail: e.to_string().into(),
                }),
            };
        }
        Err(e) => e,
    };
    let path = error.path().to_string();
    let inner = error.into_inner();
    let message: String = inner.to_string().chars().take(300).collect();
    let well_formed = serde_json::from_slice::<serde::de::IgnoredAny>(bytes).is_ok();
    if well_formed {
        let detail = if path.is_empty() || path == "." { message } else { format!("{path}: {message}") };
        Err(ApiError::Status { status: StatusCode::UNPROCESSABLE_ENTITY, code: "invalid_body", detail: detail.into() })
    } else {
        Err(ApiError::Status { status: StatusCode::BAD_REQUEST, code: "malformed_json", detail: message.into() })
    }
}

/// Whether JSON text holds a `\u0000` escape (a NUL in a string; JSON cannot hold a raw one):
/// preceded by an odd run of backslashes, it is the escape, not an escaped backslash and `u0000`.
fn escapes_nul(bytes: &[u8]) -> bool {
    bytes.windows(6).enumerate().any(|(i, w)| {
        w[0] == b'\\' && &w[1..] == b"u0000" && bytes[..i].iter().rev().take_while(|&&b| b == b'\\').count() % 2 == 0
    })
}

/// [`ApiJson`] plus `validator` rules: a failing rule is a 422 listing the field paths.
#[derive(Debug, Clone, Copy, Default)]
pub struct ValidatedJson<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned + Validate> FromRequest<S> for ValidatedJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let ApiJson(value) = ApiJson::<T>::from_request(req, state).await?;
        value.validate()?;
        Ok(Self(value))
    }
}

/// `Path<T>` whose rejection is a 404: a malformed id names nothing that exists.
#[derive(Debug, Clone, Copy)]
pub struct ApiPath<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned + Send> FromRequestParts<S> for ApiPath<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let axum::extract::Path(value) = axum::extract::Path::<T>::from_request_parts(parts, state).await?;
        Ok(Self(value))
    }
}

/// `Query<T>` whose rejection is a 400 problem naming the parameter.
#[derive(Debug, Clone, Copy, Default)]
pub struct ApiQuery<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        // Nothing we store or compare can hold U+0000 (Postgres text cannot): refused as input.
        if parts.uri.query().is_some_and(|q| q.contains("%00")) {
            return Err(ApiError::Status {
                status: StatusCode::BAD_REQUEST,
                code: "invalid_query",
                detail: "Query parameters must not contain the NUL character (U+0000).".into(),
            });
        }
        let axum::extract::Query(value) = axum::extract::Query::<T>::from_request_parts(parts, state).await?;
        Ok(Self(value))
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_nul_escape_is_told_from_an_escaped_backslash() {
        assert!(super::escapes_nul(br#"{"a":"x\u0000"}"#));
        assert!(super::escapes_nul(br#"{"a":"\\\u0000"}"#), "an escaped backslash, then the escape");
        assert!(!super::escapes_nul(br#"{"a":"\\u0000"}"#), "a backslash, then the text u0000");
        assert!(!super::escapes_nul(br#"{"a":"u0000 \u0001"}"#));
    }
}
