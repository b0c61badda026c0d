package monitor_test

import (
	"bytes"
	"errors"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/uuid"
	"github.com/hashicorp/go-hclog"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/vigil-sh/vigil/agentpool"
	"github.com/vigil-sh/vigil/agentsim"
	"github.com/vigil-sh/vigil/internal/ids"
	"github.com/vigil-sh/vigil/monitor"
	"github.com/vigil-sh/vigil/shard"
)

// logBuffer is a log destination a test reads while passes write to it.
type logBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *logBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

// take returns what was logged since the last take.
func (l *logBuffer) take() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	s := l.b.String()
	l.b.Reset()
	return s
}

// loggingEnv is env's database and agents with a pool and a Reconciler
// that log into logs at level, and their own registry. Of env's three
// hosts, the first has 100 KiB of garbage for an address, the second a
// scheme and a path; each has a running sandbox its agent does not know
// (reconciled, it would be stopped as orphaned). The third is healthy.
type loggingEnv struct {
	*env
	logs            *logBuffer
	reg             *prometheus.Registry
	rec             *monitor.Reconciler
	garbage, pathy  uuid.UUID
	good            uuid.UUID
	garbageSandbox  uuid.UUID
	pathySandbox    uuid.UUID
	garbageAddrSize int
}

func newLoggingEnv(t *testing.T, level hclog.Level) *loggingEnv {
	t.Helper()
	e := newEnv(t, 3, time.Second)
	b := &loggingEnv{env: e, logs: &logBuffer{}, reg: prometheus.NewRegistry(),
		garbage: e.hosts[0], pathy: e.hosts[1], good: e.hosts[2]}
	log := hclog.New(&hclog.LoggerOptions{Output: b.logs, Level: level})
	pool, err := agentpool.New(agentpool.Config{Timeout: time.Second, Logger: log, Registerer: b.reg})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(pool.Close)
	if b.rec, err = monitor.New(monitor.Config{Logger: log, Registerer: b.reg}, e.st, pool); err != nil {
		t.Fatal(err)
	}
	// Letters only: a URL parser takes it for a host name, to be looked up.
	garbage := strings.Repeat("garbage", 100<<10/7)
	b.garbageAddrSize = len(garbage)
	pathy := "http://" + e.sim.Address(b.pathy) + "/agents/1"
	for h, a := range map[uuid.UUID]string{b.garbage: garbage, b.pathy: pathy} {
		if _, err := e.db.Exec(e.ctx, `update hosts set address = $2 where id = $1`, h, a); err != nil {
			t.Fatal(err)
		}
	}
	b.garbageSandbox = e.sandbox(b.garbage, "running", old, "")
	b.pathySandbox = e.sandbox(b.pathy, "running", old, "")
	e.sandbox(b.good, "running", young, "running")
	return b
}

// A host whose address is not host:port is refused before any dial or
// name lookup, on every pass; it is logged once (a bounded line), later
// passes log nothing for it; the refusals are counted per reason; its
// sandboxes are left as they are, as for an agent that cannot be reached,
// and it stays blind (counted, never reconciled).
func TestBadAddressIsRefusedLoggedOnceAndLeavesRowsAlone(t *testing.T) {
	e := newLoggingEnv(t, hclog.Debug)
	hosts := []uuid.UUID{e.garbage, e.pathy, e.good}
	const passes = 3
	for pass := range passes {
		out, err := e.rec.Reconcile(e.ctx, e.fence, hosts)
		if err != nil {
			t.Fatal(err)
		}
		for _, o := range out {
			switch {
			case o.Host == e.good && (o.Err != nil || o.Done.IsZero()):
				t.Fatalf("pass %d: healthy host: %+v", pass, o)
			case o.Host != e.good && (!errors.Is(o.Err, agentpool.ErrBadAddress) || !o.Counted || !o.Done.IsZero()):
				t.Fatalf("pass %d: host with a bad address: %+v, want a refusal, counted, not done", pass, o)
			case o.Err != nil && len(o.Err.Error()) > 200:
				t.Errorf("pass %d: error of %d bytes: %.300s", pass, len(o.Err.Error()), o.Err)
			}
		}
		logged := e.logs.take()
		t.Logf("pass %d: %d log bytes", pass, len(logged))
		if pass > 0 {
			if logged != "" {
				t.Errorf("pass %d logged %d bytes, want none:\n%s", pass, len(logged), logged)
			}
			continue
		}
		lines := strings.Split(strings.TrimSpace(logged), "\n")
		if len(lines) != 2 {
			t.Fatalf("first pass logged %d lines, want one per bad host:\n%s", len(lines), logged)
		}
		for _, l := range lines {
			if !strings.Contains(l, "[WARN]") || len(l) > 400 {
				t.Errorf("first pass logged a line of %d bytes, want a WARN under 400:\n%s", len(l), l)
			}
		}
		if !strings.Contains(logged, "reason=too_long") || !strings.Contains(logged, "reason=path") {
			t.Errorf("first pass's lines lack the reasons:\n%s", logged)
		}
	}

	// No dial, no lookup: only the healthy host's calls reached the
	// transport.
	if n := rpcCalls(t, e.reg, "ListSandboxes"); n != passes {
		t.Errorf("%d ListSandboxes calls reached the transport, want %d (the healthy host's)", n, passes)
	}
	for reason, want := range map[string]float64{"too_long": passes, "path": passes, "no_port": 0} {
		if got := counter(t, e.reg, "vigil_agent_bad_addresses_total", reason); got != want {
			t.Errorf("vigil_agent_bad_addresses_total{reason=%q} = %v, want %v", reason, got, want)
		}
	}
	if got := counter(t, e.reg, "vigil_reconciles_total", "active", "agent_error"); got != 2*passes {
		t.Errorf("agent_error reconciles = %v, want %d", got, 2*passes)
	}
	// Untouched, as for an unreachable agent: no orphaned stop, no audit.
	for _, sb := range []uuid.UUID{e.garbageSandbox, e.pathySandbox} {
		if got := e.status(sb); got != "running" {
			t.Errorf("sandbox on a host with a bad address became %s, want running", got)
		}
		if rows := e.audits(ids.Sandbox(sb)); len(rows) != 0 {
			t.Errorf("sandbox on a host with a bad address has audit rows %+v", rows)
		}
	}

	// Fixed: the host is reconciled at once, its orphan stopped.
	if _, err := e.db.Exec(e.ctx, `update hosts set address = $2 where id = $1`, e.pathy, e.sim.Address(e.pathy)); err != nil {
		t.Fatal(err)
	}
	if o := e.reconcileWith(e.pathy); o.Err != nil || len(o.Applied) != 1 {
		t.Fatalf("host with its address fixed: %+v", o)
	}
	if got := e.status(e.pathySandbox); got != "stopped" {
		t.Errorf("orphan on the fixed host is %s, want stopped", got)
	}
	if logged := e.logs.take(); !strings.Contains(logged, "agent address accepted") {
		t.Errorf("the fix logged:\n%s", logged)
	}
}

