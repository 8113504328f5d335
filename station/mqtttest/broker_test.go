package mqtttest_test

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"fmt"
	"io"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	mqtt "github.com/eclipse/paho.mqtt.golang"

	"iotagent.dev/iotagent/internal/testsync"
	"iotagent.dev/iotagent/station"
	"iotagent.dev/iotagent/station/mqtttest"
	"iotagent.dev/iotagent/station/stationtest"
)

func TestStart(t *testing.T) {
	checkGoroutines(t)
	_, b := start(t, mqtttest.Options{Config: []string{"max_keepalive 120"}, ACL: []string{"user fleet-commander", "topic write devices/+/cmd"}})
	host, _, err := net.SplitHostPort(b.Addr)
	if err != nil || host != "127.0.0.1" {
		t.Errorf("Addr = %q, want 127.0.0.1:PORT", b.Addr)
	}
	if want := "mqtts://" + b.Addr; b.URL != want {
		t.Errorf("URL = %q, want %q", b.URL, want)
	}
	conf, err := os.ReadFile(b.Dir + "/mosquitto.conf")
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range []string{"per_listener_settings false", "allow_anonymous false", "require_certificate true",
		"use_identity_as_username true", "use_username_as_clientid true", "persistence false", "max_keepalive 120"} {
		if !strings.Contains(string(conf), "\n"+line+"\n") {
			t.Errorf("mosquitto.conf lacks %q:\n%s", line, conf)
		}
	}
	acl, err := os.ReadFile(b.Dir + "/acl")
	if err != nil || !strings.HasPrefix(string(acl), mqtttest.DefaultACL) || !strings.HasSuffix(string(acl), "topic write devices/+/cmd\n") {
		t.Errorf("acl = %q, %v; want DefaultACL then Options.ACL", acl, err)
	}
	// The probe's connection is in the log.
	if tail := b.LogTail(); !strings.Contains(tail, "mosquitto version 2.0") || !strings.Contains(tail, "u'mqtttest-probe'") {
		t.Errorf("LogTail() = %s\nwant the probe's connection", tail)
	}
}

// A device publishes on its own topics only; what mosquitto drops it still
// acknowledges (MQTT 3.1.1 has no way to refuse a publish), so the check
// is what the fleet reader receives.
func TestACL(t *testing.T) {
	checkGoroutines(t)
	_, b := start(t, mqtttest.Options{})
	sub := b.Subscribe(t, "devices/#")
	gw1 := mustConnect(t, b.URL, b.ClientTLS(t, "gw-1"), nil)

	tests := []struct {
		name, topic string
		delivered   bool
	}{
		{"own telemetry", "devices/gw-1/telemetry", true},
		{"own status", "devices/gw-1/status", true},
		{"another device's telemetry", "devices/gw-2/telemetry", false},
		{"another device's status", "devices/gw-2/status", false},
		{"own commands", "devices/gw-1/cmd", false},
		{"below own telemetry", "devices/gw-1/telemetry/x", false},
		{"device root", "devices/gw-1", false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			payload := marker(t)
			publish(t, gw1, tt.topic, payload)
			// mosquitto delivers one client's messages in order: once the
			// marker arrives, payload would have arrived before it.
			end := marker(t)
			publish(t, gw1, "devices/gw-1/telemetry", end)
			if tt.delivered {
				expect(t, sub, tt.topic, payload)
			}
			expect(t, sub, "devices/gw-1/telemetry", end)
		})
	}

	t.Run("a device reads only its own topics", func(t *testing.T) {
		got := make(chan mqtttest.Message, 10)
		gw2 := mustConnect(t, b.URL, b.ClientTLS(t, "gw-2"), nil)
		// The subscription is granted even where the ACL forbids reading.
		tok := gw2.Subscribe("devices/#", 1, func(_ mqtt.Client, m mqtt.Message) {
			got <- mqtttest.Message{Topic: m.Topic(), Payload: m.Payload()}
		})
		if !tok.WaitTimeout(wait) || tok.Error() != nil {
			t.Fatalf("Subscribe = %v, want granted", tok.Error())
		}
		other := marker(t)
		publish(t, gw1, "devices/gw-1/telemetry", other)
		expect(t, sub, "devices/gw-1/telemetry", other)
		// gw-2 may read its own status: its marker comes after anything
		// gw-1's publish, queued first, would have brought.
		end := marker(t)
		publish(t, gw2, "devices/gw-2/status", end)
		select {
		case m := <-got:
			if m.Topic != "devices/gw-2/status" || string(m.Payload) != end {
				t.Errorf("gw-2 received %s %q, want only its own status %q", m.Topic, m.Payload, end)
			}
		case <-time.After(wait):
			t.Fatalf("gw-2 received nothing within %v, want its own status", wait)
		}
		expect(t, sub, "devices/gw-2/status", end)
	})
}

