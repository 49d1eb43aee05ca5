-- Trust beyond our own tokens: agents' own public keys (published in their did:web documents and
-- usable for RFC 7523 client assertions), and agents listed publicly in the marketplace.

create table agent_key (
    agent_key_id uuid primary key,
    agent_id uuid not null references agent on delete cascade,
    organization_id uuid not null references organization on delete cascade,
    -- The JWK thumbprint (RFC 7638) unless the caller named the key.
    kid text not null check (length(kid) between 1 and 200),
    -- The public JWK as registered; private members are refused before it is stored.
    public_jwk jsonb not null,
    created_at timestamptz not null default now(),
    constraint agent_key_kid_unique unique (agent_id, kid)
);
create index agent_key_org_idx on agent_key (organization_id, agent_id);

-- A listing is a property of the agent: unlisting (or deleting, or suspending) takes it off the
-- marketplace at once.
alter table agent
    add column listed_at timestamptz,
    add column listed_by uuid references app_user on delete set null;
create index agent_listed_idx on agent (listed_at desc, agent_id) where listed_at is not null;
