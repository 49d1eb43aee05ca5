//! Configuration: compiled-in defaults, then an optional file, then `AGENTIDP_` environment variables.
//!
//! Everything is validated once at boot. A bad value is reported as one line naming the key, and the
//! process exits with status 2 (see [`ConfigError`]).

use std::{fmt, net::SocketAddr, path::PathBuf};

use figment::{
    Figment,
    providers::{Env, Format, Toml},
};
use ipnet::IpNet;
use serde::{Deserialize, Serialize, Serializer};

/// The built-in defaults, also the reference for every key that exists.
pub const DEFAULTS: &str = include_str!("../config/default.toml");

/// The effective configuration of one process.
// Unknown top-level keys are tolerated (other tools set AGENTIDP_* variables too); unknown keys
// inside a section are typos and are refused.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct Config {
    pub server: ServerConfig,
    pub tls: TlsConfig,
    pub cors: CorsConfig,
    pub database: DatabaseConfig,
    pub redis: RedisConfig,
    pub log: LogConfig,
    pub auth: AuthConfig,
    pub policy: PolicyConfig,
    pub tiers: TiersConfig,
    pub analytics: AnalyticsConfig,
    pub retention: RetentionConfig,
    pub webhooks: WebhooksConfig,
    pub events: EventsConfig,
    pub delegation: crate::delegation::DelegationConfig,
    pub usage: crate::usage::UsageConfig,
    pub city: CityConfig,
    pub trust: crate::trust::TrustConfig,
    pub oidc: crate::auth::oidc::OidcConfig,
}

/// The city: presence in Redis, its live stream, and node staleness.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CityConfig {
    /// An agent's presence lapses (it is `offline`) this long after its last report.
    pub presence_ttl_secs: u64,
    /// A node with no heartbeat for this long is `stale`.
    pub node_stale_secs: u64,
    /// How often lapsed presences and stale nodes are looked for.
    pub sweep_interval_ms: u64,
    /// Changes kept per organization for `Last-Event-ID` resumption.
    pub replay_window: u32,
    /// Presence reports an agent may make per second; more are refused with 429.
    pub presence_reports_per_sec: u32,
    /// `last_seen` reaches Postgres at most this often per agent.
    pub last_seen_every_secs: u64,
    /// A report repeating what this instance wrote for the agent less than this long ago (ms; at
    /// most a quarter of the TTL) is not written again; 0 writes every report.
    pub presence_fold_ms: u64,
    /// Changes a slow viewer may fall behind before it is caught up from the replay window.
    pub viewer_buffer: usize,
}

/// The event outbox's optional feed to NATS.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct EventsConfig {
    pub nats: NatsConfig,
}

/// Publishing every outbox event to NATS JetStream, on `<subject_prefix>.<type>`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct NatsConfig {
    pub enabled: bool,
    #[serde(serialize_with = "redact_url")]
    pub url: String,
    /// The JetStream stream holding the events, created when missing.
    pub stream: String,
    pub subject_prefix: String,
    /// How long the stream keeps an event (when this server creates it).
    pub max_age_days: u32,
    /// Events published per batch (each acknowledged by JetStream before it counts as published).
    pub batch_size: u32,
}

/// Webhook endpoints and the dispatcher that delivers the event outbox to them.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct WebhooksConfig {
    /// Whether this instance runs the dispatcher (every instance may; they share the work).
    pub dispatcher: bool,
    /// Seconds to wait before each retry after a failed attempt; past the last, a dead letter.
    pub retry_schedule_secs: Vec<u64>,
    /// Each wait is moved by up to this share of itself, either way, so retries do not stampede.
    pub retry_jitter: f64,
    /// An endpoint with no success for this long while failing is disabled.
    pub disable_after_hours: u64,
    /// One attempt, connection to last byte read.
    pub timeout_secs: u64,
    /// How long a claimed delivery is held; then another instance may retake it.
    pub lease_secs: u64,
    /// Deliveries claimed at once, and attempts in flight at once, per instance.
    pub batch_size: u32,
    pub concurrency: usize,
    /// How often the outbox is checked when no notification arrives.
    pub poll_interval_ms: u64,
    /// The start of each response body kept with its attempt.
    pub response_body_max_bytes: usize,
    /// After a secret rotation, the old secret keeps signing beside the new one this long.
    pub secret_rotation_overlap_secs: u64,
    /// Allow endpoints on loopback, private, link-local and CGNAT addresses (tests, on-premise
    /// receivers); cloud metadata, multicast and unspecified addresses stay refused even so.
    pub allow_private_networks: bool,
    /// Endpoints per organization.
    pub max_endpoints: u32,
}

