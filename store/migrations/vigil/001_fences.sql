-- One row per shard. token is the create revision of the shard's owner key in
-- etcd; it only ever rises. Every owner write transaction takes this row FOR
-- SHARE and compares the token before touching anything else.
create table if not exists vigil_shard_fences (
    shard      integer primary key check (shard >= 0),
    token      bigint  not null check (token > 0),
    owner      text    not null,
    updated_at timestamptz not null default now()
);
