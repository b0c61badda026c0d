package main

// The order of a run: set-up; per transport, the fleet, the two references,
// then every replica count (steady sweeps, the changing sweep, and on the
// largest plain cluster failover, handover and unreachable detection);
// cross-configuration ratios; tear-down. A failed measurement leaves its
// figures n/a with the reason and the run goes on; set-up failures and
// cancellation end it.

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"
)

func runBench(ctx context.Context, o options, log *progress) (rep *report, err error) {
	rep = newReport(o)
	e, err := setUp(ctx, o, log)
	defer func() {
		if ctx.Err() == nil && (err != nil || len(rep.Errors) > 0) {
			e.failed = true
		}
		e.close()
	}()
	rep.Machine, rep.Capabilities, rep.Revision = e.mach, e.caps, gitRevision(ctx)
	if err != nil {
		return rep, fmt.Errorf("set-up: %w", err)
	}
	logCapabilities(log, e.caps)
	var run []string
	for _, tr := range o.Transports {
		if tr == "mtls" && !e.caps.AgentsimTLS {
			transportNotRun(rep, e, tr, "", "agentsim --tls-ca-file/--tls-cert-file/--tls-key-file")
			continue
		}
		run = append(run, tr)
	}
	sched := newSchedule(o, e.log.start, run)
	steady := map[string]*sweepStats{}
	faultsRan := false
	for _, tr := range run {
		sched.transportsLeft--
		if err := runTransport(ctx, e, rep, sched, tr, steady, &faultsRan); err != nil {
			return rep, err
		}
	}
	switch {
	case faultsRan:
	case o.failoverReplicas() == 0 || !slices.Contains(o.Transports, "plain"):
		rep.Notes = append(rep.Notes, "failover, handover and unreachable detection not measured: they need -replicas with a count of at least 2 and -transports with plain")
	default:
		faultsNotRun(rep, e, "the plain "+replicasLabel(o.failoverReplicas())+" configuration did not get that far")
	}
	crossFigures(rep, e, steady)
	return rep, ctx.Err()
}

// schedule spreads what is left of -budget over what is left to measure, in
// units: one per configuration, one more for failover, handover and
// unreachable detection. Each transport's fleet start and references, and
// the tear-down, are set aside first. A slow vigil then gets shorter
// measurements, whose figures say so, instead of a run that overruns.
type schedule struct {
	deadline       time.Time
	unitsLeft      int
	transportsLeft int           // transports after the current one
	perTransport   time.Duration // fleet start and references
}

const teardownReserve = 15 * time.Second

func newSchedule(o options, start time.Time, transports []string) *schedule {
	// The references' two windows, the fleet's start, and the ceiling's
	// warm-up round (a connection, and under TLS a handshake, per host).
	perTransport := 2*o.Duration + 5*time.Second + time.Duration(o.Hosts)*2*time.Millisecond
	s := &schedule{deadline: start.Add(o.Budget), transportsLeft: len(transports), perTransport: perTransport}
	for _, tr := range transports {
		for _, n := range o.Replicas {
			s.unitsLeft += configUnits(o, n, tr)
		}
	}
	return s
}

func configUnits(o options, n int, tr string) int {
	if n == o.failoverReplicas() && tr == "plain" {
		return 2
	}
	return 1
}

// take returns the share of the remaining time for a step worth units.
func (s *schedule) take(units int) time.Duration {
	left := time.Until(s.deadline) - time.Duration(s.transportsLeft)*s.perTransport - teardownReserve
	share := left * time.Duration(units) / time.Duration(max(s.unitsLeft, units))
	s.unitsLeft -= units
	return max(share, 0)
}

func logCapabilities(log *progress, c capabilities) {
	var missing []string
	if !c.AgentsimLatency {
		missing = append(missing, "agentsim --latency")
	}
	if !c.AgentsimTLS {
		missing = append(missing, "agentsim TLS flags")
	}
	if !c.VigilAgentConcurrency {
		missing = append(missing, "vigil --agent-concurrency")
	}
	if !c.VigilDebugPprof {
		missing = append(missing, "vigil --debug-pprof")
	}
	for _, m := range append([]string{mStatements, mWriteTxns, mLastSuccess, mLastPass, mReconciles, mTransitions}, peerMetrics...) {
		if !c.Metrics[m] {
			missing = append(missing, m)
		}
	}
	if len(missing) > 0 {
		log.printf("not in these binaries yet (their figures are n/a): %v", missing)
	}
}

