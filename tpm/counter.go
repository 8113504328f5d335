package tpm

import (
	"encoding/binary"
	"errors"
	"fmt"

	"github.com/google/go-tpm/tpm2"
)

// Anti-rollback counters. A counter is a pair of owner-hierarchy NV
// indices:
//
//   - the counter itself at the index the caller names: TPM_NT_COUNTER,
//     8 bytes, OWNERWRITE, OWNERREAD, AUTHREAD (empty auth), NO_DA. It
//     only goes up: NV_Increment adds one, NV_Write is refused.
//   - its base at the companion index, index+1: TPM_NT_ORDINARY, 8
//     bytes (big-endian), OWNERWRITE, WRITEDEFINE, OWNERREAD, AUTHREAD,
//     NO_DA. It holds the counter's value at its first increment, is
//     written once and then NV_WriteLock'ed; with WRITEDEFINE the lock
//     lasts until the index is undefined.
//
// The value read is counter − base: the security version recorded, 0
// right after the setup. The base is needed because a counter does not
// start at 0: its first increment sets it to one more than the highest
// count the TPM recorded (TPM 2.0 Part 1, NV counters; in the reference
// code, libtpms's too, NV_Increment of an unwritten counter starts from
// NvReadMaxCount(), which NvDeleteIndex raises to the value of a written
// counter it deletes). Measured on swtpm: after another counter reached
// 50 and was undefined, a fresh counter's first increment gives 51, and
// every small security version would be below it.
//
// Setup, one TPM command a step, so that a crash can stop it between any
// two; RaiseCounter resumes from whatever state it finds, Counter reads
// only the last:
//
//	absent ──define base──▶ base defined ──define counter──▶ counter defined
//	  ──increment──▶ counter written ──write base=counter──▶ base written
//	  ──write lock──▶ ready
//
// The base is defined first so that a written counter without a base is
// never a step of the setup: it means the base was removed, and taking the
// counter's current value as a new base would roll the security version
// back to 0, so it is refused (ErrCounterBase).
//
// Undefining and redefining the counter (owner authorization, empty on
// most gateways) only raises it: its first increment resumes above its
// old value, so counter − base grows and refuses more, never less. The
// base is the weak point: whoever holds the owner authorization can
// undefine it (or both indices, or TPM2_Clear the owner hierarchy) and
// define it again with a bigger value, which lowers the security version.
// A base above the counter is detected (ErrCounterBase); a smaller
// forgery is not. Protecting the owner authorization protects the counter.
// (TPMA_NV_POLICY_DELETE would keep the owner from undefining the base,
// but swtpm refuses it on an owner index with TPM_RC_ATTRIBUTES, and the
// platform authorization is not the agent's.)

// Counter errors. Neither ErrCounterAbsent nor ErrCounterUnwritten may
// be read as 0: whoever holds the owner authorization can undefine the
// counter, and a setup stopped by a crash has no value yet.
var (
	// ErrCounterAbsent: no counter is defined at the index.
	ErrCounterAbsent = errors.New("tpm: no NV counter at that index")
	// ErrCounterUnwritten: the counter is defined but its setup did not
	// finish (never incremented, or its base not written or not
	// locked). RaiseCounter finishes it.
	ErrCounterUnwritten = errors.New("tpm: NV counter never incremented or its setup unfinished")
	// ErrCounterBase: the base index does not fit the counter: absent
	// while the counter holds a value, not an index this package
	// defines, locked unwritten, or above the counter. Someone with the
	// owner authorization changed it; the counter cannot be trusted and
	// RaiseCounter does not repair it.
	ErrCounterBase = errors.New("tpm: NV counter base index does not fit the counter")
)

// MaxCounterStep bounds how far one RaiseCounter call increments (each
// step is an NV write, which a TPM's flash wears and may rate-limit).
const MaxCounterStep = 1024

// Counter reads the counter at index and its base at index+1 and returns
// the security version recorded; ErrCounterAbsent, ErrCounterUnwritten or
// ErrCounterBase when there is no value to trust.
func (t *TPM) Counter(index uint32) (uint64, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	s, err := t.readCounterPair(index)
	if err != nil {
		return 0, err
	}
	switch {
	case !s.counter.defined:
		return 0, fmt.Errorf("%w %#x", ErrCounterAbsent, index)
	case !s.counter.written || !s.base.written || !s.base.nv.Attributes.WriteLocked:
		return 0, fmt.Errorf("%w: %#x", ErrCounterUnwritten, index)
	}
	return s.version(index)
}

