package store

import (
	"bytes"
	"context"
	"errors"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"go.etcd.io/bbolt"
)

func TestOpenOptions(t *testing.T) {
	leakCheck(t)
	path := filepath.Join(t.TempDir(), "queue.db")
	for _, tc := range []struct {
		name    string
		opts    Options
		wantErr string
	}{
		{"no path", Options{}, "Path is required"},
		{"negative MaxBytes", Options{Path: path, MaxBytes: -1}, "MaxBytes is negative"},
		{"MaxBytes above limit", Options{Path: path, MaxBytes: MaxBytesLimit + 1}, "limit on this"},
		{"unknown OnFull", Options{Path: path, OnFull: 7}, "unknown Options.OnFull FullPolicy(7)"},
		{"negative GroupMaxRecords", Options{Path: path, GroupMaxRecords: -1}, "GroupMaxRecords is negative"},
		{"negative GroupMaxDelay", Options{Path: path, GroupMaxDelay: -time.Second}, "GroupMaxDelay is negative"},
		{"negative OpenTimeout", Options{Path: path, OpenTimeout: -time.Second}, "OpenTimeout is negative"},
		{"missing directory", Options{Path: filepath.Join(path+".d", "queue.db")}, "no such file or directory"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s, err := Open(tc.opts)
			if err == nil {
				s.Close()
				t.Fatalf("Open(%+v) = nil error, want %q", tc.opts, tc.wantErr)
			}
			if !strings.Contains(err.Error(), tc.wantErr) {
				t.Fatalf("Open(%+v) = %v, want %q", tc.opts, err, tc.wantErr)
			}
		})
	}
	t.Run("defaults", func(t *testing.T) {
		s := openT(t, Options{Path: path})
		want := Options{
			Path:            path,
			MaxBytes:        DefaultMaxBytes,
			OnFull:          DropOldest,
			GroupMaxRecords: DefaultGroupMaxRecords,
			GroupMaxDelay:   DefaultGroupMaxDelay,
			OpenTimeout:     DefaultOpenTimeout,
			Logger:          s.opts.Logger,
		}
		if s.opts != want || s.opts.Logger == nil {
			t.Errorf("Open(Path only).opts = %+v, want %+v with a logger", s.opts, want)
		}
		if got, want := s.db.MaxSize, 2*DefaultMaxBytes+32<<20; got != want {
			t.Errorf("bbolt MaxSize = %d, want %d", got, want)
		}
		if !s.db.NoFreelistSync || s.db.FreelistType != bbolt.FreelistMapType {
			t.Errorf("bbolt NoFreelistSync, FreelistType = %v, %v; want true, %v", s.db.NoFreelistSync, s.db.FreelistType, bbolt.FreelistMapType)
		}
		if fi, err := os.Stat(path); err != nil || fi.Mode().Perm() != 0o600 {
			t.Errorf("Stat(%s) = %v, %v; want mode 0600", path, fi.Mode(), err)
		}
	})
}

func TestAppendPeekAck(t *testing.T) {
	leakCheck(t)
	ctx := testCtx(t)
	s := openT(t, Options{})

	for i, want := range []struct{ first, last uint64 }{{1, 1}, {2, 2}, {3, 5}} {
		n := int(want.last - want.first + 1)
		first, last, err := s.Append(ctx, payloads("r", n)...)
		if err != nil || first != want.first || last != want.last {
			t.Fatalf("Append #%d of %d = %d, %d, %v; want %d, %d, nil", i, n, first, last, err, want.first, want.last)
		}
	}
	if first, last, err := s.Append(ctx); first != 0 || last != 0 || err != nil {
		t.Errorf("Append() = %d, %d, %v; want 0, 0, nil", first, last, err)
	}
	if got := seqsOf(all(t, s)); !slices.Equal(got, seqRange(1, 5)) {
		t.Fatalf("Peek(0, 0, 0) seqs = %v, want 1..5", got)
	}

	steps := []struct {
		name string
		ack  []uint64
		want []uint64
	}{
		{"out of order", []uint64{4, 2}, []uint64{1, 3, 5}},
		{"missing and already acked", []uint64{2, 99, 0, 4}, []uint64{1, 3, 5}},
		{"duplicates", []uint64{3, 3}, []uint64{1, 5}},
		{"the rest, newest first", []uint64{5, 1}, nil},
	}
	for _, step := range steps {
		t.Run(step.name, func(t *testing.T) {
			if err := s.Ack(step.ack...); err != nil {
				t.Fatalf("Ack(%v) = %v", step.ack, err)
			}
			if got := seqsOf(all(t, s)); !slices.Equal(got, step.want) {
				t.Errorf("after Ack(%v): seqs = %v, want %v", step.ack, got, step.want)
			}
			checkFile(t, s)
		})
	}
	if st := s.Stats(); st.Depth != 0 || st.Bytes != 0 || st.NextSeq != 6 || st.OldestSeq != 0 {
		t.Errorf("Stats() after acking all = %+v, want depth 0, bytes 0, next 6, oldest 0", st)
	}
}

