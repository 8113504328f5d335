package senml

import (
	"bytes"
	"encoding/hex"
	"encoding/json"
	"reflect"
	"strings"
	"testing"
	"time"
)

// rfcNow is "now" for resolving the examples' relative times.
var rfcNow = time.Unix(1700000000, 0)

// rfcExamples are the JSON examples of RFC 8428 (§1, §2, §5.1), with the
// resolved forms: §5.1.4's from the RFC, the others written for rfcNow.
var rfcExamples = []struct {
	name     string
	json     string
	resolved string
}{
	{
		name:     "1 overview",
		json:     `[{"n":"urn:dev:ow:10e2073a01080063","u":"Cel","v":23.1}]`,
		resolved: `[{"n":"urn:dev:ow:10e2073a01080063","u":"Cel","t":1700000000,"v":23.1}]`,
	},
	{
		name: "2 two times",
		json: `[
     {"n":"urn:dev:ow:10e2073a01080063","u":"Cel","t":1.276020076e+09,
      "v":23.5},
     {"n":"urn:dev:ow:10e2073a01080063","u":"Cel","t":1.276020091e+09,
      "v":23.6}
   ]`,
		resolved: `[{"n":"urn:dev:ow:10e2073a01080063","u":"Cel","t":1276020076,"v":23.5},
			{"n":"urn:dev:ow:10e2073a01080063","u":"Cel","t":1276020091,"v":23.6}]`,
	},
	{
		name: "2 base name",
		json: `[
     {"bn":"urn:dev:ow:10e2073a01080063","u":"Cel","t":1.276020076e+09,
      "v":23.5},
     {"u":"Cel","t":1.276020091e+09,
      "v":23.6}
   ]`,
		resolved: `[{"n":"urn:dev:ow:10e2073a01080063","u":"Cel","t":1276020076,"v":23.5},
			{"n":"urn:dev:ow:10e2073a01080063","u":"Cel","t":1276020091,"v":23.6}]`,
	},
	{
		name: "5.1.1 single data point",
		json: `[
     {"n":"urn:dev:ow:10e2073a01080063","u":"Cel","v":23.1}
   ]`,
		resolved: `[{"n":"urn:dev:ow:10e2073a01080063","u":"Cel","t":1700000000,"v":23.1}]`,
	},
	{
		name: "5.1.2 multiple data points now",
		json: `[
  {"bn":"urn:dev:ow:10e2073a01080063:","n":"voltage","u":"V","v":120.1},
  {"n":"current","u":"A","v":1.2}
]`,
		resolved: `[{"n":"urn:dev:ow:10e2073a01080063:voltage","u":"V","t":1700000000,"v":120.1},
			{"n":"urn:dev:ow:10e2073a01080063:current","u":"A","t":1700000000,"v":1.2}]`,
	},
	{
		// Version 5 stays in every resolved record (RFC 8428 §4.6); the
		// records come in chronological order, the two of the same time
		// in their order in the pack.
		name: "5.1.2 multiple data points over time",
		json: `[
     {"bn":"urn:dev:ow:10e2073a0108006:","bt":1.276020076001e+09,
      "bu":"A","bver":5,
      "n":"voltage","u":"V","v":120.1},
     {"n":"current","t":-5,"v":1.2},
     {"n":"current","t":-4,"v":1.3},
     {"n":"current","t":-3,"v":1.4},
     {"n":"current","t":-2,"v":1.5},
     {"n":"current","t":-1,"v":1.6},
     {"n":"current","v":1.7}
   ]`,
		resolved: `[
			{"bver":5,"n":"urn:dev:ow:10e2073a0108006:current","u":"A","t":1276020071.001,"v":1.2},
			{"bver":5,"n":"urn:dev:ow:10e2073a0108006:current","u":"A","t":1276020072.001,"v":1.3},
			{"bver":5,"n":"urn:dev:ow:10e2073a0108006:current","u":"A","t":1276020073.001,"v":1.4},
			{"bver":5,"n":"urn:dev:ow:10e2073a0108006:current","u":"A","t":1276020074.001,"v":1.5},
			{"bver":5,"n":"urn:dev:ow:10e2073a0108006:current","u":"A","t":1276020075.001,"v":1.6},
			{"bver":5,"n":"urn:dev:ow:10e2073a0108006:voltage","u":"V","t":1276020076.001,"v":120.1},
			{"bver":5,"n":"urn:dev:ow:10e2073a0108006:current","u":"A","t":1276020076.001,"v":1.7}]`,
	},
	{
		name: "5.1.3 multiple measurements",
		json: rfc513,
		// RFC 8428 §5.1.4, verbatim.
		resolved: `[
     {"n":"urn:dev:ow:10e2073a01080063","u":"%RH","t":1.320067464e+09,
      "v":20},
     {"n":"urn:dev:ow:10e2073a01080063","u":"lon","t":1.320067464e+09,
      "v":24.30621},
     {"n":"urn:dev:ow:10e2073a01080063","u":"lat","t":1.320067464e+09,
      "v":60.07965},
     {"n":"urn:dev:ow:10e2073a01080063","u":"%RH","t":1.320067524e+09,
      "v":20.3},
     {"n":"urn:dev:ow:10e2073a01080063","u":"lon","t":1.320067524e+09,
      "v":24.30622},
     {"n":"urn:dev:ow:10e2073a01080063","u":"lat","t":1.320067524e+09,
      "v":60.07965},
     {"n":"urn:dev:ow:10e2073a01080063","u":"%RH","t":1.320067584e+09,
      "v":20.7},
     {"n":"urn:dev:ow:10e2073a01080063","u":"lon","t":1.320067584e+09,
      "v":24.30623},
     {"n":"urn:dev:ow:10e2073a01080063","u":"lat","t":1.320067584e+09,
      "v":60.07966},
     {"n":"urn:dev:ow:10e2073a01080063","u":"%EL","t":1.320067614e+09,
      "v":98},
     {"n":"urn:dev:ow:10e2073a01080063","u":"%RH","t":1.320067644e+09,
      "v":21.2},
     {"n":"urn:dev:ow:10e2073a01080063","u":"lon","t":1.320067644e+09,
      "v":24.30628},
     {"n":"urn:dev:ow:10e2073a01080063","u":"lat","t":1.320067644e+09,
      "v":60.07967}
   ]`,
	},
	{
		name: "5.1.5 multiple data types",
		json: `[
    {"bn":"urn:dev:ow:10e2073a01080063:","n":"temp","u":"Cel","v":23.1},
    {"n":"label","vs":"Machine Room"},
    {"n":"open","vb":false},
    {"n":"nfv-reader","vd":"aGkgCg"}
  ]`,
		resolved: `[{"n":"urn:dev:ow:10e2073a01080063:temp","u":"Cel","t":1700000000,"v":23.1},
			{"n":"urn:dev:ow:10e2073a01080063:label","t":1700000000,"vs":"Machine Room"},
			{"n":"urn:dev:ow:10e2073a01080063:open","t":1700000000,"vb":false},
			{"n":"urn:dev:ow:10e2073a01080063:nfv-reader","t":1700000000,"vd":"aGkgCg"}]`,
	},
	{
		name: "5.1.6 collection of resources",
		json: `[
     {"bn":"2001:db8::2/","bt":1.320078429e+09,
      "n":"temperature","u":"Cel","v":25.2},
     {"n":"humidity","u":"%RH","v":30},
     {"bn":"2001:db8::1/","n":"temperature","u":"Cel","v":12.3},
     {"n":"humidity","u":"%RH","v":67}
   ]`,
		resolved: `[{"n":"2001:db8::2/temperature","u":"Cel","t":1320078429,"v":25.2},
			{"n":"2001:db8::2/humidity","u":"%RH","t":1320078429,"v":30},
			{"n":"2001:db8::1/temperature","u":"Cel","t":1320078429,"v":12.3},
			{"n":"2001:db8::1/humidity","u":"%RH","t":1320078429,"v":67}]`,
	},
	{
		// The first record carries only a base field: no measurement.
		name: "5.1.7 setting an actuator",
		json: `[
     {"bn":"urn:dev:ow:10e2073a01080063:"},
     {"n":"temp","u":"Cel","v":23.1},
     {"n":"heat","u":"/","v":1},
     {"n":"fan","u":"/","v":0}
   ]`,
		resolved: `[{"n":"urn:dev:ow:10e2073a01080063:temp","u":"Cel","t":1700000000,"v":23.1},
			{"n":"urn:dev:ow:10e2073a01080063:heat","u":"/","t":1700000000,"v":1},
			{"n":"urn:dev:ow:10e2073a01080063:fan","u":"/","t":1700000000,"v":0}]`,
	},
	{
		name: "5.1.7 two lights on",
		json: `[
     {"bt":1.320078429e+09,"bu":"/","n":"2001:db8::3","v":1},
     {"n":"2001:db8::4","v":1}
   ]`,
		resolved: `[{"n":"2001:db8::3","u":"/","t":1320078429,"v":1},
			{"n":"2001:db8::4","u":"/","t":1320078429,"v":1}]`,
	},
	{
		name: "5.1.7 two lights off",
		json: `[
     {"bt":1.320078429e+09,"bu":"/","n":"2001:db8::3","v":0.5},
     {"n":"2001:db8::4","v":0.5},
     {"n":"2001:db8::3","t":0.1,"v":0},
     {"n":"2001:db8::4","t":0.1,"v":0}
   ]`,
		resolved: `[{"n":"2001:db8::3","u":"/","t":1320078429,"v":0.5},
			{"n":"2001:db8::4","u":"/","t":1320078429,"v":0.5},
			{"n":"2001:db8::3","u":"/","t":1320078429.1,"v":0},
			{"n":"2001:db8::4","u":"/","t":1320078429.1,"v":0}]`,
	},
}

