//! Policy: the PDP over HTTP with the original examples, the policy store (validate, dry run,
//! activate, roll back), activation across instances, the decision log, and a walk of the router
//! that fails on any protected route without a declared action.

use std::time::{Duration, Instant};

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::helpers::{Caller, TestApp, assert_problem, json_ok, spawn_app, spawn_app_with, spawn_on};

fn pdp(actor: Value, action: &str, resource: Value) -> Value {
    json!({ "actor": actor, "action": action, "resource": resource })
}

async fn evaluate(app: &TestApp, by: &Caller, body: &Value) -> Value {
    json_ok(app.as_(by, Method::POST, "/internal/pdp/evaluate").json(body).send().await.unwrap(), StatusCode::OK).await
}

#[tokio::test]
async fn the_original_examples_hold_over_http() {
    let app = spawn_app().await;
    let admin = app.bootstrap().await;
    let dao = uuid::Uuid::new_v4().to_string();
    let owner =
        json!({ "actor_id": "user:7", "actor_type": "human", "microdao_ids": [dao], "roles": ["microdao_owner"] });
    let outsider = json!({ "actor_id": "user:8", "actor_type": "human", "microdao_ids": [], "roles": [] });
    let member = json!({ "actor_id": "user:9", "actor_type": "human", "org_ids": [dao], "roles": ["member"] });
    let viewer = member.clone();
    let agent = json!({ "actor_id": "agent:5", "actor_type": "agent", "org_ids": [dao], "roles": ["agent"] });

    let d = evaluate(&app, &admin, &pdp(owner.clone(), "manage", json!({ "type": "microdao", "id": dao }))).await;
    assert_eq!((d["effect"].as_str(), d["reason"].as_str()), (Some("permit"), Some("microdao_owner")), "{d}");
    assert!(d["decision_id"].is_string() && d["policy_version"].as_str().unwrap().starts_with("baseline:"));
    assert_eq!(d["determining_policies"], json!(["baseline.org-owner"]));

    let d = evaluate(&app, &admin, &pdp(outsider, "read", json!({ "type": "microdao", "id": dao }))).await;
    assert_eq!((d["effect"].as_str(), d["reason"].as_str()), (Some("deny"), Some("not_microdao_member")), "{d}");

    let channel =
        json!({ "type": "channel", "id": "general", "attributes": { "microdao_id": dao, "members": ["user:9"] } });
    let d = evaluate(&app, &admin, &pdp(member.clone(), "send_message", channel.clone())).await;
    assert_eq!((d["effect"].as_str(), d["reason"].as_str()), (Some("permit"), Some("channel_member")), "{d}");
    let d = evaluate(&app, &admin, &pdp(member, "manage", channel)).await;
    assert_eq!(d["effect"], "deny", "{d}");

    let tool = json!({ "type": "tool", "id": "shell", "attributes": { "org_id": dao, "allowed_agents": ["agent:1"] } });
    let d = evaluate(&app, &admin, &pdp(agent.clone(), "execute", tool)).await;
    assert_eq!((d["effect"].as_str(), d["reason"].as_str()), (Some("deny"), Some("tool_not_allowed")), "{d}");
    let tool = json!({ "type": "tool", "id": "shell", "attributes": { "org_id": dao, "allowed_agents": ["agent:5"] } });
    let d = evaluate(&app, &admin, &pdp(agent, "execute", tool)).await;
    assert_eq!(d["effect"], "permit", "{d}");

    let batch = json!({ "requests": [
        pdp(owner.clone(), "read", json!({ "type": "microdao", "id": dao })),
        pdp(viewer.clone(), "read", json!({ "type": "usage_report", "id": "u", "attributes": { "org_id": dao, "subject_id": "user:9" } })),
        pdp(viewer, "read", json!({ "type": "usage_report", "id": "u", "attributes": { "org_id": dao, "subject_id": "user:7" } })),
    ]});
    let r = json_ok(
        app.as_(&admin, Method::POST, "/internal/pdp/evaluate/batch").json(&batch).send().await.unwrap(),
        StatusCode::OK,
    )
    .await;
    assert_eq!(r["results"].as_array().unwrap().len(), 3);
    assert_eq!(r["results"][1]["reason"], "own_usage");
    assert_eq!(r["results"][2]["effect"], "deny", "someone else's usage needs an admin");
}

#[tokio::test]
async fn internal_routes_are_for_system_admins_and_bad_input_is_4xx() {
    let app = spawn_app().await;
    let admin = app.bootstrap().await;
    let owner = app.org_with_owner(&admin, "Other", "owner@other.test").await;
    let body =
        pdp(json!({ "actor_id": "user:1", "actor_type": "human" }), "read", json!({ "type": "platform", "id": "p" }));
    let resp = app.as_(&owner, Method::POST, "/internal/pdp/evaluate").json(&body).send().await.unwrap();
    assert_problem(resp, StatusCode::FORBIDDEN, "system_admin_required").await;
    // A system admin's key without the scope is refused too.
    let key = app.api_key(&admin, Some(&["audit:read"])).await;
    let resp = app.as_(&key, Method::POST, "/internal/pdp/evaluate").json(&body).send().await.unwrap();
    assert_problem(resp, StatusCode::FORBIDDEN, "insufficient_scope").await;

    let dao = uuid::Uuid::new_v4().to_string();
    let bad = [
        (json!({ "action": "read" }), StatusCode::UNPROCESSABLE_ENTITY, "invalid_body"),
        (
            pdp(json!({ "actor_id": "u", "actor_type": "robot" }), "read", json!({ "type": "microdao", "id": dao })),
            StatusCode::BAD_REQUEST,
            "invalid_pdp_request",
        ),
        (
            pdp(json!({ "actor_id": "u", "actor_type": "human" }), "read", json!({ "type": "spaceship", "id": "x" })),
            StatusCode::BAD_REQUEST,
            "invalid_pdp_request",
        ),
        (
            pdp(
                json!({ "actor_id": "u", "actor_type": "human" }),
                "read",
                json!({ "type": "microdao", "id": "not-a-uuid" }),
            ),
            StatusCode::BAD_REQUEST,
            "invalid_pdp_request",
        ),
        (
            pdp(json!({ "actor_id": "u", "actor_type": "human" }), "fly", json!({ "type": "microdao", "id": dao })),
            StatusCode::BAD_REQUEST,
            "invalid_pdp_request",
        ),
        (
            pdp(
                json!({ "actor_id": "u", "actor_type": "human" }),
                "read",
                json!({ "type": "channel", "id": "c", "attributes": { "org_id": dao, "members": "all" } }),
            ),
            StatusCode::BAD_REQUEST,
            "invalid_pdp_request",
        ),
        (
            pdp(json!({ "actor_id": "u", "actor_type": "human" }), "execute", json!({ "type": "microdao", "id": dao })),
            StatusCode::BAD_REQUEST,
            "invalid_pdp_request",
        ),
    ];
    for (body, status, code) in bad {
        let resp = app.as_(&admin, Method::POST, "/internal/pdp/evaluate").json(&body).send().await.unwrap();
        assert_problem(resp, status, code).await;
    }
    let many: Vec<Value> = (0..101)
        .map(|_| {
            pdp(json!({ "actor_id": "u", "actor_type": "human" }), "read", json!({ "type": "platform", "id": "p" }))
        })
        .collect();
    let resp = app
        .as_(&admin, Method::POST, "/internal/pdp/evaluate/batch")
        .json(&json!({ "requests": many }))
        .send()
        .await
        .unwrap();
    assert_problem(resp, StatusCode::UNPROCESSABLE_ENTITY, "validation_failed").await;
}

