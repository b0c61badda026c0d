package deploy

import (
	"context"
	"net"
	"net/url"
	"os"
	"path"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/compose-spec/compose-go/v2/loader"
	"github.com/compose-spec/compose-go/v2/types"
)

const composeFile = "docker-compose.yml"

// loadCompose loads docker-compose.yml the way `docker compose` does:
// schema validation, interpolation, merges and the consistency checks
// (depends_on, network_mode and volume references must exist).
func loadCompose(t *testing.T) *types.Project {
	t.Helper()
	wd, err := filepath.Abs(".")
	if err != nil {
		t.Fatal(err)
	}
	p, err := loader.LoadWithContext(context.Background(), types.ConfigDetails{
		WorkingDir:  wd,
		ConfigFiles: []types.ConfigFile{{Filename: filepath.Join(wd, composeFile), Content: readFile(t, composeFile)}},
		Environment: types.Mapping{},
	}, func(o *loader.Options) {
		o.SetProjectName("vigil", true)
		o.ResolvePaths = true
	})
	if err != nil {
		t.Fatalf("%s: %v", composeFile, err)
	}
	return p
}

func TestComposeServices(t *testing.T) {
	p := loadCompose(t)
	for _, want := range []string{"postgres", "migrate", "agentsim", "prometheus", "grafana"} {
		if _, ok := p.Services[want]; !ok {
			t.Errorf("%s: no service %q", composeFile, want)
		}
	}
	var etcd, replicas []string
	for name, s := range p.Services {
		where := composeFile + ": service " + name
		if s.Image == "" && s.Build == nil {
			t.Errorf("%s: neither image nor build", where)
		}
		if s.Build != nil {
			df := s.Build.Dockerfile
			if !filepath.IsAbs(df) {
				df = filepath.Join(s.Build.Context, df)
			}
			if _, err := os.Stat(df); err != nil {
				t.Errorf("%s: Dockerfile: %v", where, err)
			}
			if _, err := os.Stat(filepath.Join(s.Build.Context, "go.mod")); err != nil {
				t.Errorf("%s: build context %s is not the repository root: %v", where, s.Build.Context, err)
			}
		}
		for dep := range s.DependsOn {
			if _, ok := p.Services[dep]; !ok {
				t.Errorf("%s: depends_on unknown service %q", where, dep)
			}
		}
		if target, ok := strings.CutPrefix(s.NetworkMode, "service:"); ok {
			if _, exists := p.Services[target]; !exists {
				t.Errorf("%s: network_mode names unknown service %q", where, target)
			}
		}
		for _, v := range s.Volumes {
			if v.Type == types.VolumeTypeBind {
				if _, err := os.Stat(v.Source); err != nil {
					t.Errorf("%s: bind mount source: %v", where, err)
				}
			}
		}
		if strings.HasPrefix(name, "etcd") {
			etcd = append(etcd, name)
		}
		if len(s.Command) >= 2 && s.Command[0] == "vigil" && s.Command[1] == "run" {
			replicas = append(replicas, name)
		}
		checkComposeVigilEnv(t, where, s)
		checkComposeSecrets(t, p, where, s)
	}
	if len(etcd) == 0 {
		t.Errorf("%s: no etcd service", composeFile)
	}
	if len(replicas) < 2 {
		t.Errorf("%s: %d vigil replicas (services running `vigil run`), want several", composeFile, len(replicas))
	}
	slices.Sort(replicas)
	checkComposeReplicas(t, p, replicas, etcd)

	mig := p.Services["migrate"]
	if !slices.Equal(mig.Command, []string{"vigil", "migrate", "--control-plane-tables"}) {
		t.Errorf("%s: migrate runs %q, want vigil migrate --control-plane-tables", composeFile, mig.Command)
	}
	sim := p.Services["agentsim"]
	if len(sim.Command) == 0 || sim.Command[0] != "agentsim" {
		t.Errorf("%s: agentsim runs %q", composeFile, sim.Command)
	}
	if dep, ok := sim.DependsOn["migrate"]; !ok || dep.Condition != types.ServiceConditionCompletedSuccessfully {
		t.Errorf("%s: agentsim writes hosts rows: it must wait for migrate to complete", composeFile)
	}
	checkComposeDatabasePassword(t, p)
}

