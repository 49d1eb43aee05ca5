-- Identity I: organizations, humans, memberships, sessions, API keys, one-time password tokens,
-- and the per-organization audit hash chain.

create table organization (
    organization_id uuid primary key,
    slug text not null constraint organization_slug_key unique
        constraint organization_slug_format check (slug ~ '^[a-z0-9][a-z0-9-]{1,61}[a-z0-9]$'),
    name text not null constraint organization_name_length check (length(name) between 1 and 200),
    created_at timestamptz not null default now(),
    updated_at timestamptz not null default now()
);
select trigger_updated_at('organization');

create table app_user (
    user_id uuid primary key,
    email text not null constraint app_user_email_length check (length(email) between 3 and 254),
    display_name text,
    -- argon2id PHC string; null until the user sets a password with a one-time token.
    password_hash text,
    status text not null default 'active' constraint app_user_status check (status in ('active', 'disabled')),
    system_admin boolean not null default false,
    created_at timestamptz not null default now(),
    updated_at timestamptz not null default now()
);
create unique index app_user_email_key on app_user (lower(email));
select trigger_updated_at('app_user');

create table membership (
    organization_id uuid not null references organization on delete cascade,
    user_id uuid not null references app_user on delete cascade,
    role text not null constraint membership_role check (role in ('owner', 'admin', 'member')),
    created_at timestamptz not null default now(),
    updated_at timestamptz not null default now(),
    primary key (organization_id, user_id)
);
create index membership_user_idx on membership (user_id);
select trigger_updated_at('membership');

create table session (
    session_id uuid primary key,
    user_id uuid not null references app_user on delete cascade,
    -- SHA-256 of the token; the token itself is never stored.
    token_hash bytea not null constraint session_token_hash_key unique,
    created_at timestamptz not null default now(),
    expires_at timestamptz not null,
    ended_at timestamptz,
    client_ip text,
    user_agent text
);
create index session_user_idx on session (user_id);

create table api_key (
    api_key_id uuid primary key,
    organization_id uuid not null references organization on delete cascade,
    -- The key acts for its creator, never beyond the creator's rights.
    created_by uuid not null references app_user on delete cascade,
    -- The first characters, shown in listings so people can tell keys apart.
    prefix text not null,
    key_hash bytea not null constraint api_key_key_hash_key unique,
    description text not null,
    scopes text[] not null,
    created_at timestamptz not null default now(),
    expires_at timestamptz,
    last_used_at timestamptz,
    revoked_at timestamptz
);
create index api_key_org_idx on api_key (organization_id, created_at);

create table password_token (
    token_hash bytea primary key,
    user_id uuid not null references app_user on delete cascade,
    created_at timestamptz not null default now(),
    expires_at timestamptz not null,
    used_at timestamptz
);

-- The head of each organization's chain; locking its row serializes writers so the chain cannot fork.
-- The nil uuid is the chain of events that belong to no organization (e.g. a failed login for an
-- unknown email).
create table audit_chain (
    organization_id uuid primary key,
    last_seq bigint not null,
    last_hash bytea not null
);

create table audit_event (
    audit_event_id uuid primary key,
    organization_id uuid not null,
    seq bigint not null,
    occurred_at timestamptz not null,
    actor_id text,
    actor_type text,
    action text not null,
    target_type text,
    target_id text,
    client_ip text,
    request_id text,
    -- Canonical JSON text (sorted keys), hashed exactly as stored.
    details text not null,
    prev_hash bytea not null,
    hash bytea not null,
    constraint audit_event_seq_key unique (organization_id, seq)
);
create index audit_event_org_time_idx on audit_event (organization_id, occurred_at);
