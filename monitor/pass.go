package monitor

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/google/uuid"

	"github.com/vigil-sh/vigil/internal/ids"
	"github.com/vigil-sh/vigil/internal/status"
	hostagentv1 "github.com/vigil-sh/vigil/proto/hostagent/v1"
	"github.com/vigil-sh/vigil/store"
)

// A Pass reconciles a set of hosts of one shard in phases you can see:
//
//	read    one statement: the hosts, their active rows, the database clock
//	passive the stale ones (by that read) in one fenced transaction
//	ask     ListSandboxes on the online ones, through the replica's call queue
//	decide  Decide per host, as answers arrive
//	apply   the decisions of the answers in hand in one fenced transaction
//	        (after ApplyLinger, or when every answer is in)
//	effects zombies destroyed on their agents after that fenced check, then
//	        their audit rows in one more fenced transaction
//	record  metrics from the outcomes, once everything committed or failed
//
// A steady pass (nothing to change) sends one statement for the whole set.
type Pass struct {
	// Urgent puts the pass's agent calls ahead of full passes' in the
	// replica's call queue (reconnects).
	Urgent bool
	// Settled, when set, is called from Run each time some hosts reached
	// their final outcome (reconciled or failed), with those outcomes.
	Settled func([]Outcome)

	r       *Reconciler
	f       store.Fence
	read    store.Read
	out     []Outcome
	stale   []int // indexes into out: candidates for the passive rule
	targets []int // indexes into out: online hosts with an address
	addr    map[uuid.UUID]string
}

// Read is a pass's first phase: one read of hosts with their rows and the
// database clock. It writes nothing. Hosts that do not exist, are not online
// or have no address are settled here (Outcome.Skipped).
func (r *Reconciler) Read(ctx context.Context, f store.Fence, hosts []uuid.UUID) (*Pass, error) {
	rd, err := r.store.ReadHosts(ctx, hosts, r.cfg.UnreachableAfter, ActiveStatuses)
	if err != nil {
		return nil, err
	}
	p := &Pass{r: r, f: f, read: rd, out: make([]Outcome, 0, len(hosts)), addr: make(map[uuid.UUID]string, len(rd.Hosts))}
	found := make(map[uuid.UUID]bool, len(rd.Hosts))
	for _, h := range rd.Hosts {
		found[h.ID] = true
		o := Outcome{Host: h.ID, Counted: h.Status == status.HostOnline && h.Address != ""}
		switch {
		case h.Status == "":
			o.Skipped = errNullStatus
			r.m.badRows.WithLabelValues("host_null_status").Inc()
		case h.Stale && h.Status != status.HostUnreachable:
			o.Skipped = errHostStale
			p.stale = append(p.stale, len(p.out))
		case h.Status != status.HostOnline:
			o.Skipped = "host " + h.Status
		case h.Address == "":
			o.Skipped = errNoAddress
		default:
			p.targets = append(p.targets, len(p.out))
			p.addr[h.ID] = h.Address
		}
		p.out = append(p.out, o)
	}
	for _, h := range hosts {
		if !found[h] {
			p.out = append(p.out, Outcome{Host: h, Skipped: errHostGone})
		}
	}
	return p, nil
}

// Now is the database clock at the pass's read.
func (p *Pass) Now() time.Time { return p.read.Now }

// Asked lists the hosts whose agents the pass will ask; NotAsked the rest.
// Both are known after Read.
func (p *Pass) Asked() []uuid.UUID {
	out := make([]uuid.UUID, len(p.targets))
	for i, t := range p.targets {
		out[i] = p.out[t].Host
	}
	return out
}

// NotAsked lists the hosts Read settled or left to the passive rule.
func (p *Pass) NotAsked() []uuid.UUID {
	asked := make(map[int]bool, len(p.targets))
	for _, t := range p.targets {
		asked[t] = true
	}
	var out []uuid.UUID
	for i, o := range p.out {
		if !asked[i] {
			out = append(out, o.Host)
		}
	}
	return out
}

// Outcomes are the pass's per-host results, final once Run returned.
func (p *Pass) Outcomes() []Outcome { return p.out }

