package collector

import (
	"math/bits"
	"math/rand/v2"
	"testing"
)

// popcount is the number of bits set in w.bits.
func (w *seqWindow) popcount() int {
	n := 0
	for _, b := range w.bits {
		n += bits.OnesCount64(b)
	}
	return n
}

// check fails t if w's bookkeeping is inconsistent.
func (w *seqWindow) check(t *testing.T) {
	t.Helper()
	if got := w.popcount(); got != w.set {
		t.Fatalf("window %d bits set, set = %d", got, w.set)
	}
	if w.set == 0 && w.bits != nil {
		t.Fatalf("empty window keeps its bitmap")
	}
	if w.bits != nil && w.bit(w.low+1) {
		t.Fatalf("low+1 = %d is marked but low did not advance", w.low+1)
	}
}

func TestWindowInOrder(t *testing.T) {
	w := &seqWindow{width: 64}
	for s := uint64(1); s <= 1000; s++ {
		if w.seen(s) {
			t.Fatalf("seen(%d) = true before mark", s)
		}
		w.mark(s)
		if !w.seen(s) || w.low != s || w.bits != nil {
			t.Fatalf("after mark(%d): seen %v, low %d, bitmap %v; want true, %d, none", s, w.seen(s), w.low, w.bits != nil, s)
		}
	}
}

func TestWindow(t *testing.T) {
	for _, tc := range []struct {
		name    string
		marks   []uint64
		low     uint64
		seen    []uint64
		notSeen []uint64
	}{
		{"empty", nil, 0, nil, []uint64{1, 2, 64, 65}},
		{"out of order", []uint64{3, 2}, 0, []uint64{2, 3}, []uint64{1, 4}},
		{"gap filled", []uint64{3, 2, 1}, 3, []uint64{1, 2, 3}, []uint64{4}},
		{"edge of the window", []uint64{64}, 0, []uint64{64}, []uint64{1, 63, 65}},
		// 100 is past low+64: the window moves to (36, 100], taking 1…36
		// as written.
		{"slide", []uint64{5, 100}, 36, []uint64{5, 20, 36, 100}, []uint64{37, 50, 99, 101}},
		{"slide keeps marks inside", []uint64{50, 60, 100}, 36, []uint64{50, 60, 100}, []uint64{37, 59, 99}},
		{"slide over marks", []uint64{2, 3, 200}, 136, []uint64{2, 136, 200}, []uint64{137, 199}},
		{"slide then contiguous", []uint64{2, 100, 37}, 37, []uint64{37, 100}, []uint64{38, 99}},
		{"duplicate marks", []uint64{5, 5, 5}, 0, []uint64{5}, []uint64{4, 6}},
		{"huge numbers", []uint64{1<<64 - 2, 1<<64 - 1}, 1<<64 - 65, []uint64{1<<64 - 2, 1<<64 - 1}, []uint64{1<<64 - 3}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			w := &seqWindow{width: 64}
			for _, s := range tc.marks {
				w.mark(s)
				w.check(t)
			}
			if w.low != tc.low {
				t.Errorf("low = %d, want %d", w.low, tc.low)
			}
			for _, s := range tc.seen {
				if !w.seen(s) {
					t.Errorf("seen(%d) = false, want true", s)
				}
			}
			for _, s := range tc.notSeen {
				if w.seen(s) {
					t.Errorf("seen(%d) = true, want false", s)
				}
			}
		})
	}
}

// Against a set of every number marked: a window answers exactly like it
// for numbers that arrive less than its width late, whatever the order.
func TestWindowMatchesSet(t *testing.T) {
	const width, n = 256, 20000
	for _, maxDelay := range []int{1, 8, 100, width - 1} {
		r := rand.New(rand.NewPCG(1, uint64(maxDelay)))
		// Each number arrives at its position plus up to maxDelay, some twice.
		order := make([]uint64, 0, n+n/10)
		pending := map[int][]uint64{}
		for i := 0; i < n+maxDelay+1; i++ {
			if i < n {
				s := uint64(i + 1)
				at := i + r.IntN(maxDelay+1)
				pending[at] = append(pending[at], s)
				if r.IntN(10) == 0 {
					at2 := i + r.IntN(maxDelay+1)
					pending[at2] = append(pending[at2], s)
				}
			}
			order = append(order, pending[i]...)
			delete(pending, i)
		}
		w := &seqWindow{width: width}
		set := map[uint64]bool{}
		for _, s := range order {
			if got := w.seen(s); got != set[s] {
				t.Fatalf("maxDelay %d: seen(%d) = %v, want %v", maxDelay, s, got, set[s])
			}
			set[s] = true
			w.mark(s)
		}
		if w.low != n || w.bits != nil {
			t.Errorf("maxDelay %d: at the end low = %d, bitmap %v; want %d, none", maxDelay, w.low, w.bits != nil, n)
		}
	}
}

// A first number far from 0 moves the window up: everything a window's
// width below it counts as written.
func TestWindowStartsHigh(t *testing.T) {
	w := &seqWindow{width: 4096}
	w.mark(10000)
	if w.low != 5904 || !w.seen(5904) || w.seen(5905) || !w.seen(10000) {
		t.Errorf("after mark(10000) alone: low %d, seen 5904 %v, 5905 %v, 10000 %v; want 5904, true, false, true",
			w.low, w.seen(5904), w.seen(5905), w.seen(10000))
	}
}

func TestWindowRestarted(t *testing.T) {
	w := &seqWindow{width: 4096}
	for s := uint64(1); s <= 10000; s++ {
		w.mark(s)
	}
	for _, tc := range []struct {
		seq  uint64
		want bool
	}{
		{1, true}, {5904, true}, {5905, false}, {9999, false}, {10001, false},
	} {
		if got := w.restarted(tc.seq); got != tc.want {
			t.Errorf("low %d: restarted(%d) = %v, want %v", w.low, tc.seq, got, tc.want)
		}
	}
	small := &seqWindow{width: 4096}
	small.mark(100)
	if small.restarted(1) {
		t.Error("low 100: restarted(1) = true; a number within the window below is a retry")
	}
}

func TestDedupeEvicts(t *testing.T) {
	d := newDedupe(64, 2)
	for _, dev := range []string{"a", "b", "a", "c"} { // b is then the least recent
		w := d.lock(dev)
		w.mark(1)
		w.mu.Unlock()
	}
	if s := d.stats(); s.Devices != 2 || s.Evictions != 1 {
		t.Errorf("stats = %+v, want 2 devices, 1 eviction", s)
	}
	for _, tc := range []struct {
		dev  string
		want bool
	}{{"a", true}, {"c", true}, {"b", false}} { // b last: looking it up evicts again
		w := d.lock(tc.dev)
		if got := w.seen(1); got != tc.want {
			t.Errorf("device %s: seen(1) = %v, want %v", tc.dev, got, tc.want)
		}
		w.mu.Unlock()
	}
}

func TestDedupeWidthRoundsUp(t *testing.T) {
	if got := newDedupe(100, 1).width; got != 128 {
		t.Errorf("width for 100 = %d, want 128", got)
	}
}
