package telemetry

import (
	"fmt"
	"runtime"
	"strings"
	"testing"
	"time"

	"iotagent.dev/iotagent/store"
)

// bombLine is the ingest line of issue 10: a base name and unit in the
// first record, then n bare values, each of which gets both when resolved.
func bombLine(bn, bu string, n int) string {
	var b strings.Builder
	fmt.Fprintf(&b, `[{"bn":%q,"bu":%q,"v":1}`, bn, bu)
	for range n - 1 {
		b.WriteString(`,{"v":1}`)
	}
	b.WriteString("]")
	return b.String()
}

// allocated returns how many bytes the process allocated while f ran: in
// these tests, mostly the ingest handling a line.
func allocated(f func()) uint64 {
	var before, after runtime.MemStats
	runtime.ReadMemStats(&before)
	f()
	runtime.ReadMemStats(&after)
	return after.TotalAlloc - before.TotalAlloc
}

// A line that expands when resolved is refused, whatever expands, before
// it costs memory or evicts anything from a full drop-oldest queue; the
// records queued before it, and good lines pipelined with it, are kept.
func TestAttackSenMLExpansionIngest(t *testing.T) {
	const maxBytes = 4 << 20
	ing, q := startIngest(t, store.Options{MaxBytes: maxBytes, OnFull: store.DropOldest})
	c := dial(t, ing)

	// Fill the queue to 93%: 75 lines of 50 records of 1000 bytes each.
	filler := `{"n":"filler","vs":"` + strings.Repeat("f", 1000) + `"}`
	fill := "[" + strings.Repeat(filler+",", 49) + filler + "]"
	const kept = 75 * 50
	for i := range kept / 50 {
		if got, want := c.send(t, fill), fmt.Sprintf("ok %d", (i+1)*50); got != want {
			t.Fatalf("filling the queue: answer %q, want %q", got, want)
		}
	}
	full := q.Stats()
	t.Logf("queue before the attack: %d records, %d of %d bytes", full.Depth, full.Bytes+full.Depth*store.RecordOverhead, maxBytes)

	for _, tc := range []struct {
		name, line, want string
		maxAlloc         uint64 // 0: not checked
	}{
		// 32 KiB of unit in each of 4000 records: 134 MB from a 64 KiB line.
		{"issue 10", bombLine("x", strings.Repeat("u", 32<<10), 4000),
			`error senml: record 0: "bu" is 32768 bytes long, more than 32`, 16 << 20},
		// Small enough for the queue, so before the fix it was stored and
		// evicted most of what was queued.
		{"evicting the queue", bombLine("x", strings.Repeat("u", 2<<10), 1500),
			`error senml: record 0: "bu" is 2048 bytes long, more than 32`, 16 << 20},
		// Within every field cap, 2.8 MB resolved.
		{"within the field caps", bombLine(strings.Repeat("n", 255), strings.Repeat("u", 32), 8000),
			`error senml: record 2987: resolved pack over 1048576 bytes, the limit`, 0},
		// Within the resolved limit (0.9 MB), but 679 KB in the queue, more
		// than an eighth of it.
		{"an eighth of the queue", bombLine(strings.Repeat("n", 60), "", 7000),
			`error pack takes 679000 bytes of the queue, more than an eighth of its 4194304`, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var got string
			n := allocated(func() { got = c.send(t, tc.line) })
			t.Logf("%d-byte line: %d bytes allocated handling it, answer %.80q", len(tc.line), n, got)
			if !strings.HasPrefix(got, tc.want) {
				t.Errorf("answer = %q, want prefix %q", got, tc.want)
			}
			if tc.maxAlloc != 0 && n > tc.maxAlloc {
				t.Errorf("handling the line allocated %d bytes, want at most %d", n, tc.maxAlloc)
			}
			if st := q.Stats(); st.Depth != full.Depth || st.Dropped != 0 {
				t.Errorf("after the line: queue depth %d, %d dropped; want %d, none dropped", st.Depth, st.Dropped, full.Depth)
			}
		})
	}

	t.Run("pipelined with good lines", func(t *testing.T) {
		bomb := bombLine("x", strings.Repeat("u", 32<<10), 4000)
		if _, err := fmt.Fprintf(c.c, "[{\"n\":\"good\",\"v\":1}]\n%s\n[{\"n\":\"good\",\"v\":2}]\n", bomb); err != nil {
			t.Fatal(err)
		}
		for i, want := range []string{fmt.Sprintf("ok %d", kept+1), `error senml: record 0: "bu"`, fmt.Sprintf("ok %d", kept+2)} {
			ans, err := c.r.ReadString('\n')
			if err != nil || !strings.HasPrefix(ans, want) {
				t.Errorf("answer %d = %q, %v; want prefix %q", i, ans, err, want)
			}
		}
	})

	recs, err := q.Peek(0, 2*kept, maxBytes)
	if err != nil {
		t.Fatal(err)
	}
	p, bad := DecodeQueued(recs)
	n := 0
	for _, r := range p {
		if r.Name == "filler" {
			n++
		}
	}
	if n != kept || len(bad) != 0 {
		t.Errorf("queue holds %d of the %d records queued before the attack (%d undecodable), want all", n, kept, len(bad))
	}
}

