package tpm_test

import (
	"encoding/binary"
	"errors"
	"testing"

	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport"
	"github.com/google/go-tpm/tpm2/transport/linuxudstpm"

	"iotagent.dev/iotagent/tpm"
	"iotagent.dev/iotagent/tpm/tpmtest"
)

const (
	counterIndex = 0x01500100
	baseIndex    = counterIndex + 1 // the companion index counter.go documents
	otherIndex   = 0x01500200       // another application's counter
)

// The anti-rollback counter reads the security version recorded: absent
// until the first raise, then exactly what was raised to, never lowered,
// kept across a TPM restart.
func TestCounterOnlyGoesUp(t *testing.T) {
	sim := tpmtest.Start(t, tpmtest.Options{})
	tp := sim.Open(t)
	if _, err := tp.Counter(counterIndex); !errors.Is(err, tpm.ErrCounterAbsent) {
		t.Fatalf("Counter before any raise = %v, want ErrCounterAbsent", err)
	}
	if v, err := tp.RaiseCounter(counterIndex, 3); err != nil || v != 3 {
		t.Fatalf("RaiseCounter(3) = %d, %v; want 3", v, err)
	}
	if got, err := tp.RaiseCounter(counterIndex, 1); err != nil || got != 3 {
		t.Errorf("RaiseCounter(1) after 3 = %d, %v; want 3 unchanged", got, err)
	}
	if _, err := tp.RaiseCounter(counterIndex, 3+tpm.MaxCounterStep+1); err == nil {
		t.Error("a raise of more than MaxCounterStep steps was done")
	}
	if got, err := tp.RaiseCounter(counterIndex, 3+tpm.MaxCounterStep); err != nil || got != 3+tpm.MaxCounterStep {
		t.Errorf("RaiseCounter(3+MaxCounterStep) = %d, %v; want %d", got, err, 3+tpm.MaxCounterStep)
	}
	want := uint64(3 + tpm.MaxCounterStep)
	tp.Close()
	sim.Restart()
	tp = sim.Open(t)
	if got, err := tp.Counter(counterIndex); err != nil || got != want {
		t.Fatalf("Counter after a TPM restart = %d, %v; want %d", got, err, want)
	}
	if _, err := tp.RaiseCounter(0x01ffffff, 1); err == nil {
		t.Error("RaiseCounter at the last NV handle, with no room for its base index, succeeded")
	}
}

// On a used TPM a counter's first increment starts it above the highest
// value any counter had (TPM 2.0 Part 1, NV counters): the security
// version must still start at 0.
func TestCounterOnUsedTPM(t *testing.T) {
	for _, tc := range []struct {
		name     string
		undefine bool // the other counter is gone, its value recorded by the TPM
	}{
		{"other counter defined", false},
		{"other counter undefined", true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			sim := tpmtest.Start(t, tpmtest.Options{})
			tr := rawTPM(t, sim)
			defineCounter(t, tr, otherIndex)
			increment(t, tr, otherIndex, 50)
			if tc.undefine {
				undefine(t, tr, otherIndex)
			}
			tr.Close()

			tp := sim.Open(t)
			if _, err := tp.Counter(counterIndex); !errors.Is(err, tpm.ErrCounterAbsent) {
				t.Fatalf("Counter before any raise = %v, want ErrCounterAbsent", err)
			}
			if v, err := tp.RaiseCounter(counterIndex, 0); err != nil || v != 0 {
				t.Fatalf("RaiseCounter(0) = %d, %v; want 0", v, err)
			}
			if v, err := tp.Counter(counterIndex); err != nil || v != 0 {
				t.Fatalf("Counter after definition = %d, %v; want 0", v, err)
			}
			if v, err := tp.RaiseCounter(counterIndex, 3); err != nil || v != 3 {
				t.Fatalf("RaiseCounter(3) = %d, %v; want 3", v, err)
			}
			if v, err := tp.Counter(counterIndex); err != nil || v != 3 {
				t.Fatalf("Counter = %d, %v; want 3", v, err)
			}
			tp.Close()
			tr = rawTPM(t, sim)
			t.Logf("the TPM counter itself reads %d, its base %d", readNV(t, tr, counterIndex), readNV(t, tr, baseIndex))
		})
	}
}

