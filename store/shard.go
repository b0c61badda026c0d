package store

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgtype"

	"github.com/vigil-sh/vigil/events"
	"github.com/vigil-sh/vigil/internal/status"
)

// This file is the reconcile's whole data access, shaped by the shard: one
// read of a set of hosts with their rows and the database clock, one batched
// fenced apply of everything a pass decided, and the set-based passive rule.
// A steady pass (nothing to change) costs one statement.

// HostState is a host as a pass reads it.
type HostState struct {
	ID      uuid.UUID
	TeamID  uuid.NullUUID
	Address string // '' when NULL
	Status  string // as the control plane wrote it; '' when NULL
	// Stale: the heartbeat is older than the threshold, or absent, by the
	// database clock at the read.
	Stale bool
	// Sandboxes are the host's rows in the statuses asked for, in id order.
	Sandboxes []Sandbox
}

// Sandbox is a sandbox row.
type Sandbox struct {
	ID          uuid.UUID
	TeamID      uuid.NullUUID // NULL only in a damaged row; such rows are never written
	HostID      uuid.UUID
	Status      string
	LastUpdated time.Time
}

// Read is one consistent snapshot of some hosts: the ones that exist, their
// sandbox rows in the statuses asked for, and the database clock.
type Read struct {
	Now       time.Time
	Hosts     []HostState             // in id order; hosts that do not exist are absent
	Sandboxes map[uuid.UUID][]Sandbox // by host id, each in id order
}

// readHostsSQL is ReadHosts' statement. Each host's rows are a lateral
// subquery behind OFFSET 0, which the planner cannot flatten into a join:
// whatever its estimates, it can only run the subquery once per host, and
// for one host_id the (host_id, status) index is always the cheaper way. As
// a plain join, a sandboxes table without statistics (never analyzed:
// autovacuum off, or just bulk-loaded) made Postgres hash-join a parallel
// sequential scan of every row of the fleet into each shard's read: 17 s
// for 390 hosts of 100,000 × 20, on every pass of every shard.
const readHostsSQL = `
		select h.id, h.team_id, coalesce(h.address, ''), coalesce(h.status, ''),
		       (h.last_heartbeat_at is null or h.last_heartbeat_at < now() - make_interval(secs => $2)),
		       now(), s.id, s.team_id, s.status, s.last_updated
		  from hosts h
		  left join lateral (
		        select s.id, s.team_id, s.status, s.last_updated
		          from sandboxes s
		         where s.host_id = h.id and s.status = any($3)
		        offset 0) s on true
		 where h.id = any($1)
		 order by h.id, s.id`

// ReadHosts reads hosts, their sandboxes whose status is in statuses, and the
// database clock, in one statement. Staleness is judged against staleAfter by
// the database clock.
func (s *Store) ReadHosts(ctx context.Context, hosts []uuid.UUID, staleAfter time.Duration, statuses []string) (Read, error) {
	var out Read
	if len(hosts) == 0 {
		return out, s.pool.QueryRow(ctx, `select now()`).Scan(&out.Now)
	}
	rows, err := s.pool.Query(ctx, readHostsSQL, hosts, staleAfter.Seconds(), statuses)
	if err != nil {
		return out, fmt.Errorf("store: read hosts: %w", err)
	}
	defer rows.Close()
	// pgtype values scan the binary wire format directly; a uuid.NullUUID
	// would go through database/sql's Scanner and a text round trip. One
	// destination list for every row, and every row in one backing array
	// that the hosts' Sandboxes slice.
	var (
		hid, hteam, sid, steam pgtype.UUID
		addr, hst, sst         pgtype.Text
		stale                  bool
		now, slu               pgtype.Timestamptz
		dst                    = []any{&hid, &hteam, &addr, &hst, &stale, &now, &sid, &steam, &sst, &slu}
		all                    = make([]Sandbox, 0, 16*len(hosts))
		from                   []int // per host, its first row in all
	)
	for rows.Next() {
		if err := rows.Scan(dst...); err != nil {
			return out, fmt.Errorf("store: read hosts: %w", err)
		}
		id := uuid.UUID(hid.Bytes)
		if n := len(out.Hosts); n == 0 || out.Hosts[n-1].ID != id {
			out.Hosts = append(out.Hosts, HostState{ID: id, TeamID: nullUUID(hteam), Address: addr.String, Status: internStatus(hst.String), Stale: stale})
			from = append(from, len(all))
			out.Now = now.Time
		}
		if sid.Valid && sst.Valid && slu.Valid {
			all = append(all, Sandbox{ID: uuid.UUID(sid.Bytes), TeamID: nullUUID(steam), HostID: id,
				Status: internStatus(sst.String), LastUpdated: slu.Time})
		}
	}
	for i := range out.Hosts {
		end := len(all)
		if i+1 < len(from) {
			end = from[i+1]
		}
		out.Hosts[i].Sandboxes = all[from[i]:end:end]
	}
	cur := len(out.Hosts) - 1
	first := cur < 0
	if err := rows.Err(); err != nil {
		return out, fmt.Errorf("store: read hosts: %w", err)
	}
	if first { // none of the hosts exists: still give the clock
		return out, s.pool.QueryRow(ctx, `select now()`).Scan(&out.Now)
	}
	return out, nil
}

