package senml

import (
	"encoding/json"
	"errors"
	"math"
	"reflect"
	"strings"
	"testing"
)

func TestParseJSONInvalid(t *testing.T) {
	long := func(n int) string { return strings.Repeat("x", n) }
	nested := func(n int) string { return strings.Repeat("[", n) + strings.Repeat("]", n) }
	for _, tc := range []struct {
		name, in, err string
	}{
		{"object, not array", `{"n":"a","v":1}`, `senml: pack is an object, want an array of records`},
		{"string, not array", `"x"`, `senml: pack is a string, want an array of records`},
		{"empty pack", `[]`, `senml: pack has no records`},
		{"record not object", `[{"n":"a","v":1},1]`, `senml: record 1 is a number, want an object`},
		{"v string", `[{"n":"a","v":1},{"n":"b","v":1},{"n":"c","v":1},{"n":"d","v":"x"}]`, `senml: record 3: "v" is a string, want a number`},
		{"v null", `[{"n":"a","v":null}]`, `senml: record 0: "v" is null, want a number`},
		{"v array", `[{"n":"a","v":[1]}]`, `senml: record 0: "v" is an array, want a number`},
		{"t object", `[{"n":"a","v":1,"t":{}}]`, `senml: record 0: "t" is an object, want a number`},
		{"bt string", `[{"bt":"1","n":"a","v":1}]`, `senml: record 0: "bt" is a string, want a number`},
		{"n number", `[{"n":1,"v":1}]`, `senml: record 0: "n" is a number, want a string`},
		{"bn boolean", `[{"bn":true,"v":1}]`, `senml: record 0: "bn" is a boolean, want a string`},
		{"u number", `[{"n":"a","u":1,"v":1}]`, `senml: record 0: "u" is a number, want a string`},
		{"vs number", `[{"n":"a","vs":1}]`, `senml: record 0: "vs" is a number, want a string`},
		{"vb number", `[{"n":"a","vb":1}]`, `senml: record 0: "vb" is a number, want a boolean`},
		{"vd number", `[{"n":"a","vd":1}]`, `senml: record 0: "vd" is a number, want a string`},
		{"vd std alphabet", `[{"n":"a","vd":"a+b/"}]`, `senml: record 0: "vd" is not base64url without padding`},
		{"vd padded", `[{"n":"a","vd":"aGkgCg=="}]`, `senml: record 0: "vd" is not base64url without padding`},
		{"seq string", `[{"n":"a","v":1,"seq":"1"}]`, `senml: record 0: "seq" is a string, want a number`},
		{"seq negative", `[{"n":"a","v":1,"seq":-1}]`, `senml: record 0: "seq" -1 is not an integer from 0 to 2^64-1`},
		{"seq fraction", `[{"n":"a","v":1,"seq":1.5}]`, `senml: record 0: "seq" 1.5 is not an integer from 0 to 2^64-1`},
		{"seq too big", `[{"n":"a","v":1,"seq":18446744073709551616}]`, `"seq" 18446744073709551616 is not an integer`},
		{"v and vs", `[{"n":"a","v":1,"vs":"x"}]`, `senml: record 0: has both "v" and "vs", want at most one value`},
		{"vb and vd", `[{"n":"a","vb":true,"vd":""}]`, `senml: record 0: has both "vb" and "vd", want at most one value`},
		{"no value", `[{"n":"a","v":1},{"n":"b"}]`, `senml: record 1: has no value or sum`},
		{"time, no value", `[{"n":"a","t":5}]`, `senml: record 0: has no value or sum`},
		{"no name", `[{"v":1}]`, `senml: record 0: name is empty`},
		{"empty base name resets", `[{"bn":"a","v":1},{"bn":"","v":1}]`, `senml: record 1: name is empty`},
		{"name first character", `[{"n":"_x","v":1}]`, `senml: record 0: name "_x" starts with '_', want a letter or digit`},
		{"name concatenated", `[{"bn":"dev:","n":"t€mp","v":1}]`, `senml: record 0: name "dev:t€mp" has '€' at byte 5, want only letters, digits and - : . / _`},
		{"name space", `[{"n":"a b","v":1}]`, `senml: record 0: name "a b" has ' ' at byte 1`},
		{"base name", `[{"bn":"a b"}]`, `senml: record 0: "bn" "a b" has ' ' at byte 1`},
		{"base name first character", `[{"bn":"/a"}]`, `senml: record 0: "bn" "/a" starts with '/'`},
		{"name too long", `[{"bn":"` + long(200) + `","n":"` + long(56) + `","v":1}]`, `senml: record 0: name is 256 bytes long, more than 255`},
		{"must understand", `[{"n":"a","v":1,"foo_":1}]`, `senml: record 0: label "foo_" must be understood and is not supported`},
		{"duplicate known", `[{"n":"a","v":1,"v":2}]`, `senml: record 0: label "v" appears twice`},
		{"duplicate seq", `[{"n":"a","v":1,"seq":1,"seq":1}]`, `senml: record 0: label "seq" appears twice`},
		{"duplicate unknown", `[{"n":"a","v":1,"x":1,"x":[2]}]`, `senml: record 0: label "x" appears twice`},
		{"duplicate escaped", `[{"n":"a","v":1,"\u0076":2}]`, `senml: record 0: label "v" appears twice`},
		{"v out of range", `[{"n":"a","v":1e999}]`, `senml: record 0: "v" is not a finite number`},
		{"bt out of range", `[{"bt":-1e999,"n":"a","v":1}]`, `senml: record 0: "bt" is not a finite number`},
		{"bver newer", `[{"bver":11,"n":"a","v":1}]`, `senml: record 0: "bver" 11 is newer than version 10, not supported`},
		{"bver huge", `[{"bver":1e999,"n":"a","v":1}]`, `senml: record 0: "bver" 1e999 is newer than version 10, not supported`},
		{"bver zero", `[{"bver":0,"n":"a","v":1}]`, `senml: record 0: "bver" 0 is not a positive integer`},
		{"bver fraction", `[{"bver":5.5,"n":"a","v":1}]`, `senml: record 0: "bver" 5.5 is not a positive integer`},
		{"bver string", `[{"bver":"5","n":"a","v":1}]`, `senml: record 0: "bver" is a string, want a number`},
		{"bver changes", `[{"bver":5,"n":"a","v":1},{"bver":6,"n":"b","v":1}]`, `senml: record 1: "bver" 6 differs from the pack's version 5`},
		{"bver after default", `[{"n":"a","v":1},{"bver":5,"n":"b","v":1}]`, `senml: record 1: "bver" 5 differs from the pack's version 10`},
		{"garbage after", `[{"n":"a","v":1}] x`, `senml: malformed JSON at byte 18: invalid character 'x' after top-level value`},
		{"second pack", `[{"n":"a","v":1}][{"n":"a","v":1}]`, `senml: malformed JSON at byte 17: invalid character '[' after top-level value`},
		{"truncated", `[{"n":"a","v":1}`, `senml: malformed JSON: unexpected end of input`},
		{"empty input", ``, `senml: malformed JSON: unexpected end of input`},
		{"missing comma", `[{"n":"a" "v":1}]`, `senml: malformed JSON at byte 10`},
		{"trailing comma", `[{"n":"a","v":1,}]`, `senml: malformed JSON at byte 16`},
		{"not UTF-8", "[{\"n\":\"a\",\"vs\":\"\xff\"}]", `senml: JSON is not valid UTF-8`},
		{"nesting", `[{"n":"a","v":1,"x":` + nested(MaxDepth-1) + `}]`, `senml: JSON nests deeper than 16 at byte 34`},
		{"too many records", "[" + strings.Repeat(`{"n":"a","v":1},`, MaxRecords) + `{"n":"a","v":1}]`, `senml: pack has more than 10000 records`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p, err := ParseJSON([]byte(tc.in))
			if err == nil || !strings.Contains(err.Error(), tc.err) {
				t.Fatalf("ParseJSON(%.80s) = %v, %v, want error %q", tc.in, p, err, tc.err)
			}
			if !errors.Is(err, ErrInvalid) {
				t.Errorf("ParseJSON(%.80s) error %v does not match ErrInvalid", tc.in, err)
			}
		})
	}
}

