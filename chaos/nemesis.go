package chaos

import (
	"context"
	"errors"
	"fmt"
	"sort"
	"syscall"
	"time"

	"github.com/google/uuid"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/vigil-sh/vigil/shard"
)

// fault is one nemesis as it happened.
type fault struct {
	kind   string
	target string // replica id, etcd member, or "" for cluster-wide faults
	start  time.Time
	lostAt time.Time // owner-loss faults: the moment the victim lost the means to act (kill, stop, cut)
	healed time.Time
	// settled is when the cluster owned every shard as assigned again after
	// the heal; zero if it did not within the bound (see recoverErr).
	settled    time.Time
	recoverErr error

	// Owner-loss faults: the victim and the shards (with their tokens) it
	// owned when the fault began.
	victim      *member
	vigilLeader bool // the victim was the vigil leader when it lost its shards
	owned       map[int]int64
	etcdEvents  int64 // recorder revision at the start
	handover    bool  // rolling restart / scale-down: a graceful handover, not a loss
	keysDeleted bool  // delete-owner-keys: successors claimed before the victim's lease could expire
	inTx        bool  // pause-in-tx: the victim was frozen inside a fenced transaction
	etcdMember  string
	partitioned bool // an etcd member was cut off: no shard should move
	wasLeader   bool // the etcd member the fault hit was the leader
	detail      string
}

// nemesis is one kind of fault: inject, hold, heal. ok reports whether the
// kind can run now (enough replicas, events present, ...).
type nemesis struct {
	kind   string
	weight int
	ok     func(e *env) bool
	run    func(e *env, ctx context.Context, f *fault) error
}

// nemeses are every kind of fault the harness knows.
var nemeses = []nemesis{
	{kind: "kill", weight: 4, ok: always, run: (*env).nemKill},
	{kind: "pause", weight: 4, ok: always, run: (*env).nemPause},
	{kind: "pause-in-tx", weight: 4, ok: always, run: (*env).nemPauseInTx},
	{kind: "pause-pg-stalled", weight: 3, ok: always, run: (*env).nemPausePGStalled},
	{kind: "stall-in-tx", weight: 3, ok: always, run: (*env).nemStallInTx},
	{kind: "delete-owner-keys", weight: 4, ok: func(e *env) bool { return len(e.live()) >= 3 }, run: (*env).nemDeleteOwnerKeys},
	{kind: "cut-etcd", weight: 3, ok: always, run: nemCut("etcd")},
	{kind: "cut-postgres", weight: 2, ok: always, run: nemCut("postgres")},
	{kind: "cut-both", weight: 2, ok: always, run: nemCut("both")},
	{kind: "one-way-etcd-answers", weight: 2, ok: always, run: nemOneWay(downstream)},
	{kind: "one-way-etcd-requests", weight: 1, ok: always, run: nemOneWay(upstream)},
	{kind: "etcd-kill-member", weight: 2, ok: always, run: nemEtcdKill(false)},
	{kind: "etcd-kill-leader", weight: 2, ok: always, run: nemEtcdKill(true)},
	{kind: "etcd-stall-member", weight: 2, ok: always, run: (*env).nemEtcdStall},
	{kind: "etcd-partition-member", weight: 2, ok: always, run: (*env).nemEtcdPartition},
	{kind: "etcd-slow-peers", weight: 1, ok: always, run: (*env).nemEtcdSlowPeers},
	{kind: "postgres-outage", weight: 1, ok: always, run: (*env).nemPostgresOutage},
	{kind: "postgres-restart", weight: 1, ok: func(e *env) bool { return e.pg != nil }, run: (*env).nemPostgresRestart},
	{kind: "failover-async", weight: 2, ok: func(e *env) bool { return e.pg != nil }, run: nemFailover(false)},
	{kind: "failover-sync", weight: 2, ok: func(e *env) bool { return e.pg != nil }, run: nemFailover(true)},
	{kind: "redis-outage", weight: 1, ok: func(e *env) bool { return e.events != nil }, run: (*env).nemRedisOutage},
	{kind: "rolling-restart", weight: 1, ok: always, run: (*env).nemRollingRestart},
	{kind: "scale-up", weight: 1, ok: func(e *env) bool { return len(e.live()) < e.cfg.MaxReplicas }, run: (*env).nemScaleUp},
	{kind: "scale-down", weight: 1, ok: func(e *env) bool { return len(e.live()) > e.cfg.Replicas }, run: (*env).nemScaleDown},
}

