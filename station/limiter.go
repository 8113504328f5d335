package station

import (
	"sync"
	"time"
)

// failureLimiter slows down clients that fail often: after maxFailures
// failures within window, a client is refused (429) for a cool-down that
// doubles with each further failure, up to maxCooldown. A success clears
// the record. Keyed by remote IP.
type failureLimiter struct {
	mu          sync.Mutex
	now         func() time.Time
	maxFailures int
	window      time.Duration
	maxCooldown time.Duration
	clients     map[string]*failures
}

type failures struct {
	count        int
	first        time.Time
	blockedUntil time.Time
	cooldown     time.Duration
}

func newFailureLimiter(now func() time.Time) *failureLimiter {
	return &failureLimiter{now: now, maxFailures: 5, window: time.Minute, maxCooldown: 5 * time.Minute, clients: map[string]*failures{}}
}

// blocked reports whether ip must wait, and how long.
func (l *failureLimiter) blocked(ip string) (time.Duration, bool) {
	l.mu.Lock()
	defer l.mu.Unlock()
	f := l.clients[ip]
	if f == nil {
		return 0, false
	}
	if d := f.blockedUntil.Sub(l.now()); d > 0 {
		return d, true
	}
	return 0, false
}

// fail records a failure by ip.
func (l *failureLimiter) fail(ip string) {
	l.mu.Lock()
	defer l.mu.Unlock()
	now := l.now()
	f := l.clients[ip]
	if f == nil || now.Sub(f.first) > l.window && now.After(f.blockedUntil) {
		f = &failures{first: now}
		l.clients[ip] = f
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
	// Keep the map bounded: forget stale clients now and then.
	if len(l.clients) > 10000 {
		for k, v := range l.clients {
			if now.Sub(v.first) > l.window && now.After(v.blockedUntil) {
				delete(l.clients, k)
			}
		}
	}
}

// succeed forgets ip's failures.
func (l *failureLimiter) succeed(ip string) {
	l.mu.Lock()
	defer l.mu.Unlock()
	delete(l.clients, ip)
}
