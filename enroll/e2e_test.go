package enroll_test

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/sha256"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"iotagent.dev/iotagent/enroll"
	"iotagent.dev/iotagent/est"
	"iotagent.dev/iotagent/internal/certpem"
	"iotagent.dev/iotagent/internal/testsync"
	"iotagent.dev/iotagent/station"
	"iotagent.dev/iotagent/station/stationtest"
	"iotagent.dev/iotagent/tpm"
	"iotagent.dev/iotagent/tpm/tpmtest"
)

func TestMain(m *testing.M) { os.Exit(tpmtest.Main(m)) }

// device is one agent under test: its swtpm and state dir.
type device struct {
	sim *tpmtest.Simulator
	tpm *tpm.TPM
	dir string
}

func newDevice(t *testing.T, opts tpmtest.Options) *device {
	t.Helper()
	sim := tpmtest.Start(t, opts)
	return &device{sim: sim, tpm: sim.Open(t), dir: t.TempDir()}
}

func (d *device) enroll(t *testing.T, st *stationtest.Station, token string) (*enroll.EnrollResult, error) {
	t.Helper()
	pin, err := enroll.ParsePin(st.Fingerprint)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	return enroll.Enroll(ctx, enroll.EnrollConfig{TPM: d.tpm, Dir: d.dir, Station: st.URL, Pin: pin, Token: token})
}

func (d *device) mustEnroll(t *testing.T, st *stationtest.Station) *enroll.State {
	t.Helper()
	res, err := d.enroll(t, st, "")
	if err != nil {
		t.Fatalf("Enroll: %v", err)
	}
	return res.State
}

func TestEnrollThreeDevices(t *testing.T) {
	st := stationtest.Start(t, stationtest.Options{AutoApprove: true})
	ids := map[string]bool{}
	for i := range 3 {
		d := newDevice(t, tpmtest.Options{Identity: i})
		s := d.mustEnroll(t, st)
		if ids[s.Enrollment.DeviceID] {
			t.Fatalf("device %d got the ID %s of another device", i, s.Enrollment.DeviceID)
		}
		ids[s.Enrollment.DeviceID] = true
		if s.Enrollment.Method != "tpmenroll" {
			t.Errorf("method = %s, want tpmenroll", s.Enrollment.Method)
		}
		// The certified key is the TPM key.
		k, err := d.tpm.LoadKey(s.Key)
		if err != nil {
			t.Fatal(err)
		}
		if !k.Public().(*ecdsa.PublicKey).Equal(s.Leaf().PublicKey) {
			t.Errorf("device %d: certificate key is not the TPM key", i)
		}
		k.Close()
		// OpenSSL, independently, accepts the chain.
		out, err := exec.Command("openssl", "verify", "-CAfile", st.RootFile,
			"-untrusted", filepath.Join(st.Dir, "ca.crt"), "-purpose", "sslclient",
			filepath.Join(d.dir, "cert.pem")).CombinedOutput()
		if err != nil || !strings.Contains(string(out), ": OK") {
			t.Errorf("openssl verify: %v\n%s", err, out)
		}
		for _, f := range []string{"cert.pem", "trust.pem", "device-key.json", "enrollment.json"} {
			fi, err := os.Stat(filepath.Join(d.dir, f))
			if err != nil || fi.Mode().Perm() != 0o600 {
				t.Errorf("%s: mode %v, %v; want 0600", f, fi.Mode().Perm(), err)
			}
		}
		// Enrolling again is a no-op.
		res, err := d.enroll(t, st, "")
		if err != nil || !res.Already {
			t.Errorf("second Enroll = already %v, %v; want already enrolled", res != nil && res.Already, err)
		}
	}
	devs, err := st.Devices()
	if err != nil || len(devs) != 3 {
		t.Fatalf("registry has %d devices, %v; want 3", len(devs), err)
	}
	for _, dv := range devs {
		if len(dv.EKSHA256) != 64 || dv.Status != station.StatusEnrolled {
			t.Errorf("registry entry %+v", dv)
		}
	}
}

