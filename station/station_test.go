package station_test

import (
	"bytes"
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"encoding/pem"
	"errors"
	"io"
	"math/big"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/google/go-tpm/tpm2"

	"iotagent.dev/iotagent/est"
	"iotagent.dev/iotagent/internal/testsync"
	"iotagent.dev/iotagent/station"
	"iotagent.dev/iotagent/station/stationtest"
	"iotagent.dev/iotagent/tpm"
	"iotagent.dev/iotagent/tpm/tpmtest"
)

func TestMain(m *testing.M) { os.Exit(tpmtest.Main(m)) }

// tpmDevice is a swtpm with a loaded device key and its EK.
type tpmDevice struct {
	tpm *tpm.TPM
	key *tpm.Key
	ek  tpm.EK
}

func newTPMDevice(t testing.TB, identity int) *tpmDevice {
	t.Helper()
	tp := tpmtest.Start(t, tpmtest.Options{Identity: identity}).Open(t)
	k := tpmtest.NewKey(t, tp)
	eks, err := tp.EndorsementKeys()
	if err != nil {
		t.Fatal(err)
	}
	return &tpmDevice{tpm: tp, key: k, ek: eks[0]}
}

func csrFor(t testing.TB, key crypto.Signer) []byte {
	t.Helper()
	der, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{Subject: pkix.Name{CommonName: "ignored"}}, key)
	if err != nil {
		t.Fatal(err)
	}
	return der
}

func (d *tpmDevice) request(t testing.TB) *est.TPMEnrollRequest {
	t.Helper()
	return &est.TPMEnrollRequest{
		CSR:       csrFor(t, d.key),
		EKChain:   [][]byte{d.ek.Certificate.Raw},
		EKPublic:  d.ek.MarshalPublicArea(),
		KeyPublic: d.key.MarshalPublicArea(),
	}
}

// client talks HTTPS to the station, trusting its root, optionally with a
// client certificate.
func client(t testing.TB, st *stationtest.Station, cert *tls.Certificate) *http.Client {
	t.Helper()
	pool := x509.NewCertPool()
	pool.AddCert(st.Root())
	cfg := &tls.Config{RootCAs: pool, ServerName: "127.0.0.1"}
	if cert != nil {
		cfg.Certificates = []tls.Certificate{*cert}
	}
	c := &http.Client{Timeout: 30 * time.Second, Transport: &http.Transport{TLSClientConfig: cfg}}
	// A connection dialed but never used holds the station's shutdown for
	// 5 seconds (net/http treats it as busy that long).
	t.Cleanup(c.CloseIdleConnections)
	return c
}

type answer struct {
	status int
	header http.Header
	body   []byte
}

func post(t testing.TB, c *http.Client, st *stationtest.Station, path, ct string, body []byte, basic ...string) answer {
	t.Helper()
	req, _ := http.NewRequest(http.MethodPost, st.URL+path, bytes.NewReader(body))
	req.Header.Set("Content-Type", ct)
	if len(basic) == 2 {
		req.SetBasicAuth(basic[0], basic[1])
	}
	resp, err := c.Do(req)
	if err != nil {
		t.Fatalf("POST %s: %v", path, err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return answer{resp.StatusCode, resp.Header, b}
}

func tpmEnroll(t testing.TB, c *http.Client, st *stationtest.Station, req *est.TPMEnrollRequest) answer {
	t.Helper()
	body, ct, err := req.Encode()
	if err != nil {
		t.Fatal(err)
	}
	return post(t, c, st, est.PathTPMEnroll, ct, body)
}

// activate recovers the certificate from a /tpmenroll answer with d's TPM.
func (d *tpmDevice) activate(t testing.TB, a answer) (*x509.Certificate, error) {
	t.Helper()
	resp, err := est.DecodeTPMEnrollResponse(a.header.Get("Content-Type"), bytes.NewReader(a.body))
	if err != nil {
		t.Fatalf("decoding answer: %v (status %d: %s)", err, a.status, a.body)
	}
	secret, err := d.tpm.ActivateCredential(d.key, &d.ek, resp.CredentialBlob, resp.EncryptedSeed)
	if err != nil {
		return nil, err
	}
	der, err := est.OpenEncryptedData(secret, resp.EncryptedCert)
	if err != nil {
		return nil, err
	}
	return x509.ParseCertificate(der)
}

func registryJSON(t testing.TB, st *stationtest.Station) string {
	t.Helper()
	d, err := st.Devices()
	if err != nil {
		t.Fatal(err)
	}
	b, _ := json.Marshal(d)
	return string(b)
}

// auditEntries returns the audit log's entries for event, or all of
// them when event is "". The file is appended while the test reads it: a
// torn last line is left out.
func auditEntries(t testing.TB, st *stationtest.Station, event string) []station.AuditEntry {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(st.Dir, "audit.log"))
	if err != nil {
		t.Fatal(err)
	}
	var out []station.AuditEntry
	for _, l := range strings.Split(strings.TrimSpace(string(b)), "\n") {
		var e station.AuditEntry
		if json.Unmarshal([]byte(l), &e) == nil && (event == "" || e.Event == event) {
			out = append(out, e)
		}
	}
	return out
}

func lastAudit(t testing.TB, st *stationtest.Station) station.AuditEntry {
	t.Helper()
	all := auditEntries(t, st, "")
	if len(all) == 0 {
		t.Fatal("audit log is empty")
	}
	return all[len(all)-1]
}

func TestTPMEnrollIssuesOnlyToTheTPM(t *testing.T) {
	st := stationtest.Start(t, stationtest.Options{AutoApprove: true})
	d := newTPMDevice(t, 0)
	a := tpmEnroll(t, client(t, st, nil), st, d.request(t))
	if a.status != http.StatusOK {
		t.Fatalf("tpmenroll = %d %s", a.status, a.body)
	}
	cert, err := d.activate(t, a)
	if err != nil {
		t.Fatalf("activating: %v", err)
	}
	if !d.key.Public().(*ecdsa.PublicKey).Equal(cert.PublicKey) {
		t.Error("certificate is not for the TPM key")
	}
	ekHash := station.EKHash(d.ek.Certificate.Cert)
	if want := "dev-" + ekHash[:16]; cert.Subject.CommonName != want {
		t.Errorf("CN = %q, want %q (the station decides the subject)", cert.Subject.CommonName, want)
	}
	if e := lastAudit(t, st); e.Result != "accepted" || e.EK != ekHash || e.Serial == "" {
		t.Errorf("audit = %+v", e)
	}
}

// swEK makes an RSA "EK" certificate from a CA the station does not trust,
// with the matching EK public area.
func swEK(t testing.TB) ([]byte, []byte) {
	t.Helper()
	k, _ := rsa.GenerateKey(rand.Reader, 2048)
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(7), Subject: pkix.Name{CommonName: "fake EK"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour)}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &k.PublicKey, k)
	if err != nil {
		t.Fatal(err)
	}
	pub := tpm2.RSAEKTemplate
	pub.Unique = tpm2.NewTPMUPublicID(tpm2.TPMAlgRSA, &tpm2.TPM2BPublicKeyRSA{Buffer: k.N.Bytes()})
	return der, tpm2.Marshal(&pub)
}

