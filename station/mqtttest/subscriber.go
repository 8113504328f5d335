package mqtttest

import (
	"errors"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	mqtt "github.com/eclipse/paho.mqtt.golang"

	"iotagent.dev/iotagent/telemetry/senml"
)

// MessageBuffer is how many messages a Subscriber holds for the test to
// read before it drops them (and fails the test).
const MessageBuffer = 100_000

// subscribeTimeout bounds a Subscriber's connect and each subscription.
const subscribeTimeout = 10 * time.Second

// Message is a message the Subscriber received.
type Message struct {
	Topic   string
	Payload []byte
	// Retained is set on a retained message delivered at subscription.
	Retained bool
	// Duplicate is the DUP flag: the broker sent the message before,
	// without an acknowledgement.
	Duplicate bool
}

// Subscriber is the test's observer of what the broker delivers: a paho
// client connected as ReaderName, subscribed at QoS 1 with a clean
// session. Unlike the product's uplink it reconnects by itself (paho's
// auto-reconnect, retrying every 250 ms at most) and subscribes again on
// every connect, so it survives Restart and Kill; messages published
// while it is disconnected are not delivered to it.
//
// Broker.Subscribe opens it and closes it at cleanup; Close may be called
// earlier. At most one Subscriber per broker is open at a time: mosquitto
// takes the client ID from the certificate, so a second one would take
// over the first's session. Its methods are safe for concurrent use.
type Subscriber struct {
	b      *Broker
	t      testing.TB
	topic  string
	client mqtt.Client
	msgs   chan Message
	stop   chan struct{} // closed by Close

	mu         sync.Mutex
	closed     bool
	dropped    int
	subscribed int           // SUBACKs granting the subscription
	changed    chan struct{} // closed and replaced when subscribed changes
	subErr     error         // the last failed subscription
	handlers   sync.WaitGroup
}

// Subscribe connects a Subscriber to topic (a filter: "devices/#" sees
// everything devices may publish) and returns once the broker granted the
// subscription. It fails the test if it cannot within 10 s.
// If the test is not reading Messages fast enough, the Subscriber fails
// it at the first message dropped and reports the count at Close.
func (b *Broker) Subscribe(t testing.TB, topic string) *Subscriber {
	t.Helper()
	b.subMu.Lock()
	if b.sub != nil {
		b.subMu.Unlock()
		t.Fatalf("mqtttest: a Subscriber is already open on this broker (its client ID %q is taken from the certificate, so a second one would evict it); subscribe to a wider filter instead", ReaderName)
	}
	size := b.subBuffer
	if size == 0 {
		size = MessageBuffer
	}
	s := &Subscriber{b: b, t: t, topic: topic, msgs: make(chan Message, size), stop: make(chan struct{}), changed: make(chan struct{})}
	b.sub = s
	b.subMu.Unlock()

	opts := mqtt.NewClientOptions().
		AddBroker(b.URL).
		SetClientID(ReaderName).
		SetTLSConfig(b.ClientTLS(t, ReaderName)).
		SetProtocolVersion(4).
		SetCleanSession(true).
		SetAutoReconnect(true).
		SetMaxReconnectInterval(250 * time.Millisecond).
		SetConnectTimeout(5 * time.Second).
		// A subscription is re-made in onConnect on every connect; with
		// a clean session there is nothing for ResumeSubs to resume.
		SetOnConnectHandler(s.onConnect)
	s.client = mqtt.NewClient(opts)
	t.Cleanup(s.Close)
	tok := s.client.Connect()
	if !tok.WaitTimeout(subscribeTimeout) {
		t.Fatalf("mqtttest: subscriber connect timed out\n%s", b.LogTail())
	}
	if err := tok.Error(); err != nil {
		t.Fatalf("mqtttest: subscriber connect: %v\n%s", err, b.LogTail())
	}
	s.WaitSubscribed(t, 1)
	return s
}

// onConnect subscribes, on paho's goroutine, after every connect.
func (s *Subscriber) onConnect(c mqtt.Client) {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return
	}
	s.handlers.Add(1)
	s.mu.Unlock()
	defer s.handlers.Done()

	tok := c.Subscribe(s.topic, 1, s.deliver)
	timeout := time.NewTimer(subscribeTimeout)
	defer timeout.Stop()
	var err error
	select {
	case <-tok.Done():
		err = tok.Error()
		if err == nil && tok.(*mqtt.SubscribeToken).Result()[s.topic] == 0x80 {
			err = errors.New("the broker refused the subscription (SUBACK 0x80)")
		}
	case <-timeout.C:
		err = fmt.Errorf("no SUBACK within %v", subscribeTimeout)
	case <-s.stop:
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if err != nil {
		// A connection lost meanwhile brings another onConnect.
		s.subErr = err
		return
	}
	s.subscribed++
	close(s.changed)
	s.changed = make(chan struct{})
}

