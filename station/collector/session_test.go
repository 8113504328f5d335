package collector_test

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/tls"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	piondtls "github.com/pion/dtls/v3"
	"github.com/plgd-dev/go-coap/v3/message"
	"github.com/plgd-dev/go-coap/v3/message/codes"

	"iotagent.dev/iotagent/internal/leakcheck"
	"iotagent.dev/iotagent/station/collector"
	"iotagent.dev/iotagent/telemetry/senml"
)

// A certificate that expires during a session stops it at the next
// request: pion checks expiry at the handshake only.
func TestExpiredDuringSession(t *testing.T) {
	checkGoroutines(t)
	f := newFixture(t)
	var skew atomic.Int64
	c, _ := f.start(t, collector.Config{Now: func() time.Time { return time.Now().Add(time.Duration(skew.Load())) }})
	dev := dialT(t, f, c, "gw-3", dialOptions{})
	if code, diag := dev.post(t, "/telemetry", message.AppSenmlCbor, mustCBOR(t, batch("gw-3", 1, 5))); code != codes.Changed {
		t.Fatalf("POST = %v %q, want 2.04", code, diag)
	}
	skew.Store(int64(2 * time.Hour)) // past the certificate's hour
	if code := dev.postToClosing(t, mustCBOR(t, batch("gw-3", 6, 5))); code != codes.Unauthorized && code != 0 {
		t.Errorf("POST with an expired certificate = %v, want 4.01 or the session closed", code)
	}
	waitFor(t, func() bool { return c.Stats().Sessions == 0 }, "Stats().Sessions = 0")
}

// A session that stays silent for IdleTimeout is closed, and the device
// told so (close_notify).
func TestIdleTimeout(t *testing.T) {
	checkGoroutines(t)
	f := newFixture(t)
	c, _ := f.start(t, collector.Config{IdleTimeout: 200 * time.Millisecond})
	dev := dialT(t, f, c, "gw-4", dialOptions{})
	if code, diag := dev.post(t, "/telemetry", message.AppSenmlCbor, mustCBOR(t, batch("gw-4", 1, 5))); code != codes.Changed {
		t.Fatalf("POST = %v %q, want 2.04", code, diag)
	}
	select {
	case <-dev.cc.Done():
	case <-time.After(wait):
		t.Fatalf("idle session still open after %v", wait)
	}
	waitFor(t, func() bool { return c.Stats().Sessions == 0 }, "Stats().Sessions = 0")
}

// deafConn is a client socket that hears the collector's
// HelloVerifyRequest and nothing after: its handshake stalls once it
// returned the cookie, holding a handshake slot at the collector.
type deafConn struct {
	net.PacketConn
	heard atomic.Bool
}

func (d *deafConn) ReadFrom(b []byte) (int, net.Addr, error) {
	for {
		n, addr, err := d.PacketConn.ReadFrom(b)
		if err != nil || d.heard.CompareAndSwap(false, true) {
			return n, addr, err
		}
	}
}

// MaxHandshakes bounds the handshakes in progress: one more is refused at
// once; when a stalled one times out, the next succeeds.
func TestMaxHandshakes(t *testing.T) {
	checkGoroutines(t)
	f := newFixture(t)
	c, _ := f.start(t, collector.Config{MaxHandshakes: 1, HandshakeTimeout: time.Second})

	pc, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	stalled, err := piondtls.ClientWithOptions(&deafConn{PacketConn: pc}, c.Addr(),
		piondtls.WithCertificates(issue(t, f.st, "gw-stalled", nil, false)), piondtls.WithRootCAs(f.roots))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		stalled.HandshakeContext(ctx)
	}()
	t.Cleanup(func() {
		cancel()
		<-done
		stalled.Close()
	})
	waitFor(t, func() bool { return c.Stats().HandshakesInProgress == 1 }, "Stats().HandshakesInProgress = 1")

	// Another device is refused while the slot is taken; its client keeps
	// sending ClientHellos.
	type result struct {
		cl  *client
		err error
	}
	dialed := make(chan result, 1)
	go func() {
		cl, err := dial(t, c.Addr(), issue(t, f.st, "gw-5", nil, false), f.roots,
			dialOptions{dtls: []piondtls.ClientOption{piondtls.WithFlightInterval(100 * time.Millisecond)}})
		dialed <- result{cl, err}
	}()
	waitFor(t, func() bool { return c.Stats().Handshakes["busy"] > 0 }, `Stats().Handshakes["busy"] > 0`)
	if n := c.Stats().Handshakes["ok"]; n != 0 {
		t.Errorf("Stats().Handshakes[ok] = %d while the slot is taken, want 0", n)
	}

	// Once the stalled handshake times out, the other one goes through.
	cancel()
	<-done
	r := <-dialed
	if r.err != nil {
		t.Fatalf("dial once the stalled handshake timed out: %v", r.err)
	}
	waitFor(t, func() bool { return c.Stats().Handshakes["timeout"] == 1 }, `Stats().Handshakes["timeout"] = 1`)
	if code, diag := r.cl.post(t, "/telemetry", message.AppSenmlCbor, mustCBOR(t, batch("gw-5", 1, 5))); code != codes.Changed {
		t.Errorf("POST = %v %q, want 2.04", code, diag)
	}
}

