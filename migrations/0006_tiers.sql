-- Tiers: each organization's plan and per-org overrides, the Stripe events already applied, and
-- the per-request records the metering layer writes.

create table tenant_tier (
    organization_id uuid primary key references organization (organization_id) on delete cascade,
    -- A plan name from configuration (tiers.plans); null follows tiers.default_plan.
    plan text check (plan ~ '^[a-z0-9][a-z0-9_-]{0,62}$'),
    since timestamptz not null default now(),
    -- Per-org limits that win over the plan's: max_agents, api_calls_per_day, ...
    overrides jsonb not null default '{}' check (jsonb_typeof(overrides) = 'object'),
    stripe_customer_id text,
    stripe_subscription_id text unique,
    created_at timestamptz not null default now(),
    updated_at timestamptz not null default now()
);
select trigger_updated_at('tenant_tier');

insert into tenant_tier (organization_id, since)
select organization_id, created_at from organization;

-- Stripe retries and attackers replay: an event id is applied once.
create table stripe_event (
    event_id text primary key,
    event_type text not null,
    organization_id uuid references organization (organization_id) on delete set null,
    -- What the event did: applied, ignored, ...
    outcome text not null,
    received_at timestamptz not null default now()
);

-- One row per metered request (and per issued token), written in batches.
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
    latency_us integer not null check (latency_us >= 0),
    occurred_at timestamptz not null
);
create index analytics_event_org_time on analytics_event (organization_id, occurred_at);
