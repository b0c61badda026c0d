package store

import (
	"context"
	"fmt"
	"time"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgtype"

	"github.com/vigil-sh/vigil/internal/status"
)

// Shadow mode (SPEC §4): ownership, passes and agent reads as usual, but the
// changes are recorded in vigil_shadow_changes instead of being made.
// Nothing here writes a control-plane table.

// ShadowChange is a change shadow mode would have committed.
type ShadowChange struct {
	Host    uuid.UUID
	Sandbox uuid.NullUUID // not valid: a change of the host row
	From    string
	To      string
	// Action, Reason and Phase are those of the audit row the change would
	// have written; Action is "" for a silent change.
	Action, Reason, Phase string
	// Basis is what the decision was based on: the sandbox row's
	// last_updated, or the host's last heartbeat (the Unix epoch for none).
	Basis time.Time
	// Replayed: another writer made the change between two passes, and the
	// rules replayed on the row as the earlier pass read it make it too.
	Replayed bool
}

// RecordShadow records cs under the fence, each unless the same change of
// the same row on the same basis for the same reason is recorded already, and returns the ones
// it recorded. Nothing is written when cs is empty.
func (s *Store) RecordShadow(ctx context.Context, f Fence, cs []ShadowChange) ([]ShadowChange, error) {
	if len(cs) == 0 {
		return nil, nil
	}
	n := len(cs)
	idx := make([]int32, n)
	host := make([]uuid.UUID, n)
	sb := make([]pgtype.UUID, n)
	from, to, act, reason, phase := make([]string, n), make([]string, n), make([]string, n), make([]string, n), make([]string, n)
	basis := make([]time.Time, n)
	replayed := make([]bool, n)
	for i, c := range cs {
		idx[i], host[i], sb[i] = int32(i), c.Host, pgtype.UUID{Bytes: c.Sandbox.UUID, Valid: c.Sandbox.Valid}
		from[i], to[i], act[i], reason[i], phase[i], basis[i], replayed[i] = c.From, c.To, c.Action, c.Reason, c.Phase, c.Basis, c.Replayed
	}
	var out []ShadowChange
	err := s.WithFence(ctx, f, func(tx pgx.Tx) error {
		out = out[:0]
		rows, err := tx.Query(ctx, `
			with c as (
				select * from unnest($1::int[], $2::uuid[], $3::uuid[], $4::text[], $5::text[], $6::text[], $7::text[], $8::text[], $9::timestamptz[], $10::bool[])
				           as c(idx, host_id, sandbox_id, from_status, to_status, action, reason, phase, basis, replayed)),
			ins as (
				insert into vigil_shadow_changes (shard, token, replica, host_id, sandbox_id, from_status, to_status, action, reason, phase, basis, replayed)
				select $11, $12, $13, host_id, sandbox_id, from_status, to_status, action, reason, phase, basis, replayed from c order by idx
				    on conflict do nothing
				returning host_id, sandbox_id, from_status, to_status, basis, reason)
			select c.idx from ins join c on c.host_id = ins.host_id and c.sandbox_id is not distinct from ins.sandbox_id
			   and c.from_status = ins.from_status and c.to_status = ins.to_status and c.basis = ins.basis and c.reason = ins.reason`,
			idx, host, sb, from, to, act, reason, phase, basis, replayed, f.Shard, f.Token, f.Replica)
		if err != nil {
			return fmt.Errorf("store: record %d shadow changes: %w", n, err)
		}
		got, err := pgx.CollectRows(rows, pgx.RowTo[int32])
		if err != nil {
			return fmt.Errorf("store: record %d shadow changes: %w", n, err)
		}
		for _, i := range got {
			out = append(out, cs[i])
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	return out, nil
}

// ShadowPassive is Passive in shadow: it changes nothing and
// records, under the fence and in one statement, what Passive would
// change now (judged by the database clock): each candidate host that would
// become unreachable (with the audit action and reason of m.Audit when it
// has a team, silent otherwise) and its sandboxes in m.Live that would
// become missing. It returns the changes it recorded (not those recorded
// before).
func (s *Store) ShadowPassive(ctx context.Context, f Fence, m PassiveInput) ([]ShadowChange, error) {
	if len(m.Hosts) == 0 {
		return nil, nil
	}
	reason, _ := m.Audit.Metadata["reason"].(string)
	var out []ShadowChange
	err := s.WithFence(ctx, f, func(tx pgx.Tx) error {
		out = out[:0]
		rows, err := tx.Query(ctx, `
			with cand as (
				select h.id, h.status as was, h.team_id, coalesce(h.last_heartbeat_at, 'epoch'::timestamptz) as basis
				  from hosts h
				 where h.id = any($1) and h.status <> $9
				   and (h.last_heartbeat_at is null or h.last_heartbeat_at < now() - make_interval(secs => $2))),
			hs as (
				insert into vigil_shadow_changes (shard, token, replica, host_id, sandbox_id, from_status, to_status, action, reason, phase, basis)
				select $3, $4, $5, id, null, was, $9,
				       case when team_id is null then '' else $6 end, case when team_id is null then '' else $7 end, '', basis
				  from cand
				    on conflict do nothing
				returning host_id, sandbox_id, from_status, to_status, action, reason, basis),
			ss as (
				insert into vigil_shadow_changes (shard, token, replica, host_id, sandbox_id, from_status, to_status, action, reason, phase, basis)
				select $3, $4, $5, s.host_id, s.id, s.status, $10, '', '', '', s.last_updated
				  from sandboxes s join cand on s.host_id = cand.id
				 where s.status = any($8) and s.team_id is not null
				    on conflict do nothing
				returning host_id, sandbox_id, from_status, to_status, action, reason, basis)
			select * from hs union all select * from ss`,
			m.Hosts, m.StaleAfter.Seconds(), f.Shard, f.Token, f.Replica, m.Audit.Action, reason, m.Live,
			status.HostUnreachable, status.Missing)
		if err != nil {
			return fmt.Errorf("store: shadow mark-down: %w", err)
		}
		out, err = pgx.CollectRows(rows, func(r pgx.CollectableRow) (ShadowChange, error) {
			var c ShadowChange
			err := r.Scan(&c.Host, &c.Sandbox, &c.From, &c.To, &c.Action, &c.Reason, &c.Basis)
			return c, err
		})
		if err != nil {
			return fmt.Errorf("store: shadow mark-down: %w", err)
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	return out, nil
}

// ShadowRecord is a recorded shadow change with when it was recorded.
type ShadowRecord struct {
	ShadowChange
	At    time.Time
	Shard int
}

// ShadowChanges lists the shadow changes recorded in [from, to), oldest
// first.
func (s *Store) ShadowChanges(ctx context.Context, from, to time.Time) ([]ShadowRecord, error) {
	rows, err := s.pool.Query(ctx, `
		select at, shard, host_id, sandbox_id, from_status, to_status, action, reason, phase, basis, replayed
		  from vigil_shadow_changes where at >= $1 and at < $2 order by at, seq`, from, to)
	if err != nil {
		return nil, fmt.Errorf("store: read shadow changes: %w", err)
	}
	out, err := pgx.CollectRows(rows, func(r pgx.CollectableRow) (ShadowRecord, error) {
		var c ShadowRecord
		err := r.Scan(&c.At, &c.Shard, &c.Host, &c.Sandbox, &c.From, &c.To, &c.Action, &c.Reason, &c.Phase, &c.Basis, &c.Replayed)
		return c, err
	})
	if err != nil {
		return nil, fmt.Errorf("store: read shadow changes: %w", err)
	}
	return out, nil
}

// SystemAudit is an audit row a system actor other than vigil wrote about
// a host or a sandbox.
type SystemAudit struct {
	At           time.Time
	ResourceType string
	ResourceID   string
	Action       string
	Reason       string
	Phase        string
}

// SystemAudits lists the system audit rows about hosts and sandboxes written
// in [from, to) by anyone but vigil (whose rows carry its fence token),
// oldest first.
func (s *Store) SystemAudits(ctx context.Context, from, to time.Time) ([]SystemAudit, error) {
	rows, err := s.pool.Query(ctx, `
		select created_at, resource_type, coalesce(resource_id, ''), action,
		       coalesce(metadata->>'reason', ''), coalesce(metadata->>'phase', '')
		  from audit_logs
		 where created_at >= $1 and created_at < $2 and actor_type = 'system'
		   and resource_type in ('host', 'sandbox') and not coalesce(metadata ? 'fence', false)
		 order by created_at`, from, to)
	if err != nil {
		return nil, fmt.Errorf("store: read system audit rows: %w", err)
	}
	out, err := pgx.CollectRows(rows, func(r pgx.CollectableRow) (SystemAudit, error) {
		var a SystemAudit
		err := r.Scan(&a.At, &a.ResourceType, &a.ResourceID, &a.Action, &a.Reason, &a.Phase)
		return a, err
	})
	if err != nil {
		return nil, fmt.Errorf("store: read system audit rows: %w", err)
	}
	return out, nil
}
