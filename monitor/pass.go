package monitor

import (
	"context"
	"errors"
	"time"

	"github.com/google/uuid"

	"github.com/vigil-sh/vigil/internal/status"
	"github.com/vigil-sh/vigil/store"
)

// A Pass reconciles a set of hosts of one shard in phases you can see:
//
//	read     one statement: the hosts, their active rows, the database clock (Reconciler.Read)
//	passive  the stale ones (by that read) in one fenced transaction
//	ask      ListSandboxes on the online ones, through the replica's call queue;
//	         the answers in hand go on together (ask.go), after ApplyLinger or
//	         when every answer is in, through:
//	decide   the zombie candidates read, Decide per host (pure)
//	apply    the decisions as one batch (batchOf, pure) in one fenced transaction;
//	         in shadow mode recorded instead (shadow.go)
//	effects  zombies destroyed and stuck destroys re-sent on their agents after
//	         that fenced check, then what they did in one more fenced transaction
//	record   metrics from the outcomes, once everything committed or failed
//
// A steady pass (nothing to change) sends one statement for the whole set.
type Pass struct {
	// Urgent puts the pass's agent calls ahead of full passes' in the
	// replica's call queue (reconnects, a new owner's first pass).
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
		p.classify(h)
	}
	for _, h := range hosts {
		if !found[h] {
			p.out = append(p.out, Outcome{Host: h, Skipped: skipHostGone})
		}
	}
	return p, nil
}

// classify settles a host the read found, or makes it a candidate of the
// passive rule, or a target to ask.
func (p *Pass) classify(h store.HostState) {
	o := Outcome{Host: h.ID, Counted: h.Status == status.HostOnline && h.Address != ""}
	switch {
	case h.Status == "":
		o.Skipped = skipNullStatus
		p.r.m.badRows.WithLabelValues("host_null_status").Inc()
	case h.Stale && h.Status != status.HostUnreachable:
		o.Skipped = skipHostStale
		p.stale = append(p.stale, len(p.out))
	case h.Status != status.HostOnline:
		o.Skipped = "host " + h.Status
	case h.Address == "":
		o.Skipped = skipNoAddress
	default:
		p.targets = append(p.targets, len(p.out))
		p.addr[h.ID] = h.Address
	}
	p.out = append(p.out, o)
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

// Run does the pass's phases after Read: passive, then ask, whose batches of
// answers each go through decide, apply and effects (settle), then record.
// A host whose agent fails, hangs or lies fails alone; the others are
// applied without waiting for it longer than ApplyLinger. It returns once
// every call and write of the pass has ended: ErrFenced (wrapped) when a
// newer owner holds the shard — nothing more is written or sent — and ctx's
// error when ctx ended first.
func (p *Pass) Run(ctx context.Context) error {
	defer p.record()
	if err := p.passive(ctx); err != nil {
		return err
	}
	return p.ask(ctx)
}

// passive runs the passive rule on the hosts the read found stale (and in
// shadow mode records the hosts another writer marked since the last read).
// A fence rejection fails every target: the pass is over.
func (p *Pass) passive(ctx context.Context) error {
	var replays []store.ShadowChange
	if p.r.cfg.Shadow {
		replays = p.r.shadowMem.hostsRead(p.read, p.staleHosts(), hostDownAudit(p.r.cfg.UnreachableAfter).Reason)
	}
	if len(p.stale) == 0 && len(replays) == 0 {
		return nil
	}
	so := make([]Outcome, len(p.stale))
	for i, s := range p.stale {
		so[i] = p.out[s]
		so[i].start = time.Now()
	}
	err := p.r.passive(ctx, p.f, so, replays)
	for i, s := range p.stale {
		p.out[s] = so[i]
	}
	if errors.Is(err, ErrFenced) { // counted by p.r.passive
		for _, t := range p.targets {
			p.out[t].fail(err)
		}
		return err
	}
	return nil
}

func (p *Pass) staleHosts() map[uuid.UUID]bool {
	out := make(map[uuid.UUID]bool, len(p.stale))
	for _, s := range p.stale {
		out[p.out[s].Host] = true
	}
	return out
}

// settle takes a batch of answered hosts through decide, apply and effects.
// Every host of the batch ends up Done or failed; it returns the error that
// failed them.
func (p *Pass) settle(ctx context.Context, batch []answer) error {
	plans, err := p.decide(ctx, batch)
	if err == nil && p.r.cfg.Shadow {
		err = p.shadow(ctx, plans)
	} else if err == nil {
		var held []actionRef
		held, err = p.apply(ctx, plans)
		if err == nil && len(held) > 0 {
			err = p.effects(ctx, plans, held)
		}
	}
	if err != nil {
		p.failBatch(plans, p.r.fenced(err))
	}
	return err
}

// record turns the pass's outcomes into metrics, once every write of the
// pass has committed or failed.
func (p *Pass) record() {
	stale := make(map[int]bool, len(p.stale))
	passive := make([]Outcome, 0, len(p.stale))
	for _, s := range p.stale {
		stale[s] = true
		passive = append(passive, p.out[s])
	}
	active := make([]Outcome, 0, len(p.out)-len(p.stale))
	for i, o := range p.out {
		if !stale[i] {
			active = append(active, o)
		}
	}
	p.r.record(p.f, "active", active)
	if len(passive) > 0 {
		p.r.record(p.f, "passive", passive)
	}
}

func (p *Pass) failBatch(plans []hostPlan, err error) {
	for _, pl := range plans {
		p.out[pl.t].fail(err)
	}
}

// rows are the rules' rows of a host's sandboxes: damaged ones (no team:
// their audit row could not be written) are left out and counted.
func (p *Pass) rows(sbs []store.Sandbox) []Row {
	out := make([]Row, 0, len(sbs))
	bad := 0
	for _, s := range sbs {
		if !s.TeamID.Valid {
			bad++
			continue
		}
		out = append(out, Row{ID: s.ID, TeamID: s.TeamID.UUID, Status: s.Status, LastUpdated: s.LastUpdated})
	}
	if bad > 0 {
		p.r.m.badRows.WithLabelValues("sandbox_null_team").Add(float64(bad))
	}
	return out
}
