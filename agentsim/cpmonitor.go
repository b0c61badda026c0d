package agentsim

import (
	"context"
	"encoding/json"
	"fmt"
	"time"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5"

	"github.com/vigil-sh/vigil/internal/ids"
	"github.com/vigil-sh/vigil/internal/status"
)

// The control plane's own monitor loop, the one vigil replaces, run by the
// Sim when Config.MonitorInterval is set: the other side of a shadow
// cutover (vigil run --shadow beside it, vigil shadow-report to compare).
// It is written from the control plane's behaviour, not from vigil's rules:
// one loop over every host, host after host; staleness judged by its own
// clock; the agent's transient labels coerced to "present"; a status change
// guarded only by the status it read; audit rows as the control plane's
// audit logger writes them (no fence, a host's marked_down without
// metadata). Its agent calls go straight to the simulated agents in this
// process (the answer they would give, or none in a mode that does not
// answer), its destroys without a fence header.

// Its constants are the control plane's (the heartbeat threshold and the
// transient grace come from Config).
const (
	cpSnapshotGrace = 15 * time.Minute
	cpTimeoutError  = "transient state did not settle within grace period"
)

// cpMonitor is the loop's state: when a stuck destroy was last re-sent, per
// sandbox. Only the loop's goroutine uses it.
type cpMonitor struct {
	s      *Sim
	resent map[uuid.UUID]time.Time
}

// MonitorChanges returns how many changes the control plane's monitor loop
// made (0 when it does not run).
func (s *Sim) MonitorChanges() int64 { return s.monitorChanges.Load() }

