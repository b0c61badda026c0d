package main

// Sweeps: with the replicas running flat out, a sweep of the fleet starts at
// t0 and ends when every host has been reconciled since t0 — by the
// min-gauge rule over every shard's reconcile-success timestamp. Steady
// sweeps change nothing; changing sweeps run while a fraction of the sandbox
// rows per sweep keeps being put into a state vigil must repair.

import (
	"context"
	"fmt"
	"math"
	"math/rand/v2"
	"sort"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
)

type sweepStats struct {
	walls    []time.Duration
	d        delta
	pg       *pgStats // pg_stat_database over the sweeps; nil when it could not be attributed
	passes   int      // shard passes counted in the window; -1 unknown
	rows     int      // changing: rows put into a state vigil must change
	leftover int      // changing: of those, rows not repaired when the sweep ended
}

func (s *sweepStats) median() time.Duration { return medianDur(s.walls) }

// perSweep divides a window total by the number of sweeps in it.
func (s *sweepStats) perSweep(v float64) float64 { return v / float64(len(s.walls)) }

// warmUp waits until the cluster owns every shard, balanced, and then for
// two sweeps, so measured sweeps start from steady work. With mutual TLS it
// goes on sweeping (up to maxWarmSweeps) while a sweep still made full
// handshakes for more than 1 % of the hosts: the first real sweep after a
// start dials every agent anew, later ones resume sessions, which is the
// steady state. What the warm-up took is kept in c.warm.
func (c *cluster) warmUp(ctx context.Context, f *fleet) error {
	t, err := c.waitSettled(ctx, c.e.opts.SweepTimeout)
	if err != nil {
		return err
	}
	c.warm = warmUp{}
	full0 := f.fullHandshakes(ctx)
	for {
		end, err := c.waitSweep(ctx, t, c.e.opts.SweepTimeout, nil)
		if err != nil {
			return err
		}
		full := f.fullHandshakes(ctx)
		c.warm.walls = append(c.warm.walls, end.Sub(t))
		c.warm.full = append(c.warm.full, full-full0)
		// The first "sweep" can end early: a new owner starts each host's
		// lag clock at its claim, so hosts not yet called already look
		// reconciled. The second one is a real pass over every host.
		if len(c.warm.walls) >= 2 && (!f.tls || full < 0 || full0 < 0 || full-full0 <= float64(c.e.opts.Hosts)/100) || len(c.warm.walls) >= maxWarmSweeps {
			return nil
		}
		t, full0 = end, full
	}
}

// maxWarmSweeps bounds the warm-up.
const maxWarmSweeps = 5

// warmUp is what a cluster's warm-up took: each sweep's wall time and the
// agents' full TLS handshakes in it (-1 unknown).
type warmUp struct {
	walls []time.Duration
	full  []float64
}

// warmFigures adds the warm-up of an mTLS configuration: the sweeps after a
// start that handshake in full, before sessions resume.
func warmFigures(rep *report, n int, transport string, c *cluster) {
	if transport != "mtls" || len(c.warm.walls) == 0 {
		return
	}
	group := fmt.Sprintf("sweep · %s · warm-up · %s", replicasLabel(n), transport)
	f := rep.fig(group, fmt.Sprintf("sweep.%dr.%s.warmup.sweeps", n, transport), "sweeps after the start until TLS sessions resume (≤ 1 % full handshakes)", "")
	f.set(float64(len(c.warm.walls)))
	var parts []string
	for i, w := range c.warm.walls {
		parts = append(parts, fmt.Sprintf("%.2fs with %.0f full handshakes", w.Seconds(), c.warm.full[i]))
	}
	f.note("%s", strings.Join(parts, ", "))
}

