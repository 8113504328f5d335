package telemetry

import (
	"context"
	"crypto/tls"
	"errors"
	"sync"
	"time"

	"iotagent.dev/iotagent/telemetry/senml"
)

// Uplink carries telemetry to the fleet: telemetry/mqtt (MQTT over TLS)
// and telemetry/coap (CoAP over DTLS) implement it. The pipeline owns what
// is sent; the uplink owns the connection.
type Uplink interface {
	// Ready blocks until the uplink is connected, or ctx ends.
	Ready(ctx context.Context) error
	// Deliver sends one payload and returns nil only once the peer has
	// acknowledged it (PUBACK, CoAP ACK). Safe for concurrent use: the
	// pipeline keeps up to Window payloads in flight.
	Deliver(ctx context.Context, payload []byte) error
	// Encode renders records as one payload in the uplink's format.
	Encode(senml.Pack) ([]byte, error)
	// MaxPayload bounds an encoded payload in bytes.
	MaxPayload() int
	// Window is how many payloads may be in flight at once.
	Window() int
}

// Identity is the device credential an uplink presents: the live identity
// of package enroll. The uplink asks for the certificate at each handshake,
// so a renewed one is used at the next.
type Identity interface {
	GetClientCertificate(*tls.CertificateRequestInfo) (*tls.Certificate, error)
	DeviceID() string
	// Changed is closed at the next certificate change.
	Changed() <-chan struct{}
}

// Errors of Uplink.Deliver the pipeline acts on.
var (
	// ErrNotConnected: the uplink is down; the payload is sent again once
	// it is up.
	ErrNotConnected = errors.New("uplink not connected")

	// ErrRejected marks a delivery the peer refused for good (CoAP 4.00:
	// the payload itself is wrong). Resending would loop forever: the
	// pipeline drops those records, counts them and logs the peer's reason.
	ErrRejected = errors.New("rejected by the peer")

	// ErrTooLarge marks a payload the peer refused for its size (CoAP
	// 4.13): the pipeline sends its records again in smaller payloads, and
	// drops only a record too large alone.
	ErrTooLarge = errors.New("too large for the peer")
)

// LinkState is where an uplink's connection stands.
type LinkState string

// The states of an uplink. An uplink starts connecting; a failed attempt
// waits in backoff; a connection that ends goes back to connecting; Run
// returning leaves it stopped. None is the agent's word for no uplink
// configured.
const (
	LinkConnecting LinkState = "connecting"
	LinkConnected  LinkState = "connected"
	LinkBackoff    LinkState = "backoff"
	LinkStopped    LinkState = "stopped"
	LinkNone       LinkState = "none"
)

// UplinkState reports an uplink's connection (iotagent status, the
// agent.uplink.* telemetry).
type UplinkState struct {
	State     LinkState `json:"state"`
	Since     time.Time `json:"since"`
	LastError string    `json:"last_error,omitempty"`
	LastAck   time.Time `json:"last_ack,omitzero"`
	// CertSerial is the serial (hex) of the device certificate presented
	// in the last full handshake (a resumed one presents none).
	CertSerial string `json:"cert_serial,omitempty"`
}

// Link is an uplink's connection as both uplinks keep it: the live
// session (an S: the MQTT client, the CoAP client and its socket), the
// state State reports, and what Ready waits for. Safe for concurrent use.
type Link[S any] struct {
	mu      sync.Mutex
	session S
	live    bool
	up      chan struct{} // closed while live
	state   UplinkState
}

// NewLink returns a link that is connecting.
func NewLink[S any]() *Link[S] {
	return &Link[S]{up: make(chan struct{}), state: UplinkState{State: LinkConnecting, Since: time.Now()}}
}

// Ready blocks until a session is live, or ctx ends.
func (l *Link[S]) Ready(ctx context.Context) error {
	l.mu.Lock()
	ch := l.up
	l.mu.Unlock()
	select {
	case <-ch:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// State returns the connection's state.
func (l *Link[S]) State() UplinkState {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.state
}

// Session returns the live session; false when there is none.
func (l *Link[S]) Session() (S, bool) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.session, l.live
}

// Up makes s the live session: the link is connected and Ready returns.
func (l *Link[S]) Up(s S) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.session, l.live = s, true
	l.setLocked(LinkConnected, nil)
	close(l.up)
}

// Set moves the link to state (any but connected: see Up), recording err
// as the reason. A live session is dropped: Ready waits for the next.
func (l *Link[S]) Set(state LinkState, err error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.live {
		var zero S
		l.session, l.live = zero, false
		l.up = make(chan struct{})
	}
	l.setLocked(state, err)
}

func (l *Link[S]) setLocked(state LinkState, err error) {
	l.state.State, l.state.Since, l.state.LastError = state, time.Now(), ""
	if err != nil {
		l.state.LastError = err.Error()
	}
}

// Acked records an acknowledged delivery.
func (l *Link[S]) Acked() {
	l.mu.Lock()
	l.state.LastAck = time.Now()
	l.mu.Unlock()
}

// PresentedCertificate records the serial of the certificate presented in
// a full handshake.
func (l *Link[S]) PresentedCertificate(serial string) {
	l.mu.Lock()
	l.state.CertSerial = serial
	l.mu.Unlock()
}

// SessionWorked reports whether a session that came up at start worked: it
// stayed up longer than cap (the reconnect backoff's cap). After such a
// session an uplink resets its reconnect backoff (the reset rule of
// internal/backoff); after a shorter one, whatever it delivered, the
// backoff keeps growing, so a peer that keeps ending the session (a second
// device with the same ID taking it over, a broker or collector refusing
// the identity) does not draw the fleet into reconnecting in a loop.
// Either way the uplink waits a jittered draw before it reconnects, so a
// fleet whose broker restarted does not come back in lockstep.
func SessionWorked(start time.Time, cap time.Duration) bool {
	return time.Since(start) > cap
}

// ClientCertificate returns a GetClientCertificate for TLS and DTLS that
// presents id's current certificate and records its serial
// (UplinkState.CertSerial).
func (l *Link[S]) ClientCertificate(id Identity) func(*tls.CertificateRequestInfo) (*tls.Certificate, error) {
	return func(cri *tls.CertificateRequestInfo) (*tls.Certificate, error) {
		c, err := id.GetClientCertificate(cri)
		if err == nil && c != nil && c.Leaf != nil {
			l.PresentedCertificate(c.Leaf.SerialNumber.Text(16))
		}
		return c, err
	}
}
