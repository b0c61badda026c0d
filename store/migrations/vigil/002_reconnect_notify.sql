-- Reconcile on reconnect: the control plane flips a host unreachable -> online
-- when its heartbeat returns. This trigger tells vigil at once, without the
-- control plane knowing vigil exists.
create or replace function vigil_notify_host_online() returns trigger
language plpgsql as $$
begin
    if old.status = 'unreachable' and new.status = 'online' then
        perform pg_notify('vigil_host_online', new.id::text);
    end if;
    return new;
end
$$;

drop trigger if exists vigil_host_online on hosts;
create trigger vigil_host_online
    after update of status on hosts
    for each row
    when (old.status is distinct from new.status)
    execute function vigil_notify_host_online();
