package pgtest

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
)

// Server is a Postgres server of a test's own, from the machine's
// installation on a data directory of its own, so a test can kill it,
// promote a standby of it, and lose commits, without touching the server
// every other test shares. It runs as the postgres user when the test runs
// as root (Postgres refuses root). Its data is durable (fsync on), as a
// production server's is: what a test loses, it loses by failover.
type Server struct {
	bindir string
	dir    string
	port   int
	cred   *syscall.Credential
	cmd    *exec.Cmd
	done   chan struct{}
}

// StartServer initialises and starts a primary. It is stopped and removed at
// cleanup.
func StartServer(t testing.TB) *Server {
	t.Helper()
	s := newServer(t)
	initdb := s.command(filepath.Join(s.bindir, "initdb"), "-D", s.dir, "-U", "postgres", "-A", "trust", "-E", "UTF8")
	if out, err := initdb.CombinedOutput(); err != nil {
		t.Fatalf("pgtest: initdb: %v\n%s", err, out)
	}
	s.start(t)
	return s
}

// StartStandby copies s with pg_basebackup and starts the copy as an
// asynchronous streaming standby of s. It is stopped and removed at cleanup.
func (s *Server) StartStandby(t testing.TB) *Server {
	t.Helper()
	sb := newServer(t)
	if err := os.Remove(sb.dir); err != nil {
		t.Fatal(err)
	}
	backup := sb.command(filepath.Join(s.bindir, "pg_basebackup"), "-h", "127.0.0.1", "-p", strconv.Itoa(s.port),
		"-U", "postgres", "-D", sb.dir, "-R", "-X", "stream", "-c", "fast")
	if out, err := backup.CombinedOutput(); err != nil {
		t.Fatalf("pgtest: pg_basebackup: %v\n%s", err, out)
	}
	sb.start(t)
	return sb
}

