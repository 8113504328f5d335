package senml

import (
	"bytes"
	"encoding/hex"
	"fmt"
	"math"
	"math/rand/v2"
	"reflect"
	"strings"
	"testing"
)

// Go values for CBOR items in these tests, where Go has no exact match.
type (
	negInt    uint64 // -1-n, for integers below math.MinInt64
	undefined struct{}
	simple    uint8 // a simple value other than false, true, null, undefined
	pair      struct{ k, v any }
	cborMap   []pair // keeps the order of the encoding
	raw       []byte // encoded already, for encodeAny
)

// decodeAny decodes one item with the decoder's primitives, for tests of
// them: SenML decoding uses them without building values.
func decodeAny(d *decoder, depth int) (any, error) {
	h, err := d.head()
	if err != nil {
		return nil, err
	}
	switch h.major {
	case majorUint:
		return h.arg, nil
	case majorNint:
		if h.arg <= math.MaxInt64 {
			return -1 - int64(h.arg), nil
		}
		return negInt(h.arg), nil
	case majorBytes, majorText:
		p, err := d.str(h)
		if err != nil {
			return nil, err
		}
		if h.major == majorText {
			return string(p), nil
		}
		return bytes.Clone(p), nil
	case majorArray, majorMap:
		if depth > MaxDepth {
			return nil, tooDeep(h.off)
		}
		a := []any{}
		m := cborMap{}
		for i := uint64(0); ; i++ {
			ok, err := d.more(h, i)
			if err != nil {
				return nil, err
			}
			if !ok {
				break
			}
			k, err := decodeAny(d, depth+1)
			if err != nil {
				return nil, err
			}
			if h.major == majorArray {
				a = append(a, k)
				continue
			}
			v, err := decodeAny(d, depth+1)
			if err != nil {
				return nil, err
			}
			m = append(m, pair{k, v})
		}
		if h.major == majorArray {
			return a, nil
		}
		return m, nil
	case majorTag:
		v, ok, err := d.number(h, depth)
		if !ok {
			return nil, err
		}
		return v, nil
	}
	switch {
	case h.isBreak():
		return nil, d.malformed(h.off, "break outside an indefinite-length item")
	case h.isFloat():
		return h.float(), nil
	case h.info == simpleFalse || h.info == simpleTrue:
		return h.info == simpleTrue, nil
	case h.info == simpleNull:
		return nil, nil
	case h.info == simpleUndefined:
		return undefined{}, nil
	}
	return simple(h.arg), nil
}

// encodeAny encodes what decodeAny returns, with the encoder's primitives.
func encodeAny(b []byte, v any) []byte {
	switch v := v.(type) {
	case uint64:
		return appendHead(b, majorUint, v)
	case int64:
		return appendInt(b, v)
	case int:
		return appendInt(b, int64(v))
	case negInt:
		return appendHead(b, majorNint, uint64(v))
	case float64:
		return appendFloat(b, v)
	case string:
		return appendText(b, v)
	case []byte:
		return appendBytes(b, v)
	case bool:
		return appendBool(b, v)
	case nil:
		return append(b, 0xf6)
	case raw:
		return append(b, v...)
	case []any:
		b = appendHead(b, majorArray, uint64(len(v)))
		for _, x := range v {
			b = encodeAny(b, x)
		}
		return b
	case cborMap:
		b = appendHead(b, majorMap, uint64(len(v)))
		for _, p := range v {
			b = encodeAny(encodeAny(b, p.k), p.v)
		}
		return b
	}
	panic(fmt.Sprintf("encodeAny: %T", v))
}

func unhex(t testing.TB, s string) []byte {
	t.Helper()
	b, err := hex.DecodeString(strings.ReplaceAll(strings.TrimPrefix(s, "0x"), " ", ""))
	if err != nil {
		t.Fatalf("bad hex %q: %v", s, err)
	}
	return b
}

func sameValue(a, b any) bool {
	if x, ok := a.(float64); ok {
		y, ok := b.(float64)
		if !ok {
			return false
		}
		// NaN is NaN; 0 is not -0.
		return math.IsNaN(x) && math.IsNaN(y) || x == y && math.Signbit(x) == math.Signbit(y)
	}
	return reflect.DeepEqual(a, b)
}

