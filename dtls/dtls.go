// Package dtls is DTLS 1.2 (pion/dtls v3) as both sides of the project
// speak it: the agent's client with its TPM-held key, and the station's
// server (the collector). It holds what the two must agree on, in one
// place: the cipher suites, extended master secret, Connection IDs
// (RFC 9146), handshake failure reasons, and the sealed session state that
// lets a restarted agent resume without a handshake. It knows nothing of
// CoAP or telemetry: the agent's CoAP uplink is telemetry/coap, the
// station's collector station/collector.
//
// The types a user of pion needs (Conn, the option types, HandshakeError)
// are re-exported, so that code on either side imports this package only,
// not pion's package of the same name.
//
// # Why pion/dtls v3
//
// v2 rejects a key that is only a crypto.Signer (our TPM key), has no
// Connection ID, and has advisory GO-2026-4479 (random AES-GCM nonces).
// v3's options API takes a signer and supports CID and state export.
//
// # Caveats
//
// Resuming exported state is only safe if the exported connection never
// sends another record and the state is restored at most once (pion's
// ResumeWithOptions documentation). The CoAP uplink closes its socket
// before exporting, deletes the sealed state from the store before
// resuming it, and saves it only on a clean shutdown: after a crash it
// handshakes.
package dtls

import (
	"context"
	"crypto/aes"
	"crypto/cipher"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"sync"
	"time"

	piondtls "github.com/pion/dtls/v3"
	"github.com/pion/logging"
)

// pion's types, as users of this package need them.
type (
	Conn           = piondtls.Conn
	ClientOption   = piondtls.ClientOption
	ServerOption   = piondtls.ServerOption
	HandshakeError = piondtls.HandshakeError
	CipherSuiteID  = piondtls.CipherSuiteID
)

// CipherSuiteName names a cipher suite as pion does
// ("TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256").
func CipherSuiteName(id CipherSuiteID) string { return piondtls.CipherSuiteName(id) }

// CipherSuites are the suites both sides offer: AEAD with ECDHE and the
// ECDSA keys the station issues (AES-128-GCM), and CCM_8 for constrained
// peers that lack GCM.
var CipherSuites = []CipherSuiteID{
	piondtls.TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
	piondtls.TLS_ECDHE_ECDSA_WITH_AES_128_CCM_8,
}

// ServerCIDLength is the length of the Connection IDs a server asks
// clients to send: 8 random bytes, enough that guessing one is hopeless.
const ServerCIDLength = 8

// ClientCertificate supplies the device certificate for each handshake:
// the live identity of package enroll, so a renewed certificate is used at
// the next handshake.
type ClientCertificate func(*tls.CertificateRequestInfo) (*tls.Certificate, error)

// ClientOptions are the pion options of the agent's DTLS client: its TPM
// certificate, the CA certificates that verify the server, the server name
// checked, extended master secret required, and a Connection ID requested
// from the server (the agent sends none of its own: the server's CID is
// what lets it follow a rebinding NAT). Build them for each handshake, with
// the roots current then.
func ClientOptions(cert ClientCertificate, roots *x509.CertPool, serverName string) []ClientOption {
	return []ClientOption{
		piondtls.WithGetClientCertificate(func(cri *piondtls.CertificateRequestInfo) (*tls.Certificate, error) {
			return cert(&tls.CertificateRequestInfo{AcceptableCAs: cri.AcceptableCAs})
		}),
		piondtls.WithRootCAs(roots),
		piondtls.WithServerName(serverName),
		piondtls.WithCipherSuites(CipherSuites...),
		piondtls.WithExtendedMasterSecret(piondtls.RequireExtendedMasterSecret),
		piondtls.WithConnectionIDGenerator(piondtls.OnlySendCIDGenerator()),
		piondtls.WithFlightInterval(500 * time.Millisecond),
	}
}

// Client starts a DTLS client over pc to raddr; the handshake happens at
// HandshakeContext or the first read or write.
func Client(pc net.PacketConn, raddr net.Addr, opts []ClientOption) (*Conn, error) {
	return piondtls.ClientWithOptions(pc, raddr, opts...)
}

// ServerConfig configures ServerOptions.
type ServerConfig struct {
	// Certificate is the server's certificate and its ECDSA key.
	Certificate tls.Certificate
	// GetCertificate, when set, returns the certificate for each new
	// handshake instead (a certificate renewed while serving).
	GetCertificate func() *tls.Certificate
	// ClientCAs verify client certificates; a client must present one.
	ClientCAs *x509.CertPool
	// VerifyPeer, when set, runs after the client's chain verified
	// (revocation, what the certificate must name).
	VerifyPeer func(rawCerts [][]byte, chains [][]*x509.Certificate) error
	// Logger receives pion's log at debug level (nil discards it): what
	// matters to an operator, the server logs itself.
	Logger *slog.Logger
}

