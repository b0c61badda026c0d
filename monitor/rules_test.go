package monitor

import (
	"fmt"
	"testing"
	"time"

	"github.com/google/uuid"

	"github.com/vigil-sh/vigil/internal/ids"
	hostagentv1 "github.com/vigil-sh/vigil/proto/hostagent/v1"
)

var (
	now    = time.Date(2026, 11, 28, 12, 0, 0, 0, time.UTC)
	sbA    = uuid.MustParse("6ba7b810-9dad-11d1-80b4-00c04fd430c8")
	sbB    = uuid.MustParse("0b2d6f4e-8a51-4c3e-9d44-5b7f2a0e1c33")
	teamID = uuid.MustParse("11111111-2222-3333-4444-555555555555")
)

func row(id uuid.UUID, status string, age time.Duration) Row {
	return Row{ID: id, TeamID: teamID, Status: status, LastUpdated: now.Add(-age)}
}

func agent(pairs ...any) Report {
	r := Report{}
	for i := 0; i < len(pairs); i += 2 {
		id := pairs[i].(uuid.UUID)
		o, _ := ClassifyLabel(pairs[i+1].(string))
		r[id] = o
	}
	return r
}

type want struct {
	kind   Kind
	to     string
	action string // audit action, "" for a silent change
	status string
	reason string
	phase  string
}

