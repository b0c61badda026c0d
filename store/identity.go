package store

import (
	"errors"
	"fmt"
	"sync"
)

// ErrDatabaseChanged reports a fenced write refused because the database is
// not the one this replica raised the shard's fence on: another system, or
// the same one on a new timeline (a standby promoted). Commits acknowledged
// before the change may be missing from it, a successor's fence raise among
// them, so the stored token no longer proves that nobody newer owns the
// shard. Nothing was written. It is a loss of the shard like ErrFenced
// (errors.Is(err, ErrFenced) holds): the shard is claimed again under a new
// token, which etcd makes higher than every earlier claim, and raised on the
// new database before any write.
var ErrDatabaseChanged = fmt.Errorf("store: the database changed since the fence was raised (failover): %w", ErrFenced)

// Identity names a database server's history: its system identifier (one
// per cluster, shared by its physical standbys) and the timeline of its
// write-ahead log (a promotion starts a new one).
type Identity struct {
	System   int64
	Timeline string // hex, as in WAL file names
}

func (i Identity) String() string {
	return fmt.Sprintf("system %d, timeline %s", i.System, i.Timeline)
}

// identitySQL selects the Identity of the server a statement runs on. On a
// standby pg_current_wal_lsn fails: nothing can be written there anyway.
const identitySQL = `(select system_identifier from pg_control_system()),
		       substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8)`

// raisedOn remembers, per replica and shard, the database on which this
// Store last raised the shard's fence. Only the shard's owner writes its
// entry (at each raise); every fenced transaction reads it.
type raisedOn struct {
	mu sync.Mutex
	m  map[raisedKey]Identity
}

type raisedKey struct {
	replica string
	shard   int
}

func (r *raisedOn) set(f Fence, id Identity) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.m == nil {
		r.m = map[raisedKey]Identity{}
	}
	r.m[raisedKey{f.Replica, f.Shard}] = id
}

// check compares the database a fenced transaction runs on with the one
// f's shard was raised on. A fence never raised through this Store is
// refused: every owner raises before it writes.
func (r *raisedOn) check(f Fence, now Identity) error {
	r.mu.Lock()
	was, ok := r.m[raisedKey{f.Replica, f.Shard}]
	r.mu.Unlock()
	switch {
	case !ok:
		return fmt.Errorf("shard %d fence %d was not raised by %s: %w", f.Shard, f.Token, f.Replica, ErrFenced)
	case was != now && compareIdentity:
		return fmt.Errorf("shard %d fence %d raised on %s, now on %s: %w", f.Shard, f.Token, was, now, ErrDatabaseChanged)
	}
	return nil
}

// isDatabaseChanged is errors.Is(err, ErrDatabaseChanged).
func isDatabaseChanged(err error) bool { return errors.Is(err, ErrDatabaseChanged) }
