package agentsim

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"strconv"
	"strings"
	"sync"
	"time"

	"connectrpc.com/connect"
	"github.com/hashicorp/go-hclog"

	"github.com/vigil-sh/vigil/internal/ids"
	"github.com/vigil-sh/vigil/internal/status"
	hostagentv1 "github.com/vigil-sh/vigil/proto/hostagent/v1"
	"github.com/vigil-sh/vigil/proto/hostagent/v1/hostagentv1connect"
)

// FenceHeader carries "<shard>:<token>" on DestroySandbox (SPEC §3).
const FenceHeader = "Vigil-Fence"

// malformedBody is not a protobuf message: a field tag whose varint never
// terminates.
var malformedBody = []byte{0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01}

type ctxKey struct{}

// agentServer is the one HTTP/1.1 listener serving every host's agent, over
// mutual TLS when srv.TLSConfig is set.
type agentServer struct {
	ln         net.Listener
	srv        *http.Server
	cancelBase context.CancelFunc
}

// hostListener accepts only connections addressed to one of the Sim's hosts.
type hostListener struct {
	net.Listener
	sim *Sim
}

func (l hostListener) Accept() (net.Conn, error) {
	for {
		c, err := l.Listener.Accept()
		if err != nil {
			return nil, err
		}
		if l.sim.connHost(c) != nil {
			return c, nil
		}
		_ = c.Close()
	}
}

func (s *Sim) connHost(c net.Conn) *host {
	ta, ok := c.LocalAddr().(*net.TCPAddr)
	if !ok {
		return nil
	}
	a, ok := netip.AddrFromSlice(ta.IP)
	if !ok {
		return nil
	}
	return s.hostAt(a)
}

func (s *Sim) listen() (*agentServer, error) {
	ln, err := net.Listen("tcp", s.cfg.ListenAddr)
	if err != nil {
		return nil, fmt.Errorf("agentsim: listen on %s: %w", s.cfg.ListenAddr, err)
	}
	s.port.Store(int32(ln.Addr().(*net.TCPAddr).Port))

	mux := http.NewServeMux()
	mux.Handle(hostagentv1connect.NewHostAgentServiceHandler(&agentService{sim: s}))
	base, cancel := context.WithCancel(context.Background())
	protocols := new(http.Protocols)
	protocols.SetHTTP1(true) // the real agents disable HTTP/2
	srv := &http.Server{
		Handler:           s.faults(mux),
		Protocols:         protocols,
		ReadHeaderTimeout: 10 * time.Second,
		IdleTimeout:       2 * time.Minute,
		TLSConfig:         s.tlsConfig,
		ErrorLog:          s.log.Named("http").StandardLogger(&hclog.StandardLoggerOptions{InferLevels: true}),
		BaseContext:       func(net.Listener) context.Context { return base },
		ConnContext: func(ctx context.Context, c net.Conn) context.Context {
			return context.WithValue(ctx, ctxKey{}, s.connHost(c))
		},
	}
	return &agentServer{ln: hostListener{Listener: ln, sim: s}, srv: srv, cancelBase: cancel}, nil
}

func (a *agentServer) addr() string { return a.ln.Addr().String() }

// serve returns nil once shutdown has closed the listener. With TLS, the
// handshake runs on each connection's own goroutine, after hostListener has
// dropped connections to addresses that are not hosts.
func (a *agentServer) serve() error {
	var err error
	if a.srv.TLSConfig != nil {
		err = a.srv.ServeTLS(a.ln, "", "")
	} else {
		err = a.srv.Serve(a.ln)
	}
	if !errors.Is(err, http.ErrServerClosed) {
		return err
	}
	return nil
}

// shutdown ends every request context (hung requests abort), then closes the
// listener and waits briefly for handlers to return before closing the rest.
func (a *agentServer) shutdown() {
	a.cancelBase()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := a.srv.Shutdown(ctx); err != nil {
		_ = a.srv.Close()
	}
}

func hostFrom(ctx context.Context) *host {
	h, _ := ctx.Value(ctxKey{}).(*host)
	return h
}

// abort closes the connection without writing a response.
func abort() { panic(http.ErrAbortHandler) }

