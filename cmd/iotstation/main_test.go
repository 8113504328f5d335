package main

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"iotagent.dev/iotagent/est"
	"iotagent.dev/iotagent/internal/certpem"
	"iotagent.dev/iotagent/station"
	"iotagent.dev/iotagent/tpm/tpmtest"
)

func TestMain(m *testing.M) { os.Exit(tpmtest.Main(m)) }

func stationCLI(t *testing.T, args ...string) (int, string, string) {
	t.Helper()
	var out, errb bytes.Buffer
	code := run(context.Background(), args, &out, &errb)
	return code, out.String(), errb.String()
}

func shortDir(t *testing.T) string {
	t.Helper()
	d, err := os.MkdirTemp("", "stcli")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(d) })
	return filepath.Join(d, "st")
}

func TestStationCLI(t *testing.T) {
	dir := shortDir(t)
	roots := filepath.Join(t.TempDir(), "roots.pem")
	os.WriteFile(roots, append(tpmtest.ManufacturerRootPEM(t), tpmtest.ManufacturerIntermediatePEM(t)...), 0o600)

	code, out, errs := stationCLI(t, "init", "--dir", dir, "--tpm-roots", roots, "--san", "127.0.0.1", "--cert-lifetime", "1h")
	if code != 0 || !strings.Contains(out, "root fingerprint: sha256:") {
		t.Fatalf("init = %d, %q, %q", code, out, errs)
	}
	for _, f := range []string{"root.key", "ca.key", "tls.key"} {
		fi, err := os.Stat(filepath.Join(dir, f))
		if err != nil || fi.Mode().Perm() != 0o600 {
			t.Errorf("%s mode = %v, %v; want 0600", f, fi.Mode().Perm(), err)
		}
	}
	_, fp, _ := stationCLI(t, "fingerprint", "--dir", dir)
	if !strings.HasPrefix(fp, "sha256:") || !strings.Contains(out, strings.TrimSpace(fp)) {
		t.Errorf("fingerprint = %q, init said %q", fp, out)
	}

	// Without a running station the commands open the directory.
	code, out, errs = stationCLI(t, "token", "create", "--dir", dir, "--device", "gw-1", "--ttl", "2h")
	lines := strings.Split(strings.TrimSpace(out), "\n")
	if code != 0 || !strings.HasPrefix(lines[len(lines)-1], "gw-1:") {
		t.Fatalf("token create = %d, %q, %q; want DEVICE:SECRET on the last line", code, out, errs)
	}

	// Serving: the same commands go through the admin socket.
	ctx, cancel := context.WithCancel(context.Background())
	ready := make(chan string, 1)
	done := make(chan int)
	var serr bytes.Buffer
	go func() {
		done <- runWith(ctx, &env{stdout: &bytes.Buffer{}, stderr: &serr, ready: func(a string) { ready <- a }},
			[]string{"serve", "--dir", dir, "--listen", "127.0.0.1:0"})
	}()
	select {
	case <-ready:
	case code := <-done:
		t.Fatalf("serve exited %d: %s", code, serr.String())
	}
	waitSock(t, filepath.Join(dir, "admin.sock"))
	code, out, errs = stationCLI(t, "token", "create", "--dir", dir, "--device", "gw-2")
	if code != 0 || !strings.Contains(out, "gw-2:") {
		t.Errorf("token create while serving = %d, %q, %q", code, out, errs)
	}
	code, out, _ = stationCLI(t, "devices", "--dir", dir, "--json")
	var devs []station.Device
	if code != 0 || json.Unmarshal([]byte(out), &devs) != nil || len(devs) != 0 {
		t.Errorf("devices --json = %d, %q; want []", code, out)
	}
	code, _, errs = stationCLI(t, "revoke", "--dir", dir, "gw-nope")
	if code != 1 || !strings.Contains(errs, `unknown device "gw-nope"`) {
		t.Errorf("revoke unknown = %d, %q", code, errs)
	}
	// Service certificates for a broker and a backend reader.
	prefix := filepath.Join(t.TempDir(), "broker")
	code, out, errs = stationCLI(t, "issue", "--dir", dir, "--name", "broker", "--server", "--san", "127.0.0.1", "--out", prefix)
	if code != 0 || !strings.Contains(out, "issued broker") {
		t.Fatalf("issue = %d, %q, %q", code, out, errs)
	}
	chain, err := certpem.ReadFile(prefix + ".crt")
	if err != nil || len(chain) != 2 || chain[0].Subject.CommonName != "broker" || len(chain[0].IPAddresses) != 1 {
		t.Errorf("broker.crt = %d certificates, %v", len(chain), err)
	}
	if fi, err := os.Stat(prefix + ".key"); err != nil || fi.Mode().Perm() != 0o600 {
		t.Errorf("broker.key mode = %v, %v", fi.Mode().Perm(), err)
	}
	if trust, err := certpem.ReadFile(prefix + "-ca.pem"); err != nil || len(trust) != 2 {
		t.Errorf("broker-ca.pem = %d certificates, %v", len(trust), err)
	}
	// A service is revoked by name: its certificates go on the CRL.
	code, out, errs = stationCLI(t, "revoke", "--dir", dir, "--service", "broker")
	if code != 0 || !strings.Contains(out, "revoked service broker") {
		t.Errorf("revoke --service broker = %d, %q, %q", code, out, errs)
	}
	if crl := readCRL(t, dir); len(crl.RevokedCertificateEntries) != 1 || crl.RevokedCertificateEntries[0].SerialNumber.Cmp(chain[0].SerialNumber) != 0 {
		t.Errorf("CRL after revoke --service broker = %+v, want the broker's serial", crl.RevokedCertificateEntries)
	}
	code, _, errs = stationCLI(t, "revoke", "--dir", dir, "--service", "gw-nope")
	if code != 1 || !strings.Contains(errs, `unknown service "gw-nope"`) {
		t.Errorf("revoke --service unknown = %d, %q", code, errs)
	}
	code, _, errs = stationCLI(t, "revoke", "--dir", dir, "--service", "broker", "gw-1")
	if code != 2 || !strings.Contains(errs, "want one of") {
		t.Errorf("revoke with both = %d, %q", code, errs)
	}
	// One certificate by serial, even one the registry never recorded.
	code, out, errs = stationCLI(t, "revoke", "--dir", dir, "--serial", "0xABCDEF0123")
	if code != 0 || !strings.Contains(out, "revoked certificate") {
		t.Errorf("revoke --serial = %d, %q, %q", code, out, errs)
	}
	found := false
	for _, e := range readCRL(t, dir).RevokedCertificateEntries {
		found = found || e.SerialNumber.Text(16) == "abcdef0123"
	}
	if !found {
		t.Error("the serial revoked with --serial is not on the CRL")
	}
	code, _, errs = stationCLI(t, "revoke", "--dir", dir, "--serial", "xyz")
	if code != 1 || !strings.Contains(errs, "want the certificate's serial number in hex") {
		t.Errorf("revoke --serial xyz = %d, %q", code, errs)
	}
	code, _, errs = stationCLI(t, "issue", "--dir", dir, "--name", "x", "--server", "--out", prefix)
	if code != 2 || !strings.Contains(errs, "needs at least one --san") {
		t.Errorf("issue --server without --san = %d, %q", code, errs)
	}
	cancel()
	if code := <-done; code != 0 {
		t.Errorf("serve exited %d: %s", code, serr.String())
	}
	if _, err := os.Stat(filepath.Join(dir, "admin.sock")); !os.IsNotExist(err) {
		t.Error("admin socket left behind")
	}
}

