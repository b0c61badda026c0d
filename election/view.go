package election

import (
	"encoding/json"
	"strings"

	"go.etcd.io/etcd/api/v3/mvccpb"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/vigil-sh/vigil/shard"
)

// kv is what the view keeps of one key.
type kv struct {
	value     string
	lease     clientv3.LeaseID
	createRev int64
	modRev    int64
}

// view is a replica's picture of its cluster's keys, kept current by one
// watch on the cluster root. It is owned by the watch loop; others get
// copies through snapshot.
type view struct {
	layout  Layout
	shards  int
	members map[string]kv // replica id -> member key
	leaving map[string]bool
	leaders map[string]kv // full key -> election key
	assign  []kv          // by shard; zero value = absent
	owners  []kv          // by shard
	config  kv
	rev     int64
	// anomalies noticed while applying events, drained by the watch loop.
	anomalies []anomaly
}

type anomaly struct {
	kind, key, detail string
}

func newView(layout Layout, shards int) *view {
	return &view{
		layout:  layout,
		shards:  shards,
		members: map[string]kv{},
		leaving: map[string]bool{},
		leaders: map[string]kv{},
		assign:  make([]kv, shards),
		owners:  make([]kv, shards),
	}
}

func (v *view) clone() *view {
	c := *v
	c.members = make(map[string]kv, len(v.members))
	for k, x := range v.members {
		c.members[k] = x
	}
	c.leaving = make(map[string]bool, len(v.leaving))
	for k := range v.leaving {
		c.leaving[k] = true
	}
	c.leaders = make(map[string]kv, len(v.leaders))
	for k, x := range v.leaders {
		c.leaders[k] = x
	}
	c.assign = append([]kv(nil), v.assign...)
	c.owners = append([]kv(nil), v.owners...)
	c.anomalies = nil
	return &c
}

func (v *view) note(kind, key, detail string) {
	v.anomalies = append(v.anomalies, anomaly{kind, key, detail})
}

// apply folds one key's new state (deleted when put is false) into the view.
func (v *view) apply(key string, put bool, val kv) {
	root := v.layout.Root + "/"
	if !strings.HasPrefix(key, root) {
		return
	}
	rest := key[len(root):]
	switch {
	case rest == "config":
		if put {
			v.config = val
		} else {
			v.config = kv{}
			v.note("config_deleted", key, "cluster config key deleted")
		}
	case strings.HasPrefix(rest, "members/"):
		id := rest[len("members/"):]
		if !put {
			delete(v.members, id)
			delete(v.leaving, id)
			return
		}
		if err := ValidReplicaID(id); err != nil {
			v.note("bad_member_key", key, err.Error())
			return
		}
		if val.lease == 0 {
			v.note("member_without_lease", key, "member key has no lease; ignored")
			return
		}
		v.members[id] = val
		var mi MemberInfo
		if json.Unmarshal([]byte(val.value), &mi) == nil && mi.Leaving {
			v.leaving[id] = true
		} else {
			delete(v.leaving, id)
		}
	case strings.HasPrefix(rest, "leader/"):
		if put {
			v.leaders[key] = val
		} else {
			delete(v.leaders, key)
		}
	case strings.HasPrefix(rest, "assign/"), strings.HasPrefix(rest, "shards/"):
		isAssign := strings.HasPrefix(rest, "assign/")
		name := rest[strings.IndexByte(rest, '/')+1:]
		n, err := shard.ParseKey(name, v.shards)
		if err != nil {
			if put {
				v.note("bad_shard_key", key, err.Error())
			}
			return
		}
		if !put {
			val = kv{}
		}
		if isAssign {
			v.assign[n] = val
		} else {
			v.owners[n] = val
		}
	default:
		if put {
			v.note("unknown_key", key, "key outside the layout")
		}
	}
}

func (v *view) applyEvent(ev *clientv3.Event) {
	k := ev.Kv
	val := kv{value: string(k.Value), lease: clientv3.LeaseID(k.Lease), createRev: k.CreateRevision, modRev: k.ModRevision}
	v.apply(string(k.Key), ev.Type == mvccpb.PUT, val)
}

// memberLease is the lease of a live member, 0 if id is not a member.
func (v *view) memberLease(id string) clientv3.LeaseID {
	return v.members[id].lease
}

// validOwner reports whether an owner (or election) key is trustworthy: it
// names a member and is bound to that member's lease.
func (v *view) validOwner(x kv) bool {
	if x.createRev == 0 {
		return false
	}
	l := v.memberLease(x.value)
	return l != 0 && l == x.lease
}

// leader returns the election key with the lowest create revision, and
// whether that key is trustworthy.
func (v *view) leader() (key string, x kv, ok bool) {
	for k, c := range v.leaders {
		if key == "" || c.createRev < x.createRev {
			key, x = k, c
		}
	}
	return key, x, key != ""
}

// memberIDs lists live members.
func (v *view) memberIDs() []string {
	out := make([]string, 0, len(v.members))
	for id := range v.members {
		if !v.leaving[id] {
			out = append(out, id)
		}
	}
	return out
}
