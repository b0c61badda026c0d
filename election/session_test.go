package election

import (
	"context"
	"errors"
	"sync"
	"testing"
	"testing/synctest"
	"time"

	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"
)

// fakeLessor answers a Session's lease calls from a script, inside a
// synctest bubble, so the session's deadline is checked on a clock the test
// controls.
type fakeLessor struct {
	mu    sync.Mutex
	calls int
	// answer decides keep-alive n (0-based): an error, or hang until the
	// call's deadline (an etcd member swallowing the request).
	answer  func(n int) (err error, hang bool)
	acked   []time.Time // send times of the acknowledged keep-alives
	revoked bool
}

func (f *fakeLessor) Grant(_ context.Context, ttl int64) (*clientv3.LeaseGrantResponse, error) {
	return &clientv3.LeaseGrantResponse{ID: 7, TTL: ttl}, nil
}

func (f *fakeLessor) KeepAliveOnce(ctx context.Context, id clientv3.LeaseID) (*clientv3.LeaseKeepAliveResponse, error) {
	sent := time.Now()
	f.mu.Lock()
	n := f.calls
	f.calls++
	f.mu.Unlock()
	err, hang := f.answer(n)
	if hang {
		<-ctx.Done()
		return nil, ctx.Err()
	}
	if err != nil {
		return nil, err
	}
	f.mu.Lock()
	f.acked = append(f.acked, sent)
	f.mu.Unlock()
	return &clientv3.LeaseKeepAliveResponse{ID: id, TTL: 3}, nil
}

func (f *fakeLessor) Revoke(context.Context, clientv3.LeaseID) (*clientv3.LeaseRevokeResponse, error) {
	f.mu.Lock()
	f.revoked = true
	f.mu.Unlock()
	return &clientv3.LeaseRevokeResponse{}, nil
}

func (f *fakeLessor) lastAck() time.Time {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.acked[len(f.acked)-1]
}

const (
	testTTL    = 3 * time.Second
	testMargin = 600 * time.Millisecond // TTL/5
)

// While keep-alives are acknowledged the session stays valid, for as long
// as it runs.
func TestSessionStaysValidWhileRenewed(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		f := &fakeLessor{answer: func(int) (error, bool) { return nil, false }}
		s, err := newSession(context.Background(), f, SessionConfig{TTL: testTTL})
		if err != nil {
			t.Fatal(err)
		}
		time.Sleep(20 * testTTL)
		synctest.Wait()
		if !s.Valid() {
			t.Fatalf("session ended: %v", s.Err())
		}
		if want := f.lastAck().Add(testTTL - testMargin); !s.Deadline().Equal(want) {
			t.Fatalf("deadline %v, want the last acknowledged send + TTL - margin = %v", s.Deadline(), want)
		}
		if err := s.Close(context.Background()); err != nil || !f.revoked {
			t.Fatalf("close: %v, revoked %v", err, f.revoked)
		}
	})
}

// When etcd stops acknowledging, the session ends exactly at the last
// acknowledged keep-alive's send time + TTL - margin: before the lease can
// expire on the server, not a moment sooner.
func TestSessionEndsAtTheDeadlineOfTheLastRenewal(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		f := &fakeLessor{answer: func(n int) (error, bool) { return nil, n >= 4 }}
		s, err := newSession(context.Background(), f, SessionConfig{TTL: testTTL})
		if err != nil {
			t.Fatal(err)
		}
		<-s.Context().Done()
		ended := time.Now()
		if want := f.lastAck().Add(testTTL - testMargin); !ended.Equal(want) {
			t.Fatalf("session ended at %v, want %v (last acknowledged send + TTL - margin)", ended, want)
		}
		if !errors.Is(s.Err(), ErrSessionExpired) || s.Valid() {
			t.Fatalf("ended with %v, valid %v", s.Err(), s.Valid())
		}
		<-s.Done()
	})
}

// A keep-alive etcd refuses at once is retried a tenth of a period later,
// so a flaky member costs nothing; a lease etcd says is gone ends the
// session at once.
func TestSessionRetriesFailuresAndEndsOnLeaseGone(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		unavailable := errors.New("unavailable")
		f := &fakeLessor{answer: func(n int) (error, bool) {
			switch {
			case n >= 1 && n <= 5:
				return unavailable, false
			case n == 8:
				return rpctypes.ErrLeaseNotFound, false
			}
			return nil, false
		}}
		s, err := newSession(context.Background(), f, SessionConfig{TTL: testTTL})
		if err != nil {
			t.Fatal(err)
		}
		start := time.Now()
		<-s.Context().Done()
		// Calls 1..5 fail and are retried every 100ms (period 1s / 10), call
		// 6 lands 500ms after call 1; calls 7 and 8 follow on the ticker.
		if got := time.Since(start); got != 3*time.Second {
			t.Errorf("ended after %v, want 3s (the ticker's third beat after the retries)", got)
		}
		if !errors.Is(s.Err(), rpctypes.ErrLeaseNotFound) {
			t.Fatalf("ended with %v, want the lease gone", s.Err())
		}
		<-s.Done()
	})
}
