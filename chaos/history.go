package chaos

import (
	"context"
	"fmt"
	"os"
	"sort"
	"strings"
	"time"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5"

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

	// Events (nil without them): the committed changes that publish, the
	// committed outbox rows, the stream.
	audits       []auditEvent
	outbox       []outboxRow
	stream       []streamEntry
	streamErr    error
	streamMissed int64          // entries appended but never read (trimmed first)
	drainErr     error          // the outbox did not drain within the bound
	drainTime    time.Duration  // the wait for it
	beyond       int            // stream entries of events committed after the snapshot, left out
	mirror       *mirrorHistory // nil without a mirror

	// Rule 9: the destroy audit rows that finish a stopping row, and the
	// re-sends vigil claimed, by sandbox.
	destroyAudits map[uuid.UUID][]destroyAudit
	claims        map[uuid.UUID][]retryClaim
	// Rule 11: every write to a volume, in the order recorded.
	volumes []volumeChange
}

// mirrorHistory is what the mirror carried against the stream.
type mirrorHistory struct {
	appended, received, carried int // stream entries read, messages received, entries the mirror carried
	problems                    []string
	err                         error // why the mirror cannot be judged: the harness's subscription dropped
}

type journalRow struct {
	seq, commitSeq int64
	shard          int
	token          int64
	replica        string
	host           uuid.UUID
	sandbox        uuid.NullUUID
	change         string
	txid           int64     // the writing transaction, 0 if its commit was not recorded
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
		select j.seq, coalesce(c.commit_seq, 0), j.shard, j.token, j.replica, j.host_id, j.sandbox_id, j.change, coalesce(c.txid, 0), j.written_at,
		       coalesce(c.committed_at, j.written_at)
		  from vigil_journal j left join chaos_commits c on c.journal_seq = j.seq
		 order by coalesce(c.commit_seq, 0), j.seq`)
	if err != nil {
		return nil, fmt.Errorf("read the journal: %w", err)
	}
	for rows.Next() {
		var r journalRow
		if err := rows.Scan(&r.seq, &r.commitSeq, &r.shard, &r.token, &r.replica, &r.host, &r.sandbox, &r.change, &r.txid, &r.writtenAt, &r.committedAt); err != nil {
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
	if err := e.rule9History(ctx, h); err != nil {
		return nil, err
	}
	if h.volumes, err = e.volumeChanges(ctx); err != nil {
		return nil, err
	}
	if e.events != nil {
		if err := e.gatherEvents(ctx, h); err != nil {
			return nil, err
		}
	}
	e.saveHistory(h)
	return h, nil
}

// rule9History reads the destroy audit rows that finish a stopping row
// (destroy_retry, transient_timeout_inferred) with their transactions, and
// the committed re-send claims, by sandbox.
func (e *env) rule9History(ctx context.Context, h *history) error {
	rows, err := e.db.Query(ctx, `select a.resource_id, a.metadata->>'reason', coalesce(t.txid, 0), a.created_at
		  from audit_logs a left join chaos_audit_tx t on t.audit_id = a.id
		 where a.actor_type = 'system' and a.resource_type = 'sandbox' and a.action = 'destroy'
		   and a.metadata->>'reason' in ('destroy_retry', 'transient_timeout_inferred')
		 order by a.created_at`)
	if err != nil {
		return fmt.Errorf("read the destroy audit rows: %w", err)
	}
	h.destroyAudits = map[uuid.UUID][]destroyAudit{}
	for rows.Next() {
		var rid string
		var a destroyAudit
		if err := rows.Scan(&rid, &a.reason, &a.txid, &a.at); err != nil {
			rows.Close()
			return err
		}
		if id, err := ids.ParseSandbox(rid); err == nil {
			h.destroyAudits[id] = append(h.destroyAudits[id], a)
		}
	}
	rows.Close()
	if err := rows.Err(); err != nil {
		return err
	}
	rows, err = e.db.Query(ctx, `select sandbox_id, retried_at, committed_at from chaos_retry_claims
		 where commit_seq is not null order by commit_seq`)
	if err != nil {
		return fmt.Errorf("read the re-send claims: %w", err)
	}
	defer rows.Close()
	h.claims = map[uuid.UUID][]retryClaim{}
	for rows.Next() {
		var id uuid.UUID
		var c retryClaim
		if err := rows.Scan(&id, &c.at, &c.committedAt); err != nil {
			return err
		}
		h.claims[id] = append(h.claims[id], c)
	}
	return rows.Err()
}

// volumeChanges reads every recorded write to a volume that committed, in
// the order recorded.
func (e *env) volumeChanges(ctx context.Context) ([]volumeChange, error) {
	rows, err := e.db.Query(ctx, `select id, volume_id, op, coalesce(old_status, ''), coalesce(new_status, ''), old_sandbox, new_sandbox,
		       coalesce(old_mount, ''), coalesce(new_mount, ''), txid, commit_seq, writer
		  from chaos_volume_changes where commit_seq is not null order by id`)
	if err != nil {
		return nil, fmt.Errorf("read the volume changes: %w", err)
	}
	return pgx.CollectRows(rows, func(r pgx.CollectableRow) (volumeChange, error) {
		var c volumeChange
		err := r.Scan(&c.id, &c.volume, &c.op, &c.oldStatus, &c.newStatus, &c.oldSandbox, &c.newSandbox,
			&c.oldMount, &c.newMount, &c.txid, &c.commitSeq, &c.writer)
		return c, err
	})
}

// outboxDrainBound is how long the checks wait, after the quiet period, for
// every pending event to reach the stream.
const outboxDrainBound = 60 * time.Second

// gatherEvents waits until the outbox is empty (bounded), then reads, in one
// snapshot, the committed changes that publish (audit rows with their
// transaction) and the committed outbox rows, waits until none of those is
// pending, and reads the rest of the stream. Stream entries of events
// committed after the snapshot are left out of the comparison.
func (e *env) gatherEvents(ctx context.Context, h *history) error {
	ec := e.events
	t0 := time.Now()
	h.drainErr = poll(ctx, outboxDrainBound, "the events outbox to drain", func() (bool, string) {
		var n int
		if err := e.db.QueryRow(ctx, `select count(*) from vigil_events`).Scan(&n); err != nil {
			return false, err.Error()
		}
		return n == 0, fmt.Sprintf("%d events still pending", n)
	})
	h.drainTime = time.Since(t0)
	if h.drainErr != nil {
		e.note("events: %v", h.drainErr)
	}
	tx, err := e.db.BeginTx(ctx, pgx.TxOptions{IsoLevel: pgx.RepeatableRead, AccessMode: pgx.ReadOnly})
	if err != nil {
		return err
	}
	defer tx.Rollback(ctx)
	rows, err := tx.Query(ctx, `
		select a.id, coalesce(t.txid, 0), a.resource_type, a.resource_id, a.team_id, a.action,
		       coalesce(a.metadata->>'reason', ''), coalesce(a.metadata->>'phase', ''), coalesce(a.metadata->>'error', ''), a.created_at
		  from audit_logs a left join chaos_audit_tx t on t.audit_id = a.id
		 where a.actor_type = 'system'`)
	if err != nil {
		return fmt.Errorf("read the audit rows: %w", err)
	}
	untied := 0
	for rows.Next() {
		var a auditEvent
		if err := rows.Scan(&a.auditID, &a.txid, &a.resType, &a.resID, &a.team, &a.action, &a.reason, &a.phase, &a.errText, &a.writtenT); err != nil {
			rows.Close()
			return err
		}
		if a.event, a.outcome = expectedEvent(a.resType, a.action, a.reason, a.phase); a.event == "" {
			continue
		}
		if a.txid == 0 {
			untied++
		}
		h.audits = append(h.audits, a)
	}
	rows.Close()
	if err := rows.Err(); err != nil {
		return err
	}
	if untied > 0 {
		e.note("events: %d audit rows without their transaction recorded (written before the instruments?)", untied)
	}
	rows, err = tx.Query(ctx, `select vigil_id::text, seq, shard, event, payload, txid, coalesce(commit_seq, 0), coalesce(committed_at, now())
		  from chaos_events order by seq`)
	if err != nil {
		return fmt.Errorf("read the outbox copy: %w", err)
	}
	var snapIDs []string
	known := map[string]bool{}
	for rows.Next() {
		var o outboxRow
		var payload string
		if err := rows.Scan(&o.vigilID, &o.seq, &o.shard, &o.event, &payload, &o.txid, &o.commitSeq, &o.committedAt); err != nil {
			rows.Close()
			return err
		}
		o.payload.parsePayload(payload)
		h.outbox = append(h.outbox, o)
		snapIDs = append(snapIDs, o.vigilID)
		known[o.vigilID] = true
	}
	rows.Close()
	if err := rows.Err(); err != nil {
		return err
	}
	_ = tx.Rollback(ctx)
	// Events committed between the drain and the snapshot.
	if err := poll(ctx, 30*time.Second, "the snapshot's events to be published", func() (bool, string) {
		var n int
		if err := e.db.QueryRow(ctx, `select count(*) from vigil_events where vigil_id::text = any($1)`, snapIDs).Scan(&n); err != nil {
			return false, err.Error()
		}
		return n == 0, fmt.Sprintf("%d still pending", n)
	}); err != nil && h.drainErr == nil {
		h.drainErr = err
		e.note("events: %v", err)
	}
	stream, readErr, got, mirrorErr := ec.settledRead(ctx)
	h.streamErr = readErr
	if ec.mirror != nil {
		h.mirror = &mirrorHistory{appended: len(stream), received: got.received, err: mirrorErr}
		h.mirror.problems, h.mirror.carried = compareMirror(stream, got.counts)
	}
	if added, err := ec.entriesAdded(ctx); err == nil && added > int64(len(stream)) {
		h.streamMissed = added - int64(len(stream))
	}
	// Entries the snapshot does not know: committed after it, or never.
	var unknown []string
	for _, se := range stream {
		if !known[se.VigilID] {
			unknown = append(unknown, se.VigilID)
		}
	}
	later := map[string]bool{}
	if len(unknown) > 0 {
		rows, err := e.db.Query(ctx, `select distinct vigil_id::text from chaos_events where vigil_id::text = any($1)`, unknown)
		if err != nil {
			return err
		}
		for rows.Next() {
			var id string
			if err := rows.Scan(&id); err != nil {
				rows.Close()
				return err
			}
			later[id] = true
		}
		rows.Close()
	}
	for _, se := range stream {
		if later[se.VigilID] {
			h.beyond++
			continue
		}
		h.stream = append(h.stream, se)
	}
	return nil
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

// saveHistory writes the history's parts worth reading after a failure into
// the run directory.
func (e *env) saveHistory(h *history) {
	var b strings.Builder
	for _, r := range h.journal {
		sb := "-"
		if r.sandbox.Valid {
			sb = ids.Sandbox(r.sandbox.UUID)
		}
		fmt.Fprintf(&b, "%d\t%d\t%04d\t%d\t%s\t%s\t%s\t%s\t%d\t%s\t%s\n", r.commitSeq, r.seq, r.shard, r.token, r.replica,
			ids.Host(r.host), sb, r.change, r.txid, r.writtenAt.Format("15:04:05.000000"), r.committedAt.Format("15:04:05.000000"))
	}
	_ = os.WriteFile(e.dir+"/journal.tsv", []byte("commit_seq\tseq\tshard\ttoken\treplica\thost\tsandbox\tchange\ttxid\twritten_at\tcommitted_at\n"+b.String()), 0o644)
	_ = os.WriteFile(e.dir+"/etcd-events.txt", []byte(e.rec.Dump(1<<30)), 0o644)
	b.Reset()
	e.mu.Lock()
	for _, f := range e.faults {
		fmt.Fprintf(&b, "%s\t%s\t%s\t%s\t%s\t%s\t%v\n", f.start.Format("15:04:05.000"), f.lostAt.Format("15:04:05.000"), f.healed.Format("15:04:05.000"), f.kind, f.target, f.detail, f.recoverErr)
	}
	e.mu.Unlock()
	_ = os.WriteFile(e.dir+"/etcd-leaders.txt", []byte(e.leaders.dump()), 0o644)
	b.Reset()
	for _, c := range h.volumes {
		fmt.Fprintf(&b, "%d\t%d\t%d\t%s\t%s\t%s\t%s\t%s\t%s\t%q\t%q\t%s\n", c.commitSeq, c.id, c.txid, c.volume, c.op,
			c.oldStatus, sandboxOrNone(c.oldSandbox), c.newStatus, sandboxOrNone(c.newSandbox), c.oldMount, c.newMount, c.writer)
	}
	_ = os.WriteFile(e.dir+"/volumes.tsv", []byte("commit_seq\tid\ttxid\tvolume\top\told_status\told_sandbox\tnew_status\tnew_sandbox\told_mount\tnew_mount\twriter\n"+b.String()), 0o644)
	_ = os.WriteFile(e.dir+"/faults.tsv", []byte("start\tlost\thealed\tkind\ttarget\tdetail\terror\n"+b.String()), 0o644)
	if e.events != nil {
		b.Reset()
		pos := map[string]string{}
		for _, se := range h.stream {
			if _, ok := pos[se.VigilID]; !ok {
				pos[se.VigilID] = se.ID
			} else {
				pos[se.VigilID] += "," + se.ID
			}
		}
		for _, o := range h.outbox {
			sid := pos[o.vigilID]
			if sid == "" {
				sid = "-"
			}
			fmt.Fprintf(&b, "%d\t%04d\t%d\t%d\t%s\t%s\t%s\t%s\t%s\n", o.commitSeq, o.shard, o.seq, o.txid, o.vigilID, o.payload.Event, o.payload.Resource,
				o.committedAt.Format("15:04:05.000000"), sid)
		}
		_ = os.WriteFile(e.dir+"/events.tsv", []byte("commit_seq\tshard\tseq\ttxid\tvigil_id\tevent\tresource\tcommitted_at\tstream_ids\n"+b.String()), 0o644)
	}
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
