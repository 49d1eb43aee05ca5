//! `/api/v1/usage/*`: ingest over HTTP, the organization's aggregations, prices, budgets and
//! entitlements; and the original aggregation routes, `/internal/usage/*`, for system admins and
//! service keys.
//!
//! Who may do what: an agent reports and reads only its own usage (its `actor_id` and `agent_id`
//! are forced to itself); a service key acts for its organization; a human needs the owner or admin
//! role (and the decision point's permit on the organization's `UsageReport`).

use std::collections::BTreeMap;

use axum::{
    Json,
    body::Bytes,
    extract::State,
    http::{HeaderMap, StatusCode, header},
};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use time::OffsetDateTime;
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use super::{
    Entitlement,
    ingest::{self, Outcome, Source},
    model::{self, Kind, Limits, Rejection},
    query::{self, Agg, Filter, GroupBy},
};
use crate::{
    auth::{Actor, ActorType, Role, Scope},
    http::{
        ApiError, ApiResult,
        error::{FieldError, Problem},
        extract::{ApiJson, ApiPath, ApiQuery},
    },
    policy::{self, Resource},
    state::AppState,
};

/// 403 unless the credential carries `scope` (the routes are checked here, not by the layer).
pub(super) fn need(actor: &Actor, scope: Scope) -> ApiResult<()> {
    if actor.has_scope(scope) {
        return Ok(());
    }
    Err(ApiError::forbidden("insufficient_scope", format!("This credential lacks the `{}` scope.", scope.as_str())))
}

/// The organization a caller reads, and the agent it is limited to (an agent: itself).
fn reader(state: &AppState, actor: &Actor, agent_id: Option<Uuid>) -> ApiResult<(Uuid, Option<Uuid>)> {
    need(actor, Scope::UsageRead)?;
    let org_id = actor.current_org()?;
    match actor.actor_type {
        ActorType::Agent => {
            let me = actor.user_id();
            if agent_id.is_some_and(|a| a != me) {
                return Err(ApiError::NotFound);
            }
            policy::require(
                state,
                actor,
                "read",
                Resource::UsageReport { org_id, subject_id: actor.actor_id() },
                actor.actor_id(),
            )?;
            Ok((org_id, Some(me)))
        }
        ActorType::Service => Ok((org_id, agent_id)),
        ActorType::Human => {
            actor.require_role(org_id, Role::Admin)?;
            let subject = format!("org:{org_id}");
            policy::require(
                state,
                actor,
                "read",
                Resource::UsageReport { org_id, subject_id: subject.clone() },
                subject,
            )?;
            Ok((org_id, agent_id))
        }
    }
}

/// The organization of an owner, admin or service key managing prices and budgets.
fn manager(actor: &Actor, scope: Scope) -> ApiResult<Uuid> {
    need(actor, scope)?;
    let org_id = actor.current_org()?;
    match actor.actor_type {
        ActorType::Service => Ok(org_id),
        ActorType::Agent => Err(ApiError::forbidden("agent_not_allowed", "Agents cannot manage usage settings.")),
        ActorType::Human => {
            actor.require_role(org_id, Role::Admin)?;
            Ok(org_id)
        }
    }
}

// ---- Ingest ---------------------------------------------------------------------------------

/// What became of one event of a batch.
#[derive(Debug, Serialize, ToSchema)]
pub struct EventResult {
    /// Its position in the batch.
    pub index: usize,
    pub event_id: Option<String>,
    /// `accepted`, `duplicate` (counted before; nothing changed) or `rejected`.
    pub status: &'static str,
    pub code: Option<&'static str>,
    pub reason: Option<String>,
}

/// The answer to a batch: every event's outcome, in order.
#[derive(Debug, Serialize, ToSchema)]
pub struct IngestResult {
    pub accepted: usize,
    pub duplicate: usize,
    pub rejected: usize,
    pub results: Vec<EventResult>,
}

fn media_type(headers: &HeaderMap) -> String {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .map(|m| m.trim().to_ascii_lowercase())
        .unwrap_or_default()
}

/// Reports usage: one event or a JSON array of them (`application/json`), one CloudEvent
/// (`application/cloudevents+json`) or a batch of them (`application/cloudevents-batch+json`).
/// Each is counted once per `(organization, event_id)`: a retry answers `duplicate` and changes
/// nothing. An agent's token reports only for itself. When no event is accepted or a duplicate,
/// the answer is 422 with each event's reason in `errors`.
#[utoipa::path(post, path = "/api/v1/usage/events", tag = "usage",
    request_body(content = Value, description = "An event, an array of events, a CloudEvent or a CloudEvents batch",
        content_type = "application/json"),
    security(("bearer" = []), ("api_key" = []), ("session_cookie" = [])),
    responses(
        (status = 200, body = IngestResult, description = "Per event: accepted, duplicate or rejected"),
        (status = 400, body = Problem, description = "Not JSON"),
        (status = 403, body = Problem),
        (status = 413, body = Problem),
        (status = 415, body = Problem),
        (status = 422, body = Problem, description = "Nothing counted: every event rejected, or too many")))]
