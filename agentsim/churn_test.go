package agentsim

import (
	"testing"
	"time"

	"github.com/google/uuid"

	"github.com/vigil-sh/vigil/internal/pgtest"
	"github.com/vigil-sh/vigil/internal/status"
)

// The control plane's transitions, as churn must perform them.
var validTransitions = map[[2]string]bool{
	{status.Starting, status.Running}:     true,
	{status.Running, status.Pausing}:      true,
	{status.Pausing, status.Paused}:       true,
	{status.Paused, status.Resuming}:      true,
	{status.Resuming, status.Running}:     true,
	{status.Running, status.Snapshotting}: true,
	{status.Snapshotting, status.Running}: true,
	{status.Running, status.Stopping}:     true,
	{status.Stopping, status.Stopped}:     true,
}

func TestChurnMakesOnlyValidTransitionsAndKeepsAgentsInStep(t *testing.T) {
	url := pgtest.New(t)
	pool := newPool(t, url)
	ctx := ctxTimeout(t, 60*time.Second)
	// Record every status change the database sees.
	if _, err := pool.Exec(ctx, `
create table test_transitions (id uuid, old_status text, new_status text);
create function test_log_transition() returns trigger language plpgsql as $$
begin
    insert into test_transitions values (new.id, old.status, new.status);
    return new;
end $$;
create trigger test_log_transition after update of status on sandboxes
    for each row when (old.status is distinct from new.status)
    execute function test_log_transition();`); err != nil {
		t.Fatal(err)
	}

	s := start(t, Config{
		DatabaseURL: url, Hosts: 10, SandboxesPerHost: 3, HeartbeatInterval: -1,
		ChurnPerSecond: 2000, ChurnConcurrency: 24, ChurnStepDelay: time.Millisecond,
	})
	// A dead host is out of the control plane's reach: churn leaves it alone.
	dead := s.HostIDs()[0]
	before := s.VMs(dead)
	if err := s.SetMode(dead, Mode{Kind: ModeDead}); err != nil {
		t.Fatal(err)
	}
	eventually(t, 30*time.Second, "400 churn operations", func() bool { return s.ChurnOps() >= 400 })
	if err := s.stop(); err != nil {
		t.Fatal(err)
	}

	rows, err := pool.Query(ctx, `select old_status, new_status, count(*) from test_transitions group by 1, 2`)
	if err != nil {
		t.Fatal(err)
	}
	seen := map[[2]string]int{}
	for rows.Next() {
		var from, to string
		var n int
		if err := rows.Scan(&from, &to, &n); err != nil {
			t.Fatal(err)
		}
		seen[[2]string{from, to}] = n
		if !validTransitions[[2]string{from, to}] {
			t.Errorf("invalid transition %s -> %s (%d times)", from, to, n)
		}
	}
	if err := rows.Err(); err != nil {
		t.Fatal(err)
	}
	for tr := range validTransitions {
		if seen[tr] == 0 {
			t.Errorf("transition %s -> %s never happened", tr[0], tr[1])
		}
	}
	t.Logf("%d operations, transitions %v", s.ChurnOps(), seen)

	// Every row's status is known, and settled rows agree with their agent.
	type row struct {
		host   uuid.UUID
		status string
	}
	db := map[uuid.UUID]row{}
	rows, err = pool.Query(ctx, `select id, host_id, status from sandboxes`)
	if err != nil {
		t.Fatal(err)
	}
	for rows.Next() {
		var id uuid.UUID
		var r row
		if err := rows.Scan(&id, &r.host, &r.status); err != nil {
			t.Fatal(err)
		}
		db[id] = r
		if !status.Known(r.status) {
			t.Errorf("sandbox %s has status %q", id, r.status)
		}
	}
	if err := rows.Err(); err != nil {
		t.Fatal(err)
	}
	agent := map[uuid.UUID]row{}
	for _, h := range s.HostIDs() {
		for _, vm := range s.VMs(h) {
			agent[vm.ID] = row{h, vm.Status}
			if r, ok := db[vm.ID]; !ok || r.host != h {
				t.Errorf("VM %s on host %s has no row on that host (%+v)", vm.ID, h, r)
			}
		}
	}
	for id, r := range db {
		a, onAgent := agent[id]
		switch r.status {
		case status.Running, status.Paused:
			if !onAgent || a.status != r.status {
				t.Errorf("sandbox %s is %s in the database, agent has %+v (present %v)", id, r.status, a, onAgent)
			}
		case status.Stopped:
			if onAgent {
				t.Errorf("sandbox %s is stopped in the database, agent still has it as %s", id, a.status)
			}
		}
	}
	after := s.VMs(dead)
	if len(after) != len(before) {
		t.Errorf("churn touched the dead host: %d VMs before, %d after", len(before), len(after))
	}
}
