//! The OAuth 2.0 authorization server: the token endpoint (RFC 6749 §4.4 client credentials),
//! introspection (RFC 7662), revocation (RFC 7009), metadata (RFC 8414, OpenID discovery, RFC 9728)
//! and the JWKS. Errors here are RFC 6749 §5.2 JSON, not problem+json.

use std::{collections::HashMap, sync::Arc, time::Duration};

use axum::{
    Extension, Json,
    body::Bytes,
    extract::State,
    http::{HeaderMap, HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};
use base64::{Engine, engine::general_purpose::STANDARD};
use serde::Serialize;
use serde_json::{Value, json};
use time::OffsetDateTime;
use utoipa::ToSchema;
use uuid::Uuid;

use super::{
    actor::{Actor, ActorType, Role, Scope},
    credentials::{Credential, Failure, Principal},
    revocation::{self, Announced, Subject},
    tokens::{self, Audience, Claims, Rejection},
};
use crate::{cache::Cache, state::AppState};

/// An RFC 6749 §5.2 error.
#[derive(Debug)]
pub struct OAuthError {
    status: StatusCode,
    error: &'static str,
    description: String,
    /// Rate-limit headers and `Retry-After` of a 429.
    headers: Option<Box<HeaderMap>>,
}

impl OAuthError {
    pub(super) fn new(status: StatusCode, error: &'static str, description: impl Into<String>) -> Self {
        Self { status, error, description: description.into(), headers: None }
    }
    pub(super) fn invalid_request(d: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request", d)
    }
    pub(super) fn invalid_client() -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "invalid_client", "Client authentication failed.")
    }
    /// Extra headers on the error response (rate-limit headers, `DPoP-Nonce`).
    pub(super) fn with_headers(mut self, headers: HeaderMap) -> Self {
        self.headers = Some(Box::new(headers));
        self
    }
    pub(super) fn server_error() -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "temporarily_unavailable", "Try again shortly.")
    }
    pub(super) fn lookups_throttled() -> Self {
        let mut e = Self::new(
            StatusCode::TOO_MANY_REQUESTS,
            "too_many_requests",
            "Too many unknown clients from this address; slow down.",
        );
        e.headers = Some(Box::new(HeaderMap::from_iter([(header::RETRY_AFTER, HeaderValue::from_static("60"))])));
        e
    }
}

/// The RFC 6749 error body.
#[derive(Serialize, ToSchema)]
pub struct OAuthErrorBody {
    pub error: String,
    pub error_description: String,
}

pub(super) fn no_store(headers: &mut HeaderMap) {
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(header::PRAGMA, HeaderValue::from_static("no-cache"));
}

impl IntoResponse for OAuthError {
    fn into_response(self) -> Response {
        let mut response =
            (self.status, Json(OAuthErrorBody { error: self.error.into(), error_description: self.description }))
                .into_response();
        no_store(response.headers_mut());
        if let Some(extra) = self.headers {
            response.headers_mut().extend(*extra);
        }
        if self.status == StatusCode::UNAUTHORIZED {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Basic realm=\"agentidp\""));
        }
        response
    }
}

impl From<sqlx::Error> for OAuthError {
    fn from(e: sqlx::Error) -> Self {
        tracing::warn!(error = %e, "database error on an OAuth endpoint");
        Self::server_error()
    }
}

/// Form parameters, each at most once (RFC 6749 §3.2), except RFC 8707's `resource`.
pub(super) struct Form {
    pub params: HashMap<String, String>,
    pub resources: Vec<String>,
}

pub(super) fn parse_form(headers: &HeaderMap, body: &[u8]) -> Result<Form, OAuthError> {
    let form_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|m| m.trim().eq_ignore_ascii_case("application/x-www-form-urlencoded"));
    if !form_type {
        return Err(OAuthError::invalid_request("The body must be application/x-www-form-urlencoded."));
    }
    let pairs: Vec<(String, String)> =
        serde_urlencoded::from_bytes(body).map_err(|_| OAuthError::invalid_request("The form body is malformed."))?;
    let mut params = HashMap::new();
    let mut resources = Vec::new();
    for (k, v) in pairs {
        if k.len() > 64 || v.len() > 8192 {
            return Err(OAuthError::invalid_request("A parameter is too long."));
        }
        if k.contains('\0') || v.contains('\0') {
            return Err(OAuthError::invalid_request("A parameter contains the NUL character (U+0000)."));
        }
        if k == "resource" {
            resources.push(v);
            continue;
        }
        if params.insert(k.clone(), v).is_some() {
            return Err(OAuthError::invalid_request(format!("The parameter `{k}` is repeated.")));
        }
    }
    Ok(Form { params, resources })
}

/// What the token endpoint needs to know about a client, cached briefly.
#[derive(Debug, Clone)]
pub struct ClientRecord {
    pub credential_id: Uuid,
    pub client_id: String,
    pub agent_id: Uuid,
    pub org_id: Uuid,
    secret_hash: Vec<u8>,
    previous: Option<(Vec<u8>, OffsetDateTime)>,
    pub agent_active: bool,
    pub allowed_scopes: Vec<String>,
    /// When it was read from Postgres (unix seconds, the clock that stamps revocations).
    pub loaded_at: i64,
}

impl ClientRecord {
    fn subjects(&self) -> [Subject; 3] {
        [Subject::Credential(self.credential_id), Subject::Agent(self.agent_id), Subject::Org(self.org_id)]
    }
}

/// Client records by client_id, and client ids known not to exist; dropped on every instance
/// when a credential or agent changes.
pub struct ClientCache {
    records: Cache<String, Arc<ClientRecord>>,
    unknown: Cache<String, ()>,
}