func TestTPMEnrollBadInput(t *testing.T) {
	st := stationtest.Start(t, stationtest.Options{AutoApprove: true, Lenient: true})
	strict := stationtest.Start(t, stationtest.Options{Lenient: true})
	d := newTPMDevice(t, 0)
	soft, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)

	noFixedTPM := func() *est.TPMEnrollRequest {
		r := d.request(t)
		pub := d.key.PublicArea()
		pub.ObjectAttributes.FixedTPM = false
		r.KeyPublic = tpm2.Marshal(&pub)
		return r
	}
	for _, tc := range []struct {
		name   string
		st     *stationtest.Station
		req    func() *est.TPMEnrollRequest
		status int
		reason string
	}{
		{"EK chain to an untrusted root", st, func() *est.TPMEnrollRequest {
			r := d.request(t)
			r.EKChain[0], r.EKPublic = swEK(t)
			return r
		}, 403, "does not chain to a trusted TPM manufacturer root"},
		{"EK public area of another key", st, func() *est.TPMEnrollRequest {
			r := d.request(t)
			_, r.EKPublic = swEK(t)
			return r
		}, 403, "EK public area does not match the EK certificate"},
		{"key without fixedTPM", st, noFixedTPM, 403, "lacks [fixedTPM]"},
		{"CSR key is not the certified key", st, func() *est.TPMEnrollRequest {
			r := d.request(t)
			r.CSR = csrFor(t, soft)
			return r
		}, 403, "CSR public key is not the certified key"},
		{"bad CSR signature", st, func() *est.TPMEnrollRequest {
			r := d.request(t)
			r.CSR[len(r.CSR)-3] ^= 0xff
			return r
		}, 400, "CSR signature does not verify"},
		{"garbage key public area", st, func() *est.TPMEnrollRequest {
			r := d.request(t)
			r.KeyPublic = []byte{1, 2, 3}
			return r
		}, 400, "key public area does not parse"},
		{"unknown EK without auto-approve", strict, func() *est.TPMEnrollRequest { return d.request(t) }, 403, "is not in the manifest and auto-approve is off"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			before := registryJSON(t, tc.st)
			a := tpmEnroll(t, client(t, tc.st, nil), tc.st, tc.req())
			if a.status != tc.status || !strings.Contains(string(a.body), tc.reason) {
				t.Errorf("tpmenroll = %d %q, want %d containing %q", a.status, a.body, tc.status, tc.reason)
			}
			if e := lastAudit(t, tc.st); e.Event != "tpmenroll" || e.Result != "refused" || !strings.Contains(e.Reason, tc.reason) {
				t.Errorf("audit = %+v, want refused with %q", e, tc.reason)
			}
			if after := registryJSON(t, tc.st); after != before {
				t.Errorf("registry changed:\n%s\n%s", before, after)
			}
		})
	}
}

// The EK of TPM A with the key of TPM B: the station cannot tell, but the
// certificate it issues is useless to both TPMs.
func TestTPMEnrollMixedTPMsLeaksNothing(t *testing.T) {
	st := stationtest.Start(t, stationtest.Options{AutoApprove: true})
	a, b := newTPMDevice(t, 0), newTPMDevice(t, 1)
	req := b.request(t)
	req.EKChain, req.EKPublic = [][]byte{a.ek.Certificate.Raw}, a.ek.MarshalPublicArea()
	ans := tpmEnroll(t, client(t, st, nil), st, req)
	if ans.status != http.StatusOK {
		t.Fatalf("tpmenroll = %d %s", ans.status, ans.body)
	}
	// B holds the key but not the EK; A holds the EK but not the key.
	if _, err := b.activate(t, ans); err == nil {
		t.Error("TPM B recovered a certificate encrypted to TPM A's EK")
	}
	aWithB := &tpmDevice{tpm: a.tpm, key: a.key, ek: a.ek}
	if _, err := aWithB.activate(t, ans); err == nil {
		t.Error("TPM A recovered a certificate bound to TPM B's key")
	}
}

