package chaos

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"net/url"
	"os"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/vigil-sh/vigil/store"
)

// adminURL is the Postgres maintenance database the run creates its own
// database on: VIGIL_TEST_DATABASE_URL, as for the tests, or the local
// server.
func adminURL() string {
	if u := os.Getenv("VIGIL_TEST_DATABASE_URL"); u != "" {
		return u
	}
	return "postgres://postgres@127.0.0.1:5432/postgres?sslmode=disable"
}

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
	if err := store.Migrate(ctx, dbURL, true); err != nil {
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
//     overlap are the violation being looked for either way).
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
    committed_at timestamptz not null
);
create function chaos_journal_committed() returns trigger language plpgsql as $$
begin
    insert into chaos_commits values (new.seq, nextval('chaos_commit_seq'), clock_timestamp());
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
//   - The transaction of every audit row, so an event is tied to the audit
//     row (the change) it announces: same transaction, same resource.
//
// Neither table has a unique key: a vigil_id committed twice must not make
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
`
