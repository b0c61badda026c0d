package chaos

import (
	"strings"
	"testing"
	"time"

	"github.com/google/uuid"

	"github.com/vigil-sh/vigil/agentsim"
	"github.com/vigil-sh/vigil/internal/status"
)

var (
	hostA = uuid.MustParse("00000000-0000-0000-0000-00000000000a")
	hostB = uuid.MustParse("00000000-0000-0000-0000-00000000000b")
)

func jr(commit int64, shard int, token int64, replica string, host uuid.UUID) journalRow {
	return journalRow{seq: commit, commitSeq: commit, shard: shard, token: token, replica: replica, host: host, change: "running->stopped",
		sandbox: uuid.NullUUID{UUID: uuid.New(), Valid: true}}
}

func TestStaleWrites(t *testing.T) {
	for _, tc := range []struct {
		name    string
		journal []journalRow
		raises  []fenceRaise
		want    int
	}{
		{"tokens only rise: a clean handover", []journalRow{jr(1, 0, 10, "a", hostA), jr(2, 0, 10, "a", hostB), jr(4, 0, 20, "b", hostA)},
			[]fenceRaise{{shard: 0, token: 20, owner: "b", commitSeq: 3}}, 0},
		{"two passes of one owner interleave: fine", []journalRow{jr(1, 0, 10, "a", hostA), jr(2, 0, 10, "a", hostB), jr(3, 0, 10, "a", hostA)}, nil, 0},
		{"an old token's write after a newer token's write", []journalRow{jr(1, 0, 20, "b", hostA), jr(2, 0, 10, "a", hostB)}, nil, 1},
		{"an old token's write after the newer token's raise", []journalRow{jr(1, 0, 10, "a", hostA), jr(3, 0, 10, "a", hostB)},
			[]fenceRaise{{shard: 0, token: 20, owner: "b", commitSeq: 2}}, 1},
		{"shards are judged apart", []journalRow{jr(1, 0, 20, "b", hostA), jr(2, 1, 10, "a", hostB)}, nil, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := staleWrites(tc.journal, tc.raises); len(got) != tc.want {
				t.Errorf("got %d stale writes, want %d: %v", len(got), tc.want, got)
			}
		})
	}
}

func TestDoubleActing(t *testing.T) {
	hosts, shared := doubleActing([]journalRow{jr(1, 0, 10, "a", hostA), jr(2, 0, 10, "a", hostA), jr(3, 0, 20, "b", hostA), jr(4, 0, 20, "b", hostB)})
	if len(hosts)+len(shared) != 0 {
		t.Errorf("a clean handover flagged: %v %v", hosts, shared)
	}
	hosts, _ = doubleActing([]journalRow{jr(1, 0, 10, "a", hostA), jr(2, 0, 20, "b", hostA), jr(3, 0, 10, "a", hostA)})
	if len(hosts) != 1 || !strings.Contains(hosts[0], "10(a) 20(b) 10(a)") {
		t.Errorf("interleaved owners on one host: %v", hosts)
	}
	_, shared = doubleActing([]journalRow{jr(1, 0, 10, "a", hostA), jr(2, 0, 10, "b", hostB)})
	if len(shared) != 1 {
		t.Errorf("one token, two writers: %v", shared)
	}
}

func TestAgentDisagreements(t *testing.T) {
	d := map[uuid.UUID][]agentsim.DestroyRecord{
		hostA: {{Fenced: true, Token: 10}, {Fenced: true, Token: 20}, {Fenced: true, Token: 20}},
		hostB: {{Fenced: true, Token: 20}, {Fenced: true, Token: 10}, {Fenced: false}},
	}
	got := agentDisagreements(d)
	if len(got) != 2 || !strings.Contains(strings.Join(got, "\n"), "under token 10 after token 20") {
		t.Errorf("got %v", got)
	}
}

