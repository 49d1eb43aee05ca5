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

use std::sync::Mutex;

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
/// with the reason.
pub fn enforce(state: &AppState, query: &Query) -> ApiResult<Decision> {
    let decision = state.policy().evaluate(query).map_err(|e| ApiError::Internal(anyhow::anyhow!("policy: {e}")))?;
    log_decision(state, query, &decision);
    if decision.permitted() {
        return Ok(decision);
    }
    if decision.hide {
        return Err(ApiError::NotFound);
    }
    Err(ApiError::forbidden(decision.reason.clone(), format!("Denied by policy ({}).", decision.reason)))
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
    enforce(state, &query).map(|_| ())
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
/// entry and counts it).
pub fn log_decision(state: &AppState, q: &Query, d: &Decision) {
    let rate = state.config().policy.permit_sample_rate;
    if d.permitted() && rate < 1.0 && rand::random::<f64>() >= rate {
        return;
    }
    let entry = LoggedDecision {
        decision: d.clone(),
        org_id: q.resource.org_id(),
        request_id: crate::http::request_id::current_request_id(),
        actor_id: q.actor_id.clone(),
        action: q.action.clone(),
        resource_type: q.resource.type_name(),
        resource_id: q.resource_id.clone(),
        at: OffsetDateTime::now_utc(),
    };
    if state.decision_log().queue.try_send(entry).is_err() {
        metrics::counter!("decision_log_dropped_total").increment(1);
    }
}

/// The queue between decisions and the decision log's writer, which writes them in batches and,
/// asked to stop, writes what is still queued before it ends.
///
/// Repeated permits are folded: a permit identical to one written less than `fold` ago (same
/// organization, actor, action, resource, reason, policy version and determining policies) is
/// counted on that row instead of being a row of its own, so that the log's write volume grows
/// with the number of distinct decisions, not of requests. The count is written when the window
/// ends, when the writer stops, and when more distinct permits are open than `fold_keys`.
/// Denies are always a row each.
pub struct DecisionLog {
    queue: mpsc::Sender<LoggedDecision>,
    rx: Mutex<Option<mpsc::Receiver<LoggedDecision>>>,
    stop: watch::Sender<bool>,
    batch: usize,
    fold: std::time::Duration,
    fold_keys: usize,
}

impl DecisionLog {
    pub fn new(capacity: usize, batch: usize, fold: std::time::Duration, fold_keys: usize) -> Self {
        let (queue, rx) = mpsc::channel(capacity);
        Self {
            queue,
            rx: Mutex::new(Some(rx)),
            stop: watch::channel(false).0,
            batch: batch.max(1),
            fold,
            fold_keys: fold_keys.max(1),
        }
    }

    /// Starts the writer (once per process; later calls return `None`).
    pub fn spawn_writer(&self, db: sqlx::PgPool) -> Option<tokio::task::JoinHandle<()>> {
        let rx = self.rx.lock().unwrap_or_else(|e| e.into_inner()).take()?;
        let folds = Folds::new(self.fold, self.fold_keys);
        Some(tokio::spawn(run_decision_writer(db, rx, self.batch, folds, self.stop.subscribe())))
    }

    /// Asks the writer to write what is queued and stop; decisions made after this are dropped
    /// (and counted).
    pub fn stop(&self) {
        let _ = self.stop.send(true);
    }
}

/// What makes two permits the same decision for the log.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct FoldKey {
    org_id: Option<Uuid>,
    actor_id: String,
    action: String,
    resource_type: &'static str,
    resource_id: String,
    reason: String,
    policy_version: String,
    determining_policies: Vec<String>,
}

impl FoldKey {
    fn of(e: &LoggedDecision) -> Self {
        Self {
            org_id: e.org_id,
            actor_id: e.actor_id.clone(),
            action: e.action.clone(),
            resource_type: e.resource_type,
            resource_id: e.resource_id.clone(),
            reason: e.decision.reason.clone(),
            policy_version: e.decision.policy_version.clone(),
            determining_policies: e.decision.determining_policies.clone(),
        }
    }
}

