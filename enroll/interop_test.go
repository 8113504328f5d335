package enroll_test

import (
	"context"
	"crypto"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"testing"
	"time"

	mozpkcs7 "go.mozilla.org/pkcs7"

	"iotagent.dev/iotagent/enroll"
	"iotagent.dev/iotagent/est"
	"iotagent.dev/iotagent/station/stationtest"
	"iotagent.dev/iotagent/tpm/tpmtest"
)

// TestTPMEnrollInteropGlobalSignClient takes the last step of GlobalSign's
// estclient tpmenroll (github.com/globalsign/est, cmd/estclient/tpm.go)
// on a real answer of our station: activate the credential in the TPM,
// then go.mozilla.org/pkcs7, at the version that client pins, parses the
// envelope and decrypts it with the credential as pre-shared key. Their
// module is not on the proxy, so the library call stands in for it.
func TestTPMEnrollInteropGlobalSignClient(t *testing.T) {
	st := stationtest.Start(t, stationtest.Options{AutoApprove: true})
	tp := tpmtest.New(t).Open(t)
	key := tpmtest.NewKey(t, tp)
	eks, err := tp.EndorsementKeys()
	if err != nil {
		t.Fatal(err)
	}
	ek := &eks[0] // RSA, the only EK GlobalSign's server supports
	csr, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{Subject: pkix.Name{CommonName: "interop"}}, key)
	if err != nil {
		t.Fatal(err)
	}
	pin, _ := enroll.ParsePin(st.Fingerprint)
	c, err := enroll.NewClient(enroll.ClientConfig{URL: st.URL, Pin: pin})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	resp, err := c.TPMEnroll(ctx, &est.TPMEnrollRequest{
		CSR: csr, EKChain: [][]byte{ek.Certificate.Raw}, EKPublic: ek.MarshalPublicArea(), KeyPublic: key.MarshalPublicArea(),
	})
	if err != nil {
		t.Fatal(err)
	}
	psk, err := tp.ActivateCredential(key, ek, resp.CredentialBlob, resp.EncryptedSeed)
	if err != nil {
		t.Fatal(err)
	}

	p7, err := mozpkcs7.Parse(resp.EncryptedCert)
	if err != nil {
		t.Fatalf("failed to parse PKCS7 CMS EnvelopedData: %v", err)
	}
	der, err := p7.DecryptUsingPSK(psk)
	if err != nil {
		t.Fatalf("failed to decrypt PKCS7 CMS EnvelopedData: %v", err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatalf("failed to parse certificate: %v", err)
	}
	if !cert.PublicKey.(interface{ Equal(crypto.PublicKey) bool }).Equal(key.Public()) {
		t.Error("the decrypted certificate is not for the key in the TPM")
	}
}
