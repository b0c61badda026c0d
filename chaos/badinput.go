package chaos

import (
	"context"
	"fmt"
	"time"

	"github.com/google/uuid"

	"github.com/vigil-sh/vigil/agentsim"
	"github.com/vigil-sh/vigil/internal/status"
)

// badInput is what the control plane's database accumulates and vigil must
// survive in the same run as the faults: each is logged and counted by
// vigil, never a crash, never a write to another row, and the rest of the
// shard is reconciled as usual (the lost-transition check covers every
// other host, the bad hosts' shard neighbours included).
type badInput struct {
	// excluded hosts are left out of the lost-transition check: hosts that
	// are not agentsim's, or whose row was deleted, or that carry an
	// address vigil must not be able to use.
	excluded map[uuid.UUID]bool
	// badHosts are host rows no agent stands behind, heartbeated by the
	// harness so they stay online: vigil must never write their rows.
	badHosts map[uuid.UUID]string // id -> what is wrong with it
	// quarantined sandbox rows vigil must never write (damaged rows: NULL
	// team or status, a status outside the vocabulary, rows of hosts that
	// do not exist).
	quarantined map[uuid.UUID]string
	// temporary changes to agentsim hosts, undone before the quiet period.
	restore map[uuid.UUID]func(context.Context) error
	// deleted hosts and when their row went.
	deleted map[uuid.UUID]time.Time
	// stuck are rows whose destroy the control plane lost (row stopping,
	// VM still running): SPEC §2 rule 9.
	stuck map[uuid.UUID]stuckRow
}

// createBadHosts adds host rows with addresses and statuses a real control
// plane's database accumulates, each with two sandbox rows.
func (w *workload) createBadHosts(ctx context.Context) error {
	w.bad = badInput{
		excluded: map[uuid.UUID]bool{}, badHosts: map[uuid.UUID]string{}, quarantined: map[uuid.UUID]string{},
		restore: map[uuid.UUID]func(context.Context) error{}, deleted: map[uuid.UUID]time.Time{},
		stuck: map[uuid.UUID]stuckRow{},
	}
	agent := w.sim.Address(w.hosts[0])
	team := w.teams[0]
	type bad struct {
		what, address string
		status        *string
	}
	str := func(s string) *string { return &s }
	online := str(status.HostOnline)
	cases := []bad{
		{"malformed address", "not an address", online},
		{"address with a bad port", "127.1.0.1:99999", online},
		{"address pointing nowhere", "127.0.0.1:1", online},
		{"address with a path", "127.0.0.1:1/hostagent", online},
		{"address with a scheme and a path", "http://127.0.0.1:1/x/y", online},
		{"address with another scheme", "ftp://127.0.0.1:1", online},
		{"empty address", "", online},
		{"status outside the vocabulary", agent, str("draining")},
		{"status offline", agent, str("offline")},
		{"status NULL", agent, nil},
		{"status empty", agent, str("")},
	}
	for i := 0; i < 3; i++ { // enough of each to land in several shards
		for _, c := range cases {
			id := uuid.New()
			if _, err := w.e.db.Exec(ctx, `insert into hosts (id, type, team_id, address, status, last_heartbeat_at)
				values ($1, 'regular', $2, $3, $4, now())`, id, team, c.address, c.status); err != nil {
				return fmt.Errorf("bad host %q: %w", c.what, err)
			}
			w.bad.badHosts[id] = c.what
			w.bad.excluded[id] = true
			for j := 0; j < 2; j++ {
				if _, err := w.e.db.Exec(ctx, `insert into sandboxes (id, team_id, host_id, status) values ($1, $2, $3, 'running')`, uuid.New(), team, id); err != nil {
					return err
				}
			}
		}
	}
	// Agents reached with a scheme in hosts.address are reconciled as usual
	// (SPEC §1.2: the scheme is added when absent).
	for i := 0; i < 10; i++ {
		h := w.hosts[len(w.hosts)-1-i]
		if _, err := w.e.db.Exec(ctx, `update hosts set address = $2 where id = $1`, h, "http://"+w.sim.Address(h)); err != nil {
			return err
		}
		w.count("bad input: agent address with http:// scheme")
	}
	return nil
}

