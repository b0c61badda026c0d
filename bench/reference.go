package main

// The two references every sweep is compared with, measured on the same
// fleet in the same run: the RPC ceiling (a bare concurrent ListSandboxes
// loop, no database) and the seed's loop (one host after another, the RPC
// plus the three queries the single-loop monitor made per host).

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"net"
	"net/http"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"connectrpc.com/connect"
	"github.com/google/uuid"

	hostagentv1 "github.com/vigil-sh/vigil/proto/hostagent/v1"
	"github.com/vigil-sh/vigil/proto/hostagent/v1/hostagentv1connect"
)

// rpcFleet is one Connect client per host over one HTTP/1.1 transport, the
// wire path of the production agent pool without anything of vigil: the
// Connect protocol with the binary codec, HTTP/2 off (the agents disable
// it), mutual TLS when the fleet serves it, keep-alive connections reused.
type rpcFleet struct {
	transport *http.Transport
	clients   []hostagentv1connect.HostAgentServiceClient
	hosts     []fleetHost
}

const rpcTimeout = 5 * time.Second

func newRPCFleet(e *env, f *fleet) (*rpcFleet, error) {
	t := &http.Transport{
		Proxy:               nil,
		DialContext:         (&net.Dialer{Timeout: rpcTimeout, KeepAlive: 30 * time.Second}).DialContext,
		ForceAttemptHTTP2:   false,
		TLSNextProto:        map[string]func(string, *tls.Conn) http.RoundTripper{},
		MaxIdleConns:        0, // no global cap: one idle connection per host
		MaxIdleConnsPerHost: 2,
		IdleConnTimeout:     90 * time.Second,
		TLSHandshakeTimeout: rpcTimeout,
	}
	scheme := "http://"
	if f.tls {
		ca, err := os.ReadFile(e.certs.CA)
		if err != nil {
			return nil, err
		}
		roots := x509.NewCertPool()
		if !roots.AppendCertsFromPEM(ca) {
			return nil, fmt.Errorf("%s holds no certificate", e.certs.CA)
		}
		cert, err := tls.LoadX509KeyPair(e.certs.ClientCert, e.certs.ClientKey)
		if err != nil {
			return nil, err
		}
		t.TLSClientConfig = &tls.Config{RootCAs: roots, Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12}
		scheme = "https://"
	}
	hc := &http.Client{Transport: t}
	r := &rpcFleet{transport: t, hosts: f.hosts}
	for _, h := range f.hosts {
		r.clients = append(r.clients, hostagentv1connect.NewHostAgentServiceClient(hc, scheme+h.Address))
	}
	return r, nil
}

func (r *rpcFleet) list(ctx context.Context, i int) (*hostagentv1.ListSandboxesResponse, error) {
	ctx, cancel := context.WithTimeout(ctx, rpcTimeout)
	defer cancel()
	resp, err := r.clients[i].ListSandboxes(ctx, connect.NewRequest(&hostagentv1.ListSandboxesRequest{}))
	if err != nil {
		return nil, fmt.Errorf("host %s ListSandboxes: %w", r.hosts[i].ID, err)
	}
	return resp.Msg, nil
}

// close drops the idle connections, so the agents' file descriptors are free
// for the replicas.
func (r *rpcFleet) close() { r.transport.CloseIdleConnections() }

type refResult struct {
	Ceiling     float64 // hosts/s
	CeilingErrs int
	Loop        float64 // hosts/s
	LoopHosts   int
}

