package est

import (
	"crypto/aes"
	"crypto/cipher"
	"crypto/x509"
	"encoding/asn1"
	"errors"
	"fmt"
	"io"
)

// Object identifiers of the CMS (RFC 5652) structures EST uses.
var (
	oidData          = asn1.ObjectIdentifier{1, 2, 840, 113549, 1, 7, 1}
	oidSignedData    = asn1.ObjectIdentifier{1, 2, 840, 113549, 1, 7, 2}
	oidEncryptedData = asn1.ObjectIdentifier{1, 2, 840, 113549, 1, 7, 6}
	oidAES128GCM     = asn1.ObjectIdentifier{2, 16, 840, 1, 101, 3, 4, 1, 6}
	oidAES256GCM     = asn1.ObjectIdentifier{2, 16, 840, 1, 101, 3, 4, 1, 46}
)

// DER tags used below.
const (
	tagInteger     = 0x02
	tagOctetString = 0x04
	tagSequence    = 0x30
	tagSet         = 0x31
	tagContext0    = 0xa0 // [0] constructed
	tagImplicit0   = 0x80 // [0] primitive
)

// tlv encodes one DER element.
func tlv(tag byte, contents ...[]byte) []byte {
	n := 0
	for _, c := range contents {
		n += len(c)
	}
	out := []byte{tag}
	switch {
	case n < 0x80:
		out = append(out, byte(n))
	case n < 0x100:
		out = append(out, 0x81, byte(n))
	case n < 0x10000:
		out = append(out, 0x82, byte(n>>8), byte(n))
	default:
		out = append(out, 0x83, byte(n>>16), byte(n>>8), byte(n))
	}
	for _, c := range contents {
		out = append(out, c...)
	}
	return out
}

func mustOID(oid asn1.ObjectIdentifier) []byte {
	b, err := asn1.Marshal(oid)
	if err != nil {
		panic(err) // constant OIDs always marshal
	}
	return b
}

// MarshalCertsOnly encodes DER certificates as a CMS "certs-only"
// SignedData (RFC 7030 §4.1.3): no content, no signers.
func MarshalCertsOnly(certs [][]byte) []byte {
	sd := tlv(tagSequence,
		tlv(tagInteger, []byte{1}),
		tlv(tagSet),
		tlv(tagSequence, mustOID(oidData)),
		tlv(tagContext0, certs...),
		tlv(tagSet),
	)
	return tlv(tagSequence, mustOID(oidSignedData), tlv(tagContext0, sd))
}

// elements splits the contents of a constructed DER element into its
// children.
func elements(b []byte) ([]asn1.RawValue, error) {
	var out []asn1.RawValue
	for len(b) > 0 {
		var rv asn1.RawValue
		rest, err := asn1.Unmarshal(b, &rv)
		if err != nil {
			return nil, err
		}
		out = append(out, rv)
		b = rest
	}
	return out, nil
}

// contentInfo parses a CMS ContentInfo and returns its type and the DER of
// its content.
func contentInfo(der []byte) (asn1.ObjectIdentifier, []byte, error) {
	var ci struct {
		ContentType asn1.ObjectIdentifier
		Content     asn1.RawValue `asn1:"explicit,tag:0"`
	}
	rest, err := asn1.Unmarshal(der, &ci)
	if err != nil {
		return nil, nil, fmt.Errorf("CMS ContentInfo: %w", err)
	}
	if len(rest) > 0 {
		return nil, nil, errors.New("CMS ContentInfo: trailing data")
	}
	// Go hands back the [0] wrapper itself; its contents are the inner DER.
	c := ci.Content
	if c.Class == asn1.ClassContextSpecific && c.Tag == 0 && c.IsCompound {
		return ci.ContentType, c.Bytes, nil
	}
	return ci.ContentType, c.FullBytes, nil
}

