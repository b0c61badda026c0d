// Package shard is vigil's pure ownership math: which shard a host belongs
// to, and which replica should own each shard.
//
// A host's shard is FNV-1a-64 of its UUID's 16 bytes, mod the shard count —
// stable across versions, so tools can compute it.
//
// Assign turns (members, current owners) into desired owners. It is exactly
// balanced (every member gets ⌊S/N⌋ or ⌈S/N⌉ shards), and moves as few shards
// as balance allows:
//
//  1. Each member keeps the shards it currently owns.
//  2. The ⌈S/N⌉ quotas go to the members that keep the most (ties by id), so
//     retention is maximal.
//  3. A member over its quota gives up the shards it likes least (lowest
//     rendezvous weight).
//  4. Unowned and given-up shards go to members under quota, greedily by
//     descending rendezvous weight of (shard, member) pairs — which also
//     spreads a fresh cluster's initial placement. A lazy max-heap of each
//     free shard's best pair gives the same result as sorting all pairs,
//     in well under a millisecond for S=1024, N=32.
//
// Rendezvous weights are internal: changing them only changes where shards
// that must move go, never how many move.
//
// Consequences, proven by the property tests: when a member leaves only its
// shards move; when one joins it takes exactly its quota and no shard moves
// between members that were already there. The result depends on the member
// set, not its order, and on nothing else.
package shard

import (
	"errors"
	"fmt"
	"slices"

	"github.com/google/uuid"
)

// DefaultCount is the default number of shards of a cluster.
const DefaultCount = 256

// MaxCount is the largest shard count: shard keys have 4 digits.
const MaxCount = 9999

// ValidCount checks a cluster's shard count.
func ValidCount(n int) error {
	if n < 1 || n > MaxCount {
		return fmt.Errorf("shard count %d out of range 1..%d", n, MaxCount)
	}
	return nil
}

const (
	fnvOffset64 = 14695981039346656037
	fnvPrime64  = 1099511628211
)

func fnv1a(h uint64, b []byte) uint64 {
	for _, c := range b {
		h ^= uint64(c)
		h *= fnvPrime64
	}
	return h
}

// Of returns the shard of a host: FNV-1a-64 of the UUID's 16 raw bytes, mod
// count. count must be positive.
func Of(host uuid.UUID, count int) int {
	if count <= 0 {
		panic("shard: count must be positive")
	}
	return int(fnv1a(fnvOffset64, host[:]) % uint64(count))
}

// ErrBadKey is wrapped by ParseKey's errors: the text is not a shard key of
// this cluster.
var ErrBadKey = errors.New("shard: bad shard key")

// Key formats shard n as the etcd key segment: zero-padded to 4 digits
// ("0007"). n must be in [0, 9999]; anything else gives a string ParseKey
// rejects.
func Key(n int) string { return fmt.Sprintf("%04d", n) }

// ParseKey is the inverse of Key: s must be exactly 4 ASCII digits naming a
// shard below count. Errors wrap ErrBadKey.
func ParseKey(s string, count int) (int, error) {
	if len(s) != 4 {
		return 0, fmt.Errorf("%w %q: want 4 digits", ErrBadKey, s)
	}
	n := 0
	for i := 0; i < len(s); i++ {
		if s[i] < '0' || s[i] > '9' {
			return 0, fmt.Errorf("%w %q: want 4 digits", ErrBadKey, s)
		}
		n = n*10 + int(s[i]-'0')
	}
	if n >= count {
		return 0, fmt.Errorf("%w %q: shard %d is not below the shard count %d", ErrBadKey, s, n, count)
	}
	return n, nil
}

// weight is the rendezvous weight of (shard, member): FNV-1a-64 over the
// member id (precomputed per member as seed) then the shard number as 4
// big-endian bytes, finished with a 64-bit mixer so that nearby shard numbers
// give unrelated weights. Only Of is a stable contract; weight may change
// between versions, which only changes where shards that must move go.
func weight(seed uint64, s int) uint64 {
	h := seed
	h = (h ^ uint64(byte(s>>24))) * fnvPrime64
	h = (h ^ uint64(byte(s>>16))) * fnvPrime64
	h = (h ^ uint64(byte(s>>8))) * fnvPrime64
	h = (h ^ uint64(byte(s))) * fnvPrime64
	h ^= h >> 33
	h *= 0xff51afd7ed558ccd
	h ^= h >> 33
	h *= 0xc4ceb9fe1a85ec53
	h ^= h >> 33
	return h
}

func memberSeed(member string) uint64 {
	h := uint64(fnvOffset64)
	for i := 0; i < len(member); i++ {
		h = (h ^ uint64(member[i])) * fnvPrime64
	}
	return h
}

// pair is a candidate placement of shard s on member m (an index into the
// sorted member list) with rendezvous weight w.
type pair struct {
	w    uint64
	s, m int32
}

// before orders pairs heaviest first, ties by shard then member index, so
// every replica breaks ties the same way.
func (a pair) before(b pair) bool {
	if a.w != b.w {
		return a.w > b.w
	}
	if a.s != b.s {
		return a.s < b.s
	}
	return a.m < b.m
}

