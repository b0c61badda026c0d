-- The journal: one row per change vigil committed, written in the same fenced
-- transaction as the change itself, so a row exists exactly when its change
-- committed. shard/token/replica name the writer; seq orders the rows (within
-- a shard, a newer token's rows always follow an older token's: a claim waits
-- for every transaction of the previous owner). Owners trim their shard's
-- rows past --journal-retention.
create table if not exists vigil_journal (
    seq          bigserial   primary key,
    shard        integer     not null,
    token        bigint      not null,
    replica      text        not null,
    host_id      uuid        not null,
    sandbox_id   uuid        null,          -- null for a change of the host row
    change       text        not null,      -- "<from>-><to>", or "destroyed_on_agent"
    written_at   timestamptz not null default now()  -- the writing transaction's start
);

create index if not exists vigil_journal_shard_time_idx on vigil_journal (shard, written_at);
