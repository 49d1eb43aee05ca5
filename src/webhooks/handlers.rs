//! `/api/v1/webhooks`: an organization's endpoints (owners and admins), their deliveries, replay,
//! retry and dead letters, and the catalog of event types.

use axum::{
    Json,
    extract::State,
    http::{HeaderMap, HeaderValue, StatusCode, header},
};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use time::OffsetDateTime;
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use super::{insert_deliveries, signing, ssrf};
use crate::{
    audit::{self, Event},
    auth::{Actor, Role},
    config::Environment,
    events,
    http::{
        ApiError, ApiResult,
        error::{FieldError, Problem},
        extract::{ApiJson, ApiPath, ApiQuery},
    },
    state::AppState,
};

/// What binds a sealed secret to its endpoint's row.
pub(super) fn seal_label(endpoint_id: Uuid) -> String {
    format!("webhook_endpoint:{endpoint_id}")
}

/// The organization of the request, if the caller is one of its owners or admins.
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

/// A webhook endpoint, without its secret.
#[derive(Debug, Serialize, ToSchema)]
pub struct Endpoint {
    pub id: Uuid,
    pub url: String,
    pub description: String,
    /// Event types, `<prefix>.*` patterns, or `*`.
    pub event_types: Vec<String>,
    pub enabled: bool,
    /// Why the dispatcher disabled it: `gone` (410) or `failing`; null otherwise.
    pub disabled_reason: Option<String>,
    #[serde(with = "time::serde::rfc3339::option")]
    pub failing_since: Option<OffsetDateTime>,
    #[serde(with = "time::serde::rfc3339::option")]
    pub last_success_at: Option<OffsetDateTime>,
    /// Until when the previous secret still signs beside the current one.
    #[serde(with = "time::serde::rfc3339::option")]
    pub previous_secret_expires_at: Option<OffsetDateTime>,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub updated_at: OffsetDateTime,
}

/// A new endpoint: the only time its signing secret is shown.
#[derive(Debug, Serialize, ToSchema)]
pub struct CreatedEndpoint {
    #[serde(flatten)]
    pub endpoint: Endpoint,
    /// `whsec_<base64>`: verify `webhook-signature` with it (any Standard Webhooks library).
    pub secret: String,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateEndpoint {
    /// An https URL (http outside production) on a public address.
    pub url: String,
    pub description: Option<String>,
    /// Event types (see `GET /api/v1/webhooks/event-types`), `<prefix>.*` patterns, or `*`.
    pub event_types: Vec<String>,
    pub enabled: Option<bool>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateEndpoint {
    pub url: Option<String>,
    pub description: Option<String>,
    pub event_types: Option<Vec<String>>,
    /// Re-enabling an endpoint the dispatcher disabled restarts its failure clock.
    pub enabled: Option<bool>,
}

struct EndpointRow {
    webhook_endpoint_id: Uuid,
    url: String,
    description: String,
    event_types: Vec<String>,
    enabled: bool,
    disabled_reason: Option<String>,
    failing_since: Option<OffsetDateTime>,
    last_success_at: Option<OffsetDateTime>,
    previous_secret_expires_at: Option<OffsetDateTime>,
    created_at: OffsetDateTime,
    updated_at: OffsetDateTime,
}

impl From<EndpointRow> for Endpoint {
    fn from(r: EndpointRow) -> Self {
        Self {
            id: r.webhook_endpoint_id,
            url: r.url,
            description: r.description,
            event_types: r.event_types,
            enabled: r.enabled,
            disabled_reason: r.disabled_reason,
            failing_since: r.failing_since,
            last_success_at: r.last_success_at,
            previous_secret_expires_at: r.previous_secret_expires_at,
            created_at: r.created_at,
            updated_at: r.updated_at,
        }
    }
}

/// Every check of an endpoint's fields; all failures at once, each naming its field.
async fn validate(
    state: &AppState,
    url: Option<&str>,
    description: Option<&str>,
    event_types: Option<&[String]>,
) -> ApiResult<()> {
    let mut errors = Vec::new();
    let mut refused = None;
    if let Some(url) = url {
        let cfg = state.config();
        let https_only = cfg.server.environment == Environment::Production;
        if let Err(r) = ssrf::check_url(url, https_only, cfg.webhooks.allow_private_networks).await {
            errors.push(FieldError { field: "url".into(), code: r.code().into(), message: r.message().into() });
            refused = Some(r);
        }
    }
    if description.is_some_and(|d| d.chars().count() > 1024) {
        errors.push(FieldError {
            field: "description".into(),
            code: "length".into(),
            message: "At most 1024 characters.".into(),
        });
    }
    if let Some(types) = event_types {
        if types.is_empty() || types.len() > 100 {
            errors.push(FieldError {
                field: "event_types".into(),
                code: "length".into(),
                message: "Between 1 and 100 event types.".into(),
            });
        }
        for (i, t) in types.iter().enumerate() {
            if t.len() > 200 || !events::matches_known(t) {
                errors.push(FieldError {
                    field: format!("event_types[{i}]"),
                    code: "unknown_event_type".into(),
                    message: "Not an event type of GET /api/v1/webhooks/event-types, a `<prefix>.*` pattern or `*`."
                        .into(),
                });
            }
        }
    }
    if errors.is_empty() {
        return Ok(());
    }
    Err(match refused {
        Some(r) => ApiError::Invalid {
            status: StatusCode::UNPROCESSABLE_ENTITY,
            code: "url_refused",
            detail: format!("The URL is refused: {}", r.message()).into(),
            errors,
        },
        None => ApiError::Validation { errors },
    })
}

/// Subscribes a URL to event types; answers its signing secret, once.
#[utoipa::path(post, path = "/api/v1/webhooks", tag = "webhooks", request_body = CreateEndpoint,
    security(("bearer" = []), ("api_key" = []), ("session_cookie" = [])),
    responses(
        (status = 201, body = CreatedEndpoint, description = "Created; `Cache-Control: no-store`"),
        (status = 403, body = Problem),
        (status = 409, description = "Too many endpoints", body = Problem),
        (status = 422, description = "Invalid fields, or a refused URL (`url_refused`, the reason in `errors`)", body = Problem)))]
