package election

import (
	"context"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/vigil-sh/vigil/shard"
)

// Leadership, like etcd's concurrency.Election, is compared on one revision:
// the election key with the lowest create revision leads, and every write of
// the leader is guarded by its own election key's create revision, so a
// deposed leader cannot write. The leader only assigns; it never reconciles
// by virtue of leading.

// lead runs one round of leadership on a snapshot: it judges whether we lead
// (and removes an untrusted election key that blocks every election), and if
// we do, writes the assignments that changed.
func (o *owner) lead(ctx context.Context, v *view) {
	key, top, ok := v.leader()
	if ok && key != o.leaderKey && !v.validOwner(top) {
		o.n.deleteIf(ctx, key, top.modRev, anomalyBadLeader)
		return
	}
	leading := ok && key == o.leaderKey && top.createRev == o.leaderRev && o.sess.Valid()
	o.n.setLeading(leading)
	if !leading {
		return
	}
	ops := assignmentOps(v, o.n.cfg.Shards)
	if len(ops) == 0 {
		return
	}
	if o.writeAssignment(ctx, ops) {
		o.n.m.assignments.Inc()
		o.n.log.Info("assignment written", "members", len(v.memberIDs()), "changed", len(ops))
	}
}

// assignmentOps are the writes that bring the assign keys to shard.Assign's
// answer for the view's members, given the current owners (assignments
// naming a member, else the trusted owner keys).
func assignmentOps(v *view, shards int) []clientv3.Op {
	current := make([]string, shards)
	for s := range current {
		if a := v.assign[s].value; v.memberLease(a) != 0 {
			current[s] = a
		} else if v.validOwner(v.owners[s]) {
			current[s] = v.owners[s].value
		}
	}
	var ops []clientv3.Op
	for s, d := range shard.Assign(shards, v.memberIDs(), current) {
		switch {
		case v.assign[s].value == d && v.assign[s].createRev != 0:
		case d != "":
			ops = append(ops, clientv3.OpPut(v.layout.Assign(s), d))
		case v.assign[s].createRev != 0:
			ops = append(ops, clientv3.OpDelete(v.layout.Assign(s)))
		}
	}
	return ops
}

// maxTxnOps keeps a transaction under etcd's default --max-txn-ops of 128.
const maxTxnOps = 100

// writeAssignment writes ops in transactions guarded by our election key's
// create revision. It reports whether all committed; a failed compare means
// we no longer lead.
func (o *owner) writeAssignment(ctx context.Context, ops []clientv3.Op) bool {
	for i := 0; i < len(ops); i += maxTxnOps {
		cctx, cancel := context.WithTimeout(clientv3.WithRequireLeader(ctx), o.n.cfg.LeaseTTL/2)
		resp, err := o.n.cfg.Client.Txn(cctx).
			If(clientv3.Compare(clientv3.CreateRevision(o.leaderKey), "=", o.leaderRev)).
			Then(ops[i:min(i+maxTxnOps, len(ops))]...).Commit()
		cancel()
		if err != nil {
			o.n.log.Warn("writing assignment failed", "error", err)
			return false
		}
		if !resp.Succeeded {
			o.n.log.Warn("election key gone; not writing the assignment")
			o.n.setLeading(false)
			return false
		}
	}
	return true
}
