package store_test

import (
	"context"
	"encoding/json"
	"errors"
	"slices"
	"testing"
	"time"

	"github.com/google/uuid"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/vigil-sh/vigil/internal/pgtest"
	"github.com/vigil-sh/vigil/store"
)

// counted opens a store whose statement counter the test can read.
func counted(t *testing.T) (*store.Store, *prometheus.Registry) {
	t.Helper()
	url := pgtest.New(t)
	reg := prometheus.NewRegistry()
	s, err := store.Open(context.Background(), store.Config{URL: url, MaxConns: 4, Registerer: reg})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(s.Close)
	dbs.Store(s, dbFor(t, url))
	return s, reg
}

func statements(t *testing.T, reg *prometheus.Registry) int {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() == "vigil_db_statements_total" {
			return int(mf.GetMetric()[0].GetCounter().GetValue())
		}
	}
	t.Fatal("vigil_db_statements_total not registered")
	return 0
}

func writeTx(t *testing.T, reg *prometheus.Registry, result string) int {
	t.Helper()
	mfs, _ := reg.Gather()
	for _, mf := range mfs {
		if mf.GetName() != "vigil_db_write_transactions_total" {
			continue
		}
		for _, m := range mf.GetMetric() {
			if m.GetLabel()[0].GetValue() == result {
				return int(m.GetCounter().GetValue())
			}
		}
	}
	return 0
}

func addHost(t *testing.T, s *store.Store, status string, team *uuid.UUID, heartbeatAgo time.Duration) uuid.UUID {
	t.Helper()
	id := uuid.New()
	hb := "now() - make_interval(secs => $4)"
	if heartbeatAgo < 0 {
		hb = "case when $4::float8 < 0 then null::timestamptz end"
	}
	_, err := db(s).Exec(context.Background(), `
		insert into hosts (id, team_id, address, status, last_heartbeat_at)
		values ($1, $2, '127.0.0.1:1', $3, `+hb+`)`, id, team, status, heartbeatAgo.Seconds())
	if err != nil {
		t.Fatal(err)
	}
	return id
}

func addSandbox(t *testing.T, s *store.Store, host uuid.UUID, status string) store.Sandbox {
	t.Helper()
	sb := store.Sandbox{ID: uuid.New(), TeamID: uuid.NullUUID{UUID: uuid.New(), Valid: true}, HostID: host, Status: status}
	err := db(s).QueryRow(context.Background(), `
		insert into sandboxes (id, team_id, host_id, status, last_updated) values ($1, $2, $3, $4, now() - interval '1 minute')
		returning last_updated`, sb.ID, sb.TeamID, host, status).Scan(&sb.LastUpdated)
	if err != nil {
		t.Fatal(err)
	}
	return sb
}

type journalRow struct {
	Shard   int
	Token   int64
	Replica string
	Host    uuid.UUID
	Sandbox uuid.NullUUID
	Change  string
}

func journal(t *testing.T, s *store.Store) []journalRow {
	t.Helper()
	rows, err := db(s).Query(context.Background(), `select shard, token, replica, host_id, sandbox_id, change from vigil_journal order by seq`)
	if err != nil {
		t.Fatal(err)
	}
	defer rows.Close()
	var out []journalRow
	for rows.Next() {
		var j journalRow
		if err := rows.Scan(&j.Shard, &j.Token, &j.Replica, &j.Host, &j.Sandbox, &j.Change); err != nil {
			t.Fatal(err)
		}
		out = append(out, j)
	}
	return out
}

func audits(t *testing.T, s *store.Store) []map[string]any {
	t.Helper()
	rows, err := db(s).Query(context.Background(), `select resource_id, action, status, metadata from audit_logs order by created_at, resource_id`)
	if err != nil {
		t.Fatal(err)
	}
	defer rows.Close()
	var out []map[string]any
	for rows.Next() {
		var rid, act, st string
		var meta []byte
		if err := rows.Scan(&rid, &act, &st, &meta); err != nil {
			t.Fatal(err)
		}
		m := map[string]any{}
		if err := json.Unmarshal(meta, &m); err != nil {
			t.Fatal(err)
		}
		m["resource_id"], m["action"], m["status"] = rid, act, st
		out = append(out, m)
	}
	return out
}

