package deploy

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io/fs"
	"net"
	"net/url"
	"os"
	"path"
	"path/filepath"
	"reflect"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	monitoringv1 "github.com/prometheus-operator/prometheus-operator/pkg/apis/monitoring/v1"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	policyv1 "k8s.io/api/policy/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/util/intstr"
	"sigs.k8s.io/kustomize/api/krusty"
	kusttypes "sigs.k8s.io/kustomize/api/types"
	"sigs.k8s.io/kustomize/kyaml/filesys"
	"sigs.k8s.io/yaml"
)

const (
	k8sDir            = "kubernetes"
	k8sOperatorDir    = "kubernetes/prometheus-operator"
	k8sEventsDir      = "kubernetes/components/events"
	prometheusRuleGen = "kubernetes/prometheus-operator/prometheusrule.yaml"
	k8sNamespace      = "vigil"
	// The namespace networkpolicy.yaml admits Prometheus from.
	k8sMonitoringNamespace = "monitoring"
)

// secretFiles are the Secrets the operator creates (deploy/README.md): the
// file each VIGIL_*_FILE variable names must be this Secret's key.
var secretFiles = map[string]struct{ secret, key string }{
	"VIGIL_DATABASE_PASSWORD_FILE":     {"vigil-database", "password"},
	"VIGIL_AGENT_CA_FILE":              {"vigil-agent-tls", "ca.crt"},
	"VIGIL_AGENT_CERT_FILE":            {"vigil-agent-tls", "tls.crt"},
	"VIGIL_AGENT_KEY_FILE":             {"vigil-agent-tls", "tls.key"},
	"VIGIL_EVENTS_REDIS_PASSWORD_FILE": {"vigil-events", "password"},
}

// newObject returns the Go type a manifest of this apiVersion and kind
// decodes into.
func newObject(apiVersion, kind string) (any, error) {
	switch apiVersion + "/" + kind {
	case "v1/Namespace":
		return &corev1.Namespace{}, nil
	case "v1/ServiceAccount":
		return &corev1.ServiceAccount{}, nil
	case "v1/ConfigMap":
		return &corev1.ConfigMap{}, nil
	case "v1/Secret":
		return &corev1.Secret{}, nil
	case "v1/Service":
		return &corev1.Service{}, nil
	case "apps/v1/Deployment":
		return &appsv1.Deployment{}, nil
	case "policy/v1/PodDisruptionBudget":
		return &policyv1.PodDisruptionBudget{}, nil
	case "networking.k8s.io/v1/NetworkPolicy":
		return &networkingv1.NetworkPolicy{}, nil
	case "monitoring.coreos.com/v1/PodMonitor":
		return &monitoringv1.PodMonitor{}, nil
	case "monitoring.coreos.com/v1/PrometheusRule":
		return &monitoringv1.PrometheusRule{}, nil
	case kusttypes.KustomizationVersion + "/" + kusttypes.KustomizationKind,
		kusttypes.ComponentVersion + "/" + kusttypes.ComponentKind:
		return &kusttypes.Kustomization{}, nil
	}
	return nil, fmt.Errorf("unexpected apiVersion %q kind %q", apiVersion, kind)
}

// splitYAML splits a multi-document YAML stream.
func splitYAML(b []byte) [][]byte {
	var docs [][]byte
	for _, d := range bytes.Split(append([]byte("\n"), b...), []byte("\n---")) {
		if len(bytes.TrimSpace(stripComments(d))) > 0 {
			docs = append(docs, d)
		}
	}
	return docs
}

func stripComments(b []byte) []byte {
	var out [][]byte
	for _, l := range bytes.Split(b, []byte("\n")) {
		if !bytes.HasPrefix(bytes.TrimSpace(l), []byte("#")) {
			out = append(out, l)
		}
	}
	return bytes.Join(out, []byte("\n"))
}

// decodeStrict decodes one manifest into its API type, failing on unknown or
// duplicate fields: what `kubectl apply --validate=strict` would reject.
func decodeStrict(doc []byte) (any, error) {
	var tm metav1.TypeMeta
	if err := yaml.Unmarshal(doc, &tm); err != nil {
		return nil, err
	}
	obj, err := newObject(tm.APIVersion, tm.Kind)
	if err != nil {
		return nil, err
	}
	if err := unmarshalStrict(doc, obj); err != nil {
		return nil, fmt.Errorf("%s %s: %w", tm.APIVersion, tm.Kind, err)
	}
	return obj, nil
}

