//! Tenant isolation, generated from the OpenAPI document: every documented route with a path
//! parameter, every documented method (and HEAD for every GET), is requested with organization
//! A's object ids and organization B's credentials of every kind (a session, the session naming A
//! in `X-Org-Id`, an API key, a service key, an agent's token, an RFC 8693 delegated token, a node
//! credential).
//!
//! Each (operation, credential) is also sent for B's own object of the same kind. Where B's
//! credential may do the operation in its own organization (its own object is not answered 401 or
//! 403), A's object must be exactly 404. Where it may not (401 or 403 for its own object too),
//! A's object must get that same refusal, the one an id that exists nowhere gets; the tally says
//! how many of each every credential got. Never a 2xx, never a 403 that only A's object earns,
//! and HEAD is answered as GET is. Every credential kind must get a real set of 404s: at least the
//! routes of its own kind (an agent's token on its agent, keys and credentials; a delegated token
//! on its delegations).
//!
//! A route whose path parameter has no fixture below fails the test, and so does a route with a
//! required request body that has none, so that a new route is covered as soon as it is served.

use std::collections::{BTreeMap, BTreeSet};

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::helpers::{Caller, TestApp, json_ok, spawn_app_with};

/// What a path parameter names, so that it can be filled with A's object or with a missing one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Fx {
    Agent,
    Credential,
    Room,
    Zone,
    Node,
    Delegation,
    Approval,
    Invitation,
    Organization,
    Member,
    PolicyVersion,
    Budget,
    PriceModel,
    Delivery,
    Webhook,
    ApiKey,
    AgentKey,
    Partner,
    TrustPolicy,
    OAuthClient,
    OAuthClientId,
}

/// Routes that publish an object to everyone by design (an active agent's DID document, a listed
/// agent's card and listing): not tenant data, and tested field by field in tests/api/trust.rs.
const PUBLISHED: &[&str] =
    &["/agents/{id}/did.json", "/agents/{id}/.well-known/agent-card.json", "/api/v1/marketplace/{agent_id}"];

/// Routes that take only their own credential, whatever the organization: a dynamically
/// registered client's registration access token (RFC 7592), tested in tests/api/oidc.rs.
const OWN_CREDENTIAL_ONLY: &[&str] = &["/oauth2/register/{client_id}"];

/// Path parameters by the route family they appear in: the longest matching prefix wins.
const PARAMS: &[(&str, &str, Fx)] = &[
    ("/api/v1/agents/{id}", "id", Fx::Agent),
    ("/api/v1/agents/{id}/credentials/{cred_id}", "cred_id", Fx::Credential),
    ("/api/v1/city/rooms/{id}", "id", Fx::Room),
    ("/api/v1/city/zones/{id}", "id", Fx::Zone),
    ("/api/v1/nodes/{id}", "id", Fx::Node),
    ("/api/v1/delegations/{id}", "id", Fx::Delegation),
    ("/api/v1/delegations/{id}/approvals/{approval_id}", "approval_id", Fx::Approval),
    ("/api/v1/invitations/{id}", "id", Fx::Invitation),
    ("/api/v1/organizations/{id}", "id", Fx::Organization),
    ("/api/v1/organizations/{id}/members/{user_id}", "user_id", Fx::Member),
    ("/api/v1/policies/versions/{version}", "version", Fx::PolicyVersion),
    ("/api/v1/usage/budgets/{id}", "id", Fx::Budget),
    ("/api/v1/usage/prices/{model}", "model", Fx::PriceModel),
    ("/api/v1/webhooks/deliveries/{id}", "id", Fx::Delivery),
    ("/api/v1/webhooks/{id}", "id", Fx::Webhook),
    ("/auth/api-keys/{id}", "id", Fx::ApiKey),
    ("/api/v1/agents/{id}/keys/{kid}", "kid", Fx::AgentKey),
    ("/api/v1/federation/partners/{id}", "id", Fx::Partner),
    ("/api/v1/oidc/trust-policies/{id}", "id", Fx::TrustPolicy),
    ("/api/v1/clients/{id}", "id", Fx::OAuthClient),
    ("/api/v1/me/consents/{client_id}", "client_id", Fx::OAuthClientId),
];

