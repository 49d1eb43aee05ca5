-- Usage metering: LLM, tool, agent and message events, counted once per (organization, event id)
-- whichever way they arrive (NATS or HTTP), priced at ingest, rolled up per hour and per day in the
-- same transaction, and compared with monthly budgets.

-- The raw events, one partition per month (created ahead by the ingest and at start-up; old ones
-- are dropped past usage.retention_months). No foreign key: an ingest batch checks organizations
-- and agents itself, and the per-row check would halve its speed; rows of a deleted organization
-- go with their partition.
create table usage_event (
    organization_id uuid not null,
    event_id text not null,
    kind text not null check (kind in ('llm', 'tool', 'agent', 'message')),
    occurred_at timestamptz not null,
    received_at timestamptz not null default now(),
    -- `nats` or `http`.
    source text not null,
    actor_id text not null,
    actor_type text not null,
    agent_id uuid,
    delegation_id uuid,
    model text,
    provider text,
    prompt_tokens bigint,
    completion_tokens bigint,
    total_tokens bigint,
    latency_ms bigint,
    success boolean,
    error text,
    tool_id text,
    tool_name text,
    invocations bigint,
    llm_calls bigint,
    tool_calls bigint,
    duration_ms bigint,
    channel_id text,
    message_length bigint,
    sender text,
    -- Priced at ingest (integer micro-units of the price table's currency): a later price change
    -- does not rewrite history.
    cost_micros bigint not null default 0
) partition by range (occurred_at);

create index usage_event_org_time_idx on usage_event (organization_id, occurred_at);

-- What makes ingest idempotent: an event id is taken once per organization, across partitions
-- (a unique index on the partitioned table would have to include the timestamp, and a retry with
-- another timestamp would count twice). Pruned with the raw events.
create table usage_event_key (
    organization_id uuid not null,
    event_id text not null,
    occurred_at timestamptz not null,
    primary key (organization_id, event_id)
);
create index usage_event_key_time_idx on usage_event_key (occurred_at);

-- Creates the partition of the month starting at `month` (UTC) unless it exists. Serialized by an
-- advisory lock, so that instances creating the same partition at once do not collide.
create function usage_event_partition(month date) returns void language plpgsql as $$
declare
    name text := 'usage_event_' || to_char(month, 'YYYYMM');
    low text := to_char(month, 'YYYY-MM-DD') || ' 00:00:00+00';
    high text := to_char((month + interval '1 month')::date, 'YYYY-MM-DD') || ' 00:00:00+00';
begin
    perform pg_advisory_xact_lock(7274017);
    if to_regclass(name) is null then
        execute format('create table %I partition of usage_event for values from (%L) to (%L)', name, low, high);
    end if;
end $$;

-- Hourly and daily rollups per organization x kind x agent x dimension (the model of an LLM call,
-- the tool's name, '' for agent and message events). Written in the statement that writes the
-- batch; the aggregation API reads only these.
create table usage_rollup_hourly (
    organization_id uuid not null references organization (organization_id) on delete cascade,
    bucket timestamptz not null,
    kind text not null,
    agent_id uuid,
    dimension text not null,
    events bigint not null,
    successes bigint not null,
    failures bigint not null,
    prompt_tokens bigint not null,
    completion_tokens bigint not null,
    total_tokens bigint not null,
    cost_micros bigint not null,
    latency_count bigint not null,
    latency_sum_ms bigint not null,
    latency_max_ms bigint not null,
    -- Events per latency bucket; the upper bounds (ms) are usage::LATENCY_BOUNDS_MS, the last
    -- bucket is open.
    latency_buckets bigint[] not null,
    invocations bigint not null,
    llm_calls bigint not null,
    tool_calls bigint not null,
    duration_ms bigint not null,
    message_length bigint not null,
    constraint usage_rollup_hourly_key unique nulls not distinct (organization_id, bucket, kind, agent_id, dimension)
);

create table usage_rollup_daily (like usage_rollup_hourly including defaults);
alter table usage_rollup_daily
    add constraint usage_rollup_daily_org foreign key (organization_id)
        references organization (organization_id) on delete cascade,
    add constraint usage_rollup_daily_key unique nulls not distinct (organization_id, bucket, kind, agent_id, dimension);

-- Tokens and cost per organization (agent_id null) and per agent, per month (UTC): what budgets
-- are compared with, kept whether or not a budget exists, so a budget set mid-month sees the month.
create table usage_spend_monthly (
    organization_id uuid not null references organization (organization_id) on delete cascade,
    agent_id uuid,
    period date not null,
    tokens bigint not null,
    cost_micros bigint not null,
    constraint usage_spend_monthly_key unique nulls not distinct (organization_id, agent_id, period)
);

-- Per-organization prices, overriding usage.prices of the configuration for one model.
create table usage_price (
    organization_id uuid not null references organization (organization_id) on delete cascade,
    model text not null check (length(model) between 1 and 200),
    prompt_per_million bigint not null check (prompt_per_million >= 0),
    completion_per_million bigint not null check (completion_per_million >= 0),
    created_at timestamptz not null default now(),
    updated_at timestamptz not null default now(),
    primary key (organization_id, model)
);

-- Monthly budgets of an organization (agent_id null) or of one agent.
create table usage_budget (
    usage_budget_id uuid primary key,
    organization_id uuid not null references organization (organization_id) on delete cascade,
    agent_id uuid references agent (agent_id) on delete cascade,
    token_limit bigint check (token_limit > 0),
    cost_limit_micros bigint check (cost_limit_micros > 0),
    threshold_percent smallint not null default 80 check (threshold_percent between 1 and 100),
    created_at timestamptz not null default now(),
    updated_at timestamptz not null default now(),
    constraint usage_budget_scope unique nulls not distinct (organization_id, agent_id),
    constraint usage_budget_has_limit check (token_limit is not null or cost_limit_micros is not null)
);

-- That a budget's threshold or limit was crossed in a period: the event is emitted with the row
-- that takes the key, so once per period.
create table usage_budget_notice (
    usage_budget_id uuid not null references usage_budget (usage_budget_id) on delete cascade,
    period date not null,
    -- `threshold` or `exceeded`.
    notice text not null check (notice in ('threshold', 'exceeded')),
    noticed_at timestamptz not null default now(),
    primary key (usage_budget_id, period, notice)
);

-- NATS messages that could not be counted: kept with the reason and the start of the payload.
create table usage_rejected (
    usage_rejected_id bigint generated always as identity primary key,
    -- The organization the message named, when it named one that parses.
    organization_id uuid,
    subject text not null,
    reason text not null,
    payload bytea not null,
    payload_bytes integer not null,
    received_at timestamptz not null default now()
);
create index usage_rejected_time_idx on usage_rejected (received_at);
