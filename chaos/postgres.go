package chaos

import (
	"context"
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

// privatePostgres is a Postgres server of the run's own, started from the
// machine's installation on a data directory of its own, so the
// postgres-restart fault can restart it without touching the server other
// tests and benchmarks share. It runs as the postgres user when the
// harness runs as root (Postgres refuses root).
type privatePostgres struct {
	bindir string
	dir    string // data directory (and socket directory)
	port   int
	cred   *syscall.Credential
	logDir string
	proc   *vigiltest.Process
}

func startPrivatePostgres(ctx context.Context, logDir string) (*privatePostgres, error) {
	bindir, err := pgtest.ServerBindir()
	if err != nil {
		return nil, err
	}
	p := &privatePostgres{bindir: bindir, logDir: logDir}
	if p.dir, err = os.MkdirTemp("", "vigil-chaos-pg-"); err != nil {
		return nil, err
	}
	if p.cred, err = pgtest.ServerCredential(p.dir); err != nil {
		p.remove()
		return nil, err
	}
	addr, err := vigiltest.FreePort()
	if err != nil {
		return nil, err
	}
	_, portStr, _ := strings.Cut(addr, ":")
	p.port, _ = strconv.Atoi(portStr)
	initdb := exec.CommandContext(ctx, filepath.Join(bindir, "initdb"), "-D", p.dir, "-U", "postgres", "-A", "trust", "-E", "UTF8", "--no-sync")
	initdb.SysProcAttr = &syscall.SysProcAttr{Credential: p.cred}
	if out, err := initdb.CombinedOutput(); err != nil {
		p.remove()
		return nil, fmt.Errorf("initdb: %v\n%s", err, out)
	}
	if err := p.start(ctx); err != nil {
		p.remove()
		return nil, err
	}
	return p, nil
}

func (p *privatePostgres) adminURL() string {
	return fmt.Sprintf("postgres://postgres@127.0.0.1:%d/postgres?sslmode=disable", p.port)
}

func (p *privatePostgres) start(ctx context.Context) error {
	logf, err := os.OpenFile(filepath.Join(p.logDir, "postgres.log"), os.O_CREATE|os.O_APPEND|os.O_WRONLY, 0o644)
	if err != nil {
		return err
	}
	args := []string{"-D", p.dir, "-p", strconv.Itoa(p.port), "-k", p.dir, "-c", "listen_addresses=127.0.0.1",
		"-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off", "-c", "max_connections=300"}
	cmd := exec.Command(filepath.Join(p.bindir, "postgres"), args...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: p.cred}
	proc, err := vigiltest.StartCmd("postgres", cmd, logf)
	if err != nil {
		logf.Close()
		return err
	}
	go func() { <-proc.Done(); logf.Close() }()
	p.proc = proc
	return poll(ctx, 60*time.Second, "the run's Postgres to accept connections", func() (bool, string) {
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
		return p.proc.Kill(10 * time.Second)
	}
	return nil
}

// restart stops the server and starts it again on the same data.
func (p *privatePostgres) restart(ctx context.Context) error {
	if err := p.stop(); err != nil {
		return err
	}
	if err := p.start(ctx); err != nil {
		return err
	}
	if p.proc.Exited() {
		return fmt.Errorf("the run's Postgres exited at restart (%s)", p.proc.ExitString())
	}
	return nil
}

func (p *privatePostgres) remove() { _ = os.RemoveAll(p.dir) }
