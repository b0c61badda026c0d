package main

import (
	"bytes"
	"fmt"
	"maps"
	"reflect"
	"slices"
	"strconv"
	"strings"
	"text/template"
	"unicode"

	"github.com/prometheus/prometheus/model/rulefmt"
	"github.com/prometheus/prometheus/promql/parser"
	"go.yaml.in/yaml/v3"
)

// alertsSrc is deploy/mixin/grafana-alerts.yml: what only Grafana's rules
// say. Everything else comes from the Prometheus alert of the same name.
type alertsSrc struct {
	Folder     string `yaml:"folder"`
	Group      string `yaml:"group"`
	Interval   string `yaml:"interval"`
	Datasource string `yaml:"datasource"`
	Rules      []struct {
		Alert string `yaml:"alert"`
		// Queries, for an alert that is no single `query > threshold`: each
		// is reduced to its last value and Math combines the reductions.
		Queries     []string `yaml:"queries"`
		Math        string   `yaml:"math"`
		Summary     string   `yaml:"summary"`
		Description string   `yaml:"description"`
	} `yaml:"rules"`
}

// A grafanaRule is one rule of the rendered file.
type grafanaRule struct {
	UID, Title, Condition, For, Severity string
	Data                                 []grafanaData
	Summary, Description, RunbookURL     string
}

// grafanaData is one query or expression of a rule: a Prometheus query
// (Expr), the last value of another (Reduce), a Threshold on one, or Math.
type grafanaData struct {
	RefID, Expr, Reduce, Math string
	Threshold                 *threshold
}

type threshold struct {
	Of, Type, Param string
}

func (m *mixin) renderGrafanaAlerts(groups *rulefmt.RuleGroups) ([]byte, error) {
	raw, err := m.read(alertsSource)
	if err != nil {
		return nil, err
	}
	var src alertsSrc
	dec := yaml.NewDecoder(strings.NewReader(raw))
	dec.KnownFields(true)
	if err := dec.Decode(&src); err != nil {
		return nil, err
	}
	byName := map[string]int{}
	for i, r := range src.Rules {
		byName[r.Alert] = i
	}
	var rules []grafanaRule
	for _, g := range groups.Groups {
		for _, r := range g.Rules {
			if r.Alert == "" {
				continue
			}
			i, ok := byName[r.Alert]
			if !ok {
				return nil, fmt.Errorf("no rule for the Prometheus alert %s", r.Alert)
			}
			delete(byName, r.Alert)
			gr, err := m.grafanaRule(r, src.Rules[i].Queries, src.Rules[i].Math)
			if err != nil {
				return nil, fmt.Errorf("%s: %w", r.Alert, err)
			}
			gr.Summary, gr.Description = src.Rules[i].Summary, src.Rules[i].Description
			rules = append(rules, gr)
		}
	}
	if len(byName) > 0 {
		return nil, fmt.Errorf("rules for no Prometheus alert: %v", slices.Sorted(maps.Keys(byName)))
	}

	var b bytes.Buffer
	b.WriteString(m.header(alertsSource))
	b.WriteString(leadingComments(raw))
	if err := alertsTmpl.Execute(&b, map[string]any{"Src": src, "Rules": rules}); err != nil {
		return nil, err
	}
	if err := checkGrafanaAlerts(b.Bytes(), rules); err != nil {
		return nil, err
	}
	return b.Bytes(), nil
}