// A read of a set of hosts is one statement however many hosts and rows:
// hosts, their rows in the asked statuses, staleness and the clock, all by
// the database.
func TestReadHostsIsOneStatement(t *testing.T) {
	ctx := context.Background()
	s, reg := counted(t)
	team := uuid.New()
	fresh := addHost(t, s, "online", &team, 10*time.Second)
	stale := addHost(t, s, "online", nil, 95*time.Second)
	never := addHost(t, s, "pending", nil, -1)
	var hosts []uuid.UUID
	want := map[uuid.UUID][]uuid.UUID{}
	for _, h := range []uuid.UUID{fresh, stale} {
		for range 5 {
			want[h] = append(want[h], addSandbox(t, s, h, "running").ID)
		}
		addSandbox(t, s, h, "stopped") // not asked for
		slices.SortFunc(want[h], func(a, b uuid.UUID) int { return slices.Compare(a[:], b[:]) })
	}
	// A control plane whose columns allow NULL (the dev schema does not).
	if _, err := db(s).Exec(ctx, `alter table hosts alter column status drop not null, alter column address drop not null`); err != nil {
		t.Fatal(err)
	}
	if _, err := db(s).Exec(ctx, `update hosts set status = null, address = null where id = $1`, never); err != nil {
		t.Fatal(err)
	}
	gone := uuid.New()
	hosts = append(hosts, fresh, stale, never, gone)

	before := statements(t, reg)
	rd, err := s.ReadHosts(ctx, hosts, 90*time.Second, []string{"running", "missing"})
	if err != nil {
		t.Fatal(err)
	}
	if n := statements(t, reg) - before; n != 1 {
		t.Errorf("ReadHosts sent %d statements, want 1", n)
	}
	if len(rd.Hosts) != 3 {
		t.Fatalf("read %d hosts, want 3 (the missing one absent): %+v", len(rd.Hosts), rd.Hosts)
	}
	if time.Since(rd.Now) > time.Minute || rd.Now.IsZero() {
		t.Errorf("clock %v", rd.Now)
	}
	for _, h := range rd.Hosts {
		switch h.ID {
		case fresh:
			if h.Stale || h.Status != "online" || !h.TeamID.Valid || h.TeamID.UUID != team {
				t.Errorf("fresh host read as %+v", h)
			}
		case stale:
			if !h.Stale || h.TeamID.Valid {
				t.Errorf("stale host read as %+v", h)
			}
		case never:
			if !h.Stale || h.Status != "" || h.Address != "" {
				t.Errorf("host without heartbeat, status or address read as %+v", h)
			}
		}
		var got []uuid.UUID
		for _, sb := range h.Sandboxes {
			if sb.HostID != h.ID || sb.Status != "running" {
				t.Errorf("row %+v", sb)
			}
			got = append(got, sb.ID)
		}
		if !slices.Equal(got, want[h.ID]) {
			t.Errorf("host %s rows %v, want %v in id order", h.ID, got, want[h.ID])
		}
	}
}

