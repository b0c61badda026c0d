package main

// etcd authentication: --etcd-username and --etcd-password-file against a real
// etcd with auth enabled, and the password's handling without one.

import (
	"bytes"
	"context"
	"fmt"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"

	"github.com/vigil-sh/vigil/internal/etcdtest"
	"github.com/vigil-sh/vigil/internal/pgtest"
	"github.com/vigil-sh/vigil/internal/testwait"
)

func TestEtcdPasswordFile(t *testing.T) {
	dir := t.TempDir()
	file := func(name, content string) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(content), 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	for _, tc := range []struct {
		name, user, file string
		want, wantErr    string
	}{
		{name: "no authentication", want: ""},
		{name: "trailing newline trimmed", user: "vigil", file: file("nl", "s3cret\n"), want: "s3cret"},
		{name: "trailing CRLF trimmed", user: "vigil", file: file("crlf", "s3cret\r\n"), want: "s3cret"},
		{name: "no trailing newline", user: "vigil", file: file("plain", "s3 cret"), want: "s3 cret"},
		{name: "username needs a password file", user: "vigil", wantErr: "--etcd-username needs --etcd-password-file"},
		{name: "password file needs a username", file: file("lonely", "s3cret\n"), wantErr: "--etcd-password-file needs --etcd-username"},
		{name: "missing file named", user: "vigil", file: filepath.Join(dir, "absent"), wantErr: "--etcd-password-file: open " + filepath.Join(dir, "absent")},
		{name: "empty file refused", user: "vigil", file: file("empty", "\n"), wantErr: "--etcd-password-file " + filepath.Join(dir, "empty") + " is empty"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := replicaConfig{EtcdUsername: tc.user, EtcdPasswordFile: tc.file}
			got, err := c.etcdPassword()
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("etcdPassword: %v, want an error containing %q", err, tc.wantErr)
				}
				if strings.Contains(err.Error(), "s3cret") {
					t.Fatalf("the error shows the password: %v", err)
				}
				return
			}
			if err != nil || got != tc.want {
				t.Fatalf("etcdPassword = %q, %v; want %q", got, err, tc.want)
			}
		})
	}
}

// TestEtcdAuthFlags: run, shards and owner take --etcd-username and
// --etcd-password-file (with VIGIL_* twins), and nothing takes a password as
// a flag value.
func TestEtcdAuthFlags(t *testing.T) {
	for _, cmd := range []string{"run", "shards", "owner"} {
		var out, errOut bytes.Buffer
		Main([]string{cmd, "-h"}, &out, &errOut)
		help := out.String() + errOut.String()
		for _, want := range []string{"--etcd-username  [$VIGIL_ETCD_USERNAME]", "--etcd-password-file  [$VIGIL_ETCD_PASSWORD_FILE]"} {
			if !strings.Contains(help, want) {
				t.Errorf("vigil %s -h lacks %q:\n%s", cmd, want, help)
			}
		}
		if strings.Contains(help, "--etcd-password ") || strings.Contains(help, "--etcd-password  ") {
			t.Errorf("vigil %s has a password flag:\n%s", cmd, help)
		}
	}
}

// authEtcd is an embedded etcd with authentication enabled: user root, user
// vigil whose role may read and write /vigil/ only, user reader who may only
// read /vigil/, and user stranger whose role may read and write /other/ only.
type authEtcd struct {
	endpoint string
	admin    *clientv3.Client // as root
}

const vigilEtcdPassword = "vigil-Pa55 word"

