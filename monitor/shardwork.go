package monitor

import (
	"context"
	"errors"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/google/uuid"
	"github.com/hashicorp/go-hclog"

	"github.com/vigil-sh/vigil/store"
)

// shardWork is one owned shard's scheduler. One goroutine (run) decides
// what runs when; passes run beside it, at most one of each kind:
//
//	full     every Interval, over every host of the shard
//	wake     at once, over hosts that just came back online (rule 8)
//	passive  at once, over hosts the stale scan found (rule 1)
//	trim     about hourly, the shard's old journal rows
//	relay    with events on: after writes, at the claim (a backlog left by
//	         the previous owner) and, while Redis fails, with backoff
//
// A host is in at most one active pass (full or wake) at a time (claims).
// The passive rule may run beside an active pass on the same host: every
// write of both is a compare-and-set, so the later one simply misses.
type shardWork struct {
	r   *Runner
	f   store.Fence
	log hclog.Logger

	stale     hostSet // from the stale scan
	wake      hostSet // from reconnect notifications, and hosts woken while busy
	claims    claims
	lag       *lagClock
	rl        *relayer    // nil: events off
	firstDone atomic.Bool // a full pass completed under this ownership
}

type passKind int

const (
	fullPass passKind = iota
	wakePass
	passivePass
	trimPass
	relayPass
	passKinds
)

func (k passKind) String() string {
	return [...]string{"full", "wake", "passive", "trim", "relay"}[k]
}

// passDone is a finished pass as the scheduler sees it.
type passDone struct {
	kind    passKind
	hosts   []uuid.UUID // full: every host the pass was given
	started time.Time   // when the pass began (local clock)
	out     []Outcome
	err     error
}

func newShardWork(r *Runner, f store.Fence) *shardWork {
	w := &shardWork{r: r, f: f, log: r.log.With("shard", f.Shard, "token", f.Token)}
	w.stale.init()
	w.wake.init()
	w.claims.busy, w.claims.again = map[uuid.UUID]bool{}, map[uuid.UUID]bool{}
	w.lag = newLagClock(r.rec.m, strconv.Itoa(f.Shard), 2*r.cfg.Interval, time.Now())
	if r.rec.pub != nil {
		w.rl = newRelayer()
	}
	return w
}

// run schedules the shard's passes until ctx ends or the fence is lost, and
// returns once every pass it started has returned.
func (w *shardWork) run(ctx context.Context) error {
	ctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	// At most one pass of each kind is in flight, so sends never block.
	done := make(chan passDone, passKinds)
	var running [passKinds]bool
	inFlight := func() int {
		n := 0
		for _, r := range running {
			if r {
				n++
			}
		}
		return n
	}
	start := func(k passKind, fn func() passDone) {
		running[k] = true
		go func() { done <- fn() }()
	}

	cfg := w.r.cfg
	// The first pass at once: the shard's hosts went unwatched through the
	// handover. Later ones at the shard's phase within the interval (its
	// share of it, counted from the Unix epoch, so every replica spreads
	// the same way), so a cold start does not keep all shards in step.
	phase := time.Duration(int64(cfg.Interval) * int64(w.f.Shard) / int64(cfg.Shards))
	full := time.NewTimer(0)
	defer full.Stop()
	trim := time.NewTicker(time.Hour)
	defer trim.Stop()
	fullDue, trimDue, relayDue := false, false, false
	var relayRetry <-chan time.Time
	var relayWake <-chan struct{}
	if w.rl != nil {
		relayWake, relayRetry = w.rl.poke, w.rl.retry.C
		defer w.rl.retry.Stop()
	}
	failing := false // the previous full pass had failures: log recovery
	for {
		select {
		case <-ctx.Done():
			for n := inFlight(); n > 0; n-- {
				<-done
			}
			if cause := context.Cause(ctx); errors.Is(cause, ErrFenced) {
				w.log.Warn("shard fenced by a newer owner", "error", cause)
				return cause
			}
			return nil
		case <-full.C:
			fullDue = true
		case <-trim.C:
			trimDue = cfg.JournalRetention > 0
		case <-w.stale.notify:
		case <-w.wake.notify:
		case <-relayWake:
			relayDue = true
		case <-relayRetry:
			relayDue = true
		case d := <-done:
			running[d.kind] = false
			if errors.Is(d.err, ErrFenced) {
				cancel(d.err)
				continue
			}
			failing = w.finished(d, failing)
		}
		if ctx.Err() != nil {
			continue
		}
		if fullDue && !running[fullPass] {
			fullDue = false
			full.Reset(untilPhase(time.Now(), cfg.Interval, phase))
			hosts := w.claims.take(w.r.shardHosts(w.f.Shard), false)
			start(fullPass, func() passDone { return w.active(ctx, fullPass, hosts) })
		}
		if !running[wakePass] {
			if hosts := w.claims.take(w.wake.takeAll(), true); len(hosts) > 0 {
				start(wakePass, func() passDone { return w.active(ctx, wakePass, hosts) })
			}
		}
		if !running[passivePass] {
			if hosts := w.stale.takeAll(); len(hosts) > 0 {
				start(passivePass, func() passDone {
					out, err := w.r.rec.MarkStale(ctx, w.f, hosts)
					return passDone{kind: passivePass, out: out, err: err}
				})
			}
		}
		if relayDue && !running[relayPass] {
			relayDue = false
			start(relayPass, func() passDone {
				return passDone{kind: relayPass, err: w.r.rec.relay(ctx, w.f, w.lag.label)}
			})
		}
		if trimDue && !running[trimPass] {
			trimDue = false
			start(trimPass, func() passDone {
				n, err := w.r.rec.store.TrimJournal(ctx, w.f, cfg.JournalRetention)
				if err == nil && n > 0 {
					w.log.Debug("journal trimmed", "rows", n)
				}
				return passDone{kind: trimPass, err: w.r.rec.fenced(err)}
			})
		}
	}
}

