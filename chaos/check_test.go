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

// fixtureAudit is the audit row of a change that publishes event, as vigil
// writes it (SPEC §2.1).
func fixtureAudit(event string) auditEvent {
	a := auditEvent{auditID: uuid.New(), resType: "sandbox", team: fixtureTeam}
	switch event {
	case "host.down":
		a.resType, a.action, a.reason, a.errText = "host", "marked_down", "heartbeat_timeout", "no heartbeat for more than 5s"
	case "capsule.destroy":
		a.action, a.reason = "destroy", "orphaned"
	case "capsule.pause":
		a.action, a.reason = "pause", "host_state_sync"
	case "capsule.create", "capsule.resume":
		a.action, a.reason, a.errText = "error", "transient_timeout", transientTimeoutError
		a.phase = strings.TrimPrefix(event, "capsule.")
	}
	a.event, a.outcome = expectedEvent(a.resType, a.action, a.reason, a.phase)
	return a
}

// payloadJSON writes an event's payload by hand, in the key order and with
// the omissions of SPEC §6 (and of the control plane's encoder).
func payloadJSON(event, outcome, team, resType, resID, reason, errText string) string {
	var b strings.Builder
	fmt.Fprintf(&b, `{"event":%q`, event)
	if outcome != "" {
		fmt.Fprintf(&b, `,"outcome":%q`, outcome)
	}
	fmt.Fprintf(&b, `,"timestamp":"2026-12-01T10:00:00Z","team_id":%q,"actor":{"type":"system"},"resource":{"id":%q,"type":%q}`, team, resID, resType)
	if reason != "" {
		fmt.Fprintf(&b, `,"metadata":{"reason":%q}`, reason)
	}
	if errText != "" {
		fmt.Fprintf(&b, `,"error":%q`, errText)
	}
	return b.String() + "}"
}

// entryFor is the stream entry a correct relay appends for a.
func entryFor(a auditEvent, id string, resID string) streamEntry {
	reason, errText := a.reason, ""
	if a.event == "host.down" {
		reason = ""
	}
	if a.outcome == "error" {
		errText = a.errText
	}
	se := streamEntry{ID: id, VigilID: uuid.NewString()}
	se.parsePayload(payloadJSON(a.event, a.outcome, ids.Team(a.team), a.resType, resID, reason, errText))
	return se
}