// enrolledClient enrolls d and returns an HTTP client using its
// certificate, and the certificate.
func enrolledClient(t testing.TB, st *stationtest.Station, d *tpmDevice) (*http.Client, *x509.Certificate) {
	t.Helper()
	a := tpmEnroll(t, client(t, st, nil), st, d.request(t))
	if a.status != http.StatusOK {
		t.Fatalf("tpmenroll = %d %s", a.status, a.body)
	}
	cert, err := d.activate(t, a)
	if err != nil {
		t.Fatal(err)
	}
	tc := &tls.Certificate{Certificate: [][]byte{cert.Raw}, PrivateKey: d.key, Leaf: cert}
	c := client(t, st, tc)
	confirm(t, c, st) // as the agent does: the first use makes it current
	return c, cert
}

// issuedCert reads the one certificate of a simpleenroll or
// simplereenroll answer (base64 certs-only PKCS#7).
func issuedCert(t testing.TB, a answer) *x509.Certificate {
	t.Helper()
	der, err := est.DecodeBase64(a.body)
	if err != nil {
		t.Fatal(err)
	}
	raw, err := est.ParseCertsOnly(der)
	if err != nil {
		t.Fatal(err)
	}
	certs, err := est.ParseCertificates(raw)
	if err != nil || len(certs) != 1 {
		t.Fatalf("issued certificates: %v (%d, want 1)", err, len(certs))
	}
	return certs[0]
}

func reenrollBody(t testing.TB, key crypto.Signer) []byte {
	return est.EncodeBase64(csrFor(t, key))
}

func TestReenroll(t *testing.T) {
	var offset atomic.Int64
	now := func() time.Time { return time.Now().Add(time.Duration(offset.Load())) }
	st := stationtest.Start(t, stationtest.Options{AutoApprove: true, CertLifetime: time.Hour, Now: now, Lenient: true})
	d, other := newTPMDevice(t, 0), newTPMDevice(t, 1)
	c, cert := enrolledClient(t, st, d)

	a := post(t, c, st, est.PathReenroll, est.MediaPKCS10, reenrollBody(t, d.key))
	if a.status != http.StatusOK {
		t.Fatalf("simplereenroll = %d %s", a.status, a.body)
	}
	renewed := issuedCert(t, a)
	if renewed.Subject.CommonName != cert.Subject.CommonName || !renewed.PublicKey.(*ecdsa.PublicKey).Equal(cert.PublicKey) {
		t.Error("renewed certificate changed the subject or the key")
	}
	// The renewed certificate is now the current one; cert is superseded
	// (TestSupersededCertificateIsRefused).
	c = client(t, st, &tls.Certificate{Certificate: [][]byte{renewed.Raw}, PrivateKey: d.key, Leaf: renewed})

	cOther, _ := enrolledClient(t, st, other)
	soft, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	for _, tc := range []struct {
		name   string
		c      *http.Client
		path   string
		body   func() ([]byte, string)
		status int
		reason string
	}{
		{"no client certificate", client(t, st, nil), est.PathReenroll, func() ([]byte, string) { return reenrollBody(t, d.key), est.MediaPKCS10 }, 403, "needs the current device certificate"},
		{"different key", c, est.PathReenroll, func() ([]byte, string) { return reenrollBody(t, soft), est.MediaPKCS10 }, 403, "renews the same key"},
		{"garbage base64", c, est.PathReenroll, func() ([]byte, string) { return []byte("%%% not base64 %%%"), est.MediaPKCS10 }, 400, "invalid base64"},
		{"wrong content type", c, est.PathReenroll, func() ([]byte, string) { return reenrollBody(t, d.key), "text/plain" }, 415, "want application/pkcs10"},
		{"oversize body", c, est.PathReenroll, func() ([]byte, string) { return bytes.Repeat([]byte("A"), est.MaxBody+1), est.MediaPKCS10 }, 413, "over 65536 bytes"},
		{"other device's certificate for tpmenroll", cOther, est.PathTPMEnroll, func() ([]byte, string) {
			b, ct, _ := d.request(t).Encode()
			return b, ct
		}, 403, "client certificate belongs to device"},
		{"malformed multipart", c, est.PathTPMEnroll, func() ([]byte, string) {
			return []byte("--x\r\nContent-Type: text/plain\r\n\r\nhello\r\n--x--\r\n"), "multipart/mixed; boundary=x"
		}, 415, "part 1 (CSR)"},
		{"oversize multipart", c, est.PathTPMEnroll, func() ([]byte, string) {
			return bytes.Repeat([]byte("A"), est.MaxBody+10), "multipart/mixed; boundary=x"
		}, 413, "over 65536 bytes"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			before := registryJSON(t, st)
			body, ct := tc.body()
			a := post(t, tc.c, st, tc.path, ct, body)
			if a.status != tc.status || !strings.Contains(string(a.body), tc.reason) {
				t.Errorf("= %d %q, want %d containing %q", a.status, a.body, tc.status, tc.reason)
			}
			if e := lastAudit(t, st); e.Result != "refused" || !strings.Contains(e.Reason, tc.reason) {
				t.Errorf("audit = %+v, want refused with %q", e, tc.reason)
			}
			if after := registryJSON(t, st); after != before {
				t.Errorf("registry changed")
			}
		})
	}

	// Expired: the station's clock passes the certificate's notAfter.
	offset.Store(int64(2 * time.Hour))
	before := registryJSON(t, st)
	a = post(t, c, st, est.PathReenroll, est.MediaPKCS10, reenrollBody(t, d.key))
	if a.status != 403 || !strings.Contains(string(a.body), "expired") {
		t.Errorf("simplereenroll with an expired certificate = %d %q, want 403 expired", a.status, a.body)
	}
	if e := lastAudit(t, st); e.Event != "simplereenroll" || e.Result != "refused" || !strings.Contains(e.Reason, "expired") || e.Time.Before(time.Now().Add(time.Hour)) {
		t.Errorf("audit = %+v, want simplereenroll refused as expired, stamped by the station's clock", e)
	}
	if registryJSON(t, st) != before {
		t.Error("registry changed")
	}
	offset.Store(0)

	// Revoked.
	if err := st.Revoke(cert.Subject.CommonName); err != nil {
		t.Fatal(err)
	}
	before = registryJSON(t, st)
	a = post(t, c, st, est.PathReenroll, est.MediaPKCS10, reenrollBody(t, d.key))
	if a.status != 403 || !strings.Contains(string(a.body), "revoked") {
		t.Errorf("simplereenroll with a revoked certificate = %d %q, want 403 revoked", a.status, a.body)
	}
	if e := lastAudit(t, st); e.Result != "refused" || !strings.Contains(e.Reason, "revoked") {
		t.Errorf("audit = %+v", e)
	}
	if registryJSON(t, st) != before {
		t.Error("registry changed")
	}
}

