package chaos

import (
	"encoding/json"
	"fmt"
	"io"
	"os"
	"sort"
	"strings"
	"time"

	"github.com/google/uuid"

	"github.com/vigil-sh/vigil/agentsim"
)

// Violation categories; any entry in one fails the run.
const (
	vStale       = "stale writes"
	vDouble      = "double-acted hosts"
	vShared      = "tokens written by two replicas"
	vOwner       = "writes under a token the writer did not hold"
	vLost        = "lost transitions"
	vAgent       = "agent disagreements"
	vEventsLost  = "events committed but not in the stream"
	vEventsDup   = "events in the stream twice"
	vEventsSpur  = "events in the stream without a committed change"
	vEventsBad   = "events whose payload does not say what their change was"
	vEventsOrder = "events out of commit order in their shard's stream"
	vMirror      = "stream entries the mirror did not carry exactly once"
	vRetry       = "stuck destroys mishandled (SPEC §2 rule 9)"
	vVolumes     = "volumes not detached as SPEC §2 rule 11 says"
	vForbidden   = "writes to rows vigil must not write"
	vCrash       = "replica crashes"
	vEtcd        = "etcd record impossibilities"
	vCutOff      = "cut-off owners acting after their successor claimed"
	vRecover     = "faults the cluster did not recover from"
	vBite        = "the test does not bite"
)

var categories = []string{vStale, vDouble, vShared, vOwner, vLost, vRetry, vVolumes, vAgent, vEventsLost, vEventsDup, vEventsSpur,
	vEventsBad, vEventsOrder, vMirror, vForbidden, vCrash, vEtcd, vCutOff, vRecover, vBite}

// Report is a run's figures and verdict.
type Report struct {
	Seed      int64
	Duration  time.Duration
	Quiet     time.Duration
	BuildTags []string
	LeaseTTL  time.Duration

	Faults     map[string]int
	Violations map[string][]string

	Failover             map[string][]time.Duration // by fault kind: owner loss -> first fenced write (the raise) by the new owner
	FailoverCalm         []time.Duration            // outside etcd leader changes (one-way faults excluded)
	FailoverOver         int                        // of FailoverCalm, beyond lease TTL + 1s
	FailoverLeader       []time.Duration            // with an etcd leader change in the window
	HandoverGaps         []time.Duration            // release -> claim during rolling restarts and scale-downs
	CutOff               []cutOff
	PartitionMoves       int // while a follower was partitioned
	Partitions           int
	PartitionMovesLeader int // while the leader was partitioned (an election follows)
	PartitionsLeader     int

	// Crash failover (SPEC §3 bounds), every kill, the vigil leader or not.
	Crash []crashKill
	// The peers' revocations (election/peer.go), from the replicas' logs.
	PeerRevocations int            // "peer process gone" lines
	PeerHandedOff   int            // revocations after a peer's hand-over (a graceful stop's end)
	PeerNotLive     map[string]int // revocations whose victim was not live, by why
	PeerLive        []string       // revocations of live replicas, each with the fault active then
	PeersWatched    []string       // vigil_peers_watched of each live replica at its last scrape
	PeersExpected   int            // the other live replicas each should watch

	FenceRejections float64 // Postgres fence, summed over replicas
	// Postgres failovers (the failover-* faults): how many by replication
	// mode, what they lost, and the fenced writes refused because the
	// database had changed since their fence was raised (each followed by
	// a new claim: ownership verified again in etcd before the next write).
	Failovers            map[string]int
	LostJournal          int
	LostRaises           int
	LostEvents           int
	DatabaseChanges      float64 // vigil_fence_database_changes_total, summed over replicas
	FencedTransactions   float64 // vigil_db_write_transactions_total{result="fenced"}
	AgentFenceRejections int     // DestroySandbox refused for a stale token
	DestroysAccepted     int
	JournalRows          int
	FenceRaises          int
	LateWrites           int // began after their owner key was deleted, committed before the successor's raise
	EtcdLeaderChanges    int
	WatchResumes         int
	Replicas             int // processes started

	// Targets are figures that missed their target (not failing the run:
	// they are about timing, not safety).
	Targets []string

	Workload map[string]int
	Vigil    map[string]float64 // counters summed over the replicas
	Events   string             // why the event checks are off
	Rule9    string             // the stuck destroys' figures
	Volumes  string             // the volumes' figures (rule 11)
	Notes    []string

	// Events (SPEC §6), when vigil has them.
	EventsOn          bool
	EventsExpected    int // committed audit rows that publish an event
	EventsCommitted   int // committed outbox rows
	EventsPublished   int // distinct vigil_ids in the stream
	EventsLost        int
	EventsDup         int
	EventsSpurious    int // spurious or with a wrong payload
	EventsOutOfOrder  int
	EventsBeyond      int // stream entries of events committed after the final snapshot
	EventsDrain       time.Duration
	EventsDrained     bool
	EventDelays       []time.Duration // commit -> XADD, every published event
	EventDelaysOutage []time.Duration // those that waited through a Redis outage
	EventDelaysCalm   []time.Duration // the others
	EventsOldestMax   float64         // max of vigil_events_oldest_pending_age_seconds over the run's scrapes
	Mirror            string          // what the mirror carried, "" without one

	Failed    bool
	CheckTime time.Duration
	Dir       string // kept files, for a failed run
}

