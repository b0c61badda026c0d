package devcerts

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"os"
	"path/filepath"
	"testing"
	"time"
)

func readCert(t *testing.T, path string) *x509.Certificate {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	block, rest := pem.Decode(b)
	if block == nil || block.Type != "CERTIFICATE" || len(rest) != 0 {
		t.Fatalf("%s: want exactly one PEM CERTIFICATE block", path)
	}
	c, err := x509.ParseCertificate(block.Bytes)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func TestGeneratedClientChainVerifiesForClientAuth(t *testing.T) {
	f, err := Generate(filepath.Join(t.TempDir(), "pki"))
	if err != nil {
		t.Fatal(err)
	}
	ca, client := readCert(t, f.CA), readCert(t, f.ClientCert)

	if !ca.IsCA || ca.KeyUsage&x509.KeyUsageCertSign == 0 || ca.CheckSignatureFrom(ca) != nil {
		t.Errorf("CA: IsCA %v, key usage %b, self-signed check %v", ca.IsCA, ca.KeyUsage, ca.CheckSignatureFrom(ca))
	}
	if pub, ok := ca.PublicKey.(*ecdsa.PublicKey); !ok || pub.Curve != elliptic.P256() {
		t.Errorf("CA key is %T, want ECDSA P-256", ca.PublicKey)
	}
	if d := ca.NotAfter.Sub(time.Now()); d < 360*24*time.Hour || d > 366*24*time.Hour {
		t.Errorf("CA valid for another %v, want about a year", d)
	}
	if client.IsCA {
		t.Error("client certificate is a CA")
	}

	roots := x509.NewCertPool()
	roots.AddCert(ca)
	chains, err := client.Verify(x509.VerifyOptions{Roots: roots, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}})
	if err != nil || len(chains) != 1 || len(chains[0]) != 2 {
		t.Fatalf("client certificate for client auth: chains %v, %v", chains, err)
	}
	if _, err := client.Verify(x509.VerifyOptions{Roots: roots, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}}); err == nil {
		t.Error("client certificate verifies for server auth too")
	}

	for _, pair := range [][2]string{{f.CA, f.CAKey}, {f.ClientCert, f.ClientKey}} {
		if _, err := tls.LoadX509KeyPair(pair[0], pair[1]); err != nil {
			t.Errorf("%s + %s: %v", pair[0], pair[1], err)
		}
	}
	for path, want := range map[string]os.FileMode{f.CA: 0o644, f.CAKey: 0o600, f.ClientCert: 0o644, f.ClientKey: 0o600} {
		st, err := os.Stat(path)
		if err != nil {
			t.Fatal(err)
		}
		if st.Mode().Perm() != want {
			t.Errorf("%s: mode %v, want %v", path, st.Mode().Perm(), want)
		}
	}
}

func TestGenerateReplacesThePreviousPKI(t *testing.T) {
	dir := t.TempDir()
	first, err := Generate(dir)
	if err != nil {
		t.Fatal(err)
	}
	oldCA := readCert(t, first.CA)
	second, err := Generate(dir)
	if err != nil {
		t.Fatal(err)
	}
	if second != first {
		t.Fatalf("paths changed: %+v then %+v", first, second)
	}
	if readCert(t, second.CA).Equal(oldCA) {
		t.Error("second Generate kept the old CA")
	}
	entries, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	if len(entries) != 4 {
		t.Errorf("%d files in the directory, want the 4 of Files", len(entries))
	}
}
