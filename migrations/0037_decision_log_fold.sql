-- The decision log folds repeated permits: identical permits (same organization, actor, action,
-- resource, reason, policy version and determining policies) within `policy.permit_fold_secs` are
-- one row, the first one's, with how many decisions it stands for and when the last was made.
-- Denies are always a row each.
alter table decision_log
    add column decision_count bigint not null default 1 constraint decision_log_count_positive check (decision_count > 0),
    add column last_decided_at timestamptz;
