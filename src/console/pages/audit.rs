//! The audit log with its filters, the hash chain's verification (shown first and large), and
//! the decision log.

use askama::Template;
use axum::{extract::Query, response::Response};
use serde::Deserialize;
use serde_json::Value;

use super::{int, items, joined, text};
use crate::console::{Shell, Viewer, api::with_query, render};

pub struct EventView {
    pub seq: i64,
    pub occurred_at: String,
    pub action: String,
    pub actor: String,
    pub target: String,
    pub details: String,
    pub hash: String,
}

pub struct Verification {
    pub valid: bool,
    pub checked: i64,
    pub first_invalid: String,
}

#[derive(Template)]
#[template(path = "console/audit.html")]
pub struct AuditPage {
    pub shell: Shell,
    pub events: Vec<EventView>,
    pub verification: Option<Verification>,
    pub actor: String,
    pub action: String,
    pub since: String,
    pub until: String,
    pub next: Option<String>,
}

#[derive(Deserialize, Default)]
pub struct AuditQuery {
    #[serde(default)]
    actor: String,
    #[serde(default)]
    action: String,
    #[serde(default)]
    since: String,
    #[serde(default)]
    until: String,
    #[serde(default)]
    cursor: String,
    verify: Option<String>,
}

/// `GET /console/audit` (`?verify=1` walks the chain).
pub async fn show(viewer: Viewer, Query(q): Query<AuditQuery>) -> Response {
    let filters = [("actor", q.actor.as_str()), ("action", &q.action), ("since", &q.since), ("until", &q.until)];
    let mut query = filters.to_vec();
    query.push(("cursor", &q.cursor));
    query.push(("limit", "50"));
    let page = match viewer.api.get(&viewer.caller, &with_query("/api/v1/audit", &query)).await {
        Ok(p) => p,
        Err(e) => return viewer.failed(e, "audit"),
    };
    let verification = if q.verify.is_some() {
        match viewer.api.get(&viewer.caller, "/api/v1/audit/verify").await {
            Ok(v) => Some(Verification {
                valid: v.get("valid").and_then(Value::as_bool).unwrap_or(false),
                checked: int(&v, "events_checked"),
                first_invalid: text(&v, "first_invalid_event_id"),
            }),
            Err(e) => return viewer.failed(e, "audit"),
        }
    } else {
        None
    };
    let next = page.get("next_cursor").and_then(Value::as_i64).map(|c| {
        let c = c.to_string();
        let mut pairs = filters.to_vec();
        pairs.push(("cursor", &c));
        with_query("/console/audit", &pairs)
    });
    let events = items(&page, "items")
        .iter()
        .map(|e| EventView {
            seq: int(e, "seq"),
            occurred_at: text(e, "occurred_at"),
            action: text(e, "action"),
            actor: text(e, "actor_id"),
            target: match (text(e, "target_type"), text(e, "target_id")) {
                (t, _) if t.is_empty() => String::new(),
                (t, id) => format!("{t}:{id}"),
            },
            details: match e.get("details") {
                None | Some(Value::Null) => String::new(),
                Some(Value::Object(m)) if m.is_empty() => String::new(),
                Some(d) => d.to_string(),
            },
            hash: text(e, "hash").chars().take(12).collect(),
        })
        .collect();
    render(AuditPage {
        shell: viewer.shell("Audit log", "audit"),
        events,
        verification,
        actor: q.actor,
        action: q.action,
        since: q.since,
        until: q.until,
        next,
    })
}

pub struct DecisionView {
    pub decided_at: String,
    pub actor: String,
    pub action: String,
    pub resource: String,
    pub effect: String,
    pub reason: String,
    pub policies: String,
    pub version: String,
    /// How many identical decisions the row stands for (repeated permits are folded).
    pub count: i64,
}

#[derive(Template)]
#[template(path = "console/decisions.html")]
pub struct DecisionsPage {
    pub shell: Shell,
    pub decisions: Vec<DecisionView>,
    pub effect: String,
    pub action: String,
    pub actor: String,
    pub next: Option<String>,
}

#[derive(Deserialize, Default)]
pub struct DecisionQuery {
    #[serde(default)]
    effect: String,
    #[serde(default)]
    action: String,
    #[serde(default)]
    actor: String,
    #[serde(default)]
    cursor: String,
}

/// `GET /console/audit/decisions`.
pub async fn decisions(viewer: Viewer, Query(q): Query<DecisionQuery>) -> Response {
    let filters = [("effect", q.effect.as_str()), ("action", &q.action), ("actor", &q.actor)];
    let mut query = filters.to_vec();
    query.push(("cursor", &q.cursor));
    query.push(("limit", "50"));
    let page = match viewer.api.get(&viewer.caller, &with_query("/api/v1/audit/decisions", &query)).await {
        Ok(p) => p,
        Err(e) => return viewer.failed(e, "audit"),
    };
    let next = page.get("next_cursor").and_then(Value::as_str).map(|c| {
        let mut pairs = filters.to_vec();
        pairs.push(("cursor", c));
        with_query("/console/audit/decisions", &pairs)
    });
    let decisions = items(&page, "items")
        .iter()
        .map(|d| DecisionView {
            decided_at: text(d, "decided_at"),
            actor: text(d, "actor_id"),
            action: text(d, "action"),
            resource: format!("{}:{}", text(d, "resource_type"), text(d, "resource_id")),
            effect: text(d, "effect"),
            reason: text(d, "reason"),
            policies: joined(d, "determining_policies"),
            version: text(d, "policy_version"),
            count: d.get("decision_count").and_then(Value::as_i64).unwrap_or(1),
        })
        .collect();
    render(DecisionsPage {
        shell: viewer.shell("Decision log", "audit"),
        decisions,
        effect: q.effect,
        action: q.action,
        actor: q.actor,
        next,
    })
}
