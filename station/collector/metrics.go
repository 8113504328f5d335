package collector

import (
	"fmt"
	"maps"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/plgd-dev/go-coap/v3/message/codes"
	"iotagent.dev/iotagent/dtls"
)

// Stats is a snapshot of a collector's counters since New.
type Stats struct {
	// Handshakes counts finished DTLS handshakes by result: "ok", or the
	// reason of the failure ("unknown_ca", "expired", "bad_certificate",
	// "revoked", "not_device", "no_certificate", "no_shared_cipher",
	// "no_extended_master_secret", "timeout", "no_cookie", "busy", "peer_"
	// and the name of the alert the client sent, "other"). "no_cookie" is
	// a handshake that ended before the client returned the
	// HelloVerifyRequest cookie (a spoofed source never does), "busy" a
	// first ClientHello refused while Config.MaxHandshakes were in
	// progress (the client's retransmission tries again), or a handshake
	// that returned its cookie and never got one of them.
	// Handshakes cut short by shutdown are not counted.
	Handshakes map[string]uint64

	// HandshakesInProgress is the number of handshakes under way past the
	// cookie exchange, at most Config.MaxHandshakes.
	HandshakesInProgress int

	// HandshakesPending is the number of handshakes waiting for the
	// client's cookie, or for a slot, at most
	// Config.MaxPendingHandshakes; PendingEvicted counts those dropped to
	// stay within it, those whose cookie has not come back first, the
	// oldest first.
	HandshakesPending int
	PendingEvicted    uint64

	// Dropped counts datagrams that reached no DTLS connection, by
	// reason: "not_hello" (from an unknown address, or before the cookie
	// came back, and not a ClientHello that may start or continue a
	// handshake there), "bad_cookie" (a ClientHello with a cookie its
	// connection never sent), "source_limit" (a first ClientHello, or one
	// returning its cookie, from a source that has
	// Config.MaxHandshakesPerSource handshakes past the cookie exchange),
	// "queue_full" (a new handshake while the accept queue was full),
	// "stale_hello" (a ClientHello that answers a HelloVerifyRequest of a
	// handshake that is gone; answered with an alert, so that the client
	// starts over).
	Dropped map[string]uint64

	// HandshakeTime is the distribution of the durations of successful
	// handshakes, from the first ClientHello to the client's Finished: it
	// includes the network's round trips and the device's signature.
	HandshakeTime Histogram

	// Sessions is the number of established sessions; SessionsByCipher
	// breaks it down by cipher suite (as dtls.CipherSuiteName names
	// it).
	Sessions         int64
	SessionsByCipher map[string]int64

	// Requests counts answered CoAP requests by response code, "2.04".
	Requests map[string]uint64

	Records RecordStats
	Dedupe  DedupeStats
}

// RecordStats count the records of well-formed requests.
type RecordStats struct {
	Accepted    uint64 // written to the sink, Unsequenced included
	Duplicate   uint64 // dropped: written before
	Unsequenced uint64 // written without a sequence number: never de-duplicated
}

// DedupeStats describe the de-duplication state (see the package doc).
type DedupeStats struct {
	Devices   int    // devices whose window is remembered
	Evictions uint64 // windows forgotten to stay within DedupeDevices
	Resets    uint64 // windows restarted because a device restarted its numbering
}

// Histogram is a distribution of durations.
type Histogram struct {
	Count   uint64
	Sum     time.Duration
	Buckets []Bucket // ascending; cumulative, as in Prometheus
}

// Bucket counts the observations of at most UpperBound.
type Bucket struct {
	UpperBound time.Duration
	Count      uint64
}

// handshakeBounds cover a software key on loopback (about 1.5 ms) to a TPM
// on an ARMv7 gateway across a slow link (seconds).
var handshakeBounds = [...]time.Duration{
	time.Millisecond, 2500 * time.Microsecond, 5 * time.Millisecond,
	10 * time.Millisecond, 25 * time.Millisecond, 50 * time.Millisecond,
	100 * time.Millisecond, 250 * time.Millisecond, 500 * time.Millisecond,
	time.Second, 2500 * time.Millisecond, 5 * time.Second, 10 * time.Second,
}

