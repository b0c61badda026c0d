// Package events is vigil's side of the control plane's notification
// channel (SPEC §6): the event payload the control plane's dispatcher reads,
// and a publisher that appends events to its Redis stream at most once per
// event id, so a relay that retries after a crash between the append and the
// outbox delete cannot publish twice.
//
// The exactly-once guarantee is built from two halves (docs/events.md): the
// outbox row exists exactly when its change committed (store, monitor), and
// this package's script makes a repeated publish of the same id a no-op for
// MarkerTTL.
package events

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"time"

	"github.com/google/uuid"
	"github.com/redis/go-redis/v9"

	"github.com/vigil-sh/vigil/internal/ids"
)

// Event names (SPEC §6), spelled as the control plane's audit logger
// publishes them: its channel dispatcher matches subscriptions on them.
const (
	HostDown       = "host.down"
	CapsulePause   = "capsule.pause"
	CapsuleDestroy = "capsule.destroy"
	CapsuleCreate  = "capsule.create"
	CapsuleResume  = "capsule.resume"
)

// Outcomes of capsule events.
const (
	OutcomeSuccess = "success"
	OutcomeError   = "error"
)

// Payload is the control plane's event, as its dispatcher reads it from the
// stream entry's "payload" field and its dashboard from the mirror channel.
// The field order is the JSON key order; empty Outcome, Metadata and Error
// are left out, as the control plane's encoder leaves them out.
type Payload struct {
	Event     string    `json:"event"`
	Outcome   string    `json:"outcome,omitempty"`
	Timestamp string    `json:"timestamp"` // RFC 3339, UTC, whole seconds
	TeamID    string    `json:"team_id"`   // "team-..."
	Actor     Actor     `json:"actor"`
	Resource  Resource  `json:"resource"`
	Metadata  *Metadata `json:"metadata,omitempty"`
	Error     string    `json:"error,omitempty"`
}

// Actor is who caused the event: vigil is the system.
type Actor struct {
	Type string `json:"type"`
}

// Resource is what the event is about.
type Resource struct {
	ID   string `json:"id"`   // "host-..." or "cl-..."
	Type string `json:"type"` // host or sandbox
}

// Metadata is the event's metadata: the reason of a system change. The
// dispatcher drops a system capsule event without one.
type Metadata struct {
	Reason string `json:"reason"`
}

// Timestamp is t as an event's timestamp: RFC 3339, UTC, whole seconds.
func Timestamp(t time.Time) string { return t.UTC().Truncate(time.Second).Format(time.RFC3339) }

// Encode is p as the compact JSON the stream entry and the mirror carry.
func (p Payload) Encode() string {
	b, err := json.Marshal(p)
	if err != nil { // only strings inside: cannot happen
		panic(fmt.Sprintf("events: encode %+v: %v", p, err))
	}
	return string(b)
}

// System is the payload of a system change to resource (its type and
// prefixed id) of team at t, with the event name, outcome, reason and error
// text the change publishes ("" for none).
func System(event, outcome string, team uuid.UUID, resourceType, resourceID, reason, errText string, t time.Time) Payload {
	p := Payload{
		Event:     event,
		Outcome:   outcome,
		Timestamp: Timestamp(t),
		TeamID:    ids.Team(team),
		Actor:     Actor{Type: "system"},
		Resource:  Resource{ID: resourceID, Type: resourceType},
		Error:     errText,
	}
	if reason != "" {
		p.Metadata = &Metadata{Reason: reason}
	}
	return p
}

// Event is one outbox row to publish.
type Event struct {
	ID      uuid.UUID // vigil_id: unique, the deduplication key
	Name    string
	Payload string
}

// Config configures a Publisher.
type Config struct {
	// URL is redis:// or rediss:// (TLS), with user and password for
	// AUTH/ACL and a database number, as go-redis parses it.
	URL string
	// Stream is the stream key, default "wrenn:events".
	Stream string
	// Mirror is the Pub/Sub channel that carries the same payload when,
	// and only when, its entry is appended to Stream: the dashboard's live
	// feed. Empty: no mirror. The control plane's is DefaultMirror.
	Mirror string
	// MarkerTTL is how long a published id is remembered: a publish of the
	// same id within it is a no-op. Default 24h; it must exceed the
	// longest time an event can wait between its publish and the delete
	// of its outbox row (a crash and the failover after it).
	MarkerTTL time.Duration
	// MaxLen trims the stream approximately (MAXLEN ~), default 10000,
	// like the control plane's own publisher.
	MaxLen int64
	// Timeout bounds dialling, each read and each write, default 2s.
	Timeout time.Duration
}

// Defaults of Config's zero fields.
const (
	DefaultStream    = "wrenn:events"
	DefaultMirror    = "wrenn:sse"
	DefaultMarkerTTL = 24 * time.Hour
	DefaultMaxLen    = 10000
	DefaultTimeout   = 2 * time.Second
)

func (c *Config) validate() error {
	if c.URL == "" {
		return errors.New("events: no Redis URL")
	}
	if c.Stream == "" {
		c.Stream = DefaultStream
	}
	if c.MarkerTTL == 0 {
		c.MarkerTTL = DefaultMarkerTTL
	}
	if c.MaxLen == 0 {
		c.MaxLen = DefaultMaxLen
	}
	if c.Timeout == 0 {
		c.Timeout = DefaultTimeout
	}
	switch {
	case c.MarkerTTL < time.Second:
		return fmt.Errorf("events: marker TTL %s must be at least 1s", c.MarkerTTL)
	case c.MaxLen < 1:
		return fmt.Errorf("events: stream max length %d must be positive", c.MaxLen)
	case c.Timeout < time.Millisecond:
		return fmt.Errorf("events: timeout %s too short", c.Timeout)
	}
	return nil
}

