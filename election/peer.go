package election

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"strconv"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/hashicorp/go-hclog"
	clientv3 "go.etcd.io/etcd/client/v3"
)

// Crash failover without waiting for the lease (SPEC §3 bounds): every
// replica holds a long-lived connection to every other replica's admin
// listener (PeerPath). A replica process that dies — an OOM kill, a panic, a
// kill -9 — on a machine that stays up has its sockets closed by the kernel
// at once. An observer that sees its connection end confirms with one
// re-dial: refused means nothing listens there any more, another lease means
// the incarnation it watched has ended (it rejoined). Then it revokes exactly
// that incarnation's lease, and the lease's owner keys go with it, so the
// normal claim path hands the shards over within a second whatever the TTL.
//
// A re-dial that times out proves nothing (a partition, a dead machine), and
// a process that answers without a session has stepped down but may still be
// draining its work: the lease decides, as before, expiring a margin after
// the replica stopped acting. A stopped or slow process keeps its sockets
// open, so it is never suspected. Safety never rests on this: a wrong
// revocation costs the victim its session, and the fences keep its writes
// out.

// PeerPath is where each replica's admin listener serves its liveness.
const PeerPath = "/peer"

// Headers of a PeerPath answer: who answers, under which lease.
const (
	peerLeaseHeader   = "Vigil-Lease"
	peerReplicaHeader = "Vigil-Replica"
)

// PeerHandler serves PeerPath: 200 with the replica id and its current
// session's lease (hex) in headers, then the connection is held open, with
// nothing written, until the session ends or the request is abandoned.
// Without a valid session it answers 503. Graceful shutdown of the admin
// listener waits for these requests only until the session has ended (Run
// returns after that).
func (n *Node) PeerHandler() http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set(peerReplicaHeader, n.cfg.ReplicaID)
		s := n.session.Load()
		if s == nil || !s.Valid() {
			http.Error(w, "no etcd session", http.StatusServiceUnavailable)
			return
		}
		w.Header().Set(peerLeaseHeader, strconv.FormatInt(int64(s.Lease()), 16))
		w.WriteHeader(http.StatusOK)
		if f, ok := w.(http.Flusher); ok {
			f.Flush()
		}
		select {
		case <-r.Context().Done():
		case <-s.Context().Done():
		}
	})
}

// peerTarget is one incarnation of another replica to observe.
type peerTarget struct {
	id      string
	addr    string // its admin listener, from its member key
	lease   clientv3.LeaseID
	leaving bool // its member key says it is handing over before it stops
}

// peerWatch is one running watch.
type peerWatch struct {
	cancel  context.CancelFunc
	leaving atomic.Bool // from the latest view: its end is expected
}

// verdict is how one look at a peer ended.
type verdict int

const (
	peerAlive   verdict = iota // it answered under the watched lease
	peerGone                   // nothing listens: the process is gone
	peerEnded                  // the process answers under another lease, or none: that incarnation ended
	peerUnknown                // timed out, unreachable, misdirected: the lease decides
	peerClosing                // reset or closed before answering: a listener on its way out
)

// observer watches the other members' processes for one session. The owner
// loop alone calls update and stop; each watch runs on its own goroutine.
type observer struct {
	n       *Node
	sess    *Session
	client  *http.Client
	probe   time.Duration // how long a confirming re-dial may take
	limit   *revocations
	watches map[clientv3.LeaseID]*peerWatch
	wg      sync.WaitGroup
}

func newObserver(n *Node, sess *Session) *observer {
	probe := min(500*time.Millisecond, n.cfg.LeaseTTL/4)
	dialer := &net.Dialer{Timeout: probe, KeepAlive: 5 * time.Second}
	tr := &http.Transport{DialContext: dialer.DialContext, DisableKeepAlives: true, ResponseHeaderTimeout: probe, Proxy: nil}
	return &observer{n: n, sess: sess, client: &http.Client{Transport: tr}, probe: probe,
		limit: newRevocations(n.cfg.LeaseTTL), watches: map[clientv3.LeaseID]*peerWatch{}}
}

