package main

// Figures, their targets and marks, the printed table, the JSON file, and
// the smoke check.

import (
	"encoding/json"
	"fmt"
	"io"
	"math"
	"os"
	"path/filepath"
	"strings"
	"time"
)

// figure is one number of the run. Value nil is n/a: Pending names what
// vigil or agentsim lacks for it, Note says why otherwise.
type figure struct {
	Group   string   `json:"group"`
	Key     string   `json:"key"`
	Name    string   `json:"name"`
	Value   *float64 `json:"value"`
	Unit    string   `json:"unit,omitempty"`
	Target  string   `json:"target,omitempty"`
	Status  string   `json:"status"` // met, short, info, n/a
	Note    string   `json:"note,omitempty"`
	Pending string   `json:"pending,omitempty"`

	op       string // "<=", ">=", "<", "=="; "" without target
	bound    float64
	positive bool // sane only when > 0 (otherwise >= 0)
	failed   bool // measured, and the measurement itself missed the target
}

func (f *figure) set(v float64) *figure { f.Value = &v; return f }

// want sets the target: value op bound.
func (f *figure) want(op string, bound float64) *figure { f.op, f.bound = op, bound; return f }

func (f *figure) pos() *figure { f.positive = true; return f }

func (f *figure) note(format string, args ...any) *figure {
	n := fmt.Sprintf(format, args...)
	if f.Note != "" {
		f.Note += "; " + n
	} else {
		f.Note = n
	}
	return f
}

// na leaves the figure without a value because its measurement failed.
func (f *figure) na(reason string) *figure { f.Value = nil; return f.note("%s", reason) }

// pending leaves the figure without a value because vigil or agentsim does
// not provide its input yet.
func (f *figure) pending(what string) *figure { f.Value, f.Pending = nil, what; return f }

// fail records that the figure's target was missed in a way that has no
// value (e.g. some shard never recovered within the deadline).
func (f *figure) fail(reason string) *figure {
	f.Value, f.failed = nil, true
	return f.note("%s", reason)
}

func (f *figure) evaluate() {
	if f.op != "" {
		f.Target = f.op + " " + formatValue(f.bound, f.Unit)
		f.Target = strings.NewReplacer("<=", "≤", ">=", "≥", "==", "=").Replace(f.Target)
	}
	switch {
	case f.failed:
		f.Status = "short"
	case f.Value == nil:
		f.Status = "n/a"
	case f.op == "":
		f.Status = "info"
	case meets(*f.Value, f.op, f.bound):
		f.Status = "met"
	default:
		f.Status = "short"
	}
}

func meets(v float64, op string, bound float64) bool {
	switch op {
	case "<=":
		return v <= bound
	case ">=":
		return v >= bound
	case "<":
		return v < bound
	case "==":
		return v == bound
	}
	return false
}

type summary struct {
	Met     int `json:"met"`
	Short   int `json:"short"`
	NA      int `json:"n/a"`
	Info    int `json:"info"`
	Pending int `json:"pending"`
}

type report struct {
	Started      time.Time      `json:"started"`
	Finished     time.Time      `json:"finished"`
	Seconds      float64        `json:"seconds"`
	Smoke        bool           `json:"smoke"`
	Revision     string         `json:"revision,omitempty"` // git HEAD of the tree the binaries were built from, "-dirty" with local changes
	Machine      machine        `json:"machine"`
	Params       map[string]any `json:"params"`
	Capabilities capabilities   `json:"capabilities"`
	Figures      []*figure      `json:"figures"`
	Profiles     []string       `json:"profiles,omitempty"`
	Notes        []string       `json:"notes,omitempty"`
	Errors       []string       `json:"errors,omitempty"`
	Summary      summary        `json:"summary"`
}

