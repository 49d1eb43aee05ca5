//! What other modules may learn about organizations. `auth` owns the `organization` table; the
//! policy store, the decision point, analytics and the trust documents ask through these functions,
//! never its SQL.

use std::collections::{HashMap, HashSet};

use sqlx::{PgConnection, PgPool};
use time::OffsetDateTime;
use uuid::Uuid;

/// The ids of the organizations with these slugs; a slug no organization has is absent.
pub async fn ids_by_slug(db: &PgPool, slugs: &[String]) -> sqlx::Result<HashMap<String, Uuid>> {
    if slugs.is_empty() {
        return Ok(HashMap::new());
    }
    let rows = sqlx::query!("select slug, organization_id from organization where slug = any($1)", slugs)
        .fetch_all(db)
        .await?;
    Ok(rows.into_iter().map(|r| (r.slug, r.organization_id)).collect())
}

/// Locks the organization's row until the transaction ends, so that changes made in its name
/// (a new policy version, an activation) happen one at a time. `false`: no such organization.
pub async fn lock(conn: &mut PgConnection, org_id: Uuid) -> sqlx::Result<bool> {
    let row =
        sqlx::query_scalar!("select organization_id from organization where organization_id = $1 for update", org_id)
            .fetch_optional(conn)
            .await?;
    Ok(row.is_some())
}

/// Which of these organizations exist.
pub async fn existing(db: &PgPool, ids: &[Uuid]) -> sqlx::Result<HashSet<Uuid>> {
    if ids.is_empty() {
        return Ok(HashSet::new());
    }
    let rows = sqlx::query_scalar!("select organization_id from organization where organization_id = any($1)", ids)
        .fetch_all(db)
        .await?;
    Ok(rows.into_iter().collect())
}

/// The organization of each of these agents that exists (the usage ingest checks that an event's
/// agent belongs to the event's organization).
pub async fn agent_orgs(db: &PgPool, ids: &[Uuid]) -> sqlx::Result<Vec<(Uuid, Uuid)>> {
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    let rows =
        sqlx::query!("select agent_id, organization_id from agent where agent_id = any($1)", ids).fetch_all(db).await?;
    Ok(rows.into_iter().map(|r| (r.agent_id, r.organization_id)).collect())
}

/// What may be said of an agent outside its organization (its did:web document, its agent card,
/// its marketplace listing): never its owner, metadata or credentials.
#[derive(Debug, Clone)]
pub struct AgentProfile {
    pub id: Uuid,
    pub org_id: Uuid,
    pub org_slug: String,
    pub org_name: String,
    /// For the policy check of changes to the agent; never shown.
    pub owner_id: Uuid,
    pub name: String,
    pub description: String,
    pub capabilities: Vec<String>,
    pub allowed_scopes: Vec<String>,
    pub active: bool,
    pub listed_at: Option<OffsetDateTime>,
    pub updated_at: OffsetDateTime,
}

/// The profile query, with its own `where`/`order` tail and arguments.
macro_rules! profiles {
    ($tail:literal $(, $arg:expr)*) => {
        sqlx::query!(
            "select a.agent_id, a.organization_id, o.slug, o.name as org_name, a.name, a.description,
                    a.owner_id, a.capabilities, a.allowed_scopes, a.status, a.listed_at, a.updated_at
             from agent a join organization o using (organization_id) "
                + $tail
            $(, $arg)*
        )
    };
}

macro_rules! profile_of {
    ($r:expr) => {
        AgentProfile {
            id: $r.agent_id,
            org_id: $r.organization_id,
            org_slug: $r.slug,
            org_name: $r.org_name,
            owner_id: $r.owner_id,
            name: $r.name,
            description: $r.description,
            capabilities: $r.capabilities,
            allowed_scopes: $r.allowed_scopes,
            active: $r.status == "active",
            listed_at: $r.listed_at,
            updated_at: $r.updated_at,
        }
    };
}