// newKey creates and loads a second device key in d's TPM, as a rotation
// does.
func (d *tpmDevice) newKey(t testing.TB) *tpmDevice {
	t.Helper()
	return &tpmDevice{tpm: d.tpm, key: tpmtest.NewKey(t, d.tpm), ek: d.ek}
}

func mtlsClient(t testing.TB, st *stationtest.Station, cert *x509.Certificate, key crypto.Signer) *http.Client {
	return client(t, st, &tls.Certificate{Certificate: [][]byte{cert.Raw}, PrivateKey: key, Leaf: cert})
}

// Only the device's current certificate renews: after a rotation the
// first certificate, though registered, unrevoked and unexpired, is
// refused by simplereenroll and by tpmenroll over mTLS. The device still
// re-attests by its EK, without a client certificate.
func TestSupersededCertificateIsRefused(t *testing.T) {
	st := stationtest.Start(t, stationtest.Options{AutoApprove: true, Lenient: true})
	d := newTPMDevice(t, 0)
	first, firstCert := enrolledClient(t, st, d)

	// Rotation: a new TPM key certified through tpmenroll over mTLS with
	// the current certificate.
	d2 := d.newKey(t)
	a := tpmEnroll(t, first, st, d2.request(t))
	if a.status != http.StatusOK {
		t.Fatalf("rotation through tpmenroll over mTLS = %d %s", a.status, a.body)
	}
	secondCert, err := d2.activate(t, a)
	if err != nil {
		t.Fatal(err)
	}
	confirm(t, mtlsClient(t, st, secondCert, d2.key), st)
	devs, _ := st.Devices()
	if len(devs) != 1 || devs[0].CertSerial != secondCert.SerialNumber.Text(16) {
		t.Fatalf("registry after rotation = %+v, want current serial %x", devs, secondCert.SerialNumber)
	}

	const reason = "is not the current certificate of device"
	for _, tc := range []struct {
		name string
		send func() answer
	}{
		{"simplereenroll", func() answer {
			return post(t, first, st, est.PathReenroll, est.MediaPKCS10, reenrollBody(t, d.key))
		}},
		{"tpmenroll", func() answer { return tpmEnroll(t, first, st, d.newKey(t).request(t)) }},
	} {
		t.Run(tc.name+" with the superseded certificate", func(t *testing.T) {
			before := registryJSON(t, st)
			a := tc.send()
			if a.status != http.StatusForbidden || !strings.Contains(string(a.body), reason) {
				t.Errorf("%s = %d %q, want 403 containing %q", tc.name, a.status, a.body, reason)
			}
			e := lastAudit(t, st)
			if e.Event != tc.name || e.Result != "refused" || !strings.Contains(e.Reason, reason) || e.Device != firstCert.Subject.CommonName || e.Serial != "" {
				t.Errorf("audit = %+v, want %s refused with %q for %s", e, tc.name, reason, firstCert.Subject.CommonName)
			}
			if after := registryJSON(t, st); after != before {
				t.Errorf("registry changed:\n%s\n%s", before, after)
			}
		})
	}

	// A renewal of the same key whose response was lost (the device kept
	// the certificate it renewed) is renewed again: the station's current
	// certificate certifies that key anyway, and a device without an EK
	// certificate could not re-attest.
	second := mtlsClient(t, st, secondCert, d2.key)
	if a := post(t, second, st, est.PathReenroll, est.MediaPKCS10, reenrollBody(t, d2.key)); a.status != http.StatusOK {
		t.Fatalf("simplereenroll with the current certificate = %d %s", a.status, a.body)
	}
	if devs, _ := st.Devices(); devs[0].CertSerial == secondCert.SerialNumber.Text(16) {
		t.Fatal("the renewal did not supersede the certificate it renewed")
	}
	a = post(t, second, st, est.PathReenroll, est.MediaPKCS10, reenrollBody(t, d2.key))
	if a.status != http.StatusOK {
		t.Fatalf("simplereenroll of the same key after a lost response = %d %s, want 200", a.status, a.body)
	}
	if e := lastAudit(t, st); e.Event != "simplereenroll" || e.Result != "accepted" {
		t.Errorf("audit = %+v, want simplereenroll accepted", e)
	}
	current := mtlsClient(t, st, issuedCert(t, a), d2.key)

	// Rotations from one certificate: each is issued unconfirmed; of
	// their simultaneous first uses, the first to reach the registry
	// supersedes the certificate for the other.
	var rotated []*http.Client
	for range 2 {
		nk := d2.newKey(t)
		a := tpmEnroll(t, current, st, nk.request(t))
		if a.status != http.StatusOK {
			t.Fatalf("rotation = %d %s", a.status, a.body)
		}
		c, err := nk.activate(t, a)
		if err != nil {
			t.Fatal(err)
		}
		rotated = append(rotated, mtlsClient(t, st, c, nk.key))
	}
	answers := make(chan answer, len(rotated))
	for _, c := range rotated {
		go func() {
			// Not confirm: t.Fatal belongs to the test's goroutine.
			resp, err := c.Get(st.URL + est.PathCACerts)
			if err != nil {
				answers <- answer{body: []byte(err.Error())}
				return
			}
			defer resp.Body.Close()
			b, _ := io.ReadAll(resp.Body)
			answers <- answer{resp.StatusCode, resp.Header, b}
		}()
	}
	confirmed := 0
	for range cap(answers) {
		switch a := <-answers; {
		case a.status == http.StatusOK:
			confirmed++
		case a.status != http.StatusForbidden || !strings.Contains(string(a.body), "is no longer current"):
			t.Errorf("first use of a rotated certificate = %d %q, want 200 or 403 \"is no longer current\"", a.status, a.body)
		}
	}
	if confirmed != 1 {
		t.Errorf("%d of %d simultaneous rotations from one certificate became current, want 1", confirmed, cap(answers))
	}
	// A device left with a superseded certificate re-attests by its EK.
	d3 := d.newKey(t)
	a = tpmEnroll(t, client(t, st, nil), st, d3.request(t))
	if a.status != http.StatusOK {
		t.Fatalf("re-attestation without a client certificate = %d %s", a.status, a.body)
	}
	if _, err := d3.activate(t, a); err != nil {
		t.Fatal(err)
	}
}

