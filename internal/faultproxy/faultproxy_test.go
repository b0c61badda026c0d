package faultproxy

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/url"
	"os"
	"sync"
	"syscall"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/goleak"
	"go.uber.org/zap"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/connectivity"
	"google.golang.org/grpc/status"

	"github.com/vigil-sh/vigil/internal/etcdtest"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

// echoServer echoes every connection until its peer half-closes, then closes
// it, and counts the connections it accepted.
type echoServer struct {
	ln net.Listener
	wg sync.WaitGroup

	mu       sync.Mutex
	accepted int
	conns    map[net.Conn]struct{}
}

func newEchoServer(t *testing.T) *echoServer {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	s := &echoServer{ln: ln, conns: make(map[net.Conn]struct{})}
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			s.mu.Lock()
			s.accepted++
			s.conns[c] = struct{}{}
			s.mu.Unlock()
			s.wg.Add(1)
			go func() {
				defer s.wg.Done()
				_, _ = io.Copy(c, c)
				c.Close()
			}()
		}
	}()
	t.Cleanup(func() {
		ln.Close()
		s.mu.Lock()
		for c := range s.conns {
			c.Close()
		}
		s.mu.Unlock()
		s.wg.Wait()
	})
	return s
}

func (s *echoServer) acceptedCount() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.accepted
}

func newProxy(t *testing.T, target string) *Proxy {
	t.Helper()
	p, err := New(target)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = p.Close() })
	return p
}

func dial(t *testing.T, addr string) *net.TCPConn {
	t.Helper()
	c, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c.(*net.TCPConn)
}

// roundTrip writes msg and reads it back, failing the test after 5 s.
func roundTrip(t *testing.T, c net.Conn, msg string) {
	t.Helper()
	if _, err := c.Write([]byte(msg)); err != nil {
		t.Fatalf("write: %v", err)
	}
	expectRead(t, c, msg)
}

func expectRead(t *testing.T, c net.Conn, want string) {
	t.Helper()
	_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
	got := make([]byte, len(want))
	if _, err := io.ReadFull(c, got); err != nil {
		t.Fatalf("read: %v", err)
	}
	if string(got) != want {
		t.Fatalf("read %q, want %q", got, want)
	}
}

// expectSilence checks that nothing, not even an error, arrives on c for a
// while: the signature of a blackhole.
func expectSilence(t *testing.T, c net.Conn) {
	t.Helper()
	_ = c.SetReadDeadline(time.Now().Add(200 * time.Millisecond))
	n, err := c.Read(make([]byte, 1))
	if n != 0 || !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("read during blackhole: n=%d err=%v, want nothing and a deadline", n, err)
	}
}

// expectClosed checks that c's peer reset or ended it.
func expectClosed(t *testing.T, c net.Conn) {
	t.Helper()
	_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
	_, err := io.ReadAll(c)
	if errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("connection still open")
	}
}

// expectRefused checks that a new connection to addr fails: either the dial
// itself (the reset can beat connect's return) or its first read.
func expectRefused(t *testing.T, addr string) {
	t.Helper()
	c, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		return
	}
	defer c.Close()
	expectClosed(t, c)
}

func TestForwardsManyConnectionsBothWays(t *testing.T) {
	echo := newEchoServer(t)
	p := newProxy(t, echo.ln.Addr().String())
	big := string(bytes.Repeat([]byte("0123456789abcdef"), 64<<10)) // 1 MiB, many reads
	var wg sync.WaitGroup
	for i := range 4 {
		c := dial(t, p.Addr())
		wg.Add(1)
		go func() {
			defer wg.Done()
			msg := fmt.Sprintf("conn %d ", i) + big
			go func() { _, _ = c.Write([]byte(msg)) }()
			_ = c.SetReadDeadline(time.Now().Add(10 * time.Second))
			got := make([]byte, len(msg))
			if _, err := io.ReadFull(c, got); err != nil || string(got) != msg {
				t.Errorf("conn %d: echo mismatch (err %v)", i, err)
			}
		}()
	}
	wg.Wait()
}

func TestHalfCloseReachesTarget(t *testing.T) {
	echo := newEchoServer(t)
	p := newProxy(t, echo.ln.Addr().String())
	c := dial(t, p.Addr())
	if _, err := c.Write([]byte("last words")); err != nil {
		t.Fatal(err)
	}
	if err := c.CloseWrite(); err != nil {
		t.Fatal(err)
	}
	_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
	got, err := io.ReadAll(c)
	if err != nil || string(got) != "last words" {
		t.Fatalf("after half-close read %q, %v; want the echo then EOF", got, err)
	}
}

func TestCutResetsLiveAndNewConnectionsUntilHeal(t *testing.T) {
	echo := newEchoServer(t)
	p := newProxy(t, echo.ln.Addr().String())
	live := dial(t, p.Addr())
	roundTrip(t, live, "before")

	p.Cut()
	expectClosed(t, live)
	expectRefused(t, p.Addr())

	p.Heal()
	roundTrip(t, dial(t, p.Addr()), "after")
}

func TestCutSendsReset(t *testing.T) {
	echo := newEchoServer(t)
	p := newProxy(t, echo.ln.Addr().String())
	c := dial(t, p.Addr())
	roundTrip(t, c, "x")
	p.Cut()
	_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := c.Read(make([]byte, 1)); !errors.Is(err, syscall.ECONNRESET) {
		t.Fatalf("read after cut: %v, want connection reset", err)
	}
}

