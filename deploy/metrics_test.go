// Package deploy holds no code: its tests validate the deployment files beside
// them (Prometheus rules, Grafana dashboard and alerting, docker-compose,
// Kubernetes manifests) against vigil's real metrics and flags.
package deploy

import (
	"fmt"
	"go/ast"
	"go/parser"
	"go/token"
	"io/fs"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"sort"
	"strconv"
	"strings"
	"testing"

	promparser "github.com/prometheus/prometheus/promql/parser"
)

// repoRoot is the vigil repository that deploy/ lives in.
const repoRoot = ".."

type metricKind string

const (
	gauge     metricKind = "gauge"
	counter   metricKind = "counter"
	histogram metricKind = "histogram"
)

type metricInfo struct {
	kind   metricKind
	labels []string
	// values lists the label values a matcher may name exactly, for labels
	// with a closed vocabulary.
	values map[string][]string
}

// vigilMetrics is what vigil exports (SPEC §5; election, monitor and agentpool
// register them). Every vigil_* name in deploy/ must be one of these.
var vigilMetrics = map[string]metricInfo{
	"vigil_shard_last_reconcile_success_timestamp_seconds": {kind: gauge, labels: []string{"shard"}},
	"vigil_shard_last_pass_timestamp_seconds":              {kind: gauge, labels: []string{"shard"}},
	"vigil_shard_blind_hosts":                              {kind: gauge, labels: []string{"shard"}},
	"vigil_shard_hosts":                                    {kind: gauge, labels: []string{"shard"}},
	"vigil_bad_rows_total":                                 {kind: counter, labels: []string{"kind"}},
	"vigil_db_statements_total":                            {kind: counter},
	"vigil_db_write_transactions_total":                    {kind: counter, labels: []string{"result"}},
	"vigil_fence_database_changes_total":                   {kind: counter},
	"vigil_cluster_shards":                                 {kind: gauge},
	"vigil_agent_bad_addresses_total":                      {kind: counter, labels: []string{"reason"}, values: map[string][]string{"reason": {"empty", "too_long", "bad_scheme", "userinfo", "query", "path", "no_port", "bad_port", "bad_host"}}},
	"vigil_build_info":                                     {kind: gauge, labels: []string{"version", "revision", "goversion"}},
	"vigil_shards_owned":                                   {kind: gauge},
	"vigil_leader":                                         {kind: gauge},
	"vigil_shard_acquisitions_total":                       {kind: counter},
	"vigil_shard_losses_total":                             {kind: counter, labels: []string{"reason"}},
	"vigil_etcd_anomalies_total":                           {kind: counter, labels: []string{"kind"}},
	"vigil_etcd_sessions_total":                            {kind: counter},
	"vigil_etcd_session_losses_total":                      {kind: counter},
	"vigil_assignments_written_total":                      {kind: counter},
	"vigil_reconciles_total":                               {kind: counter, labels: []string{"kind", "result"}, values: reconcileLabelValues},
	"vigil_reconcile_duration_seconds":                     {kind: histogram, labels: []string{"kind", "result"}, values: reconcileLabelValues},
	"vigil_sandbox_transitions_total":                      {kind: counter, labels: []string{"from", "to"}},
	"vigil_hosts_marked_unreachable_total":                 {kind: counter},
	"vigil_fence_rejections_total":                         {kind: counter},
	"vigil_agent_report_problems_total":                    {kind: counter, labels: []string{"kind"}},
	"vigil_zombies_destroyed_total":                        {kind: counter},
	"vigil_destroys_resent_total":                          {kind: counter},
	"vigil_events_pending":                                 {kind: gauge, labels: []string{"shard"}},
	"vigil_events_oldest_pending_age_seconds":              {kind: gauge, labels: []string{"shard"}},
	"vigil_events_published_total":                         {kind: counter, labels: []string{"event"}, values: eventLabelValues},
	"vigil_event_publish_errors_total":                     {kind: counter},
	"vigil_peers_watched":                                  {kind: gauge},
	"vigil_peers_connected":                                {kind: gauge},
	"vigil_peer_suspicions_total":                          {kind: counter},
	"vigil_peer_confirmations_total":                       {kind: counter},
	"vigil_peer_false_alarms_total":                        {kind: counter},
	"vigil_peer_unconfirmed_total":                         {kind: counter},
	"vigil_peer_revocations_total":                         {kind: counter, labels: []string{"result"}, values: map[string][]string{"result": {"revoked", "already_gone", "no_session", "rate_limited", "error"}}},
	"vigil_shadow_changes_total":                           {kind: counter, labels: []string{"from", "to"}},
	"vigil_volumes_table":                                  {kind: gauge},
	"vigil_agent_rpc_duration_seconds":                     {kind: histogram, labels: []string{"procedure", "code"}, values: rpcLabelValues},
	"vigil_agent_rpc_errors_total":                         {kind: counter, labels: []string{"procedure", "code"}, values: rpcLabelValues},
}

