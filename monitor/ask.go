package monitor

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"time"

	hostagentv1 "github.com/vigil-sh/vigil/proto/hostagent/v1"
)

// answer is one agent's reply to ListSandboxes.
type answer struct {
	t     int // index into the pass's outcomes
	resp  *hostagentv1.ListSandboxesResponse
	err   error
	start time.Time
}

// ask queues every target's call at once and settles the answers in batches
// as they arrive: a batch goes on after ApplyLinger, or when every answer is
// in. When ctx ends, calls not started yet are abandoned and only those in
// flight (which the cancellation aborts) are waited for. A fence rejection
// cancels the rest of the pass.
func (p *Pass) ask(ctx context.Context) error {
	n := len(p.targets)
	if n == 0 {
		return nil
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	answers, queued := p.submit(ctx)
	c := &collector{p: p, cancel: cancel}
	defer c.stopLinger()
	done := ctx.Done()
	for got := 0; got < n; {
		select {
		case a := <-answers:
			got++
			c.take(ctx, a)
		case <-c.lingerC:
			c.flush(ctx)
		case <-done:
			done = nil
			got += c.abandon(ctx, queued)
		}
	}
	c.flush(ctx)
	return cmp.Or(c.lost, ctx.Err())
}

// submit queues the targets' calls on the pass's lane. Each answer lands in
// the returned channel, which has one buffered slot per target: every call
// finds room for its answer, so no worker ever blocks on a pass that stopped
// listening.
func (p *Pass) submit(ctx context.Context) (<-chan answer, []*queuedCall) {
	answers := make(chan answer, len(p.targets))
	lane := laneNormal
	if p.Urgent {
		lane = laneUrgent
	}
	queued := make([]*queuedCall, len(p.targets))
	for i, t := range p.targets {
		h := p.out[t].Host
		queued[i] = p.r.calls.submit(lane, func() {
			if err := ctx.Err(); err != nil {
				answers <- answer{t: t, err: err}
				return
			}
			start := time.Now()
			resp, err := p.r.agents.ListSandboxes(ctx, h, p.addr[h])
			answers <- answer{t: t, resp: resp, err: err, start: start}
		})
	}
	return answers, queued
}

// collector is ask's state: the batch of answers waiting for their linger,
// and why the pass stopped applying. Only ask's goroutine uses it.
type collector struct {
	p       *Pass
	cancel  context.CancelFunc
	batch   []answer
	linger  *time.Timer
	lingerC <-chan time.Time // nil while no batch waits
	lost    error            // the fence rejection that ended the pass
	stopped bool             // ctx ended: queued calls abandoned
}

// take settles a failed call at once and adds an answer to the batch,
// starting the linger with the batch's first.
func (c *collector) take(ctx context.Context, a answer) {
	o := &c.p.out[a.t]
	o.start = a.start
	switch {
	case a.err != nil && ctx.Err() != nil:
		// The pass is ending (shutdown, handover, fence): not the agent's fault.
		o.fail(cmp.Or(c.lost, ctx.Err()))
		c.p.settled([]answer{a})
	case a.err != nil:
		// The agent could not be asked: it refused, hung or answered
		// garbage, or the pool refused its host's address before any dial
		// (agentpool.ErrBadAddress: not host:port, too long, ...). Either
		// way nothing is known of its sandboxes, so none is touched: the
		// rules act on an agent's answer only, and a host that is really
		// gone is the passive rule's, by its heartbeat (SPEC §2). The host
		// keeps counting for the shard's lag with its clock stopped (SPEC
		// §5): an online host vigil cannot see shows as blind, whatever
		// the reason.
		o.fail(fmt.Errorf("%w: %w", errAgent, a.err))
		c.p.settled([]answer{a})
	default:
		c.batch = append(c.batch, a)
		if c.lingerC == nil {
			c.linger = time.NewTimer(c.p.r.cfg.ApplyLinger)
			c.lingerC = c.linger.C
		}
	}
}

// flush settles the batch: through decide, apply and effects while the pass
// goes on, failed with the pass's end otherwise.
func (c *collector) flush(ctx context.Context) {
	c.stopLinger()
	if len(c.batch) == 0 {
		return
	}
	if c.lost == nil && !c.stopped {
		if err := c.p.settle(ctx, c.batch); errors.Is(err, ErrFenced) {
			c.lost = err
			c.cancel()
		}
	} else {
		for _, a := range c.batch {
			c.p.out[a.t].fail(cmp.Or(c.lost, ctx.Err()))
		}
	}
	c.p.settled(c.batch)
	c.batch = c.batch[:0]
}

// abandon is ctx's end: the batch in hand is failed, the calls no worker
// started are taken back and failed. It returns how many it took back.
func (c *collector) abandon(ctx context.Context, queued []*queuedCall) int {
	c.stopped = true
	c.flush(ctx)
	var gave []answer
	for i, q := range queued {
		if q.abandon() {
			t := c.p.targets[i]
			c.p.out[t].fail(cmp.Or(c.lost, ctx.Err()))
			gave = append(gave, answer{t: t})
		}
	}
	c.p.settled(gave)
	return len(gave)
}

func (c *collector) stopLinger() {
	if c.lingerC != nil {
		c.linger.Stop()
		c.lingerC = nil
	}
}

// settled hands the final outcomes of some hosts to the Settled hook.
func (p *Pass) settled(as []answer) {
	if p.Settled == nil || len(as) == 0 {
		return
	}
	out := make([]Outcome, len(as))
	for i, a := range as {
		out[i] = p.out[a.t]
	}
	p.Settled(out)
}
