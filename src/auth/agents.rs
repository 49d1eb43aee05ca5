//! The agent registry and agents' client credentials, bulk token revocation, and signing-key
//! rotation by API.

use axum::{Json, extract::State, http::StatusCode};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sqlx::PgConnection;
use time::OffsetDateTime;
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;
use validator::{Validate, ValidationError};

use super::{
    actor::{Actor, Role},
    keys::Rotation,
    revocation::{self, Announced, Subject},
};
use crate::{
    audit::{self, Event},
    crypto, events,
    http::{
        ApiError, ApiResult,
        error::Problem,
        extract::{ApiPath, ApiQuery, ValidatedJson},
        pagination,
    },
    policy::Resource,
    state::AppState,
};

pub const CLIENT_SECRET_PREFIX: &str = "aidp_cs_";
const CLIENT_ID_PREFIX: &str = "aidp_client_";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum AgentStatus {
    Active,
    Suspended,
}

impl AgentStatus {
    fn as_str(self) -> &'static str {
        match self {
            Self::Active => "active",
            Self::Suspended => "suspended",
        }
    }
}

/// Tags and scopes: short, printable, no spaces (a scope list is space-separated on the wire).
fn validate_tags(tags: &[String]) -> Result<(), ValidationError> {
    if tags.len() > 100 {
        return Err(ValidationError::new("length").with_message("at most 100 entries".into()));
    }
    for t in tags {
        let ok = (1..=100).contains(&t.len())
            && t.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b':' | b'.' | b'_' | b'-' | b'/' | b'*'));
        if !ok {
            return Err(ValidationError::new("format").with_message("1 to 100 of [A-Za-z0-9:._-/*]".into()));
        }
    }
    Ok(())
}

fn validate_metadata(v: &Value) -> Result<(), ValidationError> {
    if !v.is_object() {
        return Err(ValidationError::new("type").with_message("must be a JSON object".into()));
    }
    if v.to_string().len() > 16 * 1024 {
        return Err(ValidationError::new("length").with_message("at most 16 KiB".into()));
    }
    Ok(())
}

#[derive(Debug, Deserialize, Validate, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateAgent {
    #[validate(length(min = 1, max = 200))]
    pub name: String,
    #[validate(length(max = 2000))]
    pub description: Option<String>,
    /// A member of the organization; default: the caller. Only admins name someone else.
    pub owner_id: Option<Uuid>,
    #[validate(custom(function = "validate_tags"))]
    pub capabilities: Option<Vec<String>>,
    /// The ceiling for its tokens' scopes.
    #[validate(custom(function = "validate_tags"))]
    pub allowed_scopes: Option<Vec<String>>,
    #[validate(custom(function = "validate_metadata"))]
    pub metadata: Option<Value>,
}

