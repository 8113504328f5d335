package store

import (
	"bytes"
	"errors"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"iotagent.dev/iotagent/internal/testsync"
)

// syncBuffer is a log sink safe for the committer and the test at once.
type syncBuffer struct{ testsync.Buffer }

// await waits up to 10 s for msg in the log (the committer logs after it
// has answered its callers) and reports whether it came.
func (b *syncBuffer) await(msg string) bool {
	deadline := time.Now().Add(10 * time.Second)
	for !strings.Contains(b.String(), msg) {
		if time.Now().After(deadline) {
			return false
		}
		time.Sleep(10 * time.Millisecond)
	}
	return true
}

func (b *syncBuffer) logger() *slog.Logger {
	return slog.New(slog.NewTextHandler(b, &slog.HandlerOptions{Level: slog.LevelDebug}))
}

// fileContent is what a store holds, to compare before and after a
// compaction.
type fileContent struct {
	recs  []Record
	stats Stats // FileSize and Commits zeroed
	state string
}

func contentOf(t *testing.T, s *Store) fileContent {
	t.Helper()
	st := s.Stats()
	st.FileSize, st.Commits = 0, 0
	v, err := s.Get("clock.floor")
	if err != nil {
		t.Fatalf("Get(clock.floor) = %v", err)
	}
	return fileContent{recs: all(t, s), stats: st, state: string(v)}
}

func (c fileContent) equal(d fileContent) bool {
	return c.stats == d.stats && c.state == d.state &&
		slices.EqualFunc(c.recs, d.recs, func(a, b Record) bool { return a.Seq == b.Seq && bytes.Equal(a.Data, b.Data) })
}

// fillPast appends 6000 records of 1 KiB, past a MaxBytes of 5 MiB: the
// oldest are dropped.
func fillPast(t *testing.T, s *Store) {
	t.Helper()
	ctx := testCtx(t)
	for b := range 60 {
		batch := make([][]byte, 100)
		for i := range batch {
			batch[i] = bytes.Repeat([]byte{byte(b)}, 1024)
		}
		if _, _, err := s.Append(ctx, batch...); err != nil {
			t.Fatal(err)
		}
	}
}

// drainMost acknowledges every record but one in a hundred.
func drainMost(t *testing.T, s *Store) {
	t.Helper()
	var acks []uint64
	for _, r := range all(t, s) {
		if r.Seq%100 != 0 {
			acks = append(acks, r.Seq)
		}
	}
	if err := s.Ack(acks...); err != nil {
		t.Fatal(err)
	}
}

// mostlyFree writes at path a store file of about 6 MiB whose live data is
// about 1% of it, with drops and state, and returns what it holds.
func mostlyFree(t *testing.T, path string) fileContent {
	t.Helper()
	s := openT(t, Options{Path: path, MaxBytes: 5 << 20})
	fillPast(t, s)
	drainMost(t, s)
	if err := s.Put("clock.floor", []byte("2026-03-01T00:00:00Z")); err != nil {
		t.Fatal(err)
	}
	c := contentOf(t, s)
	if c.stats.Dropped == 0 || len(c.recs) < 40 {
		t.Fatalf("template: %+v, want drops and records left", c.stats)
	}
	if st := s.Stats(); st.FileSize <= compactMinSize {
		t.Fatalf("template: file of %d bytes, want more than %d", st.FileSize, compactMinSize)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	return c
}

func fileSize(t *testing.T, path string) int64 {
	t.Helper()
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	return fi.Size()
}

func checkNoTemp(t *testing.T, path string) {
	t.Helper()
	if _, err := os.Stat(compactPath(path)); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("Stat(%s) = %v, want the temporary file gone", compactPath(path), err)
	}
}

func TestCompactAtOpen(t *testing.T) {
	leakCheck(t)
	path := filepath.Join(t.TempDir(), "queue.db")
	want := mostlyFree(t, path)
	before := fileSize(t, path)

	var log syncBuffer
	s := openT(t, Options{Path: path, Logger: log.logger()})
	after := s.Stats().FileSize
	if after > before/4 {
		t.Errorf("file size after Open = %d, want under a quarter of %d", after, before)
	}
	t.Logf("compaction at Open: %d → %d bytes", before, after)
	if !strings.Contains(log.String(), "store compacted") {
		t.Errorf("log = %q, want a compaction notice", log.String())
	}
	if got := contentOf(t, s); !got.equal(want) {
		t.Errorf("after compaction: %+v (%d records), want %+v (%d records)", got.stats, len(got.recs), want.stats, len(want.recs))
	}
	checkNoTemp(t, path)
	checkFile(t, s)
	if first, _, err := s.Append(testCtx(t), []byte("after")); err != nil || first != want.stats.NextSeq {
		t.Errorf("Append after compaction = %d, %v; want seq %d", first, err, want.stats.NextSeq)
	}
	s.Close()

	var log2 syncBuffer
	openT(t, Options{Path: path, Logger: log2.logger()})
	if strings.Contains(log2.String(), "store compacted") {
		t.Errorf("second Open compacted again: %s", log2.String())
	}
}

