package monitor_test

import (
	"context"
	"errors"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/google/uuid"
	"github.com/hashicorp/go-hclog"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/vigil-sh/vigil/agentpool"
	"github.com/vigil-sh/vigil/agentsim"
	"github.com/vigil-sh/vigil/internal/pgtest"
	"github.com/vigil-sh/vigil/internal/testwait"
	"github.com/vigil-sh/vigil/monitor"
	hostagentv1 "github.com/vigil-sh/vigil/proto/hostagent/v1"
	"github.com/vigil-sh/vigil/shard"
	"github.com/vigil-sh/vigil/store"
)

func newRunner(t *testing.T, e *env, shards int, interval time.Duration) *monitor.Runner {
	t.Helper()
	r, err := monitor.NewRunner(monitor.RunnerConfig{Replica: e.fence.Replica, Shards: shards, Interval: interval,
		StaleScan: 100 * time.Millisecond, HostRefresh: 100 * time.Millisecond, Logger: hclog.NewNullLogger()}, e.rec, e.st)
	if err != nil {
		t.Fatal(err)
	}
	return r
}

// runOwned runs the replica-wide loops and one shard's work until the test
// ends, and returns the channel Own's result arrives on.
func runOwned(t *testing.T, e *env, r *monitor.Runner, s int, token int64) <-chan error {
	ctx, cancel := context.WithCancel(e.ctx)
	runDone := make(chan struct{})
	go func() { defer close(runDone); r.Run(ctx) }()
	own := make(chan error, 1)
	go func() { own <- r.Own(ctx, s, token) }()
	t.Cleanup(func() { cancel(); <-runDone })
	return own
}

// poll is testwait.For.
func poll(t *testing.T, timeout time.Duration, what string, cond func() bool) time.Duration {
	t.Helper()
	return testwait.For(t, timeout, what, cond)
}

// Rule 8: a host coming back online is reconciled by its owner within a
// second, through the trigger's NOTIFY, not by the periodic pass.
func TestReconnectIsReconciledWithinASecond(t *testing.T) {
	e := newEnv(t, 1, time.Second)
	h := e.hosts[0]
	s := shard.Of(h, 4)
	r := newRunner(t, e, 4, time.Hour) // no second periodic pass during the test
	own := runOwned(t, e, r, s, 500)
	poll(t, 5*time.Second, "LISTEN", func() bool {
		var n int
		e.db.QueryRow(e.ctx, `select count(*) from pg_stat_activity where datname = current_database() and query = 'listen vigil_host_online'`).Scan(&n)
		return n == 1
	})
	// The shard's first pass runs at its offset within the hour: wait for
	// it to be out of the way only when it is due now.
	if s == 0 {
		poll(t, 5*time.Second, "first pass", func() bool {
			return testutilGauge(t, e, "vigil_shard_last_reconcile_success_timestamp_seconds") > 0
		})
	}
	// The host went down earlier; its sandbox is missing; the agent has it.
	e.db.Exec(e.ctx, `update hosts set status = 'unreachable' where id = $1`, h)
	sb := e.sandbox(h, "missing", young, "running")
	start := time.Now()
	if _, err := e.sim.Heartbeat(e.ctx); err != nil { // the control plane: unreachable -> online
		t.Fatal(err)
	}
	took := poll(t, 5*time.Second, "reconcile on reconnect", func() bool { return e.status(sb) == "running" })
	t.Logf("reconciled %s after the host came back online", time.Since(start))
	if took > time.Second {
		t.Errorf("reconcile on reconnect took %s, want within 1s", took)
	}
	select {
	case err := <-own:
		t.Fatalf("Own returned early: %v", err)
	default:
	}
}