impl ClientCache {
    pub fn new(ttl: Duration, negative_ttl: Duration) -> Self {
        Self { records: Cache::new(100_000, ttl), unknown: Cache::new(100_000, negative_ttl) }
    }
    pub fn remove(&self, client_id: &str) {
        self.records.remove(client_id);
    }
    pub fn clear(&self) {
        self.records.clear();
        self.unknown.clear();
    }
    /// The cached record, if any (tests use it to stage a stale entry).
    pub fn get(&self, client_id: &str) -> Option<Arc<ClientRecord>> {
        self.records.get(client_id)
    }
    pub fn put(&self, record: Arc<ClientRecord>) {
        self.records.insert(record.client_id.clone(), record);
    }
}

/// The client's record. The cache is trusted only as far as the bearer check trusts the revocation
/// set: not while the change feed may be missing messages, and not for a record loaded before a
/// revocation of its credential, agent or organization (an invalidation can be lost, or a record
/// read just before one can be cached just after it).
async fn load_client(state: &AppState, client_id: &str) -> Result<Option<Arc<ClientRecord>>, OAuthError> {
    if client_id.is_empty() || client_id.len() > 128 {
        return Ok(None);
    }
    let auth = state.auth();
    let clients = &auth.clients;
    let live = auth.revocations.is_live();
    match clients.get(client_id) {
        Some(r) if live && auth.revocations.newest_watermark(&r.subjects()).is_none_or(|nb| nb < r.loaded_at) => {
            return Ok(Some(r));
        }
        // A known client, read again: not an anonymous lookup.
        Some(_) => {}
        None => {
            if live && clients.unknown.get(client_id).is_some() {
                return Ok(None);
            }
            auth.lookups.charge().map_err(|_| OAuthError::lookups_throttled())?;
        }
    }
    let loaded_at = state.clock().now().unix_timestamp();
    let Some(r) = sqlx::query!(
        "select c.credential_id, c.client_id, c.secret_hash, c.previous_secret_hash, c.previous_expires_at,
                a.agent_id, a.organization_id, a.status, a.allowed_scopes
         from agent_credential c join agent a using (agent_id)
         where c.client_id = $1 and c.revoked_at is null",
        client_id
    )
    .fetch_optional(state.db())
    .await?
    else {
        clients.unknown.insert(client_id.to_owned(), ());
        return Ok(None);
    };
    let record = Arc::new(ClientRecord {
        credential_id: r.credential_id,
        client_id: r.client_id,
        agent_id: r.agent_id,
        org_id: r.organization_id,
        secret_hash: r.secret_hash,
        previous: r.previous_secret_hash.zip(r.previous_expires_at),
        agent_active: r.status == "active",
        allowed_scopes: r.allowed_scopes,
        loaded_at,
    });
    clients.put(record.clone());
    Ok(Some(record))
}

/// The client id and secret presented with `client_secret_basic` or `client_secret_post`, and
/// whether it was Basic; never both (RFC 6749 §2.3). `None` when no secret was presented.
pub(super) fn client_secret(headers: &HeaderMap, form: &Form) -> Result<Option<(String, String, bool)>, OAuthError> {
    let basic = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| {
        let (scheme, rest) = v.split_once(' ')?;
        scheme.eq_ignore_ascii_case("basic").then(|| rest.trim().to_owned())
    });
    Ok(Some(match (basic, form.params.get("client_secret")) {
        (Some(_), Some(_)) => {
            return Err(OAuthError::invalid_request("Use one client authentication method, not two."));
        }
        (Some(b64), None) => {
            let decoded = STANDARD.decode(b64).map_err(|_| OAuthError::invalid_client())?;
            let text = String::from_utf8(decoded).map_err(|_| OAuthError::invalid_client())?;
            let (id, secret) = text.split_once(':').ok_or_else(OAuthError::invalid_client)?;
            // RFC 6749 §2.3.1: both are form-urlencoded before base64.
            let unescape = |s: &str| -> Result<String, OAuthError> {
                let pairs: Vec<(String, String)> =
                    serde_urlencoded::from_str(&format!("v={s}")).map_err(|_| OAuthError::invalid_client())?;
                Ok(pairs.into_iter().next().map(|(_, v)| v).unwrap_or_default())
            };
            let id = unescape(id)?;
            if form.params.get("client_id").is_some_and(|c| *c != id) {
                return Err(OAuthError::invalid_request("client_id differs from the Authorization header."));
            }
            (id, unescape(secret)?, true)
        }
        (None, Some(secret)) => {
            let id = form.params.get("client_id").ok_or_else(OAuthError::invalid_client)?;
            (id.clone(), secret.clone(), false)
        }
        (None, None) => return Ok(None),
    }))
}

/// `client_secret_basic` or `client_secret_post`, never both (RFC 6749 §2.3).
async fn authenticate_client(
    state: &AppState,
    headers: &HeaderMap,
    form: &Form,
) -> Result<Arc<ClientRecord>, OAuthError> {
    let (id, secret) = match client_secret(headers, form)? {
        Some((id, secret, _)) => (id, secret),
        None => return Err(OAuthError::invalid_client()),
    };
    let record = load_client(state, &id).await?;
    let presented = crate::crypto::sha256(&secret);
    let now = OffsetDateTime::now_utc();
    let ok = record.as_ref().is_some_and(|r| {
        let current = crate::crypto::ct_eq(&r.secret_hash, &presented);
        let previous =
            r.previous.as_ref().is_some_and(|(h, until)| *until > now && crate::crypto::ct_eq(h, &presented));
        current | previous
    });
    match record {
        Some(r) if ok => Ok(r),
        _ => Err(OAuthError::invalid_client()),
    }
}

/// Runs the token endpoint's parsing of untrusted bytes (the form body, the Basic header) alone,
/// for the fuzz targets: any input must give an answer, never a panic.
#[doc(hidden)]
pub fn parse_token_request(headers: &HeaderMap, body: &[u8]) -> Result<(String, String), String> {
    let form = parse_form(headers, body).map_err(|e| e.error.to_owned())?;
    let _ = require_grant(&form);
    match client_secret(headers, &form).map_err(|e| e.error.to_owned())? {
        Some((id, secret, _)) => Ok((id, secret)),
        None => Err("invalid_client".to_owned()),
    }
}