func TestDecide(t *testing.T) {
	const young, old, ancient = 30 * time.Second, 3 * time.Minute, 20 * time.Minute
	cases := []struct {
		name   string
		rows   []Row
		report Report
		want   []want
	}{
		// Rule 3: missing rows.
		{"missing absent on agent becomes stopped, orphaned", []Row{row(sbA, "missing", young)}, agent(),
			[]want{{Transition, "stopped", "destroy", "warning", "orphaned", ""}}},
		{"missing reported stopped counts as absent", []Row{row(sbA, "missing", young)}, agent(sbA, "stopped"),
			[]want{{Transition, "stopped", "destroy", "warning", "orphaned", ""}}},
		{"missing restored to paused audits restored_after_host_recovery", []Row{row(sbA, "missing", young)}, agent(sbA, "paused"),
			[]want{{Transition, "paused", "pause", "info", "restored_after_host_recovery", ""}}},
		{"missing restored to running is silent", []Row{row(sbA, "missing", young)}, agent(sbA, "running"),
			[]want{{Transition, "running", "", "", "", ""}}},
		{"missing with presence-only label waits: pausing", []Row{row(sbA, "missing", old)}, agent(sbA, "pausing"), nil},
		{"missing with presence-only label waits: resuming", []Row{row(sbA, "missing", old)}, agent(sbA, "resuming"), nil},
		{"missing with presence-only label waits: starting", []Row{row(sbA, "missing", old)}, agent(sbA, "starting"), nil},
		{"missing with presence-only label waits: stopping", []Row{row(sbA, "missing", old)}, agent(sbA, "stopping"), nil},
		{"missing with unknown label waits", []Row{row(sbA, "missing", old)}, Report{sbA: {Presence: PresentUnknown}}, nil},

		// Rule 4: running rows.
		{"running absent becomes stopped, orphaned", []Row{row(sbA, "running", young)}, agent(),
			[]want{{Transition, "stopped", "destroy", "warning", "orphaned", ""}}},
		{"running reported paused syncs with host_state_sync", []Row{row(sbA, "running", young)}, agent(sbA, "paused"),
			[]want{{Transition, "paused", "pause", "info", "host_state_sync", ""}}},
		{"running reported running does nothing", []Row{row(sbA, "running", ancient)}, agent(sbA, "running"), nil},
		{"running with presence-only label does nothing", []Row{row(sbA, "running", ancient)}, agent(sbA, "stopping"), nil},
		{"running with unknown label does nothing", []Row{row(sbA, "running", ancient)}, Report{sbA: {Presence: PresentUnknown}}, nil},

		// Rule 5: zombies, gated on the agent reporting something paused.
		{"stopped in db paused on agent is destroyed on agent", []Row{row(sbA, "stopped", young)}, agent(sbA, "paused"),
			[]want{{DestroyZombie, "stopped", "destroy", "warning", "paused_zombie_cleanup", ""}}},
		{"stopped in db running on agent is left alone", []Row{row(sbA, "stopped", young)}, agent(sbA, "running"), nil},
		{"stopped in db absent on agent is left alone", []Row{row(sbA, "stopped", young)}, agent(), nil},
		{"stopped in db unknown on agent is left alone even when another is paused", []Row{row(sbA, "stopped", young)},
			agent(sbA, "pausing", sbB, "paused"), nil},

		// Rule 6: transient rows.
		{"starting alive becomes running silently", []Row{row(sbA, "starting", young)}, agent(sbA, "running"),
			[]want{{Transition, "running", "", "", "", ""}}},
		{"starting alive with presence-only label becomes running", []Row{row(sbA, "starting", young)}, agent(sbA, "starting"),
			[]want{{Transition, "running", "", "", "", ""}}},
		{"resuming alive becomes running silently", []Row{row(sbA, "resuming", old)}, agent(sbA, "running"),
			[]want{{Transition, "running", "", "", "", ""}}},
		{"starting gone within grace waits", []Row{row(sbA, "starting", young)}, agent(), nil},
		{"starting gone past grace becomes error, phase create", []Row{row(sbA, "starting", old)}, agent(),
			[]want{{Transition, "error", "error", "error", "transient_timeout", "create"}}},
		{"resuming gone past grace becomes error, phase resume", []Row{row(sbA, "resuming", old)}, agent(),
			[]want{{Transition, "error", "error", "error", "transient_timeout", "resume"}}},
		{"starting reported error past grace becomes error", []Row{row(sbA, "starting", old)}, agent(sbA, "error"),
			[]want{{Transition, "error", "error", "error", "transient_timeout", "create"}}},
		{"snapshotting gone past transient grace becomes error", []Row{row(sbA, "snapshotting", old)}, agent(),
			[]want{{Transition, "error", "snapshot", "error", "transient_timeout", "snapshot"}}},
		{"snapshotting gone within grace waits", []Row{row(sbA, "snapshotting", young)}, agent(), nil},
		{"snapshotting alive within snapshot grace waits", []Row{row(sbA, "snapshotting", old)}, agent(sbA, "running"), nil},
		{"snapshotting past snapshot grace returns to running", []Row{row(sbA, "snapshotting", ancient)}, agent(sbA, "running"),
			[]want{{Transition, "running", "snapshot", "info", "snapshot_recovered", ""}}},
		{"snapshotting past snapshot grace returns to paused when agent says paused", []Row{row(sbA, "snapshotting", ancient)}, agent(sbA, "paused"),
			[]want{{Transition, "paused", "snapshot", "info", "snapshot_recovered", ""}}},
		{"snapshotting past snapshot grace defaults to running on unknown label", []Row{row(sbA, "snapshotting", ancient)}, agent(sbA, "snapshotting"),
			[]want{{Transition, "running", "snapshot", "info", "snapshot_recovered", ""}}},
		{"pausing gone past grace is inferred paused", []Row{row(sbA, "pausing", old)}, agent(),
			[]want{{Transition, "paused", "pause", "info", "transient_timeout_inferred", ""}}},
		{"pausing gone within grace waits", []Row{row(sbA, "pausing", young)}, agent(), nil},
		{"pausing alive waits", []Row{row(sbA, "pausing", ancient)}, agent(sbA, "paused"), nil},
		{"stopping gone past grace is inferred stopped", []Row{row(sbA, "stopping", old)}, agent(),
			[]want{{Transition, "stopped", "destroy", "warning", "transient_timeout_inferred", ""}}},
		// Rule 9: a stuck destroy.
		{"stopping alive past grace re-sends the destroy, destroy_retry", []Row{row(sbA, "stopping", old)}, agent(sbA, "running"),
			[]want{{ResendDestroy, "stopped", "destroy", "warning", "destroy_retry", ""}}},
		{"stopping reported mid-transition past grace re-sends the destroy", []Row{row(sbA, "stopping", ancient)}, agent(sbA, "stopping"),
			[]want{{ResendDestroy, "stopped", "destroy", "warning", "destroy_retry", ""}}},
		{"stopping alive within grace waits", []Row{row(sbA, "stopping", young)}, agent(sbA, "running"), nil},
		{"grace boundary is exclusive", []Row{row(sbA, "starting", 2*time.Minute)}, agent(), nil},

		// Statuses outside the rules.
		{"paused row absent on agent is left alone", []Row{row(sbA, "paused", ancient)}, agent(), nil},
		{"error row is left alone", []Row{row(sbA, "error", ancient)}, agent(sbA, "running"), nil},
		{"pending row is left alone", []Row{row(sbA, "pending", ancient)}, agent(), nil},
		{"no rows, no actions", nil, agent(sbA, "running"), nil},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			got := Decide(DefaultRules, c.rows, c.report, now)
			if len(got) != len(c.want) {
				t.Fatalf("got %d actions %v, want %d", len(got), got, len(c.want))
			}
			for i, w := range c.want {
				a := got[i]
				if a.Kind != w.kind || a.To != w.to || a.From != c.rows[i].Status || a.Seen != c.rows[i].LastUpdated || a.TeamID != teamID {
					t.Errorf("action %d = %+v, want %+v from %s", i, a, w, c.rows[i].Status)
				}
				if w.action == "" {
					if a.Audit != nil {
						t.Errorf("action %d has audit %+v, want none", i, *a.Audit)
					}
					continue
				}
				if a.Audit == nil {
					t.Fatalf("action %d has no audit, want %s/%s/%s", i, w.action, w.status, w.reason)
				}
				if a.Audit.Action != w.action || a.Audit.Status != w.status || a.Audit.Reason != w.reason || a.Audit.Phase != w.phase {
					t.Errorf("audit = %+v, want %s/%s/%s phase %q", *a.Audit, w.action, w.status, w.reason, w.phase)
				}
				if (a.Audit.Status == "error") != (a.Audit.Error != "") {
					t.Errorf("audit error text %q on status %s", a.Audit.Error, a.Audit.Status)
				}
			}
		})
	}
}