/// How long rows that have served their purpose are kept, and how pruning runs.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RetentionConfig {
    /// How often each instance tries to prune (one at a time, by lock); 0 turns pruning off.
    pub interval_secs: u64,
    /// Rows per delete statement.
    pub batch_size: u32,
    pub analytics_days: u32,
    pub decision_log_days: u32,
    /// After a session ended or expired.
    pub session_days: u32,
    /// After a set-password token was used or expired.
    pub password_token_days: u32,
    pub stripe_event_days: u32,
    /// Outbox events, with their webhook deliveries and attempts: how far back a replay reaches.
    pub event_days: u32,
}

/// Plans, their limits, and optional Stripe billing.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TiersConfig {
    /// The plan of an organization that was never given one.
    pub default_plan: String,
    /// How long an organization's limits are trusted from the in-process cache.
    pub cache_secs: u64,
    pub plans: std::collections::BTreeMap<String, crate::tiers::plans::Plan>,
    pub stripe: StripeConfig,
    pub limiter: LimiterConfig,
}

/// How the rate limiter leases from Redis (see [`crate::tiers::limiter`]).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LimiterConfig {
    /// The most units one lease takes (1: every request is decided by Redis).
    pub lease_max: u64,
    /// A lease takes at most what is left divided by this times the instances serving the org.
    pub lease_share: u64,
    /// Unspent leased units are given back after this long.
    pub lease_ttl_ms: u64,
    /// How often expired leases are given back and in-memory counts added to Redis.
    pub settle_ms: u64,
}

impl Default for LimiterConfig {
    fn default() -> Self {
        Self { lease_max: 256, lease_share: 4, lease_ttl_ms: 1000, settle_ms: 250 }
    }
}

/// Stripe Checkout for self-service upgrades; off while `secret_key` is empty.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct StripeConfig {
    pub secret_key: Secret,
    /// The endpoint's signing secret (`whsec_...`) for `Stripe-Signature`.
    pub webhook_secret: Secret,
    pub api_base: String,
    /// Signed events older (or newer) than this are refused.
    pub webhook_tolerance_secs: u64,
    pub success_url: String,
    pub cancel_url: String,
    /// Plan name → Stripe price id.
    pub prices: std::collections::BTreeMap<String, String>,
}

impl StripeConfig {
    pub fn enabled(&self) -> bool {
        !self.secret_key.is_empty()
    }
}

/// The metering layer's per-request records.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AnalyticsConfig {
    /// Whether requests are recorded in `analytics_event`.
    pub record_requests: bool,
    /// Buckets counted in memory at most; records for a new bucket past that are dropped (and counted).
    pub buffer_capacity: usize,
    pub batch_size: usize,
    pub flush_interval_ms: u64,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyConfig {
    /// Decisions the PDP keeps on their exact inputs and policy version (0: no cache).
    pub decision_cache_entries: u64,
    pub permit_sample_rate: f64,
    pub log_batch_size: usize,
    pub log_queue_capacity: usize,
    /// Identical permits within this many seconds are one row of the decision log, with their
    /// count (0: every logged permit is a row).
    pub permit_fold_secs: u64,
    /// Distinct permits held open at most; beyond that a permit is a row of its own until windows end.
    pub permit_fold_keys: usize,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    pub session_ttl_secs: u64,
    pub credential_cache_secs: u64,
    pub negative_cache_secs: u64,
    pub lookups_per_minute_ip: u32,
    pub login_max_failures_account: u32,
    pub login_max_failures_ip: u32,
    /// `POST /auth/set-password` attempts per client IP within the login window before back-off.
    pub set_password_max_attempts_ip: u32,
    pub login_window_secs: u64,
    pub login_backoff_base_secs: u64,
    pub login_backoff_max_secs: u64,
    pub password_token_ttl_secs: u64,
    pub access_token_ttl_secs: u64,
    pub audience: String,
    pub allowed_resources: Vec<String>,
    pub signing_algorithm: String,
    pub key_encryption_key: Secret,
    pub key_rotation_days: u64,
    pub key_publish_ahead_secs: u64,
    pub client_secret_rotation_overlap_secs: u64,
}

