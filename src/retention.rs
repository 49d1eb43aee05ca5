//! Retention: rows that have served their purpose are deleted, table by table, on a schedule.
//!
//! Every instance runs the job; a Postgres advisory lock lets one of them prune at a time (the
//! others skip that round), and deletes go in bounded batches so that no statement holds many
//! row locks or runs long. Deleting is idempotent, so an instance that dies mid-round leaves
//! nothing half done: the next round carries on.
//!
//! Kept for as long as they can matter: a revocation until the token it revokes has expired, a
//! watermark until no token it could cut off is alive. Kept as configured (`retention.*`):
//! analytics, the decision log, ended sessions, used or expired set-password tokens, and Stripe
//! event ids (which make webhook deliveries idempotent, so keep them longer than Stripe retries), and
//! outbox events with their webhook deliveries (the replay window).

use std::time::Duration;

use sqlx::PgPool;

use crate::{config::RetentionConfig, state::AppState};

/// The lock that makes one instance prune at a time.
const LOCK: i64 = 7_274_001;

/// One table's rule: rows matching `older` (with `$1` = the cutoff) go, in batches of `$2`.
struct Rule {
    table: &'static str,
    /// Selects the ctids of at most `$2` prunable rows.
    select: &'static str,
    cutoff: time::Duration,
}

fn rules(cfg: &RetentionConfig, max_token_ttl_secs: u64) -> Vec<Rule> {
    let days = |d: u32| time::Duration::days(d as i64);
    let token_life = time::Duration::seconds(max_token_ttl_secs as i64) + time::Duration::days(1);
    vec![
        Rule {
            table: "analytics_event",
            select: "select ctid from analytics_event where occurred_at < $1 limit $2",
            cutoff: days(cfg.analytics_days),
        },
        Rule {
            table: "decision_log",
            select: "select ctid from decision_log where decided_at < $1 limit $2",
            cutoff: days(cfg.decision_log_days),
        },
        Rule {
            table: "session",
            select: "select ctid from session where coalesce(ended_at, expires_at) < $1 and expires_at < $1 limit $2",
            cutoff: days(cfg.session_days),
        },
        Rule {
            table: "password_token",
            select: "select ctid from password_token where coalesce(used_at, expires_at) < $1 and expires_at < $1 limit $2",
            cutoff: days(cfg.password_token_days),
        },
        Rule {
            table: "stripe_event",
            select: "select ctid from stripe_event where received_at < $1 limit $2",
            cutoff: days(cfg.stripe_event_days),
        },
        Rule {
            // With their deliveries and attempts (by cascade); never an event still being delivered.
            table: "event_outbox",
            select: "select ctid from event_outbox where occurred_at < $1 and fanned_out_at is not null
                     and published_at is not null
                     and not exists (select 1 from webhook_delivery d
                                     where d.event_id = event_outbox.event_id and d.status = 'pending')
                     limit $2",
            cutoff: days(cfg.event_days),
        },
        Rule {
            table: "token_revocation",
            select: "select ctid from token_revocation where expires_at < $1 limit $2",
            cutoff: time::Duration::days(1),
        },
        Rule {
            table: "revocation_watermark",
            select: "select ctid from revocation_watermark where not_before < $1 limit $2",
            cutoff: token_life,
        },
    ]
}

/// What one round deleted, by table; `None` when another instance held the lock.
pub type Pruned = Option<Vec<(&'static str, u64)>>;

/// One round of pruning, if no other instance is pruning now.
pub async fn prune_once(db: &PgPool, cfg: &RetentionConfig, max_token_ttl_secs: u64) -> anyhow::Result<Pruned> {
    let mut conn = db.acquire().await?;
    let locked: bool = sqlx::query_scalar("select pg_try_advisory_lock($1)").bind(LOCK).fetch_one(&mut *conn).await?;
    if !locked {
        return Ok(None);
    }
    let now = time::OffsetDateTime::now_utc();
    let mut out = Vec::new();
    let result = async {
        for rule in rules(cfg, max_token_ttl_secs) {
            let delete = format!("delete from {} where ctid = any(array({}))", rule.table, rule.select);
            let mut total = 0;
            loop {
                let n = sqlx::query(&delete)
                    .bind(now - rule.cutoff)
                    .bind(cfg.batch_size as i64)
                    .execute(&mut *conn)
                    .await?
                    .rows_affected();
                total += n;
                if n < cfg.batch_size as u64 {
                    break;
                }
            }
            out.push((rule.table, total));
        }
        anyhow::Ok(())
    }
    .await;
    let _ = sqlx::query("select pg_advisory_unlock($1)").bind(LOCK).execute(&mut *conn).await;
    result?;
    Ok(Some(out))
}

/// Prunes every `retention.interval_secs` until the process ends.
pub fn spawn(state: &AppState) -> Option<tokio::task::JoinHandle<()>> {
    let cfg = state.config().retention.clone();
    if cfg.interval_secs == 0 {
        return None;
    }
    let state = state.clone();
    Some(tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(cfg.interval_secs));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            match prune_once(state.db(), &cfg, state.config().auth.access_token_ttl_secs).await {
                Ok(Some(pruned)) => {
                    for (table, rows) in pruned.into_iter().filter(|(_, n)| *n > 0) {
                        tracing::info!(table, rows, "pruned");
                        metrics::counter!("retention_pruned_rows_total", "table" => table).increment(rows);
                    }
                }
                Ok(None) => {}
                Err(e) => tracing::warn!(error = %e, "pruning failed; the next round carries on"),
            }
        }
    }))
}
