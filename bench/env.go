package main

// The shared parts of a run: the database, embedded etcd, the throwaway CA,
// what the binaries support, and the machine. setUp builds them; close tears
// everything down (children first), whatever state set-up reached.

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"syscall"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.etcd.io/etcd/server/v3/embed"
	"go.etcd.io/etcd/server/v3/etcdserver/api/v3client"
	"go.uber.org/zap"

	"github.com/vigil-sh/vigil/internal/devcerts"
	"github.com/vigil-sh/vigil/internal/embedetcd"
)

// etcdPrefix is the replicas' --etcd-prefix (vigil's default); the key
// layout under it is SPEC §3.1.
const etcdPrefix = "/vigil"

type env struct {
	opts  options
	log   *progress
	tmp   string // etcd data, certificates, process logs
	procs *procTable
	caps  capabilities
	mach  machine

	vigilBin, agentsimBin string

	admin  *pgxpool.Pool // the server's maintenance database: create, drop, pg_stat_database
	db     *pgxpool.Pool // the benchmark's database
	dbName string
	dbURL  string

	etcd         *embed.Etcd
	etcdEndpoint string           // host:port the replicas dial
	etcdCli      *clientv3.Client // in-process: its requests bypass the gRPC server's counters

	certs  devcerts.Files
	failed bool // keep tmp for inspection
}

func setUp(ctx context.Context, o options, log *progress) (*env, error) {
	e := &env{opts: o, log: log}
	var err error
	if e.tmp, err = os.MkdirTemp("", "vigil-bench-"); err != nil {
		return e, err
	}
	e.procs = &procTable{dir: filepath.Join(e.tmp, "logs")}
	if err := os.MkdirAll(e.procs.dir, 0o755); err != nil {
		return e, err
	}
	if e.vigilBin, err = binary(o.Bin, "vigil"); err != nil {
		return e, err
	}
	if e.agentsimBin, err = binary(o.Bin, "agentsim"); err != nil {
		return e, err
	}
	if e.caps, err = detectCapabilities(ctx, e.vigilBin, e.agentsimBin); err != nil {
		return e, err
	}
	if err := e.createDatabase(ctx); err != nil {
		return e, err
	}
	log.printf("database %s created", e.dbName)
	if err := e.migrate(ctx); err != nil {
		return e, err
	}
	e.mach = describeMachine(ctx, e.admin)
	if e.etcd, err = embedetcd.StartEmbedded(ctx, embedetcd.EmbedConfig{
		Name: "vigil-bench", Dir: filepath.Join(e.tmp, "etcd"), Logger: zap.NewNop(),
	}); err != nil {
		return e, fmt.Errorf("embedded etcd: %w", err)
	}
	u, err := url.Parse(embedetcd.ClientEndpoints(e.etcd)[0])
	if err != nil {
		return e, err
	}
	e.etcdEndpoint = u.Host
	e.etcdCli = v3client.New(e.etcd.Server)
	log.printf("embedded etcd at %s", e.etcdEndpoint)
	if e.certs, err = devcerts.Generate(filepath.Join(e.tmp, "certs")); err != nil {
		return e, err
	}
	return e, nil
}

func binary(dir, name string) (string, error) {
	p, err := filepath.Abs(filepath.Join(dir, name))
	if err != nil {
		return "", err
	}
	if _, err := os.Stat(p); err != nil {
		return "", fmt.Errorf("%s: %w (build it with: go build -o %s/ ./cmd/...)", name, err, dir)
	}
	return p, nil
}

func (e *env) createDatabase(ctx context.Context) error {
	admin, err := pgxpool.New(ctx, e.opts.AdminURL)
	if err != nil {
		return fmt.Errorf("postgres %s: %w", e.opts.AdminURL, err)
	}
	if err := admin.Ping(ctx); err != nil {
		admin.Close()
		return fmt.Errorf("postgres %s: %w (scripts/ensure-postgres.sh starts the local server)", e.opts.AdminURL, err)
	}
	e.admin = admin
	var b [6]byte
	_, _ = rand.Read(b[:])
	name := "vigil_bench_" + hex.EncodeToString(b[:])
	if _, err := admin.Exec(ctx, "create database "+pgx.Identifier{name}.Sanitize()); err != nil {
		return fmt.Errorf("create database: %w", err)
	}
	e.dbName = name
	u, err := url.Parse(e.opts.AdminURL)
	if err != nil {
		return err
	}
	u.Path = "/" + name
	e.dbURL = u.String()
	if e.db, err = pgxpool.New(ctx, e.dbURL); err != nil {
		return err
	}
	return nil
}