func TestDecideEveryRowOnce(t *testing.T) {
	statuses := []string{"pending", "starting", "running", "pausing", "paused", "resuming", "snapshotting", "stopping", "stopped", "error", "missing"}
	labels := []string{"", "running", "paused", "stopped", "error", "pausing", "starting", "hibernating"}
	for _, st := range statuses {
		for _, l := range labels {
			for _, age := range []time.Duration{0, time.Hour} {
				rep := Report{}
				if l != "" {
					rep[sbA], _ = ClassifyLabel(l)
				}
				acts := Decide(DefaultRules, []Row{row(sbA, st, age)}, rep, now)
				if len(acts) > 1 {
					t.Fatalf("%s/%s: %d actions", st, l, len(acts))
				}
				for _, a := range acts {
					if !KnownStatus(a.To) {
						t.Fatalf("%s/%s: writes unknown status %q", st, l, a.To)
					}
					if a.Kind == Transition && a.To == a.From {
						t.Fatalf("%s/%s: no-op transition", st, l)
					}
				}
			}
		}
	}
}

func TestClassifyLabel(t *testing.T) {
	for _, l := range []string{"pausing", "resuming", "starting", "stopping"} {
		o, known := ClassifyLabel(l)
		if !known || o.Presence != PresentUnknown {
			t.Errorf("%s: %+v known=%v, want present with unknown status", l, o, known)
		}
	}
	if o, known := ClassifyLabel("hibernating"); known || o.Presence != PresentUnknown {
		t.Errorf("unknown label: %+v known=%v", o, known)
	}
	if o, _ := ClassifyLabel("paused"); o != (Observed{PresentKnown, "paused"}) {
		t.Errorf("paused: %+v", o)
	}
}

func TestParseReport(t *testing.T) {
	resp := &hostagentv1.ListSandboxesResponse{Sandboxes: []*hostagentv1.SandboxInfo{
		{SandboxId: ids.Sandbox(sbA), Status: "running"},
		{SandboxId: ids.Sandbox(sbA), Status: "paused"}, // contradicting duplicate
		{SandboxId: ids.Sandbox(sbB), Status: "hibernating"},
		{SandboxId: "cl-not-an-id", Status: "running"},
		{SandboxId: sbB.String(), Status: "running"}, // raw uuid, not the wire form
	}, AutoPausedSandboxIds: []string{"ignored"}}
	rep, problems := ParseReport(resp)
	if rep[sbA].Presence != PresentUnknown {
		t.Errorf("duplicate with different statuses: %+v, want present unknown", rep[sbA])
	}
	if rep[sbB].Presence != PresentUnknown {
		t.Errorf("unknown label: %+v, want present unknown", rep[sbB])
	}
	if len(rep) != 2 {
		t.Errorf("report has %d entries, want 2", len(rep))
	}
	kinds := map[string]int{}
	for _, p := range problems {
		kinds[p.Kind]++
	}
	if fmt.Sprint(kinds) != "map[duplicate_id:1 malformed_id:2 unknown_status:1]" {
		t.Errorf("problems %v", kinds)
	}
	// Agreeing duplicates are harmless.
	rep, _ = ParseReport(&hostagentv1.ListSandboxesResponse{Sandboxes: []*hostagentv1.SandboxInfo{
		{SandboxId: ids.Sandbox(sbA), Status: "paused"}, {SandboxId: ids.Sandbox(sbA), Status: "paused"}}})
	if rep[sbA] != (Observed{PresentKnown, "paused"}) {
		t.Errorf("agreeing duplicate: %+v", rep[sbA])
	}
}
