//! The rate limiter and quota counters: one Redis script per request, a per-process fallback.
//!
//! A charge checks, in one atomic script and one round trip, the client's rate limit (GCRA: a
//! theoretical arrival time per client), then the organization's daily call quota, then its daily
//! and monthly token quotas, and commits all of them only if every check passes — a refused
//! request consumes nothing. Concurrent requests are serialized by Redis, so a limit of 50 lets
//! exactly 50 through.
//!
//! Keys carry the organization as a hash tag (`tier:{<org>}:...`), so one script's keys share a
//! cluster slot. Counter keys are named by UTC day or month (from [`crate::clock::Clock`]) and
//! expire after their period; a new day is a new key, so the reset needs no job.
//!
//! When Redis fails, a circuit opens for a second and decisions are made by this process alone,
//! from the last counts Redis reported (approximate: N instances admit up to N times the rate).
//! Increments made meanwhile are kept and added to Redis when it answers again.

use std::{
    collections::HashMap,
    sync::{
        Mutex,
        atomic::{AtomicBool, AtomicI64, Ordering},
    },
    time::{Duration, Instant},
};

use redis::Script;
use time::OffsetDateTime;
use uuid::Uuid;

use super::plans::{Limit, RateLimit};
use crate::{
    clock::{next_midnight, next_month},
    redis::Redis,
};

pub const FALLBACK_TOTAL: &str = "tier_limiter_fallback_total";
pub const DEGRADED: &str = "tier_limiter_degraded";
pub const REJECTED_TOTAL: &str = "tier_rejections_total";
pub const RECONCILED_TOTAL: &str = "tier_counters_reconciled_total";

/// How long the circuit stays open after a Redis failure before one request probes again.
const OPEN_FOR: Duration = Duration::from_secs(1);
/// Counters outlive their period by this much, so that a status read at the boundary still finds them.
const KEY_GRACE_SECS: i64 = 7200;
/// Entries the fallback keeps before it starts over.
const LOCAL_MAX: usize = 200_000;

/// The script. KEYS: rate, calls today, tokens today, tokens this month. ARGV: emission interval
/// (µs), burst, call limit, token day limit, token month limit (-1 unlimited, -2 not charged), day
/// TTL, month TTL (s). Returns: refused (0 none, 1 rate, 2 calls, 3 tokens/day, 4 tokens/month),
/// remaining burst, µs until the bucket is full, µs until a retry can pass, and (0 when not charged) calls today, tokens
/// today, tokens this month.
///
/// Time is Redis's own (`TIME`), so instances with skewed clocks share one bucket exactly; all
/// arithmetic is on whole microseconds, exact in Lua's doubles for the next few centuries.
const SCRIPT: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local tau = interval * tonumber(ARGV[2])
local calls_limit = tonumber(ARGV[3])
local day_limit = tonumber(ARGV[4])
local month_limit = tonumber(ARGV[5])
local tat = tonumber(redis.call('GET', KEYS[1])) or now
if tat < now then tat = now end
local new_tat = tat + interval
local calls = 0
if calls_limit ~= -2 then calls = tonumber(redis.call('GET', KEYS[2])) or 0 end
local tday = 0
local tmonth = 0
if day_limit ~= -2 then
  tday = tonumber(redis.call('GET', KEYS[3])) or 0
  tmonth = tonumber(redis.call('GET', KEYS[4])) or 0
end
local refused = 0
local retry = 0
if new_tat - tau > now then
  refused = 1
  retry = new_tat - tau - now
elseif calls_limit >= 0 and calls >= calls_limit then
  refused = 2
elseif day_limit >= 0 and tday >= day_limit then
  refused = 3
elseif month_limit >= 0 and tmonth >= month_limit then
  refused = 4
end
if refused == 0 then
  tat = new_tat
  redis.call('SET', KEYS[1], string.format('%.0f', new_tat), 'PX', math.floor((new_tat - now) / 1000) + 1000)
  if calls_limit ~= -2 then
    calls = redis.call('INCR', KEYS[2])
    if calls == 1 then redis.call('EXPIRE', KEYS[2], ARGV[6]) end
  end
  if day_limit ~= -2 then
    tday = redis.call('INCR', KEYS[3])
    if tday == 1 then redis.call('EXPIRE', KEYS[3], ARGV[6]) end
    tmonth = redis.call('INCR', KEYS[4])
    if tmonth == 1 then redis.call('EXPIRE', KEYS[4], ARGV[7]) end
  end