/// The token response (RFC 6749 §5.1).
#[derive(Serialize, ToSchema)]
pub struct TokenResponse {
    pub access_token: String,
    /// `Bearer`, or `DPoP` for a token bound to a DPoP key.
    pub token_type: &'static str,
    pub expires_in: u64,
    pub scope: String,
}

/// Form fields of the token endpoint.
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct TokenForm {
    /// `client_credentials`, `urn:ietf:params:oauth:grant-type:token-exchange` (RFC 8693) or
    /// `urn:ietf:params:oauth:grant-type:jwt-bearer` (RFC 7523, federation).
    grant_type: String,
    /// jwt-bearer: the external issuer's token, matched by a trust policy.
    assertion: Option<String>,
    /// Token exchange: the delegator's session token or API key, or a delegated token (a chain);
    /// or, with type `...:jwt` and no actor_token, an external issuer's token (federation).
    subject_token: Option<String>,
    /// Token exchange: `urn:ietf:params:oauth:token-type:access_token` (or `:jwt`).
    subject_token_type: Option<String>,
    /// Token exchange: the agent's own access token (client credentials).
    actor_token: Option<String>,
    actor_token_type: Option<String>,
    /// Token exchange: only access tokens are issued.
    requested_token_type: Option<String>,
    /// Token exchange: like `resource`.
    audience: Option<String>,
    /// Space-separated, within the agent's `allowed_scopes`; default: all of them.
    scope: Option<String>,
    /// RFC 8707 resource indicator: the token's audience, if allowed by configuration.
    resource: Option<String>,
    /// With `client_secret_post`.
    client_id: Option<String>,
    /// With `client_secret_post`.
    client_secret: Option<String>,
}

/// Client credentials grant: an RFC 9068 access token for an agent. Token exchange (RFC 8693): a
/// delegated token (`act`, `delegation_id`) under an active delegation, answered with
/// `issued_token_type`.
#[utoipa::path(post, path = "/api/v1/token", tag = "oauth",
    request_body(content = TokenForm, content_type = "application/x-www-form-urlencoded"),
    security((), ("client_secret_basic" = [])),
    responses(
        (status = 200, description = "TokenResponse, or ExchangeResponse for token exchange", body = TokenResponse),
        (status = 400, description = "invalid_request, invalid_scope, invalid_target, unsupported_grant_type, unauthorized_client", body = OAuthErrorBody),
        (status = 401, description = "invalid_client", body = OAuthErrorBody),
        (status = 429, description = "too_many_requests (the client's rate) or quota_exceeded (the organization's daily or monthly tokens); with Retry-After", body = OAuthErrorBody)))]
pub(super) async fn token(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, OAuthError> {
    let form = parse_form(&headers, &body)?;
    match require_grant(&form)? {
        // An external issuer's JWT without an actor: federation, not delegation.
        Grant::TokenExchange
            if !form.params.contains_key("actor_token")
                && form.params.get("subject_token_type").map(String::as_str) == Some(JWT_TOKEN_TYPE) =>
        {
            return federated(&state, &form, form.params.get("subject_token"), true).await;
        }
        Grant::TokenExchange => return exchange(&state, &headers, &form).await,
        Grant::JwtBearer => return federated(&state, &form, form.params.get("assertion"), false).await,
        Grant::AuthorizationCode => return super::oidc::grants::authorization_code(&state, &headers, &form).await,
        Grant::RefreshToken => return super::oidc::grants::refresh_token(&state, &headers, &form).await,
        Grant::ClientCredentials => {}
    }
    let client = authenticate_client(&state, &headers, &form).await?;
    if !client.agent_active {
        return Err(OAuthError::new(StatusCode::BAD_REQUEST, "unauthorized_client", "The agent is suspended."));
    }
    let scope = granted_scope(&client, form.params.get("scope"))?;
    let aud = audience(state.config(), &form.resources)?;
    // RFC 9449: a proof binds the token to its key.
    let dpop = super::oidc::dpop::at_token_endpoint(&state, &headers).await?;
    let limit_headers = charge(&state, &client).await?;
    let ttl = state.config().auth.access_token_ttl_secs;
    let jkt = dpop.as_ref().map(|d| d.jkt.clone());
    let token_type = if jkt.is_some() { "DPoP" } else { "Bearer" };
    let access_token = issue(&state, &client, aud, &scope, ttl, jkt)?;
    let mut response = Json(TokenResponse { access_token, token_type, expires_in: ttl, scope }).into_response();
    no_store(response.headers_mut());
    response.headers_mut().extend(limit_headers);
    if let Some(d) = dpop {
        response.headers_mut().extend(d.headers);
    }
    Ok(response)
}

/// The grants served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Grant {
    ClientCredentials,
    /// OpenID Connect: a person's code, with PKCE.
    AuthorizationCode,
    RefreshToken,
    /// RFC 8693: under a delegation, or an external issuer's token (federation).
    TokenExchange,
    /// RFC 7523 §2.1: an external issuer's token as the grant (federation).
    JwtBearer,
}

const JWT_BEARER: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";

const TOKEN_EXCHANGE: &str = "urn:ietf:params:oauth:grant-type:token-exchange";
const ACCESS_TOKEN_TYPE: &str = "urn:ietf:params:oauth:token-type:access_token";
const JWT_TOKEN_TYPE: &str = "urn:ietf:params:oauth:token-type:jwt";

fn require_grant(form: &Form) -> Result<Grant, OAuthError> {
    match form.params.get("grant_type").map(String::as_str) {
        None => Err(OAuthError::invalid_request("grant_type is required.")),
        Some("client_credentials") => Ok(Grant::ClientCredentials),
        Some("authorization_code") => Ok(Grant::AuthorizationCode),
        Some("refresh_token") => Ok(Grant::RefreshToken),
        Some(TOKEN_EXCHANGE) => Ok(Grant::TokenExchange),
        Some(JWT_BEARER) => Ok(Grant::JwtBearer),
        Some(_) => Err(OAuthError::new(
            StatusCode::BAD_REQUEST,
            "unsupported_grant_type",
            "Supported: authorization_code, refresh_token, client_credentials, token-exchange and jwt-bearer.",
        )),
    }
}

