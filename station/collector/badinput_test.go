package collector_test

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"math/big"
	"net"
	"strings"
	"testing"
	"time"

	piondtls "github.com/pion/dtls/v3"
	"github.com/plgd-dev/go-coap/v3/message"
	"github.com/plgd-dev/go-coap/v3/message/codes"
	"github.com/plgd-dev/go-coap/v3/net/blockwise"
	"github.com/plgd-dev/go-coap/v3/options"
	"github.com/plgd-dev/go-coap/v3/udp"

	"iotagent.dev/iotagent/station/collector"
)

// foreignCert is a client certificate for cn from a CA the station never
// heard of.
func foreignCert(t testing.TB, cn string) tls.Certificate {
	t.Helper()
	now := time.Now()
	caKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	caTmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "elsewhere CA"},
		NotBefore: now.Add(-time.Hour), NotAfter: now.Add(time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign,
	}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	ca, err := x509.ParseCertificate(caDER)
	if err != nil {
		t.Fatal(err)
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	der, err := x509.CreateCertificate(rand.Reader, &x509.Certificate{
		SerialNumber: big.NewInt(2), Subject: pkix.Name{CommonName: cn},
		NotBefore: now.Add(-time.Hour), NotAfter: now.Add(time.Hour),
		KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
	}, ca, &key.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	return tls.Certificate{Certificate: [][]byte{der, caDER}, PrivateKey: key}
}

// Each bad input is refused as the package doc says, and the collector
// keeps serving a good client, on its session and on a new one.
func TestBadInput(t *testing.T) {
	checkGoroutines(t)
	f := newFixture(t)
	const maxPayload = 1024
	c, out := f.start(t, collector.Config{MaxPayload: maxPayload, HandshakeTimeout: 2 * time.Second})
	good := dialT(t, f, c, "gw-good", dialOptions{})
	bad := dialT(t, f, c, "gw-bad", dialOptions{})
	noBlocks := dialT(t, f, c, "gw-noblocks", dialOptions{coap: []udp.Option{options.WithBlockwise(false, blockwise.SZX1024, time.Second)}})

	// handshakeWith dials with cert and o and wants the handshake refused
	// for reason; handshake with cert and pion options.
	handshakeWith := func(cert tls.Certificate, reason string, o dialOptions) func(t *testing.T) {
		return func(t *testing.T) {
			before := c.Stats().Handshakes
			cl, err := dial(t, c.Addr(), cert, f.roots, o)
			if err == nil {
				cl.close()
				t.Fatalf("dial succeeded, want the handshake refused")
			}
			// The client may see the alert before the collector counts.
			waitFor(t, func() bool { return c.Stats().Handshakes[reason] == before[reason]+1 }, "Stats().Handshakes[%q] = %d", reason, before[reason]+1)
			if got := c.Stats().Handshakes["ok"]; got != before["ok"] {
				t.Errorf("Stats().Handshakes[ok] = %d, want %d", got, before["ok"])
			}
		}
	}
	handshake := func(cert tls.Certificate, reason string, opts ...piondtls.ClientOption) func(t *testing.T) {
		return handshakeWith(cert, reason, dialOptions{dtls: opts})
	}
	// request posts body to path as gw-bad and wants code, with a
	// diagnostic that contains diag.
	request := func(path string, cf message.MediaType, body []byte, code codes.Code, diag string) func(t *testing.T) {
		return func(t *testing.T) {
			n := len(out.read(t))
			gotCode, gotDiag := bad.post(t, path, cf, body)
			if gotCode != code || !strings.Contains(gotDiag, diag) {
				t.Errorf("POST %s = %v %q, want %v %q", path, gotCode, gotDiag, code, diag)
			}
			if got := len(out.read(t)); got != n {
				t.Errorf("the sink gained %d records, want none", got-n)
			}
		}
	}
	// Larger than go-coap's default read buffer (1472 bytes), too.
	big := make([]byte, 2000)

	cases := []struct {
		name string
		run  func(t *testing.T)
	}{
		// pion, like most clients, sends no certificate that the server's
		// CertificateRequest does not ask for…
		{"certificate from another CA", handshake(foreignCert(t, "gw-9"), "no_certificate")},
		// …but a client can insist.
		{"certificate from another CA, insisting", handshake(foreignCert(t, "gw-9"), "unknown_ca",
			piondtls.WithGetClientCertificate(func(*piondtls.CertificateRequestInfo) (*tls.Certificate, error) {
				return new(foreignCert(t, "gw-9")), nil
			}))},
		{"CN is not a device ID", handshake(issue(t, f.st, "not a device", nil, false), "not_device")},
		{"expired certificate", handshake(issueFor(t, f.st, "gw-old", -time.Minute), "expired")},
		// Finding 5 of issue 10: a service's certificate chains to the same
		// CA and its CN is a valid device ID, but it is not a device.
		{"service certificate as a device", handshake(issueCert(t, f.st, "gw-svc", nil, false, time.Hour), "not_device")},
		{"garbage datagrams", func(t *testing.T) {
			conn, err := net.DialUDP("udp4", nil, c.Addr().(*net.UDPAddr))
			if err != nil {
				t.Fatal(err)
			}
			defer conn.Close()
			for _, d := range [][]byte{
				[]byte("GET / HTTP/1.1\r\n\r\n"),
				make([]byte, 9000),                                      // over pion's read buffer
				{22, 0xfe, 0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 3, 1, 2, 3}, // a handshake record of nonsense
				{22, 0xfe, 0xfd},                                        // a cut header
				{25, 0xfe, 0xfd, 0, 1, 0, 0, 0, 0, 0, 1, 1, 2, 3, 4, 5, 6, 7, 8, 0, 4, 1, 2, 3, 4}, // a record with an unknown CID
			} {
				if _, err := conn.Write(d); err != nil {
					t.Fatal(err)
				}
			}
		}},
		{"oversize body in one datagram", func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), wait)
			defer cancel()
			resp, err := noBlocks.cc.Post(ctx, "/telemetry", message.AppSenmlCbor, strings.NewReader(string(big)))
			if err != nil {
				t.Fatal(err)
			}
			defer noBlocks.cc.ReleaseMessage(resp)
			size1, err := resp.GetOptionUint32(message.Size1)
			if resp.Code() != codes.RequestEntityTooLarge || err != nil || size1 != maxPayload {
				t.Errorf("POST of %d bytes = %v, Size1 %d (%v); want 4.13, Size1 %d", len(big), resp.Code(), size1, err, maxPayload)
			}
		}},
		{"oversize body in blocks", request("/telemetry", message.AppSenmlCbor, make([]byte, 3*maxPayload), codes.RequestEntityTooLarge, "body over 1024 bytes")},
		// A block far into a transfer, without Size1: refused before
		// go-coap assembles it.
		{"block past the limit", func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), wait)
			defer cancel()
			req, err := noBlocks.cc.NewPostRequest(ctx, "/telemetry", message.AppSenmlCbor, strings.NewReader(string(make([]byte, 1024))))
			if err != nil {
				t.Fatal(err)
			}
			defer noBlocks.cc.ReleaseMessage(req)
			block, err := blockwise.EncodeBlockOption(blockwise.SZX1024, 1, true)
			if err != nil {
				t.Fatal(err)
			}
			req.SetOptionUint32(message.Block1, block)
			resp, err := noBlocks.cc.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			defer noBlocks.cc.ReleaseMessage(resp)
			if resp.Code() != codes.RequestEntityTooLarge {
				t.Errorf("block 1 of 1024 bytes = %v, want 4.13", resp.Code())
			}
		}},
		{"undecodable CBOR", request("/telemetry", message.AppSenmlCbor, []byte{0xff, 0x00}, codes.BadRequest, "senml: ")},
		{"invalid SenML", request("/telemetry", message.AppSenmlJSON, []byte(`[{"n":"temp","v":"warm"}]`), codes.BadRequest, `senml: record 0: "v"`)},
		{"empty pack", request("/telemetry", message.AppSenmlCbor, []byte{0x80}, codes.BadRequest, "senml: ")},
		{"text/plain", request("/telemetry", message.TextPlain, []byte("temp=21"), codes.UnsupportedMediaType, "want 112")},
		{"application/json", request("/telemetry", message.AppJSON, mustJSON(t, batch("gw-bad", 1, 1)), codes.UnsupportedMediaType, "want 112")},
		{"senml-etch+cbor", request("/telemetry", message.AppSenmlEtchCbor, mustCBOR(t, batch("gw-bad", 1, 1)), codes.UnsupportedMediaType, "want 112")},
		{"another device's path", request("/devices/gw-good/telemetry", message.AppSenmlCbor, mustCBOR(t, batch("gw-bad", 1, 1)), codes.Forbidden, "gw-bad")},
		{"unknown path", request("/telemetry/now", message.AppSenmlCbor, mustCBOR(t, batch("gw-bad", 1, 1)), codes.NotFound, "")},
		{"GET", func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), wait)
			defer cancel()
			resp, err := bad.cc.Get(ctx, "/telemetry")
			if err != nil {
				t.Fatal(err)
			}
			defer bad.cc.ReleaseMessage(resp)
			if resp.Code() != codes.MethodNotAllowed {
				t.Errorf("GET /telemetry = %v, want 4.05", resp.Code())
			}
		}},
		{"no shared cipher suite", handshake(issue(t, f.st, "gw-cbc", nil, false), "no_shared_cipher",
			piondtls.WithCipherSuites(piondtls.TLS_ECDHE_ECDSA_WITH_AES_256_CBC_SHA))},
		{"no extended master secret", handshake(issue(t, f.st, "gw-noems", nil, false), "no_extended_master_secret",
			piondtls.WithExtendedMasterSecret(piondtls.DisableExtendedMasterSecret))},
		{"collector not trusted", handshakeWith(issue(t, f.st, "gw-distrust", nil, false), "peer_bad_certificate",
			dialOptions{noCID: true, dtls: []piondtls.ClientOption{piondtls.WithRootCAs(x509.NewCertPool())}})},
	}
	seq := uint64(1)
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			tc.run(t)
			if code, diag := good.post(t, "/telemetry", message.AppSenmlCbor, mustCBOR(t, batch("gw-good", seq, 5))); code != codes.Changed {
				t.Fatalf("good client after %s: POST = %v %q, want 2.04", tc.name, code, diag)
			}
			seq += 5
		})
	}

	t.Run("new session afterwards", func(t *testing.T) {
		for _, cs := range []piondtls.CipherSuiteID{piondtls.TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256, piondtls.TLS_ECDHE_ECDSA_WITH_AES_128_CCM_8} {
			name := "gw-" + strings.ToLower(piondtls.CipherSuiteName(cs)[len("TLS_ECDHE_ECDSA_WITH_"):])
			name = strings.ReplaceAll(name, "_", "-")
			cl, err := dial(t, c.Addr(), issue(t, f.st, name, nil, false), f.roots, dialOptions{dtls: []piondtls.ClientOption{piondtls.WithCipherSuites(cs)}})
			if err != nil {
				t.Fatalf("dial with %s: %v", piondtls.CipherSuiteName(cs), err)
			}
			if code, diag := cl.post(t, "/telemetry", message.AppSenmlCbor, mustCBOR(t, batch(name, 1, 5))); code != codes.Changed {
				t.Errorf("POST with %s = %v %q, want 2.04", piondtls.CipherSuiteName(cs), code, diag)
			}
			if n := c.Stats().SessionsByCipher[piondtls.CipherSuiteName(cs)]; n < 1 {
				t.Errorf("Stats().SessionsByCipher[%s] = %d, want at least 1", piondtls.CipherSuiteName(cs), n)
			}
		}
		if got := len(out.read(t)); got != int(seq-1)+10 {
			t.Errorf("the sink holds %d records, want %d", got, int(seq-1)+10)
		}
		t.Logf("Stats() = %+v", c.Stats())
	})
}