// Whoever holds the owner authorization can undefine the counter and
// define it again: it resumes above its highest value, so the security
// version read only goes up.
func TestCounterRedefinedNeverLower(t *testing.T) {
	sim := tpmtest.Start(t, tpmtest.Options{})
	tp := sim.Open(t)
	if v, err := tp.RaiseCounter(counterIndex, 3); err != nil || v != 3 {
		t.Fatalf("RaiseCounter(3) = %d, %v; want 3", v, err)
	}
	tp.Close()

	tr := rawTPM(t, sim)
	undefine(t, tr, counterIndex)
	tr.Close()
	tp = sim.Open(t)
	if _, err := tp.Counter(counterIndex); !errors.Is(err, tpm.ErrCounterAbsent) {
		t.Fatalf("Counter after undefine = %v, want ErrCounterAbsent", err)
	}
	again, err := tp.RaiseCounter(counterIndex, 1)
	if err != nil || again < 3 {
		t.Fatalf("redefined and raised to 1: %d, %v; want at least the old 3", again, err)
	}
	t.Logf("undefined at 3, redefined and raised to 1: reads %d", again)
	tp.Close()

	// Redefined by someone else and never incremented.
	tr = rawTPM(t, sim)
	undefine(t, tr, counterIndex)
	defineCounter(t, tr, counterIndex)
	tr.Close()
	tp = sim.Open(t)
	if _, err := tp.Counter(counterIndex); !errors.Is(err, tpm.ErrCounterUnwritten) {
		t.Fatalf("Counter of a redefined, never incremented counter = %v, want ErrCounterUnwritten", err)
	}
	if v, err := tp.RaiseCounter(counterIndex, 0); err != nil || v <= again {
		t.Fatalf("RaiseCounter(0) after a second redefinition = %d, %v; want above %d", v, err, again)
	}
}

// The base index is written once and locked: the TPM refuses a second
// write, and it holds the counter's value at its first increment.
func TestCounterBaseLocked(t *testing.T) {
	sim := tpmtest.Start(t, tpmtest.Options{})
	tr := rawTPM(t, sim)
	defineCounter(t, tr, otherIndex)
	increment(t, tr, otherIndex, 7)
	undefine(t, tr, otherIndex)
	tr.Close()
	tp := sim.Open(t)
	if v, err := tp.RaiseCounter(counterIndex, 0); err != nil || v != 0 {
		t.Fatalf("RaiseCounter(0) = %d, %v; want 0", v, err)
	}
	tp.Close()

	tr = rawTPM(t, sim)
	pub, nv := readPublic(t, tr, baseIndex)
	a := nv.Attributes
	if a.NT != tpm2.TPMNTOrdinary || !a.OwnerWrite || a.AuthWrite || a.PolicyWrite || !a.WriteDefine || !a.Written || !a.WriteLocked || nv.DataSize != 8 {
		t.Errorf("base index attributes %+v, size %d: want an ordinary 8-byte index, owner-written, written and locked (WRITEDEFINE)", a, nv.DataSize)
	}
	if base, c := readNV(t, tr, baseIndex), readNV(t, tr, counterIndex); base != c || base != 8 {
		t.Errorf("base %d, counter %d; want both 8 (the first increment after a counter at 7)", base, c)
	}
	var zero [8]byte
	_, err := tpm2.NVWrite{
		AuthHandle: tpm2.TPMRHOwner,
		NVIndex:    tpm2.NamedHandle{Handle: baseIndex, Name: pub.NVName},
		Data:       tpm2.TPM2BMaxNVBuffer{Buffer: zero[:]},
	}.Execute(tr)
	if !errors.Is(err, tpm2.TPMRCNVLocked) {
		t.Errorf("a second write of the base index = %v, want TPM_RC_NV_LOCKED", err)
	}
}

// A crash can stop the setup between any two of its TPM commands; the
// next RaiseCounter finishes it, and the security version starts at 0
// (on a used TPM, so that a base left at 0 would show).
func TestCounterSetupRecovers(t *testing.T) {
	for _, tc := range []struct {
		name  string
		steps int // setup steps done before the crash
		read  error
	}{
		{"base defined", 1, tpm.ErrCounterAbsent},
		{"counter defined", 2, tpm.ErrCounterUnwritten},
		{"counter incremented", 3, tpm.ErrCounterUnwritten},
		{"base written", 4, tpm.ErrCounterUnwritten},
	} {
		t.Run(tc.name, func(t *testing.T) {
			sim := usedTPM(t)
			tr := rawTPM(t, sim)
			setup(t, tr, tc.steps)
			tr.Close()
			sim.Restart()
			checkRecovers(t, sim, tc.read)
		})
	}
	// Not a state the setup passes through, but an index nobody ever
	// incremented holds nothing to lose.
	t.Run("counter without base, never incremented", func(t *testing.T) {
		sim := usedTPM(t)
		tr := rawTPM(t, sim)
		defineCounter(t, tr, counterIndex)
		tr.Close()
		checkRecovers(t, sim, tpm.ErrCounterUnwritten)
	})
}