// untilPhase is the time from now to the next instant t with t ≡ phase
// (mod interval), counted from the Unix epoch; a full interval when now is
// such an instant.
func untilPhase(now time.Time, interval, phase time.Duration) time.Duration {
	since := (now.UnixNano() - int64(phase)) % int64(interval)
	if since < 0 {
		since += int64(interval)
	}
	return interval - time.Duration(since)
}

// active runs a full or wake pass over the claimed hosts, releasing each
// host as soon as the pass is done with it. The lag clock learns which
// hosts count from the read and each success as soon as it committed.
func (w *shardWork) active(ctx context.Context, k passKind, hosts []uuid.UUID) passDone {
	d := passDone{kind: k, hosts: hosts, started: time.Now()}
	p, err := w.r.rec.Read(ctx, w.f, hosts)
	if err != nil {
		w.release(hosts)
		d.err = err
		return d
	}
	w.release(p.NotAsked())
	w.lag.counting(p.Outcomes(), d.started)
	// Reconnects, and a new owner's first pass (its hosts went unwatched
	// through the handover), go ahead of the steady passes' queue.
	p.Urgent = k == wakePass || !w.firstDone.Load()
	p.Settled = w.lag.settled
	d.err = p.Run(ctx)
	w.release(p.Asked())
	d.out = p.Outcomes()
	return d
}

// release frees hosts from their pass; those woken meanwhile go to the next
// wake pass.
func (w *shardWork) release(hosts []uuid.UUID) {
	if again := w.claims.release(hosts); len(again) > 0 {
		w.wake.add(again...)
	}
}

// finished folds a pass's outcomes into the lag clock and logs what went
// wrong, once per change from healthy to failing and back.
func (w *shardWork) finished(d passDone, failing bool) bool {
	if d.kind == relayPass {
		was := w.rl.failing
		w.rl.done(d.err)
		switch {
		case w.rl.failing && !was:
			w.log.Warn("publishing events failed; they wait in the outbox, retrying", "error", d.err)
		case !w.rl.failing && was:
			w.log.Info("publishing events again")
		}
		return failing
	}
	if w.rl != nil && changed(d.out) {
		w.rl.wake()
	}
	if d.kind == trimPass {
		if d.err != nil && !errors.Is(d.err, context.Canceled) {
			w.log.Warn("journal trim failed", "error", d.err)
		}
		return failing
	}
	now := time.Now()
	w.lag.observe(d, now)
	if d.kind != fullPass {
		return failing
	}
	if d.err == nil && !w.firstDone.Swap(true) {
		w.log.Debug("first full pass done", "after", now.Sub(w.lag.claimed).Round(time.Millisecond), "hosts", len(d.hosts))
	}
	failed := 0
	var first error
	for _, o := range d.out {
		if o.Err != nil {
			failed++
			if first == nil {
				first = o.Err
			}
		}
	}
	if d.err != nil && first == nil {
		first, failed = d.err, len(d.hosts)
	}
	switch {
	case failed > 0 && !failing:
		w.log.Warn("shard pass failed for some hosts", "failed", failed, "hosts", len(d.hosts), "error", first)
	case failed > 0:
		w.log.Debug("shard pass failed for some hosts", "failed", failed, "hosts", len(d.hosts), "error", first)
	case failing:
		w.log.Info("shard pass healthy again", "hosts", len(d.hosts))
	}
	return failed > 0
}

// changed reports whether any outcome wrote something (and so may have
// written events).
func changed(out []Outcome) bool {
	for _, o := range out {
		if o.MarkedDown || len(o.Applied) > 0 {
			return true
		}
	}
	return false
}

// hostSet is a set of hosts with a coalescing notification: adds never
// block, bursts become one wake-up of the scheduler.
type hostSet struct {
	mu     sync.Mutex
	set    map[uuid.UUID]bool
	notify chan struct{} // capacity 1: one pending wake-up stands for any number of adds
}

func (q *hostSet) init() {
	q.set = map[uuid.UUID]bool{}
	q.notify = make(chan struct{}, 1)
}

func (q *hostSet) add(ids ...uuid.UUID) {
	q.mu.Lock()
	for _, id := range ids {
		q.set[id] = true
	}
	q.mu.Unlock()
	select {
	case q.notify <- struct{}{}:
	default:
	}
}