pub(super) async fn post_events(
    State(state): State<AppState>,
    actor: Actor,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult<Json<IngestResult>> {
    need(&actor, Scope::UsageWrite)?;
    let org_id = actor.current_org()?;
    if actor.actor_type == ActorType::Human {
        actor.require_role(org_id, Role::Admin)?;
    }
    let media = media_type(&headers);
    let batch_type = media == "application/cloudevents-batch+json";
    if !(media == "application/json" || media == "application/cloudevents+json" || batch_type) {
        return Err(ApiError::Status {
            status: StatusCode::UNSUPPORTED_MEDIA_TYPE,
            code: "unsupported_media_type",
            detail: "Expected application/json, application/cloudevents+json or application/cloudevents-batch+json."
                .into(),
        });
    }
    let value: Value = serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad_request("malformed_json", e.to_string().chars().take(300).collect::<String>()))?;
    let items: Vec<Value> = match value {
        Value::Array(items) => items,
        other if !batch_type => vec![other],
        _ => {
            return Err(ApiError::field("", "type", "A CloudEvents batch is a JSON array."));
        }
    };
    let cfg = &state.config().usage;
    if items.is_empty() {
        return Err(ApiError::field("", "length", "The batch is empty."));
    }
    if items.len() > cfg.http_batch_max {
        return Err(ApiError::Invalid {
            status: StatusCode::UNPROCESSABLE_ENTITY,
            code: "batch_too_large",
            detail: format!("At most {} events per request.", cfg.http_batch_max).into(),
            errors: Vec::new(),
        });
    }
    let limits = limits(&state);
    let check_size = body.len() > cfg.max_event_bytes;
    let mut ids = Vec::with_capacity(items.len());
    let mut events = Vec::with_capacity(items.len());
    for item in &items {
        if check_size && serde_json::to_vec(item).map(|v| v.len()).unwrap_or(usize::MAX) > cfg.max_event_bytes {
            ids.push(item.get("event_id").or_else(|| item.get("id")).and_then(Value::as_str).map(str::to_owned));
            events.push(Err(Rejection::new("too_large", format!("an event is at most {} bytes", cfg.max_event_bytes))));
            continue;
        }
        let parsed = model::parse(item, None, Some(org_id), &limits);
        ids.push(parsed.event_id.clone());
        let result = parsed.result.and_then(|mut e| {
            if e.org_id != org_id {
                return Err(Rejection::new("org_mismatch", "org_id: not the organization of this credential"));
            }
            if actor.actor_type == ActorType::Agent {
                // An agent reports for itself, whatever the body says.
                e.actor_id = actor.actor_id();
                e.actor_type = "agent".into();
                e.agent_id = Some(actor.user_id());
            }
            Ok(e)
        });
        events.push(result);
    }
    let outcomes = ingest::ingest(&state, events, Source::Http).await?;
    let mut out = IngestResult { accepted: 0, duplicate: 0, rejected: 0, results: Vec::with_capacity(outcomes.len()) };
    for (index, (o, event_id)) in outcomes.into_iter().zip(ids).enumerate() {
        let (status, code, reason) = match o {
            Outcome::Accepted => {
                out.accepted += 1;
                ("accepted", None, None)
            }
            Outcome::Duplicate => {
                out.duplicate += 1;
                ("duplicate", None, None)
            }
            Outcome::Rejected(r) => {
                out.rejected += 1;
                ("rejected", Some(r.code), Some(r.reason))
            }
        };
        out.results.push(EventResult { index, event_id, status, code, reason });
    }
    if out.accepted + out.duplicate == 0 {
        let errors = out
            .results
            .into_iter()
            .map(|r| FieldError {
                field: format!("[{}]", r.index),
                code: r.code.unwrap_or("rejected").to_owned(),
                message: r.reason.unwrap_or_default(),
            })
            .collect();
        return Err(ApiError::Invalid {
            status: StatusCode::UNPROCESSABLE_ENTITY,
            code: "usage_rejected",
            detail: "No event was counted; see `errors` for each one's reason.".into(),
            errors,
        });
    }
    Ok(Json(out))
}

/// The timestamp window events must fall in, now.
pub(super) fn limits(state: &AppState) -> Limits {
    let cfg = &state.config().usage;
    Limits {
        now: state.clock().now(),
        max_past: time::Duration::seconds(cfg.max_past_secs.min(i64::MAX as u64) as i64),
        max_future: time::Duration::seconds(cfg.max_future_secs.min(i64::MAX as u64) as i64),
    }
}

// ---- Aggregation ----------------------------------------------------------------------------

/// The range and breakdown of an aggregation.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct UsageQuery {
    /// RFC 3339; rounded down to the hour. Default: 24 hours before `until`.
    #[serde(default, with = "time::serde::rfc3339::option")]
    #[param(value_type = Option<String>)]
    pub since: Option<OffsetDateTime>,
    /// RFC 3339, exclusive; rounded up to the hour. Default: now.
    #[serde(default, with = "time::serde::rfc3339::option")]
    #[param(value_type = Option<String>)]
    pub until: Option<OffsetDateTime>,
    /// Only this agent's usage (an agent always reads its own).
    pub agent_id: Option<Uuid>,
    /// `hour` or `day`: add a series bucketed so.
    pub group_by: Option<String>,
}

