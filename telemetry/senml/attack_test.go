package senml

import (
	"encoding/base64"
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"
)

// Every string a parser keeps is capped, in both encodings: a pack one
// byte over a cap is refused with an error that names the label and the
// cap, one at the cap is read.
func TestAttackSenMLFieldLimits(t *testing.T) {
	x := func(n int) string { return strings.Repeat("x", n) }
	for _, tc := range []struct {
		label string
		limit int
		// json and cbor are a pack whose field label is n bytes long.
		json func(n int) string
		cbor func(n int) any
		err  string // the error one byte over, after "record 0: "
	}{
		{"bn", 255,
			func(n int) string { return `[{"bn":"` + x(n) + `","v":1}]` },
			func(n int) any { return []any{rec(-2, x(n), 2, 1)} },
			`"bn" is 256 bytes long, more than 255`},
		{"n", 255,
			func(n int) string { return `[{"n":"` + x(n) + `","v":1}]` },
			func(n int) any { return []any{rec(0, x(n), 2, 1)} },
			`name is 256 bytes long, more than 255`},
		{"bu", 32,
			func(n int) string { return `[{"bu":"` + x(n) + `","n":"a","v":1}]` },
			func(n int) any { return []any{rec(-4, x(n), 0, "a", 2, 1)} },
			`"bu" is 33 bytes long, more than 32`},
		{"u", 32,
			func(n int) string { return `[{"n":"a","u":"` + x(n) + `","v":1}]` },
			func(n int) any { return []any{rec(0, "a", 1, x(n), 2, 1)} },
			`"u" is 33 bytes long, more than 32`},
		{"vs", 4096,
			func(n int) string { return `[{"n":"a","vs":"` + x(n) + `"}]` },
			func(n int) any { return []any{rec(0, "a", 3, x(n))} },
			`"vs" is 4097 bytes long, more than 4096`},
		{"vd", 4096,
			func(n int) string {
				return `[{"n":"a","vd":"` + base64.RawURLEncoding.EncodeToString(make([]byte, n)) + `"}]`
			},
			func(n int) any { return []any{rec(0, "a", 8, make([]byte, n))} },
			`"vd" is 4097 bytes long, more than 4096`},
		{"unknown label", 64,
			func(n int) string { return `[{"n":"a","v":1,"` + x(n) + `":1}]` },
			func(n int) any { return []any{rec(0, "a", 2, 1, x(n), 1)} },
			`a label is 65 bytes long, more than 64`},
	} {
		t.Run(tc.label, func(t *testing.T) {
			if _, err := ParseJSON([]byte(tc.json(tc.limit))); err != nil {
				t.Errorf("ParseJSON with %s at %d bytes: %v", tc.label, tc.limit, err)
			}
			if _, err := DecodeCBOR(encodeAny(nil, tc.cbor(tc.limit))); err != nil {
				t.Errorf("DecodeCBOR with %s at %d bytes: %v", tc.label, tc.limit, err)
			}
			want := "senml: record 0: " + tc.err
			if p, err := ParseJSON([]byte(tc.json(tc.limit + 1))); err == nil || err.Error() != want || !errors.Is(err, ErrInvalid) {
				t.Errorf("ParseJSON with %s at %d bytes = %d records, %v; want %q", tc.label, tc.limit+1, len(p), err, want)
			}
			if p, err := DecodeCBOR(encodeAny(nil, tc.cbor(tc.limit+1))); err == nil || err.Error() != want || !errors.Is(err, ErrInvalid) {
				t.Errorf("DecodeCBOR with %s at %d bytes = %d records, %v; want %q", tc.label, tc.limit+1, len(p), err, want)
			}
		})
	}
}

// bombJSON is the pack of issue 10: a base name and unit in the first
// record, then n bare values, each of which gets them when resolved.
func bombJSON(bn, bu string, n int) []byte {
	var b strings.Builder
	fmt.Fprintf(&b, `[{"bn":%q,"bu":%q,"v":1}`, bn, bu)
	for range n - 1 {
		b.WriteString(`,{"v":1}`)
	}
	b.WriteString("]")
	return []byte(b.String())
}

// Resolve bounds what it builds, not only what it reads: base fields are
// copied into every record, so a pack within every field cap can still
// stand for far more than it holds.
func TestAttackSenMLExpansion(t *testing.T) {
	now := time.Unix(1_800_000_000, 0)
	for _, tc := range []struct {
		name string
		in   []byte
		err  string // "" if it resolves
	}{
		// A 32 KiB unit in 4000 records: 134 MB once resolved and encoded.
		{"issue 10", bombJSON("x", strings.Repeat("u", 32<<10), 4000), `senml: record 0: "bu" is 32768 bytes long, more than 32`},
		// The longest base name and unit, 8000 bare values in under 64 KiB:
		// 2.8 MB resolved.
		{"within the field caps", bombJSON(strings.Repeat("n", 255), strings.Repeat("u", 32), 8000),
			`senml: record 2987: resolved pack over 1048576 bytes, the limit`},
		// 64 KiB of records with a short base name, as a producer might
		// send them: 0.8 MB resolved.
		{"dense but plausible", bombJSON("urn:dev:mac:0024befffe804ff1:", "Cel", 8000), ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p, err := ParseJSON(tc.in)
			if err == nil {
				_, err = p.Resolve(now)
			}
			switch {
			case tc.err == "" && err != nil:
				t.Errorf("%d-byte pack: %v, want it resolved", len(tc.in), err)
			case tc.err != "" && (err == nil || !strings.HasPrefix(err.Error(), tc.err) || !errors.Is(err, ErrInvalid)):
				t.Errorf("%d-byte pack: %v, want error %q", len(tc.in), err, tc.err)
			}
		})
	}
}

// What Resolve counts for a record bounds its CBOR encoding, so that
// MaxResolvedSize bounds what the agent queues and the collector keeps.
func TestResolvedRecordCostBoundsCBOR(t *testing.T) {
	x := func(n int) string { return strings.Repeat("x", n) }
	for _, r := range []Record{
		{BaseVersion: new(5), Name: x(MaxNameLen), Unit: x(MaxUnitLen), Time: new(0.1), UpdateTime: new(0.1), Value: new(0.1), Sum: new(0.1), Seq: 1<<64 - 1},
		{BaseVersion: new(5), Name: x(MaxNameLen), Unit: x(MaxUnitLen), Time: new(0.1), UpdateTime: new(0.1), StringValue: new(x(MaxValueLen)), Sum: new(0.1), Seq: 1<<64 - 1},
		{BaseVersion: new(5), Name: x(MaxNameLen), Unit: x(MaxUnitLen), Time: new(0.1), UpdateTime: new(0.1), DataValue: []byte(x(MaxValueLen)), Sum: new(0.1), Seq: 1<<64 - 1},
	} {
		b, err := Pack{r}.EncodeCBOR()
		if err != nil {
			t.Fatal(err)
		}
		text := len(r.Name) + len(r.Unit) + lenOf(r.StringValue) + len(r.DataValue)
		if got := len(b) - 1 - text; got > resolvedRecordCost { // 1: the pack's head
			t.Errorf("a record's CBOR takes %d bytes besides its text and data, more than the %d Resolve counts", got, resolvedRecordCost)
		}
	}
}
