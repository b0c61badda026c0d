package chaos

import (
	"context"
	"fmt"
	"sort"
	"strings"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"

	"github.com/vigil-sh/vigil/internal/ids"
	"github.com/vigil-sh/vigil/internal/status"
)

// Volumes (SPEC §2 rule 11). The run's database has the volumes table of
// newer control planes, and the workload gives sandboxes volumes the way a
// control plane does: the seeded sandboxes some attached, attaching,
// deleting or (inconsistently) detached-but-still-linked volumes, and free
// ones; the churn's creates one or two volumes attaching in the row's own
// transaction, attached once the row is running (some left attaching). The
// churn's own destroys detach the sandbox's volumes in the statement of
// their stopping -> stopped, as a control plane would; the control plane's
// lost destroys (stuck rows, rule 9) and zombies (a row stopped while its VM
// stays paused) leave them attached, so only vigil's destroy_retry stop may
// detach the former, and nothing of vigil the latter.
//
// A trigger records every insert, update and delete of a volume with the
// old and new values, the transaction and the writer (chaos_volume_changes);
// the checker replays them in commit order beside vigil's journal.

// seedVolumes gives the seeded sandboxes their volumes.
func (w *workload) seedVolumes(ctx context.Context) error {
	rows, err := w.e.db.Query(ctx, `select id, team_id, host_id from sandboxes
		 where host_id = any($1) and team_id is not null order by id`, w.hosts)
	if err != nil {
		return err
	}
	type sb struct{ id, team, host uuid.UUID }
	sbs, err := pgx.CollectRows(rows, func(r pgx.CollectableRow) (sb, error) {
		var s sb
		return s, r.Scan(&s.id, &s.team, &s.host)
	})
	if err != nil {
		return err
	}
	var v volumeRows
	w.mu.Lock()
	for _, s := range sbs {
		switch r := w.rng.Float64(); {
		case r < 0.35:
			v.add(s.team, s.host, s.id, "attached")
		case r < 0.50:
			v.add(s.team, s.host, s.id, "attached")
			v.add(s.team, s.host, s.id, "attaching")
		case r < 0.55: // a volume being deleted is not vigil's to detach
			v.add(s.team, s.host, s.id, "attached")
			v.add(s.team, s.host, s.id, "deleting")
		case r < 0.58: // detached but still linked: not vigil's either
			v.add(s.team, s.host, s.id, "detached")
		}
	}
	for i := 0; i < 50; i++ {
		v.add(w.teams[w.rng.IntN(len(w.teams))], w.hosts[w.rng.IntN(len(w.hosts))], uuid.Nil, "detached")
	}
	w.mu.Unlock()
	if err := v.insert(ctx, w.e.db); err != nil {
		return fmt.Errorf("seed volumes: %w", err)
	}
	for st, n := range v.byStatus {
		w.countN("volumes seeded "+st, n)
	}
	return nil
}

// insertSandbox inserts a starting row and, in the same transaction, none,
// one or two volumes attaching to it, as the control plane's create does.
func (w *workload) insertSandbox(ctx context.Context, h, id, team uuid.UUID) error {
	var v volumeRows
	switch r := w.float(); {
	case r < 0.4:
		v.add(team, h, id, "attaching")
	case r < 0.55:
		v.add(team, h, id, "attaching")
		v.add(team, h, id, "attaching")
	}
	tx, err := w.e.db.Begin(ctx)
	if err != nil {
		return err
	}
	defer tx.Rollback(ctx)
	if _, err := tx.Exec(ctx, `insert into sandboxes (id, team_id, host_id, status, last_updated, created_at)
		values ($1, $2, $3, 'starting', now(), now())`, id, team, h); err != nil {
		return err
	}
	if err := v.insert(ctx, tx); err != nil {
		return err
	}
	if err := tx.Commit(ctx); err != nil {
		return err
	}
	if n := len(v.id); n > 0 {
		w.countN("volumes created attaching", n)
	}
	return nil
}

// attachVolumes marks the volumes of a sandbox that is running attached,
// most of the time: some stay attaching, which vigil detaches as well.
func (w *workload) attachVolumes(ctx context.Context, id uuid.UUID) error {
	if w.float() < 0.3 {
		return nil
	}
	_, err := w.e.db.Exec(ctx, `update volumes v set status = 'attached', last_updated = now()
		  from sandboxes s
		 where s.id = $1 and s.status = 'running' and v.sandbox_id = s.id and v.status = 'attaching'`, id)
	return err
}

