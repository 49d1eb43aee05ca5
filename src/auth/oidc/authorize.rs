//! The authorization endpoint (`GET /oauth2/authorize`) and the sign-in and consent forms it
//! leads to (`POST /oauth2/login`, `POST /oauth2/consent`).
//!
//! The request is validated in two steps. Until the client and its redirect URI are known to be
//! registered, every error is a page here: nothing is ever sent to an unregistered URI. After
//! that, errors go to the redirect URI as RFC 6749 §4.1.2.1 parameters, with `state` and the
//! RFC 9207 `iss`. The forms carry the request's parameters along and validate them again on
//! every step, so no half-done request is kept on the server. Forms are protected by a
//! double-submit CSRF token (a `SameSite=Strict` cookie and a hidden field).

use std::{collections::HashMap, sync::Arc};

use axum::{
    Extension,
    body::Bytes,
    extract::{RawQuery, State},
    http::{HeaderMap, HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};
use time::Duration;
use url::Url;
use uuid::Uuid;

use super::{OidcClient, load_client, pages};
use crate::{
    auth::{
        actor::Actor,
        credentials::{self, Credential},
        sessions,
    },
    crypto,
    http::{ApiError, middleware::tls::Secure},
    state::AppState,
};

/// The CSRF cookie of the sign-in forms.
const CSRF_COOKIE: &str = "agentidp_csrf";
/// The prefix of authorization codes.
pub const CODE_PREFIX: &str = "aidp_ac_";
/// How long a code may be redeemed.
pub const CODE_TTL_SECS: i64 = 60;

/// A validated authorization request.
pub struct AuthzRequest {
    pub client: Arc<OidcClient>,
    pub redirect_uri: String,
    pub state: Option<String>,
    pub nonce: Option<String>,
    pub scopes: Vec<String>,
    pub code_challenge: String,
    pub resources: Vec<String>,
    pub prompt_none: bool,
    pub prompt_login: bool,
    pub prompt_consent: bool,
    pub max_age: Option<i64>,
    /// The parameters as received, carried through the forms.
    pub params: Vec<(String, String)>,
}

/// Why a request is refused.
pub enum Refusal {
    /// The client or its redirect URI is not known: answered here, never redirected.
    Page(&'static str, String),
    /// Sent to the (registered) redirect URI.
    Redirect { uri: String, error: &'static str, description: String, state: Option<String> },
}

/// The parameters a form or query may carry for the authorization request.
const PARAMS: &[&str] = &[
    "response_type",
    "client_id",
    "redirect_uri",
    "scope",
    "state",
    "nonce",
    "code_challenge",
    "code_challenge_method",
    "resource",
    "prompt",
    "max_age",
    "login_hint",
    "response_mode",
    "request",
    "request_uri",
    "display",
    "ui_locales",
    "claims",
    "acr_values",
    "id_token_hint",
];

/// Whether `v` is a PKCE challenge or verifier: 43 to 128 unreserved characters (RFC 7636 §4.1).
pub fn pkce_shaped(v: &str) -> bool {
    (43..=128).contains(&v.len())
        && v.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~'))
}

/// Whether `resource` is a resource this server issues tokens for: our own API, or one named in
/// `auth.allowed_resources`.
pub fn resource_served(state: &AppState, resource: &str) -> bool {
    let cfg = state.config();
    resource == cfg.audience() || cfg.auth.allowed_resources.iter().any(|r| r == resource)
}

/// Validates an authorization request (its parameters, from a query or a form).
pub async fn validate(state: &AppState, pairs: Vec<(String, String)>) -> Result<AuthzRequest, Refusal> {
    let page = |m: &str| Refusal::Page("This sign-in link is not valid", m.to_owned());
    let mut one: HashMap<&str, &str> = HashMap::new();
    let mut repeated: Option<String> = None;
    let mut resources = Vec::new();
    for (k, v) in &pairs {
        if k.len() > 64 || v.len() > 4096 {
            return Err(page("A parameter is too long."));
        }
        if k == "resource" {
            resources.push(v.clone());
        } else if one.insert(k.as_str(), v.as_str()).is_some() {
            repeated = Some(k.clone());
        }
    }
    if matches!(repeated.as_deref(), Some("client_id" | "redirect_uri")) {
        return Err(page("client_id or redirect_uri is repeated."));
    }
    let client_id =
        one.get("client_id").copied().filter(|c| !c.is_empty()).ok_or_else(|| page("client_id is missing."))?;
    let client = match super_client(state, client_id).await {
        Ok(Some(c)) => c,
        Ok(None) => return Err(page("The application is not registered here.")),
        Err(why) => return Err(page(&why)),
    };
    let redirect_uri = match one.get("redirect_uri") {
        Some(u) if client.redirect_uris.iter().any(|r| r == u) => (*u).to_owned(),
        Some(_) => return Err(page("The redirect URI is not registered for this application.")),
        None if client.redirect_uris.len() == 1 => client.redirect_uris[0].clone(),
        None => return Err(page("redirect_uri is required: the application registered several.")),
    };
    let st = one.get("state").map(|s| (*s).to_owned());
    let fail = |error: &'static str, description: &str| Refusal::Redirect {
        uri: redirect_uri.clone(),
        error,
        description: description.to_owned(),
        state: st.clone(),
    };
    if let Some(k) = repeated {
        return Err(fail(
            "invalid_request",
            &format!("The parameter `{}` is repeated.", k.chars().take(64).collect::<String>()),
        ));
    }
    if one.contains_key("request") {
        return Err(fail("request_not_supported", "Request objects are not supported."));
    }
    if one.contains_key("request_uri") {
        return Err(fail("request_uri_not_supported", "request_uri is not supported."));
    }
    match one.get("response_type") {
        None => return Err(fail("invalid_request", "response_type is required.")),
        Some(&"code") => {}
        Some(_) => return Err(fail("unsupported_response_type", "Only response_type=code is supported.")),
    }
    if one.get("response_mode").is_some_and(|m| *m != "query") {
        return Err(fail("invalid_request", "Only response_mode=query is supported."));
    }
    if !client.allows_grant("authorization_code") {
        return Err(fail("unauthorized_client", "This client may not use the authorization code grant."));
    }
    let challenge = one.get("code_challenge").ok_or_else(|| {
        fail("invalid_request", "PKCE is required: send code_challenge with code_challenge_method=S256.")
    })?;
    match one.get("code_challenge_method") {
        Some(&"S256") => {}
        _ => return Err(fail("invalid_request", "code_challenge_method must be S256 (plain is refused).")),
    }
    if challenge.len() != 43 || !pkce_shaped(challenge) {
        return Err(fail("invalid_request", "code_challenge must be the base64url SHA-256 of the verifier."));
    }
    let scopes: Vec<String> = match one.get("scope") {
        Some(s) => {
            let mut out: Vec<String> = Vec::new();
            for sc in s.split(' ').filter(|s| !s.is_empty()) {
                if !client.allowed_scopes.iter().any(|a| a == sc) {
                    return Err(fail(
                        "invalid_scope",
                        &format!(
                            "The scope `{}` is not allowed for this client.",
                            sc.chars().take(100).collect::<String>()
                        ),
                    ));
                }
                if !out.iter().any(|o| o == sc) {
                    out.push(sc.to_owned());
                }
            }
            out
        }
        None => client.allowed_scopes.iter().filter(|s| s.as_str() == "openid").cloned().collect(),
    };
    if scopes.is_empty() {
        return Err(fail("invalid_scope", "No scope was asked for."));
    }
    for r in &resources {
        let absolute = Url::parse(r).is_ok_and(|u| u.fragment().is_none());
        if !absolute || !resource_served(state, r) {
            return Err(fail("invalid_target", "This resource is not served here."));
        }
    }
    let (mut none, mut login, mut consent) = (false, false, false);
    if let Some(p) = one.get("prompt") {
        for v in p.split(' ').filter(|s| !s.is_empty()) {
            match v {
                "none" => none = true,
                "login" => login = true,
                "consent" => consent = true,
                "select_account" => {}
                _ => return Err(fail("invalid_request", "prompt is none, login, consent or select_account.")),
            }
        }
        if none && (login || consent) {
            return Err(fail("invalid_request", "prompt=none cannot be combined with other values."));
        }
    }
    let max_age = match one.get("max_age") {
        None => None,
        Some(v) => match v.parse::<i64>() {
            Ok(n) if n >= 0 => Some(n),
            _ => return Err(fail("invalid_request", "max_age is a number of seconds.")),
        },
    };
    let nonce = one.get("nonce").map(|n| (*n).to_owned());
    let challenge = (*challenge).to_owned();
    let params = pairs.into_iter().filter(|(k, _)| PARAMS.contains(&k.as_str())).collect();
    Ok(AuthzRequest {
        client,
        redirect_uri,
        state: st,
        nonce,
        scopes,
        code_challenge: challenge,
        resources,
        prompt_none: none,
        prompt_login: login,
        prompt_consent: consent,
        max_age,
        params,
    })
}

/// The client named by `client_id`: a registered one, or a client ID metadata document.
async fn super_client(state: &AppState, client_id: &str) -> Result<Option<Arc<OidcClient>>, String> {
    if client_id.starts_with("https://") {
        return super::metadata_document::client(state, client_id).await.map(Some).map_err(|e| e.to_string());
    }
    load_client(state, client_id).await.map_err(|e| {
        tracing::warn!(error = %e, "client lookup failed");
        "The server is busy; try again shortly.".to_owned()
    })
}

/// `uri` with the parameters appended to its query.
pub fn with_params(uri: &str, params: &[(&str, &str)]) -> String {
    match Url::parse(uri) {
        Ok(mut url) => {
            {
                let mut q = url.query_pairs_mut();
                for (k, v) in params {
                    q.append_pair(k, v);
                }
            }
            url.to_string()
        }
        Err(_) => uri.to_owned(),
    }
}

fn redirect(status: StatusCode, location: &str) -> Response {
    let mut r = status.into_response();
    if let Ok(v) = HeaderValue::from_str(location) {
        r.headers_mut().insert(header::LOCATION, v);
    }
    r.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

fn refuse(state: &AppState, refusal: Refusal, status: StatusCode) -> Response {
    match refusal {
        Refusal::Page(title, message) => pages::error(StatusCode::BAD_REQUEST, title, &message),
        Refusal::Redirect { uri, error, description, state: st } => {
            let iss = state.config().server.public_url.clone();
            let mut params = vec![("error", error), ("error_description", description.as_str())];
            if let Some(s) = st.as_deref() {
                params.push(("state", s));
            }
            params.push(("iss", iss.as_str()));
            redirect(status, &with_params(&uri, &params))
        }
    }
}

fn redirect_error(
    state: &AppState,
    req: &AuthzRequest,
    error: &'static str,
    description: &str,
    status: StatusCode,
) -> Response {
    refuse(
        state,
        Refusal::Redirect {
            uri: req.redirect_uri.clone(),
            error,
            description: description.to_owned(),
            state: req.state.clone(),
        },
        status,
    )
}

/// Who is signed in, from the session cookie.
pub struct Login {
    pub user_id: Uuid,
    pub session_id: Uuid,
    pub auth_time: time::OffsetDateTime,
    pub email: String,
}

async fn current_login(state: &AppState, actor: Option<&Actor>) -> Result<Option<Login>, sqlx::Error> {
    let Some(actor) = actor else { return Ok(None) };
    let Credential::Session { session_id, .. } = actor.principal.credential else { return Ok(None) };
    let row = sqlx::query!(
        "select s.created_at, u.email from session s join app_user u using (user_id)
         where s.session_id = $1 and s.ended_at is null and s.expires_at > now() and u.status = 'active'",
        session_id
    )
    .fetch_optional(state.db())
    .await?;
    Ok(row.map(|r| Login { user_id: actor.user_id(), session_id, auth_time: r.created_at, email: r.email }))
}

/// The CSRF token in the cookie, or a new one (with the cookie to set).
fn csrf_token(headers: &HeaderMap, secure: bool) -> (String, Option<HeaderValue>) {
    if let Some(t) = cookie(headers, CSRF_COOKIE).filter(|t| t.len() == 43) {
        return (t, None);
    }
    let t = crypto::random_token("");
    let secure = if secure { "; Secure" } else { "" };
    let c = HeaderValue::from_str(&format!("{CSRF_COOKIE}={t}; Path=/oauth2; HttpOnly; SameSite=Strict{secure}")).ok();
    (t, c)
}

fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers.get_all(header::COOKIE).iter().filter_map(|v| v.to_str().ok()).flat_map(|v| v.split(';')).find_map(|c| {
        let (k, v) = c.trim().split_once('=')?;
        (k == name).then(|| v.to_owned())
    })
}

fn csrf_ok(headers: &HeaderMap, field: Option<&str>) -> bool {
    match (cookie(headers, CSRF_COOKIE), field) {
        (Some(c), Some(f)) => c.len() == 43 && crypto::ct_eq(c.as_bytes(), f.as_bytes()),
        _ => false,
    }
}

fn login_page(
    state: &AppState,
    req: &AuthzRequest,
    headers: &HeaderMap,
    secure: bool,
    status: StatusCode,
    error: Option<&str>,
    email: &str,
) -> Response {
    let (csrf, set_cookie) = csrf_token(headers, secure);
    let nonce = pages::nonce();
    let mut h = pages::headers(&nonce, Some(&req.redirect_uri), None);
    if let Some(c) = set_cookie {
        h.append(header::SET_COOKIE, c);
    }
    let issuer = state.config().server.public_url.clone();
    let page = pages::LoginPage {
        nonce: &nonce,
        client_name: &req.client.name,
        issuer: &issuer,
        error,
        email,
        csrf: &csrf,
        hidden: &req.params,
    };
    pages::render(status, &page, h)
}

fn consent_page(req: &AuthzRequest, login: &Login, headers: &HeaderMap, secure: bool, extra: HeaderMap) -> Response {
    let (csrf, set_cookie) = csrf_token(headers, secure);
    let nonce = pages::nonce();
    let c = &req.client;
    let mut h = pages::headers(&nonce, Some(&req.redirect_uri), c.logo_uri.as_deref());
    h.extend(extra);
    if let Some(cookie) = set_cookie {
        h.append(header::SET_COOKIE, cookie);
    }
    let page = pages::ConsentPage {
        nonce: &nonce,
        client_name: &c.name,
        logo_uri: c.logo_uri.as_deref(),
        client_uri: c.client_uri.as_deref(),
        policy_uri: c.policy_uri.as_deref(),
        tos_uri: c.tos_uri.as_deref(),
        user: &login.email,
        scopes: req.scopes.iter().map(|s| (s.as_str(), pages::describe_scope(s))).collect(),
        resources: &req.resources,
        redirect_uri: &req.redirect_uri,
        csrf: &csrf,
        hidden: &req.params,
    };
    pages::render(StatusCode::OK, &page, h)
}

/// The organization the tokens are issued in: the client's (its people only), or for a
/// metadata-document client the person's first organization.
async fn organization(state: &AppState, client: &OidcClient, user_id: Uuid) -> Result<Option<Uuid>, sqlx::Error> {
    match client.org_id {
        Some(org) => {
            let member = sqlx::query_scalar!(
                r#"select exists(select 1 from membership where user_id = $1 and organization_id = $2) as "e!""#,
                user_id,
                org
            )
            .fetch_one(state.db())
            .await?;
            Ok(member.then_some(org))
        }
        None => sqlx::query_scalar!(
            "select organization_id from membership where user_id = $1 order by created_at, organization_id limit 1",
            user_id
        )
        .fetch_optional(state.db())
        .await,
    }
}

/// After sign-in (or with a live session): consent if needed, then the code.
async fn proceed(
    state: &AppState,
    req: AuthzRequest,
    login: Login,
    headers: &HeaderMap,
    secure: bool,
    extra: HeaderMap,
    status: StatusCode,
) -> Result<Response, ApiError> {
    let Some(org_id) = organization(state, &req.client, login.user_id).await? else {
        let mut r = redirect_error(
            state,
            &req,
            "access_denied",
            "You are not a member of the organization that registered this application.",
            status,
        );
        r.headers_mut().extend(extra);
        return Ok(r);
    };
    let stored = sqlx::query_scalar!(
        "select scopes from oauth_consent where user_id = $1 and client_id = $2",
        login.user_id,
        req.client.client_id
    )
    .fetch_optional(state.db())
    .await?;
    let covered = stored.is_some_and(|s| req.scopes.iter().all(|r| s.contains(r)));
    if covered && !req.prompt_consent {
        let mut r = issue_code(state, &req, &login, org_id, status).await?;
        r.headers_mut().extend(extra);
        return Ok(r);
    }
    if req.prompt_none {
        let mut r =
            redirect_error(state, &req, "consent_required", "The person has not allowed this application yet.", status);
        r.headers_mut().extend(extra);
        return Ok(r);
    }
    Ok(consent_page(&req, &login, headers, secure, extra))
}

/// Records a one-time code and sends the browser back with it.
async fn issue_code(
    state: &AppState,
    req: &AuthzRequest,
    login: &Login,
    org_id: Uuid,
    status: StatusCode,
) -> Result<Response, ApiError> {
    let code = crypto::random_token(CODE_PREFIX);
    let expires_at = state.clock().now() + Duration::seconds(CODE_TTL_SECS);
    sqlx::query!(
        "insert into oauth_code (code_hash, client_id, organization_id, user_id, session_id, redirect_uri,
             code_challenge, scope, nonce, resources, auth_time, expires_at)
         values ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)",
        &crypto::sha256(&code)[..],
        req.client.client_id,
        org_id,
        login.user_id,
        login.session_id,
        req.redirect_uri,
        req.code_challenge,
        req.scopes.join(" "),
        req.nonce,
        &req.resources,
        login.auth_time,
        expires_at
    )
    .execute(state.db())
    .await?;
    metrics::counter!("oidc_codes_issued_total").increment(1);
    let iss = state.config().server.public_url.clone();
    let mut params = vec![("code", code.as_str())];
    if let Some(s) = req.state.as_deref() {
        params.push(("state", s));
    }
    params.push(("iss", iss.as_str()));
    Ok(redirect(status, &with_params(&req.redirect_uri, &params)))
}

