package agentpool

import (
	"bufio"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"sync"
	"time"
)

// transport is the pool's HTTP/1.1 client: one request at a time per
// connection, written and read in the caller's goroutine. Unlike
// net/http.Transport it keeps no goroutine for an idle connection, so
// thousands of agents' connections can stay open between passes for the
// price of their file descriptors.
//
// Idle connections: at most one per agent and maxIdle in all. An agent whose
// connection is kept holds a slot while its connection is in use too, so
// that with more agents than slots the same agents keep theirs sweep after
// sweep and the others dial: a slot freed by every call in flight would go
// to whichever call ends first, and the kept set would drift, each sweep
// dialling agents that had a connection the sweep before. (Evicting the
// least recently used would be worse still: agents are called round-robin,
// so it would evict exactly the next one needed.) A slot is given up when
// its connection is closed. An idle connection older than idleTimeout is
// closed.
//
// A request on a reused connection that fails before any byte of the answer
// arrived (the agent closed it while idle) is retried once on a new
// connection. Both RPCs are safe to repeat: ListSandboxes reads, and a
// second DestroySandbox of the same sandbox answers not_found, which is
// success.
type transport struct {
	dial        func(ctx context.Context, network, addr string) (net.Conn, error)
	tls         *tls.Config // nil: plain HTTP
	maxIdle     int
	idleTimeout time.Duration
	maxHeader   int64 // bytes of a response's status line and headers
	now         func() time.Time

	mu        sync.Mutex
	idle      map[string]*conn // by agent ("host:port")
	slots     map[string]bool  // agents holding a slot: their connection is idle or in use
	lastSweep time.Time
}

// conn is one connection to an agent.
type conn struct {
	t      *transport
	key    string
	slot   bool // it holds its agent's slot (see transport)
	nc     net.Conn
	cr     *countingReader
	br     *bufio.Reader
	bw     *bufio.Writer
	idleAt time.Time
}

// countingReader counts the bytes read and refuses to read past limit.
type countingReader struct {
	r     io.Reader
	n     int64
	limit int64 // -1: none
}

var errHeaderTooLarge = errors.New("agentpool: response header too large")

func (c *countingReader) Read(p []byte) (int, error) {
	if c.limit >= 0 {
		if c.n >= c.limit {
			return 0, errHeaderTooLarge
		}
		if rest := c.limit - c.n; int64(len(p)) > rest {
			p = p[:rest]
		}
	}
	n, err := c.r.Read(p)
	c.n += int64(n)
	return n, err
}

// Do sends req to the agent its URL names and returns the answer. The
// response body must be closed; the connection returns to the idle pool
// only if the body was read to its end first. Cancelling the request's
// context aborts the exchange and closes its connection.
func (t *transport) Do(req *http.Request) (*http.Response, error) {
	ctx := req.Context()
	key := req.URL.Host
	for attempt := 0; ; attempt++ {
		c, reused := t.take(key)
		if c == nil {
			var err error
			if c, err = t.open(ctx, req.URL.Scheme, key); err != nil {
				closeBody(req)
				return nil, err
			}
		}
		resp, err := t.exchange(ctx, c, req)
		if err == nil {
			return resp, nil
		}
		if reused && attempt == 0 && c.cr.n == 0 && ctx.Err() == nil && req.GetBody != nil {
			if body, gerr := req.GetBody(); gerr == nil {
				req.Body = body
				continue
			}
		}
		closeBody(req)
		return nil, err
	}
}

func closeBody(req *http.Request) {
	if req.Body != nil {
		_ = req.Body.Close()
	}
}

// open dials the agent, with TLS when configured.
func (t *transport) open(ctx context.Context, scheme, addr string) (*conn, error) {
	nc, err := t.dial(ctx, "tcp", addr)
	if err != nil {
		return nil, err
	}
	if scheme == "https" {
		if t.tls == nil {
			nc.Close()
			return nil, fmt.Errorf("agentpool: https address %s without TLS configured", addr)
		}
		cfg := t.tls.Clone()
		if host, _, err := net.SplitHostPort(addr); err == nil {
			cfg.ServerName = host
		}
		tc := tls.Client(nc, cfg)
		if err := tc.HandshakeContext(ctx); err != nil {
			nc.Close()
			return nil, err
		}
		nc = tc
	}
	c := &conn{t: t, key: addr, nc: nc, cr: &countingReader{r: nc, limit: -1}}
	c.attach()
	return c, nil
}

// Buffers of closed connections, for the next ones: most calls dial when an
// owner has more agents than MaxIdleConns.
var readers, writers sync.Pool

// discard closes c and recycles its buffers. Only the goroutine that owns c
// (the call using it, or the pool for an idle one) may discard it.
func (c *conn) discard() {
	c.nc.Close()
	c.release()
	if c.slot {
		c.slot = false
		c.t.mu.Lock()
		delete(c.t.slots, c.key)
		c.t.mu.Unlock()
	}
}

