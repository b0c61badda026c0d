package monitor

import (
	"context"
	"time"

	"github.com/google/uuid"

	hostagentv1 "github.com/vigil-sh/vigil/proto/hostagent/v1"
	"github.com/vigil-sh/vigil/store"
)

// What the reconcile consumes, each declared here by what it needs:
// *store.Store is a PassStore, an Outbox and a HostSource; *agentpool.Pool
// is the Agents. Tests hand in small fakes.

// PassStore is what an owner's passes read and write: one read of a set of
// hosts with their rows and the database clock, the zombie candidates, the
// batched fenced apply, the passive rule, shadow mode's records, and the
// owner's fence raise and journal trim. Every write is fenced (store.Fence)
// and fails with ErrFenced once a newer owner holds the shard.
type PassStore interface {
	ReadHosts(ctx context.Context, hosts []uuid.UUID, staleAfter time.Duration, statuses []string) (store.Read, error)
	StoppedAmong(ctx context.Context, cands []store.Candidate, before time.Time) ([]store.Sandbox, error)
	Apply(ctx context.Context, f store.Fence, b store.Batch) (store.Result, error)
	Passive(ctx context.Context, f store.Fence, in store.PassiveInput) ([]store.MarkedHost, error)
	RecordShadow(ctx context.Context, f store.Fence, cs []store.ShadowChange) ([]store.ShadowChange, error)
	ShadowPassive(ctx context.Context, f store.Fence, in store.PassiveInput) ([]store.ShadowChange, error)
	RaiseFence(ctx context.Context, f store.Fence) error
	TrimJournal(ctx context.Context, f store.Fence, keep time.Duration) (int64, error)
}

// Outbox is the events' outbox as the relay reads and empties it: the
// shard's pending events in commit order, and the fenced delete of those
// Redis acknowledged.
type Outbox interface {
	PendingEvents(ctx context.Context, shard, limit int, count bool, legacy []string) ([]store.PendingEvent, int, error)
	DeleteEvents(ctx context.Context, f store.Fence, seqs []int64) error
}

// HostSource is where the Runner learns which hosts exist, which have a
// stale heartbeat, and which just came back online (ListenHostOnline calls
// fn for each until ctx ends or the connection fails, and then returns why).
type HostSource interface {
	HostIDs(ctx context.Context) ([]uuid.UUID, error)
	StaleHosts(ctx context.Context, staleAfter time.Duration) ([]uuid.UUID, error)
	ListenHostOnline(ctx context.Context, fn func(host uuid.UUID, err error)) error
}

// Agents is what the reconcile needs from host agents: each call names its
// agent (host id and address). DestroySandbox treats an agent's not_found
// as success.
type Agents interface {
	ListSandboxes(ctx context.Context, hostID uuid.UUID, address string) (*hostagentv1.ListSandboxesResponse, error)
	DestroySandbox(ctx context.Context, hostID uuid.UUID, address, sandboxID, fence string) error
}
