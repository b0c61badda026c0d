package agentpool

import (
	"bytes"
	"context"
	"errors"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/google/uuid"
	"github.com/hashicorp/go-hclog"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
)

func TestCheckAddress(t *testing.T) {
	long := strings.Repeat("abc.", 62) + "ab:5007" // 255 bytes: the most allowed
	for _, tc := range []struct {
		address, want string
	}{
		// Good: what the control plane dials.
		{"10.0.0.7:5007", ""},
		{"http://10.0.0.7:5007", ""},
		{"https://10.0.0.7:5007", ""},
		{"HTTPS://10.0.0.7:5007", ""},
		{"http://10.0.0.7:5007/", ""},
		{"[fd00::7]:5007", ""},
		{"https://[fd00::7]:5007/", ""},
		{"[::ffff:10.0.0.7]:1", ""},
		{"agent-7.hosts.internal:5007", ""},
		{"agent-7.hosts.internal.:65535", ""},
		{"_agent.hosts:80", ""},
		{"localhost:5007", ""},
		{"0abc.example:5007", ""},
		{strings.Repeat("a", 63) + ".x:1", ""},
		{long, ""},

		{"", ReasonEmpty},
		{"   ", ReasonEmpty},
		{"\t\n", ReasonEmpty},

		{long + "7", ReasonTooLong},
		{strings.Repeat("garbage", 100<<10/7), ReasonTooLong},

		{"ftp://10.0.0.7:5007", ReasonScheme},
		{"unix:///run/agent.sock", ReasonScheme},
		{"http+unix://x:1", ReasonScheme},
		{"://10.0.0.7:5007", ReasonScheme},

		{"http://u:p@10.0.0.7:5007", ReasonUserinfo},
		{"u@10.0.0.7:5007", ReasonUserinfo},

		{"http://10.0.0.7:5007?x=1", ReasonQuery},
		{"http://10.0.0.7:5007/?x", ReasonQuery},
		{"10.0.0.7:5007#frag", ReasonQuery},

		{"https://lb.internal:443/agents/7", ReasonPath},
		{"http://10.0.0.7:5007//", ReasonPath},
		{"10.0.0.7:5007/x", ReasonPath},

		{"10.0.0.7", ReasonNoPort},
		{"http://agent.internal", ReasonNoPort},
		{"[fd00::7]", ReasonNoPort},
		{"10.0.0.7:", ReasonNoPort},
		{"http://[fd00::7]:", ReasonNoPort},

		{"10.0.0.7:port", ReasonBadPort},
		{"10.0.0.7:0", ReasonBadPort},
		{"10.0.0.7:65536", ReasonBadPort},
		{"10.0.0.7:+80", ReasonBadPort},
		{"10.0.0.7:123456", ReasonBadPort},
		{"10.0.0.7:80 ", ReasonBadPort},
		{"[fd00::7]:x", ReasonBadPort},

		{"http://", ReasonBadHost},
		{":5007", ReasonBadHost},
		{"fd00::7:5007", ReasonBadHost},    // IPv6 without brackets
		{"[10.0.0.7]:5007", ReasonBadHost}, // brackets around IPv4
		{"[fe80::1%eth0]:5007", ReasonBadHost},
		{"[fd00::7:5007", ReasonBadHost},
		{"[fd00::7]x:5007", ReasonBadHost},
		{"999.0.0.7:5007", ReasonBadHost},
		{"10.0.0.07:5007", ReasonBadHost},
		{" 10.0.0.7:5007", ReasonBadHost},
		{"agent_7 .internal:5007", ReasonBadHost},
		{"-agent.internal:5007", ReasonBadHost},
		{"agent-.internal:5007", ReasonBadHost},
		{"agent..internal:5007", ReasonBadHost},
		{strings.Repeat("a", 64) + ".x:1", ReasonBadHost},
		{"agént.internal:5007", ReasonBadHost},
		{"agent%2e.internal:5007", ReasonBadHost},
		{"\x00:1", ReasonBadHost},
	} {
		if got := CheckAddress(tc.address); got != tc.want {
			t.Errorf("CheckAddress(%q) = %q, want %q", trim(tc.address), got, tc.want)
		}
	}
}

