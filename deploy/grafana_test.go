package deploy

import (
	"encoding/json"
	"fmt"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/prometheus/model/labels"
	promparser "github.com/prometheus/prometheus/promql/parser"
)

const (
	dashboardFile   = "grafana/dashboards/vigil.json"
	datasourcesFile = "grafana/provisioning/datasources/prometheus.yml"
	providersFile   = "grafana/provisioning/dashboards/vigil.yml"
	grafanaAlerts   = "grafana/provisioning/alerting/vigil-alerts.yml"
)

type dashboard struct {
	UID           string                       `json:"uid"`
	Title         string                       `json:"title"`
	SchemaVersion int                          `json:"schemaVersion"`
	Templating    struct{ List []templateVar } `json:"templating"`
	Panels        []panel                      `json:"panels"`
}

type templateVar struct {
	Name       string `json:"name"`
	Type       string `json:"type"`
	Query      any    `json:"query"`
	IncludeAll bool   `json:"includeAll"`
	AllValue   string `json:"allValue"`
	Multi      bool   `json:"multi"`
}

type panel struct {
	ID         int                      `json:"id"`
	Type       string                   `json:"type"`
	Title      string                   `json:"title"`
	Datasource *datasource              `json:"datasource"`
	GridPos    struct{ H, W, X, Y int } `json:"gridPos"`
	Targets    []struct {
		RefID      string      `json:"refId"`
		Expr       string      `json:"expr"`
		Datasource *datasource `json:"datasource"`
	} `json:"targets"`
	Panels []panel `json:"panels"` // a collapsed row's
}

type datasource struct {
	Type string `json:"type"`
	UID  string `json:"uid"`
}

// grafanaVarRE matches Grafana's template variables in a query.
var grafanaVarRE = regexp.MustCompile(`\$\{?(\w+)(?::\w+)?\}?`)

// expandGrafanaVars makes a dashboard query plain PromQL: interval variables
// become a duration, any other variable (they stand inside label matchers)
// a regular expression.
func expandGrafanaVars(expr string) string {
	return grafanaVarRE.ReplaceAllStringFunc(expr, func(v string) string {
		name := grafanaVarRE.FindStringSubmatch(v)[1]
		switch name {
		case "__rate_interval", "__interval", "__range":
			return "5m"
		case "__range_s", "__interval_ms":
			return "300"
		}
		return ".*"
	})
}

func loadDashboard(t *testing.T) dashboard {
	t.Helper()
	raw := readFile(t, dashboardFile)
	var d dashboard
	dec := json.NewDecoder(strings.NewReader(string(raw)))
	if err := dec.Decode(&d); err != nil {
		t.Fatalf("%s: not valid JSON: %v", dashboardFile, err)
	}
	var generic map[string]any
	if err := json.Unmarshal(raw, &generic); err != nil {
		t.Fatalf("%s: %v", dashboardFile, err)
	}
	return d
}

