// Package statedir names the agent's state directory and everything in
// it: the one place that knows its file names, creates it with its mode,
// and holds the lock that makes one process its owner. The packages that
// write these files (enroll, store, tpm's sealed secrets) are handed
// paths from here.
//
// The directory is 0700 and every file in it 0600, each replaced
// atomically (temp file, fsync, rename, fsync of the directory):
//
//	device-key.json       the device key's wrapped blobs (only this TPM loads them)
//	device-key.next.json  a rotated key waiting for its certificate
//	cert.pem              the device certificate, then the issuing chain
//	trust.pem             the station's CA certificates (from /cacerts)
//	enrollment.json       how the device enrolled: station, device ID, method
//	renewal.json          what the renewer last did (iotagent status)
//	clock.json            the last trusted time (the clock floor)
//	queue.db              the telemetry queue and small agent state (bbolt)
//	session-key.json      the TPM-sealed key that seals the DTLS session
//	agent.lock            flock(2)ed by its owner, holding the owner's PID
//	firmware/             updates: state.json and slots/{a,b}/iotagent
//	                      (package firmware), keylist.json (the trusted
//	                      key list), download/ (payloads being fetched),
//	                      request.json and answer.json (iotagent firmware
//	                      commands handed to the running agent)
//
// The runtime directory (the ingest socket and the status file, on tmpfs)
// is not state: it is beside the socket, see package agent.
package statedir

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"iotagent.dev/iotagent/internal/atomicfile"
)

// Default is the state directory of a packaged agent.
const Default Dir = "/var/lib/iotagent"

// Dir is a state directory's path.
type Dir string

func (d Dir) file(name string) string { return filepath.Join(string(d), name) }

// The files of the state directory (see the package doc).
func (d Dir) DeviceKey() string     { return d.file("device-key.json") }
func (d Dir) NextDeviceKey() string { return d.file("device-key.next.json") }
func (d Dir) Certificate() string   { return d.file("cert.pem") }
func (d Dir) Trust() string         { return d.file("trust.pem") }
func (d Dir) Enrollment() string    { return d.file("enrollment.json") }
func (d Dir) RenewalStatus() string { return d.file("renewal.json") }
func (d Dir) Clock() string         { return d.file("clock.json") }
func (d Dir) Queue() string         { return d.file("queue.db") }
func (d Dir) SessionKey() string    { return d.file("session-key.json") }
func (d Dir) LockFile() string      { return d.file("agent.lock") }
func (d Dir) Firmware() string      { return d.file("firmware") }

// Create makes the directory (and its parents) with mode 0700 if it does
// not exist, and checks that it is a directory.
func (d Dir) Create() error {
	if err := atomicfile.MkdirPrivate(string(d)); err != nil {
		return fmt.Errorf("state dir %s: %w", d, pathErr(err))
	}
	return nil
}

// Lock is the state directory's lock, held until Close.
type Lock struct{ f *os.File }

// Close releases the lock.
func (l *Lock) Close() error { return l.f.Close() }

// LockedError is returned by Lock when another process owns the state
// directory.
type LockedError struct {
	// PID is the owner's process ID as its lock file says; 0 if unknown.
	PID int
}

func (e *LockedError) Error() string {
	if e.PID == 0 {
		return "another iotagent is using the state dir"
	}
	return fmt.Sprintf("another iotagent (pid %d) is using the state dir", e.PID)
}

// Lock takes the directory's lock (flock, not waiting) and writes this
// process's PID into it, so that another command can find the owner (to
// signal it). A directory locked by another process is a *LockedError.
func (d Dir) Lock() (*Lock, error) {
	f, err := os.OpenFile(d.LockFile(), os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("state dir %s: %w", d, pathErr(err))
	}
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err != nil {
		b, _ := os.ReadFile(f.Name())
		f.Close()
		pid, _ := strconv.Atoi(strings.TrimSpace(string(b)))
		return nil, &LockedError{PID: max(pid, 0)}
	}
	f.Truncate(0)
	f.WriteAt([]byte(strconv.Itoa(os.Getpid())+"\n"), 0)
	return &Lock{f: f}, nil
}

// LockWait is Lock, waiting up to wait while another process holds
// the lock: a command that holds it for a moment (iotagent firmware
// apply with no agent running, say) must not make a starting agent fail.
func (d Dir) LockWait(wait time.Duration) (*Lock, error) {
	deadline := time.Now().Add(wait)
	for {
		l, err := d.Lock()
		var le *LockedError
		if !errors.As(err, &le) || time.Now().After(deadline) {
			return l, err
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// pathErr drops the path an *os.PathError repeats: the caller names it.
func pathErr(err error) error {
	var pe *os.PathError
	if errors.As(err, &pe) {
		return pe.Err
	}
	return err
}
