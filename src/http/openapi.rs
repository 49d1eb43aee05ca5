//! The OpenAPI document: the router's own annotations plus info, security schemes and the problem
//! schema. Routes and document come from the same `OpenApiRouter`, so they cannot drift.

use std::sync::LazyLock;

use utoipa::{
    Modify, OpenApi,
    openapi::security::{ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityScheme},
};

use super::error::{FieldError, Problem};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "AgentIdP",
        description = "Identity provider, policy decision point, usage meter and delegation broker for AI agents.",
        license(name = "Apache-2.0", identifier = "Apache-2.0"),
    ),
    components(schemas(Problem, FieldError)),
    modifiers(&SecuritySchemes),
    tags(
        (name = "operations", description = "Liveness, readiness, metrics, this document"),
        (name = "auth", description = "Login sessions, API keys, the caller's identity"),
        (name = "organizations", description = "Organizations and their members"),
        (name = "audit", description = "The tamper-evident audit log"),
        (name = "agents", description = "The agent registry and agents' client credentials"),
        (name = "policy", description = "The policy decision point, policy versions, dry runs"),
        (name = "webhooks", description = "Webhook endpoints, signed deliveries (Standard Webhooks), retries, replay, dead letters, the event catalog"),
        (name = "oauth", description = "The OAuth 2.0 authorization server: tokens, introspection, revocation, metadata, keys"),
        (name = "tiers", description = "Plans, limits and usage; upgrades and Stripe billing. Every charged response carries \
X-RateLimit-Limit / -Remaining / -Reset (a Unix time) for the limit closest to refusing, and RateLimit-Policy / RateLimit \
(draft-ietf-httpapi-ratelimit-headers) for all of them; a refusal is 429 with Retry-After"),
    )
)]
pub struct ApiDoc;

struct SecuritySchemes;

impl Modify for SecuritySchemes {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("JWT")
                    .description(Some("An RFC 9068 access token, a session token or an API key"))
                    .build(),
            ),
        );
        components
            .add_security_scheme("api_key", SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::new("X-API-Key"))));
        components.add_security_scheme(
            "client_secret_basic",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Basic)
                    .description(Some("An agent credential's client_id and client_secret (RFC 6749 §2.3.1)"))
                    .build(),
            ),
        );
        components.add_security_scheme(
            "session_cookie",
            SecurityScheme::ApiKey(ApiKey::Cookie(ApiKeyValue::new(crate::SESSION_COOKIE))),
        );
    }
}

/// The complete document.
pub fn document() -> utoipa::openapi::OpenApi {
    let (_, mut doc) = crate::app::api_router().split_for_parts();
    doc.info.version = env!("CARGO_PKG_VERSION").to_owned();
    doc
}

static JSON: LazyLock<String> = LazyLock::new(|| {
    let mut json = document().to_pretty_json().unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"));
    json.push('\n');
    json
});

/// The document as pretty JSON, rendered once.
pub fn json() -> &'static str {
    &JSON
}
