package main

// The harness of the end-to-end tests in cluster_test.go: the vigil binary
// built once, replicas as real processes, an etcd watch that records every
// ownership change with its time and revision, and checks of the Postgres
// side (fences, audit rows) against that record.

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
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
	"go.etcd.io/etcd/api/v3/mvccpb"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/vigil-sh/vigil/agentsim"
	"github.com/vigil-sh/vigil/election"
	"github.com/vigil-sh/vigil/internal/etcdtest"
	"github.com/vigil-sh/vigil/internal/pgtest"
	"github.com/vigil-sh/vigil/shard"
)

// testTTL is every replica's lease TTL.
const testTTL = 2 * time.Second

var (
	binDir  string
	binOnce sync.Once
	binPath string
	binErr  error
)

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
		out, err := exec.Command("go", "build", "-o", p, ".").CombinedOutput()
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
	rec      *recorder

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
		if !r.exited() {
			_ = r.cmd.Process.Kill()
		}
	}
	for _, r := range rs {
		select {
		case <-r.done:
		case <-time.After(10 * time.Second):
			h.t.Logf("replica %s (pid %d) did not exit after SIGKILL", r.id, r.cmd.Process.Pid)
		}
	}
	if dir := os.Getenv("VIGIL_E2E_LOGDIR"); dir != "" {
		// Keep every replica's full log for inspection.
		d := filepath.Join(dir, strings.ReplaceAll(h.t.Name(), "/", "_"))
		if err := os.MkdirAll(d, 0o755); err == nil {
			for _, r := range rs {
				_ = os.WriteFile(filepath.Join(d, r.id+".log"), []byte(r.log.String()), 0o644)
			}
			_ = os.WriteFile(filepath.Join(d, "etcd-events.txt"), []byte(h.rec.dump(1<<30)), 0o644)
		}
	}
	if h.t.Failed() {
		for _, r := range rs {
			h.t.Logf("---- replica %s (pid %d, exit %s), last log lines:\n%s", r.id, r.cmd.Process.Pid, r.exitString(), r.log.tail(120))
		}
		h.t.Logf("---- last ownership events:\n%s", h.rec.dump(60))
	}
}

// replica is one `vigil run` process.
type replica struct {
	id      string
	admin   string // host:port of its admin listener
	cmd     *exec.Cmd
	log     *logBuffer
	started time.Time

	done     chan struct{} // closed when the process has exited
	state    *os.ProcessState
	exitedAt time.Time
}

type spawnOpts struct {
	etcdEndpoint string // default: the member itself
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
	cmd := exec.Command(h.bin, args...)
	cmd.Env = cleanEnv()
	lb := &logBuffer{}
	cmd.Stdout, cmd.Stderr = lb, lb
	r := &replica{id: id, admin: admin, cmd: cmd, log: lb, done: make(chan struct{})}
	if err := cmd.Start(); err != nil {
		h.t.Fatalf("start replica %s: %v", id, err)
	}
	r.started = time.Now()
	go func() {
		_ = cmd.Wait()
		r.state, r.exitedAt = cmd.ProcessState, time.Now()
		close(r.done)
	}()
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
	h.poll(15*time.Second, "admin listener of "+r.id, func() (bool, string) {
		if r.exited() {
			h.t.Fatalf("replica %s exited during start-up (%s):\n%s", r.id, r.exitString(), r.log.tail(40))
		}
		code, body, err := r.get("/healthz")
		if err != nil {
			return false, err.Error()
		}
		return code == 200, fmt.Sprintf("%d %s", code, body)
	})
}

func freePort(t testing.TB) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().String()
}

// cleanEnv is the test's environment without VIGIL_* settings, so flags are
// the only configuration of a replica.
func cleanEnv() []string {
	var out []string
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "VIGIL_") {
			out = append(out, kv)
		}
	}
	return out
}

func (r *replica) exited() bool {
	select {
	case <-r.done:
		return true
	default:
		return false
	}
}

func (r *replica) exitString() string {
	if !r.exited() {
		return "running"
	}
	return r.state.String()
}

func (r *replica) signal(sig os.Signal) error { return r.cmd.Process.Signal(sig) }