func always(*env) bool { return true }

// NemesisKinds lists every fault kind.
func NemesisKinds() []string {
	out := make([]string, len(nemeses))
	for i, n := range nemeses {
		out[i] = n.kind
	}
	return out
}

// nemeses runs faults one after another, chosen from the seed, until end.
// After each heal the cluster must settle again within settleBound.
func (e *env) nemeses(ctx context.Context, end time.Time) error {
	allowed := map[string]bool{}
	for _, k := range e.cfg.Kinds {
		allowed[k] = true
	}
	// Every allowed kind runs once, in a seeded order, before the weights
	// take over, so even a short run sees each.
	var first []nemesis
	for _, n := range nemeses {
		if len(allowed) == 0 || allowed[n.kind] {
			first = append(first, n)
		}
	}
	if len(first) == 0 {
		return fmt.Errorf("no fault kinds among %v (known: %v)", e.cfg.Kinds, NemesisKinds())
	}
	e.rng.Shuffle(len(first), func(i, j int) { first[i], first[j] = first[j], first[i] })
	pool := append([]nemesis(nil), first...)
	for time.Now().Before(end) && ctx.Err() == nil {
		var n nemesis
		if len(first) > 0 {
			n, first = first[0], first[1:]
		} else {
			n = pickWeighted(e, pool)
		}
		if !n.ok(e) {
			continue
		}
		f := &fault{kind: n.kind, start: time.Now(), etcdEvents: e.rec.State().Rev}
		e.logf("fault %s", n.kind)
		err := n.run(e, ctx, f)
		if f.healed.IsZero() {
			f.healed = time.Now()
		}
		if err != nil {
			if ctx.Err() != nil {
				return ctx.Err()
			}
			f.recoverErr = err
			e.note("fault %s on %s: %v", f.kind, f.target, err)
		}
		e.mu.Lock()
		e.faults = append(e.faults, f)
		e.mu.Unlock()
		if err := e.replenish(ctx); err != nil {
			return err
		}
		if err := poll(ctx, 60*time.Second, "etcd healthy again", func() (bool, string) { return e.etcd.healthy(ctx) }); err != nil {
			if ctx.Err() != nil {
				return ctx.Err()
			}
			f.recoverErr = errors.Join(f.recoverErr, err)
			e.note("after fault %s on %s etcd did not heal: %v", f.kind, f.target, err)
		}
		at, err := e.waitSettled(ctx, e.settleBound())
		if err != nil {
			if ctx.Err() != nil {
				return ctx.Err()
			}
			f.recoverErr = errors.Join(f.recoverErr, err)
			e.note("after fault %s on %s the cluster did not settle: %v", f.kind, f.target, err)
			continue
		}
		f.settled = at
		what := f.kind
		if f.target != "" {
			what += " on " + f.target
		}
		if f.detail != "" {
			what += " (" + f.detail + ")"
		}
		e.logf("  %s: healed after %s, settled %s later", what,
			f.healed.Sub(f.start).Round(time.Millisecond), at.Sub(f.healed).Round(time.Millisecond))
		// A short seeded gap, so faults do not always land on the same
		// phase of the passes.
		gap := e.cfg.FaultGap
		if gap == 0 {
			gap = time.Duration(e.rng.Int64N(int64(e.cfg.Interval)))
		}
		if err := hold(ctx, min(gap, time.Until(end))); err != nil {
			return err
		}
	}
	return nil
}

