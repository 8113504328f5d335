package senml

import (
	"fmt"
	"math"
	"unicode/utf8"
)

// Media types (RFC 8428 §12.3) and CoAP Content-Format numbers (RFC 8428
// §12.5) of the two encodings.
const (
	MediaTypeJSON = "application/senml+json"
	MediaTypeCBOR = "application/senml+cbor"

	ContentFormatJSON = 110
	ContentFormatCBOR = 112
)

// Version is the SenML version of RFC 8428, the newest this package reads.
// A pack without "bver" has this version.
const Version = 10

// Limits on what the parsers and encoders accept.
const (
	// MaxRecords is the most records in one pack. It bounds the memory a
	// small hostile input can claim (a CBOR record can be 3 bytes long, a
	// Record takes 160 bytes on 64-bit platforms) while leaving room for any
	// pack an uplink or a producer sends in practice.
	MaxRecords = 10000

	// MaxNameLen is the longest name, base name and name together, in bytes.
	// RFC 8428 sets no limit; backends store names as keys.
	MaxNameLen = 255

	// MaxUnitLen is the longest unit, "u" or "bu", in bytes. RFC 8428 sets
	// no limit; the units registered for SenML are a few characters long
	// ("Cel", "m/s2", "beat/min"). A base unit is copied into every record
	// without a unit of its own, so its length is multiplied by the records
	// of the pack.
	MaxUnitLen = 32

	// MaxValueLen is the longest string value ("vs") and data value ("vd",
	// in bytes once decoded). Larger blobs are no measurement; a record
	// must also fit one message of an uplink (1152 bytes for CoAP by
	// default).
	MaxValueLen = 4096

	// MaxLabelLen is the longest label of a field the parsers skip. The
	// labels registered for SenML are a few bytes long.
	MaxLabelLen = 64

	// MaxResolvedSize is the most bytes Resolve lets a resolved pack count
	// (see Resolve). It bounds what one pack can become once base fields
	// are copied into its records: 16 times a 64 KiB ingest line. A line of
	// that size whose base name and base unit have 64 bytes together
	// resolves within it, whatever its records.
	MaxResolvedSize = 1 << 20

	// MaxDepth is the deepest nesting of arrays, maps (objects) and tags:
	// the pack is at depth 1, a record at 2, an array or tag in a field's
	// value at 3. Only the values of unknown fields, which are skipped, and
	// CBOR decimal fractions nest below a record.
	MaxDepth = 16
)

// A Record is one SenML record (RFC 8428 §4). The optional fields whose
// zero value differs from their absence are pointers, nil when absent: an
// explicit "bn":"" ends an earlier base name, "bs":0 gives the records after
// it a sum, "vs":"" is a value.
//
// Base fields apply to the record that has them and to every later record
// of the pack, up to the next record that has the same base field.
type Record struct {
	BaseName    *string  // "bn": prepended to Name.
	BaseTime    *float64 // "bt": seconds, added to Time.
	BaseUnit    *string  // "bu": the unit of records that have none.
	BaseValue   *float64 // "bv": added to Value.
	BaseSum     *float64 // "bs": added to Sum.
	BaseVersion *int     // "bver": 1 to Version; absent means Version.

	Name string // "n": appended to the base name; "" when absent.
	Unit string // "u": free text, passed through; "" when absent.

	// At most one of the four values is present.
	Value       *float64 // "v"
	StringValue *string  // "vs"
	BoolValue   *bool    // "vb"
	DataValue   []byte   // "vd": nil when absent, non-nil (maybe empty) when present.

	Sum *float64 // "s": the integral of the value over time, in Unit×seconds.

	// "t": seconds, added to the base time. The sum is since the Unix epoch
	// if at least 2^28, else relative to now (RFC 8428 §4.5.3).
	Time *float64

	UpdateTime *float64 // "ut": seconds until the sensor's next reading, at the latest.

	// Seq is our extension, label "seq" in JSON and CBOR: the device's
	// monotonic sequence number, by which the backend drops duplicates.
	// Zero means not stamped and is not encoded; the store numbers records
	// from 1.
	Seq uint64
}

// A Pack is a SenML pack: records whose base fields apply to the records
// that follow them, so that their order matters.
type Pack []Record

// field names the labels, in the order the encoders write them: the order of
// the examples of RFC 8428, so that its CBOR example comes out byte for byte.
type field uint8

const (
	fBaseName field = iota
	fBaseTime
	fBaseUnit
	fBaseValue
	fBaseSum
	fBaseVersion
	fName
	fUnit
	fTime
	fUpdateTime
	fValue
	fStringValue
	fBoolValue
	fDataValue
	fSum
	fSeq
	numFields
)