// ParseCertsOnly decodes a CMS certs-only SignedData and returns the DER of
// each certificate in order. Certificates are not parsed: EK certificates
// from some vendors need special handling.
func ParseCertsOnly(der []byte) ([][]byte, error) {
	oid, content, err := contentInfo(der)
	if err != nil {
		return nil, err
	}
	if !oid.Equal(oidSignedData) {
		return nil, fmt.Errorf("CMS content type %v, want signedData", oid)
	}
	var sd asn1.RawValue
	if _, err := asn1.Unmarshal(content, &sd); err != nil || sd.Tag != asn1.TagSequence {
		return nil, errors.New("CMS SignedData: not a SEQUENCE")
	}
	fields, err := elements(sd.Bytes)
	if err != nil {
		return nil, fmt.Errorf("CMS SignedData: %w", err)
	}
	var certs [][]byte
	for _, f := range fields {
		if f.Class != asn1.ClassContextSpecific || f.Tag != 0 {
			continue
		}
		cs, err := elements(f.Bytes)
		if err != nil {
			return nil, fmt.Errorf("CMS SignedData certificates: %w", err)
		}
		for _, c := range cs {
			certs = append(certs, c.FullBytes)
		}
	}
	if len(certs) == 0 {
		return nil, errors.New("CMS SignedData holds no certificates")
	}
	return certs, nil
}

// ParseCertificates parses DER certificates.
func ParseCertificates(ders [][]byte) ([]*x509.Certificate, error) {
	out := make([]*x509.Certificate, 0, len(ders))
	for i, d := range ders {
		c, err := x509.ParseCertificate(d)
		if err != nil {
			return nil, fmt.Errorf("certificate %d: %w", i+1, err)
		}
		out = append(out, c)
	}
	return out, nil
}

// RawCertificates returns the DER of each certificate.
func RawCertificates(certs []*x509.Certificate) [][]byte {
	out := make([][]byte, len(certs))
	for i, c := range certs {
		out[i] = c.Raw
	}
	return out
}

// gcmNonceSize is the nonce length RFC 5084 recommends and GCM is fastest
// with.
const gcmNonceSize = 12

// SealEncryptedData encrypts plaintext with key (16 bytes: AES-128-GCM; 32:
// AES-256-GCM) into a CMS EncryptedData, the "enveloped" certificate of a
// /tpmenroll response.
//
// The encoding is the one GlobalSign's EST implementation produces and
// parses (through go.mozilla.org/pkcs7 and its forks), which differs from
// RFC 5084: the GCMParameters SEQUENCE is wrapped once more in a primitive
// [UNIVERSAL 16] element, and the nonce is tagged [4] instead of OCTET
// STRING. Clients using that library decode nothing else; OpenEncryptedData
// accepts both this and the RFC 5084 form.
//
// encryptedContent is sent constructed, [0] { OCTET STRING }, valid BER
// where DER would make it a primitive [0]: the go.mozilla.org/pkcs7 that
// GlobalSign's client links declares the field EXPLICIT, reads a primitive
// [0] as absent, and fails with "cipher: message authentication failed".
// OpenEncryptedData reads both forms.
func SealEncryptedData(rand io.Reader, key, plaintext []byte) ([]byte, error) {
	var alg asn1.ObjectIdentifier
	switch len(key) {
	case 16:
		alg = oidAES128GCM
	case 32:
		alg = oidAES256GCM
	default:
		return nil, fmt.Errorf("EncryptedData: key of %d bytes, want 16 or 32", len(key))
	}
	block, err := aes.NewCipher(key)
	if err != nil {
		return nil, err
	}
	gcm, err := cipher.NewGCM(block)
	if err != nil {
		return nil, err
	}
	nonce := make([]byte, gcmNonceSize)
	if _, err := io.ReadFull(rand, nonce); err != nil {
		return nil, fmt.Errorf("EncryptedData: nonce: %w", err)
	}
	ct := gcm.Seal(nil, nonce, plaintext, nil)
	params := tlv(tagSequence, tlv(0x84, nonce), tlv(tagInteger, []byte{byte(gcm.Overhead())}))
	eci := tlv(tagSequence,
		mustOID(oidData),
		tlv(tagSequence, mustOID(alg), tlv(0x10, params)),
		tlv(tagContext0, tlv(tagOctetString, ct)),
	)
	ed := tlv(tagSequence, tlv(tagInteger, []byte{0}), eci)
	return tlv(tagSequence, mustOID(oidEncryptedData), tlv(tagContext0, ed)), nil
}

