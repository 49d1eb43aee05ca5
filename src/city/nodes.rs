//! Nodes (`/api/v1/nodes`): the machines agents run on. Admins manage them; each has a node
//! credential (shown once, stored as a SHA-256 hash) with which the machine's node guardian sends
//! heartbeats carrying its metrics and the models it serves.
//!
//! A node is `active` after a heartbeat and `stale` once none came for `city.node_stale_secs`.
//! Each change of status is one UPDATE whose returned row says whether this instance made it, and
//! its `node.active` / `node.stale` event is written in that transaction: however many instances
//! receive heartbeats or sweep, each change is emitted exactly once.

use std::collections::{BTreeMap, HashMap};

use axum::{
    Json,
    body::Bytes,
    extract::State,
    http::{HeaderMap, StatusCode, header},
};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use time::OffsetDateTime;
use utoipa::ToSchema;
use uuid::Uuid;
use validator::Validate;

use crate::{
    audit::{self, Event},
    auth::Actor,
    events,
    http::{
        ApiError, ApiResult,
        error::{Problem, ResultExt},
        extract::{ApiPath, ValidatedJson, parse_json},
    },
    policy::{self, Query, Resource},
    state::AppState,
};

/// The prefix of node credentials, for secret scanners.
pub const NODE_CREDENTIAL_PREFIX: &str = "aidp_node_";

/// An agent assigned to a node, with its own status.
#[derive(Debug, Serialize, ToSchema)]
pub struct NodeAgent {
    pub id: Uuid,
    pub name: String,
    /// `active` while its presence is live, else `stale`.
    pub status: &'static str,
}

/// A model a node serves.
#[derive(Debug, Clone, Serialize, Deserialize, Validate, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Model {
    #[validate(length(min = 1, max = 256))]
    pub name: String,
    pub size_bytes: u64,
    pub loaded: bool,
}

/// One GPU's figures.
#[derive(Debug, Clone, Serialize, Deserialize, Validate, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Gpu {
    #[validate(length(min = 1, max = 200))]
    pub name: String,
    pub memory_total_bytes: u64,
    pub memory_used_bytes: u64,
    #[validate(range(min = 0.0, max = 100.0))]
    pub utilization_percent: f64,
}

/// A node's metrics, as the node guardian reads them.
#[derive(Debug, Clone, Serialize, Deserialize, Validate, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Metrics {
    /// Busy share of all CPUs since the previous reading.
    #[validate(range(min = 0.0, max = 100.0))]
    pub cpu_percent: f64,
    #[validate(range(min = 1, max = 65536))]
    pub cpu_count: u32,
    #[validate(range(min = 0.0, max = 1000000.0))]
    pub load_1: f64,
    #[validate(range(min = 0.0, max = 1000000.0))]
    pub load_5: f64,
    #[validate(range(min = 0.0, max = 1000000.0))]
    pub load_15: f64,
    pub memory_total_bytes: u64,
    pub memory_used_bytes: u64,
    pub disk_total_bytes: u64,
    pub disk_used_bytes: u64,
    #[serde(default)]
    #[validate(length(max = 64), nested)]
    pub gpus: Vec<Gpu>,
}

/// A heartbeat: the node's metrics and the models it serves.
#[derive(Debug, Deserialize, Validate, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Heartbeat {
    #[validate(nested)]
    pub metrics: Metrics,
    #[serde(default)]
    #[validate(length(max = 1000), nested)]
    pub models: Vec<Model>,
}

/// A node.
#[derive(Debug, Serialize, ToSchema)]
pub struct Node {
    pub id: Uuid,
    pub name: String,
    pub hostname: String,
    pub labels: BTreeMap<String, String>,
    /// `new` (never heard from), `active`, or `stale` (no heartbeat within `city.node_stale_secs`).
    pub status: String,
    #[serde(with = "time::serde::rfc3339::option")]
    pub last_heartbeat_at: Option<OffsetDateTime>,
    /// The latest heartbeat's metrics.
    pub metrics: Option<Metrics>,
    pub models: Vec<Model>,
    pub agents: Vec<NodeAgent>,
    /// The start of its credential, to tell credentials apart.
    pub credential_prefix: String,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub updated_at: OffsetDateTime,
}

