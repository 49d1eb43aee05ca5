//! The policy decision point (Cedar) and its enforcement.
//!
//! - [`engine`]: the schema and baseline (config/policies/), each organization's active version
//!   combined with the baseline (a baseline `forbid` always wins), evaluation.
//! - [`routes`]: what every protected route asks (action, resource type, scope), in one table; the
//!   policy layer enforces it.
//! - [`require`]: the PEP helper for handlers that must load the resource first.
//! - the decision log ([`DecisionLog`]): every decision queued in memory and written in batches,
//!   off the request path, repeated permits folded into one row with their count; on shutdown
//!   what is still queued, and every open count, is written before the pool closes.
//! - [`store`] routes: versioned policy sets per organization (draft, validate, dry-run, activate,
//!   roll back), the PDP over HTTP, and the decision log's listing.

pub mod engine;
mod handlers;
pub mod routes;

use std::sync::{
    Arc, Mutex,
    atomic::{AtomicBool, AtomicUsize, Ordering},
};

use time::OffsetDateTime;
use tokio::sync::{mpsc, watch};
use utoipa_axum::{router::OpenApiRouter, routes as api_routes};
use uuid::Uuid;

pub use engine::{Decision, Engine, Query, Resource};

use crate::{
    auth::{Actor, ActorType, Credential, Role},
    http::{ApiError, ApiResult},
    state::AppState,
};

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(api_routes!(handlers::evaluate))
        .routes(api_routes!(handlers::evaluate_batch))
        .routes(api_routes!(handlers::create_version, handlers::list_versions))
        .routes(api_routes!(handlers::get_version))
        .routes(api_routes!(handlers::test_version))
        .routes(api_routes!(handlers::activate_version))
        .routes(api_routes!(handlers::rollback))
        .routes(api_routes!(handlers::list_decisions))
}

/// The caller's role in `org_id`, as policies see it.
pub fn org_role(actor: &Actor, org_id: Option<Uuid>) -> &'static str {
    let Some(org) = org_id else { return "none" };
    if let Some(bound) = actor.principal.credential.bound_org()
        && bound != org
    {
        return "none";
    }
    if actor.actor_type == ActorType::Agent {
        return "agent";
    }
    match actor.role_in(org) {
        Some(Role::Owner) => "owner",
        Some(Role::Admin) => "admin",
        Some(Role::Member) => "member",
        None => "none",
    }
}

/// The query for `actor` doing `action` on `resource`, needing `scope`.
pub fn query_for(actor: &Actor, action: &str, resource: Resource, resource_id: String, scope: &str) -> Query {
    let scopes = match &actor.principal.credential {
        Credential::Session { .. } => None,
        Credential::ApiKey { scopes, .. } => Some(scopes.iter().map(|s| s.as_str().to_owned()).collect()),
        Credential::AccessToken { claims, .. } => Some(claims.scopes().map(str::to_owned).collect()),
    };
    Query {
        actor_id: actor.actor_id(),
        actor_type: actor.actor_type.as_str().to_owned(),
        system_admin: actor.is_system_admin_for(resource.org_id()),
        org_role: org_role(actor, resource.org_id()).to_owned(),
        scopes,
        required_scope: scope.to_owned(),
        action: action.to_owned(),
        resource,
        resource_id,
        budget_exceeded: routes::budget_exceeded_for_current_request(),
        // Built here from typed values: the schema check would find nothing.
        validate: false,
    }
}

/// Decides, logs the decision, and turns a deny into the API's answer: 404 when the decision hides
/// the resource (its organization is not the caller's: its existence must not leak), else 403
/// with the reason. The decision is the cache's own: no copy is made, and a permit counted on an
/// open row of the log builds nothing.
pub fn enforce(state: &AppState, query: &Query) -> ApiResult<()> {
    let decision =
        state.policy().evaluate_shared(query).map_err(|e| ApiError::Internal(anyhow::anyhow!("policy: {e}")))?;
    log_shared(state, query, &decision);
    if decision.permitted() {
        return Ok(());
    }
    if decision.hide {
        return Err(ApiError::NotFound);
    }
    Err(ApiError::forbidden(decision.reason.clone(), format!("Denied by policy ({}).", decision.reason)))
}

