package handshake

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"math/big"
	"net"
	"testing"
	"time"
)

func TestSnake(t *testing.T) {
	for in, want := range map[string]string{
		"BadCertificate":                "bad_certificate",
		"UnknownCA":                     "unknown_ca",
		"bad certificate":               "bad_certificate",
		"certificate expired":           "certificate_expired",
		"NoRenegotiation":               "no_renegotiation",
		"unknown certificate authority": "unknown_certificate_authority",
		"":                              "",
	} {
		if got := Snake(in); got != want {
			t.Errorf("Snake(%q) = %q, want %q", in, got, want)
		}
	}
}

// TestTLS classifies the errors crypto/tls really returns: a handshake
// against a server whose certificate the client does not trust, one the
// server refuses with an alert, and one that times out.
func TestTLS(t *testing.T) {
	server := selfSigned(t, "example.com")
	ln, err := tls.Listen("tcp", "127.0.0.1:0", &tls.Config{Certificates: []tls.Certificate{server}, ClientAuth: tls.RequireAnyClientCert, MaxVersion: tls.VersionTLS12})
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() { c.(*tls.Conn).Handshake(); c.Close() }()
		}
	}()
	dial := func(cfg *tls.Config) error {
		c, err := tls.Dial("tcp", ln.Addr().String(), cfg)
		if err == nil {
			c.Close()
		}
		return err
	}
	// No root trusts the server.
	if got := TLS(dial(&tls.Config{ServerName: "example.com"})); got != UnknownCA {
		t.Errorf("untrusted server: %q, want %q", got, UnknownCA)
	}
	// Trusted, but not for this name.
	leaf, _ := x509.ParseCertificate(server.Certificate[0])
	pool := x509.NewCertPool()
	pool.AddCert(leaf)
	if got := TLS(dial(&tls.Config{RootCAs: pool, ServerName: "other.example"})); got != BadName {
		t.Errorf("wrong name: %q, want %q", got, BadName)
	}
	// The server requires a client certificate (TLS 1.2: the alert comes
	// during the handshake).
	if got := TLS(dial(&tls.Config{RootCAs: pool, ServerName: "example.com"})); got != "peer_bad_certificate" && got != "peer_handshake_failure" {
		t.Errorf("no client certificate: %q, want a peer alert", got)
	}
	// A server that never answers.
	silent, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer silent.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	_, err = (&tls.Dialer{Config: &tls.Config{ServerName: "x"}}).DialContext(ctx, "tcp", silent.Addr().String())
	if got := TLS(err); got != Timeout {
		t.Errorf("silent server: %q (%v), want %q", got, err, Timeout)
	}
	if got := TLS(fmt.Errorf("something else")); got != Other {
		t.Errorf("other error: %q", got)
	}
}

// selfSigned makes a server certificate for name that is its own root.
func selfSigned(t *testing.T, name string) tls.Certificate {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		DNSNames:              []string{name},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(time.Hour),
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageDigitalSignature | x509.KeyUsageCertSign,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}
}
