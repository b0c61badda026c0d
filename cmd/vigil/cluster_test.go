package main

// End-to-end tests of a vigil cluster whose replicas are real `vigil run`
// processes against an embedded etcd and a fresh Postgres database per test.
// Ownership is observed through an etcd watch (harness_test.go records every
// claim and release with its time and revision); writes through the
// vigil_journal row every committed change carries (replica, shard, fence
// token), checked to match the audit rows of the same transactions.
//
// Every replica runs with a 2s lease TTL. Measured figures are logged with
// t.Logf (run with -v to see them); the assertions use the bounds of SPEC §3
// where a test is about them and generous bounds elsewhere.

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/google/uuid"

	"github.com/vigil-sh/vigil/internal/faultproxy"
	"github.com/vigil-sh/vigil/internal/ids"
	"github.com/vigil-sh/vigil/shard"
)

// TestClusterColdStart: three replicas started together own all 256 shards,
// balanced, each exactly once, and say so on /readyz and /metrics.
func TestClusterColdStart(t *testing.T) {
	h := newHarness(t, 256)
	names := []string{"cold-1", "cold-2", "cold-3"}
	var rs []*replica
	for _, id := range names {
		rs = append(rs, h.spawn(id, spawnOpts{}))
	}
	last := rs[len(rs)-1].Started

	allOwned := h.poll(10*time.Second, "every shard owned", func() (bool, string) {
		st := h.rec.State()
		return st.OwnedCount() == h.shards, st.Summary()
	})
	settled := h.waitSettled(10*time.Second, names...)
	t.Logf("cold start, 3 replicas, 256 shards: all shards owned %s after the last replica started, balanced and as assigned after %s (target 2s)",
		ms(allOwned.Sub(last)), ms(settled.Sub(last)))
	if d := settled.Sub(last); d > 10*time.Second {
		t.Errorf("cold start took %s, want at most 10s", d)
	}

	st := h.rec.State()
	for _, id := range names {
		n := len(st.OwnedBy(id))
		if n != h.shards/3 && n != h.shards/3+1 {
			t.Errorf("%s owns %d shards, want 85 or 86", id, n)
		}
	}
	for _, r := range rs {
		h.poll(10*time.Second, r.ID+" /readyz 200", func() (bool, string) {
			code, body, err := r.Get("/readyz")
			if err != nil {
				return false, err.Error()
			}
			return code == 200, fmt.Sprintf("%d %s", code, body)
		})
	}
	h.poll(5*time.Second, "vigil_shards_owned of every replica to match etcd and sum to 256", func() (bool, string) {
		st := h.rec.State()
		sum, detail := 0.0, ""
		for _, r := range rs {
			v, err := r.Metric("vigil_shards_owned")
			if err != nil {
				return false, err.Error()
			}
			if int(v) != len(st.OwnedBy(r.ID)) {
				return false, fmt.Sprintf("%s: vigil_shards_owned %v, etcd %d", r.ID, v, len(st.OwnedBy(r.ID)))
			}
			sum += v
			detail += fmt.Sprintf("%s=%v ", r.ID, v)
		}
		return sum == float64(h.shards), detail
	})
	// Which build each replica runs, for rolling updates.
	code, body, err := rs[0].Get("/metrics")
	if err != nil || code != 200 || !regexp.MustCompile(`(?m)^vigil_build_info\{goversion="go[^"]+",revision="[^"]+",version="[^"]+"\} 1$`).MatchString(body) {
		t.Errorf("/metrics (%d, %v) has no vigil_build_info series", code, err)
	}
	h.poll(5*time.Second, "every fence in Postgres to hold its etcd owner and token", h.fencesMatch)
	h.finalChecks()
}

// killAndMeasure SIGKILLs victim and waits for survivors to own everything.
// Only the victim's shards may move (each once: its key goes with its lease,
// a survivor claims it); it returns the time from the kill until the last of
// them had its new owner, and until the last had its first pass (the new
// owner's first fenced read and writes) completed.
func killAndMeasure(t *testing.T, h *harness, victim string, survivors []string) (time.Duration, time.Duration) {
	t.Helper()
	before := h.rec.State()
	mine := before.OwnedBy(victim)
	if len(mine) == 0 {
		t.Fatalf("%s owns no shards before the kill", victim)
	}
	isMine := map[int]bool{}
	for _, s := range mine {
		isMine[s] = true
	}
	r := h.replica(victim)
	t0 := time.Now()
	kill(t, r)
	h.waitSettled(3*testTTL+5*time.Second, survivors...)
	after := h.rec.State()

	var expired, reowned time.Time
	for s := 0; s < h.shards; s++ {
		ev := h.rec.History(s, before.Rev)
		if !isMine[s] {
			if len(ev) > 0 {
				t.Errorf("shard %d of %s moved (%d events) although only %s was killed", s, before.Owners[s].Value, len(ev), victim)
			}
			if after.Assign[s] != before.Assign[s] {
				t.Errorf("shard %d reassigned from %s to %s although only %s was killed", s, before.Assign[s], after.Assign[s], victim)
			}
			continue
		}
		if len(ev) != 2 || ev[0].Put || ev[0].Value != victim || !ev[1].Put || ev[1].Value != after.Owners[s].Value {
			t.Errorf("shard %d of %s: want its key deleted then claimed once by a survivor, got %d events: %+v", s, victim, len(ev), ev)
			continue
		}
		if ev[0].At.After(expired) {
			expired = ev[0].At
		}
		if ev[1].At.After(reowned) {
			reowned = ev[1].At
		}
	}
	lat := reowned.Sub(t0)
	passed := firstPasses(t, h, mine, survivors, t0)
	t.Logf("SIGKILL %s (%d shards, leader %v): its lease gone %s after the kill, all its shards re-owned after %s, their first pass done after %s",
		victim, len(mine), before.Leader == victim, ms(expired.Sub(t0)), ms(lat), ms(passed))
	return lat, passed
}