func TestGrafanaDashboard(t *testing.T) {
	d := loadDashboard(t)
	records := recordNames(loadRules(t))
	if d.UID != "vigil" {
		t.Errorf("uid %q, want vigil", d.UID)
	}
	if d.SchemaVersion < 36 || d.SchemaVersion > 41 {
		t.Errorf("schemaVersion %d, want about 39", d.SchemaVersion)
	}
	hasDS := false
	for _, v := range d.Templating.List {
		if v.Name == "datasource" && v.Type == "datasource" && v.Query == "prometheus" {
			hasDS = true
		}
	}
	if !hasDS {
		t.Errorf("no datasource variable {name: datasource, type: datasource, query: prometheus}")
	}
	checkClusterVariable(t, d)

	var all []panel
	for _, p := range d.Panels {
		all = append(all, p)
		all = append(all, p.Panels...)
	}
	ids := map[int]string{}
	used := map[string]bool{}
	type rect struct{ x0, y0, x1, y1 int }
	var placed []struct {
		r     rect
		title string
	}
	for _, p := range all {
		where := fmt.Sprintf("%s: panel %d %q", dashboardFile, p.ID, p.Title)
		if p.ID == 0 {
			t.Errorf("%s: no id", where)
		}
		if other, dup := ids[p.ID]; dup {
			t.Errorf("%s: id also used by %q", where, other)
		}
		ids[p.ID] = p.Title
		g := p.GridPos
		if g.W <= 0 || g.H <= 0 || g.X < 0 || g.X+g.W > 24 {
			t.Errorf("%s: gridPos %+v outside the 24-column grid", where, g)
		}
		r := rect{g.X, g.Y, g.X + g.W, g.Y + g.H}
		for _, q := range placed {
			if r.x0 < q.r.x1 && q.r.x0 < r.x1 && r.y0 < q.r.y1 && q.r.y0 < r.y1 {
				t.Errorf("%s: overlaps panel %q", where, q.title)
			}
		}
		placed = append(placed, struct {
			r     rect
			title string
		}{r, p.Title})
		if p.Type == "row" {
			continue
		}
		if p.Datasource == nil || p.Datasource.UID != "${datasource}" {
			t.Errorf("%s: datasource %+v, want uid ${datasource}", where, p.Datasource)
		}
		if len(p.Targets) == 0 {
			t.Errorf("%s: no queries", where)
		}
		refs := map[string]bool{}
		for _, tg := range p.Targets {
			if refs[tg.RefID] {
				t.Errorf("%s: refId %s twice", where, tg.RefID)
			}
			refs[tg.RefID] = true
			if tg.Datasource != nil && tg.Datasource.UID != "${datasource}" {
				t.Errorf("%s: query %s datasource %+v, want ${datasource}", where, tg.RefID, tg.Datasource)
			}
			qwhere := where + " query " + tg.RefID
			expr := withoutClusterPick(t, qwhere, tg.Expr)
			checkClusters(t, qwhere, expr)
			for _, name := range checkPromQL(t, qwhere, expr, records) {
				used[name] = true
			}
		}
	}
	// The whole file, descriptions included, names only real metrics.
	checkVigilNamesInText(t, dashboardFile, string(readFile(t, dashboardFile)))

	// Every vigil metric is on the dashboard somewhere.
	for name, info := range vigilMetrics {
		ok := used[name]
		if info.kind == histogram {
			ok = used[name+"_bucket"] || used[name+"_count"]
		}
		if !ok {
			t.Errorf("%s: no panel shows %s", dashboardFile, name)
		}
	}
}

// picked stands for "$cluster" in a query while it is parsed: the values of
// the cluster label that the dashboard's $cluster variable picks.
const picked = "__picked_clusters__"

// withoutClusterPick checks that every selector of a dashboard query keeps
// to the clusters picked in $cluster, and returns the query as plain PromQL
// without that matcher (checkPromQL knows vigil's own labels and the target
// labels; the cluster label is the config's, mixin/config.json).
func withoutClusterPick(t *testing.T, where, expr string) string {
	t.Helper()
	text := strings.ReplaceAll(expr, `"$`+clusterVariable+`"`, strconv.Quote(picked))
	e, err := parsePromQL(expandGrafanaVars(text))
	if err != nil {
		t.Errorf("%s: PromQL %q does not parse: %v", where, expr, err)
		return expandGrafanaVars(expr)
	}
	promparser.Inspect(e, func(n promparser.Node, _ []promparser.Node) error {
		vs, ok := n.(*promparser.VectorSelector)
		if !ok {
			return nil
		}
		i := slices.IndexFunc(vs.LabelMatchers, func(m *labels.Matcher) bool {
			return m.Name == clusterLabel && m.Type == labels.MatchRegexp && m.Value == picked
		})
		if i < 0 {
			t.Errorf("%s: %s does not keep to %s=~\"$%s\"", where, vs, clusterLabel, clusterVariable)
			return nil
		}
		vs.LabelMatchers = slices.Delete(vs.LabelMatchers, i, i+1)
		return nil
	})
	return e.String()
}

