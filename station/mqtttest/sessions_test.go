package mqtttest_test

import (
	"crypto/tls"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	mqtt "github.com/eclipse/paho.mqtt.golang"

	"iotagent.dev/iotagent/internal/testsync"
	"iotagent.dev/iotagent/station"
	"iotagent.dev/iotagent/station/mqtttest"
	"iotagent.dev/iotagent/station/stationtest"
)

// cutOff bounds how long a revoked device may keep its session: the
// revocation must reach the broker by itself within seconds.
const cutOff = 5 * time.Second

// revokedAlert is how mosquitto refuses a certificate its CRL lists.
const revokedAlert = "remote error: tls: revoked certificate"

// streamer is a device publishing telemetry at QoS 1 as the agent's
// uplink does (its client ID is its device ID, no auto-reconnect), until
// its connection is lost.
type streamer struct {
	c    mqtt.Client
	tls  *tls.Config
	lost chan error
	done chan struct{}

	mu     sync.Mutex
	acked  int       // PUBACKs received
	lastOK time.Time // when the last one arrived
}

func stream(t *testing.T, b *mqtttest.Broker, id string, cert tls.Certificate) *streamer {
	t.Helper()
	s := &streamer{lost: make(chan error, 1), done: make(chan struct{}),
		tls: &tls.Config{RootCAs: trustPool(t, b.CAFile), Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12}}
	var err error
	if s.c, err = connectAs(t, b.URL, s.tls, id, s.lost); err != nil {
		t.Fatalf("device connect = %v\n%s", err, b.LogTail())
	}
	go func() {
		defer close(s.done)
		for i := 0; ; i++ {
			tok := s.c.Publish("devices/"+id+"/telemetry", 1, false, strconv.Itoa(i))
			if !tok.WaitTimeout(wait) || tok.Error() != nil {
				return
			}
			s.mu.Lock()
			s.acked++
			s.lastOK = time.Now()
			s.mu.Unlock()
			time.Sleep(10 * time.Millisecond)
		}
	}()
	t.Cleanup(func() {
		s.c.Disconnect(0)
		<-s.done
	})
	return s
}

// waitCutOff fails t unless the device loses its connection within
// cutOff of since, and returns how long that took.
func (s *streamer) waitCutOff(t *testing.T, b *mqtttest.Broker, since time.Time) time.Duration {
	t.Helper()
	select {
	case <-s.lost:
		return time.Since(since)
	case <-time.After(cutOff - time.Since(since)):
		s.mu.Lock()
		acked, last := s.acked, s.lastOK
		s.mu.Unlock()
		t.Fatalf("device still connected %v after the revocation: %d publishes acknowledged, the last %v after it\n%s",
			cutOff, acked, last.Sub(since).Round(time.Millisecond), b.LogTail())
		return 0
	}
}

// refusedAgain fails t unless the device's new connection is refused as
// revoked.
func (s *streamer) refusedAgain(t *testing.T, b *mqtttest.Broker) {
	t.Helper()
	c, err := rawConnect(b.Addr, s.tls)
	if err == nil {
		c.Close()
		t.Fatalf("revoked device reconnected\n%s", b.LogTail())
	}
	if !strings.Contains(err.Error(), revokedAlert) {
		t.Errorf("revoked device reconnect = %v, want %q", err, revokedAlert)
	}
}

// startForSessions starts a station whose CRL hook reloads the broker
// (SIGHUP) and a broker with the dynamic-security plugin; station.json's
// end_sessions names the plugin at url(b) (b.URL, or a proxy's).
func startForSessions(t *testing.T, retry time.Duration, url func(*mqtttest.Broker) string) (*stationtest.Station, *mqtttest.Broker) {
	t.Helper()
	pidFile := filepath.Join(t.TempDir(), "mosquitto.pid")
	st := stationtest.Start(t, stationtest.Options{AutoApprove: true, CRLHookRetry: retry,
		CRLHook: `kill -HUP "$(cat ` + pidFile + `)"`})
	b := mqtttest.Start(t, st, mqtttest.Options{DynSec: true})
	if err := os.WriteFile(pidFile, []byte(strconv.Itoa(b.PID())), 0o600); err != nil {
		t.Fatal(err)
	}
	if url != nil {
		setEndSessions(t, st, station.SessionsConfig{MosquittoDynsec: url(b)})
	}
	return st, b
}

