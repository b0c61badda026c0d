package main

import (
	"bytes"
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// TestSmoke runs `bench -smoke` against freshly built binaries: every
// figure must be produced and sane (targets are the benchmark's business).
// VIGIL_BENCH_BIN names a directory with prebuilt vigil and agentsim
// binaries instead.
func TestSmoke(t *testing.T) {
	if testing.Short() {
		t.Skip("starts a fleet of real processes; skipped in -short mode")
	}
	bin := benchBin(t)
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	var stdout, stderr bytes.Buffer
	start := time.Now()
	code := run(ctx, []string{"-smoke", "-bin", bin, "-out", t.TempDir()}, &stdout, &stderr)
	t.Logf("smoke run took %s", time.Since(start).Round(time.Second))
	if code != 0 {
		t.Fatalf("bench -smoke exited %d\n--- stdout\n%s\n--- stderr\n%s", code, stdout.String(), stderr.String())
	}
	if !strings.Contains(stdout.String(), "smoke: ok") {
		t.Fatalf("no verdict in the output:\n%s", stdout.String())
	}
	for _, line := range strings.Split(stdout.String(), "\n") {
		if strings.HasPrefix(line, "smoke: ") {
			t.Log(line)
		}
	}
}

// TestFleetSmoke runs `bench -fleet -smoke`: the fleet-scale run's every
// figure on a small fleet, a replica killed included.
func TestFleetSmoke(t *testing.T) {
	if testing.Short() {
		t.Skip("starts a fleet of real processes; skipped in -short mode")
	}
	bin := benchBin(t)
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	var stdout, stderr bytes.Buffer
	code := run(ctx, []string{"-fleet", "-smoke", "-bin", bin, "-out", t.TempDir()}, &stdout, &stderr)
	if code != 0 {
		t.Fatalf("bench -fleet -smoke exited %d\n--- stdout\n%s\n--- stderr\n%s", code, stdout.String(), stderr.String())
	}
	for _, want := range []string{"smoke: ok", "reconcile lag, max over shards and window", "its shards claimed by others, max"} {
		if !strings.Contains(stdout.String(), want) {
			t.Fatalf("no %q in the output:\n%s", want, stdout.String())
		}
	}
}

// benchBin is a directory with vigil and agentsim built from this tree, or
// VIGIL_BENCH_BIN's prebuilt ones.
func benchBin(t *testing.T) string {
	t.Helper()
	bin := os.Getenv("VIGIL_BENCH_BIN")
	if bin == "" {
		bin = t.TempDir()
		cmd := exec.Command("go", "build", "-o", bin+string(filepath.Separator), "./cmd/...")
		cmd.Dir = ".."
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("go build ./cmd/...: %v\n%s", err, out)
		}
	}
	return bin
}

