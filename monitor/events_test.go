package monitor

import (
	"testing"
	"time"

	"github.com/vigil-sh/vigil/events"
)

// SPEC §6's table, row by row: which changes publish which event.
func TestEventForEveryChange(t *testing.T) {
	const young, old, ancient = 30 * time.Second, 3 * time.Minute, 20 * time.Minute
	cases := []struct {
		name   string
		row    Row
		report Report
		want   string
	}{
		{"missing -> paused restored publishes capsule.paused", row(sbA, "missing", young), agent(sbA, "paused"), events.CapsulePaused},
		{"running -> paused host_state_sync publishes capsule.paused", row(sbA, "running", young), agent(sbA, "paused"), events.CapsulePaused},
		{"pausing -> paused inferred publishes capsule.paused", row(sbA, "pausing", old), agent(), events.CapsulePaused},
		{"missing -> stopped orphaned publishes capsule.destroyed", row(sbA, "missing", young), agent(), events.CapsuleDestroyed},
		{"running -> stopped orphaned publishes capsule.destroyed", row(sbA, "running", young), agent(), events.CapsuleDestroyed},
		{"stopping -> stopped inferred publishes capsule.destroyed", row(sbA, "stopping", old), agent(), events.CapsuleDestroyed},
		{"zombie destroyed publishes capsule.destroyed", row(sbA, "stopped", young), agent(sbA, "paused"), events.CapsuleDestroyed},
		{"missing -> running is silent", row(sbA, "missing", young), agent(sbA, "running"), ""},
		{"starting -> running is silent", row(sbA, "starting", young), agent(sbA, "running"), ""},
		{"starting -> error publishes nothing", row(sbA, "starting", old), agent(), ""},
		{"resuming -> error publishes nothing", row(sbA, "resuming", old), agent(), ""},
		{"snapshotting -> error publishes nothing", row(sbA, "snapshotting", old), agent(), ""},
		{"snapshot recovered to paused publishes nothing", row(sbA, "snapshotting", ancient), agent(sbA, "paused"), ""},
		{"snapshot recovered to running publishes nothing", row(sbA, "snapshotting", ancient), agent(sbA, "running"), ""},
		{"destroy_retry publishes nothing", row(sbA, "stopping", old), agent(sbA, "running"), ""},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			acts := Decide(DefaultRules, []Row{c.row}, c.report, now)
			if len(acts) != 1 {
				t.Fatalf("%d actions", len(acts))
			}
			if got := eventFor(acts[0]); got != c.want {
				t.Fatalf("event %q, want %q", got, c.want)
			}
		})
	}
}
