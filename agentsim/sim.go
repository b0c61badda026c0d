package agentsim

import (
	"context"
	"crypto/rand"
	"crypto/tls"
	"encoding/binary"
	"errors"
	"fmt"
	"math"
	mrand "math/rand/v2"
	"net/netip"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/google/uuid"
	"github.com/hashicorp/go-hclog"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/vigil-sh/vigil/internal/status"
)

// Errors returned by the Sim's methods; test them with errors.Is.
var (
	ErrUnknownHost    = errors.New("agentsim: unknown host")
	ErrUnknownSandbox = errors.New("agentsim: unknown sandbox")
	ErrNoDatabase     = errors.New("agentsim: no database configured")
	ErrAlreadyRun     = errors.New("agentsim: Run called twice")
)

// VM is one sandbox as a simulated agent knows it.
type VM struct {
	ID           uuid.UUID         `json:"id"`
	Status       string            `json:"status"`
	TeamID       uuid.UUID         `json:"team_id"`
	Template     string            `json:"template"`
	VCPUs        int32             `json:"vcpus"`
	MemoryMB     int32             `json:"memory_mb"`
	CreatedAt    time.Time         `json:"created_at"`
	LastActiveAt time.Time         `json:"last_active_at"`
	Metadata     map[string]string `json:"metadata,omitempty"`
}

// HostInfo describes one simulated host.
type HostInfo struct {
	ID uuid.UUID `json:"id"`
	// Address is the agent's "ip:port", empty until the listener is bound.
	Address string `json:"address"`
	// TeamID is nil for a shared host.
	TeamID *uuid.UUID `json:"team_id"`
	Mode   Mode       `json:"mode"`
	VMs    int        `json:"vms"`
	// HighestFence is the highest fencing token a DestroySandbox carried.
	HighestFence int64 `json:"highest_fence"`
}

// DestroyResult is the outcome of one DestroySandbox call.
type DestroyResult string

// Accepted results are destroyed and not_found; the others are rejections.
const (
	DestroyDestroyed  DestroyResult = "destroyed"
	DestroyNotFound   DestroyResult = "not_found"
	DestroyStaleFence DestroyResult = "stale_fence"
	DestroyBadFence   DestroyResult = "bad_fence"
	DestroyBadID      DestroyResult = "bad_sandbox_id"
	DestroyRefused    DestroyResult = "refused" // ModeRefuseDestroy
)

// DestroyRecord is one DestroySandbox call as the agent saw it.
type DestroyRecord struct {
	Host    uuid.UUID `json:"host"`
	Sandbox string    `json:"sandbox"` // the wire id as sent
	// Fenced is false when the call carried no Vigil-Fence header; Shard and
	// Token are then zero.
	Fenced bool          `json:"fenced"`
	Shard  int           `json:"shard"`
	Token  int64         `json:"token"`
	Result DestroyResult `json:"result"`
	Time   time.Time     `json:"time"`
}

// maxRecords bounds each host's destroy history; the oldest go first.
const maxRecords = 10000

// Sim simulates the host agents of many hosts in one process. Its methods
// are safe for concurrent use, before, during and after Run.
type Sim struct {
	cfg   Config
	log   hclog.Logger
	hosts []*host
	byID  map[uuid.UUID]*host
	teams []uuid.UUID

	pool    *pgxpool.Pool
	ownPool bool

	tlsConfig *tls.Config // nil: plain HTTP
	issuer    *leafIssuer // nil: hosts serve the configured certificate as is

	port    atomic.Int32
	ready   chan struct{}
	started atomic.Bool
	now     func() time.Time

	rngMu sync.Mutex
	rng   *mrand.Rand

	churnDone      atomic.Int64
	monitorChanges atomic.Int64 // changes the control plane's monitor loop made
	mishaps        atomic.Int64
	inflight       atomic.Int64 // agent requests being handled
	fullTLS        atomic.Int64 // TLS handshakes that did not resume a session
}

type host struct {
	id     uuid.UUID
	ip     netip.Addr
	team   uuid.UUID
	shared bool
	mode   atomic.Pointer[modeState]

	mu       sync.Mutex
	vms      map[uuid.UUID]*VM
	busy     map[uuid.UUID]bool // VMs in the middle of a churn operation
	fence    int64              // highest token seen
	destroys []DestroyRecord
	rejected []DestroyRecord

	leaf atomic.Pointer[tls.Certificate] // serving certificate minted by Sim.issuer
}