#[derive(Debug, Deserialize, Validate, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateAgent {
    #[validate(length(min = 1, max = 200))]
    pub name: Option<String>,
    #[validate(length(max = 2000))]
    pub description: Option<String>,
    pub owner_id: Option<Uuid>,
    #[validate(custom(function = "validate_tags"))]
    pub capabilities: Option<Vec<String>>,
    #[validate(custom(function = "validate_tags"))]
    pub allowed_scopes: Option<Vec<String>>,
    /// `suspended` makes every live token of the agent fail on its next use.
    pub status: Option<AgentStatus>,
    #[validate(custom(function = "validate_metadata"))]
    pub metadata: Option<Value>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Agent {
    pub id: Uuid,
    pub org_id: Uuid,
    pub name: String,
    pub description: String,
    pub owner_id: Uuid,
    pub capabilities: Vec<String>,
    pub allowed_scopes: Vec<String>,
    pub status: AgentStatus,
    pub metadata: Value,
    /// When the agent was listed in the marketplace; null when it is not.
    #[serde(with = "time::serde::rfc3339::option")]
    pub listed_at: Option<OffsetDateTime>,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub updated_at: OffsetDateTime,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct AgentPage {
    pub items: Vec<Agent>,
    pub next_cursor: Option<Uuid>,
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct AgentQuery {
    /// `active` or `suspended`.
    pub status: Option<AgentStatus>,
    /// Only agents with this capability tag.
    pub capability: Option<String>,
    /// Name contains this text (case-insensitive).
    pub q: Option<String>,
    /// Only agents owned by this user.
    pub owner_id: Option<Uuid>,
    pub after: Option<Uuid>,
    /// 1 to 200, default 50.
    pub limit: Option<i64>,
}

struct AgentRow {
    agent_id: Uuid,
    organization_id: Uuid,
    name: String,
    description: String,
    owner_id: Uuid,
    capabilities: Vec<String>,
    allowed_scopes: Vec<String>,
    status: String,
    metadata: Value,
    created_at: OffsetDateTime,
    updated_at: OffsetDateTime,
    listed_at: Option<OffsetDateTime>,
    #[allow(dead_code)]
    listed_by: Option<Uuid>,
}

/// An agent's `data` in its events.
fn agent_data(row: &AgentRow) -> Value {
    json!({ "agent_id": row.agent_id, "name": row.name, "status": row.status })
}

impl From<AgentRow> for Agent {
    fn from(r: AgentRow) -> Self {
        Self {
            id: r.agent_id,
            org_id: r.organization_id,
            name: r.name,
            description: r.description,
            owner_id: r.owner_id,
            capabilities: r.capabilities,
            allowed_scopes: r.allowed_scopes,
            status: if r.status == "active" { AgentStatus::Active } else { AgentStatus::Suspended },
            metadata: r.metadata,
            listed_at: r.listed_at,
            created_at: r.created_at,
            updated_at: r.updated_at,
        }
    }
}

async fn fetch_agent(conn: &mut PgConnection, org_id: Uuid, id: Uuid, lock: bool) -> ApiResult<AgentRow> {
    let row = if lock {
        sqlx::query_as!(
            AgentRow,
            "select * from agent where agent_id = $1 and organization_id = $2 for update",
            id,
            org_id
        )
        .fetch_optional(&mut *conn)
        .await?
    } else {
        sqlx::query_as!(AgentRow, "select * from agent where agent_id = $1 and organization_id = $2", id, org_id)
            .fetch_optional(&mut *conn)
            .await?
    };
    row.ok_or(ApiError::NotFound)
}

/// The policy decision on a loaded agent (its owner, or an owner/admin of its organization, in the
/// baseline).
fn require_on(state: &AppState, actor: &Actor, action: &str, agent: &AgentRow) -> ApiResult<()> {
    let resource = Resource::Agent { org_id: agent.organization_id, owner_id: Some(agent.owner_id) };
    crate::policy::require(state, actor, action, resource, agent.agent_id)
}

async fn require_member(conn: &mut PgConnection, org_id: Uuid, user_id: Uuid) -> ApiResult<()> {
    let found = sqlx::query_scalar!(
        "select 1 as one from membership where organization_id = $1 and user_id = $2",
        org_id,
        user_id
    )
    .fetch_optional(&mut *conn)
    .await?;
    if found.is_none() {
        return Err(ApiError::field("owner_id", "not_member", "the owner must be a member of the organization"));
    }
    Ok(())
}

/// Kills every live token of `subject` and tells every instance.
async fn revoke_subject(state: &AppState, conn: &mut PgConnection, subject: Subject) -> ApiResult<Announced> {
    let not_before = revocation::revoke_subject(conn, &subject, state.clock().now()).await?;
    Ok(Announced::Subject { subject, not_before })
}

/// Drops an agent's client records from every instance's cache.
async fn forget_clients(state: &AppState, agent_id: Uuid) -> ApiResult<()> {
    let ids = sqlx::query_scalar!("select client_id from agent_credential where agent_id = $1", agent_id)
        .fetch_all(state.db())
        .await?;
    for id in ids {
        forget_client(state, &id).await;
    }
    Ok(())
}

/// Drops one client record from every instance's cache (after a rotation or revocation).
async fn forget_client(state: &AppState, client_id: &str) {
    state.auth().clients.remove(client_id);
    crate::cache::invalidation::publish(state.redis(), "client", client_id).await;
}

/// Registers an agent in the current organization.
#[utoipa::path(post, path = "/api/v1/agents", tag = "agents", request_body = CreateAgent,
    security(("bearer" = []), ("api_key" = []), ("session_cookie" = [])),
    responses((status = 201, body = Agent), (status = 401, body = Problem),
              (status = 403, description = "Not allowed, or `agent_limit_reached`: the plan's max_agents", body = Problem),
              (status = 422, body = Problem)))]
pub(super) async fn create_agent(
    State(state): State<AppState>,
    actor: Actor,
    ValidatedJson(req): ValidatedJson<CreateAgent>,
) -> ApiResult<(StatusCode, Json<Agent>)> {
    let org_id = actor.current_org()?;
    let owner_id = req.owner_id.unwrap_or(actor.user_id());
    if owner_id != actor.user_id() {
        actor.require_role(org_id, Role::Admin)?;
    }
    let mut tx = state.db().begin().await?;
    require_member(&mut tx, org_id, owner_id).await?;
    // The tier row stays locked until commit, so concurrent creations cannot both take the last place.
    let tier = crate::tiers::lock_limits(&state, &mut tx, org_id).await?;
    if let Some(max) = tier.limits.max_agents.max() {
        let agents = count(&mut *tx, org_id).await?;
        if agents >= max {
            return Err(ApiError::Forbidden {
                code: "agent_limit_reached".into(),
                detail: format!(
                    "The {} plan allows {max} agents and the organization has {agents}; delete one or upgrade.",
                    tier.plan
                )
                .into(),
            });
        }
    }
    let id = Uuid::now_v7();
    let row = sqlx::query_as!(
        AgentRow,
        "insert into agent (agent_id, organization_id, name, description, owner_id, capabilities, allowed_scopes, metadata)
         values ($1, $2, $3, $4, $5, $6, $7, $8) returning *",
        id,
        org_id,
        req.name,
        req.description.unwrap_or_default(),
        owner_id,
        &req.capabilities.unwrap_or_default(),
        &req.allowed_scopes.unwrap_or_default(),
        req.metadata.unwrap_or_else(|| json!({}))
    )
    .fetch_one(&mut *tx)
    .await?;
    audit::record(
        &mut tx,
        Event::by(&actor, org_id, "agent.created").target("agent", id).details(json!({ "name": row.name })),
    )
    .await?;
    events::emit(&mut tx, org_id, "agent.created", format!("agents/{id}"), agent_data(&row)).await?;
    tx.commit().await?;
    Ok((StatusCode::CREATED, Json(row.into())))
}

