//! The PDP over HTTP (the original security layer's request shape), the per-organization policy
//! store, and the decision log's listing.

use std::collections::HashMap;

use axum::{Json, extract::State, http::StatusCode};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};
use time::OffsetDateTime;
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use super::{Decision, Query, Resource, engine::QueryError, log_decision};
use crate::{
    audit::{self, Event},
    auth::Actor,
    http::{
        ApiError, ApiResult,
        error::{FieldError, Problem},
        extract::{ApiJson, ApiPath, ApiQuery},
        pagination,
    },
    state::AppState,
};

/// The actor of a PDP request.
#[derive(Debug, Deserialize, ToSchema)]
pub struct PdpActor {
    /// `user:<uuid>`, `agent:<uuid>` or `service:<uuid>`.
    pub actor_id: String,
    /// `human`, `agent` or `service`.
    pub actor_type: String,
    /// The organizations the actor belongs to (`microdao_ids` is accepted as an alias), each a
    /// UUID, `org:<uuid>` or `microdao:<slug>`.
    #[serde(default, alias = "microdao_ids")]
    pub org_ids: Vec<String>,
    /// `owner`, `admin`, `member` (or `microdao_owner`, ...), `agent`, `system_admin`.
    #[serde(default)]
    pub roles: Vec<String>,
    /// The credential's scopes; absent: not limited by scopes.
    pub scopes: Option<Vec<String>>,
}

#[derive(Debug, Deserialize, ToSchema)]
pub struct PdpResource {
    /// `microdao` (or `organization`), `channel`, `tool`, `agent`, `usage_report`, `audit_log`,
    /// `api_key`, `policy_set`, `platform`.
    #[serde(rename = "type")]
    pub kind: String,
    /// For a `microdao`: the organization, as a UUID, `org:<uuid>` or `microdao:<slug>`.
    pub id: String,
    /// What the resource's policies read: `microdao_id`/`org_id` (an organization as in `id`),
    /// `members`, `allowed_agents`,
    /// `owner_id`, `subject_id`, `created_by`.
    #[serde(default)]
    pub attributes: Map<String, Value>,
}

/// A PDP request in the original security layer's shape.
#[derive(Debug, Deserialize, ToSchema)]
pub struct PdpRequest {
    pub actor: PdpActor,
    pub action: String,
    pub resource: PdpResource,
    /// `required_scope` is read from here; other keys are accepted and ignored.
    #[serde(default)]
    pub context: Map<String, Value>,
}

fn role_rank(role: &str) -> Option<(u8, &'static str)> {
    match role.strip_prefix("microdao_").unwrap_or(role) {
        "owner" => Some((3, "owner")),
        "admin" => Some((2, "admin")),
        "member" => Some((1, "member")),
        _ => None,
    }
}

fn attr_str(attrs: &Map<String, Value>, keys: &[&str]) -> Option<String> {
    keys.iter().find_map(|k| attrs.get(*k).and_then(Value::as_str).map(str::to_owned))
}

fn attr_list(attrs: &Map<String, Value>, key: &str) -> Result<Vec<String>, QueryError> {
    match attrs.get(key) {
        None => Ok(Vec::new()),
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| {
                v.as_str()
                    .map(str::to_owned)
                    .ok_or_else(|| QueryError(format!("resource.attributes.{key} must list strings")))
            })
            .collect(),
        Some(_) => Err(QueryError(format!("resource.attributes.{key} must be an array"))),
    }
}

fn uuid_of(value: Option<String>, what: &str) -> Result<Uuid, QueryError> {
    let v = value.ok_or_else(|| QueryError(format!("{what} is required for this resource type")))?;
    let bare = v.rsplit(':').next().unwrap_or(&v);
    bare.parse().map_err(|_| QueryError(format!("{what} must be a UUID")))
}

/// An organization as the original shape names it: a bare UUID, `org:<uuid>`, `microdao:<uuid>`
/// or `microdao:<slug>`.
enum OrgRef<'a> {
    Id(Uuid),
    Slug(&'a str),
}

