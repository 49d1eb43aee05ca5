//! Tiers: each organization's plan and limits, the rate limiter and quota counters, upgrades
//! (directly by a system admin, or through Stripe Checkout by an owner).
//!
//! Plans live in configuration (`tiers.plans`); `tenant_tier` holds each organization's plan and
//! its own overrides. An organization's effective limits are cached in-process for
//! `tiers.cache_secs` and dropped on every instance through the change feed when they change.

mod handlers;
pub mod limiter;
pub mod plans;
mod stripe;

use std::{sync::Arc, time::Duration};

use sqlx::PgConnection;
use time::OffsetDateTime;
use utoipa_axum::{router::OpenApiRouter, routes};
use uuid::Uuid;

pub use limiter::{Charge, Giveback, Limiter, Outcome, Refusal, Usage};
pub use plans::{Limit, Overrides, Plan, RateLimit};

use crate::{
    cache::{Cache, invalidation::Listener},
    config::TiersConfig,
    state::AppState,
};

/// Routes that an organization over its daily quota must still reach: to see why, and to upgrade.
pub const UNCOUNTED_ROUTES: &[&str] = &["/api/v1/tiers/status", "/api/v1/tiers/upgrade"];

/// An organization's plan and effective limits.
#[derive(Debug, Clone)]
pub struct OrgTier {
    pub plan: String,
    pub limits: Plan,
    pub overrides: Overrides,
    pub since: OffsetDateTime,
}

/// Per-process tier state: the limits cache and the limiter.
pub struct Tiers {
    cache: Cache<Uuid, Arc<OrgTier>>,
    pub limiter: Limiter,
}

const CACHE_MAX: u64 = 100_000;

impl Tiers {
    pub fn new(cfg: &TiersConfig) -> Self {
        Self { cache: Cache::new(CACHE_MAX, Duration::from_secs(cfg.cache_secs)), limiter: Limiter::new(&cfg.limiter) }
    }

    /// Drops one organization's cached limits (after a change here or on another instance).
    pub fn forget(&self, org: Uuid) {
        self.cache.remove(&org);
    }

    /// Drops every cached limit (the change feed may have missed messages).
    pub fn clear(&self) {
        self.cache.clear();
    }
}

/// The tiers module's share of the change feed: `tier:<org>` when an organization's plan changes.
pub fn listener() -> Listener {
    Listener {
        topics: &["tier"],
        apply: |state, _, payload| {
            if let Ok(org) = payload.parse() {
                state.tiers().forget(org);
            }
            Box::pin(async {})
        },
        resync: |state| {
            state.tiers().clear();
            Box::pin(async { Ok(()) })
        },
        disconnected: |state| state.tiers().clear(),
    }
}

/// The organization's plan and limits, from the cache or Postgres. With Postgres away, the default
/// plan applies (not cached), so that a database outage does not lift every limit.
pub async fn org_tier(state: &AppState, org: Uuid) -> Arc<OrgTier> {
    let tiers = state.tiers();
    if let Some(t) = tiers.cache.get(&org) {
        return t;
    }
    let cfg = &state.config().tiers;
    let row = sqlx::query!("select plan, overrides, since from tenant_tier where organization_id = $1", org)
        .fetch_optional(state.db())
        .await;
    let tier = match row {
        Ok(r) => Arc::new(from_row(cfg, org, r.map(|r| (r.plan, r.overrides, r.since)))),
        Err(e) => {
            tracing::warn!(error = %e, %org, "could not load the organization's plan; the default plan applies");
            return Arc::new(from_row(cfg, org, None));
        }
    };
    tiers.cache.insert(org, tier.clone());
    tier
}

/// An organization's tier from its `tenant_tier` row (plan, overrides, since); no row: the default.
fn from_row(cfg: &TiersConfig, org: Uuid, row: Option<(Option<String>, serde_json::Value, OffsetDateTime)>) -> OrgTier {
    let Some((plan, overrides, since)) = row else {
        return resolve(cfg, None, Overrides::default(), OffsetDateTime::now_utc(), org);
    };
    let overrides = serde_json::from_value::<Overrides>(overrides).unwrap_or_else(|e| {
        tracing::warn!(error = %e, %org, "the organization's tier overrides do not parse; ignoring them");
        Overrides::default()
    });
    resolve(cfg, plan, overrides, since, org)
}

