//! Usage metering: exactly-once counting over HTTP and a real NATS JetStream (before start-up,
//! twice, both ways, across a kill -9), aggregations equal to sums computed from the raw events,
//! prices, budgets with their webhooks, entitlements, the decision point's budget_exceeded, and
//! bad input.

use std::{
    collections::{BTreeMap, HashMap},
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use axum::{body::Bytes, extract::State, routing::post};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use time::OffsetDateTime;

use crate::helpers::{Caller, TestApp, assert_problem, json_ok, spawn_app_with, spawn_on, test_config};

fn nats_url() -> String {
    std::env::var("AGENTIDP_TEST_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into())
}

/// A NATS namespace of this test's own: subjects, stream and consumer no other run sees.
struct Ns {
    prefix: String,
    stream: String,
    consumer: String,
}

impl Ns {
    fn new() -> Self {
        let run = uuid::Uuid::new_v4().simple().to_string();
        Self { prefix: format!("t{run}"), stream: format!("U{run}"), consumer: format!("c{run}") }
    }

    fn config(&self) -> Vec<(&'static str, Value)> {
        vec![
            ("usage.nats.enabled", json!(true)),
            ("usage.nats.url", json!(nats_url())),
            ("usage.nats.subject_prefix", json!(self.prefix)),
            ("usage.nats.stream", json!(self.stream)),
            ("usage.nats.consumer", json!(self.consumer)),
            ("usage.nats.fetch_wait_ms", json!(50)),
        ]
    }

    fn subject(&self, kind: &str) -> String {
        let s = match kind {
            "llm" => "usage.llm",
            "tool" => "usage.tool",
            "agent" => "usage.agent",
            _ => "messaging.message.created",
        };
        format!("{}.{s}", self.prefix)
    }

    async fn publish(&self, events: &[Value]) {
        let nc = async_nats::connect(nats_url()).await.expect("NATS (is `make services` done?)");
        let js = async_nats::jetstream::new(nc);
        // Acknowledgements are awaited in chunks: the client holds only so many in flight.
        for chunk in events.chunks(256) {
            let mut acks = Vec::new();
            for e in chunk {
                let kind = e["kind"].as_str().unwrap_or("llm").to_owned();
                acks.push(js.publish(self.subject(&kind), serde_json::to_vec(e).unwrap().into()).await.unwrap());
            }
            for a in acks {
                a.await.expect("stored by JetStream");
            }
        }
    }

    async fn publish_raw(&self, subject: &str, payload: Vec<u8>) {
        let nc = async_nats::connect(nats_url()).await.unwrap();
        let js = async_nats::jetstream::new(nc);
        js.publish(subject.to_owned(), payload.into()).await.unwrap().await.unwrap();
    }

    async fn delete(&self) {
        if let Ok(nc) = async_nats::connect(nats_url()).await {
            let _ = async_nats::jetstream::new(nc).delete_stream(&self.stream).await;
        }
    }
}

fn now() -> OffsetDateTime {
    OffsetDateTime::now_utc()
}

fn rfc3339(t: OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339).unwrap()
}

fn llm(id: &str, org: &str, agent: Option<&str>, model: &str, prompt: i64, completion: i64, latency: i64) -> Value {
    json!({ "kind": "llm", "event_id": id, "timestamp": rfc3339(now()), "actor_id": "service:gateway",
            "actor_type": "service", "org_id": org, "agent_id": agent, "model": model, "provider": "openai",
            "prompt_tokens": prompt, "completion_tokens": completion, "latency_ms": latency,
            "success": latency < 5000 })
}

fn tool(id: &str, org: &str, agent: Option<&str>, name: &str, success: bool) -> Value {
    json!({ "kind": "tool", "event_id": id, "timestamp": rfc3339(now()), "actor_id": "service:gateway",
            "actor_type": "service", "microdao_id": org, "agent_id": agent, "tool_id": format!("{name}-id"),
            "tool_name": name, "success": success, "latency_ms": 40 })
}

fn agent_run(id: &str, org: &str, agent: Option<&str>, invocations: i64) -> Value {
    json!({ "kind": "agent", "event_id": id, "timestamp": rfc3339(now()), "actor_id": "service:gateway",
            "actor_type": "service", "org_id": org, "agent_id": agent, "invocations": invocations,
            "llm_calls": 2, "tool_calls": 1, "duration_ms": 1200 })
}

fn message(id: &str, org: &str, agent: Option<&str>, len: i64) -> Value {
    json!({ "kind": "message", "event_id": id, "timestamp": rfc3339(now()), "actor_id": "user:someone",
            "actor_type": "human", "org_id": org, "agent_id": agent, "channel_id": "general",
            "message_length": len, "sender": "someone" })
}

async fn post_events(app: &TestApp, by: &Caller, body: &Value) -> reqwest::Response {
    app.as_(by, Method::POST, "/api/v1/usage/events").json(body).send().await.unwrap()
}

async fn get(app: &TestApp, by: &Caller, path: &str) -> Value {
    json_ok(app.as_(by, Method::GET, path).send().await.unwrap(), StatusCode::OK).await
}

/// A service key of the caller's organization with the usage scopes.
async fn service_key(app: &TestApp, by: &Caller) -> Caller {
    let created = json_ok(
        app.as_(by, Method::POST, "/auth/api-keys")
            .header("x-org-id", &by.org_id)
            .json(&json!({ "description": "gateway", "service": true,
                           "scopes": ["usage:read", "usage:write", "usage:manage"] }))
            .send()
            .await
            .unwrap(),
        StatusCode::CREATED,
    )
    .await;
    Caller {
        token: created["key"].as_str().unwrap().to_owned(),
        org_id: by.org_id.clone(),
        user_id: by.user_id.clone(),
    }
}

/// An agent of the caller's organization; its id.
async fn agent(app: &TestApp, by: &Caller, name: &str) -> String {
    let a = app
        .create_agent(by, json!({ "name": name, "allowed_scopes": ["usage:read", "usage:write", "agents:read"] }))
        .await;
    a["id"].as_str().unwrap().to_owned()
}

/// Waits (bounded) until the org's summary counts `n` events of every kind together.
async fn wait_counted(app: &TestApp, org: &str, n: i64) -> i64 {
    let mut got = -1;
    for _ in 0..600 {
        got = sqlx::query_scalar::<_, i64>("select count(*) from usage_event where organization_id = $1::uuid")
            .bind(org)
            .fetch_one(&app.db)
            .await
            .unwrap();
        if got >= n {
            // Settle: anything more would arrive now.
            tokio::time::sleep(Duration::from_millis(300)).await;
            return sqlx::query_scalar::<_, i64>("select count(*) from usage_event where organization_id = $1::uuid")
                .bind(org)
                .fetch_one(&app.db)
                .await
                .unwrap();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    got
}

/// What the aggregations must say, computed from the events sent.
#[derive(Default, Debug)]
struct Expected {
    llm_calls: i64,
    llm_errors: i64,
    prompt: i64,
    completion: i64,
    tool_calls: i64,
    tool_ok: i64,
    invocations: i64,
    messages: i64,
    message_length: i64,
    by_model: BTreeMap<String, (i64, i64)>,
    by_tool: BTreeMap<String, (i64, i64)>,
    by_agent: BTreeMap<String, (i64, i64, i64, i64)>,
}

fn expect(events: &[Value], org: &str) -> Expected {
    let mut x = Expected::default();
    for e in events {
        let e_org = e.get("org_id").or_else(|| e.get("microdao_id")).and_then(Value::as_str).unwrap();
        if e_org != org {
            continue;
        }
        let agent = e["agent_id"].as_str().unwrap_or("none").to_owned();
        let a = x.by_agent.entry(agent).or_default();
        match e["kind"].as_str().unwrap() {
            "llm" => {
                let (p, c) = (e["prompt_tokens"].as_i64().unwrap(), e["completion_tokens"].as_i64().unwrap());
                x.llm_calls += 1;
                x.llm_errors += i64::from(e["success"] == false);
                x.prompt += p;
                x.completion += c;
                let m = x.by_model.entry(e["model"].as_str().unwrap().to_owned()).or_default();
                m.0 += 1;
                m.1 += p + c;
                a.0 += 1;
                a.1 += p + c;
            }
            "tool" => {
                x.tool_calls += 1;
                x.tool_ok += i64::from(e["success"] == true);
                let t = x.by_tool.entry(e["tool_name"].as_str().unwrap().to_owned()).or_default();
                t.0 += 1;
                t.1 += i64::from(e["success"] == true);
                a.2 += 1;
            }
            "agent" => {
                x.invocations += e["invocations"].as_i64().unwrap();
                a.3 += e["invocations"].as_i64().unwrap();
            }
            _ => {
                x.messages += 1;
                x.message_length += e["message_length"].as_i64().unwrap();
            }
        }
    }
    x
}

fn assert_summary(s: &Value, x: &Expected) {
    assert_eq!(s["llm"]["calls"], x.llm_calls, "{s}");
    assert_eq!(s["llm"]["errors"], x.llm_errors, "{s}");
    assert_eq!(s["llm"]["prompt_tokens"], x.prompt, "{s}");
    assert_eq!(s["llm"]["completion_tokens"], x.completion, "{s}");
    assert_eq!(s["llm"]["total_tokens"], x.prompt + x.completion, "{s}");
    assert_eq!(s["tools"]["calls"], x.tool_calls, "{s}");
    assert_eq!(s["tools"]["successes"], x.tool_ok, "{s}");
    assert_eq!(s["agents"]["invocations"], x.invocations, "{s}");
    assert_eq!(s["messages"]["count"], x.messages, "{s}");
    assert_eq!(s["messages"]["total_length"], x.message_length, "{s}");
    let models: BTreeMap<String, (i64, i64)> = s["by_model"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["model"].as_str().unwrap().to_owned(),
                (m["calls"].as_i64().unwrap(), m["total_tokens"].as_i64().unwrap()),
            )
        })
        .collect();
    assert_eq!(models, x.by_model);
    let tools: BTreeMap<String, (i64, i64)> = s["by_tool"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            (t["tool"].as_str().unwrap().to_owned(), (t["calls"].as_i64().unwrap(), t["successes"].as_i64().unwrap()))
        })
        .collect();
    assert_eq!(tools, x.by_tool);
    let agents: BTreeMap<String, (i64, i64, i64, i64)> = s["by_agent"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            (
                a["agent_id"].as_str().unwrap_or("none").to_owned(),
                (
                    a["llm_calls"].as_i64().unwrap(),
                    a["total_tokens"].as_i64().unwrap(),
                    a["tool_calls"].as_i64().unwrap(),
                    a["invocations"].as_i64().unwrap(),
                ),
            )
        })
        .collect();
    assert_eq!(agents, x.by_agent);
}

