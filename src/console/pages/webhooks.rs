//! Webhooks: endpoints, their deliveries with status, retry and replay; the signing secret shown
//! once (at creation and at rotation).

use askama::Template;
use axum::{
    extract::{Path, Query},
    response::Response,
};
use serde::Deserialize;
use serde_json::{Value, json};
use uuid::Uuid;

use super::{int, items, joined, split_list, text};
use crate::console::{Shell, Submitted, Viewer, api::with_query, done, render};

pub struct EndpointView {
    pub id: String,
    pub url: String,
    pub description: String,
    pub event_types: String,
    /// The event types as the edit form's field shows them (comma-separated).
    pub event_types_field: String,
    pub enabled: bool,
    pub disabled_reason: String,
    pub last_success_at: String,
    pub failing_since: String,
}

fn endpoint(v: &Value) -> EndpointView {
    EndpointView {
        id: text(v, "id"),
        url: text(v, "url"),
        description: text(v, "description"),
        event_types: joined(v, "event_types"),
        event_types_field: items(v, "event_types").iter().filter_map(Value::as_str).collect::<Vec<_>>().join(","),
        enabled: v.get("enabled").and_then(Value::as_bool).unwrap_or(false),
        disabled_reason: text(v, "disabled_reason"),
        last_success_at: text(v, "last_success_at"),
        failing_since: text(v, "failing_since"),
    }
}

#[derive(Template)]
#[template(path = "console/webhooks.html")]
pub struct WebhooksPage {
    pub shell: Shell,
    pub endpoints: Vec<EndpointView>,
    pub secret: Option<String>,
}

#[derive(Deserialize, Default)]
pub struct DoneQuery {
    done: Option<String>,
    #[serde(default)]
    status: String,
}

/// `GET /console/webhooks`.
pub async fn list(viewer: Viewer, Query(q): Query<DoneQuery>) -> Response {
    match viewer.api.get(&viewer.caller, "/api/v1/webhooks").await {
        Ok(l) => render(WebhooksPage {
            shell: viewer.shell("Webhooks", "webhooks").with_notice(q.done.as_deref()),
            endpoints: items(&l, "").iter().map(endpoint).collect(),
            secret: None,
        }),
        Err(e) => viewer.failed(e, "webhooks"),
    }
}

pub struct DeliveryView {
    pub id: String,
    pub endpoint_id: String,
    pub event_type: String,
    pub status: String,
    pub attempts: i64,
    pub last_status_code: String,
    pub last_error: String,
    pub created_at: String,
    pub next_attempt_at: String,
}

fn delivery(d: &Value) -> DeliveryView {
    DeliveryView {
        id: text(d, "id"),
        endpoint_id: text(d, "endpoint_id"),
        event_type: text(d, "event_type"),
        status: text(d, "status"),
        attempts: int(d, "attempts"),
        last_status_code: text(d, "last_status_code"),
        last_error: text(d, "last_error"),
        created_at: text(d, "created_at"),
        next_attempt_at: text(d, "next_attempt_at"),
    }
}

#[derive(Template)]
#[template(path = "console/webhook.html")]
pub struct WebhookPage {
    pub shell: Shell,
    pub endpoint: EndpointView,
    pub deliveries: Vec<DeliveryView>,
    pub status: String,
    pub secret: Option<(String, String)>,
}

async fn webhook_page(
    viewer: &Viewer,
    id: Uuid,
    status: &str,
    secret: Option<(String, String)>,
    notice: Option<&str>,
) -> Response {
    let ep = match viewer.api.get(&viewer.caller, &format!("/api/v1/webhooks/{id}")).await {
        Ok(e) => e,
        Err(e) => return viewer.failed(e, "webhooks"),
    };
    let path = with_query(&format!("/api/v1/webhooks/{id}/deliveries"), &[("status", status), ("limit", "50")]);
    let deliveries = match viewer.api.get(&viewer.caller, &path).await {
        Ok(d) => d,
        Err(e) => return viewer.failed(e, "webhooks"),
    };
    render(WebhookPage {
        shell: viewer.shell("Webhook endpoint", "webhooks").with_notice(notice),
        endpoint: endpoint(&ep),
        deliveries: items(&deliveries, "").iter().map(delivery).collect(),
        status: status.to_owned(),
        secret,
    })
}

/// `GET /console/webhooks/{id}` (`?status=pending|succeeded|dead`).
pub async fn show(viewer: Viewer, Path(id): Path<Uuid>, Query(q): Query<DoneQuery>) -> Response {
    webhook_page(&viewer, id, &q.status, None, q.done.as_deref()).await
}

#[derive(Deserialize)]
pub struct Empty {}

/// `POST /console/webhooks/{id}/rotate-secret`: the new secret, shown on this response only.
pub async fn rotate_secret(Path(id): Path<Uuid>, Submitted { viewer, .. }: Submitted<Empty>) -> Response {
    match viewer.api.post_empty(&viewer.caller, &format!("/api/v1/webhooks/{id}/rotate-secret")).await {
        Ok(r) => {
            let secret = (text(&r, "secret"), text(&r, "previous_secret_expires_at"));
            webhook_page(&viewer, id, "", Some(secret), None).await
        }
        Err(e) => viewer.failed(e, "webhooks"),
    }
}

#[derive(Deserialize)]
pub struct ReplayForm {
    #[serde(default)]
    since: String,
    #[serde(default)]
    until: String,
}

