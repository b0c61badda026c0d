package main

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// env sets the variables for the rest of the test.
func env(t *testing.T, m map[string]string) {
	for k, v := range m {
		t.Setenv(k, v)
	}
}

func TestEnvironmentTwinsAndPrecedence(t *testing.T) {
	o, err := func() (options, error) {
		env(t, map[string]string{
			"VIGIL_DATABASE_URL":       "postgres://x",
			"VIGIL_HOSTS":              "3",
			"VIGIL_CHURN_STEP_DELAY":   "2s",
			"VIGIL_HEARTBEAT_INTERVAL": "1s",
		})
		return parseFlags([]string{"--hosts", "7"}, &bytes.Buffer{})
	}()
	if err != nil {
		t.Fatal(err)
	}
	if o.cfg.DatabaseURL != "postgres://x" || o.cfg.Hosts != 7 || o.cfg.ChurnStepDelay != 2*time.Second || o.cfg.HeartbeatInterval != time.Second {
		t.Fatalf("parsed %+v", o.cfg)
	}
}

func TestTLSAndLatencyFlagsAndTheirTwins(t *testing.T) {
	o, err := func() (options, error) {
		env(t, map[string]string{
			"VIGIL_TLS_CA_FILE":   "/env/ca.pem",
			"VIGIL_TLS_CERT_FILE": "/env/cert.pem",
			"VIGIL_TLS_KEY_FILE":  "/env/key.pem",
			"VIGIL_LATENCY":       "2ms",
		})
		return parseFlags([]string{"--database-url=x", "--tls-key-file", "/flag/key.pem"}, &bytes.Buffer{})
	}()
	if err != nil {
		t.Fatal(err)
	}
	c := o.cfg
	if c.CAFile != "/env/ca.pem" || c.CertFile != "/env/cert.pem" || c.KeyFile != "/flag/key.pem" || c.Latency != 2*time.Millisecond {
		t.Fatalf("parsed CAFile %q CertFile %q KeyFile %q Latency %v", c.CAFile, c.CertFile, c.KeyFile, c.Latency)
	}
	for _, field := range []string{"CAFile", "CertFile", "KeyFile", "Latency"} {
		if flagFor[field] == "" {
			t.Errorf("agentsim.Config.%s has no flag in flagFor", field)
		}
	}
}

func TestLatencyFlagAlone(t *testing.T) {
	o, err := parseFlags([]string{"--database-url=x", "--latency=150ms"}, &bytes.Buffer{})
	if err != nil || o.cfg.Latency != 150*time.Millisecond || o.cfg.CAFile != "" {
		t.Fatalf("--latency=150ms: %+v, %v", o.cfg, err)
	}
}

func TestConfigFile(t *testing.T) {
	p := filepath.Join(t.TempDir(), "agentsim.conf")
	if err := os.WriteFile(p, []byte("database-url postgres://file\nhosts 9\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	o, err := parseFlags([]string{"--config", p, "--hosts", "4"}, &bytes.Buffer{})
	if err != nil || o.cfg.DatabaseURL != "postgres://file" || o.cfg.Hosts != 4 {
		t.Fatalf("parsed %+v, %v", o.cfg, err)
	}
}

func TestHelpListsTheTLSAndLatencyFlags(t *testing.T) {
	var stderr bytes.Buffer
	if code := run([]string{"-h"}, &stderr); code != 0 {
		t.Fatalf("-h exited %d", code)
	}
	for _, want := range []string{"-tls-ca-file", "-tls-cert-file", "-tls-key-file", "-latency", "mutual TLS"} {
		if !strings.Contains(stderr.String(), want) {
			t.Errorf("-h does not mention %q:\n%s", want, stderr.String())
		}
	}
}

func TestBadSettingsExit2NamingTheFlag(t *testing.T) {
	for _, tc := range []struct {
		name string
		args []string
		env  map[string]string
		want string
	}{
		{"missing database", nil, nil, "--database-url"},
		{"unparsable flag", []string{"--database-url=x", "--hosts=many"}, nil, "-hosts"},
		{"unparsable environment", []string{"--database-url=x"}, map[string]string{"VIGIL_CHURN": "fast"}, "VIGIL_CHURN"},
		{"out of range", []string{"--database-url=x", "--hosts=0"}, nil, "invalid --hosts"},
		{"specific listen address", []string{"--database-url=x", "--listen=127.0.0.1:0"}, nil, "invalid --listen"},
		{"shared fraction", []string{"--database-url=x", "--shared-fraction=2"}, nil, "invalid --shared-fraction"},
		{"log format", []string{"--database-url=x", "--log-format=xml"}, nil, "--log-format"},
		{"stray argument", []string{"--database-url=x", "extra"}, nil, "unexpected argument"},
		{"TLS CA without certificate", []string{"--database-url=x", "--tls-ca-file=/nonexistent/ca.pem"}, nil, "invalid --tls-cert-file"},
		{"TLS certificate without key", []string{"--database-url=x", "--tls-ca-file=/a", "--tls-cert-file=/b"}, nil, "invalid --tls-key-file"},
		{"TLS key and certificate without CA", []string{"--database-url=x"}, map[string]string{"VIGIL_TLS_CERT_FILE": "/b", "VIGIL_TLS_KEY_FILE": "/c"}, "invalid --tls-ca-file"},
		{"unreadable TLS CA", []string{"--database-url=x", "--tls-ca-file=/nonexistent/ca.pem", "--tls-cert-file=/b", "--tls-key-file=/c"}, nil, "invalid --tls-ca-file"},
		{"negative latency", []string{"--database-url=x", "--latency=-1ms"}, nil, "invalid --latency"},
		{"unparsable latency", []string{"--database-url=x"}, map[string]string{"VIGIL_LATENCY": "soon"}, "VIGIL_LATENCY"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			env(t, tc.env)
			var stderr bytes.Buffer
			if code := run(tc.args, &stderr); code != 2 {
				t.Fatalf("exit %d, want 2; stderr:\n%s", code, stderr.String())
			}
			if !strings.Contains(stderr.String(), tc.want) {
				t.Fatalf("stderr does not name %q:\n%s", tc.want, stderr.String())
			}
		})
	}
}