func TestParseJSONValid(t *testing.T) {
	for _, tc := range []struct {
		name, in string
		want     Pack
	}{
		{"sum only", `[{"n":"a","s":5}]`, Pack{{Name: "a", Sum: new(5.0)}}},
		{"base fields only", `[{"bn":"a:","bt":5},{"bu":"V"}]`, Pack{{BaseName: new("a:"), BaseTime: new(5.0)}, {BaseUnit: new("V")}}},
		{"unknown labels skipped", `[{"n":"a","v":1,"x":{"y":[1,{"z":null}]},"ü":"3","bz":true}]`, Pack{{Name: "a", Value: new(1.0)}}},
		{"nesting at the limit", `[{"n":"a","v":1,"x":` + strings.Repeat("[", MaxDepth-2) + strings.Repeat("]", MaxDepth-2) + `}]`, Pack{{Name: "a", Value: new(1.0)}}},
		{"empty values", `[{"n":"a","vs":""},{"n":"b","vd":""}]`, Pack{{Name: "a", StringValue: new("")}, {Name: "b", DataValue: []byte{}}}},
		{"units pass through", `[{"bu":"m/s²","n":"a","u":"my unit \"x\"","v":1}]`, Pack{{BaseUnit: new("m/s²"), Name: "a", Unit: `my unit "x"`, Value: new(1.0)}}},
		{"seq", `[{"n":"a","v":1,"seq":18446744073709551615}]`, Pack{{Name: "a", Value: new(1.0), Seq: math.MaxUint64}}},
		{"bver integral", `[{"bver":5.0,"n":"a","v":1},{"bver":5,"n":"b","v":-0}]`, Pack{{BaseVersion: new(5), Name: "a", Value: new(1.0)}, {BaseVersion: new(5), Name: "b", Value: new(math.Copysign(0, -1))}}},
		{"bver 10 after default", `[{"n":"a","v":1},{"bver":10,"n":"b","v":1}]`, Pack{{Name: "a", Value: new(1.0)}, {BaseVersion: new(10), Name: "b", Value: new(1.0)}}},
		{"name at the limit", `[{"bn":"` + strings.Repeat("x", 200) + `","n":"` + strings.Repeat("y", 55) + `","v":1}]`,
			Pack{{BaseName: new(strings.Repeat("x", 200)), Name: strings.Repeat("y", 55), Value: new(1.0)}}},
		{"name characters", `[{"n":"Az09-:./_","v":1}]`, Pack{{Name: "Az09-:./_", Value: new(1.0)}}},
		{"escapes", `[{"n":"a","vs":"\u00fc\ud83d\ude00\ud800x\udc00\ud800\u0041\\\/\b\f\n\r\t\"é"}]`,
			Pack{{Name: "a", StringValue: new("ü😀\uFFFDx\uFFFD\uFFFDA\\/\b\f\n\r\t\"é")}}},
		{"escaped labels", `[{"\u006e":"a","\u0076s":"x","z":"\"}]"}]`, Pack{{Name: "a", StringValue: new("x")}}},
		{"white space", " \t\r\n[ { \"n\" : \"a\" , \"v\" : 1 } ] \n", Pack{{Name: "a", Value: new(1.0)}}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := ParseJSON([]byte(tc.in))
			if err != nil || !reflect.DeepEqual(got, tc.want) {
				t.Errorf("ParseJSON(%.80s) = %s, %v, want %s", tc.in, mustJSON(t, got), err, mustJSON(t, tc.want))
			}
		})
	}
}

