package main

import (
	"fmt"
	"regexp"
	"slices"
	"strconv"
	"strings"

	"github.com/prometheus/prometheus/model/labels"
	"github.com/prometheus/prometheus/promql/parser"
)

// A rewriter turns an expression written for one vigil cluster alone, with
// no selector (`sum(vigil_shards_owned)`), into one that picks vigil's series
// out of a shared Prometheus and keeps its clusters apart
// (`sum by (cluster) (vigil_shards_owned{job="vigil"})`):
//
//   - every selector of one of vigil's own series gets the config's matchers
//     (recorded series, named with a colon, are grouped by cluster already
//     and have lost the target labels the selector names);
//   - every aggregation keeps the cluster label (`by` gets it first, a
//     `without` must not name it);
//   - a binary operation matching `on (...)` labels matches on the cluster
//     too, and one side without the label (vector(0)) may only be a default
//     for when no cluster has data: `x or on () vector(0)`.
//
// The rewrite is done twice: on the parsed tree, which says what the result
// means, and as insertions into the source text, which keep the source's own
// layout in the committed files. Both must print the same expression.
type rewriter struct {
	cluster string            // the label that tells clusters apart
	metric  []*labels.Matcher // for selectors of vigil's own series
	every   []*labels.Matcher // for every selector, recorded series too
}

// An edit inserts text before the byte at pos of an expression.
type edit struct {
	pos  int
	text string
}

var promql = parser.NewParser(parser.Options{})

// rewrite returns src rewritten.
func (r *rewriter) rewrite(src string) (string, error) {
	edits, err := r.edits(src)
	if err != nil {
		return "", err
	}
	return applyEdits(src, edits), nil
}

// edits returns the insertions that rewrite src, sorted by position, after
// checking that they mean the same as the rewritten tree.
func (r *rewriter) edits(src string) ([]edit, error) {
	text := parsable(src)
	expr, err := promql.ParseExpr(text)
	if err != nil {
		return nil, fmt.Errorf("%q: %w", src, err)
	}
	var edits []edit
	var errs []error
	parser.Inspect(expr, func(n parser.Node, _ []parser.Node) error {
		e, err := r.node(n, text)
		if err != nil {
			errs = append(errs, err)
		}
		if e != nil {
			edits = append(edits, *e)
		}
		return nil
	})
	if len(errs) > 0 {
		return nil, fmt.Errorf("%q: %w", src, errs[0])
	}
	slices.SortStableFunc(edits, func(a, b edit) int { return a.pos - b.pos })
	got, err := promql.ParseExpr(applyEdits(text, edits))
	if err != nil {
		return nil, fmt.Errorf("%q: rewritten text does not parse: %w", src, err)
	}
	if got.String() != expr.String() {
		return nil, fmt.Errorf("%q: rewritten text\n  %s\ndiffers from the rewritten tree\n  %s", src, got, expr)
	}
	return edits, nil
}

// node rewrites one node of the tree in place and returns the matching
// insertion into text, if any.
func (r *rewriter) node(n parser.Node, text string) (*edit, error) {
	switch n := n.(type) {
	case *parser.VectorSelector:
		return r.selector(n, text)
	case *parser.AggregateExpr:
		return r.aggregation(n, text)
	case *parser.BinaryExpr:
		return r.binary(n, text)
	case *parser.Call:
		return nil, r.call(n)
	}
	return nil, nil
}

