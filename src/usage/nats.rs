//! The durable NATS JetStream ingest (`usage.nats`).
//!
//! At start-up a stream over `usage.llm`, `usage.tool`, `usage.agent` and
//! `messaging.message.created` (after `<subject_prefix>.` when one is set) and a durable pull
//! consumer on it are created when missing, so events published while no instance runs wait in
//! the stream. Batches are fetched, written in one transaction ([`super::ingest::ingest`]) and
//! acknowledged only after the commit: an instance killed mid-batch leaves the batch
//! unacknowledged and JetStream delivers it again (to any instance sharing the consumer), where
//! what did commit is a duplicate and counts nothing. A message that cannot be counted (not JSON,
//! not UTF-8, too large, a bad field, an unknown organization or agent) is kept in
//! `usage_rejected` with the reason and the start of its payload (once per stream sequence, however
//! often it is delivered), counted in `usage_events_rejected_total`, and acknowledged: never
//! silently dropped, never retried forever.

use std::time::Duration;

use async_nats::jetstream::{
    self, AckKind,
    consumer::{AckPolicy, pull},
    stream,
};
use futures_util::StreamExt;
use tokio::sync::watch;
use uuid::Uuid;

use super::{
    UsageNatsConfig,
    ingest::{self, Outcome, Source},
    model::{self, Kind, Rejection},
};
use crate::state::AppState;

/// The running consumer and the switch that stops it.
pub struct Ingest {
    pub task: tokio::task::JoinHandle<()>,
    pub stop: watch::Sender<bool>,
}

/// Starts the ingest, when `usage.nats.enabled`.
pub fn spawn(state: &AppState) -> Option<Ingest> {
    if !state.config().usage.nats.enabled {
        return None;
    }
    let (stop, rx) = watch::channel(false);
    Some(Ingest { task: tokio::spawn(run(state.clone(), rx)), stop })
}

/// The subjects of the stream, with the kind each carries.
pub fn subjects(cfg: &UsageNatsConfig) -> Vec<(String, Kind)> {
    Kind::ALL
        .iter()
        .map(|k| {
            let s = if cfg.subject_prefix.is_empty() {
                k.subject().to_owned()
            } else {
                format!("{}.{}", cfg.subject_prefix, k.subject())
            };
            (s, *k)
        })
        .collect()
}

async fn run(state: AppState, mut stop: watch::Receiver<bool>) {
    let cfg = state.config().usage.nats.clone();
    let mut warned = false;
    while !*stop.borrow() {
        let consumer = match connect(&cfg).await {
            Ok(c) => c,
            Err(e) => {
                if !std::mem::replace(&mut warned, true) {
                    tracing::warn!(error = %e, "NATS unreachable; usage events wait in the stream");
                }
                tokio::select! { _ = stop.changed() => {}, _ = tokio::time::sleep(Duration::from_secs(1)) => {} }
                continue;
            }
        };
        warned = false;
        loop {
            if *stop.borrow() {
                return;
            }
            match one_batch(&state, &consumer, &cfg).await {
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "usage ingest from NATS failed; the batch will be delivered again");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    break;
                }
            }
        }
    }
}

async fn connect(cfg: &UsageNatsConfig) -> anyhow::Result<jetstream::consumer::Consumer<pull::Config>> {
    let client = async_nats::ConnectOptions::new()
        .connection_timeout(Duration::from_secs(5))
        .name("agentidp-usage")
        .connect(cfg.url.as_str())
        .await?;
    let js = jetstream::new(client);
    let stream = js
        .get_or_create_stream(stream::Config {
            name: cfg.stream.clone(),
            subjects: subjects(cfg).into_iter().map(|(s, _)| s).collect(),
            max_age: Duration::from_secs(cfg.max_age_days as u64 * 86_400),
            duplicate_window: Duration::from_secs(120),
            ..Default::default()
        })
        .await
        .map_err(|e| anyhow::anyhow!("stream {}: {e}", cfg.stream))?;
    let consumer = stream
        .get_or_create_consumer(
            &cfg.consumer,
            pull::Config {
                durable_name: Some(cfg.consumer.clone()),
                ack_policy: AckPolicy::Explicit,
                ack_wait: Duration::from_secs(cfg.ack_wait_secs.max(1)),
                // No max_batch: instances sharing the consumer may fetch batches of different
                // sizes (the first one's settings stay on the durable consumer).
                max_ack_pending: (cfg.batch_size as i64 * 4).max(1000),
                ..Default::default()
            },
        )
        .await
        .map_err(|e| anyhow::anyhow!("consumer {}: {e}", cfg.consumer))?;
    Ok(consumer)
}

