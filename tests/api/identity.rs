//! Identity I: login sessions, API keys, organizations and members, credential priority,
//! brute-force protection, isolation between organizations, cache invalidation across instances.

use std::time::{Duration, Instant};

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::helpers::{ADMIN_EMAIL, PASSWORD, assert_problem, json_ok, spawn_app, spawn_app_with, spawn_on};

#[tokio::test]
async fn login_me_logout_with_bearer_and_cookie() {
    let app = spawn_app().await;
    app.bootstrap().await;
    let resp = app.login(ADMIN_EMAIL, PASSWORD).await;
    assert_eq!(resp.status(), StatusCode::OK);
    let cookie = resp.headers()["set-cookie"].to_str().unwrap().to_owned();
    assert!(cookie.starts_with("agentidp_session=aidp_ses_"), "{cookie}");
    assert!(cookie.contains("HttpOnly") && cookie.contains("SameSite=Lax") && cookie.contains("Path=/"), "{cookie}");
    assert!(!cookie.contains("Secure"), "plain HTTP: no Secure flag");
    let body: Value = resp.json().await.unwrap();
    let token = body["session_token"].as_str().unwrap().to_owned();
    assert!(token.starts_with("aidp_ses_"));
    assert_eq!(body["actor"]["actor_type"], "human");
    assert!(body["actor"]["actor_id"].as_str().unwrap().starts_with("user:"));
    assert!(body["actor"]["roles"].as_array().unwrap().contains(&json!("owner")));
    assert!(body["actor"]["roles"].as_array().unwrap().contains(&json!("system_admin")));
    let expires = time::OffsetDateTime::parse(
        body["expires_at"].as_str().unwrap(),
        &time::format_description::well_known::Rfc3339,
    )
    .unwrap();
    let days = (expires - time::OffsetDateTime::now_utc()).whole_hours();
    assert!((167..=168).contains(&days), "seven days by default, got {days}h");

    let me =
        json_ok(app.client.get(app.url("/auth/me")).bearer_auth(&token).send().await.unwrap(), StatusCode::OK).await;
    assert_eq!(me["email"], ADMIN_EMAIL);
    assert_eq!(me["credential_type"], "session");
    let cookie_value = cookie.split(';').next().unwrap().to_owned();
    let me2 = json_ok(
        app.client.get(app.url("/auth/me")).header("cookie", &cookie_value).send().await.unwrap(),
        StatusCode::OK,
    )
    .await;
    assert_eq!(me2["actor_id"], me["actor_id"]);

    let resp = app.client.post(app.url("/auth/logout")).bearer_auth(&token).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::NO_CONTENT);
    assert!(resp.headers()["set-cookie"].to_str().unwrap().contains("Max-Age=0"));
    let resp = app.client.get(app.url("/auth/me")).bearer_auth(&token).send().await.unwrap();
    assert!(resp.headers()["www-authenticate"].to_str().unwrap().starts_with("Bearer"));
    assert_problem(resp, StatusCode::UNAUTHORIZED, "unauthorized").await;
    let resp = app.client.get(app.url("/auth/me")).header("cookie", &cookie_value).send().await.unwrap();
    assert_problem(resp, StatusCode::UNAUTHORIZED, "unauthorized").await;
}

#[tokio::test]
async fn no_credentials_or_garbage_credentials_are_401() {
    let app = spawn_app().await;
    for req in [
        app.client.get(app.url("/auth/me")),
        app.client.get(app.url("/auth/me")).bearer_auth("aidp_ses_nope"),
        app.client.get(app.url("/auth/me")).header("authorization", "Basic Zm9vOmJhcg=="),
        app.client.get(app.url("/auth/me")).header("x-api-key", "aidp_key_\u{00e9}"),
        app.client.get(app.url("/auth/me")).bearer_auth("x".repeat(5000)),
    ] {
        let resp = req.send().await.unwrap();
        assert!(resp.headers().contains_key("www-authenticate"));
        assert_problem(resp, StatusCode::UNAUTHORIZED, "unauthorized").await;
    }
}

#[tokio::test]
async fn an_expired_session_is_401() {
    // No cache: the database's word on expiry is what counts here.
    let app = spawn_app_with(&[("auth.credential_cache_secs", json!(0))]).await;
    let admin = app.bootstrap().await;
    sqlx::query("update session set expires_at = now() - interval '1 second'").execute(&app.db).await.unwrap();
    let resp = app.as_(&admin, Method::GET, "/auth/me").send().await.unwrap();
    assert_problem(resp, StatusCode::UNAUTHORIZED, "unauthorized").await;
}

fn sha256(s: &str) -> Vec<u8> {
    Sha256::digest(s.as_bytes()).to_vec()
}

