package agentsim

import (
	"context"
	"errors"
	"io"
	"net"
	"net/netip"
	"slices"
	"strconv"
	"testing"
	"time"

	"connectrpc.com/connect"
	"github.com/google/uuid"
	"github.com/jackc/pgx/v5/pgtype"
	"google.golang.org/protobuf/proto"

	"github.com/vigil-sh/vigil/internal/ids"
	"github.com/vigil-sh/vigil/internal/pgtest"
	"github.com/vigil-sh/vigil/internal/status"
	hostagentv1 "github.com/vigil-sh/vigil/proto/hostagent/v1"
)

func TestConfigRejectsWhatItCannotSimulate(t *testing.T) {
	for _, tc := range []struct {
		name  string
		cfg   Config
		field string
	}{
		{"no hosts", Config{}, "Hosts"},
		{"too many hosts", Config{Hosts: MaxHosts + 1}, "Hosts"},
		{"listener bound to one address cannot serve 127/8", Config{Hosts: 1, ListenAddr: "127.0.0.1:0"}, "ListenAddr"},
		{"listen address without port", Config{Hosts: 1, ListenAddr: "0.0.0.0"}, "ListenAddr"},
		{"shared fraction above one", Config{Hosts: 1, SharedFraction: 1.5}, "SharedFraction"},
		{"negative sandboxes", Config{Hosts: 1, SandboxesPerHost: -1}, "SandboxesPerHost"},
		{"churn needs a database", Config{Hosts: 1, ChurnPerSecond: 1}, "ChurnPerSecond"},
		{"negative teams", Config{Hosts: 1, Teams: -1}, "Teams"},
		{"negative latency", Config{Hosts: 1, Latency: -time.Millisecond}, "Latency"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := New(tc.cfg)
			var ce *ConfigError
			if !errors.As(err, &ce) || ce.Field != tc.field {
				t.Fatalf("New(%+v) = %v, want a ConfigError on %s", tc.cfg, err, tc.field)
			}
		})
	}
	for _, addr := range []string{":0", "0.0.0.0:0", "[::]:0"} {
		if _, err := New(Config{Hosts: 1, ListenAddr: addr}); err != nil {
			t.Errorf("ListenAddr %q: %v", addr, err)
		}
	}
}

func TestHostAddressesAreDistinctLoopbackAndInvertible(t *testing.T) {
	seen := map[netip.Addr]bool{}
	check := func(i int) {
		a := hostIP(i)
		if !a.IsLoopback() || a == netip.MustParseAddr("127.0.0.1") {
			t.Fatalf("host %d: %v is not a host loopback address", i, a)
		}
		if b := a.As4(); b[3] == 0 || b[3] == 255 {
			t.Fatalf("host %d: %v ends in .0 or .255", i, a)
		}
		if seen[a] {
			t.Fatalf("host %d: %v used twice", i, a)
		}
		seen[a] = true
		if j, ok := hostIndex(a); !ok || j != i {
			t.Fatalf("hostIndex(%v) = %d, %v; want %d", a, j, ok, i)
		}
	}
	for i := range 70000 {
		check(i)
	}
	check(MaxHosts - 1)
	if hostIP(0) != netip.MustParseAddr("127.1.0.1") || hostIP(254) != netip.MustParseAddr("127.1.1.1") {
		t.Errorf("hostIP(0), hostIP(254) = %v, %v", hostIP(0), hostIP(254))
	}
	for _, a := range []string{"127.0.0.1", "127.1.0.0", "127.1.0.255", "10.1.0.1", "::1"} {
		if _, ok := hostIndex(netip.MustParseAddr(a)); ok {
			t.Errorf("hostIndex(%s) accepted", a)
		}
	}
	if i, ok := hostIndex(netip.MustParseAddr("::ffff:127.1.0.2")); !ok || i != 1 {
		t.Errorf("hostIndex of an IPv4-mapped address = %d, %v", i, ok)
	}
}

