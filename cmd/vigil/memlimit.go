package main

import (
	"os"
	"runtime/debug"
	"strconv"
	"strings"

	"github.com/hashicorp/go-hclog"
)

// A replica's memory is mostly live state it keeps on purpose (an idle
// connection and a TLS session per agent it owns); garbage comes on top, and
// by default the Go runtime lets the heap grow to twice the live data before
// collecting. In a container that headroom is what gets a replica OOM-killed.
// So, unless GOMEMLIMIT says otherwise, vigil gives the runtime a soft limit
// of 90 % of its cgroup's memory limit: the GC works harder near it instead
// of the kernel killing the process.
const memLimitShare = 0.9

// cgroupMemoryFiles are where cgroup v2 and v1 publish the memory limit.
var cgroupMemoryFiles = []string{"/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"}

// setMemoryLimit applies the soft limit and says which one is in force.
func setMemoryLimit(log hclog.Logger) {
	if v := os.Getenv("GOMEMLIMIT"); v != "" {
		log.Info("memory limit from GOMEMLIMIT", "gomemlimit", v)
		return
	}
	for _, f := range cgroupMemoryFiles {
		b, err := os.ReadFile(f)
		if err != nil {
			continue
		}
		if limit, ok := parseCgroupLimit(string(b)); ok {
			soft := int64(float64(limit) * memLimitShare)
			debug.SetMemoryLimit(soft)
			log.Info("soft memory limit set from the cgroup's", "cgroup_limit_bytes", limit, "soft_limit_bytes", soft)
			return
		}
	}
}

// parseCgroupLimit reads a memory.max / memory.limit_in_bytes value: "max"
// (v2) or a huge number (v1, no limit) mean none.
func parseCgroupLimit(s string) (int64, bool) {
	s = strings.TrimSpace(s)
	n, err := strconv.ParseInt(s, 10, 64)
	if err != nil || n <= 0 || n >= 1<<60 {
		return 0, false
	}
	return n, true
}