fn org_ref(v: &str) -> Option<OrgRef<'_>> {
    let (prefix, rest) = match v.split_once(':') {
        Some((p, rest)) => (Some(p), rest),
        None => (None, v),
    };
    if matches!(prefix, None | Some("org" | "microdao" | "organization"))
        && let Ok(id) = rest.parse::<Uuid>()
    {
        return Some(OrgRef::Id(id));
    }
    match prefix {
        Some("microdao") if crate::auth::valid_slug(rest) => Some(OrgRef::Slug(rest)),
        _ => None,
    }
}

/// Every slug a request names where it names an organization.
fn slugs_of(r: &PdpRequest) -> impl Iterator<Item = &str> {
    let a = &r.resource.attributes;
    let resource_org =
        matches!(r.resource.kind.as_str(), "microdao" | "organization" | "org").then_some(r.resource.id.as_str());
    let attrs = ["org_id", "microdao_id"].into_iter().filter_map(|k| a.get(k).and_then(Value::as_str));
    resource_org.into_iter().chain(attrs).chain(r.actor.org_ids.iter().map(String::as_str)).filter_map(
        |v| match org_ref(v) {
            Some(OrgRef::Slug(s)) => Some(s),
            _ => None,
        },
    )
}

/// The organizations these requests' slugs name, looked up through `auth` in one query (none
/// when no request names a slug).
pub async fn resolve_slugs<'a>(
    state: &AppState,
    requests: impl IntoIterator<Item = &'a PdpRequest>,
) -> ApiResult<HashMap<String, Uuid>> {
    let mut slugs: Vec<String> = requests.into_iter().flat_map(slugs_of).map(str::to_owned).collect();
    slugs.sort_unstable();
    slugs.dedup();
    Ok(crate::auth::directory::ids_by_slug(state.db(), &slugs).await?)
}

/// The id a slug no organization has stands for. Derived from the slug, so that a request about an
/// unknown slug gets the answer a request about an unknown organization id gets (the baseline's,
/// for an organization nobody is in unless the actor names the same slug; 404 for an org-bound
/// caller), and never the id of a real organization (those are random or time-ordered; this is a
/// custom, version 8, UUID).
fn unknown_slug_id(slug: &str) -> Uuid {
    let hash = Sha256::digest(format!("agentidp:unknown-microdao:{slug}"));
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&hash[..16]);
    uuid::Builder::from_custom_bytes(bytes).into_uuid()
}

/// Resolves one organization reference; `None`: not an organization reference at all.
fn org_id_of(v: &str, slugs: &HashMap<String, Uuid>) -> Option<Uuid> {
    match org_ref(v)? {
        OrgRef::Id(id) => Some(id),
        OrgRef::Slug(s) => Some(slugs.get(s).copied().unwrap_or_else(|| unknown_slug_id(s))),
    }
}

fn org_of(value: Option<String>, what: &str, slugs: &HashMap<String, Uuid>) -> Result<Uuid, QueryError> {
    let v = value.ok_or_else(|| QueryError(format!("{what} is required for this resource type")))?;
    org_id_of(&v, slugs).ok_or_else(|| {
        QueryError(format!("{what} must name an organization: a UUID, org:<uuid>, microdao:<uuid> or microdao:<slug>"))
    })
}

