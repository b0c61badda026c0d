// Package status is the control plane's status vocabulary (SPEC §1.1): the
// sandbox statuses it writes and the host statuses vigil reads and writes.
// It is the one place these strings are spelled; the rules, the SQL
// parameters and the agent simulator all use it.
package status

// Sandbox statuses.
const (
	Pending      = "pending"
	Starting     = "starting"
	Running      = "running"
	Pausing      = "pausing"
	Paused       = "paused"
	Resuming     = "resuming"
	Snapshotting = "snapshotting"
	Stopping     = "stopping"
	Stopped      = "stopped"
	Error        = "error"
	Missing      = "missing"
)

// Host statuses. offline and draining exist in the control plane's API but
// are never written; vigil treats them like any status that is not online.
const (
	HostPending     = "pending"
	HostOnline      = "online"
	HostUnreachable = "unreachable"
)

// Sandboxes lists every sandbox status.
var Sandboxes = []string{Pending, Starting, Running, Pausing, Paused, Resuming, Snapshotting, Stopping, Stopped, Error, Missing}

// Known reports whether s is a sandbox status of the vocabulary.
func Known(s string) bool {
	switch s {
	case Pending, Starting, Running, Pausing, Paused, Resuming, Snapshotting, Stopping, Stopped, Error, Missing:
		return true
	}
	return false
}
