//! Delegations: the lifecycle with the original broker's field names, delegated tokens verified by
//! an ordinary JWT library, RFC 8693 token exchange, the command budget under 200 concurrent
//! calls, ceremonies, chains, cascading revocation (parent → child → tokens; delegator credential
//! → delegations), spend budgets, two instances, expiry, events at a webhook endpoint, bad input.

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use axum::{body::Bytes, extract::State, routing::post};
use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD as B64};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::helpers::{Caller, Client, TestApp, assert_problem, json_ok, spawn_app, spawn_app_with, spawn_on};

const EXCHANGE: &str = "urn:ietf:params:oauth:grant-type:token-exchange";
const AT: &str = "urn:ietf:params:oauth:token-type:access_token";

fn claims_of(token: &str) -> Value {
    let c = token.split('.').nth(1).unwrap();
    serde_json::from_slice(&B64.decode(c).unwrap()).unwrap()
}

async fn oauth_error(resp: reqwest::Response, status: StatusCode, error: &str) -> Value {
    assert_eq!(resp.headers()["cache-control"], "no-store");
    let got = resp.status();
    assert_eq!(resp.headers()["content-type"], "application/json");
    let body: Value = resp.json().await.unwrap();
    assert_eq!(got, status, "{body}");
    assert_eq!(body["error"], error, "{body}");
    body
}

impl TestApp {
    async fn delegate(&self, by: &Caller, body: Value) -> Value {
        json_ok(
            self.as_(by, Method::POST, "/api/v1/delegations").json(&body).send().await.unwrap(),
            StatusCode::CREATED,
        )
        .await
    }

    async fn delegation(&self, by: &Caller, id: &str) -> Value {
        json_ok(self.as_(by, Method::GET, &format!("/api/v1/delegations/{id}")).send().await.unwrap(), StatusCode::OK)
            .await
    }

    async fn command(&self, token: &str, id: &str, command: &str) -> Value {
        let resp = self
            .client
            .post(self.url(&format!("/api/v1/delegations/{id}/commands")))
            .bearer_auth(token)
            .json(&json!({ "command": command }))
            .send()
            .await
            .unwrap();
        json_ok(resp, StatusCode::OK).await
    }

    async fn exchange(&self, form: &[(&str, &str)]) -> reqwest::Response {
        self.client.post(self.url("/api/v1/token")).form(form).send().await.unwrap()
    }
}

/// An organization's owner, and an agent that may carry these scopes, with a credential.
async fn setup(app: &TestApp, scopes: &[&str]) -> (Caller, Client) {
    let admin = app.bootstrap().await;
    let client = app.agent_client(&admin, scopes).await;
    (admin, client)
}

