package main

// The harness of the end-to-end tests in cluster_test.go: the vigil binary
// built once, replicas as real processes, an etcd watch that records every
// ownership change with its time and revision, and checks of the Postgres
// side (fences, audit rows) against that record.

import (
	"context"
	"fmt"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5/pgxpool"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/vigil-sh/vigil/agentsim"
	"github.com/vigil-sh/vigil/election"
	"github.com/vigil-sh/vigil/internal/etcdtest"
	"github.com/vigil-sh/vigil/internal/pgtest"
	"github.com/vigil-sh/vigil/internal/testwait"
	"github.com/vigil-sh/vigil/internal/vigiltest"
)

// testTTL is every replica's lease TTL.
const testTTL = 2 * time.Second

var (
	binDir  string
	binOnce sync.Once
	binPath string
	binErr  error

	hookOnce sync.Once
	hookPath string
	hookErr  error
)

// hookedBinary is vigil built with the test hooks (-tags vigil_testhooks:
// monitor/testhooks.go), inert unless their environment variables are set.
func hookedBinary(t testing.TB) string {
	t.Helper()
	hookOnce.Do(func() {
		p := filepath.Join(binDir, "vigil-testhooks")
		if hookErr = vigiltest.Build(context.Background(), ".", ".", p, "vigil_testhooks"); hookErr == nil {
			hookPath = p
		}
	})
	if hookErr != nil {
		t.Fatal(hookErr)
	}
	return hookPath
}

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "vigil-e2e-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	binDir = dir
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

// vigilBinary builds the vigil binary once per test binary; VIGIL_E2E_BIN
// names a prebuilt one instead.
func vigilBinary(t testing.TB) string {
	t.Helper()
	binOnce.Do(func() {
		if p := os.Getenv("VIGIL_E2E_BIN"); p != "" {
			binPath = p
			return
		}
		p := filepath.Join(binDir, "vigil")
		out, err := exec.Command("go", "build", "-tags", "dev", "-o", p, ".").CombinedOutput()
		if err != nil {
			binErr = fmt.Errorf("go build: %v\n%s", err, out)
			return
		}
		binPath = p
	})
	if binErr != nil {
		t.Fatal(binErr)
	}
	return binPath
}

// ---------------------------------------------------------------------------
// harness

type harness struct {
	t        *testing.T
	bin      string
	etcd     *etcdtest.Cluster
	endpoint string // host:port of the etcd member
	dbURL    string
	db       *pgxpool.Pool
	cluster  string
	layout   election.Layout
	shards   int
	rec      *vigiltest.Recorder

	mu       sync.Mutex
	replicas map[string]*replica
	order    []*replica
}

// newHarness starts an etcd member, a database and the ownership recorder
// for one test. Replicas are started with spawn/start.
func newHarness(t *testing.T, shards int) *harness {
	t.Helper()
	if testing.Short() {
		t.Skip("end-to-end test with real processes; skipped in -short mode")
	}
	bin := vigilBinary(t)
	e := etcdtest.New(t)
	u, err := url.Parse(e.Endpoints()[0])
	if err != nil {
		t.Fatal(err)
	}
	dbURL := pgtest.New(t)
	db, err := pgxpool.New(context.Background(), dbURL)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(db.Close)
	name := strings.ToLower(strings.NewReplacer("/", "-", "_", "-").Replace(t.Name())) + "-" + uuid.NewString()[:8]
	h := &harness{
		t: t, bin: bin, etcd: e, endpoint: u.Host, dbURL: dbURL, db: db,
		cluster: name, layout: election.NewLayout("/vigil", name), shards: shards,
		replicas: map[string]*replica{},
	}
	h.rec = newRecorder(t, e.Client(t), h.layout, shards)
	t.Cleanup(h.cleanup)
	return h
}