// One fenced transaction applies a batch: compare-and-set hits change their
// row and write their audit and journal rows; misses write nothing; an empty
// batch opens no transaction.
func TestApplyBatchCompareAndSet(t *testing.T) {
	ctx := context.Background()
	s, reg := counted(t)
	f := store.Fence{Shard: 4, Token: 40, Replica: "r1"}
	if err := s.RaiseFence(ctx, f); err != nil {
		t.Fatal(err)
	}
	h := addHost(t, s, "online", nil, 0)
	hit := addSandbox(t, s, h, "running")
	silent := addSandbox(t, s, h, "missing")
	moved := addSandbox(t, s, h, "running")
	touched := addSandbox(t, s, h, "running")
	zombie := addSandbox(t, s, h, "stopped")
	// The control plane acts after the read: one row moved to another host,
	// one row's clock touched.
	db(s).Exec(ctx, `update sandboxes set host_id = $2 where id = $1`, moved.ID, uuid.New())
	db(s).Exec(ctx, `update sandboxes set last_updated = now() where id = $1`, touched.ID)

	before := statements(t, reg)
	if _, err := s.Apply(ctx, f, store.Batch{}); err != nil {
		t.Fatal(err)
	}
	if n := statements(t, reg) - before; n != 0 {
		t.Errorf("empty batch sent %d statements", n)
	}
	audit := func(sb store.Sandbox) *store.AuditRow {
		return &store.AuditRow{TeamID: sb.TeamID.UUID, ResourceType: "sandbox", ResourceID: "cl-" + sb.ID.String()[:8],
			Action: "destroy", Status: "warning", Metadata: map[string]any{"reason": "orphaned"}}
	}
	before = statements(t, reg)
	out, err := s.Apply(ctx, f, store.Batch{
		Changes: []store.Change{
			{Row: hit, To: "stopped", Audit: audit(hit)},
			{Row: silent, To: "running"},
			{Row: moved, To: "stopped", Audit: audit(moved)},
			{Row: touched, To: "stopped", Audit: audit(touched)},
		},
		Zombies: []store.Sandbox{zombie, touched},
	})
	if err != nil {
		t.Fatal(err)
	}
	if n := statements(t, reg) - before; n != 5 {
		t.Errorf("batch sent %d statements, want 5 (begin, fence, changes, checks, commit)", n)
	}
	if !slices.Equal(out.Applied, []bool{true, true, false, false}) || !slices.Equal(out.Zombies, []bool{true, false}) {
		t.Fatalf("outcome %+v", out)
	}
	for id, want := range map[uuid.UUID]string{hit.ID: "stopped", silent.ID: "running", moved.ID: "running", touched.ID: "running", zombie.ID: "stopped"} {
		if got := status(t, s, id); got != want {
			t.Errorf("row %s is %s, want %s", id, got, want)
		}
	}
	a := audits(t, s)
	if len(a) != 1 || a[0]["resource_id"] != audit(hit).ResourceID || a[0]["reason"] != "orphaned" ||
		a[0]["replica"] != "r1" || a[0]["fence"] != float64(40) || a[0]["shard"] != float64(4) {
		t.Fatalf("audit rows %v, want one for the hit with reason, replica, fence and shard", a)
	}
	j := journal(t, s)
	wantJ := []journalRow{
		{4, 40, "r1", h, uuid.NullUUID{UUID: hit.ID, Valid: true}, "running->stopped"},
		{4, 40, "r1", h, uuid.NullUUID{UUID: silent.ID, Valid: true}, "missing->running"},
	}
	slices.SortFunc(j, func(a, b journalRow) int { return slices.Compare(a.Sandbox.UUID[:], b.Sandbox.UUID[:]) })
	slices.SortFunc(wantJ, func(a, b journalRow) int { return slices.Compare(a.Sandbox.UUID[:], b.Sandbox.UUID[:]) })
	if !slices.Equal(j, wantJ) {
		t.Fatalf("journal %+v, want %+v", j, wantJ)
	}
	if got := writeTx(t, reg, "committed"); got != 1 {
		t.Errorf("committed write transactions %d, want 1", got)
	}

	// Records: side effects already done.
	err = func() error {
		_, err := s.Apply(ctx, f, store.Batch{Records: []store.Record{{Host: h, Sandbox: zombie.ID, Change: "destroyed_on_agent",
			Audit: store.AuditRow{TeamID: zombie.TeamID.UUID, ResourceType: "sandbox", ResourceID: "cl-z", Action: "destroy", Status: "warning",
				Metadata: map[string]any{"reason": "paused_zombie_cleanup"}}}}})
		return err
	}()
	if err != nil {
		t.Fatal(err)
	}
	if j := journal(t, s); len(j) != 3 || j[2].Change != "destroyed_on_agent" || j[2].Sandbox.UUID != zombie.ID {
		t.Fatalf("journal after the record %+v", j)
	}

	// Under a stale token nothing is written.
	if err := s.RaiseFence(ctx, store.Fence{Shard: 4, Token: 41, Replica: "r2"}); err != nil {
		t.Fatal(err)
	}
	again := addSandbox(t, s, h, "running")
	_, err = s.Apply(ctx, f, store.Batch{Changes: []store.Change{{Row: again, To: "stopped", Audit: audit(again)}}})
	if !errors.Is(err, store.ErrFenced) {
		t.Fatalf("stale apply: %v", err)
	}
	if status(t, s, again.ID) != "running" || len(audits(t, s)) != 2 || len(journal(t, s)) != 3 {
		t.Fatal("a fenced batch wrote")
	}
	if got := writeTx(t, reg, "fenced"); got != 1 {
		t.Errorf("fenced write transactions %d, want 1", got)
	}
}