func newReport(o options) *report {
	return &report{
		Started: time.Now().UTC(), Smoke: o.Smoke,
		Params: map[string]any{
			"hosts": o.Hosts, "sandboxes_per_host": o.Sandboxes, "latency": o.Latency.String(),
			"replicas": o.Replicas, "transports": o.Transports, "duration": o.Duration.String(),
			"sweeps": o.Sweeps, "shards": o.Shards, "lease_ttl": o.LeaseTTL.String(),
			"interval": o.Interval.String(), "unreachable_after": o.UnreachableAfter.String(),
			"heartbeat_interval": o.Heartbeat.String(), "change_fraction": o.ChangeFraction,
			"in_flight": o.InFlight, "agent_concurrency": o.AgentConcurrency,
			"hosts_per_agentsim": o.HostsPerAgentsim, "agent_timeout": o.agentTimeout().String(),
			"budget": o.Budget.String(), "fault_lease_ttl": o.FaultLeaseTTL.String(), "fault_interval": o.FaultInterval.String(),
		},
	}
}

// fig adds a figure; key is group-independent and unique within the run.
func (r *report) fig(group, key, name, unit string) *figure {
	f := &figure{Group: group, Key: key, Name: name, Unit: unit}
	r.Figures = append(r.Figures, f)
	return f
}

// lookup finds a figure by key.
func (r *report) lookup(key string) *figure {
	for _, f := range r.Figures {
		if f.Key == key {
			return f
		}
	}
	return nil
}

func (r *report) errorf(format string, args ...any) {
	r.Errors = append(r.Errors, fmt.Sprintf(format, args...))
}

func (r *report) finish() {
	r.Finished = time.Now().UTC()
	r.Seconds = math.Round(r.Finished.Sub(r.Started).Seconds()*10) / 10
	r.Summary = summary{}
	for _, f := range r.Figures {
		f.evaluate()
		switch f.Status {
		case "met":
			r.Summary.Met++
		case "short":
			r.Summary.Short++
		case "info":
			r.Summary.Info++
		default:
			r.Summary.NA++
		}
		if f.Pending != "" {
			r.Summary.Pending++
		}
	}
}

func (r *report) print(w io.Writer) {
	r.finish()
	fmt.Fprintf(w, "\nvigil bench — %s, %d s%s\n", r.Started.Format(time.RFC3339), int(r.Seconds), map[bool]string{true: " (smoke)"}[r.Smoke])
	m := r.Machine
	if r.Revision != "" {
		fmt.Fprintf(w, "revision: %s\n", r.Revision)
	}
	fmt.Fprintf(w, "machine: %d × %s, %d MiB, Linux %s, %s, %s\n", m.NProc, m.CPUModel, m.MemTotalMiB, m.Kernel, m.GoVersion, firstWords(m.Postgres, 2))
	p := r.Params
	fmt.Fprintf(w, "fleet: %v hosts × %v sandboxes, agent latency %v, %v shards, lease TTL %v, interval %v\n",
		p["hosts"], p["sandboxes_per_host"], p["latency"], p["shards"], p["lease_ttl"], p["interval"])
	if !r.Capabilities.AgentsimLatency {
		fmt.Fprintf(w, "NOTE: agentsim has no --latency: agents answered without the configured delay\n")
	}
	var groups []string
	byGroup := map[string][]*figure{}
	for _, f := range r.Figures {
		if _, ok := byGroup[f.Group]; !ok {
			groups = append(groups, f.Group)
		}
		byGroup[f.Group] = append(byGroup[f.Group], f)
	}
	for _, g := range groups {
		fmt.Fprintf(w, "\n%s\n", g)
		for _, f := range byGroup[g] {
			r.printFigure(w, f)
		}
	}
	fmt.Fprintf(w, "\ntargets: %d met, %d short; %d figures n/a (%d awaiting vigil/agentsim changes)\n",
		r.Summary.Met, r.Summary.Short, r.Summary.NA, r.Summary.Pending)
	for _, p := range r.Profiles {
		fmt.Fprintf(w, "profile: %s\n", p)
	}
	for _, n := range r.Notes {
		fmt.Fprintf(w, "note: %s\n", n)
	}
	for _, e := range r.Errors {
		fmt.Fprintf(w, "error: %s\n", e)
	}
}