func TestRegistersHostsThatAnswerOnlyTheirOwnVMs(t *testing.T) {
	url := pgtest.New(t)
	s := start(t, Config{DatabaseURL: url, Hosts: 6, SandboxesPerHost: 3, SharedFraction: 0.5, HeartbeatInterval: -1})
	pool := newPool(t, url)
	ctx := ctxTimeout(t, 30*time.Second)

	rows, err := pool.Query(ctx, `select id, type, team_id, address, status, last_heartbeat_at is not null from hosts`)
	if err != nil {
		t.Fatal(err)
	}
	type hostRow struct {
		typ, address, status string
		team                 pgtype.UUID
		beat                 bool
	}
	hosts := map[uuid.UUID]hostRow{}
	for rows.Next() {
		var id uuid.UUID
		var r hostRow
		if err := rows.Scan(&id, &r.typ, &r.team, &r.address, &r.status, &r.beat); err != nil {
			t.Fatal(err)
		}
		hosts[id] = r
	}
	if err := rows.Err(); err != nil {
		t.Fatal(err)
	}
	if len(hosts) != 6 {
		t.Fatalf("%d host rows, want 6", len(hosts))
	}
	addrs := map[string]bool{}
	shared := 0
	for _, id := range s.HostIDs() {
		r, ok := hosts[id]
		if !ok {
			t.Fatalf("host %s not registered", id)
		}
		if r.typ != "regular" || r.status != status.HostOnline || !r.beat {
			t.Errorf("host %s: %+v, want regular, online, with a heartbeat", id, r)
		}
		if r.address != s.Address(id) || addrs[r.address] {
			t.Errorf("host %s: address %q (sim says %q) is not distinct", id, r.address, s.Address(id))
		}
		addrs[r.address] = true
		info, _ := s.Host(id)
		if !r.team.Valid {
			shared++
			if info.TeamID != nil {
				t.Errorf("host %s: NULL team in the database, %v in the sim", id, info.TeamID)
			}
		} else if info.TeamID == nil || uuid.UUID(r.team.Bytes) != *info.TeamID {
			t.Errorf("host %s: team %v in the database, %v in the sim", id, r.team, info.TeamID)
		}
	}
	if shared != 3 {
		t.Errorf("%d shared hosts, want 3", shared)
	}

	tr := http1(t)
	for _, id := range s.HostIDs() {
		want := map[string]string{} // wire id -> team
		rows, err := pool.Query(ctx, `select id, team_id, status from sandboxes where host_id = $1`, id)
		if err != nil {
			t.Fatal(err)
		}
		for rows.Next() {
			var sid, team uuid.UUID
			var st string
			if err := rows.Scan(&sid, &team, &st); err != nil {
				t.Fatal(err)
			}
			if st != status.Running {
				t.Errorf("seeded sandbox %s is %s, want running", sid, st)
			}
			want[ids.Sandbox(sid)] = team.String()
		}
		if err := rows.Err(); err != nil {
			t.Fatal(err)
		}
		got, err := list(ctx, client(t, tr, s.Address(id)))
		if err != nil {
			t.Fatalf("host %s: ListSandboxes: %v", id, err)
		}
		if len(got) != 3 || len(want) != 3 {
			t.Fatalf("host %s: agent reports %d VMs, database has %d rows; want 3 each", id, len(got), len(want))
		}
		host, _, _ := net.SplitHostPort(s.Address(id))
		for _, vm := range got {
			if team, ok := want[vm.GetSandboxId()]; !ok || team != vm.GetTeamId() {
				t.Errorf("host %s reports %s (team %s), not one of its rows %v", id, vm.GetSandboxId(), vm.GetTeamId(), want)
			}
			if vm.GetStatus() != status.Running || vm.GetHostIp() != host || vm.GetVcpus() == 0 || vm.GetMemoryMb() == 0 || vm.GetCreatedAtUnix() == 0 || vm.GetTemplate() == "" {
				t.Errorf("host %s: incomplete SandboxInfo %v", id, vm)
			}
		}
	}
}

