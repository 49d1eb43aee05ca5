//! Agents and their credentials: list with filters, create, edit, suspend and reactivate,
//! delete; credentials created (the secret shown once), rotated, revoked; tokens revoked in bulk.

use askama::Template;
use axum::{
    extract::{Path, Query},
    http::StatusCode,
    response::{IntoResponse, Response},
};
use serde::Deserialize;
use serde_json::{Value, json};
use uuid::Uuid;

use super::{items, joined, split_list, text};
use crate::{
    console::{Shell, Submitted, Viewer, api::with_query, done, render},
    policy::Resource,
};

/// One agent as the pages show it.
pub struct AgentView {
    pub id: String,
    pub name: String,
    pub description: String,
    pub status: String,
    pub capabilities: String,
    pub scopes: String,
    pub owner_id: String,
    pub created_at: String,
}

impl AgentView {
    fn from(v: &Value) -> Self {
        Self {
            id: text(v, "id"),
            name: text(v, "name"),
            description: text(v, "description"),
            status: text(v, "status"),
            capabilities: joined(v, "capabilities"),
            scopes: joined(v, "allowed_scopes"),
            owner_id: text(v, "owner_id"),
            created_at: text(v, "created_at"),
        }
    }

    pub fn suspended(&self) -> bool {
        self.status == "suspended"
    }
}

#[derive(Template)]
#[template(path = "console/agents.html")]
pub struct AgentsPage {
    pub shell: Shell,
    pub agents: Vec<AgentView>,
    pub q: String,
    pub status: String,
    pub capability: String,
    pub next: Option<String>,
    pub can_create: bool,
}

#[derive(Deserialize, Default)]
pub struct ListQuery {
    #[serde(default)]
    q: String,
    #[serde(default)]
    status: String,
    #[serde(default)]
    capability: String,
    #[serde(default)]
    after: String,
    done: Option<String>,
}

/// `GET /console/agents`.
pub async fn list(viewer: Viewer, Query(f): Query<ListQuery>) -> Response {
    let path = with_query(
        "/api/v1/agents",
        &[("q", &f.q), ("status", &f.status), ("capability", &f.capability), ("after", &f.after), ("limit", "50")],
    );
    let page = match viewer.api.get(&viewer.caller, &path).await {
        Ok(p) => p,
        Err(e) => return viewer.failed(e, "agents"),
    };
    let next = page.get("next_cursor").and_then(Value::as_str).map(|c| {
        with_query(
            "/console/agents",
            &[("q", &f.q), ("status", &f.status), ("capability", &f.capability), ("after", c)],
        )
    });
    let can_create = viewer.org_id().is_some_and(|org_id| {
        viewer.can("create", Resource::Agent { org_id, owner_id: None }, org_id.to_string(), "agents:write")
    });
    render(AgentsPage {
        shell: viewer.shell("Agents", "agents").with_notice(f.done.as_deref()),
        agents: items(&page, "items").iter().map(AgentView::from).collect(),
        q: f.q,
        status: f.status,
        capability: f.capability,
        next,
        can_create,
    })
}

#[derive(Deserialize)]
pub struct AgentForm {
    #[serde(default)]
    name: String,
    #[serde(default)]
    description: String,
    #[serde(default)]
    capabilities: String,
    #[serde(default)]
    allowed_scopes: String,
}

impl AgentForm {
    fn body(&self) -> Value {
        json!({
            "name": self.name.trim(),
            "description": self.description.trim(),
            "capabilities": split_list(&self.capabilities),
            "allowed_scopes": split_list(&self.allowed_scopes),
        })
    }
}

/// `POST /console/agents`: the API's `POST /api/v1/agents`.
pub async fn create(Submitted { viewer, form }: Submitted<AgentForm>) -> Response {
    match viewer.api.post(&viewer.caller, "/api/v1/agents", &form.body()).await {
        Ok(agent) => done(&format!("/console/agents/{}", text(&agent, "id")), "created"),
        Err(e) => viewer.failed(e, "agents"),
    }
}