/// The original aggregation routes' parameters.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct InternalQuery {
    /// The organization (microDAO).
    pub microdao_id: Uuid,
    /// The last this many hours, 1 to 8784 (default 24).
    pub period_hours: Option<u32>,
}

/// LLM calls in a range.
#[derive(Debug, Serialize, ToSchema)]
pub struct LlmTotals {
    pub calls: i64,
    pub errors: i64,
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
    pub total_tokens: i64,
    pub cost_micros: i64,
    pub latency_avg_ms: Option<f64>,
    /// From the rollups' histograms: the upper bound of the bucket holding the 95th percentile.
    pub latency_p95_ms: Option<i64>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ToolTotals {
    pub calls: i64,
    pub successes: i64,
    pub failures: i64,
    /// successes / calls; none without calls.
    pub success_rate: Option<f64>,
    pub latency_avg_ms: Option<f64>,
    pub latency_p95_ms: Option<i64>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct AgentTotals {
    pub invocations: i64,
    pub llm_calls: i64,
    pub tool_calls: i64,
    pub duration_ms: i64,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct MessageTotals {
    pub count: i64,
    pub total_length: i64,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ModelUsage {
    pub model: String,
    #[serde(flatten)]
    pub totals: LlmTotals,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ToolUsage {
    pub tool: String,
    #[serde(flatten)]
    pub totals: ToolTotals,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct AgentUsage {
    /// None: events that named no agent.
    pub agent_id: Option<Uuid>,
    pub llm_calls: i64,
    pub total_tokens: i64,
    pub cost_micros: i64,
    pub tool_calls: i64,
    pub invocations: i64,
    pub messages: i64,
}

/// One bucket of the series.
#[derive(Debug, Serialize, ToSchema)]
pub struct SeriesPoint {
    #[serde(with = "time::serde::rfc3339")]
    pub period: OffsetDateTime,
    pub llm_calls: i64,
    pub total_tokens: i64,
    pub cost_micros: i64,
    pub tool_calls: i64,
    pub agent_invocations: i64,
    pub messages: i64,
}

/// Everything in a range, with the breakdowns.
#[derive(Debug, Serialize, ToSchema)]
pub struct Summary {
    pub org_id: Uuid,
    pub agent_id: Option<Uuid>,
    #[serde(with = "time::serde::rfc3339")]
    pub since: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub until: OffsetDateTime,
    pub llm: LlmTotals,
    pub tools: ToolTotals,
    pub agents: AgentTotals,
    pub messages: MessageTotals,
    pub by_model: Vec<ModelUsage>,
    pub by_agent: Vec<AgentUsage>,
    pub by_tool: Vec<ToolUsage>,
    /// With `group_by`: per hour or day, oldest first.
    pub series: Vec<SeriesPoint>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ModelsAnswer {
    pub org_id: Uuid,
    #[serde(with = "time::serde::rfc3339")]
    pub since: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub until: OffsetDateTime,
    pub models: Vec<ModelUsage>,
    /// With `group_by`: each model's LLM usage per hour or day, oldest first (a bucket without
    /// calls to the model is left out).
    pub series: Vec<ModelSeries>,
}

/// One model's LLM usage over time.
#[derive(Debug, Serialize, ToSchema)]
pub struct ModelSeries {
    pub model: String,
    pub points: Vec<ModelSeriesPoint>,
}

/// One bucket of a model's series.
#[derive(Debug, Serialize, ToSchema)]
pub struct ModelSeriesPoint {
    #[serde(with = "time::serde::rfc3339")]
    pub period: OffsetDateTime,
    pub calls: i64,
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
    pub total_tokens: i64,
    pub cost_micros: i64,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct AgentsAnswer {
    pub org_id: Uuid,
    #[serde(with = "time::serde::rfc3339")]
    pub since: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub until: OffsetDateTime,
    pub agents: Vec<AgentUsage>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ToolsAnswer {
    pub org_id: Uuid,
    #[serde(with = "time::serde::rfc3339")]
    pub since: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub until: OffsetDateTime,
    pub tools: Vec<ToolUsage>,
}

fn llm_totals(a: &Agg) -> LlmTotals {
    LlmTotals {
        calls: a.events,
        errors: a.failures,
        prompt_tokens: a.prompt_tokens,
        completion_tokens: a.completion_tokens,
        total_tokens: a.total_tokens,
        cost_micros: a.cost_micros,
        latency_avg_ms: a.latency_avg_ms(),
        latency_p95_ms: a.latency_p95_ms(),
    }
}

fn tool_totals(a: &Agg) -> ToolTotals {
    ToolTotals {
        calls: a.events,
        successes: a.successes,
        failures: a.failures,
        success_rate: (a.events > 0).then(|| a.successes as f64 / a.events as f64),
        latency_avg_ms: a.latency_avg_ms(),
        latency_p95_ms: a.latency_p95_ms(),
    }
}

/// Sums of the rows matching `pick`, keyed.
fn group<K: Ord>(rows: &[Agg], pick: impl Fn(&Agg) -> Option<K>) -> BTreeMap<K, Agg> {
    let mut out: BTreeMap<K, Agg> = BTreeMap::new();
    for r in rows {
        if let Some(k) = pick(r) {
            out.entry(k).or_default().add(r);
        }
    }
    out
}

fn kind_is(r: &Agg, k: Kind) -> bool {
    r.kind == k.as_str()
}

fn by_model(rows: &[Agg]) -> Vec<ModelUsage> {
    group(rows, |r| kind_is(r, Kind::Llm).then(|| r.dimension.clone()))
        .into_iter()
        .map(|(model, a)| ModelUsage { model, totals: llm_totals(&a) })
        .collect()
}

/// Each model's buckets, models by name and buckets oldest first (rows without a period, as in
/// an unbucketed query, give none).
fn model_series(rows: &[Agg]) -> Vec<ModelSeries> {
    group(rows, |r| (kind_is(r, Kind::Llm) && r.period.is_some()).then(|| (r.dimension.clone(), r.period)))
        .into_iter()
        .fold(Vec::<ModelSeries>::new(), |mut out, ((model, period), a)| {
            let Some(period) = period else { return out };
            let point = ModelSeriesPoint {
                period,
                calls: a.events,
                prompt_tokens: a.prompt_tokens,
                completion_tokens: a.completion_tokens,
                total_tokens: a.total_tokens,
                cost_micros: a.cost_micros,
            };
            match out.last_mut() {
                Some(last) if last.model == model => last.points.push(point),
                _ => out.push(ModelSeries { model, points: vec![point] }),
            }
            out
        })
}

fn by_tool(rows: &[Agg]) -> Vec<ToolUsage> {
    group(rows, |r| kind_is(r, Kind::Tool).then(|| r.dimension.clone()))
        .into_iter()
        .map(|(tool, a)| ToolUsage { tool, totals: tool_totals(&a) })
        .collect()
}

fn by_agent(rows: &[Agg]) -> Vec<AgentUsage> {
    let mut out: BTreeMap<Option<Uuid>, AgentUsage> = BTreeMap::new();
    for r in rows {
        let a = out.entry(r.agent_id).or_insert_with(|| AgentUsage {
            agent_id: r.agent_id,
            llm_calls: 0,
            total_tokens: 0,
            cost_micros: 0,
            tool_calls: 0,
            invocations: 0,
            messages: 0,
        });
        match r.kind.as_str() {
            "llm" => {
                a.llm_calls += r.events;
                a.total_tokens += r.total_tokens;
                a.cost_micros += r.cost_micros;
            }
            "tool" => a.tool_calls += r.events,
            "agent" => a.invocations += r.invocations,
            "message" => a.messages += r.events,
            _ => {}
        }
    }
    out.into_values().collect()
}

fn summarize(org_id: Uuid, f: &Filter, rows: &[Agg]) -> Summary {
    let total = |k: Kind| {
        let mut a = Agg::default();
        for r in rows.iter().filter(|r| kind_is(r, k)) {
            a.add(r);
        }
        a
    };
    let (llm, tool, agent, message) = (total(Kind::Llm), total(Kind::Tool), total(Kind::Agent), total(Kind::Message));
    let mut series: BTreeMap<OffsetDateTime, SeriesPoint> = BTreeMap::new();
    for r in rows {
        let Some(period) = r.period else { continue };
        let p = series.entry(period).or_insert_with(|| SeriesPoint {
            period,
            llm_calls: 0,
            total_tokens: 0,
            cost_micros: 0,
            tool_calls: 0,
            agent_invocations: 0,
            messages: 0,
        });
        match r.kind.as_str() {
            "llm" => {
                p.llm_calls += r.events;
                p.total_tokens += r.total_tokens;
                p.cost_micros += r.cost_micros;
            }
            "tool" => p.tool_calls += r.events,
            "agent" => p.agent_invocations += r.invocations,
            "message" => p.messages += r.events,
            _ => {}
        }
    }
    Summary {
        org_id,
        agent_id: f.agent_id,
        since: f.since,
        until: f.until,
        llm: llm_totals(&llm),
        tools: tool_totals(&tool),
        agents: AgentTotals {
            invocations: agent.invocations,
            llm_calls: agent.llm_calls,
            tool_calls: agent.tool_calls,
            duration_ms: agent.duration_ms,
        },
        messages: MessageTotals { count: message.events, total_length: message.message_length },
        by_model: by_model(rows),
        by_agent: by_agent(rows),
        by_tool: by_tool(rows),
        series: series.into_values().collect(),
    }
}

fn floor_hour(t: OffsetDateTime) -> OffsetDateTime {
    let t = t.to_offset(time::UtcOffset::UTC);
    t.replace_time(time::Time::from_hms(t.hour(), 0, 0).unwrap_or(time::Time::MIDNIGHT))
}

/// The filter of an org-scoped query, checked.
fn filter(state: &AppState, org_id: Uuid, agent_id: Option<Uuid>, q: &UsageQuery) -> ApiResult<Filter> {
    let until = q.until.unwrap_or_else(|| state.clock().now());
    let until_floor = floor_hour(until);
    let until = if until_floor == until { until } else { until_floor + time::Duration::hours(1) };
    let since = floor_hour(q.since.unwrap_or(until - time::Duration::hours(24)));
    if since >= until {
        return Err(ApiError::bad_request("invalid_query", "since must be before until"));
    }
    if until - since > time::Duration::days(400) {
        return Err(ApiError::bad_request("invalid_query", "at most 400 days at once"));
    }
    let group_by = match q.group_by.as_deref() {
        None => None,
        Some("hour") => Some(GroupBy::Hour),
        Some("day") => Some(GroupBy::Day),
        Some(_) => return Err(ApiError::bad_request("invalid_query", "group_by must be hour or day")),
    };
    if group_by == Some(GroupBy::Hour) && until - since > time::Duration::days(31) {
        return Err(ApiError::bad_request("invalid_query", "group_by=hour covers at most 31 days"));
    }
    Ok(Filter { org_id, since, until, agent_id, group_by })
}

async fn org_rows(state: &AppState, actor: &Actor, q: &UsageQuery) -> ApiResult<(Filter, Vec<Agg>)> {
    let (org_id, agent_id) = reader(state, actor, q.agent_id)?;
    let f = filter(state, org_id, agent_id, q)?;
    let rows = query::aggregate(state.db(), &f).await?;
    Ok((f, rows))
}

/// The organization's usage in a range: LLM calls, tokens, latency, cost, tool calls and success
/// rate, agent invocations, messages, by model, agent and tool; with `group_by`, a series.
#[utoipa::path(get, path = "/api/v1/usage/summary", tag = "usage", params(UsageQuery),
    security(("bearer" = []), ("api_key" = []), ("session_cookie" = [])),
    responses((status = 200, body = Summary), (status = 400, body = Problem), (status = 403, body = Problem)))]
pub(super) async fn summary(
    State(state): State<AppState>,
    actor: Actor,
    ApiQuery(q): ApiQuery<UsageQuery>,
) -> ApiResult<Json<Summary>> {
    let (f, rows) = org_rows(&state, &actor, &q).await?;
    Ok(Json(summarize(f.org_id, &f, &rows)))
}

/// LLM usage by model; with `group_by`, each model's series too (tokens and cost over time).
#[utoipa::path(get, path = "/api/v1/usage/models", tag = "usage", params(UsageQuery),
    security(("bearer" = []), ("api_key" = []), ("session_cookie" = [])),
    responses((status = 200, body = ModelsAnswer), (status = 400, body = Problem), (status = 403, body = Problem)))]
pub(super) async fn models(
    State(state): State<AppState>,
    actor: Actor,
    ApiQuery(q): ApiQuery<UsageQuery>,
) -> ApiResult<Json<ModelsAnswer>> {
    let (f, rows) = org_rows(&state, &actor, &q).await?;
    Ok(Json(ModelsAnswer {
        org_id: f.org_id,
        since: f.since,
        until: f.until,
        models: by_model(&rows),
        series: model_series(&rows),
    }))
}

/// Usage by agent.
#[utoipa::path(get, path = "/api/v1/usage/agents", tag = "usage", params(UsageQuery),
    security(("bearer" = []), ("api_key" = []), ("session_cookie" = [])),
    responses((status = 200, body = AgentsAnswer), (status = 400, body = Problem), (status = 403, body = Problem)))]
pub(super) async fn agents(
    State(state): State<AppState>,
    actor: Actor,
    ApiQuery(q): ApiQuery<UsageQuery>,
) -> ApiResult<Json<AgentsAnswer>> {
    let (f, rows) = org_rows(&state, &actor, &q).await?;
    Ok(Json(AgentsAnswer { org_id: f.org_id, since: f.since, until: f.until, agents: by_agent(&rows) }))
}

/// Tool calls by tool, with success rates.
#[utoipa::path(get, path = "/api/v1/usage/tools", tag = "usage", params(UsageQuery),
    security(("bearer" = []), ("api_key" = []), ("session_cookie" = [])),
    responses((status = 200, body = ToolsAnswer), (status = 400, body = Problem), (status = 403, body = Problem)))]
pub(super) async fn tools(
    State(state): State<AppState>,
    actor: Actor,
    ApiQuery(q): ApiQuery<UsageQuery>,
) -> ApiResult<Json<ToolsAnswer>> {
    let (f, rows) = org_rows(&state, &actor, &q).await?;
    Ok(Json(ToolsAnswer { org_id: f.org_id, since: f.since, until: f.until, tools: by_tool(&rows) }))
}

/// The original routes: system admins for any organization, a service key for its own (another
/// organization is a 404).
async fn internal_rows(state: &AppState, actor: &Actor, q: &InternalQuery) -> ApiResult<(Filter, Vec<Agg>)> {
    need(actor, Scope::UsageRead)?;
    let org_id = q.microdao_id;
    let bound = actor.principal.credential.bound_org();
    let allowed =
        actor.is_system_admin_for(Some(org_id)) || (actor.actor_type == ActorType::Service && bound == Some(org_id));
    if !allowed {
        if actor.actor_type == ActorType::Service || actor.is_system_admin() {
            return Err(ApiError::NotFound);
        }
        return Err(ApiError::forbidden("system_admin_required", "System admins and service keys only."));
    }
    let hours = q.period_hours.unwrap_or(24);
    if !(1..=8784).contains(&hours) {
        return Err(ApiError::bad_request("invalid_query", "period_hours must be between 1 and 8784"));
    }
    let until = floor_hour(state.clock().now()) + time::Duration::hours(1);
    let f =
        Filter { org_id, since: until - time::Duration::hours(hours as i64), until, agent_id: None, group_by: None };
    let rows = query::aggregate(state.db(), &f).await?;
    Ok((f, rows))
}

/// A microDAO's usage over the last `period_hours` (the original route).
#[utoipa::path(get, path = "/internal/usage/summary", tag = "usage", params(InternalQuery),
    security(("bearer" = []), ("api_key" = [])),
    responses((status = 200, body = Summary), (status = 403, body = Problem), (status = 404, body = Problem)))]
