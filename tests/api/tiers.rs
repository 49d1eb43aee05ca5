//! Tiers: exact limits under concurrency, the UTC day boundary, usage in the status, the Redis
//! fallback, agent and token quotas, upgrades and the Stripe webhook (against a local fake Stripe).

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use axum::{Router, extract::State, routing::post};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use time::{OffsetDateTime, macros::datetime};

use crate::helpers::{Caller, PASSWORD, TestApp, assert_problem, json_ok, proxy::Proxy, redis_url, spawn_app_with};

/// An org with an owner and one API key; the key acts in the org.
async fn org_and_key(app: &TestApp) -> (Caller, Caller) {
    let admin = app.bootstrap().await;
    let owner = app.org_with_owner(&admin, "Metered", "owner@metered.test").await;
    let key = app.api_key(&owner, None).await;
    (owner, key)
}

async fn status(app: &TestApp, caller: &Caller) -> Value {
    json_ok(
        app.as_(caller, Method::GET, "/api/v1/tiers/status").header("x-org-id", &caller.org_id).send().await.unwrap(),
        StatusCode::OK,
    )
    .await
}

fn header(resp: &reqwest::Response, name: &str) -> String {
    resp.headers().get(name).and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned()
}

/// POST /api/v1/tiers/upgrade as `who`, in `org_id`.
async fn upgrade(app: &TestApp, who: &Caller, org_id: &str, body: Value) -> reqwest::Response {
    app.as_(who, Method::POST, "/api/v1/tiers/upgrade").header("x-org-id", org_id).json(&body).send().await.unwrap()
}

/// Sends `n` requests at once; returns the responses.
async fn burst(app: &TestApp, caller: &Caller, path: &str, n: usize) -> Vec<reqwest::Response> {
    let sends = (0..n).map(|_| app.as_(caller, Method::GET, path).send());
    futures_util::future::join_all(sends).await.into_iter().map(Result::unwrap).collect()
}

#[tokio::test]
async fn two_hundred_parallel_requests_against_a_daily_quota_of_fifty_let_exactly_fifty_through() {
    let app = spawn_app_with(&[("tiers.plans.free.api_calls_per_day", json!(50))]).await;
    let (owner, key) = org_and_key(&app).await;
    let before = status(&app, &owner).await["usage"]["api_calls_today"].as_u64().unwrap();
    assert!(before < 50, "setup used {before} calls");

    let until_midnight = || {
        let now = app.state.clock().now();
        (agentidp::clock::next_midnight(now) - now).whole_seconds() as u64
    };
    let most = until_midnight();
    let responses = burst(&app, &key, "/api/v1/agents", 200).await;
    let least = until_midnight();
    let mut by_status: HashMap<u16, usize> = HashMap::new();
    for r in &responses {
        *by_status.entry(r.status().as_u16()).or_default() += 1;
    }
    assert_eq!(by_status.get(&200).copied(), Some(50 - before as usize), "{by_status:?}");
    assert_eq!(by_status.get(&429).copied(), Some(150 + before as usize), "{by_status:?}");

    let refused = responses.into_iter().find(|r| r.status() == StatusCode::TOO_MANY_REQUESTS).unwrap();
    let retry: u64 = header(&refused, "retry-after").parse().unwrap();
    // Seconds to midnight when it was refused: between what was left after the burst and before it.
    assert!(
        (least.saturating_sub(1)..=most + 1).contains(&retry),
        "Retry-After {retry} vs {least}..{most} s to midnight"
    );
    assert_eq!(header(&refused, "x-ratelimit-limit"), "50");
    assert_eq!(header(&refused, "x-ratelimit-remaining"), "0");
    assert!(header(&refused, "ratelimit-policy").contains("\"daily\";q=50;w=86400"));
    let body = assert_problem(refused, StatusCode::TOO_MANY_REQUESTS, "daily_quota_exceeded").await;
    assert!(body["detail"].as_str().unwrap().contains("00:00 UTC"), "{body}");

    // The status itself is not counted, and reports what was let through.
    let s = status(&app, &owner).await;
    assert_eq!(s["usage"]["api_calls_today"], 50, "{s}");
    assert_eq!(s["usage"]["approximate"], false);
    // The tier routes still answer an org over its quota.
    assert_eq!(status(&app, &owner).await["plan"], "free");
}

