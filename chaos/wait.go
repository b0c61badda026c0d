package chaos

import (
	"context"
	"fmt"
	"time"
)

// pollEvery is how often poll re-evaluates a condition.
const pollEvery = 25 * time.Millisecond

// poll evaluates cond every pollEvery until it holds, and fails with what
// and cond's last detail after timeout or when ctx ends.
func poll(ctx context.Context, timeout time.Duration, what string, cond func() (bool, string)) error {
	_, err := pollAt(ctx, timeout, what, nil, cond)
	return err
}

// pollAt is poll that also wakes whenever wake (if not nil) returns a closed
// channel, and returns the time cond first held.
func pollAt(ctx context.Context, timeout time.Duration, what string, wake func() <-chan struct{}, cond func() (bool, string)) (time.Time, error) {
	deadline := time.NewTimer(timeout)
	defer deadline.Stop()
	tick := time.NewTicker(pollEvery)
	defer tick.Stop()
	for {
		var ch <-chan struct{}
		if wake != nil {
			ch = wake()
		}
		ok, detail := cond()
		if ok {
			return time.Now(), nil
		}
		select {
		case <-ctx.Done():
			return time.Time{}, fmt.Errorf("waiting for %s: %w (%s)", what, ctx.Err(), detail)
		case <-deadline.C:
			return time.Time{}, fmt.Errorf("timed out after %s waiting for %s: %s", timeout, what, detail)
		case <-ch:
		case <-tick.C:
		}
	}
}

// pause waits d or until ctx ends: the intended length of a fault, not a
// guess at how long something takes.
func hold(ctx context.Context, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-t.C:
		return nil
	}
}