pub(super) async fn create_webhook(
    State(state): State<AppState>,
    actor: Actor,
    ApiJson(req): ApiJson<CreateEndpoint>,
) -> ApiResult<(StatusCode, HeaderMap, Json<CreatedEndpoint>)> {
    let org_id = admin_org(&actor)?;
    validate(&state, Some(&req.url), req.description.as_deref(), Some(&req.event_types)).await?;
    let id = Uuid::now_v7();
    let (secret, raw) = signing::new_secret();
    let sealed = state.keys().seal(&seal_label(id), &raw)?;
    let mut tx = state.db().begin().await?;
    // Counted under the organization's lock, so concurrent creations cannot pass the limit.
    sqlx::query!("select organization_id from organization where organization_id = $1 for update", org_id)
        .fetch_one(&mut *tx)
        .await?;
    let count =
        sqlx::query_scalar!(r#"select count(*) as "n!" from webhook_endpoint where organization_id = $1"#, org_id)
            .fetch_one(&mut *tx)
            .await?;
    let max = state.config().webhooks.max_endpoints;
    if count >= max as i64 {
        return Err(ApiError::Conflict {
            code: "too_many_endpoints",
            detail: format!("An organization has at most {max} webhook endpoints.").into(),
        });
    }
    let row = sqlx::query_as!(
        EndpointRow,
        "insert into webhook_endpoint (webhook_endpoint_id, organization_id, url, description, event_types, enabled,
             secret_sealed)
         values ($1, $2, $3, $4, $5, $6, $7)
         returning webhook_endpoint_id, url, description, event_types, enabled, disabled_reason, failing_since,
                   last_success_at, previous_secret_expires_at, created_at, updated_at",
        id,
        org_id,
        req.url,
        req.description.unwrap_or_default(),
        &req.event_types,
        req.enabled.unwrap_or(true),
        sealed
    )
    .fetch_one(&mut *tx)
    .await?;
    audit::record(
        &mut tx,
        Event::by(&actor, org_id, "webhook.endpoint_created")
            .target("webhook_endpoint", id)
            .details(json!({ "url": row.url, "event_types": row.event_types })),
    )
    .await?;
    tx.commit().await?;
    Ok((StatusCode::CREATED, no_store(), Json(CreatedEndpoint { endpoint: row.into(), secret })))
}

