// Package backoff is the one retry schedule of the project: exponential
// backoff with full jitter, as every retry loop of the agent and the
// station uses it (first enrollment, renewal, both uplinks' reconnects,
// the pipeline's resends).
//
// After the n-th consecutive failure the wait is drawn uniformly from
// (0, min(Cap, Base·2^(n-1))]: the ceiling doubles with each failure, and
// the draw spreads a fleet that failed together (a station restart, a
// broker outage) over the whole interval instead of sending it back in
// lockstep. A wait never exceeds Cap, and a loop that uses a Backoff never
// stops retrying: giving up is not the agent's to decide.
//
// # Reset rule
//
// Reset returns the ceiling to Base. A caller resets when the operation
// the backoff paces has done what it is retried for, not merely when a
// step of it worked: an EST request answered with a certificate, an
// uplink session that stayed up longer than the cap, a resend that was
// acknowledged. A peer that accepts connections and then ends or refuses
// each of them must see the waits grow, or the fleet would reconnect to
// it in a tight loop.
//
// # Retry-After
//
// A peer that says when to come back (HTTP Retry-After on 429, 503 or 202)
// is obeyed up to Cap: FailAfter waits at least that long.
package backoff

import (
	"context"
	"math/rand/v2"
	"time"
)

// Defaults of Config.
const (
	DefaultBase = time.Second
	DefaultCap  = 5 * time.Minute
)

// Config sets a Backoff's schedule. Zero values mean the defaults.
type Config struct {
	// Base is the ceiling of the first wait (default DefaultBase).
	Base time.Duration
	// Cap bounds every wait, Retry-After included (default DefaultCap).
	Cap time.Duration
	// Rand draws the jitter (default: a source seeded from the runtime's
	// random generator). Tests pass a seeded one.
	Rand *rand.Rand
	// After is the clock Sleep waits on (default time.After). Tests pass
	// one that records the waits.
	After func(time.Duration) <-chan time.Time
}

// Backoff counts consecutive failures and draws the wait after each. It
// is not safe for concurrent use: each retry loop owns its own.
type Backoff struct {
	cfg      Config
	failures int
}

// New returns a Backoff with no failure counted.
func New(cfg Config) *Backoff {
	if cfg.Base <= 0 {
		cfg.Base = DefaultBase
	}
	if cfg.Cap <= 0 {
		cfg.Cap = DefaultCap
	}
	if cfg.Cap < cfg.Base {
		cfg.Base = cfg.Cap
	}
	if cfg.Rand == nil {
		cfg.Rand = rand.New(rand.NewPCG(rand.Uint64(), rand.Uint64()))
	}
	if cfg.After == nil {
		cfg.After = time.After
	}
	return &Backoff{cfg: cfg}
}

// Fail counts a failure and returns how long to wait before the next
// attempt: uniform in (0, min(Cap, Base·2^(failures-1))].
func (b *Backoff) Fail() time.Duration {
	b.failures++
	return time.Duration(b.cfg.Rand.Int64N(int64(b.Ceiling()))) + 1
}

// FailAfter is Fail for a failure whose peer asked to be left alone for
// retryAfter (zero: it did not say): the wait is at least retryAfter, up
// to Cap.
func (b *Backoff) FailAfter(retryAfter time.Duration) time.Duration {
	return max(b.Fail(), min(retryAfter, b.cfg.Cap))
}

// Ceiling is the longest wait the current failure count draws from.
func (b *Backoff) Ceiling() time.Duration {
	if b.failures <= 0 {
		return b.cfg.Base
	}
	c := b.cfg.Base << min(b.failures-1, 62)
	if c <= 0 || c > b.cfg.Cap || c>>min(b.failures-1, 62) != b.cfg.Base {
		return b.cfg.Cap
	}
	return c
}

// Cap is the longest wait.
func (b *Backoff) Cap() time.Duration { return b.cfg.Cap }

// Failures returns the failures counted since New or the last Reset.
func (b *Backoff) Failures() int { return b.failures }

// Reset forgets the failures: the next wait is drawn from Base again. See
// the package doc for when callers reset.
func (b *Backoff) Reset() { b.failures = 0 }

// Sleep waits d on the Backoff's clock. It returns ctx's error if ctx
// ends first, nil otherwise.
func (b *Backoff) Sleep(ctx context.Context, d time.Duration) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-b.cfg.After(d):
		return nil
	}
}
