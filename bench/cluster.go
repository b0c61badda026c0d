package main

// A cluster of `vigil run` processes under one cluster name, the bench's
// etcd watch of its ownership, a sampler per replica (/metrics every 250 ms:
// the goroutine and fd peaks), and the counter snapshots sweeps are costed
// from.

import (
	"context"
	"fmt"
	"os"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
)

type cluster struct {
	interval  time.Duration // --interval of its replicas
	leaseTTL  time.Duration // --lease-ttl of its replicas
	warm      warmUp        // what its warm-up took
	e         *env
	name      string
	transport string
	own       *ownership
	ctx       context.Context // ends at close: samplers, watch
	cancel    context.CancelFunc
	seq       int       // guarded by mu: replicas may start at once
	deadline  time.Time // this step's share of -budget; every wait ends by it

	steadySweep time.Duration // median steady sweep, once measured

	mu     sync.Mutex
	live   []*replica // running, in start order
	all    []*replica // every replica ever started
	passes *passCounter
}

type replica struct {
	*proc
	id, admin string

	mu         sync.Mutex
	lastScrape time.Time
	goroutines float64 // peak; -1 until seen
	fds        float64 // peak
	rss        float64 // VmHWM, last read while running
	cpu        float64 // CPU seconds, last read while running
}

// newCluster starts n replicas in a fresh cluster (its own etcd root) and
// waits for their admin listeners.
func newCluster(ctx context.Context, e *env, transport string, n int, interval, leaseTTL time.Duration) (*cluster, error) {
	c := &cluster{e: e, transport: transport, interval: interval, leaseTTL: leaseTTL}
	c.name = fmt.Sprintf("bench-%dr-%s-%d", n, transport, time.Now().UnixNano()%1e6)
	c.ctx, c.cancel = context.WithCancel(context.Background())
	var err error
	if c.own, err = watchOwnership(c.ctx, e.etcdCli, c.name, e.opts.Shards); err != nil {
		c.cancel()
		return nil, err
	}
	if err := c.startN(ctx, n); err != nil {
		c.close()
		return nil, err
	}
	return c, nil
}

// startN starts n replicas: one after another, or under -fleet all at once,
// as a fresh deployment does (one rebalance instead of n).
func (c *cluster) startN(ctx context.Context, n int) error {
	if !c.e.opts.Fleet {
		for range n {
			if _, err := c.start(ctx); err != nil {
				return err
			}
		}
		return nil
	}
	errs := make(chan error, n)
	for range n {
		go func() { _, err := c.start(ctx); errs <- err }()
	}
	var first error
	for range n {
		if err := <-errs; err != nil && first == nil {
			first = err
		}
	}
	return first
}

// start adds one replica and waits for its admin listener.
func (c *cluster) start(ctx context.Context) (*replica, error) {
	o := c.e.opts
	c.mu.Lock()
	c.seq++
	id := fmt.Sprintf("%s-r%d", c.name, c.seq)
	c.mu.Unlock()
	admin, err := freeAddr()
	if err != nil {
		return nil, err
	}
	args := []string{"run",
		"--etcd-endpoints", c.e.etcdEndpoint,
		"--etcd-prefix", etcdPrefix,
		"--database-url", c.e.dbURL,
		"--cluster", c.name,
		"--replica-id", id,
		"--shards", strconv.Itoa(o.Shards),
		"--lease-ttl", c.leaseTTL.String(),
		"--interval", c.interval.String(),
		"--unreachable-after", o.UnreachableAfter.String(),
		"--agent-timeout", agentTimeout(c.leaseTTL).String(),
		"--http-addr", admin,
		"--log-format", "json",
	}
	if o.AgentConcurrency > 0 && c.e.caps.VigilAgentConcurrency {
		args = append(args, "--agent-concurrency", strconv.Itoa(o.AgentConcurrency))
	}
	if o.DBMaxConns > 0 {
		args = append(args, "--db-max-conns", strconv.Itoa(o.DBMaxConns))
	}
	if o.Profile && c.e.caps.VigilDebugPprof {
		args = append(args, "--debug-pprof")
	}
	if c.transport == "mtls" {
		args = append(args, "--agent-ca-file", c.e.certs.CA, "--agent-cert-file", c.e.certs.ClientCert, "--agent-key-file", c.e.certs.ClientKey)
	}
	p, err := c.e.procs.start(id, c.e.vigilBin, args)
	if err != nil {
		return nil, err
	}
	r := &replica{proc: p, id: id, admin: admin, goroutines: -1, fds: -1}
	if _, err := poll(ctx, 30*time.Second, 50*time.Millisecond, id+" healthy", func() (bool, string, error) {
		if r.exited() {
			return false, "", r.exitError()
		}
		code, _, err := httpGet(ctx, "http://"+admin+"/healthz")
		if err != nil {
			return false, err.Error(), nil
		}
		return code == 200, strconv.Itoa(code), nil
	}); err != nil {
		r.kill()
		return nil, err
	}
	c.mu.Lock()
	c.live = append(c.live, r)
	c.all = append(c.all, r)
	c.mu.Unlock()
	go c.sample(r)
	return r, nil
}

