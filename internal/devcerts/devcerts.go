// Package devcerts writes a throwaway PKI for development, tests and
// benchmarks: a self-signed CA and a client certificate for vigil, enough to
// run vigil and agentsim with mutual TLS on one machine. It is NOT for
// production: the CA key sits unprotected beside its certificate, and every
// call mints a new, unrelated CA.
//
// The agent simulator takes the CA itself as its serving certificate
// (agentsim.Config{CAFile: f.CA, CertFile: f.CA, KeyFile: f.CAKey}) and mints
// a leaf for each simulated host's IP from it; vigil's agent pool takes
// agentpool.Config{CAFile: f.CA, CertFile: f.ClientCert, KeyFile: f.ClientKey}.
package devcerts

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"fmt"
	"math/big"
	"os"
	"path/filepath"
	"time"
)

// Validity is how long the generated certificates are valid, from an hour
// before Generate ran (to tolerate clock skew between processes).
const Validity = 365 * 24 * time.Hour

// File names Generate writes into its directory.
const (
	CAFileName         = "ca.pem"
	CAKeyFileName      = "ca-key.pem"
	ClientCertFileName = "client.pem"
	ClientKeyFileName  = "client-key.pem"
)

// Files are the paths Generate wrote. Certificates and keys are PEM
// ("CERTIFICATE", and PKCS #8 "PRIVATE KEY"); key files have mode 0600,
// certificate files 0644.
type Files struct {
	// CA is the self-signed CA certificate (ECDSA P-256, KeyUsageCertSign):
	// the trust bundle for both sides, and agentsim's serving certificate.
	CA string
	// CAKey is the CA's private key.
	CAKey string
	// ClientCert is vigil's client certificate (ExtKeyUsageClientAuth),
	// signed by the CA.
	ClientCert string
	// ClientKey is the client certificate's private key.
	ClientKey string
}

// Generate creates dir if needed (mode 0700) and writes a fresh CA and client
// certificate into it under the *FileName names, replacing files of those
// names. Each file is written to a temporary name and renamed, so a reader
// never sees half a file. For dev and tests only; see the package comment.
func Generate(dir string) (Files, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return Files{}, fmt.Errorf("devcerts: %w", err)
	}
	now := time.Now()
	notBefore, notAfter := now.Add(-time.Hour), now.Add(Validity-time.Hour)

	caKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return Files{}, fmt.Errorf("devcerts: CA key: %w", err)
	}
	caTmpl := &x509.Certificate{
		SerialNumber:          serial(),
		Subject:               pkix.Name{CommonName: "vigil dev CA", Organization: []string{"vigil dev (not for production)"}},
		NotBefore:             notBefore,
		NotAfter:              notAfter,
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign | x509.KeyUsageDigitalSignature,
	}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, caKey.Public(), caKey)
	if err != nil {
		return Files{}, fmt.Errorf("devcerts: CA certificate: %w", err)
	}
	ca, err := x509.ParseCertificate(caDER)
	if err != nil {
		return Files{}, fmt.Errorf("devcerts: CA certificate: %w", err)
	}

	clientKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return Files{}, fmt.Errorf("devcerts: client key: %w", err)
	}
	clientTmpl := &x509.Certificate{
		SerialNumber:          serial(),
		Subject:               pkix.Name{CommonName: "vigil", Organization: []string{"vigil dev (not for production)"}},
		NotBefore:             notBefore,
		NotAfter:              notAfter,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageDigitalSignature,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
	}
	clientDER, err := x509.CreateCertificate(rand.Reader, clientTmpl, ca, clientKey.Public(), caKey)
	if err != nil {
		return Files{}, fmt.Errorf("devcerts: client certificate: %w", err)
	}

	f := Files{
		CA:         filepath.Join(dir, CAFileName),
		CAKey:      filepath.Join(dir, CAKeyFileName),
		ClientCert: filepath.Join(dir, ClientCertFileName),
		ClientKey:  filepath.Join(dir, ClientKeyFileName),
	}
	caKeyPEM, err := keyPEM(caKey)
	if err != nil {
		return Files{}, err
	}
	clientKeyPEM, err := keyPEM(clientKey)
	if err != nil {
		return Files{}, err
	}
	for _, w := range []struct {
		path string
		data []byte
		mode os.FileMode
	}{
		{f.CA, certPEM(caDER), 0o644},
		{f.CAKey, caKeyPEM, 0o600},
		{f.ClientCert, certPEM(clientDER), 0o644},
		{f.ClientKey, clientKeyPEM, 0o600},
	} {
		if err := writeFile(w.path, w.data, w.mode); err != nil {
			return Files{}, err
		}
	}
	return f, nil
}

// serial is a random 127-bit certificate serial number.
func serial() *big.Int {
	n, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	if err != nil {
		panic(err) // crypto/rand does not fail
	}
	return n.Add(n, big.NewInt(1))
}

func certPEM(der []byte) []byte {
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})
}

func keyPEM(k crypto.PrivateKey) ([]byte, error) {
	der, err := x509.MarshalPKCS8PrivateKey(k)
	if err != nil {
		return nil, fmt.Errorf("devcerts: encode key: %w", err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der}), nil
}

// writeFile writes data to path through a temporary file in the same
// directory (created with mode 0600, so a key is never readable by others,
// not even briefly), then sets mode and renames it into place.
func writeFile(path string, data []byte, mode os.FileMode) error {
	tmp, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".*")
	if err != nil {
		return fmt.Errorf("devcerts: %w", err)
	}
	defer os.Remove(tmp.Name()) // no-op once renamed
	if _, err := tmp.Write(data); err != nil {
		_ = tmp.Close()
		return fmt.Errorf("devcerts: write %s: %w", path, err)
	}
	if err := tmp.Chmod(mode); err != nil {
		_ = tmp.Close()
		return fmt.Errorf("devcerts: chmod %s: %w", path, err)
	}
	if err := tmp.Close(); err != nil {
		return fmt.Errorf("devcerts: write %s: %w", path, err)
	}
	if err := os.Rename(tmp.Name(), path); err != nil {
		return fmt.Errorf("devcerts: %w", err)
	}
	return nil
}