#[tokio::test]
async fn secrets_are_stored_only_as_hashes() {
    let app = spawn_app().await;
    let admin = app.bootstrap().await;
    let key = app.api_key(&admin, None).await;

    let hash: String = sqlx::query_scalar("select password_hash from app_user where email = $1")
        .bind(ADMIN_EMAIL)
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert!(hash.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"), "{hash}");
    assert!(!hash.contains(PASSWORD));

    let stored: Vec<u8> = sqlx::query_scalar("select token_hash from session").fetch_one(&app.db).await.unwrap();
    assert_eq!(stored, sha256(&admin.token));
    let stored: Vec<u8> = sqlx::query_scalar("select key_hash from api_key").fetch_one(&app.db).await.unwrap();
    assert_eq!(stored, sha256(&key.token));

    // No text column anywhere holds a secret in clear.
    let dump: String = sqlx::query_scalar(
        "select concat_ws('|', (select string_agg(s::text, '|') from session s), (select string_agg(k::text, '|') from api_key k),
                           (select string_agg(a::text, '|') from audit_event a))",
    )
    .fetch_one(&app.db)
    .await
    .unwrap();
    assert!(!dump.contains(&admin.token) && !dump.contains(&key.token) && !dump.contains(PASSWORD));
}

#[tokio::test]
async fn wrong_password_and_unknown_email_look_the_same() {
    let app = spawn_app().await;
    app.bootstrap().await;
    let a = assert_problem(app.login(ADMIN_EMAIL, "not-the-password").await, StatusCode::UNAUTHORIZED, "unauthorized")
        .await;
    let b = assert_problem(
        app.login("nobody@acme.test", "not-the-password").await,
        StatusCode::UNAUTHORIZED,
        "unauthorized",
    )
    .await;
    assert_eq!(a["detail"], b["detail"]);
}

#[tokio::test]
async fn ten_wrong_passwords_give_429_then_the_right_one_works_after_the_wait() {
    // Back-offs long enough that no real time runs out during the test; the wait is passed by
    // moving the application's clock, never by sleeping.
    let app = spawn_app_with(&[
        ("auth.login_max_failures_account", json!(5)),
        ("auth.login_backoff_base_secs", json!(60)),
        ("auth.login_backoff_max_secs", json!(120)),
    ])
    .await;
    app.bootstrap().await;
    let mut statuses = Vec::new();
    let mut retry_after = 0u64;
    for _ in 0..10 {
        let resp = app.login(ADMIN_EMAIL, "wrong-password-123").await;
        if resp.status() == StatusCode::TOO_MANY_REQUESTS {
            retry_after = resp.headers()["retry-after"].to_str().unwrap().parse().unwrap();
            assert_problem(resp, StatusCode::TOO_MANY_REQUESTS, "login_throttled").await;
            statuses.push(429);
        } else {
            statuses.push(resp.status().as_u16());
        }
    }
    assert_eq!(&statuses[..5], &[401; 5], "{statuses:?}");
    assert_eq!(&statuses[5..], &[429; 5], "{statuses:?}");
    assert!((55..=60).contains(&retry_after), "{retry_after}");
    // Throttled means throttled: even the right password waits.
    assert_eq!(app.login(ADMIN_EMAIL, PASSWORD).await.status(), StatusCode::TOO_MANY_REQUESTS);
    let clock = app.state.clock();
    clock.set(clock.now() + time::Duration::seconds(retry_after as i64 - 10));
    assert_eq!(app.login(ADMIN_EMAIL, PASSWORD).await.status(), StatusCode::TOO_MANY_REQUESTS, "not yet");
    clock.set(clock.now() + time::Duration::seconds(11));
    assert_eq!(app.login(ADMIN_EMAIL, PASSWORD).await.status(), StatusCode::OK);
}

#[tokio::test]
async fn parallel_wrong_passwords_are_counted_before_they_are_checked() {
    let app = spawn_app_with(&[
        ("auth.login_max_failures_account", json!(5)),
        ("auth.login_max_failures_ip", json!(1000)),
        ("auth.login_backoff_base_secs", json!(60)),
        ("auth.login_backoff_max_secs", json!(120)),
    ])
    .await;
    app.bootstrap().await;
    let attempts = (0..30).map(|_| app.login(ADMIN_EMAIL, "wrong-password-123"));
    let statuses: Vec<u16> =
        futures_util::future::join_all(attempts).await.iter().map(|r| r.status().as_u16()).collect();
    let checked = statuses.iter().filter(|s| **s == 401).count();
    let refused = statuses.iter().filter(|s| **s == 429).count();
    assert!(checked <= 5, "at most the limit is verified: {statuses:?}");
    assert_eq!(checked + refused, 30, "{statuses:?}");
}