func readCRL(t *testing.T, dir string) *x509.RevocationList {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(dir, "crl.pem"))
	if err != nil {
		t.Fatal(err)
	}
	blk, _ := pem.Decode(b)
	if blk == nil {
		t.Fatal("crl.pem: no PEM")
	}
	crl, err := x509.ParseRevocationList(blk.Bytes)
	if err != nil {
		t.Fatal(err)
	}
	return crl
}

func waitSock(t *testing.T, p string) {
	t.Helper()
	for i := 0; i < 200; i++ {
		if _, err := os.Stat(p); err == nil {
			return
		}
		time.Sleep(10 * time.Millisecond)
	}
	t.Fatalf("%s did not appear", p)
}

func TestStationCLIBadInput(t *testing.T) {
	dir := shortDir(t)
	if code, _, errs := stationCLI(t, "init", "--dir", dir); code != 0 {
		t.Fatalf("init: %s", errs)
	}
	badManifest := filepath.Join(t.TempDir(), "m.txt")
	os.WriteFile(badManifest, []byte("abc gw-1\n"), 0o600)
	for _, tc := range []struct {
		name string
		args []string
		code int
		want string
	}{
		{"no command", nil, 2, "no command given"},
		{"unknown command", []string{"frob"}, 2, `unknown command "frob"`},
		{"no dir", []string{"devices"}, 2, "--dir is required"},
		{"init twice", []string{"init", "--dir", dir}, 1, "already initialized"},
		{"missing roots file", []string{"init", "--dir", shortDir(t), "--tpm-roots", "/nonexistent.pem"}, 1, "/nonexistent.pem"},
		{"bad manifest", []string{"init", "--dir", shortDir(t), "--manifest", badManifest}, 1, "line 1: \"abc\" is not a SHA-256"},
		{"short lifetime", []string{"init", "--dir", shortDir(t), "--cert-lifetime", "1s"}, 2, "too short"},
		{"not a station dir", []string{"devices", "--dir", t.TempDir()}, 1, "is not a station directory"},
		{"token without device", []string{"token", "create", "--dir", dir}, 2, "--device is required"},
		{"token bad device id", []string{"token", "create", "--dir", dir, "--device", "a/b"}, 2, `device ID "a/b"`},
		{"token ttl too long", []string{"token", "create", "--dir", dir, "--device", "gw", "--ttl", "9999h"}, 2, "at most"},
		{"revoke without id", []string{"revoke", "--dir", dir}, 2, "want one of a device ID, --service NAME or --serial HEX"},
		{"watch without broker", []string{"watch", "--dir", dir}, 2, "--broker is required"},
		{"watch without dir or credentials", []string{"watch", "--broker", "mqtts://127.0.0.1:1"}, 2, "--cert, --key and --ca are required without --dir"},
		{"watch cert without key", []string{"watch", "--dir", dir, "--broker", "mqtts://127.0.0.1:1", "--cert", "c.pem"}, 2, "--cert and --key go together"},
		{"watch not a station dir", []string{"watch", "--dir", t.TempDir(), "--broker", "mqtts://127.0.0.1:1"}, 1, "is not a station directory"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			code, _, errs := stationCLI(t, tc.args...)
			last := strings.TrimSpace(errs)
			if i := strings.LastIndex(last, "\n"); i >= 0 {
				last = last[i+1:]
			}
			if code != tc.code || !strings.HasPrefix(last, "iotstation: ") || !strings.Contains(last, tc.want) {
				t.Errorf("= %d, %q; want %d and 'iotstation: …%s…'", code, errs, tc.code, tc.want)
			}
		})
	}
}

