package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"flag"
	"fmt"
	"net"
	"net/http"
	"net/http/pprof"
	"os"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/vigil-sh/vigil/agentpool"
	"github.com/vigil-sh/vigil/election"
	"github.com/vigil-sh/vigil/events"
	"github.com/vigil-sh/vigil/internal/buildinfo"
	"github.com/vigil-sh/vigil/internal/zaplog"
	"github.com/vigil-sh/vigil/monitor"
	"github.com/vigil-sh/vigil/shard"
	"github.com/vigil-sh/vigil/store"
)

// replicaConfig is everything one replica needs; `vigil run` fills it from
// flags, `vigil dev` builds several.
type replicaConfig struct {
	EtcdEndpoints       string
	EtcdPrefix          string
	EtcdCAFile          string
	EtcdCertFile        string
	EtcdKeyFile         string
	EtcdUsername        string
	EtcdPasswordFile    string // the password is read only from this file
	DatabaseURL         string
	DatabasePassword    string // file: --database-password-file
	DBMaxConns          int
	Cluster             string
	ReplicaID           string
	Shards              int
	LeaseTTL            time.Duration
	Interval            time.Duration
	StaleScan           time.Duration
	UnreachableAfter    time.Duration
	TransientGrace      time.Duration
	SnapshotGrace       time.Duration
	AgentConcurrency    int
	JournalRetention    time.Duration
	HTTPAddr            string
	AdvertiseAddr       string
	DebugPprof          bool
	AgentTimeout        time.Duration
	AgentMaxBytes       int
	AgentMaxIdle        int
	AgentTLSSessions    int
	AgentIdleTimeout    time.Duration
	AgentCAFile         string
	AgentCertFile       string
	AgentKeyFile        string
	EventsRedisURL      string
	EventsRedisPassword string // file: --events-redis-password-file
	EventsStream        string
	EventsMirror        string
	EventsMarkerTTL     time.Duration
	EventsBatch         int
	Shadow              bool
}

func defaultReplicaID() string {
	h, err := os.Hostname()
	if err != nil || h == "" {
		h = "vigil"
	}
	h = strings.Map(func(r rune) rune {
		if r <= ' ' || r > '~' || r == '/' {
			return '-'
		}
		return r
	}, h)
	var b [4]byte
	_, _ = randRead(b[:])
	return fmt.Sprintf("%s-%x", h, b)
}

// defaultReplicaConfig is `vigil run`'s configuration with every flag at its
// default: the one place they are declared is the flag set.
func defaultReplicaConfig() replicaConfig {
	var c replicaConfig
	c.flags(flag.NewFlagSet("defaults", flag.ContinueOnError))
	return c
}