// appendixA are the examples of RFC 8949 Appendix A that this package
// decodes. preferred marks those in preferred serialization, which the
// encoder must reproduce.
var appendixA = []struct {
	hex       string
	value     any
	preferred bool
}{
	{"00", uint64(0), true},
	{"01", uint64(1), true},
	{"0a", uint64(10), true},
	{"17", uint64(23), true},
	{"1818", uint64(24), true},
	{"1819", uint64(25), true},
	{"1864", uint64(100), true},
	{"1903e8", uint64(1000), true},
	{"1a000f4240", uint64(1000000), true},
	{"1b000000e8d4a51000", uint64(1000000000000), true},
	{"1bffffffffffffffff", uint64(18446744073709551615), true},
	{"3bffffffffffffffff", negInt(18446744073709551615), true},
	{"20", int64(-1), true},
	{"29", int64(-10), true},
	{"3863", int64(-100), true},
	{"3903e7", int64(-1000), true},
	{"f90000", 0.0, true},
	{"f98000", math.Copysign(0, -1), true},
	{"f93c00", 1.0, true},
	{"fb3ff199999999999a", 1.1, true},
	{"f93e00", 1.5, true},
	{"f97bff", 65504.0, true},
	{"fa47c35000", 100000.0, true},
	{"fa7f7fffff", 3.4028234663852886e+38, true},
	{"fb7e37e43c8800759c", 1.0e+300, true},
	{"f90001", 5.960464477539063e-8, true},
	{"f90400", 0.00006103515625, true},
	{"f9c400", -4.0, true},
	{"fbc010666666666666", -4.1, true},
	{"f97c00", math.Inf(1), true},
	{"f97e00", math.NaN(), true},
	{"f9fc00", math.Inf(-1), true},
	{"fa7f800000", math.Inf(1), false},
	{"fa7fc00000", math.NaN(), false},
	{"faff800000", math.Inf(-1), false},
	{"fb7ff0000000000000", math.Inf(1), false},
	{"fb7ff8000000000000", math.NaN(), false},
	{"fbfff0000000000000", math.Inf(-1), false},
	{"f4", false, true},
	{"f5", true, true},
	{"f6", nil, true},
	{"f7", undefined{}, false},
	{"f0", simple(16), false},
	{"f8ff", simple(255), false},
	{"40", []byte{}, true},
	{"4401020304", []byte{1, 2, 3, 4}, true},
	{"60", "", true},
	{"6161", "a", true},
	{"6449455446", "IETF", true},
	{"62225c", "\"\\", true},
	{"62c3bc", "\u00fc", true},
	{"63e6b0b4", "\u6c34", true},
	{"64f0908591", "\U00010151", true},
	{"80", []any{}, true},
	{"83010203", []any{uint64(1), uint64(2), uint64(3)}, true},
	{"8301820203820405", []any{uint64(1), []any{uint64(2), uint64(3)}, []any{uint64(4), uint64(5)}}, true},
	{"98190102030405060708090a0b0c0d0e0f101112131415161718181819", oneTo25(), true},
	{"a0", cborMap{}, true},
	{"a201020304", cborMap{{uint64(1), uint64(2)}, {uint64(3), uint64(4)}}, true},
	{"a26161016162820203", cborMap{{"a", uint64(1)}, {"b", []any{uint64(2), uint64(3)}}}, true},
	{"826161a161626163", []any{"a", cborMap{{"b", "c"}}}, true},
	{"a56161614161626142616361436164614461656145", cborMap{{"a", "A"}, {"b", "B"}, {"c", "C"}, {"d", "D"}, {"e", "E"}}, true},
	{"5f42010243030405ff", []byte{1, 2, 3, 4, 5}, false},
	{"7f657374726561646d696e67ff", "streaming", false},
	{"9fff", []any{}, false},
	{"9f018202039f0405ffff", []any{uint64(1), []any{uint64(2), uint64(3)}, []any{uint64(4), uint64(5)}}, false},
	{"9f01820203820405ff", []any{uint64(1), []any{uint64(2), uint64(3)}, []any{uint64(4), uint64(5)}}, false},
	{"83018202039f0405ff", []any{uint64(1), []any{uint64(2), uint64(3)}, []any{uint64(4), uint64(5)}}, false},
	{"83019f0203ff820405", []any{uint64(1), []any{uint64(2), uint64(3)}, []any{uint64(4), uint64(5)}}, false},
	{"9f0102030405060708090a0b0c0d0e0f101112131415161718181819ff", oneTo25(), false},
	{"bf61610161629f0203ffff", cborMap{{"a", uint64(1)}, {"b", []any{uint64(2), uint64(3)}}}, false},
	{"826161bf61626163ff", []any{"a", cborMap{{"b", "c"}}}, false},
	{"bf6346756ef563416d7421ff", cborMap{{"Fun", true}, {"Amt", int64(-2)}}, false},
}

