-- Requests (and issued tokens) are counted in memory per organization, actor, client, method,
-- route template, status and minute, and written as one row per bucket, merged by every flush of
-- every instance: the table grows with distinct callers and routes, not with requests. Rows
-- written one per request so far become the buckets of their minute.
alter table analytics_event rename to analytics_event_per_request;

create table analytics_event (
    analytics_event_id bigint generated always as identity primary key,
    organization_id uuid not null references organization (organization_id) on delete cascade,
    kind text not null check (kind in ('request', 'token_issued')),
    -- `user:<uuid>`, `agent:<uuid>` or `service:<uuid>`.
    actor_id text,
    -- The OAuth client, for token events and requests made with an access token.
    client_id text,
    method text not null,
    -- The matched route template, never the raw path.
    route text not null,
    status smallint not null,
    -- The start of the minute the bucket counts.
    occurred_at timestamptz not null,
    request_count bigint not null check (request_count > 0),
    latency_sum_us bigint not null check (latency_sum_us >= 0),
    latency_max_us integer not null check (latency_max_us >= 0),
    -- Requests per latency bucket; the upper bounds (µs) are analytics::LATENCY_BOUNDS_US, the
    -- last bucket is open.
    latency_buckets bigint[] not null,
    constraint analytics_event_bucket unique nulls not distinct
        (organization_id, occurred_at, kind, actor_id, client_id, method, route, status)
);

insert into analytics_event (organization_id, kind, actor_id, client_id, method, route, status, occurred_at,
                             request_count, latency_sum_us, latency_max_us, latency_buckets)
select organization_id, kind, actor_id, client_id, method, route, status, date_trunc('minute', occurred_at),
       count(*), sum(latency_us), max(latency_us),
       array[count(*) filter (where latency_us <= 500),
             count(*) filter (where latency_us > 500 and latency_us <= 1000),
             count(*) filter (where latency_us > 1000 and latency_us <= 2500),
             count(*) filter (where latency_us > 2500 and latency_us <= 5000),
             count(*) filter (where latency_us > 5000 and latency_us <= 10000),
             count(*) filter (where latency_us > 10000 and latency_us <= 25000),
             count(*) filter (where latency_us > 25000 and latency_us <= 50000),
             count(*) filter (where latency_us > 50000 and latency_us <= 100000),
             count(*) filter (where latency_us > 100000 and latency_us <= 250000),
             count(*) filter (where latency_us > 250000 and latency_us <= 500000),
             count(*) filter (where latency_us > 500000 and latency_us <= 1000000),
             count(*) filter (where latency_us > 1000000 and latency_us <= 2500000),
             count(*) filter (where latency_us > 2500000)]
from analytics_event_per_request
group by organization_id, kind, actor_id, client_id, method, route, status, date_trunc('minute', occurred_at);

drop table analytics_event_per_request;