// serveCLI runs iotstation serve on dir with extra flags until the test
// ends and returns its HTTPS address once the admin socket is up.
func serveCLI(t *testing.T, dir string, flags ...string) string {
	t.Helper()
	addr, _ := serveCLIStop(t, dir, flags...)
	return addr
}

// serveCLIStop is serveCLI that also returns a function stopping serve
// before the test ends; serve must exit 0.
func serveCLIStop(t *testing.T, dir string, flags ...string) (string, func()) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	ready := make(chan string, 1)
	done := make(chan int, 1)
	var serr bytes.Buffer
	go func() {
		done <- runWith(ctx, &env{stdout: &bytes.Buffer{}, stderr: &serr, ready: func(a string) { ready <- a }},
			append([]string{"serve", "--dir", dir, "--listen", "127.0.0.1:0"}, flags...))
	}()
	var addr string
	select {
	case addr = <-ready:
	case code := <-done:
		cancel()
		t.Fatalf("serve exited %d: %s", code, serr.String())
	case <-time.After(30 * time.Second):
		cancel()
		t.Fatal("serve did not start")
	}
	stop := sync.OnceFunc(func() {
		cancel()
		if code := <-done; code != 0 {
			t.Errorf("serve exited %d: %s", code, serr.String())
		}
	})
	t.Cleanup(stop)
	waitSock(t, filepath.Join(dir, "admin.sock"))
	return addr, stop
}

