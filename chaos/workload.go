package chaos

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"sync"
	"time"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5"

	"github.com/vigil-sh/vigil/agentsim"
	"github.com/vigil-sh/vigil/internal/status"
)

// workload is the world vigil watches: agentsim's hosts (agents answering,
// heartbeats), the control plane's sandbox churn on them, host faults, and
// bad control-plane input. The churn is the harness's own, written the way
// the control plane (and agentsim's churn) writes it — every row change a
// compare-and-set with last_updated = now(), the agent's VM changing between
// the steps — because agentsim's churn cannot be stopped without stopping
// the agents, and the final checks need a quiet world with live agents.
type workload struct {
	e     *env
	sim   *agentsim.Sim
	hosts []uuid.UUID
	teams []uuid.UUID

	simCancel context.CancelFunc
	simDone   chan error
	bg        sync.WaitGroup // goroutines that live as long as agentsim

	mu     sync.Mutex
	rng    *rand.Rand // the workload's own choices (not the nemeses')
	busy   map[uuid.UUID]bool
	faulty map[uuid.UUID]hostFault // hosts in a fault mode, until when
	bad    badInput
	counts map[string]int // what the workload did, by kind
	// finalDead are the hosts left dead through the quiet period: the
	// checker expects them unreachable.
	finalDead map[uuid.UUID]bool

	loopCtx    context.Context // ends at stopLoops
	loopCancel context.CancelFunc
	loops      sync.WaitGroup
	ops        sync.WaitGroup // churn operations in flight
}

type hostFault struct {
	kind  agentsim.Kind
	until time.Time
}

func startWorkload(ctx context.Context, e *env) (*workload, error) {
	sim, err := agentsim.New(agentsim.Config{
		DatabaseURL: e.dbURL, Hosts: e.cfg.Hosts, HeartbeatInterval: e.cfg.HeartbeatInterval,
		Teams: 8, SharedFraction: 0.1, SandboxesPerHost: 3, Seed: e.cfg.Seed, Latency: time.Millisecond,
	})
	if err != nil {
		return nil, err
	}
	w := &workload{
		e: e, sim: sim, rng: rand.New(rand.NewPCG(uint64(e.cfg.Seed), 0x776f726b)),
		busy: map[uuid.UUID]bool{}, faulty: map[uuid.UUID]hostFault{}, counts: map[string]int{},
		simDone: make(chan error, 1),
	}
	sctx, cancel := context.WithCancel(context.Background())
	w.simCancel = cancel
	go func() { w.simDone <- sim.Run(sctx) }()
	select {
	case <-sim.Ready():
	case err := <-w.simDone:
		cancel()
		return nil, err
	case <-time.After(60 * time.Second):
		cancel()
		<-w.simDone
		return nil, errors.New("agentsim not ready after 60s")
	case <-ctx.Done():
		cancel()
		<-w.simDone
		return nil, ctx.Err()
	}
	w.hosts, w.teams = sim.HostIDs(), sim.Teams()
	w.finalDead = map[uuid.UUID]bool{}
	if err := w.createBadHosts(ctx); err != nil {
		w.stop()
		return nil, err
	}
	if err := w.seedVolumes(ctx); err != nil {
		w.stop()
		return nil, err
	}
	lctx, lcancel := context.WithCancel(context.Background())
	w.loopCtx, w.loopCancel = lctx, lcancel
	w.loops.Add(2)
	go func() { defer w.loops.Done(); w.churnLoop(lctx) }()
	go func() { defer w.loops.Done(); w.hostFaultLoop(lctx) }()
	// The control plane keeps hearing from the bad hosts until the end.
	w.bg.Add(1)
	go func() { defer w.bg.Done(); w.heartbeatBadHosts(sctx) }()
	return w, nil
}

func (w *workload) count(kind string) { w.countN(kind, 1) }

func (w *workload) countN(kind string, n int) {
	w.mu.Lock()
	w.counts[kind] += n
	w.mu.Unlock()
}

func (w *workload) intn(n int) int {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.rng.IntN(n)
}

func (w *workload) float() float64 {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.rng.Float64()
}

func (w *workload) randomHost() uuid.UUID { return w.hosts[w.intn(len(w.hosts))] }

// stopLoops ends churn, host faults and bad input and waits for operations
// in flight; agents and heartbeats keep running.
func (w *workload) stopLoops() {
	if w.loopCancel != nil {
		w.loopCancel()
	}
	w.loops.Wait()
	w.ops.Wait()
}

// stop ends everything, agentsim included.
func (w *workload) stop() {
	w.stopLoops()
	w.simCancel()
	<-w.simDone
	w.bg.Wait()
}

// ---------------------------------------------------------------------------
// churn

