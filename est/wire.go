// Package est holds the wire formats of Enrollment over Secure Transport
// (RFC 7030) shared by the agent's client and the station's server: media
// types, base64 bodies, certs-only CMS, and the /tpmenroll extension
// (TPM credential activation) in the multipart layout of GlobalSign's EST
// implementation, so either side interoperates with it.
//
// The package has no network code and no server code: the agent links it.
package est

import (
	"bytes"
	"crypto/sha256"
	"crypto/x509"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"mime"
	"mime/multipart"
	"net/textproto"
	"strings"
)

// Paths under the EST well-known prefix (RFC 7030 §3.2.2).
const (
	PathPrefix     = "/.well-known/est/"
	PathCACerts    = PathPrefix + "cacerts"
	PathCSRAttrs   = PathPrefix + "csrattrs"
	PathEnroll     = PathPrefix + "simpleenroll"
	PathReenroll   = PathPrefix + "simplereenroll"
	PathTPMEnroll  = PathPrefix + "tpmenroll"
	tpmBoundary    = "estTPMEnrollBoundary"
	base64LineSize = 76
)

// Media types and header names.
const (
	MediaPKCS10      = "application/pkcs10"
	MediaPKCS7       = "application/pkcs7-mime"
	MediaCertsOnly   = "application/pkcs7-mime; smime-type=certs-only"
	MediaEnveloped   = "application/pkcs7-mime; smime-type=enveloped-data"
	MediaOctetStream = "application/octet-stream"
	MediaCSRAttrs    = "application/csrattrs"
	MediaMultipart   = "multipart/mixed"
	HeaderCTE        = "Content-Transfer-Encoding"
)

// MaxBody is the largest request or response body either side accepts.
const MaxBody = 64 << 10

// Errors returned when decoding, matched with errors.Is.
var (
	// ErrBase64: a body that is not valid base64.
	ErrBase64 = errors.New("invalid base64")
	// ErrMediaType: a body or multipart part of the wrong media type or
	// transfer encoding.
	ErrMediaType = errors.New("unsupported media type")
	// ErrMalformed: a body whose structure is wrong (missing or extra parts,
	// bad CMS).
	ErrMalformed = errors.New("malformed EST message")
)

// EncodeBase64 encodes b as base64 in lines of 76 characters ended by CRLF,
// as RFC 7030 bodies are (RFC 2045 §6.8).
func EncodeBase64(b []byte) []byte {
	enc := base64.StdEncoding.EncodeToString(b)
	var out bytes.Buffer
	out.Grow(len(enc) + 2*(len(enc)/base64LineSize+1))
	for len(enc) > base64LineSize {
		out.WriteString(enc[:base64LineSize])
		out.WriteString("\r\n")
		enc = enc[base64LineSize:]
	}
	out.WriteString(enc)
	out.WriteString("\r\n")
	return out.Bytes()
}

// DecodeBase64 decodes a base64 body, wrapped at any width or not at all.
func DecodeBase64(b []byte) ([]byte, error) {
	clean := make([]byte, 0, len(b))
	for _, c := range b {
		switch c {
		case ' ', '\t', '\r', '\n':
		default:
			clean = append(clean, c)
		}
	}
	if len(clean) == 0 {
		return nil, fmt.Errorf("%w: empty body", ErrBase64)
	}
	out := make([]byte, base64.StdEncoding.DecodedLen(len(clean)))
	n, err := base64.StdEncoding.Decode(out, clean)
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrBase64, err)
	}
	return out[:n], nil
}

// EKHash returns the SHA-256 (hex) of an EK certificate's
// SubjectPublicKeyInfo: how station manifests and registries name an EK,
// and what iotagent tpm info prints for building a manifest. It is stable
// across re-issued EK certificates for the same key.
func EKHash(ekCert *x509.Certificate) string {
	s := sha256.Sum256(ekCert.RawSubjectPublicKeyInfo)
	return hex.EncodeToString(s[:])
}

// EKDeviceID is the device ID a station gives a device it admits by its EK
// alone (no manifest entry): "dev-" and the first 16 hex digits of
// ekHash, an EKHash. It is also the subject of the device's first CSR,
// before it has any other name.
func EKDeviceID(ekHash string) string { return "dev-" + ekHash[:min(16, len(ekHash))] }

// MediaTypeIs reports whether the Content-Type header value ct has the
// media type of want (parameters are ignored, case-insensitive).
func MediaTypeIs(ct, want string) bool {
	mt, _, err := mime.ParseMediaType(ct)
	if err != nil {
		return false
	}
	wt, _, _ := mime.ParseMediaType(want)
	return strings.EqualFold(mt, wt)
}

// TPMEnrollRequest is the body of POST /tpmenroll.
type TPMEnrollRequest struct {
	// CSR is the PKCS#10 request (DER), signed by the key to certify.
	CSR []byte
	// EKChain holds the EK certificate first, then any intermediates (DER).
	EKChain [][]byte
	// EKPublic and KeyPublic are marshalled TPMT_PUBLIC structures (no
	// TPM2B size prefix): the endorsement key and the key to certify.
	EKPublic  []byte
	KeyPublic []byte
}

// TPMEnrollResponse is the body of a successful /tpmenroll answer.
type TPMEnrollResponse struct {
	// CredentialBlob is the TPM2B_ID_OBJECT's contents and EncryptedSeed
	// the TPM2B_ENCRYPTED_SECRET's contents, both without size prefix.
	CredentialBlob []byte
	EncryptedSeed  []byte
	// EncryptedCert is a CMS EncryptedData of the certificate (DER) under
	// the activated credential.
	EncryptedCert []byte
}

