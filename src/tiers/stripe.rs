//! Stripe: Checkout Sessions for self-service upgrades, and the webhook that applies a paid plan.
//!
//! The webhook trusts nothing but the `Stripe-Signature` header: HMAC-SHA256 with the endpoint's
//! signing secret over `"{t}.{raw body}"`, compared in constant time against every `v1` value,
//! with `t` within `tiers.stripe.webhook_tolerance_secs` of now. Each event id is applied once
//! (`stripe_event`); a replay is acknowledged with 200 and changes nothing, because Stripe retries
//! any non-2xx answer for days.

use std::time::Duration;

use axum::{Json, body::Bytes, extract::State, http::HeaderMap};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use utoipa::ToSchema;
use uuid::Uuid;

use crate::{
    audit::{self, Event},
    http::{ApiError, ApiResult, error::Problem},
    state::AppState,
};

/// A created Checkout Session.
#[derive(Debug, Deserialize)]
pub struct CheckoutSession {
    pub id: String,
    pub url: String,
}

/// Creates a subscription Checkout Session for `plan`; the webhook applies it when paid.
pub async fn create_checkout(
    state: &AppState,
    org: Uuid,
    plan: &str,
    price: &str,
    customer: Option<&str>,
) -> ApiResult<CheckoutSession> {
    let cfg = &state.config().tiers.stripe;
    let org_s = org.to_string();
    let mut form: Vec<(&str, &str)> = vec![
        ("mode", "subscription"),
        ("line_items[0][price]", price),
        ("line_items[0][quantity]", "1"),
        ("success_url", &cfg.success_url),
        ("cancel_url", &cfg.cancel_url),
        ("client_reference_id", &org_s),
        ("metadata[org_id]", &org_s),
        ("metadata[plan]", plan),
        ("subscription_data[metadata][org_id]", &org_s),
        ("subscription_data[metadata][plan]", plan),
    ];
    if let Some(c) = customer {
        form.push(("customer", c));
    }
    let unavailable = || ApiError::Status {
        status: axum::http::StatusCode::BAD_GATEWAY,
        code: "billing_unavailable",
        detail: "The payment provider did not create a checkout; try again shortly.".into(),
    };
    let response = state
        .http_client()
        .post(format!("{}/v1/checkout/sessions", cfg.api_base))
        .bearer_auth(cfg.secret_key.expose())
        .header("Idempotency-Key", Uuid::new_v4().to_string())
        .form(&form)
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .map_err(|e| {
            tracing::warn!(error = %e.without_url(), "Stripe: checkout request failed");
            unavailable()
        })?;
    let status = response.status();
    let body: Value = response.json().await.unwrap_or(Value::Null);
    if !status.is_success() {
        let message = body.pointer("/error/message").and_then(Value::as_str).unwrap_or("-");
        tracing::warn!(%status, message, "Stripe: checkout refused");
        return Err(unavailable());
    }
    serde_json::from_value(body).map_err(|e| {
        tracing::warn!(error = %e, "Stripe: checkout answer without id and url");
        unavailable()
    })
}

/// The parsed `Stripe-Signature` header.
struct Signature {
    timestamp: i64,
    v1: Vec<Vec<u8>>,
}

fn parse_signature(header: &str) -> Option<Signature> {
    let mut timestamp = None;
    let mut v1 = Vec::new();
    for part in header.split(',') {
        let (k, v) = part.trim().split_once('=')?;
        match k {
            "t" => timestamp = Some(v.parse::<i64>().ok()?),
            // A few candidates suffice (Stripe sends one per active secret); more is a waste of time.
            "v1" if v1.len() < 8 => {
                if let Ok(sig) = hex::decode(v) {
                    v1.push(sig);
                }
            }
            _ => {}
        }
    }
    Some(Signature { timestamp: timestamp?, v1 })
}

/// Why a delivery was refused.
#[derive(Debug, PartialEq, Eq)]
enum Rejected {
    Malformed,
    BadSignature,
    Stale,
}

/// Verifies a delivery: the signature over `"{t}.{body}"`, then the timestamp's age.
fn verify(secret: &str, header: Option<&str>, body: &[u8], now: i64, tolerance: i64) -> Result<(), Rejected> {
    let sig = header.and_then(parse_signature).ok_or(Rejected::Malformed)?;
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_bytes());
    let mut ctx = ring::hmac::Context::with_key(&key);
    ctx.update(sig.timestamp.to_string().as_bytes());
    ctx.update(b".");
    ctx.update(body);
    let expected = ctx.sign();
    // Computed once, compared in constant time with each candidate.
    if !sig.v1.iter().fold(false, |ok, candidate| ok | crate::crypto::ct_eq(expected.as_ref(), candidate)) {
        return Err(Rejected::BadSignature);
    }
    if now.abs_diff(sig.timestamp) > tolerance.unsigned_abs() {
        return Err(Rejected::Stale);
    }
    Ok(())
}

