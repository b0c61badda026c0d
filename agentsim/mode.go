package agentsim

import (
	"bytes"
	"encoding/json"
	"fmt"
	"time"

	"github.com/vigil-sh/vigil/internal/status"
)

// Kind names how a simulated host's agent behaves.
type Kind string

// The fault modes. Only one applies at a time; SetMode replaces the previous.
const (
	// ModeHealthy answers correctly.
	ModeHealthy Kind = "healthy"
	// ModeDead writes no heartbeats and closes every RPC connection without
	// answering.
	ModeDead Kind = "dead"
	// ModeHang keeps heartbeating but blocks every RPC until the request's
	// context ends (client deadline, disconnect, or the Sim stopping), then
	// closes the connection without answering. It has no side effects.
	ModeHang Kind = "hang"
	// ModeSlow answers correctly after Mode.Delay (default 2s) plus
	// Config.Latency; a request whose context ends first is dropped without
	// side effects.
	ModeSlow Kind = "slow"
	// ModeFlap is dead for Mode.Period (default 10s) from the moment it is
	// set, then healthy for a Period, and so on.
	ModeFlap Kind = "flap"
	// ModeMalformed answers every RPC with status 200, Content-Type
	// application/proto and bytes that are not a protobuf message. No side
	// effects.
	ModeMalformed Kind = "malformed"
	// ModeOversized answers ListSandboxes with the true VMs plus padding
	// (in auto_paused_sandbox_ids, which vigil ignores) so the encoded
	// response exceeds Mode.OversizeBytes (default 8 MiB).
	ModeOversized Kind = "oversized"
	// ModeUnknownStatus reports every VM with Mode.Label (default
	// "hibernating"), a status outside the control plane's vocabulary. Use
	// SetVMStatus to give a single VM such a label instead.
	ModeUnknownStatus Kind = "unknown-status"
	// ModeDuplicateIDs reports every VM twice: first with its true status,
	// then with another one ("paused", or "running" for a paused VM).
	ModeDuplicateIDs Kind = "duplicate-ids"
	// ModeRefuseDestroy answers ListSandboxes correctly and refuses every
	// DestroySandbox with unavailable, destroying nothing: an agent that
	// keeps losing destroys (rule 9).
	ModeRefuseDestroy Kind = "refuse-destroy"
)

// Defaults for the parameters of the modes that take one.
const (
	DefaultSlowDelay     = 2 * time.Second
	DefaultFlapPeriod    = 10 * time.Second
	DefaultOversizeBytes = 8 << 20
	DefaultUnknownLabel  = "hibernating"
)

// Mode is a host's fault mode. The zero Mode is healthy.
type Mode struct {
	Kind Kind
	// Delay is ModeSlow's answer delay.
	Delay time.Duration
	// Period is ModeFlap's half-cycle.
	Period time.Duration
	// OversizeBytes is ModeOversized's lower bound on the response size.
	OversizeBytes int
	// Label is ModeUnknownStatus's status label.
	Label string
	// SkipHeartbeat stops heartbeats for the host in any mode, while its
	// agent keeps answering (the control plane lost the host, the agent did
	// not die).
	SkipHeartbeat bool
}

// normalize fills parameter defaults and rejects what cannot be simulated.
func (m Mode) normalize() (Mode, error) {
	if m.Kind == "" {
		m.Kind = ModeHealthy
	}
	switch m.Kind {
	case ModeHealthy, ModeDead, ModeHang, ModeMalformed, ModeDuplicateIDs, ModeRefuseDestroy:
	case ModeSlow:
		if m.Delay < 0 {
			return m, fmt.Errorf("agentsim: mode slow: negative delay %v", m.Delay)
		}
		if m.Delay == 0 {
			m.Delay = DefaultSlowDelay
		}
	case ModeFlap:
		if m.Period < 0 {
			return m, fmt.Errorf("agentsim: mode flap: negative period %v", m.Period)
		}
		if m.Period == 0 {
			m.Period = DefaultFlapPeriod
		}
	case ModeOversized:
		if m.OversizeBytes < 0 {
			return m, fmt.Errorf("agentsim: mode oversized: negative size %d", m.OversizeBytes)
		}
		if m.OversizeBytes == 0 {
			m.OversizeBytes = DefaultOversizeBytes
		}
	case ModeUnknownStatus:
		if m.Label == "" {
			m.Label = DefaultUnknownLabel
		}
		if status.Known(m.Label) {
			return m, fmt.Errorf("agentsim: mode unknown-status: %q is a known status", m.Label)
		}
	default:
		return m, fmt.Errorf("agentsim: unknown mode %q", m.Kind)
	}
	return m, nil
}

// modeJSON is Mode on the admin API: durations as Go duration strings.
type modeJSON struct {
	Kind          Kind   `json:"kind"`
	Delay         string `json:"delay,omitempty"`
	Period        string `json:"period,omitempty"`
	OversizeBytes int    `json:"oversize_bytes,omitempty"`
	Label         string `json:"label,omitempty"`
	SkipHeartbeat bool   `json:"skip_heartbeat,omitempty"`
}

// MarshalJSON encodes durations as strings such as "1.5s".
func (m Mode) MarshalJSON() ([]byte, error) {
	j := modeJSON{Kind: m.Kind, OversizeBytes: m.OversizeBytes, Label: m.Label, SkipHeartbeat: m.SkipHeartbeat}
	if j.Kind == "" {
		j.Kind = ModeHealthy
	}
	if m.Delay != 0 {
		j.Delay = m.Delay.String()
	}
	if m.Period != 0 {
		j.Period = m.Period.String()
	}
	return json.Marshal(j)
}

// UnmarshalJSON accepts the form MarshalJSON writes.
func (m *Mode) UnmarshalJSON(b []byte) error {
	var j modeJSON
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&j); err != nil {
		return err
	}
	out := Mode{Kind: j.Kind, OversizeBytes: j.OversizeBytes, Label: j.Label, SkipHeartbeat: j.SkipHeartbeat}
	var err error
	if j.Delay != "" {
		if out.Delay, err = time.ParseDuration(j.Delay); err != nil {
			return fmt.Errorf("delay: %w", err)
		}
	}
	if j.Period != "" {
		if out.Period, err = time.ParseDuration(j.Period); err != nil {
			return fmt.Errorf("period: %w", err)
		}
	}
	*m = out
	return nil
}

// modeState is a host's mode and when it was set (ModeFlap's phase origin).
type modeState struct {
	Mode
	since time.Time
}

// phase is what the host does at now: ModeFlap resolves to dead or healthy.
func (m *modeState) phase(now time.Time) Kind {
	if m.Kind != ModeFlap {
		return m.Kind
	}
	if (now.Sub(m.since)/m.Period)%2 == 0 {
		return ModeDead
	}
	return ModeHealthy
}

// heartbeats reports whether the control plane hears from the host at now.
func (m *modeState) heartbeats(now time.Time) bool {
	return !m.SkipHeartbeat && m.phase(now) != ModeDead
}
