package monitor

import (
	"fmt"
	"time"

	"github.com/google/uuid"

	"github.com/vigil-sh/vigil/events"
	"github.com/vigil-sh/vigil/internal/ids"
	"github.com/vigil-sh/vigil/store"
)

// TransientTimeoutError is the error text of the transient_timeout changes to
// error: their audit rows' metadata.error and their events' error, as the
// control plane's own monitor writes both.
const TransientTimeoutError = "transient state did not settle within grace period"

// notification is the event a change publishes when it happens (SPEC §6),
// made from the audit row the change writes, so that the two cannot
// disagree; ok is false for a change that publishes nothing (snapshot rows,
// silent changes). team and resourceID are the audit row's.
//
//	host  marked_down                 host.down, no outcome, metadata or error
//	pause (any reason)                capsule.pause   success  {reason}
//	destroy (any reason)              capsule.destroy success  {reason}
//	error, phase create               capsule.create  error    {reason}  error text
//	error, phase resume               capsule.resume  error    {reason}  error text
//	snapshot                          none
func notification(resourceType, resourceID string, team uuid.UUID, au Audit, at time.Time) (p events.Payload, ok bool) {
	var name, outcome string
	switch {
	case resourceType == "host" && au.Action == "marked_down":
		return events.System(events.HostDown, "", team, resourceType, resourceID, "", "", at), true
	case resourceType != "sandbox":
		return p, false
	case au.Action == "pause":
		name, outcome = events.CapsulePause, events.OutcomeSuccess
	case au.Action == "destroy":
		name, outcome = events.CapsuleDestroy, events.OutcomeSuccess
	case au.Action == "error" && au.Phase == "create":
		name, outcome = events.CapsuleCreate, events.OutcomeError
	case au.Action == "error" && au.Phase == "resume":
		name, outcome = events.CapsuleResume, events.OutcomeError
	default:
		return p, false
	}
	errText := ""
	if outcome == events.OutcomeError {
		errText = au.Error
	}
	return events.System(name, outcome, team, resourceType, resourceID, au.Reason, errText, at), true
}

// auditRow is the audit_logs row of au about resource (its type and prefixed
// id) of team, with its outbox event when events are on.
func auditRow(resourceType, resourceID string, team uuid.UUID, au Audit, withEvent bool, at time.Time) *store.AuditRow {
	meta := map[string]any{"reason": au.Reason}
	if au.Phase != "" {
		meta["phase"] = au.Phase
	}
	if au.Status == "error" && au.Error != "" {
		meta["error"] = au.Error
	}
	row := &store.AuditRow{TeamID: team, ResourceType: resourceType, ResourceID: resourceID,
		Action: au.Action, Status: au.Status, Metadata: meta}
	if !withEvent {
		return row
	}
	if p, ok := notification(resourceType, resourceID, team, au, at); ok {
		row.Event = &events.Event{ID: uuid.New(), Name: p.Event, Payload: p.Encode()}
	}
	return row
}

// sandboxAudit is the audit row of a sandbox action (with its event when
// withEvent), nil for a silent one.
func sandboxAudit(a Action, withEvent bool, at time.Time) *store.AuditRow {
	if a.Audit == nil {
		return nil
	}
	return auditRow("sandbox", ids.Sandbox(a.Sandbox), a.TeamID, *a.Audit, withEvent, at)
}

// hostDownAudit is the audit row of a host marked unreachable.
func hostDownAudit(unreachableAfter time.Duration) Audit {
	return Audit{Action: "marked_down", Status: "error", Reason: "heartbeat_timeout",
		Error: fmt.Sprintf("no heartbeat for more than %s", unreachableAfter)}
}

// hostDownEvent is the outbox row of a host marked unreachable (it has a
// team: shared hosts publish nothing, as they write no audit row).
func hostDownEvent(au Audit) func(store.MarkedHost) events.Event {
	return func(h store.MarkedHost) events.Event {
		p, _ := notification("host", ids.Host(h.ID), h.TeamID.UUID, au, time.Now())
		return events.Event{ID: uuid.New(), Name: p.Event, Payload: p.Encode()}
	}
}
