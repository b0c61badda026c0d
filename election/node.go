// Package election owns vigil's use of etcd: one lease per replica process
// (Session), the membership key, leader election, the leader's assignment of
// shards to members, and each replica's claim, fencing token and release of
// the shards assigned to it.
//
// A shard reaches its worker as (shard, token, ctx) through the Worker
// interface; the ctx ends the moment ownership ends for any reason, so this
// package never needs to know what the work is.
package election

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"sort"
	"sync"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/prometheus/client_golang/prometheus"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/vigil-sh/vigil/shard"
)

// ErrShardCount reports a cluster created with another shard count.
var ErrShardCount = errors.New("election: shard count differs from the cluster's")

// ErrBadConfig reports a cluster config key that cannot be trusted.
var ErrBadConfig = errors.New("election: cluster config key is invalid")

// Worker does one shard's work.
type Worker interface {
	// Own runs the shard's work under the fencing token until ctx ends, then
	// returns after every in-flight action has stopped. A non-nil return
	// before ctx ends (for example a fence rejection) is a loss of the shard.
	Own(ctx context.Context, shard int, token int64) error
}

// Config configures a Node.
type Config struct {
	Client    *clientv3.Client
	Layout    Layout
	ReplicaID string
	Addr      string // advertised in the member key (the admin HTTP address)
	Shards    int
	LeaseTTL  time.Duration
	Worker    Worker
	// HandoverTimeout bounds a graceful stop's wait for the leader to move
	// this replica's shards away; default 2 × LeaseTTL.
	HandoverTimeout time.Duration
	// Resync is the period of full re-evaluation besides watch events;
	// default LeaseTTL/2.
	Resync     time.Duration
	Logger     hclog.Logger
	Registerer prometheus.Registerer
}

func (c *Config) validate() error {
	switch {
	case c.Client == nil:
		return errors.New("election: etcd client is nil")
	case c.Worker == nil:
		return errors.New("election: worker is nil")
	case c.Shards < 1 || c.Shards > 9999:
		return fmt.Errorf("election: --shards %d out of range 1..9999", c.Shards)
	case c.LeaseTTL < time.Second || c.LeaseTTL%time.Second != 0:
		return fmt.Errorf("election: --lease-ttl %s must be whole seconds, at least 1s", c.LeaseTTL)
	}
	if err := ValidReplicaID(c.ReplicaID); err != nil {
		return fmt.Errorf("election: --replica-id: %w", err)
	}
	if c.HandoverTimeout == 0 {
		c.HandoverTimeout = 2 * c.LeaseTTL
	}
	if c.Resync == 0 {
		c.Resync = c.LeaseTTL / 2
	}
	if c.Logger == nil {
		c.Logger = hclog.NewNullLogger()
	}
	return nil
}

// Node is one replica's membership, leadership and shard ownership.
type Node struct {
	cfg Config
	log hclog.Logger
	m   *metrics

	mu           sync.Mutex
	session      *Session
	leading      bool
	owned        map[int]int64 // shard -> token, shards whose worker runs
	assignedToMe int
	everReady    bool
	joined       bool // registered at least once: later config trouble is not fatal
	started      time.Time
}

// New validates the configuration and builds a Node.
func New(cfg Config) (*Node, error) {
	if err := cfg.validate(); err != nil {
		return nil, err
	}
	n := &Node{cfg: cfg, log: cfg.Logger, m: newMetrics(cfg.Registerer), owned: map[int]int64{}, started: time.Now()}
	n.m.shards.Set(float64(cfg.Shards))
	return n, nil
}

// IsLeader reports whether this replica currently leads, with a valid session.
func (n *Node) IsLeader() bool {
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.leading && n.session != nil && n.session.Valid()
}

// Owned lists the shards whose work runs here, sorted.
func (n *Node) Owned() []int {
	n.mu.Lock()
	defer n.mu.Unlock()
	out := make([]int, 0, len(n.owned))
	for s := range n.owned {
		out = append(out, s)
	}
	sort.Ints(out)
	return out
}

