package deploy

import (
	"io"
	"log/slog"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"

	"github.com/prometheus/common/model"
	"github.com/prometheus/prometheus/model/labels"
	"github.com/prometheus/prometheus/model/rulefmt"
	promparser "github.com/prometheus/prometheus/promql/parser"
	"sigs.k8s.io/yaml"
)

const (
	rulesFile  = "prometheus/vigil-rules.yml"
	promConfig = "prometheus/prometheus.yml"
	// runbookFile holds one section per alert; runbookURL is where operators
	// read it, and every alert's runbook_url is runbookURL#<its anchor>.
	runbookFile = repoRoot + "/docs/runbook.md"
	runbookURL  = "https://github.com/vigil-sh/vigil/blob/main/docs/runbook.md"
)

// rulesTestFiles are promtool's unit tests of rulesFile: one vigil cluster
// per Prometheus, and several in one.
var rulesTestFiles = []string{"prometheus/vigil-rules.test.yml", "prometheus/vigil-rules.clusters.test.yml"}

// The mixin's default config (mixin/config.json), which the committed files
// are rendered for: vigil's series are those of job="vigil", and the cluster
// label tells vigil clusters apart.
const (
	vigilJob     = "vigil"
	clusterLabel = "cluster"
)

// The alerts SPEC §5 and the deployment brief require, at least.
var requiredAlerts = []string{
	"VigilReconcileLagHigh",
	"VigilShardsUnowned",
	"VigilShardsDoublyClaimed",
	"VigilNoLeader",
	"VigilMultipleLeaders",
	"VigilReplicaDown",
	"VigilAgentsFailing",
	"VigilEventsBacklog",
}

func loadRules(t *testing.T) *rulefmt.RuleGroups {
	t.Helper()
	groups, errs := rulefmt.ParseFile(rulesFile, false, model.LegacyValidation, promqlParser, slog.New(slog.NewTextHandler(io.Discard, nil)))
	for _, err := range errs {
		t.Errorf("%s: %v", rulesFile, err)
	}
	if groups == nil {
		t.FailNow()
	}
	return groups
}

func recordNames(g *rulefmt.RuleGroups) map[string]bool {
	m := map[string]bool{}
	for _, grp := range g.Groups {
		for _, r := range grp.Rules {
			if r.Record != "" {
				m[r.Record] = true
			}
		}
	}
	return m
}

func alertRules(g *rulefmt.RuleGroups) []rulefmt.Rule {
	var rules []rulefmt.Rule
	for _, grp := range g.Groups {
		for _, r := range grp.Rules {
			if r.Alert != "" {
				rules = append(rules, r)
			}
		}
	}
	return rules
}

// githubAnchor is the fragment GitHub gives a Markdown heading.
func githubAnchor(heading string) string {
	h := strings.ToLower(strings.TrimSpace(heading))
	h = regexp.MustCompile(`[^a-z0-9 _-]`).ReplaceAllString(h, "")
	return strings.ReplaceAll(h, " ", "-")
}

// markdownAnchors returns the anchors of a Markdown file's headings (code
// blocks skipped), as GitHub renders them.
func markdownAnchors(t *testing.T, path string) map[string]bool {
	t.Helper()
	anchors := map[string]bool{}
	fenced := false
	for _, line := range strings.Split(string(readFile(t, path)), "\n") {
		if strings.HasPrefix(line, "```") {
			fenced = !fenced
			continue
		}
		if h, ok := strings.CutPrefix(line, "#"); ok && !fenced {
			anchors[githubAnchor(strings.TrimLeft(h, "#"))] = true
		}
	}
	return anchors
}

// checkRunbookURL: an alert's runbook_url is runbookURL#<alert name in lower
// case> and docs/runbook.md has that section.
func checkRunbookURL(t *testing.T, where, alert, url string, anchors map[string]bool) {
	t.Helper()
	anchor := strings.ToLower(alert)
	if want := runbookURL + "#" + anchor; url != want {
		t.Errorf("%s: runbook_url %q, want %q", where, url, want)
	}
	if !anchors[anchor] {
		t.Errorf("%s: %s has no section %q (anchor #%s)", where, runbookFile, alert, anchor)
	}
}