// heartbeatBadHosts keeps the bad hosts' heartbeats fresh, as the control
// plane would for hosts it hears from.
func (w *workload) heartbeatBadHosts(ctx context.Context) {
	ids := make([]uuid.UUID, 0, len(w.bad.badHosts))
	for id := range w.bad.badHosts {
		ids = append(ids, id)
	}
	t := time.NewTicker(time.Second)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		_, _ = w.e.db.Exec(ctx, `update hosts set last_heartbeat_at = now() where id = any($1)`, ids)
	}
}

// startBadInput starts the stream of mid-run bad input; it ends with the
// other workload loops (stopLoops).
func (w *workload) startBadInput() {
	w.loops.Add(1)
	go func() {
		defer w.loops.Done()
		t := time.NewTicker(700 * time.Millisecond)
		defer t.Stop()
		for {
			select {
			case <-w.loopCtx.Done():
				return
			case <-t.C:
			}
			if err := w.badOnce(w.loopCtx); err != nil && w.loopCtx.Err() == nil && !isNoRows(err) {
				w.count("bad input failed")
			}
		}
	}()
}

// badOnce writes one piece of bad input.
func (w *workload) badOnce(ctx context.Context) error {
	switch k := w.intn(11); k {
	case 0, 1: // a sandbox moved to another host mid-pass
		var id, from uuid.UUID
		err := w.e.db.QueryRow(ctx, `select id, host_id from sandboxes where host_id = any($1) and status = 'running' order by random() limit 1`, w.hosts).Scan(&id, &from)
		if err != nil {
			return err
		}
		to := w.randomHost()
		if to == from {
			return nil
		}
		tx, err := w.e.db.Begin(ctx)
		if err != nil {
			return err
		}
		defer tx.Rollback(ctx)
		tag, err := tx.Exec(ctx, `update sandboxes set host_id = $2 where id = $1 and host_id = $3`, id, to, from)
		if err != nil || tag.RowsAffected() != 1 {
			return err
		}
		if _, err := tx.Exec(ctx, `insert into chaos_moves (sandbox_id, from_host, to_host) values ($1, $2, $3)`, id, from, to); err != nil {
			return err
		}
		if err := tx.Commit(ctx); err != nil {
			return err
		}
		w.count("bad input: sandbox moved to another host")
	case 2: // a zombie: the control plane stopped a row whose VM stays paused
		id, h, ok := w.sandboxOn(ctx, w.hosts, status.Paused)
		if !ok || w.isBusy(id) {
			return nil
		}
		if vmStatus(w.sim.VMs(h), id) != status.Paused {
			return nil
		}
		if err := w.cas(ctx, id, status.Paused, status.Stopped); err != nil {
			return nil
		}
		w.count("bad input: zombie (stopped row, paused VM)")
	case 3: // rows vigil must never write
		h := w.randomHost()
		kinds := []struct {
			what   string
			team   any
			status any
			host   uuid.UUID
		}{
			{"sandbox with NULL team", nil, status.Running, h},
			{"sandbox with a status outside the vocabulary", w.teams[0], "hibernating", h},
			{"sandbox with NULL status", w.teams[0], nil, h},
			{"sandbox of a host that does not exist", w.teams[0], status.Running, uuid.New()},
		}
		c := kinds[w.intn(len(kinds))]
		id := uuid.New()
		if _, err := w.e.db.Exec(ctx, `insert into sandboxes (id, team_id, host_id, status) values ($1, $2, $3, $4)`, id, c.team, c.host, c.status); err != nil {
			return err
		}
		w.mu.Lock()
		w.bad.quarantined[id] = c.what
		w.mu.Unlock()
		w.count("bad input: " + c.what)
	case 4: // an agentsim host's address broken for a while
		h := w.randomHost()
		if !w.quarantine(h) {
			return nil
		}
		addrs := []string{"garbage", "127.0.0.1:1", w.sim.Address(h) + "/wrong/path", "127.1.0.1:99999"}
		a := addrs[w.intn(len(addrs))]
		if _, err := w.e.db.Exec(ctx, `update hosts set address = $2 where id = $1`, h, a); err != nil {
			return err
		}
		good := w.sim.Address(h)
		w.setRestore(h, func(ctx context.Context) error {
			_, err := w.e.db.Exec(ctx, `update hosts set address = $2 where id = $1`, h, good)
			return err
		})
		w.count("bad input: host address broken for a while")
	case 5: // an agentsim host's status outside the vocabulary for a while
		h := w.randomHost()
		if !w.quarantine(h) {
			return nil
		}
		sts := []any{"draining", nil, "offline", "Online"}
		s := sts[w.intn(len(sts))]
		if _, err := w.e.db.Exec(ctx, `update hosts set status = $2 where id = $1`, h, s); err != nil {
			return err
		}
		w.setRestore(h, func(ctx context.Context) error {
			_, err := w.e.db.Exec(ctx, `update hosts set status = 'online' where id = $1`, h)
			return err
		})
		w.count("bad input: host status outside the vocabulary for a while")
	case 6: // a host row deleted while its shard is being reconciled
		w.mu.Lock()
		n := len(w.bad.deleted)
		w.mu.Unlock()
		if n >= 8 {
			return nil
		}
		h := w.randomHost()
		if !w.quarantine(h) {
			return nil
		}
		if _, err := w.e.db.Exec(ctx, `delete from hosts where id = $1`, h); err != nil {
			return err
		}
		w.mu.Lock()
		w.bad.deleted[h] = time.Now()
		w.mu.Unlock()
		w.count("bad input: host row deleted")
	case 7: // a destroy the control plane lost: row stopping, VM still running
		w.mu.Lock()
		n := len(w.bad.stuck)
		w.mu.Unlock()
		if n >= 6 {
			return nil
		}
		id, h, ok := w.sandboxOn(ctx, w.hosts, status.Running)
		if !ok || w.isBusy(id) || vmStatus(w.sim.VMs(h), id) != status.Running || !w.quarantine(h) {
			return nil
		}
		if err := w.cas(ctx, id, status.Running, status.Stopping); err != nil {
			return nil
		}
		// The VM ran when the row went stopping, and nothing but vigil's
		// re-sent destroy removes it now: the host is quarantined (no host
		// faults but the one below) and churn acts only on running or
		// paused rows. Half the time its agent refuses every destroy for
		// a while (rule 9: re-sent at most once per grace while refused).
		refusing := w.float() < 0.5
		w.mu.Lock()
		w.bad.stuck[id] = stuckRow{host: h, at: time.Now(), refusing: refusing}
		w.mu.Unlock()
		if refusing {
			w.refuseDestroys(h)
		}
		w.count("bad input: lost destroy (stopping row, VM alive)")
	case 10:
		return w.lostTransient(ctx)
	case 8, 9:
		// a restored temporary change, so hosts come and go
		w.mu.Lock()
		var h uuid.UUID
		var fn func(context.Context) error
		for id, f := range w.bad.restore {
			h, fn = id, f
			break
		}
		w.mu.Unlock()
		if fn == nil {
			return nil
		}
		// The host counts again only once it is restored: a restore that
		// fails (Postgres restarting) stays pending, for the next one or
		// the quiet period's restoreAll.
		if err := fn(ctx); err != nil {
			return err
		}
		w.mu.Lock()
		delete(w.bad.restore, h)
		delete(w.bad.excluded, h)
		w.mu.Unlock()
	}
	return nil
}