func (c *replicaConfig) flags(fs *flag.FlagSet) {
	fs.StringVar(&c.EtcdEndpoints, "etcd-endpoints", "127.0.0.1:2379", "comma-separated etcd endpoints; all are used")
	fs.StringVar(&c.EtcdPrefix, "etcd-prefix", "/vigil", "etcd key prefix")
	fs.StringVar(&c.EtcdCAFile, "etcd-ca-file", "", "CA bundle for etcd TLS")
	fs.StringVar(&c.EtcdCertFile, "etcd-cert-file", "", "client certificate for etcd TLS")
	fs.StringVar(&c.EtcdKeyFile, "etcd-key-file", "", "client key for etcd TLS")
	c.etcdAuthFlags(fs)
	fs.StringVar(&c.DatabaseURL, "database-url", "", "Postgres URL of the control plane's database (required); its password is better in --database-password-file")
	fs.StringVar(&c.DatabasePassword, "database-password-file", "", passwordFileUsage("database-url"))
	fs.IntVar(&c.DBMaxConns, "db-max-conns", store.DefaultMaxConns, "Postgres pool size")
	fs.StringVar(&c.Cluster, "cluster", "default", "cluster name: replicas with the same prefix and cluster share the hosts")
	fs.StringVar(&c.ReplicaID, "replica-id", defaultReplicaID(), "this replica's id (default: hostname plus a random suffix, new on every start)")
	fs.IntVar(&c.Shards, "shards", shard.DefaultCount, "shard count; fixed when the cluster is created")
	fs.DurationVar(&c.LeaseTTL, "lease-ttl", election.DefaultLeaseTTL, "etcd lease TTL (whole seconds): a lost replica's shards move within it")
	fs.DurationVar(&c.Interval, "interval", monitor.DefaultInterval, "active reconcile period per host")
	fs.DurationVar(&c.StaleScan, "stale-scan", monitor.DefaultStaleScan, "how often to look for hosts with stale heartbeats")
	fs.DurationVar(&c.UnreachableAfter, "unreachable-after", monitor.DefaultUnreachableAfter, "a host without heartbeat for this long becomes unreachable")
	fs.DurationVar(&c.TransientGrace, "transient-grace", monitor.DefaultRules.TransientGrace, "grace for starting/resuming/pausing/stopping/snapshotting sandboxes missing on their agent")
	fs.DurationVar(&c.SnapshotGrace, "snapshot-grace", monitor.DefaultRules.SnapshotGrace, "grace for a snapshotting sandbox still alive on its agent")
	fs.IntVar(&c.AgentConcurrency, "agent-concurrency", monitor.DefaultAgentConcurrency, "agent calls in flight across the replica (bounds goroutines, connections and file descriptors); calls wait in one queue, reconnects first, so every owned host waits the same")
	fs.DurationVar(&c.JournalRetention, "journal-retention", monitor.DefaultJournalRetention, "how long the vigil_journal rows of owned shards (and stuck destroys' re-send times) are kept (0: forever; else at least --transient-grace)")
	fs.StringVar(&c.HTTPAddr, "http-addr", "127.0.0.1:9090", "admin HTTP listener: /metrics, /healthz, /readyz")
	fs.StringVar(&c.AdvertiseAddr, "advertise-addr", "", "host:port at which the other replicas reach this one's admin listener, published in its member key; they hold a connection to it and revoke this replica's lease as soon as its process dies (default: --http-addr as bound, a wildcard host replaced by this machine's first non-loopback address)")
	fs.BoolVar(&c.DebugPprof, "debug-pprof", false, "also serve Go profiles under /debug/pprof/ on the admin listener")
	fs.DurationVar(&c.AgentTimeout, "agent-timeout", 0, "deadline of every agent RPC (default: 5s, or half of --lease-ttl when that is shorter)")
	fs.IntVar(&c.AgentMaxBytes, "agent-max-response-bytes", agentpool.DefaultMaxResponseBytes, "largest agent answer accepted")
	fs.IntVar(&c.AgentTLSSessions, "agent-tls-sessions", agentpool.DefaultTLSSessions, "agents' TLS sessions kept for resumption, about 4 KiB each (bounds memory); keep it above the hosts a replica owns, or dials beyond the idle connections handshake in full")
	fs.IntVar(&c.AgentMaxIdle, "agent-max-idle-conns", 0, "idle keep-alive connections to agents kept across the replica, one file descriptor each and no goroutine; agents beyond it are dialled anew on each call, resuming TLS sessions. 0: derived from the open-files limit (the limit less --agent-concurrency, --db-max-conns and 256), so that every owned agent keeps its connection")
	fs.DurationVar(&c.AgentIdleTimeout, "agent-idle-timeout", 0, "an agent not called for this long has its idle connection closed and its client dropped (default: 1.5 × --interval, at least 10s)")
	fs.StringVar(&c.AgentCAFile, "agent-ca-file", "", "CA bundle for agent mutual TLS")
	fs.StringVar(&c.AgentCertFile, "agent-cert-file", "", "client certificate for agent mutual TLS")
	fs.StringVar(&c.AgentKeyFile, "agent-key-file", "", "client key for agent mutual TLS")
	fs.StringVar(&c.EventsRedisPassword, "events-redis-password-file", "", passwordFileUsage("events-redis-url"))
	fs.StringVar(&c.EventsRedisURL, "events-redis-url", "", "redis:// or rediss:// URL (with the user for AUTH/ACL; its password in --events-redis-password-file) of the control plane's Redis: each change's notification event reaches its stream exactly once; empty turns events off")
	fs.StringVar(&c.EventsStream, "events-stream", events.DefaultStream, "stream key the control plane's dispatcher reads")
	fs.StringVar(&c.EventsMirror, "events-sse-channel", events.DefaultMirror, "Pub/Sub channel the control plane's dashboard listens on: each event appended to the stream is PUBLISHed there too; empty turns the mirror off")
	fs.DurationVar(&c.EventsMarkerTTL, "events-marker-ttl", events.DefaultMarkerTTL, "how long a published event's id is remembered in Redis: a republish within it is dropped (it must outlast a crash and the failover after it)")
	fs.IntVar(&c.EventsBatch, "events-batch", monitor.DefaultRelayBatch, "events published per Redis round trip")
	fs.BoolVar(&c.Shadow, "shadow", false, "shadow mode, for a cutover beside the control plane's own monitor: own shards, read, ask the agents and decide as usual, but record each change in vigil_shadow_changes instead of making it (no control-plane row, audit row, DestroySandbox, event or volume is touched); compare with `vigil shadow-report`")
}

