package store

import (
	"bytes"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
)

// smallDisk returns a directory on a fresh tmpfs of size bytes, unmounted
// when t ends.
func smallDisk(t *testing.T, size string) string {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Fatalf("this test needs root to mount a %s tmpfs that fills up (mount -t tmpfs -o size=%s); run the store tests as root, as CI and scripts/test.sh do", size, size)
	}
	dir := t.TempDir()
	if out, err := exec.Command("mount", "-t", "tmpfs", "-o", "size="+size+",mode=0700", "tmpfs", dir).CombinedOutput(); err != nil {
		t.Fatalf("mounting a %s tmpfs on %s: %v\n%s", size, dir, err, out)
	}
	t.Cleanup(func() {
		if out, err := exec.Command("umount", dir).CombinedOutput(); err != nil {
			t.Errorf("umount %s: %v\n%s", dir, err, out)
		}
	})
	return dir
}

// TestDiskFull fills a 1 MiB file system: Append must fail with an error
// that matches syscall.ENOSPC and says so, change nothing, and leave a store
// that still acks, appends after making room, and reopens clean.
func TestDiskFull(t *testing.T) {
	leakCheck(t)
	ctx := testCtx(t)
	path := filepath.Join(smallDisk(t, "1m"), "queue.db")
	opts := Options{Path: path} // 64 MiB bound: the disk fills first
	s := openT(t, opts)

	batch := slices.Repeat([][]byte{bytes.Repeat([]byte{'p'}, 200)}, 50)
	var full error
	var before Stats
	for range 1000 { // 10 MB: the disk is full long before
		before = s.Stats()
		if _, _, full = s.Append(ctx, batch...); full != nil {
			break
		}
	}
	if !errors.Is(full, syscall.ENOSPC) || !strings.Contains(full.Error(), "disk full") {
		t.Fatalf("Append on a full disk = %v, want an error matching syscall.ENOSPC that says the disk is full", full)
	}
	t.Logf("disk full after %d records: %v", before.Depth, full)
	after := s.Stats()
	after.Commits, after.FileSize = before.Commits, before.FileSize
	if after != before {
		t.Errorf("Stats() after the failed Append = %+v, want %+v", after, before)
	}
	checkFile(t, s)

	// Acks reuse pages the file already has: they must work on a full disk,
	// and then appends fit in what they freed.
	recs := all(t, s)
	if err := s.Ack(seqsOf(recs[:len(recs)/2])...); err != nil {
		t.Fatalf("Ack on a full disk = %v", err)
	}
	first, _, err := s.Append(ctx, batch...)
	if err != nil {
		t.Fatalf("Append after acking half = %v", err)
	}
	if first != before.NextSeq {
		t.Errorf("Append after acking half: first = %d, want %d (the failed Append used no seq)", first, before.NextSeq)
	}
	want := s.Stats()
	if err := s.Close(); err != nil {
		t.Fatalf("Close() = %v", err)
	}

	s = openT(t, opts)
	checkFile(t, s)
	if got := s.Stats(); got.Depth != want.Depth || got.Bytes != want.Bytes || got.NextSeq != want.NextSeq {
		t.Errorf("after reopen: Stats() = %+v, want %+v", got, want)
	}
}
