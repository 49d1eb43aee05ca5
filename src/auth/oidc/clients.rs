//! The OAuth clients of an organization (`/api/v1/clients`), managed by its owners and admins:
//! confidential clients with a secret (shown once, stored hashed) or a JWKS for `private_key_jwt`,
//! and public clients that authenticate with PKCE alone.

use axum::{
    Json,
    extract::State,
    http::{HeaderMap, HeaderValue, StatusCode, header},
};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use time::OffsetDateTime;
use utoipa::ToSchema;
use uuid::Uuid;

use super::{AuthMethod, check_info_uri, check_redirect_uri, known_scope};
use crate::{
    audit::{self, Event},
    auth::{
        actor::{Actor, Role},
        revocation::{self, Announced, Subject},
    },
    crypto,
    http::{
        ApiError, ApiResult,
        error::{FieldError, Problem},
        extract::{ApiJson, ApiPath},
    },
    state::AppState,
};

/// The prefix of client secrets, for secret scanners.
pub const CLIENT_SECRET_PREFIX: &str = "aidp_cs_";
/// The prefix of registered client ids (not secret).
pub const CLIENT_ID_PREFIX: &str = "aidp_client_";

/// The grants a client may be allowed.
pub const GRANTS: &[&str] = &["authorization_code", "refresh_token"];

/// A client as its organization's admins see it (never its secret).
#[derive(Debug, Serialize, ToSchema)]
pub struct OAuthClient {
    pub id: Uuid,
    pub client_id: String,
    pub name: String,
    /// `confidential` or `public`.
    pub client_type: String,
    /// `client_secret_basic`, `client_secret_post`, `private_key_jwt` or `none`.
    pub token_endpoint_auth_method: String,
    pub redirect_uris: Vec<String>,
    pub post_logout_redirect_uris: Vec<String>,
    pub grant_types: Vec<String>,
    pub scopes: Vec<String>,
    pub access_token_ttl_secs: i32,
    pub refresh_token_ttl_secs: i32,
    pub logo_uri: Option<String>,
    pub client_uri: Option<String>,
    pub policy_uri: Option<String>,
    pub tos_uri: Option<String>,
    pub jwks: Option<Value>,
    pub jwks_uri: Option<String>,
    /// `web` or `native`.
    pub application_type: String,
    /// Registered through dynamic registration (RFC 7591).
    pub dynamic: bool,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub updated_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339::option")]
    pub last_used_at: Option<OffsetDateTime>,
}

/// A new client, with its secret (shown once) when it has one.
#[derive(Debug, Serialize, ToSchema)]
pub struct CreatedClient {
    #[serde(flatten)]
    pub client: OAuthClient,
    /// Shown once; only its hash is kept.
    pub client_secret: Option<String>,
}

/// A client's settings. Omitted fields take their defaults on creation and stay as they are on
/// update.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ClientSettings {
    pub name: Option<String>,
    /// `confidential` (default) or `public`.
    pub client_type: Option<String>,
    /// Default: `client_secret_basic` for confidential clients, `none` for public ones.
    pub token_endpoint_auth_method: Option<String>,
    /// Exact URIs: https, loopback http, or a native app's private-use scheme.
    pub redirect_uris: Option<Vec<String>>,
    pub post_logout_redirect_uris: Option<Vec<String>>,
    /// `authorization_code` and `refresh_token` (the default: both).
    pub grant_types: Option<Vec<String>>,
    /// The scopes the client may ask for: OpenID's (`openid profile email offline_access`) and the
    /// API's. Default: the OpenID ones.
    pub scopes: Option<Vec<String>>,
    /// 60 to 86400; default `auth.access_token_ttl_secs`.
    pub access_token_ttl_secs: Option<i32>,
    /// 0 (no refresh tokens) to a year; default 30 days.
    pub refresh_token_ttl_secs: Option<i32>,
    pub logo_uri: Option<String>,
    pub client_uri: Option<String>,
    pub policy_uri: Option<String>,
    pub tos_uri: Option<String>,
    /// For `private_key_jwt`: the client's public keys (RFC 7517), or `jwks_uri`.
    pub jwks: Option<Value>,
    pub jwks_uri: Option<String>,
    /// `web` (default) or `native`.
    pub application_type: Option<String>,
}

