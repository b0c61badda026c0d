package monitor_test

import (
	"context"
	"encoding/json"
	"errors"
	"sync"
	"testing"
	"time"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/vigil-sh/vigil/agentpool"
	"github.com/vigil-sh/vigil/agentsim"
	"github.com/vigil-sh/vigil/internal/ids"
	"github.com/vigil-sh/vigil/internal/pgtest"
	"github.com/vigil-sh/vigil/monitor"
	hostagentv1 "github.com/vigil-sh/vigil/proto/hostagent/v1"
	"github.com/vigil-sh/vigil/store"
)

// env is a real Postgres database, an agent simulator serving real Connect
// over loopback, the agent pool and a Reconciler owning shard 1 under token
// 100.
type env struct {
	t     *testing.T
	ctx   context.Context
	st    *store.Store
	db    *pgxpool.Pool // the test's own connections, for fixtures and checks
	sim   *agentsim.Sim
	pool  *agentpool.Pool
	rec   *monitor.Reconciler
	reg   *prometheus.Registry
	fence store.Fence
	hook  *hookAgents
	hosts []uuid.UUID
}

// hookAgents wraps the real pool so a test can act between the agent's
// answer and the reconcile's write, the window a concurrent control-plane
// transition must be able to win.
type hookAgents struct {
	*agentpool.Pool
	mu        sync.Mutex
	afterList func(host uuid.UUID)
}

func (h *hookAgents) ListSandboxes(ctx context.Context, host uuid.UUID, addr string) (*hostagentv1.ListSandboxesResponse, error) {
	resp, err := h.Pool.ListSandboxes(ctx, host, addr)
	h.mu.Lock()
	fn := h.afterList
	h.mu.Unlock()
	if fn != nil {
		fn(host)
	}
	return resp, err
}

func newEnv(t *testing.T, hosts int, agentTimeout time.Duration) *env {
	t.Helper()
	return newEnvSchema(t, hosts, agentTimeout, store.Schema{ControlPlane: true}, 0)
}

// newEnvSchema is newEnv on a database with the control-plane tables schema
// asks for, its store looking at the schema again every volumesRecheck.
func newEnvSchema(t *testing.T, hosts int, agentTimeout time.Duration, schema store.Schema, volumesRecheck time.Duration) *env {
	t.Helper()
	url := pgtest.NewSchema(t, schema)
	ctx, cancel := context.WithCancel(context.Background())
	st, err := store.Open(ctx, store.Config{URL: url, MaxConns: 8, VolumesRecheck: volumesRecheck})
	if err != nil {
		t.Fatal(err)
	}
	db, err := pgxpool.New(ctx, url)
	if err != nil {
		t.Fatal(err)
	}
	sim, err := agentsim.New(agentsim.Config{DatabaseURL: url, Hosts: hosts, HeartbeatInterval: -1, SharedFraction: 0})
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- sim.Run(ctx) }()
	select {
	case <-sim.Ready():
	case err := <-done:
		t.Fatalf("agentsim: %v", err)
	}
	reg := prometheus.NewRegistry()
	pool, err := agentpool.New(agentpool.Config{Timeout: agentTimeout, MaxResponseBytes: 1 << 20, Registerer: reg})
	if err != nil {
		t.Fatal(err)
	}
	hook := &hookAgents{Pool: pool}
	rec, err := monitor.New(monitor.Config{Registerer: reg}, st, hook)
	if err != nil {
		t.Fatal(err)
	}
	e := &env{t: t, ctx: ctx, st: st, db: db, sim: sim, pool: pool, rec: rec, reg: reg, hook: hook,
		fence: store.Fence{Shard: 1, Token: 100, Replica: "replica-a"}, hosts: sim.HostIDs()}
	if err := st.RaiseFence(ctx, e.fence); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("agentsim: %v", err)
		}
		pool.Close()
		st.Close()
		db.Close()
	})
	return e
}

