//! The city under load, against the release binary run as its own process (so that its RSS is
//! the server's alone) on a database of its own: presence heartbeats per second (beside
//! `GET /auth/me` with an agent token, measured the same way, for reference), `GET
//! /api/v1/city/map` for an organization of 50 rooms and 1,000 agents (p50, p99), and the SSE
//! fan-out: 1,000 viewers connected while 100 presence changes a second are made, delivery
//! latency from the report being sent to each viewer's receipt (p50, p99), and the server's RSS.
//! `cargo bench --bench city` (or `make bench`); needs the test Postgres and Redis. Under
//! `cargo test` it runs a small version as a smoke check only.

use std::{
    collections::HashMap,
    process::{Child, Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use serde_json::{Value, json};
use sqlx::{Connection, PgConnection};

fn admin_url() -> String {
    std::env::var("AGENTIDP_TEST_DATABASE_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() as f64 * p) as usize).min(sorted.len() - 1)]
}

fn rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map(|kb| kb / 1024.0)
        .unwrap_or(0.0)
}

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

async fn ok(resp: reqwest::Response, what: &str) -> Value {
    let status = resp.status();
    let text = resp.text().await.unwrap_or_default();
    assert!(status.is_success(), "{what}: {status} {text}");
    serde_json::from_str(&text).unwrap_or(Value::Null)
}

/// `n` requests' worth of load from `workers` concurrent loops for `secs`; returns requests/s.
async fn load<F, Fut>(workers: usize, secs: f64, make: F) -> (f64, u64)
where
    F: Fn(u64) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = bool> + Send,
{
    let make = Arc::new(make);
    let done = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..workers {
        let (make, done, failed, stop) = (make.clone(), done.clone(), failed.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let mut i = w as u64;
            while !stop.load(Ordering::Relaxed) {
                if make(i).await {
                    done.fetch_add(1, Ordering::Relaxed);
                } else {
                    failed.fetch_add(1, Ordering::Relaxed);
                }
                i += workers as u64;
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs_f64(secs)).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        let _ = t.await;
    }
    (done.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64(), failed.load(Ordering::Relaxed))
}

#[tokio::main]
async fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let (rooms, agents, reporters, viewers, secs): (usize, usize, usize, usize, f64) =
        if full { (50, 1000, 200, 1000, 10.0) } else { (5, 40, 10, 20, 1.0) };
    let _ = rustls::crypto::ring::default_provider().install_default();

    let db_name = format!("agentidp_bench_city_{}", std::process::id());
    let admin = admin_url();
    let mut conn = PgConnection::connect(&admin).await.expect("the test Postgres");
    let stale: Vec<String> =
        sqlx::query_scalar("select datname from pg_database where datname like 'agentidp\\_bench\\_city\\_%'")
            .fetch_all(&mut conn)
            .await
            .unwrap();
    for d in stale {
        let _ = sqlx::query(&format!("drop database if exists {d} with (force)")).execute(&mut conn).await;
    }
    sqlx::query(&format!("create database {db_name}")).execute(&mut conn).await.unwrap();
    let db_url = format!("{}/{db_name}", admin.rsplit_once('/').unwrap().0);
    let db = sqlx::postgres::PgPoolOptions::new().max_connections(2).connect(&db_url).await.unwrap();
    agentidp::db::MIGRATOR.run(&db).await.unwrap();
    match agentidp::auth::bootstrap::run(&db, "Bench", "bench@bench.test", Some("bench-password-0123".into()))
        .await
        .unwrap()
    {
        agentidp::auth::bootstrap::Outcome::Created { .. } => {}
        agentidp::auth::bootstrap::Outcome::AlreadyDone(w) => panic!("{w}"),
    }

    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let prefix = format!("bench_city:{}:", std::process::id());
    let server = Server(
        Command::new(env!("CARGO_BIN_EXE_agentidp"))
            .arg("serve")
            .env_remove("AGENTIDP_CONFIG")
            .env("AGENTIDP_DATABASE__URL", &db_url)
            .env("AGENTIDP_DATABASE__MAX_CONNECTIONS", "32")
            .env("AGENTIDP_REDIS__POOL_SIZE", "32")
            .env("AGENTIDP_REDIS__KEY_PREFIX", &prefix)
            .env("AGENTIDP_SERVER__BIND", format!("127.0.0.1:{port}"))
            .env("AGENTIDP_LOG__LEVEL", "warn")
            // As bench/run.sh does: finite limits too high to refuse, so their cost is in the figures.
            .env("AGENTIDP_TIERS__PLANS__FREE__MAX_AGENTS", "1000000")
            .env("AGENTIDP_TIERS__PLANS__FREE__API_CALLS_PER_DAY", "1000000000000")
            .env("AGENTIDP_TIERS__PLANS__FREE__TOKENS_PER_DAY", "1000000000000")
            .env("AGENTIDP_TIERS__PLANS__FREE__TOKENS_PER_MONTH", "1000000000000")
            .env("AGENTIDP_TIERS__PLANS__FREE__RATE_LIMIT__REQUESTS_PER_MINUTE", "6000000")
            .env("AGENTIDP_TIERS__PLANS__FREE__RATE_LIMIT__BURST", "1000000")
            // Throughput, not the per-agent flood limit, is measured here.
            .env("AGENTIDP_CITY__PRESENCE_REPORTS_PER_SEC", "1000000")
            .env("AGENTIDP_CITY__PRESENCE_TTL_SECS", "600")
            .env("AGENTIDP_CITY__VIEWER_BUFFER", "4096")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start agentidp"),
    );
    let pid = server.0.id();
    let client = reqwest::Client::builder().pool_max_idle_per_host(256).build().unwrap();
    for _ in 0..600 {
        if client.get(format!("{base}/health")).send().await.is_ok_and(|r| r.status().is_success()) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let idle_rss = rss_mib(pid);
    let login = ok(
        client
            .post(format!("{base}/auth/login"))
            .json(&json!({ "email": "bench@bench.test", "password": "bench-password-0123" }))
            .send()
            .await
            .unwrap(),
        "login",
    )
    .await;
    let session = login["session_token"].as_str().unwrap().to_owned();
    let post = |path: &str, body: Value| client.post(format!("{base}{path}")).bearer_auth(&session).json(&body).send();

    // 50 rooms in 5 zones, 1,000 agents spread over them.
    let mut room_ids = Vec::new();
    for z in 0..rooms.div_ceil(10) {
        let zone = ok(post("/api/v1/city/zones", json!({ "name": format!("Zone {z}") })).await.unwrap(), "zone").await;
        for r in 0..10.min(rooms - z * 10) {
            let body = json!({ "zone_id": zone["id"], "name": format!("Room {z}-{r}"), "kind": "workspace",
                               "capacity": 1000, "x": r * 10, "y": 0, "width": 10, "height": 10 });
            room_ids.push(ok(post("/api/v1/city/rooms", body).await.unwrap(), "room").await["id"].clone());
        }
    }
    let mut agent_ids = Vec::new();
    let mut tokens = Vec::new();
    for i in 0..agents {
        let body = json!({ "name": format!("agent {i:04}"), "allowed_scopes": ["presence:write", "agents:read"] });
        let agent = ok(post("/api/v1/agents", body).await.unwrap(), "agent").await;
        let id = agent["id"].as_str().unwrap().to_owned();
        let room = &room_ids[i % room_ids.len()];
        ok(
            client
                .put(format!("{base}/api/v1/agents/{id}/room"))
                .bearer_auth(&session)
                .json(&json!({ "room_id": room }))
                .send()
                .await
                .unwrap(),
            "place",
        )
        .await;
        if i < reporters {
            let cred =
                ok(post(&format!("/api/v1/agents/{id}/credentials"), json!({})).await.unwrap(), "credential").await;
            let token = ok(
                client
                    .post(format!("{base}/api/v1/token"))
                    .basic_auth(cred["client_id"].as_str().unwrap(), cred["client_secret"].as_str())
                    .form(&[("grant_type", "client_credentials")])
                    .send()
                    .await
                    .unwrap(),
                "token",
            )
            .await;
            tokens.push(token["access_token"].as_str().unwrap().to_owned());
        }
        agent_ids.push(id);
    }
    let tokens = Arc::new(tokens);

    // Heartbeats (the reporters stay online: no change, no event) against `GET /auth/me` with the
    // same tokens, in alternating halves so that neither meets a quieter minute of the machine than
    // the other. The heartbeat's body is serialized once: the load generator's own JSON work would
    // otherwise count against the server's rate.
    const HEARTBEAT: &[u8] = br#"{"status":"online","activity":"working"}"#;
    let (mut heartbeats, mut hb_failed, mut authn) = (0.0, 0, 0.0);
    for _ in 0..2 {
        let c = client.clone();
        let (b, t) = (base.clone(), tokens.clone());
        let (rate, failed) = load(64, secs / 2.0, move |i| {
            let (c, b, t) = (c.clone(), b.clone(), t.clone());
            async move {
                let token = &t[i as usize % t.len()];
                c.post(format!("{b}/api/v1/city/presence"))
                    .bearer_auth(token)
                    .header(reqwest::header::CONTENT_TYPE, "application/json")
                    .body(HEARTBEAT)
                    .send()
                    .await
                    .is_ok_and(|r| r.status().is_success())
            }
        })
        .await;
        heartbeats += rate / 2.0;
        hb_failed += failed;
        let c = client.clone();
        let (b, t) = (base.clone(), tokens.clone());
        let (rate, _) = load(64, secs / 2.0, move |i| {
            let (c, b, t) = (c.clone(), b.clone(), t.clone());
            async move {
                c.get(format!("{b}/auth/me"))
                    .bearer_auth(&t[i as usize % t.len()])
                    .send()
                    .await
                    .is_ok_and(|r| r.status().is_success())
            }
        })
        .await;
        authn += rate / 2.0;
    }

    // The map: 1,000 agents in 50 rooms, the reporters online.
    let mut map_ms = Vec::new();
    let map_reads = if full { 300 } else { 10 };
    let mut map_bytes = 0;
    for _ in 0..map_reads {
        let t = Instant::now();
        let resp = client.get(format!("{base}/api/v1/city/map")).bearer_auth(&session).send().await.unwrap();
        assert!(resp.status().is_success());
        map_bytes = resp.bytes().await.unwrap().len();
        map_ms.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    map_ms.sort_by(f64::total_cmp);
    let map_online = {
        let m =
            ok(client.get(format!("{base}/api/v1/city/map")).bearer_auth(&session).send().await.unwrap(), "map").await;
        m["online_count"].as_u64().unwrap_or(0)
    };

    // The fan-out: viewers connected, then 100 changes a second, each with a unique activity.
    let sent: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let received: Arc<Mutex<Vec<f64>>> = Arc::default();
    let connected = Arc::new(AtomicU64::new(0));
    let viewer_client = reqwest::Client::builder().pool_max_idle_per_host(0).build().unwrap();
    let mut viewer_tasks = Vec::new();
    for _ in 0..viewers {
        let (c, b, s, sent, received, connected) =
            (viewer_client.clone(), base.clone(), session.clone(), sent.clone(), received.clone(), connected.clone());
        viewer_tasks.push(tokio::spawn(async move {
            let Ok(mut resp) = c.get(format!("{b}/api/v1/city/presence/stream")).bearer_auth(&s).send().await else {
                return;
            };
            let mut buf = String::new();
            let mut first = true;
            while let Ok(Some(chunk)) = resp.chunk().await {
                let now = Instant::now();
                buf.push_str(&String::from_utf8_lossy(&chunk));
                while let Some(end) = buf.find("\n\n") {
                    let block: String = buf.drain(..end + 2).collect();
                    if first {
                        first = false;
                        connected.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                    if let Some(at) = block.find("\"activity\":\"c") {
                        let tag: String = block[at + 12..].chars().take_while(|c| *c != '"').collect();
                        if let Some(t0) = sent.lock().unwrap().get(&tag) {
                            received.lock().unwrap().push(now.saturating_duration_since(*t0).as_secs_f64() * 1000.0);
                        }
                    }
                }
            }
        }));
    }
    let wait_from = Instant::now();
    while (connected.load(Ordering::Relaxed) as usize) < viewers && wait_from.elapsed() < Duration::from_secs(120) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let viewers_up = connected.load(Ordering::Relaxed);
    let rss_connected = rss_mib(pid);
    let changes = (secs * 100.0) as usize;
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    let mut peak_rss = rss_connected;
    let mut reports = Vec::new();
    for n in 0..changes {
        tick.tick().await;
        let tag = format!("c{n}");
        sent.lock().unwrap().insert(tag.clone(), Instant::now());
        let (c, b, token) = (client.clone(), base.clone(), tokens[n % tokens.len()].clone());
        reports.push(tokio::spawn(async move {
            c.post(format!("{b}/api/v1/city/presence"))
                .bearer_auth(token)
                .json(&json!({ "status": "online", "activity": tag }))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success())
        }));
        if n % 50 == 0 {
            peak_rss = peak_rss.max(rss_mib(pid));
        }
    }
    let reported = futures_util::future::join_all(reports).await.into_iter().filter(|r| matches!(r, Ok(true))).count();
    let expected = reported * viewers_up as usize;
    let drain_from = Instant::now();
    while received.lock().unwrap().len() < expected && drain_from.elapsed() < Duration::from_secs(60) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    peak_rss = peak_rss.max(rss_mib(pid));
    let mut latencies = received.lock().unwrap().clone();
    latencies.sort_by(f64::total_cmp);
    for t in viewer_tasks {
        t.abort();
    }
    drop(server);
    db.close().await;
    let _ = sqlx::query(&format!("drop database if exists {db_name} with (force)")).execute(&mut conn).await;
    if let Ok(rc) = redis::Client::open("redis://127.0.0.1:6379")
        && let Ok(mut rconn) = rc.get_multiplexed_async_connection().await
    {
        let keys: Vec<String> =
            redis::cmd("KEYS").arg(format!("{prefix}*")).query_async(&mut rconn).await.unwrap_or_default();
        if !keys.is_empty() {
            let _: Result<i64, _> = redis::cmd("DEL").arg(keys).query_async(&mut rconn).await;
        }
    }

    println!("city (agentidp serve as its own process; the load from this one, on the same machine):");
    println!(
        "  presence heartbeats: {heartbeats:.0}/s ({hb_failed} failed), 64 concurrent, {} agents; GET /auth/me with an agent token the same way: {authn:.0}/s",
        tokens.len()
    );
    println!(
        "  GET /api/v1/city/map, {} rooms, {agents} agents ({map_online} online), {map_bytes} bytes: p50 {:.1} ms, p99 {:.1} ms ({map_reads} reads, one at a time)",
        room_ids.len(),
        percentile(&map_ms, 0.50),
        percentile(&map_ms, 0.99)
    );
    println!(
        "  SSE fan-out: {viewers_up} of {viewers} viewers connected, {reported} changes at 100/s: {} of {expected} deliveries, report-to-receipt p50 {:.1} ms, p99 {:.1} ms",
        latencies.len(),
        percentile(&latencies, 0.50),
        percentile(&latencies, 0.99)
    );
    println!(
        "  server RSS: {idle_rss:.0} MiB idle, {rss_connected:.0} MiB with the viewers connected, {peak_rss:.0} MiB peak during the fan-out"
    );
}
