package est

import (
	"bytes"
	"crypto/aes"
	"crypto/cipher"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"math/big"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/smallstep/pkcs7"
)

func testCert(t *testing.T, cn string) *x509.Certificate {
	t.Helper()
	k, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(42), Subject: pkix.Name{CommonName: cn},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &k.PublicKey, k)
	if err != nil {
		t.Fatal(err)
	}
	c, _ := x509.ParseCertificate(der)
	return c
}

func TestBase64(t *testing.T) {
	data := bytes.Repeat([]byte{0xde, 0xad, 0xbe, 0xef}, 100)
	enc := EncodeBase64(data)
	lines := strings.Split(strings.TrimSuffix(string(enc), "\r\n"), "\r\n")
	for i, l := range lines {
		if len(l) > 76 || (i < len(lines)-1 && len(l) != 76) {
			t.Errorf("line %d has %d characters, want 76 (last ≤ 76)", i, len(l))
		}
	}
	unwrapped := strings.ReplaceAll(string(enc), "\r\n", "")
	for _, tc := range []struct {
		name string
		in   string
	}{
		{"CRLF wrapped", string(enc)},
		{"unwrapped", unwrapped},
		{"LF wrapped at 64", wrap(unwrapped, 64, "\n")},
		{"trailing spaces", unwrapped + "  \n"},
	} {
		got, err := DecodeBase64([]byte(tc.in))
		if err != nil || !bytes.Equal(got, data) {
			t.Errorf("DecodeBase64(%s) = %v, want the original", tc.name, err)
		}
	}
	for _, bad := range []string{"", "not*base64!", "abc"} {
		if _, err := DecodeBase64([]byte(bad)); !errors.Is(err, ErrBase64) {
			t.Errorf("DecodeBase64(%q) = %v, want ErrBase64", bad, err)
		}
	}
}

func wrap(s string, n int, sep string) string {
	var b strings.Builder
	for len(s) > n {
		b.WriteString(s[:n] + sep)
		s = s[n:]
	}
	b.WriteString(s)
	return b.String()
}

func TestCertsOnlyInterop(t *testing.T) {
	c1, c2 := testCert(t, "issuing"), testCert(t, "root")
	ours := MarshalCertsOnly([][]byte{c1.Raw, c2.Raw})

	// smallstep/pkcs7, a maintained fork of go.mozilla.org/pkcs7, reads
	// ours. GlobalSign's client links go.mozilla.org/pkcs7 itself, which
	// TestEncryptedDataInteropGlobalSignClient runs.
	p7, err := pkcs7.Parse(ours)
	if err != nil {
		t.Fatalf("pkcs7.Parse(ours) = %v", err)
	}
	if len(p7.Certificates) != 2 || !p7.Certificates[0].Equal(c1) || !p7.Certificates[1].Equal(c2) {
		t.Errorf("pkcs7.Parse(ours) = %d certificates, want c1, c2 in order", len(p7.Certificates))
	}

	// And we read theirs.
	theirs, err := pkcs7.DegenerateCertificate(append(append([]byte{}, c1.Raw...), c2.Raw...))
	if err != nil {
		t.Fatal(err)
	}
	got, err := ParseCertsOnly(theirs)
	if err != nil || len(got) != 2 || !bytes.Equal(got[0], c1.Raw) || !bytes.Equal(got[1], c2.Raw) {
		t.Fatalf("ParseCertsOnly(theirs) = %d certs, %v", len(got), err)
	}

	// OpenSSL reads ours.
	f := filepath.Join(t.TempDir(), "certs.p7")
	os.WriteFile(f, ours, 0o600)
	out, err := exec.Command("openssl", "pkcs7", "-inform", "DER", "-in", f, "-print_certs", "-noout").CombinedOutput()
	if err != nil {
		t.Fatalf("openssl pkcs7: %v\n%s", err, out)
	}
	if !strings.Contains(string(out), "CN = issuing") || !strings.Contains(string(out), "CN = root") {
		t.Errorf("openssl pkcs7 -print_certs = %s", out)
	}

	for _, bad := range [][]byte{nil, {0x30, 0x00}, MarshalCertsOnly(nil), c1.Raw} {
		if _, err := ParseCertsOnly(bad); err == nil {
			t.Errorf("ParseCertsOnly(%x…) succeeded", bad[:min(len(bad), 8)])
		}
	}
}

