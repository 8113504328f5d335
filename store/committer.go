package store

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"sync/atomic"
	"syscall"
	"time"

	"go.etcd.io/bbolt"
	berrors "go.etcd.io/bbolt/errors"
)

type opKind uint8

const (
	opAppend opKind = iota
	opAck
	opPut
)

// An op is one caller's write, handed to the committer.
//
// Its state decides who wins when the caller's ctx ends while the committer
// gathers it: the caller by moving it from opPending to opCancelled (then
// nothing is stored), or the committer by moving it to opClaimed when it
// starts the transaction (then the caller waits for the outcome).
type op struct {
	kind     opKind
	payloads [][]byte // opAppend
	cost     int64    // opAppend: what the payloads count against MaxBytes
	seqs     []uint64 // opAck
	key      []byte   // opPut
	value    []byte   // opPut

	state atomic.Uint32
	done  chan opResult // buffered: the committer never blocks on a caller
}

const (
	opPending uint32 = iota
	opClaimed
	opCancelled
)

type opResult struct {
	first, last uint64 // opAppend
	err         error
}

func (o *op) records() int {
	return len(o.payloads)
}

// submit hands o to the committer and waits for its outcome.
func (s *Store) submit(ctx context.Context, o *op) opResult {
	o.done = make(chan opResult, 1)
	if err := ctx.Err(); err != nil {
		return opResult{err: err}
	}
	select {
	case <-s.closing:
		return opResult{err: ErrClosed}
	default:
	}
	select {
	case s.ops <- o:
	case <-ctx.Done():
		return opResult{err: ctx.Err()}
	case <-s.closing:
		return opResult{err: ErrClosed}
	}
	select {
	case r := <-o.done:
		return r
	case <-ctx.Done():
		if o.state.CompareAndSwap(opPending, opCancelled) {
			return opResult{err: ctx.Err()}
		}
		return <-o.done
	}
}

// run is the committer. Each turn it takes the first waiting op, gathers
// more into a group and commits the group in one transaction:
//
//	idle ──op──▶ gather ──GroupMaxRecords, nothing waiting, or GroupMaxDelay──▶ commit ──▶ idle
//
// While gathering it takes whatever is already waiting. It blocks for more
// only while the group has fewer appending callers than the previous group
// had, and for at most GroupMaxDelay: callers that were served together tend
// to come back together, and a lone writer (previous group: one appender)
// never waits. An op that would push the group past GroupMaxRecords is
// carried into the next group.
func (s *Store) run() {
	defer s.wg.Done()
	timer := time.NewTimer(time.Hour)
	timer.Stop()
	expect := 1
	var carry *op
	for {
		first := carry
		carry = nil
		if first == nil {
			select {
			case first = <-s.ops:
			case <-s.closing:
				return
			}
		}
		group := []*op{first}
		records := first.records()
		appenders := min(records, 1)
		linger := expect > 1 && appenders < expect
		if linger {
			timer.Reset(s.opts.GroupMaxDelay)
		}
	gather:
		for records < s.opts.GroupMaxRecords {
			var o *op
			if linger && appenders < expect {
				select {
				case o = <-s.ops:
				case <-timer.C:
					linger = false
					continue
				case <-s.closing:
					linger = false
					continue
				}
			} else {
				select {
				case o = <-s.ops:
				default:
					break gather
				}
			}
			if records > 0 && records+o.records() > s.opts.GroupMaxRecords {
				carry = o
				break
			}
			group = append(group, o)
			records += o.records()
			appenders += min(o.records(), 1)
		}
		timer.Stop()
		s.commit(group)
		expect = max(appenders, 1)
		s.compactLive()
	}
}

// commit applies the claimed ops of group in one transaction, in order, and
// hands each its outcome. The in-memory counters change only once the
// transaction is committed.
func (s *Store) commit(group []*op) {
	live := group[:0]
	for _, o := range group {
		if o.state.CompareAndSwap(opPending, opClaimed) {
			live = append(live, o)
		}
	}
	if len(live) == 0 {
		return
	}
	s.mu.RLock()
	c := s.c
	s.mu.RUnlock()
	before := c
	results := make([]opResult, len(live))
	records, wrote, err := s.apply(live, &c, results)
	if err != nil {
		err = s.commitError(err)
		for _, o := range live {
			o.done <- opResult{err: err}
		}
		return
	}
	dropped := c.dropped - before.dropped
	s.mu.Lock()
	s.c = c
	if wrote {
		s.commits++
	}
	if c.last != before.last {
		close(s.notify)
		s.notify = make(chan struct{})
	}
	s.mu.Unlock()
	if dropped > 0 {
		level, msg := s.log.Debug, "queue full: dropped oldest records"
		if !s.warnedDrop {
			s.warnedDrop = true
			level, msg = s.log.Warn, "queue full: dropping oldest records (further drops are logged at debug level)"
		}
		level(msg, "dropped", dropped, "dropped_total", c.dropped, "max_bytes", s.opts.MaxBytes)
	}
	if wrote && s.hooks.afterCommit != nil {
		s.hooks.afterCommit(records, len(live))
	}
	for i, o := range live {
		o.done <- results[i]
	}
}

