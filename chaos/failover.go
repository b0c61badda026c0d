package chaos

import (
	"context"
	"fmt"
	"sort"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/vigil-sh/vigil/internal/faultproxy"
)

// pgHA is the run's Postgres as a production control plane runs it: a
// primary, a streaming standby, and one endpoint every client uses — the
// replicas, agentsim, the harness — that moves to the standby when it is
// promoted, as a virtual IP, a pooler or a DNS name does.
type pgHA struct {
	primary *privatePostgres
	standby *privatePostgres
	vip     *faultproxy.Proxy // every client's address of "the database"
	repl    *faultproxy.Proxy // the standby's link to the primary: cut, it falls behind
	logDir  string
	servers int // started so far, for the log names
}

func startPGHA(ctx context.Context, logDir string) (*pgHA, error) {
	h := &pgHA{logDir: logDir, servers: 1}
	var err error
	if h.primary, err = startPrivatePostgres(ctx, "postgres-1", logDir); err != nil {
		return nil, err
	}
	if h.repl, err = faultproxy.New(h.primary.addr()); err != nil {
		h.stop()
		return nil, err
	}
	if h.vip, err = faultproxy.New(h.primary.addr()); err != nil {
		h.stop()
		return nil, err
	}
	if err := h.rebuild(ctx); err != nil {
		h.stop()
		return nil, err
	}
	return h, nil
}

// adminURL is the endpoint's: whichever server is the primary.
func (h *pgHA) adminURL() string {
	return "postgres://postgres@" + h.vip.Addr() + "/postgres?sslmode=disable"
}

// restart restarts the primary in place (the standby reconnects).
func (h *pgHA) restart(ctx context.Context) error { return h.primary.restart(ctx) }

// rebuild makes a new standby of the primary (pg_basebackup through the
// replication link) and starts it streaming.
func (h *pgHA) rebuild(ctx context.Context) error {
	h.repl.Retarget(h.primary.addr())
	h.servers++
	sb, err := startStandby(ctx, fmt.Sprintf("postgres-%d", h.servers), h.logDir, h.repl.Addr())
	if err != nil {
		return fmt.Errorf("rebuild the standby: %w", err)
	}
	h.standby = sb
	return nil
}

func (h *pgHA) stop() {
	for _, p := range []*faultproxy.Proxy{h.vip, h.repl} {
		if p != nil {
			_ = p.Close()
		}
	}
	for _, s := range []*privatePostgres{h.standby, h.primary} {
		if s != nil {
			_ = s.stop()
			s.remove()
		}
	}
}

// failover is a primary's death and its standby's promotion, and what it
// lost: every client is cut off (the endpoint resets and refuses), the
// primary's committed history of the run is read directly, the primary is
// killed (postmaster and backends at once), the standby promoted and read,
// and the endpoint moved to it. The difference of the two reads is what
// the standby never received. Whatever fails, the endpoint is left open
// to whichever server is the primary.
func (h *pgHA) failover(ctx context.Context, db, mode string) (*lostCommits, error) {
	h.vip.Cut()
	defer func() { h.vip.Retarget(h.primary.addr()) }()
	old := h.primary
	quiesced(ctx, old, db)
	conn, err := old.connect(ctx, db)
	if err != nil {
		return nil, err
	}
	var since time.Time
	err = conn.QueryRow(ctx, `select now() - interval '10 minutes'`).Scan(&since)
	var before committed
	if err == nil {
		before, err = readCommitted(ctx, conn, since)
	}
	conn.Close(context.Background())
	if err != nil {
		return nil, fmt.Errorf("read the old primary: %w", err)
	}
	if err := old.crash(); err != nil {
		return nil, err
	}
	if err := h.standby.promote(ctx); err != nil {
		return nil, err
	}
	h.primary, h.standby = h.standby, nil
	old.remove()
	lost, err := h.diff(ctx, db, since, before)
	if err != nil {
		return nil, err
	}
	lost.mode = mode
	return lost, nil
}

