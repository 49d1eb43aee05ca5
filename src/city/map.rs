//! Zones and rooms (`/api/v1/city/zones`, `/api/v1/city/rooms`): owners and admins edit them,
//! members read them. Rooms sit on an integer grid and never overlap within a zone; Postgres
//! enforces it (an exclusion constraint), so two concurrent creations cannot both win.

use axum::{Json, extract::State, http::StatusCode};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use utoipa::ToSchema;
use uuid::Uuid;
use validator::Validate;

use crate::{
    auth::{Actor, slugify, valid_slug},
    http::{
        ApiError, ApiResult,
        error::{FieldError, Problem, ResultExt},
        extract::{ApiPath, ValidatedJson},
    },
    state::AppState,
};

/// A zone: a district of the city holding rooms.
#[derive(Debug, Serialize, ToSchema)]
pub struct Zone {
    pub id: Uuid,
    pub name: String,
    pub slug: String,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub updated_at: OffsetDateTime,
}

#[derive(Debug, Deserialize, Validate, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateZone {
    #[validate(length(min = 1, max = 200))]
    pub name: String,
    /// Lowercase letters, digits and dashes, 3 to 63; derived from the name when absent.
    pub slug: Option<String>,
}

#[derive(Debug, Deserialize, Validate, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateZone {
    #[validate(length(min = 1, max = 200))]
    pub name: Option<String>,
    pub slug: Option<String>,
}

/// A room on the map: a rectangle `{x, y, width, height}` of grid cells in its zone.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Room {
    pub id: Uuid,
    pub zone_id: Uuid,
    pub name: String,
    pub slug: String,
    /// `workspace`, `lobby`, `lab`, or another lowercase word.
    pub kind: String,
    /// How many agents may be placed in it.
    pub capacity: i32,
    pub x: i32,
    pub y: i32,
    pub width: i32,
    pub height: i32,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub updated_at: OffsetDateTime,
}

#[derive(Debug, Deserialize, Validate, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateRoom {
    pub zone_id: Uuid,
    #[validate(length(min = 1, max = 200))]
    pub name: String,
    pub slug: Option<String>,
    #[validate(custom(function = "validate_kind"))]
    pub kind: String,
    #[validate(range(min = 1, max = 100000))]
    pub capacity: i32,
    #[validate(range(min = 0, max = 10000))]
    pub x: i32,
    #[validate(range(min = 0, max = 10000))]
    pub y: i32,
    #[validate(range(min = 1, max = 1000))]
    pub width: i32,
    #[validate(range(min = 1, max = 1000))]
    pub height: i32,
}

#[derive(Debug, Deserialize, Validate, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateRoom {
    #[validate(length(min = 1, max = 200))]
    pub name: Option<String>,
    pub slug: Option<String>,
    #[validate(custom(function = "validate_kind"))]
    pub kind: Option<String>,
    #[validate(range(min = 1, max = 100000))]
    pub capacity: Option<i32>,
    #[validate(range(min = 0, max = 10000))]
    pub x: Option<i32>,
    #[validate(range(min = 0, max = 10000))]
    pub y: Option<i32>,
    #[validate(range(min = 1, max = 1000))]
    pub width: Option<i32>,
    #[validate(range(min = 1, max = 1000))]
    pub height: Option<i32>,
}

fn validate_kind(kind: &str) -> Result<(), validator::ValidationError> {
    let b = kind.as_bytes();
    let ok = (1..=32).contains(&b.len())
        && b[0].is_ascii_lowercase()
        && b.iter().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'_');
    if ok {
        Ok(())
    } else {
        Err(validator::ValidationError::new("kind").with_message("a lowercase word, e.g. `lab`".into()))
    }
}

fn slug_of(given: Option<String>, name: &str) -> ApiResult<String> {
    match given {
        Some(s) if valid_slug(&s) => Ok(s),
        Some(_) => Err(ApiError::field("slug", "slug", "3 to 63 lowercase letters, digits and dashes")),
        None => Ok(slugify(name)),
    }
}

fn taken() -> ApiError {
    ApiError::Conflict { code: "slug_taken", detail: "That slug is taken in this organization.".into() }
}

