package monitor_test

// Shadow mode against a real Postgres and agents: every rule decides as
// usual and is recorded in vigil_shadow_changes; nothing of the control
// plane's changes; replays of the other writer's changes; the report.

import (
	"strings"
	"testing"
	"time"

	"github.com/google/uuid"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/vigil-sh/vigil/internal/ids"
	"github.com/vigil-sh/vigil/monitor"
	"github.com/vigil-sh/vigil/store"
)

// newShadowEnv is env with a shadow Reconciler, on a database with a
// volumes table.
func newShadowEnv(t *testing.T, hosts int) *env {
	t.Helper()
	e := newEnvSchema(t, hosts, time.Second, store.Schema{ControlPlane: true, Volumes: true}, 0)
	e.reg = prometheus.NewRegistry()
	var err error
	e.rec, err = monitor.New(monitor.Config{Registerer: e.reg, Shadow: true}, e.st, e.hook)
	if err != nil {
		t.Fatal(err)
	}
	return e
}

// controlPlane is a dump of every control-plane table, to hold before and
// after.
func (e *env) controlPlane() string {
	e.t.Helper()
	var out []string
	for _, q := range []string{
		`select coalesce(string_agg(h::text, E'\n' order by id), '') from hosts h`,
		`select coalesce(string_agg(s::text, E'\n' order by id), '') from sandboxes s`,
		`select coalesce(string_agg(a::text, E'\n' order by id), '') from audit_logs a`,
		`select coalesce(string_agg(v::text, E'\n' order by id), '') from volumes v`,
		`select count(*)::text from vigil_events`,
		`select count(*)::text from vigil_journal`,
		`select count(*)::text from vigil_destroy_retries`,
	} {
		var s string
		if err := e.db.QueryRow(e.ctx, q).Scan(&s); err != nil {
			e.t.Fatal(err)
		}
		out = append(out, s)
	}
	return strings.Join(out, "\n--\n")
}

type shadowRow struct {
	Host                         uuid.UUID
	Sandbox                      uuid.NullUUID
	From, To, Action, Reason, Ph string
	Replayed                     bool
}

func (e *env) shadowRows() []shadowRow {
	e.t.Helper()
	rows, err := e.db.Query(e.ctx, `select host_id, sandbox_id, from_status, to_status, action, reason, phase, replayed from vigil_shadow_changes order by seq`)
	if err != nil {
		e.t.Fatal(err)
	}
	defer rows.Close()
	var out []shadowRow
	for rows.Next() {
		var r shadowRow
		if err := rows.Scan(&r.Host, &r.Sandbox, &r.From, &r.To, &r.Action, &r.Reason, &r.Ph, &r.Replayed); err != nil {
			e.t.Fatal(err)
		}
		out = append(out, r)
	}
	return out
}

func TestShadowRecordsEveryRuleAndChangesNothing(t *testing.T) {
	e := newShadowEnv(t, 3)
	h, down, shared := e.hosts[0], e.hosts[1], e.hosts[2]
	type c struct {
		status, vm         string
		age                time.Duration
		to, action, reason string
	}
	cases := []c{
		{"running", "", young, "stopped", "destroy", "orphaned"},
		{"missing", "", young, "stopped", "destroy", "orphaned"},
		{"missing", "paused", young, "paused", "pause", "restored_after_host_recovery"},
		{"missing", "running", young, "running", "", ""},
		{"running", "paused", young, "paused", "pause", "host_state_sync"},
		{"stopped", "paused", young, "stopped", "destroy", "paused_zombie_cleanup"},
		{"starting", "", old, "error", "error", "transient_timeout"},
		{"starting", "running", young, "running", "", ""},
		{"pausing", "", old, "paused", "pause", "transient_timeout_inferred"},
		{"stopping", "", old, "stopped", "destroy", "transient_timeout_inferred"},
		{"stopping", "running", old, "stopped", "destroy", "destroy_retry"},
		{"snapshotting", "", old, "error", "snapshot", "transient_timeout"},
		{"snapshotting", "paused", ancient, "paused", "snapshot", "snapshot_recovered"},
	}
	want := map[uuid.UUID]c{}
	for _, c := range cases {
		sb := e.sandbox(h, c.status, c.age, c.vm)
		e.volume(sb, "attached")
		want[sb] = c
	}
	downSb := e.sandbox(down, "running", young, "")
	e.db.Exec(e.ctx, `update hosts set team_id = null where id = $1`, shared)
	e.setHeartbeat(down, time.Hour, false)
	e.setHeartbeat(shared, time.Hour, true)
	before := e.controlPlane()

	for range 2 { // the second pass decides the same and records nothing new
		outs, err := e.rec.Reconcile(e.ctx, e.fence, []uuid.UUID{h, down, shared})
		if err != nil {
			t.Fatal(err)
		}
		for _, o := range outs {
			if o.Host == h && (o.Err != nil || o.Done.IsZero()) {
				t.Fatalf("host not reconciled in shadow: %+v", o)
			}
		}
	}
	if after := e.controlPlane(); after != before {
		t.Fatalf("shadow mode changed the control plane's tables:\nbefore\n%s\nafter\n%s", before, after)
	}
	if d := e.sim.Destroys(h); len(d) != 0 {
		t.Fatalf("shadow mode sent destroys: %+v", d)
	}
	got := e.shadowRows()
	hosts := map[uuid.UUID]shadowRow{}
	for _, r := range got {
		if r.Replayed {
			t.Errorf("replayed record %+v", r)
		}
		if !r.Sandbox.Valid {
			hosts[r.Host] = r
			continue
		}
		if r.Sandbox.UUID == downSb {
			if r.From != "running" || r.To != "missing" || r.Action != "" {
				t.Errorf("down host's sandbox recorded %+v", r)
			}
			continue
		}
		w, ok := want[r.Sandbox.UUID]
		if !ok {
			t.Errorf("unexpected record %+v", r)
			continue
		}
		delete(want, r.Sandbox.UUID)
		if r.From != w.status || r.To != w.to || r.Action != w.action || r.Reason != w.reason {
			t.Errorf("%s %s/%s: recorded %+v, want -> %s %s %s", r.Sandbox.UUID, w.status, w.vm, r, w.to, w.action, w.reason)
		}
	}
	for sb, w := range want {
		t.Errorf("%s (%s, agent %q): nothing recorded", sb, w.status, w.vm)
	}
	if r := hosts[down]; r.From != "online" || r.To != "unreachable" || r.Action != "marked_down" || r.Reason != "heartbeat_timeout" {
		t.Errorf("team host marked down: %+v", r)
	}
	if r, ok := hosts[shared]; !ok || r.Action != "" {
		t.Errorf("shared host marked down: %+v (%v), want a silent change", r, ok)
	}
	if n := len(got); n != len(cases)+3 {
		t.Errorf("%d records, want %d (each change once across two passes)", n, len(cases)+3)
	}
	if n := counter(t, e.reg, "vigil_shadow_changes_total", "running", "stopped"); n != 1 {
		t.Errorf("vigil_shadow_changes_total{running,stopped} = %v, want 1", n)
	}
}