func TestEncryptedDataInterop(t *testing.T) {
	key := make([]byte, 16)
	rand.Read(key)
	plain := []byte("certificate DER goes here")

	ours, err := SealEncryptedData(rand.Reader, key, plain)
	if err != nil {
		t.Fatal(err)
	}
	// smallstep/pkcs7 reads encryptedContent in either form, so this
	// proves nothing about GlobalSign's client (see
	// TestEncryptedDataInteropGlobalSignClient).
	p7, err := pkcs7.Parse(ours)
	if err != nil {
		t.Fatalf("pkcs7.Parse(ours) = %v", err)
	}
	got, err := p7.DecryptUsingPSK(key)
	if err != nil || !bytes.Equal(got, plain) {
		t.Fatalf("pkcs7 DecryptUsingPSK(ours) = %q, %v", got, err)
	}

	// The library picks its cipher from a package variable; tests are the
	// only place this project sets it.
	pkcs7.ContentEncryptionAlgorithm = pkcs7.EncryptionAlgorithmAES128GCM
	theirs, err := pkcs7.EncryptUsingPSK(plain, key)
	if err != nil {
		t.Fatal(err)
	}
	if got, err := OpenEncryptedData(key, theirs); err != nil || !bytes.Equal(got, plain) {
		t.Fatalf("OpenEncryptedData(theirs) = %q, %v", got, err)
	}

	// RFC 5084 form: GCMParameters as a plain SEQUENCE with an OCTET STRING
	// nonce and the default ICV length, and the DER (primitive [0])
	// encryptedContent, which this package sent before it sent the
	// constructed form.
	rfc := rfc5084EncryptedData(t, key, plain)
	if got, err := OpenEncryptedData(key, rfc); err != nil || !bytes.Equal(got, plain) {
		t.Fatalf("OpenEncryptedData(RFC 5084 form) = %q, %v", got, err)
	}

	wrong := make([]byte, 16)
	if _, err := OpenEncryptedData(wrong, ours); err == nil || !strings.Contains(err.Error(), "decryption failed") {
		t.Errorf("OpenEncryptedData(wrong key) = %v, want decryption failed", err)
	}
	tampered := bytes.Clone(ours)
	tampered[len(tampered)-1] ^= 1
	if _, err := OpenEncryptedData(key, tampered); err == nil {
		t.Error("OpenEncryptedData(tampered) succeeded")
	}
	if _, err := OpenEncryptedData(key, MarshalCertsOnly(nil)); err == nil {
		t.Error("OpenEncryptedData(SignedData) succeeded")
	}
}

// rfc5084EncryptedData builds an EncryptedData with 12-byte ICV (the
// default, so omitted) by hand, as a standards-following encoder would.
func rfc5084EncryptedData(t *testing.T, key, plain []byte) []byte {
	t.Helper()
	nonce := make([]byte, 12)
	block, _ := aesNew(key)
	gcm, _ := cipherNewGCMWithTagSize(block, 12)
	ct := gcm.Seal(nil, nonce, plain, nil)
	params := tlv(tagSequence, tlv(0x04, nonce))
	eci := tlv(tagSequence, mustOID(oidData), tlv(tagSequence, mustOID(oidAES128GCM), params), tlv(tagImplicit0, ct))
	return tlv(tagSequence, mustOID(oidEncryptedData), tlv(tagContext0, tlv(tagSequence, tlv(tagInteger, []byte{0}), eci)))
}

