package shard

import (
	"fmt"
	"hash/fnv"
	"math/rand/v2"
	"slices"
	"testing"

	"github.com/google/uuid"
)

func TestOfIsFNV1a64OfTheUUIDBytes(t *testing.T) {
	for _, s := range []string{"00000000-0000-0000-0000-000000000000", "6ba7b810-9dad-11d1-80b4-00c04fd430c8", "ffffffff-ffff-ffff-ffff-ffffffffffff"} {
		u := uuid.MustParse(s)
		h := fnv.New64a()
		h.Write(u[:])
		if got, want := Of(u, 256), int(h.Sum64()%256); got != want {
			t.Errorf("Of(%s) = %d, want %d", s, got, want)
		}
	}
	// Pinned: a change of algorithm must break this.
	if got := Of(uuid.MustParse("6ba7b810-9dad-11d1-80b4-00c04fd430c8"), 1<<30); got != pinned {
		t.Errorf("Of(6ba7b810-…, 2^30) = %d, want %d", got, pinned)
	}
}

const pinned = 524429340 // FNV-1a-64(6ba7b810-9dad-11d1-80b4-00c04fd430c8) mod 2^30

func TestSpread(t *testing.T) {
	counts := make([]int, 256)
	r := rand.New(rand.NewPCG(1, 2))
	for i := 0; i < 10000; i++ {
		var u uuid.UUID
		for j := range u {
			u[j] = byte(r.Uint32())
		}
		counts[Of(u, 256)]++
	}
	for s, c := range counts {
		if c == 0 {
			t.Errorf("shard %d empty over 10k hosts", s)
		}
	}
}

func TestKeys(t *testing.T) {
	if Key(7) != "0007" || Key(255) != "0255" {
		t.Fatal(Key(7), Key(255))
	}
	for n := 0; n < 256; n++ {
		if got, err := ParseKey(Key(n), 256); err != nil || got != n {
			t.Fatalf("ParseKey(%s) = %d, %v", Key(n), got, err)
		}
	}
	for _, bad := range []string{"", "7", "007", "00007", "0x07", "-001", "0256", "abcd", " 007"} {
		if _, err := ParseKey(bad, 256); err == nil {
			t.Errorf("ParseKey(%q) accepted", bad)
		}
	}
}

func ids(n int) []string {
	out := make([]string, n)
	for i := range out {
		out[i] = fmt.Sprintf("replica-%02d", i)
	}
	return out
}

func checkBalanced(t *testing.T, count int, members []string, got []string) {
	t.Helper()
	per := map[string]int{}
	for s, o := range got {
		if !slices.Contains(members, o) {
			t.Fatalf("shard %d -> %q, not a member of %v", s, o, members)
		}
		per[o]++
	}
	lo, hi := count/len(members), (count+len(members)-1)/len(members)
	for _, m := range members {
		if per[m] < lo || per[m] > hi {
			t.Fatalf("S=%d N=%d: %s got %d, want %d..%d", count, len(members), m, per[m], lo, hi)
		}
	}
}

func moved(a, b []string) (n int) {
	for i := range a {
		if a[i] != b[i] {
			n++
		}
	}
	return n
}

func TestBalanceFreshCluster(t *testing.T) {
	for _, count := range []int{64, 256, 1024} {
		for n := 1; n <= 32; n++ {
			checkBalanced(t, count, ids(n), Assign(count, ids(n), nil))
		}
	}
}

func TestLeaveMovesOnlyTheLeaversShards(t *testing.T) {
	r := rand.New(rand.NewPCG(3, 4))
	for _, count := range []int{64, 256, 1024} {
		for n := 2; n <= 32; n++ {
			ms := ids(n)
			before := Assign(count, ms, nil)
			leaver := ms[r.IntN(n)]
			rest := slices.DeleteFunc(slices.Clone(ms), func(m string) bool { return m == leaver })
			after := Assign(count, rest, before)
			checkBalanced(t, count, rest, after)
			for s := range before {
				if before[s] != leaver && after[s] != before[s] {
					t.Fatalf("S=%d N=%d: shard %d moved %s -> %s though %s stayed", count, n, s, before[s], after[s], before[s])
				}
			}
		}
	}
}