// The other writer acts between two passes: the rules, replayed on the row
// as the first pass saw it with the new report, make the same change, which
// is recorded as replayed and counted as agreement by the report.
func TestShadowReplaysTheOtherWritersChanges(t *testing.T) {
	e := newShadowEnv(t, 2)
	h, down := e.hosts[0], e.hosts[1]
	orphan := e.sandbox(h, "running", young, "running")
	userStop := e.sandbox(h, "running", young, "running")
	if _, err := e.rec.Reconcile(e.ctx, e.fence, []uuid.UUID{h, down}); err != nil { // remembered: both online, rows running
		t.Fatal(err)
	}
	if n := len(e.shadowRows()); n != 0 {
		t.Fatalf("%d records for a healthy host", n)
	}
	// The VMs go away. The monitor notices the orphan first and marks the
	// host down; the user's own stop goes stopping -> stopped (no system
	// audit row).
	e.sim.RemoveVM(h, orphan)
	e.sim.RemoveVM(h, userStop)
	e.db.Exec(e.ctx, `update sandboxes set status = 'stopped', last_updated = now() where id = any($1)`, []uuid.UUID{orphan, userStop})
	e.db.Exec(e.ctx, `insert into audit_logs (team_id, actor_type, resource_type, resource_id, action, scope, status, metadata)
		values ($1, 'system', 'sandbox', $2, 'destroy', 'team', 'warning', '{"reason":"orphaned"}'),
		       ($3, 'system', 'host', $4, 'marked_down', 'team', 'error', '{}')`,
		e.team(h), ids.Sandbox(orphan), e.team(down), ids.Host(down))
	e.setHeartbeat(down, time.Hour, false)
	e.db.Exec(e.ctx, `update hosts set status = 'unreachable' where id = $1`, down)
	if _, err := e.rec.Reconcile(e.ctx, e.fence, []uuid.UUID{h, down}); err != nil {
		t.Fatal(err)
	}
	got := e.shadowRows()
	if len(got) != 3 {
		t.Fatalf("records %+v, want three replays", got)
	}
	for _, r := range got {
		if !r.Replayed {
			t.Errorf("not a replay: %+v", r)
		}
	}
	now := time.Now()
	vigil, err := e.st.ShadowChanges(e.ctx, now.Add(-time.Hour), now.Add(time.Hour))
	if err != nil {
		t.Fatal(err)
	}
	audits, err := e.st.SystemAudits(e.ctx, now.Add(-time.Hour), now.Add(time.Hour))
	if err != nil {
		t.Fatal(err)
	}
	rep := monitor.CompareShadow(vigil, audits, now.Add(-time.Hour), now.Add(time.Hour), time.Minute)
	agreed, onlyVigil, onlyMonitor := rep.Totals()
	if agreed != 2 || onlyVigil != 0 || onlyMonitor != 0 {
		t.Fatalf("report %d agreed, %d only vigil, %d only the monitor; want 2, 0, 0\n%+v", agreed, onlyVigil, onlyMonitor, rep.Kinds)
	}
}