/// `POST /console/webhooks/{id}/replay`.
pub async fn replay(Path(id): Path<Uuid>, Submitted { viewer, form }: Submitted<ReplayForm>) -> Response {
    let mut body = json!({ "since": form.since.trim() });
    if !form.until.trim().is_empty() {
        body["until"] = json!(form.until.trim());
    }
    match viewer.api.post(&viewer.caller, &format!("/api/v1/webhooks/{id}/replay"), &body).await {
        Ok(_) => done(&format!("/console/webhooks/{id}"), "replayed"),
        Err(e) => viewer.failed(e, "webhooks"),
    }
}

#[derive(Deserialize)]
pub struct RetryForm {
    /// The endpoint page to return to; without one, the dead letters.
    endpoint: Option<Uuid>,
}

/// `POST /console/webhooks/deliveries/{id}/retry`.
pub async fn retry(Path(id): Path<Uuid>, Submitted { viewer, form }: Submitted<RetryForm>) -> Response {
    match viewer.api.post_empty(&viewer.caller, &format!("/api/v1/webhooks/deliveries/{id}/retry")).await {
        Ok(_) => match form.endpoint {
            Some(endpoint) => done(&format!("/console/webhooks/{endpoint}"), "retried"),
            None => done("/console/webhooks/dead-letters", "retried"),
        },
        Err(e) => viewer.failed(e, "webhooks"),
    }
}

#[derive(Deserialize)]
pub struct EditForm {
    #[serde(default)]
    url: String,
    #[serde(default)]
    description: String,
    #[serde(default)]
    event_types: String,
    /// A checkbox: present when ticked.
    enabled: Option<String>,
}

/// `POST /console/webhooks/{id}`: changes the URL, description, event types and whether the
/// endpoint is enabled.
pub async fn edit(Path(id): Path<Uuid>, Submitted { viewer, form }: Submitted<EditForm>) -> Response {
    let body = json!({ "url": form.url.trim(), "description": form.description.trim(),
                       "event_types": split_list(&form.event_types), "enabled": form.enabled.is_some() });
    match viewer.api.patch(&viewer.caller, &format!("/api/v1/webhooks/{id}"), &body).await {
        Ok(_) => done(&format!("/console/webhooks/{id}"), "saved"),
        Err(e) => viewer.failed(e, "webhooks"),
    }
}

/// `POST /console/webhooks/{id}/delete`.
pub async fn delete(Path(id): Path<Uuid>, Submitted { viewer, .. }: Submitted<Empty>) -> Response {
    match viewer.api.delete(&viewer.caller, &format!("/api/v1/webhooks/{id}")).await {
        Ok(_) => done("/console/webhooks", "deleted"),
        Err(e) => viewer.failed(e, "webhooks"),
    }
}

/// `POST /console/webhooks/{id}/test`: a `webhook.test` event to this endpoint alone.
pub async fn test(Path(id): Path<Uuid>, Submitted { viewer, .. }: Submitted<Empty>) -> Response {
    match viewer.api.post_empty(&viewer.caller, &format!("/api/v1/webhooks/{id}/test")).await {
        Ok(_) => done(&format!("/console/webhooks/{id}"), "test_sent"),
        Err(e) => viewer.failed(e, "webhooks"),
    }
}

#[derive(Template)]
#[template(path = "console/dead_letters.html")]
pub struct DeadLettersPage {
    pub shell: Shell,
    pub deliveries: Vec<DeliveryView>,
    /// Endpoint id to URL, for the table.
    pub urls: std::collections::HashMap<String, String>,
}

impl DeadLettersPage {
    fn url_of(&self, endpoint: &str) -> String {
        self.urls.get(endpoint).cloned().unwrap_or_else(|| endpoint.to_owned())
    }
}

/// `GET /console/webhooks/dead-letters`: deliveries that gave up, across the endpoints.
pub async fn dead_letters(viewer: Viewer, Query(q): Query<DoneQuery>) -> Response {
    let (dead, endpoints) = tokio::join!(
        viewer.api.get(&viewer.caller, "/api/v1/webhooks/dead-letters?limit=200"),
        viewer.api.get(&viewer.caller, "/api/v1/webhooks"),
    );
    let dead = match dead {
        Ok(d) => d,
        Err(e) => return viewer.failed(e, "webhooks"),
    };
    let urls =
        endpoints.map(|l| items(&l, "").iter().map(|e| (text(e, "id"), text(e, "url"))).collect()).unwrap_or_default();
    render(DeadLettersPage {
        shell: viewer.shell("Dead letters", "webhooks").with_notice(q.done.as_deref()),
        deliveries: items(&dead, "").iter().map(delivery).collect(),
        urls,
    })
}

#[derive(Deserialize)]
pub struct CreateForm {
    #[serde(default)]
    url: String,
    #[serde(default)]
    description: String,
    #[serde(default)]
    event_types: String,
}

/// `POST /console/webhooks`: a new endpoint; its signing secret is shown on this response only.
pub async fn create(Submitted { viewer, form }: Submitted<CreateForm>) -> Response {
    let body = json!({ "url": form.url.trim(), "description": form.description.trim(),
                       "event_types": split_list(&form.event_types) });
    match viewer.api.post(&viewer.caller, "/api/v1/webhooks", &body).await {
        Ok(created) => {
            let list = viewer.api.get(&viewer.caller, "/api/v1/webhooks").await.unwrap_or(Value::Null);
            render(WebhooksPage {
                shell: viewer.shell("Webhooks", "webhooks"),
                endpoints: items(&list, "").iter().map(endpoint).collect(),
                secret: Some(text(&created, "secret")),
            })
        }
        Err(e) => viewer.failed(e, "webhooks"),
    }
}
