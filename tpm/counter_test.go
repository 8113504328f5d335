package tpm_test

import (
	"errors"
	"testing"

	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport/linuxudstpm"

	"iotagent.dev/iotagent/tpm"
	"iotagent.dev/iotagent/tpm/tpmtest"
)

const counterIndex = 0x01500100

// The anti-rollback counter only goes up: raised on demand (defined at
// the first raise), never lowered, kept across a TPM restart, and an
// index undefined and defined again (whoever holds the owner
// authorization can) does not start lower.
func TestCounterOnlyGoesUp(t *testing.T) {
	sim := tpmtest.Start(t, tpmtest.Options{})
	tp := sim.Open(t)
	if _, err := tp.Counter(counterIndex); !errors.Is(err, tpm.ErrCounterAbsent) {
		t.Fatalf("Counter before any raise = %v, want ErrCounterAbsent", err)
	}
	v, err := tp.RaiseCounter(counterIndex, 3)
	if err != nil || v < 3 {
		t.Fatalf("RaiseCounter(3) = %d, %v", v, err)
	}
	t.Logf("raised to 3: the counter reads %d (its first increment starts it at the TPM's highest counter value)", v)
	if got, err := tp.RaiseCounter(counterIndex, 1); err != nil || got != v {
		t.Errorf("RaiseCounter(1) after 3 = %d, %v; want %d unchanged", got, err, v)
	}
	if _, err := tp.RaiseCounter(counterIndex, v+tpm.MaxCounterStep+1); err == nil {
		t.Error("a raise of more than MaxCounterStep steps was done")
	}
	if got, _ := tp.Counter(counterIndex); got != v {
		t.Errorf("Counter = %d after a refused raise, want %d", got, v)
	}
	tp.Close()
	sim.Restart()
	tp = sim.Open(t)
	if got, err := tp.Counter(counterIndex); err != nil || got != v {
		t.Fatalf("Counter after a TPM restart = %d, %v; want %d", got, err, v)
	}
	tp.Close()

	// Undefined and defined again: it resumes from the highest value.
	tr, err := linuxudstpm.Open(sim.Socket)
	if err != nil {
		t.Fatal(err)
	}
	pub, err := tpm2.NVReadPublic{NVIndex: tpm2.TPMHandle(counterIndex)}.Execute(tr)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := (tpm2.NVUndefineSpace{AuthHandle: tpm2.TPMRHOwner, NVIndex: tpm2.NamedHandle{Handle: tpm2.TPMHandle(counterIndex), Name: pub.NVName}}).Execute(tr); err != nil {
		t.Fatalf("NV_UndefineSpace: %v", err)
	}
	tr.Close()
	tp = sim.Open(t)
	if _, err := tp.Counter(counterIndex); !errors.Is(err, tpm.ErrCounterAbsent) {
		t.Fatalf("Counter after undefine = %v, want ErrCounterAbsent", err)
	}
	again, err := tp.RaiseCounter(counterIndex, 1)
	if err != nil || again < v {
		t.Errorf("redefined and raised to 1: %d, %v; want at least the old %d", again, err, v)
	}
}
