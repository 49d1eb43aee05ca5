//! Writing a batch of events, whichever way it came (NATS or HTTP), exactly once.
//!
//! A batch is checked against the database's organizations and agents (through caches), priced,
//! and written in one transaction:
//! 1. one statement takes each `(org, event_id)` in `usage_event_key` (a repeat takes nothing),
//!    inserts the events that took theirs into the month's partition, and adds them to the hourly
//!    and daily rollups;
//! 2. one statement adds the new events' tokens and cost to the monthly spend of their
//!    organization and agent and records, once per period, the budgets they carried past their
//!    threshold or limit; each such notice is emitted through the outbox in the same transaction;
//! 3. the new events' totals per delegation draw down its spend budget
//!    ([`crate::delegation::spend::draw`]), ending it with `spend_limit` when used up.
//!
//! Nothing is counted unless all of it commits; a redelivered or retried event finds its key
//! taken and changes nothing.

use std::collections::{BTreeMap, HashMap, HashSet};

use serde_json::json;
use sqlx::PgConnection;
use time::{Date, OffsetDateTime};
use uuid::Uuid;

use super::model::{Kind, Rejection, UsageEvent};
use crate::{delegation::spend::SpendDraw, state::AppState};

/// Metric: events counted, by source.
pub const ACCEPTED: &str = "usage_events_accepted_total";
/// Metric: events already counted (a retry or redelivery), by source.
pub const DUPLICATE: &str = "usage_events_duplicate_total";
/// Metric: events rejected, by source and code.
pub const REJECTED: &str = "usage_events_rejected_total";

/// Where a batch came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Nats,
    Http,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Nats => "nats",
            Self::Http => "http",
        }
    }
}

/// What became of one event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Accepted,
    Duplicate,
    Rejected(Rejection),
}

/// The first day of `t`'s month (UTC).
pub fn month_of(t: OffsetDateTime) -> Date {
    let t = t.to_offset(time::UtcOffset::UTC);
    Date::from_calendar_date(t.year(), t.month(), 1).unwrap_or(Date::MIN)
}

/// Creates the partitions of these months unless this instance knows they exist.
pub async fn ensure_partitions(state: &AppState, months: impl IntoIterator<Item = Date>) -> Result<(), sqlx::Error> {
    for month in months {
        if state.usage().partition_known(month) {
            continue;
        }
        sqlx::query!("select usage_event_partition($1)", month).execute(state.db()).await?;
        state.usage().partition_made(month);
    }
    Ok(())
}

