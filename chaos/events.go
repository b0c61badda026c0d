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
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/google/uuid"

	"github.com/vigil-sh/vigil/internal/cpconsumer"
	"github.com/vigil-sh/vigil/internal/ids"
)

// Events (SPEC §6). The checks switch on by themselves when `vigil run -h`
// offers --events-redis-url: the run then gives every replica a Redis link
// through a fault proxy of its own (the redis-outage fault cuts or
// blackholes them; the machine's Redis is never stopped) and a stream key of
// the run's own, installs instruments that keep a copy of every committed
// outbox row with its transaction and commit order and the transaction of
// every audit row (eventInstruments), reads the stream as it goes (so
// MAXLEN trimming hides nothing), and at the end, once the outbox drained,
// holds the stream against the committed changes:
//
//   - every audit row SPEC §6 says publishes has its event, written in its
//     transaction for its resource, and that event is in the stream (else
//     lost);
//   - no vigil_id is in the stream twice, and no audit row has two events
//     (else duplicated);
//   - nothing is in the stream or the outbox without a committed change
//     (else spurious), and every payload says what its change was;
//   - per shard, the stream holds the events in commit order.

// eventsCheck is the run's view of the event stream.
type eventsCheck struct {
	redis     string // host:port
	db        int
	stream    string
	channel   string        // the mirror channel given to the replicas, "" without a mirror
	mirror    *mirror       // the harness's subscription to it
	markerTTL time.Duration // given to every replica: longer than the run, so no dedup marker expires during it
	keyTTL    time.Duration // the stream key expires after this, should the harness die before dropping it

	mu      sync.Mutex
	entries []streamEntry
	lastID  string
	readErr error
}

// streamEntry is one entry of the stream as the checker needs it.
type streamEntry struct {
	ID        string // the stream id
	VigilID   string
	Payload   string // as published: what the mirror must carry too
	Event     string
	Outcome   string
	Resource  string // resource.id
	Type      string // resource.type
	Team      string // team_id
	Timestamp string
	Actor     string // actor.type
	Reason    string // metadata.reason
	Error     string
	// Refused is why the control plane would not read or deliver the
	// payload (cpconsumer.Check), "" when it would.
	Refused string
}

// at is when Redis appended the entry (its id's milliseconds).
func (se streamEntry) at() time.Time {
	msPart, _, _ := strings.Cut(se.ID, "-")
	n, err := strconv.ParseInt(msPart, 10, 64)
	if err != nil {
		return time.Time{}
	}
	return time.UnixMilli(n)
}

// auditEvent is a committed audit row that SPEC §6 says publishes an event.
type auditEvent struct {
	auditID  uuid.UUID
	txid     int64
	event    string // the event SPEC §6 says it publishes
	outcome  string // and that event's outcome ("" for none)
	resType  string
	resID    string
	team     uuid.UUID
	action   string
	reason   string    // metadata.reason
	phase    string    // metadata.phase
	errText  string    // metadata.error
	writtenT time.Time // created_at
}

// outboxRow is a committed vigil_events row (the harness's copy).
type outboxRow struct {
	vigilID     string
	seq         int64
	shard       int
	event       string // the row's event column
	txid        int64
	commitSeq   int64
	committedAt time.Time
	payload     streamEntry // the payload parsed as the stream entry would carry it
}

// eventsSupported reports whether the vigil binary has events.
func eventsSupported(ctx context.Context, bin string) (bool, error) {
	return runFlag(ctx, bin, "-events-redis-url")
}

// runFlag reports whether `vigil run -h` offers flag.
func runFlag(ctx context.Context, bin, flag string) (bool, error) {
	out, _ := exec.CommandContext(ctx, bin, "run", "-h").CombinedOutput()
	if len(out) == 0 {
		return false, fmt.Errorf("%s run -h printed nothing", bin)
	}
	return strings.Contains(string(out), flag), nil
}