/// How many agents an organization has (against its plan's `max_agents`).
pub async fn count(db: impl sqlx::PgExecutor<'_>, org_id: Uuid) -> Result<u64, sqlx::Error> {
    let n = sqlx::query_scalar!("select count(*) from agent where organization_id = $1", org_id).fetch_one(db).await?;
    Ok(n.unwrap_or(0) as u64)
}

/// An agent as other modules see it: its id, name and status.
#[derive(Debug, Clone)]
pub struct AgentBrief {
    pub id: Uuid,
    pub name: String,
    pub active: bool,
}

/// Every agent of an organization, by name (the city's map and lists).
pub async fn roster(db: impl sqlx::PgExecutor<'_>, org_id: Uuid) -> Result<Vec<AgentBrief>, sqlx::Error> {
    let rows = sqlx::query!(
        "select agent_id, name, status from agent where organization_id = $1 order by name, agent_id",
        org_id
    )
    .fetch_all(db)
    .await?;
    Ok(rows.into_iter().map(|r| AgentBrief { id: r.agent_id, name: r.name, active: r.status == "active" }).collect())
}

/// One agent of an organization, locked for the caller's transaction (placing it); `None` when
/// the organization has no such agent.
pub async fn brief_for_update(
    conn: &mut PgConnection,
    org_id: Uuid,
    id: Uuid,
) -> Result<Option<AgentBrief>, sqlx::Error> {
    let row = sqlx::query!(
        "select agent_id, name, status from agent where agent_id = $1 and organization_id = $2 for update",
        id,
        org_id
    )
    .fetch_optional(&mut *conn)
    .await?;
    Ok(row.map(|r| AgentBrief { id: r.agent_id, name: r.name, active: r.status == "active" }))
}

/// Agents of the current organization, filtered, in pages.
#[utoipa::path(get, path = "/api/v1/agents", tag = "agents", params(AgentQuery),
    security(("bearer" = []), ("api_key" = []), ("session_cookie" = [])),
    responses((status = 200, body = AgentPage), (status = 400, body = Problem), (status = 401, body = Problem)))]
pub(super) async fn list_agents(
    State(state): State<AppState>,
    actor: Actor,
    ApiQuery(q): ApiQuery<AgentQuery>,
) -> ApiResult<Json<AgentPage>> {
    let org_id = actor.current_org()?;
    let limit = pagination::limit(q.limit)?;
    if q.q.as_ref().is_some_and(|s| s.len() > 200) || q.capability.as_ref().is_some_and(|s| s.len() > 100) {
        return Err(ApiError::bad_request("invalid_query", "filters are at most 200 characters"));
    }
    let pattern = q.q.map(|s| format!("%{}%", s.replace('\\', "\\\\").replace('%', "\\%").replace('_', "\\_")));
    let rows = sqlx::query_as!(
        AgentRow,
        "select * from agent
         where organization_id = $1
           and ($2::text is null or status = $2)
           and ($3::text is null or $3 = any(capabilities))
           and ($4::text is null or name ilike $4)
           and ($5::uuid is null or owner_id = $5)
           and ($6::uuid is null or agent_id > $6)
         order by agent_id limit $7",
        org_id,
        q.status.map(|s| s.as_str()),
        q.capability,
        pattern,
        q.owner_id,
        q.after,
        limit + 1
    )
    .fetch_all(state.db())
    .await?;
    let (items, next_cursor) = pagination::page(rows.into_iter().map(Agent::from).collect(), limit, |a: &Agent| a.id);
    Ok(Json(AgentPage { items, next_cursor }))
}

/// One agent of the current organization.
#[utoipa::path(get, path = "/api/v1/agents/{id}", tag = "agents", params(("id" = Uuid, Path)),
    security(("bearer" = []), ("api_key" = []), ("session_cookie" = [])),
    responses((status = 200, body = Agent), (status = 404, body = Problem)))]
pub(super) async fn get_agent(
    State(state): State<AppState>,
    actor: Actor,
    ApiPath(id): ApiPath<Uuid>,
) -> ApiResult<Json<Agent>> {
    let org_id = actor.current_org()?;
    let mut conn = state.db().acquire().await?;
    Ok(Json(fetch_agent(&mut conn, org_id, id, false).await?.into()))
}

/// Updates an agent. Suspending it kills its live tokens; narrowing its scopes applies to new tokens.
#[utoipa::path(patch, path = "/api/v1/agents/{id}", tag = "agents", params(("id" = Uuid, Path)), request_body = UpdateAgent,
    security(("bearer" = []), ("api_key" = []), ("session_cookie" = [])),
    responses((status = 200, body = Agent), (status = 403, body = Problem), (status = 404, body = Problem), (status = 422, body = Problem)))]
