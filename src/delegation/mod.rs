//! The delegation broker: a human (or an agent acting under a delegation) delegates bounded
//! authority to an agent: a TTL, a command budget, a spend budget, a scope ceiling, ceremonies
//! and chains, with RFC 8693 token exchange (in [`crate::auth::oauth`]) and cascading revocation.
//!
//! - [`handlers`]: `/api/v1/delegations` and its commands and approvals.
//! - [`ceiling`]: how a delegation's scopes are bounded.
//! - [`spend`]: the spend budget, drawn down by the usage module as it ingests.
//! - [`canonical`]: RFC 8785 canonical JSON and the events' `chronicle_cid`.
//!
//! Ending a delegation ([`end_tree`]) ends its descendants with it, deletes ephemeral agents, and
//! writes a revocation watermark for `delegation:<id>` past the delegation's expiry, in the
//! caller's transaction; after the commit, [`finish`] announces the watermarks through the change
//! feed, exactly as token revocation does, so every instance refuses the tokens at once. Tokens
//! never outlive their delegation's expiry, whether or not the sweeper has run.

pub mod canonical;
pub mod ceiling;
mod config;
mod handlers;
pub mod model;
pub mod spend;

use std::{collections::HashMap, time::Duration};

use serde_json::{Value, json};
use sqlx::PgConnection;
use time::OffsetDateTime;
use utoipa_axum::{router::OpenApiRouter, routes};
use uuid::Uuid;

pub use config::{Ceilings, DelegationConfig};

use crate::{
    audit,
    auth::{
        Actor,
        revocation::{self, Announced, Subject},
    },
    state::AppState,
};

/// The event codes of the original broker's chronicle, carried in each event's `event_code`.
pub const DELEGATION_CREATED: i64 = 0x3001;
pub const DELEGATION_REVOKED: i64 = 0x3003;
pub const DELEGATION_EXPIRED: i64 = 0x3004;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(handlers::create_delegation, handlers::list_delegations))
        .routes(routes!(handlers::get_delegation))
        .routes(routes!(handlers::revoke_delegation))
        .routes(routes!(handlers::check_command))
        .routes(routes!(handlers::list_approvals))
        .routes(routes!(handlers::approve_ceremony))
        .routes(routes!(handlers::deny_ceremony))
}