// The broker takes the client ID from the certificate: a gateway's new
// connection replaces its own old one, and cannot take over another's.
func TestClientIDFromCertificate(t *testing.T) {
	checkGoroutines(t)
	_, b := start(t, mqtttest.Options{})
	tests := []struct {
		name       string
		secondCN   string // the certificate of the second connection
		firstEvict bool
	}{
		{"same certificate", "gw-1", true},
		{"another certificate", "gw-2", false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			lost := make(chan error, 1)
			// Both ask for client ID gw-1: without use_username_as_clientid
			// the second would evict the first either way.
			first, err := connectAs(t, b.URL, b.ClientTLS(t, "gw-1"), "gw-1", lost)
			if err != nil {
				t.Fatalf("first Connect = %v", err)
			}
			if _, err := connectAs(t, b.URL, b.ClientTLS(t, tt.secondCN), "gw-1", nil); err != nil {
				t.Fatalf("second Connect = %v", err)
			}
			if tt.firstEvict {
				select {
				case <-lost:
				case <-time.After(wait):
					t.Errorf("first connection still up %v after the second connected, want evicted\n%s", wait, b.LogTail())
				}
				return
			}
			// A PUBACK shows the first connection is up after the second
			// one's CONNACK, by which time mosquitto has evicted any
			// connection it evicts.
			publish(t, first, "devices/gw-1/telemetry", marker(t))
			select {
			case err := <-lost:
				t.Errorf("first connection lost (%v), want it kept\n%s", err, b.LogTail())
			default:
			}
		})
	}
}

// rawConnect opens a TLS connection to addr with cfg and completes an MQTT
// CONNECT; the caller closes the connection.
func rawConnect(addr string, cfg *tls.Config) (*tls.Conn, error) {
	c, err := tls.DialWithDialer(&net.Dialer{Timeout: wait}, "tcp", addr, cfg)
	if err != nil {
		return nil, err
	}
	c.SetDeadline(time.Now().Add(wait))
	// With TLS 1.3 the client's handshake ends before the server has
	// checked its certificate: a refusal arrives as an alert after it. If
	// the server closed before our CONNECT arrived, the write fails with
	// ECONNRESET; the alert is still in the receive buffer: read it.
	if err := mqtttest.MQTTConnect(c); err != nil {
		if _, rerr := c.Read(make([]byte, 1)); !isAlert(err) && isAlert(rerr) {
			err = rerr
		}
		c.Close()
		return nil, err
	}
	c.SetDeadline(time.Time{})
	return c, nil
}

// isAlert reports whether err is a TLS alert from the peer.
func isAlert(err error) bool {
	var op *net.OpError
	return errors.As(err, &op) && op.Op == "remote error"
}

// ping sends PINGREQ on c and waits up to d for PINGRESP.
func ping(c net.Conn, d time.Duration) error {
	c.SetDeadline(time.Now().Add(d))
	defer c.SetDeadline(time.Time{})
	if _, err := c.Write([]byte{0xc0, 0}); err != nil {
		return err
	}
	var resp [2]byte
	if _, err := io.ReadFull(c, resp[:]); err != nil {
		return err
	}
	if resp != [2]byte{0xd0, 0} {
		return errors.New("not a PINGRESP")
	}
	return nil
}

func trustPool(t *testing.T, file string) *x509.CertPool {
	t.Helper()
	pemData, err := os.ReadFile(file)
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(pemData) {
		t.Fatalf("%s holds no certificate", file)
	}
	return pool
}

