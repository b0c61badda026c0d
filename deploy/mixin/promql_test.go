package main

import (
	"strings"
	"testing"
)

func testRewriter(t *testing.T, cfg Config, dashboard bool) *rewriter {
	t.Helper()
	m, err := newMixin(root, cfg)
	if err != nil {
		t.Fatal(err)
	}
	if dashboard {
		return m.panels
	}
	return m.rules
}

func TestRewrite(t *testing.T) {
	r := testRewriter(t, custom, false)
	for _, c := range []struct{ src, want string }{
		{`sum(vigil_shards_owned)`, `sum by (k8s_cluster) (vigil_shards_owned{job="vigil-prod",namespace="x"})`},
		{`sum (vigil_shards_owned)`, `sum by (k8s_cluster) (vigil_shards_owned{job="vigil-prod",namespace="x"})`},
		{`max by (shard) (vigil_x{a="b"})`, `max by (k8s_cluster, shard) (vigil_x{job="vigil-prod",namespace="x",a="b"})`},
		{`max by () (vigil_x)`, `max by (k8s_cluster) (vigil_x{job="vigil-prod",namespace="x"})`},
		{`sum without (instance) (vigil_x)`, `sum without (instance) (vigil_x{job="vigil-prod",namespace="x"})`},
		{`topk(3, vigil_x)`, `topk by (k8s_cluster) (3, vigil_x{job="vigil-prod",namespace="x"})`},
		// Recorded series are grouped already and have no job label.
		{`max(vigil:lag)`, `max by (k8s_cluster) (vigil:lag)`},
		{`vigil_x offset 10m`, `vigil_x{job="vigil-prod",namespace="x"} offset 10m`},
		{`rate(vigil_x[5m])`, `rate(vigil_x{job="vigil-prod",namespace="x"}[5m])`},
		{`a * on (x) group_left (y) b`, `a{job="vigil-prod",namespace="x"} * on (k8s_cluster, x) group_left (y) b{job="vigil-prod",namespace="x"}`},
		{`a / on () b`, `a{job="vigil-prod",namespace="x"} / on (k8s_cluster) b{job="vigil-prod",namespace="x"}`},
		{`sum(a) or on () vector(0)`, `sum by (k8s_cluster) (a{job="vigil-prod",namespace="x"}) or on () vector(0)`},
		{`time() - max(a) > 90`, `time() - max by (k8s_cluster) (a{job="vigil-prod",namespace="x"}) > 90`},
		// Line breaks and indentation stay where they were.
		{"sum(\n  a\n  or\n  b\n) > 0", "sum by (k8s_cluster) (\n  a{job=\"vigil-prod\",namespace=\"x\"}\n  or\n  b{job=\"vigil-prod\",namespace=\"x\"}\n) > 0"},
	} {
		got, err := r.rewrite(c.src)
		if err != nil {
			t.Errorf("%q: %v", c.src, err)
			continue
		}
		if got != c.want {
			t.Errorf("%q:\n got  %s\n want %s", c.src, got, c.want)
		}
	}
}

func TestRewriteDashboard(t *testing.T) {
	r := testRewriter(t, Config{Selector: `job="vigil"`, ClusterLabel: "cluster"}, true)
	for _, c := range []struct{ src, want string }{
		{`sum by (kind) (rate(vigil_x{instance=~"$instance"}[$__rate_interval]))`,
			`sum by (cluster, kind) (rate(vigil_x{job="vigil",cluster=~"$cluster",instance=~"$instance"}[$__rate_interval]))`},
		{`max(vigil:lag)`, `max by (cluster) (vigil:lag{cluster=~"$cluster"})`},
		{`rate(vigil_x[${__interval}])`, `rate(vigil_x{job="vigil",cluster=~"$cluster"}[${__interval}])`},
	} {
		got, err := r.rewrite(c.src)
		if err != nil {
			t.Errorf("%q: %v", c.src, err)
			continue
		}
		if got != c.want {
			t.Errorf("%q:\n got  %s\n want %s", c.src, got, c.want)
		}
	}
}

// TestRewriteRefuses: expressions whose result cannot keep clusters apart,
// or that the text rewrite cannot handle, are errors, not wrong rules.
func TestRewriteRefuses(t *testing.T) {
	r := testRewriter(t, Config{Selector: `job="vigil"`, ClusterLabel: "cluster"}, false)
	for _, c := range []struct{ src, why string }{
		{`sum(a) or vector(0)`, "one side has no labels"},
		{`max(a) - vector(1)`, "one side has no labels"},
		{`sum without (cluster) (a)`, "drops the cluster label"},
		{`a - ignoring (cluster) b`, "mixes clusters"},
		{`sum(a) by (shard)`, "grouping before the arguments"},
		{`absent(a)`, "no cluster label"},
		{`scalar(sum(a))`, "two clusters"},
		{`label_replace(a, "cluster", "x", "", "")`, "overwrites the cluster label"},
		{`a{job="other"}`, "config's to set"},
		{`{__name__="a"}`, "metric name before the braces"},
	} {
		_, err := r.rewrite(c.src)
		if err == nil || !strings.Contains(err.Error(), c.why) {
			t.Errorf("%q: error %v, want one saying %q", c.src, err, c.why)
		}
	}
}

func TestConfigRefuses(t *testing.T) {
	for _, c := range []Config{
		{Selector: ``, ClusterLabel: "cluster"},
		{Selector: `job=`, ClusterLabel: "cluster"},
		{Selector: `job="vigil"`, ClusterLabel: "not a label"},
		{Selector: `__name__="up"`, ClusterLabel: "cluster"},
		{Selector: `job="vigil",cluster="prod"`, ClusterLabel: "cluster"},
	} {
		if _, err := c.matchers(); err == nil {
			t.Errorf("%+v: no error", c)
		}
	}
}

// TestRewriteExprs: in a YAML text only the expressions change, folded
// lines included; a line indented deeper keeps its line breaks.
func TestRewriteExprs(t *testing.T) {
	r := testRewriter(t, Config{Selector: `job="vigil"`, ClusterLabel: "cluster"}, false)
	src := `groups:
  - name: g # a comment
    rules:
      # a rule
      - record: r
        expr: sum(a)

      - alert: A
        expr: >-
          max(b)
          -
          sum(
            c
          ) > 0
        for: 1m
`
	want := `groups:
  - name: g # a comment
    rules:
      # a rule
      - record: r
        expr: sum by (cluster) (a{job="vigil"})

      - alert: A
        expr: >-
          max by (cluster) (b{job="vigil"})
          -
          sum by (cluster) (
            c{job="vigil"}
          ) > 0
        for: 1m
`
	got, err := rewriteExprs(src, r.edits)
	if err != nil {
		t.Fatal(err)
	}
	if got != want {
		t.Errorf("got\n%s\nwant\n%s", got, want)
	}
	for _, bad := range []string{
		"expr: 'sum(a)'\n",
		"expr: sum(a) # why\n",
		"expr: |\n  sum(a)\n",
	} {
		if _, err := rewriteExprs(bad, r.edits); err == nil {
			t.Errorf("%q: no error", bad)
		}
	}
}