/// The 422 for a room that would overlap another, naming it.
async fn overlap(
    state: &AppState,
    org_id: Uuid,
    zone_id: Uuid,
    this: Option<Uuid>,
    (x, y, w, h): (i32, i32, i32, i32),
) -> ApiError {
    let other = sqlx::query!(
        "select room_id, name from room
         where organization_id = $1 and zone_id = $2 and room_id is distinct from $3
           and int4range(x, x + width) && int4range($4::int, $4::int + $6::int) and int4range(y, y + height) && int4range($5::int, $5::int + $7::int)
         limit 1",
        org_id,
        zone_id,
        this,
        x,
        y,
        w,
        h
    )
    .fetch_optional(state.db())
    .await;
    let (detail, message) = match other {
        Ok(Some(r)) => (
            format!("The room overlaps room \"{}\" ({}).", r.name, r.room_id),
            format!("overlaps room \"{}\" ({})", r.name, r.room_id),
        ),
        _ => ("The room overlaps another room of its zone.".to_owned(), "overlaps another room".to_owned()),
    };
    ApiError::Invalid {
        status: StatusCode::UNPROCESSABLE_ENTITY,
        code: "room_overlap",
        detail: detail.into(),
        errors: vec![FieldError { field: "x".into(), code: "overlap".into(), message }],
    }
}

fn zone_missing() -> ApiError {
    ApiError::field("zone_id", "not_found", "no such zone in this organization")
}

/// The zones of the organization.
#[utoipa::path(get, path = "/api/v1/city/zones", tag = "city",
    security(("bearer" = []), ("api_key" = []), ("session_cookie" = [])),
    responses((status = 200, body = Vec<Zone>), (status = 401, body = Problem), (status = 403, body = Problem)))]
pub(super) async fn list_zones(State(state): State<AppState>, actor: Actor) -> ApiResult<Json<Vec<Zone>>> {
    let org_id = actor.current_org()?;
    let zones = sqlx::query_as!(
        Zone,
        "select zone_id as id, name, slug, created_at, updated_at from zone where organization_id = $1 order by name, zone_id",
        org_id
    )
    .fetch_all(state.db())
    .await?;
    Ok(Json(zones))
}

/// Creates a zone.
#[utoipa::path(post, path = "/api/v1/city/zones", tag = "city", request_body = CreateZone,
    security(("bearer" = []), ("api_key" = []), ("session_cookie" = [])),
    responses((status = 201, body = Zone), (status = 403, body = Problem), (status = 409, body = Problem), (status = 422, body = Problem)))]
pub(super) async fn create_zone(
    State(state): State<AppState>,
    actor: Actor,
    ValidatedJson(req): ValidatedJson<CreateZone>,
) -> ApiResult<(StatusCode, Json<Zone>)> {
    let org_id = actor.current_org()?;
    let slug = slug_of(req.slug, &req.name)?;
    let zone = sqlx::query_as!(
        Zone,
        "insert into zone (zone_id, organization_id, name, slug) values ($1, $2, $3, $4)
         returning zone_id as id, name, slug, created_at, updated_at",
        Uuid::now_v7(),
        org_id,
        req.name,
        slug
    )
    .fetch_one(state.db())
    .await
    .on_constraint("zone_slug_unique", taken)?;
    Ok((StatusCode::CREATED, Json(zone)))
}

/// One zone.
#[utoipa::path(get, path = "/api/v1/city/zones/{id}", tag = "city", params(("id" = Uuid, Path)),
    security(("bearer" = []), ("api_key" = []), ("session_cookie" = [])),
    responses((status = 200, body = Zone), (status = 404, body = Problem)))]
pub(super) async fn get_zone(
    State(state): State<AppState>,
    actor: Actor,
    ApiPath(id): ApiPath<Uuid>,
) -> ApiResult<Json<Zone>> {
    let org_id = actor.current_org()?;
    let zone = sqlx::query_as!(
        Zone,
        "select zone_id as id, name, slug, created_at, updated_at from zone where zone_id = $1 and organization_id = $2",
        id,
        org_id
    )
    .fetch_optional(state.db())
    .await?
    .ok_or(ApiError::NotFound)?;
    Ok(Json(zone))
}

/// Renames a zone.
#[utoipa::path(patch, path = "/api/v1/city/zones/{id}", tag = "city", params(("id" = Uuid, Path)), request_body = UpdateZone,
    security(("bearer" = []), ("api_key" = []), ("session_cookie" = [])),
    responses((status = 200, body = Zone), (status = 404, body = Problem), (status = 409, body = Problem), (status = 422, body = Problem)))]
