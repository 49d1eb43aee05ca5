//! What every protected route asks of the policy decision point, declared in one table.
//!
//! Each entry names the route (method and template), the Cedar action, what the resource is, and
//! the scope a scoped credential must carry. The policy layer enforces `Org` entries itself (the
//! resource is the organization of the path or of the request); `Loaded` entries are enforced by
//! the handler with [`super::require`] once it has loaded the resource (an agent's owner, an API
//! key's creator). A test walks the router and fails on any protected route missing here.

use std::sync::Arc;

use axum::{
    extract::{MatchedPath, Request, State},
    http::{HeaderValue, Method, StatusCode, header},
    middleware::Next,
    response::{IntoResponse, Response},
};
use uuid::Uuid;

use super::{Resource, enforce, query_for};
use crate::{
    auth::{Actor, is_public},
    http::ApiError,
    state::AppState,
};

/// The kind of resource a route acts on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Organization,
    Agent,
    ApiKey,
    AuditLog,
    PolicySet,
    City,
    Node,
    Platform,
    Delegation,
    UsageReport,
}

/// How a route is checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Check {
    /// Any authenticated caller whose credential carries the scope (e.g. `/auth/me`).
    Authenticated,
    /// The layer decides, on the organization-level resource.
    Org(Kind),
    /// The handler decides with [`super::require`] after loading the resource.
    Loaded(Kind),
}

/// One protected route's declaration.
#[derive(Debug, Clone, Copy)]
pub struct Rule {
    pub method: &'static str,
    pub path: &'static str,
    pub action: &'static str,
    pub check: Check,
    pub scope: &'static str,
}

const fn rule(
    method: &'static str,
    path: &'static str,
    action: &'static str,
    check: Check,
    scope: &'static str,
) -> Rule {
    Rule { method, path, action, check, scope }
}

use Check::{Authenticated, Loaded, Org};
use Kind::*;

