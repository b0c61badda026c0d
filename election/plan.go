package election

import clientv3 "go.etcd.io/etcd/client/v3"

// The owner loop is receive → snapshot → plan → execute. plan is the pure
// middle: from what etcd says (the view) and what this replica holds, the
// steps that bring the two together. Its table test is plan_test.go.

// stepKind is what the owner loop does for one shard.
type stepKind int

const (
	// stepClaim creates the shard's owner key if absent, bound to our lease,
	// and starts the worker under its create revision.
	stepClaim stepKind = iota
	// stepStop stops the shard's worker; with release, our owner key is
	// deleted (guarded by its create revision) once the worker returned.
	stepStop
	// stepDeleteKey deletes a key that cannot be trusted, guarded by the
	// mod revision it was judged at.
	stepDeleteKey
)

// Why a shard stops (the vigil_shard_losses_total reasons).
const (
	lossKeyLost       = "key_lost"
	lossReassigned    = "reassigned"
	lossShutdown      = "shutdown"
	lossSessionEnded  = "session_ended"
	lossWorkerError   = "worker_error"
	anomalyStaleOwn   = "stale_own_key"
	anomalyBadOwner   = "invalid_owner_key"
	anomalyBadLeader  = "invalid_leader_key"
	anomalyBadConfig  = "bad_config"
	anomalyShardCount = "shard_count_mismatch"
)

// step is one thing to do for one shard.
type step struct {
	kind    stepKind
	shard   int
	reason  string // stepStop: the loss reason; stepDeleteKey: the anomaly kind
	release bool   // stepStop
	key     string // stepDeleteKey
	modRev  int64  // stepDeleteKey
}

// held is what the plan needs of a shard whose worker this replica runs.
type held struct {
	token    int64 // our owner key's create revision
	stopping bool  // the worker was told to stop and has not returned
}

// planInput is the replica's side of the plan.
type planInput struct {
	me      string
	lease   clientv3.LeaseID
	leaving bool // handing over: claim nothing, release what is reassigned
	valid   bool // the session's local deadline is ahead
	held    map[int]held
	// releasedAt is the revision of our last release of each shard: a view
	// older than it may still show the key we deleted.
	releasedAt map[int]int64
}

// planResult is the steps, and for readiness how many shards the leader
// assigns us and how many of them we hold and keep.
type planResult struct {
	steps    []step
	assigned int
	kept     int
}

// plan compares the view with what this replica holds, shard by shard:
//
//	held, stopping                           wait for the worker
//	held, our key gone or rewritten          stop (key_lost)
//	held, assigned to another member         stop and release (reassigned)
//	held, leaving and no member left         stop and release (shutdown)
//	held otherwise                           keep
//	not held, our key of this session        delete it (stale_own_key): a release whose delete failed
//	not held, assigned to us, key untrusted  delete it (invalid_owner_key)
//	not held, assigned to us, key absent     claim (unless leaving or the session is not valid)
//
// A view older than our claim (rev < token) has not seen our key yet and
// stops nothing; an assignment naming no member counts as none.
func plan(v *view, in planInput) planResult {
	var r planResult
	noMembers := in.leaving && len(v.memberIDs()) == 0
	for s := 0; s < v.shards; s++ {
		desired := v.assign[s].value
		if v.memberLease(desired) == 0 {
			desired = "" // names no member
		}
		if desired == in.me && !in.leaving {
			r.assigned++
		}
		key := v.owners[s]
		if h, ok := in.held[s]; ok {
			r.planHeld(s, h, key, desired, in, v.rev, noMembers)
			continue
		}
		ours := key.createRev != 0 && key.lease == in.lease && key.value == in.me
		switch {
		case ours && v.rev >= in.releasedAt[s]:
			r.steps = append(r.steps, step{kind: stepDeleteKey, shard: s, reason: anomalyStaleOwn, key: v.layout.Shard(s), modRev: key.modRev})
		case ours || desired != in.me:
		case key.createRev != 0 && !v.validOwner(key):
			r.steps = append(r.steps, step{kind: stepDeleteKey, shard: s, reason: anomalyBadOwner, key: v.layout.Shard(s), modRev: key.modRev})
		case key.createRev != 0:
			// Held by another owner: it releases, the watch wakes us.
		case in.valid && !in.leaving:
			r.steps = append(r.steps, step{kind: stepClaim, shard: s})
		}
	}
	return r
}

// planHeld is plan's verdict on a shard we hold.
func (r *planResult) planHeld(s int, h held, key kv, desired string, in planInput, rev int64, noMembers bool) {
	switch {
	case h.stopping:
	case rev >= h.token && (key.createRev != h.token || key.value != in.me || key.lease != in.lease):
		r.steps = append(r.steps, step{kind: stepStop, shard: s, reason: lossKeyLost})
	case desired != in.me && desired != "":
		r.steps = append(r.steps, step{kind: stepStop, shard: s, reason: lossReassigned, release: true})
	case noMembers:
		r.steps = append(r.steps, step{kind: stepStop, shard: s, reason: lossShutdown, release: true})
	default:
		r.kept++
	}
}