/// What a memoized query was built for, besides its principal: the route's declaration (by
/// address: they are `'static`), the actor type, the organization the request acts in, and
/// whether the caller is past a budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct MemoKey {
    rule: usize,
    actor_type: ActorType,
    org_id: Option<Uuid>,
    budget_exceeded: bool,
}

/// The policy layer's queries for one principal (kept in [`crate::auth::Principal`]), so that a
/// request on a route whose query does not depend on its path finds it built. Bounded: past
/// [`QueryMemo::MAX`] queries, the rest are built on each request. A clone starts empty.
#[derive(Debug, Default)]
pub struct QueryMemo(Mutex<Vec<(MemoKey, Arc<Query>)>>);

impl Clone for QueryMemo {
    fn clone(&self) -> Self {
        Self::default()
    }
}

impl QueryMemo {
    const MAX: usize = 32;

    fn get_or_build(
        &self,
        key: MemoKey,
        build: impl FnOnce() -> ApiResult<Option<Query>>,
    ) -> ApiResult<Option<Arc<Query>>> {
        let found = {
            let memo = self.0.lock().unwrap_or_else(|e| e.into_inner());
            memo.iter().find(|(k, _)| *k == key).map(|(_, q)| q.clone())
        };
        if let Some(q) = found {
            return Ok(Some(q));
        }
        let Some(q) = build()?.map(Arc::new) else { return Ok(None) };
        let mut memo = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if memo.len() < Self::MAX && !memo.iter().any(|(k, _)| *k == key) {
            memo.push((key, q.clone()));
        }
        Ok(Some(q))
    }
}

/// The PEP helper for handlers: may `actor` do `action` on this (loaded) resource?
pub fn require(
    state: &AppState,
    actor: &Actor,
    action: &str,
    resource: Resource,
    resource_id: impl ToString,
) -> ApiResult<()> {
    let scope = routes::scope_for_current_request().unwrap_or_default();
    let query = query_for(actor, action, resource, resource_id.to_string(), &scope);
    enforce(state, &query)
}

/// One decision as written to the decision log.
#[derive(Debug)]
pub struct LoggedDecision {
    pub decision: Decision,
    pub org_id: Option<Uuid>,
    pub request_id: Option<String>,
    pub actor_id: String,
    pub action: String,
    pub resource_type: &'static str,
    pub resource_id: String,
    pub at: OffsetDateTime,
}

/// Queues a decision for the log; never blocks, never fails the request (a full queue drops the
/// entry and counts it). A permit repeating one whose row is open (see [`DecisionLog`]) is only
/// counted on that row: nothing is built or queued for it. The row carries the decision's id.
pub fn log_decision(state: &AppState, q: &Query, d: &Decision) {
    log_with(state, q, d, || d.decision_id);
}

/// [`log_decision`] for a decision shared with the cache: a row it needs gets an id of its own.
fn log_shared(state: &AppState, q: &Query, d: &Decision) {
    log_with(state, q, d, Uuid::now_v7);
}

fn log_with(state: &AppState, q: &Query, d: &Decision, decision_id: impl FnOnce() -> Uuid) {
    let rate = state.config().policy.permit_sample_rate;
    if d.permitted() && rate < 1.0 && rand::random::<f64>() >= rate {
        return;
    }
    let log = state.decision_log();
    if log.stopped.load(Ordering::Acquire) {
        metrics::counter!("decision_log_dropped_total").increment(1);
        return;
    }
    let at = OffsetDateTime::now_utc();
    let key = d.permitted().then(|| KeyRef {
        org_id: q.resource.org_id(),
        actor_id: &q.actor_id,
        action: &q.action,
        resource_type: q.resource.type_name(),
        resource_id: &q.resource_id,
        reason: &d.reason,
        policy_version: &d.policy_version,
        determining_policies: &d.determining_policies,
    });
    let hash = key.as_ref().map(|k| log.folds.hash(k));
    if let (Some(k), Some(h)) = (&key, hash) {
        match log.folds.count(k, h, at, &log.stopped) {
            Counted::Folded => return,
            Counted::Stopped => {
                metrics::counter!("decision_log_dropped_total").increment(1);
                return;
            }
            Counted::New => {}
        }
    }
    let decision = Decision { decision_id: decision_id(), ..d.clone() };
    let id = decision.decision_id;
    let entry = LoggedDecision {
        decision,
        org_id: q.resource.org_id(),
        request_id: crate::http::request_id::current_request_id(),
        actor_id: q.actor_id.clone(),
        action: q.action.clone(),
        resource_type: q.resource.type_name(),
        resource_id: q.resource_id.clone(),
        at,
    };
    if log.queue.try_send(entry).is_err() {
        metrics::counter!("decision_log_dropped_total").increment(1);
        return;
    }
    // Opened only once its row is queued: a count is never written before the row it counts on.
    if let (Some(k), Some(h)) = (key, hash) {
        log.folds.open(&k, h, id, at);
    }
}