// labels are the JSON labels (RFC 8428 Table 2), and "seq".
var labels = [numFields]string{
	fBaseName:    "bn",
	fBaseTime:    "bt",
	fBaseUnit:    "bu",
	fBaseValue:   "bv",
	fBaseSum:     "bs",
	fBaseVersion: "bver",
	fName:        "n",
	fUnit:        "u",
	fTime:        "t",
	fUpdateTime:  "ut",
	fValue:       "v",
	fStringValue: "vs",
	fBoolValue:   "vb",
	fDataValue:   "vd",
	fSum:         "s",
	fSeq:         "seq",
}

// cborLabels are the CBOR labels (RFC 8428 Table 4). "seq" has none: an
// extension's label is a text string.
var cborLabels = [numFields]int64{
	fBaseName:    -2,
	fBaseTime:    -3,
	fBaseUnit:    -4,
	fBaseValue:   -5,
	fBaseSum:     -6,
	fBaseVersion: -1,
	fName:        0,
	fUnit:        1,
	fTime:        6,
	fUpdateTime:  7,
	fValue:       2,
	fStringValue: 3,
	fBoolValue:   4,
	fDataValue:   8,
	fSum:         5,
}

// fieldByLabel maps a JSON label to its field.
func fieldByLabel(s string) (field, bool) {
	for f, l := range labels {
		if l == s {
			return field(f), true
		}
	}
	return 0, false
}

// fieldByCBORLabel maps an integer CBOR label to its field.
func fieldByCBORLabel(n int64) (field, bool) {
	for f, l := range cborLabels {
		if l == n && field(f) != fSeq {
			return field(f), true
		}
	}
	return 0, false
}

// number returns the address of the float field f, or nil if f is not one.
func (r *Record) number(f field) **float64 {
	switch f {
	case fBaseTime:
		return &r.BaseTime
	case fBaseValue:
		return &r.BaseValue
	case fBaseSum:
		return &r.BaseSum
	case fTime:
		return &r.Time
	case fUpdateTime:
		return &r.UpdateTime
	case fValue:
		return &r.Value
	case fSum:
		return &r.Sum
	}
	return nil
}

// setString stores the text of field f, one of the string fields.
func (r *Record) setString(f field, s string) {
	switch f {
	case fBaseName:
		r.BaseName = new(s)
	case fBaseUnit:
		r.BaseUnit = new(s)
	case fName:
		r.Name = s
	case fUnit:
		r.Unit = s
	case fStringValue:
		r.StringValue = new(s)
	}
}

// fieldCount is the number of fields an encoder writes for r.
func (r *Record) fieldCount() int {
	n := 0
	for _, present := range [...]bool{
		r.BaseName != nil, r.BaseTime != nil, r.BaseUnit != nil, r.BaseValue != nil,
		r.BaseSum != nil, r.BaseVersion != nil, r.Name != "", r.Unit != "",
		r.Time != nil, r.UpdateTime != nil, r.Value != nil, r.StringValue != nil,
		r.BoolValue != nil, r.DataValue != nil, r.Sum != nil, r.Seq != 0,
	} {
		if present {
			n++
		}
	}
	return n
}

// isString reports whether field f holds text.
func isString(f field) bool {
	switch f {
	case fBaseName, fBaseUnit, fName, fUnit, fStringValue:
		return true
	}
	return false
}

// baseOnly reports whether r has no regular field: it only sets base
// fields for the records after it, and is no measurement of its own.
func (r *Record) baseOnly() bool {
	return r.Name == "" && r.Unit == "" && r.Value == nil && r.StringValue == nil &&
		r.BoolValue == nil && r.DataValue == nil && r.Sum == nil && r.Time == nil &&
		r.UpdateTime == nil
}

// Validate reports the first fault of p against RFC 8428 and this package's
// limits, as the parsers do. The encoders and Split call it.
func (p Pack) Validate() error {
	if len(p) == 0 {
		return invalidf("pack has no records")
	}
	if len(p) > MaxRecords {
		return invalidf("pack has %d records, more than %d", len(p), MaxRecords)
	}
	v := validator{version: Version}
	for i := range p {
		if err := v.record(i, &p[i]); err != nil {
			return err
		}
	}
	return nil
}

// validator carries what earlier records of a pack set for the later ones.
type validator struct {
	version  int
	baseName string
}

