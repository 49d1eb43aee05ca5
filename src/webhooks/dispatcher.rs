//! The dispatcher: runs in every instance and shares the work with the others through Postgres.
//!
//! Each round it fans new outbox events out into deliveries (each event once, whichever instance
//! takes it), then claims due deliveries with `FOR UPDATE SKIP LOCKED` and a lease, and attempts
//! them. A delivery is settled only by the instance that holds its lease; an instance that dies
//! lets the lease lapse and another attempts the delivery again. So every event reaches every
//! subscribed endpoint at least once, and exactly once when no instance dies mid-attempt.
//!
//! Schedule decisions (when a retry is due, how long an endpoint has failed) read the application
//! clock, so tests move time instead of waiting; leases read Postgres' clock.

use std::{
    collections::HashMap,
    sync::{Arc, atomic::Ordering},
    time::{Duration, Instant},
};

use futures_util::StreamExt;
use serde_json::json;
use time::OffsetDateTime;
use tokio::sync::{Notify, watch};
use uuid::Uuid;

use super::{insert_deliveries, signing, ssrf};
use crate::{
    audit::{self, Event},
    events::{self, StoredEvent},
    state::AppState,
};

/// Runs rounds until `stop`; the attempts of the round in progress finish first.
pub(super) async fn run(state: AppState, mut stop: watch::Receiver<bool>) {
    let status = state.webhooks().status.clone();
    status.running.store(true, Ordering::Relaxed);
    let wake = Arc::new(Notify::new());
    let listener = tokio::spawn(events::listen(state.db().clone(), wake.clone()));
    let poll = Duration::from_millis(state.config().webhooks.poll_interval_ms);
    let batch = state.config().webhooks.batch_size as usize;
    let mut last_gauges = Instant::now() - Duration::from_secs(60);
    loop {
        if *stop.borrow() {
            break;
        }
        let claimed = match round(&state).await {
            Ok(n) => {
                status.failing.store(false, Ordering::Relaxed);
                status.last_round.store(OffsetDateTime::now_utc().unix_timestamp(), Ordering::Relaxed);
                n
            }
            Err(e) => {
                if !status.failing.swap(true, Ordering::Relaxed) {
                    tracing::warn!(error = %e, "webhook dispatcher cannot work; waiting for Postgres");
                }
                0
            }
        };
        if last_gauges.elapsed() >= Duration::from_secs(5) {
            last_gauges = Instant::now();
            gauges(&state).await;
        }
        if claimed >= batch {
            continue;
        }
        tokio::select! {
            _ = stop.changed() => {}
            _ = wake.notified() => {}
            _ = tokio::time::sleep(poll) => {}
        }
    }
    listener.abort();
    status.running.store(false, Ordering::Relaxed);
}

async fn gauges(state: &AppState) {
    let pending = sqlx::query!(
        r#"select count(*) as "n!", coalesce(extract(epoch from now() - min(created_at))::float8, 0) as "age!"
           from webhook_delivery where status = 'pending'"#
    )
    .fetch_one(state.db())
    .await;
    let backlog = events::backlog(state.db()).await;
    if let (Ok(p), Ok((n, age))) = (pending, backlog) {
        let depth = p.n + n;
        let oldest = p.age.max(age);
        metrics::gauge!("webhook_queue_depth").set(depth as f64);
        metrics::gauge!("webhook_oldest_undelivered_seconds").set(oldest);
        let s = &state.webhooks().status;
        s.queue_depth.store(depth, Ordering::Relaxed);
        s.oldest_ms.store((oldest * 1000.0) as i64, Ordering::Relaxed);
    }
}