// setEndSessions sets station.json's end_sessions, as an operator does.
func setEndSessions(t *testing.T, st *stationtest.Station, cfg station.SessionsConfig) {
	t.Helper()
	path := filepath.Join(st.Dir, "station.json")
	raw, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	var fc map[string]any
	if err := json.Unmarshal(raw, &fc); err != nil {
		t.Fatal(err)
	}
	fc["end_sessions"] = cfg
	raw, _ = json.Marshal(fc)
	if err := os.WriteFile(path, raw, 0o644); err != nil {
		t.Fatal(err)
	}
}

// sessionAudits returns the station's end-sessions audit entries.
func sessionAudits(t *testing.T, st *stationtest.Station) []station.AuditEntry {
	t.Helper()
	return audits(t, st, "end-sessions", "")
}

// audits returns the station's audit entries of event, for device (or
// service) name if not empty.
func audits(t *testing.T, st *stationtest.Station, event, name string) []station.AuditEntry {
	t.Helper()
	raw, err := os.ReadFile(filepath.Join(st.Dir, "audit.log"))
	if err != nil {
		t.Fatal(err)
	}
	var out []station.AuditEntry
	for _, line := range strings.Split(strings.TrimSpace(string(raw)), "\n") {
		var e station.AuditEntry
		if json.Unmarshal([]byte(line), &e) == nil && e.Event == event && (name == "" || e.Device == name) {
			out = append(out, e)
		}
	}
	return out
}

func busURL(b *mqtttest.Broker) string { return b.URL }

// streamingDevice enrolls a device at st that streams to b, and returns
// once the fleet reader (sub) got its first message.
func streamingDevice(t *testing.T, st *stationtest.Station, b *mqtttest.Broker) (*mqtttest.Subscriber, string, *streamer) {
	t.Helper()
	sub := b.Subscribe(t, "devices/#")
	id, cert := enrollDevice(t, st)
	dev := stream(t, b, id, cert)
	next(t, sub)
	return sub, id, dev
}

// A revoked device streaming telemetry over MQTT loses its session within
// seconds of the revocation, without a broker restart, and cannot get
// back in. (mosquitto checks its CRL only at a handshake; before the
// station ended sessions the device kept publishing until a restart.)
func TestAttackRevokedDeviceKeepsMQTTSession(t *testing.T) {
	checkGoroutines(t)
	st, b := startForSessions(t, 0, busURL)
	sub, id, dev := streamingDevice(t, st, b)

	revoked := time.Now()
	if err := st.Revoke(id); err != nil {
		t.Fatalf("Revoke: %v", err)
	}
	t.Logf("device cut off %v after Revoke began", dev.waitCutOff(t, b, revoked).Round(time.Millisecond))
	dev.refusedAgain(t, b)
	if a := sessionAudits(t, st); len(a) != 1 || a[0].Result != "accepted" || a[0].Device != id {
		t.Errorf("end-sessions audit = %+v, want one accepted for %s", a, id)
	}
	if _, err := os.Stat(filepath.Join(st.Dir, "sessions-pending.json")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("sessions-pending.json after success: %v, want none", err)
	}
	// Another device is untouched.
	other := mustConnect(t, b.URL, b.ClientTLS(t, "gw-ok"), nil)
	mark := marker(t)
	publish(t, other, "devices/gw-ok/telemetry", mark)
	drainUntil(t, sub, mark, func(m mqtttest.Message) {
		if m.Topic != "devices/"+id+"/telemetry" {
			t.Errorf("unexpected message %s %q", m.Topic, m.Payload)
		}
	})
}