// New builds a Sim: host ids, teams and the seeded VMs are decided here; the
// listener, database registration and loops start in Run. A Sim runs once.
func New(cfg Config) (*Sim, error) {
	cfg.setDefaults()
	if err := cfg.validate(); err != nil {
		return nil, err
	}
	seed := cfg.Seed
	if seed == 0 {
		var b [8]byte
		_, _ = rand.Read(b[:])
		seed = int64(binary.LittleEndian.Uint64(b[:]) >> 1)
	}
	rng := mrand.New(mrand.NewPCG(uint64(seed), 0x76696769))
	s := &Sim{
		cfg:   cfg,
		log:   cfg.Logger,
		byID:  make(map[uuid.UUID]*host, cfg.Hosts),
		ready: make(chan struct{}),
		now:   time.Now,
		rng:   mrand.New(mrand.NewPCG(rng.Uint64(), rng.Uint64())),
		pool:  cfg.Pool,
	}
	s.teams = make([]uuid.UUID, cfg.Teams)
	for i := range s.teams {
		s.teams[i] = randomUUID(rng)
	}
	shared := int(math.Round(cfg.SharedFraction * float64(cfg.Hosts)))
	now := s.now()
	healthy := &modeState{Mode: Mode{Kind: ModeHealthy}, since: now}
	s.hosts = make([]*host, cfg.Hosts)
	for i := range s.hosts {
		h := &host{
			id:   randomUUID(rng),
			ip:   hostIP(cfg.AddressOffset + i),
			vms:  make(map[uuid.UUID]*VM, cfg.SandboxesPerHost),
			busy: map[uuid.UUID]bool{},
		}
		if i < shared {
			h.shared = true
		} else {
			h.team = s.teams[i%len(s.teams)]
		}
		h.mode.Store(healthy)
		for range cfg.SandboxesPerHost {
			id := randomUUID(rng)
			team := h.team
			if h.shared {
				team = s.teams[rng.IntN(len(s.teams))]
			}
			h.vms[id] = newVM(id, status.Running, team, now)
		}
		s.hosts[i] = h
		s.byID[h.id] = h
	}
	if len(s.byID) != len(s.hosts) {
		return nil, fmt.Errorf("agentsim: duplicate host id from seed %d", seed)
	}
	tlsConfig, err := s.loadTLS()
	if err != nil {
		return nil, err
	}
	s.tlsConfig = tlsConfig
	return s, nil
}

func randomUUID(r *mrand.Rand) uuid.UUID {
	var u uuid.UUID
	binary.BigEndian.PutUint64(u[:8], r.Uint64())
	binary.BigEndian.PutUint64(u[8:], r.Uint64())
	u[6] = u[6]&0x0f | 0x40 // version 4
	u[8] = u[8]&0x3f | 0x80 // RFC 4122 variant
	return u
}

func newVM(id uuid.UUID, label string, team uuid.UUID, now time.Time) *VM {
	return &VM{
		ID: id, Status: label, TeamID: team,
		Template: "base", VCPUs: 2, MemoryMB: 512,
		CreatedAt: now, LastActiveAt: now,
	}
}

// hostIP is host i's address: 127.(1+i/65024).((i/254)%256).(1+i%254).
func hostIP(i int) netip.Addr {
	return netip.AddrFrom4([4]byte{127, byte(1 + i/(256*254)), byte((i / 254) % 256), byte(1 + i%254)})
}

// hostIndex inverts hostIP.
func hostIndex(a netip.Addr) (int, bool) {
	a = a.Unmap()
	if !a.Is4() {
		return 0, false
	}
	b := a.As4()
	if b[0] != 127 || b[1] == 0 || b[3] == 0 || b[3] == 255 {
		return 0, false
	}
	return (int(b[1])-1)*256*254 + int(b[2])*254 + int(b[3]) - 1, true
}

// hostAt is the host served at local address a, or nil.
func (s *Sim) hostAt(a netip.Addr) *host {
	i, ok := hostIndex(a)
	i -= s.cfg.AddressOffset
	if !ok || i < 0 || i >= len(s.hosts) {
		return nil
	}
	return s.hosts[i]
}

func (s *Sim) host(id uuid.UUID) (*host, error) {
	h, ok := s.byID[id]
	if !ok {
		return nil, fmt.Errorf("%w %s", ErrUnknownHost, id)
	}
	return h, nil
}

// Ready is closed once Run has bound the listener, registered the hosts and
// seeded their sandboxes. It never closes if Run fails before that.
func (s *Sim) Ready() <-chan struct{} { return s.ready }

