//! Trust beyond our own tokens: what others can check about us and our agents without an account.
//!
//! - [`did`]: `did:web` documents for the issuer (its verification methods are the JWKS keys) and
//!   for each agent (its registered public keys and service endpoints), and the agents' keys.
//! - [`cards`]: A2A agent cards, signed as a detached JWS over their RFC 8785 canonical JSON, and
//!   the organization's export in the A2A and OASF shapes.
//! - [`compliance`]: the controls we implement (public) and each organization's report, computed
//!   from its data and cached in Redis for five minutes against its audit chain's head.
//! - [`marketplace`]: agents an organization lists publicly; unlisting removes them at once.
//! - [`scaffold`]: ready-to-run snippets that fetch an agent's token and call the API.
//! - [`federation`]: external issuers and trust policies; their tokens exchanged for our agents'.

pub mod cards;
pub mod compliance;
pub mod did;
pub mod federation;
pub mod marketplace;
pub mod scaffold;

use serde::{Deserialize, Serialize};
use utoipa_axum::{router::OpenApiRouter, routes};

use crate::{auth::credentials::LookupLimit, http::ApiError, state::AppState};

/// The `[trust]` configuration section.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TrustConfig {
    /// Reads of the public documents (marketplace, did:web, agent cards) per client IP per minute.
    pub public_reads_per_minute: u32,
    /// How long a compliance report is served from the cache when nothing audited changed.
    pub compliance_cache_secs: u64,
    /// An agent credential or API key older than this (not rotated) fails its control.
    pub credential_max_age_days: u32,
    /// The signing key in use older than this fails the key-rotation control.
    pub signing_key_max_age_days: u32,
    /// An active delegation given a longer lifetime than this fails its control.
    pub delegation_max_ttl_hours: u32,
    /// At most this many owners and admins together before the least-privilege control fails.
    pub max_privileged_members: u32,
    /// At most this many public keys per agent.
    pub max_keys_per_agent: u32,
    /// Partners' issuers, key sets and discovery documents must be https.
    pub federation_https_only: bool,
    /// Let partners' keys be fetched from private and loopback addresses (tests, closed networks).
    pub federation_allow_private_networks: bool,
}

impl TrustConfig {
    /// Checked at boot: `(key, problem)` for the first bad value.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        if self.public_reads_per_minute == 0 {
            return Err(("trust.public_reads_per_minute", "must be at least 1".into()));
        }
        if self.compliance_cache_secs > 3600 {
            return Err(("trust.compliance_cache_secs", "must be at most 3600".into()));
        }
        if self.credential_max_age_days == 0 || self.signing_key_max_age_days == 0 {
            return Err(("trust.credential_max_age_days", "age limits must be at least one day".into()));
        }
        if self.max_keys_per_agent == 0 || self.max_keys_per_agent > 100 {
            return Err(("trust.max_keys_per_agent", "must be between 1 and 100".into()));
        }
        Ok(())
    }
}

/// This instance's trust state: the per-IP budget for the public documents.
pub struct Trust {
    pub public_reads: LookupLimit,
    /// Federation partners' key sets.
    pub keys: federation::KeyCache,
}

impl Trust {
    pub fn new(cfg: &TrustConfig) -> anyhow::Result<Self> {
        Ok(Self { public_reads: LookupLimit::new(cfg.public_reads_per_minute), keys: federation::KeyCache::new(cfg)? })
    }
}

/// Charges one public read to the caller's IP: 429 when its minute's budget is spent.
fn charge_public_read(state: &AppState) -> Result<(), ApiError> {
    state.trust().public_reads.charge().map_err(|_| ApiError::TooManyRequests {
        code: "public_reads_throttled",
        detail: "Too many reads of public documents from this address; wait a minute.".into(),
        retry_after: 60,
    })
}

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(did::issuer_did_document))
        .routes(routes!(did::agent_did_document))
        .routes(routes!(did::list_agent_keys, did::add_agent_key))
        .routes(routes!(did::delete_agent_key))
        .routes(routes!(cards::public_agent_card))
        .routes(routes!(cards::agent_card))
        .routes(routes!(cards::export_agent_cards))
        .routes(routes!(compliance::compliance_controls))
        .routes(routes!(compliance::compliance_report))
        .routes(routes!(marketplace::search_marketplace))
        .routes(routes!(marketplace::get_listing))
        .routes(routes!(marketplace::list_in_marketplace, marketplace::unlist_from_marketplace))
        .routes(routes!(scaffold::get_scaffold))
        .routes(routes!(federation::list_partners, federation::create_partner))
        .routes(routes!(federation::get_partner, federation::delete_partner))
        .routes(routes!(federation::list_policies, federation::create_policy))
        .routes(routes!(federation::delete_policy))
        .routes(routes!(federation::list_templates))
}