func pickWeighted(e *env, pool []nemesis) nemesis {
	total := 0
	for _, n := range pool {
		total += n.weight
	}
	r := e.rng.IntN(total)
	for _, n := range pool {
		if r < n.weight {
			return n
		}
		r -= n.weight
	}
	return pool[len(pool)-1]
}

// settleBound is how long the cluster may take to settle after a heal: a
// replica cut off for a while first has to notice, rejoin with a new lease
// and take its shards back.
func (e *env) settleBound() time.Duration { return 6*e.cfg.LeaseTTL + 20*time.Second }

// replenish starts replicas until the floor is met (after kills).
func (e *env) replenish(ctx context.Context) error {
	for len(e.live()) < e.cfg.Replicas {
		if _, err := e.startMember(ctx); err != nil {
			return err
		}
	}
	return nil
}

// victim picks a live replica; the vigil leader a third of the time.
func (e *env) victim() *member {
	live := e.live()
	if leader := e.rec.State().Leader; leader != "" && e.rng.IntN(3) == 0 {
		for _, m := range live {
			if m.id == leader {
				return m
			}
		}
	}
	return live[e.rng.IntN(len(live))]
}

// lose names the victim of an owner-loss fault and the shards it owns now.
func (e *env) lose(f *fault, m *member) {
	f.victim, f.target = m, m.id
	e.markLost(f)
}

// markLost records the moment the victim loses the means to act: the shards
// (with their tokens) it owns at that moment and etcd's revision.
func (e *env) markLost(f *fault) {
	st := e.rec.State()
	f.owned = map[int]int64{}
	for _, s := range st.OwnedBy(f.victim.id) {
		f.owned[s] = st.Owners[s].CreateRev
	}
	f.etcdEvents = st.Rev
	f.vigilLeader = st.Leader == f.victim.id
	f.lostAt = time.Now()
}

// beyondTTL is a hold that outlasts the lease: TTL plus up to one more TTL.
func (e *env) beyondTTL() time.Duration {
	return e.cfg.LeaseTTL + 500*time.Millisecond + time.Duration(e.rng.Int64N(int64(e.cfg.LeaseTTL)))
}

// awaitSuccessors waits until every shard f's victim owned has another
// owner key (a successor, or the victim again under a new token).
func (e *env) awaitSuccessors(ctx context.Context, f *fault, timeout time.Duration) error {
	return poll(ctx, timeout, "successors of "+f.target+"'s shards", func() (bool, string) {
		st := e.rec.State()
		for s, tok := range f.owned {
			if o := st.Owners[s]; o.Value == "" || o.CreateRev == tok {
				return false, fmt.Sprintf("shard %d: owner %q token %d (was %d)", s, o.Value, o.CreateRev, tok)
			}
		}
		return true, ""
	})
}

func (e *env) nemKill(ctx context.Context, f *fault) error {
	m := e.victim()
	e.lose(f, m)
	err := e.kill(m)
	// The loss is the SIGKILL itself, not the last scrape before it.
	_, f.lostAt = m.ended()
	if err != nil {
		return err
	}
	f.healed = time.Now()
	return e.awaitSuccessors(ctx, f, 3*e.cfg.LeaseTTL+10*time.Second)
}

func (e *env) stop(m *member) error {
	m.setPaused(true)
	return m.r.Signal(syscall.SIGSTOP)
}

func (e *env) cont(m *member) error {
	err := m.r.Signal(syscall.SIGCONT)
	m.setPaused(false)
	return err
}

func (e *env) nemPause(ctx context.Context, f *fault) error {
	m := e.victim()
	e.lose(f, m)
	d := e.beyondTTL()
	f.detail = "paused " + d.Round(time.Millisecond).String()
	e.markLost(f)
	if err := e.stop(m); err != nil {
		return err
	}
	err := hold(ctx, d)
	if cerr := e.cont(m); err == nil {
		err = cerr
	}
	f.healed = time.Now()
	return err
}

