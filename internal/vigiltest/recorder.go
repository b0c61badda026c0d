package vigiltest

import (
	"context"
	"errors"
	"fmt"
	"sort"
	"strings"
	"sync"
	"time"

	"go.etcd.io/etcd/api/v3/mvccpb"
	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/vigil-sh/vigil/election"
	"github.com/vigil-sh/vigil/shard"
)

// OwnerKey is an owner (or election) key as last seen.
type OwnerKey struct {
	Value     string // the replica id
	CreateRev int64  // the fencing token of an owner key
	Lease     int64
}

// ShardEvent is one change of a shard's owner key.
type ShardEvent struct {
	At        time.Time // when the watch delivered it
	Rev       int64     // the revision of the change
	Put       bool
	Value     string // PUT: the new owner; DELETE: the owner whose key went
	CreateRev int64  // the key's create revision (the fencing token)
	Lease     int64
}

func (e ShardEvent) String() string {
	op := "DELETE"
	if e.Put {
		op = "PUT"
	}
	return fmt.Sprintf("%s rev %d %s %s token %d", e.At.Format("15:04:05.000"), e.Rev, op, e.Value, e.CreateRev)
}

// Recorder watches everything under a cluster's etcd root from the moment
// it starts and keeps the current owners, assignment, members and election
// keys, plus every owner-key change per shard with its revision and the
// time it was seen. The watch resumes from the last revision seen when its
// stream fails (a member killed, its leader lost), so no change is missed;
// only a compaction past that revision is fatal (Err).
type Recorder struct {
	layout election.Layout
	shards int

	mu         sync.Mutex
	owners     []OwnerKey
	assign     []string
	members    map[string]int64    // id -> lease
	leaders    map[string]OwnerKey // election key -> (replica, create revision, lease)
	hist       [][]ShardEvent      // by shard
	violations []string
	rev        int64
	resumes    int
	err        error
	changed    chan struct{}

	cancel context.CancelFunc
	done   chan struct{}
}

// NewRecorder reads the cluster root and starts watching it through cli.
func NewRecorder(ctx context.Context, cli *clientv3.Client, layout election.Layout, shards int) (*Recorder, error) {
	r := &Recorder{
		layout: layout, shards: shards,
		owners: make([]OwnerKey, shards), assign: make([]string, shards),
		members: map[string]int64{}, leaders: map[string]OwnerKey{},
		hist: make([][]ShardEvent, shards), changed: make(chan struct{}),
		done: make(chan struct{}),
	}
	gctx, gcancel := context.WithTimeout(ctx, 10*time.Second)
	resp, err := cli.Get(gctx, layout.Root+"/", clientv3.WithPrefix())
	gcancel()
	if err != nil {
		return nil, fmt.Errorf("recorder: read %s: %w", layout.Root, err)
	}
	now := time.Now()
	r.mu.Lock()
	for _, kv := range resp.Kvs {
		r.applyLocked(now, resp.Header.Revision, true, kv)
	}
	r.rev = resp.Header.Revision
	r.mu.Unlock()
	wctx, cancel := context.WithCancel(context.Background())
	r.cancel = cancel
	go r.watch(wctx, cli)
	return r, nil
}

// Close stops the watch and waits for it.
func (r *Recorder) Close() {
	r.cancel()
	<-r.done
}

func (r *Recorder) watch(ctx context.Context, cli *clientv3.Client) {
	defer close(r.done)
	for ctx.Err() == nil {
		r.mu.Lock()
		from := r.rev + 1
		r.mu.Unlock()
		// WithRequireLeader ends the stream when its member loses the
		// leader, so a partitioned member cannot hold the record back.
		wch := cli.Watch(clientv3.WithRequireLeader(ctx), r.layout.Root+"/", clientv3.WithPrefix(), clientv3.WithRev(from))
		for wr := range wch {
			at := time.Now()
			if err := wr.Err(); err != nil {
				if errors.Is(err, rpctypes.ErrCompacted) || wr.CompactRevision != 0 {
					r.fail(fmt.Errorf("watch: %w", err))
					return
				}
				break
			}
			r.mu.Lock()
			for _, ev := range wr.Events {
				r.applyLocked(at, ev.Kv.ModRevision, ev.Type == mvccpb.PUT, ev.Kv)
			}
			if n := len(wr.Events); n > 0 {
				r.rev = wr.Events[n-1].Kv.ModRevision
			}
			r.notifyLocked()
			r.mu.Unlock()
		}
		if ctx.Err() != nil {
			return
		}
		r.mu.Lock()
		r.resumes++
		r.mu.Unlock()
		t := time.NewTimer(50 * time.Millisecond)
		select {
		case <-ctx.Done():
			t.Stop()
			return
		case <-t.C:
		}
	}
}

