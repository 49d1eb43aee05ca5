//! The city: zones and rooms, placement, presence, the live stream across instances, nodes and
//! the node guardian.

use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::helpers::{Caller, TestApp, assert_problem, json_ok, spawn_app_with, spawn_on, test_config};

/// Short lifetimes, so that lapses happen within a test without long sleeps.
fn fast() -> Vec<(&'static str, Value)> {
    vec![
        ("city.presence_ttl_secs", json!(1)),
        ("city.node_stale_secs", json!(1)),
        ("city.sweep_interval_ms", json!(50)),
    ]
}

async fn send(app: &TestApp, by: &Caller, method: Method, path: &str, body: Option<Value>) -> reqwest::Response {
    let mut req = app.as_(by, method, path).header("x-org-id", &by.org_id);
    if let Some(b) = body {
        req = req.json(&b);
    }
    req.send().await.unwrap()
}

async fn zone(app: &TestApp, by: &Caller, name: &str) -> String {
    let z = json_ok(
        send(app, by, Method::POST, "/api/v1/city/zones", Some(json!({ "name": name }))).await,
        StatusCode::CREATED,
    )
    .await;
    z["id"].as_str().unwrap().to_owned()
}

async fn room(
    app: &TestApp,
    by: &Caller,
    zone_id: &str,
    name: &str,
    (x, y, w, h): (i32, i32, i32, i32),
    capacity: i32,
) -> String {
    let body = json!({ "zone_id": zone_id, "name": name, "kind": "workspace", "capacity": capacity,
                       "x": x, "y": y, "width": w, "height": h });
    let r = json_ok(send(app, by, Method::POST, "/api/v1/city/rooms", Some(body)).await, StatusCode::CREATED).await;
    r["id"].as_str().unwrap().to_owned()
}

/// An agent that may report its presence, and its access token.
async fn reporting_agent(app: &TestApp, owner: &Caller, name: &str) -> (String, String) {
    let agent =
        app.create_agent(owner, json!({ "name": name, "allowed_scopes": ["presence:write", "agents:read"] })).await;
    let id = agent["id"].as_str().unwrap().to_owned();
    let client = app.credential(owner, &id).await;
    (id, app.access_token(&client).await)
}

async fn report(app: &TestApp, token: &str, status: &str) -> reqwest::Response {
    app.client
        .post(app.url("/api/v1/city/presence"))
        .bearer_auth(token)
        .json(&json!({ "status": status, "activity": "indexing" }))
        .send()
        .await
        .unwrap()
}

async fn get(app: &TestApp, by: &Caller, path: &str) -> Value {
    json_ok(send(app, by, Method::GET, path, None).await, StatusCode::OK).await
}

/// Polls `check` every 50 ms for up to 15 s.
async fn eventually<F: AsyncFn() -> bool>(what: &str, check: F) {
    for _ in 0..300 {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("never happened: {what}");
}

/// A Server-Sent Events reader.
struct Sse {
    chunks: tokio::sync::mpsc::Receiver<Vec<u8>>,
    buf: String,
}

#[derive(Debug, Clone)]
struct SseEvent {
    id: String,
    event: String,
    data: Value,
}

impl Sse {
    async fn open(app: &TestApp, by: &Caller, last_event_id: Option<&str>) -> Self {
        let mut req = app
            .client
            .get(app.url("/api/v1/city/presence/stream"))
            .bearer_auth(&by.token)
            .header("x-org-id", &by.org_id)
            .timeout(Duration::from_secs(600));
        if let Some(id) = last_event_id {
            req = req.header("last-event-id", id);
        }
        let resp = req.send().await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        assert!(resp.headers()["content-type"].to_str().unwrap().starts_with("text/event-stream"));
        let (tx, chunks) = tokio::sync::mpsc::channel(64);
        tokio::spawn(async move {
            let mut resp = resp;
            while let Ok(Some(chunk)) = resp.chunk().await {
                if tx.send(chunk.to_vec()).await.is_err() {
                    return;
                }
            }
        });
        Self { chunks, buf: String::new() }
    }

    /// The next event (comments and keep-alives skipped), or `None` after `wait`.
    async fn next_within(&mut self, wait: Duration) -> Option<SseEvent> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            while let Some(end) = self.buf.find("\n\n") {
                let block: String = self.buf.drain(..end + 2).collect();
                let (mut id, mut event, mut data) = (String::new(), String::from("message"), String::new());
                for line in block.lines() {
                    if let Some(v) = line.strip_prefix("id:") {
                        id = v.trim().to_owned();
                    } else if let Some(v) = line.strip_prefix("event:") {
                        event = v.trim().to_owned();
                    } else if let Some(v) = line.strip_prefix("data:") {
                        data.push_str(v.strip_prefix(' ').unwrap_or(v));
                    }
                }
                if !data.is_empty() {
                    return Some(SseEvent { id, event, data: serde_json::from_str(&data).unwrap() });
                }
            }
            let chunk = tokio::time::timeout_at(deadline, self.chunks.recv()).await.ok()??;
            self.buf.push_str(&String::from_utf8_lossy(&chunk));
        }
    }

    async fn next(&mut self) -> SseEvent {
        self.next_within(Duration::from_secs(15)).await.expect("an event within 15 s")
    }
}