// tpmEnrollCLI enrolls a fresh swtpm's key through /tpmenroll at addr and
// returns the HTTP status, the body and, on 200, the certificate the TPM
// recovered, and the EK certificate.
func tpmEnrollCLI(t *testing.T, dir, addr string) (int, string, *x509.Certificate, *x509.Certificate) {
	t.Helper()
	tp := tpmtest.Start(t, tpmtest.Options{}).Open(t)
	kf, err := tp.CreateKey()
	if err != nil {
		t.Fatal(err)
	}
	key, err := tp.LoadKey(kf)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { key.Close() })
	eks, err := tp.EndorsementKeys()
	if err != nil {
		t.Fatal(err)
	}
	ek := eks[0]
	csr, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{}, key)
	if err != nil {
		t.Fatal(err)
	}
	body, ct, err := (&est.TPMEnrollRequest{CSR: csr, EKChain: [][]byte{ek.Certificate.Raw},
		EKPublic: ek.MarshalPublicArea(), KeyPublic: key.MarshalPublicArea()}).Encode()
	if err != nil {
		t.Fatal(err)
	}
	roots, err := certpem.ReadFile(filepath.Join(dir, "root.crt"))
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	pool.AddCert(roots[0])
	c := &http.Client{Timeout: 30 * time.Second, Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}}}
	defer c.CloseIdleConnections()
	resp, err := c.Post("https://"+addr+est.PathTPMEnroll, ct, bytes.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	data, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != http.StatusOK {
		return resp.StatusCode, string(data), nil, ek.Certificate.Cert
	}
	ans, err := est.DecodeTPMEnrollResponse(resp.Header.Get("Content-Type"), bytes.NewReader(data))
	if err != nil {
		t.Fatal(err)
	}
	secret, err := tp.ActivateCredential(key, &ek, ans.CredentialBlob, ans.EncryptedSeed)
	if err != nil {
		t.Fatal(err)
	}
	der, err := est.OpenEncryptedData(secret, ans.EncryptedCert)
	if err != nil {
		t.Fatal(err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	// Its first use over mutual TLS confirms it, as the agent does.
	mc := &http.Client{Timeout: 30 * time.Second, Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool,
		Certificates: []tls.Certificate{{Certificate: [][]byte{cert.Raw}, PrivateKey: key, Leaf: cert}}}}}
	defer mc.CloseIdleConnections()
	cresp, err := mc.Get("https://" + addr + est.PathCACerts)
	if err != nil {
		t.Fatal(err)
	}
	cresp.Body.Close()
	if cresp.StatusCode != http.StatusOK {
		t.Fatalf("confirming the certificate: GET cacerts = %d", cresp.StatusCode)
	}
	return resp.StatusCode, string(data), cert, ek.Certificate.Cert
}

func mfrRoots(t *testing.T) string {
	t.Helper()
	roots := filepath.Join(t.TempDir(), "roots.pem")
	if err := os.WriteFile(roots, append(tpmtest.ManufacturerRootPEM(t), tpmtest.ManufacturerIntermediatePEM(t)...), 0o600); err != nil {
		t.Fatal(err)
	}
	return roots
}

