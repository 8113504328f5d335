// Package coap is the agent's CoAP-over-DTLS uplink: go-coap v3 over the
// project's DTLS (package dtls) with the TPM-held key.
//
// It is for lossy, NATed, metered links: records are SenML CBOR batches in
// confirmable CoAP POSTs sized to one datagram; the Connection ID
// (RFC 9146) keeps the session when a NAT rebinds the gateway's port; and
// the session state is sealed with a key kept in the TPM and stored, so a
// restarted agent resumes without a handshake and without a TPM signature.
// The collector that receives it is station code (station/collector).
package coap

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
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	coapdtls "github.com/plgd-dev/go-coap/v3/dtls"
	"github.com/plgd-dev/go-coap/v3/message"
	"github.com/plgd-dev/go-coap/v3/message/codes"
	"github.com/plgd-dev/go-coap/v3/net/blockwise"
	"github.com/plgd-dev/go-coap/v3/options"
	"github.com/plgd-dev/go-coap/v3/pkg/runner/periodic"
	udpclient "github.com/plgd-dev/go-coap/v3/udp/client"

	"iotagent.dev/iotagent/dtls"
	"iotagent.dev/iotagent/internal/backoff"
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

// DefaultPort is coaps' port (RFC 7252 §12.7).
const DefaultPort = "5684"

// Config configures the CoAP-over-DTLS uplink. Zero values mean the
// defaults.
type Config struct {
	// URL is coaps://HOST[:PORT] (default port 5684). The host is resolved
	// at each connection attempt: an agent that boots offline starts
	// anyway, and the uplink follows a change of the collector's address.
	URL string
	// RootCAs returns the CA certificates that verify the collector; it is
	// called at each handshake, so a trust bundle refreshed by a renewal
	// (a CA rollover) is used at the next one. Required.
	RootCAs  func() *x509.CertPool
	Identity telemetry.Identity
	// Resolver looks up the collector's host (default net.DefaultResolver).
	Resolver *net.Resolver
	// Sessions and Sealer persist the session across restarts; both nil
	// disables resumption.
	Sessions SessionStore
	Sealer   *dtls.Sealer
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
	// BackoffBase and BackoffCap bound the wait before reconnecting
	// (internal/backoff; defaults 1 s, 5 min).
	BackoffBase time.Duration
	BackoffCap  time.Duration
	Stats       *telemetry.TLSStats
	Logger      *slog.Logger
}

// session is one live DTLS session and the CoAP client on it.
type session struct {
	cc     *udpclient.Conn
	pc     *dtls.RebindableConn
	fails  atomic.Int32  // consecutive failed deliveries
	broken chan struct{} // closed when the session is declared dead
	once   sync.Once
}

func (s *session) breakOff() { s.once.Do(func() { close(s.broken) }) }

// Uplink delivers telemetry in confirmable CoAP POSTs to /telemetry,
// SenML CBOR (content-format 112), over DTLS with the TPM key. It
// implements telemetry.Uplink.
type Uplink struct {
	cfg  Config
	log  *slog.Logger
	host string
	port int
	rng  *mrand.Rand
	link *telemetry.Link[*session]

	mu        sync.Mutex
	handshake int // full handshakes made
	resumed   int // sessions resumed from the store

	// nextMID is the CoAP message ID the next client starts from (Run's
	// goroutine only). It is kept with the sealed session: a resumed
	// session is the collector's same connection, whose cache of recent
	// message IDs (RFC 7252 §4.5) would take reused IDs for duplicates
	// and answer them from the cache.
	nextMID uint16
}

// errRenewed ends a session whose certificate was renewed: the next one
// presents the new certificate in a full handshake.
var errRenewed = errors.New("device certificate renewed")

// errSessionLost ends a session that died (the collector forgot it, the
// link is down) or that the collector refused.
var errSessionLost = errors.New("session lost")

// ParseURL checks a coaps://HOST[:PORT] URL and returns its host and port
// (default DefaultPort). The host is not resolved.
func ParseURL(raw string) (host string, port int, err error) {
	u, err := url.Parse(raw)
	if err != nil || u.Scheme != "coaps" || u.Hostname() == "" {
		return "", 0, fmt.Errorf("uplink URL %q: want coaps://HOST[:PORT]", raw)
	}
	portText := u.Port()
	if portText == "" {
		portText = DefaultPort
	}
	port, err = strconv.Atoi(portText)
	if err != nil || port <= 0 || port > 65535 {
		return "", 0, fmt.Errorf("uplink URL %q: port %q is not a UDP port", raw, portText)
	}
	return u.Hostname(), port, nil
}

