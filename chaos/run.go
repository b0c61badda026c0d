// Package chaos is vigil's nemesis harness: a real cluster (three etcd
// processes, the machine's Postgres, agentsim with about a thousand hosts
// and sandbox churn, three to five `vigil run` processes each behind fault
// proxies of its own), a seeded mix of faults with bad control-plane input
// beside them, a history the system writes itself (vigil_journal with its
// commit order, etcd's record of claims, the agents' record of
// DestroySandbox calls), and a checker that fails the run on any stale
// write, double-acted host, lost transition, mishandled stuck destroy,
// volume not detached as rule 11 says, agent disagreement, lost, duplicated
// or misshapen event, mirror message missing or doubled, or a run whose
// fences never bit. `make chaos` runs it (cmd/chaos); TestSmoke runs two
// minutes of it in `make test`.
package chaos

import (
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/vigil-sh/vigil/election"
	"github.com/vigil-sh/vigil/internal/redistest"
	"github.com/vigil-sh/vigil/internal/vigiltest"
)

// Config is one run.
type Config struct {
	Seed     int64         // picks the faults, their targets and timings; 0: from the clock
	Duration time.Duration // of the fault phase; the quiet period follows
	// Quiet is the fault-free end of the run before the final checks;
	// default: long enough for every grace period to pass twice.
	Quiet time.Duration

	Replicas    int // at the start and the floor of scale-down, default 3
	MaxReplicas int // ceiling of scale-up, default 5
	Hosts       int // agentsim hosts, default 1000
	Shards      int // default 64

	LeaseTTL         time.Duration // default 3s
	Interval         time.Duration // default 2s
	UnreachableAfter time.Duration // default 5s
	TransientGrace   time.Duration // default 10s
	SnapshotGrace    time.Duration // default 20s
	ChurnPerSecond   float64       // default 20
	// HeartbeatInterval is agentsim's, default 1s.
	HeartbeatInterval time.Duration
	// FaultGap is the quiet time after each fault settles; default a
	// seeded fraction of the interval (the soak spaces its faults out).
	FaultGap time.Duration
	// FailoverCutOff makes every failover's old owner the cut-off one
	// (keys deleted while it believes in its lease) rather than, half the
	// time, a paused one, whose own lease deadline already stops it.
	FailoverCutOff bool
	// JournalRetention is given to every replica (--journal-retention);
	// 0: vigil's default.
	JournalRetention time.Duration

	// Kinds restricts the faults to these kinds (see nemeses); empty: all
	// the kinds this machine supports.
	Kinds []string
	// PrivatePostgres runs the database on a Postgres server of the run's
	// own (initdb from the machine's installation) instead of the machine's
	// shared one, and enables the postgres-restart fault, which restarts it.
	// The smoke run leaves it off: other tests share the machine's server.
	PrivatePostgres bool
	// BuildTags build vigil with these tags: chaos_nofence is the broken
	// build whose fence check never sees another replica's claim.
	BuildTags []string
	// RedisURL is the Redis the events checks use when vigil has events
	// (SPEC §6); default the tests' Redis (VIGIL_TEST_REDIS_ADDR).
	RedisURL string
	// Dir keeps binaries, logs and the history; default a temporary
	// directory, removed after a passing run.
	Dir string
	// Out receives progress and the report; default os.Stdout.
	Out io.Writer
}

func (c *Config) defaults() {
	if c.Seed == 0 {
		c.Seed = time.Now().UnixNano() % 1_000_000
	}
	if c.Duration == 0 {
		c.Duration = 10 * time.Minute
	}
	if c.Replicas == 0 {
		c.Replicas = 3
	}
	if c.MaxReplicas == 0 {
		c.MaxReplicas = 5
	}
	if c.Hosts == 0 {
		c.Hosts = 1000
	}
	if c.Shards == 0 {
		c.Shards = 64
	}
	if c.LeaseTTL == 0 {
		c.LeaseTTL = 3 * time.Second
	}
	if c.Interval == 0 {
		c.Interval = 2 * time.Second
	}
	if c.UnreachableAfter == 0 {
		c.UnreachableAfter = 5 * time.Second
	}
	if c.TransientGrace == 0 {
		c.TransientGrace = 10 * time.Second
	}
	if c.SnapshotGrace == 0 {
		c.SnapshotGrace = 20 * time.Second
	}
	if c.ChurnPerSecond == 0 {
		c.ChurnPerSecond = 20
	}
	if c.HeartbeatInterval == 0 {
		c.HeartbeatInterval = time.Second
	}
	if c.Quiet == 0 {
		c.Quiet = max(c.SnapshotGrace, c.TransientGrace, c.UnreachableAfter) + 4*c.Interval + c.LeaseTTL
	}
	if c.RedisURL == "" {
		c.RedisURL = redistest.URL()
	}
	if c.Out == nil {
		c.Out = os.Stdout
	}
}

