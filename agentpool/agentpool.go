// Package agentpool owns vigil's connections to host agents: HTTP/1.1 only
// (the agents disable HTTP/2), the Connect protocol with the binary protobuf
// codec (connect-go's defaults, except that gzip is not offered, so answers
// come uncompressed), over mutual TLS when configured. Its own small HTTP/1.1
// transport keeps idle connections without goroutines, so an owner can keep
// its agents' connections open between passes.
//
// Every call is bounded in time (Config.Timeout) and in response size
// (Config.MaxResponseBytes), so one slow, hung or lying agent costs its caller
// at most one timeout and a bounded amount of memory. A host whose address is
// not an agent's (CheckAddress) costs nothing: its calls are refused before
// any dial or name lookup.
package agentpool

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"strings"
	"sync"
	"time"

	"connectrpc.com/connect"
	"github.com/google/uuid"
	"github.com/hashicorp/go-hclog"

	"github.com/vigil-sh/vigil/internal/logval"
	hostagentv1 "github.com/vigil-sh/vigil/proto/hostagent/v1"
	"github.com/vigil-sh/vigil/proto/hostagent/v1/hostagentv1connect"
)

// FenceHeader carries the caller's fencing token on side-effecting calls
// (SPEC §3: "Vigil-Fence: <shard>:<token>").
const FenceHeader = "Vigil-Fence"

// ErrNoAddress reports a host whose address is empty (an agent that has not
// registered yet). No request is made.
var ErrNoAddress = errors.New("agentpool: host has no address")

// Transport tuning.
const (
	keepAlive              = 30 * time.Second
	maxResponseHeaderBytes = 64 << 10
)

// Pool calls host agents. It is safe for concurrent use. Two Connect
// clients, one per procedure, serve every agent: the agent of a call is
// chosen per call, its address checked and cached per host (dropped when the
// host was not called for IdleTimeout). Connections go through the pool's
// own HTTP/1.1 transport (transport.go), whose idle connections are bounded
// (MaxIdleConns, IdleTimeout) and hold no goroutine: file descriptors and
// memory follow MaxIdleConns and the calls in flight, not the fleet.
type Pool struct {
	cfg     Config
	log     hclog.Logger
	scheme  string // "http" or "https": prepended to addresses without one
	tr      *transport
	list    *connect.Client[hostagentv1.ListSandboxesRequest, hostagentv1.ListSandboxesResponse]
	destroy *connect.Client[hostagentv1.DestroySandboxRequest, hostagentv1.DestroySandboxResponse]
	metrics *metrics // nil: no metrics

	now func() time.Time // time.Now; tests move it

	mu        sync.Mutex
	targets   map[uuid.UUID]*cachedTarget
	lastSweep time.Time
}

// target is where one agent is reached: its scheme and "host:port".
type target struct {
	scheme, host string
}

// cachedTarget is what the pool made of a host's address: where its agent
// is, or why the address is refused. A refused address is remembered like a
// usable one, so it is logged once per host and change, not on every call.
type cachedTarget struct {
	address  string // addressKey of the caller's address
	target   target
	refused  string // the reason the address is refused; "" when target is usable
	lastUsed time.Time
}

// New validates cfg (see Config.Validate), loads the TLS files when set, and
// registers the metrics with cfg.Registerer when it is non-nil:
//
//	vigil_agent_rpc_duration_seconds{procedure,code}  histogram of calls that reached the transport
//	vigil_agent_rpc_errors_total{procedure,code}      of those, the ones that failed
//	vigil_agent_bad_addresses_total{reason}           calls refused for their host's address (CheckAddress)
//
// procedure is "ListSandboxes" or "DestroySandbox"; code is "ok" or the
// Connect code string ("deadline_exceeded", "unavailable", ...). A not_found
// answer to DestroySandbox is observed with code "not_found" but is not an
// error. Calls refused before any request (an empty or refused address) are
// not observed by the first two. If the metrics are already registered with
// the same Registerer, the existing ones are shared.
func New(cfg Config) (*Pool, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	p := &Pool{
		cfg:     cfg,
		log:     cfg.Logger.Named("agentpool"),
		scheme:  "http",
		targets: make(map[uuid.UUID]*cachedTarget),
		now:     time.Now,
	}
	// Agents are dialled directly: an HTTP proxy from the environment would
	// sit between every owner and its agents unnoticed.
	dialer := &net.Dialer{Timeout: cfg.Timeout, KeepAlive: keepAlive}
	p.tr = &transport{dial: dialer.DialContext, maxIdle: cfg.MaxIdleConns, idleTimeout: cfg.IdleTimeout,
		maxHeader: maxResponseHeaderBytes, now: func() time.Time { return p.now() }, idle: map[string]*conn{}, slots: map[string]bool{}}
	if cfg.tlsEnabled() {
		tlsCfg, err := loadTLS(cfg)
		if err != nil {
			return nil, err
		}
		p.tr.tls = tlsCfg
		p.scheme = "https"
	}
	opts := []connect.ClientOption{
		connect.WithReadMaxBytes(cfg.MaxResponseBytes),
		// No gzip: answers are a few KiB on a data-centre network, where
		// compressing them costs the agent and vigil more CPU than it
		// saves. Agents compress only when the client accepts it.
		connect.WithAcceptCompression("gzip", nil, nil),
	}
	// The base URL is a placeholder: doer sends each call to the agent its
	// request names.
	d := doer{p.tr}
	p.list = connect.NewClient[hostagentv1.ListSandboxesRequest, hostagentv1.ListSandboxesResponse](
		d, "http://agent"+hostagentv1connect.HostAgentServiceListSandboxesProcedure,
		append(opts, connect.WithSchema(hostagentv1.File_hostagent_v1_hostagent_proto.Services().ByName("HostAgentService").Methods().ByName("ListSandboxes")))...)
	p.destroy = connect.NewClient[hostagentv1.DestroySandboxRequest, hostagentv1.DestroySandboxResponse](
		d, "http://agent"+hostagentv1connect.HostAgentServiceDestroySandboxProcedure,
		append(opts, connect.WithSchema(hostagentv1.File_hostagent_v1_hostagent_proto.Services().ByName("HostAgentService").Methods().ByName("DestroySandbox")))...)
	m, err := newMetrics(cfg.Registerer)
	if err != nil {
		return nil, err
	}
	p.metrics = m
	return p, nil
}

