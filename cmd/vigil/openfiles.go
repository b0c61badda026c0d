//go:build unix

package main

import (
	"syscall"

	"github.com/hashicorp/go-hclog"
)

// checkOpenFiles warns when the process may run out of file descriptors: a
// replica holds an idle connection per agent it keeps (--agent-max-idle),
// one per call in flight, its Postgres pool, etcd and its admin listener.
// Running out shows up as failed dials, i.e. agents that look unreachable,
// so the limit is worth a line at start. Containers and systemd units give
// tens of thousands (LimitNOFILE; deploy/ sets it).
func checkOpenFiles(c replicaConfig, log hclog.Logger) {
	var lim syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
		return
	}
	need := uint64(c.AgentMaxIdle + c.AgentConcurrency + c.DBMaxConns + 64)
	if lim.Cur < need {
		log.Warn("open-files limit is below what this replica may hold; raise it (ulimit -n, LimitNOFILE) or lower --agent-max-idle",
			"limit", lim.Cur, "hard_limit", lim.Max, "needed", need)
	}
}