func TestRulesModelPending(t *testing.T) {
	now := time.Now()
	m := rulesModel{transientGrace: 10 * time.Second, snapshotGrace: 20 * time.Second, settle: 5 * time.Second}
	id := uuid.New()
	old, fresh := now.Add(-time.Minute), now.Add(-time.Second)
	st := func(s string) *string { return &s }
	for _, tc := range []struct {
		name      string
		row       string
		updated   time.Time
		vm        string // "" for absent
		hasPaused bool
		pending   bool
		rule9     bool
	}{
		{"rule 3: missing, absent -> stopped", status.Missing, old, "", false, true, false},
		{"rule 3: missing, paused -> paused", status.Missing, old, status.Paused, true, true, false},
		{"rule 3: missing, mid-transition -> next time", status.Missing, old, status.Pausing, false, false, false},
		{"rule 4: running, absent -> stopped", status.Running, old, "", false, true, false},
		{"rule 4: running, stopped on the agent counts as absent", status.Running, old, status.Stopped, false, true, false},
		{"rule 4: running, paused -> paused", status.Running, old, status.Paused, true, true, false},
		{"rule 4: running, running: nothing", status.Running, old, status.Running, false, false, false},
		{"rule 4: running, unknown label: nothing", status.Running, old, "hibernating", false, false, false},
		{"a change within the settle time is not judged", status.Running, fresh, "", false, false, false},
		{"rule 5: stopped, paused on the agent -> destroy", status.Stopped, old, status.Paused, true, true, false},
		{"rule 6: starting, alive -> running", status.Starting, old, status.Starting, false, true, false},
		{"rule 6: resuming, absent past grace -> error", status.Resuming, old, "", false, true, false},
		{"rule 6: resuming, absent within grace: nothing", status.Resuming, now.Add(-12 * time.Second), "", false, false, false},
		{"rule 6: snapshotting alive past snapshot grace -> recovered", status.Snapshotting, old, status.Running, false, true, false},
		{"rule 6: snapshotting alive within snapshot grace: nothing", status.Snapshotting, now.Add(-15 * time.Second), status.Running, false, false, false},
		{"rule 6: pausing, absent past grace -> paused", status.Pausing, old, "", false, true, false},
		{"rule 6: pausing, alive: nothing", status.Pausing, old, status.Pausing, false, false, false},
		{"rule 6: stopping, absent past grace -> stopped", status.Stopping, old, "", false, true, false},
		{"rule 9: stopping, alive past grace -> destroy re-sent", status.Stopping, old, status.Running, false, true, true},
		{"error rows are final", status.Error, old, "", false, false, false},
		{"pending rows are not the rules' business", status.Pending, old, "", false, false, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			vms := map[uuid.UUID]string{}
			if tc.vm != "" {
				vms[id] = tc.vm
			}
			what, r9 := m.pending(sandboxRow{id: id, status: st(tc.row), lastUpdated: tc.updated}, vms, tc.hasPaused, now)
			if (what != "") != tc.pending || r9 != tc.rule9 {
				t.Errorf("pending %q rule9 %v, want pending %v rule9 %v", what, r9, tc.pending, tc.rule9)
			}
		})
	}
	if what, _ := m.pending(sandboxRow{id: id, status: st(status.Running), teamNull: true, lastUpdated: old}, nil, false, now); what != "" {
		t.Errorf("a damaged row (NULL team) is never written, so never pending: %q", what)
	}
	if what, _ := m.pending(sandboxRow{id: id, lastUpdated: old}, nil, false, now); what != "" {
		t.Errorf("a NULL status is never pending: %q", what)
	}
}

func TestLostTransitions(t *testing.T) {
	now := time.Now()
	m := rulesModel{transientGrace: 10 * time.Second, snapshotGrace: 20 * time.Second, settle: 5 * time.Second}
	st := func(s string) *string { return &s }
	addr := st("127.1.0.1:1")
	row := sandboxRow{id: uuid.New(), host: hostA, status: st(status.Running), lastUpdated: now.Add(-time.Minute)}
	fs := finalState{
		now: now,
		hosts: map[uuid.UUID]hostRow{
			hostA: {id: hostA, status: st(status.HostOnline), address: addr},
			hostB: {id: hostB, status: st(status.HostOnline), address: addr, staleSince: time.Minute},
		},
		sandboxes: []sandboxRow{row},
		before:    map[uuid.UUID]map[uuid.UUID]string{hostA: {}},
		after:     map[uuid.UUID]map[uuid.UUID]string{hostA: {}},
		answering: map[uuid.UUID]bool{hostA: true},
	}
	lost, _ := m.lostTransitions(fs, nil)
	if len(lost) != 2 {
		t.Fatalf("want the stale host and the orphan, got %v", lost)
	}
	fs.after = map[uuid.UUID]map[uuid.UUID]string{hostA: {row.id: status.Running}}
	if lost, _ := m.lostTransitions(fs, map[uuid.UUID]bool{hostB: true}); len(lost) != 0 {
		t.Errorf("a row due in one agent snapshot only is a change in flight, and skipped hosts are not judged: %v", lost)
	}
	fs.after = fs.before
	fs.answering = nil
	if lost, _ := m.lostTransitions(fs, map[uuid.UUID]bool{hostB: true}); len(lost) != 0 {
		t.Errorf("a host whose agent does not answer is not judged by the active rules: %v", lost)
	}
}