func nullUUID(u pgtype.UUID) uuid.NullUUID { return uuid.NullUUID{UUID: u.Bytes, Valid: u.Valid} }

// statuses are the strings a read meets again and again; sharing them keeps
// a shard's rows from holding a copy each.
var statuses = func() map[string]string {
	m := map[string]string{}
	for _, s := range append([]string{status.HostPending, status.HostOnline, status.HostUnreachable}, status.Sandboxes...) {
		m[s] = s
	}
	return m
}()

func internStatus(s string) string {
	if c, ok := statuses[s]; ok {
		return c
	}
	return s
}

// Candidate names a sandbox row expected on a host.
type Candidate struct {
	ID, HostID uuid.UUID
}

// StoppedAmong returns those of the candidates whose row is stopped on the
// candidate's host and was last updated at or before before, in one
// statement.
func (s *Store) StoppedAmong(ctx context.Context, cands []Candidate, before time.Time) ([]Sandbox, error) {
	if len(cands) == 0 {
		return nil, nil
	}
	ids, hosts := make([]uuid.UUID, len(cands)), make([]uuid.UUID, len(cands))
	for i, c := range cands {
		ids[i], hosts[i] = c.ID, c.HostID
	}
	rows, err := s.pool.Query(ctx, `
		select s.id, s.team_id, s.host_id, s.status, s.last_updated
		  from unnest($1::uuid[], $2::uuid[]) as c(id, host_id)
		  join sandboxes s on s.id = c.id and s.host_id = c.host_id
		 where s.status = $4 and s.last_updated <= $3
		 order by s.host_id, s.id`, ids, hosts, before, status.Stopped)
	if err != nil {
		return nil, fmt.Errorf("store: read stopped sandboxes: %w", err)
	}
	out, err := pgx.CollectRows(rows, func(r pgx.CollectableRow) (Sandbox, error) {
		var x Sandbox
		err := r.Scan(&x.ID, &x.TeamID, &x.HostID, &x.Status, &x.LastUpdated)
		return x, err
	})
	if err != nil {
		return nil, fmt.Errorf("store: read stopped sandboxes: %w", err)
	}
	return out, nil
}

// AuditRow is an audit_logs row. Write adds the writer's replica, fence token and
// shard to Metadata. Event, when set, is the notification event the change
// publishes: written to the outbox exactly when the audit row is.
type AuditRow struct {
	TeamID       uuid.UUID
	ResourceType string // host, sandbox
	ResourceID   string // the prefixed wire id
	Action       string
	Status       string
	Metadata     map[string]any
	Event        *events.Event
}

// Change is a compare-and-set of one sandbox row: it happens only if the row
// still has Row.HostID, Row.Status and Row.LastUpdated. It sets To and
// last_updated = now(), and writes Audit (when not nil) and a journal row,
// all only if it happens.
type Change struct {
	Row   Sandbox
	To    string
	Audit *AuditRow
}

// Record is a side effect that already happened (a sandbox destroyed on its
// agent), written as its audit row (with its event, if any) and journal row.
type Record struct {
	Host, Sandbox uuid.UUID
	Change        string // journal text, e.g. "destroyed_on_agent"
	Audit         AuditRow
}

// Batch is everything one fenced transaction writes or checks.
type Batch struct {
	Changes []Change
	// Zombies checks, under the fence and FOR SHARE, that each row is still as
	// read (host, status, last_updated): the gate before a side effect on an
	// agent.
	Zombies []Sandbox
	// Resends is Held for re-sent destroys: the row must also not have
	// had its destroy re-sent within RetryGrace.
	Resends     []Sandbox
	ResendGrace time.Duration
	Records     []Record
}

func (b Batch) empty() bool {
	return len(b.Changes) == 0 && len(b.Zombies) == 0 && len(b.Resends) == 0 && len(b.Records) == 0
}

func (b Batch) events() bool {
	for _, c := range b.Changes {
		if c.Audit != nil && c.Audit.Event != nil {
			return true
		}
	}
	for _, r := range b.Records {
		if r.Audit.Event != nil {
			return true
		}
	}
	return false
}

// Result says, per Batch entry in order, what happened.
type Result struct {
	Applied []bool // Changes: the compare-and-set matched and the row changed
	Zombies []bool // Held: the row is still as read
	Resends []bool // HeldRetry: as Held, and not re-sent within the grace
}