// SessionValid reports whether the current etcd session's local deadline is
// ahead.
func (n *Node) SessionValid() bool {
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.session != nil && n.session.Valid()
}

// InitialShardsAcquired reports whether, at some point since start, the
// replica owned every shard the leader assigned it (and at least one
// assignment was seen). It stays true afterwards.
func (n *Node) InitialShardsAcquired() bool {
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.everReady
}

// Run joins the cluster and keeps this replica's part in it until ctx ends:
// whenever a session ends it stops all shard work at once and joins again
// with a fresh lease. When ctx ends it hands its shards over (resigns,
// withdraws its membership, waits for the leader to move its shards and
// releases each after its work stopped), then revokes the lease.
//
// Run returns an error only for conditions a restart cannot fix, such as a
// cluster created with another shard count.
func (n *Node) Run(ctx context.Context) error {
	for {
		if ctx.Err() != nil {
			return nil
		}
		err := n.runSession(ctx)
		if errors.Is(err, ErrShardCount) || errors.Is(err, ErrBadConfig) {
			return err
		}
		if ctx.Err() != nil {
			return nil
		}
		if err != nil {
			n.log.Warn("session ended; rejoining with a fresh lease", "error", err)
		}
		// Back off briefly so a flapping etcd is not hammered.
		t := time.NewTimer(200 * time.Millisecond)
		select {
		case <-ctx.Done():
			t.Stop()
			return nil
		case <-t.C:
		}
	}
}

// ensureConfig writes the cluster config if absent and checks it otherwise.
func (n *Node) ensureConfig(ctx context.Context) error {
	want, _ := json.Marshal(ClusterConfig{Shards: n.cfg.Shards, Created: time.Now().UTC().Format(time.RFC3339)})
	key := n.cfg.Layout.Config()
	resp, err := n.cfg.Client.Txn(ctx).
		If(clientv3.Compare(clientv3.CreateRevision(key), "=", 0)).
		Then(clientv3.OpPut(key, string(want))).
		Else(clientv3.OpGet(key)).Commit()
	if err != nil {
		return fmt.Errorf("election: read cluster config: %w", err)
	}
	if resp.Succeeded {
		n.log.Info("created cluster config", "key", key, "shards", n.cfg.Shards)
		return nil
	}
	kvs := resp.Responses[0].GetResponseRange().Kvs
	if len(kvs) == 0 {
		return fmt.Errorf("election: cluster config %s vanished during read", key)
	}
	c, err := parseConfig(kvs[0].Value)
	if err != nil {
		n.m.anomalies.WithLabelValues("bad_config").Inc()
		return fmt.Errorf("%w: %s: %v (value %q)", ErrBadConfig, key, err, kvs[0].Value)
	}
	if c.Shards != n.cfg.Shards {
		n.m.anomalies.WithLabelValues("shard_count_mismatch").Inc()
		return fmt.Errorf("%w: cluster %s has %d shards, this replica is configured with %d", ErrShardCount, n.cfg.Layout.Root, c.Shards, n.cfg.Shards)
	}
	return nil
}

// ownership is the owner loop's record of one shard it holds or is taking.
type ownership struct {
	token   int64 // create revision of our owner key
	cancel  context.CancelFunc
	done    chan struct{} // closed when the worker returned
	err     error         // worker's return, valid after done
	release bool          // stopping for a handover; delete the key after done
	reason  string
}

func (n *Node) setSession(s *Session) {
	n.mu.Lock()
	n.session = s
	n.leading = false
	n.mu.Unlock()
}

