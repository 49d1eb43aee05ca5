//! Usage metering: LLM, tool, agent and message events, counted exactly once, priced, budgeted,
//! and aggregated from rollups.
//!
//! - [`model`]: the events and their parsing (plain JSON or CloudEvents), every field checked.
//! - [`ingest`]: one batch in one transaction, idempotent on `(org, event_id)` over every path;
//!   raw events in monthly partitions, hourly and daily rollups, monthly spend, budget notices
//!   through the outbox, and the seam with delegation budgets.
//! - [`nats`]: the durable JetStream ingest (a pull consumer; acknowledged after the commit;
//!   what cannot be counted goes to `usage_rejected`).
//! - [`handlers`]: `POST /api/v1/usage/events`, the aggregation API (org-scoped and the original
//!   `/internal/usage/*`), prices, budgets and entitlements.
//! - [`analytics`]: the analytics API over the per-request records, with its hourly rollup.
//!
//! The entitlement check and the decision point's `budget_exceeded` answer from memory: an
//! organization's budgets are cached (`usage.settings_cache_secs`, dropped on every instance when
//! they change), its monthly spend for `usage.spend_cache_ms` (dropped at once by this instance's
//! own ingest).

pub mod analytics;
mod config;
pub mod handlers;
pub mod ingest;
pub mod model;
pub mod nats;
mod query;

use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, Mutex},
    time::Duration,
};

pub use config::{Price, UsageConfig, UsageNatsConfig};
use sqlx::PgPool;
use time::Date;
use utoipa_axum::{router::OpenApiRouter, routes};
use uuid::Uuid;

use crate::{cache::Cache, state::AppState};

/// Upper bounds (ms) of the latency histogram's buckets in the rollups; one more bucket holds the
/// rest. The ingest statement counts into the same bounds.
pub const LATENCY_BOUNDS_MS: [i64; 10] = [50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 30_000, 60_000];

/// The topic of change messages about an organization's budgets and prices.
const TOPIC: &str = "usage";

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(handlers::post_events))
        .routes(routes!(handlers::summary))
        .routes(routes!(handlers::models))
        .routes(routes!(handlers::agents))
        .routes(routes!(handlers::tools))
        .routes(routes!(handlers::internal_summary))
        .routes(routes!(handlers::internal_models))
        .routes(routes!(handlers::internal_agents))
        .routes(routes!(handlers::internal_tools))
        .routes(routes!(handlers::list_prices, handlers::set_price))
        .routes(routes!(handlers::delete_price))
        .routes(routes!(handlers::list_budgets, handlers::set_budget))
        .routes(routes!(handlers::delete_budget))
        .routes(routes!(handlers::entitlements))
        .routes(routes!(analytics::token_trend))
        .routes(routes!(analytics::agent_activity))
        .routes(routes!(analytics::usage_summary))
}

/// A monthly budget of an organization (`agent_id` none) or of one agent.
#[derive(Debug, Clone)]
pub struct Budget {
    pub id: Uuid,
    pub agent_id: Option<Uuid>,
    pub token_limit: Option<i64>,
    pub cost_limit_micros: Option<i64>,
    pub threshold_percent: i16,
}

/// Tokens and cost spent in a month.
#[derive(Debug, Clone, Copy, Default)]
pub struct Spend {
    pub tokens: i64,
    pub cost_micros: i64,
}

/// The module's in-process state: caches in front of Postgres.
pub struct Usage {
    partitions: Mutex<HashSet<Date>>,
    orgs: Cache<Uuid, ()>,
    agents: Cache<Uuid, Uuid>,
    prices: Cache<Uuid, Arc<HashMap<String, Price>>>,
    budgets: Cache<Uuid, Arc<Vec<Budget>>>,
    spend: Cache<(Uuid, Option<Uuid>, Date), Spend>,
    config: UsageConfig,
}

impl Usage {
    pub fn new(cfg: &UsageConfig) -> Self {
        let settings = Duration::from_secs(cfg.settings_cache_secs.max(1));
        Self {
            partitions: Mutex::new(HashSet::new()),
            orgs: Cache::new(100_000, Duration::from_secs(60)),
            agents: Cache::new(1_000_000, Duration::from_secs(60)),
            prices: Cache::new(100_000, settings),
            budgets: Cache::new(100_000, settings),
            spend: Cache::new(1_000_000, Duration::from_millis(cfg.spend_cache_ms.max(1))),
            config: cfg.clone(),
        }
    }

