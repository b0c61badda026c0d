package agentpool

import (
	"bufio"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"flag"
	"fmt"
	"io"
	"log"
	"math/big"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"runtime"
	"runtime/pprof"
	"strings"
	"sync"
	"testing"
	"time"

	"connectrpc.com/connect"
	"github.com/google/uuid"

	hostagentv1 "github.com/vigil-sh/vigil/proto/hostagent/v1"
	"github.com/vigil-sh/vigil/proto/hostagent/v1/hostagentv1connect"
)

// BenchmarkIdleConnMemory's flags. By default it keeps 2,000 idle
// connections: enough for the per-connection cost to dwarf the pool's fixed
// one, few enough for the file descriptors (one per connection here, two
// per agent in the agents' process) to stay far below the usual limits.
var (
	idleAgents = flag.Int("idleagents", 2000, "agents BenchmarkIdleConnMemory keeps an idle connection to")
	idleHeap   = flag.String("idleheap", "", "BenchmarkIdleConnMemory writes a heap profile taken while its connections are idle to `PREFIX`-<sub-benchmark>.pprof")
)

// BenchmarkIdleConnMemory measures what keeping one idle connection per
// agent costs the pool: the heap it holds per agent (B/idle-conn) once it
// called each of -idleagents agents and their connections are idle, less
// what it held before. The agents run in a child process (this test binary
// again, see serveIdleAgents), so their side of the connections is not
// counted; each listens on a loopback address of its own, as agents have an
// address each, and with mutual TLS presents a certificate of its own.
//
//	go test -run '^$' -bench IdleConnMemory -count 5 ./agentpool
//
// A heap profile of the idle connections (-memprofilerate 1 samples every
// allocation):
//
//	go test ./agentpool -run '^$' -bench 'IdleConnMemory/mTLS$' -memprofilerate 1 -idleheap /tmp/idle
//	go tool pprof -top -sample_index=inuse_space /tmp/idle-mTLS.pprof
//
// plain and mTLS make one call per agent, answered in 2 KiB. mTLS-aged makes
// ten, answered in 16 KiB, which is what long-lived connections to busy
// hosts cost: a Go agent's TLS records grow with the records a connection
// has carried, up to 16 KiB, and each connection's crypto/tls input buffer
// grows to fit the largest record it received (up to twice that) and never
// shrinks.
func BenchmarkIdleConnMemory(b *testing.B) {
	if runtime.GOOS != "linux" {
		b.Skip("the agents listen on 127.1.x.y, which only Linux routes to the loopback interface unconfigured")
	}
	b.Run("plain", func(b *testing.B) { benchIdleConns(b, idleSpec{Agents: *idleAgents}) })
	b.Run("mTLS", func(b *testing.B) { benchIdleConns(b, idleSpec{Agents: *idleAgents, TLS: true}) })
	b.Run("mTLS-aged", func(b *testing.B) {
		benchIdleConns(b, idleSpec{Agents: *idleAgents, TLS: true, AnswerBytes: 16 << 10, Calls: 10})
	})
}

func benchIdleConns(b *testing.B, spec idleSpec) {
	var cfg Config
	if spec.TLS {
		spec.PKI, cfg = idlePKI(b)
	}
	addrs := startIdleAgents(b, spec)
	// addrs[0] warms the pool up; the others are measured.
	cfg.MaxIdleConns, cfg.IdleTimeout = len(addrs)-1, time.Hour
	var sum float64
	for range b.N {
		sum += idleBytesPerConn(b, cfg, addrs[0], addrs[1:], max(spec.Calls, 1))
	}
	b.ReportMetric(sum/float64(b.N), "B/idle-conn")
}

// idleBytesPerConn calls each of agents calls times through a new pool and
// returns the heap the pool holds afterwards per idle connection. One call
// to warm (its connection then closed) comes first, so what the pool, its
// libraries and the TLS configuration allocate once is not counted.
func idleBytesPerConn(b *testing.B, cfg Config, warm string, agents []string, calls int) float64 {
	p, err := New(cfg)
	if err != nil {
		b.Fatal(err)
	}
	defer p.Close()
	callAll(b, p, []string{warm})
	p.Close()
	before := liveHeap()
	for range calls {
		callAll(b, p, agents)
	}
	if n := p.tr.idleCount(); n != len(agents) {
		b.Fatalf("%d idle connections, want %d", n, len(agents))
	}
	after := liveHeap()
	if *idleHeap != "" {
		writeHeapProfile(b, fmt.Sprintf("%s-%s.pprof", *idleHeap, path.Base(b.Name())))
	}
	runtime.KeepAlive(p)
	return float64(after-before) / float64(len(agents))
}

