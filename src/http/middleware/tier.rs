//! Layer 4, tier enforcement: the organization's daily call quota and the caller's rate limit,
//! checked and counted in one Redis round trip (see [`crate::tiers::limiter`]).
//!
//! Every request on a protected route by an identified caller in an organization is charged: the
//! client's bucket (per API key, OAuth client or user) and the organization's calls for the UTC
//! day. The tier routes themselves do not count against the daily quota, so that an organization
//! over it can still see why and upgrade. Over a limit: 429 problem+json with `Retry-After`; every
//! charged response carries the rate-limit headers. Anonymous requests pass untouched (the login
//! throttle and the token endpoint's own charge cover those).

use axum::{
    extract::{MatchedPath, Request, State},
    middleware::Next,
    response::{IntoResponse, Response},
};

use super::org_context::{Identified, OrgChoice};
use crate::{
    auth::{Credential, Principal, is_public},
    http::ApiError,
    state::AppState,
    tiers::{self, Charge, Refusal},
};

/// One charge shared by the API calls the console makes for one page view, set on those calls in
/// process only (no outside request can carry an extension): the first counted call charges the
/// rate limit and the daily quota, and every other counted call of the page waits for and shares
/// its outcome, a refusal included. So a page counts as one call, however many it makes.
#[derive(Clone, Default, Debug)]
pub struct OneCharge(pub std::sync::Arc<tokio::sync::OnceCell<tiers::Outcome>>);

/// Whose bucket a request draws from.
fn client_of(p: &Principal) -> String {
    match &p.credential {
        Credential::ApiKey { key_id, .. } => format!("key:{key_id}"),
        Credential::AccessToken { claims, .. } => format!("client:{}", claims.client_id),
        Credential::Session { .. } => format!("user:{}", p.user_id),
    }
}

pub async fn layer(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let route = req.extensions().get::<MatchedPath>().map(|p| p.as_str());
    if is_public(route) {
        return next.run(req).await;
    }
    let counted = route.is_some_and(|r| !tiers::UNCOUNTED_ROUTES.contains(&r));
    let (org, client) = match req.extensions().get::<Identified>() {
        Some(Identified { principal: Ok(p), org: OrgChoice::Chosen(Some(org)) }) => (*org, client_of(p)),
        _ => return next.run(req).await,
    };
    let tier = tiers::org_tier(&state, org).await;
    let charge = Charge {
        org,
        client: &client,
        rate: tier.limits.rate_limit,
        calls: counted.then_some(tier.limits.api_calls_per_day),
        tokens: None,
    };
    let shared = req.extensions().get::<OneCharge>().filter(|_| counted).cloned();
    let limiter = &state.tiers().limiter;
    let outcome = match shared {
        Some(one) => one.0.get_or_init(|| limiter.charge(state.redis(), state.clock().now(), &charge)).await.clone(),
        None => limiter.charge(state.redis(), state.clock().now(), &charge).await,
    };
    let headers = tiers::headers(&tier.limits, &charge, &outcome);
    let mut response = match outcome.refused {
        Some(refusal) => {
            let code = match refusal {
                Refusal::Rate => "rate_limited",
                _ => "daily_quota_exceeded",
            };
            let retry_after =
                headers.get("retry-after").and_then(|v| v.to_str().ok()).and_then(|v| v.parse().ok()).unwrap_or(1);
            ApiError::TooManyRequests { code, detail: tiers::refusal_detail(refusal, &tier).into(), retry_after }
                .into_response()
        }
        None => next.run(req).await,
    };
    response.headers_mut().extend(headers);
    response
}
