//! Invitations: how anyone joins an organization. An admin invites an email; the invitee accepts
//! (signed in, if they have an account) or redeems the token at `POST /auth/set-password` (choosing
//! a password, if they have none). A declined or expired invitation never becomes a membership.

use axum::{Json, extract::State, http::StatusCode};
use serde_json::json;
use sqlx::PgConnection;
use uuid::Uuid;

use super::{
    actor::{Actor, ActorType, Role},
    credentials::{self, Invalidation},
    model::{Invitation, Member},
};
use crate::{
    audit::{self, Event},
    http::{
        ApiError, ApiResult,
        error::{Problem, ResultExt},
        extract::ApiPath,
    },
    state::AppState,
};

/// Invitation tokens are recognisable to secret scanners.
pub const TOKEN_PREFIX: &str = "aidp_inv_";

/// The signed-in human's email: only a person accepts or declines their own invitations.
fn invitee_email(actor: &Actor) -> ApiResult<&str> {
    match (&actor.actor_type, actor.principal.email.as_deref()) {
        (ActorType::Human, Some(email)) => Ok(email),
        _ => Err(ApiError::forbidden("not_a_person", "Only the invited person, signed in, answers an invitation.")),
    }
}

/// The caller's pending invitations.
#[utoipa::path(get, path = "/api/v1/invitations", tag = "organizations",
    security(("bearer" = []), ("api_key" = []), ("session_cookie" = [])),
    responses((status = 200, body = Vec<Invitation>), (status = 401, body = Problem), (status = 403, body = Problem)))]
pub(super) async fn list_invitations(State(state): State<AppState>, actor: Actor) -> ApiResult<Json<Vec<Invitation>>> {
    let email = invitee_email(&actor)?;
    let rows = sqlx::query!(
        "select invitation_id, organization_id, email, role, status, created_at, expires_at from invitation
         where lower(email) = lower($1) and status = 'pending' and expires_at > now()
         order by created_at limit 1000",
        email
    )
    .fetch_all(state.db())
    .await?;
    Ok(Json(
        rows.into_iter()
            .map(|r| Invitation {
                id: r.invitation_id,
                organization_id: r.organization_id,
                email: r.email,
                role: Role::parse(&r.role).unwrap_or(Role::Member),
                status: r.status,
                created_at: r.created_at,
                expires_at: r.expires_at,
            })
            .collect(),
    ))
}

/// Locks the caller's pending, unexpired invitation; anyone else's (or none) is 404.
async fn pending(conn: &mut PgConnection, id: Uuid, email: &str) -> ApiResult<(Uuid, Role)> {
    let r = sqlx::query!(
        "select organization_id, role from invitation
         where invitation_id = $1 and lower(email) = lower($2) and status = 'pending' and expires_at > now()
         for update",
        id,
        email
    )
    .fetch_optional(&mut *conn)
    .await?
    .ok_or(ApiError::NotFound)?;
    Ok((r.organization_id, Role::parse(&r.role).unwrap_or(Role::Member)))
}

/// Makes the invitee a member and closes the invitation.
async fn join(conn: &mut PgConnection, id: Uuid, org_id: Uuid, user_id: Uuid, role: Role) -> ApiResult<Member> {
    sqlx::query!("update invitation set status = 'accepted', decided_at = now() where invitation_id = $1", id)
        .execute(&mut *conn)
        .await?;
    let r = sqlx::query!(
        "with m as (insert into membership (organization_id, user_id, role) values ($1, $2, $3) returning created_at)
         select u.email, u.display_name, u.status, m.created_at from app_user u, m where u.user_id = $2",
        org_id,
        user_id,
        role.as_str()
    )
    .fetch_one(&mut *conn)
    .await
    .on_constraint("membership_pkey", || ApiError::conflict("already_member", "You are already a member."))?;
    audit::record(
        &mut *conn,
        Event::anonymous(org_id, "member.added")
            .actor(format!("user:{user_id}"), "human")
            .target("user", user_id)
            .details(json!({ "role": role.as_str(), "invitation": id })),
    )
    .await?;
    let data = json!({ "user_id": user_id, "email": r.email, "role": role.as_str() });
    crate::events::emit(conn, org_id, "member.added", format!("organizations/{org_id}/members/{user_id}"), data)
        .await?;
    Ok(Member {
        user_id,
        email: r.email,
        display_name: r.display_name,
        role,
        status: r.status,
        joined_at: r.created_at,
    })
}

