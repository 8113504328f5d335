package store

import (
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"slices"
	"sync"
	"testing"
	"testing/synctest"
	"time"
)

func TestGroupCommitConcurrent(t *testing.T) {
	leakCheck(t)
	ctx := testCtx(t)
	const writers, calls = 16, 50
	path := filepath.Join(t.TempDir(), "queue.db")
	s := openT(t, Options{Path: path})

	var mu sync.Mutex
	want := map[uint64]string{} // seq → payload
	errs := make(chan error, writers)
	var wg sync.WaitGroup
	for w := range writers {
		wg.Go(func() {
			for i := range calls {
				p := fmt.Sprintf("w%d-i%d", w, i)
				first, last, err := s.Append(ctx, []byte(p))
				if err != nil || first != last {
					errs <- fmt.Errorf("Append(%s) = %d, %d, %v; want one seq", p, first, last, err)
					return
				}
				mu.Lock()
				if prev, dup := want[first]; dup {
					errs <- fmt.Errorf("seq %d given to both %s and %s", first, prev, p)
				}
				want[first] = p
				mu.Unlock()
			}
		})
	}
	waitGroup(t, &wg)
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	st := s.Stats()
	if st.Commits >= writers*calls {
		t.Errorf("Stats().Commits = %d for %d concurrent Appends, want fewer (group commit)", st.Commits, writers*calls)
	}
	t.Logf("%d Appends from %d writers in %d commits", writers*calls, writers, st.Commits)

	// Durable: what a reopened file holds is exactly what Append confirmed.
	s.Close()
	s = openT(t, Options{Path: path})
	recs := all(t, s)
	if len(recs) != writers*calls {
		t.Fatalf("after reopen: %d records, want %d", len(recs), writers*calls)
	}
	for _, r := range recs {
		if want[r.Seq] != string(r.Data) {
			t.Errorf("record %d = %q, want %q", r.Seq, r.Data, want[r.Seq])
		}
	}
	checkFile(t, s)
}

func TestGroupMaxRecords(t *testing.T) {
	leakCheck(t)
	ctx := testCtx(t)
	const max, writers, calls, big = 10, 8, 30, 25
	var mu sync.Mutex
	var groups [][2]int // records, ops
	s := openHooked(t, Options{GroupMaxRecords: max}, hooks{afterCommit: func(records, ops int) {
		mu.Lock()
		groups = append(groups, [2]int{records, ops})
		mu.Unlock()
	}})

	var wg sync.WaitGroup
	errs := make(chan error, writers+1)
	for range writers {
		wg.Go(func() {
			for range calls {
				if _, _, err := s.Append(ctx, []byte("x")); err != nil {
					errs <- err
					return
				}
			}
		})
	}
	wg.Go(func() {
		first, last, err := s.Append(ctx, payloads("big", big)...)
		if err != nil || last-first+1 != big {
			errs <- fmt.Errorf("Append(%d records) = %d, %d, %v", big, first, last, err)
		}
	})
	waitGroup(t, &wg)
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	mu.Lock()
	defer mu.Unlock()
	total := 0
	for _, g := range groups {
		total += g[0]
		if g[0] > max && g != [2]int{big, 1} {
			t.Errorf("a group of %d records in %d calls, want at most %d records or the %d-record call alone", g[0], g[1], max, big)
		}
	}
	if want := writers*calls + big; total != want {
		t.Errorf("groups hold %d records, want %d", total, want)
	}

	t.Run("one call of 1000 is one transaction", func(t *testing.T) {
		s := openT(t, Options{})
		if _, _, err := s.Append(ctx, payloads("p", 1000)...); err != nil {
			t.Fatal(err)
		}
		if st := s.Stats(); st.Commits != 1 || st.Depth != 1000 {
			t.Errorf("Stats() = %+v, want 1 commit, 1000 records", st)
		}
	})
}

// TestGroupLinger checks, on a fake clock, when the committer waits for
// more writers: never for a lone writer, for at most GroupMaxDelay after a
// group of several, and that a ctx ending meanwhile withdraws the append.
func TestGroupLinger(t *testing.T) {
	leakCheck(t)
	synctest.Test(t, func(t *testing.T) {
		const delay = time.Hour
		ctx := t.Context()
		var gate committerGate
		s := openHooked(t, Options{GroupMaxDelay: delay}, gate.hooks())
		timed := func(name string, want time.Duration, data string) {
			t.Helper()
			start := time.Now()
			if _, _, err := s.Append(ctx, []byte(data)); err != nil {
				t.Fatalf("%s: Append = %v", name, err)
			}
			if got := time.Since(start); got != want {
				t.Errorf("%s: Append took %v, want %v", name, got, want)
			}
		}
		for i := range 20 {
			timed(fmt.Sprintf("lone writer, call %d", i), 0, "lone")
		}

		// lineUp holds the committer after a commit while four writers
		// line up, so that the next group has four appenders.
		lineUp := func() {
			t.Helper()
			release := gate.holdNext()
			var wg sync.WaitGroup
			wg.Go(func() { s.Append(ctx, []byte("first")) })
			synctest.Wait()
			for range 4 {
				wg.Go(func() { s.Append(ctx, []byte("together")) })
			}
			synctest.Wait()
			release()
			wg.Wait()
			groups := gate.Groups()
			if got := groups[len(groups)-1]; got != 4 {
				t.Fatalf("last groups = %v, want 4 writers together", groups)
			}
		}

		lineUp()
		cctx, cancel := context.WithCancel(ctx)
		before := s.Stats()
		var wg sync.WaitGroup
		wg.Go(func() {
			time.Sleep(time.Minute)
			cancel()
		})
		if _, _, err := s.Append(cctx, []byte("withdrawn")); !errors.Is(err, context.Canceled) {
			t.Errorf("Append cancelled while the committer lingers = %v, want context.Canceled", err)
		}
		wg.Wait()
		time.Sleep(delay) // the committer's delay ends with nothing left to commit
		if after := s.Stats(); after != before {
			t.Errorf("Stats() after a withdrawn Append = %+v, want %+v", after, before)
		}

		lineUp()
		timed("alone after a group of 4", delay, "after")
		timed("alone after a group of 1", 0, "lone")

		if recs := all(t, s); slices.ContainsFunc(recs, func(r Record) bool { return string(r.Data) == "withdrawn" }) {
			t.Errorf("the withdrawn record was stored")
		}
		s.Close()
	})
}
