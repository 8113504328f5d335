package collector_test

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/plgd-dev/go-coap/v3/message"
	"github.com/plgd-dev/go-coap/v3/message/codes"

	"iotagent.dev/iotagent/internal/testsync"
	"iotagent.dev/iotagent/station/collector"
	"iotagent.dev/iotagent/telemetry/senml"
)

// dialT is dial that fails t on error.
func dialT(t testing.TB, f *fixture, c *collector.Collector, name string, o dialOptions) *client {
	t.Helper()
	cl, err := dial(t, c.Addr(), issue(t, f.st, name, nil, false), f.roots, o)
	if err != nil {
		t.Fatalf("dial as %s: %v", name, err)
	}
	return cl
}

// seqs returns the sequence numbers of ls, sorted.
func seqs(ls []line) []uint64 {
	var out []uint64
	for _, l := range ls {
		out = append(out, l.Seq)
	}
	slices.Sort(out)
	return out
}

func span(from, to uint64) []uint64 {
	var out []uint64
	for s := from; s <= to; s++ {
		out = append(out, s)
	}
	return out
}

func TestPostAndDeduplicate(t *testing.T) {
	checkGoroutines(t)
	f := newFixture(t)
	c, out := f.start(t, collector.Config{})
	dev := dialT(t, f, c, "gw-1", dialOptions{})

	steps := []struct {
		name    string
		path    string
		cf      message.MediaType
		body    []byte
		want    codes.Code
		newSeqs []uint64 // what the sink gains
		dup     uint64   // duplicates counted
	}{
		{"cbor", "/telemetry", message.AppSenmlCbor, mustCBOR(t, batch("gw-1", 1, 50)), codes.Changed, span(1, 50), 0},
		{"json", "/telemetry", message.AppSenmlJSON, mustJSON(t, batch("gw-1", 51, 50)), codes.Changed, span(51, 100), 0},
		{"cbor again", "/telemetry", message.AppSenmlCbor, mustCBOR(t, batch("gw-1", 1, 50)), codes.Changed, nil, 50},
		{"json again as cbor", "/telemetry", message.AppSenmlCbor, mustCBOR(t, batch("gw-1", 51, 50)), codes.Changed, nil, 50},
		{"overlap", "/devices/gw-1/telemetry", message.AppSenmlCbor, mustCBOR(t, batch("gw-1", 91, 20)), codes.Changed, span(101, 110), 10},
		// Out of order, as when several requests are in flight.
		{"ahead", "/telemetry", message.AppSenmlCbor, mustCBOR(t, batch("gw-1", 131, 10)), codes.Changed, span(131, 140), 0},
		{"behind", "/telemetry", message.AppSenmlCbor, mustCBOR(t, batch("gw-1", 111, 10)), codes.Changed, span(111, 120), 0},
		{"ahead again", "/telemetry", message.AppSenmlCbor, mustCBOR(t, batch("gw-1", 131, 10)), codes.Changed, nil, 10},
		{"fill the gap", "/telemetry", message.AppSenmlCbor, mustCBOR(t, batch("gw-1", 116, 20)), codes.Changed, span(121, 130), 10},
		// The same number twice in one pack is written once.
		{"repeat within a pack", "/telemetry", message.AppSenmlCbor, mustCBOR(t, slices.Concat(batch("gw-1", 141, 2), batch("gw-1", 141, 2))), codes.Changed, span(141, 142), 2},
		// About 8.5 kB: go-coap's client sends it in blocks (RFC 7959).
		{"json in blocks", "/telemetry", message.AppSenmlJSON, mustJSON(t, batch("gw-1", 143, 200)), codes.Changed, span(143, 342), 0},
	}
	var want []uint64
	var dups uint64
	for _, s := range steps {
		t.Run(s.name, func(t *testing.T) {
			code, diag := dev.post(t, s.path, s.cf, s.body)
			if code != s.want {
				t.Fatalf("POST %s = %v %q, want %v", s.path, code, diag, s.want)
			}
			want = append(want, s.newSeqs...)
			slices.Sort(want)
			if got := seqs(out.read(t)); !slices.Equal(got, want) {
				t.Errorf("sink seqs = %v, want %v", got, want)
			}
			dups += s.dup
			if got := c.Stats().Records.Duplicate; got != dups {
				t.Errorf("Stats().Records.Duplicate = %d, want %d", got, dups)
			}
		})
	}

	t.Run("over the default MaxPayload", func(t *testing.T) {
		body := make([]byte, collector.DefaultMaxPayload+1)
		if code, diag := dev.post(t, "/telemetry", message.AppSenmlCbor, body); code != codes.RequestEntityTooLarge {
			t.Errorf("POST of %d bytes = %v %q, want 4.13", len(body), code, diag)
		}
	})

	t.Run("resolved records", func(t *testing.T) {
		for _, l := range out.read(t) {
			i := float64((l.Seq - 1) % 50) // position in its batch of 50
			if l.Seq > 100 {
				break // later batches start elsewhere
			}
			if l.Device != "gw-1" || l.Name != "urn:dev:gw-1:temp" || l.Unit != "Cel" || l.Time != 1.7e9+i || l.Value == nil || *l.Value != 20+i/10 {
				t.Errorf("record %d = %+v, want gw-1's urn:dev:gw-1:temp at %v, %v Cel", l.Seq, l, 1.7e9+i, 20+i/10)
			}
			if _, err := time.Parse(time.RFC3339Nano, l.Received); err != nil {
				t.Errorf("record %d: received %q: %v", l.Seq, l.Received, err)
			}
		}
	})

	t.Run("unsequenced", func(t *testing.T) {
		before := len(out.read(t))
		p := batch("gw-1", 0, 3)
		for i := range p {
			p[i].Seq = 0
		}
		for range 2 {
			if code, diag := dev.post(t, "/telemetry", message.AppSenmlCbor, mustCBOR(t, p)); code != codes.Changed {
				t.Fatalf("POST = %v %q, want 2.04", code, diag)
			}
		}
		if got := len(out.read(t)) - before; got != 6 {
			t.Errorf("sink gained %d records, want 6: unsequenced records cannot be de-duplicated", got)
		}
		if got := c.Stats().Records.Unsequenced; got != 6 {
			t.Errorf("Stats().Records.Unsequenced = %d, want 6", got)
		}
	})

	t.Run("stats", func(t *testing.T) {
		s := c.Stats()
		total := uint64(len(out.read(t)))
		if s.Records.Accepted != total {
			t.Errorf("Stats().Records.Accepted = %d, want %d (the sink's lines)", s.Records.Accepted, total)
		}
		if s.Handshakes["ok"] != 1 || s.Sessions != 1 || s.HandshakeTime.Count != 1 {
			t.Errorf("Stats() handshakes %v, sessions %d, timed %d; want 1 ok, 1, 1", s.Handshakes, s.Sessions, s.HandshakeTime.Count)
		}
		if s.Requests["2.04"] != uint64(len(steps)+2) {
			t.Errorf("Stats().Requests = %v, want %d × 2.04", s.Requests, len(steps)+2)
		}
		m := c.Metrics()
		for _, want := range []string{
			`iotstation_coap_handshakes_total{result="ok"} 1` + "\n",
			fmt.Sprintf(`iotstation_coap_records_total{result="accepted"} %d`+"\n", total),
			fmt.Sprintf(`iotstation_coap_records_total{result="duplicate"} %d`+"\n", dups),
			fmt.Sprintf(`iotstation_coap_requests_total{code="2.04"} %d`+"\n", len(steps)+2),
			`iotstation_coap_handshake_seconds_count 1` + "\n",
			`iotstation_coap_handshake_seconds_bucket{le="+Inf"} 1` + "\n",
			`iotstation_coap_sessions{cipher="TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256"} 1` + "\n",
			`iotstation_coap_records_unsequenced_total 6` + "\n",
			`iotstation_coap_dedupe_devices 1` + "\n",
		} {
			if !strings.Contains(m, want) {
				t.Errorf("Metrics() lacks %q:\n%s", want, m)
			}
		}
	})
}

