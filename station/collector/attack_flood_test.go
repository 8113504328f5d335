package collector_test

import (
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"net"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	piondtls "github.com/pion/dtls/v3"
	"github.com/pion/dtls/v3/pkg/crypto/elliptic"
	"github.com/pion/dtls/v3/pkg/protocol"
	"github.com/pion/dtls/v3/pkg/protocol/extension"
	"github.com/pion/dtls/v3/pkg/protocol/handshake"
	"github.com/pion/dtls/v3/pkg/protocol/recordlayer"
	"github.com/plgd-dev/go-coap/v3/message"
	"github.com/plgd-dev/go-coap/v3/message/codes"

	"iotagent.dev/iotagent/dtls"
	"iotagent.dev/iotagent/internal/leakcheck"
	"iotagent.dev/iotagent/station/collector"
)

// prompt bounds how long a device may take to get its records in while
// the collector is under attack: generous for a noisy machine, far below
// the 10 s a stalled handshake holds on to what it took.
const prompt = 5 * time.Second

// rawHello is a raw DTLS 1.2 ClientHello as a pion client sends it: the first
// (message_seq 0, no cookie) or, with the cookie of a HelloVerifyRequest,
// the second (message_seq 1). The two of one handshake share random.
func rawHello(random [handshake.RandomBytesLength]byte, cookie []byte) ([]byte, error) {
	seq := uint16(0)
	if cookie != nil {
		seq = 1
	}
	r := &recordlayer.RecordLayer{
		Header: recordlayer.Header{Version: protocol.Version1_2, SequenceNumber: uint64(seq)},
		Content: &handshake.Handshake{
			Header: handshake.Header{MessageSequence: seq},
			Message: &handshake.MessageClientHello{
				Version:            protocol.Version1_2,
				Random:             handshake.Random{GMTUnixTime: time.Unix(1.7e9, 0), RandomBytes: random},
				Cookie:             cookie,
				CipherSuiteIDs:     []uint16{uint16(piondtls.TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256)},
				CompressionMethods: []*protocol.CompressionMethod{{}}, // null
				Extensions: []extension.Extension{
					&extension.SupportedEllipticCurves{EllipticCurves: []elliptic.Curve{elliptic.P256}},
					&extension.SupportedPointFormats{PointFormats: []elliptic.CurvePointFormat{elliptic.CurvePointFormatUncompressed}},
					&extension.UseExtendedMasterSecret{Supported: true},
					&extension.ConnectionID{CID: []byte{}},
				},
			},
		},
	}
	return r.Marshal()
}

// helloVerifyCookie returns the cookie of the HelloVerifyRequest in
// datagram.
func helloVerifyCookie(datagram []byte) ([]byte, error) {
	var r recordlayer.RecordLayer
	if err := r.Unmarshal(datagram); err != nil {
		return nil, err
	}
	h, ok := r.Content.(*handshake.Handshake)
	if !ok {
		return nil, errors.New("not a handshake record")
	}
	v, ok := h.Message.(*handshake.MessageHelloVerifyRequest)
	if !ok {
		return nil, errors.New("not a HelloVerifyRequest")
	}
	return v.Cookie, nil
}

// floodSource is the i-th of many loopback addresses (127.1.0.0/16) that
// stand for spoofed sources.
func floodSource(i int) net.IP { return net.IPv4(127, 1, byte(i>>8), byte(i)) }

// flood sends cookie-less ClientHellos to addr at about perSecond, each
// from a new socket (a new source port) on sources(i), and never reads an
// answer: it is an attacker with spoofed source addresses. It stops at
// cleanup, or at stop.
type flood struct {
	sent atomic.Int64
	stop func()
}

func startFlood(t testing.TB, addr net.Addr, perSecond int, sources func(i int) net.IP) *flood {
	t.Helper()
	f := &flood{}
	done := make(chan struct{})
	var wg sync.WaitGroup
	const tick = 10 * time.Millisecond
	perTick := max(1, perSecond*int(tick)/int(time.Second))
	wg.Go(func() {
		tk := time.NewTicker(tick)
		defer tk.Stop()
		var random [handshake.RandomBytesLength]byte
		for i := 0; ; {
			select {
			case <-done:
				return
			case <-tk.C:
			}
			for range perTick {
				pc, err := net.ListenUDP("udp4", &net.UDPAddr{IP: sources(i)})
				i++
				if err != nil {
					continue // the port range is briefly exhausted
				}
				rand.Read(random[:])
				if b, err := rawHello(random, nil); err == nil {
					pc.WriteTo(b, addr)
				}
				pc.Close()
				f.sent.Add(1)
			}
		}
	})
	f.stop = sync.OnceFunc(func() {
		close(done)
		wg.Wait()
	})
	t.Cleanup(f.stop)
	return f
}