/// Settings after validation, every field decided.
#[derive(Debug, Clone)]
pub(crate) struct Settings {
    pub name: String,
    pub public: bool,
    pub auth_method: AuthMethod,
    pub redirect_uris: Vec<String>,
    pub post_logout_redirect_uris: Vec<String>,
    pub grant_types: Vec<String>,
    pub scopes: Vec<String>,
    pub access_ttl: i32,
    pub refresh_ttl: i32,
    pub logo_uri: Option<String>,
    pub client_uri: Option<String>,
    pub policy_uri: Option<String>,
    pub tos_uri: Option<String>,
    pub jwks: Option<Value>,
    pub jwks_uri: Option<String>,
    pub application_type: String,
}

impl Settings {
    pub fn defaults(state: &AppState) -> Self {
        Self {
            name: String::new(),
            public: false,
            auth_method: AuthMethod::ClientSecretBasic,
            redirect_uris: Vec::new(),
            post_logout_redirect_uris: Vec::new(),
            grant_types: GRANTS.iter().map(|g| (*g).to_owned()).collect(),
            scopes: ["openid", "profile", "email", "offline_access"].iter().map(|s| (*s).to_owned()).collect(),
            access_ttl: state.config().auth.access_token_ttl_secs.clamp(60, 86400) as i32,
            refresh_ttl: 30 * 86400,
            logo_uri: None,
            client_uri: None,
            policy_uri: None,
            tos_uri: None,
            jwks: None,
            jwks_uri: None,
            application_type: "web".into(),
        }
    }

