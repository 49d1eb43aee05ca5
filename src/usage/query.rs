//! Aggregation over the rollups: whole days from the daily rollup, the hours at either end from
//! the hourly one, so that a month costs about thirty rows per kind, agent and dimension, whatever
//! the number of events. The last, partial day is read from its daily row too when no hour of that
//! day at or after `until` holds anything (the usual case: `until` is now), which the same
//! statement checks, in the same snapshot, against the hourly rollup.

use time::{OffsetDateTime, Time};
use uuid::Uuid;

use super::LATENCY_BOUNDS_MS;

/// How a series is bucketed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupBy {
    Hour,
    Day,
}

/// What one aggregation reads: an organization, `[since, until)` in whole hours, optionally one
/// agent, optionally bucketed.
#[derive(Debug, Clone, Copy)]
pub struct Filter {
    pub org_id: Uuid,
    pub since: OffsetDateTime,
    pub until: OffsetDateTime,
    pub agent_id: Option<Uuid>,
    pub group_by: Option<GroupBy>,
}

/// Sums over rollup rows of one kind, agent and dimension (and period, when bucketed).
#[derive(Debug, Clone, Default)]
pub struct Agg {
    pub kind: String,
    pub agent_id: Option<Uuid>,
    pub dimension: String,
    pub period: Option<OffsetDateTime>,
    pub events: i64,
    pub successes: i64,
    pub failures: i64,
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
    pub total_tokens: i64,
    pub cost_micros: i64,
    pub latency_count: i64,
    pub latency_sum_ms: i64,
    pub latency_max_ms: i64,
    pub histogram: [i64; LATENCY_BOUNDS_MS.len() + 1],
    pub invocations: i64,
    pub llm_calls: i64,
    pub tool_calls: i64,
    pub duration_ms: i64,
    pub message_length: i64,
}

impl Agg {
    /// Adds another's sums (the key fields are left as they are).
    pub fn add(&mut self, o: &Agg) {
        self.events += o.events;
        self.successes += o.successes;
        self.failures += o.failures;
        self.prompt_tokens += o.prompt_tokens;
        self.completion_tokens += o.completion_tokens;
        self.total_tokens += o.total_tokens;
        self.cost_micros += o.cost_micros;
        self.latency_count += o.latency_count;
        self.latency_sum_ms += o.latency_sum_ms;
        self.latency_max_ms = self.latency_max_ms.max(o.latency_max_ms);
        for (a, b) in self.histogram.iter_mut().zip(o.histogram) {
            *a += b;
        }
        self.invocations += o.invocations;
        self.llm_calls += o.llm_calls;
        self.tool_calls += o.tool_calls;
        self.duration_ms += o.duration_ms;
        self.message_length += o.message_length;
    }

    pub fn latency_avg_ms(&self) -> Option<f64> {
        (self.latency_count > 0).then(|| self.latency_sum_ms as f64 / self.latency_count as f64)
    }

    /// The 95th percentile, as the upper bound of the histogram bucket it falls in (never above
    /// the largest latency seen).
    pub fn latency_p95_ms(&self) -> Option<i64> {
        let n: i64 = self.histogram.iter().sum();
        if n == 0 {
            return None;
        }
        let rank = (n * 95 + 99) / 100;
        let mut seen = 0;
        for (i, c) in self.histogram.iter().enumerate() {
            seen += c;
            if seen >= rank {
                let bound = LATENCY_BOUNDS_MS.get(i).copied().unwrap_or(self.latency_max_ms);
                return Some(bound.min(self.latency_max_ms));
            }
        }
        Some(self.latency_max_ms)
    }
}

fn floor_day(t: OffsetDateTime) -> OffsetDateTime {
    t.replace_time(Time::MIDNIGHT)
}

