//! `agentidp bootstrap`: the first organization, its owner, who is also the first system admin.

use serde_json::json;
use uuid::Uuid;

use super::orgs::{insert_organization, slugify};
use crate::{
    audit::{self, Event},
    crypto,
};

/// What bootstrap did, or why it did nothing.
pub enum Outcome {
    Created { org_id: Uuid, user_id: Uuid, generated_password: Option<String> },
    AlreadyDone(String),
}

/// Creates org, owner and system admin in one transaction; changes nothing if any of them exists.
pub async fn run(
    pool: &sqlx::PgPool,
    org_name: &str,
    email: &str,
    password: Option<String>,
) -> anyhow::Result<Outcome> {
    let org_name = org_name.trim();
    anyhow::ensure!(!org_name.is_empty() && org_name.len() <= 200, "--org must be 1 to 200 characters");
    let email = email.trim();
    anyhow::ensure!(validator::ValidateEmail::validate_email(&email), "--email is not a valid email address");
    if let Some(p) = &password {
        anyhow::ensure!((12..=256).contains(&p.chars().count()), "the password must be 12 to 256 characters");
    }
    let slug = slugify(org_name);
    let mut tx = pool.begin().await?;
    // Two bootstraps at once: the second waits here and then finds the first's work.
    sqlx::query!("select pg_advisory_xact_lock(7272)").execute(&mut *tx).await?;
    if let Some(e) =
        sqlx::query_scalar!("select email from app_user where system_admin limit 1").fetch_optional(&mut *tx).await?
    {
        return Ok(Outcome::AlreadyDone(format!("a system admin already exists ({e})")));
    }
    if sqlx::query_scalar!("select 1 as one from app_user where lower(email) = lower($1)", email)
        .fetch_optional(&mut *tx)
        .await?
        .is_some()
    {
        return Ok(Outcome::AlreadyDone(format!("a user with email {email} already exists")));
    }
    if sqlx::query_scalar!("select 1 as one from organization where slug = $1", slug)
        .fetch_optional(&mut *tx)
        .await?
        .is_some()
    {
        return Ok(Outcome::AlreadyDone(format!("an organization with slug {slug} already exists")));
    }
    let (password, generated) = match password {
        Some(p) => (p, None),
        None => {
            let p = crypto::random_password();
            (p.clone(), Some(p))
        }
    };
    let hash = crypto::hash_password(password).await?;
    let user_id = Uuid::now_v7();
    sqlx::query!(
        "insert into app_user (user_id, email, password_hash, system_admin) values ($1, $2, $3, true)",
        user_id,
        email,
        hash
    )
    .execute(&mut *tx)
    .await?;
    let actor = format!("user:{user_id}");
    let org = insert_organization(
        &mut tx,
        org_name,
        &slug,
        Event::anonymous(Uuid::nil(), "organization.created").actor(actor.clone(), "human"),
    )
    .await
    .map_err(|e| anyhow::anyhow!("{e}"))?;
    sqlx::query!("insert into membership (organization_id, user_id, role) values ($1, $2, 'owner')", org.id, user_id)
        .execute(&mut *tx)
        .await?;
    audit::record(
        &mut tx,
        Event::anonymous(org.id, "member.added")
            .actor(actor, "human")
            .target("user", user_id)
            .details(json!({ "role": "owner", "system_admin": true, "via": "bootstrap" })),
    )
    .await?;
    tx.commit().await?;
    Ok(Outcome::Created { org_id: org.id, user_id, generated_password: generated })
}