/// The organization's endpoints.
#[utoipa::path(get, path = "/api/v1/webhooks", tag = "webhooks",
    security(("bearer" = []), ("api_key" = []), ("session_cookie" = [])),
    responses((status = 200, body = Vec<Endpoint>), (status = 403, body = Problem)))]
pub(super) async fn list_webhooks(State(state): State<AppState>, actor: Actor) -> ApiResult<Json<Vec<Endpoint>>> {
    let org_id = admin_org(&actor)?;
    let rows = sqlx::query_as!(
        EndpointRow,
        "select webhook_endpoint_id, url, description, event_types, enabled, disabled_reason, failing_since,
                last_success_at, previous_secret_expires_at, created_at, updated_at
         from webhook_endpoint where organization_id = $1 order by created_at",
        org_id
    )
    .fetch_all(state.db())
    .await?;
    Ok(Json(rows.into_iter().map(Endpoint::from).collect()))
}

async fn fetch(db: impl sqlx::PgExecutor<'_>, org_id: Uuid, id: Uuid) -> ApiResult<EndpointRow> {
    sqlx::query_as!(
        EndpointRow,
        "select webhook_endpoint_id, url, description, event_types, enabled, disabled_reason, failing_since,
                last_success_at, previous_secret_expires_at, created_at, updated_at
         from webhook_endpoint where webhook_endpoint_id = $1 and organization_id = $2",
        id,
        org_id
    )
    .fetch_optional(db)
    .await?
    .ok_or(ApiError::NotFound)
}

/// One endpoint; another organization's is a 404.
#[utoipa::path(get, path = "/api/v1/webhooks/{id}", tag = "webhooks", params(("id" = Uuid, Path)),
    security(("bearer" = []), ("api_key" = []), ("session_cookie" = [])),
    responses((status = 200, body = Endpoint), (status = 404, body = Problem)))]
pub(super) async fn get_webhook(
    State(state): State<AppState>,
    actor: Actor,
    ApiPath(id): ApiPath<Uuid>,
) -> ApiResult<Json<Endpoint>> {
    let org_id = admin_org(&actor)?;
    Ok(Json(fetch(state.db(), org_id, id).await?.into()))
}

/// Changes an endpoint's URL, description, event types, or whether it is enabled.
#[utoipa::path(patch, path = "/api/v1/webhooks/{id}", tag = "webhooks", params(("id" = Uuid, Path)),
    request_body = UpdateEndpoint,
    security(("bearer" = []), ("api_key" = []), ("session_cookie" = [])),
    responses((status = 200, body = Endpoint), (status = 404, body = Problem), (status = 422, body = Problem)))]
pub(super) async fn update_webhook(
    State(state): State<AppState>,
    actor: Actor,
    ApiPath(id): ApiPath<Uuid>,
    ApiJson(req): ApiJson<UpdateEndpoint>,
) -> ApiResult<Json<Endpoint>> {
    let org_id = admin_org(&actor)?;
    fetch(state.db(), org_id, id).await?;
    validate(&state, req.url.as_deref(), req.description.as_deref(), req.event_types.as_deref()).await?;
    let mut tx = state.db().begin().await?;
    let row = sqlx::query_as!(
        EndpointRow,
        "update webhook_endpoint set
            url = coalesce($3, url),
            description = coalesce($4, description),
            event_types = coalesce($5, event_types),
            enabled = coalesce($6, enabled),
            disabled_reason = case when $6 then null else disabled_reason end,
            failing_since = case when $6 and not enabled then null else failing_since end
         where webhook_endpoint_id = $1 and organization_id = $2
         returning webhook_endpoint_id, url, description, event_types, enabled, disabled_reason, failing_since,
                   last_success_at, previous_secret_expires_at, created_at, updated_at",
        id,
        org_id,
        req.url,
        req.description,
        req.event_types.as_deref(),
        req.enabled
    )
    .fetch_optional(&mut *tx)
    .await?
    .ok_or(ApiError::NotFound)?;
    audit::record(
        &mut tx,
        Event::by(&actor, org_id, "webhook.endpoint_updated").target("webhook_endpoint", id).details(json!({
            "url": req.url, "event_types": req.event_types, "enabled": req.enabled,
            "description_changed": req.description.is_some(),
        })),
    )
    .await?;
    tx.commit().await?;
    Ok(Json(row.into()))
}

