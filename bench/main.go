// Command bench is vigil's benchmark (`make bench`) and its smoke check
// (`make bench-smoke`, and TestSmoke under `go test`).
//
// It assembles a real fleet on this machine — a fresh Postgres database on
// the local server, etcd embedded in this process, the agent simulator as
// separate processes, `vigil run` replicas as separate processes — and
// measures, in one run:
//
//   - the RPC ceiling: a bare concurrent ListSandboxes loop over every host,
//     no database;
//   - the seed's loop: one host after another, the RPC plus its three
//     queries;
//   - vigil sweeps for each replica count × {steady, a fraction of sandboxes
//     needing a transition} × {plain HTTP, mutual TLS}: wall time, hosts/s,
//     ratios to both references, Postgres and etcd cost, CPU, peak RSS,
//     goroutines and open fds per replica;
//   - failover (SIGKILL of the leader, then of another replica, at vigil's
//     default lease TTL: SPEC §3 wants a killed replica's shards claimed
//     within 1 s whatever the TTL), handover (SIGTERM) and unreachable
//     detection.
//
// Every figure is printed with its target and a met/short mark, and written
// as JSON to <out>/<UTC timestamp>.json and <out>/latest.json. A figure whose
// input vigil or agentsim does not provide yet (a metric, a flag) is "n/a"
// with the reason; it never stops the run.
//
// With -smoke the fleet is small and every configuration brief; the run
// checks that every figure is produced and sane (present, finite, positive
// where it must be), not that targets are met, and exits 1 otherwise.
//
// Every child process runs in its own process group and is killed with it;
// the database is dropped and the temporary directory removed on every exit,
// including failures and Ctrl-C.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/vigil-sh/vigil/election"
	"github.com/vigil-sh/vigil/internal/pgtest"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	code := run(ctx, os.Args[1:], os.Stdout, os.Stderr)
	stop()
	os.Exit(code)
}

// options are the parsed flags.
type options struct {
	Hosts            int
	Sandboxes        int
	Latency          time.Duration
	Replicas         []int
	Transports       []string // "plain", "mtls"
	Duration         time.Duration
	Sweeps           int
	Out              string
	Bin              string
	Smoke            bool
	Fleet            bool
	Strict           bool
	Profile          bool
	Shards           int
	LeaseTTL         time.Duration
	FaultLeaseTTL    time.Duration
	Interval         time.Duration
	FaultInterval    time.Duration
	UnreachableAfter time.Duration
	Heartbeat        time.Duration
	ChangeFraction   float64
	InFlight         int
	AgentConcurrency int
	DBMaxConns       int
	HostsPerAgentsim int
	SweepTimeout     time.Duration
	UnreachableHosts int
	Budget           time.Duration
	AdminURL         string
	KeepLogs         bool
}

// smokeDefaults replace the full run's defaults under -smoke, for every flag
// not given explicitly.
var smokeDefaults = map[string]string{
	"hosts":              "200",
	"sandboxes":          "5",
	"duration":           "1s",
	"sweeps":             "1",
	"lease-ttl":          "2s",
	"unreachable-after":  "4s",
	"heartbeat-interval": "1s",
	"sweep-timeout":      "20s",
	"fault-interval":     "2s",
	"unreachable-hosts":  "2",
	"budget":             "150s",
	"out":                filepath.Join(os.TempDir(), "vigil-bench-smoke"),
}

func defaultAdminURL() string { return pgtest.AdminURL() }