impl Config {
    /// A rotation that publishes the next key `auth.key_publish_ahead_secs` before it signs.
    pub fn scheduled_rotation(&self) -> crate::auth::keys::Rotation {
        crate::auth::keys::Rotation::Scheduled {
            ahead: time::Duration::seconds(self.auth.key_publish_ahead_secs as i64),
        }
    }

    /// The audience our tokens carry by default and that this server accepts.
    pub fn audience(&self) -> String {
        if self.auth.audience.is_empty() { self.server.public_url.clone() } else { self.auth.audience.clone() }
    }

    /// The key-encryption key: configured, or the public development one.
    pub fn kek(&self) -> [u8; 32] {
        if self.auth.key_encryption_key.is_empty() {
            crate::auth::keys::DEV_KEK
        } else {
            crate::auth::keys::parse_kek(self.auth.key_encryption_key.expose()).unwrap_or(crate::auth::keys::DEV_KEK)
        }
    }

    pub fn algorithm(&self) -> crate::auth::keys::Algorithm {
        crate::auth::keys::Algorithm::parse(&self.auth.signing_algorithm).unwrap_or(crate::auth::keys::Algorithm::ES256)
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    pub environment: Environment,
    pub bind: SocketAddr,
    /// The externally visible base URL; issuer and redirects are derived from it.
    pub public_url: String,
    pub request_timeout_secs: u64,
    pub body_limit_bytes: usize,
    pub shutdown_grace_secs: u64,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    pub cert_path: String,
    pub key_path: String,
    pub enforce: bool,
    pub trusted_proxies: Vec<IpNet>,
    pub hsts_max_age_secs: u64,
}

impl TlsConfig {
    /// Whether this process terminates TLS itself.
    pub fn enabled(&self) -> bool {
        !self.cert_path.is_empty()
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CorsConfig {
    pub allowed_origins: Vec<String>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DatabaseConfig {
    #[serde(serialize_with = "redact_url")]
    pub url: String,
    pub max_connections: u32,
    pub acquire_timeout_ms: u64,
    pub connect_retry_secs: u64,
    pub migrate_on_start: bool,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RedisConfig {
    #[serde(serialize_with = "redact_url")]
    pub url: String,
    pub key_prefix: String,
    pub pool_size: usize,
    pub timeout_ms: u64,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    pub format: LogFormat,
    pub level: String,
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Environment {
    Development,
    Production,
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Pretty,
    Json,
}

/// A secret value from configuration: it deserializes normally but never prints.
#[derive(Clone, Default, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.0.is_empty() { "\"\"" } else { "\"[redacted]\"" })
    }
}

impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(if self.0.is_empty() { "" } else { "[redacted]" })
    }
}

/// Prints a connection URL with its password hidden.
fn redact_url<S: Serializer>(url: &str, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&redacted_url(url))
}

/// [`redact_url`] for other modules' sections.
pub(crate) fn redact_url_str<S: Serializer>(url: &str, s: S) -> Result<S::Ok, S::Error> {
    redact_url(url, s)
}

/// `scheme://user:secret@host/db` becomes `scheme://user:[redacted]@host/db`.
pub fn redacted_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let Some((userinfo, host)) = rest.rsplit_once('@') else {
        return url.to_owned();
    };
    match userinfo.split_once(':') {
        Some((user, _)) => format!("{scheme}://{user}:[redacted]@{host}"),
        None => url.to_owned(),
    }
}

/// Why the configuration could not be used; rendered as a single line.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("configuration: {0}")]
    Parse(String),
    #[error("configuration: key `{key}`: {problem}")]
    Invalid { key: &'static str, problem: String },
}

impl Config {
    /// Loads defaults, the optional file and the environment, then validates.
    pub fn load(file: Option<&PathBuf>) -> Result<Self, ConfigError> {
        let mut figment = Figment::from(Toml::string(DEFAULTS));
        if let Some(path) = file {
            if !path.is_file() {
                return Err(ConfigError::Parse(format!("file {} does not exist or is not a file", path.display())));
            }
            figment = figment.merge(Toml::file(path));
        }
        // AGENTIDP_CONFIG names the file, it is not a key.
        figment = figment.merge(Env::prefixed("AGENTIDP_").split("__").ignore(&["config"]));
        Self::from_figment(figment)
    }

