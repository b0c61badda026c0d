package agentsim

import (
	"fmt"
	"net"
	"net/netip"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/jackc/pgx/v5/pgxpool"
)

// Defaults applied by New to zero-valued Config fields.
const (
	DefaultListenAddr        = "0.0.0.0:0"
	DefaultHeartbeatInterval = 5 * time.Second
	DefaultTeams             = 8
	DefaultChurnConcurrency  = 16
	DefaultChurnStepDelay    = 10 * time.Millisecond
)

// MaxHosts is the largest number of hosts one Sim can address: hosts live on
// 127.1.0.1 ... 127.255.255.254, skipping .0 and .255 in the last octet.
const MaxHosts = 255 * 256 * 254

// Config configures a Sim. Zero values mean the documented default; New
// validates everything and reports the first problem as a *ConfigError.
type Config struct {
	// DatabaseURL is the control plane's Postgres. Ignored when Pool is set.
	// With neither, the Sim runs without a database: it serves the agent RPC
	// but registers nothing, writes no heartbeats and cannot churn.
	DatabaseURL string
	// Pool is an existing pool to use instead of DatabaseURL. The Sim does
	// not close it.
	Pool *pgxpool.Pool

	// Hosts is the number of simulated hosts, 1..MaxHosts.
	Hosts int
	// AddressOffset shifts the hosts' addresses: host i gets the address
	// of index AddressOffset+i (see the package doc). Several Sims on one
	// machine give their hosts distinct IPs with distinct offsets, as real
	// agents have; AddressOffset+Hosts must not exceed MaxHosts.
	AddressOffset int
	// ListenAddr is the one agent RPC listener, default "0.0.0.0:0" (random
	// port). Its host part must be a wildcard (empty, 0.0.0.0 or ::): each
	// simulated host has its own 127.x.y.z address on the same port, and a
	// socket bound to 127.0.0.1 does not receive connections for 127.1.0.1.
	// Connections to any other local address (another interface, 127.0.0.1)
	// are closed at once.
	ListenAddr string

	// CAFile, CertFile and KeyFile turn on mutual TLS on the agent listener,
	// the way production agents are reached (HTTP/1.1 and Connect's own
	// protocol either way). Set all three or none. CAFile is the PEM bundle
	// that verifies client certificates: a client must present one it signs
	// (tls.RequireAndVerifyClientCert). CertFile and KeyFile are the PEM
	// serving certificate (with any chain after it) and its key. If that
	// certificate is a CA (IsCA with KeyUsageCertSign), each host is served
	// a leaf for its own 127.x.y.z, minted from it on the host's first
	// handshake (see the package documentation); otherwise every host serves
	// the certificate as is. New reads the files.
	CAFile   string
	CertFile string
	KeyFile  string

	// Latency delays every answer of a host whose mode answers (every mode
	// but dead, hang and flap's dead phase), on top of the mode's own delay:
	// the network and agent time of a real agent. Default 0. A request whose
	// context ends first is dropped without side effects. Must not be
	// negative.
	Latency time.Duration

	// HeartbeatInterval is the period of the background heartbeat round,
	// default 5s. Negative disables the background loop; Heartbeat still
	// works on demand.
	HeartbeatInterval time.Duration

	// Teams is the number of distinct team ids the Sim hands out, default 8.
	Teams int
	// SharedFraction (0..1) of the hosts are shared (hosts.team_id NULL);
	// the rest belong to one team each. The count is rounded to nearest.
	SharedFraction float64
	// SandboxesPerHost are seeded on start: a running row in sandboxes and a
	// running VM on the host's agent for each. Churn also steers each host's
	// population towards this number (at least 1).
	SandboxesPerHost int

	// ChurnPerSecond is the rate of control-plane sandbox operations
	// (create, pause, resume, snapshot, destroy); 0 disables churn. Needs a
	// database.
	ChurnPerSecond float64
	// ChurnConcurrency bounds operations in flight, default 16; operations
	// due while the bound is reached are skipped, not queued.
	ChurnConcurrency int
	// ChurnStepDelay is how long the agent takes between the steps of one
	// operation (while the VM shows a transient label), default 10ms.
	// Negative means no delay.
	ChurnStepDelay time.Duration

	// MonitorInterval runs the control plane's own monitor loop (the one
	// vigil replaces, cpmonitor.go) every MonitorInterval; 0 does not run
	// it. Needs a database. For shadow cutovers (vigil run --shadow).
	MonitorInterval time.Duration
	// MonitorUnreachableAfter and MonitorTransientGrace are the monitor
	// loop's heartbeat threshold and transient grace, default the control
	// plane's 90s and 2m (shorter ones make short tests).
	MonitorUnreachableAfter time.Duration
	MonitorTransientGrace   time.Duration
	// MishapsPerSecond is the rate of the mishaps a real fleet has and the
	// reconcile rules are for (mishap.go): VMs that vanish, destroys that
	// get lost, operations cut short, pauses the control plane never heard
	// of, zombies, host outages; 0 disables them. Needs a database.
	MishapsPerSecond float64
	// OutageFor is how long a host outage mishap lasts, default 2m: past
	// the control plane's 90 s threshold and a few heartbeats.
	OutageFor time.Duration

	// Logger receives the Sim's logs; default discards them.
	Logger hclog.Logger
	// Seed makes host, team and seeded sandbox ids reproducible; 0 picks a
	// random seed. Re-running with the same seed re-registers the same hosts.
	Seed int64
}

