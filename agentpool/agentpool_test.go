package agentpool

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"log"
	"math/big"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"connectrpc.com/connect"
	"github.com/google/uuid"
	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
	"go.uber.org/goleak"

	"github.com/vigil-sh/vigil/internal/testwait"
	hostagentv1 "github.com/vigil-sh/vigil/proto/hostagent/v1"
	"github.com/vigil-sh/vigil/proto/hostagent/v1/hostagentv1connect"
)

func TestMain(m *testing.M) {
	if os.Getenv(idleAgentsEnv) != "" { // a child of BenchmarkIdleConnMemory
		os.Exit(serveIdleAgents())
	}
	goleak.VerifyTestMain(m)
}

// fakeAgent is a host agent whose answers the test chooses. Nil funcs answer
// an empty list and a successful destroy.
type fakeAgent struct {
	list    func(context.Context, *connect.Request[hostagentv1.ListSandboxesRequest]) (*connect.Response[hostagentv1.ListSandboxesResponse], error)
	destroy func(context.Context, *connect.Request[hostagentv1.DestroySandboxRequest]) (*connect.Response[hostagentv1.DestroySandboxResponse], error)
}

func (a *fakeAgent) ListSandboxes(ctx context.Context, req *connect.Request[hostagentv1.ListSandboxesRequest]) (*connect.Response[hostagentv1.ListSandboxesResponse], error) {
	if a.list == nil {
		return connect.NewResponse(&hostagentv1.ListSandboxesResponse{}), nil
	}
	return a.list(ctx, req)
}

func (a *fakeAgent) DestroySandbox(ctx context.Context, req *connect.Request[hostagentv1.DestroySandboxRequest]) (*connect.Response[hostagentv1.DestroySandboxResponse], error) {
	if a.destroy == nil {
		return connect.NewResponse(&hostagentv1.DestroySandboxResponse{}), nil
	}
	return a.destroy(ctx, req)
}

// seenRequest is what the HTTP layer of a test agent saw of one request.
type seenRequest struct {
	method, path, contentType, fence string
	acceptEncoding                   string // Accept-Encoding and Connect-Accept-Encoding
	protoMajor                       int
	peerCN                           string // client certificate CN, when TLS
}

// recorder wraps an agent's HTTP handler and records every request reaching it.
type recorder struct {
	mu   sync.Mutex
	reqs []seenRequest
}

func (rec *recorder) wrap(h http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		s := seenRequest{
			method:         r.Method,
			path:           r.URL.Path,
			contentType:    r.Header.Get("Content-Type"),
			fence:          r.Header.Get(FenceHeader),
			protoMajor:     r.ProtoMajor,
			acceptEncoding: strings.Join(append(r.Header.Values("Accept-Encoding"), r.Header.Values("Connect-Accept-Encoding")...), ","),
		}
		if r.TLS != nil && len(r.TLS.PeerCertificates) > 0 {
			s.peerCN = r.TLS.PeerCertificates[0].Subject.CommonName
		}
		rec.mu.Lock()
		rec.reqs = append(rec.reqs, s)
		rec.mu.Unlock()
		h.ServeHTTP(w, r)
	})
}

func (rec *recorder) all() []seenRequest {
	rec.mu.Lock()
	defer rec.mu.Unlock()
	return append([]seenRequest(nil), rec.reqs...)
}

func (rec *recorder) only(t *testing.T) seenRequest {
	t.Helper()
	reqs := rec.all()
	if len(reqs) != 1 {
		t.Fatalf("agent saw %d requests, want 1: %+v", len(reqs), reqs)
	}
	return reqs[0]
}

func agentHandler(agent hostagentv1connect.HostAgentServiceHandler, rec *recorder) http.Handler {
	mux := http.NewServeMux()
	mux.Handle(hostagentv1connect.NewHostAgentServiceHandler(agent))
	return rec.wrap(mux)
}

// startAgent serves agent over plain HTTP/1.1 on loopback and returns its
// address in hosts.address form ("ip:port", no scheme).
func startAgent(t *testing.T, agent hostagentv1connect.HostAgentServiceHandler) (string, *recorder) {
	t.Helper()
	rec := &recorder{}
	srv := httptest.NewServer(agentHandler(agent, rec))
	t.Cleanup(srv.Close)
	return srv.Listener.Addr().String(), rec
}

// startRaw serves h as-is: an "agent" that does not speak Connect correctly.
func startRaw(t *testing.T, h http.HandlerFunc) string {
	t.Helper()
	srv := httptest.NewServer(h)
	t.Cleanup(srv.Close)
	return srv.Listener.Addr().String()
}

// newPool builds a pool that is closed when the test ends (before the test's
// servers, which were started earlier).
func newPool(t *testing.T, cfg Config) *Pool {
	t.Helper()
	p, err := New(cfg)
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	t.Cleanup(p.Close)
	return p
}

// closedAddress returns a loopback address nothing listens on.
func closedAddress(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	if err := ln.Close(); err != nil {
		t.Fatal(err)
	}
	return addr
}

func wantCode(t *testing.T, err error, want connect.Code) {
	t.Helper()
	if err == nil {
		t.Fatalf("got nil error, want code %v", want)
	}
	if got := connect.CodeOf(err); got != want {
		t.Fatalf("got code %v (%v), want %v", got, err, want)
	}
}

func TestProcedurePathsMatchTheAgents(t *testing.T) {
	if got, want := hostagentv1connect.HostAgentServiceListSandboxesProcedure, "/hostagent.v1.HostAgentService/ListSandboxes"; got != want {
		t.Errorf("ListSandboxes procedure = %q, want %q", got, want)
	}
	if got, want := hostagentv1connect.HostAgentServiceDestroySandboxProcedure, "/hostagent.v1.HostAgentService/DestroySandbox"; got != want {
		t.Errorf("DestroySandbox procedure = %q, want %q", got, want)
	}
}