// migrate runs the binary's own migration, as an operator would.
func (e *env) migrate(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	out, err := exec.CommandContext(ctx, e.vigilBin, "migrate", "--database-url", e.dbURL, "--control-plane-tables").CombinedOutput()
	if err != nil {
		return fmt.Errorf("vigil migrate: %w\n%s", err, out)
	}
	return nil
}

// close stops every child process, then etcd, then drops the database. It
// runs on every exit path and tolerates a partial set-up.
func (e *env) close() {
	if e.procs != nil {
		e.procs.killAll()
	}
	if e.etcdCli != nil {
		_ = e.etcdCli.Close()
	}
	if e.etcd != nil {
		e.etcd.Close()
	}
	if e.db != nil {
		e.db.Close()
	}
	if e.admin != nil {
		if e.dbName != "" {
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			if _, err := e.admin.Exec(ctx, "drop database if exists "+pgx.Identifier{e.dbName}.Sanitize()+" with (force)"); err != nil {
				e.log.printf("drop database %s: %v", e.dbName, err)
			} else {
				e.log.printf("database %s dropped", e.dbName)
			}
			cancel()
		}
		e.admin.Close()
	}
	if e.tmp != "" {
		if e.failed || e.opts.KeepLogs {
			e.log.printf("process logs kept in %s", e.procs.dir)
			// The etcd data is large and of no use afterwards.
			_ = os.RemoveAll(filepath.Join(e.tmp, "etcd"))
		} else {
			_ = os.RemoveAll(e.tmp)
		}
	}
}

// capabilities records what the binaries under test support. Figures that
// depend on a missing one are n/a with that reason.
type capabilities struct {
	AgentsimLatency       bool            `json:"agentsim_latency"`
	AgentsimTLS           bool            `json:"agentsim_tls"`
	VigilAgentConcurrency bool            `json:"vigil_agent_concurrency"`
	VigilDebugPprof       bool            `json:"vigil_debug_pprof"`
	Metrics               map[string]bool `json:"vigil_metrics"`
}

// Metrics the figures read from the replicas.
const (
	mStatements    = "vigil_db_statements_total"
	mWriteTxns     = "vigil_db_write_transactions_total"
	mLastSuccess   = "vigil_shard_last_reconcile_success_timestamp_seconds"
	mLastPass      = "vigil_shard_last_pass_timestamp_seconds"
	mReconciles    = "vigil_reconciles_total"
	mTransitions   = "vigil_sandbox_transitions_total"
	mAgentErrors   = "vigil_agent_rpc_errors_total"
	mSessionLosses = "vigil_etcd_session_losses_total"
	mAcquisitions  = "vigil_shard_acquisitions_total"
	mGoroutines    = "go_goroutines"
	mOpenFDs       = "process_open_fds"
)

// detectCapabilities reads the flags from each binary's -h, and which
// metrics vigil knows from the names compiled into it: a labelled metric
// with no series yet is absent from /metrics, which must read as zero, not
// as unsupported.
func detectCapabilities(ctx context.Context, vigilBin, agentsimBin string) (capabilities, error) {
	c := capabilities{Metrics: map[string]bool{}}
	vh := helpText(ctx, vigilBin, "run", "-h")
	ah := helpText(ctx, agentsimBin, "-h")
	if !strings.Contains(vh, "-etcd-endpoints") || !strings.Contains(ah, "-sandboxes-per-host") {
		return c, fmt.Errorf("unexpected -h output of %s or %s:\n%s\n%s", vigilBin, agentsimBin, vh, ah)
	}
	c.VigilAgentConcurrency = hasFlag(vh, "agent-concurrency")
	c.VigilDebugPprof = hasFlag(vh, "debug-pprof")
	c.AgentsimLatency = hasFlag(ah, "latency")
	c.AgentsimTLS = hasFlag(ah, "tls-ca-file") && hasFlag(ah, "tls-cert-file") && hasFlag(ah, "tls-key-file")
	bin, err := os.ReadFile(vigilBin)
	if err != nil {
		return c, err
	}
	for _, m := range append([]string{mStatements, mWriteTxns, mLastSuccess, mLastPass, mReconciles, mTransitions, mAgentErrors}, peerMetrics...) {
		c.Metrics[m] = bytes.Contains(bin, []byte(m))
	}
	// The Go and process collectors are the client library's.
	c.Metrics[mGoroutines], c.Metrics[mOpenFDs] = true, true
	return c, nil
}

func helpText(ctx context.Context, bin string, args ...string) string {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	out, _ := exec.CommandContext(ctx, bin, args...).CombinedOutput() // -h exits non-zero
	return string(out)
}

// hasFlag matches "-name" or "--name" as a whole flag in help output.
func hasFlag(help, name string) bool {
	for _, f := range strings.Fields(help) {
		if strings.TrimLeft(f, "-") == name && strings.HasPrefix(f, "-") {
			return true
		}
	}
	return false
}

