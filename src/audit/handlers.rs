//! Audit routes: the org's log and its verification (owners and admins).

use axum::{Json, extract::State};

use super::{
    Verification,
    model::{AuditEvent, AuditPage, AuditQuery},
};
use crate::{
    auth::Actor,
    http::{ApiResult, extract::ApiQuery, pagination},
    state::AppState,
};

/// The current organization's audit events, newest first.
#[utoipa::path(get, path = "/api/v1/audit", tag = "audit", params(AuditQuery),
    security(("bearer" = []), ("api_key" = []), ("session_cookie" = [])),
    responses(
        (status = 200, body = AuditPage),
        (status = 400, body = crate::http::error::Problem),
        (status = 401, body = crate::http::error::Problem),
        (status = 403, body = crate::http::error::Problem)))]
pub(super) async fn list(
    State(state): State<AppState>,
    actor: Actor,
    ApiQuery(q): ApiQuery<AuditQuery>,
) -> ApiResult<Json<AuditPage>> {
    // Who may read it is the policy layer's decision (routes::RULES).
    let org_id = actor.current_org()?;
    let limit = pagination::limit(q.limit)?;
    let rows = sqlx::query!(
        "select audit_event_id, organization_id, seq, occurred_at, actor_id, actor_type, action, target_type,
                target_id, client_ip, request_id, details, prev_hash, hash
         from audit_event
         where organization_id = $1
           and ($2::text is null or actor_id = $2)
           and ($3::text is null or action = $3)
           and ($4::timestamptz is null or occurred_at >= $4)
           and ($5::timestamptz is null or occurred_at < $5)
           and ($6::bigint is null or seq < $6)
         order by seq desc
         limit $7",
        org_id,
        q.actor,
        q.action,
        q.since,
        q.until,
        q.cursor,
        limit + 1
    )
    .fetch_all(state.db())
    .await?;
    let items: Vec<AuditEvent> = rows
        .into_iter()
        .map(|r| AuditEvent {
            id: r.audit_event_id,
            org_id: r.organization_id,
            seq: r.seq,
            occurred_at: r.occurred_at,
            actor_id: r.actor_id,
            actor_type: r.actor_type,
            action: r.action,
            target_type: r.target_type,
            target_id: r.target_id,
            client_ip: r.client_ip,
            request_id: r.request_id,
            details: serde_json::from_str(&r.details).unwrap_or(serde_json::Value::Null),
            prev_hash: hex::encode(r.prev_hash),
            hash: hex::encode(r.hash),
        })
        .collect();
    let (items, next_cursor) = pagination::page(items, limit, |e| e.seq);
    Ok(Json(AuditPage { items, next_cursor }))
}

/// Recomputes the current organization's hash chain.
#[utoipa::path(get, path = "/api/v1/audit/verify", tag = "audit",
    security(("bearer" = []), ("api_key" = []), ("session_cookie" = [])),
    responses(
        (status = 200, body = Verification),
        (status = 401, body = crate::http::error::Problem),
        (status = 403, body = crate::http::error::Problem)))]
pub(super) async fn verify(State(state): State<AppState>, actor: Actor) -> ApiResult<Json<Verification>> {
    let org_id = actor.current_org()?;
    Ok(Json(super::verify(state.db(), org_id).await?))
}
