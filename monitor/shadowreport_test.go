package monitor

import (
	"bytes"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/google/uuid"

	"github.com/vigil-sh/vigil/internal/ids"
	"github.com/vigil-sh/vigil/store"
)

func TestCompareShadow(t *testing.T) {
	t0 := time.Date(2026, 12, 3, 9, 0, 0, 0, time.UTC)
	from, to, slack := t0, t0.Add(time.Hour), 2*time.Minute
	at := func(m float64) time.Time { return t0.Add(time.Duration(m * float64(time.Minute))) }
	host := uuid.MustParse("ffffffff-ffff-ffff-ffff-ffffffffffff")
	sb := func(n byte) uuid.UUID { return uuid.UUID{15: n} }
	v := func(m float64, s uuid.UUID, action, reason string, replayed bool) store.ShadowRecord {
		return store.ShadowRecord{At: at(m), ShadowChange: store.ShadowChange{Host: host, Sandbox: uuid.NullUUID{UUID: s, Valid: s != uuid.Nil},
			From: "running", To: "stopped", Action: action, Reason: reason, Replayed: replayed}}
	}
	mon := func(m float64, s uuid.UUID, action, reason string) store.SystemAudit {
		if s == uuid.Nil {
			return store.SystemAudit{At: at(m), ResourceType: "host", ResourceID: ids.Host(host), Action: action}
		}
		return store.SystemAudit{At: at(m), ResourceType: "sandbox", ResourceID: ids.Sandbox(s), Action: action, Reason: reason}
	}
	type want struct {
		kind                   string
		agreed, vigil, monitor int
	}
	for _, c := range []struct {
		name  string
		vigil []store.ShadowRecord
		mon   []store.SystemAudit
		want  []want
	}{
		{"the same change on both sides agrees",
			[]store.ShadowRecord{v(10, sb(1), "destroy", "orphaned", false)}, []store.SystemAudit{mon(10.5, sb(1), "destroy", "orphaned")},
			[]want{{"sandbox destroy orphaned", 1, 0, 0}}},
		{"a change only vigil would have made",
			[]store.ShadowRecord{v(10, sb(1), "destroy", "orphaned", false)}, nil,
			[]want{{"sandbox destroy orphaned", 0, 1, 0}}},
		{"a change only the monitor made",
			nil, []store.SystemAudit{mon(10, sb(1), "pause", "host_state_sync")},
			[]want{{"sandbox pause host_state_sync", 0, 0, 1}}},
		{"a replay the monitor matches agrees",
			[]store.ShadowRecord{v(10, sb(1), "destroy", "orphaned", true)}, []store.SystemAudit{mon(9.8, sb(1), "destroy", "orphaned")},
			[]want{{"sandbox destroy orphaned", 1, 0, 0}}},
		{"a replay nobody matches is dropped (another writer's change)",
			[]store.ShadowRecord{v(10, sb(1), "destroy", "orphaned", true)}, nil,
			[]want{{"sandbox destroy orphaned", 0, 0, 0}}},
		{"a match just after the window still agrees",
			[]store.ShadowRecord{v(59.5, sb(1), "destroy", "orphaned", false)}, []store.SystemAudit{mon(61, sb(1), "destroy", "orphaned")},
			[]want{{"sandbox destroy orphaned", 1, 0, 0}}},
		{"sightings outside the window count for nothing",
			[]store.ShadowRecord{v(-1, sb(1), "destroy", "orphaned", false)}, []store.SystemAudit{mon(61, sb(2), "destroy", "orphaned")},
			[]want{{"sandbox destroy orphaned", 0, 0, 0}}},
		{"different kinds of change on one sandbox disagree both ways",
			[]store.ShadowRecord{v(10, sb(1), "destroy", "orphaned", false)}, []store.SystemAudit{mon(10, sb(1), "destroy", "transient_timeout_inferred")},
			[]want{{"sandbox destroy orphaned", 0, 1, 0}, {"sandbox destroy transient_timeout_inferred", 0, 0, 1}}},
		{"sightings pair up one to one",
			[]store.ShadowRecord{v(10, sb(1), "destroy", "orphaned", false), v(20, sb(1), "destroy", "orphaned", false)},
			[]store.SystemAudit{mon(10, sb(1), "destroy", "orphaned")},
			[]want{{"sandbox destroy orphaned", 1, 1, 0}}},
		{"hosts match whatever reason each side writes",
			[]store.ShadowRecord{{At: at(5), ShadowChange: store.ShadowChange{Host: host, From: "online", To: "unreachable", Action: "marked_down", Reason: "heartbeat_timeout"}}},
			[]store.SystemAudit{mon(5.2, uuid.Nil, "marked_down", "")},
			[]want{{"host marked_down", 1, 0, 0}}},
		{"the create and resume timeouts are told apart by phase",
			[]store.ShadowRecord{{At: at(5), ShadowChange: store.ShadowChange{Host: host, Sandbox: uuid.NullUUID{UUID: sb(1), Valid: true}, From: "starting", To: "error", Action: "error", Reason: "transient_timeout", Phase: "create"}}},
			[]store.SystemAudit{{At: at(5), ResourceType: "sandbox", ResourceID: ids.Sandbox(sb(1)), Action: "error", Reason: "transient_timeout", Phase: "resume"}},
			[]want{{"sandbox error transient_timeout create", 0, 1, 0}, {"sandbox error transient_timeout resume", 0, 0, 1}}},
		{"the monitor's other system changes are not compared",
			nil, []store.SystemAudit{mon(10, sb(1), "pause", "ttl_expired"), mon(10, sb(2), "destroy", "cleanup_after_create_error")},
			nil},
	} {
		t.Run(c.name, func(t *testing.T) {
			rep := CompareShadow(c.vigil, c.mon, from, to, slack)
			got := map[string]want{}
			for _, k := range rep.Kinds {
				if k.Agreed+len(k.OnlyVigil)+len(k.OnlyMonitor) > 0 {
					got[k.Kind] = want{k.Kind, k.Agreed, len(k.OnlyVigil), len(k.OnlyMonitor)}
				}
			}
			for _, w := range c.want {
				if w.agreed+w.vigil+w.monitor == 0 {
					continue
				}
				if got[w.kind] != w {
					t.Errorf("%s: got %+v, want %+v", w.kind, got[w.kind], w)
				}
				delete(got, w.kind)
			}
			for _, g := range got {
				t.Errorf("unexpected %+v", g)
			}
		})
	}
}

