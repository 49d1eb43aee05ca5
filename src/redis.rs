//! The Redis pool and key namespacing. Redis holds only hot, rebuildable state, so the process runs
//! (degraded) without it; every caller must treat a Redis error as "unknown", never as a 500.

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use deadpool_redis::{Config as PoolConfig, Pool, PoolConfig as DeadpoolConfig, Runtime, Timeouts};

use crate::config::RedisConfig;

/// A Redis pool plus the key prefix every key of this deployment lives under, and one multiplexed
/// connection for the per-request path.
#[derive(Clone)]
pub struct Redis {
    pool: Pool,
    prefix: String,
    timeout: Duration,
    client: redis::Client,
    /// Shared by every request: commands from concurrent requests go out pipelined on one socket,
    /// which costs Redis and us far fewer system calls than a pooled connection per request.
    mux: Arc<Mutex<Option<redis::aio::MultiplexedConnection>>>,
}

impl Redis {
    /// Builds the pool without connecting: an unreachable Redis must not stop start-up.
    pub fn new(cfg: &RedisConfig) -> anyhow::Result<Self> {
        Self::with_prefix(cfg, cfg.key_prefix.clone())
    }

    /// The same, under another key prefix (tests give each app its own).
    pub fn with_prefix(cfg: &RedisConfig, prefix: String) -> anyhow::Result<Self> {
        let timeout = Duration::from_millis(cfg.timeout_ms);
        let mut pool_cfg = PoolConfig::from_url(cfg.url.clone());
        pool_cfg.pool = Some(DeadpoolConfig {
            max_size: cfg.pool_size,
            timeouts: Timeouts { wait: Some(timeout), create: Some(timeout), recycle: Some(timeout) },
            ..Default::default()
        });
        let pool = pool_cfg.create_pool(Some(Runtime::Tokio1)).map_err(|e| anyhow::anyhow!("redis.url: {e}"))?;
        let client = redis::Client::open(cfg.url.as_str()).map_err(|e| anyhow::anyhow!("redis.url: {e}"))?;
        Ok(Self { pool, prefix, timeout, client, mux: Arc::new(Mutex::new(None)) })
    }

    /// The full key for a name within this deployment's namespace.
    pub fn key(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// A pooled connection, failing fast when Redis is away.
    pub async fn conn(&self) -> anyhow::Result<deadpool_redis::Connection> {
        Ok(tokio::time::timeout(self.timeout, self.pool.get()).await??)
    }

    /// The shared multiplexed connection, connected on first use and after [`Self::drop_multiplexed`].
    pub async fn multiplexed(&self) -> anyhow::Result<redis::aio::MultiplexedConnection> {
        if let Some(c) = self.mux.lock().unwrap_or_else(|e| e.into_inner()).clone() {
            return Ok(c);
        }
        // The client's own deadlines are the configured one, not its 500 ms default: a command
        // queued behind many others on this one connection must not fail before callers' deadline.
        let config = redis::AsyncConnectionConfig::new()
            .set_response_timeout(Some(self.timeout))
            .set_connection_timeout(Some(self.timeout));
        let conn =
            tokio::time::timeout(self.timeout, self.client.get_multiplexed_async_connection_with_config(&config))
                .await??;
        *self.mux.lock().unwrap_or_else(|e| e.into_inner()) = Some(conn.clone());
        Ok(conn)
    }

    /// Forgets the multiplexed connection after an error; the next use connects afresh.
    pub fn drop_multiplexed(&self) {
        *self.mux.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    /// The per-command deadline callers should apply.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// PING with the configured deadline.
    pub async fn ping(&self) -> anyhow::Result<()> {
        let mut conn = self.conn().await?;
        let pong: String =
            tokio::time::timeout(self.timeout, deadpool_redis::redis::cmd("PING").query_async(&mut *conn)).await??;
        anyhow::ensure!(pong == "PONG", "unexpected PING answer");
        Ok(())
    }
}
