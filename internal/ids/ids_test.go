package ids

import (
	"errors"
	"math/big"
	"strings"
	"testing"

	"github.com/google/uuid"
)

func TestVectors(t *testing.T) {
	cases := []struct {
		uuid string
		host bool
		want string
	}{
		{"00000000-0000-0000-0000-000000000000", false, "cl-0000000000000000000000000"},
		{"6ba7b810-9dad-11d1-80b4-00c04fd430c8", false, "cl-6dfzh5ik5uxynzmlf5cshamdk"},
		{"ffffffff-ffff-ffff-ffff-ffffffffffff", true, "host-f5lxx1zz5pnorynqglhzmsp33"},
	}
	for _, c := range cases {
		u := uuid.MustParse(c.uuid)
		var got string
		var back uuid.UUID
		var err error
		if c.host {
			got = Host(u)
			back, err = ParseHost(got)
		} else {
			got = Sandbox(u)
			back, err = ParseSandbox(got)
		}
		if got != c.want {
			t.Errorf("encode %s = %s, want %s", c.uuid, got, c.want)
		}
		if err != nil || back != u {
			t.Errorf("parse %s = %s, %v; want %s", got, back, err, u)
		}
	}
}

func TestMatchesBigInt(t *testing.T) {
	for i := 0; i < 2000; i++ {
		u := uuid.New()
		if i%7 == 0 {
			u[0], u[8] = 0, 0xff
		}
		want := new(big.Int).SetBytes(u[:]).Text(36)
		want = strings.Repeat("0", Width-len(want)) + want
		if got := Sandbox(u); got != SandboxPrefix+want {
			t.Fatalf("Sandbox(%s) = %s, want cl-%s", u, got, want)
		}
	}
}

func TestParseRejects(t *testing.T) {
	bad := []string{
		"",
		"cl-",
		"cl-000000000000000000000000",   // 24 digits
		"cl-00000000000000000000000000", // 26 digits
		"host-0000000000000000000000000",
		"cl-000000000000000000000000A",
		"cl-00000000000000000000000-0",
		"cl-zzzzzzzzzzzzzzzzzzzzzzzzz", // 36^25-1 > 2^128-1
		"cl-f5lxx1zz5pnorynqglhzmsp34", // 2^128
	}
	for _, s := range bad {
		if _, err := ParseSandbox(s); !errors.Is(err, ErrMalformed) {
			t.Errorf("ParseSandbox(%q) err = %v, want ErrMalformed", s, err)
		}
	}
}

func FuzzRoundTrip(f *testing.F) {
	f.Add([]byte{0}, "cl-6dfzh5ik5uxynzmlf5cshamdk")
	f.Add([]byte{0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff}, "host-f5lxx1zz5pnorynqglhzmsp33")
	f.Fuzz(func(t *testing.T, raw []byte, s string) {
		var u uuid.UUID
		copy(u[:], raw)
		enc := Sandbox(u)
		if len(enc) != len(SandboxPrefix)+Width {
			t.Fatalf("Sandbox(%s) = %q: wrong length", u, enc)
		}
		back, err := ParseSandbox(enc)
		if err != nil || back != u {
			t.Fatalf("round trip %s -> %s -> %s, %v", u, enc, back, err)
		}
		// Any string that parses must encode back to itself.
		if v, err := ParseHost(s); err == nil && Host(v) != s {
			t.Fatalf("ParseHost(%q) = %s, re-encodes to %q", s, v, Host(v))
		}
	})
}

func TestTeam(t *testing.T) {
	if got := Team(uuid.MustParse("6ba7b810-9dad-11d1-80b4-00c04fd430c8")); got != "team-6dfzh5ik5uxynzmlf5cshamdk" {
		t.Fatalf("Team = %s", got)
	}
}
