package election

import (
	"context"
	"encoding/json"
	"slices"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/vigil-sh/vigil/internal/trigger"
)

// owner is one session's owner loop: it alone holds the shards' workers and
// leadership for the session. Its loop receives an event, then snapshots the
// view, leads, plans and executes (reconcile). Every field is the loop
// goroutine's; workers report back only through finished.
type owner struct {
	n         *Node
	sess      *Session
	w         *watcher
	trig      *trigger.T // the watch fires it after every change
	peers     *observer  // the other replicas' processes
	leaderKey string
	leaderRev int64 // our election key's create revision

	shards     map[int]*ownership
	releasedAt map[int]int64 // shard -> revision of our release's delete
	// finished receives a shard each time its worker returns. One slot per
	// shard: a worker never blocks on a loop that has stopped listening.
	finished chan int
	leaving  bool             // handing over: claim nothing
	resigned bool             // our election key is deleted: lead no more
	handover <-chan time.Time // the handover's deadline, once leaving
}

// ownership is one shard whose worker this replica runs.
type ownership struct {
	token   int64              // create revision of our owner key
	cancel  context.CancelFunc // nil once told to stop
	done    chan struct{}      // closed when the worker returned
	err     error              // the worker's return, valid after done
	release bool               // stopping for a handover: delete the key after done
	reason  string             // why it is stopping ("" while it runs)
}

func newOwner(n *Node, sess *Session, leaderRev int64) *owner {
	return &owner{
		n: n, sess: sess, w: newWatcher(n, n.cfg.Layout), trig: trigger.New(), peers: newObserver(n, sess),
		leaderKey: n.cfg.Layout.Leader(sess.Lease()), leaderRev: leaderRev,
		shards: map[int]*ownership{}, releasedAt: map[int]int64{}, finished: make(chan int, n.cfg.Shards),
	}
}

// run is the owner loop. It returns the session's end cause when the
// session ends, or nil once stop closed and every shard was handed over.
// On return every worker has stopped.
func (o *owner) run(sctx context.Context, stop <-chan struct{}) error {
	resync := time.NewTicker(o.n.cfg.Resync)
	defer resync.Stop()
	defer o.stopAll()
	defer o.peers.stop()
	for {
		select {
		case <-sctx.Done():
			return context.Cause(sctx)
		case <-stop:
			stop = nil
			o.leave(sctx)
		case <-o.handover:
			o.handoverTimedOut()
		case s := <-o.finished:
			o.collect(sctx, s)
		case <-resync.C:
		case <-o.trig.C():
		}
		if sctx.Err() != nil {
			return context.Cause(sctx)
		}
		if o.reconcile(sctx) && o.leaving && len(o.shards) == 0 {
			return nil
		}
	}
}

// reconcile takes a snapshot of the view, leads, then plans and executes
// the ownership steps. It reports false when there is no view yet.
func (o *owner) reconcile(sctx context.Context) bool {
	v := o.w.snapshot()
	if v == nil {
		return false
	}
	if !o.resigned {
		o.lead(sctx, v)
	}
	o.peers.update(sctx, peerTargets(v, o.n.cfg.ReplicaID))
	p := plan(v, o.planInput())
	started := o.execute(sctx, p.steps)
	o.publish()
	if !o.leaving && p.assigned > 0 && p.kept+started == p.assigned && o.sess.Valid() {
		o.n.everReady.Store(true)
	}
	return true
}

func (o *owner) planInput() planInput {
	in := planInput{me: o.n.cfg.ReplicaID, lease: o.sess.Lease(), leaving: o.leaving, valid: o.sess.Valid(),
		held: make(map[int]held, len(o.shards)), releasedAt: o.releasedAt}
	for s, x := range o.shards {
		in.held[s] = held{token: x.token, stopping: x.cancel == nil}
	}
	return in
}

// execute carries out the plan's steps; claims go out together. It returns
// how many workers it started.
func (o *owner) execute(sctx context.Context, steps []step) int {
	var claims []int
	for _, st := range steps {
		switch st.kind {
		case stepStop:
			o.stop(st.shard, st.reason, st.release)
		case stepDeleteKey:
			o.n.deleteIf(sctx, st.key, st.modRev, st.reason)
		case stepClaim:
			claims = append(claims, st.shard)
		}
	}
	tokens := o.n.claimAll(sctx, claims, o.sess.Lease())
	for s, token := range tokens {
		o.start(sctx, s, token)
	}
	return len(tokens)
}

