package store_test

import (
	"context"
	"sync"
	"testing"
	"time"

	"github.com/google/uuid"

	"github.com/vigil-sh/vigil/events"
	"github.com/vigil-sh/vigil/internal/testwait"
	"github.com/vigil-sh/vigil/store"
)

// waitAdvisory waits until some backend waits on an advisory lock.
func waitAdvisory(t *testing.T, s *store.Store, done <-chan error) {
	t.Helper()
	testwait.For(t, 10*time.Second, "the event writer to wait for the shard's events lock", func() bool {
		var n int
		if err := db(s).QueryRow(context.Background(), `
			select count(*) from pg_stat_activity
			 where datname = current_database() and wait_event_type = 'Lock' and wait_event = 'advisory'`).Scan(&n); err != nil {
			t.Fatal(err)
		}
		select {
		case err := <-done:
			t.Fatalf("the event writer finished (%v) while another transaction held the shard's events: commit order is not seq order", err)
		default:
		}
		return n > 0
	})
}

// Writers of one shard's events are serialised, so seq order is commit
// order (SPEC §6: relayed in commit order), and both writers take that lock
// before any row lock, so a pass and the passive rule on the same hosts
// cannot deadlock. The test holds the shard's events lock as a concurrent
// writer would and checks that each writer waits for it.
func TestEventWritersWaitForTheShardsEventsLock(t *testing.T) {
	ctx := context.Background()
	s, _ := counted(t)
	f := store.Fence{Shard: 6, Token: 60, Replica: "r1"}
	if err := s.RaiseFence(ctx, f); err != nil {
		t.Fatal(err)
	}
	team := uuid.New()
	host := addHost(t, s, "online", &team, 95*time.Second)
	sb := addSandbox(t, s, host, "running")

	hold := func() func() {
		tx, err := db(s).Begin(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := tx.Exec(ctx, `select pg_advisory_xact_lock(x'76696731'::int, $1)`, f.Shard); err != nil {
			t.Fatal(err)
		}
		var once sync.Once
		release := func() { once.Do(func() { tx.Commit(ctx) }) }
		t.Cleanup(release) // a failing check must not leave the lock held
		return release
	}

	release := hold()
	done := make(chan error, 1)
	go func() {
		_, err := s.Apply(ctx, f, store.Batch{Changes: []store.Change{{Row: sb, To: "stopped", Audit: &store.AuditRow{
			TeamID: team, ResourceType: "sandbox", ResourceID: "cl-x", Action: "destroy", Status: "warning",
			Metadata: map[string]any{"reason": "orphaned"},
			Event:    &events.Event{ID: uuid.New(), Name: "capsule.destroy", Payload: "{}"}}}}})
		done <- err
	}()
	waitAdvisory(t, s, done)
	release()
	if err := <-done; err != nil {
		t.Fatal(err)
	}

	release = hold()
	go func() {
		_, err := s.Passive(ctx, f, store.PassiveInput{Hosts: []uuid.UUID{host}, ResourceIDs: []string{"host-x"},
			StaleAfter: 90 * time.Second, Live: []string{"running"},
			Audit: store.AuditRow{ResourceType: "host", Action: "marked_down", Status: "error"},
			Event: func(store.MarkedHost) events.Event {
				return events.Event{ID: uuid.New(), Name: "host.down", Payload: "{}"}
			}})
		done <- err
	}()
	waitAdvisory(t, s, done)
	// It waits before locking its rows: the host row is free meanwhile.
	var st string
	if err := db(s).QueryRow(ctx, `select status from hosts where id = $1 for update nowait`, host).Scan(&st); err != nil {
		t.Fatalf("the host row is locked while the mark-down waits for the events lock: %v", err)
	}
	release()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	var n int
	db(s).QueryRow(ctx, `select count(*) from vigil_events where shard = $1`, f.Shard).Scan(&n)
	if n != 2 {
		t.Fatalf("%d events written, want 2", n)
	}
}

// Rule 9's once-per-grace bound is claimed by the check that lets a re-send
// through, not by the agent's answer: a second check within the grace fails
// even when no record followed the first (the agent refused or timed out).
func TestRetrySlotIsClaimedAtTheCheck(t *testing.T) {
	ctx := context.Background()
	s, _ := counted(t)
	f := store.Fence{Shard: 7, Token: 70, Replica: "r1"}
	if err := s.RaiseFence(ctx, f); err != nil {
		t.Fatal(err)
	}
	host := addHost(t, s, "online", nil, 0)
	sb := addSandbox(t, s, host, "stopping")
	b := store.Batch{Resends: []store.Sandbox{sb}, ResendGrace: time.Hour}
	out, err := s.Apply(ctx, f, b)
	if err != nil || !out.Resends[0] {
		t.Fatalf("first check: %+v, %v; want held", out, err)
	}
	out, err = s.Apply(ctx, f, b)
	if err != nil || out.Resends[0] {
		t.Fatalf("second check within the grace: %+v, %v; want refused", out, err)
	}
	// Past the grace it is let through again.
	if _, err := db(s).Exec(ctx, `update vigil_destroy_retries set retried_at = now() - interval '2 hours'`); err != nil {
		t.Fatal(err)
	}
	if out, err = s.Apply(ctx, f, b); err != nil || !out.Resends[0] {
		t.Fatalf("check past the grace: %+v, %v; want held", out, err)
	}
	// The journal trim forgets re-send times older than its retention.
	if _, err := db(s).Exec(ctx, `update vigil_destroy_retries set retried_at = now() - interval '2 days'`); err != nil {
		t.Fatal(err)
	}
	if _, err := s.TrimJournal(ctx, f, 24*time.Hour); err != nil {
		t.Fatal(err)
	}
	var n int
	db(s).QueryRow(ctx, `select count(*) from vigil_destroy_retries`).Scan(&n)
	if n != 0 {
		t.Fatalf("%d re-send times left after the trim", n)
	}
}
