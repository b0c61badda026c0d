// Package vigiltest runs vigil replicas as real processes and records the
// cluster's ownership as etcd sees it, for the end-to-end tests in cmd/vigil
// and the chaos harness in chaos/. Nothing in it depends on package testing:
// callers turn its errors into test failures or exit codes.
package vigiltest

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
)

// Build compiles the Go package pkg (a path or import path) into out with the
// given build tags, from directory dir.
func Build(ctx context.Context, dir, pkg, out string, tags ...string) error {
	args := []string{"build", "-o", out}
	if len(tags) > 0 {
		args = append(args, "-tags", strings.Join(tags, ","))
	}
	cmd := exec.CommandContext(ctx, "go", append(args, pkg)...)
	cmd.Dir = dir
	if b, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("go build %s: %v\n%s", pkg, err, b)
	}
	return nil
}

// FreePort returns a loopback host:port that was free a moment ago.
func FreePort() (string, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "", err
	}
	defer ln.Close()
	return ln.Addr().String(), nil
}

// CleanEnv is this process's environment without VIGIL_* settings, so flags
// are the only configuration of a child.
func CleanEnv() []string {
	var out []string
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "VIGIL_") {
			out = append(out, kv)
		}
	}
	return out
}

// Process is one started child process whose output (stdout and stderr)
// goes to Log (or the writer given to StartWith). Done is closed once it has
// exited and been reaped.
type Process struct {
	ID      string
	Cmd     *exec.Cmd
	Log     *LogBuffer
	Started time.Time

	done     chan struct{}
	state    *os.ProcessState // set before done closes
	exitedAt time.Time
}

// Start starts bin with args and env (nil: CleanEnv), its output captured
// in Log.
func Start(id, bin string, args, env []string) (*Process, error) {
	lb := &LogBuffer{}
	p, err := StartWith(id, bin, args, env, lb)
	if err != nil {
		return nil, err
	}
	p.Log = lb
	return p, nil
}

// StartWith is Start with the output written to out (a log file, say);
// Log is nil.
func StartWith(id, bin string, args, env []string, out io.Writer) (*Process, error) {
	if env == nil {
		env = CleanEnv()
	}
	cmd := exec.Command(bin, args...)
	cmd.Env = env
	return StartCmd(id, cmd, out)
}

// StartCmd starts a prepared command (its own environment, credentials,
// ...) with its output written to out.
func StartCmd(id string, cmd *exec.Cmd, out io.Writer) (*Process, error) {
	cmd.Stdout, cmd.Stderr = out, out
	p := &Process{ID: id, Cmd: cmd, done: make(chan struct{})}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start %s: %w", id, err)
	}
	p.Started = time.Now()
	go func() {
		_ = cmd.Wait()
		p.state, p.exitedAt = cmd.ProcessState, time.Now()
		close(p.done)
	}()
	return p, nil
}

// Pid is the process id.
func (p *Process) Pid() int { return p.Cmd.Process.Pid }

// Done is closed when the process has exited.
func (p *Process) Done() <-chan struct{} { return p.done }

// Exited reports whether the process has exited.
func (p *Process) Exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// State is the exit state; nil while running.
func (p *Process) State() *os.ProcessState {
	if !p.Exited() {
		return nil
	}
	return p.state
}

// ExitedAt is when the exit was observed; zero while running.
func (p *Process) ExitedAt() time.Time {
	if !p.Exited() {
		return time.Time{}
	}
	return p.exitedAt
}

// ExitString describes the exit, or "running".
func (p *Process) ExitString() string {
	if !p.Exited() {
		return "running"
	}
	return p.state.String()
}

// Signal sends sig to the process.
func (p *Process) Signal(sig os.Signal) error { return p.Cmd.Process.Signal(sig) }

