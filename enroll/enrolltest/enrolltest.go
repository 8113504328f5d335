// Package enrolltest gives a test an enrolled device: its own manufactured
// swtpm (package tpmtest), a state dir, enrollment by TPM attestation at a
// station of package stationtest, and a renewer serving the live identity.
// For tests only.
package enrolltest

import (
	"context"
	"crypto/x509"
	"testing"
	"time"

	"iotagent.dev/iotagent/enroll"
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
