// Package monitor owns the reconcile: the rules of SPEC §2 as a pure decision
// function (rules.go), the pass that applies them to a set of hosts of one
// shard (this file), and the Runner that schedules passes for the shards this
// replica owns (runner.go).
//
// Ownership reaches this package only as a store.Fence (shard, token,
// replica) and a context; it never imports etcd.
package monitor

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/google/uuid"
	"github.com/hashicorp/go-hclog"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/vigil-sh/vigil/internal/ids"
	"github.com/vigil-sh/vigil/internal/status"
	"github.com/vigil-sh/vigil/store"
)

// ErrFenced is store.ErrFenced: a write was rejected because a newer owner
// holds the shard. Callers treat it as a sticky loss of the shard.
var ErrFenced = store.ErrFenced

// Config configures a Reconciler.
type Config struct {
	Rules            Rules
	UnreachableAfter time.Duration // heartbeat staleness threshold, default DefaultUnreachableAfter
	// AgentConcurrency bounds the agent calls in flight across the whole
	// replica, default DefaultAgentConcurrency. Calls wait in one queue (reconnects first), so
	// every owned host waits the same, whatever its shard.
	AgentConcurrency int
	// ApplyLinger is how long answers that arrived wait for the rest of
	// their pass before their changes are applied anyway, default 100ms: a
	// slow agent delays the others' writes by at most this much.
	ApplyLinger time.Duration
	// Publisher and Outbox, both set, turn the events on (SPEC §6): each
	// change's notification event is written to the outbox beside its
	// audit row, and shard owners relay their outbox to the publisher.
	// Neither: no event state is kept.
	Publisher Publisher
	Outbox    Outbox
	// RelayBatch is how many events one publish carries, default
	// DefaultRelayBatch.
	RelayBatch int
	// Shadow records every change a pass would commit in
	// vigil_shadow_changes instead of making it (shadow.go): no
	// control-plane row, audit row, DestroySandbox, event or volume is
	// touched. It excludes Publisher.
	Shadow     bool
	Logger     hclog.Logger
	Registerer prometheus.Registerer
}

// Defaults of Config's zero fields (the flags of `vigil run` use them too).
const (
	DefaultAgentConcurrency = 128
	DefaultApplyLinger      = 100 * time.Millisecond
	DefaultRelayBatch       = 100
)

// Validate fills defaults and checks values.
func (c *Config) Validate() error {
	if c.Rules.TransientGrace == 0 {
		c.Rules.TransientGrace = DefaultRules.TransientGrace
	}
	if c.Rules.SnapshotGrace == 0 {
		c.Rules.SnapshotGrace = DefaultRules.SnapshotGrace
	}
	if c.UnreachableAfter == 0 {
		c.UnreachableAfter = DefaultUnreachableAfter
	}
	if c.AgentConcurrency == 0 {
		c.AgentConcurrency = DefaultAgentConcurrency
	}
	if c.ApplyLinger == 0 {
		c.ApplyLinger = DefaultApplyLinger
	}
	if c.RelayBatch == 0 {
		c.RelayBatch = DefaultRelayBatch
	}
	switch {
	case c.Rules.TransientGrace < 0:
		return fmt.Errorf("monitor: transient grace %s must be positive", c.Rules.TransientGrace)
	case c.Rules.SnapshotGrace < 0:
		return fmt.Errorf("monitor: snapshot grace %s must be positive", c.Rules.SnapshotGrace)
	case c.UnreachableAfter < time.Second:
		return fmt.Errorf("monitor: unreachable-after %s must be at least 1s", c.UnreachableAfter)
	case c.AgentConcurrency < 1:
		return fmt.Errorf("monitor: agent concurrency %d must be at least 1", c.AgentConcurrency)
	case c.ApplyLinger < 0:
		return fmt.Errorf("monitor: apply linger %s must not be negative", c.ApplyLinger)
	case c.RelayBatch < 1 || c.RelayBatch > 10000:
		return fmt.Errorf("monitor: events batch %d must be between 1 and 10000", c.RelayBatch)
	case (c.Publisher == nil) != (c.Outbox == nil):
		return errors.New("monitor: events need both a publisher and an outbox")
	case c.Shadow && c.Publisher != nil:
		return errors.New("monitor: shadow mode publishes no events: no publisher may be set")
	}
	if c.Logger == nil {
		c.Logger = hclog.NewNullLogger()
	}
	return nil
}