/// One agent, whatever its organization (the public documents are found by the agent id alone).
pub async fn agent_profile(db: &PgPool, agent_id: Uuid) -> sqlx::Result<Option<AgentProfile>> {
    let row = profiles!("where a.agent_id = $1", agent_id).fetch_optional(db).await?;
    Ok(row.map(|r| profile_of!(r)))
}

/// Every agent of an organization, by name (the agent-card export).
pub async fn agent_profiles(db: &PgPool, org_id: Uuid) -> sqlx::Result<Vec<AgentProfile>> {
    let rows = profiles!("where a.organization_id = $1 order by a.name, a.agent_id", org_id).fetch_all(db).await?;
    Ok(rows.into_iter().map(|r| profile_of!(r)).collect())
}

/// Lists or unlists an agent of the organization; `None` when it has no such agent.
pub async fn set_listing(
    conn: &mut PgConnection,
    org_id: Uuid,
    agent_id: Uuid,
    listed_by: Option<Uuid>,
    listed: bool,
) -> sqlx::Result<Option<Uuid>> {
    sqlx::query_scalar!(
        "update agent set listed_at = case when $3 then coalesce(listed_at, now()) end,
                          listed_by = case when $3 then coalesce(listed_by, $4) end
         where agent_id = $1 and organization_id = $2
         returning agent_id",
        agent_id,
        org_id,
        listed,
        listed_by
    )
    .fetch_optional(conn)
    .await
}

/// Active listed agents, newest listing first, after the cursor `(listed_at, agent_id)`.
pub async fn listed_agents(
    db: &PgPool,
    text: Option<&str>,
    capability: Option<&str>,
    after: Option<(OffsetDateTime, Uuid)>,
    limit: i64,
) -> sqlx::Result<Vec<AgentProfile>> {
    let (after_at, after_id) = after.unzip();
    let rows = profiles!(
        "where a.listed_at is not null and a.status = 'active'
               and ($1::text is null or a.name ilike '%' || $1 || '%' or a.description ilike '%' || $1 || '%')
               and ($2::text is null or $2 = any(a.capabilities))
               and ($3::timestamptz is null or (a.listed_at, a.agent_id) < ($3, $4))
             order by a.listed_at desc, a.agent_id desc limit $5",
        text,
        capability,
        after_at,
        after_id,
        limit
    )
    .fetch_all(db)
    .await?;
    Ok(rows.into_iter().map(|r| profile_of!(r)).collect())
}

/// An agent's registered public key.
#[derive(Debug, Clone)]
pub struct AgentKey {
    pub id: Uuid,
    pub kid: String,
    pub public_jwk: serde_json::Value,
    pub created_at: OffsetDateTime,
}

/// The agent's public keys, oldest first.
pub async fn agent_keys(db: &PgPool, agent_id: Uuid) -> sqlx::Result<Vec<AgentKey>> {
    let rows = sqlx::query!(
        "select agent_key_id, kid, public_jwk, created_at from agent_key where agent_id = $1 order by created_at, kid",
        agent_id
    )
    .fetch_all(db)
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| AgentKey { id: r.agent_key_id, kid: r.kid, public_jwk: r.public_jwk, created_at: r.created_at })
        .collect())
}

/// Registers a public key for an agent of the organization. `Ok(None)`: no such agent.
pub async fn add_agent_key(
    conn: &mut PgConnection,
    org_id: Uuid,
    agent_id: Uuid,
    kid: &str,
    jwk: &serde_json::Value,
) -> sqlx::Result<Option<AgentKey>> {
    let row = sqlx::query!(
        "insert into agent_key (agent_key_id, agent_id, organization_id, kid, public_jwk)
         select $1, agent_id, organization_id, $4, $5 from agent where agent_id = $2 and organization_id = $3
         returning agent_key_id, kid, public_jwk, created_at",
        Uuid::now_v7(),
        agent_id,
        org_id,
        kid,
        jwk
    )
    .fetch_optional(conn)
    .await?;
    Ok(row.map(|r| AgentKey { id: r.agent_key_id, kid: r.kid, public_jwk: r.public_jwk, created_at: r.created_at }))
}

