package chaos

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/url"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"time"
)

// Events (SPEC §6) are not in vigil yet (issue 8). The checks below switch
// on by themselves once `vigil run -h` offers --events-redis-url: the run
// then gives every replica a Redis link through a fault proxy and a stream
// key of its own, reads the stream as it goes (so MAXLEN trimming hides
// nothing), and at the end compares it with the audit rows that SPEC §6
// says publish an event: every one must be in the stream exactly once (by
// vigil_id), and nothing else may be.

// eventsCheck is the run's view of the event stream.
type eventsCheck struct {
	redis  string // host:port
	db     int
	stream string

	mu      sync.Mutex
	entries []streamEntry
	lastID  string
	readErr error
}

// streamEntry is one entry of the stream as the checker needs it.
type streamEntry struct {
	ID       string // the stream id
	VigilID  string
	Event    string
	Resource string // resource.id
	Type     string // resource.type
}

// eventKey is what an event is about; several events can share one.
type eventKey struct {
	Event, Resource string
}

// eventsSupported reports whether the vigil binary has events.
func eventsSupported(ctx context.Context, bin string) (bool, error) {
	out, _ := exec.CommandContext(ctx, bin, "run", "-h").CombinedOutput()
	if len(out) == 0 {
		return false, fmt.Errorf("%s run -h printed nothing", bin)
	}
	return strings.Contains(string(out), "-events-redis-url"), nil
}

// detectEvents turns the events checks on when the binary has events.
func detectEvents(ctx context.Context, e *env) (*eventsCheck, error) {
	ok, err := eventsSupported(ctx, e.vigilBin)
	if err != nil || !ok {
		e.logf("events: vigil has no --events-redis-url yet (SPEC §6, issue 8): event checks off")
		return nil, err
	}
	u, err := url.Parse(e.cfg.RedisURL)
	if err != nil {
		return nil, fmt.Errorf("redis URL: %w", err)
	}
	db := 0
	if p := strings.Trim(u.Path, "/"); p != "" {
		if db, err = strconv.Atoi(p); err != nil {
			return nil, fmt.Errorf("redis URL database %q: %w", p, err)
		}
	}
	ec := &eventsCheck{redis: u.Host, db: db, stream: "chaos:" + e.cluster + ":events", lastID: "-"}
	if _, err := ec.do(ctx, "PING"); err != nil {
		return nil, fmt.Errorf("events: Redis at %s: %w", u.Host, err)
	}
	e.logf("events: on, stream %s on %s", ec.stream, u.Host)
	return ec, nil
}

// poll reads the entries appended since the last read.
func (ec *eventsCheck) poll(ctx context.Context) {
	for {
		ec.mu.Lock()
		start := ec.lastID
		ec.mu.Unlock()
		if start != "-" {
			start = "(" + start
		}
		v, err := ec.do(ctx, "XRANGE", ec.stream, start, "+", "COUNT", "1000")
		if err != nil {
			ec.mu.Lock()
			ec.readErr = err
			ec.mu.Unlock()
			return
		}
		items, _ := v.([]any)
		ec.mu.Lock()
		for _, it := range items {
			if se, ok := parseStreamEntry(it); ok {
				ec.entries = append(ec.entries, se)
				ec.lastID = se.ID
			}
		}
		ec.mu.Unlock()
		if len(items) < 1000 {
			return
		}
	}
}

