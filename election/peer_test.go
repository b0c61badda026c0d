package election

import (
	"context"
	"net"
	"net/http"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/prometheus/client_golang/prometheus/testutil"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/vigil-sh/vigil/internal/etcdtest"
	"github.com/vigil-sh/vigil/internal/testwait"
)

// fakePeer serves PeerPath as a replica process does, as replica id under
// lease, until it is killed: its listener and connections closed at once, as
// the kernel closes a dead process's sockets.
type fakePeer struct {
	srv   *http.Server
	addr  string
	mu    sync.Mutex
	held  int // PeerPath connections being held
	lease clientv3.LeaseID
}

func startPeer(t *testing.T, addr, id string, lease clientv3.LeaseID) *fakePeer {
	t.Helper()
	if addr == "" {
		addr = "127.0.0.1:0"
	}
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	p := &fakePeer{addr: ln.Addr().String(), lease: lease}
	p.srv = &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set(peerReplicaHeader, id)
		w.Header().Set(peerLeaseHeader, strconv.FormatInt(int64(p.lease), 16))
		w.WriteHeader(http.StatusOK)
		w.(http.Flusher).Flush()
		p.mu.Lock()
		p.held++
		p.mu.Unlock()
		<-r.Context().Done()
		p.mu.Lock()
		p.held--
		p.mu.Unlock()
	})}
	go func() { _ = p.srv.Serve(ln) }()
	t.Cleanup(p.kill)
	return p
}

func (p *fakePeer) holding() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.held
}

func (p *fakePeer) kill() { _ = p.srv.Close() }

// peerEnv is a Node's observer against an embedded etcd, and leases standing
// for other replicas' incarnations, each with a key bound to it.
type peerEnv struct {
	t   *testing.T
	cli *clientv3.Client
	n   *Node
	ob  *observer
	ctx context.Context
}