// start runs the shard's worker under token.
func (o *owner) start(sctx context.Context, s int, token int64) {
	wctx, cancel := context.WithCancel(sctx)
	x := &ownership{token: token, cancel: cancel, done: make(chan struct{})}
	o.shards[s] = x
	o.n.m.acquisitions.Inc()
	go func() {
		x.err = o.n.cfg.Worker.Own(wctx, s, token)
		close(x.done)
		o.finished <- s
	}()
}

// stop tells the shard's worker to stop; the loop collects it when it
// returned. Stopping twice is a no-op.
func (o *owner) stop(s int, reason string, release bool) {
	x := o.shards[s]
	if x == nil || x.cancel == nil {
		return
	}
	x.cancel()
	x.cancel, x.release, x.reason = nil, release, reason
	o.n.m.losses.WithLabelValues(reason).Inc()
	o.n.log.Info("shard stopping", "shard", s, "reason", reason, "token", x.token)
}

// collect forgets the workers that have returned (s, and every other one by
// now) and deletes the owner keys of those released, all together: a
// handover of many shards must not queue their deletes.
func (o *owner) collect(sctx context.Context, s int) {
	done := []int{s}
	for more := true; more; {
		select {
		case s := <-o.finished:
			done = append(done, s)
		default:
			more = false
		}
	}
	var rs []release
	for _, s := range done {
		x := o.shards[s]
		if x == nil {
			continue
		}
		if x.err != nil && x.reason == "" {
			o.n.m.losses.WithLabelValues(lossWorkerError).Inc()
			o.n.log.Warn("shard worker stopped with an error; releasing", "shard", s, "error", x.err)
			x.release = true
		}
		if x.release || x.reason == "" {
			rs = append(rs, release{shard: s, token: x.token})
		}
		delete(o.shards, s)
	}
	for s, rev := range o.n.releaseAll(sctx, rs) {
		o.releasedAt[s] = rev
	}
	o.publish()
}

// leave starts a graceful stop: resign and withdraw membership in one
// transaction (the member key rewritten with "leaving", still bound to our
// lease); the next leader moves our shards away and we release each as it
// is reassigned, until the handover deadline.
func (o *owner) leave(sctx context.Context) {
	o.leaving, o.resigned = true, true
	o.handover = time.After(o.n.cfg.HandoverTimeout)
	n := o.n
	info, _ := json.Marshal(MemberInfo{Addr: n.cfg.Addr, Started: n.started.UTC().Format(time.RFC3339Nano), Leaving: true})
	ctx, cancel := context.WithTimeout(sctx, n.cfg.LeaseTTL)
	_, err := n.cfg.Client.Txn(ctx).Then(
		clientv3.OpPut(n.cfg.Layout.Member(n.cfg.ReplicaID), string(info), clientv3.WithLease(o.sess.Lease())),
		clientv3.OpDelete(o.leaderKey),
	).Commit()
	cancel()
	n.setLeading(false)
	if err != nil {
		n.log.Warn("withdrawing membership failed", "error", err)
	}
	n.log.Info("handing shards over", "owned", len(o.shards))
}

// handoverTimedOut releases what the leader did not move in time.
func (o *owner) handoverTimedOut() {
	o.n.log.Warn("handover timed out; releasing remaining shards", "owned", len(o.shards))
	for s := range o.shards {
		o.stop(s, lossShutdown, true)
	}
	o.handover = nil
}

// stopAll stops every worker at once and waits for them: the session is
// over, their keys go with the lease.
func (o *owner) stopAll() {
	for s := range o.shards {
		o.stop(s, lossSessionEnded, false)
	}
	for _, x := range o.shards {
		<-x.done
	}
	clear(o.shards)
	o.publish()
}

// publish shows the shards whose work runs (not those stopping for a
// handover) to Owned and vigil_shards_owned.
func (o *owner) publish() {
	owned := make([]int, 0, len(o.shards))
	for s, x := range o.shards {
		if !x.release {
			owned = append(owned, s)
		}
	}
	slices.Sort(owned)
	o.n.owned.Store(&owned)
	o.n.m.owned.Set(float64(len(o.shards)))
}