func (c *replicaConfig) validate() error {
	if c.DatabaseURL == "" {
		return errors.New("--database-url (or $VIGIL_DATABASE_URL) is required")
	}
	if strings.TrimSpace(c.EtcdEndpoints) == "" {
		return errors.New("--etcd-endpoints is empty")
	}
	if err := election.ValidReplicaID(c.ReplicaID); err != nil {
		return fmt.Errorf("--replica-id: %w", err)
	}
	if c.Cluster == "" || strings.Contains(c.Cluster, "/") {
		return fmt.Errorf("--cluster %q must be non-empty without '/'", c.Cluster)
	}
	if err := shard.ValidCount(c.Shards); err != nil {
		return fmt.Errorf("--shards: %w", err)
	}
	if err := election.ValidLeaseTTL(c.LeaseTTL); err != nil {
		return fmt.Errorf("--lease-ttl: %w", err)
	}
	if c.AdvertiseAddr != "" {
		if _, _, err := net.SplitHostPort(c.AdvertiseAddr); err != nil {
			return fmt.Errorf("--advertise-addr %q: want host:port: %w", c.AdvertiseAddr, err)
		}
	}
	if c.Interval < 100*time.Millisecond {
		return fmt.Errorf("--interval %s is too short", c.Interval)
	}
	if c.AgentTimeout == 0 {
		c.AgentTimeout = min(5*time.Second, c.LeaseTTL/2)
	}
	if c.AgentTimeout < 0 || c.AgentTimeout >= c.LeaseTTL {
		// A destroy must finish well inside the lease.
		return fmt.Errorf("--agent-timeout %s must be positive and under --lease-ttl %s", c.AgentTimeout, c.LeaseTTL)
	}
	if c.AgentIdleTimeout == 0 {
		c.AgentIdleTimeout = max(c.Interval*3/2, 10*time.Second)
	}
	if c.AgentIdleTimeout < 0 {
		return fmt.Errorf("--agent-idle-timeout %s must not be negative", c.AgentIdleTimeout)
	}
	if c.AgentConcurrency < 1 {
		return fmt.Errorf("--agent-concurrency %d must be at least 1", c.AgentConcurrency)
	}
	if c.AgentTLSSessions < 1 {
		return fmt.Errorf("--agent-tls-sessions %d must be at least 1", c.AgentTLSSessions)
	}
	if c.AgentMaxIdle < 0 {
		return fmt.Errorf("--agent-max-idle-conns %d must not be negative", c.AgentMaxIdle)
	}
	if c.JournalRetention < 0 {
		return fmt.Errorf("--journal-retention %s must not be negative", c.JournalRetention)
	}
	if c.JournalRetention > 0 && c.JournalRetention < c.TransientGrace {
		// The trim also forgets stuck destroys' re-send times (rule 9).
		return fmt.Errorf("--journal-retention %s must be 0 or at least --transient-grace %s", c.JournalRetention, c.TransientGrace)
	}
	if c.EventsRedisURL != "" && !strings.HasPrefix(c.EventsRedisURL, "redis://") && !strings.HasPrefix(c.EventsRedisURL, "rediss://") {
		return errors.New("--events-redis-url must be a redis:// or rediss:// URL")
	}
	if c.EventsBatch < 1 || c.EventsBatch > 10000 {
		return fmt.Errorf("--events-batch %d must be between 1 and 10000", c.EventsBatch)
	}
	if c.EventsMarkerTTL < time.Minute {
		return fmt.Errorf("--events-marker-ttl %s must be at least 1m", c.EventsMarkerTTL)
	}
	if c.DBMaxConns < 1 {
		return fmt.Errorf("--db-max-conns %d must be at least 1", c.DBMaxConns)
	}
	if (c.EtcdCertFile == "") != (c.EtcdKeyFile == "") {
		return errors.New("--etcd-cert-file and --etcd-key-file go together")
	}
	if _, err := c.etcdPassword(); err != nil {
		return err
	}
	if _, err := c.database().resolve(); err != nil {
		return err
	}
	if _, err := c.eventsRedis().resolve(); err != nil {
		return err
	}
	return nil
}

