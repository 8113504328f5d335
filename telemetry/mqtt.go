package telemetry

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

	"iotagent.dev/iotagent/internal/handshake"
	"iotagent.dev/iotagent/telemetry/senml"
)

// Identity is the device credential an uplink presents: the live
// certificate accessor of package enroll.
type Identity interface {
	GetClientCertificate(*tls.CertificateRequestInfo) (*tls.Certificate, error)
	DeviceID() string
	// Changed is closed at the next certificate change.
	Changed() <-chan struct{}
}

// MQTTConfig configures the MQTT uplink. Zero values mean the defaults.
type MQTTConfig struct {
	// URL is mqtts://HOST:PORT (also accepted: ssl://, tls://).
	URL string
	// RootCAs verifies the broker (default: the system roots; the agent
	// passes the station's trust bundle).
	RootCAs  *x509.CertPool
	Identity Identity
	// MaxPayload bounds one PUBLISH payload (default 64 KiB).
	MaxPayload int
	// Window is how many PUBLISHes may await their PUBACK (default 8).
	Window int
	// KeepAlive is the MQTT keep-alive (default 30 s); ConnectTimeout
	// bounds dialing, TLS and CONNACK (default 30 s).
	KeepAlive      time.Duration
	ConnectTimeout time.Duration
	// BackoffBase and BackoffCap bound the wait before reconnecting: a
	// random duration in [0, min(cap, base·2^attempts)) (defaults 1 s, 5 min).
	BackoffBase time.Duration
	BackoffCap  time.Duration
	// Stats, when set, counts TLS handshakes (shared with other uplinks).
	Stats  *TLSStats
	Logger *slog.Logger
	// Version is reported in the retained status message.
	Version string
	Rand    *rand.Rand
}

// MQTT is the MQTT-over-TLS uplink (paho). It publishes QoS 1 to
// devices/{id}/telemetry, keeps a retained status on devices/{id}/status
// (with a will saying offline), reconnects with its own loop (paho's
// auto-reconnect would complete tokens before their PUBACK: see the
// package doc) and keeps a TLS session cache so that a reconnect resumes
// without a TPM signature when the broker allows it.
type MQTT struct {
	cfg  MQTTConfig
	log  *slog.Logger
	addr string
	host string

	mu        sync.Mutex
	client    paho.Client
	connected chan struct{} // closed while connected
	state     UplinkState
	cache     tls.ClientSessionCache
	cacheFor  <-chan struct{} // identity generation the cache belongs to
	lastAck   time.Time
	lastCert  string
	attempts  int
	handshake *pendingHandshake // set by dial, counted by connect
}

// Attempts returns how many connections the uplink has tried.
func (m *MQTT) Attempts() int {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.attempts
}

// UplinkState reports an uplink's connection.
type UplinkState struct {
	// State is connected, connecting, backoff or stopped.
	State     string    `json:"state"`
	Since     time.Time `json:"since"`
	LastError string    `json:"last_error,omitempty"`
	LastAck   time.Time `json:"last_ack,omitzero"`
	// CertSerial is the serial (hex) of the device certificate presented
	// in the last full handshake (a resumed one presents none).
	CertSerial string `json:"cert_serial,omitempty"`
}

// ErrNotConnected is returned by Deliver while the uplink is down.
var ErrNotConnected = errors.New("uplink not connected")

// NewMQTT checks cfg and fills defaults.
func NewMQTT(cfg MQTTConfig) (*MQTT, error) {
	u, err := url.Parse(cfg.URL)
	if err != nil || u.Host == "" {
		return nil, fmt.Errorf("uplink URL %q: want mqtts://HOST:PORT", cfg.URL)
	}
	switch u.Scheme {
	case "mqtts", "ssl", "tls":
	default:
		return nil, fmt.Errorf("uplink URL %q: scheme %q is not MQTT over TLS (want mqtts://)", cfg.URL, u.Scheme)
	}
	if cfg.Identity == nil {
		return nil, errors.New("MQTT uplink: no device identity")
	}
	addr := u.Host
	if u.Port() == "" {
		addr = net.JoinHostPort(u.Hostname(), "8883")
	}
	def := func(d *time.Duration, v time.Duration) {
		if *d == 0 {
			*d = v
		}
	}
	def(&cfg.KeepAlive, 30*time.Second)
	def(&cfg.ConnectTimeout, 30*time.Second)
	def(&cfg.BackoffBase, time.Second)
	def(&cfg.BackoffCap, 5*time.Minute)
	if cfg.MaxPayload == 0 {
		cfg.MaxPayload = 64 << 10
	}
	if cfg.Window == 0 {
		cfg.Window = 8
	}
	if cfg.Stats == nil {
		cfg.Stats = &TLSStats{}
	}
	if cfg.Rand == nil {
		cfg.Rand = rand.New(rand.NewPCG(rand.Uint64(), rand.Uint64()))
	}
	m := &MQTT{cfg: cfg, log: cfg.Logger, addr: addr, host: u.Hostname(), connected: make(chan struct{})}
	if m.log == nil {
		m.log = slog.New(slog.DiscardHandler)
	}
	m.state = UplinkState{State: "connecting", Since: time.Now()}
	return m, nil
}

// Topic returns the telemetry topic of the device.
func (m *MQTT) Topic() string { return "devices/" + m.cfg.Identity.DeviceID() + "/telemetry" }

func (m *MQTT) statusTopic() string { return "devices/" + m.cfg.Identity.DeviceID() + "/status" }