// foreignClientCert returns a client certificate for cn from a CA the
// station never heard of.
func foreignClientCert(t *testing.T, cn string) tls.Certificate {
	t.Helper()
	caKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	now := time.Now()
	caTmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "iotagent Issuing CA"},
		NotBefore: now.Add(-time.Hour), NotAfter: now.Add(time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign,
	}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	ca, _ := x509.ParseCertificate(caDER)
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	der, err := x509.CreateCertificate(rand.Reader, &x509.Certificate{
		SerialNumber: big.NewInt(2), Subject: pkix.Name{CommonName: cn},
		NotBefore: now.Add(-time.Hour), NotAfter: now.Add(time.Hour),
		KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
	}, ca, &key.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	return tls.Certificate{Certificate: [][]byte{der, caDER}, PrivateKey: key}
}

func TestHandshakeRefused(t *testing.T) {
	checkGoroutines(t)
	st, b := start(t, mqtttest.Options{})
	certFor := func(cn string, server bool, lifetime time.Duration) []tls.Certificate {
		sc, err := st.IssueService(context.Background(), station.ServiceRequest{Name: cn, Server: server, Lifetime: lifetime})
		if err != nil {
			t.Fatal(err)
		}
		c, err := tls.X509KeyPair(sc.Chain, sc.Key)
		if err != nil {
			t.Fatal(err)
		}
		return []tls.Certificate{c}
	}
	tests := []struct {
		name    string
		certs   []tls.Certificate
		wantErr string // "" for accepted
	}{
		{"station client certificate", certFor("gw-1", false, time.Hour), ""},
		{"another CA", []tls.Certificate{foreignClientCert(t, "gw-1")}, "remote error: tls: unknown certificate authority"},
		{"no certificate", nil, "remote error: tls: certificate required"},
		{"expired", certFor("gw-1", false, -time.Minute), "remote error: tls: expired certificate"},
		{"server certificate", certFor("gw-1", true, time.Hour), "remote error: tls: unsupported certificate"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cfg := &tls.Config{RootCAs: trustPool(t, b.CAFile), Certificates: tt.certs}
			c, err := rawConnect(b.Addr, cfg)
			if c != nil {
				c.Close()
			}
			if tt.wantErr == "" {
				if err != nil {
					t.Errorf("connect = %v, want accepted\n%s", err, b.LogTail())
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
				t.Errorf("connect = %v, want %q", err, tt.wantErr)
			}
		})
	}
}

// TestReloadCRL measures how mosquitto applies a new CRL: not by itself,
// on SIGHUP for new handshakes (ReloadCRL), and at a restart.
func TestReloadCRL(t *testing.T) {
	checkGoroutines(t)
	st, b := start(t, mqtttest.Options{})
	noCRL := mqtttest.Start(t, st, mqtttest.Options{NoCRL: true})
	id, cert := enrollDevice(t, st)
	device := &tls.Config{RootCAs: trustPool(t, b.CAFile), Certificates: []tls.Certificate{cert}}
	other := b.ClientTLS(t, "gw-ok")
	const revoked = "remote error: tls: revoked certificate"

	// check connects as the device, wanting the error wantDevice ("" for
	// accepted), then as a client nobody revoked, wanting it accepted.
	check := func(t *testing.T, b *mqtttest.Broker, step, wantDevice string) {
		t.Helper()
		c, err := rawConnect(b.Addr, device)
		if c != nil {
			c.Close()
		}
		if (wantDevice == "" && err != nil) || !strings.Contains(errString(err), wantDevice) {
			t.Errorf("%s: device connect = %v, want %q\n%s", step, err, wantDevice, b.LogTail())
		}
		c, err = rawConnect(b.Addr, other)
		if err != nil {
			t.Errorf("%s: other client connect = %v, want accepted", step, err)
			return
		}
		c.Close()
	}

	check(t, b, "before revocation", "")
	if err := st.Revoke(id); err != nil {
		t.Fatal(err)
	}
	check(t, b, "revoked, before reload", "")
	// Opened last: a device's new connection evicts its old one.
	open, err := rawConnect(b.Addr, device)
	if err != nil {
		t.Fatalf("device connect = %v, want accepted\n%s", err, b.LogTail())
	}
	defer open.Close()
	b.ReloadCRL()
	check(t, b, "after ReloadCRL", revoked)
	if err := ping(open, wait); err != nil {
		t.Errorf("connection opened before ReloadCRL: ping = %v, want PINGRESP (SIGHUP keeps connections)", err)
	}
	b.Restart()
	check(t, b, "after Restart", revoked)
	if err := ping(open, wait); err == nil {
		t.Errorf("connection opened before Restart: ping = nil, want an error")
	}
	noCRL.Restart()
	check(t, noCRL, "broker without CRL, after Restart", "")
}

