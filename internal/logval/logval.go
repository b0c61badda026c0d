// Package logval bounds what vigil logs of values it does not control: rows
// of the control plane's database (a host's address, a status) and host
// agents' answers (sandbox ids, labels, error messages). One such value can
// be megabytes; a log line carries at most Limit bytes of it and says how
// long it was.
package logval

import (
	"strconv"
	"strings"
	"unicode/utf8"
)

// Limit is how many bytes of a value a log line keeps.
const Limit = 128

// String returns s when it is at most Limit bytes of valid UTF-8. A longer s
// is cut to its first Limit bytes (back to the last whole character) and
// followed by "…(N bytes)", N being len(s). Each run of invalid UTF-8 in what
// is kept becomes one U+FFFD, so the line stays valid text.
func String(s string) string {
	if len(s) <= Limit && utf8.ValidString(s) {
		return s
	}
	kept, cut := s, false
	if len(s) > Limit {
		n := Limit
		// s[n] is the first byte dropped: while it continues a character,
		// drop that character's first bytes too (at most UTFMax-1 of
		// them; more are invalid bytes, which ToValidUTF8 replaces).
		for n > Limit-utf8.UTFMax && !utf8.RuneStart(s[n]) {
			n--
		}
		kept, cut = s[:n], true
	}
	kept = strings.ToValidUTF8(kept, "\uFFFD")
	if !cut {
		return kept
	}
	return kept + "…(" + strconv.Itoa(len(s)) + " bytes)"
}

// Err is String of err's message; "" for a nil err. Errors from agents and
// drivers quote what they were given (an address, an agent's own message),
// so their text is bounded like any other value.
func Err(err error) string {
	if err == nil {
		return ""
	}
	return String(err.Error())
}
