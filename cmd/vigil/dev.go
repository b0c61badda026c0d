//go:build dev

package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/url"
	"os"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/jackc/pgx/v5"
	"go.uber.org/zap"

	"github.com/vigil-sh/vigil/agentsim"
	"github.com/vigil-sh/vigil/events"
	"github.com/vigil-sh/vigil/internal/cli"
	"github.com/vigil-sh/vigil/internal/devcerts"
	"github.com/vigil-sh/vigil/internal/embedetcd"
	"github.com/vigil-sh/vigil/monitor"
	"github.com/vigil-sh/vigil/store"
)

func runDev(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := cli.NewFlagSet("vigil dev", "Run a whole local cluster in one process: embedded etcd, a migrated local database, simulated agents with sandbox churn, and several replicas. Ctrl-C stops everything.", stderr)
	dbURL := fs.String("database-url", "postgres://vigil:vigil@127.0.0.1:5432/vigil_dev?sslmode=disable", "Postgres URL; the database is created if absent")
	replicas := fs.Int("replicas", 3, "number of replicas")
	hosts := fs.Int("hosts", 300, "simulated hosts")
	sandboxes := fs.Int("sandboxes-per-host", 4, "sandboxes seeded per host")
	churn := fs.Float64("churn", 5, "control-plane sandbox operations per second")
	shards := fs.Int("shards", 256, "shard count")
	ttl := fs.Duration("lease-ttl", 5*time.Second, "etcd lease TTL of the replicas")
	interval := fs.Duration("interval", 10*time.Second, "active reconcile period")
	etcdClient := fs.String("etcd-client-addr", "127.0.0.1:2379", "embedded etcd client address (port 0: any free port)")
	etcdPeer := fs.String("etcd-peer-addr", "127.0.0.1:2380", "embedded etcd peer address (port 0: any free port)")
	etcdDir := fs.String("etcd-dir", "", "embedded etcd data directory (default: a fresh temporary directory)")
	httpBase := fs.Int("http-base-port", 9090, "admin port of the first replica; the others follow (0: any free port for each)")
	simAdmin := fs.String("agentsim-admin-addr", "127.0.0.1:7070", "agent simulator control API (port 0: any free port)")
	cluster := fs.String("cluster", "dev", "cluster name")
	logFormat := fs.String("log-format", "text", "log format: text or json")
	logLevel := fs.String("log-level", "info", "log level")
	agentTLS := fs.Bool("agent-tls", false, "run the agents and the replicas over mutual TLS with a throwaway CA made for this run")
	eventsURL := fs.String("events-redis-url", "redis://127.0.0.1:6379/0", "Redis for the notification events, used when it answers (empty: events off)")
	eventsStream := fs.String("events-stream", "vigil-dev:events", "stream key of the dev cluster's events")
	mishaps := fs.Float64("mishaps", 0.2, "mishaps per second for the rules to meet: VMs that vanish, lost destroys, creates cut short, unannounced pauses, zombies, host outages")
	shadow := fs.Bool("shadow", false, "a shadow cutover: the agent simulator also runs the control plane's own monitor loop, and the replicas run with --shadow beside it (recording instead of changing); compare with vigil shadow-report")
	if err := cli.Parse(fs, args); err != nil {
		return usageErr(err)
	}
	log, err := cli.NewLogger("vigil-dev", *logFormat, *logLevel, stderr)
	if err != nil {
		return usageErr(err)
	}
	if *replicas < 1 || *replicas > 32 {
		return usageErr(fmt.Errorf("--replicas %d out of range 1..32", *replicas))
	}

	if err := createDatabase(ctx, *dbURL); err != nil {
		return err
	}
	if err := store.Migrate(ctx, *dbURL, store.Schema{ControlPlane: true, Volumes: true}); err != nil {
		return err
	}
	log.Info("database ready", "url", *dbURL)

	dir := *etcdDir
	if dir == "" {
		d, err := os.MkdirTemp("", "vigil-dev-etcd-")
		if err != nil {
			return err
		}
		defer os.RemoveAll(d)
		dir = d
	}
	etcd, err := embedetcd.StartEmbedded(ctx, embedetcd.EmbedConfig{Name: "vigil-dev", Dir: dir, ClientURL: embedURL(*etcdClient), PeerURL: embedURL(*etcdPeer),
		Logger: zap.NewNop()}) // its shutdown chatter would bury the replicas' logs
	if err != nil {
		return fmt.Errorf("embedded etcd: %w", err)
	}
	defer etcd.Close()
	endpoint := strings.TrimPrefix(embedetcd.ClientEndpoints(etcd)[0], "http://")
	log.Info("embedded etcd ready", "endpoint", endpoint, "dir", dir)

	simCfg := agentsim.Config{
		DatabaseURL: *dbURL, Hosts: *hosts, SandboxesPerHost: *sandboxes, ChurnPerSecond: *churn,
		ChurnStepDelay: 500 * time.Millisecond, SharedFraction: 0.2, HeartbeatInterval: 5 * time.Second,
		MishapsPerSecond: *mishaps, Logger: log.Named("agentsim"), Seed: 1, // the same hosts on every run
	}
	unreachableAfter := devUnreachableAfter
	if *shadow {
		// Beside the control plane's monitor both must judge staleness alike.
		simCfg.MonitorInterval, unreachableAfter = *interval, monitor.DefaultUnreachableAfter
	}
	var pki devcerts.Files
	if *agentTLS {
		d, err := os.MkdirTemp("", "vigil-dev-pki-")
		if err != nil {
			return err
		}
		defer os.RemoveAll(d)
		if pki, err = devcerts.Generate(d); err != nil {
			return fmt.Errorf("--agent-tls: %w", err)
		}
		// The CA is the agents' issuer: each host gets a leaf for its own IP.
		simCfg.CAFile, simCfg.CertFile, simCfg.KeyFile = pki.CA, pki.CA, pki.CAKey
		log.Info("agents speak mutual TLS", "ca", pki.CA)
	}
	sim, err := agentsim.New(simCfg)
	if err != nil {
		return err
	}
	runCtx, cancel := context.WithCancel(ctx)
	defer cancel()
	var wg sync.WaitGroup
	errs := make(chan error, *replicas+2)
	wg.Add(1)
	go func() {
		defer wg.Done()
		if err := sim.Run(runCtx); err != nil {
			errs <- fmt.Errorf("agentsim: %w", err)
		}
	}()
	select {
	case <-sim.Ready():
	case err := <-errs:
		return err
	case <-ctx.Done():
		return nil
	}
	if *simAdmin != "" {
		ln, err := net.Listen("tcp", *simAdmin)
		if err != nil {
			return fmt.Errorf("--agentsim-admin-addr: %w", err)
		}
		*simAdmin = ln.Addr().String() // the port it got, for the banner
		srv := newHTTPServer(sim.AdminHandler())
		go func() { _ = srv.Serve(ln) }()
		defer srv.Close()
	}

	redisURL := *eventsURL
	if *shadow {
		redisURL = "" // shadow mode publishes nothing
	}
	if redisURL != "" {
		if err := pingRedis(ctx, redisURL); err != nil {
			log.Warn("Redis does not answer: events off", "url", redisURL, "error", err)
			redisURL = ""
		}
	}
	bound := make([]chan string, *replicas)
	for i := 0; i < *replicas; i++ {
		c := defaultReplicaConfig() // `vigil run`'s defaults, but for:
		c.EtcdEndpoints, c.DatabaseURL, c.Cluster, c.Shards = endpoint, *dbURL, *cluster, *shards
		c.ReplicaID = fmt.Sprintf("dev-%d-%s", i+1, randSuffix())
		c.LeaseTTL, c.Interval, c.UnreachableAfter = *ttl, *interval, unreachableAfter
		c.HTTPAddr = net.JoinHostPort("127.0.0.1", strconv.Itoa(adminPort(*httpBase, i)))
		c.EventsRedisURL, c.EventsStream, c.Shadow = redisURL, *eventsStream, *shadow
		// The replicas share this process's open-files limit: each gets its
		// share of the budget one replica alone would derive.
		limit, known := openFilesLimit()
		c.AgentMaxIdle = max(1, agentConnBudget(limit, known, c) / *replicas)
		if *agentTLS {
			c.AgentCAFile, c.AgentCertFile, c.AgentKeyFile = pki.CA, pki.ClientCert, pki.ClientKey
		}
		bound[i] = make(chan string, 1)
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := runReplica(runCtx, c, log.Named(c.ReplicaID), func(a string) { bound[i] <- a }); err != nil {
				errs <- fmt.Errorf("replica %s: %w", c.ReplicaID, err)
			}
		}()
	}

	addrs, first := boundAddrs(ctx, bound, errs)
	if first == nil && ctx.Err() == nil {
		fmt.Fprintf(stdout, `
vigil dev is running: %d replicas, %d simulated hosts, %d shards, lease TTL %s, agents over %s.

  metrics:    %s
  readiness:  http://%s/readyz
  ownership:  go tool etcdctl --endpoints=%s get --prefix /vigil/%s/shards/
              go run ./cmd/vigil shards --etcd-endpoints=%s --cluster=%s
  one host:   go run ./cmd/vigil owner <host-uuid> --etcd-endpoints=%s --cluster=%s
  agents:     curl http://%s/hosts   (POST /hosts/<id>/mode {"kind":"dead"} to kill one)
  database:   psql '%s'
  events:     %s%s

Ctrl-C stops everything.
`, *replicas, *hosts, *shards, *ttl, transport(*agentTLS), metricsURLs(addrs), addrs[0], endpoint, *cluster, endpoint, *cluster, endpoint, *cluster, *simAdmin, *dbURL, eventsLine(redisURL, *eventsStream, *shadow), shadowLine(*shadow, *dbURL))
		select {
		case <-ctx.Done():
		case first = <-errs:
		}
	}
	if first != nil {
		log.Error("stopping after a failure", "error", first)
	}
	cancel()
	wg.Wait()
	log.Info("dev cluster stopped")
	return first
}