/// Waits (bounded) until `token` is refused by `app`.
async fn refused_soon(app: &TestApp, token: &str, what: &str) -> Duration {
    let started = Instant::now();
    while app.me_status(token).await != StatusCode::UNAUTHORIZED {
        assert!(started.elapsed() < Duration::from_secs(2), "{what}: the token still works");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    started.elapsed()
}

#[tokio::test]
async fn the_lifecycle_with_the_original_field_names_and_a_token_any_jwt_library_verifies() {
    let app = spawn_app().await;
    let (admin, client) = setup(&app, &["tools:read", "agents:read", "delegations:read"]).await;
    let created = app
        .delegate(
            &admin,
            json!({ "agent_id": client.agent_id, "purpose": "triage the inbox",
                    "scope": { "max_commands": 3, "max_ttl_minutes": 30,
                               "scopes": ["tools:read", "agents:read", "delegations:read"] } }),
        )
        .await;
    for key in
        ["delegation_id", "status", "agent_principal", "agent_token", "expires_at", "max_commands", "chronicle_cid"]
    {
        assert!(!created[key].is_null(), "{key} in {created}");
    }
    assert_eq!(created["status"], "active");
    assert_eq!(created["max_commands"], 3);
    assert_eq!(created["agent_principal"]["agent_id"], client.agent_id);
    assert!(created["agent_principal"]["did"].as_str().unwrap().starts_with("did:web:"));
    assert!(created["chronicle_cid"].as_str().unwrap().starts_with("sha256:"));
    let id = created["delegation_id"].as_str().unwrap().to_owned();
    let token = created["agent_token"].as_str().unwrap().to_owned();

    // Verified by jsonwebtoken against the JWKS, not by our code.
    let jwks: jsonwebtoken::jwk::JwkSet = app.get("/.well-known/jwks.json").await.json().await.unwrap();
    let header = jsonwebtoken::decode_header(&token).unwrap();
    let key = jsonwebtoken::DecodingKey::from_jwk(jwks.find(header.kid.as_deref().unwrap()).unwrap()).unwrap();
    let mut validation = jsonwebtoken::Validation::new(header.alg);
    validation.set_audience(&[app.config.server.public_url.as_str()]);
    let claims = jsonwebtoken::decode::<Value>(&token, &key, &validation).unwrap().claims;
    assert_eq!(claims["sub"], format!("user:{}", admin.user_id));
    assert_eq!(claims["act"], json!({ "sub": format!("agent:{}", client.agent_id) }));
    assert_eq!(claims["delegation_id"], id);
    assert_eq!(claims["scope"], "tools:read agents:read delegations:read");
    let expires_at = time::OffsetDateTime::parse(
        created["expires_at"].as_str().unwrap(),
        &time::format_description::well_known::Rfc3339,
    )
    .unwrap();
    assert!(claims["exp"].as_i64().unwrap() <= expires_at.unix_timestamp());

    // The token acts as the agent; introspection shows `act` and `delegation_id`.
    let me =
        json_ok(app.client.get(app.url("/auth/me")).bearer_auth(&token).send().await.unwrap(), StatusCode::OK).await;
    assert_eq!(me["actor_id"], format!("agent:{}", client.agent_id));
    let intro = json_ok(
        app.as_(&admin, Method::POST, "/api/v1/token/introspect")
            .form(&[("token", token.as_str())])
            .send()
            .await
            .unwrap(),
        StatusCode::OK,
    )
    .await;
    assert_eq!(intro["active"], true);
    assert_eq!(intro["act"]["sub"], format!("agent:{}", client.agent_id));
    assert_eq!(intro["delegation_id"], id);

    let info = app.delegation(&admin, &id).await;
    assert_eq!(info["status"], "active");
    assert_eq!(info["commands_executed"], 0);
    assert_eq!(info["commands_remaining"], 3);
    assert!(info["ttl_remaining_seconds"].as_i64().unwrap() > 1700);
    assert_eq!(info["chain"], json!([format!("user:{}", admin.user_id), format!("agent:{}", client.agent_id)]));
    assert_eq!(info["purpose"], "triage the inbox");
    let d = app.command(&token, &id, "ls").await;
    assert_eq!((d["decision"].as_str(), d["commands_remaining"].as_i64()), (Some("permit"), Some(2)));
    // The agent reads its own delegation with its delegated token.
    let own = json_ok(
        app.client.get(app.url(&format!("/api/v1/delegations/{id}"))).bearer_auth(&token).send().await.unwrap(),
        StatusCode::OK,
    )
    .await;
    assert_eq!(own["commands_executed"], 1);

    let list = json_ok(
        app.as_(&admin, Method::GET, "/api/v1/delegations?status=active").send().await.unwrap(),
        StatusCode::OK,
    )
    .await;
    assert_eq!(list["total_active"], 1);
    assert_eq!(list["items"][0]["delegation_id"], id);
    let by_agent = json_ok(
        app.as_(
            &admin,
            Method::GET,
            &format!("/api/v1/delegations?agent_id={}&delegator_id=user:{}", client.agent_id, admin.user_id),
        )
        .send()
        .await
        .unwrap(),
        StatusCode::OK,
    )
    .await;
    assert_eq!(by_agent["items"].as_array().unwrap().len(), 1);

    let revoked = json_ok(
        app.as_(&admin, Method::POST, &format!("/api/v1/delegations/{id}/revoke")).send().await.unwrap(),
        StatusCode::OK,
    )
    .await;
    assert_eq!(revoked["reason"], "manual_revocation");
    assert!(revoked["chronicle_cid"].as_str().unwrap().starts_with("sha256:"));
    // Fails on the next request.
    assert_eq!(app.me_status(&token).await, StatusCode::UNAUTHORIZED);
    let info = app.delegation(&admin, &id).await;
    assert_eq!((info["status"].as_str(), info["ended_reason"].as_str()), (Some("revoked"), Some("manual_revocation")));
    assert_eq!(info["commands_remaining"], 0);
    let list = json_ok(app.as_(&admin, Method::GET, "/api/v1/delegations").send().await.unwrap(), StatusCode::OK).await;
    assert_eq!(list["total_active"], 0);
    assert_problem(
        app.as_(&admin, Method::POST, &format!("/api/v1/delegations/{id}/revoke")).send().await.unwrap(),
        StatusCode::CONFLICT,
        "delegation_ended",
    )
    .await;
}

#[tokio::test]
async fn token_exchange_issues_under_the_delegation_and_keeps_the_actor() {
    let app = spawn_app().await;
    let (admin, client) = setup(&app, &["tools:read", "tools:write"]).await;
    let meta = json_ok(app.get("/.well-known/oauth-authorization-server").await, StatusCode::OK).await;
    assert!(meta["grant_types_supported"].as_array().unwrap().contains(&json!(EXCHANGE)));
    assert!(meta["token_types_supported"].as_array().unwrap().contains(&json!(AT)));

    let actor = app.access_token(&client).await;
    // No delegation yet: refused.
    let form = |subject: &str, actor: &str| {
        vec![
            ("grant_type".to_owned(), EXCHANGE.to_owned()),
            ("subject_token".to_owned(), subject.to_owned()),
            ("subject_token_type".to_owned(), AT.to_owned()),
            ("actor_token".to_owned(), actor.to_owned()),
            ("actor_token_type".to_owned(), AT.to_owned()),
        ]
    };
    let as_pairs = |v: &Vec<(String, String)>| v.iter().map(|(a, b)| (a.clone(), b.clone())).collect::<Vec<_>>();
    let post = |v: Vec<(String, String)>| {
        let app = &app;
        async move { app.client.post(app.url("/api/v1/token")).form(&v).send().await.unwrap() }
    };
    oauth_error(post(form(&admin.token, &actor)).await, StatusCode::BAD_REQUEST, "invalid_request").await;

    let created = app
        .delegate(&admin, json!({ "agent_id": client.agent_id, "scope": { "scopes": ["tools:read", "tools:write"] } }))
        .await;
    let id = created["delegation_id"].as_str().unwrap().to_owned();
    let resp = post(form(&admin.token, &actor)).await;
    assert_eq!(resp.headers()["cache-control"], "no-store");
    let body = json_ok(resp, StatusCode::OK).await;
    assert_eq!(body["issued_token_type"], AT);
    assert_eq!(body["token_type"], "Bearer");
    let delegated = body["access_token"].as_str().unwrap().to_owned();
    let c = claims_of(&delegated);
    assert_eq!(c["sub"], format!("user:{}", admin.user_id));
    assert_eq!(c["act"]["sub"], format!("agent:{}", client.agent_id));
    assert_eq!(c["delegation_id"], id);
    assert_eq!(c["client_id"], client.client_id);

    // Narrower on request, never wider.
    let mut narrow = form(&admin.token, &actor);
    narrow.push(("scope".into(), "tools:read".into()));
    let body = json_ok(post(as_pairs(&narrow)).await, StatusCode::OK).await;
    assert_eq!(body["scope"], "tools:read");
    let narrowed = body["access_token"].as_str().unwrap().to_owned();
    let mut wide = form(&admin.token, &actor);
    wide.push(("scope".into(), "tools:read keys:manage".into()));
    oauth_error(post(wide).await, StatusCode::BAD_REQUEST, "invalid_scope").await;

    // Re-exchanging a delegated token keeps its actor: no token without `act` comes out.
    let body = json_ok(post(form(&narrowed, &actor)).await, StatusCode::OK).await;
    let again = claims_of(body["access_token"].as_str().unwrap());
    assert_eq!(again["act"]["sub"], format!("agent:{}", client.agent_id));
    assert_eq!(again["delegation_id"], id);
    assert_eq!(again["scope"], "tools:read");
    let mut no_actor = form(&narrowed, &actor);
    no_actor.retain(|(k, _)| !k.starts_with("actor_token"));
    oauth_error(post(no_actor).await, StatusCode::BAD_REQUEST, "invalid_request").await;
    // A delegated token is not an actor token.
    oauth_error(post(form(&admin.token, &delegated)).await, StatusCode::BAD_REQUEST, "invalid_request").await;

    // Another organization's subject.
    let other = app.org_with_owner(&admin, "Other", "other@acme.test").await;
    oauth_error(post(form(&other.token, &actor)).await, StatusCode::BAD_REQUEST, "invalid_request").await;
    // An expired actor token.
    app.state.clock().set(time::OffsetDateTime::now_utc() + time::Duration::hours(2));
    oauth_error(post(form(&admin.token, &actor)).await, StatusCode::BAD_REQUEST, "invalid_request").await;
    app.state.clock().set(time::OffsetDateTime::now_utc());

    // The delegator's session ends: the delegation ends, and so do its tokens, at once.
    let session = app.sign_in(crate::helpers::ADMIN_EMAIL, crate::helpers::PASSWORD).await;
    let created =
        app.delegate(&session, json!({ "agent_id": client.agent_id, "scope": { "scopes": ["tools:read"] } })).await;
    let sid = created["delegation_id"].as_str().unwrap().to_owned();
    let body = json_ok(post(form(&session.token, &actor)).await, StatusCode::OK).await;
    let under_session = body["access_token"].as_str().unwrap().to_owned();
    assert_eq!(claims_of(&under_session)["delegation_id"], sid);
    assert_eq!(app.me_status(&under_session).await, StatusCode::OK);
    let resp = app.as_(&session, Method::POST, "/auth/logout").send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::NO_CONTENT);
    assert_eq!(app.me_status(&under_session).await, StatusCode::UNAUTHORIZED);
    assert_eq!(app.me_status(created["agent_token"].as_str().unwrap()).await, StatusCode::UNAUTHORIZED);
    let info = app.delegation(&admin, &sid).await;
    assert_eq!((info["status"].as_str(), info["ended_reason"].as_str()), (Some("revoked"), Some("credential_ended")));
    // A revoked subject token.
    oauth_error(post(form(&session.token, &actor)).await, StatusCode::BAD_REQUEST, "invalid_request").await;
    // The first delegation stands.
    assert_eq!(app.me_status(&delegated).await, StatusCode::OK);
}

