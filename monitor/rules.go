package monitor

import (
	"fmt"
	"sort"
	"time"

	"github.com/google/uuid"

	"github.com/vigil-sh/vigil/internal/status"
)

// KnownStatus reports whether s is in the control plane's sandbox vocabulary.
func KnownStatus(s string) bool { return status.Known(s) }

// MissingOnHostDown lists the statuses a sandbox leaves for "missing" when its
// host is marked unreachable.
var MissingOnHostDown = []string{status.Running, status.Starting, status.Pending, status.Pausing, status.Resuming, status.Stopping}

// Presence is what an agent report says about one sandbox.
type Presence int

const (
	// Absent: the agent does not report the sandbox, or reports it stopped
	// or in error (no VM is alive).
	Absent Presence = iota
	// PresentUnknown: the agent reports the sandbox but its label does not
	// settle its status — a transitional label (pausing, resuming, starting,
	// stopping, snapshotting, pending, missing), a label outside the
	// vocabulary, or contradicting duplicate entries. Never written to the
	// database.
	PresentUnknown
	// PresentKnown: the agent reports the sandbox alive as running or paused.
	PresentKnown
)

// Observed is the agent's view of one sandbox.
type Observed struct {
	Presence Presence
	Status   string // running or paused when Presence == PresentKnown
}

// Report is a parsed ListSandboxes answer, keyed by sandbox UUID.
type Report map[uuid.UUID]Observed

// HasPaused reports whether any sandbox is reported paused: the gate for
// zombie clean-up.
func (r Report) HasPaused() bool {
	for _, o := range r {
		if o.Presence == PresentKnown && o.Status == status.Paused {
			return true
		}
	}
	return false
}

// PausedIDs lists the sandboxes the agent reports paused, sorted.
func (r Report) PausedIDs() []uuid.UUID {
	var out []uuid.UUID
	for id, o := range r {
		if o.Presence == PresentKnown && o.Status == status.Paused {
			out = append(out, id)
		}
	}
	sort.Slice(out, func(i, j int) bool { return lessUUID(out[i], out[j]) })
	return out
}

// ClassifyLabel maps an agent status label to presence. Labels outside the
// vocabulary return known=false so the caller can log and count them.
func ClassifyLabel(label string) (o Observed, known bool) {
	switch label {
	case status.Running, status.Paused:
		return Observed{Presence: PresentKnown, Status: label}, true
	case status.Stopped, status.Error:
		return Observed{Presence: Absent}, true
	case status.Pausing, status.Resuming, status.Starting, status.Stopping,
		status.Snapshotting, status.Pending, status.Missing:
		return Observed{Presence: PresentUnknown}, true
	}
	return Observed{Presence: PresentUnknown}, false
}

// Merge folds a second report entry for the same sandbox into the first:
// agreeing duplicates are harmless, contradicting ones make the sandbox
// present with unknown status.
func Merge(a, b Observed) Observed {
	if a == b {
		return a
	}
	if a.Presence == Absent && b.Presence == Absent {
		return a
	}
	return Observed{Presence: PresentUnknown}
}

// Row is a sandbox row as the rules see it. Rows without a team (damaged:
// their audit row could not be written) never reach the rules.
type Row struct {
	ID          uuid.UUID
	TeamID      uuid.UUID
	Status      string
	LastUpdated time.Time // the grace period's clock
}

// Rules holds the grace periods of SPEC §2.
type Rules struct {
	TransientGrace time.Duration // starting/resuming/pausing/stopping/snapshotting without a VM
	SnapshotGrace  time.Duration // snapshotting with a live VM
}

// DefaultRules are the control plane's constants.
var DefaultRules = Rules{TransientGrace: 2 * time.Minute, SnapshotGrace: 15 * time.Minute}

// DefaultUnreachableAfter is the control plane's heartbeat threshold: a
// host without a heartbeat for this long becomes unreachable.
const DefaultUnreachableAfter = 90 * time.Second

// Kind says what an Action does.
type Kind int

const (
	// Transition sets a sandbox row's status, compare-and-set on From and
	// the LastUpdated the decision saw.
	Transition Kind = iota
	// DestroyZombie destroys a sandbox on the agent because the database
	// says stopped but the agent still holds it paused.
	DestroyZombie
	// ResendDestroy re-sends DestroySandbox for a row stopping past the
	// transient grace whose VM the agent still reports: the control
	// plane's destroy was lost (rule 9). When the agent accepts it, the row
	// goes From -> To (stopping -> stopped) by compare-and-set on From and
	// Seen; while it refuses or does not answer, the row stays stopping.
	ResendDestroy
)

func (k Kind) String() string {
	switch k {
	case DestroyZombie:
		return "destroy_zombie"
	case ResendDestroy:
		return "resend_destroy"
	}
	return "transition"
}

// Audit is the audit row an action writes when (and only when) it happens.
type Audit struct {
	Action string // destroy, pause, error, snapshot
	Status string // success, info, warning, error
	Reason string
	Phase  string // create, resume, snapshot on transient_timeout rows
	Error  string // text on error rows
}

