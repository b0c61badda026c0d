package main

import (
	"fmt"
	"slices"
	"strings"

	"go.yaml.in/yaml/v3"
)

// rewriteExprs rewrites the value of every `expr:` key of a YAML document in
// its text, so that comments, blank lines and the folding of long
// expressions stay as written: the rendered rules file reads like its
// source. rewrite returns the insertions for one expression.
func rewriteExprs(src string, rewrite func(expr string) ([]edit, error)) (string, error) {
	scalars, err := exprScalars(src)
	if err != nil {
		return "", err
	}
	var want []string
	out := src
	// From the last to the first, so that earlier offsets stay valid.
	for i := len(scalars) - 1; i >= 0; i-- {
		s := scalars[i]
		edits, err := rewrite(s.value)
		if err != nil {
			return "", fmt.Errorf("line %d: %w", s.line, err)
		}
		want = append(want, applyEdits(s.value, edits))
		out = out[:s.start] + s.render(edits) + out[s.end:]
	}
	slices.Reverse(want)
	// What a YAML parser now reads must be exactly the rewritten expressions.
	got, err := exprScalars(out)
	if err != nil {
		return "", fmt.Errorf("rewritten document: %w", err)
	}
	for i, s := range got {
		if s.value != want[i] {
			return "", fmt.Errorf("line %d: rewritten document reads %q, want %q", s.line, s.value, want[i])
		}
	}
	return out, nil
}

// An exprScalar is where one expression is in a YAML text: src[start:end]
// holds its lines (one for a plain scalar, the folded lines of a `>-` block
// scalar after its indicator), each indented by indent.
type exprScalar struct {
	value      string
	line       int
	start, end int
	lines      []string // the folded lines, without their indentation
	indent     string
}

// render returns the scalar's text with the edits made, each folded line
// kept where it was: an insertion at a line break ends the line before it.
func (s exprScalar) render(edits []edit) string {
	var lines []string
	pos, i := 0, 0
	for _, line := range s.lines {
		end := pos + len(line)
		var b strings.Builder
		last := pos
		for ; i < len(edits) && edits[i].pos <= end; i++ {
			b.WriteString(line[last-pos : edits[i].pos-pos])
			b.WriteString(edits[i].text)
			last = edits[i].pos
		}
		b.WriteString(line[last-pos:])
		lines = append(lines, b.String())
		pos = end + 1 // the space a fold stands for
	}
	return s.indent + strings.Join(lines, "\n"+s.indent) // the first line's indent too: start is where the line starts
}

// exprScalars finds the `expr:` values of a YAML document, in order.
func exprScalars(src string) ([]exprScalar, error) {
	var doc yaml.Node
	if err := yaml.Unmarshal([]byte(src), &doc); err != nil {
		return nil, err
	}
	lines := strings.SplitAfter(src, "\n")
	offsets := make([]int, len(lines)+1)
	for i, l := range lines {
		offsets[i+1] = offsets[i] + len(l)
	}
	var out []exprScalar
	var errs []error
	var walk func(*yaml.Node)
	walk = func(n *yaml.Node) {
		if n.Kind == yaml.MappingNode {
			for i := 0; i+1 < len(n.Content); i += 2 {
				k, v := n.Content[i], n.Content[i+1]
				if k.Value == "expr" && v.Kind == yaml.ScalarNode {
					s, err := locate(k, v, lines, offsets)
					if err != nil {
						errs = append(errs, fmt.Errorf("line %d: %w", v.Line, err))
					}
					out = append(out, s)
				}
			}
		}
		for _, c := range n.Content {
			walk(c)
		}
	}
	walk(&doc)
	if len(errs) > 0 {
		return nil, errs[0]
	}
	return out, nil
}

// locate finds the text of the value v of key k.
func locate(k, v *yaml.Node, lines []string, offsets []int) (exprScalar, error) {
	s := exprScalar{value: v.Value, line: v.Line}
	first := strings.TrimRight(lines[v.Line-1], "\r\n")
	switch v.Style {
	case 0: // plain, on the key's line
		s.start = offsets[v.Line-1] + v.Column - 1
		s.end = s.start + len(v.Value)
		s.lines = []string{v.Value}
		if strings.TrimRight(first[v.Column-1:], " ") != v.Value {
			return s, fmt.Errorf("write expr on one line, or as a `>-` block, with no comment after it")
		}
		return s, nil
	case yaml.FoldedStyle:
		if strings.TrimSpace(first[v.Column-1:]) != ">-" {
			return s, fmt.Errorf("write a block expr as `>-`")
		}
		keyIndent := k.Column - 1
		var text []string
		for i := v.Line; i < len(lines); i++ {
			l := strings.TrimRight(lines[i], "\r\n")
			body := strings.TrimLeft(l, " ")
			ind := len(l) - len(body)
			if body == "" || ind <= keyIndent {
				break
			}
			if s.indent == "" {
				s.indent = l[:ind]
				s.start = offsets[i]
			}
			if !strings.HasPrefix(l, s.indent) {
				return s, fmt.Errorf("indent no line of a `>-` expr less than its first")
			}
			// A line indented more than the first keeps its extra spaces
			// and its line breaks in the value.
			text = append(text, l[len(s.indent):])
			s.end = offsets[i] + len(l)
		}
		s.lines = text
		if !joinedBySingleBreaks(text, v.Value) {
			return s, fmt.Errorf("a `>-` expr may not hold blank lines or trailing spaces")
		}
		return s, nil
	}
	return s, fmt.Errorf("write expr plain or as a `>-` block, not quoted")
}

// joinedBySingleBreaks says whether value is lines joined each by one space
// (a fold) or one line break (around a more indented line), which is how
// render maps positions in the value to lines.
func joinedBySingleBreaks(lines []string, value string) bool {
	pos := 0
	for i, l := range lines {
		if !strings.HasPrefix(value[pos:], l) {
			return false
		}
		pos += len(l)
		if i == len(lines)-1 {
			break
		}
		if pos >= len(value) || (value[pos] != ' ' && value[pos] != '\n') {
			return false
		}
		pos++
	}
	return pos == len(value)
}