// Encode renders records as a SenML JSON pack.
func (m *MQTT) Encode(p senml.Pack) ([]byte, error) { return p.EncodeJSON() }

// MaxPayload bounds a payload.
func (m *MQTT) MaxPayload() int { return m.cfg.MaxPayload }

// Window is the in-flight bound.
func (m *MQTT) Window() int { return m.cfg.Window }

// State reports the connection.
func (m *MQTT) State() UplinkState {
	m.mu.Lock()
	defer m.mu.Unlock()
	s := m.state
	s.LastAck, s.CertSerial = m.lastAck, m.lastCert
	return s
}

func (m *MQTT) setState(state string, err error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.state = UplinkState{State: state, Since: time.Now()}
	if err != nil {
		m.state.LastError = err.Error()
	}
}

// Ready blocks until connected.
func (m *MQTT) Ready(ctx context.Context) error {
	m.mu.Lock()
	ch := m.connected
	m.mu.Unlock()
	select {
	case <-ch:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// Deliver publishes payload at QoS 1 and waits for its PUBACK.
func (m *MQTT) Deliver(ctx context.Context, payload []byte) error {
	m.mu.Lock()
	c := m.client
	m.mu.Unlock()
	if c == nil {
		return ErrNotConnected
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
	m.mu.Lock()
	m.lastAck = time.Now()
	m.mu.Unlock()
	return nil
}

// tlsConfig is the uplink's TLS: 1.3 preferred, 1.2 allowed with AEAD
// suites, the device certificate from the live identity, and a session
// cache tied to the current certificate (a resumed session carries the
// identity of the handshake that made it, so a renewed certificate starts
// a new cache).
func (m *MQTT) tlsConfig() *tls.Config {
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
		RootCAs:              m.cfg.RootCAs,
		ServerName:           m.host,
		GetClientCertificate: m.clientCertificate,
		ClientSessionCache:   m.cache,
	}
}

// clientCertificate presents the identity's current certificate and notes
// which one it was.
func (m *MQTT) clientCertificate(cri *tls.CertificateRequestInfo) (*tls.Certificate, error) {
	c, err := m.cfg.Identity.GetClientCertificate(cri)
	if err == nil && c != nil && c.Leaf != nil {
		m.mu.Lock()
		m.lastCert = c.Leaf.SerialNumber.Text(16)
		m.mu.Unlock()
	}
	return c, err
}

// dial opens the TLS connection paho speaks over, counting the handshake
// (a TCP connection that cannot be made is no handshake).
func (m *MQTT) dial(ctx context.Context) (net.Conn, error) {
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
func (m *MQTT) countHandshake(err error) {
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

func (m *MQTT) status(state string) []byte {
	b, _ := json.Marshal(statusMessage{State: state, Version: m.cfg.Version, Time: time.Now().UTC()})
	return b
}

// connect makes one connection attempt; it returns the client and a
// channel closed when the connection is lost.
func (m *MQTT) connect(ctx context.Context) (paho.Client, <-chan error, error) {
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
	return c, lost, nil
}

// Run keeps the uplink connected until ctx ends: connect, serve until the
// connection is lost, back off with full jitter, again. It returns nil when
// ctx ends, after publishing the offline status and disconnecting cleanly.
func (m *MQTT) Run(ctx context.Context) error {
	attempts := 0
	for {
		m.setState("connecting", nil)
		c, lost, err := m.connect(ctx)
		if ctx.Err() != nil {
			m.setState("stopped", nil)
			return nil
		}
		if err != nil {
			attempts++
			ceiling := min(m.cfg.BackoffBase<<min(attempts-1, 30), m.cfg.BackoffCap)
			if ceiling <= 0 {
				ceiling = m.cfg.BackoffCap
			}
			wait := time.Duration(m.cfg.Rand.Int64N(int64(ceiling)) + 1)
			m.setState("backoff", err)
			m.log.Warn("MQTT connection failed", "broker", m.addr, "err", err, "retry_in", wait.Round(time.Millisecond))
			select {
			case <-ctx.Done():
				m.setState("stopped", nil)
				return nil
			case <-time.After(wait):
			}
			continue
		}
		connectedAt := time.Now()
		m.mu.Lock()
		m.client = c
		close(m.connected)
		m.state = UplinkState{State: "connected", Since: connectedAt}
		m.mu.Unlock()
		m.log.Info("MQTT connected", "broker", m.addr, "device", m.cfg.Identity.DeviceID())

		var lostErr error
		select {
		case <-ctx.Done():
		case lostErr = <-lost:
		}
		m.mu.Lock()
		m.client = nil
		m.connected = make(chan struct{})
		m.mu.Unlock()
		if ctx.Err() != nil {
			st := c.Publish(m.statusTopic(), 1, true, m.status("offline"))
			st.WaitTimeout(time.Second)
			c.Disconnect(250)
			m.setState("stopped", nil)
			return nil
		}
		m.setState("connecting", lostErr)
		m.log.Warn("MQTT connection lost", "err", lostErr)
		// A connection that lasted resets the backoff; one that dropped at
		// once keeps growing it.
		if time.Since(connectedAt) > m.cfg.BackoffCap {
			attempts = 0
		} else {
			attempts++
			select {
			case <-ctx.Done():
				m.setState("stopped", nil)
				return nil
			case <-time.After(time.Duration(m.cfg.Rand.Int64N(int64(min(m.cfg.BackoffBase<<min(attempts-1, 30), m.cfg.BackoffCap))) + 1)):
			}
		}
	}
}
