package main

import (
	"bytes"
	"encoding/json"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"

	"github.com/prometheus/prometheus/model/labels"
	"github.com/prometheus/prometheus/promql/parser"
	"go.yaml.in/yaml/v3"
)

// root is deploy/, seen from this package's directory.
const root = ".."

// TestCommittedFilesAreRendered: the committed rules, dashboard, Grafana
// alerting and PrometheusRule are what the sources render with config.json.
// A hand edit of a rendered file fails here; edit mixin/ and re-render.
func TestCommittedFilesAreRendered(t *testing.T) {
	cfg, err := loadConfig("config.json")
	if err != nil {
		t.Fatal(err)
	}
	files, err := render(root, cfg)
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range files {
		got, err := os.ReadFile(filepath.Join(root, f.path))
		if err != nil {
			t.Error(err)
			continue
		}
		if !bytes.Equal(got, f.data) {
			t.Errorf("deploy/%s is not what deploy/mixin renders (%s): edit the sources in deploy/mixin/, then run `go run ./mixin` in deploy/\n%s",
				f.path, cfg, firstDifference(got, f.data))
		}
	}
}

// firstDifference shows the first line where the committed and rendered
// texts part.
func firstDifference(got, want []byte) string {
	g, w := strings.Split(string(got), "\n"), strings.Split(string(want), "\n")
	for i := range min(len(g), len(w)) {
		if g[i] != w[i] {
			return "line " + strconv.Itoa(i+1) + ":\n  committed: " + g[i] + "\n  rendered:  " + w[i]
		}
	}
	return "the committed file has " + strconv.Itoa(len(g)) + " lines, the rendered one " + strconv.Itoa(len(w))
}

// custom is a config unlike the default in every respect.
var custom = Config{Selector: `job="vigil-prod",namespace="x"`, ClusterLabel: "k8s_cluster"}

// TestCustomConfig renders for another selector and cluster label and reads
// every expression of every rendered file back: each selector of vigil's
// series carries the selector's matchers, each dashboard selector keeps to
// $cluster, each aggregation groups by the label and each on (…) matches
// on it. Nothing is left of the default config.
func TestCustomConfig(t *testing.T) {
	files, err := render(root, custom)
	if err != nil {
		t.Fatal(err)
	}
	want, err := custom.matchers()
	if err != nil {
		t.Fatal(err)
	}
	picked := labels.MustNewMatcher(labels.MatchRegexp, custom.ClusterLabel, "$"+clusterVar)
	seen := map[string]int{}
	for _, f := range files {
		exprs, err := exprsOf(f)
		if err != nil {
			t.Fatalf("%s: %v", f.path, err)
		}
		if len(exprs) == 0 {
			t.Errorf("%s: no expressions found", f.path)
		}
		for _, e := range exprs {
			every := []*labels.Matcher(nil)
			if f.path == dashboardFile {
				every = []*labels.Matcher{picked}
			}
			checkExpr(t, f.path, e, custom.ClusterLabel, want, every)
			seen[f.path]++
		}
		if bytes.Contains(f.data, []byte(`job="vigil"`)) || bytes.Contains(f.data, []byte(`job=\"vigil\"`)) {
			t.Errorf("%s: still names the default selector job=\"vigil\"", f.path)
		}
	}
	t.Logf("expressions checked per file: %v", seen)
	checkCustomDashboard(t, files)
}

// exprsOf returns every PromQL expression of a rendered file.
func exprsOf(f file) ([]string, error) {
	if f.path == dashboardFile {
		type panel struct {
			Targets []struct{ Expr string } `json:"targets"`
			Panels  []panel                 `json:"panels"` // a collapsed row's
		}
		var d struct{ Panels []panel }
		if err := json.Unmarshal(f.data, &d); err != nil {
			return nil, err
		}
		var out []string
		var walk func([]panel)
		walk = func(ps []panel) {
			for _, p := range ps {
				for _, t := range p.Targets {
					out = append(out, t.Expr)
				}
				walk(p.Panels)
			}
		}
		walk(d.Panels)
		return out, nil
	}
	// The YAML files: every expr (rules, PrometheusRule, Grafana's models).
	var doc yaml.Node
	if err := yaml.Unmarshal(f.data, &doc); err != nil {
		return nil, err
	}
	var out []string
	var walk func(*yaml.Node)
	walk = func(n *yaml.Node) {
		for i := 0; n.Kind == yaml.MappingNode && i+1 < len(n.Content); i += 2 {
			if n.Content[i].Value == "expr" {
				out = append(out, n.Content[i+1].Value)
			}
		}
		for _, c := range n.Content {
			walk(c)
		}
	}
	walk(&doc)
	return out, nil
}