fn fixture_for(path: &str, param: &str) -> Option<Fx> {
    PARAMS
        .iter()
        .filter(|(prefix, p, _)| *p == param && path.starts_with(prefix))
        .max_by_key(|(prefix, _, _)| prefix.len())
        .map(|(_, _, fx)| *fx)
}

/// A value of the parameter's kind that names nothing in any organization.
fn missing(fx: Fx) -> String {
    match fx {
        Fx::PolicyVersion => "987654".into(),
        Fx::PriceModel => "no-such-model".into(),
        Fx::AgentKey => "no-such-kid".into(),
        Fx::OAuthClientId => "no-such-client".into(),
        _ => uuid::Uuid::new_v4().to_string(),
    }
}

/// The request bodies: valid in themselves, so that the handler's lookup is what answers. Ids in
/// a body are B's own, so that the path's id is the only foreign thing.
fn body_for(method: &Method, path: &str, b: &Objects) -> Option<Value> {
    let v = match (method.as_str(), path) {
        ("PATCH", "/api/v1/agents/{id}") => json!({ "description": "from B" }),
        ("PUT", "/api/v1/agents/{id}/node") => json!({ "node_id": b.ids[&Fx::Node] }),
        ("PUT", "/api/v1/agents/{id}/room") => json!({ "room_id": b.ids[&Fx::Room] }),
        ("PATCH", "/api/v1/city/rooms/{id}") => json!({ "name": "from B" }),
        ("PATCH", "/api/v1/city/zones/{id}") => json!({ "name": "from B" }),
        ("POST", "/api/v1/delegations/{id}/commands") => json!({ "command": "delete" }),
        ("POST", "/api/v1/delegations/{id}/revoke") => json!({ "reason": "from_b" }),
        ("PATCH", "/api/v1/nodes/{id}") => json!({ "name": "from B" }),
        ("POST", "/api/v1/nodes/{id}/heartbeat") => heartbeat(),
        ("POST", "/api/v1/organizations/{id}/members") => json!({ "email": "mallory@b.test", "role": "admin" }),
        ("PATCH", "/api/v1/organizations/{id}/members/{user_id}") => json!({ "role": "owner" }),
        ("POST", "/api/v1/policies/versions/{version}/test") => json!({ "examples": [{
            "expect": "permit",
            "request": { "actor": { "actor_id": "user:x", "actor_type": "human", "org_ids": [b.owner.org_id], "roles": ["owner"] },
                         "action": "read", "resource": { "type": "organization", "id": b.owner.org_id } },
        }] }),
        ("PATCH", "/api/v1/webhooks/{id}") => json!({ "description": "from B" }),
        ("PATCH", "/api/v1/clients/{id}") => json!({ "name": "from B" }),
        ("POST", "/api/v1/agents/{id}/keys") => json!({ "jwk": {
            "kty": "OKP", "crv": "Ed25519", "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo" } }),
        ("POST", "/api/v1/webhooks/{id}/replay") => json!({ "since": "2020-01-01T00:00:00Z" }),
        _ => return None,
    };
    Some(v)
}

fn heartbeat() -> Value {
    json!({
        "metrics": { "cpu_percent": 1.0, "cpu_count": 1, "load_1": 0.1, "load_5": 0.1, "load_15": 0.1,
                     "memory_total_bytes": 1000, "memory_used_bytes": 10,
                     "disk_total_bytes": 1000, "disk_used_bytes": 10 },
        "models": []
    })
}