// liveHeap returns the bytes of live heap objects. Two collections empty
// the sync.Pools (the first moves their contents to a victim cache).
func liveHeap() uint64 {
	runtime.GC()
	runtime.GC()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	return ms.HeapAlloc
}

func writeHeapProfile(b *testing.B, name string) {
	f, err := os.Create(name)
	if err != nil {
		b.Fatal(err)
	}
	defer f.Close()
	if err := pprof.Lookup("heap").WriteTo(f, 0); err != nil {
		b.Fatal(err)
	}
}

// callAll calls ListSandboxes once on each agent, a few at a time.
func callAll(b *testing.B, p *Pool, agents []string) {
	work := make(chan string)
	var wg sync.WaitGroup
	errs := make(chan error, 1)
	for range 8 {
		wg.Go(func() {
			for addr := range work {
				ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
				// One host ID per agent, as the pool caches a target per host.
				id := uuid.NewSHA1(uuid.NameSpaceURL, []byte(addr))
				_, err := p.ListSandboxes(ctx, id, addr)
				cancel()
				if err != nil {
					select {
					case errs <- err:
					default:
					}
				}
			}
		})
	}
	for _, a := range agents {
		work <- a
	}
	close(work)
	wg.Wait()
	select {
	case err := <-errs:
		b.Fatal(err)
	default:
	}
}

// idlePKI writes a CA (certificate and key, for the agents' process to mint
// their certificates) and a client certificate, and returns their directory
// and a pool configuration using them.
func idlePKI(b *testing.B) (string, Config) {
	dir := b.TempDir()
	ca := newCA(b, "vigil idle test CA")
	caKey, err := x509.MarshalECPrivateKey(ca.key)
	if err != nil {
		b.Fatal(err)
	}
	writeFile(b, dir, "ca-key.pem", pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: caKey}))
	clientCert, clientKey := ca.issue(b, "vigil-client", x509.ExtKeyUsageClientAuth)
	return dir, Config{
		CAFile:   writeFile(b, dir, "ca.pem", ca.pem),
		CertFile: writeFile(b, dir, "client.pem", clientCert),
		KeyFile:  writeFile(b, dir, "client-key.pem", clientKey),
	}
}

// idleSpec is what the agents' process serves, passed in idleAgentsEnv.
type idleSpec struct {
	Agents      int    // how many, plus one to warm up with
	TLS         bool   // mutual TLS, certificates minted from PKI's CA
	PKI         string // directory of ca.pem and ca-key.pem
	AnswerBytes int    // approximate size of a ListSandboxes answer; 0: 2 KiB
	Calls       int    // calls to each agent before measuring; 0: 1
}

// idleAgentsEnv holds the idleSpec of a child process that serves agents
// instead of running tests (TestMain).
const idleAgentsEnv = "AGENTPOOL_IDLE_AGENTS"

// startIdleAgents starts the agents' process and returns their addresses.
// The process ends when its standard input closes, at the end of b.
func startIdleAgents(b *testing.B, spec idleSpec) []string {
	js, err := json.Marshal(spec)
	if err != nil {
		b.Fatal(err)
	}
	cmd := exec.Command(os.Args[0])
	cmd.Env = append(os.Environ(), idleAgentsEnv+"="+string(js))
	var stderr strings.Builder
	cmd.Stderr = &stderr
	stdin, err := cmd.StdinPipe()
	if err != nil {
		b.Fatal(err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		b.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() {
		stdin.Close()
		if err := cmd.Wait(); err != nil {
			b.Errorf("agents' process: %v: %s", err, stderr.String())
		}
	})
	var addrs []string
	sc := bufio.NewScanner(stdout)
	for len(addrs) < spec.Agents+1 && sc.Scan() {
		addrs = append(addrs, sc.Text())
	}
	if len(addrs) < spec.Agents+1 {
		stdin.Close()
		_ = cmd.Wait()
		b.Fatalf("agents' process gave %d addresses of %d: %s", len(addrs), spec.Agents+1, stderr.String())
	}
	return addrs
}

// serveIdleAgents is the agents' process: it serves the idleSpec in
// idleAgentsEnv on 127.1.x.y, one address per agent, writes the addresses
// to standard output, one a line, and serves until its standard input
// closes. It returns the exit code.
func serveIdleAgents() int {
	var spec idleSpec
	if err := json.Unmarshal([]byte(os.Getenv(idleAgentsEnv)), &spec); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 2
	}
	mux := http.NewServeMux()
	mux.Handle(hostagentv1connect.NewHostAgentServiceHandler(&fakeAgent{list: answerOf(spec.AnswerBytes)}))
	srv := &http.Server{Handler: mux, ErrorLog: log.New(io.Discard, "", 0)}
	var cfg *tls.Config
	if spec.TLS {
		var err error
		if cfg, err = idleAgentTLS(spec); err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 2
		}
	}
	out := bufio.NewWriter(os.Stdout)
	for i := range spec.Agents + 1 {
		ln, err := net.Listen("tcp4", fmt.Sprintf("127.1.%d.%d:0", i/250, i%250+1))
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 2
		}
		fmt.Fprintln(out, ln.Addr())
		if cfg != nil {
			ln = tls.NewListener(ln, cfg)
		}
		go srv.Serve(ln) // until the process exits
	}
	if err := out.Flush(); err != nil {
		return 2
	}
	_, _ = io.Copy(io.Discard, os.Stdin)
	return 0
}