// Run does the rest of the pass: passive, ask, decide, apply, effects,
// record. A host whose agent fails, hangs or lies fails alone; the others
// are applied without waiting for it longer than ApplyLinger. It returns
// once every call and write of the pass has ended: ErrFenced (wrapped) when
// a newer owner holds the shard — nothing more is written or sent — and
// ctx's error when ctx ended first.
func (p *Pass) Run(ctx context.Context) error {
	defer func() {
		p.r.record(p.f, "active", p.targetOutcomes())
		if len(p.stale) > 0 {
			p.r.record(p.f, "passive", p.staleOutcomes())
		}
	}()
	var replays []store.ShadowChange
	if p.r.cfg.Shadow {
		decided := make(map[uuid.UUID]bool, len(p.stale))
		for _, s := range p.stale {
			decided[p.out[s].Host] = true
		}
		replays = p.r.shadowMem.hostsRead(p.read, decided, hostDownAudit(p.r.cfg.UnreachableAfter).Reason)
	}
	if len(p.stale) > 0 || len(replays) > 0 {
		so := make([]Outcome, len(p.stale))
		for i, s := range p.stale {
			so[i] = p.out[s]
			so[i].start = time.Now()
		}
		err := p.r.markStale(ctx, p.f, so, replays)
		for i, s := range p.stale {
			p.out[s] = so[i]
		}
		if errors.Is(err, ErrFenced) {
			p.failTargets(err)
			return p.r.fenced(err)
		}
	}
	return p.ask(ctx)
}

func (p *Pass) targetOutcomes() []Outcome {
	out := make([]Outcome, 0, len(p.out)-len(p.stale))
	stale := make(map[int]bool, len(p.stale))
	for _, s := range p.stale {
		stale[s] = true
	}
	for i, o := range p.out {
		if !stale[i] {
			out = append(out, o)
		}
	}
	return out
}

func (p *Pass) staleOutcomes() []Outcome {
	out := make([]Outcome, len(p.stale))
	for i, s := range p.stale {
		out[i] = p.out[s]
	}
	return out
}

func (p *Pass) failTargets(err error) {
	for _, t := range p.targets {
		if p.out[t].Err == nil && p.out[t].Done.IsZero() {
			p.out[t].fail(err)
		}
	}
}

// answer is one agent's reply to ListSandboxes.
type answer struct {
	t     int // index into out
	resp  *hostagentv1.ListSandboxesResponse
	err   error
	start time.Time
}

