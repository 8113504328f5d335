package station_test

// The station's standing adversarial suite (issue 10): each test is an
// attack that worked once, against a real station and swtpm TPMs. Run
// alone with go test -run TestAttack ./...

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"math/big"
	"net"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/google/go-tpm/tpm2"

	"iotagent.dev/iotagent/est"
	"iotagent.dev/iotagent/internal/testdirs"
	"iotagent.dev/iotagent/internal/testsync"
	"iotagent.dev/iotagent/station"
	"iotagent.dev/iotagent/station/stationtest"
)

// forgedKeyPublic is a TPM public area that claims fixedTPM and
// sensitiveDataOrigin for a key that lives in software: attributes are
// claims; only credential activation proves them.
func forgedKeyPublic(t testing.TB, like tpm2.TPMTPublic, key crypto.PublicKey) []byte {
	t.Helper()
	p := like
	switch k := key.(type) {
	case *ecdsa.PublicKey:
		b, err := k.Bytes() // uncompressed point
		if err != nil {
			t.Fatal(err)
		}
		n := (len(b) - 1) / 2
		p.Unique = tpm2.NewTPMUPublicID(tpm2.TPMAlgECC, &tpm2.TPMSECCPoint{
			X: tpm2.TPM2BECCParameter{Buffer: b[1 : 1+n]}, Y: tpm2.TPM2BECCParameter{Buffer: b[1+n:]},
		})
	case *rsa.PublicKey:
		p.Type = tpm2.TPMAlgRSA
		p.Parameters = tpm2.NewTPMUPublicParms(tpm2.TPMAlgRSA, &tpm2.TPMSRSAParms{
			Scheme:  tpm2.TPMTRSAScheme{Scheme: tpm2.TPMAlgNull},
			KeyBits: tpm2.TPMKeyBits(k.N.BitLen()),
		})
		p.Unique = tpm2.NewTPMUPublicID(tpm2.TPMAlgRSA, &tpm2.TPM2BPublicKeyRSA{Buffer: k.N.Bytes()})
	}
	return tpm2.Marshal(&p)
}

// forgedRequest is what anyone holding a device's public EK data (its EK
// certificate and public area, readable from NV without authorization)
// can send: that EK with a software key dressed as a TPM key.
func forgedRequest(t testing.TB, victim *tpmDevice) *est.TPMEnrollRequest {
	t.Helper()
	soft, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	return &est.TPMEnrollRequest{
		CSR:       csrFor(t, soft),
		EKChain:   [][]byte{victim.ek.Certificate.Raw},
		EKPublic:  victim.ek.MarshalPublicArea(),
		KeyPublic: forgedKeyPublic(t, victim.key.PublicArea(), &soft.PublicKey),
	}
}

func crlSerials(t testing.TB, st *stationtest.Station) int {
	t.Helper()
	der, err := st.CRL()
	if err != nil {
		t.Fatal(err)
	}
	return len(mustCRL(t, der).RevokedCertificateEntries)
}

func mustCRL(t testing.TB, der []byte) *x509.RevocationList {
	t.Helper()
	crl, err := x509.ParseRevocationList(der)
	if err != nil {
		t.Fatal(err)
	}
	return crl
}

// Finding 2: /tpmenroll recorded the certificate as the device's current
// one (superseding the real one, clearing the failure limiter) before the
// device proved anything. Now it stays pending until the device uses it.
func TestAttackTPMEnrollWithPublicEKData(t *testing.T) {
	st := stationtest.Start(t, stationtest.Options{AutoApprove: true, FailuresBeforeSlowdown: 5})
	victim, bystander := newTPMDevice(t, 0), newTPMDevice(t, 1)
	real, realCert := enrolledClient(t, st, victim)
	confirm(t, real, st)
	before := registryJSON(t, st)

	outsider := client(t, st, nil)
	const forged = 12
	for range forged {
		tpmEnroll(t, outsider, st, forgedRequest(t, victim))
		tpmEnroll(t, outsider, st, forgedRequest(t, bystander))
	}
	if after := registryJSON(t, st); after != before {
		t.Errorf("forged tpmenroll requests changed the registry:\n%s\n%s", before, after)
	}
	// The real device still renews with its certificate.
	if a := post(t, real, st, est.PathReenroll, est.MediaPKCS10, reenrollBody(t, victim.key)); a.status != http.StatusOK {
		t.Errorf("the real device's simplereenroll after the forgeries = %d %s, want 200", a.status, a.body)
	}
	// A revocation lists the certificates the device used (its first and
	// its renewal), not the forgeries.
	if err := st.Revoke(realCert.Subject.CommonName); err != nil {
		t.Fatal(err)
	}
	if n := crlSerials(t, st); n != 2 {
		t.Errorf("CRL lists %d serials after %d forged requests, want the device's 2", n, forged)
	}
}

