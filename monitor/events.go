package monitor

import (
	"time"

	"github.com/google/uuid"

	"github.com/vigil-sh/vigil/events"
	"github.com/vigil-sh/vigil/internal/ids"
	"github.com/vigil-sh/vigil/internal/status"
	"github.com/vigil-sh/vigil/store"
)

// eventFor is the notification event an action publishes when it happens
// (SPEC §6), "" for none: sandboxes paused or stopped with an audit row, and
// zombies destroyed on their agent. Errors, snapshot recovery, silent changes
// and re-sent destroys publish nothing.
func eventFor(a Action) string {
	if a.Audit == nil {
		return ""
	}
	switch {
	case a.Kind == DestroyOnAgent:
		return events.CapsuleDestroyed
	case a.Kind != Transition:
		return ""
	case a.To == status.Paused && a.Audit.Reason != "snapshot_recovered":
		return events.CapsulePaused
	case a.To == status.Stopped:
		return events.CapsuleDestroyed
	}
	return ""
}

// sandboxEvent is the outbox row of a sandbox action's event, nil for none.
func sandboxEvent(a Action, now time.Time) *store.Event {
	name := eventFor(a)
	if name == "" {
		return nil
	}
	return &store.Event{ID: uuid.New(), Name: name, Payload: events.Encode(name, a.TeamID, "sandbox", ids.Sandbox(a.Sandbox), now)}
}

// hostDownEvent is the outbox row of a host marked unreachable (it has a
// team: shared hosts publish nothing, as they write no audit row).
func hostDownEvent(h store.MarkedHost) store.Event {
	return store.Event{ID: uuid.New(), Name: events.HostDown,
		Payload: events.Encode(events.HostDown, h.TeamID.UUID, "host", ids.Host(h.ID), time.Now())}
}