// drainUntil passes the subscriber's messages to f until one carries mark.
func drainUntil(t *testing.T, sub *mqtttest.Subscriber, mark string, f func(mqtttest.Message)) {
	t.Helper()
	for m := next(t, sub); string(m.Payload) != mark; m = next(t, sub) {
		f(m)
	}
}

// A revoked device that gets back in, because the broker still holds an
// old CRL (no CRL hook here), can do nothing: its dynsec client's role
// denies every publish and subscription, where the ACL file alone would
// still grant its own topics.
func TestRevokedDeviceBackInCanDoNothing(t *testing.T) {
	checkGoroutines(t)
	st := stationtest.Start(t, stationtest.Options{AutoApprove: true})
	b := mqtttest.Start(t, st, mqtttest.Options{DynSec: true, ACL: []string{"user fleet-commander", "topic write devices/+/cmd"}})
	setEndSessions(t, st, station.SessionsConfig{MosquittoDynsec: b.URL})
	sub, id, dev := streamingDevice(t, st, b)
	if err := st.Revoke(id); err != nil {
		t.Fatalf("Revoke: %v", err)
	}
	dev.waitCutOff(t, b, time.Now())

	// It gets back in: the broker never reloaded its CRL.
	c := mustConnect(t, b.URL, dev.tls, nil)
	got := make(chan string, 10)
	for _, topic := range []string{"devices/" + id + "/cmd", "devices/#", "#"} {
		tok := c.Subscribe(topic, 1, func(_ mqtt.Client, m mqtt.Message) { got <- m.Topic() })
		if !tok.WaitTimeout(wait) {
			t.Fatalf("Subscribe(%s): no SUBACK", topic)
		}
	}
	cmd := mustConnect(t, b.URL, b.ClientTLS(t, "fleet-commander"), nil)
	publish(t, cmd, "devices/"+id+"/cmd", "reboot")
	publish(t, c, "devices/"+id+"/telemetry", "after revocation") // acknowledged, dropped
	mark := marker(t)
	publish(t, mustConnect(t, b.URL, b.ClientTLS(t, "gw-ok"), nil), "devices/gw-ok/telemetry", mark)
	drainUntil(t, sub, mark, func(m mqtttest.Message) {
		if string(m.Payload) == "after revocation" {
			t.Errorf("the revoked device's publish after it got back in was delivered")
		}
	})
	select {
	case topic := <-got:
		t.Errorf("the revoked device received %s", topic)
	case <-time.After(200 * time.Millisecond):
	}
}

// A device cannot use the dynamic-security plugin to end another
// device's session: the ACL grants its $CONTROL topic to the station's
// client only.
func TestAttackDeviceEndsAnotherDevicesSession(t *testing.T) {
	checkGoroutines(t)
	st, b := startForSessions(t, 0, busURL)
	_, victimID, victim := streamingDevice(t, st, b)
	// Another device (the ACL treats a certificate from the station as the
	// device its CN names).
	attacker := mustConnect(t, b.URL, b.ClientTLS(t, "dev-attacker"), nil)
	for _, cmd := range []string{
		`{"commands":[{"command":"createClient","username":"` + victimID + `"},{"command":"disableClient","username":"` + victimID + `"}]}`,
		`{"commands":[{"command":"deleteClient","username":"` + victimID + `"}]}`,
	} {
		publish(t, attacker, "$CONTROL/dynamic-security/v1", cmd)
	}
	select {
	case err := <-victim.lost:
		t.Fatalf("the victim lost its session to another device's dynsec commands: %v\n%s", err, b.LogTail())
	case <-time.After(time.Second):
	}
	raw, err := os.ReadFile(b.DynSecFile)
	if err != nil {
		t.Fatal(err)
	}
	if strings.Contains(string(raw), victimID) {
		t.Errorf("the plugin's configuration names the victim:\n%s", raw)
	}
}

