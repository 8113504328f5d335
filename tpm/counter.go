package tpm

import (
	"encoding/binary"
	"errors"
	"fmt"

	"github.com/google/go-tpm/tpm2"
)

// Anti-rollback counters: a TPM NV index of type counter (TPM_NT_COUNTER)
// under the owner hierarchy. A counter only goes up: NV_Increment adds
// one, NV_Write is refused, and an index undefined and defined again
// resumes from the highest value any counter had (measured on swtpm).
// It reads as uninitialized until its first increment.

// Counter errors. Neither may be read as 0: whoever holds the owner
// authorization (empty on most gateways) can undefine the index and
// define it again without incrementing it. The first increment starts
// it at the highest value any counter of the TPM had.
var (
	// ErrCounterAbsent: no counter is defined at the index.
	ErrCounterAbsent = errors.New("tpm: no NV counter at that index")
	// ErrCounterUnwritten: the counter is defined but was never
	// incremented.
	ErrCounterUnwritten = errors.New("tpm: NV counter never incremented")
)

// MaxCounterStep bounds how far one RaiseCounter call increments (each
// step is an NV write, which a TPM's flash wears and may rate-limit).
const MaxCounterStep = 1024

// Counter reads the NV counter at index; ErrCounterAbsent or
// ErrCounterUnwritten when there is no value to trust.
func (t *TPM) Counter(index uint32) (uint64, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	v, written, _, err := t.readCounter(index)
	if err == nil && !written {
		return 0, fmt.Errorf("%w: %#x", ErrCounterUnwritten, index)
	}
	return v, err
}

// readCounter returns the counter's value, whether it was ever
// incremented, and its NV name. t.mu held.
func (t *TPM) readCounter(index uint32) (uint64, bool, tpm2.TPM2BName, error) {
	h := tpm2.TPMHandle(index)
	pub, err := tpm2.NVReadPublic{NVIndex: h}.Execute(t.tr)
	if errors.Is(err, tpm2.TPMRCHandle) {
		return 0, false, tpm2.TPM2BName{}, fmt.Errorf("%w %#x", ErrCounterAbsent, index)
	}
	if err != nil {
		return 0, false, tpm2.TPM2BName{}, fmt.Errorf("tpm: NV_ReadPublic %#x: %w", index, err)
	}
	nv, err := pub.NVPublic.Contents()
	if err != nil {
		return 0, false, tpm2.TPM2BName{}, err
	}
	if nv.Attributes.NT != tpm2.TPMNTCounter {
		return 0, false, tpm2.TPM2BName{}, fmt.Errorf("tpm: NV index %#x is not a counter (type %d)", index, nv.Attributes.NT)
	}
	if !nv.Attributes.Written {
		return 0, false, pub.NVName, nil
	}
	rsp, err := tpm2.NVRead{
		AuthHandle: tpm2.TPMRHOwner,
		NVIndex:    tpm2.NamedHandle{Handle: h, Name: pub.NVName},
		Size:       8,
	}.Execute(t.tr)
	if err != nil {
		return 0, false, tpm2.TPM2BName{}, fmt.Errorf("tpm: NV_Read %#x: %w", index, err)
	}
	if len(rsp.Data.Buffer) != 8 {
		return 0, false, tpm2.TPM2BName{}, fmt.Errorf("tpm: NV counter %#x read %d bytes", index, len(rsp.Data.Buffer))
	}
	return binary.BigEndian.Uint64(rsp.Data.Buffer), true, pub.NVName, nil
}

// RaiseCounter makes the NV counter at index at least to, defining it
// under the owner hierarchy (empty owner authorization) when absent, and
// returns its value. It never lowers it; a step above MaxCounterStep is
// refused.
func (t *TPM) RaiseCounter(index uint32, to uint64) (uint64, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	v, written, name, err := t.readCounter(index)
	if errors.Is(err, ErrCounterAbsent) {
		if err := t.defineCounter(index); err != nil {
			return 0, err
		}
		v, written, name, err = t.readCounter(index)
	}
	if err != nil {
		return 0, err
	}
	if to > v && to-v > MaxCounterStep {
		return v, fmt.Errorf("tpm: raising NV counter %#x from %d to %d: more than %d steps", index, v, to, MaxCounterStep)
	}
	// A counter never incremented has no value yet: the first increment
	// gives it one (the TPM's highest), whatever to is.
	for v < to || !written {
		if _, err := (tpm2.NVIncrement{
			AuthHandle: tpm2.TPMRHOwner,
			NVIndex:    tpm2.NamedHandle{Handle: tpm2.TPMHandle(index), Name: name},
		}).Execute(t.tr); err != nil {
			return v, fmt.Errorf("tpm: NV_Increment %#x: %w", index, err)
		}
		// The first increment makes the name change (TPMA_NV_WRITTEN) and
		// may start the counter above 1.
		if v, written, name, err = t.readCounter(index); err != nil {
			return v, err
		}
	}
	return v, nil
}

// defineCounter defines an owner counter at index. t.mu held.
func (t *TPM) defineCounter(index uint32) error {
	if _, err := (tpm2.NVDefineSpace{
		AuthHandle: tpm2.TPMRHOwner,
		PublicInfo: tpm2.New2B(tpm2.TPMSNVPublic{
			NVIndex: tpm2.TPMHandle(index),
			NameAlg: tpm2.TPMAlgSHA256,
			Attributes: tpm2.TPMANV{OwnerWrite: true, OwnerRead: true, AuthRead: true, NoDA: true,
				NT: tpm2.TPMNTCounter},
			DataSize: 8,
		}),
	}).Execute(t.tr); err != nil {
		return fmt.Errorf("tpm: defining NV counter %#x under the owner hierarchy: %w", index, err)
	}
	return nil
}
