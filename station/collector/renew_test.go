package collector_test

import (
	"sync/atomic"
	"testing"

	"crypto/tls"

	"iotagent.dev/iotagent/station/collector"
)

// With GetCertificate, each new handshake gets the certificate current
// at that moment: a server certificate renewed while serving is used
// without a restart (issue 10, finding 5: service certificates renew).
func TestServerCertificateRenewedWhileServing(t *testing.T) {
	checkGoroutines(t)
	f := newFixture(t)
	first := issue(t, f.st, "coap-collector", []string{"127.0.0.1"}, true)
	second := issue(t, f.st, "coap-collector", []string{"127.0.0.1"}, true)
	var cur atomic.Pointer[tls.Certificate]
	cur.Store(&first)
	c, _ := f.start(t, collector.Config{Certificate: first, GetCertificate: cur.Load})
	served := func() []byte {
		cl := dialT(t, f, c, "gw-renew", dialOptions{})
		defer cl.close()
		st, ok := cl.dc.ConnectionState()
		if !ok || len(st.PeerCertificates) == 0 {
			t.Fatal("no peer certificate after the handshake")
		}
		return st.PeerCertificates[0]
	}
	if got := served(); string(got) != string(first.Certificate[0]) {
		t.Fatal("the first handshake did not get the first certificate")
	}
	cur.Store(&second)
	if got := served(); string(got) != string(second.Certificate[0]) {
		t.Error("a handshake after the renewal did not get the renewed certificate")
	}
}
