package monitor

import (
	"sync"
	"sync/atomic"
)

// Lanes of the call queue.
const (
	laneUrgent = iota // reconnects (rule 8) and zombie destroys: run first
	laneNormal        // full passes
	lanes
)

// callQueue runs the replica's agent calls on at most max goroutines: the
// one bound on calls in flight, whatever the number of owned shards. Each
// lane is FIFO and urgent calls go first. A full pass queues all its hosts at
// once, so every owned host waits its turn behind the same queue: the fleet
// is visited host by host, round-robin, and a shard with more hosts does not
// fall behind one with fewer.
//
// Workers are started as calls arrive and exit when both lanes are empty, so
// an idle replica holds none.
type callQueue struct {
	max int

	mu      sync.Mutex
	lanes   [lanes][]*queuedCall
	workers int
}

// queuedCall is one call waiting for a worker. Its state moves once, from
// queued to started (a worker took it) or to abandoned (its pass gave up on
// it), so a call is either run or abandoned, never both.
type queuedCall struct {
	state atomic.Int32
	fn    func()
}

const (
	callQueued int32 = iota
	callStarted
	callAbandoned
)

func newCallQueue(max int) *callQueue { return &callQueue{max: max} }

// submit queues fn on lane and returns its handle.
func (q *callQueue) submit(lane int, fn func()) *queuedCall {
	c := &queuedCall{fn: fn}
	q.mu.Lock()
	q.lanes[lane] = append(q.lanes[lane], c)
	if q.workers < q.max {
		q.workers++
		go q.work()
	}
	q.mu.Unlock()
	return c
}

// abandon takes c out of the queue if no worker started it yet, and reports
// whether it did: then fn never runs.
func (c *queuedCall) abandon() bool { return c.state.CompareAndSwap(callQueued, callAbandoned) }

func (q *callQueue) work() {
	for {
		c := q.next()
		if c == nil {
			return
		}
		if c.state.CompareAndSwap(callQueued, callStarted) {
			c.fn()
		}
	}
}

// next pops the first call of the first non-empty lane; nil (and the worker
// retires) when both are empty.
func (q *callQueue) next() *queuedCall {
	q.mu.Lock()
	defer q.mu.Unlock()
	for l := range q.lanes {
		if len(q.lanes[l]) > 0 {
			c := q.lanes[l][0]
			q.lanes[l][0] = nil
			q.lanes[l] = q.lanes[l][1:]
			if len(q.lanes[l]) == 0 {
				q.lanes[l] = nil // let the backing array go
			}
			return c
		}
	}
	q.workers--
	return nil
}
