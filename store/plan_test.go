package store_test

import (
	"context"
	"encoding/json"
	"testing"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5"

	"github.com/vigil-sh/vigil/internal/pgtest"
	st "github.com/vigil-sh/vigil/internal/status"
	"github.com/vigil-sh/vigil/store"
)

var readHostsSQL = store.ReadHostsSQL

// A shard's read never scans the whole sandboxes table, even when the
// table has no statistics (never analyzed, as after a bulk load or with
// autovacuum off): one shard of a 100,000-host fleet is 390 hosts, and a
// sequential scan of every row on every pass of every shard is what melted a
// 10-replica cluster down. Both plan kinds are checked: the custom plan for
// the actual ids and the generic one a prepared statement may settle on.
func TestReadHostsPlanIndexOnlyWithoutStatistics(t *testing.T) {
	ctx := context.Background()
	conn, err := pgx.Connect(ctx, pgtest.New(t))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(ctx)
	// 4,000 hosts × 20 rows, written in one statement and never analyzed.
	if _, err := conn.Exec(ctx, `
		insert into hosts (id, team_id, address, status, last_heartbeat_at)
		select gen_random_uuid(), gen_random_uuid(), '127.0.0.1:1', 'online', now()
		  from generate_series(1, 4000);
		insert into sandboxes (id, team_id, host_id, status, last_updated)
		select gen_random_uuid(), h.team_id, h.id, 'running', now()
		  from hosts h, generate_series(1, 20)`); err != nil {
		t.Fatal(err)
	}
	var hosts []uuid.UUID
	if err := conn.QueryRow(ctx, `select array_agg(id) from (select id from hosts order by random() limit 390) x`).Scan(&hosts); err != nil {
		t.Fatal(err)
	}
	for _, mode := range []string{"force_custom_plan", "force_generic_plan"} {
		if _, err := conn.Exec(ctx, "set plan_cache_mode = "+mode); err != nil {
			t.Fatal(err)
		}
		var plan []byte
		if err := conn.QueryRow(ctx, "explain (format json) "+readHostsSQL, hosts, 90.0, activeStatuses).Scan(&plan); err != nil {
			t.Fatal(err)
		}
		if scans := seqScans(t, plan); len(scans) > 0 {
			t.Errorf("%s: the shard read scans %v sequentially:\n%s", mode, scans, plan)
		}
	}
}

// activeStatuses are the statuses a pass reads (monitor.ActiveStatuses).
var activeStatuses = []string{st.Missing, st.Running, st.Starting, st.Resuming, st.Snapshotting, st.Pausing, st.Stopping}

// seqScans lists the relations a JSON plan reads by sequential scan.
func seqScans(t *testing.T, plan []byte) []string {
	t.Helper()
	var doc []struct{ Plan planNode }
	if err := json.Unmarshal(plan, &doc); err != nil {
		t.Fatal(err)
	}
	var out []string
	var walk func(n planNode)
	walk = func(n planNode) {
		if n.NodeType == "Seq Scan" {
			out = append(out, n.Relation)
		}
		for _, c := range n.Plans {
			walk(c)
		}
	}
	for _, d := range doc {
		walk(d.Plan)
	}
	return out
}

type planNode struct {
	NodeType string     `json:"Node Type"`
	Relation string     `json:"Relation Name"`
	Plans    []planNode `json:"Plans"`
}