// faults applies the transport-level fault modes and Config.Latency before
// the Connect handler sees the request. A request whose context ends while
// it waits is dropped without an answer and without side effects.
func (s *Sim) faults(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		h := hostFrom(r.Context())
		if h == nil {
			abort()
		}
		s.inflight.Add(1)
		defer s.inflight.Add(-1)
		m := h.mode.Load()
		phase := m.phase(s.now())
		if phase == ModeDead {
			abort()
		}
		// net/http notices a client that gives up (r.Context() ends) only
		// once the request body has been read to its end; read it now so a
		// hung or delayed request ends with its client, not with the Sim.
		r.Body = readAhead(r.Body)
		delay := s.cfg.Latency
		switch phase {
		case ModeHang:
			<-r.Context().Done()
			abort()
		case ModeSlow:
			delay += m.Delay
		}
		if !wait(r.Context(), delay) {
			abort()
		}
		if phase == ModeMalformed {
			w.Header().Set("Content-Type", "application/proto")
			w.WriteHeader(http.StatusOK)
			_, _ = w.Write(malformedBody)
			return
		}
		next.ServeHTTP(w, r)
	})
}

// maxReadAhead bounds the request body faults reads before the handler
// does; the agent RPC's requests are a few bytes.
const maxReadAhead = 64 << 10

// readAhead reads up to maxReadAhead bytes of body, hitting its end for any
// request of the agent RPC, and returns a body that yields the same bytes.
// A read error is left for the handler to meet.
func readAhead(body io.ReadCloser) io.ReadCloser {
	buf, err := io.ReadAll(io.LimitReader(body, maxReadAhead))
	rest := io.Reader(body)
	if err != nil {
		rest = errReader{err}
	}
	return struct {
		io.Reader
		io.Closer
	}{io.MultiReader(bytes.NewReader(buf), rest), body}
}

type errReader struct{ err error }

func (e errReader) Read([]byte) (int, error) { return 0, e.err }

// wait blocks for d and reports true, or false as soon as ctx ends first.
func wait(ctx context.Context, d time.Duration) bool {
	if d <= 0 {
		return ctx.Err() == nil
	}
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return true
	case <-ctx.Done():
		return false
	}
}

// agentService answers the RPCs for the host the connection is addressed to.
type agentService struct {
	sim *Sim
}

var _ hostagentv1connect.HostAgentServiceHandler = (*agentService)(nil)

func (a *agentService) ListSandboxes(ctx context.Context, _ *connect.Request[hostagentv1.ListSandboxesRequest]) (*connect.Response[hostagentv1.ListSandboxesResponse], error) {
	h := hostFrom(ctx)
	h.mu.Lock()
	vms := h.snapshot()
	h.mu.Unlock()

	m := h.mode.Load()
	resp := &hostagentv1.ListSandboxesResponse{Sandboxes: make([]*hostagentv1.SandboxInfo, 0, len(vms))}
	for _, vm := range vms {
		info := a.info(h, vm)
		switch m.Kind {
		case ModeUnknownStatus:
			info.Status = m.Label
		case ModeDuplicateIDs:
			dup := a.info(h, vm)
			dup.Status = status.Paused
			if vm.Status == status.Paused {
				dup.Status = status.Running
			}
			resp.Sandboxes = append(resp.Sandboxes, info)
			info = dup
		}
		resp.Sandboxes = append(resp.Sandboxes, info)
	}
	if m.Kind == ModeOversized {
		resp.AutoPausedSandboxIds = append(resp.AutoPausedSandboxIds, padding(m.OversizeBytes+1))
	}
	return connect.NewResponse(resp), nil
}

func (a *agentService) info(h *host, vm VM) *hostagentv1.SandboxInfo {
	return &hostagentv1.SandboxInfo{
		SandboxId:        ids.Sandbox(vm.ID),
		Status:           vm.Status,
		Template:         vm.Template,
		Vcpus:            vm.VCPUs,
		MemoryMb:         vm.MemoryMB,
		HostIp:           h.ip.String(),
		CreatedAtUnix:    vm.CreatedAt.Unix(),
		LastActiveAtUnix: vm.LastActiveAt.Unix(),
		TimeoutSec:       300,
		TeamId:           vm.TeamID.String(),
		TemplateId:       "tpl-" + vm.Template,
		Metadata:         cloneMap(vm.Metadata),
	}
}

