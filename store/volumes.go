package store

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/jackc/pgx/v5/pgconn"
)

// Volumes (SPEC §2 rule 11): newer control planes keep a volumes table, and
// every sandbox change to stopped or error that vigil commits detaches the
// sandbox's volumes in the same statement. Whether the table is there is
// read from the schema, at Open and again once VolumesRecheck has passed
// (at the next write), never from a flag: a control plane upgraded under a
// running vigil is picked up, and without the table no statement names it.

// volumeColumns are the columns of volumes that vigil reads or writes. A
// table without all of them is treated as absent, and said so.
var volumeColumns = []string{"sandbox_id", "status", "mount_path", "last_updated"}

// volumesProbe remembers the last look at the schema. Its mutex guards only
// the probe's two fields.
type volumesProbe struct {
	mu      sync.Mutex
	present bool
	checked time.Time // zero: look again before the next write
}

// Volumes reports whether the database has a volumes table vigil can
// detach volumes in, looking again when the last look is older than
// VolumesRecheck. A failed look keeps the previous answer and is retried at
// the next write.
func (s *Store) Volumes(ctx context.Context) bool {
	s.vol.mu.Lock()
	defer s.vol.mu.Unlock()
	if !s.vol.checked.IsZero() && time.Since(s.vol.checked) < s.recheck {
		return s.vol.present
	}
	present, err := s.detectVolumes(ctx)
	if err != nil {
		s.log.Warn("cannot tell whether the database has a volumes table; keeping the last answer", "volumes", s.vol.present, "error", err)
		return s.vol.present
	}
	if present != s.vol.present || s.vol.checked.IsZero() {
		s.log.Info("volumes table", "present", present)
	}
	s.vol.present, s.vol.checked = present, time.Now()
	s.m.volumes.Set(b2f(present))
	return present
}

// detectVolumes looks for the volumes table in the session's search path
// (where the statements will find it) with every column vigil uses.
func (s *Store) detectVolumes(ctx context.Context) (bool, error) {
	var missing []string
	var found bool
	err := s.pool.QueryRow(ctx, `
		with t as (
			select c.oid from pg_class c
			 where c.oid = to_regclass('volumes') and c.relkind in ('r', 'p'))
		select exists (select 1 from t),
		       coalesce(array(
		           select want from unnest($1::text[]) as want
		            where not exists (select 1 from pg_attribute a, t
		                               where a.attrelid = t.oid and a.attname = want and not a.attisdropped)), '{}')`,
		volumeColumns).Scan(&found, &missing)
	if err != nil {
		return false, fmt.Errorf("store: look for the volumes table: %w", err)
	}
	if found && len(missing) > 0 {
		s.log.Error("the volumes table lacks columns vigil writes; volumes will not be detached", "missing", missing)
		return false, nil
	}
	return found, nil
}

// volumesGone reports whether err says that the volumes table or one of its
// columns is not there (any more), and if so makes the next Volumes look at
// the schema again.
func (s *Store) volumesGone(err error) bool {
	var pe *pgconn.PgError
	if !errors.As(err, &pe) || (pe.Code != "42P01" && pe.Code != "42703") { // undefined_table, undefined_column
		return false
	}
	s.vol.mu.Lock()
	s.vol.checked = time.Time{}
	s.vol.mu.Unlock()
	return true
}

func b2f(b bool) float64 {
	if b {
		return 1
	}
	return 0
}
