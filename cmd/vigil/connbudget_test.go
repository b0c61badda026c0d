package main

import (
	"testing"

	"github.com/vigil-sh/vigil/agentpool"
)

func TestAgentConnBudget(t *testing.T) {
	c := replicaConfig{AgentConcurrency: 128, DBMaxConns: 16}
	for _, tc := range []struct {
		limit uint64
		known bool
		want  int
	}{
		{20000, true, 20000 - 128 - 16 - fdReserve}, // this kind of machine
		{65536, true, 65536 - 400},                  // deploy/systemd's LimitNOFILE
		{1 << 20, true, maxAgentConns},              // a container runtime's default
		{1024, true, 1024 - 400},                    // a login shell's default
		{300, true, 1},                              // nothing left: still one
		{0, false, agentpool.DefaultMaxIdleConns},   // unknown limit
	} {
		if got := agentConnBudget(tc.limit, tc.known, c); got != tc.want {
			t.Errorf("agentConnBudget(%d, %v) = %d, want %d", tc.limit, tc.known, got, tc.want)
		}
	}
}
