package chaos

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"net"
	"sort"
	"sync"
	"time"
)

// The mirror (SPEC §6): every payload appended to the stream is PUBLISHed
// on the mirror channel too, when and only when its entry is appended. The
// run gives its replicas a channel of its own (--events-sse-channel) and
// subscribes to it before the first replica starts, on a direct link to
// Redis (the redis-outage fault cuts only the replicas' links). Pub/Sub
// keeps nothing, so the check is only as good as that subscription: should
// the harness's own connection drop, what the mirror carried is reported as
// a figure, not judged.

// mirror is the harness's subscription to the run's mirror channel.
type mirror struct {
	channel string
	conn    net.Conn
	pong    chan carried  // what was carried when a PING was answered: the barrier
	done    chan struct{} // the reader returned

	wmu sync.Mutex // writes to conn

	mu       sync.Mutex
	counts   map[string]int // payload -> messages received
	received int
	dropped  error // why the subscription ended before close, nil while it holds
	closed   bool
}

// carried is what the mirror carried up to a point: payload -> messages,
// and their total.
type carried struct {
	counts   map[string]int
	received int
}

// subscribeMirror subscribes to channel on the Redis at addr and returns
// once Redis confirmed the subscription.
func subscribeMirror(ctx context.Context, addr, channel string) (*mirror, error) {
	var d net.Dialer
	cctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	c, err := d.DialContext(cctx, "tcp", addr)
	if err != nil {
		return nil, err
	}
	m := &mirror{channel: channel, conn: c, pong: make(chan carried, 1), done: make(chan struct{}), counts: map[string]int{}}
	_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	r := bufio.NewReader(c)
	if err := writeCommand(c, "SUBSCRIBE", channel); err != nil {
		c.Close()
		return nil, err
	}
	v, err := readReply(r)
	if err != nil {
		c.Close()
		return nil, fmt.Errorf("subscribe to %s: %w", channel, err)
	}
	if kind, _ := pubsubReply(v); kind != "subscribe" {
		c.Close()
		return nil, fmt.Errorf("subscribe to %s: unexpected reply %v", channel, v)
	}
	_ = c.SetDeadline(time.Time{})
	go m.read(r)
	return m, nil
}

// pubsubReply splits a reply in subscribed mode: its kind (message, pong,
// subscribe, ...) and its last element (a message's payload).
func pubsubReply(v any) (kind, last string) {
	arr, ok := v.([]any)
	if !ok || len(arr) < 2 {
		return "", ""
	}
	kind, _ = arr[0].(string)
	last, _ = arr[len(arr)-1].(string)
	return kind, last
}

// read counts the messages until the connection ends.
func (m *mirror) read(r *bufio.Reader) {
	defer close(m.done)
	for {
		v, err := readReply(r)
		if err != nil {
			m.mu.Lock()
			if !m.closed {
				m.dropped = fmt.Errorf("%s: %w", time.Now().Format("15:04:05.000"), err)
			}
			m.mu.Unlock()
			return
		}
		switch kind, last := pubsubReply(v); kind {
		case "message":
			m.mu.Lock()
			m.counts[last]++
			m.received++
			m.mu.Unlock()
		case "pong":
			select {
			case m.pong <- m.snapshot():
			default:
			}
		}
	}
}

// barrier returns what the mirror carried up to the moment Redis answered
// a PING on the subscribed connection: the answer comes after every
// message published before it.
func (m *mirror) barrier(ctx context.Context) (carried, error) {
	if err := m.err(); err != nil {
		return carried{}, err
	}
	select { // a stale answer from an earlier barrier that timed out
	case <-m.pong:
	default:
	}
	m.wmu.Lock()
	err := writeCommand(m.conn, "PING")
	m.wmu.Unlock()
	if err != nil {
		return carried{}, err
	}
	t := time.NewTimer(10 * time.Second)
	defer t.Stop()
	select {
	case c := <-m.pong:
		return c, nil
	case <-m.done:
		return carried{}, m.err()
	case <-t.C:
		return carried{}, errors.New("no answer to PING on the mirror subscription within 10s")
	case <-ctx.Done():
		return carried{}, ctx.Err()
	}
}

func (m *mirror) err() error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.dropped != nil {
		return fmt.Errorf("the harness's mirror subscription dropped at %w", m.dropped)
	}
	return nil
}

// snapshot is what the mirror carried so far.
func (m *mirror) snapshot() carried {
	m.mu.Lock()
	defer m.mu.Unlock()
	out := make(map[string]int, len(m.counts))
	for k, v := range m.counts {
		out[k] = v
	}
	return carried{counts: out, received: m.received}
}

func (m *mirror) close() {
	m.mu.Lock()
	m.closed = true
	m.mu.Unlock()
	m.conn.Close()
	<-m.done
}

// compareMirror holds what the mirror carried against every entry appended
// to the stream (read up to the same barrier): each payload as many times on
// the mirror as in the stream. It returns the disagreements and how many
// stream entries the mirror carried.
func compareMirror(stream []streamEntry, got map[string]int) (problems []string, carried int) {
	want := map[string]int{}
	for _, se := range stream {
		want[se.Payload]++
	}
	for _, p := range sortedKeys(want, func(a, b string) bool { return a < b }) {
		n, g := want[p], got[p]
		carried += min(n, g)
		switch {
		case g < n:
			problems = append(problems, fmt.Sprintf("appended %d times, on the mirror %d times: %s", n, g, p))
		case g > n:
			problems = append(problems, fmt.Sprintf("on the mirror %d times, appended %d times: %s", g, n, p))
		}
	}
	var extra []string
	for p, g := range got {
		if want[p] == 0 {
			extra = append(extra, fmt.Sprintf("on the mirror %d times, never appended to the stream: %s", g, p))
		}
	}
	sort.Strings(extra)
	return append(problems, extra...), carried
}
