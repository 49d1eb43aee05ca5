//! Identity II: agents, credentials, the token endpoint, JWKS and discovery, introspection, and
//! revocation that really revokes (other instances, Redis flushed, Redis stopped).

use std::time::{Duration, Instant};

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD as B64};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::helpers::{
    Caller, Client, TestApp, assert_problem, json_ok, proxy::Proxy, redis_url, spawn_app, spawn_app_with, spawn_on,
};

async fn oauth_error(resp: reqwest::Response, status: StatusCode, error: &str) -> Value {
    assert_eq!(resp.headers()["cache-control"], "no-store");
    let got = resp.status();
    let ct = resp.headers()["content-type"].to_str().unwrap().to_owned();
    let body: Value = resp.json().await.unwrap();
    assert_eq!(got, status, "{body}");
    assert_eq!(ct, "application/json");
    assert_eq!(body["error"], error, "{body}");
    assert!(body["error_description"].is_string());
    body
}

fn claims_of(token: &str) -> (Value, Value) {
    let mut parts = token.split('.');
    let h: Value = serde_json::from_slice(&B64.decode(parts.next().unwrap()).unwrap()).unwrap();
    let c: Value = serde_json::from_slice(&B64.decode(parts.next().unwrap()).unwrap()).unwrap();
    (h, c)
}

async fn setup(app: &TestApp) -> (Caller, Client) {
    let admin = app.bootstrap().await;
    let client = app.agent_client(&admin, &["tools:read", "tools:write", "agents:read"]).await;
    (admin, client)
}

#[tokio::test]
async fn agent_registry_crud_filters_and_isolation() {
    let app = spawn_app().await;
    let admin = app.bootstrap().await;
    let a = app
        .create_agent(
            &admin,
            json!({ "name": "Researcher", "capabilities": ["search", "browse"], "metadata": { "model": "x" } }),
        )
        .await;
    assert_eq!(a["status"], "active");
    assert_eq!(a["owner_id"], admin.user_id);
    assert_eq!(a["metadata"]["model"], "x");
    for i in 0..3 {
        app.create_agent(&admin, json!({ "name": format!("helper-{i}"), "capabilities": ["browse"] })).await;
    }
    let list = |q: &str| app.as_(&admin, Method::GET, &format!("/api/v1/agents{q}")).send();
    let all = json_ok(list("").await.unwrap(), StatusCode::OK).await;
    assert_eq!(all["items"].as_array().unwrap().len(), 4);
    let search = json_ok(list("?capability=search").await.unwrap(), StatusCode::OK).await;
    assert_eq!(search["items"].as_array().unwrap().len(), 1);
    let named = json_ok(list("?q=HELP").await.unwrap(), StatusCode::OK).await;
    assert_eq!(named["items"].as_array().unwrap().len(), 3);
    let page = json_ok(list("?limit=3").await.unwrap(), StatusCode::OK).await;
    let cursor = page["next_cursor"].as_str().unwrap();
    let rest = json_ok(list(&format!("?limit=3&after={cursor}")).await.unwrap(), StatusCode::OK).await;
    assert_eq!(rest["items"].as_array().unwrap().len(), 1);

    let id = a["id"].as_str().unwrap();
    let updated = json_ok(
        app.as_(&admin, Method::PATCH, &format!("/api/v1/agents/{id}"))
            .json(&json!({ "description": "reads papers", "allowed_scopes": ["papers:read"] }))
            .send()
            .await
            .unwrap(),
        StatusCode::OK,
    )
    .await;
    assert_eq!(updated["description"], "reads papers");
    assert_eq!(updated["name"], "Researcher");
    let suspended = json_ok(list("?status=suspended").await.unwrap(), StatusCode::OK).await;
    assert!(suspended["items"].as_array().unwrap().is_empty());

    // Another organization sees none of it.
    let other = app.org_with_owner(&admin, "Other", "owner@other.test").await;
    for (m, path) in [
        (Method::GET, format!("/api/v1/agents/{id}")),
        (Method::PATCH, format!("/api/v1/agents/{id}")),
        (Method::DELETE, format!("/api/v1/agents/{id}")),
        (Method::GET, format!("/api/v1/agents/{id}/credentials")),
        (Method::POST, format!("/api/v1/agents/{id}/credentials")),
        (Method::POST, format!("/api/v1/agents/{id}/revoke-tokens")),
    ] {
        let resp = app.as_(&other, m.clone(), &path).json(&json!({})).send().await.unwrap();
        assert_problem(resp, StatusCode::NOT_FOUND, "not_found").await;
    }
    let theirs = json_ok(app.as_(&other, Method::GET, "/api/v1/agents").send().await.unwrap(), StatusCode::OK).await;
    assert!(theirs["items"].as_array().unwrap().is_empty());

    // A plain member cannot manage someone else's agent.
    app.add_member(&admin, &admin.org_id, "dev@acme.test", "member").await;
    let dev = app.sign_in("dev@acme.test", crate::helpers::PASSWORD).await;
    let resp = app.as_(&dev, Method::DELETE, &format!("/api/v1/agents/{id}")).send().await.unwrap();
    assert_problem(resp, StatusCode::FORBIDDEN, "insufficient_role").await;

    // Bad input.
    for body in [
        json!({ "name": "" }),
        json!({ "name": "x", "allowed_scopes": ["has space"] }),
        json!({ "name": "x", "metadata": [1, 2] }),
        json!({ "name": "x".repeat(300) }),
    ] {
        let resp = app.as_(&admin, Method::POST, "/api/v1/agents").json(&body).send().await.unwrap();
        assert_problem(resp, StatusCode::UNPROCESSABLE_ENTITY, "validation_failed").await;
    }
    let resp = app
        .as_(&admin, Method::POST, "/api/v1/agents")
        .json(&json!({ "name": "x", "owner_id": uuid::Uuid::new_v4() }))
        .send()
        .await
        .unwrap();
    assert_problem(resp, StatusCode::UNPROCESSABLE_ENTITY, "validation_failed").await;
    let resp = app
        .as_(&admin, Method::PATCH, &format!("/api/v1/agents/{id}"))
        .json(&json!({ "status": "gone" }))
        .send()
        .await
        .unwrap();
    assert_problem(resp, StatusCode::UNPROCESSABLE_ENTITY, "invalid_body").await;

    assert_eq!(
        app.as_(&admin, Method::DELETE, &format!("/api/v1/agents/{id}")).send().await.unwrap().status(),
        StatusCode::NO_CONTENT
    );
    let resp = app.as_(&admin, Method::GET, &format!("/api/v1/agents/{id}")).send().await.unwrap();
    assert_problem(resp, StatusCode::NOT_FOUND, "not_found").await;
}