/// A new node: the only time its credential is shown.
#[derive(Debug, Serialize, ToSchema)]
pub struct CreatedNode {
    #[serde(flatten)]
    pub node: Node,
    /// `aidp_node_...`: give it to the node guardian (environment or file).
    pub credential: String,
}

/// A rotated credential: the only time it is shown. The previous one stops working at once.
#[derive(Debug, Serialize, ToSchema)]
pub struct RotatedCredential {
    pub credential: String,
    pub credential_prefix: String,
}

fn validate_labels(labels: &BTreeMap<String, String>) -> Result<(), validator::ValidationError> {
    let ok = labels.len() <= 50
        && labels.iter().all(|(k, v)| {
            (1..=63).contains(&k.len())
                && k.bytes().all(|c| c.is_ascii_alphanumeric() || b"-_./".contains(&c))
                && v.len() <= 256
                && !v.chars().any(char::is_control)
        });
    if ok {
        Ok(())
    } else {
        Err(validator::ValidationError::new("labels")
            .with_message("at most 50; keys of letters, digits and -_./ (1-63), values up to 256".into()))
    }
}

fn validate_hostname(h: &str) -> Result<(), validator::ValidationError> {
    let ok = (1..=253).contains(&h.len()) && h.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'.');
    if ok { Ok(()) } else { Err(validator::ValidationError::new("hostname").with_message("a host name".into())) }
}

#[derive(Debug, Deserialize, Validate, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateNode {
    #[validate(length(min = 1, max = 200))]
    pub name: String,
    #[validate(custom(function = "validate_hostname"))]
    pub hostname: String,
    #[serde(default)]
    #[validate(custom(function = "validate_labels"))]
    pub labels: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize, Validate, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateNode {
    #[validate(length(min = 1, max = 200))]
    pub name: Option<String>,
    #[validate(custom(function = "validate_hostname"))]
    pub hostname: Option<String>,
    #[validate(custom(function = "validate_labels"))]
    pub labels: Option<BTreeMap<String, String>>,
}

struct NodeRow {
    node_id: Uuid,
    name: String,
    hostname: String,
    labels: Value,
    status: String,
    last_heartbeat_at: Option<OffsetDateTime>,
    metrics: Option<Value>,
    models: Value,
    credential_prefix: String,
    created_at: OffsetDateTime,
    updated_at: OffsetDateTime,
}

fn name_taken() -> ApiError {
    ApiError::Conflict { code: "node_name_taken", detail: "A node of that name exists in this organization.".into() }
}

/// A node's rows made into what the API shows, with its agents' status from live presence.
async fn present(state: &AppState, org_id: Uuid, rows: Vec<NodeRow>) -> ApiResult<Vec<Node>> {
    let ids: Vec<Uuid> = rows.iter().map(|r| r.node_id).collect();
    let roster: HashMap<Uuid, crate::auth::agents::AgentBrief> =
        crate::auth::agents::roster(state.db(), org_id).await?.into_iter().map(|a| (a.id, a)).collect();
    let assigned = sqlx::query!(
        "select agent_id, node_id as \"node_id!\" from agent_placement where organization_id = $1 and node_id = any($2)",
        org_id,
        &ids
    )
    .fetch_all(state.db())
    .await?;
    let agent_ids: Vec<Uuid> = assigned.iter().map(|a| a.agent_id).collect();
    // Without Redis an agent's presence is unknown: shown as stale, the node itself still served.
    let live = super::presence::read(state, org_id, &agent_ids).await.unwrap_or_default();
    let mut by_node: HashMap<Uuid, Vec<NodeAgent>> = HashMap::new();
    for a in assigned {
        let Some(brief) = roster.get(&a.agent_id).filter(|b| b.active) else { continue };
        let status = if live.contains_key(&a.agent_id) { "active" } else { "stale" };
        by_node.entry(a.node_id).or_default().push(NodeAgent { id: a.agent_id, name: brief.name.clone(), status });
    }
    let stale_before = OffsetDateTime::now_utc() - time::Duration::seconds(state.config().city.node_stale_secs as i64);
    Ok(rows
        .into_iter()
        .map(|r| {
            // The sweeper may not have run yet: a lapsed heartbeat reads as stale at once.
            let status = match (r.status.as_str(), r.last_heartbeat_at) {
                ("active", Some(t)) if t < stale_before => "stale".to_owned(),
                _ => r.status,
            };
            Node {
                agents: by_node.remove(&r.node_id).unwrap_or_default(),
                id: r.node_id,
                name: r.name,
                hostname: r.hostname,
                labels: serde_json::from_value(r.labels).unwrap_or_default(),
                status,
                last_heartbeat_at: r.last_heartbeat_at,
                metrics: r.metrics.and_then(|m| serde_json::from_value(m).ok()),
                models: serde_json::from_value(r.models).unwrap_or_default(),
                credential_prefix: r.credential_prefix,
                created_at: r.created_at,
                updated_at: r.updated_at,
            }
        })
        .collect())
}

