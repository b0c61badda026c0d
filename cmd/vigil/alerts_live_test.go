package main

// The shipped alert rules against a live Prometheus: the real server
// (Debian's prometheus package, installed when missing) loads
// deploy/prometheus/vigil-rules.yml as shipped, scrapes three real `vigil run`
// processes every second, and the test injects real faults and reads the
// outcome from Prometheus's HTTP API.
//
// It lives here rather than in deploy/ because it needs the end-to-end
// harness of this package (the vigil binary, replica processes, the etcd
// recorder, agentsim in-process, a per-test database) and vigil's internal
// packages, which deploy/ — a module of its own — cannot import without
// taking all of vigil's dependencies into its go.mod; Prometheus itself is
// only spoken to over HTTP. So it runs in `go test ./...`, the first half of
// `make test`.

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/vigil-sh/vigil/agentsim"
	"github.com/vigil-sh/vigil/internal/testwait"
)

// shippedRules is the rule file Prometheus loads, unmodified.
var shippedRules = filepath.Join("..", "..", "deploy", "prometheus", "vigil-rules.yml")

// TestAlertsOnLivePrometheus shows, from vigil's own series on a live
// Prometheus evaluating the shipped rules every second:
//   - a healthy cluster: every rule evaluates without error, no alert is active;
//   - every agent hung (agentsim ModeHang; hosts keep heartbeating): the lag
//     grows with wall time, blind hosts appear, VigilAgentsFailing goes
//     pending, and — after 90s of blindness, the shipped threshold —
//     VigilReconcileLagHigh goes pending. Both have a `for` (5m, 2m) past this
//     test's budget: for them the test asserts the firing condition holds and
//     the alert is pending;
//   - an owner key deleted from etcd: the owner re-claims the shard at once,
//     so VigilShardsUnowned's condition never holds; VigilOwnerKeysLost (no
//     `for`) fires;
//   - a replica SIGKILLed: VigilReplicaDown goes pending and fires after its
//     1m; VigilShardsUnowned goes pending while the dead replica's lease still
//     holds its shards, and resolves once the survivors claim them.
//
// At the end every recording rule has data and every alert expression
// evaluates; alerts not provoked were never active.
func TestAlertsOnLivePrometheus(t *testing.T) {
	if testing.Short() {
		t.Skip("end-to-end test with real processes; skipped in -short mode")
	}
	promBin := prometheusServer(t)
	h := newHarness(t, 16)
	w := startWorkload(t, h, 24)
	const (
		ttl      = 5 * time.Second // a kill leaves shards unowned for a few evaluations
		interval = 2 * time.Second
	)
	ids := []string{"live-1", "live-2", "live-3"}
	var reps []*replica
	for _, id := range ids {
		r := h.spawnWith(id, map[string]string{"--lease-ttl": ttl.String(), "--interval": interval.String()})
		h.waitHealthy(r)
		reps = append(reps, r)
	}
	h.waitSettled(20*time.Second, ids...)
	prom := startPrometheus(t, promBin, reps)
	start := time.Now()
	since := func(t0 time.Time) string { return fmt.Sprintf("%.1fs", time.Since(t0).Seconds()) }

	// --- healthy --------------------------------------------------------------
	prom.waitFor(t, 30*time.Second, "every replica scraped, every shard owned and exporting its lag", func() (bool, string) {
		up, err1 := prom.scalar(`sum(up{job="vigil"})`)
		unowned, err2 := prom.scalar(`vigil:shards_unowned`)
		lags, err3 := prom.scalar(`count(vigil:shard_reconcile_lag_seconds)`)
		rate, err4 := prom.scalar(`sum(vigil:reconciles:rate5m)`)
		if err := firstErr(err1, err2, err3, err4); err != nil {
			return false, err.Error()
		}
		return up == 3 && unowned == 0 && lags == 16 && rate > 0, fmt.Sprintf("up %v, unowned %v, shards with lag %v, reconcile rate %v", up, unowned, lags, rate)
	})
	tHealthy := prom.waitFor(t, 30*time.Second, "a healthy cluster with no alert active", func() (bool, string) {
		as, err := prom.alerts()
		if err != nil {
			return false, err.Error()
		}
		return len(as) == 0, fmt.Sprint(as)
	})
	prom.checkRulesHealthy(t)
	lag0, _ := prom.scalar(`vigil:shard_reconcile_lag_seconds:max`)
	t.Logf("%s healthy: 3 replicas up, 16 shards owned, max lag %.1fs, every rule healthy, no alert active", since(start), lag0)

	// --- every agent hung ------------------------------------------------------
	tHang := time.Now()
	for _, id := range w.hosts {
		if err := w.sim.SetMode(id, agentsim.Mode{Kind: agentsim.ModeHang}); err != nil {
			t.Fatal(err)
		}
	}
	t.Logf("%s fault: all %d agents hung (they keep heartbeating)", since(start), len(w.hosts))
	failing := prom.waitAlert(t, 30*time.Second, "VigilAgentsFailing", "pending")
	t.Logf("%s VigilAgentsFailing pending %s after the hang (active at +%s; its for: 5m is past this test's budget)",
		since(start), since(tHang), failing.ActiveAt.Sub(tHang).Round(100*time.Millisecond))
	prom.waitFor(t, 20*time.Second, "blind hosts", func() (bool, string) {
		blind, err := prom.scalar(`vigil:blind_hosts`)
		return err == nil && blind > 0, fmt.Sprintf("vigil:blind_hosts %v (%v)", blind, err)
	})
	blind, _ := prom.scalar(`vigil:blind_hosts`)
	hosts, _ := prom.scalar(`sum(vigil_shard_hosts)`)
	t.Logf("%s %v of %v online hosts blind (not reconciled for > 2 × --interval) %s after the hang", since(start), blind, hosts, since(tHang))

	// --- an owner key deleted ------------------------------------------------
	killed := ids[0]
	if killed == h.leader() {
		killed = ids[1]
	}
	var keyShard int
	var keyOwner string
	var keyToken int64
	st := h.rec.State()
	for s, o := range st.Owners {
		if o.Value != killed && o.Value != "" {
			keyShard, keyOwner, keyToken = s, o.Value, o.CreateRev
			break
		}
	}
	cli := h.etcd.Client(t)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	_, err := cli.Delete(ctx, h.layout.Shard(keyShard))
	cancel()
	if err != nil {
		t.Fatal(err)
	}
	tKey := time.Now()
	t.Logf("%s fault: owner key of shard %d (held by %s) deleted", since(start), keyShard, keyOwner)
	h.poll(10*time.Second, "shard re-claimed under a new token", func() (bool, string) {
		o := h.rec.State().Owners[keyShard]
		return o.Value == keyOwner && o.CreateRev > keyToken, fmt.Sprintf("owner %q token %d", o.Value, o.CreateRev)
	})
	t.Logf("%s shard %d re-claimed by %s %s after the delete", since(start), keyShard, keyOwner, since(tKey))
	lost := prom.waitAlert(t, 15*time.Second, "VigilOwnerKeysLost", "firing")
	t.Logf("%s VigilOwnerKeysLost firing %s after the delete (it has no for:, so it skips pending)", since(start), lost.ActiveAt.Sub(tKey).Round(100*time.Millisecond))
	// VigilShardsUnowned's condition: the dip in vigil_shards_owned lasted as
	// long as the re-claim, far less than a scrape. Look at three evaluations.
	window := func() string { return strconv.Itoa(int(time.Since(tKey).Seconds())+1) + "s" }
	prom.waitFor(t, 10*time.Second, "three evaluations since the delete", func() (bool, string) {
		n, err := prom.scalar(`count_over_time(vigil:shards_unowned[` + window() + `])`)
		return err == nil && n >= 3, fmt.Sprint(n, err)
	})
	unownedMax, _ := prom.scalar(`max_over_time(vigil:shards_unowned[` + window() + `])`)
	t.Logf("%s vigil:shards_unowned peaked at %v in the %s since the delete: VigilShardsUnowned cannot see a key deleted under a live owner; VigilOwnerKeysLost is its equivalent",
		since(start), unownedMax, window())

	// --- a replica gone silent -------------------------------------------------------
	// SIGSTOP, not SIGKILL: a killed replica's peers revoke its lease at once
	// and its shards are claimed in well under a second, before any scrape
	// can see them unowned. A silent one keeps them until its lease expires.
	victim := h.replica(killed)
	if err := victim.Signal(syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	tKill := time.Now()
	t.Logf("%s fault: replica %s (%s) paused with SIGSTOP", since(start), killed, victim.Admin)
	down := prom.waitAlert(t, 15*time.Second, "VigilReplicaDown", "pending")
	if down.Labels["instance"] != victim.Admin {
		t.Errorf("VigilReplicaDown for %v, want instance %s", down.Labels, victim.Admin)
	}
	t.Logf("%s VigilReplicaDown pending for %s, %s after the pause", since(start), down.Labels["instance"], down.ActiveAt.Sub(tKill).Round(100*time.Millisecond))
	unowned := prom.waitAlert(t, 15*time.Second, "VigilShardsUnowned", "pending")
	t.Logf("%s VigilShardsUnowned pending (%s shards) %s after the pause: the silent replica's lease still holds its shards",
		since(start), strings.TrimSuffix(strings.TrimSuffix(unowned.Value, "e+00"), ".0"), unowned.ActiveAt.Sub(tKill).Round(100*time.Millisecond))
	survivors := slices.DeleteFunc(slices.Clone(ids), func(id string) bool { return id == killed })
	settled := h.waitSettled(ttl+5*time.Second, survivors...)
	t.Logf("%s survivors own every shard %s after the pause (lease TTL %s)", since(start), settled.Sub(tKill).Round(10*time.Millisecond), ttl)
	prom.waitFor(t, 15*time.Second, "VigilShardsUnowned resolved after the failover", func() (bool, string) {
		a, err := prom.alert("VigilShardsUnowned")
		return err == nil && a == nil, fmt.Sprint(a, err)
	})
	t.Logf("%s VigilShardsUnowned resolved %s after the pause, well inside its for: 1m", since(start), since(tKill))

	down = prom.waitAlert(t, 80*time.Second, "VigilReplicaDown", "firing")
	t.Logf("%s VigilReplicaDown firing %s after the pause (for: 1m)", since(start), since(tKill))

	// --- the lag, fed by the truthful signal -----------------------------------------
	lagHang, _ := prom.scalar(`vigil:shard_reconcile_lag_seconds:max`)
	if min := time.Since(tHang).Seconds() - 2*interval.Seconds() - 2; lagHang < min {
		t.Errorf("max reconcile lag %.1fs %s into the hang, want at least %.1fs: the lag does not grow while every agent hangs", lagHang, since(tHang), min)
	}
	t.Logf("%s max reconcile lag %.1fs, %s into the hang (it was %.1fs before)", since(start), lagHang, since(tHang), lag0)
	lagAlert := prom.waitAlert(t, 110*time.Second-time.Since(tHang), "VigilReconcileLagHigh", "pending")
	lagValue, _ := strconv.ParseFloat(lagAlert.Value, 64)
	t.Logf("%s VigilReconcileLagHigh pending for shard %s at lag %.1fs, %s after the hang (threshold 90s = 3 × default --interval; its for: 2m is past this test's budget)",
		since(start), lagAlert.Labels["shard"], lagValue, lagAlert.ActiveAt.Sub(tHang).Round(100*time.Millisecond))
	if v, err := prom.scalar(`count(time() - max by (shard) (vigil_shard_last_reconcile_success_timestamp_seconds) > 90)`); err != nil || v < 1 {
		t.Errorf("VigilReconcileLagHigh's condition: %v shards over 90s (%v)", v, err)
	}
	if v, err := prom.scalar(`max(vigil:agent_list_sandboxes_failure_ratio:rate5m)`); err != nil || v <= 0.1 {
		t.Errorf("VigilAgentsFailing's condition: failure ratio %v (%v), want over 0.1", v, err)
	} else {
		t.Logf("%s ListSandboxes failure ratio %.2f on the worst replica; VigilAgentsFailing still %s", since(start), v, prom.stateOf("VigilAgentsFailing"))
	}
	if a, _ := prom.alert("VigilReconcileErrors"); a != nil {
		t.Errorf("VigilReconcileErrors %s: agent failures are not reconcile errors", a.State)
	}

	// --- every rule evaluates; recording rules have data -----------------------------
	prom.checkRulesHealthy(t)
	rules, err := prom.rules()
	if err != nil {
		t.Fatal(err)
	}
	for _, r := range rules {
		res, err := prom.query(r.Query)
		switch {
		case err != nil:
			t.Errorf("%s %s: %q does not evaluate: %v", r.Type, r.Name, r.Query, err)
		case r.Type == "recording" && len(res) == 0:
			t.Errorf("recording rule %s returns no data", r.Name)
		}
	}
	t.Logf("%s %d rules evaluated on live series: every recording rule returns data, every alert expression evaluates", since(start), len(rules))

	// Since the cluster was healthy, alerts that no fault provoked were never
	// active. (Before the first scrapes, VigilNoLeader and VigilNoReplicasUp
	// are pending for a moment: no series yet.) VigilShardsNotReconciled is
	// pending during a failover (shards without a lag gauge), as designed.
	provoked := map[string]bool{"VigilAgentsFailing": true, "VigilOwnerKeysLost": true, "VigilReplicaDown": true,
		"VigilShardsUnowned": true, "VigilReconcileLagHigh": true, "VigilShardsNotReconciled": true}
	ever, err := prom.query(fmt.Sprintf(`group by (alertname, alertstate) (count_over_time(ALERTS[%ds]))`, int(time.Since(tHealthy).Seconds())))
	if err != nil {
		t.Fatal(err)
	}
	var seen []string
	for _, s := range ever {
		seen = append(seen, s.Metric["alertname"]+"/"+s.Metric["alertstate"])
		if !provoked[s.Metric["alertname"]] {
			t.Errorf("%s was %s, though no fault provokes it", s.Metric["alertname"], s.Metric["alertstate"])
		}
	}
	sort.Strings(seen)
	t.Logf("alerts active at some point: %s", strings.Join(seen, ", "))
	h.checkHistory()
	h.checkNoAnomalies()
}

// spawnWith starts a replica like spawn, with some flags replaced.
func (h *harness) spawnWith(id string, override map[string]string) *replica {
	h.t.Helper()
	admin := freePort(h.t)
	flags := [][2]string{
		{"--etcd-endpoints", h.endpoint}, {"--database-url", h.dbURL}, {"--cluster", h.cluster},
		{"--replica-id", id}, {"--shards", strconv.Itoa(h.shards)}, {"--lease-ttl", testTTL.String()},
		{"--interval", "2s"}, {"--http-addr", admin}, {"--agent-timeout", "1s"}, {"--db-max-conns", "4"},
		{"--log-format", "json"},
	}
	args := []string{"run"}
	for _, f := range flags {
		v := f[1]
		if o, ok := override[f[0]]; ok {
			v = o
		}
		args = append(args, f[0], v)
	}
	return h.startProcess(id, admin, args)
}

// prometheusServer returns the prometheus binary, which the suite's set-up
// installs (scripts/ensure-promtool.sh, run by make test).
func prometheusServer(t *testing.T) string {
	t.Helper()
	p, err := exec.LookPath("prometheus")
	if err != nil {
		t.Fatalf("prometheus is not on PATH: run scripts/ensure-promtool.sh (make test does): %v", err)
	}
	return p
}

// promServer is a running Prometheus and its HTTP API.
type promServer struct {
	base string
	log  *logBuffer
}

// startPrometheus runs Prometheus with the shipped rules, scraping the
// replicas as job="vigil" and evaluating every second, until the test ends.
func startPrometheus(t *testing.T, bin string, reps []*replica) *promServer {
	t.Helper()
	rules, err := filepath.Abs(shippedRules)
	if err != nil {
		t.Fatal(err)
	}
	var targets []string
	for _, r := range reps {
		targets = append(targets, strconv.Quote(r.Admin))
	}
	dir := t.TempDir()
	cfg := fmt.Sprintf(`global:
  scrape_interval: 1s
  scrape_timeout: 1s
  evaluation_interval: 1s
rule_files:
  - %s
scrape_configs:
  - job_name: vigil
    static_configs:
      - targets: [%s]
`, strconv.Quote(rules), strings.Join(targets, ", "))
	cfgFile := filepath.Join(dir, "prometheus.yml")
	if err := os.WriteFile(cfgFile, []byte(cfg), 0o644); err != nil {
		t.Fatal(err)
	}
	addr := freePort(t)
	cmd := exec.Command(bin, "--config.file="+cfgFile, "--storage.tsdb.path="+filepath.Join(dir, "data"),
		"--web.listen-address="+addr, "--log.level=warn")
	lb := &logBuffer{}
	cmd.Stdout, cmd.Stderr = lb, lb
	if err := cmd.Start(); err != nil {
		t.Fatalf("start prometheus: %v", err)
	}
	done := make(chan struct{})
	go func() { _ = cmd.Wait(); close(done) }()
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		<-done
		if t.Failed() {
			t.Logf("---- prometheus log:\n%s", lb.Tail(60))
		}
	})
	p := &promServer{base: "http://" + addr, log: lb}
	p.waitFor(t, 30*time.Second, "prometheus ready", func() (bool, string) {
		select {
		case <-done:
			t.Fatalf("prometheus exited:\n%s", lb.Tail(40))
		default:
		}
		resp, err := httpClient.Get(p.base + "/-/ready")
		if err != nil {
			return false, err.Error()
		}
		resp.Body.Close()
		return resp.StatusCode == 200, resp.Status
	})
	return p
}