pub(super) async fn update_agent(
    State(state): State<AppState>,
    actor: Actor,
    ApiPath(id): ApiPath<Uuid>,
    ValidatedJson(req): ValidatedJson<UpdateAgent>,
) -> ApiResult<Json<Agent>> {
    let org_id = actor.current_org()?;
    let mut tx = state.db().begin().await?;
    let old = fetch_agent(&mut tx, org_id, id, true).await?;
    require_on(&state, &actor, "update", &old)?;
    if let Some(owner) = req.owner_id
        && owner != old.owner_id
    {
        actor.require_role(org_id, Role::Admin)?;
        require_member(&mut tx, org_id, owner).await?;
    }
    let suspending = req.status == Some(AgentStatus::Suspended) && old.status == "active";
    let row = sqlx::query_as!(
        AgentRow,
        "update agent set
            name = coalesce($3, name),
            description = coalesce($4, description),
            owner_id = coalesce($5, owner_id),
            capabilities = coalesce($6, capabilities),
            allowed_scopes = coalesce($7, allowed_scopes),
            status = coalesce($8, status),
            metadata = coalesce($9, metadata)
         where agent_id = $1 and organization_id = $2 returning *",
        id,
        org_id,
        req.name,
        req.description,
        req.owner_id,
        req.capabilities.as_deref(),
        req.allowed_scopes.as_deref(),
        req.status.map(|s| s.as_str()),
        req.metadata
    )
    .fetch_one(&mut *tx)
    .await?;
    let announced = if suspending { Some(revoke_subject(&state, &mut tx, Subject::Agent(id)).await?) } else { None };
    let ending = if suspending {
        let hang = crate::delegation::Hang::Agent { org_id, agent_id: id, reason: "agent_suspended" };
        Some(crate::delegation::end_hanging(&state, &mut tx, hang, Some(&actor)).await?)
    } else {
        None
    };
    let action = match (old.status.as_str(), row.status.as_str()) {
        ("active", "suspended") => "agent.suspended",
        ("suspended", "active") => "agent.activated",
        _ => "agent.updated",
    };
    audit::record(&mut tx, Event::by(&actor, org_id, action).target("agent", id)).await?;
    let event_type = if action == "agent.activated" { "agent.reactivated" } else { action };
    events::emit(&mut tx, org_id, event_type, format!("agents/{id}"), agent_data(&row)).await?;
    tx.commit().await?;
    if let Some(a) = announced {
        revocation::announce(&state, a).await;
        crate::city::forget_agent(&state, org_id, id, "suspended").await;
    }
    if let Some(ending) = ending {
        crate::delegation::finish(&state, ending).await;
    }
    forget_clients(&state, id).await?;
    Ok(Json(row.into()))
}

/// Deletes an agent, its credentials, and (at once) every live token.
#[utoipa::path(delete, path = "/api/v1/agents/{id}", tag = "agents", params(("id" = Uuid, Path)),
    security(("bearer" = []), ("api_key" = []), ("session_cookie" = [])),
    responses((status = 204, description = "Deleted"), (status = 403, body = Problem), (status = 404, body = Problem)))]
pub(super) async fn delete_agent(
    State(state): State<AppState>,
    actor: Actor,
    ApiPath(id): ApiPath<Uuid>,
) -> ApiResult<StatusCode> {
    let org_id = actor.current_org()?;
    let mut tx = state.db().begin().await?;
    let old = fetch_agent(&mut tx, org_id, id, true).await?;
    require_on(&state, &actor, "delete", &old)?;
    // Read before the cascade removes them; dropped from caches only after the commit, so that no
    // request can cache a record of the agent again while it still exists.
    let client_ids = sqlx::query_scalar!("select client_id from agent_credential where agent_id = $1", id)
        .fetch_all(&mut *tx)
        .await?;
    let announced = revoke_subject(&state, &mut tx, Subject::Agent(id)).await?;
    let hang = crate::delegation::Hang::Agent { org_id, agent_id: id, reason: "agent_deleted" };
    let ending = crate::delegation::end_hanging(&state, &mut tx, hang, Some(&actor)).await?;
    sqlx::query!("delete from agent where agent_id = $1", id).execute(&mut *tx).await?;
    audit::record(
        &mut tx,
        Event::by(&actor, org_id, "agent.deleted").target("agent", id).details(json!({ "name": old.name })),
    )
    .await?;
    let data = json!({ "agent_id": id, "name": old.name, "status": "deleted" });
    events::emit(&mut tx, org_id, "agent.deleted", format!("agents/{id}"), data).await?;
    tx.commit().await?;
    revocation::announce(&state, announced).await;
    crate::city::forget_agent(&state, org_id, id, "deleted").await;
    for client_id in client_ids {
        forget_client(&state, &client_id).await;
    }
    crate::delegation::finish(&state, ending).await;
    Ok(StatusCode::NO_CONTENT)
}