    /// Extracts and validates from an assembled figment (tests build their own).
    pub fn from_figment(figment: Figment) -> Result<Self, ConfigError> {
        let config: Config = figment.extract().map_err(|e| ConfigError::Parse(one_line(&e)))?;
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if let Some((key, problem)) = self.usage.problem() {
            return Err(ConfigError::Invalid { key, problem });
        }
        let r = &self.retention;
        if r.batch_size == 0 || r.batch_size > 100_000 {
            return Err(invalid("retention.batch_size", "must be between 1 and 100000"));
        }
        if [r.analytics_days, r.decision_log_days, r.session_days, r.password_token_days, r.event_days].contains(&0) {
            return Err(invalid("retention.analytics_days", "retention periods must be at least 1 day"));
        }
        if r.stripe_event_days < 30 {
            return Err(invalid("retention.stripe_event_days", "must be at least 30 (Stripe retries for days)"));
        }
        fn invalid(key: &'static str, problem: impl Into<String>) -> ConfigError {
            ConfigError::Invalid { key, problem: problem.into() }
        }
        let s = &self.server;
        if !(s.public_url.starts_with("http://") || s.public_url.starts_with("https://")) {
            return Err(invalid("server.public_url", "must start with http:// or https://"));
        }
        if s.public_url.ends_with('/') {
            return Err(invalid("server.public_url", "must not end with a slash"));
        }
        if s.request_timeout_secs == 0 || s.request_timeout_secs > 3600 {
            return Err(invalid("server.request_timeout_secs", "must be between 1 and 3600"));
        }
        if s.body_limit_bytes < 1024 || s.body_limit_bytes > 64 * 1024 * 1024 {
            return Err(invalid("server.body_limit_bytes", "must be between 1024 and 67108864"));
        }
        if s.shutdown_grace_secs > 600 {
            return Err(invalid("server.shutdown_grace_secs", "must be at most 600"));
        }
        let t = &self.tls;
        if t.cert_path.is_empty() != t.key_path.is_empty() {
            return Err(invalid("tls.cert_path", "tls.cert_path and tls.key_path must be set together"));
        }
        for (key, path) in [("tls.cert_path", &t.cert_path), ("tls.key_path", &t.key_path)] {
            if !path.is_empty() && !std::path::Path::new(path).is_file() {
                return Err(invalid(key, format!("file {path} does not exist")));
            }
        }
        for origin in &self.cors.allowed_origins {
            if origin != "*" && http::HeaderValue::from_str(origin).is_err() {
                return Err(invalid("cors.allowed_origins", format!("{origin:?} is not a valid origin")));
            }
        }
        let d = &self.database;
        if !(d.url.starts_with("postgres://") || d.url.starts_with("postgresql://")) {
            return Err(invalid("database.url", "must be a postgres:// URL"));
        }
        if d.max_connections == 0 {
            return Err(invalid("database.max_connections", "must be at least 1"));
        }
        if d.acquire_timeout_ms == 0 {
            return Err(invalid("database.acquire_timeout_ms", "must be at least 1"));
        }
        let r = &self.redis;
        if !(r.url.starts_with("redis://") || r.url.starts_with("rediss://")) {
            return Err(invalid("redis.url", "must be a redis:// or rediss:// URL"));
        }
        if r.pool_size == 0 {
            return Err(invalid("redis.pool_size", "must be at least 1"));
        }
        if r.timeout_ms == 0 {
            return Err(invalid("redis.timeout_ms", "must be at least 1"));
        }
        let a = &self.auth;
        if a.session_ttl_secs < 60 {
            return Err(invalid("auth.session_ttl_secs", "must be at least 60"));
        }
        if a.credential_cache_secs > 300 {
            return Err(invalid("auth.credential_cache_secs", "must be at most 300 (revocation waits on it)"));
        }
        if a.negative_cache_secs > 300 {
            return Err(invalid("auth.negative_cache_secs", "must be at most 300 (a new credential waits on it)"));
        }
        if a.lookups_per_minute_ip == 0 {
            return Err(invalid("auth.lookups_per_minute_ip", "must be at least 1"));
        }
        if a.key_publish_ahead_secs < 300 {
            return Err(invalid(
                "auth.key_publish_ahead_secs",
                "must be at least 300, the JWKS max-age, so that relying parties see a key before it signs",
            ));
        }
        if a.login_max_failures_account == 0 || a.login_max_failures_ip == 0 || a.set_password_max_attempts_ip == 0 {
            return Err(invalid("auth.login_max_failures_account", "limits must be at least 1"));
        }
        if a.login_window_secs == 0 || a.login_backoff_base_secs == 0 {
            return Err(invalid("auth.login_window_secs", "window and back-off base must be at least 1"));
        }
        if a.login_backoff_max_secs < a.login_backoff_base_secs {
            return Err(invalid("auth.login_backoff_max_secs", "must be at least auth.login_backoff_base_secs"));
        }
        if !(60..=86400).contains(&a.access_token_ttl_secs) {
            return Err(invalid("auth.access_token_ttl_secs", "must be between 60 and 86400"));
        }
        if crate::auth::keys::Algorithm::parse(&a.signing_algorithm).is_none() {
            return Err(invalid("auth.signing_algorithm", "must be ES256, RS256 or EdDSA"));
        }
        if a.key_encryption_key.is_empty() {
            if self.server.environment == Environment::Production {
                return Err(invalid("auth.key_encryption_key", "is required when server.environment is production"));
            }
        } else if let Err(problem) = crate::auth::keys::parse_kek(a.key_encryption_key.expose()) {
            return Err(invalid("auth.key_encryption_key", problem));
        }
        for r in &a.allowed_resources {
            if !(r.starts_with("https://") || r.starts_with("http://")) {
                return Err(invalid("auth.allowed_resources", format!("{r:?} is not an absolute http(s) URI")));
            }
        }
        let p = &self.policy;
        if !(0.0..=1.0).contains(&p.permit_sample_rate) {
            return Err(invalid("policy.permit_sample_rate", "must be between 0.0 and 1.0"));
        }
        if p.log_batch_size == 0 || p.log_queue_capacity < p.log_batch_size {
            return Err(invalid(
                "policy.log_queue_capacity",
                "must be at least policy.log_batch_size, which must be at least 1",
            ));
        }
        if p.permit_fold_secs > 3600 || p.permit_fold_keys == 0 {
            return Err(invalid("policy.permit_fold_secs", "permit_fold_secs: 0..3600; permit_fold_keys: at least 1"));
        }
        let c = &self.city;
        if !(1..=86_400).contains(&c.presence_ttl_secs) || !(1..=86_400).contains(&c.node_stale_secs) {
            return Err(invalid("city.presence_ttl_secs", "presence_ttl_secs and node_stale_secs: 1..86400"));
        }
        if !(10..=60_000).contains(&c.sweep_interval_ms) {
            return Err(invalid("city.sweep_interval_ms", "must be between 10 and 60000"));
        }
        if !(10..=1_000_000).contains(&c.replay_window) || !(1..=1_000_000).contains(&c.viewer_buffer) {
            return Err(invalid("city.replay_window", "replay_window 10..1000000, viewer_buffer 1..1000000"));
        }
        if c.presence_reports_per_sec == 0 {
            return Err(invalid("city.presence_reports_per_sec", "must be at least 1"));
        }
        if c.presence_fold_ms > 60_000 {
            return Err(invalid("city.presence_fold_ms", "must be between 0 and 60000"));
        }
        self.validate_tiers()?;
        self.delegation.validate().map_err(|(key, problem)| ConfigError::Invalid { key, problem })?;
        self.trust.validate().map_err(|(key, problem)| ConfigError::Invalid { key, problem })?;
        let n = &self.events.nats;
        if !(n.url.starts_with("nats://") || n.url.starts_with("tls://")) {
            return Err(invalid("events.nats.url", "must be a nats:// or tls:// URL"));
        }
        let token = |t: &str| !t.is_empty() && t.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
        if !token(&n.stream) {
            return Err(invalid("events.nats.stream", "letters, digits, - and _ only"));
        }
        if !n.subject_prefix.split('.').all(token) {
            return Err(invalid("events.nats.subject_prefix", "dot-separated tokens of letters, digits, - and _"));
        }
        if n.max_age_days == 0 || !(1..=10_000).contains(&n.batch_size) {
            return Err(invalid("events.nats.batch_size", "max_age_days at least 1, batch_size 1..10000"));
        }
        let w = &self.webhooks;
        if w.retry_schedule_secs.len() > 50 || w.retry_schedule_secs.iter().any(|s| *s > 7 * 86400) {
            return Err(invalid("webhooks.retry_schedule_secs", "at most 50 waits of at most 7 days each"));
        }
        if !(0.0..=0.5).contains(&w.retry_jitter) {
            return Err(invalid("webhooks.retry_jitter", "must be between 0.0 and 0.5"));
        }
        if w.disable_after_hours == 0 {
            return Err(invalid("webhooks.disable_after_hours", "must be at least 1"));
        }
        if !(1..=300).contains(&w.timeout_secs) {
            return Err(invalid("webhooks.timeout_secs", "must be between 1 and 300"));
        }
        if w.lease_secs <= w.timeout_secs {
            return Err(invalid("webhooks.lease_secs", "must be longer than webhooks.timeout_secs"));
        }
        if !(1..=10_000).contains(&w.batch_size) || !(1..=1024).contains(&w.concurrency) {
            return Err(invalid("webhooks.batch_size", "batch_size 1..10000 and concurrency 1..1024"));
        }
        if !(10..=60_000).contains(&w.poll_interval_ms) {
            return Err(invalid("webhooks.poll_interval_ms", "must be between 10 and 60000"));
        }
        if !(256..=1_048_576).contains(&w.response_body_max_bytes) {
            return Err(invalid("webhooks.response_body_max_bytes", "must be between 256 and 1048576"));
        }
        if w.secret_rotation_overlap_secs > 30 * 86400 {
            return Err(invalid("webhooks.secret_rotation_overlap_secs", "must be at most 30 days"));
        }
        if !(1..=1000).contains(&w.max_endpoints) {
            return Err(invalid("webhooks.max_endpoints", "must be between 1 and 1000"));
        }
        let an = &self.analytics;
        if an.batch_size == 0 || an.buffer_capacity < an.batch_size {
            return Err(invalid(
                "analytics.buffer_capacity",
                "must be at least analytics.batch_size, which must be at least 1",
            ));
        }
        if !(10..=60_000).contains(&an.flush_interval_ms) {
            return Err(invalid("analytics.flush_interval_ms", "must be between 10 and 60000"));
        }
        if tracing_subscriber::EnvFilter::try_new(&self.log.level).is_err() {
            return Err(invalid("log.level", "is not a valid filter such as \"info\" or \"info,sqlx=warn\""));
        }
        Ok(())
    }

