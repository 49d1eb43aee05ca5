//! The web console: server-rendered pages under `/console` for the people who run agents.
//!
//! - Pages are typed askama templates compiled into the binary (`templates/console/`); every
//!   value is escaped by the template engine. A little JavaScript of our own (embedded, see
//!   [`assets`]) adds the live parts: the city map follows the presence stream, times show in the
//!   viewer's zone, secrets get a copy button. Everything works without it, only less live.
//! - Data comes only from the public HTTP API, called in process as the viewer ([`api`]): the
//!   console has no SQL and no policy of its own. Buttons the viewer may not use are left out
//!   by asking the same decision point the API asks; the API refuses them anyway.
//! - Security: the API's `agentidp_session` cookie (HttpOnly, SameSite=Lax, Secure under TLS),
//!   a CSRF token on every form (an HMAC of the session secret, checked by [`Submitted`]), a
//!   strict Content-Security-Policy without `unsafe-inline`, `frame-ancestors 'none'`.

mod api;
pub mod assets;
mod charts;
mod pages;

use axum::{
    Extension, Router,
    body::Bytes,
    extract::{ConnectInfo, FromRequest, FromRequestParts, Request},
    http::{HeaderMap, HeaderValue, StatusCode, header, request::Parts},
    middleware::{Next, from_fn},
    response::{Html, IntoResponse, Redirect, Response},
    routing::{get, post},
};
use hmac::{Hmac, Mac};
use serde::de::DeserializeOwned;
use std::net::SocketAddr;
use uuid::Uuid;

pub use api::Api;
use api::{Caller, Failure};

use crate::{
    auth::{Actor, Credential, Role},
    policy::Resource,
    state::AppState,
};

/// The Content-Security-Policy of every console response: our own origin only, no inline script
/// or style, never framed.
pub const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
     connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

/// Whether a matched route is the console's (public to the auth and policy layers: the console
/// signs people in itself, and every request it makes to the API is checked there).
pub fn is_console_route(route: &str) -> bool {
    route == "/" || route == "/console" || route.starts_with("/console/")
}

/// The console's routes; `api` is the API it calls in process.
pub fn router(api: Api) -> Router<AppState> {
    use pages::*;
    Router::new()
        .route("/", get(root))
        .route("/console", get(home::show))
        .route("/console/assets/{name}", get(assets::serve))
        .route("/console/login", get(session::login_form).post(session::login))
        .route("/console/logout", post(session::logout))
        .route("/console/agents", get(agents::list).post(agents::create))
        .route("/console/agents/{id}", get(agents::show).post(agents::edit))
        .route("/console/agents/{id}/status", post(agents::set_status))
        .route("/console/agents/{id}/delete", post(agents::delete))
        .route("/console/agents/{id}/credentials", post(agents::create_credential))
        .route("/console/agents/{id}/credentials/{cred}/rotate", post(agents::rotate_credential))
        .route("/console/agents/{id}/credentials/{cred}/revoke", post(agents::revoke_credential))
        .route("/console/agents/{id}/revoke-tokens", post(agents::revoke_tokens))
        .route("/console/city", get(city::show))
        .route("/console/city/live", get(city::live))
        .route("/console/analytics", get(analytics::show))
        .route("/console/audit", get(audit::show))
        .route("/console/audit/decisions", get(audit::decisions))
        .route("/console/delegations", get(delegations::list))
        .route("/console/delegations/{id}/revoke", post(delegations::revoke))
        .route("/console/delegations/{id}/approvals/{approval}/{verdict}", post(delegations::decide))
        .route("/console/policies", get(policies::list))
        .route("/console/policies/test", post(policies::test))
        .route("/console/policies/rollback", post(policies::rollback))
        .route("/console/policies/{version}/activate", post(policies::activate))
        .route("/console/webhooks", get(webhooks::list).post(webhooks::create))
        .route("/console/webhooks/dead-letters", get(webhooks::dead_letters))
        .route("/console/webhooks/{id}", get(webhooks::show).post(webhooks::edit))
        .route("/console/webhooks/{id}/delete", post(webhooks::delete))
        .route("/console/webhooks/{id}/test", post(webhooks::test))
        .route("/console/webhooks/{id}/rotate-secret", post(webhooks::rotate_secret))
        .route("/console/webhooks/{id}/replay", post(webhooks::replay))
        .route("/console/webhooks/deliveries/{id}/retry", post(webhooks::retry))
        .route("/console/organization", get(organization::show))
        .route("/console/organization/api-keys", post(organization::create_key))
        .route("/console/organization/api-keys/{id}/delete", post(organization::delete_key))
        .route("/console/organization/members", post(organization::invite))
        .route("/console/organization/members/{user}/role", post(organization::set_role))
        .route("/console/organization/members/{user}/remove", post(organization::remove_member))
        .route("/console/organization/upgrade", post(organization::upgrade))
        .route("/console/organization/switch", post(organization::switch))
        .route("/console/applications", get(applications::show).post(applications::create))
        .route("/console/applications/{id}/delete", post(applications::delete))
        .route("/console/applications/consents/revoke", post(applications::revoke_consent))
        .route("/console/trust", get(trust::show))
        .route("/console/trust/listing/{id}/{verb}", post(trust::set_listing))
        .route("/console/policies/versions", post(policies::create))
        .layer(from_fn(security_headers))
        .layer(Extension(api))
}