/// One round: fan out, claim, attempt. Returns how many deliveries were claimed.
async fn round(state: &AppState) -> anyhow::Result<usize> {
    let cfg = &state.config().webhooks;
    // Fan out everything new first, so that claims see it.
    loop {
        let mut tx = state.db().begin().await?;
        let nats = state.config().events.nats.enabled;
        let pending = events::claim_unfanned(&mut tx, cfg.batch_size as i64, nats).await?;
        insert_deliveries(&mut tx, &pending, state.clock().now(), None).await?;
        tx.commit().await?;
        if pending.len() < cfg.batch_size as usize {
            break;
        }
    }
    let claimed = claim(state).await?;
    let n = claimed.len();
    if n == 0 {
        return Ok(0);
    }
    let event_ids: Vec<Uuid> = claimed.iter().map(|c| c.event_id).collect();
    let endpoint_ids: Vec<Uuid> = claimed.iter().map(|c| c.endpoint_id).collect();
    let events: HashMap<Uuid, StoredEvent> =
        events::load(state.db(), &event_ids).await?.into_iter().map(|e| (e.id, e)).collect();
    let targets = targets(state, &endpoint_ids).await?;
    let succeeded: Vec<(Claimed, Attempt)> = futures_util::stream::iter(claimed)
        .map(|c| {
            let event = events.get(&c.event_id);
            let target = targets.get(&c.endpoint_id);
            async move {
                match (event, target) {
                    (Some(event), Some(target)) => deliver(state, c, event, target).await,
                    _ => None,
                }
            }
        })
        .buffer_unordered(cfg.concurrency)
        .filter_map(|s| async move { s })
        .collect()
        .await;
    if let Err(e) = settle_succeeded(state, &succeeded).await {
        // The leases lapse and the deliveries go out again: at least once, never lost.
        tracing::warn!(error = %e, "could not record successful webhook attempts");
    }
    Ok(n)
}

/// A delivery this instance holds the lease of.
struct Claimed {
    id: Uuid,
    endpoint_id: Uuid,
    org_id: Uuid,
    event_id: Uuid,
    attempts: i32,
    lease: Uuid,
}

async fn claim(state: &AppState) -> Result<Vec<Claimed>, sqlx::Error> {
    let cfg = &state.config().webhooks;
    let lease = Uuid::new_v4();
    let rows = sqlx::query!(
        "update webhook_delivery set lease_until = now() + make_interval(secs => $2), lease_token = $3
         where webhook_delivery_id in (
             select d.webhook_delivery_id from webhook_delivery d
             join webhook_endpoint e on e.webhook_endpoint_id = d.webhook_endpoint_id and e.enabled
             where d.status = 'pending' and d.next_attempt_at <= $1
               and (d.lease_until is null or d.lease_until < now())
             order by d.next_attempt_at limit $4
             for update of d skip locked)
         returning webhook_delivery_id, webhook_endpoint_id, organization_id, event_id, attempts",
        state.clock().now(),
        cfg.lease_secs as f64,
        lease,
        cfg.batch_size as i64
    )
    .fetch_all(state.db())
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| Claimed {
            id: r.webhook_delivery_id,
            endpoint_id: r.webhook_endpoint_id,
            org_id: r.organization_id,
            event_id: r.event_id,
            attempts: r.attempts,
            lease,
        })
        .collect())
}

/// Where and with what an endpoint's deliveries are sent.
struct Target {
    url: String,
    secrets: Vec<Vec<u8>>,
}

async fn targets(state: &AppState, ids: &[Uuid]) -> anyhow::Result<HashMap<Uuid, Target>> {
    let rows = sqlx::query!(
        "select webhook_endpoint_id, url, secret_sealed, previous_secret_sealed, previous_secret_expires_at
         from webhook_endpoint where webhook_endpoint_id = any($1)",
        ids
    )
    .fetch_all(state.db())
    .await?;
    let now = state.clock().now();
    let mut out = HashMap::with_capacity(rows.len());
    for r in rows {
        let label = super::handlers::seal_label(r.webhook_endpoint_id);
        let mut secrets = vec![state.keys().unseal(&label, &r.secret_sealed)?];
        if let (Some(prev), Some(until)) = (r.previous_secret_sealed, r.previous_secret_expires_at)
            && until > now
        {
            secrets.push(state.keys().unseal(&label, &prev)?);
        }
        out.insert(r.webhook_endpoint_id, Target { url: r.url, secrets });
    }
    Ok(out)
}

