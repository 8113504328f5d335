package store

import (
	"errors"
	"strings"
	"syscall"
)

// Errors returned by this package, matched with errors.Is.
var (
	// ErrFull is returned by Append with the Reject policy when the records
	// would push the queue past Options.MaxBytes. Nothing of that call is
	// stored.
	ErrFull = errors.New("store: queue full")

	// ErrTooLarge is returned by Append when a payload, or the payloads of
	// one call together, count more than Options.MaxBytes and so could never
	// fit. Nothing of that call is stored.
	ErrTooLarge = errors.New("store: records larger than the queue bound")

	// ErrClosed is returned by every method called after, or interrupted by,
	// Close.
	ErrClosed = errors.New("store: closed")

	// ErrLocked is returned by Open when another Store, in this process or
	// another, holds the file and did not release it within
	// Options.OpenTimeout.
	ErrLocked = errors.New("store: file is locked by another process or Store")

	// ErrNotFound is returned by Get when the key has no value.
	ErrNotFound = errors.New("store: key not found")

	// ErrFormat is returned by Open when the file is a bbolt file that this
	// package did not write, or was written by a newer, incompatible version
	// of it.
	ErrFormat = errors.New("store: not a store file or incompatible version")
)

// errnoText restores errors.Is matching for an errno that bbolt formatted
// into a message with %s (as its file-growth path does), keeping the message.
type errnoText struct {
	msg   string
	errno syscall.Errno
}

func (e errnoText) Error() string { return e.msg }
func (e errnoText) Unwrap() error { return e.errno }

// withENOSPC makes a disk-full error from bbolt match syscall.ENOSPC even
// when bbolt dropped the wrapping.
func withENOSPC(err error) error {
	if err == nil || errors.Is(err, syscall.ENOSPC) {
		return err
	}
	if strings.Contains(err.Error(), syscall.ENOSPC.Error()) {
		return errnoText{msg: err.Error(), errno: syscall.ENOSPC}
	}
	return err
}