// nemPauseInTx freezes a replica inside one of its fenced write
// transactions, holding the shard's fence row FOR SHARE: an orphan row is
// inserted on a host of one of its shards and locked by the harness, so the
// replica's compare-and-set (it stops the orphan) waits on it inside the
// transaction; the moment Postgres shows the replica's backend waiting, the
// process is stopped and the lock released. Postgres must end the frozen
// transaction (idle_in_transaction_session_timeout) so the successor's raise
// can go through, and the thawed replica must commit nothing.
func (e *env) nemPauseInTx(ctx context.Context, f *fault) error {
	m := e.victim()
	e.lose(f, m)
	f.inTx = true
	// A replica that owns no healthy host (just started, or every host of
	// its shards faulty) cannot be caught in a write: it is paused or cut
	// off all the same.
	hosts := e.hostsOf(f)
	for attempt := 0; attempt < 4 && len(hosts) > 0; attempt++ {
		caught, err := e.catchInWrite(ctx, m, hosts[e.rng.IntN(len(hosts))], func() error { e.markLost(f); return e.stop(m) })
		if err != nil {
			return err
		}
		if caught {
			d := e.beyondTTL()
			f.detail = "frozen inside a fenced transaction for " + d.Round(time.Millisecond).String()
			err := hold(ctx, d)
			if cerr := e.cont(m); err == nil {
				err = cerr
			}
			f.healed = time.Now()
			return err
		}
	}
	// Not caught in a transaction: freeze it anyway, so the fault is still
	// a pause.
	f.inTx = false
	f.detail = "not caught inside a transaction; paused"
	e.markLost(f)
	if err := e.stop(m); err != nil {
		return err
	}
	err := hold(ctx, e.beyondTTL())
	if cerr := e.cont(m); err == nil {
		err = cerr
	}
	f.healed = time.Now()
	return err
}

// catchInWrite tries once to catch m while its write transaction waits on a
// row the harness holds: then it calls freeze (which stops m or cuts it off)
// and releases the row. It reports whether it caught m.
func (e *env) catchInWrite(ctx context.Context, m *member, host uuid.UUID, freeze func() error) (bool, error) {
	row := uuid.New()
	if _, err := e.db.Exec(ctx, `insert into sandboxes (id, team_id, host_id, status, last_updated, created_at)
		values ($1, $2, $3, 'running', now(), now())`, row, e.work.teams[0], host); err != nil {
		return false, err
	}
	tx, err := e.db.Begin(ctx)
	if err != nil {
		return false, err
	}
	defer tx.Rollback(ctx)
	if _, err := tx.Exec(ctx, `select 1 from sandboxes where id = $1 for update`, row); err != nil {
		return false, err
	}
	var stoppedAt time.Time
	err = poll(ctx, 2*e.cfg.Interval+2*time.Second, m.id+" waiting on the locked row", func() (bool, string) {
		var waiting int
		if err := e.db.QueryRow(ctx, `select count(*) from pg_stat_activity
			 where datname = current_database() and application_name = $1 and wait_event_type = 'Lock'`,
			"vigil "+m.id).Scan(&waiting); err != nil {
			return false, err.Error()
		}
		if waiting == 0 {
			return false, "not waiting"
		}
		if err := freeze(); err != nil {
			return false, err.Error()
		}
		stoppedAt = time.Now()
		return true, ""
	})
	if stoppedAt.IsZero() {
		return false, nil
	}
	_ = tx.Rollback(ctx)
	return true, err
}