/// What a delegation hangs on: when it ends, the delegations made with it end too.
pub enum Hang {
    /// The credential the delegator used: `session:<id>` or `api_key:<id>`.
    Credential(String),
    /// The delegator's membership of the organization.
    Member { org_id: Uuid, user_id: Uuid },
    /// The agent, suspended (`agent_suspended`) or deleted (`agent_deleted`).
    Agent { org_id: Uuid, agent_id: Uuid, reason: &'static str },
}

/// One delegation as [`end_tree`] ended it.
struct EndedRow {
    delegation_id: Uuid,
    organization_id: Uuid,
    parent_id: Option<Uuid>,
    agent_id: Uuid,
    ephemeral: bool,
    expires_at: OffsetDateTime,
    status: String,
    ended_reason: String,
    commands_executed: i32,
    max_commands: i32,
    delegator_id: String,
}

/// What ended in a transaction, to announce after its commit with [`finish`].
#[must_use = "announce the ending after the commit with delegation::finish"]
#[derive(Default)]
pub struct Ending {
    pub ended: Vec<Ended>,
    announced: Vec<Announced>,
    client_ids: Vec<String>,
}

/// One delegation that ended.
#[derive(Debug, Clone)]
pub struct Ended {
    pub delegation_id: Uuid,
    pub status: String,
    pub reason: String,
    pub chronicle_cid: String,
}

/// Ends every active delegation that hangs on `hang` (and their descendants) in the caller's
/// transaction.
pub async fn end_hanging(
    state: &AppState,
    conn: &mut PgConnection,
    hang: Hang,
    by: Option<&Actor>,
) -> Result<Ending, sqlx::Error> {
    let (roots, reason): (Vec<Uuid>, &str) = match &hang {
        Hang::Credential(key) => (
            sqlx::query_scalar!(
                "select delegation_id from delegation where delegator_credential = $1 and status = 'active'",
                key
            )
            .fetch_all(&mut *conn)
            .await?,
            "credential_ended",
        ),
        Hang::Member { org_id, user_id } => (
            sqlx::query_scalar!(
                "select delegation_id from delegation
                 where organization_id = $1 and delegator_id = $2 and status = 'active'",
                org_id,
                format!("user:{user_id}")
            )
            .fetch_all(&mut *conn)
            .await?,
            "member_removed",
        ),
        Hang::Agent { org_id, agent_id, reason } => (
            sqlx::query_scalar!(
                "select delegation_id from delegation where organization_id = $1 and agent_id = $2 and status = 'active'",
                org_id,
                agent_id
            )
            .fetch_all(&mut *conn)
            .await?,
            *reason,
        ),
    };
    if roots.is_empty() {
        return Ok(Ending::default());
    }
    let keep_agent = matches!(hang, Hang::Agent { reason: "agent_deleted", .. });
    end_tree(conn, state.clock().now(), &roots, "revoked", reason, by, keep_agent).await
}

/// Ends `roots` (with `status` and `reason`) and every active descendant (revoked, with reason
/// `parent_revoked` or `parent_expired`), in the caller's transaction: unused budgets go back to
/// parents that stay active, ephemeral agents are deleted (unless `keep_agents`: the caller is
/// deleting the agent itself), each delegation's tokens are revoked, and each end is an event
/// and an audit record. Each watermark is also announced with `pg_notify`, delivered at commit
/// (never for a rollback) to every instance's [`listen`]er, so that ends made without the
/// application at hand (a spend draw inside the usage module's ingest) reach every instance too.
pub async fn end_tree(
    conn: &mut PgConnection,
    now: OffsetDateTime,
    roots: &[Uuid],
    status: &str,
    reason: &str,
    by: Option<&Actor>,
    keep_agents: bool,
) -> Result<Ending, sqlx::Error> {
    let child_reason = if status == "expired" { "parent_expired" } else { "parent_revoked" };
    // The roots first, locked: a child being made under one of them (which holds its parent's
    // lock) has committed before the tree is read, so the tree cannot miss it.
    sqlx::query!(
        "select delegation_id from delegation where delegation_id = any($1) order by delegation_id for update",
        roots
    )
    .fetch_all(&mut *conn)
    .await?;
    let mut rows = sqlx::query_as!(
        EndedRow,
        r#"with recursive tree as (
               select delegation_id from delegation where delegation_id = any($1) and status = 'active'
               union
               select d.delegation_id from delegation d join tree t on d.parent_id = t.delegation_id
               where d.status = 'active'
           )
           update delegation d set
               status = case when d.delegation_id = any($1) then $2 else 'revoked' end,
               ended_reason = case when d.delegation_id = any($1) then $3 else $4 end,
               ended_at = $5
           from tree where d.delegation_id = tree.delegation_id and d.status = 'active'
           returning d.delegation_id, d.organization_id, d.parent_id, d.agent_id, d.ephemeral, d.expires_at,
                     d.status, d.ended_reason as "ended_reason!", d.commands_executed, d.max_commands,
                     d.delegator_id"#,
        roots,
        status,
        reason,
        child_reason,
        now
    )
    .fetch_all(&mut *conn)
    .await?;
    // Deeper down, a grandchild made while the tree was read (its maker held the child's lock,
    // which the update above waited for) is visible to a new statement: end such stragglers too.
    let mut last: Vec<Uuid> = rows.iter().map(|r| r.delegation_id).collect();
    while !last.is_empty() {
        let more = sqlx::query_as!(
            EndedRow,
            r#"update delegation set status = 'revoked', ended_reason = $2, ended_at = $3
               where parent_id = any($1) and status = 'active'
               returning delegation_id, organization_id, parent_id, agent_id, ephemeral, expires_at,
                         status, ended_reason as "ended_reason!", commands_executed, max_commands, delegator_id"#,
            &last,
            child_reason,
            now
        )
        .fetch_all(&mut *conn)
        .await?;
        last = more.iter().map(|r| r.delegation_id).collect();
        rows.extend(more);
    }
    let mut ending = Ending::default();
    if rows.is_empty() {
        return Ok(ending);
    }
    let ended_ids: Vec<Uuid> = rows.iter().map(|r| r.delegation_id).collect();
    // Budgets held for children go back to the parents that stay: what a child executed counts
    // as executed by its parent, what it did not is free again.
    for r in rows.iter().filter(|r| r.parent_id.is_some_and(|p| !ended_ids.contains(&p))) {
        sqlx::query!(
            "update delegation set reserved_commands = greatest(reserved_commands - $2, 0),
                    commands_executed = least(commands_executed + $3, max_commands)
             where delegation_id = $1",
            r.parent_id,
            r.max_commands,
            r.commands_executed
        )
        .execute(&mut *conn)
        .await?;
    }
    let mut per_org: HashMap<Uuid, i64> = HashMap::new();
    for r in &rows {
        *per_org.entry(r.organization_id).or_default() += 1;
    }
    for (org, n) in per_org {
        count_active(conn, org, -n).await?;
    }
    for r in rows {
        // Past the expiry of every token the delegation can have issued: a delegation never resumes.
        let not_before = r.expires_at.max(now) + time::Duration::seconds(10);
        let subject = Subject::Delegation(r.delegation_id);
        let nb = revocation::revoke_subject(conn, &subject, not_before).await?;
        notify(conn, &format!("wm:{}:{nb}", subject.key())).await?;
        ending.announced.push(Announced::Subject { subject, not_before: nb });
        if r.ephemeral
            && !keep_agents
            && let Some((announced, clients)) =
                crate::auth::agents::delete_ephemeral(conn, r.organization_id, r.agent_id, now).await?
        {
            if let Announced::Subject { subject, not_before } = &announced {
                notify(conn, &format!("wm:{}:{not_before}", subject.key())).await?;
            }
            for c in &clients {
                notify(conn, &format!("client:{c}")).await?;
            }
            ending.announced.push(announced);
            ending.client_ids.extend(clients);
        }
        let (event_type, code) = if r.status == "expired" {
            ("delegation.expired", DELEGATION_EXPIRED)
        } else {
            ("delegation.revoked", DELEGATION_REVOKED)
        };
        let data = json!({
            "event_code": code,
            "delegation_id": r.delegation_id,
            "agent_id": r.agent_id,
            "delegator_id": r.delegator_id,
            "reason": r.ended_reason,
            "commands_executed": r.commands_executed,
            "ended_at": crate::events::rfc3339(now),
        });
        let cid = record(conn, r.organization_id, event_type, r.delegation_id, data, by).await?;
        ending.ended.push(Ended {
            delegation_id: r.delegation_id,
            status: r.status,
            reason: r.ended_reason,
            chronicle_cid: cid,
        });
    }
    Ok(ending)
}