// Assign computes the desired owner of each of count shards. members are
// replica ids in any order (duplicates and empty ids ignored); current[i] is
// shard i's current owner ("" for none; ids that are not members count as
// none; current may be shorter or longer than count). With no members, or a
// count that is not positive, every shard gets "".
//
// The result depends only on count, the set of members and current.
func Assign(count int, members []string, current []string) []string {
	if count <= 0 {
		return []string{}
	}
	out := make([]string, count)
	ms := dedupe(members)
	n := len(ms)
	if n == 0 {
		return out
	}
	idx := make(map[string]int32, n)
	seed := make([]uint64, n)
	for i, m := range ms {
		idx[m] = int32(i)
		seed[i] = memberSeed(m)
	}
	// owner[s] is the member index that keeps shard s, -1 if it is free.
	owner := make([]int32, count)
	held := make([]int, n)
	free := 0
	for s := range owner {
		owner[s] = -1
		if s < len(current) {
			if i, ok := idx[current[s]]; ok {
				owner[s] = i
				held[i]++
				continue
			}
		}
		free++
	}

	// Quotas: the ⌈S/N⌉ ones to the members holding the most, ties by id.
	base, extra := count/n, count%n
	order := make([]int, n)
	for i := range order {
		order[i] = i
	}
	slices.SortStableFunc(order, func(a, b int) int { return held[b] - held[a] }) // ms is sorted: stable keeps id order
	quota := make([]int, n)
	for rank, i := range order {
		quota[i] = base
		if rank < extra {
			quota[i]++
		}
	}

	// Members over quota keep the shards they weigh highest.
	var byMember [][]int32 // shards held by each member, filled lazily
	var ks []pair
	for i := range ms {
		if held[i] <= quota[i] {
			continue
		}
		if byMember == nil {
			byMember = heldShards(owner, held)
		}
		ks = ks[:0]
		for _, s := range byMember[i] {
			ks = append(ks, pair{weight(seed[i], int(s)), s, int32(i)})
		}
		slices.SortFunc(ks, func(a, b pair) int {
			if a.before(b) {
				return -1
			}
			return 1
		})
		for _, p := range ks[quota[i]:] {
			owner[p.s] = -1
		}
		free += held[i] - quota[i]
		held[i] = quota[i]
	}
	for s, o := range owner {
		if o >= 0 {
			out[s] = ms[o]
		}
	}
	if free == 0 {
		return out
	}

	// Free shards go to members under quota: repeatedly the heaviest
	// (shard, member) pair whose shard is free and whose member still needs
	// shards. A max-heap holds each free shard's best pair; a pair whose
	// member has filled up meanwhile is stale, so its shard is re-scored
	// over the members still open and pushed back. Stale weights only
	// overestimate, so the first valid pair popped is the global best.
	need := make([]int, n)
	var open []int32
	for i := range ms {
		if need[i] = quota[i] - held[i]; need[i] > 0 {
			open = append(open, int32(i))
		}
	}
	best := func(s int32) pair {
		p := pair{s: s, m: -1}
		for _, i := range open {
			if q := (pair{weight(seed[i], int(s)), s, i}); p.m < 0 || q.before(p) {
				p = q
			}
		}
		return p
	}
	h := make(pairHeap, 0, free)
	for s, o := range owner {
		if o < 0 {
			h = append(h, best(int32(s)))
		}
	}
	h.init()
	for len(h) > 0 {
		p := h[0]
		if need[p.m] == 0 {
			h[0] = best(p.s)
			h.down(0)
			continue
		}
		out[p.s] = ms[p.m]
		h.pop()
		if need[p.m]--; need[p.m] == 0 {
			open = slices.DeleteFunc(open, func(i int32) bool { return i == p.m })
		}
	}
	return out
}

// heldShards lists, per member index, the shards owner gives it, in one
// backing array.
func heldShards(owner []int32, held []int) [][]int32 {
	flat := make([]int32, 0, len(owner))
	by := make([][]int32, len(held))
	for i, c := range held {
		by[i] = flat[len(flat) : len(flat) : len(flat)+c]
		flat = flat[:len(flat)+c]
	}
	for s, o := range owner {
		if o >= 0 {
			by[o] = append(by[o], int32(s))
		}
	}
	return by
}

// pairHeap is a max-heap of pairs under before.
type pairHeap []pair

func (h pairHeap) init() {
	for i := len(h)/2 - 1; i >= 0; i-- {
		h.down(i)
	}
}

func (h pairHeap) down(i int) {
	for {
		l := 2*i + 1
		if l >= len(h) {
			return
		}
		c := l
		if r := l + 1; r < len(h) && h[r].before(h[l]) {
			c = r
		}
		if !h[c].before(h[i]) {
			return
		}
		h[i], h[c] = h[c], h[i]
		i = c
	}
}

func (h *pairHeap) pop() {
	old := *h
	last := len(old) - 1
	old[0] = old[last]
	*h = old[:last]
	h.down(0)
}

func dedupe(members []string) []string {
	seen := make(map[string]bool, len(members))
	out := make([]string, 0, len(members))
	for _, m := range members {
		if m == "" || seen[m] {
			continue
		}
		seen[m] = true
		out = append(out, m)
	}
	slices.Sort(out)
	return out
}