func (h *harness) cleanup() {
	h.mu.Lock()
	rs := append([]*replica(nil), h.order...)
	h.mu.Unlock()
	for _, r := range rs {
		if !r.Exited() {
			_ = r.Cmd.Process.Kill()
		}
	}
	for _, r := range rs {
		select {
		case <-r.Done():
		case <-time.After(10 * time.Second):
			h.t.Logf("replica %s (pid %d) did not exit after SIGKILL", r.ID, r.Pid())
		}
	}
	if dir := os.Getenv("VIGIL_E2E_LOGDIR"); dir != "" {
		// Keep every replica's full log for inspection.
		d := filepath.Join(dir, strings.ReplaceAll(h.t.Name(), "/", "_"))
		if err := os.MkdirAll(d, 0o755); err == nil {
			for _, r := range rs {
				_ = os.WriteFile(filepath.Join(d, r.ID+".log"), []byte(r.Log.String()), 0o644)
			}
			_ = os.WriteFile(filepath.Join(d, "etcd-events.txt"), []byte(h.rec.Dump(1<<30)), 0o644)
		}
	}
	if h.t.Failed() {
		for _, r := range rs {
			h.t.Logf("---- replica %s (pid %d, exit %s), last log lines:\n%s", r.ID, r.Pid(), r.ExitString(), r.Log.Tail(120))
		}
		h.t.Logf("---- last ownership events:\n%s", h.rec.Dump(60))
	}
}

// replica is one `vigil run` process (internal/vigiltest).
type replica = vigiltest.Replica

// logBuffer collects a process's output.
type logBuffer = vigiltest.LogBuffer

type spawnOpts struct {
	etcdEndpoint string   // default: the member itself
	bin          string   // default: the harness's binary
	extra        []string // more flags
	env          []string // more environment (on top of cleanEnv)
}

// spawn starts a replica without waiting for it.
func (h *harness) spawn(id string, o spawnOpts) *replica {
	h.t.Helper()
	ep := o.etcdEndpoint
	if ep == "" {
		ep = h.endpoint
	}
	admin := freePort(h.t)
	args := []string{"run",
		"--etcd-endpoints", ep,
		"--database-url", h.dbURL,
		"--cluster", h.cluster,
		"--replica-id", id,
		"--shards", strconv.Itoa(h.shards),
		"--lease-ttl", testTTL.String(),
		"--interval", "2s",
		"--http-addr", admin,
		"--agent-timeout", "1s",
		"--db-max-conns", "4",
		"--log-format", "json",
	}
	args = append(args, o.extra...)
	bin := h.bin
	if o.bin != "" {
		bin = o.bin
	}
	var env []string
	if len(o.env) > 0 {
		env = append(cleanEnv(), o.env...)
	}
	return h.startProcessWith(id, admin, bin, args, env)
}

// startProcess starts the binary with args as replica id and registers it.
func (h *harness) startProcess(id, admin string, args []string) *replica {
	h.t.Helper()
	return h.startProcessWith(id, admin, h.bin, args, nil)
}

func (h *harness) startProcessWith(id, admin, bin string, args, env []string) *replica {
	h.t.Helper()
	p, err := vigiltest.Start(id, bin, args, env)
	if err != nil {
		h.t.Fatalf("start replica %s: %v", id, err)
	}
	r := &replica{Process: p, Admin: admin}
	h.mu.Lock()
	h.replicas[id] = r
	h.order = append(h.order, r)
	h.mu.Unlock()
	return r
}

// start spawns a replica and waits for its admin listener.
func (h *harness) start(id string, o spawnOpts) *replica {
	h.t.Helper()
	r := h.spawn(id, o)
	h.waitHealthy(r)
	return r
}

func (h *harness) replica(id string) *replica {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.replicas[id]
}

func (h *harness) waitHealthy(r *replica) {
	h.t.Helper()
	h.poll(15*time.Second, "admin listener of "+r.ID, func() (bool, string) {
		if r.Exited() {
			h.t.Fatalf("replica %s exited during start-up (%s):\n%s", r.ID, r.ExitString(), r.Log.Tail(40))
		}
		code, body, err := r.Get("/healthz")
		if err != nil {
			return false, err.Error()
		}
		return code == 200, fmt.Sprintf("%d %s", code, body)
	})
}

func freePort(t testing.TB) string {
	t.Helper()
	a, err := vigiltest.FreePort()
	if err != nil {
		t.Fatal(err)
	}
	return a
}

