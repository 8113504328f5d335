package enroll

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"math/big"
	mrand "math/rand/v2"
	"sync"
	"testing"
	"testing/synctest"
	"time"
)

// testLeaf makes a certificate valid from nb for lifetime.
func testLeaf(t *testing.T, nb time.Time, lifetime time.Duration) *x509.Certificate {
	t.Helper()
	k, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(nb.UnixNano()), Subject: pkix.Name{CommonName: "gw-1"}, NotBefore: nb, NotAfter: nb.Add(lifetime)}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &k.PublicKey, k)
	if err != nil {
		t.Fatal(err)
	}
	c, _ := x509.ParseCertificate(der)
	return c
}

// scheduleRenewer builds a Renewer around a certificate with a scripted
// attempt function, no TPM and no network: the schedule alone.
func scheduleRenewer(t *testing.T, clock *Clock, leaf *x509.Certificate, cfg RenewerConfig) *Renewer {
	t.Helper()
	cfg.Dir, cfg.Clock = t.TempDir(), clock
	if cfg.Rand == nil {
		cfg.Rand = mrand.New(mrand.NewPCG(1, 2))
	}
	return newRenewer(cfg, &State{Chain: []*x509.Certificate{leaf}}, &Identity{cert: tlsCert([]*x509.Certificate{leaf}, nil), changed: make(chan struct{})})
}

// A gateway whose wall clock reads 1970 schedules its renewal from the
// trusted time, backs off with jitter on failures, renews, reschedules
// from the new certificate, and notices a wall-clock jump.
func TestScheduleWithClockAt1970(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		start := time.Now()
		var jump time.Duration
		var mu sync.Mutex
		wall := func() time.Time {
			mu.Lock()
			defer mu.Unlock()
			return time.Unix(0, 0).Add(time.Since(start) + jump)
		}
		trusted := time.Date(2026, 11, 1, 0, 0, 0, 0, time.UTC)
		clock := NewClock(wall, trusted)
		if got := clock.Now(); !got.Equal(trusted) {
			t.Fatalf("Clock.Now with wall clock at 1970 = %v, want the floor %v", got, trusted)
		}
		const lifetime = 30 * 24 * time.Hour
		leaf := testLeaf(t, trusted.Add(-time.Hour), lifetime)
		r := scheduleRenewer(t, clock, leaf, RenewerConfig{})
		due := RenewalTime(leaf.NotBefore, leaf.NotAfter, r.jitter)
		if r.jitter < 0 || r.jitter >= lifetime/20 {
			t.Fatalf("jitter = %v, want in [0, %v)", r.jitter, lifetime/20)
		}

		// attemptFn runs with r.mu held; the test reads under it too.
		var attempts []time.Time
		fail := 2
		r.attemptFn = func(context.Context) error {
			now := clock.Now()
			attempts = append(attempts, now)
			if fail > 0 {
				fail--
				return errors.New("station unreachable")
			}
			r.st = &State{Chain: []*x509.Certificate{testLeaf(t, now, lifetime)}}
			r.pickJitter()
			return nil
		}
		locked := func(f func()) { r.mu.Lock(); defer r.mu.Unlock(); f() }
		ctx, cancel := context.WithCancel(context.Background())
		done := make(chan error)
		go func() { done <- r.Run(ctx) }()

		time.Sleep(25 * 24 * time.Hour)
		r.mu.Lock()
		if len(attempts) != 3 {
			t.Fatalf("%d attempts in 25 days, want 3 (two failures, one success)", len(attempts))
		}
		if a := attempts[0]; a.Before(due) || a.After(due.Add(time.Minute)) {
			t.Errorf("first attempt at %v, want within a minute after %v", a, due)
		}
		if gap := attempts[1].Sub(attempts[0]); gap <= 0 || gap > 10*time.Second {
			t.Errorf("first retry after %v, want within the 10 s backoff ceiling", gap)
		}
		if gap := attempts[2].Sub(attempts[1]); gap <= 0 || gap > 20*time.Second {
			t.Errorf("second retry after %v, want within the 20 s backoff ceiling", gap)
		}
		if st := r.status; st.Renewals != 1 || st.LastError != "" || st.Failures != 0 {
			t.Errorf("status after success = %+v", st)
		}
		newLeaf := r.st.Leaf()
		nextDue := RenewalTime(newLeaf.NotBefore, newLeaf.NotAfter, r.jitter)
		if got := r.status.NextRenewal; !got.Equal(nextDue.UTC()) {
			t.Errorf("next renewal = %v, want %v", got, nextDue)
		}
		r.mu.Unlock()

		// The wall clock is set (NTP) well past the renewal time: the
		// renewer notices within its recheck interval instead of sleeping
		// on a timer computed from the old time.
		var before int
		locked(func() { fail, before = 0, len(attempts) })
		target := clock.Now().Sub(time.Unix(0, 0)) + 21*24*time.Hour
		mu.Lock()
		jump = target - time.Since(start)
		mu.Unlock()
		time.Sleep(2 * time.Minute)
		locked(func() {
			if len(attempts) != before+1 {
				t.Errorf("after a wall-clock jump past the renewal time: %d attempts in 2 minutes, want 1", len(attempts)-before)
			}
		})
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Run = %v, want nil on cancellation", err)
		}
	})
}