end
local remaining = math.floor((now + tau - tat) / interval)
return {refused, remaining, tat - now, retry, calls, tday, tmonth}
"#;

/// What one request asks of the limiter.
#[derive(Debug, Clone)]
pub struct Charge<'a> {
    pub org: Uuid,
    /// Whose rate limit: an API key, an OAuth client, a user.
    pub client: &'a str,
    pub rate: RateLimit,
    /// Counted against the daily call quota, if `Some`.
    pub calls: Option<Limit>,
    /// Counted against the daily and monthly token quotas, if `Some`.
    pub tokens: Option<(Limit, Limit)>,
}

/// Which limit refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    Rate,
    DailyCalls,
    DailyTokens,
    MonthlyTokens,
}

impl Refusal {
    fn from_code(code: i64) -> Option<Self> {
        match code {
            1 => Some(Self::Rate),
            2 => Some(Self::DailyCalls),
            3 => Some(Self::DailyTokens),
            4 => Some(Self::MonthlyTokens),
            _ => None,
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Rate => "rate",
            Self::DailyCalls => "daily_calls",
            Self::DailyTokens => "daily_tokens",
            Self::MonthlyTokens => "monthly_tokens",
        }
    }
}

/// The limiter's answer, with what the rate-limit headers need.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub refused: Option<Refusal>,
    /// Requests the client may still send at once.
    pub burst_remaining: u64,
    /// Microseconds until the client's bucket is full again.
    pub burst_reset_us: u64,
    /// Microseconds until a refused request could pass.
    pub retry_after_us: u64,
    pub calls_today: u64,
    pub tokens_today: u64,
    pub tokens_this_month: u64,
    /// Decided by this process alone (Redis unavailable).
    pub local: bool,
    /// When this was decided, and the period boundaries that apply.
    pub now: OffsetDateTime,
}

/// Current usage of one organization.
#[derive(Debug, Clone, Copy)]
pub struct Usage {
    pub calls_today: u64,
    pub tokens_today: u64,
    pub tokens_this_month: u64,
    /// Counted by this process alone (Redis unavailable).
    pub approximate: bool,
}

/// The counter keys of one organization in one period.
struct Keys {
    rate: String,
    calls: String,
    tokens_day: String,
    tokens_month: String,
    day_ttl: i64,
    month_ttl: i64,
}

impl Keys {
    fn new(redis: &Redis, org: Uuid, client: &str, now: OffsetDateTime) -> Self {
        let day = format!("{:04}{:02}{:02}", now.year(), now.month() as u8, now.day());
        let month = &day[..6];
        Self {
            rate: redis.key(&format!("tier:{{{org}}}:rl:{client}")),
            calls: redis.key(&format!("tier:{{{org}}}:calls:{day}")),
            tokens_day: redis.key(&format!("tier:{{{org}}}:tok:d:{day}")),
            tokens_month: redis.key(&format!("tier:{{{org}}}:tok:m:{month}")),
            day_ttl: (next_midnight(now) - now).whole_seconds() + KEY_GRACE_SECS,
            month_ttl: (next_month(now) - now).whole_seconds() + KEY_GRACE_SECS,
        }
    }
}

/// Counts this process learnt from Redis (to start a fallback from) or made alone (to reconcile).
#[derive(Default)]
struct Local {
    /// Rate key → theoretical arrival time (µs).
    tat: HashMap<String, i64>,
    /// Counter key → value as far as this process knows.
    counts: HashMap<String, u64>,
    /// Counter key → (increments Redis has not seen, TTL to set).
    pending: HashMap<String, (u64, i64)>,
}

/// The limiter of one process.
pub struct Limiter {
    script: Script,
    local: Mutex<Local>,
    started: Instant,
    /// Milliseconds since `started` until which Redis is not asked while degraded. The request
    /// that moves it forward is the one probe; an abandoned probe simply lets it expire.
    open_until: AtomicI64,
    degraded: AtomicBool,
    /// Whether `local.pending` holds increments Redis has not seen.
    has_pending: AtomicBool,
    /// Last counts Redis reported, by counter key hash, to seed the fallback without a lock on
    /// every request.
    seen: Mutex<HashMap<String, u64>>,
}