#[tokio::test]
async fn the_client_ip_is_the_rightmost_forwarded_address_that_is_not_a_trusted_proxy() {
    let app = spawn_app_with(&[("tls.trusted_proxies", json!(["127.0.0.1/32", "::1/128", "10.0.0.0/8"]))]).await;
    app.bootstrap().await;
    let login_via = |xff: &'static str| {
        app.client
            .post(app.url("/auth/login"))
            .header("x-forwarded-for", xff)
            .json(&json!({ "email": ADMIN_EMAIL, "password": PASSWORD }))
            .send()
    };
    // The client put 6.6.6.6 there; the proxies appended the address they saw, and their own.
    assert_eq!(login_via("6.6.6.6, 203.0.113.7, 10.0.0.2").await.unwrap().status(), StatusCode::OK);
    assert_eq!(login_via("198.51.100.9").await.unwrap().status(), StatusCode::OK);
    let ips: Vec<Option<String>> =
        sqlx::query_scalar("select client_ip from session order by created_at").fetch_all(&app.db).await.unwrap();
    assert_eq!(ips[ips.len() - 2..], [Some("203.0.113.7".to_owned()), Some("198.51.100.9".to_owned())], "{ips:?}");
}

#[tokio::test]
async fn set_password_with_an_unknown_token_answers_without_hashing() {
    let app = spawn_app().await;
    let permits = agentidp::crypto::argon2_permits();
    // With every argon2 permit held, a route that hashed would wait for one until the client gives up.
    let held = permits.acquire_many(agentidp::crypto::argon2_permit_count()).await.unwrap();
    let resp = app
        .client
        .post(app.url("/auth/set-password"))
        .timeout(Duration::from_secs(10))
        .json(&json!({ "token": "aidp_pwd_bogus", "password": "a-new-long-password" }))
        .send()
        .await;
    drop(held);
    assert_problem(resp.expect("answered without waiting for argon2"), StatusCode::BAD_REQUEST, "invalid_token").await;
}

#[tokio::test]
async fn set_password_is_throttled_per_ip() {
    let app = spawn_app_with(&[("auth.set_password_max_attempts_ip", json!(3))]).await;
    let body = json!({ "token": "aidp_pwd_bogus", "password": "a-new-long-password" });
    let attempt = || app.post_json("/auth/set-password", &body);
    for _ in 0..3 {
        assert_problem(attempt().await, StatusCode::BAD_REQUEST, "invalid_token").await;
    }
    let resp = attempt().await;
    let retry_after: u64 = resp.headers()["retry-after"].to_str().unwrap().parse().unwrap();
    assert!(retry_after >= 1, "{retry_after}");
    assert_problem(resp, StatusCode::TOO_MANY_REQUESTS, "set_password_throttled").await;
}

#[tokio::test]
async fn api_keys_are_shown_once_listed_without_secret_and_revocable() {
    let app = spawn_app().await;
    let admin = app.bootstrap().await;
    let resp = app
        .as_(&admin, Method::POST, "/auth/api-keys")
        .json(&json!({ "description": "deploy bot", "expires_days": 30, "scopes": ["audit:read"] }))
        .send()
        .await
        .unwrap();
    let created = json_ok(resp, StatusCode::CREATED).await;
    let key = created["key"].as_str().unwrap().to_owned();
    assert!(key.starts_with("aidp_key_") && key.len() > 40);
    assert_eq!(created["scopes"], json!(["audit:read"]));
    assert!(created["expires_at"].is_string());

    // Credential priority: X-API-Key wins over a bearer session.
    let me = json_ok(
        app.client.get(app.url("/auth/me")).header("x-api-key", &key).bearer_auth(&admin.token).send().await.unwrap(),
        StatusCode::OK,
    )
    .await;
    assert_eq!(me["credential_type"], "api_key");
    assert_eq!(me["scopes"], json!(["audit:read"]));
    // An API key also works as a bearer token.
    let me = json_ok(app.client.get(app.url("/auth/me")).bearer_auth(&key).send().await.unwrap(), StatusCode::OK).await;
    assert_eq!(me["credential_type"], "api_key");

    let list = json_ok(app.as_(&admin, Method::GET, "/auth/api-keys").send().await.unwrap(), StatusCode::OK).await;
    let items = list.as_array().unwrap();
    assert_eq!(items.len(), 1);
    assert_eq!(items[0]["description"], "deploy bot");
    assert!(key.starts_with(items[0]["prefix"].as_str().unwrap()));
    assert!(!list.to_string().contains(&key), "the secret is never listed");
    assert!(items[0].get("key").is_none());

    // last_used is batched, not written per request.
    assert!(items[0]["last_used"].is_null());
    app.state.auth().last_used.flush(&app.db).await;
    let list = json_ok(app.as_(&admin, Method::GET, "/auth/api-keys").send().await.unwrap(), StatusCode::OK).await;
    assert!(list[0]["last_used"].is_string(), "{list}");

    let id = created["id"].as_str().unwrap();
    let resp = app.as_(&admin, Method::DELETE, &format!("/auth/api-keys/{id}")).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::NO_CONTENT);
    let resp = app.client.get(app.url("/auth/me")).header("x-api-key", &key).send().await.unwrap();
    assert_problem(resp, StatusCode::UNAUTHORIZED, "unauthorized").await;
    let resp = app.as_(&admin, Method::DELETE, &format!("/auth/api-keys/{id}")).send().await.unwrap();
    assert_problem(resp, StatusCode::NOT_FOUND, "not_found").await;
}

