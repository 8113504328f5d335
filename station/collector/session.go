package collector

import (
	"context"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"sync"
	"time"

	coapnet "github.com/plgd-dev/go-coap/v3/net"

	"iotagent.dev/iotagent/dtls"
	"iotagent.dev/iotagent/internal/handshake"
	"iotagent.dev/iotagent/station"
)

// Handshake refusals of the collector's own checks (VerifyPeerCertificate).
var (
	errRevoked   = errors.New("certificate revoked")
	errNotDevice = errors.New("certificate does not name a device")
	errBusy      = errors.New("too many handshakes in progress")
)

// verifyPeer runs after pion verified the client's chain against
// ClientCAs: the certificate must name a device and not be revoked.
func (c *Collector) verifyPeer(_ [][]byte, chains [][]*x509.Certificate) error {
	if len(chains) == 0 || len(chains[0]) == 0 {
		return errors.New("no verified chain") // RequireAndVerifyClientCert makes one
	}
	leaf := chains[0][0]
	if err := station.ValidDeviceID(leaf.Subject.CommonName); err != nil {
		return fmt.Errorf("%w: %w", errNotDevice, err)
	}
	if c.cfg.Revoked != nil && c.cfg.Revoked(leaf) {
		return fmt.Errorf("%w: %s serial %x", errRevoked, leaf.Subject.CommonName, leaf.SerialNumber)
	}
	return nil
}

// listener hands go-coap's DTLS server pion's connections wrapped as
// sessions.
type listener struct {
	*coapnet.DTLSListener
	c *Collector
	// err is why accepting failed for good, other than shutdown. Only
	// Serve's goroutine sets it.
	err error
}

func (l *listener) AcceptWithContext(ctx context.Context) (net.Conn, error) {
	conn, err := l.DTLSListener.AcceptWithContext(ctx)
	if err != nil {
		if ctx.Err() != nil || errors.Is(err, coapnet.ErrListenerIsClosed) {
			return nil, err // shutting down
		}
		// pion's listener fails only when its socket does, and go-coap
		// would retry at once, for ever: stop serving instead.
		l.err = err
		l.DTLSListener.Close()
		return nil, coapnet.ErrListenerIsClosed
	}
	dc, ok := conn.(*dtls.Conn)
	if !ok {
		conn.Close()
		return nil, fmt.Errorf("listener returned a %T, want *dtls.Conn", conn)
	}
	return &session{Conn: dc, c: l.c}, nil
}

// session is one DTLS connection as go-coap serves it. go-coap calls
// HandshakeContext before serving the connection (and again, cheaply,
// before each write); the first call runs and accounts for the handshake.
type session struct {
	*dtls.Conn
	c *Collector

	once sync.Once
	err  error
	// Set by the first HandshakeContext, read-only afterwards.
	device string
	leaf   *x509.Certificate
	cipher string

	closeOnce sync.Once
}

func (s *session) HandshakeContext(ctx context.Context) error {
	s.once.Do(func() { s.err = s.handshake(ctx) })
	return s.err
}

func (s *session) handshake(ctx context.Context) error {
	c := s.c
	select {
	case c.handshakes <- struct{}{}:
		defer func() { <-c.handshakes }()
	default:
		c.m.handshakeFailed(reasonBusy)
		c.log.Debug("handshake refused", "remote", s.RemoteAddr().String(), "reason", reasonBusy)
		return errBusy
	}
	start := time.Now()
	if err := s.Conn.HandshakeContext(ctx); err != nil {
		if ctx.Err() != nil && !errors.Is(ctx.Err(), context.DeadlineExceeded) {
			return err // shutting down: not a handshake result
		}
		reason := failureReason(err)
		c.m.handshakeFailed(reason)
		level := slog.LevelInfo
		if reason == handshake.Timeout || reason == handshake.Other {
			level = slog.LevelDebug
		}
		c.log.Log(ctx, level, "handshake failed", "remote", s.RemoteAddr().String(), "reason", reason, "err", err)
		return err
	}
	elapsed := time.Since(start)
	st, ok := s.Conn.ConnectionState()
	if !ok || len(st.PeerCertificates) == 0 {
		c.m.handshakeFailed(handshake.Other)
		return errors.New("handshake completed without a client certificate")
	}
	leaf, err := x509.ParseCertificate(st.PeerCertificates[0])
	if err != nil {
		c.m.handshakeFailed(handshake.Other)
		return fmt.Errorf("parsing the verified client certificate: %w", err)
	}
	s.leaf, s.device, s.cipher = leaf, leaf.Subject.CommonName, dtls.CipherSuiteName(st.CipherSuiteID)
	c.m.established(elapsed, s.cipher)
	c.log.Debug("session established", "device", s.device, "remote", s.RemoteAddr().String(), "cipher", s.cipher, "took", elapsed)
	return nil
}

func (s *session) Close() error {
	s.closeOnce.Do(func() {
		if s.leaf != nil {
			s.c.m.closed(s.cipher)
		}
	})
	return s.Conn.Close()
}

// Handshake failure reasons, the values of the result label of
// iotstation_coap_handshakes_total besides "ok": internal/handshake's and
// dtls's words (unknown_ca, expired, bad_certificate, no_certificate,
// no_shared_cipher, no_extended_master_secret, timeout, other, and for a
// fatal alert received from the client "peer_" and the alert's name, e.g.
// "peer_bad_certificate" when the device does not trust the collector),
// and the collector's own refusals below.
const (
	reasonRevoked   = "revoked"    // Revoked reported it
	reasonNotDevice = "not_device" // its CN is not a valid device ID
	reasonBusy      = "busy"       // MaxHandshakes were in progress
)

// failureReason classifies a failed handshake.
func failureReason(err error) string {
	switch {
	case errors.Is(err, errRevoked):
		return reasonRevoked
	case errors.Is(err, errNotDevice):
		return reasonNotDevice
	case errors.Is(err, errBusy):
		return reasonBusy
	}
	return dtls.HandshakeFailure(err)
}
