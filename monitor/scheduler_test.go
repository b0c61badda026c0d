package monitor_test

// The shard scheduler without Postgres, agents or Redis: fakes of the
// interfaces monitor declares, in a synctest bubble, so every pass's start
// is checked on a clock the test controls.

import (
	"context"
	"errors"
	"slices"
	"sync"
	"testing"
	"testing/synctest"
	"time"

	"github.com/google/uuid"

	"github.com/vigil-sh/vigil/events"
	"github.com/vigil-sh/vigil/internal/status"
	"github.com/vigil-sh/vigil/monitor"
	hostagentv1 "github.com/vigil-sh/vigil/proto/hostagent/v1"
	"github.com/vigil-sh/vigil/shard"
	"github.com/vigil-sh/vigil/store"
)

// fakeStore is a PassStore, Outbox and HostSource over a fixed set of
// online hosts with no rows. It records when each kind of call came.
type fakeStore struct {
	hosts      []uuid.UUID
	reconnects chan uuid.UUID // ListenHostOnline delivers these

	mu      sync.Mutex
	reads   []read // ReadHosts calls
	trims   []time.Time
	pending int // outbox rows PendingEvents reports
}

type read struct {
	at    time.Time
	hosts int
}

func (f *fakeStore) ReadHosts(_ context.Context, hosts []uuid.UUID, _ time.Duration, _ []string) (store.Read, error) {
	f.mu.Lock()
	f.reads = append(f.reads, read{time.Now(), len(hosts)})
	f.mu.Unlock()
	rd := store.Read{Now: time.Now()}
	for _, h := range hosts {
		rd.Hosts = append(rd.Hosts, store.HostState{ID: h, Address: "10.0.0.1:1", Status: status.HostOnline})
	}
	return rd, nil
}
func (f *fakeStore) StoppedAmong(context.Context, []store.Candidate, time.Time) ([]store.Sandbox, error) {
	return nil, nil
}
func (f *fakeStore) Apply(_ context.Context, _ store.Fence, b store.Batch) (store.Result, error) {
	return store.Result{Applied: make([]bool, len(b.Changes)), Zombies: make([]bool, len(b.Zombies)), Resends: make([]bool, len(b.Resends))}, nil
}
func (f *fakeStore) Passive(context.Context, store.Fence, store.PassiveInput) ([]store.MarkedHost, error) {
	return nil, nil
}
func (f *fakeStore) RecordShadow(context.Context, store.Fence, []store.ShadowChange) ([]store.ShadowChange, error) {
	return nil, nil
}
func (f *fakeStore) ShadowPassive(context.Context, store.Fence, store.PassiveInput) ([]store.ShadowChange, error) {
	return nil, nil
}
func (f *fakeStore) RaiseFence(context.Context, store.Fence) error { return nil }
func (f *fakeStore) TrimJournal(context.Context, store.Fence, time.Duration) (int64, error) {
	f.mu.Lock()
	f.trims = append(f.trims, time.Now())
	f.mu.Unlock()
	return 0, nil
}
func (f *fakeStore) PendingEvents(_ context.Context, _, _ int, _ bool, _ []string) ([]store.PendingEvent, int, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.pending == 0 {
		return nil, 0, nil
	}
	return []store.PendingEvent{{Seq: 1, Event: events.Event{ID: uuid.New(), Name: events.HostDown}, CreatedAt: time.Now()}}, f.pending, nil
}
func (f *fakeStore) DeleteEvents(context.Context, store.Fence, []int64) error { return nil }
func (f *fakeStore) HostIDs(context.Context) ([]uuid.UUID, error)             { return f.hosts, nil }
func (f *fakeStore) StaleHosts(context.Context, time.Duration) ([]uuid.UUID, error) {
	return nil, nil
}
func (f *fakeStore) ListenHostOnline(ctx context.Context, fn func(uuid.UUID, error)) error {
	for {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case h := <-f.reconnects:
			fn(h, nil)
		}
	}
}

func (f *fakeStore) readTimes(hosts int) []time.Duration {
	f.mu.Lock()
	defer f.mu.Unlock()
	var out []time.Duration
	for _, r := range f.reads {
		if r.hosts == hosts {
			out = append(out, r.at.Sub(epoch))
		}
	}
	return out
}

// epoch is where a synctest bubble's clock starts: a multiple of every
// interval used here, so shard phases fall where the test expects them.
var epoch = time.Date(2000, 1, 1, 0, 0, 0, 0, time.UTC)

// fakeAgents answer every ListSandboxes at once with nothing.
type fakeAgents struct{}

func (fakeAgents) ListSandboxes(context.Context, uuid.UUID, string) (*hostagentv1.ListSandboxesResponse, error) {
	return &hostagentv1.ListSandboxesResponse{}, nil
}
func (fakeAgents) DestroySandbox(context.Context, uuid.UUID, string, string, string) error {
	return nil
}

// failingPublisher refuses every publish and records when it was asked.
type failingPublisher struct {
	mu    sync.Mutex
	tries []time.Time
}

func (p *failingPublisher) Publish(context.Context, []events.Event) (int, error) {
	p.mu.Lock()
	p.tries = append(p.tries, time.Now())
	p.mu.Unlock()
	return 0, errors.New("redis down")
}