// database and eventsRedis are the URL flags with their password files.
func (c *replicaConfig) database() *secretURL {
	return &secretURL{name: "database", url: &c.DatabaseURL, passwordFile: &c.DatabasePassword}
}

func (c *replicaConfig) eventsRedis() *secretURL {
	return &secretURL{name: "events-redis", url: &c.EventsRedisURL, passwordFile: &c.EventsRedisPassword}
}

// etcdAuthFlags registers the etcd authentication flags (`run`, `shards`,
// `owner`). There is deliberately no flag for the password itself: a flag
// value shows in ps, in /proc and in shell history.
func (c *replicaConfig) etcdAuthFlags(fs *flag.FlagSet) {
	fs.StringVar(&c.EtcdUsername, "etcd-username", "", "etcd user, for etcd clusters with authentication enabled; its role needs readwrite on --etcd-prefix (docs/etcd-schema.md)")
	fs.StringVar(&c.EtcdPasswordFile, "etcd-password-file", "", "file holding the password of --etcd-username (a trailing newline is ignored); the password is never taken from a flag")
}

// etcdPassword reads the password of --etcd-username from
// --etcd-password-file, trailing newline trimmed; "" without a username.
// Errors name the flags, never the password.
func (c *replicaConfig) etcdPassword() (string, error) {
	switch {
	case c.EtcdUsername == "" && c.EtcdPasswordFile == "":
		return "", nil
	case c.EtcdUsername == "":
		return "", errors.New("--etcd-password-file needs --etcd-username")
	case c.EtcdPasswordFile == "":
		return "", errors.New("--etcd-username needs --etcd-password-file (the password is read only from a file)")
	}
	b, err := os.ReadFile(c.EtcdPasswordFile)
	if err != nil {
		return "", fmt.Errorf("--etcd-password-file: %w", err)
	}
	pw := strings.TrimRight(string(b), "\r\n")
	if pw == "" {
		return "", fmt.Errorf("--etcd-password-file %s is empty", c.EtcdPasswordFile)
	}
	return pw, nil
}

func (c *replicaConfig) etcdTLS() (*tls.Config, error) {
	if c.EtcdCAFile == "" && c.EtcdCertFile == "" {
		return nil, nil
	}
	t := &tls.Config{MinVersion: tls.VersionTLS12}
	if c.EtcdCAFile != "" {
		pem, err := os.ReadFile(c.EtcdCAFile)
		if err != nil {
			return nil, fmt.Errorf("--etcd-ca-file: %w", err)
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("--etcd-ca-file %s holds no PEM certificate", c.EtcdCAFile)
		}
		t.RootCAs = pool
	}
	if c.EtcdCertFile != "" {
		cert, err := tls.LoadX509KeyPair(c.EtcdCertFile, c.EtcdKeyFile)
		if err != nil {
			return nil, fmt.Errorf("--etcd-cert-file/--etcd-key-file: %w", err)
		}
		t.Certificates = []tls.Certificate{cert}
	}
	return t, nil
}

func splitEndpoints(s string) []string {
	var out []string
	for _, e := range strings.Split(s, ",") {
		if e = strings.TrimSpace(e); e != "" {
			out = append(out, e)
		}
	}
	return out
}