/// Mixed kinds, two organizations and three agents: the events of both orgs as one list.
async fn mixed(app: &TestApp, admin: &Caller) -> (Caller, Vec<Value>, String) {
    let other = app.org_with_owner(admin, "Other Co", "owner@other.test").await;
    let a1 = agent(app, admin, "a1").await;
    let a2 = agent(app, admin, "a2").await;
    let b1 = agent(app, &other, "b1").await;
    let org = admin.org_id.as_str();
    let o2 = other.org_id.as_str();
    let mut events = Vec::new();
    for i in 0..12 {
        let ag = if i % 3 == 0 {
            None
        } else if i % 3 == 1 {
            Some(a1.as_str())
        } else {
            Some(a2.as_str())
        };
        let model = ["gpt-4o", "gpt-4o-mini", "claude-sonnet-4"][i % 3];
        events.push(llm(&format!("l{i}"), org, ag, model, 100 + i as i64, 10 * i as i64, [30, 80, 300, 7000][i % 4]));
        events.push(tool(&format!("t{i}"), org, ag, ["search", "browse"][i % 2], i % 4 != 0));
        if i % 2 == 0 {
            events.push(agent_run(&format!("g{i}"), org, ag, 1 + i as i64));
            events.push(message(&format!("m{i}"), org, ag, 20 + i as i64));
        }
        events.push(llm(&format!("l{i}"), o2, Some(&b1), "gpt-4o", 1000, 1000, 50));
    }
    (other, events, a1)
}