// With the broker unreachable from the station (not from the device), the
// revocation reports that the session may live on and queues it; the
// retry loop ends it once the broker answers, and the queue empties.
func TestSessionEndRetried(t *testing.T) {
	checkGoroutines(t)
	var p *mqtttest.Proxy
	st, b := startForSessions(t, 50*time.Millisecond, func(b *mqtttest.Broker) string {
		p = mqtttest.NewProxy(t, b.Addr)
		return p.URL
	})
	_, id, dev := streamingDevice(t, st, b)

	p.Refuse(true)
	err := st.Revoke(id)
	if err == nil || !strings.Contains(err.Error(), "serve retries") {
		t.Fatalf("Revoke with the broker unreachable = %v, want an error saying serve retries", err)
	}
	select {
	case err := <-dev.lost:
		t.Fatalf("device lost its session with the broker unreachable from the station: %v", err)
	case <-time.After(200 * time.Millisecond):
	}
	pending, err := os.ReadFile(filepath.Join(st.Dir, "sessions-pending.json"))
	if err != nil || !strings.Contains(string(pending), id) {
		t.Fatalf("sessions-pending.json = %q, %v; want %s queued", pending, err, id)
	}
	for _, a := range sessionAudits(t, st) {
		if a.Result != "refused" {
			t.Errorf("end-sessions audit %+v with the broker unreachable, want refused", a)
		}
	}

	// serve retries (Station.RunSessionEnds runs beside its CRL loop).
	time.Sleep(150 * time.Millisecond) // a retry or two fail
	healed := time.Now()
	p.Refuse(false)
	t.Logf("device cut off %v after the broker became reachable", dev.waitCutOff(t, b, healed).Round(time.Millisecond))
	dev.refusedAgain(t, b)
	testsync.Until(t, wait, "the queue empties", func() bool {
		_, err := os.Stat(filepath.Join(st.Dir, "sessions-pending.json"))
		return errors.Is(err, os.ErrNotExist)
	})
	a := sessionAudits(t, st)
	if len(a) < 2 || a[len(a)-1].Result != "accepted" {
		t.Errorf("end-sessions audit = %+v, want refusals then one accepted", a)
	}
	// Each attempt connects with the same certificate: one issued and
	// recorded per attempt would be 144 a day at the retry cap.
	if issued := audits(t, st, "issue-service", station.SessionsClientName); len(issued) != 1 {
		t.Errorf("%d %s certificates issued over %d attempts, want 1", len(issued), station.SessionsClientName, len(a))
	}
}

// A broker that takes its time to fail (a silent partition: the
// connection's timeout, 10 s) delays no CRL hook run: a revocation
// meanwhile reaches the broker's CRL at once.
func TestSessionEndStallDoesNotDelayCRLHook(t *testing.T) {
	checkGoroutines(t)
	var p *mqtttest.Proxy
	st, b := startForSessions(t, 0, func(b *mqtttest.Broker) string {
		p = mqtttest.NewProxy(t, b.Addr)
		return p.URL
	})
	id, _ := enrollDevice(t, st)
	svc := b.ClientTLS(t, "gw-svc")
	refused := func() bool {
		c, err := rawConnect(b.Addr, svc)
		if err == nil {
			c.Close()
		}
		return err != nil && strings.Contains(err.Error(), revokedAlert)
	}
	if refused() {
		t.Fatal("the service certificate is refused before its revocation")
	}

	p.Blackhole()
	var wg sync.WaitGroup
	defer wg.Wait()
	defer p.Heal()
	wg.Go(func() { st.Revoke(id) }) // fails after the timeout: the broker does not answer
	testsync.Until(t, wait, "the session end connecting to the broker", func() bool { return p.Stats().Accepted > 0 })

	revoked := time.Now()
	if err := st.RevokeService("gw-svc"); err != nil {
		t.Fatalf("RevokeService = %v", err)
	}
	if took := time.Since(revoked); took > cutOff {
		t.Fatalf("RevokeService took %v with a session end connecting to a silent broker, want within %v: its CRL hook run waited for the connection",
			took.Round(time.Millisecond), cutOff)
	}
	testsync.Until(t, cutOff, "the broker refusing the revoked service certificate", refused)
	t.Logf("broker refused the certificate %v after RevokeService began, the session end still connecting", time.Since(revoked).Round(time.Millisecond))
}