fn query_pairs(q: Option<&str>) -> Option<Vec<(String, String)>> {
    serde_urlencoded::from_str(q.unwrap_or("")).ok()
}

/// OAuth 2.1 / OpenID Connect authorization endpoint: authorization code with PKCE (`S256`).
/// Unknown clients and unregistered redirect URIs get an error page; every other error goes to
/// the redirect URI with `error`, `state` and `iss` (RFC 9207).
#[utoipa::path(get, path = "/oauth2/authorize", tag = "oidc",
    params(
        ("response_type" = String, Query, description = "`code`"),
        ("client_id" = String, Query, description = "A registered client's id, or the https URL of its client ID metadata document"),
        ("redirect_uri" = Option<String>, Query, description = "Exactly as registered"),
        ("scope" = Option<String>, Query),
        ("state" = Option<String>, Query),
        ("nonce" = Option<String>, Query),
        ("code_challenge" = String, Query, description = "base64url(SHA-256(code_verifier))"),
        ("code_challenge_method" = String, Query, description = "`S256`"),
        ("resource" = Option<String>, Query, description = "RFC 8707; may repeat"),
        ("prompt" = Option<String>, Query, description = "`none`, `login`, `consent`"),
        ("max_age" = Option<i64>, Query)),
    responses(
        (status = 200, description = "The sign-in or consent page", content_type = "text/html"),
        (status = 302, description = "Back to the redirect URI with `code` (or `error`), `state` and `iss`"),
        (status = 400, description = "An error page: unknown client or unregistered redirect URI", content_type = "text/html")))]
