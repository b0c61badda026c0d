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

	peersWatched      prometheus.Gauge
	peersConnected    prometheus.Gauge
	peerSuspicions    prometheus.Counter
	peerConfirmations prometheus.Counter
	peerFalseAlarms   prometheus.Counter
	peerUnconfirmed   prometheus.Counter
	peerRevocations   *prometheus.CounterVec // result
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
	m.addPeerMetrics(reg)
	return m
}

// addPeerMetrics adds crash failover's metrics (peer observation).
func (m *metrics) addPeerMetrics(reg prometheus.Registerer) {
	m.peersWatched = prometheus.NewGauge(prometheus.GaugeOpts{
		Name: "vigil_peers_watched",
		Help: "Other replica processes this replica holds a liveness connection to (crash failover).",
	})
	m.peersConnected = prometheus.NewGauge(prometheus.GaugeOpts{
		Name: "vigil_peers_connected",
		Help: "Of the watched replica processes, those whose liveness connection is open now (the others are being dialled or left to their lease).",
	})
	m.peerSuspicions = prometheus.NewCounter(prometheus.CounterOpts{
		Name: "vigil_peer_suspicions_total",
		Help: "Liveness connections to another replica that ended: each is confirmed with one re-dial.",
	})
	m.peerConfirmations = prometheus.NewCounter(prometheus.CounterOpts{
		Name: "vigil_peer_confirmations_total",
		Help: "Replica processes found gone (re-dial refused, or another incarnation answering): their lease is revoked.",
	})
	m.peerFalseAlarms = prometheus.NewCounter(prometheus.CounterOpts{
		Name: "vigil_peer_false_alarms_total",
		Help: "Liveness connections that ended while the re-dial found the same incarnation alive: nothing revoked.",
	})
	m.peerUnconfirmed = prometheus.NewCounter(prometheus.CounterOpts{
		Name: "vigil_peer_unconfirmed_total",
		Help: "Liveness connections that ended while the re-dial got no answer (timeout, unreachable): left to the lease TTL.",
	})
	m.peerRevocations = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "vigil_peer_revocations_total",
		Help: "Revocations of a gone replica's lease by result (revoked, already_gone, no_session, rate_limited, error).",
	}, []string{"result"})
	for _, r := range []string{"revoked", "already_gone", "no_session", "rate_limited", "error"} {
		m.peerRevocations.WithLabelValues(r)
	}
	if reg != nil {
		reg.MustRegister(m.peersWatched, m.peersConnected, m.peerSuspicions, m.peerConfirmations, m.peerFalseAlarms, m.peerUnconfirmed, m.peerRevocations)
	}
}

// anomalyKinds are the kind label values of vigil_etcd_anomalies_total.
var anomalyKinds = []string{
	"config_deleted", "bad_member_key", "member_without_lease", "bad_shard_key", "unknown_key",
	"stale_own_key", "invalid_owner_key", "invalid_leader_key", "bad_config", "shard_count_mismatch",
}