// samplePeriod is how often the peaks are sampled. Every scrape counts, so
// the sampler skips a tick when a sweep's poll scraped the replica just
// before: the replica is never scraped more often than either needs.
const samplePeriod = 250 * time.Millisecond

// sample scrapes r every samplePeriod until it exits or the cluster closes.
func (c *cluster) sample(r *replica) {
	period := samplePeriod
	if c.e.opts.Fleet {
		// Ten replicas of 256 shards' gauges, four times a second, would
		// be a load of the bench's own.
		period = time.Second
	}
	t := time.NewTicker(period)
	defer t.Stop()
	for {
		select {
		case <-c.ctx.Done():
			return
		case <-r.done:
			return
		case <-t.C:
		}
		r.mu.Lock()
		recent := time.Since(r.lastScrape) < period*4/5
		r.mu.Unlock()
		if !recent {
			if s, err := fetchMetrics(c.ctx, r.admin); err == nil {
				c.observe(r, s)
			}
		}
		r.readProc()
	}
}

// observe records a scrape of r: peaks, and shard passes while counting.
func (c *cluster) observe(r *replica, s scrape) {
	r.mu.Lock()
	r.lastScrape = s.at
	if v, ok := s.value(mGoroutines); ok {
		r.goroutines = max(r.goroutines, v)
	}
	if v, ok := s.value(mOpenFDs); ok {
		r.fds = max(r.fds, v)
	}
	r.mu.Unlock()
	c.mu.Lock()
	pc := c.passes
	c.mu.Unlock()
	if pc != nil {
		pc.observe(s.byShard(mLastPass))
	}
}

// readProc refreshes what /proc says about r while it runs: peak RSS, CPU,
// and the fd count when /metrics did not give one.
func (r *replica) readProc() {
	hwm, errH := procStatusBytes(r.pid(), "VmHWM")
	cpu, errC := procCPU(r.pid())
	fds, errF := procFDs(r.pid())
	r.mu.Lock()
	defer r.mu.Unlock()
	if errH == nil {
		r.rss = max(r.rss, hwm)
	}
	if errC == nil {
		r.cpu = cpu
	}
	if errF == nil {
		r.fds = max(r.fds, fds)
	}
}

// peaks are r's resource peaks so far.
func (r *replica) peaks() (rss, goroutines, fds float64) {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.rss, r.goroutines, r.fds
}

func (c *cluster) liveReplicas() []*replica {
	c.mu.Lock()
	defer c.mu.Unlock()
	return append([]*replica(nil), c.live...)
}

func (c *cluster) liveIDs() []string {
	var ids []string
	for _, r := range c.liveReplicas() {
		ids = append(ids, r.id)
	}
	return ids
}

func (c *cluster) byID(id string) *replica {
	for _, r := range c.liveReplicas() {
		if r.id == id {
			return r
		}
	}
	return nil
}

func (c *cluster) remove(r *replica) {
	c.mu.Lock()
	defer c.mu.Unlock()
	for i, x := range c.live {
		if x == r {
			c.live = append(c.live[:i], c.live[i+1:]...)
			return
		}
	}
}