/// Deletes an endpoint with its deliveries.
#[utoipa::path(delete, path = "/api/v1/webhooks/{id}", tag = "webhooks", params(("id" = Uuid, Path)),
    security(("bearer" = []), ("api_key" = []), ("session_cookie" = [])),
    responses((status = 204, description = "Deleted"), (status = 404, body = Problem)))]
pub(super) async fn delete_webhook(
    State(state): State<AppState>,
    actor: Actor,
    ApiPath(id): ApiPath<Uuid>,
) -> ApiResult<StatusCode> {
    let org_id = admin_org(&actor)?;
    let mut tx = state.db().begin().await?;
    let url = sqlx::query_scalar!(
        "delete from webhook_endpoint where webhook_endpoint_id = $1 and organization_id = $2 returning url",
        id,
        org_id
    )
    .fetch_optional(&mut *tx)
    .await?
    .ok_or(ApiError::NotFound)?;
    audit::record(
        &mut tx,
        Event::by(&actor, org_id, "webhook.endpoint_deleted")
            .target("webhook_endpoint", id)
            .details(json!({ "url": url })),
    )
    .await?;
    tx.commit().await?;
    Ok(StatusCode::NO_CONTENT)
}

/// A rotated secret: the new one, shown once, and until when the old one still signs.
#[derive(Debug, Serialize, ToSchema)]
pub struct RotatedSecret {
    pub secret: String,
    #[serde(with = "time::serde::rfc3339")]
    pub previous_secret_expires_at: OffsetDateTime,
}

/// Issues a new signing secret; the old one keeps signing beside it (both signatures in
/// `webhook-signature`) for `webhooks.secret_rotation_overlap_secs`.
#[utoipa::path(post, path = "/api/v1/webhooks/{id}/rotate-secret", tag = "webhooks", params(("id" = Uuid, Path)),
    security(("bearer" = []), ("api_key" = []), ("session_cookie" = [])),
    responses((status = 200, body = RotatedSecret, description = "`Cache-Control: no-store`"), (status = 404, body = Problem)))]
pub(super) async fn rotate_webhook_secret(
    State(state): State<AppState>,
    actor: Actor,
    ApiPath(id): ApiPath<Uuid>,
) -> ApiResult<(HeaderMap, Json<RotatedSecret>)> {
    let org_id = admin_org(&actor)?;
    let (secret, raw) = signing::new_secret();
    let sealed = state.keys().seal(&seal_label(id), &raw)?;
    let until =
        state.clock().now() + time::Duration::seconds(state.config().webhooks.secret_rotation_overlap_secs as i64);
    let mut tx = state.db().begin().await?;
    sqlx::query!(
        "update webhook_endpoint set previous_secret_sealed = secret_sealed, previous_secret_expires_at = $3,
                secret_sealed = $4
         where webhook_endpoint_id = $1 and organization_id = $2 returning webhook_endpoint_id",
        id,
        org_id,
        until,
        sealed
    )
    .fetch_optional(&mut *tx)
    .await?
    .ok_or(ApiError::NotFound)?;
    audit::record(&mut tx, Event::by(&actor, org_id, "webhook.secret_rotated").target("webhook_endpoint", id)).await?;
    tx.commit().await?;
    Ok((no_store(), Json(RotatedSecret { secret, previous_secret_expires_at: until })))
}

/// A queued test event.
#[derive(Debug, Serialize, ToSchema)]
pub struct Queued {
    pub event_id: Uuid,
}

/// Sends a `webhook.test` event to this endpoint only.
#[utoipa::path(post, path = "/api/v1/webhooks/{id}/test", tag = "webhooks", params(("id" = Uuid, Path)),
    security(("bearer" = []), ("api_key" = []), ("session_cookie" = [])),
    responses((status = 202, body = Queued), (status = 404, body = Problem)))]