/// The queue between decisions and the decision log's writer, which writes them in batches and,
/// asked to stop, writes what is still queued before it ends.
///
/// Repeated permits are folded: a permit identical to one written less than `fold` ago (same
/// organization, actor, action, resource, reason, policy version and determining policies) is
/// counted on that row instead of being a row of its own, so that the log's write volume grows
/// with the number of distinct decisions, not of requests. The request that makes the permit
/// counts it (a hash, a shard's lock and a comparison: no allocation, nothing queued); the writer
/// writes the count when the window ends and when it stops. At most `fold_keys` rows are open at
/// once; a permit beyond that is a row of its own until windows end. Denies are always a row each.
pub struct DecisionLog {
    queue: mpsc::Sender<LoggedDecision>,
    rx: Mutex<Option<mpsc::Receiver<LoggedDecision>>>,
    stop: watch::Sender<bool>,
    stopped: AtomicBool,
    batch: usize,
    folds: Arc<Folds>,
}

impl DecisionLog {
    pub fn new(capacity: usize, batch: usize, fold: std::time::Duration, fold_keys: usize) -> Self {
        let (queue, rx) = mpsc::channel(capacity);
        Self {
            queue,
            rx: Mutex::new(Some(rx)),
            stop: watch::channel(false).0,
            stopped: AtomicBool::new(false),
            batch: batch.max(1),
            folds: Arc::new(Folds::new(fold, fold_keys)),
        }
    }

    /// Starts the writer (once per process; later calls return `None`).
    pub fn spawn_writer(&self, db: sqlx::PgPool) -> Option<tokio::task::JoinHandle<()>> {
        let rx = self.rx.lock().unwrap_or_else(|e| e.into_inner()).take()?;
        let folds = self.folds.clone();
        Some(tokio::spawn(run_decision_writer(db, rx, self.batch, folds, self.stop.subscribe())))
    }

    /// Asks the writer to write what is queued and stop; decisions made after this are dropped
    /// (and counted).
    pub fn stop(&self) {
        self.stopped.store(true, Ordering::Release);
        let _ = self.stop.send(true);
    }
}

/// What makes two permits the same decision for the log, borrowed from the query and decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct KeyRef<'a> {
    org_id: Option<Uuid>,
    actor_id: &'a str,
    action: &'a str,
    resource_type: &'static str,
    resource_id: &'a str,
    reason: &'a str,
    policy_version: &'a str,
    determining_policies: &'a [String],
}

/// The same, owned by an open fold.
#[derive(Debug)]
struct FoldKey {
    org_id: Option<Uuid>,
    actor_id: Box<str>,
    action: Box<str>,
    resource_type: &'static str,
    resource_id: Box<str>,
    reason: Box<str>,
    policy_version: Box<str>,
    determining_policies: Box<[String]>,
}

impl FoldKey {
    fn of(k: &KeyRef<'_>) -> Self {
        Self {
            org_id: k.org_id,
            actor_id: k.actor_id.into(),
            action: k.action.into(),
            resource_type: k.resource_type,
            resource_id: k.resource_id.into(),
            reason: k.reason.into(),
            policy_version: k.policy_version.into(),
            determining_policies: k.determining_policies.into(),
        }
    }

