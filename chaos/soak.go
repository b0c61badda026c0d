package chaos

import (
	"context"
	"errors"
	"fmt"
	"math"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
)

// SoakOptions shape a soak: a long run of the chaos cluster with faults
// spaced out, sampled for anything that keeps growing.
type SoakOptions struct {
	Every  time.Duration // sampling period, default 30s
	WarmUp time.Duration // samples before this are not fitted, default a quarter of the run (at most 30m)
	Out    string        // results directory (the table, the samples, the plot)
}

// SoakConfig is the cluster of `make soak`: 3 replicas (no scaling) over
// 2,000 hosts with churn and events, a fault every 3 minutes, heartbeats
// and passes at a deployment's slower pace, and a journal retention short
// enough that the journal must level off within the run.
func SoakConfig(cfg Config) Config {
	cfg.Replicas, cfg.MaxReplicas, cfg.Hosts = 3, 3, 2000
	cfg.Interval, cfg.HeartbeatInterval, cfg.UnreachableAfter = 5*time.Second, 5*time.Second, 20*time.Second
	cfg.TransientGrace, cfg.SnapshotGrace = 30*time.Second, 60*time.Second
	cfg.ChurnPerSecond = 5
	if cfg.FaultGap == 0 {
		cfg.FaultGap = 3 * time.Minute
	}
	cfg.JournalRetention = 15 * time.Minute
	cfg.PrivatePostgres = true
	return cfg
}

// soakSeries are the figures sampled, in the table's and the plot's order,
// with how much each may grow after the warm-up (relative to its mean; the
// fitted line's rise over the fitted span) before the soak fails. The
// etcd revision grows with every claim by design: reported, not judged.
var soakSeries = []struct {
	name     string
	maxGrow  float64 // < 0: not judged
	minScale float64 // growth is judged against max(mean, minScale)
}{
	{"replica RSS MiB (max over replicas)", 0.25, 64},
	{"replica Go heap in use MiB (max)", 0.25, 32},
	{"replica goroutines (max)", 0.25, 200},
	{"replica open fds (max)", 0.25, 100},
	{"Postgres connections of the run's database", 0.5, 20},
	{"outbox rows (vigil_events)", 0.5, 500},
	{"journal rows (vigil_journal)", 0.25, 1000},
	{"etcd keys of the cluster", 0.25, 20},
	{"etcd revision", -1, 0},
}

type soakSample struct {
	at     time.Duration // since the start of the fault phase
	values []float64     // soakSeries order; NaN: not sampled
}

// Soak runs cfg (see SoakConfig) for cfg.Duration with faults, samples the
// cluster every o.Every, and judges each series' slope after the warm-up.
// It writes soak.md, samples.csv and soak.png to o.Out. The error is for a
// soak that could not be carried out.
func Soak(ctx context.Context, cfg Config, o SoakOptions) (*SoakResult, error) {
	if o.Every == 0 {
		o.Every = 30 * time.Second
	}
	if o.WarmUp == 0 {
		o.WarmUp = min(cfg.Duration/4, 30*time.Minute)
	}
	e, err := newEnv(cfg)
	if err != nil {
		return nil, err
	}
	defer e.teardown()
	if err := e.setup(ctx); err != nil {
		return nil, err
	}
	bg, stopBG := context.WithCancel(ctx)
	var wg sync.WaitGroup
	wg.Add(1)
	go func() { defer wg.Done(); e.scrapeLoop(bg) }()
	go e.leaders.run(bg)
	if e.events != nil {
		go e.events.run(bg)
	}
	var samples []soakSample
	wg.Add(1)
	start := time.Now()
	go func() { defer wg.Done(); samples = e.sampleLoop(bg, start, o.Every) }()
	e.work.startBadInput()
	err = e.nemeses(ctx, start.Add(e.cfg.Duration))
	stopBG()
	wg.Wait()
	if err != nil && !errors.Is(err, context.Canceled) {
		return nil, err
	}
	res := judgeSoak(samples, o.WarmUp)
	res.Config = e.cfg
	e.mu.Lock()
	for _, f := range e.faults {
		res.Faults[f.kind]++
		if f.recoverErr != nil {
			res.Unrecovered = append(res.Unrecovered, fmt.Sprintf("%s %s on %s: %v", f.start.Format("15:04:05"), f.kind, f.target, f.recoverErr))
		}
	}
	e.mu.Unlock()
	res.Crashes = e.crashes()
	if o.Out != "" {
		if err := res.write(o.Out, o); err != nil {
			return res, err
		}
	}
	return res, nil
}

