package store_test

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/vigil-sh/vigil/internal/pgtest"
	"github.com/vigil-sh/vigil/internal/testwait"
	"github.com/vigil-sh/vigil/store"
)

func open(t *testing.T, url string, idle time.Duration) *store.Store {
	t.Helper()
	s, err := store.Open(context.Background(), store.Config{URL: url, MaxConns: 4, IdleInTransactionSessionTimeout: idle})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(s.Close)
	dbs.Store(s, dbFor(t, url))
	return s
}

// dbs holds the test's own pool beside each store under test, for fixtures
// and checks: the store hands out no raw connections.
var dbs sync.Map

func dbFor(t *testing.T, url string) *pgxpool.Pool {
	t.Helper()
	db, err := pgxpool.New(context.Background(), url)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(db.Close)
	return db
}

func db(s *store.Store) *pgxpool.Pool {
	v, _ := dbs.Load(s)
	return v.(*pgxpool.Pool)
}

func insertSandbox(t *testing.T, s *store.Store, status string) uuid.UUID {
	t.Helper()
	id := uuid.New()
	_, err := db(s).Exec(context.Background(), `insert into sandboxes (id, team_id, host_id, status) values ($1, $2, $3, $4)`, id, uuid.New(), uuid.New(), status)
	if err != nil {
		t.Fatal(err)
	}
	return id
}

func status(t *testing.T, s *store.Store, id uuid.UUID) string {
	t.Helper()
	var st string
	if err := db(s).QueryRow(context.Background(), `select status from sandboxes where id = $1`, id).Scan(&st); err != nil {
		t.Fatal(err)
	}
	return st
}

func setStatus(ctx context.Context, tx pgx.Tx, id uuid.UUID, st string) error {
	_, err := tx.Exec(ctx, `update sandboxes set status = $2, last_updated = now() where id = $1`, id, st)
	return err
}

func TestRaiseFenceOnlyRises(t *testing.T) {
	ctx := context.Background()
	s := open(t, pgtest.New(t), 0)
	a := store.Fence{Shard: 7, Token: 10, Replica: "a"}
	if err := s.RaiseFence(ctx, a); err != nil {
		t.Fatal(err)
	}
	if err := s.RaiseFence(ctx, a); err != nil {
		t.Fatalf("re-raising the same token: %v", err)
	}
	b := store.Fence{Shard: 7, Token: 20, Replica: "b"}
	if err := s.RaiseFence(ctx, b); err != nil {
		t.Fatal(err)
	}
	if err := s.RaiseFence(ctx, a); !errors.Is(err, store.ErrFenced) {
		t.Fatalf("lowering the fence: err = %v, want ErrFenced", err)
	}
	if tok, _ := s.FenceToken(ctx, 7); tok != 20 {
		t.Fatalf("token = %d, want 20", tok)
	}
	if err := s.RaiseFence(ctx, store.Fence{Shard: 7, Token: 0}); err == nil {
		t.Fatal("token 0 accepted")
	}
}

func TestOlderTokenRejectedAfterNewerClaim(t *testing.T) {
	ctx := context.Background()
	s := open(t, pgtest.New(t), 0)
	id := insertSandbox(t, s, "running")
	a := store.Fence{Shard: 3, Token: 100, Replica: "a"}
	b := store.Fence{Shard: 3, Token: 200, Replica: "b"}

	if err := s.WithFence(ctx, a, func(pgx.Tx) error { return nil }); !errors.Is(err, store.ErrFenced) {
		t.Fatalf("write before any claim: err = %v, want ErrFenced", err)
	}
	if err := s.RaiseFence(ctx, a); err != nil {
		t.Fatal(err)
	}
	if err := s.WithFence(ctx, a, func(tx pgx.Tx) error { return setStatus(ctx, tx, id, "paused") }); err != nil {
		t.Fatalf("owner write: %v", err)
	}
	if err := s.RaiseFence(ctx, b); err != nil {
		t.Fatal(err)
	}
	err := s.WithFence(ctx, a, func(tx pgx.Tx) error { return setStatus(ctx, tx, id, "stopped") })
	if !errors.Is(err, store.ErrFenced) {
		t.Fatalf("old owner write after new claim: err = %v, want ErrFenced", err)
	}
	if got := status(t, s, id); got != "paused" {
		t.Fatalf("status = %s, want paused (the fenced write must change nothing)", got)
	}
	if err := s.WithFence(ctx, b, func(tx pgx.Tx) error { return setStatus(ctx, tx, id, "running") }); err != nil {
		t.Fatalf("new owner write: %v", err)
	}
}