// measureSteady measures sweeps back to back, each starting when the last
// ended, and the counters over all of them: at least sweeps of them and at
// least duration (the window's length keeps pg_stat_database's publication
// delay, about a second at each end, small against it), but no more sweeps
// once 3 × duration has passed or the configuration's share of -budget
// would not leave room for the changing sweep, so a slow vigil still fits.
func (c *cluster) measureSteady(ctx context.Context, f *fleet, sweeps int, duration time.Duration) (*sweepStats, error) {
	pc := c.startPassCount()
	defer c.countPasses(nil)
	s0, err := c.snapshot(ctx, f)
	if err != nil {
		return nil, err
	}
	st := &sweepStats{passes: -1}
	t0 := s0.at
	for {
		elapsed := t0.Sub(s0.at)
		if len(st.walls) > 0 && (elapsed >= 3*duration || len(st.walls) >= sweeps && elapsed >= duration ||
			time.Until(c.deadline) < 5*st.median()/2) { // leave time for the changing sweep
			break
		}
		end, err := c.waitSweep(ctx, t0, c.e.opts.SweepTimeout, nil)
		if err != nil {
			return nil, err
		}
		st.walls = append(st.walls, end.Sub(t0))
		t0 = end
	}
	s1, err := c.snapshot(ctx, f)
	if err != nil {
		return nil, err
	}
	st.d = s1.sub(s0)
	st.pg = &st.d.pg
	if pc != nil {
		st.passes = pc.total()
	}
	return st, nil
}

// snapshotGraceExceeded is how old the changed rows' last_updated is made:
// past vigil's default --snapshot-grace of 15 minutes.
const snapshotGraceExceeded = "20 minutes"

// measureChanging measures sweeps, back to back like the steady ones,
// while a fraction of the sandbox rows keeps needing a transition: at the
// start of every sweep one statement moves ChangeFraction × all rows (random,
// distinct) from running into snapshotting past the snapshot grace (their
// VMs run on the agents, so vigil must move them back to running with a
// snapshot_recovered audit row). In steady state every sweep repairs that
// many rows, as in a fleet with that much churn, so a changing sweep is
// directly comparable with a steady one. After the window one more sweep
// must leave no row unrepaired.
//
// pg_stat_database's counts include the injections; vigil's counters are
// vigil's alone.
func (c *cluster) measureChanging(ctx context.Context, f *fleet, steady *sweepStats) (*sweepStats, error) {
	o := c.e.opts
	per := max(1, int(math.Round(float64(o.Hosts*o.Sandboxes)*o.ChangeFraction)))
	var running []string
	rows, err := c.e.db.Query(ctx, `select id::text from sandboxes where status = 'running'`)
	if err == nil {
		running, err = pgx.CollectRows(rows, pgx.RowTo[string])
	}
	if err != nil {
		return nil, fmt.Errorf("list running rows: %w", err)
	}
	rand.Shuffle(len(running), func(i, j int) { running[i], running[j] = running[j], running[i] })
	inj := &injector{db: c.e.db, ids: running}

	pc := c.startPassCount()
	defer c.countPasses(nil)
	s0, err := c.snapshot(ctx, f)
	if err != nil {
		return nil, err
	}
	st := &sweepStats{passes: -1}
	t0, start := time.Now(), time.Now()
	for {
		elapsed := time.Since(start)
		if len(st.walls) > 0 && (elapsed >= 3*o.Duration || len(st.walls) >= o.Sweeps && elapsed >= o.Duration ||
			time.Until(c.deadline) < 3*st.median()) {
			break
		}
		if err := inj.inject(ctx, per); err != nil {
			return nil, err
		}
		end, err := c.waitSweep(ctx, t0, o.SweepTimeout, nil)
		if err != nil {
			return nil, err
		}
		st.walls = append(st.walls, end.Sub(t0))
		t0 = end
	}
	s1, err := c.snapshot(ctx, f)
	if err != nil {
		return nil, err
	}
	pg1, err := c.e.pgStats(ctx)
	if err != nil {
		return nil, err
	}
	st.d = s1.sub(s0)
	st.rows = inj.total()
	if pc != nil {
		st.passes = pc.total()
	}
	// One more sweep after the last change: nothing may be left behind.
	injected := inj.injected()
	if _, err := c.waitSweep(ctx, time.Now(), o.SweepTimeout, func(map[string]scrape) (bool, string, error) {
		var n int
		err := c.e.db.QueryRow(ctx, `select count(*) from sandboxes where id = any($1::uuid[]) and status = 'snapshotting'`, injected).Scan(&n)
		return n == 0, fmt.Sprintf("%d changed rows not repaired", n), err
	}); err != nil {
		return nil, err
	}
	if err := c.e.db.QueryRow(ctx, `select count(*) from sandboxes where id = any($1::uuid[]) and status = 'snapshotting'`, injected).Scan(&st.leftover); err != nil {
		return nil, err
	}
	pg := pg1.sub(s0.pg).clamp()
	st.pg = &pg
	return st, nil
}

