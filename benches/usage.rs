//! Usage metering: NATS JetStream ingest to durable rows with rollups (a backlog drained, events
//! per second), the lag from publish to queryable at a steady 10,000 events/s, HTTP batch ingest,
//! the summary query over one org-month whose rollups hold 10 million events, and the entitlement
//! check over HTTP. `cargo bench --bench usage` (or `make bench`); needs the test Postgres, Redis
//! and NATS. Under `cargo test` it runs a few events as a smoke check only.
//!
//! Knobs: BENCH_USAGE_EVENTS (backlog, default 200,000), BENCH_USAGE_STEADY_SECS (default 10),
//! BENCH_USAGE_STORED (events the summary's month holds, default 10,000,000).

use std::time::{Duration, Instant};

use agentidp::{app::Application, config::Config, redis::Redis};
use figment::{
    Figment,
    providers::{Format, Serialized, Toml},
};
use serde_json::json;
use sqlx::{Connection, PgConnection, PgPool};
use uuid::Uuid;

fn admin_url() -> String {
    std::env::var("AGENTIDP_TEST_DATABASE_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

fn nats_url() -> String {
    std::env::var("AGENTIDP_TEST_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into())
}

fn env_num(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.replace('_', "").parse().ok()).unwrap_or(default)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() as f64 * p) as usize).min(sorted.len() - 1)]
}

fn event(org: Uuid, agents: &[Uuid], i: usize, now: &str) -> Vec<u8> {
    let models = ["gpt-4o", "gpt-4o-mini", "claude-sonnet-4", "other"];
    serde_json::to_vec(&json!({
        "kind": "llm", "event_id": format!("e{i}"), "timestamp": now, "org_id": org, "agent_id": agents[i % agents.len()],
        "actor_id": "service:bench", "actor_type": "service", "model": models[i % models.len()],
        "provider": "bench", "prompt_tokens": 100 + (i % 50), "completion_tokens": 20 + (i % 30),
        "latency_ms": 50 + (i % 900), "success": !i.is_multiple_of(50),
    }))
    .unwrap()
}

async fn count(db: &PgPool) -> i64 {
    sqlx::query_scalar("select count(*) from usage_event_key").fetch_one(db).await.unwrap()
}

async fn publish(js: &async_nats::jetstream::Context, subject: &str, payloads: Vec<Vec<u8>>) {
    for chunk in payloads.chunks(512) {
        let mut acks = Vec::with_capacity(chunk.len());
        for p in chunk {
            acks.push(js.publish(subject.to_owned(), p.clone().into()).await.unwrap());
        }
        for a in acks {
            a.await.unwrap();
        }
    }
}