// ServerOptions are the pion options of a server the agent talks to:
// mutual authentication, the same suites and extended master secret as
// the client, and Connection IDs of ServerCIDLength.
func ServerOptions(cfg ServerConfig) []ServerOption {
	var cert ServerOption = piondtls.WithCertificates(cfg.Certificate)
	if cfg.GetCertificate != nil {
		cert = piondtls.WithGetCertificate(func(*piondtls.ClientHelloInfo) (*tls.Certificate, error) { return cfg.GetCertificate(), nil })
	}
	opts := []ServerOption{
		cert,
		piondtls.WithClientAuth(piondtls.RequireAndVerifyClientCert),
		piondtls.WithClientCAs(cfg.ClientCAs),
		piondtls.WithCipherSuites(CipherSuites...),
		piondtls.WithExtendedMasterSecret(piondtls.RequireExtendedMasterSecret),
		piondtls.WithConnectionIDGenerator(piondtls.RandomCIDGenerator(ServerCIDLength)),
		piondtls.WithLoggerFactory(loggerFactory{log: cfg.Logger}),
	}
	if cfg.VerifyPeer != nil {
		opts = append(opts, piondtls.WithVerifyPeerCertificate(cfg.VerifyPeer))
	}
	return opts
}

// commonOptions converts client options to the options ResumeWithOptions
// takes. pion's client options are also options; the conversion is a
// type assertion that holds for every option ClientOptions returns.
func commonOptions(opts []ClientOption) []piondtls.Option {
	out := make([]piondtls.Option, 0, len(opts))
	for _, o := range opts {
		if c, ok := o.(piondtls.Option); ok {
			out = append(out, c)
		}
	}
	return out
}

// loggerFactory sends pion's log to a slog.Logger at debug level.
type loggerFactory struct{ log *slog.Logger }

func (f loggerFactory) NewLogger(scope string) logging.LeveledLogger {
	if f.log == nil {
		return pionLogger{slog.New(slog.DiscardHandler)}
	}
	return pionLogger{f.log.With("pion", scope)}
}

type pionLogger struct{ log *slog.Logger }

func (l pionLogger) logf(format string, args ...any) {
	if l.log.Enabled(context.Background(), slog.LevelDebug) {
		l.log.Debug(fmt.Sprintf(format, args...))
	}
}

func (l pionLogger) Trace(string)                   {}
func (l pionLogger) Tracef(string, ...any)          {}
func (l pionLogger) Debug(string)                   {}
func (l pionLogger) Debugf(string, ...any)          {}
func (l pionLogger) Info(msg string)                { l.logf("%s", msg) }
func (l pionLogger) Infof(format string, a ...any)  { l.logf(format, a...) }
func (l pionLogger) Warn(msg string)                { l.logf("%s", msg) }
func (l pionLogger) Warnf(format string, a ...any)  { l.logf(format, a...) }
func (l pionLogger) Error(msg string)               { l.logf("%s", msg) }
func (l pionLogger) Errorf(format string, a ...any) { l.logf(format, a...) }

// Sealer encrypts exported session state with a 32-byte key (AES-256-GCM).
// The agent keeps the key sealed in the TPM (tpm.SealedSecret), so stored
// session state is useless off the device.
type Sealer struct {
	aead cipher.AEAD
	rand io.Reader
}

// NewSealer returns a sealer for key (32 bytes); rand makes nonces.
func NewSealer(key []byte, rand io.Reader) (*Sealer, error) {
	if len(key) != 32 {
		return nil, fmt.Errorf("session sealing key is %d bytes, want 32", len(key))
	}
	b, err := aes.NewCipher(key)
	if err != nil {
		return nil, err
	}
	g, err := cipher.NewGCM(b)
	if err != nil {
		return nil, err
	}
	return &Sealer{aead: g, rand: rand}, nil
}

// sessionAD binds sealed state to its purpose.
var sessionAD = []byte("iotagent dtls session v1")

// Seal encrypts plain.
func (s *Sealer) Seal(plain []byte) ([]byte, error) {
	nonce := make([]byte, s.aead.NonceSize())
	if _, err := io.ReadFull(s.rand, nonce); err != nil {
		return nil, err
	}
	return s.aead.Seal(nonce, nonce, plain, sessionAD), nil
}

