package store

import (
	"context"
	"fmt"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"go.etcd.io/bbolt"
	"iotagent.dev/iotagent/internal/leakcheck"
)

// testTimeout bounds every test that waits on goroutines or the disk.
const testTimeout = 60 * time.Second

// testCtx returns a context that ends with t or after testTimeout.
func testCtx(t testing.TB) context.Context {
	ctx, cancel := context.WithTimeout(t.Context(), testTimeout)
	t.Cleanup(cancel)
	return ctx
}

// leakCheck fails t if, after its cleanups (which close its stores), a
// committer or a goroutine started by a test function is still running.
// Call it first in a top-level test so its cleanup runs last.
func leakCheck(t testing.TB) {
	leakcheck.Check(t, 5*time.Second, "iotagent/store.(*Store)", "iotagent/store.Test")
}

// waitGroup waits for wg, failing t after testTimeout.
func waitGroup(t testing.TB, wg *sync.WaitGroup) {
	t.Helper()
	done := make(chan struct{})
	go func() {
		wg.Wait()
		close(done)
	}()
	select {
	case <-done:
	case <-time.After(testTimeout):
		t.Fatalf("goroutines did not finish within %v", testTimeout)
	}
}

// openT opens a store with opts, at a new temporary path if opts.Path is
// empty, and closes it when t ends.
func openT(t testing.TB, opts Options) *Store {
	t.Helper()
	return openHooked(t, opts, hooks{})
}

func openHooked(t testing.TB, opts Options, h hooks) *Store {
	t.Helper()
	if opts.Path == "" {
		opts.Path = filepath.Join(t.TempDir(), "queue.db")
	}
	s, err := open(opts, h)
	if err != nil {
		t.Fatalf("Open(%+v) = %v", opts, err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

// payloads returns n payloads "prefix-i" for i from 0.
func payloads(prefix string, n int) [][]byte {
	ps := make([][]byte, n)
	for i := range ps {
		ps[i] = fmt.Appendf(nil, "%s-%d", prefix, i)
	}
	return ps
}

// all returns every queued record.
func all(t testing.TB, s *Store) []Record {
	t.Helper()
	recs, err := s.Peek(0, 0, 0)
	if err != nil {
		t.Fatalf("Peek(0, 0, 0) = %v", err)
	}
	return recs
}

func seqsOf(recs []Record) []uint64 {
	seqs := make([]uint64, len(recs))
	for i, r := range recs {
		seqs[i] = r.Seq
	}
	return seqs
}

func seqRange(first, last uint64) []uint64 {
	var seqs []uint64
	for s := first; s <= last; s++ {
		seqs = append(seqs, s)
	}
	return seqs
}

// checkFile runs bbolt's consistency check and compares the persisted
// counters with a scan of the queue.
func checkFile(t testing.TB, s *Store) {
	t.Helper()
	err := s.db.View(func(tx *bbolt.Tx) error {
		for err := range tx.Check() {
			return err
		}
		return nil
	})
	if err != nil {
		t.Fatalf("bbolt Check() = %v", err)
	}
	recs := all(t, s)
	var size int64
	for _, r := range recs {
		size += int64(len(r.Data))
	}
	st := s.Stats()
	if st.Depth != int64(len(recs)) || st.Bytes != size {
		t.Errorf("Stats() = depth %d, bytes %d; scan finds %d records, %d bytes", st.Depth, st.Bytes, len(recs), size)
	}
	var oldest uint64
	if len(recs) > 0 {
		oldest = recs[0].Seq
		if last := recs[len(recs)-1].Seq; st.NextSeq <= last {
			t.Errorf("Stats().NextSeq = %d, want > %d (newest record)", st.NextSeq, last)
		}
	}
	if st.OldestSeq != oldest {
		t.Errorf("Stats().OldestSeq = %d, want %d", st.OldestSeq, oldest)
	}
}

// committerGate records the groups the committer commits and can hold the
// committer after its next commit, so that a test can line writers up.
type committerGate struct {
	mu     sync.Mutex
	groups []int // ops per committed group
	hold   chan struct{}
}

func (g *committerGate) hooks() hooks {
	return hooks{afterCommit: func(records, ops int) {
		g.mu.Lock()
		g.groups = append(g.groups, ops)
		h := g.hold
		g.hold = nil
		g.mu.Unlock()
		if h != nil {
			<-h
		}
	}}
}

// holdNext makes the committer wait after its next commit until release is
// called.
func (g *committerGate) holdNext() (release func()) {
	h := make(chan struct{})
	g.mu.Lock()
	g.hold = h
	g.mu.Unlock()
	return sync.OnceFunc(func() { close(h) })
}

func (g *committerGate) Groups() []int {
	g.mu.Lock()
	defer g.mu.Unlock()
	return append([]int(nil), g.groups...)
}
