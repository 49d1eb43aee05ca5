-- OpenID Connect: the OAuth clients of an organization, authorization codes, refresh tokens and
-- the consents people gave. Secrets (client secrets, registration access tokens, codes, refresh
-- tokens) are stored as SHA-256 hashes only.

create table oauth_client (
    oauth_client_id uuid primary key,
    organization_id uuid not null references organization on delete cascade,
    client_id text not null constraint oauth_client_client_id_key unique,
    name text not null constraint oauth_client_name_length check (length(name) between 1 and 200),
    client_type text not null constraint oauth_client_type check (client_type in ('confidential', 'public')),
    token_endpoint_auth_method text not null constraint oauth_client_auth_method
        check (token_endpoint_auth_method in ('client_secret_basic', 'client_secret_post', 'private_key_jwt', 'none')),
    secret_hash bytea,
    redirect_uris text[] not null,
    post_logout_redirect_uris text[] not null default '{}',
    grant_types text[] not null,
    allowed_scopes text[] not null,
    access_token_ttl_secs integer not null constraint oauth_client_access_ttl check (access_token_ttl_secs between 60 and 86400),
    refresh_token_ttl_secs integer not null constraint oauth_client_refresh_ttl check (refresh_token_ttl_secs between 0 and 31536000),
    logo_uri text,
    client_uri text,
    policy_uri text,
    tos_uri text,
    jwks jsonb,
    jwks_uri text,
    application_type text not null default 'web' constraint oauth_client_application_type check (application_type in ('web', 'native')),
    -- Registered through RFC 7591: managed with the registration access token, reaped when idle.
    dynamic boolean not null default false,
    registration_token_hash bytea,
    last_used_at timestamptz,
    created_at timestamptz not null default now(),
    updated_at timestamptz not null default now(),
    constraint oauth_client_secret_matches_type check ((client_type = 'public') = (token_endpoint_auth_method = 'none')),
    constraint oauth_client_secret_present check (
        (token_endpoint_auth_method in ('client_secret_basic', 'client_secret_post')) = (secret_hash is not null))
);
create index oauth_client_org_idx on oauth_client (organization_id, created_at);
create index oauth_client_dynamic_idx on oauth_client (last_used_at) where dynamic;
select trigger_updated_at('oauth_client');

-- One-time authorization codes (60 s). `client_id` is the registered client's id or the URL of a
-- client ID metadata document. What the code issued is recorded so that a replay revokes it.
create table oauth_code (
    code_hash bytea primary key,
    client_id text not null,
    organization_id uuid not null references organization on delete cascade,
    user_id uuid not null references app_user on delete cascade,
    session_id uuid,
    redirect_uri text not null,
    code_challenge text not null,
    scope text not null,
    nonce text,
    resources text[] not null default '{}',
    auth_time timestamptz not null,
    expires_at timestamptz not null,
    used_at timestamptz,
    access_jti uuid,
    access_exp bigint,
    refresh_family uuid,
    created_at timestamptz not null default now()
);
create index oauth_code_expiry_idx on oauth_code (expires_at);

-- Refresh tokens, rotated on every use. All tokens descended from one code share a family; a used
-- token presented again revokes the whole family and the access tokens it issued.
create table oauth_refresh_token (
    refresh_token_id uuid primary key,
    token_hash bytea not null constraint oauth_refresh_token_hash_key unique,
    family_id uuid not null,
    client_id text not null,
    organization_id uuid not null references organization on delete cascade,
    user_id uuid not null references app_user on delete cascade,
    scope text not null,
    resources text[] not null default '{}',
    auth_time timestamptz not null,
    -- RFC 9449: the key a public client's refresh token is bound to.
    jkt text,
    access_jti uuid not null,
    access_exp bigint not null,
    expires_at timestamptz not null,
    used_at timestamptz,
    revoked_at timestamptz,
    created_at timestamptz not null default now()
);
create index oauth_refresh_token_family_idx on oauth_refresh_token (family_id);
create index oauth_refresh_token_expiry_idx on oauth_refresh_token (expires_at);

-- What a person allowed a client, remembered so that they are not asked again.
create table oauth_consent (
    user_id uuid not null references app_user on delete cascade,
    client_id text not null,
    client_name text not null,
    scopes text[] not null,
    created_at timestamptz not null default now(),
    updated_at timestamptz not null default now(),
    primary key (user_id, client_id)
);
select trigger_updated_at('oauth_consent');
