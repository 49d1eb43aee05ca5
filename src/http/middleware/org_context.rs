//! Layer 2, org context: identifies the caller's credentials cheaply and picks the organization.
//!
//! The presented secret (by priority: `X-API-Key`, `Authorization: Bearer`, session cookie) is
//! resolved: a JWT access token through the verified-token cache and the revocation set, a session
//! or API key through the in-process credential cache, falling back to a lookup by hash. The outcome
//! is attached to the request as [`Identified`]; a bad credential is not an error here, so public
//! routes keep working. The auth layer decides what a protected route makes of it.

use std::sync::Arc;

use axum::{
    extract::{Request, State},
    middleware::Next,
    response::Response,
};
use uuid::Uuid;

use crate::{
    auth::{
        Principal,
        credentials::{self, Failure},
    },
    state::AppState,
};

/// Why the requested organization cannot be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OrgChoice {
    Chosen(Option<Uuid>),
    /// `X-Org-Id` is not a UUID.
    Malformed,
    /// The caller is not a member of the requested organization.
    NotMember,
}

/// What the org-context layer found on the request.
#[derive(Debug, Clone)]
pub struct Identified {
    pub principal: Result<Arc<Principal>, Failure>,
    pub org: OrgChoice,
}

/// The organization a request acts in: `X-Org-Id` (untrusted), else the credential's own or the
/// first membership's.
pub fn choose_org(principal: &Principal, header: Option<&str>) -> OrgChoice {
    let requested = match header {
        None => None,
        Some(h) => match h.trim().parse::<Uuid>() {
            Ok(id) => Some(id),
            Err(_) => return OrgChoice::Malformed,
        },
    };
    match (principal.credential.bound_org(), requested) {
        (Some(bound), None) => OrgChoice::Chosen(Some(bound)),
        (Some(bound), Some(r)) if r == bound => OrgChoice::Chosen(Some(r)),
        (Some(_), Some(_)) => OrgChoice::NotMember,
        (None, None) => OrgChoice::Chosen(principal.memberships.first().map(|(o, _)| *o)),
        (None, Some(r)) => {
            if principal.system_admin || principal.memberships.iter().any(|(o, _)| *o == r) {
                OrgChoice::Chosen(Some(r))
            } else {
                OrgChoice::NotMember
            }
        }
    }
}

pub async fn layer(State(state): State<AppState>, mut req: Request, next: Next) -> Response {
    let send_nonce = crate::auth::oidc::dpop::wants_nonce(&state, req.headers());
    if let Some(secret) = credentials::presented(req.headers()) {
        let principal = if crate::auth::tokens::looks_like_jwt(&secret) {
            match crate::auth::oauth::resolve_access_token(&state, &secret).await {
                Ok(p) => {
                    let route = req.extensions().get::<axum::extract::MatchedPath>().map(|m| m.as_str().to_owned());
                    let (method, path) = (req.method().clone(), req.uri().path().to_owned());
                    crate::auth::oidc::dpop::check_bound(
                        &state,
                        req.headers(),
                        &method,
                        &path,
                        route.as_deref(),
                        &secret,
                        p,
                    )
                    .await
                }
                Err(e) => Err(e),
            }
        } else {
            credentials::resolve(state.db(), &state.auth().cache, &state.auth().lookups, &secret).await
        };
        let org = match &principal {
            Ok(p) => choose_org(p, req.headers().get("x-org-id").map(|v| v.to_str().unwrap_or("-"))),
            Err(_) => OrgChoice::Chosen(None),
        };
        req.extensions_mut().insert(Identified { principal, org });
    }
    let mut response = next.run(req).await;
    if send_nonce {
        crate::auth::oidc::dpop::add_nonce(&state, response.headers_mut());
    }
    response
}
