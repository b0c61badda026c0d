package main

// Failover (SIGKILL of the leader, which owns shards too, then of another
// replica), handover (SIGTERM of another replica), and unreachable detection
// (hosts that stop heartbeating), each on a running cluster, which is
// brought back to its replica count afterwards.

import (
	"context"
	"fmt"
	"syscall"
	"time"

	"github.com/google/uuid"
)

type faultStats struct {
	victim    string
	moved     int
	shards    []int           // the moved shards
	reclaim   []time.Duration // kill/term → owner key put by another replica
	firstPass []time.Duration // kill/term → first completed pass by the new owner
	gaps      []time.Duration // SIGTERM: owner key deleted → put by the new owner
	missing   int             // moved shards without a reclaim (or pass) by the deadline
	peers     peerCounts      // SIGKILL: the survivors' peer counters, after − before
}

// faultResults are everything the fault figures are made of.
type faultResults struct {
	leader, observer, term          *faultStats
	leaderErr, observerErr, termErr error
	lags                            []time.Duration
	unErr                           error
}

// summary is one line for the progress log.
func (s *faultStats) summary() string {
	out := fmt.Sprintf("%s had %d shards", s.victim, s.moved)
	if len(s.reclaim) > 0 {
		out += fmt.Sprintf(", all claimed by %s", maxDur(s.reclaim).Round(time.Millisecond))
	}
	if len(s.firstPass) > 0 {
		out += fmt.Sprintf(", passed by %s", maxDur(s.firstPass).Round(time.Millisecond))
	}
	if s.missing > 0 {
		out += fmt.Sprintf(", %d missing", s.missing)
	}
	return out
}

// measureKill SIGKILLs the leader (ofLeader) or the longest-running replica
// other than the leader, and follows each of its shards to its new owner's
// key and first completed pass, and the survivors' peer counters over it.
func (c *cluster) measureKill(ctx context.Context, ofLeader bool) (*faultStats, error) {
	owners, leader, err := c.own.state()
	if err != nil {
		return nil, err
	}
	victim := c.killVictim(leader, ofLeader)
	if victim == nil {
		return nil, fmt.Errorf("no live replica to kill (leader %q)", leader)
	}
	moved := owned(owners, victim.id)
	if len(moved) == 0 {
		return nil, fmt.Errorf("%s owns no shard", victim.id)
	}
	before := c.peerCounts(ctx)
	t := time.Now()
	if err := c.signal(victim, syscall.SIGKILL); err != nil {
		return nil, err
	}
	victim.wait(10 * time.Second)
	st, err := c.follow(ctx, victim.id, moved, t, false)
	if st != nil {
		st.peers = peerDelta(before, c.peerCounts(ctx))
	}
	return st, err
}

// killVictim is the leader (ofLeader; the oldest replica when no leader is
// known), or else the oldest replica other than the leader: an original
// one, which every survivor has long held a liveness connection to, rather
// than a replacement started by restore.
func (c *cluster) killVictim(leader string, ofLeader bool) *replica {
	live := c.liveReplicas()
	for _, r := range live {
		if (r.id == leader) == ofLeader {
			return r
		}
	}
	if ofLeader && len(live) > 0 {
		return live[0]
	}
	return nil
}

// measureTerm SIGTERMs a replica other than the leader and measures each
// moved shard's handover gap and first pass.
func (c *cluster) measureTerm(ctx context.Context) (*faultStats, error) {
	owners, leader, err := c.own.state()
	if err != nil {
		return nil, err
	}
	var victim *replica
	for _, r := range c.liveReplicas() {
		if r.id != leader {
			victim = r
		}
	}
	if victim == nil {
		return nil, fmt.Errorf("no replica besides the leader")
	}
	moved := owned(owners, victim.id)
	if len(moved) == 0 {
		return nil, fmt.Errorf("%s owns no shard", victim.id)
	}
	t := time.Now()
	if err := c.signal(victim, syscall.SIGTERM); err != nil {
		return nil, err
	}
	st, err := c.follow(ctx, victim.id, moved, t, true)
	if !victim.wait(30 * time.Second) {
		victim.kill()
		if err == nil {
			err = fmt.Errorf("%s still running 30s after SIGTERM", victim.id)
		}
	}
	return st, err
}

// follow waits until every moved shard has been claimed by another replica
// and (when vigil exports last-pass timestamps) passed by it, or the
// deadline passes; shards that did not get there count as missing.
func (c *cluster) follow(ctx context.Context, victim string, moved []int, t time.Time, gaps bool) (*faultStats, error) {
	passKnown := c.e.caps.Metrics[mLastPass]
	m := &moves{victim: victim, t: t, reclaim: map[int]time.Duration{}, pass: map[int]time.Duration{}, gap: map[int]time.Duration{}}
	timeout, what := c.limit(c.followTimeout(), "moved shards re-owned")
	_, err := poll(ctx, timeout, 100*time.Millisecond, what, func() (bool, string, error) {
		m.fromWatch(c.own, moved)
		if passKnown {
			scrapes, _ := c.scrapeAll(ctx)
			m.fromScrapes(scrapes, moved)
		}
		done := len(m.reclaim) == len(moved) && (!passKnown || len(m.pass) == len(moved)) && (!gaps || len(m.gap) == len(moved))
		return done, fmt.Sprintf("%d of %d shards re-claimed, %d passed", len(m.reclaim), len(moved), len(m.pass)), nil
	})
	if err != nil && ctx.Err() != nil {
		return nil, err
	}
	st := &faultStats{victim: victim, moved: len(moved), shards: moved}
	for _, s := range moved {
		r, okR := m.reclaim[s]
		if okR {
			st.reclaim = append(st.reclaim, r)
		}
		p, okP := m.pass[s]
		if okP {
			st.firstPass = append(st.firstPass, p)
		}
		if g, ok := m.gap[s]; ok {
			st.gaps = append(st.gaps, g)
		}
		if !okR || (passKnown && !okP) {
			st.missing++
		}
	}
	return st, nil
}