// Revoking a device puts every certificate issued to it on the CRL served
// at /crl and written to crl.pem, signed by the issuing CA.
func TestRevokeListsSerialsInCRL(t *testing.T) {
	st := stationtest.Start(t, stationtest.Options{AutoApprove: true})
	d := newTPMDevice(t, 0)
	c, first := enrolledClient(t, st, d)
	a := post(t, c, st, est.PathReenroll, est.MediaPKCS10, reenrollBody(t, d.key))
	if a.status != http.StatusOK {
		t.Fatalf("simplereenroll = %d %s", a.status, a.body)
	}
	der, _ := est.DecodeBase64(a.body)
	raw, err := est.ParseCertsOnly(der)
	if err != nil {
		t.Fatal(err)
	}
	second, _ := x509.ParseCertificate(raw[0])
	issuer := st.CACerts()[0]

	getCRL := func() *x509.RevocationList {
		t.Helper()
		resp, err := client(t, st, nil).Get(st.URL + "/crl")
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		if resp.StatusCode != http.StatusOK || resp.Header.Get("Content-Type") != "application/pkix-crl" {
			t.Fatalf("GET /crl = %d %s %q", resp.StatusCode, resp.Header.Get("Content-Type"), b)
		}
		crl, err := x509.ParseRevocationList(b)
		if err != nil {
			t.Fatalf("GET /crl: %v", err)
		}
		if err := crl.CheckSignatureFrom(issuer); err != nil {
			t.Errorf("CRL signature: %v", err)
		}
		return crl
	}
	listed := func(crl *x509.RevocationList, serial *big.Int) bool {
		for _, e := range crl.RevokedCertificateEntries {
			if e.SerialNumber.Cmp(serial) == 0 {
				return true
			}
		}
		return false
	}

	before := getCRL()
	if listed(before, first.SerialNumber) || listed(before, second.SerialNumber) {
		t.Fatal("CRL lists the device before its revocation")
	}
	if err := st.Revoke(first.Subject.CommonName); err != nil {
		t.Fatal(err)
	}
	after := getCRL()
	if after.Number.Cmp(before.Number) <= 0 {
		t.Errorf("CRL number %v after revocation, was %v", after.Number, before.Number)
	}
	pemBytes, err := os.ReadFile(filepath.Join(st.Dir, "crl.pem"))
	if err != nil {
		t.Fatal(err)
	}
	blk, _ := pem.Decode(pemBytes)
	if blk == nil || blk.Type != "X509 CRL" {
		t.Fatalf("crl.pem = %q, want an X509 CRL PEM block", pemBytes)
	}
	file, err := x509.ParseRevocationList(blk.Bytes)
	if err != nil {
		t.Fatalf("crl.pem: %v", err)
	}
	if err := file.CheckSignatureFrom(issuer); err != nil {
		t.Errorf("crl.pem signature: %v", err)
	}
	for _, serial := range []*big.Int{first.SerialNumber, second.SerialNumber} {
		if !listed(after, serial) {
			t.Errorf("GET /crl does not list %x", serial)
		}
		if !listed(file, serial) {
			t.Errorf("crl.pem does not list %x", serial)
		}
	}
	if e := lastAudit(t, st); e.Event != "revoke" || e.Result != "accepted" || e.Device != first.Subject.CommonName {
		t.Errorf("audit = %+v", e)
	}
}

