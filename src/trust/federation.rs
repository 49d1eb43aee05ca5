//! Federation: a workload that another issuer already vouches for (a GitHub Actions job, a
//! Kubernetes pod, a SPIFFE workload, any OIDC issuer) exchanges that issuer's token for one of
//! our agents' access tokens, instead of holding a long-lived secret of ours.
//!
//! A **partner** names the external issuer (matched byte for byte with `iss`), where its keys are
//! (`jwks_uri`, or a discovery document whose `issuer` must equal it), the algorithms it may use
//! (asymmetric only: never `none` or HMAC) and the audience its tokens must carry for us. A
//! **trust policy** under a partner names conditions on the token's claims (exact values or
//! globs), the agent a matching token becomes, and the ceiling of its scopes.
//!
//! The exchange ([`exchange`]) serves both RFC 7523 §2.1 (`jwt-bearer`, the token as
//! `assertion`) and RFC 8693 (an external `subject_token` of type `...:token-type:jwt`). Keys are
//! fetched through the guarded fetcher ([`crate::http::fetch`]: the webhooks' SSRF guard, no
//! redirects), at most 64 KiB, cached for the `Cache-Control` max-age (one minute to one day),
//! and fetched again, at most every 30 s, when a token names an unknown `kid`. A replayed `jti` is refused until the token expires, on every instance (Redis).
//! A refusal says only `invalid_grant`; the reason goes to the log.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use axum::{Json, extract::State, http::StatusCode};
use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD as B64};
use jsonwebtoken::jwk::JwkSet;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sqlx::PgPool;
use time::OffsetDateTime;
use utoipa::ToSchema;
use uuid::Uuid;
use validator::Validate;

use crate::{
    audit::{self, Event},
    auth::{
        Actor, directory,
        revocation::{self, Announced, Subject},
    },
    http::{
        ApiError, ApiResult,
        error::Problem,
        extract::{ApiPath, ValidatedJson},
        fetch::{DocCache, FetchError, Fetcher, Options},
    },
    state::AppState,
    webhooks::ssrf,
};

/// The templates for the three issuers we know.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Template {
    GithubActions,
    Kubernetes,
    Spiffe,
}

impl Template {
    fn as_str(self) -> &'static str {
        match self {
            Self::GithubActions => "github_actions",
            Self::Kubernetes => "kubernetes",
            Self::Spiffe => "spiffe",
        }
    }
    fn parse(s: &str) -> Option<Self> {
        match s {
            "github_actions" => Some(Self::GithubActions),
            "kubernetes" => Some(Self::Kubernetes),
            "spiffe" => Some(Self::Spiffe),
            _ => None,
        }
    }
}

/// GitHub's Actions OIDC issuer.
pub const GITHUB_ISSUER: &str = "https://token.actions.githubusercontent.com";

/// One predefined template: the issuer and which claims its policies match on.
#[derive(Debug, Serialize, ToSchema)]
pub struct TemplateInfo {
    pub id: Template,
    pub title: &'static str,
    /// The issuer, when it is the same for everyone; otherwise the partner names it.
    pub issuer: Option<&'static str>,
    pub discovery_url: Option<&'static str>,
    /// Claim paths policies may match (`/` between nested members).
    pub claims: Vec<&'static str>,
    /// Claim paths of which a policy must name at least one, exactly (no glob).
    pub required_exact: Vec<&'static str>,
    #[schema(value_type = Object)]
    pub example_conditions: Value,
}

fn templates() -> Vec<TemplateInfo> {
    vec![
        TemplateInfo {
            id: Template::GithubActions,
            title: "GitHub Actions",
            issuer: Some(GITHUB_ISSUER),
            discovery_url: Some("https://token.actions.githubusercontent.com/.well-known/openid-configuration"),
            claims: vec![
                "repository",
                "repository_owner",
                "ref",
                "environment",
                "workflow_ref",
                "job_workflow_ref",
                "event_name",
                "repository_id",
                "repository_owner_id",
                "sub",
            ],
            required_exact: vec!["repository", "repository_owner", "repository_id", "repository_owner_id"],
            example_conditions: json!({ "repository": "acme/deployer", "ref": "refs/heads/main" }),
        },
        TemplateInfo {
            id: Template::Kubernetes,
            title: "Kubernetes service-account tokens",
            issuer: None,
            discovery_url: None,
            claims: vec!["kubernetes.io/namespace", "kubernetes.io/serviceaccount/name", "sub"],
            required_exact: vec!["kubernetes.io/namespace", "sub"],
            example_conditions: json!({ "kubernetes.io/namespace": "agents", "kubernetes.io/serviceaccount/name": "worker" }),
        },
        TemplateInfo {
            id: Template::Spiffe,
            title: "SPIFFE JWT-SVIDs",
            issuer: None,
            discovery_url: None,
            claims: vec!["sub"],
            required_exact: vec![],
            example_conditions: json!({ "sub": "spiffe://example.org/ns/agents/sa/*" }),
        },
    ]
}

