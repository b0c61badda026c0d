package monitor

import (
	"context"
	"errors"
	"strings"
	"time"

	"github.com/vigil-sh/vigil/events"
	"github.com/vigil-sh/vigil/internal/logval"
	"github.com/vigil-sh/vigil/internal/trigger"
	"github.com/vigil-sh/vigil/store"
)

// Publisher is where the shard owners' events go (events.Publisher). Publish
// appends a batch in order, each event at most once by its ID, and returns
// how many were new; on error the whole batch is published again later.
type Publisher interface {
	Publish(ctx context.Context, evs []events.Event) (int, error)
}

// afterPublish runs after Redis acknowledged a batch and before its outbox
// rows are deleted. Only a test build sets it (testhooks.go), to kill the
// process exactly there.
var afterPublish func(evs []events.Event)

// relayBackoff bounds the relay's retry delay while Redis fails.
const (
	relayBackoffMin = 100 * time.Millisecond
	relayBackoffMax = 10 * time.Second
)

// relay publishes the shard's pending events in commit order until none is
// left, deleting each batch once Redis acknowledged it. It returns nil when
// the outbox is empty, the publish error when Redis failed (the events stay
// pending, to be published again in the same order), ErrFenced when the
// shard is lost. It sets the shard's pending and oldest-age gauges as it
// goes.
func (r *Reconciler) relay(ctx context.Context, f store.Fence, label string) error {
	total := -1 // counted on the first read only: a count scans the whole backlog
	for {
		pend, n, err := r.outbox.PendingEvents(ctx, f.Shard, r.cfg.RelayBatch, total < 0, events.LegacyNames)
		if err != nil {
			return err
		}
		if total < 0 {
			total = max(n, 0)
		}
		total = max(total, len(pend)) // events committed since the count
		r.m.eventsPending.WithLabelValues(label).Set(float64(total))
		if len(pend) == 0 {
			r.m.eventsOldest.Set(label, time.Time{})
			return nil
		}
		r.m.eventsOldest.Set(label, pend[0].CreatedAt)
		evs := make([]events.Event, len(pend))
		seqs := make([]int64, len(pend))
		for i, p := range pend {
			evs[i] = events.Event{ID: p.Event.ID, Name: p.Event.Name, Payload: p.Event.Payload}
			if events.Legacy(p.Event.Name) {
				evs[i] = r.upgrade(p)
			}
			seqs[i] = p.Seq
		}
		if _, err := r.pub.Publish(ctx, evs); err != nil {
			if ctx.Err() == nil {
				r.m.publishErrors.Inc()
			}
			return err
		}
		for _, e := range evs {
			r.m.published.WithLabelValues(e.Name).Inc()
		}
		if afterPublish != nil {
			afterPublish(evs)
		}
		if err := r.outbox.DeleteEvents(ctx, f, seqs); err != nil {
			return r.fenced(err)
		}
		total -= len(pend)
		if len(pend) < r.cfg.RelayBatch {
			r.m.eventsPending.WithLabelValues(label).Set(0)
			r.m.eventsOldest.Set(label, time.Time{})
			return nil
		}
	}
}

// relayer is a shard's relay schedule: run when triggered (writes that may
// have made events, a new ownership's backlog) and, while Redis fails, again
// after a growing delay. Only the shard's scheduler goroutine uses it.
type relayer struct {
	trig    *trigger.T
	retry   *time.Timer
	backoff time.Duration
	failing bool
}

// newRelayer returns a relayer whose first run is due: the previous owner
// may have left a backlog.
func newRelayer() *relayer {
	t := time.NewTimer(time.Hour)
	t.Stop()
	rl := &relayer{trig: trigger.New(), retry: t}
	rl.trig.Fire()
	return rl
}

// done schedules the next run after one ended with err.
func (rl *relayer) done(err error) {
	if err == nil || errors.Is(err, ErrFenced) || errors.Is(err, context.Canceled) {
		rl.backoff, rl.failing = 0, false
		return
	}
	rl.failing = true
	rl.backoff = min(max(2*rl.backoff, relayBackoffMin), relayBackoffMax)
	rl.retry.Reset(rl.backoff)
}

// upgrade is an event an earlier version left pending, in this version's
// shape (SPEC §6), its reason taken from its change: none is lost, none
// published twice (its vigil_id is kept), none published in a shape the
// control plane's dispatcher drops.
func (r *Reconciler) upgrade(p store.PendingEvent) events.Event {
	reason := legacyReason(p.Legacy)
	up, err := events.Upgrade(p.Event.Payload, reason)
	if err != nil {
		// err quotes the payload, a database value: bounded.
		r.log.Error("an earlier version's pending event cannot be read; publishing it as it is", "vigil_id", p.Event.ID, "error", logval.Err(err))
		return events.Event{ID: p.Event.ID, Name: p.Event.Name, Payload: p.Event.Payload}
	}
	if reason == "" {
		r.log.Warn("an earlier version's pending event has no change on record; published without a reason", "vigil_id", p.Event.ID, "event", logval.String(up.Event))
	}
	return events.Event{ID: p.Event.ID, Name: up.Event, Payload: up.Encode()}
}

// legacyReason is the reason of the change behind an earlier version's
// event, from what PendingEvent.Legacy found: the journal's change (each
// maps to one rule), or the audit row's reason.
func legacyReason(found string) string {
	if r, ok := strings.CutPrefix(found, "reason:"); ok {
		return r
	}
	switch found {
	case "missing->paused":
		return "restored_after_host_recovery"
	case "running->paused":
		return "host_state_sync"
	case "pausing->paused", "stopping->stopped":
		return "transient_timeout_inferred"
	case "missing->stopped", "running->stopped":
		return "orphaned"
	case "destroyed_on_agent":
		return "paused_zombie_cleanup"
	}
	return ""
}
