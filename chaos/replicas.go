package chaos

import (
	"context"
	"fmt"
	"net/url"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/vigil-sh/vigil/internal/faultproxy"
	"github.com/vigil-sh/vigil/internal/vigiltest"
)

// member is one `vigil run` process and the links it reaches the world
// through: per etcd member a fault proxy in front of a valve (so the link
// can be cut, blackholed or made one-way), a fault proxy to Postgres and one
// to Redis. Agents are reached directly; their faults are agentsim modes.
// Its admin listener (metrics, health, and the /peer connections the other
// replicas hold to it) is reached directly too.
type member struct {
	id      string
	r       *vigiltest.Replica
	logPath string
	logFile *os.File
	etcdPx  []*faultproxy.Proxy
	valves  []*valve
	pgPx    *faultproxy.Proxy
	redisPx *faultproxy.Proxy // nil without events

	mu       sync.Mutex
	intent   string    // why the harness ended it ("kill", "term"); "" while it should run
	endAt    time.Time // when the harness began ending it (just before the signal)
	paused   bool
	counters map[string]float64 // last scraped value of each counted series
	// watched is vigil_peers_watched at the last scrape (a gauge: the
	// other replicas' processes it holds a connection to).
	watched     float64
	watchedSeen bool
	// oldestMax is the largest oldest-pending-event age any of its shards
	// reported in a scrape.
	oldestMax float64
}

// countedSeries are scraped from every replica and summed over the run.
var countedSeries = []string{
	"vigil_fence_rejections_total",
	"vigil_fence_database_changes_total",
	`vigil_db_write_transactions_total{result="fenced"}`,
	`vigil_db_write_transactions_total{result="committed"}`,
	"vigil_etcd_sessions_total",
	`vigil_shard_losses_total{reason="session_ended"}`,
	`vigil_shard_losses_total{reason="key_lost"}`,
	`vigil_shard_losses_total{reason="worker_error"}`,
	`vigil_shard_losses_total{reason="reassigned"}`,
	`vigil_bad_rows_total{kind="host_null_status"}`,
	`vigil_bad_rows_total{kind="sandbox_null_team"}`,
	`vigil_agent_report_problems_total{kind="unknown_status"}`,
	`vigil_agent_report_problems_total{kind="duplicate_id"}`,
	"vigil_destroys_resent_total",
	`vigil_events_published_total{event="host.down"}`,
	`vigil_events_published_total{event="capsule.pause"}`,
	`vigil_events_published_total{event="capsule.destroy"}`,
	`vigil_events_published_total{event="capsule.create"}`,
	`vigil_events_published_total{event="capsule.resume"}`,
	"vigil_event_publish_errors_total",
	// Crash detection (election/peer.go), reported on a line of their own.
	"vigil_peer_suspicions_total",
	"vigil_peer_confirmations_total",
	"vigil_peer_false_alarms_total",
	"vigil_peer_unconfirmed_total",
	`vigil_peer_revocations_total{result="revoked"}`,
	`vigil_peer_revocations_total{result="already_gone"}`,
	`vigil_peer_revocations_total{result="no_session"}`,
	`vigil_peer_revocations_total{result="rate_limited"}`,
	`vigil_peer_revocations_total{result="error"}`,
}

// peerWatchedSeries is the gauge of the other replicas a replica watches;
// it is kept as last scraped, not summed.
const peerWatchedSeries = "vigil_peers_watched"

// oldestPendingSeries is the gauge of each shard's oldest pending event.
const oldestPendingSeries = "vigil_events_oldest_pending_age_seconds"

func (m *member) setIntent(s string) {
	m.mu.Lock()
	m.intent = s
	m.endAt = time.Now()
	m.mu.Unlock()
}

// ended is why and when the harness began ending the member ("" and zero
// while it should run).
func (m *member) ended() (string, time.Time) {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.intent, m.endAt
}

// peersWatched is vigil_peers_watched at the member's last scrape.
func (m *member) peersWatched() (float64, bool) {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.watched, m.watchedSeen
}