fn status_of<'a>(list: &'a Value, agent: &str) -> &'a str {
    list["agents"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["id"] == agent)
        .map(|a| a["status"].as_str().unwrap())
        .unwrap_or("absent")
}

#[tokio::test]
async fn the_map_the_online_list_and_the_snapshot_agree_and_presence_lapses() {
    let app = spawn_app_with(&fast()).await;
    let admin = app.bootstrap().await;
    let owner = app.org_with_owner(&admin, "Alpha", "owner@alpha.test").await;
    let z = zone(&app, &owner, "Downtown").await;
    let lab = room(&app, &owner, &z, "Lab", (0, 0, 4, 3), 5).await;
    let lobby = room(&app, &owner, &z, "Lobby", (4, 0, 2, 2), 5).await;
    // Overlapping the lab: refused, naming the lab.
    let body =
        json!({ "zone_id": z, "name": "Annex", "kind": "lab", "capacity": 2, "x": 3, "y": 2, "width": 3, "height": 3 });
    let problem = assert_problem(
        send(&app, &owner, Method::POST, "/api/v1/city/rooms", Some(body)).await,
        StatusCode::UNPROCESSABLE_ENTITY,
        "room_overlap",
    )
    .await;
    assert!(problem["detail"].as_str().unwrap().contains("Lab"), "{problem}");
    assert!(problem["detail"].as_str().unwrap().contains(&lab), "{problem}");
    // Moving the lobby onto the lab: refused too.
    let moved =
        send(&app, &owner, Method::PATCH, &format!("/api/v1/city/rooms/{lobby}"), Some(json!({ "x": 2 }))).await;
    assert_problem(moved, StatusCode::UNPROCESSABLE_ENTITY, "room_overlap").await;

    let (a1, t1) = reporting_agent(&app, &owner, "alice").await;
    let (a2, t2) = reporting_agent(&app, &owner, "bob").await;
    let (a3, _t3) = reporting_agent(&app, &owner, "carol").await;
    for (a, r) in [(&a1, &lab), (&a2, &lab), (&a3, &lobby)] {
        let placed =
            send(&app, &owner, Method::PUT, &format!("/api/v1/agents/{a}/room"), Some(json!({ "room_id": r }))).await;
        let placed = json_ok(placed, StatusCode::OK).await;
        assert_eq!(placed["room_id"], json!(r));
    }
    assert_eq!(json_ok(report(&app, &t1, "online").await, StatusCode::OK).await["ttl_secs"], 1);
    json_ok(report(&app, &t2, "busy").await, StatusCode::OK).await;

    let map = get(&app, &owner, "/api/v1/city/map").await;
    let alias = get(&app, &owner, "/city/map").await;
    assert_eq!(map["zones"], alias["zones"]);
    let rooms = map["zones"][0]["rooms"].as_array().unwrap();
    let lab_room = rooms.iter().find(|r| r["id"] == json!(lab)).unwrap();
    assert_eq!((lab_room["x"].as_i64(), lab_room["width"].as_i64()), (Some(0), Some(4)));
    let in_lab: Vec<(&str, &str)> = lab_room["agents"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| (a["name"].as_str().unwrap(), a["status"].as_str().unwrap()))
        .collect();
    assert_eq!(in_lab, [("alice", "online"), ("bob", "busy")]);
    assert_eq!(map["online_count"], 2);

    let online = get(&app, &owner, "/api/v1/city/agents/online").await;
    let mut ids: Vec<&str> = online["agents"].as_array().unwrap().iter().map(|a| a["id"].as_str().unwrap()).collect();
    ids.sort();
    let mut expected = vec![a1.as_str(), a2.as_str()];
    expected.sort();
    assert_eq!(ids, expected);
    assert_eq!(get(&app, &owner, "/city/agents/online").await["agents"], online["agents"]);
    let all = get(&app, &owner, "/api/v1/city/agents").await;
    assert_eq!(status_of(&all, &a3), "offline");
    assert_eq!(all["agents"].as_array().unwrap().len(), 3);

    let snap = get(&app, &owner, "/api/v1/city/presence").await;
    assert_eq!(snap["online_count"], 2);
    let snap_lab = snap["rooms"].as_array().unwrap().iter().find(|r| r["id"] == json!(lab)).unwrap();
    assert_eq!(snap_lab["agent_ids"].as_array().unwrap().len(), 2);
    assert_eq!(status_of(&snap, &a2), "busy");

    // The heartbeats stop: offline by itself once the TTL lapses.
    eventually("the agents go offline", async || {
        get(&app, &owner, "/api/v1/city/agents/online").await["online_count"] == 0
    })
    .await;
    let snap = get(&app, &owner, "/api/v1/city/presence").await;
    assert_eq!((status_of(&snap, &a1), status_of(&snap, &a2)), ("offline", "offline"));
    // last_seen reached Postgres (coarsely), the presence itself never did.
    let seen: i64 = sqlx::query_scalar("select count(*) from agent_placement where last_seen_at is not null")
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert_eq!(seen, 2);
}