/// A harmless policy version: owners may read their organization (as the baseline lets them).
const POLICY: &str = r#"
@id("owners-read")
@reason("owners_read")
permit (principal, action == AgentIdP::Action::"read", resource is AgentIdP::Organization)
when { context.org_role == "owner" };
"#;

/// One organization's objects of every kind, and the credentials of every kind that act in it.
struct Objects {
    owner: Caller,
    ids: BTreeMap<Fx, String>,
    node_credential: String,
    agent_token: String,
    delegated_token: String,
}

/// Every scope a protected route asks for: B's agent and its delegation carry them all, so that a
/// refusal is about the object, not a missing scope.
fn all_scopes() -> Vec<String> {
    let set: BTreeSet<&str> =
        agentidp::policy::routes::RULES.iter().map(|r| r.scope).filter(|s| !s.is_empty()).collect();
    set.into_iter().map(str::to_owned).collect()
}

async fn send(app: &TestApp, by: &Caller, method: Method, path: &str, body: Option<Value>) -> reqwest::Response {
    let mut req = app.as_(by, method, path).header("x-org-id", &by.org_id);
    if let Some(b) = body {
        req = req.json(&b);
    }
    req.send().await.unwrap()
}

async fn created(app: &TestApp, by: &Caller, path: &str, body: Value) -> Value {
    let resp = send(app, by, Method::POST, path, Some(body)).await;
    let status = resp.status();
    let text = resp.text().await.unwrap();
    assert!(status.is_success(), "POST {path}: {status} {text}");
    serde_json::from_str(&text).unwrap()
}

fn id(v: &Value) -> String {
    v["id"].as_str().unwrap_or_else(|| panic!("no id in {v}")).to_owned()
}