/// The token-exchange response (RFC 8693 §2.2.1).
#[derive(Serialize, ToSchema)]
pub struct ExchangeResponse {
    pub access_token: String,
    /// `urn:ietf:params:oauth:token-type:access_token`.
    pub issued_token_type: &'static str,
    /// Always `Bearer`.
    pub token_type: &'static str,
    pub expires_in: u64,
    pub scope: String,
}

/// RFC 8693 token exchange: a delegated token for the agent of `actor_token`, acting for the
/// subject of `subject_token` (a human's session token or API key, or a delegated token for a
/// chain), under an active delegation from that subject to that agent. The new token keeps the
/// whole actor chain; nothing is issued without an actor.
async fn exchange(state: &AppState, headers: &HeaderMap, form: &Form) -> Result<Response, OAuthError> {
    let result = exchange_inner(state, headers, form).await;
    crate::delegation::count_exchange(if result.is_ok() { "issued" } else { "refused" });
    result
}

async fn exchange_inner(state: &AppState, _headers: &HeaderMap, form: &Form) -> Result<Response, OAuthError> {
    let p = &form.params;
    let token_type_ok = |t: Option<&String>| t.is_none_or(|t| t == ACCESS_TOKEN_TYPE || t == JWT_TOKEN_TYPE);
    let subject_token =
        p.get("subject_token").ok_or_else(|| OAuthError::invalid_request("subject_token is required."))?;
    let subject_type =
        p.get("subject_token_type").ok_or_else(|| OAuthError::invalid_request("subject_token_type is required."))?;
    let actor_token = p.get("actor_token").ok_or_else(|| {
        OAuthError::invalid_request("actor_token is required: a delegated token always names its actor.")
    })?;
    if !token_type_ok(Some(subject_type)) || !token_type_ok(p.get("actor_token_type")) {
        return Err(OAuthError::invalid_request(
            "Token types are urn:ietf:params:oauth:token-type:access_token (or :jwt).",
        ));
    }
    if !token_type_ok(p.get("requested_token_type")) {
        return Err(OAuthError::invalid_request("Only access tokens are issued (requested_token_type)."));
    }
    let refused = |why: &str| OAuthError::invalid_request(why.to_owned());
    // The actor: an agent's own, live access token (not a delegated one).
    let actor =
        live_claims(state, actor_token).await?.ok_or_else(|| refused("The actor_token is not a live access token."))?;
    if actor.act.is_some() || actor.delegation_id.is_some() {
        return Err(refused("The actor_token must be the agent's own token, not a delegated one."));
    }
    let agent_id = actor.agent_id().ok_or_else(|| refused("The actor_token names no agent."))?;
    // The subject: a human, or a delegated token (a chain, or the same agent narrowing its token).
    let (subject, subject_scopes) = if tokens::looks_like_jwt(subject_token) {
        let c = live_claims(state, subject_token).await?.ok_or_else(|| refused("The subject_token is not live."))?;
        if c.org_id != actor.org_id {
            return Err(refused("The subject_token and actor_token belong to different organizations."));
        }
        let d = c.delegation_id.ok_or_else(|| refused("An agent's own token is not a delegator's."))?;
        (crate::delegation::ExchangeSubject::Delegated(d), Some(c.scopes().map(str::to_owned).collect::<Vec<_>>()))
    } else {
        let auth = state.auth();
        let principal = super::credentials::resolve(state.db(), &auth.cache, &auth.lookups, subject_token)
            .await
            .map_err(|f| match f {
                Failure::Unavailable => OAuthError::server_error(),
                Failure::Throttled => OAuthError::lookups_throttled(),
                Failure::Invalid | Failure::DpopProof | Failure::DpopNonce => refused("The subject_token is not live."),
            })?;
        if principal.actor_type != ActorType::Human {
            return Err(refused("The subject_token must be a human's or a delegated token."));
        }
        let in_org = principal.memberships.iter().any(|(o, _)| *o == actor.org_id)
            && principal.credential.bound_org().is_none_or(|o| o == actor.org_id);
        if !in_org {
            return Err(refused("The subject_token and actor_token belong to different organizations."));
        }
        let scopes = match &principal.credential {
            Credential::ApiKey { scopes, .. } => Some(scopes.iter().map(|s| s.as_str().to_owned()).collect()),
            _ => None,
        };
        (crate::delegation::ExchangeSubject::Human(principal.user_id), scopes)
    };
    let grant = crate::delegation::for_exchange(state, actor.org_id, &subject, agent_id)
        .await?
        .ok_or_else(|| refused("No active delegation from this subject to this agent."))?;
    // Within the delegation, and within the subject token's own scopes.
    let within = |s: &str| {
        grant.scopes.iter().any(|g| g == s) && subject_scopes.as_ref().is_none_or(|v| v.iter().any(|x| x == s))
    };
    let scope = match p.get("scope") {
        None => grant.scopes.iter().filter(|s| within(s)).cloned().collect::<Vec<_>>().join(" "),
        Some(asked) => {
            let mut out: Vec<&str> = Vec::new();
            for s in asked.split(' ').filter(|s| !s.is_empty()) {
                if !within(s) {
                    return Err(OAuthError::new(
                        StatusCode::BAD_REQUEST,
                        "invalid_scope",
                        format!(
                            "The scope `{}` is not within the delegation.",
                            s.chars().take(100).collect::<String>()
                        ),
                    ));
                }
                if !out.contains(&s) {
                    out.push(s);
                }
            }
            out.join(" ")
        }
    };
    let mut resources = form.resources.clone();
    if let Some(a) = p.get("audience") {
        resources.push(a.clone());
    }
    let aud = audience(state.config(), &resources)?;
    let (tier, charged, limit_headers) = crate::tiers::charge_token(state, actor.org_id, &actor.client_id).await;
    if let Some(refusal) = charged.refused {
        let error = if refusal == crate::tiers::Refusal::Rate { "too_many_requests" } else { "quota_exceeded" };
        let mut e = OAuthError::new(StatusCode::TOO_MANY_REQUESTS, error, crate::tiers::refusal_detail(refusal, &tier));
        e.headers = Some(Box::new(limit_headers));
        return Err(e);
    }
    let (access_token, expires_in) =
        issue_delegated(state, &grant, &actor.client_id, actor.cid, &scope, aud).map_err(|e| {
            tracing::error!(error = %e, "signing failed");
            OAuthError::server_error()
        })?;
    let mut response = Json(ExchangeResponse {
        access_token,
        issued_token_type: ACCESS_TOKEN_TYPE,
        token_type: "Bearer",
        expires_in,
        scope,
    })
    .into_response();
    no_store(response.headers_mut());
    response.headers_mut().extend(limit_headers);
    Ok(response)
}

