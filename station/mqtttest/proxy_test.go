package mqtttest_test

import (
	"net"
	"strings"
	"testing"
	"time"

	"iotagent.dev/iotagent/internal/leakcheck"
	"iotagent.dev/iotagent/station/mqtttest"
)

// waitStats polls p.Stats until ok accepts them, failing t after wait.
func waitStats(t *testing.T, p *mqtttest.Proxy, what string, ok func(mqtttest.Stats) bool) mqtttest.Stats {
	t.Helper()
	deadline := time.Now().Add(wait)
	for {
		s := p.Stats()
		if ok(s) {
			return s
		}
		if time.Now().After(deadline) {
			t.Fatalf("Stats() = %+v, want %s within %v", s, what, wait)
		}
		time.Sleep(time.Millisecond)
	}
}

func TestProxy(t *testing.T) {
	checkGoroutines(t)
	_, b := start(t, mqtttest.Options{})
	sub := b.Subscribe(t, "devices/#")
	device := b.ClientTLS(t, "gw-1")
	const topic = "devices/gw-1/telemetry"

	t.Run("forwards", func(t *testing.T) {
		p := mqtttest.NewProxy(t, b.Addr)
		if want := "mqtts://" + p.Addr; p.URL != want {
			t.Errorf("URL = %q, want %q", p.URL, want)
		}
		c := mustConnect(t, p.URL, device, nil)
		m := marker(t)
		publish(t, c, topic, m)
		expect(t, sub, topic, m)
		s := p.Stats()
		if s.Accepted != 1 || s.Active != 1 || s.Up == 0 || s.Down == 0 || s.DroppedUp != 0 || s.DroppedDown != 0 {
			t.Errorf("Stats() = %+v, want 1 connection, bytes both ways, none dropped", s)
		}
		c.Disconnect(100)
		waitStats(t, p, "no active connection", func(s mqtttest.Stats) bool { return s.Active == 0 })
	})

	t.Run("BlackholeDownstream", func(t *testing.T) {
		p := mqtttest.NewProxy(t, b.Addr)
		lost := make(chan error, 1)
		c := mustConnect(t, p.URL, device, lost)
		p.BlackholeDownstream()
		m := marker(t)
		tok := c.Publish(topic, 1, false, m)
		// The publish reaches the broker, which delivers it...
		expect(t, sub, topic, m)
		// ...but its PUBACK, sent as the broker delivered, does not come
		// back.
		if tok.WaitTimeout(200 * time.Millisecond) {
			t.Errorf("Publish completed (err %v) through a downstream blackhole, want no PUBACK", tok.Error())
		}
		if s := p.Stats(); s.DroppedDown == 0 || s.DroppedUp != 0 {
			t.Errorf("Stats() = %+v, want downstream bytes dropped, no upstream bytes", s)
		}
		// Without auto-reconnect paho fails the pending publish when the
		// connection goes.
		p.Heal()
		if n := p.Cut(); n != 1 {
			t.Errorf("Cut() = %d, want 1", n)
		}
		if !tok.WaitTimeout(wait) || tok.Error() == nil {
			t.Errorf("pending Publish after the connection was cut = %v, want an error", tok.Error())
		}
		select {
		case <-lost:
		case <-time.After(wait):
			t.Error("connection-lost handler did not run")
		}
	})

	t.Run("Cut", func(t *testing.T) {
		p := mqtttest.NewProxy(t, b.Addr)
		lost := make(chan error, 1)
		mustConnect(t, p.URL, device, lost)
		if n := p.Cut(); n != 1 {
			t.Errorf("Cut() = %d, want 1", n)
		}
		select {
		case err := <-lost:
			if err == nil {
				t.Error("connection lost with a nil error")
			}
		case <-time.After(wait):
			t.Fatal("connection-lost handler did not run")
		}
		waitStats(t, p, "no active connection", func(s mqtttest.Stats) bool { return s.Active == 0 })
		// A link drop, not an outage: reconnecting works at once.
		c := mustConnect(t, p.URL, device, nil)
		m := marker(t)
		publish(t, c, topic, m)
		expect(t, sub, topic, m)
	})

	t.Run("Refuse", func(t *testing.T) {
		p := mqtttest.NewProxy(t, b.Addr)
		p.Refuse(true)
		if _, err := connect(t, p.URL, device, nil); err == nil {
			t.Fatal("Connect through a refusing proxy succeeded")
		}
		if s := p.Stats(); s.Accepted != 1 || s.Refused != 1 || s.Up != 0 {
			t.Errorf("Stats() = %+v, want 1 connection accepted and refused, no bytes", s)
		}
		p.Heal()
		c := mustConnect(t, p.URL, device, nil)
		m := marker(t)
		publish(t, c, topic, m)
		expect(t, sub, topic, m)
	})

	t.Run("Blackhole", func(t *testing.T) {
		p := mqtttest.NewProxy(t, b.Addr)
		c, err := rawConnect(p.Addr, device)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		p.Blackhole()
		err = ping(c, 200*time.Millisecond)
		if ne, ok := err.(net.Error); !ok || !ne.Timeout() {
			t.Errorf("ping through a blackhole = %v, want a timeout", err)
		}
		if s := p.Stats(); s.DroppedUp == 0 || s.Active != 1 {
			t.Errorf("Stats() = %+v, want upstream bytes dropped on a live connection", s)
		}
		// The PINGREQ record was lost: the TLS stream is broken, so Heal
		// helps new connections only.
		p.Heal()
		c2, err := rawConnect(p.Addr, device)
		if err != nil {
			t.Fatalf("connect after Heal = %v", err)
		}
		defer c2.Close()
		if err := ping(c2, wait); err != nil {
			t.Errorf("ping after Heal = %v", err)
		}
	})

	t.Run("target down", func(t *testing.T) {
		dead, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		dead.Close()
		p := mqtttest.NewProxy(t, dead.Addr().String())
		_, err = rawConnect(p.Addr, device)
		if err == nil {
			t.Fatal("connect through a proxy to a closed port succeeded")
		}
		waitStats(t, p, "the connection closed", func(s mqtttest.Stats) bool { return s.Accepted == 1 && s.Active == 0 })
	})
}