pub(in crate::auth) async fn authorize(
    State(state): State<AppState>,
    Extension(Secure(secure)): Extension<Secure>,
    actor: Option<Extension<Actor>>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    let Some(pairs) = query_pairs(query.as_deref()) else {
        return Ok(pages::error(
            StatusCode::BAD_REQUEST,
            "This sign-in link is not valid",
            "The query string is malformed.",
        ));
    };
    let req = match validate(&state, pairs).await {
        Ok(r) => r,
        Err(refusal) => return Ok(refuse(&state, refusal, StatusCode::FOUND)),
    };
    let login = current_login(&state, actor.as_ref().map(|a| &a.0)).await?;
    let now = state.clock().now();
    let fresh_enough = |l: &Login| req.max_age.is_none_or(|m| (now - l.auth_time).whole_seconds() <= m);
    match login {
        Some(l) if !req.prompt_login && fresh_enough(&l) => {
            proceed(&state, req, l, &headers, secure, HeaderMap::new(), StatusCode::FOUND).await
        }
        _ if req.prompt_none => {
            Ok(redirect_error(&state, &req, "login_required", "The person is not signed in.", StatusCode::FOUND))
        }
        _ => Ok(login_page(&state, &req, &headers, secure, StatusCode::OK, None, "")),
    }
}