/// Signs a delegated token under `grant`: `sub` is the human at the root, `act` the agent (the
/// earlier agents of a chain nested inside), `delegation_id` the delegation, and it never
/// outlives the delegation. Returns the token and its lifetime in seconds.
pub fn issue_delegated(
    state: &AppState,
    grant: &crate::delegation::Grant,
    client_id: &str,
    credential_id: Uuid,
    scope: &str,
    aud: Audience,
) -> anyhow::Result<(String, u64)> {
    let now = state.clock().now();
    let iat = now.unix_timestamp();
    let exp = (iat + state.config().auth.access_token_ttl_secs as i64).min(grant.expires_at.unix_timestamp());
    if exp <= iat {
        anyhow::bail!("the delegation expires now");
    }
    let act = grant.act();
    let agent = act.as_ref().map(|a| a.sub.clone());
    let claims = Claims {
        iss: state.config().server.public_url.clone(),
        sub: grant.chain.first().cloned().unwrap_or_default(),
        aud,
        exp,
        iat,
        nbf: iat,
        jti: Uuid::new_v4(),
        client_id: client_id.to_owned(),
        scope: scope.to_owned(),
        org_id: grant.org_id,
        actor_type: "agent".into(),
        cid: credential_id,
        act,
        delegation_id: Some(grant.delegation_id),
        cnf: None,
    };
    let token = tokens::sign(state.keys(), &claims)?;
    metrics::counter!("tokens_issued_total", "grant_type" => "token_exchange").increment(1);
    state.analytics().record(crate::analytics::Event {
        org_id: grant.org_id,
        kind: crate::analytics::Kind::TokenIssued,
        actor_id: agent,
        client_id: Some(client_id.to_owned()),
        method: "POST".into(),
        route: "/api/v1/token".into(),
        status: 200,
        latency_us: 0,
        at: now,
    });
    Ok((token, (exp - iat) as u64))
}

/// Federation: an external issuer's token, matched by a trust policy, becomes an access token
/// for the policy's agent. Its `cid` is the policy, so deleting the policy revokes its tokens.
async fn federated(
    state: &AppState,
    form: &Form,
    external: Option<&String>,
    as_exchange: bool,
) -> Result<Response, OAuthError> {
    use crate::trust::federation::{self, Refusal};
    let field = if as_exchange { "subject_token" } else { "assertion" };
    let external = external.ok_or_else(|| OAuthError::invalid_request(format!("{field} is required.")))?;
    // Each attempt costs lookups (and may cost a key fetch): charged to the caller's address.
    state.auth().lookups.charge().map_err(|_| OAuthError::lookups_throttled())?;
    let fed = match federation::exchange(state, external, form.params.get("scope").map(String::as_str)).await {
        Ok(f) => f,
        Err(Refusal::Invalid(why)) => {
            tracing::info!(reason = %why, "external token refused");
            metrics::counter!("federation_exchanges_total", "outcome" => "refused").increment(1);
            return Err(OAuthError::new(
                StatusCode::BAD_REQUEST,
                "invalid_grant",
                "The external token is not accepted.",
            ));
        }
        Err(Refusal::Scope(s)) => {
            return Err(OAuthError::new(
                StatusCode::BAD_REQUEST,
                "invalid_scope",
                format!("The scope `{s}` is beyond what the trust policy allows."),
            ));
        }
        Err(Refusal::Unavailable) => {
            return Err(OAuthError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "temporarily_unavailable",
                "The external token cannot be checked right now; try again.",
            ));
        }
    };
    metrics::counter!("federation_exchanges_total", "outcome" => "issued").increment(1);
    let client = ClientRecord {
        credential_id: fed.policy_id,
        client_id: format!("federation:{}", fed.policy_id),
        agent_id: fed.agent_id,
        org_id: fed.org_id,
        secret_hash: Vec::new(),
        previous: None,
        agent_active: true,
        allowed_scopes: Vec::new(),
        loaded_at: state.clock().now().unix_timestamp(),
    };
    let aud = audience(state.config(), &form.resources)?;
    let limit_headers = charge(state, &client).await?;
    let ttl = state.config().auth.access_token_ttl_secs;
    let access_token = issue(state, &client, aud, &fed.scope, ttl, None)?;
    let mut response = if as_exchange {
        Json(ExchangeResponse {
            access_token,
            issued_token_type: ACCESS_TOKEN_TYPE,
            token_type: "Bearer",
            expires_in: ttl,
            scope: fed.scope,
        })
        .into_response()
    } else {
        Json(TokenResponse { access_token, token_type: "Bearer", expires_in: ttl, scope: fed.scope }).into_response()
    };
    no_store(response.headers_mut());
    response.headers_mut().extend(limit_headers);
    Ok(response)
}

