// Package enrolltest gives a test an enrolled device: its own manufactured
// swtpm (package tpmtest), a state dir, enrollment by TPM attestation at a
// station of package stationtest, and a renewer serving the live identity;
// and a station that trusts the TPM manufacturer's root alone. For tests
// only.
package enrolltest

import (
	"context"
	"crypto/x509"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"

	"iotagent.dev/iotagent/enroll"
	"iotagent.dev/iotagent/station"
	"iotagent.dev/iotagent/station/stationtest"
	"iotagent.dev/iotagent/tpm"
	"iotagent.dev/iotagent/tpm/tpmtest"
)

// Device is an enrolled agent under test.
type Device struct {
	Sim     *tpmtest.Simulator
	TPM     *tpm.TPM
	Dir     string
	State   *enroll.State
	Renewer *enroll.Renewer
}

// New enrolls a device with a new swtpm at st (which must admit it: an
// auto-approving station, or one whose manifest lists the EK), with
// renewer configuration cfg (TPM and Dir are filled in). The renewer is
// closed at the end of the test; it is not running: a test that wants
// renewals calls its Run or RenewNow.
func New(t testing.TB, st *stationtest.Station, cfg enroll.RenewerConfig) *Device {
	t.Helper()
	d := &Device{Sim: tpmtest.New(t), Dir: t.TempDir()}
	d.TPM = d.Sim.Open(t)
	pin, err := enroll.ParsePin(st.Fingerprint)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	res, err := enroll.Enroll(ctx, enroll.EnrollConfig{TPM: d.TPM, Dir: d.Dir, Station: st.URL, Pin: pin})
	if err != nil {
		t.Fatalf("Enroll: %v", err)
	}
	d.State = res.State
	cfg.TPM, cfg.Dir = d.TPM, d.Dir
	if d.Renewer, err = enroll.NewRenewer(cfg); err != nil {
		t.Fatalf("NewRenewer: %v", err)
	}
	t.Cleanup(func() { d.Renewer.Close() })
	return d
}

// Identity is the device's live identity.
func (d *Device) Identity() *enroll.Identity { return d.Renewer.Identity() }

// DeviceID is the ID the station gave the device.
func (d *Device) DeviceID() string { return d.State.Enrollment.DeviceID }

// RootCAs is the device's current trust bundle (its identity's).
func (d *Device) RootCAs() *x509.CertPool { return d.Identity().RootCAs() }

// RootOnlyStation serves a station that trusts the TPM manufacturer's
// root alone, not the intermediate that signs the simulated TPMs' EK
// certificates (stationtest's station trusts both), as a station does
// that was given a TPM vendor's root. It auto-approves the EKs it admits
// and stops at cleanup. It returns the station's URL and its root's
// fingerprint (sha256:HEX).
func RootOnlyStation(t testing.TB) (url, fingerprint string) {
	t.Helper()
	dir, err := os.MkdirTemp("", "st")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	roots := filepath.Join(dir, "tpm-root.pem")
	if err := os.WriteFile(roots, tpmtest.ManufacturerRootPEM(t), 0o600); err != nil {
		t.Fatal(err)
	}
	sdir := filepath.Join(dir, "station")
	if err := station.Init(station.InitOptions{Dir: sdir, TPMRoots: []string{roots}, AutoApprove: true, CertLifetime: time.Hour}); err != nil {
		t.Fatalf("station.Init: %v", err)
	}
	if fingerprint, err = station.RootFingerprint(sdir); err != nil {
		t.Fatal(err)
	}
	st, err := station.Open(station.Config{Dir: sdir})
	if err != nil {
		t.Fatalf("station.Open: %v", err)
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- st.Serve(ctx, l) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("station Serve: %v", err)
		}
		st.Close()
	})
	return "https://" + l.Addr().String(), fingerprint
}