// metrics are the collector's counters.
type metrics struct {
	mu         sync.Mutex
	handshakes map[string]uint64
	hsCount    uint64
	hsSum      time.Duration
	hsBuckets  [len(handshakeBounds)]uint64 // not cumulative
	sessions   map[string]int64             // by cipher suite

	pending atomic.Int64
	evicted atomic.Uint64
	dropped [len(dropReasons)]atomic.Uint64

	requests    [256]atomic.Uint64 // by codes.Code, which is below 256
	accepted    atomic.Uint64
	duplicate   atomic.Uint64
	unsequenced atomic.Uint64
}

// established counts a successful handshake and the session it opens.
func (m *metrics) established(d time.Duration, cipher string) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.count("ok")
	m.hsCount++
	m.hsSum += d
	if i, _ := slices.BinarySearch(handshakeBounds[:], d); i < len(m.hsBuckets) {
		m.hsBuckets[i]++
	}
	if m.sessions == nil {
		m.sessions = map[string]int64{}
	}
	m.sessions[cipher]++
}

func (m *metrics) closed(cipher string) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.sessions[cipher]--; m.sessions[cipher] == 0 {
		delete(m.sessions, cipher)
	}
}

func (m *metrics) handshakeFailed(reason string) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.count(reason)
}

func (m *metrics) count(result string) {
	if m.handshakes == nil {
		m.handshakes = map[string]uint64{}
	}
	m.handshakes[result]++
}

// Why a datagram reached no DTLS connection: indexes of dropReasons.
const (
	dropNotHello = iota
	dropBadCookie
	dropSourceLimit
	dropQueueFull
	dropStale
)

var dropReasons = [...]string{
	dropNotHello:    "not_hello",
	dropBadCookie:   "bad_cookie",
	dropSourceLimit: "source_limit",
	dropQueueFull:   "queue_full",
	dropStale:       "stale_hello",
}

func (m *metrics) drop(reason int) { m.dropped[reason].Add(1) }

func (m *metrics) request(c codes.Code) {
	if int(c) < len(m.requests) {
		m.requests[c].Add(1)
	}
}

// codeString formats a response code as RFC 7252 does, "4.04".
func codeString(c codes.Code) string {
	return fmt.Sprintf("%d.%02d", c>>5, c&0x1f)
}

