package chaos

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"sort"
	"strings"
	"time"

	"github.com/vigil-sh/vigil/internal/vigiltest"
)

// Crash failover and the peers' revocations (SPEC §3 bounds,
// election/peer.go): every replica holds a connection to every other
// replica's admin listener and, when a process dies, revokes exactly that
// incarnation's lease, so a killed replica's shards are claimed within 1 s
// whatever the lease TTL. The harness measures it on its kills, split by
// whether the vigil leader was killed, and reads every revocation the
// observers logged to find any whose victim was alive with a valid session.

// crashBound is how soon a killed replica's shards must be claimed when its
// machine stays up (it always does here).
const crashBound = time.Second

// Log messages the peer figures read (election/peer.go, node.go, session.go).
const (
	msgPeerGone      = "peer process gone; revoking its lease"
	msgPeerHandedOff = "peer stopped after its hand-over; revoking its lease"
	msgRateLimited   = "not revoking: too many revocations lately"
	msgRevokeFailed  = "revoking the peer's lease failed; it expires with its TTL"
	msgJoined        = "joined cluster"
	msgDeadline      = "lease deadline passed without a renewal; stepping down"
	msgSessionEnded  = "session ended; rejoining with a fresh lease"
	msgHandingOver   = "handing shards over"
	msgStopped       = "replica stopped"
)

// peerMessages are the messages parseLog keeps.
var peerMessages = []string{msgPeerGone, msgPeerHandedOff, msgRateLimited, msgRevokeFailed,
	msgJoined, msgDeadline, msgSessionEnded, msgHandingOver, msgStopped}

// logLine is one line of a replica's JSON log, the fields the peer figures
// read.
type logLine struct {
	At        time.Time `json:"@timestamp"`
	Message   string    `json:"@message"`
	Replica   string    `json:"replica"`    // the logger's own replica
	Peer      string    `json:"peer"`       // an observer's victim
	PeerLease string    `json:"peer_lease"` // hex
	Lease     string    `json:"lease"`      // the logger's own lease, hex
	Addr      string    `json:"addr"`
}

// parseLog keeps the lines of a JSON log that carry one of peerMessages, in
// order; anything else (text lines, a panic's trace) is skipped.
func parseLog(b []byte) []logLine {
	var out []logLine
	for _, line := range bytes.Split(b, []byte("\n")) {
		if len(line) == 0 || line[0] != '{' || !hasPeerMessage(line) {
			continue
		}
		var l logLine
		if json.Unmarshal(line, &l) == nil && !l.At.IsZero() {
			out = append(out, l)
		}
	}
	return out
}

func hasPeerMessage(line []byte) bool {
	for _, m := range peerMessages {
		if bytes.Contains(line, []byte(`"`+m+`"`)) {
			return true
		}
	}
	return false
}

// revocation is one "peer process gone" an observer logged: it was about to
// revoke the victim's lease.
type revocation struct {
	at               time.Time
	observer, victim string
	lease, addr      string
	outcome          string // "": went ahead (its result is in the counters); "rate limited"; "failed"
}

// revocationsIn lists the revocations one observer's log records, and
// counts the revocations after a peer's hand-over (a graceful stop's end).
func revocationsIn(observer string, lines []logLine) (gone []revocation, handedOff int) {
	for _, l := range lines {
		switch l.Message {
		case msgPeerGone:
			who := l.Replica
			if who == "" {
				who = observer
			}
			gone = append(gone, revocation{at: l.At, observer: who, victim: l.Peer, lease: l.PeerLease, addr: l.Addr})
		case msgPeerHandedOff:
			handedOff++
		case msgRateLimited, msgRevokeFailed:
			outcome := "rate limited"
			if l.Message == msgRevokeFailed {
				outcome = "failed"
			}
			for i := len(gone) - 1; i >= 0; i-- {
				if gone[i].lease == l.PeerLease && gone[i].outcome == "" {
					gone[i].outcome = outcome
					break
				}
			}
		}
	}
	return gone, handedOff
}

// sessionSpan is one session of a replica as its own log tells it.
type sessionSpan struct {
	lease         string
	joined, ended time.Time // ended zero: still valid when the log ends
	how           string    // how it ended
}