// RaiseCounter makes the security version at index at least to and
// returns it. It defines the counter and its base (see Counter) under the
// owner hierarchy (empty owner authorization) when absent, and finishes a
// setup a crash interrupted; RaiseCounter(index, 0) does only that. It
// never lowers the version; a raise of more than MaxCounterStep is
// refused.
func (t *TPM) RaiseCounter(index uint32, to uint64) (uint64, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	s, err := t.setupCounter(index)
	if err != nil {
		return 0, err
	}
	v, err := s.version(index)
	if err != nil {
		return 0, err
	}
	if to > v && to-v > MaxCounterStep {
		return v, fmt.Errorf("tpm: raising NV counter %#x from %d to %d: more than %d steps", index, v, to, MaxCounterStep)
	}
	for ; v < to; v++ {
		if err := t.incrementCounter(index, s.counter.name); err != nil {
			return v, err
		}
	}
	// Read back what the TPM holds rather than trust the arithmetic.
	if s, err = t.readCounterPair(index); err != nil {
		return v, err
	}
	return s.version(index)
}

// setupCounter walks the setup from the state it finds to ready and
// returns the pair. t.mu held.
func (t *TPM) setupCounter(index uint32) (counterPair, error) {
	// Each pass takes one step of the five, or returns.
	for range 6 {
		s, err := t.readCounterPair(index)
		if err != nil {
			return s, err
		}
		c, b := s.counter, s.base
		switch {
		case !b.defined:
			// A counter defined without a base was never incremented
			// (readCounterPair refuses it otherwise): it holds nothing
			// to lose.
			err = t.defineNV(index+1, tpm2.TPMANV{OwnerWrite: true, WriteDefine: true, OwnerRead: true, AuthRead: true,
				NoDA: true, NT: tpm2.TPMNTOrdinary})
		case !c.defined:
			// Also a counter undefined after the setup: redefined, it
			// resumes above its old value.
			err = t.defineNV(index, tpm2.TPMANV{OwnerWrite: true, OwnerRead: true, AuthRead: true, NoDA: true,
				NT: tpm2.TPMNTCounter})
		case !c.written:
			err = t.incrementCounter(index, c.name)
		case !b.written:
			err = t.writeBase(index+1, b.name, c.value)
		case !b.nv.Attributes.WriteLocked:
			if _, err = (tpm2.NVWriteLock{
				AuthHandle: tpm2.TPMRHOwner,
				NVIndex:    tpm2.NamedHandle{Handle: tpm2.TPMHandle(index + 1), Name: b.name},
			}).Execute(t.tr); err != nil {
				err = fmt.Errorf("tpm: NV_WriteLock %#x: %w", index+1, err)
			}
		default:
			return s, nil
		}
		if err != nil {
			return s, err
		}
	}
	return counterPair{}, fmt.Errorf("tpm: NV counter %#x: setup did not finish", index)
}

// counterPair is the state of a counter and its base index.
type counterPair struct {
	counter, base nvState
}

// version returns counter − base, or ErrCounterBase when the base is
// above the counter. Both must be written.
func (s counterPair) version(index uint32) (uint64, error) {
	if s.base.value > s.counter.value {
		return 0, fmt.Errorf("%w: base %d at %#x above the counter %d at %#x", ErrCounterBase, s.base.value, index+1, s.counter.value, index)
	}
	return s.counter.value - s.base.value, nil
}

// nvState is what readNV8 learns of one index.
type nvState struct {
	defined, written bool
	nv               tpm2.TPMSNVPublic
	name             tpm2.TPM2BName // changes at the first write (TPMA_NV_WRITTEN)
	value            uint64
}

