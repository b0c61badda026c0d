package agentsim

import (
	"context"
	"time"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5/pgtype"

	"github.com/vigil-sh/vigil/internal/status"
)

// Mishaps are what goes wrong in a real fleet and what the reconcile rules
// are for, at Config.MishapsPerSecond: each picks a healthy host at random
// and does one of these, the database and the agent left as the real thing
// leaves them.
type mishap int

const (
	// mishapVanish: a running VM dies on its agent; the row stays running
	// (rule 4, orphaned).
	mishapVanish mishap = iota
	// mishapLostDestroy: the control plane sets a running row stopping and
	// its destroy never reaches the agent (rule 9).
	mishapLostDestroy
	// mishapCutShort: the control plane inserts a starting row and crashes
	// before the agent boots anything (rule 6, create timeout).
	mishapCutShort
	// mishapSilentPause: the agent pauses a running VM and the callback is
	// lost; the row stays running (rule 4, host_state_sync).
	mishapSilentPause
	// mishapZombie: the row is stopped but the agent kept the VM paused
	// (rule 5).
	mishapZombie
	// mishapOutage: the host dies for Config.OutageFor, long enough to be
	// marked unreachable, then comes back (rules 1, 3 and 8).
	mishapOutage
	mishapKinds
)

// Mishaps returns how many mishaps happened.
func (s *Sim) Mishaps() int64 { return s.mishaps.Load() }

func (s *Sim) mishapLoop(ctx context.Context) {
	t := time.NewTicker(max(time.Duration(float64(time.Second)/s.cfg.MishapsPerSecond), time.Millisecond))
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			if err := s.mishapOnce(ctx); err != nil && ctx.Err() == nil {
				s.log.Warn("mishap", "error", err)
			}
		}
	}
}

func (s *Sim) mishapOnce(ctx context.Context) error {
	h := s.hosts[s.intn(len(s.hosts))]
	if h.mode.Load().phase(s.now()) != ModeHealthy {
		return nil
	}
	kind := mishap(s.intn(int(mishapKinds)))
	switch kind {
	case mishapCutShort:
		team := h.team
		if h.shared {
			team = s.teams[s.intn(len(s.teams))]
		}
		s.mishaps.Add(1)
		_, err := s.pool.Exec(ctx, `insert into sandboxes (id, team_id, host_id, status, last_updated, created_at) values ($1, $2, $3, $4, now(), now())`,
			pgtype.UUID{Bytes: uuid.New(), Valid: true}, pgtype.UUID{Bytes: team, Valid: true}, pgtype.UUID{Bytes: h.id, Valid: true}, status.Starting)
		return err
	case mishapOutage:
		s.outage(ctx, h)
		return nil
	}
	id, ok := s.pickIdle(h)
	if !ok {
		return nil
	}
	defer s.release(h, id)
	s.mishaps.Add(1)
	switch kind {
	case mishapVanish:
		s.agentStep(h, id, status.Running, "")
	case mishapLostDestroy:
		_, err := s.transition(ctx, id, status.Running, status.Stopping)
		return err
	case mishapSilentPause:
		s.agentStep(h, id, status.Running, status.Paused)
	case mishapZombie:
		if ok, err := s.transition(ctx, id, status.Running, status.Stopped); !ok || err != nil {
			return err
		}
		s.agentStep(h, id, status.Running, status.Paused)
	}
	return nil
}

// pickIdle marks a running VM of h that no churn operation is working on as
// busy and returns it.
func (s *Sim) pickIdle(h *host) (uuid.UUID, bool) {
	h.mu.Lock()
	defer h.mu.Unlock()
	for id, vm := range h.vms {
		if vm.Status == status.Running && !h.busy[id] {
			h.busy[id] = true
			return id, true
		}
	}
	return uuid.Nil, false
}

func (s *Sim) release(h *host, id uuid.UUID) {
	h.mu.Lock()
	delete(h.busy, id)
	h.mu.Unlock()
}

// outage makes h dead and healthy again after Config.OutageFor, unless its
// mode was changed in between (by an operator): then it is left alone.
func (s *Sim) outage(ctx context.Context, h *host) {
	dead := &modeState{Mode: Mode{Kind: ModeDead}, since: s.now()}
	if !h.mode.CompareAndSwap(h.mode.Load(), dead) {
		return
	}
	s.mishaps.Add(1)
	s.log.Info("mishap: host outage", "host", h.id, "for", s.cfg.OutageFor)
	time.AfterFunc(s.cfg.OutageFor, func() {
		if ctx.Err() == nil && h.mode.CompareAndSwap(dead, &modeState{Mode: Mode{Kind: ModeHealthy}, since: s.now()}) {
			s.log.Info("mishap: host back", "host", h.id)
		}
	})
}
