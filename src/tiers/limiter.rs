//! The rate limiter and quota counters: leases from Redis spent in-process, exact at the limit,
//! and a per-process fallback.
//!
//! A charge covers the client's rate limit (GCRA: a theoretical arrival time per client), then the
//! organization's daily call quota, then its daily and monthly token quotas. Refused requests
//! consume nothing.
//!
//! **Leases.** Asking Redis on every request would cost more than the identity check, so each
//! instance takes a *lease* in one atomic script: `k` units of every limited counter a request
//! charges (and `k` emission intervals of the client's bucket), which it then spends locally without
//! a round trip. The script sizes `k` from what is left, shared between the instances serving the
//! organization (they register in a short-lived set in the same script): `k = min(lease_max,
//! left / (lease_share × instances))`, and `k = 1` once that is below two — near a limit every
//! request is decided by Redis, so a limit of 50 lets exactly 50 through. A lease is taken inside
//! the counter it draws from, so the sum over instances never exceeds the limit: the overshoot is
//! zero. What an instance leased and did not spend within `lease_ttl_ms` is given back; until then
//! the others may see a count higher than what was spent (they under-admit, never over-admit).
//! A request that Redis refuses while this instance still has a grant in flight waits for it, so
//! a unit leased here is never stranded while a request of this instance is refused.
//!
//! Counters of unlimited quotas need no decision: they are counted in memory and added to Redis
//! in batches (every `settle_ms`, and before a status read), like the counts of an outage.
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
        atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use redis::Script;
use time::OffsetDateTime;
use tokio::sync::Notify;
use uuid::Uuid;

use super::plans::{Limit, RateLimit};
use crate::{
    clock::{next_midnight, next_month},
    config::LimiterConfig,
    redis::Redis,
};

pub const FALLBACK_TOTAL: &str = "tier_limiter_fallback_total";
pub const DEGRADED: &str = "tier_limiter_degraded";
pub const REJECTED_TOTAL: &str = "tier_rejections_total";
pub const RECONCILED_TOTAL: &str = "tier_counters_reconciled_total";
/// Requests decided from a lease, without Redis.
pub const LEASED_TOTAL: &str = "tier_limiter_leased_total";
/// Round trips to Redis for a decision (each one may take a lease).
pub const REDIS_DECISIONS_TOTAL: &str = "tier_limiter_redis_decisions_total";

/// How long the circuit stays open after a Redis failure before one request probes again.
const OPEN_FOR: Duration = Duration::from_secs(1);
/// Counters outlive their period by this much, so that a status read at the boundary still finds them.
const KEY_GRACE_SECS: i64 = 7200;
/// Entries the fallback keeps before it starts over.
const LOCAL_MAX: usize = 200_000;
/// How many times a request re-decides after a refusal that a grant in flight may lift.
const MAX_ATTEMPTS: usize = 4;

/// The script. KEYS: rate, calls today, tokens today, tokens this month, the organization's
/// instances. ARGV: 1 emission interval (µs; -2 when the rate is not charged here), 2 burst, 3 call
/// limit, 4 token day limit, 5 token month limit (-1 unlimited, -2 not charged here), 6 day TTL,
/// 7 month TTL (s), 8 most units to grant, 9 this instance's id, 10 the lease share. An instance
/// counts as serving the organization for 10 s after its last lease.
/// Returns: refused (0 none, 1 rate, 2 calls, 3 tokens/day, 4 tokens/month), units granted,
/// remaining burst, µs until the bucket is full, µs until a retry can pass, calls today, tokens
/// today, tokens this month (0 when not charged).
///
/// Time is Redis's own (`TIME`), so instances with skewed clocks share one bucket exactly; all
/// arithmetic is on whole microseconds, exact in Lua's doubles for the next few centuries.
const SCRIPT: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local limits = {tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])}
local ttls = {ARGV[6], ARGV[6], ARGV[7]}
local want = tonumber(ARGV[8])
local share = tonumber(ARGV[10])
if want > 1 then
  redis.call('ZADD', KEYS[5], t[1], ARGV[9])
  redis.call('ZREMRANGEBYSCORE', KEYS[5], '-inf', tonumber(t[1]) - 10)
  redis.call('EXPIRE', KEYS[5], 60)
  share = share * redis.call('ZCARD', KEYS[5])