// ready makes sure a standby streams from the primary: the link healed, or
// a new standby built if the last failover left none.
func (h *pgHA) ready(ctx context.Context) error {
	if h.standby == nil {
		return h.rebuild(ctx)
	}
	h.repl.Heal()
	return nil
}

// diff reads the promoted standby and returns what before has that it
// lacks. The new primary commits nothing synchronously until a standby is
// back (as an HA manager does), so the rebuild is not a stall.
func (h *pgHA) diff(ctx context.Context, db string, since time.Time, before committed) (*lostCommits, error) {
	conn, err := h.primary.connect(ctx, db)
	if err != nil {
		return nil, err
	}
	defer conn.Close(context.Background())
	if _, err := conn.Exec(ctx, `alter system reset synchronous_standby_names`); err != nil {
		return nil, err
	}
	if _, err := conn.Exec(ctx, `select pg_reload_conf()`); err != nil {
		return nil, err
	}
	lost := &lostCommits{at: time.Now(), events: map[string]bool{}}
	if err := conn.QueryRow(ctx, `select last_value from chaos_commit_seq`).Scan(&lost.floor); err != nil {
		return nil, err
	}
	after, err := readCommitted(ctx, conn, since)
	if err != nil {
		return nil, fmt.Errorf("read the promoted standby: %w", err)
	}
	for seq, r := range before.journal {
		if _, ok := after.journal[seq]; !ok {
			lost.journal = append(lost.journal, r)
		}
	}
	for id, r := range before.raises {
		if _, ok := after.raises[id]; !ok {
			lost.raises = append(lost.raises, r)
		}
	}
	for id := range before.events {
		if !after.events[id] {
			lost.events[id] = true
		}
	}
	return lost, nil
}

// quiesced waits a little for the clients of db to leave the server once
// the endpoint cut them off, so that what is read next is all they
// committed. Backends waiting for a synchronous standby or for a lock held
// by one are left: nothing they do is acknowledged or visible until the
// standby answers, and it never will. A backend still running after that
// can commit only without its client hearing of it.
func quiesced(ctx context.Context, p *privatePostgres, db string) {
	conn, err := p.connect(ctx, "postgres")
	if err != nil {
		return
	}
	defer conn.Close(context.Background())
	_ = poll(ctx, 5*time.Second, "the old primary's clients to be gone", func() (bool, string) {
		var n int
		if err := conn.QueryRow(ctx, `select count(*) from pg_stat_activity
			 where datname = $1 and backend_type = 'client backend' and wait_event is distinct from 'SyncRep'
			   and wait_event_type is distinct from 'Lock'`, db).Scan(&n); err != nil {
			return false, err.Error()
		}
		return n == 0, fmt.Sprintf("%d clients", n)
	})
}

// committed is the run's recent committed history on one server, by key.
type committed struct {
	journal map[int64]journalRow // by vigil_journal.seq
	raises  map[int64]fenceRaise // by chaos_fence_raises.id
	events  map[string]bool      // chaos_events.vigil_id
}

func readCommitted(ctx context.Context, conn *pgx.Conn, since time.Time) (committed, error) {
	c := committed{journal: map[int64]journalRow{}, raises: map[int64]fenceRaise{}, events: map[string]bool{}}
	rows, err := conn.Query(ctx, `
		select j.seq, coalesce(c.commit_seq, 0), j.shard, j.token, j.replica, j.host_id, j.sandbox_id, j.change, j.written_at
		  from vigil_journal j left join chaos_commits c on c.journal_seq = j.seq
		 where j.written_at >= $1`, since)
	if err != nil {
		return c, err
	}
	for rows.Next() {
		var r journalRow
		if err := rows.Scan(&r.seq, &r.commitSeq, &r.shard, &r.token, &r.replica, &r.host, &r.sandbox, &r.change, &r.writtenAt); err != nil {
			rows.Close()
			return c, err
		}
		r.committedAt = r.writtenAt
		c.journal[r.seq] = r
	}
	rows.Close()
	if rows.Err() != nil {
		return c, rows.Err()
	}
	rows, err = conn.Query(ctx, `select id, shard, token, owner, raised_at, coalesce(commit_seq, 0) from chaos_fence_raises where raised_at >= $1`, since)
	if err != nil {
		return c, err
	}
	for rows.Next() {
		var id int64
		var r fenceRaise
		if err := rows.Scan(&id, &r.shard, &r.token, &r.owner, &r.raisedAt, &r.commitSeq); err != nil {
			rows.Close()
			return c, err
		}
		c.raises[id] = r
	}
	rows.Close()
	if rows.Err() != nil {
		return c, rows.Err()
	}
	var hasEvents bool
	if err := conn.QueryRow(ctx, `select to_regclass('chaos_events') is not null`).Scan(&hasEvents); err != nil || !hasEvents {
		return c, err
	}
	rows, err = conn.Query(ctx, `select vigil_id::text from chaos_events where committed_at is null or committed_at >= $1`, since)
	if err != nil {
		return c, err
	}
	defer rows.Close()
	for rows.Next() {
		var id string
		if err := rows.Scan(&id); err != nil {
			return c, err
		}
		c.events[id] = true
	}
	return c, rows.Err()
}