    fn validate_tiers(&self) -> Result<(), ConfigError> {
        fn invalid(key: &'static str, problem: impl Into<String>) -> ConfigError {
            ConfigError::Invalid { key, problem: problem.into() }
        }
        let t = &self.tiers;
        for (name, plan) in &t.plans {
            if !crate::tiers::plans::valid_plan_name(name) {
                return Err(invalid(
                    "tiers.plans",
                    format!("{name:?}: plan names are lowercase letters, digits, - and _"),
                ));
            }
            if let Some(problem) = crate::tiers::plans::rate_problem(&plan.rate_limit) {
                return Err(invalid("tiers.plans", format!("{name}: {problem}")));
            }
        }
        if !t.plans.contains_key(&t.default_plan) {
            return Err(invalid("tiers.default_plan", format!("{:?} is not one of tiers.plans", t.default_plan)));
        }
        if t.cache_secs > 300 {
            return Err(invalid("tiers.cache_secs", "must be at most 300"));
        }
        let l = &t.limiter;
        if !(1..=100_000).contains(&l.lease_max) {
            return Err(invalid("tiers.limiter.lease_max", "must be between 1 and 100000"));
        }
        if !(1..=1000).contains(&l.lease_share) {
            return Err(invalid("tiers.limiter.lease_share", "must be between 1 and 1000"));
        }
        if !(10..=60_000).contains(&l.lease_ttl_ms) {
            return Err(invalid("tiers.limiter.lease_ttl_ms", "must be between 10 and 60000"));
        }
        if !(10..=60_000).contains(&l.settle_ms) {
            return Err(invalid("tiers.limiter.settle_ms", "must be between 10 and 60000"));
        }
        let s = &t.stripe;
        if !(s.api_base.starts_with("https://") || s.api_base.starts_with("http://")) || s.api_base.ends_with('/') {
            return Err(invalid("tiers.stripe.api_base", "must be an http(s) URL without a trailing slash"));
        }
        if !(1..=3600).contains(&s.webhook_tolerance_secs) {
            return Err(invalid("tiers.stripe.webhook_tolerance_secs", "must be between 1 and 3600"));
        }
        for (plan, price) in &s.prices {
            if !t.plans.contains_key(plan) {
                return Err(invalid("tiers.stripe.prices", format!("{plan:?} is not one of tiers.plans")));
            }
            if price.is_empty() {
                return Err(invalid("tiers.stripe.prices", format!("{plan}: the price id is empty")));
            }
        }
        if s.enabled() {
            if s.webhook_secret.is_empty() {
                return Err(invalid("tiers.stripe.webhook_secret", "is required with tiers.stripe.secret_key"));
            }
            for (key, url) in [("tiers.stripe.success_url", &s.success_url), ("tiers.stripe.cancel_url", &s.cancel_url)]
            {
                if !(url.starts_with("https://") || url.starts_with("http://")) {
                    return Err(invalid(key, "must be an http(s) URL when Stripe is configured"));
                }
            }
        }
        Ok(())
    }