// sandbox inserts a row on host with the given status, last updated age
// ago by the database clock, and optionally a VM on the agent.
func (e *env) sandbox(host uuid.UUID, status string, age time.Duration, vm string) uuid.UUID {
	e.t.Helper()
	id := uuid.New()
	team := e.team(host)
	_, err := e.db.Exec(e.ctx, `
		insert into sandboxes (id, team_id, host_id, status, last_updated)
		values ($1, $2, $3, $4, now() - make_interval(secs => $5))`, id, team, host, status, age.Seconds())
	if err != nil {
		e.t.Fatal(err)
	}
	if vm != "" {
		if err := e.sim.AddVM(host, id, vm, team); err != nil {
			e.t.Fatal(err)
		}
	}
	return id
}

func (e *env) team(host uuid.UUID) uuid.UUID {
	var team uuid.NullUUID
	if err := e.db.QueryRow(e.ctx, `select team_id from hosts where id = $1`, host).Scan(&team); err != nil {
		e.t.Fatal(err)
	}
	if team.Valid {
		return team.UUID
	}
	return uuid.MustParse("00000000-0000-0000-0000-0000000000aa")
}

func (e *env) status(id uuid.UUID) string {
	e.t.Helper()
	var s string
	if err := e.db.QueryRow(e.ctx, `select status from sandboxes where id = $1`, id).Scan(&s); err != nil {
		e.t.Fatal(err)
	}
	return s
}

func (e *env) hostStatus(id uuid.UUID) string {
	e.t.Helper()
	var s string
	if err := e.db.QueryRow(e.ctx, `select status from hosts where id = $1`, id).Scan(&s); err != nil {
		e.t.Fatal(err)
	}
	return s
}

type auditRow struct {
	TeamID       uuid.UUID
	ActorType    string
	ActorID      *string
	ActorName    string
	ResourceType string
	ResourceID   string
	Action       string
	Scope        string
	Status       string
	Meta         map[string]any
}

func (e *env) audits(resourceID string) []auditRow {
	e.t.Helper()
	rows, err := e.db.Query(e.ctx, `
		select team_id, actor_type, actor_id, actor_name, resource_type, resource_id, action, scope, status, metadata
		  from audit_logs where resource_id = $1 order by created_at`, resourceID)
	if err != nil {
		e.t.Fatal(err)
	}
	defer rows.Close()
	var out []auditRow
	for rows.Next() {
		var a auditRow
		var meta []byte
		if err := rows.Scan(&a.TeamID, &a.ActorType, &a.ActorID, &a.ActorName, &a.ResourceType, &a.ResourceID, &a.Action, &a.Scope, &a.Status, &meta); err != nil {
			e.t.Fatal(err)
		}
		if err := json.Unmarshal(meta, &a.Meta); err != nil {
			e.t.Fatal(err)
		}
		out = append(out, a)
	}
	return out
}

// wantAudit checks the single audit row of a sandbox (or none when action
// is empty).
func (e *env) wantAudit(id uuid.UUID, resourceType, action, status, reason string) {
	e.t.Helper()
	rid := ids.Sandbox(id)
	if resourceType == "host" {
		rid = ids.Host(id)
	}
	got := e.audits(rid)
	if action == "" {
		if len(got) != 0 {
			e.t.Fatalf("%s: %d audit rows %+v, want none", rid, len(got), got)
		}
		return
	}
	if len(got) != 1 {
		e.t.Fatalf("%s: %d audit rows %+v, want 1", rid, len(got), got)
	}
	a := got[0]
	if a.ActorType != "system" || a.ActorID != nil || a.ActorName != "" || a.Scope != "team" {
		e.t.Errorf("%s: actor %q/%v/%q scope %q", rid, a.ActorType, a.ActorID, a.ActorName, a.Scope)
	}
	if a.ResourceType != resourceType || a.Action != action || a.Status != status || a.Meta["reason"] != reason {
		e.t.Errorf("%s: audit %s/%s/%s reason %v, want %s/%s/%s reason %s", rid, a.ResourceType, a.Action, a.Status, a.Meta["reason"], resourceType, action, status, reason)
	}
	if a.Meta["replica"] != e.fence.Replica || a.Meta["fence"] != float64(e.fence.Token) {
		e.t.Errorf("%s: metadata %v lacks replica/fence", rid, a.Meta)
	}
	if status == "error" {
		if s, _ := a.Meta["error"].(string); s == "" {
			e.t.Errorf("%s: error row without error text: %v", rid, a.Meta)
		}
	}
}

