package agentsim

import (
	"context"
	"testing"
	"time"

	"connectrpc.com/connect"

	"github.com/vigil-sh/vigil/internal/ids"
)

func TestLatencyDelaysEveryAnswer(t *testing.T) {
	const latency = 50 * time.Millisecond
	s := start(t, Config{Hosts: 1, SandboxesPerHost: 2, HeartbeatInterval: -1, Latency: latency})
	h := s.HostIDs()[0]
	c := client(t, http1(t), s.Address(h))
	timed := func(name string, least time.Duration, call func(context.Context) error) {
		t.Helper()
		t0 := time.Now()
		err := call(ctxTimeout(t, 10*time.Second))
		if el := time.Since(t0); el < least {
			t.Errorf("%s answered after %v, want at least %v", name, el, least)
		}
		if err != nil {
			t.Errorf("%s: %v", name, err)
		}
	}
	listCall := func(ctx context.Context) error { _, err := list(ctx, c); return err }
	timed("ListSandboxes", latency, listCall)
	timed("DestroySandbox", latency, func(ctx context.Context) error {
		return destroy(ctx, c, ids.Sandbox(s.VMs(h)[0].ID), "1:1")
	})
	for _, m := range []Mode{{Kind: ModeUnknownStatus}, {Kind: ModeDuplicateIDs}} {
		if err := s.SetMode(h, m); err != nil {
			t.Fatal(err)
		}
		timed(string(m.Kind), latency, listCall)
	}
	if err := s.SetMode(h, Mode{Kind: ModeSlow, Delay: 50 * time.Millisecond}); err != nil {
		t.Fatal(err)
	}
	timed("slow", latency+50*time.Millisecond, listCall)
}

func TestWaitsEndWithTheRequest(t *testing.T) {
	s := start(t, Config{Hosts: 1, SandboxesPerHost: 1, HeartbeatInterval: -1, Latency: time.Hour})
	h := s.HostIDs()[0]
	c := client(t, http1(t), s.Address(h))
	vm := s.VMs(h)[0]
	for _, m := range []Mode{{Kind: ModeHealthy}, {Kind: ModeSlow, Delay: time.Hour}, {Kind: ModeHang}} {
		if err := s.SetMode(h, m); err != nil {
			t.Fatal(err)
		}
		err := destroy(ctxTimeout(t, 100*time.Millisecond), c, ids.Sandbox(vm.ID), "1:1")
		if connect.CodeOf(err) != connect.CodeDeadlineExceeded {
			t.Fatalf("%s: DestroySandbox with an hour of latency and a 100ms deadline: %v, want deadline_exceeded", m.Kind, err)
		}
		// The server's wait ends with the request, long before the hour.
		eventually(t, 10*time.Second, string(m.Kind)+": the handler to return after the client gave up", func() bool { return s.inflight.Load() == 0 })
	}
	if len(s.VMs(h)) != 1 || len(s.Destroys(h)) != 0 || s.HighestFence(h) != 0 {
		t.Error("destroys cancelled while waiting had side effects")
	}
}
