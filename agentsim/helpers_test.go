package agentsim

import (
	"context"
	"net/http"
	"testing"
	"time"

	"connectrpc.com/connect"
	"github.com/jackc/pgx/v5/pgxpool"
	"go.uber.org/goleak"

	"github.com/vigil-sh/vigil/internal/testwait"
	hostagentv1 "github.com/vigil-sh/vigil/proto/hostagent/v1"
	"github.com/vigil-sh/vigil/proto/hostagent/v1/hostagentv1connect"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

// started is a running Sim; stop cancels it and returns Run's result.
type started struct {
	*Sim
	stop func() error
}

// start runs a Sim until the test ends (or stop is called) and waits for it
// to be ready.
func start(t *testing.T, cfg Config) started {
	t.Helper()
	s, err := New(cfg)
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	var runErr error
	go func() {
		defer close(done)
		runErr = s.Run(ctx)
	}()
	stopped := false
	stop := func() error {
		if !stopped {
			stopped = true
			cancel()
			<-done
		}
		return runErr
	}
	t.Cleanup(func() {
		if err := stop(); err != nil {
			t.Errorf("Run: %v", err)
		}
	})
	select {
	case <-s.Ready():
	case <-done:
		t.Fatalf("Run returned before ready: %v", runErr)
	case <-time.After(60 * time.Second):
		t.Fatal("sim not ready after 60s")
	}
	return started{Sim: s, stop: stop}
}

func newPool(t *testing.T, url string) *pgxpool.Pool {
	t.Helper()
	pool, err := pgxpool.New(context.Background(), url)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(pool.Close)
	return pool
}

// http1 is a transport that speaks HTTP/1.1 only, like vigil's agent pool.
func http1(t *testing.T) *http.Transport {
	p := new(http.Protocols)
	p.SetHTTP1(true)
	tr := &http.Transport{Protocols: p, MaxIdleConnsPerHost: 2}
	t.Cleanup(tr.CloseIdleConnections)
	return tr
}

func client(t *testing.T, tr *http.Transport, addr string, opts ...connect.ClientOption) hostagentv1connect.HostAgentServiceClient {
	return hostagentv1connect.NewHostAgentServiceClient(&http.Client{Transport: tr}, "http://"+addr, opts...)
}

func list(ctx context.Context, c hostagentv1connect.HostAgentServiceClient) ([]*hostagentv1.SandboxInfo, error) {
	resp, err := c.ListSandboxes(ctx, connect.NewRequest(&hostagentv1.ListSandboxesRequest{}))
	if err != nil {
		return nil, err
	}
	return resp.Msg.GetSandboxes(), nil
}

func destroy(ctx context.Context, c hostagentv1connect.HostAgentServiceClient, sandbox, fence string) error {
	req := connect.NewRequest(&hostagentv1.DestroySandboxRequest{SandboxId: sandbox})
	if fence != "" {
		req.Header().Set(FenceHeader, fence)
	}
	_, err := c.DestroySandbox(ctx, req)
	return err
}

func ctxTimeout(t *testing.T, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}

// eventually is testwait.For.
var eventually = func(t *testing.T, d time.Duration, what string, cond func() bool) {
	t.Helper()
	testwait.For(t, d, what, cond)
}

func statusesByID(infos []*hostagentv1.SandboxInfo) map[string][]string {
	out := map[string][]string{}
	for _, i := range infos {
		out[i.GetSandboxId()] = append(out[i.GetSandboxId()], i.GetStatus())
	}
	return out
}