func (v *validator) record(i int, r *Record) error {
	for _, x := range [...]struct {
		f field
		p *float64
	}{
		{fBaseTime, r.BaseTime}, {fBaseValue, r.BaseValue}, {fBaseSum, r.BaseSum},
		{fTime, r.Time}, {fUpdateTime, r.UpdateTime}, {fValue, r.Value}, {fSum, r.Sum},
	} {
		if x.p != nil && (math.IsInf(*x.p, 0) || math.IsNaN(*x.p)) {
			return recordf(i, "%q is not a finite number", labels[x.f])
		}
	}
	if r.BaseVersion != nil {
		b := *r.BaseVersion
		switch {
		case b < 1:
			return recordf(i, `"bver" %d is not a positive integer`, b)
		case b > Version:
			return recordf(i, `"bver" %d is newer than version %d, not supported`, b, Version)
		case i > 0 && b != v.version:
			// RFC 8428 §4.4: all records of a pack have the same version.
			return recordf(i, `"bver" %d differs from the pack's version %d`, b, v.version)
		}
		v.version = b
	}
	for _, x := range [...]struct {
		f        field
		len, max int
	}{
		{fBaseUnit, lenOf(r.BaseUnit), MaxUnitLen}, {fUnit, len(r.Unit), MaxUnitLen},
		{fStringValue, lenOf(r.StringValue), MaxValueLen}, {fDataValue, len(r.DataValue), MaxValueLen},
	} {
		if x.len > x.max {
			return recordf(i, "%q is %d bytes long, more than %d", labels[x.f], x.len, x.max)
		}
	}
	if !validUTF8(r.BaseUnit) {
		return recordf(i, `"bu" is not valid UTF-8`)
	}
	if !utf8.ValidString(r.Unit) {
		return recordf(i, `"u" is not valid UTF-8`)
	}
	if !validUTF8(r.StringValue) {
		return recordf(i, `"vs" is not valid UTF-8`)
	}
	if r.BaseName != nil {
		if *r.BaseName != "" {
			if err := checkName(*r.BaseName, ""); err != nil {
				return recordf(i, `"bn" %s`, err.msg)
			}
		}
		v.baseName = *r.BaseName
	}

	var values [4]string
	n := 0
	for _, x := range [...]struct {
		present bool
		label   string
	}{
		{r.Value != nil, `"v"`},
		{r.StringValue != nil, `"vs"`},
		{r.BoolValue != nil, `"vb"`},
		{r.DataValue != nil, `"vd"`},
	} {
		if x.present {
			values[n] = x.label
			n++
		}
	}
	if n > 1 {
		return recordf(i, "has both %s and %s, want at most one value", values[0], values[1])
	}
	if r.baseOnly() {
		return nil
	}
	if n == 0 && r.Sum == nil {
		return recordf(i, "has no value or sum")
	}
	if err := checkName(v.baseName, r.Name); err != nil {
		return recordf(i, "name %s", err.msg)
	}
	return nil
}

// floats hands out the addresses of decoded numbers, many per allocation:
// a record has a few of them, a pack many.
type floats []float64

func (f *floats) alloc(x float64) *float64 {
	if len(*f) == cap(*f) {
		*f = make([]float64, 0, 32)
	}
	*f = append(*f, x)
	return &(*f)[len(*f)-1]
}

// nameError is a fault of a name; msg follows the name's description.
type nameError struct{ msg string }

// checkName checks the concatenation of base and name against RFC 8428
// §4.5.1 and MaxNameLen without building it.
func checkName(base, name string) *nameError {
	n := len(base) + len(name)
	switch {
	case n == 0:
		return &nameError{`is empty`}
	case n > MaxNameLen:
		return &nameError{fmt.Sprintf("is %d bytes long, more than %d", n, MaxNameLen)}
	}
	at := func(k int) byte {
		if k < len(base) {
			return base[k]
		}
		return name[k-len(base)]
	}
	if c := at(0); !isAlnum(c) {
		full := base + name
		r, _ := utf8.DecodeRuneInString(full)
		return &nameError{fmt.Sprintf("%q starts with %q, want a letter or digit", full, r)}
	}
	for k := 1; k < n; k++ {
		c := at(k)
		if !isAlnum(c) && c != '-' && c != ':' && c != '.' && c != '/' && c != '_' {
			full := base + name
			r, _ := utf8.DecodeRuneInString(full[k:])
			return &nameError{fmt.Sprintf("%q has %q at byte %d, want only letters, digits and - : . / _", full, r, k)}
		}
	}
	return nil
}

func validUTF8(s *string) bool { return s == nil || utf8.ValidString(*s) }

func lenOf(s *string) int {
	if s == nil {
		return 0
	}
	return len(*s)
}

func isAlnum(c byte) bool {
	return 'a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || '0' <= c && c <= '9'
}
