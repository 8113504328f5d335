package tpm

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/rsa"
	"crypto/x509"
	"encoding/asn1"
	"errors"
	"fmt"

	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport"
)

// EK certificate NV indices and the persistent handles their keys are
// conventionally kept at (TCG EK Credential Profile 2.5, §2.2.1).
const (
	NVIndexRSA2048EKCert = 0x01c00002
	NVIndexECCP256EKCert = 0x01c0000a
	NVIndexECCP384EKCert = 0x01c00016
)

// ekSlot ties an EK certificate index to its key type, the persistent
// handle where TPMs and swtpm keep that EK, and the template that recreates
// it when it is not persisted (none for P-384: its high-range template is
// not in go-tpm, and swtpm persists it).
type ekSlot struct {
	nvIndex  uint32
	keyType  string
	handle   tpm2.TPMHandle
	template *tpm2.TPMTPublic
}

func ekSlots() []ekSlot {
	rsa, ecc := tpm2.RSAEKTemplate, tpm2.ECCEKTemplate
	return []ekSlot{
		{NVIndexRSA2048EKCert, "rsa2048", 0x81010001, &rsa},
		{NVIndexECCP256EKCert, "ecc-p256", 0x81010002, &ecc},
		{NVIndexECCP384EKCert, "ecc-p384", 0x81010016, nil},
	}
}

// EKCertificate is one EK certificate read from TPM NV storage.
type EKCertificate struct {
	NVIndex uint32
	KeyType string // rsa2048, ecc-p256, ecc-p384
	Raw     []byte // DER, trailing NV padding removed
	// Cert is the parsed certificate; nil with ParseErr set when Go's
	// parser refuses it (some vendors' certificates are malformed).
	Cert     *x509.Certificate
	ParseErr error
}

// EKCertificates reads every EK certificate the TPM holds, in NV index
// order. A TPM without any returns an empty list and no error.
func (t *TPM) EKCertificates() ([]EKCertificate, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	var out []EKCertificate
	for _, s := range ekSlots() {
		raw, err := t.readNV(s.nvIndex)
		if errors.Is(err, errNVAbsent) {
			continue
		}
		if err != nil {
			return nil, fmt.Errorf("reading EK certificate at NV %#x: %w", s.nvIndex, err)
		}
		raw = trimDER(raw)
		c := EKCertificate{NVIndex: s.nvIndex, KeyType: s.keyType, Raw: raw}
		c.Cert, c.ParseErr = x509.ParseCertificate(raw)
		out = append(out, c)
	}
	return out, nil
}

var errNVAbsent = errors.New("NV index not defined")

// maxNVRead bounds one NV index read: an EK certificate, or a few chain
// certificates, is a few KiB; NV indices hold up to 64 KiB.
const maxNVRead = 8 << 10

// readNV reads a whole NV index of at most maxNVRead bytes in chunks the
// TPM accepts, authorized by the index's own empty auth value (AUTHREAD,
// as EK certificate indices are) or else the owner's (OWNERREAD). t.mu
// held.
func (t *TPM) readNV(index uint32) ([]byte, error) {
	h := tpm2.TPMHandle(index)
	pub, err := tpm2.NVReadPublic{NVIndex: h}.Execute(t.tr)
	if err != nil {
		if errors.Is(err, tpm2.TPMRCHandle) {
			return nil, errNVAbsent
		}
		return nil, err
	}
	nvPub, err := pub.NVPublic.Contents()
	if err != nil {
		return nil, err
	}
	if nvPub.DataSize > maxNVRead {
		return nil, fmt.Errorf("NV index of %d bytes, over the %d this agent reads", nvPub.DataSize, maxNVRead)
	}
	var auth interface {
		HandleValue() uint32
		KnownName() *tpm2.TPM2BName
	} = tpm2.NamedHandle{Handle: h, Name: pub.NVName}
	if !nvPub.Attributes.AuthRead && nvPub.Attributes.OwnerRead {
		auth = tpm2.TPMRHOwner
	}
	chunk := 1024
	if v, err := t.properties(tpm2.TPMPTNVBufferMax, 1); err == nil && v[tpm2.TPMPTNVBufferMax] > 0 && int(v[tpm2.TPMPTNVBufferMax]) < chunk {
		chunk = int(v[tpm2.TPMPTNVBufferMax])
	}
	size := int(nvPub.DataSize)
	out := make([]byte, 0, size)
	for off := 0; off < size; off += chunk {
		n := min(chunk, size-off)
		rsp, err := tpm2.NVRead{
			AuthHandle: auth,
			NVIndex:    tpm2.NamedHandle{Handle: h, Name: pub.NVName},
			Size:       uint16(n),
			Offset:     uint16(off),
		}.Execute(t.tr)
		if err != nil {
			return nil, err
		}
		out = append(out, rsp.Data.Buffer...)
	}
	return out, nil
}