// casDetach is cas for the control plane's own stop: the row's
// compare-and-set and, in the same statement, its volumes detached.
func (w *workload) casDetach(ctx context.Context, id uuid.UUID, from, to string) error {
	var n, detached int
	err := w.e.db.QueryRow(ctx, `
		with s as (
			update sandboxes set status = $3, last_updated = now() where id = $1 and status = $2 returning id),
		v as (
			update volumes v set status = 'detached', sandbox_id = null, mount_path = '', last_updated = now()
			  from s where v.sandbox_id = s.id and v.status in ('attached', 'attaching') returning v.id)
		select (select count(*) from s), (select count(*) from v)`, id, from, to).Scan(&n, &detached)
	if err != nil {
		return err
	}
	if n != 1 {
		return fmt.Errorf("row %s no longer %s", id, from)
	}
	if detached > 0 {
		w.countN("volumes detached by the control plane's destroys", detached)
	}
	return nil
}

// volumeRows are volumes to insert at once.
type volumeRows struct {
	id, team, host     []uuid.UUID
	sandbox            []*uuid.UUID
	status, name, path []string
	byStatus           map[string]int
}

// add adds a volume; a nil sandbox (uuid.Nil) makes a free one.
func (v *volumeRows) add(team, host, sandbox uuid.UUID, st string) {
	id := uuid.New()
	v.id, v.team, v.host = append(v.id, id), append(v.team, team), append(v.host, host)
	v.status, v.name = append(v.status, st), append(v.name, "vol-"+id.String()[:8])
	var sb *uuid.UUID
	path := ""
	if sandbox != uuid.Nil {
		sb, path = &sandbox, "/mnt/"+id.String()[:8]
	}
	v.sandbox, v.path = append(v.sandbox, sb), append(v.path, path)
	if v.byStatus == nil {
		v.byStatus = map[string]int{}
	}
	v.byStatus[st]++
}

// execer is a pool or a transaction.
type execer interface {
	Exec(ctx context.Context, sql string, args ...any) (pgconn.CommandTag, error)
}

func (v *volumeRows) insert(ctx context.Context, db execer) error {
	if len(v.id) == 0 {
		return nil
	}
	_, err := db.Exec(ctx, `insert into volumes (id, team_id, host_id, name, size_mb, status, sandbox_id, mount_path, last_updated, created_at)
		select id, team_id, host_id, name, 1024, status, sandbox_id, mount_path, now(), now()
		  from unnest($1::uuid[], $2::uuid[], $3::uuid[], $4::text[], $5::text[], $6::uuid[], $7::text[])
		       as t(id, team_id, host_id, name, status, sandbox_id, mount_path)`,
		v.id, v.team, v.host, v.name, v.status, v.sandbox, v.path)
	return err
}

// volumeChange is one recorded write to a volume.
type volumeChange struct {
	id                     int64 // statement order within the transaction
	volume                 uuid.UUID
	op                     string // insert, update, delete
	oldStatus, newStatus   string
	oldSandbox, newSandbox uuid.NullUUID
	oldMount, newMount     string
	txid, commitSeq        int64
	writer                 string // application_name: vigil's are "vigil <replica>"
}

func (c volumeChange) String() string {
	return fmt.Sprintf("volume %s %s (%s %s %q -> %s %s %q, by %q)", c.volume, c.op,
		c.oldStatus, sandboxOrNone(c.oldSandbox), c.oldMount, c.newStatus, sandboxOrNone(c.newSandbox), c.newMount, c.writer)
}

func sandboxOrNone(s uuid.NullUUID) string {
	if !s.Valid {
		return "-"
	}
	return ids.Sandbox(s.UUID)
}

// volumeState is a volume as the replay has it.
type volumeState struct {
	status  string
	sandbox uuid.NullUUID
}

// volumeStats are the figures of the volumes check.
type volumeStats struct {
	volumes          int // volumes inserted over the run
	stops            int // vigil's committed changes to stopped or error
	stopsWithVolumes int // of them, of a sandbox with volumes attached or attaching
	detached         int // volumes vigil detached
	byOthers         int // volumes detached by the control plane (the harness)
}

// volumeTx is one transaction's writes: its volume changes and, for vigil's,
// its journal rows.
type volumeTx struct {
	txid    int64
	order   int64 // its first commit_seq
	changes []volumeChange
	journal []journalRow
	vigil   bool
}

// detachingChange reports whether a journal row is a change of a sandbox to
// stopped or error: one that detaches the sandbox's volumes (rule 11).
func detachingChange(r journalRow) bool {
	return r.sandbox.Valid && (strings.HasSuffix(r.change, "->"+status.Stopped) || strings.HasSuffix(r.change, "->"+status.Error))
}