/// A new credential: the only time its secret is shown.
#[derive(Debug, Serialize, ToSchema)]
pub struct CreatedCredential {
    pub id: Uuid,
    pub client_id: String,
    pub client_secret: String,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    /// After a rotation: until when the previous secret still works.
    #[serde(with = "time::serde::rfc3339::option")]
    pub previous_secret_expires_at: Option<OffsetDateTime>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct CredentialInfo {
    pub id: Uuid,
    pub client_id: String,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339::option")]
    pub rotated_at: Option<OffsetDateTime>,
    #[serde(with = "time::serde::rfc3339::option")]
    pub previous_secret_expires_at: Option<OffsetDateTime>,
}

/// Issues a client credential for an agent (client_id + secret, the secret shown once).
#[utoipa::path(post, path = "/api/v1/agents/{id}/credentials", tag = "agents", params(("id" = Uuid, Path)),
    security(("bearer" = []), ("api_key" = []), ("session_cookie" = [])),
    responses((status = 201, body = CreatedCredential), (status = 403, body = Problem), (status = 404, body = Problem)))]
pub(super) async fn create_credential(
    State(state): State<AppState>,
    actor: Actor,
    ApiPath(agent_id): ApiPath<Uuid>,
) -> ApiResult<(StatusCode, Json<CreatedCredential>)> {
    let org_id = actor.current_org()?;
    let mut tx = state.db().begin().await?;
    let agent = fetch_agent(&mut tx, org_id, agent_id, false).await?;
    require_on(&state, &actor, "manage", &agent)?;
    let id = Uuid::now_v7();
    let client_id =
        crypto::random_token(CLIENT_ID_PREFIX).chars().take(CLIENT_ID_PREFIX.len() + 22).collect::<String>();
    let secret = crypto::random_token(CLIENT_SECRET_PREFIX);
    let created_at = sqlx::query_scalar!(
        "insert into agent_credential (credential_id, agent_id, organization_id, client_id, secret_hash)
         values ($1, $2, $3, $4, $5) returning created_at",
        id,
        agent_id,
        org_id,
        client_id,
        &crypto::sha256(&secret)[..]
    )
    .fetch_one(&mut *tx)
    .await?;
    audit::record(
        &mut tx,
        Event::by(&actor, org_id, "credential.created")
            .target("credential", id)
            .details(json!({ "agent_id": agent_id, "client_id": client_id })),
    )
    .await?;
    let data = json!({ "credential_id": id, "agent_id": agent_id, "client_id": client_id });
    events::emit(&mut tx, org_id, "credential.created", format!("agents/{agent_id}/credentials/{id}"), data).await?;
    tx.commit().await?;
    Ok((
        StatusCode::CREATED,
        Json(CreatedCredential { id, client_id, client_secret: secret, created_at, previous_secret_expires_at: None }),
    ))
}

/// An agent's live credentials, without secrets.
#[utoipa::path(get, path = "/api/v1/agents/{id}/credentials", tag = "agents", params(("id" = Uuid, Path)),
    security(("bearer" = []), ("api_key" = []), ("session_cookie" = [])),
    responses((status = 200, body = Vec<CredentialInfo>), (status = 404, body = Problem)))]
pub(super) async fn list_credentials(
    State(state): State<AppState>,
    actor: Actor,
    ApiPath(agent_id): ApiPath<Uuid>,
) -> ApiResult<Json<Vec<CredentialInfo>>> {
    let org_id = actor.current_org()?;
    let mut conn = state.db().acquire().await?;
    fetch_agent(&mut conn, org_id, agent_id, false).await?;
    let rows = sqlx::query!(
        "select credential_id, client_id, created_at, rotated_at, previous_expires_at from agent_credential
         where agent_id = $1 and organization_id = $2 and revoked_at is null order by created_at",
        agent_id,
        org_id
    )
    .fetch_all(&mut *conn)
    .await?;
    Ok(Json(
        rows.into_iter()
            .map(|r| CredentialInfo {
                id: r.credential_id,
                client_id: r.client_id,
                created_at: r.created_at,
                rotated_at: r.rotated_at,
                previous_secret_expires_at: r.previous_expires_at,
            })
            .collect(),
    ))
}

async fn fetch_credential(conn: &mut PgConnection, org_id: Uuid, agent_id: Uuid, id: Uuid) -> ApiResult<String> {
    sqlx::query_scalar!(
        "select client_id from agent_credential
         where credential_id = $1 and agent_id = $2 and organization_id = $3 and revoked_at is null for update",
        id,
        agent_id,
        org_id
    )
    .fetch_optional(&mut *conn)
    .await?
    .ok_or(ApiError::NotFound)
}

/// The client_id of a live credential of an agent the caller may `action`, its row locked in `tx`;
/// 404 for anything of another organization.
async fn credential_for(
    state: &AppState,
    actor: &Actor,
    tx: &mut PgConnection,
    (org_id, agent_id, id): (Uuid, Uuid, Uuid),
    action: &str,
) -> ApiResult<String> {
    let agent = fetch_agent(tx, org_id, agent_id, false).await?;
    require_on(state, actor, action, &agent)?;
    fetch_credential(tx, org_id, agent_id, id).await
}

