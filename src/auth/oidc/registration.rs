//! Dynamic client registration for older clients (RFC 7591) and its management with a
//! registration access token (RFC 7592: read, replace, delete). Off by default. When on, clients are
//! registered into one configured organization, with an initial access token or, for open
//! registration, limited per client IP and by a scope ceiling. Registrations unused for
//! `reap_idle_days` are deleted; their client then gets `invalid_client` and knows to register
//! again.

use std::time::Duration;

use axum::{
    Json,
    body::Bytes,
    extract::State,
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Response},
};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use uuid::Uuid;

use super::clients::{self, ClientSettings, Settings};
use crate::{
    auth::revocation::{self, Announced, Subject},
    config::Secret,
    crypto,
    http::{ApiError, extract::ApiPath, middleware::tls::current_client_ip},
    state::AppState,
};

/// The prefix of registration access tokens.
pub const REGISTRATION_TOKEN_PREFIX: &str = "aidp_rat_";

/// `[oidc.registration]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RegistrationConfig {
    pub enabled: bool,
    /// The organization registered clients belong to (its members sign in through them).
    pub organization: String,
    /// When set, `POST /oauth2/register` needs `Authorization: Bearer <this>`.
    pub initial_access_token: Secret,
    /// Without an initial access token: anyone may register, `per_ip` times per window.
    pub open: bool,
    pub per_ip: u32,
    /// The scopes a registered client may be allowed at most.
    pub scope_ceiling: Vec<String>,
    /// A registration unused this long is deleted; 0 keeps them.
    pub reap_idle_days: u64,
    pub reap_interval_secs: u64,
}

fn error(status: StatusCode, error: &str, description: &str) -> Response {
    let mut r = (status, Json(json!({ "error": error, "error_description": description }))).into_response();
    if status == StatusCode::UNAUTHORIZED {
        r.headers_mut()
            .insert(header::WWW_AUTHENTICATE, header::HeaderValue::from_static("Bearer error=\"invalid_token\""));
    }
    r
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    let v = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = v.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

fn strings(v: &Value, key: &str) -> Result<Option<Vec<String>>, ()> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Array(a)) => {
            a.iter().map(|s| s.as_str().map(str::to_owned).ok_or(())).collect::<Result<_, _>>().map(Some)
        }
        Some(_) => Err(()),
    }
}

fn string(v: &Value, key: &str) -> Result<Option<String>, ()> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(()),
    }
}

/// RFC 7591 metadata → our settings.
fn settings_of(meta: &Value, ceiling: &[String]) -> Result<ClientSettings, (&'static str, String)> {
    let bad = |m: &str| ("invalid_client_metadata", m.to_owned());
    if !meta.is_object() {
        return Err(bad("The body must be a JSON object of client metadata."));
    }
    if strings(meta, "response_types").map_err(|_| bad("response_types is a list."))?.is_some_and(|r| r != ["code"]) {
        return Err(bad("Only response_types [\"code\"] is supported."));
    }
    let scopes = string(meta, "scope")
        .map_err(|_| bad("scope is a space-separated string."))?
        .map(|s| s.split(' ').filter(|s| !s.is_empty()).map(str::to_owned).collect::<Vec<_>>());
    if let Some(s) = &scopes
        && let Some(over) = s.iter().find(|s| !ceiling.contains(s))
    {
        return Err(bad(&format!(
            "The scope `{}` is above what registration allows.",
            over.chars().take(64).collect::<String>()
        )));
    }
    let method =
        string(meta, "token_endpoint_auth_method").map_err(|_| bad("token_endpoint_auth_method is a string."))?;
    let public = method.as_deref() == Some("none");
    let s = |k| string(meta, k).map_err(|_| bad(&format!("{k} is a string.")));
    let l = |k| strings(meta, k).map_err(|_| bad(&format!("{k} is a list of strings.")));
    Ok(ClientSettings {
        name: Some(s("client_name")?.unwrap_or_else(|| "Registered client".into())),
        client_type: Some(if public { "public" } else { "confidential" }.into()),
        token_endpoint_auth_method: Some(method.unwrap_or_else(|| "client_secret_basic".into())),
        redirect_uris: Some(l("redirect_uris")?.unwrap_or_default()),
        post_logout_redirect_uris: l("post_logout_redirect_uris")?,
        grant_types: l("grant_types")?,
        scopes: Some(
            scopes.unwrap_or_else(|| ceiling.iter().filter(|s| s.as_str() != "offline_access").cloned().collect()),
        ),
        access_token_ttl_secs: None,
        refresh_token_ttl_secs: None,
        logo_uri: s("logo_uri")?,
        client_uri: s("client_uri")?,
        policy_uri: s("policy_uri")?,
        tos_uri: s("tos_uri")?,
        jwks: meta.get("jwks").cloned().filter(|j| !j.is_null()),
        jwks_uri: s("jwks_uri")?,
        application_type: s("application_type")?,
    })
}