// sampleLoop samples every period until ctx ends and returns the samples.
func (e *env) sampleLoop(ctx context.Context, start time.Time, period time.Duration) []soakSample {
	var out []soakSample
	t := time.NewTicker(period)
	defer t.Stop()
	for {
		s := e.sample(ctx, start)
		if ctx.Err() != nil {
			return out
		}
		out = append(out, s)
		e.logf("soak sample: %s", s.line())
		select {
		case <-ctx.Done():
			return out
		case <-t.C:
		}
	}
}

func (s soakSample) line() string {
	var parts []string
	for i, v := range s.values {
		parts = append(parts, fmt.Sprintf("%s %.0f", strings.SplitN(soakSeries[i].name, " (", 2)[0], v))
	}
	return strings.Join(parts, ", ")
}

// sample takes one of each series.
func (e *env) sample(ctx context.Context, start time.Time) soakSample {
	s := soakSample{at: time.Since(start), values: make([]float64, len(soakSeries))}
	for i := range s.values {
		s.values[i] = math.NaN()
	}
	maxOf := func(i int, v float64) {
		if math.IsNaN(s.values[i]) || v > s.values[i] {
			s.values[i] = v
		}
	}
	for _, m := range e.live() {
		if m.isPaused() {
			continue
		}
		vals, err := m.r.Metrics()
		if err != nil {
			continue
		}
		maxOf(0, vals["process_resident_memory_bytes"]/(1<<20))
		maxOf(1, vals["go_memstats_heap_inuse_bytes"]/(1<<20))
		maxOf(2, vals["go_goroutines"])
		maxOf(3, vals["process_open_fds"])
	}
	qctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	for i, q := range map[int]string{
		4: `select count(*) from pg_stat_activity where datname = current_database()`,
		5: `select count(*) from vigil_events`,
		6: `select count(*) from vigil_journal`,
	} {
		var n float64
		if err := e.db.QueryRow(qctx, q).Scan(&n); err == nil {
			s.values[i] = n
		}
	}
	if r, err := e.etcd.cli.Get(qctx, "/vigil/"+e.cluster+"/", clientv3.WithPrefix(), clientv3.WithCountOnly()); err == nil {
		s.values[7], s.values[8] = float64(r.Count), float64(r.Header.Revision)
	}
	return s
}

// SoakResult is the soak's verdict and figures.
type SoakResult struct {
	Config      Config // as run, defaults filled
	Samples     []soakSample
	WarmUp      time.Duration
	Fits        []soakFit // soakSeries order
	Faults      map[string]int
	Unrecovered []string
	Crashes     []string
}

type soakFit struct {
	n                 int
	first, last, mean float64 // after the warm-up
	peak              float64 // over the whole run
	slopePerHour      float64
	growth            float64 // the fitted rise over the fitted span, relative to max(mean, minScale)
	failed            bool
}

// Failed reports whether any judged series kept growing, a fault was not
// recovered from, or a replica crashed.
func (r *SoakResult) Failed() bool {
	for _, f := range r.Fits {
		if f.failed {
			return true
		}
	}
	return len(r.Unrecovered) > 0 || len(r.Crashes) > 0
}

// judgeSoak fits a least-squares line to each series after the warm-up.
func judgeSoak(samples []soakSample, warmUp time.Duration) *SoakResult {
	res := &SoakResult{Samples: samples, WarmUp: warmUp, Faults: map[string]int{}}
	for i, sr := range soakSeries {
		var xs, ys []float64
		f := soakFit{peak: math.NaN()}
		for _, s := range samples {
			v := s.values[i]
			if math.IsNaN(v) {
				continue
			}
			if math.IsNaN(f.peak) || v > f.peak {
				f.peak = v
			}
			if s.at >= warmUp {
				xs, ys = append(xs, s.at.Hours()), append(ys, v)
			}
		}
		f.n = len(xs)
		if f.n >= 3 {
			slope, mean := fitLine(xs, ys)
			f.first, f.last, f.mean, f.slopePerHour = ys[0], ys[len(ys)-1], mean, slope
			f.growth = slope * (xs[len(xs)-1] - xs[0]) / math.Max(mean, sr.minScale)
			f.failed = sr.maxGrow >= 0 && f.growth > sr.maxGrow
		} else {
			f.failed = sr.maxGrow >= 0 // too few samples to judge: not a pass
		}
		res.Fits = append(res.Fits, f)
	}
	return res
}

