package cli

import (
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

type testFlags struct {
	ttl     *time.Duration
	channel *string
	shards  *int
	verbose *bool
}

func newTestFlags() (*testFlags, func([]string) ([]string, error)) {
	fs := NewFlagSet("vigil test", "A test.", io.Discard)
	f := &testFlags{
		ttl:     fs.Duration("lease-ttl", 10*time.Second, ""),
		channel: fs.String("events-sse-channel", "wrenn:sse", ""),
		shards:  fs.Int("shards", 256, ""),
		verbose: fs.Bool("verbose", false, ""),
	}
	return f, func(args []string) ([]string, error) { return ParsePositional(fs, args) }
}

func writeConfig(t *testing.T, body string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "vigil.conf")
	if err := os.WriteFile(p, []byte(body), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

// Command line, then environment, then config file, then default.
func TestPrecedence(t *testing.T) {
	conf := writeConfig(t, "# a replica\nlease-ttl 30s\nshards 64\nverbose\nevents-sse-channel from-file\n")
	t.Setenv("VIGIL_LEASE_TTL", "20s")
	t.Setenv("VIGIL_CONFIG", conf)
	f, parse := newTestFlags()
	if _, err := parse([]string{"--shards", "16"}); err != nil {
		t.Fatal(err)
	}
	if *f.shards != 16 || *f.ttl != 20*time.Second || !*f.verbose || *f.channel != "from-file" {
		t.Fatalf("shards %d (want 16, command line), ttl %s (want 20s, environment), verbose %v (want true, file), channel %q (want from-file)",
			*f.shards, *f.ttl, *f.verbose, *f.channel)
	}
}

// A variable set but empty empties the flag, over the config file too.
func TestEmptyVariableEmptiesTheFlag(t *testing.T) {
	t.Setenv("VIGIL_EVENTS_SSE_CHANNEL", "")
	t.Setenv("VIGIL_CONFIG", writeConfig(t, "events-sse-channel from-file\n"))
	f, parse := newTestFlags()
	if _, err := parse(nil); err != nil {
		t.Fatal(err)
	}
	if *f.channel != "" {
		t.Fatalf("channel %q, want empty", *f.channel)
	}
}

func TestPositionalArgumentsAnywhere(t *testing.T) {
	f, parse := newTestFlags()
	pos, err := parse([]string{"host-1", "--shards", "8", "host-2", "--verbose", "host-3"})
	if err != nil {
		t.Fatal(err)
	}
	if strings.Join(pos, ",") != "host-1,host-2,host-3" || *f.shards != 8 || !*f.verbose {
		t.Fatalf("positional %v, shards %d, verbose %v", pos, *f.shards, *f.verbose)
	}
}

func TestBadValuesNameTheirSource(t *testing.T) {
	for _, tc := range []struct {
		env, file string
		want      []string
	}{
		{env: "VIGIL_LEASE_TTL=ten", want: []string{"lease-ttl", "VIGIL_LEASE_TTL"}},
		{file: "shards many\n", want: []string{"shards"}},
		{file: "no-such-flag 1\n", want: []string{"no-such-flag"}},
		{env: "VIGIL_SHARDS=", want: []string{"VIGIL_SHARDS", "--shards"}},
	} {
		t.Run(tc.env+tc.file, func(t *testing.T) {
			if tc.env != "" {
				k, v, _ := strings.Cut(tc.env, "=")
				t.Setenv(k, v)
			}
			args := []string{}
			if tc.file != "" {
				args = []string{"--config", writeConfig(t, tc.file)}
			}
			_, parse := newTestFlags()
			_, err := parse(args)
			if err == nil {
				t.Fatal("no error")
			}
			for _, w := range tc.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q does not name %q", err, w)
				}
			}
		})
	}
}

func TestMissingConfigFileIsAnError(t *testing.T) {
	_, parse := newTestFlags()
	if _, err := parse([]string{"--config", filepath.Join(t.TempDir(), "absent")}); err == nil {
		t.Fatal("a missing --config file was accepted")
	}
}

func TestUnexpectedArguments(t *testing.T) {
	fs := NewFlagSet("vigil test", "A test.", io.Discard)
	if err := Parse(fs, []string{"stray"}); err == nil || !strings.Contains(err.Error(), "unexpected arguments: stray") {
		t.Fatalf("error %v", err)
	}
}