// rec is a CBOR record map, for readable test input.
func rec(kv ...any) cborMap {
	var m cborMap
	for i := 0; i < len(kv); i += 2 {
		m = append(m, pair{kv[i], kv[i+1]})
	}
	return m
}

func TestDecodeCBORInvalid(t *testing.T) {
	ok := rec(0, "a", 2, 1)
	for _, tc := range []struct {
		name string
		in   any
		err  string
	}{
		{"map, not array", ok, `senml: pack is a map, want an array of records`},
		{"empty pack", []any{}, `senml: pack has no records`},
		{"record not map", []any{ok, []any{}}, `senml: record 1 is an array, want a map`},
		{"v text", []any{ok, ok, ok, rec(0, "d", 2, "x")}, `senml: record 3: "v" is a text string, want a number`},
		{"v null", []any{rec(0, "a", 2, nil)}, `senml: record 0: "v" is null, want a number`},
		{"v boolean", []any{rec(0, "a", 2, true)}, `senml: record 0: "v" is a boolean, want a number`},
		{"v bytes", []any{rec(0, "a", 2, []byte{1})}, `senml: record 0: "v" is a byte string, want a number`},
		{"v infinite", []any{rec(0, "a", 2, math.Inf(1))}, `senml: record 0: "v" is not a finite number`},
		{"v NaN", []any{rec(0, "a", 2, math.NaN())}, `senml: record 0: "v" is not a finite number`},
		{"t NaN float32", []any{rec(0, "a", 2, 1, 6, raw{0xfa, 0x7f, 0xc0, 0, 0})}, `senml: record 0: "t" is not a finite number`},
		{"v tag 1", []any{rec(0, "a", 2, raw{0xc1, 0x01})}, `senml: unsupported CBOR tag 1 at byte 6`},
		{"v decimal fraction too big", []any{rec(0, "a", 2, raw(unhex(t, "c482190fa001")))}, `senml: record 0: "v" is not a finite number`},
		{"n bytes", []any{rec(0, []byte("a"), 2, 1)}, `senml: record 0: "n" is a byte string, want a text string`},
		{"n integer", []any{rec(0, 1, 2, 1)}, `senml: record 0: "n" is an unsigned integer, want a text string`},
		{"vs float", []any{rec(0, "a", 3, 1.5)}, `senml: record 0: "vs" is a float, want a text string`},
		{"vb integer", []any{rec(0, "a", 4, 1)}, `senml: record 0: "vb" is an unsigned integer, want a boolean`},
		{"vb undefined", []any{rec(0, "a", 4, raw{0xf7})}, `senml: record 0: "vb" is undefined, want a boolean`},
		{"vd text", []any{rec(0, "a", 8, "aGk")}, `senml: record 0: "vd" is a text string, want a byte string`},
		{"bver float", []any{rec(-1, 5.0, 0, "a", 2, 1)}, `senml: record 0: "bver" is a float, want an unsigned integer`},
		{"bver newer", []any{rec(-1, 11, 0, "a", 2, 1)}, `senml: record 0: "bver" 11 is newer than version 10, not supported`},
		{"bver huge", []any{rec(-1, uint64(math.MaxUint64), 0, "a", 2, 1)}, `senml: record 0: "bver" 18446744073709551615 is newer than version 10`},
		{"bver zero", []any{rec(-1, 0, 0, "a", 2, 1)}, `senml: record 0: "bver" 0 is not a positive integer`},
		{"bver changes", []any{rec(-1, 5, 0, "a", 2, 1), rec(-1, 6, 0, "b", 2, 1)}, `senml: record 1: "bver" 6 differs from the pack's version 5`},
		{"seq negative", []any{rec(0, "a", 2, 1, "seq", -1)}, `senml: record 0: "seq" is a negative integer, want an unsigned integer`},
		{"seq float", []any{rec(0, "a", 2, 1, "seq", 1.0)}, `senml: record 0: "seq" is a float, want an unsigned integer`},
		{"text label for an integer one", []any{rec("n", "a", 2, 1)}, `senml: record 0: text label "n", want the integer label 0`},
		{"text label bver", []any{rec(0, "a", 2, 1, "bver", 5)}, `senml: record 0: text label "bver", want the integer label -1`},
		{"label bytes", []any{rec(0, "a", 2, 1, []byte("x"), 1)}, `senml: record 0: a label is a byte string, want an integer or a text string`},
		{"label float", []any{rec(0, "a", 2, 1, 1.5, 1)}, `senml: record 0: a label is a float, want an integer or a text string`},
		{"label tag", []any{rec(0, "a", 2, 1, raw{0xc1, 0x01}, 1)}, `senml: record 0: a label is tag 1, want an integer or a text string`},
		{"must understand", []any{rec(0, "a", 2, 1, "foo_", 1)}, `senml: record 0: label "foo_" must be understood and is not supported`},
		{"v and vb", []any{rec(0, "a", 2, 1, 4, false)}, `senml: record 0: has both "v" and "vb", want at most one value`},
		{"no value", []any{rec(0, "a", 6, 1)}, `senml: record 0: has no value or sum`},
		{"no name", []any{rec(2, 1)}, `senml: record 0: name is empty`},
		{"bad name", []any{rec(-2, "a:", 0, "b c", 2, 1)}, `senml: record 0: name "a:b c" has ' ' at byte 3`},
		{"duplicate known", []any{rec(0, "a", 2, 1, 0, "b")}, `senml: record 0: label "n" appears twice`},
		{"duplicate seq", []any{rec(0, "a", 2, 1, "seq", 1, "seq", 2)}, `senml: record 0: label "seq" appears twice`},
		{"duplicate unknown", []any{rec(0, "a", 2, 1, 9, 1, 9, 2)}, `senml: record 0: label 9 appears twice`},
		{"duplicate unknown negative", []any{rec(0, "a", 2, 1, -7, 1, -7, 2)}, `senml: record 0: label -7 appears twice`},
		{"duplicate unknown text", []any{rec(0, "a", 2, 1, "x", 1, "x", 2)}, `senml: record 0: label "x" appears twice`},
		{"duplicate unknown text, in chunks", []any{rec(0, "a", 2, 1, "xy", 1, raw(unhex(t, "7f6178617960ff")), 2)}, `senml: record 0: label "xy" appears twice`},
		{"duplicate unknown, longer head", []any{rec(0, "a", 2, 1, 9, 1, raw{0x18, 0x09}, 2)}, `senml: record 0: label 9 appears twice`},
		{"text not UTF-8", []any{rec(0, "a", 3, raw{0x61, 0xff})}, `senml: malformed CBOR at byte 6: text string is not valid UTF-8`},
		{"tag in unknown field", []any{rec(0, "a", 2, 1, 9, raw{0xd8, 0x20, 0x60})}, `senml: unsupported CBOR tag 32 at byte 8`},
		{"two-byte simple value", []any{rec(0, "a", 2, 1, 9, raw{0xf8, 0x18})}, `senml: malformed CBOR at byte 8: simple value 24 in two bytes`},
		{"nesting", []any{rec(0, "a", 2, 1, 9, raw(unhex(t, strings.Repeat("81", MaxDepth-1)+"00")))}, `senml: CBOR nests deeper than 16 at byte 22`},
		{"trailing bytes", raw(append(unhex(t, "81a2006161 0201"), 0)), `senml: CBOR continues after the pack, at byte 7`},
		{"truncated", raw(unhex(t, "81a200616102")), `senml: malformed CBOR: unexpected end of input at byte 6`},
		{"declared records beyond input", raw(unhex(t, "9864a2006161 0201")), `unexpected end of input`},
		{"declared records beyond the limit", raw(unhex(t, "992711")), `senml: pack has 10001 records, more than 10000`},
		{"declared records huge", raw(unhex(t, "9bffffffffffffffff")), `senml: pack has 18446744073709551615 records, more than 10000`},
		{"too many records", raw(append(append([]byte{0x9f}, []byte(strings.Repeat("\xa2\x00\x61\x61\x02\x01", MaxRecords+1))...), 0xff)), `senml: pack has more than 10000 records`},
		{"indefinite pack not closed", raw(unhex(t, "9fa2006161 0201")), `unexpected end of input`},
		{"break in value position", raw(unhex(t, "81bf006161 02ff")), `senml: record 0: "v" is a break, want a number`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			in := encodeAny(nil, tc.in)
			p, err := DecodeCBOR(in)
			if err == nil || !strings.Contains(err.Error(), tc.err) {
				t.Fatalf("DecodeCBOR(%.60x) = %v, %v, want error %q", in, p, err, tc.err)
			}
			if !errors.Is(err, ErrInvalid) {
				t.Errorf("DecodeCBOR(%.60x) error %v does not match ErrInvalid", in, err)
			}
		})
	}
}