#[tokio::test]
async fn two_hundred_concurrent_commands_against_a_budget_of_fifty_permit_exactly_fifty() {
    // 200 requests queue for the pool's connections rather than time out on a busy machine.
    let app = spawn_app_with(&[("database.acquire_timeout_ms", json!(30_000))]).await;
    let (admin, client) = setup(&app, &["tools:read"]).await;
    let created = app
        .delegate(
            &admin,
            json!({ "agent_id": client.agent_id, "scope": { "max_commands": 50, "prohibited_commands": ["rm"] } }),
        )
        .await;
    let id = created["delegation_id"].as_str().unwrap().to_owned();
    let token = created["agent_token"].as_str().unwrap().to_owned();
    // Prohibited: denied, nothing consumed.
    let d = app.command(&token, &id, "rm").await;
    assert_eq!(
        (d["decision"].as_str(), d["reason"].as_str(), d["commands_remaining"].as_i64()),
        (Some("deny"), Some("prohibited_command"), Some(50))
    );

    let calls = (0..200).map(|i| {
        let client = app.client.clone();
        let url = app.url(&format!("/api/v1/delegations/{id}/commands"));
        let token = token.clone();
        tokio::spawn(async move {
            let resp = client
                .post(url)
                .bearer_auth(token)
                .json(&json!({ "command": format!("cat f{i}") }))
                .send()
                .await
                .unwrap();
            (resp.status(), resp.json::<Value>().await.unwrap_or(Value::Null))
        })
    });
    let mut permits = 0;
    let mut other = 0;
    for c in futures_util::future::join_all(calls).await {
        let (status, body) = c.unwrap();
        if status == StatusCode::OK && body["decision"] == "permit" {
            permits += 1;
        } else {
            // Denied, or refused because the delegation (and its token) ended meanwhile.
            assert!(status == StatusCode::OK || status == StatusCode::UNAUTHORIZED, "{status} {body}");
            other += 1;
        }
    }
    assert_eq!((permits, other), (50, 150));
    let info = app.delegation(&admin, &id).await;
    assert_eq!(info["commands_executed"], 50);
    assert_eq!((info["status"].as_str(), info["ended_reason"].as_str()), (Some("expired"), Some("command_limit")));
    assert_eq!(app.me_status(&token).await, StatusCode::UNAUTHORIZED);

    // A service key, as the enforcement point, sees the end too; the human is not one.
    let created = app.delegate(&admin, json!({ "agent_id": client.agent_id, "scope": { "max_commands": 1 } })).await;
    let id2 = created["delegation_id"].as_str().unwrap();
    let service = json_ok(
        app.as_(&admin, Method::POST, "/auth/api-keys")
            .header("x-org-id", &admin.org_id)
            .json(&json!({ "description": "pep", "service": true }))
            .send()
            .await
            .unwrap(),
        StatusCode::CREATED,
    )
    .await;
    let key = service["key"].as_str().unwrap();
    let d = app.command(key, id2, "ls").await;
    assert_eq!((d["decision"].as_str(), d["commands_remaining"].as_i64()), (Some("permit"), Some(0)));
    let d = app.command(key, id2, "ls").await;
    assert_eq!((d["decision"].as_str(), d["reason"].as_str()), (Some("deny"), Some("delegation_ended")));
    assert_problem(
        app.as_(&admin, Method::POST, &format!("/api/v1/delegations/{id2}/commands"))
            .json(&json!({ "command": "ls" }))
            .send()
            .await
            .unwrap(),
        StatusCode::FORBIDDEN,
        "not_enforcement_point",
    )
    .await;
}