// sessionsIn lists a replica's sessions from its log: each begins with
// "joined cluster" (which carries its lease) and ends with the first of a
// step-down, a session end, a hand-over, the replica's stop or the next join.
func sessionsIn(lines []logLine) []sessionSpan {
	var out []sessionSpan
	open := -1
	end := func(at time.Time, how string) {
		if open >= 0 {
			out[open].ended, out[open].how = at, how
			open = -1
		}
	}
	for _, l := range lines {
		switch l.Message {
		case msgJoined:
			end(l.At, "it rejoined")
			out = append(out, sessionSpan{lease: l.Lease, joined: l.At})
			open = len(out) - 1
		case msgDeadline:
			end(l.At, "it stepped down")
		case msgSessionEnded:
			end(l.At, "its session ended")
		case msgHandingOver:
			end(l.At, "it was handing over")
		case msgStopped:
			end(l.At, "it stopped")
		}
	}
	return out
}

// victimLife is what the harness and a replica's own log say about it.
type victimLife struct {
	intent   string    // how the harness ended it: "kill", "term", "end"; "" never
	endAt    time.Time // when the harness began ending it
	exitedAt time.Time
	sessions []sessionSpan
}

// liveAt reports whether the replica's process ran, not being ended by the
// harness, with the session of lease valid at t; else why not. A lease its
// log never shows joining is taken as live (and said so).
func (v victimLife) liveAt(t time.Time, lease string) (live bool, why string) {
	if !v.endAt.IsZero() && !v.endAt.After(t) {
		switch v.intent {
		case "kill":
			return false, "killed"
		case "term":
			return false, "stopped gracefully (SIGTERM)"
		default:
			return false, "ended with the run"
		}
	}
	if !v.exitedAt.IsZero() && !v.exitedAt.After(t) {
		return false, "exited"
	}
	for _, s := range v.sessions {
		if s.lease != lease {
			continue
		}
		if !s.ended.IsZero() && !s.ended.After(t) {
			return false, "session already over: " + s.how
		}
		return true, ""
	}
	return true, "its log never shows that lease joining"
}

// faultSpan is one fault's interval.
type faultSpan struct {
	kind, target           string
	start, healed, settled time.Time
}

func (f faultSpan) name() string {
	if f.target == "" {
		return f.kind
	}
	return f.kind + " on " + f.target
}

// end is when the fault's effects are over: settled again, or healed when
// the cluster never settled.
func (f faultSpan) end() time.Time {
	if f.settled.After(f.healed) {
		return f.settled
	}
	return f.healed
}

func faultSpans(fs []*fault) []faultSpan {
	out := make([]faultSpan, len(fs))
	for i, f := range fs {
		out[i] = faultSpan{kind: f.kind, target: f.target, start: f.start, healed: f.healed, settled: f.settled}
	}
	sort.SliceStable(out, func(i, j int) bool { return out[i].start.Before(out[j].start) })
	return out
}

// faultAt says which fault was active at t: during it (start to heal),
// while the cluster settled after it, or none (with the last one's heal).
func faultAt(spans []faultSpan, t time.Time) string {
	var last *faultSpan
	for i := range spans {
		if spans[i].start.After(t) {
			break
		}
		last = &spans[i]
	}
	switch {
	case last == nil:
		return "before the first fault"
	case !t.After(last.healed):
		return "during " + last.name()
	case !t.After(last.end()):
		return fmt.Sprintf("after %s (healed %s before), before the cluster settled", last.name(), ms(t.Sub(last.healed)))
	default:
		return fmt.Sprintf("no fault (%s healed %s before)", last.name(), ms(t.Sub(last.healed)))
	}
}

// etcdFaultWithin names an etcd fault whose interval (start to settled)
// overlaps [from, to], or "".
func etcdFaultWithin(spans []faultSpan, from, to time.Time) string {
	for _, f := range spans {
		if strings.HasPrefix(f.kind, "etcd-") && !f.start.After(to) && !f.end().Before(from) {
			return f.name()
		}
	}
	return ""
}

// judgeRevocations sorts the revocations by whether their victim was live:
// why counts those that were not by reason, live describes each that was,
// with the fault active then.
func judgeRevocations(revs []revocation, lives map[string]victimLife, spans []faultSpan) (why map[string]int, live []string) {
	why = map[string]int{}
	for _, rv := range revs {
		v, known := lives[rv.victim]
		if !known {
			why["of a replica the harness never started"]++
			continue
		}
		ok, reason := v.liveAt(rv.at, rv.lease)
		if !ok {
			why[reason]++
			continue
		}
		s := fmt.Sprintf("%s %s revoked %s (lease %s, %s): %s", rv.at.Format("15:04:05.000"), rv.observer, rv.victim, rv.lease, rv.addr, faultAt(spans, rv.at))
		if rv.outcome != "" {
			s += " [" + rv.outcome + "]"
		}
		if reason != "" {
			s += " (" + reason + ")"
		}
		live = append(live, s)
	}
	return why, live
}

