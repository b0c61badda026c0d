package etcdtest_test

import (
	"context"
	"errors"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/goleak"

	"github.com/vigil-sh/vigil/internal/etcdtest"
)

func TestMain(m *testing.M) {
	// No goleak.Ignore options: a closed member and a closed client leave no
	// goroutine behind, not even a once-per-process one.
	goleak.VerifyTestMain(m)
}

func TestNewServesReadsAndWrites(t *testing.T) {
	c := etcdtest.New(t)
	cli := c.Client(t)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if _, err := cli.Put(ctx, "/k", "v"); err != nil {
		t.Fatalf("put: %v", err)
	}
	resp, err := cli.Get(ctx, "/k")
	if err != nil {
		t.Fatalf("get: %v", err)
	}
	if len(resp.Kvs) != 1 || string(resp.Kvs[0].Value) != "v" {
		t.Fatalf("get /k = %v, want v", resp.Kvs)
	}
}

func TestClustersAreIndependent(t *testing.T) {
	a, b := etcdtest.New(t), etcdtest.New(t)
	if a.Endpoints()[0] == b.Endpoints()[0] {
		t.Fatalf("both clusters on %s", a.Endpoints()[0])
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if _, err := a.Client(t).Put(ctx, "/only-in-a", "1"); err != nil {
		t.Fatalf("put: %v", err)
	}
	resp, err := b.Client(t).Get(ctx, "/only-in-a")
	if err != nil {
		t.Fatalf("get: %v", err)
	}
	if resp.Count != 0 {
		t.Fatalf("cluster b sees cluster a's key")
	}
}

func TestCloseStopsServingAndIsIdempotent(t *testing.T) {
	c := etcdtest.New(t)
	cli := c.Client(t)
	c.Close()
	c.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 500*time.Millisecond)
	defer cancel()
	if _, err := cli.Get(ctx, "/k"); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("get after close: err = %v, want deadline exceeded", err)
	}
}

// TestCloseLeavesNoGoroutines runs a member with the kinds of client use vigil
// makes (a lease kept alive, a watch, a transaction) and checks that once the
// test's cleanups have run nothing of the server or the client is left.
func TestCloseLeavesNoGoroutines(t *testing.T) {
	t.Run("cluster", func(t *testing.T) {
		c := etcdtest.New(t)
		cli := c.Client(t)
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		lease, err := cli.Grant(ctx, 5)
		if err != nil {
			t.Fatalf("grant: %v", err)
		}
		ka, err := cli.KeepAlive(ctx, lease.ID)
		if err != nil {
			t.Fatalf("keepalive: %v", err)
		}
		<-ka
		wch := cli.Watch(ctx, "/w/", clientv3.WithPrefix())
		if _, err := cli.Txn(ctx).
			If(clientv3.Compare(clientv3.CreateRevision("/w/a"), "=", 0)).
			Then(clientv3.OpPut("/w/a", "x", clientv3.WithLease(lease.ID))).
			Commit(); err != nil {
			t.Fatalf("txn: %v", err)
		}
		if ev := <-wch; len(ev.Events) != 1 {
			t.Fatalf("watch: %+v", ev)
		}
	})
	goleak.VerifyNone(t)
}