// runSession is one lease's lifetime.
func (n *Node) runSession(ctx context.Context) error {
	cctx, cancel := context.WithTimeout(clientv3.WithRequireLeader(ctx), n.cfg.LeaseTTL)
	err := n.ensureConfig(cctx)
	cancel()
	switch {
	case err == nil:
	case errors.Is(err, ErrShardCount):
		return err
	case errors.Is(err, ErrBadConfig):
		// Refuse to start on it; once running, a config key someone broke
		// is reported but does not stop a working replica.
		n.mu.Lock()
		joined := n.joined
		n.mu.Unlock()
		if !joined {
			return err
		}
		n.log.Error("cluster config cannot be trusted; carrying on with the configured shard count", "error", err)
	default:
		return err // etcd unreachable: try again
	}
	sess, err := NewSession(context.WithoutCancel(ctx), n.cfg.Client, SessionConfig{TTL: n.cfg.LeaseTTL, Logger: n.log.Named("session")})
	if err != nil {
		return err
	}
	n.setSession(sess)
	n.m.sessions.Inc()
	lease := sess.Lease()
	log := n.log.With("lease", fmt.Sprintf("%x", lease))
	L := n.cfg.Layout
	info, _ := json.Marshal(MemberInfo{Addr: n.cfg.Addr, Started: n.started.UTC().Format(time.RFC3339Nano)})
	sctx := sess.Context()

	// Membership and candidacy in one transaction, so every other replica
	// sees our election key only together with the member key that vouches
	// for it.
	leaderKey := L.Leader(lease)
	put, err := n.cfg.Client.Txn(clientv3.WithRequireLeader(sctx)).Then(
		clientv3.OpPut(L.Member(n.cfg.ReplicaID), string(info), clientv3.WithLease(lease)),
		clientv3.OpPut(leaderKey, n.cfg.ReplicaID, clientv3.WithLease(lease)),
	).Commit()
	if err != nil {
		_ = sess.Close(context.Background())
		return fmt.Errorf("election: register member: %w", err)
	}
	leaderRev := put.Header.Revision
	n.mu.Lock()
	n.joined = true
	n.mu.Unlock()
	log.Info("joined cluster", "ttl", sess.TTL())

	w := newWatcher(n, L)
	trig := make(chan struct{}, 1)
	var wg sync.WaitGroup
	wg.Add(1)
	go func() { defer wg.Done(); w.run(sctx, trig) }()

	stopping := make(chan struct{})
	var stopOnce sync.Once
	go func() {
		select {
		case <-ctx.Done():
			stopOnce.Do(func() { close(stopping) })
		case <-sctx.Done():
		}
	}()

	err = n.ownerLoop(sctx, sess, w, trig, leaderKey, leaderRev, stopping)

	// Session over (expired, or graceful stop completed): nothing acts.
	sess.end(fmt.Errorf("%w: leaving", ErrSessionExpired))
	wg.Wait()
	n.mu.Lock()
	n.leading = false
	n.mu.Unlock()
	n.m.leader.Set(0)
	rctx, cancel := context.WithTimeout(context.Background(), n.cfg.LeaseTTL)
	defer cancel()
	if cerr := sess.Close(rctx); cerr != nil {
		log.Warn("revoking lease failed; its keys expire with the TTL", "error", cerr)
	}
	if err == nil {
		err = sess.Err()
	}
	if ctx.Err() != nil {
		return nil
	}
	n.m.expirations.Inc()
	return err
}