// staller is a client at a real address that returns the cookie, so that
// its handshake passes the HelloVerifyRequest, and then goes silent: what
// an attacker who does not spoof can do. answered reports whether the
// collector answered its first ClientHello. Close pc at cleanup.
func staller(src net.IP, addr net.Addr) (pc net.PacketConn, answered bool, err error) {
	pc, err = net.ListenUDP("udp4", &net.UDPAddr{IP: src})
	if err != nil {
		return nil, false, err
	}
	var random [handshake.RandomBytesLength]byte
	rand.Read(random[:])
	first, err := rawHello(random, nil)
	if err == nil {
		_, err = pc.WriteTo(first, addr)
	}
	if err != nil {
		return pc, false, err
	}
	buf := make([]byte, 2048)
	pc.SetReadDeadline(time.Now().Add(500 * time.Millisecond))
	n, _, err := pc.ReadFrom(buf)
	if err != nil {
		return pc, false, nil // refused
	}
	cookie, err := helloVerifyCookie(buf[:n])
	if err != nil {
		return pc, true, fmt.Errorf("answer to a ClientHello: %w", err)
	}
	second, err := rawHello(random, cookie)
	if err == nil {
		_, err = pc.WriteTo(second, addr)
	}
	return pc, true, err
}

// stall starts n stallers at src at once and returns how many were
// answered.
func stall(t testing.TB, n int, src net.IP, addr net.Addr) int {
	t.Helper()
	var (
		mu       sync.Mutex
		answered int
		wg       sync.WaitGroup
	)
	for range n {
		wg.Go(func() {
			pc, ok, err := staller(src, addr)
			mu.Lock()
			defer mu.Unlock()
			if pc != nil {
				t.Cleanup(func() { pc.Close() })
			}
			if err != nil {
				t.Error(err)
			}
			if ok {
				answered++
			}
		})
	}
	wg.Wait()
	return answered
}

// deliver dials the collector as device, from the loopback address
// 127.0.0.1, and posts a batch, failing t unless all of it is done within
// prompt.
func deliver(t *testing.T, f *fixture, c *collector.Collector, out *lines, device string) {
	t.Helper()
	start := time.Now()
	cl, err := dial(t, c.Addr(), issue(t, f.st, device, nil, false), f.roots, dialOptions{})
	if err != nil {
		t.Fatalf("%s: dial under attack after %v: %v (stats %+v)", device, time.Since(start).Round(time.Millisecond), err, c.Stats())
	}
	hs := time.Since(start)
	if code, diag := cl.post(t, "/telemetry", message.AppSenmlCbor, mustCBOR(t, batch(device, 1, 5))); code != codes.Changed {
		t.Fatalf("%s: POST under attack = %v %q, want 2.04", device, code, diag)
	}
	took := time.Since(start)
	t.Logf("%s: handshake %v, delivered %v after dialing", device, hs.Round(time.Millisecond), took.Round(time.Millisecond))
	if took > prompt {
		t.Errorf("%s: delivered %v after dialing, want within %v", device, took.Round(time.Millisecond), prompt)
	}
	n := 0
	for _, l := range out.read(t) {
		if l.Device == device {
			n++
		}
	}
	if n != 5 {
		t.Errorf("%s: %d records in the sink, want 5", device, n)
	}
}

// pionGoroutines counts the goroutines of pion's connections: each
// handshake pion runs has a few.
func pionGoroutines() int { return len(leakcheck.Goroutines("pion/dtls")) }