// firstPasses waits until every shard of moved has a full pass completed
// after since on one of the survivors (vigil_shard_last_pass_timestamp_seconds)
// and returns how long after since the last of them was.
func firstPasses(t *testing.T, h *harness, moved []int, survivors []string, since time.Time) time.Duration {
	t.Helper()
	var last time.Time
	h.poll(3*testTTL+5*time.Second, "a first pass over every moved shard", func() (bool, string) {
		done := map[int]time.Time{}
		for _, id := range survivors {
			m, err := h.replica(id).Metrics()
			if err != nil {
				continue
			}
			for _, s := range moved {
				if v, ok := m[fmt.Sprintf(`vigil_shard_last_pass_timestamp_seconds{shard="%d"}`, s)]; ok {
					if at := time.Unix(0, int64(v*1e9)); at.After(since) {
						done[s] = at
					}
				}
			}
		}
		last = time.Time{}
		for _, at := range done {
			if at.After(last) {
				last = at
			}
		}
		return len(done) == len(moved), fmt.Sprintf("%d of %d moved shards passed", len(done), len(moved))
	})
	return last.Sub(since)
}

// TestKillReplica: SIGKILL a non-leader, then the leader, of a four-replica
// cluster: only the killed replica's shards move, within a second (its peers
// see its process die and revoke its lease).
func TestKillReplica(t *testing.T) {
	h := newHarness(t, 64)
	names := []string{"kill-1", "kill-2", "kill-3", "kill-4"}
	var rs []*replica
	for _, id := range names {
		rs = append(rs, h.start(id, spawnOpts{}))
	}
	h.waitSettled(15*time.Second, names...)

	// The etcd leader (lowest election key) is the one replica whose
	// vigil_leader gauge is 1.
	h.poll(5*time.Second, "exactly the etcd leader to report vigil_leader 1", func() (bool, string) {
		leader := h.leader()
		var says []string
		for _, r := range rs {
			v, err := r.Metric("vigil_leader")
			if err != nil {
				return false, err.Error()
			}
			if v == 1 {
				says = append(says, r.ID)
			}
		}
		return len(says) == 1 && says[0] == leader, fmt.Sprintf("etcd leader %s, vigil_leader=1 on %v", leader, says)
	})

	alive := append([]string(nil), names...)
	remove := func(id string) {
		for i, x := range alive {
			if x == id {
				alive = append(alive[:i], alive[i+1:]...)
				return
			}
		}
	}
	leader := h.leader()
	victim := ""
	for _, id := range alive {
		if id != leader {
			victim = id
			break
		}
	}
	remove(victim)
	if d, _ := killAndMeasure(t, h, victim, alive); d > time.Second {
		t.Errorf("non-leader kill: shards re-owned after %s, want at most 1s (SPEC §3: its peers see the process die)", d)
	}

	leader = h.leader()
	remove(leader)
	if d, _ := killAndMeasure(t, h, leader, alive); d > time.Second {
		t.Errorf("leader kill: shards re-owned after %s, want at most 1s", d)
	}
	if l := h.leader(); l == leader || l == "" {
		t.Errorf("leader after the leader's kill is %q", l)
	}
	h.poll(5*time.Second, "every fence in Postgres to hold its etcd owner and token", h.fencesMatch)
	h.finalChecks()
}