func TestPeek(t *testing.T) {
	leakCheck(t)
	ctx := testCtx(t)
	s := openT(t, Options{})
	// Payload sizes 10, 20, 30, 40, 50 for seqs 1..5.
	for i := 1; i <= 5; i++ {
		if _, _, err := s.Append(ctx, bytes.Repeat([]byte{byte('a' + i)}, 10*i)); err != nil {
			t.Fatal(err)
		}
	}
	for _, tc := range []struct {
		after                uint64
		maxRecords, maxBytes int
		want                 []uint64
	}{
		{0, 0, 0, []uint64{1, 2, 3, 4, 5}},
		{0, 2, 0, []uint64{1, 2}},
		{2, 2, 0, []uint64{3, 4}},
		{0, 0, 30, []uint64{1, 2}},
		{0, 0, 29, []uint64{1}},
		{3, 0, 1, []uint64{4}}, // one record even if alone over maxBytes
		{1, 10, 50, []uint64{2, 3}},
		{4, 0, 0, []uint64{5}},
		{5, 0, 0, nil},
		{1 << 63, 0, 0, nil},
		{^uint64(0), 0, 0, nil},
	} {
		got, err := s.Peek(tc.after, tc.maxRecords, tc.maxBytes)
		if err != nil || !slices.Equal(seqsOf(got), tc.want) {
			t.Errorf("Peek(%d, %d, %d) = %v, %v; want %v", tc.after, tc.maxRecords, tc.maxBytes, seqsOf(got), err, tc.want)
		}
		for _, r := range got {
			if want := bytes.Repeat([]byte{byte('a' + r.Seq)}, 10*int(r.Seq)); !bytes.Equal(r.Data, want) {
				t.Errorf("Peek(%d, …) record %d = %q, want %q", tc.after, r.Seq, r.Data, want)
			}
		}
	}

	t.Run("data is a private copy", func(t *testing.T) {
		recs := all(t, s)
		recs[0].Data[0] = 'X'
		_ = append(recs[0].Data, 'Y') // must not spill into recs[1].Data
		if recs[1].Data[0] != 'c' {
			t.Errorf("appending to Data of record 1 changed record 2 to %q", recs[1].Data)
		}
		if again := all(t, s); again[0].Data[0] != 'b' {
			t.Errorf("changing Peek's result changed the store: record 1 = %q", again[0].Data)
		}
	})
}

func TestEmptyPayload(t *testing.T) {
	leakCheck(t)
	s := openT(t, Options{})
	first, last, err := s.Append(testCtx(t), nil, []byte{}, []byte("x"))
	if err != nil || first != 1 || last != 3 {
		t.Fatalf("Append(nil, {}, x) = %d, %d, %v; want 1, 3, nil", first, last, err)
	}
	recs := all(t, s)
	if got := seqsOf(recs); !slices.Equal(got, []uint64{1, 2, 3}) || len(recs[0].Data) != 0 || len(recs[1].Data) != 0 {
		t.Fatalf("Peek = %v, want 3 records, the first two empty", recs)
	}
	if err := s.Ack(1, 2); err != nil {
		t.Fatal(err)
	}
	if got := seqsOf(all(t, s)); !slices.Equal(got, []uint64{3}) {
		t.Errorf("after Ack(1, 2) of empty records: seqs = %v, want [3]", got)
	}
	checkFile(t, s)
}

