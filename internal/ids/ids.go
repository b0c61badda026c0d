// Package ids converts between database UUIDs and the prefixed identifiers the
// control plane and its host agents use on the wire: a prefix ("cl-" for
// sandboxes, "host-" for hosts, "team-" for teams) followed by the UUID's
// 128-bit value in base 36 (digits, then lowercase letters), left-padded with
// '0' to 25 characters.
package ids

import (
	"errors"
	"fmt"

	"github.com/google/uuid"
)

// Prefixes of the two kinds of identifier.
const (
	SandboxPrefix = "cl-"
	HostPrefix    = "host-"
	TeamPrefix    = "team-"
)

// Width is the number of base-36 digits after the prefix; 36^25 > 2^128.
const Width = 25

const digits = "0123456789abcdefghijklmnopqrstuvwxyz"

// ErrMalformed reports an identifier that is not prefix + 25 base-36 digits
// encoding a value below 2^128.
var ErrMalformed = errors.New("ids: malformed identifier")

// Sandbox returns the wire id of a sandbox ("cl-...").
func Sandbox(u uuid.UUID) string { return SandboxPrefix + encode(u) }

// Host returns the wire id of a host ("host-...").
func Host(u uuid.UUID) string { return HostPrefix + encode(u) }

// Team returns the wire id of a team ("team-...").
func Team(u uuid.UUID) string { return TeamPrefix + encode(u) }

// ParseSandbox parses a "cl-..." identifier.
func ParseSandbox(s string) (uuid.UUID, error) { return parse(SandboxPrefix, s) }

// ParseHost parses a "host-..." identifier.
func ParseHost(s string) (uuid.UUID, error) { return parse(HostPrefix, s) }

// ParseTeam parses a "team-..." identifier.
func ParseTeam(s string) (uuid.UUID, error) { return parse(TeamPrefix, s) }

func encode(u uuid.UUID) string {
	// The value as two 64-bit halves; repeated division by 36.
	hi := uint64(u[0])<<56 | uint64(u[1])<<48 | uint64(u[2])<<40 | uint64(u[3])<<32 |
		uint64(u[4])<<24 | uint64(u[5])<<16 | uint64(u[6])<<8 | uint64(u[7])
	lo := uint64(u[8])<<56 | uint64(u[9])<<48 | uint64(u[10])<<40 | uint64(u[11])<<32 |
		uint64(u[12])<<24 | uint64(u[13])<<16 | uint64(u[14])<<8 | uint64(u[15])
	var out [Width]byte
	for i := Width - 1; i >= 0; i-- {
		var rem uint64
		hi, lo, rem = divmod36(hi, lo)
		out[i] = digits[rem]
	}
	return string(out[:])
}

// divmod36 divides the 128-bit value hi:lo by 36.
func divmod36(hi, lo uint64) (qhi, qlo, rem uint64) {
	qhi = hi / 36
	r := hi % 36
	// r < 36, so r<<32 | lo>>32 fits comfortably; do it in two 32-bit steps.
	mid := r<<32 | lo>>32
	q1 := mid / 36
	r = mid % 36
	low := r<<32 | lo&0xffffffff
	q0 := low / 36
	rem = low % 36
	qlo = q1<<32 | q0
	return qhi, qlo, rem
}

func parse(prefix, s string) (uuid.UUID, error) {
	var u uuid.UUID
	if len(s) != len(prefix)+Width || s[:len(prefix)] != prefix {
		return u, fmt.Errorf("%w: %q: want %s followed by %d base-36 digits", ErrMalformed, s, prefix, Width)
	}
	var hi, lo uint64
	for i := len(prefix); i < len(s); i++ {
		c := s[i]
		var d uint64
		switch {
		case c >= '0' && c <= '9':
			d = uint64(c - '0')
		case c >= 'a' && c <= 'z':
			d = uint64(c-'a') + 10
		default:
			return u, fmt.Errorf("%w: %q: invalid character %q", ErrMalformed, s, c)
		}
		// hi:lo = hi:lo*36 + d, detecting overflow past 128 bits.
		var carry uint64
		hi, lo, carry = mulAdd36(hi, lo, d)
		if carry != 0 {
			return u, fmt.Errorf("%w: %q: value exceeds 128 bits", ErrMalformed, s)
		}
	}
	for i := 0; i < 8; i++ {
		u[i] = byte(hi >> (56 - 8*i))
		u[8+i] = byte(lo >> (56 - 8*i))
	}
	return u, nil
}

// mulAdd36 computes hi:lo*36 + d and returns the bits above 128 in carry.
func mulAdd36(hi, lo, d uint64) (nhi, nlo, carry uint64) {
	// Split lo into 32-bit halves to keep products within 64 bits.
	l0 := (lo & 0xffffffff) * 36
	l1 := (lo >> 32) * 36
	l0 += d
	nlo0 := l0 & 0xffffffff
	c := l0 >> 32
	l1 += c
	nlo = (l1&0xffffffff)<<32 | nlo0
	c = l1 >> 32
	h0 := (hi&0xffffffff)*36 + c
	c = h0 >> 32
	h1 := (hi>>32)*36 + c
	nhi = (h1&0xffffffff)<<32 | h0&0xffffffff
	carry = h1 >> 32
	return nhi, nlo, carry
}
