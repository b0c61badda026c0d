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

	"github.com/vigil-sh/vigil/internal/logval"
	"github.com/vigil-sh/vigil/internal/trigger"
	"github.com/vigil-sh/vigil/store"
)

// shardWork is one owned shard's scheduler. One goroutine (run) decides
// what runs when; passes run beside it, at most one of each kind:
//
//	full       every Interval, over every host of the shard
//	reconnect  at once, over hosts that just came back online (rule 8)
//	passive    at once, over hosts the stale scan found (rule 1)
//	trim       the shard's old journal rows, at the shard's phase of
//	           trimPeriod counted from the Unix epoch (so whoever owns the
//	           shard then trims it, however often it moves)
//	relay      with events on: after writes, at the claim (a backlog left by
//	           the previous owner) and, while Redis fails, with backoff
//
// A host is in at most one active pass (full or reconnect) at a time
// (claims). The passive rule may run beside an active pass on the same
// host: every write of both is a compare-and-set, so the later one simply
// misses.
type shardWork struct {
	r   *Runner
	f   store.Fence
	log hclog.Logger

	stale      hostSet // from the stale scan
	reconnects hostSet // from reconnect notifications, and hosts asked for while busy
	claims     claims
	lag        *lagClock
	rl         *relayer    // nil: events off
	firstDone  atomic.Bool // a full pass completed under this ownership

	// The scheduler's state: run's goroutine only.
	running [passKinds]bool
	due     [passKinds]bool // full, trim and relay: their time has come
	// done receives each pass's end. At most one pass of each kind is in
	// flight, so its passKinds slots mean a pass never blocks on sending.
	done    chan passDone
	failing bool          // the previous full pass had failures: log recovery
	full    *time.Timer   // the next full pass's time
	phase   time.Duration // the shard's place within the interval
}

type passKind int

const (
	fullPass passKind = iota
	reconnectPass
	passivePass
	trimPass
	relayPass
	passKinds
)

func (k passKind) String() string {
	return [...]string{"full", "reconnect", "passive", "trim", "relay"}[k]
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
	w := &shardWork{r: r, f: f, log: r.log.With("shard", f.Shard, "token", f.Token), done: make(chan passDone, passKinds)}
	w.stale.init()
	w.reconnects.init()
	w.claims.busy, w.claims.again = map[uuid.UUID]bool{}, map[uuid.UUID]bool{}
	w.lag = newLagClock(r.rec.m, strconv.Itoa(f.Shard), 2*r.cfg.Interval, time.Now())
	if r.rec.pub != nil {
		w.rl = newRelayer()
	}
	return w
}

// run schedules the shard's passes until ctx ends or the fence is lost, and
// returns once every pass it started has returned: nil when ctx ended,
// ErrFenced (wrapped) when a newer owner holds the shard.
func (w *shardWork) run(ctx context.Context) error {
	ctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	cfg := w.r.cfg
	// The first pass at once: the shard's hosts went unwatched through the
	// handover. Later ones at the shard's phase within the interval (its
	// share of it, counted from the Unix epoch, so every replica spreads
	// the same way), so a cold start does not keep all shards in step.
	w.phase = time.Duration(int64(cfg.Interval) * int64(w.f.Shard) / int64(cfg.Shards))
	w.full = time.NewTimer(0)
	defer w.full.Stop()
	trimEvery := trimPeriod(cfg.JournalRetention)
	trimPhase := time.Duration(int64(trimEvery) * int64(w.f.Shard) / int64(cfg.Shards))
	trim := time.NewTimer(untilPhase(time.Now(), trimEvery, trimPhase))
	defer trim.Stop()
	relayWake, relayRetry := w.relayChannels()
	for {
		select {
		case <-ctx.Done():
			return w.drain(ctx)
		case <-w.full.C:
			w.due[fullPass] = true
		case <-trim.C:
			w.due[trimPass] = cfg.JournalRetention > 0
			trim.Reset(untilPhase(time.Now(), trimEvery, trimPhase))
		case <-w.stale.trig.C():
		case <-w.reconnects.trig.C():
		case <-relayWake:
			w.due[relayPass] = true
		case <-relayRetry:
			w.due[relayPass] = true
		case d := <-w.done:
			w.running[d.kind] = false
			if errors.Is(d.err, ErrFenced) {
				cancel(d.err)
				continue
			}
			w.finished(d)
		}
		if ctx.Err() == nil {
			w.startDue(ctx)
		}
	}
}

// relayChannels are the relay's wake-ups; nil (never ready) with events off.
func (w *shardWork) relayChannels() (<-chan struct{}, <-chan time.Time) {
	if w.rl == nil {
		return nil, nil
	}
	return w.rl.trig.C(), w.rl.retry.C
}

// drain waits for the passes in flight after ctx ended.
func (w *shardWork) drain(ctx context.Context) error {
	for _, running := range w.running {
		if running {
			<-w.done
		}
	}
	if w.rl != nil {
		w.rl.retry.Stop()
	}
	if cause := context.Cause(ctx); errors.Is(cause, ErrFenced) {
		w.log.Warn("shard fenced by a newer owner", "error", logval.Err(cause))
		return cause
	}
	return nil
}