// Open decrypts what Seal made.
func (s *Sealer) Open(sealed []byte) ([]byte, error) {
	n := s.aead.NonceSize()
	if len(sealed) < n+s.aead.Overhead() {
		return nil, errors.New("sealed session state is truncated")
	}
	out, err := s.aead.Open(nil, sealed[:n], sealed[n:], sessionAD)
	if err != nil {
		return nil, errors.New("sealed session state does not authenticate (another device's, or altered)")
	}
	return out, nil
}

// ExportState snapshots an established connection's state for a later
// ResumeState. The caller must make sure conn sends nothing after this
// (close its socket first).
func ExportState(conn *Conn) ([]byte, error) {
	st, ok := conn.ConnectionState()
	if !ok {
		return nil, errors.New("DTLS connection has no established state")
	}
	return st.MarshalBinary()
}

// ResumeState revives a connection from ExportState's bytes over pc to
// raddr: no handshake, no signature. The bytes must never be resumed
// again.
func ResumeState(state []byte, pc net.PacketConn, raddr net.Addr, opts []ClientOption) (*Conn, error) {
	var st piondtls.State
	if err := st.UnmarshalBinary(state); err != nil {
		return nil, fmt.Errorf("session state: %w", err)
	}
	return piondtls.ResumeWithOptions(&st, pc, raddr, commonOptions(opts)...)
}

// RebindableConn is a UDP socket that can be replaced under a live DTLS
// session, as a NAT rebinding or a network change does: the session goes
// on from a new local port (the server follows the Connection ID).
type RebindableConn struct {
	mu       sync.Mutex
	cur      *net.UDPConn
	closed   bool
	deadline time.Time
}

// ListenRebindable opens a UDP socket on an ephemeral port.
func ListenRebindable(network string) (*RebindableConn, error) {
	c, err := net.ListenUDP(network, nil)
	if err != nil {
		return nil, err
	}
	return &RebindableConn{cur: c}, nil
}

func (r *RebindableConn) current() (*net.UDPConn, bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.cur, r.closed
}

// Rebind replaces the socket with a new one on another ephemeral port.
func (r *RebindableConn) Rebind() error {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.closed {
		return net.ErrClosed
	}
	network := "udp4"
	if a, ok := r.cur.LocalAddr().(*net.UDPAddr); ok && a.IP.To4() == nil {
		network = "udp6"
	}
	c, err := net.ListenUDP(network, nil)
	if err != nil {
		return err
	}
	if !r.deadline.IsZero() {
		c.SetReadDeadline(r.deadline)
	}
	old := r.cur
	r.cur = c
	old.Close()
	return nil
}

// ReadFrom reads from the current socket, moving on to the new one when it
// is rebound.
func (r *RebindableConn) ReadFrom(b []byte) (int, net.Addr, error) {
	for {
		c, closed := r.current()
		if closed {
			return 0, nil, net.ErrClosed
		}
		n, addr, err := c.ReadFrom(b)
		if err != nil {
			if now, _ := r.current(); now != c {
				continue // rebound under us
			}
		}
		return n, addr, err
	}
}

// WriteTo writes from the current socket.
func (r *RebindableConn) WriteTo(b []byte, addr net.Addr) (int, error) {
	c, closed := r.current()
	if closed {
		return 0, net.ErrClosed
	}
	return c.WriteTo(b, addr)
}

// Close closes the socket for good.
func (r *RebindableConn) Close() error {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.closed {
		return nil
	}
	r.closed = true
	return r.cur.Close()
}

// LocalAddr is the current socket's address.
func (r *RebindableConn) LocalAddr() net.Addr {
	c, _ := r.current()
	return c.LocalAddr()
}

// SetDeadline sets the read and write deadlines.
func (r *RebindableConn) SetDeadline(t time.Time) error {
	r.SetWriteDeadline(t)
	return r.SetReadDeadline(t)
}

// SetReadDeadline sets the read deadline, kept across rebinding.
func (r *RebindableConn) SetReadDeadline(t time.Time) error {
	r.mu.Lock()
	r.deadline = t
	c := r.cur
	r.mu.Unlock()
	return c.SetReadDeadline(t)
}

// SetWriteDeadline sets the write deadline of the current socket.
func (r *RebindableConn) SetWriteDeadline(t time.Time) error {
	c, _ := r.current()
	return c.SetWriteDeadline(t)
}
