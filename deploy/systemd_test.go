package deploy

import (
	"bufio"
	"bytes"
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/coreos/go-systemd/v22/unit"
)

const (
	systemdUnit = "systemd/vigil.service"
	systemdEnv  = "systemd/vigil.env"
	// Where the unit's EnvironmentFile= expects systemdEnv.
	systemdEnvInstalled = "/etc/vigil/vigil.env"
	// LimitNOFILE the unit must give at least: far above what a replica with
	// the default agent limits holds (vigil warns below
	// --agent-max-idle-conns + --agent-concurrency + --db-max-conns + 64).
	systemdMinOpenFiles = 65536
)

// systemdService is the [Service] section of a unit file, as systemd reads
// it: a directive's assignments in order (the last counts for single-valued
// ones; an empty assignment resets a list).
type systemdService map[string][]string

func parseUnit(t *testing.T, where string, text []byte) map[string]systemdService {
	t.Helper()
	sections, err := unit.DeserializeSections(bytes.NewReader(text))
	if err != nil {
		t.Fatalf("%s: %v", where, err)
	}
	u := map[string]systemdService{}
	for _, s := range sections {
		if u[s.Section] == nil {
			u[s.Section] = systemdService{}
		}
		for _, e := range s.Entries {
			u[s.Section][e.Name] = append(u[s.Section][e.Name], e.Value)
		}
	}
	return u
}

func (s systemdService) last(name string) string {
	v := s[name]
	if len(v) == 0 {
		return ""
	}
	return v[len(v)-1]
}

// list is a list-valued directive: its assignments split on spaces, an empty
// one clearing what came before.
func (s systemdService) list(name string) []string {
	var out []string
	for _, v := range s[name] {
		if v == "" {
			out = nil
		}
		out = append(out, strings.Fields(v)...)
	}
	return out
}

func systemdBool(v string) bool {
	switch strings.ToLower(v) {
	case "yes", "true", "on", "1":
		return true
	}
	return false
}

// systemdDuration reads a time span: "35" (seconds), "35s", "1min 30s".
func systemdDuration(v string) (time.Duration, error) {
	v = strings.ReplaceAll(v, " ", "")
	if n, err := strconv.Atoi(v); err == nil {
		return time.Duration(n) * time.Second, nil
	}
	return time.ParseDuration(strings.NewReplacer("min", "m", "sec", "s").Replace(v))
}

// execCommand is an Exec*= line as argv, its special prefixes ("-" ignore
// failure, "+" "!" privileges, "@" argv0, ":" no expansion) returned apart.
func execCommand(line string) (prefixes string, argv []string) {
	argv = strings.Fields(line)
	if len(argv) == 0 {
		return "", nil
	}
	bin := strings.TrimLeft(argv[0], "-+!@:|")
	return argv[0][:len(argv[0])-len(bin)], append([]string{bin}, argv[1:]...)
}

// parseEnvAssignments reads Environment= values: "A=1 B=2", quotes allowed.
func parseEnvAssignments(v string) map[string]string {
	env := map[string]string{}
	var cur strings.Builder
	var quote rune
	flush := func() {
		if k, val, ok := strings.Cut(cur.String(), "="); ok {
			env[k] = val
		}
		cur.Reset()
	}
	for _, r := range v {
		switch {
		case quote != 0 && r == quote:
			quote = 0
		case quote == 0 && (r == '"' || r == '\''):
			quote = r
		case quote == 0 && r == ' ':
			flush()
		default:
			cur.WriteRune(r)
		}
	}
	flush()
	return env
}

var envFileLine = regexp.MustCompile(`^(#?)\s*(VIGIL_[A-Z0-9_]+)=(.*)$`)

// parseEnvFile reads an EnvironmentFile=: the settings, and every VIGIL_*
// name it mentions in a commented-out example line too.
func parseEnvFile(t *testing.T, path string) (env map[string]string, examples []string) {
	t.Helper()
	env = map[string]string{}
	sc := bufio.NewScanner(bytes.NewReader(readFile(t, path)))
	for n := 1; sc.Scan(); n++ {
		line := strings.TrimSpace(sc.Text())
		m := envFileLine.FindStringSubmatch(line)
		switch {
		case m == nil && line != "" && !strings.HasPrefix(line, "#"):
			t.Errorf("%s:%d: not a VIGIL_*=value line: %q", path, n, line)
		case m == nil:
		case m[1] == "#":
			examples = append(examples, m[2])
		default:
			env[m[2]] = m[3]
		}
	}
	return env, examples
}

