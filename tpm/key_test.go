package tpm_test

import (
	"bytes"
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"math/big"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"iotagent.dev/iotagent/tpm"
	"iotagent.dev/iotagent/tpm/tpmtest"
)

func TestMain(m *testing.M) { os.Exit(tpmtest.Main(m)) }

// newKey creates a device key in a fresh simulator and loads it.
func newKey(t *testing.T) (*tpmtest.Simulator, *tpm.TPM, *tpm.Key, string) {
	t.Helper()
	sim := tpmtest.New(t)
	tp := sim.Open(t)
	path := filepath.Join(t.TempDir(), "device-key.json")
	kf, created, err := tp.EnsureKey(path, tpm.KeyOptions{})
	if err != nil || !created {
		t.Fatalf("EnsureKey = created %v, %v; want created, nil", created, err)
	}
	k, err := tp.LoadKey(kf)
	if err != nil {
		t.Fatalf("LoadKey: %v", err)
	}
	t.Cleanup(func() { k.Close() })
	return sim, tp, k, path
}

func TestCSRSignedByTPMKeyVerifies(t *testing.T) {
	_, _, k, _ := newKey(t)
	der, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{
		Subject: pkix.Name{CommonName: "gw-0001"},
	}, k)
	if err != nil {
		t.Fatalf("CreateCertificateRequest: %v", err)
	}
	csr, err := x509.ParseCertificateRequest(der)
	if err != nil {
		t.Fatal(err)
	}
	if err := csr.CheckSignature(); err != nil {
		t.Errorf("CSR signature does not verify: %v", err)
	}
	if !k.Public().(*ecdsa.PublicKey).Equal(csr.PublicKey) {
		t.Error("CSR public key is not the TPM key")
	}
}

func TestKeyAttributesAndFile(t *testing.T) {
	_, _, k, path := newKey(t)
	got := tpm.AttributeNames(k.PublicArea().ObjectAttributes)
	want := []string{"fixedTPM", "fixedParent", "sensitiveDataOrigin", "userWithAuth", "noDA", "sign"}
	if strings.Join(got, ",") != strings.Join(want, ",") {
		t.Errorf("attributes = %v, want %v", got, want)
	}
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode().Perm() != 0o600 {
		t.Errorf("key file mode = %v, want 0600", fi.Mode().Perm())
	}
}

// selfSigned makes a certificate for pub signed by signer.
func selfSigned(t testing.TB, cn string, signer crypto.Signer, isCA bool) *x509.Certificate {
	t.Helper()
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(time.Now().UnixNano()),
		Subject:               pkix.Name{CommonName: cn},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(time.Hour),
		DNSNames:              []string{cn},
		KeyUsage:              x509.KeyUsageDigitalSignature | x509.KeyUsageCertSign,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth, x509.ExtKeyUsageServerAuth},
		BasicConstraintsValid: true,
		IsCA:                  isCA,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, signer.Public(), signer)
	if err != nil {
		t.Fatal(err)
	}
	c, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// tlsConfigs returns server and client TLS 1.3 configurations for a mutual
// handshake with the client key clientKey. The server writes one byte
// after a handshake so the client knows client auth succeeded.
func tlsConfigs(t testing.TB, clientKey crypto.Signer) (srv, cli *tls.Config) {
	t.Helper()
	srvKey, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	srvCert := selfSigned(t, "station.test", srvKey, true)
	cliCert := selfSigned(t, "gw-0001", clientKey, false)
	cliPool, srvPool := x509.NewCertPool(), x509.NewCertPool()
	cliPool.AddCert(cliCert)
	srvPool.AddCert(srvCert)
	srv = &tls.Config{
		MinVersion:             tls.VersionTLS13,
		Certificates:           []tls.Certificate{{Certificate: [][]byte{srvCert.Raw}, PrivateKey: srvKey}},
		ClientAuth:             tls.RequireAndVerifyClientCert,
		ClientCAs:              cliPool,
		SessionTicketsDisabled: true,
	}
	cli = &tls.Config{
		MinVersion:   tls.VersionTLS13,
		ServerName:   "station.test",
		RootCAs:      srvPool,
		Certificates: []tls.Certificate{{Certificate: [][]byte{cliCert.Raw}, PrivateKey: clientKey}},
	}
	return srv, cli
}