// readCounterPair reads the counter at index and its base at index+1,
// checking that each is of the kind this package defines. t.mu held.
func (t *TPM) readCounterPair(index uint32) (counterPair, error) {
	if index>>24 != uint32(tpm2.TPMHTNVIndex) || (index+1)>>24 != uint32(tpm2.TPMHTNVIndex) {
		return counterPair{}, fmt.Errorf("tpm: NV counter %#x: the counter and its base at the next index must both be NV indices", index)
	}
	var s counterPair
	var err error
	if s.counter, err = t.readNV8(index); err != nil {
		return s, err
	}
	if c := s.counter; c.defined && (c.nv.Attributes.NT != tpm2.TPMNTCounter || c.nv.DataSize != 8) {
		return s, fmt.Errorf("tpm: NV index %#x (type %d, %d bytes) is not a counter", index, c.nv.Attributes.NT, c.nv.DataSize)
	}
	if s.base, err = t.readNV8(index + 1); err != nil {
		return s, err
	}
	// Anyone could change a base without WRITEDEFINE or with other ways to
	// write it than the owner's.
	if b := s.base; b.defined {
		a := b.nv.Attributes
		if a.NT != tpm2.TPMNTOrdinary || b.nv.DataSize != 8 || !a.OwnerWrite || !a.WriteDefine || a.AuthWrite || a.PolicyWrite || a.PPWrite {
			return s, fmt.Errorf("%w: %#x (type %d, %d bytes, attributes %#x) is not a write-once owner index of 8 bytes",
				ErrCounterBase, index+1, a.NT, b.nv.DataSize, tpm2.Marshal(a))
		}
		if !b.written && a.WriteLocked {
			return s, fmt.Errorf("%w: %#x is locked unwritten", ErrCounterBase, index+1)
		}
	}
	if !s.base.defined && s.counter.written {
		return s, fmt.Errorf("%w: %#x holds %d and %#x is absent", ErrCounterBase, index, s.counter.value, index+1)
	}
	return s, nil
}

// readNV8 reads the public area of the 8-byte index at index and, when
// written, its value. t.mu held.
func (t *TPM) readNV8(index uint32) (nvState, error) {
	h := tpm2.TPMHandle(index)
	pub, err := tpm2.NVReadPublic{NVIndex: h}.Execute(t.tr)
	if errors.Is(err, tpm2.TPMRCHandle) {
		return nvState{}, nil
	}
	if err != nil {
		return nvState{}, fmt.Errorf("tpm: NV_ReadPublic %#x: %w", index, err)
	}
	nv, err := pub.NVPublic.Contents()
	if err != nil {
		return nvState{}, err
	}
	s := nvState{defined: true, written: nv.Attributes.Written, nv: *nv, name: pub.NVName}
	if !s.written || nv.DataSize != 8 {
		return s, nil
	}
	rsp, err := tpm2.NVRead{
		AuthHandle: tpm2.TPMRHOwner,
		NVIndex:    tpm2.NamedHandle{Handle: h, Name: pub.NVName},
		Size:       8,
	}.Execute(t.tr)
	if err != nil {
		return nvState{}, fmt.Errorf("tpm: NV_Read %#x: %w", index, err)
	}
	if len(rsp.Data.Buffer) != 8 {
		return nvState{}, fmt.Errorf("tpm: NV index %#x read %d bytes", index, len(rsp.Data.Buffer))
	}
	s.value = binary.BigEndian.Uint64(rsp.Data.Buffer)
	return s, nil
}

// defineNV defines an 8-byte owner index. t.mu held.
func (t *TPM) defineNV(index uint32, attrs tpm2.TPMANV) error {
	if _, err := (tpm2.NVDefineSpace{
		AuthHandle: tpm2.TPMRHOwner,
		PublicInfo: tpm2.New2B(tpm2.TPMSNVPublic{
			NVIndex:    tpm2.TPMHandle(index),
			NameAlg:    tpm2.TPMAlgSHA256,
			Attributes: attrs,
			DataSize:   8,
		}),
	}).Execute(t.tr); err != nil {
		return fmt.Errorf("tpm: defining NV index %#x under the owner hierarchy: %w", index, err)
	}
	return nil
}

// incrementCounter increments the counter at index. t.mu held.
func (t *TPM) incrementCounter(index uint32, name tpm2.TPM2BName) error {
	if _, err := (tpm2.NVIncrement{
		AuthHandle: tpm2.TPMRHOwner,
		NVIndex:    tpm2.NamedHandle{Handle: tpm2.TPMHandle(index), Name: name},
	}).Execute(t.tr); err != nil {
		return fmt.Errorf("tpm: NV_Increment %#x: %w", index, err)
	}
	return nil
}

// writeBase writes v to the base index. t.mu held.
func (t *TPM) writeBase(index uint32, name tpm2.TPM2BName, v uint64) error {
	if _, err := (tpm2.NVWrite{
		AuthHandle: tpm2.TPMRHOwner,
		NVIndex:    tpm2.NamedHandle{Handle: tpm2.TPMHandle(index), Name: name},
		Data:       tpm2.TPM2BMaxNVBuffer{Buffer: binary.BigEndian.AppendUint64(nil, v)},
	}).Execute(t.tr); err != nil {
		return fmt.Errorf("tpm: NV_Write %#x: %w", index, err)
	}
	return nil
}
