package collector

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"math/bits"
	"os"
	"time"

	"iotagent.dev/iotagent/internal/atomicfile"
)

// The de-duplication file (Config.DedupeFile) keeps the windows across
// collector restarts. Layout, big-endian:
//
//	magic    16 bytes  "iotagent-dedupe" 0x01
//	width    uint64    the bitmap width the windows were kept with
//	count    uint32    windows that follow, most recently active first
//	window:  uint16 length + device ID, uint64 watermark, uint8 0 or 1,
//	         then, after a 1, width/64 uint64 bitmap words
//	crc      uint32    CRC-32 (IEEE) of everything before it
//
// A window is restored with the width configured now: its watermark as
// saved, then each number set in its bitmap marked as if written again, so
// a changed Config.DedupeWindow applies the usual rules (see the package
// doc) and nothing else changes meaning.
var dedupeMagic = []byte("iotagent-dedupe\x01")

// maxDedupeWidth bounds a saved width so that a damaged header cannot make
// the loader allocate without limit.
const maxDedupeWidth = 1 << 24

// savedWindow is a window copied out for saving.
type savedWindow struct {
	device string
	low    uint64
	bits   []uint64
}

// snapshot copies every window, most recently active first. Windows are
// copied one at a time under their own lock, never while holding d.mu: a
// window stays locked for a whole sink write.
func (d *dedupe) snapshot() []savedWindow {
	d.mu.Lock()
	ws := make([]*seqWindow, 0, d.lru.Len())
	for e := d.lru.Front(); e != nil; e = e.Next() {
		ws = append(ws, e.Value.(*seqWindow))
	}
	d.mu.Unlock()
	out := make([]savedWindow, 0, len(ws))
	for _, w := range ws {
		w.mu.Lock()
		s := savedWindow{device: w.device, low: w.low}
		if w.bits != nil {
			s.bits = append([]uint64(nil), w.bits...)
		}
		w.mu.Unlock()
		if s.low == 0 && s.bits == nil {
			continue // reset and not written since: nothing to remember
		}
		out = append(out, s)
	}
	return out
}

// encodeDedupe writes windows in the file layout.
func encodeDedupe(width uint64, ws []savedWindow) []byte {
	var b bytes.Buffer
	b.Write(dedupeMagic)
	b.Write(binary.BigEndian.AppendUint64(nil, width))
	b.Write(binary.BigEndian.AppendUint32(nil, uint32(len(ws))))
	for _, w := range ws {
		b.Write(binary.BigEndian.AppendUint16(nil, uint16(len(w.device))))
		b.WriteString(w.device)
		b.Write(binary.BigEndian.AppendUint64(nil, w.low))
		if w.bits == nil {
			b.WriteByte(0)
			continue
		}
		b.WriteByte(1)
		for _, word := range w.bits {
			b.Write(binary.BigEndian.AppendUint64(nil, word))
		}
	}
	b.Write(binary.BigEndian.AppendUint32(nil, crc32.ChecksumIEEE(b.Bytes())))
	return b.Bytes()
}

// decodeDedupe reads the file layout, checking it whole before returning
// anything.
func decodeDedupe(data []byte) (width uint64, ws []savedWindow, err error) {
	if len(data) < len(dedupeMagic)+8+4+4 || !bytes.Equal(data[:len(dedupeMagic)], dedupeMagic) {
		return 0, nil, errors.New("not a de-duplication file of this version")
	}
	body, sum := data[:len(data)-4], binary.BigEndian.Uint32(data[len(data)-4:])
	if crc32.ChecksumIEEE(body) != sum {
		return 0, nil, errors.New("checksum mismatch: the file is damaged")
	}
	r := bytes.NewReader(body[len(dedupeMagic):])
	var hdr struct {
		Width uint64
		Count uint32
	}
	if err := binary.Read(r, binary.BigEndian, &hdr); err != nil {
		return 0, nil, fmt.Errorf("header: %w", err)
	}
	if hdr.Width == 0 || hdr.Width%64 != 0 || hdr.Width > maxDedupeWidth {
		return 0, nil, fmt.Errorf("window width %d is not a multiple of 64 up to %d", hdr.Width, maxDedupeWidth)
	}
	// Every window takes at least 11 bytes: a count beyond that is damage.
	if uint64(hdr.Count) > uint64(r.Len())/11 {
		return 0, nil, fmt.Errorf("%d windows cannot fit in %d bytes", hdr.Count, r.Len())
	}
	ws = make([]savedWindow, 0, hdr.Count)
	seen := make(map[string]struct{}, hdr.Count)
	for i := range hdr.Count {
		w, err := readWindow(r, hdr.Width)
		if err != nil {
			return 0, nil, fmt.Errorf("window %d: %w", i, err)
		}
		if _, dup := seen[w.device]; dup {
			return 0, nil, fmt.Errorf("window %d: device %q twice", i, w.device)
		}
		seen[w.device] = struct{}{}
		ws = append(ws, w)
	}
	if r.Len() != 0 {
		return 0, nil, fmt.Errorf("%d bytes after the last window", r.Len())
	}
	return hdr.Width, ws, nil
}

