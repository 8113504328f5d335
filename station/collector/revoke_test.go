package collector_test

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"sync/atomic"
	"testing"

	"github.com/plgd-dev/go-coap/v3/message"
	"github.com/plgd-dev/go-coap/v3/message/codes"

	"iotagent.dev/iotagent/enroll"
	"iotagent.dev/iotagent/station/collector"
	"iotagent.dev/iotagent/station/stationtest"
	"iotagent.dev/iotagent/tpm/tpmtest"
)

// crlCheck is a Revoked hook on the station's current CRL, as iotstation
// wires the collector: the CRL is checked against the issuing CA, and a
// CRL that cannot be read or verified revokes everything.
func crlCheck(t testing.TB, st *stationtest.Station, calls *atomic.Int64) func(*x509.Certificate) bool {
	issuer := st.CACerts()[0]
	return func(c *x509.Certificate) bool {
		calls.Add(1)
		der, err := st.CRL()
		if err != nil {
			t.Errorf("station CRL: %v", err)
			return true
		}
		crl, err := x509.ParseRevocationList(der)
		if err != nil || crl.CheckSignatureFrom(issuer) != nil {
			t.Errorf("station CRL does not verify: %v", err)
			return true
		}
		for _, e := range crl.RevokedCertificateEntries {
			if e.SerialNumber.Cmp(c.SerialNumber) == 0 {
				return true
			}
		}
		return false
	}
}

// A device enrolled with its TPM posts through the collector until the
// station revokes it: its live session is then answered 4.01 and closed,
// and its next handshake is refused.
func TestRevokedDevice(t *testing.T) {
	checkGoroutines(t)
	f := newFixture(t)
	var calls atomic.Int64
	c, out := f.start(t, collector.Config{Revoked: crlCheck(t, f.st, &calls)})

	sim := tpmtest.Start(t, tpmtest.Options{})
	tp := sim.Open(t)
	pin, err := enroll.ParsePin(f.st.Fingerprint)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), wait)
	defer cancel()
	res, err := enroll.Enroll(ctx, enroll.EnrollConfig{TPM: tp, Dir: t.TempDir(), Station: f.st.URL, Pin: pin})
	if err != nil {
		t.Fatalf("Enroll: %v", err)
	}
	id := res.State.Enrollment.DeviceID
	key, err := tp.LoadKey(res.State.Key)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { key.Close() })
	cert := tls.Certificate{PrivateKey: key, Leaf: res.State.Leaf()}
	for _, x := range res.State.Chain {
		cert.Certificate = append(cert.Certificate, x.Raw)
	}

	dev, err := dial(t, c.Addr(), cert, f.roots, dialOptions{})
	if err != nil {
		t.Fatalf("dial as enrolled device %s: %v", id, err)
	}
	if code, diag := dev.post(t, "/devices/"+id+"/telemetry", message.AppSenmlCbor, mustCBOR(t, batch(id, 1, 10))); code != codes.Changed {
		t.Fatalf("POST as %s = %v %q, want 2.04", id, code, diag)
	}
	if ls := out.read(t); len(ls) != 10 || ls[0].Device != id {
		t.Fatalf("sink holds %d records of %q, want 10 of %s", len(ls), ls[0].Device, id)
	}
	if calls.Load() < 2 {
		t.Errorf("Revoked called %d times, want at the handshake and the request", calls.Load())
	}

	if err := f.st.Revoke(id); err != nil {
		t.Fatal(err)
	}
	t.Run("live session", func(t *testing.T) {
		if code := dev.postToClosing(t, mustCBOR(t, batch(id, 11, 10))); code != codes.Unauthorized && code != 0 {
			t.Errorf("POST after revocation = %v, want 4.01 or the session closed", code)
		}
		waitFor(t, func() bool { return c.Stats().Sessions == 0 }, "Stats().Sessions = 0")
		select {
		case <-dev.cc.Done():
		case <-ctx.Done():
			t.Error("the device's session was not closed")
		}
	})
	t.Run("new handshake", func(t *testing.T) {
		if cl, err := dial(t, c.Addr(), cert, f.roots, dialOptions{}); err == nil {
			cl.close()
			t.Fatal("dial after revocation succeeded, want refused")
		}
		waitFor(t, func() bool { return c.Stats().Handshakes["revoked"] == 1 }, `Stats().Handshakes["revoked"] = 1`)
	})
	t.Run("others unaffected", func(t *testing.T) {
		other := dialT(t, f, c, "gw-other", dialOptions{})
		if code, diag := other.post(t, "/telemetry", message.AppSenmlCbor, mustCBOR(t, batch("gw-other", 1, 10))); code != codes.Changed {
			t.Errorf("POST as another device = %v %q, want 2.04", code, diag)
		}
	})
	if n := len(out.read(t)); n != 20 {
		t.Errorf("sink holds %d records, want 20: none of the revoked device's after revocation", n)
	}
}
