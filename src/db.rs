//! The Postgres pool: one per process, shared by every module, and the embedded migrations.

use std::time::{Duration, Instant};

use sqlx::{
    PgPool,
    postgres::{PgConnectOptions, PgPoolOptions},
};

use crate::config::DatabaseConfig;

/// The schema, compiled into the binary so that a deployment is one file.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// Pool options shared by start-up and tests, so both behave the same under load and outages.
pub fn pool_options(cfg: &DatabaseConfig) -> PgPoolOptions {
    PgPoolOptions::new()
        .max_connections(cfg.max_connections)
        .acquire_timeout(Duration::from_millis(cfg.acquire_timeout_ms))
        // A connection that died with the server is noticed before a request gets it.
        .test_before_acquire(true)
}

/// Connects, retrying for `connect_retry_secs` while Postgres is not (yet) reachable.
pub async fn connect(cfg: &DatabaseConfig) -> anyhow::Result<PgPool> {
    let options: PgConnectOptions = cfg.url.parse().map_err(|e| anyhow::anyhow!("database.url: {e}"))?;
    let deadline = Instant::now() + Duration::from_secs(cfg.connect_retry_secs);
    let mut delay = Duration::from_millis(200);
    loop {
        match pool_options(cfg).connect_with(options.clone()).await {
            Ok(pool) => return Ok(pool),
            Err(e) if Instant::now() + delay < deadline => {
                tracing::warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "postgres not reachable yet");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
            Err(e) => {
                anyhow::bail!(
                    "postgres at {} not reachable after {}s: {e}",
                    crate::config::redacted_url(&cfg.url),
                    cfg.connect_retry_secs
                )
            }
        }
    }
}

/// Applies every pending migration; safe to run from several instances at once (sqlx takes a lock).
pub async fn migrate(pool: &PgPool) -> anyhow::Result<()> {
    MIGRATOR.run(pool).await?;
    Ok(())
}