// nemPausePGStalled blackholes a replica's Postgres link, so its statements
// in flight (a read, a BEGIN, a fence check) stall, then freezes it beyond
// the lease; the link heals just before the thaw, so the stalled answers
// are waiting for it when it runs again.
func (e *env) nemPausePGStalled(ctx context.Context, f *fault) error {
	m := e.victim()
	e.lose(f, m)
	f.start = time.Now()
	m.pgPx.Blackhole()
	// Long enough for the next pass's statements to be stuck in the link.
	if err := hold(ctx, e.cfg.Interval/2); err != nil {
		m.pgPx.Heal()
		return err
	}
	e.markLost(f)
	if err := e.stop(m); err != nil {
		m.pgPx.Heal()
		return err
	}
	d := e.beyondTTL()
	f.detail = "Postgres link stalled, then paused " + d.Round(time.Millisecond).String()
	err := e.awaitSuccessors(ctx, f, d+3*e.cfg.LeaseTTL)
	m.pgPx.Heal()
	if cerr := e.cont(m); err == nil {
		err = cerr
	}
	f.healed = time.Now()
	return err
}

// nemStallInTx catches a replica inside a fenced transaction as
// pause-in-tx does, but instead of stopping it cuts it off from etcd and
// stalls its Postgres link: its session ends, its backend sits idle in the
// transaction holding the fence row, and Postgres must end it so the
// successor's raise can go through.
func (e *env) nemStallInTx(ctx context.Context, f *fault) error {
	m := e.victim()
	e.lose(f, m)
	// A replica that owns no healthy host (just started, or every host of
	// its shards faulty) cannot be caught in a write: it is paused or cut
	// off all the same.
	hosts := e.hostsOf(f)
	cut := func() error {
		e.markLost(f)
		m.pgPx.Blackhole()
		m.blackholeEtcd()
		return nil
	}
	f.detail = "not caught inside a transaction; cut off"
	for attempt := 0; attempt < 4 && len(hosts) > 0; attempt++ {
		caught, err := e.catchInWrite(ctx, m, hosts[e.rng.IntN(len(hosts))], cut)
		if err != nil {
			m.healEtcd()
			m.pgPx.Heal()
			return err
		}
		if caught {
			f.inTx = true
			f.detail = "Postgres link stalled inside a fenced transaction, etcd cut"
			break
		}
	}
	if !f.inTx {
		_ = cut()
	}
	err := hold(ctx, e.beyondTTL())
	m.healEtcd()
	m.pgPx.Heal()
	f.healed = time.Now()
	return err
}

// nemDeleteOwnerKeys deletes a replica's member key and owner keys from
// under it while it is cut off from etcd (an operator's etcdctl del, a
// restore from an old backup): the leader moves its shards and successors
// claim them at once, long before the cut-off replica's lease could expire
// — while it still believes it owns them and keeps writing through its
// healthy Postgres link. Only the fences stand between its writes and its
// successors'; orphan rows are fed to its shards meanwhile so both sides
// have writes to make.
func (e *env) nemDeleteOwnerKeys(ctx context.Context, f *fault) error {
	leader := e.rec.State().Leader
	var m *member
	for _, x := range e.live() {
		if x.id != leader && (m == nil || e.rng.IntN(2) == 0) {
			m = x
		}
	}
	if m == nil {
		return errors.New("no replica but the leader")
	}
	e.lose(f, m)
	f.keysDeleted = true
	hosts := e.hostsOf(f)
	m.blackholeEtcd()
	ops := []clientv3.Op{clientv3.OpDelete(e.layout.Member(m.id))}
	for s := range f.owned {
		ops = append(ops, clientv3.OpDelete(e.layout.Shard(s)))
	}
	dctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	_, err := e.etcd.cli.Txn(dctx).Then(ops...).Commit()
	cancel()
	if err != nil {
		m.healEtcd()
		return fmt.Errorf("delete the keys of %s: %w", m.id, err)
	}
	feedCtx, stopFeed := context.WithCancel(ctx)
	fed := make(chan int)
	go func() { fed <- e.feedOrphans(feedCtx, hosts) }()
	err = e.awaitSuccessors(ctx, f, 2*e.cfg.LeaseTTL+10*time.Second)
	if herr := hold(ctx, time.Until(f.lostAt.Add(e.cfg.LeaseTTL+time.Second))); err == nil {
		err = herr
	}
	stopFeed()
	f.detail = fmt.Sprintf("member and %d owner keys deleted while cut off from etcd; %d orphan rows fed", len(f.owned), <-fed)
	m.healEtcd()
	f.healed = time.Now()
	return err
}