/// The predefined templates.
#[utoipa::path(get, path = "/api/v1/oidc/trust-policies/templates", tag = "federation",
    security(("bearer" = []), ("api_key" = []), ("session_cookie" = [])),
    responses((status = 200, body = Vec<TemplateInfo>), (status = 401, body = Problem)))]
pub(super) async fn list_templates(_actor: Actor) -> Json<Vec<TemplateInfo>> {
    Json(templates())
}

/// The algorithms a partner may use: asymmetric ones only.
const ALGORITHMS: [&str; 9] = ["RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "EdDSA"];

fn invalid(code: &'static str, detail: impl Into<std::borrow::Cow<'static, str>>) -> ApiError {
    ApiError::Status { status: StatusCode::UNPROCESSABLE_ENTITY, code, detail: detail.into() }
}

/// A partner as the API shows it.
#[derive(Debug, Serialize, ToSchema)]
pub struct Partner {
    pub id: Uuid,
    pub name: String,
    pub issuer: String,
    pub jwks_uri: Option<String>,
    pub discovery_url: Option<String>,
    pub algorithms: Vec<String>,
    pub audience: String,
    pub template: Option<Template>,
    pub require_jti: bool,
    pub max_token_lifetime_secs: i32,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
}

#[derive(Debug, Deserialize, Validate, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreatePartner {
    #[validate(length(min = 1, max = 200))]
    pub name: String,
    /// Required unless the template fixes it (GitHub Actions).
    #[validate(length(min = 1, max = 2048))]
    pub issuer: Option<String>,
    #[validate(length(min = 1, max = 2048))]
    pub jwks_uri: Option<String>,
    #[validate(length(min = 1, max = 2048))]
    pub discovery_url: Option<String>,
    /// Default `["RS256", "ES256"]`.
    pub algorithms: Option<Vec<String>>,
    /// The `aud` the external tokens must carry for us (e.g. what a workflow asks GitHub for).
    #[validate(length(min = 1, max = 2048))]
    pub audience: String,
    pub template: Option<Template>,
    /// Refuse tokens without a `jti` (default true: replay protection needs one).
    pub require_jti: Option<bool>,
    /// Refuse tokens whose `exp - iat` is longer (default 3600).
    #[validate(range(min = 60, max = 86400))]
    pub max_token_lifetime_secs: Option<i32>,
}

#[derive(sqlx::FromRow)]
struct PartnerRow {
    federation_partner_id: Uuid,
    organization_id: Uuid,
    name: String,
    issuer: String,
    jwks_uri: Option<String>,
    discovery_url: Option<String>,
    algorithms: Vec<String>,
    audience: String,
    template: Option<String>,
    require_jti: bool,
    max_token_lifetime_secs: i32,
    created_at: OffsetDateTime,
}

impl From<PartnerRow> for Partner {
    fn from(r: PartnerRow) -> Self {
        Self {
            id: r.federation_partner_id,
            name: r.name,
            issuer: r.issuer,
            jwks_uri: r.jwks_uri,
            discovery_url: r.discovery_url,
            algorithms: r.algorithms,
            audience: r.audience,
            template: r.template.as_deref().and_then(Template::parse),
            require_jti: r.require_jti,
            max_token_lifetime_secs: r.max_token_lifetime_secs,
            created_at: r.created_at,
        }
    }
}

async fn checked_url(state: &AppState, field: &'static str, raw: &str) -> ApiResult<()> {
    let cfg = &state.config().trust;
    ssrf::check_url(raw, cfg.federation_https_only, cfg.federation_allow_private_networks)
        .await
        .map(|_| ())
        .map_err(|r| invalid("invalid_url", format!("{field}: {}", r.message())))
}

fn conflict(code: &'static str, detail: &'static str) -> ApiError {
    ApiError::Status { status: StatusCode::CONFLICT, code, detail: detail.into() }
}

fn db_error(e: sqlx::Error) -> ApiError {
    match &e {
        sqlx::Error::Database(d) if d.constraint() == Some("federation_partner_name_unique") => {
            conflict("name_taken", "The organization already has a partner with this name.")
        }
        sqlx::Error::Database(d) if d.constraint() == Some("trust_policy_name_unique") => {
            conflict("name_taken", "The organization already has a trust policy with this name.")
        }
        _ => e.into(),
    }
}

/// Registers an external issuer (owners and admins).
#[utoipa::path(post, path = "/api/v1/federation/partners", tag = "federation", request_body = CreatePartner,
    security(("bearer" = []), ("api_key" = []), ("session_cookie" = [])),
    responses((status = 201, body = Partner), (status = 403, body = Problem), (status = 409, body = Problem),
        (status = 422, body = Problem)))]