// moves records, per moved shard, how long after t it was re-claimed (and
// the gap after the victim's delete) and first passed by its new owner.
type moves struct {
	victim             string
	t                  time.Time
	reclaim, pass, gap map[int]time.Duration
}

// fromWatch finds each shard's first put by another replica after t.
func (m *moves) fromWatch(own *ownership, moved []int) {
	for _, s := range moved {
		if _, ok := m.reclaim[s]; ok {
			continue
		}
		var deleted time.Time
		for _, ev := range own.events(s, m.t) {
			if !ev.put && ev.owner == m.victim && deleted.IsZero() {
				deleted = ev.at
			}
			if ev.put && ev.owner != m.victim {
				m.reclaim[s] = ev.at.Sub(m.t)
				if !deleted.IsZero() {
					m.gap[s] = ev.at.Sub(deleted)
				}
				break
			}
		}
	}
}

// fromScrapes finds each shard's first completed pass after t: the
// last-pass gauge is the pass's completion time, by the replica's clock
// (this machine's).
func (m *moves) fromScrapes(scrapes map[string]scrape, moved []int) {
	t := float64(m.t.UnixNano()) / 1e9
	for _, sc := range scrapes {
		byShard := sc.byShard(mLastPass)
		for _, s := range moved {
			if _, ok := m.pass[s]; ok {
				continue
			}
			if v, ok := byShard[s]; ok && v >= t {
				m.pass[s] = time.Duration((v - t) * 1e9)
			}
		}
	}
}

// followTimeout is how long a moved shard may take to be passed by its new
// owner before it counts as missing: the lease TTL plus twice the steady
// sweep (a pass of a saturated replica can take that long), at least TTL + 20 s.
func (c *cluster) followTimeout() time.Duration {
	return c.leaseTTL + max(20*time.Second, 2*c.steadySweep)
}

// restore brings the cluster back to n replicas and waits until it settles.
func (c *cluster) restore(ctx context.Context, n int) error {
	for len(c.liveReplicas()) < n {
		if _, err := c.start(ctx); err != nil {
			return err
		}
	}
	_, err := c.waitSettled(ctx, c.e.opts.SweepTimeout)
	return err
}

// measureUnreachable stops the heartbeats of k hosts and records, per host,
// updated_at − last_heartbeat_at of the row when it became unreachable; then
// lets them heartbeat again and waits until they are online.
func measureUnreachable(ctx context.Context, c *cluster, f *fleet, k int) ([]time.Duration, error) {
	e := c.e
	hosts := f.hosts[:k]
	ids := make([]uuid.UUID, k)
	for i, h := range hosts {
		ids[i] = h.ID
		if err := h.setMode(ctx, `{"kind":"healthy","skip_heartbeat":true}`); err != nil {
			return nil, err
		}
	}
	restore := func() error {
		for _, h := range hosts {
			if err := h.setMode(ctx, `{"kind":"healthy"}`); err != nil {
				return err
			}
		}
		for _, s := range f.sims {
			if err := (fleetHost{sim: s}).heartbeat(ctx); err != nil {
				return err
			}
		}
		_, err := poll(ctx, 30*time.Second, 100*time.Millisecond, "hosts online again", func() (bool, string, error) {
			var n int
			err := e.db.QueryRow(ctx, `select count(*) from hosts where id = any($1) and status <> 'online'`, ids).Scan(&n)
			return n == 0, fmt.Sprintf("%d not online", n), err
		})
		return err
	}
	lags := map[uuid.UUID]time.Duration{}
	timeout, what := c.limit(e.opts.UnreachableAfter+e.opts.Heartbeat+30*time.Second, "hosts unreachable")
	_, err := poll(ctx, timeout, 100*time.Millisecond, what, func() (bool, string, error) {
		rows, err := e.db.Query(ctx, `select id, updated_at, last_heartbeat_at from hosts where id = any($1) and status = 'unreachable'`, ids)
		if err != nil {
			return false, "", err
		}
		defer rows.Close()
		for rows.Next() {
			var id uuid.UUID
			var updated time.Time
			var heartbeat *time.Time
			if err := rows.Scan(&id, &updated, &heartbeat); err != nil {
				return false, "", err
			}
			if _, ok := lags[id]; !ok && heartbeat != nil {
				lags[id] = updated.Sub(*heartbeat)
			}
		}
		return len(lags) == k, fmt.Sprintf("%d of %d unreachable", len(lags), k), rows.Err()
	})
	if rerr := restore(); rerr != nil && err == nil {
		err = rerr
	}
	var out []time.Duration
	for _, id := range ids {
		if l, ok := lags[id]; ok {
			out = append(out, l)
		}
	}
	if err != nil && len(out) < k {
		return out, fmt.Errorf("%d of %d hosts marked unreachable: %w", len(out), k, err)
	}
	return out, err
}