// etcdClientConfig is the client configuration of every configured endpoint,
// with the TLS files and the password read. The client's own log (keep-alive
// failures, endpoint switches) goes to log, one level lower (internal/zaplog).
func etcdClientConfig(c *replicaConfig, log hclog.Logger) (clientv3.Config, error) {
	tlsCfg, err := c.etcdTLS()
	if err != nil {
		return clientv3.Config{}, err
	}
	pw, err := c.etcdPassword()
	if err != nil {
		return clientv3.Config{}, err
	}
	return clientv3.Config{
		Endpoints:            splitEndpoints(c.EtcdEndpoints),
		DialTimeout:          c.LeaseTTL / 2,
		DialKeepAliveTime:    c.LeaseTTL / 2,
		DialKeepAliveTimeout: c.LeaseTTL / 3,
		TLS:                  tlsCfg,
		Username:             c.EtcdUsername,
		Password:             pw,
		Logger:               zaplog.New(log),
	}, nil
}

// newEtcdClient connects to every configured endpoint. With a username it
// authenticates at once, so it fails when etcd is unreachable or refuses the
// credentials (see describeEtcdErr); without one it does not wait for etcd.
func newEtcdClient(c *replicaConfig, log hclog.Logger) (*clientv3.Client, error) {
	cfg, err := etcdClientConfig(c, log)
	if err != nil {
		return nil, err
	}
	cli, err := clientv3.New(cfg)
	if err != nil {
		return nil, describeEtcdErr(c, err)
	}
	return cli, nil
}

// etcdRefused reports whether etcd refused our credentials or permissions:
// no retry changes that.
func etcdRefused(err error) bool {
	return errors.Is(err, rpctypes.ErrAuthFailed) || errors.Is(err, rpctypes.ErrUserEmpty) || errors.Is(err, rpctypes.ErrPermissionDenied)
}

// describeEtcdErr turns etcd's refusals of our credentials or permissions
// into errors that name the flags to fix (still matching etcd's error);
// other errors (etcd unreachable) pass unchanged.
func describeEtcdErr(c *replicaConfig, err error) error {
	prefix := "/" + strings.Trim(c.EtcdPrefix, "/") + "/"
	switch {
	case errors.Is(err, rpctypes.ErrAuthFailed):
		return fmt.Errorf("etcd rejected --etcd-username %q with the password in --etcd-password-file %s: %w", c.EtcdUsername, c.EtcdPasswordFile, err)
	case errors.Is(err, rpctypes.ErrUserEmpty):
		return fmt.Errorf("etcd has authentication enabled: set --etcd-username and --etcd-password-file (%w)", err)
	case errors.Is(err, rpctypes.ErrPermissionDenied):
		return fmt.Errorf("etcd user %q may not read and write under %s (--etcd-prefix); grant its role that prefix: etcdctl role grant-permission --prefix=true <role> readwrite %s (%w)",
			c.EtcdUsername, prefix, prefix, err)
	}
	return err
}

// connectEtcd connects and proves that etcd lets this replica read and write
// its cluster's keys before it joins, so refused credentials or permissions
// end the start with a message naming the flag instead of a session retried
// forever. While etcd is unreachable it retries (only an authenticating client
// waits for etcd here; without a username the replica starts and its
// election retries, as before). It returns ctx's error when ctx ends first.
func connectEtcd(ctx context.Context, c *replicaConfig, root string, log hclog.Logger) (*clientv3.Client, error) {
	cfg, err := etcdClientConfig(c, log)
	if err != nil {
		return nil, err
	}
	delay := 200 * time.Millisecond
	for {
		cli, err := clientv3.New(cfg)
		if err == nil {
			err = checkEtcdAccess(ctx, cli, c.LeaseTTL/2, root)
			if err == nil || !etcdRefused(err) {
				if err != nil {
					log.Warn("etcd not reachable yet; joining once it is", "error", err)
				}
				return cli, nil
			}
			cli.Close()
		}
		if etcdRefused(err) {
			return nil, describeEtcdErr(c, err)
		}
		log.Warn("etcd not reachable; retrying", "endpoints", c.EtcdEndpoints, "error", err, "retry_in", delay)
		t := time.NewTimer(delay)
		select {
		case <-ctx.Done():
			t.Stop()
			return nil, ctx.Err()
		case <-t.C:
		}
		delay = min(2*delay, 5*time.Second)
	}
}

