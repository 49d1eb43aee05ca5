-- The transactional outbox and webhook delivery.
--
-- A state change writes its event into event_outbox in its own transaction. The dispatcher fans
-- each event out into one webhook_delivery per subscribed endpoint, and delivers those, claiming
-- them with FOR UPDATE SKIP LOCKED and a lease so that any number of instances share the work.

create table event_outbox (
    event_id uuid primary key,
    -- The nil uuid for platform events (signing key rotations), which go to every organization.
    organization_id uuid not null,
    type text not null check (type ~ '^[a-z_]+(\.[a-z_]+)+$'),
    subject text not null,
    data jsonb not null,
    occurred_at timestamptz not null default now(),
    -- Set once the event has become deliveries (every event is fanned out once).
    fanned_out_at timestamptz,
    -- Set once published to NATS JetStream (or at fan-out, where events.nats is off).
    published_at timestamptz
);
create index event_outbox_pending_idx on event_outbox (event_id) where fanned_out_at is null;
create index event_outbox_unpublished_idx on event_outbox (event_id) where published_at is null;
create index event_outbox_org_time_idx on event_outbox (organization_id, occurred_at);

create table webhook_endpoint (
    webhook_endpoint_id uuid primary key,
    organization_id uuid not null references organization (organization_id) on delete cascade,
    url text not null check (length(url) <= 2048),
    description text not null default '' check (length(description) <= 1024),
    event_types text[] not null check (cardinality(event_types) between 1 and 100),
    enabled boolean not null default true,
    -- Why it was disabled by the dispatcher (`gone`, `failing`); null when a person did it.
    disabled_reason text,
    -- The signing secret, sealed with the key-encryption key; the previous one signs beside it
    -- until previous_secret_expires_at after a rotation.
    secret_sealed bytea not null,
    previous_secret_sealed bytea,
    previous_secret_expires_at timestamptz,
    -- The first failure since the last success (on the application clock): the auto-disable clock.
    failing_since timestamptz,
    last_success_at timestamptz,
    created_at timestamptz not null default now(),
    updated_at timestamptz not null default now()
);
create index webhook_endpoint_org_idx on webhook_endpoint (organization_id) where enabled;
select trigger_updated_at('webhook_endpoint');

create table webhook_delivery (
    webhook_delivery_id uuid primary key,
    webhook_endpoint_id uuid not null references webhook_endpoint (webhook_endpoint_id) on delete cascade,
    organization_id uuid not null,
    event_id uuid not null references event_outbox (event_id) on delete cascade,
    -- pending (to be tried at next_attempt_at), succeeded, or dead (a dead letter: retries spent,
    -- or the endpoint answered 410 Gone).
    status text not null default 'pending' check (status in ('pending', 'succeeded', 'dead')),
    attempts int not null default 0,
    next_attempt_at timestamptz not null,
    -- Held by an instance delivering it; an instance that dies lets it lapse and another retakes it.
    lease_until timestamptz,
    lease_token uuid,
    last_status_code int,
    last_error text,
    created_at timestamptz not null default now(),
    updated_at timestamptz not null default now()
);
create index webhook_delivery_due_idx on webhook_delivery (next_attempt_at) where status = 'pending';
create index webhook_delivery_endpoint_idx on webhook_delivery (webhook_endpoint_id, created_at);
create index webhook_delivery_dead_idx on webhook_delivery (organization_id, updated_at) where status = 'dead';
select trigger_updated_at('webhook_delivery');

create table webhook_attempt (
    webhook_attempt_id uuid primary key,
    webhook_delivery_id uuid not null references webhook_delivery (webhook_delivery_id) on delete cascade,
    attempted_at timestamptz not null,
    status_code int,
    latency_ms int not null,
    -- The first 4 KiB of the response body.
    response_body text not null default '',
    error text,
    next_attempt_at timestamptz
);
create index webhook_attempt_delivery_idx on webhook_attempt (webhook_delivery_id, attempted_at);
