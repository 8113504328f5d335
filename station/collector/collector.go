package collector

import (
	"cmp"
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"sync"
	"sync/atomic"
	"time"

	coapdtls "github.com/plgd-dev/go-coap/v3/dtls"
	"github.com/plgd-dev/go-coap/v3/options"
	udpclient "github.com/plgd-dev/go-coap/v3/udp/client"

	"iotagent.dev/iotagent/dtls"
)

// Defaults of Config.
const (
	DefaultAddr                   = ":5684" // coaps (RFC 7252 §12.7)
	DefaultMaxPayload             = 64 << 10
	DefaultHandshakeTimeout       = 10 * time.Second
	DefaultIdleTimeout            = 10 * time.Minute
	DefaultSinkTimeout            = 10 * time.Second
	DefaultMaxHandshakes          = 256
	DefaultMaxPendingHandshakes   = 2048
	DefaultMaxHandshakesPerSource = 16
	DefaultDedupeWindow           = 4096
	DefaultDedupeDevices          = 100_000
	DefaultDedupeCheckpoint       = 10 * time.Second
)

// Config configures a Collector. The zero value of a field means its
// default; New copies the Config, which must not be changed afterwards.
type Config struct {
	// Addr is the UDP address to listen on, e.g. "127.0.0.1:0"
	// (default DefaultAddr, every interface).
	Addr string

	// Certificate is the collector's server certificate (issued by the
	// station, with the names devices reach the collector at) and its
	// ECDSA key. Required.
	Certificate tls.Certificate
	// GetCertificate, when set, returns the server certificate for each
	// new handshake (one renewed while serving, station.ServiceIdentity);
	// Certificate is then not needed.
	GetCertificate func() *tls.Certificate

	// ClientCAs verify device certificates: the station's CA certificates
	// (station.TrustPEM). Required.
	ClientCAs *x509.CertPool

	// Revoked reports whether a device certificate is revoked (the
	// station's CRL). It is called at every handshake and every request,
	// from many goroutines at once, and must be fast. Nil means none is.
	Revoked func(*x509.Certificate) bool

	// Sink receives the records. Required.
	Sink Sink

	// MaxPayload is the largest request body accepted, in bytes, whether
	// it comes in one datagram or in blocks (RFC 7959); larger bodies are
	// answered 4.13 (default DefaultMaxPayload).
	MaxPayload int

	// HandshakeTimeout bounds a DTLS handshake, from the client's first
	// ClientHello, waiting for its cookie included (default
	// DefaultHandshakeTimeout).
	HandshakeTimeout time.Duration

	// MaxHandshakes is how many handshakes may be in progress at once
	// past the cookie exchange (RFC 6347 §4.2.1), which a client passes
	// only from an address it receives at: a ClientHello from a spoofed
	// address never takes one. A client's first ClientHello while
	// MaxHandshakes are in progress is dropped (counted as "busy"; its
	// retransmission tries again). It bounds the handshakes' work:
	// signature checks, key exchange (default DefaultMaxHandshakes).
	MaxHandshakes int

	// MaxPendingHandshakes is how many handshakes may wait at once for the
	// client to return the cookie of the HelloVerifyRequest (or, rarely,
	// for one of MaxHandshakes). A flood of ClientHellos from spoofed
	// addresses makes pending handshakes that never go further; past this
	// bound the oldest unverified one (cookie not returned) is dropped
	// first (counted as "no_cookie"). Each holds
	// about 31 KB; under R such ClientHellos a second, a client has about
	// MaxPendingHandshakes/R seconds to return its cookie, or is told to
	// start over (default DefaultMaxPendingHandshakes: 64 MB).
	MaxPendingHandshakes int

	// MaxHandshakesPerSource is how many handshakes past the cookie
	// exchange (waiting for a slot or in progress) one source may have at
	// once: an IPv4 address, or an IPv6 /64. Unverified ones do not count:
	// their source may be forged. A ClientHello past it is dropped (the
	// client retransmits). It keeps one host that does not spoof from taking
	// every slot; devices behind one NAT share it (default
	// DefaultMaxHandshakesPerSource).
	MaxHandshakesPerSource int

	// IdleTimeout closes a session that received nothing for this long
	// (default DefaultIdleTimeout). An agent resuming a session after a
	// longer pause needs a new handshake.
	IdleTimeout time.Duration

	// SinkTimeout bounds one Sink.Write (default DefaultSinkTimeout); a
	// write that takes longer is answered 5.03.
	SinkTimeout time.Duration

	// DedupeWindow is how many sequence numbers above a device's
	// watermark are remembered individually, rounded up to a multiple of
	// 64 (default DefaultDedupeWindow). See the package doc.
	DedupeWindow int

	// DedupeDevices is how many devices' windows are remembered (default
	// DefaultDedupeDevices). See the package doc.
	DedupeDevices int

	// DedupeFile keeps the de-duplication windows across restarts: read
	// when Run starts, written every DedupeCheckpoint while they change
	// and when Run returns (atomically, mode 0600). Empty: memory only.
	// See the package doc.
	DedupeFile string

	// DedupeCheckpoint is how often changed windows are written to
	// DedupeFile (default DefaultDedupeCheckpoint).
	DedupeCheckpoint time.Duration

	// Logger receives the collector's log; nil discards it.
	Logger *slog.Logger

	// Now is the clock records are resolved and certificates checked
	// against during a session (default time.Now). pion checks
	// certificates at the handshake against time.Now.
	Now func() time.Time
}