// targetHeader carries a call's agent from the call to the doer: every call
// names its target on its own request (never in its context), and the doer
// takes the header off before the request leaves.
const targetHeader = "Vigil-Agent-Target"

// header is the target as targetHeader carries it: "scheme://host:port".
func (tg target) header() string { return tg.scheme + "://" + tg.host }

// parseTarget reverses header.
func parseTarget(h string) (target, bool) {
	scheme, host, ok := strings.Cut(h, "://")
	return target{scheme: scheme, host: host}, ok && host != ""
}

// doer sends each request to the agent its targetHeader names.
type doer struct{ t *transport }

func (d doer) Do(req *http.Request) (*http.Response, error) {
	tg, ok := parseTarget(req.Header.Get(targetHeader))
	if !ok {
		closeBody(req)
		return nil, errors.New("agentpool: call without an agent")
	}
	req.Header.Del(targetHeader)
	req.URL.Scheme, req.URL.Host, req.Host = tg.scheme, tg.host, tg.host
	return d.t.Do(req)
}

// loadTLS builds the client TLS configuration: agents verified against the CA
// bundle, the pool presenting its own certificate.
func loadTLS(cfg Config) (*tls.Config, error) {
	caPEM, err := os.ReadFile(cfg.CAFile)
	if err != nil {
		return nil, fmt.Errorf("agentpool: read CAFile: %w", err)
	}
	roots := x509.NewCertPool()
	if !roots.AppendCertsFromPEM(caPEM) {
		return nil, fmt.Errorf("agentpool: CAFile %s holds no PEM certificate", cfg.CAFile)
	}
	cert, err := tls.LoadX509KeyPair(cfg.CertFile, cfg.KeyFile)
	if err != nil {
		return nil, fmt.Errorf("agentpool: load CertFile/KeyFile: %w", err)
	}
	return &tls.Config{
		RootCAs:            roots,
		Certificates:       []tls.Certificate{cert},
		MinVersion:         tls.VersionTLS12,
		NextProtos:         []string{"http/1.1"}, // the agents disable HTTP/2
		ClientSessionCache: tls.NewLRUClientSessionCache(cfg.TLSSessions),
		// X25519 alone, not Go's default hybrid X25519MLKEM768: a resumed
		// handshake still runs the key exchange, and the ML-KEM half
		// doubles its cost on both ends (profiled at fleet scale, where
		// most calls dial). Agents sit on the platform's own network.
		CurvePreferences: []tls.CurveID{tls.X25519, tls.CurveP256},
	}, nil
}

// ListSandboxes asks the agent at address for every sandbox it knows. The call
// is bounded by Config.Timeout (or ctx's sooner deadline) and its answer by
// Config.MaxResponseBytes. Errors are wrapped as "agent <host> ListSandboxes:
// ..." and keep their Connect code (connect.CodeOf) and sentinels
// (errors.Is(err, ErrNoAddress), errors.Is(err, ErrBadAddress)). A refused
// address (CheckAddress) fails the call before any dial or name lookup.
func (p *Pool) ListSandboxes(ctx context.Context, hostID uuid.UUID, address string) (*hostagentv1.ListSandboxesResponse, error) {
	tg, err := p.target(hostID, address)
	if err != nil {
		return nil, fmt.Errorf("agent %s %s: %w", hostID, procListSandboxes, err)
	}
	ctx, cancel := context.WithTimeout(ctx, p.cfg.Timeout)
	defer cancel()
	req := connect.NewRequest(&hostagentv1.ListSandboxesRequest{})
	req.Header().Set(targetHeader, tg.header())
	start := time.Now()
	resp, err := p.list.CallUnary(ctx, req)
	p.done(hostID, procListSandboxes, err, false, time.Since(start))
	if err != nil {
		return nil, fmt.Errorf("agent %s %s: %w", hostID, procListSandboxes, err)
	}
	return resp.Msg, nil
}