// measureCeiling calls every host once to open the connections (and check
// each agent reports its sandboxes), then keeps inFlight calls running over
// all hosts round-robin for window and returns the successful calls per
// second.
func measureCeiling(ctx context.Context, r *rpcFleet, inFlight, sandboxes int, window time.Duration) (rate float64, errs int, err error) {
	n := len(r.clients)
	var next atomic.Int64
	var firstErr error
	var mu sync.Mutex
	work := func(deadline time.Time, warm bool) (ok, failed int) {
		var wg sync.WaitGroup
		var okN, errN atomic.Int64
		next.Store(0)
		for range inFlight {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for ctx.Err() == nil {
					i := int(next.Add(1) - 1)
					if warm && i >= n {
						return
					}
					if !warm && time.Now().After(deadline) {
						return
					}
					resp, err := r.list(ctx, i%n)
					if err == nil && warm && len(resp.Sandboxes) != sandboxes {
						err = fmt.Errorf("host %s reports %d sandboxes, want %d", r.hosts[i%n].ID, len(resp.Sandboxes), sandboxes)
					}
					if err != nil {
						errN.Add(1)
						mu.Lock()
						if firstErr == nil {
							firstErr = err
						}
						mu.Unlock()
						continue
					}
					okN.Add(1)
				}
			}()
		}
		wg.Wait()
		return int(okN.Load()), int(errN.Load())
	}
	if _, failed := work(time.Time{}, true); failed > 0 {
		return 0, failed, fmt.Errorf("warm-up round: %d of %d calls failed, first: %w", failed, n, firstErr)
	}
	if ctx.Err() != nil {
		return 0, 0, ctx.Err()
	}
	start := time.Now()
	ok, failed := work(start.Add(window), false)
	elapsed := time.Since(start)
	if ctx.Err() != nil {
		return 0, failed, ctx.Err()
	}
	if failed > ok/100 {
		return 0, failed, fmt.Errorf("%d of %d calls failed, first: %w", failed, ok+failed, firstErr)
	}
	return float64(ok) / elapsed.Seconds(), failed, nil
}

// activeStatuses are the sandbox statuses the reconcile reads (monitor's
// ActiveStatuses), spelled here so the bench does not depend on packages
// under rewrite.
var activeStatuses = []string{"missing", "running", "starting", "resuming", "snapshotting", "pausing", "stopping"}

// measureSeedLoop runs the seed's loop for window over the hosts in order:
// per host, on one database connection, read the host row, judge its
// heartbeat by the database clock, call ListSandboxes, read its active
// sandbox rows with the database clock, and compare. Returns hosts per
// second.
func measureSeedLoop(ctx context.Context, e *env, r *rpcFleet, window time.Duration) (rate float64, hosts int, err error) {
	conn, err := e.db.Acquire(ctx)
	if err != nil {
		return 0, 0, err
	}
	defer conn.Release()
	start := time.Now()
	deadline := start.Add(window)
	mismatches := 0
	for i := 0; time.Now().Before(deadline); i = (i + 1) % len(r.hosts) {
		if err := ctx.Err(); err != nil {
			return 0, hosts, err
		}
		id := r.hosts[i].ID
		var status, address string
		var heartbeat *time.Time
		if err := conn.QueryRow(ctx, `select status, address, last_heartbeat_at from hosts where id = $1`, id).
			Scan(&status, &address, &heartbeat); err != nil {
			return 0, hosts, fmt.Errorf("seed loop: read host %s: %w", id, err)
		}
		var stale bool
		if err := conn.QueryRow(ctx, `
			select last_heartbeat_at is null or last_heartbeat_at < now() - make_interval(secs => $2)
			  from hosts where id = $1`, id, e.opts.UnreachableAfter.Seconds()).Scan(&stale); err != nil {
			return 0, hosts, fmt.Errorf("seed loop: heartbeat check of host %s: %w", id, err)
		}
		if stale || status != "online" || address == "" {
			return 0, hosts, fmt.Errorf("seed loop: host %s is %s (stale heartbeat: %v)", id, status, stale)
		}
		resp, err := r.list(ctx, i)
		if err != nil {
			return 0, hosts, fmt.Errorf("seed loop: %w", err)
		}
		rows, err := conn.Query(ctx, `
			select id, status, last_updated, now() from sandboxes
			 where host_id = $1 and status = any($2) order by id`, id, activeStatuses)
		if err != nil {
			return 0, hosts, fmt.Errorf("seed loop: read sandboxes of host %s: %w", id, err)
		}
		dbRows := 0
		for rows.Next() {
			var sid uuid.UUID
			var st string
			var lastUpdated, now time.Time
			if err := rows.Scan(&sid, &st, &lastUpdated, &now); err != nil {
				rows.Close()
				return 0, hosts, err
			}
			dbRows++
		}
		rows.Close()
		if err := rows.Err(); err != nil {
			return 0, hosts, err
		}
		if dbRows != len(resp.Sandboxes) {
			mismatches++
		}
		hosts++
	}
	elapsed := time.Since(start)
	if mismatches > 0 {
		return 0, hosts, fmt.Errorf("seed loop: %d hosts whose rows and agent report differ in a steady fleet", mismatches)
	}
	return float64(hosts) / elapsed.Seconds(), hosts, nil
}
