package monitor

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"sync"
	"time"

	"github.com/google/uuid"
	"github.com/hashicorp/go-hclog"
	"github.com/jackc/pgx/v5"

	"github.com/vigil-sh/vigil/shard"
	"github.com/vigil-sh/vigil/store"
)

// RunnerConfig configures a Runner.
type RunnerConfig struct {
	Replica string
	Shards  int
	// Interval is the active reconcile period: every host of an owned shard
	// is reconciled once per Interval, shards spread evenly across it.
	Interval time.Duration // default 30s
	// StaleScan is how often the replica looks for hosts with stale
	// heartbeats; a host is marked unreachable within UnreachableAfter +
	// StaleScan of its last heartbeat.
	StaleScan time.Duration // default 2s
	// HostRefresh is how often the host list (host -> shard, address) is
	// re-read.
	HostRefresh time.Duration // default 5s
	// WakeConcurrency bounds reconcile-on-reconnect work per shard.
	WakeConcurrency int // default 4
	Logger          hclog.Logger
}

func (c *RunnerConfig) validate() error {
	if c.Interval == 0 {
		c.Interval = 30 * time.Second
	}
	if c.StaleScan == 0 {
		c.StaleScan = 2 * time.Second
	}
	if c.HostRefresh == 0 {
		c.HostRefresh = 5 * time.Second
	}
	if c.WakeConcurrency == 0 {
		c.WakeConcurrency = 4
	}
	switch {
	case c.Replica == "":
		return errors.New("monitor: replica id is empty")
	case c.Shards < 1:
		return fmt.Errorf("monitor: shard count %d must be positive", c.Shards)
	case c.Interval < 100*time.Millisecond:
		return fmt.Errorf("monitor: --interval %s too short", c.Interval)
	case c.StaleScan < 10*time.Millisecond, c.HostRefresh < 10*time.Millisecond:
		return errors.New("monitor: scan periods too short")
	}
	if c.Logger == nil {
		c.Logger = hclog.NewNullLogger()
	}
	return nil
}

// Runner drives the reconcile for the shards this replica owns. Run does the
// replica-wide work (host list, stale-heartbeat scan, reconnect
// notifications); Own is called once per shard ownership with its fencing
// token and does that shard's work until its context ends.
type Runner struct {
	cfg RunnerConfig
	rec *Reconciler
	log hclog.Logger

	mu     sync.Mutex
	owned  map[int]*shardWork
	hosts  map[int][]uuid.UUID // shard -> hosts, from the last refresh
	listed bool
}

type shardWork struct {
	stale chan uuid.UUID // hosts to check passively
	wake  chan uuid.UUID // hosts to reconcile now
}

// NewRunner builds a Runner on a Reconciler.
func NewRunner(cfg RunnerConfig, rec *Reconciler) (*Runner, error) {
	if err := cfg.validate(); err != nil {
		return nil, err
	}
	return &Runner{cfg: cfg, rec: rec, log: cfg.Logger, owned: map[int]*shardWork{}, hosts: map[int][]uuid.UUID{}}, nil
}

// Run does the replica-wide work until ctx ends.
func (r *Runner) Run(ctx context.Context) error {
	var wg sync.WaitGroup
	wg.Add(3)
	go func() { defer wg.Done(); r.refreshLoop(ctx) }()
	go func() { defer wg.Done(); r.staleLoop(ctx) }()
	go func() { defer wg.Done(); r.listenLoop(ctx) }()
	wg.Wait()
	return nil
}