// A gateway behind a NAT that rebinds its port keeps its session: with a
// Connection ID the collector follows the new address, with no handshake.
func TestNATRebinding(t *testing.T) {
	checkGoroutines(t)
	f := newFixture(t)
	c, out := f.start(t, collector.Config{})
	dev := dialT(t, f, c, "gw-nat", dialOptions{})

	if code, diag := dev.post(t, "/telemetry", message.AppSenmlCbor, mustCBOR(t, batch("gw-nat", 1, 10))); code != codes.Changed {
		t.Fatalf("POST before rebinding = %v %q, want 2.04", code, diag)
	}
	old, now, err := dev.pc.rebind()
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("client moved from %v to %v", old, now)
	for i := range 3 {
		if code, diag := dev.post(t, "/telemetry", message.AppSenmlCbor, mustCBOR(t, batch("gw-nat", uint64(11+10*i), 10))); code != codes.Changed {
			t.Fatalf("POST %d after rebinding = %v %q, want 2.04", i, code, diag)
		}
	}
	if got := seqs(out.read(t)); !slices.Equal(got, span(1, 40)) {
		t.Errorf("sink seqs = %v, want 1…40", got)
	}
	if s := c.Stats(); s.Handshakes["ok"] != 1 || s.Sessions != 1 {
		t.Errorf("after rebinding: handshakes %v, sessions %d; want the one session of before", s.Handshakes, s.Sessions)
	}
}