/// Fetches, counts and acknowledges one batch; returns how many messages it held.
async fn one_batch(
    state: &AppState,
    consumer: &jetstream::consumer::Consumer<pull::Config>,
    cfg: &UsageNatsConfig,
) -> anyhow::Result<usize> {
    let mut batch = consumer
        .batch()
        .max_messages(cfg.batch_size)
        .expires(Duration::from_millis(cfg.fetch_wait_ms.max(10)))
        .messages()
        .await?;
    let mut messages = Vec::with_capacity(cfg.batch_size);
    while let Some(m) = batch.next().await {
        match m {
            Ok(m) => messages.push(m),
            Err(e) => {
                tracing::debug!(error = %e, "fetch ended");
                break;
            }
        }
    }
    if messages.is_empty() {
        return Ok(0);
    }
    let subjects = subjects(cfg);
    let limits = super::handlers::limits(state);
    let max = state.config().usage.max_event_bytes;
    let mut events = Vec::with_capacity(messages.len());
    let mut orgs: Vec<Option<Uuid>> = Vec::with_capacity(messages.len());
    for m in &messages {
        let kind = subjects.iter().find(|(s, _)| s.as_str() == m.subject.as_str()).map(|(_, k)| *k);
        let (org, result) = decode(&m.payload, kind, max, &limits);
        orgs.push(org);
        events.push(result);
    }
    let outcomes = match ingest::ingest(state, events, Source::Nats).await {
        Ok(o) => o,
        Err(e) => {
            // Nothing committed: ask for the batch again soon, rather than after ack_wait.
            for m in &messages {
                let _ = m.ack_with(AckKind::Nak(Some(Duration::from_secs(1)))).await;
            }
            return Err(e);
        }
    };
    let keep = state.config().usage.rejected_payload_bytes;
    let mut r_orgs = Vec::new();
    let mut r_subjects = Vec::new();
    let mut r_reasons = Vec::new();
    let mut r_payloads = Vec::new();
    let mut r_sizes = Vec::new();
    let mut r_streams = Vec::new();
    let mut r_seqs = Vec::new();
    for ((m, o), org) in messages.iter().zip(&outcomes).zip(&orgs) {
        if let Outcome::Rejected(r) = o {
            let info = m.info().ok();
            r_streams.push(info.as_ref().map(|i| i.stream.to_owned()));
            r_seqs.push(info.map(|i| i.stream_sequence.min(i64::MAX as u64) as i64));
            r_orgs.push(*org);
            r_subjects.push(m.subject.as_str().chars().take(200).collect::<String>());
            r_reasons.push(format!("{}: {}", r.code, r.reason));
            r_payloads.push(m.payload[..m.payload.len().min(keep)].to_vec());
            r_sizes.push(m.payload.len().min(i32::MAX as usize) as i32);
        }
    }
    if !r_reasons.is_empty() {
        // A message delivered again after this was written (its acknowledgement lost or late)
        // finds its stream sequence taken: kept once.
        sqlx::query!(
            "insert into usage_rejected (organization_id, subject, reason, payload, payload_bytes, stream, stream_seq)
             select * from unnest($1::uuid[], $2::text[], $3::text[], $4::bytea[], $5::int4[], $6::text[], $7::int8[])
             on conflict (stream, stream_seq) do nothing",
            &r_orgs as &[Option<Uuid>],
            &r_subjects,
            &r_reasons,
            &r_payloads,
            &r_sizes,
            &r_streams as &[Option<String>],
            &r_seqs as &[Option<i64>]
        )
        .execute(state.db())
        .await?;
    }
    // Acknowledged only now: every event of the batch is counted, a duplicate, or kept as rejected.
    let acks = messages.iter().map(|m| m.ack());
    for r in futures_util::future::join_all(acks).await {
        if let Err(e) = r {
            tracing::debug!(error = %e, "ack failed; the message will be delivered again and be a duplicate");
        }
    }
    Ok(messages.len())
}

/// One message's event, or why it is not one; and the organization it names, if it parses.
fn decode(
    payload: &[u8],
    kind: Option<Kind>,
    max: usize,
    limits: &model::Limits,
) -> (Option<Uuid>, Result<model::UsageEvent, Rejection>) {
    if payload.len() > max {
        return (None, Err(Rejection::new("too_large", format!("an event is at most {max} bytes"))));
    }
    let Some(kind) = kind else {
        return (None, Err(Rejection::new("unknown_kind", "the subject names no kind")));
    };
    if std::str::from_utf8(payload).is_err() {
        return (None, Err(Rejection::new("invalid_json", "the payload is not UTF-8")));
    }
    let value: serde_json::Value = match serde_json::from_slice(payload) {
        Ok(v) => v,
        Err(e) => return (None, Err(Rejection::new("invalid_json", format!("not JSON: {e}")))),
    };
    let parsed = model::parse(&value, Some(kind), None, limits);
    (parsed.org_id, parsed.result)
}
