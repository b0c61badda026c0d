package zaplog

import (
	"bytes"
	"errors"
	"strings"
	"testing"

	"github.com/hashicorp/go-hclog"
	"go.uber.org/zap"
)

func TestEntriesReachHclogOneLevelDown(t *testing.T) {
	var buf bytes.Buffer
	log := hclog.New(&hclog.LoggerOptions{Name: "etcd", Level: hclog.Debug, Output: &buf})
	z := New(log).With(zap.String("endpoint", "10.0.0.1:2379"))
	z.Debug("not shown: Trace is below Debug")
	z.Info("retrying of unary invoker", zap.Int("attempt", 2))
	z.Warn("lease keepalive response queue is full", zap.Error(errors.New("boom")), zap.Duration("ttl", 0))
	z.Error("failed to sync endpoints")
	out := buf.String()
	for _, want := range []string{
		"[DEBUG] etcd: retrying of unary invoker: endpoint=10.0.0.1:2379 attempt=2",
		"[WARN]  etcd: lease keepalive response queue is full: endpoint=10.0.0.1:2379 error=boom ttl=0s",
		"[ERROR] etcd: failed to sync endpoints: endpoint=10.0.0.1:2379",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("missing %q in:\n%s", want, out)
		}
	}
	if strings.Contains(out, "not shown") {
		t.Errorf("a zap Debug entry reached a Debug hclog:\n%s", out)
	}
}

func TestDisabledLevelsCostNothing(t *testing.T) {
	var buf bytes.Buffer
	z := New(hclog.New(&hclog.LoggerOptions{Level: hclog.Warn, Output: &buf}))
	if ce := z.Check(zap.InfoLevel, "x"); ce != nil {
		t.Fatal("Info is enabled under a Warn hclog")
	}
	if ce := z.Check(zap.WarnLevel, "x"); ce == nil {
		t.Fatal("Warn is disabled under a Warn hclog")
	}
}
