package chaos

import (
	"context"
	"fmt"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"

	"github.com/vigil-sh/vigil/internal/faultproxy"
	"github.com/vigil-sh/vigil/internal/vigiltest"
)

// etcdCluster is a three-member etcd cluster of separate processes (the
// binary `go tool etcd` runs). Each member advertises its peer URL through a
// fault proxy, so a member can be cut off from its peers; replicas reach the
// client ports through proxies of their own (see links).
type etcdCluster struct {
	bin     string
	dir     string
	token   string
	members []*etcdMember

	cli *clientv3.Client // the harness's own client, every member, no proxy
}

type etcdMember struct {
	name   string
	dir    string
	client string // host:port of the client listener
	peer   string // host:port of the peer listener
	peerPx *faultproxy.Proxy

	mu   sync.Mutex
	proc *vigiltest.Process // nil while killed
	id   uint64             // raft member id, once known
}

// startEtcd starts n members and waits for the cluster to have a leader.
func startEtcd(ctx context.Context, bin, dir, token string, n int) (*etcdCluster, error) {
	c := &etcdCluster{bin: bin, dir: dir, token: token}
	var initial []string
	for i := 0; i < n; i++ {
		m := &etcdMember{name: fmt.Sprintf("etcd%d", i), dir: filepath.Join(dir, fmt.Sprintf("etcd%d", i))}
		var err error
		if m.client, err = vigiltest.FreePort(); err != nil {
			return nil, err
		}
		if m.peer, err = vigiltest.FreePort(); err != nil {
			return nil, err
		}
		if m.peerPx, err = faultproxy.New(m.peer); err != nil {
			return nil, err
		}
		c.members = append(c.members, m)
		initial = append(initial, m.name+"=http://"+m.peerPx.Addr())
	}
	for _, m := range c.members {
		if err := c.startMember(m, strings.Join(initial, ",")); err != nil {
			c.stop()
			return nil, err
		}
	}
	cli, err := clientv3.New(clientv3.Config{
		Endpoints: c.endpoints(), DialTimeout: 2 * time.Second, Logger: zap.NewNop(),
	})
	if err != nil {
		c.stop()
		return nil, err
	}
	c.cli = cli
	if err := poll(ctx, 60*time.Second, "etcd cluster to elect a leader", func() (bool, string) {
		_, detail := c.leader(ctx)
		return detail == "", detail
	}); err != nil {
		c.stop()
		return nil, err
	}
	resp, err := cli.MemberList(ctx)
	if err != nil {
		c.stop()
		return nil, err
	}
	for _, rm := range resp.Members {
		for _, m := range c.members {
			if rm.Name == m.name {
				m.id = rm.ID
			}
		}
	}
	return c, nil
}

func (c *etcdCluster) startMember(m *etcdMember, initial string) error {
	args := []string{
		"--name", m.name, "--data-dir", m.dir,
		"--listen-client-urls", "http://" + m.client, "--advertise-client-urls", "http://" + m.client,
		"--listen-peer-urls", "http://" + m.peer, "--initial-advertise-peer-urls", "http://" + m.peerPx.Addr(),
		"--initial-cluster", initial, "--initial-cluster-state", "new", "--initial-cluster-token", c.token,
		"--heartbeat-interval", "100", "--election-timeout", "1000",
		"--log-level", "warn",
	}
	logf, err := os.OpenFile(filepath.Join(c.dir, "logs", m.name+".log"), os.O_CREATE|os.O_APPEND|os.O_WRONLY, 0o644)
	if err != nil {
		return err
	}
	p, err := vigiltest.StartWith(m.name, c.bin, args, os.Environ(), logf)
	if err != nil {
		logf.Close()
		return err
	}
	go func() { <-p.Done(); logf.Close() }()
	m.mu.Lock()
	m.proc = p
	m.mu.Unlock()
	return nil
}

// endpoints are the client URLs of every member.
func (c *etcdCluster) endpoints() []string {
	var out []string
	for _, m := range c.members {
		out = append(out, "http://"+m.client)
	}
	return out
}

// leader is the member every live member agrees leads; detail says why
// there is none.
func (c *etcdCluster) leader(ctx context.Context) (*etcdMember, string) {
	var lead uint64
	for _, m := range c.members {
		if !m.running() {
			continue
		}
		sctx, cancel := context.WithTimeout(ctx, 500*time.Millisecond)
		st, err := c.cli.Status(sctx, "http://"+m.client)
		cancel()
		if err != nil {
			return nil, fmt.Sprintf("%s: %v", m.name, err)
		}
		if st.Leader == 0 {
			return nil, m.name + " sees no leader"
		}
		if lead != 0 && st.Leader != lead {
			return nil, fmt.Sprintf("members disagree on the leader (%x, %x)", lead, st.Leader)
		}
		lead = st.Leader
		if m.id == 0 {
			m.id = st.Header.MemberId
		}
	}
	for _, m := range c.members {
		if m.id == lead {
			return m, ""
		}
	}
	return nil, fmt.Sprintf("leader %x is not a known member", lead)
}

func (m *etcdMember) running() bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.proc != nil && !m.proc.Exited()
}

func (m *etcdMember) process() *vigiltest.Process {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.proc
}

// kill SIGKILLs the member.
func (c *etcdCluster) kill(m *etcdMember) error {
	p := m.process()
	if p == nil {
		return nil
	}
	return p.Kill(10 * time.Second)
}