func TestDecodeCBORValid(t *testing.T) {
	for _, tc := range []struct {
		name string
		in   any
		want Pack
	}{
		{
			"all fields",
			[]any{rec(-2, "d:", -3, 1700000000, -4, "V", -5, 1.5, -6, 0, -1, 10, 0, "a", 1, "A", 6, -1, 7, 60, 2, 0.25, 5, 3, "seq", 7)},
			Pack{{BaseName: new("d:"), BaseTime: new(1700000000.0), BaseUnit: new("V"), BaseValue: new(1.5), BaseSum: new(0.0), BaseVersion: new(10),
				Name: "a", Unit: "A", Time: new(-1.0), UpdateTime: new(60.0), Value: new(0.25), Sum: new(3.0), Seq: 7}},
		},
		{
			"other values",
			[]any{rec(0, "a", 3, "x"), rec(0, "b", 4, true), rec(0, "c", 8, []byte{1, 2})},
			Pack{{Name: "a", StringValue: new("x")}, {Name: "b", BoolValue: new(true)}, {Name: "c", DataValue: []byte{1, 2}}},
		},
		{
			"unknown labels skipped",
			[]any{rec(0, "a", 2, 1, 9, cborMap{{"x", []any{nil, raw{0xf7}, raw{0xf0}, raw{0xf8, 0xff}}}}, -7, raw(unhex(t, "c48221196ab3")), "x", "y", "_x", 1)},
			Pack{{Name: "a", Value: new(1.0)}},
		},
		{
			"indefinite lengths",
			raw(unhex(t, "9f bf 00 7f 61 61 60 62 62 63 ff 08 5f 41 01 40 ff 63 73 65 71 05 ff bf 00 61 64 05 20 ff ff")),
			Pack{{Name: "abc", DataValue: []byte{1}, Seq: 5}, {Name: "d", Sum: new(-1.0)}},
		},
		{
			"floats",
			[]any{rec(0, "a", 2, raw{0xf9, 0x3e, 0x00}, 6, raw{0xfa, 0x47, 0xc3, 0x50, 0x00}, 5, raw(unhex(t, "fb3ff199999999999a")))},
			Pack{{Name: "a", Value: new(1.5), Time: new(100000.0), Sum: new(1.1)}},
		},
		{
			"decimal fraction",
			[]any{rec(0, "a", 2, raw(unhex(t, "c48221196ab3")))},
			Pack{{Name: "a", Value: new(273.15)}},
		},
		{
			"integers at the edges",
			[]any{rec(0, "a", 2, uint64(math.MaxUint64), 5, negInt(math.MaxUint64), "seq", uint64(math.MaxUint64))},
			Pack{{Name: "a", Value: new(18446744073709551615.0), Sum: new(-18446744073709551616.0), Seq: math.MaxUint64}},
		},
		{
			"negative integer beyond 2^53", // one rounding, not two
			[]any{rec(0, "a", 2, int64(-16824050012815078))},
			Pack{{Name: "a", Value: new(-16824050012815078.0)}},
		},
		{
			"non-preferred heads",
			raw(unhex(t, "9a00000001 b90002 1800 7800 1802 1b0000000000000001")),
			Pack{{Name: "", Value: new(1.0)}},
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			in := encodeAny(nil, tc.in)
			got, err := DecodeCBOR(in)
			if tc.name == "non-preferred heads" {
				// An empty name is valid only with a base name.
				if err == nil || !strings.Contains(err.Error(), "name is empty") {
					t.Errorf("DecodeCBOR(%x) = %v, want name is empty", in, err)
				}
				return
			}
			if err != nil || !reflect.DeepEqual(got, tc.want) {
				t.Errorf("DecodeCBOR(%x) = %s, %v, want %s", in, mustJSON(t, got), err, mustJSON(t, tc.want))
			}
		})
	}
}