func (m *member) intended() string {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.intent
}

func (m *member) setPaused(p bool) {
	m.mu.Lock()
	m.paused = p
	m.mu.Unlock()
}

func (m *member) isPaused() bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.paused
}

// scrape records the member's counted series; a paused or dead process is
// skipped (its last values stand).
func (m *member) scrape() {
	if m.r.Exited() || m.isPaused() {
		return
	}
	vals, err := m.r.Metrics()
	if err != nil {
		return
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	for _, s := range countedSeries {
		if v, ok := vals[s]; ok && v >= m.counters[s] {
			m.counters[s] = v
		}
	}
	if v, ok := vals[peerWatchedSeries]; ok {
		m.watched, m.watchedSeen = v, true
	}
	for s, v := range vals {
		if strings.HasPrefix(s, oldestPendingSeries) && v > m.oldestMax {
			m.oldestMax = v
		}
	}
}

func (m *member) oldestPending() float64 {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.oldestMax
}

func (m *member) counter(series string) float64 {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.counters[series]
}

// closeLinks closes the member's proxies once its process is gone.
func (m *member) closeLinks() {
	for _, p := range m.etcdPx {
		p.Close()
	}
	for _, v := range m.valves {
		v.Close()
	}
	if m.pgPx != nil {
		m.pgPx.Close()
	}
	if m.redisPx != nil {
		m.redisPx.Close()
	}
	if m.logFile != nil {
		m.logFile.Close()
	}
}

// etcd link faults, all of the member's etcd links at once.
func (m *member) blackholeEtcd() {
	for _, p := range m.etcdPx {
		p.Blackhole()
	}
}

func (m *member) cutEtcd() {
	for _, p := range m.etcdPx {
		p.Cut()
	}
}

func (m *member) holdEtcd(d direction) {
	for _, v := range m.valves {
		v.Hold(d)
	}
}

func (m *member) healEtcd() {
	for _, p := range m.etcdPx {
		p.Heal()
	}
	for _, v := range m.valves {
		v.Release()
	}
}

// startMember starts a replica with a fresh id and fresh links and waits for
// its admin listener.
func (e *env) startMember(ctx context.Context) (*member, error) {
	e.mu.Lock()
	e.gen++
	id := fmt.Sprintf("r%02d", e.gen)
	e.mu.Unlock()
	m := &member{id: id, counters: map[string]float64{}}
	fail := func(err error) (*member, error) {
		m.closeLinks()
		return nil, err
	}
	var eps []string
	for _, em := range e.etcd.members {
		v, err := newValve(em.client)
		if err != nil {
			return fail(err)
		}
		m.valves = append(m.valves, v)
		p, err := faultproxy.New(v.Addr())
		if err != nil {
			return fail(err)
		}
		m.etcdPx = append(m.etcdPx, p)
		eps = append(eps, p.Addr())
	}
	pgURL, err := url.Parse(e.dbURL)
	if err != nil {
		return fail(err)
	}
	if m.pgPx, err = faultproxy.New(pgURL.Host); err != nil {
		return fail(err)
	}
	pgURL.Host = m.pgPx.Addr()
	// The admin listener is reached directly, by the harness and by the
	// other replicas alike: with no --advertise-addr, the address in its
	// member key is this bound loopback address, so the peers' crash
	// detection (election/peer.go, PeerPath) sees a killed process's
	// sockets close, and no fault proxy ever cuts or resets those links.
	admin, err := vigiltest.FreePort()
	if err != nil {
		return fail(err)
	}
	args := []string{"run",
		"--etcd-endpoints", strings.Join(eps, ","),
		"--database-url", pgURL.String(),
		"--cluster", e.cluster,
		"--replica-id", id,
		"--shards", strconv.Itoa(e.cfg.Shards),
		"--lease-ttl", e.cfg.LeaseTTL.String(),
		"--interval", e.cfg.Interval.String(),
		"--stale-scan", "1s",
		"--unreachable-after", e.cfg.UnreachableAfter.String(),
		"--transient-grace", e.cfg.TransientGrace.String(),
		"--snapshot-grace", e.cfg.SnapshotGrace.String(),
		"--http-addr", admin,
		"--db-max-conns", "4",
		"--log-format", "json",
	}
	if e.cfg.JournalRetention > 0 {
		args = append(args, "--journal-retention", e.cfg.JournalRetention.String())
	}
	if e.events != nil {
		ru, err := url.Parse(e.cfg.RedisURL)
		if err != nil {
			return fail(err)
		}
		if m.redisPx, err = faultproxy.New(ru.Host); err != nil {
			return fail(err)
		}
		ru.Host = m.redisPx.Addr()
		args = append(args, "--events-redis-url", ru.String(), "--events-stream", e.events.stream,
			"--events-marker-ttl", e.events.markerTTL.String())
		if e.events.channel != "" {
			// The run's own mirror channel, never the machine's wrenn:sse.
			args = append(args, "--events-sse-channel", e.events.channel)
		}
	}
	m.logPath = filepath.Join(e.dir, "logs", id+".log")
	if m.logFile, err = os.Create(m.logPath); err != nil {
		return fail(err)
	}
	p, err := vigiltest.StartWith(id, e.vigilBin, args, nil, m.logFile)
	if err != nil {
		return fail(err)
	}
	m.r = &vigiltest.Replica{Process: p, Admin: admin}
	e.mu.Lock()
	e.members = append(e.members, m)
	e.mu.Unlock()
	go func() {
		<-p.Done()
		m.closeLinks()
	}()
	err = poll(ctx, 20*time.Second, "admin listener of "+id, func() (bool, string) {
		if p.Exited() {
			return true, ""
		}
		code, body, err := m.r.Get("/healthz")
		if err != nil {
			return false, err.Error()
		}
		return code == 200, fmt.Sprintf("%d %s", code, body)
	})
	if p.Exited() {
		return nil, fmt.Errorf("replica %s exited during start-up (%s); log %s", id, p.ExitString(), m.logPath)
	}
	if err != nil {
		return nil, err
	}
	e.logf("started replica %s (pid %d)", id, p.Pid())
	return m, nil
}

// live lists the members whose processes run and that the harness has not
// begun to end, in start order.
func (e *env) live() []*member {
	e.mu.Lock()
	defer e.mu.Unlock()
	var out []*member
	for _, m := range e.members {
		if !m.r.Exited() && m.intended() == "" {
			out = append(out, m)
		}
	}
	return out
}

func memberIDs(ms []*member) []string {
	out := make([]string, len(ms))
	for i, m := range ms {
		out[i] = m.id
	}
	return out
}

// kill SIGKILLs the member (after a last scrape).
func (e *env) kill(m *member) error {
	m.scrape()
	m.setIntent("kill")
	return m.r.Kill(10 * time.Second)
}

// terminate SIGTERMs the member and waits for its graceful exit; it reports
// whether it exited 0 within the bound.
func (e *env) terminate(m *member, bound time.Duration) (time.Duration, error) {
	m.scrape()
	m.setIntent("term")
	t0 := time.Now()
	if err := m.r.Signal(syscall.SIGTERM); err != nil {
		return 0, err
	}
	if err := m.r.Wait(bound); err != nil {
		_ = m.r.Kill(10 * time.Second)
		return time.Since(t0), fmt.Errorf("%s still running %s after SIGTERM", m.id, bound)
	}
	if st := m.r.State(); !st.Success() {
		return m.r.ExitedAt().Sub(t0), fmt.Errorf("%s exited with %s after SIGTERM", m.id, st)
	}
	return m.r.ExitedAt().Sub(t0), nil
}

func (e *env) stopMember(m *member) {
	m.setPaused(false)
	_ = m.r.Signal(syscall.SIGCONT)
	if m.intended() == "" {
		m.setIntent("end")
	}
	_ = m.r.Kill(10 * time.Second)
}
