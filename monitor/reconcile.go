// Package monitor owns the reconcile: the rules of SPEC §2 as a pure decision
// function (rules.go), and the Reconciler that reads a host's rows, asks its
// agent, and applies the decisions in a fenced transaction.
//
// Ownership reaches this package only as a store.Fence (shard, token,
// replica) and a context; it never imports etcd.
package monitor

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"time"

	"github.com/google/uuid"
	"github.com/hashicorp/go-hclog"
	"github.com/jackc/pgx/v5"
	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/sync/errgroup"

	"github.com/vigil-sh/vigil/internal/ids"
	hostagentv1 "github.com/vigil-sh/vigil/proto/hostagent/v1"
	"github.com/vigil-sh/vigil/store"
)

// ErrFenced is store.ErrFenced: a write was rejected because a newer owner
// holds the shard. Callers treat it as a sticky loss of the shard.
var ErrFenced = store.ErrFenced

// Agents is what the reconcile needs from host agents. agentpool.Pool
// implements it. DestroySandbox treats an agent's not_found as success.
type Agents interface {
	ListSandboxes(ctx context.Context, hostID uuid.UUID, address string) (*hostagentv1.ListSandboxesResponse, error)
	DestroySandbox(ctx context.Context, hostID uuid.UUID, address, sandboxID, fence string) error
}

// Config configures a Reconciler.
type Config struct {
	Rules            Rules
	UnreachableAfter time.Duration // heartbeat staleness threshold, default 90s
	Concurrency      int           // hosts reconciled at once in ReconcileHosts, default 16
	Logger           hclog.Logger
	Registerer       prometheus.Registerer
}

// Validate fills defaults and checks values.
func (c *Config) Validate() error {
	if c.Rules.TransientGrace == 0 {
		c.Rules.TransientGrace = DefaultRules.TransientGrace
	}
	if c.Rules.SnapshotGrace == 0 {
		c.Rules.SnapshotGrace = DefaultRules.SnapshotGrace
	}
	if c.UnreachableAfter == 0 {
		c.UnreachableAfter = 90 * time.Second
	}
	if c.Concurrency == 0 {
		c.Concurrency = 16
	}
	switch {
	case c.Rules.TransientGrace < 0:
		return fmt.Errorf("monitor: transient grace %s must be positive", c.Rules.TransientGrace)
	case c.Rules.SnapshotGrace < 0:
		return fmt.Errorf("monitor: snapshot grace %s must be positive", c.Rules.SnapshotGrace)
	case c.UnreachableAfter < time.Second:
		return fmt.Errorf("monitor: unreachable-after %s must be at least 1s", c.UnreachableAfter)
	case c.Concurrency < 1:
		return fmt.Errorf("monitor: concurrency %d must be at least 1", c.Concurrency)
	}
	if c.Logger == nil {
		c.Logger = hclog.NewNullLogger()
	}
	return nil
}

// Reconciler applies SPEC §2 to hosts of shards its caller owns.
type Reconciler struct {
	cfg    Config
	store  *store.Store
	agents Agents
	log    hclog.Logger
	m      *metrics
}

// New builds a Reconciler.
func New(cfg Config, st *store.Store, agents Agents) (*Reconciler, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	return &Reconciler{cfg: cfg, store: st, agents: agents, log: cfg.Logger, m: newMetrics(cfg.Registerer)}, nil
}

// Result says what one host reconcile did.
type Result struct {
	Skipped     string   // non-empty: why the host was not reconciled actively
	Applied     []Action // actions that took effect
	Missed      int      // compare-and-set misses: a concurrent transition won
	Destroyed   int      // zombies destroyed on the agent
	Problems    []Problem
	MarkedDown  bool
	MadeMissing int
}

func (r *Reconciler) observe(kind string, start time.Time, res *Result, err error) {
	result := "ok"
	switch {
	case errors.Is(err, ErrFenced):
		result = "fenced"
		r.m.fenceRejections.Inc()
	case errors.Is(err, errAgent):
		result = "agent_error"
	case err != nil:
		result = "error"
	case res.Skipped != "":
		result = "skipped"
	case len(res.Applied) > 0 || res.Destroyed > 0 || res.MarkedDown:
		result = "changed"
	}
	r.m.reconciles.WithLabelValues(kind, result).Inc()
	r.m.duration.WithLabelValues(kind, result).Observe(time.Since(start).Seconds())
}