#[tokio::test]
async fn client_credentials_issue_rfc9068_tokens() {
    let app = spawn_app().await;
    let (_, client) = setup(&app).await;
    // client_secret_basic.
    let resp = app.token_request(&client, &[("grant_type", "client_credentials"), ("scope", "tools:read")]).await;
    assert_eq!(resp.headers()["cache-control"], "no-store");
    let body = json_ok(resp, StatusCode::OK).await;
    assert_eq!(body["token_type"], "Bearer");
    assert_eq!(body["expires_in"], 900);
    assert_eq!(body["scope"], "tools:read");
    let token = body["access_token"].as_str().unwrap();
    let (header, claims) = claims_of(token);
    assert_eq!(header["typ"], "at+jwt");
    assert_eq!(header["alg"], "ES256");
    assert!(header["kid"].is_string());
    assert_eq!(claims["iss"], app.config.server.public_url);
    assert_eq!(claims["aud"], app.config.server.public_url);
    assert_eq!(claims["sub"], format!("agent:{}", client.agent_id));
    assert_eq!(claims["client_id"], client.client_id);
    assert_eq!(claims["actor_type"], "agent");
    assert_eq!(claims["scope"], "tools:read");
    assert_eq!(claims["exp"].as_i64().unwrap() - claims["iat"].as_i64().unwrap(), 900);
    assert!(claims["nbf"].is_i64() && claims["jti"].is_string() && claims["org_id"].is_string());

    // client_secret_post; no scope asked: all the agent may have.
    let resp = app
        .client
        .post(app.url("/api/v1/token"))
        .form(&[
            ("grant_type", "client_credentials"),
            ("client_id", &client.client_id),
            ("client_secret", &client.secret),
        ])
        .send()
        .await
        .unwrap();
    let body = json_ok(resp, StatusCode::OK).await;
    assert_eq!(body["scope"], "tools:read tools:write agents:read");

    // The token is a credential: the agent is the actor.
    let me = json_ok(
        app.client.get(app.url("/auth/me")).bearer_auth(body["access_token"].as_str().unwrap()).send().await.unwrap(),
        StatusCode::OK,
    )
    .await;
    assert_eq!(me["actor_type"], "agent");
    assert_eq!(me["actor_id"], format!("agent:{}", client.agent_id));
    assert_eq!(me["credential_type"], "access_token");
    assert!(me["roles"].as_array().unwrap().contains(&json!("agent")));
    // Its scopes limit it: agents:read yes, audit no.
    let token = body["access_token"].as_str().unwrap();
    let resp = app.client.get(app.url("/api/v1/audit")).bearer_auth(token).send().await.unwrap();
    assert_problem(resp, StatusCode::FORBIDDEN, "insufficient_scope").await;
}

#[tokio::test]
async fn token_endpoint_errors_follow_rfc6749() {
    let app = spawn_app().await;
    let (_, client) = setup(&app).await;
    let url = app.url("/api/v1/token");
    let resp = app.token_request(&client, &[("grant_type", "client_credentials"), ("scope", "tools:read admin")]).await;
    oauth_error(resp, StatusCode::BAD_REQUEST, "invalid_scope").await;
    let resp = app.token_request(&client, &[("grant_type", "password")]).await;
    oauth_error(resp, StatusCode::BAD_REQUEST, "unsupported_grant_type").await;
    let resp = app.token_request(&client, &[("scope", "tools:read")]).await;
    oauth_error(resp, StatusCode::BAD_REQUEST, "invalid_request").await;
    let resp =
        app.token_request(&client, &[("grant_type", "client_credentials"), ("grant_type", "client_credentials")]).await;
    oauth_error(resp, StatusCode::BAD_REQUEST, "invalid_request").await;
    let resp = app
        .token_request(&client, &[("grant_type", "client_credentials"), ("resource", "https://elsewhere.test")])
        .await;
    oauth_error(resp, StatusCode::BAD_REQUEST, "invalid_target").await;

    let wrong = Client { secret: "aidp_cs_wrong".into(), ..client.clone() };
    let resp = app.token_request(&wrong, &[("grant_type", "client_credentials")]).await;
    assert_eq!(resp.headers()["www-authenticate"], "Basic realm=\"agentidp\"");
    oauth_error(resp, StatusCode::UNAUTHORIZED, "invalid_client").await;
    let unknown = Client { client_id: "aidp_client_nobody".into(), ..client.clone() };
    oauth_error(
        app.token_request(&unknown, &[("grant_type", "client_credentials")]).await,
        StatusCode::UNAUTHORIZED,
        "invalid_client",
    )
    .await;
    let resp = app.client.post(&url).form(&[("grant_type", "client_credentials")]).send().await.unwrap();
    oauth_error(resp, StatusCode::UNAUTHORIZED, "invalid_client").await;
    // Two authentication methods at once.
    let resp = app
        .client
        .post(&url)
        .basic_auth(&client.client_id, Some(&client.secret))
        .form(&[("grant_type", "client_credentials"), ("client_secret", client.secret.as_str())])
        .send()
        .await
        .unwrap();
    oauth_error(resp, StatusCode::BAD_REQUEST, "invalid_request").await;
    // JSON instead of a form; garbage; a broken Basic header; a huge body.
    let resp = app.client.post(&url).json(&json!({ "grant_type": "client_credentials" })).send().await.unwrap();
    oauth_error(resp, StatusCode::BAD_REQUEST, "invalid_request").await;
    let resp = app
        .client
        .post(&url)
        .header("content-type", "application/x-www-form-urlencoded")
        .body(vec![0xff, 0xfe, b'=', 0x00])
        .send()
        .await
        .unwrap();
    assert!(resp.status().is_client_error());
    let resp = app
        .client
        .post(&url)
        .header("authorization", "Basic !!!")
        .form(&[("grant_type", "client_credentials")])
        .send()
        .await
        .unwrap();
    oauth_error(resp, StatusCode::UNAUTHORIZED, "invalid_client").await;
    let resp = app
        .client
        .post(&url)
        .header("content-type", "application/x-www-form-urlencoded")
        .body(vec![b'a'; 2 << 20])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::PAYLOAD_TOO_LARGE);

    // A suspended agent gets no tokens.
    let admin = app.sign_in(crate::helpers::ADMIN_EMAIL, crate::helpers::PASSWORD).await;
    app.as_(&admin, Method::PATCH, &format!("/api/v1/agents/{}", client.agent_id))
        .json(&json!({ "status": "suspended" }))
        .send()
        .await
        .unwrap();
    let resp = app.token_request(&client, &[("grant_type", "client_credentials")]).await;
    oauth_error(resp, StatusCode::BAD_REQUEST, "unauthorized_client").await;
}