// Apply runs b in one fenced transaction (see WithFence): the changes as one
// statement (compare-and-set updates, their audit, journal and outbox rows,
// and when the database has a volumes table the volumes of the sandboxes
// that became stopped or error detached: rule 11), the checks as one, the
// records as one. A compare-and-set that misses is not an
// error: Applied is false and nothing of it is written. An empty batch opens
// no transaction. On error nothing was written; errors.Is(err, ErrFenced)
// means the shard is lost.
func (s *Store) Apply(ctx context.Context, f Fence, b Batch) (Result, error) {
	fresh := func() Result {
		return Result{Applied: make([]bool, len(b.Changes)), Zombies: make([]bool, len(b.Zombies)), Resends: make([]bool, len(b.Resends))}
	}
	out := fresh()
	if b.empty() {
		return out, nil
	}
	vol := b.detaches() && s.Volumes(ctx)
	err := s.apply(ctx, f, b, vol, &out, fresh)
	if err != nil && vol && s.volumesGone(err) {
		// The volumes table went away since the last look: look again and
		// write the batch without it, rather than failing the pass.
		vol = s.Volumes(ctx)
		err = s.apply(ctx, f, b, vol, &out, fresh)
	}
	if err != nil {
		return fresh(), err
	}
	return out, nil
}

// apply is Apply's one fenced transaction; out is reset at each attempt.
func (s *Store) apply(ctx context.Context, f Fence, b Batch, vol bool, out *Result, fresh func() Result) error {
	return s.WithFence(ctx, f, func(tx pgx.Tx) error {
		*out = fresh()
		if b.events() {
			if err := lockEvents(ctx, tx, f.Shard); err != nil {
				return err
			}
		}
		if err := applyChanges(ctx, tx, f, b.Changes, out.Applied, vol); err != nil {
			return err
		}
		if err := checkHeld(ctx, tx, b.Zombies, 0, out.Zombies); err != nil {
			return err
		}
		if err := checkHeld(ctx, tx, b.Resends, b.ResendGrace, out.Resends); err != nil {
			return err
		}
		if err := claimResends(ctx, tx, b.Resends, out.Resends); err != nil {
			return err
		}
		return writeRecords(ctx, tx, f, b.Records)
	})
}

// detaches reports whether a change of b may detach volumes (rule 11): it
// moves a sandbox to stopped or error.
func (b Batch) detaches() bool {
	for _, c := range b.Changes {
		if detaching(c.To) {
			return true
		}
	}
	return false
}

// detaching reports whether a change to status detaches the sandbox's
// volumes (rule 11).
func detaching(to string) bool { return to == status.Stopped || to == status.Error }

// detachVolumes is the CTE of applyChanges that detaches the volumes of the
// sandboxes whose change to stopped or error matched (rule 11).
const detachVolumes = `,
		vol as (
			update volumes v set status = 'detached', sandbox_id = null, mount_path = '', last_updated = now()
			  from upd
			 where upd.to_status in ('stopped', 'error') and v.sandbox_id = upd.id
			   and v.status in ('attached', 'attaching'))`

// lockEvents serialises the transactions that write one shard's events, so
// their seq order is their commit order.
func lockEvents(ctx context.Context, tx pgx.Tx, shard int) error {
	if _, err := tx.Exec(ctx, `select pg_advisory_xact_lock($1, $2)`, eventsLockSpace, shard); err != nil {
		return fmt.Errorf("store: lock the events of shard %d: %w", shard, err)
	}
	return nil
}

// eventsLockSpace is the first key of the events' advisory locks.
const eventsLockSpace = 0x76696731 // "vig1"