    fn partition_known(&self, month: Date) -> bool {
        self.partitions.lock().unwrap_or_else(|e| e.into_inner()).contains(&month)
    }

    fn partition_made(&self, month: Date) {
        self.partitions.lock().unwrap_or_else(|e| e.into_inner()).insert(month);
    }

    /// Which of these organizations exist.
    async fn known_orgs(&self, db: &PgPool, mut ids: Vec<Uuid>) -> sqlx::Result<HashSet<Uuid>> {
        ids.sort_unstable();
        ids.dedup();
        let mut known = HashSet::new();
        let mut missing = Vec::new();
        for id in ids {
            if self.orgs.get(&id).is_some() {
                known.insert(id);
            } else {
                missing.push(id);
            }
        }
        for id in crate::auth::directory::existing(db, &missing).await? {
            self.orgs.insert(id, ());
            known.insert(id);
        }
        Ok(known)
    }

    /// The organization of each of these agents that exists.
    async fn agent_orgs(&self, db: &PgPool, mut ids: Vec<Uuid>) -> sqlx::Result<HashMap<Uuid, Uuid>> {
        ids.sort_unstable();
        ids.dedup();
        let mut out = HashMap::new();
        let mut missing = Vec::new();
        for id in ids {
            match self.agents.get(&id) {
                Some(org) => {
                    out.insert(id, org);
                }
                None => missing.push(id),
            }
        }
        for (agent, org) in crate::auth::directory::agent_orgs(db, &missing).await? {
            self.agents.insert(agent, org);
            out.insert(agent, org);
        }
        Ok(out)
    }

    /// The price of `model` for `org_id`: its own, else the configuration's.
    async fn price(&self, state: &AppState, org_id: Uuid, model: &str) -> sqlx::Result<Option<Price>> {
        let own = self.org_prices(state.db(), org_id).await?;
        Ok(own.get(model).copied().or_else(|| self.config.prices.get(model).copied()))
    }

    async fn org_prices(&self, db: &PgPool, org_id: Uuid) -> sqlx::Result<Arc<HashMap<String, Price>>> {
        if let Some(p) = self.prices.get(&org_id) {
            return Ok(p);
        }
        let rows = sqlx::query!(
            "select model, prompt_per_million, completion_per_million from usage_price where organization_id = $1",
            org_id
        )
        .fetch_all(db)
        .await?;
        let map: HashMap<String, Price> = rows
            .into_iter()
            .map(|r| (r.model, Price { prompt: r.prompt_per_million, completion: r.completion_per_million }))
            .collect();
        let map = Arc::new(map);
        self.prices.insert(org_id, map.clone());
        Ok(map)
    }

    async fn org_budgets(&self, db: &PgPool, org_id: Uuid) -> sqlx::Result<Arc<Vec<Budget>>> {
        if let Some(b) = self.budgets.get(&org_id) {
            return Ok(b);
        }
        let rows = sqlx::query_as!(
            Budget,
            r#"select usage_budget_id as id, agent_id, token_limit, cost_limit_micros, threshold_percent
               from usage_budget where organization_id = $1"#,
            org_id
        )
        .fetch_all(db)
        .await?;
        let rows = Arc::new(rows);
        self.budgets.insert(org_id, rows.clone());
        Ok(rows)
    }

    async fn month_spend(
        &self,
        db: &PgPool,
        org_id: Uuid,
        agent_id: Option<Uuid>,
        period: Date,
    ) -> sqlx::Result<Spend> {
        let key = (org_id, agent_id, period);
        if let Some(s) = self.spend.get(&key) {
            return Ok(s);
        }
        let row = sqlx::query!(
            "select tokens, cost_micros from usage_spend_monthly
             where organization_id = $1 and agent_id is not distinct from $2 and period = $3",
            org_id,
            agent_id,
            period
        )
        .fetch_optional(db)
        .await?;
        let s = row.map(|r| Spend { tokens: r.tokens, cost_micros: r.cost_micros }).unwrap_or_default();
        self.spend.insert(key, s);
        Ok(s)
    }