// boundAddrs waits until every replica listens and returns their admin
// addresses in order, or the first replica's failure, or nothing when ctx
// ends first.
func boundAddrs(ctx context.Context, bound []chan string, errs <-chan error) ([]string, error) {
	addrs := make([]string, len(bound))
	for i, ch := range bound {
		select {
		case addrs[i] = <-ch:
		case err := <-errs:
			return nil, err
		case <-ctx.Done():
			return nil, nil
		}
	}
	return addrs, nil
}

// adminPort is replica i's admin port: base+i, or 0 (any) when base is 0.
func adminPort(base, i int) int {
	if base == 0 {
		return 0
	}
	return base + i
}

// embedURL is the embedded etcd's URL for addr; empty (the embedder picks a
// free port and retries if another process takes it first) for port 0.
func embedURL(addr string) string {
	if _, port, err := net.SplitHostPort(addr); err == nil && port == "0" {
		return ""
	}
	return "http://" + addr
}

// devUnreachableAfter is the dev cluster's heartbeat threshold: shorter than
// the control plane's 90 s, so a host killed in a demo goes down soon.
const devUnreachableAfter = 30 * time.Second

func shadowLine(shadow bool, dbURL string) string {
	if !shadow {
		return ""
	}
	return fmt.Sprintf("\n  shadow:     the control plane's monitor changes, the replicas record; compare with\n              go run ./cmd/vigil shadow-report --since 10m --database-url '%s'", dbURL)
}

