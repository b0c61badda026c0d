package events

import (
	"context"
	"encoding/json"
	"slices"
	"testing"
	"time"

	"github.com/google/uuid"
	"github.com/redis/go-redis/v9"

	"github.com/vigil-sh/vigil/internal/redistest"
	"github.com/vigil-sh/vigil/internal/testwait"
)

// redisURL is the tests' Redis (VIGIL_TEST_REDIS_ADDR).
var redisURL = redistest.URL()

// newPublisher publishes to a stream of the test's own, deleted at the end.
func newPublisher(t *testing.T, ttl time.Duration) (*Publisher, *redis.Client) {
	t.Helper()
	stream := "vigil-test:" + t.Name() + ":" + uuid.NewString()[:8]
	p, err := New(Config{URL: redisURL, Stream: stream, MarkerTTL: ttl})
	if err != nil {
		t.Fatal(err)
	}
	opt, _ := redis.ParseURL(redisURL)
	rdb := redis.NewClient(opt)
	if err := rdb.Ping(context.Background()).Err(); err != nil {
		t.Fatalf("Redis at %s: %v", redisURL, err)
	}
	t.Cleanup(func() {
		ctx := context.Background()
		keys, _ := rdb.Keys(ctx, stream+"*").Result()
		if len(keys) > 0 {
			rdb.Del(ctx, keys...)
		}
		rdb.Close()
		p.Close()
	})
	return p, rdb
}

func entries(t *testing.T, rdb *redis.Client, stream string) []redis.XMessage {
	t.Helper()
	msgs, err := rdb.XRange(context.Background(), stream, "-", "+").Result()
	if err != nil {
		t.Fatal(err)
	}
	return msgs
}

func TestPayloadShape(t *testing.T) {
	team := uuid.MustParse("6ba7b810-9dad-11d1-80b4-00c04fd430c8")
	at := time.Date(2026, 12, 1, 9, 30, 15, 999, time.FixedZone("x", 3600))
	for _, c := range []struct {
		name string
		p    Payload
		want string
	}{
		{"host.down has no outcome, metadata or error",
			System(HostDown, "", team, "host", "host-f5lxx1zz5pnorynqglhzmsp33", "", "", at),
			`{"event":"host.down","timestamp":"2026-12-01T08:30:15Z","team_id":"team-6dfzh5ik5uxynzmlf5cshamdk","actor":{"type":"system"},"resource":{"id":"host-f5lxx1zz5pnorynqglhzmsp33","type":"host"}}`},
		{"a success carries outcome and reason, no error",
			System(CapsulePause, OutcomeSuccess, team, "sandbox", "cl-0000000000000000000000000", "host_state_sync", "", at),
			`{"event":"capsule.pause","outcome":"success","timestamp":"2026-12-01T08:30:15Z","team_id":"team-6dfzh5ik5uxynzmlf5cshamdk","actor":{"type":"system"},"resource":{"id":"cl-0000000000000000000000000","type":"sandbox"},"metadata":{"reason":"host_state_sync"}}`},
		{"an error carries outcome, reason and error last",
			System(CapsuleCreate, OutcomeError, team, "sandbox", "cl-0000000000000000000000000", "transient_timeout", "transient state did not settle within grace period", at),
			`{"event":"capsule.create","outcome":"error","timestamp":"2026-12-01T08:30:15Z","team_id":"team-6dfzh5ik5uxynzmlf5cshamdk","actor":{"type":"system"},"resource":{"id":"cl-0000000000000000000000000","type":"sandbox"},"metadata":{"reason":"transient_timeout"},"error":"transient state did not settle within grace period"}`},
	} {
		if got := c.p.Encode(); got != c.want {
			t.Errorf("%s:\n%s\nwant\n%s", c.name, got, c.want)
		}
	}
}

// A batch goes to the stream in order, payload and vigil_id fields; the same
// ids published again append nothing.
func TestPublishAppendsOnceInOrder(t *testing.T) {
	ctx := context.Background()
	p, rdb := newPublisher(t, time.Hour)
	var evs []Event
	for i := range 5 {
		evs = append(evs, Event{ID: uuid.New(), Name: CapsulePause, Payload: `{"n":` + string(rune('0'+i)) + `}`})
	}
	if n, err := p.Publish(ctx, evs[:3]); err != nil || n != 3 {
		t.Fatalf("first publish: %d, %v", n, err)
	}
	// A relay that died before deleting its outbox rows publishes them
	// again, with the rest.
	if n, err := p.Publish(ctx, evs); err != nil || n != 2 {
		t.Fatalf("second publish: %d new, %v; want 2", n, err)
	}
	msgs := entries(t, rdb, p.Stream())
	if len(msgs) != 5 {
		t.Fatalf("%d entries, want 5", len(msgs))
	}
	for i, m := range msgs {
		if m.Values["vigil_id"] != evs[i].ID.String() || m.Values["payload"] != evs[i].Payload {
			t.Errorf("entry %d = %v, want %s %s", i, m.Values, evs[i].ID, evs[i].Payload)
		}
		var v map[string]any
		if err := json.Unmarshal([]byte(m.Values["payload"].(string)), &v); err != nil {
			t.Errorf("entry %d payload is not JSON: %v", i, err)
		}
	}
}

