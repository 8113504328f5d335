package dtls

import (
	"bytes"
	"context"
	"crypto/x509"
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	mrand "math/rand/v2"
	"net"
	"net/url"
	"sync"
	"time"

	piondtls "github.com/pion/dtls/v3"
	coapdtls "github.com/plgd-dev/go-coap/v3/dtls"
	"github.com/plgd-dev/go-coap/v3/message"
	"github.com/plgd-dev/go-coap/v3/message/codes"
	"github.com/plgd-dev/go-coap/v3/net/blockwise"
	"github.com/plgd-dev/go-coap/v3/options"
	"github.com/plgd-dev/go-coap/v3/pkg/runner/periodic"
	udpclient "github.com/plgd-dev/go-coap/v3/udp/client"

	"iotagent.dev/iotagent/telemetry"
	"iotagent.dev/iotagent/telemetry/senml"
)

// SessionStore keeps the sealed session state between runs: the agent's
// bbolt store (store.Store's Get and Put).
type SessionStore interface {
	Get(key string) ([]byte, error)
	Put(key string, value []byte) error
}

// sessionKey is the store key of the sealed DTLS session.
const sessionKey = "dtls.session"

// UplinkConfig configures the CoAP-over-DTLS uplink. Zero values mean the
// defaults.
type UplinkConfig struct {
	// URL is coaps://HOST[:PORT] (default port 5684).
	URL      string
	RootCAs  *x509.CertPool
	Identity telemetry.Identity
	// Sessions and Sealer persist the session across restarts; both nil
	// disables resumption.
	Sessions SessionStore
	Sealer   *Sealer
	// MaxPayload bounds a request body so one request fits one datagram
	// (default 1152: a 1280-byte IPv6 minimum MTU minus DTLS, CID and CoAP
	// headers).
	MaxPayload int
	// Window is how many confirmable requests may be in flight (CoAP
	// NSTART, default 4; RFC 7252's default of 1 would leave a lossy link
	// idle while a retransmission waits).
	Window int
	// AckTimeout and MaxRetransmit are RFC 7252's ACK_TIMEOUT (default 2 s)
	// and MAX_RETRANSMIT (default 4).
	AckTimeout    time.Duration
	MaxRetransmit uint32
	// BackoffBase and BackoffCap bound the wait before reconnecting, with
	// full jitter (defaults 1 s, 5 min).
	BackoffBase time.Duration
	BackoffCap  time.Duration
	Stats       *telemetry.TLSStats
	Logger      *slog.Logger
}

// Uplink delivers telemetry in confirmable CoAP POSTs to /telemetry,
// SenML CBOR (content-format 112), over DTLS with the TPM key. It
// implements telemetry.Uplink.
type Uplink struct {
	cfg   UplinkConfig
	log   *slog.Logger
	raddr *net.UDPAddr
	host  string
	rng   *mrand.Rand

	mu        sync.Mutex
	client    *udpclient.Conn
	pc        *RebindableConn
	ready     chan struct{}
	state     telemetry.UplinkState
	handshake int // full handshakes made
	resumed   int // sessions resumed from the store
	fails     int // consecutive failed deliveries on this session
	broken    chan struct{}

	// nextMID is the CoAP message ID the next client starts from (Run's
	// goroutine only). It is kept with the sealed session: a resumed
	// session is the collector's same connection, whose cache of recent
	// message IDs (RFC 7252 §4.5) would take reused IDs for duplicates
	// and answer them from the cache.
	nextMID uint16
}

