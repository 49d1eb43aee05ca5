//! The transactional outbox: every module writes its domain events here, inside the transaction of
//! the change, so that a change and its event commit or roll back together.
//!
//! Events are CloudEvents 1.0 ([`CloudEvent`]). Nothing is published from a request: the webhook
//! dispatcher reads the outbox ([`claim_unfanned`]) and turns each event into deliveries. The
//! catalog of event types, with a JSON schema of each `data`, is [`CATALOG`].

mod catalog;
pub mod nats;

use serde::Serialize;
use serde_json::Value;
use sqlx::PgConnection;
use time::OffsetDateTime;
use uuid::Uuid;

pub use catalog::{CATALOG, EventType, is_known, matches_known};

/// The organization of platform events (signing key rotations): they go to every organization.
pub const PLATFORM: Uuid = Uuid::nil();

/// The Postgres channel a committed event is announced on, so dispatchers wake at once.
pub const CHANNEL: &str = "agentidp_events";

/// Writes an event into the outbox inside the caller's transaction; returns its id (UUIDv7).
///
/// `event_type` must be one of [`CATALOG`]; `subject` names what changed (`agents/<id>`).
pub async fn emit(
    conn: &mut PgConnection,
    org_id: Uuid,
    event_type: &'static str,
    subject: impl Into<String>,
    data: Value,
) -> Result<Uuid, sqlx::Error> {
    insert(conn, org_id, event_type, subject.into(), data, false).await
}

/// Like [`emit`], for an event its caller delivers itself (a `webhook.test` to one endpoint): it
/// is never fanned out to the organization's other endpoints.
pub async fn emit_addressed(
    conn: &mut PgConnection,
    org_id: Uuid,
    event_type: &'static str,
    subject: impl Into<String>,
    data: Value,
) -> Result<Uuid, sqlx::Error> {
    insert(conn, org_id, event_type, subject.into(), data, true).await
}

async fn insert(
    conn: &mut PgConnection,
    org_id: Uuid,
    event_type: &'static str,
    subject: String,
    data: Value,
    addressed: bool,
) -> Result<Uuid, sqlx::Error> {
    debug_assert!(is_known(event_type), "event type {event_type} is not in the catalog");
    let id = Uuid::now_v7();
    // One round trip. The notification is delivered at commit, never for a transaction that rolls
    // back, and wakes the dispatchers at once.
    sqlx::query!(
        "with written as (
             insert into event_outbox (event_id, organization_id, type, subject, data, fanned_out_at, published_at)
             values ($1, $2, $3, $4, $5, case when $6 then now() end, case when $6 then now() end)
             returning event_id)
         select pg_notify($7, '') from written",
        id,
        org_id,
        event_type,
        subject,
        data,
        addressed,
        CHANNEL
    )
    .execute(&mut *conn)
    .await?;
    Ok(id)
}

/// A time as RFC 3339, as event `data` carries it.
pub fn rfc3339(t: OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339).unwrap_or_default()
}

/// An event as stored.
#[derive(Debug, Clone)]
pub struct StoredEvent {
    pub id: Uuid,
    pub org_id: Uuid,
    pub event_type: String,
    pub subject: String,
    pub data: Value,
    pub occurred_at: OffsetDateTime,
}

/// The CloudEvents 1.0 JSON envelope (structured mode), with our `orgid` extension.
#[derive(Debug, Serialize)]
pub struct CloudEvent<'a> {
    pub specversion: &'static str,
    pub id: Uuid,
    /// The issuer URL (`server.public_url`).
    pub source: &'a str,
    #[serde(rename = "type")]
    pub type_: &'a str,
    pub subject: &'a str,
    #[serde(with = "time::serde::rfc3339")]
    pub time: OffsetDateTime,
    pub datacontenttype: &'static str,
    pub data: &'a Value,
    /// The organization it is delivered to (for platform events, the receiving one).
    pub orgid: Uuid,
}