    /// The configuration as TOML, every secret redacted.
    pub fn redacted_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_else(|e| format!("# could not render: {e}\n"))
    }
}

/// Figment errors can span lines; the operator gets one.
fn one_line(e: &figment::Error) -> String {
    e.clone()
        .into_iter()
        .map(|e| {
            let key = e.path.join(".").to_lowercase();
            let source = e.metadata.as_ref().map(|m| format!(" (from {})", m.name)).unwrap_or_default();
            let text =
                if key.is_empty() { format!("{}{source}", e.kind) } else { format!("key `{key}`: {}{source}", e.kind) };
            text.replace('\n', " ")
        })
        .collect::<Vec<_>>()
        .join("; ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use figment::providers::Serialized;

    fn with(key: &str, value: impl Serialize) -> Result<Config, ConfigError> {
        Config::from_figment(Figment::from(Toml::string(DEFAULTS)).merge(Serialized::default(key, value)))
    }

    #[test]
    fn defaults_are_valid() {
        let c = with("log.format", "json").unwrap();
        assert_eq!(c.log.format, LogFormat::Json);
        assert_eq!(c.server.environment, Environment::Development);
    }

    #[test]
    fn a_wrong_type_names_the_key() {
        let err = with("server.request_timeout_secs", "soon").unwrap_err().to_string();
        assert!(err.contains("request_timeout_secs"), "{err}");
        assert!(!err.contains('\n'));
    }

    #[test]
    fn a_bad_value_names_the_key() {
        let err = with("redis.url", "http://x").unwrap_err().to_string();
        assert_eq!(err, "configuration: key `redis.url`: must be a redis:// or rediss:// URL");
    }

    #[test]
    fn passwords_never_print() {
        let mut c = with("log.format", "pretty").unwrap();
        c.database.url = "postgres://app:hunter2@db:5432/x".into();
        let out = c.redacted_toml();
        assert!(!out.contains("hunter2"));
        assert!(out.contains("postgres://app:[redacted]@db:5432/x"));
        assert_eq!(format!("{:?}", Secret::new("s3cret")), "\"[redacted]\"");
    }
}

#[cfg(test)]
mod production_tests {
    use super::*;
    use figment::providers::Serialized;

    #[test]
    fn production_requires_a_kek_and_hides_it() {
        let base = Figment::from(Toml::string(DEFAULTS)).merge(Serialized::default("server.environment", "production"));
        let err = Config::from_figment(base.clone()).unwrap_err().to_string();
        assert!(err.contains("auth.key_encryption_key"), "{err}");
        let kek = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
        let c = Config::from_figment(base.merge(Serialized::default("auth.key_encryption_key", kek))).unwrap();
        assert!(!c.redacted_toml().contains(kek));
        assert_eq!(c.kek()[31], 31);
    }
}
