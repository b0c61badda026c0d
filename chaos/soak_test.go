package chaos

import (
	"image/png"
	"math"
	"os"
	"path/filepath"
	"testing"
	"time"
)

// synthetic samples: every series flat with noise, but series grow (if >= 0)
// rising by rise (relative to its level) over the run.
func syntheticSamples(grow int, rise float64) []soakSample {
	var out []soakSample
	for k := 0; k <= 240; k++ {
		at := time.Duration(k) * 30 * time.Second
		s := soakSample{at: at, values: make([]float64, len(soakSeries))}
		for i := range s.values {
			level := 1000.0
			s.values[i] = level + 10*math.Sin(float64(k))
			if i == grow {
				s.values[i] += level * rise * float64(k) / 240
			}
		}
		out = append(out, s)
	}
	return out
}

func TestJudgeSoak(t *testing.T) {
	flat := judgeSoak(syntheticSamples(-1, 0), 30*time.Minute)
	if flat.Failed() {
		t.Fatalf("flat series judged growing: %+v", flat.Fits)
	}
	for i, sr := range soakSeries {
		res := judgeSoak(syntheticSamples(i, 3.0), 30*time.Minute) // fourfold over the run
		if got, want := res.Failed(), sr.maxGrow >= 0; got != want {
			t.Errorf("%s growing fourfold: failed %v, want %v (growth %.2f)", sr.name, got, want, res.Fits[i].growth)
		}
	}
	// A rise within the warm-up that then holds still is not a leak.
	s := syntheticSamples(-1, 0)
	for k := range s {
		if s[k].at < 30*time.Minute {
			s[k].values[0] = 100 + float64(k)*10
		}
	}
	if res := judgeSoak(s, 30*time.Minute); res.Fits[0].failed {
		t.Errorf("a warm-up rise judged a leak: %+v", res.Fits[0])
	}
	if res := judgeSoak(s[:2], 0); !res.Failed() {
		t.Errorf("two samples cannot pass a soak")
	}
}

func TestSoakResultsWritten(t *testing.T) {
	dir := t.TempDir()
	res := judgeSoak(syntheticSamples(0, 1.0), 30*time.Minute)
	res.Faults["kill"] = 3
	res.Config = SoakConfig(Config{Duration: 2 * time.Hour})
	if err := res.write(dir, SoakOptions{Every: 30 * time.Second}); err != nil {
		t.Fatal(err)
	}
	for _, name := range []string{"soak.md", "samples.csv"} {
		if b, err := os.ReadFile(filepath.Join(dir, name)); err != nil || len(b) == 0 {
			t.Errorf("%s: %v (%d bytes)", name, err, len(b))
		}
	}
	f, err := os.Open(filepath.Join(dir, "soak.png"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	img, err := png.Decode(f)
	if err != nil {
		t.Fatal(err)
	}
	if b := img.Bounds(); b.Dx() < 500 || b.Dy() < 500 {
		t.Errorf("plot %v", b)
	}
}