// reconcile runs a pass over one host and returns its outcome.
func (e *env) reconcile(host uuid.UUID) monitor.Outcome {
	e.t.Helper()
	out, err := e.rec.Reconcile(e.ctx, e.fence, []uuid.UUID{host})
	if err != nil {
		e.t.Fatalf("reconcile %s: %v", host, err)
	}
	if len(out) != 1 || out[0].Err != nil {
		e.t.Fatalf("reconcile %s: %+v", host, out)
	}
	return out[0]
}

// passive runs the passive rule on one host and returns its outcome.
func (e *env) passive(host uuid.UUID) (monitor.Outcome, error) {
	out, err := e.rec.Passive(e.ctx, e.fence, []uuid.UUID{host})
	if len(out) != 1 {
		e.t.Fatalf("Passive: %d outcomes", len(out))
	}
	return out[0], err
}

func (e *env) setHeartbeat(host uuid.UUID, ago time.Duration, null bool) {
	e.t.Helper()
	q := `update hosts set last_heartbeat_at = now() - make_interval(secs => $2) where id = $1`
	if null {
		q = `update hosts set last_heartbeat_at = null where id = $1 and $2::float8 >= 0`
	}
	if _, err := e.db.Exec(e.ctx, q, host, ago.Seconds()); err != nil {
		e.t.Fatal(err)
	}
}

const (
	young   = 10 * time.Second
	old     = 3 * time.Minute  // past the 2 min transient grace
	ancient = 20 * time.Minute // past the 15 min snapshot grace
)

// Rule 1: passive staleness by the database clock, live sandboxes become
// missing, one audit row for a team host, none for a shared one.
func TestPassiveMarksStaleHostUnreachable(t *testing.T) {
	e := newEnv(t, 3, time.Second)
	h, fresh, shared := e.hosts[0], e.hosts[1], e.hosts[2]
	if _, err := e.db.Exec(e.ctx, `update hosts set team_id = null where id = $1`, shared); err != nil {
		t.Fatal(err)
	}
	live := map[string]uuid.UUID{}
	for _, s := range monitor.MissingOnHostDown {
		live[s] = e.sandbox(h, s, young, "")
	}
	paused := e.sandbox(h, "paused", young, "")
	snap := e.sandbox(h, "snapshotting", young, "")
	e.setHeartbeat(h, 95*time.Second, false)
	e.setHeartbeat(fresh, 85*time.Second, false) // stale by 85 s: under the threshold
	e.setHeartbeat(shared, 0, true)              // never heartbeated

	res, err := e.passive(h)
	if err != nil || !res.MarkedDown || res.MadeMissing != len(live) {
		t.Fatalf("Passive = %+v, %v", res, err)
	}
	if got := e.hostStatus(h); got != "unreachable" {
		t.Fatalf("host status %s", got)
	}
	for from, id := range live {
		if got := e.status(id); got != "missing" {
			t.Errorf("%s sandbox became %s, want missing", from, got)
		}
	}
	if e.status(paused) != "paused" || e.status(snap) != "snapshotting" {
		t.Errorf("paused/snapshotting rows changed: %s %s", e.status(paused), e.status(snap))
	}
	e.wantAudit(h, "host", "marked_down", "error", "heartbeat_timeout")

	// Already unreachable: no change, no second audit row.
	if res, err := e.passive(h); err != nil || res.MarkedDown {
		t.Fatalf("second Passive = %+v, %v", res, err)
	}
	e.wantAudit(h, "host", "marked_down", "error", "heartbeat_timeout")

	// Fresh enough by the database clock: nothing.
	if res, err := e.passive(fresh); err != nil || res.MarkedDown {
		t.Fatalf("fresh host Passive = %+v, %v", res, err)
	}
	if e.hostStatus(fresh) != "online" {
		t.Fatal("fresh host changed")
	}

	// Absent heartbeat on a shared host: marked down, no audit row.
	if res, err := e.passive(shared); err != nil || !res.MarkedDown {
		t.Fatalf("shared host Passive = %+v, %v", res, err)
	}
	e.wantAudit(shared, "host", "", "", "")

	// The control plane's heartbeat brings it back; the active reconcile
	// then works on it again.
	if _, err := e.sim.Heartbeat(e.ctx); err != nil {
		t.Fatal(err)
	}
	if e.hostStatus(h) != "online" {
		t.Fatal("heartbeat did not bring the host back online")
	}
	if got := testutil.ToFloat64(metric(t, e.reg, "vigil_hosts_marked_unreachable_total")); got != 2 {
		t.Errorf("vigil_hosts_marked_unreachable_total = %v, want 2", got)
	}
}