// cutOff is one owner cut off from etcd (or frozen): when it last acted on
// a lost shard and when the first successor claimed one.
type cutOff struct {
	kind, victim string
	lastAct      time.Time // last commit under an old token after the fault began (zero: none)
	firstClaim   time.Time
	margin       time.Duration // firstClaim - lastAct over the shards (minimum)
	haveMargin   bool
	steppedDown  time.Time // cut off from etcd: when its log says it stepped down (zero: not found)
	keysDeleted  bool      // delete-owner-keys: acting after the claim is expected, the fences decide
}

// ownerLoss reports whether a fault takes ownership from a replica.
func ownerLoss(kind string) bool {
	switch kind {
	case "kill", "pause", "pause-in-tx", "pause-pg-stalled", "stall-in-tx", "cut-etcd", "cut-both", "one-way-etcd-answers", "one-way-etcd-requests", "delete-owner-keys":
		return true
	}
	return false
}

func (e *env) check(h *history) *Report {
	rep := &Report{
		Seed: e.cfg.Seed, Duration: e.cfg.Duration, Quiet: e.cfg.Quiet, BuildTags: e.cfg.BuildTags, LeaseTTL: e.cfg.LeaseTTL,
		Faults: map[string]int{}, Violations: map[string][]string{},
		Failover: map[string][]time.Duration{}, Workload: map[string]int{}, Vigil: map[string]float64{},
		JournalRows: len(h.journal), FenceRaises: len(h.raises),
	}
	add := func(cat string, items ...string) { rep.Violations[cat] = append(rep.Violations[cat], items...) }

	// The safety checks count what failovers lost as having happened: its
	// writers acted on it.
	e.mu.Lock()
	losses := append([]*lostCommits(nil), e.losses...)
	e.mu.Unlock()
	rep.Failovers = map[string]int{}
	lostEvents := map[string]bool{}
	for _, l := range losses {
		rep.Failovers[l.mode]++
		rep.LostJournal += len(l.journal)
		rep.LostRaises += len(l.raises)
		for id := range l.events {
			lostEvents[id] = true
		}
	}
	rep.LostEvents = len(lostEvents)
	journal, raises := withLost(h.journal, h.raises, losses)
	add(vStale, staleWrites(journal, raises)...)
	dh, st := doubleActing(journal)
	add(vDouble, dh...)
	add(vShared, st...)
	wrong, late := e.ownership(h.journal)
	add(vOwner, wrong...)
	rep.LateWrites = late
	add(vEtcd, e.rec.Violations()...)
	add(vAgent, agentDisagreements(h.destroy)...)
	add(vCrash, e.crashes()...)

	e.work.mu.Lock()
	skip := map[uuid.UUID]bool{}
	for k := range e.work.bad.excluded {
		skip[k] = true
	}
	for k := range e.work.bad.deleted {
		skip[k] = true
	}
	badHosts, quarantined := e.work.bad.badHosts, e.work.bad.quarantined
	stuck := map[uuid.UUID]stuckRow{}
	stuckHosts := map[uuid.UUID]bool{}
	for id, sr := range e.work.bad.stuck {
		stuck[id] = sr
		stuckHosts[sr.host] = true
	}
	for k, v := range e.work.counts {
		rep.Workload[k] = v
	}
	e.work.mu.Unlock()
	add(vForbidden, forbiddenWrites(h.journal, h.moves, badHosts, quarantined)...)
	model := rulesModel{transientGrace: e.cfg.TransientGrace, snapshotGrace: e.cfg.SnapshotGrace, settle: 3*e.cfg.Interval + 2*time.Second}
	add(vLost, model.lostTransitions(h.final, skip)...)
	// The hosts that got a lost destroy were left out above (quarantined)
	// and are judged here on their own: a stopping row alive on its agent
	// past the grace is a lost transition (rule 9: the destroy was never
	// re-sent), one gone from it a lost rule 6.
	add(vLost, model.lostTransitions(onlyHosts(h.final, stuckHosts), nil)...)
	bad9, st9 := stuckDestroys(rule9History{stuck: stuck, journal: h.journal, audits: h.destroyAudits, claims: h.claims,
		accepted: h.destroy, rejected: h.reject, grace: e.cfg.TransientGrace})
	add(vRetry, bad9...)
	rep.Rule9 = fmt.Sprintf("%d rows with a lost destroy (%d on an agent refusing destroys for a while), %d moved to missing by the passive rule first; "+
		"%d re-sends claimed, reaching their agents as %d accepted, %d refused, %d stale-token rejections (%d within a grace of the previous call); "+
		"%d stopped with destroy_retry, %d by rule 6 after an accepted re-send; %d destroy_retry audit rows",
		st9.stuck, st9.refusing, st9.dissolved, st9.claims, st9.accepted, st9.refused, st9.stale, st9.withinGrace,
		st9.stoppedRetry, st9.stoppedRule6, st9.audits)
	badV, stV := volumeDetaches(h.volumes, h.journal)
	add(vVolumes, badV...)
	rep.Volumes = fmt.Sprintf("%d volumes; %d of vigil's changes to stopped or error, %d of them of a sandbox with volumes attached or attaching, "+
		"%d volumes detached by vigil, %d by the control plane (the harness)",
		stV.volumes, stV.stops, stV.stopsWithVolumes, stV.detached, stV.byOthers)

	// Events.
	switch {
	case e.events == nil:
		rep.Events = "off: vigil has no --events-redis-url (SPEC §6, issue 8); the checks switch on when it does"
	default:
		rep.EventsOn = true
		if h.streamErr != nil {
			add(vEventsLost, "reading the stream failed: "+h.streamErr.Error())
		}
		if h.streamMissed > 0 {
			add(vEventsLost, fmt.Sprintf("the harness missed %d stream entries (trimmed by MAXLEN before it read them): the events check is incomplete", h.streamMissed))
		}
		// An event whose outbox row a failover lost was published before
		// the loss; the checks hold the stream against what survived.
		r := compareEvents(h.audits, h.outbox, withoutEvents(h.stream, lostEvents))
		rep.EventsExpected, rep.EventsCommitted, rep.EventsPublished = r.Expected, r.Committed, r.Published
		rep.EventsLost, rep.EventsDup, rep.EventsSpurious, rep.EventsOutOfOrder = len(r.Lost), len(r.Duplicates), len(r.Spurious)+len(r.BadPayload), len(r.OutOfOrder)
		rep.EventsBeyond, rep.EventsDrain, rep.EventsDrained = h.beyond, h.drainTime, h.drainErr == nil
		add(vEventsLost, r.Lost...)
		add(vEventsDup, r.Duplicates...)
		add(vEventsSpur, r.Spurious...)
		add(vEventsBad, r.BadPayload...)
		add(vEventsOrder, r.OutOfOrder...)
		rep.Mirror = e.judgeMirror(h.mirror, add)
		var outages [][2]time.Time
		e.mu.Lock()
		for _, f := range e.faults {
			if f.kind == "redis-outage" {
				outages = append(outages, [2]time.Time{f.start, f.healed})
			}
		}
		e.mu.Unlock()
		for _, d := range r.Delays {
			w := d.wait()
			rep.EventDelays = append(rep.EventDelays, w)
			through := false
			for _, o := range outages {
				if d.committed.Before(o[1]) && d.published.After(o[0]) {
					through = true
				}
			}
			if through {
				rep.EventDelaysOutage = append(rep.EventDelaysOutage, w)
			} else {
				rep.EventDelaysCalm = append(rep.EventDelaysCalm, w)
			}
		}
	}

	// Faults and their figures.
	e.mu.Lock()
	faults := append([]*fault(nil), e.faults...)
	members := append([]*member(nil), e.members...)
	rep.Notes = append(rep.Notes, e.notes...)
	e.mu.Unlock()
	rep.Replicas = len(members)
	bound := e.cfg.LeaseTTL + time.Second
	spans := faultSpans(faults)
	e.peerFigures(rep, members, spans)
	for _, f := range faults {
		rep.Faults[f.kind]++
		if f.kind == "kill" && len(f.owned) > 0 {
			e.crash(rep, f, h, spans)
		}
		if f.recoverErr != nil {
			add(vRecover, fmt.Sprintf("%s %s on %s: %v", f.start.Format("15:04:05"), f.kind, f.target, f.recoverErr))
		}
		switch {
		case f.owned != nil && ownerLoss(f.kind):
			e.failover(rep, f, h, bound, add)
		case f.kind == "rolling-restart" || f.kind == "scale-down":
			rep.HandoverGaps = append(rep.HandoverGaps, e.handoverGaps(f)...)
		case f.partitioned:
			n := e.claimsBetween(f.start, f.healed)
			role := "follower"
			if f.wasLeader {
				role = "leader"
				rep.PartitionsLeader++
				rep.PartitionMovesLeader += n
			} else {
				rep.Partitions++
				rep.PartitionMoves += n
			}
			if n > 0 {
				rep.Targets = append(rep.Targets, fmt.Sprintf("%s etcd partition of %s (%s): %d shards claimed meanwhile (expected 0)", f.start.Format("15:04:05"), f.target, role, n))
			}
		}
	}

	for _, m := range members {
		rep.FenceRejections += m.counter("vigil_fence_rejections_total")
		rep.DatabaseChanges += m.counter("vigil_fence_database_changes_total")
		rep.FencedTransactions += m.counter(`vigil_db_write_transactions_total{result="fenced"}`)
		rep.EventsOldestMax = max(rep.EventsOldestMax, m.oldestPending())
		for _, s := range countedSeries {
			rep.Vigil[s] += m.counter(s)
		}
	}
	for _, rs := range h.reject {
		for _, r := range rs {
			if r.Result == agentsim.DestroyStaleFence {
				rep.AgentFenceRejections++
			}
		}
	}
	for _, ds := range h.destroy {
		rep.DestroysAccepted += len(ds)
	}
	rep.EtcdLeaderChanges = e.leaders.count()
	rep.WatchResumes = e.rec.Resumes()
	if rep.FenceRejections == 0 {
		add(vBite, "no write was ever rejected by a Postgres fence: the run never put a replica where only the fence decides (delete-owner-keys does)")
	}
	for _, c := range categories {
		if len(rep.Violations[c]) > 0 {
			rep.Failed = true
		}
	}
	return rep
}