// detectEvents turns the events checks on when the binary has events:
// Redis must answer, and the instruments go into the run's database.
func detectEvents(ctx context.Context, e *env) (*eventsCheck, error) {
	ok, err := eventsSupported(ctx, e.vigilBin)
	if err != nil || !ok {
		e.logf("events: vigil has no --events-redis-url (SPEC §6, issue 8): event checks off")
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
	life := e.cfg.Duration + e.cfg.Quiet + 30*time.Minute
	key := fmt.Sprintf("vigil-chaos:%d:%d", e.cfg.Seed, time.Now().UnixNano())
	ec := &eventsCheck{redis: u.Host, db: db, lastID: "-", stream: key + ":events",
		markerTTL: life.Truncate(time.Minute) + time.Minute, keyTTL: life + time.Hour}
	if _, err := ec.do(ctx, "PING"); err != nil {
		return nil, fmt.Errorf("events: Redis at %s: %w", u.Host, err)
	}
	if _, err := e.db.Exec(ctx, eventInstruments); err != nil {
		return nil, fmt.Errorf("events: install the harness's instruments: %w", err)
	}
	if ok, _ := runFlag(ctx, e.vigilBin, "-events-sse-channel"); ok {
		ec.channel = key + ":sse"
		if ec.mirror, err = subscribeMirror(ctx, u.Host, ec.channel); err != nil {
			return nil, fmt.Errorf("events: subscribe to the mirror channel: %w", err)
		}
	}
	e.logf("events: on, stream %s on %s (marker TTL %s), mirror channel %q subscribed, every replica through a Redis proxy of its own",
		ec.stream, u.Host, ec.markerTTL, ec.channel)
	return ec, nil
}

// settledRead reads the stream and, with a mirror, what the mirror carried
// up to the same point: the stream is read before and after a barrier on
// the subscription, until no entry was appended between the two reads
// (every append publishes in the same script, so what the mirror carried
// at the barrier covers exactly the entries read). mirrorErr says why the
// mirror cannot be judged (its subscription dropped, or the stream never
// held still).
func (ec *eventsCheck) settledRead(ctx context.Context) (stream []streamEntry, readErr error, got carried, mirrorErr error) {
	read := func() {
		ec.poll(ctx)
		ec.mu.Lock()
		stream, readErr = append([]streamEntry(nil), ec.entries...), ec.readErr
		ec.mu.Unlock()
	}
	read()
	if ec.mirror == nil {
		return stream, readErr, got, nil
	}
	mirrorErr = errors.New("the stream kept growing across 5 barriers")
	for i := 0; i < 5; i++ {
		n := len(stream)
		c, err := ec.mirror.barrier(ctx)
		read()
		if err != nil {
			mirrorErr = err
			break
		}
		if len(stream) == n {
			got, mirrorErr = c, nil
			break
		}
	}
	if mirrorErr != nil {
		got = ec.mirror.snapshot()
	}
	return stream, readErr, got, mirrorErr
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
		ec.readErr = nil
		for _, it := range items {
			if se, ok := parseStreamEntry(it); ok {
				ec.entries = append(ec.entries, se)
				ec.lastID = se.ID
			}
		}
		ec.mu.Unlock()
		if len(items) < 1000 {
			if len(items) > 0 {
				// Should the harness die before it drops the stream, the
				// key still goes (XADD keeps a key's expiry).
				_, _ = ec.do(ctx, "EXPIRE", ec.stream, strconv.Itoa(int(ec.keyTTL/time.Second)), "NX")
			}
			return
		}
	}
}

// entriesAdded is how many entries were ever appended to the stream
// (XINFO STREAM's entries-added, Redis 7), -1 if Redis does not say.
func (ec *eventsCheck) entriesAdded(ctx context.Context) (int64, error) {
	v, err := ec.do(ctx, "XINFO", "STREAM", ec.stream)
	if err != nil {
		if strings.Contains(err.Error(), "no such key") {
			return 0, nil
		}
		return -1, err
	}
	kv, _ := v.([]any)
	for i := 0; i+1 < len(kv); i += 2 {
		if k, _ := kv[i].(string); k == "entries-added" {
			n, _ := kv[i+1].(int64)
			return n, nil
		}
	}
	return -1, nil
}

