-- Policy: per-organization Cedar policy versions, and the decision log.

create table policy_version (
    organization_id uuid not null references organization on delete cascade,
    version integer not null,
    source text not null constraint policy_version_source_length check (length(source) <= 262144),
    status text not null default 'draft' constraint policy_version_status check (status in ('draft', 'active', 'inactive')),
    created_by text,
    created_at timestamptz not null default now(),
    activated_at timestamptz,
    primary key (organization_id, version)
);
-- At most one active version per organization.
create unique index policy_version_one_active on policy_version (organization_id) where status = 'active';

create table decision_log (
    decision_id uuid primary key,
    organization_id uuid,
    request_id text,
    actor_id text not null,
    action text not null,
    resource_type text not null,
    resource_id text not null,
    effect text not null constraint decision_log_effect check (effect in ('permit', 'deny')),
    reason text not null,
    policy_version text not null,
    determining_policies text[] not null,
    decided_at timestamptz not null
);
create index decision_log_org_time_idx on decision_log (organization_id, decided_at desc);