#[tokio::test]
async fn a_client_gets_exactly_its_burst_and_headers_say_so() {
    let app =
        spawn_app_with(&[("tiers.plans.free.rate_limit", json!({ "requests_per_minute": 1, "burst": 50 }))]).await;
    let (_, key) = org_and_key(&app).await;

    let first = app.as_(&key, Method::GET, "/auth/me").send().await.unwrap();
    assert_eq!(first.status(), StatusCode::OK);
    assert_eq!(header(&first, "x-ratelimit-limit"), "50");
    assert_eq!(header(&first, "x-ratelimit-remaining"), "49");
    let reset: i64 = header(&first, "x-ratelimit-reset").parse().unwrap();
    let expected = OffsetDateTime::now_utc().unix_timestamp() + 60;
    assert!((reset - expected).abs() <= 2, "X-RateLimit-Reset {reset}, expected about {expected}");
    // One request per minute, bursts of 50: the bucket fills in 50 minutes.
    assert_eq!(header(&first, "ratelimit-policy"), "\"burst\";q=50;w=3000");
    assert_eq!(header(&first, "ratelimit"), "\"burst\";r=49;t=60");

    let responses = burst(&app, &key, "/auth/me", 199).await;
    let passed = responses.iter().filter(|r| r.status() == StatusCode::OK).count();
    let refused: Vec<_> = responses.iter().filter(|r| r.status() == StatusCode::TOO_MANY_REQUESTS).collect();
    assert_eq!(passed, 49);
    assert_eq!(refused.len(), 150, "nothing else: no 500s");
    for r in &refused {
        let retry: u64 = header(r, "retry-after").parse().unwrap();
        assert!((1..=60).contains(&retry), "Retry-After {retry}");
        assert_eq!(header(r, "x-ratelimit-remaining"), "0");
        assert!(header(r, "ratelimit").starts_with("\"burst\";r=0;t="));
    }
    let last = responses.into_iter().find(|r| r.status() == StatusCode::TOO_MANY_REQUESTS).unwrap();
    assert_problem(last, StatusCode::TOO_MANY_REQUESTS, "rate_limited").await;

    // Another client of the same org has a bucket of its own.
    let admin = app.sign_in(crate::helpers::ADMIN_EMAIL, PASSWORD).await;
    assert_eq!(app.as_(&admin, Method::GET, "/auth/me").send().await.unwrap().status(), StatusCode::OK);
}

#[tokio::test]
async fn the_daily_count_starts_over_at_midnight_utc() {
    let app = spawn_app_with(&[("tiers.plans.free.api_calls_per_day", json!(3))]).await;
    let admin = app.bootstrap().await;
    let owner = app.org_with_owner(&admin, "Clocked", "owner@clocked.test").await;
    let key = app.api_key(&owner, None).await;
    app.state.clock().set(datetime!(2031-03-04 23:59:57 UTC));

    for _ in 0..3 {
        assert_eq!(app.as_(&key, Method::GET, "/api/v1/agents").send().await.unwrap().status(), StatusCode::OK);
    }
    let refused = app.as_(&key, Method::GET, "/api/v1/agents").send().await.unwrap();
    assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS);
    let retry: u64 = header(&refused, "retry-after").parse().unwrap();
    assert!((1..=3).contains(&retry), "Retry-After {retry}: seconds to midnight");
    assert_eq!(header(&refused, "x-ratelimit-reset"), datetime!(2031-03-05 00:00 UTC).unix_timestamp().to_string());
    let s = status(&app, &owner).await;
    assert_eq!(s["usage"]["api_calls_today"], 3, "{s}");
    assert_eq!(s["resets"]["daily_at"], "2031-03-05T00:00:00Z");
    assert_eq!(s["resets"]["monthly_at"], "2031-04-01T00:00:00Z");

    app.state.clock().set(datetime!(2031-03-05 00:00:01 UTC));
    let next_day = app.as_(&key, Method::GET, "/api/v1/agents").send().await.unwrap();
    assert_eq!(next_day.status(), StatusCode::OK);
    assert_eq!(header(&next_day, "x-ratelimit-remaining"), "2");
    assert_eq!(status(&app, &owner).await["usage"]["api_calls_today"], 1);
}

#[tokio::test]
async fn the_status_reports_the_requests_and_tokens_actually_made_and_analytics_records_them() {
    let app = spawn_app_with(&[]).await;
    let (owner, key) = org_and_key(&app).await;
    let client = app.agent_client(&owner, &["agents:read"]).await;
    let before = status(&app, &owner).await;
    assert_eq!(before["usage"]["tokens_today"], 0);
    assert_eq!(before["usage"]["agents"], 1);
    assert_eq!(before["plan"], "free");
    assert_eq!(before["limits"]["max_agents"], "unlimited");
    let calls_before = before["usage"]["api_calls_today"].as_u64().unwrap();

    for _ in 0..7 {
        assert_eq!(app.as_(&key, Method::GET, "/api/v1/agents").send().await.unwrap().status(), StatusCode::OK);
    }
    let mut tokens = Vec::new();
    for _ in 0..3 {
        tokens.push(app.access_token(&client).await);
    }
    // Calls made with an agent's token count for its organization too.
    assert_eq!(app.me_status(&tokens[0]).await, StatusCode::OK);

    let after = status(&app, &owner).await;
    assert_eq!(after["usage"]["api_calls_today"].as_u64().unwrap(), calls_before + 8, "{after}");
    assert_eq!(after["usage"]["tokens_today"], 3);
    assert_eq!(after["usage"]["tokens_this_month"], 3);

    // The metering layer's records reach analytics_event in batches.
    let org: uuid::Uuid = owner.org_id.parse().unwrap();
    let mut rows = (0, 0, 0);
    for _ in 0..100 {
        rows = sqlx::query_as::<_, (i64, i64, i64)>(
            "select coalesce(sum(request_count) filter (where kind = 'request' and route = '/api/v1/agents'
                                                           and method = 'GET' and status = 200 and actor_id like 'user:%'), 0)::int8,
                    coalesce(sum(request_count) filter (where kind = 'token_issued' and client_id = $2), 0)::int8,
                    coalesce(sum(request_count) filter (where kind = 'request' and route = '/auth/me' and actor_id = $3
                                                           and client_id = $2), 0)::int8
             from analytics_event where organization_id = $1",
        )
        .bind(org)
        .bind(&client.client_id)
        .bind(format!("agent:{}", client.agent_id))
        .fetch_one(&app.db)
        .await
        .unwrap();
        if rows == (7, 3, 1) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(rows, (7, 3, 1));
    let latency: i32 = sqlx::query_scalar("select max(latency_max_us) from analytics_event where organization_id = $1")
        .bind(org)
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert!(latency > 0);
}