// Rule 2: only online hosts with an address are reconciled actively.
func TestActiveSkipsHostsNotOnline(t *testing.T) {
	e := newEnv(t, 2, time.Second)
	a, b := e.hosts[0], e.hosts[1]
	ra := e.sandbox(a, "running", young, "") // would be orphaned
	rb := e.sandbox(b, "running", young, "")
	e.db.Exec(e.ctx, `update hosts set status = 'unreachable' where id = $1`, a)
	e.db.Exec(e.ctx, `update hosts set address = '' where id = $1`, b)
	if res := e.reconcile(a); res.Skipped == "" {
		t.Error("unreachable host reconciled")
	}
	if res := e.reconcile(b); res.Skipped == "" {
		t.Error("host without address reconciled")
	}
	if e.status(ra) != "running" || e.status(rb) != "running" {
		t.Error("rows changed on skipped hosts")
	}
}

// Rules 3–6 end to end: every row kind against the agent's report.
func TestActiveRulesEndToEnd(t *testing.T) {
	e := newEnv(t, 1, time.Second)
	h := e.hosts[0]
	type c struct {
		name                    string
		status                  string
		age                     time.Duration
		vm                      string
		want                    string
		action, astatus, reason string
	}
	cases := []c{
		{"missing absent -> stopped orphaned", "missing", young, "", "stopped", "destroy", "warning", "orphaned"},
		{"missing paused -> paused restored", "missing", young, "paused", "paused", "pause", "info", "restored_after_host_recovery"},
		{"missing running -> running silent", "missing", young, "running", "running", "", "", ""},
		{"missing presence-only waits", "missing", old, "pausing", "missing", "", "", ""},
		{"missing unknown label waits", "missing", old, "hibernating", "missing", "", "", ""},
		{"running absent -> stopped orphaned", "running", young, "", "stopped", "destroy", "warning", "orphaned"},
		{"running paused on agent -> paused host_state_sync", "running", young, "paused", "paused", "pause", "info", "host_state_sync"},
		{"running unknown label never written", "running", old, "hibernating", "running", "", "", ""},
		{"starting alive -> running", "starting", young, "running", "running", "", "", ""},
		{"resuming alive -> running", "resuming", young, "resuming", "running", "", "", ""},
		{"starting gone in grace waits", "starting", young, "", "starting", "", "", ""},
		{"starting gone past grace -> error", "starting", old, "", "error", "error", "error", "transient_timeout"},
		{"resuming gone past grace -> error", "resuming", old, "", "error", "error", "error", "transient_timeout"},
		{"snapshotting gone past grace -> error", "snapshotting", old, "", "error", "snapshot", "error", "transient_timeout"},
		{"snapshotting alive in snapshot grace waits", "snapshotting", old, "running", "snapshotting", "", "", ""},
		{"snapshotting past snapshot grace -> running", "snapshotting", ancient, "running", "running", "snapshot", "info", "snapshot_recovered"},
		{"snapshotting past snapshot grace -> paused", "snapshotting", ancient, "paused", "paused", "snapshot", "info", "snapshot_recovered"},
		{"pausing gone past grace -> paused inferred", "pausing", old, "", "paused", "pause", "info", "transient_timeout_inferred"},
		{"pausing alive waits", "pausing", ancient, "pausing", "pausing", "", "", ""},
		{"stopping gone past grace -> stopped inferred", "stopping", old, "", "stopped", "destroy", "warning", "transient_timeout_inferred"},
		{"paused absent untouched", "paused", ancient, "", "paused", "", "", ""},
		{"error untouched", "error", ancient, "running", "error", "", "", ""},
	}
	rows := make([]uuid.UUID, len(cases))
	for i, c := range cases {
		rows[i] = e.sandbox(h, c.status, c.age, c.vm)
	}
	res := e.reconcile(h)
	if res.Missed != 0 {
		t.Errorf("compare-and-set misses: %d", res.Missed)
	}
	for i, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			if got := e.status(rows[i]); got != c.want {
				t.Fatalf("status %s, want %s", got, c.want)
			}
			e.wantAudit(rows[i], "sandbox", c.action, c.astatus, c.reason)
		})
	}
	for i, c := range cases {
		if c.action == "error" {
			a := e.audits(ids.Sandbox(rows[i]))[0]
			want := map[string]string{"starting": "create", "resuming": "resume"}[c.status]
			if a.Meta["phase"] != want {
				t.Errorf("%s: phase %v, want %s", c.name, a.Meta["phase"], want)
			}
		}
	}
	// A second pass changes nothing and writes no more audit rows.
	var before int
	e.db.QueryRow(e.ctx, `select count(*) from audit_logs`).Scan(&before)
	if res := e.reconcile(h); len(res.Applied) != 0 {
		t.Errorf("second pass applied %v", res.Applied)
	}
	var after int
	e.db.QueryRow(e.ctx, `select count(*) from audit_logs`).Scan(&after)
	if before != after {
		t.Errorf("second pass wrote %d audit rows", after-before)
	}
	if got := testutil.ToFloat64(metric(t, e.reg, "vigil_agent_report_problems_total", "unknown_status")); got == 0 {
		t.Error("unknown status labels not counted")
	}
	// Events off (no publisher): no event state at all.
	var evs, named int
	e.db.QueryRow(e.ctx, `select count(*) from vigil_events`).Scan(&evs)
	e.db.QueryRow(e.ctx, `select count(*) from vigil_journal where event_id is not null`).Scan(&named)
	if evs != 0 || named != 0 {
		t.Errorf("events off, yet %d outbox rows and %d journal rows naming an event", evs, named)
	}
}