// Rule 1 timing: a stale host is marked within the threshold plus the scan
// period of its last heartbeat.
func TestStaleHostMarkedWithinThresholdPlusScan(t *testing.T) {
	url := newEnv(t, 1, time.Second)
	e := url
	rec, err := monitor.New(monitor.Config{UnreachableAfter: 2 * time.Second}, e.st, e.hook)
	if err != nil {
		t.Fatal(err)
	}
	h := e.hosts[0]
	r, err := monitor.NewRunner(monitor.RunnerConfig{Replica: e.fence.Replica, Shards: 1, Interval: time.Hour,
		StaleScan: 100 * time.Millisecond}, rec, e.st)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := e.sim.Heartbeat(e.ctx); err != nil {
		t.Fatal(err)
	}
	var beat time.Time
	e.db.QueryRow(e.ctx, `select last_heartbeat_at from hosts where id = $1`, h).Scan(&beat)
	runOwned(t, e, r, 0, 600)
	poll(t, 10*time.Second, "host unreachable", func() bool { return e.hostStatus(h) == "unreachable" })
	var marked time.Time
	e.db.QueryRow(e.ctx, `select updated_at from hosts where id = $1`, h).Scan(&marked)
	lag := marked.Sub(beat)
	t.Logf("marked unreachable %s after its last heartbeat (threshold 2s, scan 100ms)", lag)
	if lag < 2*time.Second || lag > 2*time.Second+time.Second {
		t.Errorf("marked %s after the heartbeat, want within [2s, 3s]", lag)
	}
}

