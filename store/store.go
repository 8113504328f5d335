package store

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"strconv"
	"sync"
	"time"

	"go.etcd.io/bbolt"
	berrors "go.etcd.io/bbolt/errors"
)

// Defaults for the zero values of Options.
const (
	DefaultMaxBytes        = 64 << 20
	DefaultGroupMaxRecords = 1000
	DefaultGroupMaxDelay   = 10 * time.Millisecond
	DefaultOpenTimeout     = 5 * time.Second
)

const (
	maxBytesLimit32 = 128 << 20
	maxBytesLimit64 = 64 << 30

	// MaxBytesLimit is the largest Options.MaxBytes accepted: 128 MiB on
	// 32-bit platforms, where bbolt's memory map must fit in one contiguous
	// piece of a 3 GiB address space (the file ceiling is then 288 MiB and
	// the map at most 512 MiB), and 64 GiB on 64-bit ones, a sanity limit.
	MaxBytesLimit int64 = maxBytesLimit32 + (maxBytesLimit64-maxBytesLimit32)*(strconv.IntSize/64)

	// RecordOverhead is what a record counts against Options.MaxBytes on
	// top of its payload: its 8-byte key and 16-byte leaf entry in the file.
	RecordOverhead = 24

	// ceilingSlack is added to twice MaxBytes for the file's hard ceiling.
	ceilingSlack = 32 << 20
)

// FullPolicy says what Append does when records would push the queue past
// Options.MaxBytes.
type FullPolicy int

const (
	// DropOldest deletes the oldest records, in the same transaction as the
	// append, until the new ones fit, and counts them in Stats.Dropped.
	DropOldest FullPolicy = iota
	// Reject fails the Append with ErrFull and stores nothing of it.
	Reject
)

func (p FullPolicy) String() string {
	switch p {
	case DropOldest:
		return "drop-oldest"
	case Reject:
		return "reject"
	}
	return "FullPolicy(" + strconv.Itoa(int(p)) + ")"
}

// Options configure a Store. The zero value of each field means its
// default; only Path is required. Open works on its own copy.
type Options struct {
	// Path of the bbolt file, created (mode 0600) if missing. Its directory
	// must exist. Open also uses Path+".compact" as a temporary file.
	Path string

	// MaxBytes bounds the queue: the sum over queued records of the payload
	// length plus RecordOverhead. Default DefaultMaxBytes (64 MiB), at most
	// MaxBytesLimit. The file itself is capped at 2×MaxBytes + 32 MiB: twice
	// because a payload just over a page fills two pages, plus room for
	// pages freed by a transaction and not yet reusable, and for the small
	// state.
	MaxBytes int64

	// OnFull is the policy when an append does not fit in MaxBytes. Default
	// DropOldest.
	OnFull FullPolicy

	// GroupMaxRecords bounds how many appended records the committer
	// gathers from several Append calls into one transaction. A single call
	// with more payloads is still committed whole, in one transaction.
	// Default 1000.
	GroupMaxRecords int

	// GroupMaxDelay bounds how long the committer waits for more writers
	// before committing a group. It waits only when the previous group had
	// several appending callers, so a lone writer never waits. Default
	// 10 ms.
	GroupMaxDelay time.Duration

	// OpenTimeout bounds how long Open waits for the file lock held by
	// another Store; then Open fails with ErrLocked. Default 5 s.
	OpenTimeout time.Duration

	// Logger receives compaction and drop notices. Nil discards them.
	Logger *slog.Logger
}

func (o *Options) fill() error {
	if o.Path == "" {
		return errors.New("store: Options.Path is required")
	}
	switch {
	case o.MaxBytes == 0:
		o.MaxBytes = DefaultMaxBytes
	case o.MaxBytes < 0:
		return fmt.Errorf("store: Options.MaxBytes is negative (%d)", o.MaxBytes)
	case o.MaxBytes > MaxBytesLimit:
		return fmt.Errorf("store: Options.MaxBytes %d is above %d, the limit on this %d-bit platform (bbolt maps the whole file into memory)",
			o.MaxBytes, MaxBytesLimit, strconv.IntSize)
	}
	if o.OnFull != DropOldest && o.OnFull != Reject {
		return fmt.Errorf("store: unknown Options.OnFull %v", o.OnFull)
	}
	switch {
	case o.GroupMaxRecords == 0:
		o.GroupMaxRecords = DefaultGroupMaxRecords
	case o.GroupMaxRecords < 0:
		return fmt.Errorf("store: Options.GroupMaxRecords is negative (%d)", o.GroupMaxRecords)
	}
	switch {
	case o.GroupMaxDelay == 0:
		o.GroupMaxDelay = DefaultGroupMaxDelay
	case o.GroupMaxDelay < 0:
		return fmt.Errorf("store: Options.GroupMaxDelay is negative (%v)", o.GroupMaxDelay)
	}
	switch {
	case o.OpenTimeout == 0:
		o.OpenTimeout = DefaultOpenTimeout
	case o.OpenTimeout < 0:
		return fmt.Errorf("store: Options.OpenTimeout is negative (%v)", o.OpenTimeout)
	}
	if o.Logger == nil {
		o.Logger = slog.New(slog.NewTextHandler(io.Discard, nil))
	}
	return nil
}

