package election

import (
	"reflect"
	"testing"

	clientv3 "go.etcd.io/etcd/client/v3"
)

// The owner loop's plan, one situation per case, the way shard.Assign is
// tested: a view of one shard (plus members), what we hold, the steps.
func TestPlan(t *testing.T) {
	const me, other, ghost = "r1", "r2", "r9"
	const lease, otherLease = clientv3.LeaseID(0x10), clientv3.LeaseID(0x20)
	layout := NewLayout("/vigil", "test")
	key := layout.Shard(0)
	type situation struct {
		name     string
		assign   string // desired owner of shard 0 ("" none)
		owner    kv     // shard 0's owner key (zero: absent)
		rev      int64  // the view's revision
		held     *held  // nil: not held
		leaving  bool
		invalid  bool // session not valid
		members  []string
		released int64 // releasedAt[0]
		want     []step
		assigned int
		kept     int
	}
	mine := func(token int64) kv { return kv{value: me, lease: lease, createRev: token, modRev: token} }
	for _, c := range []situation{
		{name: "assigned to us, key absent: claim", assign: me, rev: 10,
			want: []step{{kind: stepClaim}}, assigned: 1},
		{name: "assigned to us, key absent, session not valid: wait", assign: me, rev: 10, invalid: true,
			assigned: 1},
		{name: "assigned to us, key absent, leaving: claim nothing", assign: me, rev: 10, leaving: true},
		{name: "assigned to another, key absent: nothing", assign: other, rev: 10},
		{name: "assigned to us, held by another member: wait for its release", assign: me, rev: 10,
			owner: kv{value: other, lease: otherLease, createRev: 5, modRev: 5}, assigned: 1},
		{name: "assigned to us, key without a lease: delete it", assign: me, rev: 10,
			owner: kv{value: other, createRev: 5, modRev: 7},
			want:  []step{{kind: stepDeleteKey, reason: anomalyBadOwner, key: key, modRev: 7}}, assigned: 1},
		{name: "assigned to us, key naming no member: delete it", assign: me, rev: 10,
			owner: kv{value: ghost, lease: otherLease, createRev: 5, modRev: 6},
			want:  []step{{kind: stepDeleteKey, reason: anomalyBadOwner, key: key, modRev: 6}}, assigned: 1},
		{name: "assigned to another, untrusted key: not ours to clean", assign: other, rev: 10,
			owner: kv{value: ghost, createRev: 5, modRev: 6}},
		{name: "assignment naming no member counts as none", assign: ghost, rev: 10},
		{name: "held and ours: keep", assign: me, rev: 10, owner: mine(8), held: &held{token: 8},
			assigned: 1, kept: 1},
		{name: "held, stopping: wait for the worker", assign: other, rev: 10, owner: mine(8), held: &held{token: 8, stopping: true}},
		{name: "held, key deleted: key_lost", assign: me, rev: 10, held: &held{token: 8},
			want: []step{{kind: stepStop, reason: lossKeyLost}}, assigned: 1},
		{name: "held, key recreated by us under another token: key_lost", assign: me, rev: 12, owner: mine(11), held: &held{token: 8},
			want: []step{{kind: stepStop, reason: lossKeyLost}}, assigned: 1},
		{name: "held, key rewritten by another: key_lost", assign: me, rev: 10,
			owner: kv{value: other, lease: otherLease, createRev: 8, modRev: 9}, held: &held{token: 8},
			want: []step{{kind: stepStop, reason: lossKeyLost}}, assigned: 1},
		{name: "held, view older than our claim: keep", assign: me, rev: 7, held: &held{token: 8},
			assigned: 1, kept: 1},
		{name: "held, reassigned to another member: stop and release", assign: other, rev: 10, owner: mine(8), held: &held{token: 8},
			want: []step{{kind: stepStop, reason: lossReassigned, release: true}}},
		{name: "held, assignment names no member: keep", assign: ghost, rev: 10, owner: mine(8), held: &held{token: 8},
			kept: 1},
		{name: "held, leaving, another member left: keep until reassigned", assign: me, rev: 10, owner: mine(8), held: &held{token: 8},
			leaving: true, kept: 1},
		{name: "held, leaving and no member left: stop and release", assign: me, rev: 10, owner: mine(8), held: &held{token: 8},
			leaving: true, members: []string{me + "-leaving"},
			want: []step{{kind: stepStop, reason: lossShutdown, release: true}}},
		{name: "not held, our key of this session: a failed release, delete it", assign: me, rev: 10, owner: mine(8),
			want: []step{{kind: stepDeleteKey, reason: anomalyStaleOwn, key: key, modRev: 8}}, assigned: 1},
		{name: "not held, our key, view older than our release: wait", assign: me, rev: 10, owner: mine(8), released: 11,
			assigned: 1},
	} {
		t.Run(c.name, func(t *testing.T) {
			v := newView(layout, 1)
			v.rev = c.rev
			members := c.members
			if members == nil {
				members = []string{me, other}
			}
			for _, m := range members {
				switch m {
				case me:
					v.members[me] = kv{lease: lease, createRev: 1}
				case me + "-leaving":
					v.members[me] = kv{lease: lease, createRev: 1}
					v.leaving[me] = true
				case other:
					v.members[other] = kv{lease: otherLease, createRev: 2}
				}
			}
			if c.assign != "" {
				v.assign[0] = kv{value: c.assign, createRev: 3}
			}
			v.owners[0] = c.owner
			in := planInput{me: me, lease: lease, leaving: c.leaving, valid: !c.invalid,
				held: map[int]held{}, releasedAt: map[int]int64{0: c.released}}
			if c.held != nil {
				in.held[0] = *c.held
			}
			got := plan(v, in)
			if !reflect.DeepEqual(got.steps, c.want) {
				t.Errorf("steps %+v, want %+v", got.steps, c.want)
			}
			if got.assigned != c.assigned || got.kept != c.kept {
				t.Errorf("assigned %d kept %d, want %d and %d", got.assigned, got.kept, c.assigned, c.kept)
			}
		})
	}
}