/// An open fold: the row that stands for a permit's repeats within its window.
#[derive(Debug, Clone, Copy)]
struct Folded {
    decision_id: Uuid,
    window_end: OffsetDateTime,
    count: i64,
    written_count: i64,
    last_at: OffsetDateTime,
}

/// A row's new count, to be written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Recount {
    decision_id: Uuid,
    count: i64,
    last_at: OffsetDateTime,
}

impl Folded {
    fn recount(&mut self) -> Option<Recount> {
        if self.count == self.written_count {
            return None;
        }
        self.written_count = self.count;
        Some(Recount { decision_id: self.decision_id, count: self.count, last_at: self.last_at })
    }
}

/// The writer's open folds.
struct Folds {
    window: time::Duration,
    max_keys: usize,
    open: std::collections::HashMap<FoldKey, Folded>,
}

impl Folds {
    fn new(window: std::time::Duration, max_keys: usize) -> Self {
        Self {
            window: time::Duration::try_from(window).unwrap_or(time::Duration::ZERO),
            max_keys,
            open: std::collections::HashMap::new(),
        }
    }

    /// Splits a batch into the decisions to insert (in order) and the counts of rows that closed;
    /// repeats of an open permit only count.
    fn take(&mut self, batch: &mut Vec<LoggedDecision>, recounts: &mut Vec<Recount>) -> Vec<LoggedDecision> {
        if self.window.is_zero() {
            return std::mem::take(batch);
        }
        let mut rows = Vec::with_capacity(batch.len());
        for e in batch.drain(..) {
            if !e.decision.permitted() {
                rows.push(e);
                continue;
            }
            let key = FoldKey::of(&e);
            if let Some(f) = self.open.get_mut(&key)
                && e.at < f.window_end
            {
                f.count += 1;
                f.last_at = f.last_at.max(e.at);
                metrics::counter!("decision_log_folded_total").increment(1);
                continue;
            }
            if self.open.len() >= self.max_keys && !self.open.contains_key(&key) {
                // Too many distinct permits open: close them all (their counts are written) and
                // start again, so that memory stays bounded and nothing is lost.
                self.close_all(recounts);
            }
            let fresh = Folded {
                decision_id: e.decision.decision_id,
                window_end: e.at + self.window,
                count: 1,
                written_count: 1,
                last_at: e.at,
            };
            if let Some(mut old) = self.open.insert(key, fresh) {
                recounts.extend(old.recount());
            }
            rows.push(e);
        }
        rows
    }

    /// Closes the folds whose window ended before `now`.
    fn close_ended(&mut self, now: OffsetDateTime, recounts: &mut Vec<Recount>) {
        self.open.retain(|_, f| {
            if f.window_end > now {
                return true;
            }
            recounts.extend(f.recount());
            false
        });
    }

