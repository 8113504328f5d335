// Package firmware is the agent's side of signed over-the-air updates:
// resumable downloads checked against signed release metadata
// (firmware/release), and, as it grows, the A/B slots with health-checked
// commit and rollback and the TPM anti-rollback counter.
package firmware

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"hash"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"syscall"

	"iotagent.dev/iotagent/internal/atomicfile"
)

// Download errors.
var (
	// ErrDigest: the payload's SHA-256 is not the signed one (tampered,
	// or the wrong file): the partial download is discarded.
	ErrDigest = errors.New("firmware: payload does not match its signed SHA-256")
	// ErrLength: the server sent more than the signed length, or a
	// Content-Range that does not fit it.
	ErrLength = errors.New("firmware: payload length does not match its signed length")
	// ErrNoSpace: the file system lacks room for the rest of the payload
	// and the margin.
	ErrNoSpace = errors.New("firmware: not enough free space")
)

// Target is what a download must produce: the signed length and
// SHA-256 (release.Manifest's).
type Target struct {
	Length int64
	SHA256 []byte
}

// Downloader fetches payloads to files, resuming across restarts. The
// zero value is not usable; the fields are set before the first Fetch
// and not changed afterwards.
type Downloader struct {
	// Client fetches (the station's mutual-TLS client).
	Client *http.Client
	// Margin is the free space kept beyond the payload (default 1 MiB).
	Margin int64
	// SaveEvery is how many bytes are written between saved resume
	// points (default 1 MiB): what a crash costs at most.
	SaveEvery int64
}

// resume is the saved state of a partial download (PATH.part.json):
// how far the data in PATH.part is sound, and the hash state there, so
// that a resume does not read the part file again.
type resume struct {
	URL    string `json:"url"`
	Length int64  `json:"length"`
	SHA256 []byte `json:"sha256"`
	Offset int64  `json:"offset"`
	Hash   []byte `json:"hash_state"`
}

// Fetch downloads url to path: into path.part, resuming from the last
// saved point of an earlier attempt for the same target, with Range
// requests (only a 206 with the matching Content-Range continues; a 200
// starts over). It reads at most the signed length (a byte more is an
// error), never holds the payload in memory, and renames the part file
// to path only once its SHA-256 is the signed one. An interrupted Fetch
// returns the error and leaves what it got for the next one.
func (d *Downloader) Fetch(ctx context.Context, url, path string, want Target) error {
	if want.Length <= 0 || len(want.SHA256) != sha256.Size {
		return fmt.Errorf("firmware: target of length %d and a %d-byte digest", want.Length, len(want.SHA256))
	}
	margin := d.Margin
	if margin == 0 {
		margin = 1 << 20
	}
	every := d.SaveEvery
	if every <= 0 {
		every = 1 << 20
	}
	part, statePath := path+".part", path+".part.json"
	st, h := d.load(part, statePath, url, want)
	if st.Offset == 0 {
		// A state left from another attempt must not outlive the data it
		// described: gone before the part file is touched.
		if err := atomicfile.Remove(statePath); err != nil && !errors.Is(err, os.ErrNotExist) {
			return fmt.Errorf("firmware: %w", err)
		}
	}
	f, err := os.OpenFile(part, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return fmt.Errorf("firmware: %w", err)
	}
	defer f.Close()
	if st.Offset == want.Length { // complete before a crash: finish here
		return d.finish(f, part, statePath, path, url, h, want)
	}
	// What lies past the saved point was not saved with its hash state.
	if err := f.Truncate(st.Offset); err != nil {
		return fmt.Errorf("firmware: %w", err)
	}
	if err := freeSpace(path, want.Length-st.Offset+margin); err != nil {
		return err
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return fmt.Errorf("firmware: %w", err)
	}
	if st.Offset > 0 {
		req.Header.Set("Range", fmt.Sprintf("bytes=%d-", st.Offset))
	}
	resp, err := d.Client.Do(req)
	if err != nil {
		return fmt.Errorf("firmware: fetching %s: %w", url, err)
	}
	defer resp.Body.Close()
	switch {
	case resp.StatusCode == http.StatusPartialContent && st.Offset > 0:
		if err := checkContentRange(resp.Header.Get("Content-Range"), st.Offset, want.Length); err != nil {
			return err
		}
	case resp.StatusCode == http.StatusOK:
		if st.Offset > 0 { // the server ignored the range: start over
			if err := atomicfile.Remove(statePath); err != nil {
				return fmt.Errorf("firmware: %w", err)
			}
			st.Offset, h = 0, sha256.New()
			if err := f.Truncate(0); err != nil {
				return fmt.Errorf("firmware: %w", err)
			}
		}
	case resp.StatusCode == http.StatusRequestedRangeNotSatisfiable:
		// The saved state no longer fits what is served: start over next
		// time.
		d.discard(part, statePath)
		return fmt.Errorf("firmware: %s: the server refused the resume at byte %d; starting over at the next attempt", url, st.Offset)
	default:
		return fmt.Errorf("firmware: fetching %s: %s", url, resp.Status)
	}
	// A body of a stated length that does not end at the signed length
	// (the served file is truncated or overlong) is refused before it is
	// read: fetching or resuming it again would get the same file.
	if resp.ContentLength >= 0 && resp.ContentLength != want.Length-st.Offset {
		d.discard(part, statePath)
		return fmt.Errorf("%w: %s serves %d bytes from byte %d, the signed length is %d", ErrLength, url, resp.ContentLength, st.Offset, want.Length)
	}
	if _, err := f.Seek(st.Offset, io.SeekStart); err != nil {
		return fmt.Errorf("firmware: %w", err)
	}
	// One byte past the signed length tells an overlong body.
	body := io.LimitReader(resp.Body, want.Length-st.Offset+1)
	buf := make([]byte, 32<<10)
	unsaved := int64(0)
	for {
		n, rerr := body.Read(buf)
		if n > 0 {
			if st.Offset+int64(n) > want.Length {
				d.discard(part, statePath)
				return fmt.Errorf("%w: %s sent more than %d bytes", ErrLength, url, want.Length)
			}
			if _, err := f.Write(buf[:n]); err != nil {
				return fmt.Errorf("firmware: %w", err)
			}
			h.Write(buf[:n])
			st.Offset += int64(n)
			if unsaved += int64(n); unsaved >= every {
				if err := d.save(f, statePath, st, h); err != nil {
					return err
				}
				unsaved = 0
			}
		}
		if rerr == io.EOF {
			break
		}
		if rerr != nil {
			// Keep what was received for the next attempt.
			if err := d.save(f, statePath, st, h); err != nil {
				return errors.Join(fmt.Errorf("firmware: fetching %s: %w", url, rerr), err)
			}
			return fmt.Errorf("firmware: fetching %s at byte %d of %d: %w", url, st.Offset, want.Length, rerr)
		}
	}
	if st.Offset != want.Length {
		if err := d.save(f, statePath, st, h); err != nil {
			return err
		}
		return fmt.Errorf("firmware: %s ended at byte %d of %d; the next attempt resumes", url, st.Offset, want.Length)
	}
	return d.finish(f, part, statePath, path, url, h, want)
}

