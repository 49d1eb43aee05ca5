-- Federation: external issuers an organization trusts (a GitHub Actions job, a Kubernetes
-- cluster, a SPIFFE trust domain, any OIDC issuer), and trust policies that exchange a matching
-- external token for one of our agents' access tokens.

create table federation_partner (
    federation_partner_id uuid primary key,
    organization_id uuid not null references organization on delete cascade,
    name text not null check (length(name) between 1 and 200),
    -- Compared byte for byte with the external token's `iss`.
    issuer text not null check (length(issuer) between 1 and 2048),
    jwks_uri text check (length(jwks_uri) <= 2048),
    discovery_url text check (length(discovery_url) <= 2048),
    check (jwks_uri is not null or discovery_url is not null),
    algorithms text[] not null check (cardinality(algorithms) between 1 and 10),
    -- The external token's `aud` must contain it.
    audience text not null check (length(audience) between 1 and 2048),
    template text check (template in ('github_actions', 'kubernetes', 'spiffe')),
    require_jti boolean not null default true,
    max_token_lifetime_secs integer not null check (max_token_lifetime_secs between 60 and 86400),
    created_at timestamptz not null default now(),
    updated_at timestamptz not null default now(),
    constraint federation_partner_name_unique unique (organization_id, name)
);
create index federation_partner_issuer_idx on federation_partner (issuer);
select trigger_updated_at('federation_partner');

create table trust_policy (
    trust_policy_id uuid primary key,
    organization_id uuid not null references organization on delete cascade,
    federation_partner_id uuid not null references federation_partner on delete cascade,
    name text not null check (length(name) between 1 and 200),
    -- Claim path ('/' between nested members) -> exact value or glob ('*', '?').
    conditions jsonb not null,
    agent_id uuid not null references agent on delete cascade,
    -- The ceiling of the scopes its tokens may carry.
    scopes text[] not null,
    created_at timestamptz not null default now(),
    updated_at timestamptz not null default now(),
    constraint trust_policy_name_unique unique (organization_id, name)
);
create index trust_policy_partner_idx on trust_policy (federation_partner_id, created_at);
select trigger_updated_at('trust_policy');