func newPeerEnv(t *testing.T) *peerEnv {
	t.Helper()
	e := etcdtest.New(t)
	cli := e.Client(t)
	n, err := New(Config{Client: cli, Layout: NewLayout("/vigil", "peer"), ReplicaID: "observer", Shards: 1, LeaseTTL: 2 * time.Second,
		Worker: nopWorker{}, Logger: hclog.NewNullLogger()})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	sess, err := NewSession(ctx, cli, SessionConfig{TTL: 2 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	ob := newObserver(n, sess)
	t.Cleanup(func() {
		ob.stop()
		cancel()
		_ = sess.Close(context.Background())
	})
	return &peerEnv{t: t, cli: cli, n: n, ob: ob, ctx: ctx}
}

type nopWorker struct{}

func (nopWorker) Own(ctx context.Context, _ int, _ int64) error { <-ctx.Done(); return nil }

// incarnation grants a lease with a key bound to it.
func (e *peerEnv) incarnation() clientv3.LeaseID {
	e.t.Helper()
	g, err := e.cli.Grant(e.ctx, 60)
	if err != nil {
		e.t.Fatal(err)
	}
	if _, err := e.cli.Put(e.ctx, "/vigil/peer/members/x-"+strconv.FormatInt(int64(g.ID), 16), "{}", clientv3.WithLease(g.ID)); err != nil {
		e.t.Fatal(err)
	}
	return g.ID
}

func (e *peerEnv) alive(lease clientv3.LeaseID) bool {
	e.t.Helper()
	r, err := e.cli.TimeToLive(e.ctx, lease)
	if err != nil {
		e.t.Fatal(err)
	}
	return r.TTL > 0
}

// A watched process that dies has exactly its incarnation's lease revoked,
// within a second; the others are left alone.
func TestObserverRevokesAGonePeersLease(t *testing.T) {
	e := newPeerEnv(t)
	la, lb := e.incarnation(), e.incarnation()
	a := startPeer(t, "", "a", la)
	b := startPeer(t, "", "b", lb)
	e.ob.update(e.ctx, []peerTarget{{id: "a", addr: a.addr, lease: la}, {id: "b", addr: b.addr, lease: lb}})
	testwait.For(t, 5*time.Second, "both peers watched", func() bool { return a.holding() == 1 && b.holding() == 1 })
	a.kill()
	took := testwait.For(t, time.Second, "a's lease revoked", func() bool { return !e.alive(la) })
	t.Logf("kill -> lease revoked: %s", took)
	if !e.alive(lb) {
		t.Fatal("b's lease was revoked too")
	}
	if n := testutil.ToFloat64(e.n.m.peerConfirmations); n != 1 {
		t.Errorf("confirmations %v, want 1", n)
	}
	if n := testutil.ToFloat64(e.n.m.peerRevocations.WithLabelValues("revoked")); n != 1 {
		t.Errorf("revocations %v, want 1", n)
	}
}

// A process that comes back at the same address under another lease (a
// restart) ended the watched incarnation: its old lease goes.
func TestObserverRevokesTheOldIncarnation(t *testing.T) {
	e := newPeerEnv(t)
	old, fresh := e.incarnation(), e.incarnation()
	p := startPeer(t, "", "a", old)
	e.ob.update(e.ctx, []peerTarget{{id: "a", addr: p.addr, lease: old}})
	testwait.For(t, 5*time.Second, "the peer watched", func() bool { return p.holding() == 1 })
	p.kill()
	startPeer(t, p.addr, "a", fresh)
	testwait.For(t, 2*time.Second, "the old incarnation's lease revoked", func() bool { return !e.alive(old) })
	if !e.alive(fresh) {
		t.Fatal("the new incarnation's lease was revoked")
	}
}

// Another replica answering at the watched address proves nothing: it is
// never taken for the watched one's death, however its process ends.
func TestObserverIgnoresAnotherReplicaAtTheAddress(t *testing.T) {
	e := newPeerEnv(t)
	la, lb := e.incarnation(), e.incarnation()
	wrong := startPeer(t, "", "someone-else", la)
	right := startPeer(t, "", "b", lb)
	e.ob.update(e.ctx, []peerTarget{{id: "a", addr: wrong.addr, lease: la}, {id: "b", addr: right.addr, lease: lb}})
	testwait.For(t, 5*time.Second, "the right peer watched", func() bool { return right.holding() == 1 })
	wrong.kill()
	right.kill()
	testwait.For(t, time.Second, "b's lease revoked", func() bool { return !e.alive(lb) })
	if !e.alive(la) {
		t.Fatal("a's lease revoked on the word of another replica")
	}
}

// One observer revokes at most two leases per lease TTL.
func TestRevocationsAreRateLimited(t *testing.T) {
	r := newRevocations(10 * time.Second)
	t0 := time.Now()
	if !r.allow(t0) || !r.allow(t0.Add(time.Second)) {
		t.Fatal("the first two refused")
	}
	if r.allow(t0.Add(2 * time.Second)) {
		t.Fatal("a third within the TTL allowed")
	}
	if !r.allow(t0.Add(10*time.Second + time.Millisecond)) {
		t.Fatal("refused after the first left the window")
	}
}

// An attempt that found the lease already gone revoked nothing and is given
// back: three crashes in one TTL, the first of them revoked by another
// observer first, are all within this observer's budget.
func TestAnAttemptOnAGoneLeaseIsGivenBack(t *testing.T) {
	r := newRevocations(10 * time.Second)
	t0 := time.Now()
	if !r.allow(t0) {
		t.Fatal("the first refused")
	}
	r.giveBack(t0)
	if !r.allow(t0.Add(time.Second)) || !r.allow(t0.Add(2*time.Second)) {
		t.Fatal("refused after the first attempt was given back")
	}
	if r.allow(t0.Add(3 * time.Second)) {
		t.Fatal("a third revocation within the TTL allowed")
	}
}

// PeerHandler answers under the session's lease and holds the connection
// until the session ends.
func TestPeerHandlerHoldsUntilTheSessionEnds(t *testing.T) {
	e := newPeerEnv(t)
	sess, err := NewSession(e.ctx, e.cli, SessionConfig{TTL: 2 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	e.n.session.Store(sess)
	srv := &http.Server{Handler: e.n.PeerHandler()}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go func() { _ = srv.Serve(ln) }()
	defer srv.Close()
	resp, err := http.Get("http://" + ln.Addr().String() + PeerPath)
	if err != nil {
		t.Fatal(err)
	}
	if resp.StatusCode != 200 || resp.Header.Get(peerReplicaHeader) != "observer" ||
		resp.Header.Get(peerLeaseHeader) != strconv.FormatInt(int64(sess.Lease()), 16) {
		t.Fatalf("answer %d %v", resp.StatusCode, resp.Header)
	}
	ended := make(chan struct{})
	go func() {
		buf := make([]byte, 1)
		_, _ = resp.Body.Read(buf)
		close(ended)
	}()
	select {
	case <-ended:
		t.Fatal("the connection ended while the session lives")
	case <-time.After(100 * time.Millisecond): // a held connection shows nothing: this is how long we look
	}
	_ = sess.Close(context.Background())
	<-ended
	resp.Body.Close()
}