func (r *Recorder) fail(err error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.err == nil {
		r.err = err
	}
	r.notifyLocked()
}

// Err is the watch's fatal error, nil while it records.
func (r *Recorder) Err() error {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.err
}

// Resumes counts how often the watch stream failed and was resumed.
func (r *Recorder) Resumes() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.resumes
}

func (r *Recorder) notifyLocked() {
	close(r.changed)
	r.changed = make(chan struct{})
}

// Changed is closed at the next recorded change.
func (r *Recorder) Changed() <-chan struct{} {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.changed
}

func (r *Recorder) applyLocked(at time.Time, rev int64, put bool, kv *mvccpb.KeyValue) {
	key := string(kv.Key)
	L := r.layout
	switch {
	case strings.HasPrefix(key, L.ShardsPrefix()):
		s, err := shard.ParseKey(strings.TrimPrefix(key, L.ShardsPrefix()), r.shards)
		if err != nil {
			r.violations = append(r.violations, fmt.Sprintf("rev %d: bad shard key %s", rev, key))
			return
		}
		cur := r.owners[s]
		if put {
			if cur.Value != "" {
				// create-if-absent makes this impossible: a second owner
				// written over the first.
				r.violations = append(r.violations, fmt.Sprintf("rev %d: shard %d owner key rewritten from %s (token %d) to %s (create rev %d)",
					rev, s, cur.Value, cur.CreateRev, kv.Value, kv.CreateRevision))
			}
			o := OwnerKey{Value: string(kv.Value), CreateRev: kv.CreateRevision, Lease: kv.Lease}
			r.owners[s] = o
			r.hist[s] = append(r.hist[s], ShardEvent{At: at, Rev: rev, Put: true, Value: o.Value, CreateRev: o.CreateRev, Lease: o.Lease})
		} else {
			r.owners[s] = OwnerKey{}
			r.hist[s] = append(r.hist[s], ShardEvent{At: at, Rev: rev, Value: cur.Value, CreateRev: cur.CreateRev, Lease: cur.Lease})
		}
	case strings.HasPrefix(key, L.AssignPrefix()):
		s, err := shard.ParseKey(strings.TrimPrefix(key, L.AssignPrefix()), r.shards)
		if err != nil {
			return
		}
		if put {
			r.assign[s] = string(kv.Value)
		} else {
			r.assign[s] = ""
		}
	case strings.HasPrefix(key, L.MembersPrefix()):
		id := strings.TrimPrefix(key, L.MembersPrefix())
		if put {
			r.members[id] = kv.Lease
		} else {
			delete(r.members, id)
		}
	case strings.HasPrefix(key, L.LeaderPrefix()):
		if put {
			r.leaders[key] = OwnerKey{Value: string(kv.Value), CreateRev: kv.CreateRevision, Lease: kv.Lease}
		} else {
			delete(r.leaders, key)
		}
	}
}

// Snapshot is a copy of the recorded state.
type Snapshot struct {
	Rev     int64
	Owners  []OwnerKey
	Assign  []string
	Members map[string]int64 // replica id -> lease
	Leader  string           // the replica whose election key has the lowest create revision
}

// State copies the current state.
func (r *Recorder) State() Snapshot {
	r.mu.Lock()
	defer r.mu.Unlock()
	st := Snapshot{
		Rev:     r.rev,
		Owners:  append([]OwnerKey(nil), r.owners...),
		Assign:  append([]string(nil), r.assign...),
		Members: map[string]int64{},
	}
	for k, v := range r.members {
		st.Members[k] = v
	}
	var best int64
	for _, l := range r.leaders {
		if best == 0 || l.CreateRev < best {
			best, st.Leader = l.CreateRev, l.Value
		}
	}
	return st
}

// OwnedBy lists the shards the replica owns.
func (st Snapshot) OwnedBy(id string) []int {
	var out []int
	for s, o := range st.Owners {
		if o.Value == id {
			out = append(out, s)
		}
	}
	return out
}