func trim(s string) string {
	if len(s) > 80 {
		return s[:80] + "..."
	}
	return s
}

// Every reason is in Reasons, the label vocabulary.
func TestReasonsAreTheLabelVocabulary(t *testing.T) {
	for _, r := range []string{ReasonEmpty, ReasonTooLong, ReasonScheme, ReasonUserinfo, ReasonQuery,
		ReasonPath, ReasonNoPort, ReasonBadPort, ReasonBadHost} {
		found := false
		for _, x := range Reasons {
			found = found || x == r
		}
		if !found {
			t.Errorf("reason %q missing from Reasons", r)
		}
	}
}

func TestParseAddressTarget(t *testing.T) {
	for _, tc := range []struct {
		address, scheme string
		want            target
	}{
		{"10.0.0.7:5007", "http", target{"http", "10.0.0.7:5007"}},
		{"10.0.0.7:5007", "https", target{"https", "10.0.0.7:5007"}},
		{"http://10.0.0.7:5007/", "https", target{"http", "10.0.0.7:5007"}}, // an explicit scheme is kept
		{"HTTPS://[fd00::7]:5007", "http", target{"https", "[fd00::7]:5007"}},
		{"agent-7.hosts.internal:5007", "https", target{"https", "agent-7.hosts.internal:5007"}},
	} {
		got, reason := parseAddress(tc.address, tc.scheme)
		if reason != "" || got != tc.want {
			t.Errorf("parseAddress(%q, %q) = %+v, %q; want %+v", tc.address, tc.scheme, got, reason, tc.want)
		}
	}
}

func TestAddressKey(t *testing.T) {
	if k := addressKey("10.0.0.7:5007"); k != "10.0.0.7:5007" {
		t.Errorf("short address key = %q", k)
	}
	a, b := strings.Repeat("x", 100<<10), strings.Repeat("x", 100<<10-1)+"y"
	ka, kb := addressKey(a), addressKey(b)
	if ka == kb || len(ka) > 128 || len(kb) > 128 {
		t.Errorf("long address keys %q and %q: want distinct and short", ka, kb)
	}
}

// syncBuffer is a log destination whose size can be read while the pool
// writes to it.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) take() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := s.b.String()
	s.b.Reset()
	return out
}

