//! Webhooks: every event type delivered and verified by an unmodified Standard Webhooks library,
//! retries on the application clock, 410, auto-disable, two instances, kill -9, the SSRF guard,
//! tenant isolation and bad input.

use std::{
    collections::{HashMap, HashSet},
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU16, AtomicU64, Ordering},
    },
    time::Duration,
};

use axum::{body::Bytes, extract::State, http::HeaderMap, routing::post};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::helpers::{Caller, TestApp, assert_problem, json_ok, spawn_app_with, spawn_on, test_config};

/// One request the receiver got.
#[derive(Clone, Debug)]
struct Hit {
    id: String,
    headers: HeaderMap,
    body: Bytes,
}

/// A local webhook receiver: answers `status` (after `delay_ms`) and keeps every request.
#[derive(Clone)]
struct Receiver {
    addr: SocketAddr,
    hits: Arc<Mutex<Vec<Hit>>>,
    status: Arc<AtomicU16>,
    delay_ms: Arc<AtomicU64>,
}

impl Receiver {
    async fn start() -> Self {
        let hits = Arc::new(Mutex::new(Vec::new()));
        let status = Arc::new(AtomicU16::new(200));
        let delay_ms = Arc::new(AtomicU64::new(0));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let r = Self { addr, hits, status, delay_ms };
        let state = r.clone();
        let router = axum::Router::new().route("/hook", post(receive)).with_state(state);
        tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
        r
    }

    fn url(&self) -> String {
        format!("http://{}/hook", self.addr)
    }

    fn hits(&self) -> Vec<Hit> {
        self.hits.lock().unwrap().clone()
    }

    /// How many times each webhook-id arrived.
    fn counts(&self) -> HashMap<String, usize> {
        let mut c = HashMap::new();
        for h in self.hits() {
            *c.entry(h.id).or_default() += 1;
        }
        c
    }