// HostIDs returns the hosts' ids in address order.
func (s *Sim) HostIDs() []uuid.UUID {
	out := make([]uuid.UUID, len(s.hosts))
	for i, h := range s.hosts {
		out[i] = h.id
	}
	return out
}

// InFlight is the number of agent requests being handled right now (a hung
// one counts until its client gives up).
func (s *Sim) InFlight() int { return int(s.inflight.Load()) }

// FullHandshakes is how many TLS handshakes presented a host certificate,
// that is did not resume a session (with a certificate minted per host).
func (s *Sim) FullHandshakes() int64 { return s.fullTLS.Load() }

// Teams returns the team ids the Sim hands out.
func (s *Sim) Teams() []uuid.UUID { return slices.Clone(s.teams) }

// Port is the agent listener's port, 0 until Run has bound it.
func (s *Sim) Port() int { return int(s.port.Load()) }

// Address is the host's "ip:port" as registered in hosts.address; empty for
// an unknown host or before Run has bound the listener.
func (s *Sim) Address(id uuid.UUID) string {
	h, ok := s.byID[id]
	if !ok {
		return ""
	}
	return s.address(h)
}

func (s *Sim) address(h *host) string {
	p := s.port.Load()
	if p == 0 {
		return ""
	}
	return netip.AddrPortFrom(h.ip, uint16(p)).String()
}

// Host describes one host.
func (s *Sim) Host(id uuid.UUID) (HostInfo, error) {
	h, err := s.host(id)
	if err != nil {
		return HostInfo{}, err
	}
	return s.info(h), nil
}

// Hosts describes every host, in address order.
func (s *Sim) Hosts() []HostInfo {
	out := make([]HostInfo, len(s.hosts))
	for i, h := range s.hosts {
		out[i] = s.info(h)
	}
	return out
}

func (s *Sim) info(h *host) HostInfo {
	hi := HostInfo{ID: h.id, Address: s.address(h), Mode: h.mode.Load().Mode}
	if !h.shared {
		t := h.team
		hi.TeamID = &t
	}
	h.mu.Lock()
	hi.VMs = len(h.vms)
	hi.HighestFence = h.fence
	h.mu.Unlock()
	return hi
}

// SetMode switches the host's fault mode at once; requests already waiting
// in the previous mode (hang, slow) finish under it.
func (s *Sim) SetMode(id uuid.UUID, m Mode) error {
	h, err := s.host(id)
	if err != nil {
		return err
	}
	m, err = m.normalize()
	if err != nil {
		return err
	}
	h.mode.Store(&modeState{Mode: m, since: s.now()})
	s.log.Info("host mode set", "host", id, "mode", m.Kind)
	return nil
}

// Mode returns the host's current fault mode.
func (s *Sim) Mode(id uuid.UUID) (Mode, error) {
	h, err := s.host(id)
	if err != nil {
		return Mode{}, err
	}
	return h.mode.Load().Mode, nil
}