// OwnedCount is the number of owned shards.
func (st Snapshot) OwnedCount() int {
	n := 0
	for _, o := range st.Owners {
		if o.Value != "" {
			n++
		}
	}
	return n
}

// Summary is "owners a=n b=m ..., leader x".
func (st Snapshot) Summary() string {
	counts := map[string]int{}
	for _, o := range st.Owners {
		counts[o.Value]++
	}
	var parts []string
	for _, k := range SortedKeys(counts) {
		name := k
		if name == "" {
			name = "(unowned)"
		}
		parts = append(parts, fmt.Sprintf("%s=%d", name, counts[k]))
	}
	return "owners " + strings.Join(parts, " ") + ", leader " + st.Leader
}

// Settled reports whether the members are exactly ids, every shard is owned
// by the replica the leader assigned it to, and the assignment is balanced
// exactly; the detail says what is missing.
func (st Snapshot) Settled(shards int, ids []string) (bool, string) {
	want := map[string]bool{}
	for _, id := range ids {
		want[id] = true
	}
	if len(st.Members) != len(ids) {
		return false, fmt.Sprintf("members %v, want %v", SortedKeys(st.Members), ids)
	}
	for id := range st.Members {
		if !want[id] {
			return false, fmt.Sprintf("members %v, want %v", SortedKeys(st.Members), ids)
		}
	}
	counts := map[string]int{}
	for s := 0; s < shards; s++ {
		o := st.Owners[s]
		switch {
		case o.Value == "":
			return false, fmt.Sprintf("shard %d unowned (%s)", s, st.Summary())
		case !want[o.Value]:
			return false, fmt.Sprintf("shard %d owned by %s, not a wanted member (%s)", s, o.Value, st.Summary())
		case st.Assign[s] != o.Value:
			return false, fmt.Sprintf("shard %d owned by %s, assigned to %q (%s)", s, o.Value, st.Assign[s], st.Summary())
		}
		counts[o.Value]++
	}
	lo, hi := shards/len(ids), (shards+len(ids)-1)/len(ids)
	for _, id := range ids {
		if c := counts[id]; c < lo || c > hi {
			return false, fmt.Sprintf("%s owns %d shards, want %d..%d (%s)", id, c, lo, hi, st.Summary())
		}
	}
	return true, ""
}

// History returns the shard's events after revision rev.
func (r *Recorder) History(s int, after int64) []ShardEvent {
	r.mu.Lock()
	defer r.mu.Unlock()
	var out []ShardEvent
	for _, e := range r.hist[s] {
		if e.Rev > after {
			out = append(out, e)
		}
	}
	return out
}

// Tenure is when the owner key with create revision token was seen created
// and deleted (zero when still held); found is false when no such key of the
// shard was seen.
func (r *Recorder) Tenure(s int, token int64) (owner string, claimed, released time.Time, found bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, e := range r.hist[s] {
		if e.CreateRev != token {
			continue
		}
		if e.Put {
			owner, claimed, found = e.Value, e.At, true
		} else {
			released = e.At
		}
	}
	return owner, claimed, released, found
}

// Violations lists key-level impossibilities seen: an owner key written
// over another, a malformed shard key.
func (r *Recorder) Violations() []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]string(nil), r.violations...)
}

// Dump renders the last n shard events, for failure reports.
func (r *Recorder) Dump(n int) string {
	type ev struct {
		s int
		e ShardEvent
	}
	r.mu.Lock()
	var all []ev
	for s, h := range r.hist {
		for _, e := range h {
			all = append(all, ev{s, e})
		}
	}
	r.mu.Unlock()
	sort.Slice(all, func(i, j int) bool { return all[i].e.Rev < all[j].e.Rev })
	if len(all) > n {
		all = all[len(all)-n:]
	}
	var b strings.Builder
	for _, x := range all {
		op := "DELETE"
		if x.e.Put {
			op = "PUT   "
		}
		fmt.Fprintf(&b, "%s rev %d %s shard %04d %s token %d\n", x.e.At.Format("15:04:05.000"), x.e.Rev, op, x.s, x.e.Value, x.e.CreateRev)
	}
	return b.String()
}

// SortedKeys returns m's keys in order.
func SortedKeys[V any](m map[string]V) []string {
	out := make([]string, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	sort.Strings(out)
	return out
}
