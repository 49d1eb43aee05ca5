//! Brute-force protection for password login (and other unauthenticated, costly routes):
//! attempts are counted per account and per client IP within a window; past the limit each further
//! attempt doubles the wait, up to a cap.
//!
//! An attempt is reserved before the password is checked, in one atomic step that reads the
//! counters, refuses if a subject must wait, and counts the attempt otherwise. So parallel attempts
//! cannot all pass the check before any of them is counted: of N concurrent wrong passwords, at most
//! the limit are ever verified. A success refunds its reservation (it clears the account's counter
//! and gives the IP's attempt back).
//!
//! Counters live in Redis so that every instance sees the same numbers. When Redis is away, a
//! per-process table keeps enforcing (per instance, so approximately).

use std::{collections::HashMap, sync::Mutex};

use deadpool_redis::redis::Script;
use time::OffsetDateTime;

use crate::{config::AuthConfig, redis::Redis};

/// One throttled subject: an account or an IP, with its own limit.
pub struct Subject {
    key: String,
    limit: u32,
    /// Whether a success clears the counter (an account) or only gives its attempt back (an IP).
    clear_on_success: bool,
}

/// Attempt counters.
pub struct LoginThrottle {
    cfg: AuthConfig,
    local: Mutex<HashMap<String, (u32, i64)>>,
    reserve: Script,
}

/// Reads every subject's (count, last attempt); if any must wait, answers the longest wait and
/// counts nothing; else counts the attempt against every subject and answers 0.
/// KEYS: the subjects. ARGV: now, back-off base, back-off max, key TTL, then one limit per key.
const RESERVE: &str = r#"
local now, base, cap, ttl = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local wait = 0
for i, key in ipairs(KEYS) do
  local n = tonumber(redis.call('HGET', key, 'n') or '0')
  local last = tonumber(redis.call('HGET', key, 'last') or '0')
  local limit = tonumber(ARGV[4 + i])
  if n >= limit then
    local backoff = math.min(base * 2 ^ math.min(n - limit, 30), cap)
    wait = math.max(wait, last + backoff - now)
  end
end
if wait > 0 then return wait end
for _, key in ipairs(KEYS) do
  redis.call('HINCRBY', key, 'n', 1)
  redis.call('HSET', key, 'last', now)
  redis.call('EXPIRE', key, ttl)
end
return 0
"#;

impl LoginThrottle {
    pub fn new(cfg: AuthConfig) -> Self {
        Self { cfg, local: Mutex::new(HashMap::new()), reserve: Script::new(RESERVE) }
    }

    /// The subjects of one login attempt; the email is hashed so that no address sits in Redis.
    pub fn subjects(&self, email: &str, ip: Option<&str>) -> Vec<Subject> {
        let mut out = vec![Subject {
            key: format!("login:acct:{}", hex::encode(crate::crypto::sha256(&email.to_lowercase()))),
            limit: self.cfg.login_max_failures_account,
            clear_on_success: true,
        }];
        if let Some(ip) = ip {
            out.push(Subject {
                key: format!("login:ip:{ip}"),
                limit: self.cfg.login_max_failures_ip,
                clear_on_success: false,
            });
        }
        out
    }

    /// The subject of an attempt on another unauthenticated route, counted per client IP under
    /// `route`'s own name.
    pub fn ip_subject(&self, route: &str, ip: Option<&str>, limit: u32) -> Vec<Subject> {
        vec![Subject { key: format!("{route}:ip:{}", ip.unwrap_or("unknown")), limit, clear_on_success: false }]
    }

    fn wait(&self, attempts: u32, limit: u32, last: i64, now: i64) -> u64 {
        if attempts < limit {
            return 0;
        }
        let doublings = (attempts - limit).min(30);
        let backoff =
            self.cfg.login_backoff_base_secs.saturating_mul(1 << doublings).min(self.cfg.login_backoff_max_secs);
        let until = last.saturating_add(backoff as i64);
        (until - now).max(0) as u64
    }

    fn ttl(&self) -> u64 {
        self.cfg.login_window_secs.max(self.cfg.login_backoff_max_secs)
    }

    /// Reserves one attempt: `Err(seconds)` if a subject must wait first (nothing is counted), else
    /// the attempt is counted against every subject before the caller checks anything. `now` is
    /// the application's clock, so waits are measured on the clock tests move.
    pub async fn reserve(&self, redis: &Redis, subjects: &[Subject], now: OffsetDateTime) -> Result<(), u64> {
        let now = now.unix_timestamp();
        let wait = match self.reserve_redis(redis, subjects, now).await {
            Ok(w) => w,
            Err(e) => {
                tracing::warn!(error = %e, "login throttle: Redis unavailable, enforcing per instance");
                self.reserve_local(subjects, now)
            }
        };
        if wait > 0 { Err(wait) } else { Ok(()) }
    }

    async fn reserve_redis(&self, redis: &Redis, subjects: &[Subject], now: i64) -> anyhow::Result<u64> {
        let mut conn = redis.conn().await?;
        let mut inv = self.reserve.prepare_invoke();
        for s in subjects {
            inv.key(redis.key(&s.key));
        }
        inv.arg(now).arg(self.cfg.login_backoff_base_secs).arg(self.cfg.login_backoff_max_secs).arg(self.ttl());
        for s in subjects {
            inv.arg(s.limit);
        }
        let wait: i64 = tokio::time::timeout(redis.timeout(), inv.invoke_async(&mut *conn)).await??;
        Ok(wait.max(0) as u64)
    }

    fn reserve_local(&self, subjects: &[Subject], now: i64) -> u64 {
        let mut local = self.local.lock().unwrap_or_else(|e| e.into_inner());
        if local.len() > 100_000 {
            local.clear();
        }
        let window = self.ttl() as i64;
        let wait = subjects
            .iter()
            .map(|s| match local.get(&s.key) {
                Some(&(n, last)) if now - last <= window => self.wait(n, s.limit, last, now),
                _ => 0,
            })
            .max()
            .unwrap_or(0);
        if wait > 0 {
            return wait;
        }
        for s in subjects {
            let e = local.entry(s.key.clone()).or_insert((0, now));
            if now - e.1 > window {
                *e = (0, now);
            }
            *e = (e.0 + 1, now);
        }
        0
    }

    /// A successful attempt refunds its reservation: the account's counter is cleared, the IP's
    /// attempt is given back.
    pub async fn succeeded(&self, redis: &Redis, subjects: &[Subject]) {
        {
            let mut local = self.local.lock().unwrap_or_else(|e| e.into_inner());
            for s in subjects {
                if s.clear_on_success {
                    local.remove(&s.key);
                } else if let Some(e) = local.get_mut(&s.key) {
                    e.0 = e.0.saturating_sub(1);
                }
            }
        }
        let refund = async {
            let mut conn = redis.conn().await?;
            let mut pipe = deadpool_redis::redis::pipe();
            for s in subjects {
                let key = redis.key(&s.key);
                if s.clear_on_success {
                    pipe.cmd("DEL").arg(&key).ignore();
                } else {
                    pipe.cmd("HINCRBY").arg(&key).arg("n").arg(-1).ignore();
                }
            }
            let () = tokio::time::timeout(redis.timeout(), pipe.query_async(&mut *conn)).await??;
            anyhow::Ok(())
        };
        if let Err(e) = refund.await {
            tracing::warn!(error = %e, "login throttle: could not refund an attempt in Redis");
        }
    }
}
