package senml

import (
	"errors"
	"reflect"
	"strings"
	"testing"
	"time"
)

func TestResolve(t *testing.T) {
	now := time.Unix(1700000000, 250_000_000)
	for _, tc := range []struct {
		name, in, want string
	}{
		{
			"relative times",
			`[{"n":"a","v":1,"t":-10},{"n":"b","v":2},{"n":"c","v":3,"t":2.5}]`,
			`[{"n":"a","t":1699999990.25,"v":1},{"n":"b","t":1700000000.25,"v":2},{"n":"c","t":1700000002.75,"v":3}]`,
		},
		{
			"relative base time",
			`[{"bt":-60,"n":"a","v":1},{"n":"b","t":30,"v":2}]`,
			`[{"n":"a","t":1699999940.25,"v":1},{"n":"b","t":1699999970.25,"v":2}]`,
		},
		{
			"absolute from 2^28",
			`[{"n":"a","t":268435456,"v":1},{"n":"b","t":268435455,"v":2}]`,
			`[{"n":"a","t":268435456,"v":1},{"n":"b","t":1968435455.25,"v":2}]`,
		},
		{
			"base value and sum",
			`[{"bn":"d:","bv":20,"bs":100,"n":"a","v":1},{"n":"b","s":5},{"n":"c","vs":"x"},{"n":"e","vb":true,"s":1}]`,
			`[{"n":"d:a","t":1700000000.25,"v":21,"s":100},{"n":"d:b","t":1700000000.25,"v":20,"s":105},
			  {"n":"d:c","t":1700000000.25,"vs":"x","s":100},{"n":"d:e","t":1700000000.25,"vb":true,"s":101}]`,
		},
		{
			"zero base sum still gives a sum",
			`[{"bs":0,"n":"a","v":1}]`,
			`[{"n":"a","t":1700000000.25,"v":1,"s":0}]`,
		},
		{
			"base fields end",
			`[{"bn":"x:","bu":"V","n":"a","v":1},{"bn":"","bu":"","n":"b","v":2},{"bn":"y:","n":"c","u":"A","v":3}]`,
			`[{"n":"x:a","u":"V","t":1700000000.25,"v":1},{"n":"b","t":1700000000.25,"v":2},{"n":"y:c","u":"A","t":1700000000.25,"v":3}]`,
		},
		{
			"update time and seq kept",
			`[{"n":"a","v":1,"ut":60,"seq":7},{"n":"b","v":1,"seq":8}]`,
			`[{"n":"a","t":1700000000.25,"ut":60,"v":1,"seq":7},{"n":"b","t":1700000000.25,"v":1,"seq":8}]`,
		},
		{
			"sorted, stable",
			`[{"n":"a","t":1700000003,"v":1,"seq":1},{"n":"b","t":1700000001,"v":1,"seq":2},{"n":"c","t":1700000003,"v":1,"seq":3},{"n":"d","t":1700000001,"v":1,"seq":4}]`,
			`[{"n":"b","t":1700000001,"v":1,"seq":2},{"n":"d","t":1700000001,"v":1,"seq":4},{"n":"a","t":1700000003,"v":1,"seq":1},{"n":"c","t":1700000003,"v":1,"seq":3}]`,
		},
		{
			"version 10 is not kept",
			`[{"bver":10,"n":"a","v":1}]`,
			`[{"n":"a","t":1700000000.25,"v":1}]`,
		},
		{
			"base-only records dropped",
			`[{"bn":"x:"},{"n":"a","v":1},{"bt":1700000000},{"n":"b","v":1,"t":1}]`,
			`[{"n":"x:a","t":1700000000.25,"v":1},{"n":"x:b","t":1700000001,"v":1}]`,
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p, err := ParseJSON([]byte(tc.in))
			if err != nil {
				t.Fatal(err)
			}
			want, err := ParseJSON([]byte(tc.want))
			if err != nil {
				t.Fatal(err)
			}
			got, err := p.Resolve(now)
			if err != nil || !reflect.DeepEqual(got, want) {
				t.Errorf("Resolve(%s) = %s, %v, want %s", tc.in, mustJSON(t, got), err, mustJSON(t, want))
			}
		})
	}
}

func TestResolveEmpty(t *testing.T) {
	p := Pack{{BaseName: new("x:")}, {BaseTime: new(5.0)}}
	got, err := p.Resolve(time.Now())
	if err != nil || len(got) != 0 {
		t.Errorf("Resolve(base fields only) = %v, %v, want no records", got, err)
	}
}

func TestResolveErrors(t *testing.T) {
	for _, tc := range []struct {
		name string
		p    Pack
		err  string
	}{
		{"invalid", Pack{{Name: "a"}}, `senml: record 0: has no value or sum`},
		{"time overflow", Pack{{BaseTime: new(1e308), Name: "a", Time: new(1e308), Value: new(1.0)}}, `senml: record 0: resolved "t" is not a finite number`},
		{"value overflow", Pack{{BaseValue: new(-1e308), Name: "a", Value: new(-1e308)}}, `senml: record 0: resolved "v" is not a finite number`},
		{"sum overflow", Pack{{Name: "a", Value: new(1.0)}, {BaseSum: new(1e308), Name: "a", Sum: new(1e308)}}, `senml: record 1: resolved "s" is not a finite number`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := tc.p.Resolve(time.Now())
			if err == nil || !strings.Contains(err.Error(), tc.err) || !errors.Is(err, ErrInvalid) {
				t.Errorf("Resolve = %v, %v, want error %q", got, err, tc.err)
			}
		})
	}
}

// TestResolveCopies checks that the resolved pack shares nothing with p.
func TestResolveCopies(t *testing.T) {
	p := Pack{
		{Name: "a", StringValue: new("x"), UpdateTime: new(1.0)},
		{Name: "b", DataValue: []byte{1}},
		{Name: "c", BoolValue: new(true)},
	}
	r, err := p.Resolve(time.Now())
	if err != nil {
		t.Fatal(err)
	}
	*r[0].StringValue, *r[0].UpdateTime, r[1].DataValue[0], *r[2].BoolValue = "y", 2, 2, false
	if *p[0].StringValue != "x" || *p[0].UpdateTime != 1 || p[1].DataValue[0] != 1 || !*p[2].BoolValue {
		t.Errorf("changing Resolve's result changed p: %s", mustJSON(t, p))
	}
}
