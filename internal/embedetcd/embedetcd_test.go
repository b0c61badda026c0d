package embedetcd

import (
	"context"
	"errors"
	"net"
	"strings"
	"syscall"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/goleak"
	"go.uber.org/zap"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

func quiet(dir string) EmbedConfig {
	return EmbedConfig{Dir: dir, Logger: zap.NewNop(), UnsafeNoFsync: true}
}

func start(t *testing.T, cfg EmbedConfig) func() {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	e, err := StartEmbedded(ctx, cfg)
	if err != nil {
		t.Fatalf("start: %v", err)
	}
	return e.Close
}

func client(t *testing.T, endpoints []string) *clientv3.Client {
	t.Helper()
	cli, err := clientv3.New(clientv3.Config{Endpoints: endpoints, DialTimeout: 2 * time.Second, Logger: zap.NewNop()})
	if err != nil {
		t.Fatalf("client: %v", err)
	}
	return cli
}

func TestDataDirSurvivesRestartOnNewPorts(t *testing.T) {
	dir := t.TempDir()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()

	e, err := StartEmbedded(ctx, quiet(dir))
	if err != nil {
		t.Fatalf("first start: %v", err)
	}
	cli := client(t, ClientEndpoints(e))
	_, err = cli.Put(ctx, "/kept", "yes")
	cli.Close()
	e.Close()
	if err != nil {
		t.Fatalf("put: %v", err)
	}

	e, err = StartEmbedded(ctx, quiet(dir))
	if err != nil {
		t.Fatalf("second start: %v", err)
	}
	defer e.Close()
	cli = client(t, ClientEndpoints(e))
	defer cli.Close()
	resp, err := cli.Get(ctx, "/kept")
	if err != nil {
		t.Fatalf("get: %v", err)
	}
	if len(resp.Kvs) != 1 || string(resp.Kvs[0].Value) != "yes" {
		t.Fatalf("get /kept after restart = %v", resp.Kvs)
	}
}

func TestExplicitURLs(t *testing.T) {
	addrs, err := freeAddrs(2)
	if err != nil {
		t.Fatal(err)
	}
	cfg := quiet(t.TempDir())
	cfg.ClientURL, cfg.PeerURL = "http://"+addrs[0], "http://"+addrs[1]
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	e, err := StartEmbedded(ctx, cfg)
	if err != nil {
		t.Fatalf("start: %v", err)
	}
	defer e.Close()
	if got := ClientEndpoints(e); len(got) != 1 || got[0] != cfg.ClientURL {
		t.Fatalf("ClientEndpoints = %v, want [%s]", got, cfg.ClientURL)
	}
}

func TestExplicitURLInUseFailsWithoutRetry(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	cfg := quiet(t.TempDir())
	cfg.ClientURL = "http://" + l.Addr().String()
	_, err = StartEmbedded(context.Background(), cfg)
	if !errors.Is(err, syscall.EADDRINUSE) {
		t.Fatalf("err = %v, want EADDRINUSE", err)
	}
	if strings.Contains(err.Error(), "attempts") {
		t.Fatalf("retried a port the caller chose: %v", err)
	}
}

func TestLostRaceOnlyForPickedAddresses(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	_, err = net.Listen("tcp", l.Addr().String())
	if err == nil {
		t.Fatal("second listen on the same address succeeded")
	}
	if !lostRace(err, map[string]bool{l.Addr().String(): true}) {
		t.Errorf("bind failure on a picked address is not a lost race: %v", err)
	}
	if lostRace(err, map[string]bool{"127.0.0.1:1": true}) {
		t.Errorf("bind failure on an address not picked is a lost race")
	}
	if lostRace(errors.New("other"), map[string]bool{l.Addr().String(): true}) {
		t.Errorf("unrelated error is a lost race")
	}
}

func TestInvalidConfig(t *testing.T) {
	for name, cfg := range map[string]EmbedConfig{
		"no dir":             {},
		"bad log level":      {Dir: t.TempDir(), LogLevel: "loud"},
		"bad client url":     {Dir: t.TempDir(), ClientURL: "http://[::1"},
		"election too short": {Dir: t.TempDir(), Logger: zap.NewNop(), TickMs: 100, ElectionMs: 200},
	} {
		t.Run(name, func(t *testing.T) {
			e, err := StartEmbedded(context.Background(), cfg)
			if err == nil {
				e.Close()
				t.Fatal("started")
			}
		})
	}
}

func TestCanceledStartLeavesNothingRunning(t *testing.T) {
	t.Run("before start", func(t *testing.T) {
		ctx, cancel := context.WithCancel(context.Background())
		cancel()
		if _, err := StartEmbedded(ctx, quiet(t.TempDir())); !errors.Is(err, context.Canceled) {
			t.Fatalf("err = %v, want context.Canceled", err)
		}
	})
	t.Run("while waiting for ready", func(t *testing.T) {
		// Slow raft ticks keep the member from electing itself for
		// about a tick, far longer than the start is given.
		cfg := quiet(t.TempDir())
		cfg.TickMs, cfg.ElectionMs = 200, 2000
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Millisecond)
		defer cancel()
		e, err := StartEmbedded(ctx, cfg)
		if err == nil {
			e.Close()
			t.Skip("member was ready before the deadline; the abandon path was not exercised")
		}
		if !errors.Is(err, context.DeadlineExceeded) {
			t.Fatalf("err = %v, want context.DeadlineExceeded", err)
		}
	})
	goleak.VerifyNone(t)
}

func TestDefaultsToErrorLevelLogger(t *testing.T) {
	cfg, _, err := embedConfig(EmbedConfig{Dir: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	if cfg.TickMs != DefaultTickMs || cfg.ElectionMs != DefaultElectionMs || cfg.Name != DefaultName {
		t.Errorf("defaults: tick %d election %d name %q", cfg.TickMs, cfg.ElectionMs, cfg.Name)
	}
	if err := cfg.Validate(); err != nil {
		t.Fatal(err)
	}
	lg := cfg.GetLogger()
	if lg.Core().Enabled(zap.WarnLevel) || !lg.Core().Enabled(zap.ErrorLevel) {
		t.Errorf("default logger is not at error level")
	}
}