// deliver runs on paho's goroutine; it never blocks it.
func (s *Subscriber) deliver(_ mqtt.Client, m mqtt.Message) {
	msg := Message{Topic: m.Topic(), Payload: m.Payload(), Retained: m.Retained(), Duplicate: m.Duplicate()}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return
	}
	select {
	case s.msgs <- msg:
	default:
		s.dropped++
		if s.dropped == 1 {
			// Now, not only at Close: a test blocked on a message that
			// was dropped would otherwise time out without saying why.
			// Close waits for s.mu, so the test is still running.
			s.t.Errorf("mqtttest: the subscriber is dropping messages: Messages() is full (%d); read it while publishing", cap(s.msgs))
		}
	}
}

// Messages returns the messages received, in order. The channel holds
// MessageBuffer messages; past that the Subscriber drops messages and
// fails the test at Close. Close closes the channel.
func (s *Subscriber) Messages() <-chan Message { return s.msgs }

// Subscribed returns how many times the broker granted the subscription:
// 1 when Subscribe returns, one more after each reconnect.
func (s *Subscriber) Subscribed() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.subscribed
}

// WaitSubscribed waits until Subscribed reaches n, failing t after 10 s.
// After a Restart, n := s.Subscribed() before it and WaitSubscribed(t, n+1)
// after it ensures the subscriber sees what is published next.
func (s *Subscriber) WaitSubscribed(t testing.TB, n int) {
	t.Helper()
	timeout := time.NewTimer(subscribeTimeout)
	defer timeout.Stop()
	for {
		s.mu.Lock()
		got, changed, err := s.subscribed, s.changed, s.subErr
		s.mu.Unlock()
		if got >= n {
			return
		}
		select {
		case <-changed:
		case <-timeout.C:
			t.Fatalf("mqtttest: subscriber subscribed %d times, want %d within %v (last error: %v)\n%s", got, n, subscribeTimeout, err, s.b.LogTail())
		}
	}
}

// Close disconnects, closes the Messages channel (messages already in it
// stay readable) and fails the test if messages were dropped. It may be
// called more than once.
func (s *Subscriber) Close() {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return
	}
	s.closed = true
	s.mu.Unlock()

	close(s.stop)
	s.client.Disconnect(250)
	s.handlers.Wait()
	s.mu.Lock()
	close(s.msgs)
	dropped := s.dropped
	s.mu.Unlock()
	s.b.subMu.Lock()
	s.b.sub = nil
	s.b.subMu.Unlock()
	if dropped > 0 {
		s.t.Errorf("mqtttest: the subscriber dropped %d messages: Messages() was full (%d); read it while publishing", dropped, cap(s.msgs))
	}
}

// WaitSeqs reads telemetry messages (SenML JSON packs) until every
// sequence number in want was seen or d passes, failing the test then. It
// returns how many times each sequence number arrived (duplicates are
// at-least-once delivery at work). Messages on other topics are skipped.
func (s *Subscriber) WaitSeqs(t testing.TB, want []uint64, d time.Duration) map[uint64]int {
	t.Helper()
	got := map[uint64]int{}
	missing := make(map[uint64]bool, len(want))
	for _, q := range want {
		missing[q] = true
	}
	deadline := time.After(d)
	for len(missing) > 0 {
		select {
		case m, ok := <-s.Messages():
			if !ok {
				t.Fatalf("subscriber closed with %d of %d records missing", len(missing), len(want))
			}
			if !strings.HasSuffix(m.Topic, "/telemetry") {
				continue
			}
			p, err := senml.ParseJSON(m.Payload)
			if err != nil {
				t.Fatalf("telemetry payload on %s is not SenML: %v", m.Topic, err)
			}
			for _, r := range p {
				got[r.Seq]++
				delete(missing, r.Seq)
			}
		case <-deadline:
			t.Fatalf("%d of %d records not received after %v", len(missing), len(want), d)
		}
	}
	return got
}