// Cookie-less ClientHellos from spoofed sources, far more than
// MaxHandshakes and faster than the handshake timeout lets stalled
// handshakes go, keep no device out: a peer takes a handshake slot only
// once it returned the cookie, which a spoofed source cannot; what the
// others hold is bounded by MaxPendingHandshakes.
func TestAttackCookielessHelloFlood(t *testing.T) {
	checkGoroutines(t)
	f := newFixture(t)
	c, out := f.start(t, collector.Config{})
	fl := startFlood(t, c.Addr(), 2000, floodSource)
	// Past MaxHandshakes, then past MaxPendingHandshakes: the oldest
	// pending handshakes go as new ClientHellos come.
	waitFor(t, func() bool { return c.Stats().PendingEvicted > 0 }, "pending handshakes evicted")

	deliver(t, f, c, out, "gw-flood-1")
	s := c.Stats()
	if s.HandshakesInProgress > 1 {
		t.Errorf("Stats().HandshakesInProgress = %d under a cookie-less flood, want at most 1 (a device's)", s.HandshakesInProgress)
	}
	if s.HandshakesPending > collector.DefaultMaxPendingHandshakes {
		t.Errorf("Stats().HandshakesPending = %d, want at most MaxPendingHandshakes %d", s.HandshakesPending, collector.DefaultMaxPendingHandshakes)
	}
	// A few goroutines per pending handshake (go-coap's, pion's), and
	// none for the ClientHellos beyond.
	if n, most := pionGoroutines(), 4*collector.DefaultMaxPendingHandshakes+100; n > most {
		t.Errorf("%d pion goroutines under the flood, want at most %d", n, most)
	}
	deliver(t, f, c, out, "gw-flood-2")
	fl.stop()
	s = c.Stats()
	t.Logf("%d ClientHellos sent; handshakes %v, pending %d, evicted %d, dropped %v", fl.sent.Load(), s.Handshakes, s.HandshakesPending, s.PendingEvicted, s.Dropped)
}

// When the flood outpaces MaxPendingHandshakes, the oldest pending
// handshakes go: a client too slow to return its cookie in time is told
// so when it does (an alert), and starts over, rather than retransmitting
// into the void until its handshake times out.
func TestAttackEvictedClientStartsOver(t *testing.T) {
	checkGoroutines(t)
	f := newFixture(t)
	c, out := f.start(t, collector.Config{MaxPendingHandshakes: 8})
	fl := startFlood(t, c.Addr(), 1000, floodSource)
	waitFor(t, func() bool { return c.Stats().PendingEvicted > 0 }, "pending handshakes evicted")

	pc, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	defer pc.Close()
	slow, err := piondtls.ClientWithOptions(slowConn{pc, 200 * time.Millisecond}, c.Addr(),
		piondtls.WithCertificates(issue(t, f.st, "gw-slow", nil, false)), piondtls.WithRootCAs(f.roots),
		piondtls.WithExtendedMasterSecret(piondtls.RequireExtendedMasterSecret))
	if err != nil {
		t.Fatal(err)
	}
	defer slow.Close()
	ctx, cancel := context.WithTimeout(context.Background(), wait)
	defer cancel()
	start := time.Now()
	err = slow.HandshakeContext(ctx)
	took := time.Since(start)
	if err == nil {
		t.Fatal("a client 200 ms away completed its handshake with 8 pending handshakes under a 1000/s flood")
	}
	if r := dtls.HandshakeFailure(err); r != "peer_handshake_failure" || took > prompt {
		t.Errorf("evicted client: handshake failed after %v with %v (%s), want peer_handshake_failure within %v", took.Round(time.Millisecond), err, r, prompt)
	}
	if n := c.Stats().Dropped["stale_hello"]; n == 0 {
		t.Errorf(`Stats().Dropped["stale_hello"] = 0 after an evicted client returned its cookie`)
	}
	fl.stop()
	deliver(t, f, c, out, "gw-after-flood")
}

// slowConn is a client socket whose datagrams take delay to leave.
type slowConn struct {
	net.PacketConn
	delay time.Duration
}

func (s slowConn) WriteTo(b []byte, addr net.Addr) (int, error) {
	time.Sleep(s.delay)
	return s.PacketConn.WriteTo(b, addr)
}

