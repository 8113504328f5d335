package backoff

import (
	"context"
	"errors"
	"math/rand/v2"
	"testing"
	"time"
)

func seeded() *rand.Rand { return rand.New(rand.NewPCG(1, 2)) }

// Each wait lies in (0, ceiling], the ceiling doubles per failure up to
// Cap, and Reset starts over from Base.
func TestScheduleBoundsAndReset(t *testing.T) {
	b := New(Config{Base: 100 * time.Millisecond, Cap: time.Second, Rand: seeded()})
	want := []time.Duration{100, 200, 400, 800, 1000, 1000, 1000}
	for i, w := range want {
		w *= time.Millisecond
		d := b.Fail()
		if d <= 0 || d > w {
			t.Errorf("failure %d: wait %v, want in (0, %v]", i+1, d, w)
		}
		if got := b.Ceiling(); got != w {
			t.Errorf("failure %d: ceiling %v, want %v", i+1, got, w)
		}
	}
	if b.Failures() != len(want) {
		t.Errorf("Failures() = %d, want %d", b.Failures(), len(want))
	}
	b.Reset()
	if b.Failures() != 0 || b.Ceiling() != 100*time.Millisecond {
		t.Errorf("after Reset: %d failures, ceiling %v; want 0 and 100ms", b.Failures(), b.Ceiling())
	}
	if d := b.Fail(); d > 100*time.Millisecond {
		t.Errorf("first wait after Reset = %v, want at most Base", d)
	}
}

// Full jitter: the draws cover the whole interval, not its upper half
// ("equal jitter") nor a fixed point (no jitter), so a fleet that failed
// together spreads out.
func TestFullJitter(t *testing.T) {
	b := New(Config{Base: time.Second, Cap: time.Second, Rand: seeded()})
	var low, high int
	seen := map[time.Duration]bool{}
	for range 1000 {
		d := b.Fail()
		seen[d] = true
		switch {
		case d < 250*time.Millisecond:
			low++
		case d > 750*time.Millisecond:
			high++
		}
	}
	if low < 150 || high < 150 || len(seen) < 990 {
		t.Errorf("1000 draws: %d below 250ms, %d above 750ms, %d distinct; want ~250, ~250, ~1000", low, high, len(seen))
	}
}

// The ceiling never overflows into a negative or tiny wait, however many
// failures.
func TestNoOverflow(t *testing.T) {
	b := New(Config{Base: time.Second, Cap: time.Hour, Rand: seeded()})
	for i := range 200 {
		if d := b.Fail(); d <= 0 || d > time.Hour {
			t.Fatalf("failure %d: wait %v", i+1, d)
		}
	}
	if b.Ceiling() != time.Hour {
		t.Errorf("ceiling after 200 failures = %v, want the cap", b.Ceiling())
	}
}

func TestRetryAfter(t *testing.T) {
	b := New(Config{Base: 100 * time.Millisecond, Cap: time.Minute, Rand: seeded()})
	if d := b.FailAfter(7 * time.Second); d < 7*time.Second {
		t.Errorf("FailAfter(7s) = %v, want at least 7s", d)
	}
	if d := b.FailAfter(time.Hour); d != time.Minute {
		t.Errorf("FailAfter(1h) with a 1 min cap = %v, want 1m", d)
	}
	if d := b.FailAfter(0); d <= 0 || d > 400*time.Millisecond {
		t.Errorf("FailAfter(0) = %v, want a plain jittered wait", d)
	}
	if b.Failures() != 3 {
		t.Errorf("Failures() = %d, want 3: FailAfter counts a failure", b.Failures())
	}
}

func TestDefaults(t *testing.T) {
	b := New(Config{})
	if b.Ceiling() != DefaultBase {
		t.Errorf("default base = %v", b.Ceiling())
	}
	for range 40 {
		b.Fail()
	}
	if b.Ceiling() != DefaultCap {
		t.Errorf("default cap = %v", b.Ceiling())
	}
	if c := New(Config{Base: time.Minute, Cap: time.Second}); c.Ceiling() != time.Second {
		t.Errorf("a base above the cap = ceiling %v, want the cap", c.Ceiling())
	}
}

func TestSleep(t *testing.T) {
	var asked []time.Duration
	fire := make(chan time.Time, 1)
	b := New(Config{After: func(d time.Duration) <-chan time.Time {
		asked = append(asked, d)
		return fire
	}})
	fire <- time.Time{}
	if err := b.Sleep(context.Background(), 3*time.Second); err != nil || len(asked) != 1 || asked[0] != 3*time.Second {
		t.Errorf("Sleep = %v, clock asked for %v; want nil, [3s]", err, asked)
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if err := b.Sleep(ctx, time.Hour); !errors.Is(err, context.Canceled) {
		t.Errorf("Sleep with an ended context = %v, want context.Canceled", err)
	}
}