func parseOptions(args []string, stderr io.Writer) (options, error) {
	var o options
	var replicas, transports string
	fs := flag.NewFlagSet("bench", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.IntVar(&o.Hosts, "hosts", 10000, "simulated hosts")
	fs.IntVar(&o.Sandboxes, "sandboxes", 20, "sandboxes per host")
	fs.DurationVar(&o.Latency, "latency", 2*time.Millisecond, "base answer delay of every agent (agentsim --latency)")
	fs.StringVar(&replicas, "replicas", "1,3", "replica counts to measure, comma-separated; the largest (at least 2) also runs failover and handover")
	fs.StringVar(&transports, "transports", "mtls,plain", "agent transports to measure, in this order: mtls (production agents speak mutual TLS: the headline) and plain (the reference)")
	fs.DurationVar(&o.Duration, "duration", 10*time.Second, "window of each measurement: the RPC ceiling, the seed loop, and (at least) the steady sweeps of each configuration")
	fs.IntVar(&o.Sweeps, "sweeps", 3, "steady sweeps per configuration (more until -duration has passed; fewer, at least 1, once 3 × -duration has); the median is reported")
	fs.StringVar(&o.Out, "out", filepath.Join("bench", "results"), "directory for <UTC timestamp>.json, latest.json and profiles")
	fs.StringVar(&o.Bin, "bin", "bin", "directory holding the vigil and agentsim binaries (go build -o bin/ ./cmd/...)")
	fs.BoolVar(&o.Smoke, "smoke", false, "small fleet, every configuration briefly; check that every figure is produced and sane, exit 1 otherwise")
	fs.BoolVar(&o.Fleet, "fleet", false, "the fleet-scale run instead (make bench-fleet): a large fleet at vigil's default interval and lease TTL, its lag and cost watched for -duration, then a replica killed; see fleetscale.go. Its own defaults apply to every flag not given (100,000 hosts, 10 replicas, mtls, 30s interval, 5m)")
	fs.BoolVar(&o.Strict, "strict", false, "with -smoke: also fail on figures that are n/a because vigil or agentsim lacks a metric or flag")
	fs.BoolVar(&o.Profile, "profile", false, "save a CPU profile of the replica during the 1-replica steady plain sweeps (needs vigil --debug-pprof)")
	fs.IntVar(&o.Shards, "shards", 256, "shard count of every cluster")
	fs.DurationVar(&o.LeaseTTL, "lease-ttl", 5*time.Second, "replicas' --lease-ttl (whole seconds)")
	fs.DurationVar(&o.Interval, "interval", 200*time.Millisecond, "replicas' --interval: short, so they run flat out")
	fs.DurationVar(&o.FaultLeaseTTL, "fault-lease-ttl", election.DefaultLeaseTTL, "replicas' --lease-ttl (whole seconds) while failover, handover and unreachable detection are measured: vigil's default, since a SIGKILLed replica's shards must move within 1 s whatever the TTL")
	fs.DurationVar(&o.FaultInterval, "fault-interval", 10*time.Second, "replicas' --interval while failover, handover and unreachable detection are measured: a deployment's load, not flat out")
	fs.DurationVar(&o.UnreachableAfter, "unreachable-after", 10*time.Second, "replicas' --unreachable-after")
	fs.DurationVar(&o.Heartbeat, "heartbeat-interval", 5*time.Second, "agentsim --heartbeat-interval")
	fs.Float64Var(&o.ChangeFraction, "change-fraction", 0.05, "fraction of sandboxes put into a state vigil must change before the changing sweep")
	fs.IntVar(&o.InFlight, "in-flight", 64, "concurrent calls of the RPC ceiling loop")
	fs.IntVar(&o.AgentConcurrency, "agent-concurrency", 0, "replicas' --agent-concurrency (0: vigil's default)")
	fs.IntVar(&o.DBMaxConns, "db-max-conns", 0, "replicas' --db-max-conns (0: vigil's default); the cluster holds replicas × (this + 1) Postgres connections")
	fs.IntVar(&o.HostsPerAgentsim, "hosts-per-agentsim", 2500, "hosts per agentsim process (each process has a 20,000 open-file limit)")
	fs.DurationVar(&o.SweepTimeout, "sweep-timeout", 2*time.Minute, "give up on a sweep (or a settle) after this long")
	fs.IntVar(&o.UnreachableHosts, "unreachable-hosts", 5, "hosts that stop heartbeating in the unreachable-detection measurement")
	fs.DurationVar(&o.Budget, "budget", 14*time.Minute, "the whole run's time: each configuration gets a share of what is left, and a slow vigil gets shorter measurements (its figures say so) rather than a longer run")
	fs.StringVar(&o.AdminURL, "database-url", defaultAdminURL(), "Postgres maintenance database; the benchmark's database is created beside it and dropped at the end")
	fs.BoolVar(&o.KeepLogs, "keep-logs", false, "keep the temporary directory with every process's log (always kept after a failure)")
	fs.Usage = func() {
		fmt.Fprintf(stderr, "Usage: go run ./bench [flags]\n\nBenchmarks vigil on a real local fleet; see the package documentation.\n\n")
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		return o, err
	}
	if fs.NArg() > 0 {
		return o, fmt.Errorf("unexpected argument %q", fs.Arg(0))
	}
	if err := applyDefaults(fs, o); err != nil {
		return o, err
	}
	var err error
	if o.Replicas, err = parseInts(replicas); err != nil {
		return o, fmt.Errorf("-replicas: %w", err)
	}
	for _, t := range strings.Split(transports, ",") {
		switch t = strings.TrimSpace(t); t {
		case "plain", "mtls":
			o.Transports = append(o.Transports, t)
		case "":
		default:
			return o, fmt.Errorf("-transports: unknown transport %q (want plain, mtls)", t)
		}
	}
	switch {
	case o.Hosts < 1:
		return o, fmt.Errorf("-hosts %d must be positive", o.Hosts)
	case o.Sandboxes < 1:
		return o, fmt.Errorf("-sandboxes %d must be positive", o.Sandboxes)
	case len(o.Transports) == 0:
		return o, errors.New("-transports is empty")
	case o.Duration <= 0:
		return o, fmt.Errorf("-duration %s must be positive", o.Duration)
	case o.Sweeps < 1:
		return o, fmt.Errorf("-sweeps %d must be at least 1", o.Sweeps)
	case o.LeaseTTL < time.Second || o.LeaseTTL%time.Second != 0:
		return o, fmt.Errorf("-lease-ttl %s must be whole seconds, at least 1s", o.LeaseTTL)
	case o.FaultLeaseTTL < time.Second || o.FaultLeaseTTL%time.Second != 0:
		return o, fmt.Errorf("-fault-lease-ttl %s must be whole seconds, at least 1s", o.FaultLeaseTTL)
	case o.ChangeFraction <= 0 || o.ChangeFraction > 1:
		return o, fmt.Errorf("-change-fraction %v must be in (0, 1]", o.ChangeFraction)
	case o.InFlight < 1:
		return o, fmt.Errorf("-in-flight %d must be positive", o.InFlight)
	case o.HostsPerAgentsim < 1:
		return o, fmt.Errorf("-hosts-per-agentsim %d must be positive", o.HostsPerAgentsim)
	case o.Shards < 1 || o.Shards > 9999:
		return o, fmt.Errorf("-shards %d out of range 1..9999", o.Shards)
	case o.UnreachableHosts < 1 || o.UnreachableHosts > o.Hosts:
		return o, fmt.Errorf("-unreachable-hosts %d must be in 1..hosts", o.UnreachableHosts)
	case o.Heartbeat <= 0:
		return o, fmt.Errorf("-heartbeat-interval %s must be positive", o.Heartbeat)
	case o.Budget < 30*time.Second:
		return o, fmt.Errorf("-budget %s is too short", o.Budget)
	}
	return o, nil
}

// applyDefaults sets the -smoke, -fleet or -fleet -smoke defaults of every
// flag not given explicitly.
func applyDefaults(fs *flag.FlagSet, o options) error {
	var defaults map[string]string
	switch {
	case o.Fleet && o.Smoke:
		defaults = fleetSmokeDefaults
	case o.Fleet:
		defaults = fleetDefaults
	case o.Smoke:
		defaults = smokeDefaults
	default:
		return nil
	}
	set := map[string]bool{}
	fs.Visit(func(f *flag.Flag) { set[f.Name] = true })
	for name, v := range defaults {
		if !set[name] {
			if err := fs.Set(name, v); err != nil {
				return err
			}
		}
	}
	if o.Fleet && o.Smoke && !set["out"] {
		return fs.Set("out", smokeDefaults["out"])
	}
	return nil
}

func parseInts(s string) ([]int, error) {
	var out []int
	for _, f := range strings.Split(s, ",") {
		if f = strings.TrimSpace(f); f == "" {
			continue
		}
		n, err := strconv.Atoi(f)
		if err != nil || n < 1 || n > 16 {
			return nil, fmt.Errorf("%q is not a replica count in 1..16", f)
		}
		out = append(out, n)
	}
	if len(out) == 0 {
		return nil, errors.New("no replica count")
	}
	return out, nil
}

// failoverReplicas is the replica count the failover and handover
// measurements run at: the largest measured count, when it is at least 2.
func (o options) failoverReplicas() int {
	m := 0
	for _, n := range o.Replicas {
		m = max(m, n)
	}
	if m < 2 {
		return 0
	}
	return m
}

// agentTimeout is the replicas' --agent-timeout at -lease-ttl.
func (o options) agentTimeout() time.Duration { return agentTimeout(o.LeaseTTL) }

// agentTimeout is the replicas' --agent-timeout at a lease TTL: vigil
// requires it under the TTL.
func agentTimeout(ttl time.Duration) time.Duration {
	return min(5*time.Second, ttl/2)
}

func run(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	o, err := parseOptions(args, stderr)
	if errors.Is(err, flag.ErrHelp) {
		return 0
	}
	if err != nil {
		fmt.Fprintf(stderr, "bench: %v\n", err)
		return 2
	}
	log := newProgress(stderr)
	bench := runBench
	if o.Fleet {
		bench = runFleetScale
	}
	rep, runErr := bench(ctx, o, log)
	rep.print(stdout)
	if ctx.Err() != nil {
		fmt.Fprintf(stderr, "bench: interrupted; no results written\n")
		return 130
	}
	paths, err := rep.write(o.Out)
	if err != nil {
		fmt.Fprintf(stderr, "bench: write results: %v\n", err)
		return 1
	}
	fmt.Fprintf(stdout, "\nresults: %s\n", strings.Join(paths, ", "))
	code := 0
	if runErr != nil {
		fmt.Fprintf(stderr, "bench: %v\n", runErr)
		code = 1
	}
	if o.Smoke {
		problems, pending := rep.check(o.Strict)
		for _, p := range summarize(pending) {
			fmt.Fprintf(stdout, "smoke: pending, vigil or agentsim lacks %s\n", p)
		}
		for _, p := range problems {
			fmt.Fprintf(stdout, "smoke: FAIL %s\n", p)
		}
		if len(problems) > 0 {
			code = 1
		} else if runErr == nil {
			fmt.Fprintf(stdout, "smoke: ok: %d figures sane, %d pending\n", len(rep.Figures)-len(pending), len(pending))
		}
	}
	return code
}

// progress writes timestamped progress lines.
type progress struct {
	w     io.Writer
	start time.Time
}

func newProgress(w io.Writer) *progress { return &progress{w: w, start: time.Now()} }

func (p *progress) printf(format string, args ...any) {
	fmt.Fprintf(p.w, "[%6.1fs] %s\n", time.Since(p.start).Seconds(), fmt.Sprintf(format, args...))
}