// injector moves running rows into snapshotting.
type injector struct {
	db   *pgxpool.Pool
	ids  []string // running rows, shuffled; used in order, cycling
	next int

	mu      sync.Mutex
	touched []string // every id a batch named
	changed int      // rows the batches really changed
}

// inject moves the next n rows in one statement.
func (in *injector) inject(ctx context.Context, n int) error {
	n = min(n, len(in.ids))
	batch := make([]string, 0, n)
	for range n {
		batch = append(batch, in.ids[in.next])
		in.next = (in.next + 1) % len(in.ids)
	}
	tag, err := in.db.Exec(ctx, `
		update sandboxes set status = 'snapshotting', last_updated = now() - interval '`+snapshotGraceExceeded+`'
		 where id = any($1::uuid[]) and status = 'running'`, batch)
	if err != nil {
		return fmt.Errorf("inject changes: %w", err)
	}
	in.mu.Lock()
	in.touched = append(in.touched, batch...)
	in.changed += int(tag.RowsAffected())
	in.mu.Unlock()
	return nil
}

func (in *injector) total() int {
	in.mu.Lock()
	defer in.mu.Unlock()
	return in.changed
}

// injected is every row the injector named, for the final repair check.
func (in *injector) injected() []string {
	in.mu.Lock()
	defer in.mu.Unlock()
	return append([]string(nil), in.touched...)
}

// startPassCount starts counting shard passes when vigil exports their
// timestamps; nil otherwise.
func (c *cluster) startPassCount() *passCounter {
	if !c.e.caps.Metrics[mLastPass] {
		return nil
	}
	pc := newPassCounter()
	c.countPasses(pc)
	return pc
}

// sweepFigures adds the figures of one kind of sweep ("steady" or
// "changing") of one configuration. st nil: the measurement failed (why) or
// could not run (pending). ref are the transport's references; steady is
// the configuration's steady measurement, for the changing sweep's ratio.
func sweepFigures(rep *report, e *env, n int, transport, kind string, st *sweepStats, ref *refResult, steady *sweepStats, why, pending string) {
	f := &sweepFigs{
		rep: rep, e: e, st: st, ok: st != nil && pending == "", kind: kind, why: why, pending: pending,
		group:     fmt.Sprintf("sweep · %s · %s · %s", replicasLabel(n), kind, transport),
		prefix:    fmt.Sprintf("sweep.%dr.%s.%s", n, transport, kind),
		transport: transport,
	}
	f.speed(ref, kind == "steady" && n == 1 && transport == "plain")
	if kind == "changing" {
		f.repair(steady)
	}
	f.postgres()
	f.etcd()
	f.cpu()
	if transport == "mtls" {
		f.tls()
	}
}

// tls: the agents' full TLS handshakes (not resumed sessions) per sweep and
// per host; with sessions resuming, only the first call of each host after
// a replica started makes one.
func (s *sweepFigs) tls() {
	full := s.add("tls_full_handshakes_sweep", "full TLS handshakes per sweep (agentsim: sessions not resumed)", "")
	if !s.ok {
		return
	}
	if s.st.d.tlsFull < 0 {
		full.pending("agentsim GET /stats with full_tls_handshakes")
		return
	}
	full.set(s.st.perSweep(s.st.d.tlsFull)).note("of %d hosts", s.e.opts.Hosts)
}

// sweepFigs builds one sweep's figures; every figure is added even when the
// measurement is missing, n/a with the reason.
type sweepFigs struct {
	rep                *report
	e                  *env
	st                 *sweepStats
	ok                 bool // st is there to read
	kind, why, pending string
	group, prefix      string
	transport          string
}