fn metadata_of(c: &clients::OAuthClient) -> Value {
    json!({
        "client_id": c.client_id,
        "client_id_issued_at": c.created_at.unix_timestamp(),
        "client_name": c.name,
        "token_endpoint_auth_method": c.token_endpoint_auth_method,
        "redirect_uris": c.redirect_uris,
        "post_logout_redirect_uris": c.post_logout_redirect_uris,
        "grant_types": c.grant_types,
        "response_types": ["code"],
        "scope": c.scopes.join(" "),
        "application_type": c.application_type,
        "logo_uri": c.logo_uri,
        "client_uri": c.client_uri,
        "policy_uri": c.policy_uri,
        "tos_uri": c.tos_uri,
        "jwks": c.jwks,
        "jwks_uri": c.jwks_uri,
    })
}

/// RFC 7591 dynamic client registration (off unless `oidc.registration.enabled`).
#[utoipa::path(post, path = "/oauth2/register", tag = "oidc",
    request_body(content = Value, content_type = "application/json", description = "RFC 7591 client metadata"),
    security((), ("bearer" = [])),
    responses(
        (status = 201, description = "The client, its secret (once) and its registration access token", body = Value),
        (status = 400, description = "invalid_redirect_uri or invalid_client_metadata", body = crate::auth::oauth::OAuthErrorBody),
        (status = 401, description = "The initial access token is missing or wrong", body = crate::auth::oauth::OAuthErrorBody),
        (status = 404, description = "Registration is off", body = crate::auth::oauth::OAuthErrorBody),
        (status = 429, description = "Too many open registrations from this address", body = crate::auth::oauth::OAuthErrorBody)))]
pub(in crate::auth) async fn register_client(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let cfg = &state.config().oidc.registration;
    let Some(org_id) = cfg.enabled.then(|| cfg.organization.parse::<Uuid>().ok()).flatten() else {
        return Ok(error(StatusCode::NOT_FOUND, "invalid_request", "Dynamic registration is not offered here."));
    };
    if !cfg.initial_access_token.is_empty() {
        let ok =
            bearer(&headers).is_some_and(|t| crypto::ct_eq(t.as_bytes(), cfg.initial_access_token.expose().as_bytes()));
        if !ok {
            return Ok(error(StatusCode::UNAUTHORIZED, "invalid_token", "An initial access token is required."));
        }
    } else if !cfg.open {
        return Ok(error(StatusCode::NOT_FOUND, "invalid_request", "Dynamic registration is not offered here."));
    } else {
        let ip = current_client_ip();
        let auth = state.auth();
        let subjects = auth.throttle.ip_subject("register", ip.as_deref(), cfg.per_ip);
        if let Err(wait) = auth.throttle.reserve(state.redis(), &subjects, state.clock().now()).await {
            let mut r =
                error(StatusCode::TOO_MANY_REQUESTS, "too_many_requests", "Too many registrations from this address.");
            r.headers_mut().insert(header::RETRY_AFTER, header::HeaderValue::from(wait));
            return Ok(r);
        }
    }
    let settings = match validated(&state, &body) {
        Ok(s) => s,
        Err(r) => return Ok(*r),
    };
    let token = crypto::random_token(REGISTRATION_TOKEN_PREFIX);
    let mut tx = state.db().begin().await?;
    let created = clients::insert(&mut tx, org_id, &settings, Some(&crypto::sha256(&token))).await?;
    crate::audit::record(
        &mut tx,
        crate::audit::Event::anonymous(org_id, "oauth_client.registered")
            .target("oauth_client", created.client.id)
            .details(json!({ "client_id": created.client.client_id, "redirect_uris": created.client.redirect_uris })),
    )
    .await?;
    tx.commit().await?;
    let mut body = metadata_of(&created.client);
    body["client_secret"] = json!(created.client_secret);
    body["client_secret_expires_at"] = json!(0);
    body["registration_access_token"] = json!(token);
    body["registration_client_uri"] =
        json!(format!("{}/oauth2/register/{}", state.config().server.public_url, created.client.client_id));
    Ok((StatusCode::CREATED, Json(body)).into_response())
}