func TestPrometheusRules(t *testing.T) {
	groups := loadRules(t)
	records := recordNames(groups)
	anchors := markdownAnchors(t, runbookFile)

	seen := map[string]bool{}
	for _, grp := range groups.Groups {
		for _, r := range grp.Rules {
			name := r.Record + r.Alert
			where := rulesFile + ": " + name
			checkPromQL(t, where, r.Expr, records)
			checkClusters(t, where, r.Expr)
			if r.Record != "" {
				if !strings.HasPrefix(r.Record, "vigil:") {
					t.Errorf("%s: recording rules are named vigil:<metric>[:<operation>]", where)
				}
				continue
			}
			if seen[r.Alert] {
				t.Errorf("%s: alert defined twice", where)
			}
			seen[r.Alert] = true
			if sev := r.Labels["severity"]; !slices.Contains([]string{"critical", "warning", "info"}, sev) {
				t.Errorf("%s: severity label %q, want critical, warning or info", where, sev)
			}
			for _, a := range []string{"summary", "description", "runbook_url"} {
				if strings.TrimSpace(r.Annotations[a]) == "" {
					t.Errorf("%s: no %s annotation", where, a)
				}
				checkVigilNamesInText(t, where+" annotation "+a, r.Annotations[a])
			}
			for a := range r.Annotations {
				if !slices.Contains([]string{"summary", "description", "runbook_url"}, a) {
					t.Errorf("%s: annotation %q: alerts carry summary, description and runbook_url", where, a)
				}
			}
			checkRunbookURL(t, where, r.Alert, r.Annotations["runbook_url"], anchors)
		}
	}
	for _, a := range requiredAlerts {
		if !seen[a] {
			t.Errorf("%s: required alert %s missing", rulesFile, a)
		}
	}
}

// ruleTests mirrors the parts of promtool's unit-test file this test reads.
type ruleTests struct {
	RuleFiles []string `json:"rule_files"`
	Tests     []struct {
		Name          string `json:"name"`
		AlertRuleTest []struct {
			EvalTime  string `json:"eval_time"`
			Alertname string `json:"alertname"`
			ExpAlerts []any  `json:"exp_alerts"`
		} `json:"alert_rule_test"`
	} `json:"tests"`
}

// TestRuleUnitTestsCoverEveryAlert: every alert is shown both firing and not
// firing in the rules' unit tests.
func TestRuleUnitTestsCoverEveryAlert(t *testing.T) {
	firing, silent := map[string]int{}, map[string]int{}
	for _, f := range rulesTestFiles {
		var rt ruleTests
		if err := yaml.Unmarshal(readFile(t, f), &rt); err != nil {
			t.Fatalf("%s: %v", f, err)
		}
		if !slices.Contains(rt.RuleFiles, filepath.Base(rulesFile)) {
			t.Errorf("%s: rule_files %v does not load %s", f, rt.RuleFiles, filepath.Base(rulesFile))
		}
		for _, tc := range rt.Tests {
			for _, a := range tc.AlertRuleTest {
				if len(a.ExpAlerts) > 0 {
					firing[a.Alertname]++
				} else {
					silent[a.Alertname]++
				}
			}
		}
	}
	for _, r := range alertRules(loadRules(t)) {
		if firing[r.Alert] == 0 {
			t.Errorf("%v: no test shows %s firing", rulesTestFiles, r.Alert)
		}
		if silent[r.Alert] == 0 {
			t.Errorf("%v: no test shows %s not firing", rulesTestFiles, r.Alert)
		}
	}
}

// TestRuleUnitTestsSeveralClusters: the clusters' unit tests put two vigil
// clusters or more in one Prometheus, expect every alert with its cluster
// label, and show one cluster alerted while another is not.
func TestRuleUnitTestsSeveralClusters(t *testing.T) {
	f := rulesTestFiles[1]
	var rt struct {
		Tests []struct {
			Name        string `json:"name"`
			InputSeries []struct {
				Series string `json:"series"`
			} `json:"input_series"`
			AlertRuleTest []struct {
				ExpAlerts []struct {
					ExpLabels map[string]string `json:"exp_labels"`
				} `json:"exp_alerts"`
			} `json:"alert_rule_test"`
		} `json:"tests"`
	}
	if err := yaml.Unmarshal(readFile(t, f), &rt); err != nil {
		t.Fatalf("%s: %v", f, err)
	}
	partly := false
	for _, tc := range rt.Tests {
		clusters, alerted := map[string]bool{}, map[string]bool{}
		for _, in := range tc.InputSeries {
			ls, err := promqlParser.ParseMetric(in.Series)
			if err != nil {
				t.Fatalf("%s: %q: %v", f, in.Series, err)
			}
			clusters[ls.Get(clusterLabel)] = true
		}
		for _, a := range tc.AlertRuleTest {
			for _, e := range a.ExpAlerts {
				alerted[e.ExpLabels[clusterLabel]] = true
			}
		}
		if len(clusters) < 2 || clusters[""] {
			t.Errorf("%s: test %q: series of clusters %v, want two or more, each series of one", f, tc.Name, sortedKeys(clusters))
		}
		if alerted[""] {
			t.Errorf("%s: test %q: expects an alert without its %s label", f, tc.Name, clusterLabel)
		}
		partly = partly || (len(alerted) > 0 && len(alerted) < len(clusters))
	}
	if !partly {
		t.Errorf("%s: no test alerts one cluster and not another", f)
	}
}