const LET_MEMBERS_MANAGE: &str = r#"
@id("members-manage-members")
@reason("members_may_manage")
permit (principal, action == AgentIdP::Action::"manage_members", resource is AgentIdP::Organization)
when { context.org_role == "member" };
"#;

async fn draft(app: &TestApp, by: &Caller, source: &str) -> reqwest::Response {
    app.as_(by, Method::POST, "/api/v1/policies/versions").json(&json!({ "source": source })).send().await.unwrap()
}

async fn add_member_as(app: &TestApp, by: &Caller, org: &str, email: &str) -> StatusCode {
    app.as_(by, Method::POST, &format!("/api/v1/organizations/{org}/members"))
        .json(&json!({ "email": email, "role": "member" }))
        .send()
        .await
        .unwrap()
        .status()
}

#[tokio::test]
async fn policy_store_validates_dry_runs_activates_and_rolls_back() {
    let app = spawn_app().await;
    let admin = app.bootstrap().await;
    let owner = app.org_with_owner(&admin, "Beta", "owner@beta.test").await;
    app.add_member(&owner, &owner.org_id, "dev@beta.test", "member").await;
    let dev = app.sign_in("dev@beta.test", crate::helpers::PASSWORD).await;

    // Invalid: a parse error and a schema error, each with its position.
    let body = assert_problem(
        draft(&app, &owner, "permit(principal, action,").await,
        StatusCode::BAD_REQUEST,
        "invalid_policy",
    )
    .await;
    assert!(!body["errors"].as_array().unwrap().is_empty());
    let body = assert_problem(
        draft(
            &app,
            &owner,
            "permit(principal, action, resource is AgentIdP::Channel)\n  when { resource.colour == \"red\" };",
        )
        .await,
        StatusCode::BAD_REQUEST,
        "invalid_policy",
    )
    .await;
    assert!(body["errors"][0]["message"].as_str().unwrap().contains("at 2:"), "{body}");
    assert_problem(draft(&app, &dev, LET_MEMBERS_MANAGE).await, StatusCode::FORBIDDEN, "insufficient_role").await;

    let v = json_ok(draft(&app, &owner, LET_MEMBERS_MANAGE).await, StatusCode::CREATED).await;
    assert_eq!((v["version"].as_i64(), v["status"].as_str()), (Some(1), Some("draft")));

    // A dry run names the failing example and says why.
    let org = &owner.org_id;
    let dev_actor = json!({ "actor_id": format!("user:{}", dev.user_id), "actor_type": "human", "org_ids": [org], "roles": ["member"] });
    let examples = json!({ "examples": [
        { "name": "members add members", "expect": "permit", "request": pdp(dev_actor.clone(), "manage_members", json!({ "type": "organization", "id": org })) },
        { "name": "members delete the org", "expect": "permit", "request": pdp(dev_actor, "delete", json!({ "type": "organization", "id": org })) },
    ]});
    let report = json_ok(
        app.as_(&owner, Method::POST, "/api/v1/policies/versions/1/test").json(&examples).send().await.unwrap(),
        StatusCode::OK,
    )
    .await;
    assert_eq!(report["passed"], false);
    assert_eq!(report["failures"], json!(["members delete the org"]));
    assert_eq!(report["results"][0]["reason"], "members_may_manage");
    assert_eq!(report["results"][1]["effect"], "deny");

    // Before activation a member cannot add members; after, they can; after a rollback... there is
    // nothing earlier to roll back to.
    assert_eq!(add_member_as(&app, &dev, org, "a@beta.test").await, StatusCode::FORBIDDEN);
    let active = json_ok(
        app.as_(&owner, Method::POST, "/api/v1/policies/versions/1/activate").send().await.unwrap(),
        StatusCode::OK,
    )
    .await;
    assert_eq!(active["status"], "active");
    assert_eq!(add_member_as(&app, &dev, org, "a@beta.test").await, StatusCode::ACCEPTED);
    let resp = app.as_(&owner, Method::POST, "/api/v1/policies/rollback").send().await.unwrap();
    assert_problem(resp, StatusCode::CONFLICT, "nothing_to_roll_back").await;

    // Version 2 takes the grant away; rolling back restores version 1.
    json_ok(draft(&app, &owner, "// nothing beyond the baseline\n").await, StatusCode::CREATED).await;
    json_ok(
        app.as_(&owner, Method::POST, "/api/v1/policies/versions/2/activate").send().await.unwrap(),
        StatusCode::OK,
    )
    .await;
    assert_eq!(add_member_as(&app, &dev, org, "b@beta.test").await, StatusCode::FORBIDDEN);
    let back =
        json_ok(app.as_(&owner, Method::POST, "/api/v1/policies/rollback").send().await.unwrap(), StatusCode::OK).await;
    assert_eq!(back["version"], 1);
    assert_eq!(add_member_as(&app, &dev, org, "b@beta.test").await, StatusCode::ACCEPTED);

    let versions =
        json_ok(app.as_(&owner, Method::GET, "/api/v1/policies/versions").send().await.unwrap(), StatusCode::OK).await;
    let statuses: Vec<&str> = versions.as_array().unwrap().iter().map(|v| v["status"].as_str().unwrap()).collect();
    assert_eq!(statuses, vec!["inactive", "active"]);
    let one =
        json_ok(app.as_(&owner, Method::GET, "/api/v1/policies/versions/1").send().await.unwrap(), StatusCode::OK)
            .await;
    assert_eq!(one["source"], LET_MEMBERS_MANAGE);
    // Another organization's versions are not visible, and its policies do not apply here.
    let resp = app.as_(&admin, Method::GET, "/api/v1/policies/versions/1").send().await.unwrap();
    assert_problem(resp, StatusCode::NOT_FOUND, "not_found").await;
}

