package agentsim

import (
	"context"
	"fmt"
	"time"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5/pgtype"

	"github.com/vigil-sh/vigil/internal/status"
)

// batch bounds the rows one registration statement carries.
const batch = 20000

// register upserts every host as online with its address and a fresh
// heartbeat, then upserts the seeded sandboxes as running. Re-running with
// the same seed re-registers the same rows.
func (s *Sim) register(ctx context.Context) error {
	if s.pool == nil {
		return nil
	}
	start := time.Now()
	for lo := 0; lo < len(s.hosts); lo += batch {
		hs := s.hosts[lo:min(lo+batch, len(s.hosts))]
		idArr := make([]pgtype.UUID, len(hs))
		teams := make([]pgtype.UUID, len(hs))
		addrs := make([]string, len(hs))
		for i, h := range hs {
			idArr[i] = pgtype.UUID{Bytes: h.id, Valid: true}
			teams[i] = pgtype.UUID{Bytes: h.team, Valid: !h.shared}
			addrs[i] = s.address(h)
		}
		_, err := s.pool.Exec(ctx, `
insert into hosts (id, type, team_id, address, status, last_heartbeat_at, created_at, updated_at)
select id, 'regular', team_id, address, $4::text, now(), now(), now()
from unnest($1::uuid[], $2::uuid[], $3::text[]) as t(id, team_id, address)
on conflict (id) do update set
    type = excluded.type, team_id = excluded.team_id, address = excluded.address,
    status = excluded.status, last_heartbeat_at = now(), updated_at = now()`,
			idArr, teams, addrs, status.HostOnline)
		if err != nil {
			return fmt.Errorf("agentsim: register hosts: %w", err)
		}
	}

	var sbIDs, sbTeams, sbHosts []pgtype.UUID
	var created []time.Time
	flush := func() error {
		if len(sbIDs) == 0 {
			return nil
		}
		_, err := s.pool.Exec(ctx, `
insert into sandboxes (id, team_id, host_id, status, last_updated, created_at)
select id, team_id, host_id, $5::text, now(), created_at
from unnest($1::uuid[], $2::uuid[], $3::uuid[], $4::timestamptz[]) as t(id, team_id, host_id, created_at)
on conflict (id) do update set
    team_id = excluded.team_id, host_id = excluded.host_id, status = excluded.status, last_updated = now()`,
			sbIDs, sbTeams, sbHosts, created, status.Running)
		sbIDs, sbTeams, sbHosts, created = sbIDs[:0], sbTeams[:0], sbHosts[:0], created[:0]
		if err != nil {
			return fmt.Errorf("agentsim: seed sandboxes: %w", err)
		}
		return nil
	}
	for _, h := range s.hosts {
		h.mu.Lock()
		for _, vm := range h.vms {
			sbIDs = append(sbIDs, pgtype.UUID{Bytes: vm.ID, Valid: true})
			sbTeams = append(sbTeams, pgtype.UUID{Bytes: vm.TeamID, Valid: true})
			sbHosts = append(sbHosts, pgtype.UUID{Bytes: h.id, Valid: true})
			created = append(created, vm.CreatedAt)
		}
		h.mu.Unlock()
		if len(sbIDs) >= batch {
			if err := flush(); err != nil {
				return err
			}
		}
	}
	if err := flush(); err != nil {
		return err
	}
	s.log.Info("hosts registered", "hosts", len(s.hosts), "elapsed", time.Since(start))
	return nil
}

// Heartbeat writes one heartbeat round the way the control plane does: every
// host whose mode lets it heartbeat gets last_heartbeat_at = now(), and an
// unreachable one becomes online, in one statement. It returns the number of
// hosts that heartbeated.
func (s *Sim) Heartbeat(ctx context.Context) (int, error) {
	if s.pool == nil {
		return 0, ErrNoDatabase
	}
	now := s.now()
	alive := make([]pgtype.UUID, 0, len(s.hosts))
	for _, h := range s.hosts {
		if h.mode.Load().heartbeats(now) {
			alive = append(alive, pgtype.UUID{Bytes: h.id, Valid: true})
		}
	}
	if len(alive) == 0 {
		return 0, nil
	}
	_, err := s.pool.Exec(ctx, `
update hosts set last_heartbeat_at = now(),
    status = case when status = $2::text then $3::text else status end,
    updated_at = now()
where id = any($1)`, alive, status.HostUnreachable, status.HostOnline)
	if err != nil {
		return 0, fmt.Errorf("agentsim: heartbeat: %w", err)
	}
	return len(alive), nil
}

// heartbeatLoop heartbeats every HeartbeatInterval until ctx ends.
func (s *Sim) heartbeatLoop(ctx context.Context) {
	t := time.NewTicker(s.cfg.HeartbeatInterval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		if _, err := s.Heartbeat(ctx); err != nil && ctx.Err() == nil {
			s.log.Warn("heartbeat failed", "error", err)
		}
	}
}

// transition moves a sandbox row from one status to another only if it still
// has the first, as the control plane's API does. It reports whether the row
// changed.
func (s *Sim) transition(ctx context.Context, id uuid.UUID, from, to string) (bool, error) {
	tag, err := s.pool.Exec(ctx,
		`update sandboxes set status = $3, last_updated = now() where id = $1 and status = $2`,
		pgtype.UUID{Bytes: id, Valid: true}, from, to)
	if err != nil {
		return false, fmt.Errorf("agentsim: sandbox %s %s -> %s: %w", id, from, to, err)
	}
	return tag.RowsAffected() == 1, nil
}