pub(super) async fn send_test_event(
    State(state): State<AppState>,
    actor: Actor,
    ApiPath(id): ApiPath<Uuid>,
) -> ApiResult<(StatusCode, Json<Queued>)> {
    let org_id = admin_org(&actor)?;
    let mut tx = state.db().begin().await?;
    fetch(&mut *tx, org_id, id).await?;
    let data = json!({ "endpoint_id": id, "message": "A test event from AgentIdP." });
    let event_id = events::emit_addressed(&mut tx, org_id, "webhook.test", format!("webhooks/{id}"), data).await?;
    let pending = [events::Pending { id: event_id, org_id, event_type: "webhook.test".into() }];
    insert_deliveries(&mut tx, &pending, state.clock().now(), Some(id)).await?;
    tx.commit().await?;
    Ok((StatusCode::ACCEPTED, Json(Queued { event_id })))
}

/// One attempt of a delivery.
#[derive(Debug, Serialize, ToSchema)]
pub struct AttemptInfo {
    #[serde(with = "time::serde::rfc3339")]
    pub attempted_at: OffsetDateTime,
    /// Null when no response came (`error` says why).
    pub status_code: Option<i32>,
    pub latency_ms: i32,
    /// The first bytes of the response body (`webhooks.response_body_max_bytes`).
    pub response_body: String,
    /// `timeout`, `connect`, `request`, or `refused: <reason>` (the SSRF guard).
    pub error: Option<String>,
    /// When the next attempt was scheduled; null after a success or the last attempt.
    #[serde(with = "time::serde::rfc3339::option")]
    pub next_attempt_at: Option<OffsetDateTime>,
}

/// One event's delivery to one endpoint.
#[derive(Debug, Serialize, ToSchema)]
pub struct Delivery {
    pub id: Uuid,
    pub endpoint_id: Uuid,
    /// The event id, also the `webhook-id` header (the same on every attempt and replay).
    pub event_id: Uuid,
    pub event_type: String,
    /// `pending`, `succeeded` or `dead` (a dead letter).
    pub status: String,
    pub attempts: i32,
    /// When a pending delivery is next attempted.
    #[serde(with = "time::serde::rfc3339::option")]
    pub next_attempt_at: Option<OffsetDateTime>,
    pub last_status_code: Option<i32>,
    pub last_error: Option<String>,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    /// Oldest first.
    pub attempt_log: Vec<AttemptInfo>,
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct DeliveryQuery {
    /// `pending`, `succeeded` or `dead`.
    pub status: Option<String>,
    /// Only this event type.
    pub event_type: Option<String>,
    /// Only deliveries to this endpoint (dead letters).
    pub endpoint_id: Option<Uuid>,
    /// At most this many, newest first (1 to 200, default 50).
    pub limit: Option<i64>,
}

async fn delivery_list(
    state: &AppState,
    org_id: Uuid,
    endpoint_id: Option<Uuid>,
    status: Option<&str>,
    q: &DeliveryQuery,
) -> ApiResult<Vec<Delivery>> {
    if status.is_some_and(|s| !["pending", "succeeded", "dead"].contains(&s)) {
        return Err(ApiError::bad_request("invalid_query", "status must be pending, succeeded or dead"));
    }
    let limit = crate::http::pagination::limit(q.limit)?;
    // The event type filter needs the event; over-read a little and filter after loading.
    let rows = sqlx::query!(
        "select webhook_delivery_id, webhook_endpoint_id, event_id, status, attempts, next_attempt_at,
                last_status_code, last_error, created_at
         from webhook_delivery
         where organization_id = $1 and ($2::uuid is null or webhook_endpoint_id = $2)
           and ($3::text is null or status = $3)
         order by created_at desc, webhook_delivery_id desc limit $4",
        org_id,
        endpoint_id,
        status,
        if q.event_type.is_some() { 1000 } else { limit }
    )
    .fetch_all(state.db())
    .await?;
    let event_ids: Vec<Uuid> = rows.iter().map(|r| r.event_id).collect();
    let types: std::collections::HashMap<Uuid, String> =
        events::load(state.db(), &event_ids).await?.into_iter().map(|e| (e.id, e.event_type)).collect();
    let rows: Vec<_> = rows
        .into_iter()
        .filter(|r| q.event_type.as_ref().is_none_or(|t| types.get(&r.event_id) == Some(t)))
        .take(limit as usize)
        .collect();
    let ids: Vec<Uuid> = rows.iter().map(|r| r.webhook_delivery_id).collect();
    let attempts = sqlx::query!(
        "select webhook_delivery_id, attempted_at, status_code, latency_ms, response_body, error, next_attempt_at
         from webhook_attempt where webhook_delivery_id = any($1) order by attempted_at, webhook_attempt_id",
        &ids
    )
    .fetch_all(state.db())
    .await?;
    let mut log: std::collections::HashMap<Uuid, Vec<AttemptInfo>> = Default::default();
    for a in attempts {
        log.entry(a.webhook_delivery_id).or_default().push(AttemptInfo {
            attempted_at: a.attempted_at,
            status_code: a.status_code,
            latency_ms: a.latency_ms,
            response_body: a.response_body,
            error: a.error,
            next_attempt_at: a.next_attempt_at,
        });
    }
    Ok(rows
        .into_iter()
        .map(|r| Delivery {
            id: r.webhook_delivery_id,
            endpoint_id: r.webhook_endpoint_id,
            event_id: r.event_id,
            event_type: types.get(&r.event_id).cloned().unwrap_or_default(),
            next_attempt_at: (r.status == "pending").then_some(r.next_attempt_at),
            status: r.status,
            attempts: r.attempts,
            last_status_code: r.last_status_code,
            last_error: r.last_error,
            created_at: r.created_at,
            attempt_log: log.remove(&r.webhook_delivery_id).unwrap_or_default(),
        })
        .collect())
}

/// An endpoint's deliveries, newest first, each with its attempts.
#[utoipa::path(get, path = "/api/v1/webhooks/{id}/deliveries", tag = "webhooks",
    params(("id" = Uuid, Path), DeliveryQuery),
    security(("bearer" = []), ("api_key" = []), ("session_cookie" = [])),
    responses((status = 200, body = Vec<Delivery>), (status = 400, body = Problem), (status = 404, body = Problem)))]
