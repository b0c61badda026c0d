package agentsim

import (
	"context"
	"fmt"
	"sync"
	"time"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5/pgtype"

	"github.com/vigil-sh/vigil/internal/status"
)

// churnOp is one control-plane sandbox operation.
type churnOp int

const (
	opNone churnOp = iota
	opCreate
	opPause
	opResume
	opSnapshot
	opDestroy
)

func (o churnOp) String() string {
	return [...]string{"none", "create", "pause", "resume", "snapshot", "destroy"}[o]
}

// ChurnOps returns how many churn operations ran to completion.
func (s *Sim) ChurnOps() int64 { return s.churnDone.Load() }

// churnLoop starts ChurnPerSecond operations a second, at most
// ChurnConcurrency at once (operations due beyond that are skipped), until
// ctx ends; it returns once every operation it started has returned.
// Operations cut short by ctx leave their sandbox in a transient status, as a
// crashed control plane would.
func (s *Sim) churnLoop(ctx context.Context) {
	tick := max(time.Duration(float64(time.Second)/s.cfg.ChurnPerSecond), time.Millisecond)
	perTick := s.cfg.ChurnPerSecond * tick.Seconds()
	sem := make(chan struct{}, s.cfg.ChurnConcurrency)
	var wg sync.WaitGroup
	defer wg.Wait()
	t := time.NewTicker(tick)
	defer t.Stop()
	credit := 0.0
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		for credit += perTick; credit >= 1; credit-- {
			select {
			case sem <- struct{}{}:
				wg.Go(func() {
					defer func() { <-sem }()
					s.churnOnce(ctx)
				})
			default:
			}
		}
	}
}

func (s *Sim) intn(n int) int {
	s.rngMu.Lock()
	defer s.rngMu.Unlock()
	return s.rng.IntN(n)
}

func (s *Sim) float() float64 {
	s.rngMu.Lock()
	defer s.rngMu.Unlock()
	return s.rng.Float64()
}

// churnOnce runs one operation on a random host whose agent answers.
func (s *Sim) churnOnce(ctx context.Context) {
	h := s.hosts[s.intn(len(s.hosts))]
	if k := h.mode.Load().phase(s.now()); k != ModeHealthy && k != ModeSlow {
		return // the control plane cannot reach this agent
	}
	op, id, team := s.pickOp(h)
	if op == opNone {
		return
	}
	defer func() {
		h.mu.Lock()
		delete(h.busy, id)
		h.mu.Unlock()
	}()
	var err error
	switch op {
	case opCreate:
		err = s.create(ctx, h, id, team)
	case opPause:
		err = s.step(ctx, h, id, status.Running, status.Pausing, status.Paused, status.Pausing, status.Paused)
	case opResume:
		err = s.step(ctx, h, id, status.Paused, status.Resuming, status.Running, status.Resuming, status.Running)
	case opSnapshot:
		err = s.step(ctx, h, id, status.Running, status.Snapshotting, status.Running, status.Running, status.Running)
	case opDestroy:
		err = s.step(ctx, h, id, status.Running, status.Stopping, status.Stopped, status.Stopping, "")
	}
	if err != nil {
		if ctx.Err() == nil {
			s.log.Debug("churn operation abandoned", "op", op, "host", h.id, "sandbox", id, "error", err)
		}
		return
	}
	s.churnDone.Add(1)
}

// pickOp chooses an operation for h that keeps its population near
// SandboxesPerHost, and marks the sandbox busy.
func (s *Sim) pickOp(h *host) (churnOp, uuid.UUID, uuid.UUID) {
	target := max(s.cfg.SandboxesPerHost, 1)
	r := s.float()
	h.mu.Lock()
	defer h.mu.Unlock()
	n := len(h.vms)
	if n == 0 || (n < target && r < 0.5) {
		id := uuid.New()
		team := h.team
		if h.shared {
			team = s.teams[s.intn(len(s.teams))]
		}
		h.busy[id] = true
		return opCreate, id, team
	}
	var idle []*VM
	for id, vm := range h.vms {
		if !h.busy[id] && (vm.Status == status.Running || vm.Status == status.Paused) {
			idle = append(idle, vm)
		}
	}
	if len(idle) == 0 {
		return opNone, uuid.Nil, uuid.Nil
	}
	vm := idle[s.intn(len(idle))]
	op := opResume
	if vm.Status == status.Running {
		destroy := 0.15
		if n > target {
			destroy = 0.5
		}
		switch r2 := s.float(); {
		case r2 < destroy:
			op = opDestroy
		case r2 < destroy+(1-destroy)*0.6:
			op = opPause
		default:
			op = opSnapshot
		}
	}
	h.busy[vm.ID] = true
	return op, vm.ID, vm.TeamID
}

// create inserts a starting row, boots the VM, and moves the row to running.
func (s *Sim) create(ctx context.Context, h *host, id, team uuid.UUID) error {
	_, err := s.pool.Exec(ctx,
		`insert into sandboxes (id, team_id, host_id, status, last_updated, created_at) values ($1, $2, $3, $4, now(), now())`,
		pgtype.UUID{Bytes: id, Valid: true}, pgtype.UUID{Bytes: team, Valid: true}, pgtype.UUID{Bytes: h.id, Valid: true}, status.Starting)
	if err != nil {
		return fmt.Errorf("insert sandbox: %w", err)
	}
	h.mu.Lock()
	h.vms[id] = newVM(id, status.Starting, team, s.now())
	h.mu.Unlock()
	if err := s.stepDelay(ctx); err != nil {
		return err
	}
	if !s.agentStep(h, id, status.Starting, status.Running) {
		return fmt.Errorf("VM left %s", status.Starting)
	}
	return s.cas(ctx, id, status.Starting, status.Running)
}

// step runs one operation: the row goes from -> via, the agent shows
// agentVia, then agentTo ("" removes the VM), then the row goes via -> to.
func (s *Sim) step(ctx context.Context, h *host, id uuid.UUID, from, via, to, agentVia, agentTo string) error {
	if err := s.cas(ctx, id, from, via); err != nil {
		return err
	}
	if !s.agentStep(h, id, from, agentVia) {
		return fmt.Errorf("VM left %s", from)
	}
	if err := s.stepDelay(ctx); err != nil {
		return err
	}
	if !s.agentStep(h, id, agentVia, agentTo) {
		return fmt.Errorf("VM left %s", agentVia)
	}
	return s.cas(ctx, id, via, to)
}

func (s *Sim) cas(ctx context.Context, id uuid.UUID, from, to string) error {
	ok, err := s.transition(ctx, id, from, to)
	if err != nil {
		return err
	}
	if !ok {
		return fmt.Errorf("row no longer %s", from)
	}
	return nil
}

// agentStep changes the VM's label from -> to ("" removes it), only if it
// still exists with label from.
func (s *Sim) agentStep(h *host, id uuid.UUID, from, to string) bool {
	h.mu.Lock()
	defer h.mu.Unlock()
	vm, ok := h.vms[id]
	if !ok || vm.Status != from {
		return false
	}
	if to == "" {
		delete(h.vms, id)
		return true
	}
	vm.Status = to
	vm.LastActiveAt = s.now()
	return true
}

// stepDelay waits ChurnStepDelay or until ctx ends.
func (s *Sim) stepDelay(ctx context.Context) error {
	if s.cfg.ChurnStepDelay <= 0 {
		return ctx.Err()
	}
	t := time.NewTimer(s.cfg.ChurnStepDelay)
	defer t.Stop()
	select {
	case <-t.C:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}