func checkRecovers(t *testing.T, sim *tpmtest.Simulator, read error) {
	t.Helper()
	tp := sim.Open(t)
	if _, err := tp.Counter(counterIndex); !errors.Is(err, read) {
		t.Fatalf("Counter after the crash = %v, want %v", err, read)
	}
	if v, err := tp.RaiseCounter(counterIndex, 0); err != nil || v != 0 {
		t.Fatalf("RaiseCounter(0) after the crash = %d, %v; want 0", v, err)
	}
	if v, err := tp.RaiseCounter(counterIndex, 2); err != nil || v != 2 {
		t.Fatalf("RaiseCounter(2) = %d, %v; want 2", v, err)
	}
	tp.Close()
	tr := rawTPM(t, sim)
	if _, nv := readPublic(t, tr, baseIndex); !nv.Attributes.WriteLocked {
		t.Error("base index not locked after recovery")
	}
}

// A base index that does not fit its counter is refused, never read as
// a lower security version nor replaced.
func TestCounterRefusesBadBase(t *testing.T) {
	t.Run("removed while the counter holds a value", func(t *testing.T) {
		sim := tpmtest.Start(t, tpmtest.Options{})
		raise(t, sim, 3)
		tr := rawTPM(t, sim)
		undefine(t, tr, baseIndex)
		tr.Close()
		checkRefused(t, sim)
	})
	t.Run("above the counter", func(t *testing.T) {
		sim := tpmtest.Start(t, tpmtest.Options{})
		raise(t, sim, 3)
		tr := rawTPM(t, sim)
		c := readNV(t, tr, counterIndex)
		undefine(t, tr, baseIndex)
		defineBase(t, tr, baseIndex)
		writeBase(t, tr, baseIndex, c+10)
		lockBase(t, tr, baseIndex)
		tr.Close()
		checkRefused(t, sim)
	})
	t.Run("not write-once", func(t *testing.T) {
		sim := tpmtest.Start(t, tpmtest.Options{})
		tr := rawTPM(t, sim)
		if _, err := (tpm2.NVDefineSpace{
			AuthHandle: tpm2.TPMRHOwner,
			PublicInfo: tpm2.New2B(tpm2.TPMSNVPublic{
				NVIndex:    baseIndex,
				NameAlg:    tpm2.TPMAlgSHA256,
				Attributes: tpm2.TPMANV{OwnerWrite: true, OwnerRead: true, AuthRead: true, NoDA: true, NT: tpm2.TPMNTOrdinary},
				DataSize:   8,
			}),
		}).Execute(tr); err != nil {
			t.Fatal(err)
		}
		tr.Close()
		checkRefused(t, sim)
	})
}

func checkRefused(t *testing.T, sim *tpmtest.Simulator) {
	t.Helper()
	tp := sim.Open(t)
	if v, err := tp.Counter(counterIndex); !errors.Is(err, tpm.ErrCounterBase) {
		t.Errorf("Counter = %d, %v; want ErrCounterBase", v, err)
	}
	if v, err := tp.RaiseCounter(counterIndex, 5); !errors.Is(err, tpm.ErrCounterBase) {
		t.Errorf("RaiseCounter(5) = %d, %v; want ErrCounterBase", v, err)
	}
	if v, err := tp.Counter(counterIndex); !errors.Is(err, tpm.ErrCounterBase) {
		t.Errorf("Counter after a refused raise = %d, %v; want ErrCounterBase", v, err)
	}
}

// usedTPM starts a TPM on which another counter reached 50 and was
// undefined: a first increment there gives 51.
func usedTPM(t *testing.T) *tpmtest.Simulator {
	t.Helper()
	sim := tpmtest.Start(t, tpmtest.Options{})
	tr := rawTPM(t, sim)
	defineCounter(t, tr, otherIndex)
	increment(t, tr, otherIndex, 50)
	undefine(t, tr, otherIndex)
	tr.Close()
	return sim
}

func raise(t *testing.T, sim *tpmtest.Simulator, to uint64) {
	t.Helper()
	tp := sim.Open(t)
	if v, err := tp.RaiseCounter(counterIndex, to); err != nil || v != to {
		t.Fatalf("RaiseCounter(%d) = %d, %v", to, v, err)
	}
	tp.Close()
}

// setup does the first steps of counter.go's setup, with the attributes
// it documents.
func setup(t *testing.T, tr transport.TPM, steps int) {
	t.Helper()
	do := []func(){
		func() { defineBase(t, tr, baseIndex) },
		func() { defineCounter(t, tr, counterIndex) },
		func() { increment(t, tr, counterIndex, 1) },
		func() { writeBase(t, tr, baseIndex, readNV(t, tr, counterIndex)) },
		func() { lockBase(t, tr, baseIndex) },
	}
	for _, f := range do[:steps] {
		f()
	}
}

