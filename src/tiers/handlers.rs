//! `GET /api/v1/tiers/status` and `POST /api/v1/tiers/upgrade`.

use axum::{Json, extract::State, http::StatusCode};
use serde::{Deserialize, Serialize};
use serde_json::json;
use time::OffsetDateTime;
use utoipa::ToSchema;
use uuid::Uuid;
use validator::Validate;

use super::{Overrides, Plan, org_tier, stripe};
use crate::{
    audit::{self, Event},
    auth::Actor,
    clock::{next_midnight, next_month},
    http::{ApiError, ApiResult, error::Problem, extract::ValidatedJson},
    state::AppState,
};

/// What the organization has used in the current periods.
#[derive(Debug, Serialize, ToSchema)]
pub struct TierUsage {
    /// Registered agents (against `max_agents`).
    pub agents: u64,
    /// API calls counted since 00:00 UTC today.
    pub api_calls_today: u64,
    /// Access tokens issued since 00:00 UTC today.
    pub tokens_today: u64,
    /// Access tokens issued since the first of this month (UTC).
    pub tokens_this_month: u64,
    /// True while Redis is unavailable: the counts are this instance's alone.
    pub approximate: bool,
}

/// When the counters start over.
#[derive(Debug, Serialize, ToSchema)]
pub struct TierResets {
    /// The next 00:00 UTC: daily API calls and tokens.
    #[serde(with = "time::serde::rfc3339")]
    pub daily_at: OffsetDateTime,
    /// The first of next month, 00:00 UTC: monthly tokens.
    #[serde(with = "time::serde::rfc3339")]
    pub monthly_at: OffsetDateTime,
}

/// How the organization can change plan.
#[derive(Debug, Serialize, ToSchema)]
pub struct TierBilling {
    /// Whether owners can upgrade through Stripe Checkout here.
    pub stripe_enabled: bool,
    /// Plans that can be bought through Stripe.
    pub purchasable_plans: Vec<String>,
}

/// The organization's plan, limits and current usage.
#[derive(Debug, Serialize, ToSchema)]
pub struct TierStatus {
    pub org_id: Uuid,
    pub plan: String,
    /// When the organization moved to this plan.
    #[serde(with = "time::serde::rfc3339")]
    pub since: OffsetDateTime,
    /// The effective limits: the plan's, with the organization's overrides applied.
    pub limits: Plan,
    /// The organization's own overrides, if any.
    pub overrides: Overrides,
    pub usage: TierUsage,
    pub resets: TierResets,
    pub billing: TierBilling,
}

/// The organization's plan, limits, today's and this month's usage, and when counters reset.
#[utoipa::path(get, path = "/api/v1/tiers/status", tag = "tiers",
    security(("bearer" = []), ("api_key" = []), ("session_cookie" = [])),
    responses((status = 200, body = TierStatus), (status = 400, body = Problem), (status = 401, body = Problem),
              (status = 403, body = Problem)))]
pub(super) async fn status(State(state): State<AppState>, actor: Actor) -> ApiResult<Json<TierStatus>> {
    let org_id = actor.current_org()?;
    Ok(Json(status_of(&state, org_id).await?))
}

async fn status_of(state: &AppState, org_id: Uuid) -> ApiResult<TierStatus> {
    let tier = org_tier(state, org_id).await;
    let now = state.clock().now();
    let usage = state.tiers().limiter.usage(state.redis(), org_id, now).await;
    let agents = crate::auth::agents::count(state.db(), org_id).await?;
    let stripe = &state.config().tiers.stripe;
    Ok(TierStatus {
        org_id,
        plan: tier.plan.clone(),
        since: tier.since,
        limits: tier.limits.clone(),
        overrides: tier.overrides.clone(),
        usage: TierUsage {
            agents,
            api_calls_today: usage.calls_today,
            tokens_today: usage.tokens_today,
            tokens_this_month: usage.tokens_this_month,
            approximate: usage.approximate,
        },
        resets: TierResets { daily_at: next_midnight(now), monthly_at: next_month(now) },
        billing: TierBilling {
            stripe_enabled: stripe.enabled(),
            purchasable_plans: if stripe.enabled() { stripe.prices.keys().cloned().collect() } else { vec![] },
        },
    })
}

/// A plan change.
#[derive(Debug, Deserialize, Validate, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpgradeRequest {
    /// A configured plan: `free`, `pro`, `enterprise`, or one of this deployment's own.
    #[validate(length(min = 1, max = 63))]
    pub plan: String,
    /// Per-organization limits on top of the plan (system admins only). Replaces earlier overrides;
    /// `{}` removes them.
    pub overrides: Option<Overrides>,
}

/// What an upgrade did.
#[derive(Debug, Serialize, ToSchema)]
pub struct UpgradeResult {
    /// True when the plan is in force now (system admins); false when payment comes first.
    pub applied: bool,
    pub plan: String,
    /// Where the owner pays; the plan applies when Stripe reports the checkout completed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub checkout_url: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub checkout_session_id: Option<String>,
    /// The new status, when applied.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<TierStatus>,
}

