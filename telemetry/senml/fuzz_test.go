package senml

import (
	"bytes"
	"encoding/base64"
	"encoding/json"
	"errors"
	"reflect"
	"strconv"
	"testing"
	"time"
)

var fuzzNow = time.Unix(1700000000, 123456789)

// checkDecoded checks what a parser accepted: it encodes in both formats,
// decodes back to the same pack, resolves to a valid pack and splits.
func checkDecoded(t *testing.T, p Pack) {
	t.Helper()
	j, err := p.EncodeJSON()
	if err != nil {
		t.Fatalf("EncodeJSON of a parsed pack: %v", err)
	}
	if q, err := ParseJSON(j); err != nil || !reflect.DeepEqual(q, p) {
		t.Fatalf("ParseJSON(EncodeJSON(p) = %s) = %v, %v, want p", j, q, err)
	}
	c, err := p.EncodeCBOR()
	if err != nil {
		t.Fatalf("EncodeCBOR of a parsed pack: %v", err)
	}
	if q, err := DecodeCBOR(c); err != nil || !reflect.DeepEqual(q, p) {
		t.Fatalf("DecodeCBOR(EncodeCBOR(p) = %x) = %v, %v, want p = %s", c, q, err, j)
	}
	r, err := p.Resolve(fuzzNow)
	switch {
	case err != nil && !errors.Is(err, ErrInvalid):
		t.Fatalf("Resolve(%s) error %v does not match ErrInvalid", j, err)
	case err == nil && len(r) > 0:
		if err := r.Validate(); err != nil {
			t.Fatalf("Resolve(%s) = %s, invalid: %v", j, mustJSON(t, r), err)
		}
	}
	chunks, err := p.Split(Pack.EncodeCBOR, 200)
	if err != nil {
		t.Fatalf("Split(%s) error: %v", j, err)
	}
	n := 0
	for _, c := range chunks {
		n += len(c.Records)
	}
	if n != len(p) {
		t.Fatalf("Split(%s) = chunks of %d records, want %d", j, n, len(p))
	}
}

func FuzzParseJSON(f *testing.F) {
	for _, ex := range rfcExamples {
		f.Add([]byte(ex.json))
		f.Add([]byte(ex.resolved))
	}
	for _, s := range []string{
		`[{"n":"a","s":5,"seq":18446744073709551615,"bver":5,"vd":"","x":{"y":[null]}}]`,
		`[{"bn":"a:","bt":-1e3,"bu":"","bv":1e-300,"bs":0},{"n":"b","vs":"\u0000\"","ut":1.5}]`,
		`[{"n":"a","v":-0,"t":268435456}]`,
		`[{"n":"a","v":-9007199254740993e3,"s":1.8446744073709552e19,"t":-1e-320}]`,
		`[{"n":"a","v":1,"foo_":1}]`,
		`{"n":"a","v":1}`,
		`[{"n":"a","vs":"\u00fc\ud83d\ude00\ud800x\udc00\ud800\u0041\\\/\b\f\n\r\t\"é"}]`,
		`[{"n":"a","vd":"aGkgCg","x":"\"]}[{","y":[{"z":"\\"}],"\u0076s":"x"}]`,
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		p, err := ParseJSON(b)
		if err != nil {
			if !errors.Is(err, ErrInvalid) {
				t.Fatalf("ParseJSON error %v does not match ErrInvalid", err)
			}
			return
		}
		checkDecoded(t, p)
		checkAgainstEncodingJSON(t, b, p)
	})
}

// checkAgainstEncodingJSON checks that encoding/json reads the same
// fields from b as ParseJSON did, p: the same strings, escapes and all, and
// the same numbers.
func checkAgainstEncodingJSON(t *testing.T, b []byte, p Pack) {
	t.Helper()
	var objects []map[string]any
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.UseNumber()
	if err := dec.Decode(&objects); err != nil {
		t.Fatalf("encoding/json cannot read %q: %v", b, err)
	}
	if len(objects) != len(p) {
		t.Fatalf("encoding/json reads %d records from %q, ParseJSON %d", len(objects), b, len(p))
	}
	for i, o := range objects {
		want := make(map[string]any)
		for label, v := range o {
			f, ok := fieldByLabel(label)
			if !ok || (f == fName || f == fUnit) && v == "" {
				continue
			}
			if n, ok := v.(json.Number); ok {
				switch f {
				case fSeq:
					v, _ = strconv.ParseUint(string(n), 10, 64)
				case fBaseVersion:
					x, _ := strconv.ParseFloat(string(n), 64)
					v = int(x)
				default:
					v, _ = strconv.ParseFloat(string(n), 64)
				}
			}
			if f == fDataValue {
				v, _ = base64.RawURLEncoding.DecodeString(v.(string))
			}
			if f == fSeq && v == uint64(0) {
				continue
			}
			want[label] = v
		}
		if got := recordMap(&p[i]); !reflect.DeepEqual(got, want) {
			t.Fatalf("record %d of %q: ParseJSON reads %v, encoding/json %v", i, b, got, want)
		}
	}
}

// recordMap lists r's fields by label.
func recordMap(r *Record) map[string]any {
	m := make(map[string]any)
	set := func(f field, present bool, v any) {
		if present {
			m[labels[f]] = v
		}
	}
	str := func(s *string) any {
		if s == nil {
			return nil
		}
		return *s
	}
	num := func(x *float64) any {
		if x == nil {
			return nil
		}
		return *x
	}
	set(fBaseName, r.BaseName != nil, str(r.BaseName))
	set(fBaseTime, r.BaseTime != nil, num(r.BaseTime))
	set(fBaseUnit, r.BaseUnit != nil, str(r.BaseUnit))
	set(fBaseValue, r.BaseValue != nil, num(r.BaseValue))
	set(fBaseSum, r.BaseSum != nil, num(r.BaseSum))
	if r.BaseVersion != nil {
		m["bver"] = *r.BaseVersion
	}
	set(fName, r.Name != "", r.Name)
	set(fUnit, r.Unit != "", r.Unit)
	set(fTime, r.Time != nil, num(r.Time))
	set(fUpdateTime, r.UpdateTime != nil, num(r.UpdateTime))
	set(fValue, r.Value != nil, num(r.Value))
	set(fStringValue, r.StringValue != nil, str(r.StringValue))
	if r.BoolValue != nil {
		m["vb"] = *r.BoolValue
	}
	set(fDataValue, r.DataValue != nil, r.DataValue)
	set(fSum, r.Sum != nil, num(r.Sum))
	set(fSeq, r.Seq != 0, r.Seq)
	return m
}

func FuzzDecodeCBOR(f *testing.F) {
	f.Add(hexDump(f, rfcCBOR))
	for _, ex := range rfcExamples {
		p, err := ParseJSON([]byte(ex.json))
		if err != nil {
			f.Fatal(err)
		}
		b, err := p.EncodeCBOR()
		if err != nil {
			f.Fatal(err)
		}
		f.Add(b)
	}
	for _, h := range []string{
		"9fbf007f616160626263ff085f410140ff6373657105ffbf0061640520ffff",
		"81a6006161020109a1617884f6f7f0f8ff26c48221196ab361786179625f7801",
		"81a3006161 02c48221196ab3 06fa7fc00000",
		"81a40061610201 20fb4009 21f93c00",
		"81bf0061610201ff00",
	} {
		f.Add(unhex(f, h))
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		p, err := DecodeCBOR(b)
		if err != nil {
			if !errors.Is(err, ErrInvalid) {
				t.Fatalf("DecodeCBOR error %v does not match ErrInvalid", err)
			}
			return
		}
		checkDecoded(t, p)
	})
}