pub(super) async fn create_partner(
    State(state): State<AppState>,
    actor: Actor,
    ValidatedJson(req): ValidatedJson<CreatePartner>,
) -> ApiResult<(StatusCode, Json<Partner>)> {
    let org_id = actor.current_org()?;
    let fixed = req.template.and_then(|t| templates().into_iter().find(|i| i.id == t));
    // A template's issuer is a default: GitHub Enterprise Server, say, has its own.
    let issuer = match (&req.issuer, fixed.as_ref().and_then(|t| t.issuer)) {
        (Some(given), _) => given.clone(),
        (None, Some(fixed)) => fixed.to_owned(),
        (None, None) => return Err(invalid("invalid_issuer", "issuer is required.")),
    };
    checked_url(&state, "issuer", &issuer).await?;
    let discovery_url = req.discovery_url.clone().or_else(|| {
        fixed.as_ref().filter(|t| t.issuer == Some(issuer.as_str())).and_then(|t| t.discovery_url).map(str::to_owned)
    });
    if req.jwks_uri.is_none() && discovery_url.is_none() {
        return Err(invalid("invalid_partner", "Give jwks_uri or discovery_url."));
    }
    for (field, url) in [("jwks_uri", &req.jwks_uri), ("discovery_url", &discovery_url)] {
        if let Some(u) = url {
            checked_url(&state, field, u).await?;
        }
    }
    let algorithms = req.algorithms.clone().unwrap_or_else(|| vec!["RS256".into(), "ES256".into()]);
    if algorithms.is_empty() || algorithms.len() > 10 || algorithms.iter().any(|a| !ALGORITHMS.contains(&a.as_str())) {
        return Err(invalid(
            "invalid_algorithm",
            "algorithms may hold only RS256, RS384, RS512, PS256, PS384, PS512, ES256, ES384 and EdDSA (never none or HMAC).",
        ));
    }
    let id = Uuid::now_v7();
    let mut tx = state.db().begin().await?;
    let row = sqlx::query_as!(
        PartnerRow,
        "insert into federation_partner (federation_partner_id, organization_id, name, issuer, jwks_uri, discovery_url,
             algorithms, audience, template, require_jti, max_token_lifetime_secs)
         values ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)
         returning federation_partner_id, organization_id, name, issuer, jwks_uri, discovery_url, algorithms, audience,
                   template, require_jti, max_token_lifetime_secs, created_at",
        id,
        org_id,
        req.name,
        issuer,
        req.jwks_uri,
        discovery_url,
        &algorithms,
        req.audience,
        req.template.map(Template::as_str),
        req.require_jti.unwrap_or(true),
        req.max_token_lifetime_secs.unwrap_or(3600)
    )
    .fetch_one(&mut *tx)
    .await
    .map_err(db_error)?;
    audit::record(
        &mut tx,
        Event::by(&actor, org_id, "federation.partner_created")
            .target("federation_partner", id)
            .details(json!({ "issuer": issuer, "name": req.name })),
    )
    .await?;
    tx.commit().await?;
    Ok((StatusCode::CREATED, Json(row.into())))
}

/// The organization's partners.
#[utoipa::path(get, path = "/api/v1/federation/partners", tag = "federation",
    security(("bearer" = []), ("api_key" = []), ("session_cookie" = [])),
    responses((status = 200, body = Vec<Partner>), (status = 401, body = Problem), (status = 403, body = Problem)))]
pub(super) async fn list_partners(State(state): State<AppState>, actor: Actor) -> ApiResult<Json<Vec<Partner>>> {
    let org_id = actor.current_org()?;
    let rows = partners(state.db(), Partners::OfOrg(org_id)).await?;
    Ok(Json(rows.into_iter().map(Into::into).collect()))
}

/// One partner.
#[utoipa::path(get, path = "/api/v1/federation/partners/{id}", tag = "federation", params(("id" = Uuid, Path)),
    security(("bearer" = []), ("api_key" = []), ("session_cookie" = [])),
    responses((status = 200, body = Partner), (status = 404, body = Problem)))]
pub(super) async fn get_partner(
    State(state): State<AppState>,
    actor: Actor,
    ApiPath(id): ApiPath<Uuid>,
) -> ApiResult<Json<Partner>> {
    let org_id = actor.current_org()?;
    let row = partners(state.db(), Partners::One(org_id, id)).await?.pop().ok_or(ApiError::NotFound)?;
    Ok(Json(row.into()))
}

/// Ends the trust in a partner: its policies go, and every token issued under them dies.
#[utoipa::path(delete, path = "/api/v1/federation/partners/{id}", tag = "federation", params(("id" = Uuid, Path)),
    security(("bearer" = []), ("api_key" = []), ("session_cookie" = [])),
    responses((status = 204), (status = 403, body = Problem), (status = 404, body = Problem)))]
