package main

import (
	"bytes"
	"strings"
	"testing"
	"time"
)

func env(m map[string]string) func(string) (string, bool) {
	return func(k string) (string, bool) { v, ok := m[k]; return v, ok }
}

func TestEnvironmentTwinsAndPrecedence(t *testing.T) {
	o, err := parseFlags([]string{"--hosts", "7"}, env(map[string]string{
		"VIGIL_DATABASE_URL":       "postgres://x",
		"VIGIL_HOSTS":              "3",
		"VIGIL_CHURN_STEP_DELAY":   "2s",
		"VIGIL_HEARTBEAT_INTERVAL": "1s",
	}), &bytes.Buffer{})
	if err != nil {
		t.Fatal(err)
	}
	if o.cfg.DatabaseURL != "postgres://x" || o.cfg.Hosts != 7 || o.cfg.ChurnStepDelay != 2*time.Second || o.cfg.HeartbeatInterval != time.Second {
		t.Fatalf("parsed %+v", o.cfg)
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
		{"unparsable environment", []string{"--database-url=x"}, map[string]string{"VIGIL_CHURN": "fast"}, "VIGIL_CHURN (--churn)"},
		{"out of range", []string{"--database-url=x", "--hosts=0"}, nil, "invalid --hosts"},
		{"specific listen address", []string{"--database-url=x", "--listen=127.0.0.1:0"}, nil, "invalid --listen"},
		{"shared fraction", []string{"--database-url=x", "--shared-fraction=2"}, nil, "invalid --shared-fraction"},
		{"log format", []string{"--database-url=x", "--log-format=xml"}, nil, "--log-format"},
		{"stray argument", []string{"--database-url=x", "extra"}, nil, "unexpected argument"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var stderr bytes.Buffer
			if code := run(tc.args, env(tc.env), &stderr); code != 2 {
				t.Fatalf("exit %d, want 2; stderr:\n%s", code, stderr.String())
			}
			if !strings.Contains(stderr.String(), tc.want) {
				t.Fatalf("stderr does not name %q:\n%s", tc.want, stderr.String())
			}
		})
	}
}
