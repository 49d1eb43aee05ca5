-- Shared helpers every module's tables use.

-- Keeps updated_at honest without every UPDATE having to remember it.
create or replace function set_updated_at() returns trigger as $$
begin
    new.updated_at = now();
    return new;
end;
$$ language plpgsql;

-- Call as: select trigger_updated_at('<table>');
create or replace function trigger_updated_at(tablename regclass) returns void as $$
begin
    execute format(
        'create trigger set_updated_at before update on %s for each row
         when (old is distinct from new) execute function set_updated_at();',
        tablename);
end;
$$ language plpgsql;