func TestSeqNeverReused(t *testing.T) {
	leakCheck(t)
	ctx := testCtx(t)
	path := filepath.Join(t.TempDir(), "queue.db")
	opts := Options{Path: path, MaxBytes: 10 * (RecordOverhead + 3)}
	var next uint64 = 1
	appendOne := func(t *testing.T, s *Store) {
		t.Helper()
		first, _, err := s.Append(ctx, []byte("abc"))
		if err != nil || first != next {
			t.Fatalf("Append = %d, %v; want %d", first, err, next)
		}
		next++
	}
	for _, tc := range []struct {
		name string
		do   func(t *testing.T, s *Store)
	}{
		{"after acking everything", func(t *testing.T, s *Store) {
			if err := s.Ack(seqRange(1, next)...); err != nil {
				t.Fatal(err)
			}
		}},
		{"after drops", func(t *testing.T, s *Store) {
			for range 25 {
				appendOne(t, s)
			}
		}},
		{"after acking everything and reopening", func(t *testing.T, s *Store) {
			if err := s.Ack(seqRange(1, next)...); err != nil {
				t.Fatal(err)
			}
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := openT(t, opts)
			appendOne(t, s)
			tc.do(t, s)
			appendOne(t, s)
			if err := s.Close(); err != nil {
				t.Fatal(err)
			}
			s = openT(t, opts)
			if st := s.Stats(); st.NextSeq != next {
				t.Fatalf("after reopen: Stats().NextSeq = %d, want %d", st.NextSeq, next)
			}
			appendOne(t, s)
		})
	}
}

func TestDropOldest(t *testing.T) {
	leakCheck(t)
	const size = 100
	const fits = 10 // records of size bytes within MaxBytes
	opts := Options{MaxBytes: fits * (size + RecordOverhead)}
	for _, tc := range []struct {
		name    string
		batches []int
		ackEach int // oldest records acked after each batch
	}{
		{"one at a time", slices.Repeat([]int{1}, 25), 0},
		{"batches of five", []int{5, 5, 5, 5, 5}, 0},
		{"uneven batches", []int{3, 7, 1, 9, 4, 10, 2}, 0},
		{"with acks in between", []int{4, 6, 8, 3, 9, 5}, 2},
		{"batch that fills the queue alone", []int{2, 10, 10}, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ctx := testCtx(t)
			opts := opts
			opts.Path = filepath.Join(t.TempDir(), "queue.db")
			s := openT(t, opts)
			var appended, acked int
			var last uint64
			for _, n := range tc.batches {
				batch := make([][]byte, n)
				for i := range batch {
					batch[i] = bytes.Repeat([]byte{'d'}, size)
				}
				var err error
				if _, last, err = s.Append(ctx, batch...); err != nil {
					t.Fatalf("Append(%d records) = %v", n, err)
				}
				appended += n
				if tc.ackEach > 0 {
					recs, err := s.Peek(0, tc.ackEach, 0)
					if err != nil {
						t.Fatal(err)
					}
					if err := s.Ack(seqsOf(recs)...); err != nil {
						t.Fatal(err)
					}
					acked += len(recs)
				}
			}
			st := s.Stats()
			recs := all(t, s)
			if want := uint64(appended - acked - len(recs)); st.Dropped != want {
				t.Errorf("Stats().Dropped = %d, want %d (appended %d, acked %d, left %d)", st.Dropped, want, appended, acked, len(recs))
			}
			if st.Dropped == 0 {
				t.Errorf("Stats().Dropped = 0, want drops: the case must overflow the bound")
			}
			// What is left is the newest, without holes, within the bound.
			if want := seqRange(last-uint64(len(recs))+1, last); !slices.Equal(seqsOf(recs), want) {
				t.Errorf("left seqs = %v, want %v", seqsOf(recs), want)
			}
			if len(recs) > fits {
				t.Errorf("%d records left, more than the %d that fit", len(recs), fits)
			}
			checkFile(t, s)

			if err := s.Close(); err != nil {
				t.Fatal(err)
			}
			s = openT(t, opts)
			if got := s.Stats(); got.Dropped != st.Dropped || got.Depth != st.Depth || got.Bytes != st.Bytes || got.NextSeq != st.NextSeq {
				t.Errorf("after reopen: Stats() = %+v, want %+v", got, st)
			}
		})
	}
}