// New checks cfg. It does not resolve the collector's host: Run does, at
// each connection attempt.
func New(cfg Config) (*Uplink, error) {
	host, port, err := ParseURL(cfg.URL)
	if err != nil {
		return nil, err
	}
	if cfg.Identity == nil {
		return nil, errors.New("CoAP uplink: no device identity")
	}
	if cfg.RootCAs == nil {
		return nil, errors.New("CoAP uplink: no CA certificates to verify the collector")
	}
	if (cfg.Sessions == nil) != (cfg.Sealer == nil) {
		return nil, errors.New("CoAP uplink: session store and sealer go together")
	}
	if cfg.Resolver == nil {
		cfg.Resolver = net.DefaultResolver
	}
	if cfg.AckTimeout == 0 {
		cfg.AckTimeout = 2 * time.Second
	}
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
	up := &Uplink{cfg: cfg, log: cfg.Logger, host: host, port: port,
		link: telemetry.NewLink[*session](), rng: mrand.New(mrand.NewPCG(mrand.Uint64(), mrand.Uint64()))}
	up.nextMID = uint16(up.rng.Uint32())
	if up.log == nil {
		up.log = slog.New(slog.DiscardHandler)
	}
	return up, nil
}

// Encode renders records as a SenML CBOR pack.
func (u *Uplink) Encode(p senml.Pack) ([]byte, error) { return p.EncodeCBOR() }

// MaxPayload bounds a request body.
func (u *Uplink) MaxPayload() int { return u.cfg.MaxPayload }

// Window is the number of requests in flight.
func (u *Uplink) Window() int { return u.cfg.Window }

// State reports the connection.
func (u *Uplink) State() telemetry.UplinkState { return u.link.State() }

// Ready blocks until a session is up.
func (u *Uplink) Ready(ctx context.Context) error { return u.link.Ready(ctx) }

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
	s, ok := u.link.Session()
	if !ok {
		return telemetry.ErrNotConnected
	}
	return s.pc.Rebind()
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
	s, ok := u.link.Session()
	if !ok {
		return telemetry.ErrNotConnected
	}
	// A request never waits longer than CoAP's own retransmission gives it.
	rctx, cancel := context.WithTimeout(ctx, u.exchangeTimeout())
	defer cancel()
	resp, err := s.cc.Post(rctx, "/telemetry", message.AppSenmlCbor, bytes.NewReader(payload))
	if err != nil {
		// Two unanswered in a row: the session is dead (the collector
		// restarted and forgot it, a long outage).
		if ctx.Err() == nil && s.fails.Add(1) >= 2 {
			s.breakOff()
		}
		return fmt.Errorf("CoAP POST /telemetry: %w", err)
	}
	code := resp.Code()
	body, _ := resp.ReadBody()
	s.fails.Store(0) // any answer shows the session alive
	switch code {
	case codes.Changed, codes.Created:
		u.link.Acked()
		return nil
	case codes.BadRequest:
		return fmt.Errorf("%w: collector answered %v: %s", telemetry.ErrRejected, code, body)
	case codes.RequestEntityTooLarge:
		return fmt.Errorf("%w: collector answered %v for %d bytes: %s", telemetry.ErrTooLarge, code, len(payload), body)
	case codes.Unauthorized, codes.Forbidden:
		s.breakOff()
		return fmt.Errorf("collector refused this session (%v: %s); reconnecting", code, body)
	default:
		return fmt.Errorf("collector answered %v: %s", code, body)
	}
}

// resolve looks up the collector's address now.
func (u *Uplink) resolve(ctx context.Context) (*net.UDPAddr, error) {
	ips, err := u.cfg.Resolver.LookupNetIP(ctx, "ip", u.host)
	if err != nil {
		return nil, fmt.Errorf("resolving the collector %s: %w", u.host, err)
	}
	if len(ips) == 0 {
		return nil, fmt.Errorf("resolving the collector %s: no address", u.host)
	}
	return &net.UDPAddr{IP: ips[0].Unmap().AsSlice(), Port: u.port}, nil
}

