// Package mqtt is the agent's MQTT-over-TLS uplink (paho): QoS 1 to
// devices/{id}/telemetry, a retained status with a will, TLS 1.3 session
// resumption so a reconnect needs no TPM signature, and its own reconnect
// loop.
//
// # Why our own reconnect loop
//
// paho.mqtt.golang with auto-reconnect on re-sends stored messages after a
// reconnect and completes the original publish token with no error before
// any PUBACK: a record deleted then is lost if that PUBACK never comes. The
// uplink therefore turns auto-reconnect off, treats paho's in-memory store
// as a cache, and reconnects itself with the project's backoff
// (internal/backoff); the agent's bbolt queue is the source of truth.
package mqtt

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"net"
	"net/url"
	"strings"
	"sync"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"

	"iotagent.dev/iotagent/internal/backoff"
	"iotagent.dev/iotagent/internal/handshake"
	"iotagent.dev/iotagent/telemetry"
	"iotagent.dev/iotagent/telemetry/senml"
)

// Config configures the MQTT uplink. Zero values mean the defaults.
type Config struct {
	// URL is mqtts://HOST:PORT (also accepted: ssl://, tls://). The host
	// is resolved at each connection attempt.
	URL string
	// RootCAs returns the CA certificates that verify the broker; it is
	// called at each handshake, so a trust bundle refreshed by a renewal
	// (a CA rollover) is used at the next connection. Nil: the system
	// roots.
	RootCAs  func() *x509.CertPool
	Identity telemetry.Identity
	// MaxPayload bounds one PUBLISH payload (default 64 KiB).
	MaxPayload int
	// Window is how many PUBLISHes may await their PUBACK (default 8).
	Window int
	// KeepAlive is the MQTT keep-alive (default 30 s); ConnectTimeout
	// bounds dialing, TLS and CONNACK (default 30 s).
	KeepAlive      time.Duration
	ConnectTimeout time.Duration
	// BackoffBase and BackoffCap bound the wait before reconnecting
	// (internal/backoff; defaults 1 s, 5 min).
	BackoffBase time.Duration
	BackoffCap  time.Duration
	// Stats, when set, counts TLS handshakes (shared with other uplinks).
	Stats  *telemetry.TLSStats
	Logger *slog.Logger
	// Version is reported in the retained status message.
	Version string
	Rand    *rand.Rand
	// Command, when set, is called with the op of each command the
	// station publishes to devices/{id}/cmd ({"op":"firmware-check"}),
	// subscribed at QoS 1 on every connection. It must not block.
	Command func(op string)
}

// maxCommandSize bounds a command message; a larger or malformed one is
// logged and dropped.
const maxCommandSize = 1024

// Uplink is the MQTT-over-TLS uplink (paho). It publishes QoS 1 to
// devices/{id}/telemetry, keeps a retained status on devices/{id}/status
// (with a will saying offline), reconnects with its own loop (paho's
// auto-reconnect would complete tokens before their PUBACK: see the
// package doc) and keeps a TLS session cache so that a reconnect resumes
// without a TPM signature when the broker allows it.
// It implements telemetry.Uplink.
type Uplink struct {
	cfg  Config
	log  *slog.Logger
	addr string
	host string
	link *telemetry.Link[paho.Client]

	mu        sync.Mutex
	cache     tls.ClientSessionCache
	cacheFor  <-chan struct{} // identity generation the cache belongs to
	attempts  int
	handshake *pendingHandshake // set by dial, counted by connect
}

// Attempts returns how many connections the uplink has tried.
func (m *Uplink) Attempts() int {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.attempts
}

