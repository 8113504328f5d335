package enroll_test

import (
	"context"
	"crypto/x509"
	"errors"
	"strings"
	"testing"
	"time"

	"iotagent.dev/iotagent/enroll"
	"iotagent.dev/iotagent/enroll/enrolltest"
	"iotagent.dev/iotagent/tpm"
	"iotagent.dev/iotagent/tpm/tpmtest"
)

// A station that trusts a TPM vendor's root, and not the vendor's
// intermediate CA that signed the EK certificate, admits the EK once the
// agent sends the intermediate: from the TPM's EK chain NV range, where
// vendors provision it, or from the agent's configuration; at enrollment
// and when a renewal re-attests.
func TestEKChainAdmitsIntermediateIssuedEK(t *testing.T) {
	url, fp := enrolltest.RootOnlyStation(t)
	pin, err := enroll.ParsePin(fp)
	if err != nil {
		t.Fatal(err)
	}
	inter := tpmtest.ManufacturerIntermediate(t)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	for _, tc := range []struct {
		name       string
		nv         bool
		configured []*x509.Certificate
	}{
		{"from NV", true, nil},
		{"configured", false, []*x509.Certificate{inter}},
		{"both", true, []*x509.Certificate{inter}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			d := newDevice(t, tpmtest.Options{})
			if tc.nv {
				d.sim.WriteNV(t, tpmtest.NVIndex{Index: tpm.NVIndexEKChainFirst, Data: inter.Raw})
			}
			res, err := enroll.Enroll(ctx, enroll.EnrollConfig{TPM: d.tpm, Dir: d.dir, Station: url, Pin: pin, EKIntermediates: tc.configured})
			if err != nil {
				t.Fatalf("Enroll: %v", err)
			}
			if res.State.Enrollment.Method != "tpmenroll" {
				t.Errorf("method = %s, want tpmenroll", res.State.Enrollment.Method)
			}
			// Renewal rotates the key and re-attests with the same chain.
			r, err := enroll.NewRenewer(enroll.RenewerConfig{TPM: d.tpm, Dir: d.dir, EKIntermediates: tc.configured})
			if err != nil {
				t.Fatal(err)
			}
			defer r.Close()
			if err := r.RenewNow(ctx); err != nil {
				t.Errorf("renewal by tpmenroll: %v", err)
			}
		})
	}

	// Without the intermediate, the station refuses the EK: what the
	// agent did before it sent the chain.
	d := newDevice(t, tpmtest.Options{})
	_, err = enroll.Enroll(ctx, enroll.EnrollConfig{TPM: d.tpm, Dir: d.dir, Station: url, Pin: pin})
	var se *enroll.StatusError
	if !errors.As(err, &se) || se.Code != 403 || !strings.Contains(se.Message, "does not chain to a trusted TPM manufacturer root") {
		t.Errorf("Enroll without the intermediate = %v, want 403: does not chain to a trusted TPM manufacturer root", err)
	}
}
