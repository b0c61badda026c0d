// Package buildinfo says which build of vigil is running: `vigil version`,
// the vigil_build_info metric and the replica's first log line.
//
// `make build` and the image stamp version and revision with -ldflags -X;
// a plain `go build` in a git checkout falls back to the VCS information the
// Go toolchain records (revision, and "-dirty" for uncommitted changes).
package buildinfo

import (
	"fmt"
	"runtime"
	"runtime/debug"

	"github.com/prometheus/client_golang/prometheus"
)

// Set by -ldflags "-X github.com/vigil-sh/vigil/internal/buildinfo.version=...".
var (
	version  string
	revision string
)

// Info identifies one build.
type Info struct {
	Version   string // release or `git describe`; "dev" when unknown
	Revision  string // commit id; "unknown" when unknown
	GoVersion string
}

// Get returns this binary's build information.
func Get() Info {
	i := Info{Version: version, Revision: revision, GoVersion: runtime.Version()}
	if i.Revision == "" {
		i.Revision = vcsRevision()
	}
	if i.Version == "" {
		i.Version = "dev"
	}
	if i.Revision == "" {
		i.Revision = "unknown"
	}
	return i
}

// vcsRevision is the commit the toolchain recorded, "-dirty" when the tree
// had uncommitted changes.
func vcsRevision() string {
	bi, ok := debug.ReadBuildInfo()
	if !ok {
		return ""
	}
	var rev, dirty string
	for _, s := range bi.Settings {
		switch s.Key {
		case "vcs.revision":
			rev = s.Value
		case "vcs.modified":
			if s.Value == "true" {
				dirty = "-dirty"
			}
		}
	}
	if rev == "" {
		return ""
	}
	return rev + dirty
}

// String is the one line `vigil version` prints.
func (i Info) String() string {
	return fmt.Sprintf("vigil %s (revision %s, %s)", i.Version, i.Revision, i.GoVersion)
}

// NewCollector is vigil_build_info: 1, labelled with the build, so that a
// rolling update shows which replicas run what.
func NewCollector() prometheus.Collector {
	i := Get()
	g := prometheus.NewGauge(prometheus.GaugeOpts{
		Name:        "vigil_build_info",
		Help:        "Always 1; the labels say which build this replica runs.",
		ConstLabels: prometheus.Labels{"version": i.Version, "revision": i.Revision, "goversion": i.GoVersion},
	})
	g.Set(1)
	return g
}
