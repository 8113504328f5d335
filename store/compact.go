package store

import (
	"fmt"
	"os"
	"path/filepath"
	"time"

	"go.etcd.io/bbolt"
)

const (
	// A file is compacted at Open when it is larger than compactMinSize and
	// more than compactRatio times its live pages. Below the size the space
	// is not worth a rewrite of the flash; the ratio makes a file that is
	// compacted need as much again freed before the next compaction, so a
	// restart loop cannot rewrite the file on every start.
	compactMinSize = 4 << 20
	compactRatio   = 2

	// compactTxMaxSize bounds the memory a compaction holds in dirty pages
	// before it commits a part.
	compactTxMaxSize = 8 << 20
)

func compactPath(path string) string {
	return path + ".compact"
}

// maybeCompact compacts the open file if it is mostly free space and
// returns the database to use from now on. A compaction that fails before
// it replaced the file is logged and the old file used; one that fails
// after fails Open.
func maybeCompact(opts *Options, db *bbolt.DB, file *os.File, h hooks) (*bbolt.DB, *os.File, error) {
	fi, err := file.Stat()
	if err != nil {
		db.Close()
		return nil, nil, fmt.Errorf("opening store %s: %w", opts.Path, err)
	}
	size := fi.Size()
	if size <= compactMinSize {
		return db, file, nil
	}
	var used int64
	db.View(func(tx *bbolt.Tx) error {
		used = tx.Size()
		return nil
	})
	// The freelist is rebuilt when the file is opened for writing, so this
	// counts every free page below the high water mark; the file beyond the
	// mark is preallocated and unused.
	live := used - int64(db.Stats().FreePageN)*int64(db.Info().PageSize)
	if size <= compactRatio*live {
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
	var after int64
	if fi, err := nfile.Stat(); err == nil {
		after = fi.Size()
	}
	opts.Logger.Info("store compacted", "path", opts.Path, "size_before", size, "size_after", after,
		"live", live, "took", time.Since(start))
	return ndb, nfile, nil
}

// compact copies src into a temporary file, makes it durable and renames it
// over opts.Path, then opens it. src stays open, and its lock held, until
// the caller closes it, so no other Store opens the path in between.
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