// ownerLoop runs leadership and ownership for one session until the session
// ends, or — after stopping closes — until every shard is handed over.
func (n *Node) ownerLoop(sctx context.Context, sess *Session, w *watcher, trig chan struct{}, leaderKey string, leaderRev int64, stopping chan struct{}) error {
	L := n.cfg.Layout
	me := n.cfg.ReplicaID
	lease := sess.Lease()
	owned := map[int]*ownership{}
	releasedAt := map[int]int64{} // shard -> revision of our release's delete
	finished := make(chan int, n.cfg.Shards)
	resync := time.NewTicker(n.cfg.Resync)
	defer resync.Stop()
	var handoverDeadline <-chan time.Time
	leaving := false
	resigned := false

	poke := func() {
		select {
		case trig <- struct{}{}:
		default:
		}
	}
	publish := func() {
		n.mu.Lock()
		n.owned = map[int]int64{}
		for s, o := range owned {
			if !o.release {
				n.owned[s] = o.token
			}
		}
		n.mu.Unlock()
		n.m.owned.Set(float64(len(owned)))
	}
	stopShard := func(s int, o *ownership, reason string, release bool) {
		if o.cancel == nil {
			return
		}
		o.cancel()
		o.cancel = nil
		o.release = release
		o.reason = reason
		n.m.losses.WithLabelValues(reason).Inc()
		n.log.Info("shard stopping", "shard", s, "reason", reason, "token", o.token)
	}
	// On exit: stop every worker at once and wait for them.
	defer func() {
		for s, o := range owned {
			stopShard(s, o, "session_ended", false)
		}
		for _, o := range owned {
			<-o.done
		}
		owned = map[int]*ownership{}
		publish()
	}()

	for {
		select {
		case <-sctx.Done():
			return context.Cause(sctx)
		case <-stopping:
			stopping = nil
			leaving = true
			handoverDeadline = time.After(n.cfg.HandoverTimeout)
			// Resign and withdraw membership in one step: the next leader
			// moves our shards away; we release each as it is reassigned.
			leavingInfo, _ := json.Marshal(MemberInfo{Addr: n.cfg.Addr, Started: n.started.UTC().Format(time.RFC3339Nano), Leaving: true})
			ops := []clientv3.Op{clientv3.OpPut(L.Member(me), string(leavingInfo), clientv3.WithLease(lease))}
			ops = append(ops, clientv3.OpDelete(leaderKey))
			ctx, cancel := context.WithTimeout(sctx, n.cfg.LeaseTTL)
			_, err := n.cfg.Client.Txn(ctx).Then(ops...).Commit()
			cancel()
			resigned = true
			n.mu.Lock()
			n.leading = false
			n.mu.Unlock()
			n.m.leader.Set(0)
			if err != nil {
				n.log.Warn("withdrawing membership failed", "error", err)
			}
			n.log.Info("handing shards over", "owned", len(owned))
		case <-handoverDeadline:
			n.log.Warn("handover timed out; releasing remaining shards", "owned", len(owned))
			for s, o := range owned {
				stopShard(s, o, "shutdown", true)
			}
			handoverDeadline = nil
		case s := <-finished:
			// Every worker that has finished by now, released together:
			// a handover of many shards must not queue their deletes.
			done := []int{s}
		drain:
			for {
				select {
				case s := <-finished:
					done = append(done, s)
				default:
					break drain
				}
			}
			var release []release
			for _, s := range done {
				o := owned[s]
				if o == nil {
					continue
				}
				if o.err != nil && o.reason == "" {
					n.m.losses.WithLabelValues("worker_error").Inc()
					n.log.Warn("shard worker stopped with an error; releasing", "shard", s, "error", o.err)
					o.release = true
				}
				if o.release || o.reason == "" {
					release = append(release, struct {
						shard int
						token int64
					}{s, o.token})
				}
				delete(owned, s)
			}
			for s, rev := range n.releaseAll(sctx, release) {
				releasedAt[s] = rev
			}
			publish()
		case <-resync.C:
		case <-trig:
		}
		if sctx.Err() != nil {
			return context.Cause(sctx)
		}
		v := w.snapshot()
		if v == nil {
			continue // no consistent view yet
		}

		// Leadership.
		if !resigned {
			n.lead(sctx, sess, v, leaderKey, leaderRev)
		}

		// Ownership.
		assignedToMe, ownedOK := 0, 0
		var toClaim []int
		for s := 0; s < n.cfg.Shards; s++ {
			desired := v.assign[s].value
			if !v.validOwner(kv{value: desired, lease: v.members[desired].lease, createRev: 1}) {
				desired = "" // names no member
			}
			if desired == me && !leaving {
				assignedToMe++
			}
			key := v.owners[s]
			o := owned[s]
			if o != nil {
				switch {
				case o.cancel == nil:
					// Stopping; wait for the worker.
				case v.rev >= o.token && (key.createRev != o.token || key.value != me || key.lease != lease):
					// (A view older than our claim has not seen our key yet.)
					// Deleted, recreated or rewritten by someone else.
					stopShard(s, o, "key_lost", false)
				case desired != me && desired != "":
					// The leader moved it: stop, wait for in-flight work,
					// then delete our key; the new owner is watching.
					stopShard(s, o, "reassigned", true)
				case leaving && len(v.memberIDs()) == 0:
					// Last replica standing: nobody to hand over to.
					stopShard(s, o, "shutdown", true)
				default:
					ownedOK++
				}
				continue
			}
			if key.createRev != 0 && key.lease == lease && key.value == me && v.rev >= releasedAt[s] {
				// Ours from this session, yet no worker runs: a release
				// whose delete failed. Drop it (and claim afresh if ours).
				n.deleteIf(sctx, L.Shard(s), key.modRev, "stale_own_key")
				continue
			}
			if desired != me {
				continue
			}
			if key.createRev != 0 {
				if !v.validOwner(key) {
					n.deleteIf(sctx, L.Shard(s), key.modRev, "invalid_owner_key")
				}
				continue // held by another owner: it releases, the watch wakes us
			}
			if !sess.Valid() || leaving {
				continue
			}
			toClaim = append(toClaim, s)
		}
		for s, token := range n.claimAll(sctx, toClaim, lease) {
			wctx, cancel := context.WithCancel(sctx)
			o := &ownership{token: token, cancel: cancel, done: make(chan struct{})}
			owned[s] = o
			n.m.acquisitions.Inc()
			go func(s int, o *ownership) {
				o.err = n.cfg.Worker.Own(wctx, s, token)
				close(o.done)
				finished <- s
			}(s, o)
			ownedOK++
		}
		publish()
		n.mu.Lock()
		n.assignedToMe = assignedToMe
		if !leaving && assignedToMe > 0 && ownedOK == assignedToMe && sess.Valid() {
			n.everReady = true
		}
		n.mu.Unlock()
		if leaving && len(owned) == 0 {
			return nil
		}
		_ = poke
	}
}