// ownShard runs a Runner owning shard s of shards until stop is called.
func ownShard(t *testing.T, st *fakeStore, cfg monitor.Config, rcfg monitor.RunnerConfig, s int) (stop func()) {
	t.Helper()
	rec, err := monitor.New(cfg, st, fakeAgents{})
	if err != nil {
		t.Fatal(err)
	}
	r, err := monitor.NewRunner(rcfg, rec, st)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	wg.Go(func() { r.Run(ctx) })
	wg.Go(func() {
		if err := r.Own(ctx, s, 1); err != nil {
			t.Errorf("Own: %v", err)
		}
	})
	return func() { cancel(); wg.Wait() }
}

// hostsOf returns n hosts of shard s.
func hostsOf(s, shards, n int) []uuid.UUID {
	var out []uuid.UUID
	for len(out) < n {
		if h := uuid.New(); shard.Of(h, shards) == s {
			out = append(out, h)
		}
	}
	return out
}

// A new owner's first full pass runs at once (its hosts went unwatched
// through the handover); later ones at the shard's phase of the interval,
// counted from the Unix epoch: shard 1 of 4 at a quarter past.
func TestFullPassesAtTheShardsPhase(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		st := &fakeStore{hosts: hostsOf(1, 4, 3), reconnects: make(chan uuid.UUID)}
		stop := ownShard(t, st, monitor.Config{}, monitor.RunnerConfig{Replica: "a", Shards: 4, Interval: 40 * time.Second}, 1)
		time.Sleep(95 * time.Second)
		stop()
		got := st.readTimes(3)
		want := []time.Duration{0, 10 * time.Second, 50 * time.Second, 90 * time.Second}
		if !slices.Equal(got, want) {
			t.Fatalf("full passes at %v, want %v", got, want)
		}
	})
}

// A host coming back online is reconciled at once, beside the full passes.
func TestReconnectPassAtOnce(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		st := &fakeStore{hosts: hostsOf(0, 1, 2), reconnects: make(chan uuid.UUID)}
		stop := ownShard(t, st, monitor.Config{}, monitor.RunnerConfig{Replica: "a", Shards: 1, Interval: time.Hour}, 0)
		time.Sleep(12 * time.Second)
		st.reconnects <- st.hosts[1]
		synctest.Wait()
		stop()
		if got := st.readTimes(1); !slices.Equal(got, []time.Duration{12 * time.Second}) {
			t.Fatalf("reconnect passes at %v, want one at 12s", got)
		}
	})
}

// While Redis fails, the relay retries after a delay that doubles from
// 100ms up to 10s; the journal is trimmed hourly.
func TestRelayBacksOffAndJournalTrimsHourly(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		st := &fakeStore{hosts: hostsOf(0, 1, 1), reconnects: make(chan uuid.UUID), pending: 1}
		pub := &failingPublisher{}
		stop := ownShard(t, st, monitor.Config{Publisher: pub, Outbox: st},
			monitor.RunnerConfig{Replica: "a", Shards: 1, Interval: time.Hour, JournalRetention: 24 * time.Hour}, 0)
		time.Sleep(time.Hour + time.Second)
		stop()
		pub.mu.Lock()
		var gaps []time.Duration
		for i := 1; i < len(pub.tries) && i <= 10; i++ {
			gaps = append(gaps, pub.tries[i].Sub(pub.tries[i-1]))
		}
		pub.mu.Unlock()
		ms := time.Millisecond
		want := []time.Duration{100 * ms, 200 * ms, 400 * ms, 800 * ms, 1600 * ms, 3200 * ms, 6400 * ms, 10 * time.Second, 10 * time.Second, 10 * time.Second}
		if !slices.Equal(gaps, want) {
			t.Fatalf("relay retries after %v, want %v", gaps, want)
		}
		if len(st.trims) != 1 || st.trims[0].Sub(epoch) != time.Hour {
			t.Fatalf("journal trims at %v, want one at 1h", st.trims)
		}
	})
}

// The trim runs at the shard's phase of its period counted from the Unix
// epoch, not an hour after each claim: a shard that changes owners more
// often than hourly is trimmed all the same, by whoever owns it then.
// Shard 2 of 4, retention 24h: hourly, at half past.
func TestJournalTrimsAtTheShardsPhaseWhateverTheOwner(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		st := &fakeStore{hosts: hostsOf(2, 4, 1), reconnects: make(chan uuid.UUID)}
		rcfg := monitor.RunnerConfig{Replica: "a", Shards: 4, Interval: time.Hour, JournalRetention: 24 * time.Hour}
		for _, own := range [][2]time.Duration{{0, 20 * time.Minute}, {25 * time.Minute, 40 * time.Minute}, {45 * time.Minute, 100 * time.Minute}} {
			time.Sleep(own[0] - time.Since(epoch))
			stop := ownShard(t, st, monitor.Config{}, rcfg, 2)
			time.Sleep(own[1] - time.Since(epoch))
			stop()
		}
		var got []time.Duration
		for _, at := range st.trims {
			got = append(got, at.Sub(epoch))
		}
		if want := []time.Duration{30 * time.Minute, 90 * time.Minute}; !slices.Equal(got, want) {
			t.Fatalf("journal trims at %v, want %v", got, want)
		}
	})
}