end
local k = want
local refused = 0
local retry = 0
local tat = now
local tau = 0
if interval > 0 then
  tau = interval * tonumber(ARGV[2])
  tat = tonumber(redis.call('GET', KEYS[1])) or now
  if tat < now then tat = now end
  local left = math.floor((now + tau - tat) / interval)
  if left < 1 then
    refused = 1
    retry = tat + interval - tau - now
  else
    k = math.min(k, math.floor(left / share))
  end
end
local counts = {0, 0, 0}
for i = 1, 3 do
  if limits[i] ~= -2 then
    counts[i] = tonumber(redis.call('GET', KEYS[i + 1])) or 0
    if limits[i] >= 0 and refused == 0 then
      if counts[i] >= limits[i] then
        refused = i + 1
      else
        k = math.min(k, math.floor((limits[i] - counts[i]) / share))
      end
    end
  end
end
if k < 1 then k = 1 end
if refused ~= 0 then
  k = 0
else
  if interval > 0 then
    tat = tat + k * interval
    redis.call('SET', KEYS[1], string.format('%.0f', tat), 'PX', math.floor((tat - now) / 1000) + 1000)
  end
  for i = 1, 3 do
    if limits[i] ~= -2 then
      counts[i] = redis.call('INCRBY', KEYS[i + 1], k)
      if counts[i] == k then redis.call('EXPIRE', KEYS[i + 1], ttls[i]) end
    end
  end
end
local remaining = 0
if interval > 0 then remaining = math.floor((now + tau - tat) / interval) end
return {refused, k, remaining, tat - now, retry, counts[1], counts[2], counts[3]}
"#;

/// Gives back emission intervals leased from a bucket and not spent. KEYS: rate. ARGV: µs.
const REFUND: &str = r#"
local tat = tonumber(redis.call('GET', KEYS[1]))
if not tat then return 0 end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
tat = tat - tonumber(ARGV[1])
if tat <= now then
  redis.call('DEL', KEYS[1])
else
  redis.call('SET', KEYS[1], string.format('%.0f', tat), 'PX', math.floor((tat - now) / 1000) + 1000)
end
return 1
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
    instances: String,
    day_ttl: i64,
    month_ttl: i64,
}

impl Keys {
    fn new(redis: &Redis, org: Uuid, client: &str, now: OffsetDateTime) -> Self {
        use std::fmt::Write;
        // Built on every charge: the organization's part once (prefixed as every key is), then
        // each key from it.
        let base = redis.key(&format!("tier:{{{org}}}:"));
        let mut day = String::with_capacity(8);
        let _ = write!(day, "{:04}{:02}{:02}", now.year(), now.month() as u8, now.day());
        let month = &day[..6];
        let key = |parts: &[&str]| {
            let mut k = String::with_capacity(base.len() + parts.iter().map(|p| p.len()).sum::<usize>());
            k.push_str(&base);
            parts.iter().for_each(|p| k.push_str(p));
            k
        };
        Self {
            rate: key(&["rl:", client]),
            calls: key(&["calls:", &day]),
            tokens_day: key(&["tok:d:", &day]),
            tokens_month: key(&["tok:m:", month]),
            instances: key(&["inst"]),
            day_ttl: (next_midnight(now) - now).whole_seconds() + KEY_GRACE_SECS,
            month_ttl: (next_month(now) - now).whole_seconds() + KEY_GRACE_SECS,
        }
    }

    /// The key of a slot: 0 rate, 1 calls, 2 tokens today, 3 tokens this month.
    fn slot(&self, i: usize) -> &String {
        [&self.rate, &self.calls, &self.tokens_day, &self.tokens_month][i]
    }

    fn ttl(&self, i: usize) -> i64 {
        if i == 3 { self.month_ttl } else { self.day_ttl }
    }
}

/// A reservation whose leases are marked in flight while Redis is asked: granted or released
/// exactly once, and released when dropped unfinished.
struct InFlight<'a> {
    limiter: &'a Limiter,
    keys: &'a Keys,
    covered: [bool; 4],
    need: [bool; 4],
    open: bool,
}

impl InFlight<'_> {
    fn release(mut self) {
        self.open = false;
        self.limiter.release(self.keys, self.covered, self.need);
    }

    fn grant(mut self, c: &Charge<'_>, r: &Reply) {
        self.open = false;
        self.limiter.grant(self.keys, c, self.covered, self.need, r);
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        if self.open {
            self.limiter.release(self.keys, self.covered, self.need);
        }
    }
}

