package chaos

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"net/url"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/vigil-sh/vigil/internal/pgtest"
	"github.com/vigil-sh/vigil/store"
)

// adminURL is the Postgres maintenance database the run creates its own
// database on: the tests' server (VIGIL_TEST_DATABASE_URL).
func adminURL() string { return pgtest.AdminURL() }

// createDatabase creates a fresh database on the server of admin, migrates
// vigil's schema and the control plane's tables into it and installs the
// harness's instruments. drop removes it.
func createDatabase(ctx context.Context, admin string) (dbURL string, drop func(), err error) {
	conn, err := pgx.Connect(ctx, admin)
	if err != nil {
		return "", nil, fmt.Errorf("connect to %s: %w", admin, err)
	}
	defer conn.Close(context.Background())
	var b [6]byte
	_, _ = rand.Read(b[:])
	name := "vigil_chaos_" + hex.EncodeToString(b[:])
	if _, err := conn.Exec(ctx, "create database "+name); err != nil {
		return "", nil, fmt.Errorf("create database: %w", err)
	}
	drop = func() {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		c, err := pgx.Connect(ctx, admin)
		if err != nil {
			return
		}
		defer c.Close(context.Background())
		_, _ = c.Exec(ctx, "drop database if exists "+name+" with (force)")
	}
	u, err := url.Parse(admin)
	if err != nil {
		drop()
		return "", nil, err
	}
	u.Path = "/" + name
	dbURL = u.String()
	if err := store.Migrate(ctx, dbURL, store.Schema{ControlPlane: true, Volumes: true}); err != nil {
		drop()
		return "", nil, fmt.Errorf("migrate: %w", err)
	}
	db, err := pgx.Connect(ctx, dbURL)
	if err != nil {
		drop()
		return "", nil, err
	}
	defer db.Close(context.Background())
	if _, err := db.Exec(ctx, instruments); err != nil {
		drop()
		return "", nil, fmt.Errorf("install the harness's instruments: %w", err)
	}
	return dbURL, drop, nil
}

