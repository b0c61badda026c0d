package main

// The fleet-scale run (-fleet, `make bench-fleet`): a deployment's shape
// rather than a flat-out sweep. Every host of a large fleet (100,000 × 20 by
// default) is registered, -replicas[0] replicas run at vigil's default
// interval and lease TTL over mutual TLS, and for -duration the bench reads
// every replica's /metrics once a second: each shard's reconcile lag (scrape
// time minus its owner's last-reconcile-success gauge, the figure the alert
// rules use), each shard's pass time, and the cost of the whole (CPU of
// vigil, agentsim and Postgres, RSS and descriptors per replica, Postgres
// statements and etcd requests per second). Then one replica is SIGKILLed
// and the same is read for two more intervals: its shards' claim and first
// pass, and the lag of every shard across the failover.

import (
	"context"
	"fmt"
	"math"
	"slices"
	"sort"
	"time"
)

// fleetDefaults replace the flat-out run's defaults under -fleet, for every
// flag not given explicitly.
var fleetDefaults = map[string]string{
	"hosts":              "100000",
	"replicas":           "10",
	"transports":         "mtls",
	"interval":           "30s",
	"duration":           "5m",
	"hosts-per-agentsim": "10000",
	// 10 replicas × (8 + 1) connections would leave a stock Postgres
	// (max_connections 100) nothing for the control plane.
	"db-max-conns": "4",
	// The control plane's heartbeats are its own load, not vigil's; at
	// 100,000 hosts every 5 s they would be 20,000 row updates a second.
	"heartbeat-interval": "30s",
	"unreachable-after":  "90s",
	"sweep-timeout":      "10m",
	"budget":             "60m",
}

// fleetSmokeDefaults are -fleet -smoke's: a small fleet, briefly.
var fleetSmokeDefaults = map[string]string{
	"hosts":              "300",
	"sandboxes":          "5",
	"replicas":           "3",
	"interval":           "2s",
	"lease-ttl":          "2s",
	"fault-lease-ttl":    "2s",
	"duration":           "6s",
	"hosts-per-agentsim": "150",
	"heartbeat-interval": "1s",
	"unreachable-after":  "30s",
	"sweep-timeout":      "40s",
	"budget":             "150s",
}

// lagLimit is the target of every shard's lag: 1.5 intervals. A shard is
// passed once per interval, so its lag runs up to an interval plus its pass
// time between passes; more than half an interval on top of that means
// passes running late.
func lagLimit(interval time.Duration) time.Duration { return interval * 3 / 2 }

// shardWatch follows every shard's lag and pass times through scrapes.
type shardWatch struct {
	interval time.Duration
	shards   int
	maxLag   map[int]float64 // seconds, per shard, over the window
	lastPass map[int]float64 // last-pass gauge last seen, per shard
	passes   []time.Duration // pass times of the passes seen completing
	rounds   int
}

func newShardWatch(interval time.Duration, shards int) *shardWatch {
	return &shardWatch{interval: interval, shards: shards, maxLag: map[int]float64{}, lastPass: map[int]float64{}}
}

// observe takes one round of scrapes. A shard's lag is read from its
// owner's gauge at the scrape's time. A pass is seen completing when the
// last-pass gauge moves; a full pass starts at the shard's phase within the
// interval (counted from the Unix epoch, as vigil schedules it), so its
// time is how far past the phase it completed.
func (w *shardWatch) observe(scrapes map[string]scrape) {
	w.rounds++
	for _, s := range scrapes {
		at := float64(s.at.UnixNano()) / 1e9
		for shard, ts := range s.byShard(mLastSuccess) {
			w.maxLag[shard] = max(w.maxLag[shard], at-ts)
		}
		for shard, ts := range s.byShard(mLastPass) {
			if prev, ok := w.lastPass[shard]; ok && ts > prev {
				w.passes = append(w.passes, w.passTime(shard, ts))
			}
			w.lastPass[shard] = ts
		}
	}
}