/// Every protected route. Public routes are listed in [`crate::auth::PUBLIC_ROUTES`].
pub const RULES: &[Rule] = &[
    rule("GET", "/auth/me", "read", Authenticated, ""),
    rule("POST", "/auth/logout", "delete", Authenticated, ""),
    rule("POST", "/auth/api-keys", "create", Org(ApiKey), "api_keys:write"),
    rule("GET", "/auth/api-keys", "read", Org(ApiKey), "api_keys:read"),
    rule("DELETE", "/auth/api-keys/{id}", "delete", Loaded(ApiKey), "api_keys:write"),
    rule("POST", "/api/v1/organizations", "administer", Org(Platform), "orgs:write"),
    rule("GET", "/api/v1/organizations", "read", Authenticated, "orgs:read"),
    rule("GET", "/api/v1/organizations/{id}", "read", Org(Organization), "orgs:read"),
    rule("GET", "/api/v1/organizations/{id}/members", "read", Org(Organization), "members:read"),
    rule("POST", "/api/v1/organizations/{id}/members", "manage_members", Org(Organization), "members:write"),
    rule("PATCH", "/api/v1/organizations/{id}/members/{user_id}", "manage_members", Org(Organization), "members:write"),
    rule(
        "DELETE",
        "/api/v1/organizations/{id}/members/{user_id}",
        "manage_members",
        Org(Organization),
        "members:write",
    ),
    rule("GET", "/api/v1/invitations", "read", Authenticated, ""),
    rule("POST", "/api/v1/invitations/{id}/accept", "update", Authenticated, ""),
    rule("POST", "/api/v1/invitations/{id}/decline", "update", Authenticated, ""),
    rule("POST", "/api/v1/organizations/{id}/revoke-tokens", "revoke_tokens", Org(Organization), "tokens:revoke"),
    rule("GET", "/api/v1/audit", "read", Org(AuditLog), "audit:read"),
    rule("GET", "/api/v1/audit/verify", "read", Org(AuditLog), "audit:read"),
    rule("GET", "/api/v1/audit/decisions", "read", Org(AuditLog), "audit:read"),
    rule("POST", "/api/v1/agents", "create", Org(Agent), "agents:write"),
    rule("GET", "/api/v1/agents", "read", Org(Agent), "agents:read"),
    rule("GET", "/api/v1/agents/{id}", "read", Org(Agent), "agents:read"),
    rule("PATCH", "/api/v1/agents/{id}", "update", Loaded(Agent), "agents:write"),
    rule("DELETE", "/api/v1/agents/{id}", "delete", Loaded(Agent), "agents:write"),
    rule("GET", "/api/v1/agents/{id}/credentials", "read", Org(Agent), "agents:read"),
    rule("POST", "/api/v1/agents/{id}/credentials", "manage", Loaded(Agent), "agents:write"),
    rule("DELETE", "/api/v1/agents/{id}/credentials/{cred_id}", "manage", Loaded(Agent), "agents:write"),
    rule("POST", "/api/v1/agents/{id}/credentials/{cred_id}/rotate", "manage", Loaded(Agent), "agents:write"),
    rule(
        "POST",
        "/api/v1/agents/{id}/credentials/{cred_id}/revoke-tokens",
        "revoke_tokens",
        Loaded(Agent),
        "tokens:revoke",
    ),
    rule("POST", "/api/v1/agents/{id}/revoke-tokens", "revoke_tokens", Loaded(Agent), "tokens:revoke"),
    rule("POST", "/api/v1/keys/rotate", "administer", Org(Platform), "keys:manage"),
    rule("GET", "/api/v1/agents/{id}/keys", "read", Org(Agent), "agents:read"),
    rule("POST", "/api/v1/agents/{id}/keys", "manage", Loaded(Agent), "agents:write"),
    rule("DELETE", "/api/v1/agents/{id}/keys/{kid}", "manage", Loaded(Agent), "agents:write"),
    rule("GET", "/api/v1/agents/{id}/card", "read", Org(Agent), "agents:read"),
    rule("PUT", "/api/v1/agents/{id}/listing", "update", Loaded(Agent), "agents:write"),
    rule("DELETE", "/api/v1/agents/{id}/listing", "update", Loaded(Agent), "agents:write"),
    rule("GET", "/api/v1/compliance/agent-cards", "read", Org(Agent), "agents:read"),
    rule("GET", "/api/v1/compliance/report", "read", Org(AuditLog), "audit:read"),
    rule("GET", "/api/v1/scaffold", "read", Org(Agent), "agents:read"),
    // Federation: trusting an issuer hands out agents' tokens, so owners and admins only.
    rule("GET", "/api/v1/federation/partners", "read", Org(PolicySet), "policies:read"),
    rule("POST", "/api/v1/federation/partners", "manage", Org(PolicySet), "policies:write"),
    rule("GET", "/api/v1/federation/partners/{id}", "read", Org(PolicySet), "policies:read"),
    rule("DELETE", "/api/v1/federation/partners/{id}", "manage", Org(PolicySet), "policies:write"),
    rule("GET", "/api/v1/oidc/trust-policies", "read", Org(PolicySet), "policies:read"),
    rule("POST", "/api/v1/oidc/trust-policies", "manage", Org(PolicySet), "policies:write"),
    rule("DELETE", "/api/v1/oidc/trust-policies/{id}", "manage", Org(PolicySet), "policies:write"),
    rule("GET", "/api/v1/oidc/trust-policies/templates", "read", Authenticated, ""),
    rule("POST", "/internal/pdp/evaluate", "evaluate", Org(Platform), "pdp:evaluate"),
    rule("POST", "/internal/pdp/evaluate/batch", "evaluate", Org(Platform), "pdp:evaluate"),
    rule("POST", "/api/v1/policies/versions", "create", Org(PolicySet), "policies:write"),
    rule("GET", "/api/v1/policies/versions", "read", Org(PolicySet), "policies:read"),
    rule("GET", "/api/v1/policies/versions/{version}", "read", Org(PolicySet), "policies:read"),
    rule("POST", "/api/v1/policies/versions/{version}/test", "read", Org(PolicySet), "policies:read"),
    rule("POST", "/api/v1/policies/versions/{version}/activate", "manage", Org(PolicySet), "policies:write"),
    rule("POST", "/api/v1/policies/rollback", "manage", Org(PolicySet), "policies:write"),
    rule("GET", "/api/v1/tiers/status", "read", Org(Organization), "tiers:read"),
    rule("POST", "/api/v1/tiers/upgrade", "manage", Org(Organization), "tiers:write"),
    // Webhooks: the layer checks membership and scope; the handlers require owner or admin.
    rule("GET", "/api/v1/webhooks/event-types", "read", Authenticated, "webhooks:read"),
    rule("POST", "/api/v1/webhooks", "update", Org(Organization), "webhooks:write"),
    rule("GET", "/api/v1/webhooks", "read", Org(Organization), "webhooks:read"),
    rule("GET", "/api/v1/webhooks/dead-letters", "read", Org(Organization), "webhooks:read"),
    rule("GET", "/api/v1/webhooks/{id}", "read", Org(Organization), "webhooks:read"),
    rule("PATCH", "/api/v1/webhooks/{id}", "update", Org(Organization), "webhooks:write"),
    rule("DELETE", "/api/v1/webhooks/{id}", "update", Org(Organization), "webhooks:write"),
    rule("POST", "/api/v1/webhooks/{id}/rotate-secret", "update", Org(Organization), "webhooks:write"),
    rule("POST", "/api/v1/webhooks/{id}/test", "update", Org(Organization), "webhooks:write"),
    rule("GET", "/api/v1/webhooks/{id}/deliveries", "read", Org(Organization), "webhooks:read"),
    rule("POST", "/api/v1/webhooks/{id}/replay", "update", Org(Organization), "webhooks:write"),
    rule("POST", "/api/v1/webhooks/deliveries/{id}/retry", "update", Org(Organization), "webhooks:write"),
    // Delegations: the layer checks membership (or an agent of the org) and scope; the handlers
    // decide who in the organization sees and acts on which delegation.
    rule("POST", "/api/v1/delegations", "create", Org(Delegation), "delegations:write"),
    rule("GET", "/api/v1/delegations", "read", Org(Delegation), "delegations:read"),
    rule("GET", "/api/v1/delegations/{id}", "read", Org(Delegation), "delegations:read"),
    rule("POST", "/api/v1/delegations/{id}/revoke", "update", Org(Delegation), "delegations:write"),
    // The enforcement point: the delegation's own token, or a service key (checked by the handler).
    rule("POST", "/api/v1/delegations/{id}/commands", "update", Authenticated, ""),
    rule("GET", "/api/v1/delegations/{id}/approvals", "read", Org(Delegation), "delegations:read"),
    rule(
        "POST",
        "/api/v1/delegations/{id}/approvals/{approval_id}/approve",
        "update",
        Org(Delegation),
        "delegations:write",
    ),
    rule(
        "POST",
        "/api/v1/delegations/{id}/approvals/{approval_id}/deny",
        "update",
        Org(Delegation),
        "delegations:write",
    ),
    // Usage: the handlers decide (an agent only for itself, service keys for their organization,
    // humans as owners or admins, and the decision point on the organization's UsageReport).
    rule("POST", "/api/v1/usage/events", "create", Loaded(UsageReport), "usage:write"),
    rule("GET", "/api/v1/usage/summary", "read", Loaded(UsageReport), "usage:read"),
    rule("GET", "/api/v1/usage/models", "read", Loaded(UsageReport), "usage:read"),
    rule("GET", "/api/v1/usage/agents", "read", Loaded(UsageReport), "usage:read"),
    rule("GET", "/api/v1/usage/tools", "read", Loaded(UsageReport), "usage:read"),
    rule("GET", "/api/v1/usage/entitlements", "read", Loaded(UsageReport), "usage:read"),
    rule("GET", "/api/v1/usage/prices", "read", Loaded(UsageReport), "usage:read"),
    rule("POST", "/api/v1/usage/prices", "manage", Loaded(UsageReport), "usage:manage"),
    rule("DELETE", "/api/v1/usage/prices/{model}", "manage", Loaded(UsageReport), "usage:manage"),
    rule("GET", "/api/v1/usage/budgets", "read", Loaded(UsageReport), "usage:read"),
    rule("POST", "/api/v1/usage/budgets", "manage", Loaded(UsageReport), "usage:manage"),
    rule("DELETE", "/api/v1/usage/budgets/{id}", "manage", Loaded(UsageReport), "usage:manage"),
    rule("GET", "/internal/usage/summary", "read", Loaded(UsageReport), "usage:read"),
    rule("GET", "/internal/usage/models", "read", Loaded(UsageReport), "usage:read"),
    rule("GET", "/internal/usage/agents", "read", Loaded(UsageReport), "usage:read"),
    rule("GET", "/internal/usage/tools", "read", Loaded(UsageReport), "usage:read"),
    rule("GET", "/api/v1/analytics/token-trend", "read", Loaded(UsageReport), "usage:read"),
    rule("GET", "/api/v1/analytics/agent-activity", "read", Loaded(UsageReport), "usage:read"),
    rule("GET", "/api/v1/analytics/usage-summary", "read", Loaded(UsageReport), "usage:read"),
    // The city: members read the map; owners and admins edit it; an agent reports its own
    // presence. The original paths (/city/...) are kept as aliases.
    rule("GET", "/api/v1/city/zones", "read", Org(City), "city:read"),
    rule("POST", "/api/v1/city/zones", "create", Org(City), "city:write"),
    rule("GET", "/api/v1/city/zones/{id}", "read", Org(City), "city:read"),
    rule("PATCH", "/api/v1/city/zones/{id}", "update", Org(City), "city:write"),
    rule("DELETE", "/api/v1/city/zones/{id}", "delete", Org(City), "city:write"),
    rule("GET", "/api/v1/city/rooms", "read", Org(City), "city:read"),
    rule("POST", "/api/v1/city/rooms", "create", Org(City), "city:write"),
    rule("GET", "/api/v1/city/rooms/{id}", "read", Org(City), "city:read"),
    rule("PATCH", "/api/v1/city/rooms/{id}", "update", Org(City), "city:write"),
    rule("DELETE", "/api/v1/city/rooms/{id}", "delete", Org(City), "city:write"),
    rule("PUT", "/api/v1/agents/{id}/room", "update", Org(City), "city:write"),
    rule("DELETE", "/api/v1/agents/{id}/room", "update", Org(City), "city:write"),
    rule("PUT", "/api/v1/agents/{id}/node", "update", Org(City), "city:write"),
    rule("DELETE", "/api/v1/agents/{id}/node", "update", Org(City), "city:write"),
    rule("GET", "/api/v1/city/map", "read", Org(City), "city:read"),
    rule("GET", "/city/map", "read", Org(City), "city:read"),
    rule("GET", "/api/v1/city/agents", "read", Org(City), "city:read"),
    rule("GET", "/city/agents", "read", Org(City), "city:read"),
    rule("GET", "/api/v1/city/agents/online", "read", Org(City), "city:read"),
    rule("GET", "/city/agents/online", "read", Org(City), "city:read"),
    rule("GET", "/api/v1/city/presence", "read", Org(City), "city:read"),
    rule("POST", "/api/v1/city/presence", "report_presence", Org(City), "presence:write"),
    rule("GET", "/api/v1/city/presence/stream", "read", Org(City), "city:read"),
    // Nodes: admins manage them; a node's own credential heartbeats it (checked by the handler:
    // the heartbeat route takes no user credential).
    rule("GET", "/api/v1/nodes", "read", Org(Node), "nodes:read"),
    rule("POST", "/api/v1/nodes", "create", Org(Node), "nodes:write"),
    rule("GET", "/api/v1/nodes/{id}", "read", Org(Node), "nodes:read"),
    rule("PATCH", "/api/v1/nodes/{id}", "update", Org(Node), "nodes:write"),
    rule("DELETE", "/api/v1/nodes/{id}", "delete", Org(Node), "nodes:write"),
    rule("POST", "/api/v1/nodes/{id}/rotate-credential", "manage", Org(Node), "nodes:write"),
    // OAuth clients: the layer checks membership and scope; the handlers require owner or admin.
    rule("POST", "/api/v1/clients", "update", Org(Organization), "clients:write"),
    rule("GET", "/api/v1/clients", "read", Org(Organization), "clients:read"),
    rule("GET", "/api/v1/clients/{id}", "read", Org(Organization), "clients:read"),
    rule("PATCH", "/api/v1/clients/{id}", "update", Org(Organization), "clients:write"),
    rule("DELETE", "/api/v1/clients/{id}", "update", Org(Organization), "clients:write"),
    rule("POST", "/api/v1/clients/{id}/rotate-secret", "update", Org(Organization), "clients:write"),
    // A person's own consents.
    rule("GET", "/api/v1/me/consents", "read", Authenticated, ""),
    rule("DELETE", "/api/v1/me/consents/{client_id}", "delete", Authenticated, ""),
];

