-- Pruning reads each table by age: one index per table on the time it is pruned by.
create index if not exists analytics_event_time_idx on analytics_event (occurred_at);
create index if not exists decision_log_time_idx on decision_log (decided_at);
create index if not exists session_expiry_idx on session (expires_at);
create index if not exists password_token_expiry_idx on password_token (expires_at);
create index if not exists stripe_event_time_idx on stripe_event (received_at);
