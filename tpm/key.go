package tpm

import (
	"bytes"
	"crypto"
	"crypto/ecdsa"
	"crypto/sha256"
	"crypto/x509"
	"encoding/asn1"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"math/big"
	"os"
	"path/filepath"
	"time"

	"github.com/google/go-tpm/tpm2"
)

// DeviceKeyAttributes are the object attributes of every device key: the
// key cannot leave this TPM (fixedTPM, fixedParent), was generated inside it
// (sensitiveDataOrigin), is used with an empty password (userWithAuth, noDA:
// the TPM itself is the protection) and only signs.
var DeviceKeyAttributes = tpm2.TPMAObject{
	FixedTPM:            true,
	FixedParent:         true,
	SensitiveDataOrigin: true,
	UserWithAuth:        true,
	NoDA:                true,
	SignEncrypt:         true,
}

// deviceKeyTemplate is an unrestricted ECC P-256 signing key. The scheme is
// left Null so the hash is chosen per signature (TLS may ask for SHA-384).
func deviceKeyTemplate() tpm2.TPMTPublic {
	return tpm2.TPMTPublic{
		Type:             tpm2.TPMAlgECC,
		NameAlg:          tpm2.TPMAlgSHA256,
		ObjectAttributes: DeviceKeyAttributes,
		Parameters: tpm2.NewTPMUPublicParms(tpm2.TPMAlgECC, &tpm2.TPMSECCParms{
			Symmetric: tpm2.TPMTSymDefObject{Algorithm: tpm2.TPMAlgNull},
			Scheme:    tpm2.TPMTECCScheme{Scheme: tpm2.TPMAlgNull},
			CurveID:   tpm2.TPMECCNistP256,
			KDF:       tpm2.TPMTKDFScheme{Scheme: tpm2.TPMAlgNull},
		}),
		Unique: tpm2.NewTPMUPublicID(tpm2.TPMAlgECC, &tpm2.TPMSECCPoint{}),
	}
}

// createSRK creates the owner hierarchy's ECC storage root key as a
// transient object. The same TPM always derives the same SRK. t.mu held;
// the caller flushes the returned handle.
func (t *TPM) createSRK() (tpm2.NamedHandle, error) {
	rsp, err := tpm2.CreatePrimary{
		PrimaryHandle: tpm2.TPMRHOwner,
		InPublic:      tpm2.New2B(tpm2.ECCSRKTemplate),
	}.Execute(t.tr)
	if err != nil {
		return tpm2.NamedHandle{}, fmt.Errorf("creating storage root key: %w", err)
	}
	return tpm2.NamedHandle{Handle: rsp.ObjectHandle, Name: rsp.Name}, nil
}

// CreateKey creates a new device key under the storage root key and returns
// its key file. Nothing is written to disk and nothing stays loaded.
func (t *TPM) CreateKey() (*KeyFile, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.createUnderSRK(keyFileFormat, "creating device key", tpm2.Create{InPublic: tpm2.New2B(deviceKeyTemplate())})
}

