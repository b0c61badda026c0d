package main

import (
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/vigil-sh/vigil/internal/pgtest"
)

func TestWithPassword(t *testing.T) {
	for _, tc := range []struct{ raw, pw, want, err string }{
		{"postgres://vigil@db:5432/cp?sslmode=require", "s3cr:t@/", "postgres://vigil:s3cr%3At%40%2F@db:5432/cp?sslmode=require", ""},
		{"postgres://db/cp", "pw", "postgres://:pw@db/cp", ""},
		{"redis://redis:6379/0", "pw", "redis://:pw@redis:6379/0", ""},
		{"rediss://default@redis:6380/0", "pw", "rediss://default:pw@redis:6380/0", ""},
		{"host=db user=vigil dbname=cp", `it's\x`, `host=db user=vigil dbname=cp password='it\'s\\x'`, ""},
		{"postgres://vigil:old@db/cp", "pw", "", "has a password already"},
		{"host=db password=old", "pw", "", "has a password already"},
		{"postgres://db:port/x", "pw", "", "is not a valid URL"},
	} {
		got, err := withPassword(tc.raw, tc.pw)
		if tc.err != "" {
			if err == nil || !strings.Contains(err.Error(), tc.err) || strings.Contains(err.Error(), tc.pw) {
				t.Errorf("withPassword(%q) error %v, want %q without the password", tc.raw, err, tc.err)
			}
			continue
		}
		if err != nil || got != tc.want {
			t.Errorf("withPassword(%q, %q) = %q, %v; want %q", tc.raw, tc.pw, got, err, tc.want)
		}
	}
}

func TestSecretURLResolve(t *testing.T) {
	dir := t.TempDir()
	file := filepath.Join(dir, "password")
	if err := os.WriteFile(file, []byte("hunter2\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	empty := filepath.Join(dir, "empty")
	if err := os.WriteFile(empty, []byte("\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	s := mkSecret("database", "postgres://vigil@db/cp", file)
	if got, err := s.resolve(); err != nil || got != "postgres://vigil:hunter2@db/cp" {
		t.Fatalf("resolve() = %q, %v", got, err)
	}
	for _, tc := range []struct {
		s    *secretURL
		want string
	}{
		{mkSecret("database", "", file), "--database-password-file needs --database-url"},
		{mkSecret("database", "postgres://db/cp", empty), "--database-password-file " + empty + " is empty"},
		{mkSecret("events-redis", "redis://r/0", filepath.Join(dir, "none")), "--events-redis-password-file: open"},
	} {
		if _, err := tc.s.resolve(); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("resolve(%s) error %v, want %q", tc.s.name, err, tc.want)
		}
	}
	if got, err := mkSecret("database", "postgres://db/cp", "").resolve(); err != nil || got != "postgres://db/cp" {
		t.Fatalf("without a file resolve() = %q, %v", got, err)
	}
}

func mkSecret(name, url, file string) *secretURL {
	return &secretURL{name: name, url: &url, passwordFile: &file}
}

// `vigil migrate` logs in with the password from --database-password-file
// (against a server that checks passwords, e.g. the scram cluster
// scripts/ensure-postgres.sh creates on a stock install, this is the only
// way in) and never prints it.
func TestMigrateReadsThePasswordFile(t *testing.T) {
	if testing.Short() {
		t.Skip("builds and runs the binary")
	}
	bin := vigilBinary(t)
	u, err := url.Parse(pgtest.New(t))
	if err != nil {
		t.Fatal(err)
	}
	pw, ok := u.User.Password()
	if !ok {
		pw = "unused-where-loopback-is-trusted"
	}
	u.User = url.User(u.User.Username())
	file := filepath.Join(t.TempDir(), "password")
	if err := os.WriteFile(file, []byte(pw+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(bin, "migrate", "--database-url", u.String(), "--database-password-file", file)
	cmd.Env = cleanEnv()
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("vigil migrate: %v\n%s", err, out)
	}
	// The tests' password may be a common word ("vigil"): look for it where
	// a leak would put it.
	for _, leak := range []string{":" + pw + "@", "password=" + pw, "password='" + pw} {
		if strings.Contains(string(out), leak) {
			t.Fatalf("the output shows the password:\n%s", out)
		}
	}
}