func (s *Sim) monitorLoop(ctx context.Context) {
	m := &cpMonitor{s: s, resent: map[uuid.UUID]time.Time{}}
	t := time.NewTicker(s.cfg.MonitorInterval)
	defer t.Stop()
	for {
		m.run(ctx)
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

type cpHost struct {
	id        uuid.UUID
	team      uuid.NullUUID
	address   string
	status    string
	heartbeat *time.Time
}

type cpRow struct {
	id      uuid.UUID
	team    uuid.UUID
	status  string
	updated time.Time
}

func (m *cpMonitor) run(ctx context.Context) {
	rows, err := m.s.pool.Query(ctx, `select id, team_id, coalesce(address, ''), coalesce(status, ''), last_heartbeat_at from hosts`)
	if err != nil {
		m.s.log.Warn("control-plane monitor: list hosts", "error", err)
		return
	}
	hosts, err := pgx.CollectRows(rows, func(r pgx.CollectableRow) (cpHost, error) {
		var h cpHost
		return h, r.Scan(&h.id, &h.team, &h.address, &h.status, &h.heartbeat)
	})
	if err != nil {
		m.s.log.Warn("control-plane monitor: list hosts", "error", err)
		return
	}
	for _, h := range hosts {
		if ctx.Err() != nil {
			return
		}
		if err := m.checkHost(ctx, h); err != nil && ctx.Err() == nil {
			m.s.log.Warn("control-plane monitor: host", "host", h.id, "error", err)
		}
	}
}

func (m *cpMonitor) checkHost(ctx context.Context, h cpHost) error {
	stale := h.heartbeat == nil || time.Since(*h.heartbeat) > m.s.cfg.MonitorUnreachableAfter
	if stale && h.status != status.HostUnreachable {
		return m.markDown(ctx, h)
	}
	if h.status != status.HostOnline || h.address == "" {
		return nil
	}
	sh := m.s.byID[h.id]
	if sh == nil {
		return nil // not one of ours: no agent to ask
	}
	alive, ok := m.s.listForMonitor(sh)
	if !ok {
		return nil // the RPC failed: next time
	}
	anyPaused := false
	for _, l := range alive {
		anyPaused = anyPaused || l == status.Paused
	}
	rows, err := m.rows(ctx, h.id, anyPaused)
	if err != nil {
		return err
	}
	for _, r := range rows {
		label, present := alive[r.id]
		if err := m.checkRow(ctx, sh, r, label, present, anyPaused); err != nil {
			return err
		}
	}
	return nil
}

// markDown marks the host unreachable, its live sandboxes missing, and
// writes the host's audit row when it has a team.
func (m *cpMonitor) markDown(ctx context.Context, h cpHost) error {
	if _, err := m.s.pool.Exec(ctx, `update hosts set status = $2, updated_at = now() where id = $1`, h.id, status.HostUnreachable); err != nil {
		return err
	}
	if _, err := m.s.pool.Exec(ctx, `update sandboxes set status = $2, last_updated = now() where host_id = $1 and status = any($3)`,
		h.id, status.Missing, []string{status.Running, status.Starting, status.Pending, status.Pausing, status.Resuming, status.Stopping}); err != nil {
		return err
	}
	m.s.monitorChanges.Add(1)
	if !h.team.Valid {
		return nil
	}
	return m.audit(ctx, h.team.UUID, "host", ids.Host(h.id), "marked_down", "error", nil)
}

// rows reads the host's rows the rules look at; stopped ones only when the
// agent reports something paused (zombies).
func (m *cpMonitor) rows(ctx context.Context, host uuid.UUID, stopped bool) ([]cpRow, error) {
	statuses := []string{status.Missing, status.Running, status.Starting, status.Resuming, status.Pausing, status.Stopping, status.Snapshotting}
	if stopped {
		statuses = append(statuses, status.Stopped)
	}
	rows, err := m.s.pool.Query(ctx, `select id, team_id, status, last_updated from sandboxes where host_id = $1 and status = any($2)`,
		host, statuses)
	if err != nil {
		return nil, err
	}
	return pgx.CollectRows(rows, func(r pgx.CollectableRow) (cpRow, error) {
		var x cpRow
		return x, r.Scan(&x.id, &x.team, &x.status, &x.updated)
	})
}

// checkRow applies the control plane's rules to one row; label is the
// agent's coerced status ("" for a transient label) when present.
func (m *cpMonitor) checkRow(ctx context.Context, h *host, r cpRow, label string, present, anyPaused bool) error {
	age := time.Since(r.updated)
	reason := func(s string) map[string]any { return map[string]any{"reason": s} }
	switch r.status {
	case status.Missing:
		switch {
		case !present:
			return m.change(ctx, r, status.Stopped, "destroy", "warning", reason("orphaned"))
		case label == status.Paused:
			return m.change(ctx, r, status.Paused, "pause", "info", reason("restored_after_host_recovery"))
		case label != "":
			return m.change(ctx, r, label, "", "", nil)
		}
	case status.Running:
		switch {
		case !present:
			return m.change(ctx, r, status.Stopped, "destroy", "warning", reason("orphaned"))
		case label == status.Paused:
			return m.change(ctx, r, status.Paused, "pause", "info", reason("host_state_sync"))
		case label != "" && label != status.Running:
			return m.change(ctx, r, label, "", "", nil)
		}
	case status.Stopped:
		if anyPaused && present && label == status.Paused && m.s.destroyUnfenced(h, r.id) {
			m.s.monitorChanges.Add(1)
			return m.audit(ctx, r.team, "sandbox", ids.Sandbox(r.id), "destroy", "warning", reason("paused_zombie_cleanup"))
		}
	case status.Starting, status.Resuming, status.Pausing, status.Stopping, status.Snapshotting:
		return m.checkTransient(ctx, h, r, label, present, age)
	}
	return nil
}

func (m *cpMonitor) checkTransient(ctx context.Context, h *host, r cpRow, label string, present bool, age time.Duration) error {
	withErr := func(reason, phase string) map[string]any {
		meta := map[string]any{"reason": reason, "error": cpTimeoutError}
		if phase != "" {
			meta["phase"] = phase
		}
		return meta
	}
	if present {
		switch {
		case r.status == status.Starting || r.status == status.Resuming:
			return m.change(ctx, r, status.Running, "", "", nil)
		case r.status == status.Snapshotting && age >= cpSnapshotGrace:
			to := label
			if to != status.Running && to != status.Paused {
				to = status.Running
			}
			return m.change(ctx, r, to, "snapshot", "info", map[string]any{"reason": "snapshot_recovered"})
		case r.status == status.Stopping && age >= m.s.cfg.MonitorTransientGrace && time.Since(m.resent[r.id]) >= m.s.cfg.MonitorTransientGrace:
			// The newest monitor: a lost destroy is sent again, and once
			// the agent takes it the row is finished.
			m.resent[r.id] = time.Now()
			if m.s.destroyUnfenced(h, r.id) {
				return m.change(ctx, r, status.Stopped, "destroy", "warning", map[string]any{"reason": "destroy_retry"})
			}
		}
		return nil
	}
	if age < m.s.cfg.MonitorTransientGrace {
		return nil
	}
	switch r.status {
	case status.Starting:
		return m.change(ctx, r, status.Error, "error", "error", withErr("transient_timeout", "create"))
	case status.Resuming:
		return m.change(ctx, r, status.Error, "error", "error", withErr("transient_timeout", "resume"))
	case status.Snapshotting:
		return m.change(ctx, r, status.Error, "snapshot", "error", withErr("transient_timeout", ""))
	case status.Pausing:
		return m.change(ctx, r, status.Paused, "pause", "info", map[string]any{"reason": "transient_timeout_inferred"})
	case status.Stopping:
		return m.change(ctx, r, status.Stopped, "destroy", "warning", map[string]any{"reason": "transient_timeout_inferred"})
	}
	return nil
}

// change moves the row from the status it read to to, and when that
// happened writes the audit row (none when action is "").
func (m *cpMonitor) change(ctx context.Context, r cpRow, to, action, st string, meta map[string]any) error {
	ok, err := m.s.transition(ctx, r.id, r.status, to)
	if err != nil || !ok {
		return err
	}
	m.s.monitorChanges.Add(1)
	if action == "" {
		return nil
	}
	return m.audit(ctx, r.team, "sandbox", ids.Sandbox(r.id), action, st, meta)
}

func (m *cpMonitor) audit(ctx context.Context, team uuid.UUID, rtype, rid, action, st string, meta map[string]any) error {
	b := []byte("{}")
	if len(meta) > 0 {
		var err error
		if b, err = json.Marshal(meta); err != nil {
			return err
		}
	}
	_, err := m.s.pool.Exec(ctx, `
		insert into audit_logs (id, team_id, actor_type, actor_id, actor_name, resource_type, resource_id, action, scope, status, metadata, created_at)
		values (gen_random_uuid(), $1, 'system', null, '', $2, $3, $4, 'team', $5, $6::jsonb, now())`,
		team, rtype, rid, action, st, string(b))
	if err != nil {
		return fmt.Errorf("audit %s %s: %w", action, rid, err)
	}
	return nil
}

// listForMonitor is the answer host's agent would give ListSandboxes now,
// labels coerced as the control plane coerces them (pausing, resuming,
// starting, stopping: present, status ""), or ok false when the agent would
// not answer.
func (s *Sim) listForMonitor(h *host) (map[uuid.UUID]string, bool) {
	switch h.mode.Load().phase(s.now()) {
	case ModeDead, ModeHang, ModeMalformed:
		return nil, false
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	out := make(map[uuid.UUID]string, len(h.vms))
	for id, vm := range h.vms {
		l := vm.Status
		switch l {
		case status.Pausing, status.Resuming, status.Starting, status.Stopping:
			l = ""
		}
		out[id] = l
	}
	return out, true
}

// destroyUnfenced is a DestroySandbox without a fence header, as the
// control plane sends it; it reports whether the agent accepted it
// (not_found included).
func (s *Sim) destroyUnfenced(h *host, id uuid.UUID) bool {
	switch k := h.mode.Load().phase(s.now()); k {
	case ModeDead, ModeHang, ModeMalformed, ModeRefuseDestroy:
		return false
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	rec := DestroyRecord{Host: h.id, Sandbox: ids.Sandbox(id), Time: s.now(), Result: DestroyNotFound}
	if _, ok := h.vms[id]; ok {
		delete(h.vms, id)
		rec.Result = DestroyDestroyed
	}
	h.destroys = appendRecord(h.destroys, rec)
	return true
}
