//! Spend budgets: a delegation may carry `max_cost` (the usage module's currency micro-units)
//! and/or `max_tokens`. The usage module calls [`draw`] inside its ingest transaction for the
//! events that carry a `delegation_id`; exhausting a budget ends the delegation as expired with
//! reason `spend_limit`, on every instance at once, like any other end.

use std::collections::BTreeMap;

use sqlx::PgConnection;
use uuid::Uuid;

/// One usage event's draw on a delegation.
#[derive(Debug, Clone)]
pub struct SpendDraw {
    pub org_id: Uuid,
    pub delegation_id: Uuid,
    pub cost_micros: i64,
    pub tokens: i64,
}

/// Draws `draws` down from their delegations (and from every ancestor of each: what a child
/// spends, its parent's authority spent) in the caller's transaction, and ends the delegations
/// whose budget is now used up, with their descendants, as expired with reason `spend_limit`.
/// Draws on unknown delegations, on another organization's, or on ended ones, are ignored: usage
/// is recorded whatever happened to the delegation meanwhile. Negative amounts count as zero.
///
/// The ends take effect on every instance when the caller commits: their watermarks are announced
/// with `pg_notify`, which Postgres delivers at commit to every instance's listener.
pub async fn draw(conn: &mut PgConnection, draws: &[SpendDraw]) -> anyhow::Result<()> {
    let exhausted = exhaust(conn, draws).await?;
    if !exhausted.is_empty() {
        let now = time::OffsetDateTime::now_utc();
        let ending = super::end_tree(conn, now, &exhausted, "expired", "spend_limit", None, false).await?;
        metrics::gauge!("delegations_active").decrement(ending.ended.len() as f64);
    }
    Ok(())
}

/// Applies the draws; returns the delegations whose budget is used up (ended by the caller).
async fn exhaust(conn: &mut PgConnection, draws: &[SpendDraw]) -> anyhow::Result<Vec<Uuid>> {
    // One update per delegation, in a stable order, so concurrent ingests lock rows alike.
    let mut totals: BTreeMap<(Uuid, Uuid), (i64, i64)> = BTreeMap::new();
    for d in draws {
        let t = totals.entry((d.delegation_id, d.org_id)).or_default();
        t.0 = t.0.saturating_add(d.cost_micros.max(0));
        t.1 = t.1.saturating_add(d.tokens.max(0));
    }
    let mut exhausted = Vec::new();
    for ((delegation_id, org_id), (cost, tokens)) in totals {
        if cost == 0 && tokens == 0 {
            continue;
        }
        let rows = sqlx::query!(
            r#"with recursive line as (
                   select delegation_id, parent_id from delegation
                   where delegation_id = $1 and organization_id = $2 and status = 'active'
                   union
                   select d.delegation_id, d.parent_id from delegation d join line l on d.delegation_id = l.parent_id
                   where d.status = 'active'
               )
               update delegation d set cost_spent = d.cost_spent + $3, tokens_spent = d.tokens_spent + $4
               from line where d.delegation_id = line.delegation_id and d.status = 'active'
               returning d.delegation_id,
                         (d.max_cost is not null and d.cost_spent >= d.max_cost)
                         or (d.max_tokens is not null and d.tokens_spent >= d.max_tokens) as "used_up!""#,
            delegation_id,
            org_id,
            cost,
            tokens
        )
        .fetch_all(&mut *conn)
        .await?;
        exhausted.extend(rows.into_iter().filter(|r| r.used_up).map(|r| r.delegation_id));
    }
    Ok(exhausted)
}