// Kill sends SIGKILL and waits up to timeout for the process to be gone. A
// stopped (SIGSTOP) process dies too: SIGKILL needs no SIGCONT.
func (p *Process) Kill(timeout time.Duration) error {
	if p.Exited() {
		return nil
	}
	if err := p.Cmd.Process.Kill(); err != nil && !p.Exited() {
		return fmt.Errorf("kill %s: %w", p.ID, err)
	}
	return p.Wait(timeout)
}

// Wait waits up to timeout for the process to exit.
func (p *Process) Wait(timeout time.Duration) error {
	t := time.NewTimer(timeout)
	defer t.Stop()
	select {
	case <-p.done:
		return nil
	case <-t.C:
		return fmt.Errorf("%s (pid %d) still running %s later", p.ID, p.Pid(), timeout)
	}
}

// Terminate sends SIGTERM and waits up to timeout for the exit; then SIGKILL.
// It reports whether the process exited on its own.
func (p *Process) Terminate(timeout time.Duration) (bool, error) {
	if p.Exited() {
		return true, nil
	}
	if err := p.Signal(syscall.SIGTERM); err != nil && !p.Exited() {
		return false, err
	}
	if p.Wait(timeout) == nil {
		return true, nil
	}
	return false, p.Kill(10 * time.Second)
}

// Replica is one `vigil run` process and its admin listener.
type Replica struct {
	*Process
	Admin string // host:port of /metrics, /healthz, /readyz
}

var httpClient = &http.Client{Timeout: 2 * time.Second}

// Get fetches path from the admin listener.
func (r *Replica) Get(path string) (int, string, error) {
	resp, err := httpClient.Get("http://" + r.Admin + path)
	if err != nil {
		return 0, "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	return resp.StatusCode, strings.TrimSpace(string(b)), err
}

// Metrics reads /metrics as series -> value, the series being the text
// before the value ("name" or "name{labels}").
func (r *Replica) Metrics() (map[string]float64, error) {
	code, body, err := r.Get("/metrics")
	if err != nil {
		return nil, err
	}
	if code != 200 {
		return nil, fmt.Errorf("/metrics: %d", code)
	}
	return ParseMetrics(body)
}

// Metric is one series' value (0 when absent).
func (r *Replica) Metric(series string) (float64, error) {
	m, err := r.Metrics()
	if err != nil {
		return 0, err
	}
	return m[series], nil
}

// ParseMetrics parses the Prometheus text format into series -> value.
func ParseMetrics(body string) (map[string]float64, error) {
	out := map[string]float64{}
	sc := bufio.NewScanner(strings.NewReader(body))
	sc.Buffer(make([]byte, 0, 64<<10), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		if line == "" || line[0] == '#' {
			continue
		}
		i := strings.LastIndexByte(line, ' ')
		if i < 0 {
			continue
		}
		v, err := strconv.ParseFloat(line[i+1:], 64)
		if err != nil {
			continue
		}
		out[line[:i]] = v
	}
	return out, sc.Err()
}

// LogBuffer collects a process's output. Safe for concurrent use.
type LogBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *LogBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *LogBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// Tail is the last n lines.
func (l *LogBuffer) Tail(n int) string {
	lines := strings.Split(strings.TrimRight(l.String(), "\n"), "\n")
	if len(lines) > n {
		lines = append([]string{fmt.Sprintf("... (%d earlier lines)", len(lines)-n)}, lines[len(lines)-n:]...)
	}
	return strings.Join(lines, "\n")
}

// Count is the number of occurrences of s.
func (l *LogBuffer) Count(s string) int {
	return strings.Count(l.String(), s)
}

// StopReasons counts the replica's "shard stopping" log lines (JSON logs) by
// reason.
func (l *LogBuffer) StopReasons() map[string]int {
	out := map[string]int{}
	for _, line := range strings.Split(l.String(), "\n") {
		if !strings.Contains(line, `"@message":"shard stopping"`) {
			continue
		}
		var e struct {
			Reason string `json:"reason"`
		}
		if json.Unmarshal([]byte(line), &e) == nil {
			out[e.Reason]++
		}
	}
	return out
}
