//go:build chaos_nofence

package store

// This file exists only for the chaos harness (chaos/, `make chaos`,
// chaos.TestBrokenBuildIsCaught): built with -tags chaos_nofence, vigil's
// fence check never sees another replica's claim, so the harness can show
// that it catches a replica writing after it lost its shard. Never build
// vigil with this tag for anything else.
//
// How, without touching the fence code itself: every connection of a
// replica resolves vigil_shard_fences to a table of that replica's own (a
// schema named after the connection's application_name, first on its
// search_path). RaiseFence and WithFence run unchanged, but each replica
// only ever compares its token with its own raises: a deposed owner's check
// passes and its writes commit, exactly as if the comparison were gone.
// The metrics type is the pool's tracer, so it is where pgx lets a file of
// this package change a connection's settings before it is made.

import (
	"context"
	"crypto/sha256"
	"encoding/hex"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
)

// TraceConnectStart implements pgx.ConnectTracer: it points the new
// connection's vigil_shard_fences at the replica's own table.
func (m *metrics) TraceConnectStart(ctx context.Context, data pgx.TraceConnectStartData) context.Context {
	cfg := data.ConnConfig
	sum := sha256.Sum256([]byte(cfg.RuntimeParams["application_name"]))
	schema := "chaos_nofence_" + hex.EncodeToString(sum[:6])
	cfg.RuntimeParams["search_path"] = schema + ", public"
	prev := cfg.AfterConnect
	cfg.AfterConnect = func(ctx context.Context, pc *pgconn.PgConn) error {
		if prev != nil {
			if err := prev(ctx, pc); err != nil {
				return err
			}
		}
		_, err := pc.Exec(ctx, `begin;
			select pg_advisory_xact_lock(hashtext('chaos_nofence'));
			create schema if not exists `+schema+`;
			create table if not exists `+schema+`.vigil_shard_fences (like public.vigil_shard_fences including all);
			commit;`).ReadAll()
		return err
	}
	return ctx
}

// TraceConnectEnd implements pgx.ConnectTracer.
func (m *metrics) TraceConnectEnd(context.Context, pgx.TraceConnectEndData) {}