#[tokio::test]
async fn token_quotas_refuse_with_an_oauth_error_and_retry_after() {
    let app = spawn_app_with(&[("tiers.plans.free.tokens_per_day", json!(2))]).await;
    let (owner, _) = org_and_key(&app).await;
    let client = app.agent_client(&owner, &["agents:read"]).await;
    let ok = app.token_request(&client, &[("grant_type", "client_credentials")]).await;
    assert_eq!(ok.status(), StatusCode::OK);
    assert_eq!(header(&ok, "x-ratelimit-limit"), "2");
    assert_eq!(header(&ok, "x-ratelimit-remaining"), "1");
    assert!(header(&ok, "ratelimit-policy").contains("\"tokens-daily\";q=2;w=86400"));
    app.access_token(&client).await;
    let refused = app.token_request(&client, &[("grant_type", "client_credentials")]).await;
    assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(header(&refused, "cache-control"), "no-store");
    assert!(header(&refused, "retry-after").parse::<u64>().unwrap() >= 1);
    let body: Value = refused.json().await.unwrap();
    assert_eq!(body["error"], "quota_exceeded", "{body}");
    assert!(body["error_description"].as_str().unwrap().contains("2 access tokens"), "{body}");
    assert_eq!(status(&app, &owner).await["usage"]["tokens_today"], 2);
}

#[tokio::test]
async fn agents_beyond_max_agents_are_refused_even_when_created_at_once() {
    let app = spawn_app_with(&[("tiers.plans.free.max_agents", json!(3))]).await;
    let (owner, _) = org_and_key(&app).await;
    let creates = (0..10)
        .map(|i| app.as_(&owner, Method::POST, "/api/v1/agents").json(&json!({ "name": format!("agent-{i}") })).send());
    let responses: Vec<_> = futures_util::future::join_all(creates).await.into_iter().map(Result::unwrap).collect();
    assert_eq!(responses.iter().filter(|r| r.status() == StatusCode::CREATED).count(), 3);
    let refused = responses.into_iter().find(|r| r.status() == StatusCode::FORBIDDEN).expect("a refusal");
    let body = assert_problem(refused, StatusCode::FORBIDDEN, "agent_limit_reached").await;
    assert!(body["detail"].as_str().unwrap().contains("allows 3 agents"), "{body}");
    assert_eq!(status(&app, &owner).await["usage"]["agents"], 3);
}