// grafanaRule mirrors the Prometheus alert r: given no queries, it queries
// what r compares (A), reduces it (B) and compares that with r's threshold
// (C).
func (m *mixin) grafanaRule(r rulefmt.Rule, queries []string, math string) (grafanaRule, error) {
	g := grafanaRule{
		UID:        uid(r.Alert),
		Title:      r.Alert,
		For:        r.For.String(),
		Severity:   r.Labels["severity"],
		RunbookURL: r.Annotations["runbook_url"],
	}
	if len(queries) == 0 {
		lhs, typ, n, err := thresholdOf(r.Expr)
		if err != nil {
			return g, err
		}
		g.Data = []grafanaData{
			{RefID: "A", Expr: lhs},
			{RefID: "B", Reduce: "A"},
			{RefID: "C", Threshold: &threshold{Of: "B", Type: typ, Param: n}},
		}
		g.Condition = "C"
		return g, nil
	}
	if math == "" {
		return g, fmt.Errorf("queries without math")
	}
	for i, q := range queries {
		text, err := m.rules.rewrite(q)
		if err != nil {
			return g, err
		}
		expr, err := promql.ParseExpr(text)
		if err != nil {
			return g, err
		}
		g.Data = append(g.Data, grafanaData{RefID: refID(i), Expr: expr.String()})
	}
	for i := range queries {
		g.Data = append(g.Data, grafanaData{RefID: refID(len(queries) + i), Reduce: refID(i)})
	}
	g.Condition = refID(2 * len(queries))
	g.Data = append(g.Data, grafanaData{RefID: g.Condition, Math: math})
	return g, nil
}

// thresholdOf splits `query > n` (or <) into the query, Grafana's name of
// the comparison and n. Grafana's queries are printed by PromQL's printer,
// on one line each, whatever the layout of the rule they mirror.
func thresholdOf(expr string) (query, typ, n string, err error) {
	e, err := promql.ParseExpr(expr)
	if err != nil {
		return "", "", "", err
	}
	b, ok := e.(*parser.BinaryExpr)
	if !ok || b.ReturnBool {
		return "", "", "", fmt.Errorf("%q is no `query > threshold`: give the Grafana rule its queries and math", expr)
	}
	num, ok := b.RHS.(*parser.NumberLiteral)
	typ = map[parser.ItemType]string{parser.GTR: "gt", parser.LSS: "lt"}[b.Op]
	if !ok || typ == "" {
		return "", "", "", fmt.Errorf("%q is no `query > threshold`: give the Grafana rule its queries and math", expr)
	}
	lhs := b.LHS
	for {
		p, ok := lhs.(*parser.ParenExpr)
		if !ok {
			break
		}
		lhs = p.Expr
	}
	return lhs.String(), typ, strconv.FormatFloat(num.Val, 'f', -1, 64), nil
}

// uid makes Grafana's rule uid of an alert name: VigilNoLeader is
// vigil-no-leader.
func uid(alert string) string {
	var b strings.Builder
	for i, r := range alert {
		if unicode.IsUpper(r) {
			if i > 0 {
				b.WriteByte('-')
			}
			r = unicode.ToLower(r)
		}
		b.WriteRune(r)
	}
	return b.String()
}

func refID(i int) string { return string(rune('A' + i)) }

// leadingComments returns the comment block a source opens with, which the
// rendered file keeps.
func leadingComments(src string) string {
	var b strings.Builder
	for _, line := range strings.SplitAfter(src, "\n") {
		if !strings.HasPrefix(line, "#") {
			break
		}
		b.WriteString(line)
	}
	return b.String()
}

// checkGrafanaAlerts reads the rendered file back: its rules must say what
// they were rendered from, so the folding of long values lost nothing.
func checkGrafanaAlerts(out []byte, want []grafanaRule) error {
	var f struct {
		Groups []struct {
			Rules []struct {
				Title string `yaml:"title"`
				Data  []struct {
					Model struct {
						Expr       string `yaml:"expr"`
						Expression string `yaml:"expression"`
					} `yaml:"model"`
				} `yaml:"data"`
				Annotations map[string]string `yaml:"annotations"`
			} `yaml:"rules"`
		} `yaml:"groups"`
	}
	if err := yaml.Unmarshal(out, &f); err != nil {
		return fmt.Errorf("rendered file: %w", err)
	}
	if len(f.Groups) != 1 || len(f.Groups[0].Rules) != len(want) {
		return fmt.Errorf("rendered file: want one group of %d rules", len(want))
	}
	for i, r := range f.Groups[0].Rules {
		w := want[i]
		got := []string{r.Title, r.Annotations["summary"], r.Annotations["description"], r.Annotations["runbook_url"]}
		exp := []string{w.Title, w.Summary, w.Description, w.RunbookURL}
		for j, d := range r.Data {
			got = append(got, d.Model.Expr+d.Model.Expression)
			exp = append(exp, w.Data[j].Expr+w.Data[j].Reduce+w.Data[j].Math+w.Data[j].threshold())
		}
		if !reflect.DeepEqual(got, exp) {
			return fmt.Errorf("rendered file: rule %s reads\n  %q\nwant\n  %q", w.Title, got, exp)
		}
	}
	return nil
}