fn form_pairs(headers: &HeaderMap, body: &[u8]) -> Option<Vec<(String, String)>> {
    let form = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).is_some_and(|v| {
        v.split(';').next().is_some_and(|m| m.trim().eq_ignore_ascii_case("application/x-www-form-urlencoded"))
    });
    if !form {
        return None;
    }
    serde_urlencoded::from_bytes(body).ok()
}

fn take(pairs: &mut Vec<(String, String)>, name: &str) -> Option<String> {
    let i = pairs.iter().position(|(k, _)| k == name)?;
    Some(pairs.remove(i).1)
}

fn expired_form() -> Response {
    pages::error(StatusCode::FORBIDDEN, "This form has expired", "Go back to the application and sign in again.")
}

/// The sign-in form: the same password check and throttling as `POST /auth/login`; on success a
/// session cookie, then consent (or straight back to the application).
#[utoipa::path(post, path = "/oauth2/login", tag = "oidc",
    request_body(content_type = "application/x-www-form-urlencoded", description = "csrf_token, email, password, and the authorization request's parameters"),
    responses(
        (status = 200, description = "The consent page", content_type = "text/html"),
        (status = 303, description = "Back to the redirect URI"),
        (status = 400, description = "Not a form, or the authorization request names an unknown client or an unregistered redirect URI", content_type = "text/html"),
        (status = 401, description = "The sign-in page again: wrong email or password", content_type = "text/html"),
        (status = 403, description = "The CSRF token is missing or wrong", content_type = "text/html"),
        (status = 429, description = "Too many failed sign-ins; see Retry-After", content_type = "text/html")))]
