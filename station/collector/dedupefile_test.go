package collector

import (
	"encoding/binary"
	"fmt"
	"hash/crc32"
	"math/rand/v2"
	"strings"
	"testing"
)

// filled returns a dedupe of the given width holding random marks for
// devices n devices, some in order, some with gaps (bitmaps).
func filled(width, devices int, r *rand.Rand) *dedupe {
	d := newDedupe(width, devices)
	for i := range devices {
		w := d.lock(fmt.Sprintf("gw-%d", i))
		base := r.Uint64N(1 << 40)
		for range r.IntN(300) {
			w.mark(base + 1 + r.Uint64N(uint64(2*width)))
		}
		w.mu.Unlock()
	}
	return d
}

// A saved and restored dedupe sees every number the original saw; with
// the same or a wider window exactly those.
func TestDedupeFileRoundTrip(t *testing.T) {
	r := rand.New(rand.NewPCG(1, 2))
	orig := filled(128, 40, r)
	data := encodeDedupe(orig.width, orig.snapshot())
	for _, newWidth := range []int{128, 256, 64} {
		t.Run(fmt.Sprintf("width %d", newWidth), func(t *testing.T) {
			width, ws, err := decodeDedupe(data)
			if err != nil {
				t.Fatal(err)
			}
			got := newDedupe(newWidth, 100)
			got.restore(width, ws)
			if n := got.stats().Devices; n != 40 {
				t.Fatalf("%d devices restored, want 40", n)
			}
			for i := range 40 {
				dev := fmt.Sprintf("gw-%d", i)
				ow, gw := orig.lock(dev), got.lock(dev)
				gw.check(t)
				for s := ow.low - min(ow.low, 5); s <= ow.low+2*ow.width+5; s++ {
					if s == 0 {
						continue
					}
					o, g := ow.seen(s), gw.seen(s)
					if o && !g {
						t.Errorf("%s: %d seen before saving, not after", dev, s)
					}
					if !o && g && newWidth >= 128 {
						t.Errorf("%s: %d seen after restoring into width %d only", dev, s, newWidth)
					}
				}
				ow.mu.Unlock()
				gw.mu.Unlock()
			}
		})
	}
}

// The most recently active windows are the ones kept when fewer fit, and
// they stay the most recent.
func TestDedupeFileKeepsRecent(t *testing.T) {
	d := newDedupe(64, 10)
	for _, dev := range []string{"old", "mid", "new"} {
		w := d.lock(dev)
		w.mark(1)
		w.mu.Unlock()
	}
	width, ws, err := decodeDedupe(encodeDedupe(d.width, d.snapshot()))
	if err != nil {
		t.Fatal(err)
	}
	got := newDedupe(64, 2)
	got.restore(width, ws)
	var order []string
	for e := got.lru.Front(); e != nil; e = e.Next() {
		order = append(order, e.Value.(*seqWindow).device)
	}
	if strings.Join(order, ",") != "new,mid" {
		t.Errorf("restored %v, want [new mid] most recent first", order)
	}
}

func TestDedupeFileDamage(t *testing.T) {
	d := filled(64, 3, rand.New(rand.NewPCG(3, 4)))
	good := encodeDedupe(d.width, d.snapshot())
	// resum recomputes the checksum, as if the damage were a writer's bug.
	resum := func(b []byte) []byte {
		b = append([]byte(nil), b[:len(b)-4]...)
		return binary.BigEndian.AppendUint32(b, crc32.ChecksumIEEE(b))
	}
	header := len(dedupeMagic)
	cat := func(parts ...[]byte) []byte {
		var out []byte
		for _, p := range parts {
			out = append(out, p...)
		}
		return out
	}
	for _, tc := range []struct {
		name string
		data []byte
		want string
	}{
		{"empty", nil, "not a de-duplication file"},
		{"other magic", cat([]byte("iotagent-dedupe\x02"), good[header:]), "not a de-duplication file"},
		{"bit flipped", cat(good[:40], []byte{good[40] ^ 1}, good[41:]), "checksum"},
		{"truncated", good[:len(good)-9], "checksum"},
		{"truncated, checksum fixed", resum(good[:len(good)-9]), "window 2"},
		{"trailing bytes", resum(cat(good[:len(good)-4], make([]byte, 5))), "after the last window"},
		{"width 100", resum(cat(good[:header], binary.BigEndian.AppendUint64(nil, 100), good[header+8:])), "window width 100"},
		{"count too large", resum(cat(good[:header+8], []byte{0xff, 0xff, 0xff, 0xff}, good[header+12:])), "cannot fit"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, _, err := decodeDedupe(tc.data)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("decode = %v, want an error containing %q", err, tc.want)
			}
		})
	}

	t.Run("device twice", func(t *testing.T) {
		ws := d.snapshot()
		ws[1].device = ws[0].device
		if _, _, err := decodeDedupe(encodeDedupe(d.width, ws)); err == nil || !strings.Contains(err.Error(), "twice") {
			t.Errorf("decode = %v, want an error naming the repeated device", err)
		}
	})
}
