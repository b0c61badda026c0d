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
	"slices"
	"sync"
	"sync/atomic"
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

// DefaultLeaseTTL is the default etcd lease TTL of a replica.
const DefaultLeaseTTL = 10 * time.Second

// ValidLeaseTTL checks a lease TTL: etcd grants whole seconds.
func ValidLeaseTTL(d time.Duration) error {
	if d < time.Second || d%time.Second != 0 {
		return fmt.Errorf("lease TTL %s must be whole seconds, at least 1s", d)
	}
	return nil
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
	}
	if err := shard.ValidCount(c.Shards); err != nil {
		return fmt.Errorf("election: --shards: %w", err)
	}
	if err := ValidLeaseTTL(c.LeaseTTL); err != nil {
		return fmt.Errorf("election: --lease-ttl: %w", err)
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

// Node is one replica's membership, leadership and shard ownership. Its
// state is written by the session goroutine (Run) alone and read by anyone
// through the accessors, each field on its own.
type Node struct {
	cfg     Config
	log     hclog.Logger
	m       *metrics
	started time.Time

	session   atomic.Pointer[Session]
	leading   atomic.Bool           // see setLeading
	owned     atomic.Pointer[[]int] // sorted shards whose work runs
	everReady atomic.Bool
	joined    bool // registered at least once: later config trouble is not fatal (Run's goroutine only)
}

// New validates the configuration and builds a Node.
func New(cfg Config) (*Node, error) {
	if err := cfg.validate(); err != nil {
		return nil, err
	}
	n := &Node{cfg: cfg, log: cfg.Logger, m: newMetrics(cfg.Registerer), started: time.Now()}
	n.owned.Store(&[]int{})
	n.m.shards.Set(float64(cfg.Shards))
	return n, nil
}

// IsLeader reports whether this replica currently leads, with a valid session.
func (n *Node) IsLeader() bool { return n.leading.Load() && n.SessionValid() }

// setLeading is the one place leadership changes: the session goroutine
// calls it as it wins or loses the election key's place, and when its
// session ends.
func (n *Node) setLeading(leading bool) {
	if n.leading.Swap(leading) != leading {
		n.log.Info("leadership changed", "leader", leading)
	}
	if leading {
		n.m.leader.Set(1)
	} else {
		n.m.leader.Set(0)
	}
}

// Owned lists the shards whose work runs here, sorted.
func (n *Node) Owned() []int { return slices.Clone(*n.owned.Load()) }

// SessionValid reports whether the current etcd session's local deadline is
// ahead.
func (n *Node) SessionValid() bool {
	s := n.session.Load()
	return s != nil && s.Valid()
}

// InitialShardsAcquired reports whether, at some point since start, the
// replica owned every shard the leader assigned it (and at least one
// assignment was seen). It stays true afterwards.
func (n *Node) InitialShardsAcquired() bool { return n.everReady.Load() }

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
		n.m.anomalies.WithLabelValues(anomalyBadConfig).Inc()
		return fmt.Errorf("%w: %s: %v (value %q)", ErrBadConfig, key, err, kvs[0].Value)
	}
	if c.Shards != n.cfg.Shards {
		n.m.anomalies.WithLabelValues(anomalyShardCount).Inc()
		return fmt.Errorf("%w: cluster %s has %d shards, this replica is configured with %d", ErrShardCount, n.cfg.Layout.Root, c.Shards, n.cfg.Shards)
	}
	return nil
}