// applyChanges writes cs in one statement: the compare-and-set updates, and
// for exactly the ones that matched their audit, journal and outbox rows,
// and with volumes their volumes detached.
func applyChanges(ctx context.Context, tx pgx.Tx, f Fence, cs []Change, applied []bool, volumes bool) error {
	if len(cs) == 0 {
		return nil
	}
	n := len(cs)
	var (
		idx                           = make([]int32, n)
		id, host                      = make([]uuid.UUID, n), make([]uuid.UUID, n)
		from, to                      = make([]string, n), make([]string, n)
		seen                          = make([]time.Time, n)
		aIdx                          []int32
		aTeam                         []uuid.UUID
		aType, aRID, aAct, aSt, aMeta []string
		eIdx                          []int32
		eID                           []uuid.UUID
		eName, ePayload               []string
	)
	for i, c := range cs {
		idx[i], id[i], host[i], from[i], to[i], seen[i] = int32(i), c.Row.ID, c.Row.HostID, c.Row.Status, c.To, c.Row.LastUpdated
		if c.Audit != nil {
			meta, err := metadata(f, c.Audit.Metadata)
			if err != nil {
				return err
			}
			aIdx = append(aIdx, int32(i))
			aTeam = append(aTeam, c.Audit.TeamID)
			aType, aRID = append(aType, c.Audit.ResourceType), append(aRID, c.Audit.ResourceID)
			aAct, aSt, aMeta = append(aAct, c.Audit.Action), append(aSt, c.Audit.Status), append(aMeta, meta)
			if e := c.Audit.Event; e != nil {
				eIdx, eID = append(eIdx, int32(i)), append(eID, e.ID)
				eName, ePayload = append(eName, e.Name), append(ePayload, e.Payload)
			}
		}
	}
	q := applyChangesSQL
	if volumes {
		q = applyChangesVolumesSQL
	}
	rows, err := tx.Query(ctx, q,
		idx, id, host, from, to, seen, aIdx, aTeam, aType, aRID, aAct, aSt, aMeta, f.Shard, f.Token, f.Replica,
		eIdx, eID, eName, ePayload)
	if err != nil {
		return fmt.Errorf("store: apply %d changes: %w", n, err)
	}
	defer rows.Close()
	for rows.Next() {
		var i int32
		if err := rows.Scan(&i); err != nil {
			return fmt.Errorf("store: apply %d changes: %w", n, err)
		}
		applied[i] = true
	}
	if err := rows.Err(); err != nil {
		return fmt.Errorf("store: apply %d changes: %w", n, err)
	}
	return nil
}

// applyChangesSQL: rows are locked in id order (the input is sorted by the
// caller's pass order; the update's join decides the rest), one statement
// for everything: the compare-and-set updates, then audit, journal and
// outbox rows for exactly the updates that matched. Journal and outbox rows
// are numbered in the input's order, so within a shard the journal's order
// is the stream's, down to the events of one transaction (the join alone
// would number the journal rows in whatever order the plan yields them).
const applyChangesSQL = `
		with c as (
			select * from unnest($1::int[], $2::uuid[], $3::uuid[], $4::text[], $5::text[], $6::timestamptz[])
			           as c(idx, id, host_id, from_status, to_status, seen)),
		upd as (
			update sandboxes s set status = c.to_status, last_updated = now()
			  from c
			 where s.id = c.id and s.host_id = c.host_id and s.status = c.from_status and s.last_updated = c.seen
			returning c.idx, c.id, c.host_id, c.from_status, c.to_status),
		aud as (
			insert into audit_logs (id, team_id, actor_type, actor_id, actor_name, resource_type, resource_id, action, scope, status, metadata, created_at)
			select gen_random_uuid(), a.team_id, 'system', null, '', a.rtype, a.rid, a.action, 'team', a.status, a.meta::jsonb, now()
			  from unnest($7::int[], $8::uuid[], $9::text[], $10::text[], $11::text[], $12::text[], $13::text[])
			           as a(idx, team_id, rtype, rid, action, status, meta)
			  join upd on upd.idx = a.idx),
		e as (
			select * from unnest($17::int[], $18::uuid[], $19::text[], $20::text[]) with ordinality as e(idx, id, name, payload, ord)),
		jr as (
			insert into vigil_journal (shard, token, replica, host_id, sandbox_id, change, event_id)
			select $14, $15, $16, upd.host_id, upd.id, upd.from_status || '->' || upd.to_status, e.id
			  from upd left join e on e.idx = upd.idx
			 order by upd.idx),
		ev as (
			insert into vigil_events (shard, vigil_id, event, payload)
			select $14, e.id, e.name, e.payload
			  from e join upd on upd.idx = e.idx
			 order by e.ord)` + applyChangesTail

const applyChangesTail = `
		select idx from upd`

// applyChangesVolumesSQL is applyChangesSQL that also detaches volumes.
var applyChangesVolumesSQL = strings.TrimSuffix(applyChangesSQL, applyChangesTail) + detachVolumes + applyChangesTail

