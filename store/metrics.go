package store

import (
	"context"
	"errors"

	"github.com/jackc/pgx/v5"
	"github.com/prometheus/client_golang/prometheus"
)

// metrics count what the store sends to Postgres. It is the pool's query
// tracer, so every statement of every connection is counted, whoever sent it.
type metrics struct {
	statements prometheus.Counter
	writes     *prometheus.CounterVec // result
	volumes    prometheus.Gauge

	databaseChanges prometheus.Counter
}

func newMetrics(reg prometheus.Registerer) (*metrics, error) {
	m := &metrics{
		statements: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "vigil_db_statements_total",
			Help: "Statements this replica sent to Postgres, begin and commit included.",
		}),
		writes: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "vigil_db_write_transactions_total",
			Help: "Fenced write transactions by result (committed, fenced, failed).",
		}, []string{"result"}),
		volumes: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "vigil_volumes_table",
			Help: "1 when the control plane's database has a volumes table, whose volumes vigil detaches from the sandboxes it stops (rule 11); 0 without one.",
		}),
		databaseChanges: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "vigil_fence_database_changes_total",
			Help: "Fenced write transactions refused because the database is not the one (system identifier and timeline) this replica raised the shard's fence on: a failover happened since. Each is a loss of the shard, claimed again under a new token (also counted as fenced).",
		}),
	}
	for _, r := range []string{"committed", "fenced", "failed"} {
		m.writes.WithLabelValues(r)
	}
	if reg == nil {
		return m, nil
	}
	for _, c := range []prometheus.Collector{m.statements, m.writes, m.volumes, m.databaseChanges} {
		if err := reg.Register(c); err != nil {
			return nil, err
		}
	}
	return m, nil
}

// TraceQueryStart implements pgx.QueryTracer.
func (m *metrics) TraceQueryStart(ctx context.Context, _ *pgx.Conn, _ pgx.TraceQueryStartData) context.Context {
	m.statements.Inc()
	return ctx
}

// TraceQueryEnd implements pgx.QueryTracer.
func (m *metrics) TraceQueryEnd(context.Context, *pgx.Conn, pgx.TraceQueryEndData) {}

func (m *metrics) writeTx(err error) {
	switch {
	case err == nil:
		m.writes.WithLabelValues("committed").Inc()
	case errors.Is(err, ErrFenced):
		m.writes.WithLabelValues("fenced").Inc()
	default:
		m.writes.WithLabelValues("failed").Inc()
	}
}
