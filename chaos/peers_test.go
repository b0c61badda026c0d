package chaos

import (
	"bytes"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/vigil-sh/vigil/internal/cli"
	"github.com/vigil-sh/vigil/internal/vigiltest"
)

var t0 = time.Date(2026, 12, 1, 10, 0, 0, 0, time.UTC)

func at(ms int) time.Time { return t0.Add(time.Duration(ms) * time.Millisecond) }

// TestParseLogReadsVigilsLogger writes lines the way `vigil run
// --log-format json` does (the same logger, the same fields) and reads them
// back: the revocations with their outcome, and the sessions.
func TestParseLogReadsVigilsLogger(t *testing.T) {
	var buf bytes.Buffer
	log, err := cli.NewLogger("vigil", "json", "info", &buf)
	if err != nil {
		t.Fatal(err)
	}
	log = log.With("replica", "r01")
	log.With("lease", "1a").Info(msgJoined, "ttl", 3)
	buf.WriteString("a text line from somewhere\n")
	log.Info("assignment written", "members", 3, "changed", 0)
	obs := log.Named("election").With("peer", "r02", "peer_lease", "2b")
	obs.Warn(msgPeerGone, "addr", "127.0.0.1:4000")
	obs3 := log.Named("election").With("peer", "r03", "peer_lease", "3c")
	obs3.Warn(msgPeerGone, "addr", "127.0.0.1:4001")
	obs3.Warn(msgRateLimited, "addr", "127.0.0.1:4001")
	log.Named("election").With("peer", "r04", "peer_lease", "4d").Info(msgPeerHandedOff, "addr", "127.0.0.1:4002")
	log.Named("session").Warn(msgDeadline, "lease", "1a")
	log.With("lease", "1e").Info(msgJoined, "ttl", 3)

	lines := parseLog(buf.Bytes())
	if len(lines) != 7 {
		t.Fatalf("kept %d lines, want 7: %+v", len(lines), lines)
	}
	gone, handedOff := revocationsIn("r01", lines)
	if len(gone) != 2 || handedOff != 1 {
		t.Fatalf("revocations %+v, after hand-over %d; want 2 and 1", gone, handedOff)
	}
	if g := gone[0]; g.observer != "r01" || g.victim != "r02" || g.lease != "2b" || g.addr != "127.0.0.1:4000" || g.outcome != "" || g.at.IsZero() {
		t.Errorf("first revocation %+v", g)
	}
	if g := gone[1]; g.victim != "r03" || g.outcome != "rate limited" {
		t.Errorf("second revocation %+v, want r03 rate limited", g)
	}
	ss := sessionsIn(lines)
	if len(ss) != 2 || ss[0].lease != "1a" || ss[0].how != "it stepped down" || ss[1].lease != "1e" || !ss[1].ended.IsZero() {
		t.Errorf("sessions %+v", ss)
	}
}

func TestSessionsIn(t *testing.T) {
	lines := []logLine{
		{At: at(0), Message: msgJoined, Lease: "a"},
		{At: at(100), Message: msgJoined, Lease: "b"},
		{At: at(200), Message: msgSessionEnded},
		{At: at(300), Message: msgJoined, Lease: "c"},
		{At: at(400), Message: msgHandingOver},
		{At: at(500), Message: msgStopped},
	}
	ss := sessionsIn(lines)
	want := []sessionSpan{
		{lease: "a", joined: at(0), ended: at(100), how: "it rejoined"},
		{lease: "b", joined: at(100), ended: at(200), how: "its session ended"},
		{lease: "c", joined: at(300), ended: at(400), how: "it was handing over"},
	}
	if len(ss) != len(want) {
		t.Fatalf("got %+v", ss)
	}
	for i := range want {
		if ss[i] != want[i] {
			t.Errorf("session %d: got %+v, want %+v", i, ss[i], want[i])
		}
	}
}