// checkHeld checks that rows are still as read, FOR SHARE; with a grace, also
// that their destroy was not re-sent within it.
func checkHeld(ctx context.Context, tx pgx.Tx, hs []Sandbox, grace time.Duration, held []bool) error {
	if len(hs) == 0 {
		return nil
	}
	idx := make([]int32, len(hs))
	id, host := make([]uuid.UUID, len(hs)), make([]uuid.UUID, len(hs))
	st, seen := make([]string, len(hs)), make([]time.Time, len(hs))
	for i, h := range hs {
		idx[i], id[i], host[i], st[i], seen[i] = int32(i), h.ID, h.HostID, h.Status, h.LastUpdated
	}
	rows, err := tx.Query(ctx, `
		select c.idx
		  from unnest($1::int[], $2::uuid[], $3::uuid[], $4::text[], $5::timestamptz[]) as c(idx, id, host_id, status, seen)
		  join sandboxes s on s.id = c.id and s.host_id = c.host_id and s.status = c.status and s.last_updated = c.seen
		  left join vigil_destroy_retries r on $6 > 0 and r.sandbox_id = c.id
		 where r.retried_at is null or r.retried_at < now() - make_interval(secs => $6)
		   for share of s`, idx, id, host, st, seen, grace.Seconds())
	if err != nil {
		return fmt.Errorf("store: check %d rows: %w", len(hs), err)
	}
	defer rows.Close()
	for rows.Next() {
		var i int32
		if err := rows.Scan(&i); err != nil {
			return fmt.Errorf("store: check %d rows: %w", len(hs), err)
		}
		held[i] = true
	}
	if err := rows.Err(); err != nil {
		return fmt.Errorf("store: check %d rows: %w", len(hs), err)
	}
	return nil
}

// claimResends records, in the transaction whose check let them through,
// that the held rows' destroys are re-sent now: the once-per-grace bound of
// rule 9 then holds whatever the agent answers (accepted, refused, timed
// out) and whoever owns the shard next.
func claimResends(ctx context.Context, tx pgx.Tx, hs []Sandbox, held []bool) error {
	var ids []uuid.UUID
	for i, h := range hs {
		if held[i] {
			ids = append(ids, h.ID)
		}
	}
	if len(ids) == 0 {
		return nil
	}
	if _, err := tx.Exec(ctx, `
		insert into vigil_destroy_retries (sandbox_id, retried_at)
		select id, now() from unnest($1::uuid[]) as id
		    on conflict (sandbox_id) do update set retried_at = excluded.retried_at`, ids); err != nil {
		return fmt.Errorf("store: claim %d destroy re-sends: %w", len(ids), err)
	}
	return nil
}

func writeRecords(ctx context.Context, tx pgx.Tx, f Fence, rs []Record) error {
	if len(rs) == 0 {
		return nil
	}
	n := len(rs)
	host, sb, team := make([]uuid.UUID, n), make([]uuid.UUID, n), make([]uuid.UUID, n)
	change, rtype, rid, act, st, meta := make([]string, n), make([]string, n), make([]string, n), make([]string, n), make([]string, n), make([]string, n)
	rEvent := make([]pgtype.UUID, n) // the record's event, null for none
	var eID []uuid.UUID
	var eName, ePayload []string
	for i, r := range rs {
		m, err := metadata(f, r.Audit.Metadata)
		if err != nil {
			return err
		}
		host[i], sb[i], team[i], change[i] = r.Host, r.Sandbox, r.Audit.TeamID, r.Change
		rtype[i], rid[i], act[i], st[i], meta[i] = r.Audit.ResourceType, r.Audit.ResourceID, r.Audit.Action, r.Audit.Status, m
		if e := r.Audit.Event; e != nil {
			eID, eName, ePayload = append(eID, e.ID), append(eName, e.Name), append(ePayload, e.Payload)
			rEvent[i] = pgtype.UUID{Bytes: e.ID, Valid: true}
		}
	}
	_, err := tx.Exec(ctx, `
		with r as (
			select * from unnest($1::uuid[], $2::uuid[], $3::uuid[], $4::text[], $5::text[], $6::text[], $7::text[], $8::text[], $9::text[], $13::uuid[])
			           as r(host_id, sandbox_id, team_id, change, rtype, rid, action, status, meta, event_id)),
		aud as (
			insert into audit_logs (id, team_id, actor_type, actor_id, actor_name, resource_type, resource_id, action, scope, status, metadata, created_at)
			select gen_random_uuid(), team_id, 'system', null, '', rtype, rid, action, 'team', status, meta::jsonb, now() from r),
		ev as (
			insert into vigil_events (shard, vigil_id, event, payload)
			select $10, e.id, e.name, e.payload
			  from unnest($14::uuid[], $15::text[], $16::text[]) with ordinality as e(id, name, payload, ord)
			 order by e.ord)
		insert into vigil_journal (shard, token, replica, host_id, sandbox_id, change, event_id)
		select $10, $11, $12, host_id, sandbox_id, change, event_id from r`,
		host, sb, team, change, rtype, rid, act, st, meta, f.Shard, f.Token, f.Replica, rEvent, eID, eName, ePayload)
	if err != nil {
		return fmt.Errorf("store: write %d records: %w", n, err)
	}
	return nil
}

// metadata is an audit row's metadata: the caller's keys plus the writer's
// replica, fence token and shard.
func metadata(f Fence, m map[string]any) (string, error) {
	all := make(map[string]any, len(m)+3)
	for k, v := range m {
		all[k] = v
	}
	all["replica"], all["fence"], all["shard"] = f.Replica, f.Token, f.Shard
	b, err := json.Marshal(all)
	if err != nil {
		return "", fmt.Errorf("store: audit metadata: %w", err)
	}
	return string(b), nil
}