// Action is one decision of the rules for one sandbox.
type Action struct {
	Kind    Kind
	Sandbox uuid.UUID
	TeamID  uuid.UUID
	From    string    // status the decision was based on
	To      string    // new status (Transition, ResendDestroy); status.Stopped stays for DestroyZombie
	Seen    time.Time // LastUpdated the decision was based on
	Audit   *Audit    // nil: the change is silent
}

func (a Action) String() string {
	return fmt.Sprintf("%s %s %s->%s", a.Kind, a.Sandbox, a.From, a.To)
}

// Decide applies the active reconcile rules (SPEC §2 items 3–6) to one online
// host: its sandbox rows, the agent's report, and the database's clock. It is
// pure. Rows in statuses the rules do not cover produce nothing. The actions
// come out in row order, one at most per row.
func Decide(rules Rules, rows []Row, report Report, now time.Time) []Action {
	hasPaused := report.HasPaused()
	var out []Action
	for _, r := range rows {
		obs := report[r.ID]
		age := now.Sub(r.LastUpdated)
		act := func(to string, audit *Audit) {
			out = append(out, Action{Kind: Transition, Sandbox: r.ID, TeamID: r.TeamID, From: r.Status, To: to, Seen: r.LastUpdated, Audit: audit})
		}
		switch r.Status {
		case status.Missing:
			switch obs.Presence {
			case Absent:
				act(status.Stopped, &Audit{Action: "destroy", Status: "warning", Reason: "orphaned"})
			case PresentKnown:
				if obs.Status == status.Paused {
					act(status.Paused, &Audit{Action: "pause", Status: "info", Reason: "restored_after_host_recovery"})
				} else {
					act(obs.Status, nil)
				}
			case PresentUnknown:
				// Next time: the agent is mid-transition.
			}
		case status.Running:
			switch obs.Presence {
			case Absent:
				act(status.Stopped, &Audit{Action: "destroy", Status: "warning", Reason: "orphaned"})
			case PresentKnown:
				if obs.Status == status.Paused {
					act(status.Paused, &Audit{Action: "pause", Status: "info", Reason: "host_state_sync"})
				}
			}
		case status.Stopped:
			if hasPaused && obs.Presence == PresentKnown && obs.Status == status.Paused {
				out = append(out, Action{Kind: DestroyZombie, Sandbox: r.ID, TeamID: r.TeamID, From: status.Stopped, To: status.Stopped, Seen: r.LastUpdated,
					Audit: &Audit{Action: "destroy", Status: "warning", Reason: "paused_zombie_cleanup"}})
			}
		case status.Starting, status.Resuming:
			if obs.Presence != Absent {
				act(status.Running, nil)
			} else if age > rules.TransientGrace {
				phase := "create"
				if r.Status == status.Resuming {
					phase = "resume"
				}
				act(status.Error, &Audit{Action: "error", Status: "error", Reason: "transient_timeout", Phase: phase,
					Error: TransientTimeoutError})
			}
		case status.Snapshotting:
			if obs.Presence != Absent {
				if age > rules.SnapshotGrace {
					to := status.Running
					if obs.Presence == PresentKnown && obs.Status == status.Paused {
						to = status.Paused
					}
					act(to, &Audit{Action: "snapshot", Status: "info", Reason: "snapshot_recovered"})
				}
			} else if age > rules.TransientGrace {
				act(status.Error, &Audit{Action: "snapshot", Status: "error", Reason: "transient_timeout", Phase: "snapshot",
					Error: TransientTimeoutError})
			}
		case status.Pausing:
			if obs.Presence == Absent && age > rules.TransientGrace {
				act(status.Paused, &Audit{Action: "pause", Status: "info", Reason: "transient_timeout_inferred"})
			}
		case status.Stopping:
			switch {
			case age <= rules.TransientGrace:
			case obs.Presence == Absent:
				act(status.Stopped, &Audit{Action: "destroy", Status: "warning", Reason: "transient_timeout_inferred"})
			default:
				// Rule 9: the destroy was lost. Re-sent; once the agent
				// accepts it, the row goes stopping -> stopped.
				out = append(out, Action{Kind: ResendDestroy, Sandbox: r.ID, TeamID: r.TeamID, From: status.Stopping, To: status.Stopped, Seen: r.LastUpdated,
					Audit: &Audit{Action: "destroy", Status: "warning", Reason: "destroy_retry"}})
			}
		}
	}
	return out
}

// ActiveStatuses are the row statuses Decide acts on, besides stopped rows
// the agent reports paused (zombies).
var ActiveStatuses = []string{status.Missing, status.Running, status.Starting, status.Resuming, status.Snapshotting, status.Pausing, status.Stopping}

func lessUUID(a, b uuid.UUID) bool {
	for i := range a {
		if a[i] != b[i] {
			return a[i] < b[i]
		}
	}
	return false
}