func (r *rewriter) selector(vs *parser.VectorSelector, text string) (*edit, error) {
	add := r.every
	if !strings.Contains(vs.Name, ":") {
		add = append(slices.Clip(r.metric), r.every...)
	}
	if len(add) == 0 {
		return nil, nil
	}
	start := int(vs.PosRange.Start)
	if vs.Name == "" || !strings.HasPrefix(text[start:], vs.Name) {
		return nil, fmt.Errorf("selector %s: write the metric name before the braces", vs)
	}
	for _, m := range add {
		for _, have := range vs.LabelMatchers {
			if have.Name == m.Name {
				return nil, fmt.Errorf("selector %s: %s is the config's to set", vs, m.Name)
			}
		}
	}
	vs.LabelMatchers = append(vs.LabelMatchers, add...)

	pos := start + len(vs.Name)
	rest := text[pos:]
	if after, ok := strings.CutPrefix(trimSpace(rest), "{"); ok {
		ins := matcherText(add)
		if !strings.HasPrefix(trimSpace(after), "}") {
			ins += ","
		}
		return &edit{pos + len(rest) - len(after), ins}, nil
	}
	return &edit{pos, "{" + matcherText(add) + "}"}, nil
}

func (r *rewriter) aggregation(a *parser.AggregateExpr, text string) (*edit, error) {
	if slices.Contains(a.Grouping, r.cluster) {
		if a.Without {
			return nil, fmt.Errorf("%s: drops the cluster label %s", a.ShortString(), r.cluster)
		}
		return nil, nil
	}
	if a.Without {
		return nil, nil // keeps every label it does not name, the cluster's too
	}
	e, err := r.groupingEdit(a, text)
	if err != nil {
		return nil, err
	}
	a.Grouping = append([]string{r.cluster}, a.Grouping...)
	return e, nil
}

// groupingEdit finds where the cluster label goes in an aggregation's text:
// first in its `by (…)`, or in a new one after the operator.
func (r *rewriter) groupingEdit(a *parser.AggregateExpr, text string) (*edit, error) {
	had := len(a.Grouping) > 0
	start, op := int(a.PosRange.Start), a.Op.String()
	if len(text) < start+len(op) || !strings.EqualFold(text[start:start+len(op)], op) {
		return nil, fmt.Errorf("%s: cannot find the operator in the text", a.ShortString())
	}
	pos := start + len(op)
	rest := trimSpace(text[pos:])
	if len(rest) >= 2 && strings.EqualFold(rest[:2], "by") {
		after := trimSpace(rest[2:])
		if !strings.HasPrefix(after, "(") {
			return nil, fmt.Errorf("%s: cannot find the grouping in the text", a.ShortString())
		}
		ins := r.cluster
		if had {
			ins += ", "
		}
		return &edit{len(text) - len(after) + 1, ins}, nil
	}
	if had {
		// `sum(x) by (shard)`: the grouping is after the arguments, where
		// finding it in the text takes a parser of its own.
		return nil, fmt.Errorf("%s: write the grouping before the arguments", a.ShortString())
	}
	ins := " by (" + r.cluster + ")"
	if len(rest) == len(text[pos:]) { // `max(x)`: no space before the arguments
		ins += " "
	}
	return &edit{pos, ins}, nil
}

var onRE = regexp.MustCompile(`(?i)\bon\s*\(`)

func (r *rewriter) binary(b *parser.BinaryExpr, text string) (*edit, error) {
	vm := b.VectorMatching
	if vm == nil {
		return nil, nil // a scalar on one side: nothing to match
	}
	lhs, rhs := carriesLabels(b.LHS), carriesLabels(b.RHS)
	if lhs != rhs {
		// `x or on () vector(0)`: the default stands for "no cluster has
		// data"; anything else would match nothing once x has a cluster label.
		if b.Op.IsSetOperator() && vm.On && len(vm.MatchingLabels) == 0 {
			return nil, nil
		}
		return nil, fmt.Errorf("%s %s: one side has no labels, the other the cluster's: write `or on () vector(…)` for a default when no cluster has data, or take a per-cluster default (`or 0 * max(…)`)", b.LHS, b.Op)
	}
	if !lhs {
		return nil, nil
	}
	if !vm.On {
		if slices.Contains(vm.MatchingLabels, r.cluster) {
			return nil, fmt.Errorf("%s %s: ignoring the cluster label %s mixes clusters", b.LHS, b.Op, r.cluster)
		}
		return nil, nil
	}
	if slices.Contains(vm.MatchingLabels, r.cluster) {
		return nil, nil
	}
	from, to := int(b.LHS.PositionRange().End), int(b.RHS.PositionRange().Start)
	loc := onRE.FindStringIndex(text[from:to])
	if loc == nil {
		return nil, fmt.Errorf("%s %s: cannot find on (…) in the text", b.LHS, b.Op)
	}
	ins := r.cluster
	if len(vm.MatchingLabels) > 0 {
		ins += ", "
	}
	vm.MatchingLabels = append([]string{r.cluster}, vm.MatchingLabels...)
	return &edit{from + loc[1], ins}, nil
}