// checkClusters checks what the mixin (mixin/README.md) promises of every
// rule: its selectors of scraped series keep to job="vigil", and none of
// its aggregations drops the cluster label.
func checkClusters(t *testing.T, where, expr string) {
	t.Helper()
	e, err := parsePromQL(expr)
	if err != nil {
		t.Errorf("%s: %v", where, err)
		return
	}
	promparser.Inspect(e, func(n promparser.Node, _ []promparser.Node) error {
		switch n := n.(type) {
		case *promparser.VectorSelector:
			// Recorded series (vigil:…) are grouped by cluster already and
			// no longer carry the job label.
			if !strings.Contains(n.Name, ":") && !hasMatcher(n, "job", vigilJob) {
				t.Errorf("%s: %s does not select job=%q", where, n, vigilJob)
			}
		case *promparser.AggregateExpr:
			if slices.Contains(n.Grouping, clusterLabel) == n.Without {
				t.Errorf("%s: %s drops the %s label", where, n.ShortString(), clusterLabel)
			}
		}
		return nil
	})
}

func hasMatcher(vs *promparser.VectorSelector, name, value string) bool {
	for _, m := range vs.LabelMatchers {
		if m.Name == name && m.Type == labels.MatchEqual && m.Value == value {
			return true
		}
	}
	return false
}

// TestPromtool runs promtool's own checks and the rule unit tests.
func TestPromtool(t *testing.T) {
	promtool, err := exec.LookPath("promtool")
	if err != nil {
		t.Skip("promtool not on PATH: run deploy/check.sh, which installs it (Debian package prometheus), to check and unit-test the rules")
	}
	test := []string{"test", "rules"}
	for _, f := range rulesTestFiles {
		test = append(test, filepath.Base(f))
	}
	for _, args := range [][]string{
		{"check", "rules", filepath.Base(rulesFile)},
		test,
		{"check", "config", filepath.Base(promConfig)},
	} {
		cmd := exec.Command(promtool, args...)
		cmd.Dir = filepath.Dir(rulesFile)
		out, err := cmd.CombinedOutput()
		if err != nil {
			t.Errorf("promtool %s: %v\n%s", strings.Join(args, " "), err, out)
		} else {
			t.Logf("promtool %s: ok", strings.Join(args, " "))
		}
	}
}

// promScrapeConfig is the part of prometheus.yml the tests read.
type promScrapeConfig struct {
	RuleFiles     []string `json:"rule_files"`
	ScrapeConfigs []struct {
		JobName       string `json:"job_name"`
		StaticConfigs []struct {
			Targets []string          `json:"targets"`
			Labels  map[string]string `json:"labels"`
		} `json:"static_configs"`
	} `json:"scrape_configs"`
}

func loadPromConfig(t *testing.T) promScrapeConfig {
	t.Helper()
	var c promScrapeConfig
	if err := yaml.Unmarshal(readFile(t, promConfig), &c); err != nil {
		t.Fatalf("%s: %v", promConfig, err)
	}
	return c
}

func TestPrometheusConfig(t *testing.T) {
	c := loadPromConfig(t)
	if !slices.Contains(c.RuleFiles, filepath.Base(rulesFile)) {
		t.Errorf("%s: rule_files %v does not load %s", promConfig, c.RuleFiles, filepath.Base(rulesFile))
	}
	jobs := map[string]bool{}
	for _, sc := range c.ScrapeConfigs {
		jobs[sc.JobName] = true
	}
	if !jobs["vigil"] {
		t.Errorf(`%s: no job "vigil": the rules expect up{job="vigil"}`, promConfig)
	}
}

// TestRunbook: docs/runbook.md has a section for every alert and none for an
// alert that does not exist, and its links to sections resolve.
func TestRunbook(t *testing.T) {
	anchors := markdownAnchors(t, runbookFile)
	alerts := map[string]bool{}
	for _, r := range alertRules(loadRules(t)) {
		alerts[r.Alert] = true
		if !anchors[strings.ToLower(r.Alert)] {
			t.Errorf("%s: no section for %s", runbookFile, r.Alert)
		}
	}
	text := string(readFile(t, runbookFile))
	for _, m := range regexp.MustCompile(`(?m)^## (Vigil\w+)\s*$`).FindAllStringSubmatch(text, -1) {
		if !alerts[m[1]] {
			t.Errorf("%s: section %s names no alert of %s", runbookFile, m[1], rulesFile)
		}
	}
	for _, m := range regexp.MustCompile(`\]\(#([^)]+)\)`).FindAllStringSubmatch(text, -1) {
		if !anchors[m[1]] {
			t.Errorf("%s: link to #%s, which is no section", runbookFile, m[1])
		}
	}
	// Every line of a promql block is a query that selects real series.
	records := recordNames(loadRules(t))
	for _, m := range regexp.MustCompile("(?s)```promql\n(.*?)```").FindAllStringSubmatch(text, -1) {
		for _, q := range strings.Split(strings.TrimSpace(m[1]), "\n") {
			if q = strings.TrimSpace(q); q != "" && !strings.HasPrefix(q, "#") {
				checkPromQL(t, runbookFile, q, records)
			}
		}
	}
}
