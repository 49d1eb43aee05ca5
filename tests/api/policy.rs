//! Policy: the PDP over HTTP with the original examples, the policy store (validate, dry run,
//! activate, roll back), activation across instances, the decision log, and a walk of the router
//! that fails on any protected route without a declared action.

use std::time::{Duration, Instant};

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::helpers::{Caller, TestApp, assert_problem, json_ok, spawn_app, spawn_on};

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

#[test]
fn every_protected_route_declares_its_action() {
    let doc = agentidp::http::openapi::document();
    let mut seen = Vec::new();
    for (path, item) in &doc.paths.paths {
        let methods = [
            ("GET", item.get.is_some()),
            ("POST", item.post.is_some()),
            ("PUT", item.put.is_some()),
            ("PATCH", item.patch.is_some()),
            ("DELETE", item.delete.is_some()),
        ];
        for (method, present) in methods {
            if !present || agentidp::auth::is_public(Some(path)) {
                continue;
            }
            assert!(
                agentidp::policy::routes::rule_for(method, path).is_some(),
                "{method} {path} is protected but declares no action in policy::routes::RULES"
            );
            seen.push((method, path.clone()));
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
    let resp = app.as_(&service, Method::GET, &format!("/api/v1/organizations/{}", owner.org_id)).send().await.unwrap();
    assert_problem(resp, StatusCode::FORBIDDEN, "insufficient_scope").await;
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
