// Package embedetcd starts a single-member etcd server inside the current
// process. `vigil dev` uses it for its local cluster and internal/etcdtest for
// tests; production replicas talk to a real etcd cluster and never embed one.
package embedetcd

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/url"
	"syscall"

	"go.etcd.io/etcd/server/v3/embed"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
)

// Defaults applied by StartEmbedded to zero fields of EmbedConfig.
const (
	DefaultName       = "vigil-embedded"
	DefaultLogLevel   = "error"
	DefaultTickMs     = 50
	DefaultElectionMs = 500

	// bindAttempts bounds how often StartEmbedded picks new free ports after
	// another process took a picked port between the pick and etcd's bind.
	bindAttempts = 10
)

// EmbedConfig describes one embedded etcd member. The zero value of every
// field but Dir is usable.
type EmbedConfig struct {
	// Name is the member name (default DefaultName).
	Name string
	// Dir is the data directory; required. A directory that already holds a
	// member's data is reopened, so a dev cluster survives restarts.
	Dir string
	// ClientURL is the client listen and advertise URL, e.g.
	// "http://127.0.0.1:2379". Empty picks a free loopback port.
	ClientURL string
	// PeerURL is the peer listen and advertise URL. Empty picks a free
	// loopback port. Only the member itself uses it.
	PeerURL string
	// LogLevel is the level of etcd's own zap logger writing to stderr:
	// "debug", "info", "warn" or "error" (default). Ignored when Logger is set.
	LogLevel string
	// Logger, when set, receives etcd's logs instead (zap.NewNop() silences it).
	Logger *zap.Logger
	// TickMs and ElectionMs are the raft heartbeat and election timeouts
	// (defaults 50 and 500: fast, which a single member on loopback affords).
	TickMs, ElectionMs uint
	// UnsafeNoFsync skips fsync: faster, but a crash of the machine can lose
	// or corrupt data. For tests only.
	UnsafeNoFsync bool
}

// StartEmbedded starts the member described by cfg and returns once it serves
// client requests. ctx bounds only the start: once StartEmbedded returns, the
// server runs until the caller calls Close on it, once (embed.Etcd's Close
// panics when called twice), which stops every goroutine it started and
// releases its ports but keeps the data directory.
//
// When ClientURL or PeerURL is empty, StartEmbedded picks free loopback ports
// and, if one is taken by someone else before etcd binds it, tries again with
// new ones. On error nothing is left running.
func StartEmbedded(ctx context.Context, cfg EmbedConfig) (*embed.Etcd, error) {
	if cfg.Dir == "" {
		return nil, errors.New("embedetcd: Dir is required")
	}
	var lastErr error
	for attempt := 0; attempt < bindAttempts; attempt++ {
		if err := ctx.Err(); err != nil {
			return nil, fmt.Errorf("embedetcd: start: %w", err)
		}
		ecfg, picked, err := embedConfig(cfg)
		if err != nil {
			return nil, err
		}
		e, err := embed.StartEtcd(ecfg)
		if err != nil {
			if lostRace(err, picked) {
				lastErr = err
				continue
			}
			return nil, fmt.Errorf("embedetcd: start: %w", err)
		}
		if err := waitReady(ctx, e); err != nil {
			e.Close()
			return nil, err
		}
		return e, nil
	}
	return nil, fmt.Errorf("embedetcd: start: no free ports after %d attempts: %w", bindAttempts, lastErr)
}

// ClientEndpoints returns the client URLs a clientv3.Config can dial to reach e.
func ClientEndpoints(e *embed.Etcd) []string {
	cfg := e.Config()
	eps := make([]string, 0, len(cfg.AdvertiseClientUrls))
	for _, u := range cfg.AdvertiseClientUrls {
		eps = append(eps, u.String())
	}
	return eps
}

func waitReady(ctx context.Context, e *embed.Etcd) error {
	select {
	case <-e.Server.ReadyNotify():
		return nil
	case err := <-e.Err():
		return fmt.Errorf("embedetcd: server failed before ready: %w", err)
	case <-e.Server.StopNotify():
		return errors.New("embedetcd: server stopped before ready")
	case <-ctx.Done():
		return fmt.Errorf("embedetcd: wait for ready: %w", ctx.Err())
	}
}