/// What one attempt came to.
enum Outcome {
    Success,
    /// 410 Gone: the receiver wants no more.
    Gone,
    Failure,
}

struct Attempt {
    status: Option<u16>,
    latency: Duration,
    body: String,
    error: Option<String>,
}

/// Attempts one delivery. A success is handed back, to be recorded with the round's others in one
/// transaction; anything else is recorded at once.
async fn deliver(state: &AppState, c: Claimed, event: &StoredEvent, target: &Target) -> Option<(Claimed, Attempt)> {
    let attempt = attempt(state, &c, event, target).await;
    let outcome = match attempt.status {
        Some(s) if (200..300).contains(&s) => Outcome::Success,
        Some(410) => Outcome::Gone,
        _ => Outcome::Failure,
    };
    let label = match outcome {
        Outcome::Success => "success",
        Outcome::Gone => "gone",
        Outcome::Failure => "failure",
    };
    metrics::counter!("webhook_attempts_total", "outcome" => label).increment(1);
    metrics::histogram!("webhook_attempt_duration_seconds").record(attempt.latency.as_secs_f64());
    if matches!(outcome, Outcome::Success) {
        return Some((c, attempt));
    }
    if let Err(e) = settle(state, &c, outcome, attempt).await {
        // The lease lapses and another round tries again: at least once, never lost.
        tracing::warn!(error = %e, delivery = %c.id, "could not record a webhook attempt");
    }
    None
}

/// Records a round's successful attempts, in one transaction: those still under this instance's
/// lease are settled, their attempts logged, their endpoints' failure clocks stopped.
async fn settle_succeeded(state: &AppState, done: &[(Claimed, Attempt)]) -> anyhow::Result<()> {
    let Some((first, _)) = done.first() else { return Ok(()) };
    let now = state.clock().now();
    let ids: Vec<Uuid> = done.iter().map(|(c, _)| c.id).collect();
    let codes: Vec<i32> = done.iter().map(|(_, a)| a.status.map(i32::from).unwrap_or(200)).collect();
    let latencies: Vec<i32> = done.iter().map(|(_, a)| a.latency.as_millis().min(i32::MAX as u128) as i32).collect();
    let bodies: Vec<String> = done.iter().map(|(_, a)| a.body.replace('\0', "")).collect();
    let attempt_ids: Vec<Uuid> = done.iter().map(|_| Uuid::now_v7()).collect();
    let mut endpoints: Vec<Uuid> = done.iter().map(|(c, _)| c.endpoint_id).collect();
    endpoints.sort_unstable();
    endpoints.dedup();
    let mut tx = state.db().begin().await?;
    let settled = sqlx::query!(
        "with held as (
             update webhook_delivery d set status = 'succeeded', attempts = d.attempts + 1, lease_until = null,
                    lease_token = null, last_status_code = u.code, last_error = null
             from unnest($1::uuid[], $2::int[]) as u(id, code)
             where d.webhook_delivery_id = u.id and d.lease_token = $3
             returning d.webhook_delivery_id)
         insert into webhook_attempt (webhook_attempt_id, webhook_delivery_id, attempted_at, status_code, latency_ms,
             response_body)
         select a.attempt_id, a.id, $4, a.code, a.latency, a.body
         from unnest($5::uuid[], $1::uuid[], $2::int[], $6::int[], $7::text[]) as a(attempt_id, id, code, latency, body)
         where a.id in (select webhook_delivery_id from held)",
        &ids,
        &codes,
        first.lease,
        now,
        &attempt_ids,
        &latencies,
        &bodies
    )
    .execute(&mut *tx)
    .await?
    .rows_affected();
    // In id order, so that instances settling the same endpoints never deadlock.
    sqlx::query!(
        "update webhook_endpoint set failing_since = null, last_success_at = $2
         where webhook_endpoint_id in (select webhook_endpoint_id from webhook_endpoint
                                       where webhook_endpoint_id = any($1)
                                       order by webhook_endpoint_id for update)",
        &endpoints,
        now
    )
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    metrics::counter!("webhook_deliveries_total", "outcome" => "succeeded").increment(settled);
    Ok(())
}