/// `/`: a browser goes to the console; anything else gets the API's 404.
async fn root(headers: HeaderMap) -> Response {
    let wants_html = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()).is_some_and(|v| v.contains("text/html"));
    if wants_html {
        Redirect::to("/console").into_response()
    } else {
        crate::http::error::problem_for_status(StatusCode::NOT_FOUND, None)
    }
}

async fn security_headers(req: Request, next: Next) -> Response {
    let mut response = next.run(req).await;
    let h = response.headers_mut();
    h.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP));
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("same-origin"));
    h.insert("cross-origin-opener-policy", HeaderValue::from_static("same-origin"));
    response
}

fn session_token(headers: &HeaderMap) -> Option<String> {
    headers.get_all(header::COOKIE).iter().filter_map(|v| v.to_str().ok()).flat_map(|v| v.split(';')).find_map(|c| {
        let (k, v) = c.trim().split_once('=')?;
        (k == crate::SESSION_COOKIE && !v.is_empty()).then(|| v.to_owned())
    })
}

/// The cookie naming the organization the console works in, for people in more than one. It is
/// only a preference: it counts only while the person is a member there (or a system admin), and
/// every call then carries it to the API as `X-Org-Id`, which checks membership again.
pub const ORG_COOKIE: &str = "agentidp_console_org";

fn chosen_org(headers: &HeaderMap) -> Option<Uuid> {
    headers.get_all(header::COOKIE).iter().filter_map(|v| v.to_str().ok()).flat_map(|v| v.split(';')).find_map(|c| {
        let (k, v) = c.trim().split_once('=')?;
        (k == ORG_COOKIE).then(|| v.parse().ok()).flatten()
    })
}

/// The CSRF token of a session: an HMAC keyed with the session secret, so it is unguessable
/// without the (HttpOnly) cookie, needs no storage, and dies with the session.
fn csrf_for(session: &str) -> String {
    use base64::Engine as _;
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(session.as_bytes()).expect("any key length");
    mac.update(b"agentidp console csrf v1");
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes())
}

fn same_secret(a: &str, b: &str) -> bool {
    use subtle::ConstantTimeEq;
    a.len() == b.len() && bool::from(a.as_bytes().ct_eq(b.as_bytes()))
}

/// A cross-site request (an `Origin` other than our own host) is refused before anything runs.
fn cross_origin(headers: &HeaderMap) -> bool {
    let Some(origin) = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()) else { return false };
    let host = headers.get(header::HOST).and_then(|v| v.to_str().ok()).unwrap_or_default();
    let origin_host = origin.split_once("://").map(|(_, rest)| rest).unwrap_or(origin);
    origin == "null" || !origin_host.eq_ignore_ascii_case(host)
}

/// The signed-in person viewing a page, and how to call the API as them.
pub struct Viewer {
    pub actor: Actor,
    pub(crate) caller: Caller,
    pub api: Api,
    pub state: AppState,
    csrf: String,
}

impl FromRequestParts<AppState> for Viewer {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        let to_login = || {
            let here = parts.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/console");
            let next = if parts.method == axum::http::Method::GET { here } else { "/console" };
            Redirect::to(&api::with_query("/console/login", &[("next", next)])).into_response()
        };
        let token = session_token(&parts.headers);
        // Only a session signs into the console: another credential in the request is ignored.
        let actor = parts
            .extensions
            .get::<Actor>()
            .filter(|a| matches!(a.principal.credential, Credential::Session { .. }))
            .cloned();
        let (Some(token), Some(mut actor)) = (token, actor) else { return Err(to_login()) };
        // The organization chosen with the switcher, while the person still belongs there.
        let chosen = chosen_org(&parts.headers)
            .filter(|o| actor.principal.system_admin || actor.principal.memberships.iter().any(|(m, _)| m == o));
        if let Some(org) = chosen {
            actor.org_id = Some(org);
        }
        let Some(api) = parts.extensions.get::<Api>().cloned() else {
            return Err(StatusCode::INTERNAL_SERVER_ERROR.into_response());
        };
        let connect = parts.extensions.get::<ConnectInfo<SocketAddr>>().copied();
        let mut caller = Caller::from_request(&parts.headers, connect, Some(&token));
        if let Some(org) = chosen.and_then(|o| HeaderValue::from_str(&o.to_string()).ok()) {
            caller.forwarded.push((header::HeaderName::from_static("x-org-id"), org));
        }
        Ok(Self { actor, caller, api, state: state.clone(), csrf: csrf_for(&token) })
    }
}

impl Viewer {
    /// The organization the console acts in.
    pub fn org_id(&self) -> Option<Uuid> {
        self.actor.org_id
    }

    pub fn role(&self) -> Option<Role> {
        self.org_id().and_then(|o| self.actor.role_in(o))
    }