// change commits one change in transaction tx on shard: its audit row and,
// unless noEvent, its outbox row; it returns the stream entry a correct
// relay appends for it.
func (f *eventFixture) change(tx int64, shard int, event, resID string, noEvent bool) streamEntry {
	f.seq++
	a := fixtureAudit(event)
	a.txid, a.resID = tx, resID
	f.audits = append(f.audits, a)
	se := entryFor(a, fmt.Sprintf("%d-0", 1_700_000_000_000+f.seq), resID)
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

// reparse is se with its payload written anew from its fields, as a relay
// that changed them would publish it.
func reparse(se streamEntry) streamEntry {
	out := streamEntry{ID: se.ID, VigilID: se.VigilID}
	out.parsePayload(payloadJSON(se.Event, se.Outcome, se.Team, se.Type, se.Resource, se.Reason, se.Error))
	return out
}

func TestCompareEvents(t *testing.T) {
	t.Run("SPEC §6: every change once, in order", func(t *testing.T) {
		var f eventFixture
		a := f.change(1, 0, "host.down", "host-1", false)
		b := f.change(1, 0, "capsule.destroy", "cl-1", false)
		c := f.change(2, 1, "capsule.pause", "cl-2", false)
		d := f.change(3, 1, "capsule.create", "cl-3", false)
		g := f.change(4, 1, "capsule.resume", "cl-4", false)
		r := compareEvents(f.audits, f.outbox, []streamEntry{a, c, b, d, g})
		if len(r.Lost)+len(r.Duplicates)+len(r.Spurious)+len(r.BadPayload)+len(r.OutOfOrder) != 0 || r.Published != 5 || r.Expected != 5 || r.Committed != 5 {
			t.Errorf("a clean history flagged: %+v", r)
		}
		if len(r.Delays) != 5 || r.Delays[0].wait() < 0 {
			t.Errorf("delays: %+v", r.Delays)
		}
	})
	t.Run("SPEC §6 lost: not in the stream, or never in the outbox", func(t *testing.T) {
		var f eventFixture
		a := f.change(1, 0, "host.down", "host-1", false)
		f.change(2, 0, "capsule.destroy", "cl-1", false) // committed, never published
		f.change(3, 0, "capsule.pause", "cl-2", true)    // the change committed without its event
		r := compareEvents(f.audits, f.outbox, []streamEntry{a})
		if len(r.Lost) != 2 || !strings.Contains(strings.Join(r.Lost, "\n"), "not in the stream") || !strings.Contains(strings.Join(r.Lost, "\n"), "no event in its transaction") {
			t.Errorf("lost: %v", r.Lost)
		}
	})
	t.Run("SPEC §6 exactly once: one vigil_id twice, or one change published under two ids", func(t *testing.T) {
		var f eventFixture
		a := f.change(1, 0, "host.down", "host-1", false)
		b := f.change(2, 0, "capsule.destroy", "cl-1", false)
		b2 := b
		b2.VigilID, b2.ID = uuid.NewString(), "1700000009999-0"
		f.outbox = append(f.outbox, f.row(2, 0, b2)) // a second event for the same audit row
		r := compareEvents(f.audits, f.outbox, []streamEntry{a, a, b, b2})
		if len(r.Duplicates) != 2 || len(r.Lost) != 0 {
			t.Errorf("duplicates %v, lost %v", r.Duplicates, r.Lost)
		}
	})
	t.Run("SPEC §6 spurious: in the stream without a committed event, or an event without its change", func(t *testing.T) {
		var f eventFixture
		a := f.change(1, 0, "host.down", "host-1", false)
		ghost := entryFor(fixtureAudit("capsule.pause"), "1700000000500-0", "cl-9")
		// An event committed for a change that publishes nothing (a snapshot change, say).
		noChange := entryFor(fixtureAudit("capsule.destroy"), "1700000000600-0", "cl-8")
		f.outbox = append(f.outbox, f.row(7, 0, noChange))
		r := compareEvents(f.audits, f.outbox, []streamEntry{a, ghost, noChange})
		if len(r.Spurious) != 2 || len(r.Lost)+len(r.Duplicates) != 0 {
			t.Errorf("spurious %v, lost %v, duplicates %v", r.Spurious, r.Lost, r.Duplicates)
		}
	})
	t.Run("SPEC §6 order: out of commit order within a shard; shards apart", func(t *testing.T) {
		var f eventFixture
		a := f.change(1, 0, "host.down", "host-1", false)
		b := f.change(2, 0, "capsule.destroy", "cl-1", false)
		c := f.change(3, 1, "capsule.pause", "cl-2", false)
		d := f.change(4, 1, "capsule.pause", "cl-3", false)
		r := compareEvents(f.audits, f.outbox, []streamEntry{b, a, d, c})
		if len(r.OutOfOrder) != 2 {
			t.Errorf("two inversions, one per shard: %v", r.OutOfOrder)
		}
		if r := compareEvents(f.audits, f.outbox, []streamEntry{c, a, d, b}); len(r.OutOfOrder) != 0 {
			t.Errorf("interleaved shards, each in order, flagged: %v", r.OutOfOrder)
		}
	})
	t.Run("SPEC §6 order: commit order, not seq order", func(t *testing.T) {
		var f eventFixture
		a := f.change(1, 0, "host.down", "host-1", false)
		b := f.change(2, 0, "host.down", "host-2", false)
		// b's transaction took its seq later but committed first.
		f.outbox[0].commitSeq, f.outbox[1].commitSeq = 20, 10
		if r := compareEvents(f.audits, f.outbox, []streamEntry{b, a}); len(r.OutOfOrder) != 0 {
			t.Errorf("stream in commit order flagged: %v", r.OutOfOrder)
		}
		if r := compareEvents(f.audits, f.outbox, []streamEntry{a, b}); len(r.OutOfOrder) != 1 {
			t.Errorf("stream in seq order against the commit order not flagged: %v", r.OutOfOrder)
		}
	})
}

// TestPayloadSpec6 holds single stream entries against the change they
// announce: SPEC §6's shape and values, and the control plane's own reading
// (cpconsumer). Each case changes one thing of a correct entry.
func TestPayloadSpec6(t *testing.T) {
	for _, tc := range []struct {
		name, event string
		mutate      func(se *streamEntry, a *auditEvent)
		want        string // "" for a correct entry
	}{
		{"host.down: no outcome, metadata or error", "host.down", nil, ""},
		{"capsule.destroy: outcome success and the reason", "capsule.destroy", nil, ""},
		{"capsule.pause: outcome success and the reason", "capsule.pause", nil, ""},
		{"capsule.create: outcome error, the reason and the error text", "capsule.create", nil, ""},
		{"capsule.resume: outcome error, the reason and the error text", "capsule.resume", nil, ""},
		{"the old name capsule.destroyed reaches nobody", "capsule.destroy",
			func(se *streamEntry, _ *auditEvent) { se.Event = "capsule.destroyed" }, "no channel can subscribe"},
		{"a capsule event without its reason is dropped by the dispatcher", "capsule.pause",
			func(se *streamEntry, _ *auditEvent) { se.Reason = "" }, "without metadata.reason"},
		{"a reason other than the audit row's", "capsule.destroy",
			func(se *streamEntry, _ *auditEvent) { se.Reason = "transient_timeout_inferred" }, "metadata.reason"},
		{"host.down carries no metadata", "host.down",
			func(se *streamEntry, _ *auditEvent) { se.Reason = "heartbeat_timeout" }, "metadata.reason"},
		{"an outcome other than SPEC §6's", "capsule.pause",
			func(se *streamEntry, _ *auditEvent) { se.Outcome = "error" }, "outcome"},
		{"host.down has no outcome", "host.down",
			func(se *streamEntry, _ *auditEvent) { se.Outcome = "success" }, "outcome"},
		{"an error change without its error text", "capsule.create",
			func(se *streamEntry, _ *auditEvent) { se.Error = "" }, "error"},
		{"an error text on a success", "capsule.destroy",
			func(se *streamEntry, _ *auditEvent) { se.Error = transientTimeoutError }, "error"},
		{"an error change whose audit row has another metadata.error", "capsule.resume",
			func(_ *streamEntry, a *auditEvent) { a.errText = "timed out" }, "metadata.error"},
		{"a create event for a resume", "capsule.resume",
			func(se *streamEntry, _ *auditEvent) { se.Event = "capsule.create" }, "publishes"},
		{"another team", "capsule.pause",
			func(se *streamEntry, _ *auditEvent) { se.Team = ids.Team(uuid.Nil) }, "team_id"},
		{"a timestamp with fractions and an offset", "capsule.pause",
			func(se *streamEntry, _ *auditEvent) { se.Timestamp = "2026-12-01T10:00:00.123+01:00" }, "timestamp"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			a := fixtureAudit(tc.event)
			a.resID = "cl-1"
			se := entryFor(a, "1-0", "cl-1")
			if tc.mutate != nil {
				tc.mutate(&se, &a)
				se = rewrite(se)
			}
			got := payloadProblem(se, a)
			switch {
			case tc.want == "" && got != "":
				t.Errorf("a correct entry flagged: %s (%s)", got, se.Payload)
			case tc.want != "" && !strings.Contains(got, tc.want):
				t.Errorf("got %q, want a problem saying %q (%s)", got, tc.want, se.Payload)
			}
		})
	}
	t.Run("keys out of SPEC §6's order are refused by the control plane's reading", func(t *testing.T) {
		a := fixtureAudit("capsule.pause")
		var se streamEntry
		se.parsePayload(`{"outcome":"success","event":"capsule.pause","timestamp":"2026-12-01T10:00:00Z","team_id":"` + ids.Team(fixtureTeam) +
			`","actor":{"type":"system"},"resource":{"id":"cl-1","type":"sandbox"},"metadata":{"reason":"host_state_sync"}}`)
		if got := payloadProblem(se, a); !strings.Contains(got, "would not deliver") {
			t.Errorf("got %q", got)
		}
	})
	t.Run("the stream must carry the outbox row's very bytes", func(t *testing.T) {
		var f eventFixture
		se := f.change(1, 0, "capsule.pause", "cl-1", false)
		se.Payload += " "
		if r := compareEvents(f.audits, f.outbox, []streamEntry{se}); len(r.BadPayload) != 1 {
			t.Errorf("bad payloads: %v", r.BadPayload)
		}
	})
}