func (ec *eventsCheck) run(ctx context.Context) {
	t := time.NewTicker(time.Second)
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

// drop deletes the run's stream and its deduplication markers
// (<stream>:vigil_id:<uuid>); nothing else in Redis is touched.
func (ec *eventsCheck) drop(ctx context.Context) {
	_, _ = ec.do(ctx, "DEL", ec.stream)
	cursor := "0"
	for i := 0; i < 100000; i++ {
		v, err := ec.do(ctx, "SCAN", cursor, "MATCH", ec.stream+":vigil_id:*", "COUNT", "1000")
		if err != nil {
			return
		}
		pair, _ := v.([]any)
		if len(pair) != 2 {
			return
		}
		cursor, _ = pair[0].(string)
		keys, _ := pair[1].([]any)
		if len(keys) > 0 {
			args := []string{"UNLINK"}
			for _, k := range keys {
				if s, ok := k.(string); ok {
					args = append(args, s)
				}
			}
			_, _ = ec.do(ctx, args...)
		}
		if cursor == "0" || cursor == "" {
			return
		}
	}
}

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
			se.parsePayload(val)
		}
	}
	return se, true
}

// parsePayload fills the entry's payload fields from the JSON, read
// leniently, and says in Refused why the control plane's own reading
// (strict keys, its encoder's bytes, its dispatcher's filters) would not
// deliver it.
func (se *streamEntry) parsePayload(val string) {
	se.Payload = val
	var p struct {
		Event     string `json:"event"`
		Outcome   string `json:"outcome"`
		Timestamp string `json:"timestamp"`
		TeamID    string `json:"team_id"`
		Actor     struct {
			Type string `json:"type"`
		} `json:"actor"`
		Resource struct {
			ID   string `json:"id"`
			Type string `json:"type"`
		} `json:"resource"`
		Metadata struct {
			Reason string `json:"reason"`
		} `json:"metadata"`
		Error string `json:"error"`
	}
	if err := json.Unmarshal([]byte(val), &p); err != nil {
		se.Refused = "not JSON: " + err.Error()
		return
	}
	se.Event, se.Outcome, se.Resource, se.Type = p.Event, p.Outcome, p.Resource.ID, p.Resource.Type
	se.Team, se.Timestamp, se.Actor = p.TeamID, p.Timestamp, p.Actor.Type
	se.Reason, se.Error = p.Metadata.Reason, p.Error
	if _, err := cpconsumer.Check(val); err != nil {
		se.Refused = err.Error()
	}
}

// transientTimeoutError is the error text SPEC §6 gives the events of the
// two error changes (and their audit rows' metadata.error).
const transientTimeoutError = "transient state did not settle within grace period"

// expectedEvent maps an audit row vigil wrote (its resource type, action,
// metadata.reason and metadata.phase) to the event SPEC §6 says it
// publishes and that event's outcome; event "" for none.
func expectedEvent(resourceType, action, reason, phase string) (event, outcome string) {
	if resourceType == "host" {
		if action == "marked_down" {
			return "host.down", "" // host audit rows exist only for hosts with a team
		}
		return "", ""
	}
	if resourceType != "sandbox" {
		return "", ""
	}
	switch action {
	case "pause":
		switch reason {
		case "restored_after_host_recovery", "host_state_sync", "transient_timeout_inferred":
			return "capsule.pause", "success"
		}
	case "destroy":
		switch reason {
		case "orphaned", "transient_timeout_inferred", "paused_zombie_cleanup", "destroy_retry":
			return "capsule.destroy", "success"
		}
	case "error":
		switch phase {
		case "create":
			return "capsule.create", "error"
		case "resume":
			return "capsule.resume", "error"
		}
	}
	return "", ""
}

// eventResult is the events check's verdict.
type eventResult struct {
	Expected   int // audit rows that publish an event
	Committed  int // outbox rows committed
	Published  int // distinct vigil_ids in the stream
	Lost       []string
	Duplicates []string
	Spurious   []string
	BadPayload []string
	OutOfOrder []string
	Delays     []eventDelay // per published event: commit -> XADD
}

// eventDelay is how long one event waited in the outbox.
type eventDelay struct {
	committed, published time.Time
}

func (d eventDelay) wait() time.Duration { return max(d.published.Sub(d.committed), 0) }

// eventKey is a change's event as the checker matches it: the transaction
// that committed it, the event and its resource.
type eventKey struct {
	txid                  int64
	event, resType, resID string
}

func (k eventKey) String() string { return k.event + " " + k.resID }

