package chaos

import (
	"fmt"
	"os"
	"sort"
	"strings"
	"time"

	"github.com/google/uuid"

	"github.com/vigil-sh/vigil/agentsim"
	"github.com/vigil-sh/vigil/internal/ids"
	"github.com/vigil-sh/vigil/internal/status"
)

// The checks are pure functions of the history, so each has tests of its
// own (check_test.go) on histories built by hand.

// staleWrites finds, per shard, every committed write (journal row) under a
// token lower than a token already committed for the shard — by another
// journal row or by a fence raise — in commit order.
func staleWrites(journal []journalRow, raises []fenceRaise) []string {
	type item struct {
		commitSeq int64
		token     int64
		what      string
		raise     bool
	}
	byShard := map[int][]item{}
	for _, r := range journal {
		byShard[r.shard] = append(byShard[r.shard], item{r.commitSeq, r.token,
			fmt.Sprintf("%s %s by %s (journal seq %d)", ids.Host(r.host), r.change, r.replica, r.seq), false})
	}
	for _, r := range raises {
		byShard[r.shard] = append(byShard[r.shard], item{r.commitSeq, r.token, "fence raised by " + r.owner, true})
	}
	var out []string
	for _, s := range sortedKeys(byShard, func(a, b int) bool { return a < b }) {
		items := byShard[s]
		sort.SliceStable(items, func(i, j int) bool { return items[i].commitSeq < items[j].commitSeq })
		var max item
		for _, it := range items {
			if it.token < max.token && !it.raise {
				out = append(out, fmt.Sprintf("shard %d: %s under token %d committed after %s under token %d (commit %d > %d)",
					s, it.what, it.token, max.what, max.token, it.commitSeq, max.commitSeq))
			}
			if it.token > max.token {
				max = it
			}
		}
	}
	return out
}

// doubleActing finds hosts on which two owners' committed actions
// interleave: in commit order, a token's writes on the host resume after
// another token's began. It also reports tokens under which two replicas
// wrote.
func doubleActing(journal []journalRow) (hosts []string, sharedTokens []string) {
	type span struct {
		replica string
		last    int // index in the host's sequence of token blocks
	}
	seqs := map[uuid.UUID][]int64{} // host -> tokens in commit order, consecutive duplicates folded
	writers := map[int64]string{}   // token -> replica
	reported := map[int64]bool{}
	for _, r := range journal {
		if w, ok := writers[r.token]; ok && w != r.replica && !reported[r.token] {
			sharedTokens = append(sharedTokens, fmt.Sprintf("token %d (shard %d) written by %s and %s", r.token, r.shard, w, r.replica))
			reported[r.token] = true
		}
		writers[r.token] = r.replica
		s := seqs[r.host]
		if len(s) == 0 || s[len(s)-1] != r.token {
			seqs[r.host] = append(s, r.token)
		}
	}
	for _, h := range sortedKeys(seqs, func(a, b uuid.UUID) bool { return a.String() < b.String() }) {
		seen := map[int64]bool{}
		for _, tok := range seqs[h] {
			if seen[tok] {
				var parts []string
				for _, t := range seqs[h] {
					parts = append(parts, fmt.Sprintf("%d(%s)", t, writers[t]))
				}
				hosts = append(hosts, fmt.Sprintf("%s: owners' writes interleave: %s", ids.Host(h), strings.Join(parts, " ")))
				break
			}
			seen[tok] = true
		}
	}
	return hosts, sharedTokens
}

// agentDisagreements finds accepted DestroySandbox calls whose token is
// lower than one the agent had already accepted for that host.
func agentDisagreements(destroys map[uuid.UUID][]agentsim.DestroyRecord) []string {
	var out []string
	for _, h := range sortedKeys(destroys, func(a, b uuid.UUID) bool { return a.String() < b.String() }) {
		var max int64
		for _, d := range destroys[h] {
			if !d.Fenced {
				out = append(out, fmt.Sprintf("%s: destroy of %s accepted without a fence token", ids.Host(h), d.Sandbox))
				continue
			}
			if d.Token < max {
				out = append(out, fmt.Sprintf("%s: destroy of %s accepted under token %d after token %d", ids.Host(h), d.Sandbox, d.Token, max))
			}
			max = max64(max, d.Token)
		}
	}
	return out
}