// ConfigError reports an invalid Config field. Field is the Go field name, so
// a command can translate it to its own flag name.
type ConfigError struct {
	Field string
	Msg   string
}

func (e *ConfigError) Error() string { return fmt.Sprintf("agentsim: %s %s", e.Field, e.Msg) }

func (c *Config) setDefaults() {
	if c.ListenAddr == "" {
		c.ListenAddr = DefaultListenAddr
	}
	if c.HeartbeatInterval == 0 {
		c.HeartbeatInterval = DefaultHeartbeatInterval
	}
	if c.Teams == 0 {
		c.Teams = DefaultTeams
	}
	if c.ChurnConcurrency == 0 {
		c.ChurnConcurrency = DefaultChurnConcurrency
	}
	if c.ChurnStepDelay == 0 {
		c.ChurnStepDelay = DefaultChurnStepDelay
	}
	if c.ChurnStepDelay < 0 {
		c.ChurnStepDelay = 0
	}
	if c.MonitorUnreachableAfter == 0 {
		c.MonitorUnreachableAfter = 90 * time.Second
	}
	if c.MonitorTransientGrace == 0 {
		c.MonitorTransientGrace = 2 * time.Minute
	}
	if c.OutageFor == 0 {
		c.OutageFor = 2 * time.Minute
	}
	if c.Logger == nil {
		c.Logger = hclog.NewNullLogger()
	}
}

func (c *Config) validate() error {
	bad := func(field, format string, args ...any) error {
		return &ConfigError{Field: field, Msg: fmt.Sprintf(format, args...)}
	}
	if c.Hosts < 1 || c.Hosts > MaxHosts {
		return bad("Hosts", "must be between 1 and %d, got %d", MaxHosts, c.Hosts)
	}
	if c.AddressOffset < 0 || c.AddressOffset > MaxHosts-c.Hosts {
		return bad("AddressOffset", "must be between 0 and %d (MaxHosts - Hosts), got %d", MaxHosts-c.Hosts, c.AddressOffset)
	}
	h, p, err := net.SplitHostPort(c.ListenAddr)
	if err != nil {
		return bad("ListenAddr", "%q: %v", c.ListenAddr, err)
	}
	if h != "" {
		ip, err := netip.ParseAddr(h)
		if err != nil || !ip.IsUnspecified() {
			return bad("ListenAddr", "%q: host must be a wildcard address (0.0.0.0, :: or empty) because every simulated host has its own 127.x.y.z address on one port", c.ListenAddr)
		}
	}
	if _, err := net.LookupPort("tcp", p); err != nil {
		return bad("ListenAddr", "%q: bad port: %v", c.ListenAddr, err)
	}
	if c.Teams < 1 {
		return bad("Teams", "must be at least 1, got %d", c.Teams)
	}
	if !(c.SharedFraction >= 0 && c.SharedFraction <= 1) {
		return bad("SharedFraction", "must be between 0 and 1, got %v", c.SharedFraction)
	}
	if c.SandboxesPerHost < 0 {
		return bad("SandboxesPerHost", "must not be negative, got %d", c.SandboxesPerHost)
	}
	if !(c.ChurnPerSecond >= 0) || c.ChurnPerSecond > 1e6 {
		return bad("ChurnPerSecond", "must be between 0 and 1e6, got %v", c.ChurnPerSecond)
	}
	if c.ChurnPerSecond > 0 && c.Pool == nil && c.DatabaseURL == "" {
		return bad("ChurnPerSecond", "needs a database (DatabaseURL or Pool)")
	}
	if c.MonitorInterval < 0 || (c.MonitorInterval > 0 && c.MonitorInterval < 10*time.Millisecond) {
		return bad("MonitorInterval", "must be 0 or at least 10ms, got %v", c.MonitorInterval)
	}
	if c.MonitorInterval > 0 && c.Pool == nil && c.DatabaseURL == "" {
		return bad("MonitorInterval", "needs a database (DatabaseURL or Pool)")
	}
	if c.MonitorUnreachableAfter < 0 || c.MonitorTransientGrace < 0 || c.OutageFor < 0 {
		return bad("MonitorUnreachableAfter", "durations must not be negative")
	}
	if !(c.MishapsPerSecond >= 0) || c.MishapsPerSecond > 1000 {
		return bad("MishapsPerSecond", "must be between 0 and 1000, got %v", c.MishapsPerSecond)
	}
	if c.MishapsPerSecond > 0 && c.Pool == nil && c.DatabaseURL == "" {
		return bad("MishapsPerSecond", "needs a database (DatabaseURL or Pool)")
	}
	if c.ChurnConcurrency < 1 {
		return bad("ChurnConcurrency", "must be at least 1, got %d", c.ChurnConcurrency)
	}
	if c.Latency < 0 {
		return bad("Latency", "must not be negative, got %v", c.Latency)
	}
	return c.validateTLS()
}

// validateTLS enforces "all three or none" on the TLS files and names the
// first one missing.
func (c *Config) validateTLS() error {
	if c.CAFile == "" && c.CertFile == "" && c.KeyFile == "" {
		return nil
	}
	for _, f := range []struct{ field, value string }{{"CAFile", c.CAFile}, {"CertFile", c.CertFile}, {"KeyFile", c.KeyFile}} {
		if f.value == "" {
			return &ConfigError{Field: f.field, Msg: "is required once any TLS file is set: mutual TLS needs the client CA bundle, the serving certificate and its key"}
		}
	}
	return nil
}

// tlsEnabled reports whether mutual TLS is configured; valid after validate.
func (c *Config) tlsEnabled() bool { return c.CAFile != "" }
