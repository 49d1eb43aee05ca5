-- A service key acts as a service actor (`service:<api_key_id>`), not as the human who made it.
alter table api_key add column service boolean not null default false;