func TestEnrollWithTokenWhenNoEKCertificate(t *testing.T) {
	st := stationtest.Start(t, stationtest.Options{})
	d := newDevice(t, tpmtest.Options{NoEKCertificate: true, Identity: 5})

	_, err := d.enroll(t, st, "")
	if !errors.Is(err, tpm.ErrNoEK) || !strings.Contains(err.Error(), "--token") {
		t.Fatalf("Enroll without EK certificate or token = %v, want ErrNoEK telling to use --token", err)
	}
	tok, err := st.CreateToken("gw-token-1", time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	res, err := d.enroll(t, st, tok.Credential())
	if err != nil {
		t.Fatalf("Enroll with token: %v", err)
	}
	if res.State.Enrollment.DeviceID != "gw-token-1" || res.State.Enrollment.Method != "simpleenroll" {
		t.Errorf("enrollment = %+v, want gw-token-1 by simpleenroll", res.State.Enrollment)
	}
	// The token was consumed: a second device cannot use it.
	d2 := newDevice(t, tpmtest.Options{NoEKCertificate: true, Identity: 5})
	if _, err := d2.enroll(t, st, tok.Credential()); err == nil || !strings.Contains(err.Error(), "401") {
		t.Errorf("reused token = %v, want 401", err)
	}

	// Without an EK, renewal keeps the key (simplereenroll).
	r := newRenewer(t, d, enroll.RenewerConfig{})
	before := r.Identity().Leaf()
	if err := r.RenewNow(context.Background()); err != nil {
		t.Fatalf("RenewNow: %v", err)
	}
	after := r.Identity().Leaf()
	if after.SerialNumber.Cmp(before.SerialNumber) == 0 || !pubEqual(after, before) {
		t.Error("token-enrolled device: renewal should give a new certificate for the same key")
	}
}

func pubEqual(a, b *x509.Certificate) bool {
	return a.PublicKey.(*ecdsa.PublicKey).Equal(b.PublicKey)
}

func newRenewer(t *testing.T, d *device, cfg enroll.RenewerConfig) *enroll.Renewer {
	t.Helper()
	cfg.TPM, cfg.Dir = d.tpm, d.dir
	r, err := enroll.NewRenewer(cfg)
	if err != nil {
		t.Fatalf("NewRenewer: %v", err)
	}
	t.Cleanup(func() { r.Close() })
	return r
}

// keyID names a public key for comparisons.
func keyID(c *x509.Certificate) string {
	s := sha256.Sum256(c.RawSubjectPublicKeyInfo)
	return fmt.Sprintf("%x", s[:8])
}

// watchState checks, as often as it can until stop, the invariant of key
// rotation: the key certified by cert.pem always has its blobs on disk (as
// the current key or the rotated key awaiting commit). The files are read
// as a consistent snapshot: cert.pem before and after the key files, and
// the snapshot is retaken if it changed in between.
func watchState(t *testing.T, dir string, stop <-chan struct{}) <-chan int {
	checks := make(chan int, 1)
	certified := func() (*x509.Certificate, bool, bool) {
		before, err := os.ReadFile(filepath.Join(dir, "cert.pem"))
		if err != nil {
			t.Errorf("cert.pem unreadable mid-run: %v", err)
			return nil, false, true
		}
		var keys []*tpm.KeyFile
		for _, f := range []string{"device-key.json", "device-key.next.json"} {
			if kf, err := tpm.ReadKeyFile(filepath.Join(dir, f)); err == nil {
				keys = append(keys, kf)
			}
		}
		after, _ := os.ReadFile(filepath.Join(dir, "cert.pem"))
		if !bytes.Equal(before, after) {
			return nil, false, false // changed under us: not a snapshot
		}
		certs, err := certpem.Parse(after)
		if err != nil {
			t.Errorf("cert.pem: %v", err)
			return nil, false, true
		}
		for _, kf := range keys {
			if pk, err := kf.PublicKey(); err == nil && pk.(*ecdsa.PublicKey).Equal(certs[0].PublicKey) {
				return certs[0], true, true
			}
		}
		return certs[0], false, true
	}
	go func() {
		n := 0
		defer func() { checks <- n }()
		for {
			select {
			case <-stop:
				return
			default:
			}
			ok, consistent := false, false
			// The key rename follows the certificate write: a snapshot
			// taken between them is retaken once the rename is done.
			for try := 0; try < 50 && !ok; try++ {
				_, ok, consistent = certified()
				if !ok {
					time.Sleep(time.Millisecond)
				}
			}
			if consistent && !ok {
				t.Errorf("cert.pem certifies a key whose blobs are not on disk")
				return
			}
			n++
			time.Sleep(5 * time.Millisecond)
		}
	}()
	return checks
}

// Certificates of 30 s, an agent running for 2 minutes: at least three
// renewals, each with a new TPM key, blobs of the certified key always on
// disk, no TPM handles leaked (tpmtest checks at cleanup).
func TestRotationRenewsWithNewKeys(t *testing.T) {
	t.Parallel()
	st := stationtest.Start(t, stationtest.Options{AutoApprove: true, CertLifetime: 30 * time.Second})
	d := newDevice(t, tpmtest.Options{})
	d.mustEnroll(t, st)
	r := newRenewer(t, d, enroll.RenewerConfig{Recheck: time.Second})

	keys := map[string]bool{keyID(r.Identity().Leaf()): true}
	serials := map[string]bool{}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	stop := make(chan struct{})
	checks := watchState(t, d.dir, stop)
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			ch := r.Identity().Changed()
			select {
			case <-ctx.Done():
				return
			case <-ch:
				leaf := r.Identity().Leaf()
				if keys[keyID(leaf)] {
					t.Errorf("renewal %s reused a key", leaf.SerialNumber.Text(16))
				}
				keys[keyID(leaf)] = true
				serials[leaf.SerialNumber.Text(16)] = true
			}
		}
	}()
	if err := r.Run(ctx); err != nil {
		t.Fatalf("Run: %v", err)
	}
	wg.Wait()
	close(stop)
	n := <-checks
	if len(serials) < 3 {
		t.Errorf("%d renewals in 2 minutes with 30 s certificates, want at least 3", len(serials))
	}
	if n < 100 {
		t.Errorf("state invariant checked only %d times", n)
	}
	if _, err := os.Stat(filepath.Join(d.dir, "device-key.next.json")); !errors.Is(err, os.ErrNotExist) {
		t.Error("a rotated key file was left behind")
	}
	hs, err := d.tpm.TransientHandles()
	if err != nil || len(hs) != 1 {
		t.Errorf("transient handles while the agent holds its key = %v, %v; want exactly 1", hs, err)
	}
	if rs := r.Status(); rs.Renewals != len(serials) || rs.LastError != "" {
		t.Errorf("status = %+v, want %d renewals and no error", rs, len(serials))
	}
}