/// Accepts an invitation: the caller becomes a member.
#[utoipa::path(post, path = "/api/v1/invitations/{id}/accept", tag = "organizations", params(("id" = Uuid, Path)),
    security(("bearer" = []), ("api_key" = []), ("session_cookie" = [])),
    responses(
        (status = 201, body = Member),
        (status = 403, body = Problem),
        (status = 404, description = "No pending invitation of yours", body = Problem),
        (status = 409, body = Problem)))]
pub(super) async fn accept(
    State(state): State<AppState>,
    actor: Actor,
    ApiPath(id): ApiPath<Uuid>,
) -> ApiResult<(StatusCode, Json<Member>)> {
    let email = invitee_email(&actor)?.to_owned();
    let mut tx = state.db().begin().await?;
    let (org_id, role) = pending(&mut tx, id, &email).await?;
    let member = join(&mut tx, id, org_id, actor.user_id(), role).await?;
    tx.commit().await?;
    credentials::invalidate(&state.auth().cache, state.redis(), Invalidation::User(actor.user_id())).await;
    Ok((StatusCode::CREATED, Json(member)))
}

/// Declines an invitation; it can no longer be accepted.
#[utoipa::path(post, path = "/api/v1/invitations/{id}/decline", tag = "organizations", params(("id" = Uuid, Path)),
    security(("bearer" = []), ("api_key" = []), ("session_cookie" = [])),
    responses(
        (status = 204, description = "Declined"),
        (status = 403, body = Problem),
        (status = 404, description = "No pending invitation of yours", body = Problem)))]
pub(super) async fn decline(
    State(state): State<AppState>,
    actor: Actor,
    ApiPath(id): ApiPath<Uuid>,
) -> ApiResult<StatusCode> {
    let email = invitee_email(&actor)?.to_owned();
    let mut tx = state.db().begin().await?;
    let (org_id, _) = pending(&mut tx, id, &email).await?;
    sqlx::query!("update invitation set status = 'declined', decided_at = now() where invitation_id = $1", id)
        .execute(&mut *tx)
        .await?;
    audit::record(&mut tx, Event::by(&actor, org_id, "invitation.declined").target("invitation", id)).await?;
    tx.commit().await?;
    Ok(StatusCode::NO_CONTENT)
}

/// A pending invitation token whose email has no account yet: what `POST /auth/set-password`
/// redeems by creating the account. An email that has an account signs in and accepts instead, so
/// the token never sets the password of an existing account.
pub(super) async fn redeemable(conn: &mut PgConnection, token_hash: &[u8]) -> ApiResult<bool> {
    Ok(sqlx::query_scalar!(
        r#"select exists(select 1 from invitation i
           where i.token_hash = $1 and i.status = 'pending' and i.expires_at > now()
             and not exists(select 1 from app_user u where lower(u.email) = lower(i.email))) as "e!""#,
        token_hash
    )
    .fetch_one(&mut *conn)
    .await?)
}

/// Redeems an invitation token for a new account with `password_hash`: the account, its
/// membership, the closed invitation. `None` if the token is not (or no longer) redeemable.
pub(super) async fn redeem(conn: &mut PgConnection, token_hash: &[u8], password_hash: &str) -> ApiResult<Option<Uuid>> {
    let Some(inv) = sqlx::query!(
        "select invitation_id, organization_id, email, role, display_name from invitation
         where token_hash = $1 and status = 'pending' and expires_at > now() for update",
        token_hash
    )
    .fetch_optional(&mut *conn)
    .await?
    else {
        return Ok(None);
    };
    let user_id = Uuid::now_v7();
    let created = sqlx::query!(
        "insert into app_user (user_id, email, display_name, password_hash) values ($1, $2, $3, $4)
         on conflict do nothing",
        user_id,
        inv.email,
        inv.display_name,
        password_hash
    )
    .execute(&mut *conn)
    .await?;
    if created.rows_affected() == 0 {
        return Ok(None);
    }
    audit::record(
        &mut *conn,
        Event::anonymous(inv.organization_id, "user.created")
            .actor(format!("user:{user_id}"), "human")
            .target("user", user_id),
    )
    .await?;
    let role = Role::parse(&inv.role).unwrap_or(Role::Member);
    join(conn, inv.invitation_id, inv.organization_id, user_id, role).await?;
    Ok(Some(user_id))
}
