package election

import (
	"context"
	"sync"

	clientv3 "go.etcd.io/etcd/client/v3"
)

// The owner loop's etcd writes, each one transaction guarded by a compare.

// release is a shard whose owner key we delete, guarded by its token.
type release struct {
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
// it was judged, and counts the anomaly.
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
