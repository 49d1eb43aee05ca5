//! The analytics API over the per-request records (`analytics_event`, per minute): token trends,
//! an agent activity heatmap and a per-agent summary, read from an hourly rollup per
//! organization, kind and actor.
//!
//! The rollup is rebuilt from the minute buckets for the recent hours every
//! `usage.analytics_rollup_secs`, by one instance at a time (an advisory lock): a rebuild replaces
//! an hour's row with the sums of its minutes, so repeating it is harmless, and the minute buckets
//! stay the source of truth (kept `retention.analytics_days`; the rollup rows as long).

use std::time::Duration;

use axum::{Json, extract::State};
use serde::{Deserialize, Serialize};
use sqlx::PgPool;
use time::OffsetDateTime;
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use crate::{
    auth::{Actor, ActorType, Role},
    http::{ApiError, ApiResult, error::Problem, extract::ApiQuery},
    state::AppState,
};

/// The lock that makes one instance rebuild at a time.
const LOCK: i64 = 7_274_018;

pub(super) async fn run(state: AppState) {
    let mut tick = tokio::time::interval(Duration::from_secs(state.config().usage.analytics_rollup_secs.max(1)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if let Err(e) = roll_up(state.db(), state.config().retention.analytics_days).await {
            tracing::warn!(error = %e, "analytics rollup failed");
        }
    }
}

/// Rebuilds the hourly rollup from the minute buckets of the last two hours it holds (all of
/// them, the first time), and prunes rollup rows past `retention_days`. Returns the rows written,
/// or `None` when another instance holds the lock.
pub async fn roll_up(db: &PgPool, retention_days: u32) -> anyhow::Result<Option<u64>> {
    let mut conn = db.acquire().await?;
    let locked: bool =
        sqlx::query_scalar!(r#"select pg_try_advisory_lock($1) as "l!""#, LOCK).fetch_one(&mut *conn).await?;
    if !locked {
        return Ok(None);
    }
    let result = async {
        let n = sqlx::query!(
            r#"with since as (
                 select coalesce(max(bucket) - interval '2 hours', '-infinity'::timestamptz) as t
                 from analytics_rollup_hourly
               )
               insert into analytics_rollup_hourly as r (organization_id, bucket, kind, actor_id, requests, errors,
                                                         latency_sum_us, last_seen)
               select organization_id, date_trunc('hour', occurred_at, 'UTC'), kind, actor_id,
                      sum(request_count)::int8, coalesce(sum(request_count) filter (where status >= 400), 0)::int8,
                      sum(latency_sum_us)::int8, max(occurred_at)
               from analytics_event, since where occurred_at >= since.t
               group by 1, 2, 3, 4
               order by 1, 2, 3, 4
               on conflict on constraint analytics_rollup_hourly_key do update set
                   requests = excluded.requests, errors = excluded.errors,
                   latency_sum_us = excluded.latency_sum_us, last_seen = excluded.last_seen"#
        )
        .execute(&mut *conn)
        .await?
        .rows_affected();
        sqlx::query!(
            "delete from analytics_rollup_hourly where bucket < now() - make_interval(days => $1)",
            retention_days as i32
        )
        .execute(&mut *conn)
        .await?;
        anyhow::Ok(n)
    }
    .await;
    let _ = sqlx::query_scalar!("select pg_advisory_unlock($1)", LOCK).fetch_one(&mut *conn).await;
    result.map(Some)
}

/// The organization of an owner, admin or service key reading analytics.
fn reader(actor: &Actor) -> ApiResult<Uuid> {
    super::handlers::need(actor, crate::auth::Scope::UsageRead)?;
    let org_id = actor.current_org()?;
    match actor.actor_type {
        ActorType::Service => Ok(org_id),
        ActorType::Agent => {
            Err(ApiError::forbidden("agent_not_allowed", "Agents cannot read the organization's analytics."))
        }
        ActorType::Human => {
            actor.require_role(org_id, Role::Admin)?;
            Ok(org_id)
        }
    }
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct AnalyticsQuery {
    /// RFC 3339; default 7 days before `until`.
    #[serde(default, with = "time::serde::rfc3339::option")]
    #[param(value_type = Option<String>)]
    pub since: Option<OffsetDateTime>,
    /// RFC 3339, exclusive; default now.
    #[serde(default, with = "time::serde::rfc3339::option")]
    #[param(value_type = Option<String>)]
    pub until: Option<OffsetDateTime>,
    /// `hour` (default) or `day`, for the token trend.
    pub group_by: Option<String>,
}

fn range(state: &AppState, q: &AnalyticsQuery) -> ApiResult<(OffsetDateTime, OffsetDateTime)> {
    let until = q.until.unwrap_or_else(|| state.clock().now());
    let since = q.since.unwrap_or(until - time::Duration::days(7));
    if since >= until {
        return Err(ApiError::bad_request("invalid_query", "since must be before until"));
    }
    if until - since > time::Duration::days(400) {
        return Err(ApiError::bad_request("invalid_query", "at most 400 days at once"));
    }
    // Whole hours: the rollup's grain.
    let floor = |t: OffsetDateTime| {
        t.to_offset(time::UtcOffset::UTC)
            .replace_time(time::Time::from_hms(t.hour(), 0, 0).unwrap_or(time::Time::MIDNIGHT))
    };
    let u = floor(until);
    Ok((floor(since), if u == until { u } else { u + time::Duration::hours(1) }))
}

#[derive(Debug, Serialize, ToSchema)]
pub struct TrendPoint {
    #[serde(with = "time::serde::rfc3339")]
    pub period: OffsetDateTime,
    pub tokens: i64,
}

/// Access tokens issued per hour or day.
#[utoipa::path(get, path = "/api/v1/analytics/token-trend", tag = "analytics", params(AnalyticsQuery),
    security(("bearer" = []), ("api_key" = []), ("session_cookie" = [])),
    responses((status = 200, body = Vec<TrendPoint>), (status = 400, body = Problem), (status = 403, body = Problem)))]