/// Changes the organization's plan. A system admin sets it (and optional overrides) directly; with
/// Stripe configured, an owner gets a Stripe Checkout URL and the plan applies once paid.
#[utoipa::path(post, path = "/api/v1/tiers/upgrade", tag = "tiers", request_body = UpgradeRequest,
    security(("bearer" = []), ("api_key" = []), ("session_cookie" = [])),
    responses(
        (status = 200, description = "Applied (system admin)", body = UpgradeResult),
        (status = 202, description = "Checkout created: pay at checkout_url", body = UpgradeResult),
        (status = 403, body = Problem), (status = 409, body = Problem), (status = 422, body = Problem),
        (status = 502, description = "Stripe did not answer as expected", body = Problem)))]
pub(super) async fn upgrade(
    State(state): State<AppState>,
    actor: Actor,
    ValidatedJson(req): ValidatedJson<UpgradeRequest>,
) -> ApiResult<(StatusCode, Json<UpgradeResult>)> {
    let org_id = actor.current_org()?;
    let cfg = &state.config().tiers;
    if !cfg.plans.contains_key(&req.plan) {
        let known = cfg.plans.keys().cloned().collect::<Vec<_>>().join(", ");
        return Err(ApiError::field(
            "plan",
            "unknown_plan",
            format!("Not a plan of this deployment; one of: {known}."),
        ));
    }
    if let Some(problem) = req.overrides.as_ref().and_then(Overrides::problem) {
        return Err(ApiError::field("overrides.rate_limit", "range", problem));
    }
    if actor.is_system_admin() {
        let mut tx = state.db().begin().await?;
        let old = sqlx::query_scalar!("select plan from tenant_tier where organization_id = $1 for update", org_id)
            .fetch_optional(&mut *tx)
            .await?
            .ok_or(ApiError::NotFound)?;
        let overrides = req.overrides.as_ref().map(serde_json::to_value).transpose().map_err(anyhow::Error::from)?;
        sqlx::query!(
            "update tenant_tier set plan = $2, overrides = coalesce($3, overrides),
                    since = case when plan is distinct from $2 then now() else since end
             where organization_id = $1",
            org_id,
            req.plan,
            overrides
        )
        .execute(&mut *tx)
        .await?;
        let from = old.unwrap_or_else(|| cfg.default_plan.clone());
        let data = json!({ "from": from, "to": req.plan, "source": "admin" });
        crate::events::emit(&mut tx, org_id, "tier.changed", format!("organizations/{org_id}/tier"), data).await?;
        let event = Event::by(&actor, org_id, "tier.plan_changed").target("organization", org_id).details(json!({
            "from": from,
            "to": req.plan,
            "overrides": req.overrides,
            "source": "admin",
        }));
        audit::record(&mut tx, event).await?;
        tx.commit().await?;
        super::announce(&state, org_id).await;
        let status = status_of(&state, org_id).await?;
        return Ok((
            StatusCode::OK,
            Json(UpgradeResult {
                applied: true,
                plan: req.plan,
                checkout_url: None,
                checkout_session_id: None,
                status: Some(status),
            }),
        ));
    }
    if req.overrides.is_some() {
        return Err(ApiError::forbidden(
            "overrides_require_admin",
            "Only a system admin sets per-organization limits.",
        ));
    }
    let stripe_cfg = &cfg.stripe;
    if !stripe_cfg.enabled() {
        return Err(ApiError::forbidden(
            "billing_not_configured",
            "Self-service upgrades are not configured here; a system admin changes plans.",
        ));
    }
    let Some(price) = stripe_cfg.prices.get(&req.plan) else {
        return Err(ApiError::Conflict {
            code: "plan_not_purchasable",
            detail: format!("The {} plan cannot be bought through checkout here.", req.plan).into(),
        });
    };
    let current = org_tier(&state, org_id).await;
    if current.plan == req.plan {
        return Err(ApiError::Conflict {
            code: "already_on_plan",
            detail: format!("The organization is on the {} plan already.", req.plan).into(),
        });
    }
    let billing = sqlx::query!(
        "select stripe_customer_id, stripe_subscription_id from tenant_tier where organization_id = $1",
        org_id
    )
    .fetch_optional(state.db())
    .await?
    .ok_or(ApiError::NotFound)?;
    if billing.stripe_subscription_id.is_some() {
        // A second checkout would start a second subscription beside the first.
        return Err(ApiError::Conflict {
            code: "subscription_exists",
            detail: "The organization already pays through a Stripe subscription; change it there, or ask a system \
                     admin."
                .into(),
        });
    }
    let session =
        stripe::create_checkout(&state, org_id, &req.plan, price, billing.stripe_customer_id.as_deref()).await?;
    let mut tx = state.db().begin().await?;
    let event = Event::by(&actor, org_id, "tier.checkout_created")
        .target("organization", org_id)
        .details(json!({ "plan": req.plan, "checkout_session_id": session.id }));
    audit::record(&mut tx, event).await?;
    tx.commit().await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(UpgradeResult {
            applied: false,
            plan: req.plan,
            checkout_url: Some(session.url),
            checkout_session_id: Some(session.id),
            status: None,
        }),
    ))
}