/// The declaration for a route, if any.
pub fn rule_for(method: &str, path: &str) -> Option<&'static Rule> {
    RULES.iter().find(|r| r.method == method && r.path == path)
}

/// The declaration that applies to a request: HEAD is a GET without the body (axum answers it
/// with the GET handler), so it is checked as one. Any other method without a declaration has
/// none, and is refused.
pub fn rule_for_method(method: &Method, path: &str) -> Option<&'static Rule> {
    let method = if method == Method::HEAD { "GET" } else { method.as_str() };
    rule_for(method, path)
}

/// The methods a protected route serves, as an `Allow` header lists them.
pub fn allowed_methods(path: &str) -> Vec<&'static str> {
    let mut methods: Vec<&'static str> = RULES.iter().filter(|r| r.path == path).map(|r| r.method).collect();
    if methods.contains(&"GET") {
        methods.push("HEAD");
    }
    methods
}

/// The answer to a method a protected route has no declaration for: 405 with the methods it has,
/// or 404 when it has none (a route missing from the table is not served).
fn refuse_method(path: &str) -> Response {
    let allowed = allowed_methods(path);
    if allowed.is_empty() {
        return ApiError::NotFound.into_response();
    }
    let mut resp = crate::http::error::problem_for_status(StatusCode::METHOD_NOT_ALLOWED, None);
    if let Ok(v) = HeaderValue::from_str(&allowed.join(", ")) {
        resp.headers_mut().insert(header::ALLOW, v);
    }
    resp
}