// cleanEnv is the test's environment without VIGIL_* settings, so flags are
// the only configuration of a replica.
func cleanEnv() []string { return vigiltest.CleanEnv() }

// kill sends SIGKILL and waits for the process to be gone.
func kill(t testing.TB, r *replica) {
	t.Helper()
	if err := r.Kill(10 * time.Second); err != nil {
		t.Fatal(err)
	}
}

var httpClient = &http.Client{Timeout: 2 * time.Second}

// poll evaluates cond whenever the recorded etcd state changes, and at least
// every 25ms, until it holds; it returns the time it held. At timeout the test
// fails with what and cond's last detail.
func (h *harness) poll(timeout time.Duration, what string, cond func() (bool, string)) time.Time {
	h.t.Helper()
	var at time.Time
	testwait.Until(h.t, timeout, 25*time.Millisecond, what, func() (bool, string) {
		if err := h.rec.Err(); err != nil {
			h.t.Fatalf("etcd watch failed: %v", err)
		}
		ok, detail := cond()
		at = time.Now()
		return ok, detail
	}, h.rec.Changed)
	return at
}

// settled reports whether the cluster's members are exactly ids, every shard
// is owned by the replica the leader assigned it to, and the assignment is
// balanced exactly.
func (h *harness) settled(ids []string) (bool, string) {
	return h.rec.State().Settled(h.shards, ids)
}

// waitSettled waits for settled(ids) and returns when it first held.
func (h *harness) waitSettled(timeout time.Duration, ids ...string) time.Time {
	h.t.Helper()
	return h.poll(timeout, fmt.Sprintf("cluster of %v settled", ids), func() (bool, string) { return h.settled(ids) })
}

// fencesMatch reports whether every shard's fence in Postgres holds its etcd
// owner key's create revision and owner.
func (h *harness) fencesMatch() (bool, string) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	rows, err := h.db.Query(ctx, `select shard, token, owner from vigil_shard_fences`)
	if err != nil {
		return false, err.Error()
	}
	type fence struct {
		token int64
		owner string
	}
	fences := map[int]fence{}
	for rows.Next() {
		var s int
		var f fence
		if err := rows.Scan(&s, &f.token, &f.owner); err != nil {
			rows.Close()
			return false, err.Error()
		}
		fences[s] = f
	}
	rows.Close()
	if err := rows.Err(); err != nil {
		return false, err.Error()
	}
	st := h.rec.State()
	for s := 0; s < h.shards; s++ {
		o, f := st.Owners[s], fences[s]
		if o.Value == "" {
			return false, fmt.Sprintf("shard %d unowned in etcd", s)
		}
		if f.token != o.CreateRev || f.owner != o.Value {
			return false, fmt.Sprintf("shard %d: fence (%d, %s), etcd owner (%d, %s)", s, f.token, f.owner, o.CreateRev, o.Value)
		}
	}
	return true, ""
}

// leader is the replica whose election key has the lowest create revision.
func (h *harness) leader() string {
	return h.rec.State().Leader
}

func keys[V any](m map[string]V) []string { return vigiltest.SortedKeys(m) }

// ---------------------------------------------------------------------------
// ownership record

// shardEvent is one change of a shard's owner key (internal/vigiltest).
type shardEvent = vigiltest.ShardEvent

// clusterSnapshot is a copy of the recorded etcd state.
type clusterSnapshot = vigiltest.Snapshot

func newRecorder(t testing.TB, cli *clientv3.Client, layout election.Layout, shards int) *vigiltest.Recorder {
	t.Helper()
	r, err := vigiltest.NewRecorder(context.Background(), cli, layout, shards)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(r.Close)
	return r
}

// checkHistory fails the test for any recorded key-level violation: an owner
// key written over another, or a shard's events not alternating
// claim/release.
func (h *harness) checkHistory() {
	h.t.Helper()
	for _, v := range h.rec.Violations() {
		h.t.Errorf("etcd: %s", v)
	}
	for s := 0; s < h.shards; s++ {
		hist := h.rec.History(s, 0)
		for i := 1; i < len(hist); i++ {
			if hist[i].Put == hist[i-1].Put {
				h.t.Errorf("shard %d: two %v events in a row at revisions %d and %d", s, hist[i].Put, hist[i-1].Rev, hist[i].Rev)
			}
		}
	}
}

