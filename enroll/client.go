package enroll

import (
	"bytes"
	"context"
	"crypto/sha256"
	"crypto/subtle"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"time"

	"iotagent.dev/iotagent/est"
)

// StatusError is a refusal or failure answered by the station.
type StatusError struct {
	Op      string // cacerts, simpleenroll, simplereenroll, tpmenroll
	Code    int
	Message string
	// RetryAfter is set from the Retry-After header (202, 429, 503).
	RetryAfter time.Duration
}

func (e *StatusError) Error() string {
	msg := fmt.Sprintf("station refused %s: %d %s", e.Op, e.Code, http.StatusText(e.Code))
	if e.Message != "" {
		msg += ": " + e.Message
	}
	if e.RetryAfter > 0 {
		msg += fmt.Sprintf(" (retry after %v)", e.RetryAfter)
	}
	return msg
}

// Refused reports whether the station decided against the request (4xx
// other than 408 and 429), as opposed to failing or asking to wait.
func (e *StatusError) Refused() bool {
	return e.Code >= 400 && e.Code < 500 && e.Code != http.StatusRequestTimeout && e.Code != http.StatusTooManyRequests
}

// ClientConfig configures an EST client.
type ClientConfig struct {
	// URL is the station, https://HOST[:PORT].
	URL string
	// Roots verifies the station's TLS certificate (with its host name).
	// Either Roots or Pin is needed.
	Roots *x509.CertPool
	// Pin is the SHA-256 of a certificate in the station's TLS chain (for
	// the first contact, before the agent has the trust bundle): the chain
	// must verify up to that certificate, for the URL's host.
	Pin []byte
	// GetClientCertificate supplies the device certificate for mutual TLS;
	// nil sends none.
	GetClientCertificate func(*tls.CertificateRequestInfo) (*tls.Certificate, error)
	// Clock gives the time certificates are checked at and learns from the
	// station's Date header. Nil uses time.Now.
	Clock *Clock
	// Timeout bounds one request (default 60s).
	Timeout time.Duration
}

// Client speaks EST to the station. Safe for concurrent use.
type Client struct {
	base  *url.URL
	http  *http.Client
	clock *Clock
}

// ParsePin parses "sha256:HEX" (as iotstation fingerprint prints it).
func ParsePin(s string) ([]byte, error) {
	h, ok := strings.CutPrefix(strings.ToLower(s), "sha256:")
	b, err := hex.DecodeString(h)
	if !ok || err != nil || len(b) != sha256.Size {
		return nil, fmt.Errorf("fingerprint %q: want sha256: followed by 64 hex digits", s)
	}
	return b, nil
}

// ParseStationURL checks a station URL, https://HOST[:PORT].
func ParseStationURL(raw string) (*url.URL, error) {
	u, err := url.Parse(raw)
	if err != nil || u.Scheme != "https" || u.Host == "" {
		return nil, fmt.Errorf("station URL %q: want https://HOST[:PORT]", raw)
	}
	return u, nil
}

// maxReceiveBuffer bounds what the station may send ahead of the
// client's reader over HTTP/2: the client's flow-control windows, per
// stream and per connection.
const maxReceiveBuffer = 256 << 10

// NewClient returns a client for cfg.
func NewClient(cfg ClientConfig) (*Client, error) {
	u, err := ParseStationURL(cfg.URL)
	if err != nil {
		return nil, err
	}
	if cfg.Roots == nil && cfg.Pin == nil {
		return nil, errors.New("no way to authenticate the station: give its CA or its fingerprint")
	}
	if cfg.Clock == nil {
		cfg.Clock = NewClock(nil)
	}
	if cfg.Timeout == 0 {
		cfg.Timeout = 60 * time.Second
	}
	host := u.Hostname()
	roots, pin, clock := cfg.Roots, cfg.Pin, cfg.Clock
	tc := &tls.Config{
		MinVersion:           tls.VersionTLS12,
		ServerName:           host,
		GetClientCertificate: cfg.GetClientCertificate,
		// Verification is done in VerifyConnection: the device's clock is
		// only a lower bound on the time (see verifyStation), which
		// crypto/tls's own check cannot express.
		InsecureSkipVerify: true,
		VerifyConnection: func(cs tls.ConnectionState) error {
			return verifyStation(cs.PeerCertificates, roots, pin, host, clock.Now())
		},
	}
	return &Client{
		base:  u,
		clock: cfg.Clock,
		http: &http.Client{
			Timeout: cfg.Timeout,
			Transport: &http.Transport{
				TLSClientConfig:     tc,
				TLSHandshakeTimeout: 30 * time.Second,
				ForceAttemptHTTP2:   true,
				DialContext:         (&net.Dialer{Timeout: 30 * time.Second}).DialContext,
				MaxIdleConns:        1,
				IdleConnTimeout:     30 * time.Second,
				// HTTP/2's default receive window (4 MiB a stream) lets
				// the station send that much ahead of a reader held up
				// by the flash: a firmware download then holds megabytes
				// of payload in memory. 256 KiB still fills a 50 Mbit/s
				// link at 40 ms.
				HTTP2: &http.HTTP2Config{MaxReceiveBufferPerStream: maxReceiveBuffer, MaxReceiveBufferPerConnection: maxReceiveBuffer},
			},
			CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse },
		},
	}, nil
}