// connect resolves the collector, then resumes the stored session if there
// is one that still works, or makes a full handshake.
func (u *Uplink) connect(ctx context.Context) (*dtls.Conn, *dtls.RebindableConn, bool, error) {
	raddr, err := u.resolve(ctx)
	if err != nil {
		return nil, nil, false, err
	}
	opts := dtls.ClientOptions(u.link.ClientCertificate(u.cfg.Identity), u.cfg.RootCAs(), u.host)
	if u.cfg.Sessions != nil {
		if sealed, err := u.cfg.Sessions.Get(sessionKey); err == nil && len(sealed) > 0 {
			// Never resume the same state twice: it is gone from the store
			// before it is used.
			if err := u.cfg.Sessions.Put(sessionKey, nil); err != nil {
				return nil, nil, false, err
			}
			start := time.Now()
			if conn, pc, err := u.resume(ctx, raddr, sealed, opts); err == nil {
				u.cfg.Stats.Succeeded(true, time.Since(start))
				return conn, pc, true, nil
			} else {
				u.log.Info("stored DTLS session not resumed; handshaking", "reason", err)
			}
		}
	}
	pc, err := dtls.ListenRebindable(udpNetwork(raddr))
	if err != nil {
		return nil, nil, false, err
	}
	start := time.Now()
	conn, err := dtls.Client(pc, raddr, opts)
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
			u.cfg.Stats.Failed(dtls.HandshakeFailure(err))
		}
		return nil, nil, false, fmt.Errorf("DTLS handshake with %s (%s): %w", u.host, raddr, err)
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
func (u *Uplink) resume(ctx context.Context, raddr *net.UDPAddr, sealed []byte, opts []dtls.ClientOption) (*dtls.Conn, *dtls.RebindableConn, error) {
	opened, err := u.cfg.Sealer.Open(sealed)
	if err != nil {
		return nil, nil, err
	}
	if len(opened) < 3 || opened[0] != sessionFormat {
		return nil, nil, errors.New("stored session of another format")
	}
	u.nextMID = binary.BigEndian.Uint16(opened[1:3])
	state := opened[3:]
	pc, err := dtls.ListenRebindable(udpNetwork(raddr))
	if err != nil {
		return nil, nil, err
	}
	conn, err := dtls.ResumeState(state, pc, raddr, opts)
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
func (u *Uplink) coapClient(conn *dtls.Conn, stop <-chan struct{}) *udpclient.Conn {
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
// session state into the store so the next start resumes it. The
// reconnect backoff is reset after a session that worked
// (telemetry.SessionWorked), and a session a renewal ended reconnects at
// once.
func (u *Uplink) Run(ctx context.Context) error {
	bo := backoff.New(backoff.Config{Base: u.cfg.BackoffBase, Cap: u.cfg.BackoffCap, Rand: u.rng})
	defer u.link.Set(telemetry.LinkStopped, nil)
	for {
		u.link.Set(telemetry.LinkConnecting, nil)
		// A session keeps the certificate it was made with: a renewed one
		// is presented in a new handshake.
		renewed := u.cfg.Identity.Changed()
		conn, pc, resumed, err := u.connect(ctx)
		if ctx.Err() != nil {
			return nil
		}
		if err != nil {
			wait := bo.Fail()
			u.link.Set(telemetry.LinkBackoff, err)
			u.log.Warn("DTLS connection failed", "collector", u.host, "err", err, "retry_in", wait.Round(time.Millisecond))
			if bo.Sleep(ctx, wait) != nil {
				return nil
			}
			continue
		}
		connectedAt := time.Now()
		stop := make(chan struct{})
		s := &session{cc: u.coapClient(conn, stop), pc: pc, broken: make(chan struct{})}
		u.mu.Lock()
		if resumed {
			u.resumed++
		} else {
			u.handshake++
		}
		u.mu.Unlock()
		u.link.Up(s)
		u.log.Info("DTLS session up", "collector", conn.RemoteAddr(), "resumed", resumed)

		why := errSessionLost
		select {
		case <-ctx.Done():
		case <-s.broken:
		case <-s.cc.Done():
		case <-renewed:
			why = errRenewed
		}
		u.link.Set(telemetry.LinkConnecting, why)
		// Nothing may be sent after the state is exported: close the
		// socket first, then export, then let go-coap and pion close
		// (their close_notify cannot leave the closed socket).
		pc.Close()
		u.nextMID = uint16(s.cc.GetMessageID())
		if ctx.Err() != nil && u.cfg.Sessions != nil {
			if err := u.saveSession(conn); err != nil {
				u.log.Warn("saving the DTLS session", "err", err)
			}
		}
		s.cc.Close()
		conn.Close()
		close(stop)
		if ctx.Err() != nil {
			return nil
		}
		u.log.Warn("DTLS session ended; reconnecting", "reason", why)
		if errors.Is(why, errRenewed) {
			bo.Reset()
			continue // the device's own jittered schedule ended it
		}
		if telemetry.SessionWorked(connectedAt, bo.Cap()) {
			bo.Reset()
		}
		u.link.Set(telemetry.LinkBackoff, why)
		if bo.Sleep(ctx, bo.Fail()) != nil {
			return nil
		}
	}
}

// sessionFormat leads the sealed session: the format byte, the next
// CoAP message ID (2 bytes), then the DTLS state.
const sessionFormat = 1

func (u *Uplink) saveSession(conn *dtls.Conn) error {
	state, err := dtls.ExportState(conn)
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
