package monitor_test

// Rule 11 against a real Postgres and agents: a control plane with a volumes
// table gets the volumes of every sandbox vigil stops or errors detached in
// the same statement; nothing else touches them; the table is found and
// lost at run time from the schema.

import (
	"testing"
	"time"

	"github.com/google/uuid"

	"github.com/vigil-sh/vigil/store"
)

// volume adds a volume of sandbox sb (uuid.Nil: none) in status, mounted at
// a path when attached, and returns its id.
func (e *env) volume(sb uuid.UUID, status string) uuid.UUID {
	e.t.Helper()
	id := uuid.New()
	var sbID any
	if sb != uuid.Nil {
		sbID = sb
	}
	_, err := e.db.Exec(e.ctx, `
		insert into volumes (id, team_id, name, size_mb, status, sandbox_id, mount_path, last_updated)
		values ($1, $2, 'v', 1024, $3, $4, case when $4::uuid is null then '' else '/mnt/data' end, now() - interval '1 hour')`,
		id, uuid.New(), status, sbID)
	if err != nil {
		e.t.Fatal(err)
	}
	return id
}

type volumeRow struct {
	Status, MountPath string
	Sandbox           uuid.NullUUID
	Touched           bool // last_updated moved
}

func (e *env) volumeRow(id uuid.UUID) volumeRow {
	e.t.Helper()
	var v volumeRow
	err := e.db.QueryRow(e.ctx, `select status, sandbox_id, mount_path, last_updated > now() - interval '10 minutes' from volumes where id = $1`, id).
		Scan(&v.Status, &v.Sandbox, &v.MountPath, &v.Touched)
	if err != nil {
		e.t.Fatal(err)
	}
	return v
}

func TestVolumesDetachedWithStopAndError(t *testing.T) {
	e := newEnvSchema(t, 3, time.Second, store.Schema{ControlPlane: true, Volumes: true}, 0)
	if !e.st.Volumes(e.ctx) {
		t.Fatal("volumes table not detected")
	}
	h, h2, down := e.hosts[0], e.hosts[1], e.hosts[2]
	type c struct {
		name   string
		status string
		age    time.Duration
		vm     string
		to     string
		detach bool
	}
	cases := []c{
		{"running absent -> stopped orphaned detaches", "running", young, "", "stopped", true},
		{"missing absent -> stopped orphaned detaches", "missing", young, "", "stopped", true},
		{"stopping gone past grace -> stopped inferred detaches", "stopping", old, "", "stopped", true},
		{"starting gone past grace -> error detaches", "starting", old, "", "error", true},
		{"resuming gone past grace -> error detaches", "resuming", old, "", "error", true},
		{"snapshotting gone past grace -> error detaches", "snapshotting", old, "", "error", true},
		{"stopping alive, destroy re-sent and accepted -> stopped detaches", "stopping", old, "running", "stopped", true},
		{"pausing gone past grace -> paused keeps them", "pausing", old, "", "paused", false},
		{"running paused on agent -> paused keeps them", "running", young, "paused", "paused", false},
		{"missing running -> running keeps them", "missing", young, "running", "running", false},
		{"zombie destroyed on agent keeps them", "stopped", young, "paused", "stopped", false},
		{"untouched running keeps them", "running", young, "running", "running", false},
	}
	type vols struct{ attached, attaching, detached uuid.UUID }
	rows := make([]uuid.UUID, len(cases))
	vs := make([]vols, len(cases))
	for i, c := range cases {
		rows[i] = e.sandbox(h, c.status, c.age, c.vm)
		vs[i] = vols{e.volume(rows[i], "attached"), e.volume(rows[i], "attaching"), e.volume(rows[i], "deleting")}
	}
	free := e.volume(uuid.Nil, "detached")
	// A compare-and-set miss: the control plane moves the row first.
	raced := e.sandbox(h2, "running", young, "")
	racedVol := e.volume(raced, "attached")
	e.hook.afterList = func(host uuid.UUID) {
		if host == h2 {
			e.db.Exec(e.ctx, `update sandboxes set status = 'stopping', last_updated = now() where id = $1`, raced)
		}
	}
	// A host marked down: its sandboxes go missing, their volumes stay.
	missing := e.sandbox(down, "running", young, "")
	missingVol := e.volume(missing, "attached")
	e.setHeartbeat(down, time.Hour, false)

	if _, err := e.rec.Reconcile(e.ctx, e.fence, []uuid.UUID{h, h2, down}); err != nil {
		t.Fatal(err)
	}
	for i, c := range cases {
		if got := e.status(rows[i]); got != c.to {
			t.Errorf("%s: row %s, want %s", c.name, got, c.to)
		}
		for _, v := range []uuid.UUID{vs[i].attached, vs[i].attaching} {
			got := e.volumeRow(v)
			switch {
			case c.detach && (got.Status != "detached" || got.Sandbox.Valid || got.MountPath != "" || !got.Touched):
				t.Errorf("%s: volume %+v, want detached, no sandbox, no mount path, last_updated now", c.name, got)
			case !c.detach && (got.Status == "detached" || !got.Sandbox.Valid || got.Touched):
				t.Errorf("%s: volume %+v, want untouched", c.name, got)
			}
		}
		if got := e.volumeRow(vs[i].detached); got.Status != "deleting" || !got.Sandbox.Valid || got.Touched {
			t.Errorf("%s: a deleting volume was touched: %+v", c.name, got)
		}
	}
	if got := e.status(raced); got != "stopping" {
		t.Fatalf("raced row %s, want the control plane's stopping", got)
	}
	for name, v := range map[string]uuid.UUID{"compare-and-set miss": racedVol, "host down (missing)": missingVol} {
		if got := e.volumeRow(v); got.Status != "attached" || got.Touched {
			t.Errorf("%s: volume %+v, want untouched", name, got)
		}
	}
	if got := e.volumeRow(free); got.Touched {
		t.Errorf("a volume of no sandbox was touched: %+v", got)
	}
}

