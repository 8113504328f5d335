// Package demobroker is an MQTT broker embedded in iotstation for the demo
// on machines without mosquitto. It is for the demo only: production fleets
// run a real broker (mosquitto, EMQX, …) configured as the README shows.
//
// It applies the same policy as that mosquitto configuration: mutual TLS
// with certificates from the station's CA, the identity (user name and
// client ID) taken from the certificate's CN, the station's CRL at
// handshake and on live connections (a client whose certificate is
// revoked is disconnected within Config.RevocationCheck, as the station
// makes mosquitto do through its dynamic-security plugin), and the
// per-device ACL: a device writes devices/ID/telemetry,
// reads and writes devices/ID/status, reads devices/ID/cmd; the backend
// client fleet-reader reads devices/#; coap-collector writes
// devices/+/telemetry.
package demobroker

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"net"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/listeners"
	"github.com/mochi-mqtt/server/v2/packets"

	"iotagent.dev/iotagent/internal/atomicfile"
	"iotagent.dev/iotagent/station"
)

// ReaderName is the backend client allowed to read every device's topics;
// RepublisherName the station's CoAP collector, which writes what devices
// sent over CoAP into their telemetry topics.
const (
	ReaderName      = "fleet-reader"
	RepublisherName = "coap-collector"
)

// Config configures the broker.
type Config struct {
	// Addr to listen on (HOST:PORT).
	Addr string
	// Certificate is the broker's server certificate (iotstation issue
	// --server); ClientCAs verifies devices.
	Certificate tls.Certificate
	ClientCAs   *x509.CertPool
	// Revoked reports whether a certificate is revoked (the station's
	// CRL); nil accepts all. It is asked at each handshake, at each
	// publish and subscription, and every RevocationCheck for each
	// connected client, which is disconnected once it answers true.
	Revoked func(*x509.Certificate) bool
	// RevocationCheck is how often connected clients' certificates are
	// checked against Revoked (default 1 s): how long a revoked client
	// that publishes nothing keeps its connection.
	RevocationCheck time.Duration
	// ReaderFirst admits devices only once the fleet reader has
	// subscribed. The embedded broker keeps no sessions across a restart,
	// so without this a device reconnecting faster than the reader would
	// publish into no subscription; mosquitto with persistence needs no such
	// help.
	ReaderFirst bool
	// TicketKeyFile, when set, keeps the keys that encrypt the TLS
	// session tickets the broker issues (see LoadTicketKeys), so that a
	// device reconnecting after a broker restart resumes its session
	// without a new handshake (no TPM signature). Without it each process
	// draws its own keys, as mosquitto does.
	TicketKeyFile string
	Logger        *slog.Logger
}

// Broker is the embedded broker.
type Broker struct {
	cfg Config
	srv *mqtt.Server
	tls *tls.Config
}

// New builds the broker.
func New(cfg Config) (*Broker, error) {
	if cfg.Addr == "" || cfg.ClientCAs == nil {
		return nil, errors.New("demobroker: address and client CAs are required")
	}
	log := cfg.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	if cfg.RevocationCheck <= 0 {
		cfg.RevocationCheck = time.Second
	}
	srv := mqtt.New(&mqtt.Options{InlineClient: false, Logger: log})
	if err := srv.AddHook(&policy{readerFirst: cfg.ReaderFirst, revoked: cfg.Revoked}, nil); err != nil {
		return nil, err
	}
	tc := &tls.Config{
		MinVersion:   tls.VersionTLS12,
		Certificates: []tls.Certificate{cfg.Certificate},
		ClientAuth:   tls.RequireAndVerifyClientCert,
		ClientCAs:    cfg.ClientCAs,
		// VerifyConnection, unlike VerifyPeerCertificate, also runs on
		// resumed sessions: a certificate revoked since the ticket was
		// issued is refused too.
		VerifyConnection: func(cs tls.ConnectionState) error {
			if cfg.Revoked != nil && len(cs.PeerCertificates) > 0 && cfg.Revoked(cs.PeerCertificates[0]) {
				return fmt.Errorf("certificate %x is revoked", cs.PeerCertificates[0].SerialNumber)
			}
			return nil
		},
	}
	if cfg.TicketKeyFile != "" {
		keys, err := LoadTicketKeys(cfg.TicketKeyFile, time.Now())
		if err != nil {
			return nil, err
		}
		tc.SetSessionTicketKeys(keys)
	}
	return &Broker{cfg: cfg, srv: srv, tls: tc}, nil
}

// shutdown stops accepting and closes every connection before mochi's
// Close. That Close waits for every accepted connection, including one
// still in its TLS handshake or yet to send CONNECT (which nothing would
// ever close: Close would hang), on a WaitGroup that a connection accepted
// meanwhile may still be adding to (a data race in mochi). With every
// connection closed and its goroutine gone, Close has nothing to wait for.
func (b *Broker) shutdown(gate *gatedListener) {
	gate.Close()
	<-gate.stopped
	time.Sleep(20 * time.Millisecond) // a connection just accepted registers itself
	for _, cl := range b.srv.Clients.GetAll() {
		if !cl.Closed() {
			b.srv.DisconnectClient(cl, packets.ErrServerShuttingDown)
		}
	}
	gate.closeAll()
	time.Sleep(100 * time.Millisecond) // their goroutines finish
}