// rewrite is the entry with its payload written from its (mutated) fields.
func rewrite(se streamEntry) streamEntry {
	out := reparse(se)
	if se.Timestamp != "2026-12-01T10:00:00Z" {
		out.Payload = strings.Replace(out.Payload, "2026-12-01T10:00:00Z", se.Timestamp, 1)
		out.parsePayload(out.Payload)
	}
	return out
}

func TestExpectedEventSpec6(t *testing.T) {
	for _, tc := range []struct{ rt, act, reason, phase, want, outcome string }{
		{"host", "marked_down", "heartbeat_timeout", "", "host.down", ""},
		{"sandbox", "pause", "host_state_sync", "", "capsule.pause", "success"},
		{"sandbox", "pause", "restored_after_host_recovery", "", "capsule.pause", "success"},
		{"sandbox", "pause", "transient_timeout_inferred", "", "capsule.pause", "success"},
		{"sandbox", "destroy", "orphaned", "", "capsule.destroy", "success"},
		{"sandbox", "destroy", "paused_zombie_cleanup", "", "capsule.destroy", "success"},
		{"sandbox", "destroy", "transient_timeout_inferred", "", "capsule.destroy", "success"},
		{"sandbox", "destroy", "destroy_retry", "", "capsule.destroy", "success"},
		{"sandbox", "error", "transient_timeout", "create", "capsule.create", "error"},
		{"sandbox", "error", "transient_timeout", "resume", "capsule.resume", "error"},
		{"sandbox", "snapshot", "transient_timeout", "snapshot", "", ""},
		{"sandbox", "snapshot", "snapshot_recovered", "", "", ""},
	} {
		t.Run(fmt.Sprintf("%s %s %s %s", tc.rt, tc.act, tc.reason, tc.phase), func(t *testing.T) {
			if got, outcome := expectedEvent(tc.rt, tc.act, tc.reason, tc.phase); got != tc.want || outcome != tc.outcome {
				t.Errorf("%q %q, want %q %q", got, outcome, tc.want, tc.outcome)
			}
		})
	}
}