#[tokio::test]
async fn http_ingest_counts_each_event_once_and_the_aggregations_equal_the_raw_sums() {
    let app = spawn_app_with(&[]).await;
    let admin = app.bootstrap().await;
    let (other, events, a1) = mixed(&app, &admin).await;
    let mine: Vec<Value> = events
        .iter()
        .filter(|e| e.get("org_id").or(e.get("microdao_id")).unwrap() == admin.org_id.as_str())
        .cloned()
        .collect();
    let theirs: Vec<Value> = events
        .iter()
        .filter(|e| e.get("org_id").or(e.get("microdao_id")).unwrap() == other.org_id.as_str())
        .cloned()
        .collect();
    let key = service_key(&app, &admin).await;
    let other_key = service_key(&app, &other).await;

    let first = json_ok(post_events(&app, &key, &json!(mine)).await, StatusCode::OK).await;
    assert_eq!(first["accepted"], mine.len(), "{first}");
    assert_eq!(first["duplicate"], 0);
    // The same batch again, as a retry would: nothing changes.
    let again = json_ok(post_events(&app, &key, &json!(mine)).await, StatusCode::OK).await;
    assert_eq!(
        (again["accepted"].as_u64(), again["duplicate"].as_u64()),
        (Some(0), Some(mine.len() as u64)),
        "{again}"
    );
    assert!(again["results"].as_array().unwrap().iter().all(|r| r["status"] == "duplicate"));
    // The other organization reuses the same event ids: its own, counted apart.
    let o = json_ok(post_events(&app, &other_key, &json!(theirs)).await, StatusCode::OK).await;
    assert_eq!(o["accepted"], theirs.len(), "{o}");

    let since = rfc3339(now() - time::Duration::hours(2));
    let s = get(&app, &admin, &format!("/api/v1/usage/summary?since={since}")).await;
    let x = expect(&events, &admin.org_id);
    assert_summary(&s, &x);
    // Priced by the configuration: cost is the sum of each call's own cost.
    let prices = HashMap::from([
        ("gpt-4o", (2_500_000i128, 10_000_000i128)),
        ("gpt-4o-mini", (150_000, 600_000)),
        ("claude-sonnet-4", (3_000_000, 15_000_000)),
    ]);
    let cost: i128 = mine
        .iter()
        .filter(|e| e["kind"] == "llm")
        .map(|e| {
            let (p, c) = prices[e["model"].as_str().unwrap()];
            (e["prompt_tokens"].as_i64().unwrap() as i128 * p
                + e["completion_tokens"].as_i64().unwrap() as i128 * c
                + 500_000)
                / 1_000_000
        })
        .sum();
    assert_eq!(s["llm"]["cost_micros"], cost as i64, "{s}");
    // Latencies 30, 80, 300 and 7000 ms, three of each: p95 is in the last bucket (≤ 10 s, capped at 7 s).
    assert_eq!(s["llm"]["latency_p95_ms"], 7000, "{s}");

    // The breakdown routes say the same as the summary.
    let models = get(&app, &admin, &format!("/api/v1/usage/models?since={since}")).await;
    assert_eq!(models["models"], s["by_model"]);
    assert_eq!(models["series"], json!([]), "no series without group_by");
    // By hour, each model's series adds up to its totals, oldest first, models by name.
    let hourly = get(&app, &admin, &format!("/api/v1/usage/models?since={since}&group_by=hour")).await;
    let series = hourly["series"].as_array().unwrap();
    let names: Vec<&str> = series.iter().map(|m| m["model"].as_str().unwrap()).collect();
    let listed: Vec<&str> = s["by_model"].as_array().unwrap().iter().map(|m| m["model"].as_str().unwrap()).collect();
    assert_eq!(names, listed);
    for (line, totals) in series.iter().zip(s["by_model"].as_array().unwrap()) {
        let points = line["points"].as_array().unwrap();
        assert!(!points.is_empty());
        for key in ["calls", "total_tokens", "prompt_tokens", "cost_micros"] {
            let sum: i64 = points.iter().map(|p| p[key].as_i64().unwrap()).sum();
            assert_eq!(sum, totals[key].as_i64().unwrap(), "{key} of {}", line["model"]);
        }
        let periods: Vec<&str> = points.iter().map(|p| p["period"].as_str().unwrap()).collect();
        assert!(periods.windows(2).all(|w| w[0] < w[1]), "{periods:?}");
    }
    let tools = get(&app, &admin, &format!("/api/v1/usage/tools?since={since}")).await;
    assert_eq!(tools["tools"], s["by_tool"]);
    let agents = get(&app, &admin, &format!("/api/v1/usage/agents?since={since}")).await;
    assert_eq!(agents["agents"], s["by_agent"]);
    // One agent's usage only, and a series by hour that adds up to the total.
    let one = get(&app, &admin, &format!("/api/v1/usage/summary?since={since}&agent_id={a1}&group_by=hour")).await;
    let a1_llm = mine.iter().filter(|e| e["kind"] == "llm" && e["agent_id"] == a1.as_str()).count();
    assert_eq!(one["llm"]["calls"], a1_llm);
    let series_calls: i64 = one["series"].as_array().unwrap().iter().map(|p| p["llm_calls"].as_i64().unwrap()).sum();
    assert_eq!(series_calls, a1_llm as i64);
    let by_day = get(&app, &admin, "/api/v1/usage/summary?group_by=day").await;
    assert_eq!(by_day["llm"]["calls"], x.llm_calls);

    // The original routes: a system admin for any organization, a service key for its own only.
    let internal =
        get(&app, &admin, &format!("/internal/usage/summary?microdao_id={}&period_hours=3", other.org_id)).await;
    assert_summary(&internal, &expect(&events, &other.org_id));
    let own = get(&app, &key, &format!("/internal/usage/tools?microdao_id={}&period_hours=3", admin.org_id)).await;
    assert_eq!(own["tools"], s["by_tool"]);
    for path in ["summary", "models", "agents", "tools"] {
        let resp = app
            .as_(&key, Method::GET, &format!("/internal/usage/{path}?microdao_id={}", other.org_id))
            .send()
            .await
            .unwrap();
        assert_problem(resp, StatusCode::NOT_FOUND, "not_found").await;
    }
    let resp = app
        .as_(&other, Method::GET, &format!("/internal/usage/summary?microdao_id={}", other.org_id))
        .send()
        .await
        .unwrap();
    assert_problem(resp, StatusCode::FORBIDDEN, "system_admin_required").await;
    // The other organization's owner sees only its own usage through the org-scoped routes.
    let theirs_summary = get(&app, &other, &format!("/api/v1/usage/summary?since={since}")).await;
    assert_eq!(theirs_summary["llm"]["calls"], theirs.len());
}