func (r *Runner) refreshLoop(ctx context.Context) {
	t := time.NewTicker(r.cfg.HostRefresh)
	defer t.Stop()
	for {
		if err := r.refreshHosts(ctx); err != nil && ctx.Err() == nil {
			r.log.Warn("reading hosts failed", "error", err)
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// refreshHosts re-reads every host and groups them by shard. Agent clients
// of hosts that disappeared or moved are dropped.
func (r *Runner) refreshHosts(ctx context.Context) error {
	hosts, err := r.rec.store.Hosts(ctx)
	if err != nil {
		return err
	}
	by := map[int][]uuid.UUID{}
	addrs := make(map[uuid.UUID]string, len(hosts))
	for _, h := range hosts {
		s := shard.Of(h.ID, r.cfg.Shards)
		by[s] = append(by[s], h.ID)
		addrs[h.ID] = h.Address
	}
	r.mu.Lock()
	r.hosts = by
	r.listed = true
	r.mu.Unlock()
	if p, ok := r.rec.agents.(interface{ Retain(map[uuid.UUID]string) }); ok {
		p.Retain(addrs)
	}
	return nil
}

func (r *Runner) staleLoop(ctx context.Context) {
	t := time.NewTicker(r.cfg.StaleScan)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		ids, err := r.staleHosts(ctx)
		if err != nil {
			if ctx.Err() == nil {
				r.log.Warn("stale-heartbeat scan failed", "error", err)
			}
			continue
		}
		for _, id := range ids {
			r.dispatch(id, func(w *shardWork) chan uuid.UUID { return w.stale })
		}
	}
}

// staleHosts lists hosts whose heartbeat looks stale by the database clock.
// It only picks candidates: MarkStale re-checks inside its UPDATE.
func (r *Runner) staleHosts(ctx context.Context) ([]uuid.UUID, error) {
	rows, err := r.rec.store.Pool().Query(ctx, `
		select id from hosts
		 where status <> 'unreachable'
		   and (last_heartbeat_at is null or last_heartbeat_at < now() - make_interval(secs => $1))`,
		r.rec.cfg.UnreachableAfter.Seconds())
	if err != nil {
		return nil, err
	}
	return pgx.CollectRows(rows, pgx.RowTo[uuid.UUID])
}

// listenLoop turns the reconnect trigger's notifications into immediate
// reconciles on the owning shard.
func (r *Runner) listenLoop(ctx context.Context) {
	for ctx.Err() == nil {
		err := r.listen(ctx)
		if ctx.Err() != nil {
			return
		}
		r.log.Warn("reconnect notifications interrupted; re-listening", "error", err)
		t := time.NewTimer(500 * time.Millisecond)
		select {
		case <-ctx.Done():
			t.Stop()
			return
		case <-t.C:
		}
	}
}

func (r *Runner) listen(ctx context.Context) error {
	conn, err := r.rec.store.Pool().Acquire(ctx)
	if err != nil {
		return err
	}
	// The connection carries LISTEN state: never return it to the pool.
	pc := conn.Hijack()
	defer pc.Close(context.Background())
	if _, err := pc.Exec(ctx, "listen vigil_host_online"); err != nil {
		return err
	}
	for {
		n, err := pc.WaitForNotification(ctx)
		if err != nil {
			return err
		}
		id, err := uuid.Parse(n.Payload)
		if err != nil {
			r.log.Warn("ignoring malformed reconnect notification", "payload", n.Payload)
			continue
		}
		r.dispatch(id, func(w *shardWork) chan uuid.UUID { return w.wake })
	}
}

func (r *Runner) dispatch(host uuid.UUID, ch func(*shardWork) chan uuid.UUID) {
	s := shard.Of(host, r.cfg.Shards)
	r.mu.Lock()
	w := r.owned[s]
	r.mu.Unlock()
	if w == nil {
		return // not ours
	}
	select {
	case ch(w) <- host:
	default:
		// Queue full: the periodic pass will cover it.
	}
}

// Owned lists shards whose work currently runs here (for tests and status).
func (r *Runner) shardHosts(s int) []uuid.UUID {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]uuid.UUID(nil), r.hosts[s]...)
}