// Failures back off exponentially with full jitter up to the cap, and
// attempts go on past expiry.
func TestBackoffNeverGivesUp(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		trusted := time.Now()
		clock := NewClock(nil)
		leaf := testLeaf(t, trusted, 3*time.Hour)
		r := scheduleRenewer(t, clock, leaf, RenewerConfig{BackoffBase: time.Second, BackoffCap: 10 * time.Minute})
		var attempts []time.Time
		r.attemptFn = func(context.Context) error {
			attempts = append(attempts, clock.Now())
			return &StatusError{Op: "tpmenroll", Code: 503}
		}
		ctx, cancel := context.WithCancel(context.Background())
		done := make(chan error)
		go func() { done <- r.Run(ctx) }()
		time.Sleep(10 * time.Hour)
		cancel()
		<-done

		if len(attempts) < 20 {
			t.Fatalf("%d attempts in 10 hours, want many", len(attempts))
		}
		var afterExpiry int
		for i := 1; i < len(attempts); i++ {
			gap := attempts[i].Sub(attempts[i-1])
			ceiling := min(time.Second<<min(i-1, 20), 10*time.Minute)
			if gap > ceiling+time.Second || gap <= 0 {
				t.Errorf("gap before attempt %d = %v, want in (0, %v]", i+1, gap, ceiling)
			}
			if attempts[i].After(leaf.NotAfter) {
				afterExpiry++
			}
		}
		if afterExpiry < 10 {
			t.Errorf("%d attempts after expiry, want the renewer to keep trying", afterExpiry)
		}
		if st := r.Status(); st.Failures != len(attempts) || st.LastError == "" {
			t.Errorf("status = %+v, want %d consecutive failures", st, len(attempts))
		}
	})
}

func TestRenewalTime(t *testing.T) {
	nb := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	for _, tc := range []struct {
		lifetime, jitter time.Duration
		want             time.Time
	}{
		{30 * time.Hour, 0, nb.Add(20 * time.Hour)},
		{30 * time.Hour, time.Hour, nb.Add(19 * time.Hour)},
		{90 * 24 * time.Hour, 0, nb.Add(60 * 24 * time.Hour)},
	} {
		if got := RenewalTime(nb, nb.Add(tc.lifetime), tc.jitter); !got.Equal(tc.want) {
			t.Errorf("RenewalTime(%v, jitter %v) = %v, want %v", tc.lifetime, tc.jitter, got, tc.want)
		}
	}
}

func TestClockFloorAndPersistence(t *testing.T) {
	dir := t.TempDir()
	base := time.Now()
	wallOffset := -50 * 365 * 24 * time.Hour // 1970-ish
	var mu sync.Mutex
	wall := func() time.Time {
		mu.Lock()
		defer mu.Unlock()
		return time.Now().Add(wallOffset)
	}
	build := base.Add(-30 * 24 * time.Hour)
	c := NewClock(wall, build)
	if got := c.Now(); got.Before(build) || got.After(build.Add(time.Minute)) {
		t.Fatalf("Now = %v, want about the build time %v", got, build)
	}
	if !c.Learn(base) || c.Learn(base.Add(-time.Hour)) {
		t.Error("Learn should move forward only")
	}
	c.PersistTo(dir)
	if err := c.Save(false); err != nil {
		t.Fatal(err)
	}
	floor, err := LoadClockFloor(dir)
	if err != nil || floor.Before(base) || floor.After(base.Add(time.Minute)) {
		t.Fatalf("persisted floor = %v, %v; want about %v", floor, err, base)
	}
	// A wall clock far in the future is used but never persisted as the
	// floor: a wrong RTC must not poison later boots.
	mu.Lock()
	wallOffset = 100 * 365 * 24 * time.Hour
	mu.Unlock()
	if c.Now().Year() < 2100 {
		t.Errorf("Now with the wall clock ahead = %v, want the wall clock", c.Now())
	}
	c.Save(true)
	floor, _ = LoadClockFloor(dir)
	if floor.Year() > base.Year()+1 {
		t.Errorf("persisted floor = %v: the future wall clock leaked into it", floor)
	}
}