    fn close_all(&mut self, recounts: &mut Vec<Recount>) {
        recounts.extend(self.open.drain().filter_map(|(_, mut f)| f.recount()));
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
    mut folds: Folds,
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
            let mut rows = folds.take(&mut buf, &mut recounts);
            write_decisions(&db, &mut rows).await;
            if !full {
                break;
            }
        }
        folds.close_ended(OffsetDateTime::now_utc(), &mut recounts);
        if !recounts.is_empty() {
            write_recounts(&db, &mut recounts).await;
        }
    }
    rx.close();
    while rx.recv_many(&mut buf, batch).await > 0 {
        let mut rows = folds.take(&mut buf, &mut recounts);
        write_decisions(&db, &mut rows).await;
    }
    folds.close_all(&mut recounts);
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

    fn logged(effect: &'static str, resource_id: &str, at: OffsetDateTime) -> LoggedDecision {
        LoggedDecision {
            decision: Decision {
                effect,
                reason: "r".into(),
                decision_id: Uuid::now_v7(),
                policy_version: "baseline:x".into(),
                determining_policies: vec!["p".into()],
                hide: false,
            },
            org_id: None,
            request_id: None,
            actor_id: "user:1".into(),
            action: "read".into(),
            resource_type: "Agent",
            resource_id: resource_id.into(),
            at,
        }
    }

    #[test]
    fn repeated_permits_fold_into_the_first_row_and_denies_never_do() {
        let t0 = OffsetDateTime::now_utc();
        let mut folds = Folds::new(std::time::Duration::from_secs(10), 100);
        let mut recounts = Vec::new();
        let mut batch: Vec<_> = (0..5).map(|i| logged("permit", "a", t0 + time::Duration::seconds(i))).collect();
        let first = batch[0].decision.decision_id;
        batch.push(logged("permit", "b", t0));
        batch.extend((0..3).map(|_| logged("deny", "a", t0)));
        let rows = folds.take(&mut batch, &mut recounts);
        assert_eq!(rows.len(), 1 + 1 + 3, "one row for a's permits, one for b's, each deny");
        assert_eq!(rows[0].decision.decision_id, first);
        assert!(recounts.is_empty(), "nothing is written before the window ends");
        // Past the window: a's row gets its count, b's (never repeated) needs nothing.
        folds.close_ended(t0 + time::Duration::seconds(11), &mut recounts);
        assert_eq!(recounts, vec![Recount { decision_id: first, count: 5, last_at: t0 + time::Duration::seconds(4) }]);
        assert!(folds.open.is_empty());
    }

    #[test]
    fn a_permit_after_its_window_is_a_new_row_and_the_old_count_is_kept() {
        let t0 = OffsetDateTime::now_utc();
        let mut folds = Folds::new(std::time::Duration::from_secs(10), 100);
        let mut recounts = Vec::new();
        let mut batch = vec![
            logged("permit", "a", t0),
            logged("permit", "a", t0),
            logged("permit", "a", t0 + time::Duration::seconds(10)),
        ];
        let first = batch[0].decision.decision_id;
        let rows = folds.take(&mut batch, &mut recounts);
        assert_eq!(rows.len(), 2);
        assert_eq!(recounts, vec![Recount { decision_id: first, count: 2, last_at: t0 }]);
        // Written once: a count already written is not written again.
        recounts.clear();
        folds.close_all(&mut recounts);
        assert!(recounts.is_empty(), "{recounts:?}");
    }

    #[test]
    fn too_many_open_permits_close_them_all_and_lose_no_count() {
        let t0 = OffsetDateTime::now_utc();
        let mut folds = Folds::new(std::time::Duration::from_secs(10), 2);
        let mut recounts = Vec::new();
        let mut batch: Vec<_> = ["a", "a", "b", "b", "c", "c"].iter().map(|r| logged("permit", r, t0)).collect();
        let rows = folds.take(&mut batch, &mut recounts);
        assert_eq!(rows.len(), 3);
        let mut counted: Vec<i64> = recounts.iter().map(|r| r.count).collect();
        counted.sort();
        assert_eq!(counted, vec![2, 2], "a's and b's counts written when c arrived");
        assert_eq!(folds.open.len(), 1);
        folds.close_all(&mut recounts);
        assert_eq!(recounts.iter().map(|r| r.count).sum::<i64>(), 6);
    }

    #[test]
    fn no_window_means_a_row_per_permit() {
        let t0 = OffsetDateTime::now_utc();
        let mut folds = Folds::new(std::time::Duration::ZERO, 100);
        let mut recounts = Vec::new();
        let mut batch: Vec<_> = (0..4).map(|_| logged("permit", "a", t0)).collect();
        assert_eq!(folds.take(&mut batch, &mut recounts).len(), 4);
        assert!(recounts.is_empty());
    }
}