func rawTPM(t *testing.T, sim *tpmtest.Simulator) transport.TPMCloser {
	t.Helper()
	tr, err := linuxudstpm.Open(sim.Socket)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { tr.Close() })
	return tr
}

func readPublic(t *testing.T, tr transport.TPM, index uint32) (*tpm2.NVReadPublicResponse, *tpm2.TPMSNVPublic) {
	t.Helper()
	pub, err := tpm2.NVReadPublic{NVIndex: tpm2.TPMHandle(index)}.Execute(tr)
	if err != nil {
		t.Fatalf("NV_ReadPublic %#x: %v", index, err)
	}
	nv, err := pub.NVPublic.Contents()
	if err != nil {
		t.Fatal(err)
	}
	return pub, nv
}

func named(t *testing.T, tr transport.TPM, index uint32) tpm2.NamedHandle {
	t.Helper()
	pub, _ := readPublic(t, tr, index)
	return tpm2.NamedHandle{Handle: tpm2.TPMHandle(index), Name: pub.NVName}
}

func defineCounter(t *testing.T, tr transport.TPM, index uint32) {
	t.Helper()
	if _, err := (tpm2.NVDefineSpace{
		AuthHandle: tpm2.TPMRHOwner,
		PublicInfo: tpm2.New2B(tpm2.TPMSNVPublic{
			NVIndex:    tpm2.TPMHandle(index),
			NameAlg:    tpm2.TPMAlgSHA256,
			Attributes: tpm2.TPMANV{OwnerWrite: true, OwnerRead: true, AuthRead: true, NoDA: true, NT: tpm2.TPMNTCounter},
			DataSize:   8,
		}),
	}).Execute(tr); err != nil {
		t.Fatalf("NV_DefineSpace counter %#x: %v", index, err)
	}
}

func defineBase(t *testing.T, tr transport.TPM, index uint32) {
	t.Helper()
	if _, err := (tpm2.NVDefineSpace{
		AuthHandle: tpm2.TPMRHOwner,
		PublicInfo: tpm2.New2B(tpm2.TPMSNVPublic{
			NVIndex:  tpm2.TPMHandle(index),
			NameAlg:  tpm2.TPMAlgSHA256,
			DataSize: 8,
			Attributes: tpm2.TPMANV{OwnerWrite: true, WriteDefine: true, OwnerRead: true, AuthRead: true, NoDA: true,
				NT: tpm2.TPMNTOrdinary},
		}),
	}).Execute(tr); err != nil {
		t.Fatalf("NV_DefineSpace base %#x: %v", index, err)
	}
}

func writeBase(t *testing.T, tr transport.TPM, index uint32, v uint64) {
	t.Helper()
	if _, err := (tpm2.NVWrite{
		AuthHandle: tpm2.TPMRHOwner,
		NVIndex:    named(t, tr, index),
		Data:       tpm2.TPM2BMaxNVBuffer{Buffer: binary.BigEndian.AppendUint64(nil, v)},
	}).Execute(tr); err != nil {
		t.Fatalf("NV_Write %#x: %v", index, err)
	}
}

func lockBase(t *testing.T, tr transport.TPM, index uint32) {
	t.Helper()
	if _, err := (tpm2.NVWriteLock{AuthHandle: tpm2.TPMRHOwner, NVIndex: named(t, tr, index)}).Execute(tr); err != nil {
		t.Fatalf("NV_WriteLock %#x: %v", index, err)
	}
}

func increment(t *testing.T, tr transport.TPM, index uint32, n int) {
	t.Helper()
	for range n {
		// The name changes at the first increment (TPMA_NV_WRITTEN).
		if _, err := (tpm2.NVIncrement{AuthHandle: tpm2.TPMRHOwner, NVIndex: named(t, tr, index)}).Execute(tr); err != nil {
			t.Fatalf("NV_Increment %#x: %v", index, err)
		}
	}
}

func undefine(t *testing.T, tr transport.TPM, index uint32) {
	t.Helper()
	if _, err := (tpm2.NVUndefineSpace{AuthHandle: tpm2.TPMRHOwner, NVIndex: named(t, tr, index)}).Execute(tr); err != nil {
		t.Fatalf("NV_UndefineSpace %#x: %v", index, err)
	}
}

func readNV(t *testing.T, tr transport.TPM, index uint32) uint64 {
	t.Helper()
	rsp, err := tpm2.NVRead{AuthHandle: tpm2.TPMRHOwner, NVIndex: named(t, tr, index), Size: 8}.Execute(tr)
	if err != nil {
		t.Fatalf("NV_Read %#x: %v", index, err)
	}
	return binary.BigEndian.Uint64(rsp.Data.Buffer)
}
