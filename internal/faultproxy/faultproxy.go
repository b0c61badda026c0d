// Package faultproxy is a userspace TCP proxy that partitions the connections
// through it on command, for tests of what vigil does when etcd, Postgres or
// an agent is cut off. Put it between a client and a server on loopback, dial
// its Addr instead of the server's, and Cut, Blackhole or Heal the link.
package faultproxy

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"time"
)

// mode is what the proxy does with traffic.
type mode int

const (
	forwarding mode = iota
	cut
	blackholed
)

// Proxy forwards every TCP connection accepted on Addr to its target, a new
// target connection per client connection, until told otherwise.
// Its methods are safe for concurrent use.
type Proxy struct {
	ln   net.Listener
	ctx  context.Context // ends at Close; bounds dials to the target
	stop context.CancelFunc
	wg   sync.WaitGroup // every goroutine the proxy started

	mu       sync.Mutex
	target   string
	mode     mode
	changed  chan struct{} // closed and replaced whenever mode changes
	links    map[*link]struct{}
	accepted int // connections accepted so far, for tests
	closed   bool
}

// New listens on a free loopback port and forwards connections to target
// (host:port), which is dialled only when a client connects.
func New(target string) (*Proxy, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, fmt.Errorf("faultproxy: listen: %w", err)
	}
	ctx, stop := context.WithCancel(context.Background())
	p := &Proxy{
		target:  target,
		ln:      ln,
		ctx:     ctx,
		stop:    stop,
		changed: make(chan struct{}),
		links:   make(map[*link]struct{}),
	}
	p.wg.Add(1)
	go p.acceptLoop()
	return p, nil
}

// Addr is the host:port clients dial instead of the target.
func (p *Proxy) Addr() string {
	return p.ln.Addr().String()
}

// Retarget moves the proxy to another target, as a virtual IP, a DNS name
// or a connection pooler moves to a promoted standby: every current
// connection is reset, and new ones reach target. Traffic then flows (a Cut
// or Blackhole ends).
func (p *Proxy) Retarget(target string) {
	p.mu.Lock()
	p.target = target
	p.mu.Unlock()
	p.Cut()
	p.Heal()
}

// Cut is a hard partition: every current connection is reset (both the
// client's and the target's side) and every new one is reset as soon as it
// is accepted, until Heal. Clients see errors at once.
func (p *Proxy) Cut() {
	for _, l := range p.setMode(cut) {
		l.close(true)
	}
}

// Blackhole is a silent partition, the realistic kind: connections stay
// open and writes into them succeed, but nothing is delivered in either
// direction and no error is reported, so peers see only a lack of progress.
// New connections are accepted but not forwarded. Nothing is discarded
// either: as TCP retransmission would after a real partition, the bytes sent
// meanwhile (held in the proxy and the kernel's socket buffers) are delivered
// on Heal, so a connection that lived through a blackhole is intact.
func (p *Proxy) Blackhole() {
	p.setMode(blackholed)
}

// Heal ends a Cut or a Blackhole: traffic flows again, including what a
// blackhole held back. Connections reset by Cut stay closed; clients must
// reconnect.
func (p *Proxy) Heal() {
	p.setMode(forwarding)
}

// Close stops listening, closes every connection and returns once every
// goroutine of the proxy has exited. Later calls do nothing.
func (p *Proxy) Close() error {
	p.mu.Lock()
	if p.closed {
		p.mu.Unlock()
		return nil
	}
	p.closed = true
	links := p.snapshotLinks()
	p.mu.Unlock()

	p.stop()
	err := p.ln.Close()
	for _, l := range links {
		l.close(false)
	}
	p.wg.Wait()
	return err
}

// setMode switches the mode, wakes every pump waiting on it, and returns the
// links of the moment.
func (p *Proxy) setMode(m mode) []*link {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.mode != m {
		p.mode = m
		close(p.changed)
		p.changed = make(chan struct{})
	}
	return p.snapshotLinks()
}

func (p *Proxy) snapshotLinks() []*link {
	links := make([]*link, 0, len(p.links))
	for l := range p.links {
		links = append(links, l)
	}
	return links
}