// Close and the test's cleanup stop every goroutine the proxy started,
// with connections in every state open.
func TestProxyStops(t *testing.T) {
	checkGoroutines(t)
	_, b := start(t, mqtttest.Options{})
	device := b.ClientTLS(t, "gw-1")
	proxyGoroutines := func() []string { return leakcheck.Goroutines("mqtttest.(*Proxy)") }
	// stopped fails t if proxy goroutines remain. Close has waited for
	// them, but one may still be returning from its deferred wg.Done:
	// allow it a moment.
	stopped := func(t *testing.T, when string) {
		t.Helper()
		deadline := time.Now().Add(time.Second)
		for {
			left := proxyGoroutines()
			if len(left) == 0 {
				return
			}
			if time.Now().After(deadline) {
				t.Errorf("%s, %d proxy goroutines left:\n%s", when, len(left), strings.Join(left, "\n\n"))
				return
			}
			time.Sleep(time.Millisecond)
		}
	}

	// load opens an idle TCP connection and a TLS one with an MQTT
	// session, and waits until the proxy forwards both.
	load := func(t *testing.T, p *mqtttest.Proxy) []net.Conn {
		idle, err := net.Dial("tcp", p.Addr)
		if err != nil {
			t.Fatal(err)
		}
		session, err := rawConnect(p.Addr, device)
		if err != nil {
			t.Fatal(err)
		}
		waitStats(t, p, "2 active connections", func(s mqtttest.Stats) bool { return s.Active == 2 })
		if len(proxyGoroutines()) == 0 {
			t.Fatal("no proxy goroutine found: the check below would prove nothing")
		}
		return []net.Conn{idle, session}
	}
	closed := func(t *testing.T, conns []net.Conn) {
		t.Helper()
		for _, c := range conns {
			c.SetReadDeadline(time.Now().Add(wait))
			if _, err := c.Read(make([]byte, 1)); err == nil || strings.Contains(err.Error(), "timeout") {
				t.Errorf("client connection after Close: read = %v, want closed", err)
			}
			c.Close()
		}
	}

	t.Run("Close", func(t *testing.T) {
		p := mqtttest.NewProxy(t, b.Addr)
		conns := load(t, p)
		p.Close()
		stopped(t, "after Close")
		closed(t, conns)
		p.Close()
		if _, err := net.Dial("tcp", p.Addr); err == nil {
			t.Error("the proxy still accepts connections after Close")
		}
	})

	var conns []net.Conn
	t.Run("cleanup", func(t *testing.T) {
		p := mqtttest.NewProxy(t, b.Addr)
		conns = load(t, p)
		p.Blackhole()
	})
	stopped(t, "after the test's cleanup")
	closed(t, conns)
}