    fn as_ref(&self) -> KeyRef<'_> {
        KeyRef {
            org_id: self.org_id,
            actor_id: &self.actor_id,
            action: &self.action,
            resource_type: self.resource_type,
            resource_id: &self.resource_id,
            reason: &self.reason,
            policy_version: &self.policy_version,
            determining_policies: &self.determining_policies,
        }
    }
}

/// An open fold: the row that stands for a permit's repeats within its window.
#[derive(Debug)]
struct Open {
    key: FoldKey,
    decision_id: Uuid,
    window_end: OffsetDateTime,
    count: i64,
    last_at: OffsetDateTime,
}

impl Open {
    /// The row's count, when there is more to write than its insert did.
    fn recount(&self) -> Option<Recount> {
        (self.count > 1).then_some(Recount { decision_id: self.decision_id, count: self.count, last_at: self.last_at })
    }
}

/// A row's new count, to be written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Recount {
    decision_id: Uuid,
    count: i64,
    last_at: OffsetDateTime,
}

/// What [`Folds::count`] did with a permit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Counted {
    /// Counted on an open row.
    Folded,
    /// No open row for it: it is a row of its own.
    New,
    /// The log is stopping: dropped.
    Stopped,
}

const FOLD_SHARDS: usize = 16;

/// Permits counted on an open row; its handle taken once, not looked up per permit.
static FOLDED: std::sync::LazyLock<metrics::Counter> =
    std::sync::LazyLock::new(|| metrics::counter!("decision_log_folded_total"));

#[derive(Default)]
struct FoldShard {
    /// By the key's hash; a different key with the same hash replaces it (its count is kept).
    open: std::collections::HashMap<u64, Open>,
    /// The earliest window end among `open`, so that a sweep skips shards with nothing ended.
    earliest: Option<OffsetDateTime>,
}

/// The open folds, shared by the requests that count into them and the writer that writes their
/// counts.
struct Folds {
    window: time::Duration,
    max_keys: usize,
    keys: AtomicUsize,
    hasher: std::hash::RandomState,
    shards: Box<[Mutex<FoldShard>]>,
    /// Folds replaced before their window ended, whose counts the writer has yet to write.
    closed: Mutex<Vec<Recount>>,
}

impl Folds {
    fn new(window: std::time::Duration, max_keys: usize) -> Self {
        Self {
            window: time::Duration::try_from(window).unwrap_or(time::Duration::ZERO),
            max_keys: max_keys.max(1),
            keys: AtomicUsize::new(0),
            hasher: std::hash::RandomState::new(),
            shards: (0..FOLD_SHARDS).map(|_| Mutex::default()).collect(),
            closed: Mutex::default(),
        }
    }

    fn hash(&self, k: &KeyRef<'_>) -> u64 {
        use std::hash::BuildHasher;
        self.hasher.hash_one(k)
    }

    fn shard(&self, hash: u64) -> std::sync::MutexGuard<'_, FoldShard> {
        self.shards[(hash >> 56) as usize % FOLD_SHARDS].lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Counts a permit on its open row, if it has one whose window holds `at`.
    fn count(&self, k: &KeyRef<'_>, hash: u64, at: OffsetDateTime, stopped: &AtomicBool) -> Counted {
        if self.window.is_zero() {
            return Counted::New;
        }
        let mut shard = self.shard(hash);
        // Read under the lock the writer's last sweep takes: a count made after it is refused.
        if stopped.load(Ordering::Acquire) {
            return Counted::Stopped;
        }
        match shard.open.get_mut(&hash) {
            Some(o) if at < o.window_end && o.key.as_ref() == *k => {
                o.count += 1;
                o.last_at = o.last_at.max(at);
                FOLDED.increment(1);
                Counted::Folded
            }
            _ => Counted::New,
        }
    }