// finish checks the complete part file's digest and puts it in place;
// the resume state goes first, so that no state outlives its data.
func (d *Downloader) finish(f *os.File, part, statePath, path, url string, h hash.Hash, want Target) error {
	if !bytes.Equal(h.Sum(nil), want.SHA256) {
		d.discard(part, statePath)
		return fmt.Errorf("%w: %s", ErrDigest, url)
	}
	if err := f.Sync(); err != nil {
		return fmt.Errorf("firmware: %w", err)
	}
	if err := atomicfile.Remove(statePath); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("firmware: %w", err)
	}
	if err := os.Rename(part, path); err != nil {
		return fmt.Errorf("firmware: %w", err)
	}
	return atomicfile.SyncDir(filepath.Dir(path))
}

// load returns the saved resume point for url and want, or a fresh one.
// A point is kept only if the part file holds at least its bytes and the
// hash state covers exactly them.
func (d *Downloader) load(part, statePath, url string, want Target) (resume, hash.Hash) {
	fresh := resume{URL: url, Length: want.Length, SHA256: want.SHA256}
	b, err := os.ReadFile(statePath)
	if err != nil || len(b) > 4096 {
		return fresh, sha256.New()
	}
	var st resume
	if json.Unmarshal(b, &st) != nil || st.URL != url || st.Length != want.Length || !bytes.Equal(st.SHA256, want.SHA256) ||
		st.Offset < 0 || st.Offset > want.Length {
		return fresh, sha256.New()
	}
	h := sha256.New()
	if h.(encoding.BinaryUnmarshaler).UnmarshalBinary(st.Hash) != nil {
		return fresh, sha256.New()
	}
	// sha256's state ends with the length it hashed, big-endian.
	if len(st.Hash) < 8 || int64(binary.BigEndian.Uint64(st.Hash[len(st.Hash)-8:])) != st.Offset {
		return fresh, sha256.New()
	}
	if fi, err := os.Stat(part); err != nil || fi.Size() < st.Offset {
		return fresh, sha256.New()
	}
	return st, h
}

// save makes the data up to st.Offset durable, then the resume point.
func (d *Downloader) save(f *os.File, statePath string, st resume, h hash.Hash) error {
	if err := f.Sync(); err != nil {
		return fmt.Errorf("firmware: %w", err)
	}
	hs, err := h.(encoding.BinaryMarshaler).MarshalBinary()
	if err != nil {
		return fmt.Errorf("firmware: %w", err)
	}
	st.Hash = hs
	b, err := json.Marshal(st)
	if err != nil {
		return err
	}
	return atomicfile.Write(statePath, b, 0o600)
}

// Discard removes what a Fetch to path left of a partial download (its
// part file and resume point), as when the release is refused for good.
func (d *Downloader) Discard(path string) {
	d.discard(path+".part", path+".part.json")
}

func (d *Downloader) discard(part, statePath string) {
	atomicfile.Remove(statePath)
	atomicfile.Remove(part)
}

// checkContentRange wants "bytes OFFSET-(LENGTH-1)/LENGTH".
func checkContentRange(cr string, offset, length int64) error {
	want := fmt.Sprintf("bytes %d-%d/%d", offset, length-1, length)
	if cr != want {
		return fmt.Errorf("%w: Content-Range %q, want %q", ErrLength, cr, want)
	}
	return nil
}

// freeSpace checks the file system of path has need bytes available.
func freeSpace(path string, need int64) error {
	var fs syscall.Statfs_t
	if err := syscall.Statfs(filepath.Dir(path), &fs); err != nil {
		return fmt.Errorf("firmware: %w", err)
	}
	unit := int64(fs.Frsize)
	if unit <= 0 {
		unit = int64(fs.Bsize)
	}
	if avail := int64(fs.Bavail) * unit; avail < need {
		return fmt.Errorf("%w: %s has %d bytes free, the download needs %d (the rest of the payload and the margin)", ErrNoSpace, filepath.Dir(path), avail, need)
	}
	return nil
}