// startDue starts every pass whose time has come and whose kind is not
// running.
func (w *shardWork) startDue(ctx context.Context) {
	if w.due[fullPass] && !w.running[fullPass] {
		w.due[fullPass] = false
		w.full.Reset(untilPhase(time.Now(), w.r.cfg.Interval, w.phase))
		hosts := w.claims.take(w.r.shardHosts(w.f.Shard), false)
		w.start(fullPass, func() passDone { return w.active(ctx, fullPass, hosts) })
	}
	if !w.running[reconnectPass] {
		if hosts := w.claims.take(w.reconnects.takeAll(), true); len(hosts) > 0 {
			w.start(reconnectPass, func() passDone { return w.active(ctx, reconnectPass, hosts) })
		}
	}
	if !w.running[passivePass] {
		if hosts := w.stale.takeAll(); len(hosts) > 0 {
			w.start(passivePass, func() passDone { return w.passive(ctx, hosts) })
		}
	}
	if w.due[relayPass] && !w.running[relayPass] {
		w.due[relayPass] = false
		w.start(relayPass, func() passDone { return passDone{kind: relayPass, err: w.r.rec.relay(ctx, w.f, w.lag.label)} })
	}
	if w.due[trimPass] && !w.running[trimPass] {
		w.due[trimPass] = false
		w.start(trimPass, func() passDone { return w.trim(ctx) })
	}
}

// start runs a pass beside the scheduler.
func (w *shardWork) start(k passKind, pass func() passDone) {
	w.running[k] = true
	go func() { w.done <- pass() }()
}

// trimPeriod is how often a shard's journal is trimmed: hourly, or a
// quarter of a retention shorter than four hours (at least a minute).
func trimPeriod(retention time.Duration) time.Duration {
	return min(time.Hour, max(retention/4, time.Minute))
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

// passive runs the passive rule over the hosts the stale scan found.
func (w *shardWork) passive(ctx context.Context, hosts []uuid.UUID) passDone {
	out, err := w.r.rec.Passive(ctx, w.f, hosts)
	return passDone{kind: passivePass, out: out, err: err}
}

// trim deletes the shard's journal rows past the retention.
func (w *shardWork) trim(ctx context.Context) passDone {
	n, err := w.r.rec.trimJournal(ctx, w.f, w.r.cfg.JournalRetention)
	if err == nil && n > 0 {
		w.log.Debug("journal trimmed", "rows", n)
	}
	return passDone{kind: trimPass, err: err}
}

// active runs a full or reconnect pass over the claimed hosts, releasing each
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
	p.Urgent = k == reconnectPass || !w.firstDone.Load()
	p.Settled = w.lag.settled
	d.err = p.Run(ctx)
	w.release(p.Asked())
	d.out = p.Outcomes()
	return d
}

// release frees hosts from their pass; those asked for meanwhile go to the
// next reconnect pass.
func (w *shardWork) release(hosts []uuid.UUID) {
	if again := w.claims.release(hosts); len(again) > 0 {
		w.reconnects.add(again...)
	}
}

// finished folds a pass's outcomes into the lag clock and the relay's
// schedule, and logs what went wrong, once per change from healthy to
// failing and back.
func (w *shardWork) finished(d passDone) {
	switch {
	case d.kind == relayPass:
		w.relayed(d.err)
		return
	case w.rl != nil && changed(d.out):
		w.rl.trig.Fire()
	}
	if d.kind == trimPass {
		if d.err != nil && !errors.Is(d.err, context.Canceled) {
			w.log.Warn("journal trim failed", "error", logval.Err(d.err))
		}
		return
	}
	now := time.Now()
	w.lag.observe(d, now)
	if d.kind != fullPass {
		return
	}
	if d.err == nil && !w.firstDone.Swap(true) {
		w.log.Debug("first full pass done", "after", now.Sub(w.lag.claimed).Round(time.Millisecond), "hosts", len(d.hosts))
	}
	w.logHealth(d)
}

// relayed schedules the relay's next run after one ended with err.
func (w *shardWork) relayed(err error) {
	was := w.rl.failing
	w.rl.done(err)
	switch {
	case w.rl.failing && !was:
		w.log.Warn("publishing events failed; they wait in the outbox, retrying", "error", logval.Err(err))
	case !w.rl.failing && was:
		w.log.Info("publishing events again")
	}
}

// logHealth logs a full pass's failures when they begin (later ones at
// debug) and its recovery.
func (w *shardWork) logHealth(d passDone) {
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
	// The error may quote an agent's answer or a database value: bounded.
	switch {
	case failed > 0 && !w.failing:
		w.log.Warn("shard pass failed for some hosts", "failed", failed, "hosts", len(d.hosts), "error", logval.Err(first))
	case failed > 0:
		w.log.Debug("shard pass failed for some hosts", "failed", failed, "hosts", len(d.hosts), "error", logval.Err(first))
	case w.failing:
		w.log.Info("shard pass healthy again", "hosts", len(d.hosts))
	}
	w.failing = failed > 0
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

// hostSet is a set of hosts with a coalescing trigger: adds never block,
// bursts become one wake-up of the scheduler. Its mutex guards the set.
type hostSet struct {
	mu   sync.Mutex
	set  map[uuid.UUID]bool
	trig *trigger.T
}

func (q *hostSet) init() {
	q.set = map[uuid.UUID]bool{}
	q.trig = trigger.New()
}

func (q *hostSet) add(ids ...uuid.UUID) {
	q.mu.Lock()
	for _, id := range ids {
		q.set[id] = true
	}
	q.mu.Unlock()
	q.trig.Fire()
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