// kill sends SIGKILL and waits for the process to be gone.
func (r *replica) kill(t testing.TB) {
	t.Helper()
	if err := r.cmd.Process.Kill(); err != nil {
		t.Fatalf("kill %s: %v", r.id, err)
	}
	select {
	case <-r.done:
	case <-time.After(10 * time.Second):
		t.Fatalf("replica %s still running 10s after SIGKILL", r.id)
	}
}

var httpClient = &http.Client{Timeout: 2 * time.Second}

func (r *replica) get(path string) (int, string, error) {
	resp, err := httpClient.Get("http://" + r.admin + path)
	if err != nil {
		return 0, "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	return resp.StatusCode, strings.TrimSpace(string(b)), err
}

// metrics reads the replica's /metrics as series -> value, the series being
// the text before the value ("name" or "name{labels}").
func (r *replica) metrics() (map[string]float64, error) {
	code, body, err := r.get("/metrics")
	if err != nil {
		return nil, err
	}
	if code != 200 {
		return nil, fmt.Errorf("/metrics: %d", code)
	}
	out := map[string]float64{}
	sc := bufio.NewScanner(strings.NewReader(body))
	sc.Buffer(make([]byte, 0, 64<<10), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		if line == "" || line[0] == '#' {
			continue
		}
		i := strings.LastIndexByte(line, ' ')
		if i < 0 {
			continue
		}
		v, err := strconv.ParseFloat(line[i+1:], 64)
		if err != nil {
			continue
		}
		out[line[:i]] = v
	}
	return out, sc.Err()
}

// metric is one series' value (0 when absent), or an error.
func (r *replica) metric(series string) (float64, error) {
	m, err := r.metrics()
	if err != nil {
		return 0, err
	}
	return m[series], nil
}

// logBuffer collects a process's output.
type logBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *logBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *logBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

func (l *logBuffer) tail(n int) string {
	lines := strings.Split(strings.TrimRight(l.String(), "\n"), "\n")
	if len(lines) > n {
		lines = append([]string{fmt.Sprintf("... (%d earlier lines)", len(lines)-n)}, lines[len(lines)-n:]...)
	}
	return strings.Join(lines, "\n")
}

// stopReasons counts the replica's "shard stopping" log lines by reason.
func (l *logBuffer) stopReasons() map[string]int {
	out := map[string]int{}
	for _, line := range strings.Split(l.String(), "\n") {
		if !strings.Contains(line, `"@message":"shard stopping"`) {
			continue
		}
		var e struct {
			Reason string `json:"reason"`
		}
		if json.Unmarshal([]byte(line), &e) == nil {
			out[e.Reason]++
		}
	}
	return out
}

// count is the number of log lines containing s.
func (l *logBuffer) count(s string) int {
	return strings.Count(l.String(), s)
}

// poll evaluates cond whenever the recorded etcd state changes, and at least
// every 25ms, until it holds; it returns the time it held. At timeout the test
// fails with what and cond's last detail.
func (h *harness) poll(timeout time.Duration, what string, cond func() (bool, string)) time.Time {
	h.t.Helper()
	deadline := time.Now().Add(timeout)
	tick := time.NewTicker(25 * time.Millisecond)
	defer tick.Stop()
	for {
		ch := h.rec.changedCh()
		if err := h.rec.error(); err != nil {
			h.t.Fatalf("etcd watch failed: %v", err)
		}
		ok, detail := cond()
		now := time.Now()
		if ok {
			return now
		}
		if now.After(deadline) {
			h.t.Fatalf("timed out after %v waiting for %s: %s", timeout, what, detail)
		}
		select {
		case <-ch:
		case <-tick.C:
		}
	}
}

// settled reports whether the cluster's members are exactly ids, every shard
// is owned by the replica the leader assigned it to, and the assignment is
// balanced exactly.
func (h *harness) settled(ids []string) (bool, string) {
	st := h.rec.state()
	want := map[string]bool{}
	for _, id := range ids {
		want[id] = true
	}
	if len(st.members) != len(ids) {
		return false, fmt.Sprintf("members %v, want %v", keys(st.members), ids)
	}
	for id := range st.members {
		if !want[id] {
			return false, fmt.Sprintf("members %v, want %v", keys(st.members), ids)
		}
	}
	counts := map[string]int{}
	for s := 0; s < h.shards; s++ {
		o := st.owners[s]
		switch {
		case o.value == "":
			return false, fmt.Sprintf("shard %d unowned (%s)", s, st.summary())
		case !want[o.value]:
			return false, fmt.Sprintf("shard %d owned by %s, not a wanted member (%s)", s, o.value, st.summary())
		case st.assign[s] != o.value:
			return false, fmt.Sprintf("shard %d owned by %s, assigned to %q (%s)", s, o.value, st.assign[s], st.summary())
		}
		counts[o.value]++
	}
	lo, hi := h.shards/len(ids), (h.shards+len(ids)-1)/len(ids)
	for _, id := range ids {
		if c := counts[id]; c < lo || c > hi {
			return false, fmt.Sprintf("%s owns %d shards, want %d..%d (%s)", id, c, lo, hi, st.summary())
		}
	}
	return true, ""
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
	st := h.rec.state()
	for s := 0; s < h.shards; s++ {
		o, f := st.owners[s], fences[s]
		if o.value == "" {
			return false, fmt.Sprintf("shard %d unowned in etcd", s)
		}
		if f.token != o.createRev || f.owner != o.value {
			return false, fmt.Sprintf("shard %d: fence (%d, %s), etcd owner (%d, %s)", s, f.token, f.owner, o.createRev, o.value)
		}
	}
	return true, ""
}

// leader is the replica whose election key has the lowest create revision.
func (h *harness) leader() string {
	return h.rec.state().leader
}

// ownedBy lists the shards the replica owns in etcd.
func (st clusterSnapshot) ownedBy(id string) []int {
	var out []int
	for s, o := range st.owners {
		if o.value == id {
			out = append(out, s)
		}
	}
	return out
}

func keys[V any](m map[string]V) []string {
	out := make([]string, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	sort.Strings(out)
	return out
}

// ---------------------------------------------------------------------------
// recorder: every change under the cluster's etcd root, in revision order

type ownerKey struct {
	value     string
	createRev int64
	lease     int64
}

// shardEvent is one change of a shard's owner key.
type shardEvent struct {
	at        time.Time
	rev       int64
	put       bool
	value     string // PUT: the new owner; DELETE: the owner whose key went
	createRev int64  // the key's create revision (the fencing token)
	lease     int64
}

func (e shardEvent) String() string {
	op := "DELETE"
	if e.put {
		op = "PUT"
	}
	return fmt.Sprintf("%s rev %d %s %s token %d", e.at.Format("15:04:05.000"), e.rev, op, e.value, e.createRev)
}

type recorder struct {
	t      testing.TB
	layout election.Layout
	shards int

	mu         sync.Mutex
	owners     []ownerKey
	assign     []string
	members    map[string]int64    // id -> lease
	leaders    map[string]ownerKey // election key -> (replica, create revision, lease)
	hist       [][]shardEvent      // by shard
	violations []string
	rev        int64
	err        error
	changed    chan struct{}
}

func newRecorder(t testing.TB, cli *clientv3.Client, layout election.Layout, shards int) *recorder {
	r := &recorder{
		t: t, layout: layout, shards: shards,
		owners: make([]ownerKey, shards), assign: make([]string, shards),
		members: map[string]int64{}, leaders: map[string]ownerKey{},
		hist: make([][]shardEvent, shards), changed: make(chan struct{}),
	}
	ctx, cancel := context.WithCancel(context.Background())
	gctx, gcancel := context.WithTimeout(ctx, 10*time.Second)
	resp, err := cli.Get(gctx, layout.Root+"/", clientv3.WithPrefix())
	gcancel()
	if err != nil {
		cancel()
		t.Fatalf("recorder: read %s: %v", layout.Root, err)
	}
	now := time.Now()
	for _, kv := range resp.Kvs {
		r.apply(now, resp.Header.Revision, true, kv)
	}
	r.rev = resp.Header.Revision
	wch := cli.Watch(ctx, layout.Root+"/", clientv3.WithPrefix(), clientv3.WithRev(resp.Header.Revision+1))
	done := make(chan struct{})
	go func() {
		defer close(done)
		for wr := range wch {
			at := time.Now()
			if err := wr.Err(); err != nil {
				r.fail(fmt.Errorf("watch: %w", err))
				return
			}
			r.mu.Lock()
			for _, ev := range wr.Events {
				r.applyLocked(at, ev.Kv.ModRevision, ev.Type == mvccpb.PUT, ev.Kv)
			}
			r.rev = wr.Header.Revision
			r.notifyLocked()
			r.mu.Unlock()
		}
		if ctx.Err() == nil {
			r.fail(fmt.Errorf("watch channel closed"))
		}
	}()
	t.Cleanup(func() { cancel(); <-done })
	return r
}

func (r *recorder) fail(err error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.err == nil {
		r.err = err
	}
	r.notifyLocked()
}

func (r *recorder) error() error {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.err
}

func (r *recorder) notifyLocked() {
	close(r.changed)
	r.changed = make(chan struct{})
}

func (r *recorder) changedCh() <-chan struct{} {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.changed
}

func (r *recorder) apply(at time.Time, rev int64, put bool, kv *mvccpb.KeyValue) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.applyLocked(at, rev, put, kv)
}

func (r *recorder) applyLocked(at time.Time, rev int64, put bool, kv *mvccpb.KeyValue) {
	key := string(kv.Key)
	L := r.layout
	switch {
	case strings.HasPrefix(key, L.ShardsPrefix()):
		s, err := shard.ParseKey(strings.TrimPrefix(key, L.ShardsPrefix()), r.shards)
		if err != nil {
			r.violations = append(r.violations, fmt.Sprintf("rev %d: bad shard key %s", rev, key))
			return
		}
		cur := r.owners[s]
		if put {
			if cur.value != "" {
				// create-if-absent makes this impossible: a second owner
				// written over the first.
				r.violations = append(r.violations, fmt.Sprintf("rev %d: shard %d owner key rewritten from %s (token %d) to %s (create rev %d)",
					rev, s, cur.value, cur.createRev, kv.Value, kv.CreateRevision))
			}
			o := ownerKey{value: string(kv.Value), createRev: kv.CreateRevision, lease: kv.Lease}
			r.owners[s] = o
			r.hist[s] = append(r.hist[s], shardEvent{at: at, rev: rev, put: true, value: o.value, createRev: o.createRev, lease: o.lease})
		} else {
			r.owners[s] = ownerKey{}
			r.hist[s] = append(r.hist[s], shardEvent{at: at, rev: rev, value: cur.value, createRev: cur.createRev, lease: cur.lease})
		}
	case strings.HasPrefix(key, L.AssignPrefix()):
		s, err := shard.ParseKey(strings.TrimPrefix(key, L.AssignPrefix()), r.shards)
		if err != nil {
			return
		}
		if put {
			r.assign[s] = string(kv.Value)
		} else {
			r.assign[s] = ""
		}
	case strings.HasPrefix(key, L.MembersPrefix()):
		id := strings.TrimPrefix(key, L.MembersPrefix())
		if put {
			r.members[id] = kv.Lease
		} else {
			delete(r.members, id)
		}
	case strings.HasPrefix(key, L.LeaderPrefix()):
		if put {
			r.leaders[key] = ownerKey{value: string(kv.Value), createRev: kv.CreateRevision, lease: kv.Lease}
		} else {
			delete(r.leaders, key)
		}
	}
}

// clusterSnapshot is a copy of the recorded state.
type clusterSnapshot struct {
	rev     int64
	owners  []ownerKey
	assign  []string
	members map[string]int64
	leader  string
}

func (r *recorder) state() clusterSnapshot {
	r.mu.Lock()
	defer r.mu.Unlock()
	st := clusterSnapshot{
		rev:     r.rev,
		owners:  append([]ownerKey(nil), r.owners...),
		assign:  append([]string(nil), r.assign...),
		members: map[string]int64{},
	}
	for k, v := range r.members {
		st.members[k] = v
	}
	var best int64
	for _, l := range r.leaders {
		if best == 0 || l.createRev < best {
			best, st.leader = l.createRev, l.value
		}
	}
	return st
}

func (st clusterSnapshot) summary() string {
	counts := map[string]int{}
	for _, o := range st.owners {
		counts[o.value]++
	}
	var parts []string
	for _, k := range keys(counts) {
		name := k
		if name == "" {
			name = "(unowned)"
		}
		parts = append(parts, fmt.Sprintf("%s=%d", name, counts[k]))
	}
	return "owners " + strings.Join(parts, " ") + ", leader " + st.leader
}

func (st clusterSnapshot) ownedCount() int {
	n := 0
	for _, o := range st.owners {
		if o.value != "" {
			n++
		}
	}
	return n
}

// history returns the shard's events after revision rev.
func (r *recorder) history(s int, after int64) []shardEvent {
	r.mu.Lock()
	defer r.mu.Unlock()
	var out []shardEvent
	for _, e := range r.hist[s] {
		if e.rev > after {
			out = append(out, e)
		}
	}
	return out
}

// tenure is when the owner key with create revision token was observed
// created and deleted (zero when still held); found is false when no such key
// of the shard was seen.
func (r *recorder) tenure(s int, token int64) (owner string, claimed, released time.Time, found bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, e := range r.hist[s] {
		if e.createRev != token {
			continue
		}
		if e.put {
			owner, claimed, found = e.value, e.at, true
		} else {
			released = e.at
		}
	}
	return owner, claimed, released, found
}

func (r *recorder) violationList() []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]string(nil), r.violations...)
}