    /// Opens a fold on a permit's queued row (replacing an ended or colliding one, whose count is
    /// kept for the writer). Beyond `max_keys` open folds, nothing is opened.
    fn open(&self, k: &KeyRef<'_>, hash: u64, decision_id: Uuid, at: OffsetDateTime) {
        if self.window.is_zero() {
            return;
        }
        let mut shard = self.shard(hash);
        let replacing = shard.open.contains_key(&hash);
        if !replacing && self.keys.load(Ordering::Relaxed) >= self.max_keys {
            return;
        }
        let window_end = at + self.window;
        let fresh = Open { key: FoldKey::of(k), decision_id, window_end, count: 1, last_at: at };
        match shard.open.insert(hash, fresh) {
            Some(old) => {
                if let Some(r) = old.recount() {
                    self.closed.lock().unwrap_or_else(|e| e.into_inner()).push(r);
                }
            }
            None => {
                self.keys.fetch_add(1, Ordering::Relaxed);
            }
        }
        shard.earliest = Some(shard.earliest.map_or(window_end, |e| e.min(window_end)));
    }

    /// Closes the folds whose window ended by `now` (all of them with `all`), and takes the
    /// counts of those replaced meanwhile.
    fn close(&self, now: OffsetDateTime, all: bool, recounts: &mut Vec<Recount>) {
        recounts.append(&mut self.closed.lock().unwrap_or_else(|e| e.into_inner()));
        for shard in self.shards.iter() {
            let mut shard = shard.lock().unwrap_or_else(|e| e.into_inner());
            if !all && shard.earliest.is_none_or(|e| e > now) {
                continue;
            }
            let before = shard.open.len();
            let mut earliest = None::<OffsetDateTime>;
            shard.open.retain(|_, o| {
                if !all && o.window_end > now {
                    earliest = Some(earliest.map_or(o.window_end, |e| e.min(o.window_end)));
                    return true;
                }
                recounts.extend(o.recount());
                false
            });
            shard.earliest = earliest;
            self.keys.fetch_sub(before - shard.open.len(), Ordering::Relaxed);
        }
    }
}

/// How often the writer takes what is queued. It is not woken by each decision: a request
/// queues its decision without waking another thread, and the log is behind by at most this.
const WRITER_TICK: std::time::Duration = std::time::Duration::from_millis(100);

/// Writes queued decisions in batches until asked to stop, then what is still queued, then the
/// counts of every open fold.
async fn run_decision_writer(
    db: sqlx::PgPool,
    mut rx: mpsc::Receiver<LoggedDecision>,
    batch: usize,
    folds: Arc<Folds>,
    mut stop: watch::Receiver<bool>,
) {
    let mut buf = Vec::with_capacity(batch);
    let mut recounts = Vec::new();
    let mut tick = tokio::time::interval(WRITER_TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    'run: loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => break,
        }
        // The counts due are taken before the queue is drained: a fold opens only after its row
        // is queued, so every row these counts are written on is inserted first.
        folds.close(OffsetDateTime::now_utc(), false, &mut recounts);
        // Everything queued now, a batch at a time.
        loop {
            while buf.len() < batch {
                match rx.try_recv() {
                    Ok(e) => buf.push(e),
                    Err(mpsc::error::TryRecvError::Empty) => break,
                    Err(mpsc::error::TryRecvError::Disconnected) if buf.is_empty() => break 'run,
                    Err(mpsc::error::TryRecvError::Disconnected) => break,
                }
            }
            if buf.is_empty() {
                break;
            }
            let full = buf.len() == batch;
            write_decisions(&db, &mut buf).await;
            if !full {
                break;
            }
        }
        if !recounts.is_empty() {
            write_recounts(&db, &mut recounts).await;
        }
    }
    // Stopping: no count is made from here on (see `Folds::count`), so this sweep takes them all.
    folds.close(OffsetDateTime::now_utc(), true, &mut recounts);
    rx.close();
    while rx.recv_many(&mut buf, batch).await > 0 {
        write_decisions(&db, &mut buf).await;
    }
    write_recounts(&db, &mut recounts).await;
}

