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
	client *clientv3.Client
	lease  clientv3.LeaseID
	ttl    time.Duration
	margin time.Duration
	log    hclog.Logger
	now    func() time.Time

	mu       sync.Mutex
	deadline time.Time
	err      error

	ctx    context.Context // ends when the session ends
	cancel context.CancelCauseFunc
	done   chan struct{} // closed after the loop exits
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
	if cfg.TTL < time.Second || cfg.TTL%time.Second != 0 {
		return nil, fmt.Errorf("election: lease TTL %s must be a whole number of seconds, at least 1s", cfg.TTL)
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
		now:    time.Now,
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
	return s.err == nil && s.now().Before(s.deadline)
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
// later, so one
// etcd member that swallows requests (the client spreads them over every
// endpoint) costs half a period, not the session.
func (s *Session) keepAlive(parent context.Context) {
	defer close(s.done)
	interval := s.ttl / 3
	timer := time.NewTimer(time.Until(s.Deadline()))
	defer timer.Stop()
	tick := time.NewTicker(interval)
	defer tick.Stop()
	type result struct {
		sent time.Time
		ttl  time.Duration
		err  error
	}
	results := make(chan result, 1)
	inflight := false
	retry := time.NewTimer(time.Hour)
	retry.Stop()
	defer retry.Stop()
	send := func() {
		inflight = true
		sent := s.now()
		go func() {
			ctx, cancel := context.WithTimeout(clientv3.WithRequireLeader(s.ctx), interval/2)
			defer cancel()
			resp, err := s.client.KeepAliveOnce(ctx, s.lease)
			r := result{sent: sent, err: err}
			if err == nil {
				r.ttl = time.Duration(resp.TTL) * time.Second
			}
			results <- r
		}()
	}
	send()
	for {
		select {
		case <-parent.Done():
			s.end(context.Cause(parent))
		case <-s.ctx.Done():
			if inflight {
				<-results
			}
			return
		case <-timer.C:
			s.log.Warn("lease deadline passed without a renewal; stepping down", "lease", fmt.Sprintf("%x", s.lease))
			s.end(fmt.Errorf("%w: no keep-alive acknowledged within %s", ErrSessionExpired, s.ttl-s.margin))
		case <-tick.C:
			if !inflight {
				send()
			}
		case <-retry.C:
			if !inflight {
				send()
			}
		case r := <-results:
			inflight = false
			if r.err != nil {
				if isLeaseGone(r.err) {
					s.end(fmt.Errorf("%w: %w", ErrSessionExpired, r.err))
					continue
				}
				s.log.Debug("keep-alive failed; retrying", "error", r.err)
				retry.Reset(interval / 10) // not a spin when etcd refuses at once
				continue
			}
			s.mu.Lock()
			if d := r.sent.Add(r.ttl - s.margin); d.After(s.deadline) && s.err == nil {
				s.deadline = d
			}
			d := s.deadline
			s.mu.Unlock()
			timer.Reset(time.Until(d))
		}
	}
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