// serveHandshakes accepts connections on a loopback listener until it is
// closed, completes each handshake and writes one byte. The returned
// function closes the listener and waits for the server to stop.
func serveHandshakes(t testing.TB, cfg *tls.Config) (addr string, errs <-chan error, stop func()) {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ch := make(chan error, 1)
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			s := tls.Server(c, cfg)
			err = s.Handshake()
			if err == nil {
				_, err = s.Write([]byte{1})
			}
			s.Close()
			select {
			case ch <- err:
			default:
			}
		}
	}()
	return l.Addr().String(), ch, func() { l.Close(); <-done }
}

// handshake runs one TLS 1.3 mutual handshake over loopback with the client
// key clientKey.
func handshake(t testing.TB, clientKey crypto.Signer) error {
	t.Helper()
	srvCfg, cliCfg := tlsConfigs(t, clientKey)
	addr, srvErr, stop := serveHandshakes(t, srvCfg)
	defer stop()
	c, err := tls.Dial("tcp", addr, cliCfg)
	if err != nil {
		return err
	}
	defer c.Close()
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := c.Read(make([]byte, 1)); err != nil {
		return errors.Join(err, <-srvErr)
	}
	return <-srvErr
}

func TestTLS13MutualHandshakeWithTPMKey(t *testing.T) {
	_, _, k, _ := newKey(t)
	if err := handshake(t, k); err != nil {
		t.Fatalf("handshake with TPM client key: %v", err)
	}
}

func TestConcurrentSigning(t *testing.T) {
	_, _, k, _ := newKey(t)
	const workers, each = 8, 10
	var wg sync.WaitGroup
	errs := make(chan error, workers*each)
	for w := range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range each {
				d := sha256.Sum256([]byte{byte(w), byte(i)})
				sig, err := k.Sign(rand.Reader, d[:], crypto.SHA256)
				if err != nil {
					errs <- err
					continue
				}
				if !ecdsa.VerifyASN1(k.Public().(*ecdsa.PublicKey), d[:], sig) {
					errs <- errors.New("signature does not verify")
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
}

func TestSignRejectsBadDigest(t *testing.T) {
	_, _, k, _ := newKey(t)
	for _, tc := range []struct {
		name   string
		digest []byte
		opts   crypto.SignerOpts
		want   string
	}{
		{"short digest", []byte("short"), crypto.SHA256, "digest is 5 bytes"},
		{"no hash", make([]byte, 32), crypto.Hash(0), "unsupported hash"},
		{"nil opts", make([]byte, 32), nil, "no hash"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := k.Sign(rand.Reader, tc.digest, tc.opts)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("Sign = %v, want error containing %q", err, tc.want)
			}
		})
	}
	// SHA-384 digests, which TLS may ask of a P-256 key, are signed.
	d := make([]byte, 48)
	sig, err := k.Sign(rand.Reader, d, crypto.SHA384)
	if err != nil || !ecdsa.VerifyASN1(k.Public().(*ecdsa.PublicKey), d, sig) {
		t.Errorf("SHA-384 Sign = %v, want a valid signature", err)
	}
}

func TestKeyReloadsAfterTPMRestart(t *testing.T) {
	sim, tp, k, path := newKey(t)
	want := k.Public().(*ecdsa.PublicKey)
	k.Close()
	sim.Restart()

	kf, err := tpm.ReadKeyFile(path)
	if err != nil {
		t.Fatal(err)
	}
	k2, err := tp.LoadKey(kf)
	if err != nil {
		t.Fatalf("LoadKey after restart: %v", err)
	}
	defer k2.Close()
	if !want.Equal(k2.Public()) {
		t.Error("reloaded key has another public key")
	}
	d := sha256.Sum256([]byte("after restart"))
	if _, err := k2.Sign(rand.Reader, d[:], crypto.SHA256); err != nil {
		t.Errorf("Sign after reload: %v", err)
	}
}