var (
	reconcileLabelValues = map[string][]string{
		"kind":   {"active", "passive"},
		"result": {"ok", "changed", "skipped", "agent_error", "fenced", "error"},
	}
	rpcLabelValues = map[string][]string{
		"procedure": {"ListSandboxes", "DestroySandbox"},
	}
	eventLabelValues = map[string][]string{
		"event": {"host.down", "capsule.pause", "capsule.destroy", "capsule.create", "capsule.resume"},
	}
)

// otherMetrics are the non-vigil series deploy/ may use: Prometheus's own up
// and the standard Go and process collectors every replica exposes.
var otherMetrics = map[string]metricInfo{
	"up":                            {kind: gauge},
	"go_goroutines":                 {kind: gauge},
	"go_threads":                    {kind: gauge},
	"go_memstats_heap_inuse_bytes":  {kind: gauge},
	"go_memstats_alloc_bytes":       {kind: gauge},
	"go_gc_duration_seconds":        {kind: gauge},
	"process_cpu_seconds_total":     {kind: counter},
	"process_resident_memory_bytes": {kind: gauge},
	"process_open_fds":              {kind: gauge},
	"process_max_fds":               {kind: gauge},
	"process_start_time_seconds":    {kind: gauge},
}

// targetLabels are attached by Prometheus to every scraped series.
var targetLabels = []string{"job", "instance", "replica"}

// lookupMetric resolves a series name to its metric, allowing the _bucket,
// _sum and _count series of histograms. It reports the series' own kind:
// _bucket/_sum/_count of a histogram are counters.
func lookupMetric(name string) (base string, info metricInfo, kind metricKind, ok bool) {
	for _, m := range []map[string]metricInfo{vigilMetrics, otherMetrics} {
		if info, ok := m[name]; ok {
			return name, info, info.kind, true
		}
		for _, suffix := range []string{"_bucket", "_sum", "_count"} {
			b, found := strings.CutSuffix(name, suffix)
			if !found {
				continue
			}
			if info, ok := m[b]; ok && info.kind == histogram {
				return b, info, counter, true
			}
		}
	}
	return "", metricInfo{}, "", false
}

var promqlParser = promparser.NewParser(promparser.Options{})

func parsePromQL(expr string) (promparser.Expr, error) {
	return promqlParser.ParseExpr(expr)
}