// Collector serves CoAP telemetry over DTLS. Create it with New and start
// it with Run; Addr, Ready, Stats and Metrics are safe for concurrent use.
type Collector struct {
	cfg    Config
	log    *slog.Logger
	dedupe *dedupe
	m      metrics

	handshakes chan struct{} // a token per handshake in progress past the cookie
	started    atomic.Bool
	ready      chan struct{}
	addr       atomic.Pointer[net.Addr]
	handlers   gate

	listenMu sync.Mutex
	listener *peerListener // set by Listen, served by Run

	saveMu       sync.Mutex
	savedChanges uint64 // dedupe.changes at the last save or load
}

// New checks cfg and returns a Collector that is not serving yet.
func New(cfg Config) (*Collector, error) {
	first := &cfg.Certificate
	if cfg.GetCertificate != nil {
		first = cfg.GetCertificate()
	}
	if first == nil || len(first.Certificate) == 0 {
		return nil, errors.New("collector: no server certificate")
	}
	if err := checkKey(*first); err != nil {
		return nil, fmt.Errorf("collector: server certificate: %w", err)
	}
	if cfg.ClientCAs == nil {
		return nil, errors.New("collector: no client CAs")
	}
	if cfg.Sink == nil {
		return nil, errors.New("collector: no sink")
	}
	for _, f := range []struct {
		name string
		v    int64
	}{
		{"MaxPayload", int64(cfg.MaxPayload)},
		{"HandshakeTimeout", int64(cfg.HandshakeTimeout)},
		{"MaxHandshakes", int64(cfg.MaxHandshakes)},
		{"MaxPendingHandshakes", int64(cfg.MaxPendingHandshakes)},
		{"MaxHandshakesPerSource", int64(cfg.MaxHandshakesPerSource)},
		{"IdleTimeout", int64(cfg.IdleTimeout)},
		{"SinkTimeout", int64(cfg.SinkTimeout)},
		{"DedupeWindow", int64(cfg.DedupeWindow)},
		{"DedupeDevices", int64(cfg.DedupeDevices)},
		{"DedupeCheckpoint", int64(cfg.DedupeCheckpoint)},
	} {
		if f.v < 0 {
			return nil, fmt.Errorf("collector: %s is negative", f.name)
		}
	}
	if cfg.DedupeWindow > maxDedupeWidth {
		return nil, fmt.Errorf("collector: DedupeWindow %d is more than %d", cfg.DedupeWindow, maxDedupeWidth)
	}
	if cfg.MaxPayload > maxPayloadLimit {
		return nil, fmt.Errorf("collector: MaxPayload %d is more than %d", cfg.MaxPayload, maxPayloadLimit)
	}
	setDefault(&cfg.Addr, DefaultAddr)
	setDefault(&cfg.MaxPayload, DefaultMaxPayload)
	setDefault(&cfg.HandshakeTimeout, DefaultHandshakeTimeout)
	setDefault(&cfg.MaxHandshakes, DefaultMaxHandshakes)
	setDefault(&cfg.MaxPendingHandshakes, DefaultMaxPendingHandshakes)
	setDefault(&cfg.MaxHandshakesPerSource, DefaultMaxHandshakesPerSource)
	setDefault(&cfg.IdleTimeout, DefaultIdleTimeout)
	setDefault(&cfg.SinkTimeout, DefaultSinkTimeout)
	setDefault(&cfg.DedupeWindow, DefaultDedupeWindow)
	setDefault(&cfg.DedupeDevices, DefaultDedupeDevices)
	setDefault(&cfg.DedupeCheckpoint, DefaultDedupeCheckpoint)
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	log := cfg.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return &Collector{
		cfg:        cfg,
		log:        log,
		dedupe:     newDedupe(cfg.DedupeWindow, cfg.DedupeDevices),
		handshakes: make(chan struct{}, cfg.MaxHandshakes),
		ready:      make(chan struct{}),
	}, nil
}