// feedOrphans inserts a sandbox row no agent has on one of hosts every
// 50ms until ctx ends, and returns how many. Each time, it also makes the
// host look as if it just came back (unreachable -> online, the reconnect
// trigger's NOTIFY), so every replica that believes it owns the host
// reconciles it at once: the deposed owner and its successor both reach
// for the orphans, and only the fence tells them apart.
func (e *env) feedOrphans(ctx context.Context, hosts []uuid.UUID) int {
	n := 0
	t := time.NewTicker(50 * time.Millisecond)
	defer t.Stop()
	for i := 0; ; i++ {
		select {
		case <-ctx.Done():
			return n
		case <-t.C:
		}
		h := hosts[i%len(hosts)]
		if _, err := e.db.Exec(ctx, `insert into sandboxes (id, team_id, host_id, status, last_updated, created_at)
			values ($1, $2, $3, 'running', now(), now())`, uuid.New(), e.work.teams[0], h); err != nil {
			continue
		}
		n++
		if _, err := e.db.Exec(ctx, `update hosts set status = 'unreachable' where id = $1 and status = 'online'`, h); err == nil {
			_, _ = e.db.Exec(ctx, `update hosts set status = 'online' where id = $1 and status = 'unreachable'`, h)
		}
	}
}

// hostsOf lists the healthy agentsim hosts in the shards f's victim owned.
func (e *env) hostsOf(f *fault) []uuid.UUID {
	var hosts []uuid.UUID
	for _, h := range e.work.hosts {
		if _, ok := f.owned[shard.Of(h, e.cfg.Shards)]; ok && !e.work.excludedHost(h) {
			hosts = append(hosts, h)
		}
	}
	return hosts
}

// nemCut partitions a replica from etcd, Postgres or both (silently: a
// blackhole), beyond the lease, then heals.
func nemCut(what string) func(*env, context.Context, *fault) error {
	return func(e *env, ctx context.Context, f *fault) error {
		m := e.victim()
		e.lose(f, m)
		d := e.beyondTTL()
		f.detail = what + " blackholed " + d.Round(time.Millisecond).String()
		e.markLost(f)
		if what != "postgres" {
			m.blackholeEtcd()
		}
		if what != "etcd" {
			m.pgPx.Blackhole()
		}
		err := hold(ctx, d)
		m.healEtcd()
		m.pgPx.Heal()
		f.healed = time.Now()
		if what == "postgres" {
			f.owned = nil // still the owner: not an ownership loss
		}
		return err
	}
}

// nemOneWay holds one direction of a replica's etcd links: its requests
// reach etcd but no answer comes back, or the other way round.
func nemOneWay(d direction) func(*env, context.Context, *fault) error {
	return func(e *env, ctx context.Context, f *fault) error {
		m := e.victim()
		e.lose(f, m)
		hd := e.beyondTTL()
		f.detail = "etcd " + d.String() + " held " + hd.Round(time.Millisecond).String()
		e.markLost(f)
		m.holdEtcd(d)
		err := hold(ctx, hd)
		m.healEtcd()
		f.healed = time.Now()
		return err
	}
}

func nemEtcdKill(leader bool) func(*env, context.Context, *fault) error {
	return func(e *env, ctx context.Context, f *fault) error {
		lead := e.etcd.majorityLeader(ctx)
		var victim *etcdMember
		for _, m := range e.etcd.members {
			if (m.name == lead) == leader && m.running() {
				victim = m
				break
			}
		}
		if victim == nil {
			return fmt.Errorf("no etcd member to kill (leader %q)", lead)
		}
		f.target, f.etcdMember = victim.name, victim.name
		f.start = time.Now()
		if err := e.etcd.kill(victim); err != nil {
			return err
		}
		err := hold(ctx, 2*e.cfg.LeaseTTL+time.Duration(e.rng.Int64N(int64(e.cfg.LeaseTTL))))
		if rerr := e.etcd.restart(victim); err == nil {
			err = rerr
		}
		f.healed = time.Now()
		if err != nil {
			return err
		}
		return poll(ctx, 30*time.Second, "etcd to have a leader again", func() (bool, string) {
			return e.etcd.majorityLeader(ctx) != "", "no leader"
		})
	}
}