func TestTokens(t *testing.T) {
	var offset atomic.Int64
	now := func() time.Time { return time.Now().Add(time.Duration(offset.Load())) }
	st := stationtest.Start(t, stationtest.Options{Now: now, Lenient: true})
	c := client(t, st, nil)
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tok, err := st.CreateToken("gw-7", time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	a := post(t, c, st, est.PathEnroll, est.MediaPKCS10, reenrollBody(t, key), "gw-7", tok.Secret)
	if a.status != 200 {
		t.Fatalf("simpleenroll = %d %s", a.status, a.body)
	}
	for _, tc := range []struct {
		name   string
		setup  func() (string, string)
		status int
		reason string
	}{
		{"token reused", func() (string, string) { return "gw-7", tok.Secret }, 401, "already used"},
		{"wrong secret", func() (string, string) {
			st.CreateToken("gw-8", time.Hour)
			return "gw-8", "guess"
		}, 401, "wrong token secret"},
		{"expired token", func() (string, string) {
			t2, _ := st.CreateToken("gw-9", time.Minute)
			offset.Store(int64(2 * time.Minute))
			return "gw-9", t2.Secret
		}, 401, "token expired"},
		{"no credentials", func() (string, string) { return "", "" }, 401, "HTTP Basic credentials"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			user, pass := tc.setup()
			before := registryJSON(t, st)
			var a answer
			if user == "" {
				a = post(t, c, st, est.PathEnroll, est.MediaPKCS10, reenrollBody(t, key))
			} else {
				a = post(t, c, st, est.PathEnroll, est.MediaPKCS10, reenrollBody(t, key), user, pass)
			}
			// The answer is one for every bad token; the audit log says why.
			answer := tc.reason
			if user != "" {
				answer = "token not accepted for this device ID"
			}
			if a.status != tc.status || !strings.Contains(string(a.body), answer) {
				t.Errorf("= %d %q, want %d containing %q", a.status, a.body, tc.status, answer)
			}
			if a.header.Get("WWW-Authenticate") == "" {
				t.Error("401 without WWW-Authenticate")
			}
			if e := lastAudit(t, st); e.Event != "simpleenroll" || e.Result != "refused" || !strings.Contains(e.Reason, tc.reason) {
				t.Errorf("audit = %+v, want refused with %q", e, tc.reason)
			}
			if registryJSON(t, st) != before {
				t.Error("registry changed")
			}
		})
	}
}

// A client that keeps failing is slowed down with 429 and Retry-After.
func TestFailingClientIsSlowedDown(t *testing.T) {
	st := stationtest.Start(t, stationtest.Options{})
	c := client(t, st, nil)
	var last answer
	for range 6 {
		last = post(t, c, st, est.PathEnroll, est.MediaPKCS10, []byte("garbage"), "gw-1", "nope")
	}
	if last.status != http.StatusTooManyRequests || last.header.Get("Retry-After") == "" {
		t.Fatalf("6th failing request = %d (Retry-After %q), want 429 with Retry-After", last.status, last.header.Get("Retry-After"))
	}
}

// With --hold-unknown, an unknown EK is held for approval: 202 with
// Retry-After, a pending registry entry; after iotstation approve it
// enrolls.
func TestHoldForApproval(t *testing.T) {
	st := stationtest.Start(t, stationtest.Options{HoldUnknown: true})
	d := newTPMDevice(t, 0)
	c := client(t, st, nil)
	for range 2 {
		a := tpmEnroll(t, c, st, d.request(t))
		if a.status != http.StatusAccepted || a.header.Get("Retry-After") != "60" || !strings.Contains(string(a.body), "iotstation approve dev-") {
			t.Fatalf("tpmenroll of an unknown EK = %d (Retry-After %q) %q, want 202 with Retry-After", a.status, a.header.Get("Retry-After"), a.body)
		}
	}
	devs, _ := st.Devices()
	if len(devs) != 1 || devs[0].Status != station.StatusPending || devs[0].CertSerial != "" {
		t.Fatalf("registry = %+v, want one pending device without certificate", devs)
	}
	if e := lastAudit(t, st); e.Result != "pending" {
		t.Errorf("audit = %+v, want pending", e)
	}
	if err := st.Approve(devs[0].ID); err != nil {
		t.Fatal(err)
	}
	if err := st.Approve(devs[0].ID); err == nil || !strings.Contains(err.Error(), "not pending") {
		t.Errorf("approving twice = %v", err)
	}
	a := tpmEnroll(t, c, st, d.request(t))
	if a.status != http.StatusOK {
		t.Fatalf("tpmenroll after approval = %d %s", a.status, a.body)
	}
	cert, err := d.activate(t, a)
	if err != nil {
		t.Fatal(err)
	}
	confirm(t, mtlsClient(t, st, cert, d.key), st)
	devs, _ = st.Devices()
	if devs[0].Status != station.StatusEnrolled {
		t.Errorf("status after enrollment = %s", devs[0].Status)
	}
}

// Brokers and the collector take a client's identity from its CN: a name
// is a device's or a service's, never both.
func TestServiceAndDeviceNamesNeverOverlap(t *testing.T) {
	st := stationtest.Start(t, stationtest.Options{AutoApprove: true, Lenient: true})
	if _, err := st.IssueService(context.Background(), station.ServiceRequest{Name: "gw-svc", Lifetime: time.Hour}); err != nil {
		t.Fatal(err)
	}
	if _, err := st.CreateToken("gw-svc", time.Hour); err == nil || !strings.Contains(err.Error(), "name of a station service") {
		t.Errorf("token for a service's name = %v, want refused", err)
	}
	d := newTPMDevice(t, 0)
	_, cert := enrolledClient(t, st, d)
	if _, err := st.IssueService(context.Background(), station.ServiceRequest{Name: cert.Subject.CommonName, Lifetime: time.Hour}); err == nil || !strings.Contains(err.Error(), "is a device ID") {
		t.Errorf("service certificate under a device's ID = %v, want refused", err)
	}
}