func runTransport(ctx context.Context, e *env, rep *report, sched *schedule, tr string, steady map[string]*sweepStats, faultsRan *bool) error {
	o := e.opts
	log := e.log
	nSims := (o.Hosts + o.HostsPerAgentsim - 1) / o.HostsPerAgentsim
	log.printf("%s: starting agentsim: %d hosts × %d sandboxes in %d processes", tr, o.Hosts, o.Sandboxes, nSims)
	fl, err := startFleet(ctx, e, tr == "mtls", tr)
	if err != nil {
		fl.stop()
		if ctx.Err() != nil {
			return ctx.Err()
		}
		rep.errorf("%s fleet: %v", tr, err)
		transportNotRun(rep, e, tr, "fleet did not start: "+err.Error(), "")
		for _, n := range o.Replicas {
			sched.take(configUnits(o, n, tr))
		}
		return nil
	}
	defer fl.stop()
	log.printf("%s: fleet ready; RPC ceiling and seed loop, %s each", tr, o.Duration)
	ref, ceilErr, loopErr := measureReferences(ctx, e, fl)
	if ctx.Err() != nil {
		return ctx.Err()
	}
	referenceFigures(rep, tr, ref, ceilErr, loopErr, "")
	if ceilErr == nil && loopErr == nil {
		log.printf("%s: ceiling %.0f hosts/s, seed loop %.0f hosts/s", tr, ref.Ceiling, ref.Loop)
	} else {
		rep.errorf("%s references: ceiling: %v; loop: %v", tr, ceilErr, loopErr)
	}
	for _, n := range o.Replicas {
		share := sched.take(configUnits(o, n, tr))
		if err := runConfig(ctx, e, rep, fl, &ref, n, tr, share, steady, faultsRan); err != nil {
			return err
		}
	}
	var rss float64
	for _, s := range fl.sims {
		if v, err := procStatusBytes(s.pid(), "VmHWM"); err == nil {
			rss += v
		}
	}
	rep.fig("references · "+tr, "references."+tr+".agentsim_rss_mib", fmt.Sprintf("agentsim peak RSS (%d processes, sum)", len(fl.sims)), "MiB").pos().set(rss / (1 << 20))
	return nil
}

func measureReferences(ctx context.Context, e *env, fl *fleet) (ref refResult, ceilErr, loopErr error) {
	rf, err := newRPCFleet(e, fl)
	if err != nil {
		return ref, err, err
	}
	defer rf.close()
	ref.Ceiling, ref.CeilingErrs, ceilErr = measureCeiling(ctx, rf, e.opts.InFlight, e.opts.Sandboxes, e.opts.Duration)
	ref.Loop, ref.LoopHosts, loopErr = measureSeedLoop(ctx, e, rf, e.opts.Duration)
	return ref, ceilErr, loopErr
}

func referenceFigures(rep *report, tr string, ref refResult, ceilErr, loopErr error, pending string) {
	group := "references · " + tr
	ceil := rep.fig(group, "references."+tr+".ceiling", fmt.Sprintf("RPC ceiling (%s)", "bare ListSandboxes, no database"), "hosts/s").pos()
	loop := rep.fig(group, "references."+tr+".seed_loop", "seed loop (one host at a time: RPC + 3 queries)", "hosts/s").pos()
	set := func(f *figure, v float64, err error) {
		switch {
		case pending != "":
			f.pending(pending)
		case err != nil:
			f.na(err.Error())
		default:
			f.set(v)
		}
	}
	set(ceil, ref.Ceiling, ceilErr)
	set(loop, ref.Loop, loopErr)
	if pending == "" && loopErr == nil {
		loop.note("%d hosts in the window", ref.LoopHosts)
	}
}