func TestListSandboxesSpeaksConnectProtoOverHTTP1(t *testing.T) {
	agent := &fakeAgent{list: func(context.Context, *connect.Request[hostagentv1.ListSandboxesRequest]) (*connect.Response[hostagentv1.ListSandboxesResponse], error) {
		return connect.NewResponse(&hostagentv1.ListSandboxesResponse{
			Sandboxes: []*hostagentv1.SandboxInfo{
				{SandboxId: "cl-0000000000000000000000001", Status: "running", Vcpus: 2, Metadata: map[string]string{"k": "v"}},
				{SandboxId: "cl-0000000000000000000000002", Status: "paused"},
			},
			AutoPausedSandboxIds: []string{"cl-0000000000000000000000002"},
		}), nil
	}}
	addr, rec := startAgent(t, agent)
	p := newPool(t, Config{})

	resp, err := p.ListSandboxes(t.Context(), uuid.New(), addr)
	if err != nil {
		t.Fatalf("ListSandboxes: %v", err)
	}
	if len(resp.GetSandboxes()) != 2 || resp.GetSandboxes()[0].GetSandboxId() != "cl-0000000000000000000000001" ||
		resp.GetSandboxes()[0].GetVcpus() != 2 || resp.GetSandboxes()[0].GetMetadata()["k"] != "v" ||
		resp.GetSandboxes()[1].GetStatus() != "paused" {
		t.Fatalf("unexpected response: %v", resp)
	}
	got := rec.only(t)
	want := seenRequest{
		method:      http.MethodPost,
		path:        hostagentv1connect.HostAgentServiceListSandboxesProcedure,
		contentType: "application/proto",
		protoMajor:  1,
		// Connect's unary protocol: identity only, no gzip offered.
		acceptEncoding: "identity",
	}
	if got != want {
		t.Fatalf("agent saw %+v, want %+v", got, want)
	}
}

func TestDestroySandboxSendsFenceHeader(t *testing.T) {
	var gotID string
	var mu sync.Mutex
	agent := &fakeAgent{destroy: func(_ context.Context, req *connect.Request[hostagentv1.DestroySandboxRequest]) (*connect.Response[hostagentv1.DestroySandboxResponse], error) {
		mu.Lock()
		gotID = req.Msg.GetSandboxId()
		mu.Unlock()
		return connect.NewResponse(&hostagentv1.DestroySandboxResponse{}), nil
	}}
	addr, rec := startAgent(t, agent)
	p := newPool(t, Config{})

	if err := p.DestroySandbox(t.Context(), uuid.New(), addr, "cl-6dfzh5ik5uxynzmlf5cshamdk", "17:42"); err != nil {
		t.Fatalf("DestroySandbox: %v", err)
	}
	got := rec.only(t)
	want := seenRequest{
		method:         http.MethodPost,
		path:           hostagentv1connect.HostAgentServiceDestroySandboxProcedure,
		contentType:    "application/proto",
		fence:          "17:42",
		protoMajor:     1,
		acceptEncoding: "identity",
	}
	if got != want {
		t.Fatalf("agent saw %+v, want %+v", got, want)
	}
	mu.Lock()
	defer mu.Unlock()
	if gotID != "cl-6dfzh5ik5uxynzmlf5cshamdk" {
		t.Fatalf("agent got sandbox id %q", gotID)
	}
}

func TestDestroySandboxWithoutFenceSendsNoHeader(t *testing.T) {
	addr, rec := startAgent(t, &fakeAgent{})
	p := newPool(t, Config{})
	if err := p.DestroySandbox(t.Context(), uuid.New(), addr, "cl-x", ""); err != nil {
		t.Fatalf("DestroySandbox: %v", err)
	}
	if got := rec.only(t).fence; got != "" {
		t.Fatalf("fence header %q sent, want none", got)
	}
}

func TestDestroySandboxNotFoundIsSuccess(t *testing.T) {
	agent := &fakeAgent{destroy: func(context.Context, *connect.Request[hostagentv1.DestroySandboxRequest]) (*connect.Response[hostagentv1.DestroySandboxResponse], error) {
		return nil, connect.NewError(connect.CodeNotFound, errors.New("no such sandbox"))
	}}
	addr, _ := startAgent(t, agent)
	p := newPool(t, Config{})
	if err := p.DestroySandbox(t.Context(), uuid.New(), addr, "cl-gone", "1:1"); err != nil {
		t.Fatalf("DestroySandbox of an unknown sandbox = %v, want nil", err)
	}
}

func TestAgentErrorsKeepCodeAndNameHostAndProcedure(t *testing.T) {
	agent := &fakeAgent{
		list: func(context.Context, *connect.Request[hostagentv1.ListSandboxesRequest]) (*connect.Response[hostagentv1.ListSandboxesResponse], error) {
			return nil, connect.NewError(connect.CodeUnavailable, errors.New("agent busy"))
		},
		destroy: func(context.Context, *connect.Request[hostagentv1.DestroySandboxRequest]) (*connect.Response[hostagentv1.DestroySandboxResponse], error) {
			return nil, connect.NewError(connect.CodeFailedPrecondition, errors.New("stale fence"))
		},
	}
	addr, _ := startAgent(t, agent)
	p := newPool(t, Config{})
	host := uuid.New()

	_, err := p.ListSandboxes(t.Context(), host, addr)
	wantCode(t, err, connect.CodeUnavailable)
	if want := fmt.Sprintf("agent %s ListSandboxes: ", host); !strings.HasPrefix(err.Error(), want) {
		t.Errorf("error %q does not start with %q", err, want)
	}
	var connectErr *connect.Error
	if !errors.As(err, &connectErr) || connectErr.Message() != "agent busy" {
		t.Errorf("error %v does not unwrap to the agent's *connect.Error", err)
	}

	err = p.DestroySandbox(t.Context(), host, addr, "cl-x", "3:9")
	wantCode(t, err, connect.CodeFailedPrecondition)
	if want := fmt.Sprintf("agent %s DestroySandbox: ", host); !strings.HasPrefix(err.Error(), want) {
		t.Errorf("error %q does not start with %q", err, want)
	}
}

