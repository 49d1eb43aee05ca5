//! Organizations (the older documents' microDAOs) and their members.

use axum::{Json, extract::State, http::StatusCode};
use serde_json::json;
use sqlx::PgConnection;
use uuid::Uuid;

use super::{
    actor::{Actor, Role},
    credentials::{self, Invalidation},
    model::*,
};
use crate::{
    audit::{self, Event},
    crypto,
    http::{
        ApiError, ApiResult,
        error::{Problem, ResultExt},
        extract::{ApiJson, ApiPath, ApiQuery, ValidatedJson},
        pagination,
    },
    state::AppState,
};

/// `My Org!` becomes `my-org`.
pub fn slugify(name: &str) -> String {
    let mut slug = String::new();
    for c in name.trim().chars().flat_map(|c| c.to_lowercase()) {
        if c.is_ascii_alphanumeric() {
            slug.push(c);
        } else if !slug.ends_with('-') && !slug.is_empty() {
            slug.push('-');
        }
    }
    let slug = slug.trim_matches('-').chars().take(63).collect::<String>();
    let slug = slug.trim_end_matches('-').to_owned();
    if slug.len() < 3 { format!("org-{slug}{}", &Uuid::new_v4().simple().to_string()[..6]) } else { slug }
}

pub fn valid_slug(slug: &str) -> bool {
    let b = slug.as_bytes();
    (3..=63).contains(&b.len())
        && b.iter().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
}

/// Creates an organization and its first audit event. Used by the API and by `bootstrap`.
pub async fn insert_organization(
    conn: &mut PgConnection,
    name: &str,
    slug: &str,
    event: Event,
) -> ApiResult<Organization> {
    let id = Uuid::now_v7();
    let created_at = sqlx::query_scalar!(
        "insert into organization (organization_id, slug, name) values ($1, $2, $3) returning created_at",
        id,
        slug,
        name
    )
    .fetch_one(&mut *conn)
    .await
    .on_constraint("organization_slug_key", || {
        ApiError::conflict("slug_taken", "An organization with this slug exists.")
    })?;
    let event = Event { org_id: id, ..event }.target("organization", id).details(json!({ "slug": slug, "name": name }));
    audit::record(conn, event).await?;
    crate::tiers::enroll(conn, id).await?;
    Ok(Organization { id, slug: slug.to_owned(), name: name.to_owned(), role: None, created_at })
}

/// Creates an organization (system admins).
#[utoipa::path(post, path = "/api/v1/organizations", tag = "organizations", request_body = CreateOrganization,
    security(("bearer" = []), ("api_key" = []), ("session_cookie" = [])),
    responses(
        (status = 201, body = Organization),
        (status = 403, body = Problem),
        (status = 409, body = Problem),
        (status = 422, body = Problem)))]
pub(super) async fn create_org(
    State(state): State<AppState>,
    actor: Actor,
    ValidatedJson(req): ValidatedJson<CreateOrganization>,
) -> ApiResult<(StatusCode, Json<Organization>)> {
    let name = req.name.trim();
    if name.is_empty() {
        return Err(ApiError::field("name", "length", "name must not be blank"));
    }
    let slug = match req.slug {
        Some(s) if valid_slug(&s) => s,
        Some(_) => return Err(ApiError::field("slug", "format", "lowercase letters, digits and inner dashes")),
        None => slugify(name),
    };
    let mut tx = state.db().begin().await?;
    let org = insert_organization(&mut tx, name, &slug, Event::by(&actor, Uuid::nil(), "organization.created")).await?;
    tx.commit().await?;
    Ok((StatusCode::CREATED, Json(org)))
}

/// The organizations the caller belongs to (all of them for a system admin).
#[utoipa::path(get, path = "/api/v1/organizations", tag = "organizations", params(PageQuery),
    security(("bearer" = []), ("api_key" = []), ("session_cookie" = [])),
    responses((status = 200, body = OrganizationPage), (status = 400, body = Problem), (status = 401, body = Problem)))]
