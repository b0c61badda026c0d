package chaos

import (
	"context"
	"fmt"
	"net/url"
	"strings"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
)

// nemFailover is a Postgres failover with its worst interleaving on
// purpose: the standby's link is cut so it falls behind, an owner loses its
// shards while it cannot notice, its successors claim them and raise their
// fences on the primary alone, the primary dies, the standby is promoted
// (the raises are lost: the fence rows are back at the old owner's tokens)
// and the endpoint moves to it, and only then may the old owner act again.
// Afterwards a new standby is built from the new primary. Synchronous mode
// waits for the standby to acknowledge every commit, so a raise its
// successor was told about cannot be lost; asynchronous mode acknowledges
// at once and loses them.
//
// The old owner is, at random, either
//   - paused inside its pass (caught in a fenced transaction as pause-in-tx
//     does), woken after the promotion, or
//   - cut off from etcd with its keys deleted (as delete-owner-keys does),
//     so it still believes it owns its shards, and reaches the new primary
//     within its lease: only the fence stands between its writes and its
//     successors'.
func nemFailover(sync bool) func(*env, context.Context, *fault) error {
	return func(e *env, ctx context.Context, f *fault) error {
		mode := map[bool]string{true: "sync", false: "async"}[sync]
		if err := e.pg.ready(ctx); err != nil {
			return err
		}
		if err := e.pg.primary.setSync(ctx, sync); err != nil {
			return fmt.Errorf("replication mode %s: %w", mode, err)
		}
		m := e.victim()
		cutOff := m.id != e.rec.State().Leader && len(e.live()) >= 3 && e.rng.IntN(2) == 0
		if e.cfg.FailoverCutOff {
			m, cutOff = e.nonLeader(), true
		}
		e.lose(f, m)
		var wake func()
		var how string
		var err error
		if cutOff {
			f.keysDeleted = true
			how, wake, err = e.cutOffOwner(ctx, f)
		} else {
			how, wake, err = e.pauseOwner(ctx, f)
		}
		if err != nil {
			wake()
			return err
		}
		lost, err := e.failOver(ctx, mode)
		if err != nil {
			wake()
			return err
		}
		// Work for the old owner and its successors on the new primary:
		// while the cut-off owner still believes in its lease, or once the
		// paused one runs again.
		if cutOff {
			e.feedFor(ctx, f, time.Until(f.lostAt.Add(e.cfg.LeaseTTL+time.Second)))
			wake()
		} else {
			wake()
			e.feedFor(ctx, f, e.cfg.LeaseTTL)
		}
		f.healed = time.Now()
		f.detail = fmt.Sprintf("%s, %s; lost %d journal rows, %d fence raises, %d events", mode, how, len(lost.journal), len(lost.raises), len(lost.events))
		if err := e.pg.rebuild(ctx); err != nil {
			return err
		}
		return e.awaitSuccessors(ctx, f, 3*e.cfg.LeaseTTL+10*time.Second)
	}
}

// pauseOwner freezes f's victim inside a fenced transaction (or, failing
// that, anywhere) and cuts the standby's link once it is frozen; wake thaws
// it. It returns after the victim's successors have claimed its shards and
// raised their fences on the primary (or, synchronously, wait for the
// standby to confirm them).
func (e *env) pauseOwner(ctx context.Context, f *fault) (string, func(), error) {
	m := f.victim
	caught := false
	wake := func() { _ = e.cont(m) }
	hosts := e.hostsOf(f)
	for attempt := 0; attempt < 4 && !caught && len(hosts) > 0; attempt++ {
		var err error
		caught, err = e.catchInWrite(ctx, m, hosts[e.rng.IntN(len(hosts))], func() error { e.markLost(f); return e.stop(m) })
		if err != nil {
			return "", wake, err
		}
	}
	how := "owner paused inside a fenced transaction"
	if !caught {
		how = "owner paused (not caught inside a transaction)"
		e.markLost(f)
		if err := e.stop(m); err != nil {
			return "", wake, err
		}
	}
	f.inTx = caught
	e.pg.repl.Cut()
	err := e.awaitRaises(ctx, f, e.beyondTTL()+3*e.cfg.LeaseTTL+10*time.Second)
	return how, wake, err
}

