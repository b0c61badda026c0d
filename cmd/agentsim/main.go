// Command agentsim runs simulated host agents for many hosts in one process:
// it registers them in the control plane's database, heartbeats for them,
// churns sandboxes, and serves the agent RPC plus a control API for fault
// injection. See package agentsim for the behaviour and the control API.
// The agent RPC is plain HTTP/1.1, or mutual TLS with --tls-ca-file,
// --tls-cert-file and --tls-key-file; --latency delays every answer.
//
// Every flag has an environment twin: --heartbeat-interval is
// VIGIL_HEARTBEAT_INTERVAL, and so on; --config names a file of flags.
// Command-line flags win over the environment, which wins over the file.
// Invalid settings exit with status 2 and name the flag.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/hashicorp/go-hclog"
	"golang.org/x/sync/errgroup"

	"github.com/vigil-sh/vigil/agentsim"
	"github.com/vigil-sh/vigil/internal/cli"
)

func main() {
	os.Exit(run(os.Args[1:], os.Stderr))
}

// options are the parsed flags.
type options struct {
	cfg       agentsim.Config
	adminAddr string
	logLevel  string
	logFormat string
}

// flagFor maps agentsim.Config fields to the flags that set them.
var flagFor = map[string]string{
	"DatabaseURL":       "database-url",
	"Hosts":             "hosts",
	"ListenAddr":        "listen",
	"HeartbeatInterval": "heartbeat-interval",
	"Teams":             "teams",
	"SharedFraction":    "shared-fraction",
	"SandboxesPerHost":  "sandboxes-per-host",
	"ChurnPerSecond":    "churn",
	"ChurnConcurrency":  "churn-concurrency",
	"ChurnStepDelay":    "churn-step-delay",
	"Seed":              "seed",
	"AddressOffset":     "address-offset",
	"CAFile":            "tls-ca-file",
	"CertFile":          "tls-cert-file",
	"KeyFile":           "tls-key-file",
	"Latency":           "latency",
	"MonitorInterval":   "monitor-interval",
	"MishapsPerSecond":  "mishaps",
}

// usageError is a bad setting; the command exits 2.
type usageError struct{ msg string }

func (e *usageError) Error() string { return e.msg }

const synopsis = "Simulated host agents for many hosts in one process.\n\n" +
	"The agent listener is plain HTTP/1.1 unless --tls-ca-file, --tls-cert-file and --tls-key-file are all set:\n" +
	"then it requires mutual TLS, as production agents do. A dev CA serves as both CA and serving certificate\n" +
	"(--tls-ca-file ca.pem --tls-cert-file ca.pem --tls-key-file ca-key.pem)."

func parseFlags(args []string, stderr io.Writer) (options, error) {
	var o options
	fs := cli.NewFlagSet("agentsim [flags]", synopsis, stderr)
	c := &o.cfg
	fs.StringVar(&c.DatabaseURL, "database-url", "", "control plane Postgres URL (required)")
	fs.IntVar(&c.Hosts, "hosts", 100, "number of simulated hosts")
	fs.StringVar(&c.ListenAddr, "listen", agentsim.DefaultListenAddr, "agent RPC listener; must be a wildcard address, each host gets its own 127.x.y.z on this port")
	fs.StringVar(&o.adminAddr, "admin-addr", "127.0.0.1:7070", "control API listener (empty disables)")
	fs.DurationVar(&c.HeartbeatInterval, "heartbeat-interval", agentsim.DefaultHeartbeatInterval, "heartbeat period; negative disables")
	fs.IntVar(&c.Teams, "teams", agentsim.DefaultTeams, "number of distinct teams")
	fs.Float64Var(&c.SharedFraction, "shared-fraction", 0.2, "fraction of hosts that are shared (team_id NULL), 0..1")
	fs.IntVar(&c.SandboxesPerHost, "sandboxes-per-host", 2, "sandboxes seeded on each host at start")
	fs.Float64Var(&c.ChurnPerSecond, "churn", 1, "sandbox operations per second (create, pause, resume, snapshot, destroy); 0 disables")
	fs.IntVar(&c.ChurnConcurrency, "churn-concurrency", agentsim.DefaultChurnConcurrency, "churn operations in flight at most")
	fs.DurationVar(&c.ChurnStepDelay, "churn-step-delay", 500*time.Millisecond, "time the agent spends between the steps of one operation; negative for none")
	fs.IntVar(&c.AddressOffset, "address-offset", 0, "host i listens on the address of index offset+i, so several agentsim processes on one machine give their hosts distinct IPs")
	fs.Int64Var(&c.Seed, "seed", 0, "seed for host, team and sandbox ids; 0 is random, a fixed seed re-registers the same hosts")
	fs.StringVar(&c.CAFile, "tls-ca-file", "", "mutual TLS on the agent listener: PEM CA bundle that client certificates must be signed by (with --tls-cert-file and --tls-key-file)")
	fs.StringVar(&c.CertFile, "tls-cert-file", "", "mutual TLS: PEM serving certificate; if it is a CA, each host gets a certificate for its own IP minted from it")
	fs.StringVar(&c.KeyFile, "tls-key-file", "", "mutual TLS: PEM private key of --tls-cert-file")
	fs.DurationVar(&c.Latency, "latency", 0, "delay of every agent answer, on top of a fault mode's own (e.g. 2ms)")
	fs.DurationVar(&c.MonitorInterval, "monitor-interval", 0, "also run the control plane's own monitor loop (the one vigil replaces) at this period, for a shadow cutover; 0 does not")
	fs.Float64Var(&c.MishapsPerSecond, "mishaps", 0, "mishaps per second for the reconcile rules to meet: VMs that vanish, lost destroys, creates cut short, unannounced pauses, zombies, host outages; 0 disables")
	fs.StringVar(&o.logLevel, "log-level", "info", "log level: trace, debug, info, warn, error")
	fs.StringVar(&o.logFormat, "log-format", "text", "log format: text or json")
	// Command line, then the VIGIL_* environment twins, then --config.
	pos, err := cli.ParsePositional(fs, args)
	var se *cli.SettingError
	if errors.As(err, &se) {
		return o, &usageError{se.Error()}
	}
	if err != nil {
		return o, err
	}
	if len(pos) > 0 {
		return o, &usageError{fmt.Sprintf("unexpected argument %q", pos[0])}
	}
	if c.DatabaseURL == "" {
		return o, &usageError{"--database-url (or VIGIL_DATABASE_URL) is required"}
	}
	if hclog.LevelFromString(o.logLevel) == hclog.NoLevel {
		return o, &usageError{fmt.Sprintf("--log-level %q: want trace, debug, info, warn or error", o.logLevel)}
	}
	if o.logFormat != "text" && o.logFormat != "json" {
		return o, &usageError{fmt.Sprintf("--log-format %q: want text or json", o.logFormat)}
	}
	if o.adminAddr != "" {
		if _, _, err := net.SplitHostPort(o.adminAddr); err != nil {
			return o, &usageError{fmt.Sprintf("--admin-addr %q: %v", o.adminAddr, err)}
		}
	}
	return o, nil
}

