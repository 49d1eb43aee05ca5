//! The policy decision point (Cedar) and its enforcement.
//!
//! - [`engine`]: the schema and baseline (config/policies/), each organization's active version
//!   combined with the baseline (a baseline `forbid` always wins), evaluation.
//! - [`routes`]: what every protected route asks (action, resource type, scope), in one table; the
//!   policy layer enforces it.
//! - [`require`]: the PEP helper for handlers that must load the resource first.
//! - the decision log ([`DecisionLog`]): every decision queued in memory and written in batches,
//!   off the request path; on shutdown what is still queued is written before the pool closes.
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
pub struct DecisionLog {
    queue: mpsc::Sender<LoggedDecision>,
    rx: Mutex<Option<mpsc::Receiver<LoggedDecision>>>,
    stop: watch::Sender<bool>,
    batch: usize,
}

impl DecisionLog {
    pub fn new(capacity: usize, batch: usize) -> Self {
        let (queue, rx) = mpsc::channel(capacity);
        Self { queue, rx: Mutex::new(Some(rx)), stop: watch::channel(false).0, batch: batch.max(1) }
    }

    /// Starts the writer (once per process; later calls return `None`).
    pub fn spawn_writer(&self, db: sqlx::PgPool) -> Option<tokio::task::JoinHandle<()>> {
        let rx = self.rx.lock().unwrap_or_else(|e| e.into_inner()).take()?;
        Some(tokio::spawn(run_decision_writer(db, rx, self.batch, self.stop.subscribe())))
    }

    /// Asks the writer to write what is queued and stop; decisions made after this are dropped
    /// (and counted).
    pub fn stop(&self) {
        let _ = self.stop.send(true);
    }
}

/// Writes queued decisions in batches until asked to stop, then what is still queued.
async fn run_decision_writer(
    db: sqlx::PgPool,
    mut rx: mpsc::Receiver<LoggedDecision>,
    batch: usize,
    mut stop: watch::Receiver<bool>,
) {
    let mut buf = Vec::with_capacity(batch);
    loop {
        tokio::select! {
            n = rx.recv_many(&mut buf, batch) => {
                if n == 0 {
                    return;
                }
                write_decisions(&db, &mut buf).await;
            }
            _ = stop.changed() => break,
        }
    }
    rx.close();
    while rx.recv_many(&mut buf, batch).await > 0 {
        write_decisions(&db, &mut buf).await;
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