/// How a charge treats each slot (rate, calls, tokens today, tokens this month).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Not charged.
    Skip,
    /// A limit: decided by Redis or from a lease.
    Leased,
    /// No limit: counted in memory, added to Redis in batches.
    Counted,
}

fn modes(c: &Charge<'_>) -> [Mode; 4] {
    let of = |l: Option<Limit>| match l {
        None => Mode::Skip,
        Some(Limit::Max(_)) => Mode::Leased,
        Some(Limit::Unlimited) => Mode::Counted,
    };
    [Mode::Leased, of(c.calls), of(c.tokens.map(|t| t.0)), of(c.tokens.map(|t| t.1))]
}

/// Units of one key leased from Redis and not yet spent by this process.
struct Lease {
    org: Uuid,
    left: u64,
    expires: Instant,
    /// Decisions for this key now in flight to Redis from this process; a refusal waits for them.
    in_flight: u32,
    /// What Redis reported with the last grant: the burst remaining (rate) or the count (counters).
    reported: u64,
    /// Rate leases: µs until the bucket was full when granted, and its emission interval and burst.
    reset_us: i64,
    interval_us: i64,
    burst: u64,
    granted: Instant,
    /// The size of the last grant: above one, the limit is far and renewals are shared.
    last_granted: u64,
}

impl Lease {
    fn new(org: Uuid) -> Self {
        let now = Instant::now();
        Self {
            org,
            left: 0,
            expires: now,
            in_flight: 0,
            reported: 0,
            reset_us: 0,
            interval_us: 1,
            burst: 0,
            granted: now,
            last_granted: 0,
        }
    }

    fn usable(&self, now: Instant) -> bool {
        self.left > 0 && self.expires > now
    }

    /// The burst remaining and µs until full, counting what is leased and not spent as available.
    fn burst_now(&self, now: Instant) -> (u64, u64) {
        let elapsed = now.saturating_duration_since(self.granted).as_micros() as i64;
        let interval = self.interval_us.max(1);
        let refilled = (elapsed / interval).max(0) as u64;
        let remaining = (self.reported + self.left + refilled).min(self.burst);
        let reset = (self.reset_us - self.left as i64 * interval - elapsed).max(0) as u64;
        (remaining, reset)
    }

    /// The counter as this process sees it: what Redis reported, less what is leased and not spent.
    fn count(&self) -> u64 {
        self.reported.saturating_sub(self.left)
    }
}

/// Counts this process learnt from Redis (to start a fallback from) or made alone (to reconcile),
/// and the leases it holds.
#[derive(Default)]
struct Local {
    /// Rate key → theoretical arrival time (µs).
    tat: HashMap<String, i64>,
    /// Counter key → value as far as this process knows.
    counts: HashMap<String, u64>,
    /// Counter key → (increments Redis has not seen, TTL to set).
    pending: HashMap<String, (u64, i64)>,
    /// Key → units leased from Redis.
    leases: HashMap<String, Lease>,
}

impl Local {
    fn lease(&mut self, key: &str, org: Uuid) -> &mut Lease {
        if !self.leases.contains_key(key) {
            self.leases.insert(key.to_owned(), Lease::new(org));
        }
        self.leases.get_mut(key).expect("just inserted")
    }

    fn count_pending(&mut self, key: &str, ttl: i64) {
        match self.pending.get_mut(key) {
            Some(p) => p.0 += 1,
            None => {
                self.pending.insert(key.to_owned(), (1, ttl));
            }
        }
    }
}

/// What [`Limiter::reserve`] found.
enum Reserved {
    /// Units taken from leases (by slot), and the slots Redis must decide.
    Ask([bool; 4], [bool; 4]),
    /// A lease for this slot is on its way.
    Wait(usize),
}

/// The script's answer.
struct Reply {
    refused: Option<Refusal>,
    granted: u64,
    burst_remaining: u64,
    burst_reset_us: i64,
    retry_after_us: u64,
    counts: [u64; 3],
}

/// Which leases [`Limiter::settle`] gives back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Giveback {
    /// Those past `lease_ttl_ms` (the periodic settle).
    Expired,
    /// All of one organization's (before its status is read).
    Org(Uuid),
    /// Every one (shutdown).
    All,
}