// release is a shard whose owner key we delete, guarded by its token.
type release = struct {
	shard int
	token int64
}

// releaseAll deletes our owner keys of the released shards, each guarded by
// its create revision, all at once. It returns the revision of each delete
// that succeeded; a failed one is logged (the key expires with the lease).
func (n *Node) releaseAll(ctx context.Context, rs []release) map[int]int64 {
	revs := make([]int64, len(rs))
	var wg sync.WaitGroup
	for i, r := range rs {
		wg.Go(func() {
			key := n.cfg.Layout.Shard(r.shard)
			cctx, cancel := context.WithTimeout(ctx, n.cfg.LeaseTTL)
			defer cancel()
			resp, err := n.cfg.Client.Txn(cctx).
				If(clientv3.Compare(clientv3.CreateRevision(key), "=", r.token)).
				Then(clientv3.OpDelete(key)).Commit()
			if err != nil {
				n.log.Warn("deleting released owner key failed; it expires with the lease", "shard", r.shard, "error", err)
				return
			}
			revs[i] = resp.Header.Revision
		})
	}
	wg.Wait()
	out := make(map[int]int64, len(rs))
	for i, r := range rs {
		if revs[i] != 0 {
			out[r.shard] = revs[i]
		}
	}
	return out
}

// claimAll claims the shards at once (each its own transaction, in flight
// together) and returns the token of each claim that succeeded.
func (n *Node) claimAll(ctx context.Context, shards []int, lease clientv3.LeaseID) map[int]int64 {
	tokens := make([]int64, len(shards))
	var wg sync.WaitGroup
	for i, s := range shards {
		wg.Go(func() {
			if t, ok := n.claim(ctx, s, lease); ok {
				tokens[i] = t
			}
		})
	}
	wg.Wait()
	out := make(map[int]int64, len(shards))
	for i, s := range shards {
		if tokens[i] != 0 {
			out[s] = tokens[i]
		}
	}
	return out
}