// update starts watching the targets not watched yet and stops watching
// those no longer among them (their member key is gone with its lease).
func (ob *observer) update(ctx context.Context, targets []peerTarget) {
	keep := make(map[clientv3.LeaseID]bool, len(targets))
	for _, t := range targets {
		keep[t.lease] = true
		if pw, ok := ob.watches[t.lease]; ok {
			pw.leaving.Store(t.leaving)
			continue
		}
		wctx, cancel := context.WithCancel(ctx)
		pw := &peerWatch{cancel: cancel}
		pw.leaving.Store(t.leaving)
		ob.watches[t.lease] = pw
		ob.wg.Go(func() { ob.watch(wctx, t, pw) })
	}
	for lease, pw := range ob.watches {
		if !keep[lease] {
			pw.cancel()
			delete(ob.watches, lease)
		}
	}
	ob.n.m.peersWatched.Set(float64(len(ob.watches)))
}

// stop ends every watch and waits for them.
func (ob *observer) stop() {
	for lease, pw := range ob.watches {
		pw.cancel()
		delete(ob.watches, lease)
	}
	ob.wg.Wait()
	ob.n.m.peersWatched.Set(0)
}

// watch observes one incarnation until ctx ends or it is found gone. Only an
// incarnation once seen alive is ever judged gone: an address that never
// answered under the watched lease proves nothing about it.
func (ob *observer) watch(ctx context.Context, t peerTarget, pw *peerWatch) {
	log := ob.n.log.With("peer", t.id, "peer_lease", fmt.Sprintf("%x", t.lease))
	seen := false
	backoff := ob.probe
	for ctx.Err() == nil {
		v, held := ob.hold(ctx, t)
		seen = seen || held
		switch {
		case v == peerAlive:
			backoff = ob.probe
			continue // the connection ended and the re-dial answered: a false alarm, counted by hold
		case (v == peerGone || v == peerEnded) && seen && pw.leaving.Load():
			// The end of a graceful stop: it revokes its own lease too.
			log.Info("peer stopped after its hand-over; revoking its lease", "addr", t.addr)
			ob.revoke(t, log)
			return
		case (v == peerGone || v == peerEnded) && seen:
			ob.n.m.peerConfirmations.Inc()
			log.Warn("peer process gone; revoking its lease", "addr", t.addr)
			ob.revoke(t, log)
			return
		}
		if !sleepCtx(ctx, backoff) {
			return
		}
		backoff = min(2*backoff, ob.n.cfg.LeaseTTL)
	}
}

// hold connects to the peer and holds the connection until it ends, then
// confirms with one re-dial. held says the peer answered under the watched
// lease first; the verdict is the re-dial's (or the first dial's, when it
// did not).
func (ob *observer) hold(ctx context.Context, t peerTarget) (v verdict, held bool) {
	resp, v := ob.look(ctx, t, 0)
	if v != peerAlive {
		return v, false
	}
	ob.n.m.peersConnected.Inc()
	_, _ = io.Copy(io.Discard, resp.Body) // returns when the connection ends
	ob.n.m.peersConnected.Dec()
	resp.Body.Close()
	if ctx.Err() != nil {
		return peerUnknown, true
	}
	ob.n.m.peerSuspicions.Inc()
	resp, v = ob.confirm(ctx, t)
	switch v {
	case peerAlive:
		resp.Body.Close()
		ob.n.m.peerFalseAlarms.Inc()
	case peerUnknown:
		ob.n.m.peerUnconfirmed.Inc()
	}
	return v, true
}

// confirm re-dials a peer whose connection ended, within the probe time. A
// dying process may still have its listener open for a moment after its
// connections closed: a re-dial then lands in the listener's queue and is
// reset when the listener closes, so a reset or an answerless close is
// dialled again until the answer is plain (refused, alive, another
// incarnation) or the time is up.
func (ob *observer) confirm(ctx context.Context, t peerTarget) (*http.Response, verdict) {
	deadline := time.Now().Add(ob.probe)
	for {
		left := time.Until(deadline)
		if left <= 0 {
			return nil, peerUnknown
		}
		resp, v := ob.look(ctx, t, left)
		if v != peerClosing {
			return resp, v
		}
		if !sleepCtx(ctx, 10*time.Millisecond) {
			return nil, peerUnknown
		}
	}
}