// A refused address costs no dial (so no name lookup), one WARN line of
// bounded size when the pool first meets it for the host, nothing on later
// calls, and one count per call by reason; a changed address is logged
// again, a fixed one is used.
func TestBadAddressIsRefusedBeforeDialAndLoggedOnce(t *testing.T) {
	addr, rec := startAgent(t, &fakeAgent{})
	logs := &syncBuffer{}
	reg := prometheus.NewRegistry()
	p := newPool(t, Config{Registerer: reg, Logger: hclog.New(&hclog.LoggerOptions{Output: logs, Level: hclog.Debug})})
	var dials atomic.Int64
	dial := p.tr.dial
	p.tr.dial = func(ctx context.Context, network, a string) (net.Conn, error) {
		dials.Add(1)
		return dial(ctx, network, a)
	}
	// Letters only: a URL parser takes it for a host name, to be looked up.
	garbage := strings.Repeat("garbage", 100<<10/7) // 100 KiB
	pathy := "http://" + addr + "/agents/7"
	host, other, noPort := uuid.New(), uuid.New(), uuid.New()

	call := func(h uuid.UUID, address string) error {
		_, err := p.ListSandboxes(t.Context(), h, address)
		return err
	}
	for i := range 3 {
		for _, c := range []struct {
			h       uuid.UUID
			address string
			reason  string
		}{{host, garbage, ReasonTooLong}, {other, pathy, ReasonPath}, {noPort, "garbage-host", ReasonNoPort}} {
			err := call(c.h, c.address)
			var bad *BadAddressError
			if !errors.As(err, &bad) || bad.Reason != c.reason || !errors.Is(err, ErrBadAddress) {
				t.Fatalf("call %d with %q: %v, want a %s refusal", i, trim(c.address), err, c.reason)
			}
			if len(err.Error()) > 120 {
				t.Errorf("error is %d bytes: %q", len(err.Error()), err)
			}
		}
		out := logs.take()
		t.Logf("call %d: %d log bytes", i, len(out))
		switch {
		case i == 0 && (strings.Count(out, "[WARN]") != 3 || len(out) > 3*400):
			t.Errorf("first calls logged %d bytes, want three WARN lines of < 400 bytes:\n%s", len(out), out)
		case i > 0 && out != "":
			t.Errorf("call %d logged %d bytes, want none:\n%s", i, len(out), out)
		}
	}
	if n := dials.Load(); n != 0 || len(rec.all()) != 0 {
		t.Fatalf("%d dials, agent saw %d requests; want none", n, len(rec.all()))
	}
	if got := testutil.ToFloat64(p.metrics.badAddresses.WithLabelValues(ReasonTooLong)); got != 3 {
		t.Errorf("too_long refusals = %v, want 3", got)
	}
	for _, r := range []string{ReasonPath, ReasonNoPort} {
		if got := testutil.ToFloat64(p.metrics.badAddresses.WithLabelValues(r)); got != 3 {
			t.Errorf("%s refusals = %v, want 3", r, got)
		}
	}
	if got := testutil.ToFloat64(p.metrics.badAddresses.WithLabelValues(ReasonBadHost)); got != 0 {
		t.Errorf("bad_host refusals = %v, want 0", got)
	}

	// Another bad address is a change: logged once more.
	if err := call(host, garbage+"!"); !errors.Is(err, ErrBadAddress) {
		t.Fatal(err)
	}
	if out := logs.take(); strings.Count(out, "[WARN]") != 1 || !strings.Contains(out, "…(") {
		t.Errorf("changed bad address logged:\n%s\nwant one WARN line with the value cut", out)
	}
	// Fixed: used, and said so once.
	if err := call(host, addr); err != nil {
		t.Fatal(err)
	}
	if out := logs.take(); !strings.Contains(out, "[INFO]  agentpool: agent address accepted") {
		t.Errorf("fixed address logged:\n%s", out)
	}
	if n := dials.Load(); n != 1 {
		t.Errorf("%d dials after the fix, want 1", n)
	}
}

// The refusals are remembered only as long as the host is called: a host
// not called for IdleTimeout is forgotten, and logged again if it comes back.
func TestRefusedAddressIsForgottenWithItsHost(t *testing.T) {
	logs := &syncBuffer{}
	p := newPool(t, Config{IdleTimeout: time.Minute, Logger: hclog.New(&hclog.LoggerOptions{Output: logs})})
	now := time.Now()
	p.now = func() time.Time { return now }
	host := uuid.New()
	for range 2 {
		if _, err := p.ListSandboxes(t.Context(), host, "10.0.0.7"); !errors.Is(err, ErrBadAddress) {
			t.Fatal(err)
		}
	}
	if out := logs.take(); strings.Count(out, "[WARN]") != 1 {
		t.Fatalf("logged:\n%s\nwant one WARN line", out)
	}
	now = now.Add(time.Minute)
	if _, err := p.ListSandboxes(t.Context(), uuid.New(), "10.0.0.8"); !errors.Is(err, ErrBadAddress) {
		t.Fatal(err)
	}
	if p.Len() != 1 {
		t.Fatalf("Len = %d after IdleTimeout, want 1 (the idle host forgotten)", p.Len())
	}
	logs.take()
	if _, err := p.ListSandboxes(t.Context(), host, "10.0.0.7"); !errors.Is(err, ErrBadAddress) {
		t.Fatal(err)
	}
	if out := logs.take(); strings.Count(out, "[WARN]") != 1 {
		t.Fatalf("a forgotten host's refusal logged:\n%s\nwant one WARN line", out)
	}
}