func (r *report) printFigure(w io.Writer, f *figure) {
	{
		val := "n/a"
		if f.Value != nil {
			val = formatValue(*f.Value, f.Unit)
		}
		mark := map[string]string{"met": "met", "short": "SHORT", "n/a": "n/a", "info": ""}[f.Status]
		note := f.Note
		if f.Pending != "" {
			note = strings.TrimPrefix(note+"; awaiting "+f.Pending, "; ")
		}
		line := fmt.Sprintf("  %-58s %12s  %-12s %-5s", f.Name, val, f.Target, mark)
		if note != "" && (f.Value == nil || f.Status == "short") {
			line += "  " + note
		}
		fmt.Fprintln(w, strings.TrimRight(line, " "))
	}
}

func firstWords(s string, n int) string {
	f := strings.Fields(s)
	if len(f) > n {
		f = f[:n]
	}
	return strings.Join(f, " ")
}

func formatValue(v float64, unit string) string {
	switch unit {
	case "s":
		if v != 0 && math.Abs(v) < 1 {
			return fmt.Sprintf("%.0f ms", v*1000)
		}
		return fmt.Sprintf("%.2f s", v)
	case "hosts/s":
		return fmt.Sprintf("%.0f/s", v)
	case "×":
		return fmt.Sprintf("%.2f×", v)
	case "MiB":
		return fmt.Sprintf("%.0f MiB", v)
	case "":
		if v == math.Trunc(v) || math.Abs(v) >= 100 {
			return fmt.Sprintf("%.0f", v)
		}
		return fmt.Sprintf("%.2f", v)
	}
	return fmt.Sprintf("%.2f %s", v, unit)
}

// write stores the report as <dir>/<UTC timestamp>.json and latest.json.
func (r *report) write(dir string) ([]string, error) {
	r.finish()
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, err
	}
	b, err := json.MarshalIndent(r, "", "  ")
	if err != nil {
		return nil, err
	}
	b = append(b, '\n')
	var paths []string
	for _, name := range []string{r.Started.Format("20060102T150405Z") + ".json", "latest.json"} {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, b, 0o644); err != nil {
			return paths, err
		}
		paths = append(paths, p)
	}
	return paths, nil
}

// check is the smoke verdict: every figure present, finite, non-negative,
// positive where it must be. Figures awaiting a vigil or agentsim change are
// listed as pending, and count as problems only when strict.
func (r *report) check(strict bool) (problems, pending []string) {
	for _, f := range r.Figures {
		id := f.Group + " / " + strings.TrimSpace(f.Name)
		switch {
		case f.Value == nil && f.Pending != "" && !strict:
			pending = append(pending, f.Pending)
		case f.Value == nil:
			problems = append(problems, fmt.Sprintf("%s: n/a (%s)", id, strings.TrimPrefix(f.Note+"; "+f.Pending, "; ")))
		case !finite(*f.Value):
			problems = append(problems, fmt.Sprintf("%s: %v is not finite", id, *f.Value))
		case *f.Value < 0:
			problems = append(problems, fmt.Sprintf("%s: %v is negative", id, *f.Value))
		case f.positive && *f.Value <= 0:
			problems = append(problems, fmt.Sprintf("%s: %v, want > 0", id, *f.Value))
		}
	}
	for _, e := range r.Errors {
		problems = append(problems, "error: "+e)
	}
	return problems, pending
}

// summarize turns a list with repeats into "item (n figures)" lines, in
// order of first appearance.
func summarize(items []string) []string {
	var order []string
	n := map[string]int{}
	for _, it := range items {
		if n[it] == 0 {
			order = append(order, it)
		}
		n[it]++
	}
	out := make([]string, len(order))
	for i, it := range order {
		out[i] = fmt.Sprintf("%s (%d figures)", it, n[it])
	}
	return out
}