// Forged requests for a device's EK between its own /tpmenroll and its
// first use of the answer do not drop its certificate (with 4 kept per
// EK, 4 forgeries did: its exchange was refused as not in the registry).
func TestAttackForgeriesRaceTheExchange(t *testing.T) {
	st := stationtest.Start(t, stationtest.Options{AutoApprove: true, Lenient: true})
	d := newTPMDevice(t, 0)
	a := tpmEnroll(t, client(t, st, nil), st, d.request(t))
	cert, err := d.activate(t, a)
	if err != nil {
		t.Fatal(err)
	}
	outsider := client(t, st, nil)
	for range 20 {
		if a := tpmEnroll(t, outsider, st, forgedRequest(t, d)); a.status != http.StatusOK {
			t.Fatalf("forged tpmenroll = %d %s", a.status, a.body)
		}
	}
	c := mtlsClient(t, st, cert, d.key)
	if a := post(t, c, st, est.PathReenroll, est.MediaPKCS10, reenrollBody(t, d.key)); a.status != http.StatusOK {
		t.Errorf("the device's exchange after 20 forgeries = %d %s, want 200", a.status, a.body)
	}
}

// A forged "success" cleared the failures of the outsider's address.
func TestAttackTPMEnrollClearsFailureLimiter(t *testing.T) {
	st := stationtest.Start(t, stationtest.Options{AutoApprove: true, FailuresBeforeSlowdown: 5})
	victim := newTPMDevice(t, 0)
	outsider := client(t, st, nil)
	for range 3 {
		post(t, outsider, st, est.PathEnroll, est.MediaPKCS10, []byte("garbage"), "gw-1", "nope")
	}
	if a := tpmEnroll(t, outsider, st, forgedRequest(t, victim)); a.status != http.StatusOK {
		t.Fatalf("forged tpmenroll = %d %s", a.status, a.body)
	}
	var last answer
	for range 3 {
		last = post(t, outsider, st, est.PathEnroll, est.MediaPKCS10, []byte("garbage"), "gw-1", "nope")
	}
	if last.status != http.StatusTooManyRequests {
		t.Errorf("6th failure from an address that sent a forged tpmenroll = %d, want 429 (a forged success must not clear the limiter)", last.status)
	}
}

// confirm makes the mutual-TLS request that proves possession of a new
// certificate.
func confirm(t testing.TB, c *http.Client, st *stationtest.Station) {
	t.Helper()
	resp, err := c.Get(st.URL + est.PathCACerts)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("GET cacerts over mTLS = %d", resp.StatusCode)
	}
}