pub(super) async fn list_orgs(
    State(state): State<AppState>,
    actor: Actor,
    ApiQuery(q): ApiQuery<PageQuery>,
) -> ApiResult<Json<OrganizationPage>> {
    let limit = pagination::limit(q.limit)?;
    // An API key sees only its own organization.
    let only: Option<Uuid> = match &actor.principal.credential {
        super::Credential::ApiKey { org_id, .. } => Some(*org_id),
        _ => None,
    };
    let all = actor.is_system_admin() && only.is_none();
    let rows = sqlx::query!(
        r#"select o.organization_id, o.slug, o.name, o.created_at, m.role as "role?"
           from organization o
           left join membership m on m.organization_id = o.organization_id and m.user_id = $1
           where ($2 or m.user_id is not null)
             and ($3::uuid is null or o.organization_id = $3)
             and ($4::uuid is null or o.organization_id > $4)
           order by o.organization_id limit $5"#,
        actor.user_id(),
        all,
        only,
        q.after,
        limit + 1
    )
    .fetch_all(state.db())
    .await?;
    let items: Vec<Organization> = rows
        .into_iter()
        .map(|r| Organization {
            id: r.organization_id,
            slug: r.slug,
            name: r.name,
            role: r.role.as_deref().and_then(Role::parse),
            created_at: r.created_at,
        })
        .collect();
    let (items, next_cursor) = pagination::page(items, limit, |o| o.id);
    Ok(Json(OrganizationPage { items, next_cursor }))
}

/// One organization the caller can see; any other is 404.
#[utoipa::path(get, path = "/api/v1/organizations/{id}", tag = "organizations", params(("id" = Uuid, Path)),
    security(("bearer" = []), ("api_key" = []), ("session_cookie" = [])),
    responses((status = 200, body = Organization), (status = 401, body = Problem), (status = 404, body = Problem)))]
pub(super) async fn get_org(
    State(state): State<AppState>,
    actor: Actor,
    ApiPath(id): ApiPath<Uuid>,
) -> ApiResult<Json<Organization>> {
    let r =
        sqlx::query!("select organization_id, slug, name, created_at from organization where organization_id = $1", id)
            .fetch_optional(state.db())
            .await?
            .ok_or(ApiError::NotFound)?;
    Ok(Json(Organization {
        id: r.organization_id,
        slug: r.slug,
        name: r.name,
        role: actor.role_in(id),
        created_at: r.created_at,
    }))
}

/// Members of an organization.
#[utoipa::path(get, path = "/api/v1/organizations/{id}/members", tag = "organizations", params(("id" = Uuid, Path)),
    security(("bearer" = []), ("api_key" = []), ("session_cookie" = [])),
    responses((status = 200, body = Vec<Member>), (status = 401, body = Problem), (status = 404, body = Problem)))]
pub(super) async fn list_members(
    State(state): State<AppState>,
    _actor: Actor,
    ApiPath(id): ApiPath<Uuid>,
) -> ApiResult<Json<Vec<Member>>> {
    let rows = sqlx::query!(
        "select u.user_id, u.email, u.display_name, u.status, m.role, m.created_at
         from membership m join app_user u using (user_id)
         where m.organization_id = $1 order by m.created_at, u.user_id limit 10000",
        id
    )
    .fetch_all(state.db())
    .await?;
    Ok(Json(
        rows.into_iter()
            .map(|r| Member {
                user_id: r.user_id,
                email: r.email,
                display_name: r.display_name,
                role: Role::parse(&r.role).unwrap_or(Role::Member),
                status: r.status,
                joined_at: r.created_at,
            })
            .collect(),
    ))
}

/// Locks the organization row so membership changes in one org run one at a time (the last-owner
/// rule needs that); 404 if it does not exist.
async fn lock_org(conn: &mut PgConnection, org_id: Uuid) -> ApiResult<()> {
    sqlx::query_scalar!("select organization_id from organization where organization_id = $1 for update", org_id)
        .fetch_optional(&mut *conn)
        .await?
        .ok_or(ApiError::NotFound)?;
    Ok(())
}

/// Only an owner may make or unmake owners.
fn check_owner_change(actor: &Actor, org_id: Uuid, touches_owner: bool) -> ApiResult<()> {
    if touches_owner {
        actor.require_role(org_id, Role::Owner)?;
    }
    Ok(())
}