#[tokio::test]
async fn api_key_scopes_only_narrow() {
    let app = spawn_app().await;
    let admin = app.bootstrap().await;
    let reader = app.api_key(&admin, Some(&["audit:read"])).await;
    let resp =
        app.as_(&reader, Method::POST, "/auth/api-keys").json(&json!({ "description": "x" })).send().await.unwrap();
    assert_problem(resp, StatusCode::FORBIDDEN, "insufficient_scope").await;
    let resp = app.as_(&reader, Method::GET, "/api/v1/organizations").send().await.unwrap();
    assert_problem(resp, StatusCode::FORBIDDEN, "insufficient_scope").await;
    assert_eq!(app.as_(&reader, Method::GET, "/api/v1/audit").send().await.unwrap().status(), StatusCode::OK);

    let minter = app.api_key(&admin, Some(&["api_keys:write"])).await;
    let resp = app
        .as_(&minter, Method::POST, "/auth/api-keys")
        .json(&json!({ "description": "x", "scopes": ["audit:read"] }))
        .send()
        .await
        .unwrap();
    assert_problem(resp, StatusCode::FORBIDDEN, "scope_exceeds_creator").await;
    let child = json_ok(
        app.as_(&minter, Method::POST, "/auth/api-keys").json(&json!({ "description": "x" })).send().await.unwrap(),
        StatusCode::CREATED,
    )
    .await;
    assert_eq!(child["scopes"], json!(["api_keys:write"]), "defaults to the creator's scopes");

    let resp = app
        .as_(&admin, Method::POST, "/auth/api-keys")
        .json(&json!({ "description": "x", "scopes": ["audit:read", "root"] }))
        .send()
        .await
        .unwrap();
    let body = assert_problem(resp, StatusCode::UNPROCESSABLE_ENTITY, "validation_failed").await;
    assert_eq!(body["errors"][0]["field"], "scopes[1]");
}

#[tokio::test]
async fn another_orgs_user_is_invited_and_is_not_a_member_until_accepting() {
    let app = spawn_app().await;
    let admin = app.bootstrap().await;
    let a = app.org_with_owner(&admin, "Alpha", "owner@alpha.test").await;
    let b = app.org_with_owner(&admin, "Bravo", "owner@bravo.test").await;
    app.add_member(&b, &b.org_id, "bob@bravo.test", "member").await;
    let bob = app.sign_in("bob@bravo.test", PASSWORD).await;

    let invited = app.invite(&a, &a.org_id, "bob@bravo.test", "admin").await;
    assert!(invited.get("user_id").is_none() && invited.get("created_user").is_none(), "{invited}");
    let members_url = format!("/api/v1/organizations/{}/members", a.org_id);
    let members = json_ok(app.as_(&a, Method::GET, &members_url).send().await.unwrap(), StatusCode::OK).await;
    assert!(!members.to_string().contains("bob@bravo.test"), "not a member before accepting: {members}");
    let resp = app.as_(&bob, Method::GET, &members_url).header("x-org-id", &a.org_id).send().await.unwrap();
    assert_problem(resp, StatusCode::FORBIDDEN, "org_not_member").await;
    // The token cannot set the password of an account that exists.
    let token = invited["invitation_token"].as_str().unwrap();
    let resp = app.post_json("/auth/set-password", &json!({ "token": token, "password": "taken-over-password" })).await;
    assert_problem(resp, StatusCode::BAD_REQUEST, "invalid_token").await;

    // Bob sees the invitation; nobody else can answer it.
    let id = invited["id"].as_str().unwrap();
    let mine = json_ok(app.as_(&bob, Method::GET, "/api/v1/invitations").send().await.unwrap(), StatusCode::OK).await;
    assert_eq!(mine.as_array().unwrap().len(), 1, "{mine}");
    assert_eq!(mine[0]["id"], id);
    let resp = app.as_(&a, Method::POST, &format!("/api/v1/invitations/{id}/accept")).send().await.unwrap();
    assert_problem(resp, StatusCode::NOT_FOUND, "not_found").await;
    let joined = json_ok(
        app.as_(&bob, Method::POST, &format!("/api/v1/invitations/{id}/accept")).send().await.unwrap(),
        StatusCode::CREATED,
    )
    .await;
    assert_eq!((joined["email"].as_str(), joined["role"].as_str()), (Some("bob@bravo.test"), Some("admin")));
    let members = json_ok(app.as_(&a, Method::GET, &members_url).send().await.unwrap(), StatusCode::OK).await;
    assert!(members.to_string().contains("bob@bravo.test"), "{members}");

    // A declined invitation never becomes a membership.
    let c = app.org_with_owner(&admin, "Charlie", "owner@charlie.test").await;
    let declined = app.invite(&c, &c.org_id, "bob@bravo.test", "member").await;
    let id = declined["id"].as_str().unwrap();
    let resp = app.as_(&bob, Method::POST, &format!("/api/v1/invitations/{id}/decline")).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::NO_CONTENT);
    let resp = app.as_(&bob, Method::POST, &format!("/api/v1/invitations/{id}/accept")).send().await.unwrap();
    assert_problem(resp, StatusCode::NOT_FOUND, "not_found").await;
    let members = format!("/api/v1/organizations/{}/members", c.org_id);
    let members = json_ok(app.as_(&c, Method::GET, &members).send().await.unwrap(), StatusCode::OK).await;
    assert!(!members.to_string().contains("bob@bravo.test"), "{members}");
}