// The marker TTL bounds how long a duplicate is caught: within it a
// republish is a no-op, after it the event is appended again.
func TestMarkerTTLBoundsDeduplication(t *testing.T) {
	ctx := context.Background()
	p, rdb := newPublisher(t, time.Second)
	e := Event{ID: uuid.New(), Name: HostDown, Payload: "{}"}
	if n, _ := p.Publish(ctx, []Event{e}); n != 1 {
		t.Fatal("not published")
	}
	if n, _ := p.Publish(ctx, []Event{e}); n != 0 {
		t.Fatal("republished within the marker TTL")
	}
	testwait.For(t, 10*time.Second, "the marker to expire", func() bool { return rdb.Exists(ctx, p.markerKey(e.ID)).Val() == 0 })
	if n, _ := p.Publish(ctx, []Event{e}); n != 1 {
		t.Fatal("after the marker expired the event was not appended again")
	}
	if got := len(entries(t, rdb, p.Stream())); got != 2 {
		t.Fatalf("%d entries, want 2 (the duplicate the TTL no longer catches)", got)
	}
}

func TestRedisDownIsAnError(t *testing.T) {
	p, err := New(Config{URL: "redis://127.0.0.1:1/0", Timeout: 200 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	if n, err := p.Publish(context.Background(), []Event{{ID: uuid.New(), Payload: "{}"}}); err == nil || n != 0 {
		t.Fatalf("publish to nothing: %d, %v", n, err)
	}
}

func TestConfig(t *testing.T) {
	for _, c := range []Config{{}, {URL: "redis://x", MarkerTTL: time.Millisecond}, {URL: "redis://x", MaxLen: -1}, {URL: "http://x"}} {
		if _, err := New(c); err == nil {
			t.Errorf("%+v accepted", c)
		}
	}
	if _, err := New(Config{URL: "rediss://user:pw@redis.example:6380/2"}); err != nil {
		t.Errorf("rediss with ACL user: %v", err)
	}
}

// A failed append leaves no marker behind: the retry appends the event.
func TestFailedAppendLeavesNoMarker(t *testing.T) {
	ctx := context.Background()
	p, rdb := newPublisher(t, time.Hour)
	if err := rdb.Set(ctx, p.Stream(), "not a stream", 0).Err(); err != nil {
		t.Fatal(err)
	}
	e := Event{ID: uuid.New(), Name: HostDown, Payload: "{}"}
	if n, err := p.Publish(ctx, []Event{e}); err == nil || n != 0 {
		t.Fatalf("publish onto a string key: %d, %v", n, err)
	}
	if rdb.Exists(ctx, p.markerKey(e.ID)).Val() != 0 {
		t.Fatal("the failed append left its marker")
	}
	rdb.Del(ctx, p.Stream())
	if n, err := p.Publish(ctx, []Event{e}); err != nil || n != 1 {
		t.Fatalf("retry: %d, %v", n, err)
	}
	if got := len(entries(t, rdb, p.Stream())); got != 1 {
		t.Fatalf("%d entries, want 1", got)
	}
}

// The mirror carries a payload exactly when its entry was appended: not for
// a duplicate, not for a failed append; without a channel nothing is
// published.
func TestMirrorOnlyWhenAppended(t *testing.T) {
	ctx := context.Background()
	p, rdb := newPublisher(t, time.Hour)
	p.cfg.Mirror = p.cfg.Stream + ":sse"
	sub := rdb.Subscribe(ctx, p.Mirror())
	defer sub.Close()
	if _, err := sub.Receive(ctx); err != nil {
		t.Fatal(err)
	}
	a := Event{ID: uuid.New(), Name: HostDown, Payload: `{"a":1}`}
	b := Event{ID: uuid.New(), Name: HostDown, Payload: `{"b":2}`}
	if n, err := p.Publish(ctx, []Event{a}); err != nil || n != 1 {
		t.Fatalf("publish a: %d, %v", n, err)
	}
	if n, err := p.Publish(ctx, []Event{a, b}); err != nil || n != 1 {
		t.Fatalf("publish a again with b: %d, %v", n, err)
	}
	// A failed append mirrors nothing.
	stream := p.cfg.Stream
	p.cfg.Stream = stream + ":broken"
	if err := rdb.Set(ctx, p.cfg.Stream, "not a stream", 0).Err(); err != nil {
		t.Fatal(err)
	}
	if _, err := p.Publish(ctx, []Event{{ID: uuid.New(), Payload: `{"c":3}`}}); err == nil {
		t.Fatal("publish onto a string key succeeded")
	}
	p.cfg.Stream = stream
	// Without a mirror channel: appended, not mirrored.
	p.cfg.Mirror = ""
	if n, err := p.Publish(ctx, []Event{{ID: uuid.New(), Payload: `{"d":4}`}}); err != nil || n != 1 {
		t.Fatalf("publish d: %d, %v", n, err)
	}
	// Everything published before this marker arrives before it.
	if err := rdb.Publish(ctx, stream+":sse", "end").Err(); err != nil {
		t.Fatal(err)
	}
	var got []string
	for {
		m, err := sub.ReceiveMessage(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if m.Payload == "end" {
			break
		}
		got = append(got, m.Payload)
	}
	if want := []string{`{"a":1}`, `{"b":2}`}; !slices.Equal(got, want) {
		t.Fatalf("mirror carried %q, want %q", got, want)
	}
	if n := len(entries(t, rdb, stream)); n != 3 {
		t.Fatalf("stream holds %d entries, want 3", n)
	}
}