func max64(a, b int64) int64 {
	if a > b {
		return a
	}
	return b
}

// rulesModel is the checker's own statement of SPEC §2 (items 1, 3–6, 9),
// kept apart from monitor.Decide on purpose: it says what a reconcile of
// the final state would still change. Staleness (item 1) comes with the
// final state, judged by the database clock against --unreachable-after.
type rulesModel struct {
	transientGrace time.Duration
	snapshotGrace  time.Duration
	// settle is how long a due change may wait for its pass (a few
	// intervals); a row or host due for less than that is not judged.
	settle time.Duration
}

// agentView is how an agent label settles a sandbox: absent (no VM, or
// stopped/error), known (running or paused), or present with an unknown
// status (transitional or foreign labels).
func agentView(label string, ok bool) (presence string, known string) {
	if !ok {
		return "absent", ""
	}
	switch label {
	case status.Running, status.Paused:
		return "known", label
	case status.Stopped, status.Error:
		return "absent", ""
	}
	return "unknown", ""
}

// pending says what the rules would still do with a row given its agent's
// report, "" for nothing; rule9 marks the stuck-destroy rule.
func (m rulesModel) pending(row sandboxRow, vms map[uuid.UUID]string, hostHasPaused bool, now time.Time) (what string, rule9 bool) {
	if row.status == nil || row.teamNull {
		return "", false
	}
	label, ok := vms[row.id]
	presence, known := agentView(label, ok)
	age := now.Sub(row.lastUpdated)
	due := func(grace time.Duration) bool { return age > grace+m.settle }
	st := *row.status
	switch st {
	case status.Missing:
		switch {
		case presence == "absent" && due(0):
			return "missing row absent on its agent not stopped (rule 3)", false
		case presence == "known" && due(0):
			return "missing row the agent reports " + known + " not restored (rule 3)", false
		}
	case status.Running:
		switch {
		case presence == "absent" && due(0):
			return "running row absent on its agent not stopped (rule 4)", false
		case presence == "known" && known == status.Paused && due(0):
			return "running row the agent reports paused not synced (rule 4)", false
		}
	case status.Stopped:
		if hostHasPaused && presence == "known" && known == status.Paused && due(0) {
			return "stopped row paused on its agent not destroyed there (rule 5)", false
		}
	case status.Starting, status.Resuming:
		switch {
		case presence != "absent" && due(0):
			return st + " row alive on its agent not running (rule 6)", false
		case presence == "absent" && due(m.transientGrace):
			return st + " row gone from its agent past the grace not in error (rule 6)", false
		}
	case status.Snapshotting:
		switch {
		case presence != "absent" && due(m.snapshotGrace):
			return "snapshotting row past the snapshot grace not recovered (rule 6)", false
		case presence == "absent" && due(m.transientGrace):
			return "snapshotting row gone from its agent past the grace not in error (rule 6)", false
		}
	case status.Pausing:
		if presence == "absent" && due(m.transientGrace) {
			return "pausing row gone from its agent past the grace not paused (rule 6)", false
		}
	case status.Stopping:
		switch {
		case presence == "absent" && due(m.transientGrace):
			return "stopping row gone from its agent past the grace not stopped (rule 6)", false
		case presence != "absent" && due(m.transientGrace):
			return "stopping row alive on its agent past the grace: destroy never re-sent (rule 9)", true
		}
	}
	return "", false
}