tokio::task_local! {
    static SCOPE: String;
    static BUDGET_EXCEEDED: bool;
}

/// Whether the caller of the current request is past a usage budget (`context.budget_exceeded`),
/// as the policy layer found out before the handler ran.
pub fn budget_exceeded_for_current_request() -> bool {
    BUDGET_EXCEEDED.try_with(|b| *b).unwrap_or(false)
}

/// The scope the current route asks for (for handler-level checks).
pub fn scope_for_current_request() -> Option<String> {
    SCOPE.try_with(|s| s.clone()).ok()
}

/// The routes whose query reads the request's path: the organization of one, the agent of the other.
const ORG_PATHS: &str = "/api/v1/organizations/{id}";
const AGENT_PATHS: &str = "/api/v1/agents/{id}";

/// The organization a route acts in: the `{id}` of `/api/v1/organizations/{id}/...`, else the
/// request's organization.
fn org_of(rule: &Rule, uri_path: &str, actor: &Actor) -> Result<Option<Uuid>, ApiError> {
    if rule.path.starts_with(ORG_PATHS) {
        let id = uri_path.split('/').nth(4).unwrap_or_default();
        return id.parse().map(Some).map_err(|_| ApiError::NotFound);
    }
    Ok(actor.org_id)
}

/// The id of the resource a route acts on: the agent of `/api/v1/agents/{id}/...` (as
/// `agent:<id>`, an agent's actor id, so that policies can tell an agent's own record), else the
/// organization (or the platform).
fn resource_id(rule: &Rule, uri_path: &str, resource: &Resource) -> String {
    if rule.path.starts_with(AGENT_PATHS) {
        return format!("agent:{}", uri_path.split('/').nth(4).unwrap_or_default());
    }
    resource.org_id().map(|o| o.to_string()).unwrap_or_else(|| "platform".into())
}

