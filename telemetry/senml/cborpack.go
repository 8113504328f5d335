package senml

import (
	"strconv"
	"strings"
)

// DecodeCBOR reads an application/senml+cbor pack and validates it. Errors
// match ErrInvalid.
func DecodeCBOR(b []byte) (Pack, error) {
	d := decoder{b: b}
	h, err := d.head()
	if err != nil {
		return nil, err
	}
	if h.major != majorArray {
		return nil, invalidf("pack is %s, want an array of records", h.describe())
	}
	if !h.indefinite && h.arg > MaxRecords {
		return nil, invalidf("pack has %d records, more than %d", h.arg, MaxRecords)
	}
	if err := d.checkCount(h, 1); err != nil {
		return nil, err
	}
	p := make(Pack, 0, h.arg)
	for i := 0; ; i++ {
		ok, err := d.more(h, uint64(i))
		if err != nil {
			return nil, err
		}
		if !ok {
			break
		}
		if i == MaxRecords {
			return nil, invalidf("pack has more than %d records", MaxRecords)
		}
		p = append(p, Record{})
		if err := d.record(i, &p[i]); err != nil {
			return nil, err
		}
	}
	if d.off < len(b) {
		return nil, invalidf("CBOR continues after the pack, at byte %d", d.off)
	}
	if err := p.Validate(); err != nil {
		return nil, err
	}
	return p, nil
}

// labelKey identifies an unknown label, to find it twice in a record.
type labelKey struct {
	major byte
	arg   uint64
	text  string
}

// String formats the label as in CBOR diagnostic notation.
func (k labelKey) String() string {
	switch k.major {
	case majorUint:
		return strconv.FormatUint(k.arg, 10)
	case majorNint:
		return "-" + addOne(strconv.FormatUint(k.arg, 10))
	}
	return strconv.Quote(k.text)
}

// record reads record i into r.
func (d *decoder) record(i int, r *Record) error {
	h, err := d.head()
	if err != nil {
		return err
	}
	if h.major != majorMap {
		return invalidf("record %d is %s, want a map", i, h.describe())
	}
	if err := d.checkCount(h, 2); err != nil {
		return err
	}
	var seen [numFields]bool
	var unknown map[labelKey]bool
	for j := uint64(0); ; j++ {
		ok, err := d.more(h, j)
		if err != nil {
			return err
		}
		if !ok {
			return nil
		}
		k, err := d.head()
		if err != nil {
			return err
		}
		var (
			f     field
			known bool
			key   = labelKey{major: k.major, arg: k.arg}
		)
		switch k.major {
		case majorUint:
			if k.arg <= 8 {
				f, known = fieldByCBORLabel(int64(k.arg))
			}
		case majorNint:
			if k.arg < 6 {
				f, known = fieldByCBORLabel(-1 - int64(k.arg))
			}
		case majorText:
			s, err := d.str(k)
			if err != nil {
				return err
			}
			if string(s) == "seq" {
				f, known = fSeq, true
				break
			}
			if len(s) > MaxLabelLen {
				return recordf(i, "a label is %d bytes long, more than %d", len(s), MaxLabelLen)
			}
			key = labelKey{major: majorText, text: string(s)} // whatever the chunks
			if f, ok := fieldByLabel(key.text); ok {
				return recordf(i, "text label %s, want the integer label %d", key, cborLabels[f])
			}
			if strings.HasSuffix(key.text, "_") {
				return recordf(i, "label %s must be understood and is not supported", key)
			}
		default:
			return recordf(i, "a label is %s, want an integer or a text string", k.describe())
		}
		if known {
			if seen[f] {
				return recordf(i, "label %q appears twice", labels[f])
			}
			seen[f] = true
			if err := d.field(i, r, f); err != nil {
				return err
			}
			continue
		}
		if unknown[key] {
			return recordf(i, "label %s appears twice", key)
		}
		if unknown == nil {
			unknown = make(map[labelKey]bool)
		}
		unknown[key] = true
		if err := d.skipItem(3); err != nil {
			return err
		}
	}
}

