//! Webhook delivery from the outbox to a local receiver that answers 200 at once, with every
//! delivery and attempt recorded in Postgres: deliveries per second (a backlog drained), the
//! latency from commit to receipt at a steady rate (p50, p99), and what `events::emit` adds to a
//! transaction. `cargo bench --bench webhooks` (or `make bench`); needs the test Postgres and
//! Redis. Under `cargo test` it runs a few events as a smoke check only.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use agentidp::{app::Application, config::Config, redis::Redis};
use axum::{extract::State, http::HeaderMap, routing::post};
use figment::{
    Figment,
    providers::{Format, Serialized, Toml},
};
use serde_json::json;
use sqlx::{Connection, PgConnection, PgPool};
use uuid::Uuid;

type Receipts = Arc<Mutex<HashMap<Uuid, Instant>>>;

async fn receive(State(r): State<Receipts>, headers: HeaderMap) -> &'static str {
    if let Some(id) = headers.get("webhook-id").and_then(|v| v.to_str().ok()).and_then(|v| v.parse().ok()) {
        r.lock().unwrap().entry(id).or_insert_with(Instant::now);
    }
    "ok"
}

fn admin_url() -> String {
    std::env::var("AGENTIDP_TEST_DATABASE_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

async fn wait_for(receipts: &Receipts, n: usize, limit: Duration) -> bool {
    let start = Instant::now();
    while receipts.lock().unwrap().len() < n {
        if start.elapsed() > limit {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    true
}

async fn emit(db: &PgPool, org: Uuid, events_per_tx: usize) -> Vec<Uuid> {
    let mut tx = db.begin().await.unwrap();
    let mut ids = Vec::with_capacity(events_per_tx);
    for _ in 0..events_per_tx {
        let data = json!({ "agent_id": Uuid::now_v7(), "name": "bench", "status": "active" });
        ids.push(agentidp::events::emit(&mut tx, org, "agent.updated", "agents/bench", data).await.unwrap());
    }
    tx.commit().await.unwrap();
    ids
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() as f64 * p) as usize).min(sorted.len() - 1)]
}

#[tokio::main]
async fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let (events, steady_secs, emit_samples) = if full { (20_000, 10, 2_000) } else { (50, 1, 20) };
    let _ = rustls::crypto::ring::default_provider().install_default();

    let db_name = format!("agentidp_bench_webhooks_{}", std::process::id());
    let admin = admin_url();
    let mut conn = PgConnection::connect(&admin).await.expect("the test Postgres");
    // Left by an interrupted run.
    let stale: Vec<String> =
        sqlx::query_scalar("select datname from pg_database where datname like 'agentidp\\_bench\\_webhooks\\_%'")
            .fetch_all(&mut conn)
            .await
            .unwrap();
    for d in stale {
        let _ = sqlx::query(&format!("drop database if exists {d} with (force)")).execute(&mut conn).await;
    }
    sqlx::query(&format!("create database {db_name}")).execute(&mut conn).await.unwrap();
    let db_url = format!("{}/{db_name}", admin.rsplit_once('/').unwrap().0);

    let config = |dispatcher: bool| -> Config {
        Config::from_figment(
            Figment::from(Toml::string(agentidp::config::DEFAULTS))
                .merge(Serialized::default("server.bind", "127.0.0.1:0"))
                .merge(Serialized::default("database.url", &db_url))
                .merge(Serialized::default("database.max_connections", 32))
                .merge(Serialized::default("log.level", "warn"))
                .merge(Serialized::default("webhooks.dispatcher", dispatcher))
                .merge(Serialized::default("webhooks.allow_private_networks", true))
                .merge(Serialized::default("webhooks.batch_size", 500))
                .merge(Serialized::default("webhooks.concurrency", 128))
                .merge(Serialized::default("retention.interval_secs", 0)),
        )
        .expect("bench configuration")
    };
    let start = |cfg: Config| async move {
        let db = agentidp::db::pool_options(&cfg.database).connect(&cfg.database.url).await.unwrap();
        agentidp::db::migrate(&db).await.unwrap();
        let prefix = format!("bench:{}:", Uuid::new_v4().simple());
        let redis = Redis::with_prefix(&cfg.redis, prefix).unwrap();
        let app = Application::with_parts(cfg, db.clone(), redis).await.unwrap();
        let state = app.state().clone();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(app.run_until(async move {
            let _ = rx.await;
        }));
        (db, state, tx, server)
    };

    // The receiver.
    let receipts: Receipts = Arc::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    let router = axum::Router::new().route("/hook", post(receive)).with_state(receipts.clone());
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });

    // An organization and an endpoint subscribed to everything; no dispatcher yet.
    let (db, state, stop, server) = start(config(false)).await;
    let org = match agentidp::auth::bootstrap::run(&db, "Bench", "bench@bench.test", Some("bench-password-0123".into()))
        .await
        .unwrap()
    {
        agentidp::auth::bootstrap::Outcome::Created { org_id, .. } => org_id,
        agentidp::auth::bootstrap::Outcome::AlreadyDone(w) => panic!("{w}"),
    };
    let endpoint = Uuid::now_v7();
    let sealed = state.keys().seal(&format!("webhook_endpoint:{endpoint}"), &[7u8; 32]).unwrap();
    sqlx::query(
        "insert into webhook_endpoint (webhook_endpoint_id, organization_id, url, event_types, secret_sealed)
         values ($1, $2, $3, '{*}', $4)",
    )
    .bind(endpoint)
    .bind(org)
    .bind(&url)
    .bind(sealed)
    .execute(&db)
    .await
    .unwrap();

    // What emit adds to a transaction: the same small write with and without it.
    let mut with = Duration::ZERO;
    let mut without = Duration::ZERO;
    for i in 0..emit_samples {
        let t = Instant::now();
        let mut tx = db.begin().await.unwrap();
        sqlx::query("update organization set name = name where organization_id = $1")
            .bind(org)
            .execute(&mut *tx)
            .await
            .unwrap();
        if i % 2 == 0 {
            let data = json!({ "agent_id": Uuid::now_v7(), "name": "bench", "status": "active" });
            agentidp::events::emit(&mut tx, org, "agent.updated", "agents/bench", data).await.unwrap();
        }
        tx.commit().await.unwrap();
        if i % 2 == 0 { with += t.elapsed() } else { without += t.elapsed() }
    }
    let half = (emit_samples / 2) as u32;
    let (with, without) = (with / half, without / half);

    // A backlog in the outbox, drained by one dispatcher.
    let mut ids = Vec::with_capacity(events);
    while ids.len() < events {
        ids.extend(emit(&db, org, 100.min(events - ids.len())).await);
    }
    // Everything in the outbox: the backlog, the emit samples, the start-up key rotation.
    let waiting: i64 = sqlx::query_scalar("select count(*) from event_outbox where fanned_out_at is null")
        .fetch_one(&db)
        .await
        .unwrap();
    let backlog = waiting as usize;
    let _ = stop.send(());
    let _ = server.await;
    receipts.lock().unwrap().clear();
    let began = Instant::now();
    let (db, _state, stop, server) = start(config(true)).await;
    assert!(wait_for(&receipts, backlog, Duration::from_secs(300)).await, "the backlog was delivered");
    let received = began.elapsed();
    loop {
        let pending: i64 = sqlx::query_scalar("select count(*) from webhook_delivery where status <> 'succeeded'")
            .fetch_one(&db)
            .await
            .unwrap();
        if pending == 0 || began.elapsed() > Duration::from_secs(300) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let settled = began.elapsed();

    // A steady 1,000 events per second, each in its own transaction; commit to receipt.
    receipts.lock().unwrap().clear();
    let committed: Arc<Mutex<Vec<(Uuid, Instant)>>> = Arc::default();
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let steady_start = Instant::now();
    let mut writers = Vec::new();
    while steady_start.elapsed() < Duration::from_secs(steady_secs) {
        tick.tick().await;
        let (db, committed) = (db.clone(), committed.clone());
        writers.push(tokio::spawn(async move {
            let id = emit(&db, org, 1).await[0];
            committed.lock().unwrap().push((id, Instant::now()));
        }));
    }
    for w in writers {
        let _ = w.await;
    }
    let committed = committed.lock().unwrap().clone();
    let rate = committed.len() as f64 / steady_start.elapsed().as_secs_f64();
    assert!(wait_for(&receipts, committed.len(), Duration::from_secs(60)).await, "the steady events arrived");
    let got = receipts.lock().unwrap().clone();
    let mut latencies: Vec<f64> = committed
        .iter()
        .filter_map(|(id, at)| got.get(id).map(|r| r.saturating_duration_since(*at).as_secs_f64() * 1000.0))
        .collect();
    latencies.sort_by(f64::total_cmp);
    let _ = stop.send(());
    let _ = server.await;
    db.close().await;
    let _ = sqlx::query(&format!("drop database if exists {db_name} with (force)")).execute(&mut conn).await;

    println!("webhooks (one dispatcher, receiver on loopback answering 200, every attempt recorded):");
    println!(
        "  backlog of {backlog}: {:.0} deliveries/s received, {:.0}/s recorded as succeeded",
        backlog as f64 / received.as_secs_f64(),
        backlog as f64 / settled.as_secs_f64()
    );
    println!(
        "  steady {rate:.0} events/s for {steady_secs} s: commit to receipt p50 {:.1} ms, p99 {:.1} ms",
        percentile(&latencies, 0.50),
        percentile(&latencies, 0.99)
    );
    println!(
        "  events::emit in a transaction: {:.0} µs with, {:.0} µs without (+{:.0} µs)",
        with.as_secs_f64() * 1e6,
        without.as_secs_f64() * 1e6,
        (with.as_secs_f64() - without.as_secs_f64()) * 1e6
    );
}
