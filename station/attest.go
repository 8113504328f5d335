package station

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/rsa"
	"crypto/x509"
	"encoding/asn1"
	"fmt"
	"slices"
	"time"

	"github.com/google/go-tpm/tpm2"

	"iotagent.dev/iotagent/est"
)

// refusal is a decision against a request, with the HTTP status to answer
// and the reason for the audit log. Its message is safe to show the client.
type refusal struct {
	status int
	code   string // short, fixed: the metrics label
	reason string
	// detail, when set, is the audit log's reason instead of reason: what
	// the operator may know and the client may not.
	detail string
	// free: not counted against the client by the failure limiter.
	free       bool
	retryAfter time.Duration
	// confirming: the refusal of an unconfirmed certificate's first use.
	confirming bool
}

func (r *refusal) Error() string { return r.reason }

func refuse(status int, code, format string, args ...any) *refusal {
	return &refusal{status: status, code: code, reason: fmt.Sprintf(format, args...)}
}

// EKHash is est.EKHash: how manifests and the registry name an EK.
func EKHash(ekCert *x509.Certificate) string { return est.EKHash(ekCert) }

var oidSAN = asn1.ObjectIdentifier{2, 5, 29, 17}

// ParseEKCertificate parses an EK certificate so that crypto/x509 can
// verify it: TPM EK certificates carry a critical subjectAltName holding
// only a directoryName (TPM manufacturer, model, version), which Go marks
// unhandled.
func ParseEKCertificate(der []byte) (*x509.Certificate, error) {
	c, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, err
	}
	c.UnhandledCriticalExtensions = slices.DeleteFunc(c.UnhandledCriticalExtensions, func(o asn1.ObjectIdentifier) bool {
		return o.Equal(oidSAN)
	})
	return c, nil
}

// attestation is a verified /tpmenroll request.
type attestation struct {
	ekCert  *x509.Certificate
	ekHash  string
	ekPub   tpm2.TPMTPublic
	keyName []byte
	csr     *x509.CertificateRequest
}

// verifyAttestation checks everything a /tpmenroll request claims: the EK
// certificate chains to a trusted TPM manufacturer, the EK public area is
// that certificate's key, the key to certify was generated in and cannot
// leave a TPM, and it is the key of the CSR, whose signature verifies. It
// does not prove the two keys share a TPM: credential activation does.
func (s *Station) verifyAttestation(req *est.TPMEnrollRequest) (*attestation, error) {
	if len(req.EKChain) == 0 {
		return nil, refuse(400, "malformed", "no EK certificate")
	}
	ekCert, err := ParseEKCertificate(req.EKChain[0])
	if err != nil {
		return nil, refuse(400, "malformed", "EK certificate does not parse: %v", err)
	}
	inter := s.tpmInter.Clone()
	for _, der := range req.EKChain[1:] {
		c, err := x509.ParseCertificate(der)
		if err != nil {
			return nil, refuse(400, "malformed", "EK chain certificate does not parse: %v", err)
		}
		inter.AddCert(c)
	}
	if _, err := ekCert.Verify(x509.VerifyOptions{
		Roots: s.tpmRoots, Intermediates: inter,
		CurrentTime: s.now(),
		KeyUsages:   []x509.ExtKeyUsage{x509.ExtKeyUsageAny},
	}); err != nil {
		return nil, refuse(403, "ek_untrusted", "EK certificate does not chain to a trusted TPM manufacturer root: %v", err)
	}
	a := &attestation{ekCert: ekCert, ekHash: EKHash(ekCert)}

	ekPub, err := tpm2.Unmarshal[tpm2.TPMTPublic](req.EKPublic)
	if err != nil {
		return nil, refuse(400, "malformed", "EK public area does not parse: %v", err)
	}
	if !publicAreaMatches(*ekPub, ekCert.PublicKey) {
		return nil, refuse(403, "ek_mismatch", "EK public area does not match the EK certificate")
	}
	if !ekPub.ObjectAttributes.Restricted || !ekPub.ObjectAttributes.Decrypt {
		return nil, refuse(403, "ek_mismatch", "EK public area is not a restricted decryption key")
	}
	a.ekPub = *ekPub

	keyPub, err := tpm2.Unmarshal[tpm2.TPMTPublic](req.KeyPublic)
	if err != nil {
		return nil, refuse(400, "malformed", "key public area does not parse: %v", err)
	}
	attrs := keyPub.ObjectAttributes
	var missing []string
	for _, f := range []struct {
		set  bool
		name string
	}{{attrs.FixedTPM, "fixedTPM"}, {attrs.FixedParent, "fixedParent"}, {attrs.SensitiveDataOrigin, "sensitiveDataOrigin"}, {attrs.SignEncrypt, "sign"}} {
		if !f.set {
			missing = append(missing, f.name)
		}
	}
	if len(missing) > 0 {
		return nil, refuse(403, "key_attributes", "key public area lacks %v: the key could leave the TPM or was not made by it", missing)
	}
	name, err := tpm2.ObjectName(keyPub)
	if err != nil {
		return nil, refuse(400, "malformed", "key public area: %v", err)
	}
	a.keyName = name.Buffer

	csr, err := x509.ParseCertificateRequest(req.CSR)
	if err != nil {
		return nil, refuse(400, "malformed", "CSR does not parse: %v", err)
	}
	if err := csr.CheckSignature(); err != nil {
		return nil, refuse(400, "csr_signature", "CSR signature does not verify: %v", err)
	}
	if !publicAreaMatches(*keyPub, csr.PublicKey) {
		return nil, refuse(403, "csr_key_mismatch", "CSR public key is not the certified key's public area")
	}
	a.csr = csr
	return a, nil
}

// publicAreaMatches reports whether a TPM public area holds key.
func publicAreaMatches(p tpm2.TPMTPublic, key crypto.PublicKey) bool {
	k, err := tpm2.Pub(p)
	if err != nil {
		return false
	}
	switch want := key.(type) {
	case *rsa.PublicKey:
		return want.Equal(k)
	case *ecdsa.PublicKey:
		return want.Equal(k)
	}
	return false
}

// checkCSRKey accepts the key types devices may use.
func checkCSRKey(pub crypto.PublicKey) error {
	switch k := pub.(type) {
	case *ecdsa.PublicKey:
		if k.Curve.Params().BitSize < 256 {
			return fmt.Errorf("ECDSA key on %s is too weak", k.Curve.Params().Name)
		}
	case *rsa.PublicKey:
		if k.N.BitLen() < 2048 {
			return fmt.Errorf("RSA key of %d bits is too weak", k.N.BitLen())
		}
	default:
		return fmt.Errorf("key type %T not accepted", pub)
	}
	return nil
}