/// Makes one object of every kind in the owner's organization.
async fn populate(app: &TestApp, owner: Caller, tag: &str, receiver: &str) -> Objects {
    let mut ids = BTreeMap::new();
    ids.insert(Fx::Organization, owner.org_id.clone());
    let scopes = all_scopes();

    let agent = app.create_agent(&owner, json!({ "name": format!("{tag} worker"), "allowed_scopes": scopes })).await;
    let agent_id = id(&agent);
    let client = app.credential(&owner, &agent_id).await;
    ids.insert(Fx::Agent, agent_id.clone());
    ids.insert(Fx::Credential, client.credential_id.clone());
    let agent_token = app.access_token(&client).await;

    let zone = created(app, &owner, "/api/v1/city/zones", json!({ "name": format!("{tag} zone") })).await;
    ids.insert(Fx::Zone, id(&zone));
    let room = created(
        app,
        &owner,
        "/api/v1/city/rooms",
        json!({ "zone_id": id(&zone), "name": format!("{tag} room"), "kind": "workspace", "capacity": 4,
                "x": 0, "y": 0, "width": 2, "height": 2 }),
    )
    .await;
    ids.insert(Fx::Room, id(&room));
    let node = created(
        app,
        &owner,
        "/api/v1/nodes",
        json!({ "name": format!("{tag}-node"), "hostname": format!("{tag}.local"), "labels": {} }),
    )
    .await;
    ids.insert(Fx::Node, id(&node));
    let node_credential = node["credential"].as_str().unwrap().to_owned();

    // Everything a delegation's default capability ceiling lets through.
    let delegable: Vec<&String> =
        scopes.iter().filter(|s| !["keys:manage", "tokens:revoke", "usage:manage"].contains(&s.as_str())).collect();
    let delegation = created(
        app,
        &owner,
        "/api/v1/delegations",
        json!({ "agent_id": agent_id, "scope": { "max_commands": 100, "scopes": delegable,
                                                 "ceremony_required_for": ["delete"] } }),
    )
    .await;
    let delegation_id = delegation["delegation_id"].as_str().unwrap().to_owned();
    let delegated_token = delegation["agent_token"].as_str().unwrap().to_owned();
    let resp = app
        .client
        .post(app.url(&format!("/api/v1/delegations/{delegation_id}/commands")))
        .bearer_auth(&delegated_token)
        .json(&json!({ "command": "delete" }))
        .send()
        .await
        .unwrap();
    let decision = json_ok(resp, StatusCode::OK).await;
    ids.insert(Fx::Delegation, delegation_id);
    ids.insert(Fx::Approval, decision["approval_id"].as_str().unwrap().to_owned());

    let invitation = app.invite(&owner, &owner.org_id, &format!("carol@{tag}.test"), "member").await;
    ids.insert(Fx::Invitation, id(&invitation));
    let member = app.add_member(&owner, &owner.org_id, &format!("dave@{tag}.test"), "member").await;
    ids.insert(Fx::Member, member["user_id"].as_str().unwrap().to_owned());

    // A has three versions, so that its highest is a number B's organization has never reached.
    let versions = if tag == "a" { 3 } else { 1 };
    let mut version = Value::Null;
    for _ in 0..versions {
        version = created(app, &owner, "/api/v1/policies/versions", json!({ "source": POLICY })).await;
    }
    ids.insert(Fx::PolicyVersion, version["version"].to_string());

    let budget = created(app, &owner, "/api/v1/usage/budgets", json!({ "token_limit": 1_000_000 })).await;
    ids.insert(Fx::Budget, id(&budget));
    let model = format!("{tag}-private-model");
    created(app, &owner, "/api/v1/usage/prices", json!({ "model": model, "prompt": 1, "completion": 1 })).await;
    ids.insert(Fx::PriceModel, model);

    let hook = created(app, &owner, "/api/v1/webhooks", json!({ "url": receiver, "event_types": ["*"] })).await;
    let hook_id = id(&hook);
    send(app, &owner, Method::POST, &format!("/api/v1/webhooks/{hook_id}/test"), None).await;
    let mut delivery = None;
    for _ in 0..300 {
        let list = json_ok(
            send(app, &owner, Method::GET, &format!("/api/v1/webhooks/{hook_id}/deliveries"), None).await,
            StatusCode::OK,
        )
        .await;
        let items = list.get("items").cloned().unwrap_or(list);
        if let Some(d) = items.as_array().and_then(|a| a.first()) {
            delivery = Some(id(d));
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    ids.insert(Fx::Webhook, hook_id);
    ids.insert(Fx::Delivery, delivery.expect("a delivery of the test event"));

    let key = created(app, &owner, "/auth/api-keys", json!({ "description": format!("{tag} key") })).await;
    ids.insert(Fx::ApiKey, id(&key));

    // A public key of the agent's, a federation partner (an IP literal: nothing is fetched) and
    // a trust policy under it.
    let x = match tag {
        "a" => "1HjTm5a4qYbT8o6KZ2fJ6mHn0uKIzS8nvFD9bk0Jt8w".to_owned(),
        "b" => "J3w0mX9eMgk1nW2lA3bK4cL5dM6eN7fO8gP9hQ0iR1s".to_owned(),
        _ => {
            use base64::Engine;
            let key = ed25519_dalek::SigningKey::generate(&mut rand_core::OsRng);
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(key.verifying_key().to_bytes())
        }
    };
    let agent_key = created(
        app,
        &owner,
        &format!("/api/v1/agents/{agent_id}/keys"),
        json!({ "jwk": { "kty": "OKP", "crv": "Ed25519", "x": x } }),
    )
    .await;
    ids.insert(Fx::AgentKey, agent_key["kid"].as_str().unwrap().to_owned());
    let partner = created(
        app,
        &owner,
        "/api/v1/federation/partners",
        json!({ "name": format!("{tag} partner"), "issuer": format!("https://1.1.1.1/{tag}"),
                "jwks_uri": format!("https://1.1.1.1/{tag}/jwks"), "audience": "agentidp", "algorithms": ["ES256"] }),
    )
    .await;
    ids.insert(Fx::Partner, id(&partner));
    let policy = created(
        app,
        &owner,
        "/api/v1/oidc/trust-policies",
        json!({ "name": format!("{tag} policy"), "partner_id": id(&partner), "conditions": { "sub": "svc" },
                "agent_id": agent_id, "scopes": [] }),
    )
    .await;
    ids.insert(Fx::TrustPolicy, id(&policy));

    let client = created(
        app,
        &owner,
        "/api/v1/clients",
        json!({ "name": format!("{tag} app"), "redirect_uris": [format!("https://{tag}.example/cb")] }),
    )
    .await;
    ids.insert(Fx::OAuthClient, id(&client));
    ids.insert(Fx::OAuthClientId, client["client_id"].as_str().unwrap().to_owned());

    Objects { owner, ids, node_credential, agent_token, delegated_token }
}

/// A documented operation on a route with path parameters.
struct Operation {
    method: Method,
    template: String,
    params: Vec<(String, Fx)>,
    body_required: bool,
}

/// The operations, read from the document the server serves. Routes whose parameters have no
/// fixture are returned apart.
fn operations() -> (Vec<Operation>, Vec<String>) {
    let doc = serde_json::to_value(agentidp::http::openapi::document()).unwrap();
    let mut ops = Vec::new();
    let mut unfilled = Vec::new();
    for (template, item) in doc["paths"].as_object().unwrap() {
        let names: Vec<String> = template
            .split('/')
            .filter_map(|seg| seg.strip_prefix('{').and_then(|s| s.strip_suffix('}')))
            .map(str::to_owned)
            .collect();
        if names.is_empty()
            || PUBLISHED.contains(&template.as_str())
            || OWN_CREDENTIAL_ONLY.contains(&template.as_str())
        {
            continue;
        }
        let mut params = Vec::new();
        for name in &names {
            match fixture_for(template, name) {
                Some(fx) => params.push((name.clone(), fx)),
                None => unfilled.push(format!("{template} {{{name}}}")),
            }
        }
        if params.len() != names.len() {
            continue;
        }
        for (method, op) in item.as_object().unwrap() {
            let method = match method.as_str() {
                "get" => Method::GET,
                "put" => Method::PUT,
                "post" => Method::POST,
                "patch" => Method::PATCH,
                "delete" => Method::DELETE,
                "head" => Method::HEAD,
                _ => continue,
            };
            let body_required = op["requestBody"]["required"].as_bool().unwrap_or(false);
            if method == Method::GET {
                ops.push(Operation {
                    method: Method::HEAD,
                    template: template.clone(),
                    params: params.clone(),
                    body_required: false,
                });
            }
            ops.push(Operation { method, template: template.clone(), params: params.clone(), body_required });
        }
    }
    // Reads first, deletions last: a leak in a write must not hide one in a read. Revoking B's
    // organization's tokens (for B's own object) last of all: it ends B's tokens.
    ops.sort_by_key(|o| match o.method.as_str() {
        _ if o.template == "/api/v1/organizations/{id}/revoke-tokens" => 3,
        "GET" | "HEAD" => 0,
        "DELETE" => 2,
        _ => 1,
    });
    (ops, unfilled)
}

fn fill(op: &Operation, value: impl Fn(Fx) -> String) -> String {
    let mut path = op.template.clone();
    for (name, fx) in &op.params {
        path = path.replace(&format!("{{{name}}}"), &value(*fx));
    }
    path
}

/// What an answer says: its status and its problem code, if any.
async fn outcome(resp: reqwest::Response) -> (StatusCode, String, String) {
    let status = resp.status();
    let text = resp.text().await.unwrap_or_default();
    let code = serde_json::from_str::<Value>(&text)
        .ok()
        .and_then(|v| v.get("code").or_else(|| v.get("error")).and_then(|c| c.as_str()).map(str::to_owned))
        .unwrap_or_default();
    (status, code, text)
}

#[tokio::test]
async fn another_organizations_objects_are_404_for_every_route_method_and_credential() {
    let app =
        spawn_app_with(&[("webhooks.allow_private_networks", json!(true)), ("webhooks.poll_interval_ms", json!(100))])
            .await;
    // A receiver that is not there: deliveries are made and fail, which is all a fixture needs.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let receiver = format!("http://{}/hook", closed.local_addr().unwrap());
    drop(closed);

    let admin = app.bootstrap().await;
    let owner_a = app.org_with_owner(&admin, "Org A", "owner@a.test").await;
    let owner_b = app.org_with_owner(&admin, "Org B", "owner@b.test").await;
    let a = populate(&app, owner_a, "a", &receiver).await;
    let b = populate(&app, owner_b.clone(), "b", &receiver).await;
    // B's second set of objects: what B's credentials may change or delete of their own without
    // ending themselves (B's own agent, delegation and node are the first set's).
    let b2 = populate(&app, owner_b, "b2", &receiver).await;

    let claims: Value = {
        use base64::Engine;
        let payload = b.delegated_token.split('.').nth(1).expect("a JWT");
        serde_json::from_slice(&base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload).unwrap()).unwrap()
    };
    assert_eq!(claims["act"]["sub"], format!("agent:{}", b.ids[&Fx::Agent]), "an RFC 8693 delegated token: {claims}");
    assert_eq!(claims["delegation_id"], b.ids[&Fx::Delegation].as_str(), "{claims}");

    let (ops, unfilled) = operations();
    assert!(unfilled.is_empty(), "path parameters without a fixture in tests/api/isolation.rs: {unfilled:?}");
    let unbodied: Vec<String> = ops
        .iter()
        .filter(|o| o.body_required && body_for(&o.method, &o.template, &b).is_none())
        .map(|o| format!("{} {}", o.method, o.template))
        .collect();
    assert!(unbodied.is_empty(), "required request bodies without one in tests/api/isolation.rs: {unbodied:?}");
    assert!(ops.len() >= 50, "only {} operations with path parameters in the document", ops.len());

    // A's fixtures are real: A's owner reads each of them.
    for op in ops.iter().filter(|o| o.method == Method::GET) {
        let resp = send(&app, &a.owner, Method::GET, &fill(op, |fx| a.ids[&fx].clone()), None).await;
        let status = resp.status();
        assert!(status.is_success(), "A reads its own {}: {status} {}", op.template, resp.text().await.unwrap());
    }

    let service_key = created(
        &app,
        &b.owner,
        "/auth/api-keys",
        json!({ "description": "b service", "service": true, "scopes": all_scopes() }),
    )
    .await["key"]
        .as_str()
        .unwrap()
        .to_owned();
    let api_key = app.api_key(&b.owner, None).await.token;
    let b_org = b.owner.org_id.clone();
    let a_org = a.owner.org_id.clone();
    // (name, bearer, X-Org-Id)
    let credentials: Vec<(&str, String, String)> = vec![
        ("session", b.owner.token.clone(), b_org.clone()),
        ("session naming org A", b.owner.token.clone(), a_org.clone()),
        ("api key", api_key, b_org.clone()),
        ("service api key", service_key, b_org.clone()),
        ("agent token", b.agent_token.clone(), b_org.clone()),
        ("delegated token", b.delegated_token.clone(), b_org.clone()),
        ("node credential", b.node_credential.clone(), b_org.clone()),
    ];

    let mut failures = Vec::new();
    let mut not_found: BTreeMap<String, usize> = BTreeMap::new();
    // Per credential: the operations it may do in its own organization (and A's object was 404),
    // and those it may do nowhere (refused as for a missing id).
    let mut performable: BTreeMap<&str, BTreeSet<String>> = BTreeMap::new();
    let mut refused: BTreeMap<&str, BTreeMap<u16, usize>> = BTreeMap::new();
    let mut heads: BTreeMap<(String, &str), u16> = BTreeMap::new();
    let mut tally: BTreeMap<(&str, u16), usize> = BTreeMap::new();
    for op in &ops {
        let body = body_for(&op.method, &op.template, &b);
        let route = format!("{} {}", op.method, op.template);
        // B's own object: the first set's where the request changes nothing that B's credentials
        // stand on, else the second set's.
        let keeps = matches!(op.method.as_str(), "GET" | "HEAD" | "PATCH" | "PUT")
            || ["/heartbeat", "/test", "/keys", "/commands", "/replay", "/credentials"]
                .iter()
                .any(|s| op.template.ends_with(s));
        let own = if keeps { &b } else { &b2 };
        for (name, token, org) in &credentials {
            let request = |path: String| {
                let mut req =
                    app.client.request(op.method.clone(), app.url(&path)).bearer_auth(token).header("x-org-id", org);
                if let Some(body) = &body {
                    req = req.json(body);
                }
                req
            };
            let (status, code, text) = outcome(request(fill(op, |fx| a.ids[&fx].clone())).send().await.unwrap()).await;
            let (m_status, m_code, _) = outcome(request(fill(op, missing)).send().await.unwrap()).await;
            let (o_status, o_code, o_text) =
                outcome(request(fill(op, |fx| own.ids[&fx].clone())).send().await.unwrap()).await;
            // Public routes check their own credential (a node's): other credentials are 401 there.
            if !agentidp::auth::PUBLIC_ROUTES.contains(&op.template.as_str()) {
                *tally.entry((name, status.as_u16())).or_default() += 1;
            }
            if matches!(op.method.as_str(), "GET" | "HEAD") {
                let key = (format!("{} {}", op.template, op.method), *name);
                heads.insert(key, status.as_u16());
            }
            if status == StatusCode::NOT_FOUND {
                *not_found.entry(route.clone()).or_default() += 1;
            }
            let may = !matches!(o_status.as_u16(), 401 | 403);
            let why = if status.is_success() || status.is_redirection() {
                Some("A's object was served")
            } else if matches!(status.as_u16(), 400 | 415 | 422) || matches!(o_status.as_u16(), 400 | 415 | 422) {
                Some("the request never reached the lookup (fix its body in the table)")
            } else if o_status.is_server_error() {
                Some("B's own object was answered with a 5xx")
            } else if may && status != StatusCode::NOT_FOUND {
                Some("B may do this in its own organization, and A's object is not 404")
            } else if !may && (status, &code) != (m_status, &m_code) {
                Some("A's object is answered differently from an id that exists nowhere")
            } else if !matches!(status.as_u16(), 401 | 403 | 404) {
                Some("an unexpected status")
            } else {
                None
            };
            if may {
                performable.entry(name).or_default().insert(route.clone());
            } else {
                *refused.entry(name).or_default().entry(o_status.as_u16()).or_default() += 1;
            }
            if let Some(why) = why {
                failures.push(format!(
                    "{route} as B's {name}: {status} {code} (missing id: {m_status} {m_code}; B's own: {o_status} \
                     {o_code}): {why}; {text} {o_text}"
                ));
            }
        }
    }
    // HEAD is answered as GET is, for every credential.
    for ((route, name), status) in &heads {
        if let Some(get) = route.strip_suffix(" HEAD").map(|t| format!("{t} GET"))
            && let Some(g) = heads.get(&(get, *name))
            && g != status
        {
            failures.push(format!("{route} as B's {name}: {status}, and GET {g}"));
        }
    }
    // Every route looked its object up for some credential of B's: a route that refuses every
    // credential of B's before its lookup proves nothing here.
    let unexercised: Vec<String> =
        ops.iter().map(|o| format!("{} {}", o.method, o.template)).filter(|r| !not_found.contains_key(r)).collect();
    eprintln!(
        "isolation: {} operations x {} credentials of B's (each also against a missing id and B's own object); answers: {tally:?}",
        ops.len(),
        credentials.len()
    );
    for (name, _, _) in &credentials {
        eprintln!(
            "isolation: {name}: {} operations it may do in its own organization, all 404 for A's object; refused \
             everywhere (status: count): {:?}",
            performable.get(name).map_or(0, |p| p.len()),
            refused.get(name).cloned().unwrap_or_default()
        );
    }
    assert!(failures.is_empty(), "{} isolation failures:\n{}", failures.len(), failures.join("\n"));
    assert!(unexercised.is_empty(), "routes that answered no credential of B's with 404: {unexercised:?}");
    // B's owner, by session and by its full key, is refused nothing for lack of rights: every
    // answer it got on a protected route is the 404.
    for name in ["session", "api key"] {
        let other: Vec<_> = tally.iter().filter(|((n, s), _)| n == &name && *s != 404).collect();
        assert!(other.is_empty(), "B's {name} got answers other than 404: {other:?}");
    }
    // Every credential kind proves something: the routes of its own kind are among the 404s.
    let own_kind: &[(&str, &[&str])] = &[
        (
            "agent token",
            &[
                "GET /api/v1/agents/{id}",
                "HEAD /api/v1/agents/{id}",
                "GET /api/v1/agents/{id}/credentials",
                "GET /api/v1/agents/{id}/keys",
            ],
        ),
        (
            "delegated token",
            &[
                "GET /api/v1/delegations/{id}",
                "HEAD /api/v1/delegations/{id}",
                "POST /api/v1/delegations/{id}/commands",
            ],
        ),
        ("service api key", &["GET /api/v1/agents/{id}", "GET /api/v1/webhooks/{id}"]),
        ("node credential", &["POST /api/v1/nodes/{id}/heartbeat"]),
    ];
    for (name, routes) in own_kind {
        let got = performable.get(name).cloned().unwrap_or_default();
        let lacking: Vec<_> = routes.iter().filter(|r| !got.contains(**r)).collect();
        assert!(lacking.is_empty(), "B's {name} was never refused with 404 on {lacking:?}; it was on {got:?}");
    }
    for name in ["session", "api key", "service api key", "agent token", "delegated token"] {
        let n = performable.get(name).map_or(0, |p| p.len());
        assert!(n >= 5, "B's {name}: only {n} operations it may do, so few 404s: {:?}", performable.get(name));
    }

    // Naming org A in X-Org-Id is refused the same way as naming an organization that does not
    // exist: A's existence does not leak either.
    for path in ["/api/v1/agents", &format!("/api/v1/agents/{}", a.ids[&Fx::Agent])] {
        let named = |org: String| app.as_(&b.owner, Method::GET, path).header("x-org-id", org).send();
        let (st_a, code_a, text) = outcome(named(a_org.clone()).await.unwrap()).await;
        let (st_x, code_x, _) = outcome(named(uuid::Uuid::new_v4().to_string()).await.unwrap()).await;
        assert_eq!((st_a, &code_a), (st_x, &code_x), "{path} naming org A: {text}");
        assert!(!st_a.is_success(), "{path} naming org A: {text}");
    }

    // Nothing B did reached A: A's objects are all still there.
    for op in ops.iter().filter(|o| o.method == Method::GET) {
        let resp = send(&app, &a.owner, Method::GET, &fill(op, |fx| a.ids[&fx].clone()), None).await;
        assert!(resp.status().is_success(), "A's {} after B's requests: {}", op.template, resp.status());
    }
    let agent = json_ok(
        send(&app, &a.owner, Method::GET, &format!("/api/v1/agents/{}", a.ids[&Fx::Agent]), None).await,
        StatusCode::OK,
    )
    .await;
    assert_ne!(agent["description"], "from B", "{agent}");
    let me = app.me_status(&a.agent_token).await;
    assert_eq!(me, StatusCode::OK, "A's agent token still works");
}
