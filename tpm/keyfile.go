package tpm

import (
	"bytes"
	"crypto"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/google/go-tpm/tpm2"

	"iotagent.dev/iotagent/internal/atomicfile"
)

// keyFileFormat identifies the key file layout; a different value is refused.
const keyFileFormat = "iotagent-tpm-key-v1"

// parentOwnerSRK names the only parent we create keys under: the ECC P-256
// storage root key derived in the owner hierarchy from go-tpm's
// ECCSRKTemplate (the TCG provisioning guidance template).
const parentOwnerSRK = "owner-ecc-p256-srk"

// KeyFile is the on-disk form of a device key: its public area and its
// private area wrapped by the TPM's storage root key. Only the TPM that
// created it can load it; the file alone is useless to a thief.
//
// The file is JSON so an operator can read it; the checksum catches a
// truncated or edited file before the TPM is asked to load it, so that
// corruption and "another TPM" get different error messages.
type KeyFile struct {
	Format string `json:"format"`
	// Parent names the parent key; ParentName is its TPM name (hex), which
	// differs on every TPM and after the TPM's owner hierarchy is cleared.
	Parent     string `json:"parent"`
	ParentName string `json:"parent_name"`
	// Public and Private are the marshalled TPM2B_PUBLIC and TPM2B_PRIVATE.
	Public  []byte `json:"public"`
	Private []byte `json:"private"`
	// PersistentHandle, when set (e.g. "0x81000010"), is where the key was
	// also made persistent with TPM2_EvictControl.
	PersistentHandle string    `json:"persistent_handle,omitempty"`
	Created          time.Time `json:"created"`
	Checksum         string    `json:"sha256"`
}

func (kf *KeyFile) sum() string {
	h := sha256.New()
	for _, f := range [][]byte{[]byte(kf.Format), []byte(kf.Parent), []byte(kf.ParentName), kf.Public, kf.Private, []byte(kf.PersistentHandle)} {
		var n [4]byte
		binary.BigEndian.PutUint32(n[:], uint32(len(f)))
		h.Write(n[:])
		h.Write(f)
	}
	return hex.EncodeToString(h.Sum(nil))
}

// Handle returns the persistent handle, or 0 when the key lives only in
// its blobs.
func (kf *KeyFile) Handle() tpm2.TPMHandle {
	h, _ := ParseHandle(kf.PersistentHandle)
	return h
}

// PublicArea decodes the key's public area.
func (kf *KeyFile) PublicArea() (*tpm2.TPMTPublic, error) {
	p, err := tpm2.Unmarshal[tpm2.TPM2BPublic](kf.Public)
	if err != nil {
		return nil, fmt.Errorf("%w: public area: %w", ErrCorruptKey, err)
	}
	pub, err := p.Contents()
	if err != nil {
		return nil, fmt.Errorf("%w: public area: %w", ErrCorruptKey, err)
	}
	return pub, nil
}

// PublicKey returns the key's *ecdsa.PublicKey.
func (kf *KeyFile) PublicKey() (crypto.PublicKey, error) {
	pub, err := kf.PublicArea()
	if err != nil {
		return nil, err
	}
	pk, err := tpm2.Pub(*pub)
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrCorruptKey, err)
	}
	return pk, nil
}

// PublicKeySHA256 returns the SHA-256 of the key's DER SubjectPublicKeyInfo
// (see PublicKeySHA256).
func (kf *KeyFile) PublicKeySHA256() (string, error) {
	pk, err := kf.PublicKey()
	if err != nil {
		return "", err
	}
	return PublicKeySHA256(pk)
}

// Marshal returns the file's bytes with a fresh checksum.
func (kf *KeyFile) Marshal() ([]byte, error) {
	c := *kf
	c.Checksum = c.sum()
	b, err := json.MarshalIndent(&c, "", "  ")
	if err != nil {
		return nil, err
	}
	return append(b, '\n'), nil
}

// ParseKeyFile decodes and checks a key file. Any damage is ErrCorruptKey.
func ParseKeyFile(b []byte) (*KeyFile, error) {
	var kf KeyFile
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&kf); err != nil {
		return nil, fmt.Errorf("%w: %w", ErrCorruptKey, err)
	}
	if kf.Format != keyFileFormat && kf.Format != sealedFileFormat {
		return nil, fmt.Errorf("%w: format %q, want %q", ErrCorruptKey, kf.Format, keyFileFormat)
	}
	if kf.Checksum != kf.sum() {
		return nil, fmt.Errorf("%w: checksum mismatch (file truncated or edited)", ErrCorruptKey)
	}
	if kf.Parent != parentOwnerSRK {
		return nil, fmt.Errorf("%w: unknown parent %q", ErrCorruptKey, kf.Parent)
	}
	if _, err := kf.PublicArea(); err != nil {
		return nil, err
	}
	if _, err := tpm2.Unmarshal[tpm2.TPM2BPrivate](kf.Private); err != nil {
		return nil, fmt.Errorf("%w: private area: %w", ErrCorruptKey, err)
	}
	if kf.PersistentHandle != "" {
		if _, err := ParseHandle(kf.PersistentHandle); err != nil {
			return nil, fmt.Errorf("%w: %w", ErrCorruptKey, err)
		}
	}
	return &kf, nil
}

// ReadKeyFile reads and checks the key file at path. A missing file is
// ErrNoKey (wrapping fs.ErrNotExist); a damaged one ErrCorruptKey.
func ReadKeyFile(path string) (*KeyFile, error) {
	b, err := os.ReadFile(path)
	if errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("%w: %s does not exist: %w", ErrNoKey, path, os.ErrNotExist)
	}
	if err != nil {
		return nil, fmt.Errorf("reading key file: %w", err)
	}
	kf, err := ParseKeyFile(b)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return kf, nil
}

// WriteKeyFile writes kf to path atomically with mode 0600.
func WriteKeyFile(path string, kf *KeyFile) error {
	b, err := kf.Marshal()
	if err != nil {
		return err
	}
	return atomicfile.Write(path, b, 0o600)
}

// ParseHandle parses a persistent handle such as "0x81000010". Only the
// owner range 0x81000000–0x817FFFFF is accepted, minus 0x81010000–0x8101FFFF
// where TPMs keep their endorsement keys (TCG handle registry).
func ParseHandle(s string) (tpm2.TPMHandle, error) {
	v, err := strconv.ParseUint(strings.TrimPrefix(strings.ToLower(s), "0x"), 16, 32)
	if err != nil || !strings.HasPrefix(strings.ToLower(s), "0x") {
		return 0, fmt.Errorf("persistent handle %q: want hex like 0x81000010", s)
	}
	if v < 0x81000000 || v > 0x817FFFFF {
		return 0, fmt.Errorf("persistent handle %s: outside the owner range 0x81000000-0x817FFFFF", s)
	}
	if v>>16 == 0x8101 {
		return 0, fmt.Errorf("persistent handle %s: in the endorsement key range 0x81010000-0x8101FFFF", s)
	}
	return tpm2.TPMHandle(v), nil
}

// FormatHandle renders a handle as 0x%08x.
func FormatHandle(h tpm2.TPMHandle) string { return fmt.Sprintf("0x%08x", uint32(h)) }

// CheckWritableDir reports whether files can be created in dir, without
// leaving anything behind.
func CheckWritableDir(dir string) error {
	f, err := os.CreateTemp(dir, ".write-test-*")
	if err != nil {
		return fmt.Errorf("state dir %s is not writable: %w", dir, unwrapPathError(err))
	}
	name := f.Name()
	f.Close()
	return os.Remove(filepath.Clean(name))
}