// ceiling is the hard limit on the file size handed to bbolt.
func (o *Options) ceiling() int {
	return int(2*o.MaxBytes + ceilingSlack)
}

// File layout. The queue bucket's bbolt sequence is the last sequence number
// assigned; the meta bucket holds the counters, written in the same
// transaction as the records they count, so they are exact after a crash
// and Open needs no scan.
var (
	bucketQueue = []byte("queue")
	bucketMeta  = []byte("meta")
	bucketState = []byte("state")

	metaVersion = []byte("version")
	metaDepth   = []byte("depth")
	metaBytes   = []byte("bytes")
	metaDropped = []byte("dropped")
)

const formatVersion = 1

// Store is an open store file. All methods are safe for concurrent use.
// Whoever calls Open must call Close, which stops the committer goroutine
// and releases the file lock.
type Store struct {
	opts  Options
	log   *slog.Logger
	db    *bbolt.DB
	file  *os.File // bbolt's own handle, for the file size
	hooks hooks

	ops       chan *op
	closing   chan struct{}
	closeOnce sync.Once
	closeErr  error
	wg        sync.WaitGroup

	mu      sync.RWMutex
	c       counters      // as of the last commit; written by the committer only
	commits uint64        // transactions committed since Open
	notify  chan struct{} // closed and replaced by each commit that appends

	warnedDrop bool // committer only

	// dbMu guards db and file against the swap of a compaction while
	// running: readers hold it shared; the committer, the only one that
	// swaps, reads them without it.
	dbMu             sync.RWMutex
	nextCompactCheck time.Time // committer only
	broken           error     // committer only: set when a compaction left no usable file
}

// hooks let tests observe the committer and interrupt a compaction. They
// are nil outside tests.
type hooks struct {
	// afterCommit is called by the committer after each committed group,
	// before the callers are answered, with the number of appended records
	// and of operations in it.
	afterCommit func(records, ops int)

	// compactStep is called after each step of a compaction ("created",
	// "copied", "synced", "renamed", "dir-synced"); an error fails the
	// compaction there.
	compactStep func(step string) error

	// compactEvery replaces compactCheckEvery.
	compactEvery time.Duration
}

// counters is the queue's accounting.
type counters struct {
	last    uint64 // last sequence number assigned
	depth   int64  // records queued
	bytes   int64  // payload bytes queued
	dropped uint64 // records dropped by DropOldest, lifetime
	oldest  uint64 // oldest queued sequence number, 0 when empty
}

// charged is what the queue counts against Options.MaxBytes.
func (c *counters) charged() int64 {
	return c.bytes + c.depth*RecordOverhead
}

// Stats describe the queue and the file.
type Stats struct {
	Depth     int64  // records queued
	Bytes     int64  // payload bytes queued (without RecordOverhead)
	Dropped   uint64 // records dropped by DropOldest over the file's life
	NextSeq   uint64 // sequence number of the next appended record
	OldestSeq uint64 // sequence number of the oldest queued record, 0 if none
	FileSize  int64  // size of the file on disk
	Commits   uint64 // write transactions committed since Open
}

// Open opens or creates the store file, compacting it first if it is over
// 4 MiB and more than twice its live data (see the package doc: a running
// store checks again from time to time), and starts the committer.
func Open(opts Options) (*Store, error) {
	return open(opts, hooks{})
}

func open(opts Options, h hooks) (*Store, error) {
	if err := opts.fill(); err != nil {
		return nil, err
	}
	// A temporary file left by a compaction that crashed before its rename
	// is garbage: the original was never touched.
	if err := os.Remove(compactPath(opts.Path)); err != nil && !errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("removing stale compaction file: %w", err)
	}
	db, file, err := openBolt(&opts)
	if err != nil {
		return nil, err
	}
	if db, file, err = maybeCompact(&opts, db, file, h); err != nil {
		return nil, err
	}
	c, err := initFile(db)
	if err != nil {
		db.Close()
		return nil, fmt.Errorf("opening store %s: %w", opts.Path, err)
	}
	s := &Store{
		opts:    opts,
		log:     opts.Logger,
		db:      db,
		file:    file,
		hooks:   h,
		ops:     make(chan *op),
		closing: make(chan struct{}),
		c:       c,
		notify:  make(chan struct{}),
		// Open has just checked.
		nextCompactCheck: time.Now().Add(compactCheckEvery),
	}
	if h.compactEvery != 0 {
		s.nextCompactCheck = time.Now().Add(h.compactEvery)
	}
	s.wg.Add(1)
	go s.run()
	return s, nil
}

