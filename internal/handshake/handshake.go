// Package handshake names why a TLS or DTLS handshake failed, in the words
// the handshake SLIs of the agent and of the station's collector share:
// a failure reason is a short snake_case word an operator can count and
// alert on.
package handshake

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"net"
	"os"
	"strings"
	"unicode"
)

// Failure reasons common to TLS and DTLS. A fatal alert the peer sent is
// reported as "peer_" and the alert's name ("peer_bad_certificate").
const (
	UnknownCA      = "unknown_ca"      // the peer's chain does not lead to a trusted root
	Expired        = "expired"         // the peer's certificate is expired or not yet valid
	BadName        = "bad_name"        // the peer's certificate does not name the host dialled
	BadCertificate = "bad_certificate" // another verification failure
	Timeout        = "timeout"         // the handshake did not finish in time
	Other          = "other"           // anything else: see the log
)

// Certificate names a certificate verification failure, if err is one.
func Certificate(err error) (string, bool) {
	var unknownCA x509.UnknownAuthorityError
	var invalid x509.CertificateInvalidError
	var hostname x509.HostnameError
	var verify *tls.CertificateVerificationError
	switch {
	case errors.As(err, &unknownCA):
		return UnknownCA, true
	case errors.As(err, &invalid):
		if invalid.Reason == x509.Expired {
			return Expired, true
		}
		return BadCertificate, true
	case errors.As(err, &hostname):
		return BadName, true
	case errors.As(err, &verify):
		return BadCertificate, true
	}
	return "", false
}

// IsTimeout reports whether err is a deadline that passed.
func IsTimeout(err error) bool {
	var ne net.Error
	return errors.Is(err, context.DeadlineExceeded) || errors.Is(err, os.ErrDeadlineExceeded) ||
		(errors.As(err, &ne) && ne.Timeout())
}

// PeerAlert is the reason for a fatal alert the peer sent, from the
// alert's name as a library spells it ("bad certificate",
// "BadCertificate").
func PeerAlert(name string) string { return "peer_" + Snake(name) }

// TLS names why a crypto/tls handshake failed.
func TLS(err error) string {
	if r, ok := Certificate(err); ok {
		return r
	}
	if IsTimeout(err) {
		return Timeout
	}
	// crypto/tls reports an alert it received as a net.OpError "remote
	// error" around its (unexported) alert type; QUIC uses tls.AlertError.
	var op *net.OpError
	var ae tls.AlertError
	switch {
	case errors.As(err, &op) && op.Op == "remote error" && op.Err != nil:
		return PeerAlert(strings.TrimPrefix(op.Err.Error(), "tls: "))
	case errors.As(err, &ae):
		return PeerAlert(strings.TrimPrefix(ae.Error(), "tls: "))
	}
	return Other
}

// Snake turns "BadCertificate" or "bad certificate" into
// "bad_certificate".
func Snake(s string) string {
	var b strings.Builder
	sep, upper := true, false // at a word boundary; the last letter was upper case
	for _, r := range s {
		switch {
		case unicode.IsUpper(r):
			if !sep && !upper {
				b.WriteByte('_')
			}
			b.WriteRune(unicode.ToLower(r))
			sep, upper = false, true
		case unicode.IsLetter(r) || unicode.IsDigit(r):
			b.WriteRune(r)
			sep, upper = false, false
		default:
			if !sep {
				b.WriteByte('_')
			}
			sep, upper = true, false
		}
	}
	return strings.TrimSuffix(b.String(), "_")
}
