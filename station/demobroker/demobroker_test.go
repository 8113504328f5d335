package demobroker

import (
	"context"
	"crypto/tls"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"

	"iotagent.dev/iotagent/enroll"
	"iotagent.dev/iotagent/enroll/enrolltest"
	"iotagent.dev/iotagent/station/stationtest"
	"iotagent.dev/iotagent/tpm/tpmtest"
)

func TestMain(m *testing.M) { os.Exit(tpmtest.Main(m)) }

// brokerConfig is a broker on a free loopback port with a certificate
// from st, admitting st's devices.
func brokerConfig(t *testing.T, st *stationtest.Station) Config {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	l.Close()
	return Config{Addr: addr, Certificate: st.ServiceCert(t, "demo-broker", []string{"127.0.0.1"}, true), ClientCAs: st.TrustPool()}
}

// runBroker runs a broker made from cfg until cancel; done has Run's
// result.
func runBroker(t *testing.T, cfg Config) (cancel context.CancelFunc, done <-chan error) {
	t.Helper()
	b, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	result := make(chan error, 1)
	go func() { result <- b.Run(ctx) }()
	return cancel, result
}

func TestPolicy(t *testing.T) {
	st := stationtest.Start(t, stationtest.Options{})
	cfg := brokerConfig(t, st)
	cfg.ReaderFirst = true
	addr, pool := cfg.Addr, cfg.ClientCAs
	cancel, done := runBroker(t, cfg)
	defer func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Run: %v", err)
		}
	}()

	// Devices enroll (by token); the fleet reader and services get
	// service certificates.
	client := func(cn string) paho.Client {
		var kp tls.Certificate
		if cn == ReaderName || strings.HasSuffix(cn, "-svc") {
			kp = st.ServiceCert(t, cn, nil, false)
		} else {
			kp = st.Device(t, cn).TLS
		}
		return paho.NewClient(paho.NewClientOptions().AddBroker("tls://" + addr).SetClientID(cn).SetAutoReconnect(false).
			SetTLSConfig(&tls.Config{Certificates: []tls.Certificate{kp}, RootCAs: pool}))
	}
	connect := func(c paho.Client) error {
		tok := c.Connect()
		if !tok.WaitTimeout(10 * time.Second) {
			t.Fatal("connect timed out")
		}
		return tok.Error()
	}
	dev := client("gw-1")
	if err := connect(dev); err == nil {
		t.Fatal("a device was admitted before the fleet reader subscribed (ReaderFirst)")
	}
	reader := client(ReaderName)
	if err := connect(reader); err != nil {
		t.Fatalf("reader: %v", err)
	}
	defer reader.Disconnect(100)
	got := make(chan string, 10)
	if tok := reader.Subscribe("devices/+/telemetry", 1, func(_ paho.Client, m paho.Message) { got <- m.Topic() + " " + string(m.Payload()) }); !tok.WaitTimeout(10*time.Second) || tok.Error() != nil {
		t.Fatalf("subscribe: %v", tok.Error())
	}
	dev = client("gw-1")
	if err := connect(dev); err != nil {
		t.Fatalf("device after the reader subscribed: %v", err)
	}
	defer dev.Disconnect(100)
	dev.Publish("devices/gw-1/telemetry", 1, false, "genuine").WaitTimeout(5 * time.Second)
	dev.Publish("devices/gw-2/telemetry", 1, false, "forged").WaitTimeout(5 * time.Second)
	select {
	case m := <-got:
		if m != "devices/gw-1/telemetry genuine" {
			t.Fatalf("reader got %q, want the device's own topic", m)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("reader got nothing")
	}
	select {
	case m := <-got:
		t.Fatalf("reader got %q: a device published into another's topic", m)
	case <-time.After(500 * time.Millisecond):
	}
	// A service's certificate is not a device's, though the name would
	// pass as a device ID (issue 10, finding 5).
	svc := client("gw-svc")
	if err := connect(svc); err != nil {
		t.Fatalf("service client: %v", err)
	}
	svc.Publish("devices/gw-svc/telemetry", 1, false, "posing").WaitTimeout(5 * time.Second)
	svc.Disconnect(100)
	select {
	case m := <-got:
		t.Fatalf("reader got %q: a service certificate published as a device", m)
	case <-time.After(500 * time.Millisecond):
	}
	// A client ID other than the certificate's name is refused.
	imp := paho.NewClient(paho.NewClientOptions().AddBroker("tls://" + addr).SetClientID("gw-1").SetAutoReconnect(false).
		SetTLSConfig(func() *tls.Config {
			return &tls.Config{Certificates: []tls.Certificate{st.Device(t, "gw-3").TLS}, RootCAs: pool}
		}()))
	if err := connect(imp); err == nil {
		t.Error("gw-3's certificate connected as client gw-1")
	}
}