#[tokio::test]
async fn inviting_answers_the_same_whether_or_not_the_email_has_an_account() {
    let app = spawn_app().await;
    let admin = app.bootstrap().await;
    let a = app.org_with_owner(&admin, "Alpha", "owner@alpha.test").await;
    app.org_with_owner(&admin, "Bravo", "taken@bravo.test").await;
    let invite = |email: &'static str| {
        app.as_(&a, Method::POST, &format!("/api/v1/organizations/{}/members", a.org_id))
            .json(&json!({ "email": email, "role": "member" }))
            .send()
    };
    let (existing, fresh) = (invite("taken@bravo.test").await.unwrap(), invite("taken@bravo.tesu").await.unwrap());
    assert_eq!(existing.status(), StatusCode::ACCEPTED);
    assert_eq!(existing.status(), fresh.status());
    let names = |r: &reqwest::Response| {
        let mut h: Vec<String> = r.headers().keys().map(|k| k.to_string()).filter(|k| k != "x-request-id").collect();
        h.sort();
        h
    };
    assert_eq!(names(&existing), names(&fresh));
    // Byte for byte the same once the ids, times, token and the email itself are masked.
    let mask = |text: String, email: &str| {
        let v: Value = serde_json::from_str(&text).unwrap();
        let mut masked = text.replace(email, "EMAIL");
        for field in ["id", "invitation_token", "created_at", "expires_at"] {
            masked = masked.replace(v[field].as_str().unwrap(), field);
        }
        masked
    };
    let (e, f) = (existing.text().await.unwrap(), fresh.text().await.unwrap());
    assert_eq!(mask(e, "taken@bravo.test"), mask(f, "taken@bravo.tesu"));
}