func (d grafanaData) threshold() string {
	if d.Threshold == nil {
		return ""
	}
	return d.Threshold.Of
}

// foldWidth is where long values are folded in the rendered YAML.
const foldWidth = 120

// field renders `key: value` for a key at column indent: inline when it
// fits, else as a folded block (`>-`) wrapped at spaces.
func field(indent int, key, value string) (string, error) {
	b, err := yaml.Marshal(value)
	if err != nil {
		return "", err
	}
	inline := strings.TrimSuffix(string(b), "\n")
	if strings.Contains(inline, "\n") {
		return "", fmt.Errorf("%s: %q has line breaks", key, value)
	}
	if indent+len(key)+2+len(inline) <= foldWidth || !foldable(value) {
		return key + ": " + inline, nil
	}
	pad := strings.Repeat(" ", indent+2)
	var lines []string
	line := ""
	for _, w := range strings.Split(value, " ") {
		if line != "" && len(pad)+len(line)+1+len(w) > foldWidth {
			lines = append(lines, line)
			line = ""
		}
		if line != "" {
			line += " "
		}
		line += w
	}
	lines = append(lines, line)
	return key + ": >-\n" + pad + strings.Join(lines, "\n"+pad), nil
}

// foldable says whether folding at spaces gives value back: single spaces
// only, none at either end, no line breaks or tabs.
func foldable(value string) bool {
	return value != "" && !strings.ContainsAny(value, "\n\t") && !strings.Contains(value, "  ") &&
		strings.TrimSpace(value) == value
}

var alertsTmpl = template.Must(template.New("alerts").Funcs(template.FuncMap{"field": field}).Parse(
	`apiVersion: 1
groups:
- orgId: 1
  {{field 2 "name" .Src.Group}}
  {{field 2 "folder" .Src.Folder}}
  {{field 2 "interval" .Src.Interval}}
  rules:
{{- range .Rules}}
  - {{field 4 "uid" .UID}}
    {{field 4 "title" .Title}}
    {{field 4 "condition" .Condition}}
    data:
{{- range .Data}}
    - {{field 6 "refId" .RefID}}
{{- if .Expr}}
      relativeTimeRange:
        from: 600
        to: 0
      {{field 6 "datasourceUid" $.Src.Datasource}}
      model:
        {{field 8 "refId" .RefID}}
        datasource:
          type: prometheus
          {{field 10 "uid" $.Src.Datasource}}
        {{field 8 "expr" .Expr}}
        instant: true
        range: false
        intervalMs: 1000
        maxDataPoints: 43200
{{- else}}
      datasourceUid: __expr__
      model:
        {{field 8 "refId" .RefID}}
        datasource:
          type: __expr__
          uid: __expr__
{{- if .Reduce}}
        type: reduce
        {{field 8 "expression" .Reduce}}
        reducer: last
{{- else if .Threshold}}
        type: threshold
        {{field 8 "expression" .Threshold.Of}}
        conditions:
        - evaluator:
            {{field 12 "type" .Threshold.Type}}
            params:
            - {{.Threshold.Param}}
{{- else}}
        type: math
        {{field 8 "expression" .Math}}
{{- end}}
{{- end}}
{{- end}}
    {{field 4 "for" .For}}
    noDataState: OK
    execErrState: Error
    isPaused: false
    labels:
      {{field 6 "severity" .Severity}}
    annotations:
      {{field 6 "summary" .Summary}}
      {{field 6 "description" .Description}}
      {{field 6 "runbook_url" .RunbookURL}}
{{- end}}
`))