// A stale token is a loss: Own returns ErrFenced without doing anything.
func TestOwnWithStaleTokenIsFenced(t *testing.T) {
	e := newEnv(t, 1, time.Second)
	if err := e.st.RaiseFence(e.ctx, store.Fence{Shard: 2, Token: 900, Replica: "newer"}); err != nil {
		t.Fatal(err)
	}
	r := newRunner(t, e, 4, time.Hour)
	own := runOwned(t, e, r, 2, 800)
	select {
	case err := <-own:
		if !errors.Is(err, monitor.ErrFenced) {
			t.Fatalf("Own = %v, want ErrFenced", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Own with a stale token kept running")
	}
}

// A fence raised by a successor while the shard runs ends the shard's work
// with ErrFenced at the next write.
func TestSuccessorClaimEndsOwnWithErrFenced(t *testing.T) {
	e := newEnv(t, 1, time.Second)
	h := e.hosts[0]
	s := shard.Of(h, 1)
	r := newRunner(t, e, 1, 100*time.Millisecond)
	own := runOwned(t, e, r, s, 100)
	if err := e.st.RaiseFence(e.ctx, store.Fence{Shard: s, Token: 101, Replica: "successor"}); err != nil {
		t.Fatal(err)
	}
	orphan := e.sandbox(h, "running", young, "") // the next pass wants to write
	select {
	case err := <-own:
		if !errors.Is(err, monitor.ErrFenced) {
			t.Fatalf("Own = %v, want ErrFenced", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Own kept running after a successor claimed")
	}
	if e.status(orphan) != "running" {
		t.Error("the fenced owner wrote")
	}
}

func testutilGauge(t *testing.T, e *env, name string) float64 {
	mfs, err := e.reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() == name {
			for _, m := range mf.GetMetric() {
				return m.GetGauge().GetValue()
			}
		}
	}
	return 0
}

// gauge is the value of a per-shard gauge, and whether the series exists.
func gauge(t *testing.T, reg *prometheus.Registry, name string, s int) (float64, bool) {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
		for _, m := range mf.GetMetric() {
			for _, l := range m.GetLabel() {
				if l.GetName() == "shard" && l.GetValue() == strconv.Itoa(s) {
					return m.GetGauge().GetValue(), true
				}
			}
		}
	}
	return 0, false
}

func counter(t *testing.T, reg *prometheus.Registry, name string, labels ...string) float64 {
	t.Helper()
	return testutil.ToFloat64(metric(t, reg, name, labels...))
}

// SPEC §5: the lag tells the truth. Agents that hang, refuse or answer
// garbage make the shard's oldest-success time stand still while their
// hosts stay online (heartbeats fine), the blind-host count shows them, and
// both recover once the agents answer again.
func TestLagGrowsWhileAgentsAreBlindAndRecovers(t *testing.T) {
	e := newEnv(t, 4, 200*time.Millisecond)
	const interval = 200 * time.Millisecond
	r := newRunner(t, e, 1, interval)
	runOwned(t, e, r, 0, 100)
	lag := func() time.Duration {
		v, ok := gauge(t, e.reg, "vigil_shard_last_reconcile_success_timestamp_seconds", 0)
		if !ok {
			return time.Hour
		}
		return time.Since(time.Unix(0, int64(v*1e9)))
	}
	blind := func() float64 { v, _ := gauge(t, e.reg, "vigil_shard_blind_hosts", 0); return v }
	poll(t, 10*time.Second, "the first passes", func() bool {
		n, _ := gauge(t, e.reg, "vigil_shard_hosts", 0)
		return n == 4 && lag() < 3*interval
	})

	modes := []agentsim.Mode{{Kind: agentsim.ModeHang}, {Kind: agentsim.ModeDead}, {Kind: agentsim.ModeMalformed}}
	for i, m := range modes {
		if err := e.sim.SetMode(e.hosts[i], m); err != nil {
			t.Fatal(err)
		}
	}
	blindAt := time.Now()
	poll(t, 10*time.Second, "the lag to pass 2s", func() bool { return lag() > 2*time.Second })
	for _, h := range e.hosts[:3] {
		if st := e.hostStatus(h); st != "online" {
			t.Fatalf("host %s is %s: the test needs it online", h, st)
		}
	}
	if b := blind(); b != 3 {
		t.Errorf("blind hosts %v, want 3", b)
	}
	if n := counter(t, e.reg, "vigil_reconciles_total", "active", "agent_error"); n == 0 {
		t.Error("no agent_error reconciles counted")
	}
	t.Logf("lag %s after the agents went blind %s ago; %v blind hosts", lag().Round(time.Millisecond), time.Since(blindAt).Round(time.Millisecond), blind())

	for _, h := range e.hosts[:3] {
		if err := e.sim.SetMode(h, agentsim.Mode{Kind: agentsim.ModeHealthy}); err != nil {
			t.Fatal(err)
		}
	}
	poll(t, 10*time.Second, "the lag to recover", func() bool { return lag() < 3*interval && blind() == 0 })
}

// SPEC §2 item 10: a steady pass over a shard is one statement, whatever the
// number of hosts, and no write transaction.
func TestSteadyPassIsOneStatementPerShard(t *testing.T) {
	url := pgtest.New(t)
	ctx := t.Context()
	reg := prometheus.NewRegistry()
	st, err := store.Open(ctx, store.Config{URL: url, Registerer: reg})
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	sim, err := agentsim.New(agentsim.Config{DatabaseURL: url, Hosts: 30, SandboxesPerHost: 5, HeartbeatInterval: -1})
	if err != nil {
		t.Fatal(err)
	}
	simCtx, cancel := context.WithCancel(ctx)
	done := make(chan error, 1)
	go func() { done <- sim.Run(simCtx) }()
	defer func() { cancel(); <-done }()
	<-sim.Ready()
	pool, err := agentpool.New(agentpool.Config{})
	if err != nil {
		t.Fatal(err)
	}
	defer pool.Close()
	rec, err := monitor.New(monitor.Config{Registerer: reg}, st, pool)
	if err != nil {
		t.Fatal(err)
	}
	f := store.Fence{Shard: 0, Token: 1, Replica: "a"}
	if err := st.RaiseFence(ctx, f); err != nil {
		t.Fatal(err)
	}
	for pass := range 3 {
		before := counter(t, reg, "vigil_db_statements_total")
		writes := counter(t, reg, "vigil_db_write_transactions_total", "committed")
		out, err := rec.Reconcile(ctx, f, sim.HostIDs())
		if err != nil {
			t.Fatal(err)
		}
		for _, o := range out {
			if o.Err != nil || o.Done.IsZero() || len(o.Applied) != 0 {
				t.Fatalf("pass %d host %s: %+v", pass, o.Host, o)
			}
		}
		if n := counter(t, reg, "vigil_db_statements_total") - before; n != 1 {
			t.Errorf("steady pass %d over 30 hosts sent %v statements, want 1", pass, n)
		}
		if w := counter(t, reg, "vigil_db_write_transactions_total", "committed") - writes; w != 0 {
			t.Errorf("steady pass %d committed %v write transactions", pass, w)
		}
	}
}

// countingAgents counts agent calls in flight.
type countingAgents struct {
	monitor.Agents
	mu               sync.Mutex
	now, peak, total int
}

func (c *countingAgents) ListSandboxes(ctx context.Context, h uuid.UUID, addr string) (*hostagentv1.ListSandboxesResponse, error) {
	c.mu.Lock()
	c.now++
	c.total++
	c.peak = max(c.peak, c.now)
	c.mu.Unlock()
	defer func() { c.mu.Lock(); c.now--; c.mu.Unlock() }()
	return c.Agents.ListSandboxes(ctx, h, addr)
}

// One replica-wide bound on agent calls, however many shards are owned.
func TestAgentCallsAreBoundedAcrossShards(t *testing.T) {
	e := newEnv(t, 64, time.Second)
	for _, h := range e.hosts {
		if err := e.sim.SetMode(h, agentsim.Mode{Kind: agentsim.ModeSlow, Delay: 50 * time.Millisecond}); err != nil {
			t.Fatal(err)
		}
	}
	agents := &countingAgents{Agents: e.pool}
	rec, err := monitor.New(monitor.Config{AgentConcurrency: 6}, e.st, agents)
	if err != nil {
		t.Fatal(err)
	}
	const shards = 4
	r, err := monitor.NewRunner(monitor.RunnerConfig{Replica: "a", Shards: shards, Interval: 100 * time.Millisecond}, rec, e.st)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(e.ctx)
	var wg sync.WaitGroup
	wg.Go(func() { r.Run(ctx) })
	for s := range shards {
		wg.Go(func() { _ = r.Own(ctx, s, int64(10+s)) })
	}
	defer func() { cancel(); wg.Wait() }()
	poll(t, 20*time.Second, "every host reconciled twice", func() bool {
		agents.mu.Lock()
		defer agents.mu.Unlock()
		return agents.total >= 128
	})
	agents.mu.Lock()
	peak := agents.peak
	agents.mu.Unlock()
	if peak > 6 {
		t.Errorf("%d agent calls in flight at once, want at most 6", peak)
	}
	if peak < 5 {
		t.Errorf("at most %d agent calls in flight at once: the bound of 6 was not used", peak)
	}
}

// Rule 8 beside a hung agent: a host coming back online is reconciled
// within a second even while the shard's full pass is stuck on another
// host's agent.
func TestReconnectIsNotHeldUpByAHungAgent(t *testing.T) {
	e := newEnv(t, 2, 20*time.Second)
	hung, back := e.hosts[0], e.hosts[1]
	if err := e.sim.SetMode(hung, agentsim.Mode{Kind: agentsim.ModeHang}); err != nil {
		t.Fatal(err)
	}
	e.db.Exec(e.ctx, `update hosts set status = 'unreachable' where id = $1`, back)
	sb := e.sandbox(back, "missing", young, "running")
	r := newRunner(t, e, 1, 200*time.Millisecond)
	runOwned(t, e, r, 0, 100)
	poll(t, 5*time.Second, "the full pass to hang on the agent and LISTEN", func() bool {
		var n int
		e.db.QueryRow(e.ctx, `select count(*) from pg_stat_activity where datname = current_database() and query = 'listen vigil_host_online'`).Scan(&n)
		return n == 1 && e.sim.InFlight() == 1
	})
	start := time.Now()
	if _, err := e.sim.Heartbeat(e.ctx); err != nil { // the control plane: unreachable -> online
		t.Fatal(err)
	}
	took := poll(t, 5*time.Second, "reconcile on reconnect", func() bool { return e.status(sb) == "running" })
	t.Logf("reconciled %s after coming back online, while the full pass waits on a hung agent", time.Since(start))
	if took > time.Second {
		t.Errorf("reconcile on reconnect took %s, want within 1s", took)
	}
	if e.sim.InFlight() != 1 {
		t.Error("the hung call is no longer in flight: the test did not overlap the full pass")
	}
}
