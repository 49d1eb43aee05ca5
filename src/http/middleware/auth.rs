//! Layer 5, auth: on protected routes, requires a valid principal and builds the [`Actor`].
//!
//! Which routes are public is declared once, in [`crate::auth::PUBLIC_ROUTES`]. A missing or bad
//! credential on any other route is 401 problem+json with `WWW-Authenticate`; an organization the
//! caller does not belong to is 403; Postgres being away while resolving is 503.

use axum::{
    extract::{MatchedPath, Request, State},
    middleware::Next,
    response::{IntoResponse, Response},
};

use super::org_context::{Identified, OrgChoice};
use crate::{
    auth::{Actor, Credential, credentials::Failure, is_public},
    http::ApiError,
    state::AppState,
};

pub async fn layer(State(state): State<AppState>, mut req: Request, next: Next) -> Response {
    if is_public(req.extensions().get::<MatchedPath>().map(|p| p.as_str())) {
        // A public route may still use a valid credential (introspection by an admin key).
        if let Some(Identified { principal: Ok(principal), org: OrgChoice::Chosen(org_id) }) =
            req.extensions().get::<Identified>().cloned()
        {
            let actor_type = principal.actor_type;
            req.extensions_mut().insert(Actor { principal, actor_type, org_id });
        }
        return next.run(req).await;
    }
    let Some(identified) = req.extensions().get::<Identified>().cloned() else {
        return ApiError::unauthorized("Authentication is required.").into_response();
    };
    let principal = match identified.principal {
        Ok(p) => p,
        Err(Failure::Invalid) => {
            return ApiError::Unauthorized {
                detail: "The credential is invalid, expired or revoked.".into(),
                challenge: "Bearer error=\"invalid_token\"",
            }
            .into_response();
        }
        Err(Failure::Unavailable) => return ApiError::Unavailable("credential store".into()).into_response(),
        Err(Failure::Throttled) => {
            return ApiError::TooManyRequests {
                code: "credential_lookups_exceeded",
                detail: "Too many unknown credentials from this address; slow down.".into(),
                retry_after: 60,
            }
            .into_response();
        }
    };
    let org_id = match identified.org {
        OrgChoice::Chosen(o) => o,
        OrgChoice::Malformed => {
            return ApiError::bad_request("invalid_org_header", "X-Org-Id must be an organization id (UUID).")
                .into_response();
        }
        OrgChoice::NotMember => {
            return ApiError::forbidden("org_not_member", "You are not a member of the organization in X-Org-Id.")
                .into_response();
        }
    };
    if let Credential::ApiKey { key_id, .. } = &principal.credential {
        state.auth().last_used.touch(*key_id);
    }
    let actor_type = principal.actor_type;
    req.extensions_mut().insert(Actor { principal, actor_type, org_id });
    next.run(req).await
}