// lostCommits is what one failover lost: rows the old primary had
// committed — acknowledged to their writers in asynchronous mode — that the
// promoted standby never received. Their writers acted on them (an agent
// was called, an event published), so the safety checks count them as
// having happened: just before the failover, after everything the old
// primary committed that survived.
type lostCommits struct {
	at      time.Time
	mode    string // "sync" or "async"
	floor   int64  // the promoted standby's chaos_commit_seq: every commit after the failover is above it
	journal []journalRow
	raises  []fenceRaise
	events  map[string]bool // vigil_ids
}

// withLost merges what failovers lost into the surviving history, each lost
// row where it committed: on the primary of its epoch (epoch k is what
// committed after failover k-1 and up to failover k), among that primary's
// survivors in its commit order. Every commit_seq is then replaced by the
// merged order's rank, which the safety checks compare.
func withLost(journal []journalRow, raises []fenceRaise, losses []*lostCommits) ([]journalRow, []fenceRaise) {
	if len(losses) == 0 {
		return journal, raises
	}
	type item struct {
		epoch int
		seq   int64
		lost  bool
		j     *journalRow
		r     *fenceRaise
	}
	epochOf := func(seq int64) int {
		n := 0
		for _, l := range losses {
			if seq > l.floor {
				n++
			}
		}
		return n
	}
	var items []item
	for i := range journal {
		r := journal[i]
		items = append(items, item{epoch: epochOf(r.commitSeq), seq: r.commitSeq, j: &r})
	}
	for i := range raises {
		r := raises[i]
		items = append(items, item{epoch: epochOf(r.commitSeq), seq: r.commitSeq, r: &r})
	}
	for k, l := range losses {
		for i := range l.journal {
			r := l.journal[i]
			items = append(items, item{epoch: k, seq: r.commitSeq, lost: true, j: &r})
		}
		for i := range l.raises {
			r := l.raises[i]
			items = append(items, item{epoch: k, seq: r.commitSeq, lost: true, r: &r})
		}
	}
	sort.SliceStable(items, func(a, b int) bool {
		x, y := items[a], items[b]
		if x.epoch != y.epoch {
			return x.epoch < y.epoch
		}
		if x.seq != y.seq {
			return x.seq < y.seq
		}
		return !x.lost && y.lost
	})
	var js []journalRow
	var rs []fenceRaise
	for rank, it := range items {
		if it.j != nil {
			it.j.commitSeq = int64(rank + 1)
			js = append(js, *it.j)
		} else {
			it.r.commitSeq = int64(rank + 1)
			rs = append(rs, *it.r)
		}
	}
	return js, rs
}

// withoutEvents is stream without the entries whose vigil_id is in lost.
func withoutEvents(stream []streamEntry, lost map[string]bool) []streamEntry {
	if len(lost) == 0 {
		return stream
	}
	out := make([]streamEntry, 0, len(stream))
	for _, se := range stream {
		if !lost[se.VigilID] {
			out = append(out, se)
		}
	}
	return out
}
