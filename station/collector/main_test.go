package collector_test

import (
	"bufio"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	piondtls "github.com/pion/dtls/v3"
	coapdtls "github.com/plgd-dev/go-coap/v3/dtls"
	"github.com/plgd-dev/go-coap/v3/message"
	"github.com/plgd-dev/go-coap/v3/message/codes"
	"github.com/plgd-dev/go-coap/v3/options"
	"github.com/plgd-dev/go-coap/v3/udp"
	udpclient "github.com/plgd-dev/go-coap/v3/udp/client"

	"iotagent.dev/iotagent/internal/leakcheck"
	"iotagent.dev/iotagent/internal/testsync"
	"iotagent.dev/iotagent/station"
	"iotagent.dev/iotagent/station/collector"
	"iotagent.dev/iotagent/station/stationtest"
	"iotagent.dev/iotagent/telemetry/senml"
	"iotagent.dev/iotagent/tpm/tpmtest"
)

// stationtest reads the tpmtest manufacturer CA; the revocation test
// enrolls a swtpm device.
func TestMain(m *testing.M) { os.Exit(tpmtest.Main(m)) }

// wait bounds every wait in these tests: far above what a healthy exchange
// takes on loopback, even on a loaded machine.
const wait = 15 * time.Second

// checkGoroutines fails t if, once every later cleanup has run (clients
// closed, collector stopped), goroutines of the collector, pion/dtls or
// go-coap are still running. Call it first in a test, so that its cleanup
// runs last.
func checkGoroutines(t testing.TB) {
	t.Helper()
	leakcheck.Check(t, wait, "iotagent/station/collector.", "pion/dtls", "plgd-dev/go-coap")
}

// fixture is a station, the collector's certificate and the pool that
// verifies both sides.
type fixture struct {
	st    *stationtest.Station
	srv   tls.Certificate
	roots *x509.CertPool
}

func newFixture(t testing.TB) *fixture {
	t.Helper()
	st := stationtest.Start(t, stationtest.Options{AutoApprove: true})
	roots := x509.NewCertPool()
	if !roots.AppendCertsFromPEM(st.TrustPEM()) {
		t.Fatal("station trust PEM holds no certificate")
	}
	return &fixture{st: st, srv: issue(t, st, "collector", []string{"127.0.0.1", "localhost"}, true), roots: roots}
}

// issue has the station issue a certificate: for a server, or (server
// false) a device's: enrolled by token when name is a device ID, else
// signed outside the registry (stationtest.SignDevice).
func issue(t testing.TB, st *stationtest.Station, name string, sans []string, server bool) tls.Certificate {
	t.Helper()
	if server {
		return issueCert(t, st, name, sans, server, time.Hour)
	}
	if station.ValidDeviceID(name) != nil {
		return st.SignDevice(t, name, time.Now().Add(-time.Hour), time.Now().Add(time.Hour)).TLS
	}
	return st.Device(t, name).TLS
}

// issueFor signs a device-shaped client certificate valid for lifetime
// from now (backdated a minute), which may be negative.
func issueFor(t testing.TB, st *stationtest.Station, name string, lifetime time.Duration) tls.Certificate {
	t.Helper()
	now := time.Now()
	return st.SignDevice(t, name, now.Add(-time.Minute+min(lifetime, 0)*2), now.Add(lifetime)).TLS
}

func issueCert(t testing.TB, st *stationtest.Station, name string, sans []string, server bool, lifetime time.Duration) tls.Certificate {
	t.Helper()
	sc, err := st.IssueService(context.Background(), station.ServiceRequest{Name: name, SANs: sans, Server: server, Lifetime: lifetime})
	if err != nil {
		t.Fatalf("IssueService(%s): %v", name, err)
	}
	c, err := tls.X509KeyPair(sc.Chain, sc.Key)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// start runs a collector with cfg, completed from f: it listens on a
// loopback port and writes to a JSON-lines sink in a temporary directory
// unless cfg has a sink. The collector stops at cleanup, where Run must
// return nil in time.
func (f *fixture) start(t testing.TB, cfg collector.Config) (*collector.Collector, *lines) {
	t.Helper()
	c, out, _ := f.startStop(t, cfg)
	return c, out
}

// startStop is start that also returns a function stopping the collector
// before cleanup (Run must return nil in time).
func (f *fixture) startStop(t testing.TB, cfg collector.Config) (*collector.Collector, *lines, func()) {
	t.Helper()
	cfg.Addr = "127.0.0.1:0"
	if len(cfg.Certificate.Certificate) == 0 {
		cfg.Certificate = f.srv
	}
	if cfg.ClientCAs == nil {
		cfg.ClientCAs = f.roots
	}
	var out *lines
	if cfg.Sink == nil {
		out = &lines{path: filepath.Join(t.TempDir(), "telemetry.jsonl")}
		s, err := collector.NewJSONLinesSink(out.path)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() {
			if err := s.Close(); err != nil {
				t.Errorf("closing sink: %v", err)
			}
		})
		cfg.Sink = s
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.NewTextHandler(t.Output(), &slog.HandlerOptions{Level: slog.LevelInfo}))
	}
	c, err := collector.New(cfg)
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- c.Run(ctx) }()
	stop := sync.OnceFunc(func() {
		cancel()
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("Run = %v, want nil after cancellation", err)
			}
		case <-time.After(wait):
			t.Errorf("Run did not return within %v of cancellation", wait)
		}
	})
	t.Cleanup(stop)
	select {
	case <-c.Ready():
	case err := <-done:
		t.Fatalf("Run = %v before listening", err)
	case <-time.After(wait):
		t.Fatal("collector not ready")
	}
	if c.Addr() == nil {
		t.Fatal("Addr() = nil once ready")
	}
	return c, out, stop
}