const rfc513 = `[
     {"bn":"urn:dev:ow:10e2073a01080063","bt":1.320067464e+09,
      "bu":"%RH","v":20},
     {"u":"lon","v":24.30621},
     {"u":"lat","v":60.07965},
     {"t":60,"v":20.3},
     {"u":"lon","t":60,"v":24.30622},
     {"u":"lat","t":60,"v":60.07965},
     {"t":120,"v":20.7},
     {"u":"lon","t":120,"v":24.30623},
     {"u":"lat","t":120,"v":60.07966},
     {"u":"%EL","t":150,"v":98},
     {"t":180,"v":21.2},
     {"u":"lon","t":180,"v":24.30628},
     {"u":"lat","t":180,"v":60.07967}
   ]`

// ourNumbers rewrites the RFC's numbers with exponent into the shorter
// form EncodeJSON writes.
var ourNumbers = strings.NewReplacer(
	"1.276020076e+09", "1276020076",
	"1.276020091e+09", "1276020091",
	"1.276020076001e+09", "1276020076.001",
	"1.320067464e+09", "1320067464",
	"1.320078429e+09", "1320078429",
)

func compactJSON(t *testing.T, s string) string {
	t.Helper()
	var b bytes.Buffer
	if err := json.Compact(&b, []byte(s)); err != nil {
		t.Fatalf("json.Compact(%q): %v", s, err)
	}
	return b.String()
}