// Stats returns a snapshot of the collector's counters.
func (c *Collector) Stats() Stats {
	m := &c.m
	s := Stats{
		HandshakesInProgress: len(c.handshakes),
		HandshakesPending:    int(m.pending.Load()),
		PendingEvicted:       m.evicted.Load(),
		Dropped:              map[string]uint64{},
		Requests:             map[string]uint64{},
		Records: RecordStats{
			Accepted:    m.accepted.Load(),
			Duplicate:   m.duplicate.Load(),
			Unsequenced: m.unsequenced.Load(),
		},
		Dedupe: c.dedupe.stats(),
	}
	for i, r := range dropReasons {
		s.Dropped[r] = m.dropped[i].Load()
	}
	for code := range m.requests {
		if n := m.requests[code].Load(); n > 0 {
			s.Requests[codeString(codes.Code(code))] = n
		}
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	s.Handshakes = maps.Clone(m.handshakes)
	if s.Handshakes == nil {
		s.Handshakes = map[string]uint64{}
	}
	s.SessionsByCipher = maps.Clone(m.sessions)
	if s.SessionsByCipher == nil {
		s.SessionsByCipher = map[string]int64{}
	}
	for _, n := range m.sessions {
		s.Sessions += n
	}
	s.HandshakeTime = Histogram{Count: m.hsCount, Sum: m.hsSum, Buckets: make([]Bucket, len(handshakeBounds))}
	var cum uint64
	for i, b := range handshakeBounds {
		cum += m.hsBuckets[i]
		s.HandshakeTime.Buckets[i] = Bucket{UpperBound: b, Count: cum}
	}
	return s
}

// Metrics returns the collector's counters in the Prometheus text format,
// names prefixed iotstation_coap_, for the station's /metrics.
func (c *Collector) Metrics() string {
	s := c.Stats()
	var b strings.Builder
	family := func(name, typ, help string) {
		fmt.Fprintf(&b, "# HELP %s %s\n# TYPE %s %s\n", name, help, name, typ)
	}

	family("iotstation_coap_handshakes_total", "counter", "DTLS handshakes by result: ok, or the reason of the failure.")
	fmt.Fprintf(&b, "iotstation_coap_handshakes_total{result=\"ok\"} %d\n", s.Handshakes["ok"])
	for _, r := range slices.Sorted(maps.Keys(s.Handshakes)) {
		if r != "ok" {
			fmt.Fprintf(&b, "iotstation_coap_handshakes_total{result=%q} %d\n", r, s.Handshakes[r])
		}
	}

	family("iotstation_coap_handshakes_in_progress", "gauge", "DTLS handshakes under way past the cookie exchange.")
	fmt.Fprintf(&b, "iotstation_coap_handshakes_in_progress %d\n", s.HandshakesInProgress)
	family("iotstation_coap_handshakes_pending", "gauge", "DTLS handshakes waiting for the client's cookie or for a slot.")
	fmt.Fprintf(&b, "iotstation_coap_handshakes_pending %d\n", s.HandshakesPending)
	family("iotstation_coap_handshakes_evicted_total", "counter", "Pending DTLS handshakes dropped, those without the client's cookie first, to stay within the bound: a flood is on.")
	fmt.Fprintf(&b, "iotstation_coap_handshakes_evicted_total %d\n", s.PendingEvicted)
	family("iotstation_coap_datagrams_dropped_total", "counter", "Datagrams that reached no DTLS connection, by reason.")
	for _, r := range dropReasons {
		fmt.Fprintf(&b, "iotstation_coap_datagrams_dropped_total{reason=%q} %d\n", r, s.Dropped[r])
	}

	family("iotstation_coap_handshake_seconds", "histogram", "Duration of successful DTLS handshakes, first ClientHello to Finished.")
	for _, bk := range s.HandshakeTime.Buckets {
		fmt.Fprintf(&b, "iotstation_coap_handshake_seconds_bucket{le=%q} %d\n", strconv.FormatFloat(bk.UpperBound.Seconds(), 'g', -1, 64), bk.Count)
	}
	fmt.Fprintf(&b, "iotstation_coap_handshake_seconds_bucket{le=\"+Inf\"} %d\n", s.HandshakeTime.Count)
	fmt.Fprintf(&b, "iotstation_coap_handshake_seconds_sum %g\n", s.HandshakeTime.Sum.Seconds())
	fmt.Fprintf(&b, "iotstation_coap_handshake_seconds_count %d\n", s.HandshakeTime.Count)

	family("iotstation_coap_sessions", "gauge", "Established DTLS 1.2 sessions by cipher suite.")
	ciphers := maps.Clone(s.SessionsByCipher)
	for _, id := range dtls.CipherSuites {
		ciphers[dtls.CipherSuiteName(id)] += 0 // a series for each offered suite, even at 0
	}
	for _, cs := range slices.Sorted(maps.Keys(ciphers)) {
		fmt.Fprintf(&b, "iotstation_coap_sessions{cipher=%q} %d\n", cs, ciphers[cs])
	}

	family("iotstation_coap_requests_total", "counter", "CoAP requests answered, by response code.")
	for _, code := range slices.Sorted(maps.Keys(s.Requests)) {
		fmt.Fprintf(&b, "iotstation_coap_requests_total{code=%q} %d\n", code, s.Requests[code])
	}

	family("iotstation_coap_records_total", "counter", "SenML records received, by result: accepted (written to the sink) or duplicate (dropped).")
	fmt.Fprintf(&b, "iotstation_coap_records_total{result=\"accepted\"} %d\n", s.Records.Accepted)
	fmt.Fprintf(&b, "iotstation_coap_records_total{result=\"duplicate\"} %d\n", s.Records.Duplicate)
	family("iotstation_coap_records_unsequenced_total", "counter", "Accepted records without a sequence number, which cannot be de-duplicated.")
	fmt.Fprintf(&b, "iotstation_coap_records_unsequenced_total %d\n", s.Records.Unsequenced)

	family("iotstation_coap_dedupe_devices", "gauge", "Devices whose de-duplication window is remembered.")
	fmt.Fprintf(&b, "iotstation_coap_dedupe_devices %d\n", s.Dedupe.Devices)
	family("iotstation_coap_dedupe_evictions_total", "counter", "De-duplication windows forgotten to bound memory: a late duplicate of such a device may pass once.")
	fmt.Fprintf(&b, "iotstation_coap_dedupe_evictions_total %d\n", s.Dedupe.Evictions)
	family("iotstation_coap_dedupe_resets_total", "counter", "De-duplication windows restarted because a device restarted its sequence numbers.")
	fmt.Fprintf(&b, "iotstation_coap_dedupe_resets_total %d\n", s.Dedupe.Resets)
	return b.String()
}