/// Turns the wire shape into an engine query; `slugs` are the organizations the request's slugs
/// name (see [`resolve_slugs`]).
pub fn to_query(r: &PdpRequest, slugs: &HashMap<String, Uuid>) -> Result<Query, QueryError> {
    if !["human", "agent", "service"].contains(&r.actor.actor_type.as_str()) {
        return Err(QueryError("actor.actor_type must be human, agent or service".into()));
    }
    if r.actor.actor_id.is_empty() || r.actor.actor_id.len() > 200 || r.action.is_empty() || r.action.len() > 100 {
        return Err(QueryError("actor.actor_id and action must be 1 to 200 characters".into()));
    }
    let a = &r.resource.attributes;
    let org = || org_of(attr_str(a, &["org_id", "microdao_id"]), "resource.attributes.org_id", slugs);
    let resource = match r.resource.kind.as_str() {
        "microdao" | "organization" | "org" => {
            Resource::Organization { org_id: org_of(Some(r.resource.id.clone()), "resource.id", slugs)? }
        }
        "channel" => Resource::Channel { org_id: org()?, members: attr_list(a, "members")? },
        "tool" => Resource::Tool { org_id: org()?, allowed_agents: attr_list(a, "allowed_agents")? },
        "agent" => Resource::Agent {
            org_id: org()?,
            owner_id: attr_str(a, &["owner_id"])
                .map(|o| uuid_of(Some(o), "resource.attributes.owner_id"))
                .transpose()?,
        },
        "usage" | "usage_report" => Resource::UsageReport {
            org_id: org()?,
            subject_id: attr_str(a, &["subject_id"])
                .ok_or_else(|| QueryError("resource.attributes.subject_id is required".into()))?,
        },
        "audit_log" => Resource::AuditLog { org_id: org()? },
        "policy_set" => Resource::PolicySet { org_id: org()? },
        "api_key" => Resource::ApiKey {
            org_id: org()?,
            created_by: attr_str(a, &["created_by"])
                .ok_or_else(|| QueryError("resource.attributes.created_by is required".into()))?,
        },
        "platform" => Resource::Platform,
        other => {
            return Err(QueryError(format!("unknown resource type {:?}", other.chars().take(50).collect::<String>())));
        }
    };
    let in_org = resource.org_id().is_some_and(|o| r.actor.org_ids.iter().any(|x| org_id_of(x, slugs) == Some(o)));
    let org_role = if !in_org {
        "none"
    } else if r.actor.actor_type == "agent" {
        "agent"
    } else {
        r.actor.roles.iter().filter_map(|x| role_rank(x)).max().map(|(_, name)| name).unwrap_or("none")
    };
    Ok(Query {
        actor_id: r.actor.actor_id.clone(),
        actor_type: r.actor.actor_type.clone(),
        system_admin: r.actor.roles.iter().any(|x| x == "system_admin"),
        org_role: org_role.to_owned(),
        scopes: r.actor.scopes.clone(),
        required_scope: r.context.get("required_scope").and_then(Value::as_str).unwrap_or("").to_owned(),
        action: r.action.clone(),
        resource_id: r.resource.id.clone(),
        resource,
        budget_exceeded: r.context.get("budget_exceeded").and_then(Value::as_bool).unwrap_or(false),
        validate: true,
    })
}

fn bad(e: QueryError) -> ApiError {
    ApiError::bad_request("invalid_pdp_request", e.0)
}

/// The decision point answers about the caller's own organization only: a credential bound to an
/// organization (a service key, an API key, an agent's token) asks about that one, a session about
/// those its human belongs to; a system admin not bound to one asks about any. Another
/// organization is 404, like every object of another organization (its existence must not
/// leak). Questions about the platform name no organization and are open to every caller the
/// route admits.
fn may_ask_about(actor: &Actor, q: &Query) -> ApiResult<()> {
    let Some(org) = q.resource.org_id() else { return Ok(()) };
    let allowed = match actor.principal.credential.bound_org() {
        Some(bound) => bound == org,
        None => actor.is_system_admin() || actor.role_in(org).is_some(),
    };
    if allowed { Ok(()) } else { Err(ApiError::NotFound) }
}

/// Decides one request with the baseline and the resource organization's active policies.
#[utoipa::path(post, path = "/internal/pdp/evaluate", tag = "policy", request_body = PdpRequest,
    security(("bearer" = []), ("api_key" = []), ("session_cookie" = [])),
    responses((status = 200, body = Decision), (status = 400, body = Problem), (status = 403, body = Problem), (status = 404, description = "The resource is in another organization than the caller's", body = Problem), (status = 422, body = Problem)))]
pub(super) async fn evaluate(
    State(state): State<AppState>,
    actor: Actor,
    ApiJson(req): ApiJson<PdpRequest>,
) -> ApiResult<Json<Decision>> {
    let slugs = resolve_slugs(&state, [&req]).await?;
    let q = to_query(&req, &slugs).map_err(bad)?;
    may_ask_about(&actor, &q)?;
    let d = state.policy().evaluate(&q).map_err(bad)?;
    log_decision(&state, &q, &d);
    Ok(Json(d))
}