func (w *shardWatch) passTime(shard int, done float64) time.Duration {
	phase := time.Duration(int64(w.interval) * int64(shard) / int64(w.shards))
	since := (int64(done*1e9) - int64(phase)) % int64(w.interval)
	if since < 0 {
		since += int64(w.interval)
	}
	return time.Duration(since)
}

// lags are the shards' maximum lags, and the shards never seen.
func (w *shardWatch) lags() (lags []float64, unseen int) {
	for s := range w.shards {
		v, ok := w.maxLag[s]
		if !ok {
			unseen++
			continue
		}
		lags = append(lags, v)
	}
	sort.Float64s(lags)
	return lags, unseen
}

// watchShards scrapes every live replica once a second for d, feeding w.
func (c *cluster) watchShards(ctx context.Context, w *shardWatch, d time.Duration) error {
	end := time.Now().Add(d)
	t := time.NewTicker(time.Second)
	defer t.Stop()
	for time.Now().Before(end) {
		if err := c.checkAlive(); err != nil {
			return err
		}
		if scrapes, err := c.scrapeAll(ctx); err == nil {
			w.observe(scrapes)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-t.C:
		}
	}
	return nil
}

// waitAllPassed waits until every shard's owner reports a full pass
// completed at or after t0.
func (c *cluster) waitAllPassed(ctx context.Context, t0 time.Time, timeout time.Duration) (time.Time, error) {
	since := float64(t0.UnixNano()) / 1e9
	return poll(ctx, timeout, 500*time.Millisecond, "every shard passed", func() (bool, string, error) {
		if err := c.checkAlive(); err != nil {
			return false, "", err
		}
		scrapes, err := c.scrapeAll(ctx)
		if err != nil {
			return false, err.Error(), nil
		}
		done := map[int]bool{}
		for _, s := range scrapes {
			for shard, ts := range s.byShard(mLastPass) {
				if ts >= since {
					done[shard] = true
				}
			}
		}
		return len(done) == c.e.opts.Shards, fmt.Sprintf("%d of %d shards passed", len(done), c.e.opts.Shards), nil
	})
}

// fleetResult is what the fleet-scale run measured.
type fleetResult struct {
	rep        *report       // for profiles and errors
	registered time.Duration // agentsim start → every host registered
	warm       time.Duration // cluster settled → every shard passed
	warmCost   delta         // replicas started → warm-up over (or given up)
	settling   *shardWatch   // the interval after the warm-up
	steady     *shardWatch
	cost       delta
	kill       *faultStats
	killErr    error
	after      *shardWatch // the two intervals after the kill
	movedLag   []float64   // the killed replica's shards' max lag after the kill
}

func runFleetScale(ctx context.Context, o options, log *progress) (rep *report, err error) {
	rep = newReport(o)
	rep.Params["mode"] = "fleet"
	rep.Params["lease_ttl"] = o.FaultLeaseTTL.String() // the replicas run at vigil's default
	rep.Params["db_max_conns"] = o.DBMaxConns
	e, err := setUp(ctx, o, log)
	defer func() {
		if ctx.Err() == nil && (err != nil || len(rep.Errors) > 0) {
			e.failed = true
		}
		e.close()
	}()
	rep.Machine, rep.Capabilities, rep.Revision = e.mach, e.caps, gitRevision(ctx)
	if err != nil {
		return rep, fmt.Errorf("set-up: %w", err)
	}
	tr, n := o.Transports[0], o.Replicas[0]
	if n < 2 {
		return rep, fmt.Errorf("-fleet needs at least 2 replicas (one is killed), got %d", n)
	}
	res := fleetResult{rep: rep}
	start := time.Now()
	log.printf("fleet: registering %d hosts × %d sandboxes over %s", o.Hosts, o.Sandboxes, tr)
	fl, err := startFleet(ctx, e, tr == "mtls", "fleet")
	defer fl.stop()
	if err != nil {
		return rep, fmt.Errorf("fleet: %w", err)
	}
	res.registered = time.Since(start)
	log.printf("fleet: registered in %s; starting %d replicas at interval %s, lease TTL %s", res.registered.Round(time.Second), n, o.Interval, o.FaultLeaseTTL)
	c, err := newCluster(ctx, e, tr, n, o.Interval, o.FaultLeaseTTL)
	if err != nil {
		return rep, fmt.Errorf("cluster: %w", err)
	}
	defer c.close()
	c.steadySweep = o.Interval
	if err := res.measure(ctx, c, fl, log); err != nil {
		fleetFigures(rep, o, c, &res)
		return rep, err
	}
	fleetFigures(rep, o, c, &res)
	return rep, ctx.Err()
}

