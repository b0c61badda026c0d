package election

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/hashicorp/go-hclog"
	clientv3 "go.etcd.io/etcd/client/v3"
)

// ErrSessionExpired reports that the session's local lease deadline passed,
// or etcd said the lease is gone. Everything bound to the session must stop.
var ErrSessionExpired = errors.New("election: session expired")

// Session is one etcd lease with its own keep-alive loop and a local
// deadline. The deadline is measured from when each successful keep-alive
// was sent — etcd extends the lease no earlier than it receives the request —
// minus a margin, so it always passes before the lease can expire on the
// server. Done closes at that deadline unless a keep-alive sent in time has
// moved it; it is the only step-down signal.
//
// Once Done is closed the session is finished for good: the replica must
// open a new Session (a new lease, so new fencing tokens) to act again.
type Session struct {
	client lessor
	lease  clientv3.LeaseID
	ttl    time.Duration
	margin time.Duration
	log    hclog.Logger

	mu       sync.Mutex // guards deadline and err
	deadline time.Time
	err      error

	ctx    context.Context // ends when the session ends
	cancel context.CancelCauseFunc
	done   chan struct{} // closed after the loop exits
}

// lessor is what a Session needs of etcd (clientv3.Client has it).
type lessor interface {
	Grant(ctx context.Context, ttl int64) (*clientv3.LeaseGrantResponse, error)
	KeepAliveOnce(ctx context.Context, id clientv3.LeaseID) (*clientv3.LeaseKeepAliveResponse, error)
	Revoke(ctx context.Context, id clientv3.LeaseID) (*clientv3.LeaseRevokeResponse, error)
}

// SessionConfig configures a Session.
type SessionConfig struct {
	TTL    time.Duration // lease TTL, whole seconds, at least 1s
	Margin time.Duration // safety margin under the TTL; default TTL/5, at least 100ms
	Logger hclog.Logger
}

// NewSession grants a lease and starts keeping it alive. The session ends
// when ctx ends, when Close is called, or when the lease can no longer be
// proven alive.
func NewSession(ctx context.Context, client *clientv3.Client, cfg SessionConfig) (*Session, error) {
	return newSession(ctx, client, cfg)
}

func newSession(ctx context.Context, client lessor, cfg SessionConfig) (*Session, error) {
	if err := ValidLeaseTTL(cfg.TTL); err != nil {
		return nil, fmt.Errorf("election: %w", err)
	}
	if cfg.Margin == 0 {
		cfg.Margin = max(cfg.TTL/5, 100*time.Millisecond)
	}
	if cfg.Margin >= cfg.TTL/2 {
		return nil, fmt.Errorf("election: lease margin %s must be under half the TTL %s", cfg.Margin, cfg.TTL)
	}
	if cfg.Logger == nil {
		cfg.Logger = hclog.NewNullLogger()
	}
	sent := time.Now()
	gctx, gcancel := context.WithTimeout(clientv3.WithRequireLeader(ctx), cfg.TTL)
	resp, err := client.Grant(gctx, int64(cfg.TTL/time.Second))
	gcancel()
	if err != nil {
		return nil, fmt.Errorf("election: grant lease: %w", err)
	}
	s := &Session{
		client: client,
		lease:  resp.ID,
		ttl:    time.Duration(resp.TTL) * time.Second,
		margin: cfg.Margin,
		log:    cfg.Logger,
		done:   make(chan struct{}),
	}
	s.deadline = sent.Add(s.ttl - s.margin)
	s.ctx, s.cancel = context.WithCancelCause(context.Background())
	go s.keepAlive(ctx)
	return s, nil
}

// Lease is the session's lease id.
func (s *Session) Lease() clientv3.LeaseID { return s.lease }

// TTL is the lease TTL granted by etcd.
func (s *Session) TTL() time.Duration { return s.ttl }

// Context ends when the session ends, with ErrSessionExpired (or the
// parent's error) as its cause.
func (s *Session) Context() context.Context { return s.ctx }

// Done is closed when the session has ended and its keep-alive loop exited.
func (s *Session) Done() <-chan struct{} { return s.done }

// Valid reports whether the local deadline is still ahead.
func (s *Session) Valid() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.err == nil && time.Now().Before(s.deadline)
}