// clusterVariable is the dashboard variable that picks the clusters shown.
const clusterVariable = "cluster"

// checkClusterVariable: $cluster offers the values of the cluster label of
// vigil's targets, all of them at first, and .* for all matches targets
// without the label too (one cluster per Prometheus).
func checkClusterVariable(t *testing.T, d dashboard) {
	t.Helper()
	for _, v := range d.Templating.List {
		if v.Name != clusterVariable {
			continue
		}
		q, _ := v.Query.(map[string]any)
		want := fmt.Sprintf(`label_values(up{job=%q}, %s)`, vigilJob, clusterLabel)
		if v.Type != "query" || q["query"] != want || !v.IncludeAll || v.AllValue != ".*" || !v.Multi {
			t.Errorf("%s: variable $%s: %+v, want a multi-value query variable %s including all as .*", dashboardFile, clusterVariable, v, want)
		}
		return
	}
	t.Errorf("%s: no variable $%s", dashboardFile, clusterVariable)
}

// grafanaProvisionedDatasource returns the uid of the provisioned Prometheus.
func grafanaProvisionedDatasource(t *testing.T) string {
	t.Helper()
	var f struct {
		APIVersion  int `json:"apiVersion"`
		Datasources []struct {
			Name      string            `json:"name"`
			UID       string            `json:"uid"`
			Type      string            `json:"type"`
			Access    string            `json:"access"`
			URL       string            `json:"url"`
			IsDefault bool              `json:"isDefault"`
			Editable  bool              `json:"editable"`
			JSONData  map[string]string `json:"jsonData"`
		} `json:"datasources"`
	}
	if err := unmarshalStrict(readFile(t, datasourcesFile), &f); err != nil {
		t.Fatalf("%s: %v", datasourcesFile, err)
	}
	if f.APIVersion != 1 || len(f.Datasources) != 1 {
		t.Fatalf("%s: want apiVersion 1 and one data source", datasourcesFile)
	}
	ds := f.Datasources[0]
	if ds.Type != "prometheus" || ds.UID == "" || ds.URL == "" || !ds.IsDefault {
		t.Errorf("%s: %+v: want a default prometheus data source with a uid and url", datasourcesFile, ds)
	}
	return ds.UID
}

func TestGrafanaProvisioning(t *testing.T) {
	grafanaProvisionedDatasource(t)
	var p struct {
		APIVersion int `json:"apiVersion"`
		Providers  []struct {
			Name                  string `json:"name"`
			OrgID                 int    `json:"orgId"`
			Type                  string `json:"type"`
			Folder                string `json:"folder"`
			FolderUID             string `json:"folderUid"`
			DisableDeletion       bool   `json:"disableDeletion"`
			AllowUIUpdates        bool   `json:"allowUiUpdates"`
			UpdateIntervalSeconds int    `json:"updateIntervalSeconds"`
			Options               struct {
				Path                      string `json:"path"`
				FoldersFromFilesStructure bool   `json:"foldersFromFilesStructure"`
			} `json:"options"`
		} `json:"providers"`
	}
	if err := unmarshalStrict(readFile(t, providersFile), &p); err != nil {
		t.Fatalf("%s: %v", providersFile, err)
	}
	if p.APIVersion != 1 || len(p.Providers) == 0 || p.Providers[0].Type != "file" || p.Providers[0].Options.Path == "" {
		t.Errorf("%s: want apiVersion 1 and a file provider with a path: %+v", providersFile, p)
	}
}

// Grafana alert file provisioning, apiVersion 1.
type grafanaAlertFile struct {
	APIVersion int `json:"apiVersion"`
	Groups     []struct {
		OrgID    int           `json:"orgId"`
		Name     string        `json:"name"`
		Folder   string        `json:"folder"`
		Interval string        `json:"interval"`
		Rules    []grafanaRule `json:"rules"`
	} `json:"groups"`
}

