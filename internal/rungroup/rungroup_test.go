package rungroup

import (
	"context"
	"errors"
	"testing"
	"time"
)

func waitForCancel(ctx context.Context) error { <-ctx.Done(); return ctx.Err() }

func TestFirstErrorCancelsTheRest(t *testing.T) {
	boom := errors.New("boom")
	stopped := make(chan struct{})
	err := Run(context.Background(),
		Part{"waits", func(ctx context.Context) error { defer close(stopped); return waitForCancel(ctx) }},
		Part{"fails", func(context.Context) error { return boom }},
	)
	if !errors.Is(err, boom) || err.Error() != "fails: boom" {
		t.Errorf("Run = %v, want fails: boom", err)
	}
	select {
	case <-stopped:
	default:
		t.Error("Run returned before the other part stopped")
	}
}

func TestCleanStop(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Millisecond)
	defer cancel()
	err := Run(ctx, Part{"a", waitForCancel}, Part{Run: func(ctx context.Context) error { <-ctx.Done(); return nil }})
	if err != nil {
		t.Errorf("Run = %v, want nil after the context ended", err)
	}
}

// A part that returns nil early still stops the group: a daemon whose
// part quit is not healthy.
func TestEarlyReturnStopsTheGroup(t *testing.T) {
	done := make(chan error, 1)
	go func() {
		done <- Run(context.Background(), Part{"a", waitForCancel}, Part{"quits", func(context.Context) error { return nil }})
	}()
	select {
	case err := <-done:
		if err != nil {
			t.Errorf("Run = %v, want nil", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("the group kept running after a part returned")
	}
}
