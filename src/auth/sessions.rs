//! Sessions and API keys: login, logout, who-am-I, set-password, and API key management.

use axum::{
    Extension, Json,
    extract::State,
    http::{HeaderMap, HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};
use serde_json::json;
use time::{Duration, OffsetDateTime};
use uuid::Uuid;

use super::{
    actor::{Actor, ActorIdentity, ActorType, Role, Scope},
    credentials::{self, API_KEY_PREFIX, Credential, Invalidation, SESSION_PREFIX},
    model::*,
};
use crate::{
    audit::{self, Event},
    crypto,
    http::{
        ApiError, ApiResult,
        error::Problem,
        extract::{ApiPath, ValidatedJson},
        middleware::tls::{Secure, current_client_ip},
    },
    state::AppState,
};

pub(super) fn session_cookie(token: &str, max_age: i64, secure: bool) -> HeaderValue {
    let secure = if secure { "; Secure" } else { "" };
    HeaderValue::from_str(&format!(
        "{}={token}; Path=/; HttpOnly; SameSite=Lax; Max-Age={max_age}{secure}",
        crate::SESSION_COOKIE
    ))
    .expect("token and name are header-safe")
}

/// Password login: a session token (also set as an HttpOnly cookie).
#[utoipa::path(post, path = "/auth/login", tag = "auth", request_body = LoginRequest,
    responses(
        (status = 200, body = LoginResponse, headers(("Set-Cookie" = String))),
        (status = 401, description = "Wrong email or password", body = Problem),
        (status = 422, body = Problem),
        (status = 429, description = "Too many failures; see Retry-After", body = Problem)))]
pub(super) async fn login(
    State(state): State<AppState>,
    Extension(Secure(secure)): Extension<Secure>,
    headers: HeaderMap,
    ValidatedJson(req): ValidatedJson<LoginRequest>,
) -> ApiResult<Response> {
    let session = password_login(&state, &headers, &req.email, req.password).await?;
    let token = session.token;
    let auth = state.auth();
    let principal = credentials::resolve(state.db(), &auth.cache, &auth.lookups, &token)
        .await
        .map_err(|_| ApiError::Unavailable("session not readable after login".into()))?;
    let actor =
        Actor { org_id: principal.memberships.first().map(|(o, _)| *o), principal, actor_type: ActorType::Human };
    let body = LoginResponse {
        actor: ActorIdentity::from(&actor),
        session_token: token.clone(),
        expires_at: session.expires_at,
    };
    Ok(([(header::SET_COOKIE, session_cookie(&token, session.ttl, secure))], Json(body)).into_response())
}

/// A session made by a password login.
pub(super) struct NewSession {
    pub token: String,
    pub user_id: Uuid,
    pub session_id: Uuid,
    pub ttl: i64,
    pub expires_at: OffsetDateTime,
    pub created_at: OffsetDateTime,
}

/// The password check behind every login form (the API's and the sign-in page's): throttled per
/// account and client IP before the password is verified, audited either way, and a new session
/// on success. A wrong email or password is 401, a throttled attempt 429.
pub(super) async fn password_login(
    state: &AppState,
    headers: &HeaderMap,
    email: &str,
    password: String,
) -> ApiResult<NewSession> {
    let auth = state.auth();
    let ip = current_client_ip();
    let subjects = auth.throttle.subjects(email, ip.as_deref());
    // Counted before the password is checked, so parallel attempts cannot all slip past the limit.
    if let Err(wait) = auth.throttle.reserve(state.redis(), &subjects, state.clock().now()).await {
        return Err(ApiError::TooManyRequests {
            code: "login_throttled",
            detail: "Too many failed logins; wait before trying again.".into(),
            retry_after: wait,
        });
    }
    let user = sqlx::query!(
        "select u.user_id, u.password_hash,
                (select m.organization_id from membership m where m.user_id = u.user_id
                 order by m.created_at, m.organization_id limit 1) as first_org
         from app_user u where lower(u.email) = lower($1) and u.status = 'active'",
        email
    )
    .fetch_optional(state.db())
    .await?;
    let (user_id, hash, org) = match user {
        Some(u) => (Some(u.user_id), u.password_hash, u.first_org),
        None => (None, None, None),
    };
    // Always verify something, so an unknown email takes as long as a wrong password.
    let ok = crypto::verify_password(password, hash).await?;
    let audit_org = org.unwrap_or(audit::SYSTEM_CHAIN);
    let (Some(user_id), true) = (user_id, ok) else {
        let mut event = Event::anonymous(audit_org, "auth.login.failed")
            .details(json!({ "email": email.chars().take(254).collect::<String>() }));
        if let Some(id) = user_id {
            event = event.target("user", id);
        }
        let mut tx = state.db().begin().await?;
        audit::record(&mut tx, event).await?;
        tx.commit().await?;
        return Err(ApiError::Unauthorized { detail: "Invalid email or password.".into(), challenge: "Bearer" });
    };
    auth.throttle.succeeded(state.redis(), &subjects).await;

    let token = crypto::random_token(SESSION_PREFIX);
    let ttl = state.config().auth.session_ttl_secs as i64;
    let created_at = OffsetDateTime::now_utc();
    let expires_at = created_at + Duration::seconds(ttl);
    let user_agent: Option<String> =
        headers.get(header::USER_AGENT).and_then(|v| v.to_str().ok()).map(|s| s.chars().take(300).collect());
    let session_id = Uuid::now_v7();
    let mut tx = state.db().begin().await?;
    sqlx::query!(
        "insert into session (session_id, user_id, token_hash, expires_at, client_ip, user_agent)
         values ($1, $2, $3, $4, $5, $6)",
        session_id,
        user_id,
        &crypto::sha256(&token)[..],
        expires_at,
        ip,
        user_agent
    )
    .execute(&mut *tx)
    .await?;
    audit::record(
        &mut tx,
        Event::anonymous(audit_org, "auth.login.succeeded")
            .actor(format!("user:{user_id}"), "human")
            .target("session", session_id),
    )
    .await?;
    tx.commit().await?;
    Ok(NewSession { token, user_id, session_id, ttl, expires_at, created_at })
}

