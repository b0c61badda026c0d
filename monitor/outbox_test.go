package monitor_test

// The event outbox end to end (SPEC §6): real Postgres, real agents
// (agentsim over Connect), the machine's Redis with a stream of each test's
// own, the relay run by the shard's owner (Runner.Own).

import (
	"context"
	"encoding/json"
	"errors"
	"slices"
	"testing"
	"time"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/redis/go-redis/v9"

	"github.com/vigil-sh/vigil/agentsim"
	"github.com/vigil-sh/vigil/events"
	"github.com/vigil-sh/vigil/internal/cpconsumer"
	"github.com/vigil-sh/vigil/internal/faultproxy"
	"github.com/vigil-sh/vigil/internal/ids"
	"github.com/vigil-sh/vigil/internal/redistest"
	"github.com/vigil-sh/vigil/monitor"
	"github.com/vigil-sh/vigil/shard"
	"github.com/vigil-sh/vigil/store"
)

var redisAddr = redistest.Addr()

// eventsEnv is env with events on: its Reconciler writes the outbox and
// publishes to stream, through a fault proxy in front of the machine's Redis.
type eventsEnv struct {
	*env
	stream string
	rdb    *redis.Client // straight to Redis, for checks
	proxy  *faultproxy.Proxy
	mirror *redis.PubSub // subscribed to the test's mirror channel from the start
}