    /// Applies `req` over `self`, checking every field; all failures at once.
    pub fn apply(mut self, req: ClientSettings, creating: bool) -> ApiResult<Self> {
        let mut errors = Vec::new();
        let mut fail = |field: &str, code: &str, message: &str| {
            errors.push(FieldError { field: field.into(), code: code.into(), message: message.into() })
        };
        if let Some(name) = req.name {
            let n = name.trim().chars().count();
            if n == 0 || n > 200 {
                fail("name", "length", "Between 1 and 200 characters.");
            }
            self.name = name.trim().to_owned();
        } else if creating {
            fail("name", "required", "A client has a name.");
        }
        let type_given = req.client_type.is_some();
        if let Some(t) = req.client_type {
            match t.as_str() {
                "confidential" => self.public = false,
                "public" => self.public = true,
                _ => fail("client_type", "invalid", "`confidential` or `public`."),
            }
        }
        match req.token_endpoint_auth_method {
            Some(m) => match AuthMethod::parse(&m) {
                Some(m) => self.auth_method = m,
                None => fail("token_endpoint_auth_method", "invalid", "Not a supported method."),
            },
            None if type_given || creating => {
                self.auth_method = if self.public { AuthMethod::None } else { AuthMethod::ClientSecretBasic }
            }
            None => {}
        }
        if self.public != (self.auth_method == AuthMethod::None) {
            fail(
                "token_endpoint_auth_method",
                "mismatch",
                "A public client uses `none`; a confidential one a secret or private_key_jwt.",
            );
        }
        let check_uris = |field: &str, list: &[String], errors: &mut Vec<FieldError>, at_least_one: bool| {
            if list.len() > 20 || (at_least_one && list.is_empty()) {
                errors.push(FieldError {
                    field: field.into(),
                    code: "length".into(),
                    message: if at_least_one { "Between 1 and 20 URIs." } else { "At most 20 URIs." }.into(),
                });
            }
            for (i, u) in list.iter().enumerate() {
                if let Err(why) = check_redirect_uri(u) {
                    errors.push(FieldError {
                        field: format!("{field}[{i}]"),
                        code: "invalid_redirect_uri".into(),
                        message: why.into(),
                    });
                }
            }
        };
        if let Some(list) = req.redirect_uris {
            check_uris("redirect_uris", &list, &mut errors, true);
            self.redirect_uris = list;
        } else if creating {
            errors.push(FieldError {
                field: "redirect_uris".into(),
                code: "required".into(),
                message: "At least one redirect URI.".into(),
            });
        }
        if let Some(list) = req.post_logout_redirect_uris {
            check_uris("post_logout_redirect_uris", &list, &mut errors, false);
            self.post_logout_redirect_uris = list;
        }
        let mut fail = |field: String, code: &str, message: &str| {
            errors.push(FieldError { field, code: code.into(), message: message.into() })
        };
        if let Some(grants) = req.grant_types {
            for (i, g) in grants.iter().enumerate() {
                if !GRANTS.contains(&g.as_str()) {
                    fail(format!("grant_types[{i}]"), "invalid", "`authorization_code` or `refresh_token`.");
                }
            }
            if !grants.iter().any(|g| g == "authorization_code") {
                fail("grant_types".into(), "required", "The authorization_code grant is required.");
            }
            self.grant_types = dedup(grants);
        }
        if let Some(scopes) = req.scopes {
            if scopes.len() > 64 {
                fail("scopes".into(), "length", "At most 64 scopes.");
            }
            for (i, s) in scopes.iter().enumerate() {
                if !known_scope(s) {
                    fail(format!("scopes[{i}]"), "unknown_scope", "Not an OpenID or API scope.");
                }
            }
            self.scopes = dedup(scopes);
        }
        if let Some(t) = req.access_token_ttl_secs {
            if !(60..=86400).contains(&t) {
                fail("access_token_ttl_secs".into(), "range", "60 to 86400 seconds.");
            }
            self.access_ttl = t;
        }
        if let Some(t) = req.refresh_token_ttl_secs {
            if !(0..=31_536_000).contains(&t) {
                fail("refresh_token_ttl_secs".into(), "range", "0 to 31536000 seconds.");
            }
            self.refresh_ttl = t;
        }
        for (field, value, slot) in [
            ("logo_uri", req.logo_uri, &mut self.logo_uri),
            ("client_uri", req.client_uri, &mut self.client_uri),
            ("policy_uri", req.policy_uri, &mut self.policy_uri),
            ("tos_uri", req.tos_uri, &mut self.tos_uri),
        ] {
            if let Some(v) = value {
                if let Err(why) = check_info_uri(&v) {
                    fail(field.into(), "invalid_uri", why);
                }
                *slot = Some(v);
            }
        }
        if let Some(jwks) = req.jwks {
            if !jwks.get("keys").is_some_and(Value::is_array) || jwks.to_string().len() > 16384 {
                fail("jwks".into(), "invalid", "A JWK Set: {\"keys\": [...]}, at most 16 KiB.");
            }
            self.jwks = Some(jwks);
        }
        if let Some(uri) = req.jwks_uri {
            if !uri.starts_with("https://") || url::Url::parse(&uri).is_err() {
                fail("jwks_uri".into(), "invalid_uri", "An https URL.");
            }
            self.jwks_uri = Some(uri);
        }
        if self.auth_method == AuthMethod::PrivateKeyJwt && self.jwks.is_none() && self.jwks_uri.is_none() {
            fail("jwks".into(), "required", "private_key_jwt needs `jwks` or `jwks_uri`.");
        }
        if let Some(t) = req.application_type {
            if t != "web" && t != "native" {
                fail("application_type".into(), "invalid", "`web` or `native`.");
            }
            self.application_type = t;
        }
        if errors.is_empty() { Ok(self) } else { Err(ApiError::Validation { errors }) }
    }
}

fn dedup(list: Vec<String>) -> Vec<String> {
    let mut out: Vec<String> = Vec::with_capacity(list.len());
    for v in list {
        if !out.contains(&v) {
            out.push(v);
        }
    }
    out
}

fn admin_org(actor: &Actor) -> ApiResult<Uuid> {
    let org_id = actor.current_org()?;
    actor.require_role(org_id, Role::Admin)?;
    Ok(org_id)
}

fn no_store() -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h
}