// lostTransitions applies the model to the final state. Hosts in skip are
// not judged (bad input); only hosts whose agent answers at the end are
// judged by the active rules.
func (m rulesModel) lostTransitions(fs finalState, skip map[uuid.UUID]bool) (lost []string) {
	for _, h := range sortedKeys(fs.hosts, func(a, b uuid.UUID) bool { return a.String() < b.String() }) {
		hr := fs.hosts[h]
		if skip[h] || hr.status == nil {
			continue
		}
		if *hr.status != "unreachable" && hr.staleSince > m.settle {
			lost = append(lost, fmt.Sprintf("%s: heartbeat stale for %s past the threshold, status still %q (rule 1)", ids.Host(h), hr.staleSince.Round(time.Second), *hr.status))
		}
	}
	byHost := map[uuid.UUID][]sandboxRow{}
	for _, s := range fs.sandboxes {
		byHost[s.host] = append(byHost[s.host], s)
	}
	for _, h := range sortedKeys(byHost, func(a, b uuid.UUID) bool { return a.String() < b.String() }) {
		hr, ok := fs.hosts[h]
		if !ok || skip[h] || !fs.answering[h] || hr.status == nil || *hr.status != status.HostOnline || hr.address == nil || *hr.address == "" || hr.staleSince > 0 {
			continue
		}
		hasPaused := func(vms map[uuid.UUID]string) bool {
			for _, l := range vms {
				if l == status.Paused {
					return true
				}
			}
			return false
		}
		for _, row := range byHost[h] {
			w1, _ := m.pending(row, fs.before[h], hasPaused(fs.before[h]), fs.now)
			w2, _ := m.pending(row, fs.after[h], hasPaused(fs.after[h]), fs.now)
			if w1 == "" || w2 == "" {
				continue // not due in both agent snapshots: a change in flight
			}
			lost = append(lost, fmt.Sprintf("%s %s: %s (last updated %s before the end)", ids.Host(h), ids.Sandbox(row.id), w2, fs.now.Sub(row.lastUpdated).Round(time.Second)))
		}
	}
	return lost
}

// stuckRow is a sandbox whose destroy the harness made the control plane
// lose: the row set stopping while its VM ran on.
type stuckRow struct {
	host     uuid.UUID
	at       time.Time // just after the row went stopping
	refusing bool      // its agent refused every destroy for a while (agentsim's refuse-destroy)
}

// destroyAudit is a sandbox's destroy audit row that finishes a stopping
// row: reason destroy_retry (rule 9) or transient_timeout_inferred (rule 6).
type destroyAudit struct {
	reason string
	txid   int64
	at     time.Time // created_at: its transaction's start
}

// retryClaim is a re-send of a stuck destroy as vigil's fenced check
// claimed it (vigil_destroy_retries), before the DestroySandbox went out.
type retryClaim struct {
	at          time.Time // retried_at: the claiming transaction's start
	committedAt time.Time
}

// rule9History is what the stuck-destroy check reads.
type rule9History struct {
	stuck    map[uuid.UUID]stuckRow
	journal  []journalRow                           // commit order
	audits   map[uuid.UUID][]destroyAudit           // by sandbox, oldest first
	claims   map[uuid.UUID][]retryClaim             // committed claims by sandbox, oldest first
	accepted map[uuid.UUID][]agentsim.DestroyRecord // by host: the agents' accepted DestroySandbox calls
	rejected map[uuid.UUID][]agentsim.DestroyRecord // by host: refused and stale-fence ones
	grace    time.Duration
}

// rule9Stats are the figures of the stuck destroys.
type rule9Stats struct {
	stuck, refusing, dissolved         int // rows with a lost destroy; of them on a refusing agent; moved on (missing) first
	claims, accepted, refused, stale   int // re-sends claimed; DestroySandbox calls the agents accepted, refused, rejected for a stale token
	stoppedRetry, stoppedRule6, audits int // stopped with destroy_retry; by rule 6 after an accepted re-send; destroy_retry rows
	withinGrace                        int // calls reaching an agent within a grace of the previous (a deposed owner's late call)
}