func (e *loggingEnv) reconcileWith(h uuid.UUID) monitor.Outcome {
	e.t.Helper()
	out, err := e.rec.Reconcile(e.ctx, e.fence, []uuid.UUID{h})
	if err != nil || len(out) != 1 {
		e.t.Fatalf("reconcile %s: %+v, %v", h, out, err)
	}
	return out[0]
}

// The same through a running shard owner, whose pass summary logs the
// first failure too: at the default level the replica says it once, in
// bounded lines, however many passes run.
func TestBadAddressLogsOnceUnderARunningOwner(t *testing.T) {
	e := newLoggingEnv(t, hclog.Info)
	const interval = 100 * time.Millisecond
	r, err := monitor.NewRunner(monitor.RunnerConfig{Replica: e.fence.Replica, Shards: 1, Interval: interval,
		StaleScan: time.Hour, HostRefresh: time.Hour, Logger: hclog.New(&hclog.LoggerOptions{Output: e.logs})}, e.rec, e.st)
	if err != nil {
		t.Fatal(err)
	}
	runOwned(t, e.env, r, shard.Of(e.good, 1), 700) // shard 0: the only one
	const passes = 5
	poll(t, 10*time.Second, "five passes", func() bool {
		return counter(t, e.reg, "vigil_agent_bad_addresses_total", "too_long") >= passes
	})
	logged := e.logs.take()
	t.Logf("%d log bytes over %v passes", len(logged), counter(t, e.reg, "vigil_agent_bad_addresses_total", "too_long"))
	lines := strings.Split(strings.TrimSpace(logged), "\n")
	warns := 0
	for _, l := range lines {
		if len(l) > 400 {
			t.Errorf("a line of %d bytes: %.500s", len(l), l)
		}
		if strings.Contains(l, "[WARN]") {
			warns++
		}
	}
	// One per bad host from the pool, one from the shard's first failing
	// pass.
	if warns != 3 {
		t.Errorf("%d WARN lines, want 3:\n%s", warns, logged)
	}
	if n := rpcCalls(t, e.reg, "ListSandboxes"); n < passes {
		t.Errorf("the healthy host was called %d times in %d passes", n, passes)
	}
}

// rpcCalls is how many calls of procedure reached the agents' transport,
// whatever their code.
func rpcCalls(t *testing.T, reg *prometheus.Registry, procedure string) int {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	for _, mf := range mfs {
		if mf.GetName() != "vigil_agent_rpc_duration_seconds" {
			continue
		}
		for _, m := range mf.GetMetric() {
			for _, l := range m.GetLabel() {
				if l.GetName() == "procedure" && l.GetValue() == procedure {
					n += int(m.GetHistogram().GetSampleCount())
				}
			}
		}
	}
	return n
}

// An agent's strings are logged bounded too: a label of 100 KiB on every
// sandbox logs a few lines of at most a few hundred bytes per answer, and
// the metric still counts every entry.
func TestAgentReportProblemsAreLoggedBounded(t *testing.T) {
	e := newLoggingEnv(t, hclog.Info)
	const vms = 10
	for range vms {
		e.sandbox(e.good, "running", young, "running")
	}
	label := strings.Repeat("hibernating ", 100<<10/12)
	if err := e.sim.SetMode(e.good, agentsim.Mode{Kind: agentsim.ModeUnknownStatus, Label: label}); err != nil {
		t.Fatal(err)
	}
	e.reconcileWith(e.good)
	logged := e.logs.take()
	t.Logf("%d log bytes for %d entries with a %d-byte label", len(logged), vms+1, len(label))
	lines := strings.Split(strings.TrimSpace(logged), "\n")
	if len(lines) != 4 {
		t.Errorf("%d lines, want 3 problems and a summary:\n%s", len(lines), logged)
	}
	for _, l := range lines {
		if len(l) > 500 {
			t.Errorf("a line of %d bytes: %.600s", len(l), l)
		}
	}
	if !strings.Contains(logged, "not_logged=8") {
		t.Errorf("no summary of the 8 entries not logged:\n%s", logged)
	}
	if got := counter(t, e.reg, "vigil_agent_report_problems_total", "unknown_status"); got != vms+1 {
		t.Errorf("unknown_status problems = %v, want %d", got, vms+1)
	}
}