func TestTPMEnrollRoundTrip(t *testing.T) {
	ek := testCert(t, "ek")
	req := &TPMEnrollRequest{CSR: []byte("csr"), EKChain: [][]byte{ek.Raw}, EKPublic: []byte("ekpub"), KeyPublic: []byte("keypub")}
	body, ct, err := req.Encode()
	if err != nil {
		t.Fatal(err)
	}
	// The layout GlobalSign's server expects: boundary, per-part
	// Content-Type and base64 transfer encoding.
	for _, want := range []string{
		"multipart/mixed; boundary=estTPMEnrollBoundary",
	} {
		if ct != want {
			t.Errorf("Content-Type = %q, want %q", ct, want)
		}
	}
	for _, want := range []string{
		"Content-Transfer-Encoding: base64\r\nContent-Type: application/pkcs10",
		"Content-Type: application/pkcs7-mime; smime-type=certs-only",
		"Content-Type: application/octet-stream",
	} {
		if !bytes.Contains(body, []byte(want)) {
			t.Errorf("request body lacks %q", want)
		}
	}
	got, err := DecodeTPMEnrollRequest(ct, bytes.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	if string(got.CSR) != "csr" || len(got.EKChain) != 1 || !bytes.Equal(got.EKChain[0], ek.Raw) ||
		string(got.EKPublic) != "ekpub" || string(got.KeyPublic) != "keypub" {
		t.Errorf("DecodeTPMEnrollRequest = %+v", got)
	}

	resp := &TPMEnrollResponse{CredentialBlob: []byte("blob"), EncryptedSeed: []byte("seed"), EncryptedCert: []byte("cms")}
	body, ct, err = resp.Encode()
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Contains(body, []byte("Content-Type: application/pkcs7-mime; smime-type=enveloped-data")) {
		t.Error("response lacks the enveloped-data part")
	}
	gotResp, err := DecodeTPMEnrollResponse(ct, bytes.NewReader(body))
	if err != nil || string(gotResp.CredentialBlob) != "blob" || string(gotResp.EncryptedSeed) != "seed" || string(gotResp.EncryptedCert) != "cms" {
		t.Errorf("DecodeTPMEnrollResponse = %+v, %v", gotResp, err)
	}
}

func TestTPMEnrollRequestMalformed(t *testing.T) {
	ek := testCert(t, "ek")
	good := &TPMEnrollRequest{CSR: []byte("csr"), EKChain: [][]byte{ek.Raw}, EKPublic: []byte("e"), KeyPublic: []byte("k")}
	body, ct, _ := good.Encode()
	threeParts, _, _ := encodeMultipart([]part{{MediaPKCS10, []byte("a")}, {MediaCertsOnly, MarshalCertsOnly([][]byte{ek.Raw})}, {MediaOctetStream, []byte("b")}})
	fiveParts, _, _ := encodeMultipart([]part{{MediaPKCS10, []byte("a")}, {MediaCertsOnly, MarshalCertsOnly([][]byte{ek.Raw})}, {MediaOctetStream, []byte("b")}, {MediaOctetStream, []byte("c")}, {MediaOctetStream, []byte("d")}})
	wrongType, _, _ := encodeMultipart([]part{{MediaOctetStream, []byte("a")}, {MediaCertsOnly, nil}, {MediaOctetStream, nil}, {MediaOctetStream, nil}})
	for _, tc := range []struct {
		name string
		ct   string
		body []byte
		want error
		msg  string
	}{
		{"not multipart", "application/pkcs10", body, ErrMediaType, "want multipart/mixed"},
		{"no boundary", "multipart/mixed", body, ErrMalformed, "without boundary"},
		{"three parts", ct, threeParts, ErrMalformed, "3 parts, want 4"},
		{"five parts", ct, fiveParts, ErrMalformed, "more than 4 parts"},
		{"wrong part type", ct, wrongType, ErrMediaType, "part 1 (CSR)"},
		{"garbage base64", ct, bytes.Replace(body, []byte("Y3Ny"), []byte("!!!!"), 1), ErrBase64, "part 1 (CSR)"},
		{"truncated", ct, body[:len(body)/2], ErrMalformed, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := DecodeTPMEnrollRequest(tc.ct, bytes.NewReader(tc.body))
			if !errors.Is(err, tc.want) || !strings.Contains(err.Error(), tc.msg) {
				t.Errorf("DecodeTPMEnrollRequest = %v, want %v containing %q", err, tc.want, tc.msg)
			}
		})
	}
}

func aesNew(key []byte) (cipher.Block, error) { return aes.NewCipher(key) }

func cipherNewGCMWithTagSize(b cipher.Block, n int) (cipher.AEAD, error) {
	return cipher.NewGCMWithTagSize(b, n)
}