// warmUp waits until the cluster settled and then every shard passed.
func (res *fleetResult) warmUp(ctx context.Context, c *cluster) error {
	o := c.e.opts
	settledAt, err := c.waitSettled(ctx, o.SweepTimeout)
	if err != nil {
		return err
	}
	passed, err := c.waitAllPassed(ctx, settledAt, o.SweepTimeout)
	if err != nil {
		return err
	}
	res.warm = passed.Sub(settledAt)
	return nil
}

// measure runs the warm-up, the steady window and the kill.
func (res *fleetResult) measure(ctx context.Context, c *cluster, fl *fleet, log *progress) error {
	o := c.e.opts
	w0, err := c.snapshot(ctx, fl)
	if err != nil {
		return err
	}
	err = res.warmUp(ctx, c)
	// What the warm-up cost, also when it never ended: what saturated.
	if w1, serr := c.snapshot(ctx, fl); serr == nil {
		res.warmCost = w1.sub(w0)
	}
	if err != nil {
		return err
	}
	log.printf("fleet: settled; every shard passed %s later; watching for %s", res.warm.Round(time.Millisecond), o.Duration)
	// One more interval before the window: hosts whose calls failed in
	// the start's storm of handshakes are retried by their next pass, and
	// that tail is the warm-up's, reported as such.
	res.settling = newShardWatch(o.Interval, o.Shards)
	if err := c.watchShards(ctx, res.settling, o.Interval); err != nil {
		return err
	}
	before, err := c.snapshot(ctx, fl)
	if err != nil {
		return err
	}
	res.steady = newShardWatch(o.Interval, o.Shards)
	profiled := func() {}
	if o.Profile {
		profiled = startProfile(ctx, c.e, res.rep, c.liveReplicas()[0], "fleet", "fleet-replica-steady-"+c.transport)
	}
	err = c.watchShards(ctx, res.steady, o.Duration)
	profiled()
	if err != nil {
		return err
	}
	after, err := c.snapshot(ctx, fl)
	if err != nil {
		return err
	}
	res.cost = after.sub(before)
	log.printf("fleet: SIGKILL of a replica")
	res.kill, res.killErr = c.measureKill(ctx, false)
	if res.killErr != nil {
		return nil
	}
	log.printf("fleet: %s; watching for two intervals", res.kill.summary())
	res.after = newShardWatch(o.Interval, o.Shards)
	if err := c.watchShards(ctx, res.after, 2*o.Interval); err != nil {
		return err
	}
	owners, _, err := c.own.state()
	if err != nil {
		return err
	}
	for s, id := range owners {
		if id != "" && slices.Contains(c.liveIDs(), id) && res.kill != nil && wasMoved(res.kill, s) {
			res.movedLag = append(res.movedLag, res.after.maxLag[s])
		}
	}
	return nil
}

func wasMoved(st *faultStats, shard int) bool { return slices.Contains(st.shards, shard) }

