//! The shared application state: one Postgres pool, one Redis, the in-process engines and caches.
//!
//! It sits low in the house, below every module that uses it, so that modules import it without
//! importing [`crate::app`], which composes them.

use std::{sync::Arc, time::Duration};

use metrics_exporter_prometheus::PrometheusHandle;
use sqlx::PgPool;

use crate::{
    auth::{AuthState, keys::KeyRing},
    config::Config,
    redis::Redis,
    telemetry,
};

/// Everything a handler may need: cheap to clone, one allocation behind it.
#[derive(Clone)]
pub struct AppState(Arc<Inner>);

struct Inner {
    config: Config,
    db: PgPool,
    redis: Redis,
    metrics: PrometheusHandle,
    listener_is_tls: bool,
    auth: AuthState,
    keys: KeyRing,
    policy: crate::policy::Engine,
    decisions: crate::policy::DecisionLog,
    tiers: crate::tiers::Tiers,
    analytics: Arc<crate::analytics::Recorder>,
    clock: crate::clock::Clock,
    http: reqwest::Client,
    webhooks: crate::webhooks::Webhooks,
    usage: crate::usage::Usage,
    city: crate::city::City,
    trust: crate::trust::Trust,
}

impl AppState {
    pub fn new(config: Config, db: PgPool, redis: Redis) -> anyhow::Result<Self> {
        let listener_is_tls = config.tls.enabled();
        let auth = AuthState::new(&config.auth, &config.oidc)?;
        let keys = KeyRing::new(config.kek());
        let policy = crate::policy::Engine::with_cache(config.policy.decision_cache_entries)?;
        let decisions = crate::policy::DecisionLog::new(
            config.policy.log_queue_capacity,
            config.policy.log_batch_size,
            std::time::Duration::from_secs(config.policy.permit_fold_secs),
            config.policy.permit_fold_keys,
        );
        let tiers = crate::tiers::Tiers::new(&config.tiers);
        let analytics = Arc::new(crate::analytics::Recorder::new(&config.analytics));
        let http = reqwest::Client::builder()
            .user_agent(concat!("agentidp/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(Duration::from_secs(5))
            .build()?;
        let webhooks = crate::webhooks::Webhooks::new(&config.webhooks)?;
        let usage = crate::usage::Usage::new(&config.usage);
        let city = crate::city::City::new(&config.city);
        let trust = crate::trust::Trust::new(&config.trust)?;
        Ok(Self(Arc::new(Inner {
            config,
            db,
            redis,
            metrics: telemetry::metrics_handle(),
            listener_is_tls,
            auth,
            keys,
            policy,
            decisions,
            tiers,
            analytics,
            clock: crate::clock::Clock::default(),
            http,
            webhooks,
            usage,
            city,
            trust,
        })))
    }
    pub fn config(&self) -> &Config {
        &self.0.config
    }
    pub fn db(&self) -> &PgPool {
        &self.0.db
    }
    pub fn redis(&self) -> &Redis {
        &self.0.redis
    }
    pub fn metrics(&self) -> &PrometheusHandle {
        &self.0.metrics
    }
    pub fn auth(&self) -> &AuthState {
        &self.0.auth
    }
    pub fn keys(&self) -> &KeyRing {
        &self.0.keys
    }
    pub fn policy(&self) -> &crate::policy::Engine {
        &self.0.policy
    }
    /// Where decisions queue for the decision log.
    pub fn decision_log(&self) -> &crate::policy::DecisionLog {
        &self.0.decisions
    }
    pub fn tiers(&self) -> &crate::tiers::Tiers {
        &self.0.tiers
    }
    /// Where per-request and per-token records are counted for `analytics_event`.
    pub fn analytics(&self) -> &Arc<crate::analytics::Recorder> {
        &self.0.analytics
    }
    /// The clock quotas read (tests move it across day boundaries).
    pub fn clock(&self) -> &crate::clock::Clock {
        &self.0.clock
    }
    /// Webhook delivery: the guarded client and the dispatcher's state.
    pub fn webhooks(&self) -> &crate::webhooks::Webhooks {
        &self.0.webhooks
    }
    /// Usage metering's caches (budgets, prices, spend, partitions).
    pub fn usage(&self) -> &crate::usage::Usage {
        &self.0.usage
    }

    /// Trust documents: this instance's budget for their public reads.
    pub fn trust(&self) -> &crate::trust::Trust {
        &self.0.trust
    }

    /// The city: this instance's presence viewers and scripts.
    pub fn city(&self) -> &crate::city::City {
        &self.0.city
    }
    /// The outbound HTTP client (Stripe).
    pub fn http_client(&self) -> &reqwest::Client {
        &self.0.http
    }
    /// Whether our own listener speaks TLS (proxies may still tell us otherwise).
    pub fn listener_is_tls(&self) -> bool {
        self.0.listener_is_tls
    }
}
