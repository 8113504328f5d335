package senml

import (
	"bytes"
	"cmp"
	"math"
	"slices"
	"time"
)

// bases are the base fields in effect at a record of a pack.
type bases struct {
	name, unit string
	time       float64
	value, sum *float64 // nil until a record sets them: "bs":0 differs from none
	version    int      // 0 until a record sets it
}

func (b *bases) apply(r *Record) {
	if r.BaseName != nil {
		b.name = *r.BaseName
	}
	if r.BaseTime != nil {
		b.time = *r.BaseTime
	}
	if r.BaseUnit != nil {
		b.unit = *r.BaseUnit
	}
	if r.BaseValue != nil {
		b.value = r.BaseValue
	}
	if r.BaseSum != nil {
		b.sum = r.BaseSum
	}
	if r.BaseVersion != nil {
		b.version = *r.BaseVersion
	}
}

// Resolve returns the resolved form of p (RFC 8428 §4.6), in which every
// record stands on its own: the base name is prepended to the name, the
// base unit fills an empty unit, the base time is added to the time, which
// is then made absolute (a time below 2^28 is relative to now), the base
// value is added to "v" and the base sum to "s". Every record has "t"; no
// record has a base field but "bver", which RFC 8428 §4.6 requires in every
// resolved record of a pack whose version is not 10. Records that only set
// base fields are dropped, so the result may be empty. The records are
// sorted by time, as RFC 8428 §4.6 requires; records of the same time keep
// their order. Seq is kept.
//
// As RFC 8428 §4.5.4 says, a missing value or sum counts as zero where the
// other one is present: a record with "s" and no value gets "v" from a base
// value in effect, and a record with a value gets "s" from a base sum in
// effect. A base value is not added to "vs", "vb" or "vd".
//
// Base fields are copied into every record they apply to, so a small pack
// can stand for a large resolved one. Resolve bounds it: a resolved record
// counts 64 bytes, more than its CBOR encoding takes besides its text and
// data, plus the bytes of its name, unit and "vs" or "vd"; if the records
// count more than MaxResolvedSize, Resolve fails, naming the first one past
// it, before building any. The resolved pack, its CBOR encoding and what
// Resolve allocates are bounded by that and MaxRecords.
//
// The result shares nothing with p.
func (p Pack) Resolve(now time.Time) (Pack, error) {
	return p.ResolveWithin(now, MaxResolvedSize)
}

// resolvedRecordCost is what a resolved record counts towards the limit
// of ResolveWithin besides its text and data: at least the rest of its
// CBOR encoding, which takes at most 62 bytes (the map's head; "bver";
// labels and heads of name and unit; "t", "ut", "v" and "s" as float64;
// "seq" with a 64-bit number).
const resolvedRecordCost = 64

// ResolveWithin is Resolve with a limit of maxSize bytes in place of
// MaxResolvedSize, for a caller that accepts larger packs: the station's
// collector, whose largest request is configured.
func (p Pack) ResolveWithin(now time.Time, maxSize int) (Pack, error) {
	if err := p.Validate(); err != nil {
		return nil, err
	}
	if err := p.checkResolvedSize(maxSize); err != nil {
		return nil, err
	}
	nowSec := float64(now.Unix()) + float64(now.Nanosecond())/1e9
	var b bases
	out := make(Pack, 0, len(p))
	for i := range p {
		r := &p[i]
		b.apply(r)
		if r.baseOnly() {
			continue
		}
		q := Record{
			Name:       b.name + r.Name,
			Unit:       cmp.Or(r.Unit, b.unit),
			DataValue:  bytes.Clone(r.DataValue),
			UpdateTime: clone(r.UpdateTime),
			Seq:        r.Seq,
		}
		if b.version != 0 && b.version != Version {
			q.BaseVersion = new(b.version)
		}
		if r.StringValue != nil {
			q.StringValue = new(*r.StringValue)
		}
		if r.BoolValue != nil {
			q.BoolValue = new(*r.BoolValue)
		}
		t := b.time + deref(r.Time)
		if t < 1<<28 {
			t += nowSec
		}
		q.Time = &t
		if r.StringValue == nil && r.BoolValue == nil && r.DataValue == nil && (r.Value != nil || b.value != nil) {
			q.Value = new(deref(b.value) + deref(r.Value))
		}
		if r.Sum != nil || b.sum != nil {
			q.Sum = new(deref(b.sum) + deref(r.Sum))
		}
		for _, f := range []field{fTime, fValue, fSum} {
			if x := q.number(f); *x != nil && (math.IsInf(**x, 0) || math.IsNaN(**x)) {
				return nil, recordf(i, "resolved %q is not a finite number", labels[f])
			}
		}
		out = append(out, q)
	}
	slices.SortStableFunc(out, func(a, b Record) int { return cmp.Compare(*a.Time, *b.Time) })
	return out, nil
}

// checkResolvedSize counts p's resolved records as ResolveWithin does,
// without building them, so that a pack over maxSize costs nothing more.
func (p Pack) checkResolvedSize(maxSize int) error {
	var b bases
	size := 0
	for i := range p {
		r := &p[i]
		b.apply(r)
		if r.baseOnly() {
			continue
		}
		unit := cmp.Or(r.Unit, b.unit)
		value := len(r.DataValue)
		if r.StringValue != nil {
			value = len(*r.StringValue)
		}
		size += resolvedRecordCost + len(b.name) + len(r.Name) + len(unit) + value
		if size > maxSize {
			return recordf(i, `resolved pack over %d bytes, the limit: a resolved record counts %d bytes and its name, unit and "vs" or "vd" (here %d, %d and %d bytes)`,
				maxSize, resolvedRecordCost, len(b.name)+len(r.Name), len(unit), value)
		}
	}
	return nil
}

func deref(x *float64) float64 {
	if x == nil {
		return 0
	}
	return *x
}

func clone(x *float64) *float64 {
	if x == nil {
		return nil
	}
	return new(*x)
}