func TestLiveAt(t *testing.T) {
	sessions := []sessionSpan{
		{lease: "a", joined: at(0), ended: at(1000), how: "it stepped down"},
		{lease: "b", joined: at(1200)},
	}
	for _, tc := range []struct {
		name  string
		v     victimLife
		t     time.Time
		lease string
		live  bool
		why   string
	}{
		{"running, session valid", victimLife{sessions: sessions}, at(1500), "b", true, ""},
		{"killed just before", victimLife{intent: "kill", endAt: at(1400), exitedAt: at(1410), sessions: sessions}, at(1450), "b", false, "killed"},
		{"killed only after the revocation", victimLife{intent: "kill", endAt: at(1600), sessions: sessions}, at(1500), "b", true, ""},
		{"SIGTERM: a graceful stop", victimLife{intent: "term", endAt: at(1400), sessions: sessions}, at(1500), "b", false, "stopped gracefully (SIGTERM)"},
		{"ended with the run", victimLife{intent: "end", endAt: at(1400), sessions: sessions}, at(1500), "b", false, "ended with the run"},
		{"exited on its own", victimLife{exitedAt: at(1400), sessions: sessions}, at(1500), "b", false, "exited"},
		{"that session already over", victimLife{sessions: sessions}, at(1100), "a", false, "session already over: it stepped down"},
		{"that session still valid", victimLife{sessions: sessions}, at(900), "a", true, ""},
		{"a lease never seen joining", victimLife{sessions: sessions}, at(900), "z", true, "its log never shows that lease joining"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			live, why := tc.v.liveAt(tc.t, tc.lease)
			if live != tc.live || why != tc.why {
				t.Errorf("got (%v, %q), want (%v, %q)", live, why, tc.live, tc.why)
			}
		})
	}
}

func TestFaultAt(t *testing.T) {
	spans := []faultSpan{
		{kind: "kill", target: "r01", start: at(1000), healed: at(1100), settled: at(2000)},
		{kind: "postgres-outage", start: at(5000), healed: at(7000), settled: at(7500)},
	}
	for _, tc := range []struct {
		t    time.Time
		want string
	}{
		{at(500), "before the first fault"},
		{at(1050), "during kill on r01"},
		{at(1500), "after kill on r01 (healed 400ms before), before the cluster settled"},
		{at(3000), "no fault (kill on r01 healed 1900ms before)"},
		{at(6000), "during postgres-outage"},
	} {
		if got := faultAt(spans, tc.t); got != tc.want {
			t.Errorf("at %s: got %q, want %q", tc.t.Sub(t0), got, tc.want)
		}
	}
}

func TestEtcdFaultWithin(t *testing.T) {
	spans := []faultSpan{
		{kind: "kill", target: "r01", start: at(0), healed: at(100), settled: at(900)},
		{kind: "etcd-kill-leader", target: "etcd1", start: at(2000), healed: at(8000), settled: at(9000)},
	}
	if got := etcdFaultWithin(spans, at(0), at(1000)); got != "" {
		t.Errorf("a kill is no etcd fault: %q", got)
	}
	if got := etcdFaultWithin(spans, at(1500), at(2100)); got != "etcd-kill-leader on etcd1" {
		t.Errorf("overlap at its start: %q", got)
	}
	if got := etcdFaultWithin(spans, at(8500), at(9500)); got == "" {
		t.Errorf("overlap before it settled: none found")
	}
	if got := etcdFaultWithin(spans, at(9100), at(9500)); got != "" {
		t.Errorf("after it settled: %q", got)
	}
}

func TestJudgeRevocations(t *testing.T) {
	spans := []faultSpan{{kind: "cut-etcd", target: "r02", start: at(0), healed: at(5000), settled: at(6000)}}
	lives := map[string]victimLife{
		"r02": {sessions: []sessionSpan{{lease: "2a", joined: at(-1000), ended: at(3000), how: "it stepped down"}, {lease: "2b", joined: at(3300)}}},
		"r03": {intent: "kill", endAt: at(7000), sessions: []sessionSpan{{lease: "3a", joined: at(-1000)}}},
	}
	revs := []revocation{
		{at: at(3500), observer: "r01", victim: "r02", lease: "2a", addr: "x"},                          // its session had ended: not live
		{at: at(4000), observer: "r01", victim: "r02", lease: "2b", addr: "x", outcome: "rate limited"}, // live
		{at: at(7050), observer: "r01", victim: "r03", lease: "3a", addr: "y"},                          // killed
		{at: at(7060), observer: "r04", victim: "r09", lease: "9a", addr: "z"},                          // unknown
	}
	why, live := judgeRevocations(revs, lives, spans)
	if why["session already over: it stepped down"] != 1 || why["killed"] != 1 || why["of a replica the harness never started"] != 1 {
		t.Errorf("not live, by why: %v", why)
	}
	if len(live) != 1 || !strings.Contains(live[0], "r01 revoked r02 (lease 2b, x): during cut-etcd on r02 [rate limited]") {
		t.Errorf("live: %v", live)
	}
}

