package store

import (
	"context"
	"embed"
	"fmt"
	"io/fs"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/tern/v2/migrate"
)

//go:embed migrations
var migrations embed.FS

// Migrate brings the database schema up to date. With controlPlane set it
// first creates the control plane's own tables (hosts, sandboxes, audit_logs)
// if they are absent — for dev and tests only; a real deployment owns them.
// vigil's own tables and triggers always follow.
//
// Migrate is safe to run from several replicas at once: each migration set
// runs under a Postgres advisory lock and records its version in its own
// table.
func Migrate(ctx context.Context, databaseURL string, controlPlane bool) error {
	conn, err := pgx.Connect(ctx, databaseURL)
	if err != nil {
		return fmt.Errorf("migrate: connect: %w", err)
	}
	defer conn.Close(context.Background())
	sets := []struct{ dir, table string }{
		{"migrations/vigil", "vigil_schema_version"},
	}
	if controlPlane {
		sets = append([]struct{ dir, table string }{{"migrations/controlplane", "vigil_dev_schema_version"}}, sets...)
	}
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
		if err := m.Migrate(ctx); err != nil {
			return fmt.Errorf("migrate %s: %w", set.dir, err)
		}
	}
	return nil
}