// fleetFigures adds the fleet-scale figures.
func fleetFigures(rep *report, o options, c *cluster, res *fleetResult) {
	n, tr := o.Replicas[0], o.Transports[0]
	group := fmt.Sprintf("fleet · %d hosts × %d · %s · %s · interval %s", o.Hosts, o.Sandboxes, replicasLabel(n), tr, o.Interval)
	key := func(k string) string { return "fleet." + k }
	limit := lagLimit(o.Interval).Seconds()
	rep.fig(group, key("registered_s"), "registration of every host and sandbox", "s").set(res.registered.Seconds())
	rep.fig(group, key("warm_s"), "settled → every shard passed", "s").set(res.warm.Seconds())
	lagMax := rep.fig(group, key("lag_max_s"), "reconcile lag, max over shards and window", "s").want("<", limit)
	lagP99 := rep.fig(group, key("lag_p99_s"), "reconcile lag, p99 of the shards' maxima", "s")
	passP50 := rep.fig(group, key("pass_p50_s"), "shard pass time, p50", "s")
	passMax := rep.fig(group, key("pass_max_s"), "shard pass time, max", "s").want("<", o.Interval.Seconds())
	if w := res.steady; w != nil {
		lags, unseen := w.lags()
		if len(lags) > 0 {
			lagMax.set(lags[len(lags)-1]).note("%d shards, %d scrape rounds", len(lags), w.rounds)
			lagP99.set(lags[int(math.Ceil(0.99*float64(len(lags))))-1])
		}
		if unseen > 0 {
			lagMax.fail(fmt.Sprintf("%d shards never exported a lag", unseen))
		}
		if len(w.passes) > 0 {
			passP50.set(medianDur(w.passes).Seconds()).note("%d passes", len(w.passes))
			passMax.set(maxDur(w.passes).Seconds())
		}
	}
	warmFigures := func() {
		d := res.warmCost
		secs := d.window.Seconds()
		if secs <= 0 {
			return
		}
		g := group + " · warm-up"
		rep.fig(g, key("warm.seconds"), "replicas started → every shard passed (or given up)", "s").set(secs)
		rep.fig(g, key("warm.cpu_vigil"), "CPU of vigil, all replicas", "cores").set(d.cpu / secs)
		rep.fig(g, key("warm.cpu_agentsim"), "CPU of agentsim, all processes", "cores").set(d.simCPU / secs)
		rep.fig(g, key("warm.cpu_postgres"), "CPU of Postgres", "cores").set(d.pgCPU / secs)
		rep.fig(g, key("warm.cpu_etcd"), "CPU of the bench process (embedded etcd, scrapes)", "cores").set(d.ownCPU / secs)
		rep.fig(g, key("warm.tls_full"), "agents' full TLS handshakes", "").set(max(d.tlsFull, 0))
		rep.fig(g, key("warm.claims"), "shard claims", "").set(d.claims).note("%d shards", o.Shards)
		rep.fig(g, key("warm.sessions_lost"), "etcd sessions lost (keep-alives unacknowledged)", "").set(d.sessionsLost).want("==", 0)
		rep.fig(g, key("warm.agent_errors"), "failed ListSandboxes calls", "").set(d.agentErrs)
		if res.settling != nil {
			if lags, _ := res.settling.lags(); len(lags) > 0 {
				rep.fig(g, key("warm.lag_max_s"), "reconcile lag in the interval after, max", "s").set(lags[len(lags)-1])
			}
		}
	}
	warmFigures()
	costFigures(rep, group, o, c, res)
	killFigures(rep, group, o, res)
}