struct ClientRow {
    oauth_client_id: Uuid,
    client_id: String,
    name: String,
    client_type: String,
    token_endpoint_auth_method: String,
    redirect_uris: Vec<String>,
    post_logout_redirect_uris: Vec<String>,
    grant_types: Vec<String>,
    allowed_scopes: Vec<String>,
    access_token_ttl_secs: i32,
    refresh_token_ttl_secs: i32,
    logo_uri: Option<String>,
    client_uri: Option<String>,
    policy_uri: Option<String>,
    tos_uri: Option<String>,
    jwks: Option<Value>,
    jwks_uri: Option<String>,
    application_type: String,
    dynamic: bool,
    created_at: OffsetDateTime,
    updated_at: OffsetDateTime,
    last_used_at: Option<OffsetDateTime>,
}

impl From<ClientRow> for OAuthClient {
    fn from(r: ClientRow) -> Self {
        Self {
            id: r.oauth_client_id,
            client_id: r.client_id,
            name: r.name,
            client_type: r.client_type,
            token_endpoint_auth_method: r.token_endpoint_auth_method,
            redirect_uris: r.redirect_uris,
            post_logout_redirect_uris: r.post_logout_redirect_uris,
            grant_types: r.grant_types,
            scopes: r.allowed_scopes,
            access_token_ttl_secs: r.access_token_ttl_secs,
            refresh_token_ttl_secs: r.refresh_token_ttl_secs,
            logo_uri: r.logo_uri,
            client_uri: r.client_uri,
            policy_uri: r.policy_uri,
            tos_uri: r.tos_uri,
            jwks: r.jwks,
            jwks_uri: r.jwks_uri,
            application_type: r.application_type,
            dynamic: r.dynamic,
            created_at: r.created_at,
            updated_at: r.updated_at,
            last_used_at: r.last_used_at,
        }
    }
}

impl ClientRow {
    fn settings(&self) -> Settings {
        Settings {
            name: self.name.clone(),
            public: self.client_type == "public",
            auth_method: AuthMethod::parse(&self.token_endpoint_auth_method).unwrap_or(AuthMethod::ClientSecretBasic),
            redirect_uris: self.redirect_uris.clone(),
            post_logout_redirect_uris: self.post_logout_redirect_uris.clone(),
            grant_types: self.grant_types.clone(),
            scopes: self.allowed_scopes.clone(),
            access_ttl: self.access_token_ttl_secs,
            refresh_ttl: self.refresh_token_ttl_secs,
            logo_uri: self.logo_uri.clone(),
            client_uri: self.client_uri.clone(),
            policy_uri: self.policy_uri.clone(),
            tos_uri: self.tos_uri.clone(),
            jwks: self.jwks.clone(),
            jwks_uri: self.jwks_uri.clone(),
            application_type: self.application_type.clone(),
        }
    }
}

/// Inserts a client; returns it with its secret (when it has one). Dynamic registration passes
/// the hash of its registration access token.
pub(crate) async fn insert(
    tx: &mut sqlx::PgConnection,
    org_id: Uuid,
    s: &Settings,
    registration_token_hash: Option<&[u8]>,
) -> ApiResult<CreatedClient> {
    let id = Uuid::now_v7();
    let client_id = format!("{CLIENT_ID_PREFIX}{}", id.simple());
    let secret = s.auth_method.uses_secret().then(|| crypto::random_token(CLIENT_SECRET_PREFIX));
    let secret_hash = secret.as_deref().map(|s| crypto::sha256(s).to_vec());
    let row = sqlx::query_as!(
        ClientRow,
        "insert into oauth_client (oauth_client_id, organization_id, client_id, name, client_type,
             token_endpoint_auth_method, secret_hash, redirect_uris, post_logout_redirect_uris, grant_types,
             allowed_scopes, access_token_ttl_secs, refresh_token_ttl_secs, logo_uri, client_uri, policy_uri, tos_uri,
             jwks, jwks_uri, application_type, dynamic, registration_token_hash, last_used_at)
         values ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19, $20, $21, $22,
                 case when $21 then now() end)
         returning oauth_client_id, client_id, name, client_type, token_endpoint_auth_method, redirect_uris,
                   post_logout_redirect_uris, grant_types, allowed_scopes, access_token_ttl_secs,
                   refresh_token_ttl_secs, logo_uri, client_uri, policy_uri, tos_uri, jwks, jwks_uri,
                   application_type, dynamic, created_at, updated_at, last_used_at",
        id,
        org_id,
        client_id,
        s.name,
        if s.public { "public" } else { "confidential" },
        s.auth_method.as_str(),
        secret_hash,
        &s.redirect_uris,
        &s.post_logout_redirect_uris,
        &s.grant_types,
        &s.scopes,
        s.access_ttl,
        s.refresh_ttl,
        s.logo_uri,
        s.client_uri,
        s.policy_uri,
        s.tos_uri,
        s.jwks,
        s.jwks_uri,
        s.application_type,
        registration_token_hash.is_some(),
        registration_token_hash
    )
    .fetch_one(&mut *tx)
    .await?;
    Ok(CreatedClient { client: row.into(), client_secret: secret })
}