#[tokio::test]
async fn organizations_and_members_lifecycle() {
    let app = spawn_app().await;
    let admin = app.bootstrap().await;
    let owner = app.org_with_owner(&admin, "Beta Works", "owner@beta.test").await;

    // The new owner sees only their organization.
    let orgs =
        json_ok(app.as_(&owner, Method::GET, "/api/v1/organizations").send().await.unwrap(), StatusCode::OK).await;
    assert_eq!(orgs["items"].as_array().unwrap().len(), 1);
    assert_eq!(orgs["items"][0]["slug"], "beta-works");
    assert_eq!(orgs["items"][0]["role"], "owner");
    // The system admin sees both.
    let all =
        json_ok(app.as_(&admin, Method::GET, "/api/v1/organizations?limit=1").send().await.unwrap(), StatusCode::OK)
            .await;
    assert_eq!(all["items"].as_array().unwrap().len(), 1);
    let cursor = all["next_cursor"].as_str().unwrap();
    let rest = json_ok(
        app.as_(&admin, Method::GET, &format!("/api/v1/organizations?limit=1&after={cursor}")).send().await.unwrap(),
        StatusCode::OK,
    )
    .await;
    assert_eq!(rest["items"].as_array().unwrap().len(), 1);
    assert!(rest["next_cursor"].is_null());

    // Only system admins create organizations; a taken slug is 409.
    let resp =
        app.as_(&owner, Method::POST, "/api/v1/organizations").json(&json!({ "name": "Gamma" })).send().await.unwrap();
    assert_problem(resp, StatusCode::FORBIDDEN, "system_admin_required").await;
    let resp = app
        .as_(&admin, Method::POST, "/api/v1/organizations")
        .json(&json!({ "name": "Another", "slug": "beta-works" }))
        .send()
        .await
        .unwrap();
    assert_problem(resp, StatusCode::CONFLICT, "slug_taken").await;

    // A new person redeems the invitation token once, choosing a password.
    let invited = app.invite(&owner, &owner.org_id, "Dev@Beta.test", "member").await;
    let token = invited["invitation_token"].as_str().unwrap().to_owned();
    assert!(token.starts_with("aidp_inv_"), "{token}");
    assert_eq!(
        app.post_json("/auth/set-password", &json!({ "token": token, "password": "a-new-long-password" }))
            .await
            .status(),
        StatusCode::NO_CONTENT
    );
    let resp =
        app.post_json("/auth/set-password", &json!({ "token": token, "password": "another-long-password" })).await;
    assert_problem(resp, StatusCode::BAD_REQUEST, "invalid_token").await;
    // Emails are unique without regard to case.
    let dev = app.sign_in("dev@beta.test", "a-new-long-password").await;
    let dev_id = dev.user_id.clone();
    let again = app.invite(&owner, &owner.org_id, "DEV@beta.test", "member").await;
    let resp = app
        .as_(&dev, Method::POST, &format!("/api/v1/invitations/{}/accept", again["id"].as_str().unwrap()))
        .send()
        .await
        .unwrap();
    assert_problem(resp, StatusCode::CONFLICT, "already_member").await;

    // A member cannot manage members; an admin cannot make owners.
    let resp = app
        .as_(&dev, Method::PATCH, &format!("/api/v1/organizations/{}/members/{}", owner.org_id, dev_id))
        .json(&json!({ "role": "admin" }))
        .send()
        .await
        .unwrap();
    assert_problem(resp, StatusCode::FORBIDDEN, "insufficient_role").await;
    let members_url = format!("/api/v1/organizations/{}/members", owner.org_id);
    let members = json_ok(app.as_(&dev, Method::GET, &members_url).send().await.unwrap(), StatusCode::OK).await;
    assert_eq!(members.as_array().unwrap().len(), 2);
    let resp = app
        .as_(&owner, Method::PATCH, &format!("{members_url}/{dev_id}"))
        .json(&json!({ "role": "admin" }))
        .send()
        .await
        .unwrap();
    assert_eq!(json_ok(resp, StatusCode::OK).await["role"], "admin");
    // The role change applies at once: the cached principal was invalidated.
    let resp = app
        .as_(&dev, Method::PATCH, &format!("{members_url}/{}", owner.user_id))
        .json(&json!({ "role": "member" }))
        .send()
        .await
        .unwrap();
    assert_problem(resp, StatusCode::FORBIDDEN, "insufficient_role").await;

    // The last owner can be neither demoted nor removed.
    let resp = app
        .as_(&owner, Method::PATCH, &format!("{members_url}/{}", owner.user_id))
        .json(&json!({ "role": "admin" }))
        .send()
        .await
        .unwrap();
    assert_problem(resp, StatusCode::CONFLICT, "last_owner").await;
    let resp = app.as_(&owner, Method::DELETE, &format!("{members_url}/{}", owner.user_id)).send().await.unwrap();
    assert_problem(resp, StatusCode::CONFLICT, "last_owner").await;

    // Removing a member ends their access to the organization at once.
    assert_eq!(
        app.as_(&owner, Method::DELETE, &format!("{members_url}/{dev_id}")).send().await.unwrap().status(),
        StatusCode::NO_CONTENT
    );
    let resp = app.as_(&dev, Method::GET, &members_url).send().await.unwrap();
    assert_problem(resp, StatusCode::NOT_FOUND, "not_found").await;
}

#[tokio::test]
async fn concurrent_demotions_never_leave_an_org_without_owner() {
    let app = spawn_app().await;
    let admin = app.bootstrap().await;
    let a = app.org_with_owner(&admin, "Two Owners", "a@two.test").await;
    let b_id = app.add_member(&a, &a.org_id, "b@two.test", "owner").await["user_id"].as_str().unwrap().to_owned();
    let url = |u: &str| format!("/api/v1/organizations/{}/members/{u}", a.org_id);
    let (r1, r2) = tokio::join!(
        app.as_(&a, Method::PATCH, &url(&a.user_id)).json(&json!({ "role": "admin" })).send(),
        app.as_(&admin, Method::PATCH, &url(&b_id)).json(&json!({ "role": "admin" })).send(),
    );
    let mut codes = [r1.unwrap().status().as_u16(), r2.unwrap().status().as_u16()];
    codes.sort();
    assert!(codes == [200, 409] || codes == [200, 403], "{codes:?}");
    let owners: i64 =
        sqlx::query_scalar("select count(*) from membership where organization_id = $1::uuid and role = 'owner'")
            .bind(&a.org_id)
            .fetch_one(&app.db)
            .await
            .unwrap();
    assert_eq!(owners, 1);
}

