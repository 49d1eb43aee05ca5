//! The outbox's feed to NATS JetStream (`events.nats`): every committed event, as its CloudEvents
//! JSON, on `<subject_prefix>.<type>`.
//!
//! Events are taken from the outbox with `FOR UPDATE SKIP LOCKED` (so instances share the work),
//! published, and marked published only after JetStream acknowledged each, in the same
//! transaction: an instance that dies mid-batch leaves the batch to the next. The `Nats-Msg-Id`
//! header is the event id, so JetStream drops a repeat within its duplicate window.

use std::{sync::Arc, time::Duration};

use tokio::sync::{Notify, watch};
use uuid::Uuid;

use crate::{config::NatsConfig, state::AppState};

/// The running publisher and the switch that stops it.
pub struct Publisher {
    pub task: tokio::task::JoinHandle<()>,
    pub stop: watch::Sender<bool>,
}

/// Starts publishing, when `events.nats.enabled`.
pub fn spawn(state: &AppState) -> Option<Publisher> {
    if !state.config().events.nats.enabled {
        return None;
    }
    let (stop, rx) = watch::channel(false);
    Some(Publisher { task: tokio::spawn(run(state.clone(), rx)), stop })
}

async fn run(state: AppState, mut stop: watch::Receiver<bool>) {
    let cfg = state.config().events.nats.clone();
    let wake = Arc::new(Notify::new());
    let listener = tokio::spawn(super::listen(state.db().clone(), wake.clone()));
    let mut warned = false;
    'connect: while !*stop.borrow() {
        let js = match connect(&cfg).await {
            Ok(js) => js,
            Err(e) => {
                if !std::mem::replace(&mut warned, true) {
                    tracing::warn!(error = %e, "NATS unreachable; events wait in the outbox");
                }
                tokio::select! { _ = stop.changed() => {}, _ = tokio::time::sleep(Duration::from_secs(1)) => {} }
                continue;
            }
        };
        loop {
            if *stop.borrow() {
                break 'connect;
            }
            match publish_batch(&state, &js, &cfg).await {
                Ok(n) => {
                    warned = false;
                    if n as u32 >= cfg.batch_size {
                        continue;
                    }
                }
                Err(e) => {
                    if !std::mem::replace(&mut warned, true) {
                        tracing::warn!(error = %e, "publishing events to NATS failed; retrying");
                    }
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue 'connect;
                }
            }
            tokio::select! {
                _ = stop.changed() => {}
                _ = wake.notified() => {}
                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            }
        }
    }
    listener.abort();
}

async fn connect(cfg: &NatsConfig) -> anyhow::Result<async_nats::jetstream::Context> {
    let client = async_nats::ConnectOptions::new()
        .connection_timeout(Duration::from_secs(5))
        .name("agentidp-events")
        .connect(cfg.url.as_str())
        .await?;
    let js = async_nats::jetstream::new(client);
    js.get_or_create_stream(async_nats::jetstream::stream::Config {
        name: cfg.stream.clone(),
        subjects: vec![format!("{}.>", cfg.subject_prefix)],
        max_age: Duration::from_secs(cfg.max_age_days as u64 * 86_400),
        duplicate_window: Duration::from_secs(120),
        ..Default::default()
    })
    .await
    .map_err(|e| anyhow::anyhow!("stream {}: {e}", cfg.stream))?;
    Ok(js)
}

/// Publishes up to one batch; returns how many events it published.
async fn publish_batch(
    state: &AppState,
    js: &async_nats::jetstream::Context,
    cfg: &NatsConfig,
) -> anyhow::Result<usize> {
    let mut tx = state.db().begin().await?;
    let ids: Vec<Uuid> = sqlx::query_scalar!(
        "select event_id from event_outbox where published_at is null
         order by event_id limit $1 for update skip locked",
        cfg.batch_size as i64
    )
    .fetch_all(&mut *tx)
    .await?;
    if ids.is_empty() {
        return Ok(0);
    }
    let events = super::load(&mut *tx, &ids).await?;
    let source = &state.config().server.public_url;
    let mut acks = Vec::with_capacity(events.len());
    for e in &events {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Msg-Id", e.id.to_string().as_str());
        let subject = format!("{}.{}", cfg.subject_prefix, e.event_type);
        acks.push(js.publish_with_headers(subject, headers, e.envelope(source, e.org_id).into()).await?);
    }
    for ack in acks {
        ack.await?;
    }
    sqlx::query!("update event_outbox set published_at = now() where event_id = any($1)", &ids)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    metrics::counter!("events_published_total").increment(ids.len() as u64);
    Ok(ids.len())
}