func oneTo25() []any {
	var a []any
	for i := range 25 {
		a = append(a, uint64(i+1))
	}
	return a
}

func TestAppendixA(t *testing.T) {
	for _, tc := range appendixA {
		t.Run(tc.hex, func(t *testing.T) {
			in := unhex(t, tc.hex)
			d := decoder{b: in}
			got, err := decodeAny(&d, 1)
			if err != nil || d.off != len(in) {
				t.Fatalf("decode(%s) = %#v, %v at byte %d, want %#v", tc.hex, got, err, d.off, tc.value)
			}
			if !sameValue(got, tc.value) {
				t.Errorf("decode(%s) = %#v, want %#v", tc.hex, got, tc.value)
			}
			d = decoder{b: in}
			if err := d.skipItem(1); err != nil || d.off != len(in) {
				t.Errorf("skip(%s) = %v at byte %d, want nil at %d", tc.hex, err, d.off, len(in))
			}
			if tc.preferred {
				if enc := encodeAny(nil, tc.value); !bytes.Equal(enc, in) {
					t.Errorf("encode(%#v) = %x, want %s", tc.value, enc, tc.hex)
				}
			}
		})
	}
}

// TestAppendixATags checks that the tagged examples of RFC 8949 Appendix A,
// and bignums, are rejected: SenML has no use for them.
func TestAppendixATags(t *testing.T) {
	for _, h := range []string{
		"c249010000000000000000", // 18446744073709551616
		"c349010000000000000000", // -18446744073709551617
		"c074323031332d30332d32315432303a30343a30305a",
		"c11a514b67b0",
		"c1fb41d452d9ec200000",
		"d74401020304",
		"d818456449455446",
		"d82076687474703a2f2f7777772e6578616d706c652e636f6d",
	} {
		t.Run(h, func(t *testing.T) {
			d := decoder{b: unhex(t, h)}
			err := d.skipItem(1)
			if err == nil || !strings.Contains(err.Error(), "unsupported CBOR tag") {
				t.Errorf("skip(%s) = %v, want unsupported tag", h, err)
			}
		})
	}
}

// TestNotWellFormed runs the examples of RFC 8949 Appendix F.1, and the
// two-byte simple values below 32 (§3.3).
func TestNotWellFormed(t *testing.T) {
	for _, group := range []struct{ name, items string }{
		{"end of input in a head", "18, 19, 1a, 1b, 19 01, 1a 01 02, 1b 01 02 03 04 05 06 07, 38, 58, 78, 98, 9a 01 ff 00, b8, d8, f8, f9 00, fa 00 00, fb 00 00 00"},
		{"definite-length strings with short data", "41, 61, 5a ff ff ff ff 00, 5b ff ff ff ff ff ff ff ff 01 02 03, 7a ff ff ff ff 00, 7b 7f ff ff ff ff ff ff ff 01 02 03"},
		{"definite-length maps and arrays not closed", "81, 81 81 81 81 81 81 81 81 81, 82 00, a1, a2 01 02, a1 00, a2 00 00 00"},
		{"tag number not followed by tag content", "c0, c4"},
		{"indefinite-length strings not closed", "5f 41 00, 7f 61 00"},
		{"indefinite-length maps and arrays not closed", "9f, 9f 01 02, bf, bf 01 02 01 02, 81 9f, 9f 80 00, 9f 9f 9f 9f 9f ff ff ff ff, 9f 81 9f 81 9f 9f ff ff ff"},
		{"reserved additional information", "1c, 1d, 1e, 3c, 3d, 3e, 5c, 5d, 5e, 7c, 7d, 7e, 9c, 9d, 9e, bc, bd, be, dc, dd, de, fc, fd, fe"},
		{"reserved two-byte simple values", "f8 00, f8 01, f8 18, f8 1f"},
		{"indefinite-length string chunks of the wrong type", "5f 00 ff, 5f 21 ff, 5f 61 00 ff, 5f 80 ff, 5f a0 ff, 5f c0 00 ff, 5f e0 ff, 7f 41 00 ff"},
		{"indefinite-length string chunks of indefinite length", "5f 5f 41 00 ff ff, 7f 7f 61 00 ff ff"},
		{"break on its own", "ff"},
		{"break in a definite-length array, map or tag", "81 ff, 82 00 ff, a1 ff, a1 ff 00, a1 00 ff, a2 00 00 ff, 9f 81 ff, 9f 82 9f 81 9f 9f ff ff ff ff, c4 ff"},
		{"break in a map's value position", "bf 00 ff, bf 00 00 00 ff"},
		{"indefinite length on major types 0, 1 and 6", "1f, 3f, df"},
		{"text chunk that splits a character", "7f 61 c3 61 bc ff"},
	} {
		t.Run(group.name, func(t *testing.T) {
			for item := range strings.SplitSeq(group.items, ", ") {
				in := unhex(t, item)
				d := decoder{b: in}
				if err := d.skipItem(1); err == nil && d.off == len(in) {
					t.Errorf("skip(%s) = nil, want an error", item)
				}
				d = decoder{b: in}
				if v, err := decodeAny(&d, 1); err == nil && d.off == len(in) {
					t.Errorf("decode(%s) = %#v, want an error", item, v)
				}
				if p, err := DecodeCBOR(in); err == nil {
					t.Errorf("DecodeCBOR(%s) = %v, want an error", item, p)
				}
			}
		})
	}
}

