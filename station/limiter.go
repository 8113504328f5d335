package station

import (
	"container/list"
	"net"
	"net/http"
	"net/netip"
	"sync"
	"time"
)

// maxSources bounds each per-source table. When full, the source not
// heard from for longest is forgotten (O(1)): a flood of new sources
// costs the station a fixed amount of memory, never a scan.
const maxSources = 65536

// sourceOf names the client a request comes from, as the limiters count
// it: the IPv4 address, or the IPv6 /64 (one customer's prefix, from
// which an attacker could otherwise draw endless addresses).
func sourceOf(r *http.Request) string {
	host, _, err := net.SplitHostPort(r.RemoteAddr)
	if err != nil {
		host = r.RemoteAddr
	}
	a, err := netip.ParseAddr(host)
	if err != nil {
		return host
	}
	a = a.Unmap()
	if a.Is6() {
		p, _ := a.Prefix(64)
		return p.String()
	}
	return a.String()
}

// lru is a bounded map from source to state, evicting the least recently
// used entry. Not safe for concurrent use: its owner locks.
type lru[V any] struct {
	max int
	m   map[string]*list.Element
	l   list.List // front: most recent
}

type lruEntry[V any] struct {
	key string
	v   V
}

func newLRU[V any](max int) *lru[V] {
	return &lru[V]{max: max, m: map[string]*list.Element{}}
}

// get returns key's entry, creating a zero one (and evicting the oldest
// when full), and marks it used.
func (c *lru[V]) get(key string) *V {
	if e, ok := c.m[key]; ok {
		c.l.MoveToFront(e)
		return &e.Value.(*lruEntry[V]).v
	}
	if c.l.Len() >= c.max {
		old := c.l.Back()
		c.l.Remove(old)
		delete(c.m, old.Value.(*lruEntry[V]).key)
	}
	e := c.l.PushFront(&lruEntry[V]{key: key})
	c.m[key] = e
	return &e.Value.(*lruEntry[V]).v
}

func (c *lru[V]) len() int { return c.l.Len() }

// failureLimiter slows down clients that fail often: after maxFailures
// failures within window, a source is refused (429) for a cool-down that
// doubles with each further failure, up to maxCooldown. A request
// reserves its attempt before any work is done (begin), so requests in
// flight count against the budget too: many at once on one connection
// get no more work done than one after the other. A proven success
// clears the record.
type failureLimiter struct {
	mu          sync.Mutex
	now         func() time.Time
	maxFailures int
	window      time.Duration
	maxCooldown time.Duration
	sources     *lru[failures]
}

type failures struct {
	count        int
	inflight     int
	first        time.Time
	blockedUntil time.Time
	cooldown     time.Duration
}

func newFailureLimiter(now func() time.Time) *failureLimiter {
	return &failureLimiter{now: now, maxFailures: 5, window: time.Minute, maxCooldown: 5 * time.Minute, sources: newLRU[failures](maxSources)}
}

// limitBusy: a source's requests in flight and failures together reached
// the budget; retry in a second.
const limitBusy = -1

// begin reserves an attempt for src. It returns 0 to go ahead (the
// caller must then call end), limitBusy when the source's budget is
// taken by requests in flight, or how long src is blocked for.
func (l *failureLimiter) begin(src string) time.Duration {
	l.mu.Lock()
	defer l.mu.Unlock()
	now := l.now()
	f := l.sources.get(src)
	if d := f.blockedUntil.Sub(now); d > 0 {
		return d
	}
	if f.count > 0 && now.Sub(f.first) > l.window {
		f.count = 0
	}
	// What failures have not used of the budget may be in flight; once a
	// block has passed, one attempt at a time (a failure blocks again,
	// for twice as long).
	if f.inflight >= max(l.maxFailures-f.count, 1) {
		return limitBusy
	}
	f.inflight++
	return 0
}

// Outcomes of a reserved attempt.
const (
	outcomeFailed = iota // the client's fault: counts
	outcomeDone          // not the client's fault, or not yet proven
	outcomeProven        // the client proved who it is: forget its failures
)

// end settles src's reserved attempt.
func (l *failureLimiter) end(src string, outcome int) {
	l.mu.Lock()
	defer l.mu.Unlock()
	f := l.sources.get(src)
	if f.inflight > 0 { // an evicted source comes back at zero
		f.inflight--
	}
	switch outcome {
	case outcomeFailed:
		l.failLocked(f)
	case outcomeProven:
		f.count, f.cooldown, f.blockedUntil = 0, 0, time.Time{}
	}
}

// forgive forgets src's failures: it proved who it is.
func (l *failureLimiter) forgive(src string) {
	l.mu.Lock()
	defer l.mu.Unlock()
	f := l.sources.get(src)
	f.count, f.cooldown, f.blockedUntil = 0, 0, time.Time{}
}

// fail counts a failure of a request that held no reservation (refused
// by the limiter itself: hammering a block extends it).
func (l *failureLimiter) fail(src string) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.failLocked(l.sources.get(src))
}

func (l *failureLimiter) failLocked(f *failures) {
	now := l.now()
	if f.count == 0 || now.Sub(f.first) > l.window && now.After(f.blockedUntil) {
		f.count, f.first = 0, now
	}
	f.count++
	if f.count >= l.maxFailures {
		if f.cooldown == 0 {
			f.cooldown = 5 * time.Second
		} else {
			f.cooldown = min(2*f.cooldown, l.maxCooldown)
		}
		f.blockedUntil = now.Add(f.cooldown)
	}
}

// rateLimiter is a token bucket per source: burst requests at once, then
// one every interval.
type rateLimiter struct {
	mu       sync.Mutex
	now      func() time.Time
	burst    int
	interval time.Duration
	sources  *lru[bucket]
}

type bucket struct {
	tokens float64
	at     time.Time
}

func newRateLimiter(now func() time.Time, burst int, interval time.Duration) *rateLimiter {
	return &rateLimiter{now: now, burst: burst, interval: interval, sources: newLRU[bucket](maxSources)}
}

// take spends one of src's tokens, or says how long until one is there.
func (l *rateLimiter) take(src string) (time.Duration, bool) {
	l.mu.Lock()
	defer l.mu.Unlock()
	now := l.now()
	b := l.sources.get(src)
	if b.at.IsZero() {
		b.tokens = float64(l.burst)
	} else {
		b.tokens = min(float64(l.burst), b.tokens+float64(now.Sub(b.at))/float64(l.interval))
	}
	b.at = now
	if b.tokens >= 1 {
		b.tokens--
		return 0, true
	}
	return time.Duration((1 - b.tokens) * float64(l.interval)), false
}