pub(in crate::auth) async fn sign_in(
    State(state): State<AppState>,
    Extension(Secure(secure)): Extension<Secure>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let Some(mut pairs) = form_pairs(&headers, &body) else {
        return Ok(pages::error(StatusCode::BAD_REQUEST, "This form is not valid", "Send the sign-in form."));
    };
    let csrf = take(&mut pairs, "csrf_token");
    let email = take(&mut pairs, "email").unwrap_or_default();
    let password = take(&mut pairs, "password").unwrap_or_default();
    if !csrf_ok(&headers, csrf.as_deref()) {
        return Ok(expired_form());
    }
    let req = match validate(&state, pairs).await {
        Ok(r) => r,
        Err(refusal) => return Ok(refuse(&state, refusal, StatusCode::SEE_OTHER)),
    };
    let email: String = email.chars().take(254).collect();
    if email.is_empty() || password.is_empty() || password.len() > 1024 {
        return Ok(login_page(
            &state,
            &req,
            &headers,
            secure,
            StatusCode::UNAUTHORIZED,
            Some("Enter your email and password."),
            &email,
        ));
    }
    let session = match sessions::password_login(&state, &headers, &email, password).await {
        Ok(s) => s,
        Err(ApiError::Unauthorized { .. }) => {
            return Ok(login_page(
                &state,
                &req,
                &headers,
                secure,
                StatusCode::UNAUTHORIZED,
                Some("Invalid email or password."),
                &email,
            ));
        }
        Err(ApiError::TooManyRequests { retry_after, .. }) => {
            let mut r = login_page(
                &state,
                &req,
                &headers,
                secure,
                StatusCode::TOO_MANY_REQUESTS,
                Some("Too many failed sign-ins; wait a while before trying again."),
                &email,
            );
            r.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(retry_after));
            return Ok(r);
        }
        Err(e) => return Err(e),
    };
    let mut extra = HeaderMap::new();
    extra.append(header::SET_COOKIE, sessions::session_cookie(&session.token, session.ttl, secure));
    let login =
        Login { user_id: session.user_id, session_id: session.session_id, auth_time: session.created_at, email };
    proceed(&state, req, login, &headers, secure, extra, StatusCode::SEE_OTHER).await
}