/// The webhook's acknowledgement.
#[derive(Debug, Serialize, ToSchema)]
pub struct WebhookAck {
    pub received: bool,
    /// True when this event id was applied before; nothing changed this time.
    pub duplicate: bool,
    /// What the event did: `applied`, `downgraded`, or `ignored: <why>`.
    pub outcome: String,
}

/// Stripe's event deliveries. Applies the plan on `checkout.session.completed` (when paid) and
/// `checkout.session.async_payment_succeeded`; returns to the default plan on
/// `customer.subscription.deleted`. Other events are acknowledged and ignored.
#[utoipa::path(post, path = "/api/v1/billing/stripe/webhook", tag = "tiers",
    request_body(content = Object, content_type = "application/json", description = "A Stripe event"),
    params(("Stripe-Signature" = String, Header, description = "t=<unix time>,v1=<hex HMAC-SHA256>")),
    responses(
        (status = 200, body = WebhookAck),
        (status = 400, description = "Missing or bad signature, stale timestamp, malformed event", body = Problem),
        (status = 404, description = "Stripe webhooks are not configured", body = Problem)))]
pub(super) async fn webhook(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult<Json<WebhookAck>> {
    let cfg = &state.config().tiers.stripe;
    if cfg.webhook_secret.is_empty() {
        return Err(ApiError::NotFound);
    }
    let header = headers.get("stripe-signature").and_then(|v| v.to_str().ok());
    let now = state.clock().now().unix_timestamp();
    verify(cfg.webhook_secret.expose(), header, &body, now, cfg.webhook_tolerance_secs as i64).map_err(|r| {
        metrics::counter!("stripe_webhook_rejected_total", "reason" => format!("{r:?}").to_lowercase()).increment(1);
        match r {
            Rejected::Malformed => ApiError::bad_request(
                "invalid_signature_header",
                "The Stripe-Signature header is missing or malformed (t=<time>,v1=<signature>).",
            ),
            Rejected::BadSignature => {
                ApiError::bad_request("invalid_signature", "No signature matches the payload and the signing secret.")
            }
            Rejected::Stale => ApiError::bad_request(
                "timestamp_outside_tolerance",
                "The signature's timestamp is too far from now; a replayed delivery is refused.",
            ),
        }
    })?;
    let event: Value = serde_json::from_slice(&body)
        .map_err(|_| ApiError::bad_request("invalid_event", "The payload is not a JSON Stripe event."))?;
    let (Some(id), Some(kind)) = (event.get("id").and_then(Value::as_str), event.get("type").and_then(Value::as_str))
    else {
        return Err(ApiError::bad_request("invalid_event", "The event has no id or type."));
    };
    if id.is_empty() || id.len() > 255 || kind.len() > 255 {
        return Err(ApiError::bad_request("invalid_event", "The event id or type is not plausible."));
    }
    let object = event.pointer("/data/object").cloned().unwrap_or(Value::Null);

    let mut tx = state.db().begin().await?;
    // A concurrent delivery of the same id waits here for ours to commit, then sees it.
    let fresh = sqlx::query_scalar!(
        "insert into stripe_event (event_id, event_type, outcome) values ($1, $2, 'received')
         on conflict (event_id) do nothing returning event_id",
        id,
        kind
    )
    .fetch_optional(&mut *tx)
    .await?
    .is_some();
    if !fresh {
        tracing::info!(event_id = id, "Stripe: event delivered again; already handled");
        return Ok(Json(WebhookAck { received: true, duplicate: true, outcome: "already handled".into() }));
    }
    let (org, outcome) = apply(&state, &mut tx, id, kind, &object).await?;
    sqlx::query!("update stripe_event set outcome = $2, organization_id = $3 where event_id = $1", id, outcome, org)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    if let Some(org) = org {
        super::announce(&state, org).await;
    }
    tracing::info!(event_id = id, event_type = kind, outcome = %outcome, "Stripe: event handled");
    Ok(Json(WebhookAck { received: true, duplicate: false, outcome }))
}

/// What an event does, inside the delivery's transaction.
async fn apply(
    state: &AppState,
    tx: &mut sqlx::PgConnection,
    event_id: &str,
    kind: &str,
    object: &Value,
) -> ApiResult<(Option<Uuid>, String)> {
    let text = |path: &str| object.pointer(path).and_then(Value::as_str).map(str::to_owned);
    match kind {
        "checkout.session.completed" | "checkout.session.async_payment_succeeded" => {
            let paid = kind.ends_with("async_payment_succeeded")
                || matches!(text("/payment_status").as_deref(), Some("paid" | "no_payment_required"));
            if !paid {
                return Ok((None, "ignored: not paid yet".into()));
            }
            let Some(org) = text("/client_reference_id").and_then(|s| s.parse::<Uuid>().ok()) else {
                return Ok((None, "ignored: no organization".into()));
            };
            let Some(plan) = text("/metadata/plan").filter(|p| state.config().tiers.plans.contains_key(p)) else {
                return Ok((None, "ignored: unknown plan".into()));
            };
            let old = sqlx::query_scalar!("select plan from tenant_tier where organization_id = $1 for update", org)
                .fetch_optional(&mut *tx)
                .await?;
            let Some(old) = old else {
                return Ok((None, "ignored: unknown organization".into()));
            };
            sqlx::query!(
                "update tenant_tier set plan = $2, since = case when plan is distinct from $2 then now() else since end,
                        stripe_customer_id = coalesce($3, stripe_customer_id),
                        stripe_subscription_id = coalesce($4, stripe_subscription_id)
                 where organization_id = $1",
                org,
                plan,
                text("/customer"),
                text("/subscription")
            )
            .execute(&mut *tx)
            .await?;
            record(state, tx, org, old, Some(&plan), event_id).await?;
            Ok((Some(org), "applied".into()))
        }
        "customer.subscription.deleted" => {
            let Some(subscription) = text("/id") else {
                return Ok((None, "ignored: no subscription id".into()));
            };
            let row = sqlx::query!(
                "select organization_id, plan from tenant_tier where stripe_subscription_id = $1 for update",
                subscription
            )
            .fetch_optional(&mut *tx)
            .await?;
            let Some(row) = row else {
                return Ok((None, "ignored: unknown subscription".into()));
            };
            sqlx::query!(
                "update tenant_tier set plan = null, since = now(), stripe_subscription_id = null where organization_id = $1",
                row.organization_id
            )
            .execute(&mut *tx)
            .await?;
            record(state, tx, row.organization_id, row.plan, None, event_id).await?;
            Ok((Some(row.organization_id), "downgraded".into()))
        }
        _ => Ok((None, "ignored: event type".into())),
    }
}

async fn record(
    state: &AppState,
    tx: &mut sqlx::PgConnection,
    org: Uuid,
    from: Option<String>,
    to: Option<&str>,
    event_id: &str,
) -> Result<(), sqlx::Error> {
    let default = &state.config().tiers.default_plan;
    let data = json!({ "from": from.as_deref().unwrap_or(default), "to": to.unwrap_or(default), "source": "stripe" });
    crate::events::emit(tx, org, "tier.changed", format!("organizations/{org}/tier"), data).await?;
    let event = Event::anonymous(org, "tier.plan_changed")
        .actor("service:stripe".into(), "service")
        .target("organization", org)
        .details(json!({
            "from": from.as_deref().unwrap_or(default),
            "to": to.unwrap_or(default),
            "source": "stripe",
            "stripe_event_id": event_id,
        }));
    audit::record(tx, event).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sign(secret: &str, t: i64, body: &str) -> String {
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_bytes());
        hex::encode(ring::hmac::sign(&key, format!("{t}.{body}").as_bytes()).as_ref())
    }

    #[test]
    fn signatures_are_checked_before_the_clock() {
        let body = r#"{"id":"evt_1"}"#;
        let good = format!("t=1000,v1={}", sign("whsec_x", 1000, body));
        assert_eq!(verify("whsec_x", Some(&good), body.as_bytes(), 1100, 300), Ok(()));
        assert_eq!(verify("whsec_x", Some(&good), body.as_bytes(), 1400, 300), Err(Rejected::Stale));
        assert_eq!(verify("whsec_y", Some(&good), body.as_bytes(), 1100, 300), Err(Rejected::BadSignature));
        assert_eq!(verify("whsec_x", Some(&good), b"{}", 1100, 300), Err(Rejected::BadSignature));
        // One good signature among several (a secret being rolled) is enough.
        let rolled = format!("t=1000,v1=00ff,v1={},v0=abc", sign("whsec_x", 1000, body));
        assert_eq!(verify("whsec_x", Some(&rolled), body.as_bytes(), 1000, 300), Ok(()));
        for bad in ["", "t=abc,v1=00", "v1=00", "garbage"] {
            assert_eq!(verify("whsec_x", Some(bad), body.as_bytes(), 1000, 300), Err(Rejected::Malformed), "{bad}");
        }
        assert_eq!(verify("whsec_x", None, body.as_bytes(), 1000, 300), Err(Rejected::Malformed));
    }
}