func TestKubernetesManifestsDecodeStrictly(t *testing.T) {
	n := 0
	err := filepath.WalkDir(k8sDir, func(path string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() || !(strings.HasSuffix(path, ".yaml") || strings.HasSuffix(path, ".yml")) {
			return err
		}
		docs := splitYAML(readFile(t, path))
		if len(docs) == 0 {
			t.Errorf("%s: empty", path)
		}
		for i, doc := range docs {
			if _, err := decodeStrict(doc); err != nil {
				t.Errorf("%s (document %d): %v", path, i+1, err)
			}
			n++
		}
		// Every manifest is part of its folder's kustomization (or, in a
		// component, one of its patches).
		if base := filepath.Base(path); base != "kustomization.yaml" {
			var k kusttypes.Kustomization
			if err := yaml.Unmarshal(readFile(t, filepath.Join(filepath.Dir(path), "kustomization.yaml")), &k); err != nil {
				t.Errorf("%s: %v", filepath.Dir(path), err)
			} else if !slices.Contains(k.Resources, base) && !slices.ContainsFunc(k.Patches, func(p kusttypes.Patch) bool { return p.Path == base }) {
				t.Errorf("%s: not listed in %s/kustomization.yaml resources or patches", path, filepath.Dir(path))
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if n < 8 {
		t.Errorf("only %d manifests found under %s", n, k8sDir)
	}
}

// kustomize builds a kustomization like `kubectl kustomize dir` and decodes
// every resulting object strictly.
func kustomize(t *testing.T, dir string) []any {
	t.Helper()
	k := krusty.MakeKustomizer(krusty.MakeDefaultOptions())
	rm, err := k.Run(filesys.MakeFsOnDisk(), dir)
	if err != nil {
		t.Fatalf("kustomize build %s: %v", dir, err)
	}
	out, err := rm.AsYaml()
	if err != nil {
		t.Fatal(err)
	}
	var objs []any
	for _, doc := range splitYAML(out) {
		obj, err := decodeStrict(doc)
		if err != nil {
			t.Fatalf("kustomize build %s: %v\n%s", dir, err, doc)
		}
		objs = append(objs, obj)
	}
	return objs
}

// kustomizeOverlay builds deploy/kubernetes with components added, through a
// temporary overlay of the kind an operator writes: relative paths to this
// checkout, since kustomize refuses absolute ones.
func kustomizeOverlay(t *testing.T, components ...string) []any {
	t.Helper()
	dir := t.TempDir()
	rel := func(p string) string {
		abs, err := filepath.Abs(p)
		if err != nil {
			t.Fatal(err)
		}
		r, err := filepath.Rel(dir, abs)
		if err != nil {
			t.Fatal(err)
		}
		return filepath.ToSlash(r)
	}
	k := fmt.Sprintf("apiVersion: %s\nkind: %s\nresources:\n  - %s\n", kusttypes.KustomizationVersion, kusttypes.KustomizationKind, rel(k8sDir))
	if len(components) > 0 {
		k += "components:\n"
		for _, c := range components {
			k += "  - " + rel(c) + "\n"
		}
	}
	if err := os.WriteFile(filepath.Join(dir, "kustomization.yaml"), []byte(k), 0o644); err != nil {
		t.Fatal(err)
	}
	return kustomize(t, dir)
}

func find[T any](objs []any) []T {
	var out []T
	for _, o := range objs {
		if v, ok := o.(T); ok {
			out = append(out, v)
		}
	}
	return out
}

func one[T any](t *testing.T, objs []any) T {
	t.Helper()
	found := find[T](objs)
	if len(found) != 1 {
		var zero T
		t.Fatalf("want exactly one %T, found %d", zero, len(found))
	}
	return found[0]
}

func TestKustomizeBuilds(t *testing.T) {
	for _, dir := range []string{k8sDir, k8sOperatorDir} {
		objs := kustomize(t, dir)
		for _, o := range objs {
			m, ok := o.(metav1.Object)
			if !ok {
				continue
			}
			if _, isNS := o.(*corev1.Namespace); isNS {
				if m.GetName() != k8sNamespace {
					t.Errorf("%s: namespace %q, want %q", dir, m.GetName(), k8sNamespace)
				}
				continue
			}
			if m.GetNamespace() != k8sNamespace {
				t.Errorf("%s: %T %s in namespace %q, want %q", dir, o, m.GetName(), m.GetNamespace(), k8sNamespace)
			}
		}
		// Applying a Secret would overwrite the one the operator or a secret
		// store created.
		for _, s := range find[*corev1.Secret](objs) {
			t.Errorf("%s: creates Secret %s; the operator creates Secrets, the kustomization only mounts them", dir, s.Name)
		}
		for _, pod := range podSpecs(objs) {
			for _, c := range append(slices.Clone(pod.InitContainers), pod.Containers...) {
				if c.Image == "vigil" || c.Image == "" {
					t.Errorf("%s: container %s image %q was not set by the kustomization's images", dir, c.Name, c.Image)
				}
			}
		}
		if dir == k8sOperatorDir {
			one[*monitoringv1.PodMonitor](t, objs)
			one[*monitoringv1.PrometheusRule](t, objs)
		} else if len(find[*monitoringv1.PodMonitor](objs))+len(find[*monitoringv1.PrometheusRule](objs)) > 0 {
			t.Errorf("%s: the plain setup must not need the Prometheus operator's CRDs", dir)
		}
	}
}

func podSpecs(objs []any) map[string]corev1.PodSpec {
	m := map[string]corev1.PodSpec{}
	for _, d := range find[*appsv1.Deployment](objs) {
		m["Deployment "+d.Name] = d.Spec.Template.Spec
	}
	return m
}

// envOf is the environment a container gets: env entries plus every key of
// the ConfigMaps it takes envFrom. Secrets reach vigil as files only.
func envOf(t *testing.T, where string, c corev1.Container, objs []any) map[string]string {
	t.Helper()
	env := map[string]string{}
	cms := map[string]*corev1.ConfigMap{}
	for _, cm := range find[*corev1.ConfigMap](objs) {
		cms[cm.Name] = cm
	}
	for _, ef := range c.EnvFrom {
		switch {
		case ef.ConfigMapRef != nil:
			cm, ok := cms[ef.ConfigMapRef.Name]
			if !ok {
				t.Errorf("%s: envFrom ConfigMap %q does not exist", where, ef.ConfigMapRef.Name)
				continue
			}
			for k, v := range cm.Data {
				env[ef.Prefix+k] = v
			}
		case ef.SecretRef != nil:
			t.Errorf("%s: container %s takes Secret %s as variables; mount it and name its files in *_FILE settings", where, c.Name, ef.SecretRef.Name)
		}
	}
	for _, e := range c.Env {
		if e.ValueFrom != nil && e.ValueFrom.SecretKeyRef != nil {
			t.Errorf("%s: container %s takes %s from Secret %s; mount it and name its file instead", where, c.Name, e.Name, e.ValueFrom.SecretKeyRef.Name)
		}
		env[e.Name] = e.Value
	}
	return env
}

// checkContainerSecurity: non-root, read-only root file system, no privilege
// escalation, no capabilities, resource requests and a memory limit.
func checkContainerSecurity(t *testing.T, where string, pod corev1.PodSpec, c corev1.Container) {
	t.Helper()
	psc := pod.SecurityContext
	if psc == nil || psc.RunAsNonRoot == nil || !*psc.RunAsNonRoot || psc.RunAsUser == nil || *psc.RunAsUser == 0 {
		t.Errorf("%s: pod securityContext must set runAsNonRoot and a non-zero runAsUser", where)
	}
	sc := c.SecurityContext
	switch {
	case sc == nil:
		t.Errorf("%s: container %s has no securityContext", where, c.Name)
	default:
		if sc.ReadOnlyRootFilesystem == nil || !*sc.ReadOnlyRootFilesystem {
			t.Errorf("%s: container %s: readOnlyRootFilesystem must be true", where, c.Name)
		}
		if sc.AllowPrivilegeEscalation == nil || *sc.AllowPrivilegeEscalation {
			t.Errorf("%s: container %s: allowPrivilegeEscalation must be false", where, c.Name)
		}
		if sc.Capabilities == nil || !slices.Contains(sc.Capabilities.Drop, "ALL") {
			t.Errorf("%s: container %s: capabilities must drop ALL", where, c.Name)
		}
	}
	r := c.Resources
	if r.Requests.Cpu().IsZero() || r.Requests.Memory().IsZero() || r.Limits.Memory().IsZero() {
		t.Errorf("%s: container %s needs cpu and memory requests and a memory limit", where, c.Name)
	}
	if pod.AutomountServiceAccountToken == nil || *pod.AutomountServiceAccountToken {
		t.Errorf("%s: vigil never calls the Kubernetes API: automountServiceAccountToken should be false", where)
	}
}

// checkVigilEnv: every VIGIL_* variable is a flag twin of the command run.
func checkVigilEnv(t *testing.T, where string, c corev1.Container, env map[string]string) {
	t.Helper()
	checkCommandArgs(t, where, c.Command)
	name, fs := flagsOf(t, c.Command)
	if fs == nil {
		t.Errorf("%s: container %s does not run vigil (%q)", where, c.Name, c.Command)
		return
	}
	twins := fs.env()
	for k := range env {
		if _, ok := twins[k]; !ok && !referenced(k, env) {
			t.Errorf("%s: %s is not a flag twin of %s (known: %v)", where, k, name, sortedEnv(twins))
		}
	}
	checkNoSecretsInEnv(t, where, env)
}

// checkNoSecretsInEnv: the database URL is set, and no URL or variable in
// the environment carries a password: passwords come from files.
func checkNoSecretsInEnv(t *testing.T, where string, env map[string]string) {
	t.Helper()
	if env["VIGIL_DATABASE_URL"] == "" {
		t.Errorf("%s: VIGIL_DATABASE_URL not set", where)
	}
	for k, v := range env {
		if strings.HasSuffix(k, "_URL") && v != "" {
			checkURLWithoutPassword(t, where+": "+k, v)
		}
		if strings.Contains(k, "PASSWORD") && !strings.HasSuffix(k, "_FILE") {
			t.Errorf("%s: %s is a password in a variable; use its *_FILE twin", where, k)
		}
	}
}

// checkURLWithoutPassword: a URL that names its user and leaves the password
// to the matching *-password-file flag.
func checkURLWithoutPassword(t *testing.T, where, raw string) {
	t.Helper()
	u, err := url.Parse(raw)
	if err != nil {
		t.Errorf("%s: %v", where, err)
		return
	}
	if _, set := u.User.Password(); set {
		t.Errorf("%s: %s carries a password; it belongs in the password file", where, u.Redacted())
	}
	if u.User.Username() == "" {
		t.Errorf("%s: %q names no user for the password file's password", where, raw)
	}
}

// mountedSecret is the Secret key a container sees at a path.
type mountedSecret struct {
	secret, key string
	mount       corev1.VolumeMount
	source      *corev1.SecretVolumeSource
	mode        *int32 // the key's item mode, else the volume's defaultMode
}

// secretAt resolves a file path in container c through its volume mounts
// (the deepest mount holding it) to the Secret key projected there.
func secretAt(pod corev1.PodSpec, c corev1.Container, file string) (mountedSecret, error) {
	var best *corev1.VolumeMount
	for i, m := range c.VolumeMounts {
		if (file == m.MountPath || strings.HasPrefix(file, strings.TrimSuffix(m.MountPath, "/")+"/")) &&
			(best == nil || len(m.MountPath) > len(best.MountPath)) {
			best = &c.VolumeMounts[i]
		}
	}
	if best == nil {
		return mountedSecret{}, fmt.Errorf("%s is on no volume mount of container %s", file, c.Name)
	}
	inVolume := path.Join(best.SubPath, strings.TrimPrefix(strings.TrimPrefix(file, best.MountPath), "/"))
	for _, v := range pod.Volumes {
		if v.Name != best.Name {
			continue
		}
		if v.Secret == nil {
			return mountedSecret{}, fmt.Errorf("%s is on volume %s, which is not a Secret", file, v.Name)
		}
		ms := mountedSecret{secret: v.Secret.SecretName, mount: *best, source: v.Secret, mode: v.Secret.DefaultMode}
		if len(v.Secret.Items) == 0 {
			ms.key = inVolume
			return ms, nil
		}
		for _, it := range v.Secret.Items {
			if path.Clean(it.Path) == inVolume {
				ms.key = it.Key
				if it.Mode != nil {
					ms.mode = it.Mode
				}
				return ms, nil
			}
		}
		return mountedSecret{}, fmt.Errorf("%s: Secret volume %s projects no item at %s", file, v.Name, inVolume)
	}
	return mountedSecret{}, fmt.Errorf("%s: container %s mounts volume %s, which the pod does not have", file, c.Name, best.Name)
}

// checkSecretFiles: every VIGIL_*_FILE setting of env names a file of a
// Secret volume mounted read-only, readable by vigil's group through fsGroup
// and by nobody else, and the known ones name their documented Secret and key
// (secretFiles). want lists the settings that must be there.
func checkSecretFiles(t *testing.T, where string, pod corev1.PodSpec, c corev1.Container, env map[string]string, want ...string) {
	t.Helper()
	for _, k := range want {
		if env[k] == "" {
			t.Errorf("%s: container %s: %s not set", where, c.Name, k)
		}
	}
	psc := pod.SecurityContext
	for k, file := range env {
		if !strings.HasPrefix(k, "VIGIL_") || !strings.HasSuffix(k, "_FILE") || file == "" {
			continue
		}
		ms, err := secretAt(pod, c, file)
		if err != nil {
			t.Errorf("%s: %s: %v", where, k, err)
			continue
		}
		if w, ok := secretFiles[k]; ok && (ms.secret != w.secret || ms.key != w.key) {
			t.Errorf("%s: %s = %s is key %q of Secret %q, want key %q of Secret %q", where, k, file, ms.key, ms.secret, w.key, w.secret)
		}
		if !ms.mount.ReadOnly {
			t.Errorf("%s: container %s mounts %s (for %s) writable", where, c.Name, ms.mount.MountPath, k)
		}
		if ms.source.Optional != nil && *ms.source.Optional {
			t.Errorf("%s: Secret %s (for %s) is optional: a missing one should stop the pod, not start vigil without it", where, ms.secret, k)
		}
		switch {
		case ms.mode == nil:
			t.Errorf("%s: Secret volume for %s has no defaultMode (the default, 0644, lets every user read it)", where, k)
		case *ms.mode&^0o440 != 0 || *ms.mode&0o040 == 0:
			t.Errorf("%s: %s is mode %#o; want owner and group read only (0440)", where, k, *ms.mode)
		}
		if psc == nil || psc.FSGroup == nil || *psc.FSGroup == 0 {
			t.Errorf("%s: %s: without a pod fsGroup the Secret's files belong to root and vigil's non-root user cannot read them", where, k)
		}
	}
}

// referenced reports whether a variable that is not vigil's is there only to
// be expanded into a vigil variable ($(POD_IP) in VIGIL_ADVERTISE_ADDR).
func referenced(name string, env map[string]string) bool {
	if strings.HasPrefix(name, "VIGIL_") {
		return false
	}
	for k, v := range env {
		if strings.HasPrefix(k, "VIGIL_") && strings.Contains(v, "$("+name+")") {
			return true
		}
	}
	return false
}

func selects(t *testing.T, where string, sel *metav1.LabelSelector, podLabels map[string]string) {
	t.Helper()
	s, err := metav1.LabelSelectorAsSelector(sel)
	if err != nil {
		t.Errorf("%s: selector: %v", where, err)
		return
	}
	if s.Empty() || !s.Matches(labels.Set(podLabels)) {
		t.Errorf("%s: selector %s does not select the vigil pods %v", where, s, podLabels)
	}
}

// replica is the Deployment's vigil container and its environment.
func replica(t *testing.T, objs []any) (*appsv1.Deployment, corev1.Container, map[string]string) {
	t.Helper()
	d := one[*appsv1.Deployment](t, objs)
	if len(d.Spec.Template.Spec.Containers) != 1 {
		t.Fatalf("Deployment %s: want one container", d.Name)
	}
	c := d.Spec.Template.Spec.Containers[0]
	return d, c, envOf(t, "Deployment "+d.Name, c, objs)
}

func TestKubernetesReplicas(t *testing.T) {
	objs := kustomize(t, k8sOperatorDir)
	d, c, env := replica(t, objs)
	where := "Deployment " + d.Name
	if d.Spec.Replicas == nil || *d.Spec.Replicas != 3 {
		t.Errorf("%s: want 3 replicas", where)
	}
	podLabels := d.Spec.Template.Labels
	selects(t, where, d.Spec.Selector, podLabels)
	pod := d.Spec.Template.Spec
	if !slices.Equal(c.Command, []string{"vigil", "run"}) {
		t.Errorf("%s: command %q, want vigil run", where, c.Command)
	}
	checkVigilEnv(t, where, c, env)
	checkContainerSecurity(t, where, pod, c)
	for _, key := range []string{"VIGIL_ETCD_ENDPOINTS", "VIGIL_CLUSTER", "VIGIL_HTTP_ADDR", "VIGIL_LEASE_TTL"} {
		if env[key] == "" {
			t.Errorf("%s: %s not set", where, key)
		}
	}

	// The admin listener: reachable from the kubelet and Prometheus, and the
	// port the probes, the Service and the PodMonitor use.
	adminPort := adminPortOf(t, where, c, env)
	ports := containerPorts(c)
	resolve := func(p intstr.IntOrString) int {
		if p.Type == intstr.String {
			return int(ports[p.StrVal])
		}
		return p.IntValue()
	}
	for _, probe := range []struct {
		name string
		p    *corev1.Probe
		path string
	}{{"readinessProbe", c.ReadinessProbe, "/readyz"}, {"livenessProbe", c.LivenessProbe, "/healthz"}} {
		if probe.p == nil || probe.p.HTTPGet == nil {
			t.Errorf("%s: no HTTP %s", where, probe.name)
			continue
		}
		if probe.p.HTTPGet.Path != probe.path {
			t.Errorf("%s: %s GETs %q, want %s", where, probe.name, probe.p.HTTPGet.Path, probe.path)
		}
		if got := resolve(probe.p.HTTPGet.Port); got != adminPort {
			t.Errorf("%s: %s port %d, the admin listener is on %d", where, probe.name, got, adminPort)
		}
	}

	// SIGTERM hands the shards over, bounded by 2 × lease TTL: the kubelet
	// must not SIGKILL before.
	ttl, err := time.ParseDuration(env["VIGIL_LEASE_TTL"])
	if err != nil {
		t.Fatalf("%s: VIGIL_LEASE_TTL: %v", where, err)
	}
	if g := pod.TerminationGracePeriodSeconds; g == nil || time.Duration(*g)*time.Second <= 2*ttl {
		t.Errorf("%s: terminationGracePeriodSeconds must exceed 2 × lease TTL = %s", where, 2*ttl)
	}

	pdb := one[*policyv1.PodDisruptionBudget](t, objs)
	if pdb.Spec.MaxUnavailable == nil || pdb.Spec.MaxUnavailable.IntValue() != 1 || pdb.Spec.MinAvailable != nil {
		t.Errorf("PodDisruptionBudget %s: want maxUnavailable 1", pdb.Name)
	}
	selects(t, "PodDisruptionBudget "+pdb.Name, pdb.Spec.Selector, podLabels)

	svc := one[*corev1.Service](t, objs)
	selects(t, "Service "+svc.Name, &metav1.LabelSelector{MatchLabels: svc.Spec.Selector}, podLabels)
	for _, p := range svc.Spec.Ports {
		if resolve(p.TargetPort) != adminPort {
			t.Errorf("Service %s: port %s targets %s, not the admin port %d", svc.Name, p.Name, p.TargetPort.String(), adminPort)
		}
	}

	pm := one[*monitoringv1.PodMonitor](t, objs)
	selects(t, "PodMonitor "+pm.Name, &pm.Spec.Selector, podLabels)
	if podLabels[pm.Spec.JobLabel] != "vigil" {
		t.Errorf(`PodMonitor %s: jobLabel %q must name a pod label whose value is "vigil" (the rules expect job="vigil")`, pm.Name, pm.Spec.JobLabel)
	}
	for _, ep := range pm.Spec.PodMetricsEndpoints {
		if ep.Port == nil || ports[*ep.Port] != int32(adminPort) {
			t.Errorf("PodMonitor %s: endpoint port %q is not the admin port", pm.Name, deref(ep.Port))
		}
	}
}

func containerPorts(c corev1.Container) map[string]int32 {
	ports := map[string]int32{}
	for _, p := range c.Ports {
		ports[p.Name] = p.ContainerPort
	}
	return ports
}

// adminPortOf is the port of VIGIL_HTTP_ADDR, which must listen on every
// interface and be the container's port "admin".
func adminPortOf(t *testing.T, where string, c corev1.Container, env map[string]string) int {
	t.Helper()
	host, portStr, err := net.SplitHostPort(env["VIGIL_HTTP_ADDR"])
	if err != nil || (host != "0.0.0.0" && host != "" && host != "::") {
		t.Errorf("%s: VIGIL_HTTP_ADDR %q must listen on all interfaces", where, env["VIGIL_HTTP_ADDR"])
	}
	port, _ := strconv.Atoi(portStr)
	if got := containerPorts(c)["admin"]; int(got) != port {
		t.Errorf("%s: container port admin is %d, VIGIL_HTTP_ADDR listens on %d", where, got, port)
	}
	return port
}

// TestKubernetesSecretsMounted: the replica's passwords and agent TLS files
// are the operator's Secrets, mounted where the ConfigMap's settings point.
func TestKubernetesSecretsMounted(t *testing.T) {
	objs := kustomize(t, k8sDir)
	d, c, env := replica(t, objs)
	where := "Deployment " + d.Name
	checkSecretFiles(t, where, d.Spec.Template.Spec, c, env,
		"VIGIL_DATABASE_PASSWORD_FILE", "VIGIL_AGENT_CA_FILE", "VIGIL_AGENT_CERT_FILE", "VIGIL_AGENT_KEY_FILE")
	cm := one[*corev1.ConfigMap](t, objs)
	for _, k := range []string{"VIGIL_DATABASE_URL", "VIGIL_DATABASE_PASSWORD_FILE", "VIGIL_AGENT_CA_FILE", "VIGIL_AGENT_CERT_FILE", "VIGIL_AGENT_KEY_FILE"} {
		if cm.Data[k] == "" {
			t.Errorf("ConfigMap %s: %s not set", cm.Name, k)
		}
	}
	checkURLWithoutPassword(t, "ConfigMap "+cm.Name+": VIGIL_DATABASE_URL", cm.Data["VIGIL_DATABASE_URL"])
}

// TestKubernetesMigrationInitContainer: every pod brings the schema up to its
// image's version before its replica starts, configured like the replica.
func TestKubernetesMigrationInitContainer(t *testing.T) {
	objs := kustomize(t, k8sDir)
	d, run, runEnv := replica(t, objs)
	where := "Deployment " + d.Name
	pod := d.Spec.Template.Spec
	if len(pod.InitContainers) != 1 {
		t.Fatalf("%s: want one init container (vigil migrate), found %d", where, len(pod.InitContainers))
	}
	c := pod.InitContainers[0]
	if !slices.Equal(c.Command, []string{"vigil", "migrate"}) {
		t.Errorf("%s: init container %s runs %q, want vigil migrate (never --control-plane-tables against the control plane's database)", where, c.Name, c.Command)
	}
	checkCommandArgs(t, where, c.Command)
	if c.Image != run.Image {
		t.Errorf("%s: init container image %q, the replica's is %q: each version migrates its own schema", where, c.Image, run.Image)
	}
	if !reflect.DeepEqual(c.EnvFrom, run.EnvFrom) {
		t.Errorf("%s: init container envFrom %v, the replica's is %v: both read the same settings", where, c.EnvFrom, run.EnvFrom)
	}
	env := envOf(t, where, c, objs)
	_, migrate := flagsOf(t, c.Command)
	_, runFlags := flagsOf(t, run.Command)
	migrateEnv := map[string]string{}
	for k, v := range env {
		switch _, isMigrate := migrate.env()[k]; {
		case isMigrate:
			migrateEnv[k] = v
		case !referenced(k, env):
			// The shared ConfigMap: vigil migrate ignores run's settings.
			if _, isRun := runFlags.env()[k]; !isRun {
				t.Errorf("%s: init container: %s is a flag twin of neither vigil migrate nor vigil run", where, k)
			}
		}
	}
	checkNoSecretsInEnv(t, where+" (init container)", migrateEnv)
	checkSecretFiles(t, where+" (init container)", pod, c, migrateEnv, "VIGIL_DATABASE_PASSWORD_FILE")
	for _, k := range []string{"VIGIL_DATABASE_URL", "VIGIL_DATABASE_PASSWORD_FILE"} {
		if env[k] != runEnv[k] {
			t.Errorf("%s: init container %s = %q, the replica's is %q", where, k, env[k], runEnv[k])
		}
	}
	checkContainerSecurity(t, where, pod, c)
}

// admits reports whether a NetworkPolicy lets a pod with podLabels in a
// namespace with nsLabels connect to the selected pods' TCP port, the
// NetworkPolicy semantics for the cases our policy uses (no ipBlock).
func admits(np *networkingv1.NetworkPolicy, ns string, nsLabels, podLabels map[string]string, port int32, named map[string]int32) bool {
	matches := func(sel *metav1.LabelSelector, l map[string]string) bool {
		s, err := metav1.LabelSelectorAsSelector(sel)
		return err == nil && s.Matches(labels.Set(l))
	}
	portOK := func(ports []networkingv1.NetworkPolicyPort) bool {
		if len(ports) == 0 {
			return true
		}
		for _, p := range ports {
			if p.Protocol != nil && *p.Protocol != corev1.ProtocolTCP {
				continue
			}
			switch {
			case p.Port == nil:
				return true
			case p.Port.Type == intstr.String && named[p.Port.StrVal] == port:
				return true
			case p.Port.Type == intstr.Int && (p.Port.IntVal == port || p.EndPort != nil && p.Port.IntVal <= port && port <= *p.EndPort):
				return true
			}
		}
		return false
	}
	for _, rule := range np.Spec.Ingress {
		if !portOK(rule.Ports) {
			continue
		}
		if len(rule.From) == 0 {
			return true
		}
		for _, peer := range rule.From {
			if peer.IPBlock != nil {
				continue
			}
			nsOK := ns == np.Namespace
			if peer.NamespaceSelector != nil {
				nsOK = matches(peer.NamespaceSelector, nsLabels)
			}
			if nsOK && (peer.PodSelector == nil || matches(peer.PodSelector, podLabels)) {
				return true
			}
		}
	}
	return false
}

// TestKubernetesNetworkPolicy: ingress to the replicas only on the admin
// port, only from each other and from the monitoring namespace.
func TestKubernetesNetworkPolicy(t *testing.T) {
	objs := kustomize(t, k8sDir)
	d, c, env := replica(t, objs)
	podLabels := d.Spec.Template.Labels
	admin := int32(adminPortOf(t, "Deployment "+d.Name, c, env))
	named := containerPorts(c)
	np := one[*networkingv1.NetworkPolicy](t, objs)
	where := "NetworkPolicy " + np.Name
	selects(t, where, &np.Spec.PodSelector, podLabels)
	if !slices.Contains(np.Spec.PolicyTypes, networkingv1.PolicyTypeIngress) {
		t.Errorf("%s: policyTypes %v does not restrict Ingress", where, np.Spec.PolicyTypes)
	}
	nsLabels := func(ns string) map[string]string { return map[string]string{"kubernetes.io/metadata.name": ns} }
	for _, tc := range []struct {
		name      string
		ns        string
		podLabels map[string]string
		port      int32
		want      bool
	}{
		{"a peer replica reaches the admin listener (crash failover)", k8sNamespace, podLabels, admin, true},
		{"Prometheus in the monitoring namespace scrapes it", k8sMonitoringNamespace, map[string]string{"app.kubernetes.io/name": "prometheus"}, admin, true},
		{"another pod of vigil's namespace does not", k8sNamespace, map[string]string{"app.kubernetes.io/name": "debug"}, admin, false},
		{"a pod labelled vigil in another namespace does not", "default", podLabels, admin, false},
		{"a peer replica reaches no other port", k8sNamespace, podLabels, admin + 1, false},
	} {
		if got := admits(np, tc.ns, nsLabels(tc.ns), tc.podLabels, tc.port, named); got != tc.want {
			t.Errorf("%s: %s: admitted = %v, want %v", where, tc.name, got, tc.want)
		}
	}
}

// TestKubernetesEventsComponent: events are off in the base and turned on,
// password from Secret vigil-events, by components/events.
func TestKubernetesEventsComponent(t *testing.T) {
	base := kustomize(t, k8sDir)
	d, _, _ := replica(t, base)
	for _, c := range append(slices.Clone(d.Spec.Template.Spec.InitContainers), d.Spec.Template.Spec.Containers...) {
		for k := range envOf(t, "base", c, base) {
			if strings.HasPrefix(k, "VIGIL_EVENTS_") {
				t.Errorf("base: container %s sets %s; events belong to %s", c.Name, k, k8sEventsDir)
			}
		}
	}
	for _, v := range d.Spec.Template.Spec.Volumes {
		if v.Secret != nil && v.Secret.SecretName == secretFiles["VIGIL_EVENTS_REDIS_PASSWORD_FILE"].secret {
			t.Errorf("base: mounts Secret %s; events belong to %s", v.Secret.SecretName, k8sEventsDir)
		}
	}

	objs := kustomizeOverlay(t, k8sEventsDir)
	d, c, env := replica(t, objs)
	where := "with " + k8sEventsDir + ": Deployment " + d.Name
	checkVigilEnv(t, where, c, env)
	checkSecretFiles(t, where, d.Spec.Template.Spec, c, env,
		"VIGIL_DATABASE_PASSWORD_FILE", "VIGIL_AGENT_CA_FILE", "VIGIL_AGENT_CERT_FILE", "VIGIL_AGENT_KEY_FILE",
		"VIGIL_EVENTS_REDIS_PASSWORD_FILE")
	for _, k := range []string{"VIGIL_EVENTS_REDIS_URL", "VIGIL_EVENTS_STREAM", "VIGIL_EVENTS_SSE_CHANNEL"} {
		if env[k] == "" {
			t.Errorf("%s: %s not set", where, k)
		}
	}
	if u, err := url.Parse(env["VIGIL_EVENTS_REDIS_URL"]); err != nil || (u.Scheme != "redis" && u.Scheme != "rediss") {
		t.Errorf("%s: VIGIL_EVENTS_REDIS_URL %q is not a redis:// or rediss:// URL", where, env["VIGIL_EVENTS_REDIS_URL"])
	}
	for _, s := range find[*corev1.Secret](objs) {
		t.Errorf("with %s: creates Secret %s; the operator creates it", k8sEventsDir, s.Name)
	}
	for _, o := range objs {
		if m, ok := o.(metav1.Object); ok && m.GetNamespace() != k8sNamespace {
			if _, isNS := o.(*corev1.Namespace); !isNS {
				t.Errorf("with %s: %T %s in namespace %q", k8sEventsDir, o, m.GetName(), m.GetNamespace())
			}
		}
	}
}

// prometheusRuleFor embeds vigil-rules.yml's groups in a PrometheusRule.
func prometheusRuleFor(t *testing.T) *monitoringv1.PrometheusRule {
	t.Helper()
	pr := &monitoringv1.PrometheusRule{
		TypeMeta: metav1.TypeMeta{APIVersion: "monitoring.coreos.com/v1", Kind: "PrometheusRule"},
		ObjectMeta: metav1.ObjectMeta{
			Name:   "vigil",
			Labels: map[string]string{"app.kubernetes.io/name": "vigil", "release": "prometheus"},
		},
	}
	for _, g := range loadRules(t).Groups {
		mg := monitoringv1.RuleGroup{Name: g.Name}
		if g.Interval != 0 {
			d := monitoringv1.Duration(g.Interval.String())
			mg.Interval = &d
		}
		for _, r := range g.Rules {
			mr := monitoringv1.Rule{Record: r.Record, Alert: r.Alert, Expr: intstr.FromString(r.Expr), Labels: r.Labels, Annotations: r.Annotations}
			if r.For != 0 {
				d := monitoringv1.Duration(r.For.String())
				mr.For = &d
			}
			mg.Rules = append(mg.Rules, mr)
		}
		pr.Spec.Groups = append(pr.Spec.Groups, mg)
	}
	return pr
}

// TestPrometheusRuleMatchesRules: the operator's PrometheusRule carries exactly
// the rules of vigil-rules.yml (which promtool tests); deploy/mixin renders
// both.
func TestPrometheusRuleMatchesRules(t *testing.T) {
	want := prometheusRuleFor(t)
	obj, err := decodeStrict(readFile(t, prometheusRuleGen))
	if err != nil {
		t.Fatalf("%s: %v", prometheusRuleGen, err)
	}
	got, ok := obj.(*monitoringv1.PrometheusRule)
	if !ok {
		t.Fatalf("%s: a %T, want a PrometheusRule", prometheusRuleGen, obj)
	}
	gj, _ := json.Marshal(got.Spec)
	wj, _ := json.Marshal(want.Spec)
	if !bytes.Equal(gj, wj) {
		t.Errorf("%s is out of date with %s: run `go run ./mixin` in deploy/", prometheusRuleGen, rulesFile)
	}
}

func deref(s *string) string {
	if s == nil {
		return ""
	}
	return *s
}
