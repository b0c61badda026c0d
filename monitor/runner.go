package monitor

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/google/uuid"
	"github.com/hashicorp/go-hclog"

	"github.com/vigil-sh/vigil/internal/logval"
	"github.com/vigil-sh/vigil/shard"
	"github.com/vigil-sh/vigil/store"
)

// RunnerConfig configures a Runner.
type RunnerConfig struct {
	Replica string
	Shards  int
	// Interval is the active reconcile period: every host of an owned shard
	// is reconciled once per Interval, shards spread evenly across it.
	Interval time.Duration // default DefaultInterval
	// StaleScan is how often the replica looks for hosts with stale
	// heartbeats; a host is marked unreachable within UnreachableAfter +
	// StaleScan of its last heartbeat.
	StaleScan time.Duration // default DefaultStaleScan
	// HostRefresh is how often the host list (which hosts exist, hence
	// which belong to each shard) is re-read.
	HostRefresh time.Duration // default DefaultHostRefresh
	// JournalRetention is how long an owner keeps its shards' journal rows;
	// older ones are trimmed about once an hour. Zero keeps them forever.
	JournalRetention time.Duration
	Logger           hclog.Logger
}

// Defaults of RunnerConfig's zero fields (the flags of `vigil run` use them
// too).
const (
	DefaultInterval         = 30 * time.Second
	DefaultStaleScan        = 2 * time.Second
	DefaultHostRefresh      = 5 * time.Second
	DefaultJournalRetention = 24 * time.Hour
)

func (c *RunnerConfig) validate() error {
	if c.Interval == 0 {
		c.Interval = DefaultInterval
	}
	if c.StaleScan == 0 {
		c.StaleScan = DefaultStaleScan
	}
	if c.HostRefresh == 0 {
		c.HostRefresh = DefaultHostRefresh
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
	case c.JournalRetention < 0:
		return fmt.Errorf("monitor: journal retention %s must not be negative", c.JournalRetention)
	}
	if c.Logger == nil {
		c.Logger = hclog.NewNullLogger()
	}
	return nil
}

// Runner drives the reconcile for the shards this replica owns. Run does the
// replica-wide work (host list, stale-heartbeat scan, reconnect
// notifications); Own is called once per shard ownership with its fencing
// token and schedules that shard's passes until its context ends.
type Runner struct {
	cfg    RunnerConfig
	rec    *Reconciler
	source HostSource
	log    hclog.Logger

	listed     chan struct{} // closed once the host list was read
	listedOnce sync.Once

	hosts atomic.Pointer[map[int][]uuid.UUID] // shard -> hosts, from the last refresh; replaced whole

	mu    sync.Mutex // guards owned
	owned map[int]*shardWork
}

// NewRunner builds a Runner on a Reconciler, learning the hosts from source.
func NewRunner(cfg RunnerConfig, rec *Reconciler, source HostSource) (*Runner, error) {
	if err := cfg.validate(); err != nil {
		return nil, err
	}
	r := &Runner{cfg: cfg, rec: rec, source: source, log: cfg.Logger, listed: make(chan struct{}), owned: map[int]*shardWork{}}
	r.hosts.Store(&map[int][]uuid.UUID{})
	return r, nil
}

// Run does the replica-wide work until ctx ends, then returns once its
// loops have stopped.
func (r *Runner) Run(ctx context.Context) {
	var wg sync.WaitGroup
	wg.Go(func() { r.refreshLoop(ctx) })
	wg.Go(func() { r.staleLoop(ctx) })
	wg.Go(func() { r.listenLoop(ctx) })
	wg.Wait()
}

func (r *Runner) refreshLoop(ctx context.Context) {
	t := time.NewTicker(r.cfg.HostRefresh)
	defer t.Stop()
	for {
		if err := r.refreshHosts(ctx); err != nil && ctx.Err() == nil {
			r.log.Warn("reading hosts failed", "error", logval.Err(err))
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// refreshHosts re-reads the host ids and groups them by shard.
func (r *Runner) refreshHosts(ctx context.Context) error {
	hosts, err := r.source.HostIDs(ctx)
	if err != nil {
		return err
	}
	by := map[int][]uuid.UUID{}
	for _, h := range hosts {
		s := shard.Of(h, r.cfg.Shards)
		by[s] = append(by[s], h)
	}
	r.hosts.Store(&by)
	r.listedOnce.Do(func() { close(r.listed) })
	return nil
}

func (r *Runner) shardHosts(s int) []uuid.UUID {
	return slices.Clone((*r.hosts.Load())[s])
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
		ids, err := r.source.StaleHosts(ctx, r.rec.cfg.UnreachableAfter)
		if err != nil {
			if ctx.Err() == nil {
				r.log.Warn("stale-heartbeat scan failed", "error", logval.Err(err))
			}
			continue
		}
		for _, id := range ids {
			if w := r.work(id); w != nil {
				w.stale.add(id)
			}
		}
	}
}

// listenLoop turns the reconnect trigger's notifications into immediate
// reconciles on the owning shard.
func (r *Runner) listenLoop(ctx context.Context) {
	for ctx.Err() == nil {
		err := r.source.ListenHostOnline(ctx, func(id uuid.UUID, err error) {
			if err != nil {
				r.log.Warn("ignoring reconnect notification", "error", logval.Err(err)) // quotes the payload
				return
			}
			if w := r.work(id); w != nil {
				w.reconnects.add(id)
			}
		})
		if ctx.Err() != nil {
			return
		}
		r.log.Warn("reconnect notifications interrupted; re-listening", "error", logval.Err(err))
		t := time.NewTimer(500 * time.Millisecond)
		select {
		case <-ctx.Done():
			t.Stop()
			return
		case <-t.C:
		}
	}
}

// work is the shard work of host's shard, nil when this replica does not
// own it.
func (r *Runner) work(host uuid.UUID) *shardWork {
	s := shard.Of(host, r.cfg.Shards)
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.owned[s]
}

// Own does one shard's work under token until ctx ends: it raises the
// shard's fence in Postgres, waits for the first host list, then runs a full
// pass every Interval (offset by the shard's number so shards spread over
// the interval), marks hosts unreachable as the stale scan finds them, and
// reconciles a host at once when it comes back online. It returns after
// every pass has stopped: nil when ctx ended, ErrFenced (wrapped) when a
// newer owner holds the shard.
func (r *Runner) Own(ctx context.Context, s int, token int64) error {
	f := store.Fence{Shard: s, Token: token, Replica: r.cfg.Replica}
	if err := r.raise(ctx, f); err != nil {
		if ctx.Err() != nil {
			return nil
		}
		return err
	}
	w := newShardWork(r, f)
	r.mu.Lock()
	r.owned[s] = w
	r.mu.Unlock()
	defer func() {
		r.mu.Lock()
		delete(r.owned, s)
		r.mu.Unlock()
		w.lag.forget()
	}()
	select {
	case <-r.listed:
	case <-ctx.Done():
		return nil
	}
	return w.run(ctx)
}

// raise raises the fence, retrying while Postgres is unreachable. A higher
// stored token is a loss.
func (r *Runner) raise(ctx context.Context, f store.Fence) error {
	delay := 100 * time.Millisecond
	for {
		err := r.rec.raiseFence(ctx, f)
		if err == nil || errors.Is(err, ErrFenced) || ctx.Err() != nil {
			return r.rec.fenced(err)
		}
		r.log.Warn("raising shard fence failed; retrying", "shard", f.Shard, "error", logval.Err(err))
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
