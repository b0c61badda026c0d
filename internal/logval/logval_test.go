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
	if got := Err(errors.New(strings.Repeat("e", 1000))); got != strings.Repeat("e", Limit)+"…(1000 bytes)" {
		t.Fatalf("Err = %q", got)
	}
}