    /// Drops the cached spend these newly counted events changed.
    fn spent<'a>(&self, events: impl Iterator<Item = &'a model::UsageEvent>) {
        let mut keys = HashSet::new();
        for e in events {
            let month = ingest::month_of(e.occurred_at);
            keys.insert((e.org_id, None, month));
            if e.agent_id.is_some() {
                keys.insert((e.org_id, e.agent_id, month));
            }
        }
        for k in keys {
            self.spend.remove(&k);
        }
    }

    /// Drops what is cached about an organization's budgets and prices (after a change).
    fn forget_settings(&self, org_id: Uuid) {
        self.budgets.remove(&org_id);
        self.prices.remove(&org_id);
    }

    fn forget_all(&self) {
        self.budgets.clear();
        self.prices.clear();
        self.spend.clear();
    }
}

/// One budget as it stands this month.
#[derive(Debug, Clone, serde::Serialize, utoipa::ToSchema)]
pub struct BudgetStanding {
    pub budget_id: Uuid,
    /// `organization`, or `agent:<uuid>`.
    pub scope: String,
    pub token_limit: Option<i64>,
    pub tokens_used: i64,
    pub tokens_remaining: Option<i64>,
    pub cost_limit_micros: Option<i64>,
    pub cost_used_micros: i64,
    pub cost_remaining_micros: Option<i64>,
    pub threshold_percent: i16,
    pub threshold_reached: bool,
    pub exceeded: bool,
}

/// Whether an agent (or, without one, the organization) may spend more this month, and how much
/// is left under every budget that applies: the organization's, and the agent's own.
#[derive(Debug, Clone, serde::Serialize, utoipa::ToSchema)]
pub struct Entitlement {
    pub org_id: Uuid,
    pub agent_id: Option<Uuid>,
    /// `YYYY-MM` (UTC).
    pub period: String,
    /// False once any budget that applies is at or past its limit.
    pub allowed: bool,
    /// The least left under the budgets that limit tokens (none: no token limit applies).
    pub tokens_remaining: Option<i64>,
    pub cost_remaining_micros: Option<i64>,
    pub budgets: Vec<BudgetStanding>,
}

/// The entitlement of `agent_id` (or of the organization) now, from memory where it can.
pub async fn entitlement(state: &AppState, org_id: Uuid, agent_id: Option<Uuid>) -> sqlx::Result<Entitlement> {
    let usage = state.usage();
    let db = state.db();
    let now = state.clock().now();
    let period = ingest::month_of(now);
    let budgets = usage.org_budgets(db, org_id).await?;
    let mut standings = Vec::new();
    for b in budgets.iter().filter(|b| b.agent_id.is_none() || b.agent_id == agent_id) {
        let s = usage.month_spend(db, org_id, b.agent_id, period).await?;
        let pct = b.threshold_percent as i128;
        let reached =
            |used: i64, limit: Option<i64>, pct: i128| limit.is_some_and(|l| used as i128 * 100 >= l as i128 * pct);
        standings.push(BudgetStanding {
            budget_id: b.id,
            scope: b.agent_id.map(|a| format!("agent:{a}")).unwrap_or_else(|| "organization".into()),
            token_limit: b.token_limit,
            tokens_used: s.tokens,
            tokens_remaining: b.token_limit.map(|l| (l - s.tokens).max(0)),
            cost_limit_micros: b.cost_limit_micros,
            cost_used_micros: s.cost_micros,
            cost_remaining_micros: b.cost_limit_micros.map(|l| (l - s.cost_micros).max(0)),
            threshold_percent: b.threshold_percent,
            threshold_reached: reached(s.tokens, b.token_limit, pct)
                || reached(s.cost_micros, b.cost_limit_micros, pct),
            exceeded: reached(s.tokens, b.token_limit, 100) || reached(s.cost_micros, b.cost_limit_micros, 100),
        });
    }
    Ok(Entitlement {
        org_id,
        agent_id,
        period: format!("{:04}-{:02}", period.year(), period.month() as u8),
        allowed: standings.iter().all(|s| !s.exceeded),
        tokens_remaining: standings.iter().filter_map(|s| s.tokens_remaining).min(),
        cost_remaining_micros: standings.iter().filter_map(|s| s.cost_remaining_micros).min(),
        budgets: standings,
    })
}