// A key left loaded across a TPM restart loses its transient object; Sign
// reloads it from its blobs instead of failing or signing with whatever now
// sits at that handle.
func TestLiveKeySurvivesTPMRestart(t *testing.T) {
	sim, tp, k, _ := newKey(t)
	sim.Restart()
	// Occupy the handle the key used to have with another key.
	tpmtest.NewKey(t, tp)
	d := sha256.Sum256([]byte("x"))
	sig, err := k.Sign(rand.Reader, d[:], crypto.SHA256)
	if err != nil {
		t.Fatalf("Sign after restart: %v", err)
	}
	if !ecdsa.VerifyASN1(k.Public().(*ecdsa.PublicKey), d[:], sig) {
		t.Error("signature after restart does not verify with the key's public key")
	}
}

func TestPersistentKey(t *testing.T) {
	sim := tpmtest.New(t)
	tp := sim.Open(t)
	path := filepath.Join(t.TempDir(), "device-key.json")
	const h = 0x81000010
	kf, created, err := tp.EnsureKey(path, tpm.KeyOptions{PersistHandle: h})
	if err != nil || !created {
		t.Fatalf("EnsureKey(persist) = %v, %v", created, err)
	}
	if kf.PersistentHandle != "0x81000010" {
		t.Errorf("PersistentHandle = %q, want 0x81000010", kf.PersistentHandle)
	}
	// Idempotent: a second call keeps the key.
	kf2, created, err := tp.EnsureKey(path, tpm.KeyOptions{PersistHandle: h})
	if err != nil || created || !bytes.Equal(kf2.Public, kf.Public) {
		t.Fatalf("second EnsureKey = created %v, %v; want the same key", created, err)
	}

	sim.Restart()
	// Prove the key comes from the handle: remove the private blob.
	kf.Private = nil
	k, err := tp.LoadKey(kf)
	if err != nil {
		t.Fatalf("LoadKey from persistent handle: %v", err)
	}
	defer k.Close()
	if got, persistent := k.Handle(); got != h || !persistent {
		t.Errorf("Handle = %#x persistent %v, want 0x81000010 persistent", got, persistent)
	}
	d := sha256.Sum256([]byte("persisted"))
	sig, err := k.Sign(rand.Reader, d[:], crypto.SHA256)
	if err != nil || !ecdsa.VerifyASN1(k.Public().(*ecdsa.PublicKey), d[:], sig) {
		t.Fatalf("Sign with persistent key = %v", err)
	}
	// Clean up the persistent slot so the clone does not matter to others.
	if err := tp.EvictKey(kf); err != nil {
		t.Fatal(err)
	}
}

// tpm2-tools, an independent implementation, reads the key's attributes.
func TestTPM2ToolsSeesKeyAttributes(t *testing.T) {
	if _, err := exec.LookPath("tpm2_readpublic"); err != nil {
		t.Fatal("tpm2_readpublic not found: install tpm2-tools (scripts/test.sh does)")
	}
	sim := tpmtest.New(t)
	tp := sim.Open(t)
	path := filepath.Join(t.TempDir(), "device-key.json")
	const h = 0x81000011
	kf, _, err := tp.EnsureKey(path, tpm.KeyOptions{PersistHandle: h})
	if err != nil {
		t.Fatal(err)
	}
	defer tp.EvictKey(kf)

	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, "tpm2_readpublic", "-c", "0x81000011")
	cmd.Env = append(os.Environ(), "TPM2TOOLS_TCTI=swtpm:path="+sim.Socket)
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("tpm2_readpublic: %v\n%s", err, out)
	}
	text := string(out)
	for _, attr := range []string{"fixedtpm", "fixedparent", "sensitivedataorigin", "userwithauth", "sign"} {
		if !strings.Contains(text, attr) {
			t.Errorf("tpm2_readpublic output lacks %s:\n%s", attr, text)
		}
	}
	if !strings.Contains(strings.ToLower(text), "nist p256") {
		t.Errorf("tpm2_readpublic output does not show a P-256 key:\n%s", text)
	}
}

