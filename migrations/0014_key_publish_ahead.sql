-- The next signing key is published in the JWKS before it signs: status 'next' until
-- `activates_at`, so relying parties that cache the JWKS know it before they meet its tokens.
alter table signing_key drop constraint signing_key_status;
alter table signing_key add constraint signing_key_status check (status in ('next', 'active', 'retired'));
alter table signing_key add column activates_at timestamptz;
alter table signing_key add constraint signing_key_next_activates check (status <> 'next' or activates_at is not null);
-- At most one key waiting.
create unique index signing_key_one_next on signing_key (status) where status = 'next';