func TestCrashFailover(t *testing.T) {
	kill := at(0)
	owned := map[int]int64{1: 10, 2: 11, 3: 12}
	hist := map[int][]vigiltest.ShardEvent{
		1: {{At: at(30), Rev: 20, Put: false, CreateRev: 10}, {At: at(60), Rev: 21, Put: true, CreateRev: 21, Value: "r02"}},
		2: {{At: at(80), Rev: 22, Put: true, CreateRev: 22, Value: "r03"}},
		3: {{At: at(5), Rev: 19, Put: true, CreateRev: 12, Value: "r01"}, {At: at(90), Rev: 23, Put: true, CreateRev: 23, Value: "r02"}},
	}
	raises := []fenceRaise{
		{shard: 1, token: 10, raisedAt: at(-500)}, // the victim's own raise, long before
		{shard: 1, token: 21, raisedAt: at(70)},
		{shard: 2, token: 22, raisedAt: at(120)},
	}
	claimed, complete, writes := crashFailover(kill, owned, hist, raises)
	if !complete || claimed != 90*time.Millisecond {
		t.Errorf("claimed %s complete %v, want 90ms true", claimed, complete)
	}
	want := []time.Duration{70 * time.Millisecond, 120 * time.Millisecond, 90 * time.Millisecond} // shard 3: no raise, its claim
	if len(writes) != len(want) {
		t.Fatalf("writes %v, want %v", writes, want)
	}
	for i := range want {
		if writes[i] != want[i] {
			t.Errorf("writes %v, want %v", writes, want)
		}
	}
	delete(hist, 3)
	if _, complete, _ := crashFailover(kill, owned, hist, raises); complete {
		t.Errorf("a shard never claimed, yet complete")
	}
	if _, complete, _ := crashFailover(kill, nil, hist, raises); complete {
		t.Errorf("nothing owned, yet complete")
	}
}

func TestCrashGroupsAndTarget(t *testing.T) {
	ks := []crashKill{
		{leader: true, complete: true, claimed: 400 * time.Millisecond, writes: []time.Duration{time.Second}},
		{leader: false, complete: true, claimed: 60 * time.Millisecond, writes: []time.Duration{100 * time.Millisecond, 200 * time.Millisecond}},
		{leader: false, complete: true, claimed: 1500 * time.Millisecond, victim: "r05"},
		{leader: false, complete: true, claimed: 3 * time.Second, excluded: "overlapped etcd-kill-leader on etcd0"},
		{leader: true, complete: false, excluded: "not every shard was claimed in the record"},
	}
	lc, lw := crashGroups(ks, true)
	oc, ow := crashGroups(ks, false)
	if len(lc) != 1 || len(lw) != 1 || len(oc) != 3 || len(ow) != 2 {
		t.Errorf("leader %v %v, other %v %v", lc, lw, oc, ow)
	}
	over, judged, excluded := crashTarget(ks)
	if len(over) != 1 || over[0].victim != "r05" || judged != 3 || excluded != 2 {
		t.Errorf("over %+v, judged %d, excluded %d", over, judged, excluded)
	}
}

func TestPrintCrashAndPeers(t *testing.T) {
	r := &Report{
		Crash: []crashKill{{at: at(0), victim: "r01", leader: true, complete: true, claimed: 300 * time.Millisecond},
			{at: at(0), victim: "r02", complete: true, claimed: 1200 * time.Millisecond}},
		PeerRevocations: 3, PeerNotLive: map[string]int{"killed": 2}, PeerLive: []string{"10:00:00.000 r01 revoked r03 ..."},
		Vigil: map[string]float64{"vigil_peer_confirmations_total": 2}, PeersWatched: []string{"r01 2"}, PeersExpected: 2,
	}
	var out bytes.Buffer
	pr := func(format string, args ...any) { fmt.Fprintf(&out, format+"\n", args...) }
	r.printCrash(pr)
	r.printPeers(pr)
	s := out.String()
	t.Log("\n" + s)
	for _, want := range []string{"SHORT: 1 of 2 judged kills over", "kill of r02 (another replica): every shard claimed after 1200ms: SHORT",
		"revocations of live replicas (process running, not being ended by the harness, session valid): 1", "2 killed",
		"vigil_peer_confirmations_total 2", "vigil_peers_watched at the last scrape: r01 2 (each should watch the 2 others)"} {
		if !strings.Contains(s, want) {
			t.Errorf("report lacks %q:\n%s", want, s)
		}
	}
}
