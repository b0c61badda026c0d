package chaos

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/vigil-sh/vigil/internal/pgtest"
	"github.com/vigil-sh/vigil/internal/vigiltest"
)

// privatePostgres is one Postgres server of the run's own, started from the
// machine's installation on a data directory of its own, so the faults can
// restart, kill and promote it without touching the server other tests and
// benchmarks share. It runs as the postgres user when the harness runs as
// root (Postgres refuses root), in a process group of its own so a crash
// takes its backends with it.
type privatePostgres struct {
	name   string // log file name: <name>.log
	bindir string
	dir    string // data directory (and socket directory)
	port   int
	cred   *syscall.Credential
	logDir string
	proc   *vigiltest.Process
}

// newPrivatePostgres prepares an empty data directory and a port.
func newPrivatePostgres(name, logDir string) (*privatePostgres, error) {
	bindir, err := pgtest.ServerBindir()
	if err != nil {
		return nil, err
	}
	p := &privatePostgres{name: name, bindir: bindir, logDir: logDir}
	if p.dir, err = os.MkdirTemp("", "vigil-chaos-pg-"); err != nil {
		return nil, err
	}
	if p.cred, err = pgtest.ServerCredential(p.dir); err != nil {
		p.remove()
		return nil, err
	}
	addr, err := vigiltest.FreePort()
	if err != nil {
		p.remove()
		return nil, err
	}
	_, portStr, _ := strings.Cut(addr, ":")
	p.port, _ = strconv.Atoi(portStr)
	return p, nil
}

// startPrivatePostgres initialises and starts a primary.
func startPrivatePostgres(ctx context.Context, name, logDir string) (*privatePostgres, error) {
	p, err := newPrivatePostgres(name, logDir)
	if err != nil {
		return nil, err
	}
	if err := p.run(ctx, "initdb", "-D", p.dir, "-U", "postgres", "-A", "trust", "-E", "UTF8", "--no-sync"); err != nil {
		p.remove()
		return nil, err
	}
	if err := p.start(ctx); err != nil {
		p.remove()
		return nil, err
	}
	return p, nil
}

// startStandby copies the primary reached at from (host:port) with
// pg_basebackup and starts the copy as its streaming standby; the standby
// keeps reaching its primary at from.
func startStandby(ctx context.Context, name, logDir, from string) (*privatePostgres, error) {
	p, err := newPrivatePostgres(name, logDir)
	if err != nil {
		return nil, err
	}
	host, port, _ := strings.Cut(from, ":")
	if err := os.Remove(p.dir); err != nil { // pg_basebackup makes it
		return nil, err
	}
	if err := p.run(ctx, "pg_basebackup", "-h", host, "-p", port, "-U", "postgres", "-D", p.dir, "-R", "-X", "stream", "-c", "fast", "--no-sync"); err != nil {
		p.remove()
		return nil, err
	}
	if err := p.start(ctx); err != nil {
		p.remove()
		return nil, err
	}
	return p, nil
}

// run runs one of the installation's programs as the server's user.
func (p *privatePostgres) run(ctx context.Context, prog string, args ...string) error {
	cmd := exec.CommandContext(ctx, filepath.Join(p.bindir, prog), args...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: p.cred}
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("%s: %v\n%s", prog, err, out)
	}
	return nil
}

func (p *privatePostgres) addr() string { return "127.0.0.1:" + strconv.Itoa(p.port) }

// adminURL reaches the server itself, never through the run's endpoint.
func (p *privatePostgres) adminURL() string {
	return fmt.Sprintf("postgres://postgres@%s/postgres?sslmode=disable", p.addr())
}

// connect opens a connection to database db on this server directly.
func (p *privatePostgres) connect(ctx context.Context, db string) (*pgx.Conn, error) {
	return pgx.Connect(ctx, fmt.Sprintf("postgres://postgres@%s/%s?sslmode=disable", p.addr(), db))
}