// NewUplink checks cfg and resolves the collector's address.
func NewUplink(cfg UplinkConfig) (*Uplink, error) {
	u, err := url.Parse(cfg.URL)
	if err != nil || u.Scheme != "coaps" || u.Host == "" {
		return nil, fmt.Errorf("uplink URL %q: want coaps://HOST[:PORT]", cfg.URL)
	}
	if cfg.Identity == nil {
		return nil, errors.New("CoAP uplink: no device identity")
	}
	port := u.Port()
	if port == "" {
		port = "5684"
	}
	raddr, err := net.ResolveUDPAddr("udp", net.JoinHostPort(u.Hostname(), port))
	if err != nil {
		return nil, fmt.Errorf("uplink URL %q: %w", cfg.URL, err)
	}
	if (cfg.Sessions == nil) != (cfg.Sealer == nil) {
		return nil, errors.New("CoAP uplink: session store and sealer go together")
	}
	def := func(d *time.Duration, v time.Duration) {
		if *d == 0 {
			*d = v
		}
	}
	def(&cfg.AckTimeout, 2*time.Second)
	def(&cfg.BackoffBase, time.Second)
	def(&cfg.BackoffCap, 5*time.Minute)
	if cfg.MaxPayload == 0 {
		cfg.MaxPayload = 1152
	}
	if cfg.Window == 0 {
		cfg.Window = 4
	}
	if cfg.MaxRetransmit == 0 {
		cfg.MaxRetransmit = 4
	}
	if cfg.Stats == nil {
		cfg.Stats = &telemetry.TLSStats{}
	}
	up := &Uplink{cfg: cfg, log: cfg.Logger, raddr: raddr, host: u.Hostname(), ready: make(chan struct{}),
		rng: mrand.New(mrand.NewPCG(mrand.Uint64(), mrand.Uint64()))}
	up.nextMID = uint16(up.rng.Uint32())
	if up.log == nil {
		up.log = slog.New(slog.DiscardHandler)
	}
	up.state = telemetry.UplinkState{State: "connecting", Since: time.Now()}
	return up, nil
}

// Encode renders records as a SenML CBOR pack.
func (u *Uplink) Encode(p senml.Pack) ([]byte, error) { return p.EncodeCBOR() }

// MaxPayload bounds a request body.
func (u *Uplink) MaxPayload() int { return u.cfg.MaxPayload }

// Window is the number of requests in flight.
func (u *Uplink) Window() int { return u.cfg.Window }

// State reports the connection.
func (u *Uplink) State() telemetry.UplinkState {
	u.mu.Lock()
	defer u.mu.Unlock()
	return u.state
}

// Handshakes returns how many full handshakes and resumptions the uplink
// made.
func (u *Uplink) Handshakes() (full, resumed int) {
	u.mu.Lock()
	defer u.mu.Unlock()
	return u.handshake, u.resumed
}

// Rebind moves the live session to a new local UDP port, as a NAT
// rebinding does. The collector follows through the Connection ID.
func (u *Uplink) Rebind() error {
	u.mu.Lock()
	pc := u.pc
	u.mu.Unlock()
	if pc == nil {
		return telemetry.ErrNotConnected
	}
	return pc.Rebind()
}

