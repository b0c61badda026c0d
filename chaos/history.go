package chaos

import (
	"context"
	"fmt"
	"os"
	"sort"
	"strings"
	"time"

	"github.com/google/uuid"

	"github.com/vigil-sh/vigil/agentsim"
	"github.com/vigil-sh/vigil/internal/ids"
	"github.com/vigil-sh/vigil/shard"
)

// history is everything the checker reads, gathered after the quiet period:
// what vigil committed (the journal, in commit order, and the fence raises),
// what etcd recorded (the recorder's claims and releases), what the agents
// accepted (DestroySandbox records), what the harness did (faults, bad
// input) and the final state of the database and the agents.
type history struct {
	journal []journalRow  // commit order
	raises  []fenceRaise  // commit order
	moves   []sandboxMove // commit order
	destroy map[uuid.UUID][]agentsim.DestroyRecord
	reject  map[uuid.UUID][]agentsim.DestroyRecord

	final finalState

	expectedEvents []eventKey
	stream         []streamEntry
	streamErr      error
}

type journalRow struct {
	seq, commitSeq int64
	shard          int
	token          int64
	replica        string
	host           uuid.UUID
	sandbox        uuid.NullUUID
	change         string
	writtenAt      time.Time // the transaction's start (now())
	committedAt    time.Time // inside COMMIT (clock_timestamp())
}

type fenceRaise struct {
	shard     int
	token     int64
	owner     string
	raisedAt  time.Time
	commitSeq int64
}

type sandboxMove struct {
	sandbox, from, to uuid.UUID
	commitSeq         int64
}

// finalState is the world after the quiet period.
type finalState struct {
	now       time.Time // database clock
	hosts     map[uuid.UUID]hostRow
	sandboxes []sandboxRow
	before    map[uuid.UUID]map[uuid.UUID]string // agent VMs before the database read: host -> sandbox -> label
	after     map[uuid.UUID]map[uuid.UUID]string // and after it
	answering map[uuid.UUID]bool                 // the agent answers (healthy) at the end
}

type hostRow struct {
	id         uuid.UUID
	status     *string
	address    *string
	heartbeat  *time.Time
	staleSince time.Duration // how long the heartbeat has been older than the threshold, 0 if fresh
}

type sandboxRow struct {
	id, host    uuid.UUID
	status      *string
	teamNull    bool
	lastUpdated time.Time
}

func (e *env) history(ctx context.Context, quietAt time.Time) (*history, error) {
	h := &history{destroy: map[uuid.UUID][]agentsim.DestroyRecord{}, reject: map[uuid.UUID][]agentsim.DestroyRecord{}}
	rows, err := e.db.Query(ctx, `
		select j.seq, coalesce(c.commit_seq, 0), j.shard, j.token, j.replica, j.host_id, j.sandbox_id, j.change, j.written_at,
		       coalesce(c.committed_at, j.written_at)
		  from vigil_journal j left join chaos_commits c on c.journal_seq = j.seq
		 order by coalesce(c.commit_seq, 0), j.seq`)
	if err != nil {
		return nil, fmt.Errorf("read the journal: %w", err)
	}
	for rows.Next() {
		var r journalRow
		if err := rows.Scan(&r.seq, &r.commitSeq, &r.shard, &r.token, &r.replica, &r.host, &r.sandbox, &r.change, &r.writtenAt, &r.committedAt); err != nil {
			rows.Close()
			return nil, err
		}
		h.journal = append(h.journal, r)
	}
	rows.Close()
	if err := rows.Err(); err != nil {
		return nil, err
	}
	rows, err = e.db.Query(ctx, `select shard, token, owner, raised_at, coalesce(commit_seq, 0) from chaos_fence_raises order by commit_seq, id`)
	if err != nil {
		return nil, fmt.Errorf("read the fence raises: %w", err)
	}
	for rows.Next() {
		var r fenceRaise
		if err := rows.Scan(&r.shard, &r.token, &r.owner, &r.raisedAt, &r.commitSeq); err != nil {
			rows.Close()
			return nil, err
		}
		h.raises = append(h.raises, r)
	}
	rows.Close()
	rows, err = e.db.Query(ctx, `select sandbox_id, from_host, to_host, coalesce(commit_seq, 0) from chaos_moves order by commit_seq`)
	if err != nil {
		return nil, err
	}
	for rows.Next() {
		var m sandboxMove
		if err := rows.Scan(&m.sandbox, &m.from, &m.to, &m.commitSeq); err != nil {
			rows.Close()
			return nil, err
		}
		h.moves = append(h.moves, m)
	}
	rows.Close()
	for _, id := range e.work.hosts {
		if d := e.work.sim.Destroys(id); len(d) > 0 {
			h.destroy[id] = d
		}
		if d := e.work.sim.RejectedDestroys(id); len(d) > 0 {
			h.reject[id] = d
		}
	}
	if err := e.finalState(ctx, &h.final); err != nil {
		return nil, err
	}
	if e.events != nil {
		if h.expectedEvents, err = e.expectedEvents(ctx); err != nil {
			return nil, err
		}
		e.events.poll(ctx)
		e.events.mu.Lock()
		h.stream, h.streamErr = append([]streamEntry(nil), e.events.entries...), e.events.readErr
		e.events.mu.Unlock()
	}
	e.saveHistory(h)
	return h, nil
}