// Administrative decisions taken over the admin socket are audited,
// refusals with their reason, like enrollment decisions.
func TestAdminDecisionsAudited(t *testing.T) {
	st := stationtest.Start(t, stationtest.Options{AutoApprove: true})
	a := st.Admin()
	ctx := context.Background()
	if _, err := a.IssueService(ctx, station.ServiceRequest{Name: "broker", SANs: []string{"127.0.0.1"}, Server: true, Lifetime: time.Hour}); err != nil {
		t.Fatal(err)
	}
	d := newTPMDevice(t, 0)
	_, cert := enrolledClient(t, st, d)
	if err := a.Revoke(ctx, cert.Subject.CommonName); err != nil {
		t.Fatal(err)
	}

	for _, tc := range []struct {
		name   string
		do     func() error
		event  string
		device string
		result string
		reason string
	}{
		{"token accepted", func() error { _, err := a.CreateToken(ctx, "gw-1", time.Hour); return err }, "token", "gw-1", "accepted", ""},
		{"token for a service's name", func() error { _, err := a.CreateToken(ctx, "broker", time.Hour); return err }, "token", "broker", "refused", "name of a station service"},
		{"token for a revoked device", func() error { _, err := a.CreateToken(ctx, cert.Subject.CommonName, time.Hour); return err }, "token", cert.Subject.CommonName, "refused", "is revoked"},
		{"token TTL too long", func() error { _, err := a.CreateToken(ctx, "gw-2", 2*station.MaxTokenTTL); return err }, "token", "gw-2", "refused", "at most"},
		{"token for an invalid ID", func() error { _, err := a.CreateToken(ctx, "a/b", time.Hour); return err }, "token", "a/b", "refused", `device ID "a/b"`},
		{"service certificate accepted", func() error {
			_, err := a.IssueService(ctx, station.ServiceRequest{Name: "fleet-reader", Lifetime: time.Hour})
			return err
		}, "issue-service", "fleet-reader", "accepted", ""},
		{"service certificate under a device's ID", func() error {
			_, err := a.IssueService(ctx, station.ServiceRequest{Name: cert.Subject.CommonName, Lifetime: time.Hour})
			return err
		}, "issue-service", cert.Subject.CommonName, "refused", "is a device ID"},
		{"service certificate without a name", func() error {
			_, err := a.IssueService(ctx, station.ServiceRequest{Lifetime: time.Hour})
			return err
		}, "issue-service", "", "refused", "needs a name"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := tc.do()
			if (tc.result == "refused") != (err != nil) || (err != nil && !strings.Contains(err.Error(), tc.reason)) {
				t.Errorf("error = %v, want %s %q", err, tc.result, tc.reason)
			}
			e := lastAudit(t, st)
			if e.Event != tc.event || e.Device != tc.device || e.Result != tc.result || !strings.Contains(e.Reason, tc.reason) {
				t.Errorf("audit = %+v, want %s %s for %q with %q", e, tc.event, tc.result, tc.device, tc.reason)
			}
			if (tc.result == "refused") != (e.Reason != "") {
				t.Errorf("audit reason = %q for a %s decision", e.Reason, tc.result)
			}
		})
	}
}

// The CRL hook runs after every change of crl.pem (serve's start, each
// revocation) with IOTSTATION_CRL_FILE naming it; a failing hook does not
// undo the revocation but Revoke reports it, with its output, and the
// audit log records it.
func TestCRLHook(t *testing.T) {
	runs := filepath.Join(t.TempDir(), "runs")
	st := stationtest.Start(t, stationtest.Options{AutoApprove: true,
		CRLHook: `echo "$IOTSTATION_CRL_FILE" >> ` + runs})
	hookRuns := func() []string {
		b, _ := os.ReadFile(runs)
		return strings.Fields(string(b))
	}
	crlFile := filepath.Join(st.Dir, "crl.pem")
	testsync.Until(t, 10*time.Second, "the hook ran at serve's start", func() bool { return len(hookRuns()) > 0 })
	if got := hookRuns(); !slices.Equal(got, []string{crlFile}) {
		t.Fatalf("hook runs after serve started = %q, want one naming %s", got, crlFile)
	}
	_, cert := enrolledClient(t, st, newTPMDevice(t, 0))
	id := cert.Subject.CommonName
	if err := st.Revoke(id); err != nil {
		t.Fatalf("Revoke: %v", err)
	}
	if got := hookRuns(); len(got) != 2 {
		t.Errorf("hook runs after a revocation = %q, want 2", got)
	}

	failing := stationtest.Start(t, stationtest.Options{AutoApprove: true,
		CRLHook: "echo broker unreachable >&2; exit 3"})
	hookAudit := func() []station.AuditEntry { return auditEntries(t, failing, "crl-hook") }
	testsync.Until(t, 10*time.Second, "the failing hook ran at serve's start", func() bool { return len(hookAudit()) > 0 })
	_, cert = enrolledClient(t, failing, newTPMDevice(t, 1))
	id = cert.Subject.CommonName
	err := failing.Revoke(id)
	if err == nil || !strings.Contains(err.Error(), "device revoked and crl.pem reissued") ||
		!strings.Contains(err.Error(), "exit status 3") || !strings.Contains(err.Error(), "broker unreachable") {
		t.Errorf("Revoke with a failing hook = %v, want the revocation done and the hook's failure and output", err)
	}
	devs, _ := failing.Devices()
	if len(devs) != 1 || devs[0].Status != station.StatusRevoked {
		t.Errorf("devices after Revoke = %+v, want %s revoked", devs, id)
	}
	// serve's start and the revocation
	hookEntries := hookAudit()
	// (serve's retries, every 10 s, may add more)
	if last := len(hookEntries) - 1; last < 1 || hookEntries[last].Result != "refused" || !strings.Contains(hookEntries[last].Reason, "exit status 3") {
		t.Errorf("crl-hook audit entries = %+v, want 2 or more, refused with the exit status", hookEntries)
	}
}