var (
	padMu    sync.Mutex
	padCache string
)

// padding returns n bytes of poorly compressible ASCII, so a gzip-negotiating
// client still receives a large body.
func padding(n int) string {
	padMu.Lock()
	defer padMu.Unlock()
	if len(padCache) < n {
		const alphabet = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
		b := make([]byte, n)
		x := uint64(0x9e3779b97f4a7c15)
		for i := range b {
			x ^= x << 13
			x ^= x >> 7
			x ^= x << 17
			b[i] = alphabet[x%uint64(len(alphabet))]
		}
		padCache = string(b)
	}
	return padCache[:n]
}

func (a *agentService) DestroySandbox(ctx context.Context, req *connect.Request[hostagentv1.DestroySandboxRequest]) (*connect.Response[hostagentv1.DestroySandboxResponse], error) {
	h := hostFrom(ctx)
	rec := DestroyRecord{Host: h.id, Sandbox: req.Msg.GetSandboxId(), Time: a.sim.now()}
	shard, token, fenced, ferr := parseFence(req.Header().Values(FenceHeader))
	rec.Shard, rec.Token, rec.Fenced = shard, token, fenced

	h.mu.Lock()
	defer h.mu.Unlock()
	reject := func(res DestroyResult, code connect.Code, err error) error {
		rec.Result = res
		h.rejected = appendRecord(h.rejected, rec)
		a.sim.log.Warn("destroy rejected", "host", h.id, "sandbox", rec.Sandbox, "result", res, "error", err)
		return connect.NewError(code, err)
	}
	if ferr != nil {
		return nil, reject(DestroyBadFence, connect.CodeInvalidArgument, ferr)
	}
	if fenced && token < h.fence {
		return nil, reject(DestroyStaleFence, connect.CodeFailedPrecondition,
			fmt.Errorf("fence token %d for shard %d is below %d, the highest seen by this host", token, shard, h.fence))
	}
	id, err := ids.ParseSandbox(rec.Sandbox)
	if err != nil {
		return nil, reject(DestroyBadID, connect.CodeInvalidArgument, err)
	}
	if h.mode.Load().Kind == ModeRefuseDestroy {
		return nil, reject(DestroyRefused, connect.CodeUnavailable, errors.New("destroy refused (mode refuse-destroy)"))
	}
	if fenced {
		h.fence = max(h.fence, token)
	}
	if _, ok := h.vms[id]; !ok {
		rec.Result = DestroyNotFound
		h.destroys = appendRecord(h.destroys, rec)
		return nil, connect.NewError(connect.CodeNotFound, fmt.Errorf("sandbox %s not found", rec.Sandbox))
	}
	delete(h.vms, id)
	rec.Result = DestroyDestroyed
	h.destroys = appendRecord(h.destroys, rec)
	if !fenced {
		a.sim.log.Warn("unfenced destroy accepted", "host", h.id, "sandbox", rec.Sandbox)
	}
	return connect.NewResponse(&hostagentv1.DestroySandboxResponse{}), nil
}

// parseFence parses the Vigil-Fence header; no header is not an error.
func parseFence(values []string) (shard int, token int64, fenced bool, err error) {
	switch len(values) {
	case 0:
		return 0, 0, false, nil
	case 1:
	default:
		return 0, 0, true, fmt.Errorf("%d %s headers, want one", len(values), FenceHeader)
	}
	sh, tok, ok := strings.Cut(strings.TrimSpace(values[0]), ":")
	if !ok {
		return 0, 0, true, fmt.Errorf("%s %q: want <shard>:<token>", FenceHeader, values[0])
	}
	s, err1 := strconv.ParseUint(sh, 10, 31)
	t, err2 := strconv.ParseInt(tok, 10, 64)
	if err1 != nil || err2 != nil || t < 0 {
		return 0, 0, true, fmt.Errorf("%s %q: want decimal <shard>:<token>", FenceHeader, values[0])
	}
	return int(s), t, true, nil
}