/// Sends one signed request and reads up to the configured start of the response.
async fn attempt(state: &AppState, c: &Claimed, event: &StoredEvent, target: &Target) -> Attempt {
    let cfg = &state.config().webhooks;
    let started = Instant::now();
    let failed =
        |error: String| Attempt { status: None, latency: started.elapsed(), body: String::new(), error: Some(error) };
    let url = match ssrf::parse(&target.url, false) {
        Ok(u) => u,
        Err(r) => return failed(format!("refused: {}", r.code())),
    };
    // A literal address never reaches the resolver; names are checked by it, after DNS.
    if let Err(r) = ssrf::check_literal(&url, cfg.allow_private_networks) {
        return failed(format!("refused: {}", r.code()));
    }
    let body = event.envelope(&state.config().server.public_url, c.org_id);
    let msg_id = event.id.to_string();
    let timestamp = OffsetDateTime::now_utc().unix_timestamp();
    let signature = signing::header(&target.secrets, &msg_id, timestamp, &body);
    let timeout = Duration::from_secs(cfg.timeout_secs);
    let request = state
        .webhooks()
        .client
        .post(url)
        .timeout(timeout)
        .header("content-type", "application/json")
        .header("webhook-id", &msg_id)
        .header("webhook-timestamp", timestamp.to_string())
        .header("webhook-signature", signature)
        .body(body);
    let exchange = async {
        let mut resp = request.send().await?;
        let status = resp.status().as_u16();
        let mut kept = Vec::new();
        while kept.len() < cfg.response_body_max_bytes {
            match resp.chunk().await {
                Ok(Some(chunk)) => kept.extend_from_slice(&chunk),
                Ok(None) | Err(_) => break,
            }
        }
        kept.truncate(cfg.response_body_max_bytes);
        Ok::<_, reqwest::Error>((status, kept))
    };
    match tokio::time::timeout(timeout + Duration::from_secs(1), exchange).await {
        Ok(Ok((status, kept))) => Attempt {
            status: Some(status),
            latency: started.elapsed(),
            body: String::from_utf8_lossy(&kept).into_owned(),
            error: None,
        },
        Ok(Err(e)) => failed(describe(&e)),
        Err(_) => failed("timeout".into()),
    }
}

/// A short, stable reason for a failed request (refusals by the guard name their reason).
fn describe(e: &reqwest::Error) -> String {
    let mut source: Option<&dyn std::error::Error> = Some(e);
    while let Some(s) = source {
        if let Some(r) = s.downcast_ref::<ssrf::Refused>() {
            return format!("refused: {}", r.code());
        }
        source = s.source();
    }
    if e.is_timeout() {
        "timeout".into()
    } else if e.is_connect() {
        "connect".into()
    } else {
        "request".into()
    }
}

/// When the next attempt is due after `attempts` failed ones, or `None` when retries are spent.
pub fn next_attempt(schedule: &[u64], jitter: f64, attempts: usize, now: OffsetDateTime) -> Option<OffsetDateTime> {
    let wait = *schedule.get(attempts.checked_sub(1)?)? as f64;
    let factor = 1.0 + jitter * (rand::random::<f64>() * 2.0 - 1.0);
    Some(now + time::Duration::seconds_f64(wait * factor))
}