func (s *sweepFigs) add(key, name, unit string) *figure {
	f := s.rep.fig(s.group, s.prefix+"."+key, name, unit)
	switch {
	case s.pending != "":
		f.pending(s.pending)
	case s.st == nil:
		f.na(s.why)
	}
	return f
}

// metric sets f from a vigil metric, which the build may not have.
func (s *sweepFigs) metric(f *figure, name string, v func() float64) {
	switch {
	case !s.ok:
	case !s.e.caps.Metrics[name]:
		f.pending("vigil metric " + name)
	default:
		f.set(v())
	}
}

// perPass sets f to a window total per counted shard pass.
func (s *sweepFigs) perPass(f *figure, total func() float64) {
	switch {
	case !s.ok:
	case s.st.passes < 0:
		f.pending("vigil metric " + mLastPass)
	case s.st.passes == 0:
		f.na("no shard pass seen in the window")
	default:
		f.set(total()/float64(s.st.passes)).note("%d passes counted from last-pass timestamps (a lower bound: the figure is an upper bound)", s.st.passes)
	}
}

// speed: wall time, hosts/s both ways, the ratios to the references.
func (s *sweepFigs) speed(ref *refResult, withTargets bool) {
	o, st := s.e.opts, s.st
	wall := s.add("wall_s", "sweep wall time", "s").pos()
	hps := s.add("hosts_per_s", "hosts/s (hosts ÷ sweep time)", "hosts/s").pos()
	rps := s.add("reconciles_per_s", "hosts/s (active reconciles/s, all replicas)", "hosts/s").pos()
	xLoop := s.add("x_loop", "× seed loop", "×").pos()
	xCeil := s.add("x_ceiling", "× RPC ceiling", "×").pos()
	if withTargets {
		xLoop.want(">=", 10)
		xCeil.want(">=", 0.5)
	}
	if s.ok {
		if len(st.walls) > 1 {
			wall.Name = fmt.Sprintf("sweep wall time (median of %d)", len(st.walls))
			wall.note("sweeps: %s", durList(st.walls))
		}
		wall.set(st.median().Seconds())
		rate := float64(o.Hosts) / st.median().Seconds()
		hps.set(rate)
		ratio(xLoop, rate, ref, func(r *refResult) float64 { return r.Loop }, "no seed-loop figure")
		ratio(xCeil, rate, ref, func(r *refResult) float64 { return r.Ceiling }, "no ceiling figure")
	}
	s.metric(rps, mReconciles, func() float64 { return st.d.active / st.d.window.Seconds() })
	perHost := s.add("reconciles_per_host_sweep", "active reconciles per host per sweep", "").pos()
	s.metric(perHost, mReconciles, func() float64 { return st.perSweep(st.d.active) / float64(o.Hosts) })
	agentErrs := s.add("agent_errors_sweep", "failed ListSandboxes calls per sweep (vigil)", "")
	s.metric(agentErrs, mAgentErrors, func() float64 { return st.perSweep(st.d.agentErrs) })
	hostErrs := s.add("host_errors_sweep", "host reconciles failed in the database per sweep (vigil)", "")
	s.metric(hostErrs, mReconciles, func() float64 { return st.perSweep(st.d.hostErrs) })
	txns := s.add("failed_txns_sweep", "write transactions failed per sweep (vigil)", "")
	s.metric(txns, mWriteTxns, func() float64 { return st.perSweep(st.d.failedTxns) })
}

func ratio(f *figure, rate float64, ref *refResult, of func(*refResult) float64, why string) {
	if ref == nil || of(ref) <= 0 {
		f.na(why)
		return
	}
	f.set(rate / of(ref))
}