pub(super) async fn internal_summary(
    State(state): State<AppState>,
    actor: Actor,
    ApiQuery(q): ApiQuery<InternalQuery>,
) -> ApiResult<Json<Summary>> {
    let (f, rows) = internal_rows(&state, &actor, &q).await?;
    Ok(Json(summarize(f.org_id, &f, &rows)))
}

/// A microDAO's LLM usage by model over the last `period_hours`.
#[utoipa::path(get, path = "/internal/usage/models", tag = "usage", params(InternalQuery),
    security(("bearer" = []), ("api_key" = [])),
    responses((status = 200, body = ModelsAnswer), (status = 403, body = Problem), (status = 404, body = Problem)))]
pub(super) async fn internal_models(
    State(state): State<AppState>,
    actor: Actor,
    ApiQuery(q): ApiQuery<InternalQuery>,
) -> ApiResult<Json<ModelsAnswer>> {
    let (f, rows) = internal_rows(&state, &actor, &q).await?;
    Ok(Json(ModelsAnswer {
        org_id: f.org_id,
        since: f.since,
        until: f.until,
        models: by_model(&rows),
        series: model_series(&rows),
    }))
}

/// A microDAO's usage by agent over the last `period_hours`.
#[utoipa::path(get, path = "/internal/usage/agents", tag = "usage", params(InternalQuery),
    security(("bearer" = []), ("api_key" = [])),
    responses((status = 200, body = AgentsAnswer), (status = 403, body = Problem), (status = 404, body = Problem)))]