impl Default for Limiter {
    fn default() -> Self {
        Self::new()
    }
}

impl Limiter {
    pub fn new() -> Self {
        Self {
            script: Script::new(SCRIPT),
            local: Mutex::new(Local::default()),
            started: Instant::now(),
            open_until: AtomicI64::new(0),
            degraded: AtomicBool::new(false),
            has_pending: AtomicBool::new(false),
            seen: Mutex::new(HashMap::new()),
        }
    }

    fn elapsed_ms(&self) -> i64 {
        self.started.elapsed().as_millis() as i64
    }

    /// Whether this request should ask Redis: always while healthy; while degraded, one request
    /// per `OPEN_FOR` (whoever moves `open_until` forward).
    fn try_redis(&self) -> bool {
        if !self.degraded.load(Ordering::Acquire) {
            return true;
        }
        let now = self.elapsed_ms();
        let until = self.open_until.load(Ordering::Acquire);
        now >= until
            && self
                .open_until
                .compare_exchange(until, now + OPEN_FOR.as_millis() as i64, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
    }

    fn redis_failed(&self, e: &anyhow::Error) {
        self.open_until.store(self.elapsed_ms() + OPEN_FOR.as_millis() as i64, Ordering::Release);
        if !self.degraded.swap(true, Ordering::AcqRel) {
            metrics::gauge!(DEGRADED).set(1.0);
            tracing::warn!(error = %e, "rate limiter: Redis unavailable, enforcing limits per instance");
        }
    }

    /// Redis answered: close the circuit, and hand over whatever was counted alone.
    async fn redis_ok(&self, redis: &Redis) {
        // Loads first: a swap on every request would bounce the cache line between cores.
        if self.degraded.load(Ordering::Acquire) && self.degraded.swap(false, Ordering::AcqRel) {
            metrics::gauge!(DEGRADED).set(0.0);
            tracing::info!("rate limiter: Redis is back, limits are shared again");
            // The next outage starts from what Redis reports by then, not from these.
            let mut local = self.local.lock().unwrap_or_else(|e| e.into_inner());
            local.tat.clear();
            local.counts.clear();
        }
        if self.has_pending.load(Ordering::Acquire) && self.has_pending.swap(false, Ordering::AcqRel) {
            let pending = std::mem::take(&mut self.local.lock().unwrap_or_else(|e| e.into_inner()).pending);
            if let Err(e) = reconcile(redis, &pending).await {
                tracing::warn!(error = %e, counters = pending.len(), "could not reconcile counters; will retry");
                let mut local = self.local.lock().unwrap_or_else(|e| e.into_inner());
                for (key, (delta, ttl)) in pending {
                    local.pending.entry(key).or_insert((0, ttl)).0 += delta;
                }
                self.has_pending.store(true, Ordering::Release);
            }
        }
    }

    /// Checks and (if allowed) counts one request.
    /// Refusals are counted in `tier_rejections_total` by limit.
    pub async fn charge(&self, redis: &Redis, now: OffsetDateTime, c: &Charge<'_>) -> Outcome {
        let mut outcome = self.decide(redis, now, c).await;
        outcome.now = now;
        if let Some(refusal) = outcome.refused {
            metrics::counter!(REJECTED_TOTAL, "limit" => refusal.as_str()).increment(1);
        }
        outcome
    }

    /// By Redis while it answers, else by this process alone.
    async fn decide(&self, redis: &Redis, now: OffsetDateTime, c: &Charge<'_>) -> Outcome {
        let keys = Keys::new(redis, c.org, c.client, now);
        if self.try_redis() {
            match self.charge_redis(redis, &keys, c).await {
                Ok(outcome) => {
                    self.redis_ok(redis).await;
                    self.remember(&keys, &outcome);
                    return outcome;
                }
                Err(e) => self.redis_failed(&e),
            }
        }
        metrics::counter!(FALLBACK_TOTAL).increment(1);
        self.charge_local(&keys, (now.unix_timestamp_nanos() / 1_000) as i64, c)
    }

    async fn charge_redis(&self, redis: &Redis, keys: &Keys, c: &Charge<'_>) -> anyhow::Result<Outcome> {
        let reply = self.run_script(redis, keys, c).await;
        if reply.is_err() {
            redis.drop_multiplexed();
        }
        let r = reply?;
        anyhow::ensure!(r.len() == 7, "unexpected rate limiter reply");
        Ok(Outcome {
            refused: Refusal::from_code(r[0]),
            burst_remaining: r[1].max(0) as u64,
            burst_reset_us: r[2].max(0) as u64,
            retry_after_us: r[3].max(0) as u64,
            calls_today: r[4].max(0) as u64,
            tokens_today: r[5].max(0) as u64,
            tokens_this_month: r[6].max(0) as u64,
            local: false,
            now: OffsetDateTime::UNIX_EPOCH,
        })
    }

    /// One EVALSHA (EVAL only the first time a Redis sees the script) on the shared connection.
    async fn run_script(&self, redis: &Redis, keys: &Keys, c: &Charge<'_>) -> anyhow::Result<Vec<i64>> {
        let mut conn = redis.multiplexed().await?;
        let (calls_limit, day_limit, month_limit) = args(c);
        let mut inv = self.script.key(&keys.rate);
        inv.key(&keys.calls)
            .key(&keys.tokens_day)
            .key(&keys.tokens_month)
            .arg(c.rate.interval_us())
            .arg(c.rate.burst)
            .arg(calls_limit)
            .arg(day_limit)
            .arg(month_limit)
            .arg(keys.day_ttl)
            .arg(keys.month_ttl);
        Ok(tokio::time::timeout(redis.timeout(), inv.invoke_async(&mut conn)).await??)
    }

    /// Notes what Redis counted, so that a fallback starts from there. Sampled: the counts only
    /// need to be roughly current, and the lock should not be taken on every request.
    fn remember(&self, keys: &Keys, o: &Outcome) {
        // Every 16th count (each request moves its counter by one), without a shared counter.
        let n = o.calls_today.max(o.tokens_today);
        if n > 16 && !n.is_multiple_of(16) {
            return;
        }
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        if seen.len() > LOCAL_MAX {
            seen.clear();
        }
        for (key, value) in [
            (&keys.calls, o.calls_today),
            (&keys.tokens_day, o.tokens_today),
            (&keys.tokens_month, o.tokens_this_month),
        ] {
            if value > 0 {
                seen.insert(key.clone(), value);
            }
        }
    }

    /// The same decision as the script, made by this process alone.
    fn charge_local(&self, keys: &Keys, now_us: i64, c: &Charge<'_>) -> Outcome {
        let seen = |k: &String| self.seen.lock().unwrap_or_else(|e| e.into_inner()).get(k).copied().unwrap_or(0);
        let (seen_calls, seen_day, seen_month) = (seen(&keys.calls), seen(&keys.tokens_day), seen(&keys.tokens_month));
        let mut local = self.local.lock().unwrap_or_else(|e| e.into_inner());
        if local.tat.len() > LOCAL_MAX {
            local.tat.clear();
        }
        if local.counts.len() > LOCAL_MAX {
            // Counts with increments not yet in Redis are the outage's record: keep them.
            let Local { counts, pending, .. } = &mut *local;
            counts.retain(|k, _| pending.contains_key(k));
        }
        let now = now_us;
        let interval = c.rate.interval_us();
        let tau = interval * c.rate.burst as i64;
        let tat = local.tat.get(&keys.rate).copied().unwrap_or(now).max(now);
        let new_tat = tat + interval;
        let calls = *local.counts.entry(keys.calls.clone()).or_insert(seen_calls);
        let tday = *local.counts.entry(keys.tokens_day.clone()).or_insert(seen_day);
        let tmonth = *local.counts.entry(keys.tokens_month.clone()).or_insert(seen_month);
        let refused = if new_tat - tau > now {
            Some(Refusal::Rate)
        } else if c.calls.is_some_and(|l| !l.allows(calls)) {
            Some(Refusal::DailyCalls)
        } else if c.tokens.is_some_and(|(d, _)| !d.allows(tday)) {
            Some(Refusal::DailyTokens)
        } else if c.tokens.is_some_and(|(_, m)| !m.allows(tmonth)) {
            Some(Refusal::MonthlyTokens)
        } else {
            None
        };
        let mut out = Outcome {
            refused,
            burst_remaining: 0,
            burst_reset_us: 0,
            retry_after_us: if refused == Some(Refusal::Rate) { (new_tat - tau - now) as u64 } else { 0 },
            calls_today: calls,
            tokens_today: tday,
            tokens_this_month: tmonth,
            local: true,
            now: OffsetDateTime::UNIX_EPOCH,
        };
        let mut effective_tat = tat;
        if refused.is_none() {
            effective_tat = new_tat;
            local.tat.insert(keys.rate.clone(), new_tat);
            let mut bump = |key: &String, ttl: i64| {
                let v = local.counts.entry(key.clone()).or_insert(0);
                *v += 1;
                let value = *v;
                let p = local.pending.entry(key.clone()).or_insert((0, ttl));
                p.0 += 1;
                value
            };
            if c.calls.is_some() {
                out.calls_today = bump(&keys.calls, keys.day_ttl);
            }
            if c.tokens.is_some() {
                out.tokens_today = bump(&keys.tokens_day, keys.day_ttl);
                out.tokens_this_month = bump(&keys.tokens_month, keys.month_ttl);
            }
            if c.calls.is_some() || c.tokens.is_some() {
                self.has_pending.store(true, Ordering::Release);
            }
        }
        out.burst_remaining = ((now + tau - effective_tat) / interval).max(0) as u64;
        out.burst_reset_us = (effective_tat - now).max(0) as u64;
        out
    }

    /// The organization's counters now.
    pub async fn usage(&self, redis: &Redis, org: Uuid, now: OffsetDateTime) -> Usage {
        let keys = Keys::new(redis, org, "-", now);
        if !self.degraded.load(Ordering::Acquire) {
            let read = async {
                let mut conn = redis.conn().await?;
                let values: Vec<Option<u64>> = tokio::time::timeout(
                    redis.timeout(),
                    deadpool_redis::redis::cmd("MGET")
                        .arg(&keys.calls)
                        .arg(&keys.tokens_day)
                        .arg(&keys.tokens_month)
                        .query_async(&mut *conn),
                )
                .await??;
                anyhow::Ok(values)
            };
            match read.await {
                Ok(v) if v.len() == 3 => {
                    return Usage {
                        calls_today: v[0].unwrap_or(0),
                        tokens_today: v[1].unwrap_or(0),
                        tokens_this_month: v[2].unwrap_or(0),
                        approximate: false,
                    };
                }
                Ok(_) => {}
                Err(e) => self.redis_failed(&e),
            }
        }
        let local = self.local.lock().unwrap_or_else(|e| e.into_inner());
        let seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        let get = |k: &String| local.counts.get(k).or_else(|| seen.get(k)).copied().unwrap_or(0);
        Usage {
            calls_today: get(&keys.calls),
            tokens_today: get(&keys.tokens_day),
            tokens_this_month: get(&keys.tokens_month),
            approximate: true,
        }
    }
}

fn args(c: &Charge<'_>) -> (i64, i64, i64) {
    let calls = c.calls.map(Limit::as_arg).unwrap_or(-2);
    let (day, month) = c.tokens.map(|(d, m)| (d.as_arg(), m.as_arg())).unwrap_or((-2, -2));
    (calls, day, month)
}

/// Adds increments counted during an outage to the shared counters.
async fn reconcile(redis: &Redis, pending: &HashMap<String, (u64, i64)>) -> anyhow::Result<()> {
    let mut conn = redis.conn().await?;
    let mut pipe = deadpool_redis::redis::pipe();
    pipe.atomic();
    for (key, (delta, ttl)) in pending {
        pipe.cmd("INCRBY").arg(key).arg(*delta).ignore();
        pipe.cmd("EXPIRE").arg(key).arg(*ttl).arg("NX").ignore();
    }
    let () = tokio::time::timeout(redis.timeout() * 4, pipe.query_async(&mut *conn)).await??;
    metrics::counter!(RECONCILED_TOTAL).increment(pending.len() as u64);
    tracing::info!(counters = pending.len(), "rate limiter: counters kept during the outage added to Redis");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RedisConfig;

    fn unreachable_redis() -> Redis {
        Redis::new(&RedisConfig {
            url: "redis://127.0.0.1:1".into(),
            key_prefix: "t:".into(),
            pool_size: 1,
            timeout_ms: 50,
        })
        .unwrap()
    }

    fn charge(rate: RateLimit, calls: Limit) -> Charge<'static> {
        Charge { org: Uuid::nil(), client: "key:1", rate, calls: Some(calls), tokens: None }
    }