func TestSameSeedReregistersTheSameHosts(t *testing.T) {
	url := pgtest.New(t)
	cfg := Config{DatabaseURL: url, Hosts: 4, SandboxesPerHost: 2, HeartbeatInterval: -1, Seed: 42}
	first := start(t, cfg)
	ids1 := first.HostIDs()
	if err := first.stop(); err != nil {
		t.Fatal(err)
	}
	pool := newPool(t, url)
	ctx := ctxTimeout(t, 30*time.Second)
	if _, err := pool.Exec(ctx, `update hosts set status = $1`, status.HostUnreachable); err != nil {
		t.Fatal(err)
	}
	second := start(t, cfg)
	if !slices.Equal(ids1, second.HostIDs()) {
		t.Fatal("same seed, different host ids")
	}
	var hosts, online, sandboxes int
	if err := pool.QueryRow(ctx, `select count(*), count(*) filter (where status = $1), (select count(*) from sandboxes) from hosts`, status.HostOnline).Scan(&hosts, &online, &sandboxes); err != nil {
		t.Fatal(err)
	}
	if hosts != 4 || online != 4 || sandboxes != 8 {
		t.Errorf("after re-registration: %d hosts, %d online, %d sandboxes; want 4, 4, 8", hosts, online, sandboxes)
	}
}