func newAuthEtcd(t *testing.T) *authEtcd {
	t.Helper()
	e := etcdtest.New(t)
	u, err := url.Parse(e.Endpoints()[0])
	if err != nil {
		t.Fatal(err)
	}
	cli := e.Client(t)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	steps := []struct {
		what string
		do   func() error
	}{
		{"role add root", func() error { _, err := cli.RoleAdd(ctx, "root"); return err }},
		{"user add root", func() error { _, err := cli.UserAdd(ctx, "root", "root-password"); return err }},
		{"user grant-role root root", func() error { _, err := cli.UserGrantRole(ctx, "root", "root"); return err }},
		// What docs/etcd-schema.md tells operators to run for vigil.
		{"role add vigil", func() error { _, err := cli.RoleAdd(ctx, "vigil"); return err }},
		{"role grant-permission --prefix=true vigil readwrite /vigil/", func() error {
			_, err := cli.RoleGrantPermission(ctx, "vigil", "/vigil/", clientv3.GetPrefixRangeEnd("/vigil/"), clientv3.PermissionType(clientv3.PermReadWrite))
			return err
		}},
		{"user add vigil", func() error { _, err := cli.UserAdd(ctx, "vigil", vigilEtcdPassword); return err }},
		{"user grant-role vigil vigil", func() error { _, err := cli.UserGrantRole(ctx, "vigil", "vigil"); return err }},
		// A user that may only read vigil's prefix.
		{"role add reader", func() error { _, err := cli.RoleAdd(ctx, "reader"); return err }},
		{"role grant-permission --prefix=true reader read /vigil/", func() error {
			_, err := cli.RoleGrantPermission(ctx, "reader", "/vigil/", clientv3.GetPrefixRangeEnd("/vigil/"), clientv3.PermissionType(clientv3.PermRead))
			return err
		}},
		{"user add reader", func() error { _, err := cli.UserAdd(ctx, "reader", "reader-password"); return err }},
		{"user grant-role reader reader", func() error { _, err := cli.UserGrantRole(ctx, "reader", "reader"); return err }},
		// A user of another application, with rights on its own prefix only.
		{"role add other", func() error { _, err := cli.RoleAdd(ctx, "other"); return err }},
		{"role grant-permission --prefix=true other readwrite /other/", func() error {
			_, err := cli.RoleGrantPermission(ctx, "other", "/other/", clientv3.GetPrefixRangeEnd("/other/"), clientv3.PermissionType(clientv3.PermReadWrite))
			return err
		}},
		{"user add stranger", func() error { _, err := cli.UserAdd(ctx, "stranger", "stranger-password"); return err }},
		{"user grant-role stranger other", func() error { _, err := cli.UserGrantRole(ctx, "stranger", "other"); return err }},
		{"auth enable", func() error { _, err := cli.AuthEnable(ctx); return err }},
	}
	for _, s := range steps {
		if err := s.do(); err != nil {
			t.Fatalf("etcd %s: %v", s.what, err)
		}
	}
	if _, err := cli.Get(ctx, "/vigil/"); err == nil {
		t.Fatal("etcd answers an unauthenticated read after auth enable")
	}
	admin, err := clientv3.New(clientv3.Config{Endpoints: e.Endpoints(), DialTimeout: 5 * time.Second,
		Username: "root", Password: "root-password", Logger: zap.NewNop()})
	if err != nil {
		t.Fatalf("etcd as root: %v", err)
	}
	t.Cleanup(func() { _ = admin.Close() })
	return &authEtcd{endpoint: u.Host, admin: admin}
}

