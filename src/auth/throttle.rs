//! Brute-force protection for password login: failures are counted per account and per client IP
//! within a window; past the limit each further failure doubles the wait, up to a cap.
//!
//! Counters live in Redis so that every instance sees the same numbers. When Redis is away, a
//! per-process table keeps enforcing (per instance, so approximately).

use std::{collections::HashMap, sync::Mutex};

use time::OffsetDateTime;

use crate::{config::AuthConfig, redis::Redis};

/// One throttled subject: an account or an IP, with its own limit.
pub struct Subject {
    key: String,
    limit: u32,
}

/// Login failure counters.
pub struct LoginThrottle {
    cfg: AuthConfig,
    local: Mutex<HashMap<String, (u32, i64)>>,
}

impl LoginThrottle {
    pub fn new(cfg: AuthConfig) -> Self {
        Self { cfg, local: Mutex::new(HashMap::new()) }
    }

    /// The subjects of one attempt; the email is hashed so that no address sits in Redis.
    pub fn subjects(&self, email: &str, ip: Option<&str>) -> Vec<Subject> {
        let mut out = vec![Subject {
            key: format!("login:acct:{}", hex::encode(crate::crypto::sha256(&email.to_lowercase()))),
            limit: self.cfg.login_max_failures_account,
        }];
        if let Some(ip) = ip {
            out.push(Subject { key: format!("login:ip:{ip}"), limit: self.cfg.login_max_failures_ip });
        }
        out
    }

    fn wait(&self, failures: u32, limit: u32, last: i64, now: i64) -> u64 {
        if failures < limit {
            return 0;
        }
        let doublings = (failures - limit).min(30);
        let backoff =
            self.cfg.login_backoff_base_secs.saturating_mul(1 << doublings).min(self.cfg.login_backoff_max_secs);
        let until = last.saturating_add(backoff as i64);
        (until - now).max(0) as u64
    }

    /// Seconds to wait before another attempt is allowed (0: go ahead).
    pub async fn retry_after(&self, redis: &Redis, subjects: &[Subject]) -> u64 {
        let now = OffsetDateTime::now_utc().unix_timestamp();
        let counts = match self.read_redis(redis, subjects).await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "login throttle: Redis unavailable, enforcing per instance");
                let local = self.local.lock().unwrap_or_else(|e| e.into_inner());
                subjects.iter().map(|s| local.get(&s.key).copied().unwrap_or((0, 0))).collect()
            }
        };
        subjects.iter().zip(counts).map(|(s, (n, last))| self.wait(n, s.limit, last, now)).max().unwrap_or(0)
    }

    async fn read_redis(&self, redis: &Redis, subjects: &[Subject]) -> anyhow::Result<Vec<(u32, i64)>> {
        let mut conn = redis.conn().await?;
        let mut pipe = deadpool_redis::redis::pipe();
        for s in subjects {
            pipe.cmd("HMGET").arg(redis.key(&s.key)).arg("n").arg("last");
        }
        let rows: Vec<(Option<u32>, Option<i64>)> =
            tokio::time::timeout(redis.timeout(), pipe.query_async(&mut *conn)).await??;
        Ok(rows.into_iter().map(|(n, l)| (n.unwrap_or(0), l.unwrap_or(0))).collect())
    }

    /// Counts a failed attempt against every subject.
    pub async fn failed(&self, redis: &Redis, subjects: &[Subject]) {
        let now = OffsetDateTime::now_utc().unix_timestamp();
        {
            let mut local = self.local.lock().unwrap_or_else(|e| e.into_inner());
            if local.len() > 100_000 {
                local.clear();
            }
            for s in subjects {
                let e = local.entry(s.key.clone()).or_insert((0, now));
                if now - e.1 > self.cfg.login_window_secs as i64 {
                    *e = (0, now);
                }
                *e = (e.0 + 1, now);
            }
        }
        let write = async {
            let mut conn = redis.conn().await?;
            let mut pipe = deadpool_redis::redis::pipe();
            pipe.atomic();
            for s in subjects {
                let key = redis.key(&s.key);
                pipe.cmd("HINCRBY").arg(&key).arg("n").arg(1).ignore();
                pipe.cmd("HSET").arg(&key).arg("last").arg(now).ignore();
                pipe.cmd("EXPIRE")
                    .arg(&key)
                    .arg(self.cfg.login_window_secs.max(self.cfg.login_backoff_max_secs))
                    .ignore();
            }
            let () = tokio::time::timeout(redis.timeout(), pipe.query_async(&mut *conn)).await??;
            anyhow::Ok(())
        };
        if let Err(e) = write.await {
            tracing::warn!(error = %e, "login throttle: could not record a failure in Redis");
        }
    }

    /// A successful login clears the account's counter (not the IP's).
    pub async fn succeeded(&self, redis: &Redis, subjects: &[Subject]) {
        let Some(account) = subjects.first() else { return };
        self.local.lock().unwrap_or_else(|e| e.into_inner()).remove(&account.key);
        let clear = async {
            let mut conn = redis.conn().await?;
            let _: i64 = tokio::time::timeout(
                redis.timeout(),
                deadpool_redis::redis::cmd("DEL").arg(redis.key(&account.key)).query_async(&mut *conn),
            )
            .await??;
            anyhow::Ok(())
        };
        if let Err(e) = clear.await {
            tracing::warn!(error = %e, "login throttle: could not clear a counter in Redis");
        }
    }
}