func TestHeartbeatRevivesUnreachableHostsAndSkipsDeadOnes(t *testing.T) {
	url := pgtest.New(t)
	s := start(t, Config{DatabaseURL: url, Hosts: 6, HeartbeatInterval: -1})
	pool := newPool(t, url)
	ctx := ctxTimeout(t, 30*time.Second)
	h := s.HostIDs()
	// 0 healthy, 1 dead, 2 skips heartbeats, 3 hangs, 4 pending, 5 flapping (dead first).
	for i, m := range map[int]Mode{1: {Kind: ModeDead}, 2: {SkipHeartbeat: true}, 3: {Kind: ModeHang}, 5: {Kind: ModeFlap, Period: time.Hour}} {
		if err := s.SetMode(h[i], m); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := pool.Exec(ctx, `update hosts set status = case when id = $1 then $2 else $3 end,
		last_heartbeat_at = null, updated_at = now() - interval '1 hour'`, h[4], status.HostPending, status.HostUnreachable); err != nil {
		t.Fatal(err)
	}
	n, err := s.Heartbeat(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if n != 3 {
		t.Errorf("Heartbeat reported %d hosts, want 3", n)
	}
	for i, want := range []struct {
		status string
		beat   bool
	}{{status.HostOnline, true}, {status.HostUnreachable, false}, {status.HostUnreachable, false}, {status.HostOnline, true}, {status.HostPending, true}, {status.HostUnreachable, false}} {
		var st string
		var beat, touched bool
		if err := pool.QueryRow(ctx, `select status, coalesce(last_heartbeat_at > now() - interval '1 minute', false), updated_at > now() - interval '1 minute'
			from hosts where id = $1`, h[i]).Scan(&st, &beat, &touched); err != nil {
			t.Fatal(err)
		}
		if st != want.status || beat != want.beat || touched != want.beat {
			t.Errorf("host %d: status %s, heartbeat %v, updated %v; want %s, %v, %v", i, st, beat, touched, want.status, want.beat, want.beat)
		}
	}
}

func TestHeartbeatLoopRunsOnItsInterval(t *testing.T) {
	url := pgtest.New(t)
	s := start(t, Config{DatabaseURL: url, Hosts: 2, HeartbeatInterval: 20 * time.Millisecond})
	pool := newPool(t, url)
	ctx := ctxTimeout(t, 30*time.Second)
	if _, err := pool.Exec(ctx, `update hosts set status = $1, last_heartbeat_at = null`, status.HostUnreachable); err != nil {
		t.Fatal(err)
	}
	eventually(t, 10*time.Second, "the loop to heartbeat both hosts", func() bool {
		var n int
		err := pool.QueryRow(ctx, `select count(*) from hosts where status = $1 and last_heartbeat_at is not null`, status.HostOnline).Scan(&n)
		return err == nil && n == 2
	})
	_ = s
}

func TestFencedDestroy(t *testing.T) {
	s := start(t, Config{Hosts: 2, HeartbeatInterval: -1})
	h := s.HostIDs()
	team := uuid.New()
	vms := make([]uuid.UUID, 6)
	for i := range vms {
		vms[i] = uuid.New()
		if err := s.AddVM(h[0], vms[i], status.Running, team); err != nil {
			t.Fatal(err)
		}
	}
	other := uuid.New()
	if err := s.AddVM(h[1], other, status.Running, team); err != nil {
		t.Fatal(err)
	}
	tr := http1(t)
	c := client(t, tr, s.Address(h[0]))
	ctx := ctxTimeout(t, 30*time.Second)

	steps := []struct {
		name   string
		vm     uuid.UUID
		fence  string
		code   connect.Code // 0: success
		result DestroyResult
	}{
		{"first token accepted", vms[0], "7:5", 0, DestroyDestroyed},
		{"lower token rejected", vms[1], "7:3", connect.CodeFailedPrecondition, DestroyStaleFence},
		{"lower token from another shard rejected", vms[1], "8:4", connect.CodeFailedPrecondition, DestroyStaleFence},
		{"equal token accepted", vms[1], "7:5", 0, DestroyDestroyed},
		{"higher token accepted", vms[2], "9:8", 0, DestroyDestroyed},
		{"previously highest now stale", vms[3], "7:5", connect.CodeFailedPrecondition, DestroyStaleFence},
		{"malformed header", vms[3], "seven:eight", connect.CodeInvalidArgument, DestroyBadFence},
		{"header without shard", vms[3], "8", connect.CodeInvalidArgument, DestroyBadFence},
		{"missing header accepted", vms[4], "", 0, DestroyDestroyed},
		{"unknown sandbox is not found", uuid.New(), "7:8", connect.CodeNotFound, DestroyNotFound},
	}
	for _, st := range steps {
		err := destroy(ctx, c, ids.Sandbox(st.vm), st.fence)
		if st.code == 0 && err != nil {
			t.Errorf("%s: %v, want success", st.name, err)
		}
		if st.code != 0 && connect.CodeOf(err) != st.code {
			t.Errorf("%s: %v, want %v", st.name, err, st.code)
		}
	}
	remaining := map[uuid.UUID]bool{}
	for _, vm := range s.VMs(h[0]) {
		remaining[vm.ID] = true
	}
	if len(remaining) != 2 || !remaining[vms[3]] || !remaining[vms[5]] {
		t.Errorf("VMs left %v, want exactly the ones never accepted for destroy (%s, %s)", remaining, vms[3], vms[5])
	}
	if got := s.HighestFence(h[0]); got != 8 {
		t.Errorf("highest fence %d, want 8", got)
	}

	var accepted, rejected []DestroyResult
	for _, r := range s.Destroys(h[0]) {
		accepted = append(accepted, r.Result)
		if r.Host != h[0] || r.Time.IsZero() {
			t.Errorf("record %+v lacks host or time", r)
		}
	}
	for _, r := range s.RejectedDestroys(h[0]) {
		rejected = append(rejected, r.Result)
	}
	var wantAccepted, wantRejected []DestroyResult
	for _, st := range steps {
		if st.code == 0 || st.code == connect.CodeNotFound {
			wantAccepted = append(wantAccepted, st.result)
		} else {
			wantRejected = append(wantRejected, st.result)
		}
	}
	if !slices.Equal(accepted, wantAccepted) || !slices.Equal(rejected, wantRejected) {
		t.Fatalf("records: accepted %v rejected %v; want %v and %v", accepted, rejected, wantAccepted, wantRejected)
	}
	first := s.Destroys(h[0])[0]
	if !first.Fenced || first.Shard != 7 || first.Token != 5 || first.Sandbox != ids.Sandbox(vms[0]) {
		t.Errorf("first record %+v", first)
	}
	if unfenced := s.Destroys(h[0])[3]; unfenced.Fenced || unfenced.Result != DestroyDestroyed {
		t.Errorf("unfenced record %+v", unfenced)
	}

	// Fencing state is per host: a low token on the other host is fine.
	if err := destroy(ctx, client(t, tr, s.Address(h[1])), ids.Sandbox(other), "7:1"); err != nil {
		t.Errorf("other host rejected its first token: %v", err)
	}
	if err := destroy(ctx, c, "not-a-sandbox-id", "7:9"); connect.CodeOf(err) != connect.CodeInvalidArgument {
		t.Errorf("malformed sandbox id: %v, want invalid_argument", err)
	}
}

func TestFaultModesAsSeenByAClient(t *testing.T) {
	url := pgtest.New(t)
	s := start(t, Config{DatabaseURL: url, Hosts: 3, SandboxesPerHost: 3, HeartbeatInterval: -1})
	h := s.HostIDs()[0]
	tr := http1(t)
	c := client(t, tr, s.Address(h))
	vms := s.VMs(h)
	if err := s.SetVMStatus(h, vms[0].ID, status.Paused); err != nil {
		t.Fatal(err)
	}
	setMode := func(t *testing.T, m Mode) {
		t.Helper()
		if err := s.SetMode(h, m); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = s.SetMode(h, Mode{}) })
	}

	t.Run("dead closes the connection without an answer", func(t *testing.T) {
		setMode(t, Mode{Kind: ModeDead})
		_, err := list(ctxTimeout(t, 10*time.Second), c)
		if err == nil || connect.CodeOf(err) != connect.CodeUnavailable {
			t.Fatalf("ListSandboxes on a dead host: %v, want a transport error (unavailable)", err)
		}
		if err := destroy(ctxTimeout(t, 10*time.Second), c, ids.Sandbox(vms[1].ID), "1:1"); err == nil {
			t.Fatal("DestroySandbox on a dead host succeeded")
		}
		if len(s.VMs(h)) != 3 || len(s.Destroys(h)) != 0 {
			t.Fatal("a dead host changed state")
		}
	})
	t.Run("hang blocks until the client deadline", func(t *testing.T) {
		setMode(t, Mode{Kind: ModeHang})
		_, err := list(ctxTimeout(t, 200*time.Millisecond), c)
		if connect.CodeOf(err) != connect.CodeDeadlineExceeded {
			t.Fatalf("ListSandboxes on a hung host: %v, want deadline_exceeded", err)
		}
		if n, err := s.Heartbeat(ctxTimeout(t, 10*time.Second)); err != nil || n != 3 {
			t.Fatalf("a hung host must keep heartbeating: %d, %v", n, err)
		}
	})
	t.Run("slow answers after its delay", func(t *testing.T) {
		setMode(t, Mode{Kind: ModeSlow, Delay: 300 * time.Millisecond})
		if _, err := list(ctxTimeout(t, 100*time.Millisecond), c); connect.CodeOf(err) != connect.CodeDeadlineExceeded {
			t.Fatalf("slow host within a shorter deadline: %v, want deadline_exceeded", err)
		}
		t0 := time.Now()
		got, err := list(ctxTimeout(t, 10*time.Second), c)
		if err != nil || len(got) != 3 {
			t.Fatalf("slow host: %d VMs, %v", len(got), err)
		}
		if el := time.Since(t0); el < 300*time.Millisecond {
			t.Fatalf("slow host answered after %v, want at least 300ms", el)
		}
	})
	t.Run("flap alternates dead and healthy", func(t *testing.T) {
		setMode(t, Mode{Kind: ModeFlap, Period: 50 * time.Millisecond})
		var ok, failed bool
		eventually(t, 20*time.Second, "both a success and a failure", func() bool {
			if _, err := list(ctxTimeout(t, 5*time.Second), c); err != nil {
				failed = true
			} else {
				ok = true
			}
			return ok && failed
		})
	})
	t.Run("malformed is a decode error", func(t *testing.T) {
		setMode(t, Mode{Kind: ModeMalformed})
		_, err := list(ctxTimeout(t, 10*time.Second), c)
		if err == nil || connect.IsWireError(err) || connect.CodeOf(err) == connect.CodeUnavailable {
			t.Fatalf("malformed answer: %v (code %v), want a client-side decode error", err, connect.CodeOf(err))
		}
		t.Logf("malformed: %v", err)
	})
	t.Run("oversized exceeds the requested size", func(t *testing.T) {
		const limit = 256 << 10
		setMode(t, Mode{Kind: ModeOversized, OversizeBytes: limit})
		_, err := list(ctxTimeout(t, 10*time.Second), client(t, tr, s.Address(h), connect.WithReadMaxBytes(limit)))
		if connect.CodeOf(err) != connect.CodeResourceExhausted {
			t.Fatalf("oversized answer to a client with a %d-byte limit: %v, want resource_exhausted", limit, err)
		}
		resp, err := c.ListSandboxes(ctxTimeout(t, 10*time.Second), connect.NewRequest(&hostagentv1.ListSandboxesRequest{}))
		if err != nil {
			t.Fatal(err)
		}
		if size := proto.Size(resp.Msg); size <= limit || len(resp.Msg.GetSandboxes()) != 3 {
			t.Fatalf("oversized answer: %d bytes, %d VMs; want more than %d bytes and the 3 true VMs", size, len(resp.Msg.GetSandboxes()), limit)
		}
	})
	t.Run("unknown-status reports a label outside the vocabulary", func(t *testing.T) {
		setMode(t, Mode{Kind: ModeUnknownStatus})
		got, err := list(ctxTimeout(t, 10*time.Second), c)
		if err != nil || len(got) != 3 {
			t.Fatalf("%d VMs, %v", len(got), err)
		}
		for _, vm := range got {
			if vm.GetStatus() != DefaultUnknownLabel || status.Known(vm.GetStatus()) {
				t.Errorf("%s reported %q, want %q", vm.GetSandboxId(), vm.GetStatus(), DefaultUnknownLabel)
			}
		}
	})
	t.Run("duplicate-ids reports each VM twice with different statuses", func(t *testing.T) {
		setMode(t, Mode{Kind: ModeDuplicateIDs})
		got, err := list(ctxTimeout(t, 10*time.Second), c)
		if err != nil {
			t.Fatal(err)
		}
		byID := statusesByID(got)
		if len(got) != 6 || len(byID) != 3 {
			t.Fatalf("%d entries for %d ids, want 6 for 3", len(got), len(byID))
		}
		for id, st := range byID {
			if len(st) != 2 || st[0] == st[1] || !status.Known(st[1]) {
				t.Errorf("%s reported as %v, want two different known statuses", id, st)
			}
		}
		if st := byID[ids.Sandbox(vms[0].ID)]; st[0] != status.Paused || st[1] != status.Running {
			t.Errorf("paused VM reported as %v, want [paused running]", st)
		}
	})
	t.Run("healthy again answers the truth", func(t *testing.T) {
		got, err := list(ctxTimeout(t, 10*time.Second), c)
		if err != nil || len(got) != 3 {
			t.Fatalf("%d VMs, %v", len(got), err)
		}
	})
	t.Run("modes are rejected when they make no sense", func(t *testing.T) {
		for _, m := range []Mode{{Kind: "sleepy"}, {Kind: ModeSlow, Delay: -1}, {Kind: ModeUnknownStatus, Label: status.Running}} {
			if err := s.SetMode(h, m); err == nil {
				t.Errorf("SetMode(%+v) accepted", m)
			}
		}
		if err := s.SetMode(uuid.New(), Mode{}); !errors.Is(err, ErrUnknownHost) {
			t.Errorf("SetMode on an unknown host: %v", err)
		}
	})
}