// maxPayloadLimit keeps MaxPayload within what go-coap's uint32 sizes and
// a sane station accept.
const maxPayloadLimit = 16 << 20

func setDefault[T comparable](p *T, def T) {
	var zero T
	if *p == zero {
		*p = def
	}
}

// checkKey makes sure the server key can serve the ECDHE_ECDSA suites, the
// only ones offered: otherwise every handshake would fail, later and less
// clearly.
func checkKey(c tls.Certificate) error {
	s, ok := c.PrivateKey.(crypto.Signer)
	if !ok {
		return fmt.Errorf("private key %T is not a crypto.Signer", c.PrivateKey)
	}
	if _, ok := s.Public().(*ecdsa.PublicKey); !ok {
		return fmt.Errorf("key is %T, want ECDSA", s.Public())
	}
	return nil
}

// Addr returns the address the collector listens on (or listened on, once
// Run returned), or nil before it listens.
func (c *Collector) Addr() net.Addr {
	if a := c.addr.Load(); a != nil {
		return *a
	}
	return nil
}

// Ready is closed once Run serves: it listens (Addr is set) and has
// restored the de-duplication windows. It is never closed if Run fails
// before: wait for Run's error too.
func (c *Collector) Ready() <-chan struct{} { return c.ready }

// Listen binds Config.Addr, so that a caller can report a taken port
// before it starts anything else; Run serves on that socket. Run listens
// itself if Listen was not called. Listening twice is an error.
func (c *Collector) Listen() error {
	c.listenMu.Lock()
	defer c.listenMu.Unlock()
	if c.listener != nil {
		return errors.New("collector: Listen called twice")
	}
	_, err := c.listenLocked()
	return err
}

// listenLocked binds the socket. c.listenMu held.
func (c *Collector) listenLocked() (*peerListener, error) {
	a, err := net.ResolveUDPAddr("udp", c.cfg.Addr)
	if err != nil {
		return nil, fmt.Errorf("collector: listening on %s: %w", c.cfg.Addr, err)
	}
	sock, err := net.ListenUDP("udp", a)
	if err != nil {
		return nil, fmt.Errorf("collector: listening on %s: %w", c.cfg.Addr, err)
	}
	l := newPeerListener(sock, c.dtlsOptions(), c.cfg.MaxPendingHandshakes, c.cfg.MaxHandshakesPerSource, c.handshakes, &c.m)
	addr := sock.LocalAddr()
	c.addr.Store(&addr)
	c.listener = l
	c.log.Info("collector listening", "addr", addr.String())
	return l, nil
}