#[tokio::test]
async fn resource_indicator_sets_the_audience_when_allowed() {
    let app = spawn_app_with(&[("auth.allowed_resources", json!(["https://tools.example.com"]))]).await;
    let (_, client) = setup(&app).await;
    let body = json_ok(
        app.token_request(&client, &[("grant_type", "client_credentials"), ("resource", "https://tools.example.com")])
            .await,
        StatusCode::OK,
    )
    .await;
    let token = body["access_token"].as_str().unwrap();
    assert_eq!(claims_of(token).1["aud"], "https://tools.example.com");
    // A token for another resource is not accepted here.
    assert_eq!(app.me_status(token).await, StatusCode::UNAUTHORIZED);
}

/// Discovery → JWKS → verification by jsonwebtoken, not by our own code.
async fn independent_verification(alg: &str) {
    let app = spawn_app_with(&[("auth.signing_algorithm", json!(alg))]).await;
    let (_, client) = setup(&app).await;
    let token = app.access_token(&client).await;
    let meta = json_ok(app.get("/.well-known/oauth-authorization-server").await, StatusCode::OK).await;
    let oidc = json_ok(app.get("/.well-known/openid-configuration").await, StatusCode::OK).await;
    assert_eq!(meta, oidc);
    assert_eq!(meta["issuer"], app.config.server.public_url);
    assert_eq!(
        meta["grant_types_supported"],
        json!([
            "authorization_code",
            "refresh_token",
            "client_credentials",
            "urn:ietf:params:oauth:grant-type:token-exchange",
            "urn:ietf:params:oauth:grant-type:jwt-bearer"
        ])
    );
    assert_eq!(
        meta["token_endpoint_auth_methods_supported"],
        json!(["client_secret_basic", "client_secret_post", "private_key_jwt", "none"])
    );
    for key in ["token_endpoint", "introspection_endpoint", "revocation_endpoint", "scopes_supported"] {
        assert!(!meta[key].is_null(), "{key}");
    }
    let jwks_path = meta["jwks_uri"].as_str().unwrap().trim_start_matches(&app.config.server.public_url).to_owned();
    let jwks: jsonwebtoken::jwk::JwkSet = app.get(&jwks_path).await.json().await.unwrap();
    let header = jsonwebtoken::decode_header(&token).unwrap();
    let jwk = jwks.find(header.kid.as_deref().unwrap()).expect("the token's kid is published");
    let key = jsonwebtoken::DecodingKey::from_jwk(jwk).unwrap();
    let mut validation = jsonwebtoken::Validation::new(header.alg);
    validation.set_issuer(&[meta["issuer"].as_str().unwrap()]);
    validation.set_audience(&[app.config.server.public_url.as_str()]);
    let data =
        jsonwebtoken::decode::<Value>(&token, &key, &validation).expect("a JWKS-driven verifier accepts the token");
    assert_eq!(data.claims["client_id"], client.client_id);
    assert_eq!(format!("{:?}", header.alg), alg);

    let prm = json_ok(app.get("/.well-known/oauth-protected-resource").await, StatusCode::OK).await;
    assert_eq!(prm["authorization_servers"], json!([app.config.server.public_url]));
    assert_eq!(prm["resource"], app.config.server.public_url);
}

#[tokio::test]
async fn es256_tokens_verify_against_the_published_jwks() {
    independent_verification("ES256").await;
}

#[tokio::test]
async fn rs256_tokens_verify_against_the_published_jwks() {
    independent_verification("RS256").await;
}

#[tokio::test]
async fn eddsa_tokens_verify_against_the_published_jwks() {
    independent_verification("EdDSA").await;
}

#[tokio::test]
async fn forged_and_misissued_tokens_are_401() {
    let app = spawn_app().await;
    let (_, client) = setup(&app).await;
    let good = app.access_token(&client).await;
    let (header, claims) = claims_of(&good);
    let sig = good.rsplit('.').next().unwrap();
    let enc = |v: &Value| B64.encode(serde_json::to_vec(v).unwrap());

    let mut none = header.clone();
    none["alg"] = json!("none");
    let mut hs = header.clone();
    hs["alg"] = json!("HS256");
    let jwks: Value = app.get("/.well-known/jwks.json").await.json().await.unwrap();
    let public = serde_json::to_vec(&jwks["keys"][0]).unwrap();
    let hs_input = format!("{}.{}", enc(&hs), enc(&claims));
    let hs_sig = {
        use hmac::Mac;
        let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(&public).unwrap();
        mac.update(hs_input.as_bytes());
        B64.encode(mac.finalize().into_bytes())
    };
    let mut unknown_kid = header.clone();
    unknown_kid["kid"] = json!("not-a-key");
    let mut wrong_typ = header.clone();
    wrong_typ["typ"] = json!("JWT");
    let mut tampered = claims.clone();
    tampered["scope"] = json!("everything");

    let sign = |c: &Value| {
        let claims: agentidp::auth::tokens::Claims = serde_json::from_value(c.clone()).unwrap();
        agentidp::auth::tokens::sign(app.state.keys(), &claims).unwrap()
    };
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let mut expired = claims.clone();
    expired["exp"] = json!(now - 60);
    let mut wrong_aud = claims.clone();
    wrong_aud["aud"] = json!("https://someone-else.test");
    let mut wrong_iss = claims.clone();
    wrong_iss["iss"] = json!("https://evil.test");
    let mut future = claims.clone();
    future["nbf"] = json!(now + 3600);

    let cases = [
        ("alg none", format!("{}.{}.", enc(&none), enc(&claims))),
        ("HMAC with the public key", format!("{hs_input}.{hs_sig}")),
        ("unknown kid", format!("{}.{}.{sig}", enc(&unknown_kid), enc(&claims))),
        ("wrong typ", format!("{}.{}.{sig}", enc(&wrong_typ), enc(&claims))),
        ("tampered claims", format!("{}.{}.{sig}", enc(&header), enc(&tampered))),
        ("expired", sign(&expired)),
        ("wrong aud", sign(&wrong_aud)),
        ("wrong iss", sign(&wrong_iss)),
        ("not yet valid", sign(&future)),
        ("garbage", "a.b.c".to_owned()),
    ];
    assert_eq!(app.me_status(&good).await, StatusCode::OK);
    for (what, token) in cases {
        let resp = app.client.get(app.url("/auth/me")).bearer_auth(&token).send().await.unwrap();
        assert_eq!(resp.status(), StatusCode::UNAUTHORIZED, "{what}");
        assert!(resp.headers()["www-authenticate"].to_str().unwrap().contains("invalid_token"), "{what}");
        assert_problem(resp, StatusCode::UNAUTHORIZED, "unauthorized").await;
    }
}