// hangingAgent blocks every call until its request context ends.
func hangingAgent() *fakeAgent {
	return &fakeAgent{
		list: func(ctx context.Context, _ *connect.Request[hostagentv1.ListSandboxesRequest]) (*connect.Response[hostagentv1.ListSandboxesResponse], error) {
			<-ctx.Done()
			return nil, ctx.Err()
		},
		destroy: func(ctx context.Context, _ *connect.Request[hostagentv1.DestroySandboxRequest]) (*connect.Response[hostagentv1.DestroySandboxResponse], error) {
			<-ctx.Done()
			return nil, ctx.Err()
		},
	}
}

func TestHangingAgentHitsConfiguredTimeout(t *testing.T) {
	addr, _ := startAgent(t, hangingAgent())
	p := newPool(t, Config{Timeout: 200 * time.Millisecond})

	// The caller sets no deadline: the pool's Timeout is what ends the call.
	// The safety net only cancels (code canceled, a failure) if the pool
	// applied no deadline at all, so the test fails instead of hanging.
	ctx, cancel := context.WithCancel(t.Context())
	defer time.AfterFunc(time.Minute, cancel).Stop()
	defer cancel()
	_, err := p.ListSandboxes(ctx, uuid.New(), addr)
	wantCode(t, err, connect.CodeDeadlineExceeded)
	err = p.DestroySandbox(ctx, uuid.New(), addr, "cl-x", "1:1")
	wantCode(t, err, connect.CodeDeadlineExceeded)
}

func TestCallerDeadlineSoonerThanTimeoutWins(t *testing.T) {
	addr, _ := startAgent(t, hangingAgent())
	// An hour-long Timeout: only the caller's deadline can end this call
	// before the test binary's own timeout.
	p := newPool(t, Config{Timeout: time.Hour})
	ctx, cancel := context.WithTimeout(t.Context(), 200*time.Millisecond)
	defer cancel()
	_, err := p.ListSandboxes(ctx, uuid.New(), addr)
	wantCode(t, err, connect.CodeDeadlineExceeded)
}

// bigList answers n sandboxes, each with incompressible metadata, so the
// response exceeds n*1 KiB whether or not it is compressed on the wire.
func bigList(n int) *fakeAgent {
	return &fakeAgent{list: func(context.Context, *connect.Request[hostagentv1.ListSandboxesRequest]) (*connect.Response[hostagentv1.ListSandboxesResponse], error) {
		resp := &hostagentv1.ListSandboxesResponse{}
		for i := range n {
			resp.Sandboxes = append(resp.Sandboxes, &hostagentv1.SandboxInfo{
				SandboxId: fmt.Sprintf("cl-%025d", i),
				Metadata:  map[string]string{"noise": noise(1 << 10)},
			})
		}
		return connect.NewResponse(resp), nil
	}}
}

// noise returns at least n bytes of random base32 text.
func noise(n int) string {
	var b strings.Builder
	for b.Len() < n {
		b.WriteString(rand.Text())
	}
	return b.String()
}

func TestOversizedResponseIsResourceExhausted(t *testing.T) {
	const max = 16 << 10
	bigAddr, _ := startAgent(t, bigList(64)) // > 64 KiB
	smallAddr, _ := startAgent(t, bigList(2))
	p := newPool(t, Config{MaxResponseBytes: max})

	_, err := p.ListSandboxes(t.Context(), uuid.New(), bigAddr)
	wantCode(t, err, connect.CodeResourceExhausted)

	resp, err := p.ListSandboxes(t.Context(), uuid.New(), smallAddr)
	if err != nil {
		t.Fatalf("response under the cap failed: %v", err)
	}
	if len(resp.GetSandboxes()) != 2 {
		t.Fatalf("got %d sandboxes, want 2", len(resp.GetSandboxes()))
	}
}

func TestMalformedResponseIsAnError(t *testing.T) {
	garbage := bytes.Repeat([]byte{0xff}, 64) // an over-long varint tag: not protobuf
	addr := startRaw(t, func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "application/proto")
		w.WriteHeader(http.StatusOK)
		_, _ = w.Write(garbage)
	})
	p := newPool(t, Config{})

	if resp, err := p.ListSandboxes(t.Context(), uuid.New(), addr); err == nil {
		t.Fatalf("ListSandboxes on garbage = %v, nil; want error", resp)
	}
	if err := p.DestroySandbox(t.Context(), uuid.New(), addr, "cl-x", ""); err == nil {
		t.Fatal("DestroySandbox on garbage = nil, want error")
	}
}

func TestNonConnectAnswerIsAnError(t *testing.T) {
	addr := startRaw(t, func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "text/html")
		w.WriteHeader(http.StatusOK)
		_, _ = w.Write([]byte("<html>a load balancer</html>"))
	})
	p := newPool(t, Config{})
	if _, err := p.ListSandboxes(t.Context(), uuid.New(), addr); err == nil {
		t.Fatal("ListSandboxes on an HTML answer = nil error")
	}
}