#[tokio::test]
async fn bad_input_is_refused_and_capacity_holds_under_concurrency() {
    let app = spawn_app_with(&fast()).await;
    let admin = app.bootstrap().await;
    let a = app.org_with_owner(&admin, "Alpha", "owner@alpha.test").await;
    let b = app.org_with_owner(&admin, "Beta", "owner@beta.test").await;
    let za = zone(&app, &a, "Alpha zone").await;
    let zb = zone(&app, &b, "Beta zone").await;
    let base =
        json!({ "zone_id": za, "name": "R", "kind": "lab", "capacity": 2, "x": 0, "y": 0, "width": 1, "height": 1 });
    for (field, value) in [
        ("x", json!(-1)),
        ("y", json!(10_001)),
        ("width", json!(0)),
        ("height", json!(1_000_000)),
        ("capacity", json!(0)),
        ("kind", json!("Not A Kind")),
    ] {
        let mut body = base.clone();
        body[field] = value;
        let resp = send(&app, &a, Method::POST, "/api/v1/city/rooms", Some(body)).await;
        let p = assert_problem(resp, StatusCode::UNPROCESSABLE_ENTITY, "validation_failed").await;
        assert_eq!(p["errors"][0]["field"], field, "{p}");
    }
    for value in [json!(1e12), json!("3"), json!(null)] {
        let mut body = base.clone();
        body["x"] = value;
        let resp = send(&app, &a, Method::POST, "/api/v1/city/rooms", Some(body)).await;
        assert_problem(resp, StatusCode::UNPROCESSABLE_ENTITY, "invalid_body").await;
    }
    // A room in another organization's zone.
    let mut body = base.clone();
    body["zone_id"] = json!(zb);
    let p = assert_problem(
        send(&app, &a, Method::POST, "/api/v1/city/rooms", Some(body)).await,
        StatusCode::UNPROCESSABLE_ENTITY,
        "validation_failed",
    )
    .await;
    assert_eq!(p["errors"][0]["field"], "zone_id");
    // Placing another organization's agent, or into another organization's room.
    let rb = room(&app, &b, &zb, "Beta room", (0, 0, 2, 2), 5).await;
    let ra = room(&app, &a, &za, "Alpha room", (0, 0, 2, 2), 3).await;
    let b_agent = app.create_agent(&b, json!({ "name": "theirs" })).await;
    let b_agent = b_agent["id"].as_str().unwrap();
    let resp =
        send(&app, &a, Method::PUT, &format!("/api/v1/agents/{b_agent}/room"), Some(json!({ "room_id": ra }))).await;
    assert_problem(resp, StatusCode::NOT_FOUND, "not_found").await;
    let resp = send(&app, &a, Method::DELETE, &format!("/api/v1/agents/{b_agent}/room"), None).await;
    assert_problem(resp, StatusCode::NOT_FOUND, "not_found").await;
    let mine = app.create_agent(&a, json!({ "name": "mine" })).await;
    let mine = mine["id"].as_str().unwrap().to_owned();
    let resp =
        send(&app, &a, Method::PUT, &format!("/api/v1/agents/{mine}/room"), Some(json!({ "room_id": rb }))).await;
    assert_problem(resp, StatusCode::UNPROCESSABLE_ENTITY, "validation_failed").await;
    let resp =
        send(&app, &a, Method::PUT, &format!("/api/v1/agents/{mine}/node"), Some(json!({ "node_id": rb }))).await;
    assert_problem(resp, StatusCode::UNPROCESSABLE_ENTITY, "validation_failed").await;

    // Ten agents placed at once into a room for three: exactly three get in.
    let mut agents = Vec::new();
    for i in 0..10 {
        let ag = app.create_agent(&a, json!({ "name": format!("worker {i}") })).await;
        agents.push(ag["id"].as_str().unwrap().to_owned());
    }
    let placing =
        agents.iter().map(|id| {
            let (app, a, ra) = (&app, &a, &ra);
            async move {
                send(app, a, Method::PUT, &format!("/api/v1/agents/{id}/room"), Some(json!({ "room_id": ra }))).await
            }
        });
    let results = futures_util::future::join_all(placing).await;
    let placed = results.iter().filter(|r| r.status() == StatusCode::OK).count();
    let full = results.iter().filter(|r| r.status() == StatusCode::CONFLICT).count();
    assert_eq!((placed, full), (3, 7));
    let n: i64 = sqlx::query_scalar("select count(*) from agent_placement where room_id = $1::uuid")
        .bind(&ra)
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert_eq!(n, 3);
    // A member reads the map but does not edit it.
    app.add_member(&a, &a.org_id, "member@alpha.test", "member").await;
    let mut member = app.sign_in("member@alpha.test", crate::helpers::PASSWORD).await;
    member.org_id = a.org_id.clone();
    get(&app, &member, "/api/v1/city/map").await;
    let resp = send(&app, &member, Method::POST, "/api/v1/city/zones", Some(json!({ "name": "Mine" }))).await;
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    // Only an agent reports presence.
    let resp = send(&app, &member, Method::POST, "/api/v1/city/presence", Some(json!({ "status": "online" }))).await;
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
}

