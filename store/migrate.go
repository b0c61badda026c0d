package store

import (
	"context"
	"embed"
	"errors"
	"fmt"
	"io/fs"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/tern/v2/migrate"
)

//go:embed migrations
var migrations embed.FS

// Schema says which tables Migrate creates besides vigil's own.
type Schema struct {
	// ControlPlane creates the control plane's hosts, sandboxes and
	// audit_logs tables when absent: for dev and tests only; a real
	// deployment owns them.
	ControlPlane bool
	// Volumes, with ControlPlane, also creates the volumes table of newer
	// control planes (rule 11).
	Volumes bool
}

// Migrate brings the database schema up to date: first the control plane's
// tables the schema asks for, then vigil's own tables and triggers.
//
// Migrate is safe to run from several replicas at once: each migration set
// runs under a Postgres advisory lock and records its version in its own
// table. A set a newer release has taken further is left alone and Migrate
// returns ErrSchemaNewer.
func Migrate(ctx context.Context, databaseURL string, schema Schema) error {
	if schema.Volumes && !schema.ControlPlane {
		return errors.New("migrate: the volumes table comes only with the control plane's tables")
	}
	conn, err := pgx.Connect(ctx, databaseURL)
	if err != nil {
		return fmt.Errorf("migrate: connect: %w", err)
	}
	defer conn.Close(context.Background())
	type set struct{ dir, table string }
	var sets []set
	if schema.ControlPlane {
		sets = append(sets, set{"migrations/controlplane", "vigil_dev_schema_version"})
	}
	if schema.Volumes {
		sets = append(sets, set{"migrations/volumes", "vigil_dev_volumes_version"})
	}
	sets = append(sets, set{"migrations/vigil", "vigil_schema_version"})
	var newer error
	for _, set := range sets {
		sub, err := fs.Sub(migrations, set.dir)
		if err != nil {
			return fmt.Errorf("migrate: %w", err)
		}
		m, err := migrate.NewMigrator(ctx, conn, set.table)
		if err != nil {
			return fmt.Errorf("migrate %s: %w", set.dir, err)
		}
		if err := m.LoadMigrations(sub); err != nil {
			return fmt.Errorf("migrate %s: load: %w", set.dir, err)
		}
		cur, err := m.GetCurrentVersion(ctx)
		if err != nil {
			return fmt.Errorf("migrate %s: %w", set.dir, err)
		}
		if int(cur) > len(m.Migrations) {
			// A newer release migrated this database and this one is being
			// rolled back to. Migrations are forward-only and additive
			// (docs/upgrading.md), so this release runs on the newer
			// schema; taking it "down" would drop what the newer one wrote.
			newer = fmt.Errorf("%w: %s is at version %d, this build knows %d", ErrSchemaNewer, set.table, cur, len(m.Migrations))
			continue
		}
		if err := m.Migrate(ctx); err != nil {
			return fmt.Errorf("migrate %s: %w", set.dir, err)
		}
	}
	return newer
}

// ErrSchemaNewer says a newer release has migrated the database: nothing was
// changed, and this release may run on it (a rollback).
var ErrSchemaNewer = errors.New("the schema is newer than this build")