#[derive(Debug, Deserialize, ToSchema)]
pub struct BatchRequest {
    /// At most 100.
    pub requests: Vec<PdpRequest>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct BatchResponse {
    /// One decision per request, in order.
    pub results: Vec<Decision>,
}

/// Decides many requests at once.
#[utoipa::path(post, path = "/internal/pdp/evaluate/batch", tag = "policy", request_body = BatchRequest,
    security(("bearer" = []), ("api_key" = []), ("session_cookie" = [])),
    responses((status = 200, body = BatchResponse), (status = 400, body = Problem), (status = 403, body = Problem), (status = 404, description = "A request names another organization than the caller's", body = Problem)))]
pub(super) async fn evaluate_batch(
    State(state): State<AppState>,
    actor: Actor,
    ApiJson(req): ApiJson<BatchRequest>,
) -> ApiResult<Json<BatchResponse>> {
    if req.requests.is_empty() || req.requests.len() > 100 {
        return Err(ApiError::field("requests", "length", "1 to 100 requests"));
    }
    // Every request is checked before any is decided: a refused batch decides (and logs) nothing.
    let slugs = resolve_slugs(&state, &req.requests).await?;
    let mut queries = Vec::with_capacity(req.requests.len());
    for (i, r) in req.requests.iter().enumerate() {
        let q = to_query(r, &slugs)
            .map_err(|e| ApiError::bad_request("invalid_pdp_request", format!("requests[{i}]: {}", e.0)))?;
        may_ask_about(&actor, &q)?;
        queries.push(q);
    }
    let mut results = Vec::with_capacity(queries.len());
    for (i, q) in queries.iter().enumerate() {
        let d = state
            .policy()
            .evaluate(q)
            .map_err(|e| ApiError::bad_request("invalid_pdp_request", format!("requests[{i}]: {}", e.0)))?;
        log_decision(&state, q, &d);
        results.push(d);
    }
    Ok(Json(BatchResponse { results }))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateVersion {
    /// Cedar policies (at most 256 KiB), validated against the schema on write.
    pub source: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct PolicyVersion {
    pub version: i32,
    /// `draft`, `active` or `inactive`.
    pub status: String,
    pub created_by: Option<String>,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339::option")]
    pub activated_at: Option<OffsetDateTime>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
}

fn invalid_policy(errors: Vec<String>) -> ApiError {
    ApiError::Invalid {
        status: StatusCode::BAD_REQUEST,
        code: "invalid_policy",
        detail: "The policies do not parse or do not validate against the schema; see `errors`.".into(),
        errors: errors
            .into_iter()
            .map(|m| FieldError { field: "source".into(), code: "cedar".into(), message: m })
            .collect(),
    }
}

/// Stores a new draft version of the current organization's policies.
#[utoipa::path(post, path = "/api/v1/policies/versions", tag = "policy", request_body = CreateVersion,
    security(("bearer" = []), ("api_key" = []), ("session_cookie" = [])),
    responses((status = 201, body = PolicyVersion), (status = 400, description = "Cedar diagnostics with positions", body = Problem), (status = 403, body = Problem)))]
pub(super) async fn create_version(
    State(state): State<AppState>,
    actor: Actor,
    ApiJson(req): ApiJson<CreateVersion>,
) -> ApiResult<(StatusCode, Json<PolicyVersion>)> {
    let org_id = actor.current_org()?;
    if req.source.len() > 256 * 1024 {
        return Err(ApiError::field("source", "length", "at most 256 KiB"));
    }
    state.policy().compile(&req.source).map_err(invalid_policy)?;
    let mut tx = state.db().begin().await?;
    if !crate::auth::directory::lock(&mut tx, org_id).await? {
        return Err(ApiError::NotFound);
    }
    let r = sqlx::query!(
        r#"insert into policy_version (organization_id, version, source, created_by)
           values ($1, coalesce((select max(version) from policy_version where organization_id = $1), 0) + 1, $2, $3)
           returning version, status, created_at"#,
        org_id,
        req.source,
        actor.actor_id()
    )
    .fetch_one(&mut *tx)
    .await?;
    audit::record(&mut tx, Event::by(&actor, org_id, "policy.draft_created").target("policy_version", r.version))
        .await?;
    tx.commit().await?;
    Ok((
        StatusCode::CREATED,
        Json(PolicyVersion {
            version: r.version,
            status: r.status,
            created_by: Some(actor.actor_id()),
            created_at: r.created_at,
            activated_at: None,
            source: None,
        }),
    ))
}