func TestDecimalFraction(t *testing.T) {
	for _, tc := range []struct {
		hex  string
		want float64
		err  string
	}{
		{hex: "c482211a6ab3", err: "end of input"},
		{hex: "c48221196ab3", want: 273.15}, // RFC 8949 §3.4.4
		{hex: "c482202f", want: -1.6},
		{hex: "c4820000", want: 0},
		{hex: "c482003bffffffffffffffff", want: -18446744073709551616},
		{hex: "c4823bffffffffffffffff01", want: 0},
		{hex: "c4821bffffffffffffffff01", want: math.Inf(1)},
		{hex: "c4821bffffffffffffffff00", want: 0},
		{hex: "c49f2119 6ab3ff", want: 273.15},
		{hex: "c481 21", err: "1 items"},
		{hex: "c483 21 01 01", err: "more than two items"},
		{hex: "c4a0", err: "content is a map"},
		{hex: "c48221c249010000000000000000", err: "an item is tag 2"},
		{hex: "c482f93c0001", err: "an item is a float"},
		{hex: "c4c48221196ab3", err: "content is tag 4"},
	} {
		t.Run(tc.hex, func(t *testing.T) {
			d := decoder{b: unhex(t, tc.hex)}
			h, err := d.head()
			if err != nil {
				t.Fatal(err)
			}
			got, ok, err := d.number(h, 3)
			if tc.err != "" {
				if err == nil || !strings.Contains(err.Error(), tc.err) {
					t.Errorf("number(%s) = %v, %v, want error %q", tc.hex, got, err, tc.err)
				}
				return
			}
			if err != nil || !ok || got != tc.want {
				t.Errorf("number(%s) = %v, %v, %v, want %v", tc.hex, got, ok, err, tc.want)
			}
		})
	}
}

