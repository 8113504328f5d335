package tpm

import (
	"encoding/hex"
	"errors"
	"fmt"
	"os"

	"github.com/google/go-tpm/tpm2"
)

// sealedFileFormat marks a key file that holds sealed data, not a key.
const sealedFileFormat = "iotagent-tpm-sealed-v1"

// MaxSealed is the most data TPM2_Create seals in one object (the
// TPM2B_SENSITIVE_DATA limit of common TPMs).
const MaxSealed = 128

// Seal stores secret in a TPM data object under the storage root key and
// returns its wrapped blobs: only this TPM can unseal them. Use it for a
// small key (the DTLS session sealing key), not bulk data.
func (t *TPM) Seal(secret []byte) (*KeyFile, error) {
	if len(secret) == 0 || len(secret) > MaxSealed {
		return nil, fmt.Errorf("sealing %d bytes: want 1 to %d", len(secret), MaxSealed)
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	tmpl := tpm2.TPMTPublic{
		Type:    tpm2.TPMAlgKeyedHash,
		NameAlg: tpm2.TPMAlgSHA256,
		ObjectAttributes: tpm2.TPMAObject{
			FixedTPM: true, FixedParent: true, UserWithAuth: true, NoDA: true,
		},
		Parameters: tpm2.NewTPMUPublicParms(tpm2.TPMAlgKeyedHash, &tpm2.TPMSKeyedHashParms{
			Scheme: tpm2.TPMTKeyedHashScheme{Scheme: tpm2.TPMAlgNull},
		}),
	}
	return t.createUnderSRK(sealedFileFormat, "sealing data", tpm2.Create{
		InSensitive: tpm2.TPM2BSensitiveCreate{Sensitive: &tpm2.TPMSSensitiveCreate{
			Data: tpm2.NewTPMUSensitiveCreate(&tpm2.TPM2BSensitiveData{Buffer: secret}),
		}},
		InPublic: tpm2.New2B(tmpl),
	})
}

// Unseal returns the data sealed in sf by this TPM. Another TPM's blobs
// fail with ErrWrongTPM.
func (t *TPM) Unseal(sf *KeyFile) ([]byte, error) {
	if sf.Format != sealedFileFormat {
		return nil, fmt.Errorf("%w: not a sealed-data file", ErrCorruptKey)
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	var out []byte
	err := t.roomForObjects(func() error {
		srk, err := t.createSRK()
		if err != nil {
			return err
		}
		defer t.flush(srk.Handle)
		if got := hex.EncodeToString(srk.Name.Buffer); got != sf.ParentName {
			return fmt.Errorf("%w: sealed by storage root %.16s…, this TPM's is %.16s…", ErrWrongTPM, sf.ParentName, got)
		}
		pub, err := tpm2.Unmarshal[tpm2.TPM2BPublic](sf.Public)
		if err != nil {
			return fmt.Errorf("%w: %w", ErrCorruptKey, err)
		}
		priv, err := tpm2.Unmarshal[tpm2.TPM2BPrivate](sf.Private)
		if err != nil {
			return fmt.Errorf("%w: %w", ErrCorruptKey, err)
		}
		lr, err := tpm2.Load{ParentHandle: srk, InPrivate: *priv, InPublic: *pub}.Execute(t.tr)
		if errors.Is(err, tpm2.TPMRCIntegrity) {
			return fmt.Errorf("%w: the TPM refused the sealed blob", ErrWrongTPM)
		}
		if err != nil {
			return fmt.Errorf("loading sealed data: %w", err)
		}
		defer t.flush(lr.ObjectHandle)
		ur, err := tpm2.Unseal{ItemHandle: tpm2.NamedHandle{Handle: lr.ObjectHandle, Name: lr.Name}}.Execute(t.tr)
		if err != nil {
			return fmt.Errorf("unsealing: %w", err)
		}
		out = ur.OutData.Buffer
		return nil
	})
	return out, err
}

// SealedSecret returns the secret sealed in the file at path, creating a
// new random one of size bytes (from random) and sealing it there when the
// file does not exist. The file is written atomically, 0600.
func (t *TPM) SealedSecret(path string, size int, random func([]byte) error) ([]byte, error) {
	sf, err := ReadKeyFile(path)
	if err == nil {
		return t.Unseal(sf)
	}
	if !errors.Is(err, os.ErrNotExist) {
		return nil, err
	}
	secret := make([]byte, size)
	if err := random(secret); err != nil {
		return nil, err
	}
	if sf, err = t.Seal(secret); err != nil {
		return nil, err
	}
	if err := WriteKeyFile(path, sf); err != nil {
		return nil, err
	}
	return secret, nil
}