func TestRestartKeepsOnlyPausedVMs(t *testing.T) {
	s := start(t, Config{Hosts: 2, HeartbeatInterval: -1})
	h := s.HostIDs()
	team := uuid.New()
	keep := uuid.New()
	for _, st := range []string{status.Running, status.Starting, status.Pausing, "hibernating"} {
		if err := s.AddVM(h[0], uuid.New(), st, team); err != nil {
			t.Fatal(err)
		}
	}
	if err := s.AddVM(h[0], keep, status.Paused, team); err != nil {
		t.Fatal(err)
	}
	if err := s.AddVM(h[1], uuid.New(), status.Running, team); err != nil {
		t.Fatal(err)
	}
	if err := s.SetMode(h[0], Mode{Kind: ModeSlow, Delay: time.Millisecond}); err != nil {
		t.Fatal(err)
	}
	n, err := s.Restart(h[0])
	if err != nil || n != 4 {
		t.Fatalf("Restart dropped %d, %v; want 4", n, err)
	}
	got, err := list(ctxTimeout(t, 10*time.Second), client(t, http1(t), s.Address(h[0])))
	if err != nil || len(got) != 1 || got[0].GetSandboxId() != ids.Sandbox(keep) || got[0].GetStatus() != status.Paused {
		t.Fatalf("after restart: %v, %v; want only the paused VM", got, err)
	}
	if len(s.VMs(h[1])) != 1 {
		t.Error("restart touched another host")
	}
	if m, _ := s.Mode(h[0]); m.Kind != ModeSlow {
		t.Errorf("restart reset the mode to %v", m.Kind)
	}
}