/// Counts a batch; returns what became of each event, in order. An error (the database) leaves
/// nothing counted: the caller retries the whole batch (NATS redelivers it, an HTTP client
/// retries), and what did commit before is then a duplicate.
pub async fn ingest(
    state: &AppState,
    events: Vec<Result<UsageEvent, Rejection>>,
    source: Source,
) -> anyhow::Result<Vec<Outcome>> {
    let mut outcomes: Vec<Option<Outcome>> = vec![None; events.len()];
    // Organizations and agents the events name, checked once per batch.
    let orgs: Vec<Uuid> = events.iter().filter_map(|e| e.as_ref().ok().map(|e| e.org_id)).collect();
    let agents: Vec<Uuid> = events.iter().filter_map(|e| e.as_ref().ok().and_then(|e| e.agent_id)).collect();
    let known_orgs = state.usage().known_orgs(state.db(), orgs).await?;
    let agent_orgs = state.usage().agent_orgs(state.db(), agents).await?;
    let mut seen: HashSet<(Uuid, String)> = HashSet::new();
    let mut batch: Vec<(usize, UsageEvent)> = Vec::with_capacity(events.len());
    for (i, e) in events.into_iter().enumerate() {
        let mut e = match e {
            Ok(e) => e,
            Err(r) => {
                outcomes[i] = Some(Outcome::Rejected(r));
                continue;
            }
        };
        if !known_orgs.contains(&e.org_id) {
            outcomes[i] = Some(Outcome::Rejected(Rejection::new("unknown_org", "org_id: no such organization")));
            continue;
        }
        if let Some(agent) = e.agent_id
            && agent_orgs.get(&agent) != Some(&e.org_id)
        {
            outcomes[i] =
                Some(Outcome::Rejected(Rejection::new("unknown_agent", "agent_id: no such agent in the organization")));
            continue;
        }
        if e.actor_id.is_empty() || e.actor_type.is_empty() {
            outcomes[i] =
                Some(Outcome::Rejected(Rejection::new("invalid_field", "actor_id and actor_type are required")));
            continue;
        }
        // The first of the same event in one batch counts; the others are its duplicates.
        if !seen.insert((e.org_id, e.event_id.clone())) {
            outcomes[i] = Some(Outcome::Duplicate);
            continue;
        }
        if e.kind == Kind::Llm {
            let price = state.usage().price(state, e.org_id, e.model.as_deref().unwrap_or_default()).await?;
            e.cost_micros = super::model::cost(price, e.prompt_tokens.unwrap_or(0), e.completion_tokens.unwrap_or(0));
        }
        batch.push((i, e));
    }
    if !batch.is_empty() {
        // One order for every writer, so that concurrent batches take row locks alike.
        batch.sort_by(|a, b| (a.1.org_id, &a.1.event_id).cmp(&(b.1.org_id, &b.1.event_id)));
        let months: HashSet<Date> = batch.iter().map(|(_, e)| month_of(e.occurred_at)).collect();
        ensure_partitions(state, months).await?;
        let fresh = write(state, &batch, source).await?;
        for (i, e) in &batch {
            outcomes[*i] = Some(if fresh.contains(&(e.org_id, e.event_id.clone())) {
                Outcome::Accepted
            } else {
                Outcome::Duplicate
            });
        }
        state.usage().spent(batch.iter().map(|(_, e)| e).filter(|e| fresh.contains(&(e.org_id, e.event_id.clone()))));
    }
    let outcomes: Vec<Outcome> = outcomes.into_iter().map(|o| o.unwrap_or(Outcome::Duplicate)).collect();
    let mut accepted = 0u64;
    let mut duplicate = 0u64;
    for o in &outcomes {
        match o {
            Outcome::Accepted => accepted += 1,
            Outcome::Duplicate => duplicate += 1,
            Outcome::Rejected(r) => {
                metrics::counter!(REJECTED, "source" => source.as_str(), "code" => r.code).increment(1)
            }
        }
    }
    metrics::counter!(ACCEPTED, "source" => source.as_str()).increment(accepted);
    metrics::counter!(DUPLICATE, "source" => source.as_str()).increment(duplicate);
    Ok(outcomes)
}