#[tokio::test]
async fn a_ceremony_permits_one_command_once_after_the_delegator_approves() {
    let app = spawn_app().await;
    let (admin, client) = setup(&app, &["tools:read"]).await;
    let created = app.delegate(&admin, json!({ "agent_id": client.agent_id, "scope": { "max_commands": 10 } })).await;
    let id = created["delegation_id"].as_str().unwrap().to_owned();
    let token = created["agent_token"].as_str().unwrap().to_owned();
    let d = app.command(&token, &id, "delete").await;
    assert_eq!(d["decision"], "ceremony_required");
    assert_eq!(d["commands_remaining"], 10);
    let approval = d["approval_id"].as_str().unwrap().to_owned();
    // Asking again is the same request.
    assert_eq!(app.command(&token, &id, "delete").await["approval_id"], approval);
    let list = json_ok(
        app.as_(&admin, Method::GET, &format!("/api/v1/delegations/{id}/approvals")).send().await.unwrap(),
        StatusCode::OK,
    )
    .await;
    assert_eq!(list[0]["status"], "pending");
    assert_eq!(list[0]["command"], "delete");
    // The agent is not the delegator.
    assert_problem(
        app.client
            .post(app.url(&format!("/api/v1/delegations/{id}/approvals/{approval}/approve")))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap(),
        StatusCode::FORBIDDEN,
        "insufficient_scope",
    )
    .await;
    let approved = json_ok(
        app.as_(&admin, Method::POST, &format!("/api/v1/delegations/{id}/approvals/{approval}/approve"))
            .send()
            .await
            .unwrap(),
        StatusCode::OK,
    )
    .await;
    assert_eq!(approved["status"], "approved");
    let d = app.command(&token, &id, "delete").await;
    assert_eq!((d["decision"].as_str(), d["commands_remaining"].as_i64()), (Some("permit"), Some(9)));
    // Once.
    let d = app.command(&token, &id, "delete").await;
    assert_eq!(d["decision"], "ceremony_required");
    let second = d["approval_id"].as_str().unwrap().to_owned();
    assert_ne!(second, approval);
    let denied = json_ok(
        app.as_(&admin, Method::POST, &format!("/api/v1/delegations/{id}/approvals/{second}/deny"))
            .send()
            .await
            .unwrap(),
        StatusCode::OK,
    )
    .await;
    assert_eq!(denied["status"], "denied");
    assert_problem(
        app.as_(&admin, Method::POST, &format!("/api/v1/delegations/{id}/approvals/{second}/approve"))
            .send()
            .await
            .unwrap(),
        StatusCode::CONFLICT,
        "approval_not_pending",
    )
    .await;
}