pub(super) async fn list_deliveries(
    State(state): State<AppState>,
    actor: Actor,
    ApiPath(id): ApiPath<Uuid>,
    ApiQuery(q): ApiQuery<DeliveryQuery>,
) -> ApiResult<Json<Vec<Delivery>>> {
    let org_id = admin_org(&actor)?;
    fetch(state.db(), org_id, id).await?;
    Ok(Json(delivery_list(&state, org_id, Some(id), q.status.as_deref(), &q).await?))
}

/// Dead letters: deliveries whose retries are spent (or that met a 410), newest first.
#[utoipa::path(get, path = "/api/v1/webhooks/dead-letters", tag = "webhooks", params(DeliveryQuery),
    security(("bearer" = []), ("api_key" = []), ("session_cookie" = [])),
    responses((status = 200, body = Vec<Delivery>), (status = 400, body = Problem)))]
pub(super) async fn list_dead_letters(
    State(state): State<AppState>,
    actor: Actor,
    ApiQuery(q): ApiQuery<DeliveryQuery>,
) -> ApiResult<Json<Vec<Delivery>>> {
    let org_id = admin_org(&actor)?;
    Ok(Json(delivery_list(&state, org_id, q.endpoint_id, Some("dead"), &q).await?))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ReplayRequest {
    /// Events that occurred at or after this instant (RFC 3339; required)...
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub since: Option<OffsetDateTime>,
    /// ...and before this one (default: now).
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub until: Option<OffsetDateTime>,
}

/// How many deliveries a replay queued.
#[derive(Debug, Serialize, ToSchema)]
pub struct Replayed {
    pub queued: u64,
}

/// The most events one replay queues.
const REPLAY_MAX: i64 = 10_000;

/// Delivers again every event of a time range that the endpoint subscribes to (same `webhook-id`,
/// so receivers that deduplicate see each once).
#[utoipa::path(post, path = "/api/v1/webhooks/{id}/replay", tag = "webhooks", params(("id" = Uuid, Path)),
    request_body = ReplayRequest,
    security(("bearer" = []), ("api_key" = []), ("session_cookie" = [])),
    responses((status = 202, body = Replayed), (status = 404, body = Problem), (status = 422, body = Problem)))]
