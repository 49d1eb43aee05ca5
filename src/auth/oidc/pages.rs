//! The sign-in, consent and error pages: typed templates compiled into the binary (every value
//! escaped by the template engine), no external assets, no JavaScript, and a strict CSP whose
//! `form-action` names only us and the validated redirect URI's origin.

use askama::Template;
use axum::{
    http::{HeaderMap, HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};
use url::Url;

/// Marks a rendered page so that the problem+json safety net leaves its 4xx alone.
pub use crate::http::problem::Page;

#[derive(Template)]
#[template(path = "oidc/login.html")]
pub struct LoginPage<'a> {
    pub nonce: &'a str,
    pub client_name: &'a str,
    pub issuer: &'a str,
    pub error: Option<&'a str>,
    pub email: &'a str,
    pub csrf: &'a str,
    pub hidden: &'a [(String, String)],
}

#[derive(Template)]
#[template(path = "oidc/consent.html")]
pub struct ConsentPage<'a> {
    pub nonce: &'a str,
    pub client_name: &'a str,
    pub logo_uri: Option<&'a str>,
    pub client_uri: Option<&'a str>,
    pub policy_uri: Option<&'a str>,
    pub tos_uri: Option<&'a str>,
    pub user: &'a str,
    pub scopes: Vec<(&'a str, &'static str)>,
    pub resources: &'a [String],
    pub redirect_uri: &'a str,
    pub csrf: &'a str,
    pub hidden: &'a [(String, String)],
}

#[derive(Template)]
#[template(path = "oidc/error.html")]
pub struct ErrorPage<'a> {
    pub nonce: &'a str,
    pub title: &'a str,
    pub message: &'a str,
}

#[derive(Template)]
#[template(path = "oidc/logged_out.html")]
pub struct LoggedOutPage<'a> {
    pub nonce: &'a str,
}

/// What a scope lets the application do, in words.
pub fn describe_scope(scope: &str) -> &'static str {
    match scope {
        "openid" => "confirm who you are",
        "profile" => "see your name",
        "email" => "see your email address",
        "offline_access" => "stay signed in while you are away",
        s if s.ends_with(":read") => "read this part of your organization",
        s if s.ends_with(":write") => "change this part of your organization",
        _ => "act in your organization",
    }
}

/// A fresh CSP nonce.
pub fn nonce() -> String {
    crate::crypto::random_token("")[..22].to_owned()
}

/// The CSP source that lets a form's redirect reach `uri` (Chromium applies `form-action` to the
/// redirect that follows a submission).
fn form_target(uri: &str) -> Option<String> {
    let url = Url::parse(uri).ok()?;
    match url.scheme() {
        "http" | "https" => Some(url.origin().ascii_serialization()),
        scheme => Some(format!("{scheme}:")),
    }
}

/// The headers every page carries.
pub fn headers(nonce: &str, redirect_uri: Option<&str>, image: Option<&str>) -> HeaderMap {
    let form = redirect_uri.and_then(form_target).map(|t| format!(" {t}")).unwrap_or_default();
    let img = image
        .and_then(|i| Url::parse(i).ok())
        .filter(|u| u.scheme() == "https" || u.scheme() == "http")
        .map(|u| u.origin().ascii_serialization())
        .unwrap_or_else(|| "'none'".into());
    let csp = format!(
        "default-src 'none'; style-src 'nonce-{nonce}'; img-src {img}; form-action 'self'{form}; \
         frame-ancestors 'none'; base-uri 'none'"
    );
    let mut h = HeaderMap::new();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/html; charset=utf-8"));
    if let Ok(v) = HeaderValue::from_str(&csp) {
        h.insert(header::CONTENT_SECURITY_POLICY, v);
    }
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h
}

/// Renders `page` with `status` and the page headers.
pub fn render(status: StatusCode, page: &impl Template, headers: HeaderMap) -> Response {
    match page.render() {
        Ok(html) => {
            let mut r = (status, headers, html).into_response();
            r.extensions_mut().insert(Page);
            r
        }
        Err(e) => {
            tracing::error!(error = %e, "page rendering failed");
            StatusCode::INTERNAL_SERVER_ERROR.into_response()
        }
    }
}

/// A plain error page: for requests that cannot be answered at a redirect URI.
pub fn error(status: StatusCode, title: &str, message: &str) -> Response {
    let nonce = nonce();
    render(status, &ErrorPage { nonce: &nonce, title, message }, headers(&nonce, None, None))
}