/// Writes the batch in one transaction; returns the `(org, event_id)` it newly counted.
async fn write(
    state: &AppState,
    batch: &[(usize, UsageEvent)],
    source: Source,
) -> anyhow::Result<HashSet<(Uuid, String)>> {
    let n = batch.len();
    macro_rules! col {
        ($f:expr) => {
            batch.iter().map(|(_, e)| $f(e)).collect::<Vec<_>>()
        };
    }
    let orgs = col!(|e: &UsageEvent| e.org_id);
    let ids = col!(|e: &UsageEvent| e.event_id.clone());
    let kinds = col!(|e: &UsageEvent| e.kind.as_str().to_owned());
    let ats = col!(|e: &UsageEvent| e.occurred_at);
    let actor_ids = col!(|e: &UsageEvent| e.actor_id.clone());
    let actor_types = col!(|e: &UsageEvent| e.actor_type.clone());
    let agents = col!(|e: &UsageEvent| e.agent_id);
    let delegations = col!(|e: &UsageEvent| e.delegation_id);
    let models = col!(|e: &UsageEvent| e.model.clone());
    let providers = col!(|e: &UsageEvent| e.provider.clone());
    let prompts = col!(|e: &UsageEvent| e.prompt_tokens);
    let completions = col!(|e: &UsageEvent| e.completion_tokens);
    let totals = col!(|e: &UsageEvent| e.total_tokens);
    let latencies = col!(|e: &UsageEvent| e.latency_ms);
    let successes = col!(|e: &UsageEvent| e.success);
    let errors = col!(|e: &UsageEvent| e.error.clone());
    let tool_ids = col!(|e: &UsageEvent| e.tool_id.clone());
    let tool_names = col!(|e: &UsageEvent| e.tool_name.clone());
    let invocations = col!(|e: &UsageEvent| e.invocations);
    let llm_calls = col!(|e: &UsageEvent| e.llm_calls);
    let tool_calls = col!(|e: &UsageEvent| e.tool_calls);
    let durations = col!(|e: &UsageEvent| e.duration_ms);
    let channels = col!(|e: &UsageEvent| e.channel_id.clone());
    let lengths = col!(|e: &UsageEvent| e.message_length);
    let senders = col!(|e: &UsageEvent| e.sender.clone());
    let costs = col!(|e: &UsageEvent| e.cost_micros);
    debug_assert_eq!(orgs.len(), n);

    let mut tx = state.db().begin().await?;
    let fresh = sqlx::query!(
        r#"with input as (
             select * from unnest($1::uuid[], $2::text[], $3::text[], $4::timestamptz[], $5::text[], $6::text[],
                                  $7::uuid[], $8::uuid[], $9::text[], $10::text[], $11::int8[], $12::int8[],
                                  $13::int8[], $14::int8[], $15::bool[], $16::text[], $17::text[], $18::text[],
                                  $19::int8[], $20::int8[], $21::int8[], $22::int8[], $23::text[], $24::int8[],
                                  $25::text[], $26::int8[])
                 as e(org, event_id, kind, at, actor_id, actor_type, agent, delegation, model, provider, prompt,
                      completion, total, latency, success, error, tool_id, tool_name, invocations, llm_calls,
                      tool_calls, duration, channel, msglen, sender, cost)
           ),
           taken as (
             insert into usage_event_key (organization_id, event_id, occurred_at)
             select org, event_id, at from input
             on conflict do nothing
             returning organization_id, event_id
           ),
           fresh as (
             select i.* from input i join taken t on t.organization_id = i.org and t.event_id = i.event_id
           ),
           stored as (
             insert into usage_event (organization_id, event_id, kind, occurred_at, source, actor_id, actor_type,
                                      agent_id, delegation_id, model, provider, prompt_tokens, completion_tokens,
                                      total_tokens, latency_ms, success, error, tool_id, tool_name, invocations,
                                      llm_calls, tool_calls, duration_ms, channel_id, message_length, sender,
                                      cost_micros)
             select org, event_id, kind, at, $27, actor_id, actor_type, agent, delegation, model, provider, prompt,
                    completion, total, latency, success, error, tool_id, tool_name, invocations, llm_calls,
                    tool_calls, duration, channel, msglen, sender, cost
             from fresh
           ),
           hourly as (
             select org, date_trunc('hour', at, 'UTC') as bucket, kind, agent,
                    coalesce(case kind when 'llm' then model when 'tool' then coalesce(tool_name, tool_id) end, '')
                        as dim,
                    count(*) as n,
                    count(*) filter (where success is not false) as ok,
                    count(*) filter (where success is false) as failed,
                    coalesce(sum(prompt), 0)::int8 as prompt, coalesce(sum(completion), 0)::int8 as completion,
                    coalesce(sum(total), 0)::int8 as total, coalesce(sum(cost), 0)::int8 as cost,
                    count(latency) as lat_n, coalesce(sum(latency), 0)::int8 as lat_sum,
                    coalesce(max(latency), 0)::int8 as lat_max,
                    count(*) filter (where latency <= 50) as h0,
                    count(*) filter (where latency > 50 and latency <= 100) as h1,
                    count(*) filter (where latency > 100 and latency <= 250) as h2,
                    count(*) filter (where latency > 250 and latency <= 500) as h3,
                    count(*) filter (where latency > 500 and latency <= 1000) as h4,
                    count(*) filter (where latency > 1000 and latency <= 2500) as h5,
                    count(*) filter (where latency > 2500 and latency <= 5000) as h6,
                    count(*) filter (where latency > 5000 and latency <= 10000) as h7,
                    count(*) filter (where latency > 10000 and latency <= 30000) as h8,
                    count(*) filter (where latency > 30000 and latency <= 60000) as h9,
                    count(*) filter (where latency > 60000) as h10,
                    coalesce(sum(invocations), 0)::int8 as invocations, coalesce(sum(llm_calls), 0)::int8 as llm_calls,
                    coalesce(sum(tool_calls), 0)::int8 as tool_calls, coalesce(sum(duration), 0)::int8 as duration,
                    coalesce(sum(msglen), 0)::int8 as msglen
             from fresh group by 1, 2, 3, 4, 5
           ),
           daily as (
             select org, date_trunc('day', bucket, 'UTC') as bucket, kind, agent, dim,
                    sum(n)::int8 as n, sum(ok)::int8 as ok, sum(failed)::int8 as failed, sum(prompt)::int8 as prompt,
                    sum(completion)::int8 as completion, sum(total)::int8 as total, sum(cost)::int8 as cost,
                    sum(lat_n)::int8 as lat_n, sum(lat_sum)::int8 as lat_sum, max(lat_max) as lat_max,
                    sum(h0)::int8 as h0, sum(h1)::int8 as h1, sum(h2)::int8 as h2, sum(h3)::int8 as h3,
                    sum(h4)::int8 as h4, sum(h5)::int8 as h5, sum(h6)::int8 as h6, sum(h7)::int8 as h7,
                    sum(h8)::int8 as h8, sum(h9)::int8 as h9, sum(h10)::int8 as h10,
                    sum(invocations)::int8 as invocations, sum(llm_calls)::int8 as llm_calls,
                    sum(tool_calls)::int8 as tool_calls, sum(duration)::int8 as duration, sum(msglen)::int8 as msglen
             from hourly group by 1, 2, 3, 4, 5
           ),
           rolled_hourly as (
             insert into usage_rollup_hourly as r (organization_id, bucket, kind, agent_id, dimension, events,
                 successes, failures, prompt_tokens, completion_tokens, total_tokens, cost_micros, latency_count,
                 latency_sum_ms, latency_max_ms, latency_buckets, invocations, llm_calls, tool_calls, duration_ms,
                 message_length)
             select org, bucket, kind, agent, dim, n, ok, failed, prompt, completion, total, cost, lat_n, lat_sum,
                    lat_max, array[h0, h1, h2, h3, h4, h5, h6, h7, h8, h9, h10], invocations, llm_calls, tool_calls,
                    duration, msglen
             from hourly order by org, bucket, kind, agent, dim
             on conflict on constraint usage_rollup_hourly_key do update set
                 events = r.events + excluded.events, successes = r.successes + excluded.successes,
                 failures = r.failures + excluded.failures, prompt_tokens = r.prompt_tokens + excluded.prompt_tokens,
                 completion_tokens = r.completion_tokens + excluded.completion_tokens,
                 total_tokens = r.total_tokens + excluded.total_tokens,
                 cost_micros = r.cost_micros + excluded.cost_micros,
                 latency_count = r.latency_count + excluded.latency_count,
                 latency_sum_ms = r.latency_sum_ms + excluded.latency_sum_ms,
                 latency_max_ms = greatest(r.latency_max_ms, excluded.latency_max_ms),
                 latency_buckets = (select array_agg(coalesce(a, 0) + coalesce(b, 0) order by i)
                                    from unnest(r.latency_buckets, excluded.latency_buckets) with ordinality as h(a, b, i)),
                 invocations = r.invocations + excluded.invocations, llm_calls = r.llm_calls + excluded.llm_calls,
                 tool_calls = r.tool_calls + excluded.tool_calls, duration_ms = r.duration_ms + excluded.duration_ms,
                 message_length = r.message_length + excluded.message_length
           ),
           rolled_daily as (
             insert into usage_rollup_daily as r (organization_id, bucket, kind, agent_id, dimension, events,
                 successes, failures, prompt_tokens, completion_tokens, total_tokens, cost_micros, latency_count,
                 latency_sum_ms, latency_max_ms, latency_buckets, invocations, llm_calls, tool_calls, duration_ms,
                 message_length)
             select org, bucket, kind, agent, dim, n, ok, failed, prompt, completion, total, cost, lat_n, lat_sum,
                    lat_max, array[h0, h1, h2, h3, h4, h5, h6, h7, h8, h9, h10], invocations, llm_calls, tool_calls,
                    duration, msglen
             from daily order by org, bucket, kind, agent, dim
             on conflict on constraint usage_rollup_daily_key do update set
                 events = r.events + excluded.events, successes = r.successes + excluded.successes,
                 failures = r.failures + excluded.failures, prompt_tokens = r.prompt_tokens + excluded.prompt_tokens,
                 completion_tokens = r.completion_tokens + excluded.completion_tokens,
                 total_tokens = r.total_tokens + excluded.total_tokens,
                 cost_micros = r.cost_micros + excluded.cost_micros,
                 latency_count = r.latency_count + excluded.latency_count,
                 latency_sum_ms = r.latency_sum_ms + excluded.latency_sum_ms,
                 latency_max_ms = greatest(r.latency_max_ms, excluded.latency_max_ms),
                 latency_buckets = (select array_agg(coalesce(a, 0) + coalesce(b, 0) order by i)
                                    from unnest(r.latency_buckets, excluded.latency_buckets) with ordinality as h(a, b, i)),
                 invocations = r.invocations + excluded.invocations, llm_calls = r.llm_calls + excluded.llm_calls,
                 tool_calls = r.tool_calls + excluded.tool_calls, duration_ms = r.duration_ms + excluded.duration_ms,
                 message_length = r.message_length + excluded.message_length
           )
           select organization_id as "org!", event_id as "event_id!" from taken"#,
        &orgs,
        &ids,
        &kinds,
        &ats,
        &actor_ids,
        &actor_types,
        &agents as &[Option<Uuid>],
        &delegations as &[Option<Uuid>],
        &models as &[Option<String>],
        &providers as &[Option<String>],
        &prompts as &[Option<i64>],
        &completions as &[Option<i64>],
        &totals as &[Option<i64>],
        &latencies as &[Option<i64>],
        &successes as &[Option<bool>],
        &errors as &[Option<String>],
        &tool_ids as &[Option<String>],
        &tool_names as &[Option<String>],
        &invocations as &[Option<i64>],
        &llm_calls as &[Option<i64>],
        &tool_calls as &[Option<i64>],
        &durations as &[Option<i64>],
        &channels as &[Option<String>],
        &lengths as &[Option<i64>],
        &senders as &[Option<String>],
        &costs,
        source.as_str(),
    )
    .fetch_all(&mut *tx)
    .await?;
    let fresh: HashSet<(Uuid, String)> = fresh.into_iter().map(|r| (r.org, r.event_id)).collect();
    if !fresh.is_empty() {
        let new_events: Vec<&UsageEvent> =
            batch.iter().map(|(_, e)| e).filter(|e| fresh.contains(&(e.org_id, e.event_id.clone()))).collect();
        spend(&mut tx, &new_events).await?;
        let mut draws: BTreeMap<(Uuid, Uuid), (i64, i64)> = BTreeMap::new();
        for e in &new_events {
            if let Some(d) = e.delegation_id {
                let t = draws.entry((e.org_id, d)).or_default();
                t.0 = t.0.saturating_add(e.cost_micros);
                t.1 = t.1.saturating_add(e.tokens());
            }
        }
        let draws: Vec<SpendDraw> = draws
            .into_iter()
            .map(|((org_id, delegation_id), (cost_micros, tokens))| SpendDraw {
                org_id,
                delegation_id,
                cost_micros,
                tokens,
            })
            .collect();
        if !draws.is_empty() {
            // Delegations' spend budgets are drawn in this transaction: exactly once per event.
            crate::delegation::spend::draw(&mut tx, &draws).await?;
        }
    }
    tx.commit().await?;
    Ok(fresh)
}