// gatedListener is the raw TCP listener under TLS. It tells when its
// Accept has stopped for good (the broker's accept loop can hand over no
// more connections) and keeps the connections it accepted, to close them
// all at shutdown. An accepted connection must send CONNECT within
// connectTimeout; mochi then sets deadlines from the keep-alive.
type gatedListener struct {
	net.Listener
	once    sync.Once
	stopped chan struct{}

	mu   sync.Mutex
	open map[*trackedConn]struct{}
}

const connectTimeout = 30 * time.Second

func (g *gatedListener) Accept() (net.Conn, error) {
	c, err := g.Listener.Accept()
	if err != nil {
		g.once.Do(func() { close(g.stopped) })
		return nil, err
	}
	c.SetDeadline(time.Now().Add(connectTimeout))
	tc := &trackedConn{Conn: c, g: g}
	g.mu.Lock()
	g.open[tc] = struct{}{}
	g.mu.Unlock()
	return tc, nil
}

// closeAll closes every connection still open.
func (g *gatedListener) closeAll() {
	g.mu.Lock()
	conns := make([]*trackedConn, 0, len(g.open))
	for c := range g.open {
		conns = append(conns, c)
	}
	g.mu.Unlock()
	for _, c := range conns {
		c.Close()
	}
}

// trackedConn leaves its listener's set when closed.
type trackedConn struct {
	net.Conn
	g *gatedListener
}

func (c *trackedConn) Close() error {
	c.g.mu.Lock()
	delete(c.g.open, c)
	c.g.mu.Unlock()
	return c.Conn.Close()
}

// Run serves until ctx ends. With a ticket key file it rotates the keys
// as they age (checked hourly).
func (b *Broker) Run(ctx context.Context) error {
	ln, err := net.Listen("tcp", b.cfg.Addr)
	if err != nil {
		return fmt.Errorf("demo broker: %w", err)
	}
	gate := &gatedListener{Listener: ln, stopped: make(chan struct{}), open: map[*trackedConn]struct{}{}}
	if err := b.srv.AddListener(listeners.NewNet("mtls", tls.NewListener(gate, b.tls))); err != nil {
		ln.Close()
		return err
	}
	if err := b.srv.Serve(); err != nil {
		ln.Close()
		return err
	}
	var tick, check <-chan time.Time
	if b.cfg.TicketKeyFile != "" {
		t := time.NewTicker(time.Hour)
		defer t.Stop()
		tick = t.C
	}
	if b.cfg.Revoked != nil {
		t := time.NewTicker(b.cfg.RevocationCheck)
		defer t.Stop()
		check = t.C
	}
	for {
		select {
		case <-ctx.Done():
			b.shutdown(gate)
			return b.srv.Close()
		case <-check:
			b.dropRevoked()
		case now := <-tick:
			keys, err := LoadTicketKeys(b.cfg.TicketKeyFile, now)
			if err != nil {
				b.srv.Log.Warn("session-ticket keys not rotated", "err", err)
				continue
			}
			b.tls.SetSessionTicketKeys(keys)
		}
	}
}

// dropRevoked disconnects every client whose certificate is revoked: the
// CRL is checked at a handshake, and a revocation must also end the
// sessions already established.
func (b *Broker) dropRevoked() {
	for _, cl := range b.srv.Clients.GetAll() {
		if c := peerCert(cl); !cl.Closed() && c != nil && b.cfg.Revoked(c) {
			b.srv.Log.Info("disconnecting a client whose certificate is revoked", "client", cl.ID, "serial", fmt.Sprintf("%x", c.SerialNumber))
			b.srv.DisconnectClient(cl, packets.ErrNotAuthorized)
		}
	}
}

// policy authenticates by certificate and enforces the per-device ACL.
type policy struct {
	mqtt.HookBase
	readerFirst bool
	readerIn    atomic.Bool
	revoked     func(*x509.Certificate) bool // nil: none
}

func (p *policy) ID() string { return "iotagent-policy" }

func (p *policy) Provides(b byte) bool {
	return bytes.Contains([]byte{mqtt.OnConnectAuthenticate, mqtt.OnACLCheck, mqtt.OnSubscribed}, []byte{b})
}

// peerCert returns the client's certificate, nil if it has none.
func peerCert(cl *mqtt.Client) *x509.Certificate {
	tc, ok := cl.Net.Conn.(*tls.Conn)
	if !ok {
		return nil
	}
	st := tc.ConnectionState()
	if len(st.PeerCertificates) == 0 {
		return nil
	}
	return st.PeerCertificates[0]
}

// certName returns the CN of the client's certificate.
func certName(cl *mqtt.Client) string {
	if c := peerCert(cl); c != nil {
		return c.Subject.CommonName
	}
	return ""
}

