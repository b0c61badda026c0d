package logval

import (
	"errors"
	"strconv"
	"strings"
	"testing"
	"unicode/utf8"
)

func TestString(t *testing.T) {
	long := strings.Repeat("a", 100<<10)
	euro := strings.Repeat("a", Limit-1) + "€tail" // "€" is 3 bytes and straddles the cut
	for _, tc := range []struct {
		name, in, want string
	}{
		{"empty", "", ""},
		{"short", "10.0.0.7:5007", "10.0.0.7:5007"},
		{"exactly the limit", strings.Repeat("b", Limit), strings.Repeat("b", Limit)},
		{"one byte over", strings.Repeat("b", Limit+1), strings.Repeat("b", Limit) + "…(129 bytes)"},
		{"100 KiB", long, strings.Repeat("a", Limit) + "…(102400 bytes)"},
		{"cut before a split character", euro, strings.Repeat("a", Limit-1) + "…(" + strconv.Itoa(len(euro)) + " bytes)"},
		{"invalid UTF-8 short", "ok\xffok", "ok\uFFFDok"},
		{"invalid UTF-8 long", "\xff" + strings.Repeat("c", Limit), "\uFFFD" + strings.Repeat("c", Limit-1) + "…(129 bytes)"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got := String(tc.in)
			if got != tc.want {
				t.Fatalf("String = %q, want %q", got, tc.want)
			}
			if !utf8.ValidString(got) {
				t.Fatalf("String = %q is not valid UTF-8", got)
			}
		})
	}
}

func TestStringIsBounded(t *testing.T) {
	// Whatever the input: at most Limit bytes kept, each of which may
	// become a 3-byte U+FFFD, and a suffix naming a length.
	for _, n := range []int{0, 1, Limit - 1, Limit, Limit + 1, 4 << 20} {
		for _, unit := range []string{"x", "é", "€", "😀", "\xff", "\x80\x80"} {
			in := strings.Repeat(unit, n/len(unit)+1)
			if got := String(in); len(got) > 3*Limit+len("…( bytes)")+20 {
				t.Fatalf("String of %d × %q is %d bytes", n, unit, len(got))
			}
		}
	}
}

func TestErr(t *testing.T) {
	if got := Err(nil); got != "" {
		t.Fatalf("Err(nil) = %q", got)
	}
	short := errors.New("agent call failed: unavailable: dial tcp 10.0.0.7:5007: connect: connection refused")
	if got := Err(short); got != short.Error() {
		t.Fatalf("Err = %q, want it whole", got)
	}
	exact := errors.New(strings.Repeat("e", ErrLimit))
	if got := Err(exact); got != exact.Error() {
		t.Fatalf("Err of %d bytes cut to %q", ErrLimit, got)
	}
	// A huge value inside: the beginning and the root cause stay.
	long := errors.New("agent call failed: unavailable: dial tcp: lookup " + strings.Repeat("g", 100<<10) + ": no such host")
	got := Err(long)
	want := long.Error()[:ErrLimit-errTail] + "…(" + strconv.Itoa(len(long.Error())) + " bytes)…" + long.Error()[len(long.Error())-errTail:]
	if got != want {
		t.Fatalf("Err = %q, want %q", got, want)
	}
	if !strings.HasPrefix(got, "agent call failed: unavailable: dial tcp: lookup ggg") || !strings.HasSuffix(got, "ggg: no such host") {
		t.Fatalf("Err = %q lost its beginning or its end", got)
	}
	// Characters split at either cut are dropped whole.
	split := errors.New("x" + strings.Repeat("€", 1000)) // 3-byte characters across both cuts
	if got := Err(split); !utf8.ValidString(got) || strings.Contains(got, "\uFFFD") || len(got) > ErrLimit+len("……( bytes)")+4 {
		t.Fatalf("Err = %q (%d bytes)", got, len(got))
	}
}
