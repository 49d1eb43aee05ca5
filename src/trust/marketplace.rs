//! The marketplace: agents their organizations chose to list. Anyone may search it; only what a
//! listing shows leaves the organization (name, description, capabilities, the publisher's name,
//! the card and DID), never owners, scopes, metadata or credentials. Unlisting, suspending or
//! deleting an agent takes it off at once: every read goes to the agent's current row.

use axum::{
    Json,
    extract::State,
    http::{HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};
use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD as B64};
use serde::{Deserialize, Serialize};
use serde_json::json;
use time::OffsetDateTime;
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use crate::{
    audit::{self, Event},
    auth::{
        Actor, ActorType,
        directory::{self, AgentProfile},
    },
    http::{
        ApiError, ApiResult,
        error::Problem,
        extract::{ApiPath, ApiQuery},
        pagination,
    },
    policy::Resource,
    state::AppState,
};

/// Who listed an agent.
#[derive(Debug, Serialize, ToSchema)]
pub struct Publisher {
    pub name: String,
    pub slug: String,
}

/// A public listing.
#[derive(Debug, Serialize, ToSchema)]
pub struct Listing {
    pub agent_id: Uuid,
    pub name: String,
    pub description: String,
    pub capabilities: Vec<String>,
    pub publisher: Publisher,
    pub agent_card_url: String,
    pub did: String,
    #[serde(with = "time::serde::rfc3339")]
    pub listed_at: OffsetDateTime,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ListingPage {
    pub items: Vec<Listing>,
    /// Pass as `cursor` for the next page; null on the last.
    pub next_cursor: Option<String>,
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct SearchQuery {
    /// Text in the name or description (case-insensitive).
    pub q: Option<String>,
    /// Only agents with this capability.
    pub capability: Option<String>,
    pub cursor: Option<String>,
    /// 1 to 200, default 50.
    pub limit: Option<i64>,
}

fn listing(base: &str, a: AgentProfile) -> Listing {
    Listing {
        agent_card_url: super::cards::public_card_url(base, a.id),
        did: super::did::agent_did(base, a.id),
        agent_id: a.id,
        name: a.name,
        description: a.description,
        capabilities: a.capabilities,
        publisher: Publisher { name: a.org_name, slug: a.org_slug },
        listed_at: a.listed_at.unwrap_or(a.updated_at),
    }
}

fn encode_cursor(at: OffsetDateTime, id: Uuid) -> String {
    B64.encode(format!("{}:{id}", at.unix_timestamp_nanos() / 1000))
}

fn decode_cursor(c: &str) -> Option<(OffsetDateTime, Uuid)> {
    let text = String::from_utf8(B64.decode(c).ok()?).ok()?;
    let (micros, id) = text.split_once(':')?;
    let at = OffsetDateTime::from_unix_timestamp_nanos(micros.parse::<i128>().ok()? * 1000).ok()?;
    Some((at, id.parse().ok()?))
}

/// `%`, `_` and `\` match literally in the search text.
fn like_literal(s: &str) -> String {
    s.replace('\\', "\\\\").replace('%', "\\%").replace('_', "\\_")
}

fn public_response<T: Serialize>(body: T) -> Response {
    let mut response = Json(body).into_response();
    response.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("public, max-age=30"));
    response
}

/// Searches the listed agents, newest listing first. Public.
#[utoipa::path(get, path = "/api/v1/marketplace", tag = "marketplace", params(SearchQuery),
    responses((status = 200, body = ListingPage), (status = 400, body = Problem), (status = 429, body = Problem)))]
pub(super) async fn search_marketplace(
    State(state): State<AppState>,
    ApiQuery(q): ApiQuery<SearchQuery>,
) -> ApiResult<Response> {
    super::charge_public_read(&state)?;
    let limit = pagination::limit(q.limit)?;
    let after = match q.cursor.as_deref() {
        None => None,
        Some(c) => Some(decode_cursor(c).ok_or_else(|| ApiError::bad_request("invalid_query", "cursor is not valid"))?),
    };
    let text = q.q.as_deref().map(str::trim).filter(|t| !t.is_empty());
    if text.is_some_and(|t| t.chars().count() > 200) || q.capability.as_deref().is_some_and(|c| c.len() > 100) {
        return Err(ApiError::bad_request("invalid_query", "q is at most 200 characters, capability at most 100"));
    }
    let pattern = text.map(like_literal);
    let rows =
        directory::listed_agents(state.db(), pattern.as_deref(), q.capability.as_deref(), after, limit + 1).await?;
    let (rows, next) = pagination::page(rows, limit, |a| encode_cursor(a.listed_at.unwrap_or(a.updated_at), a.id));
    let base = &state.config().server.public_url;
    Ok(public_response(ListingPage { items: rows.into_iter().map(|a| listing(base, a)).collect(), next_cursor: next }))
}

