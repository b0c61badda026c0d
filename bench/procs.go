package main

// Child processes: each in its own process group (signals go to the group),
// with SIGKILL as its parent-death signal, its output in a log file, and
// every one registered so that close can kill whatever is left.

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/vigil-sh/vigil/internal/vigiltest"
)

type procTable struct {
	dir string

	mu  sync.Mutex
	all []*proc
}

// proc is one child process.
type proc struct {
	name    string
	cmd     *exec.Cmd
	logPath string
	done    chan struct{} // closed when the process has exited and been reaped
	exitErr error         // valid after done
}

// start runs bin with args; its output goes to <dir>/<name>.log.
func (t *procTable) start(name, bin string, args []string) (*proc, error) {
	logPath := filepath.Join(t.dir, name+".log")
	f, err := os.Create(logPath)
	if err != nil {
		return nil, err
	}
	cmd := exec.Command(bin, args...)
	cmd.Stdout, cmd.Stderr = f, f
	cmd.Env = vigiltest.CleanEnv() // flags are each child's only configuration
	// Own process group: a terminal's Ctrl-C reaches only the bench, which
	// then kills each group. Pdeathsig covers the bench dying without
	// cleaning up.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		f.Close()
		return nil, fmt.Errorf("start %s: %w", name, err)
	}
	p := &proc{name: name, cmd: cmd, logPath: logPath, done: make(chan struct{})}
	go func() {
		p.exitErr = cmd.Wait()
		f.Close()
		close(p.done)
	}()
	t.mu.Lock()
	t.all = append(t.all, p)
	t.mu.Unlock()
	return p, nil
}

func (p *proc) pid() int { return p.cmd.Process.Pid }

func (p *proc) exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// signal sends sig to the process's group.
func (p *proc) signal(sig syscall.Signal) error {
	if p.exited() {
		return nil
	}
	return syscall.Kill(-p.pid(), sig)
}

// wait waits up to timeout for the process to exit.
func (p *proc) wait(timeout time.Duration) bool {
	select {
	case <-p.done:
		return true
	case <-time.After(timeout):
		return false
	}
}

// stop sends SIGTERM, and SIGKILL when the process is still there after
// grace.
func (p *proc) stop(grace time.Duration) {
	_ = p.signal(syscall.SIGTERM)
	if !p.wait(grace) {
		_ = p.signal(syscall.SIGKILL)
		p.wait(10 * time.Second)
	}
}

// kill sends SIGKILL and waits for the exit.
func (p *proc) kill() {
	_ = p.signal(syscall.SIGKILL)
	p.wait(10 * time.Second)
}

// tail is the last n lines of the process's log.
func (p *proc) tail(n int) string {
	b, err := os.ReadFile(p.logPath)
	if err != nil {
		return err.Error()
	}
	lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// exitError describes an exit during start-up, with the log's tail.
func (p *proc) exitError() error {
	return fmt.Errorf("%s exited (%v); last log lines:\n%s", p.name, p.exitErr, p.tail(20))
}

// killAll kills every process group still running and waits for each.
func (t *procTable) killAll() {
	t.mu.Lock()
	all := append([]*proc(nil), t.all...)
	t.mu.Unlock()
	for _, p := range all {
		_ = p.signal(syscall.SIGKILL)
	}
	for _, p := range all {
		p.wait(10 * time.Second)
	}
}

// freeAddr returns a loopback host:port that was free a moment ago.
func freeAddr() (string, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "", err
	}
	defer ln.Close()
	return ln.Addr().String(), nil
}

var (
	adminClient = &http.Client{Timeout: 5 * time.Second}
	longClient  = &http.Client{} // bounded by the caller's context
)

// httpGet fetches a URL, returning status and body, within 5 s.
func httpGet(ctx context.Context, url string) (int, []byte, error) {
	return get(ctx, adminClient, url)
}

// httpGetLong is httpGet bounded by ctx alone.
func httpGetLong(ctx context.Context, url string) (int, []byte, error) {
	return get(ctx, longClient, url)
}

func get(ctx context.Context, hc *http.Client, url string) (int, []byte, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return 0, nil, err
	}
	resp, err := hc.Do(req)
	if err != nil {
		return 0, nil, err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	return resp.StatusCode, b, err
}

func httpPost(ctx context.Context, url, body string) (int, []byte, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, url, strings.NewReader(body))
	if err != nil {
		return 0, nil, err
	}
	req.Header.Set("Content-Type", "application/json")
	resp, err := adminClient.Do(req)
	if err != nil {
		return 0, nil, err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	return resp.StatusCode, bytes.TrimSpace(b), err
}

// poll calls cond every period until it holds or timeout passes, and
// returns the time it held. Errors from cond end the wait.
func poll(ctx context.Context, timeout, period time.Duration, what string, cond func() (bool, string, error)) (time.Time, error) {
	deadline := time.Now().Add(timeout)
	tick := time.NewTicker(period)
	defer tick.Stop()
	detail := ""
	for {
		ok, d, err := cond()
		now := time.Now()
		if err != nil {
			return now, fmt.Errorf("%s: %w", what, err)
		}
		if ok {
			return now, nil
		}
		detail = d
		if now.After(deadline) {
			return now, fmt.Errorf("%s: not after %s (%s)", what, timeout, detail)
		}
		select {
		case <-ctx.Done():
			return now, ctx.Err()
		case <-tick.C:
		}
	}
}