async fn load(state: &AppState, org_id: Uuid, id: Option<Uuid>) -> ApiResult<Vec<Node>> {
    let rows = sqlx::query_as!(
        NodeRow,
        "select node_id, name, hostname, labels, status, last_heartbeat_at, metrics, models, credential_prefix,
                created_at, updated_at
         from node where organization_id = $1 and ($2::uuid is null or node_id = $2) order by name, node_id",
        org_id,
        id
    )
    .fetch_all(state.db())
    .await?;
    present(state, org_id, rows).await
}

fn new_credential() -> (String, [u8; 32], String) {
    let secret = crate::crypto::random_token(NODE_CREDENTIAL_PREFIX);
    let hash = crate::crypto::sha256(&secret);
    let prefix = secret.chars().take(NODE_CREDENTIAL_PREFIX.len() + 6).collect();
    (secret, hash, prefix)
}

/// The organization's nodes, with status, latest metrics, models and assigned agents.
#[utoipa::path(get, path = "/api/v1/nodes", tag = "nodes",
    security(("bearer" = []), ("api_key" = []), ("session_cookie" = [])),
    responses((status = 200, body = Vec<Node>), (status = 401, body = Problem), (status = 403, body = Problem)))]
pub(super) async fn list_nodes(State(state): State<AppState>, actor: Actor) -> ApiResult<Json<Vec<Node>>> {
    let org_id = actor.current_org()?;
    Ok(Json(load(&state, org_id, None).await?))
}

/// Registers a node; its credential is shown once.
#[utoipa::path(post, path = "/api/v1/nodes", tag = "nodes", request_body = CreateNode,
    security(("bearer" = []), ("api_key" = []), ("session_cookie" = [])),
    responses((status = 201, body = CreatedNode), (status = 403, body = Problem), (status = 409, body = Problem), (status = 422, body = Problem)))]
pub(super) async fn create_node(
    State(state): State<AppState>,
    actor: Actor,
    ValidatedJson(req): ValidatedJson<CreateNode>,
) -> ApiResult<(StatusCode, Json<CreatedNode>)> {
    let org_id = actor.current_org()?;
    let (secret, hash, prefix) = new_credential();
    let id = Uuid::now_v7();
    let mut tx = state.db().begin().await?;
    sqlx::query!(
        "insert into node (node_id, organization_id, name, hostname, labels, credential_hash, credential_prefix)
         values ($1, $2, $3, $4, $5, $6, $7)",
        id,
        org_id,
        req.name,
        req.hostname,
        json!(req.labels),
        &hash[..],
        prefix
    )
    .execute(&mut *tx)
    .await
    .on_constraint("node_name_unique", name_taken)?;
    audit::record(
        &mut tx,
        Event::by(&actor, org_id, "node.created").target("node", id).details(json!({ "name": req.name })),
    )
    .await?;
    tx.commit().await?;
    let node = load(&state, org_id, Some(id)).await?.pop().ok_or(ApiError::NotFound)?;
    Ok((StatusCode::CREATED, Json(CreatedNode { node, credential: secret })))
}

/// One node.
#[utoipa::path(get, path = "/api/v1/nodes/{id}", tag = "nodes", params(("id" = Uuid, Path)),
    security(("bearer" = []), ("api_key" = []), ("session_cookie" = [])),
    responses((status = 200, body = Node), (status = 404, body = Problem)))]
