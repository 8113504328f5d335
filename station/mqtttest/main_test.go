package mqtttest_test

import (
	"crypto/tls"
	"fmt"
	"os"
	"testing"
	"time"

	mqtt "github.com/eclipse/paho.mqtt.golang"

	"iotagent.dev/iotagent/internal/leakcheck"
	"iotagent.dev/iotagent/station/mqtttest"
	"iotagent.dev/iotagent/station/stationtest"
	"iotagent.dev/iotagent/tpm/tpmtest"
)

// stationtest reads the tpmtest manufacturer CA.
func TestMain(m *testing.M) { os.Exit(tpmtest.Main(m)) }

// wait bounds every wait on the broker in these tests: far above what a
// healthy exchange takes on loopback.
const wait = 5 * time.Second

// checkGoroutines fails t if, once every later cleanup has run, goroutines
// of this package or paho are still running (paho's Disconnect may return
// while its last goroutines finish). Call it first in a test, so that its
// cleanup runs last.
func checkGoroutines(t *testing.T) {
	t.Helper()
	leakcheck.Check(t, wait, "station/mqtttest.", "eclipse/paho.mqtt.golang")
}

// start starts a station and a broker with opts.
func start(t *testing.T, opts mqtttest.Options) (*stationtest.Station, *mqtttest.Broker) {
	t.Helper()
	st := stationtest.Start(t, stationtest.Options{AutoApprove: true})
	return st, mqtttest.Start(t, st, opts)
}

// connect connects a paho client (no auto-reconnect, like the product's
// uplink) to url with cfg; it disconnects at cleanup. lost, if not nil,
// receives the error when the connection is lost.
func connect(t *testing.T, url string, cfg *tls.Config, lost chan<- error) (mqtt.Client, error) {
	t.Helper()
	return connectAs(t, url, cfg, "ignored-the-broker-uses-the-certificate", lost)
}

// connectAs is connect asking for client ID id.
func connectAs(t *testing.T, url string, cfg *tls.Config, id string, lost chan<- error) (mqtt.Client, error) {
	t.Helper()
	opts := mqtt.NewClientOptions().
		AddBroker(url).
		SetClientID(id).
		SetTLSConfig(cfg).
		SetProtocolVersion(4).
		SetCleanSession(true).
		SetAutoReconnect(false).
		SetConnectTimeout(wait).
		SetKeepAlive(30 * time.Second)
	if lost != nil {
		opts.SetConnectionLostHandler(func(_ mqtt.Client, err error) { lost <- err })
	}
	c := mqtt.NewClient(opts)
	tok := c.Connect()
	if !tok.WaitTimeout(2 * wait) {
		t.Fatalf("paho Connect(%s) did not complete within %v", url, 2*wait)
	}
	if err := tok.Error(); err != nil {
		return nil, err
	}
	t.Cleanup(func() { c.Disconnect(100) })
	return c, nil
}

func mustConnect(t *testing.T, url string, cfg *tls.Config, lost chan<- error) mqtt.Client {
	t.Helper()
	c, err := connect(t, url, cfg, lost)
	if err != nil {
		t.Fatalf("paho Connect(%s) = %v, want connected", url, err)
	}
	return c
}

// publish publishes at QoS 1 and waits for the PUBACK.
func publish(t *testing.T, c mqtt.Client, topic, payload string) {
	t.Helper()
	tok := c.Publish(topic, 1, false, payload)
	if !tok.WaitTimeout(wait) {
		t.Fatalf("Publish(%s): no PUBACK within %v", topic, wait)
	}
	if err := tok.Error(); err != nil {
		t.Fatalf("Publish(%s) = %v, want PUBACK", topic, err)
	}
}

// next returns the subscriber's next message, failing t after wait.
func next(t *testing.T, sub *mqtttest.Subscriber) mqtttest.Message {
	t.Helper()
	select {
	case m, ok := <-sub.Messages():
		if !ok {
			t.Fatal("subscriber closed")
		}
		return m
	case <-time.After(wait):
		t.Fatalf("no message within %v", wait)
		return mqtttest.Message{}
	}
}

// expect fails t unless the subscriber's next message is topic, payload.
func expect(t *testing.T, sub *mqtttest.Subscriber, topic, payload string) {
	t.Helper()
	m := next(t, sub)
	if m.Topic != topic || string(m.Payload) != payload {
		t.Errorf("next message = %s %q, want %s %q", m.Topic, m.Payload, topic, payload)
	}
}

// marker returns a payload unique to this call.
func marker(t *testing.T) string {
	return fmt.Sprintf("%s@%d", t.Name(), time.Now().UnixNano())
}
