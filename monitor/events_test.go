package monitor

import (
	"encoding/json"
	"testing"
	"time"

	"github.com/google/uuid"

	"github.com/vigil-sh/vigil/events"
	"github.com/vigil-sh/vigil/internal/ids"
	"github.com/vigil-sh/vigil/store"
)

// SPEC §6's table, row by row: the event each change publishes, byte for
// byte, made by the one mapping from the change's audit row.
func TestEventForEveryChange(t *testing.T) {
	const young, old, ancient = 30 * time.Second, 3 * time.Minute, 20 * time.Minute
	team, sb := ids.Team(teamID), ids.Sandbox(sbA)
	payload := func(event, outcome, reason, errText string) string {
		s := `{"event":"` + event + `",`
		if outcome != "" {
			s += `"outcome":"` + outcome + `",`
		}
		s += `"timestamp":"2026-11-28T12:00:00Z","team_id":"` + team + `","actor":{"type":"system"},"resource":{"id":"` + sb + `","type":"sandbox"}`
		if reason != "" {
			s += `,"metadata":{"reason":"` + reason + `"}`
		}
		if errText != "" {
			s += `,"error":"` + errText + `"`
		}
		return s + "}"
	}
	const errText = "transient state did not settle within grace period"
	cases := []struct {
		name   string
		row    Row
		report Report
		want   string // "" for no event
	}{
		{"missing -> paused (restored_after_host_recovery) publishes capsule.pause", row(sbA, "missing", young), agent(sbA, "paused"),
			payload("capsule.pause", "success", "restored_after_host_recovery", "")},
		{"running -> paused (host_state_sync) publishes capsule.pause", row(sbA, "running", young), agent(sbA, "paused"),
			payload("capsule.pause", "success", "host_state_sync", "")},
		{"pausing -> paused (transient_timeout_inferred) publishes capsule.pause", row(sbA, "pausing", old), agent(),
			payload("capsule.pause", "success", "transient_timeout_inferred", "")},
		{"missing -> stopped (orphaned) publishes capsule.destroy", row(sbA, "missing", young), agent(),
			payload("capsule.destroy", "success", "orphaned", "")},
		{"running -> stopped (orphaned) publishes capsule.destroy", row(sbA, "running", young), agent(),
			payload("capsule.destroy", "success", "orphaned", "")},
		{"stopping -> stopped (transient_timeout_inferred) publishes capsule.destroy", row(sbA, "stopping", old), agent(),
			payload("capsule.destroy", "success", "transient_timeout_inferred", "")},
		{"stopping re-sent and accepted -> stopped (destroy_retry) publishes capsule.destroy", row(sbA, "stopping", old), agent(sbA, "running"),
			payload("capsule.destroy", "success", "destroy_retry", "")},
		{"zombie destroyed on its agent (paused_zombie_cleanup) publishes capsule.destroy", row(sbA, "stopped", young), agent(sbA, "paused"),
			payload("capsule.destroy", "success", "paused_zombie_cleanup", "")},
		{"starting -> error (transient_timeout) publishes capsule.create with its error", row(sbA, "starting", old), agent(),
			payload("capsule.create", "error", "transient_timeout", errText)},
		{"resuming -> error (transient_timeout) publishes capsule.resume with its error", row(sbA, "resuming", old), agent(),
			payload("capsule.resume", "error", "transient_timeout", errText)},
		{"snapshotting -> error publishes nothing", row(sbA, "snapshotting", old), agent(), ""},
		{"snapshot recovered to paused publishes nothing", row(sbA, "snapshotting", ancient), agent(sbA, "paused"), ""},
		{"snapshot recovered to running publishes nothing", row(sbA, "snapshotting", ancient), agent(sbA, "running"), ""},
		{"missing -> running is silent", row(sbA, "missing", young), agent(sbA, "running"), ""},
		{"starting -> running is silent", row(sbA, "starting", young), agent(sbA, "running"), ""},
		{"resuming -> running is silent", row(sbA, "resuming", young), agent(sbA, "running"), ""},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			acts := Decide(DefaultRules, []Row{c.row}, c.report, now)
			if len(acts) != 1 {
				t.Fatalf("%d actions", len(acts))
			}
			au := sandboxAudit(acts[0], true, now.Add(999*time.Millisecond))
			var got string
			if au != nil && au.Event != nil {
				got = au.Event.Payload
				var p events.Payload
				if err := json.Unmarshal([]byte(got), &p); err != nil || p.Event != au.Event.Name {
					t.Fatalf("outbox name %q for payload %s (%v)", au.Event.Name, got, err)
				}
			}
			if got != c.want {
				t.Fatalf("payload\n%s\nwant\n%s", got, c.want)
			}
			if au == nil {
				return
			}
			// The audit row and the event say the same.
			if c.want != "" {
				var p events.Payload
				_ = json.Unmarshal([]byte(got), &p)
				if p.Metadata == nil || p.Metadata.Reason != au.Metadata["reason"] {
					t.Errorf("event reason %+v, audit reason %v", p.Metadata, au.Metadata["reason"])
				}
				if p.Error != "" && p.Error != au.Metadata["error"] {
					t.Errorf("event error %q, audit error %v", p.Error, au.Metadata["error"])
				}
			}
			if au.Status == "error" && au.Metadata["error"] != errText {
				t.Errorf("error audit row's metadata.error = %v, want %q", au.Metadata["error"], errText)
			}
		})
	}
}

// host.down: no outcome, no metadata, no error, whatever the audit row
// carries; a shared host (no team) publishes nothing because it writes no
// audit row (the store skips both).
func TestHostDownEvent(t *testing.T) {
	h := uuid.MustParse("ffffffff-ffff-ffff-ffff-ffffffffffff")
	e := hostDownEvent(hostDownAudit(90 * time.Second))(store.MarkedHost{ID: h, TeamID: uuid.NullUUID{UUID: teamID, Valid: true}})
	var p map[string]any
	if err := json.Unmarshal([]byte(e.Payload), &p); err != nil {
		t.Fatal(err)
	}
	if e.Name != "host.down" || p["event"] != "host.down" || p["outcome"] != nil || p["metadata"] != nil || p["error"] != nil {
		t.Fatalf("host.down payload %s", e.Payload)
	}
	res := p["resource"].(map[string]any)
	if res["id"] != "host-f5lxx1zz5pnorynqglhzmsp33" || res["type"] != "host" || p["team_id"] != ids.Team(teamID) {
		t.Fatalf("host.down payload %s", e.Payload)
	}
}

// Without events no outbox row is made.
func TestNoEventWhenOff(t *testing.T) {
	acts := Decide(DefaultRules, []Row{row(sbA, "running", time.Second)}, agent(), now)
	if au := sandboxAudit(acts[0], false, now); au == nil || au.Event != nil {
		t.Fatalf("audit %+v", au)
	}
}