// createUnderSRK runs create (its parent filled in) under a fresh SRK and
// returns the new object's wrapped blobs as a file of format. t.mu held.
func (t *TPM) createUnderSRK(format, what string, create tpm2.Create) (*KeyFile, error) {
	var srk tpm2.NamedHandle
	var rsp *tpm2.CreateResponse
	err := t.roomForObjects(func() error {
		var err error
		if srk, err = t.createSRK(); err != nil {
			return err
		}
		defer t.flush(srk.Handle)
		create.ParentHandle = srk
		if rsp, err = create.Execute(t.tr); err != nil {
			return fmt.Errorf("%s: %w", what, err)
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	return &KeyFile{
		Format:     format,
		Parent:     parentOwnerSRK,
		ParentName: hex.EncodeToString(srk.Name.Buffer),
		Public:     tpm2.Marshal(rsp.OutPublic),
		Private:    tpm2.Marshal(rsp.OutPrivate),
		Created:    time.Now().UTC().Truncate(time.Second),
	}, nil
}

// Key is a device key loaded in the TPM. It implements crypto.Signer; each
// signature is made by the TPM. Safe for concurrent use. Close releases its
// transient handle; a persistent key stays in the TPM.
type Key struct {
	t    *TPM
	file *KeyFile

	// Guarded by t.mu.
	handle     tpm2.TPMHandle
	persistent bool
	closed     bool

	name   tpm2.TPM2BName
	public tpm2.TPMTPublic
	pub    *ecdsa.PublicKey
}

// LoadKey loads the key described by kf: from its persistent handle when it
// has one and the object there is this key, otherwise from its blobs.
// A key made by another TPM fails with ErrWrongTPM.
func (t *TPM) LoadKey(kf *KeyFile) (*Key, error) {
	if kf.Format != keyFileFormat {
		return nil, fmt.Errorf("%w: a sealed-data file, not a key", ErrCorruptKey)
	}
	pubArea, err := kf.PublicArea()
	if err != nil {
		return nil, err
	}
	pk, err := kf.PublicKey()
	if err != nil {
		return nil, err
	}
	ecpub, ok := pk.(*ecdsa.PublicKey)
	if !ok {
		return nil, fmt.Errorf("%w: not an ECC key", ErrCorruptKey)
	}
	name, err := tpm2.ObjectName(pubArea)
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrCorruptKey, err)
	}
	k := &Key{t: t, file: kf, name: *name, public: *pubArea, pub: ecpub}

	t.mu.Lock()
	defer t.mu.Unlock()
	if h := kf.Handle(); h != 0 {
		rsp, err := tpm2.ReadPublic{ObjectHandle: h}.Execute(t.tr)
		if err == nil && bytes.Equal(rsp.Name.Buffer, name.Buffer) {
			k.handle, k.persistent = h, true
			return k, nil
		}
		// The persistent copy is gone (evicted, TPM cleared): the blobs
		// decide whether this TPM can still use the key.
	}
	if err := t.roomForObjects(k.loadBlobs); err != nil {
		return nil, err
	}
	return k, nil
}

// loadBlobs loads k's wrapped blobs under a fresh SRK. t.mu held.
func (k *Key) loadBlobs() error {
	t, kf := k.t, k.file
	srk, err := t.createSRK()
	if err != nil {
		return err
	}
	defer t.flush(srk.Handle)
	if got := hex.EncodeToString(srk.Name.Buffer); got != kf.ParentName {
		return fmt.Errorf("%w: it was wrapped by storage root %.16s…, this TPM's is %.16s… (key file copied from another device, or this TPM was cleared)", ErrWrongTPM, kf.ParentName, got)
	}
	pub, _ := tpm2.Unmarshal[tpm2.TPM2BPublic](kf.Public)
	priv, _ := tpm2.Unmarshal[tpm2.TPM2BPrivate](kf.Private)
	rsp, err := tpm2.Load{ParentHandle: srk, InPrivate: *priv, InPublic: *pub}.Execute(t.tr)
	if errors.Is(err, tpm2.TPMRCIntegrity) {
		return fmt.Errorf("%w: the TPM refused its private blob (integrity check failed)", ErrWrongTPM)
	}
	if err != nil {
		return fmt.Errorf("loading device key: %w", err)
	}
	k.handle, k.persistent = rsp.ObjectHandle, false
	return nil
}

// Public returns the key's *ecdsa.PublicKey.
func (k *Key) Public() crypto.PublicKey { return k.pub }

// Name returns the key's TPM name (nameAlg || digest of the public area),
// the value a credential is bound to.
func (k *Key) Name() []byte { return bytes.Clone(k.name.Buffer) }

// PublicArea returns the key's TPMT_PUBLIC.
func (k *Key) PublicArea() tpm2.TPMTPublic { return k.public }

// File returns the key file the key was loaded from.
func (k *Key) File() *KeyFile {
	k.t.mu.Lock()
	defer k.t.mu.Unlock()
	return k.file
}

// Handle returns the handle the key is loaded at and whether it is
// persistent.
func (k *Key) Handle() (tpm2.TPMHandle, bool) {
	k.t.mu.Lock()
	defer k.t.mu.Unlock()
	return k.handle, k.persistent
}

// Sign signs digest, which must be the hash named by opts, with ECDSA in
// the TPM and returns an ASN.1 (r, s) signature. rand is ignored: the TPM
// makes its own nonce.
//
// Every signature is verified before it is returned. This costs one
// software verification and guarantees that a restarted TPM that reused
// the key's transient handle for another object, or a faulty TPM, never
// yields a wrong signature: the key is reloaded from its blobs instead.
func (k *Key) Sign(_ io.Reader, digest []byte, opts crypto.SignerOpts) ([]byte, error) {
	if opts == nil {
		return nil, errors.New("tpm sign: no hash given")
	}
	var alg tpm2.TPMIAlgHash
	switch opts.HashFunc() {
	case crypto.SHA256:
		alg = tpm2.TPMAlgSHA256
	case crypto.SHA384:
		alg = tpm2.TPMAlgSHA384
	case crypto.SHA512:
		alg = tpm2.TPMAlgSHA512
	default:
		return nil, fmt.Errorf("tpm sign: unsupported hash %v", opts.HashFunc())
	}
	if len(digest) != opts.HashFunc().Size() {
		return nil, fmt.Errorf("tpm sign: digest is %d bytes, %v needs %d", len(digest), opts.HashFunc(), opts.HashFunc().Size())
	}

	k.t.mu.Lock()
	defer k.t.mu.Unlock()
	if k.closed {
		return nil, errors.New("tpm sign: key is closed")
	}
	sig, err := k.sign(alg, digest)
	if err == nil && ecdsa.VerifyASN1(k.pub, digest, sig) {
		return sig, nil
	}
	if k.persistent {
		if err == nil {
			err = errors.New("TPM returned a signature that does not verify")
		}
		return nil, fmt.Errorf("tpm sign: %w", err)
	}
	// The transient object may be gone (TPM restarted) or replaced: reload
	// from the blobs once and retry. If the old handle still holds this
	// key (the failure was something else, a timeout say), flush it first
	// so that a long-running signer does not fill the TPM with copies; a
	// handle now holding another object is left alone.
	if rsp, rerr := (tpm2.ReadPublic{ObjectHandle: k.handle}).Execute(k.t.tr); rerr == nil && bytes.Equal(rsp.Name.Buffer, k.name.Buffer) {
		k.t.flush(k.handle)
	}
	if rerr := k.loadBlobs(); rerr != nil {
		return nil, fmt.Errorf("tpm sign: %w; reloading key: %w", orElse(err, "signature did not verify"), rerr)
	}
	sig, err = k.sign(alg, digest)
	if err != nil {
		return nil, fmt.Errorf("tpm sign: %w", err)
	}
	if !ecdsa.VerifyASN1(k.pub, digest, sig) {
		return nil, errors.New("tpm sign: TPM returned a signature that does not verify")
	}
	return sig, nil
}

func orElse(err error, msg string) error {
	if err != nil {
		return err
	}
	return errors.New(msg)
}

// sign runs TPM2_Sign. t.mu held.
func (k *Key) sign(alg tpm2.TPMIAlgHash, digest []byte) ([]byte, error) {
	rsp, err := tpm2.Sign{
		KeyHandle: tpm2.NamedHandle{Handle: k.handle, Name: k.name},
		Digest:    tpm2.TPM2BDigest{Buffer: digest},
		InScheme: tpm2.TPMTSigScheme{
			Scheme:  tpm2.TPMAlgECDSA,
			Details: tpm2.NewTPMUSigScheme(tpm2.TPMAlgECDSA, &tpm2.TPMSSchemeHash{HashAlg: alg}),
		},
		Validation: tpm2.TPMTTKHashCheck{Tag: tpm2.TPMSTHashCheck, Hierarchy: tpm2.TPMRHNull},
	}.Execute(k.t.tr)
	if err != nil {
		return nil, err
	}
	k.t.signatures.Add(1)
	es, err := rsp.Signature.Signature.ECDSA()
	if err != nil {
		return nil, err
	}
	return asn1.Marshal(struct{ R, S *big.Int }{
		new(big.Int).SetBytes(es.SignatureR.Buffer),
		new(big.Int).SetBytes(es.SignatureS.Buffer),
	})
}

// Close flushes the key's transient handle. A persistent key stays in the
// TPM. Close is idempotent.
func (k *Key) Close() error {
	k.t.mu.Lock()
	defer k.t.mu.Unlock()
	if k.closed {
		return nil
	}
	k.closed = true
	if k.persistent {
		return nil
	}
	if _, err := (tpm2.FlushContext{FlushHandle: k.handle}).Execute(k.t.tr); err != nil {
		return fmt.Errorf("flushing device key: %w", err)
	}
	return nil
}

// persist makes the loaded key persistent at h. t.mu held.
func (k *Key) persist(h tpm2.TPMHandle) error {
	if k.persistent {
		if k.handle == h {
			return nil
		}
		return fmt.Errorf("key is already persistent at %s", FormatHandle(k.handle))
	}
	if rsp, err := (tpm2.ReadPublic{ObjectHandle: h}).Execute(k.t.tr); err == nil {
		if bytes.Equal(rsp.Name.Buffer, k.name.Buffer) {
			k.t.flush(k.handle)
			k.handle, k.persistent = h, true
			return nil
		}
		return fmt.Errorf("persistent handle %s holds another object; choose a free handle or evict it with tpm2_evictcontrol", FormatHandle(h))
	}
	_, err := tpm2.EvictControl{
		Auth:             tpm2.TPMRHOwner,
		ObjectHandle:     tpm2.NamedHandle{Handle: k.handle, Name: k.name},
		PersistentHandle: h,
	}.Execute(k.t.tr)
	if err != nil {
		return fmt.Errorf("persisting device key at %s: %w", FormatHandle(h), err)
	}
	k.t.flush(k.handle)
	k.handle, k.persistent = h, true
	return nil
}

// evict removes the persistent copy of k (the blobs stay valid). t.mu held.
func (k *Key) evict() error {
	if !k.persistent {
		return nil
	}
	_, err := tpm2.EvictControl{
		Auth:             tpm2.TPMRHOwner,
		ObjectHandle:     tpm2.NamedHandle{Handle: k.handle, Name: k.name},
		PersistentHandle: tpm2.TPMIDHPersistent(k.handle),
	}.Execute(k.t.tr)
	if err != nil {
		return fmt.Errorf("evicting %s: %w", FormatHandle(k.handle), err)
	}
	k.persistent = false
	k.closed = true
	return nil
}

// PublicKeySHA256 returns the SHA-256 of the DER SubjectPublicKeyInfo of
// pub, the same value `openssl pkey -pubin -outform DER | sha256sum` gives.
func PublicKeySHA256(pub crypto.PublicKey) (string, error) {
	der, err := x509.MarshalPKIXPublicKey(pub)
	if err != nil {
		return "", err
	}
	s := sha256.Sum256(der)
	return hex.EncodeToString(s[:]), nil
}

// AttributeNames lists the set object attributes by their TPM 2.0 Part 2
// names (fixedTPM, fixedParent, sensitiveDataOrigin, userWithAuth, …).
func AttributeNames(a tpm2.TPMAObject) []string {
	var out []string
	for _, f := range []struct {
		set  bool
		name string
	}{
		{a.FixedTPM, "fixedTPM"},
		{a.STClear, "stClear"},
		{a.FixedParent, "fixedParent"},
		{a.SensitiveDataOrigin, "sensitiveDataOrigin"},
		{a.UserWithAuth, "userWithAuth"},
		{a.AdminWithPolicy, "adminWithPolicy"},
		{a.NoDA, "noDA"},
		{a.EncryptedDuplication, "encryptedDuplication"},
		{a.Restricted, "restricted"},
		{a.Decrypt, "decrypt"},
		{a.SignEncrypt, "sign"},
		{a.X509Sign, "x509sign"},
	} {
		if f.set {
			out = append(out, f.name)
		}
	}
	return out
}

// KeyOptions controls EnsureKey.
type KeyOptions struct {
	// PersistHandle, when non-zero, also makes the key persistent there.
	PersistHandle tpm2.TPMHandle
	// Force replaces an existing (or damaged) key file with a new key. The
	// old key's persistent copy, if any, is evicted.
	Force bool
}

// EnsureKey makes sure a device key exists at path and returns its key file
// and whether it was created now. An existing valid key is kept (and
// persisted when asked); a damaged or foreign one is an error unless
// opts.Force. On error nothing on disk is changed.
func (t *TPM) EnsureKey(path string, opts KeyOptions) (kf *KeyFile, created bool, err error) {
	existing, rerr := ReadKeyFile(path)
	if rerr != nil && !errors.Is(rerr, os.ErrNotExist) && !opts.Force {
		return nil, false, rerr
	}
	if rerr == nil && !opts.Force {
		k, err := t.LoadKey(existing)
		if err != nil {
			return nil, false, err
		}
		defer k.Close()
		if opts.PersistHandle == 0 || existing.Handle() == opts.PersistHandle {
			return existing, false, nil
		}
		updated := *existing
		if err := t.persistAndWrite(k, &updated, path, opts.PersistHandle); err != nil {
			return nil, false, err
		}
		return &updated, false, nil
	}

	if err := CheckWritableDir(filepath.Dir(path)); err != nil {
		return nil, false, err
	}
	kf, err = t.CreateKey()
	if err != nil {
		return nil, false, err
	}
	k, err := t.LoadKey(kf)
	if err != nil {
		return nil, false, err
	}
	defer k.Close()
	if existing != nil && existing.Handle() != 0 && existing.Handle() == opts.PersistHandle {
		// --force onto the same handle: the old key keeps its blobs.
		if err := t.EvictKey(existing); err != nil {
			return nil, false, err
		}
	}
	if err := t.persistAndWrite(k, kf, path, opts.PersistHandle); err != nil {
		return nil, false, err
	}
	// The old key is replaced on disk; its persistent copy would only
	// occupy a slot.
	if existing != nil && existing.Handle() != 0 && existing.Handle() != opts.PersistHandle {
		t.EvictKey(existing) //nolint:errcheck // the new key is in place; a stale slot is harmless
	}
	return kf, true, nil
}

// persistAndWrite makes k persistent at h (when h is not 0), records that in
// kf and writes kf to path. If the write fails the persistent copy is
// removed again, so the TPM and the disk agree.
func (t *TPM) persistAndWrite(k *Key, kf *KeyFile, path string, h tpm2.TPMHandle) error {
	if err := CheckWritableDir(filepath.Dir(path)); err != nil {
		return err
	}
	if h != 0 {
		t.mu.Lock()
		err := k.persist(h)
		t.mu.Unlock()
		if err != nil {
			return err
		}
		kf.PersistentHandle = FormatHandle(h)
	}
	if err := WriteKeyFile(path, kf); err != nil {
		t.mu.Lock()
		k.evict() //nolint:errcheck // undoing; the write error is reported
		t.mu.Unlock()
		return err
	}
	return nil
}

// EvictKey removes kf's persistent copy from the TPM if the object at its
// handle is that key. The key's blobs remain loadable.
func (t *TPM) EvictKey(kf *KeyFile) error {
	h := kf.Handle()
	if h == 0 {
		return nil
	}
	pubArea, err := kf.PublicArea()
	if err != nil {
		return err
	}
	name, err := tpm2.ObjectName(pubArea)
	if err != nil {
		return err
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	rsp, err := tpm2.ReadPublic{ObjectHandle: h}.Execute(t.tr)
	if err != nil || !bytes.Equal(rsp.Name.Buffer, name.Buffer) {
		return nil
	}
	k := &Key{t: t, handle: h, persistent: true, name: *name}
	return k.evict()
}

// MarshalPublicArea returns the key's TPMT_PUBLIC (no size prefix), as
// /tpmenroll sends it.
func (k *Key) MarshalPublicArea() []byte { return tpm2.Marshal(&k.public) }

// Persist makes the loaded key k persistent at h and returns its key file
// updated with the handle (the caller writes it).
func (t *TPM) Persist(k *Key, h tpm2.TPMHandle) (*KeyFile, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if err := k.persist(h); err != nil {
		return nil, err
	}
	kf := *k.file
	kf.PersistentHandle = FormatHandle(h)
	k.file = &kf
	return &kf, nil
}