#[tokio::test]
async fn without_redis_limits_hold_per_process_and_the_counts_reconcile() {
    let proxy = Proxy::start(redis_url().trim_start_matches("redis://").to_owned()).await;
    let app = spawn_app_with(&[
        ("redis.url", json!(format!("redis://{}", proxy.addr))),
        ("tiers.plans.free.api_calls_per_day", json!(10)),
    ])
    .await;
    let (owner, key) = org_and_key(&app).await;
    let used = status(&app, &owner).await["usage"]["api_calls_today"].as_u64().unwrap();
    for _ in 0..4 {
        assert_eq!(app.as_(&key, Method::GET, "/api/v1/agents").send().await.unwrap().status(), StatusCode::OK);
    }
    let used = used + 4;

    proxy.down().await;
    let mut passed = 0;
    for _ in 0..12 {
        let r = app.as_(&key, Method::GET, "/api/v1/agents").send().await.unwrap();
        match r.status() {
            StatusCode::OK => passed += 1,
            StatusCode::TOO_MANY_REQUESTS => assert!(!header(&r, "retry-after").is_empty()),
            other => panic!("{other} without Redis"),
        }
    }
    assert_eq!(passed, 10 - used, "the fallback starts from the last count Redis reported");
    let s = status(&app, &owner).await;
    assert_eq!(s["usage"]["approximate"], true, "{s}");
    assert_eq!(s["usage"]["api_calls_today"], 10);
    let metrics = app.get("/metrics").await.text().await.unwrap();
    assert!(metrics.contains("tier_limiter_fallback_total"), "the fallback shows in /metrics");
    assert!(metrics.contains("tier_limiter_degraded 1"));

    proxy.up();
    // The circuit stays open a second; then a request probes Redis and the outage's counts follow.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let probe = app.as_(&key, Method::GET, "/api/v1/agents").send().await.unwrap();
    assert!([StatusCode::OK, StatusCode::TOO_MANY_REQUESTS].contains(&probe.status()));
    let mut s = Value::Null;
    for _ in 0..50 {
        s = status(&app, &owner).await;
        if s["usage"]["approximate"] == false && s["usage"]["api_calls_today"].as_u64() >= Some(10) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(s["usage"]["approximate"], false, "{s}");
    // Redis had `used`; the outage added its passes (and the probe may have added one).
    let total = s["usage"]["api_calls_today"].as_u64().unwrap();
    assert!((10..=11).contains(&total), "{s}");
    let after = app.as_(&key, Method::GET, "/api/v1/agents").send().await.unwrap();
    assert_problem(after, StatusCode::TOO_MANY_REQUESTS, "daily_quota_exceeded").await;
}

#[tokio::test]
async fn a_system_admin_sets_plans_and_overrides_and_owners_cannot() {
    let app = spawn_app_with(&[]).await;
    let admin = app.bootstrap().await;
    let owner = app.org_with_owner(&admin, "Growing", "owner@growing.test").await;

    let r = upgrade(&app, &owner, &owner.org_id, json!({ "plan": "pro" })).await;
    assert_problem(r, StatusCode::FORBIDDEN, "billing_not_configured").await;
    let r = upgrade(&app, &owner, &owner.org_id, json!({ "plan": "pro", "overrides": { "max_agents": 5 } })).await;
    assert_problem(r, StatusCode::FORBIDDEN, "overrides_require_admin").await;
    let member = {
        app.add_member(&admin, &owner.org_id, "member@growing.test", "member").await;
        let mut m = app.sign_in("member@growing.test", PASSWORD).await;
        m.org_id = owner.org_id.clone();
        m
    };
    assert_eq!(upgrade(&app, &member, &owner.org_id, json!({ "plan": "pro" })).await.status(), StatusCode::FORBIDDEN);
    assert_eq!(status(&app, &member).await["plan"], "free", "members read the status");

    let r = upgrade(&app, &admin, &owner.org_id, json!({ "plan": "platinum" })).await;
    let body = assert_problem(r, StatusCode::UNPROCESSABLE_ENTITY, "validation_failed").await;
    assert_eq!(body["errors"][0]["field"], "plan", "{body}");
    for bad in [json!({ "plan": 5 }), json!({}), json!({ "plan": "pro", "overrides": { "max_agent": 1 } })] {
        let r = upgrade(&app, &admin, &owner.org_id, bad.clone()).await;
        assert!(r.status().is_client_error(), "{bad}: {}", r.status());
        assert_eq!(header(&r, "content-type"), "application/problem+json");
    }
    let r = upgrade(&app, &admin, &owner.org_id, json!({ "plan": "enterprise", "overrides": { "api_calls_per_day": 1000, "rate_limit": { "requests_per_minute": 0, "burst": 1 } } }))
        .await;
    assert_problem(r, StatusCode::UNPROCESSABLE_ENTITY, "validation_failed").await;

    let done = json_ok(
        upgrade(
            &app,
            &admin,
            &owner.org_id,
            json!({ "plan": "enterprise", "overrides": { "api_calls_per_day": 1000 } }),
        )
        .await,
        StatusCode::OK,
    )
    .await;
    assert_eq!(done["applied"], true);
    let s = status(&app, &owner).await;
    assert_eq!(s["plan"], "enterprise", "{s}");
    assert_eq!(s["limits"]["api_calls_per_day"], 1000);
    assert_eq!(s["limits"]["tokens_per_day"], "unlimited");
    assert_eq!(s["overrides"], json!({ "api_calls_per_day": 1000 }));
    // The limits apply at once: the daily policy now shows on this org's responses.
    let r = app.as_(&owner, Method::GET, "/api/v1/agents").header("x-org-id", &owner.org_id).send().await.unwrap();
    assert!(header(&r, "ratelimit-policy").contains("\"daily\";q=1000"), "{}", header(&r, "ratelimit-policy"));

    // The change is in the org's audit chain, which still verifies.
    let audit = json_ok(
        app.as_(&owner, Method::GET, "/api/v1/audit?action=tier.plan_changed")
            .header("x-org-id", &owner.org_id)
            .send()
            .await
            .unwrap(),
        StatusCode::OK,
    )
    .await;
    assert_eq!(audit["items"][0]["details"]["to"], "enterprise", "{audit}");
    let verify = json_ok(
        app.as_(&owner, Method::GET, "/api/v1/audit/verify").header("x-org-id", &owner.org_id).send().await.unwrap(),
        StatusCode::OK,
    )
    .await;
    assert_eq!(verify["valid"], true);
}

/// What the fake Stripe saw.
#[derive(Default)]
struct Seen {
    requests: Vec<(String, HashMap<String, String>)>,
}

async fn fake_checkout(
    State(seen): State<Arc<Mutex<Seen>>>,
    headers: axum::http::HeaderMap,
    body: String,
) -> axum::Json<Value> {
    let form: HashMap<String, String> = serde_urlencoded::from_str(&body).unwrap();
    let auth = headers.get("authorization").and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
    seen.lock().unwrap().requests.push((auth, form));
    axum::Json(
        json!({ "id": "cs_test_123", "object": "checkout.session", "url": "https://checkout.test/c/cs_test_123" }),
    )
}

/// A local stand-in for the Stripe API: records Checkout Session requests.
async fn fake_stripe() -> (String, Arc<Mutex<Seen>>) {
    let seen = Arc::new(Mutex::new(Seen::default()));
    let router = Router::new().route("/v1/checkout/sessions", post(fake_checkout)).with_state(seen.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    (format!("http://{addr}"), seen)
}

const WHSEC: &str = "whsec_test_0123456789";

fn stripe_signature(secret: &str, t: i64, body: &str) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_bytes());
    format!("t={t},v1={}", hex::encode(ring::hmac::sign(&key, format!("{t}.{body}").as_bytes())))
}

