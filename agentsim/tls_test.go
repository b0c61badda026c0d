package agentsim

import (
	"bufio"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"math/big"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/google/uuid"

	"github.com/vigil-sh/vigil/agentpool"
	"github.com/vigil-sh/vigil/internal/devcerts"
	"github.com/vigil-sh/vigil/internal/ids"
)

// tlsSim runs a Sim whose agents are reached over mutual TLS, with the
// devcerts CA as its serving certificate (a leaf minted per host).
func tlsSim(t *testing.T, hosts int) (started, devcerts.Files) {
	t.Helper()
	pki, err := devcerts.Generate(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	s := start(t, Config{Hosts: hosts, SandboxesPerHost: 2, HeartbeatInterval: -1,
		CAFile: pki.CA, CertFile: pki.CA, KeyFile: pki.CAKey})
	return s, pki
}

// agentPool is vigil's real agent client set up for mutual TLS.
func agentPool(t *testing.T, pki devcerts.Files) *agentpool.Pool {
	t.Helper()
	p, err := agentpool.New(agentpool.Config{CAFile: pki.CA, CertFile: pki.ClientCert, KeyFile: pki.ClientKey, Timeout: 10 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(p.Close)
	return p
}

// tlsClient is a client configuration trusting caFile and, when certFile is
// not empty, presenting that certificate.
func tlsClient(t *testing.T, caFile, certFile, keyFile string) *tls.Config {
	t.Helper()
	b, err := os.ReadFile(caFile)
	if err != nil {
		t.Fatal(err)
	}
	roots := x509.NewCertPool()
	if !roots.AppendCertsFromPEM(b) {
		t.Fatalf("%s: no certificate", caFile)
	}
	cfg := &tls.Config{RootCAs: roots}
	if certFile != "" {
		cert, err := tls.LoadX509KeyPair(certFile, keyFile)
		if err != nil {
			t.Fatal(err)
		}
		cfg.Certificates = []tls.Certificate{cert}
	}
	return cfg
}

// exchange dials addr with crypto/tls (verifying the server certificate
// against the IP in addr), sends one empty ListSandboxes request by hand and
// reads the answer. Under TLS 1.3 the server judges the client certificate
// after the client's side of the handshake is done, so only the exchange
// shows a refusal.
func exchange(t *testing.T, addr string, cfg *tls.Config) (tls.ConnectionState, error) {
	t.Helper()
	d := &tls.Dialer{NetDialer: &net.Dialer{Timeout: 5 * time.Second}, Config: cfg}
	conn, err := d.DialContext(ctxTimeout(t, 10*time.Second), "tcp", addr)
	if err != nil {
		return tls.ConnectionState{}, err
	}
	defer conn.Close()
	tc := conn.(*tls.Conn)
	_ = tc.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := io.WriteString(tc, "POST /hostagent.v1.HostAgentService/ListSandboxes HTTP/1.1\r\nHost: agent\r\n"+
		"Content-Type: application/proto\r\nContent-Length: 0\r\n\r\n"); err != nil {
		return tc.ConnectionState(), err
	}
	resp, err := http.ReadResponse(bufio.NewReader(tc), nil)
	if err != nil {
		return tc.ConnectionState(), err
	}
	_, _ = io.Copy(io.Discard, resp.Body)
	_ = resp.Body.Close()
	if resp.StatusCode != http.StatusOK || resp.ProtoMajor != 1 {
		return tc.ConnectionState(), fmt.Errorf("answer %s %s", resp.Proto, resp.Status)
	}
	return tc.ConnectionState(), nil
}

func sandboxIDs(vms []VM) []string {
	out := make([]string, len(vms))
	for i, vm := range vms {
		out[i] = ids.Sandbox(vm.ID)
	}
	return out
}

func TestMutualTLSWithACertificatePerHost(t *testing.T) {
	s, pki := tlsSim(t, 2)
	hosts := s.HostIDs()
	pool := agentPool(t, pki)

	for _, h := range hosts {
		resp, err := pool.ListSandboxes(ctxTimeout(t, 10*time.Second), h, s.Address(h))
		if err != nil {
			t.Fatalf("host %s: ListSandboxes over mutual TLS: %v", h, err)
		}
		var got []string
		for _, sb := range resp.GetSandboxes() {
			got = append(got, sb.GetSandboxId())
		}
		if want := sandboxIDs(s.VMs(h)); !slices.Equal(got, want) {
			t.Errorf("host %s answered %v, want %v", h, got, want)
		}
	}
	if err := pool.DestroySandbox(ctxTimeout(t, 10*time.Second), hosts[0], s.Address(hosts[0]), ids.Sandbox(uuid.New()), "1:1"); err != nil {
		t.Errorf("DestroySandbox over mutual TLS: %v", err)
	}

	good := func() *tls.Config { return tlsClient(t, pki.CA, pki.ClientCert, pki.ClientKey) }

	t.Run("each host presents a leaf for its own IP, one key for all", func(t *testing.T) {
		var keys []*ecdsa.PublicKey
		for _, h := range hosts {
			st, err := exchange(t, s.Address(h), good())
			if err != nil {
				t.Fatalf("host %s: %v", h, err)
			}
			leaf := st.PeerCertificates[0]
			ip, _, _ := net.SplitHostPort(s.Address(h))
			if len(leaf.IPAddresses) != 1 || leaf.IPAddresses[0].String() != ip || leaf.IsCA {
				t.Errorf("host %s (%s) presented a certificate for %v (CA %v)", h, ip, leaf.IPAddresses, leaf.IsCA)
			}
			if len(st.VerifiedChains) == 0 {
				t.Errorf("host %s: no verified chain", h)
			}
			if d := leaf.NotAfter.Sub(time.Now()); d > 25*time.Hour {
				t.Errorf("host %s: leaf valid for another %v, want a short validity", h, d)
			}
			again, err := exchange(t, s.Address(h), good())
			if err != nil {
				t.Fatal(err)
			}
			if !again.PeerCertificates[0].Equal(leaf) {
				t.Errorf("host %s: second handshake presented another leaf, want the cached one", h)
			}
			keys = append(keys, leaf.PublicKey.(*ecdsa.PublicKey))
		}
		if !keys[0].Equal(keys[1]) {
			t.Error("hosts' leaves have different keys, want one shared key pair")
		}
	})
	t.Run("HTTP/2 is not negotiated", func(t *testing.T) {
		cfg := good()
		cfg.NextProtos = []string{"h2", "http/1.1"}
		st, err := exchange(t, s.Address(hosts[0]), cfg)
		if err != nil || st.NegotiatedProtocol != "http/1.1" {
			t.Fatalf("offered h2 and http/1.1: negotiated %q, %v; want http/1.1", st.NegotiatedProtocol, err)
		}
		cfg = good()
		cfg.NextProtos = []string{"h2"}
		if st, err := exchange(t, s.Address(hosts[0]), cfg); err == nil || st.NegotiatedProtocol == "h2" {
			t.Fatalf("offered only h2: negotiated %q, %v; want a failed handshake", st.NegotiatedProtocol, err)
		}
	})
	t.Run("sessions resume", func(t *testing.T) {
		cfg := good()
		cfg.ClientSessionCache = tls.NewLRUClientSessionCache(4)
		if _, err := exchange(t, s.Address(hosts[1]), cfg); err != nil {
			t.Fatal(err)
		}
		st, err := exchange(t, s.Address(hosts[1]), cfg)
		if err != nil || !st.DidResume {
			t.Fatalf("second connection: resumed %v, %v; want a resumed session", st.DidResume, err)
		}
	})
	t.Run("a client without a certificate is refused", func(t *testing.T) {
		_, err := exchange(t, s.Address(hosts[0]), tlsClient(t, pki.CA, "", ""))
		if err == nil || !strings.Contains(err.Error(), "tls:") {
			t.Fatalf("no client certificate: %v, want a TLS refusal", err)
		}
		t.Logf("refused: %v", err)
	})
	t.Run("a client certificate from another CA is refused", func(t *testing.T) {
		other, err := devcerts.Generate(t.TempDir())
		if err != nil {
			t.Fatal(err)
		}
		_, err = exchange(t, s.Address(hosts[0]), tlsClient(t, pki.CA, other.ClientCert, other.ClientKey))
		if err == nil || !strings.Contains(err.Error(), "tls:") {
			t.Fatalf("client certificate from another CA: %v, want a TLS refusal", err)
		}
		t.Logf("refused: %v", err)
		// And vigil's own pool with that PKI gets nowhere either.
		resp, err := agentPool(t, other).ListSandboxes(ctxTimeout(t, 10*time.Second), hosts[0], s.Address(hosts[0]))
		if err == nil {
			t.Fatalf("pool with another PKI listed %v", resp)
		}
	})
	t.Run("plain HTTP fails", func(t *testing.T) {
		got, err := list(ctxTimeout(t, 10*time.Second), client(t, http1(t), s.Address(hosts[0])))
		if err == nil {
			t.Fatalf("plain HTTP to the TLS listener answered %v", got)
		}
	})
	t.Run("connections to other addresses are still closed", func(t *testing.T) {
		_, port, _ := net.SplitHostPort(s.Address(hosts[0]))
		if _, err := exchange(t, net.JoinHostPort("127.0.0.1", port), good()); err == nil {
			t.Fatal("127.0.0.1 answered")
		}
	})
}

// writeServerCert writes a server certificate for ips, signed by the devcerts
// CA, and returns its PEM file, key file and parsed form.
func writeServerCert(t *testing.T, pki devcerts.Files, ips ...string) (string, string, *x509.Certificate) {
	t.Helper()
	ca, err := tls.LoadX509KeyPair(pki.CA, pki.CAKey)
	if err != nil {
		t.Fatal(err)
	}
	caCert, err := x509.ParseCertificate(ca.Certificate[0])
	if err != nil {
		t.Fatal(err)
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(4242),
		Subject:      pkix.Name{CommonName: "agents"},
		NotBefore:    time.Now().Add(-time.Minute),
		NotAfter:     time.Now().Add(time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	for _, ip := range ips {
		tmpl.IPAddresses = append(tmpl.IPAddresses, net.ParseIP(ip))
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, caCert, key.Public(), ca.PrivateKey)
	if err != nil {
		t.Fatal(err)
	}
	keyDER, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	certFile, keyFile := filepath.Join(dir, "server.pem"), filepath.Join(dir, "server-key.pem")
	if err := os.WriteFile(certFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(keyFile, pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: keyDER}), 0o600); err != nil {
		t.Fatal(err)
	}
	cert, _ := x509.ParseCertificate(der)
	return certFile, keyFile, cert
}

func TestMutualTLSWithALeafCertificateServesItAsIs(t *testing.T) {
	pki, err := devcerts.Generate(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	certFile, keyFile, want := writeServerCert(t, pki, "127.1.0.1", "127.1.0.2")
	s := start(t, Config{Hosts: 2, SandboxesPerHost: 1, HeartbeatInterval: -1, CAFile: pki.CA, CertFile: certFile, KeyFile: keyFile})
	pool := agentPool(t, pki)
	for _, h := range s.HostIDs() {
		if _, err := pool.ListSandboxes(ctxTimeout(t, 10*time.Second), h, s.Address(h)); err != nil {
			t.Fatalf("host %s: %v", h, err)
		}
		st, err := exchange(t, s.Address(h), tlsClient(t, pki.CA, pki.ClientCert, pki.ClientKey))
		if err != nil {
			t.Fatal(err)
		}
		if !st.PeerCertificates[0].Equal(want) {
			t.Errorf("host %s presented %v, want the configured certificate", h, st.PeerCertificates[0].Subject)
		}
	}
}

func TestTLSConfigErrorsNameTheFile(t *testing.T) {
	pki, err := devcerts.Generate(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	missing := filepath.Join(t.TempDir(), "absent.pem")
	for _, tc := range []struct {
		name          string
		ca, cert, key string
		field         string
	}{
		{"CA without certificate and key", pki.CA, "", "", "CertFile"},
		{"certificate without key", pki.CA, pki.CA, "", "KeyFile"},
		{"certificate and key without CA", "", pki.CA, pki.CAKey, "CAFile"},
		{"unreadable CA", missing, pki.CA, pki.CAKey, "CAFile"},
		{"CA file without a certificate", pki.CAKey, pki.CA, pki.CAKey, "CAFile"},
		{"unreadable certificate", pki.CA, missing, pki.CAKey, "CertFile"},
		{"unreadable key", pki.CA, pki.CA, missing, "KeyFile"},
		{"key of another certificate", pki.CA, pki.CA, pki.ClientKey, "KeyFile"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := New(Config{Hosts: 1, CAFile: tc.ca, CertFile: tc.cert, KeyFile: tc.key})
			var ce *ConfigError
			if !errors.As(err, &ce) || ce.Field != tc.field {
				t.Fatalf("New = %v, want a ConfigError on %s", err, tc.field)
			}
			if strings.Contains(err.Error(), "PRIVATE KEY") {
				t.Errorf("error quotes key material: %v", err)
			}
		})
	}
}

// vigil's pool resumes its TLS sessions when it dials an agent again (its
// idle connections capped below the fleet, as at fleet scale): a dial after
// the first costs no certificate signing or verification.
func TestPoolResumesSessionsOnRedial(t *testing.T) {
	const hosts = 200
	s, pki := tlsSim(t, hosts)
	p, err := agentpool.New(agentpool.Config{CAFile: pki.CA, CertFile: pki.ClientCert, KeyFile: pki.ClientKey,
		Timeout: 10 * time.Second, MaxIdleConns: 20})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(p.Close)
	ids := s.HostIDs()
	for round := 0; round < 3; round++ {
		for _, h := range ids {
			if _, err := p.ListSandboxes(ctxTimeout(t, 10*time.Second), h, s.Address(h)); err != nil {
				t.Fatalf("round %d, host %s: %v", round, h, err)
			}
		}
		t.Logf("after round %d: %d full handshakes", round, s.FullHandshakes())
	}
	if n := s.FullHandshakes(); n > hosts+hosts/20 {
		t.Fatalf("%d full handshakes over 3 rounds of %d hosts with 20 idle connections: sessions are not resumed", n, hosts)
	}
}