// A device kicked while the CRL hook fails may reconnect, the broker not
// knowing its certificate is revoked: it stays queued, and counts as done
// only once a hook run succeeded before a kick.
func TestSessionEndWaitsForCRLHook(t *testing.T) {
	checkGoroutines(t)
	dir := t.TempDir()
	pidFile, fail := filepath.Join(dir, "mosquitto.pid"), filepath.Join(dir, "fail")
	st := stationtest.Start(t, stationtest.Options{AutoApprove: true, CRLHookRetry: 50 * time.Millisecond,
		CRLHook: `test ! -e ` + fail + ` && kill -HUP "$(cat ` + pidFile + `)"`})
	b := mqtttest.Start(t, st, mqtttest.Options{DynSec: true})
	if err := os.WriteFile(pidFile, []byte(strconv.Itoa(b.PID())), 0o600); err != nil {
		t.Fatal(err)
	}
	setEndSessions(t, st, station.SessionsConfig{MosquittoDynsec: b.URL})
	_, id, dev := streamingDevice(t, st, b)

	if err := os.WriteFile(fail, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	revoked := time.Now()
	if err := st.Revoke(id); err == nil || !strings.Contains(err.Error(), "CRL hook has not succeeded") {
		t.Errorf("Revoke with the CRL hook failing = %v, want an error saying the CRL hook has not succeeded", err)
	}
	dev.waitCutOff(t, b, revoked)
	if a := sessionAudits(t, st); len(a) != 1 || !strings.Contains(a[0].Reason, "again once the CRL hook succeeds") {
		t.Errorf("end-sessions audit = %+v, want one saying again once the CRL hook succeeds", a)
	}
	pending, err := os.ReadFile(filepath.Join(st.Dir, "sessions-pending.json"))
	if err != nil || !strings.Contains(string(pending), id) {
		t.Fatalf("sessions-pending.json = %q, %v; want %s queued", pending, err, id)
	}

	if err := os.Remove(fail); err != nil {
		t.Fatal(err)
	}
	testsync.Until(t, 2*wait, "the queue empties", func() bool {
		_, err := os.Stat(filepath.Join(st.Dir, "sessions-pending.json"))
		return errors.Is(err, os.ErrNotExist)
	})
	dev.refusedAgain(t, b)
	if a := sessionAudits(t, st); len(a) < 2 || a[len(a)-1].Reason != "disconnected at "+b.URL {
		t.Errorf("end-sessions audit = %+v, want the last disconnected at %s", a, b.URL)
	}
}

// A broker without the dynamic-security plugin swallows the station's
// commands (mosquitto acknowledges a publish to $CONTROL that nothing
// handles): the revocation says so, and the device stays queued.
func TestSessionEndWithoutPlugin(t *testing.T) {
	checkGoroutines(t)
	st := stationtest.Start(t, stationtest.Options{AutoApprove: true})
	b := mqtttest.Start(t, st, mqtttest.Options{})
	setEndSessions(t, st, station.SessionsConfig{MosquittoDynsec: b.URL})
	id, _ := enrollDevice(t, st)
	err := st.Revoke(id)
	if err == nil || !strings.Contains(err.Error(), "no answer from the dynamic-security plugin") {
		t.Fatalf("Revoke = %v, want no answer from the dynamic-security plugin", err)
	}
	if a := sessionAudits(t, st); len(a) != 1 || a[0].Result != "refused" || !strings.Contains(a[0].Reason, "is it loaded") {
		t.Errorf("end-sessions audit = %+v, want one refused asking whether the plugin is loaded", a)
	}
}