// --auto-approve given to init is kept in station.json and admits, at
// every later serve, an EK that is in no manifest but chains to a trusted
// TPM root; given to serve, it does so for that run only. Without either
// such an EK is refused.
func TestAutoApproveFlag(t *testing.T) {
	roots := mfrRoots(t)
	for _, tc := range []struct {
		name       string
		init       []string
		serve      []string
		kept       bool // station.json auto_approve
		wantStatus int
	}{
		{"neither", nil, nil, false, http.StatusForbidden},
		{"init", []string{"--auto-approve"}, nil, true, http.StatusOK},
		{"serve", nil, []string{"--auto-approve"}, false, http.StatusOK},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := shortDir(t)
			args := append([]string{"init", "--dir", dir, "--tpm-roots", roots, "--san", "127.0.0.1"}, tc.init...)
			if code, _, errs := stationCLI(t, args...); code != 0 {
				t.Fatalf("init = %d: %s", code, errs)
			}
			readConfig := func() map[string]any {
				b, err := os.ReadFile(filepath.Join(dir, "station.json"))
				if err != nil {
					t.Fatal(err)
				}
				var cfg map[string]any
				if err := json.Unmarshal(b, &cfg); err != nil {
					t.Fatalf("station.json: %v", err)
				}
				return cfg
			}
			if got := readConfig()["auto_approve"]; got != tc.kept {
				t.Errorf("station.json auto_approve after init %v = %v, want %v", tc.init, got, tc.kept)
			}

			start := time.Now()
			addr := serveCLI(t, dir, tc.serve...)
			status, body, cert, ek := tpmEnrollCLI(t, dir, addr)
			if status != tc.wantStatus {
				t.Fatalf("tpmenroll of an EK in no manifest = %d %q, want %d", status, body, tc.wantStatus)
			}
			if status != http.StatusOK {
				if !strings.Contains(body, "auto-approve is off") {
					t.Errorf("refusal = %q, want the reason", body)
				}
			} else {
				checkDevicesJSON(t, dir, cert, ek, start)
			}
			if got := readConfig()["auto_approve"]; got != tc.kept {
				t.Errorf("station.json auto_approve after serve %v = %v, want %v (serve's flag is not persisted)", tc.serve, got, tc.kept)
			}
		})
	}
}

// checkDevicesJSON runs iotstation devices --json and checks the one entry
// describes the device enrolled with cert and ek since start.
func checkDevicesJSON(t *testing.T, dir string, cert, ek *x509.Certificate, start time.Time) {
	t.Helper()
	code, out, errs := stationCLI(t, "devices", "--dir", dir, "--json")
	if code != 0 {
		t.Fatalf("devices --json = %d: %s", code, errs)
	}
	var devs []map[string]any
	if err := json.Unmarshal([]byte(out), &devs); err != nil || len(devs) != 1 {
		t.Fatalf("devices --json = %q (%v), want one device", out, err)
	}
	d := devs[0]
	ekHash := station.EKHash(ek)
	for key, want := range map[string]string{
		"id":          "dev-" + ekHash[:16],
		"ek_sha256":   ekHash,
		"status":      station.StatusEnrolled,
		"cert_serial": cert.SerialNumber.Text(16),
	} {
		if got, _ := d[key].(string); got != want {
			t.Errorf("devices --json %s = %v, want %q", key, d[key], want)
		}
	}
	if cert.Subject.CommonName != d["id"] {
		t.Errorf("certificate CN %q, devices --json id %v", cert.Subject.CommonName, d["id"])
	}
	times := map[string]time.Time{}
	for _, key := range []string{"not_after", "enrolled_at", "last_seen"} {
		s, _ := d[key].(string)
		ts, err := time.Parse(time.RFC3339Nano, s)
		if err != nil {
			t.Errorf("devices --json %s = %v: %v", key, d[key], err)
		}
		times[key] = ts
	}
	now := time.Now()
	if !times["not_after"].Equal(cert.NotAfter) {
		t.Errorf("not_after = %v, want the certificate's %v", times["not_after"], cert.NotAfter)
	}
	if e := times["enrolled_at"]; e.Before(start) || e.After(now) {
		t.Errorf("enrolled_at = %v, want between %v and %v", e, start, now)
	}
	if l := times["last_seen"]; l.Before(times["enrolled_at"]) || l.After(now) {
		t.Errorf("last_seen = %v, want between enrolled_at %v and %v", l, times["enrolled_at"], now)
	}
}