/// The registration a registration access token manages.
async fn managed(state: &AppState, headers: &HeaderMap, client_id: &str) -> Result<Option<(Uuid, Uuid)>, ApiError> {
    let Some(token) = bearer(headers) else { return Ok(None) };
    Ok(sqlx::query!(
        "select oauth_client_id, organization_id from oauth_client
         where client_id = $1 and dynamic and registration_token_hash = $2",
        client_id,
        &crypto::sha256(token)[..]
    )
    .fetch_optional(state.db())
    .await?
    .map(|r| (r.oauth_client_id, r.organization_id)))
}

/// RFC 7592: the registration as it stands.
#[utoipa::path(get, path = "/oauth2/register/{client_id}", tag = "oidc", params(("client_id" = String, Path)),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The client's metadata", body = Value),
        (status = 401, description = "Not this registration's access token (or no such registration)", body = crate::auth::oauth::OAuthErrorBody)))]
pub(in crate::auth) async fn read_registration(
    State(state): State<AppState>,
    headers: HeaderMap,
    ApiPath(client_id): ApiPath<String>,
) -> Result<Response, ApiError> {
    let Some(_) = managed(&state, &headers, &client_id).await? else {
        return Ok(error(StatusCode::UNAUTHORIZED, "invalid_token", "The registration access token is not valid."));
    };
    let row = sqlx::query!(
        "select client_id, name, token_endpoint_auth_method, redirect_uris, grant_types, allowed_scopes, created_at
         from oauth_client where client_id = $1",
        client_id
    )
    .fetch_one(state.db())
    .await?;
    Ok(Json(json!({
        "client_id": row.client_id,
        "client_id_issued_at": row.created_at.unix_timestamp(),
        "client_name": row.name,
        "token_endpoint_auth_method": row.token_endpoint_auth_method,
        "redirect_uris": row.redirect_uris,
        "grant_types": row.grant_types,
        "response_types": ["code"],
        "scope": row.allowed_scopes.join(" "),
    }))
    .into_response())
}

/// RFC 7592: deletes the registration; its tokens are revoked.
#[utoipa::path(delete, path = "/oauth2/register/{client_id}", tag = "oidc", params(("client_id" = String, Path)),
    security(("bearer" = [])),
    responses(
        (status = 204, description = "Deleted"),
        (status = 401, description = "Not this registration's access token", body = crate::auth::oauth::OAuthErrorBody)))]
pub(in crate::auth) async fn delete_registration(
    State(state): State<AppState>,
    headers: HeaderMap,
    ApiPath(client_id): ApiPath<String>,
) -> Result<Response, ApiError> {
    let Some((id, _org)) = managed(&state, &headers, &client_id).await? else {
        return Ok(error(StatusCode::UNAUTHORIZED, "invalid_token", "The registration access token is not valid."));
    };
    let mut tx = state.db().begin().await?;
    clients::forget(&mut tx, &client_id).await?;
    sqlx::query!("delete from oauth_client where oauth_client_id = $1", id).execute(&mut *tx).await?;
    let nb = revocation::revoke_subject(&mut tx, &Subject::Credential(id), state.clock().now()).await?;
    tx.commit().await?;
    revocation::announce(&state, Announced::Subject { subject: Subject::Credential(id), not_before: nb }).await;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// RFC 7592: replaces the registration's metadata (omitted fields take their defaults). The client
/// keeps its id and secret; moving between secret and secretless authentication needs a new
/// registration.
#[utoipa::path(put, path = "/oauth2/register/{client_id}", tag = "oidc", params(("client_id" = String, Path)),
    request_body(content = Value, content_type = "application/json", description = "RFC 7591 client metadata"),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The client's metadata as stored", body = Value),
        (status = 400, description = "invalid_redirect_uri or invalid_client_metadata", body = crate::auth::oauth::OAuthErrorBody),
        (status = 401, description = "Not this registration's access token", body = crate::auth::oauth::OAuthErrorBody)))]