// apply runs ops in one write transaction, filling results, and commits it
// if anything changed. It returns the number of records appended and whether
// it committed. An error fails the whole group and leaves the file as it
// was.
func (s *Store) apply(ops []*op, c *counters, results []opResult) (records int, wrote bool, err error) {
	if s.broken != nil {
		if err := s.reopen(); err != nil {
			return 0, false, err
		}
	}
	tx, err := s.db.Begin(true)
	if err != nil {
		return 0, false, err
	}
	defer tx.Rollback()
	q := tx.Bucket(bucketQueue)
	// Not persisted by bbolt, so set in every transaction: keys only grow,
	// and full pages make the file about a third smaller.
	q.FillPercent = 1.0
	queueChanged := false
	for i, o := range ops {
		switch o.kind {
		case opAppend:
			var done bool
			results[i], done, err = s.applyAppend(q, c, o)
			if done {
				records += o.records()
				queueChanged = true
			}
		case opAck:
			var n int
			n, err = applyAck(q, c, o.seqs)
			queueChanged = queueChanged || n > 0
		case opPut:
			// The state bucket keeps bbolt's default fill: its keys are not
			// appended in order.
			err = tx.Bucket(bucketState).Put(o.key, o.value)
			wrote = true
		}
		if err != nil {
			return 0, false, err
		}
	}
	if queueChanged {
		if err := q.SetSequence(c.last); err != nil {
			return 0, false, err
		}
		c.oldest = 0
		if k, _ := q.Cursor().First(); k != nil {
			c.oldest = binary.BigEndian.Uint64(k)
		}
		meta := tx.Bucket(bucketMeta)
		for _, kv := range []struct {
			k []byte
			v uint64
		}{{metaDepth, uint64(c.depth)}, {metaBytes, uint64(c.bytes)}, {metaDropped, c.dropped}} {
			if err := meta.Put(kv.k, u64(kv.v)); err != nil {
				return 0, false, err
			}
		}
		wrote = true
	}
	if !wrote {
		return 0, false, nil
	}
	if err := tx.Commit(); err != nil {
		return records, false, err
	}
	return records, true, nil
}

// applyAppend makes room for o's payloads per the OnFull policy and puts
// them. done is false when the policy refused them (results.err is then
// ErrFull); err is for failures that must abort the transaction.
func (s *Store) applyAppend(q *bbolt.Bucket, c *counters, o *op) (r opResult, done bool, err error) {
	if c.charged()+o.cost > s.opts.MaxBytes {
		if s.opts.OnFull == Reject {
			return opResult{err: fmt.Errorf("queue holds %d records counting %d of %d bytes: %w", c.depth, c.charged(), s.opts.MaxBytes, ErrFull)}, false, nil
		}
		// Records put earlier in this transaction are the newest, so
		// they go last; o.cost <= MaxBytes (checked by Append) guarantees
		// room once the queue is empty.
		cur := q.Cursor()
		for c.charged()+o.cost > s.opts.MaxBytes {
			k, v := cur.First()
			if k == nil {
				return r, false, fmt.Errorf("dropping oldest: queue empty with %d bytes still counted", c.charged())
			}
			n := len(v)
			if err := cur.Delete(); err != nil {
				return r, false, err
			}
			c.bytes -= int64(n)
			c.depth--
			c.dropped++
		}
	}
	// bbolt keeps references to keys until the commit: one buffer, one
	// slice per key, never reused.
	keys := make([]byte, 8*len(o.payloads))
	r.first = c.last + 1
	for i, p := range o.payloads {
		c.last++
		k := keys[8*i : 8*i+8 : 8*i+8]
		binary.BigEndian.PutUint64(k, c.last)
		if err := q.Put(k, p); err != nil {
			return r, false, err
		}
		c.bytes += int64(len(p))
		c.depth++
	}
	r.last = c.last
	return r, true, nil
}

// applyAck deletes the queued records among seqs and returns how many it
// deleted.
func applyAck(q *bbolt.Bucket, c *counters, seqs []uint64) (int, error) {
	cur := q.Cursor()
	var key [8]byte
	n := 0
	for _, seq := range seqs {
		binary.BigEndian.PutUint64(key[:], seq)
		// A cursor, unlike Bucket.Get, finds an empty payload.
		k, v := cur.Seek(key[:])
		if k == nil || binary.BigEndian.Uint64(k) != seq {
			continue
		}
		size := len(v)
		if err := cur.Delete(); err != nil {
			return n, err
		}
		c.bytes -= int64(size)
		c.depth--
		n++
	}
	return n, nil
}

// commitError says what a failed transaction means for the operator. bbolt
// has rolled it back, so the file and the counters are as before.
func (s *Store) commitError(err error) error {
	err = withENOSPC(err)
	switch {
	case errors.Is(err, syscall.ENOSPC):
		return fmt.Errorf("committing: disk full: %w", err)
	case errors.Is(err, berrors.ErrMaxSizeReached):
		return fmt.Errorf("committing: file reached its ceiling of %d bytes: %w", s.opts.ceiling(), err)
	}
	return fmt.Errorf("committing: %w", err)
}