// runConfig measures one replica count on one transport. It returns an
// error only when the run is cancelled.
func runConfig(ctx context.Context, e *env, rep *report, fl *fleet, ref *refResult, n int, tr string, share time.Duration, steady map[string]*sweepStats, faultsRan *bool) error {
	o := e.opts
	log := e.log
	label := fmt.Sprintf("%s, %s", replicasLabel(n), tr)
	start := time.Now()
	units := configUnits(o, n, tr)
	sweepsBy := start.Add(share / time.Duration(units))
	fail := func(step string, err error, c *cluster) error {
		if ctx.Err() != nil {
			return ctx.Err()
		}
		rep.errorf("%s: %s: %v", label, step, err)
		log.printf("%s: %s failed: %v", label, step, err)
		return nil
	}
	log.printf("%s: starting replicas (%s of the budget)", label, share.Round(time.Second))
	c, err := newCluster(ctx, e, tr, n, o.Interval, o.LeaseTTL)
	if err != nil {
		configNotRun(rep, e, n, tr, "replicas did not start: "+err.Error(), "")
		return fail("start", err, nil)
	}
	defer c.close()
	c.deadline = sweepsBy
	if err := c.warmUp(ctx, fl); err != nil {
		c.close()
		configNotRun(rep, e, n, tr, "cluster did not settle and sweep: "+err.Error(), "")
		return fail("warm-up", err, c)
	}
	warmFigures(rep, n, tr, c)

	profiled := func() {}
	if o.Profile && n == 1 {
		profiled = startProfile(ctx, e, rep, c.liveReplicas()[0], label, "1replica-steady-"+tr)
	}
	log.printf("%s: steady sweeps (at least %d and %s)", label, o.Sweeps, o.Duration)
	st, err := c.measureSteady(ctx, fl, o.Sweeps, o.Duration)
	sweepFigures(rep, e, n, tr, "steady", st, ref, nil, errString(err), "")
	if err != nil {
		if err := fail("steady sweeps", err, c); err != nil {
			return err
		}
	} else {
		steady[fmt.Sprintf("%dr.%s", n, tr)] = st
		c.steadySweep = st.median()
		log.printf("%s: steady sweep %.3fs (%.0f hosts/s)", label, st.median().Seconds(), float64(o.Hosts)/st.median().Seconds())
	}
	profiled()

	log.printf("%s: changing sweep (%.0f %% of sandboxes)", label, o.ChangeFraction*100)
	ch, err := c.measureChanging(ctx, fl, st)
	sweepFigures(rep, e, n, tr, "changing", ch, ref, st, errString(err), "")
	if err != nil {
		if err := fail("changing sweep", err, c); err != nil {
			return err
		}
	} else {
		log.printf("%s: changing sweep %.3fs", label, ch.median().Seconds())
	}

	c.close()
	resourceFigures(rep, n, tr, c, "", "")
	if n == o.failoverReplicas() && tr == "plain" {
		// Faults on a cluster at a deployment's load (-fault-interval),
		// not flat out: the bounds of SPEC §3 are about ownership, which
		// a saturated machine delays for reasons of its own. Its lease TTL
		// is vigil's default (-fault-lease-ttl): a SIGKILLed replica's
		// shards must move within 1 s whatever the TTL.
		*faultsRan = true
		log.printf("%s: failover cluster with --interval %s, --lease-ttl %s", label, o.FaultInterval, o.FaultLeaseTTL)
		fc, err := newCluster(ctx, e, tr, n, o.FaultInterval, o.FaultLeaseTTL)
		if err != nil {
			faultsNotRun(rep, e, "replicas did not start: "+err.Error())
			return fail("failover cluster", err, nil)
		}
		defer fc.close()
		fc.deadline = start.Add(share)
		if err := fc.warmUp(ctx, fl); err != nil {
			faultsNotRun(rep, e, "cluster did not settle and sweep: "+err.Error())
			return fail("failover warm-up", err, fc)
		}
		if err := runFaults(ctx, e, rep, fc, fl, n); err != nil {
			return err
		}
	}
	return ctx.Err()
}

// runFaults measures, on the failover cluster, a SIGKILL of the leader; once
// restore has brought the cluster back to n settled replicas (a replacement
// for the leader), a SIGKILL of the oldest replica other than the leader
// (the "observer"); then a SIGTERM and unreachable detection. Each kill thus
// starts from n settled replicas.
func runFaults(ctx context.Context, e *env, rep *report, c *cluster, fl *fleet, n int) error {
	label := replicasLabel(n) + ", plain"
	var r faultResults
	steps := []struct {
		what string
		st   **faultStats
		err  *error
		run  func() (*faultStats, error)
	}{
		{"SIGKILL of the leader", &r.leader, &r.leaderErr, func() (*faultStats, error) { return c.measureKill(ctx, true) }},
		{"SIGKILL of another replica", &r.observer, &r.observerErr, func() (*faultStats, error) { return c.measureKill(ctx, false) }},
		{"SIGTERM of a replica", &r.term, &r.termErr, func() (*faultStats, error) { return c.measureTerm(ctx) }},
	}
	for _, s := range steps {
		e.log.printf("%s: %s", label, s.what)
		*s.st, *s.err = s.run()
		if ctx.Err() != nil {
			return ctx.Err()
		}
		if *s.err != nil {
			rep.errorf("%s: %s: %v", label, s.what, *s.err)
		} else {
			e.log.printf("%s: %s: %s", label, s.what, (*s.st).summary())
		}
		if err := c.restore(ctx, n); err != nil {
			if ctx.Err() != nil {
				return ctx.Err()
			}
			rep.errorf("%s: restore after %s: %v", label, s.what, err)
		}
	}
	e.log.printf("%s: unreachable detection (%d hosts stop heartbeating)", label, e.opts.UnreachableHosts)
	r.lags, r.unErr = measureUnreachable(ctx, c, fl, e.opts.UnreachableHosts)
	if ctx.Err() != nil {
		return ctx.Err()
	}
	if r.unErr != nil {
		rep.errorf("%s: unreachable detection: %v", label, r.unErr)
	}
	faultFigures(rep, e, n, &r)
	return nil
}