// Rule 5: a stopped row the agent still holds paused is destroyed on the
// agent, carrying the fence token; only when the agent reports it paused.
func TestZombieDestroyedWithFenceToken(t *testing.T) {
	e := newEnv(t, 1, time.Second)
	h := e.hosts[0]
	zombie := e.sandbox(h, "stopped", young, "paused")
	alive := e.sandbox(h, "stopped", young, "running")
	res := e.reconcile(h)
	if res.Zombies != 1 {
		t.Fatalf("destroyed %d, want 1", res.Zombies)
	}
	if e.status(zombie) != "stopped" {
		t.Error("zombie row changed; the database wins")
	}
	e.wantAudit(zombie, "sandbox", "destroy", "warning", "paused_zombie_cleanup")
	e.wantAudit(alive, "sandbox", "", "", "")
	d := e.sim.Destroys(h)
	if len(d) != 1 || d[0].Sandbox != ids.Sandbox(zombie) || !d[0].Fenced || d[0].Shard != e.fence.Shard || d[0].Token != e.fence.Token {
		t.Fatalf("agent saw destroys %+v", d)
	}
	for _, vm := range e.sim.VMs(h) {
		if vm.ID == zombie {
			t.Fatal("zombie still on the agent")
		}
	}
	// The agent keeps the running one: the zombie rule only fires on paused.
	if len(e.sim.VMs(h)) != 1 {
		t.Errorf("agent VMs %v", e.sim.VMs(h))
	}
}