// repair: the changing sweep's rows and its time against the steady sweep.
func (s *sweepFigs) repair(steady *sweepStats) {
	st := s.st
	rows := s.add("rows", fmt.Sprintf("rows changed per sweep (%.0f %% of all)", s.e.opts.ChangeFraction*100), "").pos()
	left := s.add("rows_left", "changed rows still snapshotting a sweep after the last change", "").want("==", 0)
	xSteady := s.add("x_steady", "× steady sweep time", "×").pos().want("<=", 1.5)
	if !s.ok {
		return
	}
	rows.set(st.perSweep(float64(st.rows)))
	left.set(float64(st.leftover))
	if steady == nil {
		xSteady.na("no steady sweep of this configuration")
		return
	}
	xSteady.set(st.median().Seconds() / steady.median().Seconds())
}

// postgres: vigil's own statement and write-transaction counts, and
// pg_stat_database's view of the benchmark database.
func (s *sweepFigs) postgres() {
	o, st := s.e.opts, s.st
	stmts := s.add("pg_statements_sweep", "Postgres statements per sweep (vigil)", "")
	stmtsPass := s.add("pg_statements_pass", "Postgres statements per shard pass (vigil)", "")
	writes := s.add("pg_write_txns_sweep", "Postgres write transactions per sweep (vigil)", "")
	if s.kind == "steady" {
		stmtsPass.want("<=", 3)
		writes.want("==", 0)
	}
	s.metric(stmts, mStatements, func() float64 { return st.perSweep(st.d.statements) })
	if s.ok && !s.e.caps.Metrics[mStatements] {
		stmtsPass.pending("vigil metric " + mStatements)
	} else {
		s.perPass(stmtsPass, func() float64 { return st.d.statements })
	}
	s.metric(writes, mWriteTxns, func() float64 { return st.perSweep(st.d.writeTxns) })

	xacts := s.add("pg_xacts_sweep", "Postgres transactions per sweep (pg_stat_database)", "")
	if s.kind == "steady" {
		xacts.pos() // one changing sweep's count is an estimate that may clamp to 0
	}
	xactsPass := s.add("pg_xacts_pass", "Postgres transactions per shard pass (pg_stat_database)", "")
	read := s.add("pg_rows_read_sweep", "rows read per sweep (pg_stat returned + fetched)", "")
	written := s.add("pg_rows_written_sweep", "rows written per sweep (pg_stat ins + upd + del)", "")
	passes := s.add("shard_passes_sweep", "shard passes per sweep", "")
	if !s.ok {
		return
	}
	if st.passes >= 0 {
		passes.set(st.perSweep(float64(st.passes)))
	} else {
		passes.pending("vigil metric " + mLastPass)
	}
	if st.pg == nil {
		for _, f := range []*figure{xacts, xactsPass, read, written} {
			f.na("pg_stat_database counts of one sweep need the steady sweeps' rate, which failed")
		}
		return
	}
	xacts.set(st.perSweep(st.pg.Commit + st.pg.Rollback))
	if s.kind == "changing" {
		xacts.note("includes the injector's own updates")
	}
	s.perPass(xactsPass, func() float64 { return st.pg.Commit + st.pg.Rollback })
	read.set(st.perSweep(st.pg.Returned + st.pg.Fetched))
	written.set(st.perSweep(st.pg.Inserted+st.pg.Updated+st.pg.Deleted)).
		note("includes agentsim's heartbeats (%d rows each %s)", o.Hosts, o.Heartbeat)
}

// etcd: requests, writes and raft proposals of the embedded member.
func (s *sweepFigs) etcd() {
	st := s.st
	req := s.add("etcd_requests_sweep", "etcd requests per sweep", "")
	w := s.add("etcd_writes_sweep", "etcd writes per sweep (keys put + deleted)", "")
	p := s.add("etcd_proposals_sweep", "etcd raft proposals per sweep", "")
	if s.kind == "steady" {
		w.want("==", 0)
	}
	if !s.ok {
		return
	}
	etcdFig(req, st.d.etcd, "grpc_server_handled_total", st.perSweep(st.d.etcd.Requests))
	etcdFig(w, st.d.etcd, "etcd_mvcc_put_total", st.perSweep(st.d.etcd.Writes))
	etcdFig(p, st.d.etcd, "etcd_server_proposals_committed_total", st.perSweep(st.d.etcd.Proposals))
	if len(st.d.etcd.ByMethod) > 0 {
		req.note("by method over the window: %s", methodList(st.d.etcd.ByMethod))
	}
}