// restart starts a killed member again on its data directory.
func (c *etcdCluster) restart(m *etcdMember) error {
	if m.running() {
		return nil
	}
	var initial []string
	for _, o := range c.members {
		initial = append(initial, o.name+"=http://"+o.peerPx.Addr())
	}
	return c.startMember(m, strings.Join(initial, ","))
}

// pause SIGSTOPs the member: to its peers and clients it is a member whose
// disk (or whole machine) stalled. resume continues it.
func (c *etcdCluster) pause(m *etcdMember) error {
	if p := m.process(); p != nil {
		return p.Signal(syscall.SIGSTOP)
	}
	return nil
}

func (c *etcdCluster) resume(m *etcdMember) error {
	if p := m.process(); p != nil {
		return p.Signal(syscall.SIGCONT)
	}
	return nil
}

// stop ends every member and closes the proxies.
func (c *etcdCluster) stop() {
	if c.cli != nil {
		_ = c.cli.Close()
	}
	for _, m := range c.members {
		if p := m.process(); p != nil {
			_ = p.Signal(syscall.SIGCONT)
			if ok, _ := p.Terminate(5 * time.Second); !ok {
				_ = p.Kill(5 * time.Second)
			}
		}
		if m.peerPx != nil {
			m.peerPx.Close()
		}
	}
}

// clientURL is a member's client URL for logs.
func (m *etcdMember) clientURL() *url.URL { return &url.URL{Scheme: "http", Host: m.client} }

// leaderLog polls the members for the etcd leader and keeps every change, so
// a failover can be told apart by whether etcd's own leader changed near it.
type leaderLog struct {
	c *etcdCluster

	mu      sync.Mutex
	changes []leaderChange
	done    chan struct{}
	stopped chan struct{}
}

type leaderChange struct {
	at     time.Time
	leader string // member name, "" while there is none
}

func newLeaderLog(c *etcdCluster) *leaderLog {
	return &leaderLog{c: c, done: make(chan struct{}), stopped: make(chan struct{})}
}

func (l *leaderLog) run(ctx context.Context) {
	defer close(l.stopped)
	t := time.NewTicker(200 * time.Millisecond)
	defer t.Stop()
	for {
		name := l.c.majorityLeader(ctx)
		l.mu.Lock()
		if n := len(l.changes); n == 0 || l.changes[n-1].leader != name {
			l.changes = append(l.changes, leaderChange{at: time.Now(), leader: name})
		}
		l.mu.Unlock()
		select {
		case <-ctx.Done():
			return
		case <-l.done:
			return
		case <-t.C:
		}
	}
}

func (l *leaderLog) stop() {
	select {
	case <-l.done:
	default:
		close(l.done)
	}
}

// changedWithin reports whether the leader changed (or was absent) at any
// time in [from, to].
func (l *leaderLog) changedWithin(from, to time.Time) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	for i, c := range l.changes {
		if i == 0 {
			continue
		}
		if !c.at.Before(from) && !c.at.After(to) {
			return true
		}
		if c.leader == "" && c.at.Before(to) && (i+1 == len(l.changes) || l.changes[i+1].at.After(from)) {
			return true
		}
	}
	return false
}

// count is the number of leader changes recorded (the first leader excluded).
func (l *leaderLog) count() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	n := 0
	for i, c := range l.changes {
		if i > 0 && c.leader != "" {
			n++
		}
	}
	return n
}

// majorityLeader is the member a majority of the members report as leader,
// "" when there is no such member (an election, a partition, members
// down).
func (c *etcdCluster) majorityLeader(ctx context.Context) string {
	votes := map[uint64]int{}
	for _, m := range c.members {
		if !m.running() {
			continue
		}
		sctx, cancel := context.WithTimeout(ctx, 300*time.Millisecond)
		st, err := c.cli.Status(sctx, "http://"+m.client)
		cancel()
		if err == nil && st.Leader != 0 {
			votes[st.Leader]++
		}
	}
	for id, n := range votes {
		if 2*n > len(c.members) {
			for _, m := range c.members {
				if m.id == id {
					return m.name
				}
			}
		}
	}
	return ""
}

// healthy reports whether every member runs, all agree on one leader and
// none lags far behind it in the raft log.
func (c *etcdCluster) healthy(ctx context.Context) (bool, string) {
	var lead uint64
	var lo, hi uint64
	for i, m := range c.members {
		if !m.running() {
			return false, m.name + " not running"
		}
		sctx, cancel := context.WithTimeout(ctx, 500*time.Millisecond)
		st, err := c.cli.Status(sctx, "http://"+m.client)
		cancel()
		if err != nil {
			return false, fmt.Sprintf("%s: %v", m.name, err)
		}
		if st.Leader == 0 || (lead != 0 && st.Leader != lead) {
			return false, fmt.Sprintf("%s sees leader %x", m.name, st.Leader)
		}
		lead = st.Leader
		if i == 0 || st.RaftAppliedIndex < lo {
			lo = st.RaftAppliedIndex
		}
		if st.RaftAppliedIndex > hi {
			hi = st.RaftAppliedIndex
		}
	}
	if hi-lo > 100 {
		return false, fmt.Sprintf("applied indexes %d..%d", lo, hi)
	}
	return true, ""
}

// dump renders the leader changes, one a line.
func (l *leaderLog) dump() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	var b strings.Builder
	for _, c := range l.changes {
		name := c.leader
		if name == "" {
			name = "(none)"
		}
		fmt.Fprintf(&b, "%s %s\n", c.at.Format("15:04:05.000"), name)
	}
	return b.String()
}