#[tokio::test]
async fn introspection_reveals_only_the_callers_org() {
    let app = spawn_app().await;
    let (admin, client) = setup(&app).await;
    let token = app.access_token(&client).await;
    let introspect = |basic: Option<(&str, &str)>, key: Option<&str>, token: &str| {
        let mut req = app
            .client
            .post(app.url("/api/v1/token/introspect"))
            .form(&[("token", token), ("token_type_hint", "access_token")]);
        if let Some((id, secret)) = basic {
            req = req.basic_auth(id, Some(secret));
        }
        if let Some(k) = key {
            req = req.header("x-api-key", k);
        }
        req.send()
    };
    let body =
        json_ok(introspect(Some((&client.client_id, &client.secret)), None, &token).await.unwrap(), StatusCode::OK)
            .await;
    assert_eq!(body["active"], true);
    assert_eq!(body["client_id"], client.client_id);
    assert_eq!(body["sub"], format!("agent:{}", client.agent_id));
    assert_eq!(body["token_type"], "Bearer");
    assert!(body["exp"].is_i64() && body["scope"].is_string());

    let admin_key = app.api_key(&admin, Some(&["tokens:introspect"])).await;
    let body = json_ok(introspect(None, Some(&admin_key.token), &token).await.unwrap(), StatusCode::OK).await;
    assert_eq!(body["active"], true);
    // An authenticated caller without the scope is refused as such, with no Basic challenge.
    let weak_key = app.api_key(&admin, Some(&["audit:read"])).await;
    let refused = introspect(None, Some(&weak_key.token), &token).await.unwrap();
    assert!(refused.headers().get("www-authenticate").is_none(), "{:?}", refused.headers());
    oauth_error(refused, StatusCode::FORBIDDEN, "insufficient_scope").await;

    for junk in ["", "nonsense", "a.b.c", &format!("{token}x")] {
        let body =
            json_ok(introspect(Some((&client.client_id, &client.secret)), None, junk).await.unwrap(), StatusCode::OK)
                .await;
        assert_eq!(body, json!({ "active": false }), "{junk}");
    }
    // Another org's client learns nothing.
    let other = app.org_with_owner(&admin, "Other", "owner@other.test").await;
    let outsider = app.agent_client(&other, &["x"]).await;
    let body =
        json_ok(introspect(Some((&outsider.client_id, &outsider.secret)), None, &token).await.unwrap(), StatusCode::OK)
            .await;
    assert_eq!(body, json!({ "active": false }));
    oauth_error(introspect(None, None, &token).await.unwrap(), StatusCode::UNAUTHORIZED, "invalid_client").await;
    let resp = app
        .client
        .post(app.url("/api/v1/token/introspect"))
        .basic_auth(&client.client_id, Some(&client.secret))
        .form(&[("x", "y")])
        .send()
        .await
        .unwrap();
    oauth_error(resp, StatusCode::BAD_REQUEST, "invalid_request").await;
}

async fn revoke(app: &TestApp, client: &Client, token: &str) -> StatusCode {
    app.client
        .post(app.url("/api/v1/token/revoke"))
        .basic_auth(&client.client_id, Some(&client.secret))
        .form(&[("token", token)])
        .send()
        .await
        .unwrap()
        .status()
}