// Own does one shard's work under token until ctx ends: it raises the
// shard's fence in Postgres, then marks stale hosts unreachable as the scan
// finds them, reconciles every host once per Interval (this shard's passes
// offset by its number so shards spread over the interval), and reconciles a
// host at once when it comes back online. It returns after all in-flight
// reconciles have stopped: nil when ctx ended, ErrFenced (wrapped) when a
// newer owner holds the shard.
func (r *Runner) Own(ctx context.Context, s int, token int64) error {
	f := store.Fence{Shard: s, Token: token, Replica: r.cfg.Replica}
	log := r.log.With("shard", s, "token", token)
	if err := r.raise(ctx, f); err != nil {
		if ctx.Err() != nil {
			return nil
		}
		return err
	}
	w := &shardWork{stale: make(chan uuid.UUID, 256), wake: make(chan uuid.UUID, 256)}
	r.mu.Lock()
	r.owned[s] = w
	r.mu.Unlock()
	label := strconv.Itoa(s)
	defer func() {
		r.mu.Lock()
		delete(r.owned, s)
		r.mu.Unlock()
		r.rec.m.lastSuccess.DeleteLabelValues(label)
	}()
	log.Debug("shard work started")

	wctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	var wg sync.WaitGroup
	defer wg.Wait()
	sem := make(chan struct{}, r.cfg.WakeConcurrency)
	fenced := func(err error) bool {
		if errors.Is(err, ErrFenced) {
			cancel(err)
			return true
		}
		return false
	}
	spawn := func(fn func(context.Context) error) {
		select {
		case sem <- struct{}{}:
		case <-wctx.Done():
			return
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			if err := fn(wctx); err != nil && !fenced(err) && wctx.Err() == nil {
				log.Warn("host reconcile failed", "error", err)
			}
		}()
	}

	// First pass after this shard's offset within the interval.
	offset := time.Duration(int64(r.cfg.Interval) * int64(s) / int64(r.cfg.Shards))
	next := time.NewTimer(offset)
	defer next.Stop()
	passDone := make(chan error, 1)
	passing := false
	for {
		select {
		case <-wctx.Done():
			wg.Wait()
			if passing {
				<-passDone
			}
			if cause := context.Cause(wctx); errors.Is(cause, ErrFenced) {
				log.Warn("shard fenced by a newer owner", "error", cause)
				return cause
			}
			return nil
		case h := <-w.stale:
			spawn(func(ctx context.Context) error { _, err := r.rec.MarkStale(ctx, f, h); return err })
		case h := <-w.wake:
			spawn(func(ctx context.Context) error {
				res, err := r.rec.MarkStale(ctx, f, h)
				if err == nil && !res.MarkedDown {
					_, err = r.rec.ReconcileHost(ctx, f, h)
				}
				return err
			})
		case <-next.C:
			if passing {
				next.Reset(r.cfg.Interval)
				continue
			}
			passing = true
			hosts := r.shardHosts(s)
			go func() {
				_, err := r.rec.ReconcileHosts(wctx, f, hosts)
				passDone <- err
			}()
			next.Reset(r.cfg.Interval)
		case err := <-passDone:
			passing = false
			if err == nil {
				r.rec.m.lastSuccess.WithLabelValues(label).Set(float64(time.Now().UnixNano()) / 1e9)
			} else {
				fenced(err)
			}
		}
	}
}

// raise raises the fence, retrying while Postgres is unreachable. A higher
// stored token is a loss.
func (r *Runner) raise(ctx context.Context, f store.Fence) error {
	delay := 100 * time.Millisecond
	for {
		err := r.rec.store.RaiseFence(ctx, f)
		if err == nil || errors.Is(err, ErrFenced) || ctx.Err() != nil {
			if errors.Is(err, ErrFenced) {
				r.rec.m.fenceRejections.Inc()
			}
			return err
		}
		r.log.Warn("raising shard fence failed; retrying", "shard", f.Shard, "error", err)
		t := time.NewTimer(delay)
		select {
		case <-ctx.Done():
			t.Stop()
			return ctx.Err()
		case <-t.C:
		}
		delay = min(2*delay, 2*time.Second)
	}
}