/// The calling actor's identity.
#[utoipa::path(get, path = "/auth/me", tag = "auth",
    security(("bearer" = []), ("api_key" = []), ("session_cookie" = [])),
    responses((status = 200, body = ActorIdentity), (status = 401, body = Problem)))]
pub(super) async fn me(actor: Actor) -> Json<ActorIdentity> {
    Json(ActorIdentity::from(&actor))
}

/// Ends the current session (on every instance at once).
#[utoipa::path(post, path = "/auth/logout", tag = "auth",
    security(("bearer" = []), ("session_cookie" = [])),
    responses((status = 204, description = "Session ended"), (status = 400, body = Problem), (status = 401, body = Problem)))]
pub(super) async fn logout(
    State(state): State<AppState>,
    Extension(Secure(secure)): Extension<Secure>,
    actor: Actor,
) -> ApiResult<Response> {
    let Credential::Session { session_id, .. } = actor.principal.credential else {
        return Err(ApiError::bad_request("not_a_session", "Only a session can log out; delete an API key instead."));
    };
    let mut tx = state.db().begin().await?;
    sqlx::query!("update session set ended_at = now() where session_id = $1 and ended_at is null", session_id)
        .execute(&mut *tx)
        .await?;
    let org = actor.principal.memberships.first().map(|(o, _)| *o).unwrap_or(audit::SYSTEM_CHAIN);
    audit::record(&mut tx, Event::by(&actor, org, "auth.logout").target("session", session_id)).await?;
    let hang = crate::delegation::Hang::Credential(format!("session:{session_id}"));
    let ending = crate::delegation::end_hanging(&state, &mut tx, hang, Some(&actor)).await?;
    tx.commit().await?;
    credentials::invalidate(&state.auth().cache, state.redis(), Invalidation::Credential(actor.principal.secret_hash))
        .await;
    crate::delegation::finish(&state, ending).await;
    Ok((StatusCode::NO_CONTENT, [(header::SET_COOKIE, session_cookie("", 0, secure))]).into_response())
}

/// Sets a password with a one-time token: a password-reset token, or the invitation token of an
/// email without an account (which creates the account and accepts the invitation). The token is
/// looked up before anything is hashed, and attempts are throttled per client IP, so anonymous
/// requests cannot spend the argon2 permits logins need.
#[utoipa::path(post, path = "/auth/set-password", tag = "auth", request_body = SetPasswordRequest,
    responses(
        (status = 204, description = "Password set"),
        (status = 400, body = Problem),
        (status = 422, body = Problem),
        (status = 429, description = "Too many attempts from this address; see Retry-After", body = Problem)))]