/// The requested scopes, each within the agent's `allowed_scopes` (default: all of them).
fn granted_scope(client: &ClientRecord, requested: Option<&String>) -> Result<String, OAuthError> {
    let Some(requested) = requested else { return Ok(client.allowed_scopes.join(" ")) };
    let mut granted: Vec<&str> = Vec::new();
    for s in requested.split(' ').filter(|s| !s.is_empty()) {
        if !client.allowed_scopes.iter().any(|a| a == s) {
            return Err(OAuthError::new(
                StatusCode::BAD_REQUEST,
                "invalid_scope",
                format!("The scope `{}` is not allowed for this agent.", s.chars().take(100).collect::<String>()),
            ));
        }
        if !granted.contains(&s) {
            granted.push(s);
        }
    }
    Ok(granted.join(" "))
}

/// Our own audience, or the RFC 8707 resources asked for when configuration serves them.
fn audience(cfg: &crate::config::Config, resources: &[String]) -> Result<Audience, OAuthError> {
    if resources.is_empty() {
        return Ok(Audience::One(cfg.audience()));
    }
    if resources.iter().any(|r| !cfg.auth.allowed_resources.contains(r)) {
        return Err(OAuthError::new(StatusCode::BAD_REQUEST, "invalid_target", "This resource is not served here."));
    }
    Ok(match resources {
        [one] => Audience::One(one.clone()),
        many => Audience::Many(many.to_vec()),
    })
}

/// The client's rate and the organization's token quotas, in one step; the limit headers go on
/// the response either way.
async fn charge(state: &AppState, client: &ClientRecord) -> Result<HeaderMap, OAuthError> {
    let (tier, charged, limit_headers) = crate::tiers::charge_token(state, client.org_id, &client.client_id).await;
    if let Some(refusal) = charged.refused {
        let error = if refusal == crate::tiers::Refusal::Rate { "too_many_requests" } else { "quota_exceeded" };
        let mut e = OAuthError::new(StatusCode::TOO_MANY_REQUESTS, error, crate::tiers::refusal_detail(refusal, &tier));
        e.headers = Some(Box::new(limit_headers));
        return Err(e);
    }
    Ok(limit_headers)
}

/// Client-credentials tokens issued; the handle taken once, not looked up per token.
static ISSUED: std::sync::LazyLock<metrics::Counter> =
    std::sync::LazyLock::new(|| metrics::counter!("tokens_issued_total", "grant_type" => "client_credentials"));

/// Signs the access token and counts it. `iat` is read from the application's clock, the one
/// revocation watermarks are stamped with.
fn issue(
    state: &AppState,
    client: &ClientRecord,
    aud: Audience,
    scope: &str,
    ttl: u64,
    jkt: Option<String>,
) -> Result<String, OAuthError> {
    let now = state.clock().now();
    let iat = now.unix_timestamp();
    let claims = Claims {
        iss: state.config().server.public_url.clone(),
        sub: format!("agent:{}", client.agent_id),
        aud,
        exp: iat + ttl as i64,
        iat,
        nbf: iat,
        jti: Uuid::new_v4(),
        client_id: client.client_id.clone(),
        scope: scope.to_owned(),
        org_id: client.org_id,
        actor_type: "agent".into(),
        cid: client.credential_id,
        act: None,
        delegation_id: None,
        cnf: jkt.map(|jkt| tokens::Confirmation { jkt }),
    };
    let access_token = tokens::sign(state.keys(), &claims).map_err(|e| {
        tracing::error!(error = %e, "signing failed");
        OAuthError::server_error()
    })?;
    ISSUED.increment(1);
    state.analytics().record(crate::analytics::Event {
        org_id: client.org_id,
        kind: crate::analytics::Kind::TokenIssued,
        actor_id: Some(format!("agent:{}", client.agent_id)),
        client_id: Some(client.client_id.clone()),
        method: "POST".into(),
        route: "/api/v1/token".into(),
        status: 200,
        latency_us: 0,
        at: now,
    });
    Ok(access_token)
}

/// Verifies one of our tokens for any audience we serve; expired, forged and revoked tokens are `None`.
pub(super) async fn live_claims(state: &AppState, token: &str) -> Result<Option<Arc<Claims>>, OAuthError> {
    if !tokens::looks_like_jwt(token) {
        return Ok(None);
    }
    let cfg = state.config();
    let now = state.clock().now().unix_timestamp();
    let mut audiences = vec![cfg.audience()];
    audiences.extend(cfg.auth.allowed_resources.iter().cloned());
    let verified = &state.auth().verified;
    let mut result = verified.verify(state.keys(), token, &cfg.server.public_url, &audiences, now);
    if result.as_ref().err() == Some(&Rejection::UnknownKey) {
        state.keys().reload_for_unknown_kid(state.db()).await;
        result = verified.verify(state.keys(), token, &cfg.server.public_url, &audiences, now);
    }
    let Ok(claims) = result else { return Ok(None) };
    if state.auth().revocations.is_revoked(state.db(), &claims).await? {
        return Ok(None);
    }
    Ok(Some(claims))
}

/// Resolves a bearer JWT for the org-context layer.
pub async fn resolve_access_token(state: &AppState, token: &str) -> Result<Arc<Principal>, Failure> {
    let cfg = state.config();
    let now = state.clock().now().unix_timestamp();
    let audiences = [cfg.audience()];
    let verified = &state.auth().verified;
    // Hashed once: the verified-token cache's key and the principal's secret hash.
    let hash = crate::crypto::sha256(token);
    let mut result = verified.verify_hashed(state.keys(), token, hash, &cfg.server.public_url, &audiences, now);
    if result.as_ref().err() == Some(&Rejection::UnknownKey) {
        state.keys().reload_for_unknown_kid(state.db()).await;
        result = verified.verify_hashed(state.keys(), token, hash, &cfg.server.public_url, &audiences, now);
    }
    let claims = result.map_err(|why| {
        tracing::debug!(?why, "access token rejected");
        Failure::Invalid
    })?;
    match state.auth().revocations.is_revoked(state.db(), &claims).await {
        Ok(false) => {}
        Ok(true) => return Err(Failure::Invalid),
        Err(e) => {
            tracing::warn!(error = %e, "revocation check failed");
            return Err(Failure::Unavailable);
        }
    }
    if claims.actor_type == "human" {
        let scopes = claims.scopes().filter_map(Scope::parse).collect();
        return human_principal(state, hash, claims, scopes).await;
    }
    let agent_id = claims.agent_id().ok_or(Failure::Invalid)?;
    // The same token is the same claims: its principal is made once.
    Ok(state.auth().agent_principals.get_or_insert_with(hash, || {
        Arc::new(Principal {
            user_id: agent_id,
            actor_type: ActorType::Agent,
            email: None,
            display_name: None,
            system_admin: false,
            memberships: Vec::new(),
            secret_hash: hash,
            credential: Credential::AccessToken { scopes: claims.scopes().filter_map(Scope::parse).collect(), claims },
            queries: Default::default(),
        })
    }))
}