func TestCompactNotWhenLive(t *testing.T) {
	leakCheck(t)
	ctx := testCtx(t)
	path := filepath.Join(t.TempDir(), "queue.db")
	s := openT(t, Options{Path: path})
	for range 50 {
		if _, _, err := s.Append(ctx, slices.Repeat([][]byte{make([]byte, 1024)}, 100)...); err != nil {
			t.Fatal(err)
		}
	}
	s.Close()
	before := fileSize(t, path)
	if before <= compactMinSize {
		t.Fatalf("file of %d bytes, want more than %d", before, compactMinSize)
	}
	var log syncBuffer
	s = openT(t, Options{Path: path, Logger: log.logger()})
	if after := s.Stats().FileSize; after != before || strings.Contains(log.String(), "compacted") {
		t.Errorf("Open of a file that is mostly live data: size %d → %d, log %q; want it left alone", before, after, log.String())
	}
}

// TestCompactCrash kills a process opening a mostly free file at each step
// of its compaction and checks that the next Open finds everything.
func TestCompactCrash(t *testing.T) {
	if os.Getenv(childModeEnv) == "compact" {
		crashWhileCompacting(os.Getenv(childPathEnv), os.Getenv(childRoundEnv))
		return
	}
	leakCheck(t)
	template := filepath.Join(t.TempDir(), "template.db")
	want := mostlyFree(t, template)
	raw, err := os.ReadFile(template)
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		step     string
		replaced bool // the compacted file has replaced the original
	}{
		{"created", false},
		{"copied", false},
		{"synced", false},
		{"renamed", true},
		{"dir-synced", true},
	} {
		t.Run(tc.step, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "queue.db")
			if err := os.WriteFile(path, raw, 0o600); err != nil {
				t.Fatal(err)
			}
			c := startChild(testCtx(t), t, "compact", path, childRoundEnv+"="+tc.step)
			for c.stdout.Scan() {
			}
			if err := c.cmd.Wait(); !killedBySIGKILL(err) {
				t.Fatalf("child ended with %v, want SIGKILL at %s; stderr:\n%s", err, tc.step, c.stderr)
			}
			if replaced := fileSize(t, path) < int64(len(raw)); replaced != tc.replaced {
				t.Errorf("after a kill at %s: file replaced = %v, want %v", tc.step, replaced, tc.replaced)
			}
			s := openT(t, Options{Path: path})
			if got := contentOf(t, s); !got.equal(want) {
				t.Errorf("after a kill at %s: %+v (%d records), want %+v (%d records)", tc.step, got.stats, len(got.recs), want.stats, len(want.recs))
			}
			checkNoTemp(t, path)
			checkFile(t, s)
		})
	}
}

// crashWhileCompacting is the child of TestCompactCrash.
func crashWhileCompacting(path, step string) {
	s, err := open(Options{Path: path}, hooks{compactStep: func(at string) error {
		if at == step {
			syscall.Kill(os.Getpid(), syscall.SIGKILL)
			select {}
		}
		return nil
	}})
	if err != nil {
		childFail("child: %v", err)
	}
	s.Close()
	childFail("child: compaction finished without reaching step %q", step)
}

func TestCompactFailure(t *testing.T) {
	leakCheck(t)
	template := filepath.Join(t.TempDir(), "template.db")
	want := mostlyFree(t, template)
	raw, err := os.ReadFile(template)
	if err != nil {
		t.Fatal(err)
	}
	errInjected := errors.New("injected failure")
	for _, tc := range []struct {
		step     string
		openFail bool // after the rename Open must fail rather than go on with the unlinked file
	}{
		{"created", false},
		{"copied", false},
		{"synced", false},
		{"renamed", true},
		{"dir-synced", true},
	} {
		t.Run(tc.step, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "queue.db")
			if err := os.WriteFile(path, raw, 0o600); err != nil {
				t.Fatal(err)
			}
			var log syncBuffer
			s, err := open(Options{Path: path, Logger: log.logger()}, hooks{compactStep: func(at string) error {
				if at == tc.step {
					return errInjected
				}
				return nil
			}})
			if tc.openFail {
				if !errors.Is(err, errInjected) {
					t.Fatalf("Open failing at %s = %v, want the injected error", tc.step, err)
				}
			} else {
				if err != nil {
					t.Fatalf("Open failing at %s = %v, want it to go on uncompacted", tc.step, err)
				}
				if got := s.Stats().FileSize; got != int64(len(raw)) || !strings.Contains(log.String(), "compaction failed") {
					t.Errorf("Open failing at %s: size %d, log %q; want the original %d bytes and a warning", tc.step, got, log.String(), len(raw))
				}
				s.Close()
			}
			checkNoTemp(t, path)
			s = openT(t, Options{Path: path})
			if got := contentOf(t, s); !got.equal(want) {
				t.Errorf("after a failure at %s: %+v (%d records), want %+v (%d records)", tc.step, got.stats, len(got.recs), want.stats, len(want.recs))
			}
			checkFile(t, s)
		})
	}
}