pub(super) async fn internal_agents(
    State(state): State<AppState>,
    actor: Actor,
    ApiQuery(q): ApiQuery<InternalQuery>,
) -> ApiResult<Json<AgentsAnswer>> {
    let (f, rows) = internal_rows(&state, &actor, &q).await?;
    Ok(Json(AgentsAnswer { org_id: f.org_id, since: f.since, until: f.until, agents: by_agent(&rows) }))
}

/// A microDAO's tool calls by tool over the last `period_hours`.
#[utoipa::path(get, path = "/internal/usage/tools", tag = "usage", params(InternalQuery),
    security(("bearer" = []), ("api_key" = [])),
    responses((status = 200, body = ToolsAnswer), (status = 403, body = Problem), (status = 404, body = Problem)))]
pub(super) async fn internal_tools(
    State(state): State<AppState>,
    actor: Actor,
    ApiQuery(q): ApiQuery<InternalQuery>,
) -> ApiResult<Json<ToolsAnswer>> {
    let (f, rows) = internal_rows(&state, &actor, &q).await?;
    Ok(Json(ToolsAnswer { org_id: f.org_id, since: f.since, until: f.until, tools: by_tool(&rows) }))
}

// ---- Prices ---------------------------------------------------------------------------------

/// A model's price per million tokens, in micro-units.
#[derive(Debug, Serialize, ToSchema)]
pub struct PriceView {
    pub model: String,
    pub prompt: i64,
    pub completion: i64,
    /// `organization` (its own) or `configuration` (usage.prices).
    pub source: &'static str,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SetPrice {
    pub model: String,
    /// Micro-units per million prompt tokens.
    pub prompt: i64,
    pub completion: i64,
}

