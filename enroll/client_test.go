package enroll

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"math/big"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"
)

// chainFor makes root → leaf for host, valid from nb to na.
func chainFor(t *testing.T, host string, nb, na time.Time) []*x509.Certificate {
	t.Helper()
	chain, _ := chainWithKey(t, host, nb, na)
	return chain
}

// chainWithKey is chainFor with the leaf's private key.
func chainWithKey(t *testing.T, host string, nb, na time.Time) ([]*x509.Certificate, *ecdsa.PrivateKey) {
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
	return []*x509.Certificate{leaf, root}, lk
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
		{"expired, leaf pinned", expired, nil, pin(expired[0]), "station.example", "expired"},
		{"not yet valid by the device clock, leaf pinned", future, nil, pin(future[0]), "station.example", ""},
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

// TestAttackExpiredPinnedStation: a station certificate pinned by its own
// fingerprint (iotstation fingerprint of the leaf) that has expired is
// refused like any other expired certificate: the pin says which key to
// trust, not until when. Whoever holds an expired (and maybe retired,
// leaked) station key must not enroll devices with it. The clock is the
// agent's floor, so a device whose wall clock reads 1970 still refuses a
// certificate that expired before its build.
func TestAttackExpiredPinnedStation(t *testing.T) {
	now := time.Now()
	chain, key := chainWithKey(t, "127.0.0.1", now.Add(-48*time.Hour), now.Add(-24*time.Hour))
	chain[0] = reissueWithIP(t, chain, key)
	srv := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		t.Errorf("the agent sent %s %s to a station whose pinned certificate expired", r.Method, r.URL.Path)
	}))
	srv.TLS = &tls.Config{Certificates: []tls.Certificate{{Certificate: [][]byte{chain[0].Raw}, PrivateKey: key, Leaf: chain[0]}}}
	srv.StartTLS()
	defer srv.Close()
	sum := sha256.Sum256(chain[0].Raw)
	for _, tc := range []struct {
		name  string
		clock *Clock
	}{
		{"wall clock", NewClock(nil)},
		{"wall clock at 1970, floor past the expiry", NewClock(func() time.Time { return time.Unix(0, 0) }, now.Add(-time.Hour))},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c, err := NewClient(ClientConfig{URL: srv.URL, Pin: sum[:], Clock: tc.clock, Timeout: 10 * time.Second})
			if err != nil {
				t.Fatal(err)
			}
			defer c.CloseIdleConnections()
			_, err = c.CACerts(context.Background())
			var inv x509.CertificateInvalidError
			if !errors.As(err, &inv) || inv.Reason != x509.Expired || !strings.Contains(err.Error(), "pinned station certificate") {
				t.Errorf("CACerts against an expired pinned leaf = %v, want x509.Expired naming the pinned station certificate", err)
			}
		})
	}
}

// reissueWithIP re-signs chain's leaf for 127.0.0.1, keeping its validity.
func reissueWithIP(t *testing.T, chain []*x509.Certificate, key *ecdsa.PrivateKey) *x509.Certificate {
	t.Helper()
	tmpl := *chain[0]
	tmpl.IPAddresses = []net.IP{net.IPv4(127, 0, 0, 1)}
	der, err := x509.CreateCertificate(rand.Reader, &tmpl, &tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	c, _ := x509.ParseCertificate(der)
	return c
}

// Over HTTP/2 the station may send only maxReceiveBuffer ahead of a
// reader that does not read (a firmware download waiting on the
// flash): its writes block there, instead of at the default 4 MiB the
// client would hold in memory.
func TestStationSendsAheadAtMostTheReceiveBuffer(t *testing.T) {
	now := time.Now()
	chain, key := chainWithKey(t, "127.0.0.1", now.Add(-time.Hour), now.Add(time.Hour))
	chain[0] = reissueWithIP(t, chain, key)
	sent := make(chan int, 1)
	srv := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		// Blocked by flow control, a write fails at the deadline.
		http.NewResponseController(w).SetWriteDeadline(time.Now().Add(time.Second))
		chunk := make([]byte, 16<<10)
		n := 0
		for n < 8<<20 {
			m, err := w.Write(chunk)
			n += m
			if err != nil {
				break
			}
		}
		sent <- n
	}))
	srv.EnableHTTP2 = true
	srv.TLS = &tls.Config{Certificates: []tls.Certificate{{Certificate: [][]byte{chain[0].Raw}, PrivateKey: key, Leaf: chain[0]}}}
	srv.StartTLS()
	defer srv.Close()
	sum := sha256.Sum256(chain[0].Raw)
	c, err := NewClient(ClientConfig{URL: srv.URL, Pin: sum[:], Timeout: 10 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	defer c.CloseIdleConnections()
	resp, err := c.HTTP(10 * time.Second).Get(srv.URL)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if resp.ProtoMajor != 2 {
		t.Fatalf("the client spoke %s, want HTTP/2", resp.Proto)
	}
	var n int
	select {
	case n = <-sent:
	case <-time.After(10 * time.Second):
		t.Fatal("the handler's writes did not stop at the write deadline")
	}
	// The server's own buffering adds a few KiB to the window.
	if n > maxReceiveBuffer+64<<10 {
		t.Errorf("the station sent %d bytes ahead of a reader that read none, want at most %d", n, maxReceiveBuffer+64<<10)
	}
}
