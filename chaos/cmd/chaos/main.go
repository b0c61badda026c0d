// Command chaos runs vigil's nemesis harness (package chaos): a real
// cluster under a seeded mix of faults and bad input, then the checker.
// It prints progress and the report, then runs the broken build (fence
// check disabled) that the checker must catch, and exits 1 if the checker
// found any violation in the real run or did not catch the broken one, 2 if
// a run could not be carried out. `make chaos` runs it;
// SEED= and DURATION= pass -seed and -duration.
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/vigil-sh/vigil/chaos"
	"github.com/vigil-sh/vigil/internal/redistest"
)

func main() {
	var cfg chaos.Config
	var kinds, tags string
	var broken, skipBroken bool
	fs := flag.NewFlagSet("chaos", flag.ExitOnError)
	fs.Int64Var(&cfg.Seed, "seed", 0, "seed of the fault schedule and the workload (0: from the clock)")
	fs.DurationVar(&cfg.Duration, "duration", 10*time.Minute, "length of the fault phase (a quiet period follows)")
	fs.DurationVar(&cfg.Quiet, "quiet", 0, "length of the quiet period before the final checks (default: every grace twice)")
	fs.IntVar(&cfg.Hosts, "hosts", 1000, "simulated hosts (the soak: 2,000)")
	fs.IntVar(&cfg.Shards, "shards", 64, "shards")
	fs.IntVar(&cfg.Replicas, "replicas", 3, "replicas at the start and the floor of scale-down")
	fs.IntVar(&cfg.MaxReplicas, "max-replicas", 5, "ceiling of scale-up")
	fs.DurationVar(&cfg.LeaseTTL, "lease-ttl", 3*time.Second, "every replica's lease TTL")
	fs.StringVar(&kinds, "kinds", "", "comma-separated fault kinds to use (default all): "+strings.Join(chaos.NemesisKinds(), ","))
	fs.StringVar(&tags, "tags", "", "build tags for vigil, e.g. chaos_nofence (the broken build)")
	fs.BoolVar(&broken, "broken", false, "run only the broken build (fence check disabled, -tags chaos_nofence) under this run's settings; exits 0 if the checker catches it")
	var soak bool
	var soakOut string
	var soakEvery time.Duration
	fs.BoolVar(&soak, "soak", false, "a soak instead of a chaos run (make soak): 3 replicas over 2,000 hosts, a fault every -fault-gap, sampled every -sample-every; fails if anything keeps growing")
	fs.StringVar(&soakOut, "soak-out", "", "the soak's results directory (default chaos/results/soak/<UTC time>)")
	fs.DurationVar(&soakEvery, "sample-every", 30*time.Second, "the soak's sampling period")
	fs.DurationVar(&cfg.FaultGap, "fault-gap", 0, "quiet time after each fault settles (default: a seeded fraction of the interval; the soak's: 3m)")
	fs.BoolVar(&skipBroken, "skip-broken-check", false, "do not follow the run with the broken-build run that proves the checker bites")
	fs.StringVar(&cfg.Dir, "dir", "", "keep binaries, logs and the history here (default: a temporary directory, kept only on failure)")
	fs.BoolVar(&cfg.PrivatePostgres, "private-postgres", true, "run Postgres as a server of the run's own (and restart it as a fault) instead of using the machine's shared server")
	fs.StringVar(&cfg.RedisURL, "redis-url", redistest.URL(), "Redis for the event checks (used once vigil has events)")
	_ = fs.Parse(os.Args[1:])
	if kinds != "" {
		cfg.Kinds = strings.Split(kinds, ",")
	}
	if tags != "" {
		cfg.BuildTags = strings.Split(tags, ",")
	}
	if broken {
		cfg.BuildTags = append(cfg.BuildTags, "chaos_nofence")
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if soak {
		os.Exit(runSoak(ctx, cfg, soakOut, soakEvery))
	}
	rep, err := chaos.Run(ctx, cfg)
	if err != nil {
		fmt.Fprintln(os.Stderr, "chaos:", err)
		os.Exit(2)
	}
	if broken {
		// Only the broken build: success is being caught.
		fmt.Printf("\n==== broken build caught: %v (%s)\n", rep.Caught(), rep.Summary())
		if !rep.Caught() {
			os.Exit(1)
		}
		return
	}
	failed := rep.Failed
	if !skipBroken {
		// The test must bite: the same harness against a build whose fence
		// check is disabled has to fail, and, when failovers are in the mix,
		// against a build that does not notice a failover.
		broken := []chaos.Config{chaos.BrokenBuild(cfg)}
		if chaos.FailoversOn(cfg) {
			broken = append(broken, chaos.FailoverBrokenBuild(cfg))
		}
		var verdicts []string
		for _, bcfg := range broken {
			caught, summary, ok := runBroken(ctx, bcfg)
			if !ok {
				os.Exit(2)
			}
			verdicts = append(verdicts, fmt.Sprintf("%v caught: %v (%s)", bcfg.BuildTags, caught, summary))
			if !caught {
				fmt.Println("the test does not bite: the broken build was not caught")
				failed = true
			}
		}
		fmt.Printf("\n==== verdict: run %s; broken builds %s\n", rep.Summary(), strings.Join(verdicts, "; "))
	}
	if failed {
		os.Exit(1)
	}
}

// runBroken runs one broken build; ok is false if the run could not be
// carried out. Its files are kept only if it was not caught (the surprise).
func runBroken(ctx context.Context, bcfg chaos.Config) (caught bool, summary string, ok bool) {
	dir, err := os.MkdirTemp("", "vigil-chaos-broken-")
	if err != nil {
		fmt.Fprintln(os.Stderr, "chaos:", err)
		return false, "", false
	}
	bcfg.Dir = dir
	fmt.Printf("\n==== the broken build (-tags %s, %s of %s) must be caught\n", strings.Join(bcfg.BuildTags, ","), bcfg.Duration, strings.Join(bcfg.Kinds, ", "))
	brep, err := chaos.Run(ctx, bcfg)
	if err != nil {
		fmt.Fprintln(os.Stderr, "chaos: broken-build run:", err)
		return false, "", false
	}
	if brep.Caught() {
		os.RemoveAll(dir)
	} else {
		fmt.Println("files of the broken-build run:", dir)
	}
	return brep.Caught(), brep.Summary(), true
}

// runSoak runs the soak and returns the exit code: 0 pass, 1 something kept
// growing (or a fault was not recovered from, or a replica crashed), 2 the
// soak could not be carried out.
func runSoak(ctx context.Context, cfg chaos.Config, out string, every time.Duration) int {
	cfg = chaos.SoakConfig(cfg)
	if out == "" {
		out = filepath.Join("chaos", "results", "soak", time.Now().UTC().Format("20060102T150405Z"))
	}
	res, err := chaos.Soak(ctx, cfg, chaos.SoakOptions{Every: every, Out: out})
	if err != nil {
		fmt.Fprintln(os.Stderr, "soak:", err)
		return 2
	}
	fmt.Printf("\n%s\nresults in %s\n", res.Table(chaos.SoakOptions{Every: every}), out)
	if res.Failed() {
		return 1
	}
	return 0
}