/// Writes the counts of folded rows (the whole count: writing one twice changes nothing).
async fn write_recounts(db: &sqlx::PgPool, recounts: &mut Vec<Recount>) {
    if recounts.is_empty() {
        return;
    }
    let n = recounts.len();
    let ids: Vec<Uuid> = recounts.iter().map(|r| r.decision_id).collect();
    let counts: Vec<i64> = recounts.iter().map(|r| r.count).collect();
    let lasts: Vec<OffsetDateTime> = recounts.iter().map(|r| r.last_at).collect();
    recounts.clear();
    let result = sqlx::query!(
        "update decision_log l set decision_count = d.n, last_decided_at = d.last
         from unnest($1::uuid[], $2::int8[], $3::timestamptz[]) as d(id, n, last)
         where l.decision_id = d.id",
        &ids,
        &counts,
        &lasts
    )
    .execute(db)
    .await;
    if let Err(e) = result {
        tracing::warn!(error = %e, rows = n, "decision log counts not written");
        metrics::counter!("decision_log_dropped_total").increment(n as u64);
    }
}

/// Inserts a batch with one statement; on failure the batch is dropped and counted (the log is
/// best-effort by design; denies are also visible in the request logs).
pub async fn write_decisions(db: &sqlx::PgPool, buf: &mut Vec<LoggedDecision>) {
    if buf.is_empty() {
        return;
    }
    let n = buf.len();
    let mut ids = Vec::with_capacity(n);
    let mut orgs = Vec::with_capacity(n);
    let mut requests = Vec::with_capacity(n);
    let mut actors = Vec::with_capacity(n);
    let mut actions = Vec::with_capacity(n);
    let mut types = Vec::with_capacity(n);
    let mut resources = Vec::with_capacity(n);
    let mut effects = Vec::with_capacity(n);
    let mut reasons = Vec::with_capacity(n);
    let mut versions = Vec::with_capacity(n);
    let mut determining = Vec::with_capacity(n);
    let mut times = Vec::with_capacity(n);
    for e in buf.drain(..) {
        ids.push(e.decision.decision_id);
        orgs.push(e.org_id);
        requests.push(e.request_id);
        actors.push(e.actor_id);
        actions.push(e.action);
        types.push(e.resource_type.to_owned());
        resources.push(e.resource_id);
        effects.push(e.decision.effect.to_owned());
        reasons.push(e.decision.reason);
        versions.push(e.decision.policy_version);
        // Postgres has no arrays of arrays of differing lengths: keep them as one text each.
        determining.push(e.decision.determining_policies.join(","));
        times.push(e.at);
    }
    let result = sqlx::query!(
        "insert into decision_log (decision_id, organization_id, request_id, actor_id, action, resource_type, resource_id,
                                   effect, reason, policy_version, determining_policies, decided_at)
         select d.id, d.org, d.req, d.actor, d.action, d.rtype, d.rid, d.effect, d.reason, d.version,
                case when d.det = '' then '{}'::text[] else string_to_array(d.det, ',') end, d.at
         from unnest($1::uuid[], $2::uuid[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[], $8::text[],
                     $9::text[], $10::text[], $11::text[], $12::timestamptz[])
              as d(id, org, req, actor, action, rtype, rid, effect, reason, version, det, at)
         on conflict do nothing",
        &ids,
        &orgs as &[Option<Uuid>],
        &requests as &[Option<String>],
        &actors,
        &actions,
        &types,
        &resources,
        &effects,
        &reasons,
        &versions,
        &determining,
        &times
    )
    .execute(db)
    .await;
    if let Err(e) = result {
        tracing::warn!(error = %e, dropped = n, "decision log batch not written");
        metrics::counter!("decision_log_dropped_total").increment(n as u64);
    }
}

/// Loads (or unloads) an organization's active version from Postgres into the engine.
pub async fn reload_org(state: &AppState, org_id: Uuid) -> anyhow::Result<()> {
    let read = state.policy().begin_read();
    let active = sqlx::query!(
        "select version, source from policy_version where organization_id = $1 and status = 'active'",
        org_id
    )
    .fetch_optional(state.db())
    .await?;
    match active {
        None => {
            state.policy().install(org_id, None, read);
        }
        Some(r) => {
            let set = state.policy().compile(&r.source).map_err(|e| {
                anyhow::anyhow!("stored policy v{} of {org_id} no longer compiles: {}", r.version, e.join("; "))
            })?;
            state.policy().install(org_id, Some((r.version, set)), read);
        }
    }
    Ok(())
}