// waitFor waits until cond holds, failing t with the message format, args
// ("what should hold") if it does not within wait.
func waitFor(t testing.TB, cond func() bool, format string, args ...any) {
	t.Helper()
	testsync.Until(t, wait, fmt.Sprintf(format, args...), cond)
}

// lines reads what a JSON-lines sink wrote.
type lines struct{ path string }

type line struct {
	Device   string   `json:"device"`
	Seq      uint64   `json:"seq"`
	Name     string   `json:"n"`
	Unit     string   `json:"u"`
	Value    *float64 `json:"v"`
	String   *string  `json:"vs"`
	Bool     *bool    `json:"vb"`
	Time     float64  `json:"t"`
	Received string   `json:"received"`
}

func (l *lines) read(t testing.TB) []line {
	t.Helper()
	f, err := os.Open(l.path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var out []line
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		var x line
		if err := json.Unmarshal(sc.Bytes(), &x); err != nil {
			t.Fatalf("sink line %q: %v", sc.Text(), err)
		}
		out = append(out, x)
	}
	if err := sc.Err(); err != nil {
		t.Fatal(err)
	}
	return out
}

// client is a device's CoAP-over-DTLS client: pion over a UDP socket that
// can be swapped, as a NAT rebinding does, with go-coap on top.
type client struct {
	pc     *swapConn
	dc     *piondtls.Conn
	cc     *udpclient.Conn
	cancel context.CancelFunc
	wg     sync.WaitGroup
}

// dialOptions add to dial's defaults.
type dialOptions struct {
	dtls  []piondtls.ClientOption
	coap  []udp.Option
	noCID bool // a client without Connection ID support
}

// dial connects to the collector at addr with cert, trusting roots, with a
// Connection ID; it closes at cleanup.
func dial(t testing.TB, addr net.Addr, cert tls.Certificate, roots *x509.CertPool, o dialOptions) (*client, error) {
	t.Helper()
	pc, err := newSwapConn()
	if err != nil {
		t.Fatal(err)
	}
	opts := []piondtls.ClientOption{
		piondtls.WithCertificates(cert),
		piondtls.WithRootCAs(roots),
		piondtls.WithServerName("127.0.0.1"),
		piondtls.WithExtendedMasterSecret(piondtls.RequireExtendedMasterSecret),
	}
	if !o.noCID {
		opts = append(opts, piondtls.WithConnectionIDGenerator(piondtls.OnlySendCIDGenerator()))
	}
	opts = append(opts, o.dtls...)
	dc, err := piondtls.ClientWithOptions(pc, addr, opts...)
	if err != nil {
		pc.Close()
		return nil, err
	}
	ctx, cancel := context.WithTimeout(context.Background(), wait)
	defer cancel()
	if err := dc.HandshakeContext(ctx); err != nil {
		dc.Close()
		return nil, err
	}
	c := &client{pc: pc, dc: dc}
	runCtx, stop := context.WithCancel(context.Background())
	c.cancel = stop
	c.cc = coapdtls.Client(dc, append([]udp.Option{
		options.WithContext(runCtx),
		options.WithErrors(func(error) {}),
		// go-coap's default runner sleeps in a goroutine nobody waits for.
		options.WithPeriodicRunner(func(f func(time.Time) bool) {
			c.wg.Go(func() {
				tk := time.NewTicker(100 * time.Millisecond)
				defer tk.Stop()
				for {
					select {
					case <-runCtx.Done():
						return
					case now := <-tk.C:
						if !f(now) {
							return
						}
					}
				}
			})
		}),
	}, o.coap...)...)
	t.Cleanup(c.close)
	return c, nil
}