// signal sends sig to r after recording its peaks, and takes it out of the
// live set at once (a SIGTERMed replica still hands its shards over, but is
// no longer counted as a member to settle on).
func (c *cluster) signal(r *replica, sig syscall.Signal) error {
	r.readProc()
	c.remove(r)
	return r.signal(sig)
}

// close kills every replica (the next configuration uses another cluster
// name, so nothing waits for a handover) and stops the samplers.
func (c *cluster) close() {
	for _, r := range c.liveReplicas() {
		r.readProc()
		_ = r.signal(syscall.SIGKILL)
	}
	c.mu.Lock()
	all := append([]*replica(nil), c.all...)
	c.live = nil
	c.mu.Unlock()
	for _, r := range all {
		r.wait(10 * time.Second)
	}
	c.cancel()
}

// checkAlive fails when a live replica has exited on its own.
func (c *cluster) checkAlive() error {
	for _, r := range c.liveReplicas() {
		if r.exited() {
			c.remove(r)
			return r.exitError()
		}
	}
	return nil
}

// scrapeAll reads every live replica's /metrics at once.
func (c *cluster) scrapeAll(ctx context.Context) (map[string]scrape, error) {
	rs := c.liveReplicas()
	out := make(map[string]scrape, len(rs))
	var mu sync.Mutex
	var wg sync.WaitGroup
	var firstErr error
	for _, r := range rs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			s, err := fetchMetrics(ctx, r.admin)
			mu.Lock()
			defer mu.Unlock()
			if err != nil {
				if firstErr == nil {
					firstErr = fmt.Errorf("%s /metrics: %w", r.id, err)
				}
				return
			}
			out[r.id] = s
		}()
	}
	wg.Wait()
	for _, r := range rs {
		if s, ok := out[r.id]; ok {
			c.observe(r, s)
		}
	}
	return out, firstErr
}

// limit bounds a wait's timeout by the cluster's deadline, and says so in
// its description when that is what bounds it.
func (c *cluster) limit(timeout time.Duration, what string) (time.Duration, string) {
	if c.deadline.IsZero() {
		return timeout, what
	}
	if left := time.Until(c.deadline); left < timeout {
		return max(left, 0), what + " (within its share of -budget)"
	}
	return timeout, what
}

// waitSettled waits until every shard is owned by a live replica and the
// ownership is balanced.
func (c *cluster) waitSettled(ctx context.Context, timeout time.Duration) (time.Time, error) {
	timeout, what := c.limit(timeout, "cluster "+c.name+" settled")
	return poll(ctx, timeout, 25*time.Millisecond, what, func() (bool, string, error) {
		if err := c.checkAlive(); err != nil {
			return false, "", err
		}
		owners, _, err := c.own.state()
		if err != nil {
			return false, "", err
		}
		ok, detail := settled(owners, c.liveIDs())
		return ok, detail, nil
	})
}

// sweepDone applies the min-gauge rule to one round of scrapes: the fleet
// has been swept since t0 when every shard's reconcile-success timestamp, as
// exported by its owner, is at or after t0. It returns the shards still
// behind.
func (c *cluster) sweepDone(scrapes map[string]scrape, t0 time.Time) (bool, string) {
	best := make([]float64, c.e.opts.Shards)
	for _, s := range scrapes {
		for shard, v := range s.byShard(mLastSuccess) {
			if shard >= 0 && shard < len(best) {
				best[shard] = max(best[shard], v)
			}
		}
	}
	t := float64(t0.UnixNano()) / 1e9
	behind := 0
	first := -1
	for s, v := range best {
		if v < t {
			behind++
			if first < 0 {
				first = s
			}
		}
	}
	if behind == 0 {
		return true, ""
	}
	return false, fmt.Sprintf("%d shards not reconciled since t0 (first: %d)", behind, first)
}