// HTTP returns an HTTP client that reaches the station as this one does
// (its verification, its client certificate), with timeout bounding one
// request (0: none; a long download is bounded by its context).
func (c *Client) HTTP(timeout time.Duration) *http.Client {
	h := *c.http
	h.Timeout = timeout
	return &h
}

// URL is the station's base URL.
func (c *Client) URL() string { return c.base.String() }

// CloseIdleConnections drops kept-alive connections (after a certificate
// change, the next request must handshake with the new one).
func (c *Client) CloseIdleConnections() { c.http.CloseIdleConnections() }

// verifyStation checks the station's TLS chain for host: up to roots, or
// up to the certificate whose SHA-256 is pin.
//
// now is a lower bound on the real time: a gateway without RTC knows only
// that it is at least its floor. A certificate that expired before now is
// refused, a pinned leaf included; one whose notBefore is after now may
// well be valid (a station set up after the agent was built), so the chain
// is checked at the latest notBefore it holds when that is later than now.
// The station's Date header then teaches the clock.
func verifyStation(chain []*x509.Certificate, roots *x509.CertPool, pin []byte, host string, now time.Time) error {
	if len(chain) == 0 {
		return errors.New("station presented no certificate")
	}
	at := now
	for _, c := range chain {
		if c.NotBefore.After(at) {
			at = c.NotBefore
		}
	}
	inter := x509.NewCertPool()
	if pin != nil {
		i := slices.IndexFunc(chain, func(c *x509.Certificate) bool {
			sum := sha256.Sum256(c.Raw)
			return subtle.ConstantTimeCompare(sum[:], pin) == 1
		})
		if i < 0 {
			return fmt.Errorf("station TLS chain holds no certificate with fingerprint sha256:%x", pin)
		}
		if i == 0 {
			// The pin names the key to trust, not for how long: an
			// expired station certificate is refused pinned or not.
			if leaf := chain[0]; now.After(leaf.NotAfter) {
				return fmt.Errorf("pinned station certificate: %w", x509.CertificateInvalidError{Cert: leaf, Reason: x509.Expired,
					Detail: fmt.Sprintf("the device's time %s is after %s", now.UTC().Format(time.RFC3339), leaf.NotAfter.UTC().Format(time.RFC3339))})
			}
			return chain[0].VerifyHostname(host)
		}
		roots = x509.NewCertPool()
		roots.AddCert(chain[i])
		chain = chain[:i]
	}
	for _, c := range chain[1:] {
		inter.AddCert(c)
	}
	_, err := chain[0].Verify(x509.VerifyOptions{Roots: roots, Intermediates: inter, DNSName: host, CurrentTime: at})
	return err
}

// do sends a request and returns the body of a 200 answer. Other answers
// are *StatusError. The Date header of any authenticated answer teaches the
// clock.
func (c *Client) do(ctx context.Context, op, method, path, contentType string, body []byte) (*http.Response, []byte, error) {
	u := *c.base
	u.Path = path
	var rd io.Reader
	if body != nil {
		rd = bytes.NewReader(body)
	}
	req, err := http.NewRequestWithContext(ctx, method, u.String(), rd)
	if err != nil {
		return nil, nil, err
	}
	if contentType != "" {
		req.Header.Set("Content-Type", contentType)
	}
	return c.send(op, req)
}