func readWindow(r *bytes.Reader, width uint64) (savedWindow, error) {
	var n uint16
	if err := binary.Read(r, binary.BigEndian, &n); err != nil {
		return savedWindow{}, err
	}
	id := make([]byte, n)
	if _, err := io.ReadFull(r, id); err != nil {
		return savedWindow{}, err
	}
	w := savedWindow{device: string(id)}
	if err := binary.Read(r, binary.BigEndian, &w.low); err != nil {
		return savedWindow{}, err
	}
	flag, err := r.ReadByte()
	if err != nil {
		return savedWindow{}, err
	}
	switch flag {
	case 0:
	case 1:
		if uint64(r.Len()) < width/8 {
			return savedWindow{}, io.ErrUnexpectedEOF
		}
		w.bits = make([]uint64, width/64)
		if err := binary.Read(r, binary.BigEndian, w.bits); err != nil {
			return savedWindow{}, err
		}
	default:
		return savedWindow{}, fmt.Errorf("bitmap flag %d", flag)
	}
	return w, nil
}

// restore loads saved windows (most recently active first, kept with
// width) into an empty dedupe, as many as it may remember.
func (d *dedupe) restore(width uint64, ws []savedWindow) {
	d.mu.Lock()
	defer d.mu.Unlock()
	ws = ws[:min(len(ws), d.maxDevices)]
	for i := len(ws) - 1; i >= 0; i-- {
		s := ws[i]
		w := &seqWindow{device: s.device, width: d.width, low: s.low}
		for _, seq := range setNumbers(s.low, width, s.bits) {
			w.mark(seq)
		}
		d.devices[s.device] = d.lru.PushFront(w)
	}
}

// setNumbers lists the sequence numbers a saved bitmap holds: bit i of a
// window with watermark low stands for the number in (low, low+width]
// that is i modulo width.
func setNumbers(low, width uint64, words []uint64) []uint64 {
	var out []uint64
	base := low + 1
	for wi, word := range words {
		for word != 0 {
			b := uint64(bits.TrailingZeros64(word))
			word &= word - 1
			i := uint64(wi)*64 + b
			out = append(out, base+(i+width-base%width)%width)
		}
	}
	return out
}

// loadDedupe restores the windows from Config.DedupeFile. A missing file
// is a first start. A damaged one is moved aside (its name plus
// ".damaged-" and the time), logged, and the collector starts with empty windows rather
// than not at all; a file it cannot read is an error.
func (c *Collector) loadDedupe() error {
	path := c.cfg.DedupeFile
	if path == "" {
		return nil
	}
	data, err := os.ReadFile(path)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("collector: de-duplication file: %w", err)
	}
	width, ws, err := decodeDedupe(data)
	if err != nil {
		aside := path + ".damaged-" + time.Now().UTC().Format("20060102T150405Z")
		if rerr := os.Rename(path, aside); rerr != nil {
			return fmt.Errorf("collector: de-duplication file %s: %v; moving it aside: %w", path, err, rerr)
		}
		c.log.Error("de-duplication file damaged: moved aside, starting with empty windows (a duplicate of a record written before may pass once)",
			"file", path, "moved_to", aside, "err", err)
		return nil
	}
	c.dedupe.restore(width, ws)
	c.savedChanges = c.dedupe.changes.Load()
	c.log.Info("de-duplication windows restored", "file", path, "devices", min(len(ws), c.cfg.DedupeDevices))
	return nil
}

// saveDedupe writes the windows to Config.DedupeFile if they changed since
// the last save.
func (c *Collector) saveDedupe() error {
	if c.cfg.DedupeFile == "" {
		return nil
	}
	c.saveMu.Lock()
	defer c.saveMu.Unlock()
	changes := c.dedupe.changes.Load()
	if changes == c.savedChanges {
		return nil
	}
	data := encodeDedupe(c.dedupe.width, c.dedupe.snapshot())
	if err := atomicfile.Write(c.cfg.DedupeFile, data, 0o600); err != nil {
		return fmt.Errorf("collector: saving de-duplication windows: %w", err)
	}
	c.savedChanges = changes
	return nil
}

// checkpointDedupe saves the windows every DedupeCheckpoint until ctx ends.
func (c *Collector) checkpointDedupe(ctx context.Context) {
	runPeriodically(ctx, c.cfg.DedupeCheckpoint, func(time.Time) bool {
		if err := c.saveDedupe(); err != nil {
			c.log.Warn("de-duplication checkpoint failed; will retry", "err", err)
		}
		return true
	})
}