// TestCompareMirror holds the mirror against the stream (SPEC §6: each
// payload PUBLISHed when, and only when, its entry is appended).
func TestCompareMirror(t *testing.T) {
	a := entryFor(fixtureAudit("capsule.pause"), "1-0", "cl-1")
	b := entryFor(fixtureAudit("capsule.destroy"), "2-0", "cl-2")
	for _, tc := range []struct {
		name    string
		stream  []streamEntry
		mirror  map[string]int
		carried int
		want    int
	}{
		{"SPEC §6 mirror: every entry once", []streamEntry{a, b}, map[string]int{a.Payload: 1, b.Payload: 1}, 2, 0},
		{"SPEC §6 mirror: an entry not mirrored", []streamEntry{a, b}, map[string]int{a.Payload: 1}, 1, 1},
		{"SPEC §6 mirror: an entry mirrored twice", []streamEntry{a, b}, map[string]int{a.Payload: 2, b.Payload: 1}, 2, 1},
		{"SPEC §6 mirror: a message never appended", []streamEntry{a}, map[string]int{a.Payload: 1, b.Payload: 1}, 1, 1},
		{"SPEC §6 mirror: one payload appended twice, mirrored twice", []streamEntry{a, a}, map[string]int{a.Payload: 2}, 2, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			problems, carried := compareMirror(tc.stream, tc.mirror)
			if len(problems) != tc.want || carried != tc.carried {
				t.Errorf("problems %v, carried %d; want %d problems, carried %d", problems, carried, tc.want, tc.carried)
			}
		})
	}
}