/// Adds the new events to the monthly spend of their organization and agent, and emits, once per
/// budget and period, `usage.budget_threshold_reached` and `usage.budget_exceeded` for the budgets
/// this carried past their threshold or limit.
async fn spend(tx: &mut PgConnection, events: &[&UsageEvent]) -> anyhow::Result<()> {
    let mut totals: BTreeMap<(Uuid, Option<Uuid>, Date), (i64, i64)> = BTreeMap::new();
    for e in events {
        if e.kind != Kind::Llm && e.cost_micros == 0 {
            continue;
        }
        let month = month_of(e.occurred_at);
        for agent in [None, e.agent_id].into_iter().collect::<HashSet<_>>() {
            let t = totals.entry((e.org_id, agent, month)).or_default();
            t.0 = t.0.saturating_add(e.tokens());
            t.1 = t.1.saturating_add(e.cost_micros);
        }
    }
    if totals.is_empty() {
        return Ok(());
    }
    let mut orgs = Vec::new();
    let mut agents = Vec::new();
    let mut periods = Vec::new();
    let mut tokens = Vec::new();
    let mut costs = Vec::new();
    for ((org, agent, period), (t, c)) in totals {
        orgs.push(org);
        agents.push(agent);
        periods.push(period);
        tokens.push(t);
        costs.push(c);
    }
    let notices = sqlx::query!(
        r#"with spent as (
             insert into usage_spend_monthly as s (organization_id, agent_id, period, tokens, cost_micros)
             select * from unnest($1::uuid[], $2::uuid[], $3::date[], $4::int8[], $5::int8[])
             on conflict on constraint usage_spend_monthly_key do update set
                 tokens = s.tokens + excluded.tokens, cost_micros = s.cost_micros + excluded.cost_micros
             returning organization_id, agent_id, period, tokens, cost_micros
           ),
           crossed as (
             select b.usage_budget_id, s.period, n.notice, b.organization_id, b.agent_id, b.token_limit,
                    b.cost_limit_micros, b.threshold_percent, s.tokens, s.cost_micros
             from spent s
             join usage_budget b on b.organization_id = s.organization_id and b.agent_id is not distinct from s.agent_id
             cross join (values ('threshold'), ('exceeded')) as n(notice)
             where (n.notice = 'exceeded' and (s.tokens >= b.token_limit or s.cost_micros >= b.cost_limit_micros))
                or (n.notice = 'threshold'
                    and (s.tokens::numeric * 100 >= b.token_limit::numeric * b.threshold_percent
                         or s.cost_micros::numeric * 100 >= b.cost_limit_micros::numeric * b.threshold_percent))
           ),
           noticed as (
             insert into usage_budget_notice (usage_budget_id, period, notice)
             select usage_budget_id, period, notice from crossed order by usage_budget_id, notice
             on conflict do nothing
             returning usage_budget_id, period, notice
           )
           select c.usage_budget_id as "budget_id!", c.period as "period!", c.notice as "notice!",
                  c.organization_id as "org_id!", c.agent_id, c.token_limit, c.cost_limit_micros,
                  c.threshold_percent as "threshold_percent!", c.tokens as "tokens!", c.cost_micros as "cost!"
           from noticed n join crossed c using (usage_budget_id, period, notice)
           order by c.usage_budget_id, c.notice desc"#,
        &orgs,
        &agents as &[Option<Uuid>],
        &periods,
        &tokens,
        &costs
    )
    .fetch_all(&mut *tx)
    .await?;
    for n in notices {
        let exceeded = n.notice == "exceeded";
        let pct = if exceeded { 100 } else { n.threshold_percent as i128 };
        let over = |used: i64, limit: Option<i64>| limit.is_some_and(|l| used as i128 * 100 >= l as i128 * pct);
        let (metric, limit, used) = if over(n.tokens, n.token_limit) {
            ("tokens", n.token_limit.unwrap_or(0), n.tokens)
        } else {
            ("cost_micros", n.cost_limit_micros.unwrap_or(0), n.cost)
        };
        let scope = match n.agent_id {
            Some(a) => format!("agent:{a}"),
            None => "organization".to_owned(),
        };
        let data = json!({
            "budget_id": n.budget_id,
            "scope": scope,
            "period": format!("{:04}-{:02}", n.period.year(), n.period.month() as u8),
            "metric": metric,
            "limit": limit,
            "used": used,
            "threshold_percent": n.threshold_percent,
        });
        let ty = if exceeded { "usage.budget_exceeded" } else { "usage.budget_threshold_reached" };
        crate::events::emit(&mut *tx, n.org_id, ty, format!("usage/budgets/{}", n.budget_id), data).await?;
    }
    Ok(())
}

/// The months of which partitions exist, by name (`usage_event_YYYYMM`).
pub(super) fn partition_name(month: Date) -> String {
    format!("usage_event_{:04}{:02}", month.year(), month.month() as u8)
}

/// Counts of what a batch did, for the HTTP answer and logs.
pub fn summarize(outcomes: &[Outcome]) -> HashMap<&'static str, usize> {
    let mut m = HashMap::new();
    for o in outcomes {
        let k = match o {
            Outcome::Accepted => "accepted",
            Outcome::Duplicate => "duplicate",
            Outcome::Rejected(_) => "rejected",
        };
        *m.entry(k).or_default() += 1;
    }
    m
}