// waitSweep polls every live replica until the fleet has been swept since t0
// and extra (when set) holds on the same round of scrapes. Each round is
// taken to observe the replicas at its midpoint; the sweep ended between the
// last round that did not see it done and the first that did, and the
// midpoint of the two is returned (off by at most half a period). The period
// grows with the sweep, 1/20 of the time since t0 within 100..500 ms, so a
// long sweep is not paid for with constant scraping of the replicas.
func (c *cluster) waitSweep(ctx context.Context, t0 time.Time, timeout time.Duration, extra func(map[string]scrape) (bool, string, error)) (time.Time, error) {
	timeout, what := c.limit(timeout, "sweep")
	deadline := time.Now().Add(timeout)
	prev := t0
	detail := ""
	for {
		if err := c.checkAlive(); err != nil {
			return time.Time{}, err
		}
		start := time.Now()
		scrapes, err := c.scrapeAll(ctx)
		obs := start.Add(time.Since(start) / 2)
		if err != nil {
			detail = err.Error()
		} else {
			ok, d := c.sweepDone(scrapes, t0)
			if ok && extra != nil {
				if ok, d, err = extra(scrapes); err != nil {
					return time.Time{}, err
				}
			}
			if ok {
				return prev.Add(obs.Sub(prev) / 2), nil
			}
			detail, prev = d, obs
		}
		if time.Now().After(deadline) {
			return time.Time{}, fmt.Errorf("%s: not done after %s (%s)", what, timeout.Round(time.Second), detail)
		}
		period := min(max(time.Since(t0)/20, 100*time.Millisecond), 500*time.Millisecond)
		select {
		case <-ctx.Done():
			return time.Time{}, ctx.Err()
		case <-time.After(time.Until(obs.Add(period))):
		}
	}
}

// counters is one snapshot of everything a window's cost is computed from.
type counters struct {
	at       time.Time
	pg       pgStats
	etcd     etcdStats
	replicas map[string]replicaCounters
	simCPU   float64
	pgCPU    float64 // every postgres process on the machine
	ownCPU   float64 // this process: the embedded etcd, the scrapes
	tlsFull  float64 // agentsim's full TLS handshakes, all processes; -1: unknown
}

type replicaCounters struct {
	cpu          float64
	statements   float64
	writeTxns    float64
	active       float64 // active reconciles, any result
	recovered    float64 // snapshotting -> running transitions
	agentErrs    float64 // failed ListSandboxes calls
	hostErrs     float64 // active reconciles that failed in the database (result error)
	failedTxns   float64 // fenced write transactions that failed
	sessionsLost float64 // etcd sessions lost (keep-alives unacknowledged, lease expired)
	claims       float64 // shards acquired
}

// snapshot reads every counter. A replica whose scrape fails is missing
// from the map, and its figures with it.
func (c *cluster) snapshot(ctx context.Context, f *fleet) (counters, error) {
	s := counters{replicas: map[string]replicaCounters{}}
	scrapes, err := c.scrapeAll(ctx)
	if err != nil {
		return s, err
	}
	for _, r := range c.liveReplicas() {
		sc, ok := scrapes[r.id]
		if !ok {
			continue
		}
		r.readProc()
		r.mu.Lock()
		cpu := r.cpu
		r.mu.Unlock()
		s.replicas[r.id] = replicaCounters{
			cpu:          cpu,
			statements:   sc.sum(mStatements, nil),
			writeTxns:    sc.sum(mWriteTxns, nil),
			active:       sc.sum(mReconciles, map[string]string{"kind": "active"}),
			recovered:    sc.sum(mTransitions, map[string]string{"from": "snapshotting", "to": "running"}),
			agentErrs:    sc.sum(mAgentErrors, map[string]string{"procedure": "ListSandboxes"}),
			hostErrs:     sc.sum(mReconciles, map[string]string{"kind": "active", "result": "error"}),
			failedTxns:   sc.sum(mWriteTxns, map[string]string{"result": "failed"}),
			sessionsLost: sc.sum(mSessionLosses, nil),
			claims:       sc.sum(mAcquisitions, nil),
		}
	}
	for _, pid := range f.pids() {
		if v, err := procCPU(pid); err == nil {
			s.simCPU += v
		}
	}
	s.pgCPU = postgresCPU()
	if v, err := procCPU(os.Getpid()); err == nil {
		s.ownCPU = v
	}
	s.tlsFull = f.fullHandshakes(ctx)
	if s.pg, err = c.e.pgStats(ctx); err != nil {
		return s, err
	}
	if s.etcd, err = readEtcdStats(); err != nil {
		return s, err
	}
	s.at = time.Now()
	return s, nil
}