pub(super) async fn delete_partner(
    State(state): State<AppState>,
    actor: Actor,
    ApiPath(id): ApiPath<Uuid>,
) -> ApiResult<StatusCode> {
    let org_id = actor.current_org()?;
    let mut tx = state.db().begin().await?;
    let policies = sqlx::query_scalar!(
        "select trust_policy_id from trust_policy where organization_id = $1 and federation_partner_id = $2",
        org_id,
        id
    )
    .fetch_all(&mut *tx)
    .await?;
    let done = sqlx::query!(
        "delete from federation_partner where organization_id = $1 and federation_partner_id = $2",
        org_id,
        id
    )
    .execute(&mut *tx)
    .await?;
    if done.rows_affected() == 0 {
        return Err(ApiError::NotFound);
    }
    let mut announced = Vec::new();
    for p in &policies {
        let subject = Subject::Credential(*p);
        let not_before = revocation::revoke_subject(&mut tx, &subject, state.clock().now()).await?;
        announced.push(Announced::Subject { subject, not_before });
    }
    audit::record(&mut tx, Event::by(&actor, org_id, "federation.partner_deleted").target("federation_partner", id))
        .await?;
    tx.commit().await?;
    for a in announced {
        revocation::announce(&state, a).await;
    }
    Ok(StatusCode::NO_CONTENT)
}

/// A trust policy as the API shows it.
#[derive(Debug, Serialize, ToSchema)]
pub struct TrustPolicy {
    pub id: Uuid,
    pub name: String,
    pub partner_id: Uuid,
    /// Claim path → exact value or glob (`*` any run of characters, `?` one; `\` escapes).
    pub conditions: BTreeMap<String, String>,
    pub agent_id: Uuid,
    pub scopes: Vec<String>,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
}

#[derive(Debug, Deserialize, Validate, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateTrustPolicy {
    #[validate(length(min = 1, max = 200))]
    pub name: String,
    pub partner_id: Uuid,
    /// At least one; at most 20.
    pub conditions: BTreeMap<String, String>,
    pub agent_id: Uuid,
    /// The ceiling of the scopes; each must be among the agent's allowed scopes.
    pub scopes: Vec<String>,
}

struct PolicyRow {
    trust_policy_id: Uuid,
    name: String,
    federation_partner_id: Uuid,
    conditions: Value,
    agent_id: Uuid,
    scopes: Vec<String>,
    created_at: OffsetDateTime,
}

impl From<PolicyRow> for TrustPolicy {
    fn from(r: PolicyRow) -> Self {
        Self {
            id: r.trust_policy_id,
            name: r.name,
            partner_id: r.federation_partner_id,
            conditions: serde_json::from_value(r.conditions).unwrap_or_default(),
            agent_id: r.agent_id,
            scopes: r.scopes,
            created_at: r.created_at,
        }
    }
}

fn is_glob(pattern: &str) -> bool {
    let mut escaped = false;
    for c in pattern.chars() {
        match c {
            '\\' if !escaped => escaped = true,
            '*' | '?' if !escaped => return true,
            _ => escaped = false,
        }
    }
    false
}

/// Creates a trust policy (owners and admins).
#[utoipa::path(post, path = "/api/v1/oidc/trust-policies", tag = "federation", request_body = CreateTrustPolicy,
    security(("bearer" = []), ("api_key" = []), ("session_cookie" = [])),
    responses((status = 201, body = TrustPolicy), (status = 403, body = Problem), (status = 404, body = Problem),
        (status = 409, body = Problem), (status = 422, body = Problem)))]
pub(super) async fn create_policy(
    State(state): State<AppState>,
    actor: Actor,
    ValidatedJson(req): ValidatedJson<CreateTrustPolicy>,
) -> ApiResult<(StatusCode, Json<TrustPolicy>)> {
    let org_id = actor.current_org()?;
    if req.conditions.is_empty() || req.conditions.len() > 20 {
        return Err(invalid("invalid_conditions", "A trust policy names 1 to 20 conditions."));
    }
    if req.conditions.iter().any(|(k, v)| k.is_empty() || k.len() > 256 || v.is_empty() || v.len() > 1024) {
        return Err(invalid("invalid_conditions", "Claim paths are 1 to 256 characters, values 1 to 1024."));
    }
    let partner = partners(state.db(), Partners::One(org_id, req.partner_id))
        .await?
        .pop()
        .ok_or_else(|| invalid("unknown_partner", "partner_id names no partner of this organization."))?;
    // A shared issuer (every GitHub repository has the same one) must be pinned to a workload of
    // this organization by an exact claim, or any job anywhere would match.
    if let Some(t) = partner.template.as_deref().and_then(Template::parse)
        && let Some(info) = templates().into_iter().find(|i| i.id == t)
        && !info.required_exact.is_empty()
        && !info.required_exact.iter().any(|c| req.conditions.get(*c).is_some_and(|v| !is_glob(v)))
    {
        return Err(invalid(
            "invalid_conditions",
            format!("A {} policy must match one of {} exactly.", info.title, info.required_exact.join(", ")),
        ));
    }
    let agent = directory::agent_profile(state.db(), req.agent_id)
        .await?
        .filter(|a| a.org_id == org_id)
        .ok_or_else(|| invalid("unknown_agent", "agent_id names no agent of this organization."))?;
    if let Some(s) = req.scopes.iter().find(|s| !agent.allowed_scopes.contains(s)) {
        return Err(invalid(
            "invalid_scope",
            format!("The agent may not hold the scope `{}`.", s.chars().take(100).collect::<String>()),
        ));
    }
    let id = Uuid::now_v7();
    let mut tx = state.db().begin().await?;
    let row = sqlx::query_as!(
        PolicyRow,
        "insert into trust_policy (trust_policy_id, organization_id, federation_partner_id, name, conditions, agent_id, scopes)
         values ($1, $2, $3, $4, $5, $6, $7)
         returning trust_policy_id, name, federation_partner_id, conditions, agent_id, scopes, created_at",
        id,
        org_id,
        req.partner_id,
        req.name,
        json!(req.conditions),
        req.agent_id,
        &req.scopes
    )
    .fetch_one(&mut *tx)
    .await
    .map_err(db_error)?;
    audit::record(
        &mut tx,
        Event::by(&actor, org_id, "federation.trust_policy_created")
            .target("trust_policy", id)
            .details(json!({ "partner_id": req.partner_id, "agent_id": req.agent_id, "conditions": req.conditions })),
    )
    .await?;
    tx.commit().await?;
    Ok((StatusCode::CREATED, Json(row.into())))
}