func TestParseMetrics(t *testing.T) {
	text := `# HELP vigil_reconciles_total Host reconciles.
# TYPE vigil_reconciles_total counter
vigil_reconciles_total{kind="active",result="ok"} 12
vigil_reconciles_total{kind="active",result="changed"} 3
vigil_reconciles_total{kind="passive",result="ok"} 5
vigil_shard_last_reconcile_success_timestamp_seconds{shard="7"} 1.7e+09
odd_labels{a="x\"y,z",b="\\"} 1
go_goroutines 42
not a series
`
	fams, err := parseMetrics(strings.NewReader(text))
	if err != nil {
		t.Fatal(err)
	}
	s := scrape{fams: fams}
	if got := s.sum("vigil_reconciles_total", map[string]string{"kind": "active"}); got != 15 {
		t.Errorf("active reconciles = %v, want 15", got)
	}
	if got := s.sum("vigil_reconciles_total", nil); got != 20 {
		t.Errorf("all reconciles = %v, want 20", got)
	}
	if got := s.byShard("vigil_shard_last_reconcile_success_timestamp_seconds"); got[7] != 1.7e9 || len(got) != 1 {
		t.Errorf("byShard = %v", got)
	}
	if v, ok := s.value("go_goroutines"); !ok || v != 42 {
		t.Errorf("go_goroutines = %v, %v", v, ok)
	}
	if l := fams["odd_labels"]; len(l) != 1 || l[0].labels["a"] != `x"y,z` || l[0].labels["b"] != `\` {
		t.Errorf("escaped labels parsed as %+v", l)
	}
	if s.has("absent") || s.sum("absent", nil) != 0 {
		t.Error("an absent family must sum to 0")
	}
}

func TestSettledWantsEveryShardOwnedAndBalanced(t *testing.T) {
	for _, tc := range []struct {
		name   string
		owners []string
		ids    []string
		want   bool
	}{
		{"balanced", []string{"a", "b", "a", "b", "c"}, []string{"a", "b", "c"}, true},
		{"an unowned shard", []string{"a", "", "b"}, []string{"a", "b"}, false},
		{"owned by a dead replica", []string{"a", "x", "b"}, []string{"a", "b"}, false},
		{"unbalanced", []string{"a", "a", "a", "b"}, []string{"a", "b"}, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got, detail := settled(tc.owners, tc.ids); got != tc.want {
				t.Errorf("settled = %v (%s), want %v", got, detail, tc.want)
			}
		})
	}
}

func TestPassCounterCountsChangesNotFirstSight(t *testing.T) {
	pc := newPassCounter()
	pc.observe(map[int]float64{0: 10, 1: 10})
	pc.observe(map[int]float64{0: 10, 1: 11})
	pc.observe(map[int]float64{0: 12, 1: 11, 2: 5})
	if got := pc.total(); got != 2 {
		t.Errorf("passes = %d, want 2", got)
	}
}

func TestHasFlag(t *testing.T) {
	help := "  --agent-concurrency  [$VIGIL_AGENT_CONCURRENCY] (default 64)\n  -latency duration\n  --debug-pprof-extra\n"
	for flag, want := range map[string]bool{"agent-concurrency": true, "latency": true, "debug-pprof": false, "concurrency": false} {
		if got := hasFlag(help, flag); got != want {
			t.Errorf("hasFlag(%q) = %v, want %v", flag, got, want)
		}
	}
}

func TestReportMarksAndSmokeCheck(t *testing.T) {
	r := newReport(options{})
	r.fig("g", "a", "met", "s").pos().want("<=", 2).set(1)
	r.fig("g", "b", "short", "×").pos().want(">=", 10).set(2)
	r.fig("g", "c", "pending", "").pending("vigil metric x")
	r.fig("g", "d", "failed", "").na("boom")
	r.fig("g", "e", "zero but must be positive", "").pos().set(0)
	r.finish()
	want := map[string]string{"a": "met", "b": "short", "c": "n/a", "d": "n/a", "e": "info"}
	for _, f := range r.Figures {
		if f.Status != want[f.Key] {
			t.Errorf("%s: status %s, want %s", f.Key, f.Status, want[f.Key])
		}
	}
	problems, pending := r.check(false)
	if len(problems) != 2 || len(pending) != 1 {
		t.Errorf("problems %q, pending %q; want 2 problems (d, e) and 1 pending (c)", problems, pending)
	}
	if problems, _ := r.check(true); len(problems) != 3 {
		t.Errorf("strict: problems %q, want 3", problems)
	}
}

func TestPeerDeltaSumsTheSurvivorsOnly(t *testing.T) {
	before := map[string]peerCounts{
		"a":      {confirmations: 1, revocations: map[string]float64{"revoked": 1}},
		"b":      {revocations: map[string]float64{}},
		"victim": {confirmations: 5, revocations: map[string]float64{"revoked": 5}},
	}
	after := map[string]peerCounts{
		"a":     {confirmations: 2, suspicions: 1, revocations: map[string]float64{"revoked": 2, "error": 0}},
		"b":     {confirmations: 1, suspicions: 1, revocations: map[string]float64{"already_gone": 1}},
		"fresh": {confirmations: 9, revocations: map[string]float64{"revoked": 9}},
	}
	d := peerDelta(before, after)
	if d.confirmations != 2 || d.suspicions != 2 {
		t.Errorf("confirmations %v, suspicions %v; want 2, 2", d.confirmations, d.suspicions)
	}
	if d.revoked("revoked") != 1 || d.revoked("already_gone") != 1 || d.revoked("no_session", "error") != 0 || d.revoked() != 2 {
		t.Errorf("revocations %v", d.revocations)
	}
}

func TestKillVictimIsTheLeaderOrTheOldestOther(t *testing.T) {
	c := &cluster{live: []*replica{{id: "r1"}, {id: "r2"}, {id: "r3"}}}
	for _, tc := range []struct {
		leader   string
		ofLeader bool
		want     string
	}{
		{"r2", true, "r2"}, {"r1", false, "r2"}, {"r2", false, "r1"}, {"gone", true, "r1"},
	} {
		if got := c.killVictim(tc.leader, tc.ofLeader); got == nil || got.id != tc.want {
			t.Errorf("killVictim(%q, %v) = %v, want %s", tc.leader, tc.ofLeader, got, tc.want)
		}
	}
}