/// The consent form: `decision=allow` remembers the consent and sends the code; `deny` sends
/// `access_denied`.
#[utoipa::path(post, path = "/oauth2/consent", tag = "oidc",
    request_body(content_type = "application/x-www-form-urlencoded", description = "csrf_token, decision (allow or deny), and the authorization request's parameters"),
    responses(
        (status = 303, description = "Back to the redirect URI with `code` or `error=access_denied`"),
        (status = 200, description = "The sign-in page, when the session has ended", content_type = "text/html"),
        (status = 400, description = "Not a form, or the authorization request names an unknown client or an unregistered redirect URI", content_type = "text/html"),
        (status = 403, description = "The CSRF token is missing or wrong", content_type = "text/html")))]
pub(in crate::auth) async fn give_consent(
    State(state): State<AppState>,
    Extension(Secure(secure)): Extension<Secure>,
    actor: Option<Extension<Actor>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let Some(mut pairs) = form_pairs(&headers, &body) else {
        return Ok(pages::error(StatusCode::BAD_REQUEST, "This form is not valid", "Send the consent form."));
    };
    let csrf = take(&mut pairs, "csrf_token");
    let decision = take(&mut pairs, "decision");
    if !csrf_ok(&headers, csrf.as_deref()) {
        return Ok(expired_form());
    }
    let req = match validate(&state, pairs).await {
        Ok(r) => r,
        Err(refusal) => return Ok(refuse(&state, refusal, StatusCode::SEE_OTHER)),
    };
    let Some(login) = current_login(&state, actor.as_ref().map(|a| &a.0)).await? else {
        return Ok(login_page(&state, &req, &headers, secure, StatusCode::OK, None, ""));
    };
    if decision.as_deref() != Some("allow") {
        return Ok(redirect_error(&state, &req, "access_denied", "The person declined.", StatusCode::SEE_OTHER));
    }
    let Some(org_id) = organization(&state, &req.client, login.user_id).await? else {
        return Ok(redirect_error(
            &state,
            &req,
            "access_denied",
            "You are not a member of the organization that registered this application.",
            StatusCode::SEE_OTHER,
        ));
    };
    sqlx::query!(
        "insert into oauth_consent (user_id, client_id, client_name, scopes) values ($1, $2, $3, $4)
         on conflict (user_id, client_id) do update
         set client_name = excluded.client_name,
             scopes = array(select distinct unnest(oauth_consent.scopes || excluded.scopes) order by 1)",
        login.user_id,
        req.client.client_id,
        req.client.name,
        &req.scopes
    )
    .execute(state.db())
    .await?;
    issue_code(&state, &req, &login, org_id, StatusCode::SEE_OTHER).await
}

/// The session cookie's user, for the other OpenID endpoints (logout).
pub(crate) async fn session_of(state: &AppState, headers: &HeaderMap) -> Option<(Uuid, Uuid, [u8; 32])> {
    let token = cookie(headers, crate::SESSION_COOKIE)?;
    let auth = state.auth();
    let p = credentials::resolve(state.db(), &auth.cache, &auth.lookups, &token).await.ok()?;
    match p.credential {
        Credential::Session { session_id, .. } => Some((p.user_id, session_id, p.secret_hash)),
        _ => None,
    }
}