// waitFor polls cond every 100ms until it holds and returns when it did; the
// test fails at timeout with cond's last detail.
func (p *promServer) waitFor(t *testing.T, timeout time.Duration, what string, cond func() (bool, string)) time.Time {
	t.Helper()
	var at time.Time
	testwait.Until(t, timeout, 100*time.Millisecond, what, func() (bool, string) {
		ok, detail := cond()
		at = time.Now()
		return ok, detail
	}, nil)
	return at
}

// apiGet fetches one Prometheus API endpoint into data.
func (p *promServer) apiGet(path string, params url.Values, data any) error {
	u := p.base + path
	if len(params) > 0 {
		u += "?" + params.Encode()
	}
	resp, err := httpClient.Get(u)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	var env struct {
		Status string          `json:"status"`
		Error  string          `json:"error"`
		Data   json.RawMessage `json:"data"`
	}
	if err := json.NewDecoder(resp.Body).Decode(&env); err != nil {
		return fmt.Errorf("%s: %s: %w", path, resp.Status, err)
	}
	if env.Status != "success" {
		return fmt.Errorf("%s: %s: %s", path, resp.Status, env.Error)
	}
	return json.Unmarshal(env.Data, data)
}

type promSample struct {
	Metric map[string]string `json:"metric"`
	Value  float64
}

