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
//     spreads a fresh cluster's initial placement.
//
// Consequences, proven by the property tests: when a member leaves only its
// shards move; when one joins it takes exactly its quota and no shard moves
// between members that were already there. The result depends on the member
// set, not its order, and on nothing else.
package shard

import (
	"fmt"
	"sort"
	"strconv"

	"github.com/google/uuid"
)

// DefaultCount is the default number of shards of a cluster.
const DefaultCount = 256

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

// Key formats a shard number as etcd key segment: zero-padded to 4 digits.
func Key(n int) string { return fmt.Sprintf("%04d", n) }

// ParseKey parses a 4-digit shard key segment and checks it is below count.
func ParseKey(s string, count int) (int, error) {
	if len(s) != 4 {
		return 0, fmt.Errorf("shard key %q: want 4 digits", s)
	}
	for i := 0; i < len(s); i++ {
		if s[i] < '0' || s[i] > '9' {
			return 0, fmt.Errorf("shard key %q: want 4 digits", s)
		}
	}
	n, _ := strconv.Atoi(s)
	if n >= count {
		return 0, fmt.Errorf("shard key %q: shard %d is not below the shard count %d", s, n, count)
	}
	return n, nil
}

// weight is the rendezvous weight of (shard, member): FNV-1a-64 over the
// shard number and member id, finished with a 64-bit mixer so that nearby
// shard numbers give unrelated weights.
func weight(s int, member string) uint64 {
	var b [4]byte
	b[0], b[1], b[2], b[3] = byte(s>>24), byte(s>>16), byte(s>>8), byte(s)
	h := fnv1a(fnvOffset64, b[:])
	h = fnv1a(h, []byte(member))
	h ^= h >> 33
	h *= 0xff51afd7ed558ccd
	h ^= h >> 33
	h *= 0xc4ceb9fe1a85ec53
	h ^= h >> 33
	return h
}

// Assign computes the desired owner of each of count shards. members are
// replica ids in any order (duplicates and empty ids ignored); current[i] is
// shard i's current owner ("" for none; ids that are not members count as
// none; current may be shorter or longer than count). With no members every
// shard gets "".
func Assign(count int, members []string, current []string) []string {
	out := make([]string, count)
	ms := dedupe(members)
	n := len(ms)
	if n == 0 || count <= 0 {
		return out
	}
	idx := make(map[string]int, n)
	for i, m := range ms {
		idx[m] = i
	}
	kept := make([][]int, n)
	var free []int
	for s := 0; s < count; s++ {
		var cur string
		if s < len(current) {
			cur = current[s]
		}
		if i, ok := idx[cur]; ok {
			kept[i] = append(kept[i], s)
		} else {
			free = append(free, s)
		}
	}

	// Quotas: the ⌈S/N⌉ ones to the members keeping the most.
	base, extra := count/n, count%n
	order := make([]int, n)
	for i := range order {
		order[i] = i
	}
	sort.SliceStable(order, func(a, b int) bool {
		ka, kb := len(kept[order[a]]), len(kept[order[b]])
		if ka != kb {
			return ka > kb
		}
		return ms[order[a]] < ms[order[b]]
	})
	quota := make([]int, n)
	for rank, i := range order {
		quota[i] = base
		if rank < extra {
			quota[i]++
		}
	}

	// Members over quota keep the shards they weigh highest.
	for i := range ms {
		if len(kept[i]) <= quota[i] {
			continue
		}
		ks := kept[i]
		sort.Slice(ks, func(a, b int) bool {
			wa, wb := weight(ks[a], ms[i]), weight(ks[b], ms[i])
			if wa != wb {
				return wa > wb
			}
			return ks[a] < ks[b]
		})
		free = append(free, ks[quota[i]:]...)
		kept[i] = ks[:quota[i]]
	}
	for i, ks := range kept {
		for _, s := range ks {
			out[s] = ms[i]
		}
	}
	if len(free) == 0 {
		return out
	}

	// Free shards to members under quota, heaviest pairs first.
	var takers []int
	need := make([]int, n)
	for i := range ms {
		if need[i] = quota[i] - len(kept[i]); need[i] > 0 {
			takers = append(takers, i)
		}
	}
	type pair struct {
		w      uint64
		s, mem int
	}
	pairs := make([]pair, 0, len(free)*len(takers))
	for _, s := range free {
		for _, i := range takers {
			pairs = append(pairs, pair{weight(s, ms[i]), s, i})
		}
	}
	sort.Slice(pairs, func(a, b int) bool {
		if pairs[a].w != pairs[b].w {
			return pairs[a].w > pairs[b].w
		}
		if pairs[a].s != pairs[b].s {
			return pairs[a].s < pairs[b].s
		}
		return pairs[a].mem < pairs[b].mem
	})
	taken := make(map[int]bool, len(free))
	for _, p := range pairs {
		if taken[p.s] || need[p.mem] == 0 {
			continue
		}
		taken[p.s] = true
		need[p.mem]--
		out[p.s] = ms[p.mem]
	}
	return out
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
	sort.Strings(out)
	return out
}
