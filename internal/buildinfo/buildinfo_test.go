package buildinfo

import (
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
)

func TestStampedBuildWins(t *testing.T) {
	defer func(v, r string) { version, revision = v, r }(version, revision)
	version, revision = "v1.2.3", "0123abcd"
	i := Get()
	if i.Version != "v1.2.3" || i.Revision != "0123abcd" || i.GoVersion == "" {
		t.Fatalf("Get() = %+v", i)
	}
	if got, want := i.String(), "vigil v1.2.3 (revision 0123abcd, "; !strings.HasPrefix(got, want) {
		t.Fatalf("String() = %q, want prefix %q", got, want)
	}
}

func TestUnstampedBuildIsNeverEmpty(t *testing.T) {
	defer func(v, r string) { version, revision = v, r }(version, revision)
	version, revision = "", ""
	i := Get()
	if i.Version != "dev" || i.Revision == "" {
		t.Fatalf("Get() = %+v: want version dev and some revision", i)
	}
}

func TestCollectorIsOneSeriesWithTheBuild(t *testing.T) {
	defer func(v, r string) { version, revision = v, r }(version, revision)
	version, revision = "v9", "feed"
	reg := prometheus.NewPedanticRegistry()
	reg.MustRegister(NewCollector())
	want := `# HELP vigil_build_info Always 1; the labels say which build this replica runs.
# TYPE vigil_build_info gauge
vigil_build_info{goversion="` + Get().GoVersion + `",revision="feed",version="v9"} 1
`
	if err := testutil.GatherAndCompare(reg, strings.NewReader(want), "vigil_build_info"); err != nil {
		t.Fatal(err)
	}
}
