// Package testwait is the one way tests wait for something real processes,
// servers or goroutines do: poll a condition until it holds, with a deadline
// that fails the test naming what was awaited. Time-driven logic of vigil's
// own is tested on synctest's clock instead; this is for what runs on the
// machine's.
package testwait

import (
	"testing"
	"time"
)

// Period is how often a condition is polled unless told otherwise.
const Period = 5 * time.Millisecond

// Until polls cond every period (Period when 0), and at once whenever the
// channel wake returns (when wake is not nil) is ready, until cond holds; it
// returns how long that took. After timeout the test fails with what and
// cond's last detail.
func Until(t testing.TB, timeout, period time.Duration, what string, cond func() (bool, string), wake func() <-chan struct{}) time.Duration {
	t.Helper()
	start := time.Now()
	if period == 0 {
		period = Period
	}
	tick := time.NewTicker(period)
	defer tick.Stop()
	for {
		var ch <-chan struct{}
		if wake != nil {
			ch = wake()
		}
		ok, detail := cond()
		if ok {
			return time.Since(start)
		}
		if time.Since(start) > timeout {
			if detail != "" {
				detail = ": " + detail
			}
			t.Fatalf("timed out after %v waiting for %s%s", timeout, what, detail)
		}
		select {
		case <-ch:
		case <-tick.C:
		}
	}
}

// For is Until for a condition without detail and without wake-ups.
func For(t testing.TB, timeout time.Duration, what string, cond func() bool) time.Duration {
	t.Helper()
	return Until(t, timeout, 0, what, func() (bool, string) { return cond(), "" }, nil)
}