// query runs an instant query; a scalar result is one sample.
func (p *promServer) query(q string) ([]promSample, error) {
	var data struct {
		ResultType string          `json:"resultType"`
		Result     json.RawMessage `json:"result"`
	}
	if err := p.apiGet("/api/v1/query", url.Values{"query": {q}}, &data); err != nil {
		return nil, err
	}
	parse := func(v [2]any) float64 {
		s, _ := v[1].(string)
		f, _ := strconv.ParseFloat(s, 64)
		return f
	}
	switch data.ResultType {
	case "vector":
		var raw []struct {
			Metric map[string]string `json:"metric"`
			Value  [2]any            `json:"value"`
		}
		if err := json.Unmarshal(data.Result, &raw); err != nil {
			return nil, err
		}
		out := make([]promSample, len(raw))
		for i, r := range raw {
			out[i] = promSample{Metric: r.Metric, Value: parse(r.Value)}
		}
		return out, nil
	case "scalar":
		var v [2]any
		if err := json.Unmarshal(data.Result, &v); err != nil {
			return nil, err
		}
		return []promSample{{Value: parse(v)}}, nil
	}
	return nil, fmt.Errorf("query %q: result type %s", q, data.ResultType)
}

// scalar runs a query that yields at most one sample; none reads as 0.
func (p *promServer) scalar(q string) (float64, error) {
	res, err := p.query(q)
	if err != nil {
		return 0, err
	}
	switch len(res) {
	case 0:
		return 0, nil
	case 1:
		return res[0].Value, nil
	}
	return 0, fmt.Errorf("query %q: %d samples, want one", q, len(res))
}