pub(super) async fn set_password(
    State(state): State<AppState>,
    ValidatedJson(req): ValidatedJson<SetPasswordRequest>,
) -> ApiResult<StatusCode> {
    let auth = state.auth();
    let ip = current_client_ip();
    let subjects = auth.throttle.ip_subject("setpw", ip.as_deref(), state.config().auth.set_password_max_attempts_ip);
    if let Err(wait) = auth.throttle.reserve(state.redis(), &subjects, state.clock().now()).await {
        return Err(ApiError::TooManyRequests {
            code: "set_password_throttled",
            detail: "Too many set-password attempts from this address; wait before trying again.".into(),
            retry_after: wait,
        });
    }
    let token_hash = crypto::sha256(&req.token);
    let invalid = || ApiError::bad_request("invalid_token", "The token is unknown, used or expired.");
    let mut conn = state.db().acquire().await?;
    let live = sqlx::query_scalar!(
        r#"select exists(select 1 from password_token where token_hash = $1 and used_at is null and expires_at > now()) as "e!""#,
        &token_hash[..]
    )
    .fetch_one(&mut *conn)
    .await?;
    if !live && !super::invitations::redeemable(&mut conn, &token_hash).await? {
        return Err(invalid());
    }
    drop(conn);
    let hash = crypto::hash_password(req.password).await?;
    let mut tx = state.db().begin().await?;
    // Redeemed by whoever gets here first; a concurrent redemption finds it used.
    let reset = sqlx::query_scalar!(
        "update password_token set used_at = now()
         where token_hash = $1 and used_at is null and expires_at > now() returning user_id",
        &token_hash[..]
    )
    .fetch_optional(&mut *tx)
    .await?;
    let user_id = match reset {
        Some(user_id) => {
            sqlx::query!("update app_user set password_hash = $2 where user_id = $1", user_id, hash)
                .execute(&mut *tx)
                .await?;
            user_id
        }
        // An invitation for an email without an account: the account is made now.
        None => super::invitations::redeem(&mut tx, &token_hash, &hash).await?.ok_or_else(invalid)?,
    };
    let org = sqlx::query_scalar!(
        "select organization_id from membership where user_id = $1 order by created_at limit 1",
        user_id
    )
    .fetch_optional(&mut *tx)
    .await?
    .unwrap_or(audit::SYSTEM_CHAIN);
    audit::record(
        &mut tx,
        Event::anonymous(org, "user.password_set").actor(format!("user:{user_id}"), "human").target("user", user_id),
    )
    .await?;
    tx.commit().await?;
    auth.throttle.succeeded(state.redis(), &subjects).await;
    credentials::invalidate(&state.auth().cache, state.redis(), Invalidation::User(user_id)).await;
    Ok(StatusCode::NO_CONTENT)
}

/// Creates an API key in the current organization; the key is shown once.
#[utoipa::path(post, path = "/auth/api-keys", tag = "auth", request_body = CreateApiKey,
    security(("bearer" = []), ("api_key" = []), ("session_cookie" = [])),
    responses(
        (status = 201, body = CreatedApiKey),
        (status = 401, body = Problem),
        (status = 403, body = Problem),
        (status = 422, body = Problem)))]
pub(super) async fn create_api_key(
    State(state): State<AppState>,
    actor: Actor,
    ValidatedJson(req): ValidatedJson<CreateApiKey>,
) -> ApiResult<(StatusCode, Json<CreatedApiKey>)> {
    let org_id = actor.current_org()?;
    let scopes: Vec<Scope> = match &req.scopes {
        None => actor.scopes().map(|s| s.to_vec()).unwrap_or_else(|| Scope::ALL.to_vec()),
        Some(names) => {
            let mut out = Vec::new();
            for (i, name) in names.iter().enumerate() {
                let Some(scope) = Scope::parse(name) else {
                    return Err(ApiError::field(format!("scopes[{i}]"), "unknown_scope", "unknown scope"));
                };
                if !actor.has_scope(scope) {
                    return Err(ApiError::forbidden(
                        "scope_exceeds_creator",
                        format!("A key cannot carry `{name}`: the creating credential does not."),
                    ));
                }
                if !out.contains(&scope) {
                    out.push(scope);
                }
            }
            out
        }
    };
    let scope_names: Vec<String> = scopes.iter().map(|s| s.as_str().to_owned()).collect();
    let service = req.service.unwrap_or(false);
    if service && actor.require_role(org_id, Role::Admin).is_err() {
        return Err(ApiError::forbidden("insufficient_role", "Only owners and admins create service keys."));
    }
    let key = crypto::random_token(API_KEY_PREFIX);
    let prefix: String = key.chars().take(API_KEY_PREFIX.len() + 6).collect();
    let id = Uuid::now_v7();
    let expires_at = req.expires_days.map(|d| OffsetDateTime::now_utc() + Duration::days(d));
    let mut tx = state.db().begin().await?;
    let created_at = sqlx::query_scalar!(
        "insert into api_key (api_key_id, organization_id, created_by, prefix, key_hash, description, scopes, expires_at, service)
         values ($1, $2, $3, $4, $5, $6, $7, $8, $9) returning created_at",
        id,
        org_id,
        actor.user_id(),
        prefix,
        &crypto::sha256(&key)[..],
        req.description,
        &scope_names,
        expires_at,
        service
    )
    .fetch_one(&mut *tx)
    .await?;
    audit::record(
        &mut tx,
        Event::by(&actor, org_id, "api_key.created")
            .target("api_key", id)
            .details(json!({ "prefix": prefix, "scopes": scope_names, "service": service })),
    )
    .await?;
    let data = json!({ "api_key_id": id, "prefix": prefix, "scopes": scope_names, "service": service });
    crate::events::emit(&mut tx, org_id, "apikey.created", format!("api-keys/{id}"), data).await?;
    tx.commit().await?;
    Ok((
        StatusCode::CREATED,
        Json(CreatedApiKey {
            id,
            service,
            key,
            prefix,
            description: req.description,
            scopes: scope_names,
            created_at,
            expires_at,
        }),
    ))
}

