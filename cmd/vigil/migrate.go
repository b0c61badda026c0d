package main

import (
	"context"
	"errors"
	"fmt"
	"io"

	"github.com/vigil-sh/vigil/internal/cli"
	"github.com/vigil-sh/vigil/store"
)

func runMigrate(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := cli.NewFlagSet("vigil migrate", "Create or update vigil's own tables and triggers. Safe to run from several replicas at once.", stderr)
	db := databaseFlags(fs)
	controlPlane := fs.Bool("control-plane-tables", false, "also create the control plane's hosts, sandboxes and audit_logs tables when absent (dev and tests only)")
	volumes := fs.Bool("volumes-table", false, "with --control-plane-tables, also create the volumes table of newer control planes (dev and tests only)")
	logFormat := fs.String("log-format", "text", "log format: text or json")
	logLevel := fs.String("log-level", "info", "log level: trace, debug, info, warn, error")
	if err := cli.Parse(fs, args); err != nil {
		return usageErr(err)
	}
	log, err := cli.NewLogger("vigil", *logFormat, *logLevel, stderr)
	if err != nil {
		return usageErr(err)
	}
	if *db.url == "" {
		return usageErr(fmt.Errorf("--database-url (or $VIGIL_DATABASE_URL) is required"))
	}
	dbURL, err := db.resolve()
	if err != nil {
		return usageErr(err)
	}
	if *volumes && !*controlPlane {
		return usageErr(fmt.Errorf("--volumes-table needs --control-plane-tables"))
	}
	err = store.Migrate(ctx, dbURL, store.Schema{ControlPlane: *controlPlane, Volumes: *volumes})
	if errors.Is(err, store.ErrSchemaNewer) {
		// A rollback: this release runs on the newer, additive schema.
		log.Warn("schema left as it is", "reason", err)
		return nil
	}
	if err != nil {
		return err
	}
	log.Info("schema up to date", "control_plane_tables", *controlPlane, "volumes_table", *volumes)
	return nil
}

// usageErr marks err as a command-line mistake (exit status 2) without
// changing its message.
func usageErr(err error) error {
	if err == nil {
		return nil
	}
	return usageError{err}
}

type usageError struct{ err error }

func (e usageError) Error() string        { return e.err.Error() }
func (e usageError) Unwrap() error        { return e.err }
func (e usageError) Is(target error) bool { return target == errUsage }