// Rule 7: a control-plane transition between the agent's answer and the
// write wins; the reconcile writes nothing for that row and no audit row.
func TestConcurrentTransitionWinsCompareAndSet(t *testing.T) {
	e := newEnv(t, 1, time.Second)
	h := e.hosts[0]
	orphan := e.sandbox(h, "running", young, "")     // the decision: stopped
	recovering := e.sandbox(h, "missing", young, "") // the decision: stopped
	e.hook.afterList = func(uuid.UUID) {
		// The control plane pauses one and touches the other's clock.
		e.db.Exec(e.ctx, `update sandboxes set status = 'pausing', last_updated = now() where id = $1`, orphan)
		e.db.Exec(e.ctx, `update sandboxes set last_updated = now() where id = $1`, recovering)
	}
	res := e.reconcile(h)
	if res.Missed != 2 || len(res.Applied) != 0 {
		t.Fatalf("result %+v, want 2 misses", res)
	}
	if e.status(orphan) != "pausing" || e.status(recovering) != "missing" {
		t.Fatalf("statuses %s %s", e.status(orphan), e.status(recovering))
	}
	e.wantAudit(orphan, "sandbox", "", "", "")
	e.wantAudit(recovering, "sandbox", "", "", "")
}

// A reconcile whose fence was overtaken writes nothing and sends nothing.
func TestFencedReconcileChangesNothing(t *testing.T) {
	e := newEnv(t, 1, time.Second)
	h := e.hosts[0]
	orphan := e.sandbox(h, "running", young, "")
	zombie := e.sandbox(h, "stopped", young, "paused")
	if err := e.st.RaiseFence(e.ctx, store.Fence{Shard: e.fence.Shard, Token: 200, Replica: "replica-b"}); err != nil {
		t.Fatal(err)
	}
	_, err := e.rec.Reconcile(e.ctx, e.fence, []uuid.UUID{h})
	if !errors.Is(err, monitor.ErrFenced) {
		t.Fatalf("err = %v, want ErrFenced", err)
	}
	if _, err := e.passive(h); !errors.Is(err, monitor.ErrFenced) {
		t.Fatalf("Passive err = %v, want ErrFenced", err)
	}
	if e.status(orphan) != "running" || len(e.sim.Destroys(h)) != 0 || len(e.sim.VMs(h)) != 1 {
		t.Fatal("fenced reconcile changed something")
	}
	e.wantAudit(orphan, "sandbox", "", "", "")
	e.wantAudit(zombie, "sandbox", "", "", "")
	if got := testutil.ToFloat64(metric(t, e.reg, "vigil_fence_rejections_total")); got != 2 {
		t.Errorf("vigil_fence_rejections_total = %v, want 2", got)
	}
}

// Bad agent answers: an error for the host, no row touched, no crash.
func TestBadAgentAnswersChangeNothing(t *testing.T) {
	modes := []agentsim.Mode{
		{Kind: agentsim.ModeMalformed},
		{Kind: agentsim.ModeOversized, OversizeBytes: 2 << 20},
		{Kind: agentsim.ModeHang},
		{Kind: agentsim.ModeDead},
	}
	e := newEnv(t, len(modes), 300*time.Millisecond)
	var rows []uuid.UUID
	for i, m := range modes {
		rows = append(rows, e.sandbox(e.hosts[i], "running", young, ""))
		if err := e.sim.SetMode(e.hosts[i], m); err != nil {
			t.Fatal(err)
		}
	}
	for i, m := range modes {
		out, err := e.rec.Reconcile(e.ctx, e.fence, []uuid.UUID{e.hosts[i]})
		if err != nil || len(out) != 1 || out[0].Err == nil {
			t.Errorf("%s: outcome %+v, err %v; want the host failed", m.Kind, out, err)
		}
		if e.status(rows[i]) != "running" {
			t.Errorf("%s: row changed to %s", m.Kind, e.status(rows[i]))
		}
	}
}

