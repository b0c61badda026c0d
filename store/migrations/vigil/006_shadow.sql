-- Shadow mode (vigil run --shadow): every change vigil would have committed,
-- recorded instead of made, so that `vigil shadow-report` can hold it against
-- the control plane's own monitor. One row per change, basis and reason (the
-- last_updated of the sandbox row, or the last heartbeat of the host, the
-- decision was based on): later passes that see the same row decide the same
-- and record nothing new. replayed marks a change another writer made
-- between two of vigil's passes and vigil's rules, replayed on the row as its
-- previous pass saw it, would have made too. Owners trim their shard's rows
-- past --journal-retention.
create table if not exists vigil_shadow_changes (
    seq         bigserial   primary key,
    at          timestamptz not null default now(),
    shard       integer     not null,
    token       bigint      not null,
    replica     text        not null,
    host_id     uuid        not null,
    sandbox_id  uuid        null,          -- null for a change of the host row
    from_status text        not null,
    to_status   text        not null,
    action      text        not null,      -- the audit row's action, '' for a silent change
    reason      text        not null,
    phase       text        not null,
    basis       timestamptz not null,
    replayed    boolean     not null default false
);

create unique index if not exists vigil_shadow_changes_once_idx
    on vigil_shadow_changes (coalesce(sandbox_id, host_id), from_status, to_status, basis, reason);
create index if not exists vigil_shadow_changes_shard_at_idx on vigil_shadow_changes (shard, at);
create index if not exists vigil_shadow_changes_at_idx on vigil_shadow_changes (at);