// OnConnectAuthenticate admits a client whose certificate names it and
// whose client ID is that name (a gateway cannot take over another's
// session).
func (p *policy) OnConnectAuthenticate(cl *mqtt.Client, _ packets.Packet) bool {
	name := certName(cl)
	if name == "" || cl.ID != name {
		return false
	}
	if p.readerFirst && name != ReaderName && !p.readerIn.Load() {
		return false
	}
	cl.Properties.Username = []byte(name)
	return true
}

// OnSubscribed notes the fleet reader's subscription (see ReaderFirst).
func (p *policy) OnSubscribed(cl *mqtt.Client, _ packets.Packet, _ []byte) {
	if string(cl.Properties.Username) == ReaderName {
		p.readerIn.Store(true)
	}
}

// OnACLCheck applies the per-device topics, and denies everything to a
// client whose certificate was revoked since it connected (mochi then
// disconnects an MQTT 3.1.1 client that publishes at QoS 1).
func (p *policy) OnACLCheck(cl *mqtt.Client, topic string, write bool) bool {
	if c := peerCert(cl); p.revoked != nil && (c == nil || p.revoked(c)) {
		return false
	}
	name := string(cl.Properties.Username)
	if name == ReaderName {
		return !write && (topic == "devices/#" || strings.HasPrefix(topic, "devices/"))
	}
	if name == RepublisherName {
		parts := strings.Split(topic, "/")
		return write && len(parts) == 3 && parts[0] == "devices" && parts[2] == "telemetry" && parts[1] != "+" && parts[1] != "#"
	}
	// Only a device certificate gets a device's topics: a service's CN is
	// reserved, never a device's, but it would pass as a device ID.
	if c := peerCert(cl); c == nil || !isDevice(c) {
		return false
	}
	switch topic {
	case "devices/" + name + "/telemetry":
		return write
	case "devices/" + name + "/status":
		return true
	case "devices/" + name + "/cmd":
		return !write
	}
	return false
}

func isDevice(c *x509.Certificate) bool {
	_, err := station.DeviceCertificateID(c)
	return err == nil
}

// TicketKeyLifetime is how long a session-ticket key encrypts new
// tickets; it opens them for as long again after its successor takes
// over. A key that leaks lets whoever holds it resume the sessions of
// tickets it encrypted, so keys do not live for ever.
const TicketKeyLifetime = 24 * time.Hour

// LoadTicketKeys reads the session-ticket keys kept at path (0600): the
// current one first, which encrypts new tickets, then the previous one.
// A missing file is made with a new key; a current key older than
// TicketKeyLifetime (by the file's time) is replaced by a new one and
// kept as the previous. Changes are written atomically.
func LoadTicketKeys(path string, now time.Time) ([][32]byte, error) {
	const size = 32
	var keys [][32]byte
	b, err := os.ReadFile(path)
	switch {
	case err == nil:
		if len(b) != size && len(b) != 2*size {
			return nil, fmt.Errorf("session-ticket keys %s: %d bytes, want %d or %d (delete it to make new ones)", path, len(b), size, 2*size)
		}
		for i := 0; i < len(b); i += size {
			keys = append(keys, [32]byte(b[i:i+size]))
		}
		fi, err := os.Stat(path)
		if err != nil {
			return nil, fmt.Errorf("session-ticket keys: %w", err)
		}
		if now.Sub(fi.ModTime()) < TicketKeyLifetime {
			return keys, nil
		}
		keys = keys[:1] // the current becomes the previous
	case !errors.Is(err, fs.ErrNotExist):
		return nil, fmt.Errorf("session-ticket keys: %w", err)
	}
	var fresh [32]byte
	rand.Read(fresh[:])
	keys = append([][32]byte{fresh}, keys...)
	out := make([]byte, 0, len(keys)*size)
	for _, k := range keys {
		out = append(out, k[:]...)
	}
	if err := atomicfile.Write(path, out, 0o600); err != nil {
		return nil, fmt.Errorf("session-ticket keys: %w", err)
	}
	// The file's time is the current key's birth.
	if err := os.Chtimes(path, now, now); err != nil {
		return nil, fmt.Errorf("session-ticket keys: %w", err)
	}
	return keys, nil
}

// CRLFile returns a revocation check against a PEM CRL file (the station's
// crl.pem), re-read whenever it changes. A missing or unreadable file
// leaves the last good list in force.
func CRLFile(path string) func(*x509.Certificate) bool {
	var mu sync.Mutex
	var mod time.Time
	revoked := map[string]bool{}
	return func(c *x509.Certificate) bool {
		mu.Lock()
		defer mu.Unlock()
		if fi, err := os.Stat(path); err == nil && !fi.ModTime().Equal(mod) {
			if b, err := os.ReadFile(path); err == nil {
				if blk, _ := pem.Decode(b); blk != nil {
					if l, err := x509.ParseRevocationList(blk.Bytes); err == nil {
						m := map[string]bool{}
						for _, e := range l.RevokedCertificateEntries {
							m[e.SerialNumber.String()] = true
						}
						revoked, mod = m, fi.ModTime()
					}
				}
			}
		}
		return revoked[c.SerialNumber.String()]
	}
}
