package store

import (
	"context"
	"encoding/binary"
	"fmt"
	"math"

	"go.etcd.io/bbolt"
)

// Record is a queued record. Data is a copy the caller owns.
type Record struct {
	Seq  uint64
	Data []byte
}

// MaxBytes returns the queue's bound, Options.MaxBytes or its default: what
// a writer needs to keep one append from taking too much of the queue
// (under DropOldest, evicting it).
func (s *Store) MaxBytes() int64 { return s.opts.MaxBytes }

// Append queues payloads as consecutive records, first to last, and returns
// nil only when they are committed and fsynced. The payloads must not be
// modified until Append returns. Calling it with no payloads does nothing
// and returns 0, 0, nil.
//
// Concurrent calls share transactions (see the package doc); the payloads
// of one call always go into one transaction. ctx cancels the wait for the
// committer: if Append returns ctx's error, nothing was stored. Once the
// committer has started the transaction holding the payloads, Append waits
// for it and reports its outcome whatever ctx does.
func (s *Store) Append(ctx context.Context, payloads ...[]byte) (first, last uint64, err error) {
	if len(payloads) == 0 {
		return 0, 0, nil
	}
	var cost int64
	for _, p := range payloads {
		if len(p) > bbolt.MaxValueSize {
			return 0, 0, fmt.Errorf("appending a %d-byte payload: %w", len(p), ErrTooLarge)
		}
		cost += int64(len(p)) + RecordOverhead
	}
	if cost > s.opts.MaxBytes {
		return 0, 0, fmt.Errorf("appending %d records counting %d bytes, bound %d: %w", len(payloads), cost, s.opts.MaxBytes, ErrTooLarge)
	}
	r := s.submit(ctx, &op{kind: opAppend, payloads: payloads, cost: cost})
	if r.err != nil {
		return 0, 0, fmt.Errorf("appending %d records: %w", len(payloads), r.err)
	}
	return r.first, r.last, nil
}

// Peek returns copies of the oldest queued records with a sequence number
// above after, in order, at most maxRecords of them and at most maxBytes of
// payload in total, but at least one if any exists, however big. A limit of
// zero or less means no limit on that count: mind the memory of the device.
// Peek does not remove anything; Ack does.
func (s *Store) Peek(after uint64, maxRecords, maxBytes int) ([]Record, error) {
	if after == math.MaxUint64 {
		return nil, nil
	}
	var recs []Record
	err := s.view(func(tx *bbolt.Tx) error {
		// Gather slices of the mapped file, then copy them all into one
		// buffer, capped per record so an append to one Data cannot spill
		// into the next.
		var vals [][]byte
		size := 0
		c := tx.Bucket(bucketQueue).Cursor()
		for k, v := c.Seek(u64(after + 1)); k != nil; k, v = c.Next() {
			if maxRecords > 0 && len(recs) >= maxRecords {
				break
			}
			if maxBytes > 0 && len(recs) > 0 && size+len(v) > maxBytes {
				break
			}
			recs = append(recs, Record{Seq: binary.BigEndian.Uint64(k)})
			vals = append(vals, v)
			size += len(v)
		}
		buf := make([]byte, 0, size)
		for i, v := range vals {
			start := len(buf)
			buf = append(buf, v...)
			recs[i].Data = buf[start:len(buf):len(buf)]
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("peeking: %w", err)
	}
	return recs, nil
}

// Ack deletes the records with the given sequence numbers and returns when
// that is committed. Order does not matter; a number that is not queued
// (never appended, acked already, or dropped) is skipped without error.
func (s *Store) Ack(seqs ...uint64) error {
	if len(seqs) == 0 {
		return nil
	}
	if r := s.submit(context.Background(), &op{kind: opAck, seqs: seqs}); r.err != nil {
		return fmt.Errorf("acking %d records: %w", len(seqs), r.err)
	}
	return nil
}

// Wait returns nil as soon as a record with a sequence number above after
// is queued (at once if one is), ctx's error when ctx ends first, or
// ErrClosed when the store is closed.
func (s *Store) Wait(ctx context.Context, after uint64) error {
	for {
		select {
		case <-s.closing:
			return ErrClosed
		default:
		}
		s.mu.RLock()
		c, notify := s.c, s.notify
		s.mu.RUnlock()
		switch {
		case c.depth == 0 || c.last <= after:
			// Nothing newer: wait for the next append.
		case c.oldest > after:
			return nil
		default:
			// Records above after were appended but may have been acked
			// out of order: look.
			found := false
			err := s.view(func(tx *bbolt.Tx) error {
				k, _ := tx.Bucket(bucketQueue).Cursor().Seek(u64(after + 1))
				found = k != nil
				return nil
			})
			if err != nil {
				return fmt.Errorf("waiting: %w", err)
			}
			if found {
				return nil
			}
		}
		// notify was taken before the look, so an append committed since
		// has closed it.
		select {
		case <-notify:
		case <-ctx.Done():
			return ctx.Err()
		case <-s.closing:
			return ErrClosed
		}
	}
}