// ParseURL checks an mqtts://HOST[:PORT] URL (also accepted: ssl://,
// tls://) and returns the broker's HOST:PORT (default port 8883) and host.
func ParseURL(raw string) (addr, host string, err error) {
	u, err := url.Parse(raw)
	if err != nil || u.Host == "" {
		return "", "", fmt.Errorf("uplink URL %q: want mqtts://HOST:PORT", raw)
	}
	switch u.Scheme {
	case "mqtts", "ssl", "tls":
	default:
		return "", "", fmt.Errorf("uplink URL %q: scheme %q is not MQTT over TLS (want mqtts://)", raw, u.Scheme)
	}
	addr = u.Host
	if u.Port() == "" {
		addr = net.JoinHostPort(u.Hostname(), "8883")
	}
	return addr, u.Hostname(), nil
}

// New checks cfg and fills defaults.
func New(cfg Config) (*Uplink, error) {
	addr, host, err := ParseURL(cfg.URL)
	if err != nil {
		return nil, err
	}
	if cfg.Identity == nil {
		return nil, errors.New("MQTT uplink: no device identity")
	}
	def := func(d *time.Duration, v time.Duration) {
		if *d == 0 {
			*d = v
		}
	}
	def(&cfg.KeepAlive, 30*time.Second)
	def(&cfg.ConnectTimeout, 30*time.Second)
	if cfg.MaxPayload == 0 {
		cfg.MaxPayload = 64 << 10
	}
	if cfg.Window == 0 {
		cfg.Window = 8
	}
	if cfg.Stats == nil {
		cfg.Stats = &telemetry.TLSStats{}
	}
	if cfg.Rand == nil {
		cfg.Rand = rand.New(rand.NewPCG(rand.Uint64(), rand.Uint64()))
	}
	m := &Uplink{cfg: cfg, log: cfg.Logger, addr: addr, host: host, link: telemetry.NewLink[paho.Client]()}
	if m.log == nil {
		m.log = slog.New(slog.DiscardHandler)
	}
	return m, nil
}

// Topic returns the telemetry topic of the device.
func (m *Uplink) Topic() string { return "devices/" + m.cfg.Identity.DeviceID() + "/telemetry" }

func (m *Uplink) statusTopic() string { return "devices/" + m.cfg.Identity.DeviceID() + "/status" }

func (m *Uplink) commandTopic() string { return "devices/" + m.cfg.Identity.DeviceID() + "/cmd" }

// command handles one message on the command topic.
func (m *Uplink) command(_ paho.Client, msg paho.Message) {
	var c struct {
		Op string `json:"op"`
	}
	if p := msg.Payload(); len(p) > maxCommandSize || json.Unmarshal(p, &c) != nil || c.Op == "" {
		m.log.Warn("mqtt: ignoring a malformed command", "topic", msg.Topic(), "bytes", len(p))
		return
	}
	m.cfg.Command(c.Op)
}

// Encode renders records as a SenML JSON pack.
func (m *Uplink) Encode(p senml.Pack) ([]byte, error) { return p.EncodeJSON() }

// MaxPayload bounds a payload.
func (m *Uplink) MaxPayload() int { return m.cfg.MaxPayload }

// Window is the in-flight bound.
func (m *Uplink) Window() int { return m.cfg.Window }

// State reports the connection.
func (m *Uplink) State() telemetry.UplinkState { return m.link.State() }

// Ready blocks until connected.
func (m *Uplink) Ready(ctx context.Context) error { return m.link.Ready(ctx) }

// Deliver publishes payload at QoS 1 and waits for its PUBACK.
func (m *Uplink) Deliver(ctx context.Context, payload []byte) error {
	c, ok := m.link.Session()
	if !ok {
		return telemetry.ErrNotConnected
	}
	tok := c.Publish(m.Topic(), 1, false, payload)
	select {
	case <-tok.Done():
	case <-ctx.Done():
		return ctx.Err()
	}
	if err := tok.Error(); err != nil {
		return err
	}
	m.link.Acked()
	return nil
}

