package monitor

import (
	"fmt"
	"io"
	"slices"
	"sort"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/vigil-sh/vigil/internal/ids"
	"github.com/vigil-sh/vigil/store"
)

// ShadowReport holds shadow mode's would-be changes against the system audit
// rows the control plane's own monitor wrote over the same window (vigil
// shadow-report). Kinds are the changes of SPEC §2.1 that write an audit row;
// silent changes have none on either side and are only counted.
type ShadowReport struct {
	From, To time.Time
	Slack    time.Duration // how far outside the window a match may lie
	Kinds    []KindReport  // in the order of auditedKinds
	Silent   map[string]int
}

// KindReport compares one kind of change.
type KindReport struct {
	Kind        string   `json:"kind"`
	Agreed      int      `json:"agreed"`
	OnlyVigil   []string `json:"only_vigil"`   // resource ids
	OnlyMonitor []string `json:"only_monitor"` // resource ids
}

// auditedKinds are the kinds of change both sides write audit rows for, as
// kind strings (resource, action, reason, and phase where it tells two apart).
var auditedKinds = []string{
	"host marked_down",
	"sandbox destroy orphaned",
	"sandbox pause restored_after_host_recovery",
	"sandbox pause host_state_sync",
	"sandbox destroy paused_zombie_cleanup",
	"sandbox error transient_timeout create",
	"sandbox error transient_timeout resume",
	"sandbox pause transient_timeout_inferred",
	"sandbox destroy transient_timeout_inferred",
	"sandbox snapshot transient_timeout",
	"sandbox snapshot snapshot_recovered",
	"sandbox destroy destroy_retry",
}

// kindOf names an audit row's kind of change; hosts' reasons differ between
// writers (the control plane writes none) and are left out.
func kindOf(resourceType, action, reason, phase string) string {
	switch {
	case resourceType == "host":
		return "host " + action
	case action == "error":
		return "sandbox " + action + " " + reason + " " + phase
	}
	return "sandbox " + action + " " + reason
}

type sighting struct {
	rid      string
	at       time.Time
	replayed bool
}

// CompareShadow compares vigil's shadow records with the other writers'
// system audit rows. Both lists may reach Slack beyond [from, to): a change
// counts when it lies in the window, and its match may lie up to the slack
// outside it. Per kind and resource, sightings pair up in time order: a pair
// is an agreement; an unpaired change of vigil's is "only vigil" (a replay
// unpaired is dropped: it only says vigil would have agreed); an unpaired
// audit row is "only the monitor".
func CompareShadow(vigil []store.ShadowRecord, monitor []store.SystemAudit, from, to time.Time, slack time.Duration) ShadowReport {
	rep := ShadowReport{From: from, To: to, Slack: slack, Silent: map[string]int{}}
	in := func(t time.Time) bool { return !t.Before(from) && t.Before(to) }
	v := map[string]map[string][]sighting{} // kind -> rid -> sightings
	m := map[string]map[string][]sighting{}
	add := func(into map[string]map[string][]sighting, kind string, s sighting) {
		if into[kind] == nil {
			into[kind] = map[string][]sighting{}
		}
		into[kind][s.rid] = append(into[kind][s.rid], s)
	}
	for _, c := range vigil {
		if c.Action == "" {
			if in(c.At) && !c.Replayed {
				rep.Silent[c.From+"->"+c.To]++
			}
			continue
		}
		rt, rid := "host", ids.Host(c.Host)
		if c.Sandbox.Valid {
			rt, rid = "sandbox", ids.Sandbox(c.Sandbox.UUID)
		}
		add(v, kindOf(rt, c.Action, c.Reason, c.Phase), sighting{rid: rid, at: c.At, replayed: c.Replayed})
	}
	for _, a := range monitor {
		add(m, kindOf(a.ResourceType, a.Action, a.Reason, a.Phase), sighting{rid: a.ResourceID, at: a.At})
	}
	for _, kind := range auditedKinds {
		kr := KindReport{Kind: kind, OnlyVigil: []string{}, OnlyMonitor: []string{}}
		rids := map[string]bool{}
		for rid := range v[kind] {
			rids[rid] = true
		}
		for rid := range m[kind] {
			rids[rid] = true
		}
		for rid := range rids {
			vs, ms := v[kind][rid], m[kind][rid]
			sort.Slice(vs, func(i, j int) bool { return vs[i].at.Before(vs[j].at) })
			sort.Slice(ms, func(i, j int) bool { return ms[i].at.Before(ms[j].at) })
			n := min(len(vs), len(ms))
			for i := range n {
				if in(vs[i].at) || in(ms[i].at) {
					kr.Agreed++
				}
			}
			for _, s := range vs[n:] {
				if in(s.at) && !s.replayed {
					kr.OnlyVigil = append(kr.OnlyVigil, rid)
				}
			}
			for _, s := range ms[n:] {
				if in(s.at) {
					kr.OnlyMonitor = append(kr.OnlyMonitor, rid)
				}
			}
		}
		slices.Sort(kr.OnlyVigil)
		slices.Sort(kr.OnlyMonitor)
		rep.Kinds = append(rep.Kinds, kr)
	}
	return rep
}

// Totals sums the kinds.
func (r ShadowReport) Totals() (agreed, onlyVigil, onlyMonitor int) {
	for _, k := range r.Kinds {
		agreed += k.Agreed
		onlyVigil += len(k.OnlyVigil)
		onlyMonitor += len(k.OnlyMonitor)
	}
	return agreed, onlyVigil, onlyMonitor
}

// maxListed bounds the ids listed per kind and side.
const maxListed = 20

// Write prints the report as a table, the disagreements' ids, and the silent
// changes.
func (r ShadowReport) Write(w io.Writer) error {
	fmt.Fprintf(w, "shadow report %s .. %s (matches within %s of the window)\n\n",
		r.From.UTC().Format(time.RFC3339), r.To.UTC().Format(time.RFC3339), r.Slack)
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "kind of change\tagreed\tonly vigil\tonly the monitor\t")
	for _, k := range r.Kinds {
		fmt.Fprintf(tw, "%s\t%d\t%d\t%d\t\n", k.Kind, k.Agreed, len(k.OnlyVigil), len(k.OnlyMonitor))
	}
	a, ov, om := r.Totals()
	fmt.Fprintf(tw, "total\t%d\t%d\t%d\t\n", a, ov, om)
	if err := tw.Flush(); err != nil {
		return err
	}
	if ov+om > 0 {
		fmt.Fprintln(w, "\ndisagreements:")
		for _, k := range r.Kinds {
			list(w, k.Kind, "only vigil", k.OnlyVigil)
			list(w, k.Kind, "only the monitor", k.OnlyMonitor)
		}
	}
	if len(r.Silent) > 0 {
		keys := make([]string, 0, len(r.Silent))
		for k := range r.Silent {
			keys = append(keys, k)
		}
		sort.Strings(keys)
		parts := make([]string, len(keys))
		for i, k := range keys {
			parts[i] = fmt.Sprintf("%s %d", k, r.Silent[k])
		}
		fmt.Fprintf(w, "\nsilent changes vigil would have made (neither side writes an audit row): %s\n", strings.Join(parts, ", "))
	}
	return nil
}

func list(w io.Writer, kind, side string, rids []string) {
	if len(rids) == 0 {
		return
	}
	shown := rids[:min(len(rids), maxListed)]
	more := ""
	if len(rids) > len(shown) {
		more = fmt.Sprintf(" … and %d more", len(rids)-len(shown))
	}
	fmt.Fprintf(w, "  %s, %s: %s%s\n", kind, side, strings.Join(shown, " "), more)
}