// runSession is one lease's lifetime: join, run the owner loop until the
// session ends (or, once ctx ended, until every shard is handed over), then
// revoke the lease.
func (n *Node) runSession(ctx context.Context) error {
	if err := n.checkConfig(ctx); err != nil {
		return err
	}
	n.revokePrevious(ctx)
	sess, err := NewSession(context.WithoutCancel(ctx), n.cfg.Client, SessionConfig{TTL: n.cfg.LeaseTTL, Logger: n.log.Named("session")})
	if err != nil {
		return err
	}
	n.session.Store(sess)
	n.setLeading(false)
	n.m.sessions.Inc()
	log := n.log.With("lease", fmt.Sprintf("%x", sess.Lease()))
	leaderRev, err := n.join(sess)
	if err != nil {
		_ = sess.Close(context.Background())
		return err
	}
	n.joined = true
	log.Info("joined cluster", "ttl", sess.TTL())

	sctx := sess.Context()
	o := newOwner(n, sess, leaderRev)
	var wg sync.WaitGroup
	wg.Go(func() { o.w.run(sctx, o.trig) })
	err = o.run(sctx, stopSignal(ctx, sctx))

	// Session over (expired, or graceful stop completed): nothing acts.
	sess.end(fmt.Errorf("%w: leaving", ErrSessionExpired))
	wg.Wait()
	n.setLeading(false)
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

// checkConfig writes or checks the cluster config before a session. A bad
// config key refuses the first join; once running, it is reported and the
// configured shard count kept.
func (n *Node) checkConfig(ctx context.Context) error {
	cctx, cancel := context.WithTimeout(clientv3.WithRequireLeader(ctx), n.cfg.LeaseTTL)
	err := n.ensureConfig(cctx)
	cancel()
	if errors.Is(err, ErrBadConfig) && n.joined {
		n.log.Error("cluster config cannot be trusted; carrying on with the configured shard count", "error", err)
		return nil
	}
	return err // nil, ErrShardCount, ErrBadConfig, or etcd unreachable: try again
}

// revokePrevious revokes the lease of a member key under this replica's id
// that is still there before it joins: a previous incarnation (a restart
// with a stable --replica-id, or a session of this process that ended while
// etcd could not be reached) that nobody else may have noticed is gone. Its
// owner keys go with it, so its shards move at once. Failures are logged:
// the lease then expires with its TTL.
func (n *Node) revokePrevious(ctx context.Context) {
	cctx, cancel := context.WithTimeout(clientv3.WithRequireLeader(ctx), n.cfg.LeaseTTL/2)
	defer cancel()
	resp, err := n.cfg.Client.Get(cctx, n.cfg.Layout.Member(n.cfg.ReplicaID))
	if err != nil || len(resp.Kvs) == 0 || resp.Kvs[0].Lease == 0 {
		return
	}
	lease := clientv3.LeaseID(resp.Kvs[0].Lease)
	if _, err := n.cfg.Client.Revoke(cctx, lease); err != nil && !isLeaseGone(err) {
		n.log.Warn("revoking this replica's previous lease failed; it expires with its TTL", "lease", fmt.Sprintf("%x", lease), "error", err)
		return
	}
	n.m.peerRevocations.WithLabelValues("revoked").Inc()
	n.log.Info("revoked this replica's previous lease", "lease", fmt.Sprintf("%x", lease))
}

// join writes the member key and the election key in one transaction, both
// bound to the session's lease, so every other replica sees the election key
// only together with the member key that vouches for it. It returns the
// election key's create revision.
func (n *Node) join(sess *Session) (int64, error) {
	info, _ := json.Marshal(MemberInfo{Addr: n.cfg.Addr, Started: n.started.UTC().Format(time.RFC3339Nano)})
	L, lease := n.cfg.Layout, sess.Lease()
	put, err := n.cfg.Client.Txn(clientv3.WithRequireLeader(sess.Context())).Then(
		clientv3.OpPut(L.Member(n.cfg.ReplicaID), string(info), clientv3.WithLease(lease)),
		clientv3.OpPut(L.Leader(lease), n.cfg.ReplicaID, clientv3.WithLease(lease)),
	).Commit()
	if err != nil {
		return 0, fmt.Errorf("election: register member: %w", err)
	}
	return put.Header.Revision, nil
}

// stopSignal closes when ctx ends (a graceful stop), never when only the
// session ended.
func stopSignal(ctx, sctx context.Context) <-chan struct{} {
	stop := make(chan struct{})
	go func() {
		select {
		case <-ctx.Done():
			close(stop)
		case <-sctx.Done():
		}
	}()
	return stop
}