/// Brings every organization's installed version in line with Postgres (start-up, reconnects,
/// and every 30 s as a safety net under pub/sub).
pub async fn sync_all(state: &AppState) -> anyhow::Result<()> {
    sync_all_pausing(state, async {}).await
}

/// [`sync_all`] with a pause between its read of Postgres and what it does with it, where tests
/// land an activation.
#[doc(hidden)]
pub async fn sync_all_pausing(state: &AppState, pause: impl Future<Output = ()>) -> anyhow::Result<()> {
    // What this read finds may be older than what an activation installs meanwhile: the engine
    // keeps the newer (see `Engine::install`).
    let read = state.policy().begin_read();
    let active: std::collections::HashMap<Uuid, i32> =
        sqlx::query!("select organization_id, version from policy_version where status = 'active'")
            .fetch_all(state.db())
            .await?
            .into_iter()
            .map(|r| (r.organization_id, r.version))
            .collect();
    pause.await;
    let installed = state.policy().installed();
    for (org, version) in &active {
        if installed.get(org) != Some(version) {
            reload_org(state, *org).await?;
        }
    }
    for org in installed.keys().filter(|o| !active.contains_key(o)) {
        state.policy().install(*org, None, read);
    }
    Ok(())
}

/// The policy module's share of the change feed: `policy:<org>` when an organization activates
/// or rolls back a version.
pub fn listener() -> crate::cache::invalidation::Listener {
    crate::cache::invalidation::Listener {
        topics: &["policy"],
        apply: |state, _, payload| {
            Box::pin(async move {
                if let Ok(org) = payload.parse()
                    && let Err(e) = reload_org(state, org).await
                {
                    tracing::warn!(error = %e, "reloading an organization's policies failed");
                }
            })
        },
        resync: |state| Box::pin(sync_all(state)),
        disconnected: |_| {},
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(resource_id: &str) -> KeyRef<'_> {
        KeyRef {
            org_id: None,
            actor_id: "user:1",
            action: "read",
            resource_type: "Agent",
            resource_id,
            reason: "r",
            policy_version: "baseline:x",
            determining_policies: &[],
        }
    }

    /// Counts a permit of `resource_id` at `at`, opening its row when it is new; the row's id when
    /// it was new.
    fn permit(folds: &Folds, resource_id: &str, at: OffsetDateTime) -> Option<Uuid> {
        let k = key(resource_id);
        let h = folds.hash(&k);
        match folds.count(&k, h, at, &AtomicBool::new(false)) {
            Counted::Folded => None,
            Counted::New => {
                let id = Uuid::now_v7();
                folds.open(&k, h, id, at);
                Some(id)
            }
            Counted::Stopped => panic!("not stopping"),
        }
    }

    fn memo_key(org: u128, budget_exceeded: bool) -> MemoKey {
        MemoKey { rule: 1, actor_type: ActorType::Agent, org_id: Some(Uuid::from_u128(org)), budget_exceeded }
    }

    fn built(id: &str) -> ApiResult<Option<Query>> {
        Ok(Some(Query {
            actor_id: id.into(),
            actor_type: "agent".into(),
            system_admin: false,
            org_role: "agent".into(),
            scopes: None,
            required_scope: String::new(),
            action: "read".into(),
            resource: Resource::Platform,
            resource_id: "platform".into(),
            budget_exceeded: false,
            validate: false,
        }))
    }

    #[test]
    fn a_memoized_query_is_reused_only_for_its_own_key_and_the_memo_is_bounded() {
        let memo = QueryMemo::default();
        let first = memo.get_or_build(memo_key(1, false), || built("a")).unwrap().unwrap();
        let again = memo.get_or_build(memo_key(1, false), || panic!("built twice")).unwrap().unwrap();
        assert!(Arc::ptr_eq(&first, &again));
        // Another organization, or the budget state changing, is another query.
        let other_org = memo.get_or_build(memo_key(2, false), || built("b")).unwrap().unwrap();
        let over_budget = memo.get_or_build(memo_key(1, true), || built("c")).unwrap().unwrap();
        assert_eq!((other_org.actor_id.as_str(), over_budget.actor_id.as_str()), ("b", "c"));
        // A refusal is not kept: the next request builds (and may refuse) again.
        assert!(memo.get_or_build(memo_key(3, false), || Err(ApiError::NotFound)).is_err());
        assert_eq!(memo.get_or_build(memo_key(3, false), || built("d")).unwrap().unwrap().actor_id, "d");
        for i in 10..100 {
            memo.get_or_build(memo_key(i, false), || built("x")).unwrap();
        }
        assert_eq!(memo.0.lock().unwrap().len(), QueryMemo::MAX);
    }

    #[test]
    fn repeated_permits_fold_into_the_first_row() {
        let t0 = OffsetDateTime::now_utc();
        let folds = Folds::new(std::time::Duration::from_secs(10), 100);
        let rows: Vec<Uuid> = (0..5).filter_map(|i| permit(&folds, "a", t0 + time::Duration::seconds(i))).collect();
        assert_eq!(rows.len(), 1, "one row for a's five permits");
        assert!(permit(&folds, "b", t0).is_some(), "another resource is another row");
        let mut recounts = Vec::new();
        folds.close(t0 + time::Duration::seconds(9), false, &mut recounts);
        assert!(recounts.is_empty(), "nothing is written before the window ends");
        // Past the window: a's row gets its count, b's (never repeated) needs nothing.
        folds.close(t0 + time::Duration::seconds(11), false, &mut recounts);
        assert_eq!(
            recounts,
            vec![Recount { decision_id: rows[0], count: 5, last_at: t0 + time::Duration::seconds(4) }]
        );
        assert_eq!(folds.keys.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn a_permit_after_its_window_is_a_new_row_and_the_old_count_is_kept() {
        let t0 = OffsetDateTime::now_utc();
        let folds = Folds::new(std::time::Duration::from_secs(10), 100);
        let first = permit(&folds, "a", t0).unwrap();
        assert!(permit(&folds, "a", t0).is_none());
        assert!(permit(&folds, "a", t0 + time::Duration::seconds(10)).is_some(), "the window ended");
        let mut recounts = Vec::new();
        folds.close(t0, false, &mut recounts);
        assert_eq!(recounts, vec![Recount { decision_id: first, count: 2, last_at: t0 }]);
        // The new row was never repeated: nothing more to write.
        recounts.clear();
        folds.close(t0, true, &mut recounts);
        assert!(recounts.is_empty(), "{recounts:?}");
    }

    #[test]
    fn beyond_the_open_folds_allowed_a_permit_is_a_row_and_no_count_is_lost() {
        let t0 = OffsetDateTime::now_utc();
        let folds = Folds::new(std::time::Duration::from_secs(10), 2);
        let rows = ["a", "a", "b", "b", "c", "c"].iter().filter(|r| permit(&folds, r, t0).is_some()).count();
        assert_eq!(rows, 1 + 1 + 2, "c's permits are rows of their own while a and b are open");
        let mut recounts = Vec::new();
        folds.close(t0, true, &mut recounts);
        assert_eq!(recounts.iter().map(|r| r.count).sum::<i64>() + 2, 6, "{recounts:?}");
        assert_eq!(folds.keys.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn no_window_means_a_row_per_permit() {
        let t0 = OffsetDateTime::now_utc();
        let folds = Folds::new(std::time::Duration::ZERO, 100);
        assert_eq!((0..4).filter(|_| permit(&folds, "a", t0).is_some()).count(), 4);
        let mut recounts = Vec::new();
        folds.close(t0, true, &mut recounts);
        assert!(recounts.is_empty());
    }

    #[test]
    fn a_stopping_log_counts_nothing_more() {
        let t0 = OffsetDateTime::now_utc();
        let folds = Folds::new(std::time::Duration::from_secs(10), 100);
        permit(&folds, "a", t0).unwrap();
        let k = key("a");
        assert_eq!(folds.count(&k, folds.hash(&k), t0, &AtomicBool::new(true)), Counted::Stopped);
    }
}