// TestStuckDestroys proves the checker's statement of SPEC §2 rule 9 on
// histories built by hand: one stuck row (stopping since t0, its VM alive)
// per case unless said otherwise.
func TestStuckDestroys(t *testing.T) {
	const grace = 10 * time.Second
	t0 := time.Date(2026, 12, 1, 10, 0, 0, 0, time.UTC)
	at := func(s float64) time.Time { return t0.Add(time.Duration(s * float64(time.Second))) }
	sb, other := uuid.New(), uuid.New()
	call := func(s float64, res agentsim.DestroyResult) agentsim.DestroyRecord {
		return agentsim.DestroyRecord{Host: hostA, Sandbox: ids.Sandbox(sb), Fenced: true, Token: 10, Result: res, Time: at(s)}
	}
	claims := func(ss ...float64) []retryClaim {
		var out []retryClaim
		for _, s := range ss {
			out = append(out, retryClaim{at: at(s), committedAt: at(s + 0.01)})
		}
		return out
	}
	stop := func(seq int64, id uuid.UUID, change string, tx int64, s float64) journalRow {
		r := jr(seq, 0, 10, "a", hostA)
		r.sandbox, r.change, r.txid, r.committedAt = uuid.NullUUID{UUID: id, Valid: true}, change, tx, at(s)
		return r
	}
	retry := func(tx int64, s float64) destroyAudit {
		return destroyAudit{reason: "destroy_retry", txid: tx, at: at(s)}
	}
	inferred := func(tx int64, s float64) destroyAudit {
		return destroyAudit{reason: "transient_timeout_inferred", txid: tx, at: at(s)}
	}
	const (
		ok, refused, stale = agentsim.DestroyDestroyed, agentsim.DestroyRefused, agentsim.DestroyStaleFence
	)
	for _, tc := range []struct {
		name    string
		claims  []retryClaim
		calls   []agentsim.DestroyRecord
		journal []journalRow
		audits  map[uuid.UUID][]destroyAudit
		want    []string // one substring per violation
		check   func(t *testing.T, st rule9Stats)
	}{
		{name: "rule 9: refused twice, accepted at the third re-send, stopped with its destroy_retry row in one transaction",
			claims:  claims(11, 21, 31),
			calls:   []agentsim.DestroyRecord{call(11.1, refused), call(21.1, refused), call(31.1, ok)},
			journal: []journalRow{stop(1, sb, "stopping->stopped", 5, 31.3)},
			audits:  map[uuid.UUID][]destroyAudit{sb: {retry(5, 31.2)}},
			check: func(t *testing.T, st rule9Stats) {
				if st.claims != 3 || st.refused != 2 || st.accepted != 1 || st.stoppedRetry != 1 || st.audits != 1 || st.withinGrace != 0 {
					t.Errorf("figures %+v", st)
				}
			}},
		{name: "rule 9: re-sent within the grace of the row going stopping",
			claims: claims(2), calls: []agentsim.DestroyRecord{call(2.1, refused)},
			want: []string{"after the row went stopping"}},
		{name: "rule 9: a re-send claimed within the grace of the previous one",
			claims: claims(11, 15), calls: []agentsim.DestroyRecord{call(11.1, refused), call(15.1, refused)},
			want: []string{"after the previous re-send"}},
		{name: "rule 9: a call reaching the agent without a claim of its own (twice per grace)",
			claims: claims(11), calls: []agentsim.DestroyRecord{call(11.1, refused), call(12, refused)},
			want: []string{"no re-send claimed for it"}},
		{name: "rule 9: stopped while the agent refused every re-send",
			claims: claims(11), calls: []agentsim.DestroyRecord{call(11.1, refused)},
			journal: []journalRow{stop(1, sb, "stopping->stopped", 5, 11.5)},
			audits:  map[uuid.UUID][]destroyAudit{sb: {retry(5, 11.4)}},
			want:    []string{"while its VM was alive", "without a destroy its agent accepted"}},
		{name: "rule 9: stopped before its agent accepted the re-send",
			claims: claims(11), calls: []agentsim.DestroyRecord{call(13, ok)},
			journal: []journalRow{stop(1, sb, "stopping->stopped", 5, 11.3)},
			audits:  map[uuid.UUID][]destroyAudit{sb: {retry(5, 11.2)}},
			want:    []string{"while its VM was alive", "without a destroy its agent accepted"}},
		{name: "rule 9: the destroy_retry row outside the stop's transaction",
			claims: claims(11), calls: []agentsim.DestroyRecord{call(11.1, ok)},
			journal: []journalRow{stop(1, sb, "stopping->stopped", 5, 11.3)},
			audits:  map[uuid.UUID][]destroyAudit{sb: {retry(6, 11.2)}},
			want:    []string{"with 0 destroy audit rows", "not in the transaction of its stopping -> stopped"}},
		{name: "rule 9: two destroy_retry rows for one stop",
			claims: claims(11), calls: []agentsim.DestroyRecord{call(11.1, ok)},
			journal: []journalRow{stop(1, sb, "stopping->stopped", 5, 11.3)},
			audits:  map[uuid.UUID][]destroyAudit{sb: {retry(5, 11.2), retry(5, 11.2)}},
			want:    []string{"with 2 destroy audit rows", "two destroy_retry audit rows"}},
		{name: "rule 9: stopped with destroy_retry after a destroy accepted for an earlier claim, not the last one",
			claims: claims(11, 21), calls: []agentsim.DestroyRecord{call(11.1, ok), call(21.1, refused)},
			journal: []journalRow{stop(1, sb, "stopping->stopped", 5, 21.3)},
			audits:  map[uuid.UUID][]destroyAudit{sb: {retry(5, 21.2)}},
			want:    []string{"while its VM was alive"}},
		{name: "rule 6 after an accepted re-send whose commit was lost with its owner",
			claims: claims(11), calls: []agentsim.DestroyRecord{call(11.1, ok)},
			journal: []journalRow{stop(1, sb, "stopping->stopped", 7, 22)},
			audits:  map[uuid.UUID][]destroyAudit{sb: {inferred(7, 21.9)}},
			check: func(t *testing.T, st rule9Stats) {
				if st.stoppedRule6 != 1 || st.stoppedRetry != 0 {
					t.Errorf("figures %+v", st)
				}
			}},
		{name: "rule 6 on a stuck row whose VM no re-send removed",
			journal: []journalRow{stop(1, sb, "stopping->stopped", 7, 11)},
			audits:  map[uuid.UUID][]destroyAudit{sb: {inferred(7, 10.9)}},
			want:    []string{"while its VM was alive"}},
		{name: "rule 1 first: a stuck row moved to missing is not judged",
			journal: []journalRow{stop(1, sb, "stopping->missing", 7, 5)},
			check: func(t *testing.T, st rule9Stats) {
				if st.dissolved != 1 {
					t.Errorf("figures %+v", st)
				}
			}},
		{name: "rule 9: a deposed owner's late call under its own earlier claim",
			claims: claims(11, 22), calls: []agentsim.DestroyRecord{call(22.1, ok), call(22.2, stale)},
			journal: []journalRow{stop(1, sb, "stopping->stopped", 5, 22.4)},
			audits:  map[uuid.UUID][]destroyAudit{sb: {retry(5, 22.3)}},
			check: func(t *testing.T, st rule9Stats) {
				if st.withinGrace != 1 || st.stale != 1 {
					t.Errorf("figures %+v", st)
				}
			}},
		{name: "rule 9: a destroy_retry row of any sandbox needs an accepted destroy",
			journal: []journalRow{stop(1, other, "stopping->stopped", 9, 30)},
			audits:  map[uuid.UUID][]destroyAudit{other: {retry(9, 29.9)}},
			want:    []string{"without a destroy its agent accepted"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			in := rule9History{stuck: map[uuid.UUID]stuckRow{sb: {host: hostA, at: t0}}, journal: tc.journal, audits: tc.audits,
				claims: map[uuid.UUID][]retryClaim{sb: tc.claims}, grace: grace,
				accepted: map[uuid.UUID][]agentsim.DestroyRecord{}, rejected: map[uuid.UUID][]agentsim.DestroyRecord{}}
			for _, c := range tc.calls {
				if destroyAccepted(c) {
					in.accepted[hostA] = append(in.accepted[hostA], c)
				} else {
					in.rejected[hostA] = append(in.rejected[hostA], c)
				}
			}
			bad, st := stuckDestroys(in)
			all := strings.Join(bad, "\n")
			if len(bad) != len(tc.want) {
				t.Fatalf("got %d violations, want %d %v:\n%s", len(bad), len(tc.want), tc.want, all)
			}
			for _, w := range tc.want {
				if !strings.Contains(all, w) {
					t.Errorf("no violation saying %q:\n%s", w, all)
				}
			}
			if tc.check != nil {
				tc.check(t, st)
			}
		})
	}
}