/// One listing. Public.
#[utoipa::path(get, path = "/api/v1/marketplace/{agent_id}", tag = "marketplace", params(("agent_id" = Uuid, Path)),
    responses((status = 200, body = Listing), (status = 404, body = Problem), (status = 429, body = Problem)))]
pub(super) async fn get_listing(State(state): State<AppState>, ApiPath(id): ApiPath<Uuid>) -> ApiResult<Response> {
    super::charge_public_read(&state)?;
    let agent = directory::agent_profile(state.db(), id)
        .await?
        .filter(|a| a.active && a.listed_at.is_some())
        .ok_or(ApiError::NotFound)?;
    Ok(public_response(listing(&state.config().server.public_url, agent)))
}

async fn set_listed(state: &AppState, actor: &Actor, id: Uuid, listed: bool) -> ApiResult<Option<AgentProfile>> {
    let org_id = actor.current_org()?;
    let agent =
        directory::agent_profile(state.db(), id).await?.filter(|a| a.org_id == org_id).ok_or(ApiError::NotFound)?;
    crate::policy::require(state, actor, "update", Resource::Agent { org_id, owner_id: Some(agent.owner_id) }, id)?;
    if listed && !agent.active {
        return Err(ApiError::Status {
            status: StatusCode::CONFLICT,
            code: "agent_suspended",
            detail: "A suspended agent cannot be listed.".into(),
        });
    }
    let mut tx = state.db().begin().await?;
    let by = (actor.actor_type == ActorType::Human).then(|| actor.user_id());
    directory::set_listing(&mut tx, org_id, id, by, listed).await?.ok_or(ApiError::NotFound)?;
    let action = if listed { "agent.listed" } else { "agent.unlisted" };
    audit::record(&mut tx, Event::by(actor, org_id, action).target("agent", id).details(json!({ "name": agent.name })))
        .await?;
    tx.commit().await?;
    Ok(directory::agent_profile(state.db(), id).await?)
}

/// Lists the agent in the marketplace (its owner, or the organization's owners and admins).
#[utoipa::path(put, path = "/api/v1/agents/{id}/listing", tag = "marketplace", params(("id" = Uuid, Path)),
    security(("bearer" = []), ("api_key" = []), ("session_cookie" = [])),
    responses((status = 200, body = Listing), (status = 403, body = Problem), (status = 404, body = Problem),
        (status = 409, body = Problem)))]
pub(super) async fn list_in_marketplace(
    State(state): State<AppState>,
    actor: Actor,
    ApiPath(id): ApiPath<Uuid>,
) -> ApiResult<Json<Listing>> {
    let agent = set_listed(&state, &actor, id, true).await?.ok_or(ApiError::NotFound)?;
    Ok(Json(listing(&state.config().server.public_url, agent)))
}

/// Takes the agent off the marketplace at once.
#[utoipa::path(delete, path = "/api/v1/agents/{id}/listing", tag = "marketplace", params(("id" = Uuid, Path)),
    security(("bearer" = []), ("api_key" = []), ("session_cookie" = [])),
    responses((status = 204), (status = 403, body = Problem), (status = 404, body = Problem)))]
pub(super) async fn unlist_from_marketplace(
    State(state): State<AppState>,
    actor: Actor,
    ApiPath(id): ApiPath<Uuid>,
) -> ApiResult<StatusCode> {
    set_listed(&state, &actor, id, false).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_and_garbage_is_refused() {
        let at = OffsetDateTime::from_unix_timestamp(1_800_000_000).unwrap();
        let id = Uuid::now_v7();
        assert_eq!(decode_cursor(&encode_cursor(at, id)), Some((at, id)));
        assert_eq!(decode_cursor("!!!"), None);
        assert_eq!(decode_cursor(&B64.encode("12:not-a-uuid")), None);
        assert_eq!(decode_cursor(&B64.encode("99999999999999999999999999:x")), None);
    }

    #[test]
    fn search_text_is_literal() {
        assert_eq!(like_literal("100%_a\\b"), "100\\%\\_a\\\\b");
    }
}