/// The current organization's policy versions, newest first.
#[utoipa::path(get, path = "/api/v1/policies/versions", tag = "policy",
    security(("bearer" = []), ("api_key" = []), ("session_cookie" = [])),
    responses((status = 200, body = Vec<PolicyVersion>), (status = 403, body = Problem)))]
pub(super) async fn list_versions(State(state): State<AppState>, actor: Actor) -> ApiResult<Json<Vec<PolicyVersion>>> {
    let org_id = actor.current_org()?;
    let rows = sqlx::query!(
        "select version, status, created_by, created_at, activated_at from policy_version
         where organization_id = $1 order by version desc limit 500",
        org_id
    )
    .fetch_all(state.db())
    .await?;
    Ok(Json(
        rows.into_iter()
            .map(|r| PolicyVersion {
                version: r.version,
                status: r.status,
                created_by: r.created_by,
                created_at: r.created_at,
                activated_at: r.activated_at,
                source: None,
            })
            .collect(),
    ))
}

async fn load_version(state: &AppState, org_id: Uuid, version: i32) -> ApiResult<PolicyVersion> {
    let r = sqlx::query!(
        "select version, status, created_by, created_at, activated_at, source from policy_version
         where organization_id = $1 and version = $2",
        org_id,
        version
    )
    .fetch_optional(state.db())
    .await?
    .ok_or(ApiError::NotFound)?;
    Ok(PolicyVersion {
        version: r.version,
        status: r.status,
        created_by: r.created_by,
        created_at: r.created_at,
        activated_at: r.activated_at,
        source: Some(r.source),
    })
}

/// One version, with its source.
#[utoipa::path(get, path = "/api/v1/policies/versions/{version}", tag = "policy", params(("version" = i32, Path)),
    security(("bearer" = []), ("api_key" = []), ("session_cookie" = [])),
    responses((status = 200, body = PolicyVersion), (status = 404, body = Problem)))]
pub(super) async fn get_version(
    State(state): State<AppState>,
    actor: Actor,
    ApiPath(version): ApiPath<i32>,
) -> ApiResult<Json<PolicyVersion>> {
    Ok(Json(load_version(&state, actor.current_org()?, version).await?))
}

#[derive(Debug, Deserialize, ToSchema)]
pub struct Example {
    /// Names the example in the report; default: its position.
    pub name: Option<String>,
    pub request: PdpRequest,
    /// `permit` or `deny`.
    pub expect: String,
}

#[derive(Debug, Deserialize, ToSchema)]
pub struct TestRequest {
    /// At most 200.
    pub examples: Vec<Example>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ExampleResult {
    pub name: String,
    pub expected: String,
    pub effect: String,
    pub reason: String,
    pub determining_policies: Vec<String>,
    pub passed: bool,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct TestReport {
    pub passed: bool,
    /// The names of the examples whose effect was not the expected one.
    pub failures: Vec<String>,
    pub results: Vec<ExampleResult>,
}

/// A dry run: decides each example with this version (plus the baseline) and says which failed and why.
#[utoipa::path(post, path = "/api/v1/policies/versions/{version}/test", tag = "policy", params(("version" = i32, Path)),
    request_body = TestRequest,
    security(("bearer" = []), ("api_key" = []), ("session_cookie" = [])),
    responses((status = 200, body = TestReport), (status = 400, body = Problem), (status = 404, description = "No such version, or an example names another organization than the caller's", body = Problem)))]