/// API keys of the current organization: your own, or all of them for owners and admins.
#[utoipa::path(get, path = "/auth/api-keys", tag = "auth",
    security(("bearer" = []), ("api_key" = []), ("session_cookie" = [])),
    responses((status = 200, body = Vec<ApiKeyInfo>), (status = 401, body = Problem), (status = 403, body = Problem)))]
pub(super) async fn list_api_keys(State(state): State<AppState>, actor: Actor) -> ApiResult<Json<Vec<ApiKeyInfo>>> {
    let org_id = actor.current_org()?;
    let see_all = actor.require_role(org_id, Role::Admin).is_ok();
    let rows = sqlx::query!(
        "select api_key_id, prefix, description, scopes, created_by, created_at, expires_at, last_used_at, service
         from api_key
         where organization_id = $1 and revoked_at is null and ($2 or created_by = $3)
         order by created_at desc limit 1000",
        org_id,
        see_all,
        actor.user_id()
    )
    .fetch_all(state.db())
    .await?;
    Ok(Json(
        rows.into_iter()
            .map(|r| ApiKeyInfo {
                id: r.api_key_id,
                service: r.service,
                prefix: r.prefix,
                description: r.description,
                scopes: r.scopes,
                created_by: r.created_by,
                created_at: r.created_at,
                expires_at: r.expires_at,
                last_used: r.last_used_at,
            })
            .collect(),
    ))
}

/// Revokes an API key at once, on every instance.
#[utoipa::path(delete, path = "/auth/api-keys/{id}", tag = "auth", params(("id" = Uuid, Path)),
    security(("bearer" = []), ("api_key" = []), ("session_cookie" = [])),
    responses((status = 204, description = "Revoked"), (status = 401, body = Problem), (status = 404, body = Problem)))]
pub(super) async fn delete_api_key(
    State(state): State<AppState>,
    actor: Actor,
    ApiPath(id): ApiPath<Uuid>,
) -> ApiResult<StatusCode> {
    let org_id = actor.current_org()?;
    let mut tx = state.db().begin().await?;
    let created_by = sqlx::query_scalar!(
        "select created_by from api_key where api_key_id = $1 and organization_id = $2 and revoked_at is null for update",
        id,
        org_id
    )
    .fetch_optional(&mut *tx)
    .await?
    .ok_or(ApiError::NotFound)?;
    crate::policy::require(
        &state,
        &actor,
        "delete",
        crate::policy::Resource::ApiKey { org_id, created_by: format!("user:{created_by}") },
        id,
    )?;
    let row =
        sqlx::query!("update api_key set revoked_at = now() where api_key_id = $1 returning key_hash, prefix", id)
            .fetch_one(&mut *tx)
            .await?;
    audit::record(
        &mut tx,
        Event::by(&actor, org_id, "api_key.deleted").target("api_key", id).details(json!({ "prefix": row.prefix })),
    )
    .await?;
    let data = json!({ "api_key_id": id, "prefix": row.prefix });
    crate::events::emit(&mut tx, org_id, "apikey.revoked", format!("api-keys/{id}"), data).await?;
    let hang = crate::delegation::Hang::Credential(format!("api_key:{id}"));
    let ending = crate::delegation::end_hanging(&state, &mut tx, hang, Some(&actor)).await?;
    tx.commit().await?;
    if let Ok(hash) = <[u8; 32]>::try_from(row.key_hash.as_slice()) {
        credentials::invalidate(&state.auth().cache, state.redis(), Invalidation::Credential(hash)).await;
    }
    crate::delegation::finish(&state, ending).await;
    Ok(StatusCode::NO_CONTENT)
}