// OpenEncryptedData decrypts a CMS EncryptedData made with AES-GCM under
// key. A wrong key or altered data fails authentication.
func OpenEncryptedData(key, der []byte) ([]byte, error) {
	oid, content, err := contentInfo(der)
	if err != nil {
		return nil, err
	}
	if !oid.Equal(oidEncryptedData) {
		return nil, fmt.Errorf("CMS content type %v, want encryptedData", oid)
	}
	var ed struct {
		Version int
		ECI     struct {
			ContentType asn1.ObjectIdentifier
			Algorithm   struct {
				Algorithm  asn1.ObjectIdentifier
				Parameters asn1.RawValue
			}
			Content asn1.RawValue `asn1:"tag:0"`
		}
	}
	if _, err := asn1.Unmarshal(content, &ed); err != nil {
		return nil, fmt.Errorf("CMS EncryptedData: %w", err)
	}
	alg := ed.ECI.Algorithm.Algorithm
	want := 0
	switch {
	case alg.Equal(oidAES128GCM):
		want = 16
	case alg.Equal(oidAES256GCM):
		want = 32
	default:
		return nil, fmt.Errorf("CMS EncryptedData: cipher %v not supported (want AES-GCM)", alg)
	}
	if len(key) != want {
		return nil, fmt.Errorf("CMS EncryptedData: key of %d bytes for a %d-byte cipher", len(key), want)
	}
	nonce, icvLen, err := gcmParameters(ed.ECI.Algorithm.Parameters)
	if err != nil {
		return nil, err
	}
	block, err := aes.NewCipher(key)
	if err != nil {
		return nil, err
	}
	var gcm cipher.AEAD
	switch {
	case len(nonce) == gcmNonceSize && icvLen >= 12 && icvLen <= 16:
		gcm, err = cipher.NewGCMWithTagSize(block, icvLen)
	case icvLen == 16:
		gcm, err = cipher.NewGCMWithNonceSize(block, len(nonce))
	default:
		err = fmt.Errorf("CMS EncryptedData: %d-byte nonce with %d-byte ICV not supported", len(nonce), icvLen)
	}
	if err != nil {
		return nil, err
	}
	// The content may be primitive ([0] IMPLICIT OCTET STRING) or, from BER
	// encoders, constructed of OCTET STRING chunks.
	ct := ed.ECI.Content.Bytes
	if ed.ECI.Content.IsCompound {
		chunks, err := elements(ct)
		if err != nil {
			return nil, fmt.Errorf("CMS EncryptedData content: %w", err)
		}
		ct = nil
		for _, c := range chunks {
			ct = append(ct, c.Bytes...)
		}
	}
	pt, err := gcm.Open(nil, nonce, ct, nil)
	if err != nil {
		return nil, errors.New("CMS EncryptedData: decryption failed (wrong key or altered data)")
	}
	return pt, nil
}

// gcmParameters reads GCMParameters in the RFC 5084 form or the
// go.mozilla.org/pkcs7 form (see SealEncryptedData).
func gcmParameters(p asn1.RawValue) (nonce []byte, icvLen int, err error) {
	body := p.Bytes
	if p.Class == asn1.ClassUniversal && p.Tag == asn1.TagSequence && !p.IsCompound {
		// pkcs7 form: the primitive wrapper holds a whole SEQUENCE.
		var inner asn1.RawValue
		if _, err := asn1.Unmarshal(body, &inner); err != nil {
			return nil, 0, fmt.Errorf("CMS GCM parameters: %w", err)
		}
		body = inner.Bytes
	} else if p.Tag != asn1.TagSequence {
		return nil, 0, errors.New("CMS GCM parameters: not a SEQUENCE")
	}
	fields, err := elements(body)
	if err != nil || len(fields) == 0 {
		return nil, 0, errors.New("CMS GCM parameters: malformed")
	}
	if f := fields[0]; f.IsCompound || f.Tag != asn1.TagOctetString {
		return nil, 0, errors.New("CMS GCM parameters: nonce is not an octet string")
	}
	nonce = fields[0].Bytes
	icvLen = 12 // RFC 5084 DEFAULT
	if len(fields) > 1 {
		if _, err := asn1.Unmarshal(fields[1].FullBytes, &icvLen); err != nil {
			return nil, 0, fmt.Errorf("CMS GCM parameters: ICV length: %w", err)
		}
	}
	if len(nonce) == 0 || len(nonce) > 64 {
		return nil, 0, fmt.Errorf("CMS GCM parameters: nonce of %d bytes", len(nonce))
	}
	return nonce, icvLen, nil
}