// At-least-once: while the sink fails, the device is answered 5.03 and
// nothing is marked written; its retry is then stored exactly once.
func TestSinkFailure(t *testing.T) {
	checkGoroutines(t)
	f := newFixture(t)
	var failing atomic.Bool
	var written []senml.Record
	sink := collector.SinkFunc(func(ctx context.Context, device string, p senml.Pack) error {
		if failing.Load() {
			return fmt.Errorf("disk full")
		}
		written = append(written, p...) // one device: never called concurrently
		return nil
	})
	c, _ := f.start(t, collector.Config{Sink: sink})
	dev := dialT(t, f, c, "gw-2", dialOptions{})
	body := mustCBOR(t, batch("gw-2", 1, 20))

	failing.Store(true)
	if code, diag := dev.post(t, "/telemetry", message.AppSenmlCbor, body); code != codes.ServiceUnavailable {
		t.Fatalf("POST with a failing sink = %v %q, want 5.03", code, diag)
	}
	failing.Store(false)
	for range 2 {
		if code, diag := dev.post(t, "/telemetry", message.AppSenmlCbor, body); code != codes.Changed {
			t.Fatalf("POST again = %v %q, want 2.04", code, diag)
		}
	}
	var got []uint64
	for _, r := range written {
		got = append(got, r.Seq)
	}
	if !slices.Equal(got, span(1, 20)) {
		t.Errorf("sink got seqs %v, want 1…20 once", got)
	}
	if s := c.Stats(); s.Requests["5.03"] != 1 || s.Records.Accepted != 20 || s.Records.Duplicate != 20 {
		t.Errorf("Stats() = requests %v, records %+v; want one 5.03, 20 accepted, 20 duplicates", s.Requests, s.Records)
	}
}

// The de-duplication bounds, as the package doc describes them.
func TestDedupeBounds(t *testing.T) {
	checkGoroutines(t)
	f := newFixture(t)
	c, out := f.start(t, collector.Config{DedupeWindow: 64, DedupeDevices: 2})
	a := dialT(t, f, c, "gw-a", dialOptions{})
	post := func(t *testing.T, cl *client, device string, from uint64, n int, newRecs int) {
		t.Helper()
		before := len(out.read(t))
		if code, diag := cl.post(t, "/telemetry", message.AppSenmlCbor, mustCBOR(t, batch(device, from, n))); code != codes.Changed {
			t.Fatalf("POST %s %d… = %v %q, want 2.04", device, from, code, diag)
		}
		if got := len(out.read(t)) - before; got != newRecs {
			t.Errorf("POST %s %d…%d: the sink gained %d records, want %d", device, from, from+uint64(n)-1, got, newRecs)
		}
	}
	for s := uint64(1); s <= 200; s += 50 {
		post(t, a, "gw-a", s, 50, 50)
	}
	t.Run("late retry within the window", func(t *testing.T) {
		post(t, a, "gw-a", 150, 10, 0)
	})
	t.Run("numbering restarted", func(t *testing.T) {
		post(t, a, "gw-a", 1, 10, 10)
		if got := c.Stats().Dedupe.Resets; got != 1 {
			t.Errorf("Stats().Dedupe.Resets = %d, want 1", got)
		}
		post(t, a, "gw-a", 1, 10, 0)
	})
	t.Run("evicted window", func(t *testing.T) {
		for _, dev := range []string{"gw-b", "gw-c"} {
			post(t, dialT(t, f, c, dev, dialOptions{}), dev, 1, 10, 10)
		}
		// gw-a's window was the least recently used: it is forgotten, and
		// a duplicate passes once.
		post(t, a, "gw-a", 1, 10, 10)
		post(t, a, "gw-a", 1, 10, 0)
		if s := c.Stats().Dedupe; s.Devices != 2 || s.Evictions != 2 {
			t.Errorf("Stats().Dedupe = %+v, want 2 devices, 2 evictions", s)
		}
	})
}

