-- The city: zones, rooms on an integer grid, nodes (machines that run agents), and where each
-- agent is placed. Presence itself lives in Redis; only a coarse last_seen reaches Postgres.

create extension if not exists btree_gist;

create table zone (
    zone_id uuid primary key,
    organization_id uuid not null references organization (organization_id) on delete cascade,
    name text not null check (length(name) between 1 and 200),
    slug text not null check (slug ~ '^[a-z0-9]+(-[a-z0-9]+)*$' and length(slug) <= 64),
    created_at timestamptz not null default now(),
    updated_at timestamptz not null default now(),
    constraint zone_slug_unique unique (organization_id, slug),
    -- Rooms reference a zone together with their organization: a room cannot be put in another
    -- organization's zone.
    constraint zone_org_unique unique (zone_id, organization_id)
);
select trigger_updated_at('zone');

create table room (
    room_id uuid primary key,
    organization_id uuid not null,
    zone_id uuid not null,
    name text not null check (length(name) between 1 and 200),
    slug text not null check (slug ~ '^[a-z0-9]+(-[a-z0-9]+)*$' and length(slug) <= 64),
    kind text not null check (kind ~ '^[a-z][a-z0-9_]{0,31}$'),
    capacity int not null check (capacity between 1 and 100000),
    x int not null check (x between 0 and 10000),
    y int not null check (y between 0 and 10000),
    width int not null check (width between 1 and 1000),
    height int not null check (height between 1 and 1000),
    created_at timestamptz not null default now(),
    updated_at timestamptz not null default now(),
    constraint room_zone_fk foreign key (zone_id, organization_id)
        references zone (zone_id, organization_id) on delete restrict,
    constraint room_slug_unique unique (organization_id, slug),
    constraint room_org_unique unique (room_id, organization_id),
    -- Rooms of one zone never overlap (half-open ranges: rooms may share an edge).
    constraint room_no_overlap exclude using gist (
        zone_id with =,
        int4range(x, x + width) with &&,
        int4range(y, y + height) with &&
    )
);
create index room_org_idx on room (organization_id, zone_id);
select trigger_updated_at('room');

create table node (
    node_id uuid primary key,
    organization_id uuid not null references organization (organization_id) on delete cascade,
    name text not null check (length(name) between 1 and 200),
    hostname text not null check (length(hostname) between 1 and 253),
    labels jsonb not null default '{}',
    -- SHA-256 of the node credential (shown once, at creation or rotation).
    credential_hash bytea not null unique,
    credential_prefix text not null,
    -- `new` until the first heartbeat, then `active` or `stale`; changed by one UPDATE whose
    -- returned row decides who emits the node.active / node.stale event (exactly once).
    status text not null default 'new' check (status in ('new', 'active', 'stale')),
    last_heartbeat_at timestamptz,
    metrics jsonb,
    models jsonb not null default '[]',
    created_at timestamptz not null default now(),
    updated_at timestamptz not null default now(),
    constraint node_name_unique unique (organization_id, name),
    constraint node_org_unique unique (node_id, organization_id)
);
create index node_active_idx on node (last_heartbeat_at) where status = 'active';
select trigger_updated_at('node');

create table agent_placement (
    agent_id uuid primary key references agent (agent_id) on delete cascade,
    organization_id uuid not null references organization (organization_id) on delete cascade,
    room_id uuid,
    node_id uuid,
    -- Coarse: written at most every few minutes from presence heartbeats.
    last_seen_at timestamptz,
    updated_at timestamptz not null default now(),
    constraint agent_placement_room_fk foreign key (room_id, organization_id)
        references room (room_id, organization_id) on delete set null (room_id),
    constraint agent_placement_node_fk foreign key (node_id, organization_id)
        references node (node_id, organization_id) on delete set null (node_id)
);
create index agent_placement_room_idx on agent_placement (room_id) where room_id is not null;
create index agent_placement_node_idx on agent_placement (node_id) where node_id is not null;
create index agent_placement_org_idx on agent_placement (organization_id);
select trigger_updated_at('agent_placement');
