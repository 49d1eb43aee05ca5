//! The delegation API's request and response bodies, with the original broker's field names.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use time::OffsetDateTime;
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

/// What a delegation may do. Every field is optional; defaults come from configuration.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ScopeRequest {
    /// `CAP_READ`, `CAP_MUTATE` (default) or `CAP_ADMIN`: never above the delegator's own.
    pub capability_ceiling: Option<String>,
    /// The scopes of its tokens: within the delegator's, the agent's `allowed_scopes` and the
    /// ceiling. Default: the agent's allowed scopes that the delegator has, under the ceiling.
    pub scopes: Option<Vec<String>>,
    /// Commands that need the delegator's approval, once each (default: delete, destroy, drop).
    pub ceremony_required_for: Option<Vec<String>>,
    /// Commands always denied.
    pub prohibited_commands: Option<Vec<String>>,
    /// Default 60, at most `delegation.max_ttl_minutes`.
    pub max_ttl_minutes: Option<i64>,
    /// Default 500, at most `delegation.max_commands`.
    pub max_commands: Option<i64>,
    /// A spend budget in the usage module's currency micro-units.
    pub max_cost: Option<i64>,
    /// A spend budget in LLM tokens.
    pub max_tokens: Option<i64>,
}

/// `POST /api/v1/delegations`: to an existing agent (`agent_id`), or to a new ephemeral agent
/// made from `agent_type` (and `agent_model`) and deleted when the delegation ends.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateDelegation {
    pub agent_id: Option<Uuid>,
    /// E.g. `claude-code`; names the ephemeral agent.
    pub agent_type: Option<String>,
    pub agent_model: Option<String>,
    #[serde(default)]
    pub scope: Option<ScopeRequest>,
    /// Why (free text, in the audit log).
    pub purpose: Option<String>,
}

/// The agent acting under a delegation.
#[derive(Debug, Serialize, ToSchema)]
pub struct AgentPrincipal {
    pub agent_id: Uuid,
    /// `did:web:<host>:agents:<agent_id>`.
    pub did: String,
    /// The client id of the agent's credential (an ephemeral agent's; null for an existing agent).
    pub client_id: Option<String>,
    /// An ephemeral agent's client secret, shown once; null for an existing agent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_secret: Option<String>,
    pub display_name: String,
}

/// A new delegation.
#[derive(Debug, Serialize, ToSchema)]
pub struct CreatedDelegation {
    pub delegation_id: Uuid,
    /// `active`.
    pub status: String,
    pub agent_principal: AgentPrincipal,
    /// A delegated access token (RFC 8693 `act`, `delegation_id`), for the agent; shown once.
    pub agent_token: String,
    pub scopes: Vec<String>,
    #[serde(with = "time::serde::rfc3339")]
    pub expires_at: OffsetDateTime,
    pub max_commands: i64,
    pub parent_id: Option<Uuid>,
    pub chronicle_cid: String,
}

/// A delegation as read back.
#[derive(Debug, Serialize, ToSchema)]
pub struct DelegationInfo {
    pub delegation_id: Uuid,
    /// `active`, `expired` or `revoked`.
    pub status: String,
    pub agent_id: Uuid,
    pub agent_did: String,
    pub agent_type: Option<String>,
    pub agent_model: Option<String>,
    pub ephemeral: bool,
    /// `user:<uuid>` or `agent:<uuid>`.
    pub delegator_id: String,
    pub parent_id: Option<Uuid>,
    /// Actor ids from the human at the root to this delegation's agent.
    pub chain: Vec<String>,
    pub purpose: String,
    pub scopes: Vec<String>,
    pub capability_ceiling: String,
    pub ceremony_required_for: Vec<String>,
    pub prohibited_commands: Vec<String>,
    pub max_commands: i64,
    pub commands_executed: i64,
    /// What is left: the budget less what was executed and what children hold.
    pub commands_remaining: i64,
    pub reserved_commands: i64,
    pub max_cost: Option<i64>,
    pub cost_spent: i64,
    pub max_tokens: Option<i64>,
    pub tokens_spent: i64,
    pub ttl_remaining_seconds: i64,
    /// Why it ended: `manual_revocation` (or the reason given), `ttl`, `command_limit`,
    /// `spend_limit`, `parent_revoked`, `parent_expired`, `credential_ended`, `member_removed`,
    /// `agent_suspended`, `agent_deleted`.
    pub ended_reason: Option<String>,
    #[serde(with = "time::serde::rfc3339::option")]
    pub ended_at: Option<OffsetDateTime>,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub expires_at: OffsetDateTime,
    pub chronicle_cid: String,
}

/// Filters of the listing.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ListQuery {
    /// `active`, `expired` or `revoked`.
    pub status: Option<String>,
    pub agent_id: Option<Uuid>,
    /// `user:<uuid>` or `agent:<uuid>`.
    pub delegator_id: Option<String>,
    /// The `next_cursor` of the previous page.
    pub after: Option<Uuid>,
    /// 1 to 200, default 50.
    pub limit: Option<i64>,
}

/// A page of delegations, and how many of the organization's are active.
#[derive(Debug, Serialize, ToSchema)]
pub struct DelegationPage {
    pub items: Vec<DelegationInfo>,
    pub next_cursor: Option<Uuid>,
    pub total_active: i64,
}

/// `POST .../revoke`.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RevokeRequest {
    /// Default `manual_revocation`.
    pub reason: Option<String>,
}

/// The answer to a revocation.
#[derive(Debug, Serialize, ToSchema)]
pub struct Revoked {
    pub delegation_id: Uuid,
    pub status: String,
    pub reason: String,
    /// Every delegation that ended with it (itself and its descendants).
    pub ended: Vec<Uuid>,
    pub chronicle_cid: Option<String>,
}

/// `POST .../commands`: a command the agent is about to run.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CommandRequest {
    pub command: String,
    /// Its arguments (an approval is for the command with these arguments).
    pub args: Option<Value>,
}

/// The decision on a command.
#[derive(Debug, Serialize, ToSchema)]
pub struct CommandDecision {
    /// `permit`, `deny` or `ceremony_required`.
    pub decision: &'static str,
    pub reason: String,
    pub commands_remaining: i64,
    /// With `ceremony_required`: the approval request the delegator decides.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub approval_id: Option<Uuid>,
}

/// An approval request of a ceremony.
#[derive(Debug, Serialize, ToSchema)]
pub struct Approval {
    pub approval_id: Uuid,
    pub delegation_id: Uuid,
    pub command: String,
    pub args: Option<Value>,
    /// `pending`, `approved`, `denied`, `used` or `expired`.
    pub status: String,
    pub decided_by: Option<String>,
    #[serde(with = "time::serde::rfc3339::option")]
    pub decided_at: Option<OffsetDateTime>,
    /// Pending: the delegator decides before; approved: usable once before.
    #[serde(with = "time::serde::rfc3339")]
    pub expires_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
}