// startProfile starts fetching a CPU profile of r, to overlap the steady
// sweeps; the function it returns waits for it and records the outcome.
func startProfile(ctx context.Context, e *env, rep *report, r *replica, label, name string) (wait func()) {
	if !e.caps.VigilDebugPprof {
		rep.Notes = append(rep.Notes, "profile: vigil has no --debug-pprof yet")
		return func() {}
	}
	done := make(chan struct{})
	var path string
	var err error
	go func() {
		defer close(done)
		path, err = saveProfile(ctx, r, e.opts, rep.Started, name)
	}()
	return func() {
		<-done
		if err != nil {
			rep.errorf("profile: %v", err)
			return
		}
		rep.Profiles = append(rep.Profiles, path)
		e.log.printf("%s: CPU profile saved to %s", label, path)
	}
}

// saveProfile fetches a CPU profile of r over max(5 s, -duration) and writes
// it beside the results.
func saveProfile(ctx context.Context, r *replica, o options, started time.Time, name string) (string, error) {
	secs := max(5, int(o.Duration.Seconds()))
	b, err := r.profile(ctx, secs)
	if err != nil {
		return "", err
	}
	if err := os.MkdirAll(o.Out, 0o755); err != nil {
		return "", err
	}
	p := filepath.Join(o.Out, started.Format("20060102T150405Z")+"-cpu-"+name+".pprof")
	if err := os.WriteFile(p, b, 0o644); err != nil {
		return "", err
	}
	// The heap at the end of the CPU profile's window, beside it.
	if h, err := r.heap(ctx); err == nil {
		_ = os.WriteFile(strings.Replace(p, "-cpu-", "-heap-", 1), h, 0o644)
	}
	return p, nil
}

// configNotRun adds one configuration's figures as n/a.
func configNotRun(rep *report, e *env, n int, tr, why, pending string) {
	sweepFigures(rep, e, n, tr, "steady", nil, nil, nil, why, pending)
	sweepFigures(rep, e, n, tr, "changing", nil, nil, nil, why, pending)
	resourceFigures(rep, n, tr, nil, why, pending)
}

// transportNotRun adds every figure of a transport as n/a.
func transportNotRun(rep *report, e *env, tr, why, pending string) {
	err := errors.New(why)
	referenceFigures(rep, tr, refResult{}, err, err, pending)
	for _, n := range e.opts.Replicas {
		configNotRun(rep, e, n, tr, why, pending)
	}
}

// crossFigures compares configurations: mTLS against plain per replica
// count.
func crossFigures(rep *report, e *env, steady map[string]*sweepStats) {
	if len(e.opts.Transports) < 2 {
		return
	}
	for _, n := range e.opts.Replicas {
		f := rep.fig("mutual TLS against plain HTTP", fmt.Sprintf("cross.%dr.mtls_vs_plain", n),
			fmt.Sprintf("mTLS ÷ plain steady hosts/s, %s", replicasLabel(n)), "×").pos().want(">=", 0.7)
		plain, mtls := steady[fmt.Sprintf("%dr.plain", n)], steady[fmt.Sprintf("%dr.mtls", n)]
		switch {
		case !e.caps.AgentsimTLS:
			f.pending("agentsim --tls-ca-file/--tls-cert-file/--tls-key-file")
		case plain == nil || mtls == nil:
			f.na("a steady sweep is missing")
		default:
			f.set(plain.median().Seconds() / mtls.median().Seconds())
		}
	}
}

func errString(err error) string {
	if err == nil {
		return ""
	}
	return err.Error()
}