func TestUnreachableAgentIsUnavailable(t *testing.T) {
	p := newPool(t, Config{})
	_, err := p.ListSandboxes(t.Context(), uuid.New(), closedAddress(t))
	wantCode(t, err, connect.CodeUnavailable)
}

func TestAddressForms(t *testing.T) {
	addr, rec := startAgent(t, &fakeAgent{})
	p := newPool(t, Config{})

	t.Run("address without scheme gets http", func(t *testing.T) {
		if _, err := p.ListSandboxes(t.Context(), uuid.New(), addr); err != nil {
			t.Fatal(err)
		}
	})
	t.Run("address with scheme is used as is", func(t *testing.T) {
		if _, err := p.ListSandboxes(t.Context(), uuid.New(), "http://"+addr+"/"); err != nil {
			t.Fatal(err)
		}
	})
	if n := len(rec.all()); n != 2 {
		t.Fatalf("agent saw %d requests, want 2", n)
	}
	for _, r := range rec.all() {
		if r.path != hostagentv1connect.HostAgentServiceListSandboxesProcedure {
			t.Errorf("agent saw path %q", r.path)
		}
	}

	t.Run("empty address is ErrNoAddress and sends nothing", func(t *testing.T) {
		host := uuid.New()
		for _, a := range []string{"", "  "} {
			_, err := p.ListSandboxes(t.Context(), host, a)
			if !errors.Is(err, ErrNoAddress) {
				t.Errorf("ListSandboxes(%q) = %v, want ErrNoAddress", a, err)
			}
			if err := p.DestroySandbox(t.Context(), host, a, "cl-x", ""); !errors.Is(err, ErrNoAddress) {
				t.Errorf("DestroySandbox(%q) = %v, want ErrNoAddress", a, err)
			}
		}
		if n := len(rec.all()); n != 2 {
			t.Errorf("agent saw %d requests, want still 2", n)
		}
	})
}

func TestBadAddressErrorNamesHostAndProcedure(t *testing.T) {
	p := newPool(t, Config{})
	host := uuid.New()
	_, err := p.ListSandboxes(t.Context(), host, "http://[::1")
	if err == nil || !strings.HasPrefix(err.Error(), fmt.Sprintf("agent %s ListSandboxes: agentpool: bad address", host)) {
		t.Fatalf("got %v", err)
	}
	if !errors.Is(err, ErrBadAddress) {
		t.Fatalf("%v is not ErrBadAddress", err)
	}
	if p.Len() != 1 { // the refusal is remembered, to be logged once
		t.Fatalf("Len = %d after a bad address, want 1", p.Len())
	}
}

func TestAddressChangeRebuildsClient(t *testing.T) {
	addrA, recA := startAgent(t, &fakeAgent{})
	addrB, recB := startAgent(t, &fakeAgent{})
	p := newPool(t, Config{})
	host := uuid.New()

	if _, err := p.ListSandboxes(t.Context(), host, addrA); err != nil {
		t.Fatal(err)
	}
	if p.Len() != 1 {
		t.Fatalf("Len = %d, want 1", p.Len())
	}
	if _, err := p.ListSandboxes(t.Context(), host, addrB); err != nil {
		t.Fatal(err)
	}
	if p.Len() != 1 {
		t.Fatalf("Len = %d after address change, want 1", p.Len())
	}
	if a, b := len(recA.all()), len(recB.all()); a != 1 || b != 1 {
		t.Fatalf("agent A saw %d, agent B saw %d; want 1 and 1", a, b)
	}
	if err := p.DestroySandbox(t.Context(), host, addrB, "cl-x", ""); err != nil {
		t.Fatal(err)
	}
	if a, b := len(recA.all()), len(recB.all()); a != 1 || b != 2 {
		t.Fatalf("after destroy agent A saw %d, agent B saw %d; want 1 and 2", a, b)
	}
}

// countingAgent serves agent and counts the TCP connections it accepted.
func countingAgent(t *testing.T, agent hostagentv1connect.HostAgentServiceHandler) (string, func() int) {
	addr, opened, _ := countingServer(t, agent)
	return addr, opened
}

func countingServer(t *testing.T, agent hostagentv1connect.HostAgentServiceHandler) (string, func() int, *httptest.Server) {
	t.Helper()
	var mu sync.Mutex
	opened := 0
	srv := httptest.NewUnstartedServer(agentHandler(agent, &recorder{}))
	srv.Config.ConnState = func(_ net.Conn, st http.ConnState) {
		if st == http.StateNew {
			mu.Lock()
			opened++
			mu.Unlock()
		}
	}
	srv.Start()
	t.Cleanup(srv.Close)
	return srv.Listener.Addr().String(), func() int { mu.Lock(); defer mu.Unlock(); return opened }, srv
}

// Calls to one agent reuse its connection.
func TestConnectionIsReused(t *testing.T) {
	addr, opened := countingAgent(t, &fakeAgent{})
	p := newPool(t, Config{})
	host := uuid.New()
	for range 5 {
		if _, err := p.ListSandboxes(t.Context(), host, addr); err != nil {
			t.Fatal(err)
		}
	}
	if err := p.DestroySandbox(t.Context(), host, addr, "cl-x", "1:1"); err != nil {
		t.Fatal(err)
	}
	if n := opened(); n != 1 {
		t.Fatalf("6 calls opened %d connections, want 1", n)
	}
	if n := p.tr.idleCount(); n != 1 {
		t.Fatalf("%d idle connections, want 1", n)
	}
}