// MarkedHost is a host the passive rule marked unreachable.
type MarkedHost struct {
	ID        uuid.UUID
	WasStatus string
	TeamID    uuid.NullUUID
	// Missing are the host's sandboxes that became missing, with the status
	// each had.
	Missing []MovedSandbox
}

// MovedSandbox is a sandbox row a change moved.
type MovedSandbox struct {
	ID   uuid.UUID
	From string
}

// PassiveInput is the passive rule's input: the candidate hosts (with the prefixed
// id each one's audit row names), the threshold, the statuses that become
// missing, and the audit row for hosts that have a team (TeamID and
// ResourceID are filled per host).
type PassiveInput struct {
	Hosts       []uuid.UUID
	ResourceIDs []string
	StaleAfter  time.Duration
	Live        []string // sandbox statuses that become missing
	Audit       AuditRow
	// Event, when set, gives the notification event of a marked host that
	// has a team (the one its audit row announces), written in the same
	// transaction.
	Event func(MarkedHost) events.Event
}

// Passive is the passive rule (SPEC §2 item 1) for a set of hosts, in
// one fenced transaction and one statement: every candidate whose heartbeat
// is older than the threshold by the database clock (or absent) and whose
// status is not unreachable (nor NULL) becomes unreachable with updated_at =
// now(); its sandboxes in m.Live become missing with last_updated = now()
// (but not damaged ones, without a team, which no rule may write); a
// host with a team gets its audit row; every change gets a journal row. All
// conditional, row by row, on the host really changing: a heartbeat that
// commits first wins.
func (s *Store) Passive(ctx context.Context, f Fence, m PassiveInput) ([]MarkedHost, error) {
	if len(m.Hosts) == 0 {
		return nil, nil
	}
	if len(m.ResourceIDs) != len(m.Hosts) {
		return nil, errors.New("store: passive rule: one resource id per host")
	}
	meta, err := metadata(f, m.Audit.Metadata)
	if err != nil {
		return nil, err
	}
	var out []MarkedHost
	err = s.WithFence(ctx, f, func(tx pgx.Tx) error {
		if m.Event != nil {
			// Before any row lock, in the same order as Apply: a pass
			// writing events on these hosts at the same time waits here
			// instead of deadlocking.
			if err := lockEvents(ctx, tx, f.Shard); err != nil {
				return err
			}
		}
		rows, err := tx.Query(ctx, passiveSQL,
			m.Hosts, m.ResourceIDs, m.StaleAfter.Seconds(), m.Live,
			m.Audit.ResourceType, m.Audit.Action, m.Audit.Status, meta, f.Shard, f.Token, f.Replica,
			status.HostUnreachable, status.Missing)
		if err != nil {
			return fmt.Errorf("store: mark hosts unreachable: %w", err)
		}
		if out, err = scanMarked(rows); err != nil {
			return fmt.Errorf("store: mark hosts unreachable: %w", err)
		}
		return insertHostEvents(ctx, tx, f, m.Event, out)
	})
	if err != nil {
		return nil, err
	}
	return out, nil
}

// passiveSQL is the passive rule's one statement: candidates re-checked by
// the database clock and locked, marked unreachable, their live rows (not
// damaged ones) missing, the audit rows of hosts with a team, a journal row
// per change; it returns the hosts (is_sandbox false) and sandboxes it moved.
const passiveSQL = `
	with cand as (
		select h.id, h.status as was, h.team_id, c.rid
		  from hosts h join unnest($1::uuid[], $2::text[]) as c(id, rid) on c.id = h.id
		 where h.status <> $12
		   and (h.last_heartbeat_at is null or h.last_heartbeat_at < now() - make_interval(secs => $3))
		   for update of h),
	down as (
		update hosts h set status = $12, updated_at = now()
		  from cand where h.id = cand.id
		returning h.id, cand.was, cand.team_id, cand.rid),
	gone as (
		select s.id, s.status as was, s.host_id
		  from sandboxes s join down on s.host_id = down.id
		 where s.status = any($4) and s.team_id is not null -- damaged rows are never written
		   for update of s),
	missing as (
		update sandboxes s set status = $13, last_updated = now()
		  from gone where s.id = gone.id
		returning s.id, gone.was, gone.host_id),
	aud as (
		insert into audit_logs (id, team_id, actor_type, actor_id, actor_name, resource_type, resource_id, action, scope, status, metadata, created_at)
		select gen_random_uuid(), team_id, 'system', null, '', $5, rid, $6, 'team', $7, $8::jsonb, now()
		  from down where team_id is not null),
	jr as (
		insert into vigil_journal (shard, token, replica, host_id, sandbox_id, change)
		select $9::int, $10::bigint, $11::text, id, null::uuid, was || '->' || $12 from down
		union all
		select $9::int, $10::bigint, $11::text, host_id, id, was || '->' || $13 from missing)
	select id, id, was, team_id, false from down
	union all
	select host_id, id, was, null, true from missing`