#[tokio::test]
async fn a_presence_flood_is_rate_limited_not_written() {
    // 200 at once share a pool of 16 Redis connections: on a loaded machine the wait for one can
    // pass the default 500 ms (a 503), which is not what this test is about.
    let app = spawn_app_with(&[("city.presence_reports_per_sec", json!(5)), ("redis.timeout_ms", json!(10_000))]).await;
    let admin = app.bootstrap().await;
    let owner = app.org_with_owner(&admin, "Alpha", "owner@alpha.test").await;
    let (_, token) = reporting_agent(&app, &owner, "chatty").await;
    let flood = (0..200).map(|i| {
        app.client
            .post(app.url("/api/v1/city/presence"))
            .bearer_auth(&token)
            .json(&json!({ "status": "online", "activity": format!("step {i}") }))
            .send()
    });
    let results: Vec<_> = futures_util::future::join_all(flood).await.into_iter().map(|r| r.unwrap()).collect();
    let ok = results.iter().filter(|r| r.status() == StatusCode::OK).count();
    let limited = results.iter().filter(|r| r.status() == StatusCode::TOO_MANY_REQUESTS).count();
    let others: Vec<u16> = results.iter().map(|r| r.status().as_u16()).filter(|s| *s != 200 && *s != 429).collect();
    assert_eq!(ok + limited, 200, "answers other than 200 and 429: {others:?}");
    assert!(ok <= 15, "{ok} of 200 written");
    assert!(limited >= 185, "{limited}");
    let refused = results.into_iter().find(|r| r.status() == StatusCode::TOO_MANY_REQUESTS).unwrap();
    assert!(refused.headers().contains_key("retry-after"));
    assert_problem(refused, StatusCode::TOO_MANY_REQUESTS, "presence_rate_limited").await;
    // Malformed reports.
    for body in [
        json!({ "status": "asleep" }),
        json!({ "status": "online", "activity": "x".repeat(201) }),
        json!({ "status": "online", "extra": 1 }),
    ] {
        let resp =
            app.client.post(app.url("/api/v1/city/presence")).bearer_auth(&token).json(&body).send().await.unwrap();
        assert_eq!(resp.status(), StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    }
}

#[tokio::test]
async fn a_stream_on_one_instance_sees_changes_made_on_another_and_resumes_without_a_gap() {
    let a = spawn_app_with(&fast()).await;
    let prefix = a.redis.prefix().to_owned();
    let b = spawn_on(test_config(&a.db_url, &fast()), Some(prefix)).await;
    let admin = a.bootstrap().await;
    let owner = a.org_with_owner(&admin, "Alpha", "owner@alpha.test").await;
    let z = zone(&a, &owner, "Z").await;
    let r1 = room(&a, &owner, &z, "One", (0, 0, 2, 2), 10).await;
    let r2 = room(&a, &owner, &z, "Two", (2, 0, 2, 2), 10).await;
    let (x, tx) = reporting_agent(&a, &owner, "xavier").await;
    let (y, ty) = reporting_agent(&a, &owner, "yvonne").await;

    let mut stream = Sse::open(&a, &owner, None).await;
    let snap = stream.next().await;
    assert_eq!(snap.event, "snapshot");
    assert_eq!(snap.data["agents"].as_array().unwrap().len(), 2);
    assert_eq!(snap.data["online_count"], 0);

    // A change made through instance B reaches the viewer on A.
    json_ok(report(&b, &tx, "online").await, StatusCode::OK).await;
    let e = stream.next().await;
    assert_eq!(
        (e.event.as_str(), e.data["agent_id"].as_str(), e.data["status"].as_str()),
        ("presence", Some(x.as_str()), Some("online"))
    );
    let seen = e.id.clone();
    drop(stream);

    // While disconnected: three changes, through B.
    json_ok(report(&b, &ty, "busy").await, StatusCode::OK).await;
    json_ok(
        send(&b, &owner, Method::PUT, &format!("/api/v1/agents/{x}/room"), Some(json!({ "room_id": r1 }))).await,
        StatusCode::OK,
    )
    .await;
    json_ok(
        send(&b, &owner, Method::PUT, &format!("/api/v1/agents/{x}/room"), Some(json!({ "room_id": r2 }))).await,
        StatusCode::OK,
    )
    .await;

    // Resuming on A: exactly what was missed, in order, and then live changes.
    let mut stream = Sse::open(&a, &owner, Some(&seen)).await;
    let missed = [stream.next().await, stream.next().await, stream.next().await];
    assert_eq!(missed[0].event, "presence");
    assert_eq!(
        (missed[0].data["agent_id"].as_str(), missed[0].data["status"].as_str()),
        (Some(y.as_str()), Some("busy"))
    );
    assert_eq!(missed[1].event, "moved");
    assert_eq!(
        (missed[1].data["room_id"].as_str(), missed[1].data["from_room_id"].clone()),
        (Some(r1.as_str()), Value::Null)
    );
    assert_eq!(missed[2].event, "moved");
    assert_eq!(
        (missed[2].data["room_id"].as_str(), missed[2].data["from_room_id"].as_str()),
        (Some(r2.as_str()), Some(r1.as_str()))
    );
    assert!(seen < missed[0].id && missed[0].id < missed[1].id && missed[1].id < missed[2].id, "{missed:?}");
    // The heartbeats stopped: the lapses arrive live (announced once, by whichever instance).
    let mut lapsed = Vec::new();
    while lapsed.len() < 2 {
        let e = stream.next().await;
        assert_eq!(e.event, "presence", "{e:?}");
        assert_eq!(e.data["status"], "offline");
        lapsed.push(e.data["agent_id"].as_str().unwrap().to_owned());
    }
    lapsed.sort();
    let mut expected = vec![x.clone(), y.clone()];
    expected.sort();
    assert_eq!(lapsed, expected);
    assert!(stream.next_within(Duration::from_millis(500)).await.is_none(), "each lapse is announced once");

    // A resumption from further back than the window keeps: a fresh snapshot instead.
    let mut stream = Sse::open(&a, &owner, Some("1-0")).await;
    assert_eq!(stream.next().await.event, "snapshot");
}

/// The presence hash of an agent: its last written report time and its remaining lifetime (ms).
async fn stored_presence(app: &TestApp, org_id: &str, agent_id: &str) -> (Option<i64>, i64) {
    let mut conn = app.redis.multiplexed().await.unwrap();
    let key = app.redis.key(&format!("city:p:{org_id}:{agent_id}"));
    let at: Option<i64> = deadpool_redis::redis::cmd("HGET").arg(&key).arg("t").query_async(&mut conn).await.unwrap();
    let ttl: i64 = deadpool_redis::redis::cmd("PTTL").arg(&key).query_async(&mut conn).await.unwrap();
    (at, ttl)
}

#[tokio::test]
async fn repeated_reports_are_folded_until_a_change_made_through_another_instance_arrives() {
    let cfg = [
        ("city.presence_ttl_secs", json!(60)),
        ("city.presence_fold_ms", json!(10_000)),
        ("city.presence_reports_per_sec", json!(1000)),
    ];
    let a = spawn_app_with(&cfg).await;
    let b = spawn_on(test_config(&a.db_url, &cfg), Some(a.redis.prefix().to_owned())).await;
    let admin = a.bootstrap().await;
    let owner = a.org_with_owner(&admin, "Alpha", "owner@alpha.test").await;
    let (x, tx) = reporting_agent(&a, &owner, "xavier").await;
    let mut stream = Sse::open(&a, &owner, None).await;
    assert_eq!(stream.next().await.event, "snapshot");

    json_ok(report(&a, &tx, "online").await, StatusCode::OK).await;
    assert_eq!(stream.next().await.data["status"], "online");
    // A's subscriber has seen that change (it reached A's viewer), which ends any fold: the
    // first repeat is written, as an unchanged report (nothing announced).
    json_ok(report(&a, &tx, "online").await, StatusCode::OK).await;
    let (written, ttl) = stored_presence(&a, &owner.org_id, &x).await;
    assert!(written.is_some());
    // The lifetime covers the TTL plus the fold window.
    assert!((60_000..=70_000).contains(&ttl), "{ttl}");
    // Further repeats through A within the window: answered, not written again, nothing announced.
    for _ in 0..5 {
        let r = json_ok(report(&a, &tx, "online").await, StatusCode::OK).await;
        assert_eq!((r["status"].as_str(), r["ttl_secs"].as_u64()), (Some("online"), Some(60)));
    }
    assert_eq!(stored_presence(&a, &owner.org_id, &x).await.0, written);

    // A change through B reaches A's viewer (so A's subscriber has seen it) ...
    json_ok(report(&b, &tx, "busy").await, StatusCode::OK).await;
    assert_eq!(stream.next().await.data["status"], "busy");
    // ... and ends A's fold: the agent's next report through A is written and announced.
    json_ok(report(&a, &tx, "online").await, StatusCode::OK).await;
    let e = stream.next().await;
    assert_eq!((e.data["agent_id"].as_str(), e.data["status"].as_str()), (Some(x.as_str()), Some("online")));
    assert_eq!(status_of(&get(&a, &owner, "/api/v1/city/presence").await, &x), "online");
    assert_eq!(status_of(&get(&b, &owner, "/api/v1/city/presence").await, &x), "online");
    // A different activity is a change, never folded.
    let r = a
        .client
        .post(a.url("/api/v1/city/presence"))
        .bearer_auth(&tx)
        .json(&json!({ "status": "online", "activity": "reviewing" }))
        .send()
        .await
        .unwrap();
    json_ok(r, StatusCode::OK).await;
    assert_eq!(stream.next().await.data["activity"], "reviewing");
    assert!(stream.next_within(Duration::from_millis(300)).await.is_none(), "each change announced once");
}

#[tokio::test]
async fn the_stream_of_one_organization_never_shows_another_and_suspended_agents_vanish() {
    let app = spawn_app_with(&fast()).await;
    let admin = app.bootstrap().await;
    let a = app.org_with_owner(&admin, "Alpha", "owner@alpha.test").await;
    let b = app.org_with_owner(&admin, "Beta", "owner@beta.test").await;
    let (a_agent, a_token) = reporting_agent(&app, &a, "alpha agent").await;
    let (b_agent, b_token) = reporting_agent(&app, &b, "beta agent").await;
    let mut b_stream = Sse::open(&app, &b, None).await;
    let snap = b_stream.next().await;
    assert!(!snap.data.to_string().contains(&a_agent));
    let mut a_stream = Sse::open(&app, &a, None).await;
    a_stream.next().await;
    json_ok(report(&app, &a_token, "online").await, StatusCode::OK).await;
    json_ok(report(&app, &b_token, "idle").await, StatusCode::OK).await;
    // B's viewer: B's change, and never A's.
    let e = b_stream.next().await;
    assert_eq!(e.data["agent_id"], json!(b_agent));
    assert!(b_stream.next_within(Duration::from_millis(300)).await.is_none());
    // Org B's API key cannot open org A's stream.
    let b_key = app.api_key(&b, None).await;
    let resp = app
        .client
        .get(app.url("/api/v1/city/presence/stream"))
        .header("x-api-key", &b_key.token)
        .header("x-org-id", &a.org_id)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    // A's own change reached A's viewer; suspending the agent removes it at once.
    assert_eq!(a_stream.next().await.data["status"], "online");
    // Report again so the lapse cannot be what removes it.
    let suspend =
        send(&app, &a, Method::PATCH, &format!("/api/v1/agents/{a_agent}"), Some(json!({ "status": "suspended" })))
            .await;
    json_ok(suspend, StatusCode::OK).await;
    let e = a_stream.next().await;
    assert_eq!(
        (e.data["agent_id"].as_str(), e.data["status"].as_str(), e.data["reason"].as_str()),
        (Some(a_agent.as_str()), Some("offline"), Some("suspended"))
    );
    let all = get(&app, &a, "/api/v1/city/agents").await;
    assert_eq!(status_of(&all, &a_agent), "absent");
    // Its token no longer reports.
    assert_eq!(report(&app, &a_token, "online").await.status(), StatusCode::UNAUTHORIZED);
    // A deleted agent too.
    let (c_agent, c_token) = reporting_agent(&app, &a, "gamma").await;
    json_ok(report(&app, &c_token, "online").await, StatusCode::OK).await;
    assert_eq!(a_stream.next().await.data["agent_id"], json!(c_agent));
    assert_eq!(
        send(&app, &a, Method::DELETE, &format!("/api/v1/agents/{c_agent}"), None).await.status(),
        StatusCode::NO_CONTENT
    );
    let e = a_stream.next().await;
    assert_eq!((e.data["agent_id"].as_str(), e.data["reason"].as_str()), (Some(c_agent.as_str()), Some("deleted")));
    assert_eq!(get(&app, &a, "/api/v1/city/agents/online").await["online_count"], 0);
}

async fn create_node(app: &TestApp, by: &Caller, name: &str) -> (String, String) {
    let body = json!({ "name": name, "hostname": format!("{name}.local"), "labels": { "site": "lab" } });
    let created = json_ok(send(app, by, Method::POST, "/api/v1/nodes", Some(body)).await, StatusCode::CREATED).await;
    let cred = created["credential"].as_str().unwrap().to_owned();
    assert!(cred.starts_with("aidp_node_"));
    (created["id"].as_str().unwrap().to_owned(), cred)
}

fn beat() -> Value {
    json!({
        "metrics": { "cpu_percent": 12.5, "cpu_count": 8, "load_1": 0.5, "load_5": 0.4, "load_15": 0.3,
                     "memory_total_bytes": 16_000_000_000u64, "memory_used_bytes": 4_000_000_000u64,
                     "disk_total_bytes": 500_000_000_000u64, "disk_used_bytes": 100_000_000_000u64 },
        "models": [{ "name": "llama-3-8b.gguf", "size_bytes": 4_900_000_000u64, "loaded": true }],
    })
}

async fn heartbeat(app: &TestApp, node: &str, cred: &str, body: &Value) -> reqwest::Response {
    app.client
        .post(app.url(&format!("/api/v1/nodes/{node}/heartbeat")))
        .bearer_auth(cred)
        .json(body)
        .send()
        .await
        .unwrap()
}

async fn events_of(app: &TestApp, kind: &str) -> i64 {
    sqlx::query_scalar("select count(*) from event_outbox where type = $1").bind(kind).fetch_one(&app.db).await.unwrap()
}

#[tokio::test]
async fn nodes_heartbeat_with_their_own_credential_and_go_stale_once() {
    let a = spawn_app_with(&fast()).await;
    let b = spawn_on(test_config(&a.db_url, &fast()), Some(a.redis.prefix().to_owned())).await;
    let admin = a.bootstrap().await;
    let owner = a.org_with_owner(&admin, "Alpha", "owner@alpha.test").await;
    let other = a.org_with_owner(&admin, "Beta", "owner@beta.test").await;
    let (n1, c1) = create_node(&a, &owner, "laptop").await;
    let (n2, c2) = create_node(&a, &owner, "desktop").await;
    let (nb, _) = create_node(&a, &other, "theirs").await;
    let shown = get(&a, &owner, &format!("/api/v1/nodes/{n1}")).await;
    assert_eq!(shown["status"], "new");
    assert!(shown.get("credential").is_none() && !shown.to_string().contains(&c1));
    let hash: Vec<u8> = sqlx::query_scalar("select credential_hash from node where node_id = $1::uuid")
        .bind(&n1)
        .fetch_one(&a.db)
        .await
        .unwrap();
    assert_eq!(hash.len(), 32);

    // Four agents on the laptop.
    let mut tokens = Vec::new();
    for i in 0..4 {
        let (id, t) = reporting_agent(&a, &owner, &format!("agent {i}")).await;
        json_ok(
            send(&a, &owner, Method::PUT, &format!("/api/v1/agents/{id}/node"), Some(json!({ "node_id": n1 }))).await,
            StatusCode::OK,
        )
        .await;
        tokens.push(t);
    }
    json_ok(report(&a, &tokens[0], "online").await, StatusCode::OK).await;

    // Someone else's heartbeats: refused, as if the node did not exist (another organization's
    // node above all: its existence must not leak).
    assert_problem(heartbeat(&a, &n1, &c2, &beat()).await, StatusCode::NOT_FOUND, "not_found").await;
    assert_problem(heartbeat(&a, &nb, &c1, &beat()).await, StatusCode::NOT_FOUND, "not_found").await;
    assert_eq!(heartbeat(&a, &n1, "aidp_node_made-up", &beat()).await.status(), StatusCode::UNAUTHORIZED);
    let no_cred = a.client.post(a.url(&format!("/api/v1/nodes/{n1}/heartbeat"))).json(&beat()).send().await.unwrap();
    assert_eq!(no_cred.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(heartbeat(&a, &n1, &owner.token, &beat()).await.status(), StatusCode::UNAUTHORIZED);
    // Malformed metrics.
    let mut bad = beat();
    bad["metrics"]["cpu_percent"] = json!("NaN");
    assert_eq!(heartbeat(&a, &n1, &c1, &bad).await.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let mut bad = beat();
    bad["metrics"]["cpu_percent"] = json!(250.0);
    assert_eq!(heartbeat(&a, &n1, &c1, &bad).await.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let mut bad = beat();
    bad["metrics"]["memory_total_bytes"] = json!(-1);
    assert_eq!(heartbeat(&a, &n1, &c1, &bad).await.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let nan = a
        .client
        .post(a.url(&format!("/api/v1/nodes/{n1}/heartbeat")))
        .bearer_auth(&c1)
        .header("content-type", "application/json")
        .body(beat().to_string().replace("12.5", "NaN"))
        .send()
        .await
        .unwrap();
    assert_eq!(nan.status(), StatusCode::BAD_REQUEST);
    let mut many = beat();
    many["models"] = json!(
        (0..1001).map(|i| json!({ "name": format!("m{i}"), "size_bytes": 1, "loaded": false })).collect::<Vec<_>>()
    );
    assert_eq!(heartbeat(&a, &n1, &c1, &many).await.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let mut huge = beat();
    huge["models"] = json!(
        (0..900)
            .map(|i| json!({ "name": format!("{i}{}", "m".repeat(1200)), "size_bytes": 1, "loaded": false }))
            .collect::<Vec<_>>()
    );
    assert_eq!(heartbeat(&a, &n1, &c1, &huge).await.status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(get(&a, &owner, &format!("/api/v1/nodes/{n1}")).await["status"], "new");

    // Heartbeats through both instances at once: active, announced once.
    let (a_ref, b_ref, n1_ref, c1_ref) = (&a, &b, &n1, &c1);
    let beats = (0..10)
        .map(|i| async move { heartbeat(if i % 2 == 0 { a_ref } else { b_ref }, n1_ref, c1_ref, &beat()).await });
    for r in futures_util::future::join_all(beats).await {
        assert_eq!(r.status(), StatusCode::OK);
    }
    let node = get(&a, &owner, &format!("/api/v1/nodes/{n1}")).await;
    assert_eq!(node["status"], "active");
    assert_eq!(node["metrics"]["memory_total_bytes"], 16_000_000_000u64);
    assert_eq!(node["models"][0]["name"], "llama-3-8b.gguf");
    let agents = node["agents"].as_array().unwrap();
    assert_eq!(agents.len(), 4);
    assert_eq!(agents.iter().filter(|a| a["status"] == "active").count(), 1);
    assert_eq!(events_of(&a, "node.active").await, 1);

    // The heartbeats stop: stale, announced once though two instances sweep.
    eventually("node.stale emitted", async || events_of(&a, "node.stale").await == 1).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(events_of(&a, "node.stale").await, 1);
    assert_eq!(get(&a, &owner, &format!("/api/v1/nodes/{n1}")).await["status"], "stale");
    // And back.
    json_ok(heartbeat(&b, &n1, &c1, &beat()).await, StatusCode::OK).await;
    assert_eq!(events_of(&a, "node.active").await, 2);

    // A rotated credential replaces the old one at once.
    let rotated = json_ok(
        send(&a, &owner, Method::POST, &format!("/api/v1/nodes/{n2}/rotate-credential"), None).await,
        StatusCode::OK,
    )
    .await;
    assert_eq!(heartbeat(&a, &n2, &c2, &beat()).await.status(), StatusCode::UNAUTHORIZED);
    json_ok(heartbeat(&a, &n2, rotated["credential"].as_str().unwrap(), &beat()).await, StatusCode::OK).await;
}

#[tokio::test]
async fn every_city_route_finds_nothing_of_another_organization() {
    let app = spawn_app_with(&fast()).await;
    let admin = app.bootstrap().await;
    let a = app.org_with_owner(&admin, "Alpha", "owner@alpha.test").await;
    let b = app.org_with_owner(&admin, "Beta", "owner@beta.test").await;
    let zb = zone(&app, &b, "Beta zone").await;
    let rb = room(&app, &b, &zb, "Beta room", (0, 0, 1, 1), 1).await;
    let (nb, _) = create_node(&app, &b, "beta-node").await;
    let b_agent = app.create_agent(&b, json!({ "name": "theirs" })).await;
    let b_agent = b_agent["id"].as_str().unwrap().to_owned();
    let za = zone(&app, &a, "Alpha zone").await;
    let ra = room(&app, &a, &za, "Alpha room", (0, 0, 1, 1), 1).await;
    let (na, _) = create_node(&app, &a, "alpha-node").await;
    let a_key = app.api_key(&a, None).await;
    let routes = [
        (Method::GET, format!("/api/v1/city/zones/{zb}"), None),
        (Method::PATCH, format!("/api/v1/city/zones/{zb}"), Some(json!({ "name": "x" }))),
        (Method::DELETE, format!("/api/v1/city/zones/{zb}"), None),
        (Method::GET, format!("/api/v1/city/rooms/{rb}"), None),
        (Method::PATCH, format!("/api/v1/city/rooms/{rb}"), Some(json!({ "name": "x" }))),
        (Method::DELETE, format!("/api/v1/city/rooms/{rb}"), None),
        (Method::PUT, format!("/api/v1/agents/{b_agent}/room"), Some(json!({ "room_id": ra }))),
        (Method::DELETE, format!("/api/v1/agents/{b_agent}/room"), None),
        (Method::PUT, format!("/api/v1/agents/{b_agent}/node"), Some(json!({ "node_id": na }))),
        (Method::DELETE, format!("/api/v1/agents/{b_agent}/node"), None),
        (Method::GET, format!("/api/v1/nodes/{nb}"), None),
        (Method::PATCH, format!("/api/v1/nodes/{nb}"), Some(json!({ "name": "x" }))),
        (Method::DELETE, format!("/api/v1/nodes/{nb}"), None),
        (Method::POST, format!("/api/v1/nodes/{nb}/rotate-credential"), None),
    ];
    for by in [&a, &a_key] {
        for (method, path, body) in &routes {
            let resp = send(&app, by, method.clone(), path, body.clone()).await;
            assert_problem(resp, StatusCode::NOT_FOUND, "not_found").await;
        }
        // The lists hold only A's.
        let listed = [
            get(&app, by, "/api/v1/city/zones").await,
            get(&app, by, "/api/v1/city/rooms").await,
            get(&app, by, "/api/v1/nodes").await,
            get(&app, by, "/api/v1/city/map").await,
            get(&app, by, "/api/v1/city/agents").await,
            get(&app, by, "/api/v1/city/presence").await,
        ];
        for l in listed {
            let text = l.to_string();
            for theirs in [&zb, &rb, &nb, &b_agent] {
                assert!(!text.contains(theirs.as_str()), "{text}");
            }
        }
    }
    // Nothing of B changed.
    assert_eq!(get(&app, &b, &format!("/api/v1/city/zones/{zb}")).await["name"], "Beta zone");
    assert_eq!(get(&app, &b, &format!("/api/v1/nodes/{nb}")).await["name"], "beta-node");
}

#[tokio::test]
async fn the_node_guardian_sends_this_machines_metrics_and_the_node_goes_stale_when_it_stops() {
    let app = spawn_app_with(&fast()).await;
    let admin = app.bootstrap().await;
    let owner = app.org_with_owner(&admin, "Alpha", "owner@alpha.test").await;
    let (node, cred) = create_node(&app, &owner, "this-machine").await;
    let models = std::env::temp_dir().join(format!("agentidp-models-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&models).unwrap();
    std::fs::write(models.join("tiny.gguf"), vec![0u8; 4096]).unwrap();
    let cred_file = models.join(".credential");
    std::fs::write(&cred_file, format!("{cred}\n")).unwrap();
    // Without a credential it refuses to start.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_agentidp"))
        .args(["node-guardian", "--url", &app.base, "--node-id", &node])
        .env_remove("AGENTIDP_NODE_CREDENTIAL")
        .env_remove("AGENTIDP_CONFIG")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("AGENTIDP_NODE_CREDENTIAL"));
    let start = |from_file: bool| {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_agentidp"));
        cmd.args(["node-guardian", "--url", &app.base, "--node-id", &node, "--interval-secs", "1"])
            .args(["--models-dir", models.to_str().unwrap()])
            .env_remove("AGENTIDP_CONFIG")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        if from_file {
            cmd.args(["--credential-file", cred_file.to_str().unwrap()]).env_remove("AGENTIDP_NODE_CREDENTIAL");
        } else {
            cmd.env("AGENTIDP_NODE_CREDENTIAL", &cred);
        }
        cmd.spawn().unwrap()
    };
    let mut guardian = start(false);
    eventually("a heartbeat from the guardian", async || {
        get(&app, &owner, &format!("/api/v1/nodes/{node}")).await["status"] == "active"
    })
    .await;
    let shown = get(&app, &owner, &format!("/api/v1/nodes/{node}")).await;
    let m = &shown["metrics"];
    let (total, used) = (m["memory_total_bytes"].as_u64().unwrap(), m["memory_used_bytes"].as_u64().unwrap());
    assert!(total > 0 && used > 0 && used <= total, "{m}");
    assert!(m["disk_total_bytes"].as_u64().unwrap() > 0, "{m}");
    assert_eq!(m["cpu_count"].as_u64().unwrap() as usize, std::thread::available_parallelism().unwrap().get());
    assert_eq!(shown["models"], json!([{ "name": "tiny.gguf", "size_bytes": 4096, "loaded": false }]));
    guardian.kill().unwrap();
    guardian.wait().unwrap();
    eventually("the node goes stale", async || {
        get(&app, &owner, &format!("/api/v1/nodes/{node}")).await["status"] == "stale"
    })
    .await;
    // From the file, it brings the node back.
    let mut guardian = start(true);
    eventually("active again", async || events_of(&app, "node.active").await == 2).await;
    guardian.kill().unwrap();
    guardian.wait().unwrap();
    let _ = std::fs::remove_dir_all(&models);
}