// tlsConfig is the uplink's TLS: 1.3 preferred, 1.2 allowed with AEAD
// suites, the device certificate from the live identity, and a session
// cache tied to the current certificate (a resumed session carries the
// identity of the handshake that made it, so a renewed certificate starts
// a new cache).
func (m *Uplink) tlsConfig() *tls.Config {
	var roots *x509.CertPool
	if m.cfg.RootCAs != nil {
		roots = m.cfg.RootCAs()
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	ch := m.cfg.Identity.Changed()
	if m.cache == nil || m.cacheFor != ch {
		m.cache, m.cacheFor = tls.NewLRUClientSessionCache(4), ch
	}
	return &tls.Config{
		MinVersion: tls.VersionTLS12,
		CipherSuites: []uint16{
			tls.TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
			tls.TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
			tls.TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
			tls.TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
			tls.TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
		},
		RootCAs:              roots,
		ServerName:           m.host,
		GetClientCertificate: m.link.ClientCertificate(m.cfg.Identity),
		ClientSessionCache:   m.cache,
	}
}

// dial opens the TLS connection paho speaks over, counting the handshake
// (a TCP connection that cannot be made is no handshake).
func (m *Uplink) dial(ctx context.Context) (net.Conn, error) {
	m.mu.Lock()
	m.handshake = nil // a dial belongs to the connection attempt that makes it
	m.mu.Unlock()
	dctx, cancel := context.WithTimeout(ctx, m.cfg.ConnectTimeout)
	defer cancel()
	raw, err := (&net.Dialer{}).DialContext(dctx, "tcp", m.addr)
	if err != nil {
		return nil, err
	}
	start := time.Now()
	c := tls.Client(raw, m.tlsConfig())
	if err := c.HandshakeContext(dctx); err != nil {
		raw.Close()
		if ctx.Err() == nil {
			m.cfg.Stats.Failed(handshake.TLS(err))
		}
		return nil, fmt.Errorf("TLS handshake with %s: %w", m.addr, err)
	}
	// Counted once the broker has answered CONNECT: in TLS 1.3 a server
	// refuses the client's certificate after the client's handshake is
	// over, with an alert the client reads next.
	m.mu.Lock()
	m.handshake = &pendingHandshake{resumed: c.ConnectionState().DidResume, took: time.Since(start)}
	m.mu.Unlock()
	return c, nil
}

// pendingHandshake is a client-side finished handshake not yet counted.
type pendingHandshake struct {
	resumed bool
	took    time.Duration
}

// countHandshake counts the handshake of a connection attempt that
// ended with err (nil: the broker accepted CONNECT): a failure if the
// broker sent a TLS alert, a success otherwise.
func (m *Uplink) countHandshake(err error) {
	m.mu.Lock()
	hs := m.handshake
	m.handshake = nil
	m.mu.Unlock()
	if hs == nil {
		return
	}
	if err != nil {
		if reason := handshake.TLS(err); strings.HasPrefix(reason, "peer_") {
			m.cfg.Stats.Failed(reason)
			return
		}
	}
	m.cfg.Stats.Succeeded(hs.resumed, hs.took)
}

type statusMessage struct {
	State   string    `json:"state"`
	Version string    `json:"version,omitempty"`
	Time    time.Time `json:"time"`
}

func (m *Uplink) status(state string) []byte {
	b, _ := json.Marshal(statusMessage{State: state, Version: m.cfg.Version, Time: time.Now().UTC()})
	return b
}

// connect makes one connection attempt; it returns the client and a
// channel closed when the connection is lost.
func (m *Uplink) connect(ctx context.Context) (paho.Client, <-chan error, error) {
	m.mu.Lock()
	m.attempts++
	m.mu.Unlock()
	lost := make(chan error, 1)
	opts := paho.NewClientOptions().
		AddBroker("tcp://"+m.addr). // the scheme is unused: connections come from dial
		SetClientID(m.cfg.Identity.DeviceID()).
		SetCleanSession(true).
		// 3.1.1 only: without a version paho retries a refused CONNECT
		// with 3.1, a second dial and handshake (a TPM signature).
		SetProtocolVersion(4).
		SetAutoReconnect(false).
		SetConnectRetry(false).
		SetOrderMatters(false).
		SetKeepAlive(m.cfg.KeepAlive).
		SetPingTimeout(m.cfg.KeepAlive/2+time.Second).
		SetConnectTimeout(m.cfg.ConnectTimeout).
		SetWriteTimeout(m.cfg.ConnectTimeout).
		SetBinaryWill(m.statusTopic(), m.status("offline"), 1, true).
		SetCustomOpenConnectionFn(func(*url.URL, paho.ClientOptions) (net.Conn, error) { return m.dial(ctx) }).
		SetConnectionLostHandler(func(_ paho.Client, err error) {
			select {
			case lost <- err:
			default:
			}
		})
	c := paho.NewClient(opts)
	tok := c.Connect()
	select {
	case <-tok.Done():
	case <-ctx.Done():
		return nil, nil, ctx.Err()
	}
	m.countHandshake(tok.Error())
	if err := tok.Error(); err != nil {
		return nil, nil, err
	}
	st := c.Publish(m.statusTopic(), 1, true, m.status("online"))
	if !st.WaitTimeout(m.cfg.ConnectTimeout) || st.Error() != nil {
		c.Disconnect(0)
		return nil, nil, fmt.Errorf("publishing online status: %v", st.Error())
	}
	if m.cfg.Command != nil {
		// The session is clean: the subscription is made on each
		// connection. A broker that refuses it leaves telemetry working.
		sub := c.Subscribe(m.commandTopic(), 1, m.command)
		if !sub.WaitTimeout(m.cfg.ConnectTimeout) || sub.Error() != nil {
			m.log.Warn("mqtt: subscribing to commands failed; the station's nudges are not heard (polling continues)", "topic", m.commandTopic(), "err", sub.Error())
		} else if st, ok := sub.(*paho.SubscribeToken); ok && len(st.Result()) > 0 && st.Result()[m.commandTopic()] == 0x80 {
			m.log.Warn("mqtt: the broker refused the command subscription; the station's nudges are not heard (polling continues)", "topic", m.commandTopic())
		}
	}
	return c, lost, nil
}

// Run keeps the uplink connected until ctx ends: connect, serve until the
// connection is lost, back off, again. The backoff is reset after a
// connection that worked (telemetry.SessionWorked). It returns nil when ctx
// ends, after publishing the offline status and disconnecting cleanly.
func (m *Uplink) Run(ctx context.Context) error {
	bo := backoff.New(backoff.Config{Base: m.cfg.BackoffBase, Cap: m.cfg.BackoffCap, Rand: m.cfg.Rand})
	defer m.link.Set(telemetry.LinkStopped, nil)
	for {
		m.link.Set(telemetry.LinkConnecting, nil)
		c, lost, err := m.connect(ctx)
		if ctx.Err() != nil {
			return nil
		}
		if err != nil {
			wait := bo.Fail()
			m.link.Set(telemetry.LinkBackoff, err)
			m.log.Warn("MQTT connection failed", "broker", m.addr, "err", err, "retry_in", wait.Round(time.Millisecond))
			if bo.Sleep(ctx, wait) != nil {
				return nil
			}
			continue
		}
		connectedAt := time.Now()
		m.link.Up(c)
		m.log.Info("MQTT connected", "broker", m.addr, "device", m.cfg.Identity.DeviceID())

		var lostErr error
		select {
		case <-ctx.Done():
		case lostErr = <-lost:
		}
		if ctx.Err() != nil {
			m.link.Set(telemetry.LinkStopped, nil)
			st := c.Publish(m.statusTopic(), 1, true, m.status("offline"))
			st.WaitTimeout(time.Second)
			c.Disconnect(250)
			return nil
		}
		m.log.Warn("MQTT connection lost", "err", lostErr)
		if telemetry.SessionWorked(connectedAt, bo.Cap()) {
			bo.Reset()
		}
		m.link.Set(telemetry.LinkBackoff, lostErr)
		if bo.Sleep(ctx, bo.Fail()) != nil {
			return nil
		}
	}
}