// The real device's certificate becomes current only once it is used,
// and a pending one never changes a device already proven.
func TestTPMEnrollPendingUntilUsed(t *testing.T) {
	var offset atomicDuration
	st := stationtest.Start(t, stationtest.Options{AutoApprove: true, Lenient: true, Now: offset.now, CertLifetime: 3 * time.Hour})
	d := newTPMDevice(t, 0)
	a := tpmEnroll(t, client(t, st, nil), st, d.request(t))
	if a.status != http.StatusOK {
		t.Fatalf("tpmenroll = %d %s", a.status, a.body)
	}
	cert, err := d.activate(t, a)
	if err != nil {
		t.Fatal(err)
	}
	if devs, _ := st.Devices(); len(devs) != 0 {
		t.Fatalf("registry after tpmenroll, before any use = %+v, want empty", devs)
	}
	c := mtlsClient(t, st, cert, d.key)
	confirm(t, c, st)
	if st.CertificateRevoked(cert) {
		t.Error("the collector's check refused the confirmed certificate")
	}
	devs, _ := st.Devices()
	if len(devs) != 1 || devs[0].Status != station.StatusEnrolled || devs[0].CertSerial != cert.SerialNumber.Text(16) {
		t.Fatalf("registry after the certificate's first use = %+v, want it current", devs)
	}
	if e := lastAudit(t, st); e.Event != "confirm" || e.Result != "accepted" || e.Serial != cert.SerialNumber.Text(16) {
		t.Errorf("audit = %+v, want confirm accepted for the serial", e)
	}

	// An unconfirmed certificate is short-lived: never used, it expires
	// by itself, needing no CRL entry (a device that kept one back cannot
	// outlive its revocation with it for longer).
	d2 := d.newKey(t)
	a = tpmEnroll(t, c, st, d2.request(t))
	if a.status != http.StatusOK {
		t.Fatalf("rotation = %d %s", a.status, a.body)
	}
	late, err := d2.activate(t, a)
	if err != nil {
		t.Fatal(err)
	}
	if life := late.NotAfter.Sub(late.NotBefore); life > station.UnconfirmedLifetime+5*time.Minute {
		t.Errorf("an unconfirmed certificate is valid for %v, want at most %v (and the backdate)", life, station.UnconfirmedLifetime)
	}
	// Past its window it is forgotten for good, at its first use.
	offset.add(station.UnconfirmedLifetime + time.Minute)
	if !st.CertificateRevoked(late) {
		t.Error("a certificate used after its confirmation window was accepted")
	}
	if devs, _ := st.Devices(); devs[0].CertSerial != cert.SerialNumber.Text(16) {
		t.Errorf("a certificate used after its confirmation window became current: %+v", devs[0])
	}
	if e := lastAudit(t, st); e.Event != "confirm" || e.Result != "refused" || !strings.Contains(e.Reason, "was not used within") {
		t.Errorf("audit = %+v, want confirm refused as expired", e)
	}
	n := len(auditEntries(t, st, "confirm"))
	st.CertificateRevoked(late)
	if m := len(auditEntries(t, st, "confirm")); m != n {
		t.Error("the expired certificate was still there to confirm at its second use: its drop was rolled back")
	}
}

// The collector's check runs after the client proved its key (pion
// verifies CertificateVerify first): that first use confirms a /tpmenroll
// certificate too, so an agent that talks CoAP before it talks to the
// station again is not refused.
func TestCollectorUseConfirms(t *testing.T) {
	st := stationtest.Start(t, stationtest.Options{AutoApprove: true})
	d := newTPMDevice(t, 0)
	a := tpmEnroll(t, client(t, st, nil), st, d.request(t))
	cert, err := d.activate(t, a)
	if err != nil {
		t.Fatal(err)
	}
	if st.CertificateRevoked(cert) {
		t.Fatal("the collector's check refused an unconfirmed certificate its holder just used")
	}
	if devs, _ := st.Devices(); len(devs) != 1 || devs[0].CertSerial != cert.SerialNumber.Text(16) {
		t.Errorf("registry after the collector's check = %+v, want the certificate current", devs)
	}
	if e := lastAudit(t, st); e.Event != "confirm" || e.Result != "accepted" || e.Remote != "collector" {
		t.Errorf("audit = %+v, want confirm accepted by the collector", e)
	}
}

type atomicDuration struct {
	mu sync.Mutex
	d  time.Duration
}

func (a *atomicDuration) add(d time.Duration) { a.mu.Lock(); a.d += d; a.mu.Unlock() }
func (a *atomicDuration) now() time.Time {
	a.mu.Lock()
	defer a.mu.Unlock()
	return time.Now().Add(a.d)
}

// Finding 2, per source: attestation requests are rate-limited per
// address, so a flood costs the station a bounded number of signatures.
func TestAttackTPMEnrollFloodFromOneSource(t *testing.T) {
	st := stationtest.Start(t, stationtest.Options{AutoApprove: true, FailuresBeforeSlowdown: 1000})
	victim := newTPMDevice(t, 0)
	c := client(t, st, nil)
	limited := 0
	for range 40 {
		if a := tpmEnroll(t, c, st, forgedRequest(t, victim)); a.status == http.StatusTooManyRequests {
			limited++
			if a.header.Get("Retry-After") == "" {
				t.Error("429 without Retry-After")
			}
		}
	}
	if limited < 40-station.AttestationBurst {
		t.Errorf("%d of 40 back-to-back tpmenroll requests from one address were rate-limited, want at least %d", limited, 40-station.AttestationBurst)
	}
}

