//! The `[usage]` section of the configuration: ingest limits, prices, budgets' caches, the NATS
//! ingest and retention.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Usage metering.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct UsageConfig {
    /// Events per `POST /api/v1/usage/events`.
    pub http_batch_max: usize,
    /// The largest one event (a NATS message, or one element of an HTTP batch) may be.
    pub max_event_bytes: usize,
    /// Events whose timestamp is further in the past, or the future, than this are rejected.
    pub max_past_secs: u64,
    pub max_future_secs: u64,
    /// Raw events are kept this many whole months besides the current one (their partitions are
    /// dropped); rollups stay.
    pub retention_months: u32,
    /// How much of a rejected NATS message is kept in `usage_rejected`.
    pub rejected_payload_bytes: usize,
    /// How long an organization's or agent's monthly spend is trusted from memory by the
    /// entitlement check and the decision point; this instance's own ingest refreshes it at once.
    pub spend_cache_ms: u64,
    /// How long an organization's budgets and prices are trusted from memory (changes made on
    /// this instance apply at once, and are announced to the others).
    pub settings_cache_secs: u64,
    /// How often the analytics rollup rebuilds its recent hours; 0 turns it off.
    pub analytics_rollup_secs: u64,
    /// Price per million tokens per model, in integer micro-units of a currency.
    pub prices: BTreeMap<String, Price>,
    pub nats: UsageNatsConfig,
}

/// A model's price per million tokens, in micro-units (1 USD = 1,000,000).
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Price {
    pub prompt: i64,
    pub completion: i64,
}

/// The JetStream ingest of `usage.llm`, `usage.tool`, `usage.agent` and `messaging.message.created`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct UsageNatsConfig {
    pub enabled: bool,
    #[serde(serialize_with = "crate::config::redact_url_str")]
    pub url: String,
    /// Put before each subject with a dot (`<prefix>.usage.llm`); empty: the subjects as they are.
    pub subject_prefix: String,
    /// The stream over the four subjects and the durable pull consumer on it, created when missing.
    pub stream: String,
    pub consumer: String,
    /// How long the stream keeps a message (when this server creates it).
    pub max_age_days: u32,
    /// Messages fetched, written in one transaction and acknowledged together.
    pub batch_size: usize,
    /// How long one fetch waits for a batch to fill.
    pub fetch_wait_ms: u64,
    /// A message not acknowledged within this long is delivered again.
    pub ack_wait_secs: u64,
}

impl UsageConfig {
    /// The first problem with these values, as (key, problem).
    pub fn problem(&self) -> Option<(&'static str, String)> {
        if self.http_batch_max == 0 || self.http_batch_max > 100_000 {
            return Some(("usage.http_batch_max", "must be between 1 and 100000".into()));
        }
        if self.max_event_bytes < 256 {
            return Some(("usage.max_event_bytes", "must be at least 256".into()));
        }
        if self.nats.batch_size == 0 || self.nats.batch_size > 100_000 {
            return Some(("usage.nats.batch_size", "must be between 1 and 100000".into()));
        }
        if self.nats.stream.is_empty() || self.nats.consumer.is_empty() {
            return Some(("usage.nats.stream", "the stream and consumer names must not be empty".into()));
        }
        for (model, p) in &self.prices {
            if p.prompt < 0 || p.completion < 0 {
                return Some(("usage.prices", format!("the price of {model} must not be negative")));
            }
        }
        None
    }
}