type promAlert struct {
	Labels   map[string]string `json:"labels"`
	State    string            `json:"state"`
	ActiveAt time.Time         `json:"activeAt"`
	Value    string            `json:"value"`
}

func (a promAlert) String() string { return a.Labels["alertname"] + "/" + a.State }

func (p *promServer) alerts() ([]promAlert, error) {
	var data struct {
		Alerts []promAlert `json:"alerts"`
	}
	err := p.apiGet("/api/v1/alerts", nil, &data)
	return data.Alerts, err
}

// alert returns the active alert of that name (the first, if several), or nil.
func (p *promServer) alert(name string) (*promAlert, error) {
	as, err := p.alerts()
	if err != nil {
		return nil, err
	}
	for _, a := range as {
		if a.Labels["alertname"] == name {
			return &a, nil
		}
	}
	return nil, nil
}

func (p *promServer) stateOf(name string) string {
	a, err := p.alert(name)
	switch {
	case err != nil:
		return err.Error()
	case a == nil:
		return "inactive"
	}
	return a.State
}

// waitAlert waits until the alert is active in state and returns it.
func (p *promServer) waitAlert(t *testing.T, timeout time.Duration, name, state string) promAlert {
	t.Helper()
	var got promAlert
	p.waitFor(t, timeout, name+" "+state, func() (bool, string) {
		as, err := p.alerts()
		if err != nil {
			return false, err.Error()
		}
		for _, a := range as {
			if a.Labels["alertname"] == name && a.State == state {
				got = a
				return true, ""
			}
		}
		return false, fmt.Sprintf("active alerts %v", as)
	})
	return got
}