// volumeDetaches judges SPEC §2 rule 11 over the whole run: replaying every
// volume write in commit order, each of vigil's transactions (its journal
// rows' transaction, or any write by a "vigil ..." connection) detached,
// with status detached, no sandbox and no mount path, exactly the volumes
// that were attached or attaching to the sandboxes it moved to stopped or
// error, and touched no other volume.
func volumeDetaches(changes []volumeChange, journal []journalRow) (bad []string, st volumeStats) {
	txs := map[int64]*volumeTx{}
	get := func(txid, seq int64) *volumeTx {
		t, ok := txs[txid]
		if !ok {
			t = &volumeTx{txid: txid, order: seq}
			txs[txid] = t
		}
		t.order = min(t.order, seq)
		return t
	}
	for _, c := range changes {
		t := get(c.txid, c.commitSeq)
		t.changes = append(t.changes, c)
		t.vigil = t.vigil || strings.HasPrefix(c.writer, "vigil ")
	}
	for _, r := range journal {
		if r.txid == 0 {
			continue // no commit recorded
		}
		t := get(r.txid, r.commitSeq)
		t.journal = append(t.journal, r)
		t.vigil = true
	}
	order := make([]*volumeTx, 0, len(txs))
	for _, t := range txs {
		order = append(order, t)
	}
	sort.Slice(order, func(i, j int) bool {
		if order[i].order != order[j].order {
			return order[i].order < order[j].order
		}
		return order[i].txid < order[j].txid
	})
	state := map[uuid.UUID]volumeState{}
	for _, t := range order {
		if t.vigil {
			bad = append(bad, judgeVolumeTx(t, state, &st)...)
		}
		for _, c := range t.changes {
			switch c.op {
			case "insert":
				st.volumes++
				state[c.volume] = volumeState{c.newStatus, c.newSandbox}
			case "update":
				if !t.vigil && c.newStatus == "detached" && c.oldStatus != "detached" {
					st.byOthers++
				}
				state[c.volume] = volumeState{c.newStatus, c.newSandbox}
			case "delete":
				delete(state, c.volume)
			}
		}
	}
	return bad, st
}

// judgeVolumeTx holds one of vigil's transactions against the volumes as
// they were before it committed.
func judgeVolumeTx(t *volumeTx, state map[uuid.UUID]volumeState, st *volumeStats) (bad []string) {
	stops := map[uuid.UUID]journalRow{}
	for _, r := range t.journal {
		if detachingChange(r) {
			stops[r.sandbox.UUID] = r
		}
	}
	want := map[uuid.UUID]uuid.UUID{} // volume -> the sandbox vigil stopped
	with := map[uuid.UUID]bool{}
	for v, s := range state {
		if len(stops) == 0 {
			break
		}
		if _, ok := stops[s.sandbox.UUID]; ok && s.sandbox.Valid && (s.status == "attached" || s.status == "attaching") {
			want[v] = s.sandbox.UUID
			with[s.sandbox.UUID] = true
		}
	}
	st.stops += len(stops)
	st.stopsWithVolumes += len(with)
	what := func(r journalRow) string {
		return fmt.Sprintf("%s %s by %s (journal seq %d, tx %d)", ids.Sandbox(r.sandbox.UUID), r.change, r.replica, r.seq, t.txid)
	}
	for _, c := range t.changes {
		sb, ok := want[c.volume]
		switch {
		case !ok && len(t.journal) == 0:
			bad = append(bad, fmt.Sprintf("vigil's transaction %d, which committed no change, wrote %s", t.txid, c))
		case !ok:
			bad = append(bad, fmt.Sprintf("vigil's transaction %d (%s) wrote %s: not a volume attached to a sandbox it stopped or errored", t.txid, t.journal[0].change, c))
		case c.op != "update" || c.newStatus != "detached" || c.newSandbox.Valid || c.newMount != "":
			bad = append(bad, fmt.Sprintf("%s: its %s not detached as rule 11 says (status detached, no sandbox, no mount path)", what(stops[sb]), c))
			delete(want, c.volume)
		default:
			st.detached++
			delete(want, c.volume)
		}
	}
	for _, v := range sortedKeys(want, func(a, b uuid.UUID) bool { return a.String() < b.String() }) {
		s := state[v]
		bad = append(bad, fmt.Sprintf("%s: its volume %s (%s) not detached in the same transaction", what(stops[want[v]]), v, s.status))
	}
	return bad
}
