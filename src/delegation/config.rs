//! The `[delegation]` configuration section.

use serde::{Deserialize, Serialize};

/// Bounds on what a delegation may ask for, ceremonies, and the sweeper.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DelegationConfig {
    pub default_ttl_minutes: u32,
    pub max_ttl_minutes: u32,
    pub default_max_commands: u32,
    pub max_commands: u32,
    /// How many times a delegation may be delegated further (0: no chains).
    pub max_delegation_depth: u32,
    pub default_capability_ceiling: String,
    pub default_ceremony_required_for: Vec<String>,
    pub max_list_items: usize,
    pub approval_request_secs: u64,
    pub approval_valid_secs: u64,
    pub sweep_interval_secs: u64,
    pub ceilings: Ceilings,
}

/// The scope patterns each capability ceiling lets through.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Ceilings {
    #[serde(rename = "CAP_READ")]
    pub read: Vec<String>,
    #[serde(rename = "CAP_MUTATE")]
    pub mutate: Vec<String>,
    #[serde(rename = "CAP_ADMIN")]
    pub admin: Vec<String>,
}

impl DelegationConfig {
    /// Checked at boot: `(key, problem)` for the first bad value.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        if self.default_ttl_minutes == 0 || self.default_ttl_minutes > self.max_ttl_minutes {
            return Err(("delegation.default_ttl_minutes", "must be between 1 and delegation.max_ttl_minutes".into()));
        }
        if self.max_ttl_minutes > 525_600 {
            return Err(("delegation.max_ttl_minutes", "must be at most 525600 (a year)".into()));
        }
        if self.default_max_commands == 0 || self.default_max_commands > self.max_commands {
            return Err(("delegation.default_max_commands", "must be between 1 and delegation.max_commands".into()));
        }
        if self.max_commands > i32::MAX as u32 {
            return Err(("delegation.max_commands", format!("must be at most {}", i32::MAX)));
        }
        if self.max_delegation_depth > 16 {
            return Err(("delegation.max_delegation_depth", "must be at most 16".into()));
        }
        if super::ceiling::Level::parse(&self.default_capability_ceiling).is_none() {
            return Err(("delegation.default_capability_ceiling", "must be CAP_READ, CAP_MUTATE or CAP_ADMIN".into()));
        }
        if !(1..=10_000).contains(&self.max_list_items) {
            return Err(("delegation.max_list_items", "must be between 1 and 10000".into()));
        }
        if self.default_ceremony_required_for.len() > self.max_list_items {
            return Err((
                "delegation.default_ceremony_required_for",
                "has more items than delegation.max_list_items".into(),
            ));
        }
        if self.approval_request_secs == 0 || self.approval_valid_secs == 0 {
            return Err(("delegation.approval_valid_secs", "approval times must be at least 1 second".into()));
        }
        if self.sweep_interval_secs == 0 || self.sweep_interval_secs > 3600 {
            return Err(("delegation.sweep_interval_secs", "must be between 1 and 3600".into()));
        }
        Ok(())
    }
}
