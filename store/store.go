// Package store is vigil's access to the control plane's Postgres: the
// connection pool with owner-session timeouts, schema migrations, the shard
// fences, and every statement the reconcile sends (shard.go). Writes happen
// only inside WithFence.
package store

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/prometheus/client_golang/prometheus"
)

// ErrFenced reports that the shard's fence in Postgres holds a token other
// than the caller's: a newer owner has claimed the shard (or the caller never
// raised it). Nothing was written. It is a sticky loss of the shard.
var ErrFenced = errors.New("store: fenced: shard owned under a newer token")

// Config configures the pool.
type Config struct {
	URL      string
	MaxConns int32 // default DefaultMaxConns
	MinConns int32 // default 0
	// Session timeouts set on every connection; all must stay well under
	// the etcd lease TTL so a paused owner cannot hold a fence row.
	LockTimeout                     time.Duration // default 2s
	StatementTimeout                time.Duration // default 5s
	IdleInTransactionSessionTimeout time.Duration // default 3s
	ApplicationName                 string        // default "vigil"
	// VolumesRecheck is how often the schema is read again for the volumes
	// table (rule 11), default DefaultVolumesRecheck, at most 5m.
	VolumesRecheck time.Duration
	Logger         hclog.Logger
	// Registerer receives the store's metrics (see Open); nil means none.
	Registerer prometheus.Registerer
}

// Validate fills defaults and checks the configuration.
func (c *Config) Validate() error {
	if c.URL == "" {
		return errors.New("store: database URL is empty")
	}
	if c.MaxConns == 0 {
		c.MaxConns = DefaultMaxConns
	}
	if c.MaxConns < 0 || c.MinConns < 0 || c.MinConns > c.MaxConns {
		return fmt.Errorf("store: pool limits min=%d max=%d are invalid", c.MinConns, c.MaxConns)
	}
	if c.LockTimeout == 0 {
		c.LockTimeout = 2 * time.Second
	}
	if c.StatementTimeout == 0 {
		c.StatementTimeout = 5 * time.Second
	}
	if c.IdleInTransactionSessionTimeout == 0 {
		c.IdleInTransactionSessionTimeout = 3 * time.Second
	}
	if c.ApplicationName == "" {
		c.ApplicationName = "vigil"
	}
	if c.VolumesRecheck == 0 {
		c.VolumesRecheck = DefaultVolumesRecheck
	}
	if c.VolumesRecheck < 0 || c.VolumesRecheck > 5*time.Minute {
		return fmt.Errorf("store: volumes recheck %s must be positive and at most 5m", c.VolumesRecheck)
	}
	if c.Logger == nil {
		c.Logger = hclog.NewNullLogger()
	}
	for name, d := range map[string]time.Duration{"lock_timeout": c.LockTimeout, "statement_timeout": c.StatementTimeout, "idle_in_transaction_session_timeout": c.IdleInTransactionSessionTimeout} {
		if d < time.Millisecond {
			return fmt.Errorf("store: %s %s must be at least 1ms", name, d)
		}
	}
	return nil
}

// DefaultMaxConns is the pool's default size.
const DefaultMaxConns = 8

// DefaultVolumesRecheck is how often the schema is read again for the
// volumes table.
const DefaultVolumesRecheck = time.Minute

// SessionTimeoutsFor derives the owner-session timeouts from the etcd lease
// TTL: each a fraction of it, so a paused owner's session is killed (and its
// fence row lock released) long before a successor's claim could wait on it.
func SessionTimeoutsFor(leaseTTL time.Duration) (lock, statement, idle time.Duration) {
	lock = leaseTTL / 5
	statement = leaseTTL / 3
	idle = leaseTTL / 4
	return lock, statement, idle
}

// Store is a Postgres pool plus vigil's queries.
type Store struct {
	pool    *pgxpool.Pool
	m       *metrics
	log     hclog.Logger
	recheck time.Duration
	vol     volumesProbe
	raised  raisedOn
}

// Open connects a pool. Every connection runs with the configured session
// timeouts. With cfg.Registerer set it registers:
//
//	vigil_db_statements_total                 statements sent (begin and commit included)
//	vigil_db_write_transactions_total{result} fenced write transactions: committed, fenced, failed
//	vigil_volumes_table                       1 when the database has a volumes table (rule 11)
//
// It then reads the schema for the volumes table; a failed look is retried
// at the first write.
func Open(ctx context.Context, cfg Config) (*Store, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	pc, err := pgxpool.ParseConfig(cfg.URL)
	if err != nil {
		return nil, fmt.Errorf("store: parse database URL: %w", err)
	}
	pc.MaxConns = cfg.MaxConns
	pc.MinConns = cfg.MinConns
	pc.MaxConnIdleTime = time.Minute
	pc.HealthCheckPeriod = 10 * time.Second
	rp := pc.ConnConfig.RuntimeParams
	rp["application_name"] = cfg.ApplicationName
	rp["lock_timeout"] = ms(cfg.LockTimeout)
	rp["statement_timeout"] = ms(cfg.StatementTimeout)
	rp["idle_in_transaction_session_timeout"] = ms(cfg.IdleInTransactionSessionTimeout)
	// vigil's statements are short reads and writes by key. A misestimate
	// (a table without statistics) pushes their plan cost past
	// jit_above_cost, and compiling the plan then takes longer than
	// running it: 300 ms of a shard read's 400 ms, measured.
	rp["jit"] = "off"
	m, err := newMetrics(cfg.Registerer)
	if err != nil {
		return nil, err
	}
	pc.ConnConfig.Tracer = m
	pool, err := pgxpool.NewWithConfig(ctx, pc)
	if err != nil {
		return nil, fmt.Errorf("store: connect: %w", err)
	}
	s := &Store{pool: pool, m: m, log: cfg.Logger, recheck: cfg.VolumesRecheck}
	s.Volumes(ctx)
	return s, nil
}