func (w *workload) churnLoop(ctx context.Context) {
	rate := w.e.cfg.ChurnPerSecond
	if rate <= 0 {
		return
	}
	t := time.NewTicker(time.Duration(float64(time.Second) / rate))
	defer t.Stop()
	sem := make(chan struct{}, 16)
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		select {
		case sem <- struct{}{}:
		default:
			continue // as agentsim: operations due beyond the bound are skipped
		}
		w.ops.Add(1)
		go func() {
			defer w.ops.Done()
			defer func() { <-sem }()
			w.churnOnce(context.WithoutCancel(ctx))
		}()
	}
}

// churnOnce runs one control-plane operation on a random healthy host. It
// runs to its end even when the loop stops, as a control plane's request
// would.
func (w *workload) churnOnce(ctx context.Context) {
	h := w.randomHost()
	if m, err := w.sim.Mode(h); err != nil || (m.Kind != agentsim.ModeHealthy && m.Kind != agentsim.ModeSlow) {
		return
	}
	vms := w.sim.VMs(h)
	target := 3
	w.mu.Lock()
	var idle []agentsim.VM
	for _, vm := range vms {
		if !w.busy[vm.ID] && (vm.Status == status.Running || vm.Status == status.Paused) {
			idle = append(idle, vm)
		}
	}
	r := w.rng.Float64()
	var op string
	var vm agentsim.VM
	switch {
	case len(vms) == 0 || (len(vms) < target && r < 0.5):
		op = "create"
		vm = agentsim.VM{ID: uuid.New(), TeamID: w.teams[w.rng.IntN(len(w.teams))]}
	case len(idle) == 0:
		w.mu.Unlock()
		return
	default:
		vm = idle[w.rng.IntN(len(idle))]
		if vm.Status == status.Paused {
			op = "resume"
		} else {
			destroy := 0.15
			if len(vms) > target {
				destroy = 0.5
			}
			switch r2 := w.rng.Float64(); {
			case r2 < destroy:
				op = "destroy"
			case r2 < destroy+(1-destroy)*0.6:
				op = "pause"
			default:
				op = "snapshot"
			}
		}
	}
	w.busy[vm.ID] = true
	w.mu.Unlock()
	defer func() {
		w.mu.Lock()
		delete(w.busy, vm.ID)
		w.mu.Unlock()
	}()
	var err error
	switch op {
	case "create":
		err = w.create(ctx, h, vm.ID, vm.TeamID)
	case "pause":
		err = w.step(ctx, h, vm.ID, status.Running, status.Pausing, status.Paused, status.Pausing, status.Paused)
	case "resume":
		err = w.step(ctx, h, vm.ID, status.Paused, status.Resuming, status.Running, status.Resuming, status.Running)
	case "snapshot":
		err = w.step(ctx, h, vm.ID, status.Running, status.Snapshotting, status.Running, status.Running, status.Running)
	case "destroy":
		err = w.step(ctx, h, vm.ID, status.Running, status.Stopping, status.Stopped, status.Stopping, "")
	}
	if err == nil {
		w.count("churn " + op)
	} else {
		w.count("churn abandoned")
	}
}

const stepDelay = 10 * time.Millisecond

func (w *workload) create(ctx context.Context, h, id, team uuid.UUID) error {
	if err := w.insertSandbox(ctx, h, id, team); err != nil {
		return err
	}
	if err := w.sim.AddVM(h, id, status.Starting, team); err != nil {
		return err
	}
	if err := hold(ctx, stepDelay); err != nil {
		return err
	}
	if err := w.sim.SetVMStatus(h, id, status.Running); err != nil {
		return err
	}
	if err := w.cas(ctx, id, status.Starting, status.Running); err != nil {
		return err
	}
	return w.attachVolumes(ctx, id)
}

// step: the row goes from -> via, the agent shows agentVia, then agentTo
// ("" removes the VM), then the row goes via -> to (its volumes detached
// when to is stopped). The agent finishes its part even when the row was
// changed meanwhile (by vigil), as an agent does.
func (w *workload) step(ctx context.Context, h, id uuid.UUID, from, via, to, agentVia, agentTo string) error {
	if err := w.cas(ctx, id, from, via); err != nil {
		return err
	}
	if err := w.sim.SetVMStatus(h, id, agentVia); err != nil {
		return err
	}
	if err := hold(ctx, stepDelay); err != nil {
		return err
	}
	var err error
	if agentTo == "" {
		err = w.sim.RemoveVM(h, id)
	} else {
		err = w.sim.SetVMStatus(h, id, agentTo)
	}
	if err != nil {
		return err
	}
	if to == status.Stopped {
		return w.casDetach(ctx, id, via, to)
	}
	return w.cas(ctx, id, via, to)
}

