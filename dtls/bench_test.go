package dtls_test

import (
	"context"
	"crypto/tls"
	"net"
	"testing"
	"time"

	"iotagent.dev/iotagent/dtls"
	"iotagent.dev/iotagent/enroll"
	"iotagent.dev/iotagent/enroll/enrolltest"
	"iotagent.dev/iotagent/station/stationtest"
)

// BenchmarkDTLSHandshake compares a full DTLS 1.2 handshake (ECDHE-ECDSA,
// mutual, CID) with the client key in the TPM against a software key (a
// certificate from the same CA), in the same run.
func BenchmarkDTLSHandshake(b *testing.B) {
	st := stationtest.Start(b, stationtest.Options{AutoApprove: true})
	d := enrolltest.New(b, st, enroll.RenewerConfig{})
	srv := startEcho(b, st)
	soft := st.ServiceCert(b, "gw-software", nil, false)
	for _, tc := range []struct {
		name string
		cert *tls.Certificate
	}{{"tpm", d.Identity().Certificate()}, {"software", &soft}} {
		b.Run(tc.name, func(b *testing.B) {
			opts := dtls.ClientOptions(func(*tls.CertificateRequestInfo) (*tls.Certificate, error) { return tc.cert, nil }, d.RootCAs(), "127.0.0.1")
			for b.Loop() {
				pc, _ := net.ListenUDP("udp4", nil)
				conn, err := dtls.Client(pc, srv.addr, opts)
				if err != nil {
					b.Fatal(err)
				}
				ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
				err = conn.HandshakeContext(ctx)
				cancel()
				if err != nil {
					b.Fatalf("handshake: %v", err)
				}
				conn.Close()
				pc.Close()
			}
		})
	}
}