func run(args []string, stderr io.Writer) int {
	o, err := parseFlags(args, stderr)
	if errors.Is(err, flag.ErrHelp) {
		return 0
	}
	if err != nil {
		var ue *usageError
		if errors.As(err, &ue) {
			fmt.Fprintf(stderr, "agentsim: %v\n", err)
		} // the flag package has already printed its own errors
		return 2
	}
	log := hclog.New(&hclog.LoggerOptions{
		Name:       "agentsim",
		Level:      hclog.LevelFromString(o.logLevel),
		JSONFormat: o.logFormat == "json",
		Output:     stderr,
	})
	o.cfg.Logger = log
	sim, err := agentsim.New(o.cfg)
	if err != nil {
		var ce *agentsim.ConfigError
		if errors.As(err, &ce) {
			name := flagFor[ce.Field]
			fmt.Fprintf(stderr, "agentsim: invalid --%s: %s\n", name, ce.Msg)
			return 2
		}
		fmt.Fprintf(stderr, "agentsim: %v\n", err)
		return 1
	}

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	g, ctx := errgroup.WithContext(ctx)
	g.Go(func() error { return sim.Run(ctx) })
	if o.adminAddr != "" {
		ln, err := net.Listen("tcp", o.adminAddr)
		if err != nil {
			log.Error("admin listener", "addr", o.adminAddr, "error", err)
			stop()
			_ = g.Wait()
			return 1
		}
		g.Go(func() error { return serveAdmin(ctx, ln, sim, log) })
	}
	g.Go(func() error {
		select {
		case <-sim.Ready():
			ids := sim.HostIDs()
			log.Info("ready", "hosts", len(ids), "port", sim.Port(), "first_host", ids[0], "first_address", sim.Address(ids[0]))
		case <-ctx.Done():
		}
		return nil
	})
	if err := g.Wait(); err != nil {
		log.Error("stopped", "error", err)
		return 1
	}
	return 0
}

// serveAdmin serves the control API plus /healthz and /readyz until ctx ends.
func serveAdmin(ctx context.Context, ln net.Listener, sim *agentsim.Sim, log hclog.Logger) error {
	mux := http.NewServeMux()
	mux.Handle("/", sim.AdminHandler())
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, r *http.Request) {
		_, _ = io.WriteString(w, "ok\n")
	})
	mux.HandleFunc("GET /readyz", func(w http.ResponseWriter, r *http.Request) {
		select {
		case <-sim.Ready():
			_, _ = io.WriteString(w, "ready\n")
		default:
			http.Error(w, "registering hosts", http.StatusServiceUnavailable)
		}
	})
	srv := &http.Server{
		Handler:           mux,
		ReadHeaderTimeout: 10 * time.Second,
		ErrorLog:          log.Named("admin").StandardLogger(&hclog.StandardLoggerOptions{InferLevels: true}),
	}
	log.Info("control API listening", "addr", ln.Addr().String())
	errc := make(chan error, 1)
	go func() { errc <- srv.Serve(ln) }()
	select {
	case err := <-errc:
		return fmt.Errorf("admin listener: %w", err)
	case <-ctx.Done():
	}
	sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	_ = srv.Shutdown(sctx)
	<-errc
	return nil
}
