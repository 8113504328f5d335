package station

import (
	"fmt"
	"net/http"
	"testing"
	"time"
)

// Finding 6 of issue 10: the failure limiter keyed on the single
// address (an IPv6 /64 gives endless sources) and, past 10 000 sources,
// scanned its whole table under one lock at every failure without
// bounding it.
func TestAttackLimiterSources(t *testing.T) {
	t.Run("IPv6 by /64", func(t *testing.T) {
		l := newFailureLimiter(time.Now)
		for i := range 5 {
			r := &http.Request{RemoteAddr: fmt.Sprintf("[2001:db8:1:2::%x]:443", i+1)}
			if wait := l.begin(sourceOf(r)); wait != 0 {
				t.Fatalf("attempt %d refused early", i)
			}
			l.end(sourceOf(r), outcomeFailed)
		}
		r := &http.Request{RemoteAddr: "[2001:db8:1:2:ffff::1]:443"}
		if wait := l.begin(sourceOf(r)); wait <= 0 {
			t.Errorf("a sixth address in the same /64 after 5 failures: begin = %v, want blocked", wait)
		}
		other := &http.Request{RemoteAddr: "[2001:db8:1:3::1]:443"}
		if wait := l.begin(sourceOf(other)); wait != 0 {
			t.Errorf("another /64: begin = %v, want allowed", wait)
		}
		if a, b := sourceOf(&http.Request{RemoteAddr: "[::ffff:192.0.2.7]:1"}), sourceOf(&http.Request{RemoteAddr: "192.0.2.7:2"}); a != b {
			t.Errorf("IPv4-mapped %q and IPv4 %q are different sources", a, b)
		}
	})
	t.Run("bounded table", func(t *testing.T) {
		l := newFailureLimiter(time.Now)
		for i := range maxSources + 5000 {
			src := fmt.Sprintf("198.%d.%d.%d", i>>16&0xff, i>>8&0xff, i&0xff)
			l.begin(src)
			l.end(src, outcomeFailed)
		}
		if n := l.sources.len(); n > maxSources {
			t.Errorf("%d sources kept, want at most %d", n, maxSources)
		}
	})
	t.Run("after a block", func(t *testing.T) {
		now := time.Now()
		l := newFailureLimiter(func() time.Time { return now })
		for range 5 {
			l.begin("192.0.2.9")
			l.end("192.0.2.9", outcomeFailed)
		}
		if wait := l.begin("192.0.2.9"); wait <= 0 {
			t.Fatalf("after 5 failures begin = %v, want blocked", wait)
		}
		now = now.Add(6 * time.Second) // the first cool-down is 5 s
		if wait := l.begin("192.0.2.9"); wait != 0 {
			t.Fatalf("after the cool-down begin = %v, want one attempt let through", wait)
		}
		if wait := l.begin("192.0.2.9"); wait != limitBusy {
			t.Errorf("a second attempt at once after the cool-down = %v, want busy", wait)
		}
		l.end("192.0.2.9", outcomeFailed)
		if wait := l.begin("192.0.2.9"); wait < 9*time.Second {
			t.Errorf("after a failure past the cool-down begin = %v, want blocked for twice as long", wait)
		}
	})
	t.Run("reservations", func(t *testing.T) {
		l := newFailureLimiter(time.Now)
		for i := range 5 {
			if wait := l.begin("192.0.2.1"); wait != 0 {
				t.Fatalf("reservation %d = %v, want granted", i, wait)
			}
		}
		if wait := l.begin("192.0.2.1"); wait != limitBusy {
			t.Errorf("sixth request in flight = %v, want busy", wait)
		}
		l.end("192.0.2.1", outcomeProven)
		if wait := l.begin("192.0.2.1"); wait != 0 {
			t.Errorf("after one settled = %v, want granted", wait)
		}
	})
}

// BenchmarkLimiterFailure measures one failure's cost with the table
// full (it was a scan of 50 000 entries: 8.5 ms).
func BenchmarkLimiterFailure(b *testing.B) {
	l := newFailureLimiter(time.Now)
	for i := range maxSources {
		l.fail(fmt.Sprintf("10.%d.%d.%d", i>>16&0xff, i>>8&0xff, i&0xff))
	}
	b.ResetTimer()
	for i := range b.N {
		src := fmt.Sprintf("11.%d.%d.%d", i>>16&0xff, i>>8&0xff, i&0xff)
		l.begin(src)
		l.end(src, outcomeFailed)
	}
}