/// Layer 6, policy: every protected route is declared; the declared check runs before the handler,
/// and a method without a declaration is refused, never let through.
pub async fn layer(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let Some(path) = req.extensions().get::<MatchedPath>().map(|p| p.as_str().to_owned()) else {
        return next.run(req).await;
    };
    if is_public(Some(&path)) {
        return next.run(req).await;
    }
    let Some(rule) = rule_for_method(req.method(), &path) else {
        // Never let through what no declaration checks: the handler for another method of this
        // path could answer it (as axum answers HEAD with GET's).
        return refuse_method(&path);
    };
    let Some(actor) = req.extensions().get::<Actor>().cloned() else {
        return ApiError::unauthorized("Authentication is required.").into_response();
    };
    // From memory (the usage module's caches): what a policy may deny on.
    let exceeded = match actor.org_id {
        Some(org) => {
            let agent = (actor.actor_type == crate::auth::ActorType::Agent).then(|| actor.user_id());
            crate::usage::budget_exceeded(&state, org, agent).await
        }
        None => false,
    };
    BUDGET_EXCEEDED.scope(exceeded, decide(state, req, next, rule, actor)).await
}

/// The Cedar query a request's declaration asks for, from the method's declaration, the request's
/// path (the organization or agent it names) and the caller: `None` where the layer decides
/// nothing itself (`Authenticated`, or `Loaded` for the handler). Takes untrusted input (the path
/// as sent, the `X-Org-Id` the actor was built from; `make fuzz`).
pub fn query_for_request(rule: &Rule, uri_path: &str, actor: &Actor) -> Result<Option<super::Query>, ApiError> {
    let Check::Org(kind) = rule.check else { return Ok(None) };
    let org = org_of(rule, uri_path, actor)?;
    let resource = match (kind, org) {
        (Kind::Platform, _) => Resource::Platform,
        (_, None) => {
            return Err(ApiError::bad_request("org_required", "Choose an organization with the X-Org-Id header."));
        }
        (Kind::Organization, Some(org_id)) => Resource::Organization { org_id },
        (Kind::AuditLog, Some(org_id)) => Resource::AuditLog { org_id },
        (Kind::PolicySet, Some(org_id)) => Resource::PolicySet { org_id },
        (Kind::Agent, Some(org_id)) => Resource::Agent { org_id, owner_id: None },
        (Kind::ApiKey, Some(org_id)) => Resource::ApiKey { org_id, created_by: actor.actor_id() },
        (Kind::Delegation, Some(org_id)) => Resource::Delegation { org_id },
        (Kind::UsageReport, Some(org_id)) => Resource::UsageReport { org_id, subject_id: format!("org:{org_id}") },
        (Kind::City, Some(org_id)) => Resource::CityMap { org_id },
        (Kind::Node, Some(org_id)) => Resource::Node { org_id },
    };
    let id = resource_id(rule, uri_path, &resource);
    Ok(Some(query_for(actor, rule.action, resource, id, rule.scope)))
}