// TestVolumeDetaches proves the checker's statement of SPEC §2 rule 11:
// replayed in commit order, each of vigil's changes to stopped or error
// detaches, in its own transaction, exactly the sandbox's volumes that were
// attached or attaching, and vigil touches no other volume.
func TestVolumeDetaches(t *testing.T) {
	s1, s2 := uuid.New(), uuid.New()
	v1, v2, v3, v4 := uuid.New(), uuid.New(), uuid.New(), uuid.New()
	sbx := func(id uuid.UUID) uuid.NullUUID { return uuid.NullUUID{UUID: id, Valid: true} }
	// The control plane's setup, committed first (tx 1): s1 has v1
	// attached, v2 attaching and v3 deleting; s2 has v4 attached.
	var seq int64
	ins := func(v, s uuid.UUID, st string) volumeChange {
		seq++
		return volumeChange{id: seq, volume: v, op: "insert", newStatus: st, newSandbox: sbx(s), newMount: "/mnt/x", txid: 1, commitSeq: 1, writer: ""}
	}
	setup := []volumeChange{ins(v1, s1, "attached"), ins(v2, s1, "attaching"), ins(v3, s1, "deleting"), ins(v4, s2, "attached")}
	detach := func(v, s uuid.UUID, old string, tx, commit int64) volumeChange {
		seq++
		return volumeChange{id: seq, volume: v, op: "update", oldStatus: old, newStatus: "detached", oldSandbox: sbx(s), oldMount: "/mnt/x",
			txid: tx, commitSeq: commit, writer: "vigil r01"}
	}
	change := func(s uuid.UUID, ch string, tx, commit int64) journalRow {
		r := jr(commit, 0, 10, "r01", hostA)
		r.sandbox, r.change, r.txid = sbx(s), ch, tx
		return r
	}
	for _, tc := range []struct {
		name    string
		changes []volumeChange
		journal []journalRow
		want    []string
	}{
		{"rule 11: a stop detaches the attached and attaching volumes, not the deleting one",
			[]volumeChange{detach(v1, s1, "attached", 5, 10), detach(v2, s1, "attaching", 5, 10)},
			[]journalRow{change(s1, "running->stopped", 5, 10)}, nil},
		{"rule 11: an error detaches too",
			[]volumeChange{detach(v4, s2, "attached", 5, 10)},
			[]journalRow{change(s2, "starting->error", 5, 10)}, nil},
		{"rule 11: a stop that left a volume attached",
			[]volumeChange{detach(v1, s1, "attached", 5, 10)},
			[]journalRow{change(s1, "missing->stopped", 5, 10)}, []string{"not detached in the same transaction"}},
		{"rule 11: a stop whose volumes were detached in another transaction",
			[]volumeChange{detach(v4, s2, "attached", 6, 11)},
			[]journalRow{change(s2, "running->stopped", 5, 10)}, []string{"not detached in the same transaction", "committed no change"}},
		{"rule 11: a pause touches no volume",
			[]volumeChange{detach(v4, s2, "attached", 5, 10)},
			[]journalRow{change(s2, "running->paused", 5, 10)}, []string{"not a volume attached to a sandbox it stopped"}},
		{"rule 11: a stop touches only its own sandbox's volumes",
			[]volumeChange{detach(v1, s1, "attached", 5, 10), detach(v2, s1, "attaching", 5, 10), detach(v4, s2, "attached", 5, 10)},
			[]journalRow{change(s1, "running->stopped", 5, 10)}, []string{"not a volume attached to a sandbox it stopped"}},
		{"rule 11: a deleting volume is not vigil's to detach",
			[]volumeChange{detach(v1, s1, "attached", 5, 10), detach(v2, s1, "attaching", 5, 10), detach(v3, s1, "deleting", 5, 10)},
			[]journalRow{change(s1, "running->stopped", 5, 10)}, []string{"not a volume attached to a sandbox it stopped"}},
		{"rule 11: detached means no sandbox and no mount path",
			[]volumeChange{detach(v1, s1, "attached", 5, 10), func() volumeChange {
				c := detach(v2, s1, "attaching", 5, 10)
				c.newMount = "/mnt/x"
				return c
			}()},
			[]journalRow{change(s1, "running->stopped", 5, 10)}, []string{"not detached as rule 11 says"}},
		{"rule 11: volumes the control plane detached before vigil's stop are not expected of it",
			[]volumeChange{func() volumeChange {
				c := detach(v4, s2, "attached", 4, 9)
				c.writer = "harness"
				return c
			}()},
			[]journalRow{change(s2, "missing->stopped", 5, 10)}, nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			bad, st := volumeDetaches(append(append([]volumeChange(nil), setup...), tc.changes...), tc.journal)
			all := strings.Join(bad, "\n")
			if len(bad) != len(tc.want) {
				t.Fatalf("got %d violations, want %d %v:\n%s", len(bad), len(tc.want), tc.want, all)
			}
			for _, w := range tc.want {
				if !strings.Contains(all, w) {
					t.Errorf("no violation saying %q:\n%s", w, all)
				}
			}
			if st.volumes != 4 {
				t.Errorf("figures %+v", st)
			}
		})
	}
}