// The schema is read again at run time: a volumes table created under a
// running store is found within the recheck, and one dropped is noticed at
// the next write, which still commits (without it).
func TestVolumesTableFoundAndLost(t *testing.T) {
	e := newEnvSchema(t, 1, time.Second, store.Schema{ControlPlane: true}, 50*time.Millisecond)
	h := e.hosts[0]
	if e.st.Volumes(e.ctx) {
		t.Fatal("volumes detected without a table")
	}
	// Without the table, a stop writes nothing about volumes (a statement
	// naming the missing table would fail the pass).
	sb := e.sandbox(h, "running", young, "")
	e.reconcile(h)
	if e.status(sb) != "stopped" {
		t.Fatal("orphan not stopped without a volumes table")
	}
	if _, err := e.db.Exec(e.ctx, `
		create table volumes (id uuid primary key, team_id uuid not null, host_id uuid, name text not null, size_mb int not null,
		                      status text not null, sandbox_id uuid, mount_path text not null default '', last_updated timestamptz not null default now())`); err != nil {
		t.Fatal(err)
	}
	poll(t, 5*time.Second, "volumes table found", func() bool { return e.st.Volumes(e.ctx) })
	sb2 := e.sandbox(h, "running", young, "")
	v := e.volume(sb2, "attached")
	e.reconcile(h)
	if got := e.volumeRow(v); got.Status != "detached" {
		t.Fatalf("volume %+v after its sandbox was stopped, want detached", got)
	}
	// Dropped under the store, which still believes in it: the write
	// commits anyway.
	if _, err := e.db.Exec(e.ctx, `drop table volumes`); err != nil {
		t.Fatal(err)
	}
	sb3 := e.sandbox(h, "running", young, "")
	e.reconcile(h)
	if e.status(sb3) != "stopped" {
		t.Fatal("orphan not stopped after the volumes table was dropped")
	}
	if e.st.Volumes(e.ctx) {
		t.Fatal("dropped volumes table still believed in")
	}
}

// A volumes table without the columns vigil writes is not used: passes go
// on, volumes are left alone.
func TestVolumesTableOfAnotherShapeIsIgnored(t *testing.T) {
	e := newEnvSchema(t, 1, time.Second, store.Schema{ControlPlane: true}, 50*time.Millisecond)
	if _, err := e.db.Exec(e.ctx, `create table volumes (id uuid primary key, sandbox_id uuid, status text)`); err != nil {
		t.Fatal(err)
	}
	poll(t, 5*time.Second, "schema looked at again", func() bool {
		return !e.st.Volumes(e.ctx)
	})
	sb := e.sandbox(e.hosts[0], "running", young, "")
	e.reconcile(e.hosts[0])
	if e.status(sb) != "stopped" {
		t.Fatal("orphan not stopped beside a volumes table of another shape")
	}
}
