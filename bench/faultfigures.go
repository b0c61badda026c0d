package main

// The fault figures: failover (a SIGKILL of the leader, then of another
// replica), handover (SIGTERM) and unreachable detection.

import (
	"errors"
	"fmt"
	"time"
)

// killReclaimBound is SPEC §3's bound on a SIGKILLed replica's shards being
// claimed by the others while its machine is up, whatever the lease TTL.
const killReclaimBound = time.Second

// firstPassMargin is how long after killReclaimBound every moved shard's
// first completed pass may come: the new owner passes a shard at once on
// claiming it (the existing margin of this figure, which was TTL + 1 s + 1 s).
const firstPassMargin = time.Second

// faultGroup adds figures to one group of the report.
type faultGroup struct {
	rep   *report
	group string
}

// faultFigures adds the failover, handover and unreachable figures.
func faultFigures(rep *report, e *env, n int, r *faultResults) {
	o := e.opts
	passPending, peerPending := "", ""
	if !e.caps.Metrics[mLastPass] {
		passPending = "vigil metric " + mLastPass
	}
	for _, m := range peerMetrics {
		if !e.caps.Metrics[m] && peerPending == "" {
			peerPending = "vigil metric " + m
		}
	}
	g := faultGroup{rep, fmt.Sprintf("failover and handover · %s · plain · lease TTL %s, --interval %s",
		replicasLabel(n), o.FaultLeaseTTL, o.FaultInterval)}
	g.kill("leader", "the leader", r.leader, r.leaderErr, passPending, peerPending)
	g.kill("observer", "another replica", r.observer, r.observerErr, passPending, peerPending)
	g.term(r.term, r.termErr, passPending)
	unreachableFigures(rep, o, r.lags, r.unErr)
}

// kill adds one SIGKILL's figures, keyed failover.sigkill.<role>.*: the
// moved shards' claims and first passes, and the survivors' peer counters
// over the kill (revocations.failed: no_session, rate_limited or error).
func (g faultGroup) kill(role, who string, st *faultStats, err error, passPending, peerPending string) {
	k := "failover.sigkill." + role + "."
	reclaim := func(s *faultStats) []time.Duration { return s.reclaim }
	pass := func(s *faultStats) []time.Duration { return s.firstPass }
	g.count(k+"moved", "SIGKILL of "+who+": shards moved", st, err, "", func(s *faultStats) float64 { return float64(s.moved) }).pos()
	g.dur(k+"reclaim_p50", "  → claimed by another replica, p50", st, err, reclaim, true, "")
	g.dur(k+"reclaim_max", "  → claimed, max (SPEC §3: 1 s whatever the TTL)", st, err, reclaim, false, "").
		want("<=", killReclaimBound.Seconds())
	g.dur(k+"first_pass_p50", "  → first completed pass, p50", st, err, pass, true, passPending)
	g.dur(k+"first_pass_max", "  → first completed pass, max (claim bound + 1 s)", st, err, pass, false, passPending).
		want("<=", (killReclaimBound + firstPassMargin).Seconds())
	peer := func(key, name string, v func(peerCounts) float64) {
		g.count(k+"peer."+key, "  survivors' "+name, st, err, peerPending, func(s *faultStats) float64 { return v(s.peers) })
	}
	peer("confirmations", "peer confirmations (process gone)", func(p peerCounts) float64 { return p.confirmations })
	peer("revocations.revoked", "peer lease revocations: revoked", func(p peerCounts) float64 { return p.revoked("revoked") })
	peer("revocations.already_gone", "peer lease revocations: already gone", func(p peerCounts) float64 { return p.revoked("already_gone") })
	peer("revocations.failed", "peer lease revocations: failed", func(p peerCounts) float64 {
		return p.revoked("no_session", "rate_limited", "error")
	})
	peer("false_alarms", "peer false alarms", func(p peerCounts) float64 { return p.falseAlarms })
	peer("unconfirmed", "peer suspicions left to the lease", func(p peerCounts) float64 { return p.unconfirmed })
}

// term adds the SIGTERM figures.
func (g faultGroup) term(st *faultStats, err error, passPending string) {
	gaps := func(s *faultStats) []time.Duration { return s.gaps }
	pass := func(s *faultStats) []time.Duration { return s.firstPass }
	g.count("failover.sigterm.moved", "SIGTERM of a replica: shards moved", st, err, "", func(s *faultStats) float64 { return float64(s.moved) }).pos()
	g.dur("failover.sigterm.gap_p50", "  → handover gap (delete → put), p50", st, err, gaps, true, "")
	g.dur("failover.sigterm.gap_max", "  → handover gap, max", st, err, gaps, false, "").want("<", 0.5)
	g.dur("failover.sigterm.first_pass_max", "  → first completed pass, max", st, err, pass, false, passPending)
}

// count adds a count taken from one measurement.
func (g faultGroup) count(key, name string, st *faultStats, err error, pending string, v func(*faultStats) float64) *figure {
	f := g.rep.fig(g.group, key, name, "")
	switch {
	case err != nil:
		f.na(err.Error())
	case st == nil:
		f.na("not measured")
	case pending != "":
		f.pending(pending)
	default:
		f.set(v(st))
	}
	return f
}

// dur adds the median (med) or the max of one measurement's per-shard
// durations; a max falls short when a moved shard never got there.
func (g faultGroup) dur(key, name string, st *faultStats, err error, ds func(*faultStats) []time.Duration, med bool, pending string) *figure {
	f := g.rep.fig(g.group, key, name, "s").pos()
	switch {
	case err != nil:
		f.na(err.Error())
	case st == nil:
		f.na("not measured")
	case pending != "":
		f.pending(pending)
	case st.missing > 0 && !med:
		f.fail(fmt.Sprintf("%d of %d moved shards did not get there within the wait", st.missing, st.moved))
	case len(ds(st)) == 0:
		f.na("no shard measured")
	case med:
		f.set(medianDur(ds(st)).Seconds())
	default:
		f.set(maxDur(ds(st)).Seconds())
	}
	return f
}

// unreachableFigures adds the unreachable-detection figures.
func unreachableFigures(rep *report, o options, lags []time.Duration, unErr error) {
	ug := "unreachable detection · plain"
	p50 := rep.fig(ug, "unreachable.p50", fmt.Sprintf("last heartbeat → unreachable, p50 of %d hosts", o.UnreachableHosts), "s").pos()
	mx := rep.fig(ug, "unreachable.max", "last heartbeat → unreachable, max", "s").pos().
		want("<=", (o.UnreachableAfter+5*time.Second).Seconds()).note("--unreachable-after %s", o.UnreachableAfter)
	switch {
	case unErr != nil && len(lags) == 0:
		p50.na(unErr.Error())
		mx.na(unErr.Error())
	case unErr != nil:
		p50.set(medianDur(lags).Seconds())
		mx.fail(unErr.Error())
	default:
		p50.set(medianDur(lags).Seconds())
		mx.set(maxDur(lags).Seconds())
	}
}

// faultsNotRun adds the fault figures as n/a when no configuration ran them.
func faultsNotRun(rep *report, e *env, why string) {
	err := errors.New(why)
	faultFigures(rep, e, e.opts.failoverReplicas(), &faultResults{leaderErr: err, observerErr: err, termErr: err, unErr: err})
}