func TestRFCExamples(t *testing.T) {
	for _, tc := range rfcExamples {
		t.Run(tc.name, func(t *testing.T) {
			p, err := ParseJSON([]byte(tc.json))
			if err != nil {
				t.Fatalf("ParseJSON(example) error: %v", err)
			}
			want, err := ParseJSON([]byte(tc.resolved))
			if err != nil {
				t.Fatalf("ParseJSON(resolved form) error: %v", err)
			}

			got, err := p.Resolve(rfcNow)
			if err != nil {
				t.Fatalf("Resolve error: %v", err)
			}
			if !reflect.DeepEqual(got, want) {
				t.Errorf("Resolve(example) = %s, want %s", mustJSON(t, got), mustJSON(t, want))
			}
			again, err := got.Resolve(rfcNow.Add(time.Hour))
			if err != nil || !reflect.DeepEqual(again, got) {
				t.Errorf("Resolve(resolved) = %s, %v, want it unchanged", mustJSON(t, again), err)
			}

			// Our JSON is the example's, without white space and with
			// numbers in the shorter form.
			enc, err := p.EncodeJSON()
			if err != nil {
				t.Fatalf("EncodeJSON error: %v", err)
			}
			if want := ourNumbers.Replace(compactJSON(t, tc.json)); string(enc) != want {
				t.Errorf("EncodeJSON(example) = %s, want %s", enc, want)
			}
			back, err := ParseJSON(enc)
			if err != nil || !reflect.DeepEqual(back, p) {
				t.Errorf("ParseJSON(EncodeJSON(example)) = %s, %v, want the example", mustJSON(t, back), err)
			}

			// JSON → CBOR → JSON.
			c, err := p.EncodeCBOR()
			if err != nil {
				t.Fatalf("EncodeCBOR error: %v", err)
			}
			fromCBOR, err := DecodeCBOR(c)
			if err != nil {
				t.Fatalf("DecodeCBOR(EncodeCBOR(example)) error: %v (CBOR %x)", err, c)
			}
			if !reflect.DeepEqual(fromCBOR, p) {
				t.Errorf("DecodeCBOR(EncodeCBOR(example)) = %s, want %s", mustJSON(t, fromCBOR), enc)
			}
			if j, err := fromCBOR.EncodeJSON(); err != nil || !bytes.Equal(j, enc) {
				t.Errorf("EncodeJSON(DecodeCBOR(EncodeCBOR(example))) = %s, %v, want %s", j, err, enc)
			}
			t.Logf("JSON %d bytes, CBOR %d bytes", len(enc), len(c))
		})
	}
}