// checkEtcdAccess asks etcd whether this client may read the cluster's keys
// (as a range: that is what the watch needs) and write them. It writes
// nothing: the transaction's compare can never hold, and etcd checks the
// permissions of both branches before evaluating it. Lease grants and
// keep-alives need no permission.
func checkEtcdAccess(ctx context.Context, cli *clientv3.Client, timeout time.Duration, root string) error {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	config := root + "/config"
	_, err := cli.Txn(ctx).
		If(clientv3.Compare(clientv3.CreateRevision(config), "<", 0)).
		Then(clientv3.OpPut(config, "")).
		Else(clientv3.OpGet(root+"/", clientv3.WithPrefix(), clientv3.WithCountOnly())).
		Commit()
	return err
}

// runReplica runs one replica until ctx ends, then hands its shards over.
// ready, when not nil, is called once the admin listener is bound.
func runReplica(ctx context.Context, c replicaConfig, log hclog.Logger, boundAddr func(string)) error {
	if err := c.validate(); err != nil {
		return usageErr(err)
	}
	setMemoryLimit(log)
	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}), buildinfo.NewCollector())
	dbURL, err := c.database().resolve()
	if err != nil {
		return usageErr(err)
	}
	lockT, stmtT, idleT := store.SessionTimeoutsFor(c.LeaseTTL)
	st, err := store.Open(ctx, store.Config{
		URL: dbURL, MaxConns: int32(c.DBMaxConns),
		LockTimeout: lockT, StatementTimeout: stmtT, IdleInTransactionSessionTimeout: idleT,
		ApplicationName: "vigil " + c.ReplicaID, Registerer: reg, Logger: log.Named("store"),
	})
	if err != nil {
		return err
	}
	defer st.Close()
	pool, err := agentpool.New(agentpool.Config{
		Timeout: c.AgentTimeout, MaxResponseBytes: c.AgentMaxBytes,
		MaxIdleConns: idleConns(c, log), IdleTimeout: c.AgentIdleTimeout, TLSSessions: c.AgentTLSSessions,
		CAFile: c.AgentCAFile, CertFile: c.AgentCertFile, KeyFile: c.AgentKeyFile,
		Logger: log.Named("agents"), Registerer: reg,
	})
	if err != nil {
		return usageErr(err)
	}
	defer pool.Close()
	mcfg := monitor.Config{
		Rules:            monitor.Rules{TransientGrace: c.TransientGrace, SnapshotGrace: c.SnapshotGrace},
		UnreachableAfter: c.UnreachableAfter, AgentConcurrency: c.AgentConcurrency,
		RelayBatch: c.EventsBatch, Shadow: c.Shadow, Logger: log.Named("reconcile"), Registerer: reg,
	}
	switch {
	case c.Shadow:
		log.Warn("shadow mode: changes are recorded in vigil_shadow_changes, not made; compare with vigil shadow-report", "events", "off")
	case c.EventsRedisURL != "":
		redisURL, err := c.eventsRedis().resolve()
		if err != nil {
			return usageErr(err)
		}
		pub, err := events.New(events.Config{URL: redisURL, Stream: c.EventsStream, Mirror: c.EventsMirror, MarkerTTL: c.EventsMarkerTTL})
		if err != nil {
			return usageErr(fmt.Errorf("--events-redis-url: %w", err))
		}
		defer pub.Close()
		mcfg.Publisher, mcfg.Outbox = pub, st
		log.Info("events on", "stream", c.EventsStream, "mirror", c.EventsMirror)
	}
	rec, err := monitor.New(mcfg, st, pool)
	if err != nil {
		return usageErr(err)
	}
	runner, err := monitor.NewRunner(monitor.RunnerConfig{
		Replica: c.ReplicaID, Shards: c.Shards, Interval: c.Interval, StaleScan: c.StaleScan,
		JournalRetention: c.JournalRetention, Logger: log.Named("monitor"),
	}, rec, st)
	if err != nil {
		return usageErr(err)
	}
	layout := election.NewLayout(c.EtcdPrefix, c.Cluster)
	cli, err := connectEtcd(ctx, &c, layout.Root, log.Named("etcd"))
	if err != nil {
		if ctx.Err() != nil {
			return nil
		}
		return err
	}
	defer cli.Close()

	ln, err := net.Listen("tcp", c.HTTPAddr)
	if err != nil {
		return fmt.Errorf("--http-addr %s: %w", c.HTTPAddr, err)
	}
	node, err := election.New(election.Config{
		Client: cli, Layout: layout,
		ReplicaID: c.ReplicaID, Addr: advertiseAddr(c.AdvertiseAddr, ln.Addr()), Shards: c.Shards, LeaseTTL: c.LeaseTTL,
		Worker: runner, Logger: log.Named("election"), Registerer: reg,
	})
	if err != nil {
		ln.Close()
		return usageErr(err)
	}
	srv := &http.Server{Handler: adminMux(reg, node, st, c.DebugPprof), ReadHeaderTimeout: 5 * time.Second}
	if boundAddr != nil {
		boundAddr(ln.Addr().String())
	}
	build := buildinfo.Get()
	log.Info("replica starting", "version", build.Version, "revision", build.Revision, "cluster", c.Cluster, "shards", c.Shards,
		"lease_ttl", c.LeaseTTL, "admin", ln.Addr().String(), "etcd_user", c.EtcdUsername)

	rctx, stopRunner := context.WithCancel(context.Background())
	defer stopRunner()
	var wg sync.WaitGroup
	wg.Add(2)
	go func() { defer wg.Done(); runner.Run(rctx) }()
	go func() {
		defer wg.Done()
		if err := srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			log.Error("admin listener failed", "error", err)
		}
	}()
	// The node hands shards over when ctx ends; the runner's replica-wide
	// loops and the admin listener outlive it so the handover is observable.
	err = node.Run(ctx)
	stopRunner()
	sctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	_ = srv.Shutdown(sctx)
	cancel()
	wg.Wait()
	if err != nil {
		return err
	}
	log.Info("replica stopped")
	return nil
}

