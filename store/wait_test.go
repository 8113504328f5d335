package store

import (
	"context"
	"errors"
	"sync"
	"testing"
	"testing/synctest"
	"time"
)

// TestWait runs on a fake clock: a Wait that returns at the wrong time shows
// as a wrong duration, not as a flaky sleep.
func TestWait(t *testing.T) {
	leakCheck(t)
	for _, tc := range []struct {
		name    string
		prepare func(t *testing.T, s *Store) (after uint64)
		wake    func(t *testing.T, s *Store) // nil: only the ctx deadline ends the Wait
		want    error
	}{
		{
			name: "record already there",
			prepare: func(t *testing.T, s *Store) uint64 {
				mustAppend(t, s, 3)
				return 2
			},
			want: nil,
		},
		{
			name:    "wakes on append",
			prepare: func(t *testing.T, s *Store) uint64 { mustAppend(t, s, 2); return 2 },
			wake:    func(t *testing.T, s *Store) { mustAppend(t, s, 1) },
			want:    nil,
		},
		{
			name: "acked records do not count",
			prepare: func(t *testing.T, s *Store) uint64 {
				mustAppend(t, s, 3)
				if err := s.Ack(3); err != nil {
					t.Fatal(err)
				}
				return 2
			},
			want: context.DeadlineExceeded,
		},
		{
			name: "acked records do not count, then an append",
			prepare: func(t *testing.T, s *Store) uint64 {
				mustAppend(t, s, 3)
				if err := s.Ack(3); err != nil {
					t.Fatal(err)
				}
				return 2
			},
			wake: func(t *testing.T, s *Store) { mustAppend(t, s, 1) },
			want: nil,
		},
		{
			name:    "Ack and Put do not wake",
			prepare: func(t *testing.T, s *Store) uint64 { mustAppend(t, s, 2); return 2 },
			wake: func(t *testing.T, s *Store) {
				if err := s.Ack(1); err != nil {
					t.Error(err)
				}
				if err := s.Put("k", nil); err != nil {
					t.Error(err)
				}
			},
			want: context.DeadlineExceeded,
		},
		{
			name:    "empty store, deadline",
			prepare: func(t *testing.T, s *Store) uint64 { return 0 },
			want:    context.DeadlineExceeded,
		},
		{
			name:    "Close",
			prepare: func(t *testing.T, s *Store) uint64 { return 0 },
			wake:    func(t *testing.T, s *Store) { s.Close() },
			want:    ErrClosed,
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				const deadline, wakeAt = time.Hour, time.Minute
				s := openT(t, Options{})
				after := tc.prepare(t, s)
				ctx, cancel := context.WithTimeout(t.Context(), deadline)
				defer cancel()
				var wg sync.WaitGroup
				if tc.wake != nil {
					wg.Go(func() {
						time.Sleep(wakeAt)
						tc.wake(t, s)
					})
				}
				start := time.Now()
				err := s.Wait(ctx, after)
				took := time.Since(start)
				wg.Wait()
				if !errors.Is(err, tc.want) || (err == nil) != (tc.want == nil) {
					t.Errorf("Wait(ctx, %d) = %v, want %v", after, err, tc.want)
				}
				want := time.Duration(0)
				switch {
				case tc.want == context.DeadlineExceeded:
					want = deadline
				case tc.wake != nil:
					want = wakeAt
				}
				if took != want {
					t.Errorf("Wait(ctx, %d) returned after %v, want %v", after, took, want)
				}
				s.Close()
			})
		})
	}
}

// mustAppend appends n records. It reports failure with Errorf, so that a
// goroutine other than the test's may call it.
func mustAppend(t *testing.T, s *Store, n int) {
	t.Helper()
	if _, _, err := s.Append(t.Context(), payloads("w", n)...); err != nil {
		t.Errorf("Append(%d records) = %v", n, err)
	}
}
