//! The delegation broker under load, beside the original broker (the peer in
//! `../shared/peers/seed-broker/`, started by this bench when that folder exists, skipped with a
//! note otherwise): `POST /api/v1/delegations` (ephemeral agents, as the original makes, on
//! durable Postgres), `GET /api/v1/delegations/{id}`, the command check and token exchange;
//! requests/s, p50, p99. One load generator (this process, 64 connections) for both sides.
//! `cargo bench --bench delegation` (or `make bench`); needs the test Postgres and Redis. Under
//! `cargo test` it runs each scenario for a moment as a smoke check only.

use std::{
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use agentidp::{app::Application, config::Config, redis::Redis};
use figment::{
    Figment,
    providers::{Format, Serialized, Toml},
};
use serde_json::{Value, json};
use sqlx::{Connection, PgConnection};
use uuid::Uuid;

const CONNECTIONS: usize = 64;

fn admin_url() -> String {
    std::env::var("AGENTIDP_TEST_DATABASE_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

/// One request of a scenario: method, path, headers, body.
#[derive(Clone)]
struct Req {
    post: bool,
    url: String,
    headers: Vec<(&'static str, String)>,
    body: Option<(String, &'static str)>,
}

struct Outcome {
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
    errors: u64,
}

/// `CONNECTIONS` loops sending `req` for `secs`; every answer that is not 2xx is an error.
async fn load(client: &reqwest::Client, req: Req, secs: f64) -> Outcome {
    load_each(client, vec![req], secs).await
}

/// Like [`load`], connection `i` sending `reqs[i % len]`.
async fn load_each(client: &reqwest::Client, reqs: Vec<Req>, secs: f64) -> Outcome {
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    let reqs: Vec<Arc<Req>> = reqs.into_iter().map(Arc::new).collect();
    let tasks = (0..CONNECTIONS).map(|i| {
        let client = client.clone();
        let req = reqs[i % reqs.len()].clone();
        tokio::spawn(async move {
            let mut lat = Vec::with_capacity(4096);
            let mut errors = 0u64;
            while Instant::now() < deadline {
                let mut b = if req.post { client.post(&req.url) } else { client.get(&req.url) };
                for (k, v) in &req.headers {
                    b = b.header(*k, v);
                }
                if let Some((body, ctype)) = &req.body {
                    b = b.header("content-type", *ctype).body(body.clone());
                }
                let started = Instant::now();
                match b.send().await {
                    Ok(r) => {
                        let ok = r.status().is_success();
                        let _ = r.bytes().await;
                        if !ok {
                            errors += 1;
                        }
                    }
                    Err(_) => errors += 1,
                }
                lat.push(started.elapsed().as_secs_f64() * 1000.0);
            }
            (lat, errors)
        })
    });
    let started = Instant::now();
    let mut all = Vec::new();
    let mut errors = 0;
    for t in futures_util::future::join_all(tasks).await {
        let (lat, e) = t.unwrap();
        all.extend(lat);
        errors += e;
    }
    let elapsed = started.elapsed().as_secs_f64();
    all.sort_by(|a, b| a.total_cmp(b));
    let pct = |p: f64| if all.is_empty() { 0.0 } else { all[((all.len() as f64 * p) as usize).min(all.len() - 1)] };
    Outcome { rps: all.len() as f64 / elapsed, p50_ms: pct(0.50), p99_ms: pct(0.99), errors }
}

async fn json(resp: reqwest::Response) -> Value {
    let status = resp.status();
    let v: Value = resp.json().await.unwrap_or(Value::Null);
    assert!(status.is_success(), "{status}: {v}");
    v
}

/// Starts the peer with its own start script; `None` (and why) when it cannot.
async fn start_peer(client: &reqwest::Client) -> Result<(u32, String), String> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/peers/seed-broker");
    if !dir.join("start.sh").is_file() {
        return Err(format!("{} not found", dir.display()));
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let out = std::process::Command::new("bash")
        .arg(dir.join("start.sh"))
        .arg(port.to_string())
        .arg("1")
        .output()
        .map_err(|e| format!("start.sh: {e}"))?;
    let pid: u32 = String::from_utf8_lossy(&out.stdout)
        .trim()
        .lines()
        .last()
        .and_then(|l| l.trim().parse().ok())
        .ok_or_else(|| format!("start.sh printed no pid: {}", String::from_utf8_lossy(&out.stderr)))?;
    let base = format!("http://127.0.0.1:{port}");
    for _ in 0..300 {
        if client.get(format!("{base}/health")).send().await.is_ok_and(|r| r.status().is_success()) {
            return Ok((pid, base));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop_pid(pid);
    Err("the peer did not answer /health within 30 s".into())
}

fn stop_pid(pid: u32) {
    // SIGTERM to the process this bench started (kill(1), so no unsafe code).
    let _ = std::process::Command::new("kill").arg("-TERM").arg(pid.to_string()).status();
}

#[tokio::main]
async fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let secs: f64 =
        if full { std::env::var("BENCH_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(10.0) } else { 0.3 };
    let _ = rustls::crypto::ring::default_provider().install_default();

    let db_name = format!("agentidp_bench_delegation_{}", std::process::id());
    let admin = admin_url();
    let mut conn = PgConnection::connect(&admin).await.expect("the test Postgres");
    let stale: Vec<String> =
        sqlx::query_scalar("select datname from pg_database where datname like 'agentidp\\_bench\\_delegation\\_%'")
            .fetch_all(&mut conn)
            .await
            .unwrap();
    for d in stale {
        let _ = sqlx::query(&format!("drop database if exists {d} with (force)")).execute(&mut conn).await;
    }
    let durable: String = sqlx::query_scalar("show synchronous_commit").fetch_one(&mut conn).await.unwrap();
    sqlx::query(&format!("create database {db_name}")).execute(&mut conn).await.unwrap();
    let db_url = format!("{}/{db_name}", admin.rsplit_once('/').unwrap().0);
    let cfg = Config::from_figment(
        Figment::from(Toml::string(agentidp::config::DEFAULTS))
            .merge(Serialized::default("server.bind", "127.0.0.1:0"))
            .merge(Serialized::default("database.url", &db_url))
            .merge(Serialized::default("database.max_connections", 32))
            .merge(Serialized::default("log.level", "warn"))
            .merge(Serialized::default("retention.interval_secs", 0))
            .merge(Serialized::default("delegation.max_commands", 100_000_000))
            .merge(Serialized::default(
                "tiers.plans.free",
                json!({
                    "max_agents": "unlimited",
                    "api_calls_per_day": "unlimited",
                    "tokens_per_day": "unlimited",
                    "tokens_per_month": "unlimited",
                    "rate_limit": { "requests_per_minute": 6_000_000, "burst": 1_000_000 },
                }),
            )),
    )
    .expect("bench configuration");
    let db = agentidp::db::pool_options(&cfg.database).connect(&cfg.database.url).await.unwrap();
    agentidp::db::migrate(&db).await.unwrap();
    let redis = Redis::with_prefix(&cfg.redis, format!("bench:{}:", Uuid::new_v4().simple())).unwrap();
    let app = Application::with_parts(cfg, db.clone(), redis).await.unwrap();
    let base = format!("http://{}", app.local_addr());
    let (stop, rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(app.run_until(async move {
        let _ = rx.await;
    }));
    let client = reqwest::Client::builder().pool_max_idle_per_host(CONNECTIONS).build().unwrap();

    let password = "bench-password-0123";
    agentidp::auth::bootstrap::run(&db, "Bench", "bench@bench.test", Some(password.into())).await.unwrap();
    let login = json(
        client
            .post(format!("{base}/auth/login"))
            .json(&json!({ "email": "bench@bench.test", "password": password }))
            .send()
            .await
            .unwrap(),
    )
    .await;
    let session = format!("Bearer {}", login["session_token"].as_str().unwrap());
    let agent = json(
        client
            .post(format!("{base}/api/v1/agents"))
            .header("authorization", &session)
            .json(&json!({ "name": "bench", "allowed_scopes": ["tools:read"] }))
            .send()
            .await
            .unwrap(),
    )
    .await;
    let agent_id = agent["id"].as_str().unwrap().to_owned();
    let cred = json(
        client
            .post(format!("{base}/api/v1/agents/{agent_id}/credentials"))
            .header("authorization", &session)
            .send()
            .await
            .unwrap(),
    )
    .await;
    let own = json(
        client
            .post(format!("{base}/api/v1/token"))
            .basic_auth(cred["client_id"].as_str().unwrap(), cred["client_secret"].as_str())
            .form(&[("grant_type", "client_credentials")])
            .send()
            .await
            .unwrap(),
    )
    .await["access_token"]
        .as_str()
        .unwrap()
        .to_owned();
    let delegation = json(
        client
            .post(format!("{base}/api/v1/delegations"))
            .header("authorization", &session)
            .json(&json!({ "agent_id": agent_id, "scope": { "max_commands": 100_000_000, "prohibited_commands": ["rm"] } }))
            .send()
            .await
            .unwrap(),
    )
    .await;
    let id = delegation["delegation_id"].as_str().unwrap().to_owned();
    let delegated = format!("Bearer {}", delegation["agent_token"].as_str().unwrap());

    // The command check on one delegation queues on its row (each check is one unit of one
    // budget); agents in production check their own: one delegation per connection.
    let mut per_connection = Vec::new();
    for _ in 0..CONNECTIONS {
        let d = json(
            client
                .post(format!("{base}/api/v1/delegations"))
                .header("authorization", &session)
                .json(&json!({ "agent_id": agent_id, "scope": { "max_commands": 100_000_000 } }))
                .send()
                .await
                .unwrap(),
        )
        .await;
        per_connection.push(Req {
            post: true,
            url: format!("{base}/api/v1/delegations/{}/commands", d["delegation_id"].as_str().unwrap()),
            headers: vec![("authorization", format!("Bearer {}", d["agent_token"].as_str().unwrap()))],
            body: Some((json!({ "command": "ls" }).to_string(), "application/json")),
        });
    }
    let create_body = json!({ "agent_type": "claude-code", "scope": { "scopes": ["tools:read"] } }).to_string();
    let exchange_body = serde_urlencoded::to_string([
        ("grant_type", "urn:ietf:params:oauth:grant-type:token-exchange"),
        ("subject_token", login["session_token"].as_str().unwrap()),
        ("subject_token_type", "urn:ietf:params:oauth:token-type:access_token"),
        ("actor_token", own.as_str()),
    ])
    .unwrap();
    let ours = [
        (
            "create (ephemeral agent)",
            Req {
                post: true,
                url: format!("{base}/api/v1/delegations"),
                headers: vec![("authorization", session.clone())],
                body: Some((create_body, "application/json")),
            },
        ),
        (
            "get",
            Req {
                post: false,
                url: format!("{base}/api/v1/delegations/{id}"),
                headers: vec![("authorization", session.clone())],
                body: None,
            },
        ),
        (
            "command check, 1 delegation",
            Req {
                post: true,
                url: format!("{base}/api/v1/delegations/{id}/commands"),
                headers: vec![("authorization", delegated.clone())],
                body: Some((json!({ "command": "ls" }).to_string(), "application/json")),
            },
        ),
        (
            "token exchange",
            Req {
                post: true,
                url: format!("{base}/api/v1/token"),
                headers: vec![],
                body: Some((exchange_body, "application/x-www-form-urlencoded")),
            },
        ),
    ];
    let mut rows = Vec::new();
    for (name, req) in ours {
        let _ = load(&client, req.clone(), secs.min(2.0) / 4.0).await; // warm-up
        rows.push((name, load(&client, req, secs).await));
    }
    let _ = load_each(&client, per_connection.clone(), secs.min(2.0) / 4.0).await;
    rows.push(("command check, 64 delegations", load_each(&client, per_connection, secs).await));
    let active: i64 =
        agentidp::delegation::active_count(&db, login["actor"]["org_id"].as_str().unwrap().parse().unwrap())
            .await
            .unwrap();
    let _ = stop.send(());
    let _ = server.await;
    db.close().await;
    let _ = sqlx::query(&format!("drop database if exists {db_name} with (force)")).execute(&mut conn).await;

    // The peer, after ours has stopped: one server under load at a time.
    let peer = if full || std::env::var("BENCH_PEER_SMOKE").is_ok() {
        start_peer(&client).await
    } else {
        Err("not under --bench".into())
    };
    let mut peer_rows = Vec::new();
    match &peer {
        Ok((pid, peer_base)) => {
            let create = Req {
                post: true,
                url: format!("{peer_base}/delegate"),
                headers: vec![("x-delegator-did", "did:web:example/user/alice".into())],
                body: Some((
                    json!({ "delegator_ac_id": "ac-1", "agent_type": "claude-code" }).to_string(),
                    "application/json",
                )),
            };
            let one = json(
                client
                    .post(&create.url)
                    .header("x-delegator-did", "did:web:example/user/alice")
                    .json(&json!({ "delegator_ac_id": "ac-1", "agent_type": "claude-code" }))
                    .send()
                    .await
                    .unwrap(),
            )
            .await;
            let get = Req {
                post: false,
                url: format!("{peer_base}/delegate/{}", one["delegation_id"].as_str().unwrap()),
                headers: vec![],
                body: None,
            };
            for (name, req) in [("create (ephemeral agent)", create), ("get", get)] {
                let _ = load(&client, req.clone(), secs.min(2.0) / 4.0).await;
                peer_rows.push((name, load(&client, req, secs).await));
            }
            stop_pid(*pid);
        }
        Err(why) => eprintln!("note: the seed-broker peer is skipped: {why}"),
    }

    println!(
        "delegation ({CONNECTIONS} connections from one in-process load generator, {secs} s per scenario, \
         Postgres synchronous_commit={durable}; {active} active delegations at the end):"
    );
    println!(
        "  {:<26} {:>10} {:>9} {:>9} {:>7}   {:>10} {:>9} {:>9} {:>7}",
        "scenario", "req/s", "p50 ms", "p99 ms", "errors", "peer req/s", "p50 ms", "p99 ms", "ratio"
    );
    for (name, o) in &rows {
        let peer = peer_rows.iter().find(|(n, _)| n == name).map(|(_, p)| p);
        match peer {
            Some(p) => println!(
                "  {name:<26} {:>10.0} {:>9.2} {:>9.2} {:>7}   {:>10.0} {:>9.2} {:>9.2} {:>6.1}×",
                o.rps,
                o.p50_ms,
                o.p99_ms,
                o.errors,
                p.rps,
                p.p50_ms,
                p.p99_ms,
                o.rps / p.rps.max(0.001)
            ),
            None => println!(
                "  {name:<26} {:>10.0} {:>9.2} {:>9.2} {:>7}   {:>10}",
                o.rps, o.p50_ms, o.p99_ms, o.errors, "-"
            ),
        }
    }
    for (name, p) in &peer_rows {
        if p.errors > 0 {
            println!("  peer {name}: {} errors", p.errors);
        }
    }
    if let Err(why) = peer {
        println!("  the seed-broker peer was skipped: {why}");
    }
}