// The station is down when renewal is due: the agent keeps its
// certificate, retries with backoff, and renews when the station returns.
// Then the certificate expires while the station is down: the agent
// re-attests when it returns.
func TestStationDownThenExpiredWhileOffline(t *testing.T) {
	t.Parallel()
	st := stationtest.Start(t, stationtest.Options{AutoApprove: true, CertLifetime: 12 * time.Second})
	d := newDevice(t, tpmtest.Options{})
	d.mustEnroll(t, st)
	r := newRenewer(t, d, enroll.RenewerConfig{Recheck: 200 * time.Millisecond, BackoffBase: 200 * time.Millisecond, BackoffCap: time.Second})
	ctx, cancel := context.WithCancel(context.Background())
	runDone := make(chan error, 1)
	go func() { runDone <- r.Run(ctx) }()
	defer func() {
		cancel()
		if err := <-runDone; err != nil {
			t.Errorf("Run: %v", err)
		}
	}()

	st.Stop()
	first := r.Identity().Leaf()
	testsync.Until(t, 20*time.Second, "failed renewal attempts", func() bool { return r.Status().Failures >= 2 })
	if got := r.Identity().Leaf(); got.SerialNumber.Cmp(first.SerialNumber) != 0 {
		t.Fatal("certificate changed while the station was down")
	}
	if rs := r.Status(); !strings.Contains(rs.LastError, "connection refused") {
		t.Errorf("last error = %q, want connection refused", rs.LastError)
	}
	st.Restart()
	testsync.Until(t, 20*time.Second, "renewal after the station returned", func() bool {
		return r.Identity().Leaf().SerialNumber.Cmp(first.SerialNumber) != 0
	})

	// Down again, until the certificate has expired.
	st.Stop()
	second := r.Identity().Leaf()
	testsync.Until(t, 30*time.Second, "certificate expiry", func() bool { return time.Now().After(second.NotAfter) })
	if got := r.Identity().Leaf(); got.SerialNumber.Cmp(second.SerialNumber) != 0 {
		t.Fatal("certificate changed while the station was down")
	}
	st.Restart()
	testsync.Until(t, 20*time.Second, "re-attestation after expiry", func() bool {
		return r.Identity().Leaf().SerialNumber.Cmp(second.SerialNumber) != 0
	})
	if got := r.Identity().Leaf(); !time.Now().Before(got.NotAfter) {
		t.Error("the certificate after re-attestation is not valid")
	}
	audit, _ := os.ReadFile(filepath.Join(st.Dir, "audit.log"))
	if !strings.Contains(string(audit), `"event":"tpmenroll","result":"accepted"`) {
		t.Error("audit log lacks the re-attestation")
	}
}