// Run stops promptly, with a session open, a handshake stalled and a sink
// write in progress, and returns nil; its goroutines are gone.
func TestRunStops(t *testing.T) {
	checkGoroutines(t)
	f := newFixture(t)
	writing := make(chan struct{})
	var once sync.Once
	sink := collector.SinkFunc(func(ctx context.Context, _ string, _ senml.Pack) error {
		once.Do(func() { close(writing) })
		<-ctx.Done() // a stuck sink
		return ctx.Err()
	})
	c, err := collector.New(collector.Config{Addr: "127.0.0.1:0", Certificate: f.srv, ClientCAs: f.roots, Sink: sink})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	ran := make(chan error, 1)
	go func() { ran <- c.Run(ctx) }()
	<-c.Ready()

	if err := c.Run(ctx); err == nil {
		t.Error("second Run = nil, want an error")
	}
	dev := dialT(t, f, c, "gw-6", dialOptions{})
	pc, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	stalled, err := piondtls.ClientWithOptions(&deafConn{PacketConn: pc}, c.Addr(),
		piondtls.WithCertificates(issue(t, f.st, "gw-7", nil, false)), piondtls.WithRootCAs(f.roots))
	if err != nil {
		t.Fatal(err)
	}
	hsCtx, hsCancel := context.WithCancel(context.Background())
	hsDone := make(chan struct{})
	go func() {
		defer close(hsDone)
		stalled.HandshakeContext(hsCtx)
	}()
	defer func() {
		hsCancel()
		<-hsDone
		stalled.Close()
	}()
	postCtx, postCancel := context.WithCancel(context.Background())
	posted := make(chan error, 1)
	go func() {
		_, err := dev.cc.Post(postCtx, "/telemetry", message.AppSenmlCbor, strings.NewReader(string(mustCBOR(t, batch("gw-6", 1, 5)))))
		posted <- err
	}()
	defer func() {
		postCancel()
		<-posted
	}()
	<-writing
	waitFor(t, func() bool { return c.Stats().HandshakesInProgress == 1 }, "Stats().HandshakesInProgress = 1")

	cancel()
	select {
	case err := <-ran:
		if err != nil {
			t.Errorf("Run = %v, want nil", err)
		}
	case <-time.After(wait):
		t.Fatalf("Run did not return within %v", wait)
	}
	if left := leakcheck.Goroutines("iotagent/station/collector."); len(left) > 0 {
		t.Errorf("collector goroutines left after Run returned:\n%s", strings.Join(left, "\n\n"))
	}
}

func TestRunCannotListen(t *testing.T) {
	f := newFixture(t)
	pc, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	defer pc.Close()
	c, err := collector.New(collector.Config{Addr: pc.LocalAddr().String(), Certificate: f.srv, ClientCAs: f.roots, Sink: collector.SinkFunc(nil)})
	if err != nil {
		t.Fatal(err)
	}
	if err := c.Listen(); err == nil || !strings.Contains(err.Error(), pc.LocalAddr().String()) {
		t.Errorf("Listen on a port in use = %v, want an error naming %s", err, pc.LocalAddr())
	}
	if err := c.Run(context.Background()); err == nil {
		t.Error("Run on a port in use = nil, want an error")
	}
	// Ready means listening: a caller waiting for it must not go on to
	// use Addr (iotstation serve once did, and panicked on the nil).
	select {
	case <-c.Ready():
		t.Error("Ready() closed although the collector never listened")
	default:
	}
	if c.Addr() != nil {
		t.Errorf("Addr() = %v after Run failed, want nil", c.Addr())
	}
}

func TestNewRejects(t *testing.T) {
	f := newFixture(t)
	rsaKey, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	ecKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	good := collector.Config{Certificate: f.srv, ClientCAs: f.roots, Sink: collector.SinkFunc(nil)}
	for _, tc := range []struct {
		name   string
		change func(*collector.Config)
		want   string
	}{
		{"no certificate", func(c *collector.Config) { c.Certificate = tls.Certificate{} }, "no server certificate"},
		{"RSA key", func(c *collector.Config) { c.Certificate.PrivateKey = rsaKey }, "want ECDSA"},
		{"no key", func(c *collector.Config) { c.Certificate.PrivateKey = nil }, "not a crypto.Signer"},
		{"no client CAs", func(c *collector.Config) { c.ClientCAs = nil }, "no client CAs"},
		{"no sink", func(c *collector.Config) { c.Sink = nil }, "no sink"},
		{"negative MaxPayload", func(c *collector.Config) { c.MaxPayload = -1 }, "MaxPayload is negative"},
		{"huge MaxPayload", func(c *collector.Config) { c.MaxPayload = 1 << 30 }, "MaxPayload"},
		{"negative timeout", func(c *collector.Config) { c.HandshakeTimeout = -time.Second }, "HandshakeTimeout is negative"},
		{"negative window", func(c *collector.Config) { c.DedupeWindow = -1 }, "DedupeWindow is negative"},
		{"huge window", func(c *collector.Config) { c.DedupeWindow = 1<<24 + 1 }, "DedupeWindow 16777217 is more than"},
		{"negative checkpoint", func(c *collector.Config) { c.DedupeCheckpoint = -time.Second }, "DedupeCheckpoint is negative"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg := good
			tc.change(&cfg)
			if _, err := collector.New(cfg); err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("New(%s) = %v, want an error saying %q", tc.name, err, tc.want)
			}
		})
	}
	good.Certificate.PrivateKey = ecKey // any ECDSA key passes New
	if _, err := collector.New(good); err != nil {
		t.Errorf("New(good) = %v", err)
	}
}