/// Records the attempt and its consequences, if this instance still holds the lease.
async fn settle(state: &AppState, c: &Claimed, outcome: Outcome, a: Attempt) -> anyhow::Result<()> {
    let cfg = &state.config().webhooks;
    let now = state.clock().now();
    let attempts = c.attempts + 1;
    let next = match outcome {
        Outcome::Failure => next_attempt(&cfg.retry_schedule_secs, cfg.retry_jitter, attempts as usize, now),
        _ => None,
    };
    let status = match outcome {
        Outcome::Success => "succeeded",
        Outcome::Failure if next.is_some() => "pending",
        _ => "dead",
    };
    let mut tx = state.db().begin().await?;
    let held = sqlx::query!(
        "update webhook_delivery set status = $3, attempts = $4, next_attempt_at = coalesce($5, next_attempt_at),
                lease_until = null, lease_token = null, last_status_code = $6, last_error = $7
         where webhook_delivery_id = $1 and lease_token = $2",
        c.id,
        c.lease,
        status,
        attempts,
        next,
        a.status.map(i32::from),
        a.error
    )
    .execute(&mut *tx)
    .await?
    .rows_affected();
    if held == 0 {
        // Another instance retook it after our lease lapsed; its attempt counts.
        return Ok(());
    }
    sqlx::query!(
        "insert into webhook_attempt (webhook_attempt_id, webhook_delivery_id, attempted_at, status_code, latency_ms,
             response_body, error, next_attempt_at)
         values ($1, $2, $3, $4, $5, $6, $7, $8)",
        Uuid::now_v7(),
        c.id,
        now,
        a.status.map(i32::from),
        a.latency.as_millis().min(i32::MAX as u128) as i32,
        a.body.replace('\0', ""),
        a.error,
        next
    )
    .execute(&mut *tx)
    .await?;
    if status == "dead" {
        metrics::counter!("webhook_dead_letters_total").increment(1);
    }
    metrics::counter!("webhook_deliveries_total", "outcome" => status).increment(1);
    match outcome {
        Outcome::Success => {
            sqlx::query!(
                "update webhook_endpoint set failing_since = null, last_success_at = $2 where webhook_endpoint_id = $1",
                c.endpoint_id,
                now
            )
            .execute(&mut *tx)
            .await?;
        }
        Outcome::Gone => disable(&mut tx, c, "gone").await?,
        Outcome::Failure => {
            let since = sqlx::query_scalar!(
                r#"update webhook_endpoint set failing_since = coalesce(failing_since, $2)
                   where webhook_endpoint_id = $1 returning failing_since as "since!""#,
                c.endpoint_id,
                now
            )
            .fetch_optional(&mut *tx)
            .await?;
            // None: the endpoint was deleted meanwhile (its deliveries with it).
            if since.is_some_and(|since| now - since >= time::Duration::hours(cfg.disable_after_hours as i64)) {
                disable(&mut tx, c, "failing").await?;
            }
        }
    }
    tx.commit().await?;
    Ok(())
}

/// Disables an endpoint the dispatcher gives up on, and says so (event and audit) in the same
/// transaction.
async fn disable(tx: &mut sqlx::PgConnection, c: &Claimed, reason: &'static str) -> anyhow::Result<()> {
    let url = sqlx::query_scalar!(
        "update webhook_endpoint set enabled = false, disabled_reason = $2
         where webhook_endpoint_id = $1 and enabled returning url",
        c.endpoint_id,
        reason
    )
    .fetch_optional(&mut *tx)
    .await?;
    let Some(url) = url else { return Ok(()) };
    tracing::info!(endpoint = %c.endpoint_id, reason, "webhook endpoint disabled");
    let data = json!({ "endpoint_id": c.endpoint_id, "url": url, "reason": reason });
    events::emit(tx, c.org_id, "webhook.endpoint.disabled", format!("webhooks/{}", c.endpoint_id), data.clone())
        .await?;
    let event = Event::anonymous(c.org_id, "webhook.endpoint_disabled")
        .actor("service:webhooks".into(), "service")
        .target("webhook_endpoint", c.endpoint_id)
        .details(data);
    audit::record(tx, event).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use time::macros::datetime;

    use super::*;

    #[test]
    fn the_schedule_with_jitter() {
        let now = datetime!(2030-01-01 00:00 UTC);
        let s = [5, 300];
        assert_eq!(next_attempt(&s, 0.0, 1, now), Some(now + time::Duration::seconds(5)));
        assert_eq!(next_attempt(&s, 0.0, 2, now), Some(now + time::Duration::seconds(300)));
        assert_eq!(next_attempt(&s, 0.0, 3, now), None);
        for _ in 0..100 {
            let t = next_attempt(&s, 0.1, 2, now).unwrap();
            assert!(t >= now + time::Duration::seconds(270) && t <= now + time::Duration::seconds(330));
        }
    }
}
