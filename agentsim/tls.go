package agentsim

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"fmt"
	"math/big"
	"net"
	"net/netip"
	"os"
	"time"
)

// Minted host certificates are valid for leafValidity from a minute before
// they are minted (clock skew), capped at the issuing CA's own expiry, and
// re-minted on the first handshake after half of that has passed.
const leafValidity = 24 * time.Hour

// loadTLS reads the TLS files of a validated Config and builds the agent
// listener's TLS configuration, or returns nil when TLS is off. Problems are
// *ConfigErrors naming the file's field. Nothing read here is logged.
func (s *Sim) loadTLS() (*tls.Config, error) {
	c := &s.cfg
	if !c.tlsEnabled() {
		return nil, nil
	}
	bad := func(field, format string, args ...any) error {
		return &ConfigError{Field: field, Msg: fmt.Sprintf(format, args...)}
	}
	caPEM, err := os.ReadFile(c.CAFile)
	if err != nil {
		return nil, bad("CAFile", "%v", err)
	}
	clientCAs := x509.NewCertPool()
	if !clientCAs.AppendCertsFromPEM(caPEM) {
		return nil, bad("CAFile", "%s holds no PEM certificate", c.CAFile)
	}
	certPEM, err := os.ReadFile(c.CertFile)
	if err != nil {
		return nil, bad("CertFile", "%v", err)
	}
	keyPEM, err := os.ReadFile(c.KeyFile)
	if err != nil {
		return nil, bad("KeyFile", "%v", err)
	}
	cert, err := tls.X509KeyPair(certPEM, keyPEM)
	if err != nil {
		return nil, bad("KeyFile", "with the serving certificate %s: %v", c.CertFile, err)
	}
	serving, err := x509.ParseCertificate(cert.Certificate[0])
	if err != nil {
		return nil, bad("CertFile", "%v", err)
	}

	cfg := &tls.Config{
		MinVersion: tls.VersionTLS12,
		ClientAuth: tls.RequireAndVerifyClientCert,
		ClientCAs:  clientCAs,
		// HTTP/1.1 only, like the real agents; a client offering only h2
		// fails the handshake. Session tickets stay on (the default), so
		// clients resume instead of handshaking in full on every dial.
		NextProtos: []string{"http/1.1"},
	}
	if !serving.IsCA || serving.KeyUsage&x509.KeyUsageCertSign == 0 {
		cfg.Certificates = []tls.Certificate{cert}
		return cfg, nil
	}
	signer, ok := cert.PrivateKey.(crypto.Signer)
	if !ok {
		return nil, bad("KeyFile", "a %T cannot sign host certificates", cert.PrivateKey)
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("agentsim: host certificate key: %w", err)
	}
	s.issuer = &leafIssuer{ca: serving, signer: signer, chain: cert.Certificate, key: key}
	cfg.GetCertificate = s.hostCertificate
	return cfg, nil
}

// leafIssuer mints the serving certificate of each host from the configured
// CA. All leaves share one key pair, so a first handshake with each of
// 10,000 hosts costs 10,000 signatures but no key generation.
type leafIssuer struct {
	ca     *x509.Certificate
	signer crypto.Signer
	chain  [][]byte // the configured certificate and its chain, sent after each leaf
	key    *ecdsa.PrivateKey
}

// mint issues a certificate for ip, valid from a minute before now.
func (li *leafIssuer) mint(ip netip.Addr, now time.Time) (*tls.Certificate, error) {
	sn, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	if err != nil {
		return nil, err
	}
	notAfter := now.Add(leafValidity)
	if notAfter.After(li.ca.NotAfter) {
		notAfter = li.ca.NotAfter
	}
	tmpl := &x509.Certificate{
		SerialNumber:          sn.Add(sn, big.NewInt(1)),
		Subject:               pkix.Name{CommonName: ip.String()},
		NotBefore:             now.Add(-time.Minute),
		NotAfter:              notAfter,
		IPAddresses:           []net.IP{ip.AsSlice()},
		KeyUsage:              x509.KeyUsageDigitalSignature,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		BasicConstraintsValid: true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, li.ca, li.key.Public(), li.signer)
	if err != nil {
		return nil, fmt.Errorf("agentsim: mint certificate for %s: %w", ip, err)
	}
	leaf, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, fmt.Errorf("agentsim: mint certificate for %s: %w", ip, err)
	}
	return &tls.Certificate{
		Certificate: append([][]byte{der}, li.chain...),
		PrivateKey:  li.key,
		Leaf:        leaf,
	}, nil
}

// hostCertificate is tls.Config.GetCertificate when the serving certificate
// is a CA: it picks the host by the address the client dialled (clients send
// no SNI for an IP) and returns its cached leaf, minting one on the host's
// first handshake or once half of the cached leaf's validity has passed.
// Concurrent first handshakes may each mint; one certificate wins and all of
// them present it.
func (s *Sim) hostCertificate(hello *tls.ClientHelloInfo) (*tls.Certificate, error) {
	h := s.connHost(hello.Conn)
	if h == nil {
		return nil, errors.New("agentsim: TLS connection to an address that is not a simulated host")
	}
	s.fullTLS.Add(1) // a resumed handshake presents no certificate
	now := s.now()
	cached := h.leaf.Load()
	if cached != nil && now.Sub(cached.Leaf.NotBefore) < leafValidity/2 {
		return cached, nil
	}
	c, err := s.issuer.mint(h.ip, now)
	if err != nil {
		s.log.Error("cannot mint host certificate", "host", h.id, "error", err)
		return nil, err
	}
	if !h.leaf.CompareAndSwap(cached, c) {
		return h.leaf.Load(), nil
	}
	return c, nil
}

// tlsMode describes the listener's TLS set-up for logs: no paths, no keys.
func (s *Sim) tlsMode() string {
	switch {
	case s.tlsConfig == nil:
		return "off"
	case s.issuer != nil:
		return "mutual, a certificate per host minted from the configured CA"
	default:
		return "mutual, the configured certificate for every host"
	}
}
