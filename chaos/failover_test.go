package chaos

import (
	"testing"
	"time"
)

// What a failover lost counts as having happened, where it happened: on the
// old primary, after what survived of it and before anything the promoted
// standby committed, although the new primary's commit numbers restart
// below the lost ones.
func TestWithLostPlacesLostCommitsBeforeTheFailover(t *testing.T) {
	// The old primary committed 1..5; the standby had 1..3 (floor 3: its
	// sequence resumes at 4). Lost: b's raise of 20 (commit 4) and b's write
	// (commit 5). After the failover a, still holding token 10, writes
	// (commit 4 on the new timeline).
	loss := &lostCommits{floor: 3,
		raises:  []fenceRaise{{shard: 0, token: 20, owner: "b", commitSeq: 4}},
		journal: []journalRow{jr(5, 0, 20, "b", hostA)},
	}
	survivors := []journalRow{jr(1, 0, 10, "a", hostA), jr(2, 0, 10, "a", hostB)}
	raises := []fenceRaise{{shard: 0, token: 10, owner: "a", commitSeq: 0}}

	// a is refused until it claims again: its next write is under a newer
	// token. Nothing is stale, nothing interleaves.
	clean := append(append([]journalRow(nil), survivors...), jr(4, 0, 30, "a", hostA))
	j, r := withLost(clean, raises, []*lostCommits{loss})
	if got := staleWrites(j, r); len(got) != 0 {
		t.Errorf("a write under a token above the lost raise: %v", got)
	}
	if hosts, _ := doubleActing(j); len(hosts) != 0 {
		t.Errorf("double acting found in a clean history: %v", hosts)
	}

	// a passes the fence the failover set back to its token (the broken
	// build): its write is stale against b's lost raise, and a's and b's
	// writes on host A interleave.
	broken := append(append([]journalRow(nil), survivors...), jr(4, 0, 10, "a", hostA))
	j, r = withLost(broken, raises, []*lostCommits{loss})
	if got := staleWrites(j, r); len(got) != 1 {
		t.Errorf("stale writes = %v, want the one write under 10 after the lost raise of 20", got)
	}
	if hosts, _ := doubleActing(j); len(hosts) != 1 {
		t.Errorf("double-acted hosts = %v, want host A", hosts)
	}
	// Without the lost commits the same history looks clean: the check
	// would not bite.
	if got := staleWrites(broken, raises); len(got) != 0 {
		t.Errorf("the surviving history alone: %v", got)
	}
}

func TestWithLostKeepsEachEpochInItsServersOrder(t *testing.T) {
	l1 := &lostCommits{floor: 10, journal: []journalRow{jr(12, 0, 20, "b", hostA)}}
	l2 := &lostCommits{floor: 40, journal: []journalRow{jr(45, 0, 40, "c", hostA)}}
	in := []journalRow{jr(5, 0, 10, "a", hostA), jr(11, 0, 30, "c", hostA), jr(41, 0, 50, "d", hostA)}
	j, _ := withLost(in, nil, []*lostCommits{l1, l2})
	var order []string
	for _, r := range j {
		order = append(order, r.replica)
	}
	if got, want := len(order), 5; got != want {
		t.Fatalf("%d rows, want %d", got, want)
	}
	for i, w := range []string{"a", "b", "c", "c", "d"} {
		if order[i] != w {
			t.Fatalf("order %v, want a b c c d", order)
		}
	}
	for i := 1; i < len(j); i++ {
		if j[i].commitSeq <= j[i-1].commitSeq {
			t.Fatalf("commit ranks not increasing: %v", j)
		}
	}
}

// TestFailoverSmoke is the short failover case of the chaos smoke: the
// run's own Postgres with a streaming standby, synchronous and
// asynchronous failovers with their worst interleavings beside kills and
// pauses; every check must pass.
func TestFailoverSmoke(t *testing.T) {
	rep := runChaos(t, Config{Seed: 20261203, Duration: 45 * time.Second, PrivatePostgres: true,
		Kinds: []string{"failover-async", "failover-sync", "kill", "pause"}})
	if rep.Failed {
		t.Errorf("the failover run found violations (report above; files in %s)", rep.Dir)
	}
	if rep.Failovers["sync"] == 0 || rep.Failovers["async"] == 0 {
		t.Errorf("failovers by mode: %v, want both", rep.Failovers)
	}
	if rep.DatabaseChanges == 0 {
		t.Errorf("no fenced write noticed a failover")
	}
}

// TestFailoverBrokenBuildIsCaught runs the failover nemesis against vigil
// built with -tags chaos_noidentity (store/identity_chaos_noidentity.go: a
// fenced transaction no longer notices that the database changed under
// its fence). An owner then passes the fence an asynchronous failover set
// back to its token, after its successor's raise was acknowledged: the
// checker must catch it.
func TestFailoverBrokenBuildIsCaught(t *testing.T) {
	rep := runChaos(t, FailoverBrokenBuild(Config{Seed: 8}))
	if !rep.Caught() {
		t.Errorf("the build that ignores failovers was not caught: %v", rep.Summary())
	}
	if rep.LostRaises == 0 {
		t.Errorf("no failover lost a raise")
	}
	t.Logf("the broken build: %s; %d raises lost", rep.Summary(), rep.LostRaises)
}