// delta is b − a, summed over the replicas present in both.
type delta struct {
	window       time.Duration
	pg           pgStats
	etcd         etcdStats
	cpu          float64
	simCPU       float64
	pgCPU        float64
	ownCPU       float64
	tlsFull      float64 // -1: unknown
	statements   float64
	writeTxns    float64
	active       float64
	recovered    float64
	agentErrs    float64
	hostErrs     float64
	failedTxns   float64
	sessionsLost float64
	claims       float64
	replicas     int
}

func (b counters) sub(a counters) delta {
	d := delta{window: b.at.Sub(a.at), pg: b.pg.sub(a.pg), etcd: b.etcd.sub(a.etcd), simCPU: b.simCPU - a.simCPU, pgCPU: b.pgCPU - a.pgCPU, ownCPU: b.ownCPU - a.ownCPU, tlsFull: -1}
	if a.tlsFull >= 0 && b.tlsFull >= 0 {
		d.tlsFull = b.tlsFull - a.tlsFull
	}
	for id, rb := range b.replicas {
		ra, ok := a.replicas[id]
		if !ok {
			continue
		}
		d.replicas++
		d.cpu += rb.cpu - ra.cpu
		d.statements += rb.statements - ra.statements
		d.writeTxns += rb.writeTxns - ra.writeTxns
		d.active += rb.active - ra.active
		d.recovered += rb.recovered - ra.recovered
		d.agentErrs += rb.agentErrs - ra.agentErrs
		d.hostErrs += rb.hostErrs - ra.hostErrs
		d.failedTxns += rb.failedTxns - ra.failedTxns
		d.sessionsLost += rb.sessionsLost - ra.sessionsLost
		d.claims += rb.claims - ra.claims
	}
	return d
}

// passCounter counts completed shard passes from the changes of each shard's
// last-pass timestamp between scrapes. Two passes of one shard between two
// scrapes count once, so the count is a lower bound.
type passCounter struct {
	mu    sync.Mutex
	last  map[int]float64
	count int
}

func newPassCounter() *passCounter { return &passCounter{last: map[int]float64{}} }

func (p *passCounter) observe(byShard map[int]float64) {
	p.mu.Lock()
	defer p.mu.Unlock()
	for s, v := range byShard {
		if old, ok := p.last[s]; ok && v != old {
			p.count++
		}
		p.last[s] = v
	}
}

func (p *passCounter) total() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.count
}

// countPasses starts (pc non-nil) or stops (nil) counting shard passes.
func (c *cluster) countPasses(pc *passCounter) {
	c.mu.Lock()
	c.passes = pc
	c.mu.Unlock()
}

// profile fetches a CPU profile of r over seconds.
// heap fetches the replica's heap profile.
func (r *replica) heap(ctx context.Context) ([]byte, error) {
	ctx, cancel := context.WithTimeout(ctx, 15*time.Second)
	defer cancel()
	code, body, err := httpGetLong(ctx, fmt.Sprintf("http://%s/debug/pprof/heap", r.admin))
	if err != nil {
		return nil, err
	}
	if code != 200 {
		return nil, fmt.Errorf("/debug/pprof/heap: %d %s", code, strings.TrimSpace(string(body)))
	}
	return body, nil
}

func (r *replica) profile(ctx context.Context, seconds int) ([]byte, error) {
	ctx, cancel := context.WithTimeout(ctx, time.Duration(seconds+15)*time.Second)
	defer cancel()
	code, body, err := httpGetLong(ctx, fmt.Sprintf("http://%s/debug/pprof/profile?seconds=%d", r.admin, seconds))
	if err != nil {
		return nil, err
	}
	if code != 200 {
		return nil, fmt.Errorf("/debug/pprof/profile: %d %s", code, strings.TrimSpace(string(body)))
	}
	return body, nil
}