func TestRevokedDeviceIsListedAndRefused(t *testing.T) {
	st := stationtest.Start(t, stationtest.Options{AutoApprove: true})
	d := newDevice(t, tpmtest.Options{})
	s := d.mustEnroll(t, st)
	if err := st.Revoke(s.Enrollment.DeviceID); err != nil {
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
	listed := false
	for _, e := range crl.RevokedCertificateEntries {
		if e.SerialNumber.Cmp(s.Leaf().SerialNumber) == 0 {
			listed = true
		}
	}
	if !listed {
		t.Errorf("CRL does not list the revoked serial %s", s.Leaf().SerialNumber.Text(16))
	}
	if err := crl.CheckSignatureFrom(st.CACerts()[0]); err != nil {
		t.Errorf("CRL signature: %v", err)
	}

	r := newRenewer(t, d, enroll.RenewerConfig{})
	err = r.RenewNow(context.Background())
	var se *enroll.StatusError
	if !errors.As(err, &se) || se.Code != 403 || !strings.Contains(se.Message, "revoked") {
		t.Fatalf("renewal of a revoked device = %v, want 403 revoked", err)
	}
	// The fallback, re-attestation, is refused too.
	err = r.RenewNow(context.Background())
	if !errors.As(err, &se) || se.Code != 403 || !strings.Contains(se.Message, "is revoked") {
		t.Fatalf("re-attestation of a revoked device = %v, want 403 device revoked", err)
	}
}

// A gateway that boots with its clock at 1970 enrolls (the build time is
// its floor; the station's authenticated Date header teaches it the time),
// schedules its renewal from that time, and renews.
func TestEnrollWithClockAt1970(t *testing.T) {
	st := stationtest.Start(t, stationtest.Options{AutoApprove: true})
	d := newDevice(t, tpmtest.Options{})
	start := time.Now()
	wall := func() time.Time { return time.Unix(0, 0).Add(time.Since(start)) }
	buildTime := time.Now().Add(-30 * 24 * time.Hour)
	clock := enroll.NewClock(wall, buildTime)
	pin, _ := enroll.ParsePin(st.Fingerprint)
	res, err := enroll.Enroll(context.Background(), enroll.EnrollConfig{TPM: d.tpm, Dir: d.dir, Station: st.URL, Pin: pin, Clock: clock})
	if err != nil {
		t.Fatalf("Enroll with the wall clock at 1970: %v", err)
	}
	if skew := time.Until(clock.Now()); skew < -5*time.Second || skew > 5*time.Second {
		t.Errorf("clock after enrollment is off by %v; it should have learned the station's time", skew)
	}
	floor, err := enroll.LoadClockFloor(d.dir)
	if err != nil || floor.Before(start.Add(-5*time.Second)) {
		t.Errorf("persisted trusted time = %v, %v; want about now", floor, err)
	}

	// A restart: the wall clock still reads 1970; the persisted floor
	// carries the agent until the station is reached again.
	clock2 := enroll.NewClock(wall, buildTime, floor)
	r := newRenewer(t, d, enroll.RenewerConfig{Clock: clock2})
	leaf := res.State.Leaf()
	due := enroll.RenewalTime(leaf.NotBefore, leaf.NotAfter, 0)
	if !due.After(time.Now()) {
		t.Fatalf("renewal due at %v, before now", due)
	}
	if err := r.RenewNow(context.Background()); err != nil {
		t.Fatalf("RenewNow with the wall clock at 1970: %v", err)
	}
	next := r.Status().NextRenewal
	if next.Year() < 2020 || !next.After(time.Now()) {
		t.Errorf("next renewal scheduled at %v, want in the future of the real time", next)
	}
}

// An agent held for approval waits (honouring Retry-After) instead of
// failing, and says so when it gives up.
func TestEnrollWaitsForApproval(t *testing.T) {
	st := stationtest.Start(t, stationtest.Options{HoldUnknown: true})
	d := newDevice(t, tpmtest.Options{})
	pin, _ := enroll.ParsePin(st.Fingerprint)
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	defer cancel()
	_, err := enroll.Enroll(ctx, enroll.EnrollConfig{TPM: d.tpm, Dir: d.dir, Station: st.URL, Pin: pin})
	if !errors.Is(err, context.DeadlineExceeded) || !strings.Contains(err.Error(), "awaiting approval") {
		t.Fatalf("Enroll while held = %v, want the deadline while awaiting approval", err)
	}
	devs, _ := st.Devices()
	if len(devs) != 1 || devs[0].Status != station.StatusPending {
		t.Fatalf("registry = %+v", devs)
	}
	st.Approve(devs[0].ID)
	if _, err := d.enroll(t, st, ""); err != nil {
		t.Fatalf("Enroll after approval: %v", err)
	}
}

// The manifest names devices by EK (the hash iotagent tpm info prints);
// a device ID stays bound to the EK that first enrolled it, even if the
// manifest is later edited to give it to another TPM.
func TestManifestNamesDevicesAndBindsEK(t *testing.T) {
	a := newDevice(t, tpmtest.Options{Identity: 0})
	b := newDevice(t, tpmtest.Options{Identity: 1})
	ekHash := func(d *device) string {
		eks, err := d.tpm.EndorsementKeys()
		if err != nil {
			t.Fatal(err)
		}
		return est.EKHash(eks[0].Certificate.Cert)
	}
	st := stationtest.Start(t, stationtest.Options{Manifest: ekHash(a) + " gw-factory-17\n"})
	s := a.mustEnroll(t, st)
	if s.Enrollment.DeviceID != "gw-factory-17" || s.Leaf().Subject.CommonName != "gw-factory-17" {
		t.Fatalf("device ID = %s, want gw-factory-17 from the manifest", s.Enrollment.DeviceID)
	}
	// The operator edits the manifest (picked up without a restart) and
	// gives the ID to TPM B.
	time.Sleep(10 * time.Millisecond)
	if err := os.WriteFile(filepath.Join(st.Dir, "manifest.txt"), []byte(ekHash(b)+" gw-factory-17\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	_, err := b.enroll(t, st, "")
	var se *enroll.StatusError
	if !errors.As(err, &se) || se.Code != 403 || !strings.Contains(se.Message, "bound to another EK") {
		t.Fatalf("enrolling TPM B under A's device ID = %v, want 403 bound to another EK", err)
	}
}

// blackHole accepts TCP connections on loopback and never answers: a
// station whose process hangs, or a link that swallows everything after
// the SYN. It returns the address and a channel that receives each
// accepted connection.
func blackHole(t *testing.T) (string, <-chan net.Conn) {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	accepted := make(chan net.Conn, 16)
	var conns []net.Conn
	var mu sync.Mutex
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			conns = append(conns, c)
			mu.Unlock()
			select {
			case accepted <- c:
			default:
			}
		}
	}()
	t.Cleanup(func() {
		l.Close()
		mu.Lock()
		defer mu.Unlock()
		for _, c := range conns {
			c.Close()
		}
	})
	return l.Addr().String(), accepted
}

// setStation points an enrolled state dir at another station URL.
func setStation(t *testing.T, dir, url string) {
	t.Helper()
	p := filepath.Join(dir, "enrollment.json")
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	var en map[string]any
	if err := json.Unmarshal(b, &en); err != nil {
		t.Fatal(err)
	}
	en["station"] = url
	if b, err = json.Marshal(en); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(p, b, 0o600); err != nil {
		t.Fatal(err)
	}
}

// Status never waits on the network: while an attempt hangs on a station
// that accepts the connection and never answers, Status (what the agent's
// health telemetry reads every interval) answers at once.
func TestStatusDoesNotWaitOnTheStation(t *testing.T) {
	st := stationtest.Start(t, stationtest.Options{AutoApprove: true})
	d := newDevice(t, tpmtest.Options{})
	d.mustEnroll(t, st)
	addr, accepted := blackHole(t)
	setStation(t, d.dir, "https://"+addr)
	r := newRenewer(t, d, enroll.RenewerConfig{})

	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- r.RenewNow(ctx) }()
	defer func() {
		cancel()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			t.Error("RenewNow did not return after its context ended")
		}
	}()
	select {
	case <-accepted:
	case <-time.After(10 * time.Second):
		t.Fatal("the renewal attempt never reached the station")
	}
	got := make(chan enroll.RenewalStatus, 1)
	go func() { got <- r.Status() }()
	select {
	case <-got:
	case <-time.After(2 * time.Second):
		t.Fatal("Status() is still waiting 2s into an attempt that hangs on the network")
	}
}