// TestKillLatencyDistribution kills a replica of a three-replica cluster at
// the default 10s lease TTL again and again (alternately the leader and a
// non-leader, a fresh replacement started each time) and holds the
// distribution of kill-to-reowned times to SPEC §3's crash bound, 1s
// whatever the TTL; the new owners' first passes follow within the next
// pass. Long: VIGIL_LONG=1 (make test-long), VIGIL_KILLS (default 20).
func TestKillLatencyDistribution(t *testing.T) {
	if os.Getenv("VIGIL_LONG") != "1" {
		t.Skip("set VIGIL_LONG=1 to run the kill latency distribution")
	}
	kills := 20
	if n, err := strconv.Atoi(os.Getenv("VIGIL_KILLS")); err == nil && n > 0 {
		kills = n
	}
	h := newHarness(t, 64)
	opts := spawnOpts{extra: []string{"--lease-ttl", "10s"}}
	alive := []string{"dist-0", "dist-1", "dist-2"}
	for _, id := range alive {
		h.start(id, opts)
	}
	h.waitSettled(30*time.Second, alive...)
	var byRole [2][]time.Duration // 0: a non-leader killed, 1: the leader
	var passes []time.Duration
	for i := 0; i < kills; i++ {
		leader := h.leader()
		victim, role := leader, 1
		if i%2 == 1 {
			role = 0
			for _, id := range alive {
				if id != leader {
					victim = id
					break
				}
			}
		}
		var rest []string
		for _, id := range alive {
			if id != victim {
				rest = append(rest, id)
			}
		}
		reowned, passed := killAndMeasure(t, h, victim, rest)
		byRole[role] = append(byRole[role], reowned)
		passes = append(passes, passed-reowned)
		repl := fmt.Sprintf("dist-%d", len(alive)+i)
		h.start(repl, opts)
		alive = append(rest, repl)
		h.waitSettled(30*time.Second, alive...)
	}
	all := append(append([]time.Duration(nil), byRole[0]...), byRole[1]...)
	for name, lats := range map[string][]time.Duration{"a non-leader killed": byRole[0], "the leader killed": byRole[1], "all": all} {
		p50, p99, max := percentiles(lats)
		t.Logf("TTL 10s, %s (%d kills): kill -> all its shards re-owned p50 %s, p99 %s, max %s", name, len(lats), ms(p50), ms(p99), ms(max))
	}
	p50, p99, max := percentiles(passes)
	t.Logf("re-owned -> first pass over every moved shard done: p50 %s, p99 %s, max %s (interval 2s)", ms(p50), ms(p99), ms(max))
	if _, p99, max := percentiles(all); p99 > time.Second || max > time.Second {
		t.Errorf("kill -> re-owned p99 %s, max %s: want both within 1s at a 10s TTL", p99, max)
	}
	if _, _, max := percentiles(passes); max > 2*time.Second {
		t.Errorf("first pass up to %s after the claim, want within the next pass (interval 2s)", max)
	}
	h.finalChecks()
}

// percentiles are the p50, p99 and max of ds.
func percentiles(ds []time.Duration) (p50, p99, max time.Duration) {
	if len(ds) == 0 {
		return 0, 0, 0
	}
	s := slices.Clone(ds)
	slices.Sort(s)
	at := func(q float64) time.Duration { return s[min(len(s)-1, int(q*float64(len(s))))] }
	return at(0.5), at(0.99), s[len(s)-1]
}