/// A credential without its secret.
pub struct CredentialView {
    pub id: String,
    pub client_id: String,
    pub created_at: String,
    pub rotated_at: String,
    pub previous_expires_at: String,
}

/// A secret the API just made: shown on this response only.
pub struct SecretShown {
    pub what: &'static str,
    pub client_id: String,
    pub secret: String,
    pub previous_expires_at: String,
}

#[derive(Template)]
#[template(path = "console/agent.html")]
pub struct AgentPage {
    pub shell: Shell,
    pub agent: AgentView,
    pub credentials: Vec<CredentialView>,
    pub secret: Option<SecretShown>,
    pub can_update: bool,
    pub can_delete: bool,
    pub can_manage: bool,
    pub can_revoke: bool,
}

#[derive(Deserialize, Default)]
pub struct DoneQuery {
    done: Option<String>,
}

async fn agent_page(viewer: &Viewer, id: Uuid, secret: Option<SecretShown>, done: Option<&str>) -> Response {
    let agent = match viewer.api.get(&viewer.caller, &format!("/api/v1/agents/{id}")).await {
        Ok(a) => a,
        Err(e) => return viewer.failed(e, "agents"),
    };
    let credentials = match viewer.api.get(&viewer.caller, &format!("/api/v1/agents/{id}/credentials")).await {
        Ok(c) => c,
        Err(e) => return viewer.failed(e, "agents"),
    };
    let agent = AgentView::from(&agent);
    let (mut can_update, mut can_delete, mut can_manage, mut can_revoke) = (false, false, false, false);
    if let Some(org_id) = viewer.org_id() {
        let owner_id = agent.owner_id.parse().ok();
        let can = |action: &str, scope: &str| {
            viewer.can(action, Resource::Agent { org_id, owner_id }, format!("agent:{id}"), scope)
        };
        can_update = can("update", "agents:write");
        can_delete = can("delete", "agents:write");
        can_manage = can("manage", "agents:write");
        can_revoke = can("revoke_tokens", "tokens:revoke");
    }
    let credentials = items(&credentials, "")
        .iter()
        .map(|c| CredentialView {
            id: text(c, "id"),
            client_id: text(c, "client_id"),
            created_at: text(c, "created_at"),
            rotated_at: text(c, "rotated_at"),
            previous_expires_at: text(c, "previous_secret_expires_at"),
        })
        .collect();
    let title = format!("Agent {}", agent.name);
    render(AgentPage {
        shell: viewer.shell(title, "agents").with_notice(done),
        agent,
        credentials,
        secret,
        can_update,
        can_delete,
        can_manage,
        can_revoke,
    })
}

/// `GET /console/agents/{id}`.
pub async fn show(viewer: Viewer, Path(id): Path<String>, Query(q): Query<DoneQuery>) -> Response {
    let Ok(id) = id.parse::<Uuid>() else { return not_found(&viewer) };
    agent_page(&viewer, id, None, q.done.as_deref()).await
}

pub(crate) fn not_found(viewer: &Viewer) -> Response {
    viewer.failed(
        crate::console::api::Failure {
            status: StatusCode::NOT_FOUND.as_u16(),
            code: "not_found".into(),
            detail: "There is no such agent in this organization.".into(),
            request_id: crate::http::request_id::current_request_id().unwrap_or_default(),
        },
        "agents",
    )
}

/// `POST /console/agents/{id}`: the API's `PATCH /api/v1/agents/{id}`.
pub async fn edit(Path(id): Path<String>, Submitted { viewer, form }: Submitted<AgentForm>) -> Response {
    let Ok(id) = id.parse::<Uuid>() else { return not_found(&viewer) };
    match viewer.api.patch(&viewer.caller, &format!("/api/v1/agents/{id}"), &form.body()).await {
        Ok(_) => done(&format!("/console/agents/{id}"), "saved"),
        Err(e) => viewer.failed(e, "agents"),
    }
}

#[derive(Deserialize)]
pub struct StatusForm {
    status: String,
}