func adminMux(reg *prometheus.Registry, node *election.Node, st *store.Store, debugPprof bool) *http.ServeMux {
	mux := http.NewServeMux()
	if debugPprof {
		mux.HandleFunc("/debug/pprof/", pprof.Index)
		mux.HandleFunc("/debug/pprof/cmdline", pprof.Cmdline)
		mux.HandleFunc("/debug/pprof/profile", pprof.Profile)
		mux.HandleFunc("/debug/pprof/symbol", pprof.Symbol)
		mux.HandleFunc("/debug/pprof/trace", pprof.Trace)
	}
	mux.Handle("/metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{Registry: reg}))
	mux.Handle(election.PeerPath, node.PeerHandler())
	mux.HandleFunc("/healthz", func(w http.ResponseWriter, _ *http.Request) {
		fmt.Fprintln(w, "ok")
	})
	mux.HandleFunc("/readyz", func(w http.ResponseWriter, r *http.Request) {
		var problems []string
		if !node.SessionValid() {
			problems = append(problems, "etcd session not valid")
		}
		ctx, cancel := context.WithTimeout(r.Context(), time.Second)
		if err := st.Ping(ctx); err != nil {
			problems = append(problems, "postgres unreachable: "+err.Error())
		}
		cancel()
		if !node.InitialShardsAcquired() {
			problems = append(problems, "initial shards not acquired yet")
		}
		if len(problems) > 0 {
			w.WriteHeader(http.StatusServiceUnavailable)
			fmt.Fprintln(w, strings.Join(problems, "\n"))
			return
		}
		fmt.Fprintf(w, "ok: %d shards owned\n", len(node.Owned()))
	})
	return mux
}

// advertiseAddr is where the other replicas reach this one's admin
// listener: flag when set, else the bound address with a wildcard host
// replaced by the first non-loopback address of this machine (a pod's IP).
func advertiseAddr(flag string, bound net.Addr) string {
	if flag != "" {
		return flag
	}
	ta, ok := bound.(*net.TCPAddr)
	if !ok || !ta.IP.IsUnspecified() {
		return bound.String()
	}
	addrs, _ := net.InterfaceAddrs()
	for _, a := range addrs {
		if ipn, ok := a.(*net.IPNet); ok && !ipn.IP.IsLoopback() && ipn.IP.To4() != nil {
			return net.JoinHostPort(ipn.IP.String(), strconv.Itoa(ta.Port))
		}
	}
	return net.JoinHostPort("127.0.0.1", strconv.Itoa(ta.Port))
}

func newHTTPServer(h http.Handler) *http.Server {
	return &http.Server{Handler: h, ReadHeaderTimeout: 5 * time.Second}
}
