package cpconsumer

import (
	"strings"
	"testing"
)

func TestCheck(t *testing.T) {
	const team = `"team_id":"team-6dfzh5ik5uxynzmlf5cshamdk"`
	const res = `"actor":{"type":"system"},"resource":{"id":"cl-0000000000000000000000000","type":"sandbox"}`
	for _, c := range []struct {
		name, payload, err string // err: "" when delivered
	}{
		{"a system capsule event with its reason is delivered",
			`{"event":"capsule.destroy","outcome":"success","timestamp":"2026-12-01T08:30:15Z",` + team + `,` + res + `,"metadata":{"reason":"orphaned"}}`, ""},
		{"host.down without outcome or metadata is delivered",
			`{"event":"host.down","timestamp":"2026-12-01T08:30:15Z",` + team + `,"actor":{"type":"system"},"resource":{"id":"host-0000000000000000000000000","type":"host"}}`, ""},
		{"an event name nobody subscribes to reaches nobody",
			`{"event":"capsule.destroyed","timestamp":"2026-12-01T08:30:15Z",` + team + `,` + res + `}`, "no channel can subscribe"},
		{"a system capsule event without a reason is dropped",
			`{"event":"capsule.pause","outcome":"success","timestamp":"2026-12-01T08:30:15Z",` + team + `,` + res + `}`, "without metadata.reason"},
		{"an unknown key is refused",
			`{"event":"capsule.pause","outcome":"success","timestamp":"2026-12-01T08:30:15Z",` + team + `,` + res + `,"metadata":{"reason":"x"},"shard":3}`, "unknown field"},
		{"keys out of the encoder's order are not its bytes",
			`{"outcome":"success","event":"capsule.pause","timestamp":"2026-12-01T08:30:15Z",` + team + `,` + res + `,"metadata":{"reason":"x"}}`, "encodes this event as"},
		{"an empty error key is not what the encoder writes",
			`{"event":"capsule.pause","outcome":"success","timestamp":"2026-12-01T08:30:15Z",` + team + `,` + res + `,"metadata":{"reason":"x"},"error":""}`, "encodes this event as"},
		{"trailing data is refused",
			`{"event":"host.down","timestamp":"t",` + team + `,` + res + `} {}`, "trailing data"},
		{"a team id that is not one is dropped",
			`{"event":"host.down","timestamp":"t","team_id":"team-!",` + res + `}`, "team id"},
	} {
		t.Run(c.name, func(t *testing.T) {
			_, err := Check(c.payload)
			switch {
			case c.err == "" && err != nil:
				t.Fatalf("refused: %v", err)
			case c.err != "" && (err == nil || !strings.Contains(err.Error(), c.err)):
				t.Fatalf("error %v, want one saying %q", err, c.err)
			}
		})
	}
}