#[tokio::test]
async fn a_baseline_forbid_cannot_be_overridden() {
    let app = spawn_app().await;
    let admin = app.bootstrap().await;
    let owner = app.org_with_owner(&admin, "Beta", "owner@beta.test").await;
    let everything = "@reason(\"anything_goes\") permit (principal, action, resource);";
    json_ok(draft(&app, &owner, everything).await, StatusCode::CREATED).await;
    json_ok(
        app.as_(&owner, Method::POST, "/api/v1/policies/versions/1/activate").send().await.unwrap(),
        StatusCode::OK,
    )
    .await;
    // A key without the scope stays without it.
    let key = app.api_key(&owner, Some(&["audit:read"])).await;
    let resp = app.as_(&key, Method::POST, "/api/v1/agents").json(&json!({ "name": "x" })).send().await.unwrap();
    assert_problem(resp, StatusCode::FORBIDDEN, "insufficient_scope").await;
    // Non-members stay out.
    let outsider = json!({ "actor_id": "user:x", "actor_type": "human", "org_ids": [], "roles": [] });
    let d = evaluate(&app, &admin, &pdp(outsider, "read", json!({ "type": "organization", "id": owner.org_id }))).await;
    assert_eq!(d["reason"], "not_microdao_member");
    assert!(d["policy_version"].as_str().unwrap().ends_with("+org:v1"), "{d}");
}