// lostTransient is a control-plane operation whose agent side was lost: a
// create never booted (row starting, no VM), a resume or a pause whose VM
// vanished (row resuming or pausing, no VM). Past the transient grace vigil
// moves the row to error (create, resume: capsule.create, capsule.resume,
// its volumes detached) or to paused (capsule.pause): rule 6, and the
// events no other input makes.
func (w *workload) lostTransient(ctx context.Context) error {
	switch w.intn(3) {
	case 0:
		h := w.randomHost()
		if w.excludedHost(h) {
			return nil
		}
		if err := w.insertSandbox(ctx, h, uuid.New(), w.teams[w.intn(len(w.teams))]); err != nil {
			return err
		}
		w.count("bad input: lost create (starting row, no VM)")
		return nil
	case 1:
		return w.loseVM(ctx, status.Paused, status.Resuming, "bad input: lost resume (resuming row, VM gone)")
	}
	return w.loseVM(ctx, status.Running, status.Pausing, "bad input: lost pause (pausing row, VM gone)")
}

// loseVM moves a row from -> via as the control plane does, and its VM
// vanishes from the agent.
func (w *workload) loseVM(ctx context.Context, from, via, what string) error {
	id, h, ok := w.sandboxOn(ctx, w.hosts, from)
	if !ok || w.excludedHost(h) || vmStatus(w.sim.VMs(h), id) != from {
		return nil
	}
	w.mu.Lock()
	if w.busy[id] {
		w.mu.Unlock()
		return nil
	}
	w.busy[id] = true // the churn leaves it alone meanwhile
	w.mu.Unlock()
	defer func() {
		w.mu.Lock()
		delete(w.busy, id)
		w.mu.Unlock()
	}()
	if err := w.cas(ctx, id, from, via); err != nil {
		return nil
	}
	if err := w.sim.RemoveVM(h, id); err != nil {
		return err
	}
	w.count(what)
	return nil
}

