// Package pgtest gives each test its own freshly migrated Postgres database on
// the local server, dropped when the test ends.
//
// The server is found through VIGIL_TEST_DATABASE_URL (default
// DefaultAdminURL). Tests fail, not skip, when it is unreachable: the
// suite's set-up (scripts/ensure-postgres.sh) starts it and creates the role.
package pgtest

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"net/url"
	"os"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/vigil-sh/vigil/store"
)

// DefaultAdminURL is the tests' server when VIGIL_TEST_DATABASE_URL is
// unset: a role with a password, so that it logs in over TCP on a stock
// install (scram) as well as where loopback is trusted.
const DefaultAdminURL = "postgres://vigil:vigil@127.0.0.1:5432/postgres?sslmode=disable"

// AdminURL is the maintenance database used to create and drop test
// databases (and by the benchmark and the chaos harness for theirs).
func AdminURL() string {
	if u := os.Getenv("VIGIL_TEST_DATABASE_URL"); u != "" {
		return u
	}
	return DefaultAdminURL
}

// New creates an empty database with the full schema (control-plane tables
// and vigil's) and returns its URL. The database is dropped at cleanup.
func New(t testing.TB) string {
	t.Helper()
	return NewSchema(t, store.Schema{ControlPlane: true})
}

// NewSchema is New with the control plane's tables schema asks for (e.g. a
// newer control plane's volumes table).
func NewSchema(t testing.TB, schema store.Schema) string {
	t.Helper()
	dbURL := NewEmpty(t)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	if err := store.Migrate(ctx, dbURL, schema); err != nil {
		t.Fatalf("pgtest: migrate: %v", err)
	}
	return dbURL
}

// NewEmpty creates an empty database without any schema and returns its URL.
// The database is dropped at cleanup.
func NewEmpty(t testing.TB) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	admin, err := pgx.Connect(ctx, AdminURL())
	if err != nil {
		t.Fatalf("pgtest: connect to %s: %v", AdminURL(), err)
	}
	defer admin.Close(context.Background())
	var b [6]byte
	_, _ = rand.Read(b[:])
	name := "vigil_test_" + hex.EncodeToString(b[:])
	if _, err := admin.Exec(ctx, "create database "+name); err != nil {
		t.Fatalf("pgtest: create database: %v", err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		c, err := pgx.Connect(ctx, AdminURL())
		if err != nil {
			t.Logf("pgtest: drop %s: %v", name, err)
			return
		}
		defer c.Close(context.Background())
		if _, err := c.Exec(ctx, "drop database if exists "+name+" with (force)"); err != nil {
			t.Logf("pgtest: drop %s: %v", name, err)
		}
	})
	u, err := url.Parse(AdminURL())
	if err != nil {
		t.Fatalf("pgtest: %v", err)
	}
	u.Path = "/" + name
	return u.String()
}