/// The organization's trust policies.
#[utoipa::path(get, path = "/api/v1/oidc/trust-policies", tag = "federation",
    security(("bearer" = []), ("api_key" = []), ("session_cookie" = [])),
    responses((status = 200, body = Vec<TrustPolicy>), (status = 401, body = Problem), (status = 403, body = Problem)))]
pub(super) async fn list_policies(State(state): State<AppState>, actor: Actor) -> ApiResult<Json<Vec<TrustPolicy>>> {
    let org_id = actor.current_org()?;
    let rows = sqlx::query_as!(
        PolicyRow,
        "select trust_policy_id, name, federation_partner_id, conditions, agent_id, scopes, created_at
         from trust_policy where organization_id = $1 order by name",
        org_id
    )
    .fetch_all(state.db())
    .await?;
    Ok(Json(rows.into_iter().map(Into::into).collect()))
}

/// Deletes a trust policy; every token issued under it dies.
#[utoipa::path(delete, path = "/api/v1/oidc/trust-policies/{id}", tag = "federation", params(("id" = Uuid, Path)),
    security(("bearer" = []), ("api_key" = []), ("session_cookie" = [])),
    responses((status = 204), (status = 403, body = Problem), (status = 404, body = Problem)))]
pub(super) async fn delete_policy(
    State(state): State<AppState>,
    actor: Actor,
    ApiPath(id): ApiPath<Uuid>,
) -> ApiResult<StatusCode> {
    let org_id = actor.current_org()?;
    let mut tx = state.db().begin().await?;
    let done = sqlx::query!("delete from trust_policy where organization_id = $1 and trust_policy_id = $2", org_id, id)
        .execute(&mut *tx)
        .await?;
    if done.rows_affected() == 0 {
        return Err(ApiError::NotFound);
    }
    let subject = Subject::Credential(id);
    let not_before = revocation::revoke_subject(&mut tx, &subject, state.clock().now()).await?;
    audit::record(&mut tx, Event::by(&actor, org_id, "federation.trust_policy_deleted").target("trust_policy", id))
        .await?;
    tx.commit().await?;
    revocation::announce(&state, Announced::Subject { subject, not_before }).await;
    Ok(StatusCode::NO_CONTENT)
}

// ---- Matching -------------------------------------------------------------------------------

/// `*` matches any run of characters, `?` one, `\` makes the next one literal. The claim value is
/// always literal: a `*` in a token matches only a `*` in the pattern.
pub fn glob_match(pattern: &str, value: &str) -> bool {
    #[derive(Clone, Copy)]
    enum Tok {
        Lit(char),
        Any,
        One,
    }
    let mut toks = Vec::new();
    let mut chars = pattern.chars();
    while let Some(c) = chars.next() {
        toks.push(match c {
            '\\' => Tok::Lit(chars.next().unwrap_or('\\')),
            '*' => Tok::Any,
            '?' => Tok::One,
            c => Tok::Lit(c),
        });
    }
    let v: Vec<char> = value.chars().collect();
    // Iterative matching with one backtrack point: linear in practice, never exponential.
    let (mut p, mut i) = (0usize, 0usize);
    let (mut star, mut mark) = (None::<usize>, 0usize);
    while i < v.len() {
        match toks.get(p) {
            Some(Tok::Lit(c)) if *c == v[i] => {
                p += 1;
                i += 1;
            }
            Some(Tok::One) => {
                p += 1;
                i += 1;
            }
            Some(Tok::Any) => {
                star = Some(p);
                mark = i;
                p += 1;
            }
            _ => match star {
                Some(s) => {
                    p = s + 1;
                    mark += 1;
                    i = mark;
                }
                None => return false,
            },
        }
    }
    toks[p..].iter().all(|t| matches!(t, Tok::Any))
}

/// The string at a claim path (`a/b/c` for nested members); a non-string is no match.
fn claim<'a>(claims: &'a Value, path: &str) -> Option<&'a str> {
    if let Some(v) = claims.get(path) {
        return v.as_str();
    }
    let mut v = claims;
    for part in path.split('/') {
        v = v.get(part)?;
    }
    v.as_str()
}

