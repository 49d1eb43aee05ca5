//! The consents a person gave to applications: listed, and withdrawn (which also ends the
//! application's refresh tokens for that person and the access tokens they issued).

use axum::{Json, extract::State, http::StatusCode};
use serde::Serialize;
use time::OffsetDateTime;
use utoipa::ToSchema;

use crate::{
    audit::{self, Event},
    auth::{
        actor::{Actor, ActorType},
        revocation::{self, Announced},
    },
    http::{ApiError, ApiResult, error::Problem, extract::ApiPath},
    state::AppState,
};

/// A remembered consent.
#[derive(Debug, Serialize, ToSchema)]
pub struct Consent {
    pub client_id: String,
    pub client_name: String,
    pub scopes: Vec<String>,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub updated_at: OffsetDateTime,
}

fn person(actor: &Actor) -> ApiResult<uuid::Uuid> {
    if actor.actor_type != ActorType::Human {
        return Err(ApiError::forbidden("not_a_person", "Only people give consents."));
    }
    Ok(actor.user_id())
}

/// The applications you allowed, with the scopes you allowed them.
#[utoipa::path(get, path = "/api/v1/me/consents", tag = "oidc",
    security(("bearer" = []), ("api_key" = []), ("session_cookie" = [])),
    responses((status = 200, body = Vec<Consent>), (status = 401, body = Problem), (status = 403, body = Problem)))]
pub(in crate::auth) async fn list_consents(
    State(state): State<AppState>,
    actor: Actor,
) -> ApiResult<Json<Vec<Consent>>> {
    let user_id = person(&actor)?;
    let rows = sqlx::query_as!(
        Consent,
        "select client_id, client_name, scopes, created_at, updated_at from oauth_consent
         where user_id = $1 order by updated_at desc limit 1000",
        user_id
    )
    .fetch_all(state.db())
    .await?;
    Ok(Json(rows))
}

/// Withdraws a consent: the application must ask again, and its refresh tokens for you (with
/// the access tokens they issued) are revoked. `client_id` is percent-encoded when it is a URL.
#[utoipa::path(delete, path = "/api/v1/me/consents/{client_id}", tag = "oidc", params(("client_id" = String, Path)),
    security(("bearer" = []), ("api_key" = []), ("session_cookie" = [])),
    responses((status = 204, description = "Withdrawn"), (status = 401, body = Problem), (status = 404, body = Problem)))]
pub(in crate::auth) async fn revoke_consent(
    State(state): State<AppState>,
    actor: Actor,
    ApiPath(client_id): ApiPath<String>,
) -> ApiResult<StatusCode> {
    let user_id = person(&actor)?;
    let mut tx = state.db().begin().await?;
    let gone = sqlx::query_scalar!(
        "delete from oauth_consent where user_id = $1 and client_id = $2 returning client_id",
        user_id,
        client_id
    )
    .fetch_optional(&mut *tx)
    .await?
    .ok_or(ApiError::NotFound)?;
    let rows = sqlx::query!(
        "update oauth_refresh_token set revoked_at = now()
         where user_id = $1 and client_id = $2 and revoked_at is null
         returning organization_id, access_jti, access_exp",
        user_id,
        client_id
    )
    .fetch_all(&mut *tx)
    .await?;
    for r in &rows {
        revocation::revoke_jti(&mut tx, r.access_jti, r.organization_id, r.access_exp).await?;
    }
    let org = actor.principal.memberships.first().map(|(o, _)| *o).unwrap_or(audit::SYSTEM_CHAIN);
    audit::record(
        &mut tx,
        Event::by(&actor, org, "oauth_consent.revoked").details(serde_json::json!({ "client_id": gone })),
    )
    .await?;
    tx.commit().await?;
    for r in rows {
        revocation::announce(&state, Announced::Jti { jti: r.access_jti, exp: r.access_exp }).await;
    }
    Ok(StatusCode::NO_CONTENT)
}