// nemEtcdStall stops a member's process (a stalled disk or machine), the
// leader half the time.
func (e *env) nemEtcdStall(ctx context.Context, f *fault) error {
	m := e.etcd.members[e.rng.IntN(len(e.etcd.members))]
	if e.rng.IntN(2) == 0 {
		lead := e.etcd.majorityLeader(ctx)
		for _, x := range e.etcd.members {
			if x.name == lead {
				m = x
			}
		}
	}
	f.target, f.etcdMember = m.name, m.name
	d := e.cfg.LeaseTTL + time.Duration(e.rng.Int64N(int64(e.cfg.LeaseTTL)))
	f.detail = "stalled " + d.Round(time.Millisecond).String()
	f.start = time.Now()
	if err := e.etcd.pause(m); err != nil {
		return err
	}
	err := hold(ctx, d)
	if rerr := e.etcd.resume(m); err == nil {
		err = rerr
	}
	f.healed = time.Now()
	return err
}

// nemEtcdPartition cuts one member off: its peers stop hearing it (its peer
// proxy is blackholed) and every replica's link to it is blackholed. The
// other two keep quorum, so no shard should move.
func (e *env) nemEtcdPartition(ctx context.Context, f *fault) error {
	i := e.rng.IntN(len(e.etcd.members))
	m := e.etcd.members[i]
	f.target, f.etcdMember, f.partitioned = m.name, m.name, true
	f.wasLeader = e.etcd.majorityLeader(ctx) == m.name
	d := 2*e.cfg.LeaseTTL + time.Duration(e.rng.Int64N(int64(e.cfg.LeaseTTL)))
	f.detail = "partitioned " + d.Round(time.Millisecond).String()
	if f.wasLeader {
		f.detail += " (the leader)"
	}
	f.start = time.Now()
	m.peerPx.Blackhole()
	live := e.live()
	for _, r := range live {
		r.etcdPx[i].Blackhole()
	}
	err := hold(ctx, d)
	m.peerPx.Heal()
	for _, r := range live {
		r.etcdPx[i].Heal()
	}
	f.healed = time.Now()
	return err
}

// nemEtcdSlowPeers makes one member's peer link stutter: blackholed 300 ms
// out of every 500 ms, for a few seconds.
func (e *env) nemEtcdSlowPeers(ctx context.Context, f *fault) error {
	m := e.etcd.members[e.rng.IntN(len(e.etcd.members))]
	f.target, f.etcdMember = m.name, m.name
	f.start = time.Now()
	end := time.Now().Add(2 * e.cfg.LeaseTTL)
	var err error
	for time.Now().Before(end) && err == nil {
		m.peerPx.Blackhole()
		err = hold(ctx, 300*time.Millisecond)
		m.peerPx.Heal()
		if err == nil {
			err = hold(ctx, 200*time.Millisecond)
		}
	}
	m.peerPx.Heal()
	f.healed = time.Now()
	return err
}

// nemPostgresOutage resets every replica's Postgres connections and refuses
// new ones for a while: what replicas see of a Postgres restart, without
// restarting a server other tests use.
func (e *env) nemPostgresOutage(ctx context.Context, f *fault) error {
	d := e.cfg.LeaseTTL/2 + time.Duration(e.rng.Int64N(int64(e.cfg.LeaseTTL)))
	f.detail = "every replica's Postgres link cut " + d.Round(time.Millisecond).String()
	f.start = time.Now()
	live := e.live()
	for _, m := range live {
		m.pgPx.Cut()
	}
	err := hold(ctx, d)
	for _, m := range live {
		m.pgPx.Heal()
	}
	f.healed = time.Now()
	return err
}

