//! What other modules may learn about organizations. `auth` owns the `organization` table; the
//! policy store, the decision point and analytics ask through these functions, never its SQL.

use std::collections::{HashMap, HashSet};

use sqlx::{PgConnection, PgPool};
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