// release gives c's buffers back (an idle connection needs none: nothing is
// buffered when it goes idle); attach takes new ones before the next use.
func (c *conn) release() {
	if c.br != nil {
		c.br.Reset(nil)
		readers.Put(c.br)
		c.bw.Reset(nil)
		writers.Put(c.bw)
		c.br, c.bw = nil, nil
	}
}

func (c *conn) attach() {
	if c.br != nil {
		return
	}
	br, _ := readers.Get().(*bufio.Reader)
	if br == nil {
		br = bufio.NewReaderSize(c.cr, 4<<10)
	} else {
		br.Reset(c.cr)
	}
	bw, _ := writers.Get().(*bufio.Writer)
	if bw == nil {
		bw = bufio.NewWriterSize(c.nc, 4<<10)
	} else {
		bw.Reset(c.nc)
	}
	c.br, c.bw = br, bw
}

// exchange writes req on c and reads the answer's header. On error c is
// closed.
func (t *transport) exchange(ctx context.Context, c *conn, req *http.Request) (*http.Response, error) {
	stop := context.AfterFunc(ctx, func() { c.nc.Close() })
	fail := func(err error) (*http.Response, error) {
		stop()
		c.discard()
		if ctx.Err() != nil {
			return nil, ctx.Err()
		}
		return nil, err
	}
	deadline, _ := ctx.Deadline()
	if err := c.nc.SetDeadline(deadline); err != nil {
		return fail(err)
	}
	c.cr.n = 0
	if err := req.Write(c.bw); err != nil {
		return fail(err)
	}
	if err := c.bw.Flush(); err != nil {
		return fail(err)
	}
	c.cr.limit = c.cr.n + t.maxHeader
	resp, err := http.ReadResponse(c.br, req)
	c.cr.limit = -1 // the body is bounded by its reader (connect's read limit)
	if err != nil {
		return fail(err)
	}
	resp.Body = &body{rc: resp.Body, c: c, t: t, stop: stop, keep: !resp.Close && !req.Close}
	return resp, nil
}

// body hands the connection back once the answer was read to its end.
type body struct {
	rc     io.ReadCloser
	c      *conn
	t      *transport
	stop   func() bool
	keep   bool
	eof    bool
	closed bool
}

func (b *body) Read(p []byte) (int, error) {
	n, err := b.rc.Read(p)
	if err == io.EOF {
		b.eof = true
	}
	return n, err
}

func (b *body) Close() error {
	if b.closed {
		return nil
	}
	b.closed = true
	err := b.rc.Close()
	// stop is false when the context ended: its AfterFunc closed (or is
	// closing) the connection.
	if b.stop() && b.keep && b.eof && b.c.br.Buffered() == 0 {
		b.t.put(b.c)
	} else {
		b.c.discard()
	}
	return err
}

// take returns the agent's idle connection, if it has a fresh one.
func (t *transport) take(key string) (*conn, bool) {
	now := t.now()
	t.mu.Lock()
	c := t.idle[key]
	delete(t.idle, key)
	stale := t.sweepLocked(now)
	t.mu.Unlock()
	closeAll(stale)
	if c != nil && now.Sub(c.idleAt) >= t.idleTimeout {
		c.discard()
		c = nil
	}
	if c != nil {
		c.attach()
	}
	return c, c != nil
}

// put keeps c idle if it holds its agent's slot or a slot is free;
// otherwise closes it.
func (t *transport) put(c *conn) {
	if err := c.nc.SetDeadline(time.Time{}); err != nil {
		c.discard()
		return
	}
	now := t.now()
	c.idleAt = now
	t.mu.Lock()
	stale := t.sweepLocked(now)
	if !c.slot && !t.slots[c.key] && len(t.slots) < t.maxIdle {
		c.slot = true
		t.slots[c.key] = true
	}
	keep := c.slot && t.idle[c.key] == nil
	if keep {
		c.release()
		t.idle[c.key] = c
	}
	t.mu.Unlock()
	closeAll(stale)
	if !keep {
		c.discard()
	}
}

// sweepLocked removes the idle connections older than idleTimeout, at most
// every idleTimeout/2, and returns them to be closed outside the lock.
func (t *transport) sweepLocked(now time.Time) []*conn {
	if now.Sub(t.lastSweep) < t.idleTimeout/2 {
		return nil
	}
	t.lastSweep = now
	var stale []*conn
	for k, c := range t.idle {
		if now.Sub(c.idleAt) >= t.idleTimeout {
			stale = append(stale, c)
			delete(t.idle, k)
		}
	}
	return stale
}

// closeIdle closes every idle connection.
func (t *transport) closeIdle() {
	t.mu.Lock()
	var all []*conn
	for k, c := range t.idle {
		all = append(all, c)
		delete(t.idle, k)
	}
	t.mu.Unlock()
	closeAll(all)
}

// idleCount is the number of idle connections.
func (t *transport) idleCount() int {
	t.mu.Lock()
	defer t.mu.Unlock()
	return len(t.idle)
}

func closeAll(cs []*conn) {
	for _, c := range cs {
		c.discard()
	}
}