#[tokio::test]
async fn an_agent_reports_and_reads_only_for_itself() {
    let app = spawn_app_with(&[]).await;
    let admin = app.bootstrap().await;
    let other = app.org_with_owner(&admin, "Other Co", "owner@other.test").await;
    let stranger = agent(&app, &other, "stranger").await;
    let me = app.agent_client(&admin, &["usage:read", "usage:write", "agents:read"]).await;
    let sibling = agent(&app, &admin, "sibling").await;
    let token = app.access_token(&me).await;
    let bearer = Caller { token, org_id: admin.org_id.clone(), user_id: me.agent_id.clone() };
    let org = admin.org_id.as_str();

    // The body claims another actor and another agent: both are forced to the caller.
    let mut e = llm("a-1", org, Some(&sibling), "gpt-4o", 10, 5, 20);
    e["actor_id"] = json!("user:forged");
    let body = json_ok(post_events(&app, &bearer, &e).await, StatusCode::OK).await;
    assert_eq!(body["accepted"], 1, "{body}");
    let row: (String, String, uuid::Uuid) =
        sqlx::query_as("select actor_id, actor_type, agent_id from usage_event where event_id = 'a-1'")
            .fetch_one(&app.db)
            .await
            .unwrap();
    assert_eq!(row, (format!("agent:{}", me.agent_id), "agent".to_owned(), me.agent_id.parse().unwrap()));
    // Another organization in the body: rejected, never counted there.
    let resp = post_events(&app, &bearer, &llm("a-2", &other.org_id, None, "gpt-4o", 1, 1, 1)).await;
    let p = assert_problem(resp, StatusCode::UNPROCESSABLE_ENTITY, "usage_rejected").await;
    assert_eq!(p["errors"][0]["code"], "org_mismatch", "{p}");
    // An admin may not name another organization's agent either.
    let key = service_key(&app, &admin).await;
    let resp = post_events(&app, &key, &llm("a-3", org, Some(&stranger), "gpt-4o", 1, 1, 1)).await;
    let p = assert_problem(resp, StatusCode::UNPROCESSABLE_ENTITY, "usage_rejected").await;
    assert_eq!(p["errors"][0]["code"], "unknown_agent", "{p}");

    // It reads its own usage, not its sibling's, not the organization's.
    let own = get(&app, &bearer, "/api/v1/usage/summary").await;
    assert_eq!(own["agent_id"], me.agent_id.as_str());
    assert_eq!(own["llm"]["calls"], 1);
    let resp =
        app.as_(&bearer, Method::GET, &format!("/api/v1/usage/summary?agent_id={sibling}")).send().await.unwrap();
    assert_problem(resp, StatusCode::NOT_FOUND, "not_found").await;
    let resp = app
        .as_(&bearer, Method::POST, "/api/v1/usage/budgets")
        .json(&json!({ "token_limit": 5 }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    // A member who is not an admin reads nothing.
    app.add_member(&admin, org, "m@acme.test", "member").await;
    let member = app.sign_in("m@acme.test", crate::helpers::PASSWORD).await;
    let member = Caller { org_id: admin.org_id.clone(), ..member };
    let resp = app.as_(&member, Method::GET, "/api/v1/usage/summary").header("x-org-id", org).send().await.unwrap();
    assert_problem(resp, StatusCode::FORBIDDEN, "insufficient_role").await;
    // A key without the usage scopes reports nothing.
    let narrow = app.api_key(&admin, Some(&["agents:read"])).await;
    let resp = post_events(&app, &narrow, &llm("a-4", org, None, "gpt-4o", 1, 1, 1)).await;
    assert_problem(resp, StatusCode::FORBIDDEN, "insufficient_scope").await;
}

#[tokio::test]
async fn bad_events_are_rejected_with_a_reason_and_the_rest_of_the_batch_counts() {
    let app = spawn_app_with(&[("usage.http_batch_max", json!(20))]).await;
    let admin = app.bootstrap().await;
    let key = service_key(&app, &admin).await;
    let org = admin.org_id.as_str();
    let good = llm("ok-1", org, None, "gpt-4o", 10, 10, 10);
    let mut wrong_type = llm("bad-1", org, None, "gpt-4o", 1, 1, 1);
    wrong_type["prompt_tokens"] = json!("ten");
    let mut negative = llm("bad-2", org, None, "gpt-4o", 1, 1, 1);
    negative["completion_tokens"] = json!(-5);
    let mut absurd = llm("bad-3", org, None, "gpt-4o", 1, 1, 1);
    absurd["total_tokens"] = json!(9_007_199_254_740_993u64);
    let mut future = llm("bad-4", org, None, "gpt-4o", 1, 1, 1);
    future["timestamp"] = json!(rfc3339(now() + time::Duration::days(2)));
    let mut past = llm("bad-5", org, None, "gpt-4o", 1, 1, 1);
    past["timestamp"] = json!("1999-01-01T00:00:00Z");
    let mut unknown_kind = llm("bad-6", org, None, "gpt-4o", 1, 1, 1);
    unknown_kind["kind"] = json!("video");
    let mut bad_agent = llm("bad-7", org, None, "gpt-4o", 1, 1, 1);
    bad_agent["agent_id"] = json!(uuid::Uuid::new_v4());
    let no_id = json!({ "kind": "tool", "timestamp": rfc3339(now()), "actor_id": "x", "actor_type": "service", "tool_name": "t" });
    let batch = json!([good, wrong_type, negative, absurd, future, past, unknown_kind, bad_agent, no_id, 42]);
    let body = json_ok(post_events(&app, &key, &batch).await, StatusCode::OK).await;
    assert_eq!((body["accepted"].as_u64(), body["rejected"].as_u64()), (Some(1), Some(9)), "{body}");
    let codes: Vec<&str> =
        body["results"].as_array().unwrap().iter().map(|r| r["code"].as_str().unwrap_or("-")).collect();
    assert_eq!(
        codes,
        [
            "-",
            "invalid_field",
            "invalid_field",
            "invalid_field",
            "timestamp_out_of_window",
            "timestamp_out_of_window",
            "unknown_kind",
            "unknown_agent",
            "invalid_field",
            "invalid_event"
        ]
    );
    assert!(body["results"][1]["reason"].as_str().unwrap().starts_with("prompt_tokens"), "{body}");
    let stored: i64 = sqlx::query_scalar("select count(*) from usage_event").fetch_one(&app.db).await.unwrap();
    assert_eq!(stored, 1);

    // CloudEvents, one and a batch.
    let ce = json!({ "specversion": "1.0", "id": "ce-1", "type": "usage.tool", "source": "gw", "time": rfc3339(now()),
                     "data": { "org_id": org, "actor_id": "service:gw", "actor_type": "service", "tool_name": "search" } });
    let resp = app
        .as_(&key, Method::POST, "/api/v1/usage/events")
        .header("content-type", "application/cloudevents+json")
        .body(ce.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(json_ok(resp, StatusCode::OK).await["accepted"], 1);
    let resp = app
        .as_(&key, Method::POST, "/api/v1/usage/events")
        .header("content-type", "application/cloudevents-batch+json")
        .body(json!([ce]).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(json_ok(resp, StatusCode::OK).await["duplicate"], 1);
    let resp = app
        .as_(&key, Method::POST, "/api/v1/usage/events")
        .header("content-type", "application/cloudevents-batch+json")
        .body(ce.to_string())
        .send()
        .await
        .unwrap();
    assert_problem(resp, StatusCode::UNPROCESSABLE_ENTITY, "validation_failed").await;
    // Not JSON, not a JSON type, too many, too large, an empty batch.
    let resp = app
        .as_(&key, Method::POST, "/api/v1/usage/events")
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_problem(resp, StatusCode::BAD_REQUEST, "malformed_json").await;
    let resp = app
        .as_(&key, Method::POST, "/api/v1/usage/events")
        .header("content-type", "text/plain")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_problem(resp, StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type").await;
    let many: Vec<Value> = (0..21).map(|i| llm(&format!("n{i}"), org, None, "gpt-4o", 1, 1, 1)).collect();
    assert_problem(post_events(&app, &key, &json!(many)).await, StatusCode::UNPROCESSABLE_ENTITY, "batch_too_large")
        .await;
    let mut huge = llm("huge", org, None, "gpt-4o", 1, 1, 1);
    huge["error"] = json!("x".repeat(1_100_000));
    assert_eq!(post_events(&app, &key, &huge).await.status(), StatusCode::PAYLOAD_TOO_LARGE);
    let mut big = llm("big", org, None, "gpt-4o", 1, 1, 1);
    big["padding"] = json!("x".repeat(70_000));
    let p =
        assert_problem(post_events(&app, &key, &big).await, StatusCode::UNPROCESSABLE_ENTITY, "usage_rejected").await;
    assert_eq!(p["errors"][0]["code"], "too_large");
    assert_problem(post_events(&app, &key, &json!([])).await, StatusCode::UNPROCESSABLE_ENTITY, "validation_failed")
        .await;
    // Query parameters.
    for q in
        ["since=yesterday", "group_by=week", "since=2026-01-02T00:00:00Z&until=2026-01-01T00:00:00Z", "agent_id=nope"]
    {
        let resp = app.as_(&admin, Method::GET, &format!("/api/v1/usage/summary?{q}")).send().await.unwrap();
        assert_problem(resp, StatusCode::BAD_REQUEST, "invalid_query").await;
    }
}

#[tokio::test]
async fn nats_events_published_while_stopped_are_counted_once_and_bad_ones_are_kept() {
    let ns = Ns::new();
    let app = spawn_app_with(&ns.config()).await;
    let admin = app.bootstrap().await;
    let key = service_key(&app, &admin).await;
    let org = admin.org_id.clone();
    // The stream and consumer exist once it ran; then it stops.
    for _ in 0..100 {
        let nc = async_nats::connect(nats_url()).await.unwrap();
        if async_nats::jetstream::new(nc).get_stream(&ns.stream).await.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let db_url = app.db_url.clone();
    let mut app = app;
    app.begin_shutdown().await.unwrap().unwrap();

    // Published while no instance runs: each twice, and some sent over HTTP too.
    let events: Vec<Value> = (0..40)
        .map(|i| match i % 4 {
            0 => llm(&format!("n{i}"), &org, None, "gpt-4o", 100, 50, 20),
            1 => tool(&format!("n{i}"), &org, None, "search", true),
            2 => agent_run(&format!("n{i}"), &org, None, 1),
            _ => message(&format!("n{i}"), &org, None, 7),
        })
        .collect();
    ns.publish(&events).await;
    ns.publish(&events).await;
    // Bad messages: not UTF-8, not JSON, an unknown organization, an unknown kind's subject field, too large.
    ns.publish_raw(&ns.subject("llm"), vec![0xff, 0xfe, 0x00, 0x7b]).await;
    ns.publish_raw(&ns.subject("tool"), b"{\"event_id\":".to_vec()).await;
    ns.publish(&[llm("ghost", &uuid::Uuid::new_v4().to_string(), None, "gpt-4o", 1, 1, 1)]).await;
    let mut mismatched = tool("kind-mix", &org, None, "search", true);
    mismatched["kind"] = json!("llm");
    ns.publish_raw(&ns.subject("tool"), serde_json::to_vec(&mismatched).unwrap()).await;
    let mut big = llm("big", &org, None, "gpt-4o", 1, 1, 1);
    big["padding"] = json!("x".repeat(70_000));
    ns.publish_raw(&ns.subject("llm"), serde_json::to_vec(&big).unwrap()).await;

    // A new instance on the same database counts them when it starts.
    let cfg = test_config(&db_url, &ns.config());
    let app = spawn_on(cfg, None).await;
    assert_eq!(wait_counted(&app, &org, 40).await, 40, "each event once");
    let mut rejected: Vec<(String, i32)> = Vec::new();
    for _ in 0..200 {
        rejected = sqlx::query_as("select reason, payload_bytes from usage_rejected order by usage_rejected_id")
            .fetch_all(&app.db)
            .await
            .unwrap();
        if rejected.len() >= 5 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let reasons: Vec<&str> = rejected.iter().map(|(r, _)| r.split(':').next().unwrap()).collect();
    assert_eq!(reasons, ["invalid_json", "invalid_json", "unknown_org", "unknown_kind", "too_large"], "{rejected:?}");
    let raw: Vec<u8> = sqlx::query_scalar("select payload from usage_rejected order by usage_rejected_id limit 1")
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert_eq!(raw, vec![0xff, 0xfe, 0x00, 0x7b], "the payload is kept as it came");
    let big_kept: i64 =
        sqlx::query_scalar("select length(payload)::int8 from usage_rejected where reason like 'too_large%'")
            .fetch_one(&app.db)
            .await
            .unwrap();
    assert_eq!(big_kept, 4096, "capped at usage.rejected_payload_bytes");

    // The same events over HTTP now: duplicates; the summary counts each once.
    let again = json_ok(post_events(&app, &key, &json!(events[..10])).await, StatusCode::OK).await;
    assert_eq!(again["duplicate"], 10, "{again}");
    let s = get(&app, &admin, "/api/v1/usage/summary").await;
    assert_summary(&s, &expect(&events, &org));
    // Sent once each way in the other order: over HTTP first, then NATS.
    let fresh = vec![llm("both-1", &org, None, "gpt-4o", 5, 5, 5)];
    assert_eq!(json_ok(post_events(&app, &key, &json!(fresh)).await, StatusCode::OK).await["accepted"], 1);
    ns.publish(&fresh).await;
    ns.publish(&[llm("after", &org, None, "gpt-4o", 5, 5, 5)]).await;
    assert_eq!(wait_counted(&app, &org, 42).await, 42);
    ns.delete().await;
}

/// A rejected message delivered twice (its first delivery's acknowledgement came too late, so
/// JetStream gave it to the other instance too) is kept in `usage_rejected` once.
#[tokio::test]
async fn a_rejected_nats_message_delivered_twice_is_kept_once() {
    use sqlx::Connection;
    let ns = Ns::new();
    let mut cfg = ns.config();
    cfg.push(("usage.nats.ack_wait_secs", json!(1)));
    let a = spawn_app_with(&cfg).await;
    let b = spawn_on(test_config(&a.db_url, &cfg), None).await;
    for _ in 0..100 {
        let nc = async_nats::connect(nats_url()).await.unwrap();
        if async_nats::jetstream::new(nc).get_stream(&ns.stream).await.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Postgres holds the first instance's write of the rejection past the acknowledgement wait,
    // so that the message is delivered again, to whichever instance fetches next.
    let mut blocker = sqlx::PgConnection::connect(&a.db_url).await.unwrap();
    let mut lock = blocker.begin().await.unwrap();
    sqlx::query("lock table usage_rejected in exclusive mode").execute(&mut *lock).await.unwrap();
    ns.publish_raw(&ns.subject("llm"), b"not json at all".to_vec()).await;
    let waiting = || {
        sqlx::query_scalar::<_, i64>(
            "select count(*) from pg_stat_activity
             where wait_event_type = 'Lock' and query ilike 'insert into usage_rejected%'",
        )
        .fetch_one(&b.db)
    };
    let started = std::time::Instant::now();
    while waiting().await.unwrap() < 2 {
        assert!(started.elapsed() < Duration::from_secs(20), "the message was not delivered twice");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    lock.rollback().await.unwrap();
    let kept = || {
        sqlx::query_scalar::<_, i64>("select count(*) from usage_rejected where payload = 'not json at all'::bytea")
            .fetch_one(&a.db)
    };
    let started = std::time::Instant::now();
    while waiting().await.unwrap() > 0 {
        assert!(started.elapsed() < Duration::from_secs(10), "the writes of the rejection did not finish");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(kept().await.unwrap(), 1, "one message, kept once");
    drop(b);
    ns.delete().await;
}

#[tokio::test]
async fn a_kill_9_in_the_middle_of_nats_ingest_loses_nothing_and_doubles_nothing() {
    let ns = Ns::new();
    let app = spawn_app_with(&[]).await;
    let admin = app.bootstrap().await;
    let org = admin.org_id.clone();
    let n = 20000;
    let events: Vec<Value> = (0..n).map(|i| llm(&format!("k{i}"), &org, None, "gpt-4o-mini", 10, 10, 10)).collect();

    // Another process ingests in small batches and is killed mid-way.
    // Its log, at the default level, joins the run's (scanned for secrets by `make test`).
    let (_, log) = crate::helpers::test_log_file("usage-ingest");
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_agentidp"))
        .arg("serve")
        .env("AGENTIDP_DATABASE__URL", &app.db_url)
        .env("AGENTIDP_SERVER__BIND", "127.0.0.1:0")
        .env("AGENTIDP_REDIS__URL", crate::helpers::redis_url())
        .env("AGENTIDP_REDIS__KEY_PREFIX", format!("test:{}:", uuid::Uuid::new_v4().simple()))
        .env("AGENTIDP_USAGE__NATS__ENABLED", "true")
        .env("AGENTIDP_USAGE__NATS__URL", nats_url())
        .env("AGENTIDP_USAGE__NATS__SUBJECT_PREFIX", &ns.prefix)
        .env("AGENTIDP_USAGE__NATS__STREAM", &ns.stream)
        .env("AGENTIDP_USAGE__NATS__CONSUMER", &ns.consumer)
        .env("AGENTIDP_USAGE__NATS__BATCH_SIZE", "20")
        .env("AGENTIDP_USAGE__NATS__ACK_WAIT_SECS", "2")
        .env_remove("AGENTIDP_LOG__LEVEL")
        .env_remove("RUST_LOG")
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .expect("start agentidp serve");
    // The stream exists once the child connected.
    let nc = async_nats::connect(nats_url()).await.unwrap();
    let js = async_nats::jetstream::new(nc);
    for _ in 0..400 {
        if js.get_stream(&ns.stream).await.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    ns.publish(&events).await;
    let mut counted = 0i64;
    for _ in 0..600 {
        counted = sqlx::query_scalar("select count(*) from usage_event").fetch_one(&app.db).await.unwrap();
        if counted >= 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    child.kill().await.expect("SIGKILL");
    assert!(counted > 0 && counted < n as i64, "killed mid-way ({counted} of {n})");

    // Another instance takes over the durable consumer.
    let cfg = test_config(&app.db_url, &ns.config());
    let survivor = spawn_on(cfg, None).await;
    assert_eq!(wait_counted(&survivor, &org, n as i64).await, n as i64, "every event exactly once");
    let s = get(&survivor, &admin, "/api/v1/usage/summary").await;
    assert_eq!(s["llm"]["calls"], n);
    assert_eq!(s["llm"]["total_tokens"], 20 * n as i64);
    ns.delete().await;
}

/// A local webhook receiver that keeps every body.
#[derive(Clone)]
struct Receiver {
    addr: SocketAddr,
    bodies: Arc<Mutex<Vec<Value>>>,
}

impl Receiver {
    async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let r = Self { addr: listener.local_addr().unwrap(), bodies: Arc::new(Mutex::new(Vec::new())) };
        let router = axum::Router::new()
            .route(
                "/hook",
                post(|State(r): State<Receiver>, body: Bytes| async move {
                    r.bodies.lock().unwrap().push(serde_json::from_slice(&body).unwrap());
                    "ok"
                }),
            )
            .with_state(r.clone());
        tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
        r
    }

    fn types(&self) -> Vec<String> {
        self.bodies.lock().unwrap().iter().map(|b| b["type"].as_str().unwrap().to_owned()).collect()
    }

    async fn wait_for(&self, n: usize) -> Vec<Value> {
        for _ in 0..400 {
            if self.bodies.lock().unwrap().len() >= n {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.bodies.lock().unwrap().clone()
    }
}

#[tokio::test]
async fn budgets_notify_webhooks_once_per_period_and_deny_through_entitlements_and_policy() {
    let app =
        spawn_app_with(&[("webhooks.allow_private_networks", json!(true)), ("webhooks.poll_interval_ms", json!(100))])
            .await;
    let admin = app.bootstrap().await;
    let org = admin.org_id.clone();
    let rx = Receiver::start().await;
    json_ok(
        app.as_(&admin, Method::POST, "/api/v1/webhooks")
            .json(&json!({ "url": format!("http://{}/hook", rx.addr), "event_types": ["usage.*"] }))
            .send()
            .await
            .unwrap(),
        StatusCode::CREATED,
    )
    .await;
    let me = app.agent_client(&admin, &["usage:read", "usage:write", "agents:read"]).await;
    let bearer = Caller { token: app.access_token(&me).await, org_id: org.clone(), user_id: me.agent_id.clone() };
    let other_agent = agent(&app, &admin, "frugal").await;
    // The agent: 1000 tokens a month, a notice at 50 %. The organization: a cost limit far away.
    let budget = json_ok(
        app.as_(&admin, Method::POST, "/api/v1/usage/budgets")
            .json(&json!({ "agent_id": me.agent_id, "token_limit": 1000, "threshold_percent": 50 }))
            .send()
            .await
            .unwrap(),
        StatusCode::OK,
    )
    .await;
    json_ok(
        app.as_(&admin, Method::POST, "/api/v1/usage/budgets")
            .json(&json!({ "cost_limit_micros": 1_000_000_000 }))
            .send()
            .await
            .unwrap(),
        StatusCode::OK,
    )
    .await;
    let e = get(&app, &bearer, "/api/v1/usage/entitlements").await;
    assert_eq!((e["allowed"].as_bool(), e["tokens_remaining"].as_i64()), (Some(true), Some(1000)), "{e}");

    // An org policy that refuses agents past their budget.
    let policy = r#"@id("stop-spenders") @reason("budget_exceeded")
        forbid (principal is AgentIdP::Agent, action, resource is AgentIdP::Agent)
        when { context has budget_exceeded && context.budget_exceeded };"#;
    json_ok(
        app.as_(&admin, Method::POST, "/api/v1/policies/versions")
            .json(&json!({ "source": policy }))
            .send()
            .await
            .unwrap(),
        StatusCode::CREATED,
    )
    .await;
    json_ok(
        app.as_(&admin, Method::POST, "/api/v1/policies/versions/1/activate").send().await.unwrap(),
        StatusCode::OK,
    )
    .await;
    let own_record = format!("/api/v1/agents/{}", me.agent_id);
    assert_eq!(app.as_(&bearer, Method::GET, &own_record).send().await.unwrap().status(), StatusCode::OK);

    let spend = |id: &str, tokens: i64| llm(id, &org, None, "gpt-4o", tokens, 0, 10);
    json_ok(post_events(&app, &bearer, &spend("b1", 400)).await, StatusCode::OK).await;
    json_ok(post_events(&app, &bearer, &spend("b2", 200)).await, StatusCode::OK).await;
    let bodies = rx.wait_for(1).await;
    assert_eq!(rx.types(), ["usage.budget_threshold_reached"], "{bodies:?}");
    let data = &bodies[0]["data"];
    assert_eq!(data["budget_id"], budget["id"]);
    assert_eq!(data["scope"], format!("agent:{}", me.agent_id));
    assert_eq!(
        (data["metric"].as_str(), data["limit"].as_i64(), data["used"].as_i64()),
        (Some("tokens"), Some(1000), Some(600))
    );
    let e = get(&app, &bearer, "/api/v1/usage/entitlements").await;
    assert_eq!((e["allowed"].as_bool(), e["tokens_remaining"].as_i64()), (Some(true), Some(400)), "{e}");

    // Past the limit; then more spending and a retry, which notify nobody again.
    json_ok(post_events(&app, &bearer, &json!([spend("b3", 500), spend("b4", 300)])).await, StatusCode::OK).await;
    json_ok(post_events(&app, &bearer, &spend("b3", 500)).await, StatusCode::OK).await;
    rx.wait_for(2).await;
    let e = get(&app, &bearer, "/api/v1/usage/entitlements").await;
    assert_eq!((e["allowed"].as_bool(), e["tokens_remaining"].as_i64()), (Some(false), Some(0)), "{e}");
    let admin_view = get(&app, &admin, &format!("/api/v1/usage/entitlements?agent_id={}", me.agent_id)).await;
    assert_eq!(admin_view["allowed"], false);
    let frugal = get(&app, &admin, &format!("/api/v1/usage/entitlements?agent_id={other_agent}")).await;
    assert_eq!(frugal["allowed"], true, "another agent's budget is its own");
    // The decision point sees it.
    let resp = app.as_(&bearer, Method::GET, &own_record).send().await.unwrap();
    assert_problem(resp, StatusCode::FORBIDDEN, "budget_exceeded").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(rx.types(), ["usage.budget_threshold_reached", "usage.budget_exceeded"], "once each per period");
    let exceeded = &rx.wait_for(2).await[1]["data"];
    assert_eq!((exceeded["used"].as_i64(), exceeded["period"].as_str().map(str::len)), (Some(1400), Some(7)));

    // Another organization's agent and budget are not found.
    let other = app.org_with_owner(&admin, "Other Co", "owner@other.test").await;
    let resp = app
        .as_(&other, Method::GET, &format!("/api/v1/usage/entitlements?agent_id={}", me.agent_id))
        .send()
        .await
        .unwrap();
    assert_problem(resp, StatusCode::NOT_FOUND, "not_found").await;
    let resp = app
        .as_(&other, Method::DELETE, &format!("/api/v1/usage/budgets/{}", budget["id"].as_str().unwrap()))
        .send()
        .await
        .unwrap();
    assert_problem(resp, StatusCode::NOT_FOUND, "not_found").await;
    let resp = app
        .as_(&other, Method::POST, "/api/v1/usage/budgets")
        .json(&json!({ "agent_id": me.agent_id, "token_limit": 1 }))
        .send()
        .await
        .unwrap();
    assert_problem(resp, StatusCode::UNPROCESSABLE_ENTITY, "validation_failed").await;
    let resp = app
        .as_(&admin, Method::POST, "/api/v1/usage/budgets")
        .json(&json!({ "threshold_percent": 0 }))
        .send()
        .await
        .unwrap();
    let p = assert_problem(resp, StatusCode::UNPROCESSABLE_ENTITY, "validation_failed").await;
    assert_eq!(p["errors"].as_array().unwrap().len(), 2, "{p}");
}

#[tokio::test]
async fn a_price_change_applies_to_new_events_and_leaves_history_alone() {
    let app = spawn_app_with(&[]).await;
    let admin = app.bootstrap().await;
    let org = admin.org_id.clone();
    let key = service_key(&app, &admin).await;
    let set = |prompt: i64, completion: i64| {
        app.as_(&key, Method::POST, "/api/v1/usage/prices")
            .json(&json!({ "model": "acme/large-1", "prompt": prompt, "completion": completion }))
            .send()
    };
    json_ok(set(1_000_000, 2_000_000).await.unwrap(), StatusCode::OK).await;
    json_ok(
        post_events(&app, &key, &llm("p1", &org, None, "acme/large-1", 1_000_000, 1_000_000, 10)).await,
        StatusCode::OK,
    )
    .await;
    json_ok(set(10_000_000, 20_000_000).await.unwrap(), StatusCode::OK).await;
    json_ok(
        post_events(&app, &key, &llm("p2", &org, None, "acme/large-1", 1_000_000, 1_000_000, 10)).await,
        StatusCode::OK,
    )
    .await;
    let costs: Vec<i64> =
        sqlx::query_scalar("select cost_micros from usage_event order by event_id").fetch_all(&app.db).await.unwrap();
    assert_eq!(costs, [3_000_000, 30_000_000]);
    let models = get(&app, &admin, "/api/v1/usage/models").await;
    assert_eq!(models["models"][0]["cost_micros"], 33_000_000);
    let prices = get(&app, &admin, "/api/v1/usage/prices").await;
    let own: Vec<&Value> = prices.as_array().unwrap().iter().filter(|p| p["source"] == "organization").collect();
    assert_eq!(own.len(), 1);
    assert!(prices.as_array().unwrap().iter().any(|p| p["model"] == "gpt-4o" && p["source"] == "configuration"));
    // A model name with a slash is deleted by its escaped path.
    let resp = app.as_(&key, Method::DELETE, "/api/v1/usage/prices/acme%2Flarge-1").send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::NO_CONTENT);
    let resp = app.as_(&key, Method::DELETE, "/api/v1/usage/prices/acme%2Flarge-1").send().await.unwrap();
    assert_problem(resp, StatusCode::NOT_FOUND, "not_found").await;
    let p = assert_problem(set(-1, 0).await.unwrap(), StatusCode::UNPROCESSABLE_ENTITY, "validation_failed").await;
    assert_eq!(p["errors"][0]["field"], "prompt");
}

#[tokio::test]
async fn old_partitions_are_dropped_past_retention_with_their_keys() {
    let app = spawn_app_with(&[("usage.retention_months", json!(1))]).await;
    let admin = app.bootstrap().await;
    // An event of four months ago, written as if it had arrived then.
    let old = now() - time::Duration::days(120);
    let month = time::Date::from_calendar_date(old.year(), old.month(), 1).unwrap();
    sqlx::query("select usage_event_partition($1)").bind(month).execute(&app.db).await.unwrap();
    sqlx::query(
        "insert into usage_event (organization_id, event_id, kind, occurred_at, source, actor_id, actor_type)
                 values ($1::uuid, 'old', 'llm', $2, 'http', 'x', 'service')",
    )
    .bind(&admin.org_id)
    .bind(old)
    .execute(&app.db)
    .await
    .unwrap();
    sqlx::query("insert into usage_event_key values ($1::uuid, 'old', $2)")
        .bind(&admin.org_id)
        .bind(old)
        .execute(&app.db)
        .await
        .unwrap();
    let dropped = agentidp::usage::maintain_once(&app.state).await.unwrap();
    assert_eq!(dropped, [format!("usage_event_{:04}{:02}", month.year(), month.month() as u8)]);
    let keys: i64 = sqlx::query_scalar("select count(*) from usage_event_key").fetch_one(&app.db).await.unwrap();
    assert_eq!(keys, 0);
    // This month's partition stays and takes events.
    let key = service_key(&app, &admin).await;
    json_ok(post_events(&app, &key, &llm("new", &admin.org_id, None, "gpt-4o", 1, 1, 1)).await, StatusCode::OK).await;
}

/// Usage events that name a delegation draw its spend budget as they are counted: once per event
/// whatever the retries, and the event that uses it up ends the delegation (`spend_limit`) and
/// its tokens at once.
#[tokio::test]
async fn usage_events_draw_a_delegations_spend_budget_once_and_end_it_when_used_up() {
    let app = spawn_app_with(&[]).await;
    let admin = app.bootstrap().await;
    let client = app.agent_client(&admin, &["tools:read"]).await;
    let created = json_ok(
        app.as_(&admin, Method::POST, "/api/v1/delegations")
            .json(&json!({ "agent_id": client.agent_id, "scope": { "scopes": ["tools:read"], "max_tokens": 1000 } }))
            .send()
            .await
            .unwrap(),
        StatusCode::CREATED,
    )
    .await;
    let id = created["delegation_id"].as_str().unwrap().to_owned();
    let token = created["agent_token"].as_str().unwrap().to_owned();
    let gateway = service_key(&app, &admin).await;
    let spent = |model: &str, prompt: i64, n: &str| {
        let mut e = llm(n, &admin.org_id, Some(&client.agent_id), model, prompt, 100, 200);
        e["delegation_id"] = json!(id);
        e
    };

    // 600 tokens, posted twice (a retry): drawn once.
    for _ in 0..2 {
        let resp = post_events(&app, &gateway, &json!([spent("gpt-4o", 500, "d-1")])).await;
        assert!(resp.status().is_success(), "{}", resp.text().await.unwrap());
    }
    let d = get(&app, &admin, &format!("/api/v1/delegations/{id}")).await;
    assert_eq!((d["status"].as_str(), d["tokens_spent"].as_i64()), (Some("active"), Some(600)), "{d}");
    assert!(d["cost_spent"].as_i64().unwrap() > 0, "priced at ingest: {d}");
    assert_eq!(app.me_status(&token).await, StatusCode::OK);

    // 400 more: the budget is used up, the delegation ends and its token stops.
    let resp = post_events(&app, &gateway, &json!([spent("gpt-4o", 300, "d-2")])).await;
    assert!(resp.status().is_success());
    let d = get(&app, &admin, &format!("/api/v1/delegations/{id}")).await;
    assert_eq!((d["status"].as_str(), d["ended_reason"].as_str()), (Some("expired"), Some("spend_limit")), "{d}");
    assert_eq!(d["tokens_spent"], 1000);
    assert_eq!(app.me_status(&token).await, StatusCode::UNAUTHORIZED);
}

/// A range that ends inside a day reads that day from its daily rollup only when nothing of the day
/// lies past the range's end; otherwise from its hours. Either way the answer is the raw sums.
#[tokio::test]
async fn a_range_ending_inside_a_day_counts_only_what_lies_before_its_end() {
    let app = spawn_app_with(&[]).await;
    let admin = app.bootstrap().await;
    let key = service_key(&app, &admin).await;
    let (x, y) = (agent(&app, &admin, "tail-x").await, agent(&app, &admin, "tail-y").await);
    let day = now().replace_time(time::Time::MIDNIGHT) - time::Duration::days(3);
    let at = |id: &str, agent: &str, hours: i64, tokens: i64| {
        let mut e = llm(id, &admin.org_id, Some(agent), "gpt-4o", tokens, 0, 30);
        e["timestamp"] = json!(rfc3339(day + time::Duration::hours(hours) + time::Duration::minutes(7)));
        e
    };
    // The day before (d), the day itself at 02, 10 and 20 h (a, b by x; c by y), the day after (e).
    let events = json!([
        at("d", &x, -19, 1),
        at("a", &x, 2, 10),
        at("b", &x, 10, 100),
        at("c", &y, 20, 1000),
        at("e", &x, 27, 10000)
    ]);
    let posted = json_ok(post_events(&app, &key, &events).await, StatusCode::OK).await;
    assert_eq!(posted["accepted"], 5, "{posted}");
    let tokens = |s: &Value| s["llm"]["prompt_tokens"].as_i64().unwrap();
    let range = |until_hours: i64| {
        format!(
            "since={}&until={}",
            rfc3339(day - time::Duration::days(1)),
            rfc3339(day + time::Duration::hours(until_hours))
        )
    };
    // c lies past 12 h on that day: the day is read by the hour, without c.
    let s = get(&app, &admin, &format!("/api/v1/usage/summary?{}", range(12))).await;
    assert_eq!((s["llm"]["calls"].as_i64(), tokens(&s)), (Some(3), 111), "{s}");
    // Nothing past 22 h that day: its daily row, which holds a, b and c (and not e).
    let s = get(&app, &admin, &format!("/api/v1/usage/summary?{}", range(22))).await;
    assert_eq!((s["llm"]["calls"].as_i64(), tokens(&s)), (Some(4), 1111), "{s}");
    // One agent: only x's rows matter, and x has nothing past 12 h that day.
    let s = get(&app, &admin, &format!("/api/v1/usage/summary?{}&agent_id={x}", range(12))).await;
    assert_eq!((s["llm"]["calls"].as_i64(), tokens(&s)), (Some(3), 111), "{s}");
    let s = get(&app, &admin, &format!("/api/v1/usage/summary?{}&agent_id={y}", range(12))).await;
    assert_eq!(s["llm"]["calls"], 0, "{s}");
    // By day, the same split.
    let s = get(&app, &admin, &format!("/api/v1/usage/summary?{}&group_by=day", range(12))).await;
    let calls: Vec<i64> = s["series"].as_array().unwrap().iter().map(|p| p["llm_calls"].as_i64().unwrap()).collect();
    assert_eq!(calls, vec![1, 2], "{s}");
    let models = get(&app, &admin, &format!("/api/v1/usage/models?{}", range(22))).await;
    assert_eq!(models["models"][0]["calls"], 4, "{models}");
}
