-- The volumes table of newer control planes (SPEC §1.1), created only for dev
-- and tests with `vigil migrate --control-plane-tables --volumes-table`. vigil
-- detects it from the schema (rule 11); a real deployment owns it.
create table if not exists volumes (
    id           uuid primary key,
    team_id      uuid not null,
    host_id      uuid null,
    name         text not null,
    size_mb      integer not null,
    status       text not null default 'detached',
    sandbox_id   uuid null,
    mount_path   text not null default '',
    last_updated timestamptz not null default now(),
    created_at   timestamptz not null default now()
);

create index if not exists volumes_sandbox_id_idx on volumes (sandbox_id);