/// Removes one of an agent's public keys; `false` when the organization's agent has no such key.
pub async fn delete_agent_key(conn: &mut PgConnection, org_id: Uuid, agent_id: Uuid, kid: &str) -> sqlx::Result<bool> {
    let done = sqlx::query!(
        "delete from agent_key where organization_id = $1 and agent_id = $2 and kid = $3",
        org_id,
        agent_id,
        kid
    )
    .execute(conn)
    .await?;
    Ok(done.rows_affected() > 0)
}

/// The identity facts a compliance report is computed from, for one organization.
#[derive(Debug, Clone, Default)]
pub struct IdentityFacts {
    pub agents: i64,
    /// Agents whose owner is no longer an active member of the organization.
    pub agents_without_owner: i64,
    pub credentials: i64,
    /// Active agent credentials not created or rotated since the cut-off.
    pub credentials_stale: i64,
    pub api_keys: i64,
    pub api_keys_without_expiry: i64,
    pub api_keys_stale: i64,
    pub owners: i64,
    pub admins: i64,
    /// When the signing key in use was made.
    pub signing_key_created_at: Option<OffsetDateTime>,
}

/// Counts the facts; `stale_before` is the age limit's cut-off on the application's clock.
pub async fn identity_facts(db: &PgPool, org_id: Uuid, stale_before: OffsetDateTime) -> sqlx::Result<IdentityFacts> {
    let r = sqlx::query!(
        r#"select
             (select count(*) from agent where organization_id = $1) as "agents!",
             (select count(*) from agent a where a.organization_id = $1 and not exists (
                 select 1 from membership m join app_user u using (user_id)
                 where m.organization_id = a.organization_id and m.user_id = a.owner_id and u.status = 'active'))
               as "agents_without_owner!",
             (select count(*) from agent_credential where organization_id = $1 and revoked_at is null) as "credentials!",
             (select count(*) from agent_credential where organization_id = $1 and revoked_at is null
                 and coalesce(rotated_at, created_at) < $2) as "credentials_stale!",
             (select count(*) from api_key where organization_id = $1 and revoked_at is null
                 and (expires_at is null or expires_at > $2)) as "api_keys!",
             (select count(*) from api_key where organization_id = $1 and revoked_at is null and expires_at is null)
               as "api_keys_without_expiry!",
             (select count(*) from api_key where organization_id = $1 and revoked_at is null and created_at < $2
                 and (expires_at is null or expires_at > $2)) as "api_keys_stale!",
             (select count(*) from membership where organization_id = $1 and role = 'owner') as "owners!",
             (select count(*) from membership where organization_id = $1 and role = 'admin') as "admins!",
             (select created_at from signing_key where status = 'active') as signing_key_created_at"#,
        org_id,
        stale_before
    )
    .fetch_one(db)
    .await?;
    Ok(IdentityFacts {
        agents: r.agents,
        agents_without_owner: r.agents_without_owner,
        credentials: r.credentials,
        credentials_stale: r.credentials_stale,
        api_keys: r.api_keys,
        api_keys_without_expiry: r.api_keys_without_expiry,
        api_keys_stale: r.api_keys_stale,
        owners: r.owners,
        admins: r.admins,
        signing_key_created_at: r.signing_key_created_at,
    })
}

/// The client ids of an agent's live credentials, newest first (the scaffold names one).
pub async fn agent_client_ids(db: &PgPool, org_id: Uuid, agent_id: Uuid) -> sqlx::Result<Vec<String>> {
    sqlx::query_scalar!(
        "select client_id from agent_credential
         where organization_id = $1 and agent_id = $2 and revoked_at is null order by created_at desc",
        org_id,
        agent_id
    )
    .fetch_all(db)
    .await
}