// compareEvents holds the stream against the committed changes (audit rows
// that publish) and the committed outbox rows; it is a pure function of
// the three.
func compareEvents(audits []auditEvent, outbox []outboxRow, stream []streamEntry) eventResult {
	res := eventResult{Expected: len(audits), Committed: len(outbox)}
	// Changes and their events, matched by transaction and resource.
	want := map[eventKey][]auditEvent{}
	for _, a := range audits {
		k := eventKey{a.txid, a.event, a.resType, a.resID}
		want[k] = append(want[k], a)
	}
	sorted := append([]outboxRow(nil), outbox...)
	sort.SliceStable(sorted, func(i, j int) bool { return sorted[i].seq < sorted[j].seq })
	got := map[eventKey][]outboxRow{}
	byID := map[string]outboxRow{}
	for _, o := range sorted {
		if prev, ok := byID[o.vigilID]; ok {
			res.Duplicates = append(res.Duplicates, fmt.Sprintf("vigil_id %s committed twice (outbox seq %d and %d)", o.vigilID, prev.seq, o.seq))
			continue
		}
		byID[o.vigilID] = o
		k := eventKey{o.txid, o.payload.Event, o.payload.Type, o.payload.Resource}
		got[k] = append(got[k], o)
	}
	backed := map[string]auditEvent{} // vigil_id -> the change it announces
	for k, as := range want {
		rows := got[k]
		for i, a := range as {
			if i < len(rows) {
				backed[rows[i].vigilID] = a
				continue
			}
			res.Lost = append(res.Lost, fmt.Sprintf("%s: change committed (audit %s/%s %s) with no event in its transaction", k, a.action, a.reason, a.auditID))
		}
	}
	for k, rows := range got {
		n := len(want[k])
		for _, o := range rows[min(n, len(rows)):] {
			if n > 0 {
				res.Duplicates = append(res.Duplicates, fmt.Sprintf("%s: a second event (vigil_id %s) for one change", k, o.vigilID))
			} else {
				res.Spurious = append(res.Spurious, fmt.Sprintf("%s: event committed (vigil_id %s) without a change that publishes", k, o.vigilID))
			}
		}
	}
	// The stream.
	seen := map[string]int{}
	lastRank := map[int]int{}    // shard -> rank of the last event appended
	lastWhat := map[int]string{} // shard -> that event
	rank := commitRanks(sorted)  // vigil_id -> position in its shard's commit order
	for _, se := range stream {
		seen[se.VigilID]++
		if seen[se.VigilID] == 2 {
			res.Duplicates = append(res.Duplicates, fmt.Sprintf("vigil_id %s (%s %s) in the stream twice", se.VigilID, se.Event, se.Resource))
		}
		if seen[se.VigilID] > 1 {
			continue
		}
		res.Published++
		o, ok := byID[se.VigilID]
		if !ok {
			res.Spurious = append(res.Spurious, fmt.Sprintf("%s %s (vigil_id %s, stream id %s) in the stream without a committed event", se.Event, se.Resource, se.VigilID, se.ID))
			continue
		}
		if se.Payload != o.payload.Payload || se.Event != o.event {
			res.BadPayload = append(res.BadPayload, fmt.Sprintf("vigil_id %s: the stream carries %s, the outbox row (event %s) %s", se.VigilID, se.Payload, o.event, o.payload.Payload))
		}
		if a, ok := backed[se.VigilID]; ok {
			if p := payloadProblem(se, a); p != "" {
				res.BadPayload = append(res.BadPayload, fmt.Sprintf("%s %s (vigil_id %s): %s", se.Event, se.Resource, se.VigilID, p))
			}
		} else if se.Refused != "" {
			res.BadPayload = append(res.BadPayload, fmt.Sprintf("%s %s (vigil_id %s): the control plane would not deliver it: %s", se.Event, se.Resource, se.VigilID, se.Refused))
		}
		if r, ok := rank[se.VigilID]; ok {
			if last, ok := lastRank[o.shard]; ok && r < last {
				res.OutOfOrder = append(res.OutOfOrder, fmt.Sprintf("shard %d: %s %s (commit %d) appended after %s, committed later", o.shard, se.Event, se.Resource, o.commitSeq, lastWhat[o.shard]))
			} else {
				lastRank[o.shard] = r
				lastWhat[o.shard] = fmt.Sprintf("%s %s (commit %d)", se.Event, se.Resource, o.commitSeq)
			}
		}
		res.Delays = append(res.Delays, eventDelay{committed: o.committedAt, published: se.at()})
	}
	for _, o := range sorted {
		a, ok := backed[o.vigilID]
		if ok && seen[o.vigilID] == 0 {
			res.Lost = append(res.Lost, fmt.Sprintf("%s %s: committed (vigil_id %s, shard %d, audit %s/%s) but not in the stream", o.payload.Event, o.payload.Resource, o.vigilID, o.shard, a.action, a.reason))
		}
	}
	sort.Strings(res.Lost)
	sort.Strings(res.Duplicates)
	sort.Strings(res.Spurious)
	return res
}