/// A person's access token (OpenID Connect): the person, as a member of the token's organization
/// only, with the API scopes they allowed the client.
async fn human_principal(
    state: &AppState,
    secret_hash: [u8; 32],
    claims: Arc<Claims>,
    scopes: Vec<Scope>,
) -> Result<Arc<Principal>, Failure> {
    let user_id: Uuid = claims.sub.strip_prefix("user:").and_then(|u| u.parse().ok()).ok_or(Failure::Invalid)?;
    let row = sqlx::query!(
        "select u.email, u.display_name, m.role from app_user u
         join membership m on m.user_id = u.user_id and m.organization_id = $2
         where u.user_id = $1 and u.status = 'active'",
        user_id,
        claims.org_id
    )
    .fetch_optional(state.db())
    .await
    .map_err(|e| {
        tracing::warn!(error = %e, "loading a person for an access token failed");
        Failure::Unavailable
    })?
    .ok_or(Failure::Invalid)?;
    let role = Role::parse(&row.role).ok_or(Failure::Invalid)?;
    Ok(Arc::new(Principal {
        user_id,
        actor_type: ActorType::Human,
        email: Some(row.email),
        display_name: row.display_name,
        system_admin: false,
        memberships: vec![(claims.org_id, role)],
        secret_hash,
        credential: Credential::AccessToken { claims, scopes },
        queries: Default::default(),
    }))
}

/// Who may introspect: an agent's client (tokens of its org), or an owner/admin API key or session.
enum Introspector {
    Org(Uuid),
    Anyone,
}

async fn introspector(
    state: &AppState,
    headers: &HeaderMap,
    form: &Form,
    actor: Option<&Actor>,
) -> Result<Introspector, OAuthError> {
    if let Some(actor) = actor
        && !matches!(actor.principal.credential, Credential::AccessToken { .. })
    {
        if actor.is_system_admin() && actor.principal.credential.bound_org().is_none() {
            return Ok(Introspector::Anyone);
        }
        let org = actor.org_id.ok_or_else(OAuthError::invalid_client)?;
        let allowed = actor.has_scope(Scope::TokensIntrospect) && actor.require_role(org, Role::Admin).is_ok();
        // The caller is authenticated, only not allowed: no Basic challenge (RFC 6750 §3.1).
        return if allowed {
            Ok(Introspector::Org(org))
        } else {
            Err(OAuthError::new(
                StatusCode::FORBIDDEN,
                "insufficient_scope",
                "Introspection needs an owner's or admin's credential with the `tokens:introspect` scope.",
            ))
        };
    }
    let client = authenticate_client(state, headers, form).await?;
    Ok(Introspector::Org(client.org_id))
}

/// RFC 7662 introspection. Anything but an active token of the caller's organization is
/// `{"active": false}`.
#[utoipa::path(post, path = "/api/v1/token/introspect", tag = "oauth",
    request_body(content_type = "application/x-www-form-urlencoded", description = "token, token_type_hint"),
    security(("client_secret_basic" = []), ("api_key" = [])),
    responses(
        (status = 200, description = "`active` plus the claims of an active token", body = Value),
        (status = 400, body = OAuthErrorBody),
        (status = 401, body = OAuthErrorBody),
        (status = 403, description = "An API key or session without `tokens:introspect` or the admin role", body = OAuthErrorBody)))]
pub(super) async fn introspect(
    State(state): State<AppState>,
    actor: Option<Extension<Actor>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, OAuthError> {
    let form = parse_form(&headers, &body)?;
    let who = introspector(&state, &headers, &form, actor.as_ref().map(|a| &a.0)).await?;
    let token = form.params.get("token").ok_or_else(|| OAuthError::invalid_request("token is required."))?;
    let claims = live_claims(&state, token).await?;
    let visible = claims.filter(|c| match who {
        Introspector::Anyone => true,
        Introspector::Org(org) => c.org_id == org,
    });
    let body = match visible {
        None => json!({ "active": false }),
        Some(c) => {
            let mut v = serde_json::to_value(&*c).unwrap_or_else(|_| json!({}));
            v["active"] = json!(true);
            v["token_type"] = json!(if c.cnf.is_some() { "DPoP" } else { "Bearer" });
            v
        }
    };
    let mut response = Json(body).into_response();
    no_store(response.headers_mut());
    Ok(response)
}

/// RFC 7009 revocation: a client revokes its own tokens. Unknown tokens (and tokens of other
/// clients, which are left alone) get the same 200.
#[utoipa::path(post, path = "/api/v1/token/revoke", tag = "oauth",
    request_body(content_type = "application/x-www-form-urlencoded", description = "token, token_type_hint"),
    security(("client_secret_basic" = [])),
    responses(
        (status = 200, description = "Revoked, or nothing to revoke"),
        (status = 400, body = OAuthErrorBody),
        (status = 401, body = OAuthErrorBody)))]
