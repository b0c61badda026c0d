//go:build vigil_testhooks

package monitor

import (
	"fmt"
	"os"
	"syscall"

	"github.com/vigil-sh/vigil/events"
)

// Test builds only (-tags vigil_testhooks): with
// VIGIL_TEST_CRASH_AFTER_PUBLISH set, the process kills itself right after
// Redis acknowledged a batch of events and before their outbox rows are
// deleted — the one window where a crash leaves published events pending.
// It first prints the batch's ids on one line, "crashed after publishing:
// ID ...", so that a test knows them even after a successor (which may take
// over within milliseconds) has relayed and deleted them.
func init() {
	if os.Getenv("VIGIL_TEST_CRASH_AFTER_PUBLISH") != "" {
		afterPublish = func(evs []events.Event) {
			line := "crashed after publishing:"
			for _, e := range evs {
				line += " " + e.ID.String()
			}
			fmt.Fprintln(os.Stderr, line)
			_ = syscall.Kill(os.Getpid(), syscall.SIGKILL)
		}
	}
}