func (c *client) close() {
	c.cc.Close()
	c.dc.Close() // go-coap's reader waits on it
	<-c.cc.Done()
	c.cancel()
	c.pc.Close()
	c.wg.Wait()
}

// post POSTs body to path with content format cf and returns the
// response's code and payload.
func (c *client) post(t testing.TB, path string, cf message.MediaType, body []byte) (codes.Code, string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), wait)
	defer cancel()
	resp, err := c.cc.Post(ctx, path, cf, strings.NewReader(string(body)))
	if err != nil {
		t.Fatalf("POST %s: %v", path, err)
	}
	defer c.cc.ReleaseMessage(resp)
	var payload []byte
	if resp.Body() != nil {
		if payload, err = resp.ReadBody(); err != nil {
			t.Fatal(err)
		}
	}
	return resp.Code(), string(payload)
}

// postToClosing posts to a session that the collector answers 4.01 and
// closes at once: the client may see the close before the answer, and then
// reports 0.
func (c *client) postToClosing(t testing.TB, body []byte) codes.Code {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), wait)
	defer cancel()
	resp, err := c.cc.Post(ctx, "/telemetry", message.AppSenmlCbor, strings.NewReader(string(body)))
	if err != nil {
		select {
		case <-c.cc.Done():
			return 0
		default:
			t.Fatalf("POST: %v, with the session open", err)
		}
	}
	defer c.cc.ReleaseMessage(resp)
	return resp.Code()
}

// swapConn is a UDP socket that rebind replaces under a live DTLS session,
// as a NAT that rebinds the gateway's port does.
type swapConn struct {
	mu       sync.Mutex
	cur      *net.UDPConn
	deadline time.Time
	closed   bool
}

func newSwapConn() (*swapConn, error) {
	c, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		return nil, err
	}
	return &swapConn{cur: c}, nil
}

func (s *swapConn) conn() (*net.UDPConn, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.cur, s.closed
}

// rebind moves to a new socket (a new source port) and closes the old one.
func (s *swapConn) rebind() (old, new net.Addr, err error) {
	c, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		return nil, nil, err
	}
	s.mu.Lock()
	prev := s.cur
	s.cur = c
	c.SetReadDeadline(s.deadline)
	s.mu.Unlock()
	return prev.LocalAddr(), c.LocalAddr(), prev.Close()
}

func (s *swapConn) ReadFrom(b []byte) (int, net.Addr, error) {
	for {
		c, _ := s.conn()
		n, a, err := c.ReadFrom(b)
		if errors.Is(err, net.ErrClosed) {
			if now, closed := s.conn(); now != c && !closed {
				continue // swapped under the read: go on with the new socket
			}
		}
		return n, a, err
	}
}

func (s *swapConn) WriteTo(b []byte, addr net.Addr) (int, error) {
	c, _ := s.conn()
	return c.WriteTo(b, addr)
}

func (s *swapConn) Close() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return nil
	}
	s.closed = true
	return s.cur.Close()
}

func (s *swapConn) LocalAddr() net.Addr {
	c, _ := s.conn()
	return c.LocalAddr()
}

func (s *swapConn) SetDeadline(t time.Time) error {
	if err := s.SetReadDeadline(t); err != nil {
		return err
	}
	return s.SetWriteDeadline(t)
}

func (s *swapConn) SetReadDeadline(t time.Time) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.deadline = t
	return s.cur.SetReadDeadline(t)
}

func (s *swapConn) SetWriteDeadline(t time.Time) error {
	c, _ := s.conn()
	return c.SetWriteDeadline(t)
}

// batch returns a compact pack of n records numbered from seq, with one
// base name and base time, as an agent sends them.
func batch(device string, seq uint64, n int) senml.Pack {
	p := make(senml.Pack, n)
	p[0].BaseName = new("urn:dev:" + device + ":")
	p[0].BaseTime = new(1.7e9)
	p[0].BaseUnit = new("Cel")
	for i := range p {
		p[i].Name = "temp"
		p[i].Time = new(float64(i))
		p[i].Value = new(20 + float64(i)/10)
		p[i].Seq = seq + uint64(i)
	}
	return p
}

func mustCBOR(t testing.TB, p senml.Pack) []byte {
	t.Helper()
	b, err := p.EncodeCBOR()
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func mustJSON(t testing.TB, p senml.Pack) []byte {
	t.Helper()
	b, err := p.EncodeJSON()
	if err != nil {
		t.Fatal(err)
	}
	return b
}