pub(super) async fn test_version(
    State(state): State<AppState>,
    actor: Actor,
    ApiPath(version): ApiPath<i32>,
    ApiJson(req): ApiJson<TestRequest>,
) -> ApiResult<Json<TestReport>> {
    let org_id = actor.current_org()?;
    if req.examples.is_empty() || req.examples.len() > 200 {
        return Err(ApiError::field("examples", "length", "1 to 200 examples"));
    }
    let v = load_version(&state, org_id, version).await?;
    let set = state.policy().compile(v.source.as_deref().unwrap_or_default()).map_err(invalid_policy)?;
    let slugs = resolve_slugs(&state, req.examples.iter().map(|e| &e.request)).await?;
    let mut results = Vec::new();
    for (i, ex) in req.examples.iter().enumerate() {
        let name = ex.name.clone().unwrap_or_else(|| format!("examples[{i}]"));
        if ex.expect != "permit" && ex.expect != "deny" {
            return Err(ApiError::field(format!("examples[{i}].expect"), "enum", "permit or deny"));
        }
        let q = to_query(&ex.request, &slugs)
            .map_err(|e| ApiError::bad_request("invalid_pdp_request", format!("{name}: {}", e.0)))?;
        may_ask_about(&actor, &q)?;
        let d = state
            .policy()
            .evaluate_with(&q, &set, format!("draft:v{version}"))
            .map_err(|e| ApiError::bad_request("invalid_pdp_request", format!("{name}: {}", e.0)))?;
        results.push(ExampleResult {
            passed: d.effect == ex.expect,
            name,
            expected: ex.expect.clone(),
            effect: d.effect.to_owned(),
            reason: d.reason,
            determining_policies: d.determining_policies,
        });
    }
    let failures: Vec<String> = results.iter().filter(|r| !r.passed).map(|r| r.name.clone()).collect();
    Ok(Json(TestReport { passed: failures.is_empty(), failures, results }))
}

async fn activate(
    state: &AppState,
    actor: &Actor,
    org_id: Uuid,
    version: i32,
    action: &'static str,
) -> ApiResult<PolicyVersion> {
    let v = load_version(state, org_id, version).await?;
    // Compiles before it goes live: a schema change could have made an old version invalid.
    state.policy().compile(v.source.as_deref().unwrap_or_default()).map_err(invalid_policy)?;
    let mut tx = state.db().begin().await?;
    if !crate::auth::directory::lock(&mut tx, org_id).await? {
        return Err(ApiError::NotFound);
    }
    sqlx::query!(
        "update policy_version set status = 'inactive' where organization_id = $1 and status = 'active'",
        org_id
    )
    .execute(&mut *tx)
    .await?;
    sqlx::query!(
        "update policy_version set status = 'active', activated_at = now() where organization_id = $1 and version = $2",
        org_id,
        version
    )
    .execute(&mut *tx)
    .await?;
    audit::record(&mut tx, Event::by(actor, org_id, action).target("policy_version", version)).await?;
    crate::events::emit(
        &mut tx,
        org_id,
        action,
        format!("policies/versions/{version}"),
        serde_json::json!({ "version": version }),
    )
    .await?;
    tx.commit().await?;
    super::reload_org(state, org_id).await?;
    crate::cache::invalidation::publish(state.redis(), "policy", &org_id.to_string()).await;
    load_version(state, org_id, version).await.map(|mut v| {
        v.source = None;
        v
    })
}

/// Makes a version the active one, on every instance.
#[utoipa::path(post, path = "/api/v1/policies/versions/{version}/activate", tag = "policy", params(("version" = i32, Path)),
    security(("bearer" = []), ("api_key" = []), ("session_cookie" = [])),
    responses((status = 200, body = PolicyVersion), (status = 400, body = Problem), (status = 404, body = Problem)))]
pub(super) async fn activate_version(
    State(state): State<AppState>,
    actor: Actor,
    ApiPath(version): ApiPath<i32>,
) -> ApiResult<Json<PolicyVersion>> {
    let org_id = actor.current_org()?;
    Ok(Json(activate(&state, &actor, org_id, version, "policy.activated").await?))
}

/// Re-activates the version that was active before the current one.
#[utoipa::path(post, path = "/api/v1/policies/rollback", tag = "policy",
    security(("bearer" = []), ("api_key" = []), ("session_cookie" = [])),
    responses((status = 200, body = PolicyVersion), (status = 409, body = Problem)))]