// checkComposeVigilEnv: a container running vigil or agentsim is configured
// only through real flags and their VIGIL_* twins.
func checkComposeVigilEnv(t *testing.T, where string, s types.ServiceConfig) {
	t.Helper()
	checkCommandArgs(t, where, s.Command)
	name, fs := flagsOf(t, s.Command)
	if fs == nil {
		return
	}
	twins := fs.env()
	for k := range s.Environment {
		if _, ok := twins[k]; !ok {
			t.Errorf("%s: environment %s is not a flag twin of %s (known: %v)", where, k, name, sortedEnv(twins))
		}
	}
	if v := s.Environment["VIGIL_DATABASE_URL"]; v == nil || *v == "" {
		t.Errorf("%s: %s needs VIGIL_DATABASE_URL", where, name)
	}
	// vigil takes the password from a file; agentsim, standing in for the
	// control plane, has no such flag.
	if strings.HasPrefix(name, "vigil ") {
		checkURLWithoutPassword(t, where+": VIGIL_DATABASE_URL", env(s, "VIGIL_DATABASE_URL"))
		if env(s, "VIGIL_DATABASE_PASSWORD_FILE") == "" {
			t.Errorf("%s: %s needs VIGIL_DATABASE_PASSWORD_FILE", where, name)
		}
	}
}

// secretTarget is where a compose secret appears in the container.
func secretTarget(sec types.ServiceSecretConfig) string {
	switch {
	case sec.Target == "":
		return "/run/secrets/" + sec.Source
	case path.IsAbs(sec.Target):
		return sec.Target
	}
	return "/run/secrets/" + sec.Target
}

// checkComposeSecrets: every secret a service mounts is a file that exists,
// and every *_FILE variable names a mounted secret.
func checkComposeSecrets(t *testing.T, p *types.Project, where string, s types.ServiceConfig) {
	t.Helper()
	targets := map[string]bool{}
	for _, sec := range s.Secrets {
		targets[secretTarget(sec)] = true
		def, ok := p.Secrets[sec.Source]
		if !ok {
			t.Errorf("%s: secret %q is not defined", where, sec.Source)
			continue
		}
		if _, err := os.Stat(def.File); err != nil {
			t.Errorf("%s: secret %s: %v", where, sec.Source, err)
		}
	}
	for k := range s.Environment {
		if v := env(s, k); strings.HasSuffix(k, "_FILE") && !targets[v] {
			t.Errorf("%s: %s=%s is no secret the service mounts", where, k, v)
		}
	}
}

// checkComposeDatabasePassword: Postgres, vigil and agentsim agree on the
// demo password.
func checkComposeDatabasePassword(t *testing.T, p *types.Project) {
	t.Helper()
	pg := p.Services["postgres"]
	file := env(pg, "POSTGRES_PASSWORD_FILE")
	var secret string
	for _, sec := range pg.Secrets {
		if secretTarget(sec) == file {
			secret = sec.Source
		}
	}
	if secret == "" {
		t.Fatalf("%s: postgres: POSTGRES_PASSWORD_FILE %q is no secret it mounts", composeFile, file)
	}
	want := strings.TrimSuffix(string(readFile(t, p.Secrets[secret].File)), "\n")
	for name, s := range p.Services {
		if f := env(s, "VIGIL_DATABASE_PASSWORD_FILE"); f != "" {
			for _, sec := range s.Secrets {
				if secretTarget(sec) == f && sec.Source != secret {
					t.Errorf("%s: %s reads its database password from secret %s, Postgres from %s", composeFile, name, sec.Source, secret)
				}
			}
		}
		if u, err := url.Parse(env(s, "VIGIL_DATABASE_URL")); err == nil {
			if pw, set := u.User.Password(); set && pw != want {
				t.Errorf("%s: %s: the password in VIGIL_DATABASE_URL is not Postgres's (secret %s)", composeFile, name, secret)
			}
		}
	}
}