// judgeMirror turns what the mirror carried into figures and, while the
// harness's subscription held, violations.
func (e *env) judgeMirror(m *mirrorHistory, add func(string, ...string)) string {
	if m == nil {
		return "off: vigil has no --events-sse-channel"
	}
	fig := fmt.Sprintf("%d stream entries, %d messages on the run's channel, %d entries carried, %d disagreements",
		m.appended, m.received, m.carried, len(m.problems))
	if m.err != nil {
		e.note("mirror not judged (%v): %d disagreements between the stream and the mirror left as figures", m.err, len(m.problems))
		return fig + " (not judged: " + m.err.Error() + ")"
	}
	add(vMirror, m.problems...)
	return fig
}

func onlyHosts(fs finalState, keep map[uuid.UUID]bool) finalState {
	out := fs
	out.hosts = map[uuid.UUID]hostRow{}
	for id, hr := range fs.hosts {
		if keep[id] {
			out.hosts[id] = hr
		}
	}
	out.sandboxes = nil
	for _, s := range fs.sandboxes {
		if keep[s.host] {
			out.sandboxes = append(out.sandboxes, s)
		}
	}
	return out
}

// failover measures one owner-loss fault: per lost shard, the time from
// the loss to the new owner's first fenced write (its fence raise; the etcd
// claim when no raise was recorded), and for cut-off owners the margin
// between their last act on a lost shard and the first successor claim.
// delete-owner-keys is no failover (the successors claim at once, by
// design of the fault) and its victim is expected to act after they
// claimed: only the fences stop it, which the stale-write check judges.
func (e *env) failover(rep *Report, f *fault, h *history, bound time.Duration, add func(string, ...string)) {
	lost := f.lostAt
	if lost.IsZero() {
		lost = f.start
	}
	co := cutOff{kind: f.kind, victim: f.target}
	for _, s := range sortedShards(f.owned) {
		old := f.owned[s]
		claim, first := successorOf(e.rec.History(s, f.etcdEvents), h.raises, s, old, lost)
		if first.IsZero() {
			continue // never re-owned in the record (the run ended first)
		}
		d := first.Sub(lost)
		if !f.keysDeleted {
			rep.Failover[f.kind] = append(rep.Failover[f.kind], d)
			leaderChange := e.leaders.changedWithin(lost.Add(-e.cfg.LeaseTTL), first)
			if f.kind != "one-way-etcd-answers" {
				if leaderChange {
					rep.FailoverLeader = append(rep.FailoverLeader, d)
				} else {
					rep.FailoverCalm = append(rep.FailoverCalm, d)
					if d > bound {
						rep.FailoverOver++
					}
				}
			}
		}
		if f.kind == "kill" || claim.IsZero() {
			continue
		}
		last := time.Time{}
		for _, r := range h.journal {
			if r.shard == s && r.token == old && r.replica == f.target && r.committedAt.After(lost) && r.committedAt.After(last) {
				last = r.committedAt
			}
		}
		if co.firstClaim.IsZero() || claim.Before(co.firstClaim) {
			co.firstClaim = claim
		}
		if last.After(co.lastAct) {
			co.lastAct = last
		}
		if !last.IsZero() {
			if m := claim.Sub(last); !co.haveMargin || m < co.margin {
				co.margin, co.haveMargin = m, true
			}
		}
	}
	if f.kind == "kill" || co.firstClaim.IsZero() {
		return
	}
	if !co.haveMargin {
		co.margin = co.firstClaim.Sub(lost)
	}
	co.keysDeleted = f.keysDeleted
	if strings.HasPrefix(f.kind, "cut-") || strings.HasPrefix(f.kind, "one-way-") || f.kind == "stall-in-tx" {
		// Cut off from etcd while running: it must step down before its
		// lease can expire, so before any successor claims.
		co.steppedDown = stepDown(f.victim.logPath, lost)
		if !co.steppedDown.IsZero() && co.steppedDown.After(co.firstClaim) {
			add(vCutOff, fmt.Sprintf("%s %s of %s: stepped down %s after the first successor claim", lost.Format("15:04:05"), f.kind, f.target, co.steppedDown.Sub(co.firstClaim).Round(time.Millisecond)))
		}
	}
	rep.CutOff = append(rep.CutOff, co)
	if co.margin < 0 && !f.keysDeleted {
		add(vCutOff, fmt.Sprintf("%s %s of %s: last act %s after the first successor claim", lost.Format("15:04:05"), f.kind, f.target, (-co.margin).Round(time.Millisecond)))
	}
}