// An agent that closed an idle connection costs nothing but a new one: the
// call is retried once, transparently.
func TestClosedIdleConnectionIsRetried(t *testing.T) {
	addr, opened, srv := countingServer(t, &fakeAgent{})
	p := newPool(t, Config{})
	host := uuid.New()
	if _, err := p.ListSandboxes(t.Context(), host, addr); err != nil {
		t.Fatal(err)
	}
	// The agent closes it while idle (its idle timeout, a restart).
	srv.CloseClientConnections()
	if _, err := p.ListSandboxes(t.Context(), host, addr); err != nil {
		t.Fatalf("call after the agent closed the idle connection: %v", err)
	}
	if n := opened(); n != 2 {
		t.Fatalf("%d connections opened, want 2 (the retry's)", n)
	}
}

// An idle connection older than IdleTimeout is not used again.
func TestIdleConnectionExpires(t *testing.T) {
	addr, opened := countingAgent(t, &fakeAgent{})
	p := newPool(t, Config{IdleTimeout: time.Minute})
	now := time.Now()
	p.now = func() time.Time { return now }
	host := uuid.New()
	if _, err := p.ListSandboxes(t.Context(), host, addr); err != nil {
		t.Fatal(err)
	}
	now = now.Add(2 * time.Minute)
	if _, err := p.ListSandboxes(t.Context(), host, addr); err != nil {
		t.Fatal(err)
	}
	if n := opened(); n != 2 {
		t.Fatalf("%d connections opened, want 2 (the idle one expired)", n)
	}
}

// A response whose headers never end is refused, not held in memory.
func TestHugeResponseHeaderIsRefused(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		_, _ = io.CopyN(io.Discard, c, 1) // a request arrived
		_, _ = c.Write([]byte("HTTP/1.1 200 OK\r\nX-Junk: "))
		junk := bytes.Repeat([]byte("a"), 32<<10)
		for range 8 {
			if _, err := c.Write(junk); err != nil {
				return
			}
		}
	}()
	p := newPool(t, Config{Timeout: 5 * time.Second})
	_, err = p.ListSandboxes(t.Context(), uuid.New(), ln.Addr().String())
	if err == nil || !strings.Contains(err.Error(), "header too large") {
		t.Fatalf("got %v, want a refused header", err)
	}
}

// Answers are not compressed: the pool offers no encoding, so the agent
// spends no CPU compressing and vigil none inflating.
func TestNoCompressionOffered(t *testing.T) {
	addr, rec := startAgent(t, &fakeAgent{list: func(context.Context, *connect.Request[hostagentv1.ListSandboxesRequest]) (*connect.Response[hostagentv1.ListSandboxesResponse], error) {
		return connect.NewResponse(&hostagentv1.ListSandboxesResponse{Sandboxes: []*hostagentv1.SandboxInfo{{SandboxId: strings.Repeat("a", 4096)}}}), nil
	}})
	p := newPool(t, Config{})
	if _, err := p.ListSandboxes(t.Context(), uuid.New(), addr); err != nil {
		t.Fatal(err)
	}
	if got := rec.only(t).acceptEncoding; strings.Contains(got, "gzip") {
		t.Fatalf("request offered %q", got)
	}
}

func TestIdleClientsAreDropped(t *testing.T) {
	addr, _ := startAgent(t, &fakeAgent{})
	p := newPool(t, Config{IdleTimeout: time.Minute})
	now := time.Now()
	p.now = func() time.Time { return now }
	idle, busy := uuid.New(), uuid.New()
	for _, h := range []uuid.UUID{idle, busy} {
		if _, err := p.ListSandboxes(t.Context(), h, addr); err != nil {
			t.Fatal(err)
		}
	}
	busyTarget, _ := p.target(busy, addr)
	now = now.Add(40 * time.Second)
	if _, err := p.ListSandboxes(t.Context(), busy, addr); err != nil {
		t.Fatal(err)
	}
	if p.Len() != 2 {
		t.Fatalf("Len = %d before IdleTimeout, want 2", p.Len())
	}
	now = now.Add(30 * time.Second) // idle was last used 70 s ago, busy 30 s ago
	if c, _ := p.target(busy, addr); c != busyTarget {
		t.Fatal("the target of a host in use changed")
	}
	if p.Len() != 1 {
		t.Fatalf("Len = %d after IdleTimeout, want 1 (the idle host's client dropped)", p.Len())
	}
	p.mu.Lock()
	_, kept := p.targets[idle]
	p.mu.Unlock()
	if kept {
		t.Fatal("the idle host's client was kept")
	}
}

// The transport keeps at most MaxIdleConns idle connections, whatever the
// number of agents called.
func TestIdleConnectionsAreCapped(t *testing.T) {
	var mu sync.Mutex
	open := 0
	var addrs []string
	for range 6 {
		srv := httptest.NewUnstartedServer(agentHandler(&fakeAgent{}, &recorder{}))
		srv.Config.ConnState = func(_ net.Conn, st http.ConnState) {
			mu.Lock()
			defer mu.Unlock()
			switch st {
			case http.StateNew:
				open++
			case http.StateClosed, http.StateHijacked:
				open--
			}
		}
		srv.Start()
		t.Cleanup(srv.Close)
		addrs = append(addrs, srv.Listener.Addr().String())
	}
	p := newPool(t, Config{MaxIdleConns: 2})
	for _, a := range addrs {
		if _, err := p.ListSandboxes(t.Context(), uuid.New(), a); err != nil {
			t.Fatal(err)
		}
	}
	testwait.For(t, 5*time.Second, "at most MaxIdleConns=2 connections open to 6 agents", func() bool {
		mu.Lock()
		defer mu.Unlock()
		return open <= 2
	})
}

