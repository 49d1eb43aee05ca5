//! Identity: organizations, humans and memberships, sessions, API keys, the credentials the
//! org-context and auth layers resolve, and the first-run bootstrap.

mod actor;
pub mod bootstrap;
pub mod credentials;
pub mod model;
mod orgs;
mod sessions;
mod throttle;

use std::{sync::Arc, time::Duration};

use utoipa_axum::{router::OpenApiRouter, routes};

pub use actor::{Actor, ActorIdentity, ActorType, Role, Scope};
pub use credentials::{Credential, CredentialCache, LastUsed, Principal};
pub use orgs::{slugify, valid_slug};
pub use throttle::LoginThrottle;

use crate::{app::AppState, config::AuthConfig};

/// Per-process identity state: the credential cache, the login throttle, pending `last_used` times.
pub struct AuthState {
    pub cache: Arc<CredentialCache>,
    pub throttle: LoginThrottle,
    pub last_used: LastUsed,
}

impl AuthState {
    pub fn new(cfg: &AuthConfig) -> Self {
        Self {
            cache: Arc::new(CredentialCache::new(Duration::from_secs(cfg.credential_cache_secs))),
            throttle: LoginThrottle::new(cfg.clone()),
            last_used: LastUsed::default(),
        }
    }
}

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(sessions::login))
        .routes(routes!(sessions::me))
        .routes(routes!(sessions::logout))
        .routes(routes!(sessions::set_password))
        .routes(routes!(sessions::create_api_key, sessions::list_api_keys))
        .routes(routes!(sessions::delete_api_key))
        .routes(routes!(orgs::create_org, orgs::list_orgs))
        .routes(routes!(orgs::get_org))
        .routes(routes!(orgs::list_members, orgs::add_member))
        .routes(routes!(orgs::update_member, orgs::remove_member))
}

/// Routes anyone may call; every other route requires a principal.
pub const PUBLIC_ROUTES: &[&str] =
    &["/health", "/ready", "/metrics", "/openapi.json", "/auth/login", "/auth/set-password"];

/// Whether a matched route template is public (Swagger UI's assets and unknown paths are).
pub fn is_public(route: Option<&str>) -> bool {
    match route {
        None => true,
        Some(r) => PUBLIC_ROUTES.contains(&r) || r == "/docs" || r.starts_with("/docs/"),
    }
}