    #[test]
    fn the_local_bucket_allows_the_burst_then_the_rate() {
        let l = Limiter::new();
        let redis = unreachable_redis();
        let now = OffsetDateTime::now_utc();
        let keys = Keys::new(&redis, Uuid::nil(), "key:1", now);
        let c = charge(RateLimit { requests_per_minute: 60, burst: 3 }, Limit::Unlimited);
        let t0 = 1_000_000_000_i64;
        let passed: Vec<bool> = (0..5).map(|_| l.charge_local(&keys, t0, &c).refused.is_none()).collect();
        assert_eq!(passed, [true, true, true, false, false]);
        let refused = l.charge_local(&keys, t0, &c);
        assert_eq!(refused.retry_after_us, 1_000_000);
        assert_eq!(refused.burst_remaining, 0);
        // One interval later, one more.
        assert!(l.charge_local(&keys, t0 + 1_000_000, &c).refused.is_none());
        assert_eq!(l.charge_local(&keys, t0 + 1_000_000, &c).refused, Some(Refusal::Rate));
    }

    #[test]
    fn a_burst_is_exact_whatever_the_rate() {
        let l = Limiter::new();
        let redis = unreachable_redis();
        let now = OffsetDateTime::now_utc();
        for (rpm, burst) in [(7, 13), (6_000_000, 1000), (1, 1), (59, 60)] {
            let keys = Keys::new(&redis, Uuid::new_v4(), "key:1", now);
            let c = charge(RateLimit { requests_per_minute: rpm, burst }, Limit::Unlimited);
            let t0 = 1_763_800_000_000_000_i64;
            let passed = (0..burst + 5).filter(|_| l.charge_local(&keys, t0, &c).refused.is_none()).count();
            assert_eq!(passed, burst as usize, "rpm {rpm}, burst {burst}");
        }
    }