func (e *env) finalState(ctx context.Context, fs *finalState) error {
	fs.hosts = map[uuid.UUID]hostRow{}
	fs.answering = map[uuid.UUID]bool{}
	snap := func() map[uuid.UUID]map[uuid.UUID]string {
		out := map[uuid.UUID]map[uuid.UUID]string{}
		for _, id := range e.work.hosts {
			vms := map[uuid.UUID]string{}
			for _, vm := range e.work.sim.VMs(id) {
				vms[vm.ID] = vm.Status
			}
			out[id] = vms
		}
		return out
	}
	for _, id := range e.work.hosts {
		if m, err := e.work.sim.Mode(id); err == nil && m.Kind == agentsim.ModeHealthy && !m.SkipHeartbeat {
			fs.answering[id] = true
		}
	}
	fs.before = snap()
	tx, err := e.db.Begin(ctx)
	if err != nil {
		return err
	}
	defer tx.Rollback(ctx)
	// One snapshot for the hosts, the rows and the clock.
	if _, err := tx.Exec(ctx, `set transaction isolation level repeatable read`); err != nil {
		return err
	}
	if err := tx.QueryRow(ctx, `select now()`).Scan(&fs.now); err != nil {
		return err
	}
	rows, err := tx.Query(ctx, `select id, status, address, last_heartbeat_at,
		    greatest(extract(epoch from (now() - coalesce(last_heartbeat_at, '-infinity'))) - $1, 0)
		  from hosts`, e.cfg.UnreachableAfter.Seconds())
	if err != nil {
		return err
	}
	for rows.Next() {
		var hr hostRow
		var stale float64
		if err := rows.Scan(&hr.id, &hr.status, &hr.address, &hr.heartbeat, &stale); err != nil {
			rows.Close()
			return err
		}
		if stale > 1e9 {
			stale = 1e9
		}
		hr.staleSince = time.Duration(stale * float64(time.Second))
		fs.hosts[hr.id] = hr
	}
	rows.Close()
	rows, err = tx.Query(ctx, `select id, host_id, status, team_id is null, last_updated from sandboxes`)
	if err != nil {
		return err
	}
	for rows.Next() {
		var s sandboxRow
		if err := rows.Scan(&s.id, &s.host, &s.status, &s.teamNull, &s.lastUpdated); err != nil {
			rows.Close()
			return err
		}
		fs.sandboxes = append(fs.sandboxes, s)
	}
	rows.Close()
	if err := rows.Err(); err != nil {
		return err
	}
	fs.after = snap()
	return nil
}

// expectedEvents are the events SPEC §6 says the committed audit rows
// publish.
func (e *env) expectedEvents(ctx context.Context) ([]eventKey, error) {
	rows, err := e.db.Query(ctx, `select resource_type, action, coalesce(metadata->>'reason', ''), resource_id from audit_logs where actor_type = 'system'`)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	var out []eventKey
	for rows.Next() {
		var rt, act, reason, rid string
		if err := rows.Scan(&rt, &act, &reason, &rid); err != nil {
			return nil, err
		}
		if ev := expectedEvent(rt, act, reason, true); ev != "" {
			out = append(out, eventKey{Event: ev, Resource: rid})
		}
	}
	return out, rows.Err()
}

// saveHistory writes the history's parts worth reading after a failure into
// the run directory.
func (e *env) saveHistory(h *history) {
	var b strings.Builder
	for _, r := range h.journal {
		sb := "-"
		if r.sandbox.Valid {
			sb = ids.Sandbox(r.sandbox.UUID)
		}
		fmt.Fprintf(&b, "%d\t%d\t%04d\t%d\t%s\t%s\t%s\t%s\t%s\t%s\n", r.commitSeq, r.seq, r.shard, r.token, r.replica,
			ids.Host(r.host), sb, r.change, r.writtenAt.Format("15:04:05.000000"), r.committedAt.Format("15:04:05.000000"))
	}
	_ = os.WriteFile(e.dir+"/journal.tsv", []byte("commit_seq\tseq\tshard\ttoken\treplica\thost\tsandbox\tchange\twritten_at\tcommitted_at\n"+b.String()), 0o644)
	_ = os.WriteFile(e.dir+"/etcd-events.txt", []byte(e.rec.Dump(1<<30)), 0o644)
	b.Reset()
	e.mu.Lock()
	for _, f := range e.faults {
		fmt.Fprintf(&b, "%s\t%s\t%s\t%s\t%s\t%s\t%v\n", f.start.Format("15:04:05.000"), f.lostAt.Format("15:04:05.000"), f.healed.Format("15:04:05.000"), f.kind, f.target, f.detail, f.recoverErr)
	}
	e.mu.Unlock()
	_ = os.WriteFile(e.dir+"/etcd-leaders.txt", []byte(e.leaders.dump()), 0o644)
	_ = os.WriteFile(e.dir+"/faults.tsv", []byte("start\tlost\thealed\tkind\ttarget\tdetail\terror\n"+b.String()), 0o644)
}

// shardOf is the host's shard.
func (e *env) shardOf(h uuid.UUID) int { return shard.Of(h, e.cfg.Shards) }

func sortedKeys[K comparable, V any](m map[K]V, less func(a, b K) bool) []K {
	out := make([]K, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	sort.Slice(out, func(i, j int) bool { return less(out[i], out[j]) })
	return out
}