// checkPromQL parses expr and checks every series it selects: vigil_* and
// other names must be real metrics (histogram suffixes allowed), vigil:*
// names must be recording rules in records, label matchers must name labels
// the metric has (values from closed vocabularies), and rate/increase/irate
// apply to counters only. It returns the metric names selected.
func checkPromQL(t *testing.T, where, expr string, records map[string]bool) []string {
	t.Helper()
	e, err := parsePromQL(expr)
	if err != nil {
		t.Errorf("%s: PromQL %q does not parse: %v", where, expr, err)
		return nil
	}
	var names []string
	promparser.Inspect(e, func(node promparser.Node, _ []promparser.Node) error {
		switch n := node.(type) {
		case *promparser.VectorSelector:
			name := n.Name
			if name == "" {
				t.Errorf("%s: selector %s has no metric name", where, n)
				return nil
			}
			names = append(names, name)
			if strings.HasPrefix(name, "vigil:") {
				if !records[name] {
					t.Errorf("%s: %s is not a recording rule of prometheus/vigil-rules.yml", where, name)
				}
				return nil
			}
			_, info, _, ok := lookupMetric(name)
			if !ok {
				t.Errorf("%s: %q is not a metric vigil exports (expr %q)", where, name, expr)
				return nil
			}
			for _, m := range n.LabelMatchers {
				if m.Name == "__name__" {
					continue
				}
				isLe := m.Name == "le" && info.kind == histogram
				if !isLe && !slices.Contains(info.labels, m.Name) && !slices.Contains(targetLabels, m.Name) {
					t.Errorf("%s: %s has no label %q (has %v)", where, name, m.Name, info.labels)
				}
				if vals, closed := info.values[m.Name]; closed && m.Type.String() == "=" && !slices.Contains(vals, m.Value) {
					t.Errorf("%s: %s{%s=%q}: %q is not one of %v", where, name, m.Name, m.Value, m.Value, vals)
				}
			}
		case *promparser.Call:
			switch n.Func.Name {
			case "rate", "increase", "irate":
				for _, arg := range n.Args {
					ms, ok := arg.(*promparser.MatrixSelector)
					if !ok {
						continue
					}
					vs, ok := ms.VectorSelector.(*promparser.VectorSelector)
					if !ok {
						continue
					}
					if _, _, kind, ok := lookupMetric(vs.Name); ok && kind != counter {
						t.Errorf("%s: %s() over %s, a %s", where, n.Func.Name, vs.Name, kind)
					}
				}
			}
		}
		return nil
	})
	return names
}

// vigilNames extracts every vigil_* identifier from free text (annotations,
// descriptions), for the same check without a parser.
var vigilNameRE = regexp.MustCompile(`\bvigil_[a-zA-Z0-9_]*`)

func checkVigilNamesInText(t *testing.T, where, text string) {
	t.Helper()
	for _, name := range vigilNameRE.FindAllString(text, -1) {
		if _, _, _, ok := lookupMetric(name); !ok {
			t.Errorf("%s: mentions %q, which is not a metric vigil exports", where, name)
		}
	}
}

// TestMetricCatalogMatchesSource keeps vigilMetrics honest: every name in it
// must appear as a string literal in vigil's (non-test) Go source.
func TestMetricCatalogMatchesSource(t *testing.T) {
	found := map[string]bool{}
	err := filepath.WalkDir(repoRoot, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.IsDir() {
			switch d.Name() {
			case "deploy", ".git", "bin", "tools":
				if path != repoRoot {
					return filepath.SkipDir
				}
			}
			return nil
		}
		if !strings.HasSuffix(path, ".go") || strings.HasSuffix(path, "_test.go") {
			return nil
		}
		f, err := parser.ParseFile(token.NewFileSet(), path, nil, parser.SkipObjectResolution)
		if err != nil {
			return fmt.Errorf("parse %s: %w", path, err)
		}
		ast.Inspect(f, func(n ast.Node) bool {
			if lit, ok := n.(*ast.BasicLit); ok && lit.Kind == token.STRING {
				if s, err := strconv.Unquote(lit.Value); err == nil && strings.HasPrefix(s, "vigil_") {
					found[s] = true
				}
			}
			return true
		})
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	var missing []string
	for name := range vigilMetrics {
		if !found[name] {
			missing = append(missing, name)
		}
	}
	sort.Strings(missing)
	if len(missing) > 0 {
		t.Errorf("metrics listed in deploy/metrics_test.go but registered nowhere in vigil's source: %v", missing)
	}
}

func readFile(t *testing.T, path string) []byte {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return b
}
