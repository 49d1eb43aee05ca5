//! The organization: members and their roles, API keys (scoped, shown once), the tier and the
//! usage against its limits.

use askama::Template;
use axum::{
    extract::{Path, Query},
    response::{IntoResponse, Response},
};
use serde::Deserialize;
use serde_json::{Value, json};
use uuid::Uuid;

use super::{int, items, joined, split_list, text};
use crate::{
    console::{Shell, Submitted, Viewer, done, render},
    policy::Resource,
};

pub struct MemberView {
    pub user_id: String,
    pub email: String,
    pub name: String,
    pub role: String,
    pub joined_at: String,
}

pub struct KeyView {
    pub id: String,
    pub prefix: String,
    pub description: String,
    pub scopes: String,
    pub service: bool,
    pub created_at: String,
    pub expires_at: String,
    pub last_used: String,
}

/// One limit against its use: `max` is none when unlimited.
pub struct LimitView {
    pub what: &'static str,
    pub used: i64,
    pub max: Option<i64>,
}

#[derive(Template)]
#[template(path = "console/organization.html")]
pub struct OrganizationPage {
    pub shell: Shell,
    pub name: String,
    pub slug: String,
    pub org_id: String,
    pub members: Vec<MemberView>,
    pub keys: Vec<KeyView>,
    pub plan: String,
    pub limits: Vec<LimitView>,
    pub can_manage_members: bool,
    pub can_upgrade: bool,
    pub new_key: Option<(String, String)>,
    /// An invitation just made: its email and its one-time token.
    pub invitation: Option<(String, String)>,
    /// The organizations the viewer can switch to (empty with only one).
    pub orgs: Vec<OrgView>,
}

pub struct OrgView {
    pub id: String,
    pub name: String,
    pub slug: String,
    pub role: String,
    pub current: bool,
}

#[derive(Deserialize, Default)]
pub struct DoneQuery {
    done: Option<String>,
}

fn limit(plan: &Value, key: &str) -> Option<i64> {
    plan.get(key).and_then(Value::as_i64)
}