#[tokio::test]
async fn revoked_tokens_stay_revoked_across_instances_flush_and_outage() {
    // Redis database 5 is this test's alone, so flushing it disturbs no other test.
    let redis5 = format!("{}/5", redis_url());
    let proxy = Proxy::start(redis_url().trim_start_matches("redis://").to_owned()).await;
    let app1 = spawn_app_with(&[("redis.url", json!(format!("redis://{}/5", proxy.addr)))]).await;
    let mut cfg2 = app1.config.clone();
    cfg2.redis.url = redis5.clone();
    let app2 = spawn_on(cfg2, Some(app1.redis.prefix().to_owned())).await;
    let (_, client) = setup(&app1).await;
    let t1 = app1.access_token(&client).await;
    let t2 = app1.access_token(&client).await;
    for app in [&app1, &app2] {
        assert_eq!(app.me_status(&t1).await, StatusCode::OK);
    }
    tokio::time::sleep(Duration::from_millis(300)).await; // both subscribers attached

    // Revoked through one instance, rejected by the other: pub/sub, not a cache expiry.
    assert_eq!(revoke(&app1, &client, &t1).await, StatusCode::OK);
    let started = Instant::now();
    while app2.me_status(&t1).await != StatusCode::UNAUTHORIZED {
        assert!(started.elapsed() < Duration::from_secs(2), "the second instance still accepts a revoked token");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    eprintln!("revocation reached the second instance in {:?}", started.elapsed());
    assert_eq!(app1.me_status(&t1).await, StatusCode::UNAUTHORIZED);
    // Unknown tokens get the same 200.
    assert_eq!(revoke(&app1, &client, "not-a-token").await, StatusCode::OK);

    // Redis flushed: still revoked, here and on an instance that starts afterwards.
    let mut conn =
        deadpool_redis::redis::Client::open(redis5.as_str()).unwrap().get_multiplexed_async_connection().await.unwrap();
    let () = deadpool_redis::redis::cmd("FLUSHDB").query_async(&mut conn).await.unwrap();
    assert_eq!(app2.me_status(&t1).await, StatusCode::UNAUTHORIZED);
    let app3 = spawn_on(app1.config.clone(), Some(format!("test:{}:", uuid::Uuid::new_v4().simple()))).await;
    assert_eq!(app3.me_status(&t1).await, StatusCode::UNAUTHORIZED);
    assert_eq!(app3.me_status(&t2).await, StatusCode::OK);

    // Redis gone from app1: revocation still holds, and new revocations still take effect.
    proxy.down().await;
    assert_eq!(app1.me_status(&t1).await, StatusCode::UNAUTHORIZED);
    assert_eq!(app1.me_status(&t2).await, StatusCode::OK);
    assert_eq!(revoke(&app1, &client, &t2).await, StatusCode::OK);
    assert_eq!(app1.me_status(&t2).await, StatusCode::UNAUTHORIZED);
    // app2 missed that broadcast (app1 could not publish); its periodic sync from Postgres (every
    // 30 s) is the safety net. Run it now rather than wait.
    agentidp::auth::revocation::catch_up(&app2.state).await.unwrap();
    assert_eq!(app2.me_status(&t2).await, StatusCode::UNAUTHORIZED);
    proxy.up();
}

#[tokio::test]
async fn suspension_deletion_and_bulk_revocation_kill_live_tokens() {
    let app = spawn_app().await;
    let (admin, client) = setup(&app).await;
    let agent_url = format!("/api/v1/agents/{}", client.agent_id);

    let token = app.access_token(&client).await;
    assert_eq!(app.me_status(&token).await, StatusCode::OK);
    app.as_(&admin, Method::PATCH, &agent_url).json(&json!({ "status": "suspended" })).send().await.unwrap();
    assert_eq!(app.me_status(&token).await, StatusCode::UNAUTHORIZED, "suspension kills live tokens");
    app.as_(&admin, Method::PATCH, &agent_url).json(&json!({ "status": "active" })).send().await.unwrap();
    assert_eq!(app.me_status(&token).await, StatusCode::UNAUTHORIZED, "reactivation does not revive them");
    tokio::time::sleep(Duration::from_millis(1100)).await; // watermarks have one-second resolution
    let fresh = app.access_token(&client).await;
    assert_eq!(app.me_status(&fresh).await, StatusCode::OK);

    // One credential's tokens.
    let second = app.credential(&admin, &client.agent_id).await;
    let by_second = app.access_token(&second).await;
    let resp = app
        .as_(&admin, Method::POST, &format!("{agent_url}/credentials/{}/revoke-tokens", second.credential_id))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(app.me_status(&by_second).await, StatusCode::UNAUTHORIZED);
    assert_eq!(app.me_status(&fresh).await, StatusCode::OK);

    // Deleting a credential kills its tokens and its secret.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let by_second = app.access_token(&second).await;
    let resp = app
        .as_(&admin, Method::DELETE, &format!("{agent_url}/credentials/{}", second.credential_id))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::NO_CONTENT);
    assert_eq!(app.me_status(&by_second).await, StatusCode::UNAUTHORIZED);
    oauth_error(
        app.token_request(&second, &[("grant_type", "client_credentials")]).await,
        StatusCode::UNAUTHORIZED,
        "invalid_client",
    )
    .await;

    // The whole organization.
    let resp = app
        .as_(&admin, Method::POST, &format!("/api/v1/organizations/{}/revoke-tokens", admin.org_id))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(app.me_status(&fresh).await, StatusCode::UNAUTHORIZED);

    // Deleting the agent.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let last = app.access_token(&client).await;
    assert_eq!(app.me_status(&last).await, StatusCode::OK);
    app.as_(&admin, Method::DELETE, &agent_url).send().await.unwrap();
    assert_eq!(app.me_status(&last).await, StatusCode::UNAUTHORIZED);

    let audit =
        json_ok(app.as_(&admin, Method::GET, "/api/v1/audit?limit=200").send().await.unwrap(), StatusCode::OK).await;
    let actions: Vec<&str> = audit["items"].as_array().unwrap().iter().map(|e| e["action"].as_str().unwrap()).collect();
    for a in [
        "agent.created",
        "agent.suspended",
        "agent.activated",
        "credential.created",
        "credential.revoked",
        "tokens.revoked",
        "agent.deleted",
    ] {
        assert!(actions.contains(&a), "{a} in {actions:?}");
    }
}

#[tokio::test]
async fn rotated_secrets_overlap_then_expire() {
    let app = spawn_app_with(&[("auth.client_secret_rotation_overlap_secs", json!(2))]).await;
    let (admin, client) = setup(&app).await;
    let rotated = json_ok(
        app.as_(
            &admin,
            Method::POST,
            &format!("/api/v1/agents/{}/credentials/{}/rotate", client.agent_id, client.credential_id),
        )
        .send()
        .await
        .unwrap(),
        StatusCode::OK,
    )
    .await;
    let new = Client { secret: rotated["client_secret"].as_str().unwrap().to_owned(), ..client.clone() };
    assert_ne!(new.secret, client.secret);
    assert_eq!(rotated["client_id"], client.client_id);
    assert_eq!(app.token_request(&client, &[("grant_type", "client_credentials")]).await.status(), StatusCode::OK);
    assert_eq!(app.token_request(&new, &[("grant_type", "client_credentials")]).await.status(), StatusCode::OK);
    tokio::time::sleep(Duration::from_millis(2200)).await;
    oauth_error(
        app.token_request(&client, &[("grant_type", "client_credentials")]).await,
        StatusCode::UNAUTHORIZED,
        "invalid_client",
    )
    .await;
    assert_eq!(app.token_request(&new, &[("grant_type", "client_credentials")]).await.status(), StatusCode::OK);

    // Listing never shows a secret; the stored form is a hash.
    let list = app
        .as_(&admin, Method::GET, &format!("/api/v1/agents/{}/credentials", client.agent_id))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(!list.contains(&new.secret) && !list.contains(&client.secret));
    let stored: Vec<u8> =
        sqlx::query_scalar("select secret_hash from agent_credential").fetch_one(&app.db).await.unwrap();
    assert_eq!(stored, agentidp::crypto::sha256(&new.secret).to_vec());
}