// checkNoAnomalies fails the test if any replica distrusted a key under the
// cluster prefix. Nothing but the replicas writes there in these tests, so
// every such report is the cluster distrusting its own keys.
func (h *harness) checkNoAnomalies() {
	h.t.Helper()
	h.mu.Lock()
	rs := append([]*replica(nil), h.order...)
	h.mu.Unlock()
	for _, r := range rs {
		var hits []string
		for _, line := range strings.Split(r.Log.String(), "\n") {
			if strings.Contains(line, `"@message":"removing untrusted key"`) || strings.Contains(line, `"@message":"unexpected key under the cluster prefix"`) {
				hits = append(hits, line)
			}
		}
		if len(hits) > 0 {
			h.t.Errorf("replica %s reported %d etcd anomalies in a cluster nobody else writes to, e.g.\n%s", r.ID, len(hits), strings.Join(hits[:min(3, len(hits))], "\n"))
		}
	}
}

// finalChecks runs the checks every test ends with.
func (h *harness) finalChecks() {
	h.t.Helper()
	h.checkHistory()
	h.checkNoAnomalies()
}

// ---------------------------------------------------------------------------
// Postgres: the journal as the record of every committed write. Every
// fenced transaction that changes anything writes one vigil_journal row per
// change (silent transitions included) naming shard, token and replica; a
// change without one is impossible (store.Apply and store.Passive
// write both in one statement), so the journal is complete where audit rows
// are not.

type journalWrite struct {
	shard   int
	token   int64
	replica string
	at      time.Time // written_at: the writing transaction's start
}

func (h *harness) journalWrites() []journalWrite {
	h.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	rows, err := h.db.Query(ctx, `select shard, token, replica, written_at from vigil_journal order by seq`)
	if err != nil {
		h.t.Fatalf("read the journal: %v", err)
	}
	defer rows.Close()
	var out []journalWrite
	for rows.Next() {
		var w journalWrite
		if err := rows.Scan(&w.shard, &w.token, &w.replica, &w.at); err != nil {
			h.t.Fatalf("read the journal: %v", err)
		}
		out = append(out, w)
	}
	if err := rows.Err(); err != nil {
		h.t.Fatalf("read the journal: %v", err)
	}
	// Every audit row vigil wrote has its journal row: same writer, same
	// transaction.
	var orphans int
	if err := h.db.QueryRow(ctx, `
		select count(*) from audit_logs a
		 where a.actor_type = 'system' and not exists (
			select 1 from vigil_journal j
			 where j.shard = (a.metadata->>'shard')::int and j.token = (a.metadata->>'fence')::bigint
			   and j.replica = a.metadata->>'replica' and j.written_at = a.created_at)`).Scan(&orphans); err != nil {
		h.t.Fatalf("match audit rows to the journal: %v", err)
	}
	if orphans > 0 {
		h.t.Errorf("%d audit rows without a journal row from the same transaction", orphans)
	}
	return out
}

// writeCount counts the changes a replica committed.
func (h *harness) writeCount(replica string) (int, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	var n int
	err := h.db.QueryRow(ctx, `select count(*) from vigil_journal where replica = $1`, replica).Scan(&n)
	return n, err
}