// handoverGaps are the release -> claim gaps of the shards handed over
// during a graceful fault.
func (e *env) handoverGaps(f *fault) []time.Duration {
	var out []time.Duration
	for s := 0; s < e.cfg.Shards; s++ {
		ev := e.rec.History(s, f.etcdEvents)
		for i := 0; i+1 < len(ev); i++ {
			if ev[i].At.After(f.healed) {
				break
			}
			if !ev[i].Put && ev[i+1].Put {
				out = append(out, ev[i+1].At.Sub(ev[i].At))
			}
		}
	}
	return out
}

// claimsBetween counts owner-key claims in [from, to].
func (e *env) claimsBetween(from, to time.Time) int {
	n := 0
	for s := 0; s < e.cfg.Shards; s++ {
		for _, ev := range e.rec.History(s, 0) {
			if ev.Put && !ev.At.Before(from) && !ev.At.After(to) {
				n++
			}
		}
	}
	return n
}

func pct(ds []time.Duration, p float64) time.Duration {
	if len(ds) == 0 {
		return 0
	}
	s := append([]time.Duration(nil), ds...)
	sort.Slice(s, func(i, j int) bool { return s[i] < s[j] })
	i := int(p*float64(len(s))+0.5) - 1
	return s[max(0, min(i, len(s)-1))]
}

