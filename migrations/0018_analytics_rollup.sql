-- Hourly rollups of the per-minute analytics buckets (analytics_event), per organization, kind
-- and actor: what the analytics API reads, so its cost grows with hours and actors, not with
-- routes, clients and minutes. Rebuilt for the most recent hours on a schedule (one instance at a
-- time), from the minute buckets, which stay the source of truth.
create table analytics_rollup_hourly (
    organization_id uuid not null references organization (organization_id) on delete cascade,
    bucket timestamptz not null,
    kind text not null,
    actor_id text,
    requests bigint not null,
    -- Requests answered with a status of 400 or more.
    errors bigint not null,
    latency_sum_us bigint not null,
    -- The start of the last minute with a record in the hour.
    last_seen timestamptz not null,
    constraint analytics_rollup_hourly_key unique nulls not distinct (organization_id, bucket, kind, actor_id)
);
create index analytics_rollup_hourly_time_idx on analytics_rollup_hourly (bucket);
