package stationtest

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"io"
	"math/big"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"testing"
	"time"

	"iotagent.dev/iotagent/est"
	"iotagent.dev/iotagent/internal/certpem"
	"iotagent.dev/iotagent/station"
)

// DeviceCert is a device certificate made for a test, with its key.
type DeviceCert struct {
	TLS tls.Certificate
	// ChainPEM is the certificate then the issuing CA; KeyPEM the key
	// (PKCS#8): files for foreign clients such as libcoap's.
	ChainPEM, KeyPEM []byte
}

// Device enrolls device id the way a gateway without a TPM does: a
// one-time token (iotstation token create) and simpleenroll over the
// station's HTTPS endpoint, with a software P-256 key. The certificate
// is a real device certificate, recorded in the registry.
func (s *Station) Device(t testing.TB, id string) DeviceCert {
	t.Helper()
	tok, err := s.CreateToken(id, time.Hour)
	if err != nil {
		t.Fatalf("token for %s: %v", id, err)
	}
	return EnrollByToken(t, s.URL, s.Root(), tok.Device, tok.Secret)
}

// EnrollByToken enrolls device id at the station serving url (whose root
// is root) with a one-time token secret and a software P-256 key.
func EnrollByToken(t testing.TB, url string, root *x509.Certificate, id, secret string) DeviceCert {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	csr, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{Subject: pkix.Name{CommonName: id}}, key)
	if err != nil {
		t.Fatal(err)
	}
	req, _ := http.NewRequest(http.MethodPost, url+est.PathEnroll, bytes.NewReader(est.EncodeBase64(csr)))
	req.Header.Set("Content-Type", est.MediaPKCS10)
	req.SetBasicAuth(id, secret)
	pool := x509.NewCertPool()
	pool.AddCert(root)
	c := &http.Client{Timeout: 30 * time.Second, Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}}}
	defer c.CloseIdleConnections()
	resp, err := c.Do(req)
	if err != nil {
		t.Fatalf("simpleenroll %s: %v", id, err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("simpleenroll %s = %d %s", id, resp.StatusCode, body)
	}
	der, err := est.DecodeBase64(body)
	if err != nil {
		t.Fatal(err)
	}
	raw, err := est.ParseCertsOnly(der)
	if err != nil || len(raw) != 1 {
		t.Fatalf("simpleenroll %s: %v (%d certificates)", id, err, len(raw))
	}
	cert, err := x509.ParseCertificate(raw[0])
	if err != nil {
		t.Fatal(err)
	}
	// The chain a client presents: the certificate, then its issuer from
	// /cacerts.
	cresp, err := c.Get(url + est.PathCACerts)
	if err != nil {
		t.Fatalf("cacerts: %v", err)
	}
	defer cresp.Body.Close()
	cbody, _ := io.ReadAll(cresp.Body)
	cder, err := est.DecodeBase64(cbody)
	if err != nil {
		t.Fatal(err)
	}
	craw, err := est.ParseCertsOnly(cder)
	if err != nil {
		t.Fatal(err)
	}
	for _, r := range craw {
		if ca, err := x509.ParseCertificate(r); err == nil && cert.CheckSignatureFrom(ca) == nil {
			return deviceCert(t, cert, ca, key)
		}
	}
	t.Fatalf("simpleenroll %s: no issuer of the certificate in /cacerts", id)
	return DeviceCert{}
}

// SignDevice signs a device-shaped certificate for id valid from
// notBefore to notAfter with the issuing CA's key file, as a CA key leak
// would: the registry never hears of it. For tests of what a checker
// does with certificates the station would not issue (expired ones,
// names that are not device IDs, unknown serials).
func (s *Station) SignDevice(t testing.TB, id string, notBefore, notAfter time.Time) DeviceCert {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(s.Dir, "ca.key"))
	if err != nil {
		t.Fatal(err)
	}
	blk, _ := pem.Decode(b)
	if blk == nil {
		t.Fatal("ca.key: no PEM")
	}
	caKey, err := x509.ParsePKCS8PrivateKey(blk.Bytes)
	if err != nil {
		t.Fatal(err)
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	serial, _ := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 120))
	issuer := s.CACerts()[0]
	der, err := x509.CreateCertificate(rand.Reader, &x509.Certificate{
		SerialNumber: serial, Subject: pkix.Name{CommonName: id}, URIs: []*url.URL{station.DeviceURI(id)},
		NotBefore: notBefore, NotAfter: notAfter,
		KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
	}, issuer, &key.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	return deviceCert(t, cert, issuer, key)
}

func deviceCert(t testing.TB, cert, issuer *x509.Certificate, key *ecdsa.PrivateKey) DeviceCert {
	t.Helper()
	kder, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	return DeviceCert{
		TLS:      tls.Certificate{Certificate: [][]byte{cert.Raw, issuer.Raw}, PrivateKey: key, Leaf: cert},
		ChainPEM: certpem.Encode(cert, issuer),
		KeyPEM:   pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: kder}),
	}
}
