package shard

import (
	"cmp"
	"errors"
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
	if got, err := ParseKey("1023", 1024); err != nil || got != 1023 {
		t.Errorf("ParseKey(1023, 1024) = %d, %v", got, err)
	}
	for _, bad := range []string{"", "7", "007", "00007", "0x07", "-001", "+001", "0256", "9999", "abcd", " 007", "007 ", "٠٠٠٧"} {
		if _, err := ParseKey(bad, 256); !errors.Is(err, ErrBadKey) {
			t.Errorf("ParseKey(%q) = %v, want ErrBadKey", bad, err)
		}
	}
	if _, err := ParseKey("0000", 0); !errors.Is(err, ErrBadKey) {
		t.Errorf("ParseKey with count 0 accepted")
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

// TestRandomHistories drives random membership histories (joins, leaves,
// replacements) and checks every step: balance, minimal moves, the rule of
// the step's kind, and independence of member order.
func TestRandomHistories(t *testing.T) {
	r := rand.New(rand.NewPCG(5, 6))
	next := 0
	fresh := func() string { next++; return fmt.Sprintf("r%d", next) }
	for _, count := range []int{64, 256, 1024} {
		for trial := 0; trial < 20; trial++ {
			var ms []string
			for range 1 + r.IntN(32) {
				ms = append(ms, fresh())
			}
			cur := Assign(count, ms, nil)
			for step := 0; step < 30; step++ {
				var gone, joined string
				switch op := r.IntN(3); {
				case op == 0 && len(ms) < 32:
					joined = fresh()
					ms = append(ms, joined)
				case op == 1 && len(ms) > 1:
					i := r.IntN(len(ms))
					gone = ms[i]
					ms = slices.Delete(ms, i, i+1)
				default:
					i := r.IntN(len(ms))
					gone, joined = ms[i], fresh()
					ms[i] = joined
				}
				got := Assign(count, ms, cur)
				checkBalanced(t, count, ms, got)
				if m, want := moved(cur, got), minMoves(count, ms, cur); m != want {
					t.Fatalf("S=%d step %d: moved %d shards, minimum is %d", count, step, m, want)
				}
				took := 0
				for s := range got {
					if got[s] == cur[s] {
						continue
					}
					switch {
					case gone != "" && cur[s] != gone:
						t.Fatalf("S=%d step %d: %s left, yet shard %d moved %s -> %s", count, step, gone, s, cur[s], got[s])
					case gone == "" && got[s] != joined:
						t.Fatalf("S=%d step %d: %s joined, yet shard %d moved %s -> %s", count, step, joined, s, cur[s], got[s])
					}
					if got[s] == joined {
						took++
					}
				}
				if joined != "" {
					if q := count / len(ms); took != q && took != q+1 {
						t.Fatalf("S=%d N=%d step %d: joiner took %d, want %d or %d", count, len(ms), step, took, q, q+1)
					}
				}
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
	if g := Assign(16, []string{"", ""}, cur); len(g) != 16 || g[0] != "" {
		t.Errorf("only empty ids: %v", g)
	}
	if g := Assign(0, ms, cur); len(g) != 0 {
		t.Errorf("count 0: %v", g)
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
		if want := assignReference(c, ms, cur); !slices.Equal(got, want) {
			t.Fatalf("differs from the reference greedy")
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

func BenchmarkAssignFresh1024x32(b *testing.B) {
	ms := ids(32)
	b.ReportAllocs()
	for b.Loop() {
		Assign(1024, ms, nil)
	}
}

func BenchmarkAssignLeave1024x32(b *testing.B) {
	ms := ids(33)
	cur := Assign(1024, ms, nil)
	ms = ms[1:]
	b.ReportAllocs()
	for b.Loop() {
		Assign(1024, ms, cur)
	}
}

// assignReference is Assign written the slow, obvious way: quotas by sorting
// members on (held desc, id asc); over-quota members keep their heaviest
// shards; then every (free shard, member under quota) pair sorted heaviest
// first and taken greedily.
func assignReference(count int, members []string, current []string) []string {
	set := map[string]bool{}
	for _, m := range members {
		if m != "" {
			set[m] = true
		}
	}
	ms := make([]string, 0, len(set))
	for m := range set {
		ms = append(ms, m)
	}
	slices.Sort(ms)
	out := make([]string, count)
	if len(ms) == 0 {
		return out
	}
	held := map[string][]int{}
	for s := 0; s < count && s < len(current); s++ {
		if set[current[s]] {
			held[current[s]] = append(held[current[s]], s)
		}
	}
	byHeld := slices.Clone(ms)
	slices.SortFunc(byHeld, func(a, b string) int {
		return cmp.Or(cmp.Compare(len(held[b]), len(held[a])), cmp.Compare(a, b))
	})
	quota := map[string]int{}
	for rank, m := range byHeld {
		quota[m] = count / len(ms)
		if rank < count%len(ms) {
			quota[m]++
		}
	}
	for _, m := range ms {
		hs := held[m]
		slices.SortFunc(hs, func(a, b int) int {
			return cmp.Or(cmp.Compare(weight(memberSeed(m), b), weight(memberSeed(m), a)), cmp.Compare(a, b))
		})
		for _, s := range hs[:min(len(hs), quota[m])] {
			out[s] = m
		}
	}
	type cand struct {
		w uint64
		s int
		m string
	}
	var cands []cand
	for s := range out {
		if out[s] != "" {
			continue
		}
		for _, m := range ms {
			if len(held[m]) < quota[m] {
				cands = append(cands, cand{weight(memberSeed(m), s), s, m})
			}
		}
	}
	slices.SortFunc(cands, func(a, b cand) int {
		return cmp.Or(cmp.Compare(b.w, a.w), cmp.Compare(a.s, b.s), cmp.Compare(a.m, b.m))
	})
	got := map[string]int{}
	for _, c := range cands {
		if out[c.s] == "" && len(held[c.m])+got[c.m] < quota[c.m] {
			out[c.s] = c.m
			got[c.m]++
		}
	}
	return out
}

func TestHeapGreedyEqualsReference(t *testing.T) {
	r := rand.New(rand.NewPCG(9, 10))
	for trial := 0; trial < 300; trial++ {
		count := []int{1, 7, 64, 256, 1024}[r.IntN(5)]
		n := r.IntN(33)
		ms := ids(n)
		var cur []string
		switch r.IntN(3) {
		case 0: // fresh cluster
		case 1: // a balanced assignment of other members, some of them ours
			cur = Assign(count, ids(r.IntN(33)), nil)
		default: // garbage: random owners, members and not, some short
			cur = make([]string, r.IntN(count+8))
			for i := range cur {
				if r.IntN(4) > 0 {
					cur[i] = fmt.Sprintf("replica-%02d", r.IntN(40))
				}
			}
		}
		if got, want := Assign(count, ms, cur), assignReference(count, ms, cur); !slices.Equal(got, want) {
			t.Fatalf("S=%d N=%d: Assign differs from the reference greedy", count, n)
		}
	}
}

func TestCeilQuotaGoesToBiggestHolderThenLowestID(t *testing.T) {
	// S=10, N=3: quotas 4,3,3. b and c hold 4 each, a holds 2: the one ceil
	// quota goes to b (tie with c broken by id), c gives one shard to a.
	cur := []string{"a", "a", "b", "b", "b", "b", "c", "c", "c", "c"}
	got := Assign(10, []string{"c", "b", "a"}, cur)
	per := map[string]int{}
	for _, o := range got {
		per[o]++
	}
	if per["a"] != 3 || per["b"] != 4 || per["c"] != 3 {
		t.Fatalf("per member %v, want a:3 b:4 c:3", per)
	}
	if m := moved(cur, got); m != 1 {
		t.Fatalf("moved %d shards, want 1", m)
	}
	// The member holding the most gets the ceil even if its id sorts last.
	cur = []string{"z", "z", "z", "z", "z", "a", "a", "b", "b", "b"}
	got = Assign(10, []string{"a", "b", "z"}, cur)
	per = map[string]int{}
	for _, o := range got {
		per[o]++
	}
	if per["z"] != 4 || per["a"] != 3 || per["b"] != 3 || moved(cur, got) != 1 {
		t.Fatalf("per member %v, moved %d; want z:4 a:3 b:3, 1 move", per, moved(cur, got))
	}
}

func TestFreshPlacementFollowsRendezvous(t *testing.T) {
	for _, count := range []int{64, 256, 1024} {
		for n := 2; n <= 32; n++ {
			ms := ids(n)
			got := Assign(count, ms, nil)
			top, run, maxRun := 0, 1, 1
			for s := range got {
				best := ms[0]
				for _, m := range ms[1:] {
					if weight(memberSeed(m), s) > weight(memberSeed(best), s) {
						best = m
					}
				}
				if got[s] == best {
					top++
				}
				if s > 0 && got[s] == got[s-1] {
					run++
					maxRun = max(maxRun, run)
				} else {
					run = 1
				}
			}
			if top*10 < count*6 {
				t.Errorf("S=%d N=%d: only %d shards on their highest-weight member", count, n, top)
			}
			if maxRun > 16 {
				t.Errorf("S=%d N=%d: %d consecutive shards share an owner", count, n, maxRun)
			}
		}
	}
}