func (w *workload) cas(ctx context.Context, id uuid.UUID, from, to string) error {
	tag, err := w.e.db.Exec(ctx, `update sandboxes set status = $3, last_updated = now() where id = $1 and status = $2`, id, from, to)
	if err != nil {
		return err
	}
	if tag.RowsAffected() != 1 {
		return fmt.Errorf("row %s no longer %s", id, from)
	}
	return nil
}

// ---------------------------------------------------------------------------
// host faults: agents dying, hanging, flapping, slow, lying, restarting

// maxFaultyHosts bounds the hosts in a fault mode at once.
const maxFaultyHosts = 25

func (w *workload) hostFaultLoop(ctx context.Context) {
	t := time.NewTicker(time.Second)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		now := time.Now()
		w.mu.Lock()
		var heal []uuid.UUID
		for h, f := range w.faulty {
			if now.After(f.until) {
				heal = append(heal, h)
				delete(w.faulty, h)
			}
		}
		n := len(w.faulty)
		w.mu.Unlock()
		for _, h := range heal {
			_ = w.sim.SetMode(h, agentsim.Mode{Kind: agentsim.ModeHealthy})
		}
		for i := 0; i < 2 && n < maxFaultyHosts; i++ {
			w.faultHost(now)
			n++
		}
	}
}

// faultKinds are the agent fault modes with how long each lasts at least;
// each lasts up to twice that.
var faultKinds = []struct {
	kind agentsim.Kind
	min  time.Duration
}{
	{agentsim.ModeDead, 8 * time.Second}, // longer than --unreachable-after: the host is marked down
	{agentsim.ModeHang, 4 * time.Second},
	{agentsim.ModeFlap, 12 * time.Second},
	{agentsim.ModeSlow, 4 * time.Second},
	{agentsim.ModeUnknownStatus, 4 * time.Second},
	{agentsim.ModeDuplicateIDs, 4 * time.Second},
	{agentsim.ModeMalformed, 3 * time.Second},
	{agentsim.ModeRefuseDestroy, 6 * time.Second}, // zombies' destroys refused (stuck rows get it as bad input)
	{"restart", 0},
}

func (w *workload) faultHost(now time.Time) {
	h := w.randomHost()
	fk := faultKinds[w.intn(len(faultKinds))]
	w.mu.Lock()
	if _, ok := w.faulty[h]; ok || w.bad.excluded[h] {
		w.mu.Unlock()
		return
	}
	d := fk.min + time.Duration(w.rng.Int64N(int64(fk.min)+1))
	if fk.kind != "restart" {
		w.faulty[h] = hostFault{kind: fk.kind, until: now.Add(d)}
	}
	w.mu.Unlock()
	switch fk.kind {
	case "restart":
		_, _ = w.sim.Restart(h)
	case agentsim.ModeFlap:
		_ = w.sim.SetMode(h, agentsim.Mode{Kind: fk.kind, Period: 3 * time.Second})
	case agentsim.ModeSlow:
		_ = w.sim.SetMode(h, agentsim.Mode{Kind: fk.kind, Delay: 2 * w.e.cfg.LeaseTTL})
	default:
		_ = w.sim.SetMode(h, agentsim.Mode{Kind: fk.kind})
	}
	w.count("host " + string(fk.kind))
}

// healHosts makes every host healthy except keepDead of them (not bad
// input), which are made dead and stay so through the quiet period.
func (w *workload) healHosts(keepDead int) {
	w.mu.Lock()
	w.faulty = map[uuid.UUID]hostFault{}
	w.mu.Unlock()
	for _, h := range w.hosts {
		if keepDead > 0 && !w.excludedHost(h) {
			_ = w.sim.SetMode(h, agentsim.Mode{Kind: agentsim.ModeDead})
			w.mu.Lock()
			w.finalDead[h] = true
			w.mu.Unlock()
			keepDead--
			continue
		}
		_ = w.sim.SetMode(h, agentsim.Mode{Kind: agentsim.ModeHealthy})
	}
}

// excludedHost reports whether bad input took h out of the checks.
func (w *workload) excludedHost(h uuid.UUID) bool {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.bad.excluded[h]
}

// ---------------------------------------------------------------------------
// helpers for the nemeses and bad input

// sandboxOn returns a sandbox row of one of hosts in status st, if any.
func (w *workload) sandboxOn(ctx context.Context, hosts []uuid.UUID, st string) (uuid.UUID, uuid.UUID, bool) {
	var id, h uuid.UUID
	err := w.e.db.QueryRow(ctx, `select id, host_id from sandboxes where host_id = any($1) and status = $2 order by random() limit 1`, hosts, st).Scan(&id, &h)
	return id, h, err == nil
}

func isNoRows(err error) bool { return errors.Is(err, pgx.ErrNoRows) }