#[tokio::test]
async fn another_orgs_objects_are_404() {
    let app = spawn_app().await;
    let admin = app.bootstrap().await;
    let a = app.org_with_owner(&admin, "Org A", "owner@a.test").await;
    let b = app.org_with_owner(&admin, "Org B", "owner@b.test").await;
    let a_key = app.api_key(&a, None).await;
    let b_key_id = json_ok(
        app.as_(&b, Method::POST, "/auth/api-keys").json(&json!({ "description": "b" })).send().await.unwrap(),
        StatusCode::CREATED,
    )
    .await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let org_b = &b.org_id;
    let member_b = format!("/api/v1/organizations/{org_b}/members/{}", b.user_id);
    for caller in [&a, &a_key] {
        let cases: Vec<(Method, String, Option<Value>)> = vec![
            (Method::GET, format!("/api/v1/organizations/{org_b}"), None),
            (Method::GET, format!("/api/v1/organizations/{org_b}/members"), None),
            (
                Method::POST,
                format!("/api/v1/organizations/{org_b}/members"),
                Some(json!({ "email": "x@a.test", "role": "member" })),
            ),
            (Method::PATCH, member_b.clone(), Some(json!({ "role": "member" }))),
            (Method::DELETE, member_b.clone(), None),
            (Method::DELETE, format!("/auth/api-keys/{b_key_id}"), None),
        ];
        for (method, path, body) in cases {
            let mut req = app.as_(caller, method.clone(), &path);
            if let Some(b) = body {
                req = req.json(&b);
            }
            let resp = req.send().await.unwrap();
            assert_problem(resp, StatusCode::NOT_FOUND, "not_found").await;
        }
        // Org-less routes pointed at B with X-Org-Id are refused, never served.
        for path in ["/auth/api-keys", "/api/v1/audit", "/api/v1/audit/verify"] {
            let resp = app.as_(caller, Method::GET, path).header("x-org-id", org_b).send().await.unwrap();
            assert_problem(resp, StatusCode::FORBIDDEN, "org_not_member").await;
        }
        let orgs =
            json_ok(app.as_(caller, Method::GET, "/api/v1/organizations").send().await.unwrap(), StatusCode::OK).await;
        assert!(!orgs.to_string().contains(org_b.as_str()));
    }
    // B's key still exists: nothing of B's was touched.
    let live: i64 =
        sqlx::query_scalar("select count(*) from api_key where api_key_id = $1::uuid and revoked_at is null")
            .bind(&b_key_id)
            .fetch_one(&app.db)
            .await
            .unwrap();
    assert_eq!(live, 1);
    let members: i64 = sqlx::query_scalar("select count(*) from membership where organization_id = $1::uuid")
        .bind(org_b)
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert_eq!(members, 1);
}