    /// What the decision point says of the viewer doing `action` on `resource` (not logged: it
    /// decides which buttons to draw; the API decides, and logs, when one is used).
    pub fn can(&self, action: &str, resource: Resource, resource_id: String, scope: &str) -> bool {
        let query = crate::policy::query_for(&self.actor, action, resource, resource_id, scope);
        self.state.policy().evaluate(&query).is_ok_and(|d| d.permitted())
    }

    /// Whether the viewer administers the current organization (owner, admin, or system admin).
    pub fn is_admin(&self) -> bool {
        self.org_id().is_some_and(|o| self.can("read", Resource::AuditLog { org_id: o }, o.to_string(), ""))
    }

    /// The frame every page shares.
    pub fn shell(&self, title: impl Into<String>, active: &'static str) -> Shell {
        let admin = self.is_admin();
        Shell {
            title: title.into(),
            active,
            email: self.actor.principal.email.clone().unwrap_or_else(|| self.actor.actor_id()),
            role: self.role().map(|r| r.as_str()).unwrap_or(if self.actor.is_system_admin() {
                "system admin"
            } else {
                ""
            }),
            csrf: self.csrf.clone(),
            admin,
            switch_orgs: self.actor.principal.memberships.len() > 1 || self.actor.is_system_admin(),
            notice: None,
            error: None,
            css_url: &assets::ASSETS.css.url,
            css_integrity: &assets::ASSETS.css.integrity,
            js_url: &assets::ASSETS.js.url,
            js_integrity: &assets::ASSETS.js.integrity,
        }
    }

    /// A page that only shows what went wrong, with the API's detail, code and request id.
    pub fn failed(&self, failure: Failure, active: &'static str) -> Response {
        let status = StatusCode::from_u16(failure.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut shell = self.shell("Something went wrong", active);
        shell.error = Some(failure);
        (status, render(pages::ErrorPage { shell })).into_response()
    }
}

/// What every page's frame shows: title, navigation, the viewer, their CSRF token, a notice or
/// the API's problem, and the assets with their integrity hashes.
pub struct Shell {
    pub title: String,
    pub active: &'static str,
    pub email: String,
    pub role: &'static str,
    pub csrf: String,
    pub admin: bool,
    /// Whether the viewer can work in more than one organization (the switcher shows).
    pub switch_orgs: bool,
    pub notice: Option<&'static str>,
    pub error: Option<Failure>,
    pub css_url: &'static str,
    pub css_integrity: &'static str,
    pub js_url: &'static str,
    pub js_integrity: &'static str,
}

impl Shell {
    /// A notice named by a redirect's `?done=`; only known codes show (the text is ours).
    pub fn with_notice(mut self, done: Option<&str>) -> Self {
        self.notice = done.and_then(pages::notice_text);
        self
    }
}

/// Renders a template; a template that fails to render is a logged 500.
pub fn render<T: askama::Template>(template: T) -> Response {
    match template.render() {
        Ok(html) => Html(html).into_response(),
        Err(e) => {
            tracing::error!(error = %e, "console template failed to render");
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                Html("<!doctype html><title>Error</title><p>The page could not be drawn.</p>"),
            )
                .into_response()
        }
    }
}

/// A form submission by a signed-in viewer whose CSRF token matched (and that came from our own
/// origin). Every state-changing console route takes one, so none can forget the check.
pub struct Submitted<T> {
    pub viewer: Viewer,
    pub form: T,
}

impl<T: DeserializeOwned> FromRequest<AppState> for Submitted<T> {
    type Rejection = Response;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, Self::Rejection> {
        let (mut parts, body) = req.into_parts();
        if cross_origin(&parts.headers) {
            return Err(refused("This request came from another site."));
        }
        let viewer = Viewer::from_request_parts(&mut parts, state).await?;
        let bytes = Bytes::from_request(Request::from_parts(parts, body), state)
            .await
            .map_err(|_| refused("The form could not be read."))?;
        let pairs: Vec<(String, String)> = serde_urlencoded::from_bytes(&bytes).unwrap_or_default();
        let presented = pairs.iter().find(|(k, _)| k == "csrf").map(|(_, v)| v.as_str()).unwrap_or_default();
        if !same_secret(presented, &viewer.csrf) {
            return Err(refused("The form's security token is missing or stale; reload the page and try again."));
        }
        let form = serde_urlencoded::from_bytes::<T>(&bytes).map_err(|e| {
            let failure = Failure {
                status: 400,
                code: "invalid_form".into(),
                detail: format!("The form is not valid: {e}"),
                request_id: crate::http::request_id::current_request_id().unwrap_or_default(),
            };
            viewer.failed(failure, "")
        })?;
        Ok(Self { viewer, form })
    }
}

/// 403 for a form without a valid token, as a plain page.
fn refused(why: &'static str) -> Response {
    (StatusCode::FORBIDDEN, render(pages::Refused { why })).into_response()
}

/// A redirect after a successful change, naming what was done.
pub fn done(to: &str, what: &str) -> Response {
    let sep = if to.contains('?') { '&' } else { '?' };
    Redirect::to(&format!("{to}{sep}done={what}")).into_response()
}
