package agentpool

import (
	"errors"
	"fmt"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/prometheus/client_golang/prometheus"
)

// Defaults applied by Config.Validate to zero fields.
const (
	DefaultTimeout          = 5 * time.Second
	DefaultMaxResponseBytes = 4 << 20 // 4 MiB
	DefaultMaxIdleConns     = 3500
	DefaultIdleTimeout      = 90 * time.Second
	DefaultTLSSessions      = 16384
)

// Config configures a Pool. The zero value is valid: plain HTTP, 5 s per call,
// 4 MiB per response, 3500 idle connections idle for at most 90 s, no logs,
// no metrics.
type Config struct {
	// Timeout bounds every call: each call runs under a deadline of Timeout
	// from its start, or the caller's deadline when that is sooner. It also
	// bounds dialling and the TLS handshake. Zero means DefaultTimeout.
	Timeout time.Duration

	// MaxResponseBytes caps the size of one response message (after
	// decompression). A larger answer fails with connect.CodeResourceExhausted
	// and is never held in memory whole. Zero means DefaultMaxResponseBytes.
	MaxResponseBytes int

	// MaxIdleConns caps the idle keep-alive connections kept across all
	// agents (at most one per agent): a file descriptor each, no goroutine.
	// A connection returning to a full pool is closed, so with more agents
	// than the cap a fixed subset keeps its connection and the rest dial
	// anew (resuming their TLS sessions). Zero means DefaultMaxIdleConns.
	MaxIdleConns int

	// IdleTimeout closes an idle connection, and drops an agent's cached
	// client, once the agent was not called for this long. Set it a little
	// above the reconcile interval so a connection lives from one pass to
	// the next and no longer. Zero means DefaultIdleTimeout.
	IdleTimeout time.Duration

	// TLSSessions is how many agents' TLS sessions are kept for resumption
	// (a resumed handshake skips certificate signing and verification).
	// Zero means DefaultTLSSessions; it matters only with mutual TLS.
	TLSSessions int

	// CAFile, CertFile and KeyFile enable mutual TLS: the agents' certificates
	// are verified against the PEM CA bundle in CAFile, and the pool presents
	// the PEM certificate and key in CertFile and KeyFile. Set all three or
	// none; with them set, addresses without a scheme get "https://".
	CAFile, CertFile, KeyFile string

	// Logger receives a WARN line per host and refused address (the value
	// cut by logval), and debug logs about address changes and failed
	// calls. Nil means hclog.NewNullLogger().
	Logger hclog.Logger

	// Registerer receives the pool's metrics (see New). Nil means no metrics.
	Registerer prometheus.Registerer
}

// Validate fills defaults into zero fields and reports the first invalid
// field by name. It does not read the TLS files; New does.
func (c *Config) Validate() error {
	if c.Timeout < 0 {
		return fmt.Errorf("agentpool: Timeout must not be negative, got %s", c.Timeout)
	}
	if c.Timeout == 0 {
		c.Timeout = DefaultTimeout
	}
	if c.MaxResponseBytes < 0 {
		return fmt.Errorf("agentpool: MaxResponseBytes must not be negative, got %d", c.MaxResponseBytes)
	}
	if c.MaxResponseBytes == 0 {
		c.MaxResponseBytes = DefaultMaxResponseBytes
	}
	switch {
	case c.MaxIdleConns < 0:
		return fmt.Errorf("agentpool: MaxIdleConns must not be negative, got %d", c.MaxIdleConns)
	case c.IdleTimeout < 0:
		return fmt.Errorf("agentpool: IdleTimeout must not be negative, got %s", c.IdleTimeout)
	case c.TLSSessions < 0:
		return fmt.Errorf("agentpool: TLSSessions must not be negative, got %d", c.TLSSessions)
	}
	if c.MaxIdleConns == 0 {
		c.MaxIdleConns = DefaultMaxIdleConns
	}
	if c.IdleTimeout == 0 {
		c.IdleTimeout = DefaultIdleTimeout
	}
	if c.TLSSessions == 0 {
		c.TLSSessions = DefaultTLSSessions
	}
	if err := c.validateTLS(); err != nil {
		return err
	}
	if c.Logger == nil {
		c.Logger = hclog.NewNullLogger()
	}
	return nil
}

// validateTLS enforces "all three or none" on the TLS files. The error names
// a field that is set and one that is missing, pairing CertFile with KeyFile
// first because those two only make sense together.
func (c *Config) validateTLS() error {
	ca, cert, key := c.CAFile != "", c.CertFile != "", c.KeyFile != ""
	switch {
	case cert && !key:
		return errors.New("agentpool: CertFile set without KeyFile")
	case key && !cert:
		return errors.New("agentpool: KeyFile set without CertFile")
	case cert && !ca: // key is set too
		return errors.New("agentpool: CertFile and KeyFile set without CAFile")
	case ca && !cert: // key is unset too
		return errors.New("agentpool: CAFile set without CertFile and KeyFile")
	}
	return nil
}

// tlsEnabled reports whether mutual TLS is configured. Valid only after
// Validate.
func (c *Config) tlsEnabled() bool { return c.CAFile != "" }