#[tokio::test]
async fn key_rotation_keeps_old_tokens_valid_and_publishes_both_keys() {
    let app = spawn_app().await;
    let (admin, client) = setup(&app).await;
    let old = app.access_token(&client).await;
    let old_kid = claims_of(&old).0["kid"].as_str().unwrap().to_owned();
    let rotated = json_ok(
        app.as_(&admin, Method::POST, "/api/v1/keys/rotate?emergency=true").send().await.unwrap(),
        StatusCode::OK,
    )
    .await;
    assert_eq!(rotated["emergency"], true);
    let new_kid = rotated["kid"].as_str().unwrap();
    assert_ne!(new_kid, old_kid);
    let jwks: Value = app.get("/.well-known/jwks.json").await.json().await.unwrap();
    let kids: Vec<&str> = jwks["keys"].as_array().unwrap().iter().map(|k| k["kid"].as_str().unwrap()).collect();
    assert_eq!(kids, vec![new_kid, old_kid.as_str()], "the signing key first, the retired one still there");
    let new = app.access_token(&client).await;
    assert_eq!(claims_of(&new).0["kid"], new_kid);
    assert_eq!(app.me_status(&old).await, StatusCode::OK);
    assert_eq!(app.me_status(&new).await, StatusCode::OK);

    // A second instance learns of the rotation and accepts both.
    let app2 = spawn_on(app.config.clone(), None).await;
    assert_eq!(app2.me_status(&old).await, StatusCode::OK);
    assert_eq!(app2.me_status(&new).await, StatusCode::OK);

    // Private keys are sealed at rest; the retired key leaves the JWKS once its tokens have expired.
    let sealed: Vec<Vec<u8>> =
        sqlx::query_scalar("select private_key_sealed from signing_key").fetch_all(&app.db).await.unwrap();
    assert_eq!(sealed.len(), 2);
    sqlx::query("update signing_key set expires_at = now() - interval '1 second' where status = 'retired'")
        .execute(&app.db)
        .await
        .unwrap();
    app.state.keys().load(&app.db).await.unwrap();
    let jwks: Value = app.get("/.well-known/jwks.json").await.json().await.unwrap();
    assert_eq!(jwks["keys"].as_array().unwrap().len(), 1);

    // Only system admins rotate.
    let other = app.org_with_owner(&admin, "Other", "owner@other.test").await;
    let resp = app.as_(&other, Method::POST, "/api/v1/keys/rotate").send().await.unwrap();
    assert_problem(resp, StatusCode::FORBIDDEN, "system_admin_required").await;
}

#[test]
fn keys_rotate_command_rotates() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (db_url, _) = rt.block_on(crate::helpers::fresh_database());
    let run = || {
        std::process::Command::new(env!("CARGO_BIN_EXE_agentidp"))
            .args(["keys", "rotate"])
            .env_remove("AGENTIDP_CONFIG")
            .env("AGENTIDP_DATABASE__URL", &db_url)
            .env("AGENTIDP_REDIS__KEY_PREFIX", format!("test:{}:", uuid::Uuid::new_v4().simple()))
            .output()
            .unwrap()
    };
    let first = run();
    assert_eq!(first.status.code(), Some(0), "{}", String::from_utf8_lossy(&first.stderr));
    let second = run();
    assert_eq!(second.status.code(), Some(0));
    let count: i64 = rt.block_on(async {
        let pool = sqlx::PgPool::connect(&db_url).await.unwrap();
        sqlx::query_scalar("select count(*) from signing_key").fetch_one(&pool).await.unwrap()
    });
    assert_eq!(count, 2);
    assert_ne!(first.stdout, second.stdout);
}

#[tokio::test]
async fn production_mode_refuses_to_start_without_a_kek() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_agentidp"))
        .arg("serve")
        .env_remove("AGENTIDP_CONFIG")
        .env("AGENTIDP_SERVER__ENVIRONMENT", "production")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("auth.key_encryption_key"));
}

#[tokio::test]
async fn a_wrong_kek_cannot_unseal_the_keys() {
    let app = spawn_app().await;
    let mut cfg = app.config.clone();
    cfg.auth.key_encryption_key =
        agentidp::config::Secret::new(base64::engine::general_purpose::STANDARD.encode([9u8; 32]));
    let db = agentidp::db::pool_options(&cfg.database).connect(&cfg.database.url).await.unwrap();
    let redis = agentidp::redis::Redis::new(&cfg.redis).unwrap();
    let err = agentidp::app::Application::with_parts(cfg, db, redis).await.err().expect("refuses to start");
    assert!(format!("{err:#}").contains("unseal"), "{err:#}");
}

#[tokio::test]
async fn a_revocation_that_lands_during_a_sync_is_kept() {
    let app = spawn_app().await;
    let (_, client) = setup(&app).await;
    let token = app.access_token(&client).await;
    // A sync reads Postgres...
    let snapshot = agentidp::auth::revocation::Snapshot::load(&app.db, 900).await.unwrap();
    // ...the token is revoked before it has installed what it read...
    assert_eq!(revoke(&app, &client, &token).await, StatusCode::OK);
    assert_eq!(app.me_status(&token).await, StatusCode::UNAUTHORIZED);
    // ...and installing the older read must not bring the token back.
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    app.state.auth().revocations.install(snapshot, now, 900);
    assert_eq!(app.me_status(&token).await, StatusCode::UNAUTHORIZED, "a sync forgot a revocation");
}