// env is a running cluster and everything the run records about it.
type env struct {
	cfg     Config
	dir     string
	start   time.Time
	out     io.Writer
	outMu   sync.Mutex
	rng     *rand.Rand // the nemeses' choices; only the scheduler goroutine draws
	cluster string
	layout  election.Layout

	vigilBin string
	etcdBin  string
	etcd     *etcdCluster
	dbURL    string
	dropDB   func()
	pg       *pgHA          // nil: the machine's server
	losses   []*lostCommits // what each failover lost, in order (guarded by mu)
	db       *pgxpool.Pool  // the harness's own, direct
	rec      *vigiltest.Recorder
	work     *workload
	events   *eventsCheck // nil when vigil has no events yet
	leaders  *leaderLog

	quietFrom time.Time // the quiet period began

	mu      sync.Mutex
	gen     int
	members []*member // every replica ever started, in start order
	faults  []*fault
	notes   []string // harness-side problems worth reporting
}

func (e *env) logf(format string, args ...any) {
	e.outMu.Lock()
	defer e.outMu.Unlock()
	fmt.Fprintf(e.out, "[%7.1fs] %s\n", time.Since(e.start).Seconds(), fmt.Sprintf(format, args...))
}

func (e *env) note(format string, args ...any) {
	s := fmt.Sprintf(format, args...)
	e.mu.Lock()
	e.notes = append(e.notes, s)
	e.mu.Unlock()
	e.logf("note: %s", s)
}

// moduleRoot is the directory of vigil's go.mod.
func moduleRoot() (string, error) {
	out, err := exec.Command("go", "list", "-m", "-f", "{{.Dir}}", "github.com/vigil-sh/vigil").Output()
	if err != nil {
		return "", fmt.Errorf("find the module root: %w", err)
	}
	return strings.TrimSpace(string(out)), nil
}

// Run starts the cluster, injects faults for cfg.Duration, lets it heal for
// cfg.Quiet, checks the history and returns the report. The error is for
// runs that could not be carried out (the cluster would not start); a run
// that found violations returns a Report whose Failed is true.
func Run(ctx context.Context, cfg Config) (*Report, error) {
	e, err := newEnv(cfg)
	if err != nil {
		return nil, err
	}
	cfg = e.cfg
	e.logf("chaos run: seed %d, faults for %s then %s quiet, %d hosts, %d shards, lease TTL %s, replicas %d..%d, build tags %v, files in %s",
		cfg.Seed, cfg.Duration, cfg.Quiet, cfg.Hosts, cfg.Shards, cfg.LeaseTTL, cfg.Replicas, cfg.MaxReplicas, cfg.BuildTags, e.dir)
	defer e.teardown()
	if err := e.setup(ctx); err != nil {
		return nil, err
	}
	rep, err := e.run(ctx)
	if err != nil {
		return nil, err
	}
	if !rep.Failed && cfg.Dir == "" {
		defer os.RemoveAll(e.dir)
	} else {
		rep.Dir = e.dir
	}
	return rep, nil
}