// rule9Slack absorbs the two clocks (the database's and the harness's, on
// one machine) and the scheduling between a call and its record.
const rule9Slack = 500 * time.Millisecond

// accepted reports whether the agent took the destroy (not_found counts).
func destroyAccepted(d agentsim.DestroyRecord) bool {
	return d.Result == agentsim.DestroyDestroyed || d.Result == agentsim.DestroyNotFound
}

// stuckDestroys judges SPEC §2 rule 9 on the rows whose destroy was lost
// (the final state's side, a stopping row still alive on its agent past the
// grace, is the lost-transition check's):
//   - the destroy is re-sent only once the row is past the transient grace,
//     each re-send claimed (fenced) at least a grace after the previous
//     claim, and every call that reached the agent stands for a claim of its
//     own: at most once per grace, refused or not;
//   - the row reaches stopped only after its agent accepted a re-sent
//     destroy (nothing else removes that VM): in the transaction that wrote
//     its one destroy_retry audit row, after the destroy the last claim sent
//     was accepted, or by rule 6 (transient_timeout_inferred) once the VM
//     was gone (a re-send accepted, its commit lost with its owner);
//   - every destroy_retry audit row is in the transaction of its sandbox's
//     stopping -> stopped, one per stop, after a destroy its agent accepted.
//
// A stuck row the passive rule moved to missing (its host went unreachable)
// is no longer stuck and is not judged here.
func stuckDestroys(in rule9History) (bad []string, st rule9Stats) {
	calls := map[string][]agentsim.DestroyRecord{} // wire sandbox id -> calls that reached its agent, oldest first
	for _, m := range []map[uuid.UUID][]agentsim.DestroyRecord{in.accepted, in.rejected} {
		for _, ds := range m {
			for _, d := range ds {
				calls[d.Sandbox] = append(calls[d.Sandbox], d)
			}
		}
	}
	for _, ds := range calls {
		sort.SliceStable(ds, func(i, j int) bool { return ds[i].Time.Before(ds[j].Time) })
	}
	first := map[uuid.UUID]journalRow{} // the first change vigil committed to each stuck row after it went stopping
	for _, r := range in.journal {
		if _, ok := in.stuck[r.sandbox.UUID]; ok && r.sandbox.Valid && strings.HasPrefix(r.change, "stopping->") {
			if _, seen := first[r.sandbox.UUID]; !seen {
				first[r.sandbox.UUID] = r
			}
		}
	}
	st.stuck = len(in.stuck)
	for _, id := range sortedKeys(in.stuck, func(a, b uuid.UUID) bool { return a.String() < b.String() }) {
		bad = append(bad, in.judgeStuck(id, calls[ids.Sandbox(id)], first, &st)...)
	}
	bad = append(bad, in.retryAuditsTied(calls, &st)...)
	return bad, st
}

// judgeStuck judges one stuck row: its re-sends, then its stop.
func (in rule9History) judgeStuck(id uuid.UUID, calls []agentsim.DestroyRecord, first map[uuid.UUID]journalRow, st *rule9Stats) (bad []string) {
	sr := in.stuck[id]
	where := ids.Host(sr.host) + " " + ids.Sandbox(id)
	if sr.refusing {
		st.refusing++
	}
	ch, changed := first[id]
	if changed && ch.change != "stopping->"+status.Stopped {
		st.dissolved++
		return nil
	}
	claims := in.claims[id]
	st.claims += len(claims)
	for i := 1; i < len(claims); i++ {
		if gap := claims[i].at.Sub(claims[i-1].at); gap < in.grace {
			bad = append(bad, fmt.Sprintf("%s: destroy re-sent (claimed at %s) %s after the previous re-send, within the transient grace of %s",
				where, claims[i].at.Format("15:04:05.000"), gap.Round(time.Millisecond), in.grace))
		}
	}
	used := 0 // claims matched to calls, oldest first
	for i, d := range calls {
		switch {
		case destroyAccepted(d):
			st.accepted++
		case d.Result == agentsim.DestroyRefused:
			st.refused++
		case d.Result == agentsim.DestroyStaleFence:
			st.stale++
		}
		if i == 0 && d.Time.Sub(sr.at) < in.grace-rule9Slack {
			bad = append(bad, fmt.Sprintf("%s: destroy re-sent %s after the row went stopping, within the transient grace of %s",
				where, d.Time.Sub(sr.at).Round(time.Millisecond), in.grace))
		}
		if i > 0 && d.Time.Sub(calls[i-1].Time) < in.grace-rule9Slack {
			st.withinGrace++
		}
		if used < len(claims) && !claims[used].at.After(d.Time.Add(rule9Slack)) {
			used++
		} else {
			bad = append(bad, fmt.Sprintf("%s: DestroySandbox (%s) reached its agent at %s with no re-send claimed for it: more than one call per claim",
				where, d.Result, d.Time.Format("15:04:05.000")))
		}
	}
	if changed {
		bad = append(bad, in.judgeStop(where, id, ch, calls, st)...)
	}
	return bad
}