/// The prices in force for the organization: its own, then the configuration's.
#[utoipa::path(get, path = "/api/v1/usage/prices", tag = "usage",
    security(("bearer" = []), ("api_key" = []), ("session_cookie" = [])),
    responses((status = 200, body = Vec<PriceView>), (status = 403, body = Problem)))]
pub(super) async fn list_prices(State(state): State<AppState>, actor: Actor) -> ApiResult<Json<Vec<PriceView>>> {
    let org_id = manager(&actor, Scope::UsageRead)?;
    let own = state.usage().org_prices(state.db(), org_id).await?;
    let mut out: BTreeMap<String, PriceView> = state
        .config()
        .usage
        .prices
        .iter()
        .map(|(m, p)| {
            (
                m.clone(),
                PriceView { model: m.clone(), prompt: p.prompt, completion: p.completion, source: "configuration" },
            )
        })
        .collect();
    for (m, p) in own.iter() {
        out.insert(
            m.clone(),
            PriceView { model: m.clone(), prompt: p.prompt, completion: p.completion, source: "organization" },
        );
    }
    Ok(Json(out.into_values().collect()))
}

/// Sets the organization's own price of a model, for events ingested from now on (events already
/// counted keep their cost).
#[utoipa::path(post, path = "/api/v1/usage/prices", tag = "usage", request_body = SetPrice,
    security(("bearer" = []), ("api_key" = []), ("session_cookie" = [])),
    responses((status = 200, body = PriceView), (status = 403, body = Problem), (status = 422, body = Problem)))]
