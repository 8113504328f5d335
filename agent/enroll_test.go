package agent

import (
	"context"
	"math/rand/v2"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"

	"iotagent.dev/iotagent/internal/testsync"
	"iotagent.dev/iotagent/station/stationtest"
	"iotagent.dev/iotagent/tpm/tpmtest"
)

// enrollRetries runs first enrollment against st for a device its
// manifest does not know (each attempt refused, then rate limited) with
// the retry schedule base..cap and seed, the waits recorded instead of
// slept, and returns the first n waits with the error that preceded each.
func enrollRetries(t *testing.T, st *stationtest.Station, base, cap time.Duration, seed uint64, n int) (waits []time.Duration, errs []string) {
	t.Helper()
	sim := tpmtest.New(t)
	var log testsync.Buffer
	a, err := New(Config{TPM: sim.Spec, StateDir: filepath.Join(t.TempDir(), "state"),
		Station: StationConfig{URL: st.URL, Fingerprint: st.Fingerprint}, LogOutput: &log,
		Rand: rand.New(rand.NewPCG(seed, seed))})
	if err != nil {
		t.Fatal(err)
	}
	if err := a.s.dir.Create(); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var mu sync.Mutex
	fired := make(chan time.Time)
	close(fired)
	a.enrollRetry.Base, a.enrollRetry.Cap = base, cap
	a.enrollRetry.After = func(d time.Duration) <-chan time.Time {
		mu.Lock()
		defer mu.Unlock()
		if waits = append(waits, d); len(waits) >= n {
			cancel()
		}
		return fired
	}
	d := &daemon{a: a, t: sim.Open(t), clock: a.clock()}
	cfg, err := a.enrollConfig(d.t, d.clock)
	if err != nil {
		t.Fatal(err)
	}
	if err := d.enrollFirst(ctx, cfg); err != nil {
		t.Fatalf("enrollFirst: %v", err)
	}
	// The log pairs each wait with the error before it.
	line := regexp.MustCompile(`msg="enrollment failed; retrying" err="((?:[^"\\]|\\.)*)" retry_in=(\S+)`)
	for _, m := range line.FindAllStringSubmatch(log.String(), -1) {
		errs = append(errs, m[1])
	}
	mu.Lock()
	defer mu.Unlock()
	if len(waits) < n || len(errs) < n {
		t.Fatalf("%d waits, %d logged failures; want %d\n%s", len(waits), len(errs), n, log.String())
	}
	return waits[:n], errs[:n]
}

// First enrollment retries with full jitter: each wait is drawn below a
// ceiling that doubles, so a fleet powered up together spreads out (it
// retried at exactly 5 s, 10 s, 20 s…); and a station that says when to
// come back (429 with Retry-After from its failure limiter) is obeyed.
func TestFirstEnrollmentRetriesWithJitterAndRetryAfter(t *testing.T) {
	st := stationtest.Start(t, stationtest.Options{}) // the device is not in the manifest
	const n = 8
	waits, errs := enrollRetries(t, st, enrollRetryBase, enrollRetryCap, 1, n)
	other, _ := enrollRetries(t, st, enrollRetryBase, enrollRetryCap, 2, 3)
	var exact int
	for i, w := range waits[:3] {
		ceiling := enrollRetryBase << i
		if w <= 0 || w > ceiling {
			t.Errorf("wait %d = %v, want in (0, %v]", i+1, w, ceiling)
		}
		if w == ceiling {
			exact++
		}
		if other[i] == w {
			t.Errorf("two devices drew the same wait %v: no jitter", w)
		}
	}
	if exact == 3 {
		t.Error("the waits are the ceilings themselves: no jitter")
	}
	if !strings.Contains(errs[0], "not in the manifest") {
		t.Errorf("first failure = %q, want the station's refusal", errs[0])
	}

	// Retry-After against a schedule whose own waits are far shorter.
	waits, errs = enrollRetries(t, st, time.Millisecond, enrollRetryCap, 3, n)
	limited := 0
	retryAfter := regexp.MustCompile(`\(retry after ([0-9hms.]+)\)`)
	for i, e := range errs {
		m := retryAfter.FindStringSubmatch(e)
		if m == nil {
			continue
		}
		limited++
		want, err := time.ParseDuration(m[1])
		if err != nil {
			t.Fatal(err)
		}
		if waits[i] < min(want, enrollRetryCap) {
			t.Errorf("after %q the agent waited %v, want at least the %v the station asked for", e, waits[i], want)
		}
	}
	if limited == 0 {
		t.Fatalf("the station never rate-limited the device: the test proves nothing\n%q", errs)
	}
}