/// Invites someone to the organization by email. Nobody becomes a member until they accept, and
/// the answer is the same whether or not the email has an account anywhere (no user id, nothing
/// that tells them apart), so an admin can neither attach another organization's user nor probe
/// which emails are registered.
#[utoipa::path(post, path = "/api/v1/organizations/{id}/members", tag = "organizations", params(("id" = Uuid, Path)),
    request_body = AddMember,
    security(("bearer" = []), ("api_key" = []), ("session_cookie" = [])),
    responses(
        (status = 202, description = "Invited; the invitee accepts", body = CreatedInvitation),
        (status = 403, body = Problem),
        (status = 404, body = Problem),
        (status = 422, body = Problem)))]
pub(super) async fn add_member(
    State(state): State<AppState>,
    actor: Actor,
    ApiPath(org_id): ApiPath<Uuid>,
    ValidatedJson(req): ValidatedJson<AddMember>,
) -> ApiResult<(StatusCode, Json<CreatedInvitation>)> {
    check_owner_change(&actor, org_id, req.role == Role::Owner)?;
    let token = crypto::random_token(super::invitations::TOKEN_PREFIX);
    let id = Uuid::now_v7();
    let ttl = state.config().auth.password_token_ttl_secs as f64;
    let mut tx = state.db().begin().await?;
    lock_org(&mut tx, org_id).await?;
    let row = sqlx::query!(
        "insert into invitation (invitation_id, organization_id, email, role, display_name, invited_by, token_hash, expires_at)
         values ($1, $2, $3, $4, $5, $6, $7, now() + make_interval(secs => $8))
         returning created_at, expires_at",
        id,
        org_id,
        req.email,
        req.role.as_str(),
        req.display_name,
        actor.user_id(),
        &crypto::sha256(&token)[..],
        ttl
    )
    .fetch_one(&mut *tx)
    .await?;
    audit::record(
        &mut tx,
        Event::by(&actor, org_id, "member.invited")
            .target("invitation", id)
            .details(json!({ "role": req.role.as_str() })),
    )
    .await?;
    tx.commit().await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(CreatedInvitation {
            invitation: Invitation {
                id,
                organization_id: org_id,
                email: req.email,
                role: req.role,
                status: "pending".into(),
                created_at: row.created_at,
                expires_at: row.expires_at,
            },
            invitation_token: token,
        }),
    ))
}

async fn owner_count(conn: &mut PgConnection, org_id: Uuid) -> ApiResult<i64> {
    Ok(sqlx::query_scalar!(
        r#"select count(*) as "n!" from membership where organization_id = $1 and role = 'owner'"#,
        org_id
    )
    .fetch_one(&mut *conn)
    .await?)
}

async fn current_role(conn: &mut PgConnection, org_id: Uuid, user_id: Uuid) -> ApiResult<Role> {
    let role =
        sqlx::query_scalar!("select role from membership where organization_id = $1 and user_id = $2", org_id, user_id)
            .fetch_optional(&mut *conn)
            .await?
            .ok_or(ApiError::NotFound)?;
    Role::parse(&role).ok_or_else(|| ApiError::Internal(anyhow::anyhow!("unknown role {role}")))
}

/// Changes a member's role. The last owner cannot be demoted.
#[utoipa::path(patch, path = "/api/v1/organizations/{id}/members/{user_id}", tag = "organizations",
    params(("id" = Uuid, Path), ("user_id" = Uuid, Path)), request_body = UpdateMember,
    security(("bearer" = []), ("api_key" = []), ("session_cookie" = [])),
    responses(
        (status = 200, body = Member),
        (status = 403, body = Problem),
        (status = 404, body = Problem),
        (status = 409, description = "Would leave the organization without an owner", body = Problem),
        (status = 422, body = Problem)))]
