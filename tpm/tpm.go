// Package tpm is the agent's access to its TPM 2.0: opening a TPM by spec,
// the device key (created in the TPM, never exported, used as a
// crypto.Signer), the endorsement key (EK) certificates and public areas,
// and credential activation for enrollment.
//
// # Concurrency
//
// A *TPM and the *Key values loaded from it are safe for concurrent use.
// Every operation holds the TPM's mutex for its whole command sequence, so a
// multi-command operation (create SRK, load, flush) never interleaves with
// another and never overruns the TPM's few transient object slots (three on
// swtpm and on TPMs reached without a resource manager).
//
// # Handles
//
// Operations flush every transient object they create before they return,
// except a loaded Key, which holds one transient slot until Key.Close.
//
// # Caveats
//
// The package imports nothing of this project but the leaf helper
// internal/atomicfile, so it sits below everything else.
package tpm

import (
	"errors"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"

	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport"
)

// Errors returned by this package, matched with errors.Is.
var (
	// ErrBadSpec: a TPM spec string that cannot be parsed.
	ErrBadSpec = errors.New("invalid TPM spec")
	// ErrUnreachable: the device or socket named by the spec does not exist
	// or does not answer.
	ErrUnreachable = errors.New("TPM unreachable")
	// ErrCorruptKey: a key file that is truncated, altered or not a key file.
	ErrCorruptKey = errors.New("corrupt key file")
	// ErrWrongTPM: a key file created by another TPM (or by this TPM before
	// its storage hierarchy was cleared); only the TPM that made a key can
	// load it.
	ErrWrongTPM = errors.New("key belongs to a different TPM")
	// ErrNoKey: no key file and no persistent key where one was expected.
	ErrNoKey = errors.New("no device key")
	// ErrNoEK: the TPM has no endorsement key of the kind asked for.
	ErrNoEK = errors.New("no endorsement key")
)

// TPM is an open TPM. Close releases the transport; keys loaded from it must
// be closed first.
type TPM struct {
	spec Spec

	mu sync.Mutex // held for each whole command sequence
	tr transport.TPMCloser

	signatures atomic.Uint64
}

// Signatures returns how many signatures keys of this TPM have made since
// it was opened: what reconnects and renewals cost on a slow TPM.
func (t *TPM) Signatures() uint64 { return t.signatures.Load() }

// Open connects to the TPM named by spec (see Spec) and checks that it
// answers.
func Open(spec string) (*TPM, error) {
	s, err := ParseSpec(spec)
	if err != nil {
		return nil, err
	}
	tr, err := openTransport(s)
	if err != nil {
		return nil, err
	}
	t := &TPM{spec: s, tr: tr}
	if _, err := t.property(tpm2.TPMPTManufacturer); err != nil {
		tr.Close()
		return nil, fmt.Errorf("%w: %s does not answer as a TPM 2.0: %w", ErrUnreachable, s, err)
	}
	return t, nil
}

// Spec returns the spec the TPM was opened with.
func (t *TPM) Spec() Spec { return t.spec }

// Close releases the transport.
func (t *TPM) Close() error {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.tr.Close()
}

// Info describes the TPM chip or emulator.
type Info struct {
	// Manufacturer is the four-character vendor ID (TPM_PT_MANUFACTURER),
	// trimmed, e.g. "IBM", "IFX", "STM", "NTC".
	Manufacturer string
	// Model is the vendor string (TPM_PT_VENDOR_STRING_1..4).
	Model string
	// Firmware is TPM_PT_FIRMWARE_VERSION_1 as major.minor (the encoding
	// Infineon, ST and Nuvoton use), followed by both raw version words.
	Firmware string
	// Spec is the TPM library specification level, e.g. "2.0 rev 1.64".
	Spec string
}

// Info reads the TPM's identifying properties.
func (t *TPM) Info() (Info, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	props, err := t.properties(tpm2.TPMPTFamilyIndicator, 32)
	if err != nil {
		return Info{}, fmt.Errorf("reading TPM properties: %w", err)
	}
	var info Info
	info.Manufacturer = fourCC(props[tpm2.TPMPTManufacturer])
	var model []byte
	for _, p := range []tpm2.TPMPT{tpm2.TPMPTVendorString1, tpm2.TPMPTVendorString2, tpm2.TPMPTVendorString3, tpm2.TPMPTVendorString4} {
		v := props[p]
		model = append(model, byte(v>>24), byte(v>>16), byte(v>>8), byte(v))
	}
	info.Model = strings.Join(strings.Fields(printable(model)), " ")
	fw1, fw2 := props[tpm2.TPMPTFirmwareVersion1], props[tpm2.TPMPTFirmwareVersion2]
	info.Firmware = fmt.Sprintf("%d.%d (0x%08x 0x%08x)", fw1>>16, fw1&0xffff, fw1, fw2)
	rev := props[tpm2.TPMPTRevision]
	info.Spec = fmt.Sprintf("%s rev %d.%02d", fourCC(props[tpm2.TPMPTFamilyIndicator]), rev/100, rev%100)
	return info, nil
}