var errAgent = errors.New("agent call failed")

// MarkStale is the passive rule (SPEC §2 item 1) for one host: if its
// heartbeat is older than the threshold by the database's clock (or absent)
// and it is not already unreachable, it becomes unreachable and its live
// sandboxes become missing, with the host's audit row when it has a team —
// all in one fenced transaction, all conditional on the row really changing.
func (r *Reconciler) MarkStale(ctx context.Context, f store.Fence, host uuid.UUID) (res Result, err error) {
	start := time.Now()
	defer func() { r.observe("passive", start, &res, err) }()
	var moved []struct {
		id   uuid.UUID
		from string
	}
	err = r.store.WithFence(ctx, f, func(tx pgx.Tx) error {
		moved = moved[:0]
		var team uuid.NullUUID
		err := tx.QueryRow(ctx, `
			update hosts set status = 'unreachable', updated_at = now()
			 where id = $1
			   and status <> 'unreachable'
			   and (last_heartbeat_at is null or last_heartbeat_at < now() - make_interval(secs => $2))
			returning team_id`, host, r.cfg.UnreachableAfter.Seconds()).Scan(&team)
		if errors.Is(err, pgx.ErrNoRows) {
			return nil // fresh heartbeat, already unreachable, or gone
		}
		if err != nil {
			return fmt.Errorf("mark host %s unreachable: %w", host, err)
		}
		res.MarkedDown = true
		rows, err := tx.Query(ctx, `
			with old as (
				select id, status from sandboxes
				 where host_id = $1 and status = any($2)
				   for update)
			update sandboxes s set status = 'missing', last_updated = now()
			  from old where s.id = old.id
			returning s.id, old.status`, host, MissingOnHostDown)
		if err != nil {
			return fmt.Errorf("mark sandboxes of host %s missing: %w", host, err)
		}
		for rows.Next() {
			var m struct {
				id   uuid.UUID
				from string
			}
			if err := rows.Scan(&m.id, &m.from); err != nil {
				rows.Close()
				return err
			}
			moved = append(moved, m)
		}
		rows.Close()
		if err := rows.Err(); err != nil {
			return fmt.Errorf("mark sandboxes of host %s missing: %w", host, err)
		}
		if team.Valid {
			a := &Audit{Action: "marked_down", Status: "error", Reason: "heartbeat_timeout",
				Error: fmt.Sprintf("no heartbeat for more than %s", r.cfg.UnreachableAfter)}
			if err := insertAudit(ctx, tx, f, team.UUID, "host", ids.Host(host), a); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		res.MarkedDown = false
		return res, err
	}
	if res.MarkedDown {
		r.m.markedDown.Inc()
		res.MadeMissing = len(moved)
		for _, m := range moved {
			r.m.transitions.WithLabelValues(m.from, StatusMissing).Inc()
		}
		r.log.Info("host marked unreachable", "host", host, "shard", f.Shard, "sandboxes_missing", len(moved))
	}
	return res, nil
}

// ReconcileHost is the active reconcile (SPEC §2 items 2–7) of one host. It
// reads the host's rows first, then asks the agent, so any control-plane
// transition after the read makes the compare-and-set miss instead of being
// overwritten. Zombies are destroyed on the agent only after a fenced check
// that they are still stopped, with the fence token in the Vigil-Fence header;
// their audit rows follow in a second fenced transaction.
func (r *Reconciler) ReconcileHost(ctx context.Context, f store.Fence, hostID uuid.UUID) (res Result, err error) {
	start := time.Now()
	defer func() { r.observe("active", start, &res, err) }()

	host, found, err := r.store.Host(ctx, hostID)
	if err != nil {
		return res, err
	}
	switch {
	case !found:
		res.Skipped = "host gone"
		return res, nil
	case host.Status != HostOnline:
		res.Skipped = "host " + host.Status
		return res, nil
	case host.Address == "":
		res.Skipped = "host has no address"
		return res, nil
	}

	rows, dbNow, err := r.loadRows(ctx, hostID)
	if err != nil {
		return res, err
	}
	resp, err := r.agents.ListSandboxes(ctx, hostID, host.Address)
	if err != nil {
		return res, fmt.Errorf("%w: %w", errAgent, err)
	}
	report, problems := ParseReport(resp)
	res.Problems = problems
	for _, p := range problems {
		r.m.reportProblems.WithLabelValues(p.Kind).Inc()
		r.log.Warn("agent report entry not trusted", "host", hostID, "problem", p.Kind, "sandbox", p.SandboxID, "detail", p.Detail)
	}
	if paused := report.PausedIDs(); len(paused) > 0 {
		z, err := r.loadZombieCandidates(ctx, hostID, paused, dbNow)
		if err != nil {
			return res, err
		}
		rows = append(rows, z...)
	}

	actions := Decide(r.cfg.Rules, rows, report, dbNow)
	if len(actions) == 0 {
		return res, nil
	}
	var zombies []Action
	err = r.store.WithFence(ctx, f, func(tx pgx.Tx) error {
		res.Applied, res.Missed, zombies = nil, 0, nil
		for _, a := range actions {
			ok, err := applyAction(ctx, tx, f, hostID, a)
			if err != nil {
				return err
			}
			switch {
			case !ok:
				res.Missed++
			case a.Kind == DestroyOnAgent:
				zombies = append(zombies, a)
			default:
				res.Applied = append(res.Applied, a)
			}
		}
		return nil
	})
	if err != nil {
		res.Applied = nil
		return res, err
	}
	for _, a := range res.Applied {
		r.m.transitions.WithLabelValues(a.From, a.To).Inc()
		r.log.Debug("sandbox transition", "host", hostID, "sandbox", a.Sandbox, "from", a.From, "to", a.To)
	}
	if len(zombies) == 0 {
		return res, nil
	}

	var destroyed []Action
	for _, z := range zombies {
		if err := r.agents.DestroySandbox(ctx, hostID, host.Address, ids.Sandbox(z.Sandbox), f.Header()); err != nil {
			r.log.Warn("destroy zombie on agent failed", "host", hostID, "sandbox", z.Sandbox, "error", err)
			continue
		}
		destroyed = append(destroyed, z)
	}
	if len(destroyed) == 0 {
		return res, nil
	}
	err = r.store.WithFence(ctx, f, func(tx pgx.Tx) error {
		for _, z := range destroyed {
			if err := insertAudit(ctx, tx, f, z.TeamID, "sandbox", ids.Sandbox(z.Sandbox), z.Audit); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		return res, err
	}
	res.Destroyed = len(destroyed)
	r.m.zombies.Add(float64(len(destroyed)))
	res.Applied = append(res.Applied, destroyed...)
	return res, nil
}

func (r *Reconciler) loadRows(ctx context.Context, host uuid.UUID) ([]Row, time.Time, error) {
	var dbNow time.Time
	var out []Row
	err := pgx.BeginTxFunc(ctx, r.store.Pool(), pgx.TxOptions{AccessMode: pgx.ReadOnly}, func(tx pgx.Tx) error {
		if err := tx.QueryRow(ctx, `select now()`).Scan(&dbNow); err != nil {
			return err
		}
		rows, err := tx.Query(ctx, `
			select id, team_id, status, last_updated from sandboxes
			 where host_id = $1 and status = any($2)
			 order by id`, host, ActiveStatuses)
		if err != nil {
			return err
		}
		out, err = pgx.CollectRows(rows, scanRow)
		return err
	})
	if err != nil {
		return nil, dbNow, fmt.Errorf("read sandboxes of host %s: %w", host, err)
	}
	return out, dbNow, nil
}

// loadZombieCandidates reads rows stopped before the reconcile's first read
// among the sandboxes the agent reports paused. A row stopped after that read
// may be a destroy the control plane is finishing right now; it waits for the
// next pass.
func (r *Reconciler) loadZombieCandidates(ctx context.Context, host uuid.UUID, paused []uuid.UUID, before time.Time) ([]Row, error) {
	rows, err := r.store.Pool().Query(ctx, `
		select id, team_id, status, last_updated from sandboxes
		 where host_id = $1 and status = 'stopped' and id = any($2) and last_updated <= $3
		 order by id`, host, paused, before)
	if err != nil {
		return nil, fmt.Errorf("read stopped sandboxes of host %s: %w", host, err)
	}
	out, err := pgx.CollectRows(rows, scanRow)
	if err != nil {
		return nil, fmt.Errorf("read stopped sandboxes of host %s: %w", host, err)
	}
	return out, nil
}

func scanRow(r pgx.CollectableRow) (Row, error) {
	var x Row
	err := r.Scan(&x.ID, &x.TeamID, &x.Status, &x.LastUpdated)
	return x, err
}

// applyAction performs one action inside a fenced transaction. ok is false
// when the row no longer has the status and last_updated the decision saw.
func applyAction(ctx context.Context, tx pgx.Tx, f store.Fence, host uuid.UUID, a Action) (ok bool, err error) {
	if a.Kind == DestroyOnAgent {
		var one int
		err := tx.QueryRow(ctx, `
			select 1 from sandboxes
			 where id = $1 and host_id = $2 and status = 'stopped' and last_updated = $3
			   for share`, a.Sandbox, host, a.Seen).Scan(&one)
		if errors.Is(err, pgx.ErrNoRows) {
			return false, nil
		}
		if err != nil {
			return false, fmt.Errorf("check zombie %s: %w", a.Sandbox, err)
		}
		return true, nil
	}
	tag, err := tx.Exec(ctx, `
		update sandboxes set status = $3, last_updated = now()
		 where id = $1 and host_id = $2 and status = $4 and last_updated = $5`,
		a.Sandbox, host, a.To, a.From, a.Seen)
	if err != nil {
		return false, fmt.Errorf("set sandbox %s %s -> %s: %w", a.Sandbox, a.From, a.To, err)
	}
	if tag.RowsAffected() == 0 {
		return false, nil
	}
	if a.Audit != nil {
		if err := insertAudit(ctx, tx, f, a.TeamID, "sandbox", ids.Sandbox(a.Sandbox), a.Audit); err != nil {
			return false, err
		}
	}
	return true, nil
}

func insertAudit(ctx context.Context, tx pgx.Tx, f store.Fence, team uuid.UUID, resourceType, resourceID string, a *Audit) error {
	meta := map[string]any{"reason": a.Reason, "replica": f.Replica, "fence": f.Token, "shard": f.Shard}
	if a.Phase != "" {
		meta["phase"] = a.Phase
	}
	if a.Status == "error" && a.Error != "" {
		meta["error"] = a.Error
	}
	b, err := json.Marshal(meta)
	if err != nil {
		return err
	}
	_, err = tx.Exec(ctx, `
		insert into audit_logs (id, team_id, actor_type, actor_id, actor_name, resource_type, resource_id, action, scope, status, metadata, created_at)
		values ($1, $2, 'system', null, '', $3, $4, $5, 'team', $6, $7, now())`,
		uuid.New(), team, resourceType, resourceID, a.Action, a.Status, b)
	if err != nil {
		return fmt.Errorf("write audit row %s %s: %w", resourceID, a.Action, err)
	}
	return nil
}

// ReconcileHosts runs the passive rule on every host and then the active
// reconcile on those still online, at most Concurrency hosts at once, each
// host on its own so one hung agent delays only itself (every agent call has
// a deadline). It returns ErrFenced as soon as any write is fenced — the
// shard is lost and the rest is abandoned — and otherwise the number of
// hosts whose reconcile failed.
func (r *Reconciler) ReconcileHosts(ctx context.Context, f store.Fence, hosts []uuid.UUID) (failed int, err error) {
	g, gctx := errgroup.WithContext(ctx)
	g.SetLimit(r.cfg.Concurrency)
	results := make([]error, len(hosts))
	for i, h := range hosts {
		if gctx.Err() != nil {
			break
		}
		g.Go(func() error {
			res, err := r.MarkStale(gctx, f, h)
			if err == nil && !res.MarkedDown {
				_, err = r.ReconcileHost(gctx, f, h)
			}
			if errors.Is(err, ErrFenced) {
				return err
			}
			if err != nil && gctx.Err() == nil {
				r.log.Warn("reconcile host failed", "host", h, "shard", f.Shard, "error", err)
			}
			results[i] = err
			return nil
		})
	}
	if err := g.Wait(); err != nil {
		return 0, err
	}
	if err := ctx.Err(); err != nil {
		return 0, err
	}
	for _, e := range results {
		if e != nil {
			failed++
		}
	}
	return failed, nil
}