// judgeStop judges a stuck row's stopping -> stopped.
func (in rule9History) judgeStop(where string, id uuid.UUID, ch journalRow, calls []agentsim.DestroyRecord, st *rule9Stats) []string {
	var mine []destroyAudit
	for _, a := range in.audits[id] {
		if a.txid == ch.txid && ch.txid != 0 {
			mine = append(mine, a)
		}
	}
	if len(mine) != 1 {
		return []string{fmt.Sprintf("%s: stopped by %s (journal seq %d) in a transaction with %d destroy audit rows for it, want one (destroy_retry)",
			where, ch.replica, ch.seq, len(mine))}
	}
	var since time.Time // destroy_retry: the destroy accepted must be the one of the last claim before the stop
	if mine[0].reason == "destroy_retry" {
		st.stoppedRetry++
		for _, c := range in.claims[id] {
			if c.committedAt.Before(ch.committedAt) {
				since = c.at.Add(-rule9Slack)
			}
		}
		if since.IsZero() {
			return []string{fmt.Sprintf("%s: stopped with destroy_retry by %s (journal seq %d) with no re-send ever claimed", where, ch.replica, ch.seq)}
		}
	} else {
		st.stoppedRule6++
	}
	for _, d := range calls {
		if destroyAccepted(d) && !d.Time.Before(since) && !d.Time.After(ch.committedAt.Add(rule9Slack)) {
			return nil
		}
	}
	return []string{fmt.Sprintf("%s: stopped (%s) by %s at %s (journal seq %d) while its VM was alive: no re-sent destroy accepted by its agent before it",
		where, mine[0].reason, ch.replica, ch.committedAt.Format("15:04:05.000"), ch.seq)}
}

// retryAuditsTied checks every destroy_retry audit row: in the transaction
// of its sandbox's stopping -> stopped, one per stop, after a destroy its
// agent accepted.
func (in rule9History) retryAuditsTied(calls map[string][]agentsim.DestroyRecord, st *rule9Stats) (bad []string) {
	type stop struct {
		txid    int64
		sandbox uuid.UUID
	}
	stops := map[stop]bool{}
	for _, r := range in.journal {
		if r.sandbox.Valid && r.change == "stopping->"+status.Stopped {
			stops[stop{r.txid, r.sandbox.UUID}] = true
		}
	}
	per := map[stop]int{}
	for _, id := range sortedKeys(in.audits, func(a, b uuid.UUID) bool { return a.String() < b.String() }) {
		wire := ids.Sandbox(id)
		for _, a := range in.audits[id] {
			if a.reason != "destroy_retry" {
				continue
			}
			st.audits++
			k := stop{a.txid, id}
			if per[k]++; per[k] == 2 {
				bad = append(bad, fmt.Sprintf("%s: two destroy_retry audit rows in one transaction (%d): one change, one row", wire, a.txid))
			}
			if !stops[k] {
				bad = append(bad, fmt.Sprintf("%s: destroy_retry audit row at %s not in the transaction of its stopping -> stopped", wire, a.at.Format("15:04:05.000")))
			}
			ok := false
			for _, d := range calls[wire] {
				ok = ok || (destroyAccepted(d) && !d.Time.After(a.at.Add(rule9Slack)))
			}
			if !ok {
				bad = append(bad, fmt.Sprintf("%s: destroy_retry audit row at %s without a destroy its agent accepted before", wire, a.at.Format("15:04:05.000")))
			}
		}
	}
	return bad
}

