package store

import (
	"fmt"
	"os"
	"path/filepath"
	"time"

	"go.etcd.io/bbolt"
)

const (
	// A file is compacted (at Open, and while running) when it is larger
	// than compactMinSize and its pages in use are more than compactRatio
	// times its live pages. Below the size the space
	// is not worth a rewrite of the flash; the ratio makes a file that is
	// compacted need as much again freed before the next compaction, so a
	// restart loop cannot rewrite the file on every start.
	compactMinSize = 4 << 20
	compactRatio   = 2

	// compactTxMaxSize bounds the memory a compaction holds in dirty pages
	// before it commits a part.
	compactTxMaxSize = 8 << 20

	// compactCheckEvery is how often the committer of a running store
	// checks, after a commit, whether the file is due for compaction: the
	// queue grows during an outage and drains when the link returns, and a
	// gateway may run for months without the restart that compacts at
	// Open.
	compactCheckEvery = 10 * time.Minute
)

// compactionDue reports the file's size and live bytes, and whether it is
// over compactMinSize with more than compactRatio times its live data in
// use.
func compactionDue(db *bbolt.DB, file *os.File) (size, live int64, due bool, err error) {
	fi, err := file.Stat()
	if err != nil {
		return 0, 0, false, err
	}
	size = fi.Size()
	if size <= compactMinSize {
		return size, 0, false, nil
	}
	var used int64
	db.View(func(tx *bbolt.Tx) error {
		used = tx.Size()
		return nil
	})
	// The freelist is rebuilt when the file is opened for writing and kept
	// in memory after, so this counts every free page below the high water
	// mark; the file beyond the mark is preallocated and unused. Pending
	// pages are freed ones that readers older than their release may still
	// see: free as far as live data goes.
	st := db.Stats()
	live = used - int64(st.FreePageN+st.PendingPageN)*int64(db.Info().PageSize)
	// Compared with the pages in use, not the file size: bbolt grows the
	// file ahead of its use, and a growing queue must not look free.
	return size, live, used > compactRatio*live, nil
}

func compactPath(path string) string {
	return path + ".compact"
}

// maybeCompact compacts the open file if it is mostly free space and
// returns the database to use from now on. A compaction that fails before
// it replaced the file is logged and the old file used; one that fails
// after fails Open.
func maybeCompact(opts *Options, db *bbolt.DB, file *os.File, h hooks) (*bbolt.DB, *os.File, error) {
	size, live, due, err := compactionDue(db, file)
	if err != nil {
		db.Close()
		return nil, nil, fmt.Errorf("opening store %s: %w", opts.Path, err)
	}
	if !due {
		return db, file, nil
	}
	start := time.Now()
	ndb, nfile, renamed, err := compact(opts, db, h)
	if err != nil {
		if renamed {
			db.Close()
			return nil, nil, fmt.Errorf("opening compacted store %s: %w", opts.Path, err)
		}
		opts.Logger.Warn("store compaction failed, using the file as it is",
			"path", opts.Path, "size", size, "live", live, "err", err)
		return db, file, nil
	}
	db.Close() // the old, now unlinked file: releases its lock and space
	logCompacted(opts, nfile, size, live, start)
	return ndb, nfile, nil
}

func logCompacted(opts *Options, file *os.File, size, live int64, start time.Time) {
	var after int64
	if fi, err := file.Stat(); err == nil {
		after = fi.Size()
	}
	opts.Logger.Info("store compacted", "path", opts.Path, "size_before", size, "size_after", after,
		"live", live, "took", time.Since(start))
}

// compactLive is maybeCompact for a running store, called by the
// committer between transactions (so nothing writes during the copy;
// readers go on, and wait only for the swap). If the new file is in place
// but cannot be opened, the store stops taking writes rather than write
// into the old, unlinked one.
func (s *Store) compactLive() {
	now := time.Now()
	if now.Before(s.nextCompactCheck) || s.broken != nil {
		return
	}
	select {
	case <-s.closing: // not worth delaying Close for
		return
	default:
	}
	every := compactCheckEvery
	if s.hooks.compactEvery != 0 {
		every = s.hooks.compactEvery
	}
	s.nextCompactCheck = now.Add(every)
	size, live, due, err := compactionDue(s.db, s.file)
	if err != nil || !due {
		return
	}
	ndb, nfile, renamed, err := compact(&s.opts, s.db, s.hooks)
	if err != nil {
		if renamed {
			// The old file is unlinked: writing on into it would lose
			// everything at the next start. Writes fail until the new
			// file opens (reopen, tried at each write).
			s.broken = fmt.Errorf("store %s was compacted but the new file cannot be opened yet: %w", s.opts.Path, err)
			s.log.Error("store compaction", "err", s.broken)
			return
		}
		s.log.Warn("store compaction failed, using the file as it is",
			"path", s.opts.Path, "size", size, "live", live, "err", err)
		return
	}
	s.dbMu.Lock()
	old := s.db
	s.db, s.file = ndb, nfile
	s.dbMu.Unlock()
	old.Close()
	logCompacted(&s.opts, nfile, size, live, now)
}