func TestTCPTransport(t *testing.T) {
	sim := tpmtest.Start(t, tpmtest.Options{TCP: true})
	if !strings.HasPrefix(sim.Spec, "tcp:") {
		t.Fatalf("Spec = %q, want tcp:", sim.Spec)
	}
	tp := sim.Open(t)
	kf, err := tp.CreateKey()
	if err != nil {
		t.Fatalf("CreateKey over TCP: %v", err)
	}
	k, err := tp.LoadKey(kf)
	if err != nil {
		t.Fatal(err)
	}
	defer k.Close()
	d := sha256.Sum256([]byte("tcp"))
	if _, err := k.Sign(rand.Reader, d[:], crypto.SHA256); err != nil {
		t.Errorf("Sign over TCP: %v", err)
	}
}

func TestInfo(t *testing.T) {
	tp := tpmtest.New(t).Open(t)
	info, err := tp.Info()
	if err != nil {
		t.Fatal(err)
	}
	// swtpm reports IBM as the manufacturer and "SW TPM" as the model.
	if info.Manufacturer != "IBM" || !strings.Contains(info.Model, "SW") {
		t.Errorf("Info = %+v, want manufacturer IBM, model SW TPM", info)
	}
	if !strings.HasPrefix(info.Spec, "2.0") {
		t.Errorf("Info.Spec = %q, want 2.0 …", info.Spec)
	}
}

// Objects left loaded by killed processes (swtpm and /dev/tpm0 have no
// resource manager) leave too few of the TPM's three transient slots to
// load a key (it needs the SRK too); loading the device key recovers by
// flushing them instead of failing.
func TestLoadKeyRecoversFromLeakedObjects(t *testing.T) {
	sim := tpmtest.New(t)
	kf, err := sim.Open(t).CreateKey()
	if err != nil {
		t.Fatal(err)
	}
	for i := range 2 {
		// A separate connection per "process"; the keys are never closed.
		tp, err := tpm.Open(sim.Spec)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := tp.LoadKey(kf); err != nil {
			t.Fatalf("load %d: %v", i, err)
		}
		tp.Close()
	}
	tp := sim.Open(t)
	if hs, _ := tp.TransientHandles(); len(hs) != 2 {
		t.Fatalf("%d transient objects after two killed loaders, want 2", len(hs))
	}
	k, err := tp.LoadKey(kf)
	if err != nil {
		t.Fatalf("LoadKey with the TPM's object slots full: %v", err)
	}
	defer k.Close()
	d := sha256.Sum256([]byte("after recovery"))
	if _, err := k.Sign(rand.Reader, d[:], crypto.SHA256); err != nil {
		t.Errorf("Sign: %v", err)
	}
}

func TestSealUnseal(t *testing.T) {
	tp := tpmtest.New(t).Open(t)
	other := tpmtest.Start(t, tpmtest.Options{Identity: 1}).Open(t)
	path := filepath.Join(t.TempDir(), "session-key.json")
	random := func(b []byte) error { _, err := rand.Read(b); return err }
	first, err := tp.SealedSecret(path, 32, random)
	if err != nil || len(first) != 32 {
		t.Fatalf("SealedSecret = %x, %v", first, err)
	}
	again, err := tp.SealedSecret(path, 32, random)
	if err != nil || !bytes.Equal(first, again) {
		t.Fatalf("second SealedSecret = %x, %v; want the same secret", again, err)
	}
	raw, _ := os.ReadFile(path)
	if bytes.Contains(raw, first) {
		t.Error("the secret appears in clear in the sealed file")
	}
	if _, err := other.SealedSecret(path, 32, random); !errors.Is(err, tpm.ErrWrongTPM) {
		t.Errorf("unsealing on another TPM = %v, want ErrWrongTPM", err)
	}
	kf, _ := tpm.ReadKeyFile(path)
	if _, err := tp.LoadKey(kf); err == nil {
		t.Error("LoadKey accepted a sealed-data file")
	}
}
