package collector

import (
	"container/list"
	"sync"
	"sync/atomic"
)

// dedupe remembers which sequence numbers of which devices were written,
// within the bounds the package doc describes. Safe for concurrent use.
type dedupe struct {
	width      uint64 // numbers tracked above a watermark, a multiple of 64
	maxDevices int

	mu      sync.Mutex
	devices map[string]*list.Element // of *seqWindow
	lru     list.List                // front: most recently used

	evictions atomic.Uint64
	resets    atomic.Uint64
	changes   atomic.Uint64 // batches marked or windows reset: for saving
}

func newDedupe(width, maxDevices int) *dedupe {
	return &dedupe{
		width:      uint64((width + 63) / 64 * 64),
		maxDevices: maxDevices,
		devices:    map[string]*list.Element{},
	}
}

// lock returns device's window, locked: the caller checks, writes and
// marks, then unlocks it, so that a device's batches pass one at a time.
// A window evicted while locked is forgotten as it would be a moment
// later; the caller's marks then go nowhere.
func (d *dedupe) lock(device string) *seqWindow {
	d.mu.Lock()
	e, ok := d.devices[device]
	if ok {
		d.lru.MoveToFront(e)
	} else {
		e = d.lru.PushFront(&seqWindow{device: device, width: d.width})
		d.devices[device] = e
		if d.lru.Len() > d.maxDevices {
			old := d.lru.Back()
			d.lru.Remove(old)
			delete(d.devices, old.Value.(*seqWindow).device)
			d.evictions.Add(1)
		}
	}
	w := e.Value.(*seqWindow)
	d.mu.Unlock()
	w.mu.Lock()
	return w
}

func (d *dedupe) stats() DedupeStats {
	d.mu.Lock()
	n := len(d.devices)
	d.mu.Unlock()
	return DedupeStats{Devices: n, Evictions: d.evictions.Load(), Resets: d.resets.Load()}
}

// seqWindow is one device's record of written sequence numbers: every
// number at or below low, and those set in bits, were written. bits covers
// (low, low+width] as a ring indexed by seq mod width; it is nil while the
// numbers arrive in order, which is the common case.
type seqWindow struct {
	device string
	width  uint64

	mu   sync.Mutex
	low  uint64
	bits []uint64
	set  int // bits set
}

// restarted reports whether seq is too far below the watermark to be a
// retry: the device has restarted its numbering.
func (w *seqWindow) restarted(seq uint64) bool {
	return seq <= w.low && w.low-seq >= w.width
}

func (w *seqWindow) reset() {
	w.low, w.bits, w.set = 0, nil, 0
}

// seen reports whether seq was written. seq is not 0.
func (w *seqWindow) seen(seq uint64) bool {
	if seq <= w.low {
		return true
	}
	if w.bits == nil || seq-w.low > w.width {
		return false
	}
	return w.bit(seq)
}

func (w *seqWindow) bit(seq uint64) bool {
	i := seq % w.width
	return w.bits[i/64]&(1<<(i%64)) != 0
}

func (w *seqWindow) flip(seq uint64) {
	i := seq % w.width
	w.bits[i/64] ^= 1 << (i % 64)
}

// mark records that seq was written. seq is not 0.
func (w *seqWindow) mark(seq uint64) {
	if seq <= w.low {
		return
	}
	if seq-w.low > w.width {
		w.slide(seq - w.width)
	}
	if seq == w.low+1 && w.set == 0 {
		w.low = seq
		w.bits = nil
		return
	}
	if w.bits == nil {
		w.bits = make([]uint64, w.width/64)
	}
	if !w.bit(seq) {
		w.flip(seq)
		w.set++
	}
	for w.set > 0 && w.bit(w.low+1) {
		w.low++
		w.flip(w.low)
		w.set--
	}
	if w.set == 0 {
		w.bits = nil // the window is contiguous again: free the bitmap
	}
}

// slide moves the watermark up to low, taking the numbers it passes as
// written (see the package doc).
func (w *seqWindow) slide(low uint64) {
	if w.set > 0 {
		if low-w.low >= w.width {
			clear(w.bits)
			w.set = 0
		} else {
			for s := w.low + 1; s <= low; s++ {
				if w.bit(s) {
					w.flip(s)
					w.set--
				}
			}
		}
	}
	w.low = low
}