// The de-duplication windows survive a restart of the collector: from the
// periodic checkpoint while it runs (a crash) and from the final save when
// it stops. A damaged file is moved aside and the collector serves anyway;
// a file it cannot read stops it with an error naming the file.
func TestDedupeFile(t *testing.T) {
	checkGoroutines(t)
	f := newFixture(t)
	dir := t.TempDir()
	file := filepath.Join(dir, "dedupe.bin")
	post := func(dev *client, from uint64, n int) {
		t.Helper()
		if code, diag := dev.post(t, "/telemetry", message.AppSenmlCbor, mustCBOR(t, batch("gw-7", from, n))); code != codes.Changed {
			t.Fatalf("POST %d…%d = %v %q, want 2.04", from, from+uint64(n)-1, code, diag)
		}
	}

	c1, _, stop1 := f.startStop(t, collector.Config{DedupeFile: file, DedupeCheckpoint: 20 * time.Millisecond})
	dev := dialT(t, f, c1, "gw-7", dialOptions{})
	post(dev, 1, 50)
	post(dev, 61, 10) // out of order: kept in the bitmap

	t.Run("checkpoint while running", func(t *testing.T) {
		// The checkpoint after the second POST holds both (one snapshot).
		waitFor(t, func() bool {
			ok, _ := collector.DedupeFileSeen(file, "gw-7", 70)
			return ok
		}, "a checkpoint holding gw-7's 70")
		// What a crash now would leave: restore it into another collector.
		copyFile := filepath.Join(t.TempDir(), "dedupe.bin")
		b, err := os.ReadFile(file)
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(copyFile, b, 0o600); err != nil {
			t.Fatal(err)
		}
		c, out, stop := f.startStop(t, collector.Config{DedupeFile: copyFile})
		d := dialT(t, f, c, "gw-7", dialOptions{})
		post(d, 41, 30)
		d.close()
		stop()
		if got := seqs(out.read(t)); !slices.Equal(got, span(51, 60)) {
			t.Errorf("after restoring the checkpoint, 41…70 wrote %v, want 51…60", got)
		}
	})

	dev.close()
	stop1()
	fi, err := os.Stat(file)
	if err != nil {
		t.Fatalf("no de-duplication file after stopping: %v", err)
	}
	if fi.Mode().Perm() != 0o600 {
		t.Errorf("de-duplication file mode %v, want 0600", fi.Mode().Perm())
	}

	t.Run("restart", func(t *testing.T) {
		c, out, _ := f.startStop(t, collector.Config{DedupeFile: file})
		d := dialT(t, f, c, "gw-7", dialOptions{})
		post(d, 1, 50)
		post(d, 51, 20)
		if got := seqs(out.read(t)); !slices.Equal(got, span(51, 60)) {
			t.Errorf("after a restart, 1…70 wrote %v, want 51…60", got)
		}
		if got := c.Stats().Records.Duplicate; got != 60 {
			t.Errorf("Stats().Records.Duplicate = %d, want 60", got)
		}
	})

	t.Run("damaged", func(t *testing.T) {
		bad := filepath.Join(t.TempDir(), "dedupe.bin")
		if err := os.WriteFile(bad, []byte("iotagent-dedupe\x01 and then garbage"), 0o600); err != nil {
			t.Fatal(err)
		}
		var log testsync.Buffer
		c, out, _ := f.startStop(t, collector.Config{DedupeFile: bad, Logger: slog.New(slog.NewTextHandler(&log, nil))})
		aside, _ := filepath.Glob(bad + ".damaged-*")
		if len(aside) != 1 {
			t.Fatalf("damaged file moved aside as %q, want one %s.damaged-TIME", aside, bad)
		}
		if b, err := os.ReadFile(aside[0]); err != nil || string(b) != "iotagent-dedupe\x01 and then garbage" {
			t.Errorf("damaged file not moved aside intact: %q, %v", b, err)
		}
		if !strings.Contains(log.String(), "de-duplication file damaged") || !strings.Contains(log.String(), bad) {
			t.Errorf("log does not name the damaged file:\n%s", log.String())
		}
		d := dialT(t, f, c, "gw-7", dialOptions{})
		post(d, 1, 5)
		if got := seqs(out.read(t)); !slices.Equal(got, span(1, 5)) {
			t.Errorf("with empty windows, 1…5 wrote %v", got)
		}
	})

	t.Run("unreadable", func(t *testing.T) {
		c, err := collector.New(collector.Config{Addr: "127.0.0.1:0", Certificate: f.srv, ClientCAs: f.roots,
			Sink: collector.SinkFunc(func(context.Context, string, senml.Pack) error { return nil }), DedupeFile: t.TempDir()})
		if err != nil {
			t.Fatal(err)
		}
		err = c.Run(context.Background())
		if err == nil || !strings.Contains(err.Error(), "de-duplication file") {
			t.Errorf("Run with a directory as DedupeFile = %v, want an error naming the de-duplication file", err)
		}
	})
}
