package main

import (
	"errors"
	"flag"
	"fmt"
	"net/url"
	"os"
	"strings"
)

// Passwords reach vigil only through files (a mounted Secret, a systemd
// credential): a flag value shows in ps and /proc/PID/cmdline, and URLs end
// up in logs and shell history. The URL flags stay for everything else.

// readSecretFile reads a password file, one trailing newline trimmed. Errors
// name the flag and the file, never the content.
func readSecretFile(flagName, path string) (string, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return "", fmt.Errorf("--%s: %w", flagName, err)
	}
	pw := strings.TrimSuffix(strings.TrimSuffix(string(b), "\n"), "\r")
	if pw == "" {
		return "", fmt.Errorf("--%s %s is empty", flagName, path)
	}
	return pw, nil
}

// withPassword puts pw into a URL's user information, keeping the user.
// A URL that already carries a password is an error: the password is given
// once. Postgres also takes keyword/value strings ("host=... user=..."), to
// which a quoted password keyword is added.
func withPassword(raw, pw string) (string, error) {
	if !strings.Contains(raw, "://") {
		if strings.Contains(raw, "password=") {
			return "", errors.New("has a password already; give it once")
		}
		q := strings.NewReplacer(`\`, `\\`, `'`, `\'`).Replace(pw)
		return raw + " password='" + q + "'", nil
	}
	u, err := url.Parse(raw)
	if err != nil {
		// url.Parse errors quote the whole URL; this one has no password yet.
		return "", errors.New("is not a valid URL")
	}
	if _, set := u.User.Password(); set {
		return "", errors.New("has a password already; give it once")
	}
	u.User = url.UserPassword(u.User.Username(), pw)
	return u.String(), nil
}

// secretURL is a URL flag with its password-file twin, e.g. --database-url
// and --database-password-file.
type secretURL struct {
	name         string // "database" or "events-redis"
	url          *string
	passwordFile *string
}

// passwordFileUsage is the help of a --*-password-file flag. The flags are
// registered where they are used, with their names spelled out, so that
// the names can be found in the source (deploy/flags_test.go does).
func passwordFileUsage(urlFlag string) string {
	return "file holding the password for --" + urlFlag + " (a trailing newline is ignored); keeps it out of the URL, ps and the environment"
}

// resolve is the URL to connect with: the URL with the file's password.
func (s *secretURL) resolve() (string, error) {
	if *s.passwordFile == "" {
		return *s.url, nil
	}
	if *s.url == "" {
		return "", fmt.Errorf("--%s-password-file needs --%s-url", s.name, s.name)
	}
	pw, err := readSecretFile(s.name+"-password-file", *s.passwordFile)
	if err != nil {
		return "", err
	}
	u, err := withPassword(*s.url, pw)
	if err != nil {
		return "", fmt.Errorf("--%s-url %w", s.name, err)
	}
	return u, nil
}

// databaseFlags registers --database-url and --database-password-file, for
// commands without a config struct (migrate, shadow-report).
func databaseFlags(fs *flag.FlagSet) *secretURL {
	s := &secretURL{name: "database", url: new(string), passwordFile: new(string)}
	fs.StringVar(s.url, "database-url", "", "Postgres URL of the control plane's database (required); its password is better in --database-password-file")
	fs.StringVar(s.passwordFile, "database-password-file", "", passwordFileUsage("database-url"))
	return s
}
