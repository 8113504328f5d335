// Package watch is the fleet side's view of telemetry delivery: it
// subscribes to every device's telemetry on the broker and accounts for it
// per device by sequence number: records received, unique, duplicates, and
// the sequence numbers never seen (gaps). It is how an operator checks the
// agents' at-least-once delivery end to end, and what the demo reports.
package watch

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net/url"
	"sort"
	"strings"
	"sync"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"

	"iotagent.dev/iotagent/telemetry/senml"
)

// Config configures a Watcher.
type Config struct {
	// Broker is mqtts://HOST:PORT.
	Broker string
	// TLS carries the backend client certificate (iotstation issue) and
	// the broker's CA.
	TLS *tls.Config
	// ClientID defaults to the certificate's CN as brokers that take the
	// identity from the certificate require.
	ClientID string
	// Persistent keeps the session (clean session off): a broker that
	// persists sessions queues what arrives while the watcher reconnects.
	Persistent bool
	Logger     *slog.Logger
}

// Device is what was seen of one device.
type Device struct {
	ID       string `json:"id"`
	Messages int    `json:"messages"`
	Records  int    `json:"records"`
	Unique   int    `json:"unique"`
	// Duplicates counts records received more than once (at-least-once
	// delivery resends after a lost acknowledgement).
	Duplicates int `json:"duplicates"`
	// MinSeq, MaxSeq bound the sequence numbers seen; Missing counts those
	// in between never seen.
	MinSeq  uint64 `json:"min_seq"`
	MaxSeq  uint64 `json:"max_seq"`
	Missing int    `json:"missing"`
	// Status is the device's last retained status message.
	Status string `json:"status,omitempty"`
	// Invalid counts messages that were not SenML.
	Invalid int `json:"invalid"`
}

// Watcher subscribes to devices/+/telemetry and devices/+/status. Safe for
// concurrent use.
type Watcher struct {
	cfg Config
	log *slog.Logger

	mu      sync.Mutex
	devices map[string]*tally
}

type tally struct {
	Device
	seen map[uint64]int
}

// New checks cfg.
func New(cfg Config) (*Watcher, error) {
	u, err := url.Parse(cfg.Broker)
	if err != nil || u.Host == "" || (u.Scheme != "mqtts" && u.Scheme != "ssl" && u.Scheme != "tls") {
		return nil, fmt.Errorf("broker %q: want mqtts://HOST:PORT", cfg.Broker)
	}
	if cfg.TLS == nil || len(cfg.TLS.Certificates) == 0 {
		return nil, errors.New("watch needs a client certificate (iotstation issue --name fleet-reader)")
	}
	if cfg.ClientID == "" {
		if leaf := cfg.TLS.Certificates[0].Leaf; leaf != nil {
			cfg.ClientID = leaf.Subject.CommonName
		}
	}
	w := &Watcher{cfg: cfg, log: cfg.Logger, devices: map[string]*tally{}}
	if w.log == nil {
		w.log = slog.New(slog.DiscardHandler)
	}
	return w, nil
}

// Run stays subscribed until ctx ends, reconnecting when the broker goes
// away. Losing messages while disconnected shows up as missing sequence
// numbers: the watcher is an observer, not part of the delivery.
func (w *Watcher) Run(ctx context.Context) error {
	u, _ := url.Parse(w.cfg.Broker)
	opts := paho.NewClientOptions().AddBroker("tls://" + u.Host).SetClientID(w.cfg.ClientID).
		SetTLSConfig(w.cfg.TLS).SetCleanSession(!w.cfg.Persistent).SetAutoReconnect(true).
		SetMaxReconnectInterval(2 * time.Second).SetConnectRetry(true).SetConnectRetryInterval(time.Second).
		SetOrderMatters(false).
		SetOnConnectHandler(func(c paho.Client) {
			tok := c.SubscribeMultiple(map[string]byte{"devices/+/telemetry": 1, "devices/+/status": 1}, w.handle)
			if tok.WaitTimeout(10*time.Second) && tok.Error() == nil {
				w.log.Info("watching", "broker", u.Host)
			}
		})
	c := paho.NewClient(opts)
	c.Connect()
	<-ctx.Done()
	c.Disconnect(250)
	return nil
}

func (w *Watcher) handle(_ paho.Client, m paho.Message) {
	parts := strings.Split(m.Topic(), "/")
	if len(parts) != 3 || parts[0] != "devices" {
		return
	}
	id, kind := parts[1], parts[2]
	w.mu.Lock()
	defer w.mu.Unlock()
	t := w.devices[id]
	if t == nil {
		t = &tally{Device: Device{ID: id}, seen: map[uint64]int{}}
		w.devices[id] = t
	}
	if kind == "status" {
		t.Status = string(m.Payload())
		return
	}
	t.Messages++
	p, err := senml.ParseJSON(m.Payload())
	if err != nil {
		t.Invalid++
		return
	}
	for _, r := range p {
		t.Records++
		t.seen[r.Seq]++
	}
}

// Devices returns the accounts, by device ID.
func (w *Watcher) Devices() []Device {
	w.mu.Lock()
	defer w.mu.Unlock()
	out := make([]Device, 0, len(w.devices))
	for _, t := range w.devices {
		d := t.Device
		d.Unique, d.Duplicates, d.MinSeq, d.MaxSeq = len(t.seen), 0, 0, 0
		for s, n := range t.seen {
			d.Duplicates += n - 1
			if d.MinSeq == 0 || s < d.MinSeq {
				d.MinSeq = s
			}
			d.MaxSeq = max(d.MaxSeq, s)
		}
		if d.Unique > 0 {
			d.Missing = int(d.MaxSeq-d.MinSeq+1) - d.Unique
		}
		out = append(out, d)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].ID < out[j].ID })
	return out
}

// Seen reports whether seq of device id was received.
func (w *Watcher) Seen(id string, seq uint64) bool {
	w.mu.Lock()
	defer w.mu.Unlock()
	t := w.devices[id]
	return t != nil && t.seen[seq] > 0
}

// UniqueUpTo counts the distinct sequence numbers of device id in [1, max].
func (w *Watcher) UniqueUpTo(id string, max uint64) int {
	w.mu.Lock()
	defer w.mu.Unlock()
	t := w.devices[id]
	if t == nil {
		return 0
	}
	n := 0
	for s := range t.seen {
		if s <= max {
			n++
		}
	}
	return n
}
