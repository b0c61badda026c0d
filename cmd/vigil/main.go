// Command vigil is the host monitor: see `vigil -h`.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"syscall"

	"github.com/vigil-sh/vigil/internal/buildinfo"
	"github.com/vigil-sh/vigil/internal/cli"
)

type command struct {
	name     string
	synopsis string
	run      func(ctx context.Context, args []string, stdout, stderr io.Writer) error
}

func commands() []command {
	return []command{
		{"run", "run one replica", runRun},
		{"dev", "run a whole local cluster: embedded etcd, agent simulator, several replicas (builds with -tags dev: make dev)", runDev},
		{"shards", "print shard ownership from etcd", runShards},
		{"owner", "print the shard and owner of one host", runOwner},
		{"migrate", "create or update vigil's tables (and, with --control-plane-tables, the control plane's for dev)", runMigrate},
		{"shadow-report", "compare what shadow mode would have changed with the control plane's own monitor", runShadowReport},
		{"version", "print this build's version, revision and Go version", runVersion},
	}
}

func usage(w io.Writer) {
	fmt.Fprintf(w, "Usage: vigil <command> [flags]\n\nCommands:\n")
	for _, c := range commands() {
		fmt.Fprintf(w, "  %-14s %s\n", c.name, c.synopsis)
	}
	fmt.Fprintf(w, "\nRun 'vigil <command> -h' for a command's flags.\n")
}

func runVersion(_ context.Context, args []string, stdout, stderr io.Writer) error {
	fs := cli.NewFlagSet("vigil version", "Print this build's version, revision and Go version (also vigil_build_info on /metrics).", stderr)
	if err := cli.Parse(fs, args); err != nil {
		return usageErr(err)
	}
	fmt.Fprintln(stdout, buildinfo.Get())
	return nil
}

func main() {
	os.Exit(Main(os.Args[1:], os.Stdout, os.Stderr))
}

// errUsage marks errors in the command line: exit status 2.
var errUsage = errors.New("usage")

// Main runs the command line and returns the exit status.
func Main(args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 || args[0] == "-h" || args[0] == "--help" || args[0] == "help" {
		usage(stdout)
		if len(args) == 0 {
			return 2
		}
		return 0
	}
	for _, c := range commands() {
		if c.name != args[0] {
			continue
		}
		ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
		defer stop()
		err := c.run(ctx, args[1:], stdout, stderr)
		switch {
		case err == nil:
			return 0
		case errors.Is(err, flag.ErrHelp):
			return 0
		case errors.Is(err, errUsage):
			fmt.Fprintf(stderr, "vigil %s: %v\n", c.name, err)
			return 2
		default:
			fmt.Fprintf(stderr, "vigil %s: %v\n", c.name, err)
			return 1
		}
	}
	fmt.Fprintf(stderr, "vigil: unknown command %q\n\n", args[0])
	usage(stderr)
	return 2
}