#[tokio::test]
async fn chains_narrow_reserve_and_cascade_parent_to_child_to_tokens() {
    let app = spawn_app().await;
    let (admin, a) = setup(&app, &["tools:read", "tools:write", "delegations:write", "delegations:read"]).await;
    let b = app.agent_client(&admin, &["tools:read", "tools:write"]).await;
    let parent = app
        .delegate(
            &admin,
            json!({ "agent_id": a.agent_id, "scope": { "max_commands": 20, "max_ttl_minutes": 30,
                    "scopes": ["tools:read", "tools:write", "delegations:write", "delegations:read"] } }),
        )
        .await;
    let pid = parent["delegation_id"].as_str().unwrap().to_owned();
    let a_token = Caller {
        token: parent["agent_token"].as_str().unwrap().to_owned(),
        org_id: admin.org_id.clone(),
        user_id: String::new(),
    };
    // Wider than the parent: refused, naming the scope.
    let resp = app
        .as_(&a_token, Method::POST, "/api/v1/delegations")
        .json(&json!({ "agent_id": b.agent_id, "scope": { "scopes": ["tools:read", "keys:manage"] } }))
        .send()
        .await
        .unwrap();
    let body = assert_problem(resp, StatusCode::FORBIDDEN, "scope_exceeds_delegator").await;
    assert!(body["detail"].as_str().unwrap().contains("keys:manage"), "{body}");
    // More budget than the parent has: refused; a cycle back to A: refused.
    let resp = app
        .as_(&a_token, Method::POST, "/api/v1/delegations")
        .json(&json!({ "agent_id": b.agent_id, "scope": { "max_commands": 21 } }))
        .send()
        .await
        .unwrap();
    assert_problem(resp, StatusCode::UNPROCESSABLE_ENTITY, "validation_failed").await;
    let resp = app
        .as_(&a_token, Method::POST, "/api/v1/delegations")
        .json(&json!({ "agent_id": a.agent_id }))
        .send()
        .await
        .unwrap();
    assert_problem(resp, StatusCode::UNPROCESSABLE_ENTITY, "validation_failed").await;

    let child = app
        .delegate(&a_token, json!({ "agent_id": b.agent_id, "scope": { "max_commands": 5, "scopes": ["tools:read"] } }))
        .await;
    let cid = child["delegation_id"].as_str().unwrap().to_owned();
    assert_eq!(child["parent_id"], pid);
    let info = app.delegation(&admin, &pid).await;
    assert_eq!((info["reserved_commands"].as_i64(), info["commands_remaining"].as_i64()), (Some(5), Some(15)));
    let cinfo = app.delegation(&admin, &cid).await;
    assert!(cinfo["expires_at"].as_str().unwrap() <= info["expires_at"].as_str().unwrap());
    assert_eq!(cinfo["chain"].as_array().unwrap().len(), 3);
    // The child's token: the whole chain in `act`, newest actor outermost.
    let child_token = child["agent_token"].as_str().unwrap().to_owned();
    let c = claims_of(&child_token);
    assert_eq!(c["sub"], format!("user:{}", admin.user_id));
    assert_eq!(
        c["act"],
        json!({ "sub": format!("agent:{}", b.agent_id), "act": { "sub": format!("agent:{}", a.agent_id) } })
    );
    // And by exchange: A's delegated token as subject, B's own token as actor.
    let b_own = app.access_token(&b).await;
    let body = json_ok(
        app.exchange(&[
            ("grant_type", EXCHANGE),
            ("subject_token", &a_token.token),
            ("subject_token_type", AT),
            ("actor_token", &b_own),
        ])
        .await,
        StatusCode::OK,
    )
    .await;
    let exchanged = body["access_token"].as_str().unwrap().to_owned();
    let c = claims_of(&exchanged);
    assert_eq!(c["delegation_id"], cid);
    assert_eq!(c["act"]["act"]["sub"], format!("agent:{}", a.agent_id));
    // Deeper than delegation.max_delegation_depth (1): refused.
    let c_agent = app.agent_client(&admin, &["tools:read", "delegations:write"]).await;
    let deeper = app
        .delegate(&a_token, json!({ "agent_id": c_agent.agent_id, "scope": { "max_commands": 2, "scopes": ["tools:read", "delegations:write"] } }))
        .await;
    let resp = app
        .client
        .post(app.url("/api/v1/delegations"))
        .bearer_auth(deeper["agent_token"].as_str().unwrap())
        .json(&json!({ "agent_id": b.agent_id }))
        .send()
        .await
        .unwrap();
    assert_problem(resp, StatusCode::FORBIDDEN, "delegation_depth_exceeded").await;
    // The child's commands count against the parent when it ends.
    assert_eq!(app.command(&child_token, &cid, "ls").await["decision"], "permit");

    // Revoking the parent ends the children and every token under any of them.
    let revoked = json_ok(
        app.as_(&admin, Method::POST, &format!("/api/v1/delegations/{pid}/revoke"))
            .json(&json!({ "reason": "done" }))
            .send()
            .await
            .unwrap(),
        StatusCode::OK,
    )
    .await;
    assert_eq!(revoked["ended"].as_array().unwrap().len(), 3);
    for t in [&a_token.token, &child_token, &exchanged] {
        assert_eq!(app.me_status(t).await, StatusCode::UNAUTHORIZED);
    }
    let cinfo = app.delegation(&admin, &cid).await;
    assert_eq!((cinfo["status"].as_str(), cinfo["ended_reason"].as_str()), (Some("revoked"), Some("parent_revoked")));
    // B's own token is its own business.
    assert_eq!(app.me_status(&b_own).await, StatusCode::OK);
}