func TestVMManipulation(t *testing.T) {
	s := start(t, Config{Hosts: 1, HeartbeatInterval: -1})
	h := s.HostIDs()[0]
	id, team := uuid.New(), uuid.New()
	if err := s.AddVM(h, id, status.Starting, team); err != nil {
		t.Fatal(err)
	}
	if err := s.SetVMStatus(h, id, status.Running); err != nil {
		t.Fatal(err)
	}
	if vms := s.VMs(h); len(vms) != 1 || vms[0].Status != status.Running || vms[0].TeamID != team {
		t.Fatalf("VMs = %+v", vms)
	}
	if err := s.RemoveVM(h, id); err != nil {
		t.Fatal(err)
	}
	if err := s.RemoveVM(h, id); !errors.Is(err, ErrUnknownSandbox) {
		t.Errorf("RemoveVM twice: %v", err)
	}
	if err := s.SetVMStatus(h, id, status.Paused); !errors.Is(err, ErrUnknownSandbox) {
		t.Errorf("SetVMStatus of a removed VM: %v", err)
	}
	if err := s.AddVM(uuid.New(), id, status.Running, team); !errors.Is(err, ErrUnknownHost) {
		t.Errorf("AddVM on an unknown host: %v", err)
	}
	if _, err := s.Heartbeat(context.Background()); !errors.Is(err, ErrNoDatabase) {
		t.Errorf("Heartbeat without a database: %v", err)
	}
}