pub(in crate::auth) async fn update_registration(
    State(state): State<AppState>,
    headers: HeaderMap,
    ApiPath(client_id): ApiPath<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let Some((id, org_id)) = managed(&state, &headers, &client_id).await? else {
        return Ok(error(StatusCode::UNAUTHORIZED, "invalid_token", "The registration access token is not valid."));
    };
    let settings = match validated(&state, &body) {
        Ok(s) => s,
        Err(r) => return Ok(*r),
    };
    let mut tx = state.db().begin().await?;
    if clients::uses_secret(&mut tx, org_id, id).await? != settings.auth_method.uses_secret() {
        return Ok(error(
            StatusCode::BAD_REQUEST,
            "invalid_client_metadata",
            "Moving between secret and secretless authentication needs a new registration.",
        ));
    }
    let client = clients::update_row(&mut tx, org_id, id, &settings).await?;
    tx.commit().await?;
    Ok(Json(metadata_of(&client)).into_response())
}

/// Registration metadata, checked; a refusal is the RFC 7591 error response.
fn validated(state: &AppState, body: &[u8]) -> Result<Settings, Box<Response>> {
    let meta: Value = serde_json::from_slice(body)
        .map_err(|_| Box::new(error(StatusCode::BAD_REQUEST, "invalid_client_metadata", "The body is not JSON.")))?;
    let req = settings_of(&meta, &state.config().oidc.registration.scope_ceiling)
        .map_err(|(code, why)| Box::new(error(StatusCode::BAD_REQUEST, code, &why)))?;
    Settings::defaults(state).apply(req, true).map_err(|e| {
        Box::new(match e {
            ApiError::Validation { errors } => {
                let first = errors.first().map(|e| format!("{}: {}", e.field, e.message)).unwrap_or_default();
                let code = if errors
                    .iter()
                    .any(|e| e.field.starts_with("redirect_uris") || e.field.starts_with("post_logout"))
                {
                    "invalid_redirect_uri"
                } else {
                    "invalid_client_metadata"
                };
                error(StatusCode::BAD_REQUEST, code, &first)
            }
            other => other.into_response(),
        })
    })
}

/// Deletes registrations unused for `reap_idle_days`; returns how many.
pub async fn reap(state: &AppState) -> Result<u64, sqlx::Error> {
    let days = state.config().oidc.registration.reap_idle_days;
    if days == 0 {
        return Ok(0);
    }
    let cutoff = state.clock().now() - time::Duration::days(days as i64);
    let mut tx = state.db().begin().await?;
    let gone = sqlx::query!(
        "delete from oauth_client where dynamic and coalesce(last_used_at, created_at) < $1
         returning oauth_client_id, client_id",
        cutoff
    )
    .fetch_all(&mut *tx)
    .await?;
    for g in &gone {
        clients::forget(&mut tx, &g.client_id).await?;
    }
    tx.commit().await?;
    Ok(gone.len() as u64)
}

/// The reaper, on every instance (the delete is idempotent).
pub fn spawn(state: &AppState) -> Option<tokio::task::JoinHandle<()>> {
    let cfg = &state.config().oidc.registration;
    if !cfg.enabled || cfg.reap_idle_days == 0 {
        return None;
    }
    let state = state.clone();
    let every = Duration::from_secs(cfg.reap_interval_secs.max(1));
    Some(tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        loop {
            tick.tick().await;
            match reap(&state).await {
                Ok(0) => {}
                Ok(n) => tracing::info!(reaped = n, "idle dynamic client registrations deleted"),
                Err(e) => tracing::warn!(error = %e, "reaping registrations failed"),
            }
        }
    }))
}