// TestPausedReplicaKeepsItsShards: a replica SIGSTOPped for 4s at a 10s
// lease TTL is not dead — its kernel keeps its sockets open — so nobody
// revokes its lease and no shard moves.
func TestPausedReplicaKeepsItsShards(t *testing.T) {
	h := newHarness(t, 32)
	opts := spawnOpts{extra: []string{"--lease-ttl", "10s"}}
	names := []string{"stop-1", "stop-2", "stop-3"}
	for _, id := range names {
		h.start(id, opts)
	}
	h.waitSettled(30*time.Second, names...)
	before := h.rec.State()
	r := h.replica(names[1])
	if err := r.Signal(syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	stopped := time.Now()
	// The observers' connections stay open while it is stopped: wait out
	// the pause, watching the record for any move.
	h.poll(10*time.Second, "4s of pause", func() (bool, string) {
		return time.Since(stopped) >= 4*time.Second, ""
	})
	if err := r.Signal(syscall.SIGCONT); err != nil {
		t.Fatal(err)
	}
	h.waitSettled(30*time.Second, names...)
	for s := 0; s < h.shards; s++ {
		if ev := h.rec.History(s, before.Rev); len(ev) > 0 {
			t.Errorf("shard %d moved while %s was paused for 4s: %+v", s, r.ID, ev)
		}
	}
	for _, id := range names {
		if n, _ := h.replica(id).Metric(`vigil_peer_revocations_total{result="revoked"}`); n > 0 {
			t.Errorf("%s revoked %v leases", id, n)
		}
	}
	h.finalChecks()
}

// gracefulStop SIGTERMs victim, checks it exits 0 and that only its shards
// moved, each released (a DELETE of its own, one per shard: a lease revoke
// deletes them all at one revision) before a survivor claimed it. It returns
// the release -> claim gaps and the time from SIGTERM to exit.
func gracefulStop(t *testing.T, h *harness, victim string, survivors []string) (gaps []time.Duration, exit time.Duration) {
	t.Helper()
	before := h.rec.State()
	mine := before.OwnedBy(victim)
	isMine := map[int]bool{}
	for _, s := range mine {
		isMine[s] = true
	}
	r := h.replica(victim)
	t0 := time.Now()
	if err := r.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	bound := 2*testTTL + 3*time.Second
	select {
	case <-r.Done():
	case <-time.After(bound):
		t.Fatalf("%s still running %s after SIGTERM", victim, bound)
	}
	exit = r.ExitedAt().Sub(t0)
	if !r.State().Success() {
		t.Errorf("%s exited with %s after SIGTERM, want status 0", victim, r.State())
	}
	h.waitSettled(10*time.Second, survivors...)

	releaseRevs := map[int64]int{}
	for s := 0; s < h.shards; s++ {
		ev := h.rec.History(s, before.Rev)
		if !isMine[s] {
			if len(ev) > 0 {
				t.Errorf("shard %d of %s moved (%d events) when %s stopped", s, before.Owners[s].Value, len(ev), victim)
			}
			continue
		}
		if len(ev) != 2 || ev[0].Put || ev[0].CreateRev != before.Owners[s].CreateRev || !ev[1].Put {
			t.Errorf("shard %d of %s: want its key released then claimed once, got %+v", s, victim, ev)
			continue
		}
		if ev[1].Value == victim {
			t.Errorf("shard %d re-claimed by the stopping %s", s, victim)
		}
		releaseRevs[ev[0].Rev]++
		gaps = append(gaps, ev[1].At.Sub(ev[0].At))
	}
	for rev, n := range releaseRevs {
		if n > 1 {
			t.Errorf("%d shards of %s deleted together at revision %d: the lease was revoked instead of each shard being released", n, victim, rev)
		}
	}
	checkHandedOver(t, r)
	p50, max := durations(gaps)
	t.Logf("SIGTERM %s (%d shards, leader %v): exited 0 after %s; release -> claim gap p50 %s, max %s",
		victim, len(mine), before.Leader == victim, ms(exit), ms(p50), ms(max))
	return gaps, exit
}

// checkHandedOver checks from its log that a replica stopped by SIGTERM
// stopped each shard's work because the leader moved it away, never because
// its session ended or its key vanished, and did not run out of time.
func checkHandedOver(t *testing.T, r *replica) {
	t.Helper()
	for reason, n := range r.Log.StopReasons() {
		if reason != "reassigned" {
			t.Errorf("%s stopped %d shards with reason %q during its graceful stop, want only \"reassigned\"", r.ID, n, reason)
		}
	}
	if n := r.Log.Count("handover timed out"); n > 0 {
		t.Errorf("%s logged 'handover timed out'", r.ID)
	}
	if n := r.Log.Count("withdrawing membership failed"); n > 0 {
		t.Errorf("%s logged 'withdrawing membership failed'", r.ID)
	}
	if n := r.Log.Count("shard fenced by a newer owner"); n > 0 {
		t.Errorf("%s was fenced %d times during a graceful handover", r.ID, n)
	}
}

// TestGracefulStopNoOverlap: SIGTERM a non-leader, then the leader: each
// shard is released before it is claimed, with a gap under 0.5s, and no
// write of the stopped replica begins after its release.
func TestGracefulStopNoOverlap(t *testing.T) {
	h := newHarness(t, 64)
	startWorkload(t, h, 64)
	names := []string{"stop-1", "stop-2", "stop-3"}
	for _, id := range names {
		h.start(id, spawnOpts{})
	}
	h.waitSettled(15*time.Second, names...)
	for _, id := range names {
		h.poll(15*time.Second, id+" to have written", func() (bool, string) {
			n, err := h.writeCount(id)
			return err == nil && n >= 3, fmt.Sprintf("%d journal rows, %v", n, err)
		})
	}

	leader := h.leader()
	var victim string
	var rest []string
	for _, id := range names {
		if id != leader && victim == "" {
			victim = id
		} else {
			rest = append(rest, id)
		}
	}
	for _, step := range []struct {
		victim    string
		survivors []string
	}{
		{victim, rest},
		{leader, without(rest, leader)},
	} {
		gaps, exit := gracefulStop(t, h, step.victim, step.survivors)
		for _, g := range gaps {
			if g >= 500*time.Millisecond {
				t.Errorf("stop of %s: a shard was unowned for %s, want under 0.5s", step.victim, g)
			}
		}
		if exit > 2*testTTL+3*time.Second {
			t.Errorf("%s took %s to exit", step.victim, exit)
		}
	}
	h.poll(5*time.Second, "every fence in Postgres to hold its etcd owner and token", h.fencesMatch)
	n := h.checkWrites()
	t.Logf("%d writes checked against the ownership record", n)
	h.finalChecks()
}

func without(list []string, x string) []string {
	var out []string
	for _, y := range list {
		if y != x {
			out = append(out, y)
		}
	}
	return out
}

// TestScaleUpDown: 3 -> 4 replicas moves exactly the new replica's quota, all
// to it; 4 -> 2 (two SIGTERMs at once) moves none of the survivors' shards.
func TestScaleUpDown(t *testing.T) {
	h := newHarness(t, 64)
	three := []string{"scale-1", "scale-2", "scale-3"}
	for _, id := range three {
		h.start(id, spawnOpts{})
	}
	h.waitSettled(15*time.Second, three...)
	o1 := h.rec.State()

	t0 := time.Now()
	h.start("scale-4", spawnOpts{})
	four := append(append([]string(nil), three...), "scale-4")
	at := h.waitSettled(15*time.Second, four...)
	o2 := h.rec.State()
	moved := 0
	for s := 0; s < h.shards; s++ {
		if o1.Owners[s].Value == o2.Owners[s].Value {
			if ev := h.rec.History(s, o1.Rev); len(ev) > 0 {
				t.Errorf("shard %d of %s was released and re-claimed by it while scaling up: %+v", s, o1.Owners[s].Value, ev)
			}
			continue
		}
		moved++
		if o2.Owners[s].Value != "scale-4" {
			t.Errorf("shard %d moved from %s to %s, not to the new replica", s, o1.Owners[s].Value, o2.Owners[s].Value)
		}
		// One hop: released by its owner, claimed by the new replica.
		if ev := h.rec.History(s, o1.Rev); len(ev) != 2 || ev[0].Put || ev[0].Value != o1.Owners[s].Value || !ev[1].Put || ev[1].Value != "scale-4" {
			t.Errorf("shard %d: want one move %s -> scale-4, got %+v", s, o1.Owners[s].Value, ev)
		}
	}
	quota := len(o2.OwnedBy("scale-4"))
	if moved != quota || quota != h.shards/4 {
		t.Errorf("scale-up moved %d shards; the new replica owns %d, its quota is %d", moved, quota, h.shards/4)
	}
	var gaps []time.Duration
	for s := 0; s < h.shards; s++ {
		gaps = append(gaps, releaseGaps(h.rec.History(s, o1.Rev))...)
	}
	p50, max := durations(gaps)
	t.Logf("scale 3 -> 4: %d shards moved to the new replica, settled %s after its start; handover gap p50 %s, max %s",
		moved, ms(at.Sub(t0)), ms(p50), ms(max))
	for _, g := range gaps {
		if g >= 500*time.Millisecond {
			t.Errorf("scale-up: a shard was unowned for %s, want under 0.5s", g)
		}
	}

	// Stop two at once, the leader among them.
	leader := h.leader()
	stop := []string{leader}
	for _, id := range four {
		if id != leader && len(stop) < 2 {
			stop = append(stop, id)
		}
	}
	var two []string
	for _, id := range four {
		if id != stop[0] && id != stop[1] {
			two = append(two, id)
		}
	}
	t1 := time.Now()
	for _, id := range stop {
		if err := h.replica(id).Signal(syscall.SIGTERM); err != nil {
			t.Fatal(err)
		}
	}
	for _, id := range stop {
		r := h.replica(id)
		select {
		case <-r.Done():
		case <-time.After(2*testTTL + 5*time.Second):
			t.Fatalf("%s still running after SIGTERM", id)
		}
		if !r.State().Success() {
			t.Errorf("%s exited with %s, want 0", id, r.State())
		}
		checkHandedOver(t, r)
	}
	at = h.waitSettled(15*time.Second, two...)
	o3 := h.rec.State()
	gaps = gaps[:0]
	for s := 0; s < h.shards; s++ {
		ev := h.rec.History(s, o2.Rev)
		prev := o2.Owners[s].Value
		if prev == two[0] || prev == two[1] {
			if len(ev) > 0 || o3.Owners[s].Value != prev {
				t.Errorf("shard %d of survivor %s moved while %v stopped: %+v", s, prev, stop, ev)
			}
			continue
		}
		gaps = append(gaps, releaseGaps(ev)...)
	}
	p50, max = durations(gaps)
	t.Logf("scale 4 -> 2 (SIGTERM %v, leader %s): settled %s after the signals; handover gap p50 %s, max %s (%d handovers)",
		stop, leader, ms(at.Sub(t1)), ms(p50), ms(max), len(gaps))
	if max > 2*testTTL {
		t.Errorf("scale-down: a shard was unowned for %s", max)
	}
	h.poll(5*time.Second, "every fence in Postgres to hold its etcd owner and token", h.fencesMatch)
	h.finalChecks()
}

// releaseGaps lists, in a shard's events, the time from each release to the
// next claim.
func releaseGaps(ev []shardEvent) []time.Duration {
	var out []time.Duration
	for i := 0; i+1 < len(ev); i++ {
		if !ev[i].Put && ev[i+1].Put {
			out = append(out, ev[i+1].At.Sub(ev[i].At))
		}
	}
	return out
}

// TestPartitionedReplicaStepsDown: a replica cut off from etcd (silently,
// through a blackholing proxy) stops acting before anyone else can claim its
// shards — it still reaches Postgres, so its writes are the proof — and comes
// back as a new member once the partition heals.
func TestPartitionedReplicaStepsDown(t *testing.T) {
	h := newHarness(t, 64)
	startWorkload(t, h, 64)
	proxy, err := faultproxy.New(h.endpoint)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { proxy.Close() })
	names := []string{"part-1", "part-2", "part-3"}
	h.start(names[0], spawnOpts{})
	h.start(names[1], spawnOpts{})
	p := h.start(names[2], spawnOpts{etcdEndpoint: proxy.Addr()})
	h.waitSettled(15*time.Second, names...)
	h.poll(15*time.Second, p.ID+" to have written", func() (bool, string) {
		n, err := h.writeCount(p.ID)
		return err == nil && n > 0, fmt.Sprintf("%d journal rows, %v", n, err)
	})
	before := h.rec.State()
	mine := before.OwnedBy(p.ID)
	h.poll(5*time.Second, p.ID+" vigil_shards_owned to match etcd", func() (bool, string) {
		v, err := p.Metric("vigil_shards_owned")
		return err == nil && int(v) == len(mine), fmt.Sprintf("%v (%v), etcd %d", v, err, len(mine))
	})
	oldLease := before.Members[p.ID]

	tB := time.Now()
	proxy.Blackhole()
	stopped := h.poll(3*testTTL, p.ID+" to stop owning (vigil_shards_owned 0)", func() (bool, string) {
		v, err := p.Metric("vigil_shards_owned")
		return err == nil && v == 0, fmt.Sprintf("%v (%v)", v, err)
	})
	others := names[:2]
	h.waitSettled(3*testTTL+5*time.Second, others...)

	var expired, first, last time.Time
	for _, s := range mine {
		ev := h.rec.History(s, before.Rev)
		if len(ev) < 2 || ev[0].Put || !ev[1].Put {
			t.Errorf("shard %d: want its key expired then claimed, got %+v", s, ev)
			continue
		}
		expired = ev[0].At
		if first.IsZero() || ev[1].At.Before(first) {
			first = ev[1].At
		}
		if ev[1].At.After(last) {
			last = ev[1].At
		}
	}
	t.Logf("partition of %s (%d shards): stepped down (owned 0 on /metrics) %s after the blackhole; lease expired server-side after %s; first successor claim after %s (%s after the step-down), last after %s",
		p.ID, len(mine), ms(stopped.Sub(tB)), ms(expired.Sub(tB)), ms(first.Sub(tB)), ms(first.Sub(stopped)), ms(last.Sub(tB)))
	if !stopped.Before(first) {
		t.Errorf("%s still owned shards %s after the first successor claim", p.ID, stopped.Sub(first))
	}
	if lv, err := p.Metric("vigil_leader"); err != nil || lv != 0 {
		t.Errorf("partitioned %s: vigil_leader %v (%v)", p.ID, lv, err)
	}
	code, _, _ := p.Get("/readyz")
	if code == 200 {
		t.Errorf("partitioned %s still answers /readyz 200", p.ID)
	}

	tH := time.Now()
	proxy.Heal()
	h.poll(20*time.Second, p.ID+" to rejoin with a new lease", func() (bool, string) {
		l := h.rec.State().Members[p.ID]
		return l != 0 && l != oldLease, fmt.Sprintf("member lease %x (old %x)", l, oldLease)
	})
	at := h.waitSettled(20*time.Second, names...)
	t.Logf("after heal: %s rejoined and the cluster rebalanced in %s; it owns %d shards", p.ID, ms(at.Sub(tH)), len(h.rec.State().OwnedBy(p.ID)))
	h.poll(5*time.Second, "every fence in Postgres to hold its etcd owner and token", h.fencesMatch)
	n := h.checkWrites()
	t.Logf("%d writes checked against the ownership record", n)
	h.finalChecks()
}