func errString(err error) string {
	if err == nil {
		return ""
	}
	return err.Error()
}

func TestRestart(t *testing.T) {
	checkGoroutines(t)
	_, b := start(t, mqtttest.Options{})
	sub := b.Subscribe(t, "devices/#")
	device := b.ClientTLS(t, "gw-1")
	addr := b.Addr
	tests := []struct {
		name   string
		before func(t *testing.T) (after func())
	}{
		{"running", nil},
		{"stopped", func(*testing.T) func() { b.Stop(); b.Stop(); return nil }},
		{"killed", func(*testing.T) func() { b.Kill(); return nil }},
		{"port taken meanwhile", func(t *testing.T) func() {
			b.Stop()
			l, err := net.Listen("tcp", addr)
			if err != nil {
				t.Fatalf("taking the broker's port: %v", err)
			}
			// Restart retries for a second; the port frees up before.
			var wg sync.WaitGroup
			wg.Go(func() {
				time.Sleep(200 * time.Millisecond)
				l.Close()
			})
			return wg.Wait
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			lost := make(chan error, 1)
			old := mustConnect(t, b.URL, device, lost)
			n := sub.Subscribed()
			if tt.before != nil {
				if after := tt.before(t); after != nil {
					defer after()
				}
			}
			b.Restart()
			if b.Addr != addr || b.URL != "mqtts://"+addr {
				t.Errorf("after Restart Addr, URL = %s, %s; want %s, mqtts://%[3]s", b.Addr, b.URL, addr)
			}
			select {
			case <-lost:
			case <-time.After(wait):
				t.Errorf("the client connected before the restart was not disconnected")
			}
			old.Disconnect(0)
			sub.WaitSubscribed(t, n+1)
			c := mustConnect(t, b.URL, device, nil)
			m := marker(t)
			publish(t, c, "devices/gw-1/telemetry", m)
			expect(t, sub, "devices/gw-1/telemetry", m)
		})
	}
}

// countingSigner counts signatures: one per full handshake with a client
// certificate, none when a session is resumed.
type countingSigner struct {
	crypto.Signer
	n atomic.Int32
}

func (s *countingSigner) Sign(r io.Reader, digest []byte, opts crypto.SignerOpts) ([]byte, error) {
	s.n.Add(1)
	return s.Signer.Sign(r, digest, opts)
}

// TestTLSResumption measures whether mosquitto resumes TLS sessions of
// clients that authenticated with a certificate: a resumed handshake
// sends no certificate, so a device's TPM signs nothing.
func TestTLSResumption(t *testing.T) {
	checkGoroutines(t)
	_, b := start(t, mqtttest.Options{})
	tests := []struct {
		name       string
		version    uint16
		between    func()
		wantResume bool
	}{
		{"TLS 1.3", tls.VersionTLS13, nil, true},
		{"TLS 1.2", tls.VersionTLS12, nil, true},
		{"TLS 1.3 across SIGHUP", tls.VersionTLS13, b.ReloadCRL, false},
		{"TLS 1.2 across SIGHUP", tls.VersionTLS12, b.ReloadCRL, false},
		{"TLS 1.3 across Restart", tls.VersionTLS13, b.Restart, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cfg := b.ClientTLS(t, "gw-1")
			signer := &countingSigner{Signer: cfg.Certificates[0].PrivateKey.(crypto.Signer)}
			cfg.Certificates[0].PrivateKey = signer
			cfg.MinVersion, cfg.MaxVersion = tt.version, tt.version
			cfg.ClientSessionCache = tls.NewLRUClientSessionCache(1)
			// The CONNACK read processes the TLS 1.3 tickets sent after
			// the handshake.
			c, err := rawConnect(b.Addr, cfg)
			if err != nil {
				t.Fatalf("first connect = %v", err)
			}
			c.Close()
			if c.ConnectionState().DidResume || signer.n.Load() != 1 {
				t.Errorf("first connection: resumed %v, %d signatures; want a full handshake, 1 signature", c.ConnectionState().DidResume, signer.n.Load())
			}
			if tt.between != nil {
				tt.between()
			}
			c, err = rawConnect(b.Addr, cfg)
			if err != nil {
				t.Fatalf("second connect = %v, want accepted (the identity survives resumption)", err)
			}
			c.Close()
			wantSigs := int32(2)
			if tt.wantResume {
				wantSigs = 1
			}
			if got := c.ConnectionState().DidResume; got != tt.wantResume || signer.n.Load() != wantSigs {
				t.Errorf("second connection: DidResume = %v, %d signatures in all; want %v, %d", got, signer.n.Load(), tt.wantResume, wantSigs)
			}
		})
	}
}

