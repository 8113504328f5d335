// Package republish is a collector sink that republishes what devices
// sent over CoAP into the fleet's MQTT broker, on devices/ID/telemetry, so
// the backend sees one stream whatever uplink a gateway uses.
//
// A Write returns only after the broker's PUBACK: the collector answers the
// device 2.04 only then, so delivery stays at-least-once end to end. The
// broker must let this client (its certificate's CN, e.g. coap-collector)
// write devices/+/telemetry:
//
//	user coap-collector
//	topic write devices/+/telemetry
package republish

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net/url"
	"sync"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"

	"iotagent.dev/iotagent/telemetry/senml"
)

// Config configures the sink.
type Config struct {
	// Broker is mqtts://HOST:PORT.
	Broker string
	// TLS holds the collector's client certificate (Certificates, or
	// GetClientCertificate for one renewed while running) and the
	// broker's CA.
	TLS *tls.Config
	// ClientID defaults to the certificate's CN.
	ClientID string
	Timeout  time.Duration // per publish and connect (default 10 s)
}

// Sink republishes to MQTT. Safe for concurrent use; Close disconnects.
type Sink struct {
	cfg  Config
	addr string

	mu     sync.Mutex
	client paho.Client
}

// New checks cfg; the connection is made at the first Write.
func New(cfg Config) (*Sink, error) {
	u, err := url.Parse(cfg.Broker)
	if err != nil || u.Host == "" || (u.Scheme != "mqtts" && u.Scheme != "ssl" && u.Scheme != "tls") {
		return nil, fmt.Errorf("republish broker %q: want mqtts://HOST:PORT", cfg.Broker)
	}
	if cfg.TLS == nil || len(cfg.TLS.Certificates) == 0 && cfg.TLS.GetClientCertificate == nil {
		return nil, errors.New("republish needs a client certificate (iotstation issue --name coap-collector)")
	}
	if cfg.ClientID == "" {
		// The certificate's CN; with GetClientCertificate (a certificate
		// renewed while running), that of the current one.
		var c *tls.Certificate
		if len(cfg.TLS.Certificates) > 0 {
			c = &cfg.TLS.Certificates[0]
		} else if gc, err := cfg.TLS.GetClientCertificate(&tls.CertificateRequestInfo{}); err == nil {
			c = gc
		}
		if c != nil && c.Leaf != nil {
			cfg.ClientID = c.Leaf.Subject.CommonName
		}
	}
	if cfg.Timeout == 0 {
		cfg.Timeout = 10 * time.Second
	}
	return &Sink{cfg: cfg, addr: u.Host}, nil
}

// connected returns a live client, connecting when there is none. Paho's
// auto-reconnect stays off: it would complete tokens before their PUBACK.
func (s *Sink) connected() (paho.Client, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.client != nil && s.client.IsConnectionOpen() {
		return s.client, nil
	}
	c := paho.NewClient(paho.NewClientOptions().AddBroker("tls://" + s.addr).SetClientID(s.cfg.ClientID).
		SetTLSConfig(s.cfg.TLS).SetCleanSession(true).SetAutoReconnect(false).SetConnectRetry(false).
		SetOrderMatters(false).SetConnectTimeout(s.cfg.Timeout).SetWriteTimeout(s.cfg.Timeout))
	tok := c.Connect()
	if !tok.WaitTimeout(s.cfg.Timeout) {
		return nil, fmt.Errorf("connecting to %s: timed out", s.addr)
	}
	if err := tok.Error(); err != nil {
		return nil, fmt.Errorf("connecting to %s: %w", s.addr, err)
	}
	s.client = c
	return c, nil
}

// Write publishes p as a SenML JSON pack to devices/ID/telemetry, QoS 1,
// and returns once the broker acknowledged it.
func (s *Sink) Write(ctx context.Context, deviceID string, p senml.Pack) error {
	payload, err := p.EncodeJSON()
	if err != nil {
		return err
	}
	c, err := s.connected()
	if err != nil {
		return err
	}
	tok := c.Publish("devices/"+deviceID+"/telemetry", 1, false, payload)
	select {
	case <-tok.Done():
	case <-ctx.Done():
		return ctx.Err()
	case <-time.After(s.cfg.Timeout):
		return fmt.Errorf("republishing to %s: no PUBACK within %v", s.addr, s.cfg.Timeout)
	}
	return tok.Error()
}

// Close disconnects.
func (s *Sink) Close() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.client != nil {
		s.client.Disconnect(250)
		s.client = nil
	}
	return nil
}