func newServer(t testing.TB) *Server {
	t.Helper()
	bindir, err := ServerBindir()
	if err != nil {
		t.Fatalf("pgtest: %v", err)
	}
	s := &Server{bindir: bindir}
	if s.dir, err = os.MkdirTemp("", "vigil-pgtest-"); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Kill(); _ = os.RemoveAll(s.dir) })
	if s.cred, err = ServerCredential(s.dir); err != nil {
		t.Fatalf("pgtest: %v", err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	s.port = ln.Addr().(*net.TCPAddr).Port
	ln.Close()
	return s
}

func (s *Server) command(name string, args ...string) *exec.Cmd {
	cmd := exec.Command(name, args...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: s.cred}
	return cmd
}

func (s *Server) start(t testing.TB) {
	t.Helper()
	s.cmd = s.command(filepath.Join(s.bindir, "postgres"), "-D", s.dir, "-p", strconv.Itoa(s.port), "-k", s.dir,
		"-c", "listen_addresses=127.0.0.1", "-c", "max_connections=50")
	s.cmd.SysProcAttr.Setpgid = true // Kill ends the postmaster and its backends at once
	logf, err := os.Create(filepath.Join(os.TempDir(), fmt.Sprintf("vigil-pgtest-%d.log", s.port)))
	if err != nil {
		t.Fatal(err)
	}
	s.cmd.Stdout, s.cmd.Stderr = logf, logf
	if err := s.cmd.Start(); err != nil {
		t.Fatalf("pgtest: start postgres: %v", err)
	}
	s.done = make(chan struct{})
	go func() { _ = s.cmd.Wait(); logf.Close(); close(s.done) }()
	deadline := time.Now().Add(60 * time.Second)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		c, err := pgx.Connect(ctx, s.URL("postgres"))
		cancel()
		if err == nil {
			c.Close(context.Background())
			return
		}
		select {
		case <-s.done:
			t.Fatalf("pgtest: postgres on port %d exited at start (log %s)", s.port, logf.Name())
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("pgtest: postgres on port %d not accepting connections: %v", s.port, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// Addr is the server's host:port.
func (s *Server) Addr() string { return "127.0.0.1:" + strconv.Itoa(s.port) }

// URL is the URL of database db on the server, as its superuser.
func (s *Server) URL(db string) string {
	return fmt.Sprintf("postgres://postgres@%s/%s?sslmode=disable", s.Addr(), db)
}

// Kill ends the server the way a crashed machine does: SIGKILL to the
// postmaster and every backend at once, and waits until none is left (a
// backend still attached to the shared memory would stop a restart).
// Unflushed and unreplicated commits are whatever they are. Killing twice is
// a no-op.
func (s *Server) Kill() {
	if s.cmd == nil || s.cmd.Process == nil {
		return
	}
	pgid := s.cmd.Process.Pid
	gone := func() bool { return errors.Is(syscall.Kill(-pgid, 0), syscall.ESRCH) }
	select {
	case <-s.done:
		if gone() {
			return
		}
	default:
	}
	_ = syscall.Kill(-pgid, syscall.SIGKILL)
	<-s.done
	for deadline := time.Now().Add(30 * time.Second); time.Now().Before(deadline); {
		if gone() {
			return
		}
		_ = syscall.Kill(-pgid, syscall.SIGKILL)
		time.Sleep(10 * time.Millisecond)
	}
}

// Restart starts a killed server again on its data (a standby resumes
// streaming from its primary, if that is still up).
func (s *Server) Restart(t testing.TB) {
	t.Helper()
	s.Kill()
	s.start(t)
}

// Promote makes a standby the primary, on a new timeline, and waits until
// it accepts writes.
func (s *Server) Promote(t testing.TB) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	c, err := pgx.Connect(ctx, s.URL("postgres"))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close(context.Background())
	var ok bool
	if err := c.QueryRow(ctx, `select pg_promote(true, 60)`).Scan(&ok); err != nil || !ok {
		t.Fatalf("pgtest: promote: %v (%v)", err, ok)
	}
}

// CaughtUp waits until the standby sb has replayed everything s has
// written so far.
func (s *Server) CaughtUp(t testing.TB, sb *Server) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	p, err := pgx.Connect(ctx, s.URL("postgres"))
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close(context.Background())
	var lsn string
	if err := p.QueryRow(ctx, `select pg_current_wal_lsn()::text`).Scan(&lsn); err != nil {
		t.Fatal(err)
	}
	q, err := pgx.Connect(ctx, sb.URL("postgres"))
	if err != nil {
		t.Fatal(err)
	}
	defer q.Close(context.Background())
	for {
		var done bool
		if err := q.QueryRow(ctx, `select pg_last_wal_replay_lsn() >= $1::pg_lsn`, lsn).Scan(&done); err != nil {
			t.Fatal(err)
		}
		if done {
			return
		}
		select {
		case <-ctx.Done():
			t.Fatalf("pgtest: standby did not replay up to %s", lsn)
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// ServerBindir finds the server binaries: pg_config's, else the newest
// Debian layout.
func ServerBindir() (string, error) {
	if out, err := exec.Command("pg_config", "--bindir").Output(); err == nil {
		d := strings.TrimSpace(string(out))
		if _, err := os.Stat(filepath.Join(d, "initdb")); err == nil {
			return d, nil
		}
	}
	dirs, _ := filepath.Glob("/usr/lib/postgresql/*/bin")
	version := func(dir string) int { v, _ := strconv.Atoi(filepath.Base(filepath.Dir(dir))); return v }
	sort.Slice(dirs, func(i, j int) bool { return version(dirs[i]) < version(dirs[j]) })
	for i := len(dirs) - 1; i >= 0; i-- {
		if _, err := os.Stat(filepath.Join(dirs[i], "initdb")); err == nil {
			return dirs[i], nil
		}
	}
	return "", errors.New("no Postgres server binaries (initdb) found")
}

// ServerCredential is who a server of the machine's installation runs as:
// nil (this process's user), or the postgres user when this process is root
// (Postgres refuses root), to whom dir is then given.
func ServerCredential(dir string) (*syscall.Credential, error) {
	if os.Geteuid() != 0 {
		return nil, nil
	}
	u, err := user.Lookup("postgres")
	if err != nil {
		return nil, fmt.Errorf("running as root needs the postgres user: %w", err)
	}
	uid, _ := strconv.Atoi(u.Uid)
	gid, _ := strconv.Atoi(u.Gid)
	if err := os.Chown(dir, uid, gid); err != nil {
		return nil, err
	}
	return &syscall.Credential{Uid: uint32(uid), Gid: uint32(gid)}, nil
}