// instruments are what the harness adds to its database:
//
//   - The commit order of vigil's journal. vigil_journal.seq is taken when
//     a row is inserted, not when its transaction commits, so two
//     transactions can commit in the other order. A deferred constraint
//     trigger runs inside COMMIT: the sequence value it takes orders the
//     journal rows by commit (exactly, for transactions that do not
//     overlap; two transactions of different owners of one shard that do
//     overlap are the violation being looked for either way). It also
//     records the transaction of each journal row.
//   - The transaction of every audit row (chaos_audit_tx), so a change is
//     tied to its audit row (rule 9: a destroy_retry row and its stop) and
//     to its event (SPEC §6).
//   - Every re-send of a stuck destroy vigil claims (rule 9: the upsert
//     into vigil_destroy_retries that its fenced check commits before the
//     DestroySandbox goes out), with its transaction and commit order
//     (chaos_retry_claims).
//   - Every insert, update and delete of a volume (rule 11) with the old
//     and new values, the transaction, the writer's application_name
//     (vigil's are "vigil <replica>") and the commit order
//     (chaos_volume_changes): the checker replays them in commit order.
//   - The same for the harness's own bad-input changes that matter to the
//     checker (a sandbox moved to another host), so a vigil write can be
//     placed before or after them.
//   - The history of fence raises with their commit order.
//   - The control plane's columns as SPEC §1.1 gives them: nullable where
//     the dev schema says NOT NULL only for convenience (hosts.status and
//     address, sandboxes.team_id and status), so damaged rows can be
//     written.
const instruments = `
create sequence chaos_commit_seq;

create table chaos_commits (
    journal_seq  bigint primary key,
    commit_seq   bigint not null,
    committed_at timestamptz not null,
    txid         bigint not null
);
create function chaos_journal_committed() returns trigger language plpgsql as $$
begin
    insert into chaos_commits values (new.seq, nextval('chaos_commit_seq'), clock_timestamp(), txid_current());
    return null;
end $$;
create constraint trigger chaos_journal_committed after insert on vigil_journal
    deferrable initially deferred for each row execute function chaos_journal_committed();

create table chaos_moves (
    id          bigserial primary key,
    sandbox_id  uuid not null,
    from_host   uuid not null,
    to_host     uuid not null,
    commit_seq  bigint
);
create function chaos_move_committed() returns trigger language plpgsql as $$
begin
    update chaos_moves set commit_seq = nextval('chaos_commit_seq') where id = new.id;
    return null;
end $$;
create constraint trigger chaos_move_committed after insert on chaos_moves
    deferrable initially deferred for each row execute function chaos_move_committed();

create table chaos_fence_raises (
    id          bigserial primary key,
    shard       integer not null,
    token       bigint not null,
    owner       text not null,
    raised_at   timestamptz not null default clock_timestamp(),
    commit_seq  bigint
);
create function chaos_fence_raised() returns trigger language plpgsql as $$
begin
    insert into chaos_fence_raises (shard, token, owner) values (new.shard, new.token, new.owner);
    return null;
end $$;
create trigger chaos_fence_raised after insert or update on vigil_shard_fences
    for each row execute function chaos_fence_raised();
create function chaos_fence_raise_committed() returns trigger language plpgsql as $$
begin
    update chaos_fence_raises set commit_seq = nextval('chaos_commit_seq') where id = new.id;
    return null;
end $$;
create constraint trigger chaos_fence_raise_committed after insert on chaos_fence_raises
    deferrable initially deferred for each row execute function chaos_fence_raise_committed();

create table chaos_audit_tx (
    audit_id uuid not null,
    txid     bigint not null
);
create function chaos_audit_written() returns trigger language plpgsql as $$
begin
    insert into chaos_audit_tx values (new.id, txid_current());
    return null;
end $$;
create trigger chaos_audit_written after insert on audit_logs
    for each row execute function chaos_audit_written();

create table chaos_retry_claims (
    id           bigserial primary key,
    sandbox_id   uuid not null,
    retried_at   timestamptz not null,
    txid         bigint not null,
    commit_seq   bigint,
    committed_at timestamptz
);
create function chaos_retry_claimed() returns trigger language plpgsql as $$
begin
    insert into chaos_retry_claims (sandbox_id, retried_at, txid) values (new.sandbox_id, new.retried_at, txid_current());
    return null;
end $$;
create trigger chaos_retry_claimed after insert or update on vigil_destroy_retries
    for each row execute function chaos_retry_claimed();
create function chaos_retry_claim_committed() returns trigger language plpgsql as $$
begin
    update chaos_retry_claims set commit_seq = nextval('chaos_commit_seq'), committed_at = clock_timestamp() where id = new.id;
    return null;
end $$;
create constraint trigger chaos_retry_claim_committed after insert on chaos_retry_claims
    deferrable initially deferred for each row execute function chaos_retry_claim_committed();

create table chaos_volume_changes (
    id           bigserial primary key,
    volume_id    uuid not null,
    op           text not null,
    old_status   text,
    new_status   text,
    old_sandbox  uuid,
    new_sandbox  uuid,
    old_mount    text,
    new_mount    text,
    old_updated  timestamptz,
    new_updated  timestamptz,
    txid         bigint not null,
    writer       text not null,
    commit_seq   bigint
);
create function chaos_volume_changed() returns trigger language plpgsql as $$
begin
    if tg_op = 'INSERT' then
        insert into chaos_volume_changes (volume_id, op, new_status, new_sandbox, new_mount, new_updated, txid, writer)
        values (new.id, 'insert', new.status, new.sandbox_id, new.mount_path, new.last_updated, txid_current(), current_setting('application_name'));
    elsif tg_op = 'UPDATE' then
        insert into chaos_volume_changes (volume_id, op, old_status, new_status, old_sandbox, new_sandbox, old_mount, new_mount, old_updated, new_updated, txid, writer)
        values (new.id, 'update', old.status, new.status, old.sandbox_id, new.sandbox_id, old.mount_path, new.mount_path, old.last_updated, new.last_updated,
                txid_current(), current_setting('application_name'));
    else
        insert into chaos_volume_changes (volume_id, op, old_status, old_sandbox, old_mount, old_updated, txid, writer)
        values (old.id, 'delete', old.status, old.sandbox_id, old.mount_path, old.last_updated, txid_current(), current_setting('application_name'));
    end if;
    return null;
end $$;
create trigger chaos_volume_changed after insert or update or delete on volumes
    for each row execute function chaos_volume_changed();
create function chaos_volume_change_committed() returns trigger language plpgsql as $$
begin
    update chaos_volume_changes set commit_seq = nextval('chaos_commit_seq') where id = new.id;
    return null;
end $$;
create constraint trigger chaos_volume_change_committed after insert on chaos_volume_changes
    deferrable initially deferred for each row execute function chaos_volume_change_committed();

alter table hosts alter column status drop not null;
alter table hosts alter column address drop not null;
alter table sandboxes alter column team_id drop not null;
alter table sandboxes alter column status drop not null;
`

// eventInstruments are installed when vigil has events (SPEC §6):
//
//   - Every outbox row vigil commits (vigil_events is emptied by the relay,
//     so the harness keeps its own copy), with the transaction that wrote
//     it and its commit order on the journal's sequence: the expected
//     stream, in the order each shard's events must reach it.
//
// (The transaction of every audit row, which ties an event to the change
// it announces, is recorded by instruments: rule 9 needs it too.)
//
// The table has no unique key: a vigil_id committed twice must not make
// vigil's transaction fail, it is for the checker to find.
const eventInstruments = `
create table chaos_events (
    id           bigserial primary key,
    vigil_id     uuid not null,
    seq          bigint not null,
    shard        integer not null,
    event        text not null,
    payload      text not null,
    txid         bigint not null,
    commit_seq   bigint,
    committed_at timestamptz
);
create function chaos_event_written() returns trigger language plpgsql as $$
begin
    insert into chaos_events (vigil_id, seq, shard, event, payload, txid)
    values (new.vigil_id, new.seq, new.shard, new.event, new.payload, txid_current());
    return null;
end $$;
create trigger chaos_event_written after insert on vigil_events
    for each row execute function chaos_event_written();
create function chaos_event_committed() returns trigger language plpgsql as $$
begin
    update chaos_events set commit_seq = nextval('chaos_commit_seq'), committed_at = clock_timestamp() where id = new.id;
    return null;
end $$;
create constraint trigger chaos_event_committed after insert on chaos_events
    deferrable initially deferred for each row execute function chaos_event_committed();

`