// cpu: CPU seconds of the replicas and of agentsim.
func (s *sweepFigs) cpu() {
	cpu := s.add("cpu_s_sweep", "CPU seconds per sweep (all replicas)", "s").pos()
	sim := s.add("sim_cpu_s_sweep", "CPU seconds per sweep (agentsim)", "s").pos()
	pg := s.add("pg_cpu_s_sweep", "CPU seconds per sweep (Postgres, whole server)", "s")
	if s.ok {
		cpu.set(s.st.perSweep(s.st.d.cpu))
		sim.set(s.st.perSweep(s.st.d.simCPU))
		pg.set(s.st.perSweep(s.st.d.pgCPU)).note("every postgres process, with the backends reaped meanwhile (the postmaster's children time)")
	}
}

func etcdFig(f *figure, d etcdStats, family string, v float64) {
	if !d.Present[family] {
		f.na("etcd exports no " + family)
		return
	}
	f.set(v)
}

// resourceFigures adds the per-replica peaks of one configuration (every
// replica it ran, replacements included).
func resourceFigures(rep *report, n int, transport string, c *cluster, why, pending string) {
	group := fmt.Sprintf("resources · %s · %s", replicasLabel(n), transport)
	prefix := fmt.Sprintf("resources.%dr.%s", n, transport)
	rss := rep.fig(group, prefix+".rss_mib", "peak RSS per replica (max, VmHWM)", "MiB").pos().want("<=", 256)
	gr := rep.fig(group, prefix+".goroutines", "goroutines per replica (max)", "").pos().want("<=", 2000)
	// A replica keeps a connection per owned agent, up to what its open-files
	// limit allows (--agent-max-idle-conns 0): the bound is that limit.
	fds := rep.fig(group, prefix+".open_fds", "open fds per replica (max)", "").pos().want("<=", float64(openFilesLimit()))
	if c == nil || len(c.all) == 0 {
		for _, f := range []*figure{rss, gr, fds} {
			if pending != "" {
				f.pending(pending)
			} else {
				f.na(why)
			}
		}
		return
	}
	var mr, mg, mf float64 = -1, -1, -1
	for _, r := range c.all {
		r1, g1, f1 := r.peaks()
		mr, mg, mf = max(mr, r1), max(mg, g1), max(mf, f1)
	}
	setPeak(rss, mr/(1<<20), mr)
	setPeak(gr, mg, mg)
	setPeak(fds, mf, mf)
	for _, f := range []*figure{rss, gr, fds} {
		f.note("over %d replica processes", len(c.all))
	}
}

func setPeak(f *figure, v, raw float64) {
	if raw < 0 {
		f.na("never sampled")
		return
	}
	f.set(v)
}

func replicasLabel(n int) string {
	if n == 1 {
		return "1 replica"
	}
	return fmt.Sprintf("%d replicas", n)
}

func medianDur(ds []time.Duration) time.Duration {
	if len(ds) == 0 {
		return 0
	}
	s := append([]time.Duration(nil), ds...)
	sort.Slice(s, func(i, j int) bool { return s[i] < s[j] })
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}

func maxDur(ds []time.Duration) time.Duration {
	var m time.Duration
	for _, d := range ds {
		m = max(m, d)
	}
	return m
}

func durList(ds []time.Duration) string {
	s := ""
	for i, d := range ds {
		if i > 0 {
			s += ", "
		}
		s += fmt.Sprintf("%.3fs", d.Seconds())
	}
	return s
}

func methodList(m map[string]float64) string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	s := ""
	for i, k := range keys {
		if i > 0 {
			s += ", "
		}
		s += fmt.Sprintf("%s %.0f", k, m[k])
	}
	return s
}

// openFilesLimit is this process's open-files limit, which the replicas
// inherit; 4096 when it cannot be read.
func openFilesLimit() uint64 {
	var rl syscall.Rlimit
	if syscall.Getrlimit(syscall.RLIMIT_NOFILE, &rl) != nil {
		return 4096
	}
	return rl.Cur
}
