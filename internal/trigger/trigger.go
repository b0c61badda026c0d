// Package trigger is a coalescing wake-up: Fire never blocks, and any number
// of Fires before the receiver looks become one wake-up (Prometheus's
// triggerReload, Temporal's shard ownership). Loops that react to bursts of
// changes (etcd events, hosts to reconcile, events to relay) select on C.
package trigger

// T is a coalescing trigger. The zero value is not usable; use New.
type T struct {
	c chan struct{} // capacity 1: one pending wake-up stands for any number of Fires
}

// New returns a trigger with no wake-up pending.
func New() *T { return &T{c: make(chan struct{}, 1)} }

// Fire makes one wake-up pending, unless one is already.
func (t *T) Fire() {
	select {
	case t.c <- struct{}{}:
	default:
	}
}

// C delivers the pending wake-up. Receiving consumes it.
func (t *T) C() <-chan struct{} { return t.c }
