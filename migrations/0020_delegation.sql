-- The delegation broker: a human (or an agent acting under a delegation) delegates bounded
-- authority to an agent: a TTL, a command budget, a spend budget, a scope ceiling, ceremonies.
--
-- A delegation is active until it ends: expired (TTL, command_limit, spend_limit) or revoked
-- (manual, cascade from its parent, its delegator's credential or membership ending, its agent
-- suspended or deleted). Ending one writes a revocation watermark for `delegation:<id>`, so every
-- token issued under it dies on every instance at once.

create table delegation (
    delegation_id uuid primary key,
    organization_id uuid not null references organization on delete cascade,
    -- The delegation this one was made under (a chain), if any.
    parent_id uuid references delegation on delete cascade,
    depth integer not null default 0 check (depth >= 0),
    -- Actor ids from the human at the root to this delegation's agent: the delegator is the
    -- second-to-last, the agent the last.
    chain text[] not null check (cardinality(chain) >= 2),
    delegator_id text not null,
    -- The credential the delegator used: 'session:<id>', 'api_key:<id>' or 'delegation:<id>' (an
    -- agent's delegated token). When it ends, so does this delegation.
    delegator_credential text not null,
    -- Not a foreign key: an ephemeral agent is deleted when its delegation ends, and the
    -- delegation is kept as the record of what happened.
    agent_id uuid not null,
    ephemeral boolean not null default false,
    agent_type text check (length(agent_type) <= 100),
    agent_model text check (length(agent_model) <= 100),
    purpose text not null default '' check (length(purpose) <= 2000),
    scopes text[] not null,
    capability_ceiling text not null check (capability_ceiling in ('CAP_READ', 'CAP_MUTATE', 'CAP_ADMIN')),
    ceremony_required_for text[] not null,
    prohibited_commands text[] not null,
    max_commands integer not null check (max_commands > 0),
    commands_executed integer not null default 0 check (commands_executed >= 0),
    -- Commands held for the children of this delegation (their budgets are reserved from it).
    reserved_commands integer not null default 0 check (reserved_commands >= 0),
    -- The spend budget, in the usage module's currency micro-units and in LLM tokens.
    max_cost bigint check (max_cost > 0),
    cost_spent bigint not null default 0,
    max_tokens bigint check (max_tokens > 0),
    tokens_spent bigint not null default 0,
    status text not null default 'active' check (status in ('active', 'expired', 'revoked')),
    ended_reason text,
    ended_at timestamptz,
    expires_at timestamptz not null,
    -- sha256: + hex SHA-256 of the RFC 8785 canonical JSON of its delegation.created event.
    chronicle_cid text not null,
    created_at timestamptz not null default now(),
    updated_at timestamptz not null default now(),
    constraint delegation_budget check (commands_executed + reserved_commands <= max_commands),
    constraint delegation_ended check ((status = 'active') = (ended_at is null))
);
create index delegation_org_idx on delegation (organization_id, delegation_id desc);
create index delegation_active_expiry_idx on delegation (expires_at) where status = 'active';
create index delegation_active_credential_idx on delegation (delegator_credential) where status = 'active';
create index delegation_active_agent_idx on delegation (agent_id) where status = 'active';
create index delegation_active_delegator_idx on delegation (organization_id, delegator_id) where status = 'active';
create index delegation_parent_idx on delegation (parent_id) where parent_id is not null;
select trigger_updated_at('delegation');

-- A command that needs its delegator's approval: pending, then approved (usable once, until
-- expires_at), denied, used or lapsed.
create table delegation_approval (
    approval_id uuid primary key,
    delegation_id uuid not null references delegation on delete cascade,
    organization_id uuid not null references organization on delete cascade,
    command text not null,
    args jsonb,
    -- SHA-256 of the canonical JSON of the arguments: an approval is for this command with these.
    args_hash bytea not null,
    status text not null default 'pending' check (status in ('pending', 'approved', 'denied', 'used')),
    decided_by text,
    decided_at timestamptz,
    -- Pending: until then the delegator may decide; approved: until then it may be used.
    expires_at timestamptz not null,
    created_at timestamptz not null default now()
);
create index delegation_approval_idx on delegation_approval (delegation_id, approval_id desc);

-- The number of active delegations per organization, in a few shards so that concurrent creates
-- do not queue on one row: reading the count is a sum of at most 16 rows, never a scan.
create table delegation_count (
    organization_id uuid not null references organization on delete cascade,
    shard smallint not null check (shard between 0 and 15),
    active bigint not null default 0,
    primary key (organization_id, shard)
);