// answerOf answers ListSandboxes with sandboxes of about 256 bytes each,
// about n bytes in all (2 KiB when n is 0).
func answerOf(n int) func(context.Context, *connect.Request[hostagentv1.ListSandboxesRequest]) (*connect.Response[hostagentv1.ListSandboxesResponse], error) {
	if n == 0 {
		n = 2 << 10
	}
	resp := &hostagentv1.ListSandboxesResponse{}
	for i := range n / 256 {
		resp.Sandboxes = append(resp.Sandboxes, &hostagentv1.SandboxInfo{
			SandboxId:        fmt.Sprintf("cl-%025d", i),
			Status:           "running",
			Template:         "base",
			Vcpus:            2,
			MemoryMb:         2048,
			HostIp:           "10.0.0.1",
			CreatedAtUnix:    time.Now().Unix(),
			LastActiveAtUnix: time.Now().Unix(),
			TimeoutSec:       3600,
			TeamId:           uuid.NewString(),
			TemplateId:       uuid.NewString(),
			Metadata:         map[string]string{"noise": noise(100)},
		})
	}
	return func(context.Context, *connect.Request[hostagentv1.ListSandboxesRequest]) (*connect.Response[hostagentv1.ListSandboxesResponse], error) {
		return connect.NewResponse(resp), nil
	}
}

// idleAgentTLS is the agents' TLS: each agent presents a certificate for
// the address it was dialled at, minted on first use from the CA in
// spec.PKI (one key for all, which changes nothing for the client), and
// requires a client certificate from that CA.
func idleAgentTLS(spec idleSpec) (*tls.Config, error) {
	ca, err := tls.LoadX509KeyPair(filepath.Join(spec.PKI, "ca.pem"), filepath.Join(spec.PKI, "ca-key.pem"))
	if err != nil {
		return nil, err
	}
	caCert, err := x509.ParseCertificate(ca.Certificate[0])
	if err != nil {
		return nil, err
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	var mu sync.Mutex
	leaves := map[string]*tls.Certificate{}
	mint := func(hello *tls.ClientHelloInfo) (*tls.Certificate, error) {
		ip := hello.Conn.LocalAddr().(*net.TCPAddr).IP
		mu.Lock()
		defer mu.Unlock()
		if c := leaves[ip.String()]; c != nil {
			return c, nil
		}
		tmpl := &x509.Certificate{
			SerialNumber: big.NewInt(int64(len(leaves) + 2)),
			NotBefore:    time.Now().Add(-time.Hour),
			NotAfter:     time.Now().Add(time.Hour),
			KeyUsage:     x509.KeyUsageDigitalSignature,
			ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
			IPAddresses:  []net.IP{ip},
		}
		tmpl.Subject.CommonName = "agent " + ip.String()
		der, err := x509.CreateCertificate(rand.Reader, tmpl, caCert, &key.PublicKey, ca.PrivateKey)
		if err != nil {
			return nil, err
		}
		c := &tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}
		leaves[ip.String()] = c
		return c, nil
	}
	clientCAs := x509.NewCertPool()
	clientCAs.AddCert(caCert)
	return &tls.Config{
		GetCertificate: mint,
		ClientAuth:     tls.RequireAndVerifyClientCert,
		ClientCAs:      clientCAs,
		NextProtos:     []string{"http/1.1"},
	}, nil
}