// TestSystemdUnit: the VM unit parses, and its settings, credentials, limits
// and hardening are what a replica needs.
func TestSystemdUnit(t *testing.T) {
	text := readFile(t, systemdUnit)
	u := parseUnit(t, systemdUnit, text)
	svc := u["Service"]
	if svc == nil {
		t.Fatalf("%s: no [Service] section", systemdUnit)
	}
	runFlags := commandFlags(t)["vigil run"]
	migrateFlags := commandFlags(t)["vigil migrate"]

	// vigil run, preceded by vigil migrate of the same binary, whose failure
	// stops the start (no "-" prefix).
	if n := len(svc["ExecStart"]); n != 1 {
		t.Fatalf("%s: %d ExecStart=, want one", systemdUnit, n)
	}
	_, run := execCommand(svc.last("ExecStart"))
	if len(run) < 2 || filepath.Base(run[0]) != "vigil" || run[1] != "run" || !filepath.IsAbs(run[0]) {
		t.Errorf("%s: ExecStart=%s, want /path/to/vigil run", systemdUnit, svc.last("ExecStart"))
	}
	checkCommandArgs(t, systemdUnit+": ExecStart", append([]string{"vigil"}, run[1:]...))
	var migrations int
	for _, line := range svc["ExecStartPre"] {
		prefix, pre := execCommand(line)
		if len(pre) < 2 || pre[1] != "migrate" {
			continue
		}
		migrations++
		if pre[0] != run[0] {
			t.Errorf("%s: ExecStartPre= runs %s, ExecStart= %s: each binary migrates its own schema", systemdUnit, pre[0], run[0])
		}
		if strings.Contains(prefix, "-") {
			t.Errorf("%s: ExecStartPre=%s: a failed migration must stop the start", systemdUnit, line)
		}
		if slices.Contains(pre, "--control-plane-tables") {
			t.Errorf("%s: --control-plane-tables is for dev and tests, never the control plane's database", systemdUnit)
		}
		checkCommandArgs(t, systemdUnit+": ExecStartPre", append([]string{"vigil"}, pre[1:]...))
	}
	if migrations != 1 {
		t.Errorf("%s: %d ExecStartPre= running vigil migrate, want one", systemdUnit, migrations)
	}

	// The environment both commands get: Environment= lines, then the
	// example EnvironmentFile= (which wins, as in systemd).
	env := map[string]string{}
	for _, v := range svc["Environment"] {
		for k, val := range parseEnvAssignments(v) {
			env[k] = val
		}
	}
	if files := svc["EnvironmentFile"]; !slices.Equal(files, []string{systemdEnvInstalled}) {
		t.Errorf("%s: EnvironmentFile=%q, want %s (required: no leading -, it holds the database URL)", systemdUnit, files, systemdEnvInstalled)
	}
	fileEnv, examples := parseEnvFile(t, systemdEnv)
	for k, v := range fileEnv {
		env[k] = v
	}
	checkNoSecretsInEnv(t, systemdUnit+" with "+systemdEnv, env)

	// Every VIGIL_* and --flag named anywhere (settings, examples, comments)
	// is one of vigil run's or vigil migrate's: the same file serves both.
	isTwin := func(k string) bool {
		_, r := runFlags.env()[k]
		_, m := migrateFlags.env()[k]
		return r || m
	}
	mentioned := slices.Concat(regexp.MustCompile(`VIGIL_[A-Z0-9_]+`).FindAllString(string(text), -1), examples)
	for k := range env {
		mentioned = append(mentioned, k)
	}
	for _, k := range mentioned {
		if !isTwin(k) {
			t.Errorf("%s, %s: %s is a flag twin of neither vigil run nor vigil migrate", systemdUnit, systemdEnv, k)
		}
	}
	for _, m := range regexp.MustCompile(`--([a-z][a-z0-9-]+)`).FindAllStringSubmatch(string(text), -1) {
		if !runFlags[m[1]] && !migrateFlags[m[1]] {
			t.Errorf("%s: mentions --%s, a flag of neither vigil run nor vigil migrate", systemdUnit, m[1])
		}
	}

	checkSystemdCredentials(t, systemdUnit, svc, env, "VIGIL_DATABASE_PASSWORD_FILE", "VIGIL_AGENT_CA_FILE", "VIGIL_AGENT_CERT_FILE", "VIGIL_AGENT_KEY_FILE")
	// The commented-out credentials (events) work once uncommented.
	uncommented := regexp.MustCompile(`(?m)^#((?:LoadCredential|Environment)=)`).ReplaceAll(text, []byte("$1"))
	if bytes.Equal(uncommented, text) {
		t.Errorf("%s: no commented-out credential for events", systemdUnit)
	}
	all := parseUnit(t, systemdUnit+" (examples uncommented)", uncommented)["Service"]
	allEnv := map[string]string{}
	for _, v := range all["Environment"] {
		for k, val := range parseEnvAssignments(v) {
			allEnv[k] = val
		}
	}
	checkSystemdCredentials(t, systemdUnit+" (examples uncommented)", all, allEnv, "VIGIL_EVENTS_REDIS_PASSWORD_FILE")

	// A replica holds a connection per agent it keeps.
	soft, _, _ := strings.Cut(svc.last("LimitNOFILE"), ":")
	if n, err := strconv.Atoi(soft); err != nil || n < systemdMinOpenFiles {
		t.Errorf("%s: LimitNOFILE=%q, want a number of at least %d (infinity costs programs that walk every descriptor)", systemdUnit, svc.last("LimitNOFILE"), systemdMinOpenFiles)
	}

	// SIGTERM hands the shards over, bounded by 2 × lease TTL: systemd must
	// not SIGKILL before.
	ttl := 10 * time.Second
	if v := env["VIGIL_LEASE_TTL"]; v != "" {
		var err error
		if ttl, err = time.ParseDuration(v); err != nil {
			t.Errorf("%s: VIGIL_LEASE_TTL: %v", systemdEnv, err)
		}
	}
	if stop, err := systemdDuration(svc.last("TimeoutStopSec")); err != nil || stop <= 2*ttl {
		t.Errorf("%s: TimeoutStopSec=%q must exceed 2 × lease TTL = %s", systemdUnit, svc.last("TimeoutStopSec"), 2*ttl)
	}
	if sig := svc.last("KillSignal"); sig != "" && sig != "SIGTERM" && sig != "TERM" {
		t.Errorf("%s: KillSignal=%s; vigil hands its shards over on SIGTERM", systemdUnit, sig)
	}
	if r := svc.last("Restart"); r != "on-failure" {
		t.Errorf("%s: Restart=%q, want on-failure", systemdUnit, r)
	}

	// Not root, and no more than the network and its credentials.
	if user := svc.last("User"); !systemdBool(svc.last("DynamicUser")) && (user == "" || user == "root" || user == "0") {
		t.Errorf("%s: runs as root; set DynamicUser=yes or a User= of its own", systemdUnit)
	}
	for name, want := range map[string]string{
		"NoNewPrivileges": "yes", "ProtectSystem": "strict", "PrivateTmp": "yes", "ProtectHome": "yes",
		"PrivateDevices": "yes", "ProtectKernelTunables": "yes", "ProtectKernelModules": "yes", "ProtectControlGroups": "yes",
	} {
		if got := svc.last(name); got != want && !(want == "yes" && systemdBool(got)) {
			t.Errorf("%s: %s=%q, want %s", systemdUnit, name, got, want)
		}
	}
	if caps := svc.list("CapabilityBoundingSet"); len(caps) > 0 {
		t.Errorf("%s: CapabilityBoundingSet=%q; vigil needs no capability", systemdUnit, caps)
	}
	if !slices.Contains(u["Unit"].list("After"), "network-online.target") || !slices.Contains(u["Unit"].list("Wants"), "network-online.target") {
		t.Errorf("%s: should want and start after network-online.target (it dials etcd and Postgres at once)", systemdUnit)
	}
	if !slices.Contains(u["Install"].list("WantedBy"), "multi-user.target") {
		t.Errorf("%s: [Install] WantedBy=multi-user.target missing: systemctl enable would not start it at boot", systemdUnit)
	}
}