    #[test]
    fn the_local_quota_counts_what_passed_and_keeps_it_for_redis() {
        let l = Limiter::new();
        let redis = unreachable_redis();
        let now = OffsetDateTime::now_utc();
        let keys = Keys::new(&redis, Uuid::nil(), "key:1", now);
        let c = charge(RateLimit { requests_per_minute: 6_000_000, burst: 1_000_000 }, Limit::Max(4));
        let outcomes: Vec<_> = (0..6).map(|_| l.charge_local(&keys, 5, &c)).collect();
        assert_eq!(outcomes.iter().filter(|o| o.refused.is_none()).count(), 4);
        assert_eq!(outcomes[5].refused, Some(Refusal::DailyCalls));
        assert_eq!(outcomes[3].calls_today, 4);
        let local = l.local.lock().unwrap();
        assert_eq!(local.pending.get(&keys.calls).map(|p| p.0), Some(4));
    }

    #[tokio::test]
    async fn an_unreachable_redis_opens_the_circuit() {
        let l = Limiter::new();
        let redis = unreachable_redis();
        let c = charge(RateLimit { requests_per_minute: 60, burst: 2 }, Limit::Max(10));
        let now = OffsetDateTime::now_utc();
        let first = l.charge(&redis, now, &c).await;
        assert!(first.local && first.refused.is_none());
        assert!(l.degraded.load(Ordering::Acquire));
        // While open, no request waits for Redis; once it expires, exactly one request probes.
        assert!(!l.try_redis());
        l.open_until.store(0, Ordering::Release);
        assert!(l.try_redis());
        assert!(!l.try_redis());
        let second = l.charge(&redis, now, &c).await;
        let third = l.charge(&redis, now, &c).await;
        assert!(second.refused.is_none());
        assert_eq!(third.refused, Some(Refusal::Rate));
    }
}