func TestReject(t *testing.T) {
	leakCheck(t)
	ctx := testCtx(t)
	rec := []byte("0123456789")
	s := openT(t, Options{MaxBytes: 3 * (int64(len(rec)) + RecordOverhead), OnFull: Reject})
	if _, _, err := s.Append(ctx, rec, rec); err != nil {
		t.Fatal(err)
	}
	before := s.Stats()
	if _, _, err := s.Append(ctx, rec, rec); !errors.Is(err, ErrFull) {
		t.Fatalf("Append(2 records) with room for 1 = %v, want ErrFull", err)
	}
	if got := s.Stats(); got != before {
		t.Errorf("after ErrFull: Stats() = %+v, want %+v (nothing stored, no seq used)", got, before)
	}
	if first, _, err := s.Append(ctx, rec); err != nil || first != 3 {
		t.Fatalf("Append(1 record) with room for 1 = %d, %v; want 3, nil", first, err)
	}
	if _, _, err := s.Append(ctx, rec); !errors.Is(err, ErrFull) {
		t.Fatalf("Append to a full queue = %v, want ErrFull", err)
	}
	if err := s.Ack(1); err != nil {
		t.Fatal(err)
	}
	if first, _, err := s.Append(ctx, rec); err != nil || first != 4 {
		t.Fatalf("Append after Ack = %d, %v; want 4, nil", first, err)
	}
	if st := s.Stats(); st.Dropped != 0 {
		t.Errorf("Stats().Dropped = %d with Reject, want 0", st.Dropped)
	}
}

func TestTooLarge(t *testing.T) {
	leakCheck(t)
	const maxBytes = 1000
	for _, policy := range []FullPolicy{DropOldest, Reject} {
		t.Run(policy.String(), func(t *testing.T) {
			ctx := testCtx(t)
			s := openT(t, Options{MaxBytes: maxBytes, OnFull: policy})
			for _, tc := range []struct {
				name     string
				payloads [][]byte
				wantErr  error
			}{
				{"one payload too large", [][]byte{make([]byte, maxBytes)}, ErrTooLarge},
				{"one payload just too large", [][]byte{make([]byte, maxBytes-RecordOverhead+1)}, ErrTooLarge},
				{"payloads together too large", [][]byte{make([]byte, 400), make([]byte, 400), make([]byte, 200)}, ErrTooLarge},
				{"one payload that just fits", [][]byte{make([]byte, maxBytes-RecordOverhead)}, nil},
			} {
				before := s.Stats()
				_, _, err := s.Append(ctx, tc.payloads...)
				if !errors.Is(err, tc.wantErr) || (err != nil) != (tc.wantErr != nil) {
					t.Errorf("%s: Append = %v, want %v", tc.name, err, tc.wantErr)
				}
				if after := s.Stats(); err != nil && after != before {
					t.Errorf("%s: Stats() after the error = %+v, want %+v", tc.name, after, before)
				}
			}
		})
	}
}

func TestState(t *testing.T) {
	leakCheck(t)
	path := filepath.Join(t.TempDir(), "queue.db")
	s := openT(t, Options{Path: path})
	if v, err := s.Get("clock.floor"); !errors.Is(err, ErrNotFound) {
		t.Errorf("Get(missing) = %q, %v; want ErrNotFound", v, err)
	}
	for _, tc := range []struct {
		key   string
		value []byte
	}{
		{"clock.floor", []byte("2026-01-01T00:00:00Z")},
		{"clock.floor", []byte("2026-02-01T00:00:00Z")},
		{"dtls.session", []byte{0, 1, 2}},
		{"empty", []byte{}},
	} {
		if err := s.Put(tc.key, tc.value); err != nil {
			t.Fatalf("Put(%q) = %v", tc.key, err)
		}
		if got, err := s.Get(tc.key); err != nil || !bytes.Equal(got, tc.value) || got == nil {
			t.Errorf("Get(%q) = %q, %v; want %q", tc.key, got, err, tc.value)
		}
	}
	for _, key := range []string{"", strings.Repeat("k", bbolt.MaxKeySize+1)} {
		if err := s.Put(key, nil); err == nil {
			t.Errorf("Put(%d-byte key) = nil, want an error", len(key))
		}
	}
	if st := s.Stats(); st.Depth != 0 || st.NextSeq != 1 {
		t.Errorf("Stats() after Puts = %+v, want an empty queue", st)
	}
	s.Close()
	s = openT(t, Options{Path: path})
	if got, err := s.Get("clock.floor"); err != nil || string(got) != "2026-02-01T00:00:00Z" {
		t.Errorf("after reopen: Get(clock.floor) = %q, %v", got, err)
	}
}