type grafanaRule struct {
	UID          string            `json:"uid"`
	Title        string            `json:"title"`
	Condition    string            `json:"condition"`
	Data         []grafanaQuery    `json:"data"`
	For          string            `json:"for"`
	NoDataState  string            `json:"noDataState"`
	ExecErrState string            `json:"execErrState"`
	IsPaused     bool              `json:"isPaused"`
	Labels       map[string]string `json:"labels"`
	Annotations  map[string]string `json:"annotations"`
}

type grafanaQuery struct {
	RefID             string `json:"refId"`
	DatasourceUID     string `json:"datasourceUid"`
	RelativeTimeRange *struct {
		From int `json:"from"`
		To   int `json:"to"`
	} `json:"relativeTimeRange"`
	Model struct {
		RefID         string      `json:"refId"`
		Datasource    *datasource `json:"datasource"`
		Expr          string      `json:"expr"`
		Instant       bool        `json:"instant"`
		Range         bool        `json:"range"`
		IntervalMs    int         `json:"intervalMs"`
		MaxDataPoints int         `json:"maxDataPoints"`
		Type          string      `json:"type"`
		Expression    string      `json:"expression"`
		Reducer       string      `json:"reducer"`
		Conditions    []struct {
			Evaluator struct {
				Type   string    `json:"type"`
				Params []float64 `json:"params"`
			} `json:"evaluator"`
		} `json:"conditions"`
	} `json:"model"`
}

var (
	grafanaUIDRE = regexp.MustCompile(`^[a-zA-Z0-9_-]{1,40}$`)
	mathRefRE    = regexp.MustCompile(`\$\{?([A-Za-z0-9_]+)\}?`)
)

// loadGrafanaAlerts decodes the provisioning file strictly: a misspelt field
// is an error, not a silently ignored setting.
func loadGrafanaAlerts(t *testing.T) grafanaAlertFile {
	t.Helper()
	var f grafanaAlertFile
	if err := unmarshalStrict(readFile(t, grafanaAlerts), &f); err != nil {
		t.Fatalf("%s: %v", grafanaAlerts, err)
	}
	return f
}