pub(super) async fn get_node(
    State(state): State<AppState>,
    actor: Actor,
    ApiPath(id): ApiPath<Uuid>,
) -> ApiResult<Json<Node>> {
    let org_id = actor.current_org()?;
    Ok(Json(load(&state, org_id, Some(id)).await?.pop().ok_or(ApiError::NotFound)?))
}

/// Renames a node or changes its host name or labels.
#[utoipa::path(patch, path = "/api/v1/nodes/{id}", tag = "nodes", params(("id" = Uuid, Path)), request_body = UpdateNode,
    security(("bearer" = []), ("api_key" = []), ("session_cookie" = [])),
    responses((status = 200, body = Node), (status = 404, body = Problem), (status = 409, body = Problem), (status = 422, body = Problem)))]
pub(super) async fn update_node(
    State(state): State<AppState>,
    actor: Actor,
    ApiPath(id): ApiPath<Uuid>,
    ValidatedJson(req): ValidatedJson<UpdateNode>,
) -> ApiResult<Json<Node>> {
    let org_id = actor.current_org()?;
    let done = sqlx::query!(
        "update node set name = coalesce($3, name), hostname = coalesce($4, hostname), labels = coalesce($5, labels)
         where node_id = $1 and organization_id = $2",
        id,
        org_id,
        req.name,
        req.hostname,
        req.labels.map(|l| json!(l))
    )
    .execute(state.db())
    .await
    .on_constraint("node_name_unique", name_taken)?;
    if done.rows_affected() == 0 {
        return Err(ApiError::NotFound);
    }
    Ok(Json(load(&state, org_id, Some(id)).await?.pop().ok_or(ApiError::NotFound)?))
}

/// Deletes a node; its credential stops working and its agents are unassigned.
#[utoipa::path(delete, path = "/api/v1/nodes/{id}", tag = "nodes", params(("id" = Uuid, Path)),
    security(("bearer" = []), ("api_key" = []), ("session_cookie" = [])),
    responses((status = 204, description = "Deleted"), (status = 404, body = Problem)))]
pub(super) async fn delete_node(
    State(state): State<AppState>,
    actor: Actor,
    ApiPath(id): ApiPath<Uuid>,
) -> ApiResult<StatusCode> {
    let org_id = actor.current_org()?;
    let mut tx = state.db().begin().await?;
    let done = sqlx::query!("delete from node where node_id = $1 and organization_id = $2", id, org_id)
        .execute(&mut *tx)
        .await?;
    if done.rows_affected() == 0 {
        return Err(ApiError::NotFound);
    }
    audit::record(&mut tx, Event::by(&actor, org_id, "node.deleted").target("node", id)).await?;
    tx.commit().await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Replaces a node's credential; the previous one stops working at once.
#[utoipa::path(post, path = "/api/v1/nodes/{id}/rotate-credential", tag = "nodes", params(("id" = Uuid, Path)),
    security(("bearer" = []), ("api_key" = []), ("session_cookie" = [])),
    responses((status = 200, body = RotatedCredential), (status = 404, body = Problem)))]
pub(super) async fn rotate_node_credential(
    State(state): State<AppState>,
    actor: Actor,
    ApiPath(id): ApiPath<Uuid>,
) -> ApiResult<Json<RotatedCredential>> {
    let org_id = actor.current_org()?;
    let (secret, hash, prefix) = new_credential();
    let mut tx = state.db().begin().await?;
    let done = sqlx::query!(
        "update node set credential_hash = $3, credential_prefix = $4 where node_id = $1 and organization_id = $2",
        id,
        org_id,
        &hash[..],
        prefix
    )
    .execute(&mut *tx)
    .await?;
    if done.rows_affected() == 0 {
        return Err(ApiError::NotFound);
    }
    audit::record(&mut tx, Event::by(&actor, org_id, "node.credential_rotated").target("node", id)).await?;
    tx.commit().await?;
    Ok(Json(RotatedCredential { credential: secret, credential_prefix: prefix }))
}

/// What a heartbeat did.
#[derive(Debug, Serialize, ToSchema)]
pub struct HeartbeatAck {
    pub status: &'static str,
    /// Send the next heartbeat well within this many seconds.
    pub stale_after_secs: u64,
}