// claim creates the shard's owner key if absent, bound to our lease. The
// key's create revision is the fencing token.
func (n *Node) claim(ctx context.Context, s int, lease clientv3.LeaseID) (int64, bool) {
	key := n.cfg.Layout.Shard(s)
	cctx, cancel := context.WithTimeout(clientv3.WithRequireLeader(ctx), n.cfg.LeaseTTL/2)
	defer cancel()
	resp, err := n.cfg.Client.Txn(cctx).
		If(clientv3.Compare(clientv3.CreateRevision(key), "=", 0)).
		Then(clientv3.OpPut(key, n.cfg.ReplicaID, clientv3.WithLease(lease))).Commit()
	if err != nil {
		n.log.Warn("claim failed", "shard", s, "error", err)
		return 0, false
	}
	if !resp.Succeeded {
		return 0, false
	}
	n.log.Debug("claimed shard", "shard", s, "token", resp.Header.Revision)
	return resp.Header.Revision, true
}

// deleteIf deletes a key that is not trustworthy, only if unchanged since
// it was judged.
func (n *Node) deleteIf(ctx context.Context, key string, modRev int64, kind string) {
	n.m.anomalies.WithLabelValues(kind).Inc()
	n.log.Warn("removing untrusted key", "key", key, "kind", kind)
	cctx, cancel := context.WithTimeout(clientv3.WithRequireLeader(ctx), n.cfg.LeaseTTL/2)
	defer cancel()
	_, err := n.cfg.Client.Txn(cctx).
		If(clientv3.Compare(clientv3.ModRevision(key), "=", modRev)).
		Then(clientv3.OpDelete(key)).Commit()
	if err != nil {
		n.log.Warn("removing untrusted key failed", "key", key, "error", err)
	}
}

// lead runs one round of leadership: if our election key is the oldest, the
// desired owners are recomputed and written, each write guarded by the
// election key's create revision.
func (n *Node) lead(ctx context.Context, sess *Session, v *view, leaderKey string, leaderRev int64) {
	key, top, ok := v.leader()
	if ok && key != leaderKey && !v.validOwner(top) {
		// An election key no member vouches for blocks every election.
		n.deleteIf(ctx, key, top.modRev, "invalid_leader_key")
		return
	}
	isLeader := ok && key == leaderKey && top.createRev == leaderRev && sess.Valid()
	n.mu.Lock()
	was := n.leading
	n.leading = isLeader
	n.mu.Unlock()
	if isLeader != was {
		n.log.Info("leadership changed", "leader", isLeader)
	}
	if !isLeader {
		n.m.leader.Set(0)
		return
	}
	n.m.leader.Set(1)

	members := v.memberIDs()
	current := make([]string, n.cfg.Shards)
	for s := range current {
		if a := v.assign[s].value; v.members[a].lease != 0 {
			current[s] = a
		} else if v.validOwner(v.owners[s]) {
			current[s] = v.owners[s].value
		}
	}
	desired := shard.Assign(n.cfg.Shards, members, current)
	var ops []clientv3.Op
	for s, d := range desired {
		if v.assign[s].value != d || v.assign[s].createRev == 0 {
			if d == "" {
				if v.assign[s].createRev != 0 {
					ops = append(ops, clientv3.OpDelete(n.cfg.Layout.Assign(s)))
				}
				continue
			}
			ops = append(ops, clientv3.OpPut(n.cfg.Layout.Assign(s), d))
		}
	}
	if len(ops) == 0 {
		return
	}
	const chunk = 100 // under etcd's default --max-txn-ops of 128
	for i := 0; i < len(ops); i += chunk {
		end := min(i+chunk, len(ops))
		cctx, cancel := context.WithTimeout(clientv3.WithRequireLeader(ctx), n.cfg.LeaseTTL/2)
		resp, err := n.cfg.Client.Txn(cctx).
			If(clientv3.Compare(clientv3.CreateRevision(leaderKey), "=", leaderRev)).
			Then(ops[i:end]...).Commit()
		cancel()
		if err != nil {
			n.log.Warn("writing assignment failed", "error", err)
			return
		}
		if !resp.Succeeded {
			n.log.Warn("election key gone; not writing the assignment")
			n.mu.Lock()
			n.leading = false
			n.mu.Unlock()
			n.m.leader.Set(0)
			return
		}
	}
	n.m.assignments.Inc()
	n.log.Info("assignment written", "members", len(members), "changed", len(ops))
}