// look asks the peer at t.addr for PeerPath, within timeout when it is not
// 0 (a confirming re-dial); a live answer's body is left open.
func (ob *observer) look(ctx context.Context, t peerTarget, timeout time.Duration) (*http.Response, verdict) {
	if timeout > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, timeout)
		defer cancel()
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+t.addr+PeerPath, nil)
	if err != nil {
		return nil, peerUnknown
	}
	resp, err := ob.client.Do(req)
	switch {
	case err != nil && errors.Is(err, syscall.ECONNREFUSED):
		return nil, peerGone
	case err != nil && (errors.Is(err, syscall.ECONNRESET) || errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF)):
		return nil, peerClosing
	case err != nil:
		return nil, peerUnknown
	case resp.Header.Get(peerReplicaHeader) != t.id:
		// Someone else answers at that address: the advertised address
		// is wrong, or it was reused. It proves nothing.
		resp.Body.Close()
		return nil, peerUnknown
	case resp.StatusCode == http.StatusOK && resp.Header.Get(peerLeaseHeader) == strconv.FormatInt(int64(t.lease), 16):
		return resp, peerAlive // the caller reads and closes it
	case resp.StatusCode == http.StatusOK:
		// The process lives on under another lease: it rejoined, so the
		// watched incarnation's work has stopped.
		resp.Body.Close()
		return nil, peerEnded
	default:
		// Alive without a session: it stepped down and may still be
		// draining its work; its lease expires a margin after it stopped
		// acting, as before.
		resp.Body.Close()
		return nil, peerUnknown
	}
}

// revoke revokes exactly the watched incarnation's lease, if this replica
// holds a live session and its rate allows.
func (ob *observer) revoke(t peerTarget, log hclog.Logger) {
	result := "revoked"
	defer func() { ob.n.m.peerRevocations.WithLabelValues(result).Inc() }()
	now := time.Now()
	switch {
	case !ob.sess.Valid():
		result = "no_session"
		return
	case !ob.limit.allow(now):
		result = "rate_limited"
		log.Warn("not revoking: too many revocations lately", "addr", t.addr)
		return
	}
	// The session's context, not the watch's: another observer's
	// revocation removes the member key and ends the watch meanwhile.
	rctx, cancel := context.WithTimeout(ob.sess.Context(), ob.n.cfg.LeaseTTL/2)
	defer cancel()
	_, err := ob.n.cfg.Client.Revoke(rctx, t.lease)
	switch {
	case isLeaseGone(err):
		// Nothing was revoked (another observer was first, or the TTL):
		// the attempt does not count against this observer's budget, so a
		// burst of crashes each observer sees is not slowed by the others'
		// revocations. A broken observer gains nothing: a live peer's lease
		// is not gone.
		result = "already_gone"
		ob.limit.giveBack(now)
	case err != nil:
		result = "error"
		log.Warn("revoking the peer's lease failed; it expires with its TTL", "error", err)
	}
}

// revocations bounds how many leases one observer revokes: at most
// maxRevocations within one lease TTL, so a replica whose view of the
// network is broken cannot evict the cluster. Its mutex guards its times.
type revocations struct {
	mu     sync.Mutex
	window time.Duration
	times  []time.Time
}

const maxRevocations = 2

func newRevocations(window time.Duration) *revocations { return &revocations{window: window} }

func (r *revocations) allow(now time.Time) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	kept := r.times[:0]
	for _, t := range r.times {
		if now.Sub(t) < r.window {
			kept = append(kept, t)
		}
	}
	r.times = kept
	if len(r.times) >= maxRevocations {
		return false
	}
	r.times = append(r.times, now)
	return true
}

// giveBack undoes the allow at `at`: that attempt revoked nothing.
func (r *revocations) giveBack(at time.Time) {
	r.mu.Lock()
	defer r.mu.Unlock()
	for i, t := range r.times {
		if t.Equal(at) {
			r.times = append(r.times[:i], r.times[i+1:]...)
			return
		}
	}
}

// peerTargets are the other members of the view, each with its lease and
// advertised address.
func peerTargets(v *view, me string) []peerTarget {
	var out []peerTarget
	for id, m := range v.members {
		if id == me || m.lease == 0 {
			continue
		}
		if info, err := parseMemberInfo(m.value); err == nil && info.Addr != "" {
			out = append(out, peerTarget{id: id, addr: info.Addr, lease: m.lease, leaving: v.leaving[id]})
		}
	}
	return out
}