// Restart simulates an agent restart: every VM except the paused ones is
// gone. The fault mode and the fencing state survive. It returns how many VMs
// were dropped.
func (s *Sim) Restart(id uuid.UUID) (int, error) {
	h, err := s.host(id)
	if err != nil {
		return 0, err
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	n := 0
	for vid, vm := range h.vms {
		if vm.Status != status.Paused {
			delete(h.vms, vid)
			n++
		}
	}
	s.log.Info("host restarted", "host", id, "dropped", n)
	return n, nil
}

// AddVM puts a VM on the host's agent (replacing one with the same id) with
// any status label, known or not. It does not touch the database.
func (s *Sim) AddVM(hostID, sandboxID uuid.UUID, label string, teamID uuid.UUID) error {
	h, err := s.host(hostID)
	if err != nil {
		return err
	}
	h.mu.Lock()
	h.vms[sandboxID] = newVM(sandboxID, label, teamID, s.now())
	h.mu.Unlock()
	return nil
}

// SetVMStatus changes the label the agent reports for a VM.
func (s *Sim) SetVMStatus(hostID, sandboxID uuid.UUID, label string) error {
	h, err := s.host(hostID)
	if err != nil {
		return err
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	vm, ok := h.vms[sandboxID]
	if !ok {
		return fmt.Errorf("%w %s on host %s", ErrUnknownSandbox, sandboxID, hostID)
	}
	vm.Status = label
	vm.LastActiveAt = s.now()
	return nil
}

// RemoveVM drops a VM from the host's agent.
func (s *Sim) RemoveVM(hostID, sandboxID uuid.UUID) error {
	h, err := s.host(hostID)
	if err != nil {
		return err
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	if _, ok := h.vms[sandboxID]; !ok {
		return fmt.Errorf("%w %s on host %s", ErrUnknownSandbox, sandboxID, hostID)
	}
	delete(h.vms, sandboxID)
	return nil
}

// VMs returns copies of the host's VMs ordered by id; nil for an unknown host.
func (s *Sim) VMs(hostID uuid.UUID) []VM {
	h, ok := s.byID[hostID]
	if !ok {
		return nil
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.snapshot()
}

// snapshot copies the VMs ordered by id; h.mu must be held.
func (h *host) snapshot() []VM {
	out := make([]VM, 0, len(h.vms))
	for _, vm := range h.vms {
		c := *vm
		c.Metadata = cloneMap(vm.Metadata)
		out = append(out, c)
	}
	slices.SortFunc(out, func(a, b VM) int { return compareUUID(a.ID, b.ID) })
	return out
}

func cloneMap(m map[string]string) map[string]string {
	if m == nil {
		return nil
	}
	c := make(map[string]string, len(m))
	for k, v := range m {
		c[k] = v
	}
	return c
}

func compareUUID(a, b uuid.UUID) int {
	for i := range a {
		if a[i] != b[i] {
			return int(a[i]) - int(b[i])
		}
	}
	return 0
}

// Destroys returns the host's accepted DestroySandbox calls (destroyed or
// not_found), oldest first; at most the last 10000 are kept.
func (s *Sim) Destroys(hostID uuid.UUID) []DestroyRecord {
	h, ok := s.byID[hostID]
	if !ok {
		return nil
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	return slices.Clone(h.destroys)
}

// RejectedDestroys returns the host's rejected DestroySandbox calls (stale or
// malformed fence, malformed sandbox id), oldest first.
func (s *Sim) RejectedDestroys(hostID uuid.UUID) []DestroyRecord {
	h, ok := s.byID[hostID]
	if !ok {
		return nil
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	return slices.Clone(h.rejected)
}

// HighestFence is the highest fencing token the host has accepted, 0 if none.
func (s *Sim) HighestFence(hostID uuid.UUID) int64 {
	h, ok := s.byID[hostID]
	if !ok {
		return 0
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.fence
}

func appendRecord(list []DestroyRecord, r DestroyRecord) []DestroyRecord {
	if len(list) >= maxRecords {
		list = slices.Delete(list, 0, len(list)-maxRecords+1)
	}
	return append(list, r)
}

// Run serves the agent RPC, registers the hosts, then heartbeats and churns
// until ctx ends. On cancellation it aborts in-flight requests (hung ones
// included), stops the loops, waits for every goroutine it started and
// returns nil. It returns an error if the listener cannot be bound or
// registration fails. A Sim runs once.
func (s *Sim) Run(ctx context.Context) error {
	if !s.started.CompareAndSwap(false, true) {
		return ErrAlreadyRun
	}
	if s.pool == nil && s.cfg.DatabaseURL != "" {
		pool, err := pgxpool.New(ctx, s.cfg.DatabaseURL)
		if err != nil {
			return fmt.Errorf("agentsim: connect to database: %w", err)
		}
		s.pool, s.ownPool = pool, true
		defer pool.Close()
	}
	srv, err := s.listen()
	if err != nil {
		return err
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	var wg sync.WaitGroup
	serveErr := make(chan error, 1)
	wg.Go(func() { serveErr <- srv.serve() })
	s.log.Info("agent listener bound", "addr", srv.addr(), "hosts", len(s.hosts), "tls", s.tlsMode(), "latency", s.cfg.Latency)

	err = s.register(ctx)
	if err == nil {
		close(s.ready)
		if s.pool != nil && s.cfg.HeartbeatInterval > 0 {
			wg.Go(func() { s.heartbeatLoop(ctx) })
		}
		if s.cfg.ChurnPerSecond > 0 {
			wg.Go(func() { s.churnLoop(ctx) })
		}
		if s.cfg.MonitorInterval > 0 {
			wg.Go(func() { s.monitorLoop(ctx) })
		}
		if s.cfg.MishapsPerSecond > 0 {
			wg.Go(func() { s.mishapLoop(ctx) })
		}
		select {
		case <-ctx.Done():
		case err = <-serveErr:
			err = fmt.Errorf("agentsim: serve: %w", err)
		}
	}
	cancel()
	srv.shutdown()
	wg.Wait()
	s.log.Info("stopped")
	return err
}