// call refuses the functions whose result cannot keep clusters apart.
func (r *rewriter) call(c *parser.Call) error {
	switch c.Func.Name {
	case "absent", "absent_over_time":
		return fmt.Errorf("%s(): its result has no cluster label; compare a per-cluster count with 0 instead", c.Func.Name)
	case "scalar":
		if carriesLabels(c.Args[0]) {
			return fmt.Errorf("scalar(): is NaN as soon as a Prometheus sees two clusters")
		}
	case "label_replace", "label_join":
		if dst, ok := c.Args[1].(*parser.StringLiteral); ok && dst.Val == r.cluster {
			return fmt.Errorf("%s(): overwrites the cluster label %s", c.Func.Name, r.cluster)
		}
	}
	return nil
}

// carriesLabels says whether e's result has the labels of the series it
// selects (the cluster label among them), as opposed to none at all: a
// number, time(), vector(0).
func carriesLabels(e parser.Expr) bool {
	switch e := e.(type) {
	case *parser.VectorSelector, *parser.MatrixSelector:
		return true
	case *parser.ParenExpr:
		return carriesLabels(e.Expr)
	case *parser.UnaryExpr:
		return carriesLabels(e.Expr)
	case *parser.SubqueryExpr:
		return carriesLabels(e.Expr)
	case *parser.StepInvariantExpr:
		return carriesLabels(e.Expr)
	case *parser.AggregateExpr:
		return carriesLabels(e.Expr)
	case *parser.BinaryExpr:
		if e.Op == parser.LAND || e.Op == parser.LUNLESS {
			return carriesLabels(e.LHS)
		}
		return carriesLabels(e.LHS) || carriesLabels(e.RHS)
	case *parser.Call:
		if e.Type() == parser.ValueTypeScalar || e.Func.Name == "vector" {
			return false
		}
		return slices.ContainsFunc(e.Args, carriesLabels)
	}
	return false
}

// rangeVarRE matches a Grafana variable standing for a range,
// [$__rate_interval], which PromQL cannot parse.
var rangeVarRE = regexp.MustCompile(`\[\$\{?\w+\}?\]`)

// parsable replaces Grafana's range variables with a duration of the same
// length (5m with leading zeros), so that positions in the parsed expression
// are positions in the source. Variables inside label values need nothing.
func parsable(src string) string {
	return rangeVarRE.ReplaceAllStringFunc(src, func(v string) string {
		return "[" + strings.Repeat("0", len(v)-4) + "5m]"
	})
}

func applyEdits(src string, edits []edit) string {
	var b strings.Builder
	last := 0
	for _, e := range edits {
		b.WriteString(src[last:e.pos])
		b.WriteString(e.text)
		last = e.pos
	}
	b.WriteString(src[last:])
	return b.String()
}

// matcherText prints matchers as PromQL's printer does.
func matcherText(ms []*labels.Matcher) string {
	s := make([]string, len(ms))
	for i, m := range ms {
		s[i] = m.Name + m.Type.String() + strconv.Quote(m.Value)
	}
	return strings.Join(s, ",")
}

func trimSpace(s string) string { return strings.TrimLeft(s, " \t\r\n") }
