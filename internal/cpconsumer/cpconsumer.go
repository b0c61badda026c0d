// Package cpconsumer reads vigil's events the way the control plane's own
// consumers read them (SPEC §6): its event type, decoded strictly; its
// encoder, which must give back the very bytes vigil published; and its
// channel dispatcher's two filters. Tests and the chaos checker hold every
// published payload against it: an event that passes here is one the
// control plane delivers.
package cpconsumer

import (
	"bytes"
	"encoding/json"
	"fmt"
	"strings"

	"github.com/vigil-sh/vigil/internal/ids"
)

// Event is the control plane's event type: its fields, keys, order and
// omitempty rules.
type Event struct {
	Event     string            `json:"event"`
	Outcome   string            `json:"outcome,omitempty"`
	Timestamp string            `json:"timestamp"`
	TeamID    string            `json:"team_id"`
	Actor     Actor             `json:"actor"`
	Resource  Resource          `json:"resource"`
	Metadata  map[string]string `json:"metadata,omitempty"`
	Error     string            `json:"error,omitempty"`
}

// Actor is the control plane's event actor.
type Actor struct {
	Type string `json:"type"`
	ID   string `json:"id,omitempty"`
	Name string `json:"name,omitempty"`
}

// Resource is the control plane's event resource.
type Resource struct {
	ID   string `json:"id"`
	Type string `json:"type"`
}

// Subscribable are the event names the control plane's channels can
// subscribe to among those a host monitor can cause: the dispatcher matches
// subscriptions on the name, so any other name reaches nobody.
var Subscribable = map[string]bool{
	"capsule.create":  true,
	"capsule.pause":   true,
	"capsule.resume":  true,
	"capsule.destroy": true,
	"host.up":         true,
	"host.down":       true,
}

// Decode reads payload as the control plane does, strictly: one JSON
// object, every key known, nothing after it; and re-encoded by the control
// plane's encoder it must give back the same bytes.
func Decode(payload string) (Event, error) {
	var e Event
	d := json.NewDecoder(strings.NewReader(payload))
	d.DisallowUnknownFields()
	if err := d.Decode(&e); err != nil {
		return e, fmt.Errorf("decode %s: %w", payload, err)
	}
	if d.More() {
		return e, fmt.Errorf("decode %s: trailing data", payload)
	}
	var buf bytes.Buffer
	enc := json.NewEncoder(&buf)
	enc.SetEscapeHTML(true)
	if err := enc.Encode(e); err != nil {
		return e, err
	}
	if got := strings.TrimSuffix(buf.String(), "\n"); got != payload {
		return e, fmt.Errorf("the control plane encodes this event as\n  %s\nnot\n  %s", got, payload)
	}
	return e, nil
}

// Delivered applies the dispatcher's filters to a decoded event: its name
// must be subscribable, its team id must parse, and a system capsule event
// needs a reason. The error says why the event would reach nobody.
func Delivered(e Event) error {
	if !Subscribable[e.Event] {
		return fmt.Errorf("event %q: no channel can subscribe to it", e.Event)
	}
	if !strings.HasPrefix(e.TeamID, ids.TeamPrefix) {
		return fmt.Errorf("event %q: team id %q", e.Event, e.TeamID)
	}
	if _, err := ids.ParseTeam(e.TeamID); err != nil {
		return fmt.Errorf("event %q: team id: %w", e.Event, err)
	}
	if e.Actor.Type == "system" && strings.HasPrefix(e.Event, "capsule.") && e.Metadata["reason"] == "" {
		return fmt.Errorf("event %q: a system capsule event without metadata.reason is dropped", e.Event)
	}
	return nil
}

// Check is Decode then Delivered.
func Check(payload string) (Event, error) {
	e, err := Decode(payload)
	if err != nil {
		return e, err
	}
	return e, Delivered(e)
}