pub(super) async fn set_price(
    State(state): State<AppState>,
    actor: Actor,
    ApiJson(body): ApiJson<SetPrice>,
) -> ApiResult<Json<PriceView>> {
    let org_id = manager(&actor, Scope::UsageManage)?;
    let mut errors = Vec::new();
    let model_len = body.model.chars().count();
    if model_len == 0 || model_len > 200 || body.model.chars().any(char::is_control) {
        errors.push(FieldError {
            field: "model".into(),
            code: "length".into(),
            message: "1 to 200 printable characters.".into(),
        });
    }
    for (field, v) in [("prompt", body.prompt), ("completion", body.completion)] {
        if !(0..=1_000_000_000_000_000).contains(&v) {
            errors.push(FieldError {
                field: field.into(),
                code: "range".into(),
                message: "Between 0 and 10^18.".into(),
            });
        }
    }
    if !errors.is_empty() {
        return Err(ApiError::Validation { errors });
    }
    sqlx::query!(
        "insert into usage_price (organization_id, model, prompt_per_million, completion_per_million)
         values ($1, $2, $3, $4)
         on conflict (organization_id, model) do update set prompt_per_million = excluded.prompt_per_million,
             completion_per_million = excluded.completion_per_million, updated_at = now()",
        org_id,
        body.model,
        body.prompt,
        body.completion
    )
    .execute(state.db())
    .await?;
    super::announce(&state, org_id).await;
    Ok(Json(PriceView { model: body.model, prompt: body.prompt, completion: body.completion, source: "organization" }))
}

/// Removes the organization's own price of a model (the configuration's applies again).
#[utoipa::path(delete, path = "/api/v1/usage/prices/{model}", tag = "usage", params(("model" = String, Path)),
    security(("bearer" = []), ("api_key" = []), ("session_cookie" = [])),
    responses((status = 204), (status = 403, body = Problem), (status = 404, body = Problem)))]
pub(super) async fn delete_price(
    State(state): State<AppState>,
    actor: Actor,
    ApiPath(model): ApiPath<String>,
) -> ApiResult<StatusCode> {
    let org_id = manager(&actor, Scope::UsageManage)?;
    let n = sqlx::query!("delete from usage_price where organization_id = $1 and model = $2", org_id, model)
        .execute(state.db())
        .await?
        .rows_affected();
    if n == 0 {
        return Err(ApiError::NotFound);
    }
    super::announce(&state, org_id).await;
    Ok(StatusCode::NO_CONTENT)
}

// ---- Budgets --------------------------------------------------------------------------------

/// A monthly budget: of the organization, or of one agent.
#[derive(Debug, Serialize, ToSchema)]
pub struct BudgetView {
    pub id: Uuid,
    /// None: the whole organization.
    pub agent_id: Option<Uuid>,
    pub token_limit: Option<i64>,
    pub cost_limit_micros: Option<i64>,
    /// `usage.budget_threshold_reached` is sent once a month when this share of a limit is used.
    pub threshold_percent: i16,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SetBudget {
    /// Omit for the organization's budget.
    pub agent_id: Option<Uuid>,
    pub token_limit: Option<i64>,
    pub cost_limit_micros: Option<i64>,
    /// 1 to 100, default 80.
    pub threshold_percent: Option<i16>,
}

/// The organization's budgets.
#[utoipa::path(get, path = "/api/v1/usage/budgets", tag = "usage",
    security(("bearer" = []), ("api_key" = []), ("session_cookie" = [])),
    responses((status = 200, body = Vec<BudgetView>), (status = 403, body = Problem)))]
pub(super) async fn list_budgets(State(state): State<AppState>, actor: Actor) -> ApiResult<Json<Vec<BudgetView>>> {
    let org_id = manager(&actor, Scope::UsageRead)?;
    let rows = sqlx::query_as!(
        BudgetView,
        "select usage_budget_id as id, agent_id, token_limit, cost_limit_micros, threshold_percent
         from usage_budget where organization_id = $1 order by agent_id nulls first",
        org_id
    )
    .fetch_all(state.db())
    .await?;
    Ok(Json(rows))
}

/// Sets the organization's (or an agent's) monthly budget, replacing the one it had.
#[utoipa::path(post, path = "/api/v1/usage/budgets", tag = "usage", request_body = SetBudget,
    security(("bearer" = []), ("api_key" = []), ("session_cookie" = [])),
    responses((status = 200, body = BudgetView), (status = 403, body = Problem), (status = 422, body = Problem)))]
