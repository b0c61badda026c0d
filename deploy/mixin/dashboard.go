package main

import (
	"encoding/json"
	"fmt"
	"regexp"
	"strings"
)

// clusterVar is the dashboard variable that picks clusters; every query
// matches the cluster label against it.
const clusterVar = "cluster"

// renderDashboard rewrites every query of the dashboard source (panels and
// variables), gives it the $cluster variable, and names each series'
// cluster in its legend.
func (m *mixin) renderDashboard() ([]byte, error) {
	raw, err := m.read(dashboardSource)
	if err != nil {
		return nil, err
	}
	v, err := decodeJSON([]byte(raw))
	if err != nil {
		return nil, err
	}
	d, ok := v.(*object)
	if !ok {
		return nil, fmt.Errorf("not a JSON object")
	}
	if err := m.templating(d); err != nil {
		return nil, err
	}
	for _, top := range d.list("panels") {
		for _, p := range append([]*object{top}, top.list("panels")...) { // a collapsed row holds its panels
			if err := m.panel(p); err != nil {
				return nil, fmt.Errorf("panel %q: %w", p.str("title"), err)
			}
		}
	}
	return encodeJSON(d)
}

func (m *mixin) panel(p *object) error {
	for _, t := range p.list("targets") {
		expr, err := m.panels.rewrite(t.str("expr"))
		if err != nil {
			return err
		}
		t.set("expr", expr)
		// Two clusters' series of one replica name would read alike.
		label := "{{" + m.cfg.ClusterLabel + "}}"
		if l := t.str("legendFormat"); l != "" && !strings.Contains(l, label) {
			t.set("legendFormat", label+" "+l)
		}
	}
	return nil
}

// templating adds the $cluster variable after the data source one and
// rewrites the selectors of the query variables ($instance).
func (m *mixin) templating(d *object) error {
	t, ok := d.get("templating").(*object)
	if !ok {
		return fmt.Errorf("no templating")
	}
	var list []any
	added := false
	for _, v := range t.list("list") {
		switch {
		case v.str("name") == clusterVar:
			return fmt.Errorf("variable $%s: the mixin adds it, the source may not have it", clusterVar)
		case v.str("type") == "query":
			if err := m.variable(v); err != nil {
				return fmt.Errorf("variable $%s: %w", v.str("name"), err)
			}
		}
		list = append(list, v)
		if v.str("type") == "datasource" {
			cv, err := m.clusterVariable()
			if err != nil {
				return err
			}
			list = append(list, cv)
			added = true
		}
	}
	if !added {
		return fmt.Errorf("no data source variable to put $%s after", clusterVar)
	}
	t.set("list", list)
	return nil
}

var labelValuesRE = regexp.MustCompile(`^label_values\((.+),\s*(\w+)\)$`)

// variable rewrites the selector of a label_values() query variable, which
// then offers only the values of the picked clusters.
func (m *mixin) variable(v *object) error {
	q, ok := v.get("query").(*object)
	if !ok {
		return fmt.Errorf("no query object")
	}
	def, err := m.labelValues(m.panels, v.str("definition"))
	if err != nil {
		return err
	}
	v.set("definition", def)
	q.set("query", def)
	return nil
}

func (m *mixin) labelValues(r *rewriter, query string) (string, error) {
	sm := labelValuesRE.FindStringSubmatch(query)
	if sm == nil {
		return "", fmt.Errorf("%q: want label_values(<selector>, <label>)", query)
	}
	sel, err := r.rewrite(sm[1])
	if err != nil {
		return "", err
	}
	return "label_values(" + sel + ", " + sm[2] + ")", nil
}

// clusterVariable offers the clusters whose vigil targets Prometheus
// scrapes, down ones too (up, not a vigil metric), all picked at first.
func (m *mixin) clusterVariable() (*object, error) {
	q, err := m.labelValues(m.rules, "label_values(up, "+m.cfg.ClusterLabel+")")
	if err != nil {
		return nil, err
	}
	return newObject(
		"name", clusterVar,
		"label", "Cluster",
		"description", "The vigil clusters to show: values of the "+m.cfg.ClusterLabel+" label of vigil's targets.",
		"type", "query",
		"datasource", newObject("type", "prometheus", "uid", "${datasource}"),
		"definition", q,
		"query", newObject("query", q, "refId", "PrometheusVariableQueryEditor-VariableQuery", "qryType", json.Number("1")),
		"current", newObject(),
		"hide", json.Number("0"),
		"includeAll", true,
		// .* also matches no label at all: a Prometheus that scrapes one
		// cluster needs no cluster label.
		"allValue", ".*",
		"multi", true,
		"options", []any{},
		"refresh", json.Number("2"),
		"regex", "",
		"skipUrlSync", false,
		"sort", json.Number("1"),
	), nil
}