/// Registers an OAuth client in the current organization; a confidential client's secret is
/// answered once.
#[utoipa::path(post, path = "/api/v1/clients", tag = "clients", request_body = ClientSettings,
    security(("bearer" = []), ("api_key" = []), ("session_cookie" = [])),
    responses(
        (status = 201, body = CreatedClient, description = "Created; `Cache-Control: no-store`"),
        (status = 401, body = Problem),
        (status = 403, body = Problem),
        (status = 422, description = "Invalid fields (a `javascript:` redirect URI, an unknown scope, ...)", body = Problem)))]
pub(in crate::auth) async fn create_client(
    State(state): State<AppState>,
    actor: Actor,
    ApiJson(req): ApiJson<ClientSettings>,
) -> ApiResult<(StatusCode, HeaderMap, Json<CreatedClient>)> {
    let org_id = admin_org(&actor)?;
    let settings = Settings::defaults(&state).apply(req, true)?;
    let mut tx = state.db().begin().await?;
    let created = insert(&mut tx, org_id, &settings, None).await?;
    let c = &created.client;
    audit::record(
        &mut tx,
        Event::by(&actor, org_id, "oauth_client.created")
            .target("oauth_client", c.id)
            .details(json!({ "client_id": c.client_id, "redirect_uris": c.redirect_uris, "type": c.client_type })),
    )
    .await?;
    let data = json!({ "oauth_client_id": c.id, "client_id": c.client_id, "name": c.name });
    crate::events::emit(&mut tx, org_id, "oauth_client.created", format!("clients/{}", c.id), data).await?;
    tx.commit().await?;
    Ok((StatusCode::CREATED, no_store(), Json(created)))
}

/// The organization's OAuth clients.
#[utoipa::path(get, path = "/api/v1/clients", tag = "clients",
    security(("bearer" = []), ("api_key" = []), ("session_cookie" = [])),
    responses((status = 200, body = Vec<OAuthClient>), (status = 401, body = Problem), (status = 403, body = Problem)))]
pub(in crate::auth) async fn list_clients(
    State(state): State<AppState>,
    actor: Actor,
) -> ApiResult<Json<Vec<OAuthClient>>> {
    let org_id = admin_org(&actor)?;
    let rows = sqlx::query_as!(
        ClientRow,
        "select oauth_client_id, client_id, name, client_type, token_endpoint_auth_method, redirect_uris,
                post_logout_redirect_uris, grant_types, allowed_scopes, access_token_ttl_secs,
                refresh_token_ttl_secs, logo_uri, client_uri, policy_uri, tos_uri, jwks, jwks_uri,
                application_type, dynamic, created_at, updated_at, last_used_at
         from oauth_client where organization_id = $1 order by created_at limit 1000",
        org_id
    )
    .fetch_all(state.db())
    .await?;
    Ok(Json(rows.into_iter().map(Into::into).collect()))
}

async fn fetch(conn: &mut sqlx::PgConnection, org_id: Uuid, id: Uuid) -> ApiResult<ClientRow> {
    sqlx::query_as!(
        ClientRow,
        "select oauth_client_id, client_id, name, client_type, token_endpoint_auth_method, redirect_uris,
                post_logout_redirect_uris, grant_types, allowed_scopes, access_token_ttl_secs,
                refresh_token_ttl_secs, logo_uri, client_uri, policy_uri, tos_uri, jwks, jwks_uri,
                application_type, dynamic, created_at, updated_at, last_used_at
         from oauth_client where organization_id = $1 and oauth_client_id = $2 for update",
        org_id,
        id
    )
    .fetch_optional(conn)
    .await?
    .ok_or(ApiError::NotFound)
}

