//! The tamper-evident audit log: one SHA-256 hash chain per organization.
//!
//! Each event stores the previous event's hash and its own hash over a canonical serialization of
//! its fields. Events are written by [`record`] inside the caller's transaction, so a change and its
//! event commit together. Writers lock the chain head row, so concurrent writers queue instead of
//! forking the chain. [`verify`] walks a chain and names the first event that does not check out.

mod handlers;
pub mod model;

use serde_json::Value;
use sha2::{Digest, Sha256};
use sqlx::PgConnection;
use time::OffsetDateTime;
use utoipa_axum::{router::OpenApiRouter, routes};
use uuid::Uuid;

use crate::{auth::Actor, http::request_id::current_request_id, state::AppState};

/// The chain of events that belong to no organization.
pub const SYSTEM_CHAIN: Uuid = Uuid::nil();

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(handlers::list)).routes(routes!(handlers::verify))
}

/// What happened, by whom, to what. `record` adds time, ids and the chain.
#[derive(Debug, Clone)]
pub struct Event {
    pub org_id: Uuid,
    pub actor_id: Option<String>,
    pub actor_type: Option<String>,
    pub action: &'static str,
    pub target_type: Option<&'static str>,
    pub target_id: Option<String>,
    pub details: Value,
}

impl Event {
    /// An event done by `actor` in `org_id`.
    pub fn by(actor: &Actor, org_id: Uuid, action: &'static str) -> Self {
        Self {
            org_id,
            actor_id: Some(actor.actor_id()),
            actor_type: Some(actor.actor_type.as_str().to_owned()),
            action,
            target_type: None,
            target_id: None,
            details: Value::Object(Default::default()),
        }
    }

    /// An event with no authenticated actor (failed logins, bootstrap).
    pub fn anonymous(org_id: Uuid, action: &'static str) -> Self {
        Self {
            org_id,
            actor_id: None,
            actor_type: None,
            action,
            target_type: None,
            target_id: None,
            details: Value::Object(Default::default()),
        }
    }

    pub fn actor(mut self, actor_id: String, actor_type: &str) -> Self {
        self.actor_id = Some(actor_id);
        self.actor_type = Some(actor_type.to_owned());
        self
    }

    pub fn target(mut self, kind: &'static str, id: impl ToString) -> Self {
        self.target_type = Some(kind);
        self.target_id = Some(id.to_string());
        self
    }

    pub fn details(mut self, details: Value) -> Self {
        self.details = details;
        self
    }
}

/// The fields that are hashed, in their canonical order.
struct Hashed<'a> {
    id: Uuid,
    org_id: Uuid,
    seq: i64,
    occurred_at: OffsetDateTime,
    actor_id: Option<&'a str>,
    actor_type: Option<&'a str>,
    action: &'a str,
    target_type: Option<&'a str>,
    target_id: Option<&'a str>,
    client_ip: Option<&'a str>,
    request_id: Option<&'a str>,
    details: &'a str,
}

impl Hashed<'_> {
    fn hash(&self, prev: &[u8]) -> [u8; 32] {
        // A JSON array of the fields: unambiguous (no concatenation collisions) and stable.
        let canonical = serde_json::json!([
            self.id.to_string(),
            self.org_id.to_string(),
            self.seq,
            (self.occurred_at.unix_timestamp_nanos() / 1000) as i64,
            self.actor_id,
            self.actor_type,
            self.action,
            self.target_type,
            self.target_id,
            self.client_ip,
            self.request_id,
            self.details,
        ])
        .to_string();
        let mut h = Sha256::new();
        h.update(prev);
        h.update(canonical.as_bytes());
        h.finalize().into()
    }
}

const GENESIS: [u8; 32] = [0u8; 32];