// waitBlocked polls pg_stat_activity until a backend of the given
// application waits on a lock.
func waitBlocked(t *testing.T, s *store.Store, query string) {
	t.Helper()
	testwait.For(t, 10*time.Second, fmt.Sprintf("a backend blocked on a lock running %q", query), func() bool {
		var n int
		err := db(s).QueryRow(context.Background(), `
			select count(*) from pg_stat_activity
			 where datname = current_database() and wait_event_type = 'Lock' and query like $1`, "%"+query+"%").Scan(&n)
		if err != nil {
			t.Fatal(err)
		}
		return n > 0
	})
}

// A claim that is in flight (the new owner's raise holds the fence row but
// has not committed) makes the old owner's fence check wait; once the claim
// commits, the old owner's transaction sees the new token and writes nothing.
// A plain EXISTS on the fence table would have let it through.
func TestOlderWriterBlockedByInFlightClaimIsRejected(t *testing.T) {
	ctx := context.Background()
	url := pgtest.New(t)
	s := open(t, url, 0)
	id := insertSandbox(t, s, "running")
	a := store.Fence{Shard: 5, Token: 100, Replica: "a"}
	if err := s.RaiseFence(ctx, a); err != nil {
		t.Fatal(err)
	}
	claim, err := pgx.Connect(ctx, url)
	if err != nil {
		t.Fatal(err)
	}
	defer claim.Close(ctx)
	tx, err := claim.Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := tx.Exec(ctx, `update vigil_shard_fences set token = 200, owner = 'b' where shard = 5`); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() {
		done <- s.WithFence(ctx, a, func(tx pgx.Tx) error { return setStatus(ctx, tx, id, "stopped") })
	}()
	waitBlocked(t, s, "for share")
	if err := tx.Commit(ctx); err != nil {
		t.Fatal(err)
	}
	if err := <-done; !errors.Is(err, store.ErrFenced) {
		t.Fatalf("old owner's write: err = %v, want ErrFenced", err)
	}
	if got := status(t, s, id); got != "running" {
		t.Fatalf("status = %s, want running", got)
	}
}

// An old owner paused in the middle of a write transaction holds the fence
// row; the new owner's claim waits only until the paused session's idle
// timeout kills it, and the paused write never commits.
func TestPausedWriterCannotCommitAfterClaim(t *testing.T) {
	ctx := context.Background()
	url := pgtest.New(t)
	old := open(t, url, 300*time.Millisecond)
	s := open(t, url, 0)
	id := insertSandbox(t, s, "running")
	a := store.Fence{Shard: 9, Token: 100, Replica: "a"}
	b := store.Fence{Shard: 9, Token: 200, Replica: "b"}
	if err := old.RaiseFence(ctx, a); err != nil {
		t.Fatal(err)
	}
	written := make(chan struct{})
	resume := make(chan struct{})
	done := make(chan error, 1)
	go func() {
		done <- old.WithFence(ctx, a, func(tx pgx.Tx) error {
			if err := setStatus(ctx, tx, id, "stopped"); err != nil {
				return err
			}
			close(written)
			<-resume // the "pause": the transaction sits idle holding the fence row
			return setStatus(ctx, tx, id, "error")
		})
	}()
	<-written
	var wg sync.WaitGroup
	wg.Add(1)
	var raiseErr error
	go func() { defer wg.Done(); raiseErr = s.RaiseFence(ctx, b) }()
	wg.Wait() // returns once the idle session was killed and the lock released
	if raiseErr != nil {
		t.Fatalf("new owner's claim: %v", raiseErr)
	}
	close(resume)
	if err := <-done; err == nil {
		t.Fatal("paused writer committed after the new owner claimed")
	}
	if got := status(t, s, id); got != "running" {
		t.Fatalf("status = %s, want running (nothing of the paused writer may land)", got)
	}
	if err := old.WithFence(ctx, a, func(tx pgx.Tx) error { return setStatus(ctx, tx, id, "error") }); !errors.Is(err, store.ErrFenced) {
		t.Fatalf("resumed writer's next transaction: err = %v, want ErrFenced", err)
	}
}

