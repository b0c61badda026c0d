//go:build vigil_testhooks

package monitor

import (
	"os"
	"syscall"
)

// Test builds only (-tags vigil_testhooks): with
// VIGIL_TEST_CRASH_AFTER_PUBLISH set, the process kills itself right after
// Redis acknowledged a batch of events and before their outbox rows are
// deleted — the one window where a crash leaves published events pending.
func init() {
	if os.Getenv("VIGIL_TEST_CRASH_AFTER_PUBLISH") != "" {
		afterPublish = func() { _ = syscall.Kill(os.Getpid(), syscall.SIGKILL) }
	}
}