// The passive rule marks a whole set in one transaction, each host only if it
// really changes, by the database clock.
func TestPassiveIsSetBased(t *testing.T) {
	ctx := context.Background()
	s, reg := counted(t)
	f := store.Fence{Shard: 2, Token: 7, Replica: "r1"}
	if err := s.RaiseFence(ctx, f); err != nil {
		t.Fatal(err)
	}
	team := uuid.New()
	teamHost := addHost(t, s, "online", &team, 95*time.Second)
	shared := addHost(t, s, "pending", nil, -1)
	fresh := addHost(t, s, "online", &team, 85*time.Second)
	down := addHost(t, s, "unreachable", &team, 10*time.Minute)
	live := addSandbox(t, s, teamHost, "running")
	paused := addSandbox(t, s, teamHost, "paused")
	starting := addSandbox(t, s, shared, "starting")
	freshRow := addSandbox(t, s, fresh, "running")
	// A damaged row (no team, where the column allows it) is never written.
	if _, err := db(s).Exec(ctx, `alter table sandboxes alter column team_id drop not null`); err != nil {
		t.Fatal(err)
	}
	damaged := addSandbox(t, s, teamHost, "running")
	if _, err := db(s).Exec(ctx, `update sandboxes set team_id = null where id = $1`, damaged.ID); err != nil {
		t.Fatal(err)
	}

	hosts := []uuid.UUID{teamHost, shared, fresh, down, uuid.New()}
	rids := []string{"host-a", "host-b", "host-c", "host-d", "host-e"}
	before := statements(t, reg)
	marked, err := s.Passive(ctx, f, store.PassiveInput{Hosts: hosts, ResourceIDs: rids, StaleAfter: 90 * time.Second,
		Live: []string{"running", "starting"}, Audit: store.AuditRow{ResourceType: "host", Action: "marked_down", Status: "error",
			Metadata: map[string]any{"reason": "heartbeat_timeout"}}})
	if err != nil {
		t.Fatal(err)
	}
	if n := statements(t, reg) - before; n != 4 {
		t.Errorf("Passive sent %d statements, want 4 (begin, fence, mark, commit)", n)
	}
	got := map[uuid.UUID]store.MarkedHost{}
	for _, m := range marked {
		got[m.ID] = m
	}
	if len(got) != 2 || got[teamHost].WasStatus != "online" || got[shared].WasStatus != "pending" {
		t.Fatalf("marked %+v, want the team host and the shared one", marked)
	}
	if m := got[teamHost].Missing; len(m) != 1 || m[0].ID != live.ID || m[0].From != "running" {
		t.Errorf("team host's missing rows %+v", m)
	}
	if m := got[shared].Missing; len(m) != 1 || m[0].ID != starting.ID || m[0].From != "starting" {
		t.Errorf("shared host's missing rows %+v", m)
	}
	for id, want := range map[uuid.UUID]string{live.ID: "missing", paused.ID: "paused", starting.ID: "missing", freshRow.ID: "running", damaged.ID: "running"} {
		if st := status(t, s, id); st != want {
			t.Errorf("row %s is %s, want %s", id, st, want)
		}
	}
	a := audits(t, s)
	if len(a) != 1 || a[0]["resource_id"] != "host-a" || a[0]["action"] != "marked_down" || a[0]["reason"] != "heartbeat_timeout" || a[0]["fence"] != float64(7) {
		t.Fatalf("audit rows %v, want one marked_down for the team host", a)
	}
	if j := journal(t, s); len(j) != 4 {
		t.Fatalf("journal %+v, want 2 hosts and 2 sandboxes", j)
	}
	// Again: nothing left to change, nothing written.
	marked, err = s.Passive(ctx, f, store.PassiveInput{Hosts: hosts, ResourceIDs: rids, StaleAfter: 90 * time.Second,
		Live: []string{"running"}, Audit: store.AuditRow{ResourceType: "host", Action: "marked_down", Status: "error"}})
	if err != nil || len(marked) != 0 || len(audits(t, s)) != 1 {
		t.Fatalf("second mark: %+v, %v", marked, err)
	}
}

func TestStaleHostsAndHostIDs(t *testing.T) {
	ctx := context.Background()
	s, _ := counted(t)
	stale := addHost(t, s, "online", nil, 95*time.Second)
	none := addHost(t, s, "pending", nil, -1)
	addHost(t, s, "online", nil, 5*time.Second)
	addHost(t, s, "unreachable", nil, time.Hour)
	ids, err := s.StaleHosts(ctx, 90*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	slices.SortFunc(ids, func(a, b uuid.UUID) int { return slices.Compare(a[:], b[:]) })
	want := []uuid.UUID{stale, none}
	slices.SortFunc(want, func(a, b uuid.UUID) int { return slices.Compare(a[:], b[:]) })
	if !slices.Equal(ids, want) {
		t.Fatalf("stale %v, want %v", ids, want)
	}
	all, err := s.HostIDs(ctx)
	if err != nil || len(all) != 4 {
		t.Fatalf("HostIDs = %v, %v", all, err)
	}
}

func TestTrimJournalKeepsRecentRows(t *testing.T) {
	ctx := context.Background()
	s, _ := counted(t)
	f := store.Fence{Shard: 3, Token: 9, Replica: "r"}
	if err := s.RaiseFence(ctx, f); err != nil {
		t.Fatal(err)
	}
	h := uuid.New()
	db(s).Exec(ctx, `insert into vigil_journal (shard, token, replica, host_id, change, written_at) values
		(3, 9, 'r', $1, 'old', now() - interval '2 days'), (3, 9, 'r', $1, 'new', now()), (4, 9, 'r', $1, 'other', now() - interval '2 days')`, h)
	n, err := s.TrimJournal(ctx, f, 24*time.Hour)
	if err != nil || n != 1 {
		t.Fatalf("trimmed %d, %v; want 1", n, err)
	}
	if j := journal(t, s); len(j) != 2 {
		t.Fatalf("journal after trim %+v", j)
	}
}