async fn deliver(app: &TestApp, body: &str, signature: Option<String>) -> reqwest::Response {
    let mut req = app
        .client
        .post(app.url("/api/v1/billing/stripe/webhook"))
        .header("content-type", "application/json")
        .body(body.to_owned());
    if let Some(s) = signature {
        req = req.header("stripe-signature", s);
    }
    req.send().await.unwrap()
}

#[tokio::test]
async fn an_owner_upgrades_through_stripe_checkout_and_the_webhook_applies_it_once() {
    let (stripe_url, seen) = fake_stripe().await;
    let app = spawn_app_with(&[(
        "tiers.stripe",
        json!({
            "secret_key": "sk_test_abc",
            "webhook_secret": WHSEC,
            "api_base": stripe_url,
            "success_url": "https://app.test/billing/done",
            "cancel_url": "https://app.test/billing",
            "prices": { "pro": "price_pro_1" },
        }),
    )])
    .await;
    let admin = app.bootstrap().await;
    let owner = app.org_with_owner(&admin, "Paying", "owner@paying.test").await;

    let r = upgrade(&app, &owner, &owner.org_id, json!({ "plan": "pro" })).await;
    let body = json_ok(r, StatusCode::ACCEPTED).await;
    assert_eq!(body["applied"], false);
    assert_eq!(body["checkout_url"], "https://checkout.test/c/cs_test_123");
    {
        let seen = seen.lock().unwrap();
        let (auth, form) = &seen.requests[0];
        assert_eq!(auth, "Bearer sk_test_abc");
        assert_eq!(form["mode"], "subscription");
        assert_eq!(form["line_items[0][price]"], "price_pro_1");
        assert_eq!(form["client_reference_id"], owner.org_id);
        assert_eq!(form["metadata[plan]"], "pro");
        assert_eq!(form["success_url"], "https://app.test/billing/done");
    }
    assert_eq!(status(&app, &owner).await["plan"], "free", "nothing changes before payment");
    let r = upgrade(&app, &owner, &owner.org_id, json!({ "plan": "enterprise" })).await;
    assert_problem(r, StatusCode::CONFLICT, "plan_not_purchasable").await;

    let event = json!({
        "id": "evt_test_1",
        "object": "event",
        "type": "checkout.session.completed",
        "data": { "object": {
            "id": "cs_test_123", "object": "checkout.session", "client_reference_id": owner.org_id,
            "payment_status": "paid", "customer": "cus_1", "subscription": "sub_1",
            "metadata": { "org_id": owner.org_id, "plan": "pro" },
        } },
    })
    .to_string();
    let now = OffsetDateTime::now_utc().unix_timestamp();

    // Refused: no header, a bad signature, a signature with another secret, a stale timestamp.
    assert_problem(deliver(&app, &event, None).await, StatusCode::BAD_REQUEST, "invalid_signature_header").await;
    let forged = format!("t={now},v1={}", "ab".repeat(32));
    assert_problem(deliver(&app, &event, Some(forged)).await, StatusCode::BAD_REQUEST, "invalid_signature").await;
    let other = stripe_signature("whsec_other", now, &event);
    assert_problem(deliver(&app, &event, Some(other)).await, StatusCode::BAD_REQUEST, "invalid_signature").await;
    let tampered = event.replace("\"pro\"", "\"enterprise\"");
    let sig = stripe_signature(WHSEC, now, &event);
    assert_problem(deliver(&app, &tampered, Some(sig)).await, StatusCode::BAD_REQUEST, "invalid_signature").await;
    let stale = stripe_signature(WHSEC, now - 301, &event);
    assert_problem(deliver(&app, &event, Some(stale)).await, StatusCode::BAD_REQUEST, "timestamp_outside_tolerance")
        .await;
    assert_eq!(status(&app, &owner).await["plan"], "free");

    // Accepted once.
    let ack = json_ok(deliver(&app, &event, Some(stripe_signature(WHSEC, now, &event))).await, StatusCode::OK).await;
    assert_eq!(ack, json!({ "received": true, "duplicate": false, "outcome": "applied" }));
    let s = status(&app, &owner).await;
    assert_eq!(s["plan"], "pro", "{s}");
    assert_eq!(s["limits"]["api_calls_per_day"], 1_000_000);
    // A second checkout would start a second subscription.
    let r = upgrade(&app, &owner, &owner.org_id, json!({ "plan": "free" })).await;
    assert_eq!(r.status(), StatusCode::CONFLICT);

    // A system admin moves the org back; a replay of the event, freshly signed, changes nothing.
    let r = upgrade(&app, &admin, &owner.org_id, json!({ "plan": "free" })).await;
    assert_eq!(r.status(), StatusCode::OK);
    let replay =
        json_ok(deliver(&app, &event, Some(stripe_signature(WHSEC, now + 1, &event))).await, StatusCode::OK).await;
    assert_eq!(replay["duplicate"], true, "{replay}");
    assert_eq!(status(&app, &owner).await["plan"], "free", "a replayed event id is not applied again");

    // Concurrent deliveries of one new event apply it once.
    let again = event.replace("evt_test_1", "evt_test_2");
    let sig = stripe_signature(WHSEC, now, &again);
    let results = futures_util::future::join_all((0..5).map(|_| deliver(&app, &again, Some(sig.clone())))).await;
    let mut fresh = 0;
    for r in results {
        let b = json_ok(r, StatusCode::OK).await;
        fresh += usize::from(b["duplicate"] == false);
    }
    assert_eq!(fresh, 1);
    assert_eq!(status(&app, &owner).await["plan"], "pro");

    // Cancelling the subscription returns the org to the default plan.
    let cancel = json!({ "id": "evt_test_3", "type": "customer.subscription.deleted",
                         "data": { "object": { "id": "sub_1", "object": "subscription" } } })
    .to_string();
    let ack = json_ok(deliver(&app, &cancel, Some(stripe_signature(WHSEC, now, &cancel))).await, StatusCode::OK).await;
    assert_eq!(ack["outcome"], "downgraded");
    assert_eq!(status(&app, &owner).await["plan"], "free");

    // Other events are acknowledged; a signed non-event is a 400.
    let other = json!({ "id": "evt_test_4", "type": "invoice.paid", "data": { "object": {} } }).to_string();
    let ack = json_ok(deliver(&app, &other, Some(stripe_signature(WHSEC, now, &other))).await, StatusCode::OK).await;
    assert_eq!(ack["outcome"], "ignored: event type");
    let junk = "[1, 2, 3]";
    assert_problem(
        deliver(&app, junk, Some(stripe_signature(WHSEC, now, junk))).await,
        StatusCode::BAD_REQUEST,
        "invalid_event",
    )
    .await;
}