func sortedEnv(m map[string]string) []string {
	var s []string
	for k := range m {
		s = append(s, k)
	}
	slices.Sort(s)
	return s
}

func env(s types.ServiceConfig, key string) string {
	if v := s.Environment[key]; v != nil {
		return *v
	}
	return ""
}

func checkComposeReplicas(t *testing.T, p *types.Project, replicas, etcd []string) {
	t.Helper()
	netns := map[string]map[string]string{} // network namespace -> port -> service
	promTargets := map[string]bool{}
	for _, sc := range loadPromConfig(t).ScrapeConfigs {
		if sc.JobName == "vigil" {
			for _, st := range sc.StaticConfigs {
				for _, tg := range st.Targets {
					promTargets[tg] = true
				}
			}
		}
	}
	// The simulator's own listeners share the namespace the replicas join.
	for name, s := range p.Services {
		if len(s.Command) == 0 || s.Command[0] != "agentsim" {
			continue
		}
		netns[name] = map[string]string{}
		for _, key := range []string{"VIGIL_LISTEN", "VIGIL_ADMIN_ADDR"} {
			if _, port, err := net.SplitHostPort(env(s, key)); err == nil {
				netns[name][port] = name + " " + key
			}
		}
	}
	for _, name := range replicas {
		s := p.Services[name]
		where := composeFile + ": " + name
		for _, key := range []string{"VIGIL_ETCD_ENDPOINTS", "VIGIL_DATABASE_URL", "VIGIL_CLUSTER", "VIGIL_HTTP_ADDR", "VIGIL_LEASE_TTL"} {
			if env(s, key) == "" {
				t.Errorf("%s: %s not set", where, key)
			}
		}
		for _, ep := range strings.Split(env(s, "VIGIL_ETCD_ENDPOINTS"), ",") {
			host, _, err := net.SplitHostPort(ep)
			if err != nil || !slices.Contains(etcd, host) {
				t.Errorf("%s: etcd endpoint %q is not host:port of an etcd service %v", where, ep, etcd)
			}
		}
		host, port, err := net.SplitHostPort(env(s, "VIGIL_HTTP_ADDR"))
		if err != nil || (host != "0.0.0.0" && host != "" && host != "::") {
			t.Errorf("%s: VIGIL_HTTP_ADDR %q must listen on all interfaces for Prometheus and the health check", where, env(s, "VIGIL_HTTP_ADDR"))
		}
		ns := name
		if target, ok := strings.CutPrefix(s.NetworkMode, "service:"); ok {
			ns = target
		}
		if netns[ns] == nil {
			netns[ns] = map[string]string{}
		}
		if other, dup := netns[ns][port]; dup {
			t.Errorf("%s: admin port %s also used by %s in the same network namespace", where, port, other)
		}
		netns[ns][port] = name
		if !promTargets[ns+":"+port] {
			t.Errorf("%s: prometheus.yml job vigil does not scrape %s:%s", where, ns, port)
		}

		if s.HealthCheck == nil || !strings.Contains(strings.Join(s.HealthCheck.Test, " "), "127.0.0.1:"+port+"/readyz") {
			t.Errorf("%s: health check should GET /readyz on its admin port %s", where, port)
		}
		ttl, err := time.ParseDuration(env(s, "VIGIL_LEASE_TTL"))
		if err != nil {
			t.Errorf("%s: VIGIL_LEASE_TTL: %v", where, err)
			continue
		}
		if s.StopGracePeriod == nil || time.Duration(*s.StopGracePeriod) <= 2*ttl {
			t.Errorf("%s: stop_grace_period must exceed 2 × lease TTL (%s) for a graceful handover", where, 2*ttl)
		}
		for _, dep := range append([]string{"postgres", "migrate"}, etcd...) {
			if _, ok := s.DependsOn[dep]; !ok {
				t.Errorf("%s: does not depend on %s", where, dep)
			}
		}
		if c := s.DependsOn["migrate"].Condition; c != types.ServiceConditionCompletedSuccessfully {
			t.Errorf("%s: should wait for migrate to complete, not %q", where, c)
		}
	}
}
