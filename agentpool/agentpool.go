// Package agentpool owns vigil's connections to host agents: HTTP/1.1 only
// (the agents disable HTTP/2), the Connect protocol with the binary protobuf
// codec (connect-go's defaults, except that gzip is not offered, so answers
// come uncompressed), over mutual TLS when configured. Its own small HTTP/1.1
// transport keeps idle connections without goroutines, so an owner can keep
// its agents' connections open between passes.
//
// Every call is bounded in time (Config.Timeout) and in response size
// (Config.MaxResponseBytes), so one slow, hung or lying agent costs its caller
// at most one timeout and a bounded amount of memory.
package agentpool

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/url"
	"os"
	"strings"
	"sync"
	"time"

	"connectrpc.com/connect"
	"github.com/google/uuid"
	"github.com/hashicorp/go-hclog"

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

// target is where one agent is reached: the base URL's parts.
type target struct {
	scheme, host, prefix string
}

type cachedTarget struct {
	address  string // as passed by the caller, before normalisation
	target   target
	lastUsed time.Time
}

// New validates cfg (see Config.Validate), loads the TLS files when set, and
// registers the metrics with cfg.Registerer when it is non-nil:
//
//	vigil_agent_rpc_duration_seconds{procedure,code}  histogram of calls that reached the transport
//	vigil_agent_rpc_errors_total{procedure,code}      of those, the ones that failed
//
// procedure is "ListSandboxes" or "DestroySandbox"; code is "ok" or the
// Connect code string ("deadline_exceeded", "unavailable", ...). A not_found
// answer to DestroySandbox is observed with code "not_found" but is not an
// error. Calls refused before any request (empty or unparsable address) are
// not observed. If the metrics are already registered with the same
// Registerer, the existing ones are shared.
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
		maxHeader: maxResponseHeaderBytes, now: func() time.Time { return p.now() }, idle: map[string]*conn{}}
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

// header is the target as targetHeader carries it: "scheme://host" and the
// path prefix.
func (tg target) header() string { return tg.scheme + "://" + tg.host + tg.prefix }

// parseTarget reverses header.
func parseTarget(h string) (target, bool) {
	scheme, rest, ok := strings.Cut(h, "://")
	if !ok || rest == "" {
		return target{}, false
	}
	host, prefix := rest, ""
	if i := strings.IndexByte(rest, '/'); i >= 0 {
		host, prefix = rest[:i], rest[i:]
	}
	return target{scheme: scheme, host: host, prefix: prefix}, host != ""
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
	req.URL.Path = tg.prefix + req.URL.Path
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
// (errors.Is(err, ErrNoAddress)).
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
		p.log.Debug("agent call failed", "host", hostID, "procedure", procedure, "code", code, "error", err)
	}
}

// target returns where hostID's agent is reached, from the cache when the
// address is the one it was computed from.
func (p *Pool) target(hostID uuid.UUID, address string) (target, error) {
	now := p.now()
	p.mu.Lock()
	defer p.mu.Unlock()
	if now.Sub(p.lastSweep) >= p.cfg.IdleTimeout {
		p.sweep(now)
	}
	if c, ok := p.targets[hostID]; ok && c.address == address {
		c.lastUsed = now
		return c.target, nil
	}
	base, err := p.baseURL(address)
	if err != nil {
		return target{}, err
	}
	u, err := url.Parse(base)
	if err != nil {
		return target{}, fmt.Errorf("agentpool: bad address %q: %w", address, err)
	}
	host := u.Host
	if u.Port() == "" {
		host = net.JoinHostPort(u.Hostname(), map[string]string{"http": "80", "https": "443"}[u.Scheme])
	}
	if old, ok := p.targets[hostID]; ok {
		p.log.Debug("agent address changed", "host", hostID, "old", old.address, "new", address)
	}
	tg := target{scheme: u.Scheme, host: host, prefix: u.EscapedPath()}
	p.targets[hostID] = &cachedTarget{address: address, target: tg, lastUsed: now}
	return tg, nil
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

// baseURL turns a hosts.address ("ip:port", or a full URL) into the base URL
// the Connect client appends procedure paths to. An address without a scheme
// gets "https://" when TLS is configured and "http://" otherwise; an explicit
// http or https scheme is kept as given.
func (p *Pool) baseURL(address string) (string, error) {
	if strings.TrimSpace(address) == "" {
		return "", ErrNoAddress
	}
	raw := address
	if !strings.Contains(raw, "://") {
		raw = p.scheme + "://" + raw
	}
	u, err := url.Parse(raw)
	if err != nil {
		return "", fmt.Errorf("agentpool: bad address %q: %w", address, err)
	}
	switch {
	case u.Scheme != "http" && u.Scheme != "https":
		return "", fmt.Errorf("agentpool: bad address %q: scheme must be http or https", address)
	case u.Host == "":
		return "", fmt.Errorf("agentpool: bad address %q: no host", address)
	case u.User != nil || u.RawQuery != "" || u.Fragment != "":
		return "", fmt.Errorf("agentpool: bad address %q: must be host:port or a base URL without user info, query or fragment", address)
	}
	return strings.TrimSuffix(u.String(), "/"), nil
}

// Len returns the number of hosts whose address is cached.
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