/// The limiter of one process.
pub struct Limiter {
    script: Script,
    refund: Script,
    cfg: LimiterConfig,
    /// This process in the organizations' instance sets.
    instance: String,
    local: Mutex<Local>,
    /// Woken whenever a decision in flight to Redis comes back.
    landed: Notify,
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
    /// Decisions this process asked of Redis (each may take a lease).
    redis_decisions: AtomicU64,
}

impl Default for Limiter {
    fn default() -> Self {
        Self::new(&LimiterConfig::default())
    }
}

impl Limiter {
    pub fn new(cfg: &LimiterConfig) -> Self {
        Self {
            script: Script::new(SCRIPT),
            refund: Script::new(REFUND),
            cfg: cfg.clone(),
            instance: Uuid::new_v4().simple().to_string(),
            local: Mutex::new(Local::default()),
            landed: Notify::new(),
            started: Instant::now(),
            open_until: AtomicI64::new(0),
            degraded: AtomicBool::new(false),
            has_pending: AtomicBool::new(false),
            seen: Mutex::new(HashMap::new()),
            redis_decisions: AtomicU64::new(0),
        }
    }

    /// How many decisions this process has asked of Redis: with leases, far fewer than requests.
    pub fn redis_decisions(&self) -> u64 {
        self.redis_decisions.load(Ordering::Relaxed)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Local> {
        self.local.lock().unwrap_or_else(|e| e.into_inner())
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

    /// Redis answered: close the circuit. What was counted alone follows with the next settle.
    fn redis_ok(&self) {
        // Loads first: a swap on every request would bounce the cache line between cores.
        if self.degraded.load(Ordering::Acquire) && self.degraded.swap(false, Ordering::AcqRel) {
            metrics::gauge!(DEGRADED).set(0.0);
            tracing::info!("rate limiter: Redis is back, limits are shared again");
            // The next outage starts from what Redis reports by then, not from these.
            let mut local = self.lock();
            local.tat.clear();
            local.counts.clear();
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

    /// From leases where they cover the request; else by Redis while it answers (taking a lease);
    /// else by this process alone.
    async fn decide(&self, redis: &Redis, now: OffsetDateTime, c: &Charge<'_>) -> Outcome {
        let keys = Keys::new(redis, c.org, c.client, now);
        let modes = modes(c);
        for attempt in 1..=MAX_ATTEMPTS {
            let (covered, need) = match self.reserve(&keys, c.org, &modes, attempt < MAX_ATTEMPTS) {
                Reserved::Ask(covered, need) => (covered, need),
                Reserved::Wait(slot) => {
                    self.wait_for_grants(keys.slot(slot), redis.timeout()).await;
                    continue;
                }
            };
            if !need.contains(&true) {
                metrics::counter!(LEASED_TOTAL).increment(1);
                return self.spent(&keys, &modes, None);
            }
            // From here the leases are marked in flight: the mark must end however this ends,
            // also when the request is dropped while Redis answers (its client went away), or
            // every later request would wait for a grant that never lands.
            let reservation = InFlight { limiter: self, keys: &keys, covered, need, open: true };
            if !self.try_redis() {
                reservation.release();
                break;
            }
            metrics::counter!(REDIS_DECISIONS_TOTAL).increment(1);
            self.redis_decisions.fetch_add(1, Ordering::Relaxed);
            let reply = match self.charge_redis(redis, &keys, c, &need).await {
                Ok(r) => r,
                Err(e) => {
                    reservation.release();
                    self.redis_failed(&e);
                    break;
                }
            };
            self.redis_ok();
            let Some(refusal) = reply.refused else {
                reservation.grant(c, &reply);
                let outcome = self.spent(&keys, &modes, Some(&reply));
                self.remember(&keys, &outcome);
                return outcome;
            };
            reservation.release();
            // A grant of this process still in flight may hold what Redis just refused: wait for
            // it and decide again, so that a leased unit is never stranded while we refuse.
            let slot = match refusal {
                Refusal::Rate => 0,
                Refusal::DailyCalls => 1,
                Refusal::DailyTokens => 2,
                Refusal::MonthlyTokens => 3,
            };
            if attempt == MAX_ATTEMPTS || !self.wait_for_grants(keys.slot(slot), redis.timeout()).await {
                return self.refused(&keys, &need, &reply);
            }
        }
        metrics::counter!(FALLBACK_TOTAL).increment(1);
        self.charge_local(&keys, (now.unix_timestamp_nanos() / 1_000) as i64, c)
    }

    /// Takes one unit from each lease that covers the request; marks the rest as in flight.
    /// Returns (covered by a lease, must be asked of Redis) by slot, or, when `may_wait` and a
    /// lease of this process is already on its way for a slot, that slot to wait for.
    fn reserve(&self, keys: &Keys, org: Uuid, modes: &[Mode; 4], may_wait: bool) -> Reserved {
        let now = Instant::now();
        let mut local = self.lock();
        let mut covered = [false; 4];
        let mut need = [false; 4];
        for i in (0..4).filter(|i| modes[*i] == Mode::Leased) {
            let lease = local.leases.get(keys.slot(i));
            covered[i] = lease.is_some_and(|l| l.usable(now));
            // Far from the limit one request renews a lease and the others wait for it, rather
            // than all asking Redis at once; near it (grants of one) each asks for itself.
            if may_wait && !covered[i] && lease.is_some_and(|l| l.in_flight > 0 && l.last_granted > 1) {
                return Reserved::Wait(i);
            }
        }
        if covered.iter().zip(modes).all(|(c, m)| *c || *m != Mode::Leased) {
            for i in (0..4).filter(|i| covered[*i]) {
                local.lease(keys.slot(i), org).left -= 1;
            }
            for i in (1..4).filter(|i| modes[*i] == Mode::Counted) {
                local.count_pending(keys.slot(i), keys.ttl(i));
            }
            drop(local);
            self.note_pending();
            return Reserved::Ask(covered, need);
        }
        // Something must come from Redis. The units taken from the others go back if Redis
        // refuses; meanwhile every lease involved is marked in flight, so no settle gives it back.
        for i in (0..4).filter(|i| modes[*i] == Mode::Leased) {
            need[i] = !covered[i];
            let lease = local.lease(keys.slot(i), org);
            lease.in_flight += 1;
            if covered[i] {
                lease.left -= 1;
            }
        }
        Reserved::Ask(covered, need)
    }

    /// Undoes a reservation: gives back units taken from leases, and ends the in-flight marks.
    /// (Called through [`InFlight`], which also does it when a decision is dropped midway.)
    fn release(&self, keys: &Keys, covered: [bool; 4], need: [bool; 4]) {
        let mut local = self.lock();
        for i in (0..4).filter(|i| covered[*i] || need[*i]) {
            if let Some(l) = local.leases.get_mut(keys.slot(i)) {
                if covered[i] {
                    l.left += 1;
                }
                l.in_flight = l.in_flight.saturating_sub(1);
            }
        }
        drop(local);
        self.landed.notify_waiters();
    }

    /// Stores what Redis granted beyond this request's own unit, counts the unlimited slots.
    fn grant(&self, keys: &Keys, c: &Charge<'_>, covered: [bool; 4], need: [bool; 4], r: &Reply) {
        let now = Instant::now();
        let ttl = Duration::from_millis(self.cfg.lease_ttl_ms);
        let modes = modes(c);
        let mut local = self.lock();
        for i in (0..4).filter(|i| covered[*i]) {
            let l = local.lease(keys.slot(i), c.org);
            l.in_flight = l.in_flight.saturating_sub(1);
        }
        for i in (0..4).filter(|i| need[*i]) {
            let l = local.lease(keys.slot(i), c.org);
            l.in_flight = l.in_flight.saturating_sub(1);
            l.left += r.granted.saturating_sub(1);
            l.last_granted = r.granted;
            l.expires = now + ttl;
            l.granted = now;
            if i == 0 {
                l.reported = r.burst_remaining;
                l.reset_us = r.burst_reset_us;
                l.interval_us = c.rate.interval_us();
                l.burst = c.rate.burst as u64;
            } else {
                l.reported = r.counts[i - 1];
            }
        }
        for i in (1..4).filter(|i| modes[*i] == Mode::Counted) {
            local.count_pending(keys.slot(i), keys.ttl(i));
        }
        drop(local);
        self.note_pending();
        self.landed.notify_waiters();
    }

    /// The outcome of an admitted request, from the leases (which now hold what Redis reported).
    fn spent(&self, keys: &Keys, modes: &[Mode; 4], reply: Option<&Reply>) -> Outcome {
        let now = Instant::now();
        let local = self.lock();
        let (burst_remaining, burst_reset_us) =
            local.leases.get(&keys.rate).map(|l| l.burst_now(now)).unwrap_or((0, 0));
        let count = |i: usize| match modes[i] {
            Mode::Leased => local.leases.get(keys.slot(i)).map(Lease::count).unwrap_or(0),
            _ => reply.map(|r| r.counts[i - 1]).unwrap_or(0),
        };
        Outcome {
            refused: None,
            burst_remaining,
            burst_reset_us,
            retry_after_us: 0,
            calls_today: count(1),
            tokens_today: count(2),
            tokens_this_month: count(3),
            local: false,
            now: OffsetDateTime::UNIX_EPOCH,
        }
    }

    /// A refusal as Redis reported it; what Redis was not asked about comes from the leases.
    fn refused(&self, keys: &Keys, need: &[bool; 4], r: &Reply) -> Outcome {
        let local = self.lock();
        let count = |i: usize| match local.leases.get(keys.slot(i)) {
            Some(l) if !need[i] => l.count(),
            _ => r.counts[i - 1],
        };
        Outcome {
            refused: r.refused,
            burst_remaining: r.burst_remaining,
            burst_reset_us: r.burst_reset_us as u64,
            retry_after_us: r.retry_after_us,
            calls_today: count(1),
            tokens_today: count(2),
            tokens_this_month: count(3),
            local: false,
            now: OffsetDateTime::UNIX_EPOCH,
        }
    }

    /// Waits (at most `limit`) until no decision of this process for `key` is in flight. Returns
    /// whether there was one to wait for.
    async fn wait_for_grants(&self, key: &str, limit: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        let mut waited = false;
        loop {
            let landed = self.landed.notified();
            if self.lock().leases.get(key).is_none_or(|l| l.in_flight == 0) {
                return waited;
            }
            waited = true;
            if tokio::time::timeout_at(deadline, landed).await.is_err() {
                return true;
            }
        }
    }

    fn note_pending(&self) {
        if !self.has_pending.load(Ordering::Acquire) {
            self.has_pending.store(true, Ordering::Release);
        }
    }

    async fn charge_redis(
        &self,
        redis: &Redis,
        keys: &Keys,
        c: &Charge<'_>,
        need: &[bool; 4],
    ) -> anyhow::Result<Reply> {
        let reply = self.run_script(redis, keys, c, need).await;
        if reply.is_err() {
            redis.drop_multiplexed();
        }
        let r = reply?;
        anyhow::ensure!(r.len() == 8, "unexpected rate limiter reply");
        let n = |v: i64| v.max(0) as u64;
        Ok(Reply {
            refused: Refusal::from_code(r[0]),
            granted: n(r[1]),
            burst_remaining: n(r[2]),
            burst_reset_us: r[3].max(0),
            retry_after_us: n(r[4]),
            counts: [n(r[5]), n(r[6]), n(r[7])],
        })
    }

    /// One EVALSHA (EVAL only the first time a Redis sees the script) on the shared connection.
    async fn run_script(
        &self,
        redis: &Redis,
        keys: &Keys,
        c: &Charge<'_>,
        need: &[bool; 4],
    ) -> anyhow::Result<Vec<i64>> {
        let mut conn = redis.multiplexed().await?;
        let (calls, day, month) = args(c);
        let only = |i: usize, v: i64| if need[i] { v } else { -2 };
        let mut inv = self.script.key(&keys.rate);
        inv.key(&keys.calls)
            .key(&keys.tokens_day)
            .key(&keys.tokens_month)
            .key(&keys.instances)
            .arg(only(0, c.rate.interval_us()))
            .arg(c.rate.burst)
            .arg(only(1, calls))
            .arg(only(2, day))
            .arg(only(3, month))
            .arg(keys.day_ttl)
            .arg(keys.month_ttl)
            .arg(self.cfg.lease_max.max(1))
            .arg(&self.instance)
            .arg(self.cfg.lease_share.max(1));
        Ok(tokio::time::timeout(redis.timeout(), inv.invoke_async(&mut conn)).await??)
    }

    /// Gives back what leases hold unspent (all of an organization's, or only the expired ones)
    /// and adds the counts made in memory to Redis. Runs every `settle_ms`, before a status read
    /// and at shutdown.
    pub async fn settle(&self, redis: &Redis, which: Giveback) {
        let now = Instant::now();
        let mut rate = Vec::new();
        let mut counters = Vec::new();
        {
            let mut local = self.lock();
            local.leases.retain(|key, l| {
                let due = match which {
                    Giveback::Expired => l.expires <= now,
                    Giveback::Org(org) => l.expires <= now || l.org == org,
                    Giveback::All => true,
                };
                if l.in_flight == 0 && l.left > 0 && due {
                    if l.burst > 0 {
                        rate.push((key.clone(), l.left as i64 * l.interval_us));
                    } else {
                        counters.push((key.clone(), l.left));
                    }
                    l.left = 0;
                }
                l.left > 0 || l.in_flight > 0 || l.expires > now
            });
        }
        // Given back, a unit can be admitted again; if that fails it only lowers this period's
        // room by what was leased here. Never the other way round.
        if !(rate.is_empty() && counters.is_empty())
            && let Err(e) = self.give_back(redis, &rate, &counters).await
        {
            tracing::warn!(error = %e, leases = rate.len() + counters.len(), "could not give leases back");
        }
        if !self.degraded.load(Ordering::Acquire) {
            self.flush_pending(redis).await;
        }
    }

    async fn give_back(&self, redis: &Redis, rate: &[(String, i64)], counters: &[(String, u64)]) -> anyhow::Result<()> {
        let mut conn = redis.multiplexed().await?;
        for (key, us) in rate {
            let mut inv = self.refund.key(key);
            inv.arg(*us);
            let _: i64 = tokio::time::timeout(redis.timeout(), inv.invoke_async(&mut conn)).await??;
        }
        if !counters.is_empty() {
            let mut pipe = deadpool_redis::redis::pipe();
            for (key, n) in counters {
                pipe.cmd("DECRBY").arg(key).arg(*n).ignore();
            }
            let () = tokio::time::timeout(redis.timeout(), pipe.query_async(&mut conn)).await??;
        }
        Ok(())
    }

    /// Adds what was counted in memory (unlimited counters, an outage's decisions) to Redis.
    async fn flush_pending(&self, redis: &Redis) {
        if !(self.has_pending.load(Ordering::Acquire) && self.has_pending.swap(false, Ordering::AcqRel)) {
            return;
        }
        let pending = std::mem::take(&mut self.lock().pending);
        if pending.is_empty() {
            return;
        }
        if let Err(e) = reconcile(redis, &pending).await {
            tracing::warn!(error = %e, counters = pending.len(), "could not add counters to Redis; will retry");
            let mut local = self.lock();
            for (key, (delta, ttl)) in pending {
                local.pending.entry(key).or_insert((0, ttl)).0 += delta;
            }
            drop(local);
            self.has_pending.store(true, Ordering::Release);
        }
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
            // What this process leased and counted in memory goes back first, so that a single
            // instance reads exactly what it let through.
            self.settle(redis, Giveback::Org(org)).await;
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

/// Adds increments counted in memory (unlimited counters, an outage) to the shared counters.
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

    #[tokio::test]
    async fn a_decision_dropped_while_redis_answers_leaves_no_lease_in_flight() {
        // A Redis that accepts connections and never answers; the request is dropped meanwhile,
        // as when its client goes away.
        let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = silent.local_addr().unwrap();
        let hold = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((s, _)) = silent.accept().await {
                held.push(s);
            }
        });
        let redis = Redis::new(&RedisConfig {
            url: format!("redis://{addr}"),
            key_prefix: "t:".into(),
            pool_size: 1,
            timeout_ms: 10_000,
        })
        .unwrap();
        let l = Limiter::default();
        let c = charge(RateLimit { requests_per_minute: 600, burst: 100 }, Limit::Max(1_000));
        let dropped =
            tokio::time::timeout(Duration::from_millis(300), l.charge(&redis, OffsetDateTime::now_utc(), &c)).await;
        assert!(dropped.is_err(), "the decision should still be waiting for Redis");
        let stuck: Vec<String> =
            l.lock().leases.iter().filter(|(_, lease)| lease.in_flight > 0).map(|(k, _)| k.clone()).collect();
        assert!(stuck.is_empty(), "leases left in flight by a dropped decision: {stuck:?}");
        hold.abort();
    }

    #[test]
    fn the_local_bucket_allows_the_burst_then_the_rate() {
        let l = Limiter::default();
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
        let l = Limiter::default();
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
        let l = Limiter::default();
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
        let l = Limiter::default();
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
