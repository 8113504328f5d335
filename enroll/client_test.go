package enroll

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"crypto/x509/pkix"
	"math/big"
	"strings"
	"testing"
	"time"
)

// chainFor makes root → leaf for host, valid from nb to na.
func chainFor(t *testing.T, host string, nb, na time.Time) []*x509.Certificate {
	t.Helper()
	rk, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	lk, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	rt := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "root"}, NotBefore: nb, NotAfter: na.Add(time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign}
	rder, _ := x509.CreateCertificate(rand.Reader, rt, rt, &rk.PublicKey, rk)
	root, _ := x509.ParseCertificate(rder)
	lt := &x509.Certificate{SerialNumber: big.NewInt(2), Subject: pkix.Name{CommonName: "station"}, NotBefore: nb, NotAfter: na,
		DNSNames: []string{host}, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}}
	lder, err := x509.CreateCertificate(rand.Reader, lt, root, &lk.PublicKey, rk)
	if err != nil {
		t.Fatal(err)
	}
	leaf, _ := x509.ParseCertificate(lder)
	return []*x509.Certificate{leaf, root}
}

func TestVerifyStation(t *testing.T) {
	now := time.Now()
	good := chainFor(t, "station.example", now.Add(-time.Hour), now.Add(time.Hour))
	future := chainFor(t, "station.example", now.Add(24*time.Hour), now.Add(48*time.Hour))
	expired := chainFor(t, "station.example", now.Add(-48*time.Hour), now.Add(-24*time.Hour))
	pin := func(c *x509.Certificate) []byte { s := sha256.Sum256(c.Raw); return s[:] }
	pool := func(c *x509.Certificate) *x509.CertPool { p := x509.NewCertPool(); p.AddCert(c); return p }
	for _, tc := range []struct {
		name  string
		chain []*x509.Certificate
		roots *x509.CertPool
		pin   []byte
		host  string
		want  string // "" = accepted
	}{
		{"pinned root", good, nil, pin(good[1]), "station.example", ""},
		{"pinned leaf", good, nil, pin(good[0]), "station.example", ""},
		{"roots", good, pool(good[1]), nil, "station.example", ""},
		{"wrong pin", good, nil, pin(future[1]), "station.example", "no certificate with fingerprint"},
		{"other host", good, nil, pin(good[1]), "evil.example", "not evil.example"},
		{"other root", good, pool(future[1]), nil, "station.example", "unknown authority"},
		// The device's clock is a lower bound: a certificate valid from
		// after it may be valid now.
		{"not yet valid by the device clock", future, nil, pin(future[1]), "station.example", ""},
		{"expired", expired, nil, pin(expired[1]), "station.example", "expired"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := verifyStation(tc.chain, tc.roots, tc.pin, tc.host, now)
			if tc.want == "" && err != nil || tc.want != "" && (err == nil || !strings.Contains(err.Error(), tc.want)) {
				t.Errorf("verifyStation = %v, want %q", err, tc.want)
			}
		})
	}
}

func TestParsePin(t *testing.T) {
	good := "sha256:" + strings.Repeat("ab", 32)
	if b, err := ParsePin(good); err != nil || len(b) != 32 {
		t.Errorf("ParsePin(%q) = %x, %v", good, b, err)
	}
	for _, bad := range []string{"", strings.Repeat("ab", 32), "sha1:" + strings.Repeat("ab", 20), "sha256:xyz", "sha256:" + strings.Repeat("ab", 31)} {
		if _, err := ParsePin(bad); err == nil || !strings.Contains(err.Error(), "want sha256:") {
			t.Errorf("ParsePin(%q) = %v, want an error", bad, err)
		}
	}
}