    /// Waits (bounded) until `done` holds over the hits.
    async fn wait_for(&self, what: &str, done: impl Fn(&[Hit]) -> bool) -> Vec<Hit> {
        // Bounded: 60 s at most, for a loaded machine; most waits end in milliseconds.
        for _ in 0..1200 {
            let hits = self.hits();
            if done(&hits) {
                return hits;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let types: Vec<String> = self.hits().iter().map(|h| envelope(h)["type"].as_str().unwrap().to_owned()).collect();
        panic!("timed out waiting for {what}; received {types:?}");
    }
}

async fn receive(State(r): State<Receiver>, headers: HeaderMap, body: Bytes) -> StatusCode {
    let id = headers.get("webhook-id").and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
    r.hits.lock().unwrap().push(Hit { id, headers, body });
    let delay = r.delay_ms.load(Ordering::Relaxed);
    if delay > 0 {
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
    StatusCode::from_u16(r.status.load(Ordering::Relaxed)).unwrap()
}

fn envelope(h: &Hit) -> Value {
    serde_json::from_slice(&h.body).unwrap()
}

/// What the webhook tests run with: private receivers allowed, a quick poll.
fn webhook_config() -> Vec<(&'static str, Value)> {
    vec![("webhooks.allow_private_networks", json!(true)), ("webhooks.poll_interval_ms", json!(100))]
}

async fn webhook_app(extra: &[(&str, Value)]) -> TestApp {
    let mut cfg = webhook_config();
    cfg.extend(extra.iter().cloned());
    spawn_app_with(&cfg).await
}

/// A new endpoint; returns its id and secret.
async fn create_endpoint(app: &TestApp, by: &Caller, url: &str, types: &[&str]) -> (String, String) {
    let resp = app
        .as_(by, Method::POST, "/api/v1/webhooks")
        .json(&json!({ "url": url, "event_types": types, "description": "test receiver" }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.headers().get("cache-control").unwrap(), "no-store");
    let body = json_ok(resp, StatusCode::CREATED).await;
    (body["id"].as_str().unwrap().to_owned(), body["secret"].as_str().unwrap().to_owned())
}

async fn deliveries(app: &TestApp, by: &Caller, endpoint: &str) -> Vec<Value> {
    let body = json_ok(
        app.as_(by, Method::GET, &format!("/api/v1/webhooks/{endpoint}/deliveries")).send().await.unwrap(),
        StatusCode::OK,
    )
    .await;
    body.as_array().unwrap().clone()
}

/// Waits until the endpoint's newest delivery satisfies `done`; returns it.
async fn wait_delivery(app: &TestApp, by: &Caller, endpoint: &str, done: impl Fn(&Value) -> bool) -> Value {
    for _ in 0..400 {
        if let Some(d) = deliveries(app, by, endpoint).await.into_iter().next()
            && done(&d)
        {
            return d;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out; deliveries: {:?}", deliveries(app, by, endpoint).await);
}

/// Waits until the endpoint's deliveries, all of them, satisfy `done`.
async fn wait_deliveries(app: &TestApp, by: &Caller, endpoint: &str, done: impl Fn(&[Value]) -> bool) {
    for _ in 0..400 {
        let all = deliveries(app, by, endpoint).await;
        if !all.is_empty() && done(&all) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out; deliveries: {:?}", deliveries(app, by, endpoint).await);
}

fn verify(secret: &str, h: &Hit) -> Result<(), standardwebhooks::WebhookError> {
    standardwebhooks::Webhook::new(secret).unwrap().verify(&h.body, &h.headers)
}

async fn send(app: &TestApp, by: &Caller, method: Method, path: &str, body: Option<Value>) -> Value {
    let mut req = app.as_(by, method, path);
    if let Some(b) = body {
        req = req.json(&b);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status();
    let text = resp.text().await.unwrap();
    assert!(status.is_success(), "{path}: {status} {text}");
    serde_json::from_str(&text).unwrap_or(Value::Null)
}

#[tokio::test]
async fn every_event_type_arrives_as_a_cloudevent_that_a_standard_webhooks_library_verifies() {
    let app = webhook_app(&[]).await;
    let admin = app.bootstrap().await;
    let rx = Receiver::start().await;
    let (endpoint, secret) = create_endpoint(&app, &admin, &rx.url(), &["*"]).await;
    let org = admin.org_id.clone();

    // Agents and credentials.
    let agent = app.create_agent(&admin, json!({ "name": "scout" })).await;
    let a = agent["id"].as_str().unwrap().to_owned();
    send(&app, &admin, Method::PATCH, &format!("/api/v1/agents/{a}"), Some(json!({ "description": "d" }))).await;
    send(&app, &admin, Method::PATCH, &format!("/api/v1/agents/{a}"), Some(json!({ "status": "suspended" }))).await;
    send(&app, &admin, Method::PATCH, &format!("/api/v1/agents/{a}"), Some(json!({ "status": "active" }))).await;
    let cred = app.credential(&admin, &a).await;
    let c = &cred.credential_id;
    send(&app, &admin, Method::POST, &format!("/api/v1/agents/{a}/credentials/{c}/rotate"), None).await;
    send(&app, &admin, Method::DELETE, &format!("/api/v1/agents/{a}/credentials/{c}"), None).await;
    send(&app, &admin, Method::POST, &format!("/api/v1/agents/{a}/revoke-tokens"), None).await;
    send(&app, &admin, Method::DELETE, &format!("/api/v1/agents/{a}"), None).await;
    // Members and API keys.
    let member = app.add_member(&admin, &org, "m@acme.test", "member").await;
    let m = member["user_id"].as_str().unwrap().to_owned();
    let members = format!("/api/v1/organizations/{org}/members/{m}");
    send(&app, &admin, Method::PATCH, &members, Some(json!({ "role": "admin" }))).await;
    send(&app, &admin, Method::DELETE, &members, None).await;
    let key = send(&app, &admin, Method::POST, "/auth/api-keys", Some(json!({ "description": "k" }))).await;
    send(&app, &admin, Method::DELETE, &format!("/auth/api-keys/{}", key["id"].as_str().unwrap()), None).await;
    // Policies, the plan, the signing key.
    let policy = r#"@id("p") permit (principal, action == AgentIdP::Action::"read", resource is AgentIdP::Organization) when { context.org_role == "member" };"#;
    for _ in 0..2 {
        send(&app, &admin, Method::POST, "/api/v1/policies/versions", Some(json!({ "source": policy }))).await;
    }
    send(&app, &admin, Method::POST, "/api/v1/policies/versions/1/activate", None).await;
    send(&app, &admin, Method::POST, "/api/v1/policies/versions/2/activate", None).await;
    send(&app, &admin, Method::POST, "/api/v1/policies/rollback", None).await;
    let upgrade = app.as_(&admin, Method::POST, "/api/v1/tiers/upgrade").json(&json!({ "plan": "pro" }));
    assert!(upgrade.send().await.unwrap().status().is_success());
    send(&app, &admin, Method::POST, "/api/v1/keys/rotate", None).await;
    send(&app, &admin, Method::POST, &format!("/api/v1/webhooks/{endpoint}/test"), None).await;

    let catalog =
        json_ok(app.as_(&admin, Method::GET, "/api/v1/webhooks/event-types").send().await.unwrap(), StatusCode::OK)
            .await;
    let schemas: HashMap<String, Value> = catalog
        .as_array()
        .unwrap()
        .iter()
        .map(|t| (t["name"].as_str().unwrap().to_owned(), t["schema"].clone()))
        .collect();
    let expected: HashSet<&str> = [
        "agent.created",
        "agent.updated",
        "agent.suspended",
        "agent.reactivated",
        "agent.deleted",
        "credential.created",
        "credential.rotated",
        "credential.revoked",
        "tokens.revoked",
        "member.added",
        "member.role_changed",
        "member.removed",
        "apikey.created",
        "apikey.revoked",
        "policy.activated",
        "policy.rolled_back",
        "tier.changed",
        "signing_key.rotated",
        "webhook.test",
    ]
    .into();
    for t in &expected {
        assert!(schemas.contains_key(*t), "{t} is in the catalog");
    }
    let hits = rx
        .wait_for("every event type", |hits| {
            let seen: HashSet<String> = hits.iter().map(|h| envelope(h)["type"].as_str().unwrap().to_owned()).collect();
            expected.iter().all(|t| seen.contains(*t))
        })
        .await;
    for h in &hits {
        verify(&secret, h).unwrap_or_else(|e| panic!("the library rejects {:?}: {e:?}", envelope(h)["type"]));
        let ce = envelope(h);
        assert_eq!(ce["specversion"], "1.0");
        assert_eq!(ce["id"].as_str(), Some(h.id.as_str()), "webhook-id is the event id");
        assert_eq!(uuid::Uuid::parse_str(&h.id).unwrap().get_version_num(), 7);
        assert_eq!(ce["source"], app.config.server.public_url);
        assert_eq!(ce["datacontenttype"], "application/json");
        assert_eq!(ce["orgid"], org.as_str());
        assert!(ce["subject"].as_str().is_some_and(|s| !s.is_empty()));
        assert!(
            time::OffsetDateTime::parse(ce["time"].as_str().unwrap(), &time::format_description::well_known::Rfc3339)
                .is_ok()
        );
        let schema = &schemas[ce["type"].as_str().unwrap()];
        for field in schema["required"].as_array().unwrap() {
            assert!(ce["data"].get(field.as_str().unwrap()).is_some(), "{} lacks {field}: {ce}", ce["type"]);
        }
    }
    // Each arrived once: no crash, no duplicate.
    assert!(rx.counts().values().all(|n| *n == 1), "{:?}", rx.counts());
    // A changed body, a wrong secret, an old timestamp: the library refuses each.
    let h = hits[0].clone();
    let mut forged = h.clone();
    forged.body = Bytes::from(String::from_utf8(h.body.to_vec()).unwrap().replace("\"1.0\"", "\"1.1\""));
    assert!(verify(&secret, &forged).is_err());
    let (other, _) = agentidp::webhooks::signing::new_secret();
    assert!(verify(&other, &h).is_err());
    let mut stale = h.clone();
    let old = time::OffsetDateTime::now_utc().unix_timestamp() - 600;
    let raw = base64::Engine::decode(&base64::engine::general_purpose::STANDARD, &secret[6..]).unwrap();
    stale.headers.insert("webhook-timestamp", old.to_string().parse().unwrap());
    let resigned = agentidp::webhooks::signing::sign(&raw, &h.id, old, &h.body);
    stale.headers.insert("webhook-signature", resigned.parse().unwrap());
    assert!(matches!(verify(&secret, &stale), Err(standardwebhooks::WebhookError::TimestampTooOldError)));
}

#[tokio::test]
async fn the_outbox_commits_with_the_change_and_rolls_back_with_it() {
    let app = webhook_app(&[]).await;
    let admin = app.bootstrap().await;
    let org: uuid::Uuid = admin.org_id.parse().unwrap();
    let stored = |id: uuid::Uuid| {
        sqlx::query_scalar::<_, i64>("select count(*) from event_outbox where event_id = $1")
            .bind(id)
            .fetch_one(&app.db)
    };
    // In the caller's transaction: gone with a rollback, there with a commit.
    let data = || json!({ "agent_id": uuid::Uuid::now_v7(), "name": "x", "status": "active" });
    let mut tx = app.db.begin().await.unwrap();
    let id = agentidp::events::emit(&mut tx, org, "agent.updated", "agents/x", data()).await.unwrap();
    tx.rollback().await.unwrap();
    assert_eq!(stored(id).await.unwrap(), 0);
    let mut tx = app.db.begin().await.unwrap();
    let id = agentidp::events::emit(&mut tx, org, "agent.updated", "agents/x", data()).await.unwrap();
    tx.commit().await.unwrap();
    assert_eq!(stored(id).await.unwrap(), 1);

    // Over HTTP: a refused change writes no event, a change exactly its own.
    let before: i64 = sqlx::query_scalar("select count(*) from event_outbox").fetch_one(&app.db).await.unwrap();
    let resp = app
        .as_(&admin, Method::PATCH, &format!("/api/v1/organizations/{}/members/{}", admin.org_id, admin.user_id))
        .json(&json!({ "role": "member" }))
        .send()
        .await
        .unwrap();
    assert_problem(resp, StatusCode::CONFLICT, "last_owner").await;
    let agent = app.create_agent(&admin, json!({ "name": "one" })).await;
    let rows: Vec<(String, Value)> = sqlx::query_as("select type, data from event_outbox order by event_id offset $1")
        .bind(before)
        .fetch_all(&app.db)
        .await
        .unwrap();
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0].0, "agent.created");
    assert_eq!(rows[0].1["agent_id"], agent["id"]);
}

#[tokio::test]
async fn a_rotated_secret_signs_beside_the_new_one_during_the_overlap() {
    let app = webhook_app(&[]).await;
    let admin = app.bootstrap().await;
    let rx = Receiver::start().await;
    let (endpoint, old) = create_endpoint(&app, &admin, &rx.url(), &["webhook.*"]).await;
    let resp =
        app.as_(&admin, Method::POST, &format!("/api/v1/webhooks/{endpoint}/rotate-secret")).send().await.unwrap();
    assert_eq!(resp.headers().get("cache-control").unwrap(), "no-store");
    let rotated = json_ok(resp, StatusCode::OK).await;
    let new = rotated["secret"].as_str().unwrap().to_owned();
    assert_ne!(new, old);
    send(&app, &admin, Method::POST, &format!("/api/v1/webhooks/{endpoint}/test"), None).await;
    let hits = rx.wait_for("the test event", |h| !h.is_empty()).await;
    let sig = hits[0].headers.get("webhook-signature").unwrap().to_str().unwrap().to_owned();
    assert_eq!(sig.split(' ').filter(|s| s.starts_with("v1,")).count(), 2, "{sig}");
    verify(&old, &hits[0]).expect("the old secret still verifies");
    verify(&new, &hits[0]).expect("the new secret verifies");
    // After the overlap only the new one signs.
    app.state.clock().set(time::OffsetDateTime::now_utc() + time::Duration::days(2));
    send(&app, &admin, Method::POST, &format!("/api/v1/webhooks/{endpoint}/test"), None).await;
    let hits = rx.wait_for("the second test event", |h| h.len() >= 2).await;
    assert!(verify(&old, &hits[1]).is_err());
    verify(&new, &hits[1]).unwrap();
    // The secret is never shown again.
    let got = json_ok(
        app.as_(&admin, Method::GET, &format!("/api/v1/webhooks/{endpoint}")).send().await.unwrap(),
        StatusCode::OK,
    )
    .await;
    assert!(got.get("secret").is_none() && !got.to_string().contains("whsec_"), "{got}");
}

#[tokio::test]
async fn failures_are_retried_on_the_schedule_of_the_application_clock_then_dead_lettered() {
    let app =
        webhook_app(&[("webhooks.retry_schedule_secs", json!([5, 300])), ("webhooks.retry_jitter", json!(0.1))]).await;
    let admin = app.bootstrap().await;
    let rx = Receiver::start().await;
    rx.status.store(500, Ordering::Relaxed);
    let (endpoint, _) = create_endpoint(&app, &admin, &rx.url(), &["webhook.test"]).await;
    send(&app, &admin, Method::POST, &format!("/api/v1/webhooks/{endpoint}/test"), None).await;

    let d = wait_delivery(&app, &admin, &endpoint, |d| d["attempts"] == 1).await;
    assert_eq!(d["status"], "pending");
    let gap = |d: &Value, i: usize| {
        let a = &d["attempt_log"][i];
        let parse = |v: &Value| {
            time::OffsetDateTime::parse(v.as_str().unwrap(), &time::format_description::well_known::Rfc3339).unwrap()
        };
        (parse(&a["next_attempt_at"]) - parse(&a["attempted_at"])).as_seconds_f64()
    };
    assert!((4.5..=5.5).contains(&gap(&d, 0)), "{d}");
    assert_eq!(d["attempt_log"][0]["status_code"], 500);
    // Real time passing does not make the retry due; the application clock does.
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(rx.hits().len(), 1);
    app.state.clock().set(time::OffsetDateTime::now_utc() + time::Duration::seconds(6));
    let d = wait_delivery(&app, &admin, &endpoint, |d| d["attempts"] == 2).await;
    assert!((270.0..=330.0).contains(&gap(&d, 1)), "{d}");
    app.state.clock().set(time::OffsetDateTime::now_utc() + time::Duration::seconds(6 + 331));
    let d = wait_delivery(&app, &admin, &endpoint, |d| d["attempts"] == 3).await;
    assert_eq!(d["status"], "dead", "retries spent: a dead letter");
    assert!(d["attempt_log"][2]["next_attempt_at"].is_null());
    assert_eq!(rx.counts().values().copied().collect::<Vec<_>>(), vec![3], "one event, three attempts");

    let dead = json_ok(
        app.as_(
            &admin,
            Method::GET,
            &format!("/api/v1/webhooks/dead-letters?endpoint_id={endpoint}&event_type=webhook.test"),
        )
        .send()
        .await
        .unwrap(),
        StatusCode::OK,
    )
    .await;
    assert_eq!(dead.as_array().unwrap().len(), 1, "{dead}");
    let none = json_ok(
        app.as_(&admin, Method::GET, "/api/v1/webhooks/dead-letters?event_type=agent.created").send().await.unwrap(),
        StatusCode::OK,
    )
    .await;
    assert_eq!(none.as_array().unwrap().len(), 0);
    // A manual retry of the dead letter, now that the receiver is back.
    rx.status.store(200, Ordering::Relaxed);
    let id = d["id"].as_str().unwrap();
    let resp = app.as_(&admin, Method::POST, &format!("/api/v1/webhooks/deliveries/{id}/retry")).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::ACCEPTED);
    let d = wait_delivery(&app, &admin, &endpoint, |d| d["status"] == "succeeded").await;
    assert_eq!(d["attempts"], 4);
    let resp = app.as_(&admin, Method::POST, &format!("/api/v1/webhooks/deliveries/{id}/retry")).send().await.unwrap();
    assert_problem(resp, StatusCode::CONFLICT, "already_delivered").await;
}

#[tokio::test]
async fn gone_disables_at_once_and_a_long_failure_disables_on_the_clock() {
    let app = webhook_app(&[("webhooks.disable_after_hours", json!(1))]).await;
    let admin = app.bootstrap().await;
    let watcher = Receiver::start().await;
    create_endpoint(&app, &admin, &watcher.url(), &["webhook.endpoint.*"]).await;

    let gone = Receiver::start().await;
    gone.status.store(410, Ordering::Relaxed);
    let (g, _) = create_endpoint(&app, &admin, &gone.url(), &["agent.*"]).await;
    app.create_agent(&admin, json!({ "name": "a1" })).await;
    let d = wait_delivery(&app, &admin, &g, |d| d["status"] == "dead").await;
    assert_eq!(d["attempts"], 1);
    let ep =
        json_ok(app.as_(&admin, Method::GET, &format!("/api/v1/webhooks/{g}")).send().await.unwrap(), StatusCode::OK)
            .await;
    assert_eq!((ep["enabled"].clone(), ep["disabled_reason"].clone()), (json!(false), json!("gone")));
    let hits = watcher.wait_for("the disabled event", |h| !h.is_empty()).await;
    let ce = envelope(&hits[0]);
    assert_eq!(ce["type"], "webhook.endpoint.disabled");
    assert_eq!((ce["data"]["endpoint_id"].as_str(), ce["data"]["reason"].as_str()), (Some(g.as_str()), Some("gone")));
    // A disabled endpoint gets no more deliveries.
    app.create_agent(&admin, json!({ "name": "a2" })).await;

    let failing = Receiver::start().await;
    failing.status.store(503, Ordering::Relaxed);
    let (f, _) = create_endpoint(&app, &admin, &failing.url(), &["agent.*"]).await;
    app.create_agent(&admin, json!({ "name": "a3" })).await;
    // a2's event may reach this endpoint too, when the outbox fans it out after the endpoint exists:
    // wait for every delivery's first failure, and below for any delivery's second.
    wait_deliveries(&app, &admin, &f, |all| all.iter().all(|d| d["attempts"] == 1)).await;
    let ep =
        json_ok(app.as_(&admin, Method::GET, &format!("/api/v1/webhooks/{f}")).send().await.unwrap(), StatusCode::OK)
            .await;
    assert_eq!(ep["enabled"], true, "one failure does not disable");
    // Two hours later on the application clock, the next failure disables it.
    app.state.clock().set(time::OffsetDateTime::now_utc() + time::Duration::hours(2));
    wait_deliveries(&app, &admin, &f, |all| all.iter().any(|d| d["attempts"] == 2)).await;
    let hits = watcher.wait_for("the second disabled event", |h| h.len() >= 2).await;
    let ce = envelope(&hits[1]);
    assert_eq!(
        (ce["data"]["endpoint_id"].as_str(), ce["data"]["reason"].as_str()),
        (Some(f.as_str()), Some("failing"))
    );
    let ep =
        json_ok(app.as_(&admin, Method::GET, &format!("/api/v1/webhooks/{f}")).send().await.unwrap(), StatusCode::OK)
            .await;
    assert_eq!(ep["enabled"], false);
    assert_eq!(gone.hits().len(), 1, "nothing more went to the endpoint that said 410");
    // Audit entries for the dispatcher's and the people's changes.
    let audit =
        json_ok(app.as_(&admin, Method::GET, "/api/v1/audit?limit=200").send().await.unwrap(), StatusCode::OK).await;
    let text = audit.to_string();
    assert!(text.contains("webhook.endpoint_disabled") && text.contains("webhook.endpoint_created"), "{text}");
}

/// Inserts `n` events through the outbox's public API, each in its own transaction.
async fn emit_many(app: &TestApp, org: &str, n: usize) -> HashSet<String> {
    let org: uuid::Uuid = org.parse().unwrap();
    let mut ids = HashSet::new();
    for i in 0..n {
        let mut tx = app.db.begin().await.unwrap();
        let id = agentidp::events::emit(
            &mut tx,
            org,
            "agent.updated",
            format!("agents/{i}"),
            json!({ "agent_id": uuid::Uuid::now_v7(), "name": format!("a{i}"), "status": "active" }),
        )
        .await
        .unwrap();
        tx.commit().await.unwrap();
        ids.insert(id.to_string());
    }
    ids
}

#[tokio::test]
async fn two_instances_deliver_each_event_to_each_endpoint_exactly_once() {
    let extra = [("webhooks.batch_size", json!(5)), ("webhooks.concurrency", json!(3))];
    let app = webhook_app(&extra).await;
    let mut cfg = webhook_config();
    cfg.extend(extra.iter().cloned());
    let other = spawn_on(test_config(&app.db_url, &cfg), None).await;
    let admin = app.bootstrap().await;
    let (rx1, rx2) = (Receiver::start().await, Receiver::start().await);
    create_endpoint(&app, &admin, &rx1.url(), &["agent.*"]).await;
    create_endpoint(&other, &admin, &rx2.url(), &["agent.updated"]).await;
    let ids = emit_many(&app, &admin.org_id, 120).await;
    for rx in [&rx1, &rx2] {
        rx.wait_for("every event", |h| h.iter().map(|h| h.id.clone()).collect::<HashSet<_>>() == ids).await;
    }
    // Both dispatchers settle everything; then nothing is pending and nothing came twice.
    for _ in 0..200 {
        let pending: i64 = sqlx::query_scalar("select count(*) from webhook_delivery where status <> 'succeeded'")
            .fetch_one(&app.db)
            .await
            .unwrap();
        if pending == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for rx in [&rx1, &rx2] {
        let twice: Vec<_> = rx.counts().into_iter().filter(|(_, n)| *n != 1).collect();
        assert!(twice.is_empty(), "delivered more than once: {twice:?}");
    }
}

#[tokio::test]
async fn after_kill_9_mid_delivery_every_event_still_arrives() {
    let app = webhook_app(&[("webhooks.dispatcher", json!(false))]).await;
    let admin = app.bootstrap().await;
    let rx = Receiver::start().await;
    rx.delay_ms.store(150, Ordering::Relaxed);
    create_endpoint(&app, &admin, &rx.url(), &["agent.*"]).await;
    let ids = emit_many(&app, &admin.org_id, 40).await;

    // Another process delivers, slowly, and is killed mid-way.
    // Its log, at the default level, joins the run's (scanned for secrets by `make test`).
    let (_, log) = crate::helpers::test_log_file("webhooks-dispatch");
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_agentidp"))
        .arg("serve")
        .env("AGENTIDP_DATABASE__URL", &app.db_url)
        .env("AGENTIDP_SERVER__BIND", "127.0.0.1:0")
        .env("AGENTIDP_REDIS__URL", crate::helpers::redis_url())
        .env("AGENTIDP_REDIS__KEY_PREFIX", format!("test:{}:", uuid::Uuid::new_v4().simple()))
        .env("AGENTIDP_WEBHOOKS__ALLOW_PRIVATE_NETWORKS", "true")
        .env("AGENTIDP_WEBHOOKS__POLL_INTERVAL_MS", "50")
        .env("AGENTIDP_WEBHOOKS__BATCH_SIZE", "4")
        .env("AGENTIDP_WEBHOOKS__CONCURRENCY", "2")
        .env("AGENTIDP_WEBHOOKS__TIMEOUT_SECS", "2")
        .env("AGENTIDP_WEBHOOKS__LEASE_SECS", "3")
        .env_remove("AGENTIDP_LOG__LEVEL")
        .env_remove("RUST_LOG")
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .expect("start agentidp serve");
    rx.wait_for("the first deliveries", |h| h.len() >= 6).await;
    child.kill().await.expect("SIGKILL");
    let at_kill = rx.hits().len();
    assert!(at_kill < ids.len(), "killed mid-way ({at_kill} of {})", ids.len());
    let unsettled: i64 = sqlx::query_scalar(
        "select count(*) from webhook_delivery where status = 'pending' and lease_token is not null",
    )
    .fetch_one(&app.db)
    .await
    .unwrap();
    assert!(unsettled > 0, "the killed instance held leases");

    // Another instance takes over; the killed one's leases lapse and are retaken.
    let mut cfg = webhook_config();
    cfg.push(("webhooks.lease_secs", json!(3)));
    cfg.push(("webhooks.timeout_secs", json!(2)));
    let _survivor = spawn_on(test_config(&app.db_url, &cfg), None).await;
    rx.wait_for("every event at least once", |h| h.iter().map(|h| h.id.clone()).collect::<HashSet<_>>() == ids).await;
}

#[tokio::test]
async fn replay_delivers_a_time_range_again_with_the_same_ids() {
    let app = webhook_app(&[]).await;
    let admin = app.bootstrap().await;
    let rx = Receiver::start().await;
    let (endpoint, _) = create_endpoint(&app, &admin, &rx.url(), &["agent.created"]).await;
    let since = time::OffsetDateTime::now_utc() - time::Duration::minutes(1);
    for name in ["r1", "r2", "r3"] {
        app.create_agent(&admin, json!({ "name": name })).await;
    }
    rx.wait_for("three events", |h| h.len() == 3).await;
    let since = since.format(&time::format_description::well_known::Rfc3339).unwrap();
    let r = send(
        &app,
        &admin,
        Method::POST,
        &format!("/api/v1/webhooks/{endpoint}/replay"),
        Some(json!({ "since": since })),
    )
    .await;
    assert_eq!(r["queued"], 3);
    rx.wait_for("the replay", |h| h.len() == 6).await;
    assert!(rx.counts().values().all(|n| *n == 2));
    let resp = app
        .as_(&admin, Method::POST, &format!("/api/v1/webhooks/{endpoint}/replay"))
        .json(&json!({ "since": since, "until": "2000-01-01T00:00:00Z" }))
        .send()
        .await
        .unwrap();
    assert_problem(resp, StatusCode::UNPROCESSABLE_ENTITY, "validation_failed").await;
    let resp = app
        .as_(&admin, Method::POST, &format!("/api/v1/webhooks/{endpoint}/replay"))
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    let problem = assert_problem(resp, StatusCode::UNPROCESSABLE_ENTITY, "validation_failed").await;
    assert_eq!(problem["errors"][0]["field"], "since");
}

#[tokio::test]
async fn internal_addresses_are_refused_at_creation_and_after_dns_at_delivery() {
    let app = spawn_app_with(&[("webhooks.poll_interval_ms", json!(50))]).await;
    let admin = app.bootstrap().await;
    let rx = Receiver::start().await;
    for (url, reason) in [
        (format!("http://localhost:{}/hook", rx.addr.port()), "loopback_address"),
        ("http://127.0.0.1/".into(), "loopback_address"),
        ("http://2130706433/".into(), "loopback_address"),
        ("http://[::1]/".into(), "loopback_address"),
        ("http://[::ffff:127.0.0.1]/".into(), "loopback_address"),
        ("http://10.0.0.1/".into(), "private_address"),
        ("http://192.168.1.1/".into(), "private_address"),
        ("http://172.20.0.1/".into(), "private_address"),
        ("http://169.254.169.254/latest/meta-data/".into(), "metadata_address"),
        ("http://169.254.1.1/".into(), "link_local_address"),
        ("http://100.64.1.1/".into(), "cgnat_address"),
        ("http://224.0.0.1/".into(), "multicast_address"),
        ("http://0.0.0.0/".into(), "unspecified_address"),
        ("http://[fe80::1]/".into(), "link_local_address"),
        ("http://no-such-host.invalid/".into(), "unresolvable_host"),
    ] {
        let resp = app
            .as_(&admin, Method::POST, "/api/v1/webhooks")
            .json(&json!({ "url": url, "event_types": ["*"] }))
            .send()
            .await
            .unwrap();
        let body = assert_problem(resp, StatusCode::UNPROCESSABLE_ENTITY, "url_refused").await;
        assert_eq!(body["errors"][0]["field"], "url", "{url}");
        assert_eq!(body["errors"][0]["code"], reason, "{url}: {body}");
    }
    // A name that passed once and resolves to loopback later (DNS rebinding) is refused at
    // delivery, after resolution: the receiver on 127.0.0.1 never hears of it.
    let id = uuid::Uuid::now_v7();
    let sealed = app.state.keys().seal(&format!("webhook_endpoint:{id}"), b"0123456789abcdef0123456789abcdef").unwrap();
    sqlx::query("insert into webhook_endpoint (webhook_endpoint_id, organization_id, url, event_types, secret_sealed) values ($1, $2, $3, '{*}', $4)")
        .bind(id)
        .bind(admin.org_id.parse::<uuid::Uuid>().unwrap())
        .bind(format!("http://localhost:{}/hook", rx.addr.port()))
        .bind(sealed)
        .execute(&app.db)
        .await
        .unwrap();
    let endpoint = id.to_string();
    send(&app, &admin, Method::POST, &format!("/api/v1/webhooks/{endpoint}/test"), None).await;
    let d = wait_delivery(&app, &admin, &endpoint, |d| d["attempts"] == 1).await;
    assert_eq!(d["attempt_log"][0]["error"], "refused: loopback_address", "{d}");
    assert!(d["attempt_log"][0]["status_code"].is_null());
    // And the IP literal the same.
    sqlx::query("update webhook_endpoint set url = $2 where webhook_endpoint_id = $1")
        .bind(id)
        .bind(format!("http://127.0.0.1:{}/hook", rx.addr.port()))
        .execute(&app.db)
        .await
        .unwrap();
    send(&app, &admin, Method::POST, &format!("/api/v1/webhooks/{endpoint}/test"), None).await;
    let d = wait_delivery(&app, &admin, &endpoint, |d| d["attempts"] == 1 && d["attempt_log"][0]["error"].is_string())
        .await;
    assert_eq!(d["attempt_log"][0]["error"], "refused: loopback_address", "{d}");
    assert!(rx.hits().is_empty());
}

#[tokio::test]
async fn bad_input_is_a_422_naming_the_field() {
    let app = webhook_app(&[]).await;
    let admin = app.bootstrap().await;
    let ok_url = "http://127.0.0.1:9/hook";
    let cases: Vec<(Value, &str, &str)> = vec![
        (json!({ "url": "example.com/hook", "event_types": ["*"] }), "url_refused", "malformed"),
        (json!({ "url": "file:///etc/passwd", "event_types": ["*"] }), "url_refused", "scheme_not_allowed"),
        (json!({ "url": "ftp://example.com/", "event_types": ["*"] }), "url_refused", "scheme_not_allowed"),
        (json!({ "url": "http://u:p@127.0.0.1/", "event_types": ["*"] }), "url_refused", "userinfo_not_allowed"),
        (
            json!({ "url": format!("http://127.0.0.1/{}", "a".repeat(10_240)), "event_types": ["*"] }),
            "url_refused",
            "too_long",
        ),
        (json!({ "url": "http://bücher.example/", "event_types": ["*"] }), "url_refused", "non_ascii_host"),
        (json!({ "url": ok_url, "event_types": ["agent.exploded"] }), "validation_failed", "unknown_event_type"),
        (
            json!({ "url": ok_url, "event_types": ["usage.nothing_happened"] }),
            "validation_failed",
            "unknown_event_type",
        ),
        (json!({ "url": ok_url, "event_types": [] }), "validation_failed", "length"),
        (
            json!({ "url": ok_url, "event_types": ["*"], "description": "x".repeat(5000) }),
            "validation_failed",
            "length",
        ),
    ];
    for (body, code, field_code) in cases {
        let resp = app.as_(&admin, Method::POST, "/api/v1/webhooks").json(&body).send().await.unwrap();
        let problem = assert_problem(resp, StatusCode::UNPROCESSABLE_ENTITY, code).await;
        assert_eq!(problem["errors"][0]["code"], field_code, "{problem}");
    }
    for body in [
        json!({ "event_types": ["*"] }),
        json!({ "url": ok_url, "event_types": "*" }),
        json!({ "url": ok_url, "event_types": ["*"], "x": 1 }),
    ] {
        let resp = app.as_(&admin, Method::POST, "/api/v1/webhooks").json(&body).send().await.unwrap();
        assert_problem(resp, StatusCode::UNPROCESSABLE_ENTITY, "invalid_body").await;
    }
    let (id, _) = create_endpoint(&app, &admin, ok_url, &["agent.*"]).await;
    let resp = app
        .as_(&admin, Method::PATCH, &format!("/api/v1/webhooks/{id}"))
        .json(&json!({ "url": "gopher://x/" }))
        .send()
        .await
        .unwrap();
    assert_problem(resp, StatusCode::UNPROCESSABLE_ENTITY, "url_refused").await;
    let resp =
        app.as_(&admin, Method::GET, &format!("/api/v1/webhooks/{id}/deliveries?status=lost")).send().await.unwrap();
    assert_problem(resp, StatusCode::BAD_REQUEST, "invalid_query").await;
    let resp = app.as_(&admin, Method::GET, "/api/v1/webhooks/not-a-uuid").send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn endpoints_belong_to_their_organization_and_to_its_owners_and_admins() {
    let app = webhook_app(&[]).await;
    let admin = app.bootstrap().await;
    let owner_b = app.org_with_owner(&admin, "Beta", "owner@beta.test").await;
    let rx = Receiver::start().await;
    let (id, _) = create_endpoint(&app, &admin, &rx.url(), &["webhook.test"]).await;
    send(&app, &admin, Method::POST, &format!("/api/v1/webhooks/{id}/test"), None).await;
    let d = wait_delivery(&app, &admin, &id, |d| d["status"] == "succeeded").await;
    let delivery = d["id"].as_str().unwrap().to_owned();

    let b = |m: Method, p: String| app.as_(&owner_b, m, &p).header("x-org-id", &owner_b.org_id);
    for req in [
        b(Method::GET, format!("/api/v1/webhooks/{id}")),
        b(Method::PATCH, format!("/api/v1/webhooks/{id}")).json(&json!({ "enabled": false })),
        b(Method::DELETE, format!("/api/v1/webhooks/{id}")),
        b(Method::POST, format!("/api/v1/webhooks/{id}/rotate-secret")),
        b(Method::POST, format!("/api/v1/webhooks/{id}/test")),
        b(Method::GET, format!("/api/v1/webhooks/{id}/deliveries")),
        b(Method::POST, format!("/api/v1/webhooks/{id}/replay")).json(&json!({ "since": "2020-01-01T00:00:00Z" })),
        b(Method::POST, format!("/api/v1/webhooks/{id}/replay")).json(&json!({})),
        b(Method::POST, format!("/api/v1/webhooks/deliveries/{delivery}/retry")),
    ] {
        assert_problem(req.send().await.unwrap(), StatusCode::NOT_FOUND, "not_found").await;
    }
    let listed = json_ok(b(Method::GET, "/api/v1/webhooks".into()).send().await.unwrap(), StatusCode::OK).await;
    assert_eq!(listed, json!([]));
    let dead =
        json_ok(b(Method::GET, "/api/v1/webhooks/dead-letters".into()).send().await.unwrap(), StatusCode::OK).await;
    assert_eq!(dead, json!([]));

    // A plain member may not manage webhooks; an API key without the scope may not either.
    app.add_member(&admin, &admin.org_id, "member@acme.test", "member").await;
    let member = app.sign_in("member@acme.test", crate::helpers::PASSWORD).await;
    let resp = app.as_(&member, Method::GET, "/api/v1/webhooks").send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    let key = app.api_key(&admin, Some(&["agents:read"])).await;
    let resp = app.as_(&key, Method::GET, "/api/v1/webhooks").send().await.unwrap();
    assert_problem(resp, StatusCode::FORBIDDEN, "insufficient_scope").await;
    let key = app.api_key(&admin, Some(&["webhooks:read"])).await;
    let listed = json_ok(app.as_(&key, Method::GET, "/api/v1/webhooks").send().await.unwrap(), StatusCode::OK).await;
    assert_eq!(listed.as_array().unwrap().len(), 1);
    let resp = app.as_(&key, Method::DELETE, &format!("/api/v1/webhooks/{id}")).send().await.unwrap();
    assert_problem(resp, StatusCode::FORBIDDEN, "insufficient_scope").await;
    // Deleting takes the deliveries with it.
    let resp = app.as_(&admin, Method::DELETE, &format!("/api/v1/webhooks/{id}")).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::NO_CONTENT);
    let resp = app.as_(&admin, Method::GET, &format!("/api/v1/webhooks/{id}")).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn readiness_and_metrics_show_the_dispatcher() {
    let app = webhook_app(&[]).await;
    let admin = app.bootstrap().await;
    let rx = Receiver::start().await;
    let (id, _) = create_endpoint(&app, &admin, &rx.url(), &["webhook.test"]).await;
    send(&app, &admin, Method::POST, &format!("/api/v1/webhooks/{id}/test"), None).await;
    rx.wait_for("the test event", |h| !h.is_empty()).await;
    let ready = json_ok(app.get("/ready").await, StatusCode::OK).await;
    assert_eq!(ready["webhook_dispatcher"]["status"], "running", "{ready}");
    let metrics = app.get("/metrics").await.text().await.unwrap();
    for name in ["webhook_attempts_total", "webhook_deliveries_total", "webhook_attempt_duration_seconds"] {
        assert!(metrics.contains(name), "{name} in /metrics");
    }
}

#[tokio::test]
async fn hangs_resets_and_redirects_are_failures_retried_never_followed() {
    let app = webhook_app(&[("webhooks.timeout_secs", json!(1)), ("webhooks.lease_secs", json!(5))]).await;
    let admin = app.bootstrap().await;
    // Hangs past the timeout.
    let hang = Receiver::start().await;
    hang.delay_ms.store(5_000, Ordering::Relaxed);
    // Redirects elsewhere.
    let target = Receiver::start().await;
    let redirect = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let redirect_url = format!("http://{}/hook", redirect.local_addr().unwrap());
    let location = target.url();
    tokio::spawn(async move {
        let router = axum::Router::new().route(
            "/hook",
            post(move || async move { (StatusCode::MOVED_PERMANENTLY, [("location", location)], "moved") }),
        );
        axum::serve(redirect, router).await.unwrap()
    });
    // Accepts and drops the connection.
    let reset = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let reset_url = format!("http://{}/hook", reset.local_addr().unwrap());
    tokio::spawn(async move {
        while let Ok((conn, _)) = reset.accept().await {
            drop(conn);
        }
    });
    for (url, check) in
        [(hang.url(), ("timeout", None)), (redirect_url, ("", Some(301))), (reset_url, ("request", None))]
    {
        let (id, _) = create_endpoint(&app, &admin, &url, &["webhook.test"]).await;
        send(&app, &admin, Method::POST, &format!("/api/v1/webhooks/{id}/test"), None).await;
        let d = wait_delivery(&app, &admin, &id, |d| d["attempts"] == 1).await;
        let a = &d["attempt_log"][0];
        assert_eq!(d["status"], "pending", "retried later: {d}");
        assert!(a["next_attempt_at"].is_string(), "{d}");
        match check {
            (_, Some(code)) => {
                assert_eq!(a["status_code"], code, "{d}");
                assert_eq!(a["response_body"], "moved");
            }
            (error, None) => assert_eq!(a["error"], error, "{d}"),
        }
    }
    assert!(target.hits().is_empty(), "a redirect is never followed");
}

#[tokio::test]
async fn the_dispatcher_waits_out_a_postgres_outage_and_resumes() {
    let (db_url, _) = crate::helpers::fresh_database().await;
    let upstream = db_url.split('@').nth(1).unwrap().split('/').next().unwrap().to_owned();
    let proxy = crate::helpers::proxy::Proxy::start(upstream.clone()).await;
    let via_proxy = db_url.replace(&upstream, &proxy.addr.to_string());
    let app = spawn_on(test_config(&via_proxy, &webhook_config()), None).await;
    let admin = app.bootstrap().await;
    let rx = Receiver::start().await;
    create_endpoint(&app, &admin, &rx.url(), &["agent.*"]).await;

    proxy.down().await;
    // Changes keep being committed elsewhere (another instance, with its own way to Postgres).
    let direct = sqlx::PgPool::connect(&db_url).await.unwrap();
    let org: uuid::Uuid = admin.org_id.parse().unwrap();
    let mut ids = HashSet::new();
    for i in 0..5 {
        let mut tx = direct.begin().await.unwrap();
        let data = json!({ "agent_id": uuid::Uuid::now_v7(), "name": format!("o{i}"), "status": "active" });
        ids.insert(agentidp::events::emit(&mut tx, org, "agent.created", "agents/x", data).await.unwrap().to_string());
        tx.commit().await.unwrap();
    }
    let mut failing = false;
    for _ in 0..100 {
        let ready: Value = app.get("/ready").await.json().await.unwrap();
        if ready["webhook_dispatcher"]["status"] == "failing" {
            failing = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(failing, "/ready tells the dispatcher cannot work");
    assert!(rx.hits().is_empty());

    proxy.up();
    rx.wait_for("the events committed during the outage", |h| {
        h.iter().map(|h| h.id.clone()).collect::<HashSet<_>>() == ids
    })
    .await;
}