// ask queues every target's call at once and applies the decisions in
// batches as the answers arrive.
func (p *Pass) ask(ctx context.Context) error {
	n := len(p.targets)
	if n == 0 {
		return nil
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	// One buffered slot per target: every call finds room for its answer,
	// so no worker ever blocks on a pass that stopped listening.
	answers := make(chan answer, n)
	lane := laneNormal
	if p.Urgent {
		lane = laneUrgent
	}
	queued := make([]*queuedCall, n)
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

	var (
		batch   []answer
		linger  *time.Timer
		lingerC <-chan time.Time
		done    = ctx.Done()
		lost    error // fence lost: stop applying
		stopped bool  // ctx ended: queued calls abandoned
	)
	defer func() {
		if linger != nil {
			linger.Stop()
		}
	}()
	flush := func() {
		if lingerC != nil {
			linger.Stop()
			lingerC = nil
		}
		if len(batch) == 0 {
			return
		}
		if lost == nil && !stopped {
			if err := p.apply(ctx, batch); errors.Is(err, ErrFenced) {
				lost = err
				cancel()
			}
		} else {
			for _, a := range batch {
				p.out[a.t].fail(cmp.Or(lost, ctx.Err()))
			}
		}
		p.settled(batch)
		batch = batch[:0]
	}
	for got := 0; got < n; {
		select {
		case a := <-answers:
			got++
			o := &p.out[a.t]
			o.start = a.start
			switch {
			case a.err != nil && ctx.Err() != nil:
				// The pass is ending (shutdown, handover, fence): not the
				// agent's fault.
				o.fail(cmp.Or(lost, ctx.Err()))
				p.settled([]answer{a})
			case a.err != nil:
				o.fail(fmt.Errorf("%w: %w", errAgent, a.err))
				p.settled([]answer{a})
			default:
				batch = append(batch, a)
				if lingerC == nil {
					linger = time.NewTimer(p.r.cfg.ApplyLinger)
					lingerC = linger.C
				}
			}
		case <-lingerC:
			lingerC = nil
			flush()
		case <-done:
			// Calls not started yet never will be; wait only for the
			// ones in flight, which the cancellation aborts.
			done, stopped = nil, true
			flush()
			var gave []answer
			for i, c := range queued {
				if c.abandon() {
					got++
					p.out[p.targets[i]].fail(cmp.Or(lost, ctx.Err()))
					gave = append(gave, answer{t: p.targets[i]})
				}
			}
			p.settled(gave)
		}
	}
	flush()
	if lost != nil {
		return lost
	}
	return ctx.Err()
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

// actionRef names one action of one plan.
type actionRef struct{ plan, action int }

// hostPlan is what decide made of one answered host.
type hostPlan struct {
	t       int
	report  Report
	actions []Action
}

// apply decides for a batch of answered hosts and applies the decisions in
// one fenced transaction, then destroys confirmed zombies and records them;
// in shadow mode it records the decisions instead (shadow.go). Every host of
// the batch ends up Done or failed. It returns the error that failed them.
func (p *Pass) apply(ctx context.Context, batch []answer) error {
	plans, err := p.decide(ctx, batch)
	if err != nil {
		p.failBatch(plans, err)
		return err
	}
	if p.r.cfg.Shadow {
		return p.shadow(ctx, plans)
	}
	return p.commit(ctx, plans)
}

// decide parses the batch's reports, reads the zombie candidates (one
// statement) and runs Decide for each host.
func (p *Pass) decide(ctx context.Context, batch []answer) ([]hostPlan, error) {
	plans := make([]hostPlan, len(batch))
	var cands []store.Candidate
	for i, a := range batch {
		o := &p.out[a.t]
		rep, problems := ParseReport(a.resp)
		o.Problems = problems
		for _, pr := range problems {
			p.r.log.Warn("agent report entry not trusted", "host", o.Host, "problem", pr.Kind, "sandbox", pr.SandboxID, "detail", pr.Detail)
		}
		plans[i] = hostPlan{t: a.t, report: rep}
		for _, id := range rep.PausedIDs() {
			cands = append(cands, store.Candidate{ID: id, HostID: o.Host})
		}
	}
	// Zombie candidates: stopped rows among the sandboxes the agents report
	// paused, stopped before the pass's read (a row stopped after it may be
	// a destroy the control plane is finishing right now).
	zombies, err := p.r.store.StoppedAmong(ctx, cands, p.read.Now)
	if err != nil {
		return plans, err
	}
	byHost := map[uuid.UUID][]Row{}
	for _, z := range p.valid(zombies) {
		byHost[z.HostID] = append(byHost[z.HostID], z)
	}
	for i := range plans {
		pl := &plans[i]
		rows := p.valid(p.read.Hosts[pl.t].Sandboxes)
		if z := byHost[p.out[pl.t].Host]; len(z) > 0 {
			rows = append(rows[:len(rows):len(rows)], z...)
		}
		pl.actions = Decide(p.r.cfg.Rules, rows, pl.report, p.read.Now)
	}
	return plans, nil
}

// commit applies the plans' decisions in one fenced transaction, then
// destroys the zombies and re-sends the stuck destroys the transaction
// confirmed (destroyOnAgents).
func (p *Pass) commit(ctx context.Context, plans []hostPlan) error {
	b := store.Batch{RetryGrace: p.r.cfg.Rules.TransientGrace}
	var changeRef, heldRef, retryRef []actionRef
	now := time.Now()
	for i := range plans {
		pl := &plans[i]
		h := p.out[pl.t].Host
		for j, a := range pl.actions {
			row := store.Sandbox{ID: a.Sandbox, TeamID: uuid.NullUUID{UUID: a.TeamID, Valid: true}, HostID: h, Status: a.From, LastUpdated: a.Seen}
			switch a.Kind {
			case DestroyOnAgent:
				b.Held = append(b.Held, row)
				heldRef = append(heldRef, actionRef{i, j})
			case RetryDestroy:
				b.HeldRetry = append(b.HeldRetry, row)
				retryRef = append(retryRef, actionRef{i, j})
			default:
				b.Changes = append(b.Changes, store.Change{Row: row, To: a.To, Audit: sandboxAudit(a, p.r.pub != nil, now)})
				changeRef = append(changeRef, actionRef{i, j})
			}
		}
	}
	res, err := p.r.store.Apply(ctx, p.f, b)
	if err != nil {
		p.failBatch(plans, p.r.fenced(err))
		return err
	}
	for k, rf := range changeRef {
		o := &p.out[plans[rf.plan].t]
		if res.Applied[k] {
			o.Applied = append(o.Applied, plans[rf.plan].actions[rf.action])
		} else {
			o.Missed++
		}
	}
	var held []actionRef
	for k, rf := range heldRef {
		if res.Held[k] {
			held = append(held, rf)
		} else {
			p.out[plans[rf.plan].t].Missed++
		}
	}
	for k, rf := range retryRef {
		// A miss here is no conflict: the destroy was re-sent within
		// the grace (or the row moved on).
		if res.HeldRetry[k] {
			held = append(held, rf)
		}
	}
	now = time.Now()
	for _, pl := range plans {
		p.out[pl.t].Done = now
	}
	for _, pl := range plans {
		for _, a := range p.out[pl.t].Applied {
			p.r.log.Debug("sandbox transition", "host", p.out[pl.t].Host, "sandbox", a.Sandbox, "from", a.From, "to", a.To)
		}
	}
	if len(held) == 0 {
		return nil
	}
	return p.destroyOnAgents(ctx, plans, held)
}

// destroyOnAgents sends DestroySandbox for the zombies and stuck destroys the
// fenced check confirmed, with the fence token in the Vigil-Fence header,
// then, in one fenced transaction, writes what the accepted ones did: a
// zombie's audit row (and event), a stuck destroy's change stopping ->
// stopped by compare-and-set with its audit row, event and volumes (rule 9).
// A host counts as reconciled only once that commits.
func (p *Pass) destroyOnAgents(ctx context.Context, plans []hostPlan, held []actionRef) error {
	ok := p.sendDestroys(ctx, plans, held)
	var b store.Batch
	var zombieRef, retryRef []actionRef
	now := time.Now()
	for k, rf := range held {
		if !ok[k] {
			continue
		}
		a := plans[rf.plan].actions[rf.action]
		h := p.out[plans[rf.plan].t].Host
		au := sandboxAudit(a, p.r.pub != nil, now)
		if a.Kind == RetryDestroy {
			row := store.Sandbox{ID: a.Sandbox, TeamID: uuid.NullUUID{UUID: a.TeamID, Valid: true}, HostID: h, Status: a.From, LastUpdated: a.Seen}
			b.Changes = append(b.Changes, store.Change{Row: row, To: a.To, Audit: au})
			retryRef = append(retryRef, rf)
			continue
		}
		b.Records = append(b.Records, store.Record{Host: h, Sandbox: a.Sandbox, Change: "destroyed_on_agent", Audit: *au})
		zombieRef = append(zombieRef, rf)
	}
	res, err := p.r.store.Apply(ctx, p.f, b)
	if err != nil {
		p.failBatch(plans, p.r.fenced(err))
		return err
	}
	now = time.Now()
	for _, rf := range zombieRef {
		o := &p.out[plans[rf.plan].t]
		o.Destroyed++
		o.Applied = append(o.Applied, plans[rf.plan].actions[rf.action])
		o.Done = now
	}
	for k, rf := range retryRef {
		o := &p.out[plans[rf.plan].t]
		o.Resent++
		if res.Applied[k] {
			o.Applied = append(o.Applied, plans[rf.plan].actions[rf.action])
		} else {
			o.Missed++ // the control plane finished (or moved) the row first
		}
		o.Done = now
	}
	return nil
}

// sendDestroys sends the held actions' DestroySandbox calls through the
// urgent lane and waits for them (or for ctx); ok[k] says held[k]'s agent
// accepted it (not_found counts as accepted).
func (p *Pass) sendDestroys(ctx context.Context, plans []hostPlan, held []actionRef) []bool {
	ok := make([]bool, len(held))
	var wg sync.WaitGroup
	for k, rf := range held {
		pl := plans[rf.plan]
		h := p.out[pl.t].Host
		a := pl.actions[rf.action]
		wg.Add(1)
		c := p.r.calls.submit(laneUrgent, func() {
			defer wg.Done()
			if ctx.Err() != nil {
				return
			}
			err := p.r.agents.DestroySandbox(ctx, h, p.addr[h], ids.Sandbox(a.Sandbox), p.f.Header())
			if err != nil {
				p.r.log.Warn("destroy on agent failed", "host", h, "sandbox", a.Sandbox, "kind", a.Kind, "error", err)
				return
			}
			ok[k] = true
		})
		context.AfterFunc(ctx, func() {
			if c.abandon() {
				wg.Done()
			}
		})
	}
	wg.Wait()
	return ok
}

func (p *Pass) failBatch(plans []hostPlan, err error) {
	for _, pl := range plans {
		p.out[pl.t].fail(err)
	}
}

// valid leaves out damaged rows (no team: their audit row could not be
// written), which are counted; without any it returns rows itself.
func (p *Pass) valid(rows []Row) []Row {
	bad := 0
	for _, r := range rows {
		if !r.TeamID.Valid {
			bad++
		}
	}
	if bad == 0 {
		return rows
	}
	p.r.m.badRows.WithLabelValues("sandbox_null_team").Add(float64(bad))
	out := make([]Row, 0, len(rows)-bad)
	for _, r := range rows {
		if r.TeamID.Valid {
			out = append(out, r)
		}
	}
	return out
}

func hostResourceID(h uuid.UUID) string { return ids.Host(h) }