// TestEncodeInvalid checks that the encoders refuse what the parsers would.
func TestEncodeInvalid(t *testing.T) {
	for _, tc := range []struct {
		name string
		p    Pack
		err  string
	}{
		{"empty", Pack{}, `senml: pack has no records`},
		{"NaN", Pack{{Name: "a", Value: new(math.NaN())}}, `senml: record 0: "v" is not a finite number`},
		{"infinite time", Pack{{Name: "a", Value: new(1.0)}, {Name: "a", Value: new(1.0), Time: new(math.Inf(-1))}}, `senml: record 1: "t" is not a finite number`},
		{"two values", Pack{{Name: "a", Value: new(1.0), DataValue: []byte{}}}, `senml: record 0: has both "v" and "vd"`},
		{"no value", Pack{{Name: "a", Unit: "V"}}, `senml: record 0: has no value or sum`},
		{"bad name", Pack{{Name: "a\x00", Value: new(1.0)}}, `senml: record 0: name "a\x00" has '\x00' at byte 1`},
		{"unit not UTF-8", Pack{{Name: "a", Unit: "\xff", Value: new(1.0)}}, `senml: record 0: "u" is not valid UTF-8`},
		{"base unit not UTF-8", Pack{{BaseUnit: new("\xff")}}, `senml: record 0: "bu" is not valid UTF-8`},
		{"string value not UTF-8", Pack{{Name: "a", StringValue: new("\xc3")}}, `senml: record 0: "vs" is not valid UTF-8`},
		{"bver negative", Pack{{BaseVersion: new(-1), Name: "a", Value: new(1.0)}}, `senml: record 0: "bver" -1 is not a positive integer`},
		{"too many", make(Pack, MaxRecords+1), `senml: pack has 10001 records, more than 10000`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			for _, enc := range []struct {
				name string
				f    func(Pack) ([]byte, error)
			}{{"EncodeJSON", Pack.EncodeJSON}, {"EncodeCBOR", Pack.EncodeCBOR}} {
				b, err := enc.f(tc.p)
				if err == nil || !strings.Contains(err.Error(), tc.err) || !errors.Is(err, ErrInvalid) {
					t.Errorf("%s = %x, %v, want error %q", enc.name, b, err, tc.err)
				}
			}
		})
	}
}

