package certpem

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"math/big"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func selfSigned(t *testing.T, cn string) *x509.Certificate {
	t.Helper()
	k, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: cn},
		NotBefore: time.Now(), NotAfter: time.Now().Add(time.Hour)}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &k.PublicKey, k)
	if err != nil {
		t.Fatal(err)
	}
	c, _ := x509.ParseCertificate(der)
	return c
}

func TestRoundTripSkipsOtherBlocks(t *testing.T) {
	a, b := selfSigned(t, "a"), selfSigned(t, "b")
	in := append(Encode(a), pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: []byte("x")})...)
	in = append(in, Encode(b)...)
	got, err := Parse(in)
	if err != nil || len(got) != 2 || !got[0].Equal(a) || !got[1].Equal(b) {
		t.Fatalf("Parse = %d certificates, %v; want a, b", len(got), err)
	}
	if !Pool(got).Equal(Pool([]*x509.Certificate{a, b})) {
		t.Error("Pool differs")
	}
}

// A TPM manufacturers' bundle holds hundreds of certificates; a station
// joins several into one file.
func TestLargeBundle(t *testing.T) {
	a := selfSigned(t, "a")
	var bundle []byte
	for range 600 {
		bundle = append(bundle, Encode(a)...)
	}
	if got, err := Parse(bundle); err != nil || len(got) != 600 {
		t.Errorf("Parse of 600 certificates = %d, %v", len(got), err)
	}
}

func TestBadInput(t *testing.T) {
	a := selfSigned(t, "a")
	many := []byte{}
	for range MaxCertificates + 1 {
		many = append(many, Encode(a)...)
	}
	for _, tc := range []struct {
		name string
		in   []byte
		want string
	}{
		{"empty", nil, "no PEM certificate"},
		{"only a key", pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: []byte("x")}), "no PEM certificate"},
		{"bad DER", append(Encode(a), pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: []byte("junk")})...), "certificate 2"},
		{"too many", many, "more than 4096"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if _, err := Parse(tc.in); err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("Parse = %v, want an error containing %q", err, tc.want)
			}
		})
	}
	p := filepath.Join(t.TempDir(), "ca.pem")
	os.WriteFile(p, []byte("not pem"), 0o600)
	if _, err := ReadFile(p); err == nil || !strings.Contains(err.Error(), p) {
		t.Errorf("ReadFile = %v, want an error naming the file", err)
	}
}
