package agentpool

import (
	"errors"
	"fmt"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// Procedure label values.
const (
	procListSandboxes  = "ListSandboxes"
	procDestroySandbox = "DestroySandbox"
)

// codeOK is the code label of a call that succeeded.
const codeOK = "ok"

// metrics are the pool's collectors. A nil *metrics records nothing.
//
//	vigil_agent_rpc_duration_seconds{procedure,code}  histogram of every call that reached the transport
//	vigil_agent_rpc_errors_total{procedure,code}      calls that failed (not_found on DestroySandbox is success)
//	vigil_agent_bad_addresses_total{reason}           calls refused for their host's address, before any dial
//
// procedure is "ListSandboxes" or "DestroySandbox"; code is "ok" or the
// Connect code string ("deadline_exceeded", "unavailable", ...); reason is
// one of Reasons.
type metrics struct {
	duration     *prometheus.HistogramVec
	errors       *prometheus.CounterVec
	badAddresses *prometheus.CounterVec
}

func newMetrics(reg prometheus.Registerer) (*metrics, error) {
	if reg == nil {
		return nil, nil
	}
	duration := prometheus.NewHistogramVec(prometheus.HistogramOpts{
		Name:    "vigil_agent_rpc_duration_seconds",
		Help:    "Duration of host agent RPCs by procedure and result code.",
		Buckets: []float64{.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10},
	}, []string{"procedure", "code"})
	errs := prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "vigil_agent_rpc_errors_total",
		Help: "Host agent RPCs that failed, by procedure and result code.",
	}, []string{"procedure", "code"})
	bad := prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "vigil_agent_bad_addresses_total",
		Help: "Host agent calls refused before any dial because the host's address is not [http(s)://]host:port, by reason.",
	}, []string{"reason"})
	m := &metrics{}
	var err error
	if m.duration, err = register(reg, duration); err != nil {
		return nil, err
	}
	if m.errors, err = register(reg, errs); err != nil {
		return nil, err
	}
	if m.badAddresses, err = register(reg, bad); err != nil {
		return nil, err
	}
	// Every reason from the start, so a first refusal is an increase from
	// 0 and not a new series (the vocabulary is closed).
	for _, r := range Reasons {
		m.badAddresses.WithLabelValues(r)
	}
	return m, nil
}

// refused counts a call refused for its host's address.
func (m *metrics) refused(reason string) {
	if m == nil {
		return
	}
	m.badAddresses.WithLabelValues(reason).Inc()
}

// register registers c, or returns the identical collector already registered
// (several pools in one process, e.g. `vigil dev`, then share the series).
func register[C prometheus.Collector](reg prometheus.Registerer, c C) (C, error) {
	if err := reg.Register(c); err != nil {
		var are prometheus.AlreadyRegisteredError
		if errors.As(err, &are) {
			if existing, ok := are.ExistingCollector.(C); ok {
				return existing, nil
			}
		}
		return c, fmt.Errorf("agentpool: register metrics: %w", err)
	}
	return c, nil
}

// observe records one call. failed says whether the call counts as an error.
func (m *metrics) observe(procedure, code string, failed bool, elapsed time.Duration) {
	if m == nil {
		return
	}
	m.duration.WithLabelValues(procedure, code).Observe(elapsed.Seconds())
	if failed {
		m.errors.WithLabelValues(procedure, code).Inc()
	}
}