// Duplicate ids with contradicting statuses make the sandbox present with
// unknown status: a running row stays, a missing row waits.
func TestDuplicateIDsAreNotTrusted(t *testing.T) {
	e := newEnv(t, 1, time.Second)
	h := e.hosts[0]
	run := e.sandbox(h, "running", young, "running")
	miss := e.sandbox(h, "missing", young, "running")
	if err := e.sim.SetMode(h, agentsim.Mode{Kind: agentsim.ModeDuplicateIDs}); err != nil {
		t.Fatal(err)
	}
	res := e.reconcile(h)
	if len(res.Applied) != 0 || e.status(run) != "running" || e.status(miss) != "missing" {
		t.Fatalf("duplicates trusted: %+v %s %s", res, e.status(run), e.status(miss))
	}
	if got := testutil.ToFloat64(metric(t, e.reg, "vigil_agent_report_problems_total", "duplicate_id")); got != 2 {
		t.Errorf("duplicate_id problems = %v, want 2", got)
	}
}

// One hung agent delays only itself: the other hosts of the shard are
// reconciled while it is still waiting for its deadline.
func TestHungAgentDelaysOnlyItself(t *testing.T) {
	e := newEnv(t, 3, 20*time.Second)
	hung := e.hosts[0]
	if err := e.sim.SetMode(hung, agentsim.Mode{Kind: agentsim.ModeHang}); err != nil {
		t.Fatal(err)
	}
	orphans := []uuid.UUID{e.sandbox(e.hosts[1], "running", young, ""), e.sandbox(e.hosts[2], "running", young, "")}
	ctx, cancel := context.WithCancel(e.ctx)
	defer cancel()
	done := make(chan struct{})
	var out []monitor.Outcome
	var err error
	go func() {
		defer close(done)
		out, err = e.rec.Reconcile(ctx, e.fence, e.hosts)
	}()
	for _, o := range orphans {
		poll(t, 10*time.Second, "healthy hosts reconciled while one agent hangs", func() bool { return e.status(o) == "stopped" })
	}
	select {
	case <-done:
		t.Fatal("the pass returned before the hung agent's deadline")
	default:
	}
	cancel() // shutting down the shard aborts the hung call
	<-done
	if !errors.Is(err, context.Canceled) {
		t.Errorf("pass returned %v, want context.Canceled", err)
	}
	for _, o := range out {
		switch {
		case o.Host == hung && (o.Err == nil || !o.Done.IsZero()):
			t.Errorf("hung host not reported failed: %+v", o)
		case o.Host != hung && (o.Err != nil || o.Done.IsZero() || len(o.Applied) != 1):
			t.Errorf("healthy host %s: %+v", o.Host, o)
		}
	}
}

func metric(t *testing.T, reg *prometheus.Registry, name string, labels ...string) prometheus.Collector {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
		for _, m := range mf.GetMetric() {
			match := true
			for i, l := range labels {
				if i >= len(m.GetLabel()) || m.GetLabel()[i].GetValue() != l {
					match = false
				}
			}
			if match {
				v := m.GetCounter().GetValue()
				if m.GetGauge() != nil {
					v = m.GetGauge().GetValue()
				}
				g := prometheus.NewGauge(prometheus.GaugeOpts{Name: "x"})
				g.Set(v)
				return g
			}
		}
	}
	g := prometheus.NewGauge(prometheus.GaugeOpts{Name: "x"})
	return g
}
