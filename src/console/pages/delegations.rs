//! Delegations: active and ended, with their budgets (commands, tokens, cost) used and left and
//! their time to live; revoke; pending approvals approved or denied.

use askama::Template;
use axum::{
    extract::{Path, Query},
    response::Response,
};
use serde::Deserialize;
use serde_json::Value;
use uuid::Uuid;

use super::{int, items, joined, text};
use crate::console::{Shell, Submitted, Viewer, api::with_query, done, render};

pub struct ApprovalView {
    pub id: String,
    pub command: String,
    pub expires_at: String,
}

pub struct DelegationView {
    pub id: String,
    pub status: String,
    pub agent_id: String,
    pub delegator: String,
    pub purpose: String,
    pub scopes: String,
    pub max_commands: i64,
    pub commands_used: i64,
    pub commands_left: i64,
    pub tokens_spent: i64,
    pub max_tokens: Option<i64>,
    pub cost_spent: i64,
    pub max_cost: Option<i64>,
    pub ttl: String,
    pub expires_at: String,
    pub ended: String,
    pub approvals: Vec<ApprovalView>,
    /// The viewer delegated it: only the delegator decides its ceremonies (the API's rule).
    pub mine: bool,
}

#[derive(Template)]
#[template(path = "console/delegations.html")]
pub struct DelegationsPage {
    pub shell: Shell,
    pub status: String,
    pub delegations: Vec<DelegationView>,
    pub total_active: i64,
    pub next: Option<String>,
}

#[derive(Deserialize, Default)]
pub struct ListQuery {
    #[serde(default)]
    status: String,
    #[serde(default)]
    after: String,
    done: Option<String>,
}

fn ttl(secs: i64) -> String {
    match secs {
        s if s <= 0 => "expired".into(),
        s if s < 120 => format!("{s} s"),
        s if s < 7200 => format!("{} min", s / 60),
        s if s < 172_800 => format!("{} h", s / 3600),
        s => format!("{} days", s / 86_400),
    }
}

/// `GET /console/delegations?status=active|expired|revoked`.
pub async fn list(viewer: Viewer, Query(q): Query<ListQuery>) -> Response {
    let status = if q.status.is_empty() { "active".to_owned() } else { q.status.clone() };
    let path = with_query("/api/v1/delegations", &[("status", &status), ("after", &q.after), ("limit", "50")]);
    let page = match viewer.api.get(&viewer.caller, &path).await {
        Ok(p) => p,
        Err(e) => return viewer.failed(e, "delegations"),
    };
    let rows = items(&page, "items");
    // Pending approvals of the delegations shown (a ceremony waits on its delegator).
    let viewer = &viewer;
    let approvals = futures_util::future::join_all(rows.iter().map(|d| {
        let id = text(d, "delegation_id");
        let wanted = text(d, "status") == "active" && !items(d, "ceremony_required_for").is_empty();
        async move {
            if !wanted {
                return Value::Null;
            }
            let path = format!("/api/v1/delegations/{id}/approvals");
            viewer.api.get(&viewer.caller, &path).await.unwrap_or(Value::Null)
        }
    }))
    .await;
    let me = viewer.actor.actor_id();
    let delegations = rows
        .iter()
        .zip(approvals)
        .map(|(d, a)| DelegationView {
            mine: text(d, "delegator_id") == me,
            id: text(d, "delegation_id"),
            status: text(d, "status"),
            agent_id: text(d, "agent_id"),
            delegator: text(d, "delegator_id"),
            purpose: text(d, "purpose"),
            scopes: joined(d, "scopes"),
            max_commands: int(d, "max_commands"),
            commands_used: int(d, "commands_executed"),
            commands_left: int(d, "commands_remaining"),
            tokens_spent: int(d, "tokens_spent"),
            max_tokens: d.get("max_tokens").and_then(Value::as_i64),
            cost_spent: int(d, "cost_spent"),
            max_cost: d.get("max_cost").and_then(Value::as_i64),
            ttl: ttl(int(d, "ttl_remaining_seconds")),
            expires_at: text(d, "expires_at"),
            ended: text(d, "ended_reason"),
            approvals: items(&a, "")
                .iter()
                .filter(|x| text(x, "status") == "pending")
                .map(|x| ApprovalView {
                    id: text(x, "approval_id"),
                    command: text(x, "command"),
                    expires_at: text(x, "expires_at"),
                })
                .collect(),
        })
        .collect();
    let next = page
        .get("next_cursor")
        .and_then(Value::as_str)
        .map(|c| with_query("/console/delegations", &[("status", &status), ("after", c)]));
    render(DelegationsPage {
        shell: viewer.shell("Delegations", "delegations").with_notice(q.done.as_deref()),
        status,
        delegations,
        total_active: int(&page, "total_active"),
        next,
    })
}

#[derive(Deserialize)]
pub struct Empty {}

/// `POST /console/delegations/{id}/revoke`: ends it and every delegation below it.
pub async fn revoke(Path(id): Path<Uuid>, Submitted { viewer, .. }: Submitted<Empty>) -> Response {
    match viewer.api.post_empty(&viewer.caller, &format!("/api/v1/delegations/{id}/revoke")).await {
        Ok(_) => done("/console/delegations", "revoked"),
        Err(e) => viewer.failed(e, "delegations"),
    }
}

/// `POST /console/delegations/{id}/approvals/{approval}/approve|deny`.
pub async fn decide(
    Path((id, approval, verdict)): Path<(Uuid, Uuid, String)>,
    Submitted { viewer, .. }: Submitted<Empty>,
) -> Response {
    let (action, notice) = match verdict.as_str() {
        "approve" => ("approve", "approved"),
        "deny" => ("deny", "denied"),
        _ => return done("/console/delegations", ""),
    };
    let path = format!("/api/v1/delegations/{id}/approvals/{approval}/{action}");
    match viewer.api.post_empty(&viewer.caller, &path).await {
        Ok(_) => done("/console/delegations", notice),
        Err(e) => viewer.failed(e, "delegations"),
    }
}