func (ec *eventsCheck) run(ctx context.Context) {
	t := time.NewTicker(2 * time.Second)
	defer t.Stop()
	for {
		ec.poll(ctx)
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// drop deletes the run's stream.
func (ec *eventsCheck) drop(ctx context.Context) { _, _ = ec.do(ctx, "DEL", ec.stream) }

func parseStreamEntry(v any) (streamEntry, bool) {
	pair, ok := v.([]any)
	if !ok || len(pair) != 2 {
		return streamEntry{}, false
	}
	id, _ := pair[0].(string)
	fields, _ := pair[1].([]any)
	se := streamEntry{ID: id}
	for i := 0; i+1 < len(fields); i += 2 {
		k, _ := fields[i].(string)
		val, _ := fields[i+1].(string)
		switch k {
		case "vigil_id":
			se.VigilID = val
		case "payload":
			var p struct {
				Event    string `json:"event"`
				Resource struct {
					ID   string `json:"id"`
					Type string `json:"type"`
				} `json:"resource"`
			}
			if json.Unmarshal([]byte(val), &p) == nil {
				se.Event, se.Resource, se.Type = p.Event, p.Resource.ID, p.Resource.Type
			}
		}
	}
	return se, true
}

// expectedEvent maps an audit row vigil wrote to the event SPEC §6 says it
// publishes, "" for none.
func expectedEvent(resourceType, action, reason string, hostHasTeam bool) string {
	switch {
	case resourceType == "host" && action == "marked_down":
		return "host.down" // host audit rows exist only for hosts with a team
	case resourceType == "sandbox" && action == "pause" &&
		(reason == "restored_after_host_recovery" || reason == "host_state_sync" || reason == "transient_timeout_inferred"):
		return "capsule.paused"
	case resourceType == "sandbox" && action == "destroy" &&
		(reason == "orphaned" || reason == "transient_timeout_inferred" || reason == "paused_zombie_cleanup"):
		return "capsule.destroyed"
	}
	return ""
}

// eventResult is the events check's verdict.
type eventResult struct {
	Expected, Published int
	Lost                []eventKey // committed (audit row) but not in the stream, one per missing event
	Duplicates          []string   // vigil_ids in the stream more than once
	Spurious            []eventKey // in the stream more often than committed
}

// compareEvents holds the stream against the committed changes: per
// (event, resource) the stream must hold as many distinct vigil_ids as
// there are audit rows, and no vigil_id twice.
func compareEvents(expected []eventKey, stream []streamEntry) eventResult {
	res := eventResult{Expected: len(expected), Published: len(stream)}
	want := map[eventKey]int{}
	for _, k := range expected {
		want[k]++
	}
	seen := map[string]int{}
	got := map[eventKey]int{}
	for _, se := range stream {
		seen[se.VigilID]++
		if seen[se.VigilID] == 2 {
			res.Duplicates = append(res.Duplicates, se.VigilID)
		}
		if seen[se.VigilID] == 1 {
			got[eventKey{se.Event, se.Resource}]++
		}
	}
	for k, n := range want {
		for i := got[k]; i < n; i++ {
			res.Lost = append(res.Lost, k)
		}
	}
	for k, n := range got {
		for i := want[k]; i < n; i++ {
			res.Spurious = append(res.Spurious, k)
		}
	}
	return res
}

// ---------------------------------------------------------------------------
// a minimal RESP2 client: enough for PING, XRANGE and DEL, so the harness
// needs no Redis library.

func (ec *eventsCheck) do(ctx context.Context, args ...string) (any, error) {
	var d net.Dialer
	cctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	c, err := d.DialContext(cctx, "tcp", ec.redis)
	if err != nil {
		return nil, err
	}
	defer c.Close()
	if dl, ok := cctx.Deadline(); ok {
		_ = c.SetDeadline(dl)
	}
	if ec.db != 0 {
		if err := writeCommand(c, "SELECT", strconv.Itoa(ec.db)); err != nil {
			return nil, err
		}
	}
	if err := writeCommand(c, args...); err != nil {
		return nil, err
	}
	r := bufio.NewReader(c)
	if ec.db != 0 {
		if _, err := readReply(r); err != nil {
			return nil, err
		}
	}
	return readReply(r)
}

func writeCommand(c net.Conn, args ...string) error {
	var b strings.Builder
	fmt.Fprintf(&b, "*%d\r\n", len(args))
	for _, a := range args {
		fmt.Fprintf(&b, "$%d\r\n%s\r\n", len(a), a)
	}
	_, err := c.Write([]byte(b.String()))
	return err
}

// readReply reads one RESP2 reply: strings, integers, nil, arrays.
func readReply(r *bufio.Reader) (any, error) {
	line, err := r.ReadString('\n')
	if err != nil {
		return nil, err
	}
	line = strings.TrimSuffix(line, "\r\n")
	if line == "" {
		return nil, errors.New("redis: empty reply line")
	}
	switch line[0] {
	case '+':
		return line[1:], nil
	case '-':
		return nil, errors.New("redis: " + line[1:])
	case ':':
		return strconv.ParseInt(line[1:], 10, 64)
	case '$':
		n, err := strconv.Atoi(line[1:])
		if err != nil || n < 0 {
			return nil, err
		}
		buf := make([]byte, n+2)
		if _, err := io.ReadFull(r, buf); err != nil {
			return nil, err
		}
		return string(buf[:n]), nil
	case '*':
		n, err := strconv.Atoi(line[1:])
		if err != nil || n < 0 {
			return nil, err
		}
		out := make([]any, n)
		for i := range out {
			if out[i], err = readReply(r); err != nil {
				return nil, err
			}
		}
		return out, nil
	}
	return nil, fmt.Errorf("redis: unexpected reply %q", line)
}