async fn page(
    viewer: &Viewer,
    new_key: Option<(String, String)>,
    invitation: Option<(String, String)>,
    notice: Option<&str>,
) -> Response {
    let Some(org_id) = viewer.org_id() else {
        return viewer.failed(
            crate::console::api::Failure {
                status: 400,
                code: "org_required".into(),
                detail: "You are not a member of any organization yet; accept an invitation first.".into(),
                request_id: crate::http::request_id::current_request_id().unwrap_or_default(),
            },
            "organization",
        );
    };
    let (org_path, members_path) =
        (format!("/api/v1/organizations/{org_id}"), format!("/api/v1/organizations/{org_id}/members"));
    let switch = viewer.actor.principal.memberships.len() > 1 || viewer.actor.is_system_admin();
    let (org, members, keys, tier, orgs) = tokio::join!(
        viewer.api.get(&viewer.caller, &org_path),
        viewer.api.get(&viewer.caller, &members_path),
        viewer.api.get(&viewer.caller, "/auth/api-keys"),
        viewer.api.get(&viewer.caller, "/api/v1/tiers/status"),
        async {
            if switch { viewer.api.get(&viewer.caller, "/api/v1/organizations?limit=200").await.ok() } else { None }
        },
    );
    let orgs = orgs
        .map(|o| {
            items(&o, "items")
                .iter()
                .map(|x| OrgView {
                    id: text(x, "id"),
                    name: text(x, "name"),
                    slug: text(x, "slug"),
                    role: text(x, "role"),
                    current: text(x, "id") == org_id.to_string(),
                })
                .collect()
        })
        .unwrap_or_default();
    let org = match org {
        Ok(o) => o,
        Err(e) => return viewer.failed(e, "organization"),
    };
    let members = members.unwrap_or(Value::Null);
    let members_list = if members.is_array() { items(&members, "") } else { items(&members, "items") };
    let keys = keys.unwrap_or(Value::Null);
    let tier = tier.unwrap_or(Value::Null);
    let plan = tier.get("limits").cloned().unwrap_or(Value::Null);
    let usage = tier.get("usage").cloned().unwrap_or(Value::Null);
    let limits = if tier.is_null() {
        Vec::new()
    } else {
        vec![
            LimitView { what: "Agents", used: int(&usage, "agents"), max: limit(&plan, "max_agents") },
            LimitView {
                what: "API calls today",
                used: int(&usage, "api_calls_today"),
                max: limit(&plan, "api_calls_per_day"),
            },
            LimitView { what: "Tokens today", used: int(&usage, "tokens_today"), max: limit(&plan, "tokens_per_day") },
            LimitView {
                what: "Tokens this month",
                used: int(&usage, "tokens_this_month"),
                max: limit(&plan, "tokens_per_month"),
            },
        ]
    };
    render(OrganizationPage {
        shell: viewer.shell("Organization", "organization").with_notice(notice),
        name: text(&org, "name"),
        slug: text(&org, "slug"),
        org_id: org_id.to_string(),
        members: members_list
            .iter()
            .map(|m| MemberView {
                user_id: text(m, "user_id"),
                email: text(m, "email"),
                name: text(m, "display_name"),
                role: text(m, "role"),
                joined_at: text(m, "joined_at"),
            })
            .collect(),
        keys: items(&keys, "")
            .iter()
            .map(|k| KeyView {
                id: text(k, "id"),
                prefix: text(k, "prefix"),
                description: text(k, "description"),
                scopes: joined(k, "scopes"),
                service: k.get("service").and_then(Value::as_bool).unwrap_or(false),
                created_at: text(k, "created_at"),
                expires_at: text(k, "expires_at"),
                last_used: text(k, "last_used"),
            })
            .collect(),
        plan: text(&tier, "plan"),
        limits,
        can_manage_members: viewer.can(
            "manage_members",
            Resource::Organization { org_id },
            org_id.to_string(),
            "members:write",
        ),
        can_upgrade: viewer.can("manage", Resource::Organization { org_id }, org_id.to_string(), "tiers:write"),
        new_key,
        invitation,
        orgs,
    })
}

#[derive(Deserialize)]
pub struct SwitchForm {
    org: Uuid,
}

/// `POST /console/organization/switch`: the console works in another of the viewer's
/// organizations from now on (the API is asked first whether the viewer may see it).
pub async fn switch(
    axum::Extension(crate::http::middleware::tls::Secure(secure)): axum::Extension<
        crate::http::middleware::tls::Secure,
    >,
    Submitted { viewer, form }: Submitted<SwitchForm>,
) -> Response {
    if let Err(e) = viewer.api.get(&viewer.caller, &format!("/api/v1/organizations/{}", form.org)).await {
        return viewer.failed(e, "organization");
    }
    let secure = if secure { "; Secure" } else { "" };
    let cookie = format!(
        "{}={}; Path=/console; HttpOnly; SameSite=Lax; Max-Age=2592000{secure}",
        crate::console::ORG_COOKIE,
        form.org
    );
    let mut response = done("/console/organization", "switched");
    if let Ok(v) = axum::http::HeaderValue::from_str(&cookie) {
        response.headers_mut().append(axum::http::header::SET_COOKIE, v);
    }
    response
}

/// `GET /console/organization`.
pub async fn show(viewer: Viewer, Query(q): Query<DoneQuery>) -> Response {
    page(&viewer, None, None, q.done.as_deref()).await
}

#[derive(Deserialize)]
pub struct KeyForm {
    #[serde(default)]
    description: String,
    #[serde(default)]
    scopes: String,
    #[serde(default)]
    expires_days: String,
}