// One address spraying cookie-less ClientHellos from many ports is
// bounded as any spoofed flood is: its handshakes count against
// MaxPendingHandshakes, not against the address's MaxHandshakesPerSource
// (a spoofer may forge any address), and take no slot.
func TestAttackCookielessHellosPerSource(t *testing.T) {
	checkGoroutines(t)
	f := newFixture(t)
	c, out := f.start(t, collector.Config{})
	attacker := net.IPv4(127, 0, 0, 3)
	fl := startFlood(t, c.Addr(), 1000, func(int) net.IP { return attacker })
	waitFor(t, func() bool { return c.Stats().PendingEvicted > 0 }, "pending handshakes evicted")
	s := c.Stats()
	if s.HandshakesPending > collector.DefaultMaxPendingHandshakes {
		t.Errorf("Stats().HandshakesPending = %d from one address, want at most MaxPendingHandshakes %d", s.HandshakesPending, collector.DefaultMaxPendingHandshakes)
	}
	if n := s.Dropped["source_limit"]; n != 0 {
		t.Errorf(`Stats().Dropped["source_limit"] = %d with cookie-less ClientHellos only, want 0`, n)
	}
	deliver(t, f, c, out, "gw-source-1")
	if n := c.Stats().HandshakesInProgress; n > 1 {
		t.Errorf("Stats().HandshakesInProgress = %d under a cookie-less flood, want at most 1 (a device's)", n)
	}
	fl.stop()
}

// One address that returns cookies from many ports and then stalls holds
// at most MaxHandshakesPerSource handshake slots: the cookies past it are
// dropped, and so are its first ClientHellos while it holds them; devices
// at other addresses get through.
func TestAttackStalledHandshakesPerSource(t *testing.T) {
	checkGoroutines(t)
	f := newFixture(t)
	c, out := f.start(t, collector.Config{})
	attacker := net.IPv4(127, 0, 0, 2)
	answered := 0
	for range 6 { // in rounds: a burst would overflow pion's accept queue
		answered += stall(t, (collector.DefaultMaxHandshakes+44)/6, attacker, c.Addr())
	}
	t.Logf("%d of %d stalled handshakes got a HelloVerifyRequest", answered, collector.DefaultMaxHandshakes+44)
	want := min(answered, collector.DefaultMaxHandshakesPerSource)
	waitFor(t, func() bool { return c.Stats().HandshakesInProgress == want }, "%d of the stallers' cookies in", want)
	s := c.Stats()
	if s.HandshakesInProgress > collector.DefaultMaxHandshakesPerSource || s.Dropped["source_limit"] == 0 {
		t.Errorf("with one stalling address: Stats().HandshakesInProgress = %d, Dropped[source_limit] = %d; want at most MaxHandshakesPerSource %d, and some",
			s.HandshakesInProgress, s.Dropped["source_limit"], collector.DefaultMaxHandshakesPerSource)
	}
	deliver(t, f, c, out, "gw-stall-1")
}

// Cookie-less ClientHellos that claim a device's own address, from any
// ports, do not lock the device out: they are what a spoofed source can
// send, and only handshakes whose cookie came back count against their
// source's MaxHandshakesPerSource; the others count against
// MaxPendingHandshakes alone. Were they counted, MaxHandshakesPerSource
// spoofed ClientHellos a HandshakeTimeout would keep a device, a NAT'd
// site or an IPv6 /64 out.
func TestAttackSpoofedSourceLocksOutDevice(t *testing.T) {
	checkGoroutines(t)
	f := newFixture(t)
	c, out := f.start(t, collector.Config{})
	device := net.IPv4(127, 0, 0, 1) // dial's address
	fl := startFlood(t, c.Addr(), 100, func(int) net.IP { return device })
	waitFor(t, func() bool { return c.Stats().HandshakesPending >= collector.DefaultMaxHandshakesPerSource },
		"MaxHandshakesPerSource (%d) spoofed handshakes pending from the device's address", collector.DefaultMaxHandshakesPerSource)

	deliver(t, f, c, out, "gw-spoofed-1")
	deliver(t, f, c, out, "gw-spoofed-2")
	fl.stop()
	s := c.Stats()
	if n := s.Dropped["source_limit"]; n != 0 {
		t.Errorf(`Stats().Dropped["source_limit"] = %d with spoofed ClientHellos only, want 0`, n)
	}
	t.Logf("%d ClientHellos sent; handshakes %v, pending %d", fl.sent.Load(), s.Handshakes, s.HandshakesPending)
}