// freezeInWrite SIGSTOPs the replica while one of its fenced write
// transactions is open: it inserts a sandbox row the agents do not have on a
// host of one of the given shards and holds that row locked, so the
// replica's reconcile, which stops the row (an orphan), waits inside its
// fenced transaction, holding the shard's fence row FOR SHARE; the moment
// Postgres shows the replica's backend waiting on the lock the process is
// frozen and the lock released. It returns the row and the freeze time.
func freezeInWrite(t *testing.T, h *harness, w *workload, r *replica, shards []int) (uuid.UUID, time.Time) {
	t.Helper()
	mine := map[int]bool{}
	for _, s := range shards {
		mine[s] = true
	}
	var hosts []uuid.UUID
	for _, id := range w.hosts {
		if mine[shard.Of(id, h.shards)] {
			hosts = append(hosts, id)
		}
	}
	if len(hosts) == 0 {
		t.Fatalf("no simulated host in the shards of %s", r.ID)
	}
	ctx := context.Background()
	for attempt := 0; attempt < 5; attempt++ {
		row := uuid.New()
		if _, err := h.db.Exec(ctx, `insert into sandboxes (id, team_id, host_id, status, last_updated, created_at)
			values ($1, $2, $3, 'running', now(), now())`, row, w.team, hosts[attempt%len(hosts)]); err != nil {
			t.Fatal(err)
		}
		tx, err := h.db.Begin(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := tx.Exec(ctx, `select 1 from sandboxes where id = $1 for update`, row); err != nil {
			t.Fatal(err)
		}
		// The replica's pass over the shard comes within one interval (2s).
		deadline := time.Now().Add(3 * time.Second)
		for time.Now().Before(deadline) {
			var waiting int
			if err := h.db.QueryRow(ctx, `select count(*) from pg_stat_activity
				 where datname = current_database() and application_name = $1 and wait_event_type = 'Lock'`,
				"vigil "+r.ID).Scan(&waiting); err != nil {
				t.Fatal(err)
			}
			if waiting > 0 {
				if err := r.Signal(syscall.SIGSTOP); err != nil {
					t.Fatal(err)
				}
				at := time.Now()
				_ = tx.Rollback(ctx)
				return row, at
			}
			time.Sleep(5 * time.Millisecond)
		}
		_ = tx.Rollback(ctx)
		t.Logf("attempt %d: %s did not reach the locked row; trying again", attempt+1, r.ID)
	}
	t.Fatalf("could not catch %s inside a write transaction", r.ID)
	return uuid.Nil, time.Time{}
}

// TestPausedReplicaIsFenced: a replica frozen (SIGSTOP) in the middle of a
// fenced write transaction, for longer than 2×TTL, loses its shards to
// successors — Postgres ends its open transaction, so it cannot hold the fence
// row against them; thawed, it commits nothing under its old tokens after the
// successors raised their fences (the write it had in flight included), and
// rejoins as a new member.
func TestPausedReplicaIsFenced(t *testing.T) {
	h := newHarness(t, 64)
	w := startWorkload(t, h, 64)
	names := []string{"pause-1", "pause-2", "pause-3"}
	for _, id := range names {
		h.start(id, spawnOpts{})
	}
	h.waitSettled(15*time.Second, names...)
	leader := h.leader()
	var victim string
	for _, id := range names {
		if id != leader {
			victim = id
			break
		}
	}
	p := h.replica(victim)
	h.poll(15*time.Second, victim+" to have written", func() (bool, string) {
		n, err := h.writeCount(victim)
		return err == nil && n >= 3, fmt.Sprintf("%d journal rows, %v", n, err)
	})
	before := h.rec.State()
	mine := before.OwnedBy(victim)
	oldLease := before.Members[victim]
	others := without(names, victim)

	frozenRow, t0 := freezeInWrite(t, h, w, p, mine)
	type raised struct {
		token int64
		owner string
		at    time.Time
	}
	fences := map[int]raised{}
	h.poll(3*testTTL+10*time.Second, "successors to own and fence the paused replica's shards, 2×TTL after the pause", func() (bool, string) {
		if ok, d := h.settled(others); !ok {
			return false, d
		}
		st := h.rec.State()
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		for _, s := range mine {
			var f raised
			if err := h.db.QueryRow(ctx, `select token, owner, updated_at from vigil_shard_fences where shard = $1`, s).Scan(&f.token, &f.owner, &f.at); err != nil {
				return false, err.Error()
			}
			if f.token != st.Owners[s].CreateRev || f.owner != st.Owners[s].Value {
				return false, fmt.Sprintf("shard %d fence (%d, %s), etcd (%d, %s)", s, f.token, f.owner, st.Owners[s].CreateRev, st.Owners[s].Value)
			}
			fences[s] = f
		}
		return time.Since(t0) > 2*testTTL, "paused for " + ms(time.Since(t0))
	})
	var lastClaim time.Time
	for _, s := range mine {
		for _, e := range h.rec.History(s, before.Rev) {
			if e.Put && e.At.After(lastClaim) {
				lastClaim = e.At
			}
		}
	}
	t1 := time.Now()
	if err := p.Signal(syscall.SIGCONT); err != nil {
		t.Fatal(err)
	}
	t.Logf("paused %s (%d shards) for %s; successors claimed all its shards %s after the pause", victim, len(mine), ms(t1.Sub(t0)), ms(lastClaim.Sub(t0)))

	h.poll(15*time.Second, victim+" to rejoin with a new lease", func() (bool, string) {
		l := h.rec.State().Members[victim]
		return l != 0 && l != oldLease, fmt.Sprintf("member lease %x (old %x)", l, oldLease)
	})
	at := h.waitSettled(20*time.Second, names...)
	t.Logf("%s rejoined as a new member; cluster rebalanced %s after SIGCONT", victim, ms(at.Sub(t1)))
	h.poll(5*time.Second, "every fence in Postgres to hold its etcd owner and token", h.fencesMatch)

	// No write under an old token after the successor's fence raise.
	shards := make([]int32, 0, len(mine))
	tokens := make([]int64, 0, len(mine))
	ats := make([]time.Time, 0, len(mine))
	for _, s := range mine {
		shards, tokens, ats = append(shards, int32(s)), append(tokens, fences[s].token), append(ats, fences[s].at)
	}
	var late, total int
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	err := h.db.QueryRow(ctx, `
		select count(*) filter (where j.token < f.token and j.written_at >= f.raised), count(*)
		  from vigil_journal j
		  join unnest($1::int[], $2::bigint[], $3::timestamptz[]) as f(shard, token, raised)
		    on j.shard = f.shard
		 where j.replica = $4`, shards, tokens, ats, victim).Scan(&late, &total)
	if err != nil {
		t.Fatal(err)
	}
	if late > 0 {
		t.Errorf("%s committed %d writes under its old tokens after the successors raised the fences", victim, late)
	}
	rej, _ := p.Metric("vigil_fence_rejections_total")
	sessions, _ := p.Metric("vigil_etcd_sessions_total")
	t.Logf("%s: %d writes on its old shards in all, %d after the successors' fence raise; vigil_fence_rejections_total %v, %d 'shard fenced by a newer owner' log lines, vigil_etcd_sessions_total %v",
		victim, total, late, rej, p.Log.Count("shard fenced by a newer owner"), sessions)
	if sessions < 2 {
		t.Errorf("%s: vigil_etcd_sessions_total %v, want a second session after the pause", victim, sessions)
	}

	// The write in flight at the freeze never committed; a successor did it.
	h.poll(10*time.Second, "the row "+victim+" was stopping when frozen to be stopped by a successor", func() (bool, string) {
		var status string
		err := h.db.QueryRow(ctx, `select status from sandboxes where id = $1`, frozenRow).Scan(&status)
		return err == nil && status == "stopped", fmt.Sprintf("status %q (%v)", status, err)
	})
	var writers []string
	rows, err := h.db.Query(ctx, `select replica from vigil_journal where sandbox_id = $1`, frozenRow)
	if err != nil {
		t.Fatal(err)
	}
	for rows.Next() {
		var r string
		if err := rows.Scan(&r); err != nil {
			t.Fatal(err)
		}
		writers = append(writers, r)
	}
	rows.Close()
	if len(writers) != 1 || writers[0] == victim {
		t.Errorf("changes of the row %s had in flight when frozen were written by %v, want one by a successor", victim, writers)
	}
	t.Logf("the write %s had in flight when frozen was rolled back; the row was stopped by %v", victim, writers)

	n := h.checkWrites()
	t.Logf("%d writes checked against the ownership record", n)
	h.finalChecks()
}

// runVigil runs the binary with args and returns its output and exit status.
func runVigil(t *testing.T, bin string, args ...string) (stdout, stderr string, code int) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, bin, args...)
	cmd.Env = cleanEnv()
	var o, e bytes.Buffer
	cmd.Stdout, cmd.Stderr = &o, &e
	err := cmd.Run()
	if err != nil {
		if _, ok := err.(*exec.ExitError); !ok {
			t.Fatalf("vigil %v: %v", args, err)
		}
	}
	return o.String(), e.String(), cmd.ProcessState.ExitCode()
}