// DestroySandbox asks the agent at address to destroy sandboxID (the wire id,
// "cl-..."). When fence is not empty it is sent as the Vigil-Fence request
// header, so the agent can refuse a deposed owner. An agent answering
// not_found no longer has the sandbox, which is what was asked: that returns
// nil. Bounds and error wrapping are as for ListSandboxes; a call whose
// deadline passes may or may not have destroyed the sandbox.
func (p *Pool) DestroySandbox(ctx context.Context, hostID uuid.UUID, address, sandboxID, fence string) error {
	tg, err := p.target(hostID, address)
	if err != nil {
		return fmt.Errorf("agent %s %s: %w", hostID, procDestroySandbox, err)
	}
	ctx, cancel := context.WithTimeout(ctx, p.cfg.Timeout)
	defer cancel()
	req := connect.NewRequest(&hostagentv1.DestroySandboxRequest{SandboxId: sandboxID})
	req.Header().Set(targetHeader, tg.header())
	if fence != "" {
		req.Header().Set(FenceHeader, fence)
	}
	start := time.Now()
	_, err = p.destroy.CallUnary(ctx, req)
	notFound := err != nil && connect.CodeOf(err) == connect.CodeNotFound
	p.done(hostID, procDestroySandbox, err, notFound, time.Since(start))
	if err != nil && !notFound {
		return fmt.Errorf("agent %s %s: %w", hostID, procDestroySandbox, err)
	}
	return nil
}

// done records the outcome of one call that reached the transport. ok says
// an error still counts as success (not_found on DestroySandbox).
func (p *Pool) done(hostID uuid.UUID, procedure string, err error, ok bool, elapsed time.Duration) {
	if err == nil {
		p.metrics.observe(procedure, codeOK, false, elapsed)
		return
	}
	code := connect.CodeOf(err).String()
	p.metrics.observe(procedure, code, !ok, elapsed)
	if !ok {
		// The error may quote the agent's own message: bounded.
		p.log.Debug("agent call failed", "host", hostID, "procedure", procedure, "code", code, "error", logval.Err(err))
	}
}

// target returns where hostID's agent is reached, from the cache when the
// address is the one it was computed from. An empty address is
// ErrNoAddress; a refused one a *BadAddressError, counted on every call and
// logged when the pool first meets it for the host: the cache entry
// remembers it until the address changes or the host goes uncalled for
// IdleTimeout (it left this replica's shards, or stopped being online).
func (p *Pool) target(hostID uuid.UUID, address string) (target, error) {
	if address == "" {
		return target{}, ErrNoAddress
	}
	now, key := p.now(), addressKey(address)
	p.mu.Lock()
	if now.Sub(p.lastSweep) >= p.cfg.IdleTimeout {
		p.sweep(now)
	}
	old := p.targets[hostID]
	c := old
	if c == nil || c.address != key {
		c = &cachedTarget{address: key}
		c.target, c.refused = parseAddress(address, p.scheme)
		p.targets[hostID] = c
	}
	c.lastUsed = now
	tg, refused := c.target, c.refused
	p.mu.Unlock()
	if c != old { // logged outside the lock: writing a log line may block
		p.logChange(hostID, old, c, address)
	}
	if refused != "" {
		p.metrics.refused(refused)
		return target{}, &BadAddressError{Reason: refused}
	}
	return tg, nil
}

// logChange logs a host's new address: at WARN when it is refused (once per
// host and change: the value, truncated, is for the operator who must fix
// the row), at INFO when it replaces a refused one, at debug otherwise.
func (p *Pool) logChange(hostID uuid.UUID, old, c *cachedTarget, address string) {
	switch {
	case c.refused != "":
		p.log.Warn("agent address refused: the host is not reconciled until its address is fixed",
			"host", hostID, "reason", c.refused, "address", logval.String(address))
	case old != nil && old.refused != "":
		p.log.Info("agent address accepted", "host", hostID, "address", address)
	case old != nil:
		p.log.Debug("agent address changed", "host", hostID, "old", logval.String(old.address), "new", address)
	}
}

// sweep drops the targets of hosts not called for IdleTimeout, so the cache
// follows the hosts this replica calls. p.mu must be held.
func (p *Pool) sweep(now time.Time) {
	for id, c := range p.targets {
		if now.Sub(c.lastUsed) >= p.cfg.IdleTimeout {
			delete(p.targets, id)
		}
	}
	p.lastSweep = now
}

// Len returns the number of hosts whose address is cached, usable or
// refused.
func (p *Pool) Len() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return len(p.targets)
}

// Close closes the idle connections. Calls in flight are not interrupted;
// their connections return to the idle set when they finish and close after
// IdleTimeout (or at the next Close). The Pool stays usable: later calls dial
// anew. Call it on shutdown, after the callers have stopped.
func (p *Pool) Close() {
	p.tr.closeIdle()
}
