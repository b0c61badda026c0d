package monitor_test

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"

	"github.com/vigil-sh/vigil/monitor"
	"github.com/vigil-sh/vigil/shard"
	"github.com/vigil-sh/vigil/store"
)

func newRunner(t *testing.T, e *env, shards int, interval time.Duration) *monitor.Runner {
	t.Helper()
	r, err := monitor.NewRunner(monitor.RunnerConfig{Replica: e.fence.Replica, Shards: shards, Interval: interval,
		StaleScan: 100 * time.Millisecond, HostRefresh: 100 * time.Millisecond, Logger: hclog.NewNullLogger()}, e.rec)
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

func poll(t *testing.T, timeout time.Duration, what string, cond func() bool) time.Duration {
	t.Helper()
	start := time.Now()
	for !cond() {
		if time.Since(start) > timeout {
			t.Fatalf("timed out after %s waiting for %s", timeout, what)
		}
		time.Sleep(5 * time.Millisecond)
	}
	return time.Since(start)
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
		StaleScan: 100 * time.Millisecond}, rec)
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