// field reads the value of the known field f of record i into r.
func (d *decoder) field(i int, r *Record, f field) error {
	h, err := d.head()
	if err != nil {
		return err
	}
	want := func(what string) error {
		return recordf(i, "%q is %s, want %s", labels[f], h.describe(), what)
	}
	switch {
	case isString(f):
		if h.major != majorText {
			return want("a text string")
		}
		s, err := d.str(h)
		if err != nil {
			return err
		}
		r.setString(f, string(s))
	case f == fDataValue:
		if h.major != majorBytes {
			return want("a byte string")
		}
		p, err := d.str(h)
		if err != nil {
			return err
		}
		r.DataValue = append([]byte{}, p...)
	case f == fBoolValue:
		if h.major != majorSimple || h.info != simpleFalse && h.info != simpleTrue {
			return want("a boolean")
		}
		v := h.info == simpleTrue
		r.BoolValue = &v
	case f == fBaseVersion:
		// RFC 8428 §6: "only an unsigned integer is allowed".
		if h.major != majorUint {
			return want("an unsigned integer")
		}
		if h.arg > Version {
			return recordf(i, `"bver" %d is newer than version %d, not supported`, h.arg, Version)
		}
		v := int(h.arg)
		r.BaseVersion = &v
	case f == fSeq:
		if h.major != majorUint {
			return want("an unsigned integer")
		}
		r.Seq = h.arg
	default:
		v, ok, err := d.number(h, 3)
		if err != nil {
			return err
		}
		if !ok {
			return want("a number")
		}
		*r.number(f) = d.floats.alloc(v)
	}
	return nil
}

// EncodeCBOR validates p and writes it as application/senml+cbor, in the
// preferred serialization (see the package doc).
func (p Pack) EncodeCBOR() ([]byte, error) {
	if err := p.Validate(); err != nil {
		return nil, err
	}
	b := make([]byte, 0, 32*len(p)+8)
	b = appendHead(b, majorArray, uint64(len(p)))
	for i := range p {
		b = appendCBORRecord(b, &p[i])
	}
	return b, nil
}

// appendCBORRecord writes r's fields in the order of labels.
func appendCBORRecord(b []byte, r *Record) []byte {
	b = appendHead(b, majorMap, uint64(r.fieldCount()))
	text := func(f field, s *string) {
		if s != nil {
			b = appendText(appendInt(b, cborLabels[f]), *s)
		}
	}
	number := func(f field, x *float64) {
		if x != nil {
			b = appendNumber(appendInt(b, cborLabels[f]), *x)
		}
	}
	text(fBaseName, r.BaseName)
	number(fBaseTime, r.BaseTime)
	text(fBaseUnit, r.BaseUnit)
	number(fBaseValue, r.BaseValue)
	number(fBaseSum, r.BaseSum)
	if r.BaseVersion != nil {
		b = appendHead(appendInt(b, cborLabels[fBaseVersion]), majorUint, uint64(*r.BaseVersion))
	}
	if r.Name != "" {
		text(fName, &r.Name)
	}
	if r.Unit != "" {
		text(fUnit, &r.Unit)
	}
	number(fTime, r.Time)
	number(fUpdateTime, r.UpdateTime)
	number(fValue, r.Value)
	text(fStringValue, r.StringValue)
	if r.BoolValue != nil {
		b = appendBool(appendInt(b, cborLabels[fBoolValue]), *r.BoolValue)
	}
	if r.DataValue != nil {
		b = appendBytes(appendInt(b, cborLabels[fDataValue]), r.DataValue)
	}
	number(fSum, r.Sum)
	if r.Seq != 0 {
		b = appendHead(appendText(b, labels[fSeq]), majorUint, r.Seq)
	}
	return b
}
