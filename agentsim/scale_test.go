package agentsim

import (
	"testing"
	"time"

	"github.com/google/uuid"

	"github.com/vigil-sh/vigil/internal/ids"
	"github.com/vigil-sh/vigil/internal/pgtest"
	"github.com/vigil-sh/vigil/internal/status"
)

func TestTenThousandHosts(t *testing.T) {
	const n = 10000
	url := pgtest.New(t)
	t0 := time.Now()
	s := start(t, Config{DatabaseURL: url, Hosts: n, SandboxesPerHost: 1, SharedFraction: 0.1, HeartbeatInterval: -1, Seed: 7})
	t.Logf("started and registered %d hosts in %v", n, time.Since(t0))
	pool := newPool(t, url)
	ctx := ctxTimeout(t, 60*time.Second)

	var hosts, addrs, shared, sandboxes int
	if err := pool.QueryRow(ctx, `select count(*), count(distinct address), count(*) filter (where team_id is null),
		(select count(*) from sandboxes) from hosts where status = $1`, status.HostOnline).Scan(&hosts, &addrs, &shared, &sandboxes); err != nil {
		t.Fatal(err)
	}
	if hosts != n || addrs != n || shared != n/10 || sandboxes != n {
		t.Fatalf("%d online hosts, %d addresses, %d shared, %d sandboxes; want %d, %d, %d, %d", hosts, addrs, shared, sandboxes, n, n, n/10, n)
	}

	t1 := time.Now()
	if beat, err := s.Heartbeat(ctx); err != nil || beat != n {
		t.Fatalf("Heartbeat: %d, %v", beat, err)
	}
	t.Logf("one heartbeat round in %v", time.Since(t1))

	// A sample across the whole address range answers its own sandbox.
	tr := http1(t)
	all := s.HostIDs()
	for i := 0; i < n; i += 97 {
		h := all[i]
		got, err := list(ctx, client(t, tr, s.Address(h)))
		if err != nil {
			t.Fatalf("host %d (%s): %v", i, s.Address(h), err)
		}
		var want uuid.UUID
		if err := pool.QueryRow(ctx, `select id from sandboxes where host_id = $1`, h).Scan(&want); err != nil {
			t.Fatal(err)
		}
		if len(got) != 1 || got[0].GetSandboxId() != ids.Sandbox(want) {
			t.Fatalf("host %d answered %v, want only %s", i, got, ids.Sandbox(want))
		}
	}
}
