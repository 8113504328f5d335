package collector_test

import (
	"encoding/binary"
	"os"
	"runtime"
	"strings"
	"testing"

	"github.com/plgd-dev/go-coap/v3/message"
	"github.com/plgd-dev/go-coap/v3/message/codes"

	"iotagent.dev/iotagent/station/collector"
)

// cborText appends a CBOR text string (major type 3) with a head of the
// shortest form.
func cborText(b []byte, s string) []byte {
	return append(cborHead(b, 3, len(s)), s...)
}

func cborHead(b []byte, major byte, n int) []byte {
	m := major << 5
	switch {
	case n < 24:
		return append(b, m|byte(n))
	case n < 1<<8:
		return append(b, m|24, byte(n))
	case n < 1<<16:
		return binary.BigEndian.AppendUint16(append(b, m|25), uint16(n))
	}
	return binary.BigEndian.AppendUint32(append(b, m|26), uint32(n))
}

// bombCBOR is the pack of issue 10 in SenML CBOR, written by hand since
// the encoders refuse it: a base name and unit in the first record, then
// n bare values {"v":1} of 3 bytes each, every one of which gets both
// when resolved.
func bombCBOR(bn, bu string, n int) []byte {
	b := cborHead(nil, 4, n)
	b = append(b, 0xa3, 0x21) // {-2: bn, -4: bu, 2: 1}
	b = cborText(b, bn)
	b = append(b, 0x23)
	b = cborText(b, bu)
	b = append(b, 0x02, 0x01)
	for range n - 1 {
		b = append(b, 0xa1, 0x02, 0x01)
	}
	return b
}

// A POST that expands when resolved is answered 4.00 naming the field or
// limit at fault, before anything reaches the sink; what the sink held
// stays, and a large pack of ordinary records still passes.
func TestAttackSenMLExpansionCollector(t *testing.T) {
	checkGoroutines(t)
	f := newFixture(t)
	c, out := f.start(t, collector.Config{})
	cl := dialT(t, f, c, "gw-attack", dialOptions{})
	if code, diag := cl.post(t, "/telemetry", message.AppSenmlCbor, mustCBOR(t, batch("gw-attack", 1, 5))); code != codes.Changed {
		t.Fatalf("POST of a good batch = %v %q, want 2.04", code, diag)
	}

	for _, tc := range []struct {
		name  string
		body  []byte
		code  codes.Code
		diag  string
		lines int // the sink gains
	}{
		// 32 KiB of unit in each of 4000 records: 131 MB of sink from a
		// 45 KB POST.
		{"issue 10", bombCBOR("x", strings.Repeat("u", 32<<10), 4000),
			codes.BadRequest, `senml: record 0: "bu" is 32768 bytes long, more than 32`, 0},
		// Within every field cap, 10000 records of 3 bytes: 4 MB of sink.
		{"within the field caps", bombCBOR(strings.Repeat("n", 255), strings.Repeat("u", 32), 10000),
			codes.BadRequest, `senml: record 2987: resolved pack over 1048576 bytes, the limit`, 0},
		// The most such records that pass: 1 MiB resolved, 9 KB posted.
		{"at the limit", bombCBOR(strings.Repeat("n", 255), strings.Repeat("u", 32), 2987), codes.Changed, "", 2987},
		// What an agent sends, 2000 records in one block-wise POST.
		{"large ordinary batch", mustCBOR(t, batch("gw-attack", 6, 2000)), codes.Changed, "", 2000},
	} {
		t.Run(tc.name, func(t *testing.T) {
			lines := len(out.read(t))
			sink, err := os.Stat(out.path)
			if err != nil {
				t.Fatal(err)
			}
			var before, after runtime.MemStats
			runtime.ReadMemStats(&before)
			code, diag := cl.post(t, "/telemetry", message.AppSenmlCbor, tc.body)
			runtime.ReadMemStats(&after)
			grown, err := os.Stat(out.path)
			if err != nil {
				t.Fatal(err)
			}
			grew := grown.Size() - sink.Size()
			t.Logf("POST of %d bytes: %v %.80q; sink grew %d bytes (%.1f× the body), %d bytes allocated",
				len(tc.body), code, diag, grew, float64(grew)/float64(len(tc.body)), after.TotalAlloc-before.TotalAlloc)
			if code != tc.code || !strings.HasPrefix(diag, tc.diag) {
				t.Errorf("POST = %v %q, want %v %q", code, diag, tc.code, tc.diag)
			}
			if got := len(out.read(t)) - lines; got != tc.lines {
				t.Errorf("the sink gained %d records, want %d", got, tc.lines)
			}
		})
	}
	var sequenced []line
	for _, l := range out.read(t) {
		if l.Seq != 0 {
			sequenced = append(sequenced, l)
		}
	}
	if got := seqs(sequenced); len(got) != 2005 || got[0] != 1 || got[2004] != 2005 {
		t.Errorf("the sink holds %d sequenced records, want seq 1 to 2005", len(got))
	}
}