fn node_unauthorized(detail: &'static str) -> ApiError {
    ApiError::Unauthorized { detail: detail.into(), challenge: "Bearer error=\"invalid_token\"" }
}

/// A node's heartbeat, sent with its own node credential (`Authorization: Bearer aidp_node_...`):
/// its metrics and the models it serves. A credential heartbeats only its own node.
#[utoipa::path(post, path = "/api/v1/nodes/{id}/heartbeat", tag = "nodes", params(("id" = Uuid, Path)), request_body = Heartbeat,
    security(("node_credential" = [])),
    responses((status = 200, body = HeartbeatAck), (status = 401, body = Problem),
              (status = 403, description = "The credential is another node's", body = Problem),
              (status = 413, body = Problem), (status = 422, body = Problem)))]
pub(super) async fn heartbeat(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<Uuid>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult<Json<HeartbeatAck>> {
    let secret = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.get(..7).filter(|p| p.eq_ignore_ascii_case("bearer ")).map(|_| v[7..].trim()))
        .ok_or_else(|| {
            ApiError::unauthorized("A node credential is required (Authorization: Bearer aidp_node_...).")
        })?;
    if !secret.starts_with(NODE_CREDENTIAL_PREFIX) || secret.len() > 128 {
        return Err(node_unauthorized("The node credential is invalid."));
    }
    let hash = crate::crypto::sha256(secret);
    let owner = sqlx::query!("select node_id, organization_id from node where credential_hash = $1", &hash[..])
        .fetch_optional(state.db())
        .await?
        .ok_or_else(|| node_unauthorized("The node credential is invalid."))?;
    let query = Query {
        actor_id: format!("node:{}", owner.node_id),
        actor_type: "node".into(),
        system_admin: false,
        org_role: "node".into(),
        scopes: None,
        required_scope: String::new(),
        action: "heartbeat".into(),
        resource: Resource::Node { org_id: owner.organization_id },
        resource_id: format!("node:{id}"),
        validate: false,
        budget_exceeded: false,
    };
    policy::enforce(&state, &query)?;
    let beat: Heartbeat = parse_json(&body)?;
    beat.validate()?;
    let org_id = owner.organization_id;
    let mut tx = state.db().begin().await?;
    let row = sqlx::query!(
        "with old as (select node_id, status from node where node_id = $1 for update)
         update node n set last_heartbeat_at = now(), metrics = $2, models = $3, status = 'active'
         from old where n.node_id = old.node_id
         returning old.status as previous, n.name, n.hostname",
        id,
        json!(beat.metrics),
        json!(beat.models)
    )
    .fetch_optional(&mut *tx)
    .await?
    .ok_or(ApiError::NotFound)?;
    let became_active = row.previous != "active";
    if became_active {
        let data = json!({ "node_id": id, "name": row.name, "hostname": row.hostname });
        events::emit(&mut tx, org_id, "node.active", format!("nodes/{id}"), data).await?;
    }
    tx.commit().await?;
    if became_active {
        super::feed::emit(&state, org_id, "node", &json!({ "node_id": id, "name": row.name, "status": "active" }))
            .await;
    }
    Ok(Json(HeartbeatAck { status: "active", stale_after_secs: state.config().city.node_stale_secs }))
}

/// Marks the nodes whose heartbeats stopped as stale, each once, with its `node.stale` event.
pub async fn sweep_stale(state: &AppState) -> anyhow::Result<usize> {
    let mut tx = state.db().begin().await?;
    let stale = sqlx::query!(
        "update node set status = 'stale'
         where status = 'active' and last_heartbeat_at < now() - make_interval(secs => $1)
         returning node_id, organization_id, name, hostname",
        state.config().city.node_stale_secs as f64
    )
    .fetch_all(&mut *tx)
    .await?;
    for n in &stale {
        let data = json!({ "node_id": n.node_id, "name": n.name, "hostname": n.hostname });
        events::emit(&mut tx, n.organization_id, "node.stale", format!("nodes/{}", n.node_id), data).await?;
    }
    tx.commit().await?;
    for n in &stale {
        let data = json!({ "node_id": n.node_id, "name": n.name, "status": "stale" });
        super::feed::emit(state, n.organization_id, "node", &data).await;
    }
    Ok(stale.len())
}