type part struct {
	mediaType string
	data      []byte
}

func encodeMultipart(parts []part) ([]byte, string, error) {
	var buf bytes.Buffer
	w := multipart.NewWriter(&buf)
	if err := w.SetBoundary(tpmBoundary); err != nil {
		return nil, "", err
	}
	for _, p := range parts {
		h := textproto.MIMEHeader{}
		h.Set("Content-Type", p.mediaType)
		h.Set(HeaderCTE, "base64")
		pw, err := w.CreatePart(h)
		if err != nil {
			return nil, "", err
		}
		if _, err := pw.Write(EncodeBase64(p.data)); err != nil {
			return nil, "", err
		}
	}
	if err := w.Close(); err != nil {
		return nil, "", err
	}
	return buf.Bytes(), MediaMultipart + "; boundary=" + tpmBoundary, nil
}

// expected describes one part a decoder wants: its media type and a name
// for error messages.
type expected struct {
	mediaType string
	name      string
}

// decodeMultipart reads exactly len(want) base64 parts of the given media
// types from a multipart/mixed body.
func decodeMultipart(contentType string, body io.Reader, want []expected) ([][]byte, error) {
	mt, params, err := mime.ParseMediaType(contentType)
	if err != nil || !strings.EqualFold(mt, MediaMultipart) {
		return nil, fmt.Errorf("%w: Content-Type %q, want %s", ErrMediaType, contentType, MediaMultipart)
	}
	if params["boundary"] == "" {
		return nil, fmt.Errorf("%w: multipart body without boundary", ErrMalformed)
	}
	mr := multipart.NewReader(body, params["boundary"])
	out := make([][]byte, 0, len(want))
	for i, w := range want {
		p, err := mr.NextPart()
		if errors.Is(err, io.EOF) {
			return nil, fmt.Errorf("%w: %d parts, want %d", ErrMalformed, i, len(want))
		}
		if err != nil {
			return nil, fmt.Errorf("%w: part %d: %w", ErrMalformed, i+1, err)
		}
		if !MediaTypeIs(p.Header.Get("Content-Type"), w.mediaType) {
			return nil, fmt.Errorf("%w: part %d (%s) has Content-Type %q", ErrMediaType, i+1, w.name, p.Header.Get("Content-Type"))
		}
		if cte := p.Header.Get(HeaderCTE); !strings.EqualFold(cte, "base64") {
			return nil, fmt.Errorf("%w: part %d (%s) has %s %q, want base64", ErrMediaType, i+1, w.name, HeaderCTE, cte)
		}
		raw, err := io.ReadAll(p)
		if err != nil {
			return nil, fmt.Errorf("%w: part %d (%s): %w", ErrMalformed, i+1, w.name, err)
		}
		dec, err := DecodeBase64(raw)
		if err != nil {
			return nil, fmt.Errorf("part %d (%s): %w", i+1, w.name, err)
		}
		out = append(out, dec)
	}
	if _, err := mr.NextPart(); !errors.Is(err, io.EOF) {
		return nil, fmt.Errorf("%w: more than %d parts", ErrMalformed, len(want))
	}
	return out, nil
}

// Encode returns the multipart body and its Content-Type.
func (r *TPMEnrollRequest) Encode() ([]byte, string, error) {
	return encodeMultipart([]part{
		{MediaPKCS10, r.CSR},
		{MediaCertsOnly, MarshalCertsOnly(r.EKChain)},
		{MediaOctetStream, r.EKPublic},
		{MediaOctetStream, r.KeyPublic},
	})
}

// DecodeTPMEnrollRequest reads a /tpmenroll request body.
func DecodeTPMEnrollRequest(contentType string, body io.Reader) (*TPMEnrollRequest, error) {
	parts, err := decodeMultipart(contentType, body, []expected{
		{MediaPKCS10, "CSR"},
		{MediaPKCS7, "EK certificate chain"},
		{MediaOctetStream, "EK public area"},
		{MediaOctetStream, "key public area"},
	})
	if err != nil {
		return nil, err
	}
	chain, err := ParseCertsOnly(parts[1])
	if err != nil {
		return nil, fmt.Errorf("%w: part 2 (EK certificate chain): %w", ErrMalformed, err)
	}
	return &TPMEnrollRequest{CSR: parts[0], EKChain: chain, EKPublic: parts[2], KeyPublic: parts[3]}, nil
}

// Encode returns the multipart body and its Content-Type.
func (r *TPMEnrollResponse) Encode() ([]byte, string, error) {
	return encodeMultipart([]part{
		{MediaOctetStream, r.CredentialBlob},
		{MediaOctetStream, r.EncryptedSeed},
		{MediaEnveloped, r.EncryptedCert},
	})
}

// DecodeTPMEnrollResponse reads a /tpmenroll response body.
func DecodeTPMEnrollResponse(contentType string, body io.Reader) (*TPMEnrollResponse, error) {
	parts, err := decodeMultipart(contentType, body, []expected{
		{MediaOctetStream, "credential blob"},
		{MediaOctetStream, "encrypted seed"},
		{MediaPKCS7, "encrypted certificate"},
	})
	if err != nil {
		return nil, err
	}
	return &TPMEnrollResponse{CredentialBlob: parts[0], EncryptedSeed: parts[1], EncryptedCert: parts[2]}, nil
}