// fourCC turns a TPM property holding up to four ASCII characters into a
// string, dropping NULs and padding.
func fourCC(v uint32) string {
	return strings.TrimSpace(printable([]byte{byte(v >> 24), byte(v >> 16), byte(v >> 8), byte(v)}))
}

// printable keeps the printable ASCII of b; vendors pad with NULs.
func printable(b []byte) string {
	out := make([]byte, 0, len(b))
	for _, c := range b {
		if c >= 0x20 && c < 0x7f {
			out = append(out, c)
		}
	}
	return string(out)
}

// property reads one fixed TPM property. The caller need not hold t.mu.
func (t *TPM) property(p tpm2.TPMPT) (uint32, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	props, err := t.properties(p, 1)
	if err != nil {
		return 0, err
	}
	v, ok := props[p]
	if !ok {
		return 0, fmt.Errorf("TPM did not report property %#x", uint32(p))
	}
	return v, nil
}

// properties reads up to count TPM properties starting at first. t.mu held.
func (t *TPM) properties(first tpm2.TPMPT, count uint32) (map[tpm2.TPMPT]uint32, error) {
	rsp, err := tpm2.GetCapability{
		Capability:    tpm2.TPMCapTPMProperties,
		Property:      uint32(first),
		PropertyCount: count,
	}.Execute(t.tr)
	if err != nil {
		return nil, err
	}
	tp, err := rsp.CapabilityData.Data.TPMProperties()
	if err != nil {
		return nil, err
	}
	out := make(map[tpm2.TPMPT]uint32, len(tp.TPMProperty))
	for _, p := range tp.TPMProperty {
		out[p.Property] = p.Value
	}
	return out, nil
}

// Handle ranges, TPM 2.0 Part 2 §7.2.
const (
	transientFirst  = 0x80000000
	persistentFirst = 0x81000000
	loadedSessions  = 0x02000000
	savedSessions   = 0x03000000
)

// TransientHandles lists the transient objects loaded in the TPM. On a TPM
// without a resource manager this shows leaks: after every Key is closed it
// should be empty.
func (t *TPM) TransientHandles() ([]tpm2.TPMHandle, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.handles(transientFirst)
}

// OpenSessions lists loaded and saved authorization sessions; like
// transient objects, none should outlive an operation.
func (t *TPM) OpenSessions() ([]tpm2.TPMHandle, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	loaded, err := t.handles(loadedSessions)
	if err != nil {
		return nil, err
	}
	saved, err := t.handles(savedSessions)
	if err != nil {
		return nil, err
	}
	return append(loaded, saved...), nil
}

// handles lists handles of the range starting at first. t.mu held.
func (t *TPM) handles(first uint32) ([]tpm2.TPMHandle, error) {
	return t.handlesIn(first, first|0x00ffffff, 0)
}

// handlesIn lists the handles from first to last, at most limit of them
// (0: all). t.mu held.
func (t *TPM) handlesIn(first, last uint32, limit int) ([]tpm2.TPMHandle, error) {
	var out []tpm2.TPMHandle
	next := first
	for {
		n := uint32(64)
		if limit > 0 {
			n = min(n, uint32(limit-len(out)))
		}
		rsp, err := tpm2.GetCapability{
			Capability:    tpm2.TPMCapHandles,
			Property:      next,
			PropertyCount: n,
		}.Execute(t.tr)
		if err != nil {
			return nil, fmt.Errorf("listing TPM handles: %w", err)
		}
		hl, err := rsp.CapabilityData.Data.Handles()
		if err != nil {
			return nil, err
		}
		for _, h := range hl.Handle {
			if uint32(h) > last || (limit > 0 && len(out) == limit) {
				return out, nil
			}
			out = append(out, h)
		}
		if !rsp.MoreData || len(hl.Handle) == 0 || (limit > 0 && len(out) == limit) {
			return out, nil
		}
		next = uint32(hl.Handle[len(hl.Handle)-1]) + 1
	}
}

// roomForObjects runs op; if the TPM is out of transient object slots
// (TPM_RC_OBJECT_MEMORY) it flushes every transient object and runs op
// again. Without a resource manager (swtpm, /dev/tpm0) objects loaded by a
// process that was killed stay loaded, and three of them exhaust swtpm.
// The agent owns its TPM; on /dev/tpmrm0 the kernel flushes for us and
// this never triggers. t.mu held.
func (t *TPM) roomForObjects(op func() error) error {
	err := op()
	if !errors.Is(err, tpm2.TPMRCObjectMemory) {
		return err
	}
	hs, herr := t.handles(transientFirst)
	if herr != nil || len(hs) == 0 {
		return err
	}
	for _, h := range hs {
		t.flush(h)
	}
	return op()
}

// flush releases a transient handle, ignoring errors: it runs on cleanup
// paths where the original error matters more. t.mu held.
func (t *TPM) flush(h tpm2.TPMHandle) {
	if uint32(h)>>24 != transientFirst>>24 {
		return
	}
	tpm2.FlushContext{FlushHandle: h}.Execute(t.tr) //nolint:errcheck // best effort on cleanup paths
}
