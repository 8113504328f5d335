package enroll_test

import (
	"context"
	"testing"

	"iotagent.dev/iotagent/enroll"
	"iotagent.dev/iotagent/station/stationtest"
	"iotagent.dev/iotagent/tpm/tpmtest"
)

// BenchmarkEnrollDevice measures the wall time of one device enrollment
// against swtpm and an in-process station on loopback: key creation,
// cacerts, tpmenroll with credential activation, verification and the
// atomic writes of the state dir.
func BenchmarkEnrollDevice(b *testing.B) {
	st := stationtest.Start(b, stationtest.Options{AutoApprove: true})
	tp := tpmtest.New(b).Open(b)
	pin, _ := enroll.ParsePin(st.Fingerprint)
	for b.Loop() {
		dir := b.TempDir()
		if _, err := enroll.Enroll(context.Background(), enroll.EnrollConfig{TPM: tp, Dir: dir, Station: st.URL, Pin: pin}); err != nil {
			b.Fatal(err)
		}
	}
}