pub(super) async fn rollback(State(state): State<AppState>, actor: Actor) -> ApiResult<Json<PolicyVersion>> {
    let org_id = actor.current_org()?;
    let previous = sqlx::query_scalar!(
        "select version from policy_version where organization_id = $1 and status = 'inactive' and activated_at is not null
         order by activated_at desc limit 1",
        org_id
    )
    .fetch_optional(state.db())
    .await?
    .ok_or_else(|| ApiError::conflict("nothing_to_roll_back", "No earlier version has been active."))?;
    Ok(Json(activate(&state, &actor, org_id, previous, "policy.rolled_back").await?))
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct DecisionQuery {
    /// `permit` or `deny`.
    pub effect: Option<String>,
    pub actor: Option<String>,
    pub action: Option<String>,
    pub reason: Option<String>,
    #[serde(default, with = "time::serde::rfc3339::option")]
    #[param(value_type = Option<String>)]
    pub since: Option<OffsetDateTime>,
    #[serde(default, with = "time::serde::rfc3339::option")]
    #[param(value_type = Option<String>)]
    pub until: Option<OffsetDateTime>,
    /// The `next_cursor` of the previous page.
    pub cursor: Option<Uuid>,
    /// 1 to 200, default 50.
    pub limit: Option<i64>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct LoggedDecisionView {
    pub decision_id: Uuid,
    pub request_id: Option<String>,
    pub actor_id: String,
    pub action: String,
    pub resource_type: String,
    pub resource_id: String,
    pub effect: String,
    pub reason: String,
    pub policy_version: String,
    pub determining_policies: Vec<String>,
    /// When the decision was made (the first of a folded row's).
    #[serde(with = "time::serde::rfc3339")]
    pub decided_at: OffsetDateTime,
    /// How many identical decisions this row stands for: repeated permits within
    /// `policy.permit_fold_secs` are one row (`request_id` and `decision_id` are the first's).
    /// Always 1 for a deny.
    pub decision_count: i64,
    /// The last of a folded row's decisions; absent when the row stands for one.
    #[serde(with = "time::serde::rfc3339::option", skip_serializing_if = "Option::is_none")]
    pub last_decided_at: Option<OffsetDateTime>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct DecisionPage {
    pub items: Vec<LoggedDecisionView>,
    pub next_cursor: Option<Uuid>,
}

/// The current organization's logged decisions, newest first.
#[utoipa::path(get, path = "/api/v1/audit/decisions", tag = "audit", params(DecisionQuery),
    security(("bearer" = []), ("api_key" = []), ("session_cookie" = [])),
    responses((status = 200, body = DecisionPage), (status = 400, body = Problem), (status = 403, body = Problem)))]
pub(super) async fn list_decisions(
    State(state): State<AppState>,
    actor: Actor,
    ApiQuery(q): ApiQuery<DecisionQuery>,
) -> ApiResult<Json<DecisionPage>> {
    let org_id = actor.current_org()?;
    let limit = pagination::limit(q.limit)?;
    if let Some(e) = &q.effect
        && e != "permit"
        && e != "deny"
    {
        return Err(ApiError::bad_request("invalid_query", "effect must be permit or deny"));
    }
    let rows = sqlx::query!(
        "select decision_id, request_id, actor_id, action, resource_type, resource_id, effect, reason, policy_version,
                determining_policies, decided_at, decision_count, last_decided_at
         from decision_log
         where organization_id = $1
           and ($2::text is null or effect = $2)
           and ($3::text is null or actor_id = $3)
           and ($4::text is null or action = $4)
           and ($5::text is null or reason = $5)
           and ($6::timestamptz is null or decided_at >= $6)
           and ($7::timestamptz is null or decided_at < $7)
           and ($8::uuid is null or decision_id < $8)
         order by decision_id desc limit $9",
        org_id,
        q.effect,
        q.actor,
        q.action,
        q.reason,
        q.since,
        q.until,
        q.cursor,
        limit + 1
    )
    .fetch_all(state.db())
    .await?;
    let items: Vec<LoggedDecisionView> = rows
        .into_iter()
        .map(|r| LoggedDecisionView {
            decision_id: r.decision_id,
            request_id: r.request_id,
            actor_id: r.actor_id,
            action: r.action,
            resource_type: r.resource_type,
            resource_id: r.resource_id,
            effect: r.effect,
            reason: r.reason,
            policy_version: r.policy_version,
            determining_policies: r.determining_policies,
            decided_at: r.decided_at,
            decision_count: r.decision_count,
            last_decided_at: r.last_decided_at,
        })
        .collect();
    let (items, next_cursor) = pagination::page(items, limit, |d| d.decision_id);
    Ok(Json(DecisionPage { items, next_cursor }))
}
