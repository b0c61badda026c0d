package election

import (
	"context"
	"sync"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/vigil-sh/vigil/internal/trigger"
)

// watcher keeps a view of the cluster's keys current with one watch on the
// cluster root, re-reading everything whenever the watch breaks.
type watcher struct {
	n      *Node
	layout Layout

	mu   sync.Mutex
	view *view // nil until the first full read
}

func newWatcher(n *Node, layout Layout) *watcher { return &watcher{n: n, layout: layout} }

// snapshot returns a copy of the current view, nil before the first read.
func (w *watcher) snapshot() *view {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.view == nil {
		return nil
	}
	return w.view.clone()
}

func (w *watcher) report(v *view) {
	for _, a := range v.anomalies {
		w.n.m.anomalies.WithLabelValues(a.kind).Inc()
		w.n.log.Warn("unexpected key under the cluster prefix", "kind", a.kind, "key", a.key, "detail", a.detail)
	}
	v.anomalies = nil
}

// run reads and watches until ctx ends, firing trig after every change.
func (w *watcher) run(ctx context.Context, trig *trigger.T) {
	cli := w.n.cfg.Client
	root := w.layout.Root + "/"
	for ctx.Err() == nil {
		gctx, cancel := context.WithTimeout(clientv3.WithRequireLeader(ctx), w.n.cfg.LeaseTTL)
		resp, err := cli.Get(gctx, root, clientv3.WithPrefix())
		cancel()
		if err != nil {
			w.n.log.Debug("reading cluster keys failed", "error", err)
			if !sleepCtx(ctx, 100*time.Millisecond) {
				return
			}
			continue
		}
		v := newView(w.layout, w.n.cfg.Shards)
		for _, k := range resp.Kvs {
			v.apply(string(k.Key), true, kv{value: string(k.Value), lease: clientv3.LeaseID(k.Lease), createRev: k.CreateRevision, modRev: k.ModRevision})
		}
		v.rev = resp.Header.Revision
		w.report(v)
		w.mu.Lock()
		w.view = v
		w.mu.Unlock()
		trig.Fire()

		wctx, wcancel := context.WithCancel(clientv3.WithRequireLeader(ctx))
		wch := cli.Watch(wctx, root, clientv3.WithPrefix(), clientv3.WithRev(v.rev+1))
		for wr := range wch {
			if err := wr.Err(); err != nil {
				w.n.log.Debug("cluster watch broke; re-reading", "error", err)
				break
			}
			if wr.Canceled {
				break
			}
			w.mu.Lock()
			for _, ev := range wr.Events {
				w.view.applyEvent(ev)
			}
			w.view.rev = wr.Header.Revision
			w.report(w.view)
			w.mu.Unlock()
			trig.Fire()
		}
		wcancel()
		// Drain so the watcher goroutines end before we re-read.
		for range wch {
		}
		if !sleepCtx(ctx, 50*time.Millisecond) {
			return
		}
	}
}

func sleepCtx(ctx context.Context, d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return false
	case <-t.C:
		return true
	}
}
