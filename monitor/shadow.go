package monitor

import (
	"context"
	"sync"
	"time"

	"github.com/google/uuid"

	"github.com/vigil-sh/vigil/internal/status"
	"github.com/vigil-sh/vigil/store"
)

// Shadow mode (SPEC §4, Config.Shadow): every pass reads, asks the agents and
// decides as usual, and records each change it would have committed in
// vigil_shadow_changes instead of making it. Nothing of the control plane's
// changes: no row, no audit row, no DestroySandbox, no event, no volume.
//
// Beside the old monitor loop, the two race: whichever sees a condition first
// acts, and vigil, which never acts, then finds the row already changed. So
// shadow mode remembers, per host, the rows its last pass decided nothing
// about, and when one of them changed before the next pass it replays the
// rules on the row as it was, with the agent's new report: a change the rules
// make then is recorded as replayed ("vigil would have done this too"), and
// shadow-report counts it as agreement when the other writer's audit row
// matches, and ignores it otherwise.

// shadowReplayWindow bounds how old a remembered row may be for a replay:
// older memories (a shard owned again after a long time) are not replayed.
const shadowReplayWindow = 10 * time.Minute

// shadowMemory is what shadow mode remembers of each host between passes.
// Its mutex guards its one map.
type shadowMemory struct {
	mu    sync.Mutex
	hosts map[uuid.UUID]*shadowSeen
}

type shadowSeen struct {
	status   string // the host's status at the last read; "" when vigil decided to mark it down
	statusAt time.Time
	rows     []Row  // the rows the last decision left alone
	report   Report // the agent's report they were decided on
	rowsAt   time.Time
}

func newShadowMemory() *shadowMemory { return &shadowMemory{hosts: map[uuid.UUID]*shadowSeen{}} }

func (m *shadowMemory) seen(h uuid.UUID) *shadowSeen {
	s := m.hosts[h]
	if s == nil {
		s = &shadowSeen{}
		m.hosts[h] = s
	}
	return s
}

// hosts remembers the hosts of a read and returns the replayed mark-downs:
// hosts now unreachable and stale that the last read saw in another status
// and did not decide to mark (another writer marked them in between).
// decided are the hosts this pass will mark itself.
func (m *shadowMemory) hostsRead(rd store.Read, decided map[uuid.UUID]bool, reason string) []store.ShadowChange {
	m.mu.Lock()
	defer m.mu.Unlock()
	var out []store.ShadowChange
	now := time.Now()
	for _, h := range rd.Hosts {
		s := m.seen(h.ID)
		if s.status != "" && s.status != status.HostUnreachable && now.Sub(s.statusAt) < shadowReplayWindow &&
			h.Status == status.HostUnreachable && h.Stale {
			c := store.ShadowChange{Host: h.ID, From: s.status, To: status.HostUnreachable, Basis: s.statusAt, Replayed: true}
			if h.TeamID.Valid { // a shared host's is silent: never compared
				c.Action, c.Reason = "marked_down", reason
				out = append(out, c)
			}
		}
		s.status, s.statusAt = h.Status, now
		if decided[h.ID] {
			s.status = ""
		}
	}
	return out
}

// rowsDecided remembers the rows of host h that the decision left alone and
// returns the replayed changes: rows the last decision left alone that
// changed since, for which the rules, replayed on the row as it was with
// the agent's report of then or of now, make a change. (The other writer
// acted somewhere between the two reports: an orphan shows in the new one;
// a destroy it re-sent and the agent took shows only in the old one, which
// still had the VM.)
func (m *shadowMemory) rowsDecided(rules Rules, h uuid.UUID, rows []Row, acts []Action, report Report, now time.Time) []store.ShadowChange {
	acted := make(map[uuid.UUID]bool, len(acts))
	for _, a := range acts {
		acted[a.Sandbox] = true
	}
	cur := make(map[uuid.UUID]Row, len(rows))
	left := make([]Row, 0, len(rows))
	for _, r := range rows {
		cur[r.ID] = r
		if !acted[r.ID] {
			left = append(left, r)
		}
	}
	m.mu.Lock()
	s := m.seen(h)
	prev, prevReport, prevAt := s.rows, s.report, s.rowsAt
	s.rows, s.report, s.rowsAt = left, report, time.Now()
	m.mu.Unlock()
	if time.Since(prevAt) >= shadowReplayWindow {
		return nil
	}
	var out []store.ShadowChange
	for _, p := range prev {
		if c, ok := cur[p.ID]; ok && c.Status == p.Status && c.LastUpdated.Equal(p.LastUpdated) {
			continue // unchanged
		}
		seen := map[store.ShadowChange]bool{}
		for _, rep := range []Report{report, prevReport} {
			for _, a := range Decide(rules, []Row{p}, rep, now) {
				c := shadowChange(h, a)
				c.Replayed = true
				// A silent change is never compared: no replay of one.
				if a.Kind != DestroyZombie && a.Audit != nil && !seen[c] {
					seen[c] = true
					out = append(out, c)
				}
			}
		}
	}
	return out
}

// shadowChange is the record of action a of host h.
func shadowChange(h uuid.UUID, a Action) store.ShadowChange {
	c := store.ShadowChange{Host: h, Sandbox: uuid.NullUUID{UUID: a.Sandbox, Valid: true}, From: a.From, To: a.To, Basis: a.Seen}
	if a.Audit != nil {
		c.Action, c.Reason, c.Phase = a.Audit.Action, a.Audit.Reason, a.Audit.Phase
	}
	return c
}

// shadow records the plans' decisions, and the replays of rows other
// writers changed since the last pass, in one fenced statement. Every host
// of the plans is then Done: its agent answered and its record committed.
func (p *Pass) shadow(ctx context.Context, plans []hostPlan) error {
	var cs []store.ShadowChange
	for _, pl := range plans {
		h := pl.host
		for _, a := range pl.actions {
			cs = append(cs, shadowChange(h, a))
		}
		cs = append(cs, p.r.shadowMem.rowsDecided(p.r.cfg.Rules, h, p.rows(p.read.Hosts[pl.t].Sandboxes), pl.actions, pl.report, p.read.Now)...)
	}
	rec, err := p.r.store.RecordShadow(ctx, p.f, cs)
	if err != nil {
		p.failBatch(plans, p.r.fenced(err))
		return err
	}
	p.r.countShadow(rec)
	now := time.Now()
	for _, pl := range plans {
		p.out[pl.t].Done = now
	}
	return nil
}

// shadowPassive is the passive rule in shadow mode: what it would change
// is recorded, with the replays of hosts another writer marked since the
// last read. Nothing is marked.
func (r *Reconciler) shadowPassive(ctx context.Context, f store.Fence, md store.PassiveInput, replays []store.ShadowChange) error {
	rec, err := r.store.ShadowPassive(ctx, f, md)
	if err != nil {
		return err
	}
	r.countShadow(rec)
	_, err = r.store.RecordShadow(ctx, f, replays)
	return err
}

// countShadow counts the recorded changes vigil would have made (not the
// replays of changes another writer made).
func (r *Reconciler) countShadow(cs []store.ShadowChange) {
	for _, c := range cs {
		if !c.Replayed {
			r.m.shadow.WithLabelValues(c.From, c.To).Inc()
		}
	}
}