// peerFigures reads every replica's log for the revocations its observers
// logged and judges each against what the harness did to the victim and
// what the victim's own log says of its session; and it notes how many
// peers each live replica watched at its last scrape.
func (e *env) peerFigures(rep *Report, members []*member, spans []faultSpan) {
	lives := map[string]victimLife{}
	var revs []revocation
	for _, m := range members {
		b, err := os.ReadFile(m.logPath)
		if err != nil {
			e.note("peer figures: %v", err)
		}
		lines := parseLog(b)
		intent, endAt := m.ended()
		lives[m.id] = victimLife{intent: intent, endAt: endAt, exitedAt: m.r.ExitedAt(), sessions: sessionsIn(lines)}
		gone, handedOff := revocationsIn(m.id, lines)
		revs = append(revs, gone...)
		rep.PeerHandedOff += handedOff
	}
	sort.SliceStable(revs, func(i, j int) bool { return revs[i].at.Before(revs[j].at) })
	rep.PeerRevocations = len(revs)
	rep.PeerNotLive, rep.PeerLive = judgeRevocations(revs, lives, spans)
	if n := len(rep.PeerLive); n > 0 {
		rep.Targets = append(rep.Targets, fmt.Sprintf("revocations of live replicas: %d (expected 0; listed under peer crash detection)", n))
	}
	live := e.live()
	for _, m := range live {
		if w, ok := m.peersWatched(); ok {
			rep.PeersWatched = append(rep.PeersWatched, fmt.Sprintf("%s %.0f", m.id, w))
		}
	}
	rep.PeersExpected = len(live) - 1
}

// successorOf finds, for a shard whose owner key had token old when its
// owner was lost at lost, the first claim by a new owner key in its etcd
// history and the new owner's first fenced write (its fence raise; the
// claim when no raise was recorded). Zero times: not found.
func successorOf(events []vigiltest.ShardEvent, raises []fenceRaise, s int, old int64, lost time.Time) (claim, first time.Time) {
	for _, ev := range events {
		if ev.Put && ev.CreateRev > old {
			claim = ev.At
			break
		}
	}
	for _, r := range raises {
		if r.shard == s && r.token > old && !r.raisedAt.Before(lost) {
			first = r.raisedAt
			break
		}
	}
	if first.IsZero() {
		first = claim
	}
	return claim, first
}

// crashKill is one kill's crash failover.
type crashKill struct {
	at       time.Time
	victim   string
	leader   bool          // the vigil leader was killed
	claimed  time.Duration // kill -> the last of its shards claimed
	complete bool          // every shard it owned was claimed in the record
	writes   []time.Duration
	excluded string // why it is not judged against crashBound ("": judged)
}

func (k crashKill) role() string {
	if k.leader {
		return "the vigil leader"
	}
	return "another replica"
}

// crashFailover measures one kill: when every shard the victim owned had a
// new owner key, and per shard the successor's first fenced write.
func crashFailover(killedAt time.Time, owned map[int]int64, hist map[int][]vigiltest.ShardEvent, raises []fenceRaise) (claimed time.Duration, complete bool, writes []time.Duration) {
	complete = len(owned) > 0
	for _, s := range sortedShards(owned) {
		claim, first := successorOf(hist[s], raises, s, owned[s], killedAt)
		if claim.IsZero() {
			complete = false
		} else {
			claimed = max(claimed, claim.Sub(killedAt))
		}
		if !first.IsZero() {
			writes = append(writes, first.Sub(killedAt))
		}
	}
	return claimed, complete, writes
}

// crash records a kill's crash failover. A kill is judged against
// crashBound only when no etcd fault and no etcd leader change overlapped
// its failover: those delay every etcd write, not the detection.
func (e *env) crash(rep *Report, f *fault, h *history, spans []faultSpan) {
	hist := map[int][]vigiltest.ShardEvent{}
	for s := range f.owned {
		hist[s] = e.rec.History(s, f.etcdEvents)
	}
	k := crashKill{at: f.lostAt, victim: f.target, leader: f.vigilLeader}
	k.claimed, k.complete, k.writes = crashFailover(f.lostAt, f.owned, hist, h.raises)
	until := f.lostAt.Add(k.claimed)
	if !k.complete {
		until = f.lostAt.Add(e.cfg.LeaseTTL + time.Second)
	}
	switch {
	case !k.complete:
		k.excluded = "not every shard was claimed in the record"
	case etcdFaultWithin(spans, f.lostAt, until) != "":
		k.excluded = "overlapped " + etcdFaultWithin(spans, f.lostAt, until)
	case e.leaders.changedWithin(f.lostAt.Add(-e.cfg.LeaseTTL), until):
		k.excluded = "an etcd leader change overlapped"
	}
	rep.Crash = append(rep.Crash, k)
	if k.excluded == "" && k.claimed > crashBound {
		rep.Targets = append(rep.Targets, fmt.Sprintf("%s kill of %s (%s): every shard claimed after %s (crash failover target %s)",
			k.at.Format("15:04:05"), k.victim, k.role(), ms(k.claimed), ms(crashBound)))
	}
}