// checkExpr checks one rendered expression: what the mixin promises, for
// the cluster label cl, the selector's matchers sel and the matchers every
// selector gets.
func checkExpr(t *testing.T, where, expr, cl string, sel, every []*labels.Matcher) {
	t.Helper()
	e, err := promql.ParseExpr(parsable(expr))
	if err != nil {
		t.Errorf("%s: %q: %v", where, expr, err)
		return
	}
	parser.Inspect(e, func(n parser.Node, _ []parser.Node) error {
		switch n := n.(type) {
		case *parser.VectorSelector:
			want := every
			if !strings.Contains(n.Name, ":") {
				want = append(slices.Clip(sel), every...)
			}
			for _, m := range want {
				if !hasMatcher(n, m) {
					t.Errorf("%s: %s lacks %s in %q", where, n, m, expr)
				}
			}
			for _, m := range n.LabelMatchers {
				if m.Name == "cluster" || m.Name == "job" && !slices.ContainsFunc(sel, func(s *labels.Matcher) bool { return s.Name == "job" }) {
					t.Errorf("%s: %s keeps a label of the default config", where, n)
				}
			}
		case *parser.AggregateExpr:
			if slices.Contains(n.Grouping, cl) == n.Without || slices.Contains(n.Grouping, "cluster") {
				t.Errorf("%s: %s does not group by %s in %q", where, n.ShortString(), cl, expr)
			}
		case *parser.BinaryExpr:
			vm := n.VectorMatching
			if vm != nil && vm.On && carriesLabels(n.LHS) && carriesLabels(n.RHS) && !slices.Contains(vm.MatchingLabels, cl) {
				t.Errorf("%s: on %v does not match on %s in %q", where, vm.MatchingLabels, cl, expr)
			}
		}
		return nil
	})
}

func hasMatcher(vs *parser.VectorSelector, want *labels.Matcher) bool {
	return slices.ContainsFunc(vs.LabelMatchers, func(m *labels.Matcher) bool {
		return m.Name == want.Name && m.Type == want.Type && m.Value == want.Value
	})
}

// checkCustomDashboard: the $cluster variable offers the custom label's
// values of the custom selector's targets, and legends name the cluster.
func checkCustomDashboard(t *testing.T, files []file) {
	t.Helper()
	i := slices.IndexFunc(files, func(f file) bool { return f.path == dashboardFile })
	dash := string(files[i].data)
	for _, want := range []string{
		`"definition": "label_values(up{job=\"vigil-prod\",namespace=\"x\"}, k8s_cluster)"`,
		`"definition": "label_values(vigil_shards_owned{job=\"vigil-prod\",namespace=\"x\",k8s_cluster=~\"$cluster\"}, instance)"`,
		`"legendFormat": "{{k8s_cluster}} {{instance}}"`,
	} {
		if !strings.Contains(dash, want) {
			t.Errorf("%s: no %s", dashboardFile, want)
		}
	}
	if strings.Contains(dash, "{{cluster}}") {
		t.Errorf("%s: a legend names the default label {{cluster}}", dashboardFile)
	}
}

// TestCheckFlag renders the custom config into a directory, then -check
// finds it up to date there, and stale once a file is edited.
func TestCheckFlag(t *testing.T) {
	dir := t.TempDir()
	args := []string{"-root", root, "-selector", custom.Selector, "-cluster-label", custom.ClusterLabel, "-out", dir}
	if err := run(args); err != nil {
		t.Fatal(err)
	}
	if err := run(append(args, "-check")); err != nil {
		t.Fatalf("-check right after rendering: %v", err)
	}
	path := filepath.Join(dir, rulesFile)
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, bytes.Replace(b, []byte("> 90"), []byte("> 60"), 1), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := run(append(args, "-check")); err == nil || !strings.Contains(err.Error(), rulesFile) {
		t.Fatalf("-check after a hand edit: %v, want %s out of date", err, rulesFile)
	}
}