func newEventsEnv(t *testing.T, hosts int, batch int) *eventsEnv {
	t.Helper()
	e := newEnv(t, hosts, time.Second)
	rdb := redis.NewClient(&redis.Options{Addr: redisAddr})
	if err := rdb.Ping(e.ctx).Err(); err != nil {
		t.Fatalf("Redis at %s: %v", redisAddr, err)
	}
	proxy, err := faultproxy.New(redisAddr)
	if err != nil {
		t.Fatal(err)
	}
	stream := "vigil-test:" + t.Name() + ":" + uuid.NewString()[:8]
	pub, err := events.New(events.Config{URL: "redis://" + proxy.Addr() + "/0", Stream: stream, Mirror: stream + ":sse", Timeout: 500 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	mirror := rdb.Subscribe(e.ctx, pub.Mirror())
	if _, err := mirror.Receive(e.ctx); err != nil { // the subscription's confirmation
		t.Fatal(err)
	}
	t.Cleanup(func() {
		ctx := context.Background()
		mirror.Close()
		if keys, _ := rdb.Keys(ctx, stream+"*").Result(); len(keys) > 0 {
			rdb.Del(ctx, keys...)
		}
		pub.Close()
		proxy.Close()
		rdb.Close()
	})
	e.reg = prometheus.NewRegistry()
	e.rec, err = monitor.New(monitor.Config{Registerer: e.reg, Publisher: pub, Outbox: e.st, RelayBatch: batch}, e.st, e.hook)
	if err != nil {
		t.Fatal(err)
	}
	// The tests' writes go under a shard none of the hosts is in (of
	// relayShards), so relayAll's owner relays them without reconciling.
	used := map[int]bool{}
	for _, h := range e.hosts {
		used[shard.Of(h, relayShards)] = true
	}
	for used[e.fence.Shard] {
		e.fence.Shard++
	}
	if err := e.st.RaiseFence(e.ctx, e.fence); err != nil {
		t.Fatal(err)
	}
	return &eventsEnv{env: e, stream: stream, rdb: rdb, proxy: proxy, mirror: mirror}
}

// mirrored is every payload the mirror channel carried so far, in order.
// It publishes a marker of its own and reads up to it: Redis delivers a
// channel's messages in the order it processed the PUBLISHes, so everything
// published before the call arrives before the marker.
func (e *eventsEnv) mirrored() []string {
	e.t.Helper()
	marker := "marker-" + uuid.NewString()
	if err := e.rdb.Publish(e.ctx, e.stream+":sse", marker).Err(); err != nil {
		e.t.Fatal(err)
	}
	var out []string
	ch := e.mirror.Channel()
	timeout := time.After(10 * time.Second)
	for {
		select {
		case m := <-ch:
			if m.Payload == marker {
				return out
			}
			out = append(out, m.Payload)
		case <-timeout:
			e.t.Fatalf("mirror: marker not back within 10s (%d payloads so far)", len(out))
		}
	}
}

// relayShards is the shard count relayAll's owner runs with.
const relayShards = 64

// published is one stream entry, decoded.
type published struct {
	VigilID string
	Raw     string
	P       events.Payload
}

func (e *eventsEnv) stream_() []published {
	e.t.Helper()
	msgs, err := e.rdb.XRange(e.ctx, e.stream, "-", "+").Result()
	if err != nil {
		e.t.Fatal(err)
	}
	out := make([]published, 0, len(msgs))
	for _, m := range msgs {
		raw, _ := m.Values["payload"].(string)
		id, _ := m.Values["vigil_id"].(string)
		var p events.Payload
		if err := json.Unmarshal([]byte(raw), &p); err != nil {
			e.t.Fatalf("entry %s: payload %q: %v", m.ID, raw, err)
		}
		out = append(out, published{VigilID: id, Raw: raw, P: p})
	}
	return out
}

// outbox is the vigil_ids of the pending events, in commit order.
func (e *eventsEnv) outbox() []string {
	return e.ids(`select vigil_id::text from vigil_events order by seq`)
}

// journalEvents is the event ids the journal names, in commit order.
func (e *eventsEnv) journalEvents() []string {
	return e.ids(`select event_id::text from vigil_journal where event_id is not null order by seq`)
}

// ids runs a query of one text column.
func (e *eventsEnv) ids(query string) []string {
	e.t.Helper()
	rows, err := e.db.Query(e.ctx, query)
	if err != nil {
		e.t.Fatal(err)
	}
	out, err := pgx.CollectRows(rows, pgx.RowTo[string])
	if err != nil {
		e.t.Fatal(err)
	}
	return out
}

// relayAll owns shard s (as token) until its outbox is empty, then stops.
func (e *eventsEnv) relayAll(s int, token int64) {
	e.t.Helper()
	r := newRunner(e.t, e.env, relayShards, time.Hour)
	ctx, cancel := context.WithCancel(e.ctx)
	defer cancel()
	done := make(chan struct{})
	go func() { defer close(done); r.Run(ctx) }()
	own := make(chan error, 1)
	go func() { own <- r.Own(ctx, s, token) }()
	poll(e.t, 10*time.Second, "outbox relayed", func() bool {
		select {
		case err := <-own:
			e.t.Fatalf("Own ended: %v", err)
		default:
		}
		return len(e.outbox()) == 0
	})
	cancel()
	<-done
	if err := <-own; err != nil {
		e.t.Fatalf("Own: %v", err)
	}
}

// Every row of SPEC §6's table publishes its event with the exact payload;
// every other change publishes nothing; each event once, on the stream and
// on the mirror; and every payload is one the control plane's consumers
// read and deliver (strict decode, byte-exact re-encoding, the dispatcher's
// filters).
func TestEventsForEachChange(t *testing.T) {
	e := newEventsEnv(t, 3, 100)
	h, down, shared := e.hosts[0], e.hosts[1], e.hosts[2]
	const timeout = monitor.TransientTimeoutError
	type c struct {
		name                          string
		status                        string
		age                           time.Duration
		vm                            string
		event, outcome, reason, error string
	}
	cases := []c{
		{"missing absent -> stopped orphaned", "missing", young, "", "capsule.destroy", "success", "orphaned", ""},
		{"running absent -> stopped orphaned", "running", young, "", "capsule.destroy", "success", "orphaned", ""},
		{"missing paused -> paused restored", "missing", young, "paused", "capsule.pause", "success", "restored_after_host_recovery", ""},
		{"running paused on agent -> paused host_state_sync", "running", young, "paused", "capsule.pause", "success", "host_state_sync", ""},
		{"pausing gone past grace -> paused inferred", "pausing", old, "", "capsule.pause", "success", "transient_timeout_inferred", ""},
		{"stopping gone past grace -> stopped inferred", "stopping", old, "", "capsule.destroy", "success", "transient_timeout_inferred", ""},
		{"stopping alive past grace -> destroy re-sent -> stopped", "stopping", old, "running", "capsule.destroy", "success", "destroy_retry", ""},
		{"zombie destroyed on the agent", "stopped", young, "paused", "capsule.destroy", "success", "paused_zombie_cleanup", ""},
		{"starting gone past grace -> error", "starting", old, "", "capsule.create", "error", "transient_timeout", timeout},
		{"resuming gone past grace -> error", "resuming", old, "", "capsule.resume", "error", "transient_timeout", timeout},
		{"missing running -> running silent", "missing", young, "running", "", "", "", ""},
		{"starting alive -> running silent", "starting", young, "running", "", "", "", ""},
		{"snapshotting gone past grace -> error", "snapshotting", old, "", "", "", "", ""},
		{"snapshotting past snapshot grace -> paused", "snapshotting", ancient, "paused", "", "", "", ""},
		{"snapshotting past snapshot grace -> running", "snapshotting", ancient, "running", "", "", "", ""},
		{"paused absent untouched", "paused", ancient, "", "", "", "", ""},
	}
	rows := make([]uuid.UUID, len(cases))
	for i, c := range cases {
		rows[i] = e.sandbox(h, c.status, c.age, c.vm)
	}
	// A team host and a shared one (no team: no audit row, no event) go down.
	e.db.Exec(e.ctx, `update hosts set team_id = null where id = $1`, shared)
	e.sandbox(down, "running", young, "")
	e.setHeartbeat(down, time.Hour, false)
	e.setHeartbeat(shared, time.Hour, false)
	start := time.Now().Truncate(time.Second)
	e.reconcile(h)
	if _, err := e.rec.Passive(e.ctx, e.fence, []uuid.UUID{down, shared}); err != nil {
		t.Fatal(err)
	}
	if e.hostStatus(shared) != "unreachable" {
		t.Fatal("shared host not marked unreachable")
	}
	e.relayAll(e.fence.Shard, e.fence.Token+1)
	end := time.Now().Add(time.Second)

	type w struct {
		c
		typ  string
		team uuid.UUID
	}
	want := map[string]w{ids.Host(down): {c: c{event: "host.down"}, typ: "host", team: e.team(down)}}
	for i, c := range cases {
		if c.event != "" {
			want[ids.Sandbox(rows[i])] = w{c: c, typ: "sandbox", team: e.team(h)}
		}
	}
	got := e.stream_()
	seen := map[string]bool{}
	for _, p := range got {
		if seen[p.VigilID] {
			t.Errorf("vigil_id %s twice in the stream", p.VigilID)
		}
		seen[p.VigilID] = true
		if _, err := uuid.Parse(p.VigilID); err != nil {
			t.Errorf("vigil_id %q: %v", p.VigilID, err)
		}
		t.Logf("published %s", p.Raw)
		if _, err := cpconsumer.Check(p.Raw); err != nil {
			t.Errorf("the control plane would not deliver it: %v", err)
		}
		w, ok := want[p.P.Resource.ID]
		if !ok {
			t.Errorf("unexpected event %s", p.Raw)
			continue
		}
		delete(want, p.P.Resource.ID)
		ts, err := time.Parse(time.RFC3339, p.P.Timestamp)
		if err != nil || ts.Before(start) || ts.After(end) || ts.Location() != time.UTC {
			t.Errorf("%s: timestamp %q not RFC 3339 UTC seconds within the test (%v)", p.P.Resource.ID, p.P.Timestamp, err)
		}
		exact := `{"event":"` + w.event + `",`
		if w.outcome != "" {
			exact += `"outcome":"` + w.outcome + `",`
		}
		exact += `"timestamp":"` + p.P.Timestamp + `","team_id":"` + ids.Team(w.team) +
			`","actor":{"type":"system"},"resource":{"id":"` + p.P.Resource.ID + `","type":"` + w.typ + `"}`
		if w.reason != "" {
			exact += `,"metadata":{"reason":"` + w.reason + `"}`
		}
		if w.error != "" {
			exact += `,"error":"` + w.error + `"`
		}
		if exact += "}"; p.Raw != exact {
			t.Errorf("payload\n  %s\nwant\n  %s", p.Raw, exact)
		}
	}
	for rid, w := range want {
		t.Errorf("no %s event for %s", w.event, rid)
	}
	// The mirror carried each payload once, in the stream's order.
	mirrored := e.mirrored()
	if len(mirrored) != len(got) {
		t.Errorf("mirror carried %d payloads, the stream holds %d", len(mirrored), len(got))
	}
	for i := range min(len(mirrored), len(got)) {
		if mirrored[i] != got[i].Raw {
			t.Errorf("mirror message %d\n  %s\nstream entry\n  %s", i, mirrored[i], got[i].Raw)
		}
	}
	// The journal names every published event, and nothing else.
	je := e.journalEvents()
	if len(je) != len(got) {
		t.Errorf("journal names %d events, the stream holds %d", len(je), len(got))
	}
	for _, id := range je {
		if !seen[id] {
			t.Errorf("journal names event %s, not in the stream", id)
		}
	}
	// The error rows' audit metadata carries the event's error text.
	for i, c := range cases {
		if c.error == "" {
			continue
		}
		a := e.audits(ids.Sandbox(rows[i]))
		if len(a) != 1 || a[0].Meta["error"] != c.error {
			t.Errorf("%s: audit rows %+v, want metadata.error %q", c.name, a, c.error)
		}
	}
	if n := counter(t, e.reg, "vigil_events_published_total", "capsule.destroy"); n != 5 {
		t.Errorf("vigil_events_published_total{capsule.destroy} = %v, want 5", n)
	}
}

// A fenced reconcile and a fenced mark-down leave no event behind: events
// exist exactly when their change committed.
func TestFencedChangesWriteNoEvents(t *testing.T) {
	e := newEventsEnv(t, 1, 100)
	h := e.hosts[0]
	e.sandbox(h, "running", young, "")
	e.sandbox(h, "stopped", young, "paused")
	if err := e.st.RaiseFence(e.ctx, store.Fence{Shard: e.fence.Shard, Token: 200, Replica: "replica-b"}); err != nil {
		t.Fatal(err)
	}
	if _, err := e.rec.Reconcile(e.ctx, e.fence, []uuid.UUID{h}); !errors.Is(err, monitor.ErrFenced) {
		t.Fatalf("Reconcile = %v, want ErrFenced", err)
	}
	e.setHeartbeat(h, time.Hour, false)
	if _, err := e.passive(h); !errors.Is(err, monitor.ErrFenced) {
		t.Fatalf("Passive = %v, want ErrFenced", err)
	}
	if n := len(e.outbox()); n != 0 {
		t.Fatalf("%d events left by fenced transactions", n)
	}
	// A compare-and-set miss commits nothing either.
	e2 := newEventsEnv(t, 1, 100)
	h2 := e2.hosts[0]
	sb := e2.sandbox(h2, "running", young, "")
	e2.hook.afterList = func(uuid.UUID) {
		e2.db.Exec(e2.ctx, `update sandboxes set status = 'pausing', last_updated = now() where id = $1`, sb)
	}
	e2.reconcile(h2)
	if n := len(e2.outbox()); n != 0 {
		t.Fatalf("%d events after a compare-and-set miss", n)
	}
}

// Redis unreachable: reconciling goes on, events wait in Postgres (pending
// and age exported, errors counted); once Redis answers, the backlog reaches
// the stream once each, in commit order, across several batches.
func TestRedisOutageDelaysEventsOnly(t *testing.T) {
	e := newEventsEnv(t, 1, 3)
	h := e.hosts[0]
	s := shard.Of(h, 1)
	r := newRunner(t, e.env, 1, 200*time.Millisecond)
	e.proxy.Cut()
	own := runOwned(t, e.env, r, s, 100)
	var orphans []uuid.UUID
	var firstSeen time.Time // the first event was committed before this
	for i := 0; i < 10; i++ {
		sb := e.sandbox(h, "running", young, "")
		orphans = append(orphans, sb)
		poll(t, 10*time.Second, "orphan stopped while Redis is cut", func() bool { return e.status(sb) == "stopped" })
		if i == 0 {
			firstSeen = time.Now()
		}
	}
	poll(t, 10*time.Second, "publish errors counted", func() bool {
		return counter(t, e.reg, "vigil_event_publish_errors_total") > 0
	})
	pending := e.outbox()
	if len(pending) != len(orphans) {
		t.Fatalf("%d events pending, want %d", len(pending), len(orphans))
	}
	if je := e.journalEvents(); !slices.Equal(je, pending) {
		t.Fatalf("journal's events %v, outbox %v: not the same commit order", je, pending)
	}
	// The gauges are the relay's last look: its next retry sees all of them.
	poll(t, 15*time.Second, "vigil_events_pending = backlog", func() bool {
		n, ok := gauge(t, e.reg, "vigil_events_pending", s)
		return ok && n == float64(len(orphans))
	})
	poll(t, 5*time.Second, "oldest pending age exported", func() bool {
		age, ok := gauge(t, e.reg, "vigil_events_oldest_pending_age_seconds", s)
		return ok && age > 0
	})
	// The age is the oldest event's at the scrape, not at the relay's last
	// look (which may be a backoff of up to 10 s ago).
	waited := time.Since(firstSeen).Seconds()
	if age, _ := gauge(t, e.reg, "vigil_events_oldest_pending_age_seconds", s); age < waited {
		t.Errorf("oldest pending age %.2fs, but the first event has waited at least %.2fs", age, waited)
	}
	if got := e.stream_(); len(got) != 0 {
		t.Fatalf("%d entries published through a cut link", len(got))
	}
	e.proxy.Heal()
	poll(t, 20*time.Second, "backlog relayed after Redis came back", func() bool { return len(e.outbox()) == 0 })
	got := e.stream_()
	if len(got) != len(pending) {
		t.Fatalf("stream holds %d entries, want %d", len(got), len(pending))
	}
	for i, p := range got {
		if p.VigilID != pending[i] {
			t.Fatalf("entry %d is %s, want %s (commit order)", i, p.VigilID, pending[i])
		}
		if p.P.Resource.ID != ids.Sandbox(orphans[i]) {
			t.Errorf("entry %d about %s, want %s", i, p.P.Resource.ID, ids.Sandbox(orphans[i]))
		}
	}
	if n, _ := gauge(t, e.reg, "vigil_events_pending", s); n != 0 {
		t.Errorf("vigil_events_pending = %v after the backlog drained", n)
	}
	select {
	case err := <-own:
		t.Fatalf("Own ended: %v", err)
	default:
	}
}

// A relay that published and died before deleting (the outbox still holds
// the events) is followed by a new owner: within the marker TTL nothing is
// published twice.
func TestNewOwnerRepublishesNothingTwice(t *testing.T) {
	e := newEventsEnv(t, 1, 100)
	h := e.hosts[0]
	for i := 0; i < 5; i++ {
		e.sandbox(h, "running", young, "")
	}
	e.reconcile(h)
	pending := e.outbox()
	if len(pending) != 5 {
		t.Fatalf("%d events pending, want 5", len(pending))
	}
	// The dead owner's publish: the same events, straight through the
	// publisher, without the delete.
	pub, err := events.New(events.Config{URL: "redis://" + redisAddr + "/0", Stream: e.stream})
	if err != nil {
		t.Fatal(err)
	}
	defer pub.Close()
	var evs []events.Event
	rows, err := e.db.Query(e.ctx, `select vigil_id, event, payload from vigil_events order by seq`)
	if err != nil {
		t.Fatal(err)
	}
	for rows.Next() {
		var ev events.Event
		if err := rows.Scan(&ev.ID, &ev.Name, &ev.Payload); err != nil {
			t.Fatal(err)
		}
		evs = append(evs, ev)
	}
	rows.Close()
	if _, err := pub.Publish(e.ctx, evs[:3]); err != nil {
		t.Fatal(err)
	}
	e.relayAll(e.fence.Shard, e.fence.Token+1) // the successor
	got := e.stream_()
	if len(got) != 5 {
		t.Fatalf("stream holds %d entries, want 5", len(got))
	}
	for i, p := range got {
		if p.VigilID != pending[i] {
			t.Errorf("entry %d is %s, want %s", i, p.VigilID, pending[i])
		}
	}
}

// Rule 9 against a real agent: a stopping row alive on its agent past the
// grace gets DestroySandbox re-sent under the fence; the agent accepts it,
// and the row goes stopping -> stopped with one destroy_retry audit row and
// one capsule.destroy event. A re-send the agent refuses leaves the row
// stopping, writes nothing, and is not repeated within the grace.
func TestStuckDestroyIsResent(t *testing.T) {
	e := newEventsEnv(t, 2, 100)
	h, refusing := e.hosts[0], e.hosts[1]
	sb := e.sandbox(h, "stopping", old, "running")
	refused := e.sandbox(refusing, "stopping", old, "running")
	if err := e.sim.SetMode(refusing, agentsim.Mode{Kind: agentsim.ModeRefuseDestroy}); err != nil {
		t.Fatal(err)
	}
	outs, err := e.rec.Reconcile(e.ctx, e.fence, []uuid.UUID{h, refusing})
	if err != nil {
		t.Fatal(err)
	}
	byHost := map[uuid.UUID]monitor.Outcome{}
	for _, o := range outs {
		byHost[o.Host] = o
	}
	if o, r := byHost[h], byHost[refusing]; o.Resent != 1 || len(o.Applied) != 1 || r.Resent != 0 || len(r.Applied) != 0 {
		t.Fatalf("outcomes %+v, want one destroy re-sent and accepted, one refused", outs)
	}
	d := e.sim.Destroys(h)
	if len(d) != 1 || d[0].Sandbox != ids.Sandbox(sb) || !d[0].Fenced || d[0].Token != e.fence.Token {
		t.Fatalf("agent saw destroys %+v", d)
	}
	if r := e.sim.RejectedDestroys(refusing); len(r) != 1 || r[0].Result != agentsim.DestroyRefused {
		t.Fatalf("refusing agent saw %+v", r)
	}
	if e.status(sb) != "stopped" {
		t.Fatalf("accepted re-send: row %s, want stopped", e.status(sb))
	}
	if e.status(refused) != "stopping" {
		t.Fatalf("refused re-send: row %s, want still stopping", e.status(refused))
	}
	e.wantAudit(sb, "sandbox", "destroy", "warning", "destroy_retry")
	if a := e.audits(ids.Sandbox(refused)); len(a) != 0 {
		t.Fatalf("refused re-send wrote audit rows %+v", a)
	}
	if n := counter(t, e.reg, "vigil_destroys_resent_total"); n != 1 {
		t.Errorf("vigil_destroys_resent_total = %v, want 1", n)
	}
	// Within the grace the refused one is not sent again, even once the
	// agent would take it.
	if err := e.sim.SetMode(refusing, agentsim.Mode{}); err != nil {
		t.Fatal(err)
	}
	if out := e.reconcile(refusing); out.Resent != 0 {
		t.Fatalf("re-sent again within the grace: %+v", out)
	}
	if n := len(e.sim.Destroys(refusing)) + len(e.sim.RejectedDestroys(refusing)); n != 1 {
		t.Fatalf("refusing agent saw %d destroys, want 1", n)
	}
	e.relayAll(e.fence.Shard, e.fence.Token+1)
	got := e.stream_()
	if len(got) != 1 || got[0].P.Event != "capsule.destroy" || got[0].P.Resource.ID != ids.Sandbox(sb) ||
		got[0].P.Metadata == nil || got[0].P.Metadata.Reason != "destroy_retry" || got[0].P.Outcome != "success" {
		t.Fatalf("stream %+v, want one capsule.destroy destroy_retry", got)
	}
}

// Events an earlier version left pending (capsule.paused / capsule.destroyed,
// no outcome or metadata) are published in this shape, with the reason of
// their change, their vigil_id kept: none lost, none twice.
func TestEarlierVersionsPendingEventsPublishedInTheNewShape(t *testing.T) {
	e := newEventsEnv(t, 1, 2)
	h := e.hosts[0]
	team := e.team(h)
	type legacy struct {
		name, change, auditReason string // change "" : the journal row is gone
		want                      string
	}
	cases := []legacy{
		{"capsule.paused", "missing->paused", "restored_after_host_recovery", "capsule.pause restored_after_host_recovery"},
		{"capsule.paused", "running->paused", "host_state_sync", "capsule.pause host_state_sync"},
		{"capsule.paused", "pausing->paused", "transient_timeout_inferred", "capsule.pause transient_timeout_inferred"},
		{"capsule.destroyed", "running->stopped", "orphaned", "capsule.destroy orphaned"},
		{"capsule.destroyed", "stopping->stopped", "transient_timeout_inferred", "capsule.destroy transient_timeout_inferred"},
		{"capsule.destroyed", "destroyed_on_agent", "paused_zombie_cleanup", "capsule.destroy paused_zombie_cleanup"},
		{"capsule.destroyed", "", "orphaned", "capsule.destroy orphaned"}, // journal trimmed: the audit row tells
	}
	var order []string
	for _, c := range cases {
		sb, id := uuid.New(), uuid.New()
		rid := ids.Sandbox(sb)
		old := `{"event":"` + c.name + `","timestamp":"2026-12-01T08:30:15Z","team_id":"` + ids.Team(team) +
			`","actor":{"type":"system"},"resource":{"id":"` + rid + `","type":"sandbox"}}`
		tx, err := e.db.Begin(e.ctx)
		if err != nil {
			t.Fatal(err)
		}
		tx.Exec(e.ctx, `insert into vigil_events (shard, vigil_id, event, payload) values ($1, $2, $3, $4)`, e.fence.Shard, id, c.name, old)
		if c.change != "" {
			tx.Exec(e.ctx, `insert into vigil_journal (shard, token, replica, host_id, sandbox_id, change, event_id) values ($1, 1, 'old', $2, $3, $4, $5)`,
				e.fence.Shard, h, sb, c.change, id)
		}
		if _, err := tx.Exec(e.ctx, `insert into audit_logs (team_id, actor_type, resource_type, resource_id, action, scope, status, metadata)
			values ($1, 'system', 'sandbox', $2, 'x', 'team', 'info', jsonb_build_object('reason', $3::text, 'fence', 1))`, team, rid, c.auditReason); err != nil {
			t.Fatal(err)
		}
		if err := tx.Commit(e.ctx); err != nil {
			t.Fatal(err)
		}
		order = append(order, id.String())
	}
	e.relayAll(e.fence.Shard, e.fence.Token+1)
	got := e.stream_()
	if len(got) != len(cases) {
		t.Fatalf("stream holds %d entries, want %d", len(got), len(cases))
	}
	for i, p := range got {
		if p.VigilID != order[i] {
			t.Errorf("entry %d is %s, want %s (commit order, vigil_id kept)", i, p.VigilID, order[i])
		}
		cp, err := cpconsumer.Check(p.Raw)
		if err != nil {
			t.Errorf("entry %d: %v", i, err)
			continue
		}
		if got := cp.Event + " " + cp.Metadata["reason"]; got != cases[i].want || cp.Outcome != "success" || cp.Timestamp != "2026-12-01T08:30:15Z" {
			t.Errorf("entry %d: %s, want %s (outcome success, timestamp kept)", i, p.Raw, cases[i].want)
		}
	}
	if n := counter(t, e.reg, "vigil_events_published_total", "capsule.pause"); n != 3 {
		t.Errorf("vigil_events_published_total{capsule.pause} = %v, want 3", n)
	}
}