// Ready blocks until a session is up.
func (u *Uplink) Ready(ctx context.Context) error {
	u.mu.Lock()
	ch := u.ready
	u.mu.Unlock()
	select {
	case <-ch:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// Deliver posts payload and waits for 2.04 Changed (or 2.01 Created).
// 4.00 Bad Request refuses the payload itself for good
// (telemetry.ErrRejected: resending the same bytes cannot help), and 4.13
// Request Entity Too Large its size (telemetry.ErrTooLarge: the pipeline
// sends the records again in smaller payloads). Every other answer leaves
// the records queued: 4.01 and 4.03 refuse the session's identity (a
// certificate that expired during the session, a revoked one), so the
// session is dropped and the next one handshakes with the current
// certificate; any other code (5.03 from a collector whose sink is down, a
// misconfigured collector) keeps the session and is resent after the
// pipeline's backoff. A request that goes unanswered counts towards
// declaring the session dead.
func (u *Uplink) Deliver(ctx context.Context, payload []byte) error {
	u.mu.Lock()
	cc, broken := u.client, u.broken
	u.mu.Unlock()
	if cc == nil {
		return telemetry.ErrNotConnected
	}
	// A request never waits longer than CoAP's own retransmission gives it.
	rctx, cancel := context.WithTimeout(ctx, u.exchangeTimeout())
	defer cancel()
	resp, err := cc.Post(rctx, "/telemetry", message.AppSenmlCbor, bytes.NewReader(payload))
	if err != nil {
		if ctx.Err() == nil {
			u.noteFailure(broken, false)
		}
		return fmt.Errorf("CoAP POST /telemetry: %w", err)
	}
	code := resp.Code()
	body, _ := resp.ReadBody()
	ok := code == codes.Changed || code == codes.Created
	u.mu.Lock()
	u.fails = 0 // any answer shows the session alive
	if ok {
		u.state.LastAck = time.Now()
	}
	u.mu.Unlock()
	switch code {
	case codes.Changed, codes.Created:
		return nil
	case codes.BadRequest:
		return fmt.Errorf("%w: collector answered %v: %s", telemetry.ErrRejected, code, body)
	case codes.RequestEntityTooLarge:
		return fmt.Errorf("%w: collector answered %v for %d bytes: %s", telemetry.ErrTooLarge, code, len(payload), body)
	case codes.Unauthorized, codes.Forbidden:
		u.noteFailure(broken, true)
		return fmt.Errorf("collector refused this session (%v: %s); reconnecting", code, body)
	default:
		return fmt.Errorf("collector answered %v: %s", code, body)
	}
}

// noteFailure counts a failed exchange; two in a row mean the session is
// dead (collector restarted and forgot it, a long outage), and a refused
// identity ends it at once: reconnect.
func (u *Uplink) noteFailure(broken chan struct{}, now bool) {
	u.mu.Lock()
	defer u.mu.Unlock()
	u.fails++
	if (now || u.fails >= 2) && u.broken == broken {
		select {
		case <-broken:
		default:
			close(broken)
		}
	}
}

// connect resumes the stored session if there is one that still works,
// or makes a full handshake.
func (u *Uplink) connect(ctx context.Context) (*piondtls.Conn, *RebindableConn, bool, error) {
	opts := ClientOptions(ClientCertificate(u.cfg.Identity.GetClientCertificate), u.cfg.RootCAs, u.host)
	if u.cfg.Sessions != nil {
		if sealed, err := u.cfg.Sessions.Get(sessionKey); err == nil && len(sealed) > 0 {
			// Never resume the same state twice: it is gone from the store
			// before it is used.
			if err := u.cfg.Sessions.Put(sessionKey, nil); err != nil {
				return nil, nil, false, err
			}
			start := time.Now()
			if conn, pc, err := u.resume(ctx, sealed, opts); err == nil {
				u.cfg.Stats.Succeeded(true, time.Since(start))
				return conn, pc, true, nil
			} else {
				u.log.Info("stored DTLS session not resumed; handshaking", "reason", err)
			}
		}
	}
	pc, err := ListenRebindable(udpNetwork(u.raddr))
	if err != nil {
		return nil, nil, false, err
	}
	start := time.Now()
	conn, err := piondtls.ClientWithOptions(pc, u.raddr, opts...)
	if err == nil {
		hctx, cancel := context.WithTimeout(ctx, 30*time.Second)
		err = conn.HandshakeContext(hctx)
		cancel()
		if err != nil {
			conn.Close()
		}
	}
	if err != nil {
		pc.Close()
		if ctx.Err() == nil {
			u.cfg.Stats.Failed(HandshakeFailure(err))
		}
		return nil, nil, false, fmt.Errorf("DTLS handshake with %s: %w", u.raddr, err)
	}
	u.cfg.Stats.Succeeded(false, time.Since(start))
	return conn, pc, false, nil
}

func udpNetwork(a *net.UDPAddr) string {
	if a.IP.To4() != nil {
		return "udp4"
	}
	return "udp6"
}

// resume revives a sealed session and checks with a CoAP ping that the
// collector still knows it.
func (u *Uplink) resume(ctx context.Context, sealed []byte, opts []piondtls.ClientOption) (*piondtls.Conn, *RebindableConn, error) {
	opened, err := u.cfg.Sealer.Open(sealed)
	if err != nil {
		return nil, nil, err
	}
	if len(opened) < 3 || opened[0] != sessionFormat {
		return nil, nil, errors.New("stored session of another format")
	}
	u.nextMID = binary.BigEndian.Uint16(opened[1:3])
	state := opened[3:]
	pc, err := ListenRebindable(udpNetwork(u.raddr))
	if err != nil {
		return nil, nil, err
	}
	conn, err := ResumeState(state, pc, u.raddr, opts)
	if err != nil {
		pc.Close()
		return nil, nil, err
	}
	stop := make(chan struct{})
	defer close(stop)
	cc := u.coapClient(conn, stop)
	pctx, cancel := context.WithTimeout(ctx, 3*u.cfg.AckTimeout)
	defer cancel()
	err = cc.Ping(pctx)
	u.nextMID = uint16(cc.GetMessageID())
	cc.Close()
	if err != nil {
		pc.Close()
		return nil, nil, fmt.Errorf("the collector does not answer on the stored session: %w", err)
	}
	return conn, pc, nil
}

// coapClient runs go-coap over conn; stop ends its retransmission timer.
func (u *Uplink) coapClient(conn *piondtls.Conn, stop <-chan struct{}) *udpclient.Conn {
	return coapdtls.Client(conn,
		startMID(u.nextMID),
		options.WithTransmission(uint32(u.cfg.Window), u.cfg.AckTimeout, u.cfg.MaxRetransmit),
		// go-coap allows one request in flight per peer unless told.
		options.WithLimitClientParallelRequest(int64(u.cfg.Window)),
		options.WithLimitClientEndpointParallelRequest(int64(u.cfg.Window)),
		// Retransmissions are checked on this timer (go-coap's default is
		// every 4 s, which would hold a lost request well past its
		// ACK_TIMEOUT).
		options.WithPeriodicRunner(periodic.New(stop, max(u.cfg.AckTimeout/8, 10*time.Millisecond))),
		options.WithMTU(uint16(min(u.cfg.MaxPayload+128, 65000))),
		// Payloads are sized to one datagram: block-wise transfer would only
		// add round trips, and its state machine stalls on a lossy link.
		options.WithBlockwise(false, blockwise.SZX1024, time.Minute),
	)
}

// startMID makes a go-coap client number its messages from a given ID on.
type startMID uint16

func (m startMID) UDPClientApply(cfg *udpclient.Config) {
	// The client starts its counter at GetMID() - 0xffff/2 and
	// increments it before each message.
	cfg.GetMID = func() int32 { return int32(m) - 1 + 0xffff/2 }
}

// exchangeTimeout bounds one confirmable exchange: RFC 7252's
// MAX_TRANSMIT_WAIT, ACK_TIMEOUT × (2^(MAX_RETRANSMIT+1) − 1) × 1.5, plus
// a little for the response.
func (u *Uplink) exchangeTimeout() time.Duration {
	return time.Duration(float64(u.cfg.AckTimeout)*float64(int64(1)<<(min(u.cfg.MaxRetransmit, 20)+1)-1)*1.5) + u.cfg.AckTimeout
}

// Run keeps a session up until ctx ends. At a clean stop it seals the
// session state into the store so the next start resumes it.
func (u *Uplink) Run(ctx context.Context) error {
	attempts := 0
	for {
		u.setState("connecting", nil)
		// A session keeps the certificate it was made with: a renewed one
		// is presented in a new handshake.
		renewed := u.cfg.Identity.Changed()
		conn, pc, resumed, err := u.connect(ctx)
		if ctx.Err() != nil {
			u.setState("stopped", nil)
			return nil
		}
		if err != nil {
			attempts++
			wait := u.backoff(attempts)
			u.setState("backoff", err)
			u.log.Warn("DTLS connection failed", "collector", u.raddr, "err", err, "retry_in", wait.Round(time.Millisecond))
			if !sleep(ctx, wait) {
				u.setState("stopped", nil)
				return nil
			}
			continue
		}
		connectedAt := time.Now()
		stop := make(chan struct{})
		cc := u.coapClient(conn, stop)
		broken := make(chan struct{})
		u.mu.Lock()
		u.client, u.pc, u.broken, u.fails = cc, pc, broken, 0
		if resumed {
			u.resumed++
		} else {
			u.handshake++
		}
		close(u.ready)
		u.state = telemetry.UplinkState{State: "connected", Since: time.Now(), LastAck: u.state.LastAck}
		u.mu.Unlock()
		u.log.Info("DTLS session up", "collector", u.raddr, "resumed", resumed)

		why := "session lost"
		select {
		case <-ctx.Done():
		case <-broken:
		case <-cc.Done():
		case <-renewed:
			why = "device certificate renewed"
		}
		u.mu.Lock()
		u.client, u.pc = nil, nil
		u.ready = make(chan struct{})
		u.mu.Unlock()
		// Nothing may be sent after the state is exported: close the
		// socket first, then export, then let go-coap and pion close
		// (their close_notify cannot leave the closed socket).
		pc.Close()
		u.nextMID = uint16(cc.GetMessageID())
		if ctx.Err() != nil && u.cfg.Sessions != nil {
			if err := u.saveSession(conn); err != nil {
				u.log.Warn("saving the DTLS session", "err", err)
			}
		}
		cc.Close()
		conn.Close()
		close(stop)
		if ctx.Err() != nil {
			u.setState("stopped", nil)
			return nil
		}
		u.setState("connecting", errors.New(why))
		u.log.Warn("DTLS session ended; reconnecting", "reason", why)
		// A session that delivered something, or one ended by a renewal,
		// resets the backoff; one that delivered nothing (a collector that
		// accepts the handshake but refuses each request) keeps growing
		// it, so the fleet does not handshake in a loop.
		if why == "device certificate renewed" || u.State().LastAck.After(connectedAt) {
			attempts = 0
			continue
		}
		attempts++
		if !sleep(ctx, u.backoff(attempts)) {
			u.setState("stopped", nil)
			return nil
		}
	}
}

// backoff is the wait before the attempts-th reconnection: exponential,
// full jitter.
func (u *Uplink) backoff(attempts int) time.Duration {
	ceiling := min(u.cfg.BackoffBase<<min(attempts-1, 30), u.cfg.BackoffCap)
	return time.Duration(u.rng.Int64N(int64(ceiling)) + 1)
}

// sleep waits d; false if ctx ended first.
func sleep(ctx context.Context, d time.Duration) bool {
	select {
	case <-ctx.Done():
		return false
	case <-time.After(d):
		return true
	}
}

// sessionFormat leads the sealed session: the format byte, the next
// CoAP message ID (2 bytes), then the DTLS state.
const sessionFormat = 1

func (u *Uplink) saveSession(conn *piondtls.Conn) error {
	state, err := ExportState(conn)
	if err != nil {
		return err
	}
	blob := binary.BigEndian.AppendUint16([]byte{sessionFormat}, u.nextMID)
	sealed, err := u.cfg.Sealer.Seal(append(blob, state...))
	if err != nil {
		return err
	}
	return u.cfg.Sessions.Put(sessionKey, sealed)
}

func (u *Uplink) setState(s string, err error) {
	u.mu.Lock()
	defer u.mu.Unlock()
	last := u.state.LastAck
	u.state = telemetry.UplinkState{State: s, Since: time.Now(), LastAck: last}
	if err != nil {
		u.state.LastError = err.Error()
	}
}