#[tokio::test]
async fn activation_reaches_a_second_instance_without_restart() {
    let app1 = spawn_app().await;
    let app2 = spawn_on(app1.config.clone(), Some(app1.redis.prefix().to_owned())).await;
    let admin = app1.bootstrap().await;
    let owner = app1.org_with_owner(&admin, "Beta", "owner@beta.test").await;
    app1.add_member(&owner, &owner.org_id, "dev@beta.test", "member").await;
    let dev = app1.sign_in("dev@beta.test", crate::helpers::PASSWORD).await;
    assert_eq!(add_member_as(&app2, &dev, &owner.org_id, "a@beta.test").await, StatusCode::FORBIDDEN);
    tokio::time::sleep(Duration::from_millis(300)).await; // subscribers attached
    json_ok(draft(&app1, &owner, LET_MEMBERS_MANAGE).await, StatusCode::CREATED).await;
    json_ok(
        app1.as_(&owner, Method::POST, "/api/v1/policies/versions/1/activate").send().await.unwrap(),
        StatusCode::OK,
    )
    .await;
    let started = Instant::now();
    let mut n = 0;
    loop {
        n += 1;
        let status = add_member_as(&app2, &dev, &owner.org_id, &format!("p{n}@beta.test")).await;
        if status == StatusCode::ACCEPTED {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(3), "the second instance still decides with the old policies");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn decisions_are_logged_with_filters() {
    let app = spawn_app().await;
    let admin = app.bootstrap().await;
    let owner = app.org_with_owner(&admin, "Beta", "owner@beta.test").await;
    app.add_member(&owner, &owner.org_id, "dev@beta.test", "member").await;
    let dev = app.sign_in("dev@beta.test", crate::helpers::PASSWORD).await;
    let resp = app.as_(&dev, Method::GET, "/api/v1/audit").send().await.unwrap();
    let request_id = resp.headers()["x-request-id"].to_str().unwrap().to_owned();
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    let started = Instant::now();
    let deny = loop {
        let page = json_ok(
            app.as_(&owner, Method::GET, "/api/v1/audit/decisions?effect=deny&limit=10").send().await.unwrap(),
            StatusCode::OK,
        )
        .await;
        if let Some(d) = page["items"].as_array().unwrap().iter().find(|d| d["request_id"] == request_id.as_str()) {
            break d.clone();
        }
        assert!(started.elapsed() < Duration::from_secs(3), "the deny was not logged: {page}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(deny["actor_id"], format!("user:{}", dev.user_id));
    assert_eq!(deny["action"], "read");
    assert_eq!(deny["resource_type"], "AuditLog");
    assert_eq!(deny["reason"], "insufficient_role");
    assert!(deny["policy_version"].as_str().unwrap().starts_with("baseline:"));
    // Permits are logged too (sample rate 1.0 by default), and filters narrow.
    let permits = json_ok(
        app.as_(&owner, Method::GET, "/api/v1/audit/decisions?effect=permit&action=read&limit=200")
            .send()
            .await
            .unwrap(),
        StatusCode::OK,
    )
    .await;
    assert!(permits["items"].as_array().unwrap().iter().all(|d| d["effect"] == "permit" && d["action"] == "read"));
    let resp = app.as_(&owner, Method::GET, "/api/v1/audit/decisions?effect=maybe").send().await.unwrap();
    assert_problem(resp, StatusCode::BAD_REQUEST, "invalid_query").await;
}

/// Every method axum routes (HEAD by the GET handler), and one nobody defines.
fn all_methods() -> Vec<Method> {
    let mut m = vec![
        Method::GET,
        Method::HEAD,
        Method::POST,
        Method::PUT,
        Method::PATCH,
        Method::DELETE,
        Method::OPTIONS,
        Method::TRACE,
    ];
    m.push(Method::from_bytes(b"XABCDEF").unwrap());
    m
}

/// Every route template: the documented ones and every declared one.
fn all_routes() -> Vec<String> {
    let doc = agentidp::http::openapi::document();
    let mut routes: Vec<String> = doc.paths.paths.keys().cloned().collect();
    routes.extend(agentidp::policy::routes::RULES.iter().map(|r| r.path.to_owned()));
    routes.sort();
    routes.dedup();
    routes
}

#[test]
fn every_protected_route_declares_its_action() {
    use agentidp::policy::routes::rule_for_method;
    let doc = agentidp::http::openapi::document();
    let mut seen = Vec::new();
    for (path, item) in &doc.paths.paths {
        if agentidp::auth::is_public(Some(path)) {
            continue;
        }
        let documented = |m: &Method| match m.as_str() {
            "GET" | "HEAD" => item.get.is_some(),
            "POST" => item.post.is_some(),
            "PUT" => item.put.is_some(),
            "PATCH" => item.patch.is_some(),
            "DELETE" => item.delete.is_some(),
            "OPTIONS" => item.options.is_some(),
            "TRACE" => item.trace.is_some(),
            _ => false,
        };
        // Every method, not only the documented ones: a method is checked exactly when the route
        // serves it (HEAD as GET); any other is refused by the layer, never let through.
        for method in all_methods() {
            let rule = rule_for_method(&method, path);
            if documented(&method) {
                assert!(rule.is_some(), "{method} {path} is protected but declares no action in policy::routes::RULES");
                seen.push((rule.unwrap().method, path.clone()));
            } else {
                assert!(rule.is_none(), "{method} {path} is declared but not served");
            }
        }
    }
    // And no declaration names a route that does not exist.
    for rule in agentidp::policy::routes::RULES {
        assert!(
            seen.iter().any(|(m, p)| *m == rule.method && p == rule.path),
            "{} {} is declared but not routed",
            rule.method,
            rule.path
        );
    }
    assert!(seen.len() >= 30, "{}", seen.len());
}

#[tokio::test]
async fn a_protected_route_missing_from_the_table_answers_no_method() {
    // A route the table does not declare (and the OpenAPI document does not list), behind the
    // real stack: whatever the method, its handler never runs.
    let app = spawn_app().await;
    let admin = app.bootstrap().await;
    let router = axum::Router::new()
        .route("/api/v1/undeclared", axum::routing::any(|| async { "the handler ran" }))
        .route("/auth/me", axum::routing::any(|| async { "the handler ran" }));
    let router = agentidp::http::middleware::stack(router, &app.state).with_state(app.state.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        axum::serve(listener, router.into_make_service_with_connect_info::<std::net::SocketAddr>()).await
    });
    for method in all_methods() {
        let resp = app
            .client
            .request(method.clone(), format!("{base}/api/v1/undeclared"))
            .bearer_auth(&admin.token)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::NOT_FOUND, "{method} /api/v1/undeclared");
        // A declared route serves its declared methods (GET, and HEAD as GET) and no other.
        let resp = app
            .client
            .request(method.clone(), format!("{base}/auth/me"))
            .bearer_auth(&admin.token)
            .send()
            .await
            .unwrap();
        if method == Method::GET || method == Method::HEAD {
            assert_eq!(resp.status(), StatusCode::OK, "{method} /auth/me");
        } else {
            assert_eq!(resp.status(), StatusCode::METHOD_NOT_ALLOWED, "{method} /auth/me");
            assert_eq!(resp.headers()["allow"], "GET, HEAD", "{method} /auth/me");
        }
    }
}

/// The ids a route template's parameters take.
struct Ids {
    org: String,
    user: String,
    agent: String,
    credential: String,
    api_key: String,
    version: String,
}

impl Ids {
    fn made_up() -> Self {
        let id = || uuid::Uuid::new_v4().to_string();
        Self { org: id(), user: id(), agent: id(), credential: id(), api_key: id(), version: "999".into() }
    }

    fn path(&self, template: &str) -> String {
        let id = if template.starts_with("/api/v1/organizations/") {
            &self.org
        } else if template.starts_with("/api/v1/agents/") {
            &self.agent
        } else {
            &self.api_key
        };
        template
            .replace("{id}", id)
            .replace("{user_id}", &self.user)
            .replace("{cred_id}", &self.credential)
            .replace("{version}", &self.version)
    }

    /// A request body that passes the route's extractor, naming this organization where the
    /// route takes one in the body.
    fn body(&self, template: &str) -> Value {
        let ask = pdp(
            json!({ "actor_id": "user:1", "actor_type": "human", "org_ids": [self.org], "roles": ["owner"] }),
            "read",
            json!({ "type": "microdao", "id": self.org }),
        );
        match template {
            "/internal/pdp/evaluate" => ask,
            "/internal/pdp/evaluate/batch" => json!({ "requests": [ask] }),
            "/api/v1/policies/versions/{version}/test" => {
                json!({ "examples": [{ "expect": "permit", "request": ask }] })
            }
            "/api/v1/organizations/{id}/members" => json!({ "email": "new@member.test", "role": "member" }),
            "/api/v1/organizations/{id}/members/{user_id}" => json!({ "role": "admin" }),
            "/api/v1/agents/{id}" => json!({ "name": "renamed" }),
            "/api/v1/agents/{id}/room" => json!({ "room_id": self.api_key }),
            "/api/v1/agents/{id}/node" => json!({ "node_id": self.api_key }),
            "/api/v1/agents/{id}/keys" => json!({ "jwk": {
                "kty": "OKP", "crv": "Ed25519", "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo" } }),
            _ => json!({}),
        }
    }
}

/// Whether a route names another organization's objects (in its path or, for the decision
/// point, its body); the others act in the caller's own organization.
fn names_an_object(template: &str) -> bool {
    template.contains('{') || template.starts_with("/internal/pdp/")
}

#[tokio::test]
async fn org_a_credentials_find_nothing_of_org_b_by_any_method() {
    use agentidp::policy::routes::{allowed_methods, rule_for_method};
    let app = spawn_app().await;
    let admin = app.bootstrap().await;
    let a = app.org_with_owner(&admin, "Alpha", "owner@alpha.test").await;
    let b = app.org_with_owner(&admin, "Beta", "owner@beta.test").await;
    // Org B's objects.
    let b_agent = app.agent_client(&b, &["agents:read"]).await;
    app.api_key(&b, None).await;
    let b_key: uuid::Uuid = sqlx::query_scalar("select api_key_id from api_key where organization_id = $1::uuid")
        .bind(&b.org_id)
        .fetch_one(&app.db)
        .await
        .unwrap();
    json_ok(draft(&app, &b, LET_MEMBERS_MANAGE).await, StatusCode::CREATED).await;
    let b_ids = Ids {
        org: b.org_id.clone(),
        user: b.user_id.clone(),
        agent: b_agent.agent_id.clone(),
        credential: b_agent.credential_id.clone(),
        api_key: b_key.to_string(),
        version: "1".into(),
    };
    // Org A's credentials of every type.
    let a_agent = app.agent_client(&a, &["agents:read", "orgs:read", "members:read"]).await;
    let a_agent_token =
        Caller { token: app.access_token(&a_agent).await, org_id: a.org_id.clone(), user_id: a_agent.agent_id.clone() };
    let credentials = [
        ("session", a.clone()),
        ("api key", app.api_key(&a, None).await),
        ("service key", service_key(&app, &a).await),
        ("agent token", a_agent_token),
    ];
    let send = |by: &Caller, method: &Method, template: &str, ids: &Ids| {
        let mut req = app.as_(by, method.clone(), &ids.path(template));
        if [Method::POST, Method::PUT, Method::PATCH].contains(method) {
            req = req.json(&ids.body(template));
        }
        req.send()
    };
    let mut checked = 0;
    for template in all_routes() {
        if agentidp::auth::is_public(Some(&template)) {
            continue;
        }
        for method in all_methods() {
            for (kind, by) in &credentials {
                let what = format!("{kind}: {method} {template}");
                if rule_for_method(&method, &template).is_none() {
                    // Not served: refused with what is, whatever the credential.
                    let resp = send(by, &method, &template, &b_ids).await.unwrap();
                    assert_eq!(resp.status(), StatusCode::METHOD_NOT_ALLOWED, "{what}");
                    let mut allow: Vec<String> =
                        resp.headers()["allow"].to_str().unwrap().split(',').map(|m| m.trim().to_owned()).collect();
                    allow.sort();
                    let mut expected = allowed_methods(&template);
                    expected.sort();
                    assert_eq!(allow, expected, "{what}");
                    checked += 1;
                    continue;
                }
                if !names_an_object(&template) {
                    continue;
                }
                let of_b = send(by, &method, &template, &b_ids).await.unwrap();
                let status = of_b.status();
                let headers_only = method == Method::HEAD;
                let body_b: Value = if headers_only { Value::Null } else { of_b.json().await.unwrap_or(Value::Null) };
                assert!(!status.is_success(), "{what}: {status} {body_b}");
                // B's objects look exactly like objects that do not exist.
                let made_up = send(by, &method, &template, &Ids::made_up()).await.unwrap();
                assert_eq!(status, made_up.status(), "{what}");
                if !headers_only {
                    let body_x: Value = made_up.json().await.unwrap_or(Value::Null);
                    assert_eq!(body_b["code"], body_x["code"], "{what}");
                }
                // And where the credential may use the route at all, they are not found.
                let usable = match (*kind, template.starts_with("/internal/pdp/")) {
                    ("service key", pdp) => pdp || template.starts_with("/api/v1/organizations/{id}"),
                    ("session", pdp) => !pdp,
                    (_, pdp) => !pdp && template.starts_with("/api/v1/organizations/{id}"),
                };
                if usable {
                    assert_eq!(status, StatusCode::NOT_FOUND, "{what}: {body_b}");
                } else {
                    assert!(status == StatusCode::NOT_FOUND || status == StatusCode::FORBIDDEN, "{what}: {status}");
                }
                checked += 1;
            }
        }
    }
    assert!(checked > 500, "{checked}");
    // Nothing of B changed.
    let agent = json_ok(
        app.as_(&b, Method::GET, &format!("/api/v1/agents/{}", b_agent.agent_id)).send().await.unwrap(),
        StatusCode::OK,
    )
    .await;
    assert_eq!(agent["name"], "worker");
}

#[tokio::test]
async fn service_keys_are_service_actors_that_may_ask_the_pdp() {
    let app = spawn_app().await;
    let admin = app.bootstrap().await;
    let owner = app.org_with_owner(&admin, "Beta", "owner@beta.test").await;
    let created = json_ok(
        app.as_(&owner, Method::POST, "/auth/api-keys")
            .json(&json!({ "description": "gateway", "service": true, "scopes": ["pdp:evaluate"] }))
            .send()
            .await
            .unwrap(),
        StatusCode::CREATED,
    )
    .await;
    assert_eq!(created["service"], true);
    let service = Caller {
        token: created["key"].as_str().unwrap().to_owned(),
        org_id: owner.org_id.clone(),
        user_id: String::new(),
    };
    let me = json_ok(app.as_(&service, Method::GET, "/auth/me").send().await.unwrap(), StatusCode::OK).await;
    assert_eq!(me["actor_type"], "service");
    assert_eq!(me["actor_id"], format!("service:{}", created["id"].as_str().unwrap()));
    let body = pdp(
        json!({ "actor_id": "user:1", "actor_type": "human", "org_ids": [owner.org_id], "roles": ["owner"] }),
        "read",
        json!({ "type": "organization", "id": owner.org_id }),
    );
    let d = evaluate(&app, &service, &body).await;
    assert_eq!(d["reason"], "microdao_owner");
    // It is a service, not its creator: nothing else.
    let resp = app.as_(&service, Method::POST, "/api/v1/keys/rotate").send().await.unwrap();
    let body = assert_problem(resp, StatusCode::FORBIDDEN, "insufficient_scope").await;
    assert!(body["detail"].is_string());
    // A service holds no role in any organization: its objects are hidden from it, as from
    // any outsider.
    let resp = app.as_(&service, Method::GET, &format!("/api/v1/organizations/{}", owner.org_id)).send().await.unwrap();
    assert_problem(resp, StatusCode::NOT_FOUND, "not_found").await;
    // Members cannot make service keys.
    app.add_member(&owner, &owner.org_id, "dev@beta.test", "member").await;
    let dev = app.sign_in("dev@beta.test", crate::helpers::PASSWORD).await;
    let resp = app
        .as_(&dev, Method::POST, "/auth/api-keys")
        .json(&json!({ "description": "x", "service": true }))
        .send()
        .await
        .unwrap();
    assert_problem(resp, StatusCode::FORBIDDEN, "insufficient_role").await;
}

#[tokio::test]
async fn a_system_admins_key_bound_to_one_org_acts_only_there() {
    let app = spawn_app().await;
    let admin = app.bootstrap().await;
    let other = app.org_with_owner(&admin, "Beta", "owner@beta.test").await;
    // The system admin's session reaches every organization...
    let resp = app.as_(&admin, Method::GET, &format!("/api/v1/organizations/{}", other.org_id)).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    // ...but a key made in Acme is bound to Acme: elsewhere it is an outsider.
    let key = app.api_key(&admin, None).await;
    let resp = app.as_(&key, Method::GET, &format!("/api/v1/organizations/{}", admin.org_id)).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    for path in
        [format!("/api/v1/organizations/{}", other.org_id), format!("/api/v1/organizations/{}/members", other.org_id)]
    {
        let resp = app.as_(&key, Method::GET, &path).send().await.unwrap();
        assert_problem(resp, StatusCode::NOT_FOUND, "not_found").await;
    }
    let resp = app
        .as_(&key, Method::POST, &format!("/api/v1/organizations/{}/revoke-tokens", other.org_id))
        .send()
        .await
        .unwrap();
    assert_problem(resp, StatusCode::NOT_FOUND, "not_found").await;
    // Nor does it act on the platform, beyond every organization.
    let resp =
        app.as_(&key, Method::POST, "/api/v1/organizations").json(&json!({ "name": "Gamma" })).send().await.unwrap();
    assert_problem(resp, StatusCode::FORBIDDEN, "system_admin_required").await;
}

/// A service key of `owner`'s organization, asking the PDP.
async fn service_key(app: &TestApp, owner: &Caller) -> Caller {
    let created = json_ok(
        app.as_(owner, Method::POST, "/auth/api-keys")
            .json(&json!({ "description": "gateway", "service": true, "scopes": ["pdp:evaluate"] }))
            .send()
            .await
            .unwrap(),
        StatusCode::CREATED,
    )
    .await;
    Caller { token: created["key"].as_str().unwrap().to_owned(), org_id: owner.org_id.clone(), user_id: String::new() }
}

/// Waits until the decision log holds a decision made for `org_id` about `resource_id`.
async fn wait_logged(app: &TestApp, org_id: &str, resource_id: &str) {
    let started = Instant::now();
    loop {
        let n: i64 = sqlx::query_scalar(
            "select count(*) from decision_log where organization_id = $1::uuid and resource_id = $2",
        )
        .bind(org_id)
        .bind(resource_id)
        .fetch_one(&app.db)
        .await
        .unwrap();
        if n > 0 {
            return;
        }
        assert!(started.elapsed() < Duration::from_secs(5), "no decision logged for {resource_id} in {org_id}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn the_pdp_answers_org_bound_callers_about_their_own_org_only() {
    let app = spawn_app().await;
    let admin = app.bootstrap().await;
    let a = app.org_with_owner(&admin, "Alpha", "owner@alpha.test").await;
    let b = app.org_with_owner(&admin, "Beta", "owner@beta.test").await;
    let service = service_key(&app, &a).await;
    let about = |org: &str, id: &str| {
        pdp(
            json!({ "actor_id": "user:1", "actor_type": "human", "org_ids": [org], "roles": ["owner"] }),
            "read",
            json!({ "type": "tool", "id": id, "attributes": { "org_id": org, "allowed_agents": [] } }),
        )
    };
    let organization = |org: &str| {
        pdp(
            json!({ "actor_id": "user:1", "actor_type": "human", "org_ids": [org], "roles": ["owner"] }),
            "manage",
            json!({ "type": "microdao", "id": org }),
        )
    };
    // Its own organization: answered.
    let d = evaluate(&app, &service, &organization(&a.org_id)).await;
    assert_eq!(d["reason"], "microdao_owner", "{d}");
    // Another one: 404, whether one request, a batch with one such request, or a dry-run example.
    let resp =
        app.as_(&service, Method::POST, "/internal/pdp/evaluate").json(&organization(&b.org_id)).send().await.unwrap();
    assert_problem(resp, StatusCode::NOT_FOUND, "not_found").await;
    let resp = app
        .as_(&service, Method::POST, "/internal/pdp/evaluate")
        .json(&about(&b.org_id, "b-single"))
        .send()
        .await
        .unwrap();
    assert_problem(resp, StatusCode::NOT_FOUND, "not_found").await;
    let batch = json!({ "requests": [about(&a.org_id, "a-batch"), about(&b.org_id, "b-batch")] });
    let resp = app.as_(&service, Method::POST, "/internal/pdp/evaluate/batch").json(&batch).send().await.unwrap();
    assert_problem(resp, StatusCode::NOT_FOUND, "not_found").await;
    json_ok(draft(&app, &a, "// nothing beyond the baseline\n").await, StatusCode::CREATED).await;
    let examples = json!({ "examples": [{ "expect": "permit", "request": about(&b.org_id, "b-dry") }] });
    let resp = app.as_(&a, Method::POST, "/api/v1/policies/versions/1/test").json(&examples).send().await.unwrap();
    assert_problem(resp, StatusCode::NOT_FOUND, "not_found").await;
    // A system admin's session (bound to no organization) asks about any.
    let d = evaluate(&app, &admin, &organization(&b.org_id)).await;
    assert_eq!(d["reason"], "microdao_owner", "{d}");
    // Decisions are logged in the organization they were made for, and none was made for Beta
    // by Alpha's key (the log is written in order: Alpha's last decision comes after them).
    evaluate(&app, &service, &about(&a.org_id, "a-last")).await;
    wait_logged(&app, &a.org_id, "a-last").await;
    wait_logged(&app, &b.org_id, &b.org_id).await;
    let from_alpha: i64 = sqlx::query_scalar(
        "select count(*) from decision_log where organization_id = $1::uuid and resource_id like 'b-%'",
    )
    .bind(&b.org_id)
    .fetch_one(&app.db)
    .await
    .unwrap();
    assert_eq!(from_alpha, 0, "Alpha's key had decisions made for Beta");
    let a_batch: i64 = sqlx::query_scalar("select count(*) from decision_log where resource_id = 'a-batch'")
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert_eq!(a_batch, 0, "a refused batch decides nothing");
}

#[tokio::test]
async fn the_pdp_takes_microdao_slugs_and_org_prefixed_ids() {
    let app = spawn_app().await;
    let admin = app.bootstrap().await;
    let dao = app.org_with_owner(&admin, "DAARION", "owner@daarion.test").await;
    let owner_of = |ids: Value| json!({ "actor_id": "user:7", "actor_type": "human", "microdao_ids": ids, "roles": ["microdao_owner"] });
    // The original example, verbatim, and the same organization named every other way.
    for (resource_id, member_of) in [
        ("microdao:daarion".to_owned(), json!(["microdao:daarion"])),
        (format!("org:{}", dao.org_id), json!(["microdao:daarion"])),
        (dao.org_id.clone(), json!([format!("org:{}", dao.org_id)])),
        ("microdao:daarion".to_owned(), json!([dao.org_id])),
    ] {
        let body = pdp(owner_of(member_of), "manage", json!({ "type": "microdao", "id": resource_id }));
        let d = evaluate(&app, &admin, &body).await;
        assert_eq!((d["effect"].as_str(), d["reason"].as_str()), (Some("permit"), Some("microdao_owner")), "{d}");
    }
    let channel = json!({ "type": "channel", "id": "general", "attributes": { "microdao_id": "microdao:daarion", "members": ["user:7"] } });
    let d = evaluate(&app, &admin, &pdp(owner_of(json!(["microdao:daarion"])), "send_message", channel)).await;
    assert_eq!(d["reason"], "channel_member", "{d}");
    // The decision is logged in the organization the slug names.
    wait_logged(&app, &dao.org_id, "general").await;

    // A slug no organization has answers as an organization id no organization has.
    let unknown_id = uuid::Uuid::new_v4().to_string();
    for (resource_id, member_of) in
        [("microdao:nowhere".to_owned(), json!(["microdao:nowhere"])), (unknown_id.clone(), json!([unknown_id]))]
    {
        let d = evaluate(
            &app,
            &admin,
            &pdp(owner_of(member_of), "manage", json!({ "type": "microdao", "id": resource_id })),
        )
        .await;
        assert_eq!(d["reason"], "microdao_owner", "{d}");
    }
    for resource_id in ["microdao:nowhere", &unknown_id] {
        let d =
            evaluate(&app, &admin, &pdp(owner_of(json!([])), "read", json!({ "type": "microdao", "id": resource_id })))
                .await;
        assert_eq!(d["reason"], "not_microdao_member", "{d}");
    }
    let service = service_key(&app, &dao).await;
    for resource_id in ["microdao:nowhere", &unknown_id] {
        let body = pdp(owner_of(json!([])), "read", json!({ "type": "microdao", "id": resource_id }));
        let resp = app.as_(&service, Method::POST, "/internal/pdp/evaluate").json(&body).send().await.unwrap();
        assert_problem(resp, StatusCode::NOT_FOUND, "not_found").await;
    }
    // A service key of the organization names it by its slug too.
    let d = evaluate(
        &app,
        &service,
        &pdp(owner_of(json!(["microdao:daarion"])), "read", json!({ "type": "microdao", "id": "microdao:daarion" })),
    )
    .await;
    assert_eq!(d["reason"], "microdao_owner", "{d}");
    // What is not an organization reference at all is a 400.
    for bad in ["microdao:Not A Slug!", "user:7", "daarion"] {
        let body = pdp(owner_of(json!([])), "read", json!({ "type": "microdao", "id": bad }));
        let resp = app.as_(&admin, Method::POST, "/internal/pdp/evaluate").json(&body).send().await.unwrap();
        assert_problem(resp, StatusCode::BAD_REQUEST, "invalid_pdp_request").await;
    }
}

#[tokio::test]
async fn an_agent_reads_its_own_record_only() {
    let app = spawn_app().await;
    let admin = app.bootstrap().await;
    let me = app.agent_client(&admin, &["agents:read"]).await;
    let other = app.agent_client(&admin, &["agents:read"]).await;
    let token =
        Caller { token: app.access_token(&me).await, org_id: admin.org_id.clone(), user_id: me.agent_id.clone() };
    let own = json_ok(
        app.as_(&token, Method::GET, &format!("/api/v1/agents/{}", me.agent_id)).send().await.unwrap(),
        StatusCode::OK,
    )
    .await;
    assert_eq!(own["id"], me.agent_id.as_str());
    let creds = json_ok(
        app.as_(&token, Method::GET, &format!("/api/v1/agents/{}/credentials", me.agent_id)).send().await.unwrap(),
        StatusCode::OK,
    )
    .await;
    assert!(creds.to_string().contains(&me.client_id), "{creds}");
    // Not the other agents of its organization, nor their client ids, nor the list of them; another
    // agent's record is 404 to it, as one that does not exist, so that it learns of none.
    for (path, status, code) in [
        (format!("/api/v1/agents/{}", other.agent_id), StatusCode::NOT_FOUND, "not_found"),
        (format!("/api/v1/agents/{}/credentials", other.agent_id), StatusCode::NOT_FOUND, "not_found"),
        (format!("/api/v1/agents/{}", uuid::Uuid::new_v4()), StatusCode::NOT_FOUND, "not_found"),
        ("/api/v1/agents".to_owned(), StatusCode::FORBIDDEN, "insufficient_role"),
    ] {
        let resp = app.as_(&token, Method::GET, &path).send().await.unwrap();
        let body = assert_problem(resp, status, code).await;
        assert!(!body.to_string().contains(&other.client_id));
    }
    // Humans of the organization still list them all.
    let list = json_ok(app.as_(&admin, Method::GET, "/api/v1/agents").send().await.unwrap(), StatusCode::OK).await;
    assert!(list.to_string().contains(&other.agent_id), "{list}");
}

/// The ids of requests whose decisions are in the decision log.
async fn logged_requests(db: &mut sqlx::PgConnection, request_ids: &[String]) -> i64 {
    sqlx::query_scalar("select count(distinct request_id) from decision_log where request_id = any($1)")
        .bind(request_ids)
        .fetch_one(db)
        .await
        .unwrap()
}

/// How many decisions the rows of these requests stand for (a folded row counts its repeats).
async fn logged_decisions(db: &mut sqlx::PgConnection, request_ids: &[String]) -> i64 {
    sqlx::query_scalar("select coalesce(sum(decision_count), 0)::int8 from decision_log where request_id = any($1)")
        .bind(request_ids)
        .fetch_one(db)
        .await
        .unwrap()
}

async fn decided_request(app: &TestApp, by: &Caller) -> String {
    let resp = app.as_(by, Method::GET, "/api/v1/agents").send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    resp.headers()["x-request-id"].to_str().unwrap().to_owned()
}

#[tokio::test]
async fn decisions_still_queued_at_shutdown_are_written_before_exit() {
    use sqlx::Connection;
    let mut app = spawn_app().await;
    let admin = app.bootstrap().await;
    let mut db = sqlx::PgConnection::connect(&app.db_url).await.unwrap();
    let first = decided_request(&app, &admin).await;
    let started = Instant::now();
    while logged_requests(&mut db, std::slice::from_ref(&first)).await == 0 {
        assert!(started.elapsed() < Duration::from_secs(5), "the decision log writer is not writing");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Postgres holds the writer's next insert, so that decisions are still queued when the
    // server stops.
    let mut blocker = sqlx::PgConnection::connect(&app.db_url).await.unwrap();
    let mut lock = blocker.begin().await.unwrap();
    sqlx::query("lock table decision_log in exclusive mode").execute(&mut *lock).await.unwrap();
    let before = logged_decisions(&mut db, std::slice::from_ref(&first)).await;
    let mut queued = Vec::new();
    for _ in 0..5 {
        queued.push(decided_request(&app, &admin).await);
    }
    let server = app.begin_shutdown();
    // Once the server no longer accepts connections it is stopping; then Postgres lets go.
    let started = Instant::now();
    while tokio::net::TcpStream::connect(app.addr).await.is_ok() {
        assert!(started.elapsed() < Duration::from_secs(10), "the server keeps accepting");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    lock.rollback().await.unwrap();
    tokio::time::timeout(Duration::from_secs(15), server).await.expect("stops in time").unwrap().unwrap();
    // The app's pool closed with it. The five repeat the first request's decisions: they are
    // counted on its rows (or are rows of their own, had its fold window ended meanwhile).
    let mut all = queued.clone();
    all.push(first);
    assert_eq!(logged_decisions(&mut db, &all).await, 6 * before, "decisions queued at shutdown were lost");
}

#[tokio::test]
async fn repeated_permits_are_one_row_with_their_count_and_each_deny_is_a_row() {
    use sqlx::Connection;
    let app = spawn_app_with(&[("policy.permit_fold_secs", json!(1))]).await;
    let admin = app.bootstrap().await;
    app.add_member(&admin, &admin.org_id, "dev@acme.test", "member").await;
    let dev = app.sign_in("dev@acme.test", crate::helpers::PASSWORD).await;
    let mut db = sqlx::PgConnection::connect(&app.db_url).await.unwrap();
    let permits: Vec<String> = {
        let mut v = Vec::new();
        for _ in 0..5 {
            v.push(decided_request(&app, &admin).await);
        }
        v
    };
    let mut denies = Vec::new();
    for _ in 0..3 {
        let resp = app.as_(&dev, Method::GET, "/api/v1/audit").send().await.unwrap();
        assert_eq!(resp.status(), StatusCode::FORBIDDEN);
        denies.push(resp.headers()["x-request-id"].to_str().unwrap().to_owned());
    }
    // The first permit's rows stand for all five once its window ends; the other four have none.
    let per_request = {
        let started = Instant::now();
        loop {
            let rows = logged_requests(&mut db, std::slice::from_ref(&permits[0])).await;
            let decisions = logged_decisions(&mut db, std::slice::from_ref(&permits[0])).await;
            if rows > 0 && decisions == 5 * rows {
                break rows;
            }
            assert!(started.elapsed() < Duration::from_secs(10), "the count was not written: {decisions}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    assert_eq!(logged_requests(&mut db, &permits[1..]).await, 0, "a repeated permit was a row of its own");
    let rows: i64 = sqlx::query_scalar("select count(*) from decision_log where request_id = $1")
        .bind(&permits[0])
        .fetch_one(&mut db)
        .await
        .unwrap();
    assert_eq!(rows, per_request);
    // Each deny is its own row, counted once.
    assert_eq!(logged_requests(&mut db, &denies).await, 3);
    assert_eq!(logged_decisions(&mut db, &denies).await, 3);
    // The API shows the count and the last time.
    let page = json_ok(
        app.as_(&admin, Method::GET, "/api/v1/audit/decisions?effect=permit&limit=200").send().await.unwrap(),
        StatusCode::OK,
    )
    .await;
    let row = page["items"].as_array().unwrap().iter().find(|d| d["request_id"] == permits[0].as_str()).unwrap();
    assert_eq!(row["decision_count"], 5, "{row}");
    assert!(row["last_decided_at"].as_str().unwrap() >= row["decided_at"].as_str().unwrap(), "{row}");
    // After the window, the same permit is a row again.
    let again = decided_request(&app, &admin).await;
    let started = Instant::now();
    while logged_requests(&mut db, std::slice::from_ref(&again)).await == 0 {
        assert!(started.elapsed() < Duration::from_secs(5), "a permit after the window was not a row");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn an_activation_during_a_slow_sync_stays_installed() {
    let app = spawn_app().await;
    let admin = app.bootstrap().await;
    let owner = app.org_with_owner(&admin, "Beta", "owner@beta.test").await;
    app.add_member(&owner, &owner.org_id, "dev@beta.test", "member").await;
    let dev = app.sign_in("dev@beta.test", crate::helpers::PASSWORD).await;
    json_ok(draft(&app, &owner, LET_MEMBERS_MANAGE).await, StatusCode::CREATED).await;
    // The sync reads Postgres (no active version yet); the activation lands before it applies
    // what it read.
    agentidp::policy::sync_all_pausing(&app.state, async {
        json_ok(
            app.as_(&owner, Method::POST, "/api/v1/policies/versions/1/activate").send().await.unwrap(),
            StatusCode::OK,
        )
        .await;
    })
    .await
    .unwrap();
    let org: uuid::Uuid = owner.org_id.parse().unwrap();
    assert_eq!(app.state.policy().installed().get(&org), Some(&1), "the sync uninstalled the newer activation");
    assert_eq!(add_member_as(&app, &dev, &owner.org_id, "a@beta.test").await, StatusCode::ACCEPTED);
    // A sync that reads after it agrees, and one that reads an older state changes nothing.
    agentidp::policy::sync_all(&app.state).await.unwrap();
    assert_eq!(app.state.policy().installed().get(&org), Some(&1));
}
