package store

import (
	"bytes"
	"context"
	"fmt"
	"path/filepath"
	"slices"
	"testing"
)

const benchPayload = 200

// benchStore opens a store bound high enough that the benchmarks measure
// appends, not drops.
func benchStore(b *testing.B) *Store {
	b.Helper()
	s, err := Open(Options{Path: filepath.Join(b.TempDir(), "queue.db"), MaxBytes: 1 << 30})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { s.Close() })
	return s
}

func benchBatch(n int) [][]byte {
	return slices.Repeat([][]byte{bytes.Repeat([]byte{'b'}, benchPayload)}, n)
}

func BenchmarkAppend(b *testing.B) {
	ctx := context.Background()
	for _, n := range []int{1, 100, 1000} {
		b.Run(fmt.Sprintf("records=%d", n), func(b *testing.B) {
			s := benchStore(b)
			batch := benchBatch(n)
			b.SetBytes(int64(n * benchPayload))
			for b.Loop() {
				if _, _, err := s.Append(ctx, batch...); err != nil {
					b.Fatal(err)
				}
			}
			b.ReportMetric(float64(b.N*n)/b.Elapsed().Seconds(), "records/s")
			b.ReportMetric(float64(b.N)/float64(s.Stats().Commits), "appends/commit")
		})
	}
	// Many writers of one record each: what group commit is for.
	b.Run("records=1/writers=16", func(b *testing.B) {
		s := benchStore(b)
		batch := benchBatch(1)
		b.SetBytes(benchPayload)
		b.SetParallelism(8) // × GOMAXPROCS (2 here) = 16 writers
		b.RunParallel(func(pb *testing.PB) {
			for pb.Next() {
				if _, _, err := s.Append(ctx, batch...); err != nil {
					b.Error(err)
					return
				}
			}
		})
		b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "records/s")
		b.ReportMetric(float64(b.N)/float64(s.Stats().Commits), "appends/commit")
	})
}

// BenchmarkDrain measures the uplink side: Peek a batch after the last
// sent, Ack it, as records are delivered in order.
func BenchmarkDrain(b *testing.B) {
	ctx := context.Background()
	for _, n := range []int{1, 100, 1000} {
		b.Run(fmt.Sprintf("records=%d", n), func(b *testing.B) {
			s := benchStore(b)
			fill := benchBatch(1000)
			var after uint64
			drained := 0
			for b.Loop() {
				recs, err := s.Peek(after, n, 0)
				if err != nil {
					b.Fatal(err)
				}
				if len(recs) == 0 {
					b.StopTimer()
					for range 100 {
						if _, _, err := s.Append(ctx, fill...); err != nil {
							b.Fatal(err)
						}
					}
					b.StartTimer()
					continue
				}
				if err := s.Ack(seqsOf(recs)...); err != nil {
					b.Fatal(err)
				}
				after = recs[len(recs)-1].Seq
				drained += len(recs)
			}
			b.ReportMetric(float64(drained)/b.Elapsed().Seconds(), "records/s")
		})
	}
}