func (c *Client) send(op string, req *http.Request) (*http.Response, []byte, error) {
	req.Header.Set("User-Agent", "iotagent")
	resp, err := c.http.Do(req)
	if err != nil {
		return nil, nil, fmt.Errorf("%s: %w", op, err)
	}
	defer resp.Body.Close()
	if d, err := http.ParseTime(resp.Header.Get("Date")); err == nil {
		c.clock.Learn(d)
	}
	data, err := io.ReadAll(io.LimitReader(resp.Body, est.MaxBody+1))
	if err != nil {
		return nil, nil, fmt.Errorf("%s: reading answer: %w", op, err)
	}
	if len(data) > est.MaxBody {
		return nil, nil, fmt.Errorf("%s: answer over %d bytes", op, est.MaxBody)
	}
	if resp.StatusCode != http.StatusOK {
		se := &StatusError{Op: op, Code: resp.StatusCode, Message: firstLine(data)}
		if s, err := strconv.Atoi(resp.Header.Get("Retry-After")); err == nil && s > 0 {
			se.RetryAfter = time.Duration(s) * time.Second
		} else if t, err := http.ParseTime(resp.Header.Get("Retry-After")); err == nil {
			se.RetryAfter = t.Sub(c.clock.Now())
		}
		return resp, nil, se
	}
	return resp, data, nil
}

func firstLine(b []byte) string {
	s := strings.TrimSpace(string(b))
	if i := strings.IndexByte(s, '\n'); i >= 0 {
		s = s[:i]
	}
	if len(s) > 300 {
		s = s[:300] + "…"
	}
	return s
}

// decodeCerts reads a base64 certs-only answer.
func decodeCerts(op string, resp *http.Response, body []byte) ([]*x509.Certificate, error) {
	if ct := resp.Header.Get("Content-Type"); !est.MediaTypeIs(ct, est.MediaPKCS7) {
		return nil, fmt.Errorf("%s: answer has Content-Type %q, want %s", op, ct, est.MediaCertsOnly)
	}
	der, err := est.DecodeBase64(body)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", op, err)
	}
	raw, err := est.ParseCertsOnly(der)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", op, err)
	}
	certs, err := est.ParseCertificates(raw)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", op, err)
	}
	return certs, nil
}

// CACerts fetches the station's CA certificates (RFC 7030 §4.1).
func (c *Client) CACerts(ctx context.Context) ([]*x509.Certificate, error) {
	resp, body, err := c.do(ctx, "cacerts", http.MethodGet, est.PathCACerts, "", nil)
	if err != nil {
		return nil, err
	}
	return decodeCerts("cacerts", resp, body)
}

func (c *Client) enroll(ctx context.Context, op, path string, csr []byte, user, pass string) (*x509.Certificate, error) {
	u := *c.base
	u.Path = path
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, u.String(), bytes.NewReader(est.EncodeBase64(csr)))
	if err != nil {
		return nil, err
	}
	req.Header.Set("Content-Type", est.MediaPKCS10)
	req.Header.Set(est.HeaderCTE, "base64")
	if user != "" {
		req.SetBasicAuth(user, pass)
	}
	resp, body, err := c.send(op, req)
	if err != nil {
		return nil, err
	}
	certs, err := decodeCerts(op, resp, body)
	if err != nil {
		return nil, err
	}
	return certs[0], nil
}

// SimpleEnroll asks for a certificate with a one-time token (HTTP Basic).
func (c *Client) SimpleEnroll(ctx context.Context, csr []byte, device, token string) (*x509.Certificate, error) {
	return c.enroll(ctx, "simpleenroll", est.PathEnroll, csr, device, token)
}

// SimpleReenroll renews the client certificate (same key) over mutual TLS.
func (c *Client) SimpleReenroll(ctx context.Context, csr []byte) (*x509.Certificate, error) {
	return c.enroll(ctx, "simplereenroll", est.PathReenroll, csr, "", "")
}

// TPMEnroll sends a credential-activation enrollment.
func (c *Client) TPMEnroll(ctx context.Context, r *est.TPMEnrollRequest) (*est.TPMEnrollResponse, error) {
	body, ct, err := r.Encode()
	if err != nil {
		return nil, err
	}
	resp, data, err := c.do(ctx, "tpmenroll", http.MethodPost, est.PathTPMEnroll, ct, body)
	if err != nil {
		return nil, err
	}
	out, err := est.DecodeTPMEnrollResponse(resp.Header.Get("Content-Type"), bytes.NewReader(data))
	if err != nil {
		return nil, fmt.Errorf("tpmenroll: %w", err)
	}
	return out, nil
}