func TestGrafanaAlerting(t *testing.T) {
	f := loadGrafanaAlerts(t)
	dsUID := grafanaProvisionedDatasource(t)
	records := recordNames(loadRules(t))
	if f.APIVersion != 1 || len(f.Groups) == 0 {
		t.Fatalf("%s: want apiVersion 1 and at least one group", grafanaAlerts)
	}
	uids := map[string]bool{}
	for _, g := range f.Groups {
		if g.OrgID < 1 || g.Name == "" || g.Folder == "" {
			t.Errorf("%s: group %q needs orgId, name and folder", grafanaAlerts, g.Name)
		}
		iv, err := time.ParseDuration(g.Interval)
		if err != nil || iv <= 0 || iv%(10*time.Second) != 0 {
			t.Errorf("%s: group %q interval %q must be a positive multiple of 10s", grafanaAlerts, g.Name, g.Interval)
		}
		for _, r := range g.Rules {
			where := grafanaAlerts + ": " + r.Title
			if !grafanaUIDRE.MatchString(r.UID) || uids[r.UID] {
				t.Errorf("%s: uid %q must be unique, at most 40 of [a-zA-Z0-9_-]", where, r.UID)
			}
			uids[r.UID] = true
			if d, err := time.ParseDuration(r.For); err != nil || d < 0 {
				t.Errorf("%s: for %q is not a duration", where, r.For)
			}
			if !slices.Contains([]string{"NoData", "Alerting", "OK"}, r.NoDataState) {
				t.Errorf("%s: noDataState %q", where, r.NoDataState)
			}
			if !slices.Contains([]string{"Error", "Alerting", "OK"}, r.ExecErrState) {
				t.Errorf("%s: execErrState %q", where, r.ExecErrState)
			}
			refs := map[string]grafanaQuery{}
			for _, q := range r.Data {
				if _, dup := refs[q.RefID]; dup || q.RefID == "" || q.Model.RefID != q.RefID {
					t.Errorf("%s: refId %q missing, repeated or different in its model", where, q.RefID)
				}
				refs[q.RefID] = q
			}
			if _, ok := refs[r.Condition]; !ok {
				t.Errorf("%s: condition %q is no refId of its data", where, r.Condition)
			}
			for _, q := range r.Data {
				qwhere := where + " refId " + q.RefID
				if q.Model.Datasource != nil && q.Model.Datasource.UID != q.DatasourceUID {
					t.Errorf("%s: model datasource uid %q differs from datasourceUid %q", qwhere, q.Model.Datasource.UID, q.DatasourceUID)
				}
				switch q.DatasourceUID {
				case "__expr__":
					var deps []string
					switch q.Model.Type {
					case "reduce":
						deps = []string{q.Model.Expression}
						if q.Model.Reducer == "" {
							t.Errorf("%s: reduce without reducer", qwhere)
						}
					case "threshold":
						deps = []string{q.Model.Expression}
						if len(q.Model.Conditions) != 1 || !slices.Contains([]string{"gt", "lt", "within_range", "outside_range"}, q.Model.Conditions[0].Evaluator.Type) {
							t.Errorf("%s: threshold needs one condition with an evaluator", qwhere)
						}
					case "math":
						for _, m := range mathRefRE.FindAllStringSubmatch(q.Model.Expression, -1) {
							deps = append(deps, m[1])
						}
					default:
						t.Errorf("%s: expression type %q", qwhere, q.Model.Type)
					}
					for _, dep := range deps {
						if _, ok := refs[dep]; !ok || dep == q.RefID {
							t.Errorf("%s: refers to %q, which is no other refId", qwhere, dep)
						}
					}
				case dsUID:
					if q.RelativeTimeRange == nil || q.RelativeTimeRange.From <= q.RelativeTimeRange.To {
						t.Errorf("%s: needs a relativeTimeRange", qwhere)
					}
					if !q.Model.Instant {
						t.Errorf("%s: alert queries should be instant", qwhere)
					}
					checkPromQL(t, qwhere, q.Model.Expr, records)
					checkClusters(t, qwhere, q.Model.Expr)
				default:
					t.Errorf("%s: datasourceUid %q is neither __expr__ nor the provisioned %q", qwhere, q.DatasourceUID, dsUID)
				}
			}
			for k, v := range r.Annotations {
				checkVigilNamesInText(t, where+" annotation "+k, v)
			}
		}
	}
}

// stripParens removes redundant outer parentheses.
func stripParens(e promparser.Expr) promparser.Expr {
	for {
		p, ok := e.(*promparser.ParenExpr)
		if !ok {
			return e
		}
		e = p.Expr
	}
}