func TestBlackholeHoldsTrafficSilentlyAndHealDeliversIt(t *testing.T) {
	echo := newEchoServer(t)
	p := newProxy(t, echo.ln.Addr().String())
	live := dial(t, p.Addr())
	roundTrip(t, live, "before")

	p.Blackhole()
	if _, err := live.Write([]byte("during")); err != nil {
		t.Fatalf("write during blackhole: %v", err)
	}
	expectSilence(t, live)
	fresh := dial(t, p.Addr())
	if _, err := fresh.Write([]byte("fresh")); err != nil {
		t.Fatalf("write on new connection during blackhole: %v", err)
	}
	expectSilence(t, fresh)
	if n := echo.acceptedCount(); n != 1 {
		t.Fatalf("target accepted %d connections during blackhole, want only the first", n)
	}

	p.Heal()
	expectRead(t, live, "during")
	expectRead(t, fresh, "fresh")
	roundTrip(t, live, "after")
}

func TestBlackholeThenCutResets(t *testing.T) {
	echo := newEchoServer(t)
	p := newProxy(t, echo.ln.Addr().String())
	c := dial(t, p.Addr())
	roundTrip(t, c, "x")
	p.Blackhole()
	pending := dial(t, p.Addr()) // accepted, never dialled through
	p.Cut()
	expectClosed(t, c)
	expectClosed(t, pending)
}

func TestCloseEndsEverything(t *testing.T) {
	echo := newEchoServer(t)
	notTheProxy := goleak.IgnoreCurrent()
	p, err := New(echo.ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	live := dial(t, p.Addr())
	roundTrip(t, live, "x")
	p.Blackhole()
	held := dial(t, p.Addr())
	if err := p.Close(); err != nil {
		t.Fatalf("close: %v", err)
	}
	if err := p.Close(); err != nil {
		t.Fatalf("second close: %v", err)
	}
	expectClosed(t, live)
	expectClosed(t, held)
	if c, err := net.DialTimeout("tcp", p.Addr(), time.Second); err == nil {
		c.Close()
		t.Fatalf("proxy still accepts after Close")
	}
	goleak.VerifyNone(t, notTheProxy)
}

func TestUnreachableTargetClosesClient(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	target := ln.Addr().String()
	ln.Close() // nothing listens there now
	p := newProxy(t, target)
	expectClosed(t, dial(t, p.Addr()))
}

// etcd through the proxy.

func proxiedClient(t *testing.T) (*clientv3.Client, *Proxy) {
	t.Helper()
	c := etcdtest.New(t)
	u, err := url.Parse(c.Endpoints()[0])
	if err != nil {
		t.Fatal(err)
	}
	p := newProxy(t, u.Host)
	cli, err := clientv3.New(clientv3.Config{
		Endpoints:   []string{"http://" + p.Addr()},
		DialTimeout: 2 * time.Second,
		Logger:      zap.NewNop(),
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = cli.Close() })
	mustGet(t, cli, time.Now().Add(10*time.Second))
	return cli, p
}

func get(cli *clientv3.Client, timeout time.Duration) error {
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	_, err := cli.Get(ctx, "/faultproxy")
	return err
}

// mustGet polls until a Get succeeds, failing the test at deadline.
func mustGet(t *testing.T, cli *clientv3.Client, deadline time.Time) {
	t.Helper()
	var err error
	for time.Now().Before(deadline) {
		if err = get(cli, 500*time.Millisecond); err == nil {
			return
		}
	}
	t.Fatalf("etcd unreachable through the proxy: %v", err)
}

func isDeadline(err error) bool {
	return errors.Is(err, context.DeadlineExceeded) || status.Code(err) == codes.DeadlineExceeded
}

func TestCutFailsEtcdRequestsUntilHeal(t *testing.T) {
	cli, p := proxiedClient(t)
	p.Cut()
	if err := get(cli, 500*time.Millisecond); !isDeadline(err) {
		t.Fatalf("get during cut: %v, want a context deadline", err)
	}
	p.Heal()
	mustGet(t, cli, time.Now().Add(30*time.Second))
}

func TestBlackholeStallsEtcdRequestsWithoutResetUntilHeal(t *testing.T) {
	cli, p := proxiedClient(t)
	conn := cli.ActiveConnection()
	p.mu.Lock()
	acceptedBefore := p.accepted
	p.mu.Unlock()

	p.Blackhole()
	if err := get(cli, 500*time.Millisecond); !isDeadline(err) {
		t.Fatalf("get during blackhole: %v, want a context deadline", err)
	}
	if s := conn.GetState(); s != connectivity.Ready {
		t.Fatalf("client connection %v during blackhole, want still Ready: the client must see no error", s)
	}

	p.Heal()
	mustGet(t, cli, time.Now().Add(10*time.Second))
	p.mu.Lock()
	acceptedAfter := p.accepted
	p.mu.Unlock()
	if acceptedAfter != acceptedBefore {
		t.Fatalf("client reconnected (%d connections, was %d): the blackhole was not silent", acceptedAfter, acceptedBefore)
	}
}
