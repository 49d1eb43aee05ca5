//! The OpenAPI document: the router's own annotations plus info, security schemes and the problem
//! schema. Routes and document come from the same `OpenApiRouter`, so they cannot drift.

use std::sync::LazyLock;

use utoipa::{
    Modify, OpenApi,
    openapi::security::{ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityScheme},
};

use super::error::{FieldError, PROBLEM_JSON, Problem};

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
        (name = "delegations", description = "The delegation broker: bounded authority for agents (TTL, command and spend \
budgets, capability ceiling, ceremonies, chains), cascading revocation; delegated tokens come from RFC 8693 token exchange"),
        (name = "usage", description = "Usage events over HTTP and NATS, counted once per (organization, event_id); prices, \
rollup aggregations, monthly budgets and entitlements"),
        (name = "analytics", description = "Token trends, agent activity and per-agent summaries from the per-request records"),
        (name = "city", description = "The city map: zones, rooms, placement, agents' live presence and its stream"),
        (name = "nodes", description = "Machines that run agents: node credentials, heartbeats with metrics and models"),
        (name = "trust", description = "did:web documents for the issuer and agents, agents' public keys, signed A2A agent \
cards, compliance controls and reports, scaffolds"),
        (name = "federation", description = "External issuers (GitHub Actions, Kubernetes, SPIFFE, any OIDC issuer) and \
trust policies: their tokens exchanged for our agents' (RFC 7523 jwt-bearer, RFC 8693)"),
        (name = "marketplace", description = "Agents listed publicly by their organizations: search, publish, unlist"),
        (name = "clients", description = "OAuth clients of an organization: applications that sign people in"),
        (name = "oidc", description = "OpenID Connect: the authorization endpoint, sign-in and consent pages, userinfo, logout, consents"),
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
        components.add_security_scheme(
            "node_credential",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some("A node's own credential (aidp_node_...), for its heartbeats only"))
                    .build(),
            ),
        );
    }
}

/// The complete document.
pub fn document() -> utoipa::openapi::OpenApi {
    let (_, mut doc) = crate::app::api_router().split_for_parts();
    doc.info.version = env!("CARGO_PKG_VERSION").to_owned();
    document_errors(&mut doc);
    doc
}

/// The errors the middleware stack can send, added to every operation by the same rules the stack
/// applies, so that a new route is documented without anyone remembering:
/// - every route: 500 and 503;
/// - a protected route (not in [`crate::auth::PUBLIC_ROUTES`]): 401 (auth layer), 403 (policy
///   layer), 429 (tier layer);
/// - a JSON request body: 400 (malformed), 413 (body limit), 415 (not JSON), 422 (validation);
/// - a path parameter: 404 (malformed or another organization's id);
/// - a query parameter: 400 (malformed).
///
/// Every error is `application/problem+json` with the `Problem` schema, except on the OAuth
/// endpoints ([`crate::auth::OAUTH_ROUTES`]), which answer RFC 6749 JSON and keep what their
/// handlers declare (plus 503 as `temporarily_unavailable`; a 500 is still problem+json).
fn document_errors(doc: &mut utoipa::openapi::OpenApi) {
    use utoipa::openapi::{
        ContentBuilder, Ref, RefOr, ResponseBuilder,
        header::HeaderBuilder,
        path::{Operation, ParameterIn},
        schema::{ObjectBuilder, Type},
    };

    let problem = || ContentBuilder::new().schema(Some(RefOr::Ref(Ref::from_schema_name("Problem")))).build();
    let oauth_error =
        || ContentBuilder::new().schema(Some(RefOr::Ref(Ref::from_schema_name("OAuthErrorBody")))).build();
    let header = |description: &str| {
        HeaderBuilder::new()
            .schema(ObjectBuilder::new().schema_type(Type::String))
            .description(Some(description))
            .build()
    };
    let add = |op: &mut Operation, status: u16, description: &str, oauth: bool| {
        let entry = op.responses.responses.entry(status.to_string());
        if let std::collections::btree_map::Entry::Vacant(v) = entry {
            let mut response = ResponseBuilder::new().description(description);
            response = if oauth {
                response.content("application/json", oauth_error())
            } else {
                response.content(PROBLEM_JSON, problem())
            };
            match status {
                401 => response = response.header("WWW-Authenticate", header("The challenge (RFC 6750, RFC 9728)")),
                429 => response = response.header("Retry-After", header("Seconds to wait")),
                _ => {}
            }
            v.insert(RefOr::T(response.build()));
        }
    };

    for (path, item) in doc.paths.paths.iter_mut() {
        let protected = !crate::auth::is_public(Some(path));
        let oauth = crate::auth::OAUTH_ROUTES.contains(&path.as_str());
        let ops = [
            &mut item.get,
            &mut item.put,
            &mut item.post,
            &mut item.delete,
            &mut item.options,
            &mut item.head,
            &mut item.patch,
            &mut item.trace,
        ];
        for op in ops.into_iter().flatten() {
            // What the handlers declared as JSON is what the error type sends: problem+json.
            if !oauth {
                for (status, response) in op.responses.responses.iter_mut() {
                    if let (true, RefOr::T(r)) = (status.starts_with('4') || status.starts_with('5'), response)
                        && let Some(content) = r.content.shift_remove("application/json")
                    {
                        r.content.insert(PROBLEM_JSON.to_owned(), content);
                    }
                }
            }
            let json_body = op.request_body.as_ref().is_some_and(|b| b.content.keys().any(|k| k == "application/json"));
            let path_params = path.contains('{')
                || op.parameters.iter().flatten().any(|p| matches!(p.parameter_in, ParameterIn::Path));
            if protected {
                add(op, 401, "No valid credential", false);
                add(op, 403, "Not allowed: the policy's reason, or a missing scope", false);
                add(op, 429, "Over the rate limit or the daily quota", false);
            }
            // An OAuth endpoint with a JSON body (dynamic registration) answers its own RFC JSON
            // errors; only the body limit's 413 comes from the stack.
            if json_body && !oauth {
                add(op, 400, "The request is malformed", false);
                add(op, 415, "The body is not application/json", false);
                add(op, 422, "The body failed validation; see `errors`", false);
            }
            if json_body {
                add(op, 413, "The body is larger than the server accepts", false);
            }
            if path_params {
                add(op, 404, "No such resource (or another organization's)", false);
            }
            if op.parameters.iter().flatten().any(|p| matches!(p.parameter_in, ParameterIn::Query)) {
                add(op, 400, "A query parameter is malformed", oauth);
            }
            add(op, 500, "An internal error; logged with the request id", false);
            add(op, 503, "A dependency is unavailable; retry shortly", oauth);
        }
    }
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
