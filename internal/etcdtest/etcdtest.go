// Package etcdtest gives each test its own embedded single-member etcd on
// free loopback ports, with its data in the test's temporary directory,
// closed when the test ends.
package etcdtest

import (
	"context"
	"os"
	"sync"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.etcd.io/etcd/server/v3/embed"
	"go.uber.org/zap"

	"github.com/vigil-sh/vigil/internal/embedetcd"
)

// StartTimeout bounds how long New waits for the member to serve.
const StartTimeout = 30 * time.Second

// Cluster is one embedded etcd member owned by a test.
type Cluster struct {
	etcd      *embed.Etcd
	endpoints []string
	closeOnce sync.Once
}

// New starts a member and registers its Close with t.Cleanup; it fails the
// test if the member does not serve within StartTimeout. The member logs
// nothing (set VIGIL_TEST_ETCD_LOG=1 for its errors on stderr), does not
// fsync, and uses fast raft timing.
func New(t testing.TB) *Cluster {
	t.Helper()
	cfg := embedetcd.EmbedConfig{
		Name:          "etcdtest",
		Dir:           t.TempDir(),
		Logger:        zap.NewNop(),
		UnsafeNoFsync: true,
	}
	if logEnabled() {
		cfg.Logger = nil
	}
	ctx, cancel := context.WithTimeout(context.Background(), StartTimeout)
	defer cancel()
	e, err := embedetcd.StartEmbedded(ctx, cfg)
	if err != nil {
		t.Fatalf("etcdtest: %v", err)
	}
	c := &Cluster{etcd: e, endpoints: embedetcd.ClientEndpoints(e)}
	t.Cleanup(c.Close)
	return c
}

// Close stops the member and waits for its goroutines to exit; clients of it
// then fail their requests. It is idempotent, so a test may stop the member
// early and still leave the cleanup to call it again.
func (c *Cluster) Close() {
	c.closeOnce.Do(c.etcd.Close)
}

// Endpoints returns the member's client URLs.
func (c *Cluster) Endpoints() []string {
	return append([]string(nil), c.endpoints...)
}

// Client returns a new client of the member (DialTimeout 2 s), closed at
// t's cleanup, which runs before the member's own since it was registered
// later. Each call returns a distinct client with its own connection.
func (c *Cluster) Client(t testing.TB) *clientv3.Client {
	t.Helper()
	cli, err := clientv3.New(clientv3.Config{
		Endpoints:   c.Endpoints(),
		DialTimeout: 2 * time.Second,
		Logger:      zap.NewNop(),
	})
	if err != nil {
		t.Fatalf("etcdtest: client: %v", err)
	}
	t.Cleanup(func() { _ = cli.Close() })
	return cli
}

// Server returns the embedded member. Stop it with c.Close, not with the
// server's own Close, which panics when called twice (as cleanup would).
func (c *Cluster) Server() *embed.Etcd {
	return c.etcd
}

func logEnabled() bool {
	return os.Getenv("VIGIL_TEST_ETCD_LOG") != ""
}