impl StoredEvent {
    /// The envelope as sent to `org_id`: the same bytes on every attempt.
    pub fn envelope(&self, source: &str, org_id: Uuid) -> Vec<u8> {
        let ce = CloudEvent {
            specversion: "1.0",
            id: self.id,
            source,
            type_: &self.event_type,
            subject: &self.subject,
            time: self.occurred_at,
            datacontenttype: "application/json",
            data: &self.data,
            orgid: org_id,
        };
        serde_json::to_vec(&ce).unwrap_or_default()
    }
}

/// The id, organization and type of an event not yet fanned out.
#[derive(Debug, Clone)]
pub struct Pending {
    pub id: Uuid,
    pub org_id: Uuid,
    pub event_type: String,
}

/// Takes up to `limit` events that were never fanned out and marks them so, in the caller's
/// transaction: each is handed to exactly one caller, and back to the next if it rolls back.
/// Unless `published_to_nats` (events.nats on), they count as published too.
pub async fn claim_unfanned(
    conn: &mut PgConnection,
    limit: i64,
    published_to_nats: bool,
) -> Result<Vec<Pending>, sqlx::Error> {
    let rows = sqlx::query!(
        "update event_outbox set fanned_out_at = now(),
                published_at = case when $2 then published_at else coalesce(published_at, now()) end
         where event_id in (select event_id from event_outbox where fanned_out_at is null
                            order by event_id limit $1 for update skip locked)
         returning event_id, organization_id, type",
        limit,
        published_to_nats
    )
    .fetch_all(&mut *conn)
    .await?;
    Ok(rows.into_iter().map(|r| Pending { id: r.event_id, org_id: r.organization_id, event_type: r.r#type }).collect())
}

/// Events of an organization (and platform events) that occurred in `[since, until)`, oldest
/// first, for a replay.
pub async fn between(
    conn: &mut PgConnection,
    org_id: Uuid,
    since: OffsetDateTime,
    until: OffsetDateTime,
    limit: i64,
) -> Result<Vec<Pending>, sqlx::Error> {
    let rows = sqlx::query!(
        "select event_id, organization_id, type from event_outbox
         where organization_id in ($1, $2) and occurred_at >= $3 and occurred_at < $4
           and type <> 'webhook.test'
         order by occurred_at, event_id limit $5",
        org_id,
        PLATFORM,
        since,
        until,
        limit
    )
    .fetch_all(&mut *conn)
    .await?;
    Ok(rows.into_iter().map(|r| Pending { id: r.event_id, org_id: r.organization_id, event_type: r.r#type }).collect())
}

/// The events with these ids.
pub async fn load(db: impl sqlx::PgExecutor<'_>, ids: &[Uuid]) -> Result<Vec<StoredEvent>, sqlx::Error> {
    let rows = sqlx::query!(
        "select event_id, organization_id, type, subject, data, occurred_at from event_outbox
         where event_id = any($1)",
        ids
    )
    .fetch_all(db)
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| StoredEvent {
            id: r.event_id,
            org_id: r.organization_id,
            event_type: r.r#type,
            subject: r.subject,
            data: r.data,
            occurred_at: r.occurred_at,
        })
        .collect())
}

/// Wakes `wake` whenever an event commits (Postgres LISTEN), reconnecting after failures; callers
/// also poll, so a missed notification only delays.
pub async fn listen(db: sqlx::PgPool, wake: std::sync::Arc<tokio::sync::Notify>) {
    loop {
        match sqlx::postgres::PgListener::connect_with(&db).await {
            Ok(mut l) => {
                if l.listen(CHANNEL).await.is_ok() {
                    while l.recv().await.is_ok() {
                        wake.notify_one();
                    }
                }
            }
            Err(e) => tracing::debug!(error = %e, "event listener cannot connect"),
        }
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    }
}

/// How many events wait to be fanned out, and the age in seconds of the oldest.
pub async fn backlog(db: impl sqlx::PgExecutor<'_>) -> Result<(i64, f64), sqlx::Error> {
    let r = sqlx::query!(
        r#"select count(*) as "n!", coalesce(extract(epoch from now() - min(occurred_at))::float8, 0) as "age!"
           from event_outbox where fanned_out_at is null"#
    )
    .fetch_one(db)
    .await?;
    Ok((r.n, r.age))
}