func ms(d time.Duration) string { return strconv.FormatInt(d.Milliseconds(), 10) }

// Close closes the pool.
func (s *Store) Close() { s.pool.Close() }

// Ping checks that Postgres answers.
func (s *Store) Ping(ctx context.Context) error { return s.pool.Ping(ctx) }

// Fence identifies the writer: the shard, its fencing token (the etcd create
// revision of the owner key), and the replica holding it.
type Fence struct {
	Shard   int
	Token   int64
	Replica string
}

// Header is the Vigil-Fence header value for agent calls: "<shard>:<token>".
func (f Fence) Header() string { return strconv.Itoa(f.Shard) + ":" + strconv.FormatInt(f.Token, 10) }

// RaiseFence records a claim: it raises the shard's token to f.Token if the
// stored token is lower (or absent). Raising to the token already stored is
// a no-op success. A stored token higher than f.Token returns ErrFenced.
//
// The raise takes the fence row's lock, so it waits for any write
// transaction of the previous owner still in flight; once it returns, no
// write under an older token can commit.
func (s *Store) RaiseFence(ctx context.Context, f Fence) error {
	if f.Token <= 0 {
		return fmt.Errorf("store: raise fence for shard %d: token %d must be positive", f.Shard, f.Token)
	}
	var token int64
	var id Identity
	err := s.pool.QueryRow(ctx, `
		insert into vigil_shard_fences (shard, token, owner, updated_at)
		values ($1, $2, $3, now())
		on conflict (shard) do update
		   set token = excluded.token, owner = excluded.owner, updated_at = now()
		 where vigil_shard_fences.token < excluded.token
		returning token, `+identitySQL, f.Shard, f.Token, f.Replica).Scan(&token, &id.System, &id.Timeline)
	if errors.Is(err, pgx.ErrNoRows) {
		// Not raised: the stored token is equal or higher.
		err = s.pool.QueryRow(ctx, `select token, `+identitySQL+` from vigil_shard_fences where shard = $1`, f.Shard).
			Scan(&token, &id.System, &id.Timeline)
		if err != nil {
			return fmt.Errorf("store: raise fence for shard %d: %w", f.Shard, err)
		}
		if token != f.Token {
			return fmt.Errorf("raise fence for shard %d to %d (stored %d): %w", f.Shard, f.Token, token, ErrFenced)
		}
	}
	if err != nil {
		return fmt.Errorf("store: raise fence for shard %d: %w", f.Shard, err)
	}
	s.raised.set(f, id)
	return nil
}

// FenceToken returns the shard's stored token, 0 when it has none.
func (s *Store) FenceToken(ctx context.Context, shard int) (int64, error) {
	var tok int64
	err := s.pool.QueryRow(ctx, `select token from vigil_shard_fences where shard = $1`, shard).Scan(&tok)
	if errors.Is(err, pgx.ErrNoRows) {
		return 0, nil
	}
	return tok, err
}

// WithFence runs fn in a transaction that first takes the shard's fence row
// FOR SHARE and checks that it still holds f.Token, on the database (system
// and timeline) this Store raised it on (ErrDatabaseChanged otherwise: see
// docs/fencing.md, "Across a database failover"). The row lock is held
// until commit, so a successor's RaiseFence waits for this transaction and a
// transaction begun after the raise sees the new token and fails with
// ErrFenced without writing. fn's error rolls everything back.
func (s *Store) WithFence(ctx context.Context, f Fence, fn func(tx pgx.Tx) error) error {
	err := pgx.BeginFunc(ctx, s.pool, func(tx pgx.Tx) error {
		var tok int64
		var id Identity
		err := tx.QueryRow(ctx, `select token, `+identitySQL+` from vigil_shard_fences where shard = $1 for share`, f.Shard).
			Scan(&tok, &id.System, &id.Timeline)
		if errors.Is(err, pgx.ErrNoRows) {
			return fmt.Errorf("shard %d has no fence: %w", f.Shard, ErrFenced)
		}
		if err != nil {
			return fmt.Errorf("store: check fence of shard %d: %w", f.Shard, err)
		}
		if err := s.raised.check(f, id); err != nil {
			return err
		}
		if tok != f.Token {
			return fmt.Errorf("shard %d fence is %d, ours %d: %w", f.Shard, tok, f.Token, ErrFenced)
		}
		return fn(tx)
	})
	s.m.writeTx(err)
	if isDatabaseChanged(err) {
		s.m.databaseChanges.Inc()
		s.log.Warn("fenced write refused: the database changed since the shard's fence was raised; the shard is claimed again", "shard", f.Shard, "token", f.Token, "error", err)
	}
	return err
}

// Now is the database clock.
func (s *Store) Now(ctx context.Context) (time.Time, error) {
	var t time.Time
	if err := s.pool.QueryRow(ctx, `select now()`).Scan(&t); err != nil {
		return t, fmt.Errorf("store: read the clock: %w", err)
	}
	return t, nil
}