// start runs the server. Commits wait for the WAL flush (synchronous_commit
// on) so that a synchronous standby holds every acknowledged commit; fsync
// stays off, since a fault kills processes, never the machine.
func (p *privatePostgres) start(ctx context.Context) error {
	logf, err := os.OpenFile(filepath.Join(p.logDir, p.name+".log"), os.O_CREATE|os.O_APPEND|os.O_WRONLY, 0o644)
	if err != nil {
		return err
	}
	args := []string{"-D", p.dir, "-p", strconv.Itoa(p.port), "-k", p.dir, "-c", "listen_addresses=127.0.0.1",
		"-c", "fsync=off", "-c", "synchronous_commit=on", "-c", "full_page_writes=off", "-c", "max_connections=300",
		"-c", "wal_level=replica", "-c", "max_wal_senders=5", "-c", "hot_standby=on"}
	cmd := exec.Command(filepath.Join(p.bindir, "postgres"), args...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: p.cred, Setpgid: true}
	proc, err := vigiltest.StartCmd(p.name, cmd, logf)
	if err != nil {
		logf.Close()
		return err
	}
	go func() { <-proc.Done(); logf.Close() }()
	p.proc = proc
	err = poll(ctx, 60*time.Second, p.name+" to accept connections", func() (bool, string) {
		if proc.Exited() {
			return true, ""
		}
		cctx, cancel := context.WithTimeout(ctx, time.Second)
		defer cancel()
		c, err := pgx.Connect(cctx, p.adminURL())
		if err != nil {
			return false, err.Error()
		}
		c.Close(cctx)
		return true, ""
	})
	if err == nil && proc.Exited() {
		return fmt.Errorf("%s exited at start (%s); log %s", p.name, proc.ExitString(), logf.Name())
	}
	return err
}

// stop shuts the server down fast (SIGINT: active transactions roll back,
// clients are disconnected) and waits for it.
func (p *privatePostgres) stop() error {
	if p.proc == nil || p.proc.Exited() {
		return nil
	}
	if err := p.proc.Signal(syscall.SIGINT); err != nil {
		return err
	}
	if err := p.proc.Wait(30 * time.Second); err != nil {
		return p.crash()
	}
	return nil
}

// crash ends the server as a dead machine would: SIGKILL to the postmaster
// and every backend at once; it returns once none is left.
func (p *privatePostgres) crash() error {
	if p.proc == nil {
		return nil
	}
	pgid := p.proc.Pid()
	gone := func() bool { return errors.Is(syscall.Kill(-pgid, 0), syscall.ESRCH) }
	return poll(context.Background(), 30*time.Second, p.name+" and its backends to die", func() (bool, string) {
		if gone() {
			return true, ""
		}
		_ = syscall.Kill(-pgid, syscall.SIGKILL)
		return false, "still running"
	})
}

// restart stops the server and starts it again on the same data.
func (p *privatePostgres) restart(ctx context.Context) error {
	if err := p.stop(); err != nil {
		return err
	}
	return p.start(ctx)
}

// promote makes a standby the primary (a new timeline) and waits until it
// accepts writes.
func (p *privatePostgres) promote(ctx context.Context) error {
	c, err := p.connect(ctx, "postgres")
	if err != nil {
		return err
	}
	defer c.Close(context.Background())
	var ok bool
	if err := c.QueryRow(ctx, `select pg_promote(true, 60)`).Scan(&ok); err != nil || !ok {
		return fmt.Errorf("promote %s: %v (%v)", p.name, err, ok)
	}
	return nil
}

// setSync makes the server wait for a synchronous standby's flush before it
// acknowledges a commit (on), or not (off), and waits until the standby is
// in that state.
func (p *privatePostgres) setSync(ctx context.Context, on bool) error {
	c, err := p.connect(ctx, "postgres")
	if err != nil {
		return err
	}
	defer c.Close(context.Background())
	names, want := "", "async"
	if on {
		names, want = "*", "sync"
	}
	if _, err := c.Exec(ctx, `alter system set synchronous_standby_names = '`+names+`'`); err != nil {
		return err
	}
	if _, err := c.Exec(ctx, `select pg_reload_conf()`); err != nil {
		return err
	}
	return poll(ctx, 30*time.Second, "the standby to be "+want, func() (bool, string) {
		var state string
		err := c.QueryRow(ctx, `select coalesce(max(sync_state), 'none') from pg_stat_replication where state = 'streaming'`).Scan(&state)
		if err != nil {
			return false, err.Error()
		}
		return state == want, state
	})
}

func (p *privatePostgres) remove() { _ = os.RemoveAll(p.dir) }
