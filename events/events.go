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

// Event names (SPEC §6).
const (
	HostDown         = "host.down"
	CapsulePaused    = "capsule.paused"
	CapsuleDestroyed = "capsule.destroyed"
)

// Payload is the control plane's event, as its dispatcher reads it from the
// stream entry's "payload" field.
type Payload struct {
	Event     string   `json:"event"`
	Timestamp string   `json:"timestamp"` // RFC 3339, UTC, seconds
	TeamID    string   `json:"team_id"`   // "team-..."
	Actor     Actor    `json:"actor"`
	Resource  Resource `json:"resource"`
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

// Encode is the compact JSON payload of an event about resource (its
// prefixed id and type) of team, at t.
func Encode(event string, team uuid.UUID, resourceType, resourceID string, t time.Time) string {
	b, _ := json.Marshal(Payload{
		Event:     event,
		Timestamp: t.UTC().Truncate(time.Second).Format(time.RFC3339),
		TeamID:    ids.Team(team),
		Actor:     Actor{Type: "system"},
		Resource:  Resource{ID: resourceID, Type: resourceType},
	})
	return string(b)
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
// when that set happened. The script runs as one, so a batch is appended in
// order; should it fail part way, what it appended is a prefix, and the
// markers make publishing the whole batch again harmless. A failed XADD
// (e.g. out of memory) deletes the marker it just set before failing the
// script, so a marker never stands for an entry that is not there.
//
//	KEYS[1] the stream, KEYS[2..] one marker key per event
//	ARGV[1] marker TTL (s), ARGV[2] max length, then per event: payload, vigil_id
//
// It returns how many events it appended (the rest were duplicates).
var publishScript = redis.NewScript(`
local added = 0
for i = 2, #KEYS do
  if redis.call('SET', KEYS[i], '1', 'NX', 'EX', ARGV[1]) then
    local r = redis.pcall('XADD', KEYS[1], 'MAXLEN', '~', ARGV[2], '*', 'payload', ARGV[2*i-1], 'vigil_id', ARGV[2*i])
    if type(r) == 'table' and r.err then
      redis.call('DEL', KEYS[i])
      return r
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
	args := make([]any, 0, 2*len(evs)+2)
	keys = append(keys, p.cfg.Stream)
	args = append(args, int64(p.cfg.MarkerTTL/time.Second), p.cfg.MaxLen)
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