// TestInspectCommands: `vigil shards` and `vigil owner` print what etcd says.
func TestInspectCommands(t *testing.T) {
	h := newHarness(t, 64)
	names := []string{"inspect-1", "inspect-2"}
	for _, id := range names {
		h.start(id, spawnOpts{})
	}
	h.waitSettled(15*time.Second, names...)
	st := h.rec.State()
	common := []string{"--etcd-endpoints", h.endpoint, "--cluster", h.cluster}

	out, errOut, code := runVigil(t, h.bin, append([]string{"shards"}, common...)...)
	if code != 0 {
		t.Fatalf("vigil shards: exit %d: %s", code, errOut)
	}
	row := regexp.MustCompile(`^(\d{4})\s+(\S+)\s+(\S+)$`)
	seen := 0
	for _, line := range strings.Split(out, "\n") {
		m := row.FindStringSubmatch(strings.TrimSpace(line))
		if m == nil {
			continue
		}
		s, _ := strconv.Atoi(m[1])
		if m[2] != st.Owners[s].Value || m[3] != st.Assign[s] {
			t.Errorf("vigil shards: %q, etcd says owner %s assigned %s", line, st.Owners[s].Value, st.Assign[s])
		}
		seen++
	}
	if seen != h.shards {
		t.Errorf("vigil shards printed %d shard rows, want %d:\n%s", seen, h.shards, out)
	}
	if !strings.Contains(out, "leader: "+st.Leader+"\n") {
		t.Errorf("vigil shards does not name leader %s:\n%s", st.Leader, out)
	}
	for _, id := range names {
		if want := fmt.Sprintf("member %s owns %d shards", id, len(st.OwnedBy(id))); !strings.Contains(out, want) {
			t.Errorf("vigil shards lacks %q:\n%s", want, out)
		}
	}
	if strings.Contains(out, "unowned") {
		t.Errorf("vigil shards reports unowned shards:\n%s", out)
	}

	out, errOut, code = runVigil(t, h.bin, append([]string{"shards", "--output", "json"}, common...)...)
	if code != 0 {
		t.Fatalf("vigil shards --output json: exit %d: %s", code, errOut)
	}
	var js struct {
		Shards []shardRow        `json:"shards"`
		Leader string            `json:"leader"`
		Member map[string]string `json:"members"`
	}
	if err := json.Unmarshal([]byte(out), &js); err != nil {
		t.Fatalf("vigil shards --output json: %v\n%s", err, out)
	}
	if len(js.Shards) != h.shards || js.Leader != st.Leader || len(js.Member) != len(names) {
		t.Errorf("vigil shards --output json: %d shards, leader %q, %d members:\n%s", len(js.Shards), js.Leader, len(js.Member), out)
	}
	for _, r := range js.Shards {
		if r.Shard < 0 || r.Shard >= h.shards || r.Owner != st.Owners[r.Shard].Value || r.Assigned != st.Assign[r.Shard] {
			t.Errorf("vigil shards --output json: %+v, etcd says owner %s", r, st.Owners[r.Shard%h.shards].Value)
		}
	}

	rng := rand.New(rand.NewPCG(1, 2))
	for i := 0; i < 5; i++ {
		var id uuid.UUID
		for j := range id {
			id[j] = byte(rng.UintN(256))
		}
		s := shard.Of(id, h.shards)
		for _, form := range []string{id.String(), ids.Host(id)} {
			out, errOut, code := runVigil(t, h.bin, append([]string{"owner", form}, common...)...)
			if code != 0 {
				t.Fatalf("vigil owner %s: exit %d: %s", form, code, errOut)
			}
			want := fmt.Sprintf("host %s (%s)\nshard %s\nowner %s\nassigned %s\n", id, ids.Host(id), shard.Key(s), st.Owners[s].Value, st.Assign[s])
			if out != want {
				t.Errorf("vigil owner %s:\n%s\nwant:\n%s", form, out, want)
			}
		}
	}
	if _, errOut, code := runVigil(t, h.bin, append([]string{"owner", "not-a-host"}, common...)...); code != 2 {
		t.Errorf("vigil owner not-a-host: exit %d, want 2 (%s)", code, errOut)
	}
	if _, errOut, code := runVigil(t, h.bin, "shards", "--etcd-endpoints", h.endpoint, "--cluster", "no-such-cluster"); code != 1 || !strings.Contains(errOut, "no cluster") {
		t.Errorf("vigil shards for a missing cluster: exit %d, %q; want 1 and 'no cluster'", code, errOut)
	}
	h.finalChecks()
}
