//! The catalog of event types: what each means, and a JSON schema of its `data`.

use serde_json::{Value, json};

/// One event type of the catalog.
pub struct EventType {
    pub name: &'static str,
    pub description: &'static str,
    /// The properties of `data` (all required), as JSON schema types.
    fields: &'static [(&'static str, Field)],
}

#[derive(Clone, Copy)]
enum Field {
    Uuid,
    Text,
    Texts,
    Int,
    Bool,
    Time,
}

impl Field {
    fn schema(self) -> Value {
        match self {
            Field::Uuid => json!({ "type": "string", "format": "uuid" }),
            Field::Text => json!({ "type": "string" }),
            Field::Texts => json!({ "type": "array", "items": { "type": "string" } }),
            Field::Int => json!({ "type": "integer" }),
            Field::Bool => json!({ "type": "boolean" }),
            Field::Time => json!({ "type": "string", "format": "date-time" }),
        }
    }
}

impl EventType {
    /// The JSON schema (2020-12) of this type's `data`.
    pub fn schema(&self) -> Value {
        let properties: serde_json::Map<String, Value> =
            self.fields.iter().map(|(name, f)| ((*name).to_owned(), f.schema())).collect();
        let required: Vec<&str> = self.fields.iter().map(|(n, _)| *n).collect();
        json!({
            "$schema": "https://json-schema.org/draft/2020-12/schema",
            "title": self.name,
            "type": "object",
            "properties": properties,
            "required": required,
        })
    }
}

use Field::*;

const AGENT: &[(&str, Field)] = &[("agent_id", Uuid), ("name", Text), ("status", Text)];
const BUDGET: &[(&str, Field)] = &[
    ("budget_id", Uuid),
    ("scope", Text),
    ("period", Text),
    ("metric", Text),
    ("limit", Int),
    ("used", Int),
    ("threshold_percent", Int),
];
const CREDENTIAL: &[(&str, Field)] = &[("credential_id", Uuid), ("agent_id", Uuid), ("client_id", Text)];