pub(super) async fn replay_events(
    State(state): State<AppState>,
    actor: Actor,
    ApiPath(id): ApiPath<Uuid>,
    ApiJson(req): ApiJson<ReplayRequest>,
) -> ApiResult<(StatusCode, Json<Replayed>)> {
    let org_id = admin_org(&actor)?;
    let mut tx = state.db().begin().await?;
    // Another organization's endpoint is a 404 whatever the body says.
    fetch(&mut *tx, org_id, id).await?;
    let since = req.since.ok_or_else(|| ApiError::field("since", "required", "since is required"))?;
    let until = req.until.unwrap_or_else(OffsetDateTime::now_utc);
    if until <= since {
        return Err(ApiError::field("until", "range", "until must be after since"));
    }
    let found = events::between(&mut tx, org_id, since, until, REPLAY_MAX + 1).await?;
    if found.len() as i64 > REPLAY_MAX {
        return Err(ApiError::field("since", "range", format!("At most {REPLAY_MAX} events per replay; narrow it.")));
    }
    let queued = insert_deliveries(&mut tx, &found, state.clock().now(), Some(id)).await?;
    audit::record(
        &mut tx,
        Event::by(&actor, org_id, "webhook.replayed").target("webhook_endpoint", id).details(json!({
            "since": events::rfc3339(since), "until": events::rfc3339(until), "queued": queued,
        })),
    )
    .await?;
    tx.commit().await?;
    Ok((StatusCode::ACCEPTED, Json(Replayed { queued })))
}

/// Attempts a delivery again now (a dead letter gets one more attempt).
#[utoipa::path(post, path = "/api/v1/webhooks/deliveries/{id}/retry", tag = "webhooks", params(("id" = Uuid, Path)),
    security(("bearer" = []), ("api_key" = []), ("session_cookie" = [])),
    responses((status = 202, description = "Queued"), (status = 404, body = Problem), (status = 409, body = Problem)))]
pub(super) async fn retry_delivery(
    State(state): State<AppState>,
    actor: Actor,
    ApiPath(id): ApiPath<Uuid>,
) -> ApiResult<StatusCode> {
    let org_id = admin_org(&actor)?;
    let mut tx = state.db().begin().await?;
    let status = sqlx::query_scalar!(
        "select status from webhook_delivery where webhook_delivery_id = $1 and organization_id = $2 for update",
        id,
        org_id
    )
    .fetch_optional(&mut *tx)
    .await?
    .ok_or(ApiError::NotFound)?;
    if status == "succeeded" {
        return Err(ApiError::conflict("already_delivered", "This delivery succeeded; replay the event instead."));
    }
    sqlx::query!(
        "update webhook_delivery set status = 'pending', next_attempt_at = $2 where webhook_delivery_id = $1",
        id,
        state.clock().now()
    )
    .execute(&mut *tx)
    .await?;
    audit::record(&mut tx, Event::by(&actor, org_id, "webhook.delivery_retried").target("webhook_delivery", id))
        .await?;
    tx.commit().await?;
    Ok(StatusCode::ACCEPTED)
}

/// One type of the catalog.
#[derive(Debug, Serialize, ToSchema)]
pub struct EventTypeInfo {
    pub name: String,
    pub description: String,
    /// The JSON schema (2020-12) of the event's `data`.
    #[schema(value_type = Object)]
    pub schema: Value,
}

/// Every event type, with a JSON schema of its `data`. Each delivery is a CloudEvents 1.0 JSON
/// envelope: `specversion`, `id`, `source`, `type`, `subject`, `time`, `datacontenttype`, `data`,
/// and `orgid`.
#[utoipa::path(get, path = "/api/v1/webhooks/event-types", tag = "webhooks",
    security(("bearer" = []), ("api_key" = []), ("session_cookie" = [])),
    responses((status = 200, body = Vec<EventTypeInfo>), (status = 401, body = Problem)))]
pub(super) async fn list_event_types(_actor: Actor) -> Json<Vec<EventTypeInfo>> {
    Json(
        events::CATALOG
            .iter()
            .map(|t| EventTypeInfo { name: t.name.into(), description: t.description.into(), schema: t.schema() })
            .collect(),
    )
}