// cutOffOwner blackholes f's victim's etcd links, cuts the standby's link
// and deletes the victim's keys, so its successors claim at once while it
// still believes it owns its shards; wake heals its etcd links.
func (e *env) cutOffOwner(ctx context.Context, f *fault) (string, func(), error) {
	m := f.victim
	wake := func() { m.healEtcd() }
	m.blackholeEtcd()
	e.pg.repl.Cut()
	ops := []clientv3.Op{clientv3.OpDelete(e.layout.Member(m.id))}
	for s := range f.owned {
		ops = append(ops, clientv3.OpDelete(e.layout.Shard(s)))
	}
	dctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	_, err := e.etcd.cli.Txn(dctx).Then(ops...).Commit()
	cancel()
	if err != nil {
		return "", wake, fmt.Errorf("delete the keys of %s: %w", m.id, err)
	}
	err = e.awaitRaises(ctx, f, 2*e.cfg.LeaseTTL+10*time.Second)
	return "owner cut off from etcd, its keys deleted", wake, err
}

// awaitRaises waits until the victim's shards have successors in etcd and
// one of them has raised its fence on the primary: committed there
// (asynchronous) or waiting for the standby (synchronous).
func (e *env) awaitRaises(ctx context.Context, f *fault, timeout time.Duration) error {
	if err := e.awaitSuccessors(ctx, f, timeout); err != nil {
		return err
	}
	conn, err := e.pg.primary.connect(ctx, e.dbName())
	if err != nil {
		return err
	}
	defer conn.Close(context.Background())
	var shards, tokens []int64
	for s, tok := range f.owned {
		shards, tokens = append(shards, int64(s)), append(tokens, tok)
	}
	return poll(ctx, 10*time.Second, "a successor's fence raise on the primary", func() (bool, string) {
		var raised, waiting int
		err := conn.QueryRow(ctx, `select
			(select count(*) from vigil_shard_fences f join unnest($1::bigint[], $2::bigint[]) o(shard, token) on o.shard = f.shard where f.token > o.token),
			(select count(*) from pg_stat_activity where application_name like 'vigil %' and wait_event = 'SyncRep')`,
			shards, tokens).Scan(&raised, &waiting)
		if err != nil {
			return false, err.Error()
		}
		return raised > 0 || waiting > 0, fmt.Sprintf("%d raised, %d waiting for the standby", raised, waiting)
	})
}

// failOver kills the primary, promotes the standby and moves the endpoint,
// and records what was lost.
func (e *env) failOver(ctx context.Context, mode string) (*lostCommits, error) {
	lost, err := e.pg.failover(ctx, e.dbName(), mode)
	if err != nil {
		return nil, err
	}
	e.mu.Lock()
	e.losses = append(e.losses, lost)
	e.mu.Unlock()
	return lost, nil
}

// feedFor feeds orphan rows to the hosts of f's victim's shards for d.
func (e *env) feedFor(ctx context.Context, f *fault, d time.Duration) {
	hosts := e.hostsOf(f)
	if d <= 0 || len(hosts) == 0 {
		return
	}
	feedCtx, stop := context.WithTimeout(ctx, d)
	defer stop()
	e.feedOrphans(feedCtx, hosts)
}

// dbName is the run's database.
func (e *env) dbName() string {
	u, err := url.Parse(e.dbURL)
	if err != nil {
		return ""
	}
	return strings.TrimPrefix(u.Path, "/")
}

// nonLeader picks a live replica other than the vigil leader (any, if the
// leader is alone).
func (e *env) nonLeader() *member {
	leader := e.rec.State().Leader
	live := e.live()
	var pool []*member
	for _, m := range live {
		if m.id != leader {
			pool = append(pool, m)
		}
	}
	if len(pool) == 0 {
		return live[e.rng.IntN(len(live))]
	}
	return pool[e.rng.IntN(len(pool))]
}