// Finding 7: /tpmenroll skipped the key policy simpleenroll enforces.
func TestAttackTPMEnrollWeakKey(t *testing.T) {
	st := stationtest.Start(t, stationtest.Options{AutoApprove: true, Lenient: true})
	d := newTPMDevice(t, 0)
	weak, err := rsa.GenerateKey(rand.Reader, 1024)
	if err != nil {
		t.Fatal(err)
	}
	req := d.request(t)
	req.CSR = csrFor(t, weak)
	req.KeyPublic = forgedKeyPublic(t, d.key.PublicArea(), &weak.PublicKey)
	a := tpmEnroll(t, client(t, st, nil), st, req)
	if a.status != http.StatusBadRequest || !strings.Contains(string(a.body), "RSA key of 1024 bits is too weak") {
		t.Errorf("tpmenroll with an RSA-1024 key = %d %q, want 400 naming the weak key", a.status, a.body)
	}
}

// Finding 4: a token took over a TPM-bound device ID.
func TestAttackTokenTakesOverTPMDevice(t *testing.T) {
	st := stationtest.Start(t, stationtest.Options{AutoApprove: true, Lenient: true})
	d := newTPMDevice(t, 0)
	c, cert := enrolledClient(t, st, d)
	confirm(t, c, st)
	id := cert.Subject.CommonName
	if _, err := st.CreateToken(id, time.Hour); err == nil || !strings.Contains(err.Error(), "bound to a TPM") {
		t.Errorf("token create for TPM-bound %s = %v, want refused as bound to a TPM", id, err)
	}

	// A token made before the device's TPM enrollment is refused in the
	// issuing transaction once the ID is bound.
	m := newTPMDevice(t, 1)
	ek := station.EKHash(m.ek.Certificate.Cert)
	st2 := stationtest.Start(t, stationtest.Options{Lenient: true})
	tok, err := st2.CreateToken("gw-42", time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(st2.Dir, "manifest.txt"), []byte(ek+" gw-42\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	mc, mcert := enrolledClient(t, st2, m)
	confirm(t, mc, st2)
	if mcert.Subject.CommonName != "gw-42" {
		t.Fatalf("manifest device enrolled as %s", mcert.Subject.CommonName)
	}
	soft, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	a := post(t, client(t, st2, nil), st2, est.PathEnroll, est.MediaPKCS10, reenrollBody(t, soft), "gw-42", tok.Secret)
	if a.status == http.StatusOK {
		t.Errorf("simpleenroll with a token for TPM-bound gw-42 = 200: a software key got its certificate")
	}
	// And a manifest entry reserves the ID before the TPM ever shows up.
	st3 := stationtest.Start(t, stationtest.Options{Lenient: true, Manifest: ek + " gw-43\n"})
	if _, err := st3.CreateToken("gw-43", time.Hour); err == nil {
		t.Error("token create for an ID the manifest gives to an EK succeeded")
	}
}

// A token for an ID the station holds for approval of its TPM is
// refused as such (it was an internal error).
func TestTokenForHeldDevice(t *testing.T) {
	st := stationtest.Start(t, stationtest.Options{HoldUnknown: true, Lenient: true})
	d := newTPMDevice(t, 0)
	id := "dev-" + station.EKHash(d.ek.Certificate.Cert)[:16]
	tok, err := st.CreateToken(id, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	if a := tpmEnroll(t, client(t, st, nil), st, d.request(t)); a.status != http.StatusAccepted {
		t.Fatalf("tpmenroll of an unknown EK = %d %s, want 202 (held)", a.status, a.body)
	}
	soft, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	a := post(t, client(t, st, nil), st, est.PathEnroll, est.MediaPKCS10, reenrollBody(t, soft), id, tok.Secret)
	if a.status != http.StatusForbidden || !strings.Contains(string(a.body), "held for approval") {
		t.Errorf("simpleenroll with a token for a held ID = %d %q, want 403 held for approval", a.status, a.body)
	}
}

// Token certificates are told apart from attested ones by policy.
func TestCertificatePolicyNamesHowADeviceEnrolled(t *testing.T) {
	st := stationtest.Start(t, stationtest.Options{AutoApprove: true})
	d := newTPMDevice(t, 0)
	_, tpmCert := enrolledClient(t, st, d)
	tok, err := st.CreateToken("gw-7", time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	soft, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	a := post(t, client(t, st, nil), st, est.PathEnroll, est.MediaPKCS10, reenrollBody(t, soft), "gw-7", tok.Secret)
	if a.status != http.StatusOK {
		t.Fatalf("simpleenroll = %d %s", a.status, a.body)
	}
	tokCert := issuedCert(t, a)
	svc, err := st.IssueService(context.Background(), station.ServiceRequest{Name: "svc", Lifetime: time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		c    *x509.Certificate
		want station.Role
	}{{tpmCert, station.RoleDeviceTPM}, {tokCert, station.RoleDeviceToken}, {svc.Cert, station.RoleService}} {
		if got := station.CertificateRole(tc.c); got != tc.want {
			t.Errorf("CertificateRole(%s) = %v, want %v", tc.c.Subject.CommonName, got, tc.want)
		}
	}
}

// Finding 5: service certificates could not be revoked, and serials the
// registry does not know passed the station's own revocation check.
func TestAttackServiceAndUnknownCertificates(t *testing.T) {
	st := stationtest.Start(t, stationtest.Options{AutoApprove: true})
	svc, err := st.IssueService(context.Background(), station.ServiceRequest{Name: "gw-svc", Lifetime: time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	if !st.CertificateRevoked(svc.Cert) {
		t.Error("a service certificate passed the station's device check")
	}
	a := st.Admin()
	if err := a.RevokeService(context.Background(), "gw-svc"); err != nil {
		t.Fatalf("revoke --service gw-svc: %v", err)
	}
	der, _ := st.CRL()
	crl, _ := x509.ParseRevocationList(der)
	found := false
	for _, e := range crl.RevokedCertificateEntries {
		found = found || e.SerialNumber.Cmp(svc.Cert.SerialNumber) == 0
	}
	if !found {
		t.Error("the revoked service certificate is not on the CRL")
	}
	if err := a.RevokeService(context.Background(), "no-such-svc"); err == nil {
		t.Error("revoking an unknown service succeeded")
	}

	// A certificate signed by the issuing CA that the registry never
	// recorded (a key leak, a bug, a restored backup) is refused.
	keyPEM, err := os.ReadFile(filepath.Join(st.Dir, "ca.key"))
	if err != nil {
		t.Fatal(err)
	}
	blk, _ := pem.Decode(keyPEM)
	caKey, err := x509.ParsePKCS8PrivateKey(blk.Bytes)
	if err != nil {
		t.Fatal(err)
	}
	caCert := st.CACerts()[0]
	k, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	der, err = x509.CreateCertificate(rand.Reader, &x509.Certificate{
		SerialNumber: big.NewInt(424242), Subject: pkix.Name{CommonName: "gw-ghost"},
		URIs:      []*url.URL{station.DeviceURI("gw-ghost")},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
	}, caCert, &k.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	ghost, _ := x509.ParseCertificate(der)
	if !st.CertificateRevoked(ghost) {
		t.Error("a certificate the registry never issued passed the station's check")
	}
	resp, err := client(t, st, &tls.Certificate{Certificate: [][]byte{der}, PrivateKey: k}).Post(st.URL+est.PathReenroll, est.MediaPKCS10, strings.NewReader(string(reenrollBody(t, k))))
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusForbidden {
		t.Errorf("simplereenroll with an unrecorded certificate = %d, want 403", resp.StatusCode)
	}
}

// Finding 6: bad-token requests in parallel on one connection all got
// past the limiter (52 answers of 401 against a limit of 5), each after
// a CA signature.
func TestAttackConcurrentBadTokens(t *testing.T) {
	st := stationtest.Start(t, stationtest.Options{FailuresBeforeSlowdown: 5})
	c := client(t, st, nil)
	c.Transport.(*http.Transport).ForceAttemptHTTP2 = true // one connection, as reproduced
	soft, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	body := reenrollBody(t, soft)
	if _, err := st.CreateToken("gw-1", time.Hour); err != nil {
		t.Fatal(err)
	}
	const n = 200
	status := make(chan int, n)
	var wg sync.WaitGroup
	for range n {
		wg.Go(func() {
			req, _ := http.NewRequest(http.MethodPost, st.URL+est.PathEnroll, strings.NewReader(string(body)))
			req.Header.Set("Content-Type", est.MediaPKCS10)
			req.SetBasicAuth("gw-1", "guess")
			resp, err := c.Do(req)
			if err != nil {
				status <- 0
				return
			}
			resp.Body.Close()
			status <- resp.StatusCode
		})
	}
	wg.Wait()
	close(status)
	// The client's streams go idle a moment after their answers (their
	// body writers finish); until then the station's shutdown waits for
	// the connection.
	time.Sleep(500 * time.Millisecond)
	c.CloseIdleConnections()
	counts := map[int]int{}
	for s := range status {
		counts[s]++
	}
	if counts[http.StatusUnauthorized] > 5 {
		t.Errorf("%d of %d concurrent bad-token requests were answered 401 (worked on), want at most 5; answers %v", counts[http.StatusUnauthorized], n, counts)
	}
}

// Finding 8: the answer told an outsider whether an ID had a token.
func TestAttackTokenAnswersRevealNothing(t *testing.T) {
	st := stationtest.Start(t, stationtest.Options{Lenient: true})
	if _, err := st.CreateToken("gw-has", time.Hour); err != nil {
		t.Fatal(err)
	}
	soft, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	c := client(t, st, nil)
	with := post(t, c, st, est.PathEnroll, est.MediaPKCS10, reenrollBody(t, soft), "gw-has", "guess")
	without := post(t, c, st, est.PathEnroll, est.MediaPKCS10, reenrollBody(t, soft), "gw-none", "guess")
	if with.status != without.status || string(with.body) != string(without.body) {
		t.Errorf("answers differ: with a token %d %q, without %d %q", with.status, with.body, without.status, without.body)
	}
	// The operator's audit log keeps the reason.
	if e := lastAudit(t, st); !strings.Contains(e.Reason, "no token for this device") {
		t.Errorf("audit reason = %q, want the specific reason", e.Reason)
	}
}

// Finding 10: init kept a directory's loose mode.
func TestAttackInitRefusesLooseDirectory(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "st")
	if err := os.Mkdir(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	os.Chmod(dir, 0o755)
	err := station.Init(station.InitOptions{Dir: dir})
	if err == nil || !strings.Contains(err.Error(), "0755") {
		t.Errorf("Init in a 0755 directory = %v, want refused naming the mode", err)
	}
	if _, err := os.Stat(filepath.Join(dir, "root.key")); err == nil {
		t.Error("Init wrote a key into the loose directory")
	}
}

// Finding 10: admin.sock was chmod'ed after bind, so the umask decided
// its mode in between.
func TestAttackAdminSocketMode(t *testing.T) {
	defer syscall.Umask(syscall.Umask(0))
	dir, err := os.MkdirTemp("", "st") // short: the socket path has at most 107 bytes
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	dir = filepath.Join(dir, "s")
	if err := station.Init(station.InitOptions{Dir: dir}); err != nil {
		t.Fatal(err)
	}
	st, err := station.Open(station.Config{Dir: dir})
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	arrived := testdirs.Arrivals(t, dir)
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- st.Serve(ctx, l) }()
	defer func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Serve: %v", err)
		}
	}()
	sock := filepath.Join(dir, "admin.sock")
	testsync.Until(t, 10*time.Second, "admin.sock appears", func() bool { _, err := os.Stat(sock); return err == nil })
	if got := arrived("admin.sock"); !slices.Equal(got, []string{"renamed"}) {
		t.Errorf("admin.sock arrived %q, want only renamed into place", got)
	}
	if fi, err := os.Stat(sock); err != nil || fi.Mode().Perm() != 0o600 {
		t.Errorf("admin.sock: %v, %v; want mode 0600", fi, err)
	}
}