func TestForbiddenWrites(t *testing.T) {
	bad := uuid.New()
	q := uuid.New()
	moved := uuid.New()
	w := func(commit int64, host, sb uuid.UUID) journalRow {
		r := jr(commit, 0, 10, "a", host)
		r.sandbox = uuid.NullUUID{UUID: sb, Valid: true}
		return r
	}
	journal := []journalRow{
		w(1, bad, uuid.New()), // a bad host's row
		w(2, hostA, q),        // a quarantined row
		w(3, hostA, moved),    // before the move: fine
		w(5, hostA, moved),    // after the move away from hostA
		w(6, hostB, moved),    // on the host it moved to: fine
	}
	moves := []sandboxMove{{sandbox: moved, from: hostA, to: hostB, commitSeq: 4}}
	got, damaged := forbiddenWrites(journal, moves, map[uuid.UUID]string{bad: "malformed address"}, map[uuid.UUID]string{q: "NULL status"}, nil)
	if len(got) != 3 || len(damaged) != 0 {
		t.Errorf("got %d and %d, want 3 and 0: %v %v", len(got), len(damaged), got, damaged)
	}
	got, damaged = forbiddenWrites(journal, moves, nil, map[uuid.UUID]string{q: "NULL team"}, map[uuid.UUID]bool{q: true})
	if len(got) != 1 || len(damaged) != 1 {
		t.Errorf("a damaged row's write comes apart: %v %v", got, damaged)
	}
}

func TestCompareEvents(t *testing.T) {
	a, b := eventKey{"host.down", "host-1"}, eventKey{"capsule.destroyed", "cl-1"}
	r := compareEvents([]eventKey{a, a, b}, []streamEntry{
		{VigilID: "1", Event: a.Event, Resource: a.Resource},
		{VigilID: "1", Event: a.Event, Resource: a.Resource}, // relayed twice
		{VigilID: "2", Event: b.Event, Resource: b.Resource},
		{VigilID: "3", Event: "capsule.paused", Resource: "cl-2"},
	})
	if len(r.Lost) != 1 || r.Lost[0] != a || len(r.Duplicates) != 1 || len(r.Spurious) != 1 {
		t.Errorf("got %+v", r)
	}
}

func TestExpectedEvent(t *testing.T) {
	for _, tc := range []struct{ rt, act, reason, want string }{
		{"host", "marked_down", "heartbeat_timeout", "host.down"},
		{"sandbox", "pause", "host_state_sync", "capsule.paused"},
		{"sandbox", "pause", "restored_after_host_recovery", "capsule.paused"},
		{"sandbox", "pause", "transient_timeout_inferred", "capsule.paused"},
		{"sandbox", "destroy", "orphaned", "capsule.destroyed"},
		{"sandbox", "destroy", "paused_zombie_cleanup", "capsule.destroyed"},
		{"sandbox", "destroy", "transient_timeout_inferred", "capsule.destroyed"},
		{"sandbox", "destroy", "destroy_retry", ""},
		{"sandbox", "error", "transient_timeout", ""},
		{"sandbox", "snapshot", "snapshot_recovered", ""},
	} {
		if got := expectedEvent(tc.rt, tc.act, tc.reason, true); got != tc.want {
			t.Errorf("%s/%s/%s: %q, want %q", tc.rt, tc.act, tc.reason, got, tc.want)
		}
	}
}