pub(super) async fn token_trend(
    State(state): State<AppState>,
    actor: Actor,
    ApiQuery(q): ApiQuery<AnalyticsQuery>,
) -> ApiResult<Json<Vec<TrendPoint>>> {
    let org_id = reader(&actor)?;
    let (since, until) = range(&state, &q)?;
    let unit = match q.group_by.as_deref() {
        None | Some("hour") => "hour",
        Some("day") => "day",
        Some(_) => return Err(ApiError::bad_request("invalid_query", "group_by must be hour or day")),
    };
    let rows = sqlx::query!(
        r#"select date_trunc($4, bucket, 'UTC') as "period!", sum(requests)::int8 as "tokens!"
           from analytics_rollup_hourly
           where organization_id = $1 and kind = 'token_issued' and bucket >= $2 and bucket < $3
           group by 1 order by 1"#,
        org_id,
        since,
        until,
        unit
    )
    .fetch_all(state.db())
    .await?;
    Ok(Json(rows.into_iter().map(|r| TrendPoint { period: r.period, tokens: r.tokens }).collect()))
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ActivityCell {
    pub agent_id: String,
    /// ISO day of the week, 1 (Monday) to 7 (Sunday), UTC.
    pub day_of_week: i32,
    /// 0 to 23, UTC.
    pub hour: i32,
    pub requests: i64,
}

/// A heatmap: each agent's requests by day of the week and hour of the day (UTC).
#[utoipa::path(get, path = "/api/v1/analytics/agent-activity", tag = "analytics", params(AnalyticsQuery),
    security(("bearer" = []), ("api_key" = []), ("session_cookie" = [])),
    responses((status = 200, body = Vec<ActivityCell>), (status = 400, body = Problem), (status = 403, body = Problem)))]
pub(super) async fn agent_activity(
    State(state): State<AppState>,
    actor: Actor,
    ApiQuery(q): ApiQuery<AnalyticsQuery>,
) -> ApiResult<Json<Vec<ActivityCell>>> {
    let org_id = reader(&actor)?;
    let (since, until) = range(&state, &q)?;
    let rows = sqlx::query!(
        r#"select substr(actor_id, 7) as "agent_id!",
                  extract(isodow from bucket at time zone 'UTC')::int4 as "dow!",
                  extract(hour from bucket at time zone 'UTC')::int4 as "hour!",
                  sum(requests)::int8 as "requests!"
           from analytics_rollup_hourly
           where organization_id = $1 and kind = 'request' and actor_id like 'agent:%'
             and bucket >= $2 and bucket < $3
           group by 1, 2, 3 order by 1, 2, 3"#,
        org_id,
        since,
        until
    )
    .fetch_all(state.db())
    .await?;
    Ok(Json(
        rows.into_iter()
            .map(|r| ActivityCell { agent_id: r.agent_id, day_of_week: r.dow, hour: r.hour, requests: r.requests })
            .collect(),
    ))
}

#[derive(Debug, Serialize, ToSchema)]
pub struct AgentActivity {
    pub agent_id: String,
    pub requests: i64,
    /// Access tokens issued to it.
    pub tokens: i64,
    /// Requests answered 400 or above.
    pub errors: i64,
    /// The start of the last minute it was seen in.
    #[serde(with = "time::serde::rfc3339")]
    pub last_seen: OffsetDateTime,
}

/// Per agent: requests, tokens issued, errors, last seen.
#[utoipa::path(get, path = "/api/v1/analytics/usage-summary", tag = "analytics", params(AnalyticsQuery),
    security(("bearer" = []), ("api_key" = []), ("session_cookie" = [])),
    responses((status = 200, body = Vec<AgentActivity>), (status = 400, body = Problem), (status = 403, body = Problem)))]
pub(super) async fn usage_summary(
    State(state): State<AppState>,
    actor: Actor,
    ApiQuery(q): ApiQuery<AnalyticsQuery>,
) -> ApiResult<Json<Vec<AgentActivity>>> {
    let org_id = reader(&actor)?;
    let (since, until) = range(&state, &q)?;
    let rows = sqlx::query!(
        r#"select substr(actor_id, 7) as "agent_id!",
                  coalesce(sum(requests) filter (where kind = 'request'), 0)::int8 as "requests!",
                  coalesce(sum(requests) filter (where kind = 'token_issued'), 0)::int8 as "tokens!",
                  coalesce(sum(errors) filter (where kind = 'request'), 0)::int8 as "errors!",
                  max(last_seen) as "last_seen!"
           from analytics_rollup_hourly
           where organization_id = $1 and actor_id like 'agent:%' and bucket >= $2 and bucket < $3
           group by 1 order by 1"#,
        org_id,
        since,
        until
    )
    .fetch_all(state.db())
    .await?;
    Ok(Json(
        rows.into_iter()
            .map(|r| AgentActivity {
                agent_id: r.agent_id,
                requests: r.requests,
                tokens: r.tokens,
                errors: r.errors,
                last_seen: r.last_seen,
            })
            .collect(),
    ))
}
