-- Adding someone to an organization is an invitation they accept; nobody becomes a member of an
-- organization on an admin's word alone, and the admin learns nothing about whether the email has
-- an account. A declined or expired invitation never becomes a membership.
create table invitation (
    invitation_id uuid primary key,
    organization_id uuid not null references organization on delete cascade,
    email text not null constraint invitation_email_length check (length(email) between 3 and 254),
    role text not null constraint invitation_role check (role in ('owner', 'admin', 'member')),
    display_name text,
    invited_by uuid not null,
    -- SHA-256 of the one-time invitation token, shown once to the inviter to hand to the invitee.
    token_hash bytea not null constraint invitation_token_key unique,
    status text not null default 'pending'
        constraint invitation_status check (status in ('pending', 'accepted', 'declined')),
    created_at timestamptz not null default now(),
    expires_at timestamptz not null,
    decided_at timestamptz
);

create index invitation_pending_email on invitation (lower(email)) where status = 'pending';