// serve retries a failed CRL hook with backoff until it succeeds, then
// stops running it; a hook that exits 0 but leaves a child holding its
// output counts as a success.
func TestCRLHookRetry(t *testing.T) {
	dir := t.TempDir()
	broken, runs := filepath.Join(dir, "broken"), filepath.Join(dir, "runs")
	if err := os.WriteFile(broken, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	st := stationtest.Start(t, stationtest.Options{AutoApprove: true, CRLHookRetry: 20 * time.Millisecond,
		CRLHook: `if [ -e ` + broken + ` ]; then echo broker down >&2; exit 1; fi; echo ok >> ` + runs})
	hookAudit := func() (refused, accepted int) {
		for _, e := range auditEntries(t, st, "crl-hook") {
			if e.Result == "refused" {
				refused++
			} else {
				accepted++
			}
		}
		return refused, accepted
	}
	testsync.Until(t, 10*time.Second, "the failing hook retried", func() bool { r, _ := hookAudit(); return r >= 3 })
	metric := func() string {
		resp, err := client(t, st, nil).Get(st.URL + "/metrics")
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		for _, l := range strings.Split(string(b), "\n") {
			if strings.HasPrefix(l, "iotstation_crl_hook_failing ") {
				return l
			}
		}
		return ""
	}
	if m := metric(); m != "iotstation_crl_hook_failing 1" {
		t.Errorf("/metrics while the hook fails: %q, want iotstation_crl_hook_failing 1", m)
	}
	os.Remove(broken)
	testsync.Until(t, 10*time.Second, "a retry succeeds once the broker is back", func() bool { _, a := hookAudit(); return a == 1 })
	// No more runs once one succeeded: wait longer than the backoff reached.
	time.Sleep(500 * time.Millisecond)
	if b, _ := os.ReadFile(runs); string(b) != "ok\n" {
		t.Errorf("hook output after success = %q, want exactly one run", b)
	}
	if m := metric(); m != "iotstation_crl_hook_failing 0" {
		t.Errorf("/metrics once the hook succeeded: %q, want iotstation_crl_hook_failing 0", m)
	}

	bg := stationtest.Start(t, stationtest.Options{AutoApprove: true, CRLHook: `sleep 3 & echo reloading`})
	_, cert := enrolledClient(t, bg, newTPMDevice(t, 2))
	if err := bg.Revoke(cert.Subject.CommonName); err != nil {
		t.Errorf("Revoke with a hook that leaves a child running = %v, want nil", err)
	}
}

// init --ca-tpm: the issuing CA's key is created in the station's TPM and
// never written to disk; device certificates and CRLs are signed by it,
// and the key's blobs load in no other TPM.
func TestIssuingCAKeyInTPM(t *testing.T) {
	caTPM := tpmtest.Start(t, tpmtest.Options{Identity: 1})
	st := stationtest.Start(t, stationtest.Options{AutoApprove: true, CATPM: caTPM.Spec})
	if _, err := os.Stat(filepath.Join(st.Dir, "ca.key")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("ca.key with --ca-tpm: %v, want no such file", err)
	}
	blobs := filepath.Join(st.Dir, "ca.tpmkey")
	if fi, err := os.Stat(blobs); err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("ca.tpmkey: %v, %v; want mode 0600", fi, err)
	}
	kf, err := tpm.ReadKeyFile(blobs)
	if err != nil {
		t.Fatal(err)
	}
	pub, err := kf.PublicKey()
	if err != nil {
		t.Fatal(err)
	}
	issuer := st.CACerts()[0]
	if !issuer.PublicKey.(*ecdsa.PublicKey).Equal(pub) {
		t.Fatal("the issuing CA certificate is not for the TPM key")
	}

	_, cert := enrolledClient(t, st, newTPMDevice(t, 0))
	if err := cert.CheckSignatureFrom(issuer); err != nil {
		t.Errorf("device certificate: %v", err)
	}
	if err := st.Revoke(cert.Subject.CommonName); err != nil {
		t.Fatal(err)
	}
	der, err := st.CRL()
	if err != nil {
		t.Fatal(err)
	}
	crl, err := x509.ParseRevocationList(der)
	if err != nil {
		t.Fatal(err)
	}
	if err := crl.CheckSignatureFrom(issuer); err != nil || len(crl.RevokedCertificateEntries) != 1 {
		t.Errorf("CRL after revocation: signature %v, %d entries; want one entry signed by the TPM-held issuing CA", err, len(crl.RevokedCertificateEntries))
	}

	// The same directory pointed at another TPM cannot sign: the blobs are
	// refused there (and the first signature, serve's CRL, fails).
	st.Stop()
	st.Close()
	other := tpmtest.Start(t, tpmtest.Options{Identity: 2})
	cfgPath := filepath.Join(st.Dir, "station.json")
	b, err := os.ReadFile(cfgPath)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(cfgPath, bytes.ReplaceAll(b, []byte(caTPM.Spec), []byte(other.Spec)), 0o644); err != nil {
		t.Fatal(err)
	}
	s, err := station.Open(station.Config{Dir: st.Dir})
	if err != nil {
		t.Fatalf("Open (the TPM is opened at the first signature): %v", err)
	}
	defer s.Close()
	if devs, err := s.Devices(); err != nil || len(devs) != 1 {
		t.Errorf("Devices without signing = %d, %v; want the registry readable", len(devs), err)
	}
	if _, err := s.IssueService(context.Background(), station.ServiceRequest{Name: "svc", Lifetime: time.Hour}); !errors.Is(err, tpm.ErrWrongTPM) {
		t.Errorf("IssueService with another TPM = %v, want ErrWrongTPM", err)
	}
}
