//! Analytics: each organization's traffic and issued tokens, counted per minute.
//!
//! The metering layer and the token endpoint hand records to a [`Recorder`], which never blocks a
//! request: it adds each one to an in-memory bucket per (organization, actor, client, method,
//! route template, status, minute) with a latency histogram. A writer task upserts the buckets
//! every `flush_interval_ms` (one statement per `batch_size` buckets) into `analytics_event`,
//! merging them with what other flushes and other instances wrote for the same bucket. So the
//! table and the write volume grow with the number of distinct callers and routes, not with the
//! number of requests, and every request and token is still counted exactly.
//!
//! At most `buffer_capacity` buckets wait in memory; records for a new bucket past that are
//! dropped and counted in `analytics_events_dropped_total`. A failed write keeps its buckets for
//! the next flush (counted in `analytics_events_failed_total`). On shutdown the writer writes
//! what is left before the pool closes.

use std::{
    collections::HashMap,
    sync::{
        Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use sqlx::PgPool;
use time::OffsetDateTime;
use tokio::sync::watch;
use uuid::Uuid;

use crate::config::AnalyticsConfig;

pub const DROPPED: &str = "analytics_events_dropped_total";
pub const FAILED: &str = "analytics_events_failed_total";
/// Records counted into buckets that reached Postgres.
pub const WRITTEN: &str = "analytics_events_written_total";
/// Bucket rows upserted.
pub const ROWS_WRITTEN: &str = "analytics_rows_written_total";

/// Upper bounds (µs) of the latency histogram's buckets; one more bucket holds the rest.
pub const LATENCY_BOUNDS_US: [u32; 12] =
    [500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000, 1_000_000, 2_500_000];
const BUCKETS: usize = LATENCY_BOUNDS_US.len() + 1;

/// What a record counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
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

/// What records are counted by.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct Bucket {
    org_id: Uuid,
    /// Unix time of the minute's start.
    minute: i64,
    kind: Kind,
    actor_id: Option<String>,
    client_id: Option<String>,
    method: String,
    route: String,
    status: u16,
}

/// What one bucket counted.
#[derive(Debug, Clone, Copy, Default)]
struct Counts {
    requests: u64,
    latency_sum_us: u64,
    latency_max_us: u32,
    histogram: [u64; BUCKETS],
}

impl Counts {
    fn add(&mut self, latency_us: u32) {
        self.requests += 1;
        self.latency_sum_us += latency_us as u64;
        self.latency_max_us = self.latency_max_us.max(latency_us);
        let i = LATENCY_BOUNDS_US.iter().position(|b| latency_us <= *b).unwrap_or(BUCKETS - 1);
        self.histogram[i] += 1;
    }

    fn merge(&mut self, other: &Counts) {
        self.requests += other.requests;
        self.latency_sum_us += other.latency_sum_us;
        self.latency_max_us = self.latency_max_us.max(other.latency_max_us);
        for (a, b) in self.histogram.iter_mut().zip(other.histogram) {
            *a += b;
        }
    }
}

/// The buckets between requests and the writer.
pub struct Recorder {
    open: Mutex<HashMap<Bucket, Counts>>,
    started: AtomicBool,
    stopped: AtomicBool,
    stop: watch::Sender<bool>,
    cfg: AnalyticsConfig,
}

impl Recorder {
    pub fn new(cfg: &AnalyticsConfig) -> Self {
        Self {
            open: Mutex::new(HashMap::new()),
            started: AtomicBool::new(false),
            stopped: AtomicBool::new(false),
            stop: watch::channel(false).0,
            cfg: cfg.clone(),
        }
    }

    /// Whether requests are recorded at all.
    pub fn records_requests(&self) -> bool {
        self.cfg.record_requests
    }

    /// Counts a record into its bucket; never waits on I/O.
    pub fn record(&self, event: Event) {
        let bucket = Bucket {
            org_id: event.org_id,
            minute: event.at.unix_timestamp().div_euclid(60) * 60,
            kind: event.kind,
            actor_id: event.actor_id,
            client_id: event.client_id,
            method: event.method,
            route: event.route,
            status: event.status,
        };
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let full = open.len() >= self.cfg.buffer_capacity;
        match open.get_mut(&bucket) {
            Some(counts) => counts.add(event.latency_us),
            None if full || self.stopped.load(Ordering::Relaxed) => {
                drop(open);
                metrics::counter!(DROPPED).increment(1);
            }
            None => open.entry(bucket).or_default().add(event.latency_us),
        }
    }

    /// Starts the writer (once per process; later calls return `None`).
    pub fn spawn_writer(self: &std::sync::Arc<Self>, db: PgPool) -> Option<tokio::task::JoinHandle<()>> {
        if self.started.swap(true, Ordering::AcqRel) {
            return None;
        }
        let this = self.clone();
        Some(tokio::spawn(async move { this.run_writer(db).await }))
    }

    /// Asks the writer to write what is counted and stop.
    pub fn stop(&self) {
        let _ = self.stop.send(true);
    }

    fn take(&self) -> HashMap<Bucket, Counts> {
        std::mem::take(&mut *self.open.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Puts back buckets a failed write could not store, as far as there is room.
    fn restore(&self, buckets: Vec<(Bucket, Counts)>) {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let mut lost = 0;
        for (bucket, counts) in buckets {
            let room = open.len() < self.cfg.buffer_capacity;
            match open.get_mut(&bucket) {
                Some(c) => c.merge(&counts),
                None if room => {
                    open.insert(bucket, counts);
                }
                None => lost += counts.requests,
            }
        }
        if lost > 0 {
            metrics::counter!(DROPPED).increment(lost);
        }
    }

    async fn run_writer(&self, db: PgPool) {
        let mut stop = self.stop.subscribe();
        let pause = Duration::from_millis(self.cfg.flush_interval_ms);
        loop {
            tokio::select! {
                _ = tokio::time::sleep(pause) => {}
                _ = stop.changed() => {}
            }
            let stopping = *stop.borrow();
            if stopping {
                self.stopped.store(true, Ordering::Relaxed);
            }
            self.flush(&db).await;
            if stopping {
                return;
            }
        }
    }

    /// Writes every open bucket, `batch_size` at a time, in one order (so that instances writing
    /// the same buckets at once take their row locks in the same order).
    async fn flush(&self, db: &PgPool) {
        let mut buckets: Vec<(Bucket, Counts)> = self.take().into_iter().collect();
        if buckets.is_empty() {
            return;
        }
        buckets.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        let mut failed = Vec::new();
        for chunk in buckets.chunks(self.cfg.batch_size.max(1)) {
            if let Err(e) = write(db, chunk).await {
                let records: u64 = chunk.iter().map(|(_, c)| c.requests).sum();
                metrics::counter!(FAILED).increment(records);
                tracing::warn!(error = %e, buckets = chunk.len(), records, "could not write analytics; keeping them for the next flush");
                failed.extend_from_slice(chunk);
            }
        }
        if !failed.is_empty() {
            self.restore(failed);
        }
    }
}

/// Upserts buckets with one statement, adding to what is already stored for each.
async fn write(db: &PgPool, buckets: &[(Bucket, Counts)]) -> Result<(), sqlx::Error> {
    // Buckets of organizations deleted meanwhile are skipped rather than failing the batch (one
    // deleted between this and the insert fails it once; the next flush skips it).
    let mut org_ids: Vec<Uuid> = buckets.iter().map(|(b, _)| b.org_id).collect();
    org_ids.sort_unstable();
    org_ids.dedup();
    let existing = crate::auth::directory::existing(db, &org_ids).await?;
    let buckets: Vec<&(Bucket, Counts)> = buckets.iter().filter(|(b, _)| existing.contains(&b.org_id)).collect();
    if buckets.is_empty() {
        return Ok(());
    }
    let n = buckets.len();
    let mut orgs = Vec::with_capacity(n);
    let mut kinds = Vec::with_capacity(n);
    let mut actors = Vec::with_capacity(n);
    let mut clients = Vec::with_capacity(n);
    let mut methods = Vec::with_capacity(n);
    let mut routes = Vec::with_capacity(n);
    let mut statuses = Vec::with_capacity(n);
    let mut minutes = Vec::with_capacity(n);
    let mut requests = Vec::with_capacity(n);
    let mut sums = Vec::with_capacity(n);
    let mut maxes = Vec::with_capacity(n);
    let mut histograms = Vec::with_capacity(n);
    for (b, c) in buckets.iter().copied() {
        orgs.push(b.org_id);
        kinds.push(b.kind.as_str().to_owned());
        actors.push(b.actor_id.clone());
        clients.push(b.client_id.clone());
        methods.push(b.method.clone());
        routes.push(b.route.clone());
        statuses.push(b.status as i16);
        minutes.push(OffsetDateTime::from_unix_timestamp(b.minute).unwrap_or(OffsetDateTime::UNIX_EPOCH));
        requests.push(c.requests.min(i64::MAX as u64) as i64);
        sums.push(c.latency_sum_us.min(i64::MAX as u64) as i64);
        maxes.push(c.latency_max_us.min(i32::MAX as u32) as i32);
        // Postgres takes no arrays of arrays through unnest: one text per histogram.
        histograms.push(c.histogram.iter().map(u64::to_string).collect::<Vec<_>>().join(","));
    }
    let records: u64 = buckets.iter().map(|(_, c)| c.requests).sum();
    sqlx::query!(
        "insert into analytics_event (organization_id, kind, actor_id, client_id, method, route, status, occurred_at,
                                      request_count, latency_sum_us, latency_max_us, latency_buckets)
         select e.org, e.kind, e.actor, e.client, e.method, e.route, e.status, e.at, e.n, e.sum, e.max,
                string_to_array(e.hist, ',')::bigint[]
         from unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], $7::int2[],
                     $8::timestamptz[], $9::int8[], $10::int8[], $11::int4[], $12::text[])
              as e(org, kind, actor, client, method, route, status, at, n, sum, max, hist)
         on conflict on constraint analytics_event_bucket do update set
             request_count = analytics_event.request_count + excluded.request_count,
             latency_sum_us = analytics_event.latency_sum_us + excluded.latency_sum_us,
             latency_max_us = greatest(analytics_event.latency_max_us, excluded.latency_max_us),
             latency_buckets = (select array_agg(coalesce(a, 0) + coalesce(b, 0) order by i)
                                from unnest(analytics_event.latency_buckets, excluded.latency_buckets)
                                     with ordinality as h(a, b, i))",
        &orgs,
        &kinds,
        &actors as &[Option<String>],
        &clients as &[Option<String>],
        &methods,
        &routes,
        &statuses,
        &minutes,
        &requests,
        &sums,
        &maxes,
        &histograms
    )
    .execute(db)
    .await?;
    metrics::counter!(WRITTEN).increment(records);
    metrics::counter!(ROWS_WRITTEN).increment(n as u64);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latencies_fall_into_their_histogram_bucket() {
        let mut c = Counts::default();
        for us in [0, 500, 501, 2_500_000, 2_500_001, u32::MAX] {
            c.add(us);
        }
        assert_eq!(c.requests, 6);
        assert_eq!(c.histogram[0], 2, "≤ 500 µs");
        assert_eq!(c.histogram[1], 1, "501 µs");
        assert_eq!(c.histogram[11], 1, "2.5 s");
        assert_eq!(c.histogram[12], 2, "beyond the last bound");
        assert_eq!(c.latency_max_us, u32::MAX);
    }

    #[test]
    fn records_of_one_caller_route_and_minute_share_one_bucket() {
        let r = Recorder::new(&AnalyticsConfig {
            record_requests: true,
            buffer_capacity: 2,
            batch_size: 10,
            flush_interval_ms: 1000,
        });
        let at = OffsetDateTime::from_unix_timestamp(1_800_000_000).unwrap();
        let event = |status: u16, at: OffsetDateTime| Event {
            org_id: Uuid::nil(),
            kind: Kind::Request,
            actor_id: Some("user:1".into()),
            client_id: None,
            method: "GET".into(),
            route: "/api/v1/agents".into(),
            status,
            latency_us: 100,
            at,
        };
        for s in 0..1000 {
            r.record(event(200, at + time::Duration::milliseconds(s)));
        }
        r.record(event(404, at));
        // A third bucket is past the capacity of two: dropped, the others still count.
        r.record(event(500, at));
        r.record(event(200, at + time::Duration::seconds(60)));
        r.record(event(200, at));
        let open = r.take();
        assert_eq!(open.len(), 2);
        let ok = open.iter().find(|(b, _)| b.status == 200).unwrap().1;
        assert_eq!(ok.requests, 1001);
        assert_eq!(ok.latency_sum_us, 100_100);
    }
}