// machine describes where the run happened.
type machine struct {
	NProc        int    `json:"nproc"`
	CPUModel     string `json:"cpu_model"`
	MemTotalMiB  int    `json:"mem_total_mib"`
	Kernel       string `json:"kernel"`
	GoVersion    string `json:"go_version"`
	Postgres     string `json:"postgres_version"`
	OpenFileHard uint64 `json:"open_file_limit_hard"`
}

func describeMachine(ctx context.Context, admin *pgxpool.Pool) machine {
	m := machine{NProc: runtime.NumCPU(), GoVersion: runtime.Version()}
	if f, err := os.Open("/proc/cpuinfo"); err == nil {
		sc := bufio.NewScanner(f)
		for sc.Scan() {
			if k, v, ok := strings.Cut(sc.Text(), ":"); ok && strings.TrimSpace(k) == "model name" {
				m.CPUModel = strings.TrimSpace(v)
				break
			}
		}
		f.Close()
	}
	if f, err := os.Open("/proc/meminfo"); err == nil {
		sc := bufio.NewScanner(f)
		for sc.Scan() {
			var kb int
			if _, err := fmt.Sscanf(sc.Text(), "MemTotal: %d kB", &kb); err == nil {
				m.MemTotalMiB = kb / 1024
				break
			}
		}
		f.Close()
	}
	if b, err := os.ReadFile("/proc/sys/kernel/osrelease"); err == nil {
		m.Kernel = strings.TrimSpace(string(b))
	}
	var rl syscall.Rlimit
	if syscall.Getrlimit(syscall.RLIMIT_NOFILE, &rl) == nil {
		m.OpenFileHard = rl.Max
	}
	if admin != nil {
		_ = admin.QueryRow(ctx, `select version()`).Scan(&m.Postgres)
	}
	return m
}

// gitRevision is HEAD of the working tree, with "-dirty" when it has local
// changes; "" outside a git checkout.
func gitRevision(ctx context.Context) string {
	head, err := exec.CommandContext(ctx, "git", "rev-parse", "--short=12", "HEAD").Output()
	if err != nil {
		return ""
	}
	rev := strings.TrimSpace(string(head))
	if st, err := exec.CommandContext(ctx, "git", "status", "--porcelain", "--untracked-files=no").Output(); err == nil && len(bytes.TrimSpace(st)) > 0 {
		rev += "-dirty"
	}
	return rev
}

// pgStats are the benchmark database's counters in pg_stat_database. A
// backend publishes its counts at most about once a second, so deltas over
// short windows lag by up to that much at each end.
type pgStats struct {
	Commit, Rollback                              float64
	Returned, Fetched, Inserted, Updated, Deleted float64
}

func (e *env) pgStats(ctx context.Context) (pgStats, error) {
	var s pgStats
	err := e.admin.QueryRow(ctx, `
		select xact_commit, xact_rollback, tup_returned, tup_fetched, tup_inserted, tup_updated, tup_deleted
		  from pg_stat_database where datname = $1`, e.dbName).
		Scan(&s.Commit, &s.Rollback, &s.Returned, &s.Fetched, &s.Inserted, &s.Updated, &s.Deleted)
	if err != nil {
		return s, fmt.Errorf("pg_stat_database: %w", err)
	}
	return s, nil
}

func (a pgStats) sub(b pgStats) pgStats {
	return pgStats{a.Commit - b.Commit, a.Rollback - b.Rollback, a.Returned - b.Returned, a.Fetched - b.Fetched,
		a.Inserted - b.Inserted, a.Updated - b.Updated, a.Deleted - b.Deleted}
}

// flushOwnStats makes the bench's own session publish its pending
// pg_stat_database counts now (Postgres 15+), so a statement the bench ran
// just before a measurement window is not counted inside it. Older servers
// have no such function; the error is ignored.
func flushOwnStats(ctx context.Context, conn *pgxpool.Conn) {
	if _, err := conn.Exec(ctx, `select pg_stat_force_next_flush()`); err != nil {
		return
	}
	// The flush happens when the backend goes idle after that statement,
	// before it answers the next one.
	_, _ = conn.Exec(ctx, `select 1`)
}

func (a pgStats) scale(k float64) pgStats {
	return pgStats{a.Commit * k, a.Rollback * k, a.Returned * k, a.Fetched * k, a.Inserted * k, a.Updated * k, a.Deleted * k}
}

// clamp raises negative counts (estimation noise) to zero.
func (a pgStats) clamp() pgStats {
	c := func(v float64) float64 { return max(v, 0) }
	return pgStats{c(a.Commit), c(a.Rollback), c(a.Returned), c(a.Fetched), c(a.Inserted), c(a.Updated), c(a.Deleted)}
}