// costFigures are the steady window's cost.
func costFigures(rep *report, group string, o options, c *cluster, res *fleetResult) {
	key := func(k string) string { return "fleet." + k }
	d := res.cost
	secs := d.window.Seconds()
	if secs <= 0 {
		return
	}
	rep.fig(group, key("reconciles_per_s"), "hosts reconciled per second", "hosts/s").set(d.active/secs).note("the fleet needs %.0f", float64(o.Hosts)/o.Interval.Seconds())
	rep.fig(group, key("cpu_vigil"), "CPU of vigil, all replicas", "cores").set(d.cpu / secs)
	rep.fig(group, key("cpu_agentsim"), "CPU of agentsim, all processes", "cores").set(d.simCPU / secs)
	rep.fig(group, key("cpu_postgres"), "CPU of Postgres (heartbeats included)", "cores").set(d.pgCPU / secs)
	rep.fig(group, key("vigil_statements_per_s"), "vigil's Postgres statements per second", "/s").set(d.statements / secs)
	rep.fig(group, key("vigil_write_txns_per_s"), "vigil's write transactions per second", "/s").set(d.writeTxns / secs)
	rep.fig(group, key("pg_commits_per_s"), "Postgres commits per second (all clients)", "/s").set(d.pg.Commit / secs)
	rep.fig(group, key("pg_rows_per_s"), "Postgres rows read per second (all clients)", "/s").set((d.pg.Returned + d.pg.Fetched) / secs)
	rep.fig(group, key("etcd_requests_per_s"), "etcd requests per second", "/s").set(d.etcd.Requests/secs).note("%s", methodList(scaleMap(d.etcd.ByMethod, 1/secs)))
	rep.fig(group, key("etcd_writes_per_s"), "etcd writes per second", "/s").set(d.etcd.Writes / secs)
	rep.fig(group, key("sessions_lost"), "etcd sessions lost", "").set(d.sessionsLost).want("==", 0)
	rep.fig(group, key("claims"), "shard claims (ownership moved)", "").set(d.claims).want("==", 0)
	rep.fig(group, key("agent_errors"), "failed ListSandboxes calls", "").set(d.agentErrs)
	if d.tlsFull >= 0 {
		rep.fig(group, key("tls_full"), "agents' full TLS handshakes", "").set(d.tlsFull)
	}
	var rss, fds []float64
	for _, r := range c.all {
		r1, _, f1 := r.peaks()
		rss, fds = append(rss, r1/(1<<20)), append(fds, f1)
	}
	if len(rss) > 0 {
		slices.Sort(rss)
		slices.Sort(fds)
		rep.fig(group, key("rss_max_mib"), "peak RSS per replica, max", "MiB").set(rss[len(rss)-1]).note("median %.0f MiB over %d replica processes", rss[len(rss)/2], len(rss))
		rep.fig(group, key("fds_max"), "open fds per replica, max", "").set(fds[len(fds)-1]).note("median %.0f", fds[len(fds)/2]).want("<=", float64(openFilesLimit()))
	}
}

// killFigures are the SIGKILL's.
func killFigures(rep *report, group string, o options, res *fleetResult) {
	key := func(k string) string { return "fleet.kill." + k }
	g := group + " · SIGKILL of a replica"
	claimed := rep.fig(g, key("claimed_ms"), "its shards claimed by others, max", "ms").want("<", float64(killReclaimBound.Milliseconds()))
	first := rep.fig(g, key("first_pass_s"), "its shards' first pass by the new owner, max", "s")
	moved := rep.fig(g, key("moved_lag_s"), "its shards' reconcile lag after the kill, max", "s").want("<", lagLimit(o.Interval).Seconds())
	all := rep.fig(g, key("lag_max_s"), "every shard's reconcile lag after the kill, max", "s").want("<", lagLimit(o.Interval).Seconds())
	if res.kill == nil {
		why := "not measured"
		if res.killErr != nil {
			why = res.killErr.Error()
		}
		for _, f := range []*figure{claimed, first, moved, all} {
			f.na(why)
		}
		return
	}
	st := res.kill
	if len(st.reclaim) > 0 {
		claimed.set(float64(maxDur(st.reclaim).Milliseconds())).note("%d shards of %s", st.moved, st.victim)
	}
	if len(st.firstPass) > 0 {
		first.set(maxDur(st.firstPass).Seconds())
	}
	if st.missing > 0 {
		claimed.fail(fmt.Sprintf("%d shards not claimed and passed", st.missing))
	}
	if len(res.movedLag) > 0 {
		moved.set(slices.Max(res.movedLag))
	}
	if res.after != nil {
		if lags, _ := res.after.lags(); len(lags) > 0 {
			all.set(lags[len(lags)-1])
		}
	}
}

func scaleMap(m map[string]float64, k float64) map[string]float64 {
	out := make(map[string]float64, len(m))
	for name, v := range m {
		out[name] = v * k
	}
	return out
}