func mustJSON(t testing.TB, p Pack) string {
	t.Helper()
	if len(p) == 0 {
		return "[]"
	}
	b, err := p.EncodeJSON()
	if err != nil {
		return "invalid pack: " + err.Error()
	}
	return string(b)
}

// rfcCBOR is the hex dump of RFC 8428 §6: the second example of §5.1.2,
// except that the last record has "t":0.
const rfcCBOR = `
 0000 87 a7 21 78 1b 75 72 6e 3a 64 65 76 3a 6f 77 3a |..!x.urn:dev:ow:|
 0010 31 30 65 32 30 37 33 61 30 31 30 38 30 30 36 3a |10e2073a0108006:|
 0020 22 fb 41 d3 03 a1 5b 00 10 62 23 61 41 20 05 00 |".A...[..b#aA ..|
 0030 67 76 6f 6c 74 61 67 65 01 61 56 02 fb 40 5e 06 |gvoltage.aV..@^.|
 0040 66 66 66 66 66 a3 00 67 63 75 72 72 65 6e 74 06 |fffff..gcurrent.|
 0050 24 02 fb 3f f3 33 33 33 33 33 33 a3 00 67 63 75 |$..?.333333..gcu|
 0060 72 72 65 6e 74 06 23 02 fb 3f f4 cc cc cc cc cc |rrent.#..?......|
 0070 cd a3 00 67 63 75 72 72 65 6e 74 06 22 02 fb 3f |...gcurrent."..?|
 0080 f6 66 66 66 66 66 66 a3 00 67 63 75 72 72 65 6e |.ffffff..gcurren|
 0090 74 06 21 02 f9 3e 00 a3 00 67 63 75 72 72 65 6e |t.!..>...gcurren|
 00a0 74 06 20 02 fb 3f f9 99 99 99 99 99 9a a3 00 67 |t. ..?.........g|
 00b0 63 75 72 72 65 6e 74 06 00 02 fb 3f fb 33 33 33 |current....?.333|
 00c0 33 33 33                                        |333|
`

// hexDump reads the bytes of a hexdump -C style listing.
func hexDump(t testing.TB, dump string) []byte {
	t.Helper()
	var b []byte
	for line := range strings.Lines(dump) {
		line, _, _ = strings.Cut(line, "|")
		fields := strings.Fields(line)
		if len(fields) < 2 {
			continue
		}
		p, err := hex.DecodeString(strings.Join(fields[1:], ""))
		if err != nil {
			t.Fatalf("hex dump line %q: %v", line, err)
		}
		b = append(b, p...)
	}
	return b
}

func TestRFCCBORExample(t *testing.T) {
	dump := hexDump(t, rfcCBOR)
	if len(dump) != 0xc3 {
		t.Fatalf("hex dump has %d bytes, want 0xc3", len(dump))
	}
	want, err := ParseJSON([]byte(strings.Replace(rfcExamples[5].json,
		`{"n":"current","v":1.7}`, `{"n":"current","t":0,"v":1.7}`, 1)))
	if err != nil {
		t.Fatal(err)
	}
	got, err := DecodeCBOR(dump)
	if err != nil {
		t.Fatalf("DecodeCBOR(RFC 8428 §6) error: %v", err)
	}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("DecodeCBOR(RFC 8428 §6) = %s, want %s", mustJSON(t, got), mustJSON(t, want))
	}
	enc, err := want.EncodeCBOR()
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(enc, dump) {
		t.Errorf("EncodeCBOR(§5.1.2 example) = %x, want RFC 8428 §6's %x", enc, dump)
	}
}
