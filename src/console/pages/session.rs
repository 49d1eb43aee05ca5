//! Signing in and out, through the API's own login (and so its throttle and audit).

use std::net::SocketAddr;

use askama::Template;
use axum::{
    Extension, Form,
    extract::{ConnectInfo, Query},
    http::{HeaderMap, HeaderValue, StatusCode, header},
    response::{IntoResponse, Redirect, Response},
};
use serde::Deserialize;
use serde_json::json;

use crate::{
    auth::{Actor, Credential},
    console::{
        Submitted, api,
        api::{Api, Caller, Failure},
        assets::ASSETS,
        render, same_secret,
    },
    http::middleware::tls::Secure,
};

/// The cookie holding the sign-in form's CSRF token (before there is a session to derive one).
const LOGIN_COOKIE: &str = "agentidp_console_login";

#[derive(Template)]
#[template(path = "console/login.html")]
pub struct LoginPage {
    pub csrf: String,
    pub next: String,
    pub email: String,
    pub error: Option<Failure>,
    pub notice: Option<&'static str>,
    pub css_url: &'static str,
    pub css_integrity: &'static str,
    pub js_url: &'static str,
    pub js_integrity: &'static str,
}

#[derive(Deserialize)]
pub struct LoginQuery {
    next: Option<String>,
    done: Option<String>,
}

/// Only a console path is a place to go after signing in (no open redirect).
fn safe_next(next: Option<&str>) -> String {
    match next {
        Some(n) if n.starts_with("/console") && !n.contains('\\') && !n.starts_with("//") => n.to_owned(),
        _ => "/console".to_owned(),
    }
}

fn login_cookie(headers: &HeaderMap) -> Option<String> {
    headers.get_all(header::COOKIE).iter().filter_map(|v| v.to_str().ok()).flat_map(|v| v.split(';')).find_map(|c| {
        let (k, v) = c.trim().split_once('=')?;
        (k == LOGIN_COOKIE && !v.is_empty()).then(|| v.to_owned())
    })
}

fn page(csrf: String, next: String, email: String, error: Option<Failure>, notice: Option<&'static str>) -> LoginPage {
    LoginPage {
        csrf,
        next,
        email,
        error,
        notice,
        css_url: &ASSETS.css.url,
        css_integrity: &ASSETS.css.integrity,
        js_url: &ASSETS.js.url,
        js_integrity: &ASSETS.js.integrity,
    }
}

/// `GET /console/login`.
pub async fn login_form(
    Extension(Secure(secure)): Extension<Secure>,
    actor: Option<Extension<Actor>>,
    headers: HeaderMap,
    Query(q): Query<LoginQuery>,
) -> Response {
    let next = safe_next(q.next.as_deref());
    if actor.is_some_and(|Extension(a)| matches!(a.principal.credential, Credential::Session { .. })) {
        return Redirect::to(&next).into_response();
    }
    let token = login_cookie(&headers).unwrap_or_else(|| crate::crypto::random_token("l_"));
    let notice = q.done.as_deref().and_then(super::notice_text);
    let mut response = render(page(token.clone(), next, String::new(), None, notice));
    set_login_cookie(&mut response, &token, secure);
    response
}

fn set_login_cookie(response: &mut Response, token: &str, secure: bool) {
    let secure = if secure { "; Secure" } else { "" };
    if let Ok(v) = HeaderValue::from_str(&format!(
        "{LOGIN_COOKIE}={token}; Path=/console/login; HttpOnly; SameSite=Strict; Max-Age=3600{secure}"
    )) {
        response.headers_mut().append(header::SET_COOKIE, v);
    }
}

#[derive(Deserialize)]
pub struct LoginForm {
    #[serde(default)]
    email: String,
    #[serde(default)]
    password: String,
    #[serde(default)]
    csrf: String,
    next: Option<String>,
}

/// `POST /console/login`: the API's `POST /auth/login`; its session cookie is handed on.
pub async fn login(
    Extension(api): Extension<Api>,
    Extension(Secure(secure)): Extension<Secure>,
    connect: Option<Extension<ConnectInfo<SocketAddr>>>,
    headers: HeaderMap,
    Form(form): Form<LoginForm>,
) -> Response {
    let next = safe_next(form.next.as_deref());
    let expected = login_cookie(&headers).unwrap_or_default();
    if expected.is_empty() || !same_secret(&form.csrf, &expected) {
        let failure = Failure {
            status: 403,
            code: "csrf".into(),
            detail: "The sign-in form expired; please try again.".into(),
            request_id: crate::http::request_id::current_request_id().unwrap_or_default(),
        };
        let token = crate::crypto::random_token("l_");
        let mut r =
            (StatusCode::FORBIDDEN, render(page(token.clone(), next, form.email, Some(failure), None))).into_response();
        set_login_cookie(&mut r, &token, secure);
        return r;
    }
    let caller = Caller::from_request(&headers, connect.map(|Extension(c)| c), None).anonymous();
    let body = json!({ "email": form.email, "password": form.password });
    let reply = match api.send(&caller, axum::http::Method::POST, "/auth/login", Some(&body)).await {
        Ok(r) => r,
        Err(f) => {
            return (StatusCode::INTERNAL_SERVER_ERROR, render(page(expected, next, form.email, Some(f), None)))
                .into_response();
        }
    };
    if reply.status.is_success() {
        let mut response = Redirect::to(&next).into_response();
        for cookie in reply.headers.get_all(header::SET_COOKIE) {
            response.headers_mut().append(header::SET_COOKIE, cookie.clone());
        }
        return response;
    }
    let failure = Api::failure_of(&reply);
    let mut response = (reply.status, render(page(expected, next, form.email, Some(failure), None))).into_response();
    if let Some(retry) = reply.headers.get(header::RETRY_AFTER) {
        response.headers_mut().insert(header::RETRY_AFTER, retry.clone());
    }
    response
}

#[derive(Deserialize)]
pub struct Empty {}

/// `POST /console/logout`: the API's `POST /auth/logout`, which ends the session everywhere.
pub async fn logout(Submitted { viewer, .. }: Submitted<Empty>) -> Response {
    let reply = match viewer.api.send(&viewer.caller, axum::http::Method::POST, "/auth/logout", None).await {
        Ok(r) => r,
        Err(f) => return viewer.failed(f, ""),
    };
    if !reply.status.is_success() {
        return viewer.failed(Api::failure_of(&reply), "");
    }
    let mut response = Redirect::to(&api::with_query("/console/login", &[("done", "signed_out")])).into_response();
    for cookie in reply.headers.get_all(header::SET_COOKIE) {
        response.headers_mut().append(header::SET_COOKIE, cookie.clone());
    }
    response
}

#[cfg(test)]
mod tests {
    use super::safe_next;

    #[test]
    fn only_console_paths_are_followed_after_sign_in() {
        assert_eq!(safe_next(Some("/console/agents?q=x")), "/console/agents?q=x");
        assert_eq!(safe_next(Some("https://evil.example/")), "/console");
        assert_eq!(safe_next(Some("//evil.example")), "/console");
        assert_eq!(safe_next(Some("/console\\@evil")), "/console");
        assert_eq!(safe_next(None), "/console");
    }
}
