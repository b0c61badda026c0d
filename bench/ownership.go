package main

// The bench's view of a cluster's ownership: one etcd watch on the cluster
// root (SPEC §3.1 layout), recording every owner-key change with the time it
// arrived. etcd runs in this process, so arrival times are commit times to
// within the watch's delivery latency.

import (
	"context"
	"fmt"
	"strconv"
	"strings"
	"sync"
	"time"

	"go.etcd.io/etcd/api/v3/mvccpb"
	clientv3 "go.etcd.io/etcd/client/v3"
)

type ownerEvent struct {
	at    time.Time
	put   bool
	owner string // PUT: the new owner; DELETE: the owner whose key went
}

type ownership struct {
	shardsPrefix, leaderPrefix string

	mu      sync.Mutex
	owners  []string            // by shard; "" when unowned
	leaders map[string]leaderKv // election key -> replica and create revision
	history [][]ownerEvent      // by shard
	err     error
	changed chan struct{} // closed and replaced on every change
}

type leaderKv struct {
	replica   string
	createRev int64
}

// watchOwnership reads the cluster's current keys and follows every change
// until ctx ends.
func watchOwnership(ctx context.Context, cli *clientv3.Client, cluster string, shards int) (*ownership, error) {
	root := etcdPrefix + "/" + cluster + "/"
	o := &ownership{
		shardsPrefix: root + "shards/", leaderPrefix: root + "leader/",
		owners: make([]string, shards), leaders: map[string]leaderKv{},
		history: make([][]ownerEvent, shards), changed: make(chan struct{}),
	}
	gctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	resp, err := cli.Get(gctx, root, clientv3.WithPrefix())
	cancel()
	if err != nil {
		return nil, fmt.Errorf("read %s: %w", root, err)
	}
	now := time.Now()
	for _, kv := range resp.Kvs {
		o.apply(now, true, kv)
	}
	wch := cli.Watch(ctx, root, clientv3.WithPrefix(), clientv3.WithRev(resp.Header.Revision+1), clientv3.WithPrevKV())
	go func() {
		for wr := range wch {
			at := time.Now()
			o.mu.Lock()
			if err := wr.Err(); err != nil && o.err == nil {
				o.err = fmt.Errorf("watch %s: %w", root, err)
			}
			for _, ev := range wr.Events {
				o.applyLocked(at, ev.Type == mvccpb.PUT, ev.Kv)
			}
			o.notifyLocked()
			o.mu.Unlock()
		}
	}()
	return o, nil
}

func (o *ownership) apply(at time.Time, put bool, kv *mvccpb.KeyValue) {
	o.mu.Lock()
	defer o.mu.Unlock()
	o.applyLocked(at, put, kv)
}

func (o *ownership) applyLocked(at time.Time, put bool, kv *mvccpb.KeyValue) {
	key := string(kv.Key)
	switch {
	case strings.HasPrefix(key, o.shardsPrefix):
		s, err := strconv.Atoi(strings.TrimPrefix(key, o.shardsPrefix))
		if err != nil || s < 0 || s >= len(o.owners) {
			return
		}
		ev := ownerEvent{at: at, put: put, owner: o.owners[s]}
		if put {
			ev.owner = string(kv.Value)
			o.owners[s] = ev.owner
		} else {
			o.owners[s] = ""
		}
		o.history[s] = append(o.history[s], ev)
	case strings.HasPrefix(key, o.leaderPrefix):
		if put {
			o.leaders[key] = leaderKv{replica: string(kv.Value), createRev: kv.CreateRevision}
		} else {
			delete(o.leaders, key)
		}
	}
}

func (o *ownership) notifyLocked() {
	close(o.changed)
	o.changed = make(chan struct{})
}

// state is the current owner of every shard, the leader, and the watch's
// error if it failed.
func (o *ownership) state() (owners []string, leader string, err error) {
	o.mu.Lock()
	defer o.mu.Unlock()
	var best int64
	for _, l := range o.leaders {
		if leader == "" || l.createRev < best {
			leader, best = l.replica, l.createRev
		}
	}
	return append([]string(nil), o.owners...), leader, o.err
}

// events returns a copy of shard s's events at or after t.
func (o *ownership) events(s int, t time.Time) []ownerEvent {
	o.mu.Lock()
	defer o.mu.Unlock()
	var out []ownerEvent
	for _, ev := range o.history[s] {
		if !ev.at.Before(t) {
			out = append(out, ev)
		}
	}
	return out
}

// owned lists the shards id owns now.
func owned(owners []string, id string) []int {
	var out []int
	for s, o := range owners {
		if o == id {
			out = append(out, s)
		}
	}
	return out
}

// settled reports whether every shard is owned by one of ids and the
// ownership is balanced exactly (⌊S/N⌋ or ⌈S/N⌉ each).
func settled(owners []string, ids []string) (bool, string) {
	want := map[string]int{}
	for _, id := range ids {
		want[id] = 0
	}
	unowned := 0
	for s, o := range owners {
		if o == "" {
			unowned++
			continue
		}
		if _, ok := want[o]; !ok {
			return false, fmt.Sprintf("shard %d owned by %s, not a live replica", s, o)
		}
		want[o]++
	}
	if unowned > 0 {
		return false, fmt.Sprintf("%d shards unowned", unowned)
	}
	lo, hi := len(owners)/len(ids), (len(owners)+len(ids)-1)/len(ids)
	for id, n := range want {
		if n < lo || n > hi {
			return false, fmt.Sprintf("%s owns %d shards, want %d..%d", id, n, lo, hi)
		}
	}
	return true, ""
}