// errorRecorder is a testing.TB that records Errorf instead of failing.
type errorRecorder struct {
	testing.TB
	mu   sync.Mutex
	errs []string
}

func (r *errorRecorder) Errorf(format string, args ...any) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.errs = append(r.errs, fmt.Sprintf(format, args...))
}

func TestSubscriberOverflowFailsTheTest(t *testing.T) {
	checkGoroutines(t)
	_, b := start(t, mqtttest.Options{})
	mqtttest.SetSubscriberBuffer(b, 3)
	rec := &errorRecorder{TB: t}
	sub := b.Subscribe(rec, "devices/#")
	gw := mustConnect(t, b.URL, b.ClientTLS(t, "gw-1"), nil)
	for i := range 5 {
		publish(t, gw, "devices/gw-1/telemetry", fmt.Sprint(i))
	}
	deadline := time.Now().Add(wait)
	for sub.Dropped() < 2 && time.Now().Before(deadline) {
		time.Sleep(time.Millisecond)
	}
	rec.mu.Lock()
	early := len(rec.errs)
	rec.mu.Unlock()
	if early != 1 {
		t.Errorf("errors reported before Close: %d, want 1 (at the first message dropped)", early)
	}
	sub.Close()
	sub.Close()
	if len(rec.errs) != 2 || !strings.Contains(rec.errs[1], "dropped 2 messages") {
		t.Errorf("errors reported = %q, want one at the first drop, then one at Close saying 2 messages were dropped", rec.errs)
	}
	var got []string
	for m := range sub.Messages() { // closed by Close
		got = append(got, string(m.Payload))
	}
	if strings.Join(got, ",") != "0,1,2" {
		t.Errorf("messages kept = %v, want the first 3", got)
	}
}

// With the station's CRL hook set to signal mosquitto, a revocation
// reaches the broker by itself: the revoked device is refused at its next
// connection with no reload from the operator (or the test).
func TestCRLHookReloadsMosquitto(t *testing.T) {
	checkGoroutines(t)
	pidFile := filepath.Join(t.TempDir(), "mosquitto.pid")
	st := stationtest.Start(t, stationtest.Options{AutoApprove: true,
		CRLHook: `kill -HUP "$(cat ` + pidFile + `)"`})
	b := mqtttest.Start(t, st, mqtttest.Options{})
	if err := os.WriteFile(pidFile, []byte(strconv.Itoa(b.PID())), 0o600); err != nil {
		t.Fatal(err)
	}
	id, cert := enrollDevice(t, st)
	device := &tls.Config{RootCAs: trustPool(t, b.CAFile), Certificates: []tls.Certificate{cert}}
	c, err := rawConnect(b.Addr, device)
	if err != nil {
		t.Fatalf("device connect before revocation = %v\n%s", err, b.LogTail())
	}
	c.Close()
	if err := st.Revoke(id); err != nil {
		t.Fatalf("Revoke: %v", err)
	}
	const revoked = "remote error: tls: revoked certificate"
	var last error
	testsync.Until(t, wait, "mosquitto refuses the revoked device", func() bool {
		c, last = rawConnect(b.Addr, device)
		if c != nil {
			c.Close()
		}
		return strings.Contains(errString(last), revoked)
	})
	if !strings.Contains(b.LogTail(), "Reloading config.") {
		t.Errorf("mosquitto's log shows no reload:\n%s", b.LogTail())
	}
	other := b.ClientTLS(t, "gw-ok")
	if c, err := rawConnect(b.Addr, other); err != nil {
		t.Errorf("another client after the reload = %v, want accepted", err)
	} else {
		c.Close()
	}
}