// checkSystemdCredentials: every VIGIL_*_FILE of env is a file of the
// unit's credentials directory (%d) that a LoadCredential= fills from an
// absolute path; want lists the settings that must be there.
func checkSystemdCredentials(t *testing.T, where string, svc systemdService, env map[string]string, want ...string) {
	t.Helper()
	creds := map[string]string{}
	for _, v := range svc["LoadCredential"] {
		id, src, _ := strings.Cut(v, ":")
		creds[id] = src
		if !filepath.IsAbs(src) {
			t.Errorf("%s: LoadCredential=%s: want ID:/absolute/path", where, v)
		}
	}
	for _, k := range want {
		if env[k] == "" {
			t.Errorf("%s: %s not set", where, k)
		}
	}
	for k, v := range env {
		if !strings.HasPrefix(k, "VIGIL_") || !strings.HasSuffix(k, "_FILE") {
			continue
		}
		id, ok := strings.CutPrefix(v, "%d/")
		if !ok {
			t.Errorf("%s: %s=%s is not in the credentials directory (%%d/ID): the dynamic user could not read it, or others could", where, k, v)
			continue
		}
		if _, ok := creds[id]; !ok {
			t.Errorf("%s: %s=%s, but no LoadCredential=%s:... loads it", where, k, v, id)
		}
	}
}

// TestSystemdUnitVerifies runs systemd's own checks on the unit when
// systemd-analyze is installed.
func TestSystemdUnitVerifies(t *testing.T) {
	analyze, err := exec.LookPath("systemd-analyze")
	if err != nil {
		t.Skip("systemd-analyze not installed; TestSystemdUnit parsed the unit")
	}
	// verify wants ExecStart='s binary to exist: point it at a stand-in.
	dir := t.TempDir()
	bin := filepath.Join(dir, "vigil")
	if err := os.WriteFile(bin, []byte("#!/bin/sh\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	text := strings.ReplaceAll(string(readFile(t, systemdUnit)), "/usr/local/bin/vigil", bin)
	path := filepath.Join(dir, "vigil.service")
	if err := os.WriteFile(path, []byte(text), 0o644); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	out, err := exec.CommandContext(ctx, analyze, "verify", path).CombinedOutput()
	if err != nil || len(bytes.TrimSpace(out)) > 0 {
		t.Errorf("systemd-analyze verify %s: %v\n%s", systemdUnit, err, out)
	}
}