// lostRace reports whether err is the failure to bind one of the picked
// addresses because someone else took it since: worth a retry with new ports.
func lostRace(err error, picked map[string]bool) bool {
	var oe *net.OpError
	return errors.Is(err, syscall.EADDRINUSE) && errors.As(err, &oe) &&
		oe.Addr != nil && picked[oe.Addr.String()]
}

// embedConfig translates cfg, filling empty URLs with freshly picked ports;
// picked holds the host:port of each address it picked.
func embedConfig(cfg EmbedConfig) (ecfg *embed.Config, picked map[string]bool, err error) {
	clientURL, peerURL := cfg.ClientURL, cfg.PeerURL
	if clientURL == "" || peerURL == "" {
		addrs, err := freeAddrs(2)
		if err != nil {
			return nil, nil, err
		}
		picked = make(map[string]bool)
		if clientURL == "" {
			clientURL = "http://" + addrs[0]
			picked[addrs[0]] = true
		}
		if peerURL == "" {
			peerURL = "http://" + addrs[1]
			picked[addrs[1]] = true
		}
	}
	cu, err := url.Parse(clientURL)
	if err != nil {
		return nil, nil, fmt.Errorf("embedetcd: client URL %q: %w", clientURL, err)
	}
	pu, err := url.Parse(peerURL)
	if err != nil {
		return nil, nil, fmt.Errorf("embedetcd: peer URL %q: %w", peerURL, err)
	}

	ecfg = embed.NewConfig()
	ecfg.Name = cfg.Name
	if ecfg.Name == "" {
		ecfg.Name = DefaultName
	}
	ecfg.Dir = cfg.Dir
	ecfg.ListenClientUrls = []url.URL{*cu}
	ecfg.AdvertiseClientUrls = []url.URL{*cu}
	ecfg.ListenPeerUrls = []url.URL{*pu}
	ecfg.AdvertisePeerUrls = []url.URL{*pu}
	ecfg.InitialCluster = ecfg.InitialClusterFromName(ecfg.Name)
	ecfg.TickMs = cfg.TickMs
	if ecfg.TickMs == 0 {
		ecfg.TickMs = DefaultTickMs
	}
	ecfg.ElectionMs = cfg.ElectionMs
	if ecfg.ElectionMs == 0 {
		ecfg.ElectionMs = DefaultElectionMs
	}
	ecfg.UnsafeNoFsync = cfg.UnsafeNoFsync
	lg := cfg.Logger
	if lg == nil {
		if lg, err = stderrLogger(cfg.LogLevel); err != nil {
			return nil, nil, err
		}
	}
	ecfg.ZapLoggerBuilder = embed.NewZapLoggerBuilder(lg)
	return ecfg, picked, nil
}

func stderrLogger(level string) (*zap.Logger, error) {
	if level == "" {
		level = DefaultLogLevel
	}
	lvl, err := zapcore.ParseLevel(level)
	if err != nil {
		return nil, fmt.Errorf("embedetcd: log level: %w", err)
	}
	zc := zap.NewProductionConfig()
	zc.Level = zap.NewAtomicLevelAt(lvl)
	zc.Sampling = nil
	lg, err := zc.Build()
	if err != nil {
		return nil, fmt.Errorf("embedetcd: logger: %w", err)
	}
	return lg, nil
}

// freeAddrs returns n distinct loopback host:port addresses that were free a
// moment ago. The n listeners are held open together so the kernel hands out
// distinct ports; another process can still take one before etcd binds it,
// which StartEmbedded handles by retrying.
func freeAddrs(n int) ([]string, error) {
	addrs := make([]string, 0, n)
	for range n {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return nil, fmt.Errorf("embedetcd: pick free port: %w", err)
		}
		defer l.Close()
		addrs = append(addrs, l.Addr().String())
	}
	return addrs, nil
}
