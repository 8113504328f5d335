package enroll

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"sync"
	"time"

	"iotagent.dev/iotagent/agent/statedir"
	"iotagent.dev/iotagent/internal/atomicfile"
)

// Clock is the agent's idea of the current time on a device that may have
// booted at 1970 with no RTC. It never runs behind its floor: the latest of
// the build time, the last trusted time persisted in the state dir, the
// newest certificate notBefore seen and the station's authenticated Date
// header. Between lessons it advances with the monotonic clock, so a wall
// clock stuck at 1970 or jumping backwards does not stop it.
//
// Safe for concurrent use.
type Clock struct {
	now  func() time.Time     // the wall clock
	mono func() time.Duration // monotonic time since the clock was made

	mu      sync.Mutex
	floor   time.Time     // a wall time known to have passed
	at      time.Duration // mono() when floor was learned
	saved   time.Time     // floor last persisted
	path    string
	changed bool
}

// NewClock returns a clock reading now (time.Now when nil), never earlier
// than the latest of floors.
func NewClock(now func() time.Time, floors ...time.Time) *Clock {
	if now == nil {
		now = time.Now
	}
	// time.Since on a time.Now reading uses the monotonic clock, which
	// settimeofday and NTP steps do not move.
	t0 := time.Now()
	c := &Clock{now: now, mono: func() time.Duration { return time.Since(t0) }}
	c.at = c.mono()
	for _, f := range floors {
		if f.After(c.floor) {
			c.floor = f
		}
	}
	return c
}

// Now returns max(wall clock, floor advanced by the monotonic time since it
// was learned).
func (c *Clock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.nowLocked()
}

func (c *Clock) nowLocked() time.Time {
	n := c.now()
	if t := c.trustedLocked(); n.Before(t) {
		return t
	}
	return n
}

// trustedLocked is the floor advanced by monotonic time: what trusted
// sources vouch for, whatever the wall clock says.
func (c *Clock) trustedLocked() time.Time {
	return c.floor.Add(c.mono() - c.at).Round(0)
}

// Learn raises the floor to t, a time vouched for by a trusted source, if
// t is later than the trusted time. It reports whether the floor moved.
func (c *Clock) Learn(t time.Time) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	if t.IsZero() || !t.After(c.trustedLocked()) {
		return false
	}
	c.floor, c.at, c.changed = t.Round(0), c.mono(), true
	return true
}

// Trusted returns the latest trusted time advanced by the monotonic clock.
// Unlike Now it ignores the wall clock, which may be wrong in either
// direction.
func (c *Clock) Trusted() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.trustedLocked()
}

type clockJSON struct {
	TrustedTime time.Time `json:"trusted_time"`
}

// LoadClockFloor reads the persisted trusted time from the state dir; zero
// when there is none.
func LoadClockFloor(dir string) (time.Time, error) {
	b, err := os.ReadFile(statedir.Dir(dir).Clock())
	if errors.Is(err, os.ErrNotExist) {
		return time.Time{}, nil
	}
	if err != nil {
		return time.Time{}, err
	}
	var cj clockJSON
	if err := json.Unmarshal(b, &cj); err != nil {
		// A damaged floor is not worth failing for: the other floors
		// remain, and the next save repairs it.
		return time.Time{}, nil
	}
	return cj.TrustedTime, nil
}

// PersistTo makes Save write to dir.
func (c *Clock) PersistTo(dir string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.path = statedir.Dir(dir).Clock()
}

// saveEvery limits floor writes: flash wears, and an hour of drift in the
// floor costs nothing.
const saveEvery = time.Hour

// Save persists the trusted time (never the raw wall clock: a wrong RTC
// must not poison the floor) if it moved by a lesson or by saveEvery since
// the last save (force: always).
func (c *Clock) Save(force bool) error {
	c.mu.Lock()
	now := c.trustedLocked()
	if c.path == "" || (!force && !c.changed && now.Sub(c.saved) < saveEvery) {
		c.mu.Unlock()
		return nil
	}
	path := c.path
	c.saved, c.changed = now, false
	c.mu.Unlock()
	b, err := json.Marshal(clockJSON{TrustedTime: now.UTC()})
	if err != nil {
		return err
	}
	if err := atomicfile.Write(path, b, 0o600); err != nil {
		return fmt.Errorf("saving trusted time: %w", err)
	}
	return nil
}