/// Whether the caller is past a budget this month: for an agent its own or its organization's,
/// for anyone else the organization's. What the decision point puts in `context.budget_exceeded`.
/// A failure to find out is logged and answered `false` (the budget is metered, not a lock).
pub async fn budget_exceeded(state: &AppState, org_id: Uuid, agent_id: Option<Uuid>) -> bool {
    match entitlement(state, org_id, agent_id).await {
        Ok(e) => !e.allowed,
        Err(e) => {
            tracing::warn!(error = %e, "could not read budgets for the decision point");
            false
        }
    }
}

/// The change-feed listener: budgets and prices changed on another instance.
pub fn listener() -> crate::cache::invalidation::Listener {
    crate::cache::invalidation::Listener {
        topics: &[TOPIC],
        apply: |state, _topic, payload| {
            Box::pin(async move {
                match payload.parse::<Uuid>() {
                    Ok(org) => state.usage().forget_settings(org),
                    Err(_) => state.usage().forget_all(),
                }
            })
        },
        resync: |state| {
            Box::pin(async move {
                state.usage().forget_all();
                Ok(())
            })
        },
        disconnected: |state| state.usage().forget_all(),
    }
}

/// Tells every instance an organization's budgets or prices changed.
async fn announce(state: &AppState, org_id: Uuid) {
    state.usage().forget_settings(org_id);
    crate::cache::invalidation::publish(state.redis(), TOPIC, &org_id.to_string()).await;
}

/// Background work: the NATS ingest (when enabled), the partitions ahead and their retention, and
/// the analytics rollup.
pub fn spawn(state: &AppState) -> Vec<tokio::task::JoinHandle<()>> {
    let mut tasks = vec![tokio::spawn(maintain(state.clone()))];
    if state.config().usage.analytics_rollup_secs > 0 {
        tasks.push(tokio::spawn(analytics::run(state.clone())));
    }
    tasks
}

/// Hourly: this month's and next month's partitions exist, and those past retention are dropped.
async fn maintain(state: AppState) {
    let mut tick = tokio::time::interval(Duration::from_secs(3600));
    loop {
        tick.tick().await;
        if let Err(e) = maintain_once(&state).await {
            tracing::warn!(error = %e, "usage partition maintenance failed");
        }
    }
}

/// Creates this month's and next month's partitions, and drops those past `usage.retention_months`
/// (with the idempotency keys of their events, and rejected messages as old). Returns the
/// partitions dropped.
pub async fn maintain_once(state: &AppState) -> anyhow::Result<Vec<String>> {
    let now = state.clock().now();
    let this = ingest::month_of(now);
    let next = ingest::month_of(crate::clock::next_month(now));
    ingest::ensure_partitions(state, [this, next]).await?;
    let mut cutoff = this;
    for _ in 0..state.config().usage.retention_months {
        cutoff = ingest::month_of(cutoff.midnight().assume_utc() - time::Duration::days(1));
    }
    let existing: Vec<String> = sqlx::query_scalar!(
        r#"select c.relname as "name!" from pg_inherits i join pg_class c on c.oid = i.inhrelid
           where i.inhparent = 'usage_event'::regclass"#
    )
    .fetch_all(state.db())
    .await?;
    let keep_from = ingest::partition_name(cutoff);
    let mut dropped = Vec::new();
    for name in existing {
        // Names are usage_event_YYYYMM: they sort as their months do.
        let month_digits =
            name.strip_prefix("usage_event_").is_some_and(|m| m.len() == 6 && m.bytes().all(|b| b.is_ascii_digit()));
        if month_digits && name.as_str() < keep_from.as_str() {
            let mut tx = state.db().begin().await?;
            sqlx::query(&format!("drop table if exists {name}")).execute(&mut *tx).await?;
            tx.commit().await?;
            dropped.push(name);
        }
    }
    // Idempotency keys go with the events they kept from being counted twice, in batches.
    let cutoff_at = cutoff.midnight().assume_utc();
    loop {
        let n = sqlx::query!(
            "delete from usage_event_key where ctid = any(array(
                 select ctid from usage_event_key where occurred_at < $1 limit 10000))",
            cutoff_at
        )
        .execute(state.db())
        .await?
        .rows_affected();
        if n < 10000 {
            break;
        }
    }
    // Rejected messages are kept as long as the raw events.
    sqlx::query!("delete from usage_rejected where received_at < $1", cutoff_at).execute(state.db()).await?;
    Ok(dropped)
}
