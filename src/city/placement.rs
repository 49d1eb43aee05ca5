//! Placement: an agent in at most one room (`PUT /api/v1/agents/{id}/room`) and on at most one
//! node (`PUT /api/v1/agents/{id}/node`). A room's capacity holds under concurrency: placing
//! locks the room's row, so placements into one room are counted one at a time.

use axum::{Json, extract::State, http::StatusCode};
use serde::{Deserialize, Serialize};
use serde_json::json;
use time::OffsetDateTime;
use utoipa::ToSchema;
use uuid::Uuid;

use crate::{
    auth::{Actor, agents},
    http::{
        ApiError, ApiResult,
        error::{Problem, ResultExt},
        extract::{ApiJson, ApiPath},
    },
    state::AppState,
};

/// Where an agent is.
#[derive(Debug, Serialize, ToSchema)]
pub struct Placement {
    pub agent_id: Uuid,
    pub room_id: Option<Uuid>,
    pub node_id: Option<Uuid>,
    #[serde(with = "time::serde::rfc3339::option")]
    pub last_seen_at: Option<OffsetDateTime>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PlaceInRoom {
    pub room_id: Uuid,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PlaceOnNode {
    pub node_id: Uuid,
}

/// Tells viewers an agent moved (`room_id` null: unplaced).
pub(super) async fn announce_move(
    state: &AppState,
    org_id: Uuid,
    agent_id: Uuid,
    from: Option<Uuid>,
    to: Option<Uuid>,
) {
    let data = json!({ "agent_id": agent_id, "from_room_id": from, "room_id": to });
    super::feed::emit(state, org_id, "moved", &data).await;
}

/// Locks the agent of the organization, or 404.
async fn lock_agent(conn: &mut sqlx::PgConnection, org_id: Uuid, id: Uuid) -> ApiResult<()> {
    agents::brief_for_update(conn, org_id, id).await?.ok_or(ApiError::NotFound)?;
    Ok(())
}

/// Places an agent in a room of its organization (moving it out of any other).
#[utoipa::path(put, path = "/api/v1/agents/{id}/room", tag = "city", params(("id" = Uuid, Path)), request_body = PlaceInRoom,
    security(("bearer" = []), ("api_key" = []), ("session_cookie" = [])),
    responses((status = 200, body = Placement), (status = 404, body = Problem),
              (status = 409, description = "The room is full", body = Problem), (status = 422, body = Problem)))]
pub(super) async fn place_in_room(
    State(state): State<AppState>,
    actor: Actor,
    ApiPath(id): ApiPath<Uuid>,
    ApiJson(req): ApiJson<PlaceInRoom>,
) -> ApiResult<Json<Placement>> {
    let org_id = actor.current_org()?;
    let mut tx = state.db().begin().await?;
    lock_agent(&mut tx, org_id, id).await?;
    let room = sqlx::query!(
        "select capacity from room where room_id = $1 and organization_id = $2 for update",
        req.room_id,
        org_id
    )
    .fetch_optional(&mut *tx)
    .await?
    .ok_or_else(|| ApiError::field("room_id", "not_found", "no such room in this organization"))?;
    let previous = sqlx::query_scalar!("select room_id from agent_placement where agent_id = $1", id)
        .fetch_optional(&mut *tx)
        .await?
        .flatten();
    if previous != Some(req.room_id) {
        let taken = sqlx::query_scalar!(
            "select count(*) from agent_placement where room_id = $1 and agent_id <> $2",
            req.room_id,
            id
        )
        .fetch_one(&mut *tx)
        .await?
        .unwrap_or(0);
        if taken >= room.capacity as i64 {
            return Err(ApiError::Conflict {
                code: "room_full",
                detail: format!("The room holds {} agents and is full.", room.capacity).into(),
            });
        }
    }
    let placed = sqlx::query_as!(
        Placement,
        "insert into agent_placement (agent_id, organization_id, room_id) values ($1, $2, $3)
         on conflict (agent_id) do update set room_id = excluded.room_id
         returning agent_id, room_id, node_id, last_seen_at",
        id,
        org_id,
        req.room_id
    )
    .fetch_one(&mut *tx)
    .await?;
    tx.commit().await?;
    if previous != Some(req.room_id) {
        announce_move(&state, org_id, id, previous, Some(req.room_id)).await;
    }
    Ok(Json(placed))
}