// openBolt opens and locks the file at opts.Path. It returns bbolt's file
// handle too, which Stats and the lock check below need.
func openBolt(opts *Options) (*bbolt.DB, *os.File, error) {
	// Another process's compaction may rename a new file over the path
	// while we wait for the lock on the old one; then the lock we get is on
	// a file nobody will open again, and we try once more.
	for range 3 {
		var file *os.File
		db, err := bbolt.Open(opts.Path, 0o600, &bbolt.Options{
			Timeout:        opts.OpenTimeout,
			NoFreelistSync: true,
			FreelistType:   bbolt.FreelistMapType,
			MaxSize:        opts.ceiling(),
			OpenFile: func(name string, flag int, perm os.FileMode) (*os.File, error) {
				f, err := os.OpenFile(name, flag, perm)
				file = f
				return f, err
			},
		})
		if errors.Is(err, berrors.ErrTimeout) {
			return nil, nil, fmt.Errorf("opening store %s (waited %v): %w", opts.Path, opts.OpenTimeout, ErrLocked)
		}
		if err != nil {
			return nil, nil, fmt.Errorf("opening store %s: %w", opts.Path, err)
		}
		locked, err := file.Stat()
		if err != nil {
			db.Close()
			return nil, nil, fmt.Errorf("opening store %s: %w", opts.Path, err)
		}
		named, err := os.Stat(opts.Path)
		if err == nil && os.SameFile(locked, named) {
			return db, file, nil
		}
		db.Close()
	}
	return nil, nil, fmt.Errorf("opening store %s: file keeps being replaced while opening", opts.Path)
}

// initFile creates the buckets of a new file, checks the format of an
// existing one and loads the counters.
func initFile(db *bbolt.DB) (counters, error) {
	var c counters
	tx, err := db.Begin(true)
	if err != nil {
		return c, err
	}
	defer tx.Rollback()
	meta := tx.Bucket(bucketMeta)
	if meta == nil {
		empty := true
		tx.ForEach(func([]byte, *bbolt.Bucket) error { empty = false; return nil })
		if !empty {
			return c, ErrFormat
		}
		for _, name := range [][]byte{bucketMeta, bucketQueue, bucketState} {
			if _, err := tx.CreateBucket(name); err != nil {
				return c, err
			}
		}
		meta = tx.Bucket(bucketMeta)
		if err := meta.Put(metaVersion, u64(formatVersion)); err != nil {
			return c, err
		}
		if err := tx.Commit(); err != nil {
			return c, withENOSPC(err)
		}
		return c, nil
	}
	q := tx.Bucket(bucketQueue)
	if q == nil || tx.Bucket(bucketState) == nil {
		return c, ErrFormat
	}
	if v := getU64(meta, metaVersion); v != formatVersion {
		return c, fmt.Errorf("file format version %d, want %d: %w", v, formatVersion, ErrFormat)
	}
	c.last = q.Sequence()
	c.depth = int64(getU64(meta, metaDepth))
	c.bytes = int64(getU64(meta, metaBytes))
	c.dropped = getU64(meta, metaDropped)
	if k, _ := q.Cursor().First(); k != nil {
		c.oldest = binary.BigEndian.Uint64(k)
	}
	return c, nil
}

// Close waits for the writes already handed to the committer, stops it and
// closes the file. Methods called later return ErrClosed. Calls after the
// first return the first call's result.
func (s *Store) Close() error {
	s.closeOnce.Do(func() {
		close(s.closing)
		s.wg.Wait()
		s.dbMu.RLock()
		db := s.db
		s.dbMu.RUnlock()
		if err := db.Close(); err != nil {
			s.closeErr = fmt.Errorf("closing store %s: %w", s.opts.Path, err)
		}
	})
	return s.closeErr
}

// Stats returns the queue's counters as of the last commit.
func (s *Store) Stats() Stats {
	s.mu.RLock()
	c, commits := s.c, s.commits
	s.mu.RUnlock()
	st := Stats{
		Depth:     c.depth,
		Bytes:     c.bytes,
		Dropped:   c.dropped,
		NextSeq:   c.last + 1,
		OldestSeq: c.oldest,
		Commits:   commits,
	}
	s.dbMu.RLock()
	if fi, err := s.file.Stat(); err == nil {
		st.FileSize = fi.Size()
	}
	s.dbMu.RUnlock()
	return st
}

// view runs fn in a read transaction, reporting a closed store as ErrClosed.
func (s *Store) view(fn func(*bbolt.Tx) error) error {
	select {
	case <-s.closing:
		return ErrClosed
	default:
	}
	s.dbMu.RLock()
	err := s.db.View(fn)
	s.dbMu.RUnlock()
	if errors.Is(err, berrors.ErrDatabaseNotOpen) {
		return ErrClosed
	}
	return err
}

func u64(v uint64) []byte {
	return binary.BigEndian.AppendUint64(make([]byte, 0, 8), v)
}

func getU64(b *bbolt.Bucket, key []byte) uint64 {
	v := b.Get(key)
	if len(v) != 8 {
		return 0
	}
	return binary.BigEndian.Uint64(v)
}