/// Whether every condition holds for the claims.
pub fn conditions_hold(conditions: &BTreeMap<String, String>, claims: &Value) -> bool {
    !conditions.is_empty()
        && conditions.iter().all(|(path, pattern)| claim(claims, path).is_some_and(|v| glob_match(pattern, v)))
}

// ---- Keys -----------------------------------------------------------------------------------

/// Partners' key sets, by where they are found, fetched through the guarded fetcher.
pub struct KeyCache {
    sets: DocCache<JwkSet>,
    fetcher: Fetcher,
}

impl KeyCache {
    pub fn new(cfg: &super::TrustConfig) -> anyhow::Result<Self> {
        let fetcher = Fetcher::new(Options {
            https_only: cfg.federation_https_only,
            allow_private: cfg.federation_allow_private_networks,
            max_bytes: 64 * 1024,
            timeout: Duration::from_secs(5),
            ca_file: "",
        })?;
        Ok(Self { sets: DocCache::new(10_000, Duration::from_secs(86_400)), fetcher })
    }
}

/// Why a key set could not be had; logged, never shown.
#[derive(Debug, thiserror::Error)]
enum KeyError {
    #[error("fetch failed: {0}")]
    Fetch(#[from] FetchError),
    #[error("bad document: {0}")]
    Document(&'static str),
}

/// The partner's keys: cached, or fetched (through discovery when configured so).
async fn keys_for(state: &AppState, p: &PartnerRow, unknown_kid: bool) -> Result<Arc<JwkSet>, KeyError> {
    let cache_key = format!("{}|{}", p.jwks_uri.as_deref().unwrap_or(""), p.discovery_url.as_deref().unwrap_or(""));
    let cache = &state.trust().keys;
    if let Some(keys) = cache.sets.fresh(&cache_key, unknown_kid) {
        return Ok(keys);
    }
    let jwks_uri = match (&p.jwks_uri, &p.discovery_url) {
        (Some(u), _) => u.clone(),
        (None, Some(d)) => {
            let (doc, _) = cache.fetcher.get_json(d).await?;
            if doc["issuer"].as_str() != Some(p.issuer.as_str()) {
                return Err(KeyError::Document("the discovery document names another issuer"));
            }
            doc["jwks_uri"].as_str().ok_or(KeyError::Document("no jwks_uri in discovery"))?.to_owned()
        }
        (None, None) => return Err(KeyError::Document("no key location")),
    };
    let (doc, freshness) = cache.fetcher.get_json(&jwks_uri).await?;
    // Symmetric keys are dropped: a partner's key set is public, so an HMAC "key" in it is anyone's.
    let keys: Vec<Value> = doc["keys"]
        .as_array()
        .ok_or(KeyError::Document("no keys array"))?
        .iter()
        .filter(|k| matches!(k["kty"].as_str(), Some("RSA" | "EC" | "OKP")))
        .take(50)
        .cloned()
        .collect();
    let keys: JwkSet =
        serde_json::from_value(json!({ "keys": keys })).map_err(|_| KeyError::Document("malformed keys"))?;
    Ok(cache.sets.put(cache_key, keys, freshness.for_key_set()))
}

// ---- The exchange ---------------------------------------------------------------------------

/// What a successful exchange yields: the token to issue.
#[derive(Debug)]
pub struct Federated {
    pub org_id: Uuid,
    pub agent_id: Uuid,
    pub policy_id: Uuid,
    /// Space-separated, within the policy's ceiling and the agent's allowed scopes.
    pub scope: String,
}

/// Why an exchange was refused. `Invalid` is `invalid_grant` (the reason is logged);
/// `Scope` is `invalid_scope`; `Unavailable` is a 503 (the replay check could not be made).
#[derive(Debug)]
pub enum Refusal {
    Invalid(String),
    Scope(String),
    Unavailable,
}

fn refuse<T>(why: impl Into<String>) -> Result<T, Refusal> {
    Err(Refusal::Invalid(why.into()))
}

impl From<sqlx::Error> for Refusal {
    fn from(e: sqlx::Error) -> Self {
        tracing::warn!(error = %e, "federation lookup failed");
        Refusal::Unavailable
    }
}

/// Which partners [`partners`] reads.
enum Partners<'a> {
    /// An organization's, by name.
    OfOrg(Uuid),
    /// One partner of an organization (none when it is another's).
    One(Uuid, Uuid),
    /// Those of every organization that trust an issuer (the exchange): the oldest 100.
    Issuer(&'a str),
}

/// Every read of partners: the columns and their mapping to [`PartnerRow`] are written once; each
/// filter keeps its own plain `where`, so that each uses its index.
async fn partners(db: &PgPool, which: Partners<'_>) -> Result<Vec<PartnerRow>, sqlx::Error> {
    macro_rules! select {
        ($filter:literal) => {
            concat!(
                "select federation_partner_id, organization_id, name, issuer, jwks_uri, discovery_url, algorithms,
                        audience, template, require_jti, max_token_lifetime_secs, created_at
                 from federation_partner ",
                $filter
            )
        };
    }
    let query = match which {
        Partners::OfOrg(org) => sqlx::query_as(select!("where organization_id = $1 order by name")).bind(org),
        Partners::One(org, id) => {
            sqlx::query_as(select!("where organization_id = $1 and federation_partner_id = $2")).bind(org).bind(id)
        }
        Partners::Issuer(issuer) => {
            sqlx::query_as(select!("where issuer = $1 order by created_at limit 100")).bind(issuer)
        }
    };
    query.fetch_all(db).await
}

/// Verifies the external token against one partner; its claims when valid.
async fn verify_with(
    state: &AppState,
    p: &PartnerRow,
    token: &str,
    header: &jsonwebtoken::Header,
) -> Result<Value, String> {
    let alg = format!("{:?}", header.alg);
    if !p.algorithms.contains(&alg) {
        return Err(format!("algorithm {alg} not allowed for partner {}", p.federation_partner_id));
    }
    let mut keys =
        keys_for(state, p, false).await.map_err(|e| format!("keys of partner {}: {e}", p.federation_partner_id))?;
    let find = |keys: &JwkSet| match header.kid.as_deref() {
        Some(kid) => keys.find(kid).cloned(),
        None if keys.keys.len() == 1 => keys.keys.first().cloned(),
        None => None,
    };
    let jwk = match find(&keys) {
        Some(k) => k,
        None => {
            keys = keys_for(state, p, true).await.map_err(|e| format!("keys: {e}"))?;
            find(&keys).ok_or("no key for the token's kid")?
        }
    };
    if jwk.common.key_algorithm.is_some_and(|a| format!("{a:?}") != alg) {
        return Err("the key is for another algorithm".into());
    }
    let key = jsonwebtoken::DecodingKey::from_jwk(&jwk).map_err(|e| format!("unusable key: {e}"))?;
    let mut validation = jsonwebtoken::Validation::new(header.alg);
    // Times are checked below on the application's clock.
    validation.validate_exp = false;
    validation.validate_nbf = false;
    validation.required_spec_claims.clear();
    validation.set_issuer(&[&p.issuer]);
    validation.set_audience(&[&p.audience]);
    let data = jsonwebtoken::decode::<Value>(token, &key, &validation).map_err(|e| format!("rejected: {e}"))?;
    Ok(data.claims)
}

/// Exchanges an external token for the agent a trust policy maps it to.
pub async fn exchange(state: &AppState, token: &str, requested_scope: Option<&str>) -> Result<Federated, Refusal> {
    if token.len() > 16 * 1024 {
        return refuse("external token over 16 KiB");
    }
    let header = jsonwebtoken::decode_header(token).map_err(|_| Refusal::Invalid("malformed header".into()))?;
    let payload = token.split('.').nth(1).ok_or_else(|| Refusal::Invalid("not a JWS".into()))?;
    let unverified: Value = B64
        .decode(payload)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .ok_or_else(|| Refusal::Invalid("malformed payload".into()))?;
    let issuer = unverified["iss"].as_str().ok_or_else(|| Refusal::Invalid("no iss".into()))?;
    let partners = partners(state.db(), Partners::Issuer(issuer)).await?;
    if partners.is_empty() {
        return refuse(format!("no partner trusts the issuer {:?}", issuer.chars().take(200).collect::<String>()));
    }
    let now = state.clock().now().unix_timestamp();
    let mut reasons = Vec::new();
    let mut matched: Vec<(PolicyRow, &PartnerRow, Value)> = Vec::new();
    for p in &partners {
        let claims = match verify_with(state, p, token, &header).await {
            Ok(c) => c,
            Err(why) => {
                reasons.push(why);
                continue;
            }
        };
        let (exp, iat) = (claims["exp"].as_i64(), claims["iat"].as_i64());
        let Some(exp) = exp else {
            reasons.push("no exp".into());
            continue;
        };
        const LEEWAY: i64 = 30;
        if exp + LEEWAY <= now {
            reasons.push("expired".into());
            continue;
        }
        if claims["nbf"].as_i64().is_some_and(|nbf| nbf > now + LEEWAY) || iat.is_some_and(|iat| iat > now + LEEWAY) {
            reasons.push("not yet valid".into());
            continue;
        }
        if exp - iat.unwrap_or(now) > i64::from(p.max_token_lifetime_secs) {
            reasons.push("lifetime over the partner's limit".into());
            continue;
        }
        if p.require_jti && !claims["jti"].is_string() {
            reasons.push("no jti".into());
            continue;
        }
        let policies = sqlx::query_as!(
            PolicyRow,
            "select trust_policy_id, name, federation_partner_id, conditions, agent_id, scopes, created_at
             from trust_policy where federation_partner_id = $1 order by created_at",
            p.federation_partner_id
        )
        .fetch_all(state.db())
        .await?;
        for policy in policies {
            let conditions: BTreeMap<String, String> =
                serde_json::from_value(policy.conditions.clone()).unwrap_or_default();
            if conditions_hold(&conditions, &claims) {
                matched.push((policy, p, claims.clone()));
            }
        }
    }
    let sub = |c: &Value| c["sub"].as_str().unwrap_or("").chars().take(200).collect::<String>();
    let Some((policy, partner, claims)) = matched.first() else {
        let why = if reasons.is_empty() { "no trust policy matches".to_owned() } else { reasons.join("; ") };
        return refuse(why);
    };
    if matched.iter().any(|(other, _, _)| other.agent_id != policy.agent_id) {
        return refuse(format!("policies for different agents match the token of {}", sub(claims)));
    }
    // One use per jti, on every instance, until the token expires.
    if let Some(jti) = claims["jti"].as_str() {
        let exp = claims["exp"].as_i64().unwrap_or(now);
        let ttl = (exp - now + 60).clamp(60, 86_400 + 60);
        let key = state.redis().key(&format!(
            "federation:jti:{}",
            crate::crypto::sha256(&format!("{issuer}\n{jti}")).iter().map(|b| format!("{b:02x}")).collect::<String>()
        ));
        let first = async {
            let mut conn = state.redis().multiplexed().await?;
            let set: Option<String> = tokio::time::timeout(
                state.redis().timeout(),
                redis::cmd("SET").arg(&key).arg(1).arg("NX").arg("EX").arg(ttl).query_async(&mut conn),
            )
            .await??;
            anyhow::Ok(set.is_some())
        };
        match first.await {
            Ok(true) => {}
            Ok(false) => return refuse(format!("replayed jti from {issuer}")),
            Err(e) => {
                tracing::warn!(error = %e, "federation replay check unavailable");
                return Err(Refusal::Unavailable);
            }
        }
    }
    let agent = directory::agent_profile(state.db(), policy.agent_id)
        .await?
        .filter(|a| a.active && a.org_id == partner.organization_id)
        .ok_or_else(|| Refusal::Invalid("the mapped agent is suspended or gone".into()))?;
    let ceiling: Vec<&String> = policy.scopes.iter().filter(|s| agent.allowed_scopes.contains(s)).collect();
    let scope = match requested_scope {
        None => ceiling.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(" "),
        Some(req) => {
            let mut granted: Vec<&str> = Vec::new();
            for s in req.split(' ').filter(|s| !s.is_empty()) {
                if !ceiling.iter().any(|c| c.as_str() == s) {
                    return Err(Refusal::Scope(s.chars().take(100).collect()));
                }
                if !granted.contains(&s) {
                    granted.push(s);
                }
            }
            granted.join(" ")
        }
    };
    let mut tx = state.db().begin().await?;
    audit::record(
        &mut tx,
        Event::anonymous(partner.organization_id, "token.federated")
            .actor(format!("agent:{}", agent.id), "agent")
            .target("trust_policy", policy.trust_policy_id)
            .details(json!({
                "iss": issuer,
                "sub": sub(claims),
                "jti": claims["jti"].as_str().map(|j| j.chars().take(200).collect::<String>()),
                "partner_id": partner.federation_partner_id,
                "scope": scope,
            })),
    )
    .await?;
    tx.commit().await?;
    Ok(Federated { org_id: partner.organization_id, agent_id: agent.id, policy_id: policy.trust_policy_id, scope })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs_match_as_documented() {
        assert!(glob_match("refs/heads/main", "refs/heads/main"));
        assert!(!glob_match("refs/heads/main", "refs/heads/main2"));
        assert!(glob_match("refs/heads/*", "refs/heads/feature/x"));
        assert!(glob_match("repo:acme/*:ref:refs/heads/main", "repo:acme/app:ref:refs/heads/main"));
        assert!(!glob_match("repo:acme/*:ref:refs/heads/main", "repo:acme/app:ref:refs/heads/dev"));
        assert!(glob_match("v?", "v1") && !glob_match("v?", "v10"));
        assert!(glob_match("a\\*b", "a*b") && !glob_match("a\\*b", "axb"));
        // A claim value's metacharacters are literal.
        assert!(!glob_match("acme/app", "acme/*"));
        assert!(glob_match("*", "") && !glob_match("?", ""));
        // Pathological patterns stay fast.
        let value = "a".repeat(5000);
        assert!(!glob_match(&format!("{}b", "*a".repeat(100)), &value));
    }

    #[test]
    fn nested_claims_and_non_strings() {
        let claims = json!({ "kubernetes.io": { "namespace": "agents", "serviceaccount": { "name": "w" } }, "n": 1 });
        let mut c = BTreeMap::new();
        c.insert("kubernetes.io/namespace".to_owned(), "agents".to_owned());
        c.insert("kubernetes.io/serviceaccount/name".to_owned(), "w".to_owned());
        assert!(conditions_hold(&c, &claims));
        c.insert("n".to_owned(), "1".to_owned());
        assert!(!conditions_hold(&c, &claims), "a number is not the string \"1\"");
        assert!(!conditions_hold(&BTreeMap::new(), &claims), "no conditions never matches");
    }
}