func (q *hostSet) takeAll() []uuid.UUID {
	q.mu.Lock()
	defer q.mu.Unlock()
	out := make([]uuid.UUID, 0, len(q.set))
	for id := range q.set {
		out = append(out, id)
	}
	clear(q.set)
	return out
}

// claims keeps each host in at most one active pass.
type claims struct {
	mu    sync.Mutex
	busy  map[uuid.UUID]bool
	again map[uuid.UUID]bool // asked for while busy: run again once released
}

// take claims the hosts that are free and returns them. With again, busy
// ones are remembered and come back from release.
func (c *claims) take(hosts []uuid.UUID, again bool) []uuid.UUID {
	c.mu.Lock()
	defer c.mu.Unlock()
	out := hosts[:0:0]
	for _, h := range hosts {
		switch {
		case !c.busy[h]:
			c.busy[h] = true
			out = append(out, h)
		case again:
			c.again[h] = true
		}
	}
	return out
}

// release frees hosts and returns those asked for while they were busy.
func (c *claims) release(hosts []uuid.UUID) []uuid.UUID {
	c.mu.Lock()
	defer c.mu.Unlock()
	var again []uuid.UUID
	for _, h := range hosts {
		delete(c.busy, h)
		if c.again[h] {
			delete(c.again, h)
			again = append(again, h)
		}
	}
	return again
}

// lagClock is the shard's reconcile lag (SPEC §5): for every online host with
// an address, when it was last reconciled successfully (its agent answered
// and every write committed). A host's clock starts when it starts counting:
// at the claim for a new owner, at the pass that first saw it online
// otherwise. Passes update it as hosts settle, so the gauges follow the
// reconciles themselves, not the ends of passes.
type lagClock struct {
	m        *metrics
	label    string
	blindAge time.Duration
	claimed  time.Time

	mu       sync.Mutex
	lastPass time.Time               // last completed full pass; zero before the first
	since    map[uuid.UUID]time.Time // counted hosts -> last success
}

func newLagClock(m *metrics, label string, blindAge time.Duration, claimed time.Time) *lagClock {
	c := &lagClock{m: m, label: label, blindAge: blindAge, claimed: claimed, since: map[uuid.UUID]time.Time{}}
	c.publish(claimed)
	return c
}

// counting takes a pass's read: hosts online with an address count (their
// clock starts at the pass's start if it was not running), the others stop.
func (c *lagClock) counting(out []Outcome, started time.Time) {
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, o := range out {
		if !o.Counted {
			delete(c.since, o.Host)
			continue
		}
		if _, ok := c.since[o.Host]; !ok {
			c.since[o.Host] = later(started, c.claimed)
		}
	}
	c.publish(time.Now())
}

// settled takes hosts whose reconcile ended: successes move their clock.
func (c *lagClock) settled(out []Outcome) {
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, o := range out {
		if t, ok := c.since[o.Host]; ok && !o.Done.IsZero() {
			c.since[o.Host] = later(o.Done, t)
		}
	}
	c.publish(time.Now())
}

// observe folds in a finished pass: hosts the passive rule marked down stop
// counting; a full pass drops hosts that left the shard and sets lastPass.
func (c *lagClock) observe(d passDone, now time.Time) {
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, o := range d.out {
		if o.MarkedDown {
			delete(c.since, o.Host)
		}
	}
	if d.kind == fullPass && d.err == nil {
		in := make(map[uuid.UUID]bool, len(d.hosts))
		for _, h := range d.hosts {
			in[h] = true
		}
		for h := range c.since {
			if !in[h] {
				delete(c.since, h)
			}
		}
		c.lastPass = now
	}
	c.publish(now)
}

// publish sets the shard's gauges; c.mu must be held.
func (c *lagClock) publish(now time.Time) {
	oldest := c.lastPass
	if oldest.IsZero() {
		oldest = c.claimed
	}
	blind := 0
	first := true
	for _, t := range c.since {
		if first || t.Before(oldest) {
			oldest, first = t, false
		}
		if now.Sub(t) > c.blindAge {
			blind++
		}
	}
	c.m.lastSuccess.WithLabelValues(c.label).Set(unix(oldest))
	c.m.blindHosts.WithLabelValues(c.label).Set(float64(blind))
	c.m.shardHosts.WithLabelValues(c.label).Set(float64(len(c.since)))
	if !c.lastPass.IsZero() {
		c.m.lastPass.WithLabelValues(c.label).Set(unix(c.lastPass))
	}
}

// forget removes the shard's series: they are exported by the owner only.
func (c *lagClock) forget() {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.m.eventsPending.DeleteLabelValues(c.label)
	c.m.eventsOldest.Delete(c.label)
	c.m.lastSuccess.DeleteLabelValues(c.label)
	c.m.lastPass.DeleteLabelValues(c.label)
	c.m.blindHosts.DeleteLabelValues(c.label)
	c.m.shardHosts.DeleteLabelValues(c.label)
}

func later(a, b time.Time) time.Time {
	if a.After(b) {
		return a
	}
	return b
}

func unix(t time.Time) float64 { return float64(t.UnixNano()) / 1e9 }