// refuseDestroys makes a stuck row's agent refuse every DestroySandbox for
// two and a half transient graces (two or three re-sends); the host-fault
// loop heals it then, like any host fault.
func (w *workload) refuseDestroys(h uuid.UUID) {
	if err := w.sim.SetMode(h, agentsim.Mode{Kind: agentsim.ModeRefuseDestroy}); err != nil {
		return
	}
	w.mu.Lock()
	w.faulty[h] = hostFault{kind: agentsim.ModeRefuseDestroy, until: time.Now().Add(w.e.cfg.TransientGrace * 5 / 2)}
	w.mu.Unlock()
	w.count("bad input: lost destroy on an agent refusing destroys")
}

// quarantine takes an agentsim host out of the checks (and out of the host
// faults); false if it already is.
func (w *workload) quarantine(h uuid.UUID) bool {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.bad.excluded[h] {
		return false
	}
	if _, ok := w.faulty[h]; ok {
		return false
	}
	w.bad.excluded[h] = true
	return true
}

func (w *workload) setRestore(h uuid.UUID, fn func(context.Context) error) {
	w.mu.Lock()
	w.bad.restore[h] = fn
	w.mu.Unlock()
}

func (w *workload) isBusy(id uuid.UUID) bool {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.busy[id]
}

// restoreAll undoes every temporary change; those hosts count again. It
// runs after the loops stopped; a host whose restore fails stays excluded.
func (w *workload) restoreAll(ctx context.Context) error {
	w.mu.Lock()
	rs := w.bad.restore
	w.bad.restore = map[uuid.UUID]func(context.Context) error{}
	w.mu.Unlock()
	for h, fn := range rs {
		if err := fn(ctx); err != nil {
			return err
		}
		w.mu.Lock()
		delete(w.bad.excluded, h)
		w.mu.Unlock()
	}
	return nil
}

func vmStatus(vms []agentsim.VM, id uuid.UUID) string {
	for _, vm := range vms {
		if vm.ID == id {
			return vm.Status
		}
	}
	return ""
}
