-- The outbox of the control plane's notification events (SPEC §6): a row is
-- written in the same fenced transaction as the change and audit row it
-- announces, so it exists exactly when the change committed. The shard's
-- owner publishes its shard's rows to Redis in seq order and deletes them
-- once Redis acknowledged. Writers of one shard's events take an advisory
-- lock first, so seq order is commit order within a shard.
create table if not exists vigil_events (
    seq        bigserial   primary key,
    shard      integer     not null,
    vigil_id   uuid        not null unique,
    event      text        not null,
    payload    text        not null,  -- the compact JSON the stream entry carries
    created_at timestamptz not null default now()
);

create index if not exists vigil_events_shard_seq_idx on vigil_events (shard, seq);

-- Stuck destroys (SPEC §2 item 9): when DestroySandbox was last re-sent for a
-- sandbox, so it is re-sent at most once per transient grace, whoever owns
-- the shard.
create table if not exists vigil_destroy_retries (
    sandbox_id uuid        primary key,
    retried_at timestamptz not null
);