#[tokio::test]
async fn ephemeral_agents_and_the_delegators_credentials_and_membership_end_delegations() {
    let app = spawn_app().await;
    let admin = app.bootstrap().await;
    let agents_before = agentidp::auth::agents::count(&app.db, admin.org_id.parse().unwrap()).await.unwrap();
    let created = app
        .delegate(
            &admin,
            json!({ "agent_type": "claude-code", "agent_model": "opus", "scope": { "scopes": ["tools:read"] } }),
        )
        .await;
    let id = created["delegation_id"].as_str().unwrap().to_owned();
    let principal = &created["agent_principal"];
    let client = Client {
        agent_id: principal["agent_id"].as_str().unwrap().to_owned(),
        credential_id: String::new(),
        client_id: principal["client_id"].as_str().unwrap().to_owned(),
        secret: principal["client_secret"].as_str().unwrap().to_owned(),
    };
    assert!(principal["display_name"].as_str().unwrap().starts_with("claude-code"));
    let own = app.access_token(&client).await;
    assert_eq!(agentidp::auth::agents::count(&app.db, admin.org_id.parse().unwrap()).await.unwrap(), agents_before + 1);
    app.as_(&admin, Method::POST, &format!("/api/v1/delegations/{id}/revoke")).send().await.unwrap();
    // The ephemeral agent is gone, with its credential and tokens.
    assert_eq!(agentidp::auth::agents::count(&app.db, admin.org_id.parse().unwrap()).await.unwrap(), agents_before);
    assert_eq!(app.me_status(&own).await, StatusCode::UNAUTHORIZED);
    oauth_error(
        app.token_request(&client, &[("grant_type", "client_credentials")]).await,
        StatusCode::UNAUTHORIZED,
        "invalid_client",
    )
    .await;

    // Made with an API key: deleting the key ends it.
    let key = app.api_key(&admin, Some(&["delegations:write", "delegations:read", "agents:read"])).await;
    let agent = app.agent_client(&admin, &["agents:read", "tools:read"]).await;
    let by_key = app.delegate(&key, json!({ "agent_id": agent.agent_id })).await;
    assert_eq!(by_key["scopes"], json!(["agents:read"]), "the key's scopes ∩ the agent's");
    let key_id = json_ok(
        app.as_(&admin, Method::GET, "/auth/api-keys").header("x-org-id", &admin.org_id).send().await.unwrap(),
        StatusCode::OK,
    )
    .await[0]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let resp = app
        .as_(&admin, Method::DELETE, &format!("/auth/api-keys/{key_id}"))
        .header("x-org-id", &admin.org_id)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::NO_CONTENT);
    assert_eq!(app.me_status(by_key["agent_token"].as_str().unwrap()).await, StatusCode::UNAUTHORIZED);
    let info = app.delegation(&admin, by_key["delegation_id"].as_str().unwrap()).await;
    assert_eq!(info["ended_reason"], "credential_ended");

    // A member's delegations end when the member leaves; an agent's when it is suspended.
    app.add_member(&admin, &admin.org_id, "m@acme.test", "member").await;
    let member = app.sign_in("m@acme.test", crate::helpers::PASSWORD).await;
    let m = app.delegate(&member, json!({ "agent_id": agent.agent_id, "scope": { "scopes": ["tools:read"] } })).await;
    // A member cannot ask for CAP_ADMIN.
    let resp = app
        .as_(&member, Method::POST, "/api/v1/delegations")
        .json(&json!({ "agent_id": agent.agent_id, "scope": { "capability_ceiling": "CAP_ADMIN" } }))
        .send()
        .await
        .unwrap();
    assert_problem(resp, StatusCode::FORBIDDEN, "ceiling_exceeds_delegator").await;
    // The admin sees it; the member does not see the admin's.
    let admins =
        app.delegate(&admin, json!({ "agent_id": agent.agent_id, "scope": { "scopes": ["tools:read"] } })).await;
    let resp = app
        .as_(&member, Method::GET, &format!("/api/v1/delegations/{}", admins["delegation_id"].as_str().unwrap()))
        .send()
        .await
        .unwrap();
    assert_problem(resp, StatusCode::NOT_FOUND, "not_found").await;
    let resp = app
        .as_(&admin, Method::DELETE, &format!("/api/v1/organizations/{}/members/{}", admin.org_id, member.user_id))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::NO_CONTENT);
    assert_eq!(app.me_status(m["agent_token"].as_str().unwrap()).await, StatusCode::UNAUTHORIZED);
    assert_eq!(app.delegation(&admin, m["delegation_id"].as_str().unwrap()).await["ended_reason"], "member_removed");
    let resp = app
        .as_(&admin, Method::PATCH, &format!("/api/v1/agents/{}", agent.agent_id))
        .json(&json!({ "status": "suspended" }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(
        app.delegation(&admin, admins["delegation_id"].as_str().unwrap()).await["ended_reason"],
        "agent_suspended"
    );
}

#[tokio::test]
async fn bad_input_is_refused_and_nothing_is_left_half_made() {
    let app = spawn_app().await;
    let (admin, client) = setup(&app, &["tools:read"]).await;
    let org: uuid::Uuid = admin.org_id.parse().unwrap();
    let agents_before = agentidp::auth::agents::count(&app.db, org).await.unwrap();
    let cases = [
        json!({ "agent_id": client.agent_id, "scope": { "max_commands": 0 } }),
        json!({ "agent_id": client.agent_id, "scope": { "max_commands": -5 } }),
        json!({ "agent_id": client.agent_id, "scope": { "max_commands": 1_000_000_000_000i64 } }),
        json!({ "agent_id": client.agent_id, "scope": { "max_ttl_minutes": 0 } }),
        json!({ "agent_id": client.agent_id, "scope": { "max_ttl_minutes": 10_000_000 } }),
        json!({ "agent_id": client.agent_id, "scope": { "capability_ceiling": "CAP_ROOT" } }),
        json!({ "agent_id": client.agent_id, "scope": { "prohibited_commands": vec!["x"; 10_000] } }),
        json!({ "agent_type": "claude-code", "scope": { "prohibited_commands": vec!["x"; 10_000] } }),
        json!({ "agent_type": "claude-code", "scope": { "max_cost": 0 } }),
        json!({ "agent_type": "claude-code" }),
        json!({ "scope": {} }),
        json!({ "agent_id": uuid::Uuid::new_v4() }),
        json!({ "agent_id": client.agent_id, "scope": { "scopes": ["Not A Scope"] } }),
        json!({ "agent_id": client.agent_id, "unknown": 1 }),
    ];
    for body in cases {
        let resp = app.as_(&admin, Method::POST, "/api/v1/delegations").json(&body).send().await.unwrap();
        assert_eq!(resp.status(), StatusCode::UNPROCESSABLE_ENTITY, "{body}");
        assert_eq!(resp.headers()["content-type"], "application/problem+json");
    }
    // Another organization's agent is not one of ours.
    let other = app.org_with_owner(&admin, "Other", "o@acme.test").await;
    let theirs = app.agent_client(&other, &["tools:read"]).await;
    let resp = app
        .as_(&admin, Method::POST, "/api/v1/delegations")
        .json(&json!({ "agent_id": theirs.agent_id }))
        .send()
        .await
        .unwrap();
    assert_problem(resp, StatusCode::UNPROCESSABLE_ENTITY, "validation_failed").await;
    // Beyond the agent's allowed scopes, and beyond the ceiling.
    let resp = app
        .as_(&admin, Method::POST, "/api/v1/delegations")
        .json(&json!({ "agent_id": client.agent_id, "scope": { "scopes": ["tools:write"] } }))
        .send()
        .await
        .unwrap();
    assert_problem(resp, StatusCode::FORBIDDEN, "scope_exceeds_agent").await;
    let resp = app
        .as_(&admin, Method::POST, "/api/v1/delegations")
        .json(&json!({ "agent_type": "x", "scope": { "capability_ceiling": "CAP_READ", "scopes": ["tools:write"] } }))
        .send()
        .await
        .unwrap();
    assert_problem(resp, StatusCode::FORBIDDEN, "scope_exceeds_ceiling").await;
    // No ephemeral agent was left behind by any failure.
    assert_eq!(agentidp::auth::agents::count(&app.db, org).await.unwrap(), agents_before);

    // Another organization's delegation is 404 for every method and credential.
    let d = app.delegate(&admin, json!({ "agent_id": client.agent_id })).await;
    let id = d["delegation_id"].as_str().unwrap();
    let their_key = app.api_key(&other, None).await;
    for who in [&other, &their_key] {
        for (method, path) in [
            (Method::GET, format!("/api/v1/delegations/{id}")),
            (Method::POST, format!("/api/v1/delegations/{id}/revoke")),
            (Method::GET, format!("/api/v1/delegations/{id}/approvals")),
            (Method::POST, format!("/api/v1/delegations/{id}/approvals/{id}/approve")),
        ] {
            let resp = app.as_(who, method, &path).header("x-org-id", &other.org_id).send().await.unwrap();
            assert_problem(resp, StatusCode::NOT_FOUND, "not_found").await;
        }
        let resp = app
            .as_(who, Method::POST, &format!("/api/v1/delegations/{id}/commands"))
            .header("x-org-id", &other.org_id)
            .json(&json!({ "command": "ls" }))
            .send()
            .await
            .unwrap();
        assert_problem(resp, StatusCode::NOT_FOUND, "not_found").await;
    }
    let theirs_token = app.access_token(&theirs).await;
    oauth_error(
        app.exchange(&[
            ("grant_type", EXCHANGE),
            ("subject_token", &admin.token),
            ("subject_token_type", AT),
            ("actor_token", &theirs_token),
        ])
        .await,
        StatusCode::BAD_REQUEST,
        "invalid_request",
    )
    .await;
    let resp = app.as_(&admin, Method::GET, "/api/v1/delegations?status=bogus").send().await.unwrap();
    assert_problem(resp, StatusCode::BAD_REQUEST, "invalid_query").await;
}

#[tokio::test]
async fn tokens_stop_at_expiry_and_the_sweeper_ends_the_delegation() {
    // This test sweeps by hand.
    let app = spawn_app_with(&[("delegation.sweep_interval_secs", json!(3600))]).await;
    let admin = app.bootstrap().await;
    let created = app
        .delegate(
            &admin,
            json!({ "agent_type": "claude-code", "scope": { "scopes": ["tools:read"], "max_ttl_minutes": 1 } }),
        )
        .await;
    let id = created["delegation_id"].as_str().unwrap().to_owned();
    let token = created["agent_token"].as_str().unwrap().to_owned();
    assert_eq!(app.me_status(&token).await, StatusCode::OK);
    let org: uuid::Uuid = admin.org_id.parse().unwrap();
    let agents = agentidp::auth::agents::count(&app.db, org).await.unwrap();
    app.state.clock().set(time::OffsetDateTime::now_utc() + time::Duration::seconds(70));
    // Before any sweep.
    assert_eq!(app.me_status(&token).await, StatusCode::UNAUTHORIZED);
    assert_eq!(app.delegation(&admin, &id).await["status"], "expired");
    assert_eq!(agentidp::delegation::sweep(&app.state, 100).await.unwrap(), 1);
    let info = app.delegation(&admin, &id).await;
    assert_eq!((info["status"].as_str(), info["ended_reason"].as_str()), (Some("expired"), Some("ttl")));
    assert_eq!(agentidp::auth::agents::count(&app.db, org).await.unwrap(), agents - 1);
    assert_eq!(agentidp::delegation::sweep(&app.state, 100).await.unwrap(), 0);
}

#[tokio::test]
async fn ends_reach_a_second_instance_at_once_revocation_and_spend() {
    let app1 = spawn_app().await;
    let app2 = spawn_on(app1.config.clone(), Some(app1.redis.prefix().to_owned())).await;
    let (admin, client) = setup(&app1, &["tools:read"]).await;
    tokio::time::sleep(Duration::from_millis(300)).await; // both subscribers attached
    let d = app1.delegate(&admin, json!({ "agent_id": client.agent_id })).await;
    let token = d["agent_token"].as_str().unwrap().to_owned();
    assert_eq!(app2.me_status(&token).await, StatusCode::OK);
    app1.as_(&admin, Method::POST, &format!("/api/v1/delegations/{}/revoke", d["delegation_id"].as_str().unwrap()))
        .send()
        .await
        .unwrap();
    let took = refused_soon(&app2, &token, "revoked on the first instance").await;
    eprintln!("a revoked delegation reached the second instance in {took:?}");

    // A spend budget drawn down by the usage module's ingest, through the library.
    let d = app1
        .delegate(&admin, json!({ "agent_id": client.agent_id, "scope": { "max_cost": 1_000, "max_tokens": 500 } }))
        .await;
    let id: uuid::Uuid = d["delegation_id"].as_str().unwrap().parse().unwrap();
    let token = d["agent_token"].as_str().unwrap().to_owned();
    assert_eq!(app2.me_status(&token).await, StatusCode::OK);
    let org: uuid::Uuid = admin.org_id.parse().unwrap();
    let draw = |cost: i64, tokens: i64| agentidp::delegation::spend::SpendDraw {
        org_id: org,
        delegation_id: id,
        cost_micros: cost,
        tokens,
    };
    let mut tx = app1.db.begin().await.unwrap();
    agentidp::delegation::spend::draw(&mut tx, &[draw(400, 100), draw(500, 100)]).await.unwrap();
    // Another organization's draw is ignored.
    agentidp::delegation::spend::draw(
        &mut tx,
        &[agentidp::delegation::spend::SpendDraw {
            org_id: uuid::Uuid::new_v4(),
            delegation_id: id,
            cost_micros: 10_000,
            tokens: 0,
        }],
    )
    .await
    .unwrap();
    tx.commit().await.unwrap();
    let info = app1.delegation(&admin, &id.to_string()).await;
    assert_eq!(
        (info["status"].as_str(), info["cost_spent"].as_i64(), info["tokens_spent"].as_i64()),
        (Some("active"), Some(900), Some(200))
    );
    assert_eq!(app2.me_status(&token).await, StatusCode::OK);
    // A rolled-back draw leaves nothing.
    let mut tx = app1.db.begin().await.unwrap();
    agentidp::delegation::spend::draw(&mut tx, &[draw(100, 0)]).await.unwrap();
    tx.rollback().await.unwrap();
    assert_eq!(app2.me_status(&token).await, StatusCode::OK);
    let mut tx = app1.db.begin().await.unwrap();
    agentidp::delegation::spend::draw(&mut tx, &[draw(100, 0)]).await.unwrap();
    tx.commit().await.unwrap();
    let took = refused_soon(&app2, &token, "spent on the first instance").await;
    eprintln!("a spent delegation reached the second instance in {took:?}");
    assert_eq!(app1.me_status(&token).await, StatusCode::UNAUTHORIZED);
    let info = app1.delegation(&admin, &id.to_string()).await;
    assert_eq!((info["status"].as_str(), info["ended_reason"].as_str()), (Some("expired"), Some("spend_limit")));
}

type Hits = Arc<Mutex<Vec<Value>>>;

async fn receive(State(hits): State<Hits>, body: Bytes) -> StatusCode {
    hits.lock().unwrap().push(serde_json::from_slice(&body).unwrap_or(Value::Null));
    StatusCode::OK
}

#[tokio::test]
async fn events_arrive_at_a_webhook_endpoint_with_their_codes_and_content_ids() {
    let app = spawn_app_with(&[
        ("webhooks.allow_private_networks", json!(true)),
        ("webhooks.poll_interval_ms", json!(100)),
        ("delegation.sweep_interval_secs", json!(3600)),
    ])
    .await;
    let (admin, client) = setup(&app, &["tools:read"]).await;
    let hits: Hits = Arc::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr: SocketAddr = listener.local_addr().unwrap();
    let router = axum::Router::new().route("/hook", post(receive)).with_state(hits.clone());
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    json_ok(
        app.as_(&admin, Method::POST, "/api/v1/webhooks")
            .json(&json!({ "url": format!("http://{addr}/hook"), "event_types": ["delegation.*"] }))
            .send()
            .await
            .unwrap(),
        StatusCode::CREATED,
    )
    .await;
    let d = app.delegate(&admin, json!({ "agent_id": client.agent_id, "scope": { "max_commands": 5 } })).await;
    let id = d["delegation_id"].as_str().unwrap().to_owned();
    let token = d["agent_token"].as_str().unwrap().to_owned();
    assert_eq!(app.command(&token, &id, "drop").await["decision"], "ceremony_required");
    app.as_(&admin, Method::POST, &format!("/api/v1/delegations/{id}/revoke")).send().await.unwrap();
    let short = app.delegate(&admin, json!({ "agent_id": client.agent_id, "scope": { "max_ttl_minutes": 1 } })).await;
    app.state.clock().set(time::OffsetDateTime::now_utc() + time::Duration::seconds(70));
    agentidp::delegation::sweep(&app.state, 100).await.unwrap();

    let mut got = Vec::new();
    for _ in 0..600 {
        got = hits.lock().unwrap().clone();
        if got.len() >= 5 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let of = |t: &str| got.iter().filter(|e| e["type"] == t).cloned().collect::<Vec<_>>();
    let created = of("delegation.created");
    assert_eq!(created.len(), 2, "{got:?}");
    assert_eq!(created[0]["data"]["event_code"], 0x3001);
    assert_eq!(created[0]["data"]["chronicle_cid"], d["chronicle_cid"]);
    assert_eq!(of("delegation.revoked")[0]["data"]["event_code"], 0x3003);
    let expired = of("delegation.expired");
    assert_eq!(expired[0]["data"]["event_code"], 0x3004);
    assert_eq!(expired[0]["data"]["delegation_id"], short["delegation_id"]);
    assert_eq!(of("delegation.approval_requested")[0]["data"]["command"], "drop");
    // The content id is the SHA-256 of the RFC 8785 JSON of the data without it.
    for e in &got {
        let mut data = e["data"].clone();
        let cid = data.as_object_mut().unwrap().remove("chronicle_cid").unwrap();
        assert_eq!(cid, json!(agentidp::delegation::canonical::cid(&data)), "{e}");
    }
    // And each is in the audit chain, with its content id.
    let audit =
        json_ok(app.as_(&admin, Method::GET, "/api/v1/audit?limit=200").send().await.unwrap(), StatusCode::OK).await;
    let text = audit.to_string();
    assert!(text.contains(d["chronicle_cid"].as_str().unwrap()), "the created event's cid is in the audit log");
}

#[tokio::test]
async fn an_ephemeral_agent_counts_against_the_plans_agents() {
    let app = spawn_app_with(&[("tiers.plans.free.max_agents", json!(1))]).await;
    let (admin, client) = setup(&app, &["tools:read"]).await;
    let resp = app
        .as_(&admin, Method::POST, "/api/v1/delegations")
        .json(&json!({ "agent_type": "claude-code", "scope": { "scopes": ["tools:read"] } }))
        .send()
        .await
        .unwrap();
    assert_problem(resp, StatusCode::FORBIDDEN, "agent_limit_reached").await;
    let list = json_ok(app.as_(&admin, Method::GET, "/api/v1/delegations").send().await.unwrap(), StatusCode::OK).await;
    assert_eq!((list["items"].as_array().unwrap().len(), list["total_active"].as_i64()), (0, Some(0)));
    // An existing agent is no new one.
    app.delegate(&admin, json!({ "agent_id": client.agent_id })).await;
}