func TestAppendNumber(t *testing.T) {
	for _, tc := range []struct {
		v    float64
		want string
	}{
		{0, "00"},
		{math.Copysign(0, -1), "f98000"}, // an integer would lose the sign
		{1, "01"},
		{-1, "20"},
		{23.0, "17"},
		{-5, "24"},
		{1.5, "f93e00"},
		{1.2, "fb3ff3333333333333"},
		{100000, "1a000186a0"},     // float32 is as long: the integer wins
		{65536, "1a00010000"},      // likewise
		{4096, "191000"},           // float16 is as long
		{1 << 32, "fa4f800000"},    // float32 is shorter than the 9-byte integer
		{-(1 << 63), "fadf000000"}, // likewise
		{1320067464, "1a4eaea188"},
		{1276020076.001, "fb41d303a15b001062"},
		{18446744073709549568, "1bfffffffffffff800"}, // the largest float64 below 2^64
		{1 << 64, "fa5f800000"},
		{-(1 << 64), "fadf800000"},
		{1e300, "fb7e37e43c8800759c"},
		{65504.5, "fa477fe080"},
		{5.960464477539063e-8, "f90001"},
	} {
		if got := appendNumber(nil, tc.v); hex.EncodeToString(got) != tc.want {
			t.Errorf("appendNumber(%v) = %x, want %s", tc.v, got, tc.want)
		}
	}
	// Whatever the form, the number reads back exactly.
	rng := rand.New(rand.NewPCG(3, 4))
	for range 100000 {
		v := math.Float64frombits(rng.Uint64())
		if rng.IntN(2) == 0 {
			v = math.Trunc(math.Ldexp(rng.Float64()-0.5, rng.IntN(70)))
		}
		if math.IsNaN(v) || math.IsInf(v, 0) {
			continue
		}
		enc := appendNumber(nil, v)
		d := decoder{b: enc}
		h, err := d.head()
		if err != nil {
			t.Fatal(err)
		}
		got, ok, err := d.number(h, 3)
		if !ok || err != nil || got != v || math.Signbit(got) != math.Signbit(v) || d.off != len(enc) {
			t.Errorf("number(appendNumber(%v) = %x) = %v, %v, %v", v, enc, got, ok, err)
		}
		if len(enc) > len(appendFloat(nil, v)) {
			t.Errorf("appendNumber(%v) = %x, longer than appendFloat's %x", v, enc, appendFloat(nil, v))
		}
	}
}

// TestFloat16 checks float16Bits against every float16 value, and that
// appendFloat picks float16 exactly when it holds the value.
func TestFloat16(t *testing.T) {
	halves := make(map[float64]uint16)
	for h := range 1 << 16 {
		v := float16Value(uint16(h))
		if math.IsNaN(v) || math.IsInf(v, 0) {
			continue
		}
		if v == 0 && h != 0 && h != 0x8000 {
			t.Fatalf("float16Value(%#04x) = 0", h)
		}
		got, ok := float16Bits(v)
		if !ok || got != uint16(h) {
			t.Errorf("float16Bits(float16Value(%#04x) = %v) = %#04x, %v, want %#04x, true", h, v, got, ok, h)
		}
		if v != 0 {
			halves[v] = uint16(h)
		}
	}
	rng := rand.New(rand.NewPCG(1, 2))
	for range 100000 {
		var v float64
		if rng.IntN(2) == 0 {
			v = float64(math.Float32frombits(rng.Uint32()))
		} else {
			// Near float16: few significant bits, exponents around its range.
			v = math.Ldexp(float64(rng.IntN(1<<12)), rng.IntN(60)-40)
		}
		if math.IsNaN(v) || math.IsInf(v, 0) || v == 0 {
			continue
		}
		enc := appendFloat(nil, v)
		_, isHalf := halves[v]
		if (len(enc) == 3) != isHalf {
			t.Errorf("appendFloat(%v) = %x; float16 holds it: %v", v, enc, isHalf)
		}
		d := decoder{b: enc}
		if got, err := decodeAny(&d, 1); err != nil || got != v {
			t.Errorf("decode(appendFloat(%v) = %x) = %v, %v", v, enc, got, err)
		}
	}
}

// TestDeclaredLengths checks that lengths and counts are not trusted
// beyond the input, and that nesting is bounded.
func TestDeclaredLengths(t *testing.T) {
	for _, tc := range []struct {
		name, hex, err string
	}{
		{"huge byte string", "5bffffffffffffffff00", "end of input"},
		{"huge array", "9bffffffffffffffff00", "end of input"},
		{"huge map", "bb7fffffffffffffff0000", "end of input"},
		{"map count beyond input", "a3000000", "end of input"},
		{"nesting", strings.Repeat("81", MaxDepth+1) + "00", "nests deeper than 16"},
		{"indefinite nesting", strings.Repeat("9f", MaxDepth+1) + strings.Repeat("ff", MaxDepth+1), "nests deeper than 16"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			d := decoder{b: unhex(t, tc.hex)}
			err := d.skipItem(1)
			if err == nil || !strings.Contains(err.Error(), tc.err) {
				t.Errorf("skip(%s) = %v, want error %q", tc.hex, err, tc.err)
			}
		})
	}
	ok := strings.Repeat("81", MaxDepth) + "00"
	d := decoder{b: unhex(t, ok)}
	if err := d.skipItem(1); err != nil {
		t.Errorf("skip(%d nested arrays) = %v, want nil", MaxDepth, err)
	}
}