// publishScript appends a batch of events in order, each only if its id is
// new: its marker key is set with NX and an expiry, and its XADD runs only
// when that set happened; after its XADD succeeded, the same payload is
// PUBLISHed on the mirror channel (when there is one), so the mirror carries
// an event exactly when the stream got it. The script runs as one, so a batch
// is appended in order; should it fail part way, what it appended is a
// prefix, and the markers make publishing the whole batch again harmless. A
// failed XADD (e.g. out of memory) deletes the marker it just set before
// failing the script, so a marker never stands for an entry that is not
// there.
//
//	KEYS[1] the stream, KEYS[2..] one marker key per event
//	ARGV[1] marker TTL (s), ARGV[2] max length, ARGV[3] mirror channel ('' for
//	none), then per event: payload, vigil_id
//
// It returns how many events it appended (the rest were duplicates).
var publishScript = redis.NewScript(`
local added = 0
for i = 2, #KEYS do
  if redis.call('SET', KEYS[i], '1', 'NX', 'EX', ARGV[1]) then
    local payload = ARGV[2*i]
    local r = redis.pcall('XADD', KEYS[1], 'MAXLEN', '~', ARGV[2], '*', 'payload', payload, 'vigil_id', ARGV[2*i+1])
    if type(r) == 'table' and r.err then
      redis.call('DEL', KEYS[i])
      return r
    end
    if ARGV[3] ~= '' then
      redis.call('PUBLISH', ARGV[3], payload)
    end
    added = added + 1
  end
end
return added
`)

// Publisher appends events to the stream. It is safe for concurrent use.
type Publisher struct {
	cfg Config
	rdb *redis.Client
}

// New parses cfg.URL and builds a Publisher; it does not connect.
func New(cfg Config) (*Publisher, error) {
	if err := cfg.validate(); err != nil {
		return nil, err
	}
	opt, err := redis.ParseURL(cfg.URL)
	if err != nil {
		return nil, fmt.Errorf("events: Redis URL: %w", err)
	}
	opt.DialTimeout, opt.ReadTimeout, opt.WriteTimeout = cfg.Timeout, cfg.Timeout, cfg.Timeout
	opt.MaxRetries = 0 // the relay retries, with its own backoff
	return &Publisher{cfg: cfg, rdb: redis.NewClient(opt)}, nil
}

// Stream is the stream key events go to.
func (p *Publisher) Stream() string { return p.cfg.Stream }

// Mirror is the Pub/Sub channel that mirrors the stream, "" for none.
func (p *Publisher) Mirror() string { return p.cfg.Mirror }

// markerKey is the deduplication key of an event id, in the stream's
// namespace.
func (p *Publisher) markerKey(id uuid.UUID) string { return p.cfg.Stream + ":vigil_id:" + id.String() }

// Publish appends evs to the stream in order, each at most once per
// MarkerTTL by its ID, in one script call. It returns how many of them were
// new (the others had been published before). On error none may be assumed
// published: publish the same batch again later.
func (p *Publisher) Publish(ctx context.Context, evs []Event) (added int, err error) {
	if len(evs) == 0 {
		return 0, nil
	}
	keys := make([]string, 0, len(evs)+1)
	args := make([]any, 0, 2*len(evs)+3)
	keys = append(keys, p.cfg.Stream)
	args = append(args, int64(p.cfg.MarkerTTL/time.Second), p.cfg.MaxLen, p.cfg.Mirror)
	for _, e := range evs {
		keys = append(keys, p.markerKey(e.ID))
		args = append(args, e.Payload, e.ID.String())
	}
	n, err := publishScript.Run(ctx, p.rdb, keys, args...).Int()
	if err != nil {
		return 0, fmt.Errorf("events: publish %d events to %s: %w", len(evs), p.cfg.Stream, err)
	}
	return n, nil
}

// Ping checks that Redis answers.
func (p *Publisher) Ping(ctx context.Context) error { return p.rdb.Ping(ctx).Err() }

// Close closes the connections.
func (p *Publisher) Close() error { return p.rdb.Close() }

// Earlier vigil versions published capsule.paused and capsule.destroyed,
// without outcome or metadata: names no channel subscribes to. Events still
// pending in the outbox from such a version are published in this shape
// (Upgrade). host.down kept its shape.
const (
	legacyPaused    = "capsule.paused"
	legacyDestroyed = "capsule.destroyed"
)

// LegacyNames are the earlier versions' event names that Upgrade rewrites.
var LegacyNames = []string{legacyPaused, legacyDestroyed}

// Legacy reports whether name is an earlier version's event name.
func Legacy(name string) bool { return name == legacyPaused || name == legacyDestroyed }

// Upgrade rewrites an earlier version's payload in this shape: the event's
// name becomes the control plane's (capsule.pause, capsule.destroy) with
// outcome success and the change's reason, its timestamp, team and resource
// kept. An empty reason (it could not be found) leaves the metadata out.
func Upgrade(payload, reason string) (Payload, error) {
	var p Payload
	if err := json.Unmarshal([]byte(payload), &p); err != nil {
		return p, fmt.Errorf("events: upgrade %q: %w", payload, err)
	}
	switch p.Event {
	case legacyPaused:
		p.Event = CapsulePause
	case legacyDestroyed:
		p.Event = CapsuleDestroy
	default:
		return p, fmt.Errorf("events: upgrade: %q is not an earlier version's event", p.Event)
	}
	p.Outcome, p.Metadata, p.Error = OutcomeSuccess, nil, ""
	if reason != "" {
		p.Metadata = &Metadata{Reason: reason}
	}
	return p, nil
}