// dump renders the last n shard events, for failure reports.
func (r *recorder) dump(n int) string {
	r.mu.Lock()
	var all []struct {
		s int
		e shardEvent
	}
	for s, h := range r.hist {
		for _, e := range h {
			all = append(all, struct {
				s int
				e shardEvent
			}{s, e})
		}
	}
	r.mu.Unlock()
	sort.Slice(all, func(i, j int) bool { return all[i].e.rev < all[j].e.rev })
	if len(all) > n {
		all = all[len(all)-n:]
	}
	var b strings.Builder
	for _, x := range all {
		op := "DELETE"
		if x.e.put {
			op = "PUT   "
		}
		fmt.Fprintf(&b, "%s rev %d %s shard %04d %s token %d\n", x.e.at.Format("15:04:05.000"), x.e.rev, op, x.s, x.e.value, x.e.createRev)
	}
	return b.String()
}

// checkHistory fails the test for any recorded key-level violation: an owner
// key written over another, or a shard's events not alternating
// claim/release.
func (h *harness) checkHistory() {
	h.t.Helper()
	for _, v := range h.rec.violationList() {
		h.t.Errorf("etcd: %s", v)
	}
	for s := 0; s < h.shards; s++ {
		hist := h.rec.history(s, 0)
		for i := 1; i < len(hist); i++ {
			if hist[i].put == hist[i-1].put {
				h.t.Errorf("shard %d: two %v events in a row at revisions %d and %d", s, hist[i].put, hist[i-1].rev, hist[i].rev)
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
		for _, line := range strings.Split(r.log.String(), "\n") {
			if strings.Contains(line, `"@message":"removing untrusted key"`) || strings.Contains(line, `"@message":"unexpected key under the cluster prefix"`) {
				hits = append(hits, line)
			}
		}
		if len(hits) > 0 {
			h.t.Errorf("replica %s reported %d etcd anomalies in a cluster nobody else writes to, e.g.\n%s", r.id, len(hits), strings.Join(hits[:min(3, len(hits))], "\n"))
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
// change without one is impossible (store.Apply and store.MarkUnreachable
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
		owner, claimed, released, found := h.rec.tenure(w.shard, w.token)
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
}

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
	go func() {
		defer close(insDone)
		tick := time.NewTicker(50 * time.Millisecond)
		defer tick.Stop()
		for i := 0; ; i++ {
			select {
			case <-ctx.Done():
				return
			case <-tick.C:
			}
			_, err := h.db.Exec(ctx, `
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