/// Reads the rollups for `f`, summed per kind, agent, dimension and period.
pub async fn aggregate(db: &sqlx::PgPool, f: &Filter) -> sqlx::Result<Vec<Agg>> {
    // Whole days in [since, until) come from the daily rollup; a bucketing by hour reads hours only.
    let first_day = {
        let d = floor_day(f.since);
        if d == f.since { d } else { d + time::Duration::days(1) }
    };
    let last_day = floor_day(f.until);
    let (day_from, day_to) = if f.group_by != Some(GroupBy::Hour) && first_day < last_day {
        (first_day, last_day)
    } else {
        (f.until, f.until)
    };
    // The day `until` falls in, read whole from the daily rollup if nothing lies past `until` in it.
    let tail_day_end = (day_from < day_to && last_day < f.until).then(|| last_day + time::Duration::days(1));
    let group = match f.group_by {
        None => "",
        Some(GroupBy::Hour) => "hour",
        Some(GroupBy::Day) => "day",
    };
    let rows = sqlx::query!(
        r#"with tail as (
             select $8::timestamptz is not null and not exists (
                 select 1 from usage_rollup_hourly
                 where organization_id = $1 and bucket >= $5 and bucket < $8 and ($6::uuid is null or agent_id = $6)
             ) as whole
           ), r as (
             select * from usage_rollup_daily
             where organization_id = $1 and bucket >= $2 and ($6::uuid is null or agent_id = $6)
               and (bucket < $3 or (bucket = $3 and (select whole from tail)))
             union all
             select * from usage_rollup_hourly
             where organization_id = $1 and ((bucket >= $4 and bucket < $2)
                   or (bucket >= $3 and bucket < $5 and not (select whole from tail)))
               and ($6::uuid is null or agent_id = $6)
           )
           select kind as "kind!", agent_id, dimension as "dimension!",
                  case $7 when 'hour' then bucket when 'day' then date_trunc('day', bucket, 'UTC') end as period,
                  sum(events)::int8 as "events!", sum(successes)::int8 as "successes!", sum(failures)::int8 as "failures!",
                  sum(prompt_tokens)::int8 as "prompt!", sum(completion_tokens)::int8 as "completion!",
                  sum(total_tokens)::int8 as "total!", sum(cost_micros)::int8 as "cost!",
                  sum(latency_count)::int8 as "lat_n!", sum(latency_sum_ms)::int8 as "lat_sum!",
                  max(latency_max_ms)::int8 as "lat_max!",
                  array[sum(latency_buckets[1]), sum(latency_buckets[2]), sum(latency_buckets[3]),
                        sum(latency_buckets[4]), sum(latency_buckets[5]), sum(latency_buckets[6]),
                        sum(latency_buckets[7]), sum(latency_buckets[8]), sum(latency_buckets[9]),
                        sum(latency_buckets[10]), sum(latency_buckets[11])]::int8[] as "hist!",
                  sum(invocations)::int8 as "invocations!", sum(llm_calls)::int8 as "llm_calls!",
                  sum(tool_calls)::int8 as "tool_calls!", sum(duration_ms)::int8 as "duration!",
                  sum(message_length)::int8 as "msglen!"
           from r group by 1, 2, 3, 4
           order by 4, 1, 3, 2"#,
        f.org_id,
        day_from,
        day_to,
        f.since,
        f.until,
        f.agent_id,
        group,
        tail_day_end
    )
    .fetch_all(db)
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| {
            let mut histogram = [0i64; LATENCY_BOUNDS_MS.len() + 1];
            for (h, v) in histogram.iter_mut().zip(r.hist) {
                *h = v;
            }
            Agg {
                kind: r.kind,
                agent_id: r.agent_id,
                dimension: r.dimension,
                period: r.period,
                events: r.events,
                successes: r.successes,
                failures: r.failures,
                prompt_tokens: r.prompt,
                completion_tokens: r.completion,
                total_tokens: r.total,
                cost_micros: r.cost,
                latency_count: r.lat_n,
                latency_sum_ms: r.lat_sum,
                latency_max_ms: r.lat_max,
                histogram,
                invocations: r.invocations,
                llm_calls: r.llm_calls,
                tool_calls: r.tool_calls,
                duration_ms: r.duration,
                message_length: r.msglen,
            }
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn p95_is_the_bound_of_its_bucket_capped_by_the_maximum() {
        let mut a = Agg { latency_max_ms: 700, ..Default::default() };
        a.histogram[0] = 90;
        a.histogram[3] = 9;
        a.histogram[4] = 1;
        assert_eq!(a.latency_p95_ms(), Some(500));
        a.histogram[4] = 50;
        assert_eq!(a.latency_p95_ms(), Some(700), "in the ≤ 1000 ms bucket, but nothing above 700 ms was seen");
        assert_eq!(Agg::default().latency_p95_ms(), None);
    }
}
