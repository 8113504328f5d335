package dtls

import (
	"errors"
	"strings"

	"github.com/pion/dtls/v3/pkg/protocol"
	"github.com/pion/dtls/v3/pkg/protocol/alert"

	"iotagent.dev/iotagent/internal/handshake"
)

// Handshake failure reasons particular to DTLS, beside internal/handshake's
// (unknown_ca, expired, bad_name, bad_certificate, timeout, peer_…,
// other).
const (
	FailureNoCertificate = "no_certificate" // the client sent none (pion clients send none that ClientCAs did not issue)
	FailureNoCipher      = "no_shared_cipher"
	FailureNoEMS         = "no_extended_master_secret"
)

// pionFailures classify pion's handshake errors, which it does not export,
// by their text (pion/dtls v3.1). Should a new pion change a text, the
// failure shows as "other", and the collector's TestBadInput fails.
var pionFailures = []struct{ text, reason string }{
	{"server required client verification, but got none", FailureNoCertificate},
	{"client+server do not support any shared cipher suites", FailureNoCipher},
	{"server requires the Extended Master Secret extension", FailureNoEMS},
}

// HandshakeFailure names why a pion DTLS handshake failed, on either end.
func HandshakeFailure(err error) string {
	if r, ok := handshake.Certificate(err); ok {
		return r
	}
	if handshake.IsTimeout(err) {
		return handshake.Timeout
	}
	if d, ok := peerAlert(err); ok {
		return handshake.PeerAlert(d.String())
	}
	for _, f := range pionFailures {
		if strings.Contains(err.Error(), f.text) {
			return f.reason
		}
	}
	return handshake.Other
}

// peerAlert returns the fatal alert the peer sent, if err is one. pion's
// alert error type is unexported; it embeds *alert.Alert, whose methods it
// promotes.
func peerAlert(err error) (alert.Description, bool) {
	var a interface {
		error
		ContentType() protocol.ContentType
		Marshal() ([]byte, error)
	}
	if !errors.As(err, &a) || a.ContentType() != protocol.ContentTypeAlert {
		return 0, false
	}
	b, merr := a.Marshal()
	if merr != nil || len(b) != 2 {
		return 0, false
	}
	return alert.Description(b[1]), true
}