// trimDER drops bytes after the outer DER SEQUENCE: NV indices are often
// larger than the certificate they hold.
func trimDER(b []byte) []byte {
	if len(b) < 2 || b[0] != 0x30 {
		return b
	}
	l := int(b[1])
	hdr := 2
	if l&0x80 != 0 {
		n := l & 0x7f
		if n == 0 || n > 4 || len(b) < 2+n {
			return b
		}
		l = 0
		for _, c := range b[2 : 2+n] {
			l = l<<8 | int(c)
		}
		hdr += n
	}
	if hdr+l > len(b) {
		return b
	}
	return b[:hdr+l]
}

// EK is an endorsement key: its public area, certificate and where to find
// it in the TPM.
type EK struct {
	KeyType     string
	Certificate EKCertificate
	Public      tpm2.TPMTPublic
	// Handle is the EK's persistent handle, or 0 when it is recreated from
	// its template for each use.
	Handle tpm2.TPMHandle
}

// PublicKey returns the EK's public key (*rsa.PublicKey or *ecdsa.PublicKey).
func (e *EK) PublicKey() (crypto.PublicKey, error) { return tpm2.Pub(e.Public) }

// EndorsementKeys returns the TPM's EKs that have a certificate whose public
// key matches the key in the TPM, RSA first: it is what EST servers that do
// credential activation support most widely.
func (t *TPM) EndorsementKeys() ([]EK, error) {
	certs, err := t.EKCertificates()
	if err != nil {
		return nil, err
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	var out []EK
	var errs []error
	for _, c := range certs {
		if c.Cert == nil {
			errs = append(errs, fmt.Errorf("EK certificate at NV %#x: %w", c.NVIndex, c.ParseErr))
			continue
		}
		var slot ekSlot
		for _, s := range ekSlots() {
			if s.nvIndex == c.NVIndex {
				slot = s
			}
		}
		ek, err := t.findEK(slot, c)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		out = append(out, *ek)
	}
	if len(out) == 0 {
		if len(errs) > 0 {
			return nil, fmt.Errorf("%w: %w", ErrNoEK, errors.Join(errs...))
		}
		return nil, fmt.Errorf("%w: the TPM holds no EK certificate", ErrNoEK)
	}
	return out, nil
}

// findEK locates the key certified by c. t.mu held.
func (t *TPM) findEK(s ekSlot, c EKCertificate) (*EK, error) {
	if rsp, err := (tpm2.ReadPublic{ObjectHandle: s.handle}).Execute(t.tr); err == nil {
		if pub, err := rsp.OutPublic.Contents(); err == nil && publicMatches(*pub, c.Cert.PublicKey) {
			return &EK{KeyType: s.keyType, Certificate: c, Public: *pub, Handle: s.handle}, nil
		}
	}
	if s.template == nil {
		return nil, fmt.Errorf("%w: the %s EK is not persisted at %s and has no standard template here", ErrNoEK, s.keyType, FormatHandle(s.handle))
	}
	rsp, err := tpm2.CreatePrimary{
		PrimaryHandle: tpm2.TPMRHEndorsement,
		InPublic:      tpm2.New2B(*s.template),
	}.Execute(t.tr)
	if err != nil {
		return nil, fmt.Errorf("recreating %s EK: %w", s.keyType, err)
	}
	t.flush(rsp.ObjectHandle)
	pub, err := rsp.OutPublic.Contents()
	if err != nil {
		return nil, err
	}
	if !publicMatches(*pub, c.Cert.PublicKey) {
		return nil, fmt.Errorf("%w: the %s EK certificate at NV %#x does not match the TPM's %s EK", ErrNoEK, s.keyType, c.NVIndex, s.keyType)
	}
	return &EK{KeyType: s.keyType, Certificate: c, Public: *pub}, nil
}

// publicMatches reports whether a TPM public area holds the same key as a
// certificate's public key.
func publicMatches(p tpm2.TPMTPublic, certKey any) bool {
	k, err := tpm2.Pub(p)
	if err != nil {
		return false
	}
	switch ck := certKey.(type) {
	case *rsa.PublicKey:
		return ck.Equal(k)
	case *ecdsa.PublicKey:
		return ck.Equal(k)
	}
	return false
}

// ActivateCredential recovers the secret that CreateCredential bound to the
// (EK, key name) pair, proving that key lives in the same TPM as ek.
// credentialBlob is the TPM2B_ID_OBJECT's contents and encryptedSecret the
// TPM2B_ENCRYPTED_SECRET's contents, both without their size prefix.
//
// A credential made for another key's name, or for another TPM's EK, fails
// (TPM_RC_INTEGRITY or a decryption error).
func (t *TPM) ActivateCredential(k *Key, ek *EK, credentialBlob, encryptedSecret []byte) ([]byte, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if k.closed {
		return nil, errors.New("activating credential: key is closed")
	}
	ekHandle := ek.Handle
	if ekHandle == 0 {
		rsp, err := tpm2.CreatePrimary{
			PrimaryHandle: tpm2.TPMRHEndorsement,
			InPublic:      tpm2.New2B(ek.Public),
		}.Execute(t.tr)
		if err != nil {
			return nil, fmt.Errorf("recreating EK: %w", err)
		}
		defer t.flush(rsp.ObjectHandle)
		ekHandle = rsp.ObjectHandle
	}
	ekName, err := tpm2.ObjectName(&ek.Public)
	if err != nil {
		return nil, err
	}
	// The standard low-range EK templates leave userWithAuth clear and
	// carry PolicySecret(TPM_RH_ENDORSEMENT) as their policy; high-range
	// ones (swtpm's P-384 EK) set userWithAuth and take the empty password.
	var ekAuth tpm2.Session = tpm2.PasswordAuth(nil)
	if !ek.Public.ObjectAttributes.UserWithAuth {
		ekAuth = tpm2.Policy(ek.Public.NameAlg, 16, func(tr transport.TPM, s tpm2.TPMISHPolicy, nonce tpm2.TPM2BNonce) error {
			_, err := tpm2.PolicySecret{
				AuthHandle:    tpm2.TPMRHEndorsement,
				PolicySession: s,
				NonceTPM:      nonce,
			}.Execute(tr)
			return err
		})
	}
	rsp, err := tpm2.ActivateCredential{
		ActivateHandle: tpm2.AuthHandle{Handle: k.handle, Name: k.name, Auth: tpm2.PasswordAuth(nil)},
		KeyHandle:      tpm2.AuthHandle{Handle: ekHandle, Name: *ekName, Auth: ekAuth},
		CredentialBlob: tpm2.TPM2BIDObject{Buffer: credentialBlob},
		Secret:         tpm2.TPM2BEncryptedSecret{Buffer: encryptedSecret},
	}.Execute(t.tr)
	if err != nil {
		return nil, fmt.Errorf("activating credential: %w", err)
	}
	return rsp.CertInfo.Buffer, nil
}

// MarshalPublicArea returns the EK's TPMT_PUBLIC, as /tpmenroll sends it.
func (e *EK) MarshalPublicArea() []byte { return tpm2.Marshal(&e.Public) }

// The EK certificate chain range (TCG EK Credential Profile 2.x): NV
// indices where a TPM or platform vendor provisions the certificates
// between the EK certificate and the vendor's root, from the first index
// on. An index holds one or more DER certificates back to back (Intel PTT
// keeps its whole chain in 0x01c00100), possibly followed by padding.
const (
	NVIndexEKChainFirst = 0x01c00100
	NVIndexEKChainLast  = 0x01c001ff
)

// Bounds of EKChain: a chain is a few intermediates, and each one costs
// TPM commands on a slow bus and bytes in every /tpmenroll request.
const (
	maxEKChainIndices = 8
	maxEKChainCerts   = 8
	maxEKChainBytes   = 16 << 10
)

// EKChain returns the DER certificates the TPM holds in the EK chain
// range, in index order, unparsed (the EK certificates of some vendors
// need special handling, and so may their CAs). It reads at most 8
// indices of at most 8 KiB each, 16 KiB in all, and returns at most 8
// certificates. A TPM without any returns nil and no error.
//
// An index it cannot read, or whose content is not DER, is skipped: the
// certificates of the others are returned with an error naming what was
// skipped.
func (t *TPM) EKChain() ([][]byte, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	indices, err := t.handlesIn(NVIndexEKChainFirst, NVIndexEKChainLast, maxEKChainIndices)
	if err != nil {
		return nil, fmt.Errorf("EK chain: %w", err)
	}
	var certs [][]byte
	var errs []error
	total := 0
	for _, h := range indices {
		if len(certs) == maxEKChainCerts {
			break
		}
		raw, err := t.readNV(uint32(h))
		if err != nil {
			errs = append(errs, fmt.Errorf("EK chain NV %#x: %w", uint32(h), err))
			continue
		}
		if total += len(raw); total > maxEKChainBytes {
			errs = append(errs, fmt.Errorf("EK chain NV %#x and after: over %d bytes in all, not read", uint32(h), maxEKChainBytes))
			break
		}
		found := splitDER(raw, maxEKChainCerts-len(certs))
		if len(found) == 0 {
			errs = append(errs, fmt.Errorf("EK chain NV %#x holds no DER certificate", uint32(h)))
		}
		certs = append(certs, found...)
	}
	return certs, errors.Join(errs...)
}

// splitDER returns up to limit DER SEQUENCEs from the front of b,
// stopping at the first byte that does not start one (padding).
func splitDER(b []byte, limit int) [][]byte {
	var out [][]byte
	for len(b) > 0 && b[0] == 0x30 && len(out) < limit {
		var rv asn1.RawValue
		rest, err := asn1.Unmarshal(b, &rv)
		if err != nil {
			break
		}
		out = append(out, rv.FullBytes)
		b = rest
	}
	return out
}