fn resolve(cfg: &TiersConfig, plan: Option<String>, overrides: Overrides, since: OffsetDateTime, org: Uuid) -> OrgTier {
    let name = match plan {
        Some(p) if cfg.plans.contains_key(&p) => p,
        Some(p) => {
            tracing::warn!(%org, plan = %p, "the organization's plan is no longer configured; the default plan applies");
            cfg.default_plan.clone()
        }
        None => cfg.default_plan.clone(),
    };
    let limits = overrides.apply(&cfg.plans[&name]);
    OrgTier { plan: name, limits, overrides, since }
}

/// Gives a new organization its row (on the default plan). Part of the creating transaction.
pub async fn enroll(conn: &mut PgConnection, org: Uuid) -> Result<(), sqlx::Error> {
    sqlx::query!("insert into tenant_tier (organization_id) values ($1) on conflict do nothing", org)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// The organization's limits, with its tier row locked until the transaction ends: callers that
/// check a count against a limit (agents against `max_agents`) cannot both pass at the edge.
pub async fn lock_limits(state: &AppState, conn: &mut PgConnection, org: Uuid) -> Result<OrgTier, sqlx::Error> {
    let row = sqlx::query!("select plan, overrides, since from tenant_tier where organization_id = $1 for update", org)
        .fetch_optional(&mut *conn)
        .await?;
    Ok(from_row(&state.config().tiers, org, row.map(|r| (r.plan, r.overrides, r.since))))
}

/// Tells every instance (this one included) that an organization's tier changed.
pub async fn announce(state: &AppState, org: Uuid) {
    state.tiers().forget(org);
    crate::cache::invalidation::publish(state.redis(), "tier", &org.to_string()).await;
}

/// Charges one issued access token to the organization (and one request to the client's rate);
/// returns the rate-limit headers for the response.
pub async fn charge_token(state: &AppState, org: Uuid, client_id: &str) -> (Arc<OrgTier>, Outcome, http::HeaderMap) {
    let tier = org_tier(state, org).await;
    let client = format!("client:{client_id}");
    let charge = Charge {
        org,
        client: &client,
        rate: tier.limits.rate_limit,
        calls: None,
        tokens: Some((tier.limits.tokens_per_day, tier.limits.tokens_per_month)),
    };
    let outcome = state.tiers().limiter.charge(state.redis(), state.clock().now(), &charge).await;
    let headers = headers(&tier.limits, &charge, &outcome);
    (tier, outcome, headers)
}

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(handlers::status))
        .routes(routes!(handlers::upgrade))
        .routes(routes!(stripe::webhook))
}

/// One quota as the rate-limit headers describe it.
struct Policy {
    name: &'static str,
    quota: u64,
    window: u64,
    remaining: u64,
    /// Seconds until it is whole again.
    reset: u64,
    /// When that is (Unix time).
    reset_at: i64,
}