// isPeerSeries tells the crash detection's counters, reported on a line of
// their own.
func isPeerSeries(s string) bool { return strings.HasPrefix(s, "vigil_peer") }

// crashGroups splits the kills' figures by whether the vigil leader was
// killed: per kill, kill -> every moved shard claimed; per shard, kill ->
// the successor's first fenced write.
func crashGroups(ks []crashKill, leader bool) (claims, writes []time.Duration) {
	for _, k := range ks {
		if k.leader != leader {
			continue
		}
		if k.complete {
			claims = append(claims, k.claimed)
		}
		writes = append(writes, k.writes...)
	}
	return claims, writes
}

// crashTarget judges the kills against crashBound: those over it, and how
// many were judged and left out.
func crashTarget(ks []crashKill) (over []crashKill, judged, excluded int) {
	for _, k := range ks {
		if k.excluded != "" {
			excluded++
			continue
		}
		judged++
		if k.claimed > crashBound {
			over = append(over, k)
		}
	}
	return over, judged, excluded
}

func (r *Report) printCrash(p func(string, ...any)) {
	lc, lw := crashGroups(r.Crash, true)
	oc, ow := crashGroups(r.Crash, false)
	p("  crash failover (kill; the process dies, its machine stays up), split by whether the vigil leader was killed:")
	p("    %-57s leader %s; other %s", "kill -> every moved shard claimed (per kill):", dist(lc), dist(oc))
	p("    %-57s leader %s; other %s", "kill -> first fenced write by the successor (per shard):", dist(lw), dist(ow))
	over, judged, excluded := crashTarget(r.Crash)
	status := fmt.Sprintf("met (%d of %d kills judged)", judged, len(r.Crash))
	switch {
	case len(over) > 0:
		status = fmt.Sprintf("SHORT: %d of %d judged kills over", len(over), judged)
	case judged == 0:
		status = "n/a (no kill judged)"
	}
	p("    target: crash (kill) failover <= %s to claim, every kill (the machine is always up here): %s; %d not judged (an etcd fault or etcd leader change overlapped, or a shard never claimed)",
		ms(crashBound), status, excluded)
	for _, k := range r.Crash {
		switch {
		case k.excluded != "":
			p("      %s kill of %s (%s): every shard claimed after %s, not judged: %s", k.at.Format("15:04:05.000"), k.victim, k.role(), ms(k.claimed), k.excluded)
		case k.claimed > crashBound:
			p("      %s kill of %s (%s): every shard claimed after %s: SHORT", k.at.Format("15:04:05.000"), k.victim, k.role(), ms(k.claimed))
		}
	}
}

func (r *Report) printPeers(p func(string, ...any)) {
	var why []string
	for _, k := range sortedKeys(r.PeerNotLive, func(a, b string) bool { return a < b }) {
		why = append(why, fmt.Sprintf("%d %s", r.PeerNotLive[k], k))
	}
	if len(why) == 0 {
		why = []string{"none"}
	}
	p("peer crash detection: %d revocations logged (%q), of replicas not live: %s; %d more after a peer's hand-over (graceful)",
		r.PeerRevocations, msgPeerGone, strings.Join(why, ", "), r.PeerHandedOff)
	p("  revocations of live replicas (process running, not being ended by the harness, session valid): %d (expected 0)", len(r.PeerLive))
	for _, l := range r.PeerLive {
		p("    %s", l)
	}
	var pc []string
	for _, k := range countedSeries {
		if isPeerSeries(k) {
			pc = append(pc, fmt.Sprintf("%s %.0f", k, r.Vigil[k]))
		}
	}
	p("  peer counters (summed over replicas): %s", strings.Join(pc, ", "))
	p("  vigil_peers_watched at the last scrape: %s (each should watch the %d others)", strings.Join(r.PeersWatched, ", "), r.PeersExpected)
}