// The ticket keys are made once (0600) and read back the same until the
// current one is TicketKeyLifetime old; then a new one leads and the old
// one follows, to open the tickets it encrypted. A file of the wrong size
// is an error naming it, and is left alone.
func TestLoadTicketKeys(t *testing.T) {
	path := filepath.Join(t.TempDir(), "ticket.keys")
	now := time.Now()
	k1, err := LoadTicketKeys(path, now)
	if err != nil {
		t.Fatal(err)
	}
	if fi, err := os.Stat(path); err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("ticket key file: %v, mode %v; want 0600", err, fi.Mode())
	}
	if len(k1) != 1 || k1[0] == ([32]byte{}) {
		t.Fatalf("new keys = %x, want one non-zero key", k1)
	}
	k2, err := LoadTicketKeys(path, now.Add(TicketKeyLifetime/2))
	if err != nil || len(k2) != 1 || k2[0] != k1[0] {
		t.Fatalf("second load = %x, %v; want the same key", k2, err)
	}
	k3, err := LoadTicketKeys(path, now.Add(TicketKeyLifetime+time.Minute))
	if err != nil || len(k3) != 2 || k3[1] != k1[0] || k3[0] == k1[0] {
		t.Fatalf("load after the lifetime = %x, %v; want a new key, then the old one", k3, err)
	}
	k4, err := LoadTicketKeys(path, now.Add(TicketKeyLifetime+2*time.Minute))
	if err != nil || len(k4) != 2 || k4[0] != k3[0] || k4[1] != k3[1] {
		t.Fatalf("load after the rotation = %x, %v; want the rotated keys", k4, err)
	}
	// A second rotation drops the oldest key.
	k5, err := LoadTicketKeys(path, now.Add(3*TicketKeyLifetime))
	if err != nil || len(k5) != 2 || k5[1] != k3[0] {
		t.Fatalf("second rotation = %x, %v; want a new key, then the previous current", k5, err)
	}
	os.WriteFile(path, []byte("short"), 0o600)
	if _, err := LoadTicketKeys(path, now); err == nil || !strings.Contains(err.Error(), path) || !strings.Contains(err.Error(), "5 bytes") {
		t.Errorf("short key file: %v; want an error naming the file and its size", err)
	}
	if b, _ := os.ReadFile(path); string(b) != "short" {
		t.Error("the bad key file was replaced")
	}
}

// A connection that never finishes its TLS handshake or never sends
// CONNECT does not hold up a shutdown.
func TestShutdownWithHalfOpenConnection(t *testing.T) {
	cfg := brokerConfig(t, stationtest.Start(t, stationtest.Options{}))
	addr := cfg.Addr
	cancel, done := runBroker(t, cfg)
	var c net.Conn
	var err error
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		if c, err = net.Dial("tcp", addr); err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("broker not listening: %v", err)
		}
	}
	defer c.Close()
	time.Sleep(100 * time.Millisecond) // accepted, silent
	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Errorf("Run: %v", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Run still running 5 s after its context ended: a silent connection holds up the shutdown")
	}
}

// A revocation ends the live connection of the revoked device, not only
// its next handshake: within RevocationCheck for a device that stays
// quiet, at once for one that publishes. Other clients keep theirs, and
// the revoked device cannot get back in.
func TestRevokedDeviceDisconnected(t *testing.T) {
	st := stationtest.Start(t, stationtest.Options{AutoApprove: true})
	if _, err := st.CRL(); err != nil {
		t.Fatal(err)
	}
	cfg := brokerConfig(t, st)
	cfg.Revoked = CRLFile(filepath.Join(st.Dir, "crl.pem"))
	cfg.RevocationCheck = 50 * time.Millisecond
	cancel, done := runBroker(t, cfg)
	defer func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Run: %v", err)
		}
	}()
	dev := enrolltest.New(t, st, enroll.RenewerConfig{})
	id := dev.DeviceID()
	devTLS := &tls.Config{GetClientCertificate: dev.Identity().GetClientCertificate, RootCAs: cfg.ClientCAs}
	connect := func(cn string, tc *tls.Config, lost chan<- error) (paho.Client, error) {
		c := paho.NewClient(paho.NewClientOptions().AddBroker("tls://" + cfg.Addr).SetClientID(cn).SetAutoReconnect(false).
			SetTLSConfig(tc).SetConnectionLostHandler(func(_ paho.Client, err error) { lost <- err }))
		var err error
		for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(20 * time.Millisecond) {
			tok := c.Connect()
			if !tok.WaitTimeout(10 * time.Second) {
				t.Fatal("connect timed out")
			}
			if err = tok.Error(); err == nil || !strings.Contains(err.Error(), "connection refused") {
				break
			}
		}
		return c, err
	}
	devLost, otherLost := make(chan error, 1), make(chan error, 1)
	d, err := connect(id, devTLS, devLost)
	if err != nil {
		t.Fatalf("device connect: %v", err)
	}
	defer d.Disconnect(0)
	o, err := connect("gw-2", &tls.Config{Certificates: []tls.Certificate{st.ServiceCert(t, "gw-2", nil, false)}, RootCAs: cfg.ClientCAs}, otherLost)
	if err != nil {
		t.Fatalf("other client connect: %v", err)
	}
	defer o.Disconnect(0)

	revoked := time.Now()
	if err := st.Revoke(id); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-devLost:
		t.Logf("quiet revoked device disconnected %v after Revoke: %v", time.Since(revoked).Round(time.Millisecond), err)
	case <-time.After(5 * time.Second):
		t.Fatal("the revoked device kept its connection 5 s after Revoke")
	}
	select {
	case err := <-otherLost:
		t.Fatalf("another client lost its connection: %v", err)
	case <-time.After(200 * time.Millisecond):
	}
	if _, err := connect(id, devTLS, make(chan error, 1)); err == nil {
		t.Error("the revoked device connected again")
	}
}