// The live identity carries the trust bundle, and a renewal refreshes it
// from the station: what lets a CA rollover reach running uplinks, which
// read Identity.RootCAs at each handshake. Here the stored bundle lacks
// the issuing CA until the renewal brings it back.
func TestRenewalRefreshesIdentityRoots(t *testing.T) {
	st := stationtest.Start(t, stationtest.Options{AutoApprove: true})
	d := newDevice(t, tpmtest.Options{})
	s := d.mustEnroll(t, st)
	if len(s.Trust) < 2 {
		t.Fatalf("trust bundle has %d certificates; the test needs the root and the issuing CA", len(s.Trust))
	}
	var rootOnly []byte
	for _, c := range s.Trust {
		if c.Subject.String() == c.Issuer.String() {
			rootOnly = pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: c.Raw})
		}
	}
	if err := os.WriteFile(filepath.Join(d.dir, "trust.pem"), rootOnly, 0o600); err != nil {
		t.Fatal(err)
	}
	r := newRenewer(t, d, enroll.RenewerConfig{})
	full := s.TrustPool()
	if r.Identity().RootCAs().Equal(full) {
		t.Fatal("the identity's roots already hold the whole bundle; the test proves nothing")
	}
	if err := r.RenewNow(context.Background()); err != nil {
		t.Fatal(err)
	}
	if !r.Identity().RootCAs().Equal(full) {
		t.Error("after a renewal the identity's roots are not the station's current CA certificates")
	}
}

