package monitor

import (
	"testing"
	"time"

	"github.com/google/uuid"

	"github.com/vigil-sh/vigil/internal/ids"
)

// The decisions become one store batch: each transition a compare-and-set on
// the row as decided (status and last_updated), with its audit row when it
// has one and its event only with events on; zombies and re-sends the fenced
// checks before their calls; every entry traceable to its action.
func TestBatchOf(t *testing.T) {
	host := uuid.MustParse("ffffffff-ffff-ffff-ffff-ffffffffffff")
	rows := []Row{row(sbA, "running", time.Second), row(sbB, "missing", time.Second)}
	zombie := row(uuid.New(), "stopped", time.Second)
	stuck := row(uuid.New(), "stopping", 3*time.Minute)
	rep := agent(sbB, "running", zombie.ID, "paused", stuck.ID, "running") // sbA absent: orphaned
	acts := Decide(DefaultRules, append(rows, zombie, stuck), rep, now)
	plans := []hostPlan{{t: 0, host: host, actions: acts}}
	for _, withEvents := range []bool{false, true} {
		b, refs := batchOf(plans, 2*time.Minute, withEvents, now)
		if b.ResendGrace != 2*time.Minute || len(b.Changes) != 2 || len(b.Zombies) != 1 || len(b.Resends) != 1 {
			t.Fatalf("batch %+v", b)
		}
		orphan, restore := b.Changes[0], b.Changes[1]
		if orphan.Row.ID != sbA || orphan.Row.HostID != host || orphan.Row.Status != "running" || !orphan.Row.LastUpdated.Equal(rows[0].LastUpdated) ||
			orphan.To != "stopped" || orphan.Audit == nil || orphan.Audit.ResourceID != ids.Sandbox(sbA) || orphan.Audit.Metadata["reason"] != "orphaned" {
			t.Errorf("orphan change %+v (audit %+v)", orphan, orphan.Audit)
		}
		if (orphan.Audit.Event != nil) != withEvents {
			t.Errorf("events %v: orphan's event %+v", withEvents, orphan.Audit.Event)
		}
		if restore.Row.ID != sbB || restore.To != "running" || restore.Audit != nil {
			t.Errorf("silent restore %+v", restore)
		}
		if b.Zombies[0].ID != zombie.ID || b.Zombies[0].Status != "stopped" || b.Resends[0].ID != stuck.ID || b.Resends[0].Status != "stopping" {
			t.Errorf("checks %+v %+v", b.Zombies, b.Resends)
		}
		for k, ref := range refs.changes {
			if a := plans[ref.plan].actions[ref.action]; a.Sandbox != b.Changes[k].Row.ID {
				t.Errorf("change %d refers to %s", k, a.Sandbox)
			}
		}
		if a := acts[refs.zombies[0].action]; a.Kind != DestroyZombie {
			t.Errorf("zombie ref to %v", a)
		}
		if a := acts[refs.resends[0].action]; a.Kind != ResendDestroy {
			t.Errorf("re-send ref to %v", a)
		}
	}
}