#[tokio::test]
async fn the_webhook_is_absent_until_configured() {
    let app = spawn_app_with(&[]).await;
    let body = "{}";
    let sig = stripe_signature(WHSEC, OffsetDateTime::now_utc().unix_timestamp(), body);
    assert_problem(deliver(&app, body, Some(sig)).await, StatusCode::NOT_FOUND, "not_found").await;
}

#[tokio::test]
async fn instances_share_one_count_and_learn_plan_changes_at_once() {
    let app1 = spawn_app_with(&[("tiers.plans.free.api_calls_per_day", json!(10))]).await;
    let app2 = crate::helpers::spawn_on(app1.config.clone(), Some(app1.redis.prefix().to_owned())).await;
    let admin = app1.bootstrap().await;
    let owner = app1.org_with_owner(&admin, "Spread", "owner@spread.test").await;
    let key = app1.api_key(&owner, None).await;
    let used = status(&app1, &owner).await["usage"]["api_calls_today"].as_u64().unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await; // both subscribers attached

    let mut passed = 0;
    for i in 0..12 {
        let app = if i % 2 == 0 { &app1 } else { &app2 };
        let r = app.as_(&key, Method::GET, "/api/v1/agents").send().await.unwrap();
        passed += usize::from(r.status() == StatusCode::OK);
    }
    assert_eq!(passed as u64, 10 - used, "one count for every instance");

    // app2 has the org's limits cached; a change made through app1 reaches it without waiting.
    let r = upgrade(&app1, &admin, &owner.org_id, json!({ "plan": "free", "overrides": { "api_calls_per_day": 12 } }))
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    let mut allowed = false;
    for _ in 0..40 {
        let r = app2.as_(&key, Method::GET, "/api/v1/agents").send().await.unwrap();
        if r.status() == StatusCode::OK {
            allowed = true;
            assert_eq!(header(&r, "x-ratelimit-limit"), "12");
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(allowed, "the second instance applies the new limit");
}

#[tokio::test]
async fn a_lease_held_by_one_instance_cannot_push_the_org_over_its_quota_through_another() {
    // Leases are kept a minute, so the one taken on app1 is still unspent while app2 runs dry.
    let app1 = spawn_app_with(&[
        ("tiers.plans.free.api_calls_per_day", json!(400)),
        ("tiers.limiter.lease_ttl_ms", json!(60_000)),
    ])
    .await;
    let app2 = crate::helpers::spawn_on(app1.config.clone(), Some(app1.redis.prefix().to_owned())).await;
    let admin = app1.bootstrap().await;
    let owner = app1.org_with_owner(&admin, "Leased", "owner@leased.test").await;
    let key = app1.api_key(&owner, None).await;
    let left = 400 - status(&app1, &owner).await["usage"]["api_calls_today"].as_u64().unwrap();

    let get = |app: &TestApp| app.as_(&key, Method::GET, "/api/v1/agents").send();
    let first = get(&app1).await.unwrap();
    assert_eq!(first.status(), StatusCode::OK);
    let decisions = app1.state.tiers().limiter.redis_decisions();
    // app1 now holds a lease: its next requests need no Redis.
    for _ in 0..5 {
        assert_eq!(get(&app1).await.unwrap().status(), StatusCode::OK);
    }
    assert_eq!(app1.state.tiers().limiter.redis_decisions(), decisions, "spent from the lease");

    let mut through_app2 = 0;
    loop {
        let r = get(&app2).await.unwrap();
        match r.status() {
            StatusCode::OK => through_app2 += 1,
            StatusCode::TOO_MANY_REQUESTS => break,
            other => panic!("{other}"),
        }
        assert!(through_app2 <= left, "app2 alone let more through than the quota");
    }
    // What app1 leased is not app2's to spend: app2 stops short by exactly what app1 holds.
    let mut through_app1 = 6;
    while get(&app1).await.unwrap().status() == StatusCode::OK {
        through_app1 += 1;
        assert!(through_app1 + through_app2 <= left, "over the quota");
    }
    assert!(through_app1 > 6, "app1 still had leased calls when app2 was refused");
    assert_eq!(through_app1 + through_app2, left, "every call of the quota, and not one more");
    assert_problem(get(&app2).await.unwrap(), StatusCode::TOO_MANY_REQUESTS, "daily_quota_exceeded").await;
    assert_eq!(status(&app1, &owner).await["usage"]["api_calls_today"], 400);
}

#[tokio::test]
async fn a_client_far_from_its_limits_is_not_decided_by_redis_on_every_request() {
    // Leases that outlive the test however slowly it runs: what is measured is that a lease is
    // spent locally, not how long one lasts.
    let app = spawn_app_with(&[
        ("tiers.plans.free.api_calls_per_day", json!(1_000_000)),
        ("tiers.limiter.lease_ttl_ms", json!(60_000)),
    ])
    .await;
    let (owner, key) = org_and_key(&app).await;
    let before_calls = status(&app, &owner).await["usage"]["api_calls_today"].as_u64().unwrap();
    assert_eq!(app.as_(&key, Method::GET, "/api/v1/agents").send().await.unwrap().status(), StatusCode::OK);
    let before = app.state.tiers().limiter.redis_decisions();
    for chunk in 0..10 {
        let responses = burst(&app, &key, "/api/v1/agents", 20).await;
        assert!(responses.iter().all(|r| r.status() == StatusCode::OK), "chunk {chunk}");
    }
    let asked = app.state.tiers().limiter.redis_decisions() - before;
    assert!(asked <= 3, "200 requests asked Redis {asked} times");
    // Leased or not, every call is counted.
    assert_eq!(status(&app, &owner).await["usage"]["api_calls_today"].as_u64().unwrap(), before_calls + 201);
}

#[tokio::test]
async fn hostile_upgrade_bodies_get_a_clear_4xx() {
    let app = spawn_app_with(&[]).await;
    let admin = app.bootstrap().await;
    let cases = [
        json!({ "plan": "x".repeat(10_000) }),
        json!({ "plan": "прo" }),
        json!({ "plan": "pro\u{0000}" }),
        json!({ "plan": "pro", "overrides": { "rate_limit": { "requests_per_minute": -1, "burst": 1 } } }),
        json!({ "plan": "pro", "overrides": { "api_calls_per_day": "lots" } }),
        json!({ "plan": "pro", "overrides": { "tokens_per_day": 1e30 } }),
        json!({ "plan": "pro", "overrides": [] }),
        json!({ "plan": "pro", "extra": true }),
        json!([]),
    ];
    for body in cases {
        let r = upgrade(&app, &admin, &admin.org_id, body.clone()).await;
        assert!(r.status().is_client_error(), "{body}: {}", r.status());
        assert_eq!(header(&r, "content-type"), "application/problem+json", "{body}");
    }
    let r = app
        .as_(&admin, Method::POST, "/api/v1/tiers/upgrade")
        .header("x-org-id", &admin.org_id)
        .header("content-type", "application/json")
        .body("{\"plan\": ")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    assert_eq!(status(&app, &admin).await["plan"], "free", "nothing changed");
}

/// Requests recorded for `route` in the org: (rows, requests they count).
async fn analytics_rows(app: &TestApp, org_id: &str, route: &str) -> (i64, i64) {
    sqlx::query_as(
        "select count(*), coalesce(sum(request_count), 0)::int8 from analytics_event
         where organization_id = $1 and route = $2 and kind = 'request'",
    )
    .bind(org_id.parse::<uuid::Uuid>().unwrap())
    .bind(route)
    .fetch_one(&app.db)
    .await
    .unwrap()
}

#[tokio::test]
async fn requests_of_one_caller_on_one_route_are_counted_in_a_row_per_minute() {
    let app = spawn_app_with(&[("analytics.flush_interval_ms", json!(50))]).await;
    let (owner, key) = org_and_key(&app).await;
    for _ in 0..6 {
        let responses = burst(&app, &key, "/api/v1/agents", 50).await;
        assert!(responses.iter().all(|r| r.status() == StatusCode::OK));
        // Several flushes, each merged into the same row.
        tokio::time::sleep(Duration::from_millis(60)).await;
    }
    let mut seen = (0, 0);
    for _ in 0..100 {
        seen = analytics_rows(&app, &owner.org_id, "/api/v1/agents").await;
        if seen.1 == 300 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(seen.1, 300, "every request counted");
    assert!(seen.0 <= 2, "{} rows for 300 requests in at most two minutes", seen.0);
    let histogram: Vec<i64> = sqlx::query_scalar(
        "select latency_buckets from analytics_event where organization_id = $1 and route = '/api/v1/agents' limit 1",
    )
    .bind(owner.org_id.parse::<uuid::Uuid>().unwrap())
    .fetch_one(&app.db)
    .await
    .unwrap();
    assert_eq!(histogram.len(), agentidp::analytics::LATENCY_BOUNDS_US.len() + 1);
}

#[tokio::test]
async fn analytics_counted_while_postgres_is_away_are_written_when_it_returns() {
    let (db_url, _) = crate::helpers::fresh_database().await;
    let host = db_url.split('@').nth(1).and_then(|r| r.split('/').next()).unwrap().to_owned();
    let proxy = Proxy::start(host.clone()).await;
    let via_proxy = db_url.replacen(&host, &proxy.addr.to_string(), 1);
    let app = crate::helpers::spawn_on(
        crate::helpers::test_config(&via_proxy, &[("analytics.flush_interval_ms", json!(100))]),
        None,
    )
    .await;
    let (owner, key) = org_and_key(&app).await;
    let direct = sqlx::PgPool::connect(&db_url).await.unwrap();
    let counted = || async {
        sqlx::query_scalar::<_, i64>(
            "select coalesce(sum(request_count), 0)::int8 from analytics_event
             where organization_id = $1 and route = '/auth/me'",
        )
        .bind(owner.org_id.parse::<uuid::Uuid>().unwrap())
        .fetch_one(&direct)
        .await
        .unwrap()
    };
    // The key is cached now, so it is still recognised (and metered) without Postgres.
    app.as_(&key, Method::GET, "/auth/me").send().await.unwrap();
    for _ in 0..100 {
        if counted().await == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(counted().await, 1);

    proxy.down().await;
    for r in burst(&app, &key, "/auth/me", 3).await {
        assert_ne!(r.status(), StatusCode::INTERNAL_SERVER_ERROR);
    }
    // Several flushes fail meanwhile.
    tokio::time::sleep(Duration::from_millis(400)).await;
    proxy.up();
    let mut n = 0;
    for _ in 0..200 {
        n = counted().await;
        if n >= 4 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(n, 4, "the buckets of the failed flushes were kept and written");
}

#[tokio::test]
async fn records_still_queued_at_shutdown_are_written_before_exit() {
    // A long flush interval: only the shutdown drain can write the second batch in time.
    let mut app = spawn_app_with(&[("analytics.flush_interval_ms", json!(60_000))]).await;
    let (owner, key) = org_and_key(&app).await;
    for _ in 0..5 {
        assert_eq!(app.as_(&key, Method::GET, "/api/v1/agents").send().await.unwrap().status(), StatusCode::OK);
    }
    let server = app.begin_shutdown();
    tokio::time::timeout(Duration::from_secs(15), server).await.expect("stops in time").unwrap().unwrap();
    let written: i64 = sqlx::query_scalar(
        "select coalesce(sum(request_count), 0)::int8 from analytics_event
         where organization_id = $1 and route = '/api/v1/agents' and method = 'GET'",
    )
    .bind(owner.org_id.parse::<uuid::Uuid>().unwrap())
    // The app's pool closed with it.
    .fetch_one(&mut <sqlx::PgConnection as sqlx::Connection>::connect(&app.db_url).await.unwrap())
    .await
    .unwrap();
    assert_eq!(written, 5);
}