func TestShadowReportText(t *testing.T) {
	t0 := time.Date(2026, 12, 3, 9, 0, 0, 0, time.UTC)
	sb := uuid.UUID{15: 7}
	rep := CompareShadow(
		[]store.ShadowRecord{
			{At: t0.Add(time.Minute), ShadowChange: store.ShadowChange{Sandbox: uuid.NullUUID{UUID: sb, Valid: true}, From: "running", To: "stopped", Action: "destroy", Reason: "orphaned"}},
			{At: t0.Add(time.Minute), ShadowChange: store.ShadowChange{Sandbox: uuid.NullUUID{UUID: uuid.UUID{15: 8}, Valid: true}, From: "missing", To: "running"}},
		}, nil, t0, t0.Add(time.Hour), time.Minute)
	var b bytes.Buffer
	if err := rep.Write(&b); err != nil {
		t.Fatal(err)
	}
	out := b.String()
	for _, want := range []string{"kind of change", "only vigil", "only the monitor", "sandbox destroy orphaned", "disagreements:",
		"sandbox destroy orphaned, only vigil: " + ids.Sandbox(sb), "missing->running 1"} {
		if !strings.Contains(out, want) {
			t.Errorf("report lacks %q:\n%s", want, out)
		}
	}
	lines := strings.Split(out, "\n")
	if !slices.ContainsFunc(lines, func(l string) bool { return strings.HasPrefix(strings.TrimSpace(l), "total") }) {
		t.Errorf("no total line:\n%s", out)
	}
}
