package monitor

import (
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/vigil-sh/vigil/events"
)

// metrics are the reconcile's Prometheus series. All are documented in
// docs/metrics.md.
type metrics struct {
	reconciles      *prometheus.CounterVec   // kind, result
	duration        *prometheus.HistogramVec // kind, result
	transitions     *prometheus.CounterVec   // from, to
	markedDown      prometheus.Counter
	fenceRejections prometheus.Counter
	reportProblems  *prometheus.CounterVec // kind
	zombies         prometheus.Counter
	resent          prometheus.Counter
	eventsPending   *prometheus.GaugeVec   // shard
	eventsOldest    *ageVec                // shard
	published       *prometheus.CounterVec // event
	publishErrors   prometheus.Counter
	badRows         *prometheus.CounterVec // kind
	lastSuccess     *prometheus.GaugeVec   // shard
	lastPass        *prometheus.GaugeVec   // shard
	blindHosts      *prometheus.GaugeVec   // shard
	shardHosts      *prometheus.GaugeVec   // shard
	shadow          *prometheus.CounterVec // from, to
}

func newMetrics(reg prometheus.Registerer) *metrics {
	m := &metrics{
		reconciles: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "vigil_reconciles_total",
			Help: "Host reconciles by kind (active, passive) and result (ok, changed, skipped, agent_error, fenced, error).",
		}, []string{"kind", "result"}),
		duration: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "vigil_reconcile_duration_seconds",
			Help:    "Duration of one host reconcile by kind and result.",
			Buckets: []float64{.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10},
		}, []string{"kind", "result"}),
		transitions: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "vigil_sandbox_transitions_total",
			Help: "Sandbox status changes vigil committed, by from and to status.",
		}, []string{"from", "to"}),
		markedDown: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "vigil_hosts_marked_unreachable_total",
			Help: "Hosts vigil marked unreachable for a stale heartbeat.",
		}),
		fenceRejections: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "vigil_fence_rejections_total",
			Help: "Write transactions rejected because the shard's fence holds a newer token.",
		}),
		reportProblems: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "vigil_agent_report_problems_total",
			Help: "Agent ListSandboxes entries that were tolerated but not trusted, by kind (malformed_id, unknown_status, duplicate_id).",
		}, []string{"kind"}),
		zombies: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "vigil_zombies_destroyed_total",
			Help: "Sandboxes stopped in the database but paused on their agent that vigil destroyed on the agent.",
		}),
		resent: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "vigil_destroys_resent_total",
			Help: "DestroySandbox calls re-sent for rows stopping past the transient grace whose VM the agent still had (rule 9), accepted by the agent (each then moves its row stopping -> stopped).",
		}),
		eventsPending: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "vigil_events_pending",
			Help: "Notification events of the shard committed but not yet published to Redis; exported by the shard's owner only.",
		}, []string{"shard"}),
		eventsOldest: newAgeVec(prometheus.NewDesc("vigil_events_oldest_pending_age_seconds",
			"Age, at the scrape, of the shard's oldest unpublished event as the relay last saw it (0: none pending); exported by the shard's owner only.",
			[]string{"shard"}, nil)),
		published: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "vigil_events_published_total",
			Help: "Notification events Redis acknowledged, by event (a republished duplicate counts again).",
		}, []string{"event"}),
		publishErrors: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "vigil_event_publish_errors_total",
			Help: "Failed publishes of a batch of events to Redis (the batch stays pending and is retried).",
		}),
		badRows: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "vigil_bad_rows_total",
			Help: "Control-plane rows vigil will not act on, by kind (host_null_status, sandbox_null_team); counted once per pass that met them.",
		}, []string{"kind"}),
		lastSuccess: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "vigil_shard_last_reconcile_success_timestamp_seconds",
			Help: "The oldest last-successful-reconcile time (Unix) among the shard's online hosts with an address, or the last completed pass when it has none; exported by the shard's owner only.",
		}, []string{"shard"}),
		lastPass: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "vigil_shard_last_pass_timestamp_seconds",
			Help: "Unix time the owner last completed a full pass over the shard, whatever its hosts' outcomes; exported by the shard's owner only.",
		}, []string{"shard"}),
		blindHosts: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "vigil_shard_blind_hosts",
			Help: "The shard's online hosts with an address not reconciled successfully for more than two intervals; exported by the shard's owner only.",
		}, []string{"shard"}),
		shardHosts: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "vigil_shard_hosts",
			Help: "The shard's online hosts with an address (the ones its lag is made of); exported by the shard's owner only.",
		}, []string{"shard"}),
		shadow: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "vigil_shadow_changes_total",
			Help: "Changes shadow mode would have committed and recorded instead, by from and to status (host rows: their host status).",
		}, []string{"from", "to"}),
	}
	for _, e := range []string{events.HostDown, events.CapsulePause, events.CapsuleDestroy, events.CapsuleCreate, events.CapsuleResume} {
		m.published.WithLabelValues(e)
	}
	if reg != nil {
		reg.MustRegister(m.reconciles, m.duration, m.transitions, m.markedDown, m.fenceRejections, m.reportProblems, m.zombies,
			m.resent, m.eventsPending, m.eventsOldest, m.published, m.publishErrors, m.badRows, m.lastSuccess, m.lastPass, m.blindHosts, m.shardHosts, m.shadow)
	}
	return m
}

// ageVec is a per-shard gauge of how old something is at the scrape: it
// keeps the time and exports now minus it, so an age keeps growing between
// the relay's looks (while Redis is down they are up to its backoff apart).
type ageVec struct {
	desc  *prometheus.Desc
	mu    sync.Mutex
	since map[string]time.Time // zero: nothing pending (age 0)
}

func newAgeVec(desc *prometheus.Desc) *ageVec {
	return &ageVec{desc: desc, since: map[string]time.Time{}}
}

// Set records the time of label's oldest item (zero: none).
func (a *ageVec) Set(label string, t time.Time) {
	a.mu.Lock()
	a.since[label] = t
	a.mu.Unlock()
}

// Delete removes label's series.
func (a *ageVec) Delete(label string) {
	a.mu.Lock()
	delete(a.since, label)
	a.mu.Unlock()
}

// Age is label's age now, and whether it is exported.
func (a *ageVec) Age(label string) (float64, bool) {
	a.mu.Lock()
	defer a.mu.Unlock()
	t, ok := a.since[label]
	if !ok || t.IsZero() {
		return 0, ok
	}
	return max(time.Since(t).Seconds(), 0), true
}

func (a *ageVec) Describe(ch chan<- *prometheus.Desc) { ch <- a.desc }

func (a *ageVec) Collect(ch chan<- prometheus.Metric) {
	a.mu.Lock()
	labels := make([]string, 0, len(a.since))
	for l := range a.since {
		labels = append(labels, l)
	}
	a.mu.Unlock()
	for _, l := range labels {
		if v, ok := a.Age(l); ok {
			ch <- prometheus.MustNewConstMetric(a.desc, prometheus.GaugeValue, v, l)
		}
	}
}
