//! Compliance and the marketplace: the organization's compliance report (owners and admins; the
//! public list of controls for everyone else), and which of its agents are listed publicly, with
//! list and unlist buttons where the decision point allows them.

use askama::Template;
use axum::{
    extract::{Path, Query},
    http::Method,
    response::Response,
};
use serde::Deserialize;
use serde_json::Value;
use uuid::Uuid;

use super::{agents::Empty, items, joined, opt_text, text};
use crate::{
    console::{Shell, Submitted, Viewer, api::with_query, done, render},
    policy::Resource,
};

pub struct ControlView {
    pub id: String,
    pub title: String,
    /// `pass`, `fail`, `not_applicable`, or "" when only the control list is shown.
    pub status: String,
    pub detail: String,
}

pub struct ListingView {
    pub agent_id: String,
    pub name: String,
    pub capabilities: String,
    pub listed: bool,
    pub can_change: bool,
}

#[derive(Template)]
#[template(path = "console/trust.html")]
pub struct TrustPage {
    pub shell: Shell,
    /// Whether `controls` carry this organization's states (else: the public list).
    pub reported: bool,
    pub generated_at: String,
    pub passed: i64,
    pub failed: i64,
    pub controls: Vec<ControlView>,
    pub agents: Vec<ListingView>,
    pub q: String,
    pub market: Vec<ListingView>,
}

#[derive(Deserialize, Default)]
pub struct TrustQuery {
    #[serde(default)]
    q: String,
    done: Option<String>,
}

/// `GET /console/trust`.
pub async fn show(viewer: Viewer, Query(q): Query<TrustQuery>) -> Response {
    let report =
        if viewer.is_admin() { viewer.api.get(&viewer.caller, "/api/v1/compliance/report").await.ok() } else { None };
    let (reported, generated_at, passed, failed, controls) = match &report {
        Some(r) => (
            true,
            text(r, "generated_at"),
            r["summary"]["passed"].as_i64().unwrap_or(0),
            r["summary"]["failed"].as_i64().unwrap_or(0),
            items(r, "controls")
                .iter()
                .map(|c| ControlView {
                    id: text(c, "id"),
                    title: text(c, "title"),
                    status: text(c, "status"),
                    detail: text(c, "detail"),
                })
                .collect(),
        ),
        None => {
            let list = match viewer.api.get(&viewer.caller, "/api/v1/compliance/controls").await {
                Ok(l) => l,
                Err(e) => return viewer.failed(e, "trust"),
            };
            let controls = list
                .as_array()
                .map(Vec::as_slice)
                .unwrap_or_default()
                .iter()
                .map(|c| ControlView {
                    id: text(c, "id"),
                    title: text(c, "title"),
                    status: String::new(),
                    detail: text(c, "checked_by"),
                })
                .collect();
            (false, String::new(), 0, 0, controls)
        }
    };
    let org = viewer.org_id();
    let agents = match viewer.api.get(&viewer.caller, "/api/v1/agents?limit=200").await {
        Ok(page) => items(&page, "items")
            .iter()
            .map(|a| {
                let owner = opt_text(a, "owner_id").and_then(|o| o.parse::<Uuid>().ok());
                let id = text(a, "id");
                let can_change = org.is_some_and(|org_id| {
                    viewer.can("update", Resource::Agent { org_id, owner_id: owner }, id.clone(), "agents:write")
                });
                ListingView {
                    name: text(a, "name"),
                    capabilities: joined(a, "capabilities"),
                    listed: !matches!(a.get("listed_at"), None | Some(Value::Null)),
                    agent_id: id,
                    can_change,
                }
            })
            .collect(),
        Err(e) => return viewer.failed(e, "trust"),
    };
    let search = with_query("/api/v1/marketplace", &[("q", q.q.as_str()), ("limit", "50")]);
    let market = match viewer.api.get(&viewer.caller, &search).await {
        Ok(page) => items(&page, "items")
            .iter()
            .map(|l| ListingView {
                agent_id: text(l, "agent_id"),
                name: format!("{} · {}", text(l, "name"), text(&l["publisher"], "name")),
                capabilities: joined(l, "capabilities"),
                listed: true,
                can_change: false,
            })
            .collect(),
        Err(e) => return viewer.failed(e, "trust"),
    };
    render(TrustPage {
        shell: viewer.shell("Compliance and marketplace", "trust").with_notice(q.done.as_deref()),
        reported,
        generated_at,
        passed,
        failed,
        controls,
        agents,
        q: q.q,
        market,
    })
}

/// `POST /console/trust/listing/{id}/{list|unlist}`.
pub async fn set_listing(
    Path((id, verb)): Path<(String, String)>,
    Submitted { viewer, .. }: Submitted<Empty>,
) -> Response {
    let (Ok(id), method, notice) = (
        id.parse::<Uuid>(),
        if verb == "list" { Method::PUT } else { Method::DELETE },
        if verb == "list" { "listed" } else { "unlisted" },
    ) else {
        return super::agents::not_found(&viewer);
    };
    if verb != "list" && verb != "unlist" {
        return super::agents::not_found(&viewer);
    }
    match viewer.api.call(&viewer.caller, method, &format!("/api/v1/agents/{id}/listing"), None).await {
        Ok(_) => done("/console/trust", notice),
        Err(e) => viewer.failed(e, "trust"),
    }
}