// scanMarked reads passiveSQL's rows into the marked hosts, each with the
// sandboxes that went missing with it.
func scanMarked(rows pgx.Rows) ([]MarkedHost, error) {
	defer rows.Close()
	var out []MarkedHost
	at := map[uuid.UUID]int{}
	missing := map[uuid.UUID][]MovedSandbox{}
	for rows.Next() {
		var host, id uuid.UUID
		var was string
		var team uuid.NullUUID
		var isSandbox bool
		if err := rows.Scan(&host, &id, &was, &team, &isSandbox); err != nil {
			return nil, err
		}
		if isSandbox {
			missing[host] = append(missing[host], MovedSandbox{ID: id, From: was})
			continue
		}
		at[host] = len(out)
		out = append(out, MarkedHost{ID: host, WasStatus: was, TeamID: team})
	}
	if err := rows.Err(); err != nil {
		return nil, err
	}
	for host, sbs := range missing {
		if i, ok := at[host]; ok {
			out[i].Missing = sbs
		}
	}
	return out, nil
}

// insertHostEvents writes the events of the marked hosts that have a team.
func insertHostEvents(ctx context.Context, tx pgx.Tx, f Fence, event func(MarkedHost) events.Event, marked []MarkedHost) error {
	if event == nil {
		return nil
	}
	var id, host []uuid.UUID
	var name, payload []string
	for _, h := range marked {
		if !h.TeamID.Valid {
			continue
		}
		e := event(h)
		id, name, payload = append(id, e.ID), append(name, e.Name), append(payload, e.Payload)
		host = append(host, h.ID)
	}
	if len(id) == 0 {
		return nil
	}
	// The host's journal row of this transaction (the first statement's)
	// names its event.
	_, err := tx.Exec(ctx, `
		with e as (
			select * from unnest($2::uuid[], $3::text[], $4::text[], $5::uuid[]) with ordinality as e(id, name, payload, host_id, ord)),
		ev as (
			insert into vigil_events (shard, vigil_id, event, payload)
			select $1, e.id, e.name, e.payload from e order by e.ord)
		update vigil_journal j set event_id = e.id
		  from e
		 where j.shard = $1 and j.token = $6 and j.host_id = e.host_id and j.sandbox_id is null
		   and j.written_at = now() and j.event_id is null`, f.Shard, id, name, payload, host, f.Token)
	if err != nil {
		return fmt.Errorf("store: write %d host events: %w", len(id), err)
	}
	return nil
}

// PendingEvent is an outbox row waiting to be published.
type PendingEvent struct {
	Seq       int64
	Event     events.Event
	CreatedAt time.Time
	// Legacy, for an event of a name in PendingEvents' legacy list (an
	// earlier version's), says what its change was: the journal's change
	// ("running->stopped", "destroyed_on_agent"), or when the journal row is
	// gone "reason:" and the reason of its audit row; "" when neither is
	// found.
	Legacy string
}

// PendingEvents returns the shard's oldest pending events, at most limit, in
// commit order, and with count how many are pending in all (a scan of the
// whole backlog: once per relay run, not per batch), in one statement;
// without count the total is -1. Events named in legacy get their Legacy
// field (one indexed lookup each; others none).
func (s *Store) PendingEvents(ctx context.Context, shard, limit int, count bool, legacy []string) ([]PendingEvent, int, error) {
	total := "-1"
	if count {
		total = "count(*) over ()"
	}
	q := `select e.seq, e.vigil_id, e.event, e.payload, e.created_at, ` + total + `,
	             case when e.event = any($3) then coalesce(
	                 (select j.change from vigil_journal j
	                   where j.shard = e.shard and j.written_at = e.created_at and j.event_id = e.vigil_id limit 1),
	                 (select 'reason:' || (a.metadata->>'reason') from audit_logs a
	                   where a.created_at = e.created_at and a.actor_type = 'system'
	                     and a.resource_id = (e.payload::jsonb->'resource'->>'id') and a.metadata->>'reason' is not null limit 1),
	                 '') else '' end
	        from vigil_events e where e.shard = $1
	       order by e.seq limit $2`
	rows, err := s.pool.Query(ctx, q, shard, limit, legacy)
	if err != nil {
		return nil, 0, fmt.Errorf("store: read pending events of shard %d: %w", shard, err)
	}
	defer rows.Close()
	var out []PendingEvent
	n := 0
	for rows.Next() {
		var p PendingEvent
		if err := rows.Scan(&p.Seq, &p.Event.ID, &p.Event.Name, &p.Event.Payload, &p.CreatedAt, &n, &p.Legacy); err != nil {
			return nil, 0, fmt.Errorf("store: read pending events of shard %d: %w", shard, err)
		}
		out = append(out, p)
	}
	if err := rows.Err(); err != nil {
		return nil, 0, fmt.Errorf("store: read pending events of shard %d: %w", shard, err)
	}
	if len(out) == 0 && !count {
		n = -1
	}
	return out, n, nil
}

