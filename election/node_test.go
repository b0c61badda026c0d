package election_test

import (
	"context"
	"os"
	"strings"

	"errors"
	"fmt"
	"github.com/hashicorp/go-hclog"
	"sort"
	"sync"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/goleak"

	"github.com/vigil-sh/vigil/election"
	"github.com/vigil-sh/vigil/internal/etcdtest"
	"github.com/vigil-sh/vigil/shard"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

// tracker is a hand-written Worker shared by every node of a test. It
// records who runs each shard and fails the test the moment two replicas
// run one shard at once.
type tracker struct {
	t *testing.T
	// lenient tolerates a new owner starting while the old one still runs:
	// only for tests that delete keys from under their owner, where the old
	// owner learns of it a moment later (Postgres fencing covers that gap).
	lenient  bool
	overlaps int
	mu       sync.Mutex
	running  map[int]string // shard -> replica
	stopped  map[int]time.Time
	gaps     []time.Duration
	starts   int
	changed  chan struct{}
}

func newTracker(t *testing.T) *tracker {
	return &tracker{t: t, running: map[int]string{}, stopped: map[int]time.Time{}, changed: make(chan struct{}, 1)}
}

func (tr *tracker) poke() {
	select {
	case tr.changed <- struct{}{}:
	default:
	}
}

type worker struct {
	tr      *tracker
	replica string
	fail    func(shard int) error // optional: a worker error instead of running
}

func (w worker) Own(ctx context.Context, s int, token int64) error {
	tr := w.tr
	tr.mu.Lock()
	if other, ok := tr.running[s]; ok {
		tr.overlaps++
		if !tr.lenient {
			tr.mu.Unlock()
			tr.t.Errorf("shard %d: %s started while %s still runs it", s, w.replica, other)
			return nil
		}
		// Wait for the old owner to notice (bounded by the test's timeouts).
		for tr.running[s] != "" {
			tr.mu.Unlock()
			time.Sleep(time.Millisecond)
			tr.mu.Lock()
		}
	}
	if token <= 0 {
		tr.t.Errorf("shard %d: token %d", s, token)
	}
	tr.running[s] = w.replica
	tr.starts++
	if at, ok := tr.stopped[s]; ok {
		tr.gaps = append(tr.gaps, time.Since(at))
	}
	tr.mu.Unlock()
	tr.poke()
	var err error
	if w.fail != nil {
		err = w.fail(s)
	}
	if err == nil {
		<-ctx.Done()
	}
	tr.mu.Lock()
	delete(tr.running, s)
	tr.stopped[s] = time.Now()
	tr.mu.Unlock()
	tr.poke()
	return err
}

// owners returns replica -> shards it runs.
func (tr *tracker) owners() map[string][]int {
	tr.mu.Lock()
	defer tr.mu.Unlock()
	out := map[string][]int{}
	for s, r := range tr.running {
		out[r] = append(out[r], s)
	}
	return out
}

// waitFor polls cond, woken by every ownership change, until it holds.
func (tr *tracker) waitFor(timeout time.Duration, what string, cond func() bool) time.Duration {
	tr.t.Helper()
	start := time.Now()
	deadline := time.NewTimer(timeout)
	defer deadline.Stop()
	tick := time.NewTicker(20 * time.Millisecond)
	defer tick.Stop()
	for !cond() {
		select {
		case <-deadline.C:
			tr.t.Fatalf("timed out after %s waiting for %s; owners %v", timeout, what, summary(tr.owners()))
		case <-tr.changed:
		case <-tick.C:
		}
	}
	return time.Since(start)
}

func summary(o map[string][]int) string {
	var parts []string
	for r, s := range o {
		parts = append(parts, fmt.Sprintf("%s:%d", r, len(s)))
	}
	sort.Strings(parts)
	return fmt.Sprint(parts)
}

// testLogger logs to the test's output when VIGIL_TEST_LOG is set.
func testLogger(t *testing.T, name string) hclog.Logger {
	if os.Getenv("VIGIL_TEST_LOG") == "" {
		return hclog.NewNullLogger()
	}
	return hclog.New(&hclog.LoggerOptions{Name: name, Level: hclog.Debug, Output: tWriter{t}})
}

type tWriter struct{ t *testing.T }

func (w tWriter) Write(b []byte) (int, error) {
	w.t.Log(strings.TrimRight(string(b), "\n"))
	return len(b), nil
}

type cluster struct {
	t      *testing.T
	etcd   *etcdtest.Cluster
	cli    *clientv3.Client
	layout election.Layout
	shards int
	ttl    time.Duration
	tr     *tracker
	nodes  map[string]*running
}

type running struct {
	node   *election.Node
	cancel context.CancelFunc
	done   chan error
}

func newCluster(t *testing.T, shards int, ttl time.Duration) *cluster {
	e := etcdtest.New(t)
	return &cluster{t: t, etcd: e, cli: e.Client(t), layout: election.NewLayout("/vigil", t.Name()), shards: shards, ttl: ttl, tr: newTracker(t), nodes: map[string]*running{}}
}

func (c *cluster) start(id string) *running {
	c.t.Helper()
	return c.startWith(id, c.shards, nil)
}

func (c *cluster) startWith(id string, shards int, fail func(int) error) *running {
	c.t.Helper()
	n, err := election.New(election.Config{
		Client: c.etcd.Client(c.t), Layout: c.layout, ReplicaID: id, Addr: "test", Shards: shards,
		LeaseTTL: c.ttl, Worker: worker{tr: c.tr, replica: id, fail: fail}, Logger: testLogger(c.t, id),
	})
	if err != nil {
		c.t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	r := &running{node: n, cancel: cancel, done: make(chan error, 1)}
	go func() { r.done <- n.Run(ctx) }()
	c.nodes[id] = r
	c.t.Cleanup(func() { cancel(); <-r.done })
	return r
}

// stop is a graceful stop (what SIGTERM does).
func (c *cluster) stop(id string) {
	c.t.Helper()
	r := c.nodes[id]
	r.cancel()
	if err := <-r.done; err != nil {
		c.t.Fatalf("%s: Run: %v", id, err)
	}
	r.done <- nil // for cleanup
	delete(c.nodes, id)
}

// balanced reports whether the tracker shows every shard run exactly once,
// spread over exactly the given members within floor/ceil.
func (c *cluster) balanced(members ...string) bool {
	o := c.tr.owners()
	total := 0
	for r, s := range o {
		found := false
		for _, m := range members {
			found = found || m == r
		}
		if !found {
			return false
		}
		total += len(s)
	}
	if total != c.shards || len(o) != len(members) {
		return false
	}
	lo, hi := c.shards/len(members), (c.shards+len(members)-1)/len(members)
	for _, s := range o {
		if len(s) < lo || len(s) > hi {
			return false
		}
	}
	return true
}

func (c *cluster) etcdOwners() map[int]string {
	c.t.Helper()
	resp, err := c.cli.Get(context.Background(), c.layout.ShardsPrefix(), clientv3.WithPrefix())
	if err != nil {
		c.t.Fatal(err)
	}
	out := map[int]string{}
	for _, kv := range resp.Kvs {
		n, err := shard.ParseKey(string(kv.Key[len(c.layout.ShardsPrefix()):]), c.shards)
		if err != nil {
			continue // garbage planted by a test
		}
		out[n] = string(kv.Value)
	}
	return out
}

func (c *cluster) ownersSnapshot() map[int]string {
	out := map[int]string{}
	for r, ss := range c.tr.owners() {
		for _, s := range ss {
			out[s] = r
		}
	}
	return out
}

func TestThreeReplicasOwnEveryShardOnceBalanced(t *testing.T) {
	c := newCluster(t, 256, 2*time.Second)
	c.start("a")
	c.start("b")
	c.start("c")
	took := c.tr.waitFor(10*time.Second, "balanced ownership", func() bool { return c.balanced("a", "b", "c") })
	t.Logf("all 256 shards owned, balanced, %s after the last replica started", took)
	// etcd agrees with the workers, key for key.
	run := c.ownersSnapshot()
	for s, r := range c.etcdOwners() {
		if run[s] != r {
			t.Errorf("shard %d: etcd says %s, worker %s", s, r, run[s])
		}
	}
	leaders := 0
	for _, r := range c.nodes {
		if r.node.IsLeader() {
			leaders++
		}
	}
	if leaders != 1 {
		t.Errorf("%d leaders", leaders)
	}
}

func TestGracefulStopHandsOverWithoutOverlap(t *testing.T) {
	c := newCluster(t, 64, 2*time.Second)
	for _, id := range []string{"a", "b", "c"} {
		c.start(id)
	}
	c.tr.waitFor(10*time.Second, "balanced", func() bool { return c.balanced("a", "b", "c") })
	before := c.ownersSnapshot()
	// Stop the leader first, then a follower.
	var leader string
	for id, r := range c.nodes {
		if r.node.IsLeader() {
			leader = id
		}
	}
	c.stop(leader)
	rest := []string{}
	for id := range c.nodes {
		rest = append(rest, id)
	}
	c.tr.waitFor(10*time.Second, "rebalanced after stopping the leader", func() bool { return c.balanced(rest...) })
	after := c.ownersSnapshot()
	for s, r := range before {
		if r != leader && after[s] != r {
			t.Errorf("shard %d moved %s -> %s although its owner stayed", s, r, after[s])
		}
	}
	c.tr.mu.Lock()
	gaps := append([]time.Duration(nil), c.tr.gaps...)
	c.tr.mu.Unlock()
	sort.Slice(gaps, func(i, j int) bool { return gaps[i] < gaps[j] })
	if len(gaps) == 0 {
		t.Fatal("no handover measured")
	}
	t.Logf("handover gaps: n=%d p50=%s max=%s", len(gaps), gaps[len(gaps)/2], gaps[len(gaps)-1])
	if gaps[len(gaps)-1] > 500*time.Millisecond {
		t.Errorf("a handover gap of %s exceeds 0.5 s", gaps[len(gaps)-1])
	}
}

func TestScaleMovesOnlyWhatBalanceNeeds(t *testing.T) {
	c := newCluster(t, 64, 2*time.Second)
	for _, id := range []string{"a", "b", "c"} {
		c.start(id)
	}
	c.tr.waitFor(10*time.Second, "3 balanced", func() bool { return c.balanced("a", "b", "c") })
	three := c.ownersSnapshot()

	c.start("d")
	c.tr.waitFor(10*time.Second, "4 balanced", func() bool { return c.balanced("a", "b", "c", "d") })
	four := c.ownersSnapshot()
	moved := 0
	for s, r := range four {
		if r != three[s] {
			moved++
			if r != "d" {
				t.Errorf("shard %d moved %s -> %s between replicas that were already there", s, three[s], r)
			}
		}
	}
	if moved != 16 {
		t.Errorf("%d shards moved to the new replica, want 16", moved)
	}

	c.stop("a")
	c.stop("b")
	c.tr.waitFor(10*time.Second, "2 balanced", func() bool { return c.balanced("c", "d") })
	two := c.ownersSnapshot()
	for s, r := range four {
		if (r == "c" || r == "d") && two[s] != r {
			t.Errorf("shard %d moved %s -> %s although its owner stayed", s, r, two[s])
		}
	}
}

// Revoking a replica's lease behind its back ends its session: it stops
// every shard at once, and joins again as a fresh member with a new lease.
func TestSessionLossStopsEverythingAndRejoins(t *testing.T) {
	c := newCluster(t, 32, 2*time.Second)
	c.tr.lenient = true // the revoke deletes a's keys before a can know
	c.start("a")
	c.start("b")
	c.tr.waitFor(10*time.Second, "balanced", func() bool { return c.balanced("a", "b") })
	for i := 0; i < 8; i++ {
		resp, err := c.cli.Get(context.Background(), c.layout.Member("a"))
		if err != nil || len(resp.Kvs) != 1 {
			t.Fatalf("member key: %v %v", resp, err)
		}
		lease := clientv3.LeaseID(resp.Kvs[0].Lease)
		if _, err := c.cli.Revoke(context.Background(), lease); err != nil {
			t.Fatal(err)
		}
		c.tr.waitFor(10*time.Second, "rejoin with a new lease and rebalance", func() bool {
			r, err := c.cli.Get(context.Background(), c.layout.Member("a"))
			return err == nil && len(r.Kvs) == 1 && clientv3.LeaseID(r.Kvs[0].Lease) != lease && c.balanced("a", "b")
		})
	}
}

func TestShardCountMismatchRefusesToStart(t *testing.T) {
	c := newCluster(t, 16, 2*time.Second)
	c.start("a")
	c.tr.waitFor(10*time.Second, "owned", func() bool { return c.balanced("a") })
	r := c.startWith("b", 32, nil)
	select {
	case err := <-r.done:
		if !errors.Is(err, election.ErrShardCount) {
			t.Fatalf("err = %v, want ErrShardCount", err)
		}
		r.done <- nil
	case <-time.After(10 * time.Second):
		t.Fatal("replica with another shard count did not refuse to start")
	}
	// Garbage config: refuses with a clear error, never crashes.
	c2 := newCluster(t, 16, 2*time.Second)
	if _, err := c2.cli.Put(context.Background(), c2.layout.Config(), "{not json"); err != nil {
		t.Fatal(err)
	}
	r = c2.start("x")
	select {
	case err := <-r.done:
		if !errors.Is(err, election.ErrBadConfig) {
			t.Fatalf("err = %v, want ErrBadConfig", err)
		}
		r.done <- nil
	case <-time.After(10 * time.Second):
		t.Fatal("garbage config accepted")
	}
}

func TestGarbageUnderThePrefix(t *testing.T) {
	c := newCluster(t, 16, 2*time.Second)
	c.tr.lenient = true // keys are deleted from under their owners
	ctx := context.Background()
	// Before anyone starts: an owner key without a lease, one naming no
	// member under some other lease, an assignment to a ghost, junk keys.
	lease, err := c.cli.Grant(ctx, 60)
	if err != nil {
		t.Fatal(err)
	}
	mustPut := func(k, v string, opts ...clientv3.OpOption) {
		if _, err := c.cli.Put(ctx, k, v, opts...); err != nil {
			t.Fatal(err)
		}
	}
	mustPut(c.layout.Shard(3), "a")
	mustPut(c.layout.Shard(4), "ghost", clientv3.WithLease(lease.ID))
	mustPut(c.layout.Assign(5), "ghost")
	mustPut(c.layout.ShardsPrefix()+"banana", "a")
	mustPut(c.layout.AssignPrefix()+"99999", "a")
	mustPut(c.layout.LeaderPrefix()+"0", "ghost")
	c.start("a")
	c.start("b")
	c.tr.waitFor(10*time.Second, "every shard owned despite garbage", func() bool { return c.balanced("a", "b") })

	// A key deleted from under its owner: the owner stops at once and
	// claims again with a new token.
	owners := c.etcdOwners()
	victim := owners[7]
	if _, err := c.cli.Delete(ctx, c.layout.Shard(7)); err != nil {
		t.Fatal(err)
	}
	c.tr.waitFor(10*time.Second, "shard 7 reclaimed", func() bool {
		o := c.etcdOwners()
		return o[7] != "" && c.balanced("a", "b")
	})
	// An owner key rewritten by someone else is a loss too.
	if _, err := c.cli.Put(ctx, c.layout.Shard(8), "ghost"); err != nil {
		t.Fatal(err)
	}
	c.tr.waitFor(10*time.Second, "shard 8 reclaimed from garbage", func() bool {
		o := c.etcdOwners()
		return (o[8] == "a" || o[8] == "b") && c.balanced("a", "b")
	})
	_ = victim
}