// Deadline is the current local lease deadline.
func (s *Session) Deadline() time.Time {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.deadline
}

// Err is why the session ended, nil while it is valid.
func (s *Session) Err() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.err
}

func (s *Session) end(err error) {
	s.mu.Lock()
	if s.err == nil {
		s.err = err
	}
	s.mu.Unlock()
	s.cancel(err)
}

// keepAlive renews the lease every TTL/3. Each renewal's send time moves the
// deadline; a timer ends the session the moment the deadline passes. An
// attempt gets half that period; a failed one is retried a tenth of a period
// later, so one etcd member that swallows requests (the client spreads them
// over every endpoint) costs half a period, not the session. It returns
// once the session has ended and no renewal is in flight.
func (s *Session) keepAlive(parent context.Context) {
	defer close(s.done)
	k := &keeper{s: s, interval: s.ttl / 3, results: make(chan renewal, 1)}
	deadline := time.NewTimer(time.Until(s.Deadline()))
	defer deadline.Stop()
	tick := time.NewTicker(k.interval)
	defer tick.Stop()
	k.retry = time.NewTimer(time.Hour)
	k.retry.Stop()
	defer k.retry.Stop()
	k.send()
	for {
		select {
		case <-parent.Done():
			s.end(context.Cause(parent))
		case <-s.ctx.Done():
			if k.inflight {
				<-k.results
			}
			return
		case <-deadline.C:
			s.log.Warn("lease deadline passed without a renewal; stepping down", "lease", fmt.Sprintf("%x", s.lease))
			s.end(fmt.Errorf("%w: no keep-alive acknowledged within %s", ErrSessionExpired, s.ttl-s.margin))
		case <-tick.C:
			k.send()
		case <-k.retry.C:
			k.send()
		case r := <-k.results:
			if d, ok := k.received(r); ok {
				deadline.Reset(time.Until(d))
			}
		}
	}
}

// keeper is keepAlive's state; only its goroutine uses it.
type keeper struct {
	s        *Session
	interval time.Duration
	inflight bool
	results  chan renewal // capacity 1: at most one renewal is in flight
	retry    *time.Timer
}

// renewal is one keep-alive's answer, with when it was sent.
type renewal struct {
	sent time.Time
	ttl  time.Duration
	err  error
}

// send starts a renewal unless one is in flight.
func (k *keeper) send() {
	if k.inflight {
		return
	}
	k.inflight = true
	s, sent := k.s, time.Now()
	go func() {
		ctx, cancel := context.WithTimeout(clientv3.WithRequireLeader(s.ctx), k.interval/2)
		defer cancel()
		resp, err := s.client.KeepAliveOnce(ctx, s.lease)
		r := renewal{sent: sent, err: err}
		if err == nil {
			r.ttl = time.Duration(resp.TTL) * time.Second
		}
		k.results <- r
	}()
}

// received folds in a renewal's answer: a lease gone ends the session, any
// other failure is retried a tenth of a period later (not a spin when etcd
// refuses at once), a success moves the deadline, which it returns.
func (k *keeper) received(r renewal) (time.Time, bool) {
	k.inflight = false
	s := k.s
	if r.err != nil {
		if isLeaseGone(r.err) {
			s.end(fmt.Errorf("%w: %w", ErrSessionExpired, r.err))
			return time.Time{}, false
		}
		s.log.Debug("keep-alive failed; retrying", "error", r.err)
		k.retry.Reset(k.interval / 10)
		return time.Time{}, false
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if d := r.sent.Add(r.ttl - s.margin); d.After(s.deadline) && s.err == nil {
		s.deadline = d
	}
	return s.deadline, true
}

// Close ends the session and revokes its lease so every key bound to it
// disappears at once. It waits for the keep-alive loop to exit.
func (s *Session) Close(ctx context.Context) error {
	s.end(fmt.Errorf("%w: closed", ErrSessionExpired))
	<-s.done
	_, err := s.client.Revoke(ctx, s.lease)
	if err != nil && !isLeaseGone(err) {
		return fmt.Errorf("election: revoke lease %x: %w", s.lease, err)
	}
	return nil
}
