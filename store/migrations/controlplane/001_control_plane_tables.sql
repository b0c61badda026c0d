-- The control plane's own tables, created only for dev and tests. In a real
-- deployment they already exist and these statements are no-ops.
create table if not exists hosts (
    id                uuid primary key,
    type              text not null default 'regular',
    team_id           uuid null,
    address           text not null default '',
    status            text not null default 'pending',
    last_heartbeat_at timestamptz null,
    created_at        timestamptz not null default now(),
    updated_at        timestamptz not null default now()
);

create table if not exists sandboxes (
    id           uuid primary key,
    team_id      uuid not null,
    host_id      uuid not null,
    status       text not null,
    last_updated timestamptz not null default now(),
    created_at   timestamptz not null default now()
);

create index if not exists sandboxes_host_id_status_idx on sandboxes (host_id, status);

create table if not exists audit_logs (
    id            uuid primary key default gen_random_uuid(),
    team_id       uuid not null,
    actor_type    text not null,
    actor_id      text null,
    actor_name    text not null default '',
    resource_type text not null,
    resource_id   text not null,
    action        text not null,
    scope         text not null,
    status        text not null,
    metadata      jsonb not null default '{}'::jsonb,
    created_at    timestamptz not null default now()
);
