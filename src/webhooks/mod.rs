//! Webhooks: endpoints an organization subscribes to event types, and the dispatcher that delivers
//! the event outbox to them, signed per Standard Webhooks, retried on a schedule, replayable.
//!
//! - [`handlers`]: `/api/v1/webhooks`: endpoints, secrets, test events, deliveries, replay, retry,
//!   dead letters, the event-type catalog.
//! - [`dispatcher`]: runs in every instance; fans events out into deliveries and delivers them.
//! - [`signing`]: `webhook-id`, `webhook-timestamp`, `webhook-signature`.
//! - [`ssrf`]: only public http(s) addresses, checked at creation and after DNS at delivery.

pub mod dispatcher;
mod handlers;
pub mod signing;
pub mod ssrf;

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicI64, Ordering},
    },
    time::Duration,
};

use sqlx::PgConnection;
use time::OffsetDateTime;
use utoipa_axum::{router::OpenApiRouter, routes};
use uuid::Uuid;

use crate::{config::WebhooksConfig, events::Pending, state::AppState};

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(handlers::create_webhook, handlers::list_webhooks))
        .routes(routes!(handlers::get_webhook, handlers::update_webhook, handlers::delete_webhook))
        .routes(routes!(handlers::rotate_webhook_secret))
        .routes(routes!(handlers::send_test_event))
        .routes(routes!(handlers::list_deliveries))
        .routes(routes!(handlers::replay_events))
        .routes(routes!(handlers::retry_delivery))
        .routes(routes!(handlers::list_dead_letters))
        .routes(routes!(handlers::list_event_types))
}

/// The webhook machinery of one instance: the guarded delivery client and the dispatcher's state.
pub struct Webhooks {
    client: reqwest::Client,
    stop: tokio::sync::watch::Sender<bool>,
    started: AtomicBool,
    pub(crate) status: Arc<Status>,
}

/// What `/ready` and the metrics tell of the dispatcher.
#[derive(Debug, Default)]
pub struct Status {
    running: AtomicBool,
    /// Unix seconds of the last completed round (0: none yet).
    last_round: AtomicI64,
    /// Whether the last round failed (Postgres away).
    failing: AtomicBool,
    queue_depth: AtomicI64,
    oldest_ms: AtomicI64,
}

/// The dispatcher as `/ready` shows it.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct DispatcherReport {
    /// `running`, `failing` (cannot reach Postgres: waits and resumes), `off` or `stopped`.
    pub status: &'static str,
    /// Seconds since the last completed round.
    pub last_round_age_secs: Option<i64>,
    /// Deliveries due or waiting to be retried, and events not yet fanned out.
    pub queue_depth: i64,
    /// Age of the oldest of those, in seconds.
    pub oldest_undelivered_secs: f64,
}

impl Webhooks {
    pub fn new(cfg: &WebhooksConfig) -> anyhow::Result<Self> {
        let client = reqwest::Client::builder()
            .user_agent(concat!("agentidp-webhooks/", env!("CARGO_PKG_VERSION")))
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .connect_timeout(Duration::from_secs(cfg.timeout_secs.min(10)))
            .pool_idle_timeout(Duration::from_secs(30))
            .dns_resolver(Arc::new(ssrf::GuardedResolver { allow_private: cfg.allow_private_networks }))
            .build()?;
        let (stop, _) = tokio::sync::watch::channel(false);
        Ok(Self { client, stop, started: AtomicBool::new(false), status: Arc::default() })
    }

    /// Asks the dispatcher to finish the attempts in flight and stop.
    pub fn stop(&self) {
        let _ = self.stop.send(true);
    }

    pub fn report(&self, enabled: bool) -> DispatcherReport {
        let s = &self.status;
        let last = s.last_round.load(Ordering::Relaxed);
        let status = match (enabled, s.running.load(Ordering::Relaxed), s.failing.load(Ordering::Relaxed)) {
            (false, ..) => "off",
            (true, false, _) => "stopped",
            (true, true, true) => "failing",
            (true, true, false) => "running",
        };
        DispatcherReport {
            status,
            last_round_age_secs: (last > 0).then(|| OffsetDateTime::now_utc().unix_timestamp() - last),
            queue_depth: s.queue_depth.load(Ordering::Relaxed),
            oldest_undelivered_secs: s.oldest_ms.load(Ordering::Relaxed) as f64 / 1000.0,
        }
    }
}

/// Starts this instance's dispatcher (once), unless `webhooks.dispatcher` is off.
pub fn spawn(state: &AppState) -> Option<tokio::task::JoinHandle<()>> {
    let w = state.webhooks();
    if !state.config().webhooks.dispatcher || w.started.swap(true, Ordering::AcqRel) {
        return None;
    }
    let stop = w.stop.subscribe();
    Some(tokio::spawn(dispatcher::run(state.clone(), stop)))
}

/// Creates a delivery for each event and each enabled endpoint subscribed to its type (of its
/// organization; platform events go to every organization), or for one endpoint only (a replay,
/// which also fills endpoints that are disabled, to go out once they are enabled again).
async fn insert_deliveries(
    conn: &mut PgConnection,
    events: &[Pending],
    due: OffsetDateTime,
    only: Option<Uuid>,
) -> Result<u64, sqlx::Error> {
    if events.is_empty() {
        return Ok(0);
    }
    let ids: Vec<Uuid> = events.iter().map(|e| e.id).collect();
    let orgs: Vec<Uuid> = events.iter().map(|e| e.org_id).collect();
    let types: Vec<String> = events.iter().map(|e| e.event_type.clone()).collect();
    let done = sqlx::query!(
        "insert into webhook_delivery (webhook_delivery_id, webhook_endpoint_id, organization_id, event_id, next_attempt_at)
         select gen_random_uuid(), e.webhook_endpoint_id, e.organization_id, ev.id, $4
         from unnest($1::uuid[], $2::uuid[], $3::text[]) as ev(id, org, type)
         join webhook_endpoint e
           on (e.organization_id = ev.org or ev.org = $6)
          and (($5::uuid is null and e.enabled) or e.webhook_endpoint_id = $5)
          and exists (select 1 from unnest(e.event_types) as p(pattern)
                      where p.pattern = '*' or p.pattern = ev.type
                         or (right(p.pattern, 2) = '.*' and starts_with(ev.type, left(p.pattern, -1))))",
        &ids,
        &orgs,
        &types,
        due,
        only,
        crate::events::PLATFORM
    )
    .execute(&mut *conn)
    .await?;
    Ok(done.rows_affected())
}

/// Whether `event_type` is matched by one of the subscription `patterns`.
pub fn subscribed(patterns: &[String], event_type: &str) -> bool {
    patterns.iter().any(|p| {
        p == "*"
            || p == event_type
            || p.strip_suffix('*').is_some_and(|prefix| prefix.ends_with('.') && event_type.starts_with(prefix))
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn patterns_match_like_the_fan_out() {
        let p = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert!(super::subscribed(&p(&["agent.*"]), "agent.created"));
        assert!(!super::subscribed(&p(&["agent.*"]), "agentx.created"));
        assert!(super::subscribed(&p(&["*"]), "tier.changed"));
        assert!(super::subscribed(&p(&["tier.changed", "x.y"]), "tier.changed"));
        assert!(!super::subscribed(&p(&["tier.changed"]), "tier.changed.more"));
    }
}
