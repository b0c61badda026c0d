package monitor

import (
	"fmt"

	"github.com/vigil-sh/vigil/internal/ids"
	hostagentv1 "github.com/vigil-sh/vigil/proto/hostagent/v1"
)

// Problem is something wrong with an agent's answer that the reconcile
// tolerates: it is logged and counted, and the affected entry is handled
// conservatively.
type Problem struct {
	Kind      string // malformed_id, unknown_status, duplicate_id
	SandboxID string
	Detail    string
}

func (p Problem) String() string { return fmt.Sprintf("%s %q: %s", p.Kind, p.SandboxID, p.Detail) }

// ParseReport turns a ListSandboxes answer into a Report. Entries whose id is
// not a sandbox id are dropped (they cannot match a row); labels outside the
// vocabulary make the sandbox present with unknown status; duplicate ids that
// disagree do the same.
func ParseReport(resp *hostagentv1.ListSandboxesResponse) (Report, []Problem) {
	rep := make(Report, len(resp.GetSandboxes()))
	var problems []Problem
	for _, sb := range resp.GetSandboxes() {
		id, err := ids.ParseSandbox(sb.GetSandboxId())
		if err != nil {
			problems = append(problems, Problem{Kind: "malformed_id", SandboxID: sb.GetSandboxId(), Detail: err.Error()})
			continue
		}
		obs, known := ClassifyLabel(sb.GetStatus())
		if !known {
			problems = append(problems, Problem{Kind: "unknown_status", SandboxID: sb.GetSandboxId(), Detail: fmt.Sprintf("label %q is not a sandbox status", sb.GetStatus())})
		}
		if prev, dup := rep[id]; dup {
			problems = append(problems, Problem{Kind: "duplicate_id", SandboxID: sb.GetSandboxId(), Detail: "reported more than once"})
			obs = Merge(prev, obs)
		}
		rep[id] = obs
	}
	return rep, problems
}