/// Appends an event to its organization's chain inside the caller's transaction.
pub async fn record(conn: &mut PgConnection, event: Event) -> Result<(), sqlx::Error> {
    sqlx::query!(
        "insert into audit_chain (organization_id, last_seq, last_hash) values ($1, 0, $2)
         on conflict (organization_id) do nothing",
        event.org_id,
        &GENESIS[..]
    )
    .execute(&mut *conn)
    .await?;
    let head =
        sqlx::query!("select last_seq, last_hash from audit_chain where organization_id = $1 for update", event.org_id)
            .fetch_one(&mut *conn)
            .await?;
    let id = Uuid::now_v7();
    let seq = head.last_seq + 1;
    // Postgres keeps microseconds; hash exactly what will be read back.
    let now = OffsetDateTime::now_utc();
    let occurred_at = now.replace_nanosecond(now.nanosecond() / 1000 * 1000).unwrap_or(now);
    // Hashed exactly as stored: verification reads this text back, never re-serializes it.
    let details = event.details.to_string();
    let request_id = current_request_id();
    let client_ip = crate::http::middleware::tls::current_client_ip();
    let hash = Hashed {
        id,
        org_id: event.org_id,
        seq,
        occurred_at,
        actor_id: event.actor_id.as_deref(),
        actor_type: event.actor_type.as_deref(),
        action: event.action,
        target_type: event.target_type,
        target_id: event.target_id.as_deref(),
        client_ip: client_ip.as_deref(),
        request_id: request_id.as_deref(),
        details: &details,
    }
    .hash(&head.last_hash);
    sqlx::query!(
        "insert into audit_event (audit_event_id, organization_id, seq, occurred_at, actor_id, actor_type, action,
             target_type, target_id, client_ip, request_id, details, prev_hash, hash)
         values ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)",
        id,
        event.org_id,
        seq,
        occurred_at,
        event.actor_id,
        event.actor_type,
        event.action,
        event.target_type,
        event.target_id,
        client_ip,
        request_id,
        details,
        head.last_hash,
        &hash[..]
    )
    .execute(&mut *conn)
    .await?;
    sqlx::query!(
        "update audit_chain set last_seq = $2, last_hash = $3 where organization_id = $1",
        event.org_id,
        seq,
        &hash[..]
    )
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// How many events the organization's chain holds: it grows with every audited change, so a
/// cache of anything computed from the organization's state can use it as its version.
pub async fn head_seq(pool: &sqlx::PgPool, org_id: Uuid) -> Result<i64, sqlx::Error> {
    let seq = sqlx::query_scalar!("select last_seq from audit_chain where organization_id = $1", org_id)
        .fetch_optional(pool)
        .await?;
    Ok(seq.unwrap_or(0))
}

/// The outcome of walking one chain.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct Verification {
    pub valid: bool,
    pub events_checked: i64,
    /// The first event whose link or hash does not match; null when valid, or when events are
    /// missing from the end of the chain.
    pub first_invalid_event_id: Option<Uuid>,
}

/// Recomputes every hash of an organization's chain, in pages.
pub async fn verify(pool: &sqlx::PgPool, org_id: Uuid) -> Result<Verification, sqlx::Error> {
    let mut prev = GENESIS.to_vec();
    let mut expected_seq = 1i64;
    let mut checked = 0i64;
    loop {
        let rows = sqlx::query!(
            "select audit_event_id, seq, occurred_at, actor_id, actor_type, action, target_type, target_id,
                    client_ip, request_id, details, prev_hash, hash
             from audit_event where organization_id = $1 and seq >= $2 order by seq limit 1000",
            org_id,
            expected_seq
        )
        .fetch_all(pool)
        .await?;
        if rows.is_empty() {
            break;
        }
        for r in &rows {
            checked += 1;
            let computed = Hashed {
                id: r.audit_event_id,
                org_id,
                seq: r.seq,
                occurred_at: r.occurred_at,
                actor_id: r.actor_id.as_deref(),
                actor_type: r.actor_type.as_deref(),
                action: &r.action,
                target_type: r.target_type.as_deref(),
                target_id: r.target_id.as_deref(),
                client_ip: r.client_ip.as_deref(),
                request_id: r.request_id.as_deref(),
                details: &r.details,
            }
            .hash(&prev);
            let linked = r.seq == expected_seq && crate::crypto::ct_eq(&r.prev_hash, &prev);
            if !linked || !crate::crypto::ct_eq(&computed, &r.hash) {
                return Ok(Verification {
                    valid: false,
                    events_checked: checked,
                    first_invalid_event_id: Some(r.audit_event_id),
                });
            }
            prev = r.hash.clone();
            expected_seq += 1;
        }
    }
    // Events cut from the end leave no broken link behind; the head still remembers them.
    let head = sqlx::query!("select last_seq, last_hash from audit_chain where organization_id = $1", org_id)
        .fetch_optional(pool)
        .await?;
    let tail_ok = match head {
        Some(h) => h.last_seq == expected_seq - 1 && crate::crypto::ct_eq(&h.last_hash, &prev),
        None => checked == 0,
    };
    Ok(Verification { valid: tail_ok, events_checked: checked, first_invalid_event_id: None })
}