// With more agents than idle slots, the same agents keep their connection
// from sweep to sweep and only the others dial, even with every call of a
// sweep in flight at once (a slot is held while its connection is in use).
func TestKeptConnectionsStayWithTheirAgents(t *testing.T) {
	const agents, slots, sweeps = 8, 3, 6
	addrs := make([]string, agents)
	opened := make([]func() int, agents)
	for i := range agents {
		addrs[i], opened[i] = countingAgent(t, &fakeAgent{})
	}
	p := newPool(t, Config{MaxIdleConns: slots})
	ids := make([]uuid.UUID, agents)
	for i := range ids {
		ids[i] = uuid.New()
	}
	total := func() (n int) {
		for _, o := range opened {
			n += o()
		}
		return n
	}
	for sweep := range sweeps {
		before := total()
		var wg sync.WaitGroup
		for i := range agents {
			wg.Add(1)
			go func() {
				defer wg.Done()
				if _, err := p.ListSandboxes(t.Context(), ids[i], addrs[i]); err != nil {
					t.Error(err)
				}
			}()
		}
		wg.Wait()
		if dials := total() - before; sweep > 0 && dials != agents-slots {
			t.Fatalf("sweep %d dialled %d agents, want %d (the %d without a slot)", sweep, dials, agents-slots, agents-slots)
		}
	}
	kept := 0
	for i := range agents {
		if opened[i]() == 1 {
			kept++
		}
	}
	if kept != slots {
		t.Fatalf("%d agents kept their first connection through %d sweeps, want %d", kept, sweeps, slots)
	}
}

func TestConcurrentCallsAndLen(t *testing.T) {
	addrA, recA := startAgent(t, &fakeAgent{})
	addrB, recB := startAgent(t, &fakeAgent{})
	p := newPool(t, Config{})
	hosts := []uuid.UUID{uuid.New(), uuid.New(), uuid.New(), uuid.New()}

	const workers, calls = 8, 25
	var wg sync.WaitGroup
	errs := make(chan error, workers*calls)
	for w := range workers {
		wg.Go(func() {
			for i := range calls {
				host := hosts[(w+i)%len(hosts)]
				addr := addrA
				if (w+i)%3 == 0 {
					addr = addrB
				}
				var err error
				if i%2 == 0 {
					_, err = p.ListSandboxes(t.Context(), host, addr)
				} else {
					err = p.DestroySandbox(t.Context(), host, addr, "cl-x", "1:1")
				}
				if err != nil {
					errs <- err
				}
				if i%5 == 0 {
					_ = p.Len()
				}
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	if got := len(recA.all()) + len(recB.all()); got != workers*calls {
		t.Fatalf("agents saw %d requests, want %d", got, workers*calls)
	}
}

func TestValidate(t *testing.T) {
	for _, tc := range []struct {
		name string
		cfg  Config
		want string // "" means valid
	}{
		{"zero config is valid", Config{}, ""},
		{"all three TLS files", Config{CAFile: "ca", CertFile: "c", KeyFile: "k"}, ""},
		{"cert without key", Config{CAFile: "ca", CertFile: "c"}, "agentpool: CertFile set without KeyFile"},
		{"cert alone", Config{CertFile: "c"}, "agentpool: CertFile set without KeyFile"},
		{"key without cert", Config{CAFile: "ca", KeyFile: "k"}, "agentpool: KeyFile set without CertFile"},
		{"cert and key without CA", Config{CertFile: "c", KeyFile: "k"}, "agentpool: CertFile and KeyFile set without CAFile"},
		{"CA alone", Config{CAFile: "ca"}, "agentpool: CAFile set without CertFile and KeyFile"},
		{"negative timeout", Config{Timeout: -time.Second}, "agentpool: Timeout must not be negative"},
		{"negative response cap", Config{MaxResponseBytes: -1}, "agentpool: MaxResponseBytes must not be negative"},
		{"negative idle cap", Config{MaxIdleConns: -1}, "agentpool: MaxIdleConns must not be negative"},
		{"negative idle timeout", Config{IdleTimeout: -time.Second}, "agentpool: IdleTimeout must not be negative"},
		{"negative TLS sessions", Config{TLSSessions: -1}, "agentpool: TLSSessions must not be negative"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := tc.cfg.Validate()
			if tc.want == "" {
				if err != nil {
					t.Fatalf("Validate = %v, want nil", err)
				}
				return
			}
			if err == nil || !strings.HasPrefix(err.Error(), tc.want) {
				t.Fatalf("Validate = %v, want %q", err, tc.want)
			}
			if _, err := New(tc.cfg); err == nil {
				t.Fatal("New accepted a config Validate rejects")
			}
		})
	}
}

func TestValidateFillsDefaults(t *testing.T) {
	var cfg Config
	if err := cfg.Validate(); err != nil {
		t.Fatal(err)
	}
	if cfg.Timeout != 5*time.Second || cfg.MaxResponseBytes != 4<<20 || cfg.Logger == nil {
		t.Fatalf("defaults not filled: %+v", cfg)
	}
	cfg = Config{Timeout: time.Second, MaxResponseBytes: 10}
	if err := cfg.Validate(); err != nil {
		t.Fatal(err)
	}
	if cfg.Timeout != time.Second || cfg.MaxResponseBytes != 10 {
		t.Fatalf("explicit values overwritten: %+v", cfg)
	}
}

// --- mutual TLS ---

type certAuthority struct {
	cert *x509.Certificate
	key  *ecdsa.PrivateKey
	pem  []byte
}

func newCA(t testing.TB, cn string) *certAuthority {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: cn},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(time.Hour),
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	return &certAuthority{cert: cert, key: key, pem: pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})}
}