func (p *Proxy) acceptLoop() {
	defer p.wg.Done()
	backoff := 5 * time.Millisecond
	for {
		conn, err := p.ln.Accept()
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return
			}
			// Out of file descriptors or the like: back off as net/http does.
			select {
			case <-time.After(backoff):
			case <-p.ctx.Done():
				return
			}
			backoff = min(2*backoff, time.Second)
			continue
		}
		backoff = 5 * time.Millisecond
		p.admit(conn)
	}
}

// admit registers a client connection and starts its link, or resets it at
// once if the proxy is cut or closed.
func (p *Proxy) admit(client net.Conn) {
	p.mu.Lock()
	p.accepted++
	if p.closed || p.mode == cut {
		p.mu.Unlock()
		reset(client)
		return
	}
	l := &link{client: client, done: make(chan struct{})}
	p.links[l] = struct{}{}
	p.wg.Add(1)
	p.mu.Unlock()
	go p.run(l)
}

// run dials the target for l once traffic may flow, pumps both directions
// until both have ended, then forgets the link.
func (p *Proxy) run(l *link) {
	defer p.wg.Done()
	defer func() {
		l.close(false)
		p.mu.Lock()
		delete(p.links, l)
		p.mu.Unlock()
	}()
	// A blackholed proxy does not reach the target, not even to connect.
	if !p.awaitForwarding(l) {
		return
	}
	var d net.Dialer
	ctx, cancel := context.WithTimeout(p.ctx, 10*time.Second)
	p.mu.Lock()
	target := p.target
	p.mu.Unlock()
	server, err := d.DialContext(ctx, "tcp", target)
	cancel()
	if err != nil {
		return
	}
	if !l.setServer(server) {
		server.Close()
		return
	}
	var pumps sync.WaitGroup
	pumps.Add(2)
	go func() { defer pumps.Done(); p.pump(l, server, l.client) }()
	go func() { defer pumps.Done(); p.pump(l, l.client, server) }()
	pumps.Wait()
}

// pump copies src to dst, holding every read (and the end of the stream)
// while the proxy is blackholed. EOF is passed on as a half-close; any other
// error, or the link being closed, tears the whole link down.
func (p *Proxy) pump(l *link, dst, src net.Conn) {
	buf := make([]byte, 32<<10)
	for {
		n, rerr := src.Read(buf)
		if !p.awaitForwarding(l) {
			return
		}
		if n > 0 {
			if _, err := dst.Write(buf[:n]); err != nil {
				l.close(false)
				return
			}
		}
		if rerr != nil {
			if errors.Is(rerr, io.EOF) {
				if cw, ok := dst.(interface{ CloseWrite() error }); ok && cw.CloseWrite() == nil {
					return
				}
			}
			l.close(false)
			return
		}
	}
}

// awaitForwarding blocks while the proxy is blackholed and reports whether
// traffic may flow: false once the link is closed (by Cut, Close or an error).
func (p *Proxy) awaitForwarding(l *link) bool {
	for {
		p.mu.Lock()
		m, changed := p.mode, p.changed
		p.mu.Unlock()
		select {
		case <-l.done:
			return false
		default:
		}
		if m == forwarding {
			return true
		}
		select {
		case <-changed:
		case <-l.done:
			return false
		}
	}
}

// link is one proxied connection: the client's and, once dialled, the
// target's.
type link struct {
	client net.Conn

	mu     sync.Mutex
	server net.Conn
	closed bool
	done   chan struct{} // closed by close
}

// setServer records the target connection; false if the link was closed
// meanwhile.
func (l *link) setServer(c net.Conn) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.closed {
		return false
	}
	l.server = c
	return true
}

// close closes both connections, with a reset instead of an orderly close
// when hard is set. Idempotent.
func (l *link) close(hard bool) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.closed {
		return
	}
	l.closed = true
	close(l.done)
	for _, c := range []net.Conn{l.client, l.server} {
		if c == nil {
			continue
		}
		if hard {
			reset(c)
		} else {
			c.Close()
		}
	}
}

// reset closes c with a TCP RST, so the peer sees "connection reset" rather
// than an orderly end of stream.
func reset(c net.Conn) {
	if tc, ok := c.(*net.TCPConn); ok {
		_ = tc.SetLinger(0)
	}
	c.Close()
}
