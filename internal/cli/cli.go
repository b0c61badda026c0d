// Package cli holds what vigil's commands share: flags with VIGIL_*
// environment twins and an optional config file (github.com/peterbourgon/ff),
// and hclog set-up. Precedence: command line, environment, config file,
// default.
package cli

import (
	"flag"
	"fmt"
	"io"
	"os"
	"strings"

	"github.com/hashicorp/go-hclog"
	"github.com/peterbourgon/ff/v3"
)

// EnvName is the environment twin of a flag: "lease-ttl" -> "VIGIL_LEASE_TTL".
func EnvName(flagName string) string {
	return "VIGIL_" + strings.ToUpper(strings.ReplaceAll(flagName, "-", "_"))
}

// ConfigFlag names the optional config file every command takes: one flag
// per line, "name value" ("# comments"; a name alone is a true boolean).
const ConfigFlag = "config"

// NewFlagSet returns a flag set with the --config flag whose usage lists
// every flag with its environment twin.
func NewFlagSet(name, synopsis string, out io.Writer) *flag.FlagSet {
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	fs.SetOutput(out)
	fs.String(ConfigFlag, "", "file of flags, one \"name value\" per line (# comments); the command line and then the environment win over it")
	fs.Usage = func() {
		fmt.Fprintf(out, "Usage: %s\n\n%s\n\nFlags (each also read from its VIGIL_* environment variable, then from --config):\n", name, synopsis)
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
// its environment twin, then from the --config file. A bad environment or
// file value is an error naming the flag. Positional arguments are an error.
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
	onCommandLine := map[string]bool{}
	fs.Visit(func(f *flag.Flag) { onCommandLine[f.Name] = true })
	err := ff.Parse(fs, nil,
		ff.WithEnvVarPrefix("VIGIL"),
		ff.WithConfigFileFlag(ConfigFlag),
		ff.WithConfigFileParser(ff.PlainParser))
	if err == nil {
		err = setEmptyFromEnv(fs, onCommandLine)
	}
	if err != nil {
		return nil, &SettingError{err}
	}
	return pos, nil
}

// SettingError is a bad value from the environment or the config file. The
// flag package prints command-line mistakes itself; these the caller prints.
type SettingError struct{ err error }

func (e *SettingError) Error() string { return e.err.Error() }
func (e *SettingError) Unwrap() error { return e.err }

// setEmptyFromEnv gives a variable that is set but empty its meaning: the
// flag's value is empty (e.g. VIGIL_EVENTS_SSE_CHANNEL= turns the mirror
// off). ff skips empty variables; vigil's twins have always counted them.
func setEmptyFromEnv(fs *flag.FlagSet, onCommandLine map[string]bool) error {
	var err error
	fs.VisitAll(func(f *flag.Flag) {
		if err != nil || onCommandLine[f.Name] {
			return
		}
		if v, ok := os.LookupEnv(EnvName(f.Name)); ok && v == "" {
			if e := fs.Set(f.Name, ""); e != nil {
				err = fmt.Errorf("invalid empty value for $%s (flag --%s): %w", EnvName(f.Name), f.Name, e)
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
