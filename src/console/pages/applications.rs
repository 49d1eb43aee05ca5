//! Applications: the organization's OAuth clients for its owners and admins (list, register with
//! the secret shown once, delete), and, for everyone, the applications they allowed (their
//! consents, each revocable).

use askama::Template;
use axum::{
    extract::{Path, Query},
    response::Response,
};
use serde::Deserialize;
use serde_json::{Value, json};
use uuid::Uuid;

use super::{items, joined, split_list, text};
use crate::console::{Shell, Submitted, Viewer, api::Failure, done, render};

pub struct ClientView {
    pub id: String,
    pub client_id: String,
    pub name: String,
    pub client_type: String,
    pub redirect_uris: String,
    pub scopes: String,
    pub dynamic: bool,
    pub created_at: String,
    pub last_used_at: String,
}

pub struct ConsentView {
    pub client_id: String,
    pub client_name: String,
    pub scopes: String,
    pub updated_at: String,
}

/// A client just registered: its id and, for a confidential one, its secret (shown once).
pub struct NewClient {
    pub name: String,
    pub client_id: String,
    pub secret: Option<String>,
}

#[derive(Template)]
#[template(path = "console/applications.html")]
pub struct ApplicationsPage {
    pub shell: Shell,
    /// None: the viewer does not administer the organization (the section is not shown).
    pub clients: Option<Vec<ClientView>>,
    pub consents: Vec<ConsentView>,
    pub created: Option<NewClient>,
    /// A list the API refused to give (shown with its detail, the rest of the page still works).
    pub problem: Option<Failure>,
}

#[derive(Deserialize, Default)]
pub struct DoneQuery {
    done: Option<String>,
}

fn client(c: &Value) -> ClientView {
    ClientView {
        id: text(c, "id"),
        client_id: text(c, "client_id"),
        name: text(c, "name"),
        client_type: text(c, "client_type"),
        redirect_uris: joined(c, "redirect_uris"),
        scopes: joined(c, "scopes"),
        dynamic: c.get("dynamic").and_then(Value::as_bool).unwrap_or(false),
        created_at: text(c, "created_at"),
        last_used_at: text(c, "last_used_at"),
    }
}

async fn page(viewer: &Viewer, created: Option<NewClient>, notice: Option<&str>) -> Response {
    let admin = viewer.is_admin();
    let (clients, consents) = tokio::join!(
        async { if admin { Some(viewer.api.get(&viewer.caller, "/api/v1/clients").await) } else { None } },
        viewer.api.get(&viewer.caller, "/api/v1/me/consents"),
    );
    let mut problem = None;
    let clients = match clients {
        None => None,
        Some(Ok(l)) => Some(items(&l, "").iter().map(client).collect()),
        Some(Err(e)) => {
            problem = Some(e);
            Some(Vec::new())
        }
    };
    let consents = match consents {
        Ok(l) => items(&l, "")
            .iter()
            .map(|c| ConsentView {
                client_id: text(c, "client_id"),
                client_name: text(c, "client_name"),
                scopes: joined(c, "scopes"),
                updated_at: text(c, "updated_at"),
            })
            .collect(),
        Err(e) => {
            problem = problem.or(Some(e));
            Vec::new()
        }
    };
    render(ApplicationsPage {
        shell: viewer.shell("Applications", "applications").with_notice(notice),
        clients,
        consents,
        created,
        problem,
    })
}

/// `GET /console/applications`.
pub async fn show(viewer: Viewer, Query(q): Query<DoneQuery>) -> Response {
    page(&viewer, None, q.done.as_deref()).await
}

#[derive(Deserialize)]
pub struct CreateForm {
    #[serde(default)]
    name: String,
    #[serde(default)]
    redirect_uris: String,
    #[serde(default)]
    client_type: String,
    #[serde(default)]
    scopes: String,
}

/// `POST /console/applications`: registers a client; its secret is shown on this response only.
pub async fn create(Submitted { viewer, form }: Submitted<CreateForm>) -> Response {
    let mut body = json!({ "name": form.name.trim(), "redirect_uris": split_list(&form.redirect_uris) });
    if !form.client_type.is_empty() {
        body["client_type"] = json!(form.client_type);
    }
    let scopes = split_list(&form.scopes);
    if !scopes.is_empty() {
        body["scopes"] = json!(scopes);
    }
    match viewer.api.post(&viewer.caller, "/api/v1/clients", &body).await {
        Ok(c) => {
            let created = NewClient {
                name: text(&c, "name"),
                client_id: text(&c, "client_id"),
                secret: c.get("client_secret").and_then(Value::as_str).map(str::to_owned),
            };
            page(&viewer, Some(created), None).await
        }
        Err(e) => viewer.failed(e, "applications"),
    }
}

#[derive(Deserialize)]
pub struct Empty {}

/// `POST /console/applications/{id}/delete`: the client and every token it holds end.
pub async fn delete(Path(id): Path<Uuid>, Submitted { viewer, .. }: Submitted<Empty>) -> Response {
    match viewer.api.delete(&viewer.caller, &format!("/api/v1/clients/{id}")).await {
        Ok(_) => done("/console/applications", "deleted"),
        Err(e) => viewer.failed(e, "applications"),
    }
}

#[derive(Deserialize)]
pub struct RevokeForm {
    client_id: String,
}

/// `POST /console/applications/consents/revoke`: the viewer withdraws an application's consent.
pub async fn revoke_consent(Submitted { viewer, form }: Submitted<RevokeForm>) -> Response {
    let id: String = url::form_urlencoded::byte_serialize(form.client_id.as_bytes()).collect();
    match viewer.api.delete(&viewer.caller, &format!("/api/v1/me/consents/{}", id.replace('+', "%20"))).await {
        Ok(_) => done("/console/applications", "revoked"),
        Err(e) => viewer.failed(e, "applications"),
    }
}
