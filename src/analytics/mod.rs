//! Analytics: per-request and per-token records of each organization's traffic.
//!
//! The metering layer and the token endpoint hand records to a [`Recorder`]: a bounded in-memory
//! queue that never blocks a request. A writer task inserts them in batches (one statement per
//! batch) into `analytics_event`. A full queue drops records and counts them in
//! `analytics_events_dropped_total`; a failed insert counts its batch in
//! `analytics_events_failed_total`. On shutdown the writer drains the queue before the pool closes.

use std::{sync::Mutex, time::Duration};

use sqlx::PgPool;
use time::OffsetDateTime;
use tokio::sync::{mpsc, watch};
use uuid::Uuid;

use crate::config::AnalyticsConfig;

pub const DROPPED: &str = "analytics_events_dropped_total";
pub const FAILED: &str = "analytics_events_failed_total";
pub const WRITTEN: &str = "analytics_events_written_total";

/// What a record counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Request,
    TokenIssued,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Self::Request => "request",
            Self::TokenIssued => "token_issued",
        }
    }
}

/// One record.
#[derive(Debug, Clone)]
pub struct Event {
    pub org_id: Uuid,
    pub kind: Kind,
    pub actor_id: Option<String>,
    pub client_id: Option<String>,
    pub method: String,
    /// The matched route template.
    pub route: String,
    pub status: u16,
    pub latency_us: u32,
    pub at: OffsetDateTime,
}

/// The queue between requests and the writer.
pub struct Recorder {
    tx: mpsc::Sender<Event>,
    rx: Mutex<Option<mpsc::Receiver<Event>>>,
    stop: watch::Sender<bool>,
    cfg: AnalyticsConfig,
}

impl Recorder {
    pub fn new(cfg: &AnalyticsConfig) -> Self {
        let (tx, rx) = mpsc::channel(cfg.buffer_capacity);
        Self { tx, rx: Mutex::new(Some(rx)), stop: watch::channel(false).0, cfg: cfg.clone() }
    }

    /// Whether requests are recorded at all.
    pub fn records_requests(&self) -> bool {
        self.cfg.record_requests
    }

    /// Queues a record; never waits.
    pub fn record(&self, event: Event) {
        if self.tx.try_send(event).is_err() {
            metrics::counter!(DROPPED).increment(1);
        }
    }

    /// Starts the writer (once per process; later calls return `None`).
    pub fn spawn_writer(&self, db: PgPool) -> Option<tokio::task::JoinHandle<()>> {
        let rx = self.rx.lock().unwrap_or_else(|e| e.into_inner()).take()?;
        let stop = self.stop.subscribe();
        let (batch, pause) = (self.cfg.batch_size, Duration::from_millis(self.cfg.flush_interval_ms));
        Some(tokio::spawn(run_writer(db, rx, stop, batch, pause)))
    }

    /// Asks the writer to write what is queued and stop.
    pub fn stop(&self) {
        let _ = self.stop.send(true);
    }
}

async fn run_writer(
    db: PgPool,
    mut rx: mpsc::Receiver<Event>,
    mut stop: watch::Receiver<bool>,
    batch: usize,
    pause: Duration,
) {
    let mut buf = Vec::with_capacity(batch);
    loop {
        tokio::select! {
            n = rx.recv_many(&mut buf, batch) => {
                if n == 0 {
                    return;
                }
                write(&db, &mut buf).await;
                // A partial batch means a quiet moment: gather for a while rather than insert
                // row by row.
                if n < batch {
                    tokio::select! {
                        _ = tokio::time::sleep(pause) => {}
                        _ = stop.changed() => {}
                    }
                }
            }
            _ = stop.changed() => {}
        }
        if *stop.borrow() {
            // What is queued goes out; nothing new is accepted.
            rx.close();
            while rx.recv_many(&mut buf, batch).await > 0 {
                write(&db, &mut buf).await;
            }
            return;
        }
    }
}

/// Inserts a batch with one statement.
async fn write(db: &PgPool, buf: &mut Vec<Event>) {
    if buf.is_empty() {
        return;
    }
    let n = buf.len();
    let mut orgs = Vec::with_capacity(n);
    let mut kinds = Vec::with_capacity(n);
    let mut actors = Vec::with_capacity(n);
    let mut clients = Vec::with_capacity(n);
    let mut methods = Vec::with_capacity(n);
    let mut routes = Vec::with_capacity(n);
    let mut statuses = Vec::with_capacity(n);
    let mut latencies = Vec::with_capacity(n);
    let mut times = Vec::with_capacity(n);
    for e in buf.drain(..) {
        orgs.push(e.org_id);
        kinds.push(e.kind.as_str().to_owned());
        actors.push(e.actor_id);
        clients.push(e.client_id);
        methods.push(e.method);
        routes.push(e.route);
        statuses.push(e.status as i16);
        latencies.push(e.latency_us.min(i32::MAX as u32) as i32);
        times.push(e.at);
    }
    // Rows of organizations deleted meanwhile are skipped rather than failing the batch.
    let result = sqlx::query!(
        "insert into analytics_event (organization_id, kind, actor_id, client_id, method, route, status, latency_us, occurred_at)
         select e.org, e.kind, e.actor, e.client, e.method, e.route, e.status, e.latency, e.at
         from unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], $7::int2[], $8::int4[],
                     $9::timestamptz[]) as e(org, kind, actor, client, method, route, status, latency, at)
         where exists (select 1 from organization o where o.organization_id = e.org)",
        &orgs,
        &kinds,
        &actors as &[Option<String>],
        &clients as &[Option<String>],
        &methods,
        &routes,
        &statuses,
        &latencies,
        &times
    )
    .execute(db)
    .await;
    match result {
        Ok(_) => metrics::counter!(WRITTEN).increment(n as u64),
        Err(e) => {
            metrics::counter!(FAILED).increment(n as u64);
            tracing::warn!(error = %e, rows = n, "could not write analytics records");
        }
    }
}