// A producer that pipelines more than the queue holds has every line
// stored, the oldest records making room as the drop-oldest policy says,
// rather than the whole group refused as larger than the queue.
func TestIngestGroupLargerThanQueue(t *testing.T) {
	const maxBytes = 256 << 10
	// The group delay makes the lines one group, as fast as they come.
	ing, q, _ := startIngestWith(t, store.Options{MaxBytes: maxBytes, OnFull: store.DropOldest}, IngestConfig{GroupDelay: 200 * time.Millisecond})
	c := dial(t, ing)
	rec := `{"n":"temperature","u":"Cel","v":21.5,"t":-1}`
	line := "[" + strings.Repeat(rec+",", 49) + rec + "]"
	const lines = 200 // 1.3 MB in the queue
	go fmt.Fprint(c.c, strings.Repeat(line+"\n", lines))
	for i := range lines {
		ans, err := c.r.ReadString('\n')
		if want := fmt.Sprintf("ok %d", (i+1)*50); err != nil || strings.TrimSpace(ans) != want {
			t.Fatalf("answer %d = %q, %v; want %q", i, ans, err, want)
		}
	}
	st := q.Stats()
	if st.Dropped == 0 || st.Bytes+st.Depth*store.RecordOverhead > maxBytes {
		t.Errorf("queue: %d records of %d bytes, %d dropped; want it full and the oldest dropped", st.Depth, st.Bytes, st.Dropped)
	}
}

// BenchmarkAttackSenMLExpansion measures what the ingest spends on one
// line and what the line would put in the queue: B/op is allocated,
// queued-B the records with their overhead in the queue (0 when refused).
func BenchmarkAttackSenMLExpansion(b *testing.B) {
	now := time.Unix(1_800_000_000, 0)
	rec := `{"n":"temperature","u":"Cel","v":21.5,"t":-1}`
	for _, bc := range []struct{ name, line string }{
		{"issue 10", bombLine("x", strings.Repeat("u", 32<<10), 4000)},
		{"within the field caps", bombLine(strings.Repeat("n", 255), strings.Repeat("u", 32), 8000)},
		{"at the limit", bombLine(strings.Repeat("n", 255), strings.Repeat("u", 32), 2987)},
		{"ordinary", "[" + strings.Repeat(rec+",", 1399) + rec + "]"},
	} {
		b.Run(bc.name, func(b *testing.B) {
			b.ReportAllocs()
			queued := 0
			for b.Loop() {
				p, _ := EncodeForQueue([]byte(bc.line), now)
				queued = 0
				for _, r := range p {
					queued += len(r) + store.RecordOverhead
				}
			}
			b.ReportMetric(float64(len(bc.line)), "line-B")
			b.ReportMetric(float64(queued), "queued-B")
		})
	}
}