/// Waits until `app` has heard of a watermark on `subject`.
async fn heard_of(app: &TestApp, subject: agentidp::auth::revocation::Subject) {
    let started = Instant::now();
    while app.state.auth().revocations.newest_watermark(std::slice::from_ref(&subject)).is_none() {
        assert!(started.elapsed() < Duration::from_secs(2), "the revocation never reached the instance");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn a_lost_invalidation_does_not_let_revoked_clients_get_tokens_on_another_instance() {
    let app1 = spawn_app().await;
    let app2 = spawn_on(app1.config.clone(), Some(app1.redis.prefix().to_owned())).await;
    let (admin, client) = setup(&app1).await;
    tokio::time::sleep(Duration::from_millis(300)).await; // both subscribers attached
    app2.access_token(&client).await;
    let stale = app2.state.auth().clients.get(&client.client_id).expect("the second instance cached the client");

    let resp = app1
        .as_(
            &admin,
            Method::DELETE,
            &format!("/api/v1/agents/{}/credentials/{}", client.agent_id, client.credential_id),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::NO_CONTENT);
    heard_of(&app2, agentidp::auth::revocation::Subject::Credential(client.credential_id.parse().unwrap())).await;
    // The cache invalidation is lost, or a record read just before it is cached just after it.
    app2.state.auth().clients.put(stale);
    oauth_error(
        app2.token_request(&client, &[("grant_type", "client_credentials")]).await,
        StatusCode::UNAUTHORIZED,
        "invalid_client",
    )
    .await;

    // The same for a suspended agent.
    let other = app1.agent_client(&admin, &["tools:read"]).await;
    app2.access_token(&other).await;
    let stale = app2.state.auth().clients.get(&other.client_id).unwrap();
    let resp = app1
        .as_(&admin, Method::PATCH, &format!("/api/v1/agents/{}", other.agent_id))
        .json(&json!({ "status": "suspended" }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    heard_of(&app2, agentidp::auth::revocation::Subject::Agent(other.agent_id.parse().unwrap())).await;
    app2.state.auth().clients.put(stale);
    oauth_error(
        app2.token_request(&other, &[("grant_type", "client_credentials")]).await,
        StatusCode::BAD_REQUEST,
        "unauthorized_client",
    )
    .await;
}

#[tokio::test]
async fn while_it_may_miss_changes_the_token_endpoint_asks_postgres() {
    let app = spawn_app().await;
    let (_, client) = setup(&app).await;
    app.access_token(&client).await;
    assert!(app.state.auth().clients.get(&client.client_id).is_some(), "the client is cached");
    // As while the change feed is disconnected: this instance may be missing messages.
    app.state.auth().revocations.set_live(false);
    // A revocation this instance is never told of.
    sqlx::query("update agent_credential set revoked_at = now() where client_id = $1")
        .bind(&client.client_id)
        .execute(&app.db)
        .await
        .unwrap();
    oauth_error(
        app.token_request(&client, &[("grant_type", "client_credentials")]).await,
        StatusCode::UNAUTHORIZED,
        "invalid_client",
    )
    .await;
}

#[tokio::test]
async fn bulk_revocation_cuts_off_on_the_clock_that_stamps_iat() {
    let app = spawn_app().await;
    let (admin, client) = setup(&app).await;
    // This instance's clock runs two minutes ahead of Postgres's.
    let ahead = time::OffsetDateTime::now_utc() + time::Duration::seconds(120);
    app.state.clock().set(ahead);
    let token = app.access_token(&client).await;
    let iat = claims_of(&token).1["iat"].as_i64().unwrap();
    assert!(iat >= ahead.unix_timestamp(), "iat is read from the application's clock");
    assert_eq!(app.me_status(&token).await, StatusCode::OK);

    let resp = app
        .as_(&admin, Method::POST, &format!("/api/v1/agents/{}/revoke-tokens", client.agent_id))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let not_before: time::OffsetDateTime =
        sqlx::query_scalar("select not_before from revocation_watermark where subject = $1")
            .bind(format!("agent:{}", client.agent_id))
            .fetch_one(&app.db)
            .await
            .unwrap();
    assert!(not_before.unix_timestamp() >= iat, "the cutoff is stamped by the clock that stamped iat");
    assert_eq!(app.me_status(&token).await, StatusCode::UNAUTHORIZED);
    tokio::time::sleep(Duration::from_millis(1100)).await; // watermarks have one-second resolution
    let fresh = app.access_token(&client).await;
    assert_eq!(app.me_status(&fresh).await, StatusCode::OK, "tokens issued after the cutoff work");
}

#[tokio::test]
async fn a_scheduled_rotation_publishes_the_next_key_before_it_signs() {
    let app = spawn_app().await;
    let (admin, client) = setup(&app).await;
    let old_kid = claims_of(&app.access_token(&client).await).0["kid"].as_str().unwrap().to_owned();
    let rotated =
        json_ok(app.as_(&admin, Method::POST, "/api/v1/keys/rotate").send().await.unwrap(), StatusCode::OK).await;
    assert_eq!(rotated["emergency"], false);
    let next_kid = rotated["kid"].as_str().unwrap().to_owned();
    let activates_at = time::OffsetDateTime::parse(
        rotated["activates_at"].as_str().unwrap(),
        &time::format_description::well_known::Rfc3339,
    )
    .unwrap();
    let wait = activates_at - time::OffsetDateTime::now_utc();
    assert!(wait >= time::Duration::seconds(300), "published at least the JWKS max-age ahead, got {wait}");

    // Published at once, here and on another instance...
    let app2 = spawn_on(app.config.clone(), Some(app.redis.prefix().to_owned())).await;
    for a in [&app, &app2] {
        let jwks: Value = a.get("/.well-known/jwks.json").await.json().await.unwrap();
        let kids: Vec<&str> = jwks["keys"].as_array().unwrap().iter().map(|k| k["kid"].as_str().unwrap()).collect();
        assert!(kids.contains(&next_kid.as_str()) && kids.contains(&old_kid.as_str()), "{kids:?}");
    }
    // ...but the old key still signs.
    let token = app.access_token(&client).await;
    assert_eq!(claims_of(&token).0["kid"], old_kid.as_str());
    // A second rotation while one is waiting keeps the waiting key.
    let again =
        json_ok(app.as_(&admin, Method::POST, "/api/v1/keys/rotate").send().await.unwrap(), StatusCode::OK).await;
    assert_eq!(again["kid"], next_kid.as_str());

    // When its time comes, every instance signs with it, on its own clock, before any row changes.
    for a in [&app, &app2] {
        a.state.clock().set(activates_at + time::Duration::seconds(1));
        let token = a.access_token(&client).await;
        assert_eq!(claims_of(&token).0["kid"], next_kid.as_str());
        assert_eq!(a.me_status(&token).await, StatusCode::OK);
    }
    assert_eq!(app.me_status(&token).await, StatusCode::OK, "tokens of the old key still verify");

    // An emergency rotation signs at once, and says so.
    let emergency = json_ok(
        app.as_(&admin, Method::POST, "/api/v1/keys/rotate?emergency=true").send().await.unwrap(),
        StatusCode::OK,
    )
    .await;
    assert_eq!(emergency["emergency"], true);
    let token = app.access_token(&client).await;
    assert_eq!(claims_of(&token).0["kid"], emergency["kid"]);
}

#[tokio::test]
async fn unknown_credentials_cost_one_lookup_and_lookups_are_limited_per_ip() {
    let app = spawn_app_with(&[("auth.lookups_per_minute_ip", json!(10))]).await;
    let admin = app.bootstrap().await;
    let me = |key: String| app.client.get(app.url("/auth/me")).header("x-api-key", key).send();

    let before = app.state.auth().lookups.lookups();
    for _ in 0..20 {
        assert_eq!(me("aidp_key_made-up".into()).await.unwrap().status(), StatusCode::UNAUTHORIZED);
    }
    assert_eq!(app.state.auth().lookups.lookups() - before, 1, "an unknown secret is looked up once");

    let mut refused = 0;
    for i in 0..20 {
        let resp = me(format!("aidp_key_made-up-{i}")).await.unwrap();
        if resp.status() == StatusCode::TOO_MANY_REQUESTS {
            assert!(resp.headers().contains_key("retry-after"));
            assert_problem(resp, StatusCode::TOO_MANY_REQUESTS, "credential_lookups_exceeded").await;
            refused += 1;
        } else {
            assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
        }
    }
    assert!(refused >= 10, "at most 10 lookups a minute from one address; {refused} of 20 refused");
    // Unknown clients at the token endpoint are charged to the same address.
    let resp = app
        .client
        .post(app.url("/api/v1/token"))
        .basic_auth("no-such-client", Some("x"))
        .form(&[("grant_type", "client_credentials")])
        .send()
        .await
        .unwrap();
    oauth_error(resp, StatusCode::TOO_MANY_REQUESTS, "too_many_requests").await;
    // A credential already resolved is not a lookup, and keeps working.
    assert_eq!(app.as_(&admin, Method::GET, "/auth/me").send().await.unwrap().status(), StatusCode::OK);
}

/// Asserts that a response carrying a secret may not be stored by any cache.
fn assert_not_stored(resp: &reqwest::Response, what: &str) {
    let header = |n: &str| resp.headers().get(n).and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
    assert_eq!(header("cache-control"), "no-store", "{what}");
    assert_eq!(header("pragma"), "no-cache", "{what}");
}

#[tokio::test]
async fn responses_that_carry_a_secret_are_never_stored() {
    let app = spawn_app().await;
    let admin = app.bootstrap().await;
    let login = app.login(crate::helpers::ADMIN_EMAIL, crate::helpers::PASSWORD).await;
    assert_eq!(login.status(), StatusCode::OK);
    assert_not_stored(&login, "login");

    let key =
        app.as_(&admin, Method::POST, "/auth/api-keys").json(&json!({ "description": "ci" })).send().await.unwrap();
    assert_eq!(key.status(), StatusCode::CREATED);
    assert_not_stored(&key, "new API key");

    let agent = app.create_agent(&admin, json!({ "name": "worker", "allowed_scopes": ["agents:read"] })).await;
    let agent_id = agent["id"].as_str().unwrap();
    let cred = app.as_(&admin, Method::POST, &format!("/api/v1/agents/{agent_id}/credentials")).send().await.unwrap();
    assert_eq!(cred.status(), StatusCode::CREATED);
    assert_not_stored(&cred, "new client secret");
    let cred = cred.json::<Value>().await.unwrap();
    let client = Client {
        agent_id: agent_id.to_owned(),
        credential_id: cred["id"].as_str().unwrap().to_owned(),
        client_id: cred["client_id"].as_str().unwrap().to_owned(),
        secret: cred["client_secret"].as_str().unwrap().to_owned(),
    };
    let rotated = app
        .as_(&admin, Method::POST, &format!("/api/v1/agents/{agent_id}/credentials/{}/rotate", client.credential_id))
        .send()
        .await
        .unwrap();
    assert_eq!(rotated.status(), StatusCode::OK);
    assert_not_stored(&rotated, "rotated client secret");

    let token = app.token_request(&client, &[("grant_type", "client_credentials")]).await;
    assert_eq!(token.status(), StatusCode::OK);
    assert_not_stored(&token, "access token");

    let invited = app
        .as_(&admin, Method::POST, &format!("/api/v1/organizations/{}/members", admin.org_id))
        .json(&json!({ "email": "new@acme.test", "role": "member" }))
        .send()
        .await
        .unwrap();
    assert!(invited.status().is_success(), "{}", invited.status());
    assert_not_stored(&invited, "member invitation");

    // Public metadata stays cacheable.
    let jwks = app.get("/.well-known/jwks.json").await;
    assert_eq!(jwks.headers()["cache-control"], "public, max-age=300");
    assert!(jwks.headers().get("pragma").is_none());
}

#[tokio::test]
async fn challenges_name_the_missing_scope_and_the_resource_metadata() {
    let app = spawn_app().await;
    let admin = app.bootstrap().await;
    let metadata = format!("{}/.well-known/oauth-protected-resource", app.config.server.public_url);
    let challenge = |r: &reqwest::Response| {
        r.headers().get("www-authenticate").and_then(|v| v.to_str().ok()).unwrap_or("").to_owned()
    };

    let anonymous = app.get("/auth/me").await;
    assert_eq!(anonymous.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(challenge(&anonymous), format!("Bearer resource_metadata=\"{metadata}\""));
    let bad = app.client.get(app.url("/auth/me")).bearer_auth("aidp_key_nonsense").send().await.unwrap();
    assert_eq!(bad.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(challenge(&bad), format!("Bearer error=\"invalid_token\", resource_metadata=\"{metadata}\""));

    let weak = app.api_key(&admin, Some(&["audit:read"])).await;
    let refused = app.as_(&weak, Method::GET, "/api/v1/agents").send().await.unwrap();
    assert_eq!(
        challenge(&refused),
        format!("Bearer error=\"insufficient_scope\", scope=\"agents:read\", resource_metadata=\"{metadata}\"")
    );
    assert_problem(refused, StatusCode::FORBIDDEN, "insufficient_scope").await;
    // Not a bearer token: nothing to challenge.
    let by_header = app.client.get(app.url("/api/v1/agents")).header("x-api-key", &weak.token).send().await.unwrap();
    assert_eq!(by_header.status(), StatusCode::FORBIDDEN);
    assert!(by_header.headers().get("www-authenticate").is_none());

    let doc = json_ok(app.get("/.well-known/oauth-protected-resource").await, StatusCode::OK).await;
    assert_eq!(doc["authorization_servers"], json!([app.config.server.public_url]));
    assert!(doc["resource"].is_string() && doc["scopes_supported"].is_array(), "{doc}");
    assert_eq!(doc["bearer_methods_supported"], json!(["header"]));
}

#[tokio::test]
async fn concurrent_lookups_from_one_address_are_limited_exactly() {
    let app = spawn_app_with(&[("auth.lookups_per_minute_ip", json!(10))]).await;
    let sends = (0..50)
        .map(|i| app.client.get(app.url("/auth/me")).header("x-api-key", format!("aidp_key_parallel-{i}")).send());
    let statuses: Vec<StatusCode> =
        futures_util::future::join_all(sends).await.into_iter().map(|r| r.unwrap().status()).collect();
    let looked_up = statuses.iter().filter(|s| **s == StatusCode::UNAUTHORIZED).count();
    let refused = statuses.iter().filter(|s| **s == StatusCode::TOO_MANY_REQUESTS).count();
    assert_eq!((looked_up, refused), (10, 40), "{statuses:?}");
    assert_eq!(app.state.auth().lookups.lookups(), 10, "only the admitted ones reached Postgres");
}
