package main

// The replicas' peer failure detection (election/peer.go): each holds a
// connection to every other's admin listener and revokes the lease of a
// replica whose process it finds gone. Its counters, read from the
// survivors around a SIGKILL, say which path moved the shards.

import (
	"context"
	"slices"
)

// Peer failure-detection metrics of vigil.
const (
	mPeerSuspicions    = "vigil_peer_suspicions_total"
	mPeerConfirmations = "vigil_peer_confirmations_total"
	mPeerFalseAlarms   = "vigil_peer_false_alarms_total"
	mPeerUnconfirmed   = "vigil_peer_unconfirmed_total"
	mPeerRevocations   = "vigil_peer_revocations_total" // result
)

// peerMetrics are the families the peer figures need.
var peerMetrics = []string{mPeerSuspicions, mPeerConfirmations, mPeerFalseAlarms, mPeerUnconfirmed, mPeerRevocations}

// peerCounts are peer failure-detection counters: one replica's, or a sum.
type peerCounts struct {
	suspicions, confirmations, falseAlarms, unconfirmed float64
	revocations                                         map[string]float64 // by result
}

// revoked sums the revocations with one of results (none: every result).
func (p peerCounts) revoked(results ...string) float64 {
	var t float64
	for r, v := range p.revocations {
		if len(results) == 0 || slices.Contains(results, r) {
			t += v
		}
	}
	return t
}

// peerCounts reads every live replica's peer counters. A replica whose
// scrape fails is left out, and out of any delta with it.
func (c *cluster) peerCounts(ctx context.Context) map[string]peerCounts {
	scrapes, _ := c.scrapeAll(ctx)
	out := make(map[string]peerCounts, len(scrapes))
	for id, sc := range scrapes {
		p := peerCounts{
			suspicions:    sc.sum(mPeerSuspicions, nil),
			confirmations: sc.sum(mPeerConfirmations, nil),
			falseAlarms:   sc.sum(mPeerFalseAlarms, nil),
			unconfirmed:   sc.sum(mPeerUnconfirmed, nil),
			revocations:   map[string]float64{},
		}
		for _, smp := range sc.fams[mPeerRevocations] {
			p.revocations[smp.labels["result"]] += smp.value
		}
		out[id] = p
	}
	return out
}

// peerDelta is after − before, summed over the replicas in both: the
// survivors of a kill that happened between the two reads.
func peerDelta(before, after map[string]peerCounts) peerCounts {
	d := peerCounts{revocations: map[string]float64{}}
	for id, a := range after {
		b, ok := before[id]
		if !ok {
			continue
		}
		d.suspicions += a.suspicions - b.suspicions
		d.confirmations += a.confirmations - b.confirmations
		d.falseAlarms += a.falseAlarms - b.falseAlarms
		d.unconfirmed += a.unconfirmed - b.unconfirmed
		for r, v := range a.revocations {
			d.revocations[r] += v - b.revocations[r]
		}
	}
	return d
}