func TestStaleCompactionFile(t *testing.T) {
	leakCheck(t)
	path := filepath.Join(t.TempDir(), "queue.db")
	if err := os.WriteFile(compactPath(path), []byte("half a copy"), 0o600); err != nil {
		t.Fatal(err)
	}
	s := openT(t, Options{Path: path})
	checkNoTemp(t, path)
	if _, _, err := s.Append(testCtx(t), []byte("x")); err != nil {
		t.Errorf("Append = %v", err)
	}
}

// checkSurvivesReopen closes s and opens its file again: the content must
// be the same.
func checkSurvivesReopen(t *testing.T, s *Store, path string) {
	t.Helper()
	want := contentOf(t, s)
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	s = openT(t, Options{Path: path, MaxBytes: 5 << 20})
	if got := contentOf(t, s); !got.equal(want) {
		t.Errorf("after reopening: %+v (%d records), want %+v (%d records)", got.stats, len(got.recs), want.stats, len(want.recs))
	}
}

// A running store compacts itself once the queue has drained out of a
// mostly free file (the committer checks between transactions); readers
// running meanwhile see consistent data, and nothing is lost across the
// swap or a reopen.
func TestCompactWhileRunning(t *testing.T) {
	leakCheck(t)
	path := filepath.Join(t.TempDir(), "queue.db")
	var log syncBuffer
	s := openHooked(t, Options{Path: path, MaxBytes: 5 << 20, Logger: log.logger()}, hooks{compactEvery: time.Nanosecond})
	ctx := testCtx(t)

	stop := make(chan struct{})
	var readers sync.WaitGroup
	readers.Add(1)
	go func() {
		defer readers.Done()
		for {
			select {
			case <-stop:
				return
			default:
			}
			recs, err := s.Peek(0, 50, 1<<20)
			if err != nil {
				t.Errorf("Peek during compaction: %v", err)
				return
			}
			for i := 1; i < len(recs); i++ {
				if recs[i].Seq <= recs[i-1].Seq {
					t.Errorf("Peek returned sequence %d after %d", recs[i].Seq, recs[i-1].Seq)
					return
				}
			}
			_ = s.Stats()
		}
	}()

	fillPast(t, s)
	peak := s.Stats().FileSize
	if peak <= compactMinSize {
		t.Fatalf("file of %d bytes after filling, want more than %d", peak, compactMinSize)
	}
	if strings.Contains(log.String(), "store compacted") {
		t.Fatal("compacted while the file was full of live records")
	}
	drainMost(t, s)
	// The committer checks after a commit, once the caller is answered;
	// the pages the acks freed are free from the next transaction on.
	if err := s.Put("clock.floor", []byte("2026-03-01T00:00:00Z")); err != nil {
		t.Fatal(err)
	}
	log.await("store compacted")
	want := contentOf(t, s)
	close(stop)
	readers.Wait()

	if after := s.Stats().FileSize; after > peak/4 {
		t.Errorf("file size %d after draining, want under a quarter of its peak %d", after, peak)
	} else {
		t.Logf("compaction while running: %d → %d bytes", peak, after)
	}
	if !strings.Contains(log.String(), "store compacted") {
		t.Errorf("log = %q, want a compaction notice", log.String())
	}
	checkNoTemp(t, path)
	checkFile(t, s)
	if first, _, err := s.Append(ctx, []byte("after")); err != nil || first != want.stats.NextSeq {
		t.Errorf("Append after compaction = %d, %v; want seq %d", first, err, want.stats.NextSeq)
	}
	checkSurvivesReopen(t, s, path)
}

// A running compaction that renamed the new file into place but could not
// open it (here: made to fail right after the rename) leaves the store
// refusing writes rather than writing into the old, unlinked file; the
// next write opens the new file and goes through, and nothing is lost.
func TestCompactWhileRunningReopens(t *testing.T) {
	leakCheck(t)
	path := filepath.Join(t.TempDir(), "queue.db")
	var log syncBuffer
	var failed bool
	s := openHooked(t, Options{Path: path, MaxBytes: 5 << 20, Logger: log.logger()}, hooks{
		compactEvery: time.Nanosecond,
		compactStep: func(at string) error {
			if at == "renamed" && !failed {
				failed = true // the committer's goroutine only
				return errors.New("injected failure after the rename")
			}
			return nil
		},
	})
	fillPast(t, s)
	drainMost(t, s)
	if err := s.Put("clock.floor", []byte("2026-03-01T00:00:00Z")); err != nil {
		t.Fatal(err)
	}
	if !log.await("cannot be opened yet") {
		t.Fatalf("log = %q, want the failed reopen", log.String())
	}
	want := contentOf(t, s) // reads go on from the old file
	first, _, err := s.Append(testCtx(t), []byte("after"))
	if err != nil || first != want.stats.NextSeq {
		t.Fatalf("Append after the failed reopen = %d, %v; want seq %d", first, err, want.stats.NextSeq)
	}
	if !strings.Contains(log.String(), "store reopened after compaction") {
		t.Errorf("log = %q, want the reopen", log.String())
	}
	if size := s.Stats().FileSize; size > 1<<20 {
		t.Errorf("file size %d after the reopen, want the compacted file", size)
	}
	checkSurvivesReopen(t, s, path)
}