/// Revokes a credential: it can no longer get tokens, and its live tokens die at once.
#[utoipa::path(delete, path = "/api/v1/agents/{id}/credentials/{cred_id}", tag = "agents",
    params(("id" = Uuid, Path), ("cred_id" = Uuid, Path)),
    security(("bearer" = []), ("api_key" = []), ("session_cookie" = [])),
    responses((status = 204, description = "Revoked"), (status = 404, body = Problem)))]
pub(super) async fn revoke_credential(
    State(state): State<AppState>,
    actor: Actor,
    ApiPath((agent_id, id)): ApiPath<(Uuid, Uuid)>,
) -> ApiResult<StatusCode> {
    let org_id = actor.current_org()?;
    let mut tx = state.db().begin().await?;
    let client_id = credential_for(&state, &actor, &mut tx, (org_id, agent_id, id), "manage").await?;
    sqlx::query!("update agent_credential set revoked_at = now() where credential_id = $1", id)
        .execute(&mut *tx)
        .await?;
    let announced = revoke_subject(&state, &mut tx, Subject::Credential(id)).await?;
    audit::record(&mut tx, Event::by(&actor, org_id, "credential.revoked").target("credential", id)).await?;
    let data = json!({ "credential_id": id, "agent_id": agent_id, "client_id": client_id });
    events::emit(&mut tx, org_id, "credential.revoked", format!("agents/{agent_id}/credentials/{id}"), data).await?;
    tx.commit().await?;
    revocation::announce(&state, announced).await;
    forget_client(&state, &client_id).await;
    Ok(StatusCode::NO_CONTENT)
}

/// Issues a new secret; the previous one keeps working for the configured overlap.
#[utoipa::path(post, path = "/api/v1/agents/{id}/credentials/{cred_id}/rotate", tag = "agents",
    params(("id" = Uuid, Path), ("cred_id" = Uuid, Path)),
    security(("bearer" = []), ("api_key" = []), ("session_cookie" = [])),
    responses((status = 200, body = CreatedCredential), (status = 404, body = Problem)))]
pub(super) async fn rotate_credential(
    State(state): State<AppState>,
    actor: Actor,
    ApiPath((agent_id, id)): ApiPath<(Uuid, Uuid)>,
) -> ApiResult<Json<CreatedCredential>> {
    let org_id = actor.current_org()?;
    let mut tx = state.db().begin().await?;
    let client_id = credential_for(&state, &actor, &mut tx, (org_id, agent_id, id), "manage").await?;
    let secret = crypto::random_token(CLIENT_SECRET_PREFIX);
    let overlap = state.config().auth.client_secret_rotation_overlap_secs as f64;
    let r = sqlx::query!(
        "update agent_credential set previous_secret_hash = secret_hash,
                previous_expires_at = now() + make_interval(secs => $2), secret_hash = $3, rotated_at = now()
         where credential_id = $1 returning created_at, previous_expires_at",
        id,
        overlap,
        &crypto::sha256(&secret)[..]
    )
    .fetch_one(&mut *tx)
    .await?;
    audit::record(&mut tx, Event::by(&actor, org_id, "credential.rotated").target("credential", id)).await?;
    let expires = r.previous_expires_at.map(events::rfc3339);
    let data = json!({ "credential_id": id, "agent_id": agent_id, "client_id": client_id, "previous_secret_expires_at": expires });
    events::emit(&mut tx, org_id, "credential.rotated", format!("agents/{agent_id}/credentials/{id}"), data).await?;
    tx.commit().await?;
    forget_client(&state, &client_id).await;
    Ok(Json(CreatedCredential {
        id,
        client_id,
        client_secret: secret,
        created_at: r.created_at,
        previous_secret_expires_at: r.previous_expires_at,
    }))
}

/// What a bulk revocation did.
#[derive(Debug, Serialize, ToSchema)]
pub struct BulkRevocation {
    /// Every token of the subject issued at or before this instant is rejected.
    #[serde(with = "time::serde::rfc3339")]
    pub not_before: OffsetDateTime,
}

async fn bulk(state: &AppState, actor: &Actor, org_id: Uuid, subject: Subject) -> ApiResult<Json<BulkRevocation>> {
    let mut tx = state.db().begin().await?;
    let key = subject.key();
    let announced = revoke_subject(state, &mut tx, subject).await?;
    let Announced::Subject { not_before, .. } = &announced else {
        unreachable!("subject revocations announce subjects")
    };
    let not_before = OffsetDateTime::from_unix_timestamp(*not_before).unwrap_or_else(|_| OffsetDateTime::now_utc());
    audit::record(&mut tx, Event::by(actor, org_id, "tokens.revoked").details(json!({ "subject": key }))).await?;
    let data = json!({ "subject": key, "not_before": events::rfc3339(not_before) });
    events::emit(&mut tx, org_id, "tokens.revoked", format!("tokens/{key}"), data).await?;
    tx.commit().await?;
    revocation::announce(state, announced).await;
    Ok(Json(BulkRevocation { not_before }))
}

