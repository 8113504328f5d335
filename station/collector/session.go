package collector

import (
	"context"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"time"

	"iotagent.dev/iotagent/dtls"
	"iotagent.dev/iotagent/internal/handshake"
	"iotagent.dev/iotagent/station"
)

// Handshake refusals of the collector's own checks (VerifyPeerCertificate).
var (
	errRevoked   = errors.New("certificate revoked")
	errNotDevice = errors.New("certificate does not name a device")
	errBusy      = errors.New("too many handshakes in progress")
	errNoCookie  = errors.New("the client never returned the HelloVerifyRequest cookie")
)

// verifyPeer runs after pion verified the client's chain against
// ClientCAs: the certificate must name a device and not be revoked.
func (c *Collector) verifyPeer(_ [][]byte, chains [][]*x509.Certificate) error {
	if len(chains) == 0 || len(chains[0]) == 0 {
		return errors.New("no verified chain") // RequireAndVerifyClientCert makes one
	}
	leaf := chains[0][0]
	// A service certificate (a broker's, a subscriber's) chains to the
	// same CA but is never a device.
	if _, err := station.DeviceCertificateID(leaf); err != nil {
		return fmt.Errorf("%w: %w", errNotDevice, err)
	}
	if c.cfg.Revoked != nil && c.cfg.Revoked(leaf) {
		return fmt.Errorf("%w: %s serial %x", errRevoked, leaf.Subject.CommonName, leaf.SerialNumber)
	}
	return nil
}

// session is one DTLS connection as go-coap serves it. go-coap calls
// HandshakeContext before serving the connection (and again, cheaply,
// before each write); the first call runs and accounts for the handshake.
type session struct {
	*dtls.Conn
	peer *peerConn
	c    *Collector

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
	start := time.Now()
	err := s.Conn.HandshakeContext(ctx)
	got := s.peer.finish()
	if err != nil {
		if ctx.Err() != nil && !errors.Is(ctx.Err(), context.DeadlineExceeded) {
			return err // shutting down: not a handshake result
		}
		switch got {
		case phaseUnverified: // a spoofed source, or lost datagrams
			err = fmt.Errorf("%w: %w", errNoCookie, err)
		case phaseWaiting:
			err = fmt.Errorf("%w: %w", errBusy, err)
		}
		reason := failureReason(err)
		c.m.handshakeFailed(reason)
		level := slog.LevelInfo
		switch reason {
		case handshake.Timeout, handshake.Other, reasonNoCookie, reasonBusy:
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
	reasonBusy      = "busy"       // it returned the cookie, but MaxHandshakes were in progress until it ended
	reasonNoCookie  = "no_cookie"  // it ended before the client returned the cookie: a spoofed source, or lost datagrams
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
	case errors.Is(err, errNoCookie):
		return reasonNoCookie
	}
	return dtls.HandshakeFailure(err)
}