/// One client.
#[utoipa::path(get, path = "/api/v1/clients/{id}", tag = "clients", params(("id" = Uuid, Path)),
    security(("bearer" = []), ("api_key" = []), ("session_cookie" = [])),
    responses((status = 200, body = OAuthClient), (status = 401, body = Problem), (status = 404, body = Problem)))]
pub(in crate::auth) async fn get_client(
    State(state): State<AppState>,
    actor: Actor,
    ApiPath(id): ApiPath<Uuid>,
) -> ApiResult<Json<OAuthClient>> {
    let org_id = admin_org(&actor)?;
    let mut conn = state.db().acquire().await?;
    Ok(Json(fetch(&mut conn, org_id, id).await?.into()))
}

/// Changes a client's settings (a client cannot change between public and secret-based here
/// without a new secret: use rotate-secret after).
#[utoipa::path(patch, path = "/api/v1/clients/{id}", tag = "clients", params(("id" = Uuid, Path)),
    request_body = ClientSettings,
    security(("bearer" = []), ("api_key" = []), ("session_cookie" = [])),
    responses(
        (status = 200, body = OAuthClient),
        (status = 401, body = Problem),
        (status = 404, body = Problem),
        (status = 422, body = Problem)))]
pub(in crate::auth) async fn update_client(
    State(state): State<AppState>,
    actor: Actor,
    ApiPath(id): ApiPath<Uuid>,
    ApiJson(req): ApiJson<ClientSettings>,
) -> ApiResult<Json<OAuthClient>> {
    let org_id = admin_org(&actor)?;
    let mut tx = state.db().begin().await?;
    let row = fetch(&mut tx, org_id, id).await?;
    let before = row.settings();
    let s = before.clone().apply(req, false)?;
    if s.auth_method.uses_secret() != before.auth_method.uses_secret() {
        return Err(ApiError::field(
            "token_endpoint_auth_method",
            "secret_mismatch",
            "Moving between secret and secretless authentication needs a new client.",
        ));
    }
    let row = update_row(&mut tx, org_id, id, &s).await?;
    audit::record(&mut tx, Event::by(&actor, org_id, "oauth_client.updated").target("oauth_client", id)).await?;
    tx.commit().await?;
    Ok(Json(row))
}

/// Whether the client authenticates with a secret (its row locked for the caller's update).
pub(crate) async fn uses_secret(tx: &mut sqlx::PgConnection, org_id: Uuid, id: Uuid) -> ApiResult<bool> {
    Ok(fetch(tx, org_id, id).await?.settings().auth_method.uses_secret())
}

/// Writes every setting of a client.
pub(crate) async fn update_row(
    tx: &mut sqlx::PgConnection,
    org_id: Uuid,
    id: Uuid,
    s: &Settings,
) -> ApiResult<OAuthClient> {
    let row: ClientRow = sqlx::query_as!(
        ClientRow,
        "update oauth_client set name = $3, client_type = $4, token_endpoint_auth_method = $5, redirect_uris = $6,
             post_logout_redirect_uris = $7, grant_types = $8, allowed_scopes = $9, access_token_ttl_secs = $10,
             refresh_token_ttl_secs = $11, logo_uri = $12, client_uri = $13, policy_uri = $14, tos_uri = $15,
             jwks = $16, jwks_uri = $17, application_type = $18
         where organization_id = $1 and oauth_client_id = $2
         returning oauth_client_id, client_id, name, client_type, token_endpoint_auth_method, redirect_uris,
                   post_logout_redirect_uris, grant_types, allowed_scopes, access_token_ttl_secs,
                   refresh_token_ttl_secs, logo_uri, client_uri, policy_uri, tos_uri, jwks, jwks_uri,
                   application_type, dynamic, created_at, updated_at, last_used_at",
        org_id,
        id,
        s.name,
        if s.public { "public" } else { "confidential" },
        s.auth_method.as_str(),
        &s.redirect_uris,
        &s.post_logout_redirect_uris,
        &s.grant_types,
        &s.scopes,
        s.access_ttl,
        s.refresh_ttl,
        s.logo_uri,
        s.client_uri,
        s.policy_uri,
        s.tos_uri,
        s.jwks,
        s.jwks_uri,
        s.application_type
    )
    .fetch_one(&mut *tx)
    .await?;
    Ok(row.into())
}