/// `POST /console/organization/api-keys`: a new key, shown on this response only.
pub async fn create_key(Submitted { viewer, form }: Submitted<KeyForm>) -> Response {
    let mut body = json!({ "description": form.description.trim() });
    let scopes = split_list(&form.scopes);
    if !scopes.is_empty() {
        body["scopes"] = json!(scopes);
    }
    if let Ok(days) = form.expires_days.trim().parse::<i64>() {
        body["expires_days"] = json!(days);
    }
    match viewer.api.post(&viewer.caller, "/auth/api-keys", &body).await {
        Ok(k) => page(&viewer, Some((text(&k, "key"), joined(&k, "scopes"))), None, None).await,
        Err(e) => viewer.failed(e, "organization"),
    }
}

#[derive(Deserialize)]
pub struct Empty {}

/// `POST /console/organization/api-keys/{id}/delete`.
pub async fn delete_key(Path(id): Path<Uuid>, Submitted { viewer, .. }: Submitted<Empty>) -> Response {
    match viewer.api.delete(&viewer.caller, &format!("/auth/api-keys/{id}")).await {
        Ok(_) => done("/console/organization", "revoked"),
        Err(e) => viewer.failed(e, "organization"),
    }
}

#[derive(Deserialize)]
pub struct RoleForm {
    role: String,
}

/// `POST /console/organization/members/{user}/role`.
pub async fn set_role(Path(user): Path<Uuid>, Submitted { viewer, form }: Submitted<RoleForm>) -> Response {
    let Some(org_id) = viewer.org_id() else { return done("/console/organization", "") };
    let path = format!("/api/v1/organizations/{org_id}/members/{user}");
    match viewer.api.patch(&viewer.caller, &path, &json!({ "role": form.role })).await {
        Ok(_) => done("/console/organization", "saved"),
        Err(e) => viewer.failed(e, "organization"),
    }
}

#[derive(Deserialize)]
pub struct InviteForm {
    #[serde(default)]
    email: String,
    #[serde(default)]
    role: String,
}

/// `POST /console/organization/members`: an invitation; its one-time token shown on this response
/// only, to hand to the invitee.
pub async fn invite(Submitted { viewer, form }: Submitted<InviteForm>) -> Response {
    let Some(org_id) = viewer.org_id() else { return done("/console/organization", "") };
    let body = json!({ "email": form.email.trim(), "role": form.role });
    match viewer.api.post(&viewer.caller, &format!("/api/v1/organizations/{org_id}/members"), &body).await {
        Ok(inv) => page(&viewer, None, Some((text(&inv, "email"), text(&inv, "invitation_token"))), None).await,
        Err(e) => viewer.failed(e, "organization"),
    }
}

/// `POST /console/organization/members/{user}/remove`.
pub async fn remove_member(Path(user): Path<Uuid>, Submitted { viewer, .. }: Submitted<Empty>) -> Response {
    let Some(org_id) = viewer.org_id() else { return done("/console/organization", "") };
    match viewer.api.delete(&viewer.caller, &format!("/api/v1/organizations/{org_id}/members/{user}")).await {
        Ok(_) => done("/console/organization", "deleted"),
        Err(e) => viewer.failed(e, "organization"),
    }
}

#[derive(Deserialize)]
pub struct UpgradeForm {
    plan: String,
}

/// `POST /console/organization/upgrade`: the plan changes now, or the owner is sent to pay.
pub async fn upgrade(Submitted { viewer, form }: Submitted<UpgradeForm>) -> Response {
    match viewer.api.post(&viewer.caller, "/api/v1/tiers/upgrade", &json!({ "plan": form.plan })).await {
        Ok(r) => match r.get("checkout_url").and_then(Value::as_str).filter(|u| u.starts_with("https://")) {
            Some(url) => axum::response::Redirect::to(url).into_response(),
            None => done("/console/organization", "upgraded"),
        },
        Err(e) => viewer.failed(e, "organization"),
    }
}