pub(super) async fn revoke(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, OAuthError> {
    let form = parse_form(&headers, &body)?;
    let client = authenticate_client(&state, &headers, &form).await?;
    let token = form.params.get("token").ok_or_else(|| OAuthError::invalid_request("token is required."))?;
    if let Some(c) = live_claims(&state, token).await?
        && c.client_id == client.client_id
    {
        let mut tx = state.db().begin().await?;
        revocation::revoke_jti(&mut tx, c.jti, c.org_id, c.exp).await?;
        tx.commit().await?;
        revocation::announce(&state, Announced::Jti { jti: c.jti, exp: c.exp }).await;
    }
    let mut response = StatusCode::OK.into_response();
    no_store(response.headers_mut());
    Ok(response)
}

fn metadata(state: &AppState) -> Value {
    let cfg = state.config();
    let base = &cfg.server.public_url;
    let alg = state.keys().current().map(|k| k.active.algorithm.as_str()).unwrap_or("ES256");
    let auth_methods = ["client_secret_basic", "client_secret_post", "private_key_jwt", "none"];
    let registration = &cfg.oidc.registration;
    let registration_endpoint = (registration.enabled
        && registration.organization.parse::<Uuid>().is_ok()
        && (registration.open || !registration.initial_access_token.is_empty()))
    .then(|| format!("{base}/oauth2/register"));
    let mut doc = json!({
        "issuer": base,
        "registration_endpoint": registration_endpoint,
        "authorization_endpoint": format!("{base}/oauth2/authorize"),
        "token_endpoint": format!("{base}/api/v1/token"),
        "userinfo_endpoint": format!("{base}/oauth2/userinfo"),
        "end_session_endpoint": format!("{base}/oauth2/logout"),
        "jwks_uri": format!("{base}/.well-known/jwks.json"),
        "introspection_endpoint": format!("{base}/api/v1/token/introspect"),
        "revocation_endpoint": format!("{base}/api/v1/token/revoke"),
        "grant_types_supported": ["authorization_code", "refresh_token", "client_credentials", TOKEN_EXCHANGE, JWT_BEARER],
        // RFC 8693: the token types accepted as subject_token_type and actor_token_type, and issued.
        "token_types_supported": [ACCESS_TOKEN_TYPE, JWT_TOKEN_TYPE],
        "response_types_supported": ["code"],
        "response_modes_supported": ["query"],
        "code_challenge_methods_supported": ["S256"],
        "prompt_values_supported": ["none", "login", "consent", "select_account"],
        "token_endpoint_auth_methods_supported": auth_methods,
        "token_endpoint_auth_signing_alg_values_supported": super::oidc::dpop::ALGS,
        "introspection_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post"],
        "revocation_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post"],
        "scopes_supported": super::oidc::all_scopes(),
        "claims_supported": ["iss", "sub", "aud", "exp", "iat", "auth_time", "nonce", "acr", "amr", "azp",
            "at_hash", "sid", "email", "email_verified", "name", "org_id"],
        "acr_values_supported": [super::oidc::grants::ACR_PASSWORD],
        "access_token_signing_alg_values_supported": [alg],
        "id_token_signing_alg_values_supported": [alg],
        "subject_types_supported": ["public"],
        "dpop_signing_alg_values_supported": super::oidc::dpop::ALGS,
        "authorization_response_iss_parameter_supported": true,
        "client_id_metadata_document_supported": cfg.oidc.metadata_documents.enabled,
        "request_parameter_supported": false,
        "request_uri_parameter_supported": false,
        "claims_parameter_supported": false,
        "service_documentation": format!("{base}/docs/"),
    });
    if let Some(d) = doc.as_object_mut() {
        d.retain(|_, v| !v.is_null());
    }
    doc
}

/// RFC 8414 authorization server metadata.
#[utoipa::path(get, path = "/.well-known/oauth-authorization-server", tag = "oauth",
    responses((status = 200, description = "RFC 8414 metadata", body = Value)))]
pub(super) async fn as_metadata(State(state): State<AppState>) -> Json<Value> {
    Json(metadata(&state))
}

/// OpenID Connect discovery (the same metadata, for clients that look here).
#[utoipa::path(get, path = "/.well-known/openid-configuration", tag = "oauth",
    responses((status = 200, description = "Discovery metadata", body = Value)))]
pub(super) async fn openid_configuration(State(state): State<AppState>) -> Json<Value> {
    Json(metadata(&state))
}

/// RFC 9728 protected resource metadata.
#[utoipa::path(get, path = "/.well-known/oauth-protected-resource", tag = "oauth",
    responses((status = 200, description = "RFC 9728 metadata", body = Value)))]
pub(super) async fn protected_resource(State(state): State<AppState>) -> Json<Value> {
    let cfg = state.config();
    let base = &cfg.server.public_url;
    let alg = state.keys().current().map(|k| k.active.algorithm.as_str()).unwrap_or("ES256");
    let scopes: Vec<&str> = Scope::ALL.iter().map(|s| s.as_str()).collect();
    Json(json!({
        "resource": cfg.audience(),
        "authorization_servers": [base],
        "jwks_uri": format!("{base}/.well-known/jwks.json"),
        "bearer_methods_supported": ["header"],
        "dpop_signing_alg_values_supported": super::oidc::dpop::ALGS,
        "dpop_bound_access_tokens_required": false,
        "scopes_supported": scopes,
        "resource_signing_alg_values_supported": [alg],
        "resource_documentation": format!("{base}/docs/"),
    }))
}

/// The public keys that verify our tokens: the active key and every retired key still needed.
#[utoipa::path(get, path = "/.well-known/jwks.json", tag = "oauth",
    responses((status = 200, description = "RFC 7517 JSON Web Key Set", body = Value)))]
pub(super) async fn jwks(State(state): State<AppState>) -> Response {
    let keys = state.keys().current().map(|k| k.jwks.clone()).unwrap_or_else(|| Arc::new(json!({ "keys": [] })));
    let mut response = Json(&*keys).into_response();
    response.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("public, max-age=300"));
    response
}