/// `POST /console/agents/{id}/status`: suspend or reactivate.
pub async fn set_status(Path(id): Path<String>, Submitted { viewer, form }: Submitted<StatusForm>) -> Response {
    let Ok(id) = id.parse::<Uuid>() else { return not_found(&viewer) };
    let notice = if form.status == "suspended" { "suspended" } else { "reactivated" };
    match viewer.api.patch(&viewer.caller, &format!("/api/v1/agents/{id}"), &json!({ "status": form.status })).await {
        Ok(_) => done(&format!("/console/agents/{id}"), notice),
        Err(e) => viewer.failed(e, "agents"),
    }
}

#[derive(Deserialize)]
pub struct Empty {}

/// `POST /console/agents/{id}/delete`.
pub async fn delete(Path(id): Path<String>, Submitted { viewer, .. }: Submitted<Empty>) -> Response {
    let Ok(id) = id.parse::<Uuid>() else { return not_found(&viewer) };
    match viewer.api.delete(&viewer.caller, &format!("/api/v1/agents/{id}")).await {
        Ok(_) => done("/console/agents", "deleted"),
        Err(e) => viewer.failed(e, "agents"),
    }
}

/// `POST /console/agents/{id}/credentials`: a new credential, its secret shown on this response
/// only (never stored by us, never cached: every console response is `no-store`).
pub async fn create_credential(Path(id): Path<String>, Submitted { viewer, .. }: Submitted<Empty>) -> Response {
    let Ok(id) = id.parse::<Uuid>() else { return not_found(&viewer) };
    match viewer.api.post_empty(&viewer.caller, &format!("/api/v1/agents/{id}/credentials")).await {
        Ok(c) => {
            let secret = SecretShown {
                what: "New credential",
                client_id: text(&c, "client_id"),
                secret: text(&c, "client_secret"),
                previous_expires_at: String::new(),
            };
            (StatusCode::CREATED, agent_page(&viewer, id, Some(secret), None).await).into_response()
        }
        Err(e) => viewer.failed(e, "agents"),
    }
}

/// `POST /console/agents/{id}/credentials/{cred}/rotate`: a new secret, shown once; the old one
/// keeps working for the API's grace period.
pub async fn rotate_credential(
    Path((id, cred)): Path<(String, String)>,
    Submitted { viewer, .. }: Submitted<Empty>,
) -> Response {
    let (Ok(id), Ok(cred)) = (id.parse::<Uuid>(), cred.parse::<Uuid>()) else { return not_found(&viewer) };
    match viewer.api.post_empty(&viewer.caller, &format!("/api/v1/agents/{id}/credentials/{cred}/rotate")).await {
        Ok(c) => {
            let secret = SecretShown {
                what: "Rotated credential",
                client_id: text(&c, "client_id"),
                secret: text(&c, "client_secret"),
                previous_expires_at: text(&c, "previous_secret_expires_at"),
            };
            agent_page(&viewer, id, Some(secret), None).await
        }
        Err(e) => viewer.failed(e, "agents"),
    }
}

/// `POST /console/agents/{id}/credentials/{cred}/revoke`.
pub async fn revoke_credential(
    Path((id, cred)): Path<(String, String)>,
    Submitted { viewer, .. }: Submitted<Empty>,
) -> Response {
    let (Ok(id), Ok(cred)) = (id.parse::<Uuid>(), cred.parse::<Uuid>()) else { return not_found(&viewer) };
    match viewer.api.delete(&viewer.caller, &format!("/api/v1/agents/{id}/credentials/{cred}")).await {
        Ok(_) => done(&format!("/console/agents/{id}"), "revoked"),
        Err(e) => viewer.failed(e, "agents"),
    }
}

/// `POST /console/agents/{id}/revoke-tokens`: every token of the agent issued so far.
pub async fn revoke_tokens(Path(id): Path<String>, Submitted { viewer, .. }: Submitted<Empty>) -> Response {
    let Ok(id) = id.parse::<Uuid>() else { return not_found(&viewer) };
    match viewer.api.post_empty(&viewer.caller, &format!("/api/v1/agents/{id}/revoke-tokens")).await {
        Ok(_) => done(&format!("/console/agents/{id}"), "tokens_revoked"),
        Err(e) => viewer.failed(e, "agents"),
    }
}