// TestEtcdAuthentication runs `vigil run`, `vigil shards` and `vigil owner`
// against an etcd with authentication enabled.
func TestEtcdAuthentication(t *testing.T) {
	if testing.Short() {
		t.Skip("end-to-end test with real processes; skipped in -short mode")
	}
	bin := vigilBinary(t)
	ae := newAuthEtcd(t)
	dbURL := pgtest.New(t)
	dir := t.TempDir()
	secret := func(name, content string) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(content), 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	good := secret("vigil", vigilEtcdPassword+"\n")
	wrong := secret("wrong", "not-the-password\n")
	stranger := secret("stranger", "stranger-password\r\n")
	const shards = 8
	runArgs := func(cluster, user, file string) []string {
		args := []string{"run", "--etcd-endpoints", ae.endpoint, "--database-url", dbURL, "--cluster", cluster,
			"--replica-id", cluster + "-1", "--shards", strconv.Itoa(shards), "--lease-ttl", "2s", "--interval", "2s",
			"--http-addr", freePort(t), "--db-max-conns", "4", "--log-format", "json"}
		if user != "" {
			args = append(args, "--etcd-username", user)
		}
		if file != "" {
			args = append(args, "--etcd-password-file", file)
		}
		return args
	}
	noSecrets := func(t *testing.T, what, out string) {
		t.Helper()
		for _, pw := range []string{vigilEtcdPassword, "not-the-password", "stranger-password", "reader-password"} {
			if strings.Contains(out, pw) {
				t.Errorf("%s shows a password:\n%s", what, out)
			}
		}
		if strings.Contains(out, "panic:") || strings.Contains(out, "goroutine ") {
			t.Errorf("%s crashed:\n%s", what, out)
		}
	}

	t.Run("the right user owns every shard", func(t *testing.T) {
		cluster := "auth-ok"
		args := runArgs(cluster, "vigil", good)
		admin := args[slices.Index(args, "--http-addr")+1]
		cmd := exec.Command(bin, args...)
		cmd.Env = cleanEnv()
		lb := &logBuffer{}
		cmd.Stdout, cmd.Stderr = lb, lb
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		done := make(chan struct{})
		go func() { _ = cmd.Wait(); close(done) }()
		t.Cleanup(func() {
			_ = cmd.Process.Kill()
			<-done
			if t.Failed() {
				t.Logf("replica log:\n%s", lb.Tail(60))
			}
		})
		r := &replica{Admin: admin}
		waitUntil(t, 20*time.Second, "the replica ready, owning every shard", func() (bool, string) {
			select {
			case <-done:
				t.Fatalf("replica exited:\n%s", lb.Tail(40))
			default:
			}
			ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
			defer cancel()
			resp, err := ae.admin.Get(ctx, "/vigil/"+cluster+"/shards/", clientv3.WithPrefix(), clientv3.WithCountOnly())
			if err != nil {
				return false, err.Error()
			}
			code, body, err := r.Get("/readyz")
			return err == nil && code == 200 && resp.Count == shards, strconv.FormatInt(resp.Count, 10) + " owner keys, /readyz " + strconv.Itoa(code) + " " + body
		})
		common := []string{"--etcd-endpoints", ae.endpoint, "--cluster", cluster}
		out, errOut, code := runVigil(t, bin, append([]string{"shards", "--etcd-username", "vigil", "--etcd-password-file", good}, common...)...)
		if code != 0 || !strings.Contains(out, "member "+cluster+"-1 owns 8 shards") {
			t.Errorf("vigil shards as vigil: exit %d\n%s%s", code, out, errOut)
		}
		// The environment twins.
		out, errOut, code = runVigilEnv(t, bin, []string{"VIGIL_ETCD_USERNAME=vigil", "VIGIL_ETCD_PASSWORD_FILE=" + good},
			append([]string{"owner", "00000000-0000-0000-0000-000000000000"}, common...)...)
		if code != 0 || !strings.Contains(out, "owner "+cluster+"-1") {
			t.Errorf("vigil owner with VIGIL_ETCD_USERNAME and VIGIL_ETCD_PASSWORD_FILE: exit %d\n%s%s", code, out, errOut)
		}
		// Without credentials the same command is refused, clearly.
		_, errOut, code = runVigil(t, bin, append([]string{"shards"}, common...)...)
		if code == 0 || !strings.Contains(errOut, "set --etcd-username and --etcd-password-file") {
			t.Errorf("vigil shards without credentials: exit %d: %s", code, errOut)
		}
		noSecrets(t, "the replica's log", lb.String())
	})

	// Crash failover with authentication on: revoking a dead peer's lease
	// needs write permission on the keys bound to it, all under the
	// prefix, which the documented role has.
	t.Run("a peer's lease is revoked with the documented role", func(t *testing.T) {
		cluster := "auth-peer"
		start := func(id string) (*exec.Cmd, *logBuffer, chan struct{}, *replica) {
			args := runArgs(cluster, "vigil", good)
			args[slices.Index(args, "--replica-id")+1] = id
			cmd := exec.Command(bin, args...)
			cmd.Env = cleanEnv()
			lb := &logBuffer{}
			cmd.Stdout, cmd.Stderr = lb, lb
			if err := cmd.Start(); err != nil {
				t.Fatal(err)
			}
			done := make(chan struct{})
			go func() { _ = cmd.Wait(); close(done) }()
			t.Cleanup(func() {
				_ = cmd.Process.Kill()
				<-done
				if t.Failed() {
					t.Logf("%s log:\n%s", id, lb.Tail(40))
				}
			})
			return cmd, lb, done, &replica{Admin: args[slices.Index(args, "--http-addr")+1]}
		}
		victim, _, victimDone, _ := start(cluster + "-v")
		_, survivorLog, _, survivor := start(cluster + "-s")
		owners := func() map[string]int {
			ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
			defer cancel()
			resp, err := ae.admin.Get(ctx, "/vigil/"+cluster+"/shards/", clientv3.WithPrefix())
			if err != nil {
				return nil
			}
			out := map[string]int{}
			for _, kv := range resp.Kvs {
				out[string(kv.Value)]++
			}
			return out
		}
		waitUntil(t, 30*time.Second, "both replicas owning shards and watching each other", func() (bool, string) {
			o := owners()
			return o[cluster+"-v"] > 0 && o[cluster+"-s"] > 0 && survivorLog.Count("joined cluster") > 0, fmt.Sprint(o)
		})
		waitUntil(t, 10*time.Second, "the survivor connected to its peer", func() (bool, string) {
			n, err := survivor.Metric("vigil_peers_connected")
			return err == nil && n == 1, fmt.Sprint(n, err)
		})
		if err := victim.Process.Signal(syscall.SIGKILL); err != nil {
			t.Fatal(err)
		}
		<-victimDone
		killed := time.Now()
		waitUntil(t, 5*time.Second, "the killed replica's shards owned by the survivor", func() (bool, string) {
			o := owners()
			return o[cluster+"-v"] == 0 && o[cluster+"-s"] == shards, fmt.Sprint(o)
		})
		took := time.Since(killed)
		if n := survivorLog.Count("peer process gone; revoking its lease"); n != 1 {
			t.Errorf("the survivor logged %d revocations, want 1", n)
		}
		if n := survivorLog.Count("revoking the peer's lease failed"); n != 0 {
			t.Errorf("revoking failed under authentication:\n%s", survivorLog.Tail(20))
		}
		if took > time.Second {
			t.Errorf("shards re-owned %s after the kill, want within 1s", took)
		}
		t.Logf("with authentication: kill -> every shard owned by the survivor after %s", took.Round(time.Millisecond))
	})

	// A refused start: the process exits on its own, at once, with one error
	// line naming the flag to fix.
	refused := func(t *testing.T, args []string, want ...string) {
		t.Helper()
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		defer cancel()
		cmd := exec.CommandContext(ctx, bin, args...)
		cmd.Env = cleanEnv()
		var out bytes.Buffer
		cmd.Stdout, cmd.Stderr = &out, &out
		began := time.Now()
		err := cmd.Run()
		took := time.Since(began)
		if ctx.Err() != nil {
			t.Fatalf("vigil run still running after 20s (retrying?):\n%s", out.String())
		}
		if code := cmd.ProcessState.ExitCode(); err == nil || code != 1 {
			t.Fatalf("vigil run: exit %d (%v), want 1:\n%s", code, err, out.String())
		}
		text := out.String()
		for _, w := range want {
			if !strings.Contains(text, w) {
				t.Errorf("vigil run's output lacks %q:\n%s", w, text)
			}
		}
		if n := strings.Count(text, "etcd not reachable"); n > 0 {
			t.Errorf("vigil run retried %d times before giving up:\n%s", n, text)
		}
		noSecrets(t, "vigil run's output", text)
		t.Logf("refused after %v: %s", took.Round(time.Millisecond), lastLine(text))
	}
	t.Run("a wrong password fails at start naming the flag", func(t *testing.T) {
		refused(t, runArgs("auth-wrong", "vigil", wrong),
			`etcd rejected --etcd-username "vigil" with the password in --etcd-password-file `+wrong, "authentication failed")
	})
	t.Run("a user without rights on the prefix is refused", func(t *testing.T) {
		refused(t, runArgs("auth-stranger", "stranger", stranger),
			`etcd user "stranger" may not read and write under /vigil/ (--etcd-prefix)`, "etcdctl role grant-permission --prefix=true <role> readwrite /vigil/", "permission denied")
		_, errOut, code := runVigil(t, bin, "shards", "--etcd-endpoints", ae.endpoint, "--cluster", "auth-ok",
			"--etcd-username", "stranger", "--etcd-password-file", stranger)
		if code != 1 || !strings.Contains(errOut, `etcd user "stranger" may not read and write under /vigil/`) {
			t.Errorf("vigil shards as stranger: exit %d: %s", code, errOut)
		}
		// Nothing was written under the prefix by the refused replica.
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		if resp, err := ae.admin.Get(ctx, "/vigil/auth-stranger/", clientv3.WithPrefix(), clientv3.WithCountOnly()); err != nil || resp.Count != 0 {
			t.Errorf("keys under /vigil/auth-stranger/: %v (%v)", resp.Count, err)
		}
	})
	t.Run("a user that may only read the prefix is refused", func(t *testing.T) {
		refused(t, runArgs("auth-reader", "reader", secret("reader", "reader-password")),
			`etcd user "reader" may not read and write under /vigil/`)
	})
	t.Run("no credentials against an etcd with authentication", func(t *testing.T) {
		refused(t, runArgs("auth-none", "", ""), "etcd has authentication enabled: set --etcd-username and --etcd-password-file")
	})
}

func lastLine(s string) string {
	lines := strings.Split(strings.TrimSpace(s), "\n")
	return lines[len(lines)-1]
}

// runVigilEnv is runVigil with extra environment variables.
func runVigilEnv(t *testing.T, bin string, env []string, args ...string) (stdout, stderr string, code int) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, bin, args...)
	cmd.Env = append(cleanEnv(), env...)
	var o, e bytes.Buffer
	cmd.Stdout, cmd.Stderr = &o, &e
	if err := cmd.Run(); err != nil {
		if _, ok := err.(*exec.ExitError); !ok {
			t.Fatalf("vigil %v: %v", args, err)
		}
	}
	return o.String(), e.String(), cmd.ProcessState.ExitCode()
}

// waitUntil polls cond every 50ms until it holds; at timeout the test fails
// with cond's last detail.
func waitUntil(t *testing.T, timeout time.Duration, what string, cond func() (bool, string)) {
	t.Helper()
	testwait.Until(t, timeout, 50*time.Millisecond, what, cond, nil)
}
