package agentpool

import (
	"crypto/sha256"
	"errors"
	"fmt"
	"net/netip"
	"strconv"
	"strings"
)

// MaxAddressLen bounds a hosts.address vigil will use: an agent's address
// is "ip:port" or a DNS name and a port, with at most a scheme in front.
const MaxAddressLen = 255

// Why an address is refused: CheckAddress's answer and the reason label of
// vigil_agent_bad_addresses_total. The set is closed.
const (
	ReasonEmpty    = "empty"      // blank
	ReasonTooLong  = "too_long"   // over MaxAddressLen bytes
	ReasonScheme   = "bad_scheme" // a scheme other than http or https
	ReasonUserinfo = "userinfo"   // "user@" before the host
	ReasonQuery    = "query"      // a query or a fragment
	ReasonPath     = "path"       // a path other than "/"
	ReasonNoPort   = "no_port"    // no ":port" after the host
	ReasonBadPort  = "bad_port"   // a port that is not 1-65535 in decimal
	ReasonBadHost  = "bad_host"   // not a DNS name, an IPv4 address or a bracketed IPv6 address
)

// Reasons lists every reason CheckAddress can give.
var Reasons = []string{ReasonEmpty, ReasonTooLong, ReasonScheme, ReasonUserinfo, ReasonQuery,
	ReasonPath, ReasonNoPort, ReasonBadPort, ReasonBadHost}

// ErrBadAddress reports a host whose address is not an agent's address
// (CheckAddress). No request is made and no name is looked up. Its errors
// are *BadAddressError.
var ErrBadAddress = errors.New("agentpool: bad address")

// BadAddressError is a refused address. Its text names the reason only: the
// address itself, which can be anything the database holds, is logged once
// per host and change by the pool (truncated), never carried in errors.
type BadAddressError struct {
	Reason string // one of Reasons
}

func (e *BadAddressError) Error() string { return "agentpool: bad address: " + e.Reason }

// Is makes errors.Is(err, ErrBadAddress) hold, and errors.Is(err,
// ErrNoAddress) for a blank address.
func (e *BadAddressError) Is(target error) bool {
	return target == ErrBadAddress || (target == ErrNoAddress && e.Reason == ReasonEmpty)
}

// CheckAddress says why address cannot be an agent's address, or "" when it
// can. An agent's address is what the control plane dials once it added its
// scheme to a hosts.address without one: an optional "http://" or
// "https://", then host:port — the host a DNS name, an IPv4 address or an
// IPv6 address in brackets, the port 1-65535 — then nothing but an optional
// "/"; MaxAddressLen bytes at most. It is pure: no name is looked up.
func CheckAddress(address string) string {
	_, reason := parseAddress(address, "http")
	return reason
}

// parseAddress is CheckAddress that also returns where the agent is dialled,
// scheme defaulting to defaultScheme.
func parseAddress(address, defaultScheme string) (target, string) {
	if len(address) > MaxAddressLen {
		return target{}, ReasonTooLong // before looking at it: it may be huge
	}
	if strings.TrimSpace(address) == "" {
		return target{}, ReasonEmpty
	}
	scheme, rest := defaultScheme, address
	if s, r, ok := strings.Cut(address, "://"); ok {
		scheme, rest = strings.ToLower(s), r
		if scheme != "http" && scheme != "https" {
			return target{}, ReasonScheme
		}
	}
	authority, tail := rest, ""
	if i := strings.IndexAny(rest, "/?#"); i >= 0 {
		authority, tail = rest[:i], rest[i:]
	}
	switch {
	case strings.Contains(authority, "@"):
		return target{}, ReasonUserinfo
	case strings.ContainsAny(tail, "?#"):
		return target{}, ReasonQuery
	case tail != "" && tail != "/":
		return target{}, ReasonPath
	}
	if reason := checkHostPort(authority); reason != "" {
		return target{}, reason
	}
	return target{scheme: scheme, host: authority}, ""
}

// checkHostPort checks "host:port", the host bracketed when it is IPv6.
func checkHostPort(hp string) string {
	if hp == "" {
		return ReasonBadHost // "http://": no host at all
	}
	var host, port string
	if rest, ok := strings.CutPrefix(hp, "["); ok {
		h, after, ok := strings.Cut(rest, "]")
		if !ok {
			return ReasonBadHost
		}
		if a, err := netip.ParseAddr(h); err != nil || !a.Is6() || a.Zone() != "" {
			return ReasonBadHost
		}
		if after == "" {
			return ReasonNoPort
		}
		p, ok := strings.CutPrefix(after, ":")
		if !ok {
			return ReasonBadHost
		}
		port = p
	} else {
		i := strings.LastIndexByte(hp, ':')
		if i < 0 {
			return ReasonNoPort
		}
		host, port = hp[:i], hp[i+1:]
		if !validHost(host) {
			return ReasonBadHost
		}
	}
	if port == "" {
		return ReasonNoPort
	}
	if !validPort(port) {
		return ReasonBadPort
	}
	return ""
}

// validPort: 1-65535 in plain decimal digits.
func validPort(p string) bool {
	if len(p) > 5 || strings.Trim(p, "0123456789") != "" {
		return false
	}
	n, err := strconv.Atoi(p)
	return err == nil && n >= 1 && n <= 65535
}

// validHost: an IPv4 address, or a DNS name of letters, digits, '-' and '_'
// in labels of 1-63 bytes not starting or ending with '-', 253 bytes at most
// (plus an optional final dot), whose last label is not all digits (that
// would be a malformed IPv4 address, not a name).
func validHost(h string) bool {
	if a, err := netip.ParseAddr(h); err == nil {
		return a.Is4()
	}
	h = strings.TrimSuffix(h, ".")
	if h == "" || len(h) > 253 {
		return false
	}
	labels := strings.Split(h, ".")
	for _, l := range labels {
		if !validLabel(l) {
			return false
		}
	}
	return strings.Trim(labels[len(labels)-1], "0123456789") != ""
}

func validLabel(l string) bool {
	if l == "" || len(l) > 63 || l[0] == '-' || l[len(l)-1] == '-' {
		return false
	}
	for i := 0; i < len(l); i++ {
		c := l[i]
		if !('a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || '0' <= c && c <= '9' || c == '-' || c == '_') {
			return false
		}
	}
	return true
}

// addressKey is what the pool remembers of a host's address to notice a
// change: the address itself, or for one too long to use a digest of it,
// so a huge value is not kept in memory between passes.
func addressKey(address string) string {
	if len(address) <= MaxAddressLen {
		return address
	}
	return fmt.Sprintf("(%d bytes, sha256 %x)", len(address), sha256.Sum256([]byte(address)))
}