// commitRanks orders each shard's committed events: by their transaction's
// commit (the first commit_seq of its rows), then by seq within it.
func commitRanks(outbox []outboxRow) map[string]int {
	txCommit := map[int64]int64{}
	for _, o := range outbox {
		if c, ok := txCommit[o.txid]; !ok || o.commitSeq < c {
			txCommit[o.txid] = o.commitSeq
		}
	}
	byShard := map[int][]outboxRow{}
	for _, o := range outbox {
		byShard[o.shard] = append(byShard[o.shard], o)
	}
	out := map[string]int{}
	for _, rows := range byShard {
		sort.SliceStable(rows, func(i, j int) bool {
			ci, cj := txCommit[rows[i].txid], txCommit[rows[j].txid]
			if ci != cj {
				return ci < cj
			}
			return rows[i].seq < rows[j].seq
		})
		for i, o := range rows {
			if _, ok := out[o.vigilID]; !ok {
				out[o.vigilID] = i
			}
		}
	}
	return out
}

// payloadProblem checks a stream entry's payload against the change it
// announces (SPEC §6's shape and values, and the control plane's reading of
// it), "" if it is right.
func payloadProblem(se streamEntry, a auditEvent) string {
	if se.Refused != "" {
		return "the control plane would not deliver it: " + se.Refused
	}
	if p := valueProblem(se, a); p != "" {
		return p
	}
	switch {
	case se.Team != ids.Team(a.team):
		return fmt.Sprintf("team_id %q, the change's team is %s", se.Team, ids.Team(a.team))
	case se.Actor != "system":
		return fmt.Sprintf("actor type %q, want system", se.Actor)
	case se.Type != a.resType:
		return fmt.Sprintf("resource type %q, the audit row's is %q", se.Type, a.resType)
	}
	ts, err := time.Parse(time.RFC3339, se.Timestamp)
	switch {
	case err != nil:
		return fmt.Sprintf("timestamp %q is not RFC 3339", se.Timestamp)
	case !strings.HasSuffix(se.Timestamp, "Z") || ts.Nanosecond() != 0 || strings.Contains(se.Timestamp, "."):
		return fmt.Sprintf("timestamp %q is not UTC in seconds", se.Timestamp)
	}
	return ""
}

// valueProblem checks the event's name, outcome, metadata.reason and error
// against the audit row of its change, "" if they agree.
func valueProblem(se streamEntry, a auditEvent) string {
	wantReason, wantErr := a.reason, ""
	if a.event == "host.down" {
		wantReason = "" // host.down carries no metadata
	}
	if a.outcome == "error" {
		wantErr = transientTimeoutError
		if a.errText != wantErr {
			return fmt.Sprintf("the audit row's metadata.error is %q, SPEC §6 says %q", a.errText, wantErr)
		}
	}
	switch {
	case se.Event != a.event:
		return fmt.Sprintf("event %q, the audit row %s/%s (phase %q) publishes %q", se.Event, a.action, a.reason, a.phase, a.event)
	case se.Outcome != a.outcome:
		return fmt.Sprintf("outcome %q, want %q", se.Outcome, a.outcome)
	case se.Reason != wantReason:
		return fmt.Sprintf("metadata.reason %q, the audit row's is %q", se.Reason, wantReason)
	case se.Error != wantErr:
		return fmt.Sprintf("error %q, want %q", se.Error, wantErr)
	}
	return ""
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