pub(super) async fn update_member(
    State(state): State<AppState>,
    actor: Actor,
    ApiPath((org_id, user_id)): ApiPath<(Uuid, Uuid)>,
    ApiJson(req): ApiJson<UpdateMember>,
) -> ApiResult<Json<Member>> {
    let mut tx = state.db().begin().await?;
    lock_org(&mut tx, org_id).await?;
    let old = current_role(&mut tx, org_id, user_id).await?;
    check_owner_change(&actor, org_id, old == Role::Owner || req.role == Role::Owner)?;
    if old == Role::Owner && req.role != Role::Owner && owner_count(&mut tx, org_id).await? <= 1 {
        return Err(ApiError::conflict("last_owner", "The last owner cannot be demoted; make another owner first."));
    }
    let r = sqlx::query!(
        "update membership m set role = $3 from app_user u
         where m.organization_id = $1 and m.user_id = $2 and u.user_id = m.user_id
         returning u.email, u.display_name, u.status, m.created_at",
        org_id,
        user_id,
        req.role.as_str()
    )
    .fetch_one(&mut *tx)
    .await?;
    audit::record(
        &mut tx,
        Event::by(&actor, org_id, "member.role_changed")
            .target("user", user_id)
            .details(json!({ "from": old.as_str(), "to": req.role.as_str() })),
    )
    .await?;
    let data = json!({ "user_id": user_id, "from": old.as_str(), "to": req.role.as_str() });
    crate::events::emit(
        &mut tx,
        org_id,
        "member.role_changed",
        format!("organizations/{org_id}/members/{user_id}"),
        data,
    )
    .await?;
    tx.commit().await?;
    credentials::invalidate(&state.auth().cache, state.redis(), Invalidation::User(user_id)).await;
    Ok(Json(Member {
        user_id,
        email: r.email,
        display_name: r.display_name,
        role: req.role,
        status: r.status,
        joined_at: r.created_at,
    }))
}

/// Removes a member. The last owner cannot be removed.
#[utoipa::path(delete, path = "/api/v1/organizations/{id}/members/{user_id}", tag = "organizations",
    params(("id" = Uuid, Path), ("user_id" = Uuid, Path)),
    security(("bearer" = []), ("api_key" = []), ("session_cookie" = [])),
    responses(
        (status = 204, description = "Removed"),
        (status = 403, body = Problem),
        (status = 404, body = Problem),
        (status = 409, body = Problem)))]
pub(super) async fn remove_member(
    State(state): State<AppState>,
    actor: Actor,
    ApiPath((org_id, user_id)): ApiPath<(Uuid, Uuid)>,
) -> ApiResult<StatusCode> {
    let mut tx = state.db().begin().await?;
    lock_org(&mut tx, org_id).await?;
    let old = current_role(&mut tx, org_id, user_id).await?;
    check_owner_change(&actor, org_id, old == Role::Owner)?;
    if old == Role::Owner && owner_count(&mut tx, org_id).await? <= 1 {
        return Err(ApiError::conflict("last_owner", "The last owner cannot be removed."));
    }
    sqlx::query!("delete from membership where organization_id = $1 and user_id = $2", org_id, user_id)
        .execute(&mut *tx)
        .await?;
    audit::record(
        &mut tx,
        Event::by(&actor, org_id, "member.removed").target("user", user_id).details(json!({ "role": old.as_str() })),
    )
    .await?;
    let data = json!({ "user_id": user_id, "role": old.as_str() });
    crate::events::emit(&mut tx, org_id, "member.removed", format!("organizations/{org_id}/members/{user_id}"), data)
        .await?;
    let hang = crate::delegation::Hang::Member { org_id, user_id };
    let ending = crate::delegation::end_hanging(&state, &mut tx, hang, Some(&actor)).await?;
    tx.commit().await?;
    credentials::invalidate(&state.auth().cache, state.redis(), Invalidation::User(user_id)).await;
    crate::delegation::finish(&state, ending).await;
    Ok(StatusCode::NO_CONTENT)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slugs() {
        assert_eq!(slugify("Acme Robotics, Inc."), "acme-robotics-inc");
        assert!(valid_slug(&slugify("Ω")));
        assert!(valid_slug("abc"));
        assert!(!valid_slug("-abc"));
        assert!(!valid_slug("ab"));
        assert!(!valid_slug("Abc"));
    }
}