func eventsLine(url, stream string, shadow bool) string {
	switch {
	case shadow:
		return "off (shadow mode publishes nothing)"
	case url == "":
		return "off (no Redis)"
	}
	return fmt.Sprintf("redis-cli -u %s XRANGE %s - +", url, stream)
}

// pingRedis checks that Redis answers within a second.
func pingRedis(ctx context.Context, url string) error {
	p, err := events.New(events.Config{URL: url, Timeout: time.Second})
	if err != nil {
		return err
	}
	defer p.Close()
	ctx, cancel := context.WithTimeout(ctx, time.Second)
	defer cancel()
	return p.Ping(ctx)
}

func transport(tls bool) string {
	if tls {
		return "mutual TLS"
	}
	return "plain HTTP"
}

func metricsURLs(addrs []string) string {
	s := ""
	for i, a := range addrs {
		if i > 0 {
			s += "\n              "
		}
		s += "http://" + a + "/metrics"
	}
	return s
}

func randSuffix() string {
	var b [2]byte
	_, _ = randRead(b[:])
	return fmt.Sprintf("%x", b)
}

// createDatabase creates the URL's database if it does not exist, through
// the server's postgres database.
func createDatabase(ctx context.Context, dbURL string) error {
	u, err := url.Parse(dbURL)
	if err != nil {
		return usageErr(fmt.Errorf("--database-url: %w", err))
	}
	name := u.Path
	if len(name) > 0 && name[0] == '/' {
		name = name[1:]
	}
	if name == "" {
		return usageErr(errors.New("--database-url names no database"))
	}
	admin := *u
	admin.Path = "/postgres"
	conn, err := pgx.Connect(ctx, admin.String())
	if err != nil {
		return fmt.Errorf("connect to %s: %w (is PostgreSQL running? scripts/ensure-postgres.sh starts it)", admin.Redacted(), err)
	}
	defer conn.Close(context.Background())
	var exists bool
	if err := conn.QueryRow(ctx, `select exists (select 1 from pg_database where datname = $1)`, name).Scan(&exists); err != nil {
		return err
	}
	if exists {
		return nil
	}
	_, err = conn.Exec(ctx, "create database "+pgx.Identifier{name}.Sanitize())
	return err
}