// A key rotation in progress belongs to the state dir's owner: LoadState,
// which iotagent status and renew call beside the running agent, changes
// nothing. Only the owner (a Renewer, Enroll) completes or abandons a
// rotation left by a crash. (LoadState used to delete a rotated key still
// waiting for its certificate: a status call during a renewal made the
// new certificate's key unloadable after the next restart.)
func TestRotationRecoveryOnlyByTheOwner(t *testing.T) {
	st := stationtest.Start(t, stationtest.Options{AutoApprove: true})
	d := newDevice(t, tpmtest.Options{})
	s := d.mustEnroll(t, st)
	cur := filepath.Join(d.dir, "device-key.json")
	next := filepath.Join(d.dir, "device-key.next.json")
	pending, err := d.tpm.CreateKey()
	if err != nil {
		t.Fatal(err)
	}

	t.Run("rotated key awaiting its certificate", func(t *testing.T) {
		if err := tpm.WriteKeyFile(next, pending); err != nil {
			t.Fatal(err)
		}
		if _, err := enroll.LoadState(d.dir); err != nil {
			t.Fatal(err)
		}
		if _, err := os.Stat(next); err != nil {
			t.Fatalf("LoadState removed the rotation in progress: %v", err)
		}
		newRenewer(t, d, enroll.RenewerConfig{}).Close()
		if _, err := os.Stat(next); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("the owner kept a rotated key that never got its certificate: %v", err)
		}
	})

	t.Run("certificate stored, key not yet renamed", func(t *testing.T) {
		// The certified key waits as device-key.next.json; the old one is
		// still in place.
		if err := os.Rename(cur, next); err != nil {
			t.Fatal(err)
		}
		if err := tpm.WriteKeyFile(cur, pending); err != nil {
			t.Fatal(err)
		}
		got, err := enroll.LoadState(d.dir)
		if err != nil {
			t.Fatal(err)
		}
		if want, _ := tpm.ReadKeyFile(next); !bytes.Equal(got.Key.Public, want.Public) {
			t.Error("LoadState did not report the certified (rotated) key")
		}
		if _, err := os.Stat(next); err != nil {
			t.Fatalf("LoadState completed the rotation itself: %v", err)
		}
		r := newRenewer(t, d, enroll.RenewerConfig{})
		if _, err := os.Stat(next); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("the owner did not complete the rotation: %v", err)
		}
		kf, err := tpm.ReadKeyFile(cur)
		if err != nil {
			t.Fatal(err)
		}
		if pk, _ := kf.PublicKey(); !pk.(*ecdsa.PublicKey).Equal(s.Leaf().PublicKey) {
			t.Error("after recovery device-key.json is not the certified key")
		}
		r.Close()
	})
}
