package chaos

import (
	"errors"
	"io"
	"net"
	"sync"
	"time"
)

// direction is one half of a TCP link.
type direction int

const (
	upstream   direction = iota // client -> server (requests)
	downstream                  // server -> client (answers)
)

func (d direction) String() string { return [...]string{"requests", "answers"}[d] }

// valve forwards TCP connections to a target like internal/faultproxy, but
// can hold each direction on its own: a one-way partition. Held bytes wait
// (in the valve and the kernel's buffers) and flow on Release, as with
// faultproxy's Blackhole. It sits behind a faultproxy on every replica's
// etcd link, so the link can be cut, blackholed or made one-way.
// (faultproxy has no one-way mode; adding one there would make this type
// unnecessary.)
type valve struct {
	target string
	ln     net.Listener
	wg     sync.WaitGroup

	mu      sync.Mutex
	held    [2]bool
	changed chan struct{} // closed and replaced when held changes
	conns   map[net.Conn]struct{}
	closed  bool
}

func newValve(target string) (*valve, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	v := &valve{target: target, ln: ln, changed: make(chan struct{}), conns: map[net.Conn]struct{}{}}
	v.wg.Add(1)
	go v.accept()
	return v, nil
}

func (v *valve) Addr() string { return v.ln.Addr().String() }

// Hold stops one direction; Release lets everything flow again.
func (v *valve) Hold(d direction) { v.set(func(h *[2]bool) { h[d] = true }) }
func (v *valve) Release()         { v.set(func(h *[2]bool) { *h = [2]bool{} }) }

func (v *valve) set(f func(*[2]bool)) {
	v.mu.Lock()
	defer v.mu.Unlock()
	f(&v.held)
	close(v.changed)
	v.changed = make(chan struct{})
}

// Close stops listening, closes every connection and waits for the pumps.
func (v *valve) Close() {
	v.mu.Lock()
	if v.closed {
		v.mu.Unlock()
		return
	}
	v.closed = true
	for c := range v.conns {
		c.Close()
	}
	close(v.changed)
	v.changed = make(chan struct{})
	v.mu.Unlock()
	v.ln.Close()
	v.wg.Wait()
}

func (v *valve) track(c net.Conn) bool {
	v.mu.Lock()
	defer v.mu.Unlock()
	if v.closed {
		return false
	}
	v.conns[c] = struct{}{}
	return true
}

func (v *valve) untrack(c net.Conn) {
	v.mu.Lock()
	delete(v.conns, c)
	v.mu.Unlock()
	c.Close()
}

func (v *valve) accept() {
	defer v.wg.Done()
	for {
		client, err := v.ln.Accept()
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return
			}
			continue
		}
		v.wg.Add(1)
		go v.link(client)
	}
}

func (v *valve) link(client net.Conn) {
	defer v.wg.Done()
	if !v.track(client) {
		client.Close()
		return
	}
	defer v.untrack(client)
	server, err := net.DialTimeout("tcp", v.target, 5*time.Second)
	if err != nil {
		return
	}
	if !v.track(server) {
		server.Close()
		return
	}
	defer v.untrack(server)
	var pumps sync.WaitGroup
	pumps.Add(2)
	go func() { defer pumps.Done(); v.pump(upstream, server, client) }()
	go func() { defer pumps.Done(); v.pump(downstream, client, server) }()
	pumps.Wait()
}

// pump copies src to dst, holding each chunk while its direction is held.
// The end of src's stream is passed on as a half-close; any other error
// closes both sides, which ends the other pump too.
func (v *valve) pump(d direction, dst, src net.Conn) {
	buf := make([]byte, 32<<10)
	for {
		n, rerr := src.Read(buf)
		if n > 0 {
			if !v.await(d) {
				dst.Close()
				src.Close()
				return
			}
			if _, err := dst.Write(buf[:n]); err != nil {
				dst.Close()
				src.Close()
				return
			}
		}
		if rerr != nil {
			if cw, ok := dst.(interface{ CloseWrite() error }); errors.Is(rerr, io.EOF) && ok && cw.CloseWrite() == nil {
				return
			}
			dst.Close()
			src.Close()
			return
		}
	}
}

// await blocks while d is held; false once the valve is closed.
func (v *valve) await(d direction) bool {
	for {
		v.mu.Lock()
		held, closed, ch := v.held[d], v.closed, v.changed
		v.mu.Unlock()
		if closed {
			return false
		}
		if !held {
			return true
		}
		<-ch
	}
}