// forbiddenWrites finds journal rows vigil must never have written: rows of
// hosts no agent stands behind, quarantined sandbox rows (damaged ones
// included: NULL team, NULL or foreign status, no host), and writes to a
// sandbox on a host it had been moved away from.
func forbiddenWrites(journal []journalRow, moves []sandboxMove, badHosts, quarantined map[uuid.UUID]string) (out []string) {
	movedAway := map[[2]uuid.UUID]int64{} // (sandbox, host) -> commit seq of the last move away from host
	movedBack := map[[2]uuid.UUID]int64{} // (sandbox, host) -> commit seq of the last move onto host
	for _, mv := range moves {
		movedAway[[2]uuid.UUID{mv.sandbox, mv.from}] = mv.commitSeq
		movedBack[[2]uuid.UUID{mv.sandbox, mv.to}] = mv.commitSeq
	}
	for _, r := range journal {
		if what, ok := badHosts[r.host]; ok {
			out = append(out, fmt.Sprintf("%s (%s): %s written by %s", ids.Host(r.host), what, r.change, r.replica))
		}
		if !r.sandbox.Valid {
			continue
		}
		if what, ok := quarantined[r.sandbox.UUID]; ok {
			out = append(out, fmt.Sprintf("%s (%s): %s written by %s", ids.Sandbox(r.sandbox.UUID), what, r.change, r.replica))
		}
		key := [2]uuid.UUID{r.sandbox.UUID, r.host}
		if away, ok := movedAway[key]; ok && r.commitSeq > away && movedBack[key] < away {
			out = append(out, fmt.Sprintf("%s: %s written on %s by %s after the row had moved to another host", ids.Sandbox(r.sandbox.UUID), r.change, ids.Host(r.host), r.replica))
		}
	}
	return out
}

// ownership checks every journal row against etcd's record: its token must
// have been an owner key of its shard held by the writing replica.
func (e *env) ownership(journal []journalRow) (wrong []string, late int) {
	for _, r := range journal {
		owner, _, released, found := e.rec.Tenure(r.shard, r.token)
		switch {
		case !found:
			wrong = append(wrong, fmt.Sprintf("write by %s on shard %d under token %d, never an owner key of the shard", r.replica, r.shard, r.token))
		case owner != r.replica:
			wrong = append(wrong, fmt.Sprintf("write by %s on shard %d under token %d, which %s held", r.replica, r.shard, r.token, owner))
		case !released.IsZero() && r.writtenAt.After(released):
			late++
		}
	}
	return wrong, late
}

// crashes lists replicas that exited without the harness ending them, and
// panics in any replica's log.
func (e *env) crashes() []string {
	e.mu.Lock()
	ms := append([]*member(nil), e.members...)
	e.mu.Unlock()
	var out []string
	for _, m := range ms {
		if m.r.Exited() && m.intended() == "" {
			out = append(out, fmt.Sprintf("replica %s exited on its own: %s (log %s)", m.id, m.r.ExitString(), m.logPath))
		}
		if b, err := os.ReadFile(m.logPath); err == nil && (strings.Contains(string(b), "panic:") || strings.Contains(string(b), "fatal error:")) {
			out = append(out, fmt.Sprintf("replica %s panicked (log %s)", m.id, m.logPath))
		}
	}
	return out
}