// newEnv fills cfg's defaults and makes the run's directory.
func newEnv(cfg Config) (*env, error) {
	cfg.defaults()
	e := &env{cfg: cfg, start: time.Now(), out: cfg.Out, rng: rand.New(rand.NewPCG(uint64(cfg.Seed), 0x6368616f73))}
	e.cluster = fmt.Sprintf("chaos-%d-%d", cfg.Seed, time.Now().Unix()%100000)
	e.layout = election.NewLayout("/vigil", e.cluster)
	e.dir = cfg.Dir
	if e.dir == "" {
		d, err := os.MkdirTemp("", "vigil-chaos-")
		if err != nil {
			return nil, err
		}
		e.dir = d
	}
	if err := os.MkdirAll(filepath.Join(e.dir, "logs"), 0o755); err != nil {
		return nil, err
	}
	return e, nil
}

func (e *env) setup(ctx context.Context) error {
	root, err := moduleRoot()
	if err != nil {
		return err
	}
	e.vigilBin = filepath.Join(e.dir, "vigil")
	e.etcdBin = filepath.Join(e.dir, "etcd")
	if err := vigiltest.Build(ctx, root, "./cmd/vigil", e.vigilBin, e.cfg.BuildTags...); err != nil {
		return err
	}
	if err := vigiltest.Build(ctx, root, "./internal/embedetcd/cmd/etcd", e.etcdBin); err != nil {
		return err
	}
	e.logf("built vigil and etcd")
	if e.etcd, err = startEtcd(ctx, e.etcdBin, e.dir, e.cluster, 3); err != nil {
		return fmt.Errorf("etcd: %w", err)
	}
	e.leaders = newLeaderLog(e.etcd)
	e.logf("etcd: 3 members up")
	admin := adminURL()
	if e.cfg.PrivatePostgres {
		if e.pg, err = startPGHA(ctx, filepath.Join(e.dir, "logs")); err != nil {
			return fmt.Errorf("the run's own Postgres: %w", err)
		}
		admin = e.pg.adminURL()
		e.logf("postgres: a primary of the run's own on port %d with a streaming standby on port %d, reached at %s (postgres-restart and failovers on)",
			e.pg.primary.port, e.pg.standby.port, e.pg.vip.Addr())
	}
	if e.dbURL, e.dropDB, err = createDatabase(ctx, admin); err != nil {
		return fmt.Errorf("postgres: %w", err)
	}
	if e.db, err = pgxpool.New(ctx, e.dbURL); err != nil {
		return err
	}
	if e.events, err = detectEvents(ctx, e); err != nil {
		return err
	}
	if e.rec, err = vigiltest.NewRecorder(ctx, e.etcd.cli, e.layout, e.cfg.Shards); err != nil {
		return err
	}
	if e.work, err = startWorkload(ctx, e); err != nil {
		return fmt.Errorf("agentsim: %w", err)
	}
	e.logf("agentsim: %d hosts registered, churn %.0f/s", e.cfg.Hosts, e.cfg.ChurnPerSecond)
	for i := 0; i < e.cfg.Replicas; i++ {
		if _, err := e.startMember(ctx); err != nil {
			return err
		}
	}
	if _, err := e.waitSettled(ctx, 30*time.Second); err != nil {
		return err
	}
	e.logf("cluster settled: %s", e.rec.State().Summary())
	return nil
}

// waitSettled waits until the live members own every shard as assigned,
// balanced.
func (e *env) waitSettled(ctx context.Context, timeout time.Duration) (time.Time, error) {
	return pollAt(ctx, timeout, "the cluster to settle", e.rec.Changed, func() (bool, string) {
		if err := e.rec.Err(); err != nil {
			return false, err.Error()
		}
		return e.rec.State().Settled(e.cfg.Shards, memberIDs(e.live()))
	})
}

func (e *env) teardown() {
	if e.work != nil {
		e.work.stop()
	}
	e.mu.Lock()
	ms := append([]*member(nil), e.members...)
	e.mu.Unlock()
	for _, m := range ms {
		e.stopMember(m)
	}
	if e.events != nil {
		// Once no replica can append to it any more.
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		e.events.drop(ctx)
		cancel()
		if e.events.mirror != nil {
			e.events.mirror.close()
		}
	}
	if e.rec != nil {
		e.rec.Close()
	}
	if e.leaders != nil {
		e.leaders.stop()
	}
	if e.etcd != nil {
		e.etcd.stop()
	}
	if e.db != nil {
		e.db.Close()
	}
	if e.dropDB != nil {
		e.dropDB()
	}
	if e.pg != nil {
		e.pg.stop()
	}
}