#[tokio::test]
async fn bad_input_is_4xx_problem_json() {
    let app = spawn_app().await;
    let admin = app.bootstrap().await;
    let org = &admin.org_id;
    let long = "x".repeat(5000);
    /// Method, path, raw body, JSON body, expected status and code.
    type Case<'a> = (Method, String, Option<&'a str>, Option<Value>, StatusCode, &'a str);
    let cases: Vec<Case> = vec![
        (Method::POST, "/auth/login".into(), Some("{\"email\": "), None, StatusCode::BAD_REQUEST, "malformed_json"),
        (
            Method::POST,
            "/auth/login".into(),
            None,
            Some(json!({ "email": 5, "password": "x" })),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_body",
        ),
        (
            Method::POST,
            "/auth/login".into(),
            None,
            Some(json!({ "email": "a@b.c" })),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_body",
        ),
        (
            Method::POST,
            "/auth/login".into(),
            None,
            Some(json!({ "email": long, "password": "x" })),
            StatusCode::UNPROCESSABLE_ENTITY,
            "validation_failed",
        ),
        (
            Method::POST,
            "/api/v1/organizations".into(),
            None,
            Some(json!({ "name": "" })),
            StatusCode::UNPROCESSABLE_ENTITY,
            "validation_failed",
        ),
        (
            Method::POST,
            "/api/v1/organizations".into(),
            None,
            Some(json!({ "name": "ok", "slug": "Bad Slug" })),
            StatusCode::UNPROCESSABLE_ENTITY,
            "validation_failed",
        ),
        (
            Method::POST,
            "/api/v1/organizations".into(),
            None,
            Some(json!({ "name": long })),
            StatusCode::UNPROCESSABLE_ENTITY,
            "validation_failed",
        ),
        (
            Method::POST,
            format!("/api/v1/organizations/{org}/members"),
            None,
            Some(json!({ "email": "not-an-email", "role": "member" })),
            StatusCode::UNPROCESSABLE_ENTITY,
            "validation_failed",
        ),
        (
            Method::POST,
            format!("/api/v1/organizations/{org}/members"),
            None,
            Some(json!({ "email": "a@b.test", "role": "emperor" })),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_body",
        ),
        (
            Method::POST,
            format!("/api/v1/organizations/{org}/members"),
            None,
            // An admin no longer chooses anyone's password.
            Some(json!({ "email": "a@b.test", "role": "member", "password": "correct-horse-battery" })),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_body",
        ),
        (
            Method::PATCH,
            format!("/api/v1/organizations/{org}/members/{}", admin.user_id),
            None,
            Some(json!({ "role": 7 })),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_body",
        ),
        (Method::GET, "/api/v1/organizations/not-a-uuid".into(), None, None, StatusCode::NOT_FOUND, "not_found"),
        (
            Method::GET,
            format!("/api/v1/organizations/{}", uuid::Uuid::new_v4()),
            None,
            None,
            StatusCode::NOT_FOUND,
            "not_found",
        ),
        (
            Method::DELETE,
            format!("/api/v1/organizations/{org}/members/{}", uuid::Uuid::new_v4()),
            None,
            None,
            StatusCode::NOT_FOUND,
            "not_found",
        ),
        (
            Method::DELETE,
            format!("/auth/api-keys/{}", uuid::Uuid::new_v4()),
            None,
            None,
            StatusCode::NOT_FOUND,
            "not_found",
        ),
        (
            Method::POST,
            "/auth/api-keys".into(),
            None,
            Some(json!({ "description": "x", "expires_days": 0 })),
            StatusCode::UNPROCESSABLE_ENTITY,
            "validation_failed",
        ),
        (
            Method::POST,
            "/auth/api-keys".into(),
            None,
            Some(json!({ "description": "x", "expires_days": "soon" })),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_body",
        ),
        (
            Method::POST,
            "/auth/api-keys".into(),
            None,
            Some(json!({ "description": "x", "extra": true })),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_body",
        ),
        // Postgres cannot store U+0000 in text: refused as input, never a 500 from a statement.
        (
            Method::POST,
            "/api/v1/agents".into(),
            None,
            Some(json!({ "name": "a\u{0}b", "description": "\u{0}" })),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_body",
        ),
        (
            Method::POST,
            "/api/v1/organizations".into(),
            None,
            Some(json!({ "name": "nul\u{0}org" })),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_body",
        ),
        (Method::GET, "/api/v1/agents?q=a%00b".into(), None, None, StatusCode::BAD_REQUEST, "invalid_query"),
        (Method::GET, "/api/v1/audit?limit=abc".into(), None, None, StatusCode::BAD_REQUEST, "invalid_query"),
        (Method::GET, "/api/v1/audit?limit=100000".into(), None, None, StatusCode::BAD_REQUEST, "invalid_query"),
        (Method::GET, "/api/v1/audit?since=yesterday".into(), None, None, StatusCode::BAD_REQUEST, "invalid_query"),
        (
            Method::POST,
            "/auth/set-password".into(),
            None,
            Some(json!({ "token": "nope", "password": "long-enough-password" })),
            StatusCode::BAD_REQUEST,
            "invalid_token",
        ),
    ];
    for (method, path, raw, body, status, code) in cases {
        let mut req = app.as_(&admin, method.clone(), &path);
        if let Some(raw) = raw {
            req = req.header("content-type", "application/json").body(raw);
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.unwrap();
        let got = resp.status();
        if got != status {
            panic!("{method} {path}: {got} {}", resp.text().await.unwrap());
        }
        assert_problem(resp, status, code).await;
    }
    // A NUL in an OAuth form: RFC 6749 JSON, not a 500 from the client lookup.
    let resp = app
        .client
        .post(app.url("/api/v1/token"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body("grant_type=client_credentials&client_id=a%00b&client_secret=x")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    assert_eq!(resp.json::<Value>().await.unwrap()["error"], "invalid_request");
    // Wrong content type.
    let resp = app
        .client
        .post(app.url("/auth/login"))
        .body("email=a")
        .header("content-type", "text/plain")
        .send()
        .await
        .unwrap();
    assert_problem(resp, StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type").await;
    // A malformed X-Org-Id.
    let resp = app.as_(&admin, Method::GET, "/auth/me").header("x-org-id", "nope").send().await.unwrap();
    assert_problem(resp, StatusCode::BAD_REQUEST, "invalid_org_header").await;
}

#[tokio::test]
async fn logout_and_key_deletion_reach_a_second_instance_at_once() {
    let app1 = spawn_app().await;
    let app2 = spawn_on(app1.config.clone(), Some(app1.redis.prefix().to_owned())).await;
    let admin = app1.bootstrap().await;
    let key = app1.api_key(&admin, None).await;
    let key_id: uuid::Uuid = sqlx::query_scalar("select api_key_id from api_key").fetch_one(&app1.db).await.unwrap();
    // Both instances cache the credentials.
    for app in [&app1, &app2] {
        assert_eq!(app.as_(&admin, Method::GET, "/auth/me").send().await.unwrap().status(), StatusCode::OK);
        assert_eq!(app.as_(&key, Method::GET, "/auth/me").send().await.unwrap().status(), StatusCode::OK);
    }
    tokio::time::sleep(Duration::from_millis(200)).await; // let both subscribers attach
    let resp = app1.as_(&admin, Method::DELETE, &format!("/auth/api-keys/{key_id}")).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::NO_CONTENT);
    let resp = app1.as_(&admin, Method::POST, "/auth/logout").send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::NO_CONTENT);
    for caller in [&admin, &key] {
        let started = Instant::now();
        loop {
            let s = app2.as_(caller, Method::GET, "/auth/me").send().await.unwrap().status();
            if s == StatusCode::UNAUTHORIZED {
                break;
            }
            // The cache TTL is 30 s: only the pub/sub message can make this quick.
            assert!(started.elapsed() < Duration::from_secs(2), "second instance still accepts a revoked credential");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}