/// Revokes every live token of an agent.
#[utoipa::path(post, path = "/api/v1/agents/{id}/revoke-tokens", tag = "agents", params(("id" = Uuid, Path)),
    security(("bearer" = []), ("api_key" = []), ("session_cookie" = [])),
    responses((status = 200, body = BulkRevocation), (status = 404, body = Problem)))]
pub(super) async fn revoke_agent_tokens(
    State(state): State<AppState>,
    actor: Actor,
    ApiPath(id): ApiPath<Uuid>,
) -> ApiResult<Json<BulkRevocation>> {
    let org_id = actor.current_org()?;
    let mut conn = state.db().acquire().await?;
    let agent = fetch_agent(&mut conn, org_id, id, false).await?;
    drop(conn);
    require_on(&state, &actor, "revoke_tokens", &agent)?;
    bulk(&state, &actor, org_id, Subject::Agent(id)).await
}

/// Revokes every live token issued to one credential.
#[utoipa::path(post, path = "/api/v1/agents/{id}/credentials/{cred_id}/revoke-tokens", tag = "agents",
    params(("id" = Uuid, Path), ("cred_id" = Uuid, Path)),
    security(("bearer" = []), ("api_key" = []), ("session_cookie" = [])),
    responses((status = 200, body = BulkRevocation), (status = 404, body = Problem)))]
pub(super) async fn revoke_credential_tokens(
    State(state): State<AppState>,
    actor: Actor,
    ApiPath((agent_id, id)): ApiPath<(Uuid, Uuid)>,
) -> ApiResult<Json<BulkRevocation>> {
    let org_id = actor.current_org()?;
    let mut tx = state.db().begin().await?;
    credential_for(&state, &actor, &mut tx, (org_id, agent_id, id), "revoke_tokens").await?;
    tx.commit().await?;
    bulk(&state, &actor, org_id, Subject::Credential(id)).await
}

/// Revokes every live token of every agent in an organization (owners and admins).
#[utoipa::path(post, path = "/api/v1/organizations/{id}/revoke-tokens", tag = "organizations", params(("id" = Uuid, Path)),
    security(("bearer" = []), ("api_key" = []), ("session_cookie" = [])),
    responses((status = 200, body = BulkRevocation), (status = 403, body = Problem), (status = 404, body = Problem)))]
pub(super) async fn revoke_org_tokens(
    State(state): State<AppState>,
    actor: Actor,
    ApiPath(org_id): ApiPath<Uuid>,
) -> ApiResult<Json<BulkRevocation>> {
    bulk(&state, &actor, org_id, Subject::Org(org_id)).await
}

#[derive(Debug, Serialize, ToSchema)]
pub struct RotatedKey {
    pub kid: String,
    pub algorithm: String,
    /// When the new key starts signing. Until then it is only published in the JWKS.
    #[schema(value_type = String, format = DateTime)]
    #[serde(with = "time::serde::rfc3339")]
    pub activates_at: OffsetDateTime,
    /// Whether the key signs at once, without waiting for relying parties' JWKS caches.
    pub emergency: bool,
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct RotateQuery {
    /// Sign with the new key at once (a compromised key). Relying parties that cached the JWKS
    /// reject the new tokens until they refetch it.
    #[serde(default)]
    pub emergency: bool,
}

/// Rotates the signing key (system admins). The new key is published in the JWKS at once and
/// signs `auth.key_publish_ahead_secs` later, so that relying parties have it before they meet its
/// tokens; with `emergency=true` it signs at once. Retired keys stay in the JWKS until their
/// tokens expire.
#[utoipa::path(post, path = "/api/v1/keys/rotate", tag = "oauth", params(RotateQuery),
    security(("bearer" = []), ("api_key" = []), ("session_cookie" = [])),
    responses((status = 200, body = RotatedKey), (status = 403, body = Problem)))]
pub(super) async fn rotate_keys(
    State(state): State<AppState>,
    _actor: Actor,
    ApiQuery(q): ApiQuery<RotateQuery>,
) -> ApiResult<Json<RotatedKey>> {
    let cfg = state.config();
    let how = if q.emergency { Rotation::Emergency } else { cfg.scheduled_rotation() };
    let rotated = state.keys().rotate(state.db(), cfg.algorithm(), cfg.auth.access_token_ttl_secs, how).await?;
    crate::cache::invalidation::publish(state.redis(), "keys", "").await;
    Ok(Json(RotatedKey {
        kid: rotated.kid,
        algorithm: cfg.algorithm().as_str().to_owned(),
        activates_at: rotated.activates_at,
        emergency: q.emergency,
    }))
}

