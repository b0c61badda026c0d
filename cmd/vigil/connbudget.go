package main

import (
	"github.com/hashicorp/go-hclog"

	"github.com/vigil-sh/vigil/agentpool"
)

// A replica keeps one connection per agent it calls, so that a sweep dials
// nothing (over mutual TLS a dial is a handshake on both ends). Each is a
// file descriptor; the budget is what the open-files limit leaves after the
// rest of the replica: the calls in flight (a dial each, at most), the
// Postgres pool, and a reserve for etcd, the listeners, peers and logs.
const fdReserve = 256

// maxAgentConns caps the derived budget: a replica owning more hosts than
// this is past any fleet vigil is sized for (docs/performance.md), and a
// limit of a million (containerd's default) must not read as a promise.
const maxAgentConns = 200_000

// agentConnBudget is --agent-max-idle-conns when it is 0 (the default).
// Without a known limit it is agentpool's default.
func agentConnBudget(limit uint64, known bool, c replicaConfig) int {
	if !known {
		return agentpool.DefaultMaxIdleConns
	}
	used := uint64(c.AgentConcurrency + c.DBMaxConns + fdReserve)
	if limit <= used {
		return 1
	}
	return int(min(limit-used, maxAgentConns))
}

// idleConns decides the replica's idle agent connections and says so: a
// budget far below the hosts a replica owns costs a dial (and a handshake)
// per extra host per sweep, which the log line lets an operator see.
func idleConns(c replicaConfig, log hclog.Logger) int {
	limit, known := openFilesLimit()
	if c.AgentMaxIdle > 0 {
		if known && uint64(c.AgentMaxIdle+c.AgentConcurrency+c.DBMaxConns+fdReserve) > limit {
			log.Warn("open-files limit is below what this replica may hold; raise it (ulimit -n, LimitNOFILE) or lower --agent-max-idle-conns",
				"limit", limit, "agent_max_idle_conns", c.AgentMaxIdle, "agent_concurrency", c.AgentConcurrency, "db_max_conns", c.DBMaxConns)
		}
		return c.AgentMaxIdle
	}
	n := agentConnBudget(limit, known, c)
	log.Info("agent connections kept: one per agent, up to what the open-files limit allows",
		"open_files_limit", limit, "agent_max_idle_conns", n)
	if known && n < 1000 {
		log.Warn("the open-files limit leaves few agent connections: agents beyond them are dialled on every call; raise it (ulimit -n, LimitNOFILE)",
			"limit", limit, "agent_max_idle_conns", n)
	}
	return n
}