type promRule struct {
	Name      string `json:"name"`
	Query     string `json:"query"`
	Type      string `json:"type"` // recording, alerting
	Health    string `json:"health"`
	LastError string `json:"lastError"`
}

// rules lists every loaded rule; it fails if the shipped file's groups are
// not what Prometheus loaded.
func (p *promServer) rules() ([]promRule, error) {
	var data struct {
		Groups []struct {
			Name  string     `json:"name"`
			File  string     `json:"file"`
			Rules []promRule `json:"rules"`
		} `json:"groups"`
	}
	if err := p.apiGet("/api/v1/rules", nil, &data); err != nil {
		return nil, err
	}
	var out []promRule
	for _, g := range data.Groups {
		out = append(out, g.Rules...)
	}
	if len(out) == 0 {
		return nil, fmt.Errorf("prometheus loaded no rules")
	}
	return out, nil
}

// checkRulesHealthy fails the test for a rule whose last evaluation failed,
// and for a rule file that did not load in full.
func (p *promServer) checkRulesHealthy(t *testing.T) {
	t.Helper()
	rules, err := p.rules()
	if err != nil {
		t.Fatal(err)
	}
	raw, err := os.ReadFile(shippedRules)
	if err != nil {
		t.Fatal(err)
	}
	if want := bytes.Count(raw, []byte("\n      - record: ")) + bytes.Count(raw, []byte("\n      - alert: ")); len(rules) != want {
		t.Errorf("prometheus loaded %d rules, %s has %d", len(rules), shippedRules, want)
	}
	for _, r := range rules {
		if r.Health != "ok" || r.LastError != "" {
			t.Errorf("%s rule %s: health %q, last error %q", r.Type, r.Name, r.Health, r.LastError)
		}
	}
}

func firstErr(errs ...error) error {
	for _, err := range errs {
		if err != nil {
			return err
		}
	}
	return nil
}