func dist(ds []time.Duration) string {
	if len(ds) == 0 {
		return "n/a"
	}
	return fmt.Sprintf("p50 %s, p95 %s, max %s (n=%d)", ms(pct(ds, .5)), ms(pct(ds, .95)), ms(pct(ds, 1)), len(ds))
}

func ms(d time.Duration) string { return fmt.Sprintf("%dms", d.Milliseconds()) }

func (r *Report) print(w io.Writer) {
	p := func(format string, args ...any) { fmt.Fprintf(w, format+"\n", args...) }
	p("")
	p("==== chaos report: seed %d, %s of faults + %s quiet, lease TTL %s, build tags %v", r.Seed, r.Duration, r.Quiet, r.LeaseTTL, r.BuildTags)
	var kinds []string
	total := 0
	for k, n := range r.Faults {
		kinds = append(kinds, fmt.Sprintf("%s %d", k, n))
		total += n
	}
	sort.Strings(kinds)
	p("faults injected (%d): %s", total, strings.Join(kinds, ", "))
	var wl []string
	for k, n := range r.Workload {
		wl = append(wl, fmt.Sprintf("%s %d", k, n))
	}
	sort.Strings(wl)
	p("workload and bad input: %s", strings.Join(wl, ", "))
	p("failover (owner loss -> first fenced write by the new owner):")
	target := "met"
	if r.FailoverOver > 0 {
		target = fmt.Sprintf("MISSED by %d of %d", r.FailoverOver, len(r.FailoverCalm))
	}
	p("  outside etcd leader changes: %s; target <= lease TTL + 1s = %s: %s", dist(r.FailoverCalm), ms(r.LeaseTTL+time.Second), target)
	p("  with an etcd leader change:  %s", dist(r.FailoverLeader))
	for _, k := range sortedKeys(r.Failover, func(a, b string) bool { return a < b }) {
		p("  %-22s %s", k+":", dist(r.Failover[k]))
	}
	r.printCrash(p)
	over := 0
	for _, g := range r.HandoverGaps {
		if g >= 500*time.Millisecond {
			over++
		}
	}
	target = "met"
	if over > 0 {
		target = fmt.Sprintf("MISSED by %d", over)
	}
	p("handover gap (release -> claim) in rolling restarts and scale-downs: %s; target < 500ms: %s", dist(r.HandoverGaps), target)
	p("cut-off owners: last act on a lost shard vs first successor claim (must be before):")
	for _, c := range r.CutOff {
		last := "no write after the fault began"
		if !c.lastAct.IsZero() {
			last = "last write " + c.lastAct.Format("15:04:05.000")
		}
		note := ""
		if !c.steppedDown.IsZero() {
			note = fmt.Sprintf(", stepped down %s before it", ms(c.firstClaim.Sub(c.steppedDown)))
		}
		if c.keysDeleted {
			note = " (keys deleted under it: only the fences decide)"
		}
		p("  %-22s %s: %s, first successor claim %s, margin %s%s", c.kind, c.victim, last, c.firstClaim.Format("15:04:05.000"), ms(c.margin), note)
	}
	p("shards moved while one etcd member was partitioned: %d over %d partitions of a follower, %d over %d of the leader (expected 0)",
		r.PartitionMoves, r.Partitions, r.PartitionMovesLeader, r.PartitionsLeader)
	for _, t := range r.Targets {
		p("target missed: %s", t)
	}
	if len(r.Failovers) > 0 {
		p("Postgres failovers: %d synchronous, %d asynchronous; lost with them %d journal rows, %d fence raises, %d events (counted as having happened by the safety checks); fenced writes refused because the database changed: %.0f (each shard then claimed again)",
			r.Failovers["sync"], r.Failovers["async"], r.LostJournal, r.LostRaises, r.LostEvents, r.DatabaseChanges)
	}
	p("fence rejections: Postgres %.0f (fenced transactions %.0f), agents %d (of %d destroys accepted)", r.FenceRejections, r.FencedTransactions, r.AgentFenceRejections, r.DestroysAccepted)
	p("history: %d journal rows, %d fence raises, %d writes begun after their owner key was deleted (committed before the successor's raise), %d etcd leader changes, %d watch resumes, %d replica processes",
		r.JournalRows, r.FenceRaises, r.LateWrites, r.EtcdLeaderChanges, r.WatchResumes, r.Replicas)
	var vc []string
	for _, k := range countedSeries {
		if v := r.Vigil[k]; v > 0 && !isPeerSeries(k) {
			vc = append(vc, fmt.Sprintf("%s %.0f", k, v))
		}
	}
	p("vigil counters (summed over replicas): %s", strings.Join(vc, ", "))
	r.printPeers(p)
	if r.EventsOn {
		p("events: %d committed changes that publish, %d events committed to the outbox, %d published (distinct vigil_ids in the stream), %d duplicated, %d lost, %d spurious or wrong, %d out of commit order",
			r.EventsExpected, r.EventsCommitted, r.EventsPublished, r.EventsDup, r.EventsLost, r.EventsSpurious, r.EventsOutOfOrder)
		drained := fmt.Sprintf("drained %s after the quiet period", ms(r.EventsDrain))
		if !r.EventsDrained {
			drained = fmt.Sprintf("NOT drained within %s after the quiet period", outboxDrainBound)
		}
		p("  backlog age (commit -> XADD): all %s; through a Redis outage %s; otherwise %s", dist(r.EventDelays), dist(r.EventDelaysOutage), dist(r.EventDelaysCalm))
		p("  max backlog age %s; vigil's own vigil_events_oldest_pending_age_seconds max %.1fs; outbox %s; %d entries of later events left out",
			ms(pct(r.EventDelays, 1)), r.EventsOldestMax, drained, r.EventsBeyond)
		p("  mirror: %s", r.Mirror)
	} else {
		p("events: %s", r.Events)
	}
	p("stuck destroys (rule 9): %s", r.Rule9)
	p("volumes (rule 11): %s", r.Volumes)
	for _, n := range r.Notes {
		p("note: %s", n)
	}
	p("checks:")
	for _, c := range categories {
		items := r.Violations[c]
		p("  %-60s %d", c, len(items))
		for i, it := range items {
			if i == 10 {
				p("      ... %d more", len(items)-10)
				break
			}
			p("      %s", it)
		}
	}
	verdict := "PASS"
	if r.Failed {
		verdict = "FAIL"
	}
	p("verdict: %s (checked in %s)", verdict, r.CheckTime.Round(time.Millisecond))
	if r.Dir != "" {
		p("files: %s", r.Dir)
	}
}

// Count is the number of violations in category c (for tests).
func (r *Report) Count(c string) int { return len(r.Violations[c]) }

// stepDown is when a replica's log first says, after from, that its
// session ended (the local lease deadline passed): the moment it stopped
// acting on every shard.
func stepDown(logPath string, from time.Time) time.Time {
	b, err := os.ReadFile(logPath)
	if err != nil {
		return time.Time{}
	}
	for _, line := range strings.Split(string(b), "\n") {
		if !strings.Contains(line, `"@message":"lease deadline passed without a renewal; stepping down"`) {
			continue
		}
		var l struct {
			At time.Time `json:"@timestamp"`
		}
		if json.Unmarshal([]byte(line), &l) == nil && l.At.After(from) {
			return l.At
		}
	}
	return time.Time{}
}