func TestJSONEncoding(t *testing.T) {
	for _, tc := range []struct {
		p    Pack
		want string
	}{
		{Pack{{Name: "a", StringValue: new("\"\\\n\r\t\x01\x1f\u2028ü")}}, `[{"n":"a","vs":"\"\\\n\r\t\u0001\u001f` + "\u2028ü" + `"}]`},
		{Pack{{Name: "a", DataValue: []byte("hi \n")}}, `[{"n":"a","vd":"aGkgCg"}]`},
		{Pack{{Name: "a", DataValue: []byte{0xfb, 0xff}}}, `[{"n":"a","vd":"-_8"}]`},
		{Pack{{Name: "a", BoolValue: new(true), Seq: 42}}, `[{"n":"a","vb":true,"seq":42}]`},
		{Pack{{Name: "a", Value: new(math.Copysign(0, -1))}}, `[{"n":"a","v":-0}]`},
		{Pack{{Name: "a", Value: new(1000.0)}}, `[{"n":"a","v":1e3}]`},
		{Pack{{Name: "a", Value: new(100.0)}}, `[{"n":"a","v":100}]`},
		{Pack{{Name: "a", Value: new(123456789.0)}}, `[{"n":"a","v":123456789}]`},
		{Pack{{Name: "a", Value: new(1e21)}}, `[{"n":"a","v":1e21}]`},
		{Pack{{Name: "a", Value: new(1.5e-7)}}, `[{"n":"a","v":1.5e-7}]`},
		{Pack{{Name: "a", Value: new(0.001)}}, `[{"n":"a","v":1e-3}]`},
		{Pack{{Name: "a", Value: new(-0.0001)}}, `[{"n":"a","v":-1e-4}]`},
		{Pack{{Name: "a", Value: new(math.MaxFloat64)}}, `[{"n":"a","v":1.7976931348623157e308}]`},
		{Pack{{Name: "a", Value: new(5e-324)}}, `[{"n":"a","v":5e-324}]`},
		{Pack{{Name: "a", Value: new(1276020076.001)}}, `[{"n":"a","v":1276020076.001}]`},
		{Pack{{BaseName: new(""), BaseUnit: new(""), Name: "a", Unit: "", Value: new(1.0)}}, `[{"bn":"","bu":"","n":"a","v":1}]`},
	} {
		got, err := tc.p.EncodeJSON()
		if err != nil || string(got) != tc.want {
			t.Errorf("EncodeJSON(%v) = %s, %v, want %s", tc.p, got, err, tc.want)
		}
		back, err := ParseJSON(got)
		if err != nil || !reflect.DeepEqual(back, tc.p) {
			t.Errorf("ParseJSON(%s) = %s, %v, want it back", got, mustJSON(t, back), err)
		}
	}
}

// TestEncodingJSON checks the json.Marshaler and json.Unmarshaler.
func TestEncodingJSON(t *testing.T) {
	type message struct {
		Pack Pack `json:"pack"`
	}
	in := message{Pack{{Name: "a", Value: new(1.0)}}}
	b, err := json.Marshal(in)
	if err != nil || string(b) != `{"pack":[{"n":"a","v":1}]}` {
		t.Fatalf("json.Marshal = %s, %v", b, err)
	}
	var out message
	if err := json.Unmarshal(b, &out); err != nil || !reflect.DeepEqual(out, in) {
		t.Errorf("json.Unmarshal(%s) = %v, %v", b, out, err)
	}
	err = json.Unmarshal([]byte(`{"pack":{"n":"a","v":1}}`), &out)
	if !errors.Is(err, ErrInvalid) {
		t.Errorf("json.Unmarshal(object) = %v, want ErrInvalid", err)
	}
	out = message{}
	if err := json.Unmarshal([]byte(`{"pack":null}`), &out); err != nil || out.Pack != nil {
		t.Errorf("json.Unmarshal(null) = %v, %v", out, err)
	}
}