// checkWrites holds every committed write (journal row) against the etcd
// record: it was made under a token that really was an owner key of its shard
// held by the writing replica, its transaction began before that key was
// deleted, and per shard the tokens of writes never go down over time (a
// write under an older token after one under a newer token is two owners
// acting at once). It returns the number of writes checked.
func (h *harness) checkWrites() int {
	h.t.Helper()
	writes := h.journalWrites()
	maxTok := map[int]journalWrite{}
	bad := 0
	report := func(format string, args ...any) {
		bad++
		if bad <= 20 {
			h.t.Errorf(format, args...)
		}
	}
	for _, w := range writes {
		owner, claimed, released, found := h.rec.Tenure(w.shard, w.token)
		switch {
		case !found:
			report("write by %s on shard %d under token %d, which was never an owner key of the shard", w.replica, w.shard, w.token)
		case owner != w.replica:
			report("write by %s on shard %d under token %d, which %s held", w.replica, w.shard, w.token, owner)
		case !released.IsZero() && !w.at.Before(released):
			report("write by %s on shard %d under token %d began %v after its owner key was deleted (claimed %s, released %s, written %s)",
				w.replica, w.shard, w.token, w.at.Sub(released), claimed.Format("15:04:05.000"), released.Format("15:04:05.000"), w.at.Format("15:04:05.000000"))
		}
		if m, ok := maxTok[w.shard]; ok && w.token < m.token && w.at.After(m.at) {
			report("shard %d: write by %s under token %d at %s after a write by %s under newer token %d at %s",
				w.shard, w.replica, w.token, w.at.Format("15:04:05.000000"), m.replica, m.token, m.at.Format("15:04:05.000000"))
		}
		if m, ok := maxTok[w.shard]; !ok || w.token > m.token {
			maxTok[w.shard] = w
		}
	}
	if bad > 20 {
		h.t.Errorf("... %d write violations in all", bad)
	}
	return len(writes)
}

// ---------------------------------------------------------------------------
// workload: simulated agents plus a stream of sandbox rows the agents do not
// have, so every owner keeps writing (running -> stopped, reason orphaned,
// with an audit row naming replica, shard and fence).

type workload struct {
	sim      *agentsim.Sim
	hosts    []uuid.UUID
	team     uuid.UUID
	inserted atomic.Int64
	stopIns  func() // stops the inserts (the agents go on)
}

// stopInserts stops the stream of new rows and waits for the last insert.
func (w *workload) stopInserts() { w.stopIns() }

func startWorkload(t *testing.T, h *harness, hosts int) *workload {
	t.Helper()
	sim, err := agentsim.New(agentsim.Config{DatabaseURL: h.dbURL, Hosts: hosts, HeartbeatInterval: time.Second, Teams: 2})
	if err != nil {
		t.Fatal(err)
	}
	w := &workload{sim: sim}
	ctx, cancel := context.WithCancel(context.Background())
	simDone := make(chan error, 1)
	go func() { simDone <- sim.Run(ctx) }()
	select {
	case <-sim.Ready():
	case err := <-simDone:
		cancel()
		t.Fatalf("agentsim: %v", err)
	case <-time.After(30 * time.Second):
		cancel()
		t.Fatal("agentsim not ready after 30s")
	}
	ids, team := sim.HostIDs(), sim.Teams()[0]
	w.hosts, w.team = ids, team
	insDone := make(chan struct{})
	insCtx, insCancel := context.WithCancel(ctx)
	w.stopIns = func() { insCancel(); <-insDone }
	go func() {
		defer close(insDone)
		tick := time.NewTicker(50 * time.Millisecond)
		defer tick.Stop()
		for i := 0; ; i++ {
			select {
			case <-insCtx.Done():
				return
			case <-tick.C:
			}
			_, err := h.db.Exec(insCtx, `
				insert into sandboxes (id, team_id, host_id, status, last_updated, created_at)
				values ($1, $2, $3, 'running', now(), now())`, uuid.New(), team, ids[i%len(ids)])
			if err == nil {
				w.inserted.Add(1)
			}
		}
	}()
	t.Cleanup(func() {
		cancel()
		<-insDone
		<-simDone
	})
	return w
}

// ---------------------------------------------------------------------------
// small helpers

func durations(ds []time.Duration) (p50, max time.Duration) {
	if len(ds) == 0 {
		return 0, 0
	}
	s := append([]time.Duration(nil), ds...)
	sort.Slice(s, func(i, j int) bool { return s[i] < s[j] })
	return s[(len(s)-1)/2], s[len(s)-1]
}

func ms(d time.Duration) string { return fmt.Sprintf("%.0fms", float64(d)/float64(time.Millisecond)) }