// issue signs a leaf certificate for cn with the given usage and returns it
// as PEM certificate and PEM key.
func (ca *certAuthority) issue(t testing.TB, cn string, usage x509.ExtKeyUsage) (certPEM, keyPEM []byte) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	serial, err := rand.Int(rand.Reader, big.NewInt(1<<62))
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: serial,
		Subject:      pkix.Name{CommonName: cn},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{usage},
	}
	if usage == x509.ExtKeyUsageServerAuth {
		tmpl.IPAddresses = []net.IP{net.IPv4(127, 0, 0, 1), net.IPv6loopback}
		tmpl.DNSNames = []string{"localhost"}
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.cert, &key.PublicKey, ca.key)
	if err != nil {
		t.Fatal(err)
	}
	keyDER, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}),
		pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: keyDER})
}

func writeFile(t testing.TB, dir, name string, data []byte) string {
	t.Helper()
	path := filepath.Join(dir, name)
	if err := os.WriteFile(path, data, 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

// startTLSAgent serves agent over TLS requiring a client certificate signed by
// ca. The server also offers HTTP/2, so a request arriving as HTTP/1.1 shows
// the client refused it.
func startTLSAgent(t *testing.T, ca *certAuthority, agent hostagentv1connect.HostAgentServiceHandler) (string, *recorder) {
	t.Helper()
	certPEM, keyPEM := ca.issue(t, "agent", x509.ExtKeyUsageServerAuth)
	serverCert, err := tls.X509KeyPair(certPEM, keyPEM)
	if err != nil {
		t.Fatal(err)
	}
	clientCAs := x509.NewCertPool()
	clientCAs.AddCert(ca.cert)
	rec := &recorder{}
	srv := httptest.NewUnstartedServer(agentHandler(agent, rec))
	srv.EnableHTTP2 = true
	srv.TLS = &tls.Config{
		Certificates: []tls.Certificate{serverCert},
		ClientAuth:   tls.RequireAndVerifyClientCert,
		ClientCAs:    clientCAs,
	}
	// Handshake failures are the point of some tests; keep them out of the log.
	srv.Config.ErrorLog = log.New(io.Discard, "", 0)
	srv.StartTLS()
	t.Cleanup(srv.Close)
	return srv.Listener.Addr().String(), rec
}

func TestMutualTLS(t *testing.T) {
	ca := newCA(t, "vigil test CA")
	addr, rec := startTLSAgent(t, ca, &fakeAgent{})

	dir := t.TempDir()
	clientCert, clientKey := ca.issue(t, "vigil-client", x509.ExtKeyUsageClientAuth)
	cfg := Config{
		CAFile:   writeFile(t, dir, "ca.pem", ca.pem),
		CertFile: writeFile(t, dir, "client.pem", clientCert),
		KeyFile:  writeFile(t, dir, "client-key.pem", clientKey),
	}

	t.Run("configured pool succeeds over https with its certificate", func(t *testing.T) {
		p := newPool(t, cfg)
		if _, err := p.ListSandboxes(t.Context(), uuid.New(), addr); err != nil {
			t.Fatalf("ListSandboxes: %v", err)
		}
		if err := p.DestroySandbox(t.Context(), uuid.New(), addr, "cl-x", "2:5"); err != nil {
			t.Fatalf("DestroySandbox: %v", err)
		}
		reqs := rec.all()
		if len(reqs) != 2 {
			t.Fatalf("agent saw %d requests, want 2", len(reqs))
		}
		for _, r := range reqs {
			if r.protoMajor != 1 || r.peerCN != "vigil-client" || r.contentType != "application/proto" {
				t.Errorf("agent saw %+v, want HTTP/1.1, client CN vigil-client, application/proto", r)
			}
		}
	})

	before := len(rec.all())
	t.Run("pool without a client certificate is refused", func(t *testing.T) {
		p := newPool(t, cfg)
		p.tr.tls.Certificates = nil
		if _, err := p.ListSandboxes(t.Context(), uuid.New(), addr); err == nil {
			t.Fatal("call without client certificate succeeded")
		}
	})
	t.Run("client certificate from another CA is refused", func(t *testing.T) {
		other := newCA(t, "someone else's CA")
		otherCert, otherKey := other.issue(t, "intruder", x509.ExtKeyUsageClientAuth)
		d := t.TempDir()
		p := newPool(t, Config{
			CAFile:   cfg.CAFile,
			CertFile: writeFile(t, d, "client.pem", otherCert),
			KeyFile:  writeFile(t, d, "client-key.pem", otherKey),
		})
		if _, err := p.ListSandboxes(t.Context(), uuid.New(), addr); err == nil {
			t.Fatal("call with a foreign client certificate succeeded")
		}
	})
	t.Run("plain pool is refused", func(t *testing.T) {
		p := newPool(t, Config{})
		if _, err := p.ListSandboxes(t.Context(), uuid.New(), addr); err == nil {
			t.Fatal("plain http to a TLS agent succeeded")
		}
		if _, err := p.ListSandboxes(t.Context(), uuid.New(), "https://"+addr); err == nil {
			t.Fatal("https without the CA succeeded")
		}
	})
	if after := len(rec.all()); after != before {
		t.Fatalf("refused clients reached the handler %d times", after-before)
	}
}

func TestNewRejectsUnreadableTLSFiles(t *testing.T) {
	ca := newCA(t, "ca")
	certPEM, keyPEM := ca.issue(t, "c", x509.ExtKeyUsageClientAuth)
	dir := t.TempDir()
	caFile := writeFile(t, dir, "ca.pem", ca.pem)
	certFile := writeFile(t, dir, "c.pem", certPEM)
	keyFile := writeFile(t, dir, "k.pem", keyPEM)
	junk := writeFile(t, dir, "junk.pem", []byte("not pem"))
	missing := filepath.Join(dir, "missing.pem")

	for _, tc := range []struct {
		name, ca, cert, key, want string
	}{
		{"missing CA", missing, certFile, keyFile, "agentpool: read CAFile"},
		{"CA not PEM", junk, certFile, keyFile, "agentpool: CAFile"},
		{"missing key", caFile, certFile, missing, "agentpool: load CertFile/KeyFile"},
		{"cert not PEM", caFile, junk, keyFile, "agentpool: load CertFile/KeyFile"},
		{"key does not match cert", caFile, certFile, writeFile(t, dir, "other-key.pem", mustIssueKey(t, ca)), "agentpool: load CertFile/KeyFile"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := New(Config{CAFile: tc.ca, CertFile: tc.cert, KeyFile: tc.key})
			if err == nil || !strings.HasPrefix(err.Error(), tc.want) {
				t.Fatalf("New = %v, want error starting %q", err, tc.want)
			}
		})
	}
	p := newPool(t, Config{CAFile: caFile, CertFile: certFile, KeyFile: keyFile})
	if p.scheme != "https" {
		t.Fatalf("scheme = %q with TLS configured, want https", p.scheme)
	}
}

func mustIssueKey(t *testing.T, ca *certAuthority) []byte {
	_, key := ca.issue(t, "other", x509.ExtKeyUsageClientAuth)
	return key
}

// --- metrics ---

func TestMetrics(t *testing.T) {
	agent := &fakeAgent{destroy: func(_ context.Context, req *connect.Request[hostagentv1.DestroySandboxRequest]) (*connect.Response[hostagentv1.DestroySandboxResponse], error) {
		switch req.Msg.GetSandboxId() {
		case "cl-gone":
			return nil, connect.NewError(connect.CodeNotFound, errors.New("gone"))
		case "cl-fenced":
			return nil, connect.NewError(connect.CodeFailedPrecondition, errors.New("stale fence"))
		}
		return connect.NewResponse(&hostagentv1.DestroySandboxResponse{}), nil
	}}
	addr, _ := startAgent(t, agent)
	reg := prometheus.NewRegistry()
	p := newPool(t, Config{Registerer: reg})
	host := uuid.New()

	if _, err := p.ListSandboxes(t.Context(), host, addr); err != nil {
		t.Fatal(err)
	}
	if _, err := p.ListSandboxes(t.Context(), uuid.New(), closedAddress(t)); err == nil {
		t.Fatal("call to a closed port succeeded")
	}
	if err := p.DestroySandbox(t.Context(), host, addr, "cl-x", ""); err != nil {
		t.Fatal(err)
	}
	if err := p.DestroySandbox(t.Context(), host, addr, "cl-gone", ""); err != nil {
		t.Fatal(err)
	}
	if err := p.DestroySandbox(t.Context(), host, addr, "cl-fenced", ""); err == nil {
		t.Fatal("fenced destroy succeeded")
	}
	// Refused before any request: not observed.
	if _, err := p.ListSandboxes(t.Context(), host, ""); !errors.Is(err, ErrNoAddress) {
		t.Fatal(err)
	}

	// A second pool on the same registry shares the collectors.
	p2 := newPool(t, Config{Registerer: reg})
	if _, err := p2.ListSandboxes(t.Context(), host, addr); err != nil {
		t.Fatal(err)
	}

	durations, errs := gather(t, reg)
	wantDurations := map[string]uint64{
		"ListSandboxes/ok":                   2,
		"ListSandboxes/unavailable":          1,
		"DestroySandbox/ok":                  1,
		"DestroySandbox/not_found":           1,
		"DestroySandbox/failed_precondition": 1,
	}
	wantErrs := map[string]float64{
		"ListSandboxes/unavailable":          1,
		"DestroySandbox/failed_precondition": 1,
	}
	if fmt.Sprint(durations) != fmt.Sprint(wantDurations) {
		t.Errorf("vigil_agent_rpc_duration_seconds counts = %v, want %v", durations, wantDurations)
	}
	if fmt.Sprint(errs) != fmt.Sprint(wantErrs) {
		t.Errorf("vigil_agent_rpc_errors_total = %v, want %v", errs, wantErrs)
	}
}

// gather returns the histogram sample counts and the error counter values,
// keyed by "procedure/code".
func gather(t *testing.T, reg *prometheus.Registry) (map[string]uint64, map[string]float64) {
	t.Helper()
	families, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	durations := map[string]uint64{}
	errs := map[string]float64{}
	for _, mf := range families {
		for _, m := range mf.GetMetric() {
			key := label(m, "procedure") + "/" + label(m, "code")
			switch mf.GetName() {
			case "vigil_agent_rpc_duration_seconds":
				durations[key] = m.GetHistogram().GetSampleCount()
			case "vigil_agent_rpc_errors_total":
				errs[key] = m.GetCounter().GetValue()
			case "vigil_agent_bad_addresses_total":
				if v := m.GetCounter().GetValue(); v != 0 {
					t.Errorf("vigil_agent_bad_addresses_total{reason=%q} = %v, want 0", label(m, "reason"), v)
				}
			default:
				t.Errorf("unexpected metric %s", mf.GetName())
			}
		}
	}
	return durations, errs
}

func label(m *dto.Metric, name string) string {
	for _, l := range m.GetLabel() {
		if l.GetName() == name {
			return l.GetValue()
		}
	}
	return ""
}