// nemPostgresRestart restarts the run's own Postgres server (fast
// shutdown: open transactions roll back, every connection drops).
func (e *env) nemPostgresRestart(ctx context.Context, f *fault) error {
	f.target = "postgres"
	f.start = time.Now()
	err := e.pg.restart(ctx)
	f.healed = time.Now()
	return err
}

// nemRedisOutage stops Redis as the replicas see it, without touching the
// machine's server: every replica's Redis link is cut (connections reset,
// new ones refused: Redis down) or, a third of the time, blackholed (Redis
// hung: nothing answers). Events must wait in the outbox and reach the
// stream once, in order, after the heal.
func (e *env) nemRedisOutage(ctx context.Context, f *fault) error {
	d := 2*e.cfg.LeaseTTL + time.Duration(e.rng.Int64N(int64(e.cfg.LeaseTTL)))
	hung := e.rng.IntN(3) == 0
	how := "cut"
	if hung {
		how = "blackholed"
	}
	f.detail = "every replica's Redis link " + how + " " + d.Round(time.Millisecond).String()
	f.start = time.Now()
	live := e.live()
	for _, m := range live {
		switch {
		case m.redisPx == nil:
		case hung:
			m.redisPx.Blackhole()
		default:
			m.redisPx.Cut()
		}
	}
	err := hold(ctx, d)
	for _, m := range live {
		if m.redisPx != nil {
			m.redisPx.Heal()
		}
	}
	f.healed = time.Now()
	return err
}

// nemRollingRestart replaces every replica, one at a time: a new one
// starts, the cluster settles, the old one is stopped with SIGTERM and
// hands its shards over.
func (e *env) nemRollingRestart(ctx context.Context, f *fault) error {
	f.handover = true
	old := e.live()
	f.target = fmt.Sprintf("%d replicas", len(old))
	f.start = time.Now()
	for _, m := range old {
		if _, err := e.startMember(ctx); err != nil {
			return err
		}
		if _, err := e.waitSettled(ctx, e.settleBound()); err != nil {
			return err
		}
		if _, err := e.terminate(m, 2*e.cfg.LeaseTTL+10*time.Second); err != nil {
			return err
		}
		if _, err := e.waitSettled(ctx, e.settleBound()); err != nil {
			return err
		}
	}
	f.healed = time.Now()
	return nil
}

func (e *env) nemScaleUp(ctx context.Context, f *fault) error {
	f.start = time.Now()
	m, err := e.startMember(ctx)
	if err != nil {
		return err
	}
	f.target, f.handover = m.id, true
	f.healed = time.Now()
	return nil
}

func (e *env) nemScaleDown(ctx context.Context, f *fault) error {
	m := e.victim()
	f.target, f.handover = m.id, true
	f.start = time.Now()
	_, err := e.terminate(m, 2*e.cfg.LeaseTTL+10*time.Second)
	f.healed = time.Now()
	return err
}

// quiet heals everything, stops the churn, host faults and bad input, and
// waits out the quiet period with the cluster settled.
func (e *env) quiet(ctx context.Context) error {
	for _, m := range e.live() {
		m.healEtcd()
		m.pgPx.Heal()
		if m.redisPx != nil {
			m.redisPx.Heal()
		}
	}
	e.work.stopLoops()
	if err := e.work.restoreAll(ctx); err != nil {
		return err
	}
	e.work.healHosts(5)
	if err := e.replenish(ctx); err != nil {
		return err
	}
	if _, err := e.waitSettled(ctx, e.settleBound()); err != nil {
		e.note("the cluster did not settle at the start of the quiet period: %v", err)
	}
	e.quietFrom = time.Now()
	return hold(ctx, e.cfg.Quiet)
}

// sortedShards returns m's keys in order.
func sortedShards(m map[int]int64) []int {
	out := make([]int, 0, len(m))
	for s := range m {
		out = append(out, s)
	}
	sort.Ints(out)
	return out
}
