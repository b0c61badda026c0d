package election

import "github.com/prometheus/client_golang/prometheus"

type metrics struct {
	owned        prometheus.Gauge
	leader       prometheus.Gauge
	acquisitions prometheus.Counter
	losses       *prometheus.CounterVec
	anomalies    *prometheus.CounterVec
	sessions     prometheus.Counter
	expirations  prometheus.Counter
	assignments  prometheus.Counter
	shards       prometheus.Gauge
}

func newMetrics(reg prometheus.Registerer) *metrics {
	m := &metrics{
		owned: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "vigil_shards_owned",
			Help: "Shards this replica currently owns (holds the owner key and runs the work of).",
		}),
		leader: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "vigil_leader",
			Help: "1 while this replica is the cluster's assignment leader, else 0.",
		}),
		acquisitions: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "vigil_shard_acquisitions_total",
			Help: "Shards claimed by this replica.",
		}),
		losses: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "vigil_shard_losses_total",
			Help: "Shards this replica stopped owning, by reason (reassigned, key_lost, session_ended, worker_error, shutdown).",
		}, []string{"reason"}),
		anomalies: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "vigil_etcd_anomalies_total",
			Help: "Keys under the cluster prefix that were not trusted, by kind.",
		}, []string{"kind"}),
		sessions: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "vigil_etcd_sessions_total",
			Help: "etcd sessions (leases) this replica opened.",
		}),
		expirations: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "vigil_etcd_session_losses_total",
			Help: "etcd sessions that ended other than by a graceful stop.",
		}),
		assignments: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "vigil_assignments_written_total",
			Help: "Assignment changes written while leader.",
		}),
		shards: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "vigil_cluster_shards",
			Help: "The cluster's shard count (fixed at cluster creation).",
		}),
	}
	// Known label values start at zero, so a rate or increase sees even a
	// process's first loss or anomaly.
	for _, r := range []string{"reassigned", "key_lost", "session_ended", "worker_error", "shutdown"} {
		m.losses.WithLabelValues(r)
	}
	for _, k := range anomalyKinds {
		m.anomalies.WithLabelValues(k)
	}
	if reg != nil {
		reg.MustRegister(m.owned, m.leader, m.acquisitions, m.losses, m.anomalies, m.sessions, m.expirations, m.assignments, m.shards)
	}
	return m
}

// anomalyKinds are the kind label values of vigil_etcd_anomalies_total.
var anomalyKinds = []string{
	"config_deleted", "bad_member_key", "member_without_lease", "bad_shard_key", "unknown_key",
	"stale_own_key", "invalid_owner_key", "invalid_leader_key", "bad_config", "shard_count_mismatch",
}