/// Every event type AgentIdP emits.
pub const CATALOG: &[EventType] = &[
    EventType { name: "agent.created", description: "An agent was registered.", fields: AGENT },
    EventType {
        name: "agent.updated",
        description: "An agent's name, description, owner, capabilities, scopes or metadata changed.",
        fields: AGENT,
    },
    EventType {
        name: "agent.suspended",
        description: "An agent was suspended; its tokens were revoked.",
        fields: AGENT,
    },
    EventType { name: "agent.reactivated", description: "A suspended agent is active again.", fields: AGENT },
    EventType {
        name: "agent.deleted",
        description: "An agent was deleted with its credentials; its tokens were revoked.",
        fields: AGENT,
    },
    EventType { name: "credential.created", description: "An agent got a client credential.", fields: CREDENTIAL },
    EventType {
        name: "credential.rotated",
        description: "A credential's secret was rotated; the previous one works until `previous_secret_expires_at`.",
        fields: &[
            ("credential_id", Uuid),
            ("agent_id", Uuid),
            ("client_id", Text),
            ("previous_secret_expires_at", Time),
        ],
    },
    EventType {
        name: "credential.revoked",
        description: "A credential was revoked; its tokens were revoked.",
        fields: CREDENTIAL,
    },
    EventType {
        name: "tokens.revoked",
        description: "Every token of a subject (an agent, a credential, an organization) issued before `not_before` \
                      was revoked.",
        fields: &[("subject", Text), ("not_before", Time)],
    },
    EventType {
        name: "member.added",
        description: "A user became a member of the organization.",
        fields: &[("user_id", Uuid), ("email", Text), ("role", Text)],
    },
    EventType {
        name: "member.role_changed",
        description: "A member's role changed.",
        fields: &[("user_id", Uuid), ("from", Text), ("to", Text)],
    },
    EventType {
        name: "member.removed",
        description: "A member left the organization.",
        fields: &[("user_id", Uuid), ("role", Text)],
    },
    EventType {
        name: "oauth_client.created",
        description: "An OAuth client (an application that signs people in) was registered.",
        fields: &[("oauth_client_id", Uuid), ("client_id", Text), ("name", Text)],
    },
    EventType {
        name: "oauth_client.deleted",
        description: "An OAuth client was deleted; its tokens are revoked.",
        fields: &[("oauth_client_id", Uuid), ("client_id", Text), ("name", Text)],
    },
    EventType {
        name: "apikey.created",
        description: "An API key was created (its secret is never in an event).",
        fields: &[("api_key_id", Uuid), ("prefix", Text), ("scopes", Texts), ("service", Bool)],
    },
    EventType {
        name: "apikey.revoked",
        description: "An API key was revoked.",
        fields: &[("api_key_id", Uuid), ("prefix", Text)],
    },
    EventType {
        name: "policy.activated",
        description: "A policy version became the organization's active one.",
        fields: &[("version", Int)],
    },
    EventType {
        name: "policy.rolled_back",
        description: "The organization's policies were rolled back to an earlier version.",
        fields: &[("version", Int)],
    },
    EventType {
        name: "tier.changed",
        description: "The organization's plan changed (by an admin, or through Stripe).",
        fields: &[("from", Text), ("to", Text), ("source", Text)],
    },
    EventType {
        name: "signing_key.rotated",
        description: "A new token signing key was published; it signs from `activates_at`. Sent to every \
                      organization.",
        fields: &[("kid", Text), ("algorithm", Text), ("rotation", Text), ("activates_at", Time)],
    },
    EventType {
        name: "webhook.endpoint.disabled",
        description: "A webhook endpoint was disabled by the dispatcher: it answered 410 Gone, or failed without a \
                      success for `webhooks.disable_after_hours`.",
        fields: &[("endpoint_id", Uuid), ("url", Text), ("reason", Text)],
    },
    EventType {
        name: "node.active",
        description: "A node sent a heartbeat after none (it is new) or after it had gone stale.",
        fields: &[("node_id", Uuid), ("name", Text), ("hostname", Text)],
    },
    EventType {
        name: "node.stale",
        description: "A node sent no heartbeat within `city.node_stale_secs`.",
        fields: &[("node_id", Uuid), ("name", Text), ("hostname", Text)],
    },
    EventType {
        name: "webhook.test",
        description: "A test event, sent to one endpoint on request.",
        fields: &[("endpoint_id", Uuid), ("message", Text)],
    },
    EventType {
        name: "delegation.created",
        description: "A delegation was made (event_code 0x3001 = 12289). chronicle_cid is sha256: + the hex SHA-256 \
                      of the RFC 8785 canonical JSON of this data without chronicle_cid.",
        fields: &[
            ("event_code", Int),
            ("delegation_id", Uuid),
            ("delegator_id", Text),
            ("agent_id", Uuid),
            ("agent_type", Text),
            ("chain", Texts),
            ("depth", Int),
            ("scopes", Texts),
            ("capability_ceiling", Text),
            ("max_commands", Int),
            ("expires_at", Time),
            ("purpose", Text),
            ("chronicle_cid", Text),
        ],
    },
    EventType {
        name: "delegation.revoked",
        description: "A delegation was revoked (event_code 0x3003 = 12291): by hand, with its parent, or when its \
                      delegator's credential or membership or its agent ended; its tokens were revoked.",
        fields: DELEGATION_ENDED,
    },
    EventType {
        name: "delegation.expired",
        description: "A delegation ran out (event_code 0x3004 = 12292): its TTL (`ttl`), its command budget \
                      (`command_limit`) or its spend budget (`spend_limit`); its tokens were revoked.",
        fields: DELEGATION_ENDED,
    },
    EventType {
        name: "delegation.approval_requested",
        description: "A command under a delegation needs its delegator's approval (a ceremony).",
        fields: &[
            ("delegation_id", Uuid),
            ("approval_id", Uuid),
            ("delegator_id", Text),
            ("command", Text),
            ("expires_at", Time),
            ("chronicle_cid", Text),
        ],
    },
    EventType {
        name: "usage.budget_threshold_reached",
        description: "A monthly budget's threshold (`threshold_percent` of a limit) was reached; once per budget and \
                      month. `scope` is `organization` or `agent:<id>`, `period` is `YYYY-MM`, `metric` is `tokens` or \
                      `cost_micros`.",
        fields: BUDGET,
    },
    EventType {
        name: "usage.budget_exceeded",
        description: "A monthly budget's limit was reached; once per budget and month. The entitlement check answers \
                      `allowed: false` and the decision point sees `context.budget_exceeded`.",
        fields: BUDGET,
    },
];

const DELEGATION_ENDED: &[(&str, Field)] = &[
    ("event_code", Int),
    ("delegation_id", Uuid),
    ("agent_id", Uuid),
    ("delegator_id", Text),
    ("reason", Text),
    ("commands_executed", Int),
    ("ended_at", Time),
    ("chronicle_cid", Text),
];

/// Whether `name` is an event type of the catalog.
pub fn is_known(name: &str) -> bool {
    CATALOG.iter().any(|t| t.name == name)
}

/// Whether a subscription pattern (`*`, an exact type, or `<prefix>.*`) names at least one type of
/// the catalog.
pub fn matches_known(pattern: &str) -> bool {
    if pattern == "*" {
        return true;
    }
    match pattern.strip_suffix(".*") {
        Some(prefix) => !prefix.is_empty() && CATALOG.iter().any(|t| t.name.starts_with(&format!("{prefix}."))),
        None => is_known(pattern),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns() {
        assert!(matches_known("*"));
        assert!(matches_known("agent.*"));
        assert!(matches_known("webhook.*"));
        assert!(matches_known("webhook.endpoint.*"));
        assert!(matches_known("tier.changed"));
        assert!(!matches_known("agent"));
        assert!(!matches_known(".*"));
        assert!(matches_known("delegation.revoked"));
        assert!(!matches_known("delegation"));
        assert!(!matches_known("agent.created.*"));
    }

    #[test]
    fn every_schema_requires_its_fields() {
        for t in CATALOG {
            let s = t.schema();
            assert_eq!(s["required"].as_array().unwrap().len(), t.fields.len(), "{}", t.name);
        }
    }
}
