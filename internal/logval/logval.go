// Package logval bounds what vigil logs of values it does not control: rows
// of the control plane's database (a host's address, a status) and host
// agents' answers (sandbox ids, labels, error messages). One such value can
// be megabytes; a log line carries a bounded part of it and says how long it
// was.
package logval

import (
	"strconv"
	"strings"
	"unicode/utf8"
)

// Limit is how many bytes of a value a log line keeps.
const Limit = 128

// ErrLimit is how many bytes of an error message a log line keeps: more than
// a value's, since the message is mostly vigil's own context around the
// foreign part, and its end (the root cause: "no such host", "certificate
// signed by unknown authority") is kept too.
const (
	ErrLimit = 512
	errTail  = 128
)

// String returns s when it is at most Limit bytes of valid UTF-8. A longer s
// is cut to its first Limit bytes (back to the last whole character) and
// followed by "…(N bytes)", N being len(s). Each run of invalid UTF-8 in what
// is kept becomes one U+FFFD, so the line stays valid text.
func String(s string) string { return cut(s, Limit, 0) }

// Err is err's message bounded like String, to ErrLimit bytes: a longer one
// keeps its beginning and its last bytes around "…(N bytes)…". It is "" for
// a nil err. Errors from agents and drivers quote what they were given (an
// address, an agent's own message), so their text is bounded like any
// other value.
func Err(err error) string {
	if err == nil {
		return ""
	}
	return cut(err.Error(), ErrLimit-errTail, errTail)
}

// cut returns s when it is at most head+tail bytes of valid UTF-8;
// otherwise its first head and last tail bytes (whole characters) around
// the length of s.
func cut(s string, head, tail int) string {
	if len(s) <= head+tail {
		if utf8.ValidString(s) {
			return s
		}
		return strings.ToValidUTF8(s, "\uFFFD")
	}
	h := head
	// s[h] is the first byte dropped: while it continues a character, drop
	// that character's first bytes too (at most UTFMax-1 of them; more are
	// invalid bytes, which ToValidUTF8 replaces).
	for h > head-utf8.UTFMax && !utf8.RuneStart(s[h]) {
		h--
	}
	out := strings.ToValidUTF8(s[:h], "\uFFFD") + "…(" + strconv.Itoa(len(s)) + " bytes)"
	if tail == 0 {
		return out
	}
	t := len(s) - tail
	for t < len(s)-tail+utf8.UTFMax-1 && !utf8.RuneStart(s[t]) {
		t++
	}
	return out + "…" + strings.ToValidUTF8(s[t:], "\uFFFD")
}