/// [`query_for_request`], built once per principal for the routes whose query does not depend on
/// the path (all but `/api/v1/organizations/{id}/...` and `/api/v1/agents/{id}/...`).
fn memoized_query(rule: &'static Rule, uri_path: &str, actor: &Actor) -> Result<Option<Arc<super::Query>>, ApiError> {
    if rule.path.starts_with(ORG_PATHS) || rule.path.starts_with(AGENT_PATHS) {
        return query_for_request(rule, uri_path, actor).map(|q| q.map(Arc::new));
    }
    let key = super::MemoKey {
        rule: rule as *const Rule as usize,
        actor_type: actor.actor_type,
        org_id: actor.org_id,
        budget_exceeded: budget_exceeded_for_current_request(),
    };
    actor.principal.queries.get_or_build(key, || query_for_request(rule, uri_path, actor))
}

/// An agent never learns whether another agent exists: a refusal on another agent's record (in
/// its own organization or any other, where the layer cannot tell them apart) is 404, as for an
/// id that exists nowhere. The list of agents stays a 403.
fn hide_other_agents(query: &super::Query, actor: &Actor, e: ApiError) -> ApiError {
    let other_agent = actor.actor_type == crate::auth::ActorType::Agent
        && matches!(query.resource, Resource::Agent { .. })
        && query.resource_id.starts_with("agent:")
        && query.resource_id != actor.actor_id();
    if other_agent && matches!(e, ApiError::Forbidden { .. }) { ApiError::NotFound } else { e }
}

async fn decide(state: AppState, req: Request, next: Next, rule: &'static Rule, actor: Actor) -> Response {
    let outcome = match rule.check {
        Check::Authenticated => {
            if rule.scope.is_empty() || actor.scopes().is_none_or(|s| s.iter().any(|x| x.as_str() == rule.scope)) {
                Ok(())
            } else {
                Err(ApiError::forbidden(
                    "insufficient_scope",
                    format!("This credential lacks the `{}` scope.", rule.scope),
                ))
            }
        }
        Check::Loaded(_) => Ok(()),
        Check::Org(_) => match memoized_query(rule, req.uri().path(), &actor) {
            Ok(Some(query)) => enforce(&state, &query).map_err(|e| hide_other_agents(&query, &actor, e)),
            Ok(None) => Ok(()),
            Err(e) => Err(e),
        },
    };
    match outcome {
        Ok(()) => SCOPE.scope(rule.scope.to_owned(), next.run(req)).await,
        Err(e) => e.into_response(),
    }
}