func TestConnectionsToOtherAddressesAreClosed(t *testing.T) {
	s := start(t, Config{Hosts: 2, HeartbeatInterval: -1})
	port := strconv.Itoa(s.Port())
	for _, addr := range []string{"127.0.0.1", "127.1.0.3", "127.1.0.255"} {
		conn, err := net.DialTimeout("tcp", net.JoinHostPort(addr, port), 5*time.Second)
		if err != nil {
			continue // refused is as good as closed
		}
		_ = conn.SetDeadline(time.Now().Add(5 * time.Second))
		_, _ = conn.Write([]byte("POST /hostagent.v1.HostAgentService/ListSandboxes HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n"))
		b, err := io.ReadAll(conn)
		_ = conn.Close()
		if len(b) != 0 || err != nil && !errors.Is(err, net.ErrClosed) && !isReset(err) {
			t.Errorf("%s: read %q, %v; want the connection closed without an answer", addr, b, err)
		}
	}
}

func isReset(err error) bool {
	var ne *net.OpError
	return errors.As(err, &ne) && !ne.Timeout()
}

func TestRunStopsWhileRequestsHang(t *testing.T) {
	s := start(t, Config{Hosts: 1, HeartbeatInterval: -1})
	h := s.HostIDs()[0]
	if err := s.SetMode(h, Mode{Kind: ModeHang}); err != nil {
		t.Fatal(err)
	}
	c := client(t, http1(t), s.Address(h))
	errc := make(chan error, 1)
	go func() {
		_, err := list(context.Background(), c)
		errc <- err
	}()
	eventually(t, 10*time.Second, "the request to reach the handler", func() bool { return s.inflight.Load() == 1 })
	if err := s.stop(); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-errc:
		if err == nil {
			t.Fatal("hung request succeeded after stop")
		}
	case <-time.After(10 * time.Second):
		t.Fatal("hung request still blocked 10s after Run returned")
	}
}

func TestRunWithoutDatabaseServesRPC(t *testing.T) {
	s := start(t, Config{Hosts: 3, SandboxesPerHost: 2})
	for _, h := range s.HostIDs() {
		got, err := list(ctxTimeout(t, 10*time.Second), client(t, http1(t), s.Address(h)))
		if err != nil || len(got) != 2 {
			t.Fatalf("host %s: %d VMs, %v", h, len(got), err)
		}
	}
	if err := s.Run(context.Background()); !errors.Is(err, ErrAlreadyRun) {
		t.Errorf("second Run: %v", err)
	}
}
