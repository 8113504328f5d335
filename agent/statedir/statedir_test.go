package statedir

import (
	"errors"
	"path/filepath"
	"testing"
	"time"
)

// A lock held for a moment (a command's) is waited for; one held longer
// than the wait is a *LockedError naming this process.
func TestLockWait(t *testing.T) {
	d := Dir(filepath.Join(t.TempDir(), "state"))
	if err := d.Create(); err != nil {
		t.Fatal(err)
	}
	held, err := d.Lock()
	if err != nil {
		t.Fatal(err)
	}
	if _, err := d.Lock(); !errors.As(err, new(*LockedError)) {
		t.Fatalf("Lock while held = %v, want a *LockedError", err)
	}
	var le *LockedError
	if _, err := d.LockWait(200 * time.Millisecond); !errors.As(err, &le) {
		t.Fatalf("LockWait past the wait = %v, want a *LockedError", err)
	}
	go func() { time.Sleep(300 * time.Millisecond); held.Close() }()
	l, err := d.LockWait(5 * time.Second)
	if err != nil {
		t.Fatalf("LockWait for a lock released in 300ms = %v", err)
	}
	l.Close()
}