/// A new secret for a confidential client; the old one stops working at once.
#[utoipa::path(post, path = "/api/v1/clients/{id}/rotate-secret", tag = "clients", params(("id" = Uuid, Path)),
    security(("bearer" = []), ("api_key" = []), ("session_cookie" = [])),
    responses(
        (status = 200, body = CreatedClient, description = "The new secret, once"),
        (status = 401, body = Problem),
        (status = 404, body = Problem),
        (status = 409, description = "The client has no secret", body = Problem)))]
pub(in crate::auth) async fn rotate_client_secret(
    State(state): State<AppState>,
    actor: Actor,
    ApiPath(id): ApiPath<Uuid>,
) -> ApiResult<(HeaderMap, Json<CreatedClient>)> {
    let org_id = admin_org(&actor)?;
    let mut tx = state.db().begin().await?;
    let row = fetch(&mut tx, org_id, id).await?;
    if !row.settings().auth_method.uses_secret() {
        return Err(ApiError::conflict("no_secret", "This client authenticates without a secret."));
    }
    let secret = crypto::random_token(CLIENT_SECRET_PREFIX);
    sqlx::query!(
        "update oauth_client set secret_hash = $2 where oauth_client_id = $1",
        id,
        &crypto::sha256(&secret)[..]
    )
    .execute(&mut *tx)
    .await?;
    audit::record(&mut tx, Event::by(&actor, org_id, "oauth_client.secret_rotated").target("oauth_client", id)).await?;
    tx.commit().await?;
    Ok((no_store(), Json(CreatedClient { client: row.into(), client_secret: Some(secret) })))
}

/// Deletes a client: its codes and refresh tokens stop working, and the access tokens it was
/// issued are revoked.
#[utoipa::path(delete, path = "/api/v1/clients/{id}", tag = "clients", params(("id" = Uuid, Path)),
    security(("bearer" = []), ("api_key" = []), ("session_cookie" = [])),
    responses((status = 204, description = "Deleted"), (status = 401, body = Problem), (status = 404, body = Problem)))]
pub(in crate::auth) async fn delete_client(
    State(state): State<AppState>,
    actor: Actor,
    ApiPath(id): ApiPath<Uuid>,
) -> ApiResult<StatusCode> {
    let org_id = admin_org(&actor)?;
    let mut tx = state.db().begin().await?;
    let row = fetch(&mut tx, org_id, id).await?;
    forget(&mut tx, &row.client_id).await?;
    sqlx::query!("delete from oauth_client where oauth_client_id = $1", id).execute(&mut *tx).await?;
    let now = state.clock().now();
    let nb = revocation::revoke_subject(&mut tx, &Subject::Credential(id), now).await?;
    audit::record(
        &mut tx,
        Event::by(&actor, org_id, "oauth_client.deleted")
            .target("oauth_client", id)
            .details(json!({ "client_id": row.client_id })),
    )
    .await?;
    let data = json!({ "oauth_client_id": id, "client_id": row.client_id, "name": row.name });
    crate::events::emit(&mut tx, org_id, "oauth_client.deleted", format!("clients/{id}"), data).await?;
    tx.commit().await?;
    revocation::announce(&state, Announced::Subject { subject: Subject::Credential(id), not_before: nb }).await;
    Ok(StatusCode::NO_CONTENT)
}

/// Drops what a client leaves behind: codes, refresh tokens and consents.
pub(crate) async fn forget(tx: &mut sqlx::PgConnection, client_id: &str) -> Result<(), sqlx::Error> {
    sqlx::query!("delete from oauth_code where client_id = $1", client_id).execute(&mut *tx).await?;
    sqlx::query!("delete from oauth_refresh_token where client_id = $1", client_id).execute(&mut *tx).await?;
    sqlx::query!("delete from oauth_consent where client_id = $1", client_id).execute(&mut *tx).await?;
    Ok(())
}