/// Takes an agent out of its room.
#[utoipa::path(delete, path = "/api/v1/agents/{id}/room", tag = "city", params(("id" = Uuid, Path)),
    security(("bearer" = []), ("api_key" = []), ("session_cookie" = [])),
    responses((status = 204, description = "Unplaced (or was in no room)"), (status = 404, body = Problem)))]
pub(super) async fn unplace_from_room(
    State(state): State<AppState>,
    actor: Actor,
    ApiPath(id): ApiPath<Uuid>,
) -> ApiResult<StatusCode> {
    let org_id = actor.current_org()?;
    let mut tx = state.db().begin().await?;
    lock_agent(&mut tx, org_id, id).await?;
    let previous = sqlx::query_scalar!("select room_id from agent_placement where agent_id = $1", id)
        .fetch_optional(&mut *tx)
        .await?
        .flatten();
    sqlx::query!("update agent_placement set room_id = null where agent_id = $1", id).execute(&mut *tx).await?;
    tx.commit().await?;
    if previous.is_some() {
        announce_move(&state, org_id, id, previous, None).await;
    }
    Ok(StatusCode::NO_CONTENT)
}

/// Assigns an agent to a node of its organization.
#[utoipa::path(put, path = "/api/v1/agents/{id}/node", tag = "city", params(("id" = Uuid, Path)), request_body = PlaceOnNode,
    security(("bearer" = []), ("api_key" = []), ("session_cookie" = [])),
    responses((status = 200, body = Placement), (status = 404, body = Problem), (status = 422, body = Problem)))]
pub(super) async fn place_on_node(
    State(state): State<AppState>,
    actor: Actor,
    ApiPath(id): ApiPath<Uuid>,
    ApiJson(req): ApiJson<PlaceOnNode>,
) -> ApiResult<Json<Placement>> {
    let org_id = actor.current_org()?;
    let mut tx = state.db().begin().await?;
    lock_agent(&mut tx, org_id, id).await?;
    let placed = sqlx::query_as!(
        Placement,
        "insert into agent_placement (agent_id, organization_id, node_id) values ($1, $2, $3)
         on conflict (agent_id) do update set node_id = excluded.node_id
         returning agent_id, room_id, node_id, last_seen_at",
        id,
        org_id,
        req.node_id
    )
    .fetch_one(&mut *tx)
    .await
    .on_constraint("agent_placement_node_fk", || {
        ApiError::field("node_id", "not_found", "no such node in this organization")
    })?;
    tx.commit().await?;
    Ok(Json(placed))
}

/// Takes an agent off its node.
#[utoipa::path(delete, path = "/api/v1/agents/{id}/node", tag = "city", params(("id" = Uuid, Path)),
    security(("bearer" = []), ("api_key" = []), ("session_cookie" = [])),
    responses((status = 204, description = "Unassigned (or was on no node)"), (status = 404, body = Problem)))]
pub(super) async fn unplace_from_node(
    State(state): State<AppState>,
    actor: Actor,
    ApiPath(id): ApiPath<Uuid>,
) -> ApiResult<StatusCode> {
    let org_id = actor.current_org()?;
    let mut tx = state.db().begin().await?;
    lock_agent(&mut tx, org_id, id).await?;
    sqlx::query!("update agent_placement set node_id = null where agent_id = $1", id).execute(&mut *tx).await?;
    tx.commit().await?;
    Ok(StatusCode::NO_CONTENT)
}
