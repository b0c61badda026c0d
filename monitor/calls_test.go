package monitor

import (
	"sync"
	"testing"
	"time"
)

// The queue runs at most max calls at once, urgent ones before the normal
// ones already waiting, each lane in order; an abandoned call never runs.
func TestCallQueueOrderBoundAndAbandon(t *testing.T) {
	q := newCallQueue(1)
	var mu sync.Mutex
	var order []string
	running, peak := 0, 0
	release, holding := make(chan struct{}), make(chan struct{})
	var wg sync.WaitGroup
	call := func(name string, block bool) func() {
		wg.Add(1)
		return func() {
			defer wg.Done()
			if block {
				close(holding)
			}
			mu.Lock()
			running++
			peak = max(peak, running)
			order = append(order, name)
			mu.Unlock()
			if block {
				<-release
			}
			mu.Lock()
			running--
			mu.Unlock()
		}
	}
	q.submit(laneNormal, call("n0", true)) // holds the one worker
	<-holding
	for _, n := range []string{"n1", "n2"} {
		q.submit(laneNormal, call(n, false))
	}
	gone := q.submit(laneNormal, call("n3", false))
	q.submit(laneUrgent, call("u0", false))
	q.submit(laneUrgent, call("u1", false))
	if !gone.abandon() {
		t.Fatal("a queued call could not be abandoned")
	}
	wg.Done() // n3 never runs
	close(release)
	wg.Wait()
	want := []string{"n0", "u0", "u1", "n1", "n2"}
	if len(order) != len(want) {
		t.Fatalf("ran %v, want %v", order, want)
	}
	for i := range want {
		if order[i] != want[i] {
			t.Fatalf("ran %v, want %v", order, want)
		}
	}
	if peak != 1 {
		t.Fatalf("%d calls ran at once, want at most 1", peak)
	}
	ran := make(chan struct{})
	started := q.submit(laneNormal, func() { close(ran) })
	<-ran
	if started.abandon() {
		t.Fatal("a started call was abandoned")
	}
}

func TestUntilPhase(t *testing.T) {
	const iv = 10 * time.Second
	for _, c := range []struct {
		now, phase, want time.Duration
	}{
		{0, 0, iv},
		{time.Second, 0, 9 * time.Second},
		{time.Second, 3 * time.Second, 2 * time.Second},
		{5 * time.Second, 3 * time.Second, 8 * time.Second},
		{3 * time.Second, 3 * time.Second, iv},
	} {
		if got := untilPhase(time.Unix(0, int64(1000*iv+c.now)), iv, c.phase); got != c.want {
			t.Errorf("now %s phase %s: %s, want %s", c.now, c.phase, got, c.want)
		}
	}
}
