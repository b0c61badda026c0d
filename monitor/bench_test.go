package monitor_test

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/google/uuid"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/vigil-sh/vigil/agentpool"
	"github.com/vigil-sh/vigil/agentsim"
	"github.com/vigil-sh/vigil/internal/pgtest"
	"github.com/vigil-sh/vigil/monitor"
	"github.com/vigil-sh/vigil/store"
)

func BenchmarkDecide1000Rows(b *testing.B) {
	now := time.Now()
	rows := make([]monitor.Row, 1000)
	rep := monitor.Report{}
	statuses := []string{"running", "missing", "starting", "pausing", "snapshotting", "stopping"}
	for i := range rows {
		id := uuid.New()
		rows[i] = monitor.Row{ID: id, TeamID: id, Status: statuses[i%len(statuses)], LastUpdated: now.Add(-time.Duration(i) * time.Second)}
		if i%3 != 0 {
			rep[id] = monitor.Observed{Presence: monitor.PresentKnown, Status: "running"}
		}
	}
	b.ReportAllocs()
	for b.Loop() {
		monitor.Decide(monitor.DefaultRules, rows, rep, now)
	}
}

// BenchmarkReconcileHosts is one pass over 100 hosts with 10 running
// sandboxes each, against the real Postgres and agentsim over Connect: the
// steady state (nothing to change) a replica spends most of its time in.
func BenchmarkReconcileHosts(b *testing.B) {
	for _, hosts := range []int{100} {
		b.Run(fmt.Sprintf("hosts=%d", hosts), func(b *testing.B) {
			url := pgtest.New(b)
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			sim, err := agentsim.New(agentsim.Config{DatabaseURL: url, Hosts: hosts, SandboxesPerHost: 10, HeartbeatInterval: -1})
			if err != nil {
				b.Fatal(err)
			}
			done := make(chan error, 1)
			go func() { done <- sim.Run(ctx) }()
			<-sim.Ready()
			st, err := store.Open(ctx, store.Config{URL: url, MaxConns: 16})
			if err != nil {
				b.Fatal(err)
			}
			defer st.Close()
			pool, err := agentpool.New(agentpool.Config{})
			if err != nil {
				b.Fatal(err)
			}
			defer pool.Close()
			rec, err := monitor.New(monitor.Config{Registerer: prometheus.NewRegistry()}, st, pool)
			if err != nil {
				b.Fatal(err)
			}
			f := store.Fence{Shard: 0, Token: 1, Replica: "bench"}
			if err := st.RaiseFence(ctx, f); err != nil {
				b.Fatal(err)
			}
			ids := sim.HostIDs()
			b.ResetTimer()
			for b.Loop() {
				out, err := rec.Reconcile(ctx, f, ids)
				if err != nil {
					b.Fatal(err)
				}
				for _, o := range out {
					if o.Err != nil {
						b.Fatal(o.Err)
					}
				}
			}
			b.ReportMetric(float64(b.Elapsed().Microseconds())/float64(b.N)/float64(hosts), "µs/host")
			b.StopTimer()
			cancel()
			<-done
		})
	}
}