func TestClosed(t *testing.T) {
	leakCheck(t)
	ctx := testCtx(t)
	s := openT(t, Options{})
	if _, _, err := s.Append(ctx, []byte("x")); err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil {
		t.Fatalf("Close() = %v", err)
	}
	if err := s.Close(); err != nil {
		t.Errorf("second Close() = %v, want nil", err)
	}
	for name, err := range map[string]error{
		"Append": func() error { _, _, err := s.Append(ctx, []byte("y")); return err }(),
		"Ack":    s.Ack(1),
		"Put":    s.Put("k", nil),
		"Peek":   func() error { _, err := s.Peek(0, 1, 0); return err }(),
		"Get":    func() error { _, err := s.Get("k"); return err }(),
		"Wait":   s.Wait(ctx, 0),
	} {
		if !errors.Is(err, ErrClosed) {
			t.Errorf("%s after Close = %v, want ErrClosed", name, err)
		}
	}
}

func TestAppendContext(t *testing.T) {
	leakCheck(t)
	s := openT(t, Options{})
	ctx, cancel := context.WithCancel(testCtx(t))
	cancel()
	if _, _, err := s.Append(ctx, []byte("x")); !errors.Is(err, context.Canceled) {
		t.Errorf("Append(cancelled ctx) = %v, want context.Canceled", err)
	}
	if st := s.Stats(); st.Depth != 0 || st.NextSeq != 1 || st.Commits != 0 {
		t.Errorf("Stats() after a cancelled Append = %+v, want nothing stored", st)
	}
}

func TestFormat(t *testing.T) {
	leakCheck(t)
	for _, tc := range []struct {
		name  string
		setup func(tx *bbolt.Tx) error
	}{
		{"foreign bbolt file", func(tx *bbolt.Tx) error {
			_, err := tx.CreateBucket([]byte("registry"))
			return err
		}},
		{"newer format", func(tx *bbolt.Tx) error {
			for _, name := range [][]byte{bucketMeta, bucketQueue, bucketState} {
				if _, err := tx.CreateBucket(name); err != nil {
					return err
				}
			}
			return tx.Bucket(bucketMeta).Put(metaVersion, u64(formatVersion+1))
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "queue.db")
			db, err := bbolt.Open(path, 0o600, &bbolt.Options{Timeout: time.Second})
			if err != nil {
				t.Fatal(err)
			}
			if err := db.Update(tc.setup); err != nil {
				t.Fatal(err)
			}
			db.Close()
			s, err := Open(Options{Path: path})
			if err == nil {
				s.Close()
			}
			if !errors.Is(err, ErrFormat) || !strings.Contains(err.Error(), path) {
				t.Errorf("Open(%s) = %v, want ErrFormat naming the path", tc.name, err)
			}
		})
	}
}

func TestMaxBytesLimit(t *testing.T) {
	want := map[int]int64{32: 128 << 20, 64: 64 << 30}[strconv.IntSize]
	if MaxBytesLimit != want {
		t.Errorf("MaxBytesLimit on a %d-bit platform = %d, want %d", strconv.IntSize, MaxBytesLimit, want)
	}
	// On 32-bit the file ceiling must keep bbolt's map, which doubles up to
	// 1 GiB, at 512 MiB at most.
	opts := Options{MaxBytes: maxBytesLimit32}
	if c := opts.ceiling(); c > 512<<20 {
		t.Errorf("ceiling for MaxBytes %d = %d, want at most 512 MiB", opts.MaxBytes, c)
	}
}