// Run serves until ctx ends, then closes the listener and every session,
// waits for every goroutine it started, saves the de-duplication windows
// (Config.DedupeFile) and returns nil. It returns an error if it cannot
// read the de-duplication file, cannot listen, serving fails, or the final
// save fails. A Collector runs once.
func (c *Collector) Run(ctx context.Context) error {
	if !c.started.CompareAndSwap(false, true) {
		return errors.New("collector: Run called twice")
	}
	c.listenMu.Lock()
	l, err := c.listener, error(nil)
	if l == nil {
		l, err = c.listenLocked()
	}
	c.listenMu.Unlock()
	if err != nil {
		return err
	}
	if err := c.loadDedupe(); err != nil {
		l.shutdown()
		return err
	}
	close(c.ready)
	addr := c.Addr()

	// runCtx scopes handlers and sink writes: it ends with ctx, or when
	// serving fails.
	runCtx, cancel := context.WithCancel(ctx)
	defer cancel()
	var wg sync.WaitGroup
	srv := coapdtls.NewServer(
		options.WithContext(runCtx),
		options.WithHandlerFunc(func(w *responseWriter, r *request) { c.serveCoAP(runCtx, w, r) }),
		options.WithRequestMonitor(c.monitorRequest),
		options.WithErrors(func(err error) {
			if !errors.As(err, new(*dtls.HandshakeError)) && !errors.Is(err, errBusy) && !errors.Is(err, errNoCookie) { // logged already
				c.log.Debug("coap", "err", err)
			}
		}),
		options.WithInactivityMonitor(c.cfg.IdleTimeout, func(cc *udpclient.Conn) {
			c.log.Debug("closing idle session", "remote", cc.RemoteAddr().String())
			cc.Close()
		}),
		options.WithDTLSHandshakeTimeout(c.cfg.HandshakeTimeout),
		// Decrypted datagrams are at most what pion reads (8 KiB); blocks
		// assemble up to MaxPayload, which monitorRequest enforces.
		options.WithMaxMessageSize(uint32(max(c.cfg.MaxPayload, maxDatagram)+1024)),
		options.WithMTU(maxDatagram),
		// go-coap's default runner sleeps in a goroutine nobody waits for.
		options.WithPeriodicRunner(func(f func(time.Time) bool) {
			wg.Go(func() { runPeriodically(runCtx, time.Second, f) })
		}),
	)
	if c.cfg.DedupeFile != "" {
		wg.Go(func() { c.checkpointDedupe(runCtx) })
	}
	sl := &coapListener{peers: l, c: c}
	served := make(chan error, 1)
	wg.Go(func() { served <- srv.Serve(sl) })
	select {
	case <-ctx.Done():
		srv.Stop()
		err = <-served
	case err = <-served:
		if ctx.Err() == nil { // go-coap may notice ctx first
			err = cmp.Or(err, sl.err, errors.New("stopped serving"))
		}
	}
	cancel()
	l.shutdown() // the sessions are closed: the socket, and its reader
	c.handlers.closeAndWait()
	wg.Wait()
	serr := c.saveDedupe() // no handler runs now: the final state
	c.log.Info("collector stopped", "addr", addr.String())
	if err != nil {
		return errors.Join(fmt.Errorf("collector: serving: %w", err), serr)
	}
	return serr
}

// maxDatagram is the largest datagram pion's listener reads (its receive
// buffer): no decrypted CoAP message is larger.
const maxDatagram = 8192

// runPeriodically calls f every period until ctx ends or f returns false.
func runPeriodically(ctx context.Context, period time.Duration, f func(time.Time) bool) {
	t := time.NewTicker(period)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case now := <-t.C:
			if !f(now) {
				return
			}
		}
	}
}

// dtlsOptions are the pion server options: the project's DTLS settings
// (package dtls), with the collector's own check of each device.
func (c *Collector) dtlsOptions() []dtls.ServerOption {
	return dtls.ServerOptions(dtls.ServerConfig{Certificate: c.cfg.Certificate, GetCertificate: c.cfg.GetCertificate, ClientCAs: c.cfg.ClientCAs, VerifyPeer: c.verifyPeer, Logger: c.log})
}

// gate lets handlers in until it is closed, then waits for those inside.
// (A bare WaitGroup would race: go-coap may start a handler while Run
// waits.)
type gate struct {
	mu     sync.Mutex
	closed bool
	wg     sync.WaitGroup
}

func (g *gate) enter() bool {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.closed {
		return false
	}
	g.wg.Add(1)
	return true
}

func (g *gate) leave() { g.wg.Done() }

func (g *gate) closeAndWait() {
	g.mu.Lock()
	g.closed = true
	g.mu.Unlock()
	g.wg.Wait()
}
