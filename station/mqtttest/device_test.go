package mqtttest_test

import (
	"context"
	"crypto/tls"
	"testing"
	"time"

	"iotagent.dev/iotagent/enroll"
	"iotagent.dev/iotagent/station/stationtest"
	"iotagent.dev/iotagent/tpm/tpmtest"
)

// enrollDevice enrolls a device with a fresh swtpm through st and returns
// its ID and a TLS certificate signing with its TPM key (released at
// cleanup).
func enrollDevice(t *testing.T, st *stationtest.Station) (string, tls.Certificate) {
	t.Helper()
	sim := tpmtest.New(t)
	tp := sim.Open(t)
	pin, err := enroll.ParsePin(st.Fingerprint)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	res, err := enroll.Enroll(ctx, enroll.EnrollConfig{TPM: tp, Dir: t.TempDir(), Station: st.URL, Pin: pin})
	if err != nil {
		t.Fatalf("Enroll: %v", err)
	}
	key, err := tp.LoadKey(res.State.Key)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { key.Close() })
	c := tls.Certificate{PrivateKey: key, Leaf: res.State.Leaf()}
	for _, x := range res.State.Chain {
		c.Certificate = append(c.Certificate, x.Raw)
	}
	return res.State.Enrollment.DeviceID, c
}