#[tokio::main]
async fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let backlog = if full { env_num("BENCH_USAGE_EVENTS", 200_000) } else { 200 };
    let steady_secs = if full { env_num("BENCH_USAGE_STEADY_SECS", 10) } else { 1 };
    let stored = if full { env_num("BENCH_USAGE_STORED", 10_000_000) } else { 10_000 };
    let samples = if full { 2_000 } else { 20 };
    let _ = rustls::crypto::ring::default_provider().install_default();

    let db_name = format!("agentidp_bench_usage_{}", std::process::id());
    let admin = admin_url();
    let mut conn = PgConnection::connect(&admin).await.expect("the test Postgres");
    let stale: Vec<String> =
        sqlx::query_scalar("select datname from pg_database where datname like 'agentidp\\_bench\\_usage\\_%'")
            .fetch_all(&mut conn)
            .await
            .unwrap();
    for d in stale {
        let _ = sqlx::query(&format!("drop database if exists {d} with (force)")).execute(&mut conn).await;
    }
    sqlx::query(&format!("create database {db_name}")).execute(&mut conn).await.unwrap();
    let db_url = format!("{}/{db_name}", admin.rsplit_once('/').unwrap().0);
    let run = Uuid::new_v4().simple().to_string();
    let prefix = format!("bench{run}");
    let stream = format!("BENCH_USAGE_{run}");

    let config = |nats: bool| -> Config {
        Config::from_figment(
            Figment::from(Toml::string(agentidp::config::DEFAULTS))
                .merge(Serialized::default("server.bind", "127.0.0.1:0"))
                .merge(Serialized::default("database.url", &db_url))
                .merge(Serialized::default("database.max_connections", 32))
                .merge(Serialized::default("log.level", "warn"))
                .merge(Serialized::default("retention.interval_secs", 0))
                .merge(Serialized::default("usage.http_batch_max", 5000))
                .merge(Serialized::default("usage.nats.enabled", nats))
                .merge(Serialized::default("usage.nats.url", nats_url()))
                .merge(Serialized::default("usage.nats.subject_prefix", &prefix))
                .merge(Serialized::default("usage.nats.stream", &stream))
                .merge(Serialized::default("usage.nats.consumer", "bench"))
                .merge(Serialized::default("usage.nats.fetch_wait_ms", 100))
                .merge(Serialized::default(
                    "tiers.plans.free",
                    json!({ "max_agents": "unlimited", "api_calls_per_day": "unlimited", "tokens_per_day": "unlimited",
                            "tokens_per_month": "unlimited",
                            "rate_limit": { "requests_per_minute": 6_000_000, "burst": 1_000_000 } }),
                )),
        )
        .expect("bench configuration")
    };
    let start = |cfg: Config| async move {
        let db = agentidp::db::pool_options(&cfg.database).connect(&cfg.database.url).await.unwrap();
        agentidp::db::migrate(&db).await.unwrap();
        let redis = Redis::with_prefix(&cfg.redis, format!("bench:{}:", Uuid::new_v4().simple())).unwrap();
        let app = Application::with_parts(cfg, db.clone(), redis).await.unwrap();
        let addr = app.local_addr();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(app.run_until(async move {
            let _ = rx.await;
        }));
        (db, addr, tx, server)
    };

    // An organization with eight agents; the stream and consumer made by a first start.
    let (db, _, stop, server) = start(config(true)).await;
    let org = match agentidp::auth::bootstrap::run(&db, "Bench", "bench@bench.test", Some("bench-password-0123".into()))
        .await
        .unwrap()
    {
        agentidp::auth::bootstrap::Outcome::Created { org_id, .. } => org_id,
        agentidp::auth::bootstrap::Outcome::AlreadyDone(w) => panic!("{w}"),
    };
    let owner: Uuid = sqlx::query_scalar("select user_id from membership where organization_id = $1 limit 1")
        .bind(org)
        .fetch_one(&db)
        .await
        .unwrap();
    let mut agents = Vec::new();
    for i in 0..8 {
        let id = Uuid::now_v7();
        sqlx::query("insert into agent (agent_id, organization_id, name, owner_id) values ($1, $2, $3, $4)")
            .bind(id)
            .bind(org)
            .bind(format!("bench-{i}"))
            .bind(owner)
            .execute(&db)
            .await
            .unwrap();
        agents.push(id);
    }
    let nc = async_nats::connect(nats_url()).await.expect("NATS");
    let js = async_nats::jetstream::new(nc);
    for _ in 0..200 {
        if js.get_stream(&stream).await.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = stop.send(());
    let _ = server.await;
    let subject = format!("{prefix}.usage.llm");
    let now = time::OffsetDateTime::now_utc().format(&time::format_description::well_known::Rfc3339).unwrap();

    // 1. A backlog published while stopped, drained by one instance.
    let payloads: Vec<Vec<u8>> = (0..backlog).map(|i| event(org, &agents, i, &now)).collect();
    publish(&js, &subject, payloads).await;
    let began = Instant::now();
    let (db, addr, stop, server) = start(config(true)).await;
    while (count(&db).await as usize) < backlog && began.elapsed() < Duration::from_secs(600) {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let drained = began.elapsed();
    let rollup_events: i64 =
        sqlx::query_scalar("select coalesce(sum(events), 0)::int8 from usage_rollup_hourly where organization_id = $1")
            .bind(org)
            .fetch_one(&db)
            .await
            .unwrap();
    assert_eq!(rollup_events as usize, backlog, "every event in the rollups once");

    // 2. A steady 10,000 events/s for steady_secs: publish time to the moment the count covers it.
    let rate = 10_000usize;
    let total = rate * steady_secs;
    let base = backlog;
    let sent: std::sync::Arc<std::sync::Mutex<Vec<Instant>>> = Default::default();
    let publisher = {
        let js = js.clone();
        let subject = subject.clone();
        let sent = sent.clone();
        let agents = agents.clone();
        let now = now.clone();
        tokio::spawn(async move {
            let t0 = Instant::now();
            let per_tick = rate / 100;
            for tick in 0..(total / per_tick) {
                let due = t0 + Duration::from_millis(10 * tick as u64);
                tokio::time::sleep_until(due.into()).await;
                let mut acks = Vec::with_capacity(per_tick);
                for j in 0..per_tick {
                    let i = base + tick * per_tick + j;
                    acks.push(js.publish(subject.clone(), event(org, &agents, i, &now).into()).await.unwrap());
                }
                sent.lock().unwrap().extend(std::iter::repeat_n(Instant::now(), per_tick));
                for a in acks {
                    a.await.unwrap();
                }
            }
        })
    };
    let mut lags = Vec::new();
    let mut seen = 0usize;
    let steady_began = Instant::now();
    while seen < total && steady_began.elapsed() < Duration::from_secs(steady_secs as u64 + 60) {
        let c = count(&db).await as usize - base;
        let at = Instant::now();
        {
            let sent = sent.lock().unwrap();
            for t in &sent[seen.min(sent.len())..c.min(sent.len())] {
                lags.push((at - *t).as_secs_f64() * 1000.0);
            }
            seen = seen.max(c.min(sent.len()));
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let _ = publisher.await;
    lags.sort_by(|a, b| a.partial_cmp(b).unwrap());

    // 3. HTTP batch ingest with a service key: 1,000 events per request, 4 at once.
    let key = service_key(&addr).await;
    let client = reqwest::Client::new();
    let http_events = if full { 200_000 } else { 2_000 };
    let batch = 1_000;
    let began_http = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..4 {
        let client = client.clone();
        let key = key.clone();
        let agents = agents.clone();
        let now = now.clone();
        tasks.push(tokio::spawn(async move {
            let mut i = w * batch;
            while i < http_events {
                let body: Vec<serde_json::Value> = (i..(i + batch).min(http_events))
                    .map(|j| serde_json::from_slice(&event(org, &agents, 10_000_000 + j, &now)).unwrap())
                    .collect();
                let resp = client
                    .post(format!("http://{addr}/api/v1/usage/events"))
                    .header("x-api-key", &key)
                    .json(&body)
                    .send()
                    .await
                    .unwrap();
                assert!(resp.status().is_success(), "HTTP ingest: {}", resp.status());
                i += 4 * batch;
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let http_secs = began_http.elapsed().as_secs_f64();

    // 4. One org-month whose rollups hold `stored` events: 8 agents x 4 models x 720 hours, plus
    // tools, agent runs and messages, as the ingest writes them (raw rows are not read by it).
    let month_org = org;
    let hours = 720i64;
    let per_row = (stored as i64 / (hours * 8 * 4)).max(1);
    sqlx::query(
        "insert into usage_rollup_hourly (organization_id, bucket, kind, agent_id, dimension, events, successes,
             failures, prompt_tokens, completion_tokens, total_tokens, cost_micros, latency_count, latency_sum_ms,
             latency_max_ms, latency_buckets, invocations, llm_calls, tool_calls, duration_ms, message_length)
         select $1, date_trunc('hour', now(), 'UTC') - make_interval(hours => (h + 2)::int4), k.kind, a.agent, k.dim,
                $2, $2, 0, $2 * 100, $2 * 20, $2 * 120, $2 * 300, $2, $2 * 200, 900,
                array[0, $2, 0, 0, 0, 0, 0, 0, 0, 0, 0]::int8[], 0, 0, 0, 0, 0
         from generate_series(0, $3::int4 - 1) h, unnest($4::uuid[]) a(agent),
              (values ('llm', 'gpt-4o'), ('llm', 'gpt-4o-mini'), ('llm', 'claude-sonnet-4'), ('tool', 'search'),
                      ('agent', ''), ('message', '')) k(kind, dim)
         on conflict do nothing",
    )
    .bind(month_org)
    .bind(per_row)
    .bind(hours)
    .bind(&agents)
    .execute(&db)
    .await
    .unwrap();
    sqlx::query(
        "insert into usage_rollup_daily (organization_id, bucket, kind, agent_id, dimension, events, successes,
             failures, prompt_tokens, completion_tokens, total_tokens, cost_micros, latency_count, latency_sum_ms,
             latency_max_ms, latency_buckets, invocations, llm_calls, tool_calls, duration_ms, message_length)
         select organization_id, date_trunc('day', bucket, 'UTC'), kind, agent_id, dimension, sum(events)::int8,
                sum(successes)::int8, 0, sum(prompt_tokens)::int8, sum(completion_tokens)::int8,
                sum(total_tokens)::int8, sum(cost_micros)::int8, sum(latency_count)::int8, sum(latency_sum_ms)::int8,
                max(latency_max_ms), array[0, sum(events), 0, 0, 0, 0, 0, 0, 0, 0, 0]::int8[], 0, 0, 0, 0, 0
         from usage_rollup_hourly where organization_id = $1 and bucket < date_trunc('hour', now(), 'UTC') - interval '1 hour'
         group by 1, 2, 3, 4, 5
         on conflict do nothing",
    )
    .bind(month_org)
    .execute(&db)
    .await
    .unwrap();
    let in_month: i64 =
        sqlx::query_scalar("select sum(events)::int8 from usage_rollup_hourly where organization_id = $1")
            .bind(month_org)
            .fetch_one(&db)
            .await
            .unwrap();
    let since = (time::OffsetDateTime::now_utc() - time::Duration::days(30))
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap();
    let summary_url = format!("http://{addr}/api/v1/usage/summary?since={since}");
    let mut summary_ms = Vec::with_capacity(samples);
    for _ in 0..samples {
        let t = Instant::now();
        let r = client.get(&summary_url).header("x-api-key", &key).send().await.unwrap();
        assert!(r.status().is_success());
        let _ = r.bytes().await.unwrap();
        summary_ms.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    summary_ms.sort_by(|a, b| a.partial_cmp(b).unwrap());

    // 5. The entitlement check over HTTP, with an organization and an agent budget.
    for (agent, limit) in [(None, 1_000_000_000_000i64), (Some(agents[0]), 1_000_000_000)] {
        sqlx::query("insert into usage_budget (usage_budget_id, organization_id, agent_id, token_limit) values ($1, $2, $3, $4)")
            .bind(Uuid::now_v7())
            .bind(org)
            .bind(agent)
            .bind(limit)
            .execute(&db)
            .await
            .unwrap();
    }
    let ent_url = format!("http://{addr}/api/v1/usage/entitlements?agent_id={}", agents[0]);
    let mut ent_ms = Vec::with_capacity(samples * 5);
    for _ in 0..samples * 5 {
        let t = Instant::now();
        let r = client.get(&ent_url).header("x-api-key", &key).send().await.unwrap();
        assert!(r.status().is_success());
        let _ = r.bytes().await.unwrap();
        ent_ms.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    ent_ms.sort_by(|a, b| a.partial_cmp(b).unwrap());

    let _ = stop.send(());
    let _ = server.await;
    let _ = js.delete_stream(&stream).await;
    db.close().await;
    let _ = sqlx::query(&format!("drop database if exists {db_name} with (force)")).execute(&mut conn).await;

    println!("usage metering (one instance, in-process; Postgres, Redis and NATS on loopback)");
    println!(
        "  NATS backlog of {backlog} LLM events to durable rows with hourly and daily rollups: {:.2} s, {:.0} events/s",
        drained.as_secs_f64(),
        backlog as f64 / drained.as_secs_f64()
    );
    if !lags.is_empty() {
        println!(
            "  publish to queryable at {rate} events/s for {steady_secs} s: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms ({} events)",
            percentile(&lags, 0.5),
            percentile(&lags, 0.99),
            lags[lags.len() - 1],
            lags.len()
        );
    }
    println!(
        "  HTTP batch ingest ({batch} per request, 4 at once): {http_events} events in {http_secs:.2} s, {:.0} events/s",
        http_events as f64 / http_secs
    );
    println!(
        "  GET /api/v1/usage/summary over 30 days, {in_month} events in the rollups: p50 {:.2} ms, p99 {:.2} ms ({samples} requests)",
        percentile(&summary_ms, 0.5),
        percentile(&summary_ms, 0.99)
    );
    println!(
        "  GET /api/v1/usage/entitlements: p50 {:.3} ms, p99 {:.3} ms ({} sequential requests)",
        percentile(&ent_ms, 0.5),
        percentile(&ent_ms, 0.99),
        ent_ms.len()
    );
}

/// A service key with the usage scopes, made through the API by the bootstrap owner.
async fn service_key(addr: &std::net::SocketAddr) -> String {
    let client = reqwest::Client::new();
    let login: serde_json::Value = client
        .post(format!("http://{addr}/auth/login"))
        .json(&json!({ "email": "bench@bench.test", "password": "bench-password-0123" }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let token = login["session_token"].as_str().unwrap();
    let key: serde_json::Value = client
        .post(format!("http://{addr}/auth/api-keys"))
        .bearer_auth(token)
        .json(&json!({ "description": "bench", "service": true, "scopes": ["usage:read", "usage:write"] }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    key["key"].as_str().unwrap().to_owned()
}
