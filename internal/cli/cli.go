// Package cli holds what vigil's commands share: flags with VIGIL_*
// environment twins and hclog set-up.
package cli

import (
	"flag"
	"fmt"
	"io"
	"os"
	"strings"

	"github.com/hashicorp/go-hclog"
)

// EnvName is the environment twin of a flag: "lease-ttl" -> "VIGIL_LEASE_TTL".
func EnvName(flagName string) string {
	return "VIGIL_" + strings.ToUpper(strings.ReplaceAll(flagName, "-", "_"))
}

// NewFlagSet returns a flag set whose usage lists every flag with its
// environment twin.
func NewFlagSet(name, synopsis string, out io.Writer) *flag.FlagSet {
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	fs.SetOutput(out)
	fs.Usage = func() {
		fmt.Fprintf(out, "Usage: %s\n\n%s\n\nFlags (each also read from its VIGIL_* environment variable):\n", name, synopsis)
		fs.VisitAll(func(f *flag.Flag) {
			def := ""
			if f.DefValue != "" {
				def = fmt.Sprintf(" (default %s)", f.DefValue)
			}
			fmt.Fprintf(out, "  --%s  [$%s]%s\n      %s\n", f.Name, EnvName(f.Name), def, f.Usage)
		})
	}
	return fs
}

// Parse parses args, then fills every flag not given on the command line from
// its environment twin. A bad environment value is an error naming both.
// Positional arguments are an error.
func Parse(fs *flag.FlagSet, args []string) error {
	pos, err := ParsePositional(fs, args)
	if err == nil && len(pos) > 0 {
		err = fmt.Errorf("unexpected arguments: %s", strings.Join(pos, " "))
	}
	return err
}

// ParsePositional is Parse for commands that take positional arguments,
// which may stand before, between or after the flags.
func ParsePositional(fs *flag.FlagSet, args []string) ([]string, error) {
	var pos []string
	for {
		if err := fs.Parse(args); err != nil {
			return nil, err
		}
		rest := fs.Args()
		if len(rest) == 0 {
			break
		}
		pos = append(pos, rest[0])
		args = rest[1:]
	}
	return pos, fillFromEnv(fs)
}

func fillFromEnv(fs *flag.FlagSet) error {
	set := map[string]bool{}
	fs.Visit(func(f *flag.Flag) { set[f.Name] = true })
	var err error
	fs.VisitAll(func(f *flag.Flag) {
		if err != nil || set[f.Name] {
			return
		}
		if v, ok := os.LookupEnv(EnvName(f.Name)); ok {
			if e := fs.Set(f.Name, v); e != nil {
				err = fmt.Errorf("invalid value %q for $%s (flag --%s): %w", v, EnvName(f.Name), f.Name, e)
			}
		}
	})
	return err
}

// NewLogger builds the process logger. format is "text" or "json".
func NewLogger(name, format, level string, out io.Writer) (hclog.Logger, error) {
	if format != "text" && format != "json" {
		return nil, fmt.Errorf("--log-format %q: want text or json", format)
	}
	lvl := hclog.LevelFromString(level)
	if lvl == hclog.NoLevel {
		return nil, fmt.Errorf("--log-level %q: want trace, debug, info, warn or error", level)
	}
	return hclog.New(&hclog.LoggerOptions{
		Name:            name,
		Level:           lvl,
		Output:          out,
		JSONFormat:      format == "json",
		IncludeLocation: false,
	}), nil
}