// compact copies src into a temporary file, makes it durable and renames it
// over opts.Path, then opens it. src stays open, and its lock held, until
// the caller closes it; the renamed file is unlocked until it is opened,
// so another process opening the path in that instant (iotagent status)
// holds it first and the open here waits up to OpenTimeout for it.
//
// A crash before the rename leaves the original and a temporary file that
// Open deletes; after it, the new file, complete since it was fsynced first.
// The directory fsync makes the rename itself survive a power cut.
func compact(opts *Options, src *bbolt.DB, h hooks) (db *bbolt.DB, file *os.File, renamed bool, err error) {
	at := func(step string) error {
		if h.compactStep == nil {
			return nil
		}
		return h.compactStep(step)
	}
	tmp := compactPath(opts.Path)
	dst, err := bbolt.Open(tmp, 0o600, &bbolt.Options{
		Timeout:        opts.OpenTimeout,
		NoSync:         true, // one fsync at the end instead of one per part
		NoGrowSync:     true,
		NoFreelistSync: true,
		FreelistType:   bbolt.FreelistMapType,
	})
	if err != nil {
		return nil, nil, false, fmt.Errorf("creating %s: %w", tmp, err)
	}
	err = at("created")
	if err == nil {
		err = bbolt.Compact(dst, src, compactTxMaxSize)
	}
	if cerr := dst.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = at("copied")
	}
	if err == nil {
		err = syncFile(tmp)
	}
	if err == nil {
		err = at("synced")
	}
	if err == nil {
		err = os.Rename(tmp, opts.Path)
	}
	if err != nil {
		os.Remove(tmp)
		return nil, nil, false, withENOSPC(err)
	}
	if err := at("renamed"); err != nil {
		return nil, nil, true, err
	}
	if err := syncDir(filepath.Dir(opts.Path)); err != nil {
		return nil, nil, true, err
	}
	if err := at("dir-synced"); err != nil {
		return nil, nil, true, err
	}
	db, file, err = openBolt(opts)
	return db, file, true, err
}

func syncFile(path string) error {
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	if err := f.Sync(); err != nil {
		return fmt.Errorf("fsync %s: %w", path, err)
	}
	return nil
}

func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	if err := d.Sync(); err != nil {
		return fmt.Errorf("fsync directory %s: %w", dir, err)
	}
	return nil
}

// reopen opens the compacted file after a compaction whose own open
// failed, and swaps it in; the committer calls it before each write while
// the store is broken.
func (s *Store) reopen() error {
	// The rename may not be durable yet (the failure may have been its
	// directory fsync).
	if err := syncDir(filepath.Dir(s.opts.Path)); err != nil {
		return fmt.Errorf("%w (still: %v)", s.broken, err)
	}
	db, file, err := openBolt(&s.opts)
	if err != nil {
		return fmt.Errorf("%w (still: %v)", s.broken, err)
	}
	// Only the compacted file will do: not an empty one bbolt made
	// because something removed it.
	if err := db.View(func(tx *bbolt.Tx) error {
		for _, b := range [][]byte{bucketMeta, bucketQueue, bucketState} {
			if tx.Bucket(b) == nil {
				return fmt.Errorf("%s has no %s bucket: %w", s.opts.Path, b, ErrFormat)
			}
		}
		return nil
	}); err != nil {
		db.Close()
		return fmt.Errorf("%w (still: %v)", s.broken, err)
	}
	s.dbMu.Lock()
	old := s.db
	s.db, s.file = db, file
	s.dbMu.Unlock()
	old.Close()
	s.broken = nil
	s.log.Info("store reopened after compaction", "path", s.opts.Path)
	return nil
}