// TestGrafanaAlertsMirrorPrometheus: Grafana alerts on exactly the Prometheus
// alerts' conditions. For an alert `<value> > N` (or <) the Grafana rule must
// query <value> (A), reduce it (B) and threshold it with gt N (C); an alert of
// another shape must at least use the same metrics. Names, `for`, severity and
// runbook_url are the same.
func TestGrafanaAlertsMirrorPrometheus(t *testing.T) {
	byTitle := map[string]grafanaRule{}
	for _, g := range loadGrafanaAlerts(t).Groups {
		for _, r := range g.Rules {
			byTitle[r.Title] = r
		}
	}
	prom := alertRules(loadRules(t))
	if len(byTitle) != len(prom) {
		t.Errorf("%s has %d rules, %s has %d alerts", grafanaAlerts, len(byTitle), rulesFile, len(prom))
	}
	for _, p := range prom {
		g, ok := byTitle[p.Alert]
		if !ok {
			t.Errorf("%s: no rule titled %s", grafanaAlerts, p.Alert)
			continue
		}
		where := grafanaAlerts + ": " + p.Alert
		gFor, err := time.ParseDuration(g.For)
		if err != nil || gFor != time.Duration(p.For) {
			t.Errorf("%s: for %q, Prometheus has %s", where, g.For, p.For)
		}
		if g.Labels["severity"] != p.Labels["severity"] {
			t.Errorf("%s: severity %q, Prometheus has %q", where, g.Labels["severity"], p.Labels["severity"])
		}
		if g.Annotations["runbook_url"] != p.Annotations["runbook_url"] {
			t.Errorf("%s: runbook_url %q differs from Prometheus's %q", where, g.Annotations["runbook_url"], p.Annotations["runbook_url"])
		}
		if g.Annotations["summary"] == "" || g.Annotations["description"] == "" {
			t.Errorf("%s: needs summary and description", where)
		}

		pe, err := parsePromQL(p.Expr)
		if err != nil {
			t.Fatal(err)
		}
		if lhs, op, n, ok := comparison(pe); ok {
			if len(g.Data) != 3 || g.Condition != "C" {
				t.Errorf("%s: want data A (query), B (reduce A), C (threshold B) and condition C", where)
				continue
			}
			a, b, c := g.Data[0], g.Data[1], g.Data[2]
			ae, err := parsePromQL(a.Model.Expr)
			if err != nil {
				t.Errorf("%s: %v", where, err)
				continue
			}
			if got, want := stripParens(ae).String(), stripParens(lhs).String(); got != want {
				t.Errorf("%s: query A is\n  %s\nPrometheus compares\n  %s", where, got, want)
			}
			if b.Model.Type != "reduce" || b.Model.Expression != "A" || c.Model.Type != "threshold" || c.Model.Expression != "B" {
				t.Errorf("%s: want B = reduce(A), C = threshold(B)", where)
				continue
			}
			ev := c.Model.Conditions[0].Evaluator
			wantType := map[string]string{">": "gt", "<": "lt"}[op]
			if ev.Type != wantType || len(ev.Params) != 1 || ev.Params[0] != n {
				t.Errorf("%s: threshold %s %v, Prometheus has %s %v", where, ev.Type, ev.Params, op, n)
			}
			continue
		}
		// Another shape: the same metrics at least.
		want := metricSet(t, p.Expr)
		got := map[string]bool{}
		for _, q := range g.Data {
			if q.Model.Expr != "" {
				for m := range metricSet(t, q.Model.Expr) {
					got[m] = true
				}
			}
		}
		if fmt.Sprint(sortedKeys(got)) != fmt.Sprint(sortedKeys(want)) {
			t.Errorf("%s: queries use %v, Prometheus uses %v", where, sortedKeys(got), sortedKeys(want))
		}
	}
}

// comparison splits `lhs > n` / `lhs < n` (no bool modifier).
func comparison(e promparser.Expr) (lhs promparser.Expr, op string, n float64, ok bool) {
	be, isBin := stripParens(e).(*promparser.BinaryExpr)
	if !isBin || be.ReturnBool {
		return nil, "", 0, false
	}
	op = be.Op.String()
	if op != ">" && op != "<" {
		return nil, "", 0, false
	}
	num, isNum := stripParens(be.RHS).(*promparser.NumberLiteral)
	if !isNum {
		return nil, "", 0, false
	}
	return be.LHS, op, num.Val, true
}

func metricSet(t *testing.T, expr string) map[string]bool {
	t.Helper()
	e, err := parsePromQL(expr)
	if err != nil {
		t.Fatalf("%q: %v", expr, err)
	}
	m := map[string]bool{}
	promparser.Inspect(e, func(n promparser.Node, _ []promparser.Node) error {
		if vs, ok := n.(*promparser.VectorSelector); ok {
			m[vs.Name] = true
		}
		return nil
	})
	return m
}

func sortedKeys(m map[string]bool) []string {
	var s []string
	for k := range m {
		s = append(s, k)
	}
	slices.Sort(s)
	return s
}
