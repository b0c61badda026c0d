package main

// The simulated fleet: the hosts split over several agentsim processes (one
// process's open-file limit cannot hold a connection per host from every
// client), each with its own seed, RPC port and control API.

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"sort"
	"strconv"
	"syscall"
	"time"

	"github.com/google/uuid"
)

type fleet struct {
	tls   bool
	sims  []*agentsim
	hosts []fleetHost // sorted by id
}

type agentsim struct {
	*proc
	admin string // host:port of its control API
	hosts int
}

type fleetHost struct {
	ID      uuid.UUID
	Address string // ip:port, as in hosts.address
	sim     *agentsim
}

// startFleet starts the agentsim processes and waits until every host is
// registered. With tls the agents serve mutual TLS from the run's CA.
func startFleet(ctx context.Context, e *env, tls bool, name string) (*fleet, error) {
	o := e.opts
	n := (o.Hosts + o.HostsPerAgentsim - 1) / o.HostsPerAgentsim
	f := &fleet{tls: tls}
	offset := 0
	for i := range n {
		hosts := o.Hosts / n
		if i < o.Hosts%n {
			hosts++
		}
		admin, err := freeAddr()
		if err != nil {
			return f, err
		}
		args := []string{
			"--database-url", e.dbURL,
			"--hosts", strconv.Itoa(hosts),
			"--sandboxes-per-host", strconv.Itoa(o.Sandboxes),
			"--churn", "0",
			"--heartbeat-interval", o.Heartbeat.String(),
			"--seed", strconv.Itoa(i + 1), // distinct hosts per process, the same on every start
			// Distinct IPs per process, as real agents have (TLS sessions
			// are cached per server name, the IP).
			"--address-offset", strconv.Itoa(offset),
			"--shared-fraction", "0",
			"--admin-addr", admin,
			"--log-format", "json",
			"--log-level", "warn",
		}
		if e.caps.AgentsimLatency {
			args = append(args, "--latency", o.Latency.String())
		}
		if tls {
			args = append(args, "--tls-ca-file", e.certs.CA, "--tls-cert-file", e.certs.CA, "--tls-key-file", e.certs.CAKey)
		}
		p, err := e.procs.start(fmt.Sprintf("agentsim-%s-%d", name, i+1), e.agentsimBin, args)
		if err != nil {
			return f, err
		}
		f.sims = append(f.sims, &agentsim{proc: p, admin: admin, hosts: hosts})
		offset += hosts
	}
	// Registration of 200,000 sandbox rows takes a while on two cores, and
	// of 2,000,000 by ten processes at once longer per row.
	timeout := 30*time.Second + time.Duration(o.Hosts*o.Sandboxes)*150*time.Microsecond
	for _, s := range f.sims {
		if _, err := poll(ctx, timeout, 100*time.Millisecond, s.name+" ready", func() (bool, string, error) {
			if s.exited() {
				return false, "", s.exitError()
			}
			code, body, err := httpGet(ctx, "http://"+s.admin+"/readyz")
			if err != nil {
				return false, err.Error(), nil
			}
			return code == 200, string(body), nil
		}); err != nil {
			return f, err
		}
	}
	for _, s := range f.sims {
		hs, err := s.list(ctx)
		if err != nil {
			return f, err
		}
		if len(hs) != s.hosts {
			return f, fmt.Errorf("%s lists %d hosts, want %d", s.name, len(hs), s.hosts)
		}
		f.hosts = append(f.hosts, hs...)
	}
	sort.Slice(f.hosts, func(i, j int) bool { return f.hosts[i].ID.String() < f.hosts[j].ID.String() })
	seen := map[uuid.UUID]bool{}
	for _, h := range f.hosts {
		if seen[h.ID] {
			return f, fmt.Errorf("host %s served by two agentsim processes", h.ID)
		}
		seen[h.ID] = true
	}
	var online int
	if err := e.db.QueryRow(ctx, `select count(*) from hosts where status = 'online' and address <> ''`).Scan(&online); err != nil {
		return f, err
	}
	if online != o.Hosts {
		return f, fmt.Errorf("%d hosts online in the database, want %d", online, o.Hosts)
	}
	return f, nil
}

// fullHandshakes sums the agentsim processes' full (not resumed) TLS
// handshakes, -1 when one of them does not say (an older agentsim).
func (f *fleet) fullHandshakes(ctx context.Context) float64 {
	var sum float64
	for _, s := range f.sims {
		code, body, err := httpGet(ctx, "http://"+s.admin+"/stats")
		if err != nil || code != 200 {
			return -1
		}
		var st struct {
			Full *int64 `json:"full_tls_handshakes"`
		}
		if json.Unmarshal(body, &st) != nil || st.Full == nil {
			return -1
		}
		sum += float64(*st.Full)
	}
	return sum
}

func (s *agentsim) list(ctx context.Context) ([]fleetHost, error) {
	code, body, err := httpGet(ctx, "http://"+s.admin+"/hosts")
	if err != nil {
		return nil, err
	}
	if code != 200 {
		return nil, fmt.Errorf("%s GET /hosts: %d %s", s.name, code, body)
	}
	var hs []struct {
		ID      uuid.UUID `json:"id"`
		Address string    `json:"address"`
	}
	if err := json.Unmarshal(body, &hs); err != nil {
		return nil, fmt.Errorf("%s GET /hosts: %w", s.name, err)
	}
	out := make([]fleetHost, 0, len(hs))
	for _, h := range hs {
		if _, _, err := net.SplitHostPort(h.Address); err != nil {
			return nil, fmt.Errorf("%s: host %s has address %q", s.name, h.ID, h.Address)
		}
		out = append(out, fleetHost{ID: h.ID, Address: h.Address, sim: s})
	}
	return out, nil
}

// setMode sets a host's fault mode through its agentsim's control API.
func (h fleetHost) setMode(ctx context.Context, mode string) error {
	code, body, err := httpPost(ctx, "http://"+h.sim.admin+"/hosts/"+h.ID.String()+"/mode", mode)
	if err != nil {
		return err
	}
	if code != 200 {
		return fmt.Errorf("set mode of host %s: %d %s", h.ID, code, body)
	}
	return nil
}

// heartbeat runs one heartbeat round of the host's agentsim now.
func (h fleetHost) heartbeat(ctx context.Context) error {
	code, body, err := httpPost(ctx, "http://"+h.sim.admin+"/heartbeat", "")
	if err != nil {
		return err
	}
	if code != 200 {
		return fmt.Errorf("heartbeat: %d %s", code, body)
	}
	return nil
}

func (f *fleet) pids() []int {
	out := make([]int, 0, len(f.sims))
	for _, s := range f.sims {
		out = append(out, s.pid())
	}
	return out
}

// stop ends every agentsim process.
func (f *fleet) stop() {
	for _, s := range f.sims {
		_ = s.signal(syscall.SIGTERM)
	}
	for _, s := range f.sims {
		if !s.wait(10 * time.Second) {
			s.kill()
		}
	}
}
