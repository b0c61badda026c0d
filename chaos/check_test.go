package chaos

import (
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/google/uuid"

	"github.com/vigil-sh/vigil/agentsim"
	"github.com/vigil-sh/vigil/internal/ids"
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
	lost := m.lostTransitions(fs, nil)
	if len(lost) != 2 {
		t.Fatalf("want the stale host and the orphan, got %v", lost)
	}
	fs.after = map[uuid.UUID]map[uuid.UUID]string{hostA: {row.id: status.Running}}
	if lost := m.lostTransitions(fs, map[uuid.UUID]bool{hostB: true}); len(lost) != 0 {
		t.Errorf("a row due in one agent snapshot only is a change in flight, and skipped hosts are not judged: %v", lost)
	}
	fs.after = fs.before
	fs.answering = nil
	if lost := m.lostTransitions(fs, map[uuid.UUID]bool{hostB: true}); len(lost) != 0 {
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
	got := forbiddenWrites(journal, moves, map[uuid.UUID]string{bad: "malformed address"}, map[uuid.UUID]string{q: "NULL team"})
	if len(got) != 3 {
		t.Errorf("got %d, want 3 (the bad host's row, the damaged row, the row written after its move): %v", len(got), got)
	}
}

// eventFixture is a history of events built by hand: changes (audit rows
// that publish) with their outbox rows, committed in the order given.
type eventFixture struct {
	audits []auditEvent
	outbox []outboxRow
	seq    int64
}

var fixtureTeam = uuid.MustParse("00000000-0000-0000-0000-0000000000ee")

// change commits one change in transaction tx on shard: its audit row and,
// unless noEvent, its outbox row; it returns the stream entry a correct
// relay appends for it.
func (f *eventFixture) change(tx int64, shard int, event, resType, resID string, noEvent bool) streamEntry {
	f.seq++
	f.audits = append(f.audits, auditEvent{auditID: uuid.New(), txid: tx, event: event, resType: resType, resID: resID, team: fixtureTeam})
	se := streamEntry{ID: fmt.Sprintf("%d-0", 1_700_000_000_000+f.seq), VigilID: uuid.NewString(), Event: event, Resource: resID, Type: resType,
		Team: ids.Team(fixtureTeam), Timestamp: "2026-12-01T10:00:00Z", Actor: "system"}
	if !noEvent {
		f.outbox = append(f.outbox, f.row(tx, shard, se))
	}
	return se
}

// row is an outbox row carrying se's payload, committed in tx.
func (f *eventFixture) row(tx int64, shard int, se streamEntry) outboxRow {
	f.seq++
	return outboxRow{vigilID: se.VigilID, seq: f.seq, shard: shard, event: se.Event, txid: tx, commitSeq: f.seq,
		committedAt: time.UnixMilli(1_700_000_000_000 + f.seq - 1), payload: se}
}

func TestCompareEvents(t *testing.T) {
	t.Run("every change once, in order", func(t *testing.T) {
		var f eventFixture
		a := f.change(1, 0, "host.down", "host", "host-1", false)
		b := f.change(1, 0, "capsule.destroyed", "sandbox", "cl-1", false)
		c := f.change(2, 1, "capsule.paused", "sandbox", "cl-2", false)
		r := compareEvents(f.audits, f.outbox, []streamEntry{a, c, b})
		if len(r.Lost)+len(r.Duplicates)+len(r.Spurious)+len(r.BadPayload)+len(r.OutOfOrder) != 0 || r.Published != 3 || r.Expected != 3 || r.Committed != 3 {
			t.Errorf("a clean history flagged: %+v", r)
		}
		if len(r.Delays) != 3 || r.Delays[0].wait() < 0 {
			t.Errorf("delays: %+v", r.Delays)
		}
	})
	t.Run("lost: not in the stream, or never in the outbox", func(t *testing.T) {
		var f eventFixture
		a := f.change(1, 0, "host.down", "host", "host-1", false)
		f.change(2, 0, "capsule.destroyed", "sandbox", "cl-1", false) // committed, never published
		f.change(3, 0, "capsule.paused", "sandbox", "cl-2", true)     // the change committed without its event
		r := compareEvents(f.audits, f.outbox, []streamEntry{a})
		if len(r.Lost) != 2 || !strings.Contains(strings.Join(r.Lost, "\n"), "not in the stream") || !strings.Contains(strings.Join(r.Lost, "\n"), "no event in its transaction") {
			t.Errorf("lost: %v", r.Lost)
		}
	})
	t.Run("duplicates: one vigil_id twice, or one change published under two ids", func(t *testing.T) {
		var f eventFixture
		a := f.change(1, 0, "host.down", "host", "host-1", false)
		b := f.change(2, 0, "capsule.destroyed", "sandbox", "cl-1", false)
		b2 := b
		b2.VigilID, b2.ID = uuid.NewString(), "1700000009999-0"
		f.outbox = append(f.outbox, f.row(2, 0, b2)) // a second event for the same audit row
		r := compareEvents(f.audits, f.outbox, []streamEntry{a, a, b, b2})
		if len(r.Duplicates) != 2 || len(r.Lost) != 0 {
			t.Errorf("duplicates %v, lost %v", r.Duplicates, r.Lost)
		}
	})
	t.Run("spurious: in the stream without a committed event, or an event without its change", func(t *testing.T) {
		var f eventFixture
		a := f.change(1, 0, "host.down", "host", "host-1", false)
		ghost := streamEntry{ID: "1700000000500-0", VigilID: uuid.NewString(), Event: "capsule.paused", Resource: "cl-9", Type: "sandbox"}
		// An event committed for a change that publishes nothing (say destroy_retry).
		noChange := streamEntry{ID: "1700000000600-0", VigilID: uuid.NewString(), Event: "capsule.destroyed", Resource: "cl-8", Type: "sandbox",
			Team: ids.Team(fixtureTeam), Timestamp: "2026-12-01T10:00:00Z", Actor: "system"}
		f.outbox = append(f.outbox, f.row(7, 0, noChange))
		r := compareEvents(f.audits, f.outbox, []streamEntry{a, ghost, noChange})
		if len(r.Spurious) != 2 || len(r.Lost)+len(r.Duplicates) != 0 {
			t.Errorf("spurious %v, lost %v, duplicates %v", r.Spurious, r.Lost, r.Duplicates)
		}
	})
	t.Run("out of commit order within a shard; shards apart", func(t *testing.T) {
		var f eventFixture
		a := f.change(1, 0, "host.down", "host", "host-1", false)
		b := f.change(2, 0, "capsule.destroyed", "sandbox", "cl-1", false)
		c := f.change(3, 1, "capsule.paused", "sandbox", "cl-2", false)
		d := f.change(4, 1, "capsule.paused", "sandbox", "cl-3", false)
		r := compareEvents(f.audits, f.outbox, []streamEntry{b, a, d, c})
		if len(r.OutOfOrder) != 2 {
			t.Errorf("two inversions, one per shard: %v", r.OutOfOrder)
		}
		if r := compareEvents(f.audits, f.outbox, []streamEntry{c, a, d, b}); len(r.OutOfOrder) != 0 {
			t.Errorf("interleaved shards, each in order, flagged: %v", r.OutOfOrder)
		}
	})
	t.Run("commit order, not seq order", func(t *testing.T) {
		var f eventFixture
		a := f.change(1, 0, "host.down", "host", "host-1", false)
		b := f.change(2, 0, "host.down", "host", "host-2", false)
		// b's transaction took its seq later but committed first.
		f.outbox[0].commitSeq, f.outbox[1].commitSeq = 20, 10
		if r := compareEvents(f.audits, f.outbox, []streamEntry{b, a}); len(r.OutOfOrder) != 0 {
			t.Errorf("stream in commit order flagged: %v", r.OutOfOrder)
		}
		if r := compareEvents(f.audits, f.outbox, []streamEntry{a, b}); len(r.OutOfOrder) != 1 {
			t.Errorf("stream in seq order against the commit order not flagged: %v", r.OutOfOrder)
		}
	})
	t.Run("payload", func(t *testing.T) {
		var f eventFixture
		a := f.change(1, 0, "host.down", "host", "host-1", false)
		b := f.change(2, 0, "capsule.paused", "sandbox", "cl-2", false)
		c := f.change(3, 0, "capsule.paused", "sandbox", "cl-3", false)
		a.Team = "team-0"
		b.Timestamp = "2026-12-01T10:00:00.123+01:00"
		c.Resource = "cl-4" // the stream entry says another sandbox than its outbox row
		r := compareEvents(f.audits, f.outbox, []streamEntry{a, b, c})
		if len(r.BadPayload) != 3 {
			t.Errorf("bad payloads: %v", r.BadPayload)
		}
	})
}

func TestStuckDestroys(t *testing.T) {
	grace := 10 * time.Second
	t0 := time.Now().Add(-time.Minute)
	ok, early, stoppedAlive, dissolved := uuid.New(), uuid.New(), uuid.New(), uuid.New()
	stuck := map[uuid.UUID]stuckRow{ok: {hostA, t0}, early: {hostA, t0}, stoppedAlive: {hostB, t0}, dissolved: {hostB, t0}}
	change := func(commit int64, sb uuid.UUID, host uuid.UUID, ch string, at time.Time) journalRow {
		r := jr(commit, 0, 10, "a", host)
		r.sandbox, r.change, r.committedAt = uuid.NullUUID{UUID: sb, Valid: true}, ch, at
		return r
	}
	journal := []journalRow{
		change(1, ok, hostA, "destroy_resent", t0.Add(grace+2*time.Second)),
		change(2, ok, hostA, "stopping->stopped", t0.Add(grace+4*time.Second)),
		change(3, stoppedAlive, hostB, "stopping->stopped", t0.Add(grace+4*time.Second)),
		change(4, dissolved, hostB, "stopping->missing", t0.Add(time.Second)),
	}
	rec := func(sb uuid.UUID, at time.Time, res agentsim.DestroyResult) agentsim.DestroyRecord {
		return agentsim.DestroyRecord{Sandbox: ids.Sandbox(sb), Fenced: true, Token: 10, Result: res, Time: at}
	}
	destroys := map[uuid.UUID][]agentsim.DestroyRecord{
		hostA: {rec(ok, t0.Add(grace+time.Second), agentsim.DestroyDestroyed), rec(early, t0.Add(2*time.Second), agentsim.DestroyDestroyed)},
	}
	ghost := uuid.New()
	retries := map[uuid.UUID][]time.Time{ok: {t0.Add(grace + 2*time.Second)}, ghost: {t0}}
	bad, st := stuckDestroys(stuck, journal, destroys, retries, grace)
	all := strings.Join(bad, "\n")
	if len(bad) != 3 || !strings.Contains(all, "within the transient grace") || !strings.Contains(all, "while its VM was alive") ||
		!strings.Contains(all, "without a destroy its agent accepted") {
		t.Errorf("want the early re-send, the row stopped with its VM alive and the retry audit row without a destroy: %v", bad)
	}
	if st.stuck != 4 || st.resent != 2 || st.stopped != 2 || st.dissolved != 1 || st.audits != 2 {
		t.Errorf("figures %+v", st)
	}
	// The destroy accepted after the row was stopped.
	late := map[uuid.UUID][]agentsim.DestroyRecord{hostA: {rec(ok, t0.Add(grace+5*time.Second), agentsim.DestroyDestroyed)}}
	bad, _ = stuckDestroys(map[uuid.UUID]stuckRow{ok: {hostA, t0}}, journal[:2], late, nil, grace)
	if len(bad) != 1 || !strings.Contains(bad[0], "before its agent accepted") {
		t.Errorf("a row stopped before its destroy was accepted: %v", bad)
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
		if got := expectedEvent(tc.rt, tc.act, tc.reason); got != tc.want {
			t.Errorf("%s/%s/%s: %q, want %q", tc.rt, tc.act, tc.reason, got, tc.want)
		}
	}
}
