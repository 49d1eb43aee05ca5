//! Identity: organizations, humans and memberships, sessions, API keys, the credentials the
//! org-context and auth layers resolve, and the first-run bootstrap.

mod actor;
pub mod agents;
pub mod bootstrap;
pub mod credentials;
pub mod directory;
mod invitations;
pub mod keys;
pub mod model;
pub mod oauth;
pub mod oidc;
mod orgs;
pub mod revocation;
pub(crate) mod sessions;
mod throttle;
pub mod tokens;

use std::{sync::Arc, time::Duration};

use utoipa_axum::{router::OpenApiRouter, routes};

pub use actor::{Actor, ActorIdentity, ActorType, Role, Scope};
pub use credentials::{Credential, CredentialCache, LastUsed, Principal};
pub use orgs::{slugify, valid_slug};
pub use throttle::LoginThrottle;

use crate::{config::AuthConfig, state::AppState};

/// Per-process identity state: the credential cache, the login throttle, pending `last_used` times.
pub struct AuthState {
    pub cache: Arc<CredentialCache>,
    /// Credential lookups in Postgres, charged per client IP.
    pub lookups: credentials::LookupLimit,
    pub throttle: LoginThrottle,
    pub last_used: LastUsed,
    pub clients: oauth::ClientCache,
    pub revocations: revocation::Revocations,
    pub verified: tokens::VerifiedCache,
    /// Agents' principals by access-token hash: made from the token's claims alone, so that the
    /// requests of one token share one (and what the policy layer memoizes in it). Consulted only
    /// after the token has verified and passed the revocation check on that request.
    pub agent_principals: crate::cache::Cache<[u8; 32], Arc<credentials::Principal>>,
    /// DPoP proofs seen by this instance (Redis is the shared replay cache).
    pub dpop_replays: oidc::dpop::ReplayCache,
    /// Client ID metadata documents: the guarded fetcher and its cache.
    pub documents: oidc::metadata_document::Documents,
}

impl AuthState {
    pub fn new(cfg: &AuthConfig, oidc: &oidc::OidcConfig) -> anyhow::Result<Self> {
        let cache_ttl = Duration::from_secs(cfg.credential_cache_secs);
        let negative_ttl = Duration::from_secs(cfg.negative_cache_secs);
        Ok(Self {
            cache: Arc::new(CredentialCache::new(cache_ttl, negative_ttl)),
            lookups: credentials::LookupLimit::new(cfg.lookups_per_minute_ip),
            throttle: LoginThrottle::new(cfg.clone()),
            last_used: LastUsed::default(),
            clients: oauth::ClientCache::new(cache_ttl, negative_ttl),
            revocations: revocation::Revocations::default(),
            verified: tokens::VerifiedCache::new(Duration::from_secs(cfg.access_token_ttl_secs)),
            agent_principals: crate::cache::Cache::new(
                200_000,
                Duration::from_secs(cfg.access_token_ttl_secs + tokens::LEEWAY as u64),
            ),
            dpop_replays: oidc::dpop::ReplayCache::new(Duration::from_secs(oidc.dpop_proof_max_age_secs)),
            documents: oidc::metadata_document::Documents::new(&oidc.metadata_documents)?,
        })
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
        .routes(routes!(invitations::list_invitations))
        .routes(routes!(invitations::accept))
        .routes(routes!(invitations::decline))
        .routes(routes!(agents::create_agent, agents::list_agents))
        .routes(routes!(agents::get_agent, agents::update_agent, agents::delete_agent))
        .routes(routes!(agents::create_credential, agents::list_credentials))
        .routes(routes!(agents::revoke_credential))
        .routes(routes!(agents::rotate_credential))
        .routes(routes!(agents::revoke_agent_tokens))
        .routes(routes!(agents::revoke_credential_tokens))
        .routes(routes!(agents::revoke_org_tokens))
        .routes(routes!(agents::rotate_keys))
        .routes(routes!(oauth::token))
        .routes(routes!(oauth::introspect))
        .routes(routes!(oauth::revoke))
        .routes(routes!(oauth::as_metadata))
        .routes(routes!(oauth::openid_configuration))
        .routes(routes!(oauth::protected_resource))
        .routes(routes!(oauth::jwks))
        .routes(routes!(oidc::clients::create_client, oidc::clients::list_clients))
        .routes(routes!(oidc::clients::get_client, oidc::clients::update_client, oidc::clients::delete_client))
        .routes(routes!(oidc::clients::rotate_client_secret))
        .routes(routes!(oidc::authorize::authorize))
        .routes(routes!(oidc::authorize::sign_in))
        .routes(routes!(oidc::authorize::give_consent))
        .routes(routes!(oidc::userinfo::userinfo_get, oidc::userinfo::userinfo_post))
        .routes(routes!(oidc::userinfo::end_session))
        .routes(routes!(oidc::consents::list_consents))
        .routes(routes!(oidc::consents::revoke_consent))
        .routes(routes!(oidc::registration::register_client))
        .routes(routes!(
            oidc::registration::read_registration,
            oidc::registration::update_registration,
            oidc::registration::delete_registration
        ))
}

/// Routes anyone may call; every other route requires a principal.
/// The OAuth endpoints authenticate clients themselves (RFC 6749 JSON errors, not 401 problems).
pub const PUBLIC_ROUTES: &[&str] = &[
    "/health",
    "/ready",
    "/metrics",
    "/openapi.json",
    "/auth/login",
    "/auth/set-password",
    "/api/v1/token",
    "/api/v1/token/introspect",
    "/api/v1/token/revoke",
    "/.well-known/oauth-authorization-server",
    "/.well-known/openid-configuration",
    "/.well-known/oauth-protected-resource",
    "/.well-known/jwks.json",
    // OpenID Connect: the browser's pages and the endpoints that check their own tokens.
    "/oauth2/authorize",
    "/oauth2/login",
    "/oauth2/consent",
    "/oauth2/userinfo",
    "/oauth2/logout",
    "/oauth2/register",
    "/oauth2/register/{client_id}",
    "/api/v1/billing/stripe/webhook",
    // A node's heartbeat carries the node's own credential, checked by the handler.
    "/api/v1/nodes/{id}/heartbeat",
    // Trust documents anyone may check: each read is charged to the caller's IP.
    "/.well-known/did.json",
    "/agents/{id}/did.json",
    "/agents/{id}/.well-known/agent-card.json",
    "/api/v1/compliance/controls",
    "/api/v1/marketplace",
    "/api/v1/marketplace/{agent_id}",
];

/// The OAuth endpoints: their errors are RFC 6749 JSON (`application/json`), not problem+json.
pub const OAUTH_ROUTES: &[&str] = &[
    "/api/v1/token",
    "/api/v1/token/introspect",
    "/api/v1/token/revoke",
    "/oauth2/userinfo",
    "/oauth2/register",
    "/oauth2/register/{client_id}",
];

/// The pages people's browsers are sent to: their refusals are HTML pages, never redirected to an
/// unregistered URI and never JSON (the server errors below them still are problem+json).
pub const PAGE_ROUTES: &[&str] = &["/oauth2/authorize", "/oauth2/login", "/oauth2/consent", "/oauth2/logout"];

/// Whether a matched route template is public (Swagger UI's assets and unknown paths are, and the
/// console's pages: the console signs people in itself and calls the API as them).
pub fn is_public(route: Option<&str>) -> bool {
    match route {
        None => true,
        Some(r) => {
            PUBLIC_ROUTES.contains(&r) || r == "/docs" || r.starts_with("/docs/") || crate::console::is_console_route(r)
        }
    }
}