func TestJoinTakesExactlyItsQuota(t *testing.T) {
	for _, count := range []int{64, 256, 1024} {
		for n := 1; n < 32; n++ {
			ms := ids(n)
			before := Assign(count, ms, nil)
			joined := append(slices.Clone(ms), "new-replica")
			after := Assign(count, joined, before)
			checkBalanced(t, count, joined, after)
			got := 0
			for s := range before {
				if after[s] != before[s] {
					if after[s] != "new-replica" {
						t.Fatalf("S=%d N=%d: shard %d moved %s -> %s between old members", count, n, s, before[s], after[s])
					}
					got++
				}
			}
			if want := count / (n + 1); got != want && got != want+1 {
				t.Fatalf("S=%d N=%d: joiner took %d, want %d or %d", count, n, got, want, want+1)
			}
		}
	}
}

// minMoves is the least number of shards that must change owner to reach
// a balanced assignment from current: every shard not kept must move, and a
// member can keep at most its quota, with the ⌈S/N⌉ quotas best given to the
// members holding the most.
func minMoves(count int, members []string, current []string) int {
	held := map[string]int{}
	for s := 0; s < count; s++ {
		if s < len(current) && slices.Contains(members, current[s]) {
			held[current[s]]++
		}
	}
	hs := make([]int, 0, len(members))
	for _, m := range members {
		hs = append(hs, held[m])
	}
	slices.Sort(hs)
	slices.Reverse(hs)
	base, extra := count/len(members), count%len(members)
	keep := 0
	for i, h := range hs {
		q := base
		if i < extra {
			q++
		}
		keep += min(h, q)
	}
	return count - keep
}

func TestRandomHistories(t *testing.T) {
	r := rand.New(rand.NewPCG(5, 6))
	next := 0
	for _, count := range []int{64, 256, 1024} {
		for trial := 0; trial < 20; trial++ {
			var ms []string
			var cur []string
			for step := 0; step < 15; step++ {
				switch op := r.IntN(3); {
				case op == 0 || len(ms) == 0: // join
					ms = append(ms, fmt.Sprintf("r%d", next))
					next++
				case op == 1 && len(ms) > 1: // leave
					i := r.IntN(len(ms))
					ms = slices.Delete(ms, i, i+1)
					if len(ms) == 0 {
						ms = append(ms, fmt.Sprintf("r%d", next))
						next++
					}
				default: // replace
					ms[r.IntN(len(ms))] = fmt.Sprintf("r%d", next)
					next++
				}
				if len(ms) > 32 {
					ms = ms[1:]
				}
				got := Assign(count, ms, cur)
				checkBalanced(t, count, ms, got)
				if cur != nil {
					if m, want := moved(cur, got), minMoves(count, ms, cur); m != want {
						t.Fatalf("S=%d step %d: moved %d shards, minimum is %d", count, step, m, want)
					}
				}
				// Determinism under permutation.
				perm := slices.Clone(ms)
				r.Shuffle(len(perm), func(i, j int) { perm[i], perm[j] = perm[j], perm[i] })
				if !slices.Equal(Assign(count, perm, cur), got) {
					t.Fatalf("S=%d: result depends on member order", count)
				}
				cur = got
			}
		}
	}
}

func TestGarbageInput(t *testing.T) {
	ms := []string{"b", "a", "a", "", "c"}
	cur := []string{"ghost", "", "a", "zzz"} // shorter than count, non-members
	got := Assign(16, ms, cur)
	checkBalanced(t, 16, []string{"a", "b", "c"}, got)
	if got[2] != "a" {
		t.Errorf("shard 2 left its member owner")
	}
	if g := Assign(16, nil, cur); len(g) != 16 || g[0] != "" {
		t.Errorf("no members: %v", g)
	}
	long := make([]string, 40)
	for i := range long {
		long[i] = "a"
	}
	checkBalanced(t, 16, []string{"a", "b", "c"}, Assign(16, ms, long))
}

func FuzzAssign(f *testing.F) {
	f.Add(uint16(64), uint8(3), uint64(1))
	f.Fuzz(func(t *testing.T, count uint16, n uint8, seed uint64) {
		c := int(count%1024) + 1
		k := int(n%32) + 1
		r := rand.New(rand.NewPCG(seed, 7))
		ms := ids(k)
		cur := make([]string, c)
		for i := range cur {
			if r.IntN(3) > 0 {
				cur[i] = fmt.Sprintf("replica-%02d", r.IntN(40))
			}
		}
		got := Assign(c, ms, cur)
		checkBalanced(t, c, ms, got)
		if m, want := moved(cur, got), minMoves(c, ms, cur); m != want {
			t.Fatalf("moved %d, minimum %d", m, want)
		}
	})
}

func BenchmarkAssign1024x32(b *testing.B) {
	ms := ids(32)
	cur := Assign(1024, ids(31), nil)
	b.ReportAllocs()
	for b.Loop() {
		Assign(1024, ms, cur)
	}
}