pub(super) async fn update_zone(
    State(state): State<AppState>,
    actor: Actor,
    ApiPath(id): ApiPath<Uuid>,
    ValidatedJson(req): ValidatedJson<UpdateZone>,
) -> ApiResult<Json<Zone>> {
    let org_id = actor.current_org()?;
    if let Some(s) = &req.slug
        && !valid_slug(s)
    {
        return Err(ApiError::field("slug", "slug", "3 to 63 lowercase letters, digits and dashes"));
    }
    let zone = sqlx::query_as!(
        Zone,
        "update zone set name = coalesce($3, name), slug = coalesce($4, slug)
         where zone_id = $1 and organization_id = $2
         returning zone_id as id, name, slug, created_at, updated_at",
        id,
        org_id,
        req.name,
        req.slug
    )
    .fetch_optional(state.db())
    .await
    .on_constraint("zone_slug_unique", taken)?
    .ok_or(ApiError::NotFound)?;
    Ok(Json(zone))
}

/// Deletes an empty zone (one with rooms is a 409).
#[utoipa::path(delete, path = "/api/v1/city/zones/{id}", tag = "city", params(("id" = Uuid, Path)),
    security(("bearer" = []), ("api_key" = []), ("session_cookie" = [])),
    responses((status = 204, description = "Deleted"), (status = 404, body = Problem), (status = 409, body = Problem)))]
pub(super) async fn delete_zone(
    State(state): State<AppState>,
    actor: Actor,
    ApiPath(id): ApiPath<Uuid>,
) -> ApiResult<StatusCode> {
    let org_id = actor.current_org()?;
    let done = sqlx::query!("delete from zone where zone_id = $1 and organization_id = $2", id, org_id)
        .execute(state.db())
        .await
        .on_constraint("room_zone_fk", || ApiError::Conflict {
            code: "zone_not_empty",
            detail: "The zone still has rooms; delete or move them first.".into(),
        })?;
    if done.rows_affected() == 0 {
        return Err(ApiError::NotFound);
    }
    Ok(StatusCode::NO_CONTENT)
}

/// The rooms of the organization, every zone's.
#[utoipa::path(get, path = "/api/v1/city/rooms", tag = "city",
    security(("bearer" = []), ("api_key" = []), ("session_cookie" = [])),
    responses((status = 200, body = Vec<Room>), (status = 401, body = Problem), (status = 403, body = Problem)))]
pub(super) async fn list_rooms(State(state): State<AppState>, actor: Actor) -> ApiResult<Json<Vec<Room>>> {
    let org_id = actor.current_org()?;
    Ok(Json(rooms_of(&state, org_id).await?))
}

pub(super) async fn rooms_of(state: &AppState, org_id: Uuid) -> Result<Vec<Room>, sqlx::Error> {
    sqlx::query_as!(
        Room,
        "select room_id as id, zone_id, name, slug, kind, capacity, x, y, width, height, created_at, updated_at
         from room where organization_id = $1 order by zone_id, y, x",
        org_id
    )
    .fetch_all(state.db())
    .await
}

/// Creates a room in a zone of the organization.
#[utoipa::path(post, path = "/api/v1/city/rooms", tag = "city", request_body = CreateRoom,
    security(("bearer" = []), ("api_key" = []), ("session_cookie" = [])),
    responses((status = 201, body = Room), (status = 403, body = Problem), (status = 409, body = Problem),
              (status = 422, description = "Invalid, in no zone of the organization, or overlapping a room (named)", body = Problem)))]
pub(super) async fn create_room(
    State(state): State<AppState>,
    actor: Actor,
    ValidatedJson(req): ValidatedJson<CreateRoom>,
) -> ApiResult<(StatusCode, Json<Room>)> {
    let org_id = actor.current_org()?;
    let slug = slug_of(req.slug, &req.name)?;
    let rect = (req.x, req.y, req.width, req.height);
    let result = sqlx::query_as!(
        Room,
        "insert into room (room_id, organization_id, zone_id, name, slug, kind, capacity, x, y, width, height)
         values ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)
         returning room_id as id, zone_id, name, slug, kind, capacity, x, y, width, height, created_at, updated_at",
        Uuid::now_v7(),
        org_id,
        req.zone_id,
        req.name,
        slug,
        req.kind,
        req.capacity,
        req.x,
        req.y,
        req.width,
        req.height
    )
    .fetch_one(state.db())
    .await;
    if is_constraint(&result, "room_no_overlap") {
        return Err(overlap(&state, org_id, req.zone_id, None, rect).await);
    }
    let room = result.on_constraint("room_zone_fk", zone_missing).on_constraint("room_slug_unique", taken)?;
    Ok((StatusCode::CREATED, Json(room)))
}

fn is_constraint<T>(r: &Result<T, sqlx::Error>, name: &str) -> bool {
    matches!(r, Err(sqlx::Error::Database(db)) if db.constraint() == Some(name))
}