pub(super) async fn set_budget(
    State(state): State<AppState>,
    actor: Actor,
    ApiJson(body): ApiJson<SetBudget>,
) -> ApiResult<Json<BudgetView>> {
    let org_id = manager(&actor, Scope::UsageManage)?;
    let mut errors = Vec::new();
    let mut positive = |field: &str, v: Option<i64>| {
        if v.is_some_and(|v| v <= 0) {
            errors.push(FieldError { field: field.into(), code: "range".into(), message: "Must be positive.".into() });
        }
    };
    positive("token_limit", body.token_limit);
    positive("cost_limit_micros", body.cost_limit_micros);
    if body.token_limit.is_none() && body.cost_limit_micros.is_none() {
        errors.push(FieldError {
            field: "token_limit".into(),
            code: "required".into(),
            message: "Set token_limit, cost_limit_micros or both.".into(),
        });
    }
    let threshold = body.threshold_percent.unwrap_or(80);
    if !(1..=100).contains(&threshold) {
        errors.push(FieldError {
            field: "threshold_percent".into(),
            code: "range".into(),
            message: "1 to 100.".into(),
        });
    }
    if let Some(agent) = body.agent_id {
        let orgs = crate::auth::directory::agent_orgs(state.db(), &[agent]).await?;
        if !orgs.iter().any(|(_, o)| *o == org_id) {
            errors.push(FieldError {
                field: "agent_id".into(),
                code: "unknown_agent".into(),
                message: "No such agent in the organization.".into(),
            });
        }
    }
    if !errors.is_empty() {
        return Err(ApiError::Validation { errors });
    }
    let row = sqlx::query_as!(
        BudgetView,
        "insert into usage_budget (usage_budget_id, organization_id, agent_id, token_limit, cost_limit_micros,
                                   threshold_percent)
         values ($1, $2, $3, $4, $5, $6)
         on conflict on constraint usage_budget_scope do update set token_limit = excluded.token_limit,
             cost_limit_micros = excluded.cost_limit_micros, threshold_percent = excluded.threshold_percent,
             updated_at = now()
         returning usage_budget_id as id, agent_id, token_limit, cost_limit_micros, threshold_percent",
        Uuid::now_v7(),
        org_id,
        body.agent_id,
        body.token_limit,
        body.cost_limit_micros,
        threshold
    )
    .fetch_one(state.db())
    .await?;
    super::announce(&state, org_id).await;
    Ok(Json(row))
}

/// Removes a budget.
#[utoipa::path(delete, path = "/api/v1/usage/budgets/{id}", tag = "usage", params(("id" = Uuid, Path)),
    security(("bearer" = []), ("api_key" = []), ("session_cookie" = [])),
    responses((status = 204), (status = 403, body = Problem), (status = 404, body = Problem)))]
pub(super) async fn delete_budget(
    State(state): State<AppState>,
    actor: Actor,
    ApiPath(id): ApiPath<Uuid>,
) -> ApiResult<StatusCode> {
    let org_id = manager(&actor, Scope::UsageManage)?;
    let n = sqlx::query!("delete from usage_budget where organization_id = $1 and usage_budget_id = $2", org_id, id)
        .execute(state.db())
        .await?
        .rows_affected();
    if n == 0 {
        return Err(ApiError::NotFound);
    }
    super::announce(&state, org_id).await;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct EntitlementQuery {
    /// The agent about to spend; an agent asks for itself (the default for an agent's token).
    pub agent_id: Option<Uuid>,
}

/// Whether the agent may spend more this month and how much is left under its own and its
/// organization's budgets. Answered from memory: cheap enough to ask before every LLM call.
#[utoipa::path(get, path = "/api/v1/usage/entitlements", tag = "usage", params(EntitlementQuery),
    security(("bearer" = []), ("api_key" = []), ("session_cookie" = [])),
    responses((status = 200, body = Entitlement), (status = 403, body = Problem), (status = 404, body = Problem)))]
pub(super) async fn entitlements(
    State(state): State<AppState>,
    actor: Actor,
    ApiQuery(q): ApiQuery<EntitlementQuery>,
) -> ApiResult<Json<Entitlement>> {
    need(&actor, Scope::UsageRead)?;
    let org_id = actor.current_org()?;
    let agent_id = match actor.actor_type {
        ActorType::Agent => {
            if q.agent_id.is_some_and(|a| a != actor.user_id()) {
                return Err(ApiError::NotFound);
            }
            Some(actor.user_id())
        }
        ActorType::Service => q.agent_id,
        ActorType::Human => {
            actor.require_role(org_id, Role::Admin)?;
            q.agent_id
        }
    };
    if let Some(agent) = agent_id
        && state.usage().agent_orgs(state.db(), vec![agent]).await?.get(&agent) != Some(&org_id)
    {
        return Err(ApiError::NotFound);
    }
    Ok(Json(super::entitlement(&state, org_id, agent_id).await?))
}