// run is the fault phase, the quiet period and the checks.
func (e *env) run(ctx context.Context) (*Report, error) {
	scrapeCtx, stopScrape := context.WithCancel(ctx)
	scraped := make(chan struct{})
	go func() { defer close(scraped); e.scrapeLoop(scrapeCtx) }()
	defer func() { stopScrape(); <-scraped }()
	go e.leaders.run(scrapeCtx)
	if e.events != nil {
		go e.events.run(scrapeCtx)
	}

	faultsEnd := time.Now().Add(e.cfg.Duration)
	e.work.startBadInput()
	if err := e.nemeses(ctx, faultsEnd); err != nil && !errors.Is(err, context.Canceled) {
		return nil, err
	}
	if ctx.Err() != nil {
		return nil, ctx.Err()
	}
	quietAt := time.Now()
	e.logf("fault phase over; healing everything and going quiet for %s", e.cfg.Quiet)
	if err := e.quiet(ctx); err != nil {
		return nil, err
	}
	e.logf("quiet period over; checking the history")
	t0 := time.Now()
	h, err := e.history(ctx, quietAt)
	if err != nil {
		return nil, err
	}
	rep := e.check(h)
	rep.CheckTime = time.Since(t0)
	rep.print(e.out)
	return rep, nil
}

// scrapeLoop scrapes every live replica's counters every second.
func (e *env) scrapeLoop(ctx context.Context) {
	t := time.NewTicker(time.Second)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		for _, m := range e.live() {
			m.scrape()
		}
	}
}

// BrokenBuild is the configuration of the run that proves the checker
// bites: vigil built with -tags chaos_nofence (each replica's fence check
// sees only its own claims), under the faults that leave a deposed owner
// writing, for long enough to be caught.
func BrokenBuild(cfg Config) Config {
	cfg.BuildTags = append(append([]string(nil), cfg.BuildTags...), "chaos_nofence")
	cfg.Duration = 45 * time.Second
	cfg.Kinds = []string{"delete-owner-keys", "pause", "kill"}
	return cfg
}

// FailoverBrokenBuild is the configuration of the run that proves the
// failover nemesis bites: vigil built with -tags chaos_noidentity (a fenced
// transaction does not notice that the database is not the one its fence
// was raised on) under asynchronous failovers that lose successors' raises.
// Every failover cuts its old owner off believing in its lease (a paused
// owner's own lease deadline stops it on waking, whatever the database
// says), with a lease of 8 s so that the failover fits inside it on a
// loaded machine.
func FailoverBrokenBuild(cfg Config) Config {
	cfg.BuildTags = append(append([]string(nil), cfg.BuildTags...), "chaos_noidentity")
	cfg.Duration = time.Minute
	cfg.Kinds = []string{"failover-async"}
	cfg.PrivatePostgres, cfg.FailoverCutOff, cfg.LeaseTTL = true, true, 8*time.Second
	return cfg
}

// FailoversOn reports whether cfg's runs include Postgres failovers.
func FailoversOn(cfg Config) bool {
	if !cfg.PrivatePostgres {
		return false
	}
	if len(cfg.Kinds) == 0 {
		return true
	}
	for _, k := range cfg.Kinds {
		if strings.HasPrefix(k, "failover-") {
			return true
		}
	}
	return false
}

// Caught reports whether a run of the broken build was caught writing
// stale: the verdict the broken build must get.
func (r *Report) Caught() bool {
	return r.Failed && (r.Count(vStale) > 0 || r.Count(vDouble) > 0 || r.Count(vCutOff) > 0)
}

// Summary is one line: the verdict and the counts that decide it.
func (r *Report) Summary() string {
	var parts []string
	for _, c := range categories {
		if n := r.Count(c); n > 0 {
			parts = append(parts, fmt.Sprintf("%s %d", c, n))
		}
	}
	if len(parts) == 0 {
		return "PASS"
	}
	return "FAIL: " + strings.Join(parts, ", ")
}