// DeleteEvents removes published outbox rows of f's shard, under the fence.
func (s *Store) DeleteEvents(ctx context.Context, f Fence, seqs []int64) error {
	if len(seqs) == 0 {
		return nil
	}
	return s.WithFence(ctx, f, func(tx pgx.Tx) error {
		_, err := tx.Exec(ctx, `delete from vigil_events where shard = $1 and seq = any($2)`, f.Shard, seqs)
		if err != nil {
			return fmt.Errorf("store: delete %d published events: %w", len(seqs), err)
		}
		return nil
	})
}

// StaleHosts lists hosts whose heartbeat is older than staleAfter by the
// database clock (or absent) and whose status is neither unreachable nor
// NULL: candidates for Passive, which re-checks.
func (s *Store) StaleHosts(ctx context.Context, staleAfter time.Duration) ([]uuid.UUID, error) {
	rows, err := s.pool.Query(ctx, `
		select id from hosts
		 where status <> $2
		   and (last_heartbeat_at is null or last_heartbeat_at < now() - make_interval(secs => $1))`,
		staleAfter.Seconds(), status.HostUnreachable)
	if err != nil {
		return nil, fmt.Errorf("store: scan for stale hosts: %w", err)
	}
	ids, err := pgx.CollectRows(rows, pgx.RowTo[uuid.UUID])
	if err != nil {
		return nil, fmt.Errorf("store: scan for stale hosts: %w", err)
	}
	return ids, nil
}

// HostIDs lists every host id.
func (s *Store) HostIDs(ctx context.Context) ([]uuid.UUID, error) {
	rows, err := s.pool.Query(ctx, `select id from hosts`)
	if err != nil {
		return nil, fmt.Errorf("store: list hosts: %w", err)
	}
	ids, err := pgx.CollectRows(rows, pgx.RowTo[uuid.UUID])
	if err != nil {
		return nil, fmt.Errorf("store: list hosts: %w", err)
	}
	return ids, nil
}

// TrimJournal deletes the shard's journal rows and shadow changes older than
// keep, under the fence.
func (s *Store) TrimJournal(ctx context.Context, f Fence, keep time.Duration) (int64, error) {
	var n int64
	err := s.WithFence(ctx, f, func(tx pgx.Tx) error {
		tag, err := tx.Exec(ctx, `delete from vigil_journal where shard = $1 and written_at < now() - make_interval(secs => $2)`, f.Shard, keep.Seconds())
		if err != nil {
			return err
		}
		n = tag.RowsAffected()
		_, err = tx.Exec(ctx, `delete from vigil_shadow_changes where shard = $1 and at < now() - make_interval(secs => $2)`, f.Shard, keep.Seconds())
		if err != nil {
			return err
		}
		// Re-send times far past any grace (they are not per shard: any
		// owner's trim takes them).
		_, err = tx.Exec(ctx, `delete from vigil_destroy_retries where retried_at < now() - make_interval(secs => $1)`, keep.Seconds())
		return err
	})
	if err != nil {
		return 0, fmt.Errorf("store: trim journal of shard %d: %w", f.Shard, err)
	}
	return n, nil
}

// ListenHostOnline delivers the reconnect trigger's notifications (a host
// went unreachable → online) to fn until ctx ends or the connection fails;
// it always returns an error saying which. The connection it holds carries
// LISTEN state and is closed, never returned to the pool.
// A payload that is not a UUID reaches fn as an error naming it.
func (s *Store) ListenHostOnline(ctx context.Context, fn func(host uuid.UUID, err error)) error {
	conn, err := s.pool.Acquire(ctx)
	if err != nil {
		return fmt.Errorf("store: listen: %w", err)
	}
	pc := conn.Hijack()
	defer pc.Close(context.Background())
	if _, err := pc.Exec(ctx, "listen vigil_host_online"); err != nil {
		return fmt.Errorf("store: listen: %w", err)
	}
	for {
		n, err := pc.WaitForNotification(ctx)
		if err != nil {
			return fmt.Errorf("store: listen: %w", err)
		}
		id, err := uuid.Parse(n.Payload)
		if err != nil {
			err = fmt.Errorf("store: malformed reconnect notification %q: %w", n.Payload, err)
		}
		fn(id, err)
	}
}