/// The `X-RateLimit-*`, `RateLimit-Policy` and `RateLimit` headers (draft-ietf-httpapi-ratelimit-headers)
/// for an outcome, and on a refusal `Retry-After`. `X-RateLimit-*` describe the limit closest to
/// refusing (or the one that refused); `X-RateLimit-Reset` is a Unix time, as most APIs send it.
pub fn headers(limits: &Plan, charge: &Charge<'_>, o: &Outcome) -> http::HeaderMap {
    use crate::clock::{next_midnight, next_month};
    let until = |t: OffsetDateTime| ((t - o.now).as_seconds_f64().ceil() as u64).max(1);
    let day_reset = until(next_midnight(o.now));
    let month_reset = until(next_month(o.now));
    let rate = limits.rate_limit;
    let mut policies = vec![Policy {
        name: "burst",
        quota: rate.burst as u64,
        window: rate.window_secs(),
        remaining: o.burst_remaining,
        reset: o.burst_reset_us.div_ceil(1_000_000),
        reset_at: ((o.now + time::Duration::microseconds(o.burst_reset_us as i64)).unix_timestamp_nanos() as f64 / 1e9)
            .ceil() as i64,
    }];
    let day_at = next_midnight(o.now).unix_timestamp();
    let month_at = next_month(o.now).unix_timestamp();
    if let Some(Limit::Max(q)) = charge.calls {
        let remaining = q.saturating_sub(o.calls_today);
        policies.push(Policy {
            name: "daily",
            quota: q,
            window: 86_400,
            remaining,
            reset: day_reset,
            reset_at: day_at,
        });
    }
    if let Some((day, month)) = charge.tokens {
        if let Limit::Max(q) = day {
            let remaining = q.saturating_sub(o.tokens_today);
            policies.push(Policy {
                name: "tokens-daily",
                quota: q,
                window: 86_400,
                remaining,
                reset: day_reset,
                reset_at: day_at,
            });
        }
        if let Limit::Max(q) = month {
            let start = o.now.replace_day(1).unwrap_or(o.now).replace_time(time::Time::MIDNIGHT);
            let window = (next_month(o.now) - start).whole_seconds() as u64;
            let remaining = q.saturating_sub(o.tokens_this_month);
            policies.push(Policy {
                name: "tokens-monthly",
                quota: q,
                window,
                remaining,
                reset: month_reset,
                reset_at: month_at,
            });
        }
    }
    let refused_name = o.refused.map(|r| match r {
        Refusal::Rate => "burst",
        Refusal::DailyCalls => "daily",
        Refusal::DailyTokens => "tokens-daily",
        Refusal::MonthlyTokens => "tokens-monthly",
    });
    let binding = refused_name
        .and_then(|n| policies.iter().find(|p| p.name == n))
        .or_else(|| policies.iter().min_by_key(|p| p.remaining))
        .expect("the burst policy is always there");
    let mut h = http::HeaderMap::with_capacity(8);
    // Structured-field integers have at most 15 digits.
    let sf = |n: u64| n.min(999_999_999_999_999);
    // Built on every charged response: written into one string each, no intermediate ones.
    let list = |field: fn(&Policy) -> (char, u64, char, u64)| {
        use std::fmt::Write;
        let mut s = String::with_capacity(40 * policies.len());
        for (i, p) in policies.iter().enumerate() {
            let (a, x, b, y) = field(p);
            let _ = write!(s, "{}\"{}\";{a}={};{b}={}", if i > 0 { ", " } else { "" }, p.name, sf(x), sf(y));
        }
        s
    };
    let policy = list(|p| ('q', p.quota, 'w', p.window));
    let current = list(|p| ('r', p.remaining, 't', p.reset));
    h.insert("x-ratelimit-limit", http::HeaderValue::from(binding.quota));
    h.insert("x-ratelimit-remaining", http::HeaderValue::from(binding.remaining));
    h.insert("x-ratelimit-reset", http::HeaderValue::from(binding.reset_at));
    let mut put = |name: &'static str, value: String| {
        if let Ok(v) = http::HeaderValue::try_from(value) {
            h.insert(name, v);
        }
    };
    put("ratelimit-policy", policy);
    put("ratelimit", current);
    if let Some(r) = o.refused {
        let retry = match r {
            Refusal::Rate => o.retry_after_us.div_ceil(1_000_000).max(1),
            Refusal::DailyCalls | Refusal::DailyTokens => day_reset,
            Refusal::MonthlyTokens => month_reset,
        };
        put("retry-after", retry.to_string());
    }
    h
}

/// The 429 detail for a refusal.
pub fn refusal_detail(r: Refusal, tier: &OrgTier) -> String {
    match r {
        Refusal::Rate => format!(
            "Rate limit of the {} plan reached ({} requests per minute, bursts of {}); retry after the Retry-After seconds.",
            tier.plan, tier.limits.rate_limit.requests_per_minute, tier.limits.rate_limit.burst
        ),
        Refusal::DailyCalls => format!(
            "The organization has used its {} API calls for today (plan {}); the count resets at 00:00 UTC.",
            tier.limits.api_calls_per_day.max().unwrap_or(0),
            tier.plan
        ),
        Refusal::DailyTokens => format!(
            "The organization has been issued its {} access tokens for today (plan {}); the count resets at 00:00 UTC.",
            tier.limits.tokens_per_day.max().unwrap_or(0),
            tier.plan
        ),
        Refusal::MonthlyTokens => format!(
            "The organization has been issued its {} access tokens for this month (plan {}).",
            tier.limits.tokens_per_month.max().unwrap_or(0),
            tier.plan
        ),
    }
}