func TestSessionTimeoutsSet(t *testing.T) {
	ctx := context.Background()
	s, err := store.Open(ctx, store.Config{URL: pgtest.New(t), LockTimeout: 1500 * time.Millisecond, StatementTimeout: 4 * time.Second,
		IdleInTransactionSessionTimeout: 2500 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	f := store.Fence{Shard: 1, Token: 1, Replica: "a"}
	if err := s.RaiseFence(ctx, f); err != nil {
		t.Fatal(err)
	}
	// Read the settings on the store's own session, inside its fenced
	// transaction: the session every owner write runs on.
	err = s.WithFence(ctx, f, func(tx pgx.Tx) error {
		for name, want := range map[string]string{"lock_timeout": "1500ms", "statement_timeout": "4s", "idle_in_transaction_session_timeout": "2500ms"} {
			var got string
			if err := tx.QueryRow(ctx, "show "+name).Scan(&got); err != nil {
				return err
			}
			if got != want {
				t.Errorf("%s = %s, want %s", name, got, want)
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}

func TestConfigValidate(t *testing.T) {
	for _, c := range []store.Config{{}, {URL: "x", MaxConns: -1}, {URL: "x", MinConns: 5, MaxConns: 2}} {
		if err := c.Validate(); err == nil {
			t.Errorf("%+v: no error", c)
		}
	}
}

// A rollback: an older release's migrate finds the schema a newer release
// left, changes nothing and says so (the older release runs on it).
func TestMigrateLeavesANewerSchemaAlone(t *testing.T) {
	url := pgtest.New(t)
	s := open(t, url, 0)
	ctx := context.Background()
	if _, err := db(s).Exec(ctx, `update vigil_schema_version set version = version + 1`); err != nil {
		t.Fatal(err)
	}
	err := store.Migrate(ctx, url, store.Schema{ControlPlane: true})
	if !errors.Is(err, store.ErrSchemaNewer) || !strings.Contains(err.Error(), "vigil_schema_version") {
		t.Fatalf("Migrate on a newer schema: %v, want ErrSchemaNewer naming vigil_schema_version", err)
	}
	var n int
	if err := db(s).QueryRow(ctx, `select count(*) from information_schema.tables where table_name = 'vigil_shard_fences'`).Scan(&n); err != nil || n != 1 {
		t.Fatalf("vigil_shard_fences present %d (%v): the newer schema was changed", n, err)
	}
}

func TestMigrateConcurrentlyAndTwice(t *testing.T) {
	url := pgtest.NewEmpty(t)
	var wg sync.WaitGroup
	errs := make([]error, 4)
	for i := range errs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs[i] = store.Migrate(context.Background(), url, store.Schema{ControlPlane: true, Volumes: true})
		}()
	}
	wg.Wait()
	for _, err := range errs {
		if err != nil {
			t.Fatal(err)
		}
	}
	if err := store.Migrate(context.Background(), url, store.Schema{ControlPlane: true, Volumes: true}); err != nil {
		t.Fatalf("migrating an up-to-date database: %v", err)
	}
	s := open(t, url, 0)
	var n int
	if err := db(s).QueryRow(context.Background(), `select count(*) from pg_trigger where tgname = 'vigil_host_online'`).Scan(&n); err != nil || n != 1 {
		t.Fatalf("reconnect trigger installed %d times, err %v", n, err)
	}
}
