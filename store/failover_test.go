package store_test

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/vigil-sh/vigil/internal/faultproxy"
	"github.com/vigil-sh/vigil/internal/pgtest"
	"github.com/vigil-sh/vigil/internal/testwait"
	"github.com/vigil-sh/vigil/store"
)

// The worst interleaving of an asynchronous failover, on real servers: a
// successor raises the shard's fence on the primary, the primary dies before
// the standby has that commit, the standby is promoted and the database
// endpoint moves to it (the proxy stands for the VIP or pooler). On the new
// primary the fence is back at the old owner's token, so a check of the
// token alone would let the old owner write beside its successor. Neither
// may write until it claims again: the old owner's fence was raised on
// another timeline, and so was the successor's.
func TestFenceAcrossAFailoverThatLostTheRaise(t *testing.T) {
	if testing.Short() {
		t.Skip("starts two Postgres servers of its own")
	}
	ctx := context.Background()
	primary := pgtest.StartServer(t)
	standby := primary.StartStandby(t)
	vip, err := faultproxy.New(primary.Addr())
	if err != nil {
		t.Fatal(err)
	}
	defer vip.Close()
	url := "postgres://postgres@" + vip.Addr() + "/postgres?sslmode=disable"
	if err := store.Migrate(ctx, url, store.Schema{ControlPlane: true}); err != nil {
		t.Fatal(err)
	}
	open := func() *store.Store {
		s, err := store.Open(ctx, store.Config{URL: url, MaxConns: 2})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(s.Close)
		return s
	}
	oldOwner, successor := open(), open()
	write := func(tx pgx.Tx) error { _, err := tx.Exec(ctx, `select 1`); return err }

	old := store.Fence{Shard: 3, Token: 10, Replica: "a"}
	if err := oldOwner.RaiseFence(ctx, old); err != nil {
		t.Fatal(err)
	}
	if err := oldOwner.WithFence(ctx, old, write); err != nil {
		t.Fatalf("the owner's write before the failover: %v", err)
	}
	primary.CaughtUp(t, standby)
	standby.Kill() // it will miss what follows

	next := store.Fence{Shard: 3, Token: 20, Replica: "b"}
	if err := successor.RaiseFence(ctx, next); err != nil {
		t.Fatal(err)
	}
	if err := oldOwner.WithFence(ctx, old, write); !errors.Is(err, store.ErrFenced) || errors.Is(err, store.ErrDatabaseChanged) {
		t.Fatalf("the old owner after the successor's raise: %v, want fenced by the token", err)
	}

	primary.Kill()
	standby.Restart(t)
	standby.Promote(t)
	vip.Retarget(standby.Addr())

	// The successor's raise is lost: the stored token is the old owner's.
	var stored int64
	_ = settled(t, func() error { stored, err = oldOwner.FenceToken(ctx, 3); return err })
	if stored != old.Token {
		t.Fatalf("stored token on the promoted standby %d, want the old owner's %d (the raise lost)", stored, old.Token)
	}
	// Neither may write: both fences were raised on the old timeline.
	for name, c := range map[string]struct {
		s *store.Store
		f store.Fence
	}{"old owner": {oldOwner, old}, "successor": {successor, next}} {
		err := settled(t, func() error { return c.s.WithFence(ctx, c.f, write) })
		if !errors.Is(err, store.ErrDatabaseChanged) || !errors.Is(err, store.ErrFenced) {
			t.Fatalf("%s's write on the promoted standby: %v, want ErrDatabaseChanged", name, err)
		}
	}
	// The successor claims again (etcd gives the claim a higher token) and
	// raises it on the new primary: it writes, and the old owner cannot
	// even raise its old token back.
	again := store.Fence{Shard: 3, Token: 30, Replica: "b"}
	if err := successor.RaiseFence(ctx, again); err != nil {
		t.Fatal(err)
	}
	if err := successor.WithFence(ctx, again, write); err != nil {
		t.Fatalf("the successor's write after its new claim: %v", err)
	}
	if err := oldOwner.RaiseFence(ctx, old); !errors.Is(err, store.ErrFenced) {
		t.Fatalf("the old owner re-raising its token: %v, want ErrFenced", err)
	}
	if err := oldOwner.WithFence(ctx, old, write); !errors.Is(err, store.ErrFenced) {
		t.Fatalf("the old owner's write: %v, want ErrFenced", err)
	}
}

// settled runs op until it fails for a reason other than a connection the
// endpoint's move broke (each pooled connection fails once), and returns
// that outcome.
func settled(t *testing.T, op func() error) error {
	t.Helper()
	var err error
	testwait.For(t, 30*time.Second, "a connection to the new primary", func() bool {
		err = op()
		return err == nil || errors.Is(err, store.ErrFenced)
	})
	return err
}