/// The periodic key step: a published key whose time has come becomes the active one, and when the
/// active key is older than `auth.key_rotation_days` (unless 0) the next one is published.
pub async fn rotate_if_due(state: &AppState) {
    let cfg = state.config();
    let max_age = (cfg.auth.key_rotation_days > 0).then(|| time::Duration::days(cfg.auth.key_rotation_days as i64));
    let ahead = time::Duration::seconds(cfg.auth.key_publish_ahead_secs as i64);
    match state.keys().tick(state.db(), cfg.algorithm(), cfg.auth.access_token_ttl_secs, max_age, ahead).await {
        Ok(Some(r)) => {
            tracing::info!(kid = r.kid, activates_at = %r.activates_at, "next signing key published on schedule");
            crate::cache::invalidation::publish(state.redis(), "keys", "").await;
        }
        Ok(None) => {}
        Err(e) => tracing::warn!(error = %e, "scheduled key rotation failed"),
    }
}

/// What the delegation broker needs to know about an agent of an organization.
pub struct DelegateAgent {
    pub name: String,
    pub active: bool,
    pub allowed_scopes: Vec<String>,
}

/// The agent `id` of `org_id`, for a delegation to it; `None` when it is not one of the org's.
pub async fn for_delegation(
    conn: &mut PgConnection,
    org_id: Uuid,
    id: Uuid,
) -> Result<Option<DelegateAgent>, sqlx::Error> {
    let row = sqlx::query!(
        "select name, status, allowed_scopes from agent where agent_id = $1 and organization_id = $2",
        id,
        org_id
    )
    .fetch_optional(conn)
    .await?;
    Ok(row.map(|r| DelegateAgent { name: r.name, active: r.status == "active", allowed_scopes: r.allowed_scopes }))
}

/// An agent made for one delegation, with its one credential (the secret shown once).
pub struct EphemeralAgent {
    pub agent_id: Uuid,
    pub credential_id: Uuid,
    pub client_id: String,
    pub client_secret: String,
}

/// Registers an ephemeral agent and its credential in the caller's transaction (with its
/// `agent.created` and `credential.created` events), owned by the human at the root of the
/// delegation. It is deleted with [`delete_ephemeral`] when the delegation ends.
pub async fn create_ephemeral(
    conn: &mut PgConnection,
    org_id: Uuid,
    owner_id: Uuid,
    name: &str,
    allowed_scopes: &[String],
    metadata: Value,
) -> Result<EphemeralAgent, sqlx::Error> {
    let agent_id = Uuid::now_v7();
    let row = sqlx::query_as!(
        AgentRow,
        "insert into agent (agent_id, organization_id, name, description, owner_id, allowed_scopes, metadata)
         values ($1, $2, $3, 'ephemeral: made for one delegation', $4, $5, $6) returning *",
        agent_id,
        org_id,
        name,
        owner_id,
        allowed_scopes,
        metadata
    )
    .fetch_one(&mut *conn)
    .await?;
    events::emit(conn, org_id, "agent.created", format!("agents/{agent_id}"), agent_data(&row)).await?;
    let credential_id = Uuid::now_v7();
    let client_id =
        crypto::random_token(CLIENT_ID_PREFIX).chars().take(CLIENT_ID_PREFIX.len() + 22).collect::<String>();
    let client_secret = crypto::random_token(CLIENT_SECRET_PREFIX);
    sqlx::query!(
        "insert into agent_credential (credential_id, agent_id, organization_id, client_id, secret_hash)
         values ($1, $2, $3, $4, $5)",
        credential_id,
        agent_id,
        org_id,
        client_id,
        &crypto::sha256(&client_secret)[..]
    )
    .execute(&mut *conn)
    .await?;
    let data = json!({ "credential_id": credential_id, "agent_id": agent_id, "client_id": client_id });
    events::emit(conn, org_id, "credential.created", format!("agents/{agent_id}/credentials/{credential_id}"), data)
        .await?;
    Ok(EphemeralAgent { agent_id, credential_id, client_id, client_secret })
}

/// Deletes an ephemeral agent with its credentials in the caller's transaction, revoking its
/// tokens; returns the revocation to announce and the client ids to forget, after the commit.
pub async fn delete_ephemeral(
    conn: &mut PgConnection,
    org_id: Uuid,
    agent_id: Uuid,
    now: OffsetDateTime,
) -> Result<Option<(Announced, Vec<String>)>, sqlx::Error> {
    let client_ids = sqlx::query_scalar!("select client_id from agent_credential where agent_id = $1", agent_id)
        .fetch_all(&mut *conn)
        .await?;
    let name = sqlx::query_scalar!(
        "delete from agent where agent_id = $1 and organization_id = $2 returning name",
        agent_id,
        org_id
    )
    .fetch_optional(&mut *conn)
    .await?;
    let Some(name) = name else { return Ok(None) };
    let subject = Subject::Agent(agent_id);
    let not_before = revocation::revoke_subject(conn, &subject, now).await?;
    let data = json!({ "agent_id": agent_id, "name": name, "status": "deleted" });
    events::emit(conn, org_id, "agent.deleted", format!("agents/{agent_id}"), data).await?;
    Ok(Some((Announced::Subject { subject, not_before }, client_ids)))
}

/// Drops client records from every instance's cache (after their agent was deleted).
pub async fn forget_clients_by_id(state: &AppState, client_ids: &[String]) {
    for id in client_ids {
        forget_client(state, id).await;
    }
}