// Reconciler applies SPEC §2 to hosts of shards its caller owns.
type Reconciler struct {
	cfg    Config
	store  PassStore
	outbox Outbox // nil: events off
	agents Agents
	log    hclog.Logger
	m      *metrics
	calls  *callQueue // every agent call goes through it
	pub    Publisher  // nil: events off
	// shadowMem is shadow mode's memory of the last pass per host; nil
	// unless Config.Shadow.
	shadowMem *shadowMemory
}

// New builds a Reconciler on the store its passes read and write and the
// agents they ask.
func New(cfg Config, st PassStore, agents Agents) (*Reconciler, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	r := &Reconciler{cfg: cfg, store: st, outbox: cfg.Outbox, agents: agents, log: cfg.Logger, m: newMetrics(cfg.Registerer),
		calls: newCallQueue(cfg.AgentConcurrency), pub: cfg.Publisher}
	if cfg.Shadow {
		r.shadowMem = newShadowMemory()
	}
	return r, nil
}

// Outcome says what a pass did for one host.
type Outcome struct {
	Host uuid.UUID
	// Counted: the host is online with an address, so its last successful
	// reconcile is part of the shard's lag (SPEC §5).
	Counted     bool
	Skipped     string // not reconciled actively, and why ("" when it was)
	MarkedDown  bool   // the passive rule marked it unreachable
	MadeMissing int    // its sandboxes that became missing then
	Applied     []Action
	Missed      int // compare-and-set misses: a concurrent transition won
	Zombies     int // zombies destroyed on the agent
	Resent      int // stuck destroys re-sent to the agent (rule 9)
	Problems    []Problem
	// Err: the host could not be reconciled (agent, database or fence).
	Err error
	// Done is when the host counted as reconciled: its agent answered and
	// every resulting write committed. Zero otherwise.
	Done time.Time

	start time.Time // its agent call's start, for the duration histogram
}

func (o *Outcome) fail(err error) {
	o.Err, o.Applied, o.Zombies, o.Done = err, nil, 0, time.Time{}
}

var errAgent = errors.New("agent call failed")

// Why a host was not reconciled actively (Outcome.Skipped).
const (
	skipHostStale  = "heartbeat stale"
	skipHostGone   = "host gone"
	skipNoAddress  = "host has no address"
	skipNullStatus = "host status is NULL"
)

// raiseFence records a claim of f's shard in Postgres (store.RaiseFence).
func (r *Reconciler) raiseFence(ctx context.Context, f store.Fence) error {
	return r.store.RaiseFence(ctx, f)
}

// trimJournal deletes the shard's journal rows and shadow records past keep.
func (r *Reconciler) trimJournal(ctx context.Context, f store.Fence, keep time.Duration) (int64, error) {
	n, err := r.store.TrimJournal(ctx, f, keep)
	return n, r.fenced(err)
}

// Reconcile is one whole pass over hosts: Read, then Run.
func (r *Reconciler) Reconcile(ctx context.Context, f store.Fence, hosts []uuid.UUID) ([]Outcome, error) {
	p, err := r.Read(ctx, f, hosts)
	if err != nil {
		return nil, err
	}
	err = p.Run(ctx)
	return p.Outcomes(), err
}

// Passive is the passive rule (SPEC §2 item 1) for a set of hosts, in one
// fenced transaction: each host whose heartbeat is older than the threshold
// by the database's clock (or absent) and which is not already unreachable
// becomes unreachable and its live sandboxes missing, with the host's audit
// row when it has a team, all conditional on the row really changing. It
// returns one outcome per host; errors.Is(err, ErrFenced) is a loss of the
// shard.
func (r *Reconciler) Passive(ctx context.Context, f store.Fence, hosts []uuid.UUID) ([]Outcome, error) {
	out := make([]Outcome, len(hosts))
	for i, h := range hosts {
		out[i] = Outcome{Host: h, Skipped: skipHostStale, start: time.Now()}
	}
	err := r.passive(ctx, f, out, nil)
	r.record(f, "passive", out)
	return out, err
}

