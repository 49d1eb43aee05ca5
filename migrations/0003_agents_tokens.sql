-- Identity II: agents, their client credentials, signing keys, and token revocation.

create table agent (
    agent_id uuid primary key,
    organization_id uuid not null references organization on delete cascade,
    name text not null constraint agent_name_length check (length(name) between 1 and 200),
    description text not null default '',
    -- The human answerable for the agent.
    owner_id uuid not null references app_user,
    capabilities text[] not null default '{}',
    -- The ceiling for the scopes of its tokens.
    allowed_scopes text[] not null default '{}',
    status text not null default 'active' constraint agent_status check (status in ('active', 'suspended')),
    metadata jsonb not null default '{}',
    created_at timestamptz not null default now(),
    updated_at timestamptz not null default now()
);
create index agent_org_idx on agent (organization_id, agent_id);
select trigger_updated_at('agent');

create table agent_credential (
    credential_id uuid primary key,
    agent_id uuid not null references agent on delete cascade,
    organization_id uuid not null references organization on delete cascade,
    client_id text not null constraint agent_credential_client_id_key unique,
    -- SHA-256 of the secret; the previous one keeps working until previous_expires_at after a rotation.
    secret_hash bytea not null,
    previous_secret_hash bytea,
    previous_expires_at timestamptz,
    created_at timestamptz not null default now(),
    rotated_at timestamptz,
    revoked_at timestamptz
);
create index agent_credential_agent_idx on agent_credential (agent_id);

create table signing_key (
    kid text primary key,
    algorithm text not null constraint signing_key_algorithm check (algorithm in ('ES256', 'RS256', 'EdDSA')),
    -- The public JWK, as published.
    public_jwk jsonb not null,
    -- The private key (P-256 scalar, Ed25519 seed or PKCS#1 DER), sealed with AES-256-GCM under the
    -- key-encryption key: nonce || ciphertext. The kid is the associated data.
    private_key_sealed bytea not null,
    status text not null constraint signing_key_status check (status in ('active', 'retired')),
    created_at timestamptz not null default now(),
    retired_at timestamptz,
    -- When the last token it signed has expired; it leaves the JWKS then.
    expires_at timestamptz
);
-- At most one active key.
create unique index signing_key_one_active on signing_key (status) where status = 'active';

-- Single revoked tokens, by jti, kept until the token would have expired anyway.
create table token_revocation (
    jti uuid primary key,
    organization_id uuid not null,
    expires_at timestamptz not null,
    revoked_at timestamptz not null default now()
);
create index token_revocation_expiry_idx on token_revocation (expires_at);

-- Bulk revocation: every token of the subject issued at or before not_before is dead.
-- subject is 'agent:<uuid>', 'credential:<uuid>' or 'org:<uuid>'.
create table revocation_watermark (
    subject text primary key,
    not_before timestamptz not null,
    updated_at timestamptz not null default now()
);