// fitLine is the least-squares slope of ys over xs, and the mean of ys.
func fitLine(xs, ys []float64) (slope, mean float64) {
	var mx, my float64
	for i := range xs {
		mx += xs[i]
		my += ys[i]
	}
	n := float64(len(xs))
	mx, my = mx/n, my/n
	var sxy, sxx float64
	for i := range xs {
		sxy += (xs[i] - mx) * (ys[i] - my)
		sxx += (xs[i] - mx) * (xs[i] - mx)
	}
	if sxx == 0 {
		return 0, my
	}
	return sxy / sxx, my
}

// write saves the table (soak.md), the samples (samples.csv) and the plot
// (soak.png) in dir.
func (r *SoakResult) write(dir string, o SoakOptions) error {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(dir, "soak.md"), []byte(r.Table(o)), 0o644); err != nil {
		return err
	}
	var csv strings.Builder
	csv.WriteString("seconds")
	for _, sr := range soakSeries {
		csv.WriteString(",\"" + sr.name + "\"")
	}
	csv.WriteString("\n")
	for _, s := range r.Samples {
		fmt.Fprintf(&csv, "%.0f", s.at.Seconds())
		for _, v := range s.values {
			fmt.Fprintf(&csv, ",%g", v)
		}
		csv.WriteString("\n")
	}
	if err := os.WriteFile(filepath.Join(dir, "samples.csv"), []byte(csv.String()), 0o644); err != nil {
		return err
	}
	return writeSoakPlot(filepath.Join(dir, "soak.png"), r)
}

// Table is the soak's report in Markdown.
func (r *SoakResult) Table(o SoakOptions) string {
	cfg := r.Config
	var b strings.Builder
	verdict := "PASS"
	if r.Failed() {
		verdict = "FAIL"
	}
	fmt.Fprintf(&b, "# Soak: %s\n\n", verdict)
	fmt.Fprintf(&b, "%s of faults (one every %s after the cluster settles), %d replicas, %d hosts, %d shards, interval %s, heartbeats every %s, churn %.0f/s, events on, journal retention %s, lease TTL %s; seed %d; a sample every %s, fitted after a warm-up of %s (%d samples).\n\n",
		cfg.Duration, cfg.FaultGap, cfg.Replicas, cfg.Hosts, cfg.Shards, cfg.Interval, cfg.HeartbeatInterval, cfg.ChurnPerSecond,
		cfg.JournalRetention, cfg.LeaseTTL, cfg.Seed, o.Every, r.WarmUp, len(r.Samples))
	b.WriteString("| panel | series | after warm-up: first | last | mean | peak (whole run) | fitted slope / h | fitted rise ÷ mean | allowed | verdict |\n|---|---|---|---|---|---|---|---|---|---|\n")
	for i, sr := range soakSeries {
		f := r.Fits[i]
		allowed, v := "not judged", "—"
		if sr.maxGrow >= 0 {
			allowed = fmt.Sprintf("≤ %.0f %%", sr.maxGrow*100)
			v = "flat"
			if f.failed {
				v = "**GROWS**"
			}
		}
		fmt.Fprintf(&b, "| %d | %s | %.0f | %.0f | %.1f | %.0f | %+.1f | %+.1f %% | %s | %s |\n",
			i+1, sr.name, f.first, f.last, f.mean, f.peak, f.slopePerHour, f.growth*100, allowed, v)
	}
	var kinds []string
	for _, k := range sortedKeys(r.Faults, func(a, b string) bool { return a < b }) {
		kinds = append(kinds, fmt.Sprintf("%s %d", k, r.Faults[k]))
	}
	fmt.Fprintf(&b, "\nFaults: %s.\n", strings.Join(kinds, ", "))
	fmt.Fprintf(&b, "Faults not recovered from: %d. Replica crashes: %d.\n", len(r.Unrecovered), len(r.Crashes))
	for _, u := range append(r.Unrecovered, r.Crashes...) {
		fmt.Fprintf(&b, "- %s\n", u)
	}
	b.WriteString("\nsoak.png: one panel per series in the table's order (two columns, left to right), the run's time across, the panel's range from its minimum to its maximum; grey: the warm-up; red: the fitted line.\n")
	return b.String()
}