/// After the commit: every instance learns of the ends (the watermarks through the change feed,
/// the deleted agents' client records dropped).
pub async fn finish(state: &AppState, ending: Ending) {
    if ending.ended.is_empty() {
        return;
    }
    for a in ending.announced {
        revocation::announce(state, a).await;
    }
    crate::auth::agents::forget_clients_by_id(state, &ending.client_ids).await;
    for e in &ending.ended {
        metrics::counter!("delegations_ended_total", "reason" => e.reason.clone()).increment(1);
    }
    metrics::gauge!("delegations_active").decrement(ending.ended.len() as f64);
}

/// The Postgres channel delegation ends are announced on (at commit).
const CHANNEL: &str = "agentidp_delegation_ended";

async fn notify(conn: &mut PgConnection, message: &str) -> Result<(), sqlx::Error> {
    sqlx::query!("select pg_notify($1, $2)", CHANNEL, message).execute(conn).await?;
    Ok(())
}

/// Applies the ends committed anywhere to this instance: the watermarks to its revocation set,
/// deleted agents' clients out of its cache. Reconnects after failures; while disconnected, the
/// revocation catch-up every 30 s (and at each change-feed reconnection) reads them from Postgres.
pub async fn listen(state: AppState) {
    loop {
        match sqlx::postgres::PgListener::connect_with(state.db()).await {
            Ok(mut l) => {
                if l.listen(CHANNEL).await.is_ok() {
                    if let Err(e) = revocation::catch_up(&state).await {
                        tracing::debug!(error = %e, "revocation catch-up after listening failed");
                    }
                    while let Ok(n) = l.recv().await {
                        let (topic, payload) = n.payload().split_once(':').unwrap_or((n.payload(), ""));
                        match topic {
                            "wm" => state.auth().revocations.apply("wm", payload),
                            "client" => state.auth().clients.remove(payload),
                            _ => {}
                        }
                    }
                }
            }
            Err(e) => tracing::debug!(error = %e, "delegation listener cannot connect"),
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Writes an event's outbox row and its audit record, both carrying its `chronicle_cid` (the
/// content id of `data` without it); returns the id.
async fn record(
    conn: &mut PgConnection,
    org_id: Uuid,
    event_type: &'static str,
    delegation_id: Uuid,
    mut data: Value,
    by: Option<&Actor>,
) -> Result<String, sqlx::Error> {
    let cid = canonical::cid(&data);
    data["chronicle_cid"] = json!(cid);
    let event = match by {
        Some(actor) => audit::Event::by(actor, org_id, event_type),
        None => audit::Event::anonymous(org_id, event_type).actor("system:delegation-sweeper".into(), "service"),
    };
    audit::record(conn, event.target("delegation", delegation_id).details(data.clone())).await?;
    crate::events::emit(conn, org_id, event_type, format!("delegations/{delegation_id}"), data).await?;
    Ok(cid)
}

/// Adds `n` (negative: subtracts) to the organization's count of active delegations, on one of
/// its shards, so that concurrent changes rarely wait for each other.
async fn count_active(conn: &mut PgConnection, org_id: Uuid, n: i64) -> Result<(), sqlx::Error> {
    let shard = (rand::random::<u8>() % 16) as i16;
    sqlx::query!(
        "insert into delegation_count (organization_id, shard, active) values ($1, $2, $3)
         on conflict (organization_id, shard) do update set active = delegation_count.active + $3",
        org_id,
        shard,
        n
    )
    .execute(conn)
    .await?;
    Ok(())
}

/// How many of the organization's delegations are active: a sum of at most 16 rows.
pub async fn active_count(db: impl sqlx::PgExecutor<'_>, org_id: Uuid) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar!(
        r#"select coalesce(sum(active), 0)::bigint as "n!" from delegation_count where organization_id = $1"#,
        org_id
    )
    .fetch_one(db)
    .await
}

/// How many of the organization's active delegations were given a lifetime longer than
/// `max_ttl_secs` (the compliance report flags them).
pub async fn long_lived_count(
    db: impl sqlx::PgExecutor<'_>,
    org_id: Uuid,
    max_ttl_secs: i64,
) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar!(
        r#"select count(*) as "n!" from delegation
           where organization_id = $1 and status = 'active'
             and expires_at - created_at > make_interval(secs => $2::bigint::double precision)"#,
        org_id,
        max_ttl_secs
    )
    .fetch_one(db)
    .await
}

/// Ends, as expired with reason `ttl`, up to `limit` delegations past their expiry, deleting their
/// ephemeral agents. Rows are taken with `FOR UPDATE SKIP LOCKED`, so any number of instances may
/// sweep at once; returns how many ended.
pub async fn sweep(state: &AppState, limit: i64) -> Result<usize, sqlx::Error> {
    let mut tx = state.db().begin().await?;
    // Only the tops of what is due: their descendants end with them, so two sweepers never hold
    // a parent and its child each while waiting for the other.
    let due = sqlx::query_scalar!(
        "select d.delegation_id from delegation d
         where d.status = 'active' and d.expires_at <= $1
           and not exists (select 1 from delegation p where p.delegation_id = d.parent_id
                           and p.status = 'active' and p.expires_at <= $1)
         order by d.expires_at limit $2 for update of d skip locked",
        state.clock().now(),
        limit
    )
    .fetch_all(&mut *tx)
    .await?;
    if due.is_empty() {
        return Ok(0);
    }
    let ending = end_tree(&mut tx, state.clock().now(), &due, "expired", "ttl", None, false).await?;
    tx.commit().await?;
    let n = ending.ended.len();
    finish(state, ending).await;
    Ok(n)
}

/// The sweeper of this instance with the active-delegations gauge (one count per sweep, not one a
/// request), and the listener for ends committed elsewhere.
pub fn spawn(state: &AppState) -> tokio::task::JoinHandle<()> {
    let state = state.clone();
    tokio::spawn(async move {
        let listener = tokio::spawn(listen(state.clone()));
        let _stop_with_this_task = AbortOnDrop(listener);
        let mut tick = tokio::time::interval(Duration::from_secs(state.config().delegation.sweep_interval_secs));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            loop {
                match sweep(&state, 500).await {
                    Ok(500) => continue,
                    Ok(_) => break,
                    Err(e) => {
                        tracing::warn!(error = %e, "delegation sweep failed");
                        break;
                    }
                }
            }
            match sqlx::query_scalar!(r#"select coalesce(sum(active), 0)::bigint as "n!" from delegation_count"#)
                .fetch_one(state.db())
                .await
            {
                Ok(n) => metrics::gauge!("delegations_active").set(n as f64),
                Err(e) => tracing::debug!(error = %e, "active delegations not counted"),
            }
        }
    })
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// What the token endpoint needs to issue a delegated token.
#[derive(Debug, Clone)]
pub struct Grant {
    pub delegation_id: Uuid,
    pub org_id: Uuid,
    pub scopes: Vec<String>,
    pub expires_at: OffsetDateTime,
    /// Actor ids from the human at the root to the agent.
    pub chain: Vec<String>,
}

impl Grant {
    /// The `act` claim: the agent outermost, the earlier agents of the chain nested inside.
    pub fn act(&self) -> Option<crate::auth::tokens::Act> {
        let mut act = None;
        for actor in self.chain.iter().skip(1) {
            act = Some(crate::auth::tokens::Act::chain(actor.clone(), act));
        }
        act
    }
}

/// Who presented the subject token of an exchange.
pub enum ExchangeSubject {
    /// A human, by session or API key.
    Human(Uuid),
    /// A token issued under this delegation.
    Delegated(Uuid),
}

/// The active delegation an exchange may issue under: from this subject to this agent (or, for a
/// delegated subject token presented by its own agent, that delegation itself).
pub async fn for_exchange(
    state: &AppState,
    org_id: Uuid,
    subject: &ExchangeSubject,
    agent_id: Uuid,
) -> Result<Option<Grant>, sqlx::Error> {
    let (parent, delegator) = match subject {
        ExchangeSubject::Human(user) => (None, Some(format!("user:{user}"))),
        ExchangeSubject::Delegated(d) => (Some(*d), None),
    };
    let row = sqlx::query!(
        "select delegation_id, scopes, expires_at, chain from delegation
         where organization_id = $1 and agent_id = $2 and status = 'active' and expires_at > $3
           and (($4::uuid is null and parent_id is null and delegator_id = $5)
                or ($4 is not null and (delegation_id = $4 or parent_id = $4)))
         order by created_at desc limit 1",
        org_id,
        agent_id,
        state.clock().now(),
        parent,
        delegator
    )
    .fetch_optional(state.db())
    .await?;
    Ok(row.map(|r| Grant {
        delegation_id: r.delegation_id,
        org_id,
        scopes: r.scopes,
        expires_at: r.expires_at,
        chain: r.chain,
    }))
}

/// Counts a token exchange, by outcome.
pub fn count_exchange(outcome: &'static str) {
    metrics::counter!("delegation_exchanges_total", "outcome" => outcome).increment(1);
}