// passive runs the passive rule on the hosts of out; in shadow mode it
// records instead, with replays (the hosts another writer marked since the
// last read).
func (r *Reconciler) passive(ctx context.Context, f store.Fence, out []Outcome, replays []store.ShadowChange) error {
	if len(out) == 0 && len(replays) == 0 {
		return nil
	}
	hosts, rids := make([]uuid.UUID, len(out)), make([]string, len(out))
	at := make(map[uuid.UUID]int, len(out))
	for i, o := range out {
		hosts[i], rids[i], at[o.Host] = o.Host, ids.Host(o.Host), i
	}
	au := hostDownAudit(r.cfg.UnreachableAfter)
	md := store.PassiveInput{
		Hosts: hosts, ResourceIDs: rids, StaleAfter: r.cfg.UnreachableAfter, Live: MissingOnHostDown,
		Audit: *auditRow("host", "", uuid.Nil, au, false, time.Time{}),
	}
	if r.cfg.Shadow {
		if err := r.shadowPassive(ctx, f, md, replays); err != nil {
			for i := range out {
				out[i].fail(err)
			}
			return r.fenced(err)
		}
		for i := range out {
			out[i].Counted = false // vigil holds them unreachable: not part of the lag
		}
		return nil
	}
	if r.pub != nil {
		md.Event = hostDownEvent(au)
	}
	marked, err := r.store.Passive(ctx, f, md)
	if err != nil {
		for i := range out {
			out[i].fail(err)
		}
		return r.fenced(err)
	}
	for _, m := range marked {
		o := &out[at[m.ID]]
		o.MarkedDown, o.MadeMissing, o.Counted = true, len(m.Missing), false
		for _, sb := range m.Missing {
			o.Applied = append(o.Applied, Action{Kind: Transition, Sandbox: sb.ID, From: sb.From, To: status.Missing})
		}
		r.log.Info("host marked unreachable", "host", m.ID, "shard", f.Shard, "sandboxes_missing", len(m.Missing))
	}
	return nil
}

// record turns a pass's outcomes into metrics, in one place after every
// write of the pass has committed or failed.
func (r *Reconciler) record(f store.Fence, kind string, out []Outcome) {
	now := time.Now()
	for i := range out {
		o := &out[i]
		if errors.Is(o.Err, context.Canceled) {
			continue // the pass was stopped: nothing to say about this host
		}
		result := "ok"
		switch {
		case errors.Is(o.Err, ErrFenced):
			result = "fenced"
		case errors.Is(o.Err, errAgent):
			result = "agent_error"
		case o.Err != nil:
			result = "error"
		case o.MarkedDown || len(o.Applied) > 0:
			result = "changed"
		case o.Skipped != "" && kind == "active":
			result = "skipped"
		}
		r.m.reconciles.WithLabelValues(kind, result).Inc()
		if !o.start.IsZero() {
			end := o.Done
			if end.IsZero() {
				end = now
			}
			r.m.duration.WithLabelValues(kind, result).Observe(end.Sub(o.start).Seconds())
		}
		if o.MarkedDown {
			r.m.markedDown.Inc()
		}
		for _, a := range o.Applied {
			if a.Kind != Transition {
				continue
			}
			r.m.transitions.WithLabelValues(a.From, a.To).Inc()
		}
		if o.Zombies > 0 {
			r.m.zombies.Add(float64(o.Zombies))
		}
		if o.Resent > 0 {
			r.m.resent.Add(float64(o.Resent))
		}
		for _, p := range o.Problems {
			r.m.reportProblems.WithLabelValues(p.Kind).Inc()
		}
	}
}

// fenced counts a fence rejection once per rejected transaction.
func (r *Reconciler) fenced(err error) error {
	if errors.Is(err, ErrFenced) {
		r.m.fenceRejections.Inc()
	}
	return err
}
