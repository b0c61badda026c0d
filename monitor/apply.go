package monitor

import (
	"context"
	"sync"
	"time"

	"github.com/google/uuid"

	"github.com/vigil-sh/vigil/internal/ids"
	"github.com/vigil-sh/vigil/internal/logval"
	"github.com/vigil-sh/vigil/store"
)

// hostPlan is what decide made of one answered host.
type hostPlan struct {
	t       int // index into the pass's outcomes
	host    uuid.UUID
	report  Report
	actions []Action
}

// actionRef names one action of one plan.
type actionRef struct{ plan, action int }

// decide parses the batch's reports, reads the zombie candidates among the
// sandboxes they report paused (one statement), and runs Decide per host.
func (p *Pass) decide(ctx context.Context, batch []answer) ([]hostPlan, error) {
	plans := make([]hostPlan, len(batch))
	var cands []store.Candidate
	for i, a := range batch {
		o := &p.out[a.t]
		rep, problems := ParseReport(a.resp)
		o.Problems = problems
		p.logProblems(o.Host, problems)
		plans[i] = hostPlan{t: a.t, host: o.Host, report: rep}
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
	byHost := map[uuid.UUID][]store.Sandbox{}
	for _, z := range zombies {
		byHost[z.HostID] = append(byHost[z.HostID], z)
	}
	for i := range plans {
		pl := &plans[i]
		rows := p.rows(p.read.Hosts[pl.t].Sandboxes)
		rows = append(rows, p.rows(byHost[pl.host])...)
		pl.actions = Decide(p.r.cfg.Rules, rows, pl.report, p.read.Now)
	}
	return plans, nil
}

// maxProblemLogs bounds the lines one answer's problems are logged in: an
// agent can report thousands of entries it should not (the metric counts
// every one).
const maxProblemLogs = 3

// logProblems logs the first problems of one agent's answer, their values
// (an agent's strings, of any length) cut by logval.
func (p *Pass) logProblems(host uuid.UUID, problems []Problem) {
	for i, pr := range problems {
		if i == maxProblemLogs {
			p.r.log.Warn("more agent report entries not trusted", "host", host, "not_logged", len(problems)-i)
			return
		}
		p.r.log.Warn("agent report entry not trusted", "host", host, "problem", pr.Kind,
			"sandbox", logval.String(pr.SandboxID), "detail", logval.String(pr.Detail))
	}
}

// batchRefs says which action each entry of a batch stands for, in the
// batch's order.
type batchRefs struct {
	changes, zombies, resends []actionRef
}

// batchOf is the decisions as one store batch: transitions as
// compare-and-set changes (with their audit rows, and their events when
// withEvents), zombies and re-sends as the fenced checks before their calls
// to the agents. It is pure.
func batchOf(plans []hostPlan, grace time.Duration, withEvents bool, now time.Time) (store.Batch, batchRefs) {
	b := store.Batch{ResendGrace: grace}
	var refs batchRefs
	for i, pl := range plans {
		for j, a := range pl.actions {
			row := a.row(pl.host)
			switch a.Kind {
			case DestroyZombie:
				b.Zombies = append(b.Zombies, row)
				refs.zombies = append(refs.zombies, actionRef{i, j})
			case ResendDestroy:
				b.Resends = append(b.Resends, row)
				refs.resends = append(refs.resends, actionRef{i, j})
			default:
				b.Changes = append(b.Changes, store.Change{Row: row, To: a.To, Audit: sandboxAudit(a, withEvents, now)})
				refs.changes = append(refs.changes, actionRef{i, j})
			}
		}
	}
	return b, refs
}

// row is the store's row an action's compare-and-set or check is made on.
func (a Action) row(host uuid.UUID) store.Sandbox {
	return store.Sandbox{ID: a.Sandbox, TeamID: uuid.NullUUID{UUID: a.TeamID, Valid: true}, HostID: host, Status: a.From, LastUpdated: a.Seen}
}

// apply writes the plans' batch in one fenced transaction and folds the
// result into the outcomes: applied changes, compare-and-set misses. Every
// host of the plans is then Done. It returns the zombies and re-sends the
// fenced check let through, for effects.
func (p *Pass) apply(ctx context.Context, plans []hostPlan) ([]actionRef, error) {
	b, refs := batchOf(plans, p.r.cfg.Rules.TransientGrace, p.r.pub != nil, time.Now())
	res, err := p.r.store.Apply(ctx, p.f, b)
	if err != nil {
		return nil, err
	}
	for k, rf := range refs.changes {
		o := &p.out[plans[rf.plan].t]
		if a := plans[rf.plan].actions[rf.action]; res.Applied[k] {
			o.Applied = append(o.Applied, a)
			p.r.log.Debug("sandbox transition", "host", o.Host, "sandbox", a.Sandbox, "from", a.From, "to", a.To)
		} else {
			o.Missed++
		}
	}
	var held []actionRef
	for k, rf := range refs.zombies {
		if res.Zombies[k] {
			held = append(held, rf)
		} else {
			p.out[plans[rf.plan].t].Missed++
		}
	}
	for k, rf := range refs.resends {
		// A miss here is no conflict: the destroy was re-sent within the
		// grace (or the row moved on).
		if res.Resends[k] {
			held = append(held, rf)
		}
	}
	now := time.Now()
	for _, pl := range plans {
		p.out[pl.t].Done = now
	}
	return held, nil
}

// effects sends DestroySandbox for the zombies and stuck destroys the fenced
// check let through, with the fence token in the Vigil-Fence header, then
// writes in one fenced transaction what the accepted ones did: a zombie's
// audit row (and event), a stuck destroy's change stopping -> stopped by
// compare-and-set with its audit row, event and volumes (rule 9). A host
// counts as reconciled only once that commits.
func (p *Pass) effects(ctx context.Context, plans []hostPlan, held []actionRef) error {
	ok := p.sendDestroys(ctx, plans, held)
	var b store.Batch
	var zombies, resends []actionRef
	now := time.Now()
	for k, rf := range held {
		if !ok[k] {
			continue
		}
		a, h := plans[rf.plan].actions[rf.action], plans[rf.plan].host
		au := sandboxAudit(a, p.r.pub != nil, now)
		if a.Kind == ResendDestroy {
			b.Changes = append(b.Changes, store.Change{Row: a.row(h), To: a.To, Audit: au})
			resends = append(resends, rf)
			continue
		}
		b.Records = append(b.Records, store.Record{Host: h, Sandbox: a.Sandbox, Change: "destroyed_on_agent", Audit: *au})
		zombies = append(zombies, rf)
	}
	res, err := p.r.store.Apply(ctx, p.f, b)
	if err != nil {
		return err
	}
	now = time.Now()
	for _, rf := range zombies {
		o := &p.out[plans[rf.plan].t]
		o.Zombies++
		o.Applied = append(o.Applied, plans[rf.plan].actions[rf.action])
		o.Done = now
	}
	for k, rf := range resends {
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
		h, a := plans[rf.plan].host, plans[rf.plan].actions[rf.action]
		wg.Add(1)
		c := p.r.calls.submit(laneUrgent, func() {
			defer wg.Done()
			if ctx.Err() != nil {
				return
			}
			err := p.r.agents.DestroySandbox(ctx, h, p.addr[h], ids.Sandbox(a.Sandbox), p.f.Header())
			if err != nil {
				p.r.log.Warn("destroy on agent failed", "host", h, "sandbox", a.Sandbox, "kind", a.Kind, "error", logval.Err(err))
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