/// One room.
#[utoipa::path(get, path = "/api/v1/city/rooms/{id}", tag = "city", params(("id" = Uuid, Path)),
    security(("bearer" = []), ("api_key" = []), ("session_cookie" = [])),
    responses((status = 200, body = Room), (status = 404, body = Problem)))]
pub(super) async fn get_room(
    State(state): State<AppState>,
    actor: Actor,
    ApiPath(id): ApiPath<Uuid>,
) -> ApiResult<Json<Room>> {
    let org_id = actor.current_org()?;
    let room = sqlx::query_as!(
        Room,
        "select room_id as id, zone_id, name, slug, kind, capacity, x, y, width, height, created_at, updated_at
         from room where room_id = $1 and organization_id = $2",
        id,
        org_id
    )
    .fetch_optional(state.db())
    .await?
    .ok_or(ApiError::NotFound)?;
    Ok(Json(room))
}

/// Changes a room: its name, kind, capacity, or place on the map (never onto another room).
#[utoipa::path(patch, path = "/api/v1/city/rooms/{id}", tag = "city", params(("id" = Uuid, Path)), request_body = UpdateRoom,
    security(("bearer" = []), ("api_key" = []), ("session_cookie" = [])),
    responses((status = 200, body = Room), (status = 404, body = Problem), (status = 409, body = Problem), (status = 422, body = Problem)))]
pub(super) async fn update_room(
    State(state): State<AppState>,
    actor: Actor,
    ApiPath(id): ApiPath<Uuid>,
    ValidatedJson(req): ValidatedJson<UpdateRoom>,
) -> ApiResult<Json<Room>> {
    let org_id = actor.current_org()?;
    if let Some(s) = &req.slug
        && !valid_slug(s)
    {
        return Err(ApiError::field("slug", "slug", "3 to 63 lowercase letters, digits and dashes"));
    }
    let result = sqlx::query_as!(
        Room,
        "update room set name = coalesce($3, name), slug = coalesce($4, slug), kind = coalesce($5, kind),
                capacity = coalesce($6, capacity), x = coalesce($7, x), y = coalesce($8, y),
                width = coalesce($9, width), height = coalesce($10, height)
         where room_id = $1 and organization_id = $2
         returning room_id as id, zone_id, name, slug, kind, capacity, x, y, width, height, created_at, updated_at",
        id,
        org_id,
        req.name,
        req.slug,
        req.kind,
        req.capacity,
        req.x,
        req.y,
        req.width,
        req.height
    )
    .fetch_optional(state.db())
    .await;
    if is_constraint(&result, "room_no_overlap") {
        let old = sqlx::query!("select zone_id, x, y, width, height from room where room_id = $1", id)
            .fetch_one(state.db())
            .await?;
        let rect = (
            req.x.unwrap_or(old.x),
            req.y.unwrap_or(old.y),
            req.width.unwrap_or(old.width),
            req.height.unwrap_or(old.height),
        );
        return Err(overlap(&state, org_id, old.zone_id, Some(id), rect).await);
    }
    let room = result.on_constraint("room_slug_unique", taken)?.ok_or(ApiError::NotFound)?;
    Ok(Json(room))
}

/// Deletes a room; the agents placed in it are unplaced (and viewers told).
#[utoipa::path(delete, path = "/api/v1/city/rooms/{id}", tag = "city", params(("id" = Uuid, Path)),
    security(("bearer" = []), ("api_key" = []), ("session_cookie" = [])),
    responses((status = 204, description = "Deleted"), (status = 404, body = Problem)))]
pub(super) async fn delete_room(
    State(state): State<AppState>,
    actor: Actor,
    ApiPath(id): ApiPath<Uuid>,
) -> ApiResult<StatusCode> {
    let org_id = actor.current_org()?;
    let mut tx = state.db().begin().await?;
    let moved = sqlx::query_scalar!(
        "update agent_placement set room_id = null where room_id = $1 and organization_id = $2 returning agent_id",
        id,
        org_id
    )
    .fetch_all(&mut *tx)
    .await?;
    let done = sqlx::query!("delete from room where room_id = $1 and organization_id = $2", id, org_id)
        .execute(&mut *tx)
        .await?;
    if done.rows_affected() == 0 {
        return Err(ApiError::NotFound);
    }
    tx.commit().await?;
    for agent_id in moved {
        super::placement::announce_move(&state, org_id, agent_id, Some(id), None).await;
    }
    Ok(StatusCode::NO_CONTENT)
}
