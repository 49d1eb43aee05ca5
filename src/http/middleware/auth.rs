//! Layer 5, auth: on protected routes, requires a valid principal and builds the [`Actor`].
//!
//! Which routes are public is declared once, in [`crate::auth::PUBLIC_ROUTES`]. A missing or bad
//! credential on any other route is 401 problem+json with `WWW-Authenticate`; an organization the
//! caller does not belong to is 403; Postgres being away while resolving is 503. The challenges of
//! the layers below are completed here (`resource_metadata`, `insufficient_scope` with the scope).

use axum::{
    extract::{MatchedPath, Request, State},
    http::{HeaderValue, StatusCode, header},
    middleware::Next,
    response::{IntoResponse, Response},
};

use super::org_context::{Identified, OrgChoice};
use crate::{
    auth::{Actor, Credential, credentials::Failure, is_public},
    http::{ApiError, error::InsufficientScope},
    policy::routes::rule_for,
    state::AppState,
};

/// Runs the layer, then completes its challenges: every Bearer 401 names the protected-resource
/// metadata (RFC 9728 §5.1), and a 403 for a missing scope, to a caller that sent a bearer token,
/// carries `Bearer error="insufficient_scope", scope="<needed>"` (RFC 6750 §3.1).
pub async fn layer(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let bearer = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.len() > 7 && v[..7].eq_ignore_ascii_case("bearer "));
    let needed = req
        .extensions()
        .get::<MatchedPath>()
        .and_then(|p| rule_for(req.method().as_str(), p.as_str()))
        .map(|r| r.scope)
        .filter(|s| !s.is_empty());
    let mut response = authenticate(state.clone(), req, next).await;
    // Only refusals carry a challenge; a served request builds no strings here.
    if !matches!(response.status(), StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN) {
        return response;
    }
    let metadata = format!("{}/.well-known/oauth-protected-resource", state.config().server.public_url);
    let challenge = match response.status() {
        StatusCode::UNAUTHORIZED => response
            .headers()
            .get(header::WWW_AUTHENTICATE)
            .and_then(|v| v.to_str().ok())
            .filter(|c| c.starts_with("Bearer") || c.starts_with("DPoP"))
            .map(|c| match c.strip_prefix("Bearer").map(str::trim) {
                Some("") => format!("Bearer resource_metadata=\"{metadata}\""),
                _ => format!("{c}, resource_metadata=\"{metadata}\""),
            }),
        StatusCode::FORBIDDEN if bearer && response.extensions().get::<InsufficientScope>().is_some() => {
            Some(match needed {
                Some(scope) => {
                    format!("Bearer error=\"insufficient_scope\", scope=\"{scope}\", resource_metadata=\"{metadata}\"")
                }
                None => format!("Bearer error=\"insufficient_scope\", resource_metadata=\"{metadata}\""),
            })
        }
        _ => None,
    };
    if let Some(value) = challenge.and_then(|c| HeaderValue::from_str(&c).ok()) {
        response.headers_mut().insert(header::WWW_AUTHENTICATE, value);
    }
    response
}

async fn authenticate(state: AppState, mut req: Request, next: Next) -> Response {
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
        Err(Failure::DpopProof) => {
            return ApiError::Unauthorized {
                detail: "The token is DPoP-bound: send it with the DPoP scheme and a valid proof of its key.".into(),
                challenge: "DPoP error=\"invalid_dpop_proof\", algs=\"ES256 RS256 EdDSA\"",
            }
            .into_response();
        }
        Err(Failure::DpopNonce) => {
            // The org-context layer adds the nonce to send (`DPoP-Nonce`).
            return ApiError::Unauthorized {
                detail: "Send the server's nonce (DPoP-Nonce) in the DPoP proof.".into(),
                challenge: "DPoP error=\"use_dpop_nonce\", error_description=\"Resource server requires nonce in DPoP proof\", algs=\"ES256 RS256 EdDSA\"",
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
